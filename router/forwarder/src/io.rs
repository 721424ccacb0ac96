//! The forwarder's threads: each blocks on one socket, asks the engine what
//! to do with each packet, and sends. Receives are batched (`recvmmsg`, UDP
//! GRO), sends to the same peer are gathered into UDP GSO sends, and the
//! table is read through `ArcSwap::load` once per batch: no locks, channels
//! or allocation per packet.

use super::engine::{Decision, Engine, Output, BUFFER_LEN, HEADROOM, TAILROOM};
use pon_netio::udp::{GsoBatch, RecvBatch, SendError, UdpIo};
use pon_netio::{IpipReceiver, RawSender};
use pon_proto::pon::Kind;
use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::thread::{self, JoinHandle};

pub struct Sockets {
    /// PON packets from and to peer proxies.
    pub peer: UdpIo,
    /// IP-in-IP from local TAs.
    pub ipip_rx: IpipReceiver,
    /// IP-in-IP to local RAs.
    pub raw_tx: RawSender,
    /// The UDP variant of the agent legs, when enabled.
    pub agent_udp: Option<UdpIo>,
    /// Largest UDP payload that fits the underlay in one datagram.
    pub max_datagram: usize,
    /// Where packets for the proxy core (`Output::Core`: probes, handshake
    /// messages) and news of roaming peers go; `None` drops them.
    pub core: Option<CoreSink>,
}

/// What the forwarding threads hand to the proxy core. Runs on a
/// forwarding thread, so it must never block: queue (bounded) and count
/// what does not fit.
pub trait ToCore: Send + Sync {
    /// A probe, reply or handshake message that ended here, from `from`.
    fn packet(&self, kind: Kind, packet: &[u8], from: SocketAddr);
    /// Peer `peer` authenticated a datagram from `from`, which is not where
    /// the table has it: it roamed.
    fn peer_moved(&self, peer: u32, from: SocketAddr);
}

pub type CoreSink = Arc<dyn ToCore>;

/// Per-thread send state: a GSO batch per UDP socket.
struct Tx {
    peer: GsoBatch,
    agent: GsoBatch,
}

impl Sockets {
    fn tx(&self) -> Tx {
        Tx {
            peer: GsoBatch::new(self.max_datagram),
            agent: GsoBatch::new(self.max_datagram),
        }
    }

    fn agent_io(&self) -> &UdpIo {
        self.agent_udp.as_ref().unwrap_or(&self.peer)
    }

    fn transmit(&self, engine: &Engine, d: &Decision, buf: &[u8], tx: &mut Tx) {
        let pkt = &buf[d.range.clone()];
        let sent = match d.output {
            Output::Drop => return,
            // Only peers' packets end at the core (see `peer_loop`).
            Output::Core(_) => return,
            Output::Peer(addr) => tx.peer.push(&self.peer, addr, pkt),
            Output::AgentIpip(ip) => {
                self.raw_tx
                    .send_to(pkt, ip)
                    .map(drop)
                    .map_err(|error| SendError {
                        datagrams: 1,
                        error,
                    })
            }
            Output::AgentUdp(addr) => tx.agent.push(self.agent_io(), addr.into(), pkt),
        };
        match sent {
            // Batched datagrams are counted when their batch goes out.
            Ok(()) if matches!(d.output, Output::AgentIpip(_)) => engine.counters.tx_packets.inc(),
            Ok(()) => {}
            Err(e) => tx_error(engine, &e),
        }
    }

    /// Sends what the batches gathered; called before blocking again.
    fn flush(&self, engine: &Engine, tx: &mut Tx) {
        if let Err(e) = tx.peer.flush(&self.peer) {
            tx_error(engine, &e);
        }
        if let Err(e) = tx.agent.flush(self.agent_io()) {
            tx_error(engine, &e);
        }
        // Failed datagrams were counted by `tx_error` as their sends failed;
        // what went out is counted here, so each packet is counted once.
        let sent = tx.peer.take_sent() + tx.agent.take_sent();
        engine.counters.tx_packets.add(sent);
    }
}

/// Counts every packet a failed send lost (a GSO send carries many).
fn tx_error(engine: &Engine, e: &SendError) {
    engine
        .counters
        .tx_errors
        .add_and_warn(e.datagrams, "send failed", &e.error);
}

/// What a receive returned, or None after counting (and sparsely logging)
/// its error: the loops go on to the next receive.
fn received<T>(engine: &Engine, what: &str, r: io::Result<T>) -> Option<T> {
    r.map_err(|e| engine.counters.rx_errors.add_and_warn(1, what, &e))
        .ok()
}

/// PON packets from peers: transit and egress work in place inside the
/// received (possibly GRO-coalesced) buffer, segment by segment.
fn peer_loop(e: &Engine, s: &Sockets) {
    let mut rb = RecvBatch::default();
    let mut tx = s.tx();
    loop {
        let Some(n) = received(e, "peer recv failed", rb.recv(&s.peer)) else {
            continue;
        };
        let table = e.table.load();
        let sessions = e.sessions.load();
        for i in 0..n {
            let src = rb.source(i);
            let (buf, len, stride) = rb.message_mut(i);
            let mut off = 0;
            while off < len {
                let seg = stride.min(len - off);
                let mut moved = None;
                let d = e.from_peer_at(&table, &sessions, buf, off, seg, src, &mut moved);
                if let Some(core) = &s.core {
                    if let Some(peer) = moved {
                        core.peer_moved(peer, src);
                    }
                    if let Output::Core(kind) = d.output {
                        core.packet(kind, &buf[d.range.clone()], src);
                    }
                }
                s.transmit(e, &d, buf, &mut tx);
                off += seg;
            }
        }
        s.flush(e, &mut tx);
    }
}

/// IP-in-IP from local TAs: one packet per read (raw sockets have no GRO),
/// but sends are still gathered until the socket runs dry.
fn ipip_loop(e: &Engine, s: &Sockets) {
    let mut buf = vec![0u8; BUFFER_LEN];
    let mut tx = s.tx();
    let mut pending = false;
    loop {
        let window = &mut buf[HEADROOM..BUFFER_LEN - TAILROOM];
        let got = if pending {
            s.ipip_rx.try_recv(window)
        } else {
            s.ipip_rx.recv(window).map(Some)
        };
        let n = match received(e, "ipip recv failed", got) {
            Some(Some(n)) => n,
            Some(None) => {
                s.flush(e, &mut tx);
                pending = false;
                continue;
            }
            None => continue,
        };
        let d = e.from_agent_ipip(&e.table.load(), &e.sessions.load(), &mut buf, HEADROOM, n);
        s.transmit(e, &d, &buf, &mut tx);
        pending = true;
    }
}

/// UDP-encapsulated packets from local TAs; each GRO segment is copied
/// behind headroom so the PON header can be written in front of it.
fn agent_udp_loop(e: &Engine, s: &Sockets, sock: &UdpIo) {
    let mut rb = RecvBatch::default();
    let mut work = vec![0u8; BUFFER_LEN];
    let mut tx = s.tx();
    loop {
        let Some(n) = received(e, "agent udp recv failed", rb.recv(sock)) else {
            continue;
        };
        let table = e.table.load();
        let sessions = e.sessions.load();
        for i in 0..n {
            let src = rb.source(i);
            for datagram in rb.datagrams(i) {
                let len = datagram.len();
                work[HEADROOM..HEADROOM + len].copy_from_slice(datagram);
                let d = e.from_agent_udp(&table, &sessions, &mut work, HEADROOM, len, src);
                s.transmit(e, &d, &work, &mut tx);
            }
        }
        s.flush(e, &mut tx);
    }
}

/// Starts the forwarding threads; they run until the process exits.
pub fn spawn(engine: Arc<Engine>, sockets: Arc<Sockets>) -> io::Result<Vec<JoinHandle<()>>> {
    let mut threads = Vec::new();
    let (e, s) = (engine.clone(), sockets.clone());
    threads.push(
        thread::Builder::new()
            .name("fwd-peer".into())
            .spawn(move || peer_loop(&e, &s))?,
    );
    let (e, s) = (engine.clone(), sockets.clone());
    threads.push(
        thread::Builder::new()
            .name("fwd-agent-ipip".into())
            .spawn(move || ipip_loop(&e, &s))?,
    );
    if sockets.agent_udp.is_some() {
        let (e, s) = (engine, sockets);
        threads.push(
            thread::Builder::new()
                .name("fwd-agent-udp".into())
                .spawn(move || {
                    let sock = s.agent_udp.as_ref().expect("checked above");
                    agent_udp_loop(&e, &s, sock)
                })?,
        );
    }
    Ok(threads)
}
