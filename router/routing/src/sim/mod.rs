//! The simulator behind `pon-sim`: one [`Router`] per site, all driven over
//! the same time series of link matrices, each probe answered from the
//! matrix of its interval (lost with the path's loss rate, RTT with a little
//! measurement noise). What the routers chose is compared, interval by
//! interval, with an oracle that knows every path's true state.
//!
//! Time is discrete: at interval `t` every router ticks at `t·interval`,
//! its probes are answered in RTT order (losses at the probe timeout), and
//! the route it holds afterwards is scored against matrix `t`.

pub mod cost;
pub mod scenario;

pub use cost::{CostConfig, CostMeter, CostReport, Counts, Source};
pub use scenario::{from_csv, generate, CsvError, GenParams, PathTruth, Scenario};

use super::policy::{PathMetrics, Policy};
use super::rng::Rng;
use super::router::{ChangeReason, ProbeOutcome, ProbeRequest, Router, RouterEvent};
use super::RoutingConfig;
use std::time::{Duration, Instant};

/// The best path's RTT for every (interval, source, destination), under
/// full knowledge; infinite when no candidate path is alive.
pub struct Oracle {
    nodes: usize,
    /// The sites whose routers are simulated (all of them unless sampled),
    /// ascending, and each site's position among them (`NOT_SOURCE`).
    sources: Vec<usize>,
    slot: Vec<u32>,
    best_rtt: Vec<f32>,
    /// Candidate paths per destination (what a full mesh probes).
    pub candidates: usize,
}

impl Oracle {
    /// `src` must be one of `sources()`.
    pub fn best_rtt(&self, t: usize, src: usize, dst: usize) -> f64 {
        let slot = self.slot[src] as usize;
        debug_assert!(slot != NOT_SOURCE as usize, "{src} is not simulated");
        f64::from(self.best_rtt[(t * self.sources.len() + slot) * self.nodes + dst])
    }

    pub fn sources(&self) -> &[usize] {
        &self.sources
    }
}

const NOT_SOURCE: u32 = u32::MAX;

/// `count` sites spread evenly over `nodes` (all of them if `count` is
/// not smaller): the sources a sampled run simulates.
pub fn spread_sources(nodes: usize, count: usize) -> Vec<usize> {
    if count >= nodes {
        return (0..nodes).collect();
    }
    (0..count).map(|i| i * nodes / count.max(1)).collect()
}

fn truth_cost(policy: &Policy, p: PathTruth) -> f64 {
    policy.cost(&PathMetrics {
        rtt_ms: p.rtt_ms,
        loss: p.loss,
        bandwidth_mbps: None,
    })
}

/// Computes the oracle for every source (parallel over intervals,
/// `threads` at most).
pub fn oracle(s: &Scenario, policy: &Policy, max_relays: u8, threads: usize) -> Oracle {
    oracle_for(
        s,
        policy,
        max_relays,
        threads,
        &spread_sources(s.nodes, s.nodes),
    )
}

/// Computes the oracle for the routers at `sources` only (ascending site
/// indices): what a sampled run scores.
pub fn oracle_for(
    s: &Scenario,
    policy: &Policy,
    max_relays: u8,
    threads: usize,
    sources: &[usize],
) -> Oracle {
    let n = s.nodes;
    let m = sources.len();
    let mut best_rtt = vec![f32::INFINITY; s.intervals * m * n];
    let threads = threads.max(1);
    let chunk_t = s.intervals.div_ceil(threads).max(1);
    std::thread::scope(|scope| {
        for (c, chunk) in best_rtt.chunks_mut((chunk_t * m * n).max(1)).enumerate() {
            scope.spawn(move || {
                for (dt, slab) in chunk.chunks_mut((m * n).max(1)).enumerate() {
                    let t = c * chunk_t + dt;
                    for (slot, &src) in sources.iter().enumerate() {
                        for dst in 0..n {
                            if src == dst {
                                continue;
                            }
                            let mut best = (f64::INFINITY, f64::INFINITY);
                            let mut consider = |p: PathTruth| {
                                let cost = truth_cost(policy, p);
                                if cost < best.0 {
                                    best = (cost, p.rtt_ms);
                                }
                            };
                            consider(s.path(t, src, &[dst]));
                            for r in 0..n {
                                if r == src || r == dst {
                                    continue;
                                }
                                consider(s.path(t, src, &[r, dst]));
                                if max_relays >= 2 {
                                    for r2 in 0..n {
                                        if r2 != src && r2 != dst && r2 != r {
                                            consider(s.path(t, src, &[r, r2, dst]));
                                        }
                                    }
                                }
                            }
                            slab[slot * n + dst] = best.1 as f32;
                        }
                    }
                }
            });
        }
    });
    let relays = n.saturating_sub(2);
    let candidates = 1
        + relays
        + if max_relays >= 2 {
            relays * relays.saturating_sub(1)
        } else {
            0
        };
    let mut slot = vec![NOT_SOURCE; n];
    for (i, &src) in sources.iter().enumerate() {
        slot[src] = i as u32;
    }
    Oracle {
        nodes: n,
        sources: sources.to_vec(),
        slot,
        best_rtt,
        candidates,
    }
}

/// How a run is set up besides the routers' own configuration.
#[derive(Debug, Clone)]
pub struct RunConfig {
    pub routing: RoutingConfig,
    /// Intervals at the start that are not scored (learning from nothing).
    pub warmup: usize,
    /// Relative standard deviation of the RTT a probe measures.
    pub probe_jitter: f64,
    /// A probe not answered within this is lost.
    pub probe_timeout: Duration,
    pub seed: u64,
    /// Print every interval of this (source, destination) pair to stderr:
    /// the route, its RTT, the oracle's, and the paths probed.
    pub trace: Option<(usize, usize)>,
    /// The proxy's probing besides the router's (keepalives, trains).
    pub cost: CostConfig,
}

/// What one selector achieved.
#[derive(Debug, Clone)]
pub struct Report {
    pub selector: String,
    /// Per (source, destination) pair: Σ achieved RTT / Σ oracle RTT over
    /// the scored intervals where both were alive; mean, median, p95, worst.
    pub ratio_mean: f64,
    pub ratio_p50: f64,
    pub ratio_p95: f64,
    pub ratio_max: f64,
    /// The pair with the worst ratio (site indices).
    pub worst_pair: (usize, usize),
    /// Share of pairs within 5 % of the oracle.
    pub pairs_within_5pct: f64,
    /// Share of (pair, interval) with a live oracle path where the route in
    /// use was dead (traffic lost).
    pub dead_share: f64,
    /// ...where the router had declared the destination unreachable
    /// (traffic falls back to the IP path).
    pub unreachable_share: f64,
    /// Route changes (besides the first) per pair per 100 intervals.
    pub changes_per_pair_per_100: f64,
    /// Of which failovers.
    pub failovers_per_pair_per_100: f64,
    /// Probes per destination per interval.
    pub probes_per_dst_interval: f64,
    /// What the full mesh sends per destination per interval.
    pub full_mesh_probes: usize,
    /// Every probe the proxies send and answer, by kind (`None` for the
    /// direct baseline: no overlay, no probes).
    pub cost: Option<CostReport>,
    pub elapsed: Duration,
}

impl Report {
    /// The pairs' scores (`acc`, n x n) summarised, with no route changes
    /// or probes: a run with a router fills those in itself.
    fn scored(
        selector: String,
        acc: &[PairAcc],
        n: usize,
        oracle: &Oracle,
        started: Instant,
    ) -> Report {
        let sum = summarise(acc, n);
        Report {
            selector,
            ratio_mean: sum.mean,
            ratio_p50: sum.p50,
            ratio_p95: sum.p95,
            ratio_max: sum.max,
            worst_pair: sum.worst,
            pairs_within_5pct: sum.within,
            dead_share: sum.dead,
            unreachable_share: sum.unreachable,
            changes_per_pair_per_100: 0.0,
            failovers_per_pair_per_100: 0.0,
            probes_per_dst_interval: 0.0,
            full_mesh_probes: oracle.candidates,
            cost: None,
            elapsed: started.elapsed(),
        }
    }
}

#[derive(Default, Clone, Copy)]
struct PairAcc {
    achieved: f64,
    best: f64,
    scored: u32,
    dead: u32,
    unreachable: u32,
}

impl PairAcc {
    /// One interval in which traffic took `path` and the oracle's best
    /// path had RTT `best`: scored against it, or dead if `path` was.
    fn score(&mut self, path: PathTruth, best: f64) {
        if path.alive() {
            self.achieved += path.rtt_ms;
            self.best += best;
            self.scored += 1;
        } else {
            self.dead += 1;
        }
    }
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let idx = ((p * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len()) - 1;
    sorted[idx]
}

struct Summary {
    worst: (usize, usize),
    mean: f64,
    p50: f64,
    p95: f64,
    max: f64,
    within: f64,
    dead: f64,
    unreachable: f64,
}

fn summarise(acc: &[PairAcc], n: usize) -> Summary {
    let worst = acc
        .iter()
        .enumerate()
        .filter(|(_, a)| a.best > 0.0)
        .max_by(|(_, a), (_, b)| (a.achieved / a.best).total_cmp(&(b.achieved / b.best)))
        .map_or((0, 0), |(i, _)| (i / n.max(1), i % n.max(1)));
    let mut ratios: Vec<f64> = acc
        .iter()
        .filter(|a| a.best > 0.0)
        .map(|a| a.achieved / a.best)
        .collect();
    ratios.sort_by(f64::total_cmp);
    let alive: u64 = acc
        .iter()
        .map(|a| u64::from(a.scored + a.dead + a.unreachable))
        .sum();
    let share = |x: u64| {
        if alive == 0 {
            0.0
        } else {
            x as f64 / alive as f64
        }
    };
    Summary {
        worst,
        mean: ratios.iter().sum::<f64>() / ratios.len().max(1) as f64,
        p50: percentile(&ratios, 0.5),
        p95: percentile(&ratios, 0.95),
        max: ratios.last().copied().unwrap_or(f64::NAN),
        within: ratios.iter().filter(|r| **r <= 1.05).count() as f64 / ratios.len().max(1) as f64,
        dead: share(acc.iter().map(|a| u64::from(a.dead)).sum()),
        unreachable: share(acc.iter().map(|a| u64::from(a.unreachable)).sum()),
    }
}

/// |N(0,1)|, approximately (Irwin-Hall: four uniforms), for probe noise:
/// a third of the cost of Box-Muller, which matters at a million probes per
/// interval.
fn half_normal(rng: &mut Rng) -> f64 {
    let u = rng.f64() + rng.f64() + rng.f64() + rng.f64();
    ((u - 2.0) * 3f64.sqrt()).abs()
}

/// Sends probe `p` of source `src` at `sent` in interval `t` through the
/// scenario: when its result is known, and what it is.
#[allow(clippy::too_many_arguments)]
fn probe(
    s: &Scenario,
    t: usize,
    src: usize,
    p: &ProbeRequest,
    sent: Duration,
    rc: &RunConfig,
    rng: &mut Rng,
    hop_idx: &mut Vec<usize>,
) -> (Duration, ProbeOutcome) {
    hop_idx.clear();
    hop_idx.extend(p.path.as_slice().iter().map(|&h| h as usize - 1));
    let truth = s.path(t, src, hop_idx);
    let rtt_ms = truth.rtt_ms * (1.0 + rc.probe_jitter * half_normal(rng));
    let rtt = Duration::from_secs_f64(rtt_ms.max(0.0) / 1000.0);
    if rng.chance(truth.loss) || rtt > rc.probe_timeout {
        (sent + rc.probe_timeout, ProbeOutcome::Lost)
    } else {
        (sent + rtt, ProbeOutcome::Reply { rtt })
    }
}

/// Proxy ids are node indices plus one (id 0 is reserved).
fn id(node: usize) -> u32 {
    node as u32 + 1
}

/// Runs one configuration (its `routing.selector`) over the scenario.
pub fn run(s: &Scenario, oracle: &Oracle, rc: &RunConfig) -> Report {
    let started = Instant::now();
    let n = s.nodes;
    let interval = rc.routing.interval();
    let all: Vec<u32> = (0..n).map(id).collect();
    let sources = oracle.sources();
    let mut routers: Vec<Router> = sources
        .iter()
        .map(|&i| {
            let mut r = Router::new(id(i), rc.routing.clone()).expect("valid routing config");
            r.set_peers(Duration::ZERO, &all);
            for &d in &all {
                r.add_destination(d, None);
            }
            r
        })
        .collect();
    let mut rng = Rng::derive(rc.seed, 0x5eed);
    let mut acc = vec![PairAcc::default(); n * n];
    let mut probes: Vec<ProbeRequest> = Vec::new();
    let mut results: Vec<(Duration, usize, ProbeOutcome)> = Vec::new();
    let mut hop_idx: Vec<usize> = Vec::with_capacity(8);
    let (mut total_probes, mut changes, mut failovers) = (0u64, 0u64, 0u64);
    let mut cost = CostMeter::new(rc.cost, n, sources.len());
    for t in 0..s.intervals {
        let now = interval * t as u32;
        let scored = t >= rc.warmup;
        for (slot, router) in routers.iter_mut().enumerate() {
            let src = sources[slot];
            let at = Source {
                s,
                t,
                scored,
                slot,
                src,
            };
            probes.clear();
            results.clear();
            router.on_tick(now, &mut probes);
            // Events are drained as they happen (not once per interval), so
            // that the keepalives follow each route change at its time.
            let mut drain = |router: &mut Router, cost: &mut CostMeter, when: Duration| {
                while let Some(e) = router.poll_event() {
                    cost.event(&at, router, when, &e);
                    if let RouterEvent::RouteChanged { reason, .. } = e {
                        if scored && reason != ChangeReason::Initial {
                            changes += 1;
                            failovers += u64::from(reason == ChangeReason::Failover);
                        }
                    }
                }
            };
            drain(router, &mut cost, now);
            cost.bandwidth(&at, router, now);
            if scored {
                total_probes += probes.len() as u64;
            }
            for (pi, p) in probes.iter().enumerate() {
                cost.probed(&at, &p.path, now);
                let (when, outcome) = probe(s, t, src, p, now, rc, &mut rng, &mut hop_idx);
                results.push((when, pi, outcome));
            }
            // Destinations are independent inside a router, so only the
            // order of each destination's results matters (probes come
            // grouped by destination): sorting the groups is much cheaper
            // than sorting everything when the full mesh sends thousands.
            let mut start = 0;
            while start < results.len() {
                let dst = probes[results[start].1].dst;
                let mut end = start + 1;
                while end < results.len() && probes[results[end].1].dst == dst {
                    end += 1;
                }
                results[start..end].sort_unstable_by_key(|(at, pi, _)| (*at, *pi));
                start = end;
            }
            for &(when, pi, outcome) in &results {
                let p = &probes[pi];
                router.on_probe_result(when, p, outcome);
                let answered = matches!(outcome, ProbeOutcome::Reply { .. });
                cost.learning(&at, &p.path, answered);
                drain(router, &mut cost, when);
                // A failover's checks go out at once; their results are
                // filed at once too (at their own times), ahead of the
                // interval's later results: close enough at the
                // simulation's interval granularity.
                while let Some(c) = router.poll_check() {
                    cost.probed(&at, &c.path, when);
                    let (at_c, o) = probe(s, t, src, &c, when, rc, &mut rng, &mut hop_idx);
                    router.on_probe_result(at_c, &c, o);
                    // Outside the budget k (`probes_per_dst_interval`),
                    // but paid for like learning probes.
                    cost.learning(&at, &c.path, matches!(o, ProbeOutcome::Reply { .. }));
                    drain(router, &mut cost, at_c);
                }
            }
            cost.end_interval(&at, now + interval);
            if !scored {
                continue;
            }
            for dst in 0..n {
                if dst == src {
                    continue;
                }
                let best = oracle.best_rtt(t, src, dst);
                if !best.is_finite() {
                    continue;
                }
                if rc.trace == Some((src, dst)) {
                    let route = router.current_path(id(dst));
                    let rtt = route.map(|p| {
                        hop_idx.clear();
                        hop_idx.extend(p.as_slice().iter().map(|&h| h as usize - 1));
                        s.path(t, src, &hop_idx).rtt_ms
                    });
                    let probed: Vec<Vec<u32>> = probes
                        .iter()
                        .filter(|p| p.dst == id(dst))
                        .map(|p| p.path.as_slice().iter().map(|h| h - 1).collect())
                        .collect();
                    eprintln!(
                        "{} t={t} route={:?} rtt={:.1?} oracle={best:.1} probed={probed:?}",
                        rc.routing.selector.name(),
                        route.map(|p| p.as_slice().iter().map(|h| h - 1).collect::<Vec<_>>()),
                        rtt,
                    );
                }
                let a = &mut acc[src * n + dst];
                match router.current_path(id(dst)) {
                    None => a.unreachable += 1,
                    Some(path) => {
                        hop_idx.clear();
                        hop_idx.extend(path.as_slice().iter().map(|&h| h as usize - 1));
                        a.score(s.path(t, src, &hop_idx), best);
                    }
                }
            }
        }
    }
    let pairs = (sources.len() * (n - 1)) as f64;
    let scored_intervals = s.intervals.saturating_sub(rc.warmup).max(1) as f64;
    let seconds = scored_intervals * interval.as_secs_f64();
    Report {
        cost: Some(cost.report(sources, seconds, pairs)),
        changes_per_pair_per_100: changes as f64 / pairs / scored_intervals * 100.0,
        failovers_per_pair_per_100: failovers as f64 / pairs / scored_intervals * 100.0,
        probes_per_dst_interval: total_probes as f64 / pairs / scored_intervals,
        ..Report::scored(
            rc.routing.selector.name().to_string(),
            &acc,
            n,
            oracle,
            started,
        )
    }
}

/// The plain IP path (no overlay) scored the same way, for context.
pub fn direct_baseline(s: &Scenario, oracle: &Oracle, warmup: usize) -> Report {
    let started = Instant::now();
    let n = s.nodes;
    let mut acc = vec![PairAcc::default(); n * n];
    for t in warmup..s.intervals {
        for &src in oracle.sources() {
            for dst in 0..n {
                let best = oracle.best_rtt(t, src, dst);
                if src == dst || !best.is_finite() {
                    continue;
                }
                let a = &mut acc[src * n + dst];
                a.score(s.path(t, src, &[dst]), best);
            }
        }
    }
    // No router: no route changes and no probes.
    Report::scored("direct-ip".into(), &acc, n, oracle, started)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::SelectorKind;

    fn small() -> (Scenario, Oracle) {
        let s = generate(&GenParams {
            link_outage_rate: 0.003,
            ..GenParams::new(12, 120, 11)
        });
        let o = oracle(&s, &Policy::Latency, 1, 2);
        (s, o)
    }

    fn rc(kind: SelectorKind) -> RunConfig {
        RunConfig {
            routing: RoutingConfig {
                selector: kind,
                ..Default::default()
            },
            warmup: 20,
            probe_jitter: 0.02,
            probe_timeout: Duration::from_secs(2),
            seed: 1,
            trace: None,
            cost: CostConfig::default(),
        }
    }

    #[test]
    fn oracle_is_never_beaten_and_the_direct_path_often_is() {
        let (s, o) = small();
        assert_eq!(o.candidates, 11);
        for t in [0, 50, 119] {
            for src in 0..12 {
                for dst in 0..12 {
                    if src == dst {
                        continue;
                    }
                    let b = o.best_rtt(t, src, dst);
                    let d = s.path(t, src, &[dst]);
                    if d.alive() && d.loss == 0.0 {
                        assert!(b <= d.rtt_ms + 1e-3);
                    }
                }
            }
        }
        let base = direct_baseline(&s, &o, 20);
        assert!(base.ratio_mean > 1.02, "{}", base.ratio_mean);
        assert!(base.ratio_p95 > base.ratio_p50);
    }

    #[test]
    fn budgeted_selectors_probe_k_and_full_mesh_probes_all() {
        let (s, o) = small();
        let every = |kind| {
            let mut c = rc(kind);
            c.routing.steady_every = 1;
            c
        };
        let rnn = run(&s, &o, &every(SelectorKind::Rnn));
        // At most k; fewer when first-leg pruning leaves nothing worth it.
        assert!(rnn.probes_per_dst_interval <= 3.0 && rnn.probes_per_dst_interval > 2.0);
        // Steady destinations probe every other interval.
        let steady = run(&s, &o, &rc(SelectorKind::Rnn));
        let p = steady.probes_per_dst_interval;
        assert!(p < 0.7 * rnn.probes_per_dst_interval && p > 1.0, "{p}");
        let mut no_prune = every(SelectorKind::Random);
        no_prune.routing.prune_by_first_leg = false;
        let random = run(&s, &o, &no_prune);
        assert!((random.probes_per_dst_interval - 3.0).abs() < 1e-9);
        let fm = run(&s, &o, &every(SelectorKind::FullMesh));
        assert!((fm.probes_per_dst_interval - 11.0).abs() < 1e-9);
        // Full knowledge (with noise and hysteresis) stays close to the oracle.
        assert!(fm.ratio_mean < 1.03, "{}", fm.ratio_mean);
        assert!(fm.ratio_mean >= 0.99);
        let base = direct_baseline(&s, &o, 20);
        assert!(
            rnn.ratio_mean < base.ratio_mean,
            "{} vs {}",
            rnn.ratio_mean,
            base.ratio_mean
        );
        assert!(rnn.dead_share < base.dead_share);
    }

    #[test]
    fn runs_are_reproducible() {
        let (s, o) = small();
        let a = run(&s, &o, &rc(SelectorKind::Bandit));
        let b = run(&s, &o, &rc(SelectorKind::Bandit));
        assert_eq!(a.ratio_mean, b.ratio_mean);
        assert_eq!(a.changes_per_pair_per_100, b.changes_per_pair_per_100);
    }

    #[test]
    fn percentiles() {
        let v: Vec<f64> = (1..=100).map(f64::from).collect();
        assert_eq!(percentile(&v, 0.95), 95.0);
        assert_eq!(percentile(&v, 0.5), 50.0);
        assert_eq!(percentile(&[3.0], 0.95), 3.0);
        assert!(percentile(&[], 0.5).is_nan());
    }
}
