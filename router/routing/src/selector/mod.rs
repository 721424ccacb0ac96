//! Probe selectors: which of a destination's candidate paths to probe in the
//! next interval, within the budget, learning from the results. The router
//! owns one selector per destination and always probes a few paths itself
//! (the direct path, the current route, a challenger waiting out the
//! hysteresis hold); the selector fills the rest of the budget.
//!
//! - [`RnnSelector`]: the PANACEA/CPN learner, a random neural network with
//!   reinforcement learning (see `rnn.rs`).
//! - [`UcbSelector`]: a discounted UCB1 bandit, the textbook alternative.
//! - [`RandomSelector`]: uniform choice, the "no learning" baseline.
//! - [`FullMesh`]: probes every candidate every interval, the reference the
//!   budgeted selectors are measured against.

mod bandit;
mod rnn;

pub use bandit::{BanditConfig, UcbSelector};
pub use rnn::{RnnConfig, RnnSelector};

use super::rng::Rng;
use serde::{Deserialize, Serialize};

/// Chooses paths to probe and learns from the outcomes. Paths are indices
/// `0..n` into the destination's candidate list (index 0 is the direct path).
pub trait ProbeSelector: Send {
    fn name(&self) -> &'static str;

    /// How many paths to probe per interval given the configured budget `k`
    /// and `n` candidates. Only the full-mesh reference exceeds `k`.
    fn budget(&self, k: usize, n: usize) -> usize {
        k.min(n)
    }

    /// `chosen` holds the paths the router probes anyway; append distinct
    /// paths not already in it, and only paths marked in `eligible` (one
    /// flag per path: the router rules out paths that cannot beat the
    /// current route), until it holds `budget` entries or nothing is left.
    fn select(&mut self, chosen: &mut Vec<usize>, budget: usize, eligible: &[bool]);

    /// The outcome of a probe on `path`: `Some(goal)` when answered, with the
    /// path's policy cost after this sample (ms-equivalent, lower is better,
    /// finite and positive); `None` when lost.
    fn observe(&mut self, path: usize, goal: Option<f64>);
}

#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, schemars::JsonSchema,
)]
#[serde(rename_all = "lowercase")]
pub enum SelectorKind {
    /// The PANACEA/CPN random neural network with reinforcement learning.
    #[default]
    Rnn,
    /// A discounted-UCB bandit.
    Bandit,
    /// Uniform random choice.
    Random,
    /// Every candidate, every interval (for comparison: its cost grows
    /// with the overlay).
    FullMesh,
}

impl SelectorKind {
    pub const ALL: [SelectorKind; 4] = [
        SelectorKind::Rnn,
        SelectorKind::Bandit,
        SelectorKind::Random,
        SelectorKind::FullMesh,
    ];

    pub fn name(self) -> &'static str {
        match self {
            SelectorKind::Rnn => "rnn",
            SelectorKind::Bandit => "bandit",
            SelectorKind::Random => "random",
            SelectorKind::FullMesh => "fullmesh",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|k| k.name() == s)
    }

    /// A selector for a destination with `n` candidate paths.
    pub fn build(
        self,
        n: usize,
        rnn: &RnnConfig,
        bandit: &BanditConfig,
        rng: Rng,
    ) -> Box<dyn ProbeSelector> {
        match self {
            SelectorKind::Rnn => Box::new(RnnSelector::new(n, *rnn, rng)),
            SelectorKind::Bandit => Box::new(UcbSelector::new(n, *bandit, rng)),
            SelectorKind::Random => Box::new(RandomSelector::new(n, rng)),
            SelectorKind::FullMesh => Box::new(FullMesh::new(n)),
        }
    }
}

/// `avail[i]`: path `i` is eligible and not chosen yet.
pub(crate) fn availability(eligible: &[bool], chosen: &[usize], avail: &mut Vec<bool>) {
    avail.clear();
    avail.extend_from_slice(eligible);
    for &c in chosen {
        if let Some(a) = avail.get_mut(c) {
            *a = false;
        }
    }
}

/// Picks uniformly among available paths (`None` if there is none).
pub(crate) fn random_available(avail: &[bool], rng: &mut Rng) -> Option<usize> {
    let free = avail.iter().filter(|a| **a).count();
    if free == 0 {
        return None;
    }
    let nth = rng.below(free);
    avail
        .iter()
        .enumerate()
        .filter(|(_, a)| **a)
        .nth(nth)
        .map(|(i, _)| i)
}

/// The available path with the largest score; ties are broken at random so
/// that equal scores (a fresh learner) do not always favour the lowest index.
pub(crate) fn argmax_available(scores: &[f64], avail: &[bool], rng: &mut Rng) -> Option<usize> {
    let n = scores.len().min(avail.len());
    if n == 0 {
        return None;
    }
    let start = rng.below(n);
    let mut best: Option<usize> = None;
    // From `start` round to just before it, as two ranges: a modulo per
    // candidate costs more than the comparison it guards.
    for i in (start..n).chain(0..start) {
        if avail[i] && best.is_none_or(|b| scores[i] > scores[b]) {
            best = Some(i);
        }
    }
    best
}

/// Uniformly random probing: what a fixed budget buys without learning.
pub struct RandomSelector {
    n: usize,
    rng: Rng,
    avail: Vec<bool>,
}

impl RandomSelector {
    pub fn new(n: usize, rng: Rng) -> Self {
        RandomSelector {
            n,
            rng,
            avail: Vec::with_capacity(n),
        }
    }
}

impl ProbeSelector for RandomSelector {
    fn name(&self) -> &'static str {
        "random"
    }
    fn select(&mut self, chosen: &mut Vec<usize>, budget: usize, eligible: &[bool]) {
        availability(eligible, chosen, &mut self.avail);
        while chosen.len() < budget.min(self.n) {
            match random_available(&self.avail, &mut self.rng) {
                Some(i) => {
                    chosen.push(i);
                    self.avail[i] = false;
                }
                None => break,
            }
        }
    }
    fn observe(&mut self, _path: usize, _goal: Option<f64>) {}
}

/// Probes every candidate every interval: the reference (and the oracle's
/// real-world counterpart, with its measurement noise and hysteresis).
pub struct FullMesh {
    n: usize,
}

impl FullMesh {
    pub fn new(n: usize) -> Self {
        FullMesh { n }
    }
}

impl ProbeSelector for FullMesh {
    fn name(&self) -> &'static str {
        "fullmesh"
    }
    fn budget(&self, _k: usize, n: usize) -> usize {
        n
    }
    /// Probes everything, eligible or not: it is the reference.
    fn select(&mut self, chosen: &mut Vec<usize>, _budget: usize, _eligible: &[bool]) {
        // Only the router's few pinned paths can repeat: compare with them,
        // not with the whole growing list.
        let pinned = chosen.len();
        for i in 0..self.n {
            if !chosen[..pinned].contains(&i) {
                chosen.push(i);
            }
        }
    }
    fn observe(&mut self, _path: usize, _goal: Option<f64>) {}
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rng::Rng;
    use proptest::prelude::*;

    fn all(n: usize) -> Vec<Box<dyn ProbeSelector>> {
        SelectorKind::ALL
            .iter()
            .map(|k| {
                k.build(
                    n,
                    &RnnConfig::default(),
                    &BanditConfig::default(),
                    Rng::new(5),
                )
            })
            .collect()
    }

    #[test]
    fn kinds_round_trip_by_name() {
        for k in SelectorKind::ALL {
            assert_eq!(SelectorKind::parse(k.name()), Some(k));
            assert_eq!(
                k.build(
                    3,
                    &RnnConfig::default(),
                    &BanditConfig::default(),
                    Rng::new(1)
                )
                .name(),
                k.name()
            );
        }
        assert_eq!(SelectorKind::parse("oracle"), None);
    }

    #[test]
    fn fullmesh_takes_everything_and_others_honour_the_budget() {
        for mut s in all(10) {
            let budget = s.budget(3, 10);
            let mut chosen = vec![0];
            s.select(&mut chosen, budget, &[true; 10]);
            if s.name() == "fullmesh" {
                assert_eq!(budget, 10);
                assert_eq!(chosen.len(), 10);
            } else {
                assert_eq!(budget, 3);
                assert_eq!(chosen.len(), 3, "{}", s.name());
            }
        }
    }

    #[test]
    fn argmax_breaks_ties_randomly_and_skips_unavailable() {
        let mut rng = Rng::new(9);
        let scores = [1.0, 1.0, 1.0, 0.5];
        let mut avail = Vec::new();
        availability(&[true, true, true, true], &[2], &mut avail);
        let mut hits = [0; 4];
        for _ in 0..300 {
            hits[argmax_available(&scores, &avail, &mut rng).unwrap()] += 1;
        }
        assert_eq!(hits[2], 0);
        assert_eq!(hits[3], 0);
        assert!(hits[0] > 50 && hits[1] > 50, "{hits:?}");
        availability(&[true, false, true, true], &[0, 2, 3], &mut avail);
        assert_eq!(argmax_available(&scores, &avail, &mut rng), None);
        assert_eq!(random_available(&avail, &mut rng), None);
        availability(&[true, false, true, true], &[0, 2], &mut avail);
        assert_eq!(random_available(&avail, &mut rng), Some(3));
    }

    #[test]
    fn budgeted_selectors_only_pick_eligible_paths() {
        let eligible: Vec<bool> = (0..12).map(|i| i % 3 == 0).collect();
        for mut s in all(12) {
            for round in 0..30 {
                let mut chosen = vec![1];
                s.select(&mut chosen, 3, &eligible);
                for &c in &chosen {
                    s.observe(c, Some(50.0 + c as f64));
                }
                if s.name() == "fullmesh" {
                    assert_eq!(chosen.len(), 12);
                    continue;
                }
                assert_eq!(chosen.len(), 3, "{} round {round}", s.name());
                assert!(
                    chosen[1..].iter().all(|&c| eligible[c]),
                    "{}: {chosen:?}",
                    s.name()
                );
            }
            // Nothing eligible: nothing added (the budget is a maximum).
            let mut chosen = vec![1];
            s.select(&mut chosen, 3, &[false; 12]);
            assert!(chosen == vec![1] || s.name() == "fullmesh");
        }
    }

    proptest! {
        /// Whatever was observed before, every selector returns distinct,
        /// in-range paths, keeps what the router pinned, and fills the budget.
        #[test]
        fn selections_are_distinct_in_range_and_full(
            n in 1usize..40,
            k in 1usize..6,
            pinned in proptest::collection::vec(0usize..40, 0..3),
            history in proptest::collection::vec((0usize..40, proptest::option::of(1.0f64..500.0)), 0..60),
        ) {
            for mut s in all(n) {
                for (p, g) in &history {
                    s.observe(p % n, *g);
                }
                let mut chosen: Vec<usize> = Vec::new();
                for p in &pinned {
                    if !chosen.contains(&(p % n)) {
                        chosen.push(p % n);
                    }
                }
                let before = chosen.clone();
                let budget = s.budget(k, n).max(chosen.len());
                s.select(&mut chosen, budget, &vec![true; n]);
                prop_assert_eq!(&chosen[..before.len()], &before[..]);
                prop_assert!(chosen.iter().all(|&i| i < n));
                let mut d = chosen.clone();
                d.sort_unstable();
                d.dedup();
                prop_assert_eq!(d.len(), chosen.len());
                prop_assert_eq!(chosen.len(), budget.min(n));
            }
        }
    }
}
