#!/usr/bin/env python3
"""Sends a bounded burst of spoofed UDP datagrams on a site LAN, as a
neighbour VM would: from another host's address (--src) to a port of the
proxy or of an agent (--dst:--port), or on a split proxy's local link. Run inside the neighbour's namespace
(raw socket, so the source address is whatever we say). Counts are fixed
so the test can check every datagram was dropped and counted:

  --plain N   what the legs carried before they were sealed: an IPv4 packet
              (forwarder, RA) or a steering message (TA), unauthenticated
  --sealed N  site-LAN header (version 1, an epoch, a counter) and a tag
              made without the key
"""
import argparse
import random
import socket
import struct
import time

p = argparse.ArgumentParser()
p.add_argument("--src", required=True)
p.add_argument("--dst", required=True)
p.add_argument("--port", type=int, required=True)
p.add_argument("--sport", type=int, help="source port (default: --port)")
p.add_argument("--inner-dst", default="198.18.2.11")
p.add_argument("--plain", type=int, default=0)
p.add_argument("--sealed", type=int, default=0)
a = p.parse_args()

rng = random.Random(9)


def ipv4(src, dst, proto, payload):
    total = 20 + len(payload)
    h = struct.pack("!BBHHHBBH4s4s", 0x45, 0, total, 0, 0, 64, proto, 0,
                    socket.inet_aton(src), socket.inet_aton(dst))
    return h + payload


def udp(sport, dport, payload):
    return ipv4(a.src, a.dst, 17, struct.pack("!HHHH", sport, dport, 8 + len(payload), 0) + payload)


def plain():
    if a.port == 7303:
        # A steering message (postcard: version 2, epoch, seq, part 0 of 1)
        # leaving everything to the IP path.
        return bytes([2, 0x80 | 1, 0x7f, 99, 0, 1, 1, 0, 0, 0])
    return ipv4(a.src, a.inner_dst, 17, struct.pack("!HHHH", 5, 5, 72, 0) + bytes(64))


def sealed():
    # Epochs far in the future, so no "stale epoch" shortcut applies: each
    # must fail on its tag.
    head = struct.pack("!BBHQQ", 1, rng.randrange(2), 0, (1 << 63) + rng.getrandbits(62),
                       rng.getrandbits(63))
    return head + rng.randbytes(rng.randrange(28, 200)) + rng.randbytes(16)


raw = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_RAW)
# Paced a little, so that the receiver's socket buffer (the TA reads its
# steering port one datagram at a time) does not overflow: the test counts
# what the daemon dropped, not what the kernel did.
sport = a.sport or a.port
burst = [udp(sport, a.port, plain()) for _ in range(a.plain)]
burst += [udp(sport, a.port, sealed()) for _ in range(a.sealed)]
for k, d in enumerate(burst):
    raw.sendto(d, (a.dst, 0))
    if k % 20 == 19:
        time.sleep(0.002)
