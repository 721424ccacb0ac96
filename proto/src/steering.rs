//! Proxy → TA steering: which destinations the TAs of a site must stop
//! intercepting because the overlay cannot reach them (their traffic then
//! takes the plain IP path), sent by the proxy's router over UDP on the site
//! LAN whenever that changes and refreshed periodically.
//!
//! Each message carries the whole set (not a change), so a lost or
//! reordered datagram is repaired by the next one; `epoch` (the sender's
//! start) and `seq` (increasing within an epoch) let a TA ignore stale ones.
//! A set larger than one datagram holds is sent as `parts` datagrams of the
//! same `(epoch, seq)`, numbered by `part`: a TA applies the set once it has
//! every part (see [`Steering::split`]). Each datagram is postcard, at most
//! [`MAX_STEERING_LEN`] bytes; decoding never panics.

use crate::codec::CodecError;
use serde::{Deserialize, Serialize};
use std::net::Ipv4Addr;

/// 2: the set may span several datagrams (`part`, `parts`).
pub const STEERING_VERSION: u16 = 2;
/// Largest message (one datagram on any underlay).
pub const MAX_STEERING_LEN: usize = 1400;
/// Prefixes that fit one datagram (5 bytes each at most, plus the fixed part).
pub const MAX_BYPASS: usize = 250;
/// Datagrams one set may span: 16,000 prefixes, far beyond any site's
/// destinations, while a TA's reassembly stays small.
pub const MAX_PARTS: u16 = 64;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Steering {
    pub version: u16,
    /// Identifies the sender's run (e.g. its start time).
    pub epoch: u64,
    /// Increases with every message of an epoch.
    pub seq: u64,
    /// This datagram's index among the message's `parts` (from 0).
    pub part: u16,
    pub parts: u16,
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
    #[error("part {part} of {parts} is not valid (at most {MAX_PARTS} parts)")]
    Part { part: u16, parts: u16 },
    #[error("{0} prefixes do not fit {MAX_PARTS} datagrams")]
    TooManyPrefixes(usize),
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
        if m.parts == 0 || m.parts > MAX_PARTS || m.part >= m.parts {
            return Err(SteeringError::Part {
                part: m.part,
                parts: m.parts,
            });
        }
        if let Some((_, len)) = m.bypass.iter().find(|(_, l)| *l > 32) {
            return Err(SteeringError::PrefixLen(*len));
        }
        Ok(m)
    }

    /// The datagrams carrying `bypass` as message `seq` of `epoch` (one,
    /// even for an empty set).
    pub fn split(
        epoch: u64,
        seq: u64,
        bypass: &[(Ipv4Addr, u8)],
    ) -> Result<Vec<Steering>, SteeringError> {
        let parts = bypass.len().div_ceil(MAX_BYPASS).max(1);
        if parts > usize::from(MAX_PARTS) {
            return Err(SteeringError::TooManyPrefixes(bypass.len()));
        }
        let mut chunks: Vec<&[(Ipv4Addr, u8)]> = bypass.chunks(MAX_BYPASS).collect();
        if chunks.is_empty() {
            chunks.push(&[]);
        }
        Ok(chunks
            .into_iter()
            .enumerate()
            .map(|(i, c)| Steering {
                version: STEERING_VERSION,
                epoch,
                seq,
                part: i as u16,
                parts: parts as u16,
                bypass: c.to_vec(),
            })
            .collect())
    }

    /// Whether `self` supersedes `old`: strictly later in (epoch, seq). The
    /// epoch is the sender's start time, so a restarted proxy's messages
    /// are newer, and a message of an earlier run (replayed) is not.
    pub fn newer_than(&self, old: &Steering) -> bool {
        (self.epoch, self.seq) > (old.epoch, old.seq)
    }

    /// Whether `self` belongs to the same message as `other`.
    pub fn same_message(&self, other: &Steering) -> bool {
        (self.epoch, self.seq, self.parts) == (other.epoch, other.seq, other.parts)
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
            part: 0,
            parts: 1,
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
        let v1 = Steering {
            version: 1,
            ..m.clone()
        };
        assert_eq!(
            Steering::decode(&postcard::to_stdvec(&v1).unwrap()),
            Err(SteeringError::Version(1))
        );
        for (part, parts) in [(0, 0), (1, 1), (0, MAX_PARTS + 1)] {
            let bad = Steering {
                part,
                parts,
                ..m.clone()
            };
            assert_eq!(
                Steering::decode(&postcard::to_stdvec(&bad).unwrap()),
                Err(SteeringError::Part { part, parts })
            );
        }
    }

    #[test]
    fn large_sets_split_into_datagrams_that_each_fit() {
        let set: Vec<(Ipv4Addr, u8)> = (0..1001u32)
            .map(|i| (Ipv4Addr::from(0x0a00_0000 + i), 32))
            .collect();
        let parts = Steering::split(9, 4, &set).unwrap();
        assert_eq!(parts.len(), 5);
        let mut back = Vec::new();
        for (i, p) in parts.iter().enumerate() {
            let d = Steering::decode(&p.encode().unwrap()).unwrap();
            assert_eq!((d.part, d.parts, d.seq), (i as u16, 5, 4));
            assert!(d.same_message(&parts[0]));
            back.extend(d.bypass);
        }
        assert_eq!(back, set);
        assert_eq!(Steering::split(1, 1, &[]).unwrap().len(), 1);
        let too_many = vec![(Ipv4Addr::UNSPECIFIED, 0); MAX_BYPASS * usize::from(MAX_PARTS) + 1];
        assert!(Steering::split(1, 1, &too_many).is_err());
    }

    #[test]
    fn ordering() {
        let a = Steering {
            version: STEERING_VERSION,
            epoch: 1,
            seq: 5,
            part: 0,
            parts: 1,
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
        assert!(
            !a.newer_than(&Steering {
                epoch: 2,
                seq: 0,
                ..a.clone()
            }),
            "an earlier run's message, however late its seq, is older"
        );
    }

    proptest! {
        #[test]
        fn decoding_garbage_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..2000)) {
            let _ = Steering::decode(&bytes);
        }
    }
}
