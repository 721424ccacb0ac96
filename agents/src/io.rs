//! The agents' data-path loops. Each blocks on one source, asks the sans-I/O
//! part (`ta::Encapsulator`, `ra::Decapsulator`) what to do and sends; no
//! allocation, lock or channel per packet.
//!
//! Both TUN devices use the kernel's virtio-net header offloads when
//! available: the TA reads TCP super-packets (up to 64 KiB) and `tun-rs`
//! cuts them into MTU-sized packets in one pass; the RA hands the kernel
//! batches that `tun-rs` coalesces back into super-packets (GRO), so the
//! stacks at both ends see few large packets instead of many small ones.
//! Between agent and forwarder, the UDP encapsulation sends a whole batch in
//! one GSO send; the IP-in-IP one sends packet by packet (raw sockets have
//! no GSO).

use crate::ra::{Decapsulator, RaCounters};
use crate::ta::{choose, Encapsulator, SiteForwarders, TaCounters};
use crate::{HEADROOM, TAILROOM};
use pon_netio::udp::{GsoBatch, RecvBatch, SendError, UdpIo};
use pon_netio::{IpipReceiver, RawSender};
use pon_proto::control::PublicKey;
use pon_tunnel::lan::{Channel, LanSender, PairKey};
use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use tun_rs::{GROTable, SyncDevice, IDEAL_BATCH_SIZE, VIRTIO_NET_HDR_LEN};

/// This VM's static secret and this run's epoch: what the agent legs'
/// keys are made from.
pub struct TaKeys {
    pub secret: [u8; 32],
    pub epoch: u64,
    pub encrypt: bool,
}

impl TaKeys {
    /// The uplink's sender towards the proxy whose key is `proxy`.
    pub fn uplink(&self, proxy: &PublicKey) -> Option<LanSender> {
        PairKey::for_agent(&self.secret, &proxy.0)
            .map(|p| p.sender(Channel::Uplink, self.epoch, self.encrypt))
    }
}

/// How the TA reaches its forwarder.
pub enum TaUplink {
    Ipip(RawSender),
    Udp(UdpIo),
}

/// The TA's loop: TUN → encapsulate → forwarder. Runs until the process
/// exits. The site's forwarders and which of them live are read once per
/// batch, so the TA follows what the CU names and what steering says from
/// the next batch on; each packet goes to the live forwarder its flow
/// hashes to.
pub fn run_ta(
    tun: &SyncDevice,
    mtu: u16,
    enc: &Encapsulator,
    uplink: &TaUplink,
    forwarders: &SiteForwarders,
    keys: &TaKeys,
    counters: &TaCounters,
) -> ! {
    let mut raw = vec![0u8; VIRTIO_NET_HDR_LEN + 65535];
    let mut bufs: Vec<Vec<u8>> = (0..IDEAL_BATCH_SIZE)
        .map(|_| vec![0u8; HEADROOM + usize::from(mtu).max(1500) + TAILROOM])
        .collect();
    let mut sizes = vec![0usize; IDEAL_BATCH_SIZE];
    let mut gso = GsoBatch::new(usize::from(mtu) + pon_proto::lan::OVERHEAD);
    // The uplink's keys with each forwarder's proxy, by position in the
    // set; kept across renamings by key, so a counter never restarts under
    // the same key.
    let mut version = u64::MAX;
    let mut senders: Vec<Option<Arc<LanSender>>> = Vec::new();
    let mut by_key: HashMap<PublicKey, Arc<LanSender>> = HashMap::new();
    loop {
        let n = match tun.recv_multiple(&mut raw, &mut bufs, &mut sizes, HEADROOM) {
            Ok(n) => n,
            Err(e) => {
                counters.rx_errors.add_and_warn(1, "TUN read failed", &e);
                continue;
            }
        };
        let set = forwarders.load();
        if set.members.is_empty() {
            // Named before the loop starts (the TA waits for it), never unnamed.
            continue;
        }
        if set.version != version {
            version = set.version;
            by_key.retain(|k, _| set.members.iter().any(|m| m.key == Some(*k)));
            senders = set
                .members
                .iter()
                .map(|m| {
                    let k = m.key?;
                    if let Some(s) = by_key.get(&k) {
                        return Some(s.clone());
                    }
                    let s = Arc::new(keys.uplink(&k)?);
                    by_key.insert(k, s.clone());
                    Some(s)
                })
                .collect();
        }
        let live = forwarders.live_mask();
        for (buf, &size) in bufs.iter_mut().zip(&sizes).take(n) {
            let flow = enc.flow(buf, size);
            let Some(i) = choose(&set, live, flow) else {
                continue;
            };
            let (fwd_ip, fwd_port) = set.members[i].addr;
            let sender = senders.get(i).and_then(|s| s.as_deref());
            let Some(range) = enc.encapsulate(buf, size, fwd_ip, sender, counters) else {
                continue;
            };
            match uplink {
                TaUplink::Ipip(raw) => match raw.send_to(&buf[range], fwd_ip) {
                    Ok(_) => counters.sent.inc(),
                    Err(e) => counters
                        .tx_errors
                        .add_and_warn(1, "send to forwarder failed", &e),
                },
                TaUplink::Udp(io) => {
                    let to = SocketAddr::from((fwd_ip, fwd_port));
                    if let Err(e) = gso.push(io, to, &buf[range]) {
                        lost(counters, &e);
                    }
                }
            }
        }
        if let TaUplink::Udp(io) = uplink {
            if let Err(e) = gso.flush(io) {
                lost(counters, &e);
            }
            // Lost datagrams were counted as their sends failed.
            counters.sent.add(gso.take_sent());
        }
    }
}

/// Counts every packet a failed batched send lost.
fn lost(counters: &TaCounters, e: &SendError) {
    // A failed batched send loses every packet of the batch.
    counters
        .tx_errors
        .add_and_warn(e.datagrams, "send to forwarder failed", &e.error);
}

/// Gathers packets for the RA's TUN and writes them in batches, coalesced
/// into super-packets where the offloads allow.
pub struct TunWriter {
    bufs: Vec<Vec<u8>>,
    count: usize,
    gro: GROTable,
}

impl Default for TunWriter {
    fn default() -> Self {
        TunWriter {
            bufs: (0..IDEAL_BATCH_SIZE)
                .map(|_| Vec::with_capacity(VIRTIO_NET_HDR_LEN + 65535))
                .collect(),
            count: 0,
            gro: GROTable::default(),
        }
    }
}

impl TunWriter {
    pub fn push(&mut self, tun: &SyncDevice, pkt: &[u8], c: &RaCounters) {
        let b = &mut self.bufs[self.count];
        b.clear();
        b.resize(VIRTIO_NET_HDR_LEN, 0);
        b.extend_from_slice(pkt);
        self.count += 1;
        if self.count == self.bufs.len() {
            self.flush(tun, c);
        }
    }

    pub fn flush(&mut self, tun: &SyncDevice, c: &RaCounters) {
        if self.count == 0 {
            return;
        }
        if let Err(e) = tun.send_multiple(
            &mut self.gro,
            &mut self.bufs[..self.count],
            VIRTIO_NET_HDR_LEN,
        ) {
            c.tx_errors.add_and_warn(1, "TUN write failed", &e);
        }
        self.count = 0;
    }
}

/// The RA's IP-in-IP loop: raw socket → check → TUN, in batches of what is queued.
pub fn run_ra_ipip(
    rx: &IpipReceiver,
    tun: &SyncDevice,
    dec: &Decapsulator,
    counters: &RaCounters,
) -> ! {
    let mut buf = vec![0u8; 65535];
    let mut out = TunWriter::default();
    let mut pending = false;
    loop {
        let got = if pending {
            rx.try_recv(&mut buf)
        } else {
            rx.recv(&mut buf).map(Some)
        };
        let n = match got {
            Ok(Some(n)) => n,
            Ok(None) => {
                out.flush(tun, counters);
                pending = false;
                continue;
            }
            Err(e) => {
                counters
                    .rx_errors
                    .add_and_warn(1, "IP-in-IP receive failed", &e);
                continue;
            }
        };
        if let Some(inner) = dec.from_ipip(&buf[..n], counters) {
            out.push(tun, &buf[inner], counters);
            pending = true;
        }
    }
}

/// The RA's UDP loop, for the UDP encapsulation (GRO batches in, GRO out).
pub fn run_ra_udp(rx: &UdpIo, tun: &SyncDevice, dec: &Decapsulator, counters: &RaCounters) -> ! {
    let mut rb = RecvBatch::default();
    let mut out = TunWriter::default();
    loop {
        let n = match rb.recv(rx) {
            Ok(n) => n,
            Err(e) => {
                counters.rx_errors.add_and_warn(1, "UDP receive failed", &e);
                continue;
            }
        };
        for i in 0..n {
            let src = rb.source(i).ip();
            for datagram in rb.datagrams_mut(i) {
                if let Some(inner) = dec.from_udp(src, datagram, counters) {
                    out.push(tun, &datagram[inner], counters);
                }
            }
        }
        out.flush(tun, counters);
    }
}
