//! pon-proxy: forwarder, monitor and router in one process. The forwarding
//! threads move packets as in pon-forwarder; probes that end here are queued
//! (bounded) to one control thread, which owns the monitor and the router,
//! composes the forwarding table from the base (config or CU view) and the
//! router's routes, stores it, and steers the local TAs.

pub mod compose;
pub mod config;
pub mod control;
pub mod forwarder;
pub mod run;
pub mod split;

pub use config::{ControlConfig, ProxyConfig};
pub use control::{Control, Status};
