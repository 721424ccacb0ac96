use super::*;
use crate::table::{AgentLink, ForwardingTable};
use arc_swap::ArcSwap;
use pon_proto::ip::{Icmpv4Message, Icmpv4Packet, IpProtocol, IpipPacket, Ipv4Packet};
use pon_tunnel::lan::{Channel, PairKey};
use std::sync::atomic::Ordering;
use std::sync::OnceLock;

const APP_A: Ipv4Addr = Ipv4Addr::new(198, 18, 1, 11);
const APP_B: Ipv4Addr = Ipv4Addr::new(198, 18, 2, 11);

fn proxy_addr(id: u32) -> SocketAddr {
    SocketAddr::from(([198, 18, id as u8, 1], 7300))
}

/// Sessions between proxies 1, 2 and 3, made once by real handshakes.
fn mesh() -> &'static rustc_hash::FxHashMap<u32, Arc<SessionTable>> {
    static MESH: OnceLock<rustc_hash::FxHashMap<u32, Arc<SessionTable>>> = OnceLock::new();
    MESH.get_or_init(|| pon_tunnel::local_mesh(&[1, 2, 3]))
}

/// Static secrets of proxy `id` and of its app VM (198.18.id.x).
fn proxy_secret(id: u32) -> [u8; 32] {
    [20 + id as u8; 32]
}
fn app_secret(addr: Ipv4Addr) -> [u8; 32] {
    [addr.octets()[2] * 16 + addr.octets()[3]; 32]
}

/// Agent `addr` of proxy `id`, with its key, and the site-LAN keys the
/// proxy keeps for it.
fn keyed_agent(id: u32, addr: Ipv4Addr, encap: Encap) -> (Agent, Arc<AgentLink>) {
    let public = pon_tunnel::lan::public_key(&app_secret(addr));
    let pair = PairKey::for_proxy(&proxy_secret(id), &public).unwrap();
    (
        Agent {
            addr,
            encap,
            key: Some(pon_proto::control::PublicKey(public)),
        },
        Arc::new(AgentLink {
            uplink: pair.receiver(Channel::Uplink),
            downlink: pair.sender(Channel::Downlink, 1, false),
        }),
    )
}

fn table_with_links(
    id: u32,
    peers: &[(u32, SocketAddr)],
    agents: &[(Agent, Arc<AgentLink>)],
    dests: &[(ipnet::IpNet, u32)],
    relays: &[(u32, Vec<u32>)],
) -> ForwardingTable {
    let plain: Vec<Agent> = agents.iter().map(|a| a.0).collect();
    let mut t = ForwardingTable::build(id, peers, &plain, dests, relays).unwrap();
    for (a, l) in agents {
        t.set_link(a.addr, l.clone());
    }
    t
}

/// `inner` as the TA of `inner`'s source sends it to proxy `id` on the UDP
/// leg, in a receive buffer; returns the buffer and the datagram's length.
/// Each call is a new run of the TA (a newer epoch), so none is a replay.
fn from_ta_udp(id: u32, inner: &[u8]) -> (Vec<u8>, usize) {
    static EPOCH: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);
    let src = Ipv4Addr::from(<[u8; 4]>::try_from(&inner[12..16]).unwrap());
    let tx = PairKey::for_agent(
        &app_secret(src),
        &pon_tunnel::lan::public_key(&proxy_secret(id)),
    )
    .unwrap()
    .sender(
        Channel::Uplink,
        EPOCH.fetch_add(1, std::sync::atomic::Ordering::Relaxed),
        true,
    );
    let mut d = vec![0u8; inner.len() + lan::OVERHEAD];
    d[lan::HEADER_LEN..lan::HEADER_LEN + inner.len()].copy_from_slice(inner);
    tx.seal(&mut d, inner.len()).unwrap();
    (received(&d), d.len())
}

/// `inner` sealed with the key of agent `as_agent` (whatever its source).
fn from_ta_udp_as(id: u32, as_agent: Ipv4Addr, epoch: u64, inner: &[u8]) -> (Vec<u8>, usize) {
    let tx = PairKey::for_agent(
        &app_secret(as_agent),
        &pon_tunnel::lan::public_key(&proxy_secret(id)),
    )
    .unwrap()
    .sender(Channel::Uplink, epoch, false);
    let mut d = vec![0u8; inner.len() + lan::OVERHEAD];
    d[lan::HEADER_LEN..lan::HEADER_LEN + inner.len()].copy_from_slice(inner);
    tx.seal(&mut d, inner.len()).unwrap();
    (received(&d), d.len())
}

/// Opens what proxy `id` sent to the RA of `addr` on the UDP leg.
fn at_ra(id: u32, addr: Ipv4Addr, datagram: &[u8]) -> Result<Vec<u8>, LanError> {
    let rx = PairKey::for_agent(
        &app_secret(addr),
        &pon_tunnel::lan::public_key(&proxy_secret(id)),
    )
    .unwrap()
    .receiver(Channel::Downlink);
    let mut d = datagram.to_vec();
    let r = rx.open(&mut d)?;
    Ok(d[r].to_vec())
}

/// Proxy `id` of a three-site overlay where 1 reaches 2 through 3.
fn engine(id: u32) -> Engine {
    let peers: Vec<_> = (1..=3)
        .filter(|p| *p != id)
        .map(|p| (p, proxy_addr(p)))
        .collect();
    let agents = [keyed_agent(
        id,
        Ipv4Addr::new(198, 18, id as u8, 11),
        Encap::Ipip,
    )];
    let dests: Vec<_> = (1..=3u32)
        .filter(|p| *p != id)
        .map(|p| (format!("198.18.{p}.0/24").parse().unwrap(), p))
        .collect();
    let relays = if id == 1 { vec![(2, vec![3])] } else { vec![] };
    let t = table_with_links(id, &peers, &agents, &dests, &relays);
    let e = Engine::new(
        Arc::new(ArcSwap::from_pointee(t)),
        Ipv4Addr::new(198, 18, id as u8, 1),
        1500,
        pon::DEFAULT_HOP_LIMIT,
    );
    e.sessions.store(mesh()[&id].clone());
    e
}

fn inner_packet(src: Ipv4Addr, dst: Ipv4Addr, payload: usize, df: bool) -> Vec<u8> {
    let mut v = vec![0u8; IPV4_HEADER_LEN + payload];
    Ipv4Repr {
        src,
        dst,
        protocol: IpProtocol::Udp,
        ttl: 64,
        dont_fragment: df,
        payload_len: payload,
    }
    .emit(&mut v)
    .unwrap();
    for (i, b) in v[IPV4_HEADER_LEN..].iter_mut().enumerate() {
        *b = i as u8;
    }
    v
}

/// Puts `inner` into a receive buffer as the TA would send it (IP-in-IP to
/// the forwarder); returns the buffer and the packet length.
fn from_ta(inner: &[u8], forwarder: Ipv4Addr) -> (Vec<u8>, usize) {
    let mut buf = vec![0u8; BUFFER_LEN];
    let src: [u8; 4] = inner[12..16].try_into().unwrap();
    Ipv4Repr::ipip(Ipv4Addr::from(src), forwarder, inner.len())
        .emit(&mut buf[HEADROOM..])
        .unwrap();
    buf[HEADROOM + IPV4_HEADER_LEN..HEADROOM + IPV4_HEADER_LEN + inner.len()]
        .copy_from_slice(inner);
    (buf, IPV4_HEADER_LEN + inner.len())
}

/// Copies `bytes` into a fresh receive buffer at the headroom, as a socket read would.
fn received(bytes: &[u8]) -> Vec<u8> {
    let mut buf = vec![0u8; BUFFER_LEN];
    buf[HEADROOM..HEADROOM + bytes.len()].copy_from_slice(bytes);
    buf
}

fn step(e: &Engine, buf: &mut [u8], len: usize, from: SocketAddr) -> Decision {
    e.from_peer(
        &e.table.load(),
        &e.sessions.load(),
        buf,
        HEADROOM,
        len,
        from,
    )
}

/// What `e` does with `wire`, received from `from`.
fn output_from_peer(e: &Engine, wire: &[u8], from: SocketAddr) -> Output {
    let mut buf = received(wire);
    step(e, &mut buf, wire.len(), from).output
}

/// A packet of `kind` from proxy `source` along `hops`, sealed by `source`
/// with its real sessions (as an honest proxy, or an attacker holding its
/// keys, would).
fn sealed(kind: Kind, source: u32, hops: &[u32], hop_limit: u8, payload: &[u8]) -> Vec<u8> {
    let header = pon::Repr {
        kind,
        hop_limit,
        hop_index: 0,
        flow_id: 0,
        source,
        hops: pon::Hops::new(hops).unwrap(),
    };
    let mut wire = vec![0u8; header.wire_len(payload.len())];
    header.emit(&mut wire).unwrap();
    let hl = header.header_len();
    wire[hl..hl + payload.len()].copy_from_slice(payload);
    let len = wire.len();
    super::seal(&mesh()[&source], &mut wire, 0, len).unwrap();
    wire
}

fn data(source: u32, hops: &[u32], hop_limit: u8, inner: &[u8]) -> Vec<u8> {
    sealed(Kind::Data, source, hops, hop_limit, inner)
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

#[test]
fn relayed_packet_arrives_intact_and_the_relay_cannot_read_it() {
    let (p1, p2, p3) = (engine(1), engine(2), engine(3));
    let inner = inner_packet(APP_A, APP_B, 100, true);
    let (mut buf, len) = from_ta(&inner, Ipv4Addr::new(198, 18, 1, 1));
    let d = p1.from_agent_ipip(
        &p1.table.load(),
        &p1.sessions.load(),
        &mut buf,
        HEADROOM,
        len,
    );
    assert_eq!(
        d.output,
        Output::Peer(proxy_addr(3)),
        "first hop is the relay"
    );
    let wire = buf[d.range].to_vec();
    assert_eq!(pon::Packet::new_checked(&wire[..]).unwrap().source(), 1);
    assert!(
        !contains(&wire, &inner[IPV4_HEADER_LEN..]),
        "payload is encrypted"
    );

    let mut buf = received(&wire);
    let d = step(&p3, &mut buf, wire.len(), proxy_addr(1));
    assert_eq!(d.output, Output::Peer(proxy_addr(2)));
    let wire = buf[d.range].to_vec();
    assert!(
        !contains(&wire, &inner[IPV4_HEADER_LEN..]),
        "still encrypted after the relay"
    );

    let mut buf = received(&wire);
    let d = step(&p2, &mut buf, wire.len(), proxy_addr(3));
    assert_eq!(d.output, Output::AgentIpip(APP_B));
    let p = IpipPacket::new_checked(&buf[d.range]).unwrap();
    assert_eq!(p.outer().src(), Ipv4Addr::new(198, 18, 2, 1));
    assert_eq!(p.inner().as_bytes(), &inner[..]);
    assert_eq!(p3.counters.transit.get(), 1);
    assert_eq!(p2.counters.egress.get(), 1);
}

#[test]
fn udp_agent_leg_and_direct_route() {
    let (p1, p2) = (engine(1), engine(2));
    let inner = inner_packet(APP_B, APP_A, 10, false);
    let (mut buf, len) = from_ta_udp(2, &inner);
    let from = SocketAddr::from((APP_B, 40000));
    let d = p2.from_agent_udp(
        &p2.table.load(),
        &p2.sessions.load(),
        &mut buf,
        HEADROOM,
        len,
        from,
    );
    assert_eq!(
        d.output,
        Output::Peer(proxy_addr(1)),
        "2 reaches 1 directly"
    );
    let wire = buf[d.range].to_vec();
    let p = pon::Packet::new_checked(&wire[..]).unwrap();
    assert_eq!(p.hop_count(), 1);
    assert_eq!(p.link(), None, "a direct route has no link layer");
    assert_eq!(wire.len(), pon::header_len(1) + inner.len() + TAG_LEN);
    let mut buf = received(&wire);
    let d = step(&p1, &mut buf, wire.len(), proxy_addr(2));
    assert_eq!(d.output, Output::AgentIpip(APP_A));
}

#[test]
fn altered_replayed_and_unauthenticated_packets_are_dropped_and_counted() {
    let (p2, p3) = (engine(2), engine(3));
    let inner = inner_packet(APP_A, APP_B, 40, false);

    // Direct 1 -> 2: each byte of the sealed part or the fixed header
    // altered fails the seal.
    let wire = data(1, &[2], 4, &inner);
    for at in [1usize, 9, 14, 16, 25, wire.len() - 20, wire.len() - 1] {
        let mut bad = wire.clone();
        bad[at] ^= 0x40;
        assert_eq!(
            output_from_peer(&p2, &bad, proxy_addr(1)),
            Output::Drop,
            "byte {at}"
        );
    }
    assert!(
        p2.counters.drop_bad_tag.get() >= 3,
        "payload, counter and tag bytes"
    );
    assert_eq!(p2.counters.egress.get(), 0);
    // The original, once; the replay, never.
    assert_eq!(
        output_from_peer(&p2, &wire, proxy_addr(1)),
        Output::AgentIpip(APP_B)
    );
    assert_eq!(output_from_peer(&p2, &wire, proxy_addr(1)), Output::Drop);
    assert_eq!(p2.counters.drop_replayed.get(), 1);

    // Relayed 1 -> 3 -> 2: the relay drops a datagram whose link tag does
    // not verify, and a replay of one it already forwarded.
    let wire = data(1, &[3, 2], 4, &inner);
    let mut bad = wire.clone();
    let n = bad.len();
    bad[n - TAG_LEN - 3] ^= 1; // in the seal tag: the relay's link tag catches it
    assert_eq!(output_from_peer(&p3, &bad, proxy_addr(1)), Output::Drop);
    assert_eq!(p3.counters.drop_bad_tag.get(), 1);
    assert_eq!(
        output_from_peer(&p3, &wire, proxy_addr(1)),
        Output::Peer(proxy_addr(2))
    );
    assert_eq!(output_from_peer(&p3, &wire, proxy_addr(1)), Output::Drop);
    assert_eq!(p3.counters.drop_replayed.get(), 1);
    assert_eq!(p3.counters.transit.get(), 1);
}

#[test]
fn a_peer_cannot_speak_for_another_or_for_another_cloud() {
    let p2 = engine(2);
    // 3 seals with its own keys but claims to be 1: the session it named
    // belongs to 3, not to the claimed source.
    let inner = inner_packet(APP_A, APP_B, 10, false);
    let mut forged = data(3, &[2], 4, &inner);
    pon::Packet::new_checked(&mut forged[..])
        .unwrap()
        .set_source(1);
    assert_eq!(output_from_peer(&p2, &forged, proxy_addr(3)), Output::Drop);
    assert_eq!(
        p2.counters.drop_wrong_peer.get() + p2.counters.drop_bad_tag.get(),
        1
    );

    // 3, honestly itself, sends an inner packet whose source is in 1's
    // cloud: allowed IPs say no.
    let wire = data(3, &[2], 4, &inner);
    assert_eq!(output_from_peer(&p2, &wire, proxy_addr(3)), Output::Drop);
    assert_eq!(p2.counters.drop_foreign_source.get(), 1);
    let own = inner_packet(Ipv4Addr::new(198, 18, 3, 11), APP_B, 10, false);
    let wire = data(3, &[2], 4, &own);
    assert_eq!(
        output_from_peer(&p2, &wire, proxy_addr(3)),
        Output::AgentIpip(APP_B)
    );

    // Sessions from outside the overlay (another mesh's keys) name no
    // session here.
    let outsider = pon_tunnel::local_mesh(&[1, 2]);
    let header = pon::Repr {
        kind: Kind::Data,
        hop_limit: 4,
        hop_index: 0,
        flow_id: 0,
        source: 1,
        hops: pon::Hops::new(&[2]).unwrap(),
    };
    let mut wire = vec![0u8; header.wire_len(inner.len())];
    header.emit(&mut wire).unwrap();
    wire[header.header_len()..header.header_len() + inner.len()].copy_from_slice(&inner);
    let len = wire.len();
    super::seal(&outsider[&1], &mut wire, 0, len).unwrap();
    assert_eq!(output_from_peer(&p2, &wire, proxy_addr(1)), Output::Drop);
    assert!(p2.counters.drop_unknown_session.get() + p2.counters.drop_bad_tag.get() >= 1);
}

#[test]
fn without_a_session_nothing_is_sent() {
    let p1 = engine(1);
    p1.sessions.store(Arc::default());
    let inner = inner_packet(APP_A, APP_B, 10, false);
    let (mut buf, len) = from_ta(&inner, Ipv4Addr::new(198, 18, 1, 1));
    let d = p1.from_agent_ipip(
        &p1.table.load(),
        &p1.sessions.load(),
        &mut buf,
        HEADROOM,
        len,
    );
    assert_eq!(d.output, Output::Drop);
    assert_eq!(p1.counters.drop_no_session.get(), 1);
}

#[test]
fn forged_and_malformed_are_dropped_and_counted() {
    let p1 = engine(1);
    let t = p1.table.load();
    let s = p1.sessions.load();
    let inner = inner_packet(APP_A, APP_B, 10, false);
    let stranger = SocketAddr::from(([198, 18, 9, 9], 7300));

    // Not PON at all, from a stranger or a known peer IP's other port:
    // peers are known by their keys, so the address decides nothing and
    // the parser refuses it.
    let mut buf = received(&inner);
    assert_eq!(
        p1.from_peer(&t, &s, &mut buf, HEADROOM, 30, stranger)
            .output,
        Output::Drop
    );
    let mut buf = received(&inner);
    let other_port = SocketAddr::from(([198, 18, 2, 1], 7301));
    assert_eq!(
        p1.from_peer(&t, &s, &mut buf, HEADROOM, 30, other_port)
            .output,
        Output::Drop
    );
    assert_eq!(p1.counters.parse.get(Error::BadVersion(0x45)), 2);

    // Garbage from a real peer.
    assert_eq!(
        output_from_peer(&p1, &[2, 1, 0, 9, 0, 0, 0, 0], proxy_addr(2)),
        Output::Drop
    );
    let truncated = Error::Truncated { needed: 0, have: 0 };
    assert_eq!(p1.counters.parse.get(truncated), 1);

    // An unknown PON kind is its own reason, not taken for data.
    let mut bad = data(2, &[1], 4, &inner);
    bad[1] = 9;
    assert_eq!(output_from_peer(&p1, &bad, proxy_addr(2)), Output::Drop);
    assert_eq!(p1.counters.parse.get(Error::UnknownKind(0)), 1);
    assert_eq!(
        p1.counters.parse.total(),
        4,
        "two not PON, one truncated, one unknown kind"
    );
    let mut w = pon_telemetry::PromWriter::new();
    p1.counters.render(&mut w);
    let page = w.finish();
    for line in [
        "pon_forwarder_drops_total{reason=\"unknown_kind\"} 1",
        "pon_forwarder_drops_total{reason=\"truncated\"} 1",
        "pon_forwarder_drops_total{reason=\"fragment\"} 0",
        "pon_forwarder_drops_total{reason=\"bad_tag\"} 0",
    ] {
        assert!(page.contains(line), "{line} in {page}");
    }
    assert_eq!(page.matches("# HELP pon_forwarder_drops_total").count(), 1);

    // A well-formed header that names another proxy as current hop.
    let wire = data(2, &[3], 4, &inner);
    assert_eq!(output_from_peer(&p1, &wire, proxy_addr(2)), Output::Drop);
    assert_eq!(p1.counters.drop_not_for_me.get(), 1);

    // Egress to an address that is not one of our agents: no open relay.
    let elsewhere = inner_packet(
        Ipv4Addr::new(198, 18, 2, 11),
        Ipv4Addr::new(10, 0, 0, 1),
        10,
        false,
    );
    let wire = data(2, &[1], 4, &elsewhere);
    assert_eq!(output_from_peer(&p1, &wire, proxy_addr(2)), Output::Drop);
    assert_eq!(p1.counters.drop_no_destination.get(), 1);

    // A sealed payload that is not an IP packet.
    let wire = data(2, &[1], 4, &[0x35; 24]);
    assert_eq!(output_from_peer(&p1, &wire, proxy_addr(2)), Output::Drop);
    assert_eq!(p1.counters.parse.get(Error::NotIp(0)), 1);

    // IP-in-IP from a host that is not a local agent, and an agent spoofing.
    let foreign = inner_packet(Ipv4Addr::new(198, 18, 1, 99), APP_B, 10, false);
    let (mut buf, len) = from_ta(&foreign, Ipv4Addr::new(198, 18, 1, 1));
    assert_eq!(
        p1.from_agent_ipip(&t, &s, &mut buf, HEADROOM, len).output,
        Output::Drop
    );
    assert_eq!(p1.counters.drop_unknown_agent.get(), 1);
    // Over UDP: sealed by the agent, but for another source address.
    let (mut buf, len) = from_ta_udp(1, &inner_packet(APP_A, APP_B, 10, false));
    let spoofing = inner_packet(Ipv4Addr::new(198, 18, 1, 99), APP_B, 10, false);
    let from = SocketAddr::from((APP_A, 1));
    let (mut spoofed, slen) = from_ta_udp_as(1, APP_A, 0, &spoofing);
    let d = p1.from_agent_udp(&t, &s, &mut spoofed, HEADROOM, slen, from);
    assert_eq!(d.output, Output::Drop);
    assert_eq!(p1.counters.drop_spoofed_source.get(), 1);
    // A site-LAN neighbour with the agent's address: unsealed, forged,
    // replayed, or another key's seal.
    let plain = received(&foreign);
    let d = p1.from_agent_udp(&t, &s, &mut plain.clone(), HEADROOM, foreign.len(), from);
    assert_eq!(d.output, Output::Drop);
    let good = buf.clone();
    let mut forged = buf.clone();
    forged[HEADROOM + lan::HEADER_LEN + 3] ^= 1;
    let d = p1.from_agent_udp(&t, &s, &mut forged, HEADROOM, len, from);
    assert_eq!(d.output, Output::Drop);
    assert_eq!(p1.counters.drop_agent_bad_tag.get(), 1);
    let d = p1.from_agent_udp(&t, &s, &mut buf, HEADROOM, len, from);
    assert!(matches!(d.output, Output::Peer(_)));
    let d = p1.from_agent_udp(&t, &s, &mut good.clone(), HEADROOM, len, from);
    assert_eq!(d.output, Output::Drop);
    assert_eq!(p1.counters.drop_agent_replayed.get(), 1);
    let (mut other, olen) = from_ta_udp_as(
        1,
        Ipv4Addr::new(198, 18, 1, 99),
        u64::MAX - 1,
        &inner_packet(APP_A, APP_B, 10, false),
    );
    let d = p1.from_agent_udp(&t, &s, &mut other, HEADROOM, olen, from);
    assert_eq!(d.output, Output::Drop);
    assert_eq!(p1.counters.drop_agent_bad_tag.get(), 2);
}

#[test]
fn hop_limit_is_enforced_in_transit() {
    let p3 = engine(3);
    let inner = inner_packet(APP_A, APP_B, 10, false);
    let wire = data(1, &[3, 2], 1, &inner);
    assert_eq!(output_from_peer(&p3, &wire, proxy_addr(1)), Output::Drop);
    assert_eq!(p3.counters.drop_hop_limit.get(), 1);
}

#[test]
fn looping_routes_and_inflated_hop_limits_are_refused() {
    // Proxy 1 (or whoever holds its keys) tries to make 3 and 2 bounce a
    // packet between them: [3, 2, 3, 2, ...], or to outlive the hop limit.
    let inner = inner_packet(APP_A, APP_B, 10, false);
    let p3 = engine(3);
    let loop_route = data(1, &[3, 2, 3, 2, 3, 2, 3, 2], 8, &inner);
    assert_eq!(
        output_from_peer(&p3, &loop_route, proxy_addr(1)),
        Output::Drop
    );
    assert_eq!(p3.counters.drop_repeated_hop.get(), 1);
    // Even when the repeat is at the end, and for probes too.
    let probe = sealed(Kind::Probe, 1, &[3, 2, 3], 8, &[0; 32]);
    assert_eq!(output_from_peer(&p3, &probe, proxy_addr(1)), Output::Drop);
    assert_eq!(p3.counters.drop_repeated_hop.get(), 2);
    let inflated = data(1, &[3, 2], pon::DEFAULT_HOP_LIMIT + 1, &inner);
    assert_eq!(
        output_from_peer(&p3, &inflated, proxy_addr(1)),
        Output::Drop
    );
    assert_eq!(p3.counters.drop_hop_limit_above_max.get(), 1);
    // The honest packet still goes through.
    let honest = data(1, &[3, 2], pon::DEFAULT_HOP_LIMIT, &inner);
    assert_eq!(
        output_from_peer(&p3, &honest, proxy_addr(1)),
        Output::Peer(proxy_addr(2))
    );
    assert_eq!(p3.counters.transit.get(), 1);
}

#[test]
fn oversized_df_packet_gets_frag_needed_back_to_sender() {
    let p1 = engine(1);
    let relay_overhead = pon::proxy_leg_overhead(2);
    let fits = inner_packet(APP_A, APP_B, 1500 - relay_overhead - IPV4_HEADER_LEN, true);
    let (mut buf, len) = from_ta(&fits, Ipv4Addr::new(198, 18, 1, 1));
    let d = p1.from_agent_ipip(
        &p1.table.load(),
        &p1.sessions.load(),
        &mut buf,
        HEADROOM,
        len,
    );
    assert!(matches!(d.output, Output::Peer(_)));
    assert_eq!(
        d.range.len() + UDP_OVERHEAD,
        1500,
        "exactly fills the underlay"
    );

    let too_big = inner_packet(
        APP_A,
        APP_B,
        1500 - relay_overhead - IPV4_HEADER_LEN + 1,
        true,
    );
    let (mut buf, len) = from_ta(&too_big, Ipv4Addr::new(198, 18, 1, 1));
    let d = p1.from_agent_ipip(
        &p1.table.load(),
        &p1.sessions.load(),
        &mut buf,
        HEADROOM,
        len,
    );
    assert_eq!(
        d.output,
        Output::AgentIpip(APP_A),
        "error goes back to the sender"
    );
    let outer = IpipPacket::new_checked(&buf[d.range]).unwrap();
    let ip = outer.inner();
    let ip = ip.as_ipv4().unwrap();
    assert_eq!(ip.protocol(), IpProtocol::Icmp);
    assert_eq!(ip.dst(), APP_A);
    let icmp = Icmpv4Packet::new_checked(ip.payload()).unwrap();
    assert!(icmp.verify_checksum());
    assert_eq!(
        (icmp.msg_type(), icmp.msg_code()),
        (Icmpv4Message::DstUnreachable, 4)
    );
    let _ = Ipv4Packet::new_checked(ip.as_bytes()).unwrap();
    let mtu = usize::from(icmp.next_hop_mtu());
    assert_eq!(mtu, 1500 - relay_overhead);
    assert_eq!(p1.counters.frag_needed.get(), 1);

    // Without DF the packet goes on; the kernel fragments the outer packet.
    let no_df = inner_packet(APP_A, APP_B, 1600, false);
    let (mut buf, len) = from_ta(&no_df, Ipv4Addr::new(198, 18, 1, 1));
    let d = p1.from_agent_ipip(
        &p1.table.load(),
        &p1.sessions.load(),
        &mut buf,
        HEADROOM,
        len,
    );
    assert!(matches!(d.output, Output::Peer(_)));
}

#[test]
fn local_destination_is_delivered_without_the_overlay() {
    let p1 = engine(1);
    let neighbour = Ipv4Addr::new(198, 18, 1, 12);
    let agents = [
        keyed_agent(1, APP_A, Encap::Ipip),
        keyed_agent(1, neighbour, Encap::Udp { ra_port: 7302 }),
    ];
    let table = table_with_links(1, &[(2, proxy_addr(2))], &agents, &[], &[]);
    p1.table.store(Arc::new(table));
    let inner = inner_packet(APP_A, neighbour, 10, false);
    let (mut buf, len) = from_ta(&inner, Ipv4Addr::new(198, 18, 1, 1));
    let d = p1.from_agent_ipip(
        &p1.table.load(),
        &p1.sessions.load(),
        &mut buf,
        HEADROOM,
        len,
    );
    assert_eq!(
        d.output,
        Output::AgentUdp(SocketAddrV4::new(neighbour, 7302))
    );
    // Sealed for the neighbour's RA: it opens there and nowhere else.
    assert_eq!(at_ra(1, neighbour, &buf[d.range.clone()]).unwrap(), inner);
    assert_eq!(at_ra(1, APP_A, &buf[d.range]), Err(LanError::BadTag));
}

#[test]
fn probes_transit_and_end_opened_at_the_monitor() {
    let p3 = engine(3);
    let body = [7u8; 32];
    let wire = sealed(Kind::Probe, 1, &[3, 2], 4, &body);
    let mut buf = received(&wire);
    assert_eq!(
        step(&p3, &mut buf, wire.len(), proxy_addr(1)).output,
        Output::Peer(proxy_addr(2))
    );
    let wire = sealed(Kind::Probe, 1, &[3], 4, &body);
    let mut buf = received(&wire);
    assert_eq!(
        step(&p3, &mut buf, wire.len(), proxy_addr(1)).output,
        Output::Drop
    );
    assert_eq!(p3.counters.drop_no_monitor.get(), 1);
    let p3 = engine(3).with_monitor();
    let wire = sealed(Kind::Probe, 1, &[3], 4, &body);
    let mut buf = received(&wire);
    let d = step(&p3, &mut buf, wire.len(), proxy_addr(1));
    assert_eq!(d.output, Output::Core(Kind::Probe));
    let p = pon::Packet::new_checked(&buf[d.range]).unwrap();
    assert_eq!(p.payload(), &body, "opened for the monitor");
}

#[test]
fn handshakes_reach_the_core_and_keepalives_end_here() {
    let p2 = engine(2);
    let init = sealed(Kind::HandshakeInit, 1, &[2], 4, &[0; 60]);
    assert_eq!(
        output_from_peer(&p2, &init, proxy_addr(1)),
        Output::Core(Kind::HandshakeInit)
    );
    let keepalive = sealed(Kind::Keepalive, 1, &[2], 4, &[]);
    assert_eq!(
        output_from_peer(&p2, &keepalive, proxy_addr(1)),
        Output::Drop
    );
    assert_eq!(p2.counters.keepalives.get(), 1);
}

#[test]
fn a_peer_is_known_by_its_keys_and_followed_to_a_new_address() {
    let (p2, p3) = (engine(2), engine(3));
    let inner = inner_packet(APP_A, APP_B, 40, false);
    let elsewhere = SocketAddr::from(([203, 0, 113, 7], 40001));
    let at = |e: &Engine, wire: &[u8], from: SocketAddr| {
        let mut buf = received(wire);
        let mut moved = None;
        let (t, s) = (e.table.load(), e.sessions.load());
        let d = e.from_peer_at(&t, &s, &mut buf, HEADROOM, wire.len(), from, &mut moved);
        (d.output, moved)
    };
    // Direct 1 -> 2 from 1's usual address: delivered, nobody moved.
    assert_eq!(
        at(&p2, &data(1, &[2], 4, &inner), proxy_addr(1)),
        (Output::AgentIpip(APP_B), None)
    );
    // From another address, authenticated by its seal: delivered, and 1
    // is reported there.
    assert_eq!(
        at(&p2, &data(1, &[2], 4, &inner), elsewhere),
        (Output::AgentIpip(APP_B), Some(1))
    );
    // A forgery or a replay from there moves nobody.
    let mut forged = data(1, &[2], 4, &inner);
    let n = forged.len();
    forged[n - 1] ^= 1;
    assert_eq!(at(&p2, &forged, elsewhere), (Output::Drop, None));
    let once = data(1, &[2], 4, &inner);
    assert_eq!(at(&p2, &once, proxy_addr(1)).1, None);
    assert_eq!(at(&p2, &once, elsewhere), (Output::Drop, None));
    // Relayed 1 -> 3 -> 2: the relay knows 1 by its link tag.
    assert_eq!(
        at(&p3, &data(1, &[3, 2], 4, &inner), elsewhere),
        (Output::Peer(proxy_addr(2)), Some(1))
    );
    // A handshake message is not authenticated here: the core decides,
    // once the Noise handshake has.
    let init = sealed(Kind::HandshakeInit, 1, &[2], 4, &[0; 100]);
    assert_eq!(at(&p2, &init, elsewhere).1, None);
}

/// Gives every peer of `e`'s table data counters, as the proxy core does.
fn with_traffic(e: &Engine) -> rustc_hash::FxHashMap<u32, Arc<crate::PeerTraffic>> {
    let mut t = (**e.table.load()).clone();
    let counters: rustc_hash::FxHashMap<u32, Arc<crate::PeerTraffic>> =
        t.peer_ids().map(|p| (p, Arc::default())).collect();
    for (p, c) in &counters {
        t.set_traffic(*p, c.clone());
    }
    e.table.store(Arc::new(t));
    counters
}

#[test]
fn data_is_counted_per_peer_for_the_reports() {
    let (p1, p2, p3) = (engine(1), engine(2), engine(3));
    let (c1, c2) = (with_traffic(&p1), with_traffic(&p2));
    with_traffic(&p3);
    let inner = inner_packet(APP_A, APP_B, 40, false);
    // Ingress 1 seals three packets for egress 2 (through relay 3).
    let mut wires = Vec::new();
    for _ in 0..3 {
        let (mut buf, len) = from_ta(&inner, Ipv4Addr::new(198, 18, 1, 1));
        let t = p1.table.load();
        let d = p1.from_agent_ipip(&t, &p1.sessions.load(), &mut buf, HEADROOM, len);
        assert_eq!(d.output, Output::Peer(proxy_addr(3)));
        wires.push(buf[d.range].to_vec());
    }
    assert_eq!(c1[&2].sent.load(Ordering::Relaxed), 3);
    assert_eq!(
        c1[&3].sent.load(Ordering::Relaxed),
        0,
        "the relay is no egress"
    );
    // The relay forwards, the egress counts what it delivers, with the
    // highest seal counter among them; the first is lost on the way.
    for w in &wires[1..] {
        let mut buf = received(w);
        let d = step(&p3, &mut buf, w.len(), proxy_addr(1));
        assert_eq!(d.output, Output::Peer(proxy_addr(2)));
        let fwd = buf[d.range].to_vec();
        assert_eq!(
            output_from_peer(&p2, &fwd, proxy_addr(3)),
            Output::AgentIpip(APP_B)
        );
    }
    assert_eq!(c2[&1].received.load(Ordering::Relaxed), 2);
    let highest = c2[&1].highest_counter.load(Ordering::Relaxed);
    assert!(highest >= 2, "{highest}");
    // A replayed packet is not counted again.
    let mut buf = received(&wires[2]);
    let d = step(&p3, &mut buf, wires[2].len(), proxy_addr(1));
    assert_eq!(d.output, Output::Drop);
    assert_eq!(c2[&1].received.load(Ordering::Relaxed), 2);
}

#[test]
fn reports_reach_the_core_only_when_sealed_by_their_source() {
    use pon_proto::report;
    let p1 = engine(1).with_monitor();
    let mut body = [0u8; report::BODY_LEN];
    report::Repr {
        window_ms: 200,
        received: 1_000_000,
        highest_counter: 1_000_000,
    }
    .emit(&mut body)
    .unwrap();
    // Genuine: 2 reports to 1 over the direct path.
    let wire = sealed(Kind::Report, 2, &[1], 4, &body);
    let mut buf = received(&wire);
    let d = step(&p1, &mut buf, wire.len(), proxy_addr(2));
    assert_eq!(d.output, Output::Core(Kind::Report));
    let p = pon::Packet::new_checked(&buf[d.range]).unwrap();
    assert_eq!(p.payload(), &body, "opened for the core");
    // Forged: an attacker who saw it flips a byte of the count to keep a
    // dead route "confirmed"; or replays it; or 3 seals one in 2's name.
    let mut forged = sealed(Kind::Report, 2, &[1], 4, &body);
    let hl = pon::header_len(1);
    forged[hl + 15] ^= 1;
    assert_eq!(output_from_peer(&p1, &forged, proxy_addr(2)), Output::Drop);
    assert_eq!(p1.counters.drop_bad_tag.get(), 1);
    assert_eq!(output_from_peer(&p1, &wire, proxy_addr(2)), Output::Drop);
    assert_eq!(p1.counters.drop_replayed.get(), 1);
    let mut posing = sealed(Kind::Report, 3, &[1], 4, &body);
    posing[12..16].copy_from_slice(&2u32.to_be_bytes());
    assert_eq!(output_from_peer(&p1, &posing, proxy_addr(2)), Output::Drop);
    assert_eq!(p1.counters.drop_wrong_peer.get(), 1);
    // Without a monitor there is no router to tell: dropped, counted.
    let plain = engine(1);
    let wire = sealed(Kind::Report, 2, &[1], 4, &body);
    assert_eq!(output_from_peer(&plain, &wire, proxy_addr(2)), Output::Drop);
    assert_eq!(plain.counters.drop_no_monitor.get(), 1);
}
