//! Traffic reports, carried after a PON header of kind `Report`: the egress
//! proxy tells an ingress proxy what data it received from it, so that the
//! ingress can take its own traffic as the liveness signal of its current
//! route instead of keepalive probes (passive measurement). Sealed end to
//! end like every proxy-to-proxy message: a report that does not open under
//! the session with its claimed source is dropped before it is read.
//!
//! ```text
//!  0       1       2       3       4               8
//! +-------+-------+-------+-------+---------------+
//! |version|    reserved (0)       |  window (ms)  |
//! +-------+-----------------------+---------------+-------------------+
//! |       received (data packets from the ingress, cumulative)        |
//! +-------------------------------------------------------------------+
//! |       highest seal counter among them                             |
//! +-------------------------------------------------------------------+
//! ```
//!
//! `received` counts from the egress's start, so a lost report costs
//! nothing: the next one carries the total. `window` is the time since
//! the previous report; `highest seal counter` lets the ingress estimate
//! loss (counters it sealed that never arrived), within one session.

use crate::error::need;
use crate::{Error, Result};

/// An egress reports to each ingress this often while data from it keeps
/// arriving (and not at all otherwise): the ingress's liveness signal, so
/// it bounds how soon a dead route that carries traffic is suspected.
pub const REPORT_EVERY_MS: u64 = 200;

/// Version of the report body.
pub const VERSION: u8 = 1;
/// Length of a report body; it has no padding.
pub const BODY_LEN: usize = field::HIGHEST_COUNTER.end;

mod field {
    use core::ops::Range;
    pub const VERSION: usize = 0;
    pub const RESERVED: Range<usize> = 1..4;
    pub const WINDOW_MS: Range<usize> = 4..8;
    pub const RECEIVED: Range<usize> = 8..16;
    pub const HIGHEST_COUNTER: Range<usize> = 16..24;
}

fn be<const N: usize>(b: &[u8], r: core::ops::Range<usize>) -> [u8; N] {
    b[r].try_into().unwrap_or([0; N])
}

/// A view of a report body; after `new_checked` no accessor can panic.
#[derive(Debug, Clone, Copy)]
pub struct Packet<T: AsRef<[u8]>> {
    buffer: T,
}

impl<T: AsRef<[u8]>> Packet<T> {
    /// A view without checks, for writing a body into [`BODY_LEN`] bytes.
    pub fn new_unchecked(buffer: T) -> Self {
        Packet { buffer }
    }
    /// Validates the length (exactly [`BODY_LEN`]) and the version.
    pub fn new_checked(buffer: T) -> Result<Self> {
        let len = buffer.as_ref().len();
        need(len, BODY_LEN)?;
        if len > BODY_LEN {
            return Err(Error::TrailingBytes {
                extra: len - BODY_LEN,
            });
        }
        let p = Packet { buffer };
        if p.version() != VERSION {
            return Err(Error::BadVersion(p.version()));
        }
        Ok(p)
    }
    fn b(&self) -> &[u8] {
        self.buffer.as_ref()
    }
    pub fn version(&self) -> u8 {
        self.b()[field::VERSION]
    }
    pub fn window_ms(&self) -> u32 {
        u32::from_be_bytes(be(self.b(), field::WINDOW_MS))
    }
    pub fn received(&self) -> u64 {
        u64::from_be_bytes(be(self.b(), field::RECEIVED))
    }
    pub fn highest_counter(&self) -> u64 {
        u64::from_be_bytes(be(self.b(), field::HIGHEST_COUNTER))
    }
}

impl<T: AsRef<[u8]> + AsMut<[u8]>> Packet<T> {
    fn m(&mut self) -> &mut [u8] {
        self.buffer.as_mut()
    }
    pub fn set_version(&mut self, v: u8) {
        self.m()[field::VERSION] = v;
        self.m()[field::RESERVED].fill(0);
    }
    pub fn set_window_ms(&mut self, v: u32) {
        self.m()[field::WINDOW_MS].copy_from_slice(&v.to_be_bytes());
    }
    pub fn set_received(&mut self, v: u64) {
        self.m()[field::RECEIVED].copy_from_slice(&v.to_be_bytes());
    }
    pub fn set_highest_counter(&mut self, v: u64) {
        self.m()[field::HIGHEST_COUNTER].copy_from_slice(&v.to_be_bytes());
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Repr {
    pub window_ms: u32,
    pub received: u64,
    pub highest_counter: u64,
}

impl Repr {
    pub fn parse<T: AsRef<[u8]>>(p: &Packet<T>) -> Self {
        Repr {
            window_ms: p.window_ms(),
            received: p.received(),
            highest_counter: p.highest_counter(),
        }
    }

    /// Writes the body into `out[..BODY_LEN]`.
    pub fn emit(&self, out: &mut [u8]) -> Result<()> {
        if out.len() < BODY_LEN {
            return Err(Error::BufferTooSmall {
                needed: BODY_LEN,
                have: out.len(),
            });
        }
        let mut p = Packet::new_unchecked(&mut out[..BODY_LEN]);
        p.set_version(VERSION);
        p.set_window_ms(self.window_ms);
        p.set_received(self.received);
        p.set_highest_counter(self.highest_counter);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn rejects_wrong_lengths_and_versions() {
        assert!(matches!(
            Packet::new_checked(&[1u8; BODY_LEN - 1][..]),
            Err(Error::Truncated { .. })
        ));
        let mut b = [0u8; BODY_LEN + 2];
        b[0] = VERSION;
        assert_eq!(
            Packet::new_checked(&b[..]).unwrap_err(),
            Error::TrailingBytes { extra: 2 }
        );
        b[0] = 9;
        assert_eq!(
            Packet::new_checked(&b[..BODY_LEN]).unwrap_err(),
            Error::BadVersion(9)
        );
    }

    proptest! {
        #[test]
        fn round_trips(window_ms: u32, received: u64, highest_counter: u64) {
            let r = Repr { window_ms, received, highest_counter };
            let mut b = [0xaau8; BODY_LEN];
            r.emit(&mut b).unwrap();
            prop_assert_eq!(Repr::parse(&Packet::new_checked(&b[..]).unwrap()), r);
        }

        #[test]
        fn garbage_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..64)) {
            if let Ok(p) = Packet::new_checked(&bytes[..]) {
                let r = Repr::parse(&p);
                let mut out = [0u8; BODY_LEN];
                r.emit(&mut out).unwrap();
                // Reserved bytes are not carried over; the rest must match.
                prop_assert_eq!(&out[4..], &bytes[4..]);
            }
        }
    }
}
