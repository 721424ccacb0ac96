//! Routing policies: what "best path" means for a destination. Each policy is
//! a cost over a path's estimated RTT, loss rate and (optionally) available
//! bandwidth, in milliseconds-equivalent, lower is better, `f64::INFINITY`
//! for a path that cannot be used. The same cost is the goal `G` the
//! learners are rewarded with (`R = 1/G`), so probing effort follows the
//! policy too.

use serde::{Deserialize, Serialize};

/// One percent of loss costs this many milliseconds under `Loss` (and per
/// unit of weight under `Weighted`): 1 % = 100 ms, so a path with 5 % loss
/// (500 ms) loses to a clean one unless the clean one is more than half a
/// second slower, which no terrestrial path is.
pub const LOSS_MS_PER_PERCENT: f64 = 100.0;

/// Smallest retransmission timeout a TCP sender uses (Linux: 200 ms); under
/// `Latency` a lost packet costs one of these (or two RTTs if longer).
pub const MIN_RTO_MS: f64 = 200.0;

/// Segment size used in the TCP throughput estimate (Mathis et al. 1997)
/// when no bandwidth measurement exists.
const MSS_BITS: f64 = 1448.0 * 8.0;

/// Loss floor for the throughput estimate: a path with no loss seen in the
/// window is not infinitely fast, only "better than 0.1 %".
const MIN_LOSS_FOR_THROUGHPUT: f64 = 0.001;

#[derive(Debug, Clone, Copy, PartialEq, Default, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "lowercase", deny_unknown_fields)]
pub enum Policy {
    /// Lowest expected delivery delay: RTT plus, per lost packet, the
    /// retransmission timeout it costs a reliable sender.
    #[default]
    Latency,
    /// Lowest loss; RTT only breaks ties between equally clean paths.
    Loss,
    /// Highest throughput: the measured available bandwidth, or without a
    /// measurement what TCP can reach over the path's RTT and loss.
    Bandwidth,
    /// A weighted sum of the three terms: `rtt` × RTT in
    /// ms + `loss` × loss in % × 100 + `bandwidth` × 1000 / Mbit/s; the
    /// weights default to 1, 1 and 0.
    Weighted(Weights),
}

/// Weights of the `Weighted` policy. Each term is in milliseconds-equivalent:
/// `rtt · rtt_ms + loss · (loss_percent · 100) + bandwidth · (1000 / Mbps)`,
/// so with all weights 1, one percent of loss is worth 100 ms and going from
/// 100 to 10 Mbit/s is worth 90 ms.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields, default)]
pub struct Weights {
    /// Weight of the RTT in ms.
    pub rtt: f64,
    /// Weight of the loss in percent, times 100.
    pub loss: f64,
    /// Weight of 1000 / available Mbit/s.
    pub bandwidth: f64,
}

impl Default for Weights {
    fn default() -> Self {
        Weights {
            rtt: 1.0,
            loss: 1.0,
            bandwidth: 0.0,
        }
    }
}

/// The inputs of a cost: what a measurement knows about one path.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct PathMetrics {
    pub rtt_ms: f64,
    /// Fraction of probes lost, 0..=1.
    pub loss: f64,
    /// Available bandwidth, if the monitor measured it.
    pub bandwidth_mbps: Option<f64>,
}

impl Policy {
    /// The cost of a path (lower is better; infinite when unusable).
    pub fn cost(&self, m: &PathMetrics) -> f64 {
        let p = m.loss.clamp(0.0, 1.0);
        if p >= 1.0 || !m.rtt_ms.is_finite() || m.rtt_ms < 0.0 {
            return f64::INFINITY;
        }
        let rtt = m.rtt_ms;
        match self {
            // Expected time until a packet gets through when each loss costs
            // one RTO: rtt + p/(1-p)·RTO (geometric number of retries).
            Policy::Latency => rtt + p / (1.0 - p) * MIN_RTO_MS.max(2.0 * rtt),
            Policy::Loss => p * 100.0 * LOSS_MS_PER_PERCENT + rtt,
            Policy::Bandwidth => 1000.0 / effective_mbps(m),
            Policy::Weighted(w) => {
                w.rtt * rtt
                    + w.loss * p * 100.0 * LOSS_MS_PER_PERCENT
                    + w.bandwidth * 1000.0 / effective_mbps(m)
            }
        }
    }
}

impl Policy {
    /// `f` such that cost ≥ f · RTT for every path, if there is one: a path
    /// whose RTT is known to be at least x cannot cost less than f · x.
    /// Whether available bandwidth enters the cost: only then is it worth
    /// measuring with packet trains (the proxy core and pon-sim both ask).
    pub fn weighs_bandwidth(&self) -> bool {
        match self {
            Policy::Bandwidth => true,
            Policy::Weighted(w) => w.bandwidth > 0.0,
            Policy::Latency | Policy::Loss => false,
        }
    }

    pub fn rtt_floor_factor(&self) -> Option<f64> {
        match self {
            Policy::Latency | Policy::Loss => Some(1.0),
            Policy::Bandwidth => None,
            // Every term is non-negative, so the RTT term alone is a floor.
            Policy::Weighted(w) => (w.rtt > 0.0).then_some(w.rtt),
        }
    }
}

/// Throughput to expect: the measured available bandwidth if there is one,
/// else what one TCP flow gets over the path's RTT and loss (the Mathis
/// bound MSS / (RTT · sqrt(2p/3))), which at least ranks unmeasured paths
/// sensibly (shorter and cleaner is faster).
fn effective_mbps(m: &PathMetrics) -> f64 {
    match m.bandwidth_mbps {
        Some(bw) => bw.max(1e-9),
        None => {
            let p = m.loss.max(MIN_LOSS_FOR_THROUGHPUT);
            let rtt_s = (m.rtt_ms / 1000.0).max(1e-4);
            MSS_BITS / (rtt_s * (2.0 * p / 3.0).sqrt()) / 1e6
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn m(rtt_ms: f64, loss: f64, bw: Option<f64>) -> PathMetrics {
        PathMetrics {
            rtt_ms,
            loss,
            bandwidth_mbps: bw,
        }
    }

    #[test]
    fn loss_policy_prefers_a_clean_slower_path_to_a_lossy_fast_one() {
        let lossy = m(50.0, 0.05, None);
        let clean = m(300.0, 0.0, None);
        assert!(Policy::Loss.cost(&clean) < Policy::Loss.cost(&lossy));
        // Under Latency the 5 % loss still costs something, but a 250 ms
        // detour is worse than an occasional retransmission.
        assert!(Policy::Latency.cost(&lossy) < Policy::Latency.cost(&clean));
        assert!(Policy::Latency.cost(&lossy) > Policy::Latency.cost(&m(50.0, 0.0, None)));
    }

    #[test]
    fn latency_is_rtt_when_clean_and_dead_paths_cost_infinity() {
        assert_eq!(Policy::Latency.cost(&m(80.0, 0.0, None)), 80.0);
        for p in [Policy::Latency, Policy::Loss, Policy::Bandwidth] {
            assert_eq!(p.cost(&m(80.0, 1.0, None)), f64::INFINITY);
            assert_eq!(p.cost(&m(f64::NAN, 0.0, None)), f64::INFINITY);
        }
    }

    #[test]
    fn bandwidth_prefers_measured_capacity_and_falls_back_to_tcp_model() {
        let fat = m(100.0, 0.0, Some(900.0));
        let thin = m(20.0, 0.0, Some(10.0));
        assert!(Policy::Bandwidth.cost(&fat) < Policy::Bandwidth.cost(&thin));
        // Without measurements, shorter and cleaner paths carry more TCP.
        let short = m(20.0, 0.0, None);
        let long = m(200.0, 0.0, None);
        let lossy = m(20.0, 0.05, None);
        assert!(Policy::Bandwidth.cost(&short) < Policy::Bandwidth.cost(&long));
        assert!(Policy::Bandwidth.cost(&short) < Policy::Bandwidth.cost(&lossy));
    }

    #[test]
    fn weighted_mixes_terms() {
        let rtt_only = Policy::Weighted(Weights {
            rtt: 1.0,
            loss: 0.0,
            bandwidth: 0.0,
        });
        assert_eq!(rtt_only.cost(&m(42.0, 0.3, None)), 42.0);
        let both = Policy::Weighted(Weights::default());
        // 1 % loss = 100 ms.
        assert!((both.cost(&m(42.0, 0.01, None)) - 142.0).abs() < 1e-9);
    }

    #[test]
    fn policies_parse_from_toml() {
        #[derive(Deserialize)]
        struct T {
            a: Policy,
            b: Policy,
        }
        let t: T =
            toml::from_str("a = \"loss\"\nb = { weighted = { rtt = 2.0, loss = 0.5 } }\n").unwrap();
        assert_eq!(t.a, Policy::Loss);
        assert_eq!(
            t.b,
            Policy::Weighted(Weights {
                rtt: 2.0,
                loss: 0.5,
                bandwidth: 0.0
            })
        );
        assert!(toml::from_str::<T>("a = \"fastest\"\nb = \"loss\"\n").is_err());
    }
}
