//! The reception agent's per-packet work, without I/O: accept only what our
//! proxy sends for this VM and find the inner packet to deliver.

use pon_proto::ip::{InnerPacket, IpipPacket};
use pon_tunnel::lan::{LanError, LanReceiver};
use std::net::{IpAddr, Ipv4Addr};
use std::ops::Range;

pon_telemetry::counters! {
    pub struct RaCounters {
        delivered => ("pon_ra_packets_total", "stage=\"delivered\"", "Packets delivered to the local stack."),
        drop_malformed => ("pon_ra_drops_total", "reason=\"malformed\"", "Packets dropped, by reason."),
        drop_not_from_proxy => ("pon_ra_drops_total", "reason=\"not_from_proxy\"", "Packets dropped, by reason."),
        drop_not_for_us => ("pon_ra_drops_total", "reason=\"not_for_us\"", "Packets dropped, by reason."),
        drop_no_key => ("pon_ra_drops_total", "reason=\"no_key\"", "Packets dropped, by reason."),
        drop_bad_tag => ("pon_ra_drops_total", "reason=\"bad_tag\"", "Packets dropped, by reason."),
        drop_replayed => ("pon_ra_drops_total", "reason=\"replayed\"", "Packets dropped, by reason."),
        drop_stale_epoch => ("pon_ra_drops_total", "reason=\"stale_epoch\"", "Packets dropped, by reason."),
        rx_errors => ("pon_ra_socket_errors_total", "op=\"recv\"", "TUN or socket errors."),
        tx_errors => ("pon_ra_socket_errors_total", "op=\"send\"", "TUN or socket errors."),
    }
}

pub struct Decapsulator {
    pub proxy: Ipv4Addr,
    pub local: Ipv4Addr,
    /// Checks the proxy's seals on the UDP leg (the key this VM shares
    /// with it); without it the UDP leg accepts nothing.
    pub link: Option<LanReceiver>,
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

    /// A UDP datagram from `src`, sealed by the proxy: authenticated (and
    /// decrypted) in place; returns the inner packet's range.
    pub fn from_udp(
        &self,
        src: IpAddr,
        datagram: &mut [u8],
        c: &RaCounters,
    ) -> Option<Range<usize>> {
        if src != IpAddr::V4(self.proxy) {
            c.drop_not_from_proxy.inc();
            return None;
        }
        let Some(link) = &self.link else {
            c.drop_no_key.inc();
            return None;
        };
        let payload = match link.open(datagram) {
            Ok(r) => r,
            Err(e) => {
                match e {
                    LanError::Malformed(_) => c.drop_malformed.inc(),
                    LanError::BadTag => c.drop_bad_tag.inc(),
                    LanError::Replayed => c.drop_replayed.inc(),
                    LanError::StaleEpoch => c.drop_stale_epoch.inc(),
                }
                return None;
            }
        };
        let Ok(inner) = InnerPacket::new_checked(&datagram[payload.clone()]) else {
            c.drop_malformed.inc();
            return None;
        };
        self.deliverable(&inner, c).then_some(payload)
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
        use pon_tunnel::lan::{public_key, Channel, PairKey};
        let (vm, proxy) = ([5u8; 32], [7u8; 32]);
        let d = Decapsulator {
            proxy: Ipv4Addr::new(198, 18, 1, 1),
            local: Ipv4Addr::new(198, 18, 1, 11),
            link: PairKey::for_agent(&vm, &public_key(&proxy))
                .map(|p| p.receiver(Channel::Downlink)),
        };
        let tx = PairKey::for_proxy(&proxy, &public_key(&vm))
            .unwrap()
            .sender(Channel::Downlink, 1, true);
        let sealed = |inner: &[u8]| {
            let mut v = vec![0u8; inner.len() + pon_proto::lan::OVERHEAD];
            v[20..20 + inner.len()].copy_from_slice(inner);
            tx.seal(&mut v, inner.len()).unwrap();
            v
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
        let ok = sealed(&good[20..]);
        assert_eq!(
            d.from_udp(IpAddr::V4(d.proxy), &mut ok.clone(), &c),
            Some(20..48)
        );
        // Replayed, from elsewhere, unsealed, or altered.
        assert!(d
            .from_udp(IpAddr::V4(d.proxy), &mut ok.clone(), &c)
            .is_none());
        assert!(d
            .from_udp(IpAddr::V4(d.local), &mut sealed(&good[20..]), &c)
            .is_none());
        assert!(d
            .from_udp(IpAddr::V4(d.proxy), &mut good[20..].to_vec(), &c)
            .is_none());
        let mut altered = sealed(&good[20..]);
        altered[25] ^= 1;
        assert!(d.from_udp(IpAddr::V4(d.proxy), &mut altered, &c).is_none());
        assert_eq!(c.delivered.get(), 2);
        assert_eq!(c.drop_not_from_proxy.get(), 2);
        assert_eq!(c.drop_not_for_us.get(), 1);
        assert_eq!(c.drop_replayed.get(), 1);
        assert_eq!(c.drop_bad_tag.get(), 1);
        assert_eq!(
            c.drop_malformed.get(),
            2,
            "the unsealed one is too short to be sealed"
        );
    }
}
