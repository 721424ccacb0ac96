//! What the monitor knows about one path: RTT percentiles (hdrhistogram, in
//! microseconds), a smoothed RTT and jitter, the loss rate over a sliding
//! window of probes, the last available-bandwidth figure, and when the path
//! last answered.

use hdrhistogram::Histogram;
use serde::Serialize;
use std::collections::VecDeque;
use std::time::Duration;

/// Highest RTT the histograms record (longer ones are clamped): one minute.
const MAX_RTT_US: u64 = 60_000_000;

/// Percentiles come from the samples of the current and the previous
/// histogram period, so they follow changes within two periods instead of
/// averaging over the path's whole life.
pub struct PathEstimator {
    current: Histogram<u64>,
    previous: Histogram<u64>,
    period_start: Option<Duration>,
    period: Duration,
    srtt_us: Option<f64>,
    rttvar_us: f64,
    /// RFC 3550 interarrival jitter over consecutive RTT samples.
    jitter_us: f64,
    last_rtt_us: Option<u64>,
    /// Outcome of the last `window` probes, oldest first; true = lost.
    window: VecDeque<bool>,
    window_len: usize,
    window_lost: usize,
    pub sent: u64,
    pub received: u64,
    pub lost: u64,
    pub last_sent: Option<Duration>,
    pub last_reply: Option<Duration>,
    pub consecutive_losses: u32,
    pub bandwidth_mbps: Option<f64>,
    pub bandwidth_at: Option<Duration>,
}

/// A path's estimates, as answered to queries.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct PathStats {
    pub rtt_us: Option<u64>,
    pub srtt_us: Option<u64>,
    pub jitter_us: u64,
    pub p50_us: Option<u64>,
    pub p90_us: Option<u64>,
    pub p99_us: Option<u64>,
    pub min_us: Option<u64>,
    pub max_us: Option<u64>,
    /// Fraction of the probes in the window that were lost.
    pub loss: f64,
    pub window: usize,
    pub sent: u64,
    pub received: u64,
    pub lost: u64,
    pub consecutive_losses: u32,
    /// Milliseconds since the last reply (at the time of the query).
    pub last_seen_ms_ago: Option<u64>,
    pub bandwidth_mbps: Option<f64>,
}

fn histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, MAX_RTT_US, 3).expect("static bounds are valid")
}

impl PathEstimator {
    pub fn new(window: usize, period: Duration) -> Self {
        PathEstimator {
            current: histogram(),
            previous: histogram(),
            period_start: None,
            period,
            srtt_us: None,
            rttvar_us: 0.0,
            jitter_us: 0.0,
            last_rtt_us: None,
            window: VecDeque::with_capacity(window),
            window_len: window.max(1),
            window_lost: 0,
            sent: 0,
            received: 0,
            lost: 0,
            last_sent: None,
            last_reply: None,
            consecutive_losses: 0,
            bandwidth_mbps: None,
            bandwidth_at: None,
        }
    }

    fn rotate(&mut self, now: Duration) {
        match self.period_start {
            None => self.period_start = Some(now),
            Some(s) if now.saturating_sub(s) >= self.period => {
                std::mem::swap(&mut self.current, &mut self.previous);
                self.current.reset();
                // Two periods without samples: the previous one is history too.
                if now.saturating_sub(s) >= 2 * self.period {
                    self.previous.reset();
                }
                self.period_start = Some(now);
            }
            Some(_) => {}
        }
    }

    fn push_outcome(&mut self, lost: bool) {
        if self.window.len() == self.window_len && self.window.pop_front() == Some(true) {
            self.window_lost -= 1;
        }
        self.window.push_back(lost);
        if lost {
            self.window_lost += 1;
        }
    }

    pub fn on_sent(&mut self, now: Duration) {
        self.sent += 1;
        self.last_sent = Some(now);
    }

    pub fn on_reply(&mut self, now: Duration, rtt: Duration) {
        self.rotate(now);
        let us = (rtt.as_micros() as u64).clamp(1, MAX_RTT_US);
        // Clamped into the histogram's range above, so recording cannot fail.
        let _ = self.current.record(us);
        let sample = us as f64;
        match self.srtt_us {
            None => {
                self.srtt_us = Some(sample);
                self.rttvar_us = sample / 2.0;
            }
            Some(s) => {
                self.rttvar_us = 0.75 * self.rttvar_us + 0.25 * (s - sample).abs();
                self.srtt_us = Some(0.875 * s + 0.125 * sample);
            }
        }
        if let Some(prev) = self.last_rtt_us {
            let d = (us as f64 - prev as f64).abs();
            self.jitter_us += (d - self.jitter_us) / 16.0;
        }
        self.last_rtt_us = Some(us);
        self.push_outcome(false);
        self.received += 1;
        self.last_reply = Some(now);
        self.consecutive_losses = 0;
    }

    pub fn on_loss(&mut self) {
        self.push_outcome(true);
        self.lost += 1;
        self.consecutive_losses += 1;
    }

    pub fn on_bandwidth(&mut self, now: Duration, mbps: f64) {
        self.bandwidth_mbps = Some(mbps);
        self.bandwidth_at = Some(now);
    }

    /// How long to wait for a reply before the probe counts as lost: twice
    /// the smoothed RTT plus four deviations (a reply later than that is so
    /// delayed it is as good as lost for failover), within the bounds.
    pub fn timeout(&self, initial: Duration, min: Duration, max: Duration) -> Duration {
        match self.srtt_us {
            None => initial,
            Some(s) => {
                Duration::from_micros((2.0 * s + 4.0 * self.rttvar_us) as u64).clamp(min, max)
            }
        }
    }

    pub fn srtt(&self) -> Option<Duration> {
        self.srtt_us.map(|s| Duration::from_micros(s as u64))
    }

    pub fn loss(&self) -> f64 {
        if self.window.is_empty() {
            0.0
        } else {
            self.window_lost as f64 / self.window.len() as f64
        }
    }

    pub fn stats(&self, now: Duration) -> PathStats {
        let mut h = self.previous.clone();
        // Same bounds on both, so adding cannot fail.
        let _ = h.add(&self.current);
        let pct = |q: f64| (!h.is_empty()).then(|| h.value_at_quantile(q));
        PathStats {
            rtt_us: self.last_rtt_us,
            srtt_us: self.srtt_us.map(|s| s as u64),
            jitter_us: self.jitter_us as u64,
            p50_us: pct(0.5),
            p90_us: pct(0.9),
            p99_us: pct(0.99),
            min_us: (!h.is_empty()).then(|| h.min()),
            max_us: (!h.is_empty()).then(|| h.max()),
            loss: self.loss(),
            window: self.window.len(),
            sent: self.sent,
            received: self.received,
            lost: self.lost,
            consecutive_losses: self.consecutive_losses,
            last_seen_ms_ago: self
                .last_reply
                .map(|t| now.saturating_sub(t).as_millis() as u64),
            bandwidth_mbps: self.bandwidth_mbps,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(x: u64) -> Duration {
        Duration::from_millis(x)
    }

    #[test]
    fn percentiles_jitter_and_loss() {
        let mut e = PathEstimator::new(10, Duration::from_secs(60));
        for i in 0..100u64 {
            e.on_sent(ms(i * 10));
            e.on_reply(ms(i * 10), Duration::from_micros(10_000 + (i % 10) * 100));
        }
        let s = e.stats(ms(1000));
        // 10.0 .. 10.9 ms, evenly: median about 10.4 ms, microsecond resolution.
        let p50 = s.p50_us.unwrap();
        assert!((10_350..=10_550).contains(&p50), "{p50}");
        assert!(s.p99_us.unwrap() >= 10_890, "{s:?}");
        assert_eq!(s.min_us, Some(10_000));
        assert!(s.jitter_us > 50 && s.jitter_us < 300, "{s:?}");
        assert_eq!(s.loss, 0.0);
        for _ in 0..3 {
            e.on_loss();
        }
        let s = e.stats(ms(1500));
        assert!((s.loss - 0.3).abs() < 1e-9, "window of 10: {s:?}");
        assert_eq!(s.consecutive_losses, 3);
        assert_eq!(s.last_seen_ms_ago, Some(510));
        for _ in 0..10 {
            e.on_reply(ms(2000), ms(10));
        }
        assert_eq!(e.loss(), 0.0, "losses slid out of the window");
    }

    #[test]
    fn histogram_periods_forget_old_samples() {
        let mut e = PathEstimator::new(10, Duration::from_secs(10));
        e.on_reply(ms(0), ms(300));
        e.on_reply(ms(11_000), ms(20));
        assert_eq!(e.stats(ms(11_000)).max_us.map(|m| m / 1000), Some(300));
        e.on_reply(ms(22_000), ms(20));
        // Two rotations later the 300 ms sample is gone.
        assert_eq!(e.stats(ms(22_000)).max_us.map(|m| m / 1000), Some(20));
    }

    #[test]
    fn timeout_follows_rtt_within_bounds() {
        let (init, min, max) = (ms(1000), ms(50), ms(2000));
        let mut e = PathEstimator::new(10, Duration::from_secs(60));
        assert_eq!(e.timeout(init, min, max), init);
        for i in 0..50 {
            e.on_reply(ms(i), ms(60));
        }
        let t = e.timeout(init, min, max);
        assert!(t >= ms(120) && t < ms(200), "{t:?}");
        let mut fast = PathEstimator::new(10, Duration::from_secs(60));
        fast.on_reply(ms(0), Duration::from_micros(100));
        assert_eq!(fast.timeout(init, min, max), min);
    }
}
