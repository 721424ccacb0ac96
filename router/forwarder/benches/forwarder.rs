//! Forwarder micro-benchmark: header parse + table lookup + rewrite per
//! packet, on the engine alone (no sockets), for each role a proxy plays.
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

fn report(what: &str, start: Instant) {
    let ns = start.elapsed().as_nanos() as f64 / ROUNDS as f64;
    println!(
        "{what:<44} {ns:>7.1} ns/packet  {:>6.2} Mpps/core",
        1e3 / ns
    );
}

fn main() {
    let n = 100;
    let (ingress, relay, egress) = (engine(1, n), engine(3, n), engine(2, n));
    let inner_len = IPV4_HEADER_LEN + 8 + 64;
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
        dont_fragment: true,
        payload_len: 72,
    }
    .emit(&mut buf[HEADROOM + IPV4_HEADER_LEN..])
    .unwrap();
    let template = buf.clone();
    let outer_len = IPV4_HEADER_LEN + inner_len;

    let t = ingress.table.load();
    let start = Instant::now();
    let mut wire = Vec::new();
    for _ in 0..ROUNDS {
        let d = ingress.from_agent_ipip(&t, black_box(&mut buf), HEADROOM, outer_len);
        debug_assert!(matches!(d.output, Output::Peer(_)));
        black_box(&d);
        if wire.is_empty() {
            wire = buf[d.range].to_vec();
        }
    }
    report("ingress (IP-in-IP in, PON header out)", start);

    // Transit: the same PON packet is advanced and reset each round.
    let mut tbuf = vec![0u8; BUFFER_LEN];
    tbuf[HEADROOM..HEADROOM + wire.len()].copy_from_slice(&wire);
    let t = relay.table.load();
    let from = peer(1);
    let start = Instant::now();
    for _ in 0..ROUNDS {
        tbuf[HEADROOM + 5] = 0; // hop index back to the relay
        tbuf[HEADROOM + 3] = 16; // hop limit
        let d = relay.from_peer(&t, black_box(&mut tbuf), HEADROOM, wire.len(), from);
        debug_assert!(matches!(d.output, Output::Peer(_)));
        black_box(&d);
    }
    report("transit (parse, check, advance hop)", start);

    let t = egress.table.load();
    let from = peer(3);
    let mut ebuf = vec![0u8; BUFFER_LEN];
    ebuf[HEADROOM..HEADROOM + wire.len()].copy_from_slice(&wire);
    ebuf[HEADROOM + 5] = 1;
    let egress_template = ebuf.clone();
    let start = Instant::now();
    for _ in 0..ROUNDS {
        ebuf[HEADROOM..HEADROOM + 24].copy_from_slice(&egress_template[HEADROOM..HEADROOM + 24]);
        let d = egress.from_peer(&t, black_box(&mut ebuf), HEADROOM, wire.len(), from);
        debug_assert!(matches!(d.output, Output::AgentIpip(_)));
        black_box(&d);
    }
    report("egress (strip PON, IP-in-IP header out)", start);

    let stranger = SocketAddr::from(([203, 0, 113, 9], 7300));
    let start = Instant::now();
    for _ in 0..ROUNDS {
        let d = egress.from_peer(&t, black_box(&mut ebuf), HEADROOM, wire.len(), stranger);
        black_box(&d);
    }
    report("drop (unknown peer)", start);
    let _ = template;
}
