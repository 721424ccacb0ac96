//! Per-second rates of growing counters, over windows of a few seconds, so
//! that the status page shows what a part spends now rather than since it
//! started.

use std::collections::BTreeMap;
use std::time::Duration;

/// Shortest window a rate is computed over.
const WINDOW: Duration = Duration::from_secs(2);

#[derive(Debug)]
pub struct RateMeter<K: Ord> {
    since: Duration,
    base: BTreeMap<K, u64>,
    rates: BTreeMap<K, f64>,
}

impl<K: Ord> Default for RateMeter<K> {
    fn default() -> Self {
        RateMeter {
            since: Duration::ZERO,
            base: BTreeMap::new(),
            rates: BTreeMap::new(),
        }
    }
}

impl<K: Ord + Clone> RateMeter<K> {
    /// Feeds the counters' totals at `now`; returns whether a window closed
    /// (the rates were recomputed).
    pub fn update(&mut self, now: Duration, totals: impl IntoIterator<Item = (K, u64)>) -> bool {
        let dt = now.saturating_sub(self.since);
        if dt < WINDOW {
            return false;
        }
        let secs = dt.as_secs_f64();
        let totals: BTreeMap<K, u64> = totals.into_iter().collect();
        self.rates = totals
            .iter()
            .map(|(k, n)| {
                let before = self.base.get(k).copied().unwrap_or(0);
                (k.clone(), n.saturating_sub(before) as f64 / secs)
            })
            .collect();
        self.base = totals;
        self.since = now;
        true
    }

    /// When the current window may close.
    pub fn next_update(&self) -> Duration {
        self.since + WINDOW
    }

    pub fn get(&self, k: &K) -> f64 {
        self.rates.get(k).copied().unwrap_or(0.0)
    }

    pub fn total(&self) -> f64 {
        self.rates.values().sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rates_cover_the_last_window_only() {
        let mut m = RateMeter::default();
        assert!(m.update(Duration::from_secs(2), [(1u32, 40), (2, 10)]));
        assert_eq!(m.get(&1), 20.0);
        assert!(
            !m.update(Duration::from_secs(3), [(1, 1000)]),
            "window still open"
        );
        assert!(m.update(Duration::from_secs(4), [(1, 50), (2, 10)]));
        assert_eq!((m.get(&1), m.get(&2), m.get(&3)), (5.0, 0.0, 0.0));
        assert_eq!(m.total(), 5.0);
        assert_eq!(m.next_update(), Duration::from_secs(6));
    }
}
