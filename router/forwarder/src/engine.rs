//! What the forwarder does with one packet, without doing any I/O: the
//! caller receives into a buffer with headroom, asks the engine, and sends
//! the bytes it is pointed at. Headers are added and removed in place, so no
//! packet is copied and nothing is allocated.

use super::table::{Agent, Encap, ForwardingTable, SharedTable};
use pon_proto::ip::{
    self, InnerPacket, Ipv4Packet, Ipv4Repr, FRAG_NEEDED_MAX_LEN, IPPROTO_IPIP, IPV4_HEADER_LEN,
    UDP_OVERHEAD,
};
use pon_proto::pon::{self, Kind, MAX_HEADER_LEN};
use std::net::{IpAddr, Ipv4Addr, SocketAddr, SocketAddrV4};
use std::ops::Range;
use std::sync::Arc;

/// Free bytes kept before a received packet so a PON or outer IPv4 header
/// can be written in front of it.
pub const HEADROOM: usize = MAX_HEADER_LEN;
/// Free bytes kept after a received packet for an ICMP error about it.
pub const TAILROOM: usize = IPV4_HEADER_LEN + FRAG_NEEDED_MAX_LEN;
/// Largest packet a socket read may return.
pub const MAX_PACKET: usize = 65535;
/// Size of one receive buffer.
pub const BUFFER_LEN: usize = HEADROOM + MAX_PACKET + TAILROOM;

pon_telemetry::counters! {
    /// Forwarder counters: every packet received ends in exactly one of the
    /// stage or drop counters.
    pub struct ForwarderCounters {
        rx_agent => ("pon_forwarder_rx_packets_total", "from=\"agent\"", "Packets received."),
        rx_peer => ("pon_forwarder_rx_packets_total", "from=\"peer\"", "Packets received."),
        ingress => ("pon_forwarder_packets_total", "stage=\"ingress\"", "Packets forwarded, by role of this proxy on their path."),
        transit => ("pon_forwarder_packets_total", "stage=\"transit\"", "Packets forwarded, by role of this proxy on their path."),
        egress => ("pon_forwarder_packets_total", "stage=\"egress\"", "Packets forwarded, by role of this proxy on their path."),
        local => ("pon_forwarder_packets_total", "stage=\"local\"", "Packets forwarded, by role of this proxy on their path."),
        frag_needed => ("pon_forwarder_icmp_frag_needed_total", "", "ICMP fragmentation-needed errors returned to senders."),
        drop_malformed => ("pon_forwarder_drops_total", "reason=\"malformed\"", "Packets dropped, by reason."),
        drop_unknown_agent => ("pon_forwarder_drops_total", "reason=\"unknown_agent\"", "Packets dropped, by reason."),
        drop_spoofed_source => ("pon_forwarder_drops_total", "reason=\"spoofed_source\"", "Packets dropped, by reason."),
        drop_unknown_peer => ("pon_forwarder_drops_total", "reason=\"unknown_peer\"", "Packets dropped, by reason."),
        drop_not_for_me => ("pon_forwarder_drops_total", "reason=\"not_for_me\"", "Packets dropped, by reason."),
        probes_local => ("pon_forwarder_packets_total", "stage=\"probe_local\"", "Packets forwarded, by role of this proxy on their path."),
        drop_no_monitor => ("pon_forwarder_drops_total", "reason=\"no_monitor\"", "Packets dropped, by reason."),
        drop_hop_limit => ("pon_forwarder_drops_total", "reason=\"hop_limit\"", "Packets dropped, by reason."),
        drop_no_destination => ("pon_forwarder_drops_total", "reason=\"no_destination\"", "Packets dropped, by reason."),
        drop_no_route => ("pon_forwarder_drops_total", "reason=\"no_route\"", "Packets dropped, by reason."),
        drop_unknown_next_hop => ("pon_forwarder_drops_total", "reason=\"unknown_next_hop\"", "Packets dropped, by reason."),
        drop_too_big => ("pon_forwarder_drops_total", "reason=\"too_big\"", "Packets dropped, by reason."),
        drop_no_room => ("pon_forwarder_drops_total", "reason=\"no_room\"", "Packets dropped, by reason."),
        rx_errors => ("pon_forwarder_socket_errors_total", "op=\"recv\"", "Socket errors."),
        tx_errors => ("pon_forwarder_socket_errors_total", "op=\"send\"", "Socket errors."),
        tx_packets => ("pon_forwarder_tx_packets_total", "", "Packets the kernel took to send; those it refused are in pon_forwarder_socket_errors_total{op=\"send\"}."),
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
    /// A probe or probe reply that ends here: for the local monitor.
    Monitor,
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
    pub counters: Arc<ForwarderCounters>,
    local_addr: Ipv4Addr,
    underlay_mtu: usize,
    hop_limit: u8,
    has_monitor: bool,
}

fn drop(counter: &pon_telemetry::Counter) -> Decision {
    counter.inc();
    Decision::DROP
}

impl Engine {
    pub fn new(table: SharedTable, local_addr: Ipv4Addr, underlay_mtu: u16, hop_limit: u8) -> Self {
        Engine {
            table,
            counters: Arc::default(),
            local_addr,
            underlay_mtu: usize::from(underlay_mtu),
            hop_limit,
            has_monitor: false,
        }
    }

    /// Hands probes that end here to a monitor (`Output::Monitor`) instead
    /// of dropping them.
    pub fn with_monitor(mut self) -> Self {
        self.has_monitor = true;
        self
    }

    /// An IP-in-IP packet from a local TA, as read from the raw socket into
    /// `buf[start..start + len]` (outer header included).
    pub fn from_agent_ipip(
        &self,
        t: &ForwardingTable,
        buf: &mut [u8],
        start: usize,
        len: usize,
    ) -> Decision {
        let c = &self.counters;
        c.rx_agent.inc();
        let Some(end) = start.checked_add(len).filter(|e| *e <= buf.len()) else {
            return drop(&c.drop_malformed);
        };
        let (outer, inner_len, header_len) = match ip::parse_ipip(&buf[start..end]) {
            Ok((outer, inner)) => (
                outer,
                inner.len(),
                Ipv4Packet::new_unchecked(&buf[start..end]).header_len(),
            ),
            Err(_) => return drop(&c.drop_malformed),
        };
        if outer.protocol != IPPROTO_IPIP || t.agent(IpAddr::V4(outer.src)).is_none() {
            return drop(&c.drop_unknown_agent);
        }
        let inner_start = start + header_len;
        self.ingress(t, buf, inner_start, inner_start + inner_len, outer.src)
    }

    /// An inner packet from a local TA using the UDP encapsulation.
    pub fn from_agent_udp(
        &self,
        t: &ForwardingTable,
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
        let Some(end) = start.checked_add(len).filter(|e| *e <= buf.len()) else {
            return drop(&c.drop_malformed);
        };
        self.ingress(t, buf, start, end, src_ip)
    }

    /// Entry into the overlay: find the egress proxy and its source route,
    /// and write the PON header in front of the inner packet.
    fn ingress(
        &self,
        t: &ForwardingTable,
        buf: &mut [u8],
        is: usize,
        ie: usize,
        agent: Ipv4Addr,
    ) -> Decision {
        let c = &self.counters;
        let inner = match InnerPacket::new_checked(&buf[is..ie]) {
            Ok(p) => p,
            Err(_) => return drop(&c.drop_malformed),
        };
        // An agent speaks only for its own address: no spoofing through PON.
        if inner.src() != IpAddr::V4(agent) {
            return drop(&c.drop_spoofed_source);
        }
        let dst = inner.dst();
        if let Some(local) = t.agent(dst) {
            c.local.inc();
            return self.to_agent(local, buf, is, ie);
        }
        let Some(proxy) = t.egress_for(dst) else {
            return drop(&c.drop_no_destination);
        };
        let Some(hops) = t.route(proxy) else {
            return drop(&c.drop_no_route);
        };
        let Some(first) = t.peer_addr(hops.as_slice()[0]) else {
            return drop(&c.drop_unknown_next_hop);
        };
        let header = pon::Repr {
            kind: Kind::Data,
            auth: false,
            hop_limit: self.hop_limit,
            hop_index: 0,
            flow_id: flow_hash(&buf[is..ie]),
            source: t.my_id(),
            hops,
        };
        let hlen = header.header_len();
        let path_mtu = self.underlay_mtu - UDP_OVERHEAD - hlen;
        if ie - is > path_mtu && inner.dont_fragment() {
            return self.frag_needed(t, buf, is, ie, path_mtu);
        }
        if is < hlen {
            return drop(&c.drop_no_room);
        }
        if header.emit(&mut buf[is - hlen..is]).is_err() {
            return drop(&c.drop_no_room);
        }
        c.ingress.inc();
        Decision {
            output: Output::Peer(first),
            range: is - hlen..ie,
        }
    }

    /// Answers a DF packet that does not fit the path with ICMP
    /// "fragmentation needed", delivered to the sender through its RA, so
    /// that path-MTU discovery works across the overlay.
    fn frag_needed(
        &self,
        t: &ForwardingTable,
        buf: &mut [u8],
        is: usize,
        ie: usize,
        mtu: usize,
    ) -> Decision {
        let c = &self.counters;
        let icmp_start = ie + IPV4_HEADER_LEN;
        if buf.len() < icmp_start + FRAG_NEEDED_MAX_LEN {
            return drop(&c.drop_too_big);
        }
        let (head, tail) = buf.split_at_mut(ie);
        let Ok(original) = Ipv4Packet::new_checked(&head[is..]) else {
            // IPv6 senders would need "packet too big"; not carried yet.
            return drop(&c.drop_too_big);
        };
        if !ip::icmp_error_allowed(&original) {
            return drop(&c.drop_too_big);
        }
        let Some(sender) = t.agent(IpAddr::V4(original.src())) else {
            return drop(&c.drop_too_big);
        };
        let mtu = mtu.min(usize::from(u16::MAX)) as u16;
        match ip::emit_frag_needed(
            &original,
            mtu,
            self.local_addr,
            &mut tail[IPV4_HEADER_LEN..],
        ) {
            Ok(n) => {
                c.frag_needed.inc();
                self.to_agent(sender, buf, icmp_start, icmp_start + n)
            }
            Err(_) => drop(&c.drop_too_big),
        }
    }

    /// A PON packet from a peer proxy: relay it, or hand it to the agent.
    pub fn from_peer(
        &self,
        t: &ForwardingTable,
        buf: &mut [u8],
        start: usize,
        len: usize,
        src: SocketAddr,
    ) -> Decision {
        let c = &self.counters;
        c.rx_peer.inc();
        if t.peer_id(&src).is_none() {
            return drop(&c.drop_unknown_peer);
        }
        let Some(end) = start.checked_add(len).filter(|e| *e <= buf.len()) else {
            return drop(&c.drop_malformed);
        };
        let mut p = match pon::Packet::new_checked(&mut buf[start..end]) {
            Ok(p) => p,
            Err(_) => return drop(&c.drop_malformed),
        };
        if p.current_hop() != t.my_id() {
            return drop(&c.drop_not_for_me);
        }
        if let Some(next) = p.next_hop() {
            let Some(addr) = t.peer_addr(next) else {
                return drop(&c.drop_unknown_next_hop);
            };
            if p.advance().is_none() {
                return drop(&c.drop_hop_limit);
            }
            c.transit.inc();
            return Decision {
                output: Output::Peer(addr),
                range: start..end,
            };
        }
        // Probes travel source routes like data; where they end, the
        // monitor answers or reads them.
        if p.kind() != Kind::Data {
            if !self.has_monitor {
                return drop(&c.drop_no_monitor);
            }
            c.probes_local.inc();
            return Decision {
                output: Output::Monitor,
                range: start..end,
            };
        }
        let is = start + p.header_len();
        // new_checked verified the payload is an IP packet.
        let dst = InnerPacket::new_checked(&buf[is..end]).map(|p| p.dst());
        let Some(agent) = dst.ok().and_then(|d| t.agent(d)) else {
            return drop(&c.drop_no_destination);
        };
        c.egress.inc();
        self.to_agent(agent, buf, is, end)
    }

    /// Sends `buf[s..e]` (an inner packet) to an agent's RA.
    fn to_agent(&self, agent: Agent, buf: &mut [u8], s: usize, e: usize) -> Decision {
        match agent.encap {
            Encap::Udp { ra_port } => Decision {
                output: Output::AgentUdp(SocketAddrV4::new(agent.addr, ra_port)),
                range: s..e,
            },
            Encap::Ipip => {
                if s < IPV4_HEADER_LEN {
                    return drop(&self.counters.drop_no_room);
                }
                let outer = Ipv4Repr {
                    src: self.local_addr,
                    dst: agent.addr,
                    protocol: IPPROTO_IPIP,
                    ttl: 64,
                    dont_fragment: false,
                    payload_len: e - s,
                };
                if outer.emit(&mut buf[s - IPV4_HEADER_LEN..s]).is_err() {
                    return drop(&self.counters.drop_too_big);
                }
                Decision {
                    output: Output::AgentIpip(agent.addr),
                    range: s - IPV4_HEADER_LEN..e,
                }
            }
        }
    }
}

/// A flow id from the inner addresses and protocol (FNV-1a), so that later
/// stages (per-flow queues, multipath) can keep a flow's packets together.
fn flow_hash(inner: &[u8]) -> u32 {
    let fields: &[u8] = match inner[0] >> 4 {
        4 if inner.len() >= IPV4_HEADER_LEN => &inner[9..20],
        6 if inner.len() >= ip::IPV6_HEADER_LEN => &inner[6..40],
        _ => &[],
    };
    fields.iter().fold(0x811c_9dc5u32, |h, b| {
        (h ^ u32::from(*b)).wrapping_mul(0x0100_0193)
    })
}

#[cfg(test)]
mod tests;
