//! Messages between the three parts of a proxy when they run as separate
//! processes (pon-forwarder, pon-monitor, pon-router, on one host or
//! several): one message per UDP datagram, postcard-encoded, at most
//! [`MAX_LOCAL_LEN`] bytes. Each daemon accepts them only from the
//! addresses its configuration names. Decoding never panics.
//!
//! ```text
//!             Arrived, Topology              Topology
//!  forwarder ───────────────────▶ monitor   forwarder ─────────▶ router
//!            ◀─────────────────── (Send)              ◀───────── (Routes)
//!  router ── Probe, Rate ──▶ monitor ── Result ──▶ router
//! ```
//!
//! Every message is idempotent or periodic (Topology and Routes carry whole
//! state and are re-sent every second), so a lost datagram costs at most a
//! probe or a second of staleness.

use crate::codec::CodecError;
use serde::{Deserialize, Serialize};

/// Largest message: a probe train packet with its hop list and framing.
pub const MAX_LOCAL_LEN: usize = 2048;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum LocalMsg {
    /// forwarder → monitor: a probe or probe reply (whole PON packet) that
    /// ended at this proxy.
    Arrived(Vec<u8>),
    /// monitor → forwarder: send this PON packet to peer `hop` from the
    /// proxy's PON socket (peers accept only that address).
    Send { hop: u32, packet: Vec<u8> },
    /// forwarder → monitor and router: this proxy's id, the peers (relay
    /// candidates) and the destinations to optimise.
    Topology {
        id: u32,
        peers: Vec<u32>,
        optimise: Vec<u32>,
    },
    /// router → forwarder: the chosen routes (`(to, relays)`) and the
    /// destinations no overlay path reaches (their traffic is left to the
    /// IP path: the forwarder steers its TAs).
    Routes {
        relays: Vec<(u32, Vec<u32>)>,
        unreachable: Vec<u32>,
    },
    /// router → monitor: probe `path` once; the result comes back tagged.
    Probe { tag: u64, path: Vec<u32> },
    /// router → monitor: probe `path` every `every_ms` (0: stop).
    Rate {
        tag: u64,
        path: Vec<u32>,
        every_ms: u32,
    },
    /// monitor → router: the fate of a probe (`None`: lost).
    Result {
        tag: u64,
        path: Vec<u32>,
        rtt_us: Option<u64>,
    },
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LocalError {
    #[error("local message of {0} bytes is too long")]
    TooLong(usize),
    #[error("malformed local message: {0}")]
    Malformed(String),
}

impl From<CodecError> for LocalError {
    fn from(e: CodecError) -> Self {
        match e {
            CodecError::TooLong { len, .. } => LocalError::TooLong(len),
            CodecError::Malformed(m) => LocalError::Malformed(m),
        }
    }
}

impl LocalMsg {
    pub fn encode(&self) -> Result<Vec<u8>, LocalError> {
        crate::codec::encode(self, MAX_LOCAL_LEN).map_err(LocalError::from)
    }

    pub fn decode(bytes: &[u8]) -> Result<Self, LocalError> {
        crate::codec::decode(bytes, MAX_LOCAL_LEN).map_err(LocalError::from)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn round_trips() {
        for m in [
            LocalMsg::Arrived(vec![1; 1500]),
            LocalMsg::Send {
                hop: 3,
                packet: vec![2; 1464],
            },
            LocalMsg::Topology {
                id: 1,
                peers: vec![2, 3],
                optimise: vec![2],
            },
            LocalMsg::Routes {
                relays: vec![(2, vec![3])],
                unreachable: vec![4],
            },
            LocalMsg::Probe {
                tag: u64::MAX,
                path: vec![3, 2],
            },
            LocalMsg::Rate {
                tag: 1,
                path: vec![2],
                every_ms: 50,
            },
            LocalMsg::Result {
                tag: 1,
                path: vec![2],
                rtt_us: Some(61_000),
            },
        ] {
            assert_eq!(LocalMsg::decode(&m.encode().unwrap()).unwrap(), m);
        }
        assert!(LocalMsg::Arrived(vec![0; 4000]).encode().is_err());
    }

    proptest! {
        #[test]
        fn decoding_garbage_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..3000)) {
            let _ = LocalMsg::decode(&bytes);
        }
    }
}
