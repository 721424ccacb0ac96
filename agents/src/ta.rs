//! The transmission agent's per-packet work, without I/O: check a packet
//! read from the TUN and wrap it for the local forwarder.

use crate::HEADROOM;
use arc_swap::ArcSwap;
use pon_proto::control::PublicKey;
use pon_proto::ip::{InnerPacket, Ipv4Repr, IPV4_HEADER_LEN};
use pon_proto::EncapKind;
use pon_tunnel::lan::LanSender;
use std::net::{IpAddr, Ipv4Addr};
use std::ops::Range;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

pon_telemetry::counters! {
    pub struct TaCounters {
        captured => ("pon_ta_packets_total", "stage=\"captured\"", "Packets read from the TUN for the forwarder."),
        sent => ("pon_ta_packets_total", "stage=\"sent\"", "Packets the kernel took to send to the forwarder; those it refused are in pon_ta_socket_errors_total{op=\"send\"}."),
        drop_malformed => ("pon_ta_drops_total", "reason=\"malformed\"", "Packets dropped, by reason."),
        drop_foreign_source => ("pon_ta_drops_total", "reason=\"foreign_source\"", "Packets dropped, by reason."),
        drop_no_key => ("pon_ta_drops_total", "reason=\"no_key\"", "Packets dropped, by reason."),
        drop_no_room => ("pon_ta_drops_total", "reason=\"no_room\"", "Packets dropped, by reason."),
        rx_errors => ("pon_ta_socket_errors_total", "op=\"recv\"", "TUN or socket errors."),
        tx_errors => ("pon_ta_socket_errors_total", "op=\"send\"", "TUN or socket errors."),
    }
}

/// One forwarder of the VM's site: its proxy's id (0 for a configured
/// forwarder), agent-leg address and UDP port, and static key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Forwarder {
    pub id: u32,
    pub addr: (Ipv4Addr, u16),
    pub key: Option<PublicKey>,
}

/// The forwarders of this VM's site as last named.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct ForwarderSet {
    /// Moves whenever the members change.
    pub version: u64,
    /// At most [`MAX_FORWARDERS`], lowest id first.
    pub members: Vec<Forwarder>,
}

/// Forwarders of a site a TA spreads its flows over (the live mask is one
/// machine word).
pub const MAX_FORWARDERS: usize = 64;

/// The forwarders the TA sends to, shared between the CU client, which
/// names them, the steering thread, which marks which are alive (a proxy
/// whose steering lease ran out is dead), and the data path, which reads
/// both once per batch and spreads flows over the live ones by hash
/// (`pon_proto::flow`: a flow stays on its forwarder while that lives, and
/// a dead one's flows move to the survivors). No lock on the data path:
/// the members are swapped whole, the live mask is one atomic word.
#[derive(Debug, Default)]
pub struct SiteForwarders {
    set: ArcSwap<ForwarderSet>,
    /// Bit i: member i is alive. Starts all ones: a forwarder is alive
    /// until its proxy's silence says otherwise.
    live: AtomicU64,
}

impl SiteForwarders {
    /// A fixed forwarder from the configuration.
    pub fn new(f: (Ipv4Addr, u16), key: Option<PublicKey>) -> Self {
        let s = SiteForwarders::default();
        s.name(vec![Forwarder {
            id: 0,
            addr: f,
            key,
        }]);
        s
    }

    /// The members, for a batch or a steering message.
    pub fn load(&self) -> arc_swap::Guard<Arc<ForwarderSet>> {
        self.set.load()
    }

    pub fn is_named(&self) -> bool {
        !self.set.load().members.is_empty()
    }

    /// Names the site's forwarders (an empty list keeps the last ones: with
    /// none named there is nothing better to send to). Returns the members
    /// named before when the list changed.
    pub fn name(&self, mut members: Vec<Forwarder>) -> Option<Vec<Forwarder>> {
        members.sort_by_key(|f| f.id);
        members.dedup_by_key(|f| f.id);
        members.truncate(MAX_FORWARDERS);
        let old = self.set.load();
        if members.is_empty() || old.members == members {
            return None;
        }
        let before = old.members.clone();
        self.set.store(Arc::new(ForwarderSet {
            version: old.version + 1,
            members,
        }));
        self.live.store(u64::MAX, Ordering::Release);
        Some(before)
    }

    /// Marks which members (by position) are alive.
    pub fn set_live(&self, mask: u64) {
        self.live.store(mask, Ordering::Release);
    }

    pub fn live_mask(&self) -> u64 {
        self.live.load(Ordering::Acquire)
    }
}

/// Which member of `set` carries a packet of `flow`, given the live mask:
/// the live member with the highest weight for it, or when none is alive
/// any member (the IP path then takes over through steering; sending on
/// costs nothing meanwhile).
#[inline]
pub fn choose(set: &ForwarderSet, live: u64, flow: u32) -> Option<usize> {
    let n = set.members.len().min(MAX_FORWARDERS);
    let all = if n == 64 { u64::MAX } else { (1u64 << n) - 1 };
    let mask = if live & all == 0 { all } else { live & all };
    (0..n)
        .filter(|i| mask & (1 << i) != 0)
        .max_by_key(|&i| (pon_proto::flow::weight(flow, set.members[i].id), i))
}

pub struct Encapsulator {
    pub local: Ipv4Addr,
    /// How the TA reaches the forwarder (the port is the forwarder's).
    pub encap: EncapKind,
}

impl Encapsulator {
    /// The flow of the packet at `buf[HEADROOM..HEADROOM + len]` (0 for
    /// one `encapsulate` will drop).
    pub fn flow(&self, buf: &[u8], len: usize) -> u32 {
        buf.get(HEADROOM..HEADROOM + len)
            .and_then(|b| InnerPacket::new_checked(b).ok())
            .map_or(0, |p| pon_proto::flow::flow_hash(&p))
    }

    /// `buf[HEADROOM..HEADROOM + len]` holds a packet read from the TUN.
    /// Returns the bytes to send: the whole IP-in-IP packet (to
    /// `forwarder`), or for the UDP encapsulation the inner packet sealed
    /// with `lan` (the key this VM shares with the forwarder's proxy:
    /// header in front, tag after). `None` means drop (counted).
    pub fn encapsulate(
        &self,
        buf: &mut [u8],
        len: usize,
        forwarder: Ipv4Addr,
        lan: Option<&LanSender>,
        c: &TaCounters,
    ) -> Option<Range<usize>> {
        let end = HEADROOM + len;
        let inner = match buf.get(HEADROOM..end).map(InnerPacket::new_checked) {
            Some(Ok(p)) => p,
            _ => {
                c.drop_malformed.inc();
                return None;
            }
        };
        // The forwarder accepts only our own address; anything else (a
        // packet routed here by another interface's source) would be lost there.
        if inner.src() != IpAddr::V4(self.local) {
            c.drop_foreign_source.inc();
            return None;
        }
        c.captured.inc();
        match self.encap {
            EncapKind::Udp => {
                let Some(lan) = lan else {
                    c.drop_no_key.inc();
                    return None;
                };
                let start = HEADROOM - pon_proto::lan::HEADER_LEN;
                let total = buf
                    .get_mut(start..end + pon_proto::lan::TAG_LEN)
                    .and_then(|b| lan.seal(b, len));
                let Some(total) = total else {
                    c.drop_no_room.inc();
                    return None;
                };
                Some(start..start + total)
            }
            EncapKind::Ipip => {
                Ipv4Repr::ipip(self.local, forwarder, len)
                    .emit(&mut buf[HEADROOM - IPV4_HEADER_LEN..HEADROOM])
                    .ok()?;
                Some(HEADROOM - IPV4_HEADER_LEN..end)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use pon_proto::ip::{IpProtocol, IpipPacket};

    fn packet_from(src: Ipv4Addr) -> Vec<u8> {
        let mut buf = vec![0u8; crate::BUFFER_LEN];
        Ipv4Repr {
            src,
            dst: Ipv4Addr::new(198, 18, 2, 11),
            protocol: IpProtocol::Icmp,
            ttl: 64,
            dont_fragment: true,
            payload_len: 8,
        }
        .emit(&mut buf[HEADROOM..])
        .unwrap();
        buf
    }

    #[test]
    fn wraps_own_packets_and_refuses_others() {
        let e = Encapsulator {
            local: Ipv4Addr::new(198, 18, 1, 11),
            encap: EncapKind::Ipip,
        };
        let fwd = Ipv4Addr::new(198, 18, 1, 1);
        let c = TaCounters::default();
        let mut buf = packet_from(e.local);
        let r = e.encapsulate(&mut buf, 28, fwd, None, &c).unwrap();
        let p = IpipPacket::new_checked(&buf[r]).unwrap();
        assert_eq!(p.outer().dst(), fwd);
        assert_eq!(p.inner().len(), 28);
        let mut buf = packet_from(Ipv4Addr::new(10, 0, 0, 1));
        assert!(e.encapsulate(&mut buf, 28, fwd, None, &c).is_none());
        assert!(e.encapsulate(&mut buf, 3, fwd, None, &c).is_none());
        assert_eq!(
            (
                c.captured.get(),
                c.drop_foreign_source.get(),
                c.drop_malformed.get()
            ),
            (1, 1, 1)
        );
    }

    #[test]
    fn udp_packets_are_sealed_for_the_forwarder_only() {
        use pon_tunnel::lan::{public_key, Channel, LanError, PairKey};
        let e = Encapsulator {
            local: Ipv4Addr::new(198, 18, 1, 11),
            encap: EncapKind::Udp,
        };
        let (ta, proxy) = ([5u8; 32], [7u8; 32]);
        let c = TaCounters::default();
        let mut buf = packet_from(e.local);
        let fwd = Ipv4Addr::new(198, 18, 1, 1);
        assert!(e.encapsulate(&mut buf, 28, fwd, None, &c).is_none());
        assert_eq!(c.drop_no_key.get(), 1);
        for encrypt in [false, true] {
            let tx = PairKey::for_agent(&ta, &public_key(&proxy))
                .unwrap()
                .sender(Channel::Uplink, 1, encrypt);
            let mut buf = packet_from(e.local);
            let r = e.encapsulate(&mut buf, 28, fwd, Some(&tx), &c).unwrap();
            assert_eq!(r.len(), 28 + pon_proto::lan::OVERHEAD);
            let rx = PairKey::for_proxy(&proxy, &public_key(&ta))
                .unwrap()
                .receiver(Channel::Uplink);
            let mut d = buf[r].to_vec();
            let inner = rx.open(&mut d.clone()).unwrap();
            assert_eq!(inner.len(), 28);
            let mut opened = d.clone();
            rx.open(&mut opened).unwrap_err();
            d[30] ^= 1;
            let fresh = PairKey::for_proxy(&proxy, &public_key(&ta))
                .unwrap()
                .receiver(Channel::Uplink);
            assert_eq!(fresh.open(&mut d), Err(LanError::BadTag));
        }
    }

    fn fwd(id: u32, last: u8) -> Forwarder {
        Forwarder {
            id,
            addr: (Ipv4Addr::new(198, 18, 1, last), 7301),
            key: Some(PublicKey([id as u8; 32])),
        }
    }

    #[test]
    fn naming_forwarders_moves_the_version_only_on_change() {
        let f = SiteForwarders::default();
        assert!(!f.is_named());
        assert_eq!(f.name(vec![fwd(2, 2), fwd(1, 1)]), Some(vec![]));
        let v = f.load().version;
        assert_eq!(
            f.load().members,
            vec![fwd(1, 1), fwd(2, 2)],
            "lowest id first"
        );
        assert_eq!(f.name(vec![fwd(1, 1), fwd(2, 2)]), None);
        assert_eq!(f.load().version, v, "nothing changed");
        // None named: the last ones stay.
        assert_eq!(f.name(vec![]), None);
        f.set_live(0b01);
        assert_eq!(f.name(vec![fwd(1, 1)]), Some(vec![fwd(1, 1), fwd(2, 2)]));
        assert!(f.load().version > v);
        assert_eq!(f.live_mask(), u64::MAX, "new members start alive");
    }

    #[test]
    fn flows_spread_over_live_forwarders_and_leave_dead_ones_only() {
        let set = ForwarderSet {
            version: 1,
            members: vec![fwd(1, 1), fwd(2, 2)],
        };
        let both: Vec<usize> = (0..200)
            .map(|f| choose(&set, u64::MAX, f).unwrap())
            .collect();
        let on_first = both.iter().filter(|i| **i == 0).count();
        assert!((60..=140).contains(&on_first), "{on_first} of 200");
        // Member 1 dies: its flows move to member 0, member 0's stay.
        for (flow, was) in both.iter().enumerate() {
            assert_eq!(choose(&set, 0b01, flow as u32), Some(0));
            if *was == 1 {
                assert_eq!(choose(&set, 0b10, flow as u32), Some(1));
            }
        }
        // None alive: offered to every member rather than dropped.
        let none: Vec<usize> = (0..200).map(|f| choose(&set, 0, f).unwrap()).collect();
        assert_eq!(none, both);
        let empty = ForwarderSet::default();
        assert_eq!(choose(&empty, u64::MAX, 7), None);
    }
}
