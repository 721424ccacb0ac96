//! The forwarder's part of the core: the one writer of the forwarding
//! table and of the session keys (it runs the tunnels' handshakes), the
//! monitor's door to the network and the TAs' steerer.

use super::{CoreCounters, Output, Outputs, Part, Transmit};
use crate::compose::{Composer, Steerer};
use crate::forwarder::{ForwarderConfig, ForwardingTable};
use pon_cu::view::View;
use pon_forwarder::{AgentLink, PeerTraffic};
use pon_proto::control::PublicKey;
use pon_proto::local::{LocalMsg, PmonAssembler, PmonDrop};
use pon_proto::measurement::TrafficSample;
use pon_proto::pon::{self, Hops, Kind};
use pon_proto::report;
use pon_tunnel::lan::{Channel, PairKey};
use pon_tunnel::{Timers, Tunnels};
use std::collections::{BTreeSet, HashMap, VecDeque};
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

/// The topology is re-sent this often: over the local link a datagram may
/// be lost, and a restarted monitor or router learns it within this time.
pub const TOPOLOGY_EVERY: Duration = Duration::from_secs(1);

/// The data counters are looked at this often: reports go out every
/// [`report::REPORT_EVERY_MS`], the router hears of changes at this pace
/// (a bound on how late it sees traffic start or a report arrive).
pub const TRAFFIC_EVERY: Duration = Duration::from_millis(50);

/// Samples per `Traffic` message, so that one fits a local datagram
/// whatever the number of peers.
const SAMPLES_PER_MESSAGE: usize = 64;

/// What a split proxy's forwarder counts of the router's PMon reports
/// (pon-proxy offers its own status's report and counts nothing here).
#[derive(Debug, Default)]
pub struct PmonCounters {
    /// Reports assembled, checked and offered to the CU client.
    pub passed: pon_telemetry::Counter,
    /// What was dropped, by [`PmonDrop::index`].
    pub dropped: [pon_telemetry::Counter; PmonDrop::KINDS],
}

impl PmonCounters {
    pub fn render(&self, w: &mut pon_telemetry::PromWriter) {
        w.counter(
            "pon_proxy_pmon_reports_total",
            "",
            "The router's PMon reports received whole over the local link, checked and offered to the CU client.",
            self.passed.get(),
        );
        for (why, c) in PmonDrop::labels().zip(&self.dropped) {
            w.counter(
                "pon_proxy_pmon_drops_total",
                &format!("reason=\"{why}\""),
                "PMon report parts or whole reports from the router dropped, by reason.",
                c.get(),
            );
        }
    }
}

/// What the passive measurement keeps per peer: the data path's counters
/// and what was last reported and told.
#[derive(Debug, Default)]
struct PeerWatch {
    counters: Arc<PeerTraffic>,
    /// As egress: `received` when we last reported to the peer.
    reported: u64,
    reported_at: Duration,
    /// As ingress: the peer's latest report of what it received from us.
    confirmed: u64,
    /// What the router was last told (`sent`, `confirmed`).
    told: (u64, u64),
}

#[derive(Debug, Clone)]
pub struct ForwarderPartConfig {
    pub forwarder: ForwarderConfig,
    /// Tells this run's steering messages from a previous run's.
    pub epoch: u64,
    /// UDP port of the local TAs' steering listeners (0: do not steer).
    pub steering_port: u16,
    pub steering_refresh: Duration,
    /// This proxy's static key (its identity to the other proxies).
    pub private_key: [u8; 32],
    pub timers: Timers,
}

pub struct ForwarderPart {
    composer: Composer,
    tunnels: Tunnels,
    /// Wall clock (Unix ns) at `now == 0`: handshake timestamps must grow
    /// across restarts.
    epoch: u64,
    steerer: Steerer,
    steering_port: u16,
    /// This run's site-LAN keys with each agent (by address and key),
    /// kept across table rebuilds so counters and replay windows go on.
    links: HashMap<(Ipv4Addr, PublicKey), Arc<AgentLink>>,
    private_key: [u8; 32],
    encrypt_lan: bool,
    /// The router's latest routes (`(to, relays)`) laid over the base.
    relays: Vec<(u32, Vec<u32>)>,
    unreachable: BTreeSet<u32>,
    /// Until the router has spoken, TAs intercept as configured.
    heard_router: bool,
    table: Option<Arc<ForwardingTable>>,
    next_topology: Duration,
    /// Per peer in the table: data counters, reports sent and heard.
    traffic: HashMap<u32, PeerWatch>,
    next_traffic: Duration,
    next_report: Duration,
    /// The router's PMon report, part by part (split proxy).
    pmon: PmonAssembler,
    pub pmon_counters: Arc<PmonCounters>,
    out: VecDeque<Output>,
    pub counters: Arc<CoreCounters>,
}

impl ForwarderPart {
    pub fn new(cfg: ForwarderPartConfig, counters: Arc<CoreCounters>) -> Self {
        let encrypt_lan = cfg.forwarder.encrypt_lan;
        let composer = Composer::new(cfg.forwarder);
        let tunnels = Tunnels::new(composer.my_id(), cfg.private_key, cfg.timers);
        let mut f = ForwarderPart {
            tunnels,
            epoch: cfg.epoch,
            steerer: Steerer::new(cfg.epoch, cfg.steering_refresh, cfg.private_key),
            steering_port: cfg.steering_port,
            links: HashMap::new(),
            private_key: cfg.private_key,
            encrypt_lan,
            relays: Vec::new(),
            unreachable: BTreeSet::new(),
            heard_router: false,
            table: None,
            next_topology: Duration::ZERO,
            traffic: HashMap::new(),
            next_traffic: Duration::ZERO,
            next_report: Duration::ZERO,
            pmon: PmonAssembler::default(),
            pmon_counters: Arc::default(),
            out: VecDeque::new(),
            counters,
            composer,
        };
        if !f.composer.cu_mode() {
            // Static mode: the table and the topology are known now.
            f.recompose(Duration::ZERO);
            f.send_topology(Duration::ZERO);
        }
        f
    }

    /// This proxy's id (0 in CU mode until the CU assigned one).
    pub fn my_id(&self) -> u32 {
        self.composer.my_id()
    }

    /// The table last stored.
    pub fn table(&self) -> Option<&Arc<ForwardingTable>> {
        self.table.as_ref()
    }

    /// This proxy's role among its site's proxies (CU mode).
    pub fn site_role(&self) -> Option<&'static str> {
        self.composer.site_role().map(|r| r.as_str())
    }

    /// pon-forwarder's status page.
    pub fn status(&self, now: Duration) -> super::status::ForwarderStatus {
        let t = self.table.as_deref();
        super::status::ForwarderStatus {
            id: self.my_id(),
            site_role: self.site_role(),
            routes: self.relays.clone(),
            unreachable: self.unreachable.iter().copied().collect(),
            routed: self.heard_router,
            peers: t.map_or(0, |t| t.peer_count()),
            destinations: t.map_or(0, |t| t.destination_count()),
            agents: t.map_or(0, |t| t.agents().count()),
            tunnels: self.tunnels.status(now),
        }
    }

    pub fn handle_view(&mut self, now: Duration, view: View) {
        self.composer.set_view(view);
        self.recompose(now);
        self.send_topology(now);
        self.steer(now);
    }

    /// A packet that ended here, already authenticated by the engine if
    /// sealed: a handshake message is the tunnels', a probe or reply the
    /// monitor's.
    pub fn handle_arrived(&mut self, now: Duration, packet: Vec<u8>, at: SocketAddr) {
        let Ok(p) = pon::Packet::new_checked(&packet[..]) else {
            self.counters.unexpected_forwarder.inc();
            return;
        };
        let (kind, from) = (p.kind(), p.source());
        let result = match kind {
            Kind::HandshakeInit => self.tunnels.handle_init(now, from, p.payload()),
            Kind::HandshakeResponse => self.tunnels.handle_response(now, from, p.payload()),
            // The engine ends these itself; nothing else sends them here.
            Kind::Data | Kind::Keepalive => {
                self.counters.unexpected_forwarder.inc();
                return;
            }
            Kind::Report => return self.handle_report(from, p.payload()),
            Kind::Probe | Kind::ProbeReply => {
                self.local(Part::Monitor, LocalMsg::Arrived(packet));
                return;
            }
        };
        match result {
            // The handshake authenticated the peer: a direct one came from
            // where it now is (our answer must go there: a peer whose
            // address changed while it had no session is found this way).
            Ok(()) if p.hop_count() == 1 => self.handle_peer_moved(now, from, at),
            Ok(()) => {}
            Err(e) => tracing::debug!(peer = from, ?kind, error = %e, "handshake message dropped"),
        }
        self.flush_tunnels();
    }

    /// A traffic report from `from`, whose seal the engine opened (so it
    /// is `from`'s: a forged one never gets here): what it received from
    /// us, the router's sign that our traffic gets through.
    fn handle_report(&mut self, from: u32, body: &[u8]) {
        let Ok(r) = report::Packet::new_checked(body) else {
            self.counters.bad_reports.inc();
            return;
        };
        let Some(w) = self.traffic.get_mut(&from) else {
            self.counters.report_unknown_peer.inc();
            return;
        };
        self.counters.reports_received.inc();
        w.confirmed = report::Repr::parse(&r).received;
    }

    /// Reports to the peers whose data reached us since the last one
    /// (egress), and the changed counters to the router (ingress).
    fn passive(&mut self, now: Duration) {
        if now >= self.next_report {
            self.next_report = now + Duration::from_millis(report::REPORT_EVERY_MS);
            let mut due = Vec::new();
            for (&peer, w) in &mut self.traffic {
                let received = w.counters.received.load(Ordering::Relaxed);
                if received == w.reported {
                    continue;
                }
                let window = now.saturating_sub(w.reported_at).as_millis();
                let r = report::Repr {
                    window_ms: window.min(u128::from(u32::MAX)) as u32,
                    received,
                    highest_counter: w.counters.highest_counter.load(Ordering::Relaxed),
                };
                (w.reported, w.reported_at) = (received, now);
                due.push((peer, r));
            }
            let mut body = [0u8; report::BODY_LEN];
            for (peer, r) in due {
                if r.emit(&mut body).is_ok() {
                    self.counters.reports_sent.inc();
                    self.send_to_peer(peer, Kind::Report, &body);
                }
            }
        }
        if now >= self.next_traffic {
            self.next_traffic = now + TRAFFIC_EVERY;
            let mut samples = Vec::new();
            for (&peer, w) in &mut self.traffic {
                let now_counts = (w.counters.sent.load(Ordering::Relaxed), w.confirmed);
                if now_counts != w.told {
                    w.told = now_counts;
                    samples.push(TrafficSample {
                        peer,
                        sent: now_counts.0,
                        confirmed: now_counts.1,
                    });
                }
            }
            for chunk in samples.chunks(SAMPLES_PER_MESSAGE) {
                self.local(Part::Router, LocalMsg::Traffic(chunk.to_vec()));
            }
        }
    }

    /// Peer `peer` authenticated a datagram from `at`: if that is not where
    /// the table has it, follow it (as WireGuard follows a roaming peer).
    pub fn handle_peer_moved(&mut self, now: Duration, peer: u32, at: SocketAddr) {
        let t = self.table.as_ref();
        let before = t.and_then(|t| t.peer_addr(peer));
        // Another peer's address is that peer's: two peers behind one NAT
        // address and port cannot both be reached, the first keeps it.
        let taken = t
            .and_then(|t| t.peer_id(&at))
            .is_some_and(|other| other != peer);
        if before == Some(at) || taken || !self.composer.peer_moved(peer, at) {
            return;
        }
        self.counters.peer_moves.inc();
        tracing::info!(peer, from = ?before, to = %at, "peer moved: following it");
        self.recompose(now);
    }

    /// What the tunnels want sent, and their new keys for the data path.
    fn flush_tunnels(&mut self) {
        // Keys first: a keepalive must be sealed with the session that was
        // just made, so the data path has to hold it before it is sent.
        if let Some(sessions) = self.tunnels.poll_table() {
            self.out.push_back(Output::Sessions(sessions));
        }
        while let Some(t) = self.tunnels.poll_transmit() {
            let (to, kind, body): (u32, Kind, &[u8]) = match &t {
                pon_tunnel::Transmit::Init { to, body } => (*to, Kind::HandshakeInit, body),
                pon_tunnel::Transmit::Response { to, body } => (*to, Kind::HandshakeResponse, body),
                pon_tunnel::Transmit::Keepalive { to } => (*to, Kind::Keepalive, &[]),
            };
            self.send_to_peer(to, kind, body);
        }
    }

    /// A packet of this proxy's own to `to`, along the current route (a
    /// handshake over a relay when the direct path is down). The daemon
    /// seals it on its way out.
    fn send_to_peer(&mut self, to: u32, kind: Kind, body: &[u8]) {
        let Some(table) = &self.table else { return };
        let hops = table
            .route(to)
            .or_else(|| Hops::new(&[to]))
            .expect("one hop is a valid route");
        let Some(addr) = table.peer_addr(hops.as_slice()[0]) else {
            self.counters.unknown_hop.inc();
            return;
        };
        let header = pon::Repr {
            kind,
            hop_limit: pon::DEFAULT_HOP_LIMIT,
            hop_index: 0,
            flow_id: 0,
            source: self.composer.my_id(),
            hops,
        };
        let mut bytes = vec![0u8; header.wire_len(body.len())];
        if header.emit(&mut bytes).is_err() {
            return;
        }
        let hl = header.header_len();
        bytes[hl..hl + body.len()].copy_from_slice(body);
        self.out
            .push_back(Output::Transmit(Transmit::Peer { to: addr, bytes }));
    }

    /// The tunnels' state, for `/status`.
    pub fn tunnels(&self, now: Duration) -> Vec<pon_tunnel::PeerStatus> {
        self.tunnels.status(now)
    }

    /// The tunnels' counters.
    pub fn tunnel_counters(&self) -> Arc<pon_tunnel::TunnelCounters> {
        self.tunnels.counters.clone()
    }

    pub fn handle_message(&mut self, now: Duration, from: Part, msg: LocalMsg) {
        match (from, msg) {
            (Part::Monitor, LocalMsg::Send { hop, packet }) => {
                match self.table.as_ref().and_then(|t| t.peer_addr(hop)) {
                    Some(to) => self
                        .out
                        .push_back(Output::Transmit(Transmit::Peer { to, bytes: packet })),
                    None => self.counters.unknown_hop.inc(),
                }
            }
            (
                Part::Router,
                LocalMsg::Routes {
                    relays,
                    unreachable,
                },
            ) => {
                let unreachable: BTreeSet<u32> = unreachable.into_iter().collect();
                let first = !std::mem::replace(&mut self.heard_router, true);
                let mut changed = false;
                if unreachable != self.unreachable || first {
                    // Ingress moves flows off unreachable proxies of a
                    // site with several (the table's egress groups).
                    changed = unreachable != self.unreachable;
                    self.unreachable = unreachable;
                    self.steerer.wake(now);
                }
                if relays != self.relays {
                    tracing::info!(routes = ?relays, "routes from the router");
                    self.relays = relays;
                    changed = true;
                }
                if changed {
                    self.recompose(now);
                }
                self.steer(now);
            }
            // The router's measurements, for the CU: checked here, as the
            // CU would, so that what the daemon offers is a valid report.
            (Part::Router, LocalMsg::Pmon(part)) => match self.pmon.push(part) {
                Ok(Some(report)) => {
                    self.pmon_counters.passed.inc();
                    self.out.push_back(Output::Report(report));
                }
                Ok(None) => {}
                Err(e) => self.pmon_counters.dropped[e.index()].add_and_warn(
                    1,
                    "PMon report from the router dropped",
                    &e,
                ),
            },
            _ => self.counters.unexpected_forwarder.inc(),
        }
    }

    pub fn handle_timeout(&mut self, now: Duration) {
        if now >= self.next_topology && (self.composer.my_id() != 0) {
            self.send_topology(now);
        }
        if self.table.is_some() {
            let wall = self.epoch.saturating_add(now.as_nanos() as u64);
            self.tunnels.handle_timeout(now, wall);
            self.flush_tunnels();
            self.passive(now);
        }
        self.steer(now);
    }

    pub fn poll_timeout(&self) -> Option<Duration> {
        let topology = (self.composer.my_id() != 0).then_some(self.next_topology);
        let steering = self.steerer.due().filter(|_| self.steers());
        let tunnels = self.table.as_ref().and(self.tunnels.poll_timeout());
        let passive = self
            .table
            .as_ref()
            .map(|_| self.next_traffic.min(self.next_report));
        [topology, steering, tunnels, passive]
            .into_iter()
            .flatten()
            .min()
    }

    fn local(&mut self, to: Part, msg: LocalMsg) {
        self.out.push_back(Output::Local { to, msg });
    }

    fn send_topology(&mut self, now: Duration) {
        self.next_topology = now + TOPOLOGY_EVERY;
        let (peers, optimise) = self.composer.topology();
        let msg = LocalMsg::Topology {
            id: self.composer.my_id(),
            peers,
            optimise,
            from_cu: self.composer.cu_mode(),
        };
        self.local(Part::Monitor, msg.clone());
        self.local(Part::Router, msg);
    }

    fn recompose(&mut self, now: Duration) {
        match self.composer.compose(&self.relays) {
            Ok(mut t) => {
                self.attach_links(&mut t);
                self.attach_traffic(&mut t);
                t.set_unreachable(&self.unreachable);
                tracing::info!(
                    id = t.my_id(),
                    peers = t.peer_count(),
                    destinations = t.destination_count(),
                    agents = t.agents().count(),
                    routes = ?self.relays,
                    "table updated"
                );
                let t = Arc::new(t);
                self.counters.table_updates.inc();
                self.table = Some(t.clone());
                self.out.push_back(Output::Table(t));
                // The peers the tunnels keep sessions with follow the
                // table: a peer gone from it (revoked) loses them at once.
                self.tunnels.set_my_id(now, self.composer.my_id());
                self.tunnels.set_peers(now, &self.composer.peer_keys());
                self.flush_tunnels();
                self.steerer.wake(now);
            }
            Err(e) => {
                self.counters.table_errors.inc();
                tracing::error!(error = %e, "cannot build the forwarding table; keeping the last one");
            }
        }
    }

    /// Gives each agent of `t` with a key its site-LAN keys: the ones it
    /// had, or new ones for this run.
    fn attach_links(&mut self, t: &mut ForwardingTable) {
        let agents: Vec<(Ipv4Addr, PublicKey)> = t
            .agents()
            .filter_map(|a| a.key.map(|k| (a.addr, k)))
            .collect();
        self.links.retain(|k, _| agents.contains(k));
        for (addr, key) in agents {
            let link = match self.links.get(&(addr, key)) {
                Some(l) => l.clone(),
                None => {
                    let Some(pair) = PairKey::for_proxy(&self.private_key, &key.0) else {
                        tracing::warn!(agent = %addr, "agent key shares no secret: its UDP legs are refused");
                        continue;
                    };
                    let link = Arc::new(AgentLink {
                        uplink: pair.receiver(Channel::Uplink),
                        downlink: pair.sender(Channel::Downlink, self.epoch, self.encrypt_lan),
                    });
                    self.links.insert((addr, key), link.clone());
                    link
                }
            };
            t.set_link(addr, link);
        }
    }

    /// Gives each peer of `t` its data counters: the ones it had (so the
    /// counts go on across rebuilds), or new ones.
    fn attach_traffic(&mut self, t: &mut ForwardingTable) {
        let peers: BTreeSet<u32> = t.peer_ids().collect();
        self.traffic.retain(|p, _| peers.contains(p));
        for p in peers {
            let w = self.traffic.entry(p).or_default();
            t.set_traffic(p, w.counters.clone());
        }
    }

    /// Steering starts once the router has spoken: until then, the TAs
    /// intercept as configured. In CU mode it starts with the first table,
    /// router or not: TAs intercept every cloud's grant, and only this
    /// proxy can tell them which clouds have no proxy to deliver to.
    fn steers(&self) -> bool {
        (self.heard_router || self.composer.cu_mode())
            && self.steering_port != 0
            && self.table.is_some()
    }

    fn steer(&mut self, now: Duration) {
        if !self.steers() {
            return;
        }
        let Some(table) = &self.table else {
            return;
        };
        let Some(msg) = self.steerer.message(now, table, &self.unreachable) else {
            return;
        };
        self.counters.steering_sent.inc();
        if msg.unkeyed > 0 {
            tracing::debug!(agents = msg.unkeyed, "agents without a key are not steered");
        }
        for (a, datagrams) in msg.to {
            let to = SocketAddrV4::new(a, self.steering_port);
            for bytes in datagrams {
                self.out
                    .push_back(Output::Transmit(Transmit::Steering { to, bytes }));
            }
        }
    }
}

impl Outputs for ForwarderPart {
    fn poll_output(&mut self) -> Option<Output> {
        self.out.pop_front()
    }
}
