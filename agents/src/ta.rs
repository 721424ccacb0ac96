//! The transmission agent's per-packet work, without I/O: check a packet
//! read from the TUN and wrap it for the local forwarder.

use crate::HEADROOM;
use pon_proto::ip::{InnerPacket, IpProtocol, Ipv4Repr, IPV4_HEADER_LEN};
use pon_proto::EncapKind;
use std::net::{IpAddr, Ipv4Addr};
use std::ops::Range;

pon_telemetry::counters! {
    pub struct TaCounters {
        captured => ("pon_ta_packets_total", "stage=\"captured\"", "Packets read from the TUN and sent to the forwarder."),
        drop_malformed => ("pon_ta_drops_total", "reason=\"malformed\"", "Packets dropped, by reason."),
        drop_foreign_source => ("pon_ta_drops_total", "reason=\"foreign_source\"", "Packets dropped, by reason."),
        rx_errors => ("pon_ta_socket_errors_total", "op=\"recv\"", "TUN or socket errors."),
        tx_errors => ("pon_ta_socket_errors_total", "op=\"send\"", "TUN or socket errors."),
    }
}

pub struct Encapsulator {
    pub local: Ipv4Addr,
    pub forwarder: Ipv4Addr,
    /// How the TA reaches the forwarder (the port is the forwarder's).
    pub encap: EncapKind,
}

impl Encapsulator {
    /// `buf[HEADROOM..HEADROOM + len]` holds a packet read from the TUN.
    /// Returns the bytes to send: the whole IP-in-IP packet, or the inner
    /// packet for the UDP encapsulation. `None` means drop (counted).
    pub fn encapsulate(&self, buf: &mut [u8], len: usize, c: &TaCounters) -> Option<Range<usize>> {
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
                Ipv4Repr {
                    src: self.local,
                    dst: self.forwarder,
                    protocol: IpProtocol::Ipip,
                    ttl: 64,
                    dont_fragment: false,
                    payload_len: len,
                }
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
    use pon_proto::ip::IpipPacket;

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
            forwarder: Ipv4Addr::new(198, 18, 1, 1),
            encap: EncapKind::Ipip,
        };
        let c = TaCounters::default();
        let mut buf = packet_from(e.local);
        let r = e.encapsulate(&mut buf, 28, &c).unwrap();
        let p = IpipPacket::new_checked(&buf[r]).unwrap();
        assert_eq!(p.outer().dst(), e.forwarder);
        assert_eq!(p.inner().len(), 28);
        let mut buf = packet_from(Ipv4Addr::new(10, 0, 0, 1));
        assert!(e.encapsulate(&mut buf, 28, &c).is_none());
        assert!(e.encapsulate(&mut buf, 3, &c).is_none());
        assert_eq!(
            (
                c.captured.get(),
                c.drop_foreign_source.get(),
                c.drop_malformed.get()
            ),
            (1, 1, 1)
        );
    }
}
