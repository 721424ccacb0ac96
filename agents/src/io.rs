//! The agents' data-path loops. Each blocks on one source, asks the sans-I/O
//! part (`ta::Encapsulator`, `ra::Decapsulator`) what to do and sends; no
//! allocation, lock or channel per packet.

use crate::ra::{Decapsulator, RaCounters};
use crate::ta::{Encapsulator, TaCounters};
use crate::{BUFFER_LEN, HEADROOM};
use pon_netio::{IpipReceiver, RawSender};
use std::net::{SocketAddr, UdpSocket};
use tun_rs::SyncDevice;

/// How the TA reaches its forwarder.
pub enum TaUplink {
    Ipip(RawSender),
    Udp {
        socket: UdpSocket,
        forwarder: SocketAddr,
    },
}

/// The TA's loop: TUN → encapsulate → forwarder. Runs until the process exits.
pub fn run_ta(tun: &SyncDevice, enc: &Encapsulator, uplink: &TaUplink, counters: &TaCounters) -> ! {
    let mut buf = vec![0u8; BUFFER_LEN];
    loop {
        let n = match tun.recv(&mut buf[HEADROOM..]) {
            Ok(n) => n,
            Err(e) => {
                counters.rx_errors.inc();
                if counters.rx_errors.get().is_power_of_two() {
                    tracing::warn!(error = %e, "TUN read failed");
                }
                continue;
            }
        };
        let Some(range) = enc.encapsulate(&mut buf, n, counters) else {
            continue;
        };
        let sent = match uplink {
            TaUplink::Ipip(raw) => raw.send_to(&buf[range], enc.forwarder),
            TaUplink::Udp { socket, forwarder } => socket.send_to(&buf[range], forwarder),
        };
        if let Err(e) = sent {
            counters.tx_errors.inc();
            if counters.tx_errors.get().is_power_of_two() {
                tracing::warn!(error = %e, "send to forwarder failed");
            }
        }
    }
}

/// The RA's IP-in-IP loop: raw socket → check → TUN.
pub fn run_ra_ipip(
    rx: &IpipReceiver,
    tun: &SyncDevice,
    dec: &Decapsulator,
    counters: &RaCounters,
) -> ! {
    let mut buf = vec![0u8; BUFFER_LEN];
    loop {
        let n = match rx.recv(&mut buf) {
            Ok(n) => n,
            Err(_) => {
                counters.rx_errors.inc();
                continue;
            }
        };
        if let Some(inner) = dec.from_ipip(&buf[..n], counters) {
            if tun.send(&buf[inner]).is_err() {
                counters.tx_errors.inc();
            }
        }
    }
}

/// The RA's UDP loop, for the UDP encapsulation.
pub fn run_ra_udp(
    rx: &UdpSocket,
    tun: &SyncDevice,
    dec: &Decapsulator,
    counters: &RaCounters,
) -> ! {
    let mut buf = vec![0u8; BUFFER_LEN];
    loop {
        let (n, src) = match rx.recv_from(&mut buf) {
            Ok(r) => r,
            Err(_) => {
                counters.rx_errors.inc();
                continue;
            }
        };
        if dec.from_udp(src.ip(), &buf[..n], counters) && tun.send(&buf[..n]).is_err() {
            counters.tx_errors.inc();
        }
    }
}
