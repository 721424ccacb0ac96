//! pon-forwarder's side of the split: one thread that owns the table's
//! inputs (base and the router's routes) and is its only writer, relays
//! probes between the forwarding threads and pon-monitor, tells pon-router
//! the topology and steers the local TAs.

use super::link::{Link, LinkCounters};
use crate::compose::{Composer, Steerer};
use crate::forwarder::config::LocalConfig;
use crate::forwarder::io::{MonitorSink, Sockets};
use crate::forwarder::{ForwarderConfig, ForwardingTable, SharedTable};
use pon_cu::client::ClientStatus;
use pon_cu::view::View;
use pon_proto::local::LocalMsg;
use std::collections::BTreeSet;
use std::net::{SocketAddr, SocketAddrV4, UdpSocket};
use std::sync::mpsc::{sync_channel, Receiver, RecvTimeoutError, SyncSender, TrySendError};
use std::sync::Arc;
use std::time::{Duration, Instant};

pub enum Event {
    Arrived(Vec<u8>),
    View(Box<View>),
    Local(LocalMsg, SocketAddr),
}

/// The topology is re-sent this often (datagrams may be lost; a restarted
/// monitor or router learns it within this time).
const TOPOLOGY_EVERY: Duration = Duration::from_secs(1);
const STEERING_REFRESH: Duration = Duration::from_secs(1);

pub struct Split {
    tx: SyncSender<Event>,
    rx: Receiver<Event>,
    pub sink: MonitorSink,
    pub link: Link,
    local: LocalConfig,
}

impl Split {
    pub fn new(local: &LocalConfig) -> std::io::Result<Self> {
        let link = Link::bind(local.listen)?;
        let (tx, rx) = sync_channel(4096);
        let (t, c) = (tx.clone(), link.counters.clone());
        let sink: MonitorSink = Arc::new(move |pkt: &[u8]| {
            if let Err(TrySendError::Full(_)) = t.try_send(Event::Arrived(pkt.to_vec())) {
                c.queue_full.inc();
            }
        });
        Ok(Split {
            tx,
            rx,
            sink,
            link,
            local: local.clone(),
        })
    }

    pub fn counters(&self) -> Arc<LinkCounters> {
        self.link.counters.clone()
    }

    /// Starts the CU client (views go to the link thread) and the link
    /// thread itself.
    pub fn start(
        self,
        cfg: &ForwarderConfig,
        table: SharedTable,
        sockets: Arc<Sockets>,
    ) -> anyhow::Result<Option<Arc<ClientStatus>>> {
        let views = self.tx.clone();
        let cu = crate::forwarder::cu::start_with(
            cfg,
            Box::new(move |v: &View| {
                let _ = views.send(Event::View(Box::new(v.clone())));
            }),
        )?;
        self.link.spawn_reader(
            vec![self.local.monitor, self.local.router],
            self.tx.clone(),
            Event::Local,
        )?;
        let steer = match self.local.steering_port {
            0 => None,
            p => Some((
                UdpSocket::bind(SocketAddr::V4(SocketAddrV4::new(cfg.local_addr, 0)))?,
                p,
            )),
        };
        let epoch = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(1, |d| d.as_nanos() as u64);
        let mut l = ForwarderLink {
            composer: Composer::new(cfg.clone()),
            relays: Vec::new(),
            unreachable: BTreeSet::new(),
            heard_router: false,
            steerer: Steerer::new(epoch, STEERING_REFRESH),
            link: self.link,
            local: self.local,
            sockets,
            table,
            steer,
            rx: self.rx,
            start: Instant::now(),
        };
        drop(self.tx);
        std::thread::Builder::new()
            .name("fwd-local".into())
            .spawn(move || l.run())?;
        Ok(cu)
    }
}

struct ForwarderLink {
    composer: Composer,
    relays: Vec<(u32, Vec<u32>)>,
    unreachable: BTreeSet<u32>,
    /// Until the router has spoken, TAs intercept as configured.
    heard_router: bool,
    steerer: Steerer,
    link: Link,
    local: LocalConfig,
    sockets: Arc<Sockets>,
    table: SharedTable,
    steer: Option<(UdpSocket, u16)>,
    rx: Receiver<Event>,
    start: Instant,
}

impl ForwarderLink {
    fn run(&mut self) {
        let mut next_topology = Duration::ZERO;
        let mut dirty = !self.composer.cu_mode();
        loop {
            let now = self.start.elapsed();
            let due = match self.steerer.due() {
                Some(d) if self.heard_router => d.min(next_topology),
                _ => next_topology,
            };
            match self
                .rx
                .recv_timeout(due.saturating_sub(now).max(Duration::from_millis(1)))
            {
                Ok(ev) => match ev {
                    Event::Arrived(b) => self.link.send(self.local.monitor, &LocalMsg::Arrived(b)),
                    Event::View(v) => {
                        self.composer.set_view(*v);
                        dirty = true;
                        next_topology = Duration::ZERO;
                    }
                    Event::Local(msg, from) => dirty |= self.on_local(msg, from),
                },
                Err(RecvTimeoutError::Timeout) => {}
                Err(RecvTimeoutError::Disconnected) => return,
            }
            let now = self.start.elapsed();
            if dirty {
                dirty = false;
                match self.composer.compose(&self.relays) {
                    Ok(t) => {
                        tracing::info!(routes = ?self.relays, "table updated");
                        self.table.store(Arc::new(t));
                    }
                    Err(e) => {
                        tracing::error!(error = %e, "cannot build the table; keeping the last one")
                    }
                }
                self.steerer.wake(now);
            }
            if now >= next_topology {
                next_topology = now + TOPOLOGY_EVERY;
                let (peers, optimise) = self.composer.topology();
                let msg = LocalMsg::Topology {
                    id: self.composer.my_id(),
                    peers,
                    optimise,
                };
                self.link.send(self.local.router, &msg);
                self.link.send(self.local.monitor, &msg);
            }
            if self.heard_router {
                self.steer(now);
            }
        }
    }

    /// Returns whether the table must be rebuilt.
    fn on_local(&mut self, msg: LocalMsg, from: SocketAddr) -> bool {
        match msg {
            LocalMsg::Send { hop, packet } if from == self.local.monitor => {
                let t = self.table.load();
                match t.peer_addr(hop) {
                    Some(addr) => {
                        if self.sockets.peer.send(addr, &packet, None).is_err() {
                            self.link.counters.send_errors.inc();
                        }
                    }
                    None => self.link.counters.send_errors.inc(),
                }
                false
            }
            LocalMsg::Routes {
                relays,
                unreachable,
            } if from == self.local.router => {
                let unreachable: BTreeSet<u32> = unreachable.into_iter().collect();
                let first = !std::mem::replace(&mut self.heard_router, true);
                if unreachable != self.unreachable || first {
                    self.unreachable = unreachable;
                    self.steerer.wake(self.start.elapsed());
                }
                if relays != self.relays {
                    self.relays = relays;
                    return true;
                }
                false
            }
            _ => {
                self.link.counters.malformed.inc();
                false
            }
        }
    }

    fn steer(&mut self, now: Duration) {
        let table: Arc<ForwardingTable> = self.table.load_full();
        if let Some(out) = self.steerer.message(now, &table, &self.unreachable) {
            if let Some((sock, port)) = &self.steer {
                for a in out.agents {
                    let _ = sock.send_to(&out.bytes, SocketAddr::V4(SocketAddrV4::new(a, *port)));
                }
            }
        }
    }
}
