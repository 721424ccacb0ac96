//! The one event loop every proxy daemon runs around its core: it waits
//! for inputs or the core's next timeout, feeds the core, and moves what
//! the core outputs to sockets, the shared table or the local link. It
//! holds no logic of its own: that is the core's.

use super::link::Link;
use super::mailbox::{Inbox, Input, BULK_PER_ROUND};
use super::DaemonCounters;
use crate::core::{Core, Output, Part, Transmit};
use pon_cu::client::ClientStatus;
use pon_forwarder::io::Sockets;
use pon_forwarder::Engine;
use pon_proto::local::pmon_messages;
use pon_proto::pmon::Report;
use std::net::{SocketAddr, UdpSocket};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// Urgent inputs handled per loop round at most, before timers get a look.
const URGENT_PER_ROUND: usize = 4096;

/// Longest sleep between looks at the clock; nothing waits longer anyway.
const MAX_WAIT: Duration = Duration::from_millis(100);

/// Where a core's outputs go. A daemon has the parts it needs: pon-proxy
/// and pon-forwarder the sockets and the table, the split daemons the
/// link.
#[derive(Default)]
pub struct Io {
    pub sockets: Option<Arc<Sockets>>,
    /// The data path's engine: its table and session keys are stored
    /// through it, and the core's own packets sealed by it.
    pub engine: Option<Arc<Engine>>,
    /// Where steering datagrams leave from (the proxy's agent-side address).
    pub steering: Option<UdpSocket>,
    pub link: Option<Link>,
    /// Where PMon reports go.
    pub reports: ReportTo,
    /// The round of the last report sent to the forwarder (split router).
    pub pmon_round: u32,
    pub counters: Arc<DaemonCounters>,
}

/// Where a daemon's PMon reports (its published status's, or those its
/// forwarder part assembled from the router's) go: the one place a report
/// is offered to the CU, whichever shape the proxy has.
#[derive(Default)]
pub enum ReportTo {
    /// No CU (static mode), or a part without reports.
    #[default]
    Nowhere,
    /// pon-proxy and pon-forwarder in CU mode: their CU client, which
    /// sends it while registered, when it is news; and pon-proxy's own
    /// PMon listener (`[pmon]`), if it serves one.
    Cu(Arc<ClientStatus>, Option<Arc<pon_cu::pmon_listen::Feed>>),
    /// pon-router: over the local link to pon-forwarder, whose CU client
    /// it is for.
    Forwarder,
}

impl Io {
    fn output(&mut self, o: Output) {
        match o {
            Output::Table(t) => match &self.engine {
                Some(e) => e.table.store(t),
                None => self.counters.no_socket.inc(),
            },
            Output::Sessions(s) => match &self.engine {
                Some(e) => e.sessions.store(s),
                None => self.counters.no_socket.inc(),
            },
            Output::Transmit(Transmit::Peer { to: _, mut bytes }) => {
                let (Some(s), Some(e)) = (&self.sockets, &self.engine) else {
                    self.counters.no_socket.inc();
                    return;
                };
                let len = bytes.len();
                let sealed = e.seal_local(&e.table.load(), &e.sessions.load(), &mut bytes, 0, len);
                match sealed {
                    Ok(to) => {
                        if s.peer.send(to, &bytes, None).is_err() {
                            self.counters.peer_send_errors.inc();
                        }
                    }
                    Err(_) => self.counters.not_sealed.inc(),
                }
            }
            Output::Transmit(Transmit::Steering { to, bytes }) => match &self.steering {
                Some(s) => {
                    if s.send_to(&bytes, SocketAddr::V4(to)).is_err() {
                        self.counters.steering_send_errors.inc();
                    }
                }
                None => self.counters.no_socket.inc(),
            },
            // A pon-forwarder without [local] has no monitor or router to
            // tell: its messages to them have no one to go to.
            Output::Local { to, msg } => {
                if let Some(l) = &self.link {
                    l.send(to, &msg);
                }
            }
            Output::Report(r) => self.report(r),
        }
    }

    fn report(&mut self, r: Report) {
        match &self.reports {
            ReportTo::Nowhere => {}
            ReportTo::Cu(cu, local) => {
                if let Some(l) = local {
                    l.offer_report(r.clone());
                }
                cu.offer_report(r);
            }
            ReportTo::Forwarder => {
                let Some(l) = &self.link else { return };
                self.pmon_round = self.pmon_round.wrapping_add(1);
                for m in pmon_messages(r, self.pmon_round) {
                    l.send(Part::Forwarder, &m);
                }
            }
        }
    }
}

/// Publishes a core's status snapshot (for the HTTP thread) and returns
/// its PMon report, if it has one.
pub type Publish<C> = Box<dyn FnMut(&C, Duration) -> Option<Report> + Send>;

/// A daemon's control thread: its core, its inputs, where its outputs go,
/// and how its status is published (for the HTTP thread, every
/// `status_every`).
pub struct EventLoop<C: Core> {
    pub core: C,
    pub inbox: Inbox,
    pub io: Io,
    pub publish: Publish<C>,
    pub status_every: Duration,
    pub start: Instant,
}

impl<C: Core + Send + 'static> EventLoop<C> {
    /// A split daemon's loop: its part, talking to the others over `link`
    /// (its reports go to the forwarder).
    pub fn over_link(
        core: C,
        inbox: Inbox,
        link: Link,
        publish: Publish<C>,
        status_every: Duration,
    ) -> Self {
        EventLoop {
            core,
            inbox,
            io: Io {
                link: Some(link),
                reports: ReportTo::Forwarder,
                ..Io::default()
            },
            publish,
            status_every,
            start: Instant::now(),
        }
    }

    pub fn spawn(self, name: &str) -> std::io::Result<JoinHandle<()>> {
        std::thread::Builder::new()
            .name(name.into())
            .spawn(move || self.run())
    }

    pub fn run(mut self) {
        let mut next_status = Duration::ZERO;
        // The last round stopped at its cap with others' probes left.
        let mut bulk_more = false;
        loop {
            let now = self.start.elapsed();
            let wait = if bulk_more || self.inbox.bulk_left() {
                Duration::ZERO
            } else {
                self.core
                    .poll_timeout()
                    .map_or(MAX_WAIT, |t| t.saturating_sub(now))
                    .min(MAX_WAIT)
                    .min(next_status.saturating_sub(now))
            };
            let first = match self.inbox.urgent.recv_timeout(wait) {
                Ok(i) => Some(i),
                Err(std::sync::mpsc::RecvTimeoutError::Timeout) => None,
                Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => return,
            };
            // What is queued, up to a round's worth (so timers are not
            // starved by a steady stream), then the newest view, then a
            // bounded round of others' probes.
            let mut next = first;
            let mut taken = 0;
            while let Some(input) = next.take().or_else(|| {
                (taken < URGENT_PER_ROUND)
                    .then(|| self.inbox.urgent.try_recv().ok())
                    .flatten()
            }) {
                taken += 1;
                let now = self.start.elapsed();
                match input {
                    Input::Packet(p, from) => self.core.handle_packet(now, p, from),
                    Input::PeerMoved(peer, at) => self.core.handle_peer_moved(now, peer, at),
                    Input::Local(from, msg) => self.core.handle_local(now, from, msg),
                    Input::Wake => {}
                }
                // Answers leave at once: their delay is the other side's RTT.
                self.flush();
            }
            if let Some(v) = self.inbox.take_view() {
                self.core.handle_view(self.start.elapsed(), v);
                self.flush();
            }
            self.inbox.start_bulk_round();
            bulk_more = true;
            for _ in 0..BULK_PER_ROUND {
                let Some((p, from)) = self.inbox.take_bulk() else {
                    bulk_more = false;
                    break;
                };
                self.core.handle_packet(self.start.elapsed(), p, from);
                self.flush();
            }
            let now = self.start.elapsed();
            if self.core.poll_timeout().is_some_and(|t| t <= now) {
                self.core.handle_timeout(now);
                self.flush();
            }
            if now >= next_status {
                // The report goes no more often than the status.
                if let Some(r) = (self.publish)(&self.core, now) {
                    self.io.output(Output::Report(r));
                }
                next_status = now + self.status_every;
            }
        }
    }

    fn flush(&mut self) {
        while let Some(o) = self.core.poll_output() {
            self.io.output(o);
        }
    }
}
