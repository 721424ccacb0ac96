//! Discounted UCB1 (Garivier and Moulines, "On upper-confidence bound
//! policies for non-stationary bandit problems", 2008): the classic answer to
//! "which k of n arms to pull", with old pulls fading so that a path that
//! changes (congestion, an outage that ends) is looked at again.
//!
//! Rewards must lie in [0, 1]: a reply scores `best/G`, where `best` is the
//! lowest goal seen recently for this destination (drifting up slowly so a
//! vanished best path does not keep every score low), and a lost probe
//! scores 0.

use super::{argmax_available, availability, ProbeSelector};
use crate::rng::Rng;
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields, default)]
pub struct BanditConfig {
    /// Weight of the confidence bonus `c·sqrt(ln N / n_i)`.
    pub exploration: f64,
    /// Per-interval discount of past pulls (0.98: a pull counts half after
    /// about 35 intervals).
    pub discount: f64,
}

impl Default for BanditConfig {
    fn default() -> Self {
        BanditConfig {
            exploration: 0.2,
            discount: 0.98,
        }
    }
}

/// Per observation, the reference goal may rise by this factor.
const BEST_DRIFT: f64 = 1.002;
/// A discounted pull count below this counts as "never pulled".
const UNEXPLORED: f64 = 1e-3;

pub struct UcbSelector {
    pulls: Vec<f64>,
    rewards: Vec<f64>,
    best_goal: Option<f64>,
    cfg: BanditConfig,
    rng: Rng,
    scores: Vec<f64>,
    avail: Vec<bool>,
}

impl UcbSelector {
    pub fn new(n: usize, cfg: BanditConfig, rng: Rng) -> Self {
        UcbSelector {
            pulls: vec![0.0; n],
            rewards: vec![0.0; n],
            best_goal: None,
            cfg,
            rng,
            scores: vec![0.0; n],
            avail: Vec::with_capacity(n),
        }
    }

    /// Mean discounted reward of a path (None if never pulled).
    pub fn mean(&self, i: usize) -> Option<f64> {
        (self.pulls[i] > UNEXPLORED).then(|| self.rewards[i] / self.pulls[i])
    }
}

impl ProbeSelector for UcbSelector {
    fn name(&self) -> &'static str {
        "bandit"
    }

    fn select(&mut self, chosen: &mut Vec<usize>, budget: usize, eligible: &[bool]) {
        let n = self.pulls.len();
        let g = self.cfg.discount;
        self.pulls.iter_mut().for_each(|p| *p *= g);
        self.rewards.iter_mut().for_each(|r| *r *= g);
        let total: f64 = self.pulls.iter().sum::<f64>().max(1.0);
        let ln = total.ln().max(0.0);
        // Never-pulled arms first, in random order (their UCB index is
        // infinite, and ties break at random); then the largest index.
        for i in 0..n {
            self.scores[i] = if self.pulls[i] <= UNEXPLORED {
                f64::INFINITY
            } else {
                self.rewards[i] / self.pulls[i] + self.cfg.exploration * (ln / self.pulls[i]).sqrt()
            };
        }
        availability(eligible, chosen, &mut self.avail);
        while chosen.len() < budget.min(n) {
            match argmax_available(&self.scores, &self.avail, &mut self.rng) {
                Some(i) => {
                    chosen.push(i);
                    self.avail[i] = false;
                }
                None => break,
            }
        }
    }

    fn observe(&mut self, path: usize, goal: Option<f64>) {
        if path >= self.pulls.len() {
            return;
        }
        let reward = match goal {
            Some(g) if g.is_finite() && g > 0.0 => {
                let best = self.best_goal.map_or(g, |b| (b * BEST_DRIFT).min(g));
                self.best_goal = Some(best);
                (best / g).clamp(0.0, 1.0)
            }
            _ => 0.0,
        };
        self.pulls[path] += 1.0;
        self.rewards[path] += reward;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tries_every_arm_then_exploits_the_best() {
        let n = 8;
        let mut b = UcbSelector::new(n, BanditConfig::default(), Rng::new(2));
        let goal = |p: usize| {
            if p == 5 {
                30.0
            } else {
                100.0 + 10.0 * p as f64
            }
        };
        let mut first_round = vec![];
        for _ in 0..4 {
            let mut c = vec![];
            b.select(&mut c, 2, &[true; 8]);
            first_round.extend(c.iter().copied());
            for p in c {
                b.observe(p, Some(goal(p)));
            }
        }
        first_round.sort_unstable();
        assert_eq!(
            first_round,
            (0..n).collect::<Vec<_>>(),
            "all arms once first"
        );
        let mut picks5 = 0;
        for _ in 0..50 {
            let mut c = vec![];
            b.select(&mut c, 1, &[true; 8]);
            picks5 += usize::from(c[0] == 5);
            b.observe(c[0], Some(goal(c[0])));
        }
        assert!(picks5 > 30, "{picks5}");
        assert!(b.mean(5).unwrap() > 0.9);
    }

    #[test]
    fn losses_score_zero_and_old_pulls_fade() {
        let mut b = UcbSelector::new(3, BanditConfig::default(), Rng::new(2));
        b.observe(0, Some(50.0));
        b.observe(1, None);
        assert_eq!(b.mean(1), Some(0.0));
        assert_eq!(b.mean(0), Some(1.0));
        assert_eq!(b.mean(2), None);
        let before = b.pulls[0];
        let mut c = vec![0, 1, 2];
        b.select(&mut c, 3, &[true; 3]);
        assert!(b.pulls[0] < before);
    }
}
