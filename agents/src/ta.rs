//! The transmission agent's per-packet work, without I/O: check a packet
//! read from the TUN and wrap it for the local forwarder.

use crate::HEADROOM;
use pon_proto::control::PublicKey;
use pon_proto::ip::{InnerPacket, Ipv4Repr, IPV4_HEADER_LEN};
use pon_proto::EncapKind;
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
    /// `forwarder`), or the inner packet for the UDP encapsulation. `None`
    /// means drop (counted).
    pub fn encapsulate(
        &self,
        buf: &mut [u8],
        len: usize,
        forwarder: Ipv4Addr,
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
            EncapKind::Udp => Some(HEADROOM..end),
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
        let r = e.encapsulate(&mut buf, 28, fwd, &c).unwrap();
        let p = IpipPacket::new_checked(&buf[r]).unwrap();
        assert_eq!(p.outer().dst(), fwd);
        assert_eq!(p.inner().len(), 28);
        let mut buf = packet_from(Ipv4Addr::new(10, 0, 0, 1));
        assert!(e.encapsulate(&mut buf, 28, fwd, &c).is_none());
        assert!(e.encapsulate(&mut buf, 3, fwd, &c).is_none());
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
