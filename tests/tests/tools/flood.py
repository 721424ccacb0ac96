#!/usr/bin/env python3
"""Sends a bounded burst of malformed and forged PON traffic at a forwarder.

Run inside the lab's internet namespace. Counts are fixed so the test can
check that every packet was dropped and counted:

  --malformed N   spoofed from a real peer (SRC:PORT): garbage, bad version,
                  hop index out of range, truncated hop list, a seal that
                  names no session
  --not-for-me N  spoofed from a real peer: well-formed, names another hop
  --stranger N    well-formed PON from an address that is no peer
  --ipip N        IP-in-IP from a host that is no local agent
"""
import argparse
import random
import socket
import struct

p = argparse.ArgumentParser()
p.add_argument("--target", required=True)          # forwarder address
p.add_argument("--peer", required=True)            # a real peer's address (spoofed)
p.add_argument("--self-id", type=int, required=True)
p.add_argument("--malformed", type=int, default=0)
p.add_argument("--not-for-me", type=int, default=0)
p.add_argument("--stranger", type=int, default=0)
p.add_argument("--ipip", type=int, default=0)
a = p.parse_args()

rng = random.Random(7)
PORT = 7300


def ipv4(src, dst, proto, payload):
    total = 20 + len(payload)
    h = struct.pack("!BBHHHBBH4s4s", 0x45, 0, total, 0, 0, 64, proto, 0,
                    socket.inet_aton(src), socket.inet_aton(dst))
    return h + payload


def udp(src, sport, dst, dport, payload):
    return ipv4(src, dst, 17, struct.pack("!HHHH", sport, dport, 8 + len(payload), 0) + payload)


def pon(hops, index=0, kind=1, version=2, inner=None):
    """A version-2 PON packet: header, hops, a seal (index, counter) naming
    a session that does not exist, the payload and room for the tags."""
    head = struct.pack("!BBBBBBHII", version, kind, 0, 16, len(hops), index, 0, 0, 99)
    head += b"".join(struct.pack("!I", h) for h in hops)
    head += struct.pack("!IQ", rng.getrandbits(32) | 1, rng.getrandbits(63))
    if len(hops) > 1:
        head += struct.pack("!IQ", rng.getrandbits(32) | 1, rng.getrandbits(63))
    if inner is None:
        inner = ipv4("198.18.9.9", "198.18.1.11", 17, b"\0" * 8)
    return head + inner + bytes(16 if len(hops) == 1 else 32)


def malformed(k):
    kind = k % 5
    if kind == 0:
        return bytes([rng.randrange(3, 256)]) + rng.randbytes(rng.randrange(0, 120))
    if kind == 1:
        return pon([a.self_id], version=1)
    if kind == 2:
        return pon([a.self_id], index=1)
    if kind == 3:
        return pon([a.self_id, 1, 2, 3])[:20]
    return pon([a.self_id])


raw = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_RAW)
plain = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
for k in range(a.malformed):
    raw.sendto(udp(a.peer, PORT, a.target, PORT, malformed(k)), (a.target, 0))
for _ in range(a.not_for_me):
    raw.sendto(udp(a.peer, PORT, a.target, PORT, pon([a.self_id + 100])), (a.target, 0))
for _ in range(a.stranger):
    plain.sendto(pon([a.self_id]), (a.target, PORT))
inner = ipv4("198.18.1.99", "198.18.2.11", 17, b"\0" * 8)
for _ in range(a.ipip):
    raw.sendto(ipv4("198.18.1.99", a.target, 4, inner), (a.target, 0))
print("sent", a.malformed + a.not_for_me + a.stranger + a.ipip)
