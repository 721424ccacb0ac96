//! Two proxies' `Tunnels` (and an outsider who knows their ids but not
//! their keys) driven by arbitrary sequences of timeouts, handshake
//! messages delivered, dropped, replayed, altered or made up, keepalives,
//! and peer changes (revocation, a new key). Properties: no panic; a
//! handshake message is accepted only if it is byte for byte one the real
//! peer sent, each at most once; whenever both sides hold a session with
//! the same indices, what one seals the other opens (no key confusion);
//! every session is with a configured peer; after `handle_timeout(now)`
//! nothing is due at `now` (no busy loop).
//!
//! One harness, two drivers: the property test below (CI) and the fuzz
//! target `tunnels` in `fuzz/` (which includes this file).

use arbitrary::{Result, Unstructured};
use pon_tunnel::{generate_keypair, SessionTable, Timers, Transmit, Tunnels};
use std::collections::HashMap;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

/// Keys of proxies 1 and 2 and of an outsider, made once (key generation
/// is not what is tested).
fn keys() -> &'static [([u8; 32], [u8; 32]); 3] {
    static K: OnceLock<[([u8; 32], [u8; 32]); 3]> = OnceLock::new();
    K.get_or_init(|| [generate_keypair(), generate_keypair(), generate_keypair()])
}

struct Node {
    t: Tunnels,
    table: Arc<SessionTable>,
    peers: Vec<(u32, [u8; 32])>,
}

/// A handshake message in flight: (from, to, is_init, body).
type Msg = (u32, u32, bool, Vec<u8>);

struct World {
    nodes: [Node; 2],
    now: Duration,
    wire: Vec<Msg>,
    /// Bodies each side really sent, and how many times each was accepted.
    sent: HashMap<Vec<u8>, usize>,
    /// An outsider's tunnels, claiming to be proxy 1 or 2 in turn.
    outsider: Tunnels,
}

fn wall(now: Duration) -> u64 {
    1_700_000_000_000_000_000 + now.as_nanos() as u64
}

impl World {
    fn new() -> Self {
        let k = keys();
        let node = |me: u32, other: u32| {
            let mut t = Tunnels::new(me, k[me as usize - 1].0, Timers::default());
            t.set_peers(Duration::ZERO, &[(other, k[other as usize - 1].1)]);
            Node {
                t,
                table: Arc::default(),
                peers: vec![(other, k[other as usize - 1].1)],
            }
        };
        let mut outsider = Tunnels::new(1, k[2].0, Timers::default());
        outsider.set_peers(Duration::ZERO, &[(2, k[1].1)]);
        World {
            nodes: [node(1, 2), node(2, 1)],
            now: Duration::ZERO,
            wire: Vec::new(),
            sent: HashMap::new(),
            outsider,
        }
    }

    /// Collects what `i` wants sent; a keepalive is sealed and opened at once
    /// (the data path's confirmation).
    fn collect(&mut self, i: usize) {
        let from = i as u32 + 1;
        while let Some(m) = self.nodes[i].t.poll_transmit() {
            match m {
                Transmit::Init { to, body } => {
                    self.sent.insert(body.to_vec(), 0);
                    self.wire.push((from, to, true, body.to_vec()));
                }
                Transmit::Response { to, body } => {
                    self.sent.insert(body.to_vec(), 0);
                    self.wire.push((from, to, false, body.to_vec()));
                }
                Transmit::Keepalive { to } => {
                    self.refresh();
                    let (a, b) = (&self.nodes[i].table, &self.nodes[to as usize - 1].table);
                    if let Some(s) = a.sender(to) {
                        if let Some(r) = b.session(s.remote_index()) {
                            let c = s.next_counter().unwrap();
                            let tag = s.tag(c, b"keepalive");
                            let _ = r.verify(c, b"keepalive", &tag);
                        }
                    }
                }
            }
        }
        self.wire.truncate(64);
    }

    fn refresh(&mut self) {
        for n in &mut self.nodes {
            if let Some(t) = n.t.poll_table() {
                n.table = t;
            }
        }
    }

    /// Sessions are with configured peers, and matching sessions share keys.
    fn check(&mut self) {
        self.refresh();
        for i in 0..2 {
            let (me, other) = (&self.nodes[i], &self.nodes[1 - i]);
            for p in me.table.peers() {
                assert!(
                    me.peers.iter().any(|x| x.0 == p),
                    "a session with a stranger {p}"
                );
            }
            let peer = 2 - i as u32;
            if let Some(s) = me.table.sender(peer) {
                if let Some(r) = other.table.session(s.remote_index()) {
                    assert_eq!(r.peer(), i as u32 + 1);
                    assert_eq!(r.remote_index(), s.local_index(), "crossed indices");
                    let c = s.next_counter().unwrap();
                    let mut data = *b"payload.";
                    let tag = s.seal(c, b"aad", &mut data);
                    let mut sealed = data.to_vec();
                    sealed.extend_from_slice(&tag);
                    assert!(r.open(c, b"aad", &mut sealed).is_ok(), "keys differ");
                    assert_eq!(&sealed[..8], b"payload.");
                }
            }
        }
    }

    fn handle(&mut self, to: u32, from: u32, init: bool, body: &[u8]) {
        let n = &mut self.nodes[to as usize - 1];
        let r = if init {
            n.t.handle_init(self.now, from, body)
        } else {
            n.t.handle_response(self.now, from, body)
        };
        if r.is_ok() {
            let times = self.sent.get_mut(body).unwrap_or_else(|| {
                panic!("accepted a handshake message no peer sent: init {init} from {from} to {to}")
            });
            *times += 1;
            assert_eq!(
                *times, 1,
                "accepted a handshake message twice: init {init} from {from} to {to}"
            );
        }
        self.collect(to as usize - 1);
    }

    fn step(&mut self, u: &mut Unstructured) -> Result<()> {
        match u.int_in_range(0..=7u8)? {
            0 | 1 => {
                self.now += Duration::from_millis(u.int_in_range(0..=70_000)?);
                let i = u.int_in_range(0..=1)?;
                let now = self.now;
                self.nodes[i].t.handle_timeout(now, wall(now));
                if let Some(next) = self.nodes[i].t.poll_timeout() {
                    assert!(next > now, "due again at once: a busy loop");
                }
                self.collect(i);
            }
            2 | 3 if !self.wire.is_empty() => {
                let k = u.choose_index(self.wire.len())?;
                let (from, to, init, mut body) = if u.ratio(1, 2)? {
                    self.wire.swap_remove(k)
                } else {
                    self.wire[k].clone()
                };
                if u.ratio(1, 4)? && !body.is_empty() {
                    let at = u.choose_index(body.len())?;
                    body[at] ^= u.int_in_range(1..=255)?;
                }
                let claimed = if u.ratio(1, 8)? {
                    u.int_in_range(0..=3)?
                } else {
                    from
                };
                if (1..=2).contains(&to) {
                    self.handle(to, claimed, init, &body);
                }
            }
            4 => {
                let n = u.int_in_range(0..=120)?;
                let body = u.bytes(n)?.to_vec();
                let (to, from, init) = (
                    u.int_in_range(1..=2)?,
                    u.int_in_range(0..=3)?,
                    u.arbitrary()?,
                );
                self.handle(to, from, init, &body);
            }
            5 => {
                // The outsider initiates to 2 claiming to be 1.
                let now = self.now;
                self.outsider.handle_timeout(now, wall(now) + 1_000_000_000);
                while let Some(m) = self.outsider.poll_transmit() {
                    if let Transmit::Init { body, .. } = m {
                        // Legitimate only where 2 was told the outsider's key.
                        if self.nodes[1].peers.contains(&(1, keys()[2].1)) {
                            self.sent.insert(body.to_vec(), 0);
                        }
                        self.handle(2, 1, true, &body);
                    }
                }
            }
            6 => {
                // A peer change: revoked, back, or with another key.
                let i = u.int_in_range(0..=1)?;
                let other = 2 - i as u32;
                let k = keys();
                let peers = match u.int_in_range(0..=2u8)? {
                    0 => vec![],
                    1 => vec![(other, k[other as usize - 1].1)],
                    _ => vec![(other, k[2].1)],
                };
                self.nodes[i].peers = peers.clone();
                self.nodes[i].t.set_peers(self.now, &peers);
            }
            _ => self.now += Duration::from_millis(u.int_in_range(0..=100)?),
        }
        self.check();
        Ok(())
    }
}

/// Runs one arbitrary sequence of events (at most 64).
pub fn run(data: &[u8]) {
    let mut u = Unstructured::new(data);
    let mut w = World::new();
    for _ in 0..64 {
        if u.is_empty() || w.step(&mut u).is_err() {
            break;
        }
    }
}

#[cfg(test)]
mod properties {
    use proptest::prelude::*;

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(8))]
        #[test]
        fn handshakes_accept_only_what_the_peer_sent(data in proptest::collection::vec(any::<u8>(), 0..512)) {
            super::run(&data);
        }
    }
}
