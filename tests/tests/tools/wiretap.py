#!/usr/bin/env python3
"""An attacker on the wire, inside one lab namespace: captures PON datagrams
(UDP port 7300) seen on every interface of the namespace, then re-sends them
as they were (replay) or altered, with the real peer's source address.

  capture --out FILE --seconds S [--max N] --needle HEX
      prints "ready" once listening, then {"captured": n, "data": d,
      "needle_seen": k}: how many PON
      datagrams it saw, how many were data packets, and in how many the
      needle (the known application payload) appears in clear.
  replay --in FILE --to ADDR [--alter] [--max N]
      re-sends the captured data packets addressed to ADDR from their real
      source; --alter flips a payload byte and sets fresh counters (so the
      replay windows let it through to the tag checks).

Bounded in count and time; needs CAP_NET_RAW (the tests run as root).
"""
import argparse
import json
import select
import signal
import socket
import struct
import sys
import time

PON_PORT = 7300
ETH_P_ALL = 0x0003


def capture(a):
    s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_ALL))
    stop = []
    # SIGINT ends the capture cleanly: the summary is still printed.
    signal.signal(signal.SIGINT, lambda *_: stop.append(True))
    print("ready", flush=True)
    needle = bytes.fromhex(a.needle)
    seen, data, hits = 0, 0, 0
    frames = []
    end = time.monotonic() + a.seconds
    while time.monotonic() < end and seen < a.max and not stop:
        try:
            r, _, _ = select.select([s], [], [], 0.2)
        except InterruptedError:
            continue
        if not r:
            continue
        frame, (_, _, pkttype, *_) = s.recvfrom(65535)
        if pkttype == socket.PACKET_OUTGOING:
            continue  # each datagram once: as it arrives on an interface
        if len(frame) < 14 + 20 + 8 or frame[12:14] != b"\x08\x00":
            continue
        ip = frame[14:]
        ihl = (ip[0] & 0x0F) * 4
        if ip[9] != 17 or len(ip) < ihl + 8:
            continue
        sport, dport = struct.unpack("!HH", ip[ihl:ihl + 4])
        if PON_PORT not in (sport, dport):
            continue
        payload = ip[ihl + 8:]
        seen += 1
        if len(payload) > 1 and payload[1] == 1:
            data += 1
        if needle in payload:
            hits += 1
        frames.append(ip[:struct.unpack("!H", ip[2:4])[0]])
    with open(a.out, "wb") as f:
        for fr in frames:
            f.write(struct.pack("!I", len(fr)) + fr)
    print(json.dumps({"captured": seen, "data": data, "needle_seen": hits}))


def frames_of(path):
    with open(path, "rb") as f:
        raw = f.read()
    at = 0
    while at + 4 <= len(raw):
        n = struct.unpack("!I", raw[at:at + 4])[0]
        yield raw[at + 4:at + 4 + n]
        at += 4 + n


def checksum(b):
    if len(b) % 2:
        b += b"\0"
    s = sum(struct.unpack(f"!{len(b) // 2}H", b))
    while s >> 16:
        s = (s & 0xFFFF) + (s >> 16)
    return ~s & 0xFFFF


def replay(a):
    raw = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_RAW)
    sent = 0
    for ip in frames_of(a.inp):
        if sent >= a.max:
            break
        ihl = (ip[0] & 0x0F) * 4
        dst = socket.inet_ntoa(ip[16:20])
        pon = bytearray(ip[ihl + 8:])
        if dst != a.to or len(pon) < 2 or pon[1] != 1:
            continue
        if a.alter:
            hops = pon[4]
            seal = 16 + 4 * hops
            pon[seal + 4:seal + 12] = struct.pack("!Q", (1 << 62) + sent)
            if hops > 1:  # the link's counter too: fresh for both windows
                pon[seal + 16:seal + 24] = struct.pack("!Q", (1 << 62) + sent)
            pon[-20] ^= 0x01  # in the sealed payload (or its tag)
        udp = ip[ihl:ihl + 8]
        pkt = bytearray(ip[:ihl]) + udp + pon
        struct.pack_into("!H", pkt, 2, len(pkt))
        struct.pack_into("!H", pkt, ihl + 4, 8 + len(pon))
        struct.pack_into("!H", pkt, ihl + 6, 0)  # UDP checksum optional (IPv4)
        struct.pack_into("!H", pkt, 10, 0)
        struct.pack_into("!H", pkt, 10, checksum(bytes(pkt[:ihl])))
        raw.sendto(bytes(pkt), (dst, 0))
        sent += 1
    print(json.dumps({"sent": sent}))


p = argparse.ArgumentParser()
sub = p.add_subparsers(dest="cmd", required=True)
c = sub.add_parser("capture")
c.add_argument("--out", required=True)
c.add_argument("--seconds", type=float, required=True)
c.add_argument("--max", type=int, default=200000)
c.add_argument("--needle", required=True)
r = sub.add_parser("replay")
r.add_argument("--in", dest="inp", required=True)
r.add_argument("--to", required=True)
r.add_argument("--alter", action="store_true")
r.add_argument("--max", type=int, default=10000)
a = p.parse_args()
{"capture": capture, "replay": replay}[a.cmd](a)
sys.stdout.flush()
