//! Flows and how they are spread over the proxies of a site.
//!
//! A site may run several proxies. Whoever has a choice among them (a TA
//! choosing its forwarder, an ingress proxy choosing the destination site's
//! egress) hashes the packet's flow and picks by rendezvous (highest random
//! weight) hashing: every packet of a flow goes to the same proxy while that
//! proxy is in the candidate set, and when a proxy leaves the set only its
//! own flows move. No state per flow is kept, so nothing grows with traffic.
//!
//! The hash is not keyed: the choice only spreads load, and a sender that
//! crafts its flows to land on one proxy can only crowd its own site's
//! proxy, which it could do anyway by sending more.

use crate::ip::{InnerPacket, IpProtocol};

/// Protocols whose first four payload bytes are the source and destination
/// ports: a flow of theirs is the 5-tuple.
fn has_ports(p: IpProtocol) -> bool {
    matches!(
        p,
        IpProtocol::Tcp | IpProtocol::Udp | IpProtocol::Unknown(132) | IpProtocol::Unknown(136)
    )
}

/// A 64-bit finaliser (splitmix64's): every input bit moves every output
/// bit, so close ids and flows land far apart.
#[inline]
fn mix(mut x: u64) -> u64 {
    x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^ (x >> 31)
}

/// The flow of an inner packet: protocol and addresses, and the ports for
/// TCP, UDP, SCTP and UDP-Lite when the packet is not a fragment (so that
/// every fragment of a datagram, which only the first would carry ports
/// for, stays with its flow).
pub fn flow_hash<T: AsRef<[u8]>>(inner: &InnerPacket<T>) -> u32 {
    let (proto, addrs, ports): (u8, u64, u32) = match inner {
        InnerPacket::V4(p) => {
            let proto = p.protocol();
            let ports = if has_ports(proto) && !p.is_fragment() {
                p.payload()
                    .get(..4)
                    .map_or(0, |b| u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
            } else {
                0
            };
            let addrs = u64::from(u32::from(p.src())) << 32 | u64::from(u32::from(p.dst()));
            (proto.into(), addrs, ports)
        }
        InnerPacket::V6(p) => {
            let proto = p.next_header();
            let ports = if has_ports(proto) {
                p.payload()
                    .get(..4)
                    .map_or(0, |b| u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
            } else {
                0
            };
            let (s, d) = (u128::from(p.src()), u128::from(p.dst()));
            let addrs = mix(s as u64 ^ mix((s >> 64) as u64))
                ^ mix(d as u64 ^ mix((d >> 64) as u64)).rotate_left(17);
            (proto.into(), addrs, ports)
        }
    };
    let h = mix(mix(addrs) ^ (u64::from(ports) << 8 | u64::from(proto)));
    (h ^ (h >> 32)) as u32
}

/// The candidate that serves `flow`: the one with the highest weight for
/// it. `None` only when there are no candidates.
#[inline]
pub fn pick(flow: u32, candidates: impl IntoIterator<Item = u32>) -> Option<u32> {
    candidates
        .into_iter()
        .max_by_key(|&id| (weight(flow, id), id))
}

/// The weight of candidate `id` for `flow`.
#[inline]
pub fn weight(flow: u32, id: u32) -> u64 {
    mix(u64::from(flow) << 32 | u64::from(id))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ip::{Ipv4Repr, IPV4_HEADER_LEN};
    use proptest::prelude::*;
    use std::net::Ipv4Addr;

    fn udp(src: [u8; 4], sport: u16, dst: [u8; 4], dport: u16, ident: u16) -> Vec<u8> {
        let mut b = vec![0u8; IPV4_HEADER_LEN + 8];
        Ipv4Repr {
            src: Ipv4Addr::from(src),
            dst: Ipv4Addr::from(dst),
            protocol: IpProtocol::Udp,
            ttl: 64,
            dont_fragment: true,
            payload_len: 8,
        }
        .emit(&mut b)
        .unwrap();
        b[4..6].copy_from_slice(&ident.to_be_bytes());
        b[IPV4_HEADER_LEN..IPV4_HEADER_LEN + 2].copy_from_slice(&sport.to_be_bytes());
        b[IPV4_HEADER_LEN + 2..IPV4_HEADER_LEN + 4].copy_from_slice(&dport.to_be_bytes());
        b
    }

    fn hash(b: &[u8]) -> u32 {
        flow_hash(&InnerPacket::new_checked(b).unwrap())
    }

    #[test]
    fn a_flow_is_its_five_tuple_and_nothing_else() {
        let a = hash(&udp([10, 0, 0, 1], 5000, [10, 0, 0, 2], 5201, 1));
        // Another packet of the same flow (another IP id, so another
        // header checksum): same hash.
        assert_eq!(a, hash(&udp([10, 0, 0, 1], 5000, [10, 0, 0, 2], 5201, 999)));
        // Another source port: another flow (iperf3's parallel streams).
        assert_ne!(a, hash(&udp([10, 0, 0, 1], 5001, [10, 0, 0, 2], 5201, 1)));
        assert_ne!(a, hash(&udp([10, 0, 0, 3], 5000, [10, 0, 0, 2], 5201, 1)));
    }

    #[test]
    fn streams_spread_over_two_proxies() {
        let on_first = (0..400u16)
            .filter(|p| {
                let f = hash(&udp([198, 18, 1, 11], 40000 + p, [198, 18, 2, 11], 5201, 0));
                pick(f, [7, 8]) == Some(7)
            })
            .count();
        assert!((150..=250).contains(&on_first), "{on_first} of 400");
    }

    proptest! {
        /// Removing a candidate moves only the flows it served; adding one
        /// moves flows only to it.
        #[test]
        fn only_the_flows_of_a_leaving_candidate_move(
            flow in any::<u32>(),
            ids in proptest::collection::btree_set(1u32..64, 1..8),
            gone in 1u32..64,
        ) {
            let all: Vec<u32> = ids.iter().copied().collect();
            let before = pick(flow, all.iter().copied()).unwrap();
            let rest: Vec<u32> = all.iter().copied().filter(|i| *i != gone).collect();
            let after = pick(flow, rest.iter().copied());
            if before != gone {
                prop_assert_eq!(after, Some(before));
            } else {
                prop_assert!(after.is_none_or(|a| a != gone));
            }
            // Order of the candidates does not matter.
            let mut rev = all.clone();
            rev.reverse();
            prop_assert_eq!(pick(flow, rev), Some(before));
        }

        /// Any bytes a checked view accepts hash without panicking.
        #[test]
        fn any_checked_packet_hashes(bytes in proptest::collection::vec(any::<u8>(), 0..80)) {
            if let Ok(p) = InnerPacket::new_checked(&bytes[..]) {
                let _ = flow_hash(&p);
            }
        }
    }
}
