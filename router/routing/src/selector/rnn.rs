//! The Cognitive Packet Network learner (Gelenbe et al., "Design and
//! performance of cognitive packet networks", Performance Evaluation 2001),
//! used as in the SMART overlay (Brun, Wang, Gelenbe, "Big Data for Autonomic
//! Intercontinental Overlays", IEEE JSAC 2016) to decide which few paths to a
//! destination deserve the next probes.
//!
//! One random neural network per destination, one neuron per candidate path.
//! The excitation probability `q(i)` of neuron `i` is the fixed point of
//!
//! ```text
//! q(i) = min(1, (Λ(i) + Σ_j q(j)·w+(j,i)) / (r(i) + λ(i) + Σ_j q(j)·w-(j,i)))
//! ```
//!
//! and the paths with the largest `q` are probed. Each probe result is a
//! reward `R = 1/G` (G the policy cost): compared with the threshold `T`
//! (an exponential average of past rewards, `T ← a·T + (1−a)·R`), a reward at
//! least `T` excites the neuron (`w+(j,i) += R`, `w-(j,k) += R/(n−2)` for the
//! others) and a smaller one inhibits it (`w-(j,i) += R`, `w+(j,k) +=
//! R/(n−2)`); then all weights are scaled so the firing rates stay what they
//! were.
//!
//! Storage: CPN's update adds the same amount to `w(j,i)` for every source
//! neuron `j`, so a matrix started uniform stays column-uniform. We keep one
//! excitatory and one inhibitory weight per neuron, `w+(·,i)` and `w-(·,i)`
//! (the 2n-weight form of Kocak, Seeber and Terzioglu, IEEE TNN 2003), and
//! renormalise with one common factor, which keeps it column-uniform. A
//! destination with a hundred candidates then costs 2·100 numbers and a
//! fixed-point iteration is O(n), not O(n²): the simulator runs ten thousand
//! of these networks at once.
//!
//! Departures from the letter of CPN, and why:
//! - A lost probe has no finite goal (`R = 1/∞ = 0`), and CPN's update
//!   scales with `R`, so a loss would teach nothing. We punish it like a bad
//!   result of the size of the current threshold `T`.
//! - The network's weights are set at the first reward, to that reward, so
//!   learning speed does not depend on the unit of the goal.
//! - Exploration: with probability `exploration` a free probe slot goes to a
//!   uniformly random path instead of the largest `q`. CPN explores through
//!   smart packets; a fixed budget needs it explicitly, or a path that was
//!   bad once is never looked at again.

use super::{argmax_available, availability, random_available, ProbeSelector};
use crate::rng::Rng;
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields, default)]
pub struct RnnConfig {
    /// `a` in `T ← a·T + (1−a)·R`: 0.8 remembers about the last five rewards.
    pub memory: f64,
    /// Probability that a free slot is spent on a random path.
    pub exploration: f64,
    /// External excitatory and inhibitory arrival rates `Λ`, `λ`, as a
    /// fraction of the mean weight: small, so that learning dominates.
    pub external_rate: f64,
    /// A path the learner probed is not picked again for this many
    /// intervals (unless nothing else is left). The router keeps probing the
    /// current route and a challenger itself; for any other path a fresh
    /// measurement every interval teaches little, and without this rule the
    /// largest `q` (often a good runner-up) would take the free slot every
    /// interval and starve exploration.
    pub revisit: u32,
}

impl Default for RnnConfig {
    fn default() -> Self {
        RnnConfig {
            memory: 0.8,
            exploration: 0.1,
            external_rate: 0.1,
            revisit: 16,
        }
    }
}

/// Fixed-point iterations stop when no `q` moves by more than this fraction
/// of the mean `q` (only the ranking of the `q` matters).
const Q_TOLERANCE: f64 = 1e-4;
const Q_MAX_ITERATIONS: usize = 50;
/// Sweeps per interval (see `solve`).
const Q_SWEEPS_PER_SELECT: usize = 1;

pub struct RnnSelector {
    /// `w+(·,i)`: excitatory weight from any other neuron into neuron `i`.
    wp: Vec<f64>,
    /// `w-(·,i)`: inhibitory weight from any other neuron into neuron `i`.
    wm: Vec<f64>,
    q: Vec<f64>,
    /// Σ_i (w+(·,i) + w-(·,i)); neuron `j` fires at `total − w+(·,j) − w-(·,j)`
    /// (no self-connection). Renormalisation keeps it constant.
    total: f64,
    threshold: Option<f64>,
    q_dirty: bool,
    cfg: RnnConfig,
    rng: Rng,
    /// Intervals seen (calls to `select`).
    tick: u32,
    /// Interval at which each path was last picked by the learner, plus one
    /// (0: never).
    picked: Vec<u32>,
    /// Scratch: paths that may be picked now, and those sitting out.
    avail: Vec<bool>,
    resting: Vec<usize>,
}

impl RnnSelector {
    pub fn new(n: usize, cfg: RnnConfig, rng: Rng) -> Self {
        RnnSelector {
            wp: vec![1.0; n],
            wm: vec![1.0; n],
            q: vec![0.0; n],
            total: 2.0 * n as f64,
            threshold: None,
            q_dirty: true,
            cfg,
            rng,
            tick: 0,
            picked: vec![0; n],
            avail: Vec::with_capacity(n),
            resting: Vec::new(),
        }
    }

    /// Excitation probabilities (the fixed point solved to tolerance).
    pub fn excitation(&mut self) -> &[f64] {
        self.q_dirty = true;
        self.solve(Q_MAX_ITERATIONS);
        &self.q
    }

    pub fn threshold(&self) -> Option<f64> {
        self.threshold
    }

    fn n(&self) -> usize {
        self.wp.len()
    }

    /// Moves `q` towards the fixed point by at most `sweeps` Gauss-Seidel
    /// sweeps from the previous `q`. Between two intervals only a few
    /// weights change, so the previous solution is close, and `select`
    /// spends a few sweeps per interval: the iteration simply continues
    /// across intervals while the target moves slowly (each sweep shrinks
    /// the error about twofold). This keeps ten thousand networks cheap.
    fn solve(&mut self, sweeps: usize) {
        if !self.q_dirty {
            return;
        }
        let n = self.n();
        let mean_w = self.total / (2.0 * n.max(1) as f64);
        let ext = self.cfg.external_rate * mean_w;
        let mut s: f64 = self.q.iter().sum();
        for _ in 0..sweeps {
            let mut delta = 0.0f64;
            for i in 0..n {
                let others = s - self.q[i];
                let rate = (self.total - self.wp[i] - self.wm[i]).max(0.0);
                let num = ext + self.wp[i] * others;
                let den = rate + ext + self.wm[i] * others;
                let q = if den > 0.0 { (num / den).min(1.0) } else { 1.0 };
                delta = delta.max((q - self.q[i]).abs());
                s += q - self.q[i];
                self.q[i] = q;
            }
            if delta < Q_TOLERANCE * s.max(1e-12) / n.max(1) as f64 {
                break;
            }
        }
        self.q_dirty = false;
    }

    fn reinforce(&mut self, i: usize, reward: f64, good: bool) {
        let n = self.n();
        // CPN spreads the counter-update over the n−2 other choices (the
        // decision neuron and the one it came from excluded); with fewer
        // neurons spread over what there is.
        let share = reward / n.saturating_sub(2).max(1) as f64;
        let (mine, others) = if good {
            (&mut self.wp, &mut self.wm)
        } else {
            (&mut self.wm, &mut self.wp)
        };
        mine[i] += reward;
        // One pass adds the share and sums both vectors (two independent
        // chains of additions, each in index order as a separate sum would
        // do it, so the totals are the same to the bit), one pass rescales:
        // this runs for every probe result, over every candidate.
        let (mut sum_mine, mut sum_others) = (-0.0f64, -0.0f64);
        for (k, (m, o)) in mine.iter().zip(others.iter_mut()).enumerate() {
            if k != i {
                *o += share;
            }
            sum_mine += *m;
            sum_others += *o;
        }
        let new_total = sum_mine + sum_others;
        if new_total > 0.0 {
            let f = self.total / new_total;
            for (p, m) in self.wp.iter_mut().zip(self.wm.iter_mut()) {
                *p *= f;
                *m *= f;
            }
        }
        self.q_dirty = true;
    }
}

impl ProbeSelector for RnnSelector {
    fn name(&self) -> &'static str {
        "rnn"
    }

    fn select(&mut self, chosen: &mut Vec<usize>, budget: usize, eligible: &[bool]) {
        let n = self.n();
        self.solve(Q_SWEEPS_PER_SELECT);
        self.tick += 1;
        let pinned = chosen.len();
        availability(eligible, chosen, &mut self.avail);
        // Recently picked paths sit out, unless nothing else is left.
        self.resting.clear();
        for i in 0..n {
            let p = self.picked[i];
            if self.avail[i] && p != 0 && self.tick - p <= self.cfg.revisit {
                self.avail[i] = false;
                self.resting.push(i);
            }
        }
        while chosen.len() < budget.min(n) {
            if !self.avail.iter().any(|a| *a) {
                for &i in &self.resting {
                    self.avail[i] = !chosen.contains(&i);
                }
                if !self.avail.iter().any(|a| *a) {
                    break;
                }
            }
            let pick = if self.rng.chance(self.cfg.exploration) {
                random_available(&self.avail, &mut self.rng)
            } else {
                argmax_available(&self.q, &self.avail, &mut self.rng)
            };
            match pick {
                Some(i) => {
                    chosen.push(i);
                    self.avail[i] = false;
                }
                None => break,
            }
        }
        for &i in &chosen[pinned..] {
            self.picked[i] = self.tick;
        }
    }

    fn observe(&mut self, path: usize, goal: Option<f64>) {
        if path >= self.n() {
            return;
        }
        match goal {
            Some(g) if g.is_finite() && g > 0.0 => {
                // Goal in ms: reward in 1/s keeps numbers near 1..100.
                let reward = 1000.0 / g;
                let t = match self.threshold {
                    Some(t) => t,
                    None => {
                        // First reward: scale the network to it.
                        let n = self.n() as f64;
                        self.wp.iter_mut().for_each(|w| *w = reward);
                        self.wm.iter_mut().for_each(|w| *w = reward);
                        self.total = 2.0 * n * reward;
                        reward
                    }
                };
                self.reinforce(path, reward, reward >= t);
                let a = self.cfg.memory;
                self.threshold = Some(a * t + (1.0 - a) * reward);
            }
            _ => {
                if let Some(t) = self.threshold {
                    self.reinforce(path, t, false);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rnn(n: usize) -> RnnSelector {
        RnnSelector::new(
            n,
            RnnConfig {
                exploration: 0.0,
                ..Default::default()
            },
            Rng::new(1),
        )
    }

    #[test]
    fn fixed_point_is_a_fixed_point() {
        let mut r = rnn(6);
        for (p, g) in [(1, 50.0), (2, 80.0), (1, 45.0), (3, 300.0), (4, 60.0)] {
            r.observe(p, Some(g));
        }
        r.observe(5, None);
        let q = r.excitation().to_vec();
        let s: f64 = q.iter().sum();
        let ext = r.cfg.external_rate * r.total / 12.0;
        for (i, &qi) in q.iter().enumerate() {
            let rate = r.total - r.wp[i] - r.wm[i];
            let rhs = ((ext + r.wp[i] * (s - qi)) / (rate + ext + r.wm[i] * (s - qi))).min(1.0);
            // Solved to a relative tolerance: only the ranking matters.
            assert!((qi - rhs).abs() < 1e-3 * qi, "neuron {i}: {qi} vs {rhs}");
            assert!((0.0..=1.0).contains(&qi));
        }
    }

    #[test]
    fn renormalisation_keeps_total_firing_rate() {
        let mut r = rnn(8);
        r.observe(0, Some(100.0));
        let total = r.total;
        for i in 0..50 {
            r.observe(
                i % 8,
                if i % 7 == 0 {
                    None
                } else {
                    Some(50.0 + i as f64)
                },
            );
            let now: f64 = r.wp.iter().sum::<f64>() + r.wm.iter().sum::<f64>();
            assert!((now - total).abs() / total < 1e-9);
            assert!(r.wp.iter().chain(&r.wm).all(|w| *w > 0.0));
        }
    }

    #[test]
    fn rewarded_path_rises_and_punished_path_falls() {
        let mut r = rnn(5);
        // Path 2 is consistently better than the others.
        for round in 0..10 {
            for p in 0..5 {
                let g = if p == 2 { 40.0 } else { 120.0 + round as f64 };
                r.observe(p, Some(g));
            }
        }
        let q = r.excitation().to_vec();
        let best = (0..5).max_by(|a, b| q[*a].total_cmp(&q[*b])).unwrap();
        assert_eq!(best, 2, "{q:?}");
        // Now path 2 starts losing probes: it must drop below the others
        // (which answer around 120 ms, with some noise).
        let mut rng = Rng::new(4);
        for _ in 0..15 {
            r.observe(2, None);
            for p in [0, 1, 3, 4] {
                r.observe(p, Some(rng.range(110.0, 130.0)));
            }
        }
        let q = r.excitation().to_vec();
        assert!(q[2] < q[0] && q[2] < q[4], "{q:?}");
    }

    #[test]
    fn selection_follows_excitation_and_skips_pinned() {
        let mut r = rnn(6);
        for _ in 0..5 {
            r.observe(4, Some(20.0));
            r.observe(1, Some(30.0));
            r.observe(0, Some(200.0));
            r.observe(3, Some(400.0));
        }
        let mut chosen = vec![0];
        r.select(&mut chosen, 3, &vec![true; r.n()]);
        assert_eq!(chosen[0], 0);
        assert_eq!(&chosen[1..], &[4, 1]);
    }

    #[test]
    fn exploration_reaches_every_path() {
        let mut r = RnnSelector::new(
            10,
            RnnConfig {
                exploration: 0.5,
                ..Default::default()
            },
            Rng::new(3),
        );
        for _ in 0..5 {
            r.observe(0, Some(10.0));
        }
        let mut seen = [false; 10];
        for _ in 0..200 {
            let mut chosen = vec![];
            r.select(&mut chosen, 2, &vec![true; r.n()]);
            for c in chosen {
                seen[c] = true;
            }
        }
        assert!(seen.iter().all(|s| *s), "{seen:?}");
    }

    #[test]
    fn tiny_networks_work() {
        for n in 1..=3 {
            let mut r = rnn(n);
            r.observe(0, Some(10.0));
            r.observe(n - 1, None);
            let mut chosen = vec![];
            r.select(&mut chosen, 3, &vec![true; r.n()]);
            assert_eq!(chosen.len(), n);
            assert!(r.excitation().iter().all(|q| q.is_finite()));
        }
    }
}
