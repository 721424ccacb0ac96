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
//!  forwarder ── Traffic ──▶ router
//! ```
//!
//! Every message is idempotent or periodic (Topology and Routes carry whole
//! state and are re-sent every second), so a lost datagram costs at most a
//! probe or a second of staleness.

use crate::codec::CodecError;
use crate::measurement::{ProbeOutcome, ProbeTag, TrafficSample};
use crate::pon::Hops;
use serde::{Deserialize, Serialize};

/// Largest message: a probe train packet with its hop list and framing.
pub const MAX_LOCAL_LEN: usize = 2048;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum LocalMsg {
    /// forwarder → monitor: a probe or probe reply (whole PON packet) that
    /// ended at this proxy.
    Arrived(Vec<u8>),
    /// monitor → forwarder: send this PON packet to peer `hop` from the
    /// proxy's PON socket (peers accept only that address).
    Send { hop: u32, packet: Vec<u8> },
    /// forwarder → monitor and router: this proxy's id, the peers (relay
    /// candidates) and the destinations to optimise; `from_cu` says the CU's
    /// role policy chose them (else every configured peer, which the
    /// router's `[[routing.destination]]` list may narrow).
    Topology {
        id: u32,
        peers: Vec<u32>,
        optimise: Vec<u32>,
        from_cu: bool,
    },
    /// router → forwarder: the chosen routes (`(to, relays)`) and the
    /// destinations no overlay path reaches (their traffic is left to the
    /// IP path: the forwarder steers its TAs).
    Routes {
        relays: Vec<(u32, Vec<u32>)>,
        unreachable: Vec<u32>,
    },
    /// router → monitor: probe `path` once; the result comes back tagged.
    Probe { tag: ProbeTag, path: Hops },
    /// router → monitor: measure `path`'s bandwidth with a packet train.
    Bandwidth { tag: ProbeTag, path: Hops },
    /// router → monitor: probe `path` every `every_ms` (0: stop).
    Rate {
        tag: ProbeTag,
        path: Hops,
        every_ms: u32,
    },
    /// monitor → router: the fate of a probe.
    Result {
        tag: ProbeTag,
        path: Hops,
        outcome: ProbeOutcome,
    },
    /// monitor → router: a packet train of `packets` probes finished; the
    /// bottleneck rate the far end saw (`None`: too few arrived).
    BandwidthResult {
        tag: ProbeTag,
        path: Hops,
        packets: u16,
        mbps: Option<f64>,
    },
    /// forwarder → router: the data counters of the peers whose counts
    /// changed since the last message (none: no message), for the passive
    /// watch of the current routes.
    Traffic(Vec<TrafficSample>),
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
        let h = |ids: &[u32]| Hops::new(ids).unwrap();
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
                from_cu: true,
            },
            LocalMsg::Routes {
                relays: vec![(2, vec![3])],
                unreachable: vec![4],
            },
            LocalMsg::Probe {
                tag: ProbeTag::learning(2, 7),
                path: h(&[3, 2]),
            },
            LocalMsg::Bandwidth {
                tag: ProbeTag::bandwidth(2, 1),
                path: h(&[3, 2]),
            },
            LocalMsg::Rate {
                tag: ProbeTag::keepalive(2),
                path: h(&[2]),
                every_ms: 50,
            },
            LocalMsg::Result {
                tag: ProbeTag::keepalive(2),
                path: h(&[2]),
                outcome: ProbeOutcome::Reply {
                    rtt: std::time::Duration::from_micros(61_000),
                },
            },
            LocalMsg::BandwidthResult {
                tag: ProbeTag::bandwidth(2, 0),
                path: h(&[2]),
                packets: 16,
                mbps: Some(93.5),
            },
            LocalMsg::Traffic(vec![TrafficSample {
                peer: 2,
                sent: 1000,
                confirmed: 990,
            }]),
        ] {
            assert_eq!(LocalMsg::decode(&m.encode().unwrap()).unwrap(), m);
        }
        assert!(LocalMsg::Arrived(vec![0; 4000]).encode().is_err());
    }

    #[test]
    fn routes_out_of_bounds_are_refused() {
        // A Probe whose path has no hops, and one with too many: both are
        // malformed, never a `Hops` that breaks its own invariant.
        let tag = ProbeTag::keepalive(2);
        let enc = |path: Vec<u32>| {
            let mut v = postcard::to_stdvec(&(4u8, tag)).unwrap();
            v.extend(postcard::to_stdvec(&path).unwrap());
            v
        };
        assert!(LocalMsg::decode(&enc(vec![])).is_err());
        assert!(LocalMsg::decode(&enc(vec![9; crate::pon::MAX_HOPS + 1])).is_err());
        let ok = LocalMsg::decode(&enc(vec![3, 2])).unwrap();
        assert_eq!(
            ok,
            LocalMsg::Probe {
                tag,
                path: Hops::new(&[3, 2]).unwrap()
            }
        );
    }

    proptest! {
        #[test]
        fn decoding_garbage_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..3000)) {
            let _ = LocalMsg::decode(&bytes);
        }
    }
}
