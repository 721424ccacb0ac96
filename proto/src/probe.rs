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

pub const BODY_LEN: usize = 32;

#[derive(Debug, Clone, Copy)]
pub struct Packet<T: AsRef<[u8]>> {
    buffer: T,
}

impl<T: AsRef<[u8]>> Packet<T> {
    pub fn new_checked(buffer: T) -> Result<Self> {
        let b = buffer.as_ref();
        need(b.len(), BODY_LEN)?;
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
        u32::from_be_bytes(self.b()[0..4].try_into().unwrap_or_default())
    }
    pub fn sequence(&self) -> u32 {
        u32::from_be_bytes(self.b()[4..8].try_into().unwrap_or_default())
    }
    pub fn sent_ns(&self) -> u64 {
        u64::from_be_bytes(self.b()[8..16].try_into().unwrap_or_default())
    }
    pub fn train_index(&self) -> u16 {
        u16::from_be_bytes([self.b()[16], self.b()[17]])
    }
    pub fn train_len(&self) -> u16 {
        u16::from_be_bytes([self.b()[18], self.b()[19]])
    }
    pub fn reply_rx_ns(&self) -> u64 {
        u64::from_be_bytes(self.b()[20..28].try_into().unwrap_or_default())
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
    /// Turns a received probe into its reply in place, stamping the receive time.
    pub fn set_reply_rx_ns(&mut self, ns: u64) {
        self.buffer.as_mut()[20..28].copy_from_slice(&ns.to_be_bytes());
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
        out[0..4].copy_from_slice(&self.session.to_be_bytes());
        out[4..8].copy_from_slice(&self.sequence.to_be_bytes());
        out[8..16].copy_from_slice(&self.sent_ns.to_be_bytes());
        out[16..18].copy_from_slice(&self.train_index.to_be_bytes());
        out[18..20].copy_from_slice(&self.train_len.to_be_bytes());
        out[20..28].copy_from_slice(&self.reply_rx_ns.to_be_bytes());
        out[28..].fill(0);
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
