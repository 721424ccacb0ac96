//! The registry as one replica of several sharing a store (etcd): ids come
//! from blocks this replica claimed, and what the other replicas wrote
//! arrives as events that change views exactly as local joins and leaves
//! do. Still without I/O: `replica` turns watch events into these calls
//! and actions into store transactions.
//!
//! Who holds an agent is told by its liveness key (`online/<id>`, on the
//! holding replica's lease), not by its record: a record says who the agent
//! is, a liveness key where it is connected now. A liveness key vanishing
//! (its replica died, or lost etcd) does not make the agent gone at once:
//! it stays in views for `dead_after + restart_grace`, time for it to
//! reconnect to another replica, whose liveness key cancels the grace.

use super::{Action, Entry, LeaveReason, Presence, Registry};
use crate::trust::{Enrolment, TokenRecord};
use pon_proto::control::AgentRecord;
use std::collections::VecDeque;
use std::ops::Range;
use std::time::Duration;

/// Ids in one block a replica claims.
pub const ID_BLOCK: u32 = 1000;

/// The id blocks this replica owns: new ids are taken from the front one.
/// Ids below `ID_BLOCK` are never in a block: they are left to the agents'
/// hints (a forwarder asks for its site's number).
#[derive(Debug, Default)]
pub struct IdBlocks {
    blocks: VecDeque<Range<u32>>,
    /// Asked for a block and not granted one yet.
    asked: bool,
}

impl IdBlocks {
    /// Block `n`'s ids.
    pub fn block(n: u32) -> Range<u32> {
        let start = ID_BLOCK.saturating_mul(n.saturating_add(1));
        start..start.saturating_add(ID_BLOCK)
    }

    /// The next id not `taken`, if any block has one left.
    pub(super) fn take(&mut self, taken: impl Fn(u32) -> bool) -> Option<u32> {
        while let Some(b) = self.blocks.front_mut() {
            for id in b.by_ref() {
                if !taken(id) {
                    return Some(id);
                }
            }
            self.blocks.pop_front();
        }
        None
    }

    /// Whether to ask for another block (once until one is granted): half
    /// a block left, so that a replica registering a few hundred agents a
    /// second has the next block before this one runs out.
    pub(super) fn running_low(&mut self) -> bool {
        let left: u32 = self.blocks.iter().map(|b| b.end - b.start).sum();
        if left < ID_BLOCK / 2 && !self.asked {
            self.asked = true;
            return true;
        }
        false
    }
}

impl Registry {
    /// Replicated mode: from now on new ids come only from blocks granted
    /// with `grant_ids`, and records of agents held elsewhere are not
    /// written by this replica.
    pub fn use_id_blocks(&mut self) {
        self.blocks.get_or_insert_with(IdBlocks::default);
    }

    /// A block of ids this replica claimed in the shared store.
    pub fn grant_ids(&mut self, ids: Range<u32>) {
        let b = self.blocks.get_or_insert_with(IdBlocks::default);
        b.asked = false;
        b.blocks.push_back(ids);
    }

    /// Ids left in this replica's blocks (not counting ids taken meanwhile).
    pub fn ids_left(&self) -> u32 {
        self.blocks
            .as_ref()
            .map_or(0, |b| b.blocks.iter().map(|r| r.end - r.start).sum())
    }

    fn grace_deadline(&self, now: Duration) -> Duration {
        now + self.settings.dead_after + self.settings.restart_grace
    }

    /// Drops `id` here because the shared store says otherwise (its name
    /// or id belongs to another agent there): its local connection is
    /// closed (the agent comes back and gets the store's id), its local
    /// peers are told it left.
    fn drop_local(&mut self, id: u32, reason: &str, out: &mut Vec<Action>) {
        let Some(e) = self.remove_entry(id) else {
            return;
        };
        let at = (e.info.cloud.clone(), e.info.name.clone());
        if self.by_key.get(&at) == Some(&id) {
            self.by_key.remove(&at);
        }
        if let Some(conn) = e.conn {
            self.by_conn.remove(&conn);
            out.push(Action::Close {
                conn,
                reason: reason.into(),
            });
        }
        if e.present() {
            self.announce(Some(&e.info), None, out);
        }
    }

    /// An agent record another replica wrote, stamped `stamp` (Unix ms).
    pub fn remote_record(&mut self, r: AgentRecord, stamp: u64, now: Duration) -> Vec<Action> {
        let mut out = Vec::new();
        let id = r.info.id;
        if id == 0 {
            return out;
        }
        if self
            .agents
            .get(&id)
            .is_some_and(|e| e.conn.is_some() || stamp < e.changed_ms)
        {
            // Connected here: this replica's own record is the truth (a
            // write from a replica it left, arriving late); or older than
            // what is known here.
            return out;
        }
        let at = (r.info.cloud.clone(), r.info.name.clone());
        // The store is the arbiter: a name held here under another id, or
        // this id held here by another name, lost a race to claim it.
        if let Some(&mine) = self.by_key.get(&at) {
            if mine != id {
                self.drop_local(
                    mine,
                    "this name has another id on another CU replica",
                    &mut out,
                );
            }
        }
        if let Some(e) = self.agents.get(&id) {
            if (e.info.cloud.as_str(), e.info.name.as_str()) != (at.0.as_str(), at.1.as_str()) {
                self.drop_local(
                    id,
                    "this id is another agent's on another CU replica",
                    &mut out,
                );
            }
        }
        self.by_key.insert(at, id);
        self.next_id = self.next_id.max(id.saturating_add(1));
        let mut info = r.info;
        info.allowed = self.allowed_for(&info.cloud, &info.endpoints);
        match self.agents.get_mut(&id) {
            Some(e) => {
                e.changed_ms = stamp;
                let before = e.present().then(|| e.info.clone());
                e.last_seen_ms = e.last_seen_ms.max(r.last_seen_ms);
                if !r.online {
                    // A leave its replica saw (goodbye, silence, revoke).
                    e.presence = Presence::Offline;
                    self.index.remove(&e.info);
                    self.index.add(&info);
                    e.info = info;
                    if let Some(b) = before {
                        self.announce(Some(&b), None, &mut out);
                    }
                    return out;
                }
                if e.presence == Presence::Offline {
                    e.presence = Presence::Pending {
                        deadline: now + self.settings.dead_after + self.settings.restart_grace,
                    };
                }
                self.index.remove(&e.info);
                self.index.add(&info);
                e.info = info.clone();
                self.announce(before.as_ref(), Some(&info), &mut out);
            }
            None => {
                let presence = if r.online {
                    // Present once its liveness key is seen; until then
                    // (or if it never comes) the grace of a restart.
                    Presence::Pending {
                        deadline: self.grace_deadline(now),
                    }
                } else {
                    Presence::Offline
                };
                if r.online {
                    self.announce(None, Some(&info), &mut out);
                }
                self.insert_entry(
                    id,
                    Entry {
                        info,
                        conn: None,
                        presence,
                        last_seen_ms: r.last_seen_ms,
                        changed_ms: stamp,
                    },
                );
            }
        }
        out
    }

    /// Agent `id`'s liveness key now names another replica, where it
    /// registered at `since_ms`. An agent also connected here moved if that
    /// registration is newer than the one here (its old connection is
    /// closed, quietly: nothing changed for its peers). News older than
    /// what is known here is stale (the store has, or will have, newer).
    pub fn remote_online(&mut self, id: u32, since_ms: u64) -> Vec<Action> {
        let mut out = Vec::new();
        let Some(e) = self.agents.get_mut(&id) else {
            return out;
        };
        // A tie (two replicas stamping in the same millisecond) counts
        // as newer, so both replicas close their connection and the agent
        // comes back once, with a fresh stamp.
        if since_ms < e.changed_ms {
            return out;
        }
        e.changed_ms = since_ms;
        if let Some(conn) = e.conn {
            e.conn = None;
            self.by_conn.remove(&conn);
            out.push(Action::Close {
                conn,
                reason: "the agent registered with another CU replica".into(),
            });
        }
        let was_present = e.present();
        e.presence = Presence::Remote;
        if !was_present {
            let info = e.info.clone();
            self.announce(None, Some(&info), &mut out);
        }
        out
    }

    /// Agent `id`'s liveness key on another replica vanished: that replica
    /// died or lost the store, or the agent left it. The agent stays in
    /// views for the grace, unless it is connected here or a record saying
    /// it left arrives.
    pub fn remote_offline(&mut self, id: u32, now: Duration) -> Vec<Action> {
        let deadline = self.grace_deadline(now);
        if let Some(e) = self.agents.get_mut(&id) {
            if e.presence == Presence::Remote {
                e.presence = Presence::Pending { deadline };
            }
        }
        Vec::new()
    }

    /// After a fresh read of the store (etcd compacted past this replica's
    /// watch, so deletes in between are lost): agents held elsewhere whose
    /// liveness key is no longer there are treated as if its delete had
    /// been seen (`remote_offline`). `online_elsewhere`: the agents whose
    /// liveness key names another replica now.
    pub fn remote_resync(
        &mut self,
        online_elsewhere: &std::collections::HashSet<u32>,
        now: Duration,
    ) -> Vec<Action> {
        let vanished: Vec<u32> = self
            .agents
            .iter()
            .filter(|(id, e)| e.presence == Presence::Remote && !online_elsewhere.contains(id))
            .map(|(id, _)| *id)
            .collect();
        let mut out = Vec::new();
        for id in vanished {
            out.extend(self.remote_offline(id, now));
        }
        out
    }

    /// Tokens and enrolments another replica wrote. A revocation made
    /// there closes the agent's connection here, if it has one.
    pub fn remote_trust(
        &mut self,
        tokens: Vec<TokenRecord>,
        enrolments: Vec<Enrolment>,
        wall_ms: u64,
    ) -> (Vec<Action>, Vec<(u32, LeaveReason)>) {
        let mut out = Vec::new();
        let mut left = Vec::new();
        let revoked: Vec<(String, String)> = enrolments
            .iter()
            .filter(|e| e.revoked)
            .map(|e| (e.cloud.clone(), e.name.clone()))
            .collect();
        self.trust.restore(tokens, enrolments);
        for at in revoked {
            let Some(&id) = self.by_key.get(&at) else {
                continue;
            };
            let Some(conn) = self.agents.get(&id).and_then(|e| e.conn) else {
                continue;
            };
            out.push(Action::Close {
                conn,
                reason: "revoked".into(),
            });
            self.leave(id, Some(wall_ms), &mut out);
            left.push((id, LeaveReason::Revoked));
        }
        (out, left)
    }

    /// The store refused this replica's claim of `cloud`/`name` as `id`
    /// (another replica claimed the name, or the id, first): the agent is
    /// dropped here and reconnects to get the winner's id.
    pub fn claim_lost(&mut self, id: u32, cloud: &str, name: &str) -> Vec<Action> {
        let mut out = Vec::new();
        let ours = self
            .agents
            .get(&id)
            .is_some_and(|e| e.info.cloud == cloud && e.info.name == name && e.conn.is_some());
        if ours {
            self.drop_local(
                id,
                "another CU replica claimed this name or id first",
                &mut out,
            );
        }
        out
    }

    /// The store holds a leave of `id` newer than its registration here
    /// (clocks tied or skewed): if still connected here, it is written
    /// again with a stamp past that one.
    pub fn restamp(&mut self, id: u32, wall_ms: u64) -> Vec<Action> {
        match self.agents.get_mut(&id) {
            Some(e) if e.conn.is_some() => {
                e.changed_ms = wall_ms.max(e.changed_ms.saturating_add(1));
                vec![Action::Persist(super::Record::Agent(e.record()))]
            }
            _ => vec![],
        }
    }

    /// Another replica holds `id` with a registration as new as the one
    /// here or newer: the connection here is stale (or tied) and is
    /// closed quietly; the agent stays present, held there.
    pub fn held_elsewhere(&mut self, id: u32) -> Vec<Action> {
        let mut out = Vec::new();
        if let Some(e) = self.agents.get_mut(&id) {
            if let Some(conn) = e.conn.take() {
                self.by_conn.remove(&conn);
                e.presence = Presence::Remote;
                out.push(Action::Close {
                    conn,
                    reason: "the agent registered with another CU replica".into(),
                });
            }
        }
        out
    }

    /// Agents connected here, with their records: what this replica must
    /// (re)write liveness keys for after taking a new lease.
    pub fn local_records(&self) -> Vec<AgentRecord> {
        self.agents
            .values()
            .filter(|e| e.conn.is_some())
            .map(Entry::record)
            .collect()
    }

    /// The stamp of agent `id`'s latest change (see `Entry::changed_ms`):
    /// what its record and liveness key are written with.
    pub fn stamp(&self, id: u32) -> Option<u64> {
        self.agents.get(&id).map(|e| e.changed_ms)
    }
}
