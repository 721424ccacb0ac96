//! Forwarder micro-benchmark: header parse + table lookup + crypto +
//! rewrite per packet, on the engine alone (no sockets), for each role a
//! proxy plays, and the crypto's own share.
//! Prints nanoseconds per packet and the packets per second one core could
//! sustain on that work alone. Run: `cargo bench -p pon-forwarder --bench forwarder`.

use arc_swap::ArcSwap;
use pon_forwarder::engine::{BUFFER_LEN, HEADROOM};
use pon_forwarder::{Agent, Encap, Engine, ForwardingTable, Output};
use pon_proto::ip::{IpProtocol, Ipv4Repr, IPV4_HEADER_LEN};
use std::hint::black_box;
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::time::Instant;

const ROUNDS: usize = 5_000_000;

fn peer(id: u32) -> SocketAddr {
    SocketAddr::from(([198, 18, (id % 250) as u8, 1], 7300 + (id / 250) as u16))
}

/// Proxy `id` in an overlay of `n` proxies, each serving 20 app VMs as /32s.
fn engine(id: u32, n: u32) -> Engine {
    let peers: Vec<_> = (1..=n).filter(|p| *p != id).map(|p| (p, peer(p))).collect();
    let agents = [Agent {
        addr: Ipv4Addr::new(198, 18, id as u8, 11),
        encap: Encap::Ipip,
        key: None,
    }];
    let dests: Vec<_> = (1..=n)
        .filter(|p| *p != id)
        .flat_map(|p| {
            (11..31u8).map(move |h| (format!("198.18.{}.{h}/32", p % 250).parse().unwrap(), p))
        })
        .collect();
    let relays = vec![(2, vec![3])];
    let t = ForwardingTable::build(
        id,
        &peers,
        &agents,
        &dests,
        if id == 1 { &relays } else { &[] },
    )
    .unwrap();
    Engine::new(
        Arc::new(ArcSwap::from_pointee(t)),
        Ipv4Addr::new(198, 18, id as u8, 1),
        1500,
        16,
    )
}

/// Nanoseconds per call of `f` over `rounds` calls (its argument: the call's index).
fn per_packet(rounds: usize, mut f: impl FnMut(usize)) -> f64 {
    let start = Instant::now();
    for i in 0..rounds {
        f(i);
    }
    start.elapsed().as_nanos() as f64 / rounds as f64
}

fn report(what: &str, ns: f64) {
    println!(
        "{what:<52} {ns:>7.1} ns/packet  {:>6.2} Mpps/core",
        1e3 / ns
    );
}

/// An IP-in-IP packet of `payload` bytes of UDP payload from app 1 to app 2.
fn from_ta(payload: usize) -> (Vec<u8>, usize) {
    let inner_len = IPV4_HEADER_LEN + 8 + payload;
    let mut buf = vec![0u8; BUFFER_LEN];
    Ipv4Repr::ipip(
        Ipv4Addr::new(198, 18, 1, 11),
        Ipv4Addr::new(198, 18, 1, 1),
        inner_len,
    )
    .emit(&mut buf[HEADROOM..])
    .unwrap();
    Ipv4Repr {
        src: Ipv4Addr::new(198, 18, 1, 11),
        dst: Ipv4Addr::new(198, 18, 2, 11),
        protocol: IpProtocol::Udp,
        ttl: 64,
        dont_fragment: false,
        payload_len: 8 + payload,
    }
    .emit(&mut buf[HEADROOM + IPV4_HEADER_LEN..])
    .unwrap();
    (buf, IPV4_HEADER_LEN + inner_len)
}

fn main() {
    let n = 100;
    let ids: Vec<u32> = (1..=n).collect();
    let mesh = pon_tunnel::local_mesh(&ids);
    let (ingress, relay, egress) = (engine(1, n), engine(3, n), engine(2, n));
    for (e, id) in [(&ingress, 1), (&relay, 3), (&egress, 2)] {
        e.sessions.store(mesh[&id].clone());
    }
    // Packets are sealed once per round by the ingress (timed), kept, and
    // then handed to the relay and the egress (timed): every packet has a
    // fresh counter, as on the wire, so the replay windows accept them.
    const BATCH: usize = 4096;
    for payload in [64usize, 1400] {
        println!("-- inner UDP payload {payload} bytes (relayed route 1 -> 3 -> 2, 100 proxies)");
        let (template, outer_len) = from_ta(payload);
        let mut wires: Vec<Vec<u8>> = vec![vec![0u8; BUFFER_LEN]; BATCH];
        let mut lens = vec![0usize; BATCH];
        let (mut t_in, mut t_tr, mut t_eg) = (0.0, 0.0, 0.0);
        let batches = ROUNDS / BATCH / if payload > 500 { 8 } else { 1 };
        let (tab_i, ses_i) = (ingress.table.load(), ingress.sessions.load());
        let (tab_r, ses_r) = (relay.table.load(), relay.sessions.load());
        let (tab_e, ses_e) = (egress.table.load(), egress.sessions.load());
        for _ in 0..batches {
            t_in += per_packet(BATCH, |i| {
                let w = &mut wires[i];
                w[HEADROOM..HEADROOM + outer_len]
                    .copy_from_slice(&template[HEADROOM..HEADROOM + outer_len]);
                let d = ingress.from_agent_ipip(&tab_i, &ses_i, black_box(w), HEADROOM, outer_len);
                debug_assert!(matches!(d.output, Output::Peer(_)));
                lens[i] = d.range.len();
                w.copy_within(d.range, HEADROOM);
            });
            t_tr += per_packet(BATCH, |i| {
                let d = relay.from_peer(
                    &tab_r,
                    &ses_r,
                    black_box(&mut wires[i]),
                    HEADROOM,
                    lens[i],
                    peer(1),
                );
                debug_assert!(matches!(d.output, Output::Peer(_)));
                black_box(&d);
            });
            t_eg += per_packet(BATCH, |i| {
                let d = egress.from_peer(
                    &tab_e,
                    &ses_e,
                    black_box(&mut wires[i]),
                    HEADROOM,
                    lens[i],
                    peer(3),
                );
                debug_assert!(matches!(d.output, Output::AgentIpip(_)));
                black_box(&d);
            });
        }
        let b = batches as f64;
        report("ingress (IP-in-IP in; seal, link tag, PON out)", t_in / b);
        report("transit (check link tag, advance, new link tag)", t_tr / b);
        report("egress (check link tag, open seal, IP-in-IP out)", t_eg / b);

        // The crypto alone, on the same sizes: what a seal or a tag costs.
        let s = mesh[&1].sender(2).unwrap();
        let mut data = vec![0u8; IPV4_HEADER_LEN + 8 + payload];
        let ns = per_packet(ROUNDS / 8, |_| {
            let c = s.next_counter().unwrap();
            black_box(s.seal(c, b"header fields", black_box(&mut data)));
        });
        report("  of which: AES-256-GCM seal of the inner packet", ns);
        let ns = per_packet(ROUNDS / 8, |_| {
            let c = s.next_counter().unwrap();
            black_box(s.tag(c, black_box(&data)));
        });
        report(
            "  of which: link tag over the datagram (AES-GCM of a copy)",
            ns,
        );
    }

    let t = egress.table.load();
    let ses = egress.sessions.load();
    let (mut buf, len) = from_ta(64);
    let stranger = SocketAddr::from(([203, 0, 113, 9], 7300));
    let ns = per_packet(ROUNDS, |_| {
        let d = egress.from_peer(&t, &ses, black_box(&mut buf), HEADROOM, len, stranger);
        black_box(&d);
    });
    report("drop (not a PON datagram, from any address)", ns);
    // A datagram from a peer's address with a forged link tag: the cost
    // of refusing an attacker's packet.
    let (tab_i, ses_i) = (ingress.table.load(), ingress.sessions.load());
    let d = ingress.from_agent_ipip(&tab_i, &ses_i, &mut buf, HEADROOM, len);
    let mut forged = buf[d.range].to_vec();
    let n = forged.len();
    forged[n - 1] ^= 1;
    let mut fbuf = vec![0u8; BUFFER_LEN];
    let tab_r = relay.table.load();
    let ses_r = relay.sessions.load();
    let ns = per_packet(ROUNDS / 8, |_| {
        fbuf[HEADROOM..HEADROOM + n].copy_from_slice(&forged);
        let d = relay.from_peer(&tab_r, &ses_r, black_box(&mut fbuf), HEADROOM, n, peer(1));
        black_box(&d);
    });
    report("drop (forged link tag, 64-byte payload)", ns);
}
