//! Bodies of the handshake kinds of PON packets: a Noise KK handshake
//! between two proxies (see `pon-tunnel`), each message preceded by the
//! session indices that let the receiver find its state without trying
//! every peer.
//!
//! ```text
//! init:     | sender index (4) | Noise message 1 (e, es, ss + timestamp) |
//! response: | sender index (4) | receiver index (4) | Noise message 2 (e, ee, se) |
//! ```

use crate::error::need;
use crate::Result;

/// Noise message 1 of KK with a 25519 key and an 8-byte payload:
/// ephemeral key, then the encrypted timestamp and its tag.
pub const INIT_NOISE_LEN: usize = 32 + 8 + 16;
/// Noise message 2 of KK with a 4-byte payload: ephemeral key, then the
/// responder's index (encrypted, so that an altered clear copy is caught)
/// and its tag.
pub const RESPONSE_NOISE_LEN: usize = 32 + 4 + 16;
pub const INIT_LEN: usize = 4 + INIT_NOISE_LEN;
pub const RESPONSE_LEN: usize = 8 + RESPONSE_NOISE_LEN;

fn index(b: &[u8], at: usize) -> u32 {
    u32::from_be_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

/// A checked view of an initiation body.
#[derive(Debug, Clone, Copy)]
pub struct Init<T: AsRef<[u8]>>(T);

impl<T: AsRef<[u8]>> Init<T> {
    /// Requires exactly [`INIT_LEN`] bytes: anything else is not ours.
    pub fn new_checked(b: T) -> Result<Self> {
        exact(b.as_ref().len(), INIT_LEN)?;
        Ok(Init(b))
    }
    pub fn sender_index(&self) -> u32 {
        index(self.0.as_ref(), 0)
    }
    pub fn noise(&self) -> &[u8] {
        &self.0.as_ref()[4..]
    }
}

/// A checked view of a response body.
#[derive(Debug, Clone, Copy)]
pub struct Response<T: AsRef<[u8]>>(T);

impl<T: AsRef<[u8]>> Response<T> {
    pub fn new_checked(b: T) -> Result<Self> {
        exact(b.as_ref().len(), RESPONSE_LEN)?;
        Ok(Response(b))
    }
    pub fn sender_index(&self) -> u32 {
        index(self.0.as_ref(), 0)
    }
    pub fn receiver_index(&self) -> u32 {
        index(self.0.as_ref(), 4)
    }
    pub fn noise(&self) -> &[u8] {
        &self.0.as_ref()[8..]
    }
}

/// An initiation body: the indices, then room for the Noise message.
pub fn init(sender_index: u32) -> [u8; INIT_LEN] {
    let mut b = [0u8; INIT_LEN];
    b[..4].copy_from_slice(&sender_index.to_be_bytes());
    b
}

/// A response body: the indices, then room for the Noise message.
pub fn response(sender_index: u32, receiver_index: u32) -> [u8; RESPONSE_LEN] {
    let mut b = [0u8; RESPONSE_LEN];
    b[..4].copy_from_slice(&sender_index.to_be_bytes());
    b[4..8].copy_from_slice(&receiver_index.to_be_bytes());
    b
}

fn exact(have: usize, len: usize) -> Result<()> {
    need(have, len)?;
    if have > len {
        return Err(crate::Error::TrailingBytes { extra: have - len });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn views_read_what_builders_wrote_and_refuse_other_lengths() {
        let i = init(7);
        assert_eq!(Init::new_checked(&i[..]).unwrap().sender_index(), 7);
        let r = response(8, 9);
        let v = Response::new_checked(&r[..]).unwrap();
        assert_eq!((v.sender_index(), v.receiver_index()), (8, 9));
        assert_eq!(v.noise().len(), RESPONSE_NOISE_LEN);
        assert!(Init::new_checked(&i[..INIT_LEN - 1]).is_err());
        assert!(Response::new_checked(&[0u8; RESPONSE_LEN + 1][..]).is_err());
    }
}
