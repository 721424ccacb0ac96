//! The reception agent's per-packet work, without I/O: accept only what our
//! proxy sends for this VM and find the inner packet to deliver.

use pon_proto::ip::{InnerPacket, IpipPacket};
use std::net::{IpAddr, Ipv4Addr};
use std::ops::Range;

pon_telemetry::counters! {
    pub struct RaCounters {
        delivered => ("pon_ra_packets_total", "stage=\"delivered\"", "Packets delivered to the local stack."),
        drop_malformed => ("pon_ra_drops_total", "reason=\"malformed\"", "Packets dropped, by reason."),
        drop_not_from_proxy => ("pon_ra_drops_total", "reason=\"not_from_proxy\"", "Packets dropped, by reason."),
        drop_not_for_us => ("pon_ra_drops_total", "reason=\"not_for_us\"", "Packets dropped, by reason."),
        rx_errors => ("pon_ra_socket_errors_total", "op=\"recv\"", "TUN or socket errors."),
        tx_errors => ("pon_ra_socket_errors_total", "op=\"send\"", "TUN or socket errors."),
    }
}

pub struct Decapsulator {
    pub proxy: Ipv4Addr,
    pub local: Ipv4Addr,
}

impl Decapsulator {
    /// An IP-in-IP packet as the raw socket returns it (outer header included).
    pub fn from_ipip(&self, pkt: &[u8], c: &RaCounters) -> Option<Range<usize>> {
        let Ok(p) = IpipPacket::new_checked(pkt) else {
            c.drop_malformed.inc();
            return None;
        };
        if p.outer().src() != self.proxy {
            c.drop_not_from_proxy.inc();
            return None;
        }
        let start = p.outer().header_len();
        // The inner packet was checked with the outer one.
        let inner = p.inner();
        self.deliverable(&inner, c)
            .then(|| start..start + inner.len())
    }

    /// The payload of a UDP datagram from `src`.
    pub fn from_udp(&self, src: IpAddr, payload: &[u8], c: &RaCounters) -> bool {
        if src != IpAddr::V4(self.proxy) {
            c.drop_not_from_proxy.inc();
            return false;
        }
        let Ok(inner) = InnerPacket::new_checked(payload) else {
            c.drop_malformed.inc();
            return false;
        };
        self.deliverable(&inner, c)
    }

    fn deliverable(&self, p: &InnerPacket<&[u8]>, c: &RaCounters) -> bool {
        // Only this VM's traffic: the RA must not become a way into other hosts.
        if p.dst() != IpAddr::V4(self.local) {
            c.drop_not_for_us.inc();
            return false;
        }
        c.delivered.inc();
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use pon_proto::ip::{IpProtocol, Ipv4Repr};

    fn ipip(outer_src: Ipv4Addr, inner_dst: Ipv4Addr) -> Vec<u8> {
        let mut v = vec![0u8; 48];
        Ipv4Repr::ipip(outer_src, inner_dst, 28)
            .emit(&mut v)
            .unwrap();
        Ipv4Repr {
            src: Ipv4Addr::new(198, 18, 2, 11),
            dst: inner_dst,
            protocol: IpProtocol::Udp,
            ttl: 64,
            dont_fragment: false,
            payload_len: 8,
        }
        .emit(&mut v[20..])
        .unwrap();
        v
    }

    #[test]
    fn accepts_only_our_proxy_and_our_address() {
        let d = Decapsulator {
            proxy: Ipv4Addr::new(198, 18, 1, 1),
            local: Ipv4Addr::new(198, 18, 1, 11),
        };
        let c = RaCounters::default();
        let good = ipip(d.proxy, d.local);
        assert_eq!(d.from_ipip(&good, &c), Some(20..48));
        assert!(d
            .from_ipip(&ipip(Ipv4Addr::new(198, 18, 1, 66), d.local), &c)
            .is_none());
        assert!(d
            .from_ipip(&ipip(d.proxy, Ipv4Addr::new(198, 18, 1, 12)), &c)
            .is_none());
        assert!(d.from_ipip(&good[..30], &c).is_none());
        assert!(d.from_udp(IpAddr::V4(d.proxy), &good[20..], &c));
        assert!(!d.from_udp(IpAddr::V4(d.local), &good[20..], &c));
        assert_eq!(c.delivered.get(), 2);
        assert_eq!(c.drop_not_from_proxy.get(), 2);
        assert_eq!(c.drop_not_for_us.get(), 1);
        assert_eq!(c.drop_malformed.get(), 1);
    }
}
