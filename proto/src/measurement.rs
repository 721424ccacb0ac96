//! What a router asks a monitor to measure and what comes back, shared by
//! both whichever process each runs in: the tag a probe carries through the
//! monitor (a typed value, never a packed integer), and a probe's outcome.

use serde::{Deserialize, Serialize};
use std::time::Duration;

/// Packets in an available-bandwidth train, by default: the monitor's
/// `train_len` default, here so that pon-sim counts what a monitor sends
/// without depending on it.
pub const DEFAULT_TRAIN_LEN: u16 = 16;

/// Why a probe was sent, so that its result finds its way back to the
/// router's bookkeeping. The monitor stores it and hands it back untouched.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct ProbeTag {
    /// The destination proxy the probed path leads to.
    pub dst: u32,
    pub purpose: Purpose,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Purpose {
    /// Spent from the learning budget on the destination's `index`-th
    /// candidate path.
    Learning { index: u32 },
    /// Watching the destination's current route, outside the budget.
    Keepalive,
    /// A packet train measuring the `index`-th candidate's bandwidth.
    Bandwidth { index: u32 },
}

impl ProbeTag {
    pub fn learning(dst: u32, index: u32) -> Self {
        ProbeTag {
            dst,
            purpose: Purpose::Learning { index },
        }
    }
    pub fn keepalive(dst: u32) -> Self {
        ProbeTag {
            dst,
            purpose: Purpose::Keepalive,
        }
    }
    pub fn bandwidth(dst: u32, index: u32) -> Self {
        ProbeTag {
            dst,
            purpose: Purpose::Bandwidth { index },
        }
    }
}

/// The fate of one probe.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum ProbeOutcome {
    /// Answered after `rtt`.
    Reply { rtt: Duration },
    /// Not answered within its timeout.
    Lost,
}

/// The data counters of one peer proxy, as the forwarder hands them to the
/// router: data packets sealed for it as their egress, and the peer's
/// latest report of what it received from us. Both count from their own
/// process's start: only their changes mean something (traffic went out;
/// the peer confirmed traffic), never their difference.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct TrafficSample {
    pub peer: u32,
    pub sent: u64,
    pub confirmed: u64,
}
