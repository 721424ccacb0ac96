//! The site-LAN header: what authenticates a datagram between a proxy and
//! the agents of its site (TA → forwarder, forwarder → RA, proxy → TA
//! steering). Every such datagram is
//!
//! ```text
//!  0       1       2               4                              12                             20
//! +-------+-------+---------------+------------------------------+------------------------------+----------------+-----------+
//! |version| flags |   reserved    |  epoch (u64, big endian)     |  counter (u64, big endian)   |    payload     | tag (16)  |
//! +-------+-------+---------------+------------------------------+------------------------------+----------------+-----------+
//! ```
//!
//! `epoch` names the sender's run (nanoseconds since the Unix epoch at its
//! start, so it grows across restarts) and selects the key (derived per
//! pair, direction and epoch: see `pon_tunnel::lan`); `counter` grows with
//! every datagram of an epoch and is the AEAD nonce. With `ENCRYPTED` the
//! payload is AES-256-GCM ciphertext (the header is the additional data);
//! without it the payload is clear and the tag is a GMAC over header and
//! payload. Either way the tag is checked before the payload is looked at.

use crate::error::{need, Error};

pub const LAN_VERSION: u8 = 1;
pub const HEADER_LEN: usize = 20;
pub const TAG_LEN: usize = 16;
/// Bytes the LAN layer adds to a payload.
pub const OVERHEAD: usize = HEADER_LEN + TAG_LEN;
/// Flag: the payload is encrypted.
pub const ENCRYPTED: u8 = 1;

/// A checked view of a LAN datagram (header, payload, tag).
#[derive(Debug, Clone, Copy)]
pub struct Packet<T: AsRef<[u8]>> {
    buffer: T,
}

impl<T: AsRef<[u8]>> Packet<T> {
    /// Checks the length (header and tag present) and the version.
    pub fn new_checked(buffer: T) -> crate::Result<Self> {
        let b = buffer.as_ref();
        need(b.len(), OVERHEAD)?;
        if b[0] != LAN_VERSION {
            return Err(Error::BadVersion(b[0]));
        }
        Ok(Packet { buffer })
    }

    pub fn encrypted(&self) -> bool {
        self.buffer.as_ref()[1] & ENCRYPTED != 0
    }

    pub fn epoch(&self) -> u64 {
        u64::from_be_bytes(self.buffer.as_ref()[4..12].try_into().expect("checked"))
    }

    pub fn counter(&self) -> u64 {
        u64::from_be_bytes(self.buffer.as_ref()[12..20].try_into().expect("checked"))
    }

    /// The payload's range in the buffer (between header and tag).
    pub fn payload_range(&self) -> std::ops::Range<usize> {
        HEADER_LEN..self.buffer.as_ref().len() - TAG_LEN
    }

    pub fn into_inner(self) -> T {
        self.buffer
    }
}

/// The header's fields.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Repr {
    pub encrypted: bool,
    pub epoch: u64,
    pub counter: u64,
}

impl Repr {
    pub fn parse<T: AsRef<[u8]>>(p: &Packet<T>) -> Repr {
        Repr {
            encrypted: p.encrypted(),
            epoch: p.epoch(),
            counter: p.counter(),
        }
    }

    /// Writes the header into `buf[..HEADER_LEN]`.
    pub fn emit(&self, buf: &mut [u8]) -> crate::Result<()> {
        if buf.len() < HEADER_LEN {
            return Err(Error::BufferTooSmall {
                needed: HEADER_LEN,
                have: buf.len(),
            });
        }
        buf[0] = LAN_VERSION;
        buf[1] = if self.encrypted { ENCRYPTED } else { 0 };
        buf[2..4].fill(0);
        buf[4..12].copy_from_slice(&self.epoch.to_be_bytes());
        buf[12..20].copy_from_slice(&self.counter.to_be_bytes());
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn round_trip() {
        let r = Repr {
            encrypted: true,
            epoch: 0x0102_0304_0506_0708,
            counter: 42,
        };
        let mut b = [0u8; OVERHEAD + 3];
        r.emit(&mut b).unwrap();
        let p = Packet::new_checked(&b[..]).unwrap();
        assert_eq!(Repr::parse(&p), r);
        assert_eq!(p.payload_range(), HEADER_LEN..HEADER_LEN + 3);
        assert!(Packet::new_checked(&b[..OVERHEAD - 1]).is_err());
        b[0] = 2;
        assert_eq!(
            Packet::new_checked(&b[..]).err(),
            Some(Error::BadVersion(2))
        );
        assert!(r.emit(&mut [0u8; 19]).is_err());
    }

    proptest! {
        #[test]
        fn parsing_garbage_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..100)) {
            if let Ok(p) = Packet::new_checked(&bytes[..]) {
                let _ = (Repr::parse(&p), p.payload_range());
            }
        }
    }
}
