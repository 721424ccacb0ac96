//! The forwarder's threads: each blocks on one socket, asks the engine what
//! to do with the packet in its own buffer, and sends. No locks, channels or
//! allocation per packet; the table is read through `ArcSwap::load`.

use super::engine::{Decision, Engine, Output, BUFFER_LEN, HEADROOM, TAILROOM};
use pon_netio::{IpipReceiver, RawSender};
use std::io;
use std::net::UdpSocket;
use std::sync::Arc;
use std::thread::{self, JoinHandle};

pub struct Sockets {
    /// PON packets from and to peer proxies.
    pub peer: UdpSocket,
    /// IP-in-IP from local TAs.
    pub ipip_rx: IpipReceiver,
    /// IP-in-IP to local RAs.
    pub raw_tx: RawSender,
    /// The UDP variant of the agent legs, when enabled.
    pub agent_udp: Option<UdpSocket>,
}

impl Sockets {
    fn transmit(&self, engine: &Engine, d: &Decision, buf: &[u8]) {
        let pkt = &buf[d.range.clone()];
        let sent = match d.output {
            Output::Drop => return,
            Output::Peer(addr) => self.peer.send_to(pkt, addr),
            Output::AgentIpip(ip) => self.raw_tx.send_to(pkt, ip),
            Output::AgentUdp(addr) => match &self.agent_udp {
                Some(s) => s.send_to(pkt, addr),
                None => self.peer.send_to(pkt, addr),
            },
        };
        if let Err(e) = sent {
            engine.counters.tx_errors.inc();
            log_sparsely(&engine.counters.tx_errors, "send failed", &e);
        }
    }
}

/// Logs the 1st, 2nd, 4th, 8th... occurrence, so a storm cannot flood the log.
fn log_sparsely(counter: &pon_telemetry::Counter, what: &str, e: &io::Error) {
    let n = counter.get();
    if n.is_power_of_two() {
        tracing::warn!(error = %e, occurrences = n, "{what}");
    }
}

fn receive_window(buf: &mut [u8]) -> &mut [u8] {
    &mut buf[HEADROOM..BUFFER_LEN - TAILROOM]
}

/// Starts the forwarding threads; they run until the process exits.
pub fn spawn(engine: Arc<Engine>, sockets: Arc<Sockets>) -> io::Result<Vec<JoinHandle<()>>> {
    let mut threads = Vec::new();

    let (e, s) = (engine.clone(), sockets.clone());
    threads.push(
        thread::Builder::new()
            .name("fwd-peer".into())
            .spawn(move || {
                let mut buf = vec![0u8; BUFFER_LEN];
                loop {
                    let (n, src) = match s.peer.recv_from(receive_window(&mut buf)) {
                        Ok(r) => r,
                        Err(err) => {
                            e.counters.rx_errors.inc();
                            log_sparsely(&e.counters.rx_errors, "peer recv failed", &err);
                            continue;
                        }
                    };
                    let d = e.from_peer(&e.table.load(), &mut buf, HEADROOM, n, src);
                    s.transmit(&e, &d, &buf);
                }
            })?,
    );

    let (e, s) = (engine.clone(), sockets.clone());
    threads.push(
        thread::Builder::new()
            .name("fwd-agent-ipip".into())
            .spawn(move || {
                let mut buf = vec![0u8; BUFFER_LEN];
                loop {
                    let n = match s.ipip_rx.recv(receive_window(&mut buf)) {
                        Ok(n) => n,
                        Err(err) => {
                            e.counters.rx_errors.inc();
                            log_sparsely(&e.counters.rx_errors, "ipip recv failed", &err);
                            continue;
                        }
                    };
                    let d = e.from_agent_ipip(&e.table.load(), &mut buf, HEADROOM, n);
                    s.transmit(&e, &d, &buf);
                }
            })?,
    );

    if sockets.agent_udp.is_some() {
        let (e, s) = (engine, sockets);
        threads.push(
            thread::Builder::new()
                .name("fwd-agent-udp".into())
                .spawn(move || {
                    let sock = s.agent_udp.as_ref().expect("checked above");
                    let mut buf = vec![0u8; BUFFER_LEN];
                    loop {
                        let (n, src) = match sock.recv_from(receive_window(&mut buf)) {
                            Ok(r) => r,
                            Err(err) => {
                                e.counters.rx_errors.inc();
                                log_sparsely(&e.counters.rx_errors, "agent udp recv failed", &err);
                                continue;
                            }
                        };
                        let d = e.from_agent_udp(&e.table.load(), &mut buf, HEADROOM, n, src);
                        s.transmit(&e, &d, &buf);
                    }
                })?,
        );
    }
    Ok(threads)
}
