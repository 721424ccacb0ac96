//! Golden byte vectors: one literal per wire format, so that any change to
//! what goes on the wire shows up as a change to this file (and is decided
//! on purpose, with peers' compatibility in mind), and every vector also
//! parses back to what produced it.

use pon_proto::control::{self, AgentMsg, Endpoints, FrameDecoder, Register};
use pon_proto::ip::{self, Icmpv4Packet, IpProtocol, IpipPacket, Ipv4Packet, Ipv4Repr};
use pon_proto::local::{LocalMsg, PmonPart};
use pon_proto::measurement::{ProbeOutcome, ProbeTag, TrafficSample};
use pon_proto::pmon::{DestinationReport, Figures};
use pon_proto::pon::Hops;
use pon_proto::steering::Steering;
use pon_proto::{pon, probe, report, Encap};
use std::net::Ipv4Addr;
use std::time::Duration;

const APP_A: Ipv4Addr = Ipv4Addr::new(198, 18, 1, 11);
const APP_B: Ipv4Addr = Ipv4Addr::new(198, 18, 2, 11);
const PROXY_A: Ipv4Addr = Ipv4Addr::new(198, 18, 1, 1);

#[track_caller]
fn golden(what: &str, got: &[u8], want: &[u8]) {
    assert!(
        got == want,
        "{what}: wire format changed\n got: {got:02x?}\nwant: {want:02x?}"
    );
}

fn pon_header(kind: pon::Kind, hops: &[u32]) -> Vec<u8> {
    let r = pon::Repr {
        kind,
        hop_limit: 16,
        hop_index: 0,
        flow_id: 0x0102_0304,
        source: 1,
        hops: pon::Hops::new(hops).unwrap(),
    };
    let mut v = vec![0xee; r.header_len()];
    r.emit(&mut v).unwrap();
    v
}

#[test]
fn pon_header_per_kind() {
    #[rustfmt::skip]
    let data = [
        2, 1, 0, 16, 1, 0, 0, 0, // version 2, kind Data, flags, hop limit, count, index, reserved
        1, 2, 3, 4, 0, 0, 0, 1, // flow id, source
        0, 0, 0, 2, // hops
        0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, // seal index and counter (the crypto step's)
    ];
    golden(
        "PON data header, direct",
        &pon_header(pon::Kind::Data, &[2]),
        &data,
    );
    #[rustfmt::skip]
    let relayed = [
        2, 2, 0, 16, 2, 0, 0, 0, // kind Probe, two hops
        1, 2, 3, 4, 0, 0, 0, 1,
        0, 0, 0, 3, 0, 0, 0, 2,
        0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, // seal fields
        0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, // link fields: relayed routes only
    ];
    golden(
        "PON probe header, relayed",
        &pon_header(pon::Kind::Probe, &[3, 2]),
        &relayed,
    );
    for (kind, byte) in [
        (pon::Kind::ProbeReply, 3),
        (pon::Kind::HandshakeInit, 4),
        (pon::Kind::HandshakeResponse, 5),
        (pon::Kind::Keepalive, 6),
        (pon::Kind::Report, 7),
    ] {
        let mut want = data.to_vec();
        want[1] = byte;
        golden("PON header kind", &pon_header(kind, &[2]), &want);
    }
    // Trailers: a seal tag unless a handshake, a link tag when relayed.
    for (kind, hops, trailer) in [
        (pon::Kind::Data, 1, 16),
        (pon::Kind::Data, 2, 32),
        (pon::Kind::HandshakeInit, 1, 0),
        (pon::Kind::HandshakeResponse, 3, 16),
    ] {
        assert_eq!(
            pon::trailer_len(kind, hops),
            trailer,
            "{kind:?} over {hops} hops"
        );
    }
    let mut v = relayed.to_vec();
    v.extend([0; 32]);
    let p = pon::Packet::new_checked(&v[..]).unwrap();
    assert_eq!(p.kind(), pon::Kind::Probe);
    assert_eq!(p.hops().as_slice(), &[3, 2]);
    let mut unknown = data.to_vec();
    unknown[1] = 8;
    unknown.extend([0; 16]);
    assert_eq!(
        pon::Packet::new_checked(&unknown[..]).unwrap_err(),
        pon_proto::Error::UnknownKind(8)
    );
}

#[test]
fn handshake_bodies() {
    let init = pon_proto::handshake::init(0x0a0b_0c0d);
    assert_eq!(&init[..4], &[0x0a, 0x0b, 0x0c, 0x0d]);
    assert_eq!(
        init.len(),
        4 + 32 + 8 + 16,
        "index, ephemeral key, timestamp, tag"
    );
    let r = pon_proto::handshake::response(1, 2);
    assert_eq!(&r[..8], &[0, 0, 0, 1, 0, 0, 0, 2]);
    assert_eq!(
        r.len(),
        8 + 32 + 4 + 16,
        "indices, ephemeral key, the responder's index sealed in the payload, tag"
    );
}

#[test]
fn probe_and_probe_reply_bodies() {
    let r = probe::Repr {
        session: 9,
        sequence: 0x1234,
        sent_ns: 0x0102_0304_0506_0708,
        train_index: 1,
        train_len: 4,
        reply_rx_ns: 0,
    };
    let mut v = [0xee; probe::BODY_LEN + 4];
    r.emit(&mut v).unwrap();
    #[rustfmt::skip]
    let want = [
        0, 0, 0, 9, 0, 0, 0x12, 0x34, // session, sequence
        1, 2, 3, 4, 5, 6, 7, 8, // sender timestamp
        0, 1, 0, 4, 0, 0, 0, 0, // train index, train length, responder time...
        0, 0, 0, 0, 0, 0, 0, 0, // ...responder time, reserved
        0, 0, 0, 0, // padding, zeroed
    ];
    golden("probe body", &v, &want);
    let mut p = probe::Packet::new_checked(&mut v[..]).unwrap();
    p.set_reply_rx_ns(0x1122_3344_5566_7788);
    let mut reply = want;
    reply[20..28].copy_from_slice(&[0x11, 0x22, 0x33, 0x44, 0x55, 0x66, 0x77, 0x88]);
    golden("probe reply body", &v, &reply);
}

#[test]
fn report_body() {
    let r = report::Repr {
        window_ms: 200,
        received: 0x0102_0304_0506_0708,
        highest_counter: 0x1112_1314_1516_1718,
    };
    let mut v = [0xee; report::BODY_LEN];
    r.emit(&mut v).unwrap();
    #[rustfmt::skip]
    let want = [
        1, 0, 0, 0, 0, 0, 0, 200, // version 1, reserved, window (ms)
        1, 2, 3, 4, 5, 6, 7, 8, // data packets received
        0x11, 0x12, 0x13, 0x14, 0x15, 0x16, 0x17, 0x18, // highest seal counter
    ];
    golden("report body", &v, &want);
    assert_eq!(
        report::Repr::parse(&report::Packet::new_checked(&v[..]).unwrap()),
        r
    );
}

fn ipv4(src: Ipv4Addr, dst: Ipv4Addr, protocol: IpProtocol, df: bool, payload: &[u8]) -> Vec<u8> {
    let mut v = vec![0u8; ip::IPV4_HEADER_LEN + payload.len()];
    Ipv4Repr {
        src,
        dst,
        protocol,
        ttl: 64,
        dont_fragment: df,
        payload_len: payload.len(),
    }
    .emit(&mut v)
    .unwrap();
    v[ip::IPV4_HEADER_LEN..].copy_from_slice(payload);
    v
}

#[rustfmt::skip]
const INNER: [u8; 28] = [
    0x45, 0, 0, 28, 0, 0, 0x40, 0, // version/IHL, DSCP, total length, ident, DF
    64, 17, CK_INNER[0], CK_INNER[1], // TTL, UDP, checksum
    198, 18, 1, 11, 198, 18, 2, 11, // source, destination
    0x30, 0x39, 0x00, 0x35, 0, 8, 0, 0, // UDP header (payload, opaque here)
];
const CK_INNER: [u8; 2] = [0xab, 0x96];

#[test]
fn ipv4_and_ip_in_ip() {
    let inner = ipv4(APP_A, APP_B, IpProtocol::Udp, true, &INNER[20..]);
    golden("inner IPv4", &inner, &INNER);
    let outer = ipv4(APP_A, PROXY_A, IpProtocol::Ipip, false, &inner);
    #[rustfmt::skip]
    let want_head = [
        0x45, 0, 0, 48, 0, 0, 0, 0,
        64, 4, 0xec, 0x99,
        198, 18, 1, 11, 198, 18, 1, 1,
    ];
    golden("IP-in-IP outer header", &outer[..20], &want_head);
    let p = IpipPacket::new_checked(&outer[..]).unwrap();
    assert_eq!(p.inner().as_bytes(), &INNER[..]);
}

#[test]
fn icmp_frag_needed() {
    let orig = Ipv4Packet::new_checked(&INNER[..]).unwrap();
    let mut out = [0u8; ip::FRAG_NEEDED_MAX_LEN];
    let n = ip::emit_frag_needed(&orig, 1400, PROXY_A, &mut out).unwrap();
    #[rustfmt::skip]
    let want_head = [
        0x45, 0, 0, 56, 0, 0, 0, 0, 64, 1, 0xec, 0x94, // IPv4, protocol ICMP
        198, 18, 1, 1, 198, 18, 1, 11, // from the proxy to the sender
        3, 4, 0xc7, 0x0d, 0, 0, 0x05, 0x78, // type 3 code 4, checksum, unused, MTU 1400
    ];
    golden("ICMP frag needed", &out[..28], &want_head);
    golden("ICMP frag needed quote", &out[28..n], &INNER);
    let icmp = Icmpv4Packet::new_checked(&out[20..n]).unwrap();
    assert!(icmp.verify_checksum());
}

#[test]
fn steering_message() {
    let m = Steering {
        version: 2,
        epoch: 7,
        seq: 300,
        part: 1,
        parts: 3,
        bypass: vec![(APP_B, 32), (Ipv4Addr::new(10, 0, 0, 0), 8)],
    };
    // version, epoch, seq (varint), part 1 of 3, 2 prefixes: (address, length)
    let want = [2, 7, 0xac, 2, 1, 3, 2, 198, 18, 2, 11, 32, 10, 0, 0, 0, 8];
    golden("steering", &m.encode().unwrap(), &want);
    assert_eq!(Steering::decode(&want).unwrap(), m);
}

#[test]
fn local_messages() {
    let h = |ids: &[u32]| Hops::new(ids).unwrap();
    let cases: [(LocalMsg, &[u8]); 12] = [
        (LocalMsg::Arrived(vec![1, 2, 3]), &[0, 3, 1, 2, 3]),
        (
            LocalMsg::Send {
                hop: 3,
                packet: vec![9],
            },
            &[1, 3, 1, 9],
        ),
        (
            LocalMsg::Topology {
                id: 1,
                peers: vec![2, 3],
                optimise: vec![2],
                from_cu: true,
            },
            &[2, 1, 2, 2, 3, 1, 2, 1],
        ),
        (
            LocalMsg::Routes {
                relays: vec![(2, vec![3])],
                unreachable: vec![4],
            },
            &[3, 1, 2, 1, 3, 1, 4],
        ),
        (
            // tag: dst 2, Learning (0) index 7; path: 2 hops
            LocalMsg::Probe {
                tag: ProbeTag::learning(2, 7),
                path: h(&[3, 2]),
            },
            &[4, 2, 0, 7, 2, 3, 2],
        ),
        (
            // tag: dst 2, Bandwidth (2) index 1
            LocalMsg::Bandwidth {
                tag: ProbeTag::bandwidth(2, 1),
                path: h(&[2]),
            },
            &[5, 2, 2, 1, 1, 2],
        ),
        (
            // tag: dst 2, Keepalive (1)
            LocalMsg::Rate {
                tag: ProbeTag::keepalive(2),
                path: h(&[2]),
                every_ms: 50,
            },
            &[6, 2, 1, 1, 2, 50],
        ),
        (
            // Reply (0) { rtt: 0 s, 61 000 000 ns as a varint }
            LocalMsg::Result {
                tag: ProbeTag::keepalive(2),
                path: h(&[2]),
                outcome: ProbeOutcome::Reply {
                    rtt: Duration::from_millis(61),
                },
            },
            &[7, 2, 1, 1, 2, 0, 0, 0xc0, 0x92, 0x8b, 0x1d],
        ),
        (
            LocalMsg::Result {
                tag: ProbeTag::keepalive(2),
                path: h(&[2]),
                outcome: ProbeOutcome::Lost,
            },
            &[7, 2, 1, 1, 2, 1],
        ),
        (
            // 16 packets, Some(93.5) as a little-endian f64
            LocalMsg::BandwidthResult {
                tag: ProbeTag::bandwidth(2, 0),
                path: h(&[2]),
                packets: 16,
                mbps: Some(93.5),
            },
            &[8, 2, 2, 0, 1, 2, 16, 1, 0, 0, 0, 0, 0, 0x60, 0x57, 0x40],
        ),
        (
            // one sample: peer 2, 300 sent (varint 0xac 0x02), 299 confirmed
            LocalMsg::Traffic(vec![TrafficSample {
                peer: 2,
                sent: 300,
                confirmed: 299,
            }]),
            &[9, 1, 2, 0xac, 0x02, 0xab, 0x02],
        ),
        (
            // round 7, part 0 of 1, one destination: dst 2, reachable,
            // route [2], rtt Some(61 000 µs: varint 0xc8 0xdc 0x03), no
            // percentiles or jitter, loss Some(0)
            LocalMsg::Pmon(PmonPart {
                round: 7,
                index: 0,
                of: 1,
                destinations: vec![DestinationReport {
                    dst: 2,
                    reachable: true,
                    route: vec![2],
                    figures: Figures {
                        rtt_us: Some(61_000),
                        loss_ppm: Some(0),
                        ..Figures::default()
                    },
                }],
            }),
            &[
                10, 7, 0, 1, 1, 2, 1, 1, 2, 1, 0xc8, 0xdc, 0x03, 0, 0, 0, 0, 1, 0,
            ],
        ),
    ];
    for (m, want) in cases {
        golden(&format!("{m:?}"), &m.encode().unwrap(), want);
        assert_eq!(LocalMsg::decode(want).unwrap(), m);
    }
}

#[test]
fn control_framing() {
    golden(
        "heartbeat frame",
        &control::encode(&AgentMsg::Heartbeat),
        &[0, 0, 0, 1, 1], // length 1, variant Heartbeat
    );
    let reg = AgentMsg::Register(Register {
        version: 2,
        cloud: "p".into(),
        role: "APP".into(),
        name: "a".into(),
        endpoints: Endpoints::App {
            addr: APP_A,
            encap: Encap::Udp { ra_port: 7302 },
        },
        id_hint: Some(5),
        noise_key: control::PublicKey([0xab; 32]),
    });
    let mut want = vec![
        0, 0, 0, 52, // length
        0, 2, 1, b'p', 3, b'A', b'P', b'P', 1, b'a', // Register, version, strings
        1, 198, 18, 1, 11, 1, 0x86, 0x39, // Endpoints::App, address, Encap::Udp, RA port 7302
        1, 5, // id hint Some(5)
    ];
    want.extend([0xab; 32]); // the Noise key's 32 bytes, no length prefix
    golden("register frame", &control::encode(&reg), &want);
    let mut d = FrameDecoder::new(control::MAX_AGENT_FRAME);
    d.push(&want).unwrap();
    assert_eq!(d.next_msg::<AgentMsg>().unwrap(), Some(reg));
}
