//! Path selection, without I/O (and without an async runtime, QUIC or TLS
//! in its dependency tree, so the simulator and the research around it stay
//! light): for every destination proxy, which candidate
//! paths (direct, through one relay, optionally two) to probe within a fixed
//! budget, which one traffic should take under the destination's policy,
//! with hysteresis against flapping and immediate failover, and when the
//! overlay cannot reach a destination at all.
//!
//! - [`Router`]: the state machine the daemon drives (`on_tick`,
//!   `on_probe_result`, `poll_event`); see `router.rs` for the protocol.
//! - [`Policy`]: latency, loss, bandwidth or a weighted mix, as a cost.
//! - [`Measurement`]: per-path RTT/loss/bandwidth estimators.
//! - [`ProbeSelector`]: the learners spending the budget (the CPN random
//!   neural network of PANACEA, a bandit, random, and the full-mesh
//!   reference).
//! - [`passive`]: whether a current route needs fast keepalives, from the
//!   proxy's own traffic and the egress's reports.
//! - [`sim`]: the simulator behind `pon-sim`, driving many routers over a
//!   time series of link matrices against a full-knowledge oracle.

pub mod config;
pub mod measurement;
pub mod passive;
pub mod policy;
pub mod rng;
pub mod router;
pub mod selector;
pub mod sim;

pub use config::{ConfigError, DestinationConfig, RoutingConfig};
pub use measurement::{EstimatorConfig, Measurement};
pub use policy::{PathMetrics, Policy, Weights};
pub use router::{
    candidate_paths, ChangeReason, DestinationStats, ProbeOutcome, ProbeRequest, Router,
    RouterError, RouterEvent,
};
pub use selector::{ProbeSelector, SelectorKind};
