//! Passive watch of a current route: the proxy's own data traffic, and the
//! egress's reports of what it received (`pon_proto::report`), tell whether
//! a route works, so keepalive probes are only needed where that signal is
//! missing. Without I/O: fed with the forwarder's data counters and an
//! explicit `now`, it answers which keepalive rate the route needs.
//!
//! - **Idle** (no data sent for [`BUSY_WINDOW`]): slow keepalives; such a
//!   route fails over in seconds, which costs nobody a packet.
//! - **Confirmed** (data sent, and a report showing progress within
//!   [`SUSPECT_AFTER`]): slow keepalives too; the reports are the liveness
//!   signal, at no probe cost.
//! - **Suspect** (data sent, no report showing progress for
//!   [`SUSPECT_AFTER`]): fast keepalives, so that `failover_losses` losses
//!   fail the route over as quickly as constant keepalives did. A report
//!   path that is down while the data path works costs fast keepalives on
//!   that route, never a wrong failover: the probes decide.
//!
//! Only changes of the counters count (both sides count from their own
//! start; a restarted egress reports from zero again), and only changes
//! the sealed reports carry: a forged report never gets this far.

use pon_proto::report::REPORT_EVERY_MS;
use std::time::Duration;

/// A route whose traffic no report confirmed for this long is suspect: one
/// report period, the forwarder's sampling (50 ms) and 50 ms for the
/// reports' jitter. One missed report is enough: suspicion only costs fast
/// keepalives until the next report, never a failover (the probes decide),
/// and each period waited is time a dead route's traffic is lost.
pub const SUSPECT_AFTER: Duration = Duration::from_millis(REPORT_EVERY_MS + 100);
/// A route that sent no data for this long is idle.
pub const BUSY_WINDOW: Duration = Duration::from_secs(1);

/// The keepalive rate a route needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Keepalive {
    /// Idle or confirmed by reports.
    Slow,
    /// Carries traffic that reports stopped confirming.
    Fast,
}

/// One destination's passive watch.
#[derive(Debug, Clone, Default)]
pub struct PassiveWatch {
    /// Counters as last seen: data sent to the destination, and its latest
    /// report of what it received.
    sent: u64,
    confirmed: u64,
    /// When `sent` last changed (None: never seen moving).
    last_sent: Option<Duration>,
    /// When a report last showed progress, or a grace period started
    /// (traffic starting after an idle spell, a new route).
    last_confirmed: Duration,
    seen: bool,
}

impl PassiveWatch {
    /// The forwarder's counters at `now`.
    pub fn on_sample(&mut self, now: Duration, sent: u64, confirmed: u64) {
        if !self.seen {
            // The first sample only sets the baseline: counts from before
            // say nothing about now.
            (self.seen, self.sent, self.confirmed) = (true, sent, confirmed);
            self.last_confirmed = now;
            return;
        }
        if confirmed != self.confirmed {
            self.confirmed = confirmed;
            self.last_confirmed = now;
        }
        if sent != self.sent {
            self.sent = sent;
            if !self.busy(now) {
                // Traffic starts: its first report cannot be here yet.
                self.last_confirmed = self.last_confirmed.max(now);
            }
            self.last_sent = Some(now);
        }
    }

    /// The route changed at `now`: its reports start from now.
    pub fn on_route_changed(&mut self, now: Duration) {
        self.last_confirmed = self.last_confirmed.max(now);
    }

    /// The route failed over at `now`: the new one has not shown that it
    /// works, so while traffic flows it is suspect at once (fast
    /// keepalives) rather than after a grace. When the destination itself
    /// is gone, every route to it fails in turn, each as fast as the first,
    /// and it is found unreachable (its site's other proxies take its
    /// flows) within the failover bound.
    pub fn on_failover(&mut self, now: Duration) {
        let suspect = now.saturating_sub(SUSPECT_AFTER + Duration::from_millis(1));
        self.last_confirmed = self.last_confirmed.min(suspect);
    }

    /// Whether data went out within [`BUSY_WINDOW`] of `now`.
    pub fn busy(&self, now: Duration) -> bool {
        self.last_sent
            .is_some_and(|t| now.saturating_sub(t) < BUSY_WINDOW)
    }

    /// The keepalive rate the route needs at `now`.
    pub fn keepalive(&self, now: Duration) -> Keepalive {
        if self.busy(now) && now.saturating_sub(self.last_confirmed) > SUSPECT_AFTER {
            Keepalive::Fast
        } else {
            Keepalive::Slow
        }
    }

    /// When [`PassiveWatch::keepalive`] may next change by itself (no new
    /// sample): the suspicion deadline, or the end of the busy window.
    pub fn next_change(&self, now: Duration) -> Option<Duration> {
        let sent = self.last_sent?;
        let idle_at = sent + BUSY_WINDOW;
        let suspect_at = self.last_confirmed + SUSPECT_AFTER + Duration::from_nanos(1);
        [idle_at, suspect_at].into_iter().filter(|t| *t > now).min()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const MS: Duration = Duration::from_millis(1);
    fn ms(t: u64) -> Duration {
        Duration::from_millis(t)
    }

    /// Data every `step`; a report every 200 ms while `reports(t)`.
    fn run(
        w: &mut PassiveWatch,
        from: u64,
        to: u64,
        reports: impl Fn(u64) -> bool,
    ) -> Vec<(u64, Keepalive)> {
        let mut out = Vec::new();
        let (mut sent, mut confirmed) = (0u64, 0u64);
        for t in (from..to).step_by(50) {
            sent += 3;
            if t % REPORT_EVERY_MS == 0 && reports(t) {
                confirmed = sent - 1;
            }
            w.on_sample(ms(t), sent, confirmed);
            out.push((t, w.keepalive(ms(t))));
        }
        out
    }

    #[test]
    fn reports_keep_a_busy_route_slow_and_their_end_makes_it_fast() {
        let mut w = PassiveWatch::default();
        let seen = run(&mut w, 0, 3000, |t| t < 2000);
        for (t, k) in &seen {
            // The last report at 1800 ms: suspect after 2100 ms.
            let want = if *t > 1800 + SUSPECT_AFTER.as_millis() as u64 {
                Keepalive::Fast
            } else {
                Keepalive::Slow
            };
            assert_eq!(*k, want, "at {t} ms");
        }
    }

    #[test]
    fn a_route_taken_in_a_failover_is_suspect_at_once_while_traffic_flows() {
        let mut w = PassiveWatch::default();
        w.on_sample(ms(1000), 0, 0);
        w.on_sample(ms(1100), 10, 0);
        w.on_sample(ms(1300), 20, 10);
        assert_eq!(w.keepalive(ms(1300)), Keepalive::Slow);
        w.on_failover(ms(1400));
        assert_eq!(w.keepalive(ms(1400)), Keepalive::Fast);
        // A report from the new route confirms it.
        w.on_sample(ms(1500), 30, 25);
        assert_eq!(w.keepalive(ms(1500)), Keepalive::Slow);
        // A plain route change still gets its grace.
        w.on_route_changed(ms(1600));
        assert_eq!(w.keepalive(ms(1600)), Keepalive::Slow);
    }

    #[test]
    fn an_idle_route_is_never_suspect_and_traffic_gets_a_grace() {
        let mut w = PassiveWatch::default();
        w.on_sample(Duration::ZERO, 10, 10);
        assert_eq!(w.keepalive(ms(60_000)), Keepalive::Slow);
        // Traffic starts after a minute of silence, never confirmed.
        w.on_sample(ms(60_000), 11, 10);
        assert_eq!(w.keepalive(ms(60_000) + SUSPECT_AFTER), Keepalive::Slow);
        w.on_sample(ms(60_300), 12, 10);
        assert_eq!(
            w.keepalive(ms(60_000) + SUSPECT_AFTER + MS),
            Keepalive::Fast
        );
        let just_after = Duration::from_nanos(1);
        assert_eq!(
            w.next_change(ms(60_300)),
            Some(ms(60_000) + SUSPECT_AFTER + just_after)
        );
        assert_eq!(
            w.next_change(ms(61_000)),
            Some(ms(61_300)),
            "idle again a busy window after the last packet"
        );
        assert_eq!(w.keepalive(ms(61_300)), Keepalive::Slow);
        // A new route gets its own grace.
        w.on_sample(ms(62_000), 13, 10);
        w.on_sample(ms(62_400), 14, 10);
        w.on_route_changed(ms(62_400));
        assert_eq!(w.keepalive(ms(62_400) + SUSPECT_AFTER), Keepalive::Slow);
    }

    proptest! {
        /// Whatever the traffic and the reports: a route that sends
        /// nothing is slow; one whose progress was confirmed within
        /// SUSPECT_AFTER is slow; one that sent within the busy window
        /// and was not confirmed for longer than SUSPECT_AFTER is fast.
        #[test]
        fn keepalive_follows_its_definition(
            steps in proptest::collection::vec((1u64..400, any::<bool>(), any::<bool>()), 1..60)
        ) {
            let mut w = PassiveWatch::default();
            let (mut now, mut sent, mut confirmed) = (0u64, 0u64, 0u64);
            let mut last_sent: Option<u64> = None;
            let mut last_conf = 0u64;
            w.on_sample(Duration::ZERO, 0, 0);
            for (dt, send, confirm) in steps {
                now += dt;
                let was_busy = last_sent.is_some_and(|t| now - t < BUSY_WINDOW.as_millis() as u64);
                if confirm { confirmed += 1; last_conf = now; }
                if send {
                    sent += 1;
                    if !was_busy { last_conf = last_conf.max(now); }
                    last_sent = Some(now);
                }
                w.on_sample(ms(now), sent, confirmed);
                let busy = last_sent.is_some_and(|t| now - t < BUSY_WINDOW.as_millis() as u64);
                let want = if busy && now - last_conf > SUSPECT_AFTER.as_millis() as u64 {
                    Keepalive::Fast
                } else {
                    Keepalive::Slow
                };
                prop_assert_eq!(w.keepalive(ms(now)), want);
                if let Some(t) = w.next_change(ms(now)) {
                    prop_assert!(t > ms(now));
                }
            }
        }
    }
}
