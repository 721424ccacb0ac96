//! The forwarder as a daemon: its configuration file and how a CU view
//! becomes its table. The data plane itself is the `pon-forwarder` crate,
//! re-exported here so the daemons name one module.

pub mod config;
pub mod cu;

pub use config::ForwarderConfig;
pub use pon_forwarder::*;
