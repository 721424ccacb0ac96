//! The reception agent's per-packet work, without I/O: accept only what the
//! proxies of our site send for this VM and find the inner packet to
//! deliver.

use arc_swap::ArcSwap;
use pon_proto::control::PublicKey;
use pon_proto::ip::{InnerPacket, IpipPacket};
use pon_tunnel::lan::{Channel, LanError, LanReceiver, PairKey};
use std::net::{IpAddr, Ipv4Addr};
use std::ops::Range;
use std::sync::Arc;

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

/// A proxy this RA takes packets from: its agent-side address and, for
/// the UDP leg, its static key and the receiver of the key this VM shares
/// with it (none: the UDP leg accepts nothing from it).
pub struct Sender {
    pub addr: Ipv4Addr,
    pub key: Option<PublicKey>,
    link: Option<Arc<LanReceiver>>,
}

/// The proxies of this VM's site: any of them may deliver to it.
#[derive(Default)]
pub struct Senders(Vec<Sender>);

impl Senders {
    fn get(&self, addr: Ipv4Addr) -> Option<&Sender> {
        self.0.iter().find(|s| s.addr == addr)
    }

    pub fn addrs(&self) -> impl Iterator<Item = Ipv4Addr> + '_ {
        self.0.iter().map(|s| s.addr)
    }

    pub fn keys(&self) -> impl Iterator<Item = Option<PublicKey>> + '_ {
        self.0.iter().map(|s| s.key)
    }

    /// The senders `wanted` (address, key), for a VM whose static secret
    /// is `secret`. A proxy already known with the same key keeps its
    /// receiver, and so its replay window: a changed list must not let an
    /// old datagram in again.
    pub fn with(&self, wanted: &[(Ipv4Addr, Option<PublicKey>)], secret: &[u8; 32]) -> Senders {
        Senders(
            wanted
                .iter()
                .map(|&(addr, key)| {
                    let kept = self
                        .0
                        .iter()
                        .find(|s| s.addr == addr && s.key == key)
                        .and_then(|s| s.link.clone());
                    let link = kept.or_else(|| {
                        key.and_then(|k| PairKey::for_agent(secret, &k.0))
                            .map(|p| Arc::new(p.receiver(Channel::Downlink)))
                    });
                    Sender { addr, key, link }
                })
                .collect(),
        )
    }
}

pub struct Decapsulator {
    pub local: Ipv4Addr,
    /// Swapped whole when the proxies of the site change (the CU's view,
    /// in pon-agent); read once per packet, never locked.
    senders: ArcSwap<Senders>,
}

impl Decapsulator {
    pub fn new(local: Ipv4Addr) -> Self {
        Decapsulator {
            local,
            senders: ArcSwap::from_pointee(Senders::default()),
        }
    }

    pub fn senders(&self) -> Arc<Senders> {
        self.senders.load_full()
    }

    /// From now on, deliver what these proxies send.
    pub fn set_senders(&self, s: Senders) {
        self.senders.store(Arc::new(s));
    }

    /// An IP-in-IP packet as the raw socket returns it (outer header included).
    pub fn from_ipip(&self, pkt: &[u8], c: &RaCounters) -> Option<Range<usize>> {
        let Ok(p) = IpipPacket::new_checked(pkt) else {
            c.drop_malformed.inc();
            return None;
        };
        if self.senders.load().get(p.outer().src()).is_none() {
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
        let senders = self.senders.load();
        let IpAddr::V4(src) = src else {
            c.drop_not_from_proxy.inc();
            return None;
        };
        let Some(sender) = senders.get(src) else {
            c.drop_not_from_proxy.inc();
            return None;
        };
        let Some(link) = &sender.link else {
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
        use pon_tunnel::lan::public_key;
        let (vm, proxy) = ([5u8; 32], [7u8; 32]);
        let d = Decapsulator::new(Ipv4Addr::new(198, 18, 1, 11));
        let proxy_addr = Ipv4Addr::new(198, 18, 1, 1);
        let key = Some(PublicKey(public_key(&proxy)));
        d.set_senders(Senders::default().with(&[(proxy_addr, key)], &vm));
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
        let good = ipip(proxy_addr, d.local);
        assert_eq!(d.from_ipip(&good, &c), Some(20..48));
        assert!(d
            .from_ipip(&ipip(Ipv4Addr::new(198, 18, 1, 66), d.local), &c)
            .is_none());
        assert!(d
            .from_ipip(&ipip(proxy_addr, Ipv4Addr::new(198, 18, 1, 12)), &c)
            .is_none());
        assert!(d.from_ipip(&good[..30], &c).is_none());
        let ok = sealed(&good[20..]);
        assert_eq!(
            d.from_udp(IpAddr::V4(proxy_addr), &mut ok.clone(), &c),
            Some(20..48)
        );
        // Replayed, from elsewhere, unsealed, or altered.
        assert!(d
            .from_udp(IpAddr::V4(proxy_addr), &mut ok.clone(), &c)
            .is_none());
        assert!(d
            .from_udp(IpAddr::V4(d.local), &mut sealed(&good[20..]), &c)
            .is_none());
        assert!(d
            .from_udp(IpAddr::V4(proxy_addr), &mut good[20..].to_vec(), &c)
            .is_none());
        let mut altered = sealed(&good[20..]);
        altered[25] ^= 1;
        assert!(d
            .from_udp(IpAddr::V4(proxy_addr), &mut altered, &c)
            .is_none());
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

    #[test]
    fn any_proxy_of_the_site_delivers_and_a_new_list_keeps_replay_windows() {
        use pon_tunnel::lan::public_key;
        let vm = [5u8; 32];
        let (p1, p2) = ([7u8; 32], [8u8; 32]);
        let (a1, a2) = (Ipv4Addr::new(198, 18, 1, 1), Ipv4Addr::new(198, 18, 1, 2));
        let d = Decapsulator::new(Ipv4Addr::new(198, 18, 1, 11));
        let one = [(a1, Some(PublicKey(public_key(&p1))))];
        let both = [one[0], (a2, Some(PublicKey(public_key(&p2))))];
        d.set_senders(d.senders().with(&one, &vm));
        let sealed_by = |proxy: &[u8; 32], counter_from: u64| {
            let tx = PairKey::for_proxy(proxy, &public_key(&vm)).unwrap().sender(
                Channel::Downlink,
                1,
                false,
            );
            for _ in 0..counter_from {
                tx.seal(&mut [0u8; 64], 0);
            }
            let inner = ipip(a1, d.local);
            let mut v = vec![0u8; 28 + pon_proto::lan::OVERHEAD];
            v[20..48].copy_from_slice(&inner[20..]);
            tx.seal(&mut v, 28).unwrap();
            v
        };
        let c = RaCounters::default();
        let from1 = sealed_by(&p1, 0);
        assert!(d.from_udp(IpAddr::V4(a1), &mut from1.clone(), &c).is_some());
        // Proxy 2 is not (yet) one of ours.
        assert!(d
            .from_udp(IpAddr::V4(a2), &mut sealed_by(&p2, 0), &c)
            .is_none());
        // The CU names both: both deliver, and proxy 1's replay window is
        // the same one (its old datagram is still a replay).
        d.set_senders(d.senders().with(&both, &vm));
        assert!(d
            .from_udp(IpAddr::V4(a2), &mut sealed_by(&p2, 0), &c)
            .is_some());
        assert!(d.from_udp(IpAddr::V4(a1), &mut from1.clone(), &c).is_none());
        assert_eq!(c.drop_replayed.get(), 1);
        // Proxy 2 under another key's name: its seal does not open.
        let wrong = [(a2, Some(PublicKey(public_key(&p1))))];
        d.set_senders(d.senders().with(&wrong, &vm));
        assert!(d
            .from_udp(IpAddr::V4(a2), &mut sealed_by(&p2, 1), &c)
            .is_none());
        assert_eq!(c.drop_bad_tag.get(), 1);
    }
}
