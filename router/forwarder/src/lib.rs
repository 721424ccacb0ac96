//! The forwarder: a sans-I/O engine (`engine`) deciding what to do with each
//! packet from a table (`table`) that the control side swaps atomically, and
//! the threads that move bytes between sockets (`io`).

pub mod engine;
pub mod io;
pub mod table;

pub use engine::{Decision, Engine, ForwarderCounters, Output};
pub use table::{Agent, Encap, ForwardingTable, SharedTable, TableError};
