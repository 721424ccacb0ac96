//! The path-selection state machine of one proxy, without I/O.
//!
//! The daemon around it:
//! 1. calls [`Router::on_tick`] when [`Router::poll_timeout`] says so, and
//!    sends one probe per returned [`ProbeRequest`] along its source route;
//! 2. reports each answer or timeout with [`Router::on_probe_result`]
//!    (passing back the request), and bandwidth figures with
//!    [`Router::on_bandwidth`];
//! 3. drains [`Router::poll_check`] (probes to send at once, reported
//!    like the others) and [`Router::poll_event`]: on `RouteChanged` it rebuilds the
//!    forwarder table from [`Router::relays`] and swaps it in; on
//!    `Unreachable` it tells the TAs to stop intercepting traffic for the
//!    destination (packets take the plain IP path), on `Reachable` to start
//!    again. A destination starts unreachable: interception is switched on
//!    only once a path has answered, and a `RouteChanged` always comes before
//!    the `Reachable` it enables.
//!
//! Per destination and interval, the router probes the current route (so
//! that its death is noticed), the direct path (see
//! `RoutingConfig::always_probe_direct`) and a challenger that is waiting
//! out the hysteresis hold, in that order of priority, and lets the
//! destination's [`ProbeSelector`] fill the rest of the budget k.
//! A destination that stayed settled for `steady_after` (reachable, no
//! challenger, no route change, no loss on its route) gets its k probes
//! every `steady_every` intervals only: at steady state that halves what
//! learning costs (and the answers it causes at the far end), and anything
//! that unsettles it restores the full rate at its next interval. A loss on
//! the current route asks for one probe on it at once, outside the budget
//! ([`Router::poll_check`]), so a route that died while idle is found dead
//! within a few probe timeouts, not `failover_losses` intervals.
//!
//! A failover is a moment of doubt: the answers that make the other paths
//! look alive are from before the failure. The route still moves at once
//! to the best of them (a cut link costs no extra wait), but the router
//! also asks for one probe on every such alternative, outside the budget
//! and the cadence ([`Router::poll_check`]), and the route taken has to answer once
//! before it gets the usual `failover_losses` grace: until then, one loss
//! moves it on. When the destination itself died, every alternative ends
//! in it, so this finds it unreachable within about one probe timeout of
//! the first failover instead of `failover_losses` keepalives per
//! alternative, one after another.

use super::config::{ConfigError, RoutingConfig};
use super::measurement::{EstimatorConfig, Measurement};
use super::policy::Policy;
use super::rng::Rng;
use super::selector::ProbeSelector;
use pon_proto::pon::Hops;
use rustc_hash::FxHashMap as HashMap;
use std::collections::VecDeque;
use std::time::Duration;

/// Ask the daemon to probe `path` (relays then `dst`) now.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct ProbeRequest {
    pub dst: u32,
    pub path: Hops,
    /// The path's index among the destination's candidates: lets the result
    /// be filed without a lookup. Pass the request back unchanged.
    pub index: u32,
}

pub use pon_proto::measurement::ProbeOutcome;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChangeReason {
    /// The first path that answered.
    Initial,
    /// A path better by the margin for the hold time.
    Better,
    /// The current path stopped answering.
    Failover,
    /// A path answered again after the destination was unreachable.
    Restored,
    /// The set of peers changed and the old route is no longer a candidate.
    Topology,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RouterEvent {
    /// Traffic to `dst` must now follow `path` (relays, then `dst`).
    RouteChanged {
        dst: u32,
        path: Hops,
        reason: ChangeReason,
    },
    /// No path to `dst` works: stop intercepting its traffic.
    Unreachable { dst: u32 },
    /// A path to `dst` works again (its route was announced just before).
    Reachable { dst: u32 },
}

/// Counters per destination, for metrics and status pages.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct DestinationStats {
    /// Learning probes asked for.
    pub probes: u64,
    pub route_changes: u64,
    pub failovers: u64,
    pub unreachable_episodes: u64,
    /// Probes asked for outside the budget: at failovers, one per
    /// alternative path, and after a loss on the route, one on it.
    pub failover_checks: u64,
}

#[derive(Debug, thiserror::Error, PartialEq)]
pub enum RouterError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error("router id 0 is reserved")]
    ZeroId,
}

/// Builds the selector for a destination: `(dst, number of candidates)`.
pub type SelectorFactory = Box<dyn Fn(u32, usize) -> Box<dyn ProbeSelector> + Send>;

struct Candidate {
    hops: Hops,
    m: Measurement,
    /// Position in `Destination::answered`, or `NOT_LISTED`.
    slot: u32,
}

const NOT_LISTED: u32 = u32::MAX;

/// What route decisions need about a path that answered recently, kept in a
/// small dense array so they need not touch the (large) measurements.
#[derive(Debug, Clone, Copy)]
struct Answered {
    path: u32,
    /// Its latest probe was answered.
    ok: bool,
    cost: f64,
    last_reply: Duration,
}

const NO_RELAY: u32 = u32::MAX;

/// Candidates for `hops` (keeping old measurements), and the position in
/// `peers` of each one's first relay (`NO_RELAY` for the direct path).
fn candidates(
    hops: Vec<Hops>,
    peers: &[u32],
    mut old: impl FnMut(&Hops) -> Option<Measurement>,
) -> (Vec<Candidate>, Vec<u32>) {
    let firsts = hops
        .iter()
        .map(|h| {
            if h.len() == 1 {
                NO_RELAY
            } else {
                peers
                    .binary_search(&h.as_slice()[0])
                    .map_or(NO_RELAY, |p| p as u32)
            }
        })
        .collect();
    let paths = hops
        .into_iter()
        .map(|h| Candidate {
            hops: h,
            m: old(&h).unwrap_or_default(),
            slot: NOT_LISTED,
        })
        .collect();
    (paths, firsts)
}

struct Destination {
    id: u32,
    policy: Policy,
    paths: Vec<Candidate>,
    /// Per path, the position in `Router::peers` of its first relay, kept
    /// apart from `paths` so the per-interval pruning scan stays in cache.
    firsts: Vec<u32>,
    lookup: HashMap<Hops, u32>,
    /// Paths that answered within `fresh` (a superset: pruned when read).
    /// With a budget of k probes, only a few dozen paths are fresh at any
    /// time, so route decisions need not scan hundreds of candidates.
    answered: Vec<Answered>,
    selector: Box<dyn ProbeSelector>,
    current: Option<usize>,
    reachable: bool,
    /// The challenger beating the current route, and since when some path
    /// has been doing so.
    challenger: Option<usize>,
    better_since: Option<Duration>,
    /// The current route was taken in a failover and has not answered
    /// since: one loss moves it on.
    unconfirmed: bool,
    /// Since when nothing unsettled it (a route change, a challenger, a
    /// loss on the route, being unreachable): a destination settled for
    /// `steady_after` is probed every `steady_every` intervals.
    settled_since: Option<Duration>,
    stats: DestinationStats,
}

pub struct Router {
    my_id: u32,
    cfg: RoutingConfig,
    est: EstimatorConfig,
    peers: Vec<u32>,
    dests: Vec<Destination>,
    index: HashMap<u32, usize>,
    events: VecDeque<RouterEvent>,
    next_tick: Option<Duration>,
    /// Intervals ticked so far: which steady destinations probe this one.
    ticks: u64,
    /// Failover checks not yet handed out (`poll_check`).
    checks: VecDeque<ProbeRequest>,
    factory: SelectorFactory,
    chosen: Vec<usize>,
    /// Scratch for `on_tick`: lower bound on the RTT to each peer, and which
    /// paths of a destination are worth a probe.
    first_leg: Vec<f64>,
    eligible: Vec<bool>,
}

/// The candidate paths to `dst`: direct first, then through each relay, then
/// (with `max_relays` 2) through each ordered pair of relays.
pub fn candidate_paths(dst: u32, relays: &[u32], max_relays: u8) -> Vec<Hops> {
    let relays: Vec<u32> = relays.iter().copied().filter(|r| *r != dst).collect();
    let mut out = Vec::with_capacity(1 + relays.len());
    out.push(Hops::new(&[dst]).expect("one hop"));
    for &r in &relays {
        out.push(Hops::new(&[r, dst]).expect("two hops"));
    }
    if max_relays >= 2 {
        for &a in &relays {
            for &b in &relays {
                if a != b {
                    out.push(Hops::new(&[a, b, dst]).expect("three hops"));
                }
            }
        }
    }
    out
}

impl Router {
    /// A router for proxy `my_id` using the selector named in the config.
    pub fn new(my_id: u32, cfg: RoutingConfig) -> Result<Self, RouterError> {
        let (kind, rnn, bandit, seed) = (cfg.selector, cfg.rnn, cfg.bandit, cfg.seed);
        let factory: SelectorFactory =
            Box::new(move |dst, n| kind.build(n, &rnn, &bandit, Rng::derive(seed, u64::from(dst))));
        Self::with_selector_factory(my_id, cfg, factory)
    }

    /// A router whose destinations get their selectors from `factory`.
    pub fn with_selector_factory(
        my_id: u32,
        cfg: RoutingConfig,
        factory: SelectorFactory,
    ) -> Result<Self, RouterError> {
        if my_id == 0 {
            return Err(RouterError::ZeroId);
        }
        cfg.validate()?;
        let mut r = Router {
            my_id,
            est: cfg.estimator(),
            cfg,
            peers: Vec::new(),
            dests: Vec::new(),
            index: HashMap::default(),
            events: VecDeque::new(),
            next_tick: None,
            ticks: 0,
            checks: VecDeque::new(),
            factory,
            chosen: Vec::new(),
            first_leg: Vec::new(),
            eligible: Vec::new(),
        };
        for d in r.cfg.destinations.clone() {
            r.add_destination(d.id, d.policy);
        }
        Ok(r)
    }

    pub fn config(&self) -> &RoutingConfig {
        &self.cfg
    }
    pub fn my_id(&self) -> u32 {
        self.my_id
    }

    /// The proxies usable as relays (from the CU's topology). Destinations
    /// get new candidate sets; measurements of paths that remain are kept,
    /// the learners start over.
    pub fn set_peers(&mut self, now: Duration, peers: &[u32]) {
        let mut p: Vec<u32> = peers
            .iter()
            .copied()
            .filter(|&id| id != self.my_id && id != 0)
            .collect();
        p.sort_unstable();
        p.dedup();
        if p == self.peers {
            return;
        }
        self.peers = p;
        for i in 0..self.dests.len() {
            self.rebuild(i, now);
        }
    }

    /// Starts optimising paths to `dst` (or changes its policy).
    pub fn add_destination(&mut self, dst: u32, policy: Option<Policy>) {
        if dst == self.my_id || dst == 0 {
            return;
        }
        let policy = policy.unwrap_or(self.cfg.policy);
        if let Some(&i) = self.index.get(&dst) {
            self.set_policy_at(i, policy);
            return;
        }
        let hops = candidate_paths(dst, &self.peers, self.cfg.max_relays);
        let mut d = Destination {
            id: dst,
            policy,
            lookup: hops
                .iter()
                .enumerate()
                .map(|(i, h)| (*h, i as u32))
                .collect(),
            selector: (self.factory)(dst, hops.len()),
            paths: Vec::new(),
            firsts: Vec::new(),
            answered: Vec::new(),
            current: None,
            reachable: false,
            challenger: None,
            better_since: None,
            unconfirmed: false,
            settled_since: None,
            stats: DestinationStats::default(),
        };
        (d.paths, d.firsts) = candidates(hops, &self.peers, |_| None);
        self.index.insert(dst, self.dests.len());
        self.dests.push(d);
    }

    /// Stops optimising `dst` (no event: the daemon removed it itself).
    pub fn remove_destination(&mut self, dst: u32) {
        if let Some(i) = self.index.remove(&dst) {
            self.dests.swap_remove(i);
            if i < self.dests.len() {
                self.index.insert(self.dests[i].id, i);
            }
        }
    }

    pub fn set_policy(&mut self, dst: u32, policy: Policy) {
        if let Some(&i) = self.index.get(&dst) {
            self.set_policy_at(i, policy);
        }
    }

    fn set_policy_at(&mut self, i: usize, policy: Policy) {
        let d = &mut self.dests[i];
        if d.policy != policy {
            d.policy = policy;
            d.better_since = None;
            d.challenger = None;
            for a in &mut d.answered {
                a.cost = d.paths[a.path as usize].m.cost(&policy);
            }
        }
    }

    fn rebuild(&mut self, i: usize, now: Duration) {
        let hops = candidate_paths(self.dests[i].id, &self.peers, self.cfg.max_relays);
        let fresh = self.cfg.fresh();
        let d = &mut self.dests[i];
        let old_current = d.current.map(|c| d.paths[c].hops);
        let mut old: HashMap<Hops, Measurement> =
            d.paths.drain(..).map(|c| (c.hops, c.m)).collect();
        (d.paths, d.firsts) = candidates(hops.clone(), &self.peers, |h| old.remove(h));
        d.answered.clear();
        for i in 0..d.paths.len() {
            if d.paths[i].m.last_reply().is_some() {
                note(d, i);
            }
        }
        d.lookup = hops
            .iter()
            .enumerate()
            .map(|(i, h)| (*h, i as u32))
            .collect();
        d.selector = (self.factory)(d.id, hops.len());
        d.challenger = None;
        d.better_since = None;
        d.current = old_current.and_then(|h| d.lookup.get(&h).map(|&i| i as usize));
        if d.reachable && d.current.is_none() {
            // The route went with the topology: move at once, like a failover.
            match best_working(d, now, fresh, None) {
                Some(b) => switch(d, b, ChangeReason::Topology, &mut self.events),
                None => {
                    d.reachable = false;
                    d.stats.unreachable_episodes += 1;
                    self.events
                        .push_back(RouterEvent::Unreachable { dst: d.id });
                }
            }
        }
    }

    /// When `on_tick` next wants to run (`None`: now).
    pub fn poll_timeout(&self) -> Option<Duration> {
        self.next_tick
    }

    /// A probe wanted now, outside the budget and the cadence: the checks
    /// of a failover's alternatives (see the module notes). Drain after
    /// every result and tick, like the events; pass each back with
    /// [`Router::on_probe_result`].
    pub fn poll_check(&mut self) -> Option<ProbeRequest> {
        self.checks.pop_front()
    }

    /// Once per interval (earlier calls do nothing): applies hysteresis and
    /// appends this interval's probes to `out`.
    pub fn on_tick(&mut self, now: Duration, out: &mut Vec<ProbeRequest>) {
        let interval = self.cfg.interval();
        if let Some(t) = self.next_tick {
            if now < t {
                return;
            }
            // Keep the cadence; after a long pause restart from now.
            self.next_tick = Some(if now - t < interval {
                t + interval
            } else {
                now + interval
            });
        } else {
            self.next_tick = Some(now + interval);
        }
        let k = self.cfg.probes_per_interval;
        let fresh = self.cfg.fresh();
        let tick = self.ticks;
        self.ticks += 1;
        let (steady_every, steady_after) =
            (u64::from(self.cfg.steady_every), self.cfg.steady_after());
        // A relayed path is at least as slow as its first leg, and the
        // first leg is the direct path to the relay, which this router
        // measures anyway when the relay is one of its destinations. Paths
        // whose first leg alone rules out beating the current route by the
        // margin are not worth a probe. The lower bound is the smallest
        // recent sample, not the average, so noise does not rule paths out.
        self.first_leg.clear();
        self.first_leg.resize(self.peers.len(), 0.0);
        if self.cfg.prune_by_first_leg {
            for (pi, p) in self.peers.iter().enumerate() {
                if let Some(&di) = self.index.get(p) {
                    let m = &self.dests[di].paths[0].m;
                    if m.works(now, fresh) {
                        self.first_leg[pi] = m.min_recent_rtt_ms().unwrap_or(0.0);
                    }
                }
            }
        }
        let mut lost = Vec::new();
        for d in &mut self.dests {
            if evaluate(d, now, &self.cfg, &mut self.events, &mut self.checks) {
                lost.push(d.id);
            }
            if !d.reachable || d.challenger.is_some() || d.unconfirmed {
                d.settled_since = None;
            }
            let settled = *d.settled_since.get_or_insert(now);
            // Spread over the intervals by id, so a proxy's steady
            // destinations do not all probe in the same one.
            if now.saturating_sub(settled) >= steady_after
                && !(tick + u64::from(d.id)).is_multiple_of(steady_every)
            {
                continue;
            }
            self.eligible.clear();
            self.eligible.resize(d.paths.len(), true);
            let floor = d.policy.rtt_floor_factor();
            if let (true, true, Some(cur), Some(f)) =
                (self.cfg.prune_by_first_leg, d.reachable, d.current, floor)
            {
                let limit = d.paths[cur].m.cost(&d.policy) * (1.0 - self.cfg.switch_margin);
                if limit.is_finite() {
                    for (e, &first) in self.eligible.iter_mut().zip(&d.firsts) {
                        if first != NO_RELAY {
                            *e = f * self.first_leg[first as usize] < limit;
                        }
                    }
                }
            }
            let chosen = &mut self.chosen;
            chosen.clear();
            let n = d.paths.len();
            let budget = d.selector.budget(k, n).min(n);
            let mut pin = |i: usize| {
                if chosen.len() < budget && !chosen.contains(&i) {
                    chosen.push(i);
                }
            };
            if d.reachable {
                if let Some(c) = d.current {
                    pin(c);
                }
            }
            if self.cfg.always_probe_direct {
                pin(0);
            }
            if let Some(c) = d.challenger {
                pin(c);
            }
            d.selector.select(chosen, budget, &self.eligible);
            d.stats.probes += chosen.len() as u64;
            out.extend(chosen.iter().map(|&i| ProbeRequest {
                dst: d.id,
                path: d.paths[i].hops,
                index: i as u32,
            }));
        }
        for gone in lost {
            self.relay_lost(now, gone);
        }
    }

    /// `gone` was just found unreachable: every path to it failed, the
    /// direct one among them, so the paths that relay through it (their
    /// first hop is `gone`) are dead too. Routes over them fail over now
    /// rather than each waiting out its own losses while the traffic
    /// relayed through a dead proxy is lost; a destination that becomes
    /// unreachable that way passes it on.
    fn relay_lost(&mut self, now: Duration, gone: u32) {
        let fresh = self.cfg.fresh();
        let mut work = vec![gone];
        while let Some(x) = work.pop() {
            for d in &mut self.dests {
                let through_x = |paths: &[Candidate], i: usize| {
                    let h = paths[i].hops;
                    h.len() > 1 && h.as_slice()[0] == x
                };
                for a in &mut d.answered {
                    if through_x(&d.paths, a.path as usize) {
                        // Until one of them answers again (`note`).
                        a.ok = false;
                    }
                }
                if d.reachable
                    && d.current.is_some_and(|c| through_x(&d.paths, c))
                    && failover(d, now, fresh, &mut self.events, &mut self.checks)
                {
                    work.push(d.id);
                }
            }
        }
    }

    /// The answer (or timeout) of a probe asked for by `on_tick`. Results
    /// for paths or destinations that no longer exist are ignored.
    pub fn on_probe_result(&mut self, now: Duration, probe: &ProbeRequest, outcome: ProbeOutcome) {
        self.on_result(now, probe.dst, Some(probe.index), &probe.path, outcome);
    }

    /// The result of a probe on `path` towards `dst` that this router did
    /// not ask for (the proxy's keepalives on current routes): filed like
    /// any other measurement of that path.
    pub fn on_path_result(&mut self, now: Duration, dst: u32, path: &Hops, outcome: ProbeOutcome) {
        self.on_result(now, dst, None, path, outcome);
    }

    fn on_result(
        &mut self,
        now: Duration,
        dst: u32,
        index: Option<u32>,
        path: &Hops,
        outcome: ProbeOutcome,
    ) {
        let Some(&di) = self.index.get(&dst) else {
            return;
        };
        let d = &mut self.dests[di];
        let hinted = index
            .map(|i| i as usize)
            .filter(|&i| d.paths.get(i).is_some_and(|c| c.hops == *path));
        let pi = match hinted {
            Some(i) => i,
            None => match d.lookup.get(path) {
                Some(&i) => i as usize,
                None => return,
            },
        };
        match outcome {
            ProbeOutcome::Reply { rtt } => {
                d.paths[pi].m.on_reply(now, rtt, &self.est);
                if d.current == Some(pi) {
                    d.unconfirmed = false;
                }
                let goal = note(d, pi);
                d.selector.observe(pi, goal.is_finite().then_some(goal));
                if !d.reachable {
                    let fresh = self.cfg.fresh();
                    let b = best_working(d, now, fresh, None).unwrap_or(pi);
                    let reason = if d.current.is_none() {
                        ChangeReason::Initial
                    } else {
                        ChangeReason::Restored
                    };
                    if d.current != Some(b) || reason == ChangeReason::Initial {
                        switch(d, b, reason, &mut self.events);
                    }
                    d.reachable = true;
                    self.events.push_back(RouterEvent::Reachable { dst: d.id });
                }
            }
            ProbeOutcome::Lost => {
                d.paths[pi].m.on_loss(now, &self.est);
                if d.paths[pi].slot != NOT_LISTED {
                    note(d, pi);
                }
                let grace = if d.unconfirmed {
                    1
                } else {
                    self.cfg.failover_losses
                };
                let dead = d.paths[pi].m.consecutive_losses() >= grace;
                d.selector.observe(pi, None);
                if d.reachable && d.current == Some(pi) {
                    d.settled_since = None;
                    if dead {
                        if failover(d, now, self.cfg.fresh(), &mut self.events, &mut self.checks) {
                            self.relay_lost(now, dst);
                        }
                    } else {
                        // A loss on the route is a doubt: probe it again at
                        // once rather than at the next interval, so an idle
                        // route that died fails over within a few probe
                        // timeouts (a busy one has its fast keepalives).
                        self.checks.push_back(ProbeRequest {
                            dst,
                            path: d.paths[pi].hops,
                            index: pi as u32,
                        });
                        d.stats.failover_checks += 1;
                    }
                }
            }
        }
    }

    /// An available-bandwidth measurement of a path (used by the bandwidth
    /// and weighted policies).
    pub fn on_bandwidth(&mut self, _now: Duration, dst: u32, path: &Hops, mbps: f64) {
        if let Some(&di) = self.index.get(&dst) {
            let d = &mut self.dests[di];
            if let Some(&pi) = d.lookup.get(path) {
                d.paths[pi as usize].m.on_bandwidth(mbps);
                if d.paths[pi as usize].slot != NOT_LISTED {
                    note(d, pi as usize);
                }
            }
        }
    }

    pub fn poll_event(&mut self) -> Option<RouterEvent> {
        self.events.pop_front()
    }

    /// The route traffic to `dst` takes, while it is reachable.
    pub fn current_path(&self, dst: u32) -> Option<Hops> {
        let d = &self.dests[*self.index.get(&dst)?];
        if d.reachable {
            d.current.map(|c| d.paths[c].hops)
        } else {
            None
        }
    }

    pub fn is_reachable(&self, dst: u32) -> bool {
        self.index
            .get(&dst)
            .is_some_and(|&i| self.dests[i].reachable)
    }

    /// Routes of all reachable destinations, in the form
    /// `ForwardingTable::build` takes (`via` empty for the direct path).
    pub fn relays(&self) -> Vec<(u32, Vec<u32>)> {
        let mut v: Vec<(u32, Vec<u32>)> = self
            .dests
            .iter()
            .filter(|d| d.reachable)
            .filter_map(|d| d.current.map(|c| (d.id, d.paths[c].hops)))
            .map(|(id, h)| (id, h.as_slice()[..h.len() - 1].to_vec()))
            .collect();
        v.sort_unstable_by_key(|(id, _)| *id);
        v
    }

    pub fn destinations(&self) -> impl Iterator<Item = u32> + '_ {
        self.dests.iter().map(|d| d.id)
    }

    pub fn policy(&self, dst: u32) -> Option<Policy> {
        self.index.get(&dst).map(|&i| self.dests[i].policy)
    }

    pub fn stats(&self, dst: u32) -> Option<DestinationStats> {
        self.index.get(&dst).map(|&i| self.dests[i].stats)
    }

    /// The candidates to `dst` that answered within `fresh` (index, path),
    /// in index order: what the proxy measures with packet trains. Read
    /// from the short list route decisions keep, not from every candidate.
    pub fn fresh_paths(&self, now: Duration, dst: u32) -> Vec<(u32, Hops)> {
        let Some(&di) = self.index.get(&dst) else {
            return Vec::new();
        };
        let d = &self.dests[di];
        let fresh = self.cfg.fresh();
        let mut v: Vec<(u32, Hops)> = d
            .answered
            .iter()
            .filter(|a| {
                d.paths[a.path as usize]
                    .m
                    .last_reply()
                    .is_some_and(|t| now.saturating_sub(t) <= fresh)
            })
            .map(|a| (a.path, d.paths[a.path as usize].hops))
            .collect();
        v.sort_unstable_by_key(|(i, _)| *i);
        v
    }

    /// Every candidate path to `dst` with what is known about it.
    pub fn paths(&self, dst: u32) -> Option<impl Iterator<Item = (Hops, &Measurement)> + '_> {
        let d = &self.dests[*self.index.get(&dst)?];
        Some(d.paths.iter().map(|c| (c.hops, &c.m)))
    }
}

/// Records path `i`'s measurement in the `answered` list (adding it if
/// needed) and returns its cost.
fn note(d: &mut Destination, i: usize) -> f64 {
    let c = &mut d.paths[i];
    let entry = Answered {
        path: i as u32,
        ok: c.m.consecutive_losses() == 0,
        cost: c.m.cost(&d.policy),
        last_reply: c.m.last_reply().unwrap_or_default(),
    };
    if c.slot == NOT_LISTED {
        c.slot = d.answered.len() as u32;
        d.answered.push(entry);
    } else {
        d.answered[c.slot as usize] = entry;
    }
    entry.cost
}

/// The cheapest path known to work (answered recently, last probe answered).
/// Prunes paths that have not answered within `fresh` from the list.
fn best_working(
    d: &mut Destination,
    now: Duration,
    fresh: Duration,
    skip: Option<usize>,
) -> Option<usize> {
    let mut best: Option<(usize, f64)> = None;
    let mut j = 0;
    while j < d.answered.len() {
        let a = d.answered[j];
        if now.saturating_sub(a.last_reply) > fresh {
            d.paths[a.path as usize].slot = NOT_LISTED;
            d.answered.swap_remove(j);
            if let Some(moved) = d.answered.get(j) {
                d.paths[moved.path as usize].slot = j as u32;
            }
            continue;
        }
        j += 1;
        let i = a.path as usize;
        if Some(i) == skip || !a.ok || !a.cost.is_finite() {
            continue;
        }
        // Ties go to the lower index (the direct path first), whatever the
        // list order.
        if best.is_none_or(|(bi, b)| a.cost < b || (a.cost == b && i < bi)) {
            best = Some((i, a.cost));
        }
    }
    best.map(|(i, _)| i)
}

fn switch(
    d: &mut Destination,
    to: usize,
    reason: ChangeReason,
    events: &mut VecDeque<RouterEvent>,
) {
    d.current = Some(to);
    d.challenger = None;
    d.better_since = None;
    d.settled_since = None;
    d.unconfirmed = reason == ChangeReason::Failover;
    d.stats.route_changes += 1;
    if reason == ChangeReason::Failover {
        d.stats.failovers += 1;
    }
    events.push_back(RouterEvent::RouteChanged {
        dst: d.id,
        path: d.paths[to].hops,
        reason,
    });
}

/// The current route stopped answering: move at once to the best path known
/// to work, or declare the destination unreachable (true). The first failover of
/// an episode asks for a check of every alternative (see the module
/// notes); later ones, while the route taken is unconfirmed, wait for
/// those checks' results instead of asking again.
fn failover(
    d: &mut Destination,
    now: Duration,
    fresh: Duration,
    events: &mut VecDeque<RouterEvent>,
    checks: &mut VecDeque<ProbeRequest>,
) -> bool {
    let failed = d.current;
    let best = best_working(d, now, fresh, failed);
    if !d.unconfirmed {
        // `best_working` left only fresh paths in `answered`.
        for a in &d.answered {
            let i = a.path as usize;
            if Some(i) != failed && a.ok {
                checks.push_back(ProbeRequest {
                    dst: d.id,
                    path: d.paths[i].hops,
                    index: a.path,
                });
                d.stats.failover_checks += 1;
            }
        }
    }
    match best {
        Some(b) => {
            switch(d, b, ChangeReason::Failover, events);
            false
        }
        None => {
            d.reachable = false;
            d.challenger = None;
            d.better_since = None;
            d.unconfirmed = false;
            d.stats.unreachable_episodes += 1;
            events.push_back(RouterEvent::Unreachable { dst: d.id });
            true
        }
    }
}

/// Hysteresis, once per interval: switch to the best working path if it has
/// been better than the current route by the margin for the hold time.
/// True when the destination became unreachable (a route gone stale).
fn evaluate(
    d: &mut Destination,
    now: Duration,
    cfg: &RoutingConfig,
    events: &mut VecDeque<RouterEvent>,
    checks: &mut VecDeque<ProbeRequest>,
) -> bool {
    let fresh = cfg.fresh();
    if !d.reachable {
        return false;
    }
    let Some(cur) = d.current else {
        return false;
    };
    // A route that has not answered for `fresh` is dead even if its losses
    // were never reported (a daemon that lost track of probes).
    if d.paths[cur]
        .m
        .last_reply()
        .is_none_or(|t| now.saturating_sub(t) > fresh)
    {
        return failover(d, now, fresh, events, checks);
    }
    let cur_cost = d.paths[cur].m.cost(&d.policy);
    let best = best_working(d, now, fresh, Some(cur));
    let better = best.filter(|&b| {
        let c = d.paths[b].m.cost(&d.policy);
        c < cur_cost * (1.0 - cfg.switch_margin) && cur_cost - c >= cfg.switch_min_gain_ms
    });
    match better {
        None => {
            d.challenger = None;
            d.better_since = None;
        }
        Some(b) => {
            d.challenger = Some(b);
            let since = *d.better_since.get_or_insert(now);
            if now.saturating_sub(since) >= cfg.hold() {
                switch(d, b, ChangeReason::Better, events);
            }
        }
    }
    false
}

#[cfg(test)]
mod tests;
