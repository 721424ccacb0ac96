//! The router's settings, loadable from TOML (every field has a default, so
//! an empty table is a valid configuration). Durations are in milliseconds
//! to keep the files plain.

use super::measurement::{EstimatorConfig, MAX_LOSS_WINDOW};
use super::policy::Policy;
use super::selector::{BanditConfig, RnnConfig, SelectorKind};
use serde::{Deserialize, Serialize};
use std::path::Path;
use std::time::Duration;

/// How often the proxy probes a current route besides the learning budget
/// when its traffic went unconfirmed (`[proxy] keepalive_ms`, see
/// [`crate::passive`]): 20 probes/s, so that `failover_losses` consecutive
/// losses are seen within a few hundred milliseconds. The proxy's default,
/// kept here so that pon-sim counts what a proxy pays.
pub const DEFAULT_KEEPALIVE_MS: u64 = 50;
/// How often, at least, the proxy probes a current route that is idle or
/// whose traffic the egress's reports confirm (`[proxy] idle_keepalive_ms`).
/// Any probe on the route (the learning budget pins the current route)
/// postpones the next keepalive, so this is a floor, not an extra cost: it
/// is a little longer than a steady destination's learning period (2
/// intervals of 1 s), and fires only when learning leaves the route alone.
pub const DEFAULT_IDLE_KEEPALIVE_MS: u64 = 2500;
/// How often the proxy measures, with packet trains, the bandwidth of the
/// recently answering candidates of destinations whose policy weighs
/// bandwidth (`[proxy] bandwidth_every_ms`).
pub const DEFAULT_BANDWIDTH_EVERY_MS: u64 = 30_000;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields, default)]
pub struct RoutingConfig {
    /// k: paths probed per destination per interval (the monitoring budget).
    #[schemars(extend("x-unit" = "probes"))]
    pub probes_per_interval: usize,
    /// Probe interval.
    pub interval_ms: u64,
    /// A steady destination (reachable, no challenger, no route change and
    /// no loss on its route for `steady_after_ms`) gets its k probes every
    /// `steady_every` intervals instead of every interval: at steady state
    /// the learning budget costs k / `steady_every` probes per interval,
    /// and anything that unsettles the destination restores the full rate
    /// at its next interval. 1: every interval, always.
    #[schemars(extend("x-unit" = "intervals"))]
    pub steady_every: u32,
    /// How long a destination must stay settled before it is steady.
    pub steady_after_ms: u64,
    /// Policy for destinations without their own.
    pub policy: Policy,
    /// Longest detour considered: 1 (direct and one relay) or 2 (also two
    /// relays: n² candidates, for small overlays).
    pub max_relays: u8,
    /// Which learner spends the budget.
    pub selector: SelectorKind,
    /// Spend one probe per interval on the direct path whatever the learner
    /// says. It is the path most often best, the first-leg RTT to every
    /// relay, and the one that tells "the overlay is down" from "my detours
    /// are down".
    pub always_probe_direct: bool,
    /// Skip probing relayed paths whose first leg (the direct path to the
    /// relay, when the relay is also a destination) is already too slow to
    /// beat the current route by the margin.
    pub prune_by_first_leg: bool,
    /// Switch only to a path whose cost is lower by this fraction...
    #[schemars(extend("x-unit" = "fraction"))]
    pub switch_margin: f64,
    /// ...and by at least this much (ms-equivalent of the policy's cost), so that microsecond
    /// differences between LAN paths do not count as 10 %.
    pub switch_min_gain_ms: f64,
    /// ...for this long (the challenger is probed every interval meanwhile).
    pub hold_ms: u64,
    /// Consecutive lost probes on the current path that trigger failover.
    pub failover_losses: u32,
    /// How long a measurement counts: only paths answered within this time
    /// are candidates (and older estimators restart on their next sample).
    pub fresh_ms: u64,
    /// Weight of a new RTT sample in the smoothed RTT (0..=1).
    pub rtt_alpha: f64,
    /// Probes the loss rate is computed over (1..=64).
    #[schemars(extend("x-unit" = "probes"))]
    pub loss_window: u8,
    /// Seed of the learners' random choices (reproducible runs).
    pub seed: u64,
    /// The `rnn` learner's settings.
    pub rnn: RnnConfig,
    /// The `bandit` learner's settings.
    pub bandit: BanditConfig,
    /// Destinations to optimise from the start (the CU may add more).
    #[serde(rename = "destination")]
    pub destinations: Vec<DestinationConfig>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct DestinationConfig {
    /// Destination proxy id.
    pub id: u32,
    /// Overrides the router-wide policy for this destination.
    #[serde(default)]
    pub policy: Option<Policy>,
}

impl Default for RoutingConfig {
    fn default() -> Self {
        RoutingConfig {
            probes_per_interval: 3,
            interval_ms: 1000,
            steady_every: 2,
            steady_after_ms: 10_000,
            policy: Policy::Latency,
            max_relays: 1,
            selector: SelectorKind::Rnn,
            always_probe_direct: true,
            prune_by_first_leg: true,
            switch_margin: 0.05,
            switch_min_gain_ms: 1.0,
            hold_ms: 2000,
            failover_losses: 3,
            fresh_ms: 10_000,
            rtt_alpha: 0.25,
            loss_window: 20,
            seed: 1,
            rnn: RnnConfig::default(),
            bandit: BanditConfig::default(),
            destinations: Vec::new(),
        }
    }
}

#[derive(Debug, thiserror::Error, PartialEq)]
pub enum ConfigError {
    #[error("routing.{field}: {problem}")]
    Invalid {
        field: &'static str,
        problem: &'static str,
    },
}

fn invalid(field: &'static str, problem: &'static str) -> ConfigError {
    ConfigError::Invalid { field, problem }
}

impl RoutingConfig {
    /// Checks ranges; the error names the field.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.probes_per_interval == 0 {
            return Err(invalid("probes_per_interval", "must be at least 1"));
        }
        if self.interval_ms == 0 {
            return Err(invalid("interval_ms", "must be positive"));
        }
        if !(1..=16).contains(&self.steady_every) {
            return Err(invalid("steady_every", "must be in 1..=16"));
        }
        if self.steady_after_ms > 3_600_000 {
            return Err(invalid("steady_after_ms", "must be at most an hour"));
        }
        if !(1..=2).contains(&self.max_relays) {
            return Err(invalid("max_relays", "must be 1 or 2"));
        }
        if !(0.0..1.0).contains(&self.switch_margin) {
            return Err(invalid("switch_margin", "must be in [0, 1)"));
        }
        if !(0.0..).contains(&self.switch_min_gain_ms) {
            return Err(invalid("switch_min_gain_ms", "must be >= 0"));
        }
        if self.failover_losses == 0 {
            return Err(invalid("failover_losses", "must be at least 1"));
        }
        if self.fresh_ms < self.interval_ms {
            return Err(invalid("fresh_ms", "must be at least interval_ms"));
        }
        if !(self.rtt_alpha > 0.0 && self.rtt_alpha <= 1.0) {
            return Err(invalid("rtt_alpha", "must be in (0, 1]"));
        }
        if self.loss_window == 0 || self.loss_window > MAX_LOSS_WINDOW {
            return Err(invalid("loss_window", "must be in 1..=64"));
        }
        if !(0.0..1.0).contains(&self.rnn.memory) {
            return Err(invalid("rnn.memory", "must be in [0, 1)"));
        }
        if !(0.0..=1.0).contains(&self.rnn.exploration) {
            return Err(invalid("rnn.exploration", "must be in [0, 1]"));
        }
        if self.rnn.external_rate.is_nan() || self.rnn.external_rate <= 0.0 {
            return Err(invalid("rnn.external_rate", "must be positive"));
        }
        if !(self.bandit.discount > 0.0 && self.bandit.discount <= 1.0) {
            return Err(invalid("bandit.discount", "must be in (0, 1]"));
        }
        if !(0.0..).contains(&self.bandit.exploration) {
            return Err(invalid("bandit.exploration", "must be >= 0"));
        }
        Ok(())
    }

    /// Parses and validates a TOML document.
    pub fn from_toml(text: &str) -> anyhow::Result<Self> {
        let cfg: RoutingConfig = toml::from_str(text)?;
        cfg.validate()?;
        Ok(cfg)
    }

    pub fn load(path: &Path) -> anyhow::Result<Self> {
        use anyhow::Context;
        let text =
            std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
        Self::from_toml(&text).with_context(|| format!("in {}", path.display()))
    }

    pub fn interval(&self) -> Duration {
        Duration::from_millis(self.interval_ms)
    }
    pub fn steady_after(&self) -> Duration {
        Duration::from_millis(self.steady_after_ms)
    }
    pub fn hold(&self) -> Duration {
        Duration::from_millis(self.hold_ms)
    }
    pub fn fresh(&self) -> Duration {
        Duration::from_millis(self.fresh_ms)
    }
    pub fn estimator(&self) -> EstimatorConfig {
        EstimatorConfig {
            rtt_alpha: self.rtt_alpha,
            loss_window: self.loss_window,
            stale_after: self.fresh(),
            outage_after: self.failover_losses,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn empty_document_gives_defaults() {
        let cfg = RoutingConfig::from_toml("").unwrap();
        assert_eq!(cfg, RoutingConfig::default());
        assert_eq!(cfg.probes_per_interval, 3);
        assert_eq!(cfg.selector, SelectorKind::Rnn);
    }

    #[test]
    fn full_document_parses() {
        let cfg = RoutingConfig::from_toml(
            r#"
            probes_per_interval = 4
            interval_ms = 500
            policy = "loss"
            max_relays = 2
            selector = "bandit"
            hold_ms = 2000
            [rnn]
            exploration = 0.2
            [[destination]]
            id = 7
            policy = { weighted = { rtt = 1.0, loss = 3.0 } }
            [[destination]]
            id = 9
            "#,
        )
        .unwrap();
        assert_eq!(cfg.probes_per_interval, 4);
        assert_eq!(cfg.policy, Policy::Loss);
        assert_eq!(cfg.selector, SelectorKind::Bandit);
        assert_eq!(cfg.rnn.exploration, 0.2);
        assert_eq!(cfg.rnn.memory, 0.8);
        assert_eq!(cfg.destinations.len(), 2);
        assert!(matches!(
            cfg.destinations[0].policy,
            Some(Policy::Weighted(_))
        ));
        assert_eq!(cfg.destinations[1].policy, None);
    }

    #[test]
    fn errors_name_the_field() {
        for (doc, field) in [
            ("probes_per_interval = 0", "probes_per_interval"),
            ("max_relays = 3", "max_relays"),
            ("switch_margin = 1.5", "switch_margin"),
            ("fresh_ms = 10\ninterval_ms = 1000", "fresh_ms"),
            ("loss_window = 65", "loss_window"),
            ("[rnn]\nmemory = 1.0", "rnn.memory"),
        ] {
            let err = format!("{:#}", RoutingConfig::from_toml(doc).unwrap_err());
            assert!(err.contains(field), "{doc}: {err}");
        }
        let err = format!("{:#}", RoutingConfig::from_toml("k = 3").unwrap_err());
        assert!(err.contains("unknown field"), "{err}");
    }
}
