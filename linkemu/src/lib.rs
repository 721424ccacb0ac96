//! `pon-linkemu`: the lab's emulated Internet. This kernel has no `netem`,
//! so inter-site packets are routed into a TUN device, delayed, jittered,
//! dropped and rate-limited here per ordered pair of sites, and written back
//! to be routed on. See `emulator` for the model and `io` for the loop.

pub mod config;
pub mod control;
pub mod emulator;
pub mod io;
pub mod metrics;
pub mod packet;
