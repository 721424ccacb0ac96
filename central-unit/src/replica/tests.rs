//! Replicas wired through an in-memory store with etcd's semantics for
//! what `Replica` uses (transactions with value/absence conditions and a
//! nested else-branch, leased keys, an ordered watch log with previous
//! values on deletes).

use super::*;
use crate::etcd::lane_of;
use crate::policy::Policy;
use crate::registry::{ConnId, IdBlocks, Outgoing, Settings};
use crate::trust::{Grant, Grants, KeyId};
use crate::write_order::{Lane, WriteOrder};
use pon_proto::control::{Change, Register};
use std::collections::{BTreeMap, BTreeSet};

#[derive(Default)]
struct Fake {
    /// key -> (value, leased by replica)
    kv: BTreeMap<String, (Vec<u8>, Option<usize>)>,
    log: Vec<Watched>,
}

impl Fake {
    fn holds(&self, c: &Cmp) -> bool {
        match c {
            Cmp::Value(k, v) => self.kv.get(k).map(|x| &x.0) == Some(v),
            Cmp::Absent(k) => !self.kv.contains_key(k),
            Cmp::Older(k, v) => self.kv.get(k).is_some_and(|x| x.0 < *v),
        }
    }

    /// The branch that applied (0: the first), if any.
    fn run(&mut self, t: &Txn, replica: usize) -> Option<usize> {
        if t.when.iter().all(|c| self.holds(c)) {
            for op in &t.then {
                match op {
                    Op::Put { key, value, leased } => {
                        self.kv
                            .insert(key.clone(), (value.clone(), leased.then_some(replica)));
                        self.log.push(Watched::Put {
                            key: key.clone(),
                            value: value.clone(),
                        });
                    }
                    Op::Delete(key) => {
                        if let Some((v, _)) = self.kv.remove(key) {
                            self.log.push(Watched::Delete {
                                key: key.clone(),
                                prev: Some(v),
                            });
                        }
                    }
                }
            }
            return Some(0);
        }
        match &t.otherwise {
            Some(o) => self.run(o, replica).map(|b| b + 1),
            None => None,
        }
    }

    /// Replica `r`'s lease expires: its leased keys vanish.
    fn expire(&mut self, r: usize) {
        let gone: Vec<String> = self
            .kv
            .iter()
            .filter(|(_, (_, l))| *l == Some(r))
            .map(|(k, _)| k.clone())
            .collect();
        for key in gone {
            let (v, _) = self.kv.remove(&key).unwrap();
            self.log.push(Watched::Delete { key, prev: Some(v) });
        }
    }
}

struct Node {
    reg: Registry,
    rep: Replica,
    /// Writes as the etcd task orders them (`write_order`), and those in
    /// flight: the store takes the ones in flight in any order.
    order: WriteOrder<Lane, (Record, Option<u64>)>,
    flying: Vec<(Lane, Write)>,
    seen: usize,
    /// Everything sent to local connections, in order.
    sent: Vec<(ConnId, Outgoing)>,
    closed: BTreeSet<ConnId>,
}

const CLOUDS: [&str; 2] = ["paris", "tokyo"];

fn settings() -> Settings {
    let wide = Grant {
        prefixes: vec!["198.18.0.0/16".parse().unwrap()],
        endpoints: vec![],
        max_agents: None,
    };
    Settings {
        grants: Grants(CLOUDS.map(|c| (c.to_string(), wide.clone())).into()),
        ..Settings::default()
    }
}

/// Agent `k`: even ones are proxies, odd ones app VMs; each its own
/// address; half in each cloud.
fn agent(k: u8) -> Register {
    let role = if k.is_multiple_of(2) { "PROXY" } else { "APP" };
    crate::registry::tests::reg(cloud(k), &format!("a{k}"), role, 10 + k)
}

fn cloud(k: u8) -> &'static str {
    CLOUDS[usize::from(k / 2 % 2)]
}

fn key(k: u8) -> KeyId {
    crate::registry::tests::key_of(cloud(k), &format!("a{k}"))
}

const AGENTS: u8 = 8;

fn node(i: usize) -> Node {
    let mut reg = Registry::new(settings(), Policy::default());
    reg.use_id_blocks();
    // Every agent is enrolled (as if replicated before this test).
    reg.restore_trust(
        [],
        (0..AGENTS).map(|k| {
            let r = agent(k);
            Enrolment {
                key: key(k),
                cloud: r.cloud,
                name: r.name,
                role: r.role,
                noise_key: r.noise_key,
                enrolled_ms: 0,
                revoked: false,
            }
        }),
    );
    Node {
        reg,
        rep: Replica::new(&format!("cu{i}"), "/pon/"),
        order: WriteOrder::new(4),
        flying: Vec::new(),
        seen: 0,
        sent: Vec::new(),
        closed: BTreeSet::new(),
    }
}

struct World {
    fake: Fake,
    nodes: Vec<Node>,
    now: Duration,
    wall: u64,
}

impl World {
    fn new(n: usize) -> World {
        let mut w = World {
            fake: Fake::default(),
            nodes: (0..n).map(node).collect(),
            now: Duration::ZERO,
            wall: 1_000,
        };
        // As `etcd::start` does before the replica serves.
        for i in 0..n {
            w.claim_block(i);
        }
        w
    }

    /// Carries out node `i`'s actions as the server and `etcd` do.
    fn execute(&mut self, i: usize, actions: Vec<Action>) {
        let mut queue: std::collections::VecDeque<Action> = actions.into();
        while let Some(a) = queue.pop_front() {
            let n = &mut self.nodes[i];
            match a {
                Action::Send { conn, msg } => n.sent.push((conn, msg)),
                Action::Close { conn, .. } => {
                    n.closed.insert(conn);
                    // The connection's task ends and reports it.
                    let (more, _) = n.reg.disconnected(conn, false, self.wall);
                    queue.extend(more);
                }
                Action::Persist(r) => {
                    let since = match &r {
                        Record::Agent(a) => n.reg.stamp(a.info.id),
                        _ => None,
                    };
                    let lane = lane_of(&r);
                    n.order.push(lane, (r, since));
                    self.start_writes(i);
                }
                Action::NeedIds => self.claim_block(i),
            }
        }
    }

    /// Node `i` sends every write its order lets go.
    fn start_writes(&mut self, i: usize) {
        let n = &mut self.nodes[i];
        while let Some((lane, (r, since))) = n.order.take() {
            match n.rep.write_for(&r, since) {
                Some(w) => n.flying.push((lane, w)),
                None => n.order.complete(lane),
            }
        }
    }

    /// The store takes node `i`'s write in flight at `pick` (modulo);
    /// whether one was there.
    fn land(&mut self, i: usize, pick: usize) -> bool {
        let n = &mut self.nodes[i];
        if n.flying.is_empty() {
            return false;
        }
        let (lane, w) = n.flying.remove(pick % n.flying.len());
        let branch = self.fake.run(&w.txn, i);
        let n = &mut self.nodes[i];
        let more = match n.rep.done(&w, branch) {
            Some(Lost::Claim { id, cloud, name }) => n.reg.claim_lost(id, &cloud, &name),
            Some(Lost::Superseded { id }) => n.reg.restamp(id, self.wall),
            Some(Lost::HeldElsewhere { id }) => n.reg.held_elsewhere(id),
            None => vec![],
        };
        n.order.complete(lane);
        self.start_writes(i);
        self.execute(i, more);
        true
    }

    /// Node `i`'s watch was compacted past: what it missed is gone from the
    /// log, and it reads every key again (`etcd::Task::resync`).
    fn resync(&mut self, i: usize) {
        self.nodes[i].seen = self.fake.log.len();
        let kvs: Vec<(String, Vec<u8>)> = self
            .fake
            .kv
            .iter()
            .map(|(k, (v, _))| (k.clone(), v.clone()))
            .collect();
        let (news, online, bad) = self.nodes[i]
            .rep
            .resync(kvs.iter().map(|(k, v)| (k.as_str(), v.as_slice())));
        assert!(bad.is_empty(), "{bad:?}");
        for r in news {
            let (a, _) = apply(&mut self.nodes[i].reg, r, self.now, self.wall);
            self.execute(i, a);
        }
        let a = self.nodes[i].reg.remote_resync(&online, self.now);
        self.execute(i, a);
    }

    fn claim_block(&mut self, i: usize) {
        for b in 0.. {
            if self
                .fake
                .run(&self.nodes[i].rep.claim_block(b), i)
                .is_some()
            {
                self.nodes[i].reg.grant_ids(IdBlocks::block(b));
                return;
            }
        }
    }

    /// Lands every write in flight and delivers every watched change to
    /// every node until nothing moves.
    fn pump(&mut self) {
        self.pump_except(None);
    }

    /// As `pump`, but node `cut` hears nothing (its watch is stuck).
    fn pump_except(&mut self, cut: Option<usize>) {
        loop {
            let mut moved = false;
            for i in 0..self.nodes.len() {
                while self.land(i, 0) {
                    moved = true;
                }
                if Some(i) == cut {
                    continue;
                }
                while self.nodes[i].seen < self.fake.log.len() {
                    let w = self.fake.log[self.nodes[i].seen].clone();
                    self.nodes[i].seen += 1;
                    moved = true;
                    let remote = self.nodes[i].rep.watched(&w).expect("a good key");
                    if let Some(r) = remote {
                        let (a, _) = apply(&mut self.nodes[i].reg, r, self.now, self.wall);
                        self.execute(i, a);
                    }
                }
            }
            if !moved {
                return;
            }
        }
    }

    fn register(&mut self, i: usize, conn: ConnId, k: u8) -> Vec<Action> {
        self.wall += 1;
        let (a, refused) =
            self.nodes[i]
                .reg
                .register(conn, Some(key(k)), agent(k), self.now, self.wall);
        assert_eq!(refused, None);
        let out = a.clone();
        self.execute(i, a);
        out
    }

    /// Time passes on node `i`; its connected agents kept sending
    /// heartbeats.
    fn tick(&mut self, i: usize) {
        let conns: Vec<ConnId> = self.nodes[i].sent.iter().map(|(c, _)| *c).collect();
        for c in conns {
            self.nodes[i].reg.heartbeat(c, self.now, self.wall);
        }
        let (a, _) = self.nodes[i].reg.tick(self.now);
        self.execute(i, a);
    }

    /// (id, cloud, name, present) of every agent, as node `i` sees it.
    fn picture(&self, i: usize) -> Vec<(u32, String, String, bool)> {
        self.nodes[i]
            .reg
            .records()
            .into_iter()
            .map(|r| (r.info.id, r.info.cloud, r.info.name, r.online))
            .collect()
    }

    fn assert_converged(&self) {
        let first = self.picture(0);
        for i in 1..self.nodes.len() {
            assert_eq!(self.picture(i), first, "replica {i} differs from replica 0");
        }
        let ids: BTreeSet<u32> = first.iter().map(|r| r.0).collect();
        assert_eq!(ids.len(), first.len(), "ids are unique");
        let names: BTreeSet<(String, String)> =
            first.iter().map(|r| (r.1.clone(), r.2.clone())).collect();
        assert_eq!(names.len(), first.len(), "one id per name");
        for n in &self.nodes {
            assert!(n.reg.index_is_current(), "a replica's index drifted");
        }
        // Every agent's full configuration is the same on every replica.
        for &id in &ids {
            let cfg = self.nodes[0].reg.config_for(id);
            for n in &self.nodes[1..] {
                assert_eq!(n.reg.config_for(id), cfg);
            }
        }
    }

    fn changes_to(&self, i: usize, conn: ConnId) -> Vec<Change> {
        self.nodes[i]
            .sent
            .iter()
            .filter(|(c, _)| *c == conn)
            .filter_map(|(_, m)| match m {
                Outgoing::Changes(ch) => Some(ch.clone()),
                _ => None,
            })
            .flatten()
            .collect()
    }
}

#[test]
fn replicas_converge_on_ids_and_views() {
    let mut w = World::new(3);
    for k in 0..AGENTS {
        w.register(usize::from(k) % 3, u64::from(k) + 1, k);
        if k % 3 == 0 {
            w.pump();
        }
    }
    w.pump();
    w.assert_converged();
    assert_eq!(w.picture(0).len(), usize::from(AGENTS));
    assert!(w.picture(0).iter().all(|r| r.3), "every agent present");
    // A proxy of paris connected to replica 0 was told of the tokyo proxy
    // that joined on replica 1, as of a local join.
    let tokyo_proxy = w.nodes[2].reg.id_of(3).unwrap();
    let ups: Vec<u32> = w
        .changes_to(0, 1)
        .iter()
        .filter_map(|c| match c {
            Change::Up(p) => Some(p.info.id),
            _ => None,
        })
        .collect();
    assert!(ups.contains(&tokyo_proxy), "{ups:?}");
}

#[test]
fn one_name_registered_on_two_replicas_at_once_gets_one_id() {
    let mut w = World::new(2);
    // Both replicas accept before either sees the other's write.
    w.register(0, 1, 0);
    w.register(1, 1, 0);
    w.pump();
    let closed: Vec<usize> = (0..2).filter(|&i| w.nodes[i].closed.contains(&1)).collect();
    assert_eq!(closed.len(), 1, "exactly one replica lost the claim");
    let loser = closed[0];
    // The agent comes back to the replica that dropped it: same id as won.
    w.register(loser, 2, 0);
    w.pump();
    w.assert_converged();
    let ids: Vec<u32> = w.picture(0).iter().map(|r| r.0).collect();
    assert_eq!(ids.len(), 1);
    assert_eq!(w.nodes[loser].reg.id_of(2), Some(ids[0]));
}

#[test]
fn ids_are_stable_when_an_agent_moves_between_replicas() {
    let mut w = World::new(2);
    w.register(0, 1, 0);
    w.pump();
    let id = w.nodes[0].reg.id_of(1).unwrap();
    // It moves to replica 1 (its old connection not closed yet).
    w.register(1, 5, 0);
    w.pump();
    assert_eq!(w.nodes[1].reg.id_of(5), Some(id));
    assert!(
        w.nodes[0].closed.contains(&1),
        "the stale connection is closed"
    );
    w.assert_converged();
}

#[test]
fn a_replica_whose_watch_was_compacted_reads_the_store_again_and_agrees() {
    let mut w = World::new(3);
    w.register(0, 1, 0); // paris proxy on replica 0
    w.register(1, 2, 2); // paris proxy 2 on replica 1
    w.register(2, 3, 4); // paris proxy 3 on replica 2
    w.register(1, 4, 3); // a tokyo app VM on replica 1
    w.pump();
    // Replica 2 hears nothing while: an app VM joins on replica 0, the
    // tokyo app VM says goodbye on replica 1, and replica 0 dies (its
    // liveness keys vanish). Then etcd compacts past replica 2's watch.
    w.register(0, 5, 1);
    let (a, _) = w.nodes[1].reg.disconnected(4, true, w.wall);
    w.execute(1, a);
    w.fake.expire(0);
    w.pump_except(Some(2));
    w.resync(2);
    w.pump();
    let (one, two) = (w.picture(1), w.picture(2));
    assert_eq!(
        two, one,
        "replica 2 agrees with replica 1 after reading again"
    );
    for &(id, ..) in &one {
        assert_eq!(w.nodes[2].reg.config_for(id), w.nodes[1].reg.config_for(id));
    }
    let app = w.nodes[0].reg.id_of(5).unwrap();
    assert!(
        two.iter().any(|r| r.0 == app),
        "the app VM that joined unseen"
    );
    // Replica 0's agents stay for the grace, then are gone on both.
    w.now += Duration::from_secs(60);
    w.tick(1);
    w.tick(2);
    let (one, two) = (w.picture(1), w.picture(2));
    assert_eq!(two, one);
    let paris = w.nodes[0].reg.id_of(1).unwrap();
    assert!(
        two.iter().any(|r| r.0 == paris && !r.3),
        "replica 0's proxy gone after the grace: {two:?}"
    );
}

#[test]
fn a_dead_replicas_agents_stay_in_views_until_they_reconnect_elsewhere() {
    let mut w = World::new(2);
    w.register(0, 1, 0); // paris proxy on replica 0
    w.register(1, 2, 2); // tokyo proxy on replica 1
    w.pump();
    let paris = w.nodes[0].reg.id_of(1).unwrap();
    let before = w.nodes[1].sent.len();
    // Replica 0 dies: its lease expires.
    w.fake.expire(0);
    w.pump();
    w.now += Duration::from_secs(5);
    w.tick(1);
    assert!(
        w.nodes[1]
            .reg
            .config_for(w.nodes[1].reg.id_of(2).unwrap())
            .peers
            .iter()
            .any(|p| p.info.id == paris),
        "still in the tokyo proxy's view during the grace"
    );
    // The paris proxy reconnects to replica 1: same id, nothing announced.
    w.register(1, 3, 0);
    w.pump();
    assert_eq!(w.nodes[1].reg.id_of(3), Some(paris));
    w.now += Duration::from_secs(60);
    w.tick(1);
    let news: Vec<_> = w.nodes[1].sent[before..]
        .iter()
        .filter(|(c, m)| *c == 2 && matches!(m, Outgoing::Changes(_)))
        .collect();
    assert!(
        news.is_empty(),
        "the tokyo proxy was told nothing: {news:?}"
    );
}

#[test]
fn a_dead_replicas_agents_that_do_not_come_back_are_gone_after_the_grace() {
    let mut w = World::new(2);
    w.register(0, 1, 0);
    w.register(1, 2, 2);
    w.pump();
    let paris = w.nodes[0].reg.id_of(1).unwrap();
    w.fake.expire(0);
    w.pump();
    let s = settings();
    w.now += s.dead_after + s.restart_grace;
    w.tick(1);
    assert_eq!(w.changes_to(1, 2).last(), Some(&Change::Down(paris)));
}

#[test]
fn a_new_lease_keeps_every_agent_where_it_is() {
    let mut w = World::new(2);
    w.register(0, 1, 0);
    w.register(1, 2, 2);
    w.pump();
    let paris = w.nodes[0].reg.id_of(1).unwrap();
    // Replica 0 takes a new lease while the old one still lives (its
    // keep-alives went unanswered for a TTL): it writes its agents' liveness
    // keys again, unchanged.
    w.nodes[0].rep.lease_renewed();
    let again: Vec<Action> = w.nodes[0]
        .reg
        .local_records()
        .into_iter()
        .map(|r| Action::Persist(Record::Agent(r)))
        .collect();
    assert!(!again.is_empty());
    w.execute(0, again);
    w.pump();
    assert!(w.nodes[0].closed.is_empty(), "an agent was dropped");
    assert_eq!(w.nodes[0].reg.id_of(1), Some(paris));
    // The key was written again (in the real store: onto the new lease).
    let puts = w
        .fake
        .log
        .iter()
        .filter(|l| matches!(l, Watched::Put { key, .. } if *key == format!("/pon/online/{paris}")))
        .count();
    assert_eq!(puts, 2);
    w.assert_converged();
}

#[test]
fn a_goodbye_on_one_replica_is_announced_at_once_on_the_others() {
    let mut w = World::new(2);
    w.register(0, 1, 0);
    w.register(1, 2, 2);
    w.pump();
    let paris = w.nodes[0].reg.id_of(1).unwrap();
    let (a, _) = w.nodes[0].reg.disconnected(1, true, 5_000);
    w.execute(0, a);
    w.pump();
    assert_eq!(w.changes_to(1, 2).last(), Some(&Change::Down(paris)));
    w.assert_converged();
}

#[test]
fn hostile_keys_and_values_are_refused_by_reason() {
    let mut r = Replica::new("cu1", "/pon");
    let put = |key: &str, value: &[u8]| Watched::Put {
        key: key.into(),
        value: value.to_vec(),
    };
    assert_eq!(r.watched(&put("/other/agents/1", b"")), Err(Bad::Key));
    assert_eq!(r.watched(&put("/pon/agents/0", b"")), Err(Bad::Key));
    assert_eq!(r.watched(&put("/pon/agents/x", b"")), Err(Bad::Key));
    assert_eq!(r.watched(&put("/pon/what/1", b"")), Err(Bad::Key));
    assert_eq!(
        r.watched(&put("/pon/agents/1", &[0xff; 9])),
        Err(Bad::Value)
    );
    // A record filed under another id.
    let mut other = Replica::new("cu2", "/pon");
    let rec = crate::store::tests::rec(7);
    let w = other.write_for(&Record::Agent(rec), Some(1)).unwrap();
    let Op::Put { value, .. } = &w.txn.then[0] else {
        panic!("a put")
    };
    assert_eq!(r.watched(&put("/pon/agents/8", value)), Err(Bad::Value));
    assert!(matches!(
        r.watched(&put("/pon/agents/7", value)),
        Ok(Some(Remote::Record { .. }))
    ));
}

mod props {
    use super::*;
    use proptest::prelude::*;

    #[derive(Debug, Clone)]
    enum Step {
        Register {
            replica: usize,
            agent: u8,
        },
        Goodbye {
            agent: u8,
        },
        /// The store takes one of this replica's writes in flight.
        Land {
            replica: usize,
            pick: usize,
        },
        Pump,
    }

    fn step() -> impl Strategy<Value = Step> {
        prop_oneof![
            (0..3usize, 0..AGENTS).prop_map(|(replica, agent)| Step::Register { replica, agent }),
            (0..AGENTS).prop_map(|agent| Step::Goodbye { agent }),
            (0..3usize, any::<usize>()).prop_map(|(replica, pick)| Step::Land { replica, pick }),
            Just(Step::Pump),
        ]
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(200))]

        /// Whatever the interleaving of joins (also of one agent on two
        /// replicas at once), moves and goodbyes, and whatever order the
        /// store takes each replica's writes in flight in (one agent's in
        /// turn), once the watches are delivered every replica has the same
        /// agents, ids and views.
        #[test]
        fn replicas_converge_whatever_the_interleaving(steps in prop::collection::vec(step(), 1..40)) {
            let mut w = World::new(3);
            let mut conn = 0u64;
            // Where each agent is connected now: (replica, conn).
            let mut at: BTreeMap<u8, (usize, ConnId)> = BTreeMap::new();
            let mut ids: BTreeMap<(String, String), u32> = BTreeMap::new();
            for s in steps {
                match s {
                    Step::Register { replica, agent } => {
                        conn += 1;
                        w.register(replica, conn, agent);
                        at.insert(agent, (replica, conn));
                    }
                    Step::Goodbye { agent } => {
                        if let Some((i, c)) = at.remove(&agent) {
                            let (a, _) = w.nodes[i].reg.disconnected(c, true, w.wall);
                            w.execute(i, a);
                        }
                    }
                    Step::Land { replica, pick } => {
                        w.land(replica, pick);
                    }
                    Step::Pump => {
                        w.pump();
                        // Once the store settled a name's id, it never changes.
                        for (id, cloud, name, _) in w.picture(0) {
                            prop_assert_eq!(*ids.entry((cloud, name)).or_insert(id), id);
                        }
                    }
                }
            }
            w.pump();
            // Agents whose connection a replica closed (a lost claim, a move)
            // come back where they were, as their backoff would.
            for (&agent, &(i, c)) in &at {
                if w.nodes[i].closed.contains(&c) {
                    conn += 1;
                    w.register(i, conn, agent);
                }
            }
            w.pump();
            w.assert_converged();
            for (id, cloud, name, _) in w.picture(0) {
                prop_assert_eq!(*ids.entry((cloud, name)).or_insert(id), id);
            }
        }

        /// Any key and value from the store: a verdict, never a panic.
        #[test]
        fn any_watched_change_is_handled(kind in "[a-z]{0,12}", arg in "[0-9a-z/]{0,12}", value in prop::collection::vec(any::<u8>(), 0..64), delete in any::<bool>()) {
            let mut r = Replica::new("cu1", "/pon");
            let key = format!("/pon/{kind}/{arg}");
            let w = if delete {
                Watched::Delete { key, prev: Some(value) }
            } else {
                Watched::Put { key, value }
            };
            let _ = r.watched(&w);
        }
    }
}
