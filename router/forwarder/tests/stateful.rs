//! The forwarder engine driven by arbitrary sequences of packets: from
//! peers (arbitrary bytes, packets sealed with the real sessions or with
//! an outsider's, mutated, replayed, relayed) and from agents (over both
//! agent legs). Properties: no panic; every call ends in exactly one stage
//! or drop counter; an agent, or the proxy core for a sealed kind, gets
//! only what the test sealed itself (or handed to an ingress as an agent),
//! once per time it was sealed; a relay forwards only datagrams an
//! authenticated neighbour sent; the per-peer data counters the traffic
//! reports are made of count exactly the data an ingress sealed and the
//! authenticated data an egress took (never a forgery, a replay, a
//! probe or a report).
//!
//! One harness, two drivers: the property test below (CI) and the fuzz
//! target `engine` in `fuzz/` (which includes this file).

use arbitrary::{Result, Unstructured};
use arc_swap::ArcSwap;
use pon_forwarder::engine::{seal, BUFFER_LEN, HEADROOM};
use pon_forwarder::{Agent, Encap, Engine, ForwardingTable, Output};
use pon_proto::ip::{IpProtocol, Ipv4Repr, IPV4_HEADER_LEN};
use pon_proto::pon::{self, Hops, Kind};
use pon_tunnel::SessionTable;
use std::collections::HashMap;
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::sync::atomic::Ordering;
use std::sync::{Arc, OnceLock};

type Mesh = HashMap<u32, Arc<SessionTable>>;

/// Proxies 1, 2 and 3 with real sessions; a fourth id no one peers with.
const PROXIES: [u32; 3] = [1, 2, 3];

/// The sessions of the overlay, and an outsider's: the same ids, other keys.
fn meshes() -> &'static (Mesh, Mesh) {
    static M: OnceLock<(Mesh, Mesh)> = OnceLock::new();
    M.get_or_init(|| {
        let m = |ids: &[u32]| pon_tunnel::local_mesh(ids).into_iter().collect();
        (m(&[1, 2, 3]), m(&[1, 2, 3]))
    })
}

fn proxy_addr(id: u32) -> SocketAddr {
    SocketAddr::from(([198, 18, id as u8, 1], 7300))
}

fn app(id: u32) -> Ipv4Addr {
    Ipv4Addr::new(198, 18, id as u8, 11)
}

/// Proxy `id`; 1 reaches 2 through 3; 3's agent speaks UDP; 1 has a monitor.
fn engine(id: u32) -> Engine {
    let peers: Vec<_> = PROXIES
        .iter()
        .filter(|p| **p != id)
        .map(|p| (*p, proxy_addr(*p)))
        .collect();
    let encap = if id == 3 {
        Encap::Udp { ra_port: 7302 }
    } else {
        Encap::Ipip
    };
    // No site-LAN key: the UDP agent's legs are refused (`agent_no_key`);
    // the site-LAN seal has its own tests (pon-tunnel's lan, alloc_free).
    let agents = [Agent {
        addr: app(id),
        encap,
        key: None,
    }];
    let dests: Vec<_> = PROXIES
        .iter()
        .filter(|p| **p != id)
        .map(|p| (format!("198.18.{p}.0/24").parse().unwrap(), *p))
        .collect();
    let relays = if id == 1 { vec![(2, vec![3])] } else { vec![] };
    let mut t = ForwardingTable::build(id, &peers, &agents, &dests, &relays).unwrap();
    for p in PROXIES.iter().filter(|p| **p != id) {
        t.set_traffic(*p, Arc::default());
    }
    let e = Engine::new(
        Arc::new(ArcSwap::from_pointee(t)),
        Ipv4Addr::new(198, 18, id as u8, 1),
        1500,
        pon::DEFAULT_HOP_LIMIT,
    );
    let e = if id == 1 { e.with_monitor() } else { e };
    e.sessions.store(meshes().0[&id].clone());
    e
}

/// Data packets `e` sealed as an ingress and took as an egress, over its
/// peers (what its traffic reports are made of).
fn traffic(e: &Engine) -> (u64, u64) {
    let t = e.table.load();
    PROXIES
        .iter()
        .filter_map(|p| t.traffic(*p))
        .fold((0, 0), |(s, r), c| {
            (
                s + c.sent.load(Ordering::Relaxed),
                r + c.received.load(Ordering::Relaxed),
            )
        })
}

/// Sum of the stage and drop counters: each call must add exactly one.
fn outcomes(e: &Engine) -> u64 {
    let c = &e.counters.engine;
    [
        &c.ingress,
        &c.transit,
        &c.egress,
        &c.local,
        &c.frag_needed,
        &c.probes_local,
        &c.handshakes_local,
        &c.keepalives,
        &c.drop_unknown_agent,
        &c.drop_spoofed_source,
        &c.drop_not_for_me,
        &c.drop_no_monitor,
        &c.drop_hop_limit,
        &c.drop_hop_limit_above_max,
        &c.drop_repeated_hop,
        &c.drop_no_destination,
        &c.drop_no_route,
        &c.drop_unknown_next_hop,
        &c.drop_too_big,
        &c.drop_no_session,
        &c.drop_unknown_session,
        &c.drop_wrong_peer,
        &c.drop_bad_tag,
        &c.drop_replayed,
        &c.drop_foreign_source,
        &c.drop_no_room,
        &c.drop_agent_unsealed,
        &c.drop_agent_bad_tag,
        &c.drop_agent_replayed,
        &c.drop_agent_stale_epoch,
        &c.drop_agent_no_key,
    ]
    .iter()
    .map(|c| c.get())
    .sum::<u64>()
        + e.counters.parse.total()
}

/// What the test made: how many times each payload or datagram was sealed
/// (or handed to an ingress by an agent); each may come out as often.
#[derive(Default)]
struct Ledger(HashMap<Vec<u8>, usize>);

impl Ledger {
    fn add(&mut self, b: &[u8]) {
        *self.0.entry(b.to_vec()).or_default() += 1;
    }
    /// Spends one; false if none is left (not ours, or replayed).
    fn spend(&mut self, b: &[u8]) -> bool {
        match self.0.get_mut(b) {
            Some(n) if *n > 0 => {
                *n -= 1;
                true
            }
            _ => false,
        }
    }
}

struct World {
    engines: Vec<Engine>,
    buf: Vec<u8>,
    /// Datagrams on the wire, with the proxy that sent each.
    pool: Vec<(Vec<u8>, u32)>,
    /// Inner packets and probe bodies sealed for an egress.
    payloads: Ledger,
    /// Datagrams authenticated for a leg (by the test or an engine).
    datagrams: Ledger,
}

fn inner_packet(u: &mut Unstructured, src: Ipv4Addr, dst: Ipv4Addr) -> Result<Vec<u8>> {
    let payload = match u.int_in_range(0..=9u8)? {
        0 => u.int_in_range(1400..=1500usize)?,
        1 => u.int_in_range(60000..=65535 - IPV4_HEADER_LEN)?,
        _ => u.int_in_range(0..=64usize)?,
    };
    let mut v = vec![0u8; IPV4_HEADER_LEN + payload];
    Ipv4Repr {
        src,
        dst,
        protocol: IpProtocol::Udp,
        ttl: 64,
        dont_fragment: u.arbitrary()?,
        payload_len: payload,
    }
    .emit(&mut v)
    .unwrap();
    let fill: u8 = u.arbitrary()?;
    v[IPV4_HEADER_LEN..].fill(fill);
    Ok(v)
}

fn id(u: &mut Unstructured) -> Result<u32> {
    u.int_in_range(0..=4)
}

fn route(u: &mut Unstructured, source: u32) -> Result<Vec<u32>> {
    let others: Vec<u32> = PROXIES.iter().copied().filter(|p| *p != source).collect();
    Ok(match u.int_in_range(0..=3u8)? {
        0 => vec![others[0]],
        1 => vec![others[1]],
        2 => vec![others[0], others[1]],
        _ => {
            let n = u.int_in_range(1..=4usize)?;
            (0..n).map(|_| id(u)).collect::<Result<_>>()?
        }
    })
}

impl World {
    fn new() -> Self {
        World {
            engines: PROXIES.iter().map(|id| engine(*id)).collect(),
            buf: vec![0u8; BUFFER_LEN],
            pool: Vec::new(),
            payloads: Ledger::default(),
            datagrams: Ledger::default(),
        }
    }

    fn push(&mut self, wire: Vec<u8>, from: u32) {
        if self.pool.len() < 32 {
            self.pool.push((wire, from));
        }
    }

    /// A packet sealed by `source` with the real sessions (recorded) or an
    /// outsider's (not recorded: it must never come out).
    fn seal_one(&mut self, u: &mut Unstructured) -> Result<()> {
        let source = u.int_in_range(1..=3)?;
        let hops = route(u, source)?;
        let Some(hops) = Hops::new(&hops) else {
            return Ok(());
        };
        let kind = *u.choose(&[
            Kind::Data,
            Kind::Probe,
            Kind::ProbeReply,
            Kind::Keepalive,
            Kind::Report,
        ])?;
        let egress = hops.last();
        let payload = match kind {
            Kind::Data => {
                let src = if u.ratio(1, 4)? {
                    app(id(u)?)
                } else {
                    app(source)
                };
                let dst = if u.ratio(1, 4)? {
                    app(id(u)?)
                } else {
                    app(egress)
                };
                inner_packet(u, src, dst)?
            }
            Kind::Keepalive => Vec::new(),
            _ => {
                let n = u.int_in_range(0..=64)?;
                u.bytes(n)?.to_vec()
            }
        };
        let header = pon::Repr {
            kind,
            hop_limit: *u.choose(&[pon::DEFAULT_HOP_LIMIT, 1, 2, 255])?,
            hop_index: 0,
            flow_id: u.arbitrary()?,
            source,
            hops,
        };
        let mut wire = vec![0u8; header.wire_len(payload.len())];
        header.emit(&mut wire).unwrap();
        let hl = header.header_len();
        wire[hl..hl + payload.len()].copy_from_slice(&payload);
        let outsider = u.ratio(1, 4)?;
        let (real, fake) = meshes();
        let keys = if outsider { fake } else { real };
        let len = wire.len();
        if seal(&keys[&source], &mut wire, 0, len).is_err() {
            return Ok(());
        }
        if !outsider {
            self.payloads.add(&payload);
            self.datagrams.add(&wire);
        }
        self.push(wire, source);
        Ok(())
    }

    /// `wire` from the proxy at `from` arrives at proxy `at`.
    fn deliver(&mut self, at: u32, wire: &[u8], from: SocketAddr) {
        let e = &self.engines[at as usize - 1];
        let len = wire.len().min(self.buf.len() - HEADROOM);
        self.buf[HEADROOM..HEADROOM + len].copy_from_slice(&wire[..len]);
        let before = outcomes(e);
        let counted = traffic(e);
        let d = e.from_peer(
            &e.table.load(),
            &e.sessions.load(),
            &mut self.buf,
            HEADROOM,
            len,
            from,
        );
        assert_eq!(outcomes(e), before + 1, "one outcome per packet: {d:?}");
        let (sent, received) = traffic(e);
        assert_eq!(
            sent, counted.0,
            "a packet from a peer is never counted as sent"
        );
        let took = received - counted.1;
        match d.output {
            Output::AgentIpip(_) | Output::AgentUdp(_) => {
                assert_eq!(took, 1, "delivered, not counted")
            }
            Output::Drop => assert!(
                took == 0 || self.datagrams.0.get(&wire[..len]).is_some_and(|n| *n > 0),
                "counted a datagram the test did not seal"
            ),
            _ => assert_eq!(took, 0, "counted what is not data for an agent"),
        }
        let out = &self.buf[d.range.clone()];
        match d.output {
            Output::Drop => {}
            Output::Peer(to) => {
                assert!(
                    self.datagrams.spend(&wire[..len]),
                    "relayed a datagram no neighbour authenticated (or a replay)"
                );
                let next = PROXIES.iter().copied().find(|p| proxy_addr(*p) == to);
                let out = out.to_vec();
                self.datagrams.add(&out);
                self.push(out, at);
                assert!(next.is_some(), "relayed to a stranger {to}");
            }
            Output::AgentIpip(_) => {
                assert!(
                    self.payloads.spend(&out[IPV4_HEADER_LEN..]),
                    "delivered an inner packet the test did not seal (or a replay)"
                );
            }
            Output::AgentUdp(_) => {
                assert!(
                    self.payloads.spend(out),
                    "delivered an inner packet the test did not seal (or a replay)"
                );
            }
            Output::Core(kind) if kind.is_sealed() => {
                let p = pon::Packet::new_checked(out).expect("the engine read it");
                assert!(
                    self.payloads.spend(p.payload()),
                    "handed the core a probe the test did not seal (or a replay)"
                );
            }
            Output::Core(_) => {}
        }
    }

    /// A packet from proxy `at`'s agent, over either agent leg.
    fn agent_sends(&mut self, u: &mut Unstructured) -> Result<()> {
        let at: u32 = u.int_in_range(1..=3)?;
        let sender = if u.ratio(1, 8)? { app(id(u)?) } else { app(at) };
        let inner = if u.ratio(1, 8)? {
            let n = u.arbitrary_len::<u8>()?.min(2000);
            u.bytes(n)?.to_vec()
        } else {
            let src = if u.ratio(1, 8)? { app(id(u)?) } else { sender };
            let dst = app(id(u)?);
            inner_packet(u, src, dst)?
        };
        let e = &self.engines[at as usize - 1];
        let before = outcomes(e);
        let counted = traffic(e);
        let (t, s) = (e.table.load(), e.sessions.load());
        let d = if u.arbitrary()? {
            let n = inner.len().min(self.buf.len() - HEADROOM);
            self.buf[HEADROOM..HEADROOM + n].copy_from_slice(&inner[..n]);
            let from = SocketAddr::V4(SocketAddrV4::new(sender, 40000));
            e.from_agent_udp(&t, &s, &mut self.buf, HEADROOM, n, from)
        } else {
            let n = (IPV4_HEADER_LEN + inner.len()).min(self.buf.len() - HEADROOM);
            let outer = Ipv4Repr::ipip(sender, Ipv4Addr::new(198, 18, at as u8, 1), n - 20);
            if outer.emit(&mut self.buf[HEADROOM..]).is_err() {
                return Ok(());
            }
            self.buf[HEADROOM + IPV4_HEADER_LEN..HEADROOM + n]
                .copy_from_slice(&inner[..n - IPV4_HEADER_LEN]);
            e.from_agent_ipip(&t, &s, &mut self.buf, HEADROOM, n)
        };
        assert_eq!(outcomes(e), before + 1, "one outcome per packet: {d:?}");
        assert!(d.range.end <= self.buf.len());
        let sealed = u64::from(matches!(d.output, Output::Peer(_)));
        assert_eq!(
            traffic(e),
            (counted.0 + sealed, counted.1),
            "sent counts what went to a peer"
        );
        if let Output::Peer(_) = d.output {
            // Sealed by an honest ingress for an agent's packet: ours.
            let wire = self.buf[d.range].to_vec();
            self.payloads.add(&inner);
            self.datagrams.add(&wire);
            self.push(wire, at);
        }
        Ok(())
    }

    fn step(&mut self, u: &mut Unstructured) -> Result<()> {
        match u.int_in_range(0..=5u8)? {
            0 => self.seal_one(u),
            1 => self.agent_sends(u),
            // A datagram on the wire, to the hop it names, from its sender.
            2 | 3 if !self.pool.is_empty() => {
                let i = u.choose_index(self.pool.len())?;
                let (wire, sender) = self.pool[i].clone();
                let at = pon::Packet::new_checked(&wire[..])
                    .map(|p| p.current_hop())
                    .unwrap_or(1);
                let at = if (1..=3).contains(&at) { at } else { 1 };
                let from = if u.ratio(1, 8)? { id(u)? } else { sender };
                self.deliver(at, &wire, proxy_addr(from));
                Ok(())
            }
            // An altered copy of a datagram, to any proxy.
            4 if !self.pool.is_empty() => {
                let i = u.choose_index(self.pool.len())?;
                let (mut wire, sender) = self.pool[i].clone();
                for _ in 0..u.int_in_range(1..=3u8)? {
                    match u.int_in_range(0..=3u8)? {
                        0 if !wire.is_empty() => {
                            let at = u.choose_index(wire.len().min(80))?;
                            wire[at] = u.arbitrary()?;
                        }
                        1 if !wire.is_empty() => {
                            let at = u.choose_index(wire.len())?;
                            wire[at] ^= 1 << u.int_in_range(0..=7u8)?;
                        }
                        2 => wire.truncate(u.choose_index(wire.len() + 1)?),
                        _ => {
                            let n = u.int_in_range(0..=32)?;
                            wire.extend_from_slice(u.bytes(n)?);
                        }
                    }
                }
                let at = u.int_in_range(1..=3)?;
                self.deliver(at, &wire, proxy_addr(sender));
                self.push(wire, sender);
                Ok(())
            }
            // Noise from a peer's address.
            _ => {
                let n = u.arbitrary_len::<u8>()?.min(1600);
                let wire = u.bytes(n)?.to_vec();
                let at = u.int_in_range(1..=3)?;
                self.deliver(at, &wire, proxy_addr(id(u)?));
                Ok(())
            }
        }
    }
}

/// Runs one arbitrary sequence of events (at most 64).
pub fn run(data: &[u8]) {
    let mut u = Unstructured::new(data);
    let mut w = World::new();
    for _ in 0..64 {
        if u.is_empty() || w.step(&mut u).is_err() {
            break;
        }
    }
}

#[cfg(test)]
mod properties {
    use proptest::prelude::*;

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(256))]
        #[test]
        fn nothing_unauthenticated_is_delivered(data in proptest::collection::vec(any::<u8>(), 0..4096)) {
            super::run(&data);
        }
    }
}
