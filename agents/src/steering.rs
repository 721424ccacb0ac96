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
use crate::ta::{Forwarder, ForwarderSet, SiteForwarders};
use ipnet::{IpNet, Ipv4Net};
use pon_proto::control::PublicKey;
use pon_proto::steering::{Steering, MAX_STEERING_LEN};
use pon_tunnel::lan::{Channel, LanError, LanReceiver, PairKey};
use std::net::{IpAddr, Ipv4Addr, SocketAddr, UdpSocket};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// The bypass set that leaves every destination to the IP path (no proxy
/// of the site speaks).
fn everything() -> Vec<IpNet> {
    vec![IpNet::V4(Ipv4Net::default())]
}

/// Silence after which a proxy that used to steer counts as gone (three
/// missed refreshes of the proxy's default 150 ms): its flows move to the
/// site's other proxies, or with none left to the IP path, within a second.
pub const LEASE: Duration = Duration::from_millis(500);
/// Bypass sets applied at once at most per proxy; then [`APPLY_PER_SEC`] a
/// second (the proxy sends about seven a second, and one when something changes).
pub const APPLY_BURST: f64 = 10.0;
pub const APPLY_PER_SEC: f64 = 10.0;

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

    /// Whether the proxy counts as alive: it has not spoken yet (a proxy
    /// without a router never does), or spoke within the lease.
    pub fn is_live(&self) -> bool {
        !(self.heard.is_some() && self.expired)
    }

    /// Whether the proxy has spoken (and so has a say in the bypass set).
    pub fn has_spoken(&self) -> bool {
        self.heard.is_some()
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
        Some(everything())
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

/// One forwarder of the site as steering sees it.
struct Member {
    forwarder: Forwarder,
    state: SteeringState,
    /// Its last complete bypass set.
    set: Vec<IpNet>,
}

/// The steering of every proxy of the site, without I/O: each proxy's
/// messages go through its own [`SteeringState`] (its key, sequence,
/// lease); what the TA applies is what no live proxy can reach (the
/// intersection of their sets: with one proxy left that reaches a
/// destination, ingress sends its flows there), or everything once every
/// proxy that spoke has fallen silent.
pub struct SiteSteering {
    secret: [u8; 32],
    version: Option<u64>,
    members: Vec<Member>,
    applied: Option<Vec<IpNet>>,
}

impl SiteSteering {
    pub fn new(secret: [u8; 32]) -> Self {
        SiteSteering {
            secret,
            version: None,
            members: Vec::new(),
            applied: None,
        }
    }

    /// Takes the forwarders of `set` (a member still named keeps its state;
    /// a new one starts from a clean slate).
    pub fn follow(&mut self, set: &ForwarderSet) {
        if self.version == Some(set.version) {
            return;
        }
        self.version = Some(set.version);
        let mut old = std::mem::take(&mut self.members);
        self.members = set
            .members
            .iter()
            .map(|f| match old.iter().position(|m| m.forwarder == *f) {
                Some(i) => old.swap_remove(i),
                None => {
                    let mut state = SteeringState::new(self.secret);
                    state.follow(f.addr.0, f.key);
                    Member {
                        forwarder: *f,
                        state,
                        set: Vec::new(),
                    }
                }
            })
            .collect();
    }

    /// A datagram from `from`: handed to the state of the forwarder at
    /// that address (none: counted as foreign).
    pub fn on_datagram(
        &mut self,
        bytes: &mut [u8],
        from: SocketAddr,
        now: Duration,
        c: &SteeringCounters,
    ) {
        let Some(m) = self
            .members
            .iter_mut()
            .find(|m| IpAddr::V4(m.forwarder.addr.0) == from.ip())
        else {
            c.foreign.inc();
            return;
        };
        if let Some(set) = m.state.on_datagram(bytes, from, now, c) {
            m.set = set;
        }
    }

    /// Notices proxies silent for the lease; returns those that just fell
    /// silent.
    pub fn on_tick(&mut self, now: Duration, c: &SteeringCounters) -> Vec<Ipv4Addr> {
        self.members
            .iter_mut()
            .filter_map(|m| m.state.on_silence(now, c).map(|_| m.forwarder.addr.0))
            .collect()
    }

    /// Bit i: forwarder i of the set followed is alive.
    pub fn live_mask(&self) -> u64 {
        self.members
            .iter()
            .take(crate::ta::MAX_FORWARDERS)
            .enumerate()
            .filter(|(_, m)| m.state.is_live())
            .fold(0, |mask, (i, _)| mask | 1 << i)
    }

    /// The destinations left to the IP path now.
    pub fn bypass(&self) -> Vec<IpNet> {
        let live: Vec<&Member> = self.members.iter().filter(|m| m.state.is_live()).collect();
        if live.is_empty() && !self.members.is_empty() {
            return everything();
        }
        if live.iter().any(|m| !m.state.has_spoken()) {
            // A proxy with no verdict (yet) is assumed to reach everything.
            return Vec::new();
        }
        let mut spoken = live.iter().map(|m| &m.set);
        let Some(first) = spoken.next() else {
            return Vec::new();
        };
        let mut out: Vec<IpNet> = first.clone();
        for set in spoken {
            out.retain(|n| set.contains(n));
        }
        out
    }

    /// The bypass set to apply, when it differs from the last one applied.
    pub fn take_change(&mut self) -> Option<Vec<IpNet>> {
        let now = self.bypass();
        if self.applied.as_ref() == Some(&now) {
            return None;
        }
        self.applied = Some(now.clone());
        Some(now)
    }
}

/// Listens on `bind` for the steering messages of the site's forwarders,
/// marks which of them are alive for the data path, and applies what none
/// of them can reach to `interception`, on a vital thread of its own (a TA
/// that stopped hearing its routers would keep intercepting what the
/// overlay cannot reach, and sending to a dead proxy).
pub fn start(
    bind: SocketAddr,
    secret: [u8; 32],
    forwarders: Arc<SiteForwarders>,
    interception: Arc<Mutex<Interception>>,
    counters: Arc<SteeringCounters>,
    started: Instant,
    vital: &crate::daemon::Vital,
) -> anyhow::Result<()> {
    use anyhow::Context;
    let sock = UdpSocket::bind(bind).with_context(|| format!("binding steering socket {bind}"))?;
    vital.spawn("ta-steering", move || {
        let mut state = SiteSteering::new(secret);
        let mut buf = vec![0u8; MAX_STEERING_LEN + pon_proto::lan::OVERHEAD + 1];
        // Wake up now and then to notice a silent proxy.
        let _ = sock.set_read_timeout(Some(LEASE / 6));
        loop {
            let got = sock.recv_from(&mut buf);
            // Which forwarders count is decided before looking at the
            // datagram, so the first one from a new forwarder counts.
            state.follow(&forwarders.load());
            match got {
                Ok((n, from)) => {
                    state.on_datagram(&mut buf[..n], from, started.elapsed(), &counters)
                }
                Err(e)
                    if matches!(
                        e.kind(),
                        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                    ) => {}
                Err(e) => tracing::warn!(error = %e, "steering socket"),
            }
            for gone in state.on_tick(started.elapsed(), &counters) {
                tracing::warn!(proxy = %gone, "a proxy of this site fell silent: its flows move to the others (to the IP path if none is left)");
            }
            forwarders.set_live(state.live_mask());
            if let Some(set) = state.take_change() {
                if !apply(&interception, &set, &counters) {
                    // Try again at the next wake-up.
                    state.applied = None;
                }
            }
        }
    })
}

/// Applies the bypass set; false if the routing table refused it.
fn apply(interception: &Mutex<Interception>, set: &[IpNet], counters: &SteeringCounters) -> bool {
    let mut i = interception.lock().unwrap_or_else(|p| p.into_inner());
    if !i.bypass().iter().eq(set.iter()) {
        tracing::info!(bypass = ?set, "the site's routers changed the destinations left to the IP path");
    }
    if let Err(e) = i.set_bypass(set) {
        counters.apply_errors.inc();
        tracing::error!(error = %format!("{e:#}"), "applying the bypass set");
        return false;
    }
    true
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
        let ms = Duration::from_millis;
        assert!(s.on_silence(secs(100.0) + LEASE / 2, &c).is_none());
        assert!(s.is_live());
        assert!(
            s.on_silence(secs(100.0) + LEASE - ms(1), &c).is_none(),
            "just inside"
        );
        let all = s.on_silence(secs(100.0) + LEASE, &c).unwrap();
        assert!(!s.is_live());
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
        assert!(s.is_live());
        assert!(s.on_silence(secs(111.0) + LEASE - ms(1), &c).is_none());
        assert!(
            s.on_silence(secs(111.0) + LEASE, &c).is_some(),
            "a second silence"
        );
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

    /// Two proxies of a site steering one TA, each sending its set every
    /// few hundred milliseconds or falling silent for a while, and a third
    /// host on the LAN sending what it likes: the data path's live mask is
    /// exactly the proxies heard within the lease (or never heard), and the
    /// bypass set is what no live proxy reaches (everything once both that
    /// spoke are silent); the stranger changes nothing.
    mod site {
        use super::*;
        use crate::ta::{Forwarder, ForwarderSet};
        use proptest::prelude::*;

        #[derive(Debug, Clone)]
        enum Ev {
            /// Proxy 0 or 1 sends its set (a subset of four prefixes).
            Send(usize, u8),
            /// A stranger sends a genuine-looking datagram.
            Stranger(u8),
            /// Time passes (ms).
            Wait(u16),
        }

        fn ev() -> impl Strategy<Value = Ev> {
            prop_oneof![
                (0usize..2, 0u8..16).prop_map(|(p, s)| Ev::Send(p, s)),
                (0u8..16).prop_map(Ev::Stranger),
                (1u16..1200).prop_map(Ev::Wait),
            ]
        }

        fn prefixes(bits: u8) -> Vec<(Ipv4Addr, u8)> {
            (0..4u8)
                .filter(|i| bits & (1 << i) != 0)
                .map(|i| (Ipv4Addr::new(198, 18, 2 + i, 0), 24))
                .collect()
        }

        fn nets(bits: u8) -> Vec<IpNet> {
            prefixes(bits)
                .into_iter()
                .map(|(a, l)| IpNet::V4(Ipv4Net::new(a, l).unwrap()))
                .collect()
        }

        proptest! {
            #[test]
            fn live_proxies_and_their_common_bypass(evs in proptest::collection::vec(ev(), 1..60)) {
                let addr = |i: u8| Ipv4Addr::new(198, 18, 1, i);
                let set = ForwarderSet {
                    version: 1,
                    members: (1..=2)
                        .map(|i| Forwarder { id: u32::from(i), addr: (addr(i), 7301), key: Some(proxy_key()) })
                        .collect(),
                };
                let mut site = SiteSteering::new(TA_SECRET);
                site.follow(&set);
                let c = SteeringCounters::default();
                let mut now = Duration::from_secs(1);
                // Model: when each proxy was last heard, and its set.
                let mut heard: [Option<(Duration, u8)>; 2] = [None, None];
                let mut seq = [0u64; 2];
                // Each proxy's rate limit, as the TA keeps it.
                let mut tokens = [APPLY_BURST; 2];
                let mut refilled = [Duration::ZERO; 2];
                for e in evs {
                    match e {
                        Ev::Send(p, bits) => {
                            seq[p] += 1;
                            // Each proxy its own run (epoch): both seal with the test key.
                            let mut d = datagram(10 + p as u64, seq[p], prefixes(bits));
                            site.on_datagram(&mut d, (addr(p as u8 + 1), 1).into(), now, &c);
                            tokens[p] = (tokens[p] + (now - refilled[p]).as_secs_f64() * APPLY_PER_SEC)
                                .min(APPLY_BURST);
                            refilled[p] = now;
                            // Heard either way; its set counts only within the rate limit.
                            let kept = heard[p].map_or(0, |h| h.1);
                            heard[p] = Some((now, if tokens[p] >= 1.0 { bits } else { kept }));
                            if tokens[p] >= 1.0 {
                                tokens[p] -= 1.0;
                            }
                        }
                        Ev::Stranger(bits) => {
                            let mut d = datagram(99, 1, prefixes(bits));
                            site.on_datagram(&mut d, (addr(77), 1).into(), now, &c);
                        }
                        Ev::Wait(ms) => now += Duration::from_millis(u64::from(ms)),
                    }
                    site.on_tick(now, &c);
                    let live = |h: &Option<(Duration, u8)>| h.is_none_or(|(t, _)| now - t < LEASE);
                    let mask = (0..2).filter(|&i| live(&heard[i])).fold(0u64, |m, i| m | 1 << i);
                    prop_assert_eq!(site.live_mask(), mask);
                    let want = if mask == 0 {
                        vec!["0.0.0.0/0".parse().unwrap()]
                    } else if (0..2).any(|i| mask & (1 << i) != 0 && heard[i].is_none()) {
                        vec![]
                    } else {
                        let bits = (0..2)
                            .filter(|&i| mask & (1 << i) != 0)
                            .map(|i| heard[i].unwrap().1)
                            .fold(0xf, |a, b| a & b);
                        nets(bits)
                    };
                    prop_assert_eq!(site.bypass(), want);
                }
            }
        }
    }
}
