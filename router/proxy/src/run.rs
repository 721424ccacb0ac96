//! The proxy's control thread: the only place that calls into [`Control`].
//! It moves bytes only: probes and replies from the forwarding threads (a
//! bounded queue they never wait on), CU views, the clock; packets out of
//! the forwarder's peer socket, tables into the shared table, steering
//! datagrams to the TAs, and status snapshots for the HTTP thread.

use super::control::{Control, Status};
use crate::forwarder::io::{MonitorSink, Sockets};
use crate::forwarder::SharedTable;
use arc_swap::ArcSwap;
use pon_cu::view::View;
use std::net::{SocketAddr, SocketAddrV4, UdpSocket};
use std::sync::mpsc::{sync_channel, Receiver, RecvTimeoutError, SyncSender, TrySendError};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

pon_telemetry::counters! {
    pub struct RunCounters {
        queue_drops => ("pon_proxy_control_queue_drops_total", "", "Probe packets dropped because the control thread's queue was full."),
        send_errors => ("pon_proxy_control_send_errors_total", "", "Probe, reply or steering datagrams that could not be sent."),
        unknown_hop => ("pon_proxy_control_unknown_hop_total", "", "Probe packets for a first hop that is not a peer (dropped)."),
    }
}

pub enum Event {
    /// A probe or reply that ended here (the whole PON packet).
    Packet(Vec<u8>),
    /// The CU's latest view.
    View(Box<View>),
}

/// The queue into the control thread and its sink for the forwarder.
pub fn channel(
    capacity: usize,
    counters: Arc<RunCounters>,
) -> (SyncSender<Event>, Receiver<Event>, MonitorSink) {
    let (tx, rx) = sync_channel(capacity);
    let t = tx.clone();
    let sink: MonitorSink = Arc::new(move |pkt: &[u8]| {
        if let Err(TrySendError::Full(_)) = t.try_send(Event::Packet(pkt.to_vec())) {
            counters.queue_drops.inc();
        }
    });
    (tx, rx, sink)
}

pub struct ControlThread {
    pub control: Control,
    pub events: Receiver<Event>,
    pub sockets: Arc<Sockets>,
    pub table: SharedTable,
    pub status: Arc<ArcSwap<Status>>,
    pub status_every: Duration,
    /// Socket steering datagrams leave from (the proxy's agent-side address).
    pub steering: Option<(UdpSocket, u16)>,
    pub counters: Arc<RunCounters>,
    pub start: Instant,
}

/// Longest sleep between looks at the clock; nothing waits longer anyway.
const MAX_WAIT: Duration = Duration::from_millis(100);

impl ControlThread {
    pub fn spawn(self) -> std::io::Result<JoinHandle<()>> {
        std::thread::Builder::new()
            .name("proxy-control".into())
            .spawn(move || self.run())
    }

    fn run(mut self) {
        let mut out = Vec::new();
        let mut next_status = Duration::ZERO;
        loop {
            let now = self.start.elapsed();
            let wait = self
                .control
                .poll_timeout()
                .map_or(MAX_WAIT, |t| t.saturating_sub(now))
                .min(MAX_WAIT)
                .min(next_status.saturating_sub(now));
            let first = match self.events.recv_timeout(wait) {
                Ok(ev) => Some(ev),
                Err(RecvTimeoutError::Timeout) => None,
                Err(RecvTimeoutError::Disconnected) => return,
            };
            // Everything queued meanwhile, in one go.
            for ev in first
                .into_iter()
                .chain(std::iter::from_fn(|| self.events.try_recv().ok()))
            {
                let now = self.start.elapsed();
                match ev {
                    Event::Packet(bytes) => {
                        if let Some(s) = self.control.on_packet(now, &bytes) {
                            out.push(s);
                        }
                    }
                    Event::View(v) => self.control.on_view(now, *v),
                }
                // Answers leave at once: their delay is the other side's RTT.
                self.flush(&mut out);
            }
            let now = self.start.elapsed();
            if self.control.poll_timeout().is_some_and(|t| t <= now) {
                self.control.on_tick(now, &mut out);
            }
            // Table before probes: a new route is in force before its keepalives go out.
            if let Some(t) = self.control.take_table() {
                self.table.store(Arc::new(t.clone()));
            }
            self.flush(&mut out);
            if let Some(s) = self.control.steering(now) {
                if let Some((sock, port)) = &self.steering {
                    for a in s.agents {
                        let to = SocketAddr::V4(SocketAddrV4::new(a, *port));
                        if sock.send_to(&s.bytes, to).is_err() {
                            self.counters.send_errors.inc();
                        }
                    }
                }
            }
            if now >= next_status {
                self.status.store(Arc::new(self.control.status(now)));
                next_status = now + self.status_every;
            }
        }
    }

    fn flush(&self, out: &mut Vec<pon_monitor::Send>) {
        if out.is_empty() {
            return;
        }
        let table = self.table.load();
        for s in out.drain(..) {
            let Some(addr) = table.peer_addr(s.first_hop) else {
                self.counters.unknown_hop.inc();
                continue;
            };
            if self.sockets.peer.send(addr, &s.bytes, None).is_err() {
                self.counters.send_errors.inc();
            }
        }
    }
}
