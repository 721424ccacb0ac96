//! Proxy → TA steering: which destinations the TAs of a site must stop
//! intercepting because the overlay cannot reach them (their traffic then
//! takes the plain IP path), sent by the proxy's router over UDP on the site
//! LAN whenever that changes and refreshed periodically.
//!
//! Each message carries the whole set (not a change), so a lost or
//! reordered datagram is repaired by the next one; `epoch` (the sender's
//! start) and `seq` (increasing within an epoch) let a TA ignore stale ones.
//! Encoded with postcard, at most [`MAX_STEERING_LEN`] bytes; decoding never
//! panics.

use crate::codec::CodecError;
use serde::{Deserialize, Serialize};
use std::net::Ipv4Addr;

pub const STEERING_VERSION: u16 = 1;
/// Largest message (one datagram on any underlay).
pub const MAX_STEERING_LEN: usize = 1400;
/// Prefixes that fit one message (5 bytes each at most, plus the fixed part).
pub const MAX_BYPASS: usize = 250;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Steering {
    pub version: u16,
    /// Identifies the sender's run (e.g. its start time).
    pub epoch: u64,
    /// Increases with every message of an epoch.
    pub seq: u64,
    /// Destination prefixes (address, length) to leave to the IP path.
    pub bypass: Vec<(Ipv4Addr, u8)>,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SteeringError {
    #[error("steering message of {0} bytes is too long")]
    TooLong(usize),
    #[error("malformed steering message: {0}")]
    Malformed(String),
    #[error("steering version {0} is not supported")]
    Version(u16),
    #[error("prefix length {0} is not valid for IPv4")]
    PrefixLen(u8),
}

impl From<CodecError> for SteeringError {
    fn from(e: CodecError) -> Self {
        match e {
            CodecError::TooLong { len, .. } => SteeringError::TooLong(len),
            CodecError::Malformed(m) => SteeringError::Malformed(m),
        }
    }
}

impl Steering {
    pub fn encode(&self) -> Result<Vec<u8>, SteeringError> {
        if self.bypass.len() > MAX_BYPASS {
            return Err(SteeringError::TooLong(self.bypass.len() * 5));
        }
        crate::codec::encode(self, MAX_STEERING_LEN).map_err(SteeringError::from)
    }

    pub fn decode(bytes: &[u8]) -> Result<Self, SteeringError> {
        let m: Steering = crate::codec::decode(bytes, MAX_STEERING_LEN)?;
        if m.version != STEERING_VERSION {
            return Err(SteeringError::Version(m.version));
        }
        if let Some((_, len)) = m.bypass.iter().find(|(_, l)| *l > 32) {
            return Err(SteeringError::PrefixLen(*len));
        }
        Ok(m)
    }

    /// Whether `self` supersedes `old` (same sender run and newer, or a new run).
    pub fn newer_than(&self, old: &Steering) -> bool {
        self.epoch != old.epoch || self.seq > old.seq
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn round_trip_and_limits() {
        let m = Steering {
            version: STEERING_VERSION,
            epoch: 7,
            seq: 3,
            bypass: vec![(Ipv4Addr::new(198, 18, 2, 11), 32)],
        };
        let b = m.encode().unwrap();
        assert_eq!(Steering::decode(&b).unwrap(), m);
        let full = Steering {
            bypass: vec![(Ipv4Addr::new(255, 255, 255, 255), 32); MAX_BYPASS],
            ..m.clone()
        };
        assert!(full.encode().unwrap().len() <= MAX_STEERING_LEN);
        assert!(Steering {
            bypass: vec![(Ipv4Addr::UNSPECIFIED, 0); MAX_BYPASS + 1],
            ..m.clone()
        }
        .encode()
        .is_err());
        let bad = Steering {
            bypass: vec![(Ipv4Addr::UNSPECIFIED, 33)],
            ..m.clone()
        };
        assert_eq!(
            Steering::decode(&postcard::to_stdvec(&bad).unwrap()),
            Err(SteeringError::PrefixLen(33))
        );
        let v2 = Steering { version: 2, ..m };
        assert_eq!(
            Steering::decode(&postcard::to_stdvec(&v2).unwrap()),
            Err(SteeringError::Version(2))
        );
    }

    #[test]
    fn ordering() {
        let a = Steering {
            version: 1,
            epoch: 1,
            seq: 5,
            bypass: vec![],
        };
        assert!(Steering {
            seq: 6,
            ..a.clone()
        }
        .newer_than(&a));
        assert!(!Steering {
            seq: 5,
            ..a.clone()
        }
        .newer_than(&a));
        assert!(Steering {
            epoch: 2,
            seq: 0,
            ..a.clone()
        }
        .newer_than(&a));
    }

    proptest! {
        #[test]
        fn decoding_garbage_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..2000)) {
            let _ = Steering::decode(&bytes);
        }
    }
}
