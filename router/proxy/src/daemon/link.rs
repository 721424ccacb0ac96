//! The local link between a split proxy's processes: one UDP socket per
//! daemon, and a reader thread that accepts datagrams only from the other
//! parts' configured addresses, decodes them and posts them to the
//! daemon's mailbox (never waiting on it).

use super::mailbox::{Input, Mailbox};
use super::DaemonCounters;
use crate::core::Part;
use pon_proto::local::{LocalMsg, MAX_LOCAL_LEN};
use std::net::{SocketAddr, UdpSocket};
use std::sync::Arc;

/// A daemon's end of the local link, and where the other parts listen.
#[derive(Clone)]
pub struct Link {
    sock: Arc<UdpSocket>,
    partners: Vec<(Part, SocketAddr)>,
    pub counters: Arc<DaemonCounters>,
}

impl Link {
    pub fn bind(
        listen: SocketAddr,
        partners: Vec<(Part, SocketAddr)>,
        counters: Arc<DaemonCounters>,
    ) -> std::io::Result<Self> {
        Ok(Link {
            sock: Arc::new(UdpSocket::bind(listen)?),
            partners,
            counters,
        })
    }

    pub fn send(&self, to: Part, msg: &LocalMsg) {
        let Some(addr) = self.partners.iter().find(|p| p.0 == to).map(|p| p.1) else {
            self.counters.local_no_partner.inc();
            return;
        };
        match msg.encode().map(|b| self.sock.send_to(&b, addr)) {
            Ok(Ok(_)) => self.counters.local_sent.inc(),
            _ => self.counters.local_send_errors.inc(),
        }
    }

    /// Starts the reader: messages from a partner go to `mailbox`, tagged
    /// with the part that sent them.
    pub fn spawn_reader(&self, mailbox: Mailbox) -> std::io::Result<()> {
        let link = self.clone();
        std::thread::Builder::new()
            .name("local-link".into())
            .spawn(move || {
                let mut buf = vec![0u8; MAX_LOCAL_LEN + 1];
                loop {
                    let (n, from) = match link.sock.recv_from(&mut buf) {
                        Ok(x) => x,
                        Err(e) => {
                            tracing::warn!(error = %e, "local link receive");
                            continue;
                        }
                    };
                    if let Some(input) = link.accept(&buf[..n], from) {
                        mailbox.post(input);
                    }
                }
            })?;
        Ok(())
    }

    /// A datagram from `from`: a message from one of our partners, or
    /// nothing (counted).
    fn accept(&self, bytes: &[u8], from: SocketAddr) -> Option<Input> {
        let Some(part) = self.partners.iter().find(|p| p.1 == from).map(|p| p.0) else {
            self.counters.local_foreign.inc();
            return None;
        };
        let Ok(msg) = LocalMsg::decode(bytes) else {
            self.counters.local_malformed.inc();
            return None;
        };
        self.counters.local_received.inc();
        Some(Input::Local(part, msg))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_partners_are_heard_and_garbage_is_counted() {
        let monitor: SocketAddr = "127.0.0.1:1".parse().unwrap();
        let link = Link::bind(
            "127.0.0.1:0".parse().unwrap(),
            vec![(Part::Monitor, monitor)],
            Arc::default(),
        )
        .unwrap();
        let msg = LocalMsg::Arrived(vec![1, 2, 3]).encode().unwrap();
        let stranger: SocketAddr = "127.0.0.1:2".parse().unwrap();
        assert!(link.accept(&msg, stranger).is_none());
        assert!(link.accept(&[0xff, 0xff, 0xff], monitor).is_none());
        assert!(matches!(
            link.accept(&msg, monitor),
            Some(Input::Local(Part::Monitor, LocalMsg::Arrived(_)))
        ));
        assert_eq!(
            (
                link.counters.local_foreign.get(),
                link.counters.local_malformed.get(),
                link.counters.local_received.get()
            ),
            (1, 1, 1)
        );
        // No router configured: a message for it is counted, not sent.
        link.send(Part::Router, &LocalMsg::Arrived(vec![]));
        assert_eq!(link.counters.local_no_partner.get(), 1);
    }
}
