//! A TA's steering state (`SteeringState`) driven by arbitrary sequences
//! of: messages its proxy really sends (one or several parts, parts lost,
//! duplicated or reordered), restarts of that proxy (a newer epoch),
//! captured datagrams replayed or altered, datagrams from another source
//! address, messages sealed with a key that is not the proxy's, arbitrary
//! bytes, and time passing (the lease).
//!
//! Properties: no panic; every bypass set the TA applies is exactly the
//! set of a message the real proxy sent, whole; each such message is
//! applied at most once and, until the proxy falls silent for the lease,
//! only if strictly newer than the last one applied; nothing an attacker
//! made is ever applied; the lease expires once per silence; no more sets
//! are applied than the rate limit allows.
//!
//! One harness, two drivers: the property test below (CI) and the fuzz
//! target `steering` in `fuzz/` (which includes this file).

use arbitrary::{Result, Unstructured};
use ipnet::IpNet;
use pon_agents::steering::{SteeringCounters, SteeringState, APPLY_BURST, APPLY_PER_SEC, LEASE};
use pon_proto::control::PublicKey;
use pon_proto::lan::{HEADER_LEN, OVERHEAD};
use pon_proto::steering::Steering;
use pon_tunnel::lan::{public_key, Channel, LanSender, PairKey};
use std::collections::BTreeMap;
use std::net::{Ipv4Addr, SocketAddr};
use std::time::Duration;

const TA: [u8; 32] = [5; 32];
const PROXY: [u8; 32] = [7; 32];
const ATTACKER: [u8; 32] = [9; 32];

fn forwarder() -> SocketAddr {
    "198.18.1.1:7303".parse().expect("literal")
}

/// A message's identity: (epoch, sequence).
type Key = (u64, u64);

struct World {
    ta: SteeringState,
    c: SteeringCounters,
    now: Duration,
    /// The real proxy: its run's sender, epoch and next sequence.
    sender: LanSender,
    epoch: u64,
    seq: u64,
    /// Every whole message the real proxy sent: its set, and whether the
    /// TA applied it.
    sent: BTreeMap<Key, (Vec<IpNet>, bool)>,
    /// Datagrams seen on the LAN, for replays and alterations.
    captured: Vec<Vec<u8>>,
    /// The last message applied, and whether the lease expired since.
    last: Option<Key>,
    expired_since: bool,
    /// When each set was applied (for the rate limit).
    applied_at: Vec<Duration>,
    encrypt: bool,
}

fn seal(sender: &LanSender, m: &Steering) -> Vec<u8> {
    let body = m.encode().expect("valid message");
    let mut d = vec![0u8; body.len() + OVERHEAD];
    d[HEADER_LEN..HEADER_LEN + body.len()].copy_from_slice(&body);
    let n = sender.seal(&mut d, body.len()).expect("room");
    d.truncate(n);
    d
}

fn pair(proxy: &[u8; 32]) -> PairKey {
    PairKey::for_proxy(proxy, &public_key(&TA)).expect("contributory")
}

impl World {
    fn new(encrypt: bool) -> Self {
        let mut ta = SteeringState::new(TA);
        let first = ta.follow(
            Ipv4Addr::new(198, 18, 1, 1),
            Some(PublicKey(public_key(&PROXY))),
        );
        assert!(first.is_none(), "the first forwarder resets nothing");
        let epoch = 1_000;
        World {
            ta,
            c: SteeringCounters::default(),
            now: Duration::ZERO,
            sender: pair(&PROXY).sender(Channel::Steering, epoch, encrypt),
            epoch,
            seq: 0,
            sent: BTreeMap::new(),
            captured: Vec::new(),
            last: None,
            expired_since: false,
            applied_at: Vec::new(),
            encrypt,
        }
    }

    /// Hands `d`, from `from`, to the TA and checks what it applies.
    fn deliver(&mut self, mut d: Vec<u8>, from: SocketAddr, genuine: bool) {
        self.captured.push(d.clone());
        let Some(set) = self.ta.on_datagram(&mut d, from, self.now, &self.c) else {
            return;
        };
        assert!(
            genuine,
            "applied a set the real proxy did not send: {set:?}"
        );
        let mut set = set;
        set.sort();
        // The oldest message, newer than the last applied (unless the lease
        // expired since), not applied before, whose set this is.
        let floor = if self.expired_since { None } else { self.last };
        let found = self
            .sent
            .iter_mut()
            .find(|(k, (s, applied))| !*applied && *s == set && floor.is_none_or(|f| **k > f));
        let Some((k, entry)) = found else {
            panic!(
                "applied {set:?}, which is no unapplied message newer than {floor:?}: {:?}",
                self.sent
            );
        };
        entry.1 = true;
        self.last = Some(*k);
        self.expired_since = false;
        self.applied_at.push(self.now);
        // The rate limit: within any window since the first, at most the
        // burst plus what the refill rate allows.
        let from = self.applied_at[0];
        let allowed = APPLY_BURST + (self.now - from).as_secs_f64() * APPLY_PER_SEC;
        assert!(
            self.applied_at.len() as f64 <= allowed + 1e-9,
            "{} sets applied within {:?}",
            self.applied_at.len(),
            self.now - from
        );
    }

    fn step(&mut self, u: &mut Unstructured) -> Result<()> {
        match u.int_in_range(0..=8)? {
            // The proxy sends a message (several parts when the set is
            // large); some parts are lost, duplicated or reordered.
            0 => {
                self.seq += 1;
                let n = u.int_in_range(0..=700)?;
                let base: u8 = u.arbitrary()?;
                let bypass: Vec<(Ipv4Addr, u8)> = (0..n)
                    .map(|i| (Ipv4Addr::new(10, base, (i >> 8) as u8, i as u8), 32))
                    .collect();
                let parts = Steering::split(self.epoch, self.seq, &bypass).expect("fits");
                let mut set: Vec<IpNet> = bypass
                    .iter()
                    .map(|(a, l)| format!("{a}/{l}").parse().expect("prefix"))
                    .collect();
                set.sort();
                self.sent.insert((self.epoch, self.seq), (set, false));
                let mut datagrams: Vec<Vec<u8>> =
                    parts.iter().map(|m| seal(&self.sender, m)).collect();
                if u.arbitrary()? {
                    datagrams.reverse();
                }
                for d in datagrams {
                    match u.int_in_range(0..=5)? {
                        0 => {}
                        1 => {
                            self.deliver(d.clone(), forwarder(), true);
                            self.deliver(d, forwarder(), true);
                        }
                        _ => self.deliver(d, forwarder(), true),
                    }
                }
            }
            // The proxy restarts: a newer epoch, sequences from 1 again.
            1 => {
                self.epoch += u.int_in_range(1..=1_000_000)?;
                self.seq = 0;
                self.sender = pair(&PROXY).sender(Channel::Steering, self.epoch, self.encrypt);
            }
            // A captured datagram again, from the proxy's address or not.
            2 if !self.captured.is_empty() => {
                let i = u.choose_index(self.captured.len())?;
                let d = self.captured[i].clone();
                let from = if u.arbitrary()? {
                    forwarder()
                } else {
                    "198.18.1.12:7303".parse().expect("literal")
                };
                self.deliver(d, from, true);
            }
            // A captured datagram altered in one byte.
            3 if !self.captured.is_empty() => {
                let i = u.choose_index(self.captured.len())?;
                let mut d = self.captured[i].clone();
                let at = u.choose_index(d.len())?;
                d[at] ^= u.int_in_range(1..=255)?;
                self.deliver(d, forwarder(), false);
            }
            // A message sealed with a key that is not the proxy's, any
            // epoch and sequence (from the proxy's address).
            4 => {
                let epoch = u.arbitrary()?;
                let seq = u.arbitrary()?;
                let s = pair(&ATTACKER).sender(Channel::Steering, epoch, u.arbitrary()?);
                let m = Steering::split(epoch, seq, &[]).expect("fits").remove(0);
                self.deliver(seal(&s, &m), forwarder(), false);
            }
            // Arbitrary bytes.
            5 => {
                let d: Vec<u8> = u.arbitrary()?;
                self.deliver(d, forwarder(), false);
            }
            // Time passes; the lease may expire.
            _ => {
                self.now += Duration::from_millis(u.int_in_range(0..=4_000)?);
                let before = self.c.lease_expired.get();
                if let Some(all) = self.ta.on_silence(self.now, &self.c) {
                    assert_eq!(all, vec!["0.0.0.0/0".parse::<IpNet>().expect("literal")]);
                    assert_eq!(self.c.lease_expired.get(), before + 1);
                    self.expired_since = true;
                    // Expired once per silence.
                    assert!(self.ta.on_silence(self.now + LEASE, &self.c).is_none());
                }
            }
        }
        Ok(())
    }
}

/// Runs one arbitrary sequence of events (at most 64).
pub fn run(data: &[u8]) {
    let mut u = Unstructured::new(data);
    let Ok(encrypt) = u.arbitrary() else { return };
    let mut w = World::new(encrypt);
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
        #![proptest_config(ProptestConfig::with_cases(64))]
        #[test]
        fn only_the_proxys_newer_messages_are_applied(data in proptest::collection::vec(any::<u8>(), 0..1024)) {
            super::run(&data);
        }
    }
}
