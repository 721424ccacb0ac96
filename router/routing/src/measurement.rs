//! What the router knows about one candidate path, from the probes sent on
//! it: a smoothed RTT (EWMA) with its deviation and the last few samples,
//! the loss rate over a sliding window of probes, an optional bandwidth
//! figure, and the timing facts failover needs (last answer, consecutive
//! losses).

use super::policy::{PathMetrics, Policy};
use std::time::Duration;

/// Largest loss window (the history is one bit per probe in a `u64`).
pub const MAX_LOSS_WINDOW: u8 = 64;
/// RTT samples kept verbatim, for inspection and debugging.
pub const RECENT: usize = 4;

/// Estimator settings shared by all paths of a router.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct EstimatorConfig {
    /// Weight of a new RTT sample in the EWMA.
    pub rtt_alpha: f64,
    /// Probes the loss rate is computed over (1..=64).
    pub loss_window: u8,
    /// A measurement whose last probe is older than this is stale: the next
    /// sample restarts the estimators instead of being averaged with
    /// conditions that may be long gone.
    pub stale_after: Duration,
    /// This many consecutive losses are an outage, not random loss: when the
    /// path answers again they are dropped from the loss window. Otherwise a
    /// path back from a ten-second outage would look lossy (and lose to
    /// worse paths) for another twenty probes; outages are what failover is
    /// for.
    pub outage_after: u32,
}

impl Default for EstimatorConfig {
    fn default() -> Self {
        EstimatorConfig {
            rtt_alpha: 0.25,
            loss_window: 20,
            stale_after: Duration::from_secs(10),
            outage_after: 3,
        }
    }
}

/// Compact on purpose (72 bytes): a router keeps one per candidate path,
/// and the simulator a million of them. Absent values are NaN (floats) or
/// `NEVER` (times, in microseconds since the caller's epoch).
#[derive(Debug, Clone)]
pub struct Measurement {
    srtt_ms: f32,
    rttvar_ms: f32,
    recent: [f32; RECENT],
    /// One bit per probe outcome, newest in bit 0; 1 = lost.
    history: u64,
    bandwidth_mbps: f32,
    last_probe_us: u64,
    last_reply_us: u64,
    consecutive_losses: u32,
    replies: u32,
    losses: u32,
    history_len: u8,
    recent_len: u8,
    recent_pos: u8,
}

const NEVER: u64 = u64::MAX;

fn micros(t: Duration) -> u64 {
    u64::try_from(t.as_micros()).unwrap_or(NEVER - 1)
}

fn stamp(us: u64) -> Option<Duration> {
    (us != NEVER).then(|| Duration::from_micros(us))
}

fn opt(x: f32) -> Option<f64> {
    (!x.is_nan()).then_some(f64::from(x))
}

impl Default for Measurement {
    fn default() -> Self {
        Measurement {
            srtt_ms: f32::NAN,
            rttvar_ms: 0.0,
            recent: [0.0; RECENT],
            history: 0,
            bandwidth_mbps: f32::NAN,
            last_probe_us: NEVER,
            last_reply_us: NEVER,
            consecutive_losses: 0,
            replies: 0,
            losses: 0,
            history_len: 0,
            recent_len: 0,
            recent_pos: 0,
        }
    }
}

impl Measurement {
    pub fn new() -> Self {
        Self::default()
    }

    fn restart_if_stale(&mut self, now: Duration, cfg: &EstimatorConfig) {
        if let Some(last) = stamp(self.last_probe_us) {
            if now.saturating_sub(last) > cfg.stale_after {
                self.srtt_ms = f32::NAN;
                self.rttvar_ms = 0.0;
                self.history = 0;
                self.history_len = 0;
                self.recent_len = 0;
            }
        }
    }

    fn push_outcome(&mut self, lost: bool, cfg: &EstimatorConfig) {
        let window = cfg.loss_window.clamp(1, MAX_LOSS_WINDOW);
        self.history = (self.history << 1) | u64::from(lost);
        if window < 64 {
            self.history &= (1u64 << window) - 1;
        }
        self.history_len = (self.history_len + 1).min(window);
    }

    /// A probe on this path was answered after `rtt`.
    pub fn on_reply(&mut self, now: Duration, rtt: Duration, cfg: &EstimatorConfig) {
        self.restart_if_stale(now, cfg);
        if self.consecutive_losses >= cfg.outage_after.max(1) {
            // The run of losses is the newest bits of the history.
            let run = self.consecutive_losses.min(u32::from(self.history_len));
            self.history = self.history.checked_shr(run).unwrap_or(0);
            self.history_len -= run as u8;
        }
        let sample = rtt.as_secs_f64() * 1000.0;
        match opt(self.srtt_ms) {
            None => {
                self.srtt_ms = sample as f32;
                self.rttvar_ms = (sample / 2.0) as f32;
            }
            Some(s) => {
                // RFC 6298 style, with a configurable gain: variance first,
                // from the old mean.
                let var = 0.75 * f64::from(self.rttvar_ms) + 0.25 * (s - sample).abs();
                self.rttvar_ms = var as f32;
                self.srtt_ms = (s + cfg.rtt_alpha * (sample - s)) as f32;
            }
        }
        self.recent[usize::from(self.recent_pos)] = sample as f32;
        self.recent_pos = (self.recent_pos + 1) % RECENT as u8;
        self.recent_len = (self.recent_len + 1).min(RECENT as u8);
        self.push_outcome(false, cfg);
        self.last_probe_us = micros(now);
        self.last_reply_us = micros(now);
        self.consecutive_losses = 0;
        self.replies = self.replies.saturating_add(1);
    }

    /// A probe on this path timed out.
    pub fn on_loss(&mut self, now: Duration, cfg: &EstimatorConfig) {
        self.restart_if_stale(now, cfg);
        self.push_outcome(true, cfg);
        self.last_probe_us = micros(now);
        self.consecutive_losses = self.consecutive_losses.saturating_add(1);
        self.losses = self.losses.saturating_add(1);
    }

    pub fn on_bandwidth(&mut self, mbps: f64) {
        self.bandwidth_mbps = mbps.max(0.0) as f32;
    }

    /// Smoothed RTT, once a probe has been answered.
    pub fn rtt_ms(&self) -> Option<f64> {
        opt(self.srtt_ms)
    }
    /// Mean deviation of the RTT (jitter estimate).
    pub fn rttvar_ms(&self) -> f64 {
        f64::from(self.rttvar_ms)
    }
    /// The last few RTT samples, oldest first.
    pub fn recent_rtts_ms(&self) -> Vec<f32> {
        let n = usize::from(self.recent_len);
        let start = (usize::from(self.recent_pos) + RECENT - n) % RECENT;
        (0..n).map(|i| self.recent[(start + i) % RECENT]).collect()
    }
    /// The smallest of the last few RTT samples (a robust lower estimate).
    pub fn min_recent_rtt_ms(&self) -> Option<f64> {
        self.recent[..usize::from(self.recent_len)]
            .iter()
            .map(|&r| f64::from(r))
            .reduce(f64::min)
    }
    /// Fraction of the probes in the window that were lost (0 with no probe).
    pub fn loss_rate(&self) -> f64 {
        if self.history_len == 0 {
            return 0.0;
        }
        f64::from(self.history.count_ones()) / f64::from(self.history_len)
    }
    pub fn samples_in_window(&self) -> u8 {
        self.history_len
    }
    pub fn bandwidth_mbps(&self) -> Option<f64> {
        opt(self.bandwidth_mbps)
    }
    pub fn last_probe(&self) -> Option<Duration> {
        stamp(self.last_probe_us)
    }
    pub fn last_reply(&self) -> Option<Duration> {
        stamp(self.last_reply_us)
    }
    pub fn consecutive_losses(&self) -> u32 {
        self.consecutive_losses
    }
    /// Replies and losses since the path was created.
    pub fn totals(&self) -> (u64, u64) {
        (u64::from(self.replies), u64::from(self.losses))
    }

    pub fn metrics(&self) -> Option<PathMetrics> {
        opt(self.srtt_ms).map(|rtt_ms| PathMetrics {
            rtt_ms,
            loss: self.loss_rate(),
            bandwidth_mbps: opt(self.bandwidth_mbps),
        })
    }

    /// Cost under `policy`; infinite until a probe has been answered.
    pub fn cost(&self, policy: &Policy) -> f64 {
        self.metrics().map_or(f64::INFINITY, |m| policy.cost(&m))
    }

    /// Whether the path is known to work: answered within `fresh_for` and
    /// its latest probe was answered.
    pub fn works(&self, now: Duration, fresh_for: Duration) -> bool {
        self.consecutive_losses == 0
            && self
                .last_reply()
                .is_some_and(|t| now.saturating_sub(t) <= fresh_for)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn ms(x: u64) -> Duration {
        Duration::from_millis(x)
    }

    #[test]
    fn ewma_tracks_rtt_and_keeps_recent_samples() {
        let cfg = EstimatorConfig::default();
        let mut m = Measurement::new();
        assert_eq!(m.cost(&Policy::Latency), f64::INFINITY);
        m.on_reply(ms(0), ms(100), &cfg);
        assert_eq!(m.rtt_ms(), Some(100.0));
        for i in 1..=20 {
            m.on_reply(ms(i * 1000), ms(200), &cfg);
        }
        let rtt = m.rtt_ms().unwrap();
        assert!((199.0..=200.0).contains(&rtt), "{rtt}");
        assert_eq!(m.recent_rtts_ms(), vec![200.0; 4]);
        assert_eq!(m.min_recent_rtt_ms(), Some(200.0));
        assert_eq!(m.cost(&Policy::Latency), rtt);
    }

    #[test]
    fn loss_window_slides_and_losses_count_consecutively() {
        let cfg = EstimatorConfig {
            loss_window: 10,
            ..Default::default()
        };
        let mut m = Measurement::new();
        for i in 0..10 {
            if i % 5 == 0 {
                m.on_loss(ms(i * 100), &cfg);
            } else {
                m.on_reply(ms(i * 100), ms(50), &cfg);
            }
        }
        assert!((m.loss_rate() - 0.2).abs() < 1e-9);
        for i in 10..20 {
            m.on_reply(ms(i * 100), ms(50), &cfg);
        }
        assert_eq!(m.loss_rate(), 0.0);
        for i in 20..23 {
            m.on_loss(ms(i * 100), &cfg);
        }
        assert_eq!(m.consecutive_losses(), 3);
        assert!(!m.works(ms(2300), ms(10_000)));
        m.on_reply(ms(2400), ms(50), &cfg);
        assert_eq!(m.consecutive_losses(), 0);
        assert!(m.works(ms(2400), ms(10_000)));
        assert!(!m.works(ms(20_000), ms(10_000)), "too old to be trusted");
        assert_eq!(m.totals(), (19, 5));
    }

    #[test]
    fn an_outage_does_not_count_as_loss_once_the_path_is_back() {
        let cfg = EstimatorConfig::default();
        let mut m = Measurement::new();
        for i in 0..10 {
            m.on_reply(ms(i * 1000), ms(50), &cfg);
        }
        m.on_loss(ms(10_000), &cfg);
        m.on_reply(ms(11_000), ms(50), &cfg);
        // One isolated loss is loss...
        assert!((m.loss_rate() - 1.0 / 12.0).abs() < 1e-9);
        for i in 12..20 {
            m.on_loss(ms(i * 1000), &cfg);
        }
        assert!(m.loss_rate() > 0.4);
        // ...eight in a row were an outage, forgotten when it ends.
        m.on_reply(ms(20_000), ms(50), &cfg);
        assert!(
            (m.loss_rate() - 1.0 / 13.0).abs() < 1e-9,
            "{}",
            m.loss_rate()
        );
        assert_eq!(m.totals(), (12, 9));
    }

    #[test]
    fn measurements_stay_small() {
        assert!(std::mem::size_of::<Measurement>() <= 72);
    }

    #[test]
    fn stale_measurements_restart() {
        let cfg = EstimatorConfig::default();
        let mut m = Measurement::new();
        m.on_loss(ms(0), &cfg);
        m.on_reply(ms(1000), ms(300), &cfg);
        // Probed again a minute later: the old loss and RTT are forgotten.
        m.on_reply(ms(61_000), ms(40), &cfg);
        assert_eq!(m.rtt_ms(), Some(40.0));
        assert_eq!(m.loss_rate(), 0.0);
        assert_eq!(m.samples_in_window(), 1);
    }

    proptest! {
        #[test]
        fn estimates_stay_in_bounds(outcomes in proptest::collection::vec(proptest::option::of(1u64..2000), 1..200),
                                    window in 1u8..=64) {
            let cfg = EstimatorConfig { loss_window: window, ..Default::default() };
            let mut m = Measurement::new();
            let (mut lo, mut hi) = (f64::MAX, 0.0f64);
            for (i, o) in outcomes.iter().enumerate() {
                let now = ms(i as u64 * 100);
                match o {
                    Some(r) => {
                        m.on_reply(now, ms(*r), &cfg);
                        lo = lo.min(*r as f64);
                        hi = hi.max(*r as f64);
                    }
                    None => m.on_loss(now, &cfg),
                }
                let p = m.loss_rate();
                prop_assert!((0.0..=1.0).contains(&p));
                prop_assert!(m.samples_in_window() <= window);
                if let Some(r) = m.rtt_ms() {
                    prop_assert!(r >= lo - 1e-9 && r <= hi + 1e-9);
                }
            }
        }
    }
}
