//! The proxy's control core, without I/O: the one place where the monitor,
//! the router and the inputs of the forwarding table meet.
//!
//! It owns the [`Monitor`] and the [`Router`], and the two inputs of the
//! table: the base (static configuration, or the CU's latest view) and the
//! router's chosen routes. It is the only writer of the table (the daemon
//! stores what [`Control::take_table`] returns), so a CU update and a route
//! change can never race each other into the table.
//!
//! Fed with probe packets, CU views and ticks (each with an explicit `now`),
//! it returns packets to send, tables to store, and the steering message
//! for the local TAs (destinations the overlay cannot reach, to be left to
//! the IP path).

use super::compose::{Composer, Steerer, SteeringOut};
use super::config::ProxyConfig;
use crate::forwarder::ForwardingTable;
use pon_cu::view::View;
use pon_monitor::{Handled, Monitor, MonitorEvent, ProbeOutcome, Send};
use pon_proto::pon::Hops;
use pon_routing::{Outcome, Policy, ProbeRequest, Router, RouterEvent, RoutingConfig};
use serde::Serialize;
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::time::Duration;

pon_telemetry::counters! {
    pub struct ControlCounters {
        route_changes => ("pon_router_route_changes_total", "", "Routes written into the forwarding table."),
        failovers => ("pon_router_failovers_total", "", "Moves off a route that stopped answering."),
        unreachable => ("pon_router_unreachable_total", "", "Destinations found unreachable over the overlay (traffic left to the IP path)."),
        reachable => ("pon_router_reachable_total", "", "Destinations reachable over the overlay again."),
        table_updates => ("pon_router_table_updates_total", "", "Forwarding tables stored."),
        table_errors => ("pon_router_table_errors_total", "", "Inputs that did not make a valid table (the last one is kept)."),
        steering_sent => ("pon_router_steering_messages_total", "", "Steering messages sent to local TAs."),
    }
}

/// Index in a probe tag of a keepalive probe (not asked for by the router).
pub const KEEPALIVE: u32 = u32::MAX;

/// A probe's tag: the destination and the path's index among its candidates.
pub fn tag(dst: u32, index: u32) -> u64 {
    (u64::from(dst) << 32) | u64::from(index)
}

pub struct Control {
    rcfg: Option<RoutingConfig>,
    keepalive: Duration,
    composer: Composer,
    router: Option<Router>,
    pub monitor: Monitor,
    /// Paths watched with keepalive probes: each destination's current route.
    watched: HashMap<u32, Hops>,
    table: Option<ForwardingTable>,
    table_dirty: bool,
    steerer: Steerer,
    /// Probes sent per destination (router's and keepalives).
    probes: BTreeMap<u32, u64>,
    rate_base: (Duration, BTreeMap<u32, u64>, u64),
    rates: BTreeMap<u32, f64>,
    total_rate: f64,
    reqs: Vec<ProbeRequest>,
    bandwidth_every: Option<Duration>,
    next_bandwidth: Duration,
    pub counters: std::sync::Arc<ControlCounters>,
}

impl Control {
    /// `session` tells this run's probes from a previous run's; `epoch`
    /// does the same for steering messages.
    pub fn new(cfg: &ProxyConfig, session: u32, epoch: u64) -> Self {
        let composer = Composer::new(cfg.forwarder.clone());
        let my_id = composer.my_id();
        let mut c = Control {
            composer,
            rcfg: cfg.routing.clone(),
            keepalive: cfg.control.keepalive(),
            router: None,
            monitor: Monitor::new(my_id, session, cfg.monitor.clone()),
            watched: HashMap::new(),
            table: None,
            table_dirty: false,
            steerer: Steerer::new(
                epoch,
                Duration::from_millis(cfg.control.steering_refresh_ms),
            ),
            probes: BTreeMap::new(),
            rate_base: (Duration::ZERO, BTreeMap::new(), 0),
            rates: BTreeMap::new(),
            total_rate: 0.0,
            reqs: Vec::new(),
            bandwidth_every: (cfg.control.bandwidth_every_ms > 0)
                .then(|| Duration::from_millis(cfg.control.bandwidth_every_ms)),
            next_bandwidth: Duration::ZERO,
            counters: Default::default(),
        };
        if !c.composer.cu_mode() {
            // Static mode: peers and destinations are known now.
            c.set_identity(Duration::ZERO, my_id);
            let (peers, optimise) = c.composer.topology();
            c.set_topology(Duration::ZERO, &peers, &optimise);
            c.table_dirty = true;
        }
        c
    }

    pub fn routing_enabled(&self) -> bool {
        self.rcfg.is_some()
    }

    fn set_identity(&mut self, now: Duration, id: u32) {
        if id == 0 || self.monitor.my_id() == id {
            return;
        }
        self.monitor.set_my_id(id);
        for (_, path) in self.watched.drain() {
            self.monitor.set_rate(now, path, 0, None);
        }
        // A new identity is a new router; `set_topology` starts it.
        self.router = None;
        self.steerer.wake(now);
    }

    /// Peers usable as relays, and the destinations to optimise (the CU's
    /// role policy, or every peer; `[[routing.destination]]` narrows it in
    /// static mode and sets per-destination policies in both).
    fn set_topology(&mut self, now: Duration, peers: &[u32], optimise: &[u32]) {
        let id = self.monitor.my_id();
        if self.router.is_none() && id != 0 && !optimise.is_empty() {
            // Started once there is something to route to, so that its
            // first interval probes at once instead of an interval later.
            if let Some(cfg) = &self.rcfg {
                self.router = Router::new(id, cfg.clone())
                    .map_err(|e| tracing::error!(error = %e, "cannot start the router"))
                    .ok();
            }
        }
        let Some(r) = &mut self.router else {
            return;
        };
        r.set_peers(now, peers);
        let configured: BTreeMap<u32, Option<Policy>> = r
            .config()
            .destinations
            .iter()
            .map(|d| (d.id, d.policy))
            .collect();
        let wanted: BTreeSet<u32> = if !self.composer.cu_mode() && !configured.is_empty() {
            configured.keys().copied().collect()
        } else {
            optimise.iter().copied().collect()
        };
        let current: Vec<u32> = r.destinations().collect();
        for d in current {
            if !wanted.contains(&d) {
                r.remove_destination(d);
                if let Some(p) = self.watched.remove(&d) {
                    self.monitor.set_rate(now, p, 0, None);
                }
            }
        }
        for d in wanted {
            r.add_destination(d, configured.get(&d).copied().flatten());
        }
    }

    /// A new view from the CU (CU mode).
    pub fn on_view(&mut self, now: Duration, view: View) {
        self.set_identity(now, view.id());
        self.composer.set_view(view);
        let (peers, optimise) = self.composer.topology();
        self.set_topology(now, &peers, &optimise);
        self.table_dirty = true;
        self.steerer.wake(now);
        self.process(now);
    }

    /// A probe or reply that ended here; returns the reply to send, if any.
    pub fn on_packet(&mut self, now: Duration, bytes: &[u8]) -> Option<Send> {
        let out = match self.monitor.on_packet(now, bytes) {
            Handled::Answer(s) => Some(s),
            Handled::Done => None,
        };
        self.process(now);
        out
    }

    /// When `on_tick` next has work.
    pub fn poll_timeout(&self) -> Option<Duration> {
        let r = self
            .router
            .as_ref()
            .map(|r| r.poll_timeout().unwrap_or(Duration::ZERO));
        let bw = self.bandwidth_every.map(|_| self.next_bandwidth);
        [r, self.monitor.poll_timeout(), self.steerer.due(), bw]
            .into_iter()
            .flatten()
            .min()
    }

    /// Runs what is due: the router's interval (its probes), the monitor's
    /// timeouts and keepalives. Packets to send are appended to `out`.
    pub fn on_tick(&mut self, now: Duration, out: &mut Vec<Send>) {
        if let Some(r) = &mut self.router {
            if r.poll_timeout().is_none_or(|t| t <= now) {
                self.reqs.clear();
                r.on_tick(now, &mut self.reqs);
                for q in &self.reqs {
                    if let Ok(s) = self.monitor.probe(now, q.path, tag(q.dst, q.index)) {
                        *self.probes.entry(q.dst).or_default() += 1;
                        out.push(s);
                    }
                }
            }
        }
        if let Some(every) = self.bandwidth_every.filter(|_| now >= self.next_bandwidth) {
            self.next_bandwidth = now + every;
            self.measure_bandwidth(now, out);
        }
        let before = out.len();
        self.monitor.on_tick(now, out);
        for s in &out[before..] {
            if let Some(dst) = keepalive_dst(&s.bytes) {
                *self.probes.entry(dst).or_default() += 1;
            }
        }
        self.process(now);
        self.update_rates(now);
    }

    /// Packet trains on the candidates that answered recently, for the
    /// destinations whose policy weighs bandwidth.
    fn measure_bandwidth(&mut self, now: Duration, out: &mut Vec<Send>) {
        let Some(r) = &self.router else {
            return;
        };
        let fresh = r.config().fresh();
        for d in r.destinations() {
            let weighs = match r.policy(d) {
                Some(Policy::Bandwidth) => true,
                Some(Policy::Weighted(w)) => w.bandwidth > 0.0,
                _ => false,
            };
            let Some(paths) = r.paths(d).filter(|_| weighs) else {
                continue;
            };
            for (i, (hops, m)) in paths.enumerate() {
                if m.last_reply().is_none_or(|t| now.saturating_sub(t) > fresh) {
                    continue;
                }
                if let Ok(train) = self.monitor.bandwidth(now, hops, tag(d, i as u32)) {
                    *self.probes.entry(d).or_default() += train.len() as u64;
                    out.extend(train);
                }
            }
        }
    }

    /// Hands monitor results to the router and router decisions to the
    /// table, the keepalives and the steering.
    fn process(&mut self, now: Duration) {
        let Some(r) = &mut self.router else {
            while self.monitor.poll_event().is_some() {}
            return;
        };
        while let Some(ev) = self.monitor.poll_event() {
            match ev {
                MonitorEvent::Probe { tag, path, outcome } => {
                    let req = ProbeRequest {
                        dst: (tag >> 32) as u32,
                        path,
                        index: tag as u32,
                    };
                    let outcome = match outcome {
                        ProbeOutcome::Reply { rtt } => Outcome::Reply { rtt },
                        ProbeOutcome::Lost => Outcome::Lost,
                    };
                    r.on_probe_result(now, &req, outcome);
                }
                MonitorEvent::Bandwidth {
                    tag,
                    path,
                    mbps: Some(m),
                } => r.on_bandwidth(now, (tag >> 32) as u32, &path, m),
                MonitorEvent::Bandwidth { .. } => {}
            }
        }
        let mut changed = false;
        while let Some(ev) = r.poll_event() {
            changed = true;
            match ev {
                RouterEvent::RouteChanged { dst, path, reason } => {
                    self.counters.route_changes.inc();
                    if reason == pon_routing::ChangeReason::Failover {
                        self.counters.failovers.inc();
                    }
                    tracing::info!(dst, path = ?path.as_slice(), ?reason, "route changed");
                }
                RouterEvent::Unreachable { dst } => {
                    self.counters.unreachable.inc();
                    tracing::warn!(dst, "no overlay path works: traffic takes the IP path");
                }
                RouterEvent::Reachable { dst } => {
                    self.counters.reachable.inc();
                    tracing::info!(dst, "reachable over the overlay");
                }
            }
        }
        if !changed {
            return;
        }
        self.table_dirty = true;
        self.steerer.wake(now);
        // Keepalives follow the current routes.
        let want: HashMap<u32, Hops> = r
            .destinations()
            .filter_map(|d| r.current_path(d).map(|p| (d, p)))
            .collect();
        let old: Vec<(u32, Hops)> = self.watched.iter().map(|(d, p)| (*d, *p)).collect();
        for (d, p) in old {
            if want.get(&d) != Some(&p) {
                self.monitor.set_rate(now, p, 0, None);
                self.watched.remove(&d);
            }
        }
        for (d, p) in want {
            if self.watched.insert(d, p) != Some(p) {
                self.monitor
                    .set_rate(now, p, tag(d, KEEPALIVE), Some(self.keepalive));
            }
        }
    }

    /// The table to store, when its inputs changed since the last call.
    pub fn take_table(&mut self) -> Option<&ForwardingTable> {
        if !std::mem::take(&mut self.table_dirty) {
            return None;
        }
        let chosen = self.router.as_ref().map(|r| r.relays()).unwrap_or_default();
        match self.composer.compose(&chosen) {
            Ok(t) => {
                self.counters.table_updates.inc();
                self.table = Some(t);
                self.table.as_ref()
            }
            Err(e) => {
                self.counters.table_errors.inc();
                tracing::error!(error = %e, "cannot build the forwarding table; keeping the last one");
                None
            }
        }
    }

    /// The steering message for the local TAs, when the bypass set changed
    /// or the refresh is due.
    pub fn steering(&mut self, now: Duration) -> Option<SteeringOut> {
        let t = self.table.as_ref()?;
        let r = self.router.as_ref()?;
        let unreachable: BTreeSet<u32> = r.destinations().filter(|d| !r.is_reachable(*d)).collect();
        let out = self.steerer.message(now, t, &unreachable)?;
        self.counters.steering_sent.inc();
        Some(out)
    }

    fn update_rates(&mut self, now: Duration) {
        let (t0, base, base_total) = &self.rate_base;
        let dt = now.saturating_sub(*t0).as_secs_f64();
        if dt < 2.0 {
            return;
        }
        let total = self.monitor.counters.probes_sent.get();
        self.rates = self
            .probes
            .iter()
            .map(|(d, n)| (*d, (n - base.get(d).copied().unwrap_or(0)) as f64 / dt))
            .collect();
        self.total_rate = (total - base_total) as f64 / dt;
        self.rate_base = (now, self.probes.clone(), total);
        // Paths no longer probed (gone with the topology) stop costing memory.
        self.monitor.forget_idle(now, Duration::from_secs(600));
    }

    pub fn router(&self) -> Option<&Router> {
        self.router.as_ref()
    }

    /// What `ponctl` and the status page show.
    pub fn status(&self, now: Duration) -> Status {
        let destinations = self.router.as_ref().map_or_else(Vec::new, |r| {
            destinations_status(r, Some(&self.monitor), now, &self.probes, &self.rates)
        });
        let c = &self.monitor.counters;
        Status {
            id: self.monitor.my_id(),
            routing: self.router.is_some(),
            destinations,
            budget: BudgetStatus {
                max_probes_per_sec: self.monitor.config().max_probes_per_sec,
                probes_per_sec: self.total_rate,
                probes_sent: c.probes_sent.get(),
                probe_bytes_sent: c.probe_bytes.get(),
                refused: c.refused_budget.get() + c.refused_busy.get(),
                answered: c.answered.get(),
                keepalive_ms: self.keepalive.as_millis() as u64,
                interval_ms: self.rcfg.as_ref().map(|r| r.interval_ms),
                probes_per_interval: self.rcfg.as_ref().map(|r| r.probes_per_interval),
            },
        }
    }
}

/// Each destination's route, metric and candidates, for the status page.
pub fn destinations_status(
    r: &Router,
    monitor: Option<&Monitor>,
    now: Duration,
    probes: &BTreeMap<u32, u64>,
    rates: &BTreeMap<u32, f64>,
) -> Vec<DestinationStatus> {
    let mut destinations = Vec::new();
    {
        let mut ids: Vec<u32> = r.destinations().collect();
        ids.sort_unstable();
        for d in ids {
            let policy = r.policy(d).unwrap_or_default();
            let current = r.current_path(d);
            let stats = r.stats(d).unwrap_or_default();
            let mut candidates = Vec::new();
            let mut metric = None;
            if let Some(paths) = r.paths(d) {
                for (hops, m) in paths {
                    let cost = m.cost(&policy);
                    let cost = cost.is_finite().then_some(cost);
                    if Some(hops) == current {
                        metric = cost;
                    }
                    let mon = monitor.and_then(|m| m.stats(now, &hops));
                    candidates.push(CandidateStatus {
                        path: hops.as_slice().to_vec(),
                        cost,
                        rtt_ms: m.rtt_ms(),
                        loss: m.loss_rate(),
                        last_reply_ms_ago: m
                            .last_reply()
                            .map(|t| now.saturating_sub(t).as_millis() as u64),
                        p50_us: mon.as_ref().and_then(|s| s.p50_us),
                        p99_us: mon.as_ref().and_then(|s| s.p99_us),
                        jitter_us: mon.as_ref().map(|s| s.jitter_us),
                        monitor_loss: mon.as_ref().map(|s| s.loss),
                        bandwidth_mbps: m.bandwidth_mbps(),
                    });
                }
            }
            destinations.push(DestinationStatus {
                id: d,
                policy: policy_name(&policy),
                reachable: r.is_reachable(d),
                current: current.map(|h| h.as_slice().to_vec()),
                metric,
                candidates,
                probes_sent: probes.get(&d).copied().unwrap_or(0),
                probes_per_sec: rates.get(&d).copied().unwrap_or(0.0),
                route_changes: stats.route_changes,
                failovers: stats.failovers,
                unreachable_episodes: stats.unreachable_episodes,
            });
        }
    }
    destinations
}

/// The destination of a probe: its route's last hop.
fn keepalive_dst(bytes: &[u8]) -> Option<u32> {
    let p = pon_proto::pon::Packet::new_checked(bytes).ok()?;
    Some(p.hop(p.hop_count() - 1))
}

fn policy_name(p: &Policy) -> String {
    match p {
        Policy::Latency => "latency".into(),
        Policy::Loss => "loss".into(),
        Policy::Bandwidth => "bandwidth".into(),
        Policy::Weighted(w) => {
            format!("weighted(rtt={},loss={},bw={})", w.rtt, w.loss, w.bandwidth)
        }
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct Status {
    pub id: u32,
    pub routing: bool,
    pub destinations: Vec<DestinationStatus>,
    pub budget: BudgetStatus,
}

#[derive(Debug, Clone, Serialize)]
pub struct DestinationStatus {
    pub id: u32,
    pub policy: String,
    pub reachable: bool,
    /// Hops after this proxy (relays, then the destination).
    pub current: Option<Vec<u32>>,
    /// The current route's cost under the policy (ms-equivalent).
    pub metric: Option<f64>,
    pub candidates: Vec<CandidateStatus>,
    pub probes_sent: u64,
    pub probes_per_sec: f64,
    pub route_changes: u64,
    pub failovers: u64,
    pub unreachable_episodes: u64,
}

#[derive(Debug, Clone, Serialize)]
pub struct CandidateStatus {
    pub path: Vec<u32>,
    pub cost: Option<f64>,
    pub rtt_ms: Option<f64>,
    pub loss: f64,
    pub last_reply_ms_ago: Option<u64>,
    pub p50_us: Option<u64>,
    pub p99_us: Option<u64>,
    pub jitter_us: Option<u64>,
    pub monitor_loss: Option<f64>,
    pub bandwidth_mbps: Option<f64>,
}

#[derive(Debug, Clone, Serialize)]
pub struct BudgetStatus {
    pub max_probes_per_sec: u32,
    pub probes_per_sec: f64,
    pub probes_sent: u64,
    pub probe_bytes_sent: u64,
    pub refused: u64,
    pub answered: u64,
    pub keepalive_ms: u64,
    pub interval_ms: Option<u64>,
    pub probes_per_interval: Option<usize>,
}

impl Status {
    pub fn render(&self, w: &mut pon_telemetry::PromWriter) {
        w.gauge(
            "pon_monitor_probe_rate",
            "",
            "Probe packets sent per second (last few seconds).",
            self.budget.probes_per_sec,
        );
        w.gauge(
            "pon_monitor_probe_budget",
            "",
            "Ceiling on probe packets per second.",
            f64::from(self.budget.max_probes_per_sec),
        );
        for d in &self.destinations {
            let l = format!("dst=\"{}\"", d.id);
            w.gauge(
                "pon_router_reachable",
                &l,
                "1 while the destination is reachable over the overlay.",
                if d.reachable { 1.0 } else { 0.0 },
            );
            w.gauge(
                "pon_router_route_relays",
                &l,
                "Relays on the current route (-1: none, traffic takes the IP path).",
                d.current.as_ref().map_or(-1.0, |c| (c.len() - 1) as f64),
            );
            if let Some(m) = d.metric {
                w.gauge(
                    "pon_router_route_cost",
                    &l,
                    "Cost of the current route under the destination's policy (ms-equivalent).",
                    m,
                );
            }
            w.counter(
                "pon_router_probes_total",
                &l,
                "Probes sent towards the destination (learning and keepalive).",
                d.probes_sent,
            );
            w.gauge(
                "pon_router_probe_rate",
                &l,
                "Probes per second towards the destination.",
                d.probes_per_sec,
            );
            w.counter(
                "pon_router_destination_route_changes_total",
                &l,
                "Route changes of the destination.",
                d.route_changes,
            );
        }
    }
}

#[cfg(test)]
mod tests;
