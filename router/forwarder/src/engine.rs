//! What the forwarder does with one packet, without doing any I/O: the
//! caller receives into a buffer with headroom, asks the engine, and sends
//! the bytes it is pointed at. Headers are added and removed, and payloads
//! sealed and opened, in place, so no packet is copied and nothing is
//! allocated.
//!
//! Every packet from a peer is authenticated before any other work: on a
//! relayed route by its link tag (the neighbour that sent it), on a direct
//! one by its seal. Relays check and renew the link tag and never open the
//! seal; the egress opens it, then delivers an inner packet only if its
//! source is one the sending proxy serves (allowed IPs).

use super::table::{Agent, Encap, ForwardingTable, SharedTable};
use pon_proto::ip::{
    self, InnerPacket, IpipPacket, Ipv4Repr, FRAG_NEEDED_MAX_LEN, IPV4_HEADER_LEN, UDP_OVERHEAD,
};
use pon_proto::lan;
use pon_proto::pon::{self, Kind, MAX_HEADER_LEN, MAX_SEAL_AAD_LEN, MAX_TRAILER_LEN, TAG_LEN};
use pon_proto::Error;
use pon_tunnel::lan::LanError;
use pon_tunnel::{OpenError, Session, SessionTable};
use std::net::{IpAddr, Ipv4Addr, SocketAddr, SocketAddrV4};
use std::ops::Range;
use std::sync::Arc;

/// Free bytes kept before a received packet so a PON or outer IPv4 header
/// can be written in front of it.
pub const HEADROOM: usize = MAX_HEADER_LEN;
/// Free bytes kept after a received packet for an ICMP error about it, or
/// for the tags sealing adds.
/// (The site-LAN tag of a packet to an RA comes after either.)
pub const TAILROOM: usize = lan::TAG_LEN
    + if IPV4_HEADER_LEN + FRAG_NEEDED_MAX_LEN > MAX_TRAILER_LEN {
        IPV4_HEADER_LEN + FRAG_NEEDED_MAX_LEN
    } else {
        MAX_TRAILER_LEN
    };
/// Largest packet a socket read may return.
pub const MAX_PACKET: usize = 65535;
/// Size of one receive buffer.
pub const BUFFER_LEN: usize = HEADROOM + MAX_PACKET + TAILROOM;

pon_telemetry::counters! {
    /// The forwarder's counters other than parse errors.
    pub struct EngineCounters {
        rx_agent => ("pon_forwarder_rx_packets_total", "from=\"agent\"", "Packets received."),
        rx_peer => ("pon_forwarder_rx_packets_total", "from=\"peer\"", "Packets received."),
        ingress => ("pon_forwarder_packets_total", "stage=\"ingress\"", "Packets forwarded, by role of this proxy on their path."),
        transit => ("pon_forwarder_packets_total", "stage=\"transit\"", "Packets forwarded, by role of this proxy on their path."),
        egress => ("pon_forwarder_packets_total", "stage=\"egress\"", "Packets forwarded, by role of this proxy on their path."),
        local => ("pon_forwarder_packets_total", "stage=\"local\"", "Packets forwarded, by role of this proxy on their path."),
        frag_needed => ("pon_forwarder_icmp_frag_needed_total", "", "ICMP fragmentation-needed errors returned to senders."),
        drop_unknown_agent => ("pon_forwarder_drops_total", "reason=\"unknown_agent\"", "Packets dropped, by reason."),
        drop_spoofed_source => ("pon_forwarder_drops_total", "reason=\"spoofed_source\"", "Packets dropped, by reason."),
        drop_not_for_me => ("pon_forwarder_drops_total", "reason=\"not_for_me\"", "Packets dropped, by reason."),
        probes_local => ("pon_forwarder_packets_total", "stage=\"probe_local\"", "Packets forwarded, by role of this proxy on their path."),
        drop_no_monitor => ("pon_forwarder_drops_total", "reason=\"no_monitor\"", "Packets dropped, by reason."),
        drop_hop_limit => ("pon_forwarder_drops_total", "reason=\"hop_limit\"", "Packets dropped, by reason."),
        drop_hop_limit_above_max => ("pon_forwarder_drops_total", "reason=\"hop_limit_above_max\"", "Packets dropped, by reason."),
        drop_repeated_hop => ("pon_forwarder_drops_total", "reason=\"repeated_hop\"", "Packets dropped, by reason."),
        drop_no_destination => ("pon_forwarder_drops_total", "reason=\"no_destination\"", "Packets dropped, by reason."),
        drop_no_route => ("pon_forwarder_drops_total", "reason=\"no_route\"", "Packets dropped, by reason."),
        drop_unknown_next_hop => ("pon_forwarder_drops_total", "reason=\"unknown_next_hop\"", "Packets dropped, by reason."),
        drop_too_big => ("pon_forwarder_drops_total", "reason=\"too_big\"", "Packets dropped, by reason."),
        drop_no_session => ("pon_forwarder_drops_total", "reason=\"no_session\"", "Packets dropped, by reason."),
        drop_unknown_session => ("pon_forwarder_drops_total", "reason=\"unknown_session\"", "Packets dropped, by reason."),
        drop_wrong_peer => ("pon_forwarder_drops_total", "reason=\"wrong_peer\"", "Packets dropped, by reason."),
        drop_bad_tag => ("pon_forwarder_drops_total", "reason=\"bad_tag\"", "Packets dropped, by reason."),
        drop_replayed => ("pon_forwarder_drops_total", "reason=\"replayed\"", "Packets dropped, by reason."),
        drop_foreign_source => ("pon_forwarder_drops_total", "reason=\"foreign_source\"", "Packets dropped, by reason."),
        handshakes_local => ("pon_forwarder_packets_total", "stage=\"handshake\"", "Packets forwarded, by role of this proxy on their path."),
        keepalives => ("pon_forwarder_packets_total", "stage=\"keepalive\"", "Packets forwarded, by role of this proxy on their path."),
        drop_no_room => ("pon_forwarder_drops_total", "reason=\"no_room\"", "Packets dropped, by reason."),
        drop_agent_no_key => ("pon_forwarder_drops_total", "reason=\"agent_no_key\"", "Packets dropped, by reason."),
        drop_agent_unsealed => ("pon_forwarder_drops_total", "reason=\"agent_unsealed\"", "Packets dropped, by reason."),
        drop_agent_bad_tag => ("pon_forwarder_drops_total", "reason=\"agent_bad_tag\"", "Packets dropped, by reason."),
        drop_agent_replayed => ("pon_forwarder_drops_total", "reason=\"agent_replayed\"", "Packets dropped, by reason."),
        drop_agent_stale_epoch => ("pon_forwarder_drops_total", "reason=\"agent_stale_epoch\"", "Packets dropped, by reason."),
        rx_errors => ("pon_forwarder_socket_errors_total", "op=\"recv\"", "Socket errors."),
        tx_errors => ("pon_forwarder_socket_errors_total", "op=\"send\"", "Socket errors."),
        tx_packets => ("pon_forwarder_tx_packets_total", "", "Packets the kernel took to send; those it refused are in pon_forwarder_socket_errors_total{op=\"send\"}."),
    }
}

const DROPS_METRIC: &str = "pon_forwarder_drops_total";
const DROPS_HELP: &str = "Packets dropped, by reason.";

/// Packets dropped because they did not parse, one counter per
/// [`pon_proto::Error`] variant so each reason is its own series
/// (`reason="<Error::label()>"`); counting indexes an array, so the hot
/// path neither allocates nor formats.
#[derive(Debug, Default)]
pub struct ParseDrops([pon_telemetry::Counter; Error::COUNT]);

impl ParseDrops {
    pub fn get(&self, e: Error) -> u64 {
        self.0[e.index()].get()
    }
    fn count(&self, e: Error) {
        self.0[e.index()].inc();
    }
    /// Sum over all reasons.
    pub fn total(&self) -> u64 {
        self.0.iter().map(|c| c.get()).sum()
    }
    pub fn render(&self, w: &mut pon_telemetry::PromWriter) {
        for (c, label) in self.0.iter().zip(Error::LABELS) {
            w.counter(
                DROPS_METRIC,
                &format!("reason=\"{label}\""),
                DROPS_HELP,
                c.get(),
            );
        }
    }
}

/// Forwarder counters: every packet received ends in exactly one of the
/// stage or drop counters.
#[derive(Debug, Default)]
pub struct ForwarderCounters {
    pub engine: EngineCounters,
    pub parse: ParseDrops,
}

impl ForwarderCounters {
    pub fn render(&self, w: &mut pon_telemetry::PromWriter) {
        self.engine.render(w);
        self.parse.render(w);
    }
}

/// The stage and non-parse drop counters read as fields of the whole
/// (`counters.transit`), as they did before parse drops were split out.
impl std::ops::Deref for ForwarderCounters {
    type Target = EngineCounters;
    fn deref(&self) -> &EngineCounters {
        &self.engine
    }
}

/// Where the bytes `buf[range]` go.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Output {
    /// A PON packet to a peer proxy over UDP.
    Peer(SocketAddr),
    /// A complete IPv4 IP-in-IP packet (header written) for a raw socket.
    AgentIpip(Ipv4Addr),
    /// An inner packet to an agent's UDP reception port.
    AgentUdp(SocketAddrV4),
    /// A packet that ends here and is for the proxy core: a probe or probe
    /// reply (opened: its payload is plaintext) for the monitor, a
    /// handshake message for the tunnels. Its kind is already read.
    Core(Kind),
    /// Dropped; the reason is already counted.
    Drop,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Decision {
    pub output: Output,
    pub range: Range<usize>,
}

impl Decision {
    const DROP: Decision = Decision {
        output: Output::Drop,
        range: 0..0,
    };
}

pub struct Engine {
    pub table: SharedTable,
    /// The session keys, swapped whole by the control side.
    pub sessions: SharedSessions,
    pub counters: Arc<ForwarderCounters>,
    local_addr: Ipv4Addr,
    underlay_mtu: usize,
    hop_limit: u8,
    has_monitor: bool,
}

/// The session table the data path reads, as the forwarding table.
pub type SharedSessions = Arc<arc_swap::ArcSwap<SessionTable>>;

/// `neighbour` authenticated a datagram from `src`: if the table has it
/// elsewhere (or not at all, when a route names it), say so.
#[inline]
fn note_sender(t: &ForwardingTable, neighbour: u32, src: SocketAddr, moved: &mut Option<u32>) {
    if t.peer_addr(neighbour) != Some(src) {
        *moved = Some(neighbour);
    }
}

fn drop(counter: &pon_telemetry::Counter) -> Decision {
    counter.inc();
    Decision::DROP
}

/// Splits `buf` at the end of the packet `buf[start..start + len]` into the
/// packet (read-only, to be checked), the room after it (for an ICMP error)
/// and the offset of that room, so that a checked view of the packet and a
/// write to the tail can coexist.
fn split_packet(
    buf: &mut [u8],
    start: usize,
    len: usize,
) -> Result<(&[u8], &mut [u8], usize), Error> {
    let end = end_of(buf, start, len)?;
    let (front, tail) = buf.split_at_mut(end);
    Ok((&front[start..], tail, end))
}

/// The end of `buf[start..start + len]`, or the truncation to count when the
/// caller's length overruns the buffer.
fn end_of(buf: &[u8], start: usize, len: usize) -> Result<usize, Error> {
    start
        .checked_add(len)
        .filter(|e| *e <= buf.len())
        .ok_or(Error::Truncated {
            needed: start.saturating_add(len),
            have: buf.len(),
        })
}

/// Why a packet could not be sealed for sending.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SealError {
    /// No session with the egress or the next hop yet (a handshake is due).
    NoSession,
    /// The next hop is not a peer.
    UnknownNextHop,
    /// The bytes are not a PON packet this proxy could have built.
    Malformed,
}

/// Seals `buf[start..end]`, a PON packet whose trailer room (zeroed or
/// not) is included in the range: the payload with the egress's session,
/// then, on a relayed route, the whole datagram with the first hop's. Each
/// call takes fresh counters. The path every packet a proxy originates
/// takes; public so that load generators and fuzzers seal as a proxy does.
#[inline]
pub fn seal(s: &SessionTable, buf: &mut [u8], start: usize, end: usize) -> Result<(), SealError> {
    seal_with(s, s, buf, start, end)
}

/// [`seal`] with the end-to-end session taken from `e2e` and the first
/// leg's from `legs`: for a load generator that must pass a real relay's
/// check but whose sink never opens the seal.
#[inline]
pub fn seal_with(
    e2e: &SessionTable,
    legs: &SessionTable,
    buf: &mut [u8],
    start: usize,
    end: usize,
) -> Result<(), SealError> {
    let mut p = pon::Packet::new_checked(&mut buf[start..end]).map_err(|_| SealError::Malformed)?;
    if p.kind().is_sealed() {
        let e2e = e2e.sender(p.egress()).ok_or(SealError::NoSession)?;
        let counter = e2e.next_counter().ok_or(SealError::NoSession)?;
        p.set_seal(e2e.remote_index(), counter);
        let mut aad = [0u8; MAX_SEAL_AAD_LEN];
        let aad = p.seal_aad(&mut aad);
        let sealed = p.sealed_mut();
        let (data, tag) = sealed.split_at_mut(sealed.len() - TAG_LEN);
        tag.copy_from_slice(&e2e.seal(counter, aad, data));
    }
    let first = p.current_hop();
    link(legs, &mut p, first)
}

/// Authenticates the datagram for the leg to `next` (relayed routes only).
#[inline]
fn link(s: &SessionTable, p: &mut pon::Packet<&mut [u8]>, next: u32) -> Result<(), SealError> {
    if !p.has_link() {
        return Ok(());
    }
    let session = s.sender(next).ok_or(SealError::NoSession)?;
    let counter = session.next_counter().ok_or(SealError::NoSession)?;
    p.set_link(session.remote_index(), counter);
    if let Some((body, tag)) = p.link_tag_mut() {
        tag.copy_from_slice(&session.tag(counter, body));
    }
    Ok(())
}

impl Engine {
    pub fn new(table: SharedTable, local_addr: Ipv4Addr, underlay_mtu: u16, hop_limit: u8) -> Self {
        Engine {
            table,
            sessions: Arc::default(),
            counters: Arc::default(),
            local_addr,
            underlay_mtu: usize::from(underlay_mtu),
            hop_limit,
            has_monitor: false,
        }
    }

    /// Hands probes that end here to a monitor (`Output::Core`) instead
    /// of dropping them.
    pub fn with_monitor(mut self) -> Self {
        self.has_monitor = true;
        self
    }

    fn malformed(&self, e: Error) -> Decision {
        self.counters.parse.count(e);
        Decision::DROP
    }

    fn seal_failed(&self, e: SealError) -> Decision {
        let c = &self.counters;
        match e {
            SealError::NoSession => drop(&c.drop_no_session),
            SealError::UnknownNextHop => drop(&c.drop_unknown_next_hop),
            SealError::Malformed => drop(&c.drop_no_room),
        }
    }

    fn lan_failed(&self, e: LanError) -> Decision {
        let c = &self.counters;
        match e {
            // Not a site-LAN datagram at all (too short, another version).
            LanError::Malformed(_) => drop(&c.drop_agent_unsealed),
            LanError::BadTag => drop(&c.drop_agent_bad_tag),
            LanError::Replayed => drop(&c.drop_agent_replayed),
            LanError::StaleEpoch => drop(&c.drop_agent_stale_epoch),
        }
    }

    fn open_failed(&self, e: OpenError) -> Decision {
        match e {
            OpenError::Forged => drop(&self.counters.drop_bad_tag),
            OpenError::Replayed => drop(&self.counters.drop_replayed),
        }
    }

    /// An IP-in-IP packet from a local TA, as read from the raw socket into
    /// `buf[start..start + len]` (outer header included).
    pub fn from_agent_ipip(
        &self,
        t: &ForwardingTable,
        s: &SessionTable,
        buf: &mut [u8],
        start: usize,
        len: usize,
    ) -> Decision {
        let c = &self.counters;
        c.rx_agent.inc();
        let checked = split_packet(buf, start, len)
            .and_then(|(pkt, tail, end)| Ok((IpipPacket::new_checked(pkt)?, tail, end)));
        let (outer, tail, end) = match checked {
            Ok(v) => v,
            Err(e) => return self.malformed(e),
        };
        let agent = outer.outer().src();
        if t.agent(IpAddr::V4(agent)).is_none() {
            return drop(&c.drop_unknown_agent);
        }
        let inner = outer.inner();
        let is = start + outer.outer().header_len();
        let ie = is + inner.len();
        let plan = self.plan_ingress(t, inner, agent, tail, end);
        self.ingress(t, s, buf, is, ie, plan)
    }

    /// A datagram from a local TA using the UDP encapsulation: the inner
    /// packet sealed with the key the agent shares with this proxy
    /// (`pon_proto::lan`), authenticated before anything else is read.
    pub fn from_agent_udp(
        &self,
        t: &ForwardingTable,
        s: &SessionTable,
        buf: &mut [u8],
        start: usize,
        len: usize,
        src: SocketAddr,
    ) -> Decision {
        let c = &self.counters;
        c.rx_agent.inc();
        let IpAddr::V4(src_ip) = src.ip() else {
            return drop(&c.drop_unknown_agent);
        };
        if t.agent(src.ip()).is_none() {
            return drop(&c.drop_unknown_agent);
        }
        let Some(link) = t.link(src_ip) else {
            return drop(&c.drop_agent_no_key);
        };
        let Some(end) = start.checked_add(len).filter(|e| *e <= buf.len()) else {
            return self.malformed(Error::Truncated {
                needed: start.saturating_add(len),
                have: buf.len(),
            });
        };
        let payload = match link.uplink.open(&mut buf[start..end]) {
            Ok(r) => r,
            Err(e) => return self.lan_failed(e),
        };
        let (start, len) = (start + payload.start, payload.len());
        let checked = split_packet(buf, start, len)
            .and_then(|(pkt, tail, end)| Ok((InnerPacket::new_checked(pkt)?, tail, end)));
        let (inner, tail, end) = match checked {
            Ok(v) => v,
            Err(e) => return self.malformed(e),
        };
        let plan = self.plan_ingress(t, inner, src_ip, tail, end);
        self.ingress(t, s, buf, start, end, plan)
    }

    /// Entry into the overlay, first half: decides from the checked inner
    /// packet (read-only) where it goes. Only the ICMP error of a packet
    /// too big for the path is written here, into `tail` (the buffer after
    /// the packet as received, from offset `tail_at`); the PON header is written
    /// by `ingress` once the view is no longer needed.
    fn plan_ingress(
        &self,
        t: &ForwardingTable,
        inner: InnerPacket<&[u8]>,
        agent: Ipv4Addr,
        tail: &mut [u8],
        tail_at: usize,
    ) -> Ingress<'_> {
        let c = &self.counters;
        // An agent speaks only for its own address: no spoofing through PON.
        if inner.src() != IpAddr::V4(agent) {
            return Ingress::Drop(&c.drop_spoofed_source);
        }
        let dst = inner.dst();
        if let Some(local) = t.agent(dst) {
            return Ingress::Local(local);
        }
        let flow_id = pon_proto::flow::flow_hash(&inner);
        let Some(proxy) = t.egress_for(dst, flow_id) else {
            return Ingress::Drop(&c.drop_no_destination);
        };
        let Some(hops) = t.route(proxy) else {
            return Ingress::Drop(&c.drop_no_route);
        };
        let Some(first) = t.peer_addr(hops.as_slice()[0]) else {
            return Ingress::Drop(&c.drop_unknown_next_hop);
        };
        let header = pon::Repr {
            kind: Kind::Data,
            hop_limit: self.hop_limit,
            hop_index: 0,
            flow_id,
            source: t.my_id(),
            hops,
        };
        let path_mtu =
            self.underlay_mtu - UDP_OVERHEAD - header.header_len() - header.trailer_len();
        if inner.len() > path_mtu && inner.dont_fragment() {
            return self.frag_needed(t, &inner, tail, tail_at, path_mtu);
        }
        Ingress::Peer(header, first)
    }

    /// Entry into the overlay, second half: carries out the plan, writing
    /// the PON header in front of the inner packet `buf[is..ie]` and
    /// sealing it.
    fn ingress(
        &self,
        t: &ForwardingTable,
        s: &SessionTable,
        buf: &mut [u8],
        is: usize,
        ie: usize,
        plan: Ingress,
    ) -> Decision {
        let c = &self.counters;
        let (header, first) = match plan {
            Ingress::Drop(counter) => return drop(counter),
            Ingress::Local(agent) => return self.to_agent(t, agent, buf, is, ie, &c.local),
            Ingress::Icmp(sender, s, e) => {
                return self.to_agent(t, sender, buf, s, e, &c.frag_needed)
            }
            Ingress::Peer(header, first) => (header, first),
        };
        let hlen = header.header_len();
        let end = ie + header.trailer_len();
        if is < hlen || end > buf.len() {
            return drop(&c.drop_no_room);
        }
        if header.emit(&mut buf[is - hlen..is]).is_err() {
            return drop(&c.drop_no_room);
        }
        if let Err(e) = seal(s, buf, is - hlen, end) {
            return self.seal_failed(e);
        }
        if let Some(traffic) = t.traffic(header.hops.last()) {
            traffic.on_sent();
        }
        c.ingress.inc();
        Decision {
            output: Output::Peer(first),
            range: is - hlen..end,
        }
    }

    /// A packet the proxy core made (probe, reply, handshake message,
    /// keepalive) in `buf[start..end]`, trailer room included: sealed as
    /// ingress seals data. Returns the first hop's address.
    pub fn seal_local(
        &self,
        t: &ForwardingTable,
        s: &SessionTable,
        buf: &mut [u8],
        start: usize,
        end: usize,
    ) -> Result<SocketAddr, SealError> {
        let first = pon::Packet::new_checked(&buf[start..end])
            .map_err(|_| SealError::Malformed)?
            .current_hop();
        let addr = t.peer_addr(first).ok_or(SealError::UnknownNextHop)?;
        seal(s, buf, start, end)?;
        Ok(addr)
    }

    /// Answers a DF packet that does not fit the path with ICMP
    /// "fragmentation needed", delivered to the sender through its RA, so
    /// that path-MTU discovery works across the overlay. The error is
    /// written into `tail`, the buffer after the packet (offset `tail_at`).
    fn frag_needed(
        &self,
        t: &ForwardingTable,
        inner: &InnerPacket<&[u8]>,
        tail: &mut [u8],
        tail_at: usize,
        mtu: usize,
    ) -> Ingress<'_> {
        let c = &self.counters;
        if tail.len() < IPV4_HEADER_LEN + FRAG_NEEDED_MAX_LEN {
            return Ingress::Drop(&c.drop_too_big);
        }
        let Some(original) = inner.as_ipv4() else {
            // IPv6 senders would need "packet too big"; not carried yet.
            return Ingress::Drop(&c.drop_too_big);
        };
        if !ip::icmp_error_allowed(original) {
            return Ingress::Drop(&c.drop_too_big);
        }
        let Some(sender) = t.agent(IpAddr::V4(original.src())) else {
            return Ingress::Drop(&c.drop_too_big);
        };
        let mtu = mtu.min(usize::from(u16::MAX)) as u16;
        // Room for the outer header to the sender's RA is kept in front.
        match ip::emit_frag_needed(original, mtu, self.local_addr, &mut tail[IPV4_HEADER_LEN..]) {
            Ok(n) => {
                let s = tail_at + IPV4_HEADER_LEN;
                Ingress::Icmp(sender, s, s + n)
            }
            Err(_) => Ingress::Drop(&c.drop_too_big),
        }
    }

    /// A PON packet from a peer proxy: authenticate it, then relay it,
    /// hand it to an agent, or to the proxy core.
    pub fn from_peer(
        &self,
        t: &ForwardingTable,
        s: &SessionTable,
        buf: &mut [u8],
        start: usize,
        len: usize,
        src: SocketAddr,
    ) -> Decision {
        self.from_peer_at(t, s, buf, start, len, src, &mut None)
    }

    /// [`Engine::from_peer`], which also sets `moved` to the neighbour that
    /// sent the datagram when it authenticated from an address other than
    /// the table's for that neighbour: the peer roamed (NAT rebinding, a
    /// new address), and the control side follows it. Peers are known by
    /// their keys, not by their addresses: any address may send, only
    /// what authenticates is taken.
    #[allow(clippy::too_many_arguments)]
    pub fn from_peer_at(
        &self,
        t: &ForwardingTable,
        s: &SessionTable,
        buf: &mut [u8],
        start: usize,
        len: usize,
        src: SocketAddr,
        moved: &mut Option<u32>,
    ) -> Decision {
        let c = &self.counters;
        c.rx_peer.inc();
        let end = match end_of(buf, start, len) {
            Ok(e) => e,
            Err(e) => return self.malformed(e),
        };
        let mut p = match pon::Packet::new_checked(&mut buf[start..end]) {
            Ok(p) => p,
            Err(e) => return self.malformed(e),
        };
        if p.current_hop() != t.my_id() {
            return drop(&c.drop_not_for_me);
        }
        // No proxy sends a hop limit above the configured one, nor a route
        // through the same proxy twice: either would let a packet
        // circulate, each pass costing every proxy on the loop.
        if p.hop_limit() > self.hop_limit {
            return drop(&c.drop_hop_limit_above_max);
        }
        if p.has_repeated_hop() {
            return drop(&c.drop_repeated_hop);
        }
        // The leg: a relayed route's datagram carries its sender's tag.
        if let Some((index, counter)) = p.link() {
            let Some(session) = s.session(index) else {
                return drop(&c.drop_unknown_session);
            };
            if session.peer() != p.previous_hop() {
                return drop(&c.drop_wrong_peer);
            }
            let Some((body, tag)) = p.link_tagged() else {
                return drop(&c.drop_bad_tag);
            };
            if let Err(e) = session.verify(counter, body, tag) {
                return self.open_failed(e);
            }
            note_sender(t, p.previous_hop(), src, moved);
        }
        if let Some(next) = p.next_hop() {
            let Some(addr) = t.peer_addr(next) else {
                return drop(&c.drop_unknown_next_hop);
            };
            if p.advance().is_none() {
                return drop(&c.drop_hop_limit);
            }
            if let Err(e) = link(s, &mut p, next) {
                return self.seal_failed(e);
            }
            c.transit.inc();
            return Decision {
                output: Output::Peer(addr),
                range: start..end,
            };
        }
        let kind = p.kind();
        if !kind.is_sealed() {
            // Handshake messages: the Noise handshake authenticates them.
            return self.to_core(kind, start, end);
        }
        if let Err(e) = self.open(s, &mut p) {
            return e;
        }
        let (source, counter) = (p.source(), p.seal_counter());
        if !p.has_link() {
            // A direct route: the seal was the sender's authentication.
            note_sender(t, source, src, moved);
        }
        let is = start + p.header_len();
        let ie = end - p.trailer_len();
        match kind {
            Kind::Data => {}
            Kind::Keepalive => return drop(&c.keepalives),
            Kind::Report if !self.has_monitor => return drop(&c.drop_no_monitor),
            _ => return self.to_core(kind, start, end),
        }
        let inner = match InnerPacket::new_checked(&buf[is..ie]) {
            Ok(i) => i,
            Err(e) => return self.malformed(e),
        };
        // Allowed IPs: a proxy speaks only for the sources it serves.
        if !t.serves(inner.src(), source) {
            return drop(&c.drop_foreign_source);
        }
        // It came over the overlay from `source`: what the next report to
        // it confirms (counted whether or not the RA then takes it).
        if let Some(traffic) = t.traffic(source) {
            traffic.on_received(counter);
        }
        let Some(agent) = t.agent(inner.dst()) else {
            return drop(&c.drop_no_destination);
        };
        self.to_agent(t, agent, buf, is, ie, &c.egress)
    }

    /// Opens the seal of a packet that ends here: it must come from its
    /// claimed source, under a session with it.
    #[inline]
    fn open(&self, s: &SessionTable, p: &mut pon::Packet<&mut [u8]>) -> Result<(), Decision> {
        let c = &self.counters;
        let session: &Session = s
            .session(p.seal_index())
            .ok_or_else(|| drop(&c.drop_unknown_session))?;
        if session.peer() != p.source() {
            return Err(drop(&c.drop_wrong_peer));
        }
        let counter = p.seal_counter();
        let mut aad = [0u8; MAX_SEAL_AAD_LEN];
        let aad = p.seal_aad(&mut aad);
        session
            .open(counter, aad, p.sealed_mut())
            .map_err(|e| self.open_failed(e))
    }

    fn to_core(&self, kind: Kind, start: usize, end: usize) -> Decision {
        let c = &self.counters;
        if !self.has_monitor && matches!(kind, Kind::Probe | Kind::ProbeReply) {
            return drop(&c.drop_no_monitor);
        }
        if kind.is_sealed() {
            c.probes_local.inc();
        } else {
            c.handshakes_local.inc();
        }
        Decision {
            output: Output::Core(kind),
            range: start..end,
        }
    }

    /// Sends `buf[s..e]` (an inner packet) to an agent's RA; on the UDP
    /// leg sealed with the key the agent shares with this proxy (header
    /// written in front, tag after). Counted in `stage` once it can go (a
    /// packet that cannot is counted as a drop only: one counter per packet).
    fn to_agent(
        &self,
        t: &ForwardingTable,
        agent: Agent,
        buf: &mut [u8],
        s: usize,
        e: usize,
        stage: &pon_telemetry::Counter,
    ) -> Decision {
        let d = match agent.encap {
            Encap::Udp { ra_port } => {
                let Some(link) = t.link(agent.addr) else {
                    return drop(&self.counters.drop_agent_no_key);
                };
                let end = e + lan::TAG_LEN;
                if s < lan::HEADER_LEN || end > buf.len() {
                    return drop(&self.counters.drop_no_room);
                }
                let start = s - lan::HEADER_LEN;
                if link.downlink.seal(&mut buf[start..end], e - s).is_none() {
                    return drop(&self.counters.drop_no_room);
                }
                Decision {
                    output: Output::AgentUdp(SocketAddrV4::new(agent.addr, ra_port)),
                    range: start..end,
                }
            }
            Encap::Ipip => {
                if s < IPV4_HEADER_LEN {
                    return drop(&self.counters.drop_no_room);
                }
                let outer = Ipv4Repr::ipip(self.local_addr, agent.addr, e - s);
                if outer.emit(&mut buf[s - IPV4_HEADER_LEN..s]).is_err() {
                    return drop(&self.counters.drop_too_big);
                }
                Decision {
                    output: Output::AgentIpip(agent.addr),
                    range: s - IPV4_HEADER_LEN..e,
                }
            }
        };
        stage.inc();
        d
    }
}

/// What ingress decided about an inner packet while its view was held.
enum Ingress<'c> {
    Drop(&'c pon_telemetry::Counter),
    /// Both ends are agents of this proxy.
    Local(Agent),
    /// An ICMP error at `buf[s..e]` for the sender.
    Icmp(Agent, usize, usize),
    Peer(pon::Repr, SocketAddr),
}

#[cfg(test)]
mod tests;
