//! How many QUIC/TLS handshakes the CU lets be in progress at once,
//! sans-I/O: the accept loop asks for the limit with the time, the number
//! of handshakes established so far and the agents' round trip.
//!
//! A fixed limit is a limit on handshakes per round trip: a handshake holds
//! its place from the client's first flight until its Finished arrives, one
//! round trip after the CU's flight, however little CPU it costs meanwhile.
//! 64 at once is plenty on loopback and 320 handshakes a second with agents
//! 200 ms away: a re-registration storm of 10,000 agents took 41 s there
//! (`pon-cu-bench --rtt-ms 200`) on a CU that registers 1,300 a second.
//!
//! So the limit is `working`, the handshakes the CU works on at once (what
//! the fixed limit was for: its CPU goes to handshakes that finish, not to
//! thousands progressing together, each too slowly for its client), plus
//! room for those parked waiting for their agents' answer: by Little's
//! law, the rate the CU establishes them times the round trip, and twice
//! that (`PARKED_HEADROOM`). On loopback that is the fixed limit again. Far
//! away, more handshakes in progress let more finish per second, which
//! parks more, until the CPU bounds the rate with `working` handshakes
//! queued for it, as on loopback.
//!
//! The round trip is the least one seen on the connections established in
//! the last two seconds. An average follows every queue on the way (a busy
//! client answers late, and so does a busy CU): in a storm on loopback it
//! grew to hundreds of milliseconds, the CU parked hundreds of handshakes
//! that were not parked at all, and the storm took 24 s instead of 15.
//!
//! Tried and not kept: a limit of the rate times the round trip plus a
//! fixed time to queue (0.5 s, 2 s), with no fixed part. On loopback it
//! admitted hundreds to thousands at once; clients whose handshakes waited
//! that long sent them again, and the storm took 18-34 s against 15 s.

use std::time::Duration;

/// How often the rate is sampled: handshakes finish in bursts, and a
/// quarter second's count overstated the rate by half.
const SAMPLE_EVERY: Duration = Duration::from_millis(500);
/// What the estimate of the CU's rate keeps of itself at each sample below
/// it (a half-life of about 3 s). What it did in the last half second is
/// often less than it can, because fewer clients came (the ones refused a
/// moment ago are backing off); an estimate that followed every lull down
/// parked fewer, refused more, and saw fewer still. A sample above the
/// estimate is taken at once: the CU did establish that many.
const KEEP: f64 = 0.9;
/// Room for this many times the handshakes the rate and the round trip
/// park. The rate is what the CU did with what it admitted, so it can only
/// grow as fast as the limit lets it: with exactly what is parked, agents
/// 200 ms away came back at 500-700 a second for most of a storm (31 s in
/// all), most of them refused in its first seconds and backing off. Twice
/// lets the rate double from one sample to the next until the CPU bounds
/// it, at the price of about a round trip's worth of handshakes queued for
/// the CPU beyond `working`; a client waits a round trip longer, well
/// within its own probe timeout, which grows with the round trip.
const PARKED_HEADROOM: f64 = 2.0;
/// The round trip is the least over this many samples (two seconds).
const RTT_SAMPLES: usize = 4;
/// The longest round trip the limit makes room for. A client sets its own
/// round trip (it may hold back its acknowledgements), so without a bound
/// a few slow or hostile ones would open the door to every handshake up to
/// the ceiling; no agent that slow is worth that.
const MAX_RTT: Duration = Duration::from_secs(1);

#[derive(Debug, Clone)]
pub struct HandshakeAdmission {
    working: u64,
    ceiling: u64,
    /// Handshakes the CU establishes per second: the best lately, decaying.
    rate: f64,
    /// The least round trip of each of the last samples (none: no
    /// connection established in it).
    rtts: [Option<Duration>; RTT_SAMPLES],
    samples: usize,
    sampled_at: Duration,
    finished_at_sample: u64,
    limit: u64,
}

impl HandshakeAdmission {
    /// `ceiling` bounds the whole (the memory handshakes in progress hold),
    /// also when below `working`.
    pub fn new(working: u64, ceiling: u64) -> Self {
        let ceiling = ceiling.max(1);
        let working = working.clamp(1, ceiling);
        HandshakeAdmission {
            working,
            ceiling,
            rate: 0.0,
            rtts: [None; RTT_SAMPLES],
            samples: 0,
            sampled_at: Duration::ZERO,
            finished_at_sample: 0,
            limit: working,
        }
    }

    /// The limit at `now` (time since any fixed start, never going back),
    /// `established` being the handshakes established since that start (not
    /// the failed ones: most fail by timing out, which costs nothing, and
    /// counting them overstated the rate by half in a storm).
    /// `least_rtt` gives the least round trip of the connections
    /// established since it was last called, and forgets it; it is called
    /// once per sample.
    pub fn limit(
        &mut self,
        now: Duration,
        established: u64,
        least_rtt: impl FnOnce() -> Option<Duration>,
    ) -> u64 {
        let elapsed = now.saturating_sub(self.sampled_at);
        if elapsed >= SAMPLE_EVERY {
            let done = established.saturating_sub(self.finished_at_sample);
            let sample = done as f64 / elapsed.as_secs_f64();
            self.rate = if sample >= self.rate {
                sample
            } else {
                KEEP * self.rate + (1.0 - KEEP) * sample
            };
            self.sampled_at = now;
            self.finished_at_sample = established;
            self.rtts[self.samples % RTT_SAMPLES] = least_rtt();
            self.samples += 1;
            let rtt = self
                .rtts
                .iter()
                .flatten()
                .min()
                .copied()
                .unwrap_or_default();
            // f64 to u64 saturates.
            let parked = (PARKED_HEADROOM * self.rate * rtt.min(MAX_RTT).as_secs_f64()) as u64;
            self.limit = self.working.saturating_add(parked).min(self.ceiling);
        }
        self.limit
    }

    /// Handshakes the CU establishes per second, as estimated.
    pub fn rate(&self) -> f64 {
        self.rate
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// A CU establishing `cpu` handshakes a second at most, each after a
    /// round trip `rtt`, clients always waiting; steps of 10 ms. Returns
    /// the limit after `secs` seconds and the handshakes established over
    /// the last second.
    fn storm(cpu: f64, rtt: Duration, secs: u64) -> (u64, f64) {
        let mut a = HandshakeAdmission::new(64, 100_000);
        let step = Duration::from_millis(10);
        let end = Duration::from_secs(secs);
        let mut now = Duration::ZERO;
        let mut established = 0u64;
        // Handshakes in progress, with the time each started.
        let mut in_progress: std::collections::VecDeque<Duration> = Default::default();
        let mut credit = 0.0;
        let mut last_second = 0;
        while now < end {
            let limit = a.limit(now, established, || Some(rtt));
            while (in_progress.len() as u64) < limit {
                in_progress.push_back(now);
            }
            // The CPU finishes the oldest ones that have waited a round trip.
            credit += cpu * step.as_secs_f64();
            while credit >= 1.0 && in_progress.front().is_some_and(|&t| now >= t + rtt) {
                in_progress.pop_front();
                credit -= 1.0;
                established += 1;
                if now + Duration::from_secs(1) >= end {
                    last_second += 1;
                }
            }
            credit = credit.min(cpu * step.as_secs_f64());
            now += step;
        }
        (a.limit(now, established, || Some(rtt)), last_second as f64)
    }

    #[test]
    fn a_quiet_cu_admits_what_it_works_on() {
        let mut a = HandshakeAdmission::new(64, 4096);
        let rtt = Duration::from_millis(100);
        assert_eq!(a.limit(Duration::ZERO, 0, || Some(rtt)), 64);
        assert_eq!(a.limit(Duration::from_secs(10), 0, || None), 64);
        assert_eq!(a.rate(), 0.0);
    }

    #[test]
    fn on_loopback_the_limit_is_what_the_cu_works_on() {
        let (limit, rate) = storm(300.0, Duration::from_millis(1), 20);
        assert!(rate > 280.0, "{rate} handshakes/s");
        assert_eq!(limit, 64);
    }

    #[test]
    fn far_agents_are_not_held_to_a_fixed_number_per_round_trip() {
        // 200 ms away, 1,500 handshakes/s of CPU: a fixed 64 gives 320/s.
        let (limit, rate) = storm(1500.0, Duration::from_millis(200), 20);
        assert!(rate > 1400.0, "{rate} handshakes/s");
        // 64 worked on, a round trip's worth parked: not the 10,000 a
        // storm offers.
        assert!((600..=720).contains(&limit), "limit {limit}");
    }

    #[test]
    fn a_long_round_trip_gets_the_whole_cpu_too() {
        let (limit, rate) = storm(1500.0, Duration::from_millis(900), 60);
        assert!(rate > 1400.0, "{rate} handshakes/s");
        assert!((2600..=2900).contains(&limit), "limit {limit}");
    }

    #[test]
    fn the_round_trip_is_the_least_seen_lately_not_what_queues_add() {
        let mut a = HandshakeAdmission::new(64, 100_000);
        let mut now = Duration::ZERO;
        let mut established = 0;
        // 1,000/s; each sample sees one connection 10 ms away and others
        // that queues made look 500 ms away: the least is what counts.
        for _ in 0..8 {
            now += SAMPLE_EVERY;
            established += 500;
            a.limit(now, established, || Some(Duration::from_millis(10)));
        }
        assert_eq!(a.limit(now, established, || None), 64 + 20);
        // Once the 10 ms ones are two seconds old, a round trip of 200 ms
        // is what is seen.
        for _ in 0..RTT_SAMPLES {
            now += SAMPLE_EVERY;
            established += 500;
            a.limit(now, established, || Some(Duration::from_millis(200)));
        }
        assert_eq!(a.limit(now, established, || None), 64 + 400);
        // Samples with no connection keep what was seen.
        for _ in 0..RTT_SAMPLES - 1 {
            now += SAMPLE_EVERY;
            a.limit(now, established, || None);
        }
        assert!(a.limit(now, established, || None) > 64);
    }

    #[test]
    fn clients_that_claim_a_long_round_trip_park_no_more_than_a_second_of_it() {
        let mut a = HandshakeAdmission::new(64, 100_000);
        let mut now = Duration::ZERO;
        let mut established = 0;
        let slow = Duration::from_secs(3600);
        for _ in 0..40 {
            now += SAMPLE_EVERY;
            established += 500;
            a.limit(now, established, || Some(slow));
        }
        // 64 + twice 1,000/s times 1 s, not times an hour.
        assert_eq!(a.limit(now, established, || Some(slow)), 2064);
    }

    #[test]
    fn the_limit_falls_back_slowly_when_handshakes_stop_coming() {
        let mut a = HandshakeAdmission::new(64, 4096);
        let rtt = Duration::from_secs(1);
        let mut now = Duration::ZERO;
        let mut established = 0;
        for _ in 0..40 {
            now += SAMPLE_EVERY;
            established += 1000;
            a.limit(now, established, || Some(rtt));
        }
        assert_eq!(a.limit(now, established, || Some(rtt)), 4064);
        // Slowly: a lull is not a slower CU.
        now += SAMPLE_EVERY;
        assert_eq!(a.limit(now, established, || Some(rtt)), 3664);
        for _ in 0..70 {
            now += SAMPLE_EVERY;
            a.limit(now, established, || Some(rtt));
        }
        assert!(a.limit(now, established, || Some(rtt)) <= 70);
    }

    #[test]
    fn the_ceiling_bounds_the_whole() {
        let mut a = HandshakeAdmission::new(64, 1);
        let rtt = Duration::from_millis(200);
        assert_eq!(a.limit(Duration::ZERO, 0, || Some(rtt)), 1);
        assert_eq!(a.limit(Duration::from_secs(1), 1_000_000, || Some(rtt)), 1);
    }

    proptest! {
        /// Whatever the clock and the counts do (a counter that goes back,
        /// time standing still or leaping, any round trip), the limit stays
        /// within its bounds and never panics.
        #[test]
        fn the_limit_stays_within_its_bounds(
            working in 0u64..1000,
            ceiling in 0u64..100_000,
            steps in proptest::collection::vec((0u64..5_000, 0u64..u64::MAX, 0u64..u64::MAX), 1..50),
        ) {
            let mut a = HandshakeAdmission::new(working, ceiling);
            let mut now = Duration::ZERO;
            for (dt, established, rtt_us) in steps {
                now += Duration::from_millis(dt);
                let l = a.limit(now, established, || (rtt_us % 3 != 0).then(|| Duration::from_micros(rtt_us)));
                prop_assert!(l >= working.clamp(1, ceiling.max(1)));
                prop_assert!(l <= ceiling.max(1));
            }
        }
    }
}
