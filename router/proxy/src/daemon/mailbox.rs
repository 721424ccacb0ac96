//! How inputs reach a daemon's event loop without anyone waiting on it.
//!
//! Three ways in, because they must not compete with each other:
//! - the **urgent** queue: replies to our own probes, local-link messages,
//!   wake-ups. Bounded; what does not fit is dropped and counted.
//! - the **bulk** queue: other monitors' probes and other proxies'
//!   handshake initiations, which we only answer. A flood of them fills
//!   this queue alone, so it can never push our own replies out (which
//!   would look like loss and cause false failovers).
//! - the **latest view** slot: the CU client's thread overwrites it and
//!   never blocks (its heartbeats must go on); the loop takes the newest.
//!
//! Probes longer than any our monitors send are dropped before they are
//! copied: a queue of 64 KiB datagrams would cost hundreds of MiB.

use pon_cu::view::View;
use pon_forwarder::io::{CoreSink, ToCore};
use pon_proto::local::LocalMsg;
use pon_proto::pon::{self, Kind};
use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{sync_channel, Receiver, SyncSender, TrySendError};
use std::sync::{Arc, Mutex};

use super::DaemonCounters;
use crate::core::Part;

/// Longest probe or reply accepted from the forwarding threads: the
/// longest PON header and the longest probe body a monitor sends.
pub const MAX_PROBE_LEN: usize = pon::MAX_HEADER_LEN + pon_monitor::MAX_BODY_LEN;

/// Others' probes handled per loop iteration at most, so that a flood of
/// them does not delay our timers.
pub const BULK_PER_ROUND: usize = 256;

pub enum Input {
    /// A probe, reply or handshake message that ended at this proxy, and
    /// the address it came from.
    Packet(Vec<u8>, SocketAddr),
    /// A peer authenticated from an address the table does not have for it.
    PeerMoved(u32, SocketAddr),
    /// A message from another part over the local link.
    Local(Part, LocalMsg),
    /// Something is waiting in the bulk queue or the view slot.
    Wake,
}

/// The senders' side, cloned into threads.
#[derive(Clone)]
pub struct Mailbox {
    urgent: SyncSender<Input>,
    bulk: SyncSender<(Vec<u8>, SocketAddr)>,
    bulk_pending: Arc<AtomicBool>,
    view: Arc<Mutex<Option<View>>>,
    /// The address each roaming peer was last reported at: every packet
    /// of a peer that moved says so until the table follows, and one
    /// report is enough.
    moved: Arc<Mutex<HashMap<u32, SocketAddr>>>,
    pub counters: Arc<DaemonCounters>,
}

/// The loop's side.
pub struct Inbox {
    pub urgent: Receiver<Input>,
    bulk: Receiver<(Vec<u8>, SocketAddr)>,
    bulk_pending: Arc<AtomicBool>,
    view: Arc<Mutex<Option<View>>>,
}

pub fn mailbox(urgent: usize, bulk: usize) -> (Mailbox, Inbox) {
    let (utx, urx) = sync_channel(urgent);
    let (btx, brx) = sync_channel(bulk);
    let pending = Arc::new(AtomicBool::new(false));
    let view = Arc::new(Mutex::new(None));
    (
        Mailbox {
            urgent: utx,
            bulk: btx,
            bulk_pending: pending.clone(),
            view: view.clone(),
            moved: Arc::default(),
            counters: Default::default(),
        },
        Inbox {
            urgent: urx,
            bulk: brx,
            bulk_pending: pending,
            view,
        },
    )
}

impl Mailbox {
    /// Queues an urgent input; never blocks.
    pub fn post(&self, input: Input) {
        if let Err(TrySendError::Full(_)) = self.urgent.try_send(input) {
            self.counters.urgent_full.inc();
        }
    }

    /// A probe, reply or handshake message from a forwarding thread, whose
    /// kind the engine already read: answers to ours are urgent, others'
    /// requests are bulk.
    pub fn post_packet(&self, kind: Kind, packet: &[u8], from: SocketAddr) {
        if packet.len() > MAX_PROBE_LEN {
            self.counters.too_long.inc();
            return;
        }
        match kind {
            // Answers to what we sent: our measurements (a report answers
            // our data) and our sessions.
            Kind::ProbeReply | Kind::Report | Kind::HandshakeResponse => {
                self.post(Input::Packet(packet.to_vec(), from))
            }
            // Others' requests, answered in bounded rounds.
            Kind::Probe | Kind::HandshakeInit => {
                if let Err(TrySendError::Full(_)) = self.bulk.try_send((packet.to_vec(), from)) {
                    self.counters.bulk_full.inc();
                    return;
                }
                // One wake-up per batch: the loop clears the flag before it
                // drains the queue.
                if !self.bulk_pending.swap(true, Ordering::AcqRel) {
                    self.post(Input::Wake);
                }
            }
            Kind::Data | Kind::Keepalive => self.counters.not_probe.inc(),
        }
    }

    /// A peer seen at a new address: reported once per address.
    pub fn post_moved(&self, peer: u32, from: SocketAddr) {
        let mut m = self.moved.lock().unwrap_or_else(|p| p.into_inner());
        if m.insert(peer, from) != Some(from) {
            drop(m);
            self.post(Input::PeerMoved(peer, from));
        }
    }

    /// The forwarding threads' hand-off.
    pub fn sink(&self) -> CoreSink {
        Arc::new(self.clone())
    }

    /// A new view from the CU: replaces any not yet taken.
    pub fn post_view(&self, view: View) {
        *self.view.lock().unwrap_or_else(|p| p.into_inner()) = Some(view);
        self.post(Input::Wake);
    }
}

impl Inbox {
    /// The newest view, if one came since the last look.
    pub fn take_view(&self) -> Option<View> {
        self.view.lock().unwrap_or_else(|p| p.into_inner()).take()
    }

    /// Another of others' probes, if one is queued.
    pub fn take_bulk(&self) -> Option<(Vec<u8>, SocketAddr)> {
        self.bulk.try_recv().ok()
    }

    /// Whether others' probes may be waiting (a wake-up was posted for them).
    pub fn bulk_left(&self) -> bool {
        self.bulk_pending.load(Ordering::Acquire)
    }

    /// Called before a round drains the bulk queue: a probe queued from now
    /// on posts a new wake-up, so none is left waiting for a timer.
    pub fn start_bulk_round(&self) {
        self.bulk_pending.store(false, Ordering::Release);
    }
}

impl ToCore for Mailbox {
    fn packet(&self, kind: Kind, packet: &[u8], from: SocketAddr) {
        self.post_packet(kind, packet, from)
    }
    fn peer_moved(&self, peer: u32, from: SocketAddr) {
        self.post_moved(peer, from)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use pon_proto::pon::{Hops, Repr};

    const FROM: SocketAddr = SocketAddr::V4(std::net::SocketAddrV4::new(
        std::net::Ipv4Addr::new(198, 18, 2, 1),
        7300,
    ));

    #[test]
    fn a_roaming_peer_is_reported_once_per_address() {
        let (mb, inbox) = mailbox(8, 8);
        let other: SocketAddr = "203.0.113.9:7300".parse().unwrap();
        for _ in 0..100 {
            mb.post_moved(2, FROM);
        }
        mb.post_moved(2, other);
        mb.post_moved(2, other);
        let got: Vec<(u32, SocketAddr)> = inbox
            .urgent
            .try_iter()
            .filter_map(|i| match i {
                Input::PeerMoved(p, a) => Some((p, a)),
                _ => None,
            })
            .collect();
        assert_eq!(got, vec![(2, FROM), (2, other)]);
    }

    fn packet(kind: Kind, body: usize) -> Vec<u8> {
        let r = Repr {
            kind,
            hop_limit: 8,
            hop_index: 0,
            flow_id: 0,
            source: 2,
            hops: Hops::new(&[1]).unwrap(),
        };
        let mut v = vec![0; r.wire_len(body)];
        r.emit(&mut v).unwrap();
        v
    }

    #[test]
    fn a_flood_of_foreign_probes_never_pushes_out_our_replies() {
        let (mb, inbox) = mailbox(8, 4);
        for _ in 0..1000 {
            mb.post_packet(Kind::Probe, &packet(Kind::Probe, 40), FROM);
        }
        for _ in 0..3 {
            mb.post_packet(Kind::ProbeReply, &packet(Kind::ProbeReply, 40), FROM);
        }
        assert_eq!(mb.counters.bulk_full.get(), 996);
        assert_eq!(mb.counters.urgent_full.get(), 0);
        // One wake-up for the whole flood, then our three replies.
        let urgent: Vec<Input> = inbox.urgent.try_iter().collect();
        assert_eq!(urgent.len(), 4);
        assert!(matches!(urgent[0], Input::Wake));
        assert!(urgent[1..]
            .iter()
            .all(|i| matches!(i, Input::Packet(_, FROM))));
        inbox.start_bulk_round();
        assert_eq!(std::iter::from_fn(|| inbox.take_bulk()).count(), 4);
    }

    #[test]
    fn oversized_and_data_packets_are_not_copied() {
        let (mb, inbox) = mailbox(8, 8);
        mb.post_packet(Kind::Probe, &packet(Kind::Probe, 60_000), FROM);
        mb.post_packet(Kind::Data, &packet(Kind::Data, 40), FROM);
        mb.post_packet(Kind::Data, &packet(Kind::Data, 0), FROM);
        assert_eq!(mb.counters.too_long.get(), 1);
        assert_eq!(mb.counters.not_probe.get(), 2);
        assert!(inbox.urgent.try_recv().is_err());
        assert!(inbox.take_bulk().is_none());
    }

    #[test]
    fn views_keep_only_the_latest_and_never_block() {
        let (mb, inbox) = mailbox(1, 1);
        for id in 1..=100u32 {
            let mut v = View::default();
            v.apply_config(pon_proto::control::Config {
                id,
                heartbeat_ms: 1000,
                dead_after_ms: 3000,
                peers: vec![],
                clouds: vec![],
            });
            mb.post_view(v);
        }
        assert_eq!(inbox.take_view().map(|v| v.id()), Some(100));
        assert!(inbox.take_view().is_none());
    }
}
