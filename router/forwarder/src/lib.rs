//! The forwarder, PON's data plane: a sans-I/O engine (`engine`) deciding
//! what to do with each packet from a table (`table`) that the control side
//! swaps atomically, and the threads that move bytes between sockets (`io`).
//!
//! It knows nothing of the monitor, the router or the CU: the proxy core
//! (`pon-proxy`) composes the table and stores it; probes that end here are
//! handed to a sink the daemon provides. No lock, channel or allocation per
//! packet (`tests/alloc_free.rs`).

pub mod engine;
pub mod io;
pub mod table;

pub use engine::{Decision, Engine, ForwarderCounters, Output};
pub use table::{Agent, AgentLink, Encap, ForwardingTable, PeerTraffic, SharedTable, TableError};
