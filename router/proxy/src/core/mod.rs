//! The proxy core, without I/O (as quinn-proto is to quinn): the one place
//! where the forwarding table's inputs, the monitor and the router meet.
//!
//! It is three parts that talk only through typed [`LocalMsg`]s:
//!
//! - [`ForwarderPart`]: the one writer of the forwarding table. It composes
//!   the base (static configuration, or the CU's latest view) with the
//!   router's routes, tells the other parts the topology, hands probes that
//!   end here to the monitor and sends the monitor's packets, and steers
//!   the local TAs off destinations the overlay cannot reach.
//! - [`MonitorPart`]: the [`pon_monitor::Monitor`], probing on the
//!   router's requests and answering other monitors.
//! - [`RouterPart`]: the [`pon_routing::Router`], the keepalives on current
//!   routes, the bandwidth schedule and the probe accounting.
//!
//! Every input carries an explicit `now` (time since the daemon started);
//! every output leaves through one queue per part ([`Output`]). A part
//! never does I/O and never calls another part.
//!
//! [`ProxyCore`] is the three parts in one process: it delivers their
//! messages to each other at once, in order, and exposes what leaves the
//! proxy through `poll_transmit` (datagrams) and `poll_action` (tables to
//! store). The split daemons (pon-forwarder + pon-monitor + pon-router) run
//! the very same parts and carry the same messages as datagrams over the
//! local link, so both shapes behave alike by construction; the simulator
//! in `tests.rs` runs every scenario in both.

mod forwarder;
mod monitor;
mod rate;
mod router;
pub mod status;

pub use forwarder::{ForwarderPart, ForwarderPartConfig, PmonCounters};
pub use monitor::MonitorPart;
pub use router::{RouterPart, RouterPartConfig};
pub use status::{ForwarderStatus, MonitorStatus, Status, StatusPage};

use crate::forwarder::ForwardingTable;
use crate::ProxyConfig;
use pon_cu::view::View;
use pon_proto::local::LocalMsg;
use pon_telemetry::{PromWriter, Renderer};
use std::collections::VecDeque;
use std::net::{SocketAddr, SocketAddrV4};
use std::sync::Arc;
use std::time::Duration;

pon_telemetry::counters! {
    /// What the core's parts count, one set per process (shared by the
    /// three parts in pon-proxy; a split daemon renders its part's).
    pub struct CoreCounters {
        route_changes => ("pon_router_route_changes_total", "", "Routes written into the forwarding table."),
        peer_moves => ("pon_proxy_peer_moves_total", "", "Peers followed to a new address (their authenticated packets came from there: NAT rebinding, a new address)."),
        failovers => ("pon_router_failovers_total", "", "Moves off a route that stopped answering."),
        failover_checks => ("pon_router_failover_checks_total", "", "Probes sent at a failover, one on each alternative that looked alive, so that a dead destination is found at once rather than one alternative after another."),
        unreachable => ("pon_router_unreachable_total", "", "Destinations found unreachable over the overlay (traffic left to the IP path)."),
        reachable => ("pon_router_reachable_total", "", "Destinations reachable over the overlay again."),
        table_updates => ("pon_proxy_table_updates_total", "", "Forwarding tables stored."),
        table_errors => ("pon_proxy_table_errors_total", "", "Inputs that did not make a valid table (the last one is kept)."),
        steering_sent => ("pon_proxy_steering_messages_total", "", "Steering messages sent to local TAs."),
        unknown_hop => ("pon_proxy_monitor_drops_total", "reason=\"unknown_hop\"", "Monitor packets not sent, by reason."),
        reports_sent => ("pon_proxy_reports_total", "dir=\"sent\"", "Traffic reports (passive measurement) sent to peers whose data arrived here, and received from peers about ours."),
        reports_received => ("pon_proxy_reports_total", "dir=\"received\"", "Traffic reports (passive measurement) sent to peers whose data arrived here, and received from peers about ours."),
        bad_reports => ("pon_proxy_report_drops_total", "reason=\"malformed\"", "Traffic reports dropped after their seal opened, by reason."),
        report_unknown_peer => ("pon_proxy_report_drops_total", "reason=\"unknown_peer\"", "Traffic reports dropped after their seal opened, by reason."),
        passive_suspects => ("pon_router_passive_suspects_total", "", "Current routes whose traffic went unconfirmed by the egress's reports (fast keepalives started on them)."),
        unexpected_forwarder => ("pon_proxy_local_unexpected_total", "part=\"forwarder\"", "Inputs a part does not take from their sender (dropped)."),
        unexpected_monitor => ("pon_proxy_local_unexpected_total", "part=\"monitor\"", "Inputs a part does not take from their sender (dropped)."),
        unexpected_router => ("pon_proxy_local_unexpected_total", "part=\"router\"", "Inputs a part does not take from their sender (dropped)."),
    }
}

/// The three parts of a proxy: the addressees of local messages. Ordered:
/// of two parts, the lower takes the `for_proxy` side of their local-link
/// key (`pon_tunnel::lan`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Part {
    Forwarder,
    Monitor,
    Router,
}

/// A datagram that leaves the proxy.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Transmit {
    /// A PON packet of the proxy's own (probe, train packet, reply,
    /// handshake message, keepalive) with room for its tags, out of the
    /// proxy's peer socket once the data path has sealed it.
    Peer { to: SocketAddr, bytes: Vec<u8> },
    /// A steering message to a local TA.
    Steering { to: SocketAddrV4, bytes: Vec<u8> },
}

/// What a part wants done; the only way anything leaves a part.
#[derive(Debug, Clone)]
pub enum Output {
    Transmit(Transmit),
    /// Store this table (it replaces the forwarder's current one).
    Table(Arc<ForwardingTable>),
    /// Store these session keys (they replace the data path's).
    Sessions(Arc<pon_tunnel::SessionTable>),
    /// A message for another part of this proxy.
    Local {
        to: Part,
        msg: LocalMsg,
    },
    /// A checked PMon report for the CU: the forwarder part assembled it
    /// from a split router's parts, or the daemon took it from the status
    /// it publishes. The daemon offers it to its CU client, or (a split
    /// router) sends it to the forwarder (see `daemon::ReportTo`).
    Report(pon_proto::pmon::Report),
}

/// What the daemon around [`ProxyCore`] must do besides sending datagrams.
#[derive(Debug, Clone)]
pub enum Action {
    StoreTable(Arc<ForwardingTable>),
    StoreSessions(Arc<pon_tunnel::SessionTable>),
    Report(pon_proto::pmon::Report),
}

/// Forwarder, monitor and router of one proxy in one process.
pub struct ProxyCore {
    forwarder: ForwarderPart,
    monitor: MonitorPart,
    router: Option<RouterPart>,
    transmits: VecDeque<Transmit>,
    actions: VecDeque<Action>,
    /// Messages between the parts not yet delivered (kept to deliver in
    /// order, as the local link would).
    local: VecDeque<(Part, Part, LocalMsg)>,
}

impl ProxyCore {
    /// `session` tells this run's probes from a previous run's; `epoch`
    /// does the same for steering messages; `private_key` is the proxy's
    /// static key.
    pub fn new(cfg: &ProxyConfig, session: u32, epoch: u64, private_key: [u8; 32]) -> Self {
        let c = Arc::new(CoreCounters::default());
        let mut core = ProxyCore {
            forwarder: ForwarderPart::new(cfg.forwarder_part(epoch, private_key), c.clone()),
            monitor: MonitorPart::new(session, cfg.monitor.clone(), c.clone()),
            router: cfg.router_part().map(|r| RouterPart::new(r, c)),
            transmits: VecDeque::new(),
            actions: VecDeque::new(),
            local: VecDeque::new(),
        };
        core.deliver(Duration::ZERO);
        core
    }

    /// A probe, reply or handshake message that ended at this proxy (the
    /// whole PON packet), from `from`.
    pub fn handle_packet(&mut self, now: Duration, packet: Vec<u8>, from: SocketAddr) {
        self.forwarder.handle_arrived(now, packet, from);
        self.deliver(now);
    }

    /// Peer `peer` authenticated from `at`, where the table does not have it.
    pub fn handle_peer_moved(&mut self, now: Duration, peer: u32, at: SocketAddr) {
        self.forwarder.handle_peer_moved(now, peer, at);
        self.deliver(now);
    }

    /// The CU's latest view (CU mode).
    pub fn handle_view(&mut self, now: Duration, view: View) {
        self.forwarder.handle_view(now, view);
        self.deliver(now);
    }

    /// Runs whatever is due at `now`.
    pub fn handle_timeout(&mut self, now: Duration) {
        self.forwarder.handle_timeout(now);
        self.monitor.handle_timeout(now);
        if let Some(r) = &mut self.router {
            r.handle_timeout(now);
        }
        self.deliver(now);
    }

    /// When `handle_timeout` next has work.
    pub fn poll_timeout(&self) -> Option<Duration> {
        [
            self.forwarder.poll_timeout(),
            self.monitor.poll_timeout(),
            self.router.as_ref().and_then(|r| r.poll_timeout()),
        ]
        .into_iter()
        .flatten()
        .min()
    }

    pub fn poll_transmit(&mut self) -> Option<Transmit> {
        self.transmits.pop_front()
    }

    pub fn poll_action(&mut self) -> Option<Action> {
        self.actions.pop_front()
    }

    /// Moves every part's outputs until none is left: local messages to
    /// their part, the rest to the outer queues.
    fn deliver(&mut self, now: Duration) {
        loop {
            self.collect();
            let Some((from, to, msg)) = self.local.pop_front() else {
                return;
            };
            match to {
                Part::Forwarder => self.forwarder.handle_message(now, from, msg),
                Part::Monitor => self.monitor.handle_message(now, from, msg),
                // Without [routing] nobody asks for probes, so nothing is
                // meant for the router but the topology.
                Part::Router => {
                    if let Some(r) = &mut self.router {
                        r.handle_message(now, from, msg);
                    }
                }
            }
        }
    }

    fn collect(&mut self) {
        let parts: [(Part, &mut dyn Outputs); 3] = [
            (Part::Forwarder, &mut self.forwarder),
            (Part::Monitor, &mut self.monitor),
            match &mut self.router {
                Some(r) => (Part::Router, r),
                None => (Part::Router, &mut NoOutputs),
            },
        ];
        for (from, p) in parts {
            while let Some(o) = p.poll_output() {
                match o {
                    Output::Transmit(t) => self.transmits.push_back(t),
                    Output::Table(t) => self.actions.push_back(Action::StoreTable(t)),
                    Output::Sessions(s) => self.actions.push_back(Action::StoreSessions(s)),
                    Output::Report(r) => self.actions.push_back(Action::Report(r)),
                    Output::Local { to, msg } => self.local.push_back((from, to, msg)),
                }
            }
        }
    }

    pub fn forwarder(&self) -> &ForwarderPart {
        &self.forwarder
    }

    pub fn monitor(&self) -> &MonitorPart {
        &self.monitor
    }

    pub fn router(&self) -> Option<&RouterPart> {
        self.router.as_ref()
    }

    /// What `ponctl` and the status page show: the router's view of each
    /// destination, with the monitor's estimates and budget.
    pub fn status(&self, now: Duration) -> Status {
        let mut s = match &self.router {
            Some(r) => r.status(now),
            None => Status::default(),
        };
        s.id = self.forwarder.my_id();
        s.site_role = self.forwarder.site_role();
        s.tunnels = self.forwarder.tunnels(now);
        self.monitor.fill(now, &mut s);
        s
    }
}

/// A part's output queue, seen by whoever moves its outputs.
pub trait Outputs {
    fn poll_output(&mut self) -> Option<Output>;
}

/// What a daemon's event loop drives: [`ProxyCore`] in pon-proxy, one part
/// in each split daemon. Inputs a core does not take are counted by it and
/// dropped.
pub trait Core: Outputs {
    /// A probe, reply or handshake message that ended at this proxy, from
    /// `from` (from the forwarding threads).
    fn handle_packet(&mut self, now: Duration, packet: Vec<u8>, from: SocketAddr);
    /// A peer authenticated from an address the table does not have for it
    /// (parts without the table ignore it).
    fn handle_peer_moved(&mut self, _now: Duration, _peer: u32, _at: SocketAddr) {}
    /// The CU's latest view.
    fn handle_view(&mut self, now: Duration, view: View);
    /// A message from another part, over the local link.
    fn handle_local(&mut self, now: Duration, from: Part, msg: LocalMsg);
    fn handle_timeout(&mut self, now: Duration);
    fn poll_timeout(&self) -> Option<Duration>;
    /// Renders this core's counters (for the metrics endpoint's thread).
    fn metrics(&self) -> Renderer;
    /// Whether probes that end at this proxy have a monitor to go to here.
    fn has_monitor(&self) -> bool {
        false
    }
}

fn render_counters(c: &Arc<CoreCounters>) -> Renderer {
    let c = c.clone();
    Arc::new(move |w: &mut PromWriter| c.render(w))
}

impl Outputs for ProxyCore {
    fn poll_output(&mut self) -> Option<Output> {
        if let Some(a) = self.poll_action() {
            return Some(match a {
                Action::StoreTable(t) => Output::Table(t),
                Action::StoreSessions(s) => Output::Sessions(s),
                Action::Report(r) => Output::Report(r),
            });
        }
        self.poll_transmit().map(Output::Transmit)
    }
}

impl Core for ProxyCore {
    fn handle_packet(&mut self, now: Duration, packet: Vec<u8>, from: SocketAddr) {
        ProxyCore::handle_packet(self, now, packet, from)
    }
    fn handle_peer_moved(&mut self, now: Duration, peer: u32, at: SocketAddr) {
        ProxyCore::handle_peer_moved(self, now, peer, at)
    }
    fn handle_view(&mut self, now: Duration, view: View) {
        ProxyCore::handle_view(self, now, view)
    }
    /// pon-proxy has no local link: its parts talk in-process.
    fn handle_local(&mut self, _now: Duration, _from: Part, _msg: LocalMsg) {}
    fn handle_timeout(&mut self, now: Duration) {
        ProxyCore::handle_timeout(self, now)
    }
    fn poll_timeout(&self) -> Option<Duration> {
        ProxyCore::poll_timeout(self)
    }
    fn metrics(&self) -> Renderer {
        let (monitor, tunnels) = (self.monitor.metrics(), self.forwarder.tunnel_counters());
        Arc::new(move |w: &mut PromWriter| {
            monitor(w);
            tunnels.render(w);
        })
    }
    fn has_monitor(&self) -> bool {
        true
    }
}

impl Core for ForwarderPart {
    fn handle_packet(&mut self, now: Duration, packet: Vec<u8>, from: SocketAddr) {
        self.handle_arrived(now, packet, from)
    }
    fn handle_peer_moved(&mut self, now: Duration, peer: u32, at: SocketAddr) {
        ForwarderPart::handle_peer_moved(self, now, peer, at)
    }
    fn handle_view(&mut self, now: Duration, view: View) {
        ForwarderPart::handle_view(self, now, view)
    }
    fn handle_local(&mut self, now: Duration, from: Part, msg: LocalMsg) {
        self.handle_message(now, from, msg)
    }
    fn handle_timeout(&mut self, now: Duration) {
        ForwarderPart::handle_timeout(self, now)
    }
    fn poll_timeout(&self) -> Option<Duration> {
        ForwarderPart::poll_timeout(self)
    }
    fn metrics(&self) -> Renderer {
        let (counters, tunnels) = (render_counters(&self.counters), self.tunnel_counters());
        let pmon = self.pmon_counters.clone();
        Arc::new(move |w: &mut PromWriter| {
            counters(w);
            tunnels.render(w);
            pmon.render(w);
        })
    }
}

struct NoOutputs;

impl Outputs for NoOutputs {
    fn poll_output(&mut self) -> Option<Output> {
        None
    }
}

/// The monitor's and the router's parts take only local messages.
macro_rules! local_only_core {
    ($part:ty) => {
        impl Core for $part {
            fn handle_packet(&mut self, _now: Duration, _packet: Vec<u8>, _from: SocketAddr) {
                self.unexpected()
            }
            fn handle_view(&mut self, _now: Duration, _view: View) {
                self.unexpected()
            }
            fn handle_local(&mut self, now: Duration, from: Part, msg: LocalMsg) {
                self.handle_message(now, from, msg)
            }
            fn handle_timeout(&mut self, now: Duration) {
                <$part>::handle_timeout(self, now)
            }
            fn poll_timeout(&self) -> Option<Duration> {
                <$part>::poll_timeout(self)
            }
            fn metrics(&self) -> Renderer {
                <$part>::metrics(self)
            }
        }
    };
}

local_only_core!(MonitorPart);
local_only_core!(RouterPart);

#[cfg(test)]
mod tests;
