//! Sessions between PON proxies, sans-I/O: which Noise KK handshakes to
//! start, answer and finish, when to rekey, and which session keys the data
//! path may use. Events go in with an explicit `now` (and, for handshake
//! timestamps, the wall clock); what must be sent leaves through
//! [`Tunnels::poll_transmit`]; the keys the data path uses leave as a
//! [`SessionTable`] snapshot through [`Tunnels::poll_table`].
//!
//! One session per pair of proxies serves both layers of the PON header:
//! the end-to-end seal between a source and an egress, and the link tag
//! between neighbours on a relayed route (see `pon_proto::pon`).
//!
//! Rekeying never loses a packet: a new session is added next to the old
//! one, the initiator sends with it as soon as the handshake is done, the
//! responder once the initiator's first packet (a keepalive sent at once)
//! proves the initiator has it; the old session keeps receiving until it
//! expires.

pub mod lan;
pub mod mac;
mod noise;
mod replay;
mod session;

pub use noise::{generate_keypair, public_key, HandshakeError, PATTERN};
pub use replay::{ReplayWindow, WINDOW};
pub use session::{OpenError, Session, REJECT_AFTER_MESSAGES, TAG_LEN};

use pon_proto::handshake::{self, Init, Response, INIT_LEN, RESPONSE_LEN};
use rustc_hash::FxHashMap as HashMap;
use std::collections::VecDeque;
use std::sync::Arc;
use std::time::Duration;

/// When sessions are replaced and handshakes retried.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Timers {
    /// A session this old is replaced by a new handshake.
    pub rekey_after: Duration,
    /// A session this old is no longer used at all.
    pub reject_after: Duration,
    /// A session that sent this many messages is replaced.
    pub rekey_after_messages: u64,
    /// An unanswered initiation is sent again after this long.
    pub retry: Duration,
    /// A peer's handshakes are answered at most this often.
    pub min_answer_interval: Duration,
}

impl Default for Timers {
    /// WireGuard's session lifetimes; a faster retry, since a proxy whose
    /// route changed wants its session quickly.
    fn default() -> Self {
        Timers {
            rekey_after: Duration::from_secs(120),
            reject_after: Duration::from_secs(180),
            rekey_after_messages: 1 << 48,
            retry: Duration::from_secs(1),
            min_answer_interval: Duration::from_millis(20),
        }
    }
}

/// An initiation of ours older than this, refused by the peer's in a
/// collision, is sent again at once (younger, it is probably still in
/// flight and will be answered).
const COLLISION_RESEND: Duration = Duration::from_millis(50);

/// Sessions kept per peer: a new one not yet confirmed, the current one and
/// the previous one (still receiving packets sent before the switch).
const SESSIONS_PER_PEER: usize = 3;

pon_telemetry::counters! {
    /// What happened to handshakes.
    pub struct TunnelCounters {
        initiations => ("pon_tunnel_handshakes_total", "step=\"initiation_sent\"", "Handshake messages, by step."),
        responses => ("pon_tunnel_handshakes_total", "step=\"response_sent\"", "Handshake messages, by step."),
        completed => ("pon_tunnel_handshakes_total", "step=\"completed\"", "Handshake messages, by step."),
        rekeys => ("pon_tunnel_rekeys_total", "", "Handshakes started to replace a session that aged or sent its share."),
        expired => ("pon_tunnel_sessions_expired_total", "", "Sessions dropped because they reached their end of life."),
        drop_malformed => ("pon_tunnel_handshake_drops_total", "reason=\"malformed\"", "Handshake messages dropped, by reason."),
        drop_unknown_peer => ("pon_tunnel_handshake_drops_total", "reason=\"unknown_peer\"", "Handshake messages dropped, by reason."),
        drop_forged => ("pon_tunnel_handshake_drops_total", "reason=\"forged\"", "Handshake messages dropped, by reason."),
        drop_replayed => ("pon_tunnel_handshake_drops_total", "reason=\"replayed\"", "Handshake messages dropped, by reason."),
        drop_collision => ("pon_tunnel_handshake_drops_total", "reason=\"collision\"", "Handshake messages dropped, by reason."),
        drop_no_pending => ("pon_tunnel_handshake_drops_total", "reason=\"no_pending\"", "Handshake messages dropped, by reason."),
        drop_rate_limited => ("pon_tunnel_handshake_drops_total", "reason=\"rate_limited\"", "Handshake messages dropped, by reason."),
    }
}

/// Something to send to a peer proxy.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Transmit {
    /// A `HandshakeInit` packet with this body.
    Init { to: u32, body: [u8; INIT_LEN] },
    /// A `HandshakeResponse` packet with this body.
    Response { to: u32, body: [u8; RESPONSE_LEN] },
    /// A sealed `Keepalive`: the new session's first packet.
    Keepalive { to: u32 },
}

/// The keys the data path uses, swapped whole when sessions change.
#[derive(Debug, Default)]
pub struct SessionTable {
    by_index: HashMap<u32, Arc<Session>>,
    /// Newest first.
    by_peer: HashMap<u32, Vec<Arc<Session>>>,
}

impl SessionTable {
    /// The session a received packet names by its receiver index.
    #[inline]
    pub fn session(&self, index: u32) -> Option<&Session> {
        self.by_index.get(&index).map(|s| &**s)
    }
    /// The session to send to `peer` with: the newest confirmed one.
    #[inline]
    pub fn sender(&self, peer: u32) -> Option<&Session> {
        self.by_peer
            .get(&peer)?
            .iter()
            .find(|s| s.is_confirmed())
            .map(|s| &**s)
    }
    /// Peers with at least one session.
    pub fn peers(&self) -> impl Iterator<Item = u32> + '_ {
        self.by_peer.keys().copied()
    }
}

/// One peer's state, for `/status`.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct PeerStatus {
    pub peer: u32,
    pub sessions: usize,
    /// Age of the newest confirmed session, if any.
    pub session_age_ms: Option<u64>,
    pub handshake_pending: bool,
}

struct Pending {
    state: noise::Initiator,
    index: u32,
    sent_at: Duration,
    /// The peer showed it is up since this left: send again now.
    resend: bool,
}

impl Pending {
    /// When it is sent again unless answered.
    fn due(&self, t: &Timers) -> Duration {
        if self.resend {
            self.sent_at
        } else {
            self.sent_at + t.retry
        }
    }
}

struct Peer {
    key: [u8; 32],
    pending: Option<Pending>,
    /// Newest first.
    sessions: Vec<Arc<Session>>,
    /// Greatest initiation timestamp answered: older ones are replays.
    last_timestamp: u64,
    last_answer: Option<Duration>,
    /// No initiation before this (after a failed or unanswered one).
    next_attempt: Duration,
}

impl Peer {
    fn new(key: [u8; 32], now: Duration) -> Self {
        Peer {
            key,
            pending: None,
            sessions: Vec::new(),
            last_timestamp: 0,
            last_answer: None,
            next_attempt: now,
        }
    }

    /// Whether this side should start a handshake now.
    fn wants_handshake(&self, now: Duration, t: &Timers) -> bool {
        if now < self.next_attempt {
            return false;
        }
        if let Some(p) = &self.pending {
            return now >= p.due(t);
        }
        match self.sessions.first() {
            None => true,
            // A session we answered that the initiator never confirmed (its
            // keepalive lost, and it sends us nothing): we cannot send with
            // it, so we make our own, which is ours to use at once.
            Some(s) if !s.is_confirmed() => now >= s.created() + t.retry,
            Some(s) => now >= s.created() + t.rekey_after || s.sent() >= t.rekey_after_messages,
        }
    }
}

/// Why a handshake message was dropped.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum Refused {
    #[error("malformed handshake message")]
    Malformed,
    #[error("not from a known peer")]
    UnknownPeer,
    #[error("does not authenticate")]
    Forged,
    #[error("replayed initiation")]
    Replayed,
    #[error("both sides initiated; ours goes on")]
    Collision,
    #[error("no initiation of ours is waiting for it")]
    NoPending,
    #[error("peer handshakes too often")]
    RateLimited,
}

pub struct Tunnels {
    me: u32,
    private: [u8; 32],
    timers: Timers,
    peers: HashMap<u32, Peer>,
    /// Local indices in use, for allocating fresh ones.
    indices: HashMap<u32, u32>,
    next_index: u32,
    last_timestamp: u64,
    out: VecDeque<Transmit>,
    table: Arc<SessionTable>,
    changed: bool,
    /// The greatest initiation timestamp answered per peer id and key, kept
    /// when a peer is removed: a peer removed and added again (a revocation
    /// undone, a view flapping) must not accept its old initiations again.
    floors: HashMap<(u32, [u8; 32]), u64>,
    pub counters: Arc<TunnelCounters>,
}

impl Tunnels {
    pub fn new(me: u32, private: [u8; 32], timers: Timers) -> Self {
        let mut seed = [0u8; 4];
        // Indices need only be unique locally; a random start makes them
        // useless as a guess of how many sessions a proxy made.
        let _ = ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut seed);
        Tunnels {
            me,
            private,
            timers,
            peers: HashMap::default(),
            indices: HashMap::default(),
            next_index: u32::from_be_bytes(seed),
            last_timestamp: 0,
            out: VecDeque::new(),
            table: Arc::default(),
            changed: false,
            floors: HashMap::default(),
            counters: Arc::default(),
        }
    }

    pub fn my_id(&self) -> u32 {
        self.me
    }

    /// Changes this proxy's id (the CU assigned one); every session is
    /// bound to the old id, so all are dropped.
    pub fn set_my_id(&mut self, now: Duration, me: u32) {
        if me != self.me {
            self.me = me;
            let peers: Vec<_> = self.peers.iter().map(|(id, p)| (*id, p.key)).collect();
            self.set_peers(now, &[]);
            self.set_peers(now, &peers);
        }
    }

    /// The peers and their static keys. A peer that is gone or whose key
    /// changed loses its sessions at once (revocation); a new one is
    /// handshaken with at the next timeout.
    pub fn set_peers(&mut self, now: Duration, peers: &[(u32, [u8; 32])]) {
        let wanted: HashMap<u32, [u8; 32]> = peers
            .iter()
            .copied()
            .filter(|(id, _)| *id != self.me && *id != 0)
            .collect();
        let gone: Vec<u32> = self
            .peers
            .iter()
            .filter(|(id, p)| wanted.get(id) != Some(&p.key))
            .map(|(id, _)| *id)
            .collect();
        for id in gone {
            if let Some(p) = self.peers.remove(&id) {
                if p.last_timestamp > 0 {
                    self.floors.insert((id, p.key), p.last_timestamp);
                }
                self.forget(&p);
            }
        }
        for (id, key) in wanted {
            let floor = self.floors.get(&(id, key)).copied().unwrap_or(0);
            self.peers.entry(id).or_insert_with(|| Peer {
                last_timestamp: floor,
                ..Peer::new(key, now)
            });
        }
    }

    fn forget(&mut self, p: &Peer) {
        if let Some(pending) = &p.pending {
            self.indices.remove(&pending.index);
        }
        for s in &p.sessions {
            self.indices.remove(&s.local_index());
        }
        self.changed = true;
    }

    fn alloc_index(&mut self, peer: u32) -> u32 {
        loop {
            self.next_index = self.next_index.wrapping_add(1);
            let i = self.next_index;
            if i != 0 && !self.indices.contains_key(&i) {
                self.indices.insert(i, peer);
                return i;
            }
        }
    }

    /// Starts handshakes that are due, drops sessions at their end of
    /// life. `wall_ns` is the wall clock (Unix nanoseconds): initiation
    /// timestamps must grow across restarts so the peer can refuse replays.
    pub fn handle_timeout(&mut self, now: Duration, wall_ns: u64) {
        let ids: Vec<u32> = self.peers.keys().copied().collect();
        for id in ids {
            self.expire(id, now);
            let t = self.timers;
            let Some(p) = self.peers.get(&id) else {
                continue;
            };
            if p.wants_handshake(now, &t) {
                if !p.sessions.is_empty() && p.pending.is_none() {
                    self.counters.rekeys.inc();
                }
                self.initiate(id, now, wall_ns);
            }
        }
    }

    fn expire(&mut self, id: u32, now: Duration) {
        let reject = self.timers.reject_after;
        let Some(p) = self.peers.get_mut(&id) else {
            return;
        };
        let before = p.sessions.len();
        let (keep, old): (Vec<_>, Vec<_>) = p
            .sessions
            .drain(..)
            .partition(|s| now < s.created() + reject && s.sent() < REJECT_AFTER_MESSAGES);
        p.sessions = keep;
        if p.sessions.len() != before {
            for s in old {
                self.indices.remove(&s.local_index());
                self.counters.expired.inc();
            }
            self.changed = true;
        }
    }

    fn initiate(&mut self, to: u32, now: Duration, wall_ns: u64) {
        let index = self.alloc_index(to);
        self.last_timestamp = wall_ns.max(self.last_timestamp + 1);
        let mut body = handshake::init(index);
        let Some(p) = self.peers.get(&to) else { return };
        let noise_out: &mut [u8; handshake::INIT_NOISE_LEN] =
            (&mut body[4..]).try_into().expect("init body layout");
        let started = noise::Initiator::start(
            &self.private,
            &p.key,
            self.me,
            to,
            index,
            self.last_timestamp,
            noise_out,
        );
        let Ok(state) = started else {
            // A key the peer's side cannot use: nothing to retry soon.
            self.indices.remove(&index);
            tracing::warn!(peer = to, "cannot start a handshake: unusable key");
            if let Some(p) = self.peers.get_mut(&to) {
                p.next_attempt = now + self.timers.reject_after;
            }
            return;
        };
        let p = self.peers.get_mut(&to).expect("looked up above");
        if let Some(old) = p.pending.replace(Pending {
            state,
            index,
            sent_at: now,
            resend: false,
        }) {
            self.indices.remove(&old.index);
        }
        self.counters.initiations.inc();
        self.out.push_back(Transmit::Init { to, body });
    }

    /// A `HandshakeInit` from `from` (the packet's source, which the Noise
    /// handshake authenticates: a wrong claim fails).
    pub fn handle_init(&mut self, now: Duration, from: u32, body: &[u8]) -> Result<(), Refused> {
        let r = self.answer(now, from, body);
        if let Err(e) = r {
            self.count(e);
        }
        r
    }

    fn answer(&mut self, now: Duration, from: u32, body: &[u8]) -> Result<(), Refused> {
        let init = Init::new_checked(body).map_err(|_| Refused::Malformed)?;
        let p = self.peers.get(&from).ok_or(Refused::UnknownPeer)?;
        if p.last_answer
            .is_some_and(|t| now < t + self.timers.min_answer_interval)
        {
            return Err(Refused::RateLimited);
        }
        // Both sides initiated at once: the lower id's initiation wins, so
        // exactly one session results. But the peer's initiation proves it
        // is up and knows us now, which it may not have when ours left (it
        // started later, or learnt of us later): ours, if not just sent, is
        // sent again at once rather than after the retry interval.
        if self.me < from {
            let p = self.peers.get_mut(&from).expect("looked up above");
            if let Some(ours) = &mut p.pending {
                ours.resend |= now >= ours.sent_at + COLLISION_RESEND;
                return Err(Refused::Collision);
            }
        }
        let p = self.peers.get(&from).expect("looked up above");
        let key = p.key;
        let index = self.alloc_index(from);
        let mut reply = handshake::response(index, init.sender_index());
        let noise_out: &mut [u8; handshake::RESPONSE_NOISE_LEN] =
            (&mut reply[8..]).try_into().expect("response body layout");
        let answered = noise::respond(
            &self.private,
            &key,
            self.me,
            from,
            init.sender_index(),
            index,
            init.noise(),
            noise_out,
        )
        .map_err(|_| Refused::Forged)
        .and_then(|(timestamp, keys)| {
            let floor = self.peers.get(&from).map_or(u64::MAX, |p| p.last_timestamp);
            if timestamp <= floor {
                return Err(Refused::Replayed);
            }
            Ok((timestamp, keys))
        });
        let (timestamp, keys) = match answered {
            Ok(v) => v,
            Err(e) => {
                self.indices.remove(&index);
                return Err(e);
            }
        };
        let session = Session::new(
            from,
            index,
            init.sender_index(),
            &keys.send,
            &keys.recv,
            false,
            now,
        );
        let p = self.peers.get_mut(&from).expect("looked up above");
        p.last_timestamp = timestamp;
        p.last_answer = Some(now);
        if let Some(old) = p.pending.take() {
            self.indices.remove(&old.index);
        }
        self.add_session(from, session);
        self.counters.responses.inc();
        self.out.push_back(Transmit::Response {
            to: from,
            body: reply,
        });
        Ok(())
    }

    /// A `HandshakeResponse` from `from`.
    pub fn handle_response(
        &mut self,
        now: Duration,
        from: u32,
        body: &[u8],
    ) -> Result<(), Refused> {
        let r = self.finish(now, from, body);
        if let Err(e) = r {
            self.count(e);
        }
        r
    }

    fn finish(&mut self, now: Duration, from: u32, body: &[u8]) -> Result<(), Refused> {
        let resp = Response::new_checked(body).map_err(|_| Refused::Malformed)?;
        let p = self.peers.get_mut(&from).ok_or(Refused::UnknownPeer)?;
        if p.pending.as_ref().map(|x| x.index) != Some(resp.receiver_index()) {
            return Err(Refused::NoPending);
        }
        let pending = p.pending.take().expect("checked above");
        let keys = match pending.state.finish(resp.noise(), resp.sender_index()) {
            Ok(k) => k,
            Err(_) => {
                // The state is spent; a new initiation goes out at the
                // next timeout after the retry interval.
                self.indices.remove(&pending.index);
                p.next_attempt = pending.sent_at + self.timers.retry;
                return Err(Refused::Forged);
            }
        };
        let session = Session::new(
            from,
            pending.index,
            resp.sender_index(),
            &keys.send,
            &keys.recv,
            true,
            now,
        );
        self.add_session(from, session);
        self.counters.completed.inc();
        self.out.push_back(Transmit::Keepalive { to: from });
        Ok(())
    }

    fn add_session(&mut self, peer: u32, s: Session) {
        let Some(p) = self.peers.get_mut(&peer) else {
            return;
        };
        p.sessions.insert(0, Arc::new(s));
        if p.sessions.len() > SESSIONS_PER_PEER {
            for old in p.sessions.split_off(SESSIONS_PER_PEER) {
                self.indices.remove(&old.local_index());
            }
        }
        self.changed = true;
    }

    fn count(&self, e: Refused) {
        let c = &self.counters;
        match e {
            Refused::Malformed => c.drop_malformed.inc(),
            Refused::UnknownPeer => c.drop_unknown_peer.inc(),
            Refused::Forged => c.drop_forged.inc(),
            Refused::Replayed => c.drop_replayed.inc(),
            Refused::Collision => c.drop_collision.inc(),
            Refused::NoPending => c.drop_no_pending.inc(),
            Refused::RateLimited => c.drop_rate_limited.inc(),
        }
    }

    /// When `handle_timeout` should next run.
    pub fn poll_timeout(&self) -> Option<Duration> {
        let t = &self.timers;
        self.peers
            .values()
            .filter_map(|p| {
                let due = match (&p.pending, p.sessions.first()) {
                    (Some(x), _) => x.due(t),
                    (None, None) => p.next_attempt,
                    (None, Some(s)) => s.created() + t.rekey_after,
                };
                let expiry = p.sessions.last().map(|s| s.created() + t.reject_after);
                [Some(due.max(p.next_attempt)), expiry]
                    .into_iter()
                    .flatten()
                    .min()
            })
            .min()
    }

    pub fn poll_transmit(&mut self) -> Option<Transmit> {
        self.out.pop_front()
    }

    /// A new snapshot for the data path, when sessions changed.
    pub fn poll_table(&mut self) -> Option<Arc<SessionTable>> {
        if !std::mem::take(&mut self.changed) {
            return None;
        }
        let mut t = SessionTable::default();
        for (id, p) in &self.peers {
            for s in &p.sessions {
                t.by_index.insert(s.local_index(), s.clone());
            }
            if !p.sessions.is_empty() {
                t.by_peer.insert(*id, p.sessions.clone());
            }
        }
        self.table = Arc::new(t);
        Some(self.table.clone())
    }

    pub fn status(&self, now: Duration) -> Vec<PeerStatus> {
        let mut v: Vec<PeerStatus> = self
            .peers
            .iter()
            .map(|(id, p)| PeerStatus {
                peer: *id,
                sessions: p.sessions.len(),
                session_age_ms: p
                    .sessions
                    .iter()
                    .find(|s| s.is_confirmed())
                    .map(|s| now.saturating_sub(s.created()).as_millis() as u64),
                handshake_pending: p.pending.is_some(),
            })
            .collect();
        v.sort_by_key(|s| s.peer);
        v
    }
}

/// Sessions between every pair of `ids`, made by real handshakes run in
/// memory, with every session confirmed both ways: what each proxy's data
/// path would hold once its tunnels are up. For tests, fuzzing and
/// benchmarks of the data path.
pub fn local_mesh(ids: &[u32]) -> HashMap<u32, Arc<SessionTable>> {
    let now = Duration::ZERO;
    let keys: Vec<(u32, [u8; 32], [u8; 32])> = ids
        .iter()
        .map(|id| {
            let (private, public) = generate_keypair();
            (*id, private, public)
        })
        .collect();
    let mut nodes: HashMap<u32, Tunnels> = keys
        .iter()
        .map(|(id, private, _)| {
            let mut t = Tunnels::new(*id, *private, Timers::default());
            let peers: Vec<_> = keys.iter().map(|(p, _, public)| (*p, *public)).collect();
            t.set_peers(now, &peers);
            t.handle_timeout(now, 1);
            (*id, t)
        })
        .collect();
    // Deliver until quiet; a keepalive confirms the responder's session
    // as the data path would, by opening a packet sealed with it.
    loop {
        let mut msgs = Vec::new();
        for (id, t) in nodes.iter_mut() {
            while let Some(m) = t.poll_transmit() {
                msgs.push((*id, m));
            }
        }
        if msgs.is_empty() {
            break;
        }
        for (from, m) in msgs {
            match m {
                Transmit::Init { to, body } => {
                    let _ = nodes.get_mut(&to).map(|t| t.handle_init(now, from, &body));
                }
                Transmit::Response { to, body } => {
                    let _ = nodes
                        .get_mut(&to)
                        .map(|t| t.handle_response(now, from, &body));
                }
                Transmit::Keepalive { .. } => {}
            }
        }
    }
    let mut tables: HashMap<u32, Arc<SessionTable>> = nodes
        .iter_mut()
        .map(|(id, t)| (*id, t.poll_table().unwrap_or_default()))
        .collect();
    for s in tables.values().flat_map(|t| t.by_index.values()) {
        s.confirm();
    }
    tables.shrink_to_fit();
    tables
}

#[cfg(test)]
mod tests;
