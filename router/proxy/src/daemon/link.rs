//! The local link between a split proxy's processes: one UDP socket per
//! daemon, and a reader thread that accepts datagrams only from the other
//! parts, decodes them and posts them to the daemon's mailbox (never
//! waiting on it).
//!
//! The parts may run on different hosts, so a source address proves
//! nothing: every message is sealed as a site-LAN datagram
//! (`pon_tunnel::lan`) under a key per pair of parts and direction, from
//! the two parts' static keys (each in its own state directory; each
//! configuration names the others' public keys, as WireGuard peers are
//! named). A datagram that does not authenticate, replays an earlier one or
//! comes from an earlier run of its sender is dropped and counted before it
//! is decoded.

use super::mailbox::{Input, Mailbox};
use super::DaemonCounters;
use crate::core::Part;
use pon_proto::control::PublicKey;
use pon_proto::lan::{HEADER_LEN, OVERHEAD};
use pon_proto::local::{LocalMsg, MAX_LOCAL_LEN};
use pon_tunnel::lan::{Channel, LanError, LanReceiver, LanSender, PairKey};
use std::net::{SocketAddr, UdpSocket};
use std::sync::Arc;

/// Another part of the proxy: where it listens and its static public key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Partner {
    pub part: Part,
    pub addr: SocketAddr,
    pub key: PublicKey,
}

/// What this end keeps per partner: the keys of both directions.
struct Keys {
    part: Part,
    addr: SocketAddr,
    tx: LanSender,
    rx: LanReceiver,
}

/// A daemon's end of the local link.
#[derive(Clone)]
pub struct Link {
    sock: Arc<UdpSocket>,
    partners: Arc<Vec<Keys>>,
    pub counters: Arc<DaemonCounters>,
}

impl Link {
    /// Binds `listen` for part `me`, whose static secret is `secret`;
    /// `epoch` names this run (it must grow across restarts: the
    /// partners refuse an older one).
    pub fn bind(
        listen: SocketAddr,
        me: Part,
        secret: &[u8; 32],
        epoch: u64,
        partners: &[Partner],
        counters: Arc<DaemonCounters>,
    ) -> anyhow::Result<Self> {
        let partners = partners
            .iter()
            .map(|p| keys(me, secret, epoch, p))
            .collect::<anyhow::Result<Vec<_>>>()?;
        Ok(Link {
            sock: Arc::new(UdpSocket::bind(listen)?),
            partners: Arc::new(partners),
            counters,
        })
    }

    pub fn send(&self, to: Part, msg: &LocalMsg) {
        let Some(p) = self.partners.iter().find(|p| p.part == to) else {
            self.counters.local_no_partner.inc();
            return;
        };
        let Ok(body) = msg.encode() else {
            self.counters.local_send_errors.inc();
            return;
        };
        let mut buf = vec![0u8; body.len() + OVERHEAD];
        buf[HEADER_LEN..HEADER_LEN + body.len()].copy_from_slice(&body);
        match p.tx.seal(&mut buf, body.len()) {
            Some(n) if self.sock.send_to(&buf[..n], p.addr).is_ok() => {
                self.counters.local_sent.inc()
            }
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
                let mut buf = vec![0u8; MAX_LOCAL_LEN + OVERHEAD + 1];
                loop {
                    let (n, from) = match link.sock.recv_from(&mut buf) {
                        Ok(x) => x,
                        Err(e) => {
                            tracing::warn!(error = %e, "local link receive");
                            continue;
                        }
                    };
                    if let Some(input) = link.accept(&mut buf[..n], from) {
                        mailbox.post(input);
                    }
                }
            })?;
        Ok(())
    }

    /// A datagram from `from`: an authenticated message from one of our
    /// partners, or nothing (counted by reason).
    fn accept(&self, bytes: &mut [u8], from: SocketAddr) -> Option<Input> {
        let Some(p) = self.partners.iter().find(|p| p.addr == from) else {
            self.counters.local_foreign.inc();
            return None;
        };
        let body = match p.rx.open(bytes) {
            Ok(r) => r,
            Err(e) => {
                match e {
                    LanError::Malformed(_) => &self.counters.local_malformed,
                    LanError::BadTag => &self.counters.local_bad_tag,
                    LanError::Replayed => &self.counters.local_replayed,
                    LanError::StaleEpoch => &self.counters.local_stale_epoch,
                }
                .inc();
                return None;
            }
        };
        let Ok(msg) = LocalMsg::decode(&bytes[body]) else {
            self.counters.local_malformed.inc();
            return None;
        };
        self.counters.local_received.inc();
        Some(Input::Local(p.part, msg))
    }
}

/// The keys between `me` and `p`: the lower part of the two is the pair's
/// `for_proxy` side and sends on `LocalDown`.
fn keys(me: Part, secret: &[u8; 32], epoch: u64, p: &Partner) -> anyhow::Result<Keys> {
    anyhow::ensure!(p.part != me, "{me:?} cannot be its own partner");
    let lower = me < p.part;
    let pair = if lower {
        PairKey::for_proxy(secret, &p.key.0)
    } else {
        PairKey::for_agent(secret, &p.key.0)
    }
    .ok_or_else(|| anyhow::anyhow!("the {:?}'s public key {} is not usable", p.part, p.key))?;
    let (send, receive) = if lower {
        (Channel::LocalDown, Channel::LocalUp)
    } else {
        (Channel::LocalUp, Channel::LocalDown)
    };
    Ok(Keys {
        part: p.part,
        addr: p.addr,
        tx: pair.sender(send, epoch, false),
        rx: pair.receiver(receive),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use pon_tunnel::lan::public_key;

    const FORWARDER: [u8; 32] = [1; 32];
    const MONITOR: [u8; 32] = [2; 32];

    fn link(me: Part, secret: &[u8; 32], epoch: u64, partners: &[Partner]) -> Link {
        Link::bind(
            "127.0.0.1:0".parse().unwrap(),
            me,
            secret,
            epoch,
            partners,
            Arc::default(),
        )
        .unwrap()
    }

    fn partner(part: Part, link: &Link, secret: &[u8; 32]) -> Partner {
        Partner {
            part,
            addr: link.sock.local_addr().unwrap(),
            key: PublicKey(public_key(secret)),
        }
    }

    /// The next datagram `link` receives.
    fn receive(link: &Link) -> (Vec<u8>, SocketAddr) {
        let mut buf = vec![0u8; 4096];
        link.sock
            .set_read_timeout(Some(std::time::Duration::from_secs(5)))
            .unwrap();
        let (n, from) = link.sock.recv_from(&mut buf).unwrap();
        buf.truncate(n);
        (buf, from)
    }

    fn drops(l: &Link) -> [u64; 5] {
        let c = &l.counters;
        [
            c.local_foreign.get(),
            c.local_malformed.get(),
            c.local_bad_tag.get(),
            c.local_replayed.get(),
            c.local_stale_epoch.get(),
        ]
    }

    #[test]
    fn only_authenticated_partners_are_heard_and_the_rest_is_counted() {
        // A forwarder and a monitor that know each other's keys.
        let placeholder = Partner {
            part: Part::Monitor,
            addr: "127.0.0.1:1".parse().unwrap(),
            key: PublicKey(public_key(&MONITOR)),
        };
        let fwd0 = link(Part::Forwarder, &FORWARDER, 1, &[placeholder]);
        let mon = link(
            Part::Monitor,
            &MONITOR,
            1,
            &[partner(Part::Forwarder, &fwd0, &FORWARDER)],
        );
        let fwd = Link {
            partners: Arc::new(vec![keys(
                Part::Forwarder,
                &FORWARDER,
                1,
                &partner(Part::Monitor, &mon, &MONITOR),
            )
            .unwrap()]),
            ..fwd0
        };
        fwd.send(Part::Monitor, &LocalMsg::Arrived(vec![1, 2, 3]));
        let (mut d, from) = receive(&mon);
        let sealed = d.clone();
        assert!(matches!(
            mon.accept(&mut d, from),
            Some(Input::Local(Part::Forwarder, LocalMsg::Arrived(b))) if b == [1, 2, 3]
        ));
        // Replayed, from a stranger, altered, unsealed, or garbage.
        assert!(mon.accept(&mut sealed.clone(), from).is_none());
        let stranger: SocketAddr = "127.0.0.1:2".parse().unwrap();
        assert!(mon.accept(&mut sealed.clone(), stranger).is_none());
        let mut altered = sealed.clone();
        altered[HEADER_LEN] ^= 1;
        altered[12..20].copy_from_slice(&7u64.to_be_bytes());
        assert!(mon.accept(&mut altered, from).is_none());
        let mut plain = LocalMsg::Arrived(vec![1]).encode().unwrap();
        assert!(mon.accept(&mut plain, from).is_none());
        assert!(mon.accept(&mut [0xff; 3], from).is_none());
        assert_eq!(drops(&mon), [1, 2, 1, 1, 0]);
        assert_eq!(mon.counters.local_received.get(), 1);

        // The other direction works the same way.
        mon.send(Part::Forwarder, &LocalMsg::Arrived(vec![9]));
        let (mut d, from) = receive(&fwd);
        assert!(matches!(
            fwd.accept(&mut d, from),
            Some(Input::Local(Part::Monitor, LocalMsg::Arrived(b))) if b == [9]
        ));

        // A key the monitor does not trust, from the forwarder's address.
        let impostor = Link {
            partners: Arc::new(vec![keys(
                Part::Forwarder,
                &[3; 32],
                5,
                &partner(Part::Monitor, &mon, &MONITOR),
            )
            .unwrap()]),
            ..fwd.clone()
        };
        impostor.send(Part::Monitor, &LocalMsg::Arrived(vec![6]));
        let (mut d, from) = receive(&mon);
        assert!(mon.accept(&mut d, from).is_none());
        assert_eq!(drops(&mon)[2], 2, "bad tag");

        // A previous run of the forwarder (a smaller epoch) is refused once
        // the monitor has heard a newer one.
        let restarted = Link {
            partners: Arc::new(vec![keys(
                Part::Forwarder,
                &FORWARDER,
                9,
                &partner(Part::Monitor, &mon, &MONITOR),
            )
            .unwrap()]),
            ..fwd.clone()
        };
        restarted.send(Part::Monitor, &LocalMsg::Arrived(vec![]));
        let (mut d, from) = receive(&mon);
        assert!(mon.accept(&mut d, from).is_some());
        fwd.send(Part::Monitor, &LocalMsg::Arrived(vec![]));
        let (mut d, from) = receive(&mon);
        assert!(mon.accept(&mut d, from).is_none());
        assert_eq!(drops(&mon)[4], 1, "stale epoch");

        // No router configured: a message for it is counted, not sent.
        fwd.send(Part::Router, &LocalMsg::Arrived(vec![]));
        assert_eq!(fwd.counters.local_no_partner.get(), 1);
    }

    #[test]
    fn an_unusable_partner_key_is_a_clear_error() {
        let bad = Partner {
            part: Part::Router,
            addr: "127.0.0.1:1".parse().unwrap(),
            key: PublicKey([0; 32]),
        };
        let e = Link::bind(
            "127.0.0.1:0".parse().unwrap(),
            Part::Monitor,
            &MONITOR,
            1,
            &[bad],
            Arc::default(),
        )
        .err()
        .unwrap();
        assert!(e.to_string().contains("Router's public key"), "{e}");
    }
}
