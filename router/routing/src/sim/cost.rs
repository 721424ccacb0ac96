//! What probing costs each simulated proxy, counted the way a deployed
//! proxy spends it (`pon-proxy`'s core, `router/proxy/src/core/router.rs`,
//! and its monitor), not only what the router's learning budget asks for.
//!
//! Kinds, per proxy:
//! - **learning**: the probes the [`Router`](crate::Router) asks for in
//!   `on_tick` (k per destination and interval, fewer when pruned).
//! - **keepalive**: the core has its monitor probe every destination's
//!   current route at least every `idle_keepalive` while the destination
//!   is reachable: a learning probe on the current route restarts the
//!   period (the monitor's rate is a floor). The monitor starts a path's
//!   schedule when the route is set (first probe at once) and drops it when
//!   the route changes or the destination becomes unreachable; an
//!   unchanged route keeps its phase. Fast keepalives (every `keepalive`)
//!   run only on a route whose traffic the egress's reports stopped
//!   confirming (`crate::passive`): counted as `failover_losses` lost
//!   probes on the old route of every failover of a busy pair (a lower
//!   bound: a probe or two more may leave before the third loss is seen).
//! - **reports**: the share `busy` of (source, destination) pairs carries
//!   traffic; their egress (the destination) sends the source a report
//!   every `report_every` while the destination is reachable. Not probes,
//!   but packets a proxy spends on measurement: in "on the wire".
//! - **bandwidth**: every `bandwidth_every`, for destinations whose policy
//!   weighs bandwidth, one train of `train_len` packets on each candidate
//!   that answered within the router's `fresh` window (the core's rule,
//!   via `Router::fresh_paths`), first at time 0.
//! - **answers**: the destination proxy's monitor answers every probe that
//!   reaches it (trains included), once. Learning probes count as answered
//!   when the simulator answered them; keepalives and train packets, which
//!   the simulator does not draw one by one, count the expected share,
//!   `1 − loss` of the path at that interval. A probe lost on its way back
//!   was answered but is not counted: with the series' loss rates (below
//!   5 %) answers are undercounted by a few percent at most.
//! - **relayed**: relays forward probes and answers (they do not answer):
//!   each answered probe is forwarded twice (out and back) by each relay
//!   on its path. Not probes a proxy sends, so not in "sent", but packets
//!   it puts on the wire for probing, so in "on the wire".
//!
//! "sent" = learning + keepalive + bandwidth (what a proxy originates for
//! its own destinations; per destination this is the figure to compare
//! with the target); "on the wire" = sent + answers + relayed.
//!
//! Keepalive and train results are counted, not fed to the routers: the
//! simulated routers decide from their learning probes alone (the current
//! route is among them every interval), so the quality figures do not
//! include the faster failover keepalives give a deployment.

use super::Scenario;
use crate::router::RouterEvent;
use crate::Router;
use pon_proto::pon::Hops;
use std::time::Duration;

/// Probe kinds, in the order of [`Counts::by_kind`].
pub const KINDS: [&str; 6] = [
    "learning",
    "keepalive",
    "bandwidth",
    "answers",
    "relayed",
    "reports",
];
const LEARNING: usize = 0;
const KEEPALIVE: usize = 1;
const BANDWIDTH: usize = 2;
const ANSWERS: usize = 3;
const RELAYED: usize = 4;
const REPORTS: usize = 5;

/// The proxy's extra probing, as pon-sim models it.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct CostConfig {
    /// Keepalive period of a route whose traffic went unconfirmed
    /// (`[proxy] keepalive_ms`).
    pub keepalive: Duration,
    /// Keepalive period of every other current route (`[proxy]
    /// idle_keepalive_ms`).
    pub idle_keepalive: Duration,
    /// Share of (source, destination) pairs that carry traffic.
    pub busy: f64,
    /// Their egress reports this often.
    pub report_every: Duration,
    /// Fast keepalives lost before a busy pair's route fails over
    /// (`failover_losses`).
    pub failover_losses: u32,
    /// Bandwidth trains this often (`None`: never).
    pub bandwidth_every: Option<Duration>,
    /// Packets per train (the monitor's `train_len`).
    pub train_len: u16,
}

impl Default for CostConfig {
    fn default() -> Self {
        CostConfig {
            keepalive: Duration::from_millis(crate::config::DEFAULT_KEEPALIVE_MS),
            idle_keepalive: Duration::from_millis(crate::config::DEFAULT_IDLE_KEEPALIVE_MS),
            busy: 0.2,
            report_every: Duration::from_millis(pon_proto::report::REPORT_EVERY_MS),
            failover_losses: 3,
            bandwidth_every: Some(Duration::from_millis(
                crate::config::DEFAULT_BANDWIDTH_EVERY_MS,
            )),
            train_len: pon_proto::measurement::DEFAULT_TRAIN_LEN,
        }
    }
}

/// Probe packets per kind (expected values, hence floats).
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Counts {
    pub by_kind: [f64; 6],
}

impl Counts {
    pub fn learning(&self) -> f64 {
        self.by_kind[LEARNING]
    }
    pub fn keepalive(&self) -> f64 {
        self.by_kind[KEEPALIVE]
    }
    pub fn bandwidth(&self) -> f64 {
        self.by_kind[BANDWIDTH]
    }
    pub fn answers(&self) -> f64 {
        self.by_kind[ANSWERS]
    }
    pub fn relayed(&self) -> f64 {
        self.by_kind[RELAYED]
    }
    pub fn reports(&self) -> f64 {
        self.by_kind[REPORTS]
    }
    /// What a proxy spends on measurement as an end of a pair: what it
    /// originates, its answers and its reports (relaying aside).
    pub fn spent(&self) -> f64 {
        self.sent() + self.answers() + self.reports()
    }
    /// Probes originated: learning + keepalive + bandwidth.
    pub fn sent(&self) -> f64 {
        self.learning() + self.keepalive() + self.bandwidth()
    }
    /// Everything put on the wire for measurement.
    pub fn wire(&self) -> f64 {
        self.sent() + self.answers() + self.relayed() + self.reports()
    }
    fn scaled(&self, f: f64) -> Counts {
        Counts {
            by_kind: self.by_kind.map(|x| x * f),
        }
    }
}

/// Probe cost of a run, in probes per second of scored time.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct CostReport {
    /// Per proxy, mean over the simulated sources.
    pub per_proxy_mean: Counts,
    /// Per proxy, each kind's maximum over proxies (a kind's max need not
    /// be the same proxy as another's). Answers and relayed packets are
    /// only known for every proxy when every site runs a router.
    pub per_proxy_max: Counts,
    /// The largest `sent()` and `wire()` of one proxy (NaN for `wire`
    /// unless every site ran a router).
    pub max_sent: f64,
    pub max_wire: f64,
    /// Per (source, destination) pair: what a proxy pays per destination.
    pub per_destination: Counts,
    /// Whether every site ran a router (else answers and relayed are
    /// estimated: every probe sent is answered somewhere, so their mean per
    /// proxy equals what a source's probes cause, and their max is unknown).
    pub all_sources: bool,
}

/// Where in a run a count happens: the series, the interval `t` (and
/// whether it is scored), and the simulated source (its position among the
/// sources, and its site).
#[derive(Clone, Copy)]
pub struct Source<'a> {
    pub s: &'a Scenario,
    pub t: usize,
    pub scored: bool,
    pub slot: usize,
    pub src: usize,
}

/// The keepalive schedule of one (source, destination): the watched path
/// and when its next probe goes out.
#[derive(Debug, Clone, Copy)]
struct Watch {
    path: Hops,
    next: Duration,
}

/// Counts one run's probes, per proxy and kind.
pub struct CostMeter {
    cfg: CostConfig,
    nodes: usize,
    /// Per simulated source (slot) and destination node.
    watch: Vec<Option<Watch>>,
    /// Per node: packets sent, by kind, in scored time.
    counts: Vec<Counts>,
    sources: usize,
    next_bandwidth: Vec<Duration>,
    /// Per simulated source: the end of its last interval.
    last_end: Vec<Duration>,
    hop_idx: Vec<usize>,
}

/// Whether (`src`, `dst`) is one of the `busy` share of pairs carrying
/// traffic: a fixed hash, so every run picks the same pairs.
pub fn is_busy(busy: f64, src: usize, dst: usize) -> bool {
    let h = (src as u64)
        .wrapping_mul(0x9e37_79b9_7f4a_7c15)
        .wrapping_add(dst as u64)
        .wrapping_mul(0xbf58_476d_1ce4_e5b9);
    ((h >> 11) as f64 / (1u64 << 53) as f64) < busy
}

/// Proxy ids are node indices plus one.
fn node(id: u32) -> usize {
    id as usize - 1
}

impl CostMeter {
    /// For `sources` simulated routers over `nodes` sites.
    pub fn new(cfg: CostConfig, nodes: usize, sources: usize) -> Self {
        CostMeter {
            cfg,
            nodes,
            watch: vec![None; sources * nodes],
            counts: vec![Counts::default(); nodes],
            sources,
            next_bandwidth: vec![Duration::ZERO; sources],
            last_end: vec![Duration::ZERO; sources],
            hop_idx: Vec::with_capacity(8),
        }
    }

    /// Loss of `path` from `src` at interval `t`.
    fn loss(&mut self, s: &Scenario, t: usize, src: usize, path: &Hops) -> f64 {
        self.hop_idx.clear();
        self.hop_idx
            .extend(path.as_slice().iter().map(|&h| node(h)));
        s.path(t, src, &self.hop_idx).loss
    }

    /// `n` probes from `src` on `path`, of which `answered` were answered.
    fn sent(&mut self, src: usize, kind: usize, path: &Hops, n: f64, answered: f64) {
        self.counts[src].by_kind[kind] += n;
        let hops = path.as_slice();
        self.counts[node(path.last())].by_kind[ANSWERS] += answered;
        for &r in &hops[..hops.len() - 1] {
            self.counts[node(r)].by_kind[RELAYED] += 2.0 * answered;
        }
    }

    /// A probe of `at.src` on `path` goes out at `when`: a keepalive is a
    /// floor (the monitor's rate), so one on the same path restarts its
    /// period.
    pub fn probed(&mut self, at: &Source, path: &Hops, when: Duration) {
        let d = node(path.last());
        self.keepalives_until(at, d, when);
        let every = self.cfg.idle_keepalive;
        if let Some(w) = &mut self.watch[at.slot * self.nodes + d] {
            if w.path == *path {
                w.next = w.next.max(when + every);
            }
        }
    }

    /// A learning probe of `at.src` on `path`, answered or not.
    pub fn learning(&mut self, at: &Source, path: &Hops, answered: bool) {
        if at.scored {
            self.sent(at.src, LEARNING, path, 1.0, f64::from(u8::from(answered)));
        }
    }

    /// At `src`'s tick `now` (interval `t`): the trains due, as the core
    /// sends them (after the tick's learning probes are asked for, before
    /// their answers).
    pub fn bandwidth(&mut self, at: &Source, router: &Router, now: Duration) {
        let (s, t, slot, src) = (at.s, at.t, at.slot, at.src);
        let Some(every) = self.cfg.bandwidth_every else {
            return;
        };
        if now < self.next_bandwidth[slot] {
            return;
        }
        self.next_bandwidth[slot] = now + every;
        let n = f64::from(self.cfg.train_len);
        for d in router.destinations() {
            if !router.policy(d).is_some_and(|p| p.weighs_bandwidth()) {
                continue;
            }
            for (_, path) in router.fresh_paths(now, d) {
                let delivered = 1.0 - self.loss(s, t, src, &path);
                if at.scored {
                    self.sent(src, BANDWIDTH, &path, n, n * delivered);
                }
            }
        }
    }

    /// Keepalives of (`slot`, `dst`) up to `until` (exclusive), charged to
    /// interval `t`.
    fn keepalives_until(&mut self, at: &Source, dst: usize, until: Duration) {
        let (s, t, slot, src) = (at.s, at.t, at.slot, at.src);
        let every = self.cfg.idle_keepalive.max(Duration::from_micros(1));
        let Some(w) = self.watch[slot * self.nodes + dst] else {
            return;
        };
        if w.next >= until {
            return;
        }
        let fires = (until - w.next).as_nanos().div_ceil(every.as_nanos()) as u32;
        let next = w.next + every * fires;
        self.watch[slot * self.nodes + dst] = Some(Watch { next, ..w });
        if at.scored {
            let delivered = 1.0 - self.loss(s, t, src, &w.path);
            let n = f64::from(fires);
            self.sent(src, KEEPALIVE, &w.path, n, n * delivered);
        }
    }

    /// A router event at `at`: the keepalives follow the destination's
    /// current route, as the core's `rewatch` does.
    pub fn event(&mut self, at: &Source, router: &Router, when: Duration, e: &RouterEvent) {
        let (dst, failover) = match *e {
            RouterEvent::RouteChanged { dst, reason, .. } => {
                (dst, reason == crate::ChangeReason::Failover)
            }
            RouterEvent::Unreachable { dst } => (dst, true),
            RouterEvent::Reachable { dst } => (dst, false),
        };
        let d = node(dst);
        self.keepalives_until(at, d, when);
        // A busy pair's route died: its reports stopped, and fast
        // keepalives ran on it until they were lost `failover_losses` times.
        if failover && at.scored && is_busy(self.cfg.busy, at.src, d) {
            if let Some(w) = self.watch[at.slot * self.nodes + d] {
                let n = f64::from(self.cfg.failover_losses);
                self.sent(at.src, KEEPALIVE, &w.path, n, 0.0);
            }
        }
        let w = &mut self.watch[at.slot * self.nodes + d];
        match router.current_path(dst) {
            None => *w = None,
            Some(p) if w.is_some_and(|w| w.path == p) => {}
            Some(p) => {
                *w = Some(Watch {
                    path: p,
                    next: when,
                })
            }
        }
    }

    /// The end of interval `at.t` for source `at.slot`: its keepalives up
    /// to `end` are charged to it.
    pub fn end_interval(&mut self, at: &Source, end: Duration) {
        let start = std::mem::replace(&mut self.last_end[at.slot], end);
        let reports =
            end.saturating_sub(start).as_secs_f64() / self.cfg.report_every.as_secs_f64().max(1e-6);
        for dst in 0..self.nodes {
            self.keepalives_until(at, dst, end);
            let reachable = self.watch[at.slot * self.nodes + dst].is_some();
            if at.scored && reachable && is_busy(self.cfg.busy, at.src, dst) {
                self.counts[dst].by_kind[REPORTS] += reports;
            }
        }
    }

    /// Probes per second, over `seconds` of scored time, `pairs` (source,
    /// destination) pairs simulated.
    pub fn report(&self, sources: &[usize], seconds: f64, pairs: f64) -> CostReport {
        let all_sources = self.sources == self.nodes;
        let per_sec = 1.0 / seconds.max(f64::MIN_POSITIVE);
        let mut total = Counts::default();
        let mut max = Counts::default();
        let (mut max_sent, mut max_wire) = (0.0f64, 0.0f64);
        for c in &self.counts {
            for k in 0..KINDS.len() {
                total.by_kind[k] += c.by_kind[k];
            }
        }
        for (i, c) in self.counts.iter().enumerate() {
            if sources.contains(&i) {
                max_sent = max_sent.max(c.sent());
                max_wire = max_wire.max(c.wire());
            }
            for k in 0..KINDS.len() {
                let mine = matches!(k, LEARNING | KEEPALIVE | BANDWIDTH);
                if mine && !sources.contains(&i) {
                    continue;
                }
                if !mine && !all_sources {
                    max.by_kind[k] = f64::NAN;
                    continue;
                }
                max.by_kind[k] = max.by_kind[k].max(c.by_kind[k]);
            }
        }
        CostReport {
            per_proxy_mean: total.scaled(per_sec / sources.len().max(1) as f64),
            per_proxy_max: max.scaled(per_sec),
            max_sent: max_sent * per_sec,
            max_wire: if all_sources {
                max_wire * per_sec
            } else {
                f64::NAN
            },
            per_destination: total.scaled(per_sec / pairs.max(1.0)),
            all_sources,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sim::from_csv;
    use crate::{Policy, ProbeOutcome, ProbeRequest, RoutingConfig};

    const MS: Duration = Duration::from_millis(1);

    /// Sites 0, 1, 2 (ids 1, 2, 3); the direct link 0–2 goes down at
    /// interval 1, the relayed path through 1 stays up.
    fn scenario() -> Scenario {
        let csv = "0,0,1,10\n0,1,2,10\n0,0,2,10\n1,0,2,inf\n";
        from_csv(csv.as_bytes(), 40).unwrap()
    }

    fn router(policy: Policy) -> Router {
        let mut r = Router::new(
            1,
            RoutingConfig {
                policy,
                ..Default::default()
            },
        )
        .unwrap();
        r.set_peers(Duration::ZERO, &[1, 2, 3]);
        r.add_destination(3, None);
        r
    }

    fn at(s: &Scenario, t: usize) -> Source<'_> {
        Source {
            s,
            t,
            scored: true,
            slot: 0,
            src: 0,
        }
    }

    /// Feeds one result for `path` at `when` to the router and the meter,
    /// and the events it causes.
    fn feed(
        at: Source,
        r: &mut Router,
        cost: &mut CostMeter,
        path: &[u32],
        when: Duration,
        outcome: ProbeOutcome,
    ) {
        let path = Hops::new(path).unwrap();
        let index = r.paths(3).unwrap().position(|(h, _)| h == path).unwrap() as u32;
        let req = ProbeRequest {
            dst: 3,
            path,
            index,
        };
        r.on_probe_result(when, &req, outcome);
        cost.learning(&at, &path, matches!(outcome, ProbeOutcome::Reply { .. }));
        while let Some(e) = r.poll_event() {
            cost.event(&at, r, when, &e);
        }
    }

    #[test]
    fn keepalives_follow_the_route_and_answers_the_path() {
        let s = scenario();
        let mut r = router(Policy::Latency);
        // Keepalives every 50 ms on every route (the policy before passive
        // measurement), no traffic: the arithmetic below.
        let cfg = CostConfig {
            idle_keepalive: 50 * MS,
            busy: 0.0,
            ..CostConfig::default()
        };
        let mut cost = CostMeter::new(cfg, 3, 1);
        let reply = ProbeOutcome::Reply { rtt: 10 * MS };
        // Interval 0: the direct path answers at 10 ms and becomes the
        // route; keepalives at 10, 60, ..., 960 ms: 20, all answered.
        feed(at(&s, 0), &mut r, &mut cost, &[3], 10 * MS, reply);
        cost.end_interval(&at(&s, 0), 1000 * MS);
        // Interval 1: the relayed path answers, the direct one (now down)
        // loses three probes and the route fails over at 1.5 s. Keepalives
        // on the direct path at 1010..=1460 (10, unanswered), on the
        // relayed one from 1500 to 1950 (10, answered, each forwarded out
        // and back by site 1).
        feed(at(&s, 1), &mut r, &mut cost, &[2, 3], 1200 * MS, reply);
        for _ in 0..3 {
            feed(
                at(&s, 1),
                &mut r,
                &mut cost,
                &[3],
                1500 * MS,
                ProbeOutcome::Lost,
            );
        }
        assert_eq!(r.current_path(3), Some(Hops::new(&[2, 3]).unwrap()));
        cost.end_interval(&at(&s, 1), 2000 * MS);
        // Interval 2: the relayed path loses three probes at 2.5 s, nothing
        // else works: unreachable, keepalives stop after 2000..=2450 (10).
        for _ in 0..3 {
            feed(
                at(&s, 2),
                &mut r,
                &mut cost,
                &[2, 3],
                2500 * MS,
                ProbeOutcome::Lost,
            );
        }
        assert!(!r.is_reachable(3));
        cost.end_interval(&at(&s, 2), 3000 * MS);
        cost.end_interval(&at(&s, 3), 4000 * MS);

        let c = &cost.counts;
        assert_eq!(c[0].keepalive(), 50.0);
        assert_eq!(c[0].learning(), 8.0);
        // Answers at site 2: 20 + 10 + 10 keepalives, and the two learning
        // probes answered.
        assert_eq!(c[2].answers(), 42.0);
        assert_eq!(c[0].answers(), 0.0);
        // Relayed by site 1: 20 answered keepalives and 1 answered learning
        // probe, out and back.
        assert_eq!(c[1].relayed(), 42.0);
        assert_eq!(c[1].sent(), 0.0);

        let rep = cost.report(&[0], 2.0, 1.0);
        assert_eq!(rep.per_destination.keepalive(), 25.0);
        assert_eq!(rep.per_proxy_mean.sent(), 29.0);
        assert_eq!(rep.per_proxy_mean.wire(), 29.0 + 21.0 + 21.0);
        assert_eq!(rep.max_sent, 29.0);
        // One of three sites simulated: the busiest answerer is unknown.
        assert!(!rep.all_sources);
        assert!(rep.per_proxy_max.answers().is_nan() && rep.max_wire.is_nan());
    }

    #[test]
    fn a_probe_on_the_route_postpones_its_keepalive() {
        let s = scenario();
        let mut r = router(Policy::Latency);
        let cfg = CostConfig {
            idle_keepalive: 1000 * MS,
            busy: 0.0,
            ..CostConfig::default()
        };
        let mut cost = CostMeter::new(cfg, 3, 1);
        let reply = ProbeOutcome::Reply { rtt: 10 * MS };
        let direct = Hops::new(&[3]).unwrap();
        // The route is set at 10 ms (a keepalive at once); learning probes
        // on it every 800 ms from 500 ms keep it from ever being due again
        // until they stop (last at 3.7 s): the next at 4.7 s.
        feed(at(&s, 0), &mut r, &mut cost, &[3], 10 * MS, reply);
        for t in (500..4000).step_by(800) {
            cost.probed(&at(&s, 0), &direct, t * MS);
            // A probe on another path changes nothing.
            cost.probed(&at(&s, 0), &Hops::new(&[2, 3]).unwrap(), (t + 300) * MS);
        }
        cost.end_interval(&at(&s, 0), 5000 * MS);
        assert_eq!(cost.counts[0].keepalive(), 2.0);
    }

    #[test]
    fn busy_pairs_cost_reports_and_fast_keepalives_at_failover_only() {
        let s = scenario();
        let mut r = router(Policy::Latency);
        let cfg = CostConfig {
            busy: 1.0,
            ..CostConfig::default()
        };
        let mut cost = CostMeter::new(cfg, 3, 1);
        let reply = ProbeOutcome::Reply { rtt: 10 * MS };
        // Interval 0: direct route from 10 ms; slow keepalives at 10 ms
        // only (every 2.5 s); reports all interval long.
        feed(at(&s, 0), &mut r, &mut cost, &[3], 10 * MS, reply);
        cost.end_interval(&at(&s, 0), 1000 * MS);
        assert_eq!(cost.counts[0].keepalive(), 1.0);
        assert!((cost.counts[2].reports() - 5.0).abs() < 1e-9);
        // Interval 1: the direct route fails over to the relay: three fast
        // keepalives lost on it, on top of the slow one on the relayed
        // route at 1500 ms (the direct one's next was due at 2510 ms).
        feed(at(&s, 1), &mut r, &mut cost, &[2, 3], 1200 * MS, reply);
        for _ in 0..3 {
            let lost = ProbeOutcome::Lost;
            feed(at(&s, 1), &mut r, &mut cost, &[3], 1500 * MS, lost);
        }
        cost.end_interval(&at(&s, 1), 2000 * MS);
        assert_eq!(cost.counts[0].keepalive(), 1.0 + 3.0 + 1.0);
        assert!((cost.counts[2].reports() - 10.0).abs() < 1e-9);
        assert!(is_busy(1.0, 0, 2) && !is_busy(0.0, 0, 2));
        let share = (0..100)
            .flat_map(|a| (0..100).map(move |b| (a, b)))
            .filter(|&(a, b)| is_busy(0.2, a, b))
            .count();
        assert!((1800..2200).contains(&share), "{share}");
    }

    #[test]
    fn trains_go_to_fresh_paths_of_bandwidth_policies_only() {
        let s = scenario();
        let reply = ProbeOutcome::Reply { rtt: 10 * MS };
        for (policy, weighs) in [(Policy::Bandwidth, 1.0), (Policy::Latency, 0.0)] {
            let mut r = router(policy);
            let mut cost = CostMeter::new(CostConfig::default(), 3, 1);
            cost.bandwidth(&at(&s, 0), &r, Duration::ZERO);
            // Both candidates answer at 29.5 s; 10 s is not due (every
            // 30 s from 0); at 30 s both get a train of 16.
            feed(at(&s, 29), &mut r, &mut cost, &[2, 3], 29_500 * MS, reply);
            feed(at(&s, 29), &mut r, &mut cost, &[3], 29_500 * MS, reply);
            cost.bandwidth(&at(&s, 10), &r, 10_000 * MS);
            cost.bandwidth(&at(&s, 30), &r, 30_000 * MS);
            let c = &cost.counts;
            assert_eq!(c[0].bandwidth(), weighs * 32.0, "{policy:?}");
            // The direct link is down at interval 30: only the relayed
            // train is answered (and forwarded by site 1 both ways).
            assert_eq!(c[2].answers(), 2.0 + weighs * 16.0, "{policy:?}");
            assert_eq!(c[1].relayed(), 2.0 + weighs * 32.0, "{policy:?}");
        }
    }
}
