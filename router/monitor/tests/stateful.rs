//! The monitor driven by arbitrary sequences of its own probes, trains,
//! periodic rates and timeouts interleaved with replies: honest ones
//! (answered by two other monitors along the reversed route), altered,
//! replayed, and arbitrary bytes. Properties: no panic; each probe has at
//! most one outcome; a reply result comes only from a reply to this
//! monitor's session from the proxy the probe was sent to; losses come only
//! from timeouts; the outstanding bound holds; after `handle_timeout(now)`
//! nothing is due at `now` (no busy loop); bandwidths are finite.
//!
//! One harness, two drivers: the property test below (CI) and the fuzz
//! target `monitor` in `fuzz/` (which includes this file).

use arbitrary::{Result, Unstructured};
use pon_monitor::{Monitor, MonitorConfig, MonitorEvent, ProbeOutcome, ProbeTag};
use pon_proto::pon::{self, Hops, Kind};
use pon_proto::probe;
use std::collections::HashMap;
use std::time::Duration;

const SESSION: u32 = 0xa1;

struct World {
    me: Monitor,
    /// The monitors of proxies 2 and 3, which answer.
    others: [Monitor; 2],
    now: Duration,
    max_outstanding: usize,
    /// Packets on the wire towards monitor 1 (replies, mostly).
    wire: Vec<Vec<u8>>,
    /// Single probes and trains sent per path, and outcomes seen.
    singles: HashMap<Hops, usize>,
    trains: HashMap<Hops, usize>,
    outcomes: HashMap<Hops, usize>,
    bandwidths: HashMap<Hops, usize>,
    first_sent: HashMap<Hops, Duration>,
}

fn path(u: &mut Unstructured) -> Result<Hops> {
    let n = u.int_in_range(1..=3usize)?;
    let ids: Vec<u32> = (0..n)
        .map(|_| u.int_in_range(0..=4))
        .collect::<Result<_>>()?;
    Ok(Hops::new(&ids).unwrap_or_else(|| Hops::new(&[2]).unwrap()))
}

/// What the forwarders along the route do: the packet ends at its last hop.
fn carried(bytes: &[u8]) -> Option<(u32, Vec<u8>)> {
    let mut v = bytes.to_vec();
    let mut p = pon::Packet::new_checked(&mut v[..]).ok()?;
    while p.advance().is_some() {}
    let at = p.current_hop();
    Some((at, v))
}

impl World {
    fn new(u: &mut Unstructured) -> Result<Self> {
        let max_outstanding = u.int_in_range(1..=64)?;
        let cfg = MonitorConfig {
            max_probes_per_sec: u.int_in_range(1..=200)?,
            train_len: u.int_in_range(2..=5)?,
            max_outstanding,
            ..MonitorConfig::default()
        };
        cfg.validate().expect("a valid config");
        Ok(World {
            me: Monitor::new(1, SESSION, cfg),
            others: [
                Monitor::new(2, 0xb2, MonitorConfig::default()),
                Monitor::new(3, 0xc3, MonitorConfig::default()),
            ],
            now: Duration::ZERO,
            max_outstanding,
            wire: Vec::new(),
            singles: HashMap::new(),
            trains: HashMap::new(),
            outcomes: HashMap::new(),
            bandwidths: HashMap::new(),
            first_sent: HashMap::new(),
        })
    }

    /// Moves what monitor 1 sent to the monitors that answer, and their
    /// answers back onto the wire.
    fn flush(&mut self) {
        while let Some(t) = self.me.poll_transmit() {
            let p = pon::Packet::new_checked(&t.bytes[..]).expect("the monitor's own packet");
            if p.kind() == Kind::ProbeReply {
                // Its answer to a probe the arbitrary bytes made up (a
                // well-formed probe for it is hostile but valid input):
                // nobody waits for it.
                continue;
            }
            assert_eq!(p.kind(), Kind::Probe);
            assert_eq!(p.hops().as_slice()[0], t.first_hop);
            let path = p.hops();
            let body = probe::Packet::new_checked(p.payload()).expect("its own body");
            if body.train_len() == 1 {
                *self.singles.entry(path).or_default() += 1;
            }
            self.first_sent.entry(path).or_insert(self.now);
            if let Some((at @ (2 | 3), bytes)) = carried(&t.bytes) {
                let m = &mut self.others[at as usize - 2];
                m.handle_packet(self.now, &bytes);
                while let Some(r) = m.poll_transmit() {
                    if let Some((1, back)) = carried(&r.bytes) {
                        if self.wire.len() < 64 {
                            self.wire.push(back);
                        }
                    }
                }
            }
        }
    }

    /// Checks the results queued; `reply` is the packet just handled, if any.
    fn drain(&mut self, reply: Option<&[u8]>) {
        while let Some(ev) = self.me.poll_event() {
            match ev {
                MonitorEvent::Probe { path, outcome, .. } => {
                    let n = self.outcomes.entry(path).or_default();
                    *n += 1;
                    assert!(
                        *n <= self.singles.get(&path).copied().unwrap_or(0),
                        "more outcomes than probes on {path:?}"
                    );
                    match outcome {
                        ProbeOutcome::Reply { rtt } => {
                            let bytes = reply.expect("a reply result only from a reply");
                            let p = pon::Packet::new_checked(bytes).unwrap();
                            assert_eq!(p.kind(), Kind::ProbeReply);
                            assert_eq!(p.source(), path.last(), "from the probed proxy");
                            let body = probe::Packet::new_checked(p.payload()).unwrap();
                            assert_eq!(body.session(), SESSION);
                            assert!(rtt <= self.now - self.first_sent[&path]);
                        }
                        ProbeOutcome::Lost => {
                            assert!(reply.is_none(), "a loss only from a timeout")
                        }
                    }
                }
                MonitorEvent::Bandwidth { path, mbps, .. } => {
                    let n = self.bandwidths.entry(path).or_default();
                    *n += 1;
                    assert!(*n <= self.trains.get(&path).copied().unwrap_or(0));
                    if let Some(m) = mbps {
                        assert!(m.is_finite() && m > 0.0, "{m}");
                    }
                }
            }
        }
        assert!(self.me.outstanding() <= self.max_outstanding);
    }

    fn step(&mut self, u: &mut Unstructured) -> Result<()> {
        match u.int_in_range(0..=8u8)? {
            0 => {
                let (p, dst) = (path(u)?, u.int_in_range(0..=4)?);
                let _ = self.me.probe(self.now, p, ProbeTag::learning(dst, 0));
            }
            1 => {
                let p = path(u)?;
                if self
                    .me
                    .bandwidth(self.now, p, ProbeTag::learning(2, 1))
                    .is_ok()
                {
                    *self.trains.entry(p).or_default() += 1;
                }
            }
            2 => {
                let p = path(u)?;
                let every = match u.int_in_range(0..=3u8)? {
                    0 => None,
                    n => Some(Duration::from_millis(u64::from(n) * 37)),
                };
                self.me
                    .set_rate(self.now, p, ProbeTag::keepalive(p.last()), every);
            }
            3 => {
                self.now += Duration::from_millis(u.int_in_range(0..=2500)?);
                self.me.handle_timeout(self.now);
                if let Some(next) = self.me.poll_timeout() {
                    assert!(next > self.now, "due again at once: a busy loop");
                }
            }
            // A reply (or anything else) on the wire, maybe altered, maybe
            // again.
            4..=6 if !self.wire.is_empty() => {
                let i = u.choose_index(self.wire.len())?;
                let mut bytes = self.wire[i].clone();
                if u.ratio(1, 3)? && !bytes.is_empty() {
                    let at = u.choose_index(bytes.len())?;
                    bytes[at] = u.arbitrary()?;
                    self.wire.push(bytes.clone());
                } else if u.ratio(1, 2)? {
                    self.wire.swap_remove(i);
                }
                self.now += Duration::from_millis(u.int_in_range(0..=50)?);
                self.me.handle_packet(self.now, &bytes);
                self.drain(Some(&bytes));
                return Ok(());
            }
            7 => self.now += Duration::from_millis(u.int_in_range(0..=100)?),
            _ => {
                let n = u.arbitrary_len::<u8>()?.min(1500);
                let bytes = u.bytes(n)?.to_vec();
                self.me.handle_packet(self.now, &bytes);
                self.drain(Some(&bytes));
                return Ok(());
            }
        }
        self.flush();
        self.drain(None);
        Ok(())
    }
}

/// Runs one arbitrary sequence of events (at most 128).
pub fn run(data: &[u8]) {
    let mut u = Unstructured::new(data);
    let Ok(mut w) = World::new(&mut u) else {
        return;
    };
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
        #![proptest_config(ProptestConfig::with_cases(256))]
        #[test]
        fn replies_and_timeouts_in_any_order(data in proptest::collection::vec(any::<u8>(), 0..4096)) {
            super::run(&data);
        }
    }
}
