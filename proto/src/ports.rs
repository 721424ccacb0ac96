//! Well-known UDP ports of the PON protocols. The daemons' configuration
//! types take their defaults from here, and the lab asks for them
//! (`pon-lab-config ports`) rather than keeping its own copy.

/// Proxy legs: PON packets between forwarders.
pub const PON: u16 = 7300;
/// Agent legs with the UDP encapsulation: TA → forwarder.
pub const AGENT_UDP: u16 = 7301;
/// Agent legs with the UDP encapsulation: forwarder → RA.
pub const RA_UDP: u16 = 7302;
/// Proxy → TA steering messages (see [`crate::steering`]).
pub const STEERING: u16 = 7303;
/// The Central Unit: QUIC from agents (see [`crate::control`]).
pub const CU: u16 = 7400;
/// A proxy's own PMon listener (its `[pmon] listen`, where deployments
/// turn it on): the CU's subscription protocol over QUIC.
pub const PMON: u16 = 7401;
/// The split daemons' local link ([`crate::local`]) when they share a host:
/// pon-forwarder's `[local] listen`, pon-monitor's and pon-router's `listen`.
pub const LOCAL_FORWARDER: u16 = 7310;
pub const LOCAL_MONITOR: u16 = 7311;
pub const LOCAL_ROUTER: u16 = 7312;

/// The same, as functions for `#[serde(default = "...")]` in the daemons'
/// configuration types (serde takes a path to a function, not a constant).
pub mod defaults {
    pub fn agent_udp() -> u16 {
        super::AGENT_UDP
    }
    pub fn ra_udp() -> u16 {
        super::RA_UDP
    }
    pub fn steering() -> u16 {
        super::STEERING
    }
    /// Ethernet's MTU: what an underlay is assumed to carry unless told.
    pub fn underlay_mtu() -> u16 {
        1500
    }
}
