//! PON agents on app VMs. The transmission agent (TA) captures the packets
//! the VM sends to overlay destinations through a TUN device and hands them
//! to the local forwarder; the reception agent (RA) receives packets from
//! the forwarder and delivers them to the VM's stack through its own TUN.
//!
//! Both speak IPv4 IP-in-IP (protocol 4) to the proxy, or UDP where protocol
//! 4 is filtered. They run as one process, `pon-agent` (one service per VM),
//! or as two, `pon-ta` and `pon-ra`; [`daemon`] is what all three run.

pub mod config;
pub mod cu;
pub mod daemon;
pub mod interception;
pub mod io;
pub mod ra;
pub mod steering;
pub mod ta;
pub mod tun;

/// Free bytes before a packet read from the TUN, for the outer header
/// (IP-in-IP) or the site-LAN header (UDP).
pub const HEADROOM: usize = if pon_proto::ip::IPV4_HEADER_LEN > pon_proto::lan::HEADER_LEN {
    pon_proto::ip::IPV4_HEADER_LEN
} else {
    pon_proto::lan::HEADER_LEN
};
/// Free bytes after a packet, for the site-LAN tag.
pub const TAILROOM: usize = pon_proto::lan::TAG_LEN;
/// One packet buffer: headroom plus the largest IPv4 packet plus tailroom.
pub const BUFFER_LEN: usize = HEADROOM + 65535 + TAILROOM;
