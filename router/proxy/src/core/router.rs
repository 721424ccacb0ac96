//! The router's part of the core: the [`Router`] started on the topology
//! the forwarder announces, its interval's probes and the keepalives of
//! every current route asked of the monitor, the results filed, and the
//! chosen routes sent to the forwarder. Keepalives are slow unless a
//! route's traffic goes unconfirmed by the egress's reports
//! ([`pon_routing::passive`]): then fast, until it fails over or the
//! reports come back.

use super::rate::RateMeter;
use super::status::{BudgetStatus, CandidateStatus, DestinationStatus, Status};
use super::{CoreCounters, Output, Outputs, Part};
use pon_proto::local::LocalMsg;
use pon_proto::measurement::{ProbeTag, Purpose};
use pon_proto::pon::Hops;
use pon_routing::passive::{Keepalive, PassiveWatch};
use pon_routing::{ChangeReason, Policy, ProbeRequest, Router, RouterEvent, RoutingConfig};
use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::sync::Arc;
use std::time::Duration;

/// The routes are re-sent this often even when unchanged (the local link
/// may lose a datagram; a restarted forwarder learns them within this).
pub const ROUTES_EVERY: Duration = Duration::from_secs(1);

#[derive(Debug, Clone)]
pub struct RouterPartConfig {
    pub routing: RoutingConfig,
    /// A current route whose traffic the egress stopped confirming is
    /// probed this often, whatever the learning budget: with
    /// `routing.failover_losses` consecutive losses this bounds how long
    /// traffic stays on a dead path.
    pub keepalive: Duration,
    /// Every other current route (idle, or confirmed by reports) is probed
    /// this often.
    pub idle_keepalive: Duration,
    /// Destinations whose policy weighs bandwidth get their recently
    /// answering candidates measured with a packet train this often.
    pub bandwidth_every: Option<Duration>,
}

pub struct RouterPart {
    cfg: RouterPartConfig,
    router: Option<Router>,
    /// Paths watched with keepalive probes: each destination's current
    /// route, and whether at the fast rate.
    watched: HashMap<u32, (Hops, Keepalive)>,
    /// Per destination: its traffic and the egress's reports.
    passive: HashMap<u32, PassiveWatch>,
    /// When a watched route's keepalive rate may change by itself.
    next_passive: Option<Duration>,
    /// Probes spent per destination (every kind), counted as their
    /// results come back: each probe sent ends in exactly one result.
    probes: BTreeMap<u32, u64>,
    rates: RateMeter<u32>,
    next_bandwidth: Duration,
    next_routes: Duration,
    reqs: Vec<ProbeRequest>,
    out: VecDeque<Output>,
    pub counters: Arc<CoreCounters>,
}

impl RouterPart {
    pub fn new(cfg: RouterPartConfig, counters: Arc<CoreCounters>) -> Self {
        RouterPart {
            cfg,
            router: None,
            watched: HashMap::new(),
            passive: HashMap::new(),
            next_passive: None,
            probes: BTreeMap::new(),
            rates: RateMeter::default(),
            next_bandwidth: Duration::ZERO,
            next_routes: Duration::ZERO,
            reqs: Vec::new(),
            out: VecDeque::new(),
            counters,
        }
    }

    pub fn router(&self) -> Option<&Router> {
        self.router.as_ref()
    }

    pub(super) fn unexpected(&self) {
        self.counters.unexpected_router.inc()
    }

    pub fn handle_message(&mut self, now: Duration, from: Part, msg: LocalMsg) {
        match (from, msg) {
            (
                Part::Forwarder,
                LocalMsg::Topology {
                    id,
                    peers,
                    optimise,
                    from_cu,
                },
            ) => self.set_topology(now, id, &peers, &optimise, from_cu),
            (Part::Monitor, LocalMsg::Result { tag, path, outcome }) => {
                *self.probes.entry(tag.dst).or_default() += 1;
                if let Some(r) = &mut self.router {
                    match tag.purpose {
                        Purpose::Learning { index } => {
                            let req = ProbeRequest {
                                dst: tag.dst,
                                path,
                                index,
                            };
                            r.on_probe_result(now, &req, outcome);
                        }
                        Purpose::Keepalive | Purpose::Bandwidth { .. } => {
                            r.on_path_result(now, tag.dst, &path, outcome)
                        }
                    }
                }
            }
            (
                Part::Monitor,
                LocalMsg::BandwidthResult {
                    tag,
                    path,
                    packets,
                    mbps,
                },
            ) => {
                *self.probes.entry(tag.dst).or_default() += u64::from(packets);
                if let (Some(r), Some(m)) = (&mut self.router, mbps) {
                    r.on_bandwidth(now, tag.dst, &path, m);
                }
            }
            (Part::Forwarder, LocalMsg::Traffic(samples)) => {
                for t in samples {
                    self.passive
                        .entry(t.peer)
                        .or_default()
                        .on_sample(now, t.sent, t.confirmed);
                }
                self.retune(now);
            }
            _ => self.unexpected(),
        }
        self.checks();
        self.events(now);
    }

    /// Sends the router's failover checks at once; their results come back
    /// as learning results.
    fn checks(&mut self) {
        let Some(r) = &mut self.router else {
            return;
        };
        while let Some(q) = r.poll_check() {
            self.counters.failover_checks.inc();
            self.out.push_back(Output::Local {
                to: Part::Monitor,
                msg: LocalMsg::Probe {
                    tag: ProbeTag::learning(q.dst, q.index),
                    path: q.path,
                },
            });
        }
    }

    /// The keepalive rate `dst`'s current route needs now.
    fn mode(&self, now: Duration, dst: u32) -> Keepalive {
        self.passive
            .get(&dst)
            .map_or(Keepalive::Slow, |p| p.keepalive(now))
    }

    fn every_ms(&self, mode: Keepalive) -> u32 {
        let every = match mode {
            Keepalive::Slow => self.cfg.idle_keepalive,
            Keepalive::Fast => self.cfg.keepalive,
        };
        every.as_millis().clamp(1, u128::from(u32::MAX)) as u32
    }

    /// Moves the watched routes whose traffic became (un)confirmed to
    /// their new keepalive rate.
    fn retune(&mut self, now: Duration) {
        let mut changed = Vec::new();
        let mut next: Option<Duration> = None;
        for (&d, &(path, mode)) in &self.watched {
            let want = self.mode(now, d);
            if want != mode {
                changed.push((d, path, want));
            }
            if let Some(t) = self.passive.get(&d).and_then(|p| p.next_change(now)) {
                next = Some(next.map_or(t, |n| n.min(t)));
            }
        }
        self.next_passive = next;
        for (d, path, want) in changed {
            if want == Keepalive::Fast {
                self.counters.passive_suspects.inc();
                tracing::info!(dst = d, path = ?path.as_slice(), "traffic on the route unconfirmed: fast keepalives");
            }
            self.watched.insert(d, (path, want));
            self.rate(d, path, self.every_ms(want));
        }
    }

    /// Starts the router once there is something to route to (so that its
    /// first interval probes at once), restarts it under a new identity,
    /// and keeps its peers and destinations in step with the topology:
    /// the CU's role policy, or every peer, narrowed in static mode by
    /// `[[routing.destination]]`, which also sets per-destination policies.
    fn set_topology(
        &mut self,
        now: Duration,
        id: u32,
        peers: &[u32],
        optimise: &[u32],
        from_cu: bool,
    ) {
        if id == 0 {
            return;
        }
        if self.router.as_ref().is_some_and(|r| r.my_id() != id) {
            // A new identity is a new router: nothing it learnt holds.
            self.router = None;
            self.unwatch_all(now);
        }
        if self.router.is_none() {
            if optimise.is_empty() {
                return;
            }
            tracing::info!(id, "router starting for this proxy");
            match Router::new(id, self.cfg.routing.clone()) {
                Ok(r) => self.router = Some(r),
                Err(e) => {
                    tracing::error!(error = %e, "cannot start the router");
                    return;
                }
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
        let wanted: BTreeSet<u32> = if !from_cu && !configured.is_empty() {
            configured.keys().copied().collect()
        } else {
            optimise.iter().copied().collect()
        };
        let current: Vec<u32> = r.destinations().collect();
        for d in current {
            if !wanted.contains(&d) {
                r.remove_destination(d);
            }
        }
        for d in wanted {
            r.add_destination(d, configured.get(&d).copied().flatten());
        }
        // Removed destinations take their keepalives with them.
        self.rewatch(now);
    }

    pub fn handle_timeout(&mut self, now: Duration) {
        if self.next_passive.is_some_and(|t| t <= now) {
            self.retune(now);
        }
        if let Some(r) = &mut self.router {
            if r.poll_timeout().is_none_or(|t| t <= now) {
                self.reqs.clear();
                r.on_tick(now, &mut self.reqs);
                for q in &self.reqs {
                    self.out.push_back(Output::Local {
                        to: Part::Monitor,
                        msg: LocalMsg::Probe {
                            tag: ProbeTag::learning(q.dst, q.index),
                            path: q.path,
                        },
                    });
                }
            }
        }
        if let Some(every) = self.cfg.bandwidth_every {
            if now >= self.next_bandwidth {
                self.next_bandwidth = now + every;
                self.measure_bandwidth(now);
            }
        }
        self.rates
            .update(now, self.probes.iter().map(|(d, n)| (*d, *n)));
        self.checks();
        self.events(now);
        if now >= self.next_routes {
            self.send_routes(now);
            // The keepalive rates too: a lost datagram or a restarted
            // monitor would otherwise leave a route unwatched.
            let watched: Vec<(u32, Hops, Keepalive)> = self
                .watched
                .iter()
                .map(|(d, (p, m))| (*d, *p, *m))
                .collect();
            for (d, p, m) in watched {
                self.rate(d, p, self.every_ms(m));
            }
        }
    }

    pub fn poll_timeout(&self) -> Option<Duration> {
        let r = self.router.as_ref()?;
        let tick = r.poll_timeout().unwrap_or(Duration::ZERO);
        let bw = self.cfg.bandwidth_every.map(|_| self.next_bandwidth);
        [
            Some(tick),
            bw,
            Some(self.next_routes),
            Some(self.rates.next_update()),
            self.next_passive,
        ]
        .into_iter()
        .flatten()
        .min()
    }

    /// Packet trains on the candidates that answered recently, for the
    /// destinations whose policy weighs bandwidth.
    fn measure_bandwidth(&mut self, now: Duration) {
        let Some(r) = &self.router else {
            return;
        };
        for d in r.destinations() {
            if !r.policy(d).is_some_and(|p| p.weighs_bandwidth()) {
                continue;
            }
            for (i, hops) in r.fresh_paths(now, d) {
                self.out.push_back(Output::Local {
                    to: Part::Monitor,
                    msg: LocalMsg::Bandwidth {
                        tag: ProbeTag::bandwidth(d, i),
                        path: hops,
                    },
                });
            }
        }
    }

    /// Drains the router's events; on a change, the keepalives follow the
    /// current routes and the forwarder gets the routes at once.
    fn events(&mut self, now: Duration) {
        let Some(r) = &mut self.router else {
            return;
        };
        let mut changed = Vec::new();
        let mut failed_over = Vec::new();
        while let Some(ev) = r.poll_event() {
            match ev {
                RouterEvent::RouteChanged { dst, path, reason } => {
                    changed.push(dst);
                    self.counters.route_changes.inc();
                    if reason == ChangeReason::Failover {
                        self.counters.failovers.inc();
                        failed_over.push(dst);
                    }
                    tracing::info!(dst, path = ?path.as_slice(), ?reason, "route changed");
                }
                RouterEvent::Unreachable { dst } => {
                    changed.push(dst);
                    self.counters.unreachable.inc();
                    tracing::warn!(dst, "no overlay path works: traffic takes the IP path");
                }
                RouterEvent::Reachable { dst } => {
                    changed.push(dst);
                    self.counters.reachable.inc();
                    tracing::info!(dst, "reachable over the overlay");
                }
            }
        }
        if !changed.is_empty() {
            // Routes first: a new route is in the table before its
            // keepalives go out.
            self.send_routes(now);
            self.rewatch_some(now, &changed, &failed_over);
        }
    }

    /// Keepalives follow the current routes of `dsts`, the destinations
    /// an event touched (only events move a route): per event, not a pass
    /// over every destination, which with a thousand of them would cost
    /// more than the event.
    fn rewatch_some(&mut self, now: Duration, dsts: &[u32], failed_over: &[u32]) {
        let Some(r) = &self.router else {
            return;
        };
        let mut rates = Vec::new();
        for &d in dsts {
            let want = r.current_path(d);
            let had = self.watched.get(&d).copied();
            if had.map(|(p, _)| p) == want {
                continue;
            }
            if let Some((p, _)) = had {
                self.watched.remove(&d);
                rates.push((d, p, 0));
            }
            if let Some(p) = want {
                // A new route: its reports start now; after a failover,
                // it has yet to show that it works at all.
                if let Some(w) = self.passive.get_mut(&d) {
                    if failed_over.contains(&d) {
                        w.on_failover(now);
                    } else {
                        w.on_route_changed(now);
                    }
                }
                let mode = self.mode(now, d);
                self.watched.insert(d, (p, mode));
                rates.push((d, p, self.every_ms(mode)));
            }
        }
        for (d, p, every_ms) in rates {
            self.rate(d, p, every_ms);
        }
    }

    /// Keepalives on exactly the current routes (after a topology change,
    /// which can add or remove any destination).
    fn rewatch(&mut self, now: Duration) {
        let Some(r) = &self.router else {
            return self.unwatch_all(now);
        };
        let mut all: Vec<u32> = r
            .destinations()
            .chain(self.watched.keys().copied())
            .collect();
        all.sort_unstable();
        all.dedup();
        self.rewatch_some(now, &all, &[]);
    }

    fn unwatch_all(&mut self, _now: Duration) {
        for (d, (p, _)) in std::mem::take(&mut self.watched) {
            self.rate(d, p, 0);
        }
    }

    fn rate(&mut self, dst: u32, path: Hops, every_ms: u32) {
        self.out.push_back(Output::Local {
            to: Part::Monitor,
            msg: LocalMsg::Rate {
                tag: ProbeTag::keepalive(dst),
                path,
                every_ms,
            },
        });
    }

    fn send_routes(&mut self, now: Duration) {
        let Some(r) = &self.router else {
            return;
        };
        self.next_routes = now + ROUTES_EVERY;
        let msg = LocalMsg::Routes {
            relays: r.relays(),
            unreachable: r.destinations().filter(|d| !r.is_reachable(*d)).collect(),
        };
        self.out.push_back(Output::Local {
            to: Part::Forwarder,
            msg,
        });
    }

    pub fn metrics(&self) -> pon_telemetry::Renderer {
        let c = self.counters.clone();
        Arc::new(move |w: &mut pon_telemetry::PromWriter| c.render(w))
    }

    /// Each destination's route, metric and candidates, and the budget as
    /// the router sees it (the monitor adds its own figures).
    pub fn status(&self, now: Duration) -> Status {
        let Some(r) = &self.router else {
            return Status {
                budget: self.budget(),
                ..Status::default()
            };
        };
        let mut ids: Vec<u32> = r.destinations().collect();
        ids.sort_unstable();
        let destinations = ids
            .into_iter()
            .map(|d| destination_status(r, d, now, &self.probes, &self.rates))
            .collect();
        Status {
            id: r.my_id(),
            // The forwarder's part knows the site; pon-proxy adds it.
            site_role: None,
            routing: true,
            destinations,
            budget: self.budget(),
            // The forwarder's part holds the sessions; pon-proxy adds them.
            tunnels: Vec::new(),
        }
    }

    fn budget(&self) -> BudgetStatus {
        BudgetStatus {
            probes_per_sec: self.rates.total(),
            // The monitor may run in another process: what this router
            // knows it spent, counted by the results that came back.
            monitor: pon_monitor::Budget {
                probes_sent: self.probes.values().sum(),
                ..Default::default()
            },
            keepalive_ms: self.cfg.keepalive.as_millis() as u64,
            idle_keepalive_ms: self.cfg.idle_keepalive.as_millis() as u64,
            interval_ms: Some(self.cfg.routing.interval_ms),
            probes_per_interval: Some(self.cfg.routing.probes_per_interval),
            steady_every: Some(self.cfg.routing.steady_every),
            answers_per_sec: 0.0,
        }
    }
}

fn destination_status(
    r: &Router,
    d: u32,
    now: Duration,
    probes: &BTreeMap<u32, u64>,
    rates: &RateMeter<u32>,
) -> DestinationStatus {
    let policy = r.policy(d).unwrap_or_default();
    let current = r.current_path(d);
    let stats = r.stats(d).unwrap_or_default();
    let mut candidates = Vec::new();
    let mut metric = None;
    for (hops, m) in r.paths(d).into_iter().flatten() {
        let cost = m.cost(&policy);
        let cost = cost.is_finite().then_some(cost);
        if Some(hops) == current {
            metric = cost;
        }
        candidates.push(CandidateStatus {
            path: hops.as_slice().to_vec(),
            cost,
            rtt_ms: m.rtt_ms(),
            loss: m.loss_rate(),
            last_reply_ms_ago: m
                .last_reply()
                .map(|t| now.saturating_sub(t).as_millis() as u64),
            bandwidth_mbps: m.bandwidth_mbps(),
            ..CandidateStatus::default()
        });
    }
    DestinationStatus {
        id: d,
        policy: super::status::policy_name(&policy),
        reachable: r.is_reachable(d),
        current: current.map(|h| h.as_slice().to_vec()),
        metric,
        candidates,
        probes_sent: probes.get(&d).copied().unwrap_or(0),
        probes_per_sec: rates.get(&d),
        stats,
    }
}

impl Outputs for RouterPart {
    fn poll_output(&mut self) -> Option<Output> {
        self.out.pop_front()
    }
}
