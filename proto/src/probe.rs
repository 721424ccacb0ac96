//! Probe bodies, carried after a PON header of kind `Probe` or `ProbeReply`.
//!
//! ```text
//!  0               4               8              12              16
//! +---------------+---------------+---------------+---------------+
//! |   session     |   sequence    |     sender timestamp (ns)     |
//! +---------------+-------+-------+---------------+---------------+
//! | train index   | train len     |  responder receive time (ns)  |
//! +-------+-------+---------------+-------------------------------+
//! |  padding (optional, for bandwidth trains and MTU probes)      |
//! ```
//!
//! The responder copies everything back and fills in its receive time, so the
//! sender computes RTT from its own clock only; sequence numbers give loss;
//! a train (index/len > 1) of back-to-back probes gives the bottleneck rate
//! from the dispersion of their arrival times.

use crate::error::need;
use crate::{Error, Result};

pub const BODY_LEN: usize = field::PADDING;

mod field {
    use core::ops::Range;
    pub const SESSION: Range<usize> = 0..4;
    pub const SEQUENCE: Range<usize> = 4..8;
    pub const SENT_NS: Range<usize> = 8..16;
    pub const TRAIN_INDEX: Range<usize> = 16..18;
    pub const TRAIN_LEN: Range<usize> = 18..20;
    pub const REPLY_RX_NS: Range<usize> = 20..28;
    /// Reserved, zero on emit.
    pub const RESERVED: Range<usize> = 28..32;
    pub const PADDING: usize = 32;
}

/// A view of a probe body; after `new_checked` no accessor can panic.
#[derive(Debug, Clone, Copy)]
pub struct Packet<T: AsRef<[u8]>> {
    buffer: T,
}

fn be<const N: usize>(b: &[u8], r: core::ops::Range<usize>) -> [u8; N] {
    b[r].try_into().unwrap_or([0; N])
}

impl<T: AsRef<[u8]>> Packet<T> {
    /// A view without checks, for writing a body into a buffer of at least
    /// [`BODY_LEN`] bytes.
    pub fn new_unchecked(buffer: T) -> Self {
        Packet { buffer }
    }
    /// Validates the length and that the train index is below its length.
    pub fn new_checked(buffer: T) -> Result<Self> {
        need(buffer.as_ref().len(), BODY_LEN)?;
        let p = Packet { buffer };
        let (index, len) = (p.train_index(), p.train_len());
        if len == 0 || index >= len {
            return Err(Error::BadTrain { index, len });
        }
        Ok(p)
    }
    fn b(&self) -> &[u8] {
        self.buffer.as_ref()
    }
    pub fn session(&self) -> u32 {
        u32::from_be_bytes(be(self.b(), field::SESSION))
    }
    pub fn sequence(&self) -> u32 {
        u32::from_be_bytes(be(self.b(), field::SEQUENCE))
    }
    pub fn sent_ns(&self) -> u64 {
        u64::from_be_bytes(be(self.b(), field::SENT_NS))
    }
    pub fn train_index(&self) -> u16 {
        u16::from_be_bytes(be(self.b(), field::TRAIN_INDEX))
    }
    pub fn train_len(&self) -> u16 {
        u16::from_be_bytes(be(self.b(), field::TRAIN_LEN))
    }
    pub fn reply_rx_ns(&self) -> u64 {
        u64::from_be_bytes(be(self.b(), field::REPLY_RX_NS))
    }
    /// The padding after the body (bandwidth trains, MTU probes).
    pub fn padding(&self) -> &[u8] {
        &self.b()[field::PADDING..]
    }
    /// Total length including padding.
    pub fn len(&self) -> usize {
        self.b().len()
    }
    pub fn is_empty(&self) -> bool {
        self.b().is_empty()
    }
}

impl<T: AsRef<[u8]> + AsMut<[u8]>> Packet<T> {
    fn m(&mut self) -> &mut [u8] {
        self.buffer.as_mut()
    }
    pub fn set_session(&mut self, v: u32) {
        self.m()[field::SESSION].copy_from_slice(&v.to_be_bytes());
    }
    pub fn set_sequence(&mut self, v: u32) {
        self.m()[field::SEQUENCE].copy_from_slice(&v.to_be_bytes());
    }
    pub fn set_sent_ns(&mut self, v: u64) {
        self.m()[field::SENT_NS].copy_from_slice(&v.to_be_bytes());
    }
    pub fn set_train_index(&mut self, v: u16) {
        self.m()[field::TRAIN_INDEX].copy_from_slice(&v.to_be_bytes());
    }
    pub fn set_train_len(&mut self, v: u16) {
        self.m()[field::TRAIN_LEN].copy_from_slice(&v.to_be_bytes());
    }
    /// Turns a received probe into its reply in place, stamping the receive time.
    pub fn set_reply_rx_ns(&mut self, v: u64) {
        self.m()[field::REPLY_RX_NS].copy_from_slice(&v.to_be_bytes());
    }
    /// Zeroes the reserved bytes and the padding.
    pub fn clear_reserved_and_padding(&mut self) {
        self.m()[field::RESERVED.start..].fill(0);
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Repr {
    pub session: u32,
    pub sequence: u32,
    pub sent_ns: u64,
    pub train_index: u16,
    pub train_len: u16,
    pub reply_rx_ns: u64,
}

impl Repr {
    pub fn parse<T: AsRef<[u8]>>(p: &Packet<T>) -> Result<Self> {
        Ok(Repr {
            session: p.session(),
            sequence: p.sequence(),
            sent_ns: p.sent_ns(),
            train_index: p.train_index(),
            train_len: p.train_len(),
            reply_rx_ns: p.reply_rx_ns(),
        })
    }

    /// Writes the body into `out[..BODY_LEN]` and zeroes any padding after it.
    pub fn emit(&self, out: &mut [u8]) -> Result<()> {
        if out.len() < BODY_LEN {
            return Err(Error::BufferTooSmall {
                needed: BODY_LEN,
                have: out.len(),
            });
        }
        if self.train_len == 0 || self.train_index >= self.train_len {
            return Err(Error::BadTrain {
                index: self.train_index,
                len: self.train_len,
            });
        }
        let mut p = Packet::new_unchecked(out);
        p.set_session(self.session);
        p.set_sequence(self.sequence);
        p.set_sent_ns(self.sent_ns);
        p.set_train_index(self.train_index);
        p.set_train_len(self.train_len);
        p.set_reply_rx_ns(self.reply_rx_ns);
        p.clear_reserved_and_padding();
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_reply_stamp() {
        let r = Repr {
            session: 9,
            sequence: 1234,
            sent_ns: 1 << 40,
            train_index: 2,
            train_len: 8,
            reply_rx_ns: 0,
        };
        let mut buf = [0xaau8; 100];
        r.emit(&mut buf).unwrap();
        let mut p = Packet::new_checked(&mut buf[..]).unwrap();
        p.set_reply_rx_ns(77);
        let back = Repr::parse(&p).unwrap();
        assert_eq!(
            back,
            Repr {
                reply_rx_ns: 77,
                ..r
            }
        );
        assert_eq!(p.len(), 100);
    }

    #[test]
    fn rejects_short_and_bad_trains() {
        assert!(matches!(
            Packet::new_checked(&[0u8; 31][..]),
            Err(Error::Truncated { .. })
        ));
        let mut b = [0u8; 32];
        assert_eq!(
            Packet::new_checked(&b[..]).unwrap_err(),
            Error::BadTrain { index: 0, len: 0 }
        );
        b[17] = 3;
        b[19] = 3;
        assert_eq!(
            Packet::new_checked(&b[..]).unwrap_err(),
            Error::BadTrain { index: 3, len: 3 }
        );
    }
}
