//! The CU's protocol logic, without I/O: a registry fed with events
//! (enrol, register, heartbeat, goodbye, connection closed, admin requests,
//! time passing) and an explicit `now`, returning actions (send, close,
//! persist). The QUIC server only moves bytes between connections and this
//! struct, and supplies what needs the CA or randomness.

use crate::policy::Policy;
pub use crate::trust::Refusal;
use crate::trust::{claims, Enrolment, Grants, KeyId, Refused, TokenRecord, Trust};
use pon_proto::control::{
    valid_name, valid_role, AdminRequest, AgentInfo, AgentRecord, Change, Config, Endpoints, Enrol,
    Peer, Register, TokenInfo, PROTOCOL_VERSION,
};
use std::collections::{BTreeMap, HashMap};
use std::net::IpAddr;
use std::time::Duration;

mod index;
mod remote;
use index::Index;
pub use remote::{IdBlocks, ID_BLOCK};

/// Identifies one connection in the I/O layer.
pub type ConnId = u64;

#[derive(Debug, Clone)]
pub struct Settings {
    /// How often agents send heartbeats.
    pub heartbeat: Duration,
    /// Silence after which an agent is declared gone.
    pub dead_after: Duration,
    /// After a CU restart, how long agents known from the store have to
    /// reconnect before they are announced as gone.
    pub restart_grace: Duration,
    /// The prefixes each cloud may use.
    pub grants: Grants,
    /// Keys of the admin certificates (`ponctl`).
    pub admins: Vec<KeyId>,
    /// Agent records offline this long (by wall clock) are forgotten:
    /// their ids and names are free again. None keeps them.
    pub forget_offline_after: Option<Duration>,
}

impl Default for Settings {
    fn default() -> Self {
        Settings {
            heartbeat: Duration::from_millis(500),
            dead_after: Duration::from_millis(2000),
            restart_grace: Duration::from_secs(10),
            grants: Grants::default(),
            admins: Vec::new(),
            forget_offline_after: None,
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
    Revoked,
}

impl LeaveReason {
    pub fn label(self) -> &'static str {
        match self {
            LeaveReason::Goodbye => "goodbye",
            LeaveReason::Closed => "closed",
            LeaveReason::MissedHeartbeats => "missed_heartbeats",
            LeaveReason::NotBack => "not_back_after_restart",
            LeaveReason::Revoked => "revoked",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outgoing {
    Config(Config),
    Changes(Vec<Change>),
    Refused(String),
    Registry(Vec<AgentRecord>),
    Enrolled(String),
    Token(String, TokenInfo),
    Tokens(Vec<TokenInfo>),
    Revoked(Option<u32>),
}

/// What the store keeps.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Record {
    Agent(AgentRecord),
    /// An agent record dropped after a long time offline (`forget_offline`).
    Forgotten(u32),
    Token(TokenRecord),
    Enrolment(Enrolment),
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
    Persist(Record),
    /// Replicated mode: this replica is running out of ids; claim another
    /// block of them (`Registry::grant_ids`).
    NeedIds,
}

/// The CA's part of an enrolment, supplied by the I/O layer: reading the
/// key out of a certificate request (after checking that the key signed
/// it), and signing a certificate for that key.
pub trait Issuer {
    fn key_of(&self, csr: &[u8]) -> Result<KeyId, String>;
    /// The certificate (PEM) for the key of `csr`, naming `e`'s identity.
    fn issue(&self, csr: &[u8], e: &Enrolment) -> Result<String, String>;
}

/// What an admin request did, for the I/O layer's log and metrics.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AdminDone {
    Listed,
    TokenCreated(TokenInfo),
    TokensListed,
    /// Revoked `cloud`/`name`; its registry id if it had one.
    Revoked {
        cloud: String,
        name: String,
        id: Option<u32>,
    },
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
    /// Replicated mode: connected to another replica (its liveness key is
    /// in the shared store); no heartbeats here.
    Remote,
    Offline,
}

#[derive(Debug)]
struct Entry {
    info: AgentInfo,
    conn: Option<ConnId>,
    presence: Presence,
    last_seen_ms: u64,
    /// The stamp (Unix ms) of the newest change of its presence known
    /// here: registered or left here, or what another replica wrote.
    /// Replicated mode: the shared store only takes a record or liveness
    /// key newer than the one it holds, and a replica ignores news older
    /// than what it knows, so late writes never undo newer ones; between
    /// two replicas both holding the agent, the later registration wins.
    /// Assumes replicas' clocks agree (NTP) to better than an agent's
    /// reconnection takes.
    changed_ms: u64,
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
/// optimise towards it. Every agent sees every proxy: a proxy carries its
/// cloud's grant (`allowed`), the prefixes TAs intercept towards that cloud
/// and ingress proxies map to it, so a remote cloud is one entry per
/// proxy, not one per app VM. App VMs concern only the proxies of their own
/// cloud (they deliver to them: their local agents) and components that
/// are neither proxies nor app VMs (monitoring); an app VM joining or
/// leaving is news to a handful of agents, not to the whole overlay.
///
/// An app VM needs of a remote cloud only its grant, which every agent
/// gets in its configuration ([`Config::clouds`]) whether the cloud has a
/// proxy or not; whether the overlay can deliver there is its local
/// proxy's to say (steering). So other clouds' proxies are no news to app
/// VMs: a cloud's first proxy joining, or its last one leaving, concerns
/// the proxies, not every TA in the overlay.
pub fn relation(policy: &Policy, receiver: &AgentInfo, subject: &AgentInfo) -> Option<bool> {
    if receiver.id == subject.id {
        return None;
    }
    match (&receiver.endpoints, &subject.endpoints) {
        (Endpoints::App { .. }, Endpoints::Proxy { .. }) => {
            (receiver.cloud == subject.cloud).then_some(false)
        }
        (Endpoints::App { .. }, _) => None,
        (_, Endpoints::Proxy { .. }) => Some(policy.optimises(&receiver.role, &subject.role)),
        (Endpoints::Proxy { .. }, Endpoints::App { .. }) => {
            (receiver.cloud == subject.cloud).then_some(false)
        }
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

fn check_version(v: u16) -> Result<(), Refused> {
    if v != PROTOCOL_VERSION {
        return Err((
            Refusal::Version,
            format!("protocol version {v} is not supported (the CU speaks {PROTOCOL_VERSION})"),
        ));
    }
    Ok(())
}

fn check_identity(cloud: &str, name: &str, role: &str) -> Result<(), Refused> {
    if !valid_name(cloud) {
        return Err((Refusal::Invalid, format!("invalid cloud id {cloud:?}")));
    }
    if !valid_name(name) {
        return Err((Refusal::Invalid, format!("invalid agent name {name:?}")));
    }
    if !valid_role(role) {
        return Err((
            Refusal::Invalid,
            format!("invalid role {role:?} (expected e.g. PROXY.SRC)"),
        ));
    }
    Ok(())
}

/// A proxy that does not know the address its peers reach it at (behind a
/// 1:1 NAT, with no `public` address configured) registers its PON port
/// with the unspecified address: the CU fills in the address it sees the
/// proxy's connection come from, as STUN would. Anything else is kept.
pub fn with_observed_address(mut endpoints: Endpoints, seen: IpAddr) -> Endpoints {
    if let Endpoints::Proxy { pon, .. } = &mut endpoints {
        if pon.ip().is_unspecified() {
            let seen = match seen {
                IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(seen, IpAddr::V4),
                v4 => v4,
            };
            pon.set_ip(seen);
        }
    }
    endpoints
}

pub struct Registry {
    settings: Settings,
    policy: Policy,
    trust: Trust,
    agents: HashMap<u32, Entry>,
    /// Who claims an address, each cloud's proxies, the other agents: in
    /// step with `agents` (`insert_entry`, `remove_entry`, `set_info`).
    index: Index,
    by_key: HashMap<(String, String), u32>,
    by_conn: HashMap<ConnId, u32>,
    next_id: u32,
    /// Replicated mode: new ids come only from blocks this replica owns.
    blocks: Option<IdBlocks>,
    /// Whether any agent has registered since the store was restored.
    /// Until one has, restored agents are not given up: a CU no agent can
    /// register with (a bad certificate, grants narrowed by mistake) must
    /// not declare the whole overlay gone, or the first agents back after
    /// the fix would get views without the others and leave their traffic
    /// to the IP path until everyone is back.
    heard_since_restore: bool,
}

impl Registry {
    pub fn new(settings: Settings, policy: Policy) -> Self {
        Registry {
            trust: Trust::new(settings.admins.iter().copied()),
            settings,
            policy,
            agents: HashMap::new(),
            index: Index::default(),
            by_key: HashMap::new(),
            by_conn: HashMap::new(),
            next_id: 1,
            blocks: None,
            heard_since_restore: true,
        }
    }

    /// Loads what the store kept. Agents that were online are kept in
    /// everyone's view for `dead_after + restart_grace`, waiting to reconnect.
    /// The grace runs from the first registration after the restore: until
    /// then nobody can tell restored agents that are gone from a CU that
    /// cannot be reached.
    pub fn restore(&mut self, records: impl IntoIterator<Item = AgentRecord>, now: Duration) {
        let deadline = now + self.settings.dead_after + self.settings.restart_grace;
        self.heard_since_restore = false;
        for r in records {
            let id = r.info.id;
            if id == 0 || self.agents.contains_key(&id) {
                continue;
            }
            self.next_id = self.next_id.max(id.saturating_add(1));
            self.by_key
                .insert((r.info.cloud.clone(), r.info.name.clone()), id);
            let mut info = r.info;
            // The grant is cu.toml's as it is now, not as it was.
            info.allowed = self.allowed_for(&info.cloud, &info.endpoints);
            self.insert_entry(
                id,
                Entry {
                    info,
                    conn: None,
                    presence: if r.online {
                        Presence::Pending { deadline }
                    } else {
                        Presence::Offline
                    },
                    last_seen_ms: r.last_seen_ms,
                    changed_ms: r.last_seen_ms,
                },
            );
        }
    }

    /// Tokens and enrolments the store kept.
    pub fn restore_trust(
        &mut self,
        tokens: impl IntoIterator<Item = TokenRecord>,
        enrolments: impl IntoIterator<Item = Enrolment>,
    ) {
        self.trust.restore(tokens, enrolments);
    }

    pub fn settings(&self) -> &Settings {
        &self.settings
    }

    /// What a proxy's peers accept from it as inner sources.
    fn allowed_for(&self, cloud: &str, e: &Endpoints) -> Vec<ipnet::IpNet> {
        match e {
            Endpoints::Proxy { .. } => self.settings.grants.allowed(cloud),
            _ => Vec::new(),
        }
    }

    /// New grants (cu.toml reloaded): proxies whose cloud's grant changed
    /// are announced again with it, so their peers' egress checks follow.
    /// Agents already present keep their addresses until they register
    /// again, when the new grants apply.
    pub fn set_grants(&mut self, grants: Grants) -> Vec<Action> {
        let clouds = grants.clouds();
        let news = clouds != self.settings.grants.clouds();
        self.settings.grants = grants;
        let mut out = Vec::new();
        if news {
            // Every agent intercepts (or steers) by the grants: all hear.
            for conn in self.agents.values().filter_map(|e| e.conn) {
                out.push(Action::Send {
                    conn,
                    msg: Outgoing::Changes(vec![Change::Clouds(clouds.clone())]),
                });
            }
        }
        let ids: Vec<u32> = self.agents.keys().copied().collect();
        for id in ids {
            let e = &self.agents[&id];
            let allowed = self.allowed_for(&e.info.cloud, &e.info.endpoints);
            if allowed == e.info.allowed {
                continue;
            }
            let before = e.info.clone();
            let mut after = before.clone();
            after.allowed = allowed;
            if e.present() {
                self.announce(Some(&before), Some(&after), &mut out);
            }
            let replicated = self.blocks.is_some();
            self.set_info(id, after);
            let e = &self.agents[&id];
            // Replicas share records: only the one holding the agent
            // writes it (each replica reloads its own cu.toml).
            if !replicated || e.conn.is_some() {
                out.push(Action::Persist(Record::Agent(e.record())));
            }
        }
        out
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

    /// Whether the agent on `via` may relay a session of `cloud`'s: it is
    /// a registered proxy of that cloud. An app VM's session goes through
    /// its own site's proxies only, so a proxy cannot pass off another
    /// cloud's agents (nor anyone who is not a proxy relay at all).
    pub fn may_relay(&self, via: ConnId, cloud: &str) -> Result<(), String> {
        let Some(e) = self.by_conn.get(&via).and_then(|id| self.agents.get(id)) else {
            return Err("the relaying proxy is not registered".into());
        };
        if !matches!(e.info.endpoints, Endpoints::Proxy { .. }) {
            return Err("relayed by an agent that is not a proxy".into());
        }
        if e.info.cloud != cloud {
            return Err(format!(
                "cloud {cloud:?} relayed by a proxy of cloud {:?}",
                e.info.cloud
            ));
        }
        Ok(())
    }

    /// Proxies connected now, by id: who may report measurements (PMon)
    /// and what the ids of a report name.
    pub fn online_proxies(&self) -> BTreeMap<u32, pon_proto::pmon::ProxyRef> {
        self.agents
            .values()
            .filter(|e| e.conn.is_some() && e.info.is_proxy())
            .map(|e| {
                let p = pon_proto::pmon::ProxyRef {
                    id: e.info.id,
                    site: e.info.cloud.clone(),
                    name: e.info.name.clone(),
                };
                (e.info.id, p)
            })
            .collect()
    }

    /// Whether the holder of `key` may subscribe to PMon's matrix and
    /// events: the admin, or an enrolled agent that is not revoked.
    pub fn may_subscribe(&self, key: Option<KeyId>) -> bool {
        self.trust.is_admin(key)
            || key.is_some_and(|k| self.trust.enrolment(&k).is_some() && !self.trust.is_revoked(&k))
    }

    /// The registry for `ponctl`, sorted by id.
    pub fn records(&self) -> Vec<AgentRecord> {
        let mut v: Vec<_> = self.agents.values().map(Entry::record).collect();
        v.sort_by_key(|r| r.info.id);
        v
    }

    /// An administration request on `conn`, whose client certificate
    /// holds `key`. `secret` makes a fresh token secret.
    pub fn admin(
        &mut self,
        conn: ConnId,
        key: Option<KeyId>,
        request: AdminRequest,
        version: u16,
        wall_ms: u64,
        secret: &mut dyn FnMut() -> Option<String>,
    ) -> (Vec<Action>, Result<AdminDone, Refusal>) {
        let mut out = Vec::new();
        let done = self.admin_inner(conn, key, request, version, wall_ms, secret, &mut out);
        Self::conclude(conn, done, "done", out)
    }

    /// A one-request connection (enrolment, admin) ends either way: closed
    /// after the answer, or refused.
    fn conclude<T>(
        conn: ConnId,
        done: Result<T, Refused>,
        reason: &str,
        mut out: Vec<Action>,
    ) -> (Vec<Action>, Result<T, Refusal>) {
        match done {
            Ok(d) => {
                out.push(Action::Close {
                    conn,
                    reason: reason.into(),
                });
                (out, Ok(d))
            }
            Err((why, text)) => {
                Self::refuse(conn, text, &mut out);
                (out, Err(why))
            }
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn admin_inner(
        &mut self,
        conn: ConnId,
        key: Option<KeyId>,
        request: AdminRequest,
        version: u16,
        wall_ms: u64,
        secret: &mut dyn FnMut() -> Option<String>,
        out: &mut Vec<Action>,
    ) -> Result<AdminDone, Refused> {
        check_version(version)?;
        if !self.trust.is_admin(key) {
            return Err((
                Refusal::NotAdmin,
                "administration needs the CU's admin certificate (admin.pem and admin.key, \
                 made by pon-cu init); agent certificates and join tokens are not admin \
                 credentials"
                    .into(),
            ));
        }
        let send = |msg, out: &mut Vec<Action>| out.push(Action::Send { conn, msg });
        match request {
            AdminRequest::List => {
                send(Outgoing::Registry(self.records()), out);
                Ok(AdminDone::Listed)
            }
            AdminRequest::ListTokens => {
                send(Outgoing::Tokens(self.trust.tokens()), out);
                Ok(AdminDone::TokensListed)
            }
            AdminRequest::CreateToken {
                cloud,
                role,
                uses,
                ttl_s,
            } => {
                if cloud != "*" && !self.settings.grants.0.contains_key(&cloud) {
                    return Err((
                        Refusal::NoGrant,
                        format!(
                            "cloud {cloud} has no address grant in cu.toml ([clouds.{cloud}] \
                             prefixes): its agents could not register"
                        ),
                    ));
                }
                let Some(token) = secret() else {
                    return Err((Refusal::Invalid, "no system randomness for a token".into()));
                };
                let rec = self
                    .trust
                    .create_token(&token, &cloud, &role, uses, ttl_s, wall_ms)
                    .map_err(|e| (Refusal::Invalid, e))?;
                let info = rec.info.clone();
                out.push(Action::Persist(Record::Token(rec)));
                send(Outgoing::Token(token, info.clone()), out);
                Ok(AdminDone::TokenCreated(info))
            }
            AdminRequest::Revoke { cloud, name } => {
                let revoked = self.trust.revoke(&cloud, &name);
                let id = self.by_key.get(&(cloud.clone(), name.clone())).copied();
                if revoked.is_none() && id.is_none() {
                    return Err((Refusal::Invalid, format!("no agent {cloud}/{name}")));
                }
                if let Some(e) = revoked {
                    out.push(Action::Persist(Record::Enrolment(e)));
                }
                if let Some(id) = id {
                    if let Some(conn) = self.agents.get(&id).and_then(|e| e.conn) {
                        out.push(Action::Close {
                            conn,
                            reason: "revoked".into(),
                        });
                    }
                    self.leave(id, Some(wall_ms), out);
                }
                send(Outgoing::Revoked(id), out);
                Ok(AdminDone::Revoked { cloud, name, id })
            }
        }
    }

    /// An enrolment on `conn` (a connection without a client certificate).
    /// On success the agent gets its certificate and the connection closes:
    /// it comes back with the certificate to register.
    pub fn enrol(
        &mut self,
        conn: ConnId,
        e: Enrol,
        wall_ms: u64,
        issuer: &dyn Issuer,
    ) -> (Vec<Action>, Result<Enrolment, Refusal>) {
        let mut out = Vec::new();
        let done = self.enrol_inner(conn, e, wall_ms, issuer, &mut out);
        Self::conclude(conn, done, "enrolled", out)
    }

    fn enrol_inner(
        &mut self,
        conn: ConnId,
        e: Enrol,
        wall_ms: u64,
        issuer: &dyn Issuer,
        out: &mut Vec<Action>,
    ) -> Result<Enrolment, Refused> {
        check_version(e.version)?;
        check_identity(&e.cloud, &e.name, &e.role)?;
        let key = issuer
            .key_of(&e.csr)
            .map_err(|why| (Refusal::Invalid, format!("bad certificate request: {why}")))?;
        let token = self
            .trust
            .check_enrol(&e.token, &e.cloud, &e.name, &e.role, key, wall_ms)?;
        if let Some(before) = self.trust.enrolment(&key) {
            if before.noise_key != e.noise_key {
                return Err((
                    Refusal::KeyTaken,
                    format!(
                        "this key is enrolled with Noise key {}, not {}; \
                         `ponctl revoke {}/{}` and enrol with new keys to change it",
                        before.noise_key, e.noise_key, before.cloud, before.name
                    ),
                ));
            }
        }
        let enrolment = Enrolment {
            key,
            cloud: e.cloud,
            name: e.name,
            role: e.role,
            noise_key: e.noise_key,
            enrolled_ms: wall_ms,
            revoked: false,
        };
        let cert = issuer.issue(&e.csr, &enrolment).map_err(|why| {
            (
                Refusal::Invalid,
                format!("cannot issue a certificate: {why}"),
            )
        })?;
        let (charged, enrolment) = self.trust.enrol(token, enrolment);
        if let Some(t) = charged {
            out.push(Action::Persist(Record::Token(t)));
        }
        out.push(Action::Persist(Record::Enrolment(enrolment.clone())));
        out.push(Action::Send {
            conn,
            msg: Outgoing::Enrolled(cert),
        });
        Ok(enrolment)
    }

    fn refuse(conn: ConnId, why: String, out: &mut Vec<Action>) {
        out.push(Action::Send {
            conn,
            msg: Outgoing::Refused(why.clone()),
        });
        out.push(Action::Close { conn, reason: why });
    }

    fn check_register(
        &self,
        key: Option<KeyId>,
        r: &Register,
        id: Option<u32>,
    ) -> Result<(), Refused> {
        check_version(r.version)?;
        check_identity(&r.cloud, &r.name, &r.role)?;
        self.trust
            .check_register(key, &r.cloud, &r.name, &r.role, &r.noise_key)?;
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
        if let Endpoints::Proxy { pon, .. } = &r.endpoints {
            if pon.ip().is_unspecified() || pon.port() == 0 {
                return Err((
                    Refusal::Invalid,
                    format!(
                        "{pon} is no address peers can reach (set the proxy's `public` address)"
                    ),
                ));
            }
        }
        self.check_addresses(&r.cloud, &r.endpoints, id)
    }

    /// `endpoints` for an agent of `cloud` (id `id`, if it has one): in the
    /// cloud's grant, and held by no other present agent.
    fn check_addresses(
        &self,
        cloud: &str,
        endpoints: &Endpoints,
        id: Option<u32>,
    ) -> Result<(), Refused> {
        self.settings.grants.check(cloud, endpoints)?;
        // An address another present agent holds would take its traffic.
        for mine in claims(endpoints) {
            for other in self.index.at(mine.ip()) {
                let Some(e) = self.agents.get(&other) else {
                    continue;
                };
                if !e.present() || Some(other) == id {
                    continue;
                }
                if claims(&e.info.endpoints).any(|theirs| mine.clashes(theirs)) {
                    return Err((
                        Refusal::AddressHeld,
                        format!(
                            "address {} is held by {}/{} (id {})",
                            mine.addr(),
                            e.info.cloud,
                            e.info.name,
                            e.info.id
                        ),
                    ));
                }
            }
        }
        Ok(())
    }

    /// Whether the index is what a rebuild from the entries would give.
    #[cfg(test)]
    pub(crate) fn index_is_current(&self) -> bool {
        self.index == Index::of(self.agents.values().map(|e| &e.info))
    }

    /// Adds (or replaces) entry `id`, and indexes it.
    fn insert_entry(&mut self, id: u32, entry: Entry) {
        self.remove_entry(id);
        self.index.add(&entry.info);
        self.agents.insert(id, entry);
    }

    fn remove_entry(&mut self, id: u32) -> Option<Entry> {
        let e = self.agents.remove(&id)?;
        self.index.remove(&e.info);
        Some(e)
    }

    /// Changes what entry `id` says of its agent, and its index.
    fn set_info(&mut self, id: u32, info: AgentInfo) {
        if let Some(e) = self.agents.get_mut(&id) {
            self.index.remove(&e.info);
            self.index.add(&info);
            e.info = info;
        }
    }

    fn check_quota(&self, cloud: &str) -> Result<(), Refused> {
        let Some(max) = self.settings.grants.0.get(cloud).and_then(|g| g.max_agents) else {
            return Ok(());
        };
        let known = self.by_key.keys().filter(|(c, _)| c == cloud).count();
        if known >= max as usize {
            return Err((
                Refusal::Quota,
                format!(
                    "cloud {cloud} has {known} agents, its limit ([clouds.{cloud}] max_agents = {max})"
                ),
            ));
        }
        Ok(())
    }

    /// Forgets the agents offline for longer than `forget_offline_after`
    /// at wall-clock `wall_ms`: their records leave the registry and the
    /// store, their ids and names are free. Nobody is told: an offline
    /// agent is in no view already. Returns the store writes and how many
    /// were forgotten.
    pub fn forget_offline(&mut self, wall_ms: u64) -> (Vec<Action>, usize) {
        let Some(after) = self.settings.forget_offline_after else {
            return (Vec::new(), 0);
        };
        let limit = wall_ms.saturating_sub(after.as_millis() as u64);
        let old: Vec<u32> = self
            .agents
            .iter()
            .filter(|(_, e)| matches!(e.presence, Presence::Offline) && e.last_seen_ms < limit)
            .map(|(id, _)| *id)
            .collect();
        let mut out = Vec::with_capacity(old.len());
        for id in &old {
            if let Some(e) = self.remove_entry(*id) {
                self.by_key.remove(&(e.info.cloud, e.info.name));
                out.push(Action::Persist(Record::Forgotten(*id)));
            }
        }
        (out, old.len())
    }

    /// R: a registration on `conn`, whose client certificate holds `key`.
    /// Returns the actions and, if refused, why.
    pub fn register(
        &mut self,
        conn: ConnId,
        key: Option<KeyId>,
        r: Register,
        now: Duration,
        wall_ms: u64,
    ) -> (Vec<Action>, Option<Refusal>) {
        let mut out = Vec::new();
        let known = self.by_key.get(&(r.cloud.clone(), r.name.clone())).copied();
        if let Err((why, text)) = self.check_register(key, &r, known) {
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
        if known.is_none() {
            if let Err((why, text)) = self.check_quota(&r.cloud) {
                Self::refuse(conn, text, &mut out);
                return (out, Some(why));
            }
        }
        let key = (r.cloud.clone(), r.name.clone());
        let id = match self.by_key.get(&key) {
            Some(&id) => id,
            None => {
                let hint = match r.id_hint {
                    Some(h) if h != 0 && h != u32::MAX && !self.agents.contains_key(&h) => Some(h),
                    _ => None,
                };
                let id = match (hint, &mut self.blocks) {
                    (Some(h), _) => h,
                    (None, None) => {
                        while self.agents.contains_key(&self.next_id) || self.next_id == 0 {
                            self.next_id = self.next_id.wrapping_add(1);
                        }
                        self.next_id
                    }
                    (None, Some(blocks)) => {
                        let agents = &self.agents;
                        let next = blocks.take(|id| agents.contains_key(&id));
                        if blocks.running_low() {
                            out.push(Action::NeedIds);
                        }
                        let Some(id) = next else {
                            // No id to give until a block is claimed: the
                            // agent retries after its backoff (a close, not
                            // a refusal, which it would take as final).
                            out.push(Action::Close {
                                conn,
                                reason: "no free id on this CU replica yet; retry".into(),
                            });
                            return (out, None);
                        };
                        id
                    }
                };
                self.next_id = self.next_id.max(id.saturating_add(1));
                self.by_key.insert(key, id);
                id
            }
        };
        let info = AgentInfo {
            id,
            allowed: self.allowed_for(&r.cloud, &r.endpoints),
            cloud: r.cloud,
            role: r.role,
            name: r.name,
            endpoints: r.endpoints,
            noise_key: r.noise_key,
        };
        let old = self.remove_entry(id);
        // Strictly newer than anything known of it, whatever the clock did.
        let changed_ms = old
            .as_ref()
            .map_or(wall_ms, |o| wall_ms.max(o.changed_ms.saturating_add(1)));
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
            changed_ms,
        };
        out.push(Action::Persist(Record::Agent(entry.record())));
        self.insert_entry(id, entry);
        self.by_conn.insert(conn, id);
        if !self.heard_since_restore {
            // The CU is reachable again: from now on, the others have the
            // whole grace to come back.
            self.heard_since_restore = true;
            let deadline = now + self.settings.dead_after + self.settings.restart_grace;
            for e in self.agents.values_mut() {
                if let Presence::Pending { deadline: d } = &mut e.presence {
                    *d = deadline;
                }
            }
        }
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
        let peer = |e: &Entry| {
            relation(&self.policy, me, &e.info).map(|optimise| Peer {
                info: e.info.clone(),
                optimise,
            })
        };
        let mut peers: Vec<Peer> = if me.is_app() {
            // Its own cloud's proxies only: it reaches other clouds by
            // their grants, through them.
            self.index
                .proxies_of(&me.cloud)
                .filter_map(|i| self.agents.get(&i))
                .filter(|e| e.present())
                .filter_map(peer)
                .collect()
        } else {
            self.agents
                .values()
                .filter(|e| e.present())
                .filter_map(peer)
                .collect()
        };
        peers.sort_by_key(|p| p.info.id);
        Config {
            id,
            heartbeat_ms: self.settings.heartbeat.as_millis() as u32,
            dead_after_ms: self.settings.dead_after.as_millis() as u32,
            peers,
            clouds: self.settings.grants.clouds(),
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
        let Some(subject) = after.or(before) else {
            return;
        };
        // Those the news can concern (`relation` decides which do), from
        // the index, never a scan of every agent: a proxy's news concerns
        // every proxy, the others (monitoring) and its own cloud's app VMs;
        // an app VM's, its cloud's proxies and the others (a subset of the
        // former); anything else's, nobody.
        let is = |f: fn(&AgentInfo) -> bool| [before, after].iter().flatten().any(|i| f(i));
        let concerned: Box<dyn Iterator<Item = &Entry>> = if is(AgentInfo::is_proxy) {
            Box::new(
                self.index
                    .proxies()
                    .flat_map(|(_, ids)| ids.iter().copied())
                    .chain(self.index.others())
                    .chain(self.index.apps_of(&subject.cloud))
                    .filter_map(|i| self.agents.get(&i)),
            )
        } else if is(AgentInfo::is_app) {
            Box::new(
                self.index
                    .proxies_of(&subject.cloud)
                    .chain(self.index.others())
                    .filter_map(|i| self.agents.get(&i)),
            )
        } else {
            Box::new(std::iter::empty())
        };
        for e in concerned {
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

    /// The proxy on `conn`, whose address peers use was what the CU saw
    /// (it registered the unspecified address), now connects from `seen`
    /// (its NAT mapped it elsewhere; QUIC followed it): its peers are told
    /// the new address, as for a new registration, if the grant allows it
    /// and nobody else holds it. Returns what to do and whether it moved.
    pub fn proxy_moved(
        &mut self,
        conn: ConnId,
        seen: IpAddr,
    ) -> (Vec<Action>, Result<(), Refused>) {
        let mut out = Vec::new();
        let Some(e) = self.by_conn.get(&conn).and_then(|id| self.agents.get(id)) else {
            return (out, Err((Refusal::Invalid, "not registered".into())));
        };
        let Endpoints::Proxy {
            pon,
            agent_addr,
            agent_udp_port,
        } = e.info.endpoints
        else {
            return (out, Err((Refusal::Invalid, "not a proxy".into())));
        };
        let unspecified = Endpoints::Proxy {
            pon: std::net::SocketAddr::new(std::net::Ipv4Addr::UNSPECIFIED.into(), pon.port()),
            agent_addr,
            agent_udp_port,
        };
        let new = with_observed_address(unspecified, seen);
        if new == e.info.endpoints {
            return (out, Ok(()));
        }
        if let Err(refused) = self.check_addresses(&e.info.cloud, &new, Some(e.info.id)) {
            return (out, Err(refused));
        }
        let before = e.info.clone();
        let mut after = before.clone();
        after.allowed = self.allowed_for(&after.cloud, &new);
        after.endpoints = new;
        self.announce(Some(&before), Some(&after), &mut out);
        self.set_info(before.id, after);
        out.push(Action::Persist(Record::Agent(
            self.agents[&before.id].record(),
        )));
        (out, Ok(()))
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
        e.changed_ms = e.last_seen_ms.max(e.changed_ms.saturating_add(1));
        let info = e.info.clone();
        out.push(Action::Persist(Record::Agent(e.record())));
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
                Presence::Pending { deadline } if self.heard_since_restore && now >= deadline => {
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
pub(crate) mod tests {
    use super::*;
    use crate::trust::Grant;
    use pon_proto::control::PublicKey;
    use pon_proto::Encap;
    use std::net::Ipv4Addr;

    /// A registration of `cloud`/`name` at 198.18.1.`last`, as a proxy or
    /// an app VM after `role`, keyed as `key_of` says.
    pub(crate) fn reg(cloud: &str, name: &str, role: &str, last: u8) -> Register {
        let a = Ipv4Addr::new(198, 18, 1, last);
        Register {
            version: PROTOCOL_VERSION,
            noise_key: noise_of(cloud, name),
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

    pub(crate) fn key_of(cloud: &str, name: &str) -> KeyId {
        KeyId::of_public_key(format!("{cloud}/{name}").as_bytes())
    }

    fn noise_of(cloud: &str, name: &str) -> PublicKey {
        PublicKey(key_of(cloud, name).0)
    }

    const ADMIN: KeyId = KeyId([0xad; 32]);

    /// Every test cloud may use 198.18.0.0/16.
    fn cu() -> Registry {
        let wide = Grant {
            prefixes: vec!["198.18.0.0/16".parse().unwrap()],
            endpoints: vec![],
            max_agents: None,
        };
        let grants = ["a", "b", "c", "paris", "tokyo"]
            .map(|c| (c.to_string(), wide.clone()))
            .into();
        Registry::new(
            Settings {
                grants: Grants(grants),
                admins: vec![ADMIN],
                ..Settings::default()
            },
            Policy::default(),
        )
    }

    /// Registers `reg` on `conn` as an agent enrolled for exactly that
    /// identity would.
    fn join(
        r: &mut Registry,
        conn: ConnId,
        reg: Register,
        now: Duration,
        wall_ms: u64,
    ) -> (Vec<Action>, Option<Refusal>) {
        let key = key_of(&reg.cloud, &reg.name);
        if r.trust.enrolment(&key).is_none() {
            r.restore_trust(
                [],
                [Enrolment {
                    key,
                    cloud: reg.cloud.clone(),
                    name: reg.name.clone(),
                    role: reg.role.clone(),
                    noise_key: reg.noise_key,
                    enrolled_ms: 0,
                    revoked: false,
                }],
            );
        }
        r.register(conn, Some(key), reg, now, wall_ms)
    }

    /// A CU with proxies registered on connections 1, 2, ... (one per
    /// cloud, each `n`-th at 198.18.1.`n`), and the time they did.
    fn with_proxies(clouds: &[&str]) -> (Registry, Duration) {
        let mut r = cu();
        let t = Duration::ZERO;
        for (n, cloud) in (1..).zip(clouds) {
            join(&mut r, u64::from(n), reg(cloud, "p", "PROXY", n), t, 1);
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
        let (a, _) = join(&mut r, 1, reg("paris", "proxy", "PROXY.SRC", 1), t, 1);
        assert_eq!(config_of(&a, 1).id, 1);
        assert!(config_of(&a, 1).peers.is_empty());
        let (a, _) = join(&mut r, 2, reg("tokyo", "proxy", "PROXY.DST", 2), t, 1);
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
        // An app in paris: its TA gets its own cloud's proxy and every
        // cloud's grant; only its own cloud's proxy learns of it (it
        // delivers to it; tokyo reaches paris by paris's prefixes).
        let (a, _) = join(&mut r, 3, reg("paris", "app1", "APP", 11), t, 1);
        let cfg = config_of(&a, 3);
        assert_eq!(
            cfg.peers.iter().map(|p| p.info.id).collect::<Vec<_>>(),
            vec![1]
        );
        assert_eq!(cfg.clouds, r.settings().grants.clouds());
        assert!(cfg.clouds.iter().any(|c| c.cloud == "tokyo"));
        assert_eq!(changes_to(&a, 1).len(), 1);
        assert!(changes_to(&a, 2).is_empty());
        // An app in tokyo: its proxy, and no app VM of any cloud.
        let (a, _) = join(&mut r, 4, reg("tokyo", "app1", "APP", 12), t, 1);
        let cfg = config_of(&a, 4);
        assert_eq!(
            cfg.peers.iter().map(|p| p.info.id).collect::<Vec<_>>(),
            vec![2]
        );
        assert!(changes_to(&a, 3).is_empty());
        assert!(changes_to(&a, 1).is_empty());
        assert_eq!(changes_to(&a, 2).len(), 1);
        // A second app in tokyo is news to tokyo's proxy only.
        let (a, _) = join(&mut r, 5, reg("tokyo", "app2", "APP", 13), t, 1);
        assert!(changes_to(&a, 4).is_empty());
        assert!(changes_to(&a, 3).is_empty());
        assert_eq!(changes_to(&a, 2).len(), 1);
        // The proxies' configurations: their own cloud's app VMs only.
        let apps = |id| {
            r.config_for(id)
                .peers
                .iter()
                .filter(|p| p.info.is_app())
                .map(|p| p.info.id)
                .collect::<Vec<_>>()
        };
        assert_eq!((apps(1), apps(2)), (vec![3], vec![4, 5]));
    }

    #[test]
    fn app_vms_know_only_their_own_clouds_proxies_so_other_clouds_proxies_are_no_news_to_them() {
        let mut r = cu();
        let t = Duration::ZERO;
        join(&mut r, 1, reg("paris", "proxy", "PROXY", 1), t, 1);
        join(&mut r, 2, reg("tokyo", "app", "APP", 2), t, 1);
        join(&mut r, 3, reg("paris", "app", "APP", 3), t, 1);
        let ids = |r: &Registry, id| {
            r.config_for(id)
                .peers
                .iter()
                .map(|p| p.info.id)
                .collect::<Vec<_>>()
        };
        // Tokyo's app VM knows paris by its grant alone, proxy or not.
        assert!(ids(&r, 2).is_empty());
        assert!(r.config_for(2).clouds.iter().any(|c| c.cloud == "paris"));
        assert_eq!(ids(&r, 3), vec![1]);
        // A second proxy in paris is news to paris's app VM and the
        // proxies, not to tokyo's app VM.
        let (a, _) = join(&mut r, 4, reg("paris", "proxy2", "PROXY", 4), t, 1);
        assert!(changes_to(&a, 2).is_empty());
        assert_eq!(changes_to(&a, 3).len(), 1);
        assert_eq!(changes_to(&a, 1).len(), 1);
        assert_eq!(ids(&r, 3), vec![1, 4]);
        // A new cloud's first proxy: news to the proxies only.
        let (a, _) = join(&mut r, 5, reg("tokyo", "proxy", "PROXY", 5), t, 1);
        assert!(changes_to(&a, 3).is_empty());
        assert_eq!(changes_to(&a, 1).len(), 1);
        assert_eq!(changes_to(&a, 4).len(), 1);
        assert_eq!(changes_to(&a, 2).len(), 1, "tokyo's app VM: its own proxy");
        // Paris loses its proxies, one then the other: paris's app VM
        // hears each time, tokyo's never.
        let (a, _) = r.disconnected(1, true, 1);
        assert_eq!(changes_to(&a, 3), vec![Change::Down(1)]);
        assert!(changes_to(&a, 2).is_empty());
        let (a, _) = r.disconnected(4, true, 1);
        assert_eq!(changes_to(&a, 3), vec![Change::Down(4)]);
        assert!(changes_to(&a, 2).is_empty());
        assert_eq!(changes_to(&a, 5), vec![Change::Down(4)]);
        assert!(ids(&r, 3).is_empty());
    }

    #[test]
    fn master_and_slave_optimise_both_ways_plain_proxy_towards_all() {
        let mut r = cu();
        let t = Duration::ZERO;
        join(&mut r, 1, reg("a", "p", "PROXY.MASTER", 1), t, 1);
        let (a, _) = join(&mut r, 2, reg("b", "p", "PROXY.SLAVE", 2), t, 1);
        assert!(config_of(&a, 2).peers[0].optimise);
        let (a, _) = join(&mut r, 3, reg("c", "p", "PROXY", 3), t, 1);
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
        let (a, _) = join(&mut r, 1, h.clone(), t, 1);
        assert_eq!(config_of(&a, 1).id, 7);
        r.disconnected(1, true, 2);
        // Comes back on a new connection, other hint: same id.
        h.id_hint = Some(9);
        let (a, _) = join(&mut r, 2, h, t, 3);
        assert_eq!(config_of(&a, 2).id, 7);
        // A taken hint is not granted.
        let mut o = reg("tokyo", "proxy", "PROXY", 2);
        o.id_hint = Some(7);
        let (a, _) = join(&mut r, 3, o, t, 3);
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
    fn a_cloud_at_its_quota_takes_no_new_name_but_its_agents_come_back() {
        let mut r = cu();
        r.settings.grants.0.get_mut("a").unwrap().max_agents = Some(2);
        let t = Duration::ZERO;
        assert_eq!(join(&mut r, 1, reg("a", "p", "PROXY", 1), t, 1).1, None);
        assert_eq!(join(&mut r, 2, reg("a", "v1", "APP", 11), t, 1).1, None);
        let (a, why) = join(&mut r, 3, reg("a", "v2", "APP", 12), t, 1);
        assert_eq!(why, Some(Refusal::Quota));
        assert!(refusal_text(&a, 3).contains("max_agents = 2"), "{a:?}");
        // Offline agents still count (names cannot be cycled to fill the
        // registry), and they come back under their own name.
        r.disconnected(2, true, 2);
        assert_eq!(
            join(&mut r, 4, reg("a", "v3", "APP", 13), t, 3).1,
            Some(Refusal::Quota)
        );
        assert_eq!(join(&mut r, 5, reg("a", "v1", "APP", 11), t, 3).1, None);
        // Other clouds are not held back.
        assert_eq!(join(&mut r, 6, reg("b", "v", "APP", 21), t, 3).1, None);
    }

    #[test]
    fn agents_offline_too_long_are_forgotten_and_their_ids_freed() {
        let mut r = cu();
        r.settings.forget_offline_after = Some(Duration::from_secs(3600));
        let t = Duration::ZERO;
        let h = 3_600_000;
        join(&mut r, 1, reg("a", "p", "PROXY", 1), t, 1_000);
        join(&mut r, 2, reg("a", "v", "APP", 11), t, 1_000);
        join(&mut r, 3, reg("b", "p", "PROXY", 2), t, 1_000);
        r.disconnected(2, true, 2_000);
        r.disconnected(3, false, 5_000);
        // Online agents are never forgotten, offline ones once their time
        // is up, each at its own.
        assert_eq!(r.forget_offline(2_000 + h).1, 0);
        let (a, n) = r.forget_offline(2_001 + h);
        assert_eq!(n, 1);
        assert_eq!(a, vec![Action::Persist(Record::Forgotten(2))]);
        assert_eq!(r.len(), 2);
        assert_eq!(r.forget_offline(10 * h).1, 1);
        assert_eq!(r.len(), 1);
        assert!(r.records().iter().all(|rec| rec.info.id == 1));
        // A forgotten agent that comes back is a new one.
        let (a, why) = join(&mut r, 4, reg("a", "v", "APP", 11), t, 10 * h);
        assert_eq!(why, None);
        assert_ne!(config_of(&a, 4).id, 0);
        // Without the setting, nothing is forgotten.
        r.settings.forget_offline_after = None;
        r.disconnected(4, true, 10 * h);
        assert_eq!(r.forget_offline(u64::MAX).1, 0);
    }

    #[test]
    fn a_newer_connection_replaces_the_old_one_silently() {
        let (mut r, t) = with_proxies(&["a", "b"]);
        let (a, _) = join(&mut r, 3, reg("b", "p", "PROXY", 2), t, 1);
        assert!(a.contains(&Action::Close {
            conn: 2,
            reason: "replaced by a newer connection of the same agent".into()
        }));
        // Same addresses: nothing to tell the others.
        assert!(changes_to(&a, 1).is_empty());
        // The old connection closing later does not make it leave.
        assert_eq!(r.disconnected(2, false, 2).1, None);
        // New addresses: the others hear of it.
        let (a, _) = join(&mut r, 4, reg("b", "p", "PROXY", 9), t, 1);
        assert_eq!(changes_to(&a, 1).len(), 1);
    }

    #[test]
    fn refusals_name_the_problem() {
        let mut r = cu();
        let t = Duration::ZERO;
        // No certificate at all.
        let (a, why) = r.register(1, None, reg("a", "p", "PROXY", 1), t, 1);
        assert_eq!(why, Some(Refusal::NotEnrolled));
        assert!(
            matches!(&a[0], Action::Send { conn: 1, msg: Outgoing::Refused(m) } if m.contains("enrol first"))
        );
        let mut bad = reg("a", "p", "APP", 1);
        bad.endpoints = Endpoints::proxy(Ipv4Addr::new(198, 18, 1, 1));
        assert_eq!(join(&mut r, 2, bad, t, 1).1, Some(Refusal::Invalid));
        let mut bad = reg("a", "q", "PROXY", 1);
        bad.version = 99;
        assert_eq!(join(&mut r, 3, bad, t, 1).1, Some(Refusal::Version));
        let bad = reg("a b", "p", "PROXY", 1);
        assert_eq!(join(&mut r, 4, bad, t, 1).1, Some(Refusal::Invalid));
        assert!(r.is_empty());
    }

    #[test]
    fn restored_agents_stay_in_views_until_the_grace_ends() {
        let (r, t) = with_proxies(&["a", "b"]);
        let saved = r.records();
        let mut r2 = cu();
        r2.restore(saved, t);
        // a comes back first: its config still has b, so its table is unchanged.
        let (a, _) = join(&mut r2, 10, reg("a", "p", "PROXY", 1), t, 2);
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
        let (a, _) = join(&mut r2, 11, reg("b", "p", "PROXY", 2), end, 4);
        assert_eq!(config_of(&a, 11).id, 2);
    }

    #[test]
    fn restored_agents_are_not_given_up_while_nobody_can_register() {
        let (r, t) = with_proxies(&["a", "b"]);
        let saved = r.records();
        let mut r2 = cu();
        r2.restore(saved, t);
        // Nobody registers for a minute (every agent refused, or failing
        // the CU's TLS): nobody is declared gone.
        let later = t + Duration::from_secs(60);
        let (_, gone) = r2.tick(later);
        assert!(gone.is_empty(), "{gone:?}");
        // a comes back: its view still has b, and b has the whole grace
        // from now on.
        let (a, _) = join(&mut r2, 10, reg("a", "p", "PROXY", 1), later, 2);
        assert_eq!(config_of(&a, 10).peers[0].info.id, 2);
        r2.heartbeat(10, later + Duration::from_secs(9), 3);
        assert!(r2.tick(later + Duration::from_secs(9)).1.is_empty());
        let end = later + Duration::from_secs(13);
        r2.heartbeat(10, end, 4);
        assert_eq!(r2.tick(end).1, vec![(2, LeaveReason::NotBack)]);
    }

    /// The CA, faked: a request's "key" is its bytes.
    struct FakeCa;
    impl Issuer for FakeCa {
        fn key_of(&self, csr: &[u8]) -> Result<KeyId, String> {
            if csr.is_empty() {
                return Err("empty".into());
            }
            Ok(KeyId::of_public_key(csr))
        }
        fn issue(&self, _: &[u8], e: &Enrolment) -> Result<String, String> {
            Ok(format!("CERT {}/{} {}", e.cloud, e.name, e.role))
        }
    }

    fn enrol_msg(token: &str, cloud: &str, name: &str, role: &str, key: &str) -> Enrol {
        Enrol {
            version: PROTOCOL_VERSION,
            token: token.into(),
            cloud: cloud.into(),
            role: role.into(),
            name: name.into(),
            noise_key: PublicKey([9; 32]),
            csr: key.as_bytes().to_vec(),
        }
    }

    /// Enrols `name` of paris as `role` with the key `key`, on `conn`.
    fn paris(
        r: &mut Registry,
        conn: ConnId,
        token: &str,
        name: &str,
        role: &str,
        key: &str,
    ) -> (Vec<Action>, Result<Enrolment, Refusal>) {
        r.enrol(
            conn,
            enrol_msg(token, "paris", name, role, key),
            10,
            &FakeCa,
        )
    }

    fn refusal_text(actions: &[Action], conn: ConnId) -> String {
        sent_to(actions, conn)
            .find_map(|m| match m {
                Outgoing::Refused(why) => Some(why.clone()),
                _ => None,
            })
            .expect("a refusal")
    }

    /// A token made by the admin; returns its secret.
    fn token(r: &mut Registry, cloud: &str, role: &str, uses: Option<u32>) -> String {
        let mut n = 0;
        let (a, done) = r.admin(
            100,
            Some(ADMIN),
            AdminRequest::CreateToken {
                cloud: cloud.into(),
                role: role.into(),
                uses,
                ttl_s: 3600,
            },
            PROTOCOL_VERSION,
            0,
            &mut || {
                n += 1;
                Some(format!("secret-{cloud}-{role}-{n}"))
            },
        );
        assert!(matches!(done, Ok(AdminDone::TokenCreated(_))), "{done:?}");
        let secret = sent_to(&a, 100)
            .find_map(|m| match m {
                Outgoing::Token(t, _) => Some(t.clone()),
                _ => None,
            })
            .unwrap();
        secret
    }

    #[test]
    fn enrolment_binds_a_name_to_one_key_and_scoped_tokens_hold() {
        let mut r = cu();
        let app_token = token(&mut r, "paris", "APP", None);
        let proxy_token = token(&mut r, "paris", "PROXY", Some(1));
        // An app VM's token cannot enrol a proxy.
        let (a, got) = paris(&mut r, 1, &app_token, "p", "PROXY", "k1");
        assert_eq!(got, Err(Refusal::TokenScope));
        assert!(refusal_text(&a, 1).contains("may enrol role APP, not PROXY"));
        // The proxy's token can, once.
        let (a, got) = paris(&mut r, 2, &proxy_token, "p", "PROXY", "k1");
        assert!(got.is_ok(), "{got:?}");
        assert!(sent_to(&a, 2).any(|m| *m == Outgoing::Enrolled("CERT paris/p PROXY".into())));
        assert!(a
            .iter()
            .any(|x| matches!(x, Action::Persist(Record::Enrolment(_)))));
        assert!(a.iter().any(
            |x| matches!(x, Action::Persist(Record::Token(t)) if t.info.uses_left == Some(0))
        ));
        let (_, got) = paris(&mut r, 3, &proxy_token, "p2", "PROXY", "k9");
        assert_eq!(got, Err(Refusal::TokenUsedUp));
        // Another key claiming paris/p, with a good token, is refused.
        let another = token(&mut r, "paris", "PROXY", None);
        let (a, got) = paris(&mut r, 4, &another, "p", "PROXY", "k2");
        assert_eq!(got, Err(Refusal::NameTaken));
        assert!(refusal_text(&a, 4).contains("paris/p is bound to another key"));
        // A request whose signature does not check out never gets that far.
        let (_, got) = paris(&mut r, 5, &another, "x", "PROXY", "");
        assert_eq!(got, Err(Refusal::Invalid));
        // The enrolled key registers as what it enrolled as, and as nothing else.
        let k1 = KeyId::of_public_key(b"k1");
        let mut me = reg("paris", "p", "PROXY", 1);
        me.noise_key = PublicKey([9; 32]);
        let mut other_name = me.clone();
        other_name.name = "q".into();
        assert_eq!(
            r.register(6, Some(k1), other_name, Duration::ZERO, 1).1,
            Some(Refusal::IdentityMismatch)
        );
        let mut other_role = me.clone();
        other_role.role = "PROXY.SRC".into();
        assert_eq!(
            r.register(7, Some(k1), other_role, Duration::ZERO, 1).1,
            Some(Refusal::IdentityMismatch)
        );
        let (a, got) = r.register(8, Some(k1), me, Duration::ZERO, 1);
        assert_eq!(got, None);
        let cfg = config_of(&a, 8);
        assert_eq!(r.config_for(cfg.id).id, cfg.id);
    }

    #[test]
    fn addresses_outside_the_grant_or_held_by_another_are_refused() {
        let mut r = cu();
        let t = Duration::ZERO;
        let mut outside = reg("paris", "app1", "APP", 11);
        outside.endpoints = Endpoints::App {
            addr: Ipv4Addr::new(169, 254, 169, 254),
            encap: Encap::Ipip,
        };
        let (a, why) = join(&mut r, 1, outside, t, 1);
        assert_eq!(why, Some(Refusal::OutsideGrant));
        assert!(refusal_text(&a, 1).contains("169.254.169.254 is outside cloud paris's grant"));
        let mut unknown = reg("berlin", "app1", "APP", 11);
        unknown.cloud = "berlin".into();
        assert_eq!(join(&mut r, 2, unknown, t, 1).1, Some(Refusal::NoGrant));
        // paris's proxy at .1; an app VM of tokyo claiming .1 is refused.
        assert_eq!(join(&mut r, 3, reg("paris", "p", "PROXY", 1), t, 1).1, None);
        let (a, why) = join(&mut r, 4, reg("tokyo", "thief", "APP", 1), t, 1);
        assert_eq!(why, Some(Refusal::AddressHeld));
        assert!(refusal_text(&a, 4).contains("address 198.18.1.1 is held by paris/p (id 1)"));
        // Once paris's proxy has left, the address is free.
        r.disconnected(3, true, 2);
        assert_eq!(
            join(&mut r, 5, reg("tokyo", "thief", "APP", 1), t, 1).1,
            None
        );
    }

    #[test]
    fn revoking_tells_every_peer_at_once_and_refuses_the_key() {
        let (mut r, t) = with_proxies(&["a", "b", "c"]);
        let (_, done) = r.admin(
            9,
            Some(KeyId([1; 32])),
            AdminRequest::List,
            PROTOCOL_VERSION,
            1,
            &mut || None,
        );
        assert_eq!(
            done,
            Err(Refusal::NotAdmin),
            "an agent's key is no admin key"
        );
        let (a, done) = r.admin(
            9,
            Some(ADMIN),
            AdminRequest::Revoke {
                cloud: "b".into(),
                name: "p".into(),
            },
            PROTOCOL_VERSION,
            5,
            &mut || None,
        );
        assert_eq!(
            done,
            Ok(AdminDone::Revoked {
                cloud: "b".into(),
                name: "p".into(),
                id: Some(2)
            })
        );
        assert_eq!(changes_to(&a, 1), vec![Change::Down(2)]);
        assert_eq!(changes_to(&a, 3), vec![Change::Down(2)]);
        assert!(a.contains(&Action::Close {
            conn: 2,
            reason: "revoked".into()
        }));
        assert!(a
            .iter()
            .any(|x| matches!(x, Action::Persist(Record::Enrolment(e)) if e.revoked)));
        assert!(sent_to(&a, 9).any(|m| *m == Outgoing::Revoked(Some(2))));
        // It comes back with its certificate: refused.
        let (_, why) = r.register(10, Some(key_of("b", "p")), reg("b", "p", "PROXY", 2), t, 6);
        assert_eq!(why, Some(Refusal::Revoked));
        assert_eq!(r.online(), 2);
        let (_, done) = r.admin(
            9,
            Some(ADMIN),
            AdminRequest::Revoke {
                cloud: "b".into(),
                name: "nobody".into(),
            },
            PROTOCOL_VERSION,
            5,
            &mut || None,
        );
        assert_eq!(done, Err(Refusal::Invalid));
    }

    #[test]
    fn proxies_carry_their_clouds_grant_and_follow_its_changes() {
        let (mut r, _) = with_proxies(&["a", "b"]);
        let cfg = r.config_for(1);
        assert_eq!(
            cfg.peers[0].info.allowed,
            vec!["198.18.0.0/16".parse().unwrap()]
        );
        let (_, _) = join(&mut r, 3, reg("a", "app", "APP", 11), Duration::ZERO, 1);
        assert!(r
            .config_for(1)
            .peers
            .iter()
            .find(|p| p.info.is_app())
            .unwrap()
            .info
            .allowed
            .is_empty());
        let mut g = r.settings().grants.clone();
        g.0.get_mut("b").unwrap().prefixes = vec![
            "198.18.1.0/24".parse().unwrap(),
            "10.2.0.0/16".parse().unwrap(),
        ];
        let clouds = g.clouds();
        let a = r.set_grants(g);
        // Every agent hears the new grants; b's peers hear of b again
        // with its new grant.
        match &changes_to(&a, 1)[..] {
            [Change::Clouds(c), Change::Up(p)] => {
                assert_eq!(c, &clouds);
                assert_eq!(p.info.allowed.len(), 2)
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(
            changes_to(&a, 2),
            vec![Change::Clouds(clouds.clone())],
            "nothing else changed for b itself"
        );
        assert_eq!(changes_to(&a, 3), vec![Change::Clouds(clouds)]);
        // The same grants again are no news.
        let same = r.settings().grants.clone();
        assert!(changes_to(&r.set_grants(same), 3).is_empty());
    }

    #[test]
    fn a_proxy_behind_nat_gets_the_address_its_connection_comes_from() {
        let inside: Endpoints = Endpoints::Proxy {
            pon: "0.0.0.0:7300".parse().unwrap(),
            agent_addr: "10.0.0.5".parse().unwrap(),
            agent_udp_port: 7301,
        };
        let seen: IpAddr = "203.0.113.5".parse().unwrap();
        let Endpoints::Proxy {
            pon, agent_addr, ..
        } = with_observed_address(inside.clone(), seen)
        else {
            panic!()
        };
        assert_eq!(pon, "203.0.113.5:7300".parse().unwrap());
        assert_eq!(
            agent_addr,
            "10.0.0.5".parse::<std::net::Ipv4Addr>().unwrap()
        );
        // Seen over IPv6 as a mapped IPv4 address: the IPv4 address.
        let mapped: IpAddr = "::ffff:203.0.113.5".parse().unwrap();
        assert_eq!(
            with_observed_address(inside.clone(), mapped),
            with_observed_address(inside, seen)
        );
        // A configured address is the operator's word.
        let public = Endpoints::proxy(Ipv4Addr::new(198, 51, 100, 1));
        assert_eq!(with_observed_address(public.clone(), seen), public);
        // And an unspecified one that is left is refused, with the fix.
        let mut r = cu();
        let mut reg = reg("paris", "p", "PROXY", 1);
        reg.endpoints = Endpoints::Proxy {
            pon: "0.0.0.0:7300".parse().unwrap(),
            agent_addr: Ipv4Addr::new(198, 18, 1, 1),
            agent_udp_port: 7301,
        };
        let (a, why) = join(&mut r, 1, reg, Duration::ZERO, 1);
        assert_eq!(why, Some(Refusal::Invalid));
        assert!(refusal_text(&a, 1).contains("set the proxy's `public` address"));
    }

    #[test]
    fn a_proxy_whose_nat_moved_it_is_announced_at_its_new_address() {
        let g = |p: &str, e: &str| Grant {
            prefixes: vec![p.parse().unwrap()],
            endpoints: vec![e.parse().unwrap()],
            max_agents: None,
        };
        let mut r = Registry::new(
            Settings {
                grants: Grants(
                    [
                        ("paris".to_string(), g("198.18.1.0/24", "203.0.113.0/24")),
                        ("tokyo".to_string(), g("198.18.2.0/24", "192.0.2.0/24")),
                    ]
                    .into(),
                ),
                ..Settings::default()
            },
            Policy::default(),
        );
        let t = Duration::ZERO;
        let mut paris = reg("paris", "p", "PROXY", 1);
        paris.endpoints = with_observed_address(
            Endpoints::Proxy {
                pon: "0.0.0.0:7300".parse().unwrap(),
                agent_addr: Ipv4Addr::new(198, 18, 1, 1),
                agent_udp_port: 7301,
            },
            "203.0.113.1".parse().unwrap(),
        );
        join(&mut r, 1, paris, t, 1);
        let mut tokyo = reg("tokyo", "p", "PROXY", 1);
        tokyo.endpoints = Endpoints::proxy(Ipv4Addr::new(198, 18, 2, 1));
        join(&mut r, 2, tokyo, t, 2);
        // Paris's connection now comes from .101: tokyo hears of it.
        let (a, moved) = r.proxy_moved(1, "203.0.113.101".parse().unwrap());
        assert!(moved.is_ok());
        match &changes_to(&a, 2)[..] {
            [Change::Up(p)] => match p.info.endpoints {
                Endpoints::Proxy { pon, .. } => {
                    assert_eq!(pon, "203.0.113.101:7300".parse().unwrap())
                }
                _ => panic!(),
            },
            other => panic!("{other:?}"),
        }
        // The same address again: nothing to say.
        assert!(r
            .proxy_moved(1, "203.0.113.101".parse().unwrap())
            .0
            .is_empty());
        // Outside the grant, or tokyo's: refused, nothing announced.
        let (a, moved) = r.proxy_moved(1, "100.64.0.1".parse().unwrap());
        assert_eq!(moved.unwrap_err().0, Refusal::OutsideGrant);
        assert!(a.is_empty());
    }

    mod hostile {
        use super::*;
        use proptest::prelude::*;

        /// One thing a client may do, from a small domain so that clashes
        /// are frequent: which connection, which name, which key, which
        /// address.
        #[derive(Debug, Clone)]
        enum Op {
            Enrol {
                cloud: u8,
                name: u8,
                role: u8,
                key: u8,
                token: u8,
            },
            /// `honest`: as one of the identities enrolled so far (picked by
            /// `name`), else with the fields as drawn.
            Register {
                conn: u8,
                cloud: u8,
                name: u8,
                role: u8,
                key: u8,
                last: u8,
                proxy: bool,
                honest: bool,
            },
            Heartbeat {
                conn: u8,
            },
            Close {
                conn: u8,
                goodbye: bool,
            },
            Revoke {
                admin: bool,
                cloud: u8,
                name: u8,
            },
            Tick {
                ms: u16,
            },
        }

        fn op() -> impl Strategy<Value = Op> {
            prop_oneof![
                (0..3u8, 0..3u8, 0..2u8, 0..4u8, 0..3u8).prop_map(
                    |(cloud, name, role, key, token)| Op::Enrol {
                        cloud,
                        name,
                        role,
                        key,
                        token
                    }
                ),
                (
                    0..6u8,
                    0..3u8,
                    0..3u8,
                    0..2u8,
                    0..4u8,
                    0..4u8,
                    any::<bool>(),
                    any::<bool>()
                )
                    .prop_map(
                        |(conn, cloud, name, role, key, last, proxy, honest)| Op::Register {
                            conn,
                            cloud,
                            name,
                            role,
                            key,
                            last,
                            proxy,
                            honest
                        }
                    ),
                (0..6u8).prop_map(|conn| Op::Heartbeat { conn }),
                (0..6u8, any::<bool>()).prop_map(|(conn, goodbye)| Op::Close { conn, goodbye }),
                (any::<bool>(), 0..3u8, 0..3u8).prop_map(|(admin, cloud, name)| Op::Revoke {
                    admin,
                    cloud,
                    name
                }),
                (0..3000u16).prop_map(|ms| Op::Tick { ms }),
            ]
        }

        /// What each connection was told: its config, then every change.
        /// A connection the registry closes is closed as the server does,
        /// which tells the registry in turn.
        fn follow(
            r: &mut Registry,
            views: &mut HashMap<ConnId, BTreeMap<u32, Peer>>,
            actions: Vec<Action>,
        ) {
            let mut pending = actions;
            while !pending.is_empty() {
                let mut next = Vec::new();
                for a in pending {
                    match a {
                        Action::Send {
                            conn,
                            msg: Outgoing::Config(c),
                        } => {
                            views.insert(
                                conn,
                                c.peers.into_iter().map(|p| (p.info.id, p)).collect(),
                            );
                        }
                        Action::Send {
                            conn,
                            msg: Outgoing::Changes(changes),
                        } => {
                            let view = views
                                .get_mut(&conn)
                                .expect("changes only go to configured agents");
                            for c in changes {
                                match c {
                                    Change::Up(p) => {
                                        view.insert(p.info.id, p);
                                    }
                                    Change::Down(id) => {
                                        view.remove(&id);
                                    }
                                    // Grants do not change in this test.
                                    Change::Clouds(_) => {}
                                }
                            }
                        }
                        Action::Close { conn, .. } => {
                            views.remove(&conn);
                            next.extend(r.disconnected(conn, false, 1).0);
                        }
                        _ => {}
                    }
                }
                pending = next;
            }
        }

        const CLOUDS: [&str; 3] = ["paris", "tokyo", "nowhere"];
        const ROLES: [&str; 2] = ["PROXY", "APP"];

        proptest! {
            /// Whatever clients do, in any order: no panic, every present
            /// agent is enrolled as what it registered as, under its key,
            /// with addresses in its cloud's grant and held by nobody else.
            #[test]
            fn registry_invariants_hold_under_hostile_clients(ops in prop::collection::vec(op(), 1..60)) {
                let g = |p: &str| Grant { prefixes: vec![p.parse().unwrap()], endpoints: vec![], max_agents: None };
                let mut r = Registry::new(
                    Settings {
                        grants: Grants([("paris".to_string(), g("198.18.1.0/24")), ("tokyo".to_string(), g("198.18.2.0/24"))].into()),
                        admins: vec![ADMIN],
                        ..Settings::default()
                    },
                    Policy::default(),
                );
                let tokens = [token(&mut r, "paris", "*", None), token(&mut r, "*", "APP", Some(2)), "forged".to_string()];
                let mut now = Duration::ZERO;
                let mut conn_keys: HashMap<ConnId, KeyId> = HashMap::new();
                let mut enrolled: Vec<(u8, u8, u8, u8)> = Vec::new();
                let mut next_conn = 1000;
                let mut views: HashMap<ConnId, BTreeMap<u32, Peer>> = HashMap::new();
                for o in ops {
                    match o {
                        Op::Enrol { cloud, name, role, key, token } => {
                            next_conn += 1;
                            let e = Enrol {
                                version: PROTOCOL_VERSION,
                                token: tokens[token as usize].clone(),
                                cloud: CLOUDS[cloud as usize].into(),
                                role: ROLES[role as usize].into(),
                                name: format!("n{name}"),
                                noise_key: PublicKey([key; 32]),
                                csr: format!("key{key}").into_bytes(),
                            };
                            let (actions, done) = r.enrol(next_conn, e, 10, &FakeCa);
                            follow(&mut r, &mut views, actions);
                            if done.is_ok() {
                                enrolled.push((cloud, name, role, key));
                            }
                        }
                        Op::Register { conn, mut cloud, mut name, mut role, mut key, last, proxy, honest } => {
                            if honest && !enrolled.is_empty() {
                                (cloud, name, role, key) = enrolled[usize::from(name) % enrolled.len()];
                            }
                            let conn = u64::from(conn);
                            let k = KeyId::of_public_key(format!("key{key}").as_bytes());
                            let a = Ipv4Addr::new(198, 18, 1 + cloud % 2, last);
                            let reg = Register {
                                version: PROTOCOL_VERSION,
                                cloud: CLOUDS[cloud as usize].into(),
                                role: ROLES[role as usize].into(),
                                name: format!("n{name}"),
                                endpoints: if proxy { Endpoints::proxy(a) } else { Endpoints::App { addr: a, encap: Encap::Ipip } },
                                id_hint: Some(u32::from(last)),
                                noise_key: PublicKey([key; 32]),
                            };
                            let (actions, refused) = r.register(conn, Some(k), reg, now, 1);
                            follow(&mut r, &mut views, actions);
                            if refused.is_none() {
                                conn_keys.insert(conn, k);
                            }
                        }
                        Op::Heartbeat { conn } => r.heartbeat(u64::from(conn), now, 1),
                        Op::Close { conn, goodbye } => {
                            let conn = u64::from(conn);
                            let actions = r.disconnected(conn, goodbye, 1).0;
                            follow(&mut r, &mut views, actions);
                            views.remove(&conn);
                        }
                        Op::Revoke { admin, cloud, name } => {
                            let who = if admin { Some(ADMIN) } else { Some(KeyId([1; 32])) };
                            let req = AdminRequest::Revoke { cloud: CLOUDS[cloud as usize].into(), name: format!("n{name}") };
                            let (actions, done) = r.admin(999, who, req, PROTOCOL_VERSION, 1, &mut || None);
                            follow(&mut r, &mut views, actions);
                            prop_assert!(admin || done == Err(Refusal::NotAdmin));
                        }
                        Op::Tick { ms } => {
                            now += Duration::from_millis(u64::from(ms));
                            let actions = r.tick(now).0;
                            follow(&mut r, &mut views, actions);
                        }
                    }
                    // The invariants, after every step.
                    prop_assert_eq!(&r.index, &Index::of(r.agents.values().map(|e| &e.info)), "the index drifted");
                    let present: Vec<&Entry> = r.agents.values().filter(|e| e.present()).collect();
                    for e in &present {
                        let conn = e.conn.expect("present without a restart: connected");
                        let key = conn_keys[&conn];
                        let en = r.trust.enrolment(&key).expect("enrolled");
                        // What its deltas built is what a full config says.
                        let full: BTreeMap<u32, Peer> = r.config_for(e.info.id).peers.into_iter().map(|p| (p.info.id, p)).collect();
                        prop_assert_eq!(views.get(&conn), Some(&full), "agent {}'s view drifted from its config", e.info.id);
                        prop_assert!(!en.revoked, "a revoked agent stays present");
                        prop_assert_eq!((&en.cloud, &en.name, &en.role), (&e.info.cloud, &e.info.name, &e.info.role));
                        prop_assert!(r.settings.grants.check(&e.info.cloud, &e.info.endpoints).is_ok());
                        for o in &present {
                            if o.info.id != e.info.id {
                                for c in claims(&e.info.endpoints) {
                                    prop_assert!(!claims(&o.info.endpoints).any(|d| c.clashes(d)),
                                        "{} and {} share {}", e.info.id, o.info.id, c.addr());
                                }
                            }
                        }
                    }
                }
            }
        }
    }
}
