//! A local link: one UDP socket, a reader thread that accepts datagrams only
//! from the configured partner addresses and queues them (bounded, dropping
//! and counting when full) for the daemon's control thread.

use pon_proto::local::{LocalMsg, MAX_LOCAL_LEN};
use std::net::{SocketAddr, UdpSocket};
use std::sync::mpsc::{SyncSender, TrySendError};
use std::sync::Arc;

pon_telemetry::counters! {
    pub struct LinkCounters {
        received => ("pon_local_messages_total", "dir=\"rx\"", "Local-link messages between the proxy's processes."),
        sent => ("pon_local_messages_total", "dir=\"tx\"", "Local-link messages between the proxy's processes."),
        foreign => ("pon_local_drops_total", "reason=\"foreign_source\"", "Local-link datagrams dropped, by reason."),
        malformed => ("pon_local_drops_total", "reason=\"malformed\"", "Local-link datagrams dropped, by reason."),
        queue_full => ("pon_local_drops_total", "reason=\"queue_full\"", "Local-link datagrams dropped, by reason."),
        send_errors => ("pon_local_drops_total", "reason=\"send_error\"", "Local-link datagrams dropped, by reason."),
    }
}

#[derive(Clone)]
pub struct Link {
    sock: Arc<UdpSocket>,
    pub counters: Arc<LinkCounters>,
}

impl Link {
    pub fn bind(addr: SocketAddr) -> std::io::Result<Self> {
        Ok(Link {
            sock: Arc::new(UdpSocket::bind(addr)?),
            counters: Arc::default(),
        })
    }

    pub fn send(&self, to: SocketAddr, msg: &LocalMsg) {
        match msg.encode().map(|b| self.sock.send_to(&b, to)) {
            Ok(Ok(_)) => self.counters.sent.inc(),
            _ => self.counters.send_errors.inc(),
        }
    }

    /// Starts the reader: messages from `allowed` go to `tx` as `wrap(msg, from)`.
    pub fn spawn_reader<E: std::marker::Send + 'static>(
        &self,
        allowed: Vec<SocketAddr>,
        tx: SyncSender<E>,
        wrap: fn(LocalMsg, SocketAddr) -> E,
    ) -> std::io::Result<()> {
        let (sock, c) = (self.sock.clone(), self.counters.clone());
        std::thread::Builder::new()
            .name("local-link".into())
            .spawn(move || {
                let mut buf = vec![0u8; MAX_LOCAL_LEN + 1];
                loop {
                    let (n, from) = match sock.recv_from(&mut buf) {
                        Ok(x) => x,
                        Err(e) => {
                            tracing::warn!(error = %e, "local link receive");
                            continue;
                        }
                    };
                    if !allowed.contains(&from) {
                        c.foreign.inc();
                        continue;
                    }
                    let Ok(msg) = LocalMsg::decode(&buf[..n]) else {
                        c.malformed.inc();
                        continue;
                    };
                    c.received.inc();
                    match tx.try_send(wrap(msg, from)) {
                        Ok(()) => {}
                        Err(TrySendError::Full(_)) => c.queue_full.inc(),
                        Err(TrySendError::Disconnected(_)) => return,
                    }
                }
            })?;
        Ok(())
    }
}
