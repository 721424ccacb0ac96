//! PON wire formats. Pure data: no sockets, no clocks, and no allocation on
//! the data path (`control`, the CU's messages, allocates: it is off it).
//!
//! Every format follows the same shape (after smoltcp's `wire` module): a
//! zero-copy view `Packet<T: AsRef<[u8]>>` whose `new_checked` validates all
//! lengths once so that accessors cannot panic afterwards, and an owned `Repr`
//! with `parse` and `emit`.

pub mod control;
pub mod error;
pub mod ip;
pub mod local;
pub mod pon;
pub mod ports;
pub mod probe;
pub mod steering;

pub use error::Error;

/// Result type of every parser in this crate.
pub type Result<T> = core::result::Result<T, Error>;
