//! Feeds arbitrary bytes to every PON parser, and checks that whatever parses
//! also re-emits to the same header bytes.
#![no_main]

use libfuzzer_sys::fuzz_target;
use pon_proto::ip::{self, Icmpv4Packet, InnerPacket, IpipPacket, Ipv4Packet};
use pon_proto::{pon, probe, report};

fuzz_target!(|data: &[u8]| {
    if let Ok(p) = pon::Packet::new_checked(data) {
        let repr = pon::Repr::parse(&p).expect("checked packets parse");
        let _ = (p.current_hop(), p.next_hop(), p.link_tagged(), p.payload(), p.seal_counter());
        let mut out = vec![0u8; repr.header_len()];
        repr.emit(&mut out).expect("parsed headers emit");
        // Reserved bytes and unknown flags are not carried over; the rest must match.
        assert_eq!(&out[..2], &data[..2]);
        assert_eq!(&out[3..6], &data[3..6]);
        assert_eq!(&out[8..16 + 4 * p.hop_count()], &data[8..16 + 4 * p.hop_count()]);
        let mut copy = data.to_vec();
        let mut m = pon::Packet::new_checked(&mut copy[..]).unwrap();
        let _ = m.advance();
    }
    if let Ok(p) = pon_proto::lan::Packet::new_checked(data) {
        let repr = pon_proto::lan::Repr::parse(&p);
        let range = p.payload_range();
        assert!(range.start <= range.end && range.end <= data.len());
        let mut out = [0u8; pon_proto::lan::HEADER_LEN];
        repr.emit(&mut out).expect("parsed headers emit");
        assert_eq!(&out[4..], &data[4..pon_proto::lan::HEADER_LEN]);
    }
    if let Ok(i) = pon_proto::handshake::Init::new_checked(data) {
        let _ = (i.sender_index(), i.noise());
    }
    if let Ok(r) = pon_proto::handshake::Response::new_checked(data) {
        let _ = (r.sender_index(), r.receiver_index(), r.noise());
    }
    if let Ok(p) = Ipv4Packet::new_checked(data) {
        let _ = (p.payload(), ip::icmp_error_allowed(&p));
        let mut out = [0u8; ip::FRAG_NEEDED_MAX_LEN];
        let n = ip::emit_frag_needed(&p, 1400, std::net::Ipv4Addr::LOCALHOST, &mut out).unwrap();
        assert!(Ipv4Packet::new_checked(&out[..n]).unwrap().verify_checksum());
    }
    if let Ok(p) = InnerPacket::new_checked(data) {
        let _ = (p.src(), p.dst(), p.dont_fragment(), p.flow_key());
    }
    if let Ok(p) = IpipPacket::new_checked(data) {
        // The inner view comes from the outer parse, unchecked: it must hold.
        let inner = p.inner();
        let _ = (inner.src(), inner.dst(), inner.flow_key());
        assert!(InnerPacket::new_checked(inner.as_bytes()).is_ok());
    }
    if let Ok(p) = Icmpv4Packet::new_checked(data) {
        let _ = (p.msg_type(), p.msg_code(), p.next_hop_mtu(), p.data(), p.verify_checksum());
    }
    if let Ok(p) = probe::Packet::new_checked(data) {
        let _ = probe::Repr::parse(&p);
    }
    if let Ok(p) = report::Packet::new_checked(data) {
        let mut out = [0u8; report::BODY_LEN];
        report::Repr::parse(&p).emit(&mut out).expect("parsed reports emit");
        assert_eq!(&out[4..], &data[4..]);
    }
});
