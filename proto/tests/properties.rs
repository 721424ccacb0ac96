//! Property tests: every parser survives arbitrary bytes, and emit/parse
//! round-trips for every representable header.

use pon_proto::ip::{self, InnerPacket, Ipv4Packet, Ipv4Repr};
use pon_proto::{pon, probe};
use proptest::prelude::*;
use std::net::Ipv4Addr;

fn hops() -> impl Strategy<Value = pon::Hops> {
    prop::collection::vec(any::<u32>(), 1..=pon::MAX_HOPS).prop_map(|v| pon::Hops::new(&v).unwrap())
}

fn kind() -> impl Strategy<Value = pon::Kind> {
    prop_oneof![
        Just(pon::Kind::Data),
        Just(pon::Kind::Probe),
        Just(pon::Kind::ProbeReply)
    ]
}

fn ipv4_packet() -> impl Strategy<Value = Vec<u8>> {
    (
        any::<[u8; 4]>(),
        any::<[u8; 4]>(),
        any::<u8>(),
        any::<bool>(),
        prop::collection::vec(any::<u8>(), 0..64),
    )
        .prop_map(|(s, d, proto, df, payload)| {
            let mut v = vec![0u8; ip::IPV4_HEADER_LEN + payload.len()];
            Ipv4Repr {
                src: Ipv4Addr::from(s),
                dst: Ipv4Addr::from(d),
                protocol: proto,
                ttl: 64,
                dont_fragment: df,
                payload_len: payload.len(),
            }
            .emit(&mut v)
            .unwrap();
            v[ip::IPV4_HEADER_LEN..].copy_from_slice(&payload);
            v
        })
}

proptest! {
    #[test]
    fn pon_parse_never_panics(bytes in prop::collection::vec(any::<u8>(), 0..200)) {
        if let Ok(p) = pon::Packet::new_checked(&bytes[..]) {
            let r = pon::Repr::parse(&p).unwrap();
            prop_assert!(r.header_len() <= bytes.len());
            let _ = (p.current_hop(), p.next_hop(), p.payload(), p.auth_tag());
        }
    }

    #[test]
    fn pon_round_trip(kind in kind(), auth in any::<bool>(), hop_limit in any::<u8>(),
                      hops in hops(), idx in any::<u8>(), flow in any::<u32>(), source in any::<u32>(),
                      inner in ipv4_packet()) {
        let repr = pon::Repr {
            kind, auth, hop_limit,
            hop_index: idx % hops.len() as u8,
            flow_id: flow, source, hops,
        };
        let mut buf = vec![0u8; repr.header_len() + inner.len()];
        repr.emit(&mut buf).unwrap();
        buf[repr.header_len()..].copy_from_slice(&inner);
        let p = pon::Packet::new_checked(&buf[..]).unwrap();
        prop_assert_eq!(pon::Repr::parse(&p).unwrap(), repr);
        prop_assert_eq!(p.payload(), &inner[..]);
    }

    #[test]
    fn ip_parsers_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..120)) {
        if let Ok(p) = Ipv4Packet::new_checked(&bytes[..]) {
            let _ = (p.payload(), p.src(), p.dst(), Ipv4Repr::parse(&p), ip::icmp_error_allowed(&p));
        }
        if let Ok(p) = InnerPacket::new_checked(&bytes[..]) {
            let _ = (p.src(), p.dst(), p.dont_fragment());
        }
        let _ = ip::parse_ipip(&bytes);
        if let Ok(p) = probe::Packet::new_checked(&bytes[..]) {
            let _ = probe::Repr::parse(&p).unwrap();
        }
    }

    #[test]
    fn ipv4_round_trip(v in ipv4_packet()) {
        let p = Ipv4Packet::new_checked(&v[..]).unwrap();
        prop_assert!(p.verify_checksum());
        let r = Ipv4Repr::parse(&p).unwrap();
        let mut again = vec![0u8; v.len()];
        r.emit(&mut again).unwrap();
        prop_assert_eq!(&again[..ip::IPV4_HEADER_LEN], &v[..ip::IPV4_HEADER_LEN]);
    }

    #[test]
    fn frag_needed_is_valid_icmp(v in ipv4_packet(), mtu in 68u16..9000) {
        let p = Ipv4Packet::new_checked(&v[..]).unwrap();
        let mut out = [0u8; ip::FRAG_NEEDED_MAX_LEN];
        let n = ip::emit_frag_needed(&p, mtu, Ipv4Addr::new(198, 18, 0, 1), &mut out).unwrap();
        let icmp = Ipv4Packet::new_checked(&out[..n]).unwrap();
        prop_assert!(icmp.verify_checksum());
        prop_assert_eq!(ip::checksum(icmp.payload()), 0);
    }

    #[test]
    fn probe_round_trip(session in any::<u32>(), seq in any::<u32>(), sent in any::<u64>(),
                        len in 1u16.., idx in any::<u16>(), rx in any::<u64>(), pad in 0usize..64) {
        let r = probe::Repr { session, sequence: seq, sent_ns: sent, train_index: idx % len, train_len: len, reply_rx_ns: rx };
        let mut buf = vec![0u8; probe::BODY_LEN + pad];
        r.emit(&mut buf).unwrap();
        prop_assert_eq!(probe::Repr::parse(&probe::Packet::new_checked(&buf[..]).unwrap()).unwrap(), r);
    }
}
