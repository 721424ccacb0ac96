//! PON wire formats. Pure data: no sockets, no clocks, no allocation.
//!
//! Every format follows the same shape (after smoltcp's `wire` module): a
//! zero-copy view `Packet<T: AsRef<[u8]>>` whose `new_checked` validates all
//! lengths once so that accessors cannot panic afterwards, and an owned `Repr`
//! with `parse` and `emit`.

pub mod error;
pub mod ip;
pub mod pon;
pub mod probe;

pub use error::Error;

/// Result type of every parser in this crate.
pub type Result<T> = core::result::Result<T, Error>;
