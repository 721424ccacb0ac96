//! The PON proxy. For now the forwarder: the fast path that carries agent
//! packets into the overlay, relays them along source routes, and hands them
//! to the destination's reception agent.

pub mod forwarder;
pub mod monitor;
pub mod proxy;
pub mod routing;
pub mod split;
