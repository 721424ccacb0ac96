//! A CU replica's I/O with etcd (`[etcd]` in cu.toml): connects, loads the
//! shared registry at start, holds one lease for the replica (its agents'
//! liveness keys hang on it: one keep-alive per replica, not per agent),
//! runs the transactions `replica` makes of what the registry persists
//! (many at once, in the order `write_order` keeps), and feeds what the
//! other replicas write, seen through one watch on the prefix, to the
//! actor. The logic is `replica`'s; this only moves bytes.
//!
//! etcd unreachable: the replica keeps serving the agents connected to it
//! (the registry is in memory); writes wait and are retried with backoff,
//! the watch is re-opened from the last revision seen, and a lease that
//! expired meanwhile is replaced and every liveness key written again.

use crate::registry::{Action, LeaveReason, Record, Registry};
use crate::replica::{Bad, Cmp, Lost, Op, Remote, Replica, Txn, Watched, Write};
use crate::store::Loaded;
use crate::trust::{Enrolment, TokenRecord};
use crate::write_order::{agent_lane, key_lane, Lane, WriteOrder};
use anyhow::Context;
use etcd_client::{
    Client, Compare, CompareOp, ConnectOptions, EventType, GetOptions, PutOptions, TxnOp,
    TxnOpResponse, TxnResponse, WatchOptions,
};
use pon_proto::control::AgentRecord;
use pon_telemetry::{Counter, PromWriter};
use serde::{Deserialize, Serialize};
use std::ops::Range;
use std::time::Duration;
use tokio::sync::mpsc;
use tokio::task::JoinSet;

/// `[etcd]` in cu.toml: run as one replica of several sharing the registry
/// in etcd, instead of the local redb store.
#[derive(Debug, Clone, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct EtcdSettings {
    /// etcd client URLs, e.g. `["http://10.0.0.1:2379", "http://10.0.0.2:2379"]`:
    /// the first is used (list this host's member first), the next after
    /// an error.
    pub endpoints: Vec<String>,
    /// Key prefix of this overlay's registry (several overlays can share
    /// one etcd cluster under different prefixes).
    #[serde(default = "default_prefix")]
    pub prefix: String,
    /// This replica's name: unique among the replicas; keep it across
    /// restarts (it owns id blocks under it).
    pub replica: String,
    /// TTL of the replica's lease, in seconds (2 to 60): how long after a
    /// replica dies the others see its agents' liveness keys vanish.
    #[serde(default = "default_lease_ttl_s")]
    pub lease_ttl_s: i64,
}

fn default_prefix() -> String {
    "/pon".into()
}
fn default_lease_ttl_s() -> i64 {
    3
}

impl EtcdSettings {
    pub fn check(&self) -> anyhow::Result<()> {
        if self.endpoints.is_empty() {
            anyhow::bail!("[etcd] endpoints is empty");
        }
        if !pon_proto::control::valid_name(&self.replica) {
            anyhow::bail!("[etcd] replica {:?} is not a valid name", self.replica);
        }
        if !self.prefix.starts_with('/') || self.prefix.len() > 200 {
            anyhow::bail!(
                "[etcd] prefix {:?} must start with / (at most 200 bytes)",
                self.prefix
            );
        }
        if !(2..=60).contains(&self.lease_ttl_s) {
            anyhow::bail!("[etcd] lease_ttl_s = {} is not in 2..=60", self.lease_ttl_s);
        }
        Ok(())
    }
}

pon_telemetry::counters! {
    pub struct EtcdCounters {
        connect => ("pon_cu_etcd_errors_total", "op=\"connect\"", "etcd errors, by operation (each retried with backoff)."),
        write => ("pon_cu_etcd_errors_total", "op=\"write\"", "etcd errors, by operation (each retried with backoff)."),
        watch => ("pon_cu_etcd_errors_total", "op=\"watch\"", "etcd errors, by operation (each retried with backoff)."),
        lease => ("pon_cu_etcd_errors_total", "op=\"lease\"", "etcd errors, by operation (each retried with backoff)."),
        lease_lost => ("pon_cu_etcd_leases_lost_total", "", "Leases that expired (etcd unreachable too long): liveness keys written again under a new one."),
        bad_key => ("pon_cu_etcd_bad_total", "reason=\"bad_key\"", "Keys under the prefix ignored, by reason."),
        bad_value => ("pon_cu_etcd_bad_total", "reason=\"bad_value\"", "Keys under the prefix ignored, by reason."),
        claims_lost => ("pon_cu_etcd_claims_lost_total", "", "New agents whose name or id another replica claimed first (they reconnect)."),
        remote => ("pon_cu_etcd_remote_changes_total", "", "Changes by other replicas fed to the registry."),
        writes => ("pon_cu_etcd_writes_total", "", "Transactions committed."),
        resyncs => ("pon_cu_etcd_resyncs_total", "", "Times etcd compacted past the watch and the registry was read again."),
    }
}

#[derive(Default)]
pub struct EtcdStats {
    pub counters: EtcdCounters,
}

impl EtcdStats {
    pub fn render(&self, w: &mut PromWriter) {
        self.counters.render(w);
    }
    fn bad(&self, b: Bad) -> &Counter {
        match b {
            Bad::Key => &self.counters.bad_key,
            Bad::Value => &self.counters.bad_value,
        }
    }
}

/// From the actor to the etcd task.
#[derive(Debug)]
pub enum FromActor {
    /// Persist this record, with its agent's stamp (`Registry::stamp`).
    Write(Box<Record>, Option<u64>),
}

/// From the etcd task to the actor.
#[derive(Debug)]
pub enum ToActor {
    Remote(Remote),
    Ids(Range<u32>),
    ClaimLost {
        id: u32,
        cloud: String,
        name: String,
    },
    /// Write this agent again with a newer stamp (`Lost::Superseded`).
    Restamp(u32),
    /// Another replica holds this agent with a newer registration.
    HeldElsewhere(u32),
    /// A new lease: write every local agent's liveness key again.
    NewLease,
    /// A fresh read of the store ended (after its `Remote`s): these are
    /// the agents other replicas hold now.
    Resynced(std::collections::HashSet<u32>),
}

/// What the actor does with a message from the etcd task; returns the
/// registry's actions and the agents announced as gone.
pub fn on_actor(
    registry: &mut Registry,
    m: ToActor,
    now: Duration,
    wall_ms: u64,
) -> (Vec<Action>, Vec<(u32, LeaveReason)>) {
    match m {
        ToActor::Remote(r) => crate::replica::apply(registry, r, now, wall_ms),
        ToActor::Ids(ids) => {
            registry.grant_ids(ids);
            (vec![], vec![])
        }
        ToActor::ClaimLost { id, cloud, name } => (registry.claim_lost(id, &cloud, &name), vec![]),
        ToActor::Restamp(id) => (registry.restamp(id, wall_ms), vec![]),
        ToActor::HeldElsewhere(id) => (registry.held_elsewhere(id), vec![]),
        ToActor::Resynced(online) => (registry.remote_resync(&online, now), vec![]),
        ToActor::NewLease => (
            registry
                .local_records()
                .into_iter()
                .map(|r| Action::Persist(Record::Agent(r)))
                .collect(),
            vec![],
        ),
    }
}

/// The shared registry as found at start, for `Registry::restore`.
pub struct Start {
    pub loaded: Loaded,
    /// Liveness keys of agents held by other replicas: (id, since_ms).
    pub online: Vec<Remote>,
    /// Id blocks this replica owns (claimed now or before a restart).
    pub blocks: Vec<Range<u32>>,
    pub task: Task,
}

/// The running connection, handed to `Task::run`.
pub struct Task {
    settings: EtcdSettings,
    client: Client,
    replica: Replica,
    lease: i64,
    /// Last time etcd confirmed the lease alive.
    lease_ok: tokio::time::Instant,
    revision: i64,
    next_block: u32,
    /// The member `client` talks to (index into the endpoints).
    member: usize,
    /// Bumped at each failover: streams of the old client are re-opened.
    generation: u64,
}

const BACKOFF_MIN: Duration = Duration::from_millis(100);
/// Transactions a replica has in flight at once (`write_order`).
const WRITES_IN_FLIGHT: usize = 64;

/// The writes a record must follow: its agent's, its key's.
pub fn lane_of(r: &Record) -> Lane {
    match r {
        Record::Agent(a) => agent_lane(a.info.id),
        Record::Forgotten(id) => agent_lane(*id),
        Record::Token(t) => key_lane(&t.hash),
        Record::Enrolment(e) => key_lane(&e.key.0),
    }
}

/// A record waiting for its turn.
struct Pending {
    record: Record,
    since: Option<u64>,
}

/// A transaction that came back from etcd.
struct Flown {
    lane: Lane,
    write: Write,
    attempt: u32,
    /// The connection it went on (`Task::generation`).
    generation: u64,
    result: Result<TxnResponse, etcd_client::Error>,
}

/// A watch that answered nothing (no change, no progress report asked for
/// every keep-alive tick) for this long is re-opened: its member may be
/// stuck, and changes would wait on it.
const WATCH_SILENCE: Duration = Duration::from_secs(3);
const BACKOFF_MAX: Duration = Duration::from_secs(3);

fn next_backoff(b: Duration) -> Duration {
    (b * 2).min(BACKOFF_MAX)
}

/// A client of member `i` alone: the task fails over to the next member
/// itself on an error (a balanced channel kept sending to a killed member
/// for seconds, long enough for the lease to expire).
async fn connect(s: &EtcdSettings, i: usize) -> Result<Client, etcd_client::Error> {
    let opts = ConnectOptions::new()
        .with_connect_timeout(Duration::from_secs(2))
        .with_timeout(Duration::from_secs(3))
        .with_keep_alive(Duration::from_secs(2), Duration::from_secs(2))
        .with_keep_alive_while_idle(true)
        // A member cut off from the cluster answers nothing rather than
        // stale data: requests and watches on it fail and are retried.
        .with_require_leader(true);
    Client::connect([&s.endpoints[i % s.endpoints.len()]], Some(opts)).await
}

/// Connects (retrying with backoff while etcd cannot be reached: the
/// replica has nothing to serve before it has the registry), takes the
/// lease, loads the registry and makes sure this replica owns an id block.
pub async fn start(settings: EtcdSettings, stats: &EtcdStats) -> anyhow::Result<Start> {
    settings.check()?;
    let mut backoff = BACKOFF_MIN;
    for i in 0.. {
        match try_start(&settings, i).await {
            Ok(s) => return Ok(s),
            Err(e) => {
                stats.counters.connect.inc();
                tracing::error!(endpoints = ?settings.endpoints, error = %format!("{e:#}"), retry_in = ?backoff, "etcd unreachable at start; retrying");
                tokio::time::sleep(backoff).await;
                backoff = next_backoff(backoff);
            }
        }
    }
    unreachable!("the attempts never run out")
}

async fn try_start(settings: &EtcdSettings, member: usize) -> anyhow::Result<Start> {
    let mut client = connect(settings, member).await.context("connecting")?;
    let mut replica = Replica::new(&settings.replica, &settings.prefix);
    let lease = client
        .lease_grant(settings.lease_ttl_s, None)
        .await
        .context("granting the lease")?
        .id();
    let got = client
        .get(replica.root(), Some(GetOptions::new().with_prefix()))
        .await
        .context("loading the registry")?;
    let revision = got.header().map_or(0, |h| h.revision());
    let mut loaded = Loaded::default();
    let mut online = Vec::new();
    let mut blocks = Vec::new();
    let mut next_block = 0;
    for kv in got.kvs() {
        let Ok(key) = kv.key_str() else {
            loaded.skipped += 1;
            continue;
        };
        if let Some((n, mine)) = replica.parse_idblock(key, kv.value()) {
            next_block = next_block.max(n.saturating_add(1));
            if mine {
                blocks.push(crate::registry::IdBlocks::block(n));
            }
            continue;
        }
        match replica.load(key, kv.value()) {
            Ok(Some(Loadable::Agent(r))) => loaded.records.push(r),
            Ok(Some(Loadable::Token(t))) => loaded.tokens.push(t),
            Ok(Some(Loadable::Enrolment(e))) => loaded.enrolments.push(e),
            Ok(Some(Loadable::Online(r))) => online.push(r),
            Ok(None) => {}
            Err(b) => {
                loaded.skipped += 1;
                tracing::warn!(key, reason = b.label(), "skipping a bad etcd key");
            }
        }
    }
    let mut task = Task {
        settings: settings.clone(),
        client,
        replica,
        lease,
        lease_ok: tokio::time::Instant::now(),
        revision,
        next_block,
        member,
        generation: 0,
    };
    if blocks.is_empty() {
        blocks.push(task.claim_block().await?);
    }
    Ok(Start {
        loaded,
        online,
        blocks,
        task,
    })
}

/// A key found at start.
pub enum Loadable {
    Agent(AgentRecord),
    Token(TokenRecord),
    Enrolment(Enrolment),
    Online(Remote),
}

impl Replica {
    /// A key found at start: unlike a watched change, this replica's own
    /// records count too (written before it restarted); its own liveness
    /// keys are a previous life's, whose agents reconnect.
    pub fn load(&mut self, key: &str, value: &[u8]) -> Result<Option<Loadable>, Bad> {
        let mut other = Replica::new("", &self.root());
        let w = Watched::Put {
            key: key.into(),
            value: value.into(),
        };
        // As seen by a replica with no name, every writer is another one.
        Ok(match other.watched(&w)? {
            Some(Remote::Record { record, .. }) => Some(Loadable::Agent(record)),
            Some(Remote::Token(t)) => Some(Loadable::Token(t)),
            Some(Remote::Enrolment(e)) => Some(Loadable::Enrolment(e)),
            Some(online @ Remote::Online { .. }) => {
                self.watched(&w)?.map(|_| Loadable::Online(online))
            }
            Some(Remote::Offline(_)) | None => None,
        })
    }
}

fn to_etcd(t: &Txn, lease: i64) -> etcd_client::Txn {
    let when: Vec<Compare> = t
        .when
        .iter()
        .map(|c| match c {
            Cmp::Value(k, v) => Compare::value(k.as_str(), CompareOp::Equal, v.clone()),
            Cmp::Absent(k) => Compare::version(k.as_str(), CompareOp::Equal, 0),
            Cmp::Older(k, v) => Compare::value(k.as_str(), CompareOp::Less, v.clone()),
        })
        .collect();
    let then: Vec<TxnOp> = t
        .then
        .iter()
        .map(|o| match o {
            Op::Put { key, value, leased } => TxnOp::put(
                key.as_str(),
                value.clone(),
                leased.then(|| PutOptions::new().with_lease(lease)),
            ),
            Op::Delete(k) => TxnOp::delete(k.as_str(), None),
        })
        .collect();
    let txn = etcd_client::Txn::new().when(when).and_then(then);
    match &t.otherwise {
        Some(o) => txn.or_else(vec![TxnOp::txn(to_etcd(o, lease))]),
        None => txn,
    }
}

/// The branch of the transaction that applied (0: the first), if any.
fn applied(r: &TxnResponse) -> Option<usize> {
    if r.succeeded() {
        return Some(0);
    }
    r.op_responses().iter().find_map(|o| match o {
        TxnOpResponse::Txn(t) => applied(t).map(|b| b + 1),
        _ => None,
    })
}

impl Task {
    /// Moves to the next member after an error.
    async fn failover(&mut self, stats: &EtcdStats) {
        self.member = (self.member + 1) % self.settings.endpoints.len();
        self.generation += 1;
        match connect(&self.settings, self.member).await {
            Ok(c) => self.client = c,
            Err(e) => {
                stats.counters.connect.inc();
                tracing::warn!(member = %self.settings.endpoints[self.member], error = %e, "etcd member unreachable; the next one is tried after the next error");
            }
        }
    }

    async fn claim_block(&mut self) -> anyhow::Result<Range<u32>> {
        loop {
            let n = self.next_block;
            self.next_block = n.saturating_add(1);
            let txn = to_etcd(&self.replica.claim_block(n), self.lease);
            let r = self.client.txn(txn).await.context("claiming an id block")?;
            if applied(&r).is_some() {
                tracing::info!(block = n, replica = self.replica.name(), "id block claimed");
                return Ok(crate::registry::IdBlocks::block(n));
            }
        }
    }

    /// Starts every write the order lets start now.
    fn start_writes(&mut self, order: &mut WriteOrder<Lane, Pending>, flying: &mut JoinSet<Flown>) {
        while let Some((lane, p)) = order.take() {
            let Pending { record, since } = p;
            match self.replica.write_for(&record, since) {
                Some(w) => self.send_write(flying, lane, w, 0, Duration::ZERO),
                // Not this replica's to write: the agent's next may start.
                None => order.complete(lane),
            }
        }
    }

    /// One transaction to etcd, on its own task so that many are in flight
    /// (etcd syncs its disk once for all of them); after `delay` when it is
    /// a retry.
    fn send_write(
        &self,
        flying: &mut JoinSet<Flown>,
        lane: Lane,
        w: Write,
        attempt: u32,
        delay: Duration,
    ) {
        let mut client = self.client.clone();
        let txn = to_etcd(&w.txn, self.lease);
        let generation = self.generation;
        flying.spawn(async move {
            tokio::time::sleep(delay).await;
            let result = client.txn(txn).await;
            Flown {
                lane,
                write: w,
                attempt,
                generation,
                result,
            }
        });
    }

    /// A transaction came back: what it means goes to the actor and the
    /// agent's next write may start; an error is retried with backoff,
    /// after a failover or a new lease (once per connection, not once per
    /// write in flight).
    async fn landed(
        &mut self,
        f: Flown,
        order: &mut WriteOrder<Lane, Pending>,
        flying: &mut JoinSet<Flown>,
        to_actor: &mpsc::UnboundedSender<ToActor>,
        stats: &EtcdStats,
    ) {
        match f.result {
            Ok(resp) => {
                stats.counters.writes.inc();
                match self.replica.done(&f.write, applied(&resp)) {
                    Some(Lost::Claim { id, cloud, name }) => {
                        stats.counters.claims_lost.inc();
                        tracing::warn!(id, %cloud, %name, "another CU replica claimed this agent's name or id first; it reconnects");
                        let _ = to_actor.send(ToActor::ClaimLost { id, cloud, name });
                    }
                    Some(Lost::Superseded { id }) => {
                        let _ = to_actor.send(ToActor::Restamp(id));
                    }
                    Some(Lost::HeldElsewhere { id }) => {
                        let _ = to_actor.send(ToActor::HeldElsewhere(id));
                    }
                    None => {}
                }
                order.complete(f.lane);
            }
            Err(e) => {
                stats.counters.write.inc();
                let backoff =
                    (BACKOFF_MIN * 2u32.saturating_pow(f.attempt.min(8))).min(BACKOFF_MAX);
                tracing::error!(error = %e, retry_in = ?backoff, "etcd write failed; retrying (agents connected here are still served)");
                if f.generation == self.generation {
                    if e.to_string().contains("lease not found") {
                        // Expired while etcd was out of reach: a new one,
                        // and every liveness key is written again.
                        stats.counters.lease_lost.inc();
                        self.renew_lease(to_actor).await;
                    } else {
                        self.failover(stats).await;
                    }
                }
                self.send_write(flying, f.lane, f.write, f.attempt + 1, backoff);
            }
        }
    }

    /// Reads every key under the prefix and feeds it to the actor as news,
    /// then which agents other replicas hold; the watch then resumes from
    /// that read's revision.
    async fn resync(
        &mut self,
        to_actor: &mpsc::UnboundedSender<ToActor>,
        stats: &EtcdStats,
    ) -> anyhow::Result<()> {
        let got = self
            .client
            .get(self.replica.root(), Some(GetOptions::new().with_prefix()))
            .await
            .context("reading the registry")?;
        let kvs: Vec<(&str, &[u8])> = got
            .kvs()
            .iter()
            .filter_map(|kv| match kv.key_str() {
                Ok(k) => Some((k, kv.value())),
                Err(_) => {
                    stats.bad(Bad::Key).inc();
                    None
                }
            })
            .collect();
        let (news, online, bad) = self.replica.resync(kvs);
        for b in bad {
            stats.bad(b).inc();
        }
        for r in news {
            stats.counters.remote.inc();
            let _ = to_actor.send(ToActor::Remote(r));
        }
        let _ = to_actor.send(ToActor::Resynced(online));
        if let Some(h) = got.header() {
            self.revision = h.revision();
        }
        Ok(())
    }

    async fn open_watch(&mut self) -> Result<etcd_client::WatchStream, etcd_client::Error> {
        let opts = WatchOptions::new()
            .with_prefix()
            .with_prev_key()
            .with_start_revision(self.revision + 1);
        self.client.watch(self.replica.root(), Some(opts)).await
    }

    /// A fresh lease after the old one expired; liveness keys follow.
    async fn renew_lease(&mut self, to_actor: &mpsc::UnboundedSender<ToActor>) -> bool {
        match self
            .client
            .lease_grant(self.settings.lease_ttl_s, None)
            .await
        {
            Ok(l) => {
                self.lease = l.id();
                self.lease_ok = tokio::time::Instant::now();
                self.generation += 1;
                self.replica.lease_renewed();
                let _ = to_actor.send(ToActor::NewLease);
                tracing::warn!(
                    lease = self.lease,
                    "etcd lease expired; liveness keys written again under a new one"
                );
                true
            }
            Err(_) => false,
        }
    }

    /// The replica's loop: writes from the actor, the watch, the lease.
    pub async fn run(
        mut self,
        mut from_actor: mpsc::UnboundedReceiver<FromActor>,
        need_ids: std::sync::Arc<tokio::sync::Notify>,
        to_actor: mpsc::UnboundedSender<ToActor>,
        stats: std::sync::Arc<EtcdStats>,
    ) {
        let mut keepalive = tokio::time::interval(Duration::from_millis(
            (self.settings.lease_ttl_s as u64 * 1000 / 3).max(300),
        ));
        keepalive.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut watch: Option<etcd_client::WatchStream> = None;
        let mut watch_retry = tokio::time::Instant::now();
        let mut watch_backoff = BACKOFF_MIN;
        let mut watch_heard = tokio::time::Instant::now();
        let mut keeper: Option<etcd_client::LeaseKeeper> = None;
        let mut keep_stream: Option<etcd_client::LeaseKeepAliveStream> = None;
        let mut generation = self.generation;
        let mut order = WriteOrder::new(WRITES_IN_FLIGHT);
        let mut flying: JoinSet<Flown> = JoinSet::new();
        loop {
            if generation != self.generation {
                // Failed over (or a new lease): streams start again.
                generation = self.generation;
                watch = None;
                keeper = None;
                keep_stream = None;
            }
            if watch.is_none() && tokio::time::Instant::now() >= watch_retry {
                match self.open_watch().await {
                    Ok(w) => {
                        watch = Some(w);
                        watch_backoff = BACKOFF_MIN;
                        watch_heard = tokio::time::Instant::now();
                    }
                    Err(e) => {
                        stats.counters.watch.inc();
                        tracing::error!(error = %e, retry_in = ?watch_backoff, "etcd watch failed; retrying (changes by other replicas wait)");
                        watch_retry = tokio::time::Instant::now() + watch_backoff;
                        watch_backoff = next_backoff(watch_backoff);
                        self.failover(&stats).await;
                        continue;
                    }
                }
            }
            tokio::select! {
                // A claim of ids has its own branch: queued behind a
                // backlog of writes, it left a busy replica without ids
                // to give (agents closed with "no free id yet" until the
                // writes drained). Not `biased`: a steady stream of writes
                // would then starve the lease keep-alive and the watch.
                () = need_ids.notified() => {
                    let mut backoff = BACKOFF_MIN;
                    loop {
                        match self.claim_block().await {
                            Ok(ids) => {
                                let _ = to_actor.send(ToActor::Ids(ids));
                                break;
                            }
                            Err(e) => {
                                stats.counters.write.inc();
                                tracing::error!(error = %format!("{e:#}"), "claiming an id block failed; retrying");
                                tokio::time::sleep(backoff).await;
                                backoff = next_backoff(backoff);
                            }
                        }
                    }
                }
                m = from_actor.recv() => {
                    let Some(FromActor::Write(r, since)) = m else { return };
                    let lane = lane_of(&r);
                    order.push(lane, Pending { record: *r, since });
                    self.start_writes(&mut order, &mut flying);
                }
                Some(done) = flying.join_next(), if !flying.is_empty() => {
                    match done {
                        Ok(f) => self.landed(f, &mut order, &mut flying, &to_actor, &stats).await,
                        Err(e) => tracing::error!(error = %e, "an etcd write task failed"),
                    }
                    self.start_writes(&mut order, &mut flying);
                }
                msg = async { watch.as_mut().expect("checked").message().await }, if watch.is_some() => {
                    match msg {
                        Ok(Some(resp)) => {
                            watch_heard = tokio::time::Instant::now();
                            if resp.compact_revision() > 0 {
                                // The changes since the last revision seen
                                // are gone: read everything again, then
                                // watch from that read on.
                                stats.counters.resyncs.inc();
                                tracing::warn!(compacted = resp.compact_revision(), "etcd compacted past this replica's watch; reading the registry again");
                                watch = None;
                                if let Err(e) = self.resync(&to_actor, &stats).await {
                                    stats.counters.watch.inc();
                                    tracing::error!(error = %format!("{e:#}"), "reading the registry again failed; retrying");
                                    watch_retry = tokio::time::Instant::now() + watch_backoff;
                                    watch_backoff = next_backoff(watch_backoff);
                                    self.failover(&stats).await;
                                }
                                continue;
                            }
                            if resp.canceled() {
                                stats.counters.watch.inc();
                                watch = None;
                                continue;
                            }
                            for ev in resp.events() {
                                let Some(kv) = ev.kv() else { continue };
                                self.revision = self.revision.max(kv.mod_revision());
                                let Ok(key) = kv.key_str() else {
                                    stats.bad(Bad::Key).inc();
                                    continue;
                                };
                                let w = match ev.event_type() {
                                    EventType::Put => Watched::Put { key: key.into(), value: kv.value().to_vec() },
                                    EventType::Delete => Watched::Delete { key: key.into(), prev: ev.prev_kv().map(|p| p.value().to_vec()) },
                                };
                                match self.replica.watched(&w) {
                                    Ok(Some(r)) => {
                                        stats.counters.remote.inc();
                                        let _ = to_actor.send(ToActor::Remote(r));
                                    }
                                    Ok(None) => {}
                                    Err(b) => {
                                        stats.bad(b).inc();
                                        tracing::warn!(key, reason = b.label(), "ignoring a bad etcd key");
                                    }
                                }
                            }
                            if let Some(h) = resp.header() {
                                self.revision = self.revision.max(h.revision());
                            }
                        }
                        Ok(None) | Err(_) => {
                            stats.counters.watch.inc();
                            tracing::warn!("etcd watch ended; re-opening it from the last revision seen");
                            watch = None;
                            self.failover(&stats).await;
                        }
                    }
                }
                _ = keepalive.tick() => {
                    if let Some(w) = watch.as_mut() {
                        if watch_heard.elapsed() > WATCH_SILENCE {
                            stats.counters.watch.inc();
                            tracing::warn!(silent = ?watch_heard.elapsed(), "etcd watch silent; re-opening it");
                            watch = None;
                            self.failover(&stats).await;
                            continue;
                        } else {
                            // Answered with a progress report (etcd >= 3.4).
                            let _ = w.request_progress().await;
                        }
                    }
                    if keeper.is_none() {
                        match self.client.lease_keep_alive(self.lease).await {
                            Ok((k, s)) => { keeper = Some(k); keep_stream = Some(s); }
                            Err(e) => {
                                stats.counters.lease.inc();
                                tracing::warn!(error = %e, "etcd lease keep-alive failed; retrying");
                                self.failover(&stats).await;
                                continue;
                            }
                        }
                    }
                    let (Some(k), Some(s)) = (keeper.as_mut(), keep_stream.as_mut()) else { continue };
                    let alive = match k.keep_alive().await {
                        Ok(()) => tokio::time::timeout(Duration::from_secs(2), s.message()).await,
                        Err(e) => Ok(Err(e)),
                    };
                    match alive {
                        Ok(Ok(Some(r))) if r.ttl() > 0 => self.lease_ok = tokio::time::Instant::now(),
                        Ok(Ok(Some(_))) => {
                            // Expired: etcd deleted this replica's liveness keys.
                            stats.counters.lease_lost.inc();
                            keeper = None;
                            keep_stream = None;
                            if !self.renew_lease(&to_actor).await {
                                stats.counters.lease.inc();
                            }
                        }
                        _ => {
                            stats.counters.lease.inc();
                            tracing::warn!("etcd lease keep-alive got no answer; retrying");
                            self.failover(&stats).await;
                        }
                    }
                    // Not confirmed for a whole TTL: take it as expired
                    // rather than wait to be told (the keys are written
                    // again under a new lease; the old one, if it lives,
                    // no longer holds them).
                    if self.lease_ok.elapsed() > Duration::from_secs(self.settings.lease_ttl_s as u64) {
                        stats.counters.lease_lost.inc();
                        if !self.renew_lease(&to_actor).await {
                            stats.counters.lease.inc();
                            self.failover(&stats).await;
                        }
                    }
                }
            }
        }
    }
}
