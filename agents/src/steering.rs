//! The TA's end of the router → TA channel: the local proxy's router tells
//! its TAs, over UDP on the site LAN, which destinations the overlay cannot
//! reach right now; the TA leaves them to the plain IP path (removes their
//! interception routes) until the router says they are reachable again.
//!
//! Direct rather than through the CU: the proxy is one LAN hop away, so the
//! switch to the IP path takes a datagram instead of a round through a CU
//! that may be away; the CU is not on the data path's failure path.
//! Only datagrams from the address of the forwarder the TA sends to, sealed
//! with the key the TA shares with that proxy (`pon_tunnel::lan`, channel
//! `Steering`), are accepted (when the CU names another forwarder, from the
//! new one only); replays, older epochs and messages whose (epoch, sequence)
//! does not increase are dropped, and at most [`APPLY_BURST`] sets (then
//! [`APPLY_PER_SEC`] a second) are applied, each drop counted by reason in
//! `pon_ta_steering_drops_total`. Each message carries the whole bypass set,
//! so a lost one is repaired by the next refresh. A set spread over several datagrams is applied once
//! every part of the same message is in (a missing part leaves the last
//! complete set in force until the next refresh).
//!
//! The messages are also a lease: once a proxy has spoken, its silence for
//! [`LEASE`] means the proxy itself is gone, and with it every overlay path,
//! so everything is left to the IP path until it speaks again. A proxy that
//! never speaks (pon-forwarder without a router) leaves interception as
//! configured.

use crate::interception::Interception;
use crate::ta::CurrentForwarder;
use ipnet::{IpNet, Ipv4Net};
use pon_proto::control::PublicKey;
use pon_proto::steering::{Steering, MAX_STEERING_LEN};
use pon_tunnel::lan::{Channel, LanError, LanReceiver, PairKey};
use std::net::{IpAddr, Ipv4Addr, SocketAddr, UdpSocket};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Silence after which a proxy that used to steer counts as gone (three
/// missed refreshes).
pub const LEASE: Duration = Duration::from_secs(3);
/// Bypass sets applied at once at most; then [`APPLY_PER_SEC`] a second
/// (the proxy sends one a second, and one when something changes).
pub const APPLY_BURST: f64 = 5.0;
pub const APPLY_PER_SEC: f64 = 5.0;

pon_telemetry::counters! {
    pub struct SteeringCounters {
        accepted => ("pon_ta_steering_messages_total", "result=\"accepted\"", "Steering datagrams from the local proxy that authenticated and were newer."),
        applied => ("pon_ta_steering_applied_total", "", "Bypass sets applied."),
        foreign => ("pon_ta_steering_drops_total", "reason=\"foreign_source\"", "Steering datagrams dropped, by reason."),
        no_key => ("pon_ta_steering_drops_total", "reason=\"no_key\"", "Steering datagrams dropped, by reason."),
        malformed => ("pon_ta_steering_drops_total", "reason=\"malformed\"", "Steering datagrams dropped, by reason."),
        bad_tag => ("pon_ta_steering_drops_total", "reason=\"bad_tag\"", "Steering datagrams dropped, by reason."),
        replayed => ("pon_ta_steering_drops_total", "reason=\"replayed\"", "Steering datagrams dropped, by reason."),
        stale_epoch => ("pon_ta_steering_drops_total", "reason=\"stale_epoch\"", "Steering datagrams dropped, by reason."),
        stale => ("pon_ta_steering_drops_total", "reason=\"not_increasing\"", "Steering datagrams dropped, by reason."),
        epoch_mismatch => ("pon_ta_steering_drops_total", "reason=\"epoch_mismatch\"", "Steering datagrams dropped, by reason."),
        rate_limited => ("pon_ta_steering_drops_total", "reason=\"rate_limited\"", "Steering datagrams dropped, by reason."),
        apply_errors => ("pon_ta_steering_apply_errors_total", "", "Bypass sets that could not be applied to the routing table."),
        lease_expired => ("pon_ta_steering_lease_expired_total", "", "Times the local proxy fell silent and everything was left to the IP path."),
    }
}

/// A message arriving in parts: its first part's header, and each part's
/// prefixes once received.
type Partial = (Steering, Vec<Option<Vec<(Ipv4Addr, u8)>>>);

/// What a datagram means for the TA, without I/O. Time comes in as `now`,
/// the time since the TA started, so tests drive the lease deterministically.
#[derive(Default)]
pub struct SteeringState {
    /// This TA's static secret (its identity's X25519 key).
    secret: Option<[u8; 32]>,
    /// The forwarder whose messages count, and its proxy's key.
    forwarder: Option<(Ipv4Addr, Option<PublicKey>)>,
    /// Checks the forwarder's seals (none: no key known, nothing accepted).
    receiver: Option<LanReceiver>,
    /// Sets that may still be applied now, and when that was computed.
    tokens: f64,
    refilled: Duration,
    /// The last message applied (its header; the set is in the routes).
    last: Option<Steering>,
    /// A message arriving in parts.
    partial: Option<Partial>,
    heard: Option<Duration>,
    expired: bool,
}

impl SteeringState {
    /// A TA whose static secret is `secret`.
    pub fn new(secret: [u8; 32]) -> Self {
        SteeringState {
            secret: Some(secret),
            tokens: APPLY_BURST,
            ..SteeringState::default()
        }
    }

    /// Takes steering from `forwarder`, whose proxy's static key is `key`,
    /// from now on. When that is a new one, what the old one said (its
    /// bypass set, its sequence, its lease) no longer applies: returns the
    /// empty bypass set to apply until the new one speaks.
    pub fn follow(&mut self, forwarder: Ipv4Addr, key: Option<PublicKey>) -> Option<Vec<IpNet>> {
        if self.forwarder == Some((forwarder, key)) {
            return None;
        }
        let first = self.forwarder.is_none();
        let receiver = self
            .secret
            .zip(key)
            .and_then(|(s, k)| PairKey::for_agent(&s, &k.0))
            .map(|p| p.receiver(Channel::Steering));
        *self = SteeringState {
            secret: self.secret,
            forwarder: Some((forwarder, key)),
            receiver,
            tokens: APPLY_BURST,
            ..SteeringState::default()
        };
        (!first).then(Vec::new)
    }

    /// Everything, once the proxy that used to steer has been silent for
    /// the lease (returned once per silence).
    pub fn on_silence(&mut self, now: Duration, c: &SteeringCounters) -> Option<Vec<IpNet>> {
        let heard = self.heard?;
        if self.expired || now.saturating_sub(heard) < LEASE {
            return None;
        }
        self.expired = true;
        c.lease_expired.inc();
        Some(vec!["0.0.0.0/0".parse().expect("literal")])
    }

    /// The bypass set to apply, if `bytes` from `from`, arrived at `now`,
    /// is a newer message from the forwarder followed.
    pub fn on_datagram(
        &mut self,
        bytes: &mut [u8],
        from: SocketAddr,
        now: Duration,
        c: &SteeringCounters,
    ) -> Option<Vec<IpNet>> {
        if self.forwarder.map(|f| IpAddr::V4(f.0)) != Some(from.ip()) {
            c.foreign.inc();
            return None;
        }
        let Some(rx) = &self.receiver else {
            c.no_key.inc();
            return None;
        };
        let sealed_epoch = pon_proto::lan::Packet::new_checked(&*bytes).map(|p| p.epoch());
        let payload = match rx.open(bytes) {
            Ok(r) => r,
            Err(e) => {
                match e {
                    LanError::Malformed(_) => c.malformed.inc(),
                    LanError::BadTag => c.bad_tag.inc(),
                    LanError::Replayed => c.replayed.inc(),
                    LanError::StaleEpoch => c.stale_epoch.inc(),
                }
                return None;
            }
        };
        let m = match Steering::decode(&bytes[payload]) {
            Ok(m) => m,
            Err(e) => {
                c.malformed.inc();
                tracing::debug!(error = %e, "bad steering message");
                return None;
            }
        };
        // The message's own epoch is the one its seal was made for.
        if sealed_epoch != Ok(m.epoch) {
            c.epoch_mismatch.inc();
            return None;
        }
        // Strictly newer only, so a replayed message of an earlier run
        // cannot roll the set back; once the proxy has been silent for the
        // lease, a restarted one whose clock went back is heard again.
        if !self.expired && self.last.as_ref().is_some_and(|old| !m.newer_than(old)) {
            c.stale.inc();
            return None;
        }
        c.accepted.inc();
        self.heard = Some(now);
        self.expired = false;
        let bypass = self.assemble(m)?;
        // Strictly newer and authenticated, and still: at most so many
        // changes of the routing table a second.
        self.tokens = (self.tokens
            + now.saturating_sub(self.refilled).as_secs_f64() * APPLY_PER_SEC)
            .min(APPLY_BURST);
        self.refilled = now;
        if self.tokens < 1.0 {
            c.rate_limited.inc();
            return None;
        }
        self.tokens -= 1.0;
        c.applied.inc();
        let set = bypass
            .iter()
            .filter_map(|(a, l)| Ipv4Net::new(*a, *l).ok().map(IpNet::V4))
            .collect();
        Some(set)
    }

    /// Files one part; returns the whole set once the message is complete.
    fn assemble(&mut self, mut m: Steering) -> Option<Vec<(Ipv4Addr, u8)>> {
        let bypass = std::mem::take(&mut m.bypass);
        if m.parts == 1 {
            self.partial = None;
            self.last = Some(m);
            return Some(bypass);
        }
        match &mut self.partial {
            // Another part of the message being assembled.
            Some((head, parts)) if m.same_message(head) => {
                parts[usize::from(m.part)] = Some(bypass);
            }
            // A part of a newer message: the older one will not complete.
            Some((head, _)) if !m.newer_than(head) => return None,
            _ => {
                let mut parts = vec![None; usize::from(m.parts)];
                parts[usize::from(m.part)] = Some(bypass);
                self.partial = Some((m.clone(), parts));
            }
        }
        let (_, parts) = self.partial.as_ref()?;
        if parts.iter().any(Option::is_none) {
            return None;
        }
        let (head, parts) = self.partial.take()?;
        self.last = Some(head);
        Some(parts.into_iter().flatten().flatten().collect())
    }
}

/// Listens on `bind` for the steering messages of the forwarder the TA
/// currently sends to and applies them to `interception`, on a vital
/// thread of its own (a TA that stopped hearing its router would keep
/// intercepting what the overlay cannot reach).
pub fn start(
    bind: SocketAddr,
    secret: [u8; 32],
    forwarder: Arc<CurrentForwarder>,
    interception: Arc<Mutex<Interception>>,
    counters: Arc<SteeringCounters>,
    started: Instant,
    vital: &crate::daemon::Vital,
) -> anyhow::Result<()> {
    use anyhow::Context;
    let sock = UdpSocket::bind(bind).with_context(|| format!("binding steering socket {bind}"))?;
    vital.spawn("ta-steering", move || {
        let mut state = SteeringState::new(secret);
        let mut buf = vec![0u8; MAX_STEERING_LEN + pon_proto::lan::OVERHEAD + 1];
        // Wake up now and then to notice a silent proxy.
        let _ = sock.set_read_timeout(Some(LEASE / 6));
        loop {
            let got = sock.recv_from(&mut buf);
            // Which forwarder counts is decided before looking at the
            // datagram, so the first one from a new forwarder counts.
            let moved = forwarder
                .get()
                .and_then(|(f, _)| state.follow(f, forwarder.key()));
            if let Some(set) = moved {
                tracing::info!("following a new forwarder: its steering only, from a clean slate");
                apply(&interception, &set, &counters);
            }
            let set = match got {
                Ok((n, from)) => {
                    state.on_datagram(&mut buf[..n], from, started.elapsed(), &counters)
                }
                Err(e)
                    if matches!(
                        e.kind(),
                        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                    ) =>
                {
                    let gone = state.on_silence(started.elapsed(), &counters);
                    if gone.is_some() {
                        tracing::warn!(
                            "the local proxy fell silent: every destination takes the IP path"
                        );
                    }
                    gone
                }
                Err(e) => {
                    tracing::warn!(error = %e, "steering socket");
                    None
                }
            };
            if let Some(set) = set {
                apply(&interception, &set, &counters);
            }
        }
    })
}

fn apply(interception: &Mutex<Interception>, set: &[IpNet], counters: &SteeringCounters) {
    let mut i = interception.lock().unwrap_or_else(|p| p.into_inner());
    if !i.bypass().iter().eq(set.iter()) {
        tracing::info!(bypass = ?set, "the proxy's router changed the destinations left to the IP path");
    }
    if let Err(e) = i.set_bypass(set) {
        counters.apply_errors.inc();
        tracing::error!(error = %format!("{e:#}"), "applying the bypass set");
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use pon_proto::steering::STEERING_VERSION;

    pub(crate) const TA_SECRET: [u8; 32] = [5; 32];
    pub(crate) const PROXY_SECRET: [u8; 32] = [7; 32];

    pub(crate) fn proxy_key() -> PublicKey {
        PublicKey(pon_tunnel::lan::public_key(&PROXY_SECRET))
    }

    thread_local! {
        /// The proxy's sender of each epoch (its counter runs on).
        static SENDERS: std::cell::RefCell<std::collections::HashMap<u64, pon_tunnel::lan::LanSender>> =
            Default::default();
    }

    /// Seals a steering datagram as the proxy (secret [`PROXY_SECRET`])
    /// does for the TA (secret [`TA_SECRET`]) in run `epoch`.
    pub(crate) fn seal(epoch: u64, plain: &[u8]) -> Vec<u8> {
        SENDERS.with(|m| {
            let mut m = m.borrow_mut();
            let s = m.entry(epoch).or_insert_with(|| {
                PairKey::for_proxy(&PROXY_SECRET, &pon_tunnel::lan::public_key(&TA_SECRET))
                    .unwrap()
                    .sender(Channel::Steering, epoch, false)
            });
            let mut d = vec![0u8; pon_proto::lan::OVERHEAD + plain.len()];
            d[pon_proto::lan::HEADER_LEN..pon_proto::lan::HEADER_LEN + plain.len()]
                .copy_from_slice(plain);
            s.seal(&mut d, plain.len()).unwrap();
            d
        })
    }

    /// A whole steering message (one datagram) leaving `bypass` to the IP
    /// path, as message `seq` of `epoch`, encoded and sealed.
    pub(crate) fn datagram(epoch: u64, seq: u64, bypass: Vec<(Ipv4Addr, u8)>) -> Vec<u8> {
        let plain = Steering {
            version: STEERING_VERSION,
            epoch,
            seq,
            part: 0,
            parts: 1,
            bypass,
        }
        .encode()
        .unwrap();
        seal(epoch, &plain)
    }

    fn following(fwd: Ipv4Addr) -> SteeringState {
        let mut s = SteeringState::new(TA_SECRET);
        assert_eq!(
            s.follow(fwd, Some(proxy_key())),
            None,
            "nothing to undo the first time"
        );
        s
    }

    #[test]
    fn only_newer_messages_from_the_forwarder_count() {
        let fwd = Ipv4Addr::new(198, 18, 1, 1);
        let c = SteeringCounters::default();
        let mut s = following(fwd);
        let msg =
            |epoch, seq, last| datagram(epoch, seq, vec![(Ipv4Addr::new(198, 18, 2, last), 32)]);
        let from = SocketAddr::from((fwd, 40000));
        let t = Duration::ZERO;
        let first = msg(1, 1, 11);
        let got = s.on_datagram(&mut first.clone(), from, t, &c).unwrap();
        assert_eq!(got, vec!["198.18.2.11/32".parse::<IpNet>().unwrap()]);
        assert!(s.on_datagram(&mut msg(1, 1, 12), from, t, &c).is_none());
        let stranger = SocketAddr::from(([198, 18, 1, 99], 1));
        assert!(s.on_datagram(&mut msg(1, 2, 12), stranger, t, &c).is_none());
        assert!(s.on_datagram(&mut b"junk".to_vec(), from, t, &c).is_none());
        // Replayed, unsealed, or sealed by someone else (with the forwarder's address).
        assert!(s.on_datagram(&mut first.clone(), from, t, &c).is_none());
        let plain = Steering::split(1, 9, &[]).unwrap()[0].encode().unwrap();
        assert!(s.on_datagram(&mut plain.clone(), from, t, &c).is_none());
        let mut forged = first.clone();
        forged[12..20].copy_from_slice(&99u64.to_be_bytes());
        assert!(s.on_datagram(&mut forged, from, t, &c).is_none());
        // A restarted proxy (newer epoch) starts its sequence again; an
        // older epoch is refused even when sealed.
        assert!(s.on_datagram(&mut msg(2, 0, 13), from, t, &c).is_some());
        assert!(s.on_datagram(&mut msg(1, 50, 13), from, t, &c).is_none());
        assert_eq!(
            (
                c.accepted.get(),
                c.stale.get(),
                c.foreign.get(),
                c.malformed.get(),
                c.replayed.get(),
                c.bad_tag.get(),
                c.stale_epoch.get(),
            ),
            (2, 1, 1, 2, 1, 1, 1)
        );
    }

    #[test]
    fn changes_are_applied_at_a_bounded_rate() {
        let fwd = Ipv4Addr::new(198, 18, 1, 1);
        let (c, from) = (SteeringCounters::default(), SocketAddr::from((fwd, 1)));
        let mut s = following(fwd);
        let t = Duration::from_secs(10);
        let applied = (1..=20)
            .filter(|seq| {
                s.on_datagram(&mut datagram(1, *seq, vec![]), from, t, &c)
                    .is_some()
            })
            .count();
        assert_eq!(applied, APPLY_BURST as usize);
        assert_eq!(c.rate_limited.get(), 20 - APPLY_BURST as u64);
        // A second later, some more.
        let later = t + Duration::from_secs(1);
        assert!(s
            .on_datagram(&mut datagram(1, 21, vec![]), from, later, &c)
            .is_some());
    }

    #[test]
    fn without_the_proxys_key_nothing_is_accepted() {
        let fwd = Ipv4Addr::new(198, 18, 1, 1);
        let c = SteeringCounters::default();
        let mut s = SteeringState::new(TA_SECRET);
        s.follow(fwd, None);
        let from = SocketAddr::from((fwd, 1));
        assert!(s
            .on_datagram(&mut datagram(1, 1, vec![]), from, Duration::ZERO, &c)
            .is_none());
        assert_eq!(c.no_key.get(), 1);
        // Another proxy's key: nothing authenticates.
        s.follow(fwd, Some(PublicKey([9; 32])));
        assert!(s
            .on_datagram(&mut datagram(1, 2, vec![]), from, Duration::ZERO, &c)
            .is_none());
        assert_eq!(c.bad_tag.get(), 1);
    }

    #[test]
    fn a_silent_proxy_loses_its_lease_once_per_silence() {
        let fwd = Ipv4Addr::new(198, 18, 1, 1);
        let c = SteeringCounters::default();
        let mut s = following(fwd);
        let secs = Duration::from_secs_f64;
        // Never heard: interception stays as configured, however long.
        assert!(s.on_silence(secs(1000.0), &c).is_none());
        let m = Steering {
            version: STEERING_VERSION,
            epoch: 1,
            seq: 1,
            part: 0,
            parts: 1,
            bypass: vec![],
        };
        let from = SocketAddr::from((fwd, 40000));
        // Heard at 100 s (the TA's clock, not the wall's).
        s.on_datagram(&mut seal(1, &m.encode().unwrap()), from, secs(100.0), &c)
            .unwrap();
        assert!(s.on_silence(secs(101.0), &c).is_none());
        assert!(s.on_silence(secs(102.999), &c).is_none(), "just inside");
        let all = s.on_silence(secs(103.0), &c).unwrap();
        assert_eq!(all, vec!["0.0.0.0/0".parse::<IpNet>().unwrap()]);
        assert!(s.on_silence(secs(110.0), &c).is_none(), "once per silence");
        // The proxy is back at 111 s: its set applies again, and the lease
        // restarts from then.
        let back = Steering {
            seq: 2,
            ..m.clone()
        };
        assert_eq!(
            s.on_datagram(&mut seal(1, &back.encode().unwrap()), from, secs(111.0), &c),
            Some(vec![])
        );
        assert!(s.on_silence(secs(113.5), &c).is_none());
        assert!(s.on_silence(secs(114.0), &c).is_some(), "a second silence");
        assert_eq!(c.lease_expired.get(), 2);
    }

    /// The datagrams of a set of `n` prefixes, as the proxy sends them.
    fn parts(epoch: u64, seq: u64, n: u32) -> Vec<Vec<u8>> {
        let set: Vec<(Ipv4Addr, u8)> = (0..n)
            .map(|i| (Ipv4Addr::from(0x0a00_0000 + i), 32))
            .collect();
        Steering::split(epoch, seq, &set)
            .unwrap()
            .iter()
            .map(|p| seal(epoch, &p.encode().unwrap()))
            .collect()
    }

    #[test]
    fn a_large_set_applies_once_every_part_is_in() {
        let fwd = Ipv4Addr::new(198, 18, 1, 1);
        let (c, from, t) = (
            SteeringCounters::default(),
            SocketAddr::from((fwd, 1)),
            Duration::ZERO,
        );
        let mut s = following(fwd);
        let m1 = parts(1, 1, 600);
        assert_eq!(m1.len(), 3);
        assert!(s.on_datagram(&mut m1[2].clone(), from, t, &c).is_none());
        assert!(s.on_datagram(&mut m1[0].clone(), from, t, &c).is_none());
        let set = s.on_datagram(&mut m1[1].clone(), from, t, &c).unwrap();
        assert_eq!(set.len(), 600);
        // A repeated part of an applied message is a replay.
        assert!(s.on_datagram(&mut m1[1].clone(), from, t, &c).is_none());
        assert_eq!(c.replayed.get(), 1);
        // Message 2 loses a part; message 3 overtakes it and completes.
        let (m2, m3) = (parts(1, 2, 300), parts(1, 3, 260));
        assert!(s.on_datagram(&mut m2[0].clone(), from, t, &c).is_none());
        assert!(s.on_datagram(&mut m3[1].clone(), from, t, &c).is_none());
        // A late part of message 2 no longer counts.
        assert!(s.on_datagram(&mut m2[1].clone(), from, t, &c).is_none());
        assert_eq!(
            s.on_datagram(&mut m3[0].clone(), from, t, &c)
                .map(|s| s.len()),
            Some(260)
        );
    }

    proptest::proptest! {
        #[test]
        fn any_set_arrives_whole_in_any_order(
            n in 0u32..3000,
            order in proptest::collection::vec(proptest::prelude::any::<u16>(), 13),
        ) {
            let fwd = Ipv4Addr::new(198, 18, 1, 1);
            let (c, from) = (SteeringCounters::default(), SocketAddr::from((fwd, 1)));
            let mut s = following(fwd);
            let mut m = parts(7, 9, n);
            // Shuffle the datagrams with the generated keys.
            let mut keyed: Vec<(u16, Vec<u8>)> = order.iter().copied().zip(m.drain(..)).collect();
            keyed.sort_by_key(|k| k.0);
            let total = keyed.len();
            let mut applied = None;
            for (i, (_, d)) in keyed.into_iter().enumerate() {
                let mut d = d;
                let got = s.on_datagram(&mut d, from, Duration::ZERO, &c);
                proptest::prop_assert_eq!(got.is_some(), i + 1 == total);
                applied = got.or(applied);
            }
            let set = applied.unwrap();
            proptest::prop_assert_eq!(set.len(), n as usize);
            proptest::prop_assert!(set.iter().enumerate().all(|(i, p)| *p == IpNet::V4(Ipv4Net::new(Ipv4Addr::from(0x0a00_0000 + i as u32), 32).unwrap())));
        }
    }
}
