//! The forwarding table: who our peers and local agents are, which proxy
//! serves each destination, and the source route to each proxy. Built once,
//! read lock-free per packet, replaced whole by the control side.

use arc_swap::ArcSwap;
use ipnet::IpNet;
use pon_proto::pon::{Hops, MAX_HOPS};
use rustc_hash::FxHashMap as HashMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr, SocketAddrV4};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

/// The table the data path reads. `load()` per packet is wait-free and
/// allocation-free; `store()` from the control side swaps it atomically.
pub type SharedTable = Arc<ArcSwap<ForwardingTable>>;

pub use pon_proto::Encap;

/// An app VM behind this proxy: its TA sends to us, its RA receives from us.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Agent {
    pub addr: Ipv4Addr,
    pub encap: Encap,
    /// The agent's static X25519 key (the CU vouches for it, or the static
    /// configuration names it): its site-LAN legs and steering are
    /// authenticated with the key it shares with this proxy.
    pub key: Option<pon_proto::control::PublicKey>,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum TableError {
    #[error("proxy id 0 is reserved")]
    ZeroId,
    #[error("peer {0} is this proxy itself")]
    PeerIsSelf(u32),
    #[error("peer id {0} appears twice")]
    DuplicatePeer(u32),
    #[error("peer address {0} appears twice")]
    DuplicatePeerAddr(SocketAddr),
    #[error("agent {0} appears twice")]
    DuplicateAgent(Ipv4Addr),
    #[error("destination {prefix} names proxy {proxy}, which is not a peer")]
    UnknownDestinationProxy { prefix: IpNet, proxy: u32 },
    #[error("route to {to} uses hop {hop}, which is not a peer")]
    UnknownHop { to: u32, hop: u32 },
    #[error("route to {0} has more than {MAX_HOPS} hops")]
    RouteTooLong(u32),
    #[error("route to {0} passes through this proxy")]
    RouteThroughSelf(u32),
    #[error("route to {to} passes through proxy {hop} twice")]
    RepeatedHop { to: u32, hop: u32 },
    #[error("destination {0} is served by more than {MAX_SITE_PROXIES} proxies")]
    TooManyProxies(IpNet),
}

/// Proxies that may serve one destination (the proxies of one site).
pub const MAX_SITE_PROXIES: usize = 8;

/// The proxies serving a set of destinations (the proxies of their site):
/// all of them, for allowed IPs, and those to send to, for ingress (the
/// ones the router can reach; all of them when it reaches none, so traffic
/// is still offered rather than dropped here). Fixed arrays: the data path
/// reads them per packet without following a pointer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EgressGroup {
    all: [u32; MAX_SITE_PROXIES],
    all_len: u8,
    live: [u32; MAX_SITE_PROXIES],
    live_len: u8,
}

impl EgressGroup {
    fn new(members: &[u32]) -> Self {
        let mut all = [0; MAX_SITE_PROXIES];
        all[..members.len()].copy_from_slice(members);
        EgressGroup {
            all,
            all_len: members.len() as u8,
            live: all,
            live_len: members.len() as u8,
        }
    }
    /// Every proxy of the group.
    pub fn all(&self) -> &[u32] {
        &self.all[..usize::from(self.all_len)]
    }
    /// The proxies ingress sends to.
    pub fn live(&self) -> &[u32] {
        &self.live[..usize::from(self.live_len)]
    }
    fn set_unreachable(&mut self, unreachable: &std::collections::BTreeSet<u32>) {
        let mut n = 0;
        for i in 0..usize::from(self.all_len) {
            let p = self.all[i];
            if !unreachable.contains(&p) {
                self.live[n] = p;
                n += 1;
            }
        }
        if n == 0 {
            self.live = self.all;
            n = self.all().len();
        }
        self.live_len = n as u8;
    }
}

// The maps are keyed by addresses and ids and hashed with FxHash: a lookup
// per packet costs a few nanoseconds instead of SipHash's tens. Flooding
// cannot exploit the weaker hash: the data path only reads these maps, and
// they are built by the control side from a bounded, trusted set.

/// Longest-prefix match: host routes in a hash map (the common case: the CU
/// hands out app VM addresses), shorter prefixes scanned longest first.
#[derive(Debug, Default, Clone)]
pub struct PrefixTable {
    hosts: HashMap<IpAddr, u32>,
    nets: Vec<(IpNet, u32)>,
}

impl PrefixTable {
    pub fn insert(&mut self, net: IpNet, value: u32) {
        let net = net.trunc();
        if net.prefix_len() == net.max_prefix_len() {
            self.hosts.insert(net.addr(), value);
        } else {
            self.nets.retain(|(n, _)| *n != net);
            self.nets.push((net, value));
            self.nets
                .sort_by_key(|(n, _)| std::cmp::Reverse(n.prefix_len()));
        }
    }
    #[inline]
    pub fn lookup(&self, addr: IpAddr) -> Option<u32> {
        if let Some(v) = self.hosts.get(&addr) {
            return Some(*v);
        }
        self.nets
            .iter()
            .find(|(n, _)| n.contains(&addr))
            .map(|(_, v)| *v)
    }
    pub fn len(&self) -> usize {
        self.hosts.len() + self.nets.len()
    }
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
    pub fn iter(&self) -> impl Iterator<Item = (IpNet, u32)> + '_ {
        self.hosts
            .iter()
            .map(|(a, v)| (IpNet::from(*a), *v))
            .chain(self.nets.iter().copied())
    }
}

/// The site-LAN keys of one agent (`pon_tunnel::lan`): what checks the
/// datagrams its TA sends on the UDP leg, and what seals those to its RA.
/// Kept by the control side across table rebuilds (its replay window and
/// counter must not restart), shared by every table that names the agent.
pub struct AgentLink {
    pub uplink: pon_tunnel::lan::LanReceiver,
    pub downlink: pon_tunnel::lan::LanSender,
}

impl std::fmt::Debug for AgentLink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AgentLink")
            .field("epoch", &self.downlink.epoch())
            .finish_non_exhaustive()
    }
}

/// Data packets exchanged with one peer proxy, counted by the data path
/// (relaxed atomics: one add per packet, no lock) and read by the control
/// side, which reports what arrived (egress) and watches what it confirms
/// (ingress): the passive measurement that replaces keepalive probes on
/// routes that carry traffic. Kept across table rebuilds like
/// [`AgentLink`], so the counts never restart within a run.
#[derive(Debug, Default)]
pub struct PeerTraffic {
    /// Data packets this proxy sealed for the peer as their egress.
    pub sent: AtomicU64,
    /// Data packets from the peer that ended here (seal opened, source
    /// allowed).
    pub received: AtomicU64,
    /// The highest seal counter among them.
    pub highest_counter: AtomicU64,
}

impl PeerTraffic {
    #[inline]
    pub fn on_sent(&self) {
        self.sent.fetch_add(1, Ordering::Relaxed);
    }
    #[inline]
    pub fn on_received(&self, counter: u64) {
        self.received.fetch_add(1, Ordering::Relaxed);
        self.highest_counter.fetch_max(counter, Ordering::Relaxed);
    }
}

#[derive(Debug, Clone)]
pub struct ForwardingTable {
    my_id: u32,
    peers_by_id: HashMap<u32, SocketAddr>,
    peers_by_addr: HashMap<SocketAddr, u32>,
    agents: HashMap<Ipv4Addr, Agent>,
    /// Keys of the agents' UDP legs; an agent without one gets none of them.
    links: HashMap<Ipv4Addr, Arc<AgentLink>>,
    /// Data counters per peer; a peer without one is not counted.
    traffic: HashMap<u32, Arc<PeerTraffic>>,
    /// Destination prefix → index into `groups`.
    destinations: PrefixTable,
    groups: Vec<EgressGroup>,
    routes: HashMap<u32, Hops>,
    /// Prefixes of clouds that no proxy serves now: the TAs are steered to
    /// the plain IP path for them (they intercept every cloud's grant).
    unserved: Vec<IpNet>,
}

impl ForwardingTable {
    /// Builds and validates a table. `destinations` maps prefixes to the
    /// proxies serving them (a prefix listed with several proxies is served
    /// by each: the proxies of one site). `routes` maps a destination proxy
    /// to the relays in front of it; proxies without an entry are reached
    /// directly.
    pub fn build(
        my_id: u32,
        peers: &[(u32, SocketAddr)],
        agents: &[Agent],
        destinations: &[(IpNet, u32)],
        relays: &[(u32, Vec<u32>)],
    ) -> Result<Self, TableError> {
        if my_id == 0 {
            return Err(TableError::ZeroId);
        }
        let mut t = ForwardingTable {
            my_id,
            peers_by_id: HashMap::default(),
            peers_by_addr: HashMap::default(),
            agents: HashMap::default(),
            links: HashMap::default(),
            traffic: HashMap::default(),
            destinations: PrefixTable::default(),
            groups: Vec::new(),
            routes: HashMap::default(),
            unserved: Vec::new(),
        };
        for &(id, addr) in peers {
            if id == 0 {
                return Err(TableError::ZeroId);
            }
            if id == my_id {
                return Err(TableError::PeerIsSelf(id));
            }
            if t.peers_by_id.insert(id, addr).is_some() {
                return Err(TableError::DuplicatePeer(id));
            }
            if t.peers_by_addr.insert(addr, id).is_some() {
                return Err(TableError::DuplicatePeerAddr(addr));
            }
            t.routes.insert(id, Hops::new(&[id]).expect("one hop fits"));
        }
        for a in agents {
            if t.agents.insert(a.addr, *a).is_some() {
                return Err(TableError::DuplicateAgent(a.addr));
            }
        }
        let mut serving: std::collections::BTreeMap<IpNet, Vec<u32>> = Default::default();
        for &(prefix, proxy) in destinations {
            if !t.peers_by_id.contains_key(&proxy) {
                return Err(TableError::UnknownDestinationProxy { prefix, proxy });
            }
            serving.entry(prefix.trunc()).or_default().push(proxy);
        }
        // One group per distinct set of proxies: a site's prefixes share it.
        let mut group_of: std::collections::HashMap<Vec<u32>, u32> = Default::default();
        for (prefix, mut proxies) in serving {
            proxies.sort_unstable();
            proxies.dedup();
            if proxies.len() > MAX_SITE_PROXIES {
                return Err(TableError::TooManyProxies(prefix));
            }
            let next = t.groups.len() as u32;
            let g = *group_of.entry(proxies.clone()).or_insert(next);
            if g == next {
                t.groups.push(EgressGroup::new(&proxies));
            }
            t.destinations.insert(prefix, g);
        }
        for (to, via) in relays {
            let mut hops: Vec<u32> = via.clone();
            hops.push(*to);
            for (i, &hop) in hops.iter().enumerate() {
                if hop == my_id {
                    return Err(TableError::RouteThroughSelf(*to));
                }
                if hops[..i].contains(&hop) {
                    return Err(TableError::RepeatedHop { to: *to, hop });
                }
                if !t.peers_by_id.contains_key(&hop) {
                    return Err(TableError::UnknownHop { to: *to, hop });
                }
            }
            let route = Hops::new(&hops).ok_or(TableError::RouteTooLong(*to))?;
            t.routes.insert(*to, route);
        }
        Ok(t)
    }

    pub fn my_id(&self) -> u32 {
        self.my_id
    }
    #[inline]
    pub fn peer_addr(&self, id: u32) -> Option<SocketAddr> {
        self.peers_by_id.get(&id).copied()
    }
    #[inline]
    pub fn peer_id(&self, addr: &SocketAddr) -> Option<u32> {
        self.peers_by_addr.get(addr).copied()
    }
    /// Peer `id` is now at `addr` (it roamed: its authenticated packets
    /// come from there). False if `id` is no peer or `addr` is another's.
    pub fn set_peer_addr(&mut self, id: u32, addr: SocketAddr) -> bool {
        let Some(old) = self.peers_by_id.get(&id).copied() else {
            return false;
        };
        if self
            .peers_by_addr
            .get(&addr)
            .is_some_and(|other| *other != id)
        {
            return false;
        }
        self.peers_by_addr.remove(&old);
        self.peers_by_addr.insert(addr, id);
        self.peers_by_id.insert(id, addr);
        true
    }
    #[inline]
    pub fn agent(&self, addr: IpAddr) -> Option<Agent> {
        match addr {
            IpAddr::V4(a) => self.agents.get(&a).copied(),
            IpAddr::V6(_) => None,
        }
    }
    /// The proxies serving `dst`.
    #[inline]
    pub fn group_for(&self, dst: IpAddr) -> Option<&EgressGroup> {
        let g = self.destinations.lookup(dst)?;
        self.groups.get(g as usize)
    }
    /// The egress proxy for `dst` and a packet of `flow`: one of the
    /// proxies serving `dst` that the router can reach, the same for every
    /// packet of the flow while that proxy stays reachable
    /// (`pon_proto::flow`).
    #[inline]
    pub fn egress_for(&self, dst: IpAddr, flow: u32) -> Option<u32> {
        pon_proto::flow::pick(flow, self.group_for(dst)?.live().iter().copied())
    }
    /// Whether `proxy` serves `addr` (allowed IPs at egress: a proxy speaks
    /// only for the sources its site has).
    #[inline]
    pub fn serves(&self, addr: IpAddr, proxy: u32) -> bool {
        self.group_for(addr)
            .is_some_and(|g| g.all().contains(&proxy))
    }
    /// Ingress stops sending to the proxies in `unreachable` where another
    /// proxy serves the same destinations (the router's verdicts: a dead
    /// proxy's flows move to the survivors of its site).
    pub fn set_unreachable(&mut self, unreachable: &std::collections::BTreeSet<u32>) {
        for g in &mut self.groups {
            g.set_unreachable(unreachable);
        }
    }
    /// Names the prefixes of clouds no proxy serves (see [`Self::unserved`]).
    pub fn set_unserved(&mut self, unserved: Vec<IpNet>) {
        self.unserved = unserved;
    }
    /// Prefixes of clouds without a proxy, which the overlay cannot reach.
    pub fn unserved(&self) -> &[IpNet] {
        &self.unserved
    }
    /// Every destination prefix with the proxies serving it.
    pub fn destination_groups(&self) -> impl Iterator<Item = (IpNet, &EgressGroup)> + '_ {
        self.destinations
            .iter()
            .filter_map(|(net, g)| Some((net, self.groups.get(g as usize)?)))
    }
    /// The source route to proxy `to` (hops after us, ending at `to`).
    #[inline]
    pub fn route(&self, to: u32) -> Option<Hops> {
        self.routes.get(&to).copied()
    }
    pub fn routes(&self) -> impl Iterator<Item = (u32, Hops)> + '_ {
        self.routes.iter().map(|(k, v)| (*k, *v))
    }
    /// How many destination prefixes the table has.
    pub fn destination_count(&self) -> usize {
        self.destinations.len()
    }
    pub fn agents(&self) -> impl Iterator<Item = &Agent> {
        self.agents.values()
    }
    /// Gives agent `addr` (one of the table's) the keys of its UDP legs.
    pub fn set_link(&mut self, addr: Ipv4Addr, link: Arc<AgentLink>) {
        if self.agents.contains_key(&addr) {
            self.links.insert(addr, link);
        }
    }
    /// The keys of agent `addr`'s UDP legs.
    #[inline]
    pub fn link(&self, addr: Ipv4Addr) -> Option<&AgentLink> {
        self.links.get(&addr).map(|l| &**l)
    }
    /// Gives peer `id` (one of the table's) its data counters.
    pub fn set_traffic(&mut self, id: u32, traffic: Arc<PeerTraffic>) {
        if self.peers_by_id.contains_key(&id) {
            self.traffic.insert(id, traffic);
        }
    }
    /// Peer `id`'s data counters.
    #[inline]
    pub fn traffic(&self, id: u32) -> Option<&PeerTraffic> {
        self.traffic.get(&id).map(|t| &**t)
    }
    /// The peers' ids.
    pub fn peer_ids(&self) -> impl Iterator<Item = u32> + '_ {
        self.peers_by_id.keys().copied()
    }
    pub fn peer_count(&self) -> usize {
        self.peers_by_id.len()
    }

    /// The table's size and routes as Prometheus gauges.
    pub fn render(&self, w: &mut pon_telemetry::PromWriter) {
        w.gauge(
            "pon_forwarder_peers",
            "",
            "Peer proxies in the table.",
            self.peer_count() as f64,
        );
        let dests = self.destinations.len() as f64;
        w.gauge(
            "pon_forwarder_destinations",
            "",
            "Destination prefixes in the table.",
            dests,
        );
        for (to, hops) in self.routes() {
            let labels = format!("to=\"{to}\",hops=\"{:?}\"", hops.as_slice());
            let help = "Hops of the source route to each proxy.";
            w.gauge("pon_forwarder_route_hops", &labels, help, hops.len() as f64);
        }
    }
}

/// The agent address a UDP-encapsulated agent leg is sent to.
pub fn agent_udp_addr(agent: &Agent) -> Option<SocketAddrV4> {
    match agent.encap {
        Encap::Udp { ra_port } => Some(SocketAddrV4::new(agent.addr, ra_port)),
        Encap::Ipip => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sa(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    #[test]
    fn longest_prefix_wins_and_hosts_are_exact() {
        let mut p = PrefixTable::default();
        p.insert("198.18.0.0/16".parse().unwrap(), 1);
        p.insert("198.18.2.0/24".parse().unwrap(), 2);
        p.insert("198.18.2.11/32".parse().unwrap(), 3);
        assert_eq!(p.lookup("198.18.2.11".parse().unwrap()), Some(3));
        assert_eq!(p.lookup("198.18.2.12".parse().unwrap()), Some(2));
        assert_eq!(p.lookup("198.18.9.1".parse().unwrap()), Some(1));
        assert_eq!(p.lookup("10.0.0.1".parse().unwrap()), None);
    }

    #[test]
    fn build_validates_references() {
        let peers = [(2, sa("198.18.2.1:7300")), (3, sa("198.18.3.1:7300"))];
        let ok = ForwardingTable::build(
            1,
            &peers,
            &[],
            &[("198.18.2.0/24".parse().unwrap(), 2)],
            &[(2, vec![3])],
        )
        .unwrap();
        assert_eq!(ok.route(2).unwrap().as_slice(), &[3, 2]);
        let mut w = pon_telemetry::PromWriter::new();
        ok.render(&mut w);
        let page = w.finish();
        assert!(
            page.contains("pon_forwarder_route_hops{to=\"2\",hops=\"[3, 2]\"} 2"),
            "{page}"
        );
        assert!(page.contains("pon_forwarder_peers 2"), "{page}");
        assert_eq!(ok.route(3).unwrap().as_slice(), &[3]);
        assert_eq!(
            ForwardingTable::build(1, &peers, &[], &[], &[(2, vec![4])]).unwrap_err(),
            TableError::UnknownHop { to: 2, hop: 4 }
        );
        assert_eq!(
            ForwardingTable::build(1, &peers, &[], &[], &[(2, vec![1])]).unwrap_err(),
            TableError::RouteThroughSelf(2)
        );
        assert_eq!(
            ForwardingTable::build(1, &peers, &[], &[], &[(2, vec![3, 2])]).unwrap_err(),
            TableError::RepeatedHop { to: 2, hop: 2 }
        );
        assert!(matches!(
            ForwardingTable::build(1, &peers, &[], &[("10.0.0.0/8".parse().unwrap(), 9)], &[]),
            Err(TableError::UnknownDestinationProxy { proxy: 9, .. })
        ));
        assert_eq!(
            ForwardingTable::build(1, &[(1, sa("198.18.1.1:7300"))], &[], &[], &[]).unwrap_err(),
            TableError::PeerIsSelf(1)
        );
    }

    #[test]
    fn a_site_with_two_proxies_gets_flows_on_both_and_loses_only_the_dead_ones() {
        let peers = [
            (2, sa("198.18.2.1:7300")),
            (3, sa("198.18.2.2:7300")),
            (4, sa("198.18.4.1:7300")),
        ];
        let site2: IpNet = "198.18.2.0/24".parse().unwrap();
        let mut t = ForwardingTable::build(
            1,
            &peers,
            &[],
            &[
                (site2, 3),
                (site2, 2),
                ("198.18.4.0/24".parse().unwrap(), 4),
            ],
            &[],
        )
        .unwrap();
        let dst: IpAddr = "198.18.2.11".parse().unwrap();
        let before: Vec<u32> = (0..64).map(|f| t.egress_for(dst, f).unwrap()).collect();
        assert!(before.contains(&2) && before.contains(&3), "{before:?}");
        // Both may send from the site's addresses; nobody else may.
        assert!(t.serves(dst, 2) && t.serves(dst, 3) && !t.serves(dst, 4));
        // 3 dies: its flows move to 2, 2's stay.
        t.set_unreachable(&[3].into());
        assert!((0..64).all(|f| t.egress_for(dst, f) == Some(2)));
        assert!(
            t.serves(dst, 3),
            "allowed IPs do not depend on reachability"
        );
        // Both unreachable: offered to all rather than dropped here.
        t.set_unreachable(&[2, 3].into());
        let all: Vec<u32> = (0..64).map(|f| t.egress_for(dst, f).unwrap()).collect();
        assert_eq!(all, before);
        t.set_unreachable(&Default::default());
        let back: Vec<u32> = (0..64).map(|f| t.egress_for(dst, f).unwrap()).collect();
        assert_eq!(back, before);
        let many: Vec<(IpNet, u32)> = (2..=10).map(|p| (site2, p)).collect();
        let peers: Vec<(u32, SocketAddr)> = (2..=10)
            .map(|p| (p, SocketAddr::from(([198, 18, 2, p as u8], 7300))))
            .collect();
        assert_eq!(
            ForwardingTable::build(1, &peers, &[], &many, &[]).unwrap_err(),
            TableError::TooManyProxies(site2)
        );
    }
}
