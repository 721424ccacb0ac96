//! What the emulator needs from a packet: which sites it goes between, and
//! keeping the TTL as if the emulator were not there.

use crate::config::Sites;
use crate::emulator::SiteId;
use pon_proto::ip::Ipv4Packet;

/// `(from, to)` sites of an IPv4 packet, or `None` for anything else
/// (not IPv4, malformed, or an address outside every site), which the
/// emulator passes on unimpaired: it emulates links, it does not filter.
pub fn classify(sites: &Sites, packet: &[u8]) -> Option<(SiteId, SiteId)> {
    let ip = Ipv4Packet::new_checked(packet).ok()?;
    let from = sites.site_of(ip.src());
    let to = sites.site_of(ip.dst());
    (from != 0 && to != 0).then_some((from, to))
}

/// Adds one to the TTL of an IPv4 packet, fixing the header checksum
/// incrementally (RFC 1624).
///
/// A packet crosses the internet namespace's routing twice (into the TUN,
/// then out of it), so the kernel decrements its TTL twice; undoing one keeps
/// the emulated internet one hop, as traceroute would expect.
pub fn restore_ttl(packet: &mut [u8]) {
    if packet.len() < 20 || packet[0] >> 4 != 4 || packet[8] == u8::MAX {
        return;
    }
    let old = u16::from_be_bytes([packet[8], packet[9]]);
    packet[8] += 1;
    let new = u16::from_be_bytes([packet[8], packet[9]]);
    let check = u16::from_be_bytes([packet[10], packet[11]]);
    // HC' = ~(~HC + ~m + m')
    let mut sum = u32::from(!check) + u32::from(!old) + u32::from(new);
    while sum >> 16 != 0 {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    packet[10..12].copy_from_slice(&(!(sum as u16)).to_be_bytes());
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Site;
    use pon_proto::ip::checksum;

    fn header(ttl: u8, src: [u8; 4], dst: [u8; 4]) -> Vec<u8> {
        let mut h = vec![0x45, 0, 0, 28, 0x12, 0x34, 0x40, 0, ttl, 17, 0, 0];
        h.extend_from_slice(&src);
        h.extend_from_slice(&dst);
        h.extend_from_slice(&[0; 8]);
        let c = checksum(&h[..20]);
        h[10..12].copy_from_slice(&c.to_be_bytes());
        h
    }

    #[test]
    fn ttl_restore_keeps_the_checksum_valid() {
        for ttl in [0u8, 1, 63, 64, 127, 200, 254] {
            let mut p = header(ttl, [198, 18, 1, 1], [198, 18, 2, 1]);
            restore_ttl(&mut p);
            assert_eq!(p[8], ttl + 1);
            assert_eq!(checksum(&p[..20]), 0, "ttl {ttl}");
        }
        let mut p = header(255, [1, 2, 3, 4], [5, 6, 7, 8]);
        restore_ttl(&mut p);
        assert_eq!(p[8], 255, "no wrap-around");
        let mut short = vec![0x45; 10];
        restore_ttl(&mut short);
        assert_eq!(short, vec![0x45; 10]);
    }

    #[test]
    fn classifies_by_site_prefix() {
        let site = |index, net: &str| Site {
            index,
            name: format!("s{index}"),
            prefix: net.parse().unwrap(),
        };
        let sites = Sites::new(vec![site(1, "198.18.1.0/24"), site(2, "198.18.2.0/24")]).unwrap();
        assert_eq!(
            classify(&sites, &header(64, [198, 18, 1, 11], [198, 18, 2, 1])),
            Some((1, 2))
        );
        // The CU's network, or anything unknown, is not a site.
        assert_eq!(
            classify(&sites, &header(64, [198, 18, 1, 11], [198, 18, 250, 1])),
            None
        );
        assert_eq!(classify(&sites, &[0x60; 40]), None, "IPv6");
        assert_eq!(classify(&sites, &[0x45; 3]), None, "truncated");
    }
}
