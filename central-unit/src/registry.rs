//! The CU's protocol logic, without I/O: a registry fed with events
//! (register, heartbeat, goodbye, connection closed, time passing) and an
//! explicit `now`, returning actions (send, close, persist). The QUIC server
//! only moves bytes between connections and this struct.

use crate::policy::Policy;
use pon_proto::control::{
    valid_name, valid_role, AgentInfo, AgentRecord, Change, Config, Endpoints, Peer, Register,
    PROTOCOL_VERSION,
};
use std::collections::HashMap;
use std::time::Duration;

/// Identifies one connection in the I/O layer.
pub type ConnId = u64;

#[derive(Debug, Clone)]
pub struct Settings {
    pub token: String,
    /// How often agents send heartbeats.
    pub heartbeat: Duration,
    /// Silence after which an agent is declared gone.
    pub dead_after: Duration,
    /// After a CU restart, how long agents known from the store have to
    /// reconnect before they are announced as gone.
    pub restart_grace: Duration,
}

impl Default for Settings {
    fn default() -> Self {
        Settings {
            token: String::new(),
            heartbeat: Duration::from_millis(500),
            dead_after: Duration::from_millis(2000),
            restart_grace: Duration::from_secs(10),
        }
    }
}

/// Why an agent left; a metrics label.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LeaveReason {
    Goodbye,
    Closed,
    MissedHeartbeats,
    NotBack,
}

impl LeaveReason {
    pub fn label(self) -> &'static str {
        match self {
            LeaveReason::Goodbye => "goodbye",
            LeaveReason::Closed => "closed",
            LeaveReason::MissedHeartbeats => "missed_heartbeats",
            LeaveReason::NotBack => "not_back_after_restart",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outgoing {
    Config(Config),
    Changes(Vec<Change>),
    Refused(String),
    Registry(Vec<AgentRecord>),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    Send {
        conn: ConnId,
        msg: Outgoing,
    },
    /// Close the connection (after sending what was queued before).
    Close {
        conn: ConnId,
        reason: String,
    },
    /// Write this record to the store.
    Persist(AgentRecord),
}

/// A refused registration, as returned to the I/O layer for its metrics.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    Version,
    Token,
    Invalid,
}

impl Refusal {
    pub fn label(self) -> &'static str {
        match self {
            Refusal::Version => "bad_version",
            Refusal::Token => "bad_token",
            Refusal::Invalid => "invalid_register",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Presence {
    Online {
        last_heard: Duration,
    },
    /// Known from the store after a restart, not reconnected yet: still
    /// part of everyone's view so a restart changes nothing on the data path.
    Pending {
        deadline: Duration,
    },
    Offline,
}

#[derive(Debug)]
struct Entry {
    info: AgentInfo,
    conn: Option<ConnId>,
    presence: Presence,
    last_seen_ms: u64,
}

impl Entry {
    fn present(&self) -> bool {
        !matches!(self.presence, Presence::Offline)
    }
    fn record(&self) -> AgentRecord {
        AgentRecord {
            info: self.info.clone(),
            online: self.present(),
            last_seen_ms: self.last_seen_ms,
        }
    }
}

/// Whether `receiver` needs to know `subject`, and if so whether it must
/// optimise towards it. Routers (and proxy components) see every proxy and
/// every app VM (their own as local agents, others as destinations); an
/// app's TA sees the proxies (its own cloud's is its forwarder; the others
/// tell which remote clouds the overlay can reach) and the app VMs of other
/// clouds (what to intercept).
pub fn relation(policy: &Policy, receiver: &AgentInfo, subject: &AgentInfo) -> Option<bool> {
    if receiver.id == subject.id {
        return None;
    }
    match (&receiver.endpoints, &subject.endpoints) {
        (Endpoints::App { .. }, Endpoints::Proxy { .. }) => Some(false),
        (Endpoints::App { .. }, Endpoints::App { .. }) => {
            (receiver.cloud != subject.cloud).then_some(false)
        }
        (Endpoints::App { .. }, Endpoints::Other { .. }) => None,
        (_, Endpoints::Proxy { .. }) => Some(policy.optimises(&receiver.role, &subject.role)),
        (_, Endpoints::App { .. }) => Some(false),
        (_, Endpoints::Other { .. }) => None,
    }
}

fn role_family_matches(role: &str, endpoints: &Endpoints) -> bool {
    let family = role.split('.').next().unwrap_or("");
    match endpoints {
        Endpoints::Proxy { .. } => family == "PROXY",
        Endpoints::App { .. } => family == "APP",
        Endpoints::Other { .. } => family != "PROXY" && family != "APP",
    }
}

/// Compares secrets without an early exit, so timing does not leak how much
/// of a guessed token was right.
fn same_secret(a: &str, b: &str) -> bool {
    let (a, b) = (a.as_bytes(), b.as_bytes());
    let mut diff = a.len() ^ b.len();
    for i in 0..a.len().max(b.len()) {
        diff |= usize::from(a.get(i).copied().unwrap_or(0) ^ b.get(i).copied().unwrap_or(0xff));
    }
    diff == 0
}

pub struct Registry {
    settings: Settings,
    policy: Policy,
    agents: HashMap<u32, Entry>,
    by_key: HashMap<(String, String), u32>,
    by_conn: HashMap<ConnId, u32>,
    next_id: u32,
}

impl Registry {
    pub fn new(settings: Settings, policy: Policy) -> Self {
        Registry {
            settings,
            policy,
            agents: HashMap::new(),
            by_key: HashMap::new(),
            by_conn: HashMap::new(),
            next_id: 1,
        }
    }

    /// Loads what the store kept. Agents that were online are kept in
    /// everyone's view for `dead_after + restart_grace`, waiting to reconnect.
    pub fn restore(&mut self, records: impl IntoIterator<Item = AgentRecord>, now: Duration) {
        let deadline = now + self.settings.dead_after + self.settings.restart_grace;
        for r in records {
            let id = r.info.id;
            if id == 0 || self.agents.contains_key(&id) {
                continue;
            }
            self.next_id = self.next_id.max(id.saturating_add(1));
            self.by_key
                .insert((r.info.cloud.clone(), r.info.name.clone()), id);
            self.agents.insert(
                id,
                Entry {
                    info: r.info,
                    conn: None,
                    presence: if r.online {
                        Presence::Pending { deadline }
                    } else {
                        Presence::Offline
                    },
                    last_seen_ms: r.last_seen_ms,
                },
            );
        }
    }

    pub fn settings(&self) -> &Settings {
        &self.settings
    }

    pub fn len(&self) -> usize {
        self.agents.len()
    }

    pub fn is_empty(&self) -> bool {
        self.agents.is_empty()
    }

    pub fn online(&self) -> usize {
        self.agents
            .values()
            .filter(|e| matches!(e.presence, Presence::Online { .. }))
            .count()
    }

    pub fn id_of(&self, conn: ConnId) -> Option<u32> {
        self.by_conn.get(&conn).copied()
    }

    /// The registry for `ponctl`, sorted by id.
    pub fn records(&self) -> Vec<AgentRecord> {
        let mut v: Vec<_> = self.agents.values().map(Entry::record).collect();
        v.sort_by_key(|r| r.info.id);
        v
    }

    /// `ponctl`'s query: the registry, for holders of the join token.
    pub fn list(&self, conn: ConnId, token: &str) -> Vec<Action> {
        let mut out = Vec::new();
        if !same_secret(token, &self.settings.token) {
            Self::refuse(conn, "wrong join token".into(), &mut out);
            return out;
        }
        out.push(Action::Send {
            conn,
            msg: Outgoing::Registry(self.records()),
        });
        out.push(Action::Close {
            conn,
            reason: "done".into(),
        });
        out
    }

    fn refuse(conn: ConnId, why: String, out: &mut Vec<Action>) {
        out.push(Action::Send {
            conn,
            msg: Outgoing::Refused(why.clone()),
        });
        out.push(Action::Close { conn, reason: why });
    }

    fn check_register(&self, r: &Register) -> Result<(), (Refusal, String)> {
        if r.version != PROTOCOL_VERSION {
            return Err((
                Refusal::Version,
                format!(
                    "protocol version {} is not supported (the CU speaks {PROTOCOL_VERSION})",
                    r.version
                ),
            ));
        }
        if !same_secret(&r.token, &self.settings.token) {
            return Err((Refusal::Token, "wrong join token".into()));
        }
        if !valid_name(&r.cloud) {
            return Err((Refusal::Invalid, format!("invalid cloud id {:?}", r.cloud)));
        }
        if !valid_name(&r.name) {
            return Err((Refusal::Invalid, format!("invalid agent name {:?}", r.name)));
        }
        if !valid_role(&r.role) {
            return Err((
                Refusal::Invalid,
                format!("invalid role {:?} (expected e.g. PROXY.SRC)", r.role),
            ));
        }
        if !role_family_matches(&r.role, &r.endpoints) {
            return Err((
                Refusal::Invalid,
                format!("role {} does not match the endpoints sent", r.role),
            ));
        }
        if let Endpoints::Other { addrs } = &r.endpoints {
            if addrs.len() > 16 {
                return Err((Refusal::Invalid, "more than 16 addresses".into()));
            }
        }
        Ok(())
    }

    /// R: a registration on `conn`. Returns the actions and, if refused, why.
    pub fn register(
        &mut self,
        conn: ConnId,
        r: Register,
        now: Duration,
        wall_ms: u64,
    ) -> (Vec<Action>, Option<Refusal>) {
        let mut out = Vec::new();
        if let Err((why, text)) = self.check_register(&r) {
            Self::refuse(conn, text, &mut out);
            return (out, Some(why));
        }
        if self.by_conn.contains_key(&conn) {
            Self::refuse(
                conn,
                "already registered on this connection".into(),
                &mut out,
            );
            return (out, Some(Refusal::Invalid));
        }
        let key = (r.cloud.clone(), r.name.clone());
        let id = match self.by_key.get(&key) {
            Some(&id) => id,
            None => {
                let id = match r.id_hint {
                    Some(h) if h != 0 && h != u32::MAX && !self.agents.contains_key(&h) => h,
                    _ => {
                        while self.agents.contains_key(&self.next_id) || self.next_id == 0 {
                            self.next_id = self.next_id.wrapping_add(1);
                        }
                        self.next_id
                    }
                };
                self.next_id = self.next_id.max(id.saturating_add(1));
                self.by_key.insert(key, id);
                id
            }
        };
        let info = AgentInfo {
            id,
            cloud: r.cloud,
            role: r.role,
            name: r.name,
            endpoints: r.endpoints,
        };
        let old = self.agents.remove(&id);
        if let Some(old_conn) = old.as_ref().and_then(|e| e.conn) {
            // The same agent on a newer connection (it restarted, or its
            // old connection has not timed out yet): the new one wins.
            self.by_conn.remove(&old_conn);
            out.push(Action::Close {
                conn: old_conn,
                reason: "replaced by a newer connection of the same agent".into(),
            });
        }
        let before = old.filter(Entry::present).map(|e| e.info);
        self.announce(before.as_ref(), Some(&info), &mut out);
        let entry = Entry {
            info,
            conn: Some(conn),
            presence: Presence::Online { last_heard: now },
            last_seen_ms: wall_ms,
        };
        out.push(Action::Persist(entry.record()));
        self.agents.insert(id, entry);
        self.by_conn.insert(conn, id);
        out.push(Action::Send {
            conn,
            msg: Outgoing::Config(self.config_for(id)),
        });
        (out, None)
    }

    /// The full configuration of agent `id` (also used to resync an agent
    /// whose updates could not be queued).
    pub fn config_for(&self, id: u32) -> Config {
        let me = &self.agents[&id].info;
        let mut peers: Vec<Peer> = self
            .agents
            .values()
            .filter(|e| e.present())
            .filter_map(|e| {
                relation(&self.policy, me, &e.info).map(|optimise| Peer {
                    info: e.info.clone(),
                    optimise,
                })
            })
            .collect();
        peers.sort_by_key(|p| p.info.id);
        Config {
            id,
            heartbeat_ms: self.settings.heartbeat.as_millis() as u32,
            dead_after_ms: self.settings.dead_after.as_millis() as u32,
            peers,
        }
    }

    /// Tells every connected agent concerned what changed between `before`
    /// and `after` (None: absent).
    fn announce(
        &self,
        before: Option<&AgentInfo>,
        after: Option<&AgentInfo>,
        out: &mut Vec<Action>,
    ) {
        if before == after {
            return;
        }
        for e in self.agents.values() {
            let Some(conn) = e.conn else { continue };
            let old = before.and_then(|b| relation(&self.policy, &e.info, b));
            let new = after.and_then(|a| relation(&self.policy, &e.info, a));
            let change = match (old, new, after) {
                (_, Some(optimise), Some(a)) => Change::Up(Peer {
                    info: a.clone(),
                    optimise,
                }),
                (Some(_), None, _) => Change::Down(before.map_or(0, |b| b.id)),
                _ => continue,
            };
            out.push(Action::Send {
                conn,
                msg: Outgoing::Changes(vec![change]),
            });
        }
    }

    pub fn heartbeat(&mut self, conn: ConnId, now: Duration, wall_ms: u64) {
        if let Some(e) = self
            .by_conn
            .get(&conn)
            .and_then(|id| self.agents.get_mut(id))
        {
            e.presence = Presence::Online { last_heard: now };
            e.last_seen_ms = wall_ms;
        }
    }

    /// `heard_ms`: when we last heard from it, if the leave itself is news
    /// from the agent (goodbye, close); silence keeps the last heartbeat's time.
    fn leave(&mut self, id: u32, heard_ms: Option<u64>, out: &mut Vec<Action>) {
        let Some(e) = self.agents.get_mut(&id) else {
            return;
        };
        if let Some(c) = e.conn.take() {
            self.by_conn.remove(&c);
        }
        if !e.present() {
            return;
        }
        e.presence = Presence::Offline;
        if let Some(ms) = heard_ms {
            e.last_seen_ms = ms;
        }
        let info = e.info.clone();
        out.push(Action::Persist(e.record()));
        self.announce(Some(&info), None, out);
    }

    /// The agent on `conn` left: clean goodbye, or its connection closed.
    /// Returns the agent's id if this connection was its current one.
    pub fn disconnected(
        &mut self,
        conn: ConnId,
        goodbye: bool,
        wall_ms: u64,
    ) -> (Vec<Action>, Option<(u32, LeaveReason)>) {
        let mut out = Vec::new();
        let Some(id) = self.by_conn.get(&conn).copied() else {
            return (out, None);
        };
        if goodbye {
            out.push(Action::Close {
                conn,
                reason: "goodbye".into(),
            });
        }
        self.leave(id, Some(wall_ms), &mut out);
        let why = if goodbye {
            LeaveReason::Goodbye
        } else {
            LeaveReason::Closed
        };
        (out, Some((id, why)))
    }

    /// Time passes: agents silent for `dead_after` and restored agents that
    /// did not come back are announced as gone.
    pub fn tick(&mut self, now: Duration) -> (Vec<Action>, Vec<(u32, LeaveReason)>) {
        let dead_after = self.settings.dead_after;
        let gone: Vec<(u32, LeaveReason)> = self
            .agents
            .iter()
            .filter_map(|(id, e)| match e.presence {
                Presence::Online { last_heard } if now.saturating_sub(last_heard) > dead_after => {
                    Some((*id, LeaveReason::MissedHeartbeats))
                }
                Presence::Pending { deadline } if now >= deadline => {
                    Some((*id, LeaveReason::NotBack))
                }
                _ => None,
            })
            .collect();
        let mut out = Vec::new();
        for &(id, _) in &gone {
            if let Some(conn) = self.agents[&id].conn {
                out.push(Action::Close {
                    conn,
                    reason: format!("no heartbeat for {} ms", dead_after.as_millis()),
                });
            }
            self.leave(id, None, &mut out);
        }
        (out, gone)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use pon_proto::Encap;
    use std::net::Ipv4Addr;

    fn reg(cloud: &str, name: &str, role: &str, last: u8) -> Register {
        let a = Ipv4Addr::new(198, 18, 1, last);
        Register {
            version: PROTOCOL_VERSION,
            token: "secret".into(),
            cloud: cloud.into(),
            role: role.into(),
            name: name.into(),
            endpoints: if role.starts_with("PROXY") {
                Endpoints::proxy(a)
            } else {
                Endpoints::App {
                    addr: a,
                    encap: Encap::Ipip,
                }
            },
            id_hint: None,
        }
    }

    fn cu() -> Registry {
        Registry::new(
            Settings {
                token: "secret".into(),
                ..Settings::default()
            },
            Policy::default(),
        )
    }

    /// A CU with proxies registered on connections 1, 2, ... (one per
    /// cloud, each `n`-th at 198.18.1.`n`), and the time they did.
    fn with_proxies(clouds: &[&str]) -> (Registry, Duration) {
        let mut r = cu();
        let t = Duration::ZERO;
        for (n, cloud) in (1..).zip(clouds) {
            r.register(u64::from(n), reg(cloud, "p", "PROXY", n), t, 1);
        }
        (r, t)
    }

    /// The messages `actions` send to `conn`.
    fn sent_to(actions: &[Action], conn: ConnId) -> impl Iterator<Item = &Outgoing> {
        actions.iter().filter_map(move |a| match a {
            Action::Send { conn: c, msg } if *c == conn => Some(msg),
            _ => None,
        })
    }

    fn config_of(actions: &[Action], conn: ConnId) -> Config {
        sent_to(actions, conn)
            .find_map(|m| match m {
                Outgoing::Config(cfg) => Some(cfg.clone()),
                _ => None,
            })
            .expect("a config")
    }

    fn changes_to(actions: &[Action], conn: ConnId) -> Vec<Change> {
        sent_to(actions, conn)
            .filter_map(|m| match m {
                Outgoing::Changes(ch) => Some(ch.clone()),
                _ => None,
            })
            .flatten()
            .collect()
    }

    #[test]
    fn register_assigns_ids_and_configs_follow_the_role_policy() {
        let mut r = cu();
        let t = Duration::ZERO;
        let (a, _) = r.register(1, reg("paris", "proxy", "PROXY.SRC", 1), t, 1);
        assert_eq!(config_of(&a, 1).id, 1);
        assert!(config_of(&a, 1).peers.is_empty());
        let (a, _) = r.register(2, reg("tokyo", "proxy", "PROXY.DST", 2), t, 1);
        let cfg = config_of(&a, 2);
        assert_eq!(cfg.id, 2);
        // DST does not optimise towards SRC ...
        assert_eq!(cfg.peers.len(), 1);
        assert!(!cfg.peers[0].optimise);
        // ... but SRC is told about DST and must optimise towards it.
        match &changes_to(&a, 1)[..] {
            [Change::Up(p)] => assert!(p.optimise && p.info.id == 2),
            other => panic!("{other:?}"),
        }
        // An app in paris: its TA gets the proxies, and both proxies learn of it.
        let (a, _) = r.register(3, reg("paris", "app1", "APP", 11), t, 1);
        let cfg = config_of(&a, 3);
        assert_eq!(
            cfg.peers.iter().map(|p| p.info.id).collect::<Vec<_>>(),
            vec![1, 2]
        );
        assert_eq!(changes_to(&a, 1).len(), 1);
        assert_eq!(changes_to(&a, 2).len(), 1);
        // An app in tokyo: it learns of the paris app and the paris app of it.
        let (a, _) = r.register(4, reg("tokyo", "app1", "APP", 12), t, 1);
        let cfg = config_of(&a, 4);
        assert_eq!(
            cfg.peers.iter().map(|p| p.info.id).collect::<Vec<_>>(),
            vec![1, 2, 3]
        );
        assert_eq!(changes_to(&a, 3).len(), 1);
        // A second app in tokyo is not news to the first one.
        let (a, _) = r.register(5, reg("tokyo", "app2", "APP", 13), t, 1);
        assert!(changes_to(&a, 4).is_empty());
        assert_eq!(changes_to(&a, 3).len(), 1);
    }

    #[test]
    fn master_and_slave_optimise_both_ways_plain_proxy_towards_all() {
        let mut r = cu();
        let t = Duration::ZERO;
        r.register(1, reg("a", "p", "PROXY.MASTER", 1), t, 1);
        let (a, _) = r.register(2, reg("b", "p", "PROXY.SLAVE", 2), t, 1);
        assert!(config_of(&a, 2).peers[0].optimise);
        let (a, _) = r.register(3, reg("c", "p", "PROXY", 3), t, 1);
        assert!(config_of(&a, 3).peers.iter().all(|p| p.optimise));
        // The master does not optimise towards a plain proxy.
        match &changes_to(&a, 1)[..] {
            [Change::Up(p)] => assert!(!p.optimise),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn ids_are_stable_and_hints_are_honoured_when_free() {
        let mut r = cu();
        let t = Duration::ZERO;
        let mut h = reg("paris", "proxy", "PROXY", 1);
        h.id_hint = Some(7);
        let (a, _) = r.register(1, h.clone(), t, 1);
        assert_eq!(config_of(&a, 1).id, 7);
        r.disconnected(1, true, 2);
        // Comes back on a new connection, other hint: same id.
        h.id_hint = Some(9);
        let (a, _) = r.register(2, h, t, 3);
        assert_eq!(config_of(&a, 2).id, 7);
        // A taken hint is not granted.
        let mut o = reg("tokyo", "proxy", "PROXY", 2);
        o.id_hint = Some(7);
        let (a, _) = r.register(3, o, t, 3);
        assert_eq!(config_of(&a, 3).id, 8);
    }

    #[test]
    fn leaving_is_announced_for_goodbye_close_and_silence() {
        let (mut r, t) = with_proxies(&["a", "b", "c"]);
        let (a, who) = r.disconnected(2, true, 5);
        assert_eq!(who, Some((2, LeaveReason::Goodbye)));
        assert_eq!(changes_to(&a, 1), vec![Change::Down(2)]);
        assert_eq!(changes_to(&a, 3), vec![Change::Down(2)]);
        // 1 keeps sending heartbeats, 3 falls silent.
        let later = t + Duration::from_millis(1500);
        r.heartbeat(1, later, 6);
        let (a, gone) = r.tick(t + Duration::from_millis(2100));
        assert_eq!(gone, vec![(3, LeaveReason::MissedHeartbeats)]);
        assert_eq!(changes_to(&a, 1), vec![Change::Down(3)]);
        assert!(a.contains(&Action::Close {
            conn: 3,
            reason: "no heartbeat for 2000 ms".into()
        }));
        assert_eq!(r.online(), 1);
        // A closed connection is a leave too; a second close is a no-op.
        let (_, who) = r.disconnected(1, false, 8);
        assert_eq!(who, Some((1, LeaveReason::Closed)));
        assert_eq!(r.disconnected(1, false, 8).1, None);
    }

    #[test]
    fn a_newer_connection_replaces_the_old_one_silently() {
        let (mut r, t) = with_proxies(&["a", "b"]);
        let (a, _) = r.register(3, reg("b", "p", "PROXY", 2), t, 1);
        assert!(a.contains(&Action::Close {
            conn: 2,
            reason: "replaced by a newer connection of the same agent".into()
        }));
        // Same addresses: nothing to tell the others.
        assert!(changes_to(&a, 1).is_empty());
        // The old connection closing later does not make it leave.
        assert_eq!(r.disconnected(2, false, 2).1, None);
        // New addresses: the others hear of it.
        let (a, _) = r.register(4, reg("b", "p", "PROXY", 9), t, 1);
        assert_eq!(changes_to(&a, 1).len(), 1);
    }

    #[test]
    fn refusals_name_the_problem() {
        let mut r = cu();
        let t = Duration::ZERO;
        let mut bad = reg("a", "p", "PROXY", 1);
        bad.token = "nope".into();
        let (a, why) = r.register(1, bad, t, 1);
        assert_eq!(why, Some(Refusal::Token));
        assert_eq!(
            a[0],
            Action::Send {
                conn: 1,
                msg: Outgoing::Refused("wrong join token".into())
            }
        );
        let mut bad = reg("a", "p", "PROXY", 1);
        bad.role = "APP".into();
        assert_eq!(r.register(2, bad, t, 1).1, Some(Refusal::Invalid));
        let mut bad = reg("a", "p", "PROXY", 1);
        bad.version = 99;
        assert_eq!(r.register(3, bad, t, 1).1, Some(Refusal::Version));
        let mut bad = reg("a b", "p", "PROXY", 1);
        bad.cloud = "a b".into();
        assert_eq!(r.register(4, bad, t, 1).1, Some(Refusal::Invalid));
        assert!(r.is_empty());
    }

    #[test]
    fn restored_agents_stay_in_views_until_the_grace_ends() {
        let (r, t) = with_proxies(&["a", "b"]);
        let saved = r.records();
        let mut r2 = cu();
        r2.restore(saved, t);
        // a comes back first: its config still has b, so its table is unchanged.
        let (a, _) = r2.register(10, reg("a", "p", "PROXY", 1), t, 2);
        assert_eq!(config_of(&a, 10).id, 1);
        assert_eq!(config_of(&a, 10).peers[0].info.id, 2);
        assert!(changes_to(&a, 10).is_empty());
        // b never comes back.
        let end = t + Duration::from_secs(13);
        r2.heartbeat(10, end, 3);
        let (a, gone) = r2.tick(end);
        assert_eq!(gone, vec![(2, LeaveReason::NotBack)]);
        assert_eq!(changes_to(&a, 10), vec![Change::Down(2)]);
        // b's id stays reserved for b.
        let (a, _) = r2.register(11, reg("b", "p", "PROXY", 2), end, 4);
        assert_eq!(config_of(&a, 11).id, 2);
    }
}
