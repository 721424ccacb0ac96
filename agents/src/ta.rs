//! The transmission agent's per-packet work, without I/O: check a packet
//! read from the TUN and wrap it for the local forwarder.

use crate::HEADROOM;
use pon_proto::control::PublicKey;
use pon_proto::ip::{InnerPacket, Ipv4Repr, IPV4_HEADER_LEN};
use pon_proto::EncapKind;
use pon_tunnel::lan::LanSender;
use std::net::{IpAddr, Ipv4Addr};
use std::ops::Range;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

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

/// The forwarder the TA sends to (agent-leg address, UDP port) and its
/// proxy's static key, shared between the CU client, which follows the
/// forwarder the CU names, and the data path and steering thread, which
/// read it once per batch or message. The address is one atomic word and
/// `version` another, so following costs the data path no lock: it reads
/// the key (behind a lock) only when `version` moved.
#[derive(Debug, Default)]
pub struct CurrentForwarder {
    addr: AtomicU64,
    key: Mutex<Option<PublicKey>>,
    version: AtomicU64,
}

/// Marks a named forwarder (0 means none yet).
const NAMED: u64 = 1 << 48;

fn pack((ip, port): (Ipv4Addr, u16)) -> u64 {
    NAMED | u64::from(u32::from(ip)) << 16 | u64::from(port)
}

fn unpack(v: u64) -> Option<(Ipv4Addr, u16)> {
    (v & NAMED != 0).then(|| (Ipv4Addr::from((v >> 16) as u32), v as u16))
}

impl CurrentForwarder {
    pub fn new(f: (Ipv4Addr, u16), key: Option<PublicKey>) -> Self {
        CurrentForwarder {
            addr: AtomicU64::new(pack(f)),
            key: Mutex::new(key),
            version: AtomicU64::new(1),
        }
    }

    pub fn get(&self) -> Option<(Ipv4Addr, u16)> {
        unpack(self.addr.load(Ordering::Acquire))
    }

    /// The static key of the forwarder's proxy, if known.
    pub fn key(&self) -> Option<PublicKey> {
        *self.key.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Moves whenever the forwarder or its key changes.
    pub fn version(&self) -> u64 {
        self.version.load(Ordering::Acquire)
    }

    /// Names `f` with its proxy's key; returns the forwarder named before.
    pub fn swap(&self, f: (Ipv4Addr, u16), key: Option<PublicKey>) -> Option<(Ipv4Addr, u16)> {
        let changed = {
            let mut k = self.key.lock().unwrap_or_else(|p| p.into_inner());
            std::mem::replace(&mut *k, key) != key
        };
        let old = unpack(self.addr.swap(pack(f), Ordering::AcqRel));
        if changed || old != Some(f) {
            self.version.fetch_add(1, Ordering::AcqRel);
        }
        old
    }
}

pub struct Encapsulator {
    pub local: Ipv4Addr,
    /// How the TA reaches the forwarder (the port is the forwarder's).
    pub encap: EncapKind,
}

impl Encapsulator {
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

    #[test]
    fn current_forwarder_round_trips() {
        let f = CurrentForwarder::default();
        assert_eq!(f.get(), None);
        let a = (Ipv4Addr::new(198, 18, 1, 1), 7301);
        let b = (Ipv4Addr::new(255, 255, 255, 254), 65535);
        assert_eq!(f.swap(a, None), None);
        let v = f.version();
        assert_eq!(f.swap(a, None), Some(a));
        assert_eq!(f.version(), v, "nothing changed");
        assert_eq!(f.swap(a, Some(PublicKey([1; 32]))), Some(a));
        assert_eq!(f.key(), Some(PublicKey([1; 32])));
        assert!(f.version() > v, "the key changed");
        assert_eq!(f.swap(b, Some(PublicKey([1; 32]))), Some(a));
        assert_eq!(f.get(), Some(b));
    }
}
