//! The forwarder's part of the core: the one writer of the forwarding
//! table, the monitor's door to the network and the TAs' steerer.

use super::{CoreCounters, Output, Outputs, Part, Transmit};
use crate::compose::{Composer, Steerer};
use crate::forwarder::{ForwarderConfig, ForwardingTable};
use pon_cu::view::View;
use pon_proto::local::LocalMsg;
use std::collections::{BTreeSet, VecDeque};
use std::net::SocketAddrV4;
use std::sync::Arc;
use std::time::Duration;

/// The topology is re-sent this often: over the local link a datagram may
/// be lost, and a restarted monitor or router learns it within this time.
pub const TOPOLOGY_EVERY: Duration = Duration::from_secs(1);

#[derive(Debug, Clone)]
pub struct ForwarderPartConfig {
    pub forwarder: ForwarderConfig,
    /// Tells this run's steering messages from a previous run's.
    pub epoch: u64,
    /// UDP port of the local TAs' steering listeners (0: do not steer).
    pub steering_port: u16,
    pub steering_refresh: Duration,
}

pub struct ForwarderPart {
    composer: Composer,
    steerer: Steerer,
    steering_port: u16,
    /// The router's latest routes (`(to, relays)`) laid over the base.
    relays: Vec<(u32, Vec<u32>)>,
    unreachable: BTreeSet<u32>,
    /// Until the router has spoken, TAs intercept as configured.
    heard_router: bool,
    table: Option<Arc<ForwardingTable>>,
    next_topology: Duration,
    out: VecDeque<Output>,
    pub counters: Arc<CoreCounters>,
}

impl ForwarderPart {
    pub fn new(cfg: ForwarderPartConfig, counters: Arc<CoreCounters>) -> Self {
        let composer = Composer::new(cfg.forwarder);
        let mut f = ForwarderPart {
            steerer: Steerer::new(cfg.epoch, cfg.steering_refresh),
            steering_port: cfg.steering_port,
            relays: Vec::new(),
            unreachable: BTreeSet::new(),
            heard_router: false,
            table: None,
            next_topology: Duration::ZERO,
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

    /// pon-forwarder's status page.
    pub fn status(&self) -> super::status::ForwarderStatus {
        let t = self.table.as_deref();
        super::status::ForwarderStatus {
            id: self.my_id(),
            routes: self.relays.clone(),
            unreachable: self.unreachable.iter().copied().collect(),
            routed: self.heard_router,
            peers: t.map_or(0, |t| t.peer_count()),
            destinations: t.map_or(0, |t| t.destinations().len()),
            agents: t.map_or(0, |t| t.agents().count()),
        }
    }

    pub fn handle_view(&mut self, now: Duration, view: View) {
        self.composer.set_view(view);
        self.recompose(now);
        self.send_topology(now);
        self.steer(now);
    }

    /// A probe or reply that ended here: the monitor's.
    pub fn handle_arrived(&mut self, _now: Duration, packet: Vec<u8>) {
        self.local(Part::Monitor, LocalMsg::Arrived(packet));
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
                if unreachable != self.unreachable || first {
                    self.unreachable = unreachable;
                    self.steerer.wake(now);
                }
                if relays != self.relays {
                    tracing::info!(routes = ?relays, "routes from the router");
                    self.relays = relays;
                    self.recompose(now);
                }
                self.steer(now);
            }
            _ => self.counters.unexpected_forwarder.inc(),
        }
    }

    pub fn handle_timeout(&mut self, now: Duration) {
        if now >= self.next_topology && (self.composer.my_id() != 0) {
            self.send_topology(now);
        }
        self.steer(now);
    }

    pub fn poll_timeout(&self) -> Option<Duration> {
        let topology = (self.composer.my_id() != 0).then_some(self.next_topology);
        let steering = self.steerer.due().filter(|_| self.steers());
        [topology, steering].into_iter().flatten().min()
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
            Ok(t) => {
                tracing::info!(
                    id = t.my_id(),
                    peers = t.peer_count(),
                    destinations = t.destinations().len(),
                    agents = t.agents().count(),
                    routes = ?self.relays,
                    "table updated"
                );
                let t = Arc::new(t);
                self.counters.table_updates.inc();
                self.table = Some(t.clone());
                self.out.push_back(Output::Table(t));
                self.steerer.wake(now);
            }
            Err(e) => {
                self.counters.table_errors.inc();
                tracing::error!(error = %e, "cannot build the forwarding table; keeping the last one");
            }
        }
    }

    /// Steering starts once the router has spoken: until then, the TAs
    /// intercept as configured.
    fn steers(&self) -> bool {
        self.heard_router && self.steering_port != 0 && self.table.is_some()
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
        for a in msg.agents {
            let to = SocketAddrV4::new(a, self.steering_port);
            for bytes in &msg.datagrams {
                self.out.push_back(Output::Transmit(Transmit::Steering {
                    to,
                    bytes: bytes.clone(),
                }));
            }
        }
    }
}

impl Outputs for ForwarderPart {
    fn poll_output(&mut self) -> Option<Output> {
        self.out.pop_front()
    }
}
