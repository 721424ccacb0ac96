//! The PON proxy: forwarder, monitor and router of one proxy site, in one
//! process (`pon-proxy`) or three (`pon-forwarder` with a `[local]` link,
//! `pon-monitor`, `pon-router`).
//!
//! - [`core`]: the sans-I/O proxy core. Its three parts (forwarder side,
//!   monitor, router) talk through typed local messages; [`ProxyCore`] is
//!   the three in one process. No sockets, no clocks, no threads.
//! - [`daemon`]: what moves the core's inputs and outputs: one event loop
//!   shared by every daemon, the local link between split processes, and
//!   the adapters of each binary.
//! - [`forwarder`]: the forwarder daemon's configuration and the CU view →
//!   table glue (the data plane itself is the `pon-forwarder` crate).
//! - [`compose`]: the table's inputs and the TAs' steering messages.

pub mod compose;
pub mod config;
pub mod core;
pub mod daemon;
pub mod forwarder;

pub use crate::core::{ProxyCore, Status};
pub use config::{ControlConfig, ProxyConfig};
