//! The TA's steering state driven by arbitrary sequences of datagrams
//! (whole and multi-part messages, stale, replayed, from strangers,
//! malformed), silences and changes of forwarder. Properties: no panic;
//! only the followed forwarder's messages apply; what applies is strictly
//! newer, in (epoch, seq), than what applied before, except after the
//! lease expired (a restarted proxy) or a change of forwarder; an applied
//! set holds only prefixes sent in parts of that very message; the lease
//! expires once per silence, and only after [`LEASE`] without a message.
//!
//! One harness, two drivers: the property test below (CI) and the fuzz
//! target `steering` in `fuzz/` (which includes this file).

use arbitrary::{Result, Unstructured};
use ipnet::{IpNet, Ipv4Net};
use pon_agents::steering::{SteeringCounters, SteeringState, LEASE};
use pon_proto::steering::{Steering, STEERING_VERSION};
use std::collections::HashMap;
use std::net::{Ipv4Addr, SocketAddr};
use std::time::Duration;

const FORWARDERS: [Ipv4Addr; 2] = [Ipv4Addr::new(198, 18, 1, 1), Ipv4Addr::new(198, 18, 1, 2)];

struct World {
    s: SteeringState,
    c: SteeringCounters,
    now: Duration,
    following: Ipv4Addr,
    /// The (epoch, seq) last applied, unless a restart may come next.
    floor: Option<(u64, u64)>,
    /// When a message was last accepted, and whether the lease expired since.
    heard: Option<Duration>,
    expired: bool,
    /// Prefixes sent from the followed forwarder, by (epoch, seq, parts).
    sent: HashMap<(u64, u64, u16), Vec<IpNet>>,
}

fn message(u: &mut Unstructured) -> Result<Steering> {
    let parts = u.int_in_range(1..=3)?;
    let n = u.int_in_range(0..=3)?;
    let bypass = (0..n)
        .map(|_| {
            Ok((
                Ipv4Addr::new(10, 0, u.int_in_range(0..=3)?, 0),
                u.int_in_range(8..=32)?,
            ))
        })
        .collect::<Result<_>>()?;
    Ok(Steering {
        version: STEERING_VERSION,
        epoch: u.int_in_range(1..=3)?,
        seq: u.int_in_range(0..=6)?,
        part: u.int_in_range(0..=parts - 1)?,
        parts,
        bypass,
    })
}

impl World {
    fn new() -> Self {
        let mut s = SteeringState::default();
        assert_eq!(s.follow(FORWARDERS[0]), None);
        World {
            s,
            c: SteeringCounters::default(),
            now: Duration::ZERO,
            following: FORWARDERS[0],
            floor: None,
            heard: None,
            expired: false,
            sent: HashMap::new(),
        }
    }

    fn datagram(&mut self, bytes: &[u8], from: Ipv4Addr) {
        let decoded = Steering::decode(bytes).ok();
        if let (Some(m), true) = (&decoded, from == self.following) {
            let nets = m
                .bypass
                .iter()
                .filter_map(|(a, l)| Ipv4Net::new(*a, *l).ok().map(IpNet::V4));
            self.sent
                .entry((m.epoch, m.seq, m.parts))
                .or_default()
                .extend(nets);
        }
        let accepted = self.c.accepted.get();
        let got = self
            .s
            .on_datagram(bytes, SocketAddr::from((from, 7303)), self.now, &self.c);
        if self.c.accepted.get() > accepted {
            assert_eq!(from, self.following, "accepted from a stranger");
            self.heard = Some(self.now);
            self.expired = false;
        }
        let Some(set) = got else { return };
        assert_eq!(from, self.following, "applied a stranger's set");
        let m = decoded.expect("only a decodable message applies");
        let key = (m.epoch, m.seq);
        if let Some(floor) = self.floor {
            assert!(key > floor, "applied {key:?} after {floor:?}: not newer");
        }
        self.floor = Some(key);
        let sent = &self.sent[&(m.epoch, m.seq, m.parts)];
        assert!(
            set.iter().all(|n| sent.contains(n)),
            "a prefix that message {key:?} never carried"
        );
    }

    fn step(&mut self, u: &mut Unstructured) -> Result<()> {
        match u.int_in_range(0..=6u8)? {
            0..=2 => {
                let m = message(u)?;
                let from = if u.ratio(1, 6)? {
                    Ipv4Addr::new(198, 18, 1, u.arbitrary()?)
                } else {
                    self.following
                };
                let bytes = m.encode().expect("small messages encode");
                self.datagram(&bytes, from);
            }
            3 => {
                let n = u.arbitrary_len::<u8>()?.min(1500);
                let bytes = u.bytes(n)?.to_vec();
                self.datagram(&bytes, self.following);
            }
            4 => {
                self.now += Duration::from_millis(u.int_in_range(0..=4000)?);
                let got = self.s.on_silence(self.now, &self.c);
                if got.is_some() {
                    let heard = self.heard.expect("a lease only once a proxy spoke");
                    assert!(self.now - heard >= LEASE, "lease expired early");
                    assert!(!self.expired, "expired twice in one silence");
                    self.expired = true;
                    // A proxy that restarted with an older clock may speak next.
                    self.floor = None;
                }
            }
            5 => self.now += Duration::from_millis(u.int_in_range(0..=1000)?),
            _ => {
                let f = *u.choose(&FORWARDERS)?;
                let undo = self.s.follow(f);
                if f != self.following {
                    assert_eq!(undo, Some(vec![]), "a new forwarder starts clean");
                    self.following = f;
                    self.floor = None;
                    self.heard = None;
                    self.expired = false;
                    self.sent.clear();
                } else {
                    assert_eq!(undo, None);
                }
            }
        }
        Ok(())
    }
}

/// Runs one arbitrary sequence of events (at most 128).
pub fn run(data: &[u8]) {
    let mut u = Unstructured::new(data);
    let mut w = World::new();
    for _ in 0..128 {
        if u.is_empty() || w.step(&mut u).is_err() {
            break;
        }
    }
}

#[cfg(test)]
mod properties {
    use proptest::prelude::*;

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(512))]
        #[test]
        fn steering_only_moves_forward(data in proptest::collection::vec(any::<u8>(), 0..2048)) {
            super::run(&data);
        }
    }
}
