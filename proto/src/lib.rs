//! PON wire formats. Pure data: no sockets, no clocks, and no allocation on
//! the data path (`control`, the CU's messages, allocates: it is off it).
//!
//! Every format follows the same shape (after smoltcp's `wire` module): a
//! zero-copy view `Packet<T: AsRef<[u8]>>` whose `new_checked` validates all
//! lengths once so that accessors cannot panic afterwards, field offsets as
//! ranges in a private `field` module, getters and setters, and an owned
//! `Repr` with `parse` and `emit`. A parser that validates a nested packet
//! hands out the nested view, so no caller checks the same bytes twice.

pub mod codec;
pub mod control;
pub mod error;
pub mod flow;
pub mod handshake;
pub mod ip;
pub mod lan;
pub mod local;
pub mod measurement;
pub mod pmon;
pub mod pon;
pub mod ports;
pub mod probe;
pub mod report;
pub mod steering;

pub use error::Error;

/// Result type of every parser in this crate.
pub type Result<T> = core::result::Result<T, Error>;

/// How an app VM's agent legs are encapsulated: the one type the CU's
/// messages, the forwarder's table and the agents share.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
pub enum Encap {
    /// IPv4 protocol 4 to the agent's address.
    Ipip,
    /// UDP to the RA's port, for networks that filter protocol 4.
    Udp { ra_port: u16 },
}

/// The `encap = "ipip" | "udp"` setting of configuration files, where the
/// RA port is a separate field; [`EncapKind::with_port`] makes the [`Encap`].
#[derive(
    Debug,
    Clone,
    Copy,
    PartialEq,
    Eq,
    Default,
    serde::Serialize,
    serde::Deserialize,
    schemars::JsonSchema,
)]
#[serde(rename_all = "lowercase")]
pub enum EncapKind {
    /// IPv4 protocol 4 (IP-in-IP).
    #[default]
    Ipip,
    /// UDP, for networks that filter protocol 4; authenticated, and
    /// batched with GSO/GRO.
    Udp,
}

impl EncapKind {
    pub fn with_port(self, ra_port: u16) -> Encap {
        match self {
            EncapKind::Ipip => Encap::Ipip,
            EncapKind::Udp => Encap::Udp { ra_port },
        }
    }
}

impl Encap {
    pub fn kind(&self) -> EncapKind {
        match self {
            Encap::Ipip => EncapKind::Ipip,
            Encap::Udp { .. } => EncapKind::Udp,
        }
    }
}
