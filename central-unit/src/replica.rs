//! CU replicas sharing the registry in etcd, without I/O: what a replica
//! writes for each record the registry persists (as small typed
//! transactions that `etcd` runs and tests run on an in-memory store), and
//! what each watched key change means for the registry.
//!
//! Keys, under the configured prefix:
//!
//! | key | value | written |
//! |---|---|---|
//! | `agents/<id>` | the agent record, and which replica wrote it | by the replica holding the agent |
//! | `names/<cloud>/<name>` | the id, decimal | once, by the replica that claimed the name |
//! | `online/<id>` | holding replica and when the agent registered there | on that replica's lease |
//! | `tokens/<hash>`, `enrolments/<key>` | the record, and its writer | by the replica that changed it |
//! | `idblocks/<n>` | the replica owning ids `1000(n+1) .. 1000(n+2)` | once, by that replica |
//!
//! Ids: a replica hands out ids from its own blocks (so `register` stays
//! synchronous) or the agent's hint when free; the first write of a new
//! agent is a transaction that creates `names/…` and `agents/<id>` only if
//! both are absent, so two replicas racing for one name or one id cannot
//! both win. The loser drops its agent (`Registry::claim_lost`), which
//! reconnects and gets the winner's id from the watched registry.

use crate::registry::{Action, LeaveReason, Record, Registry};
use crate::trust::{hex, Enrolment, TokenRecord};
use pon_proto::control::AgentRecord;
use serde::{Deserialize, Serialize};
use std::collections::{HashMap, HashSet};
use std::time::Duration;

/// A condition of a transaction.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Cmp {
    /// The key holds exactly this value.
    Value(String, Vec<u8>),
    /// The key exists and its value is below this one, byte by byte
    /// (values start with their big-endian stamp: older).
    Older(String, Vec<u8>),
    /// The key does not exist.
    Absent(String),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Op {
    /// `leased`: attached to this replica's lease (gone when it dies).
    Put {
        key: String,
        value: Vec<u8>,
        leased: bool,
    },
    Delete(String),
}

/// `then` if every condition of `when` holds, else `otherwise` (a nested
/// transaction, evaluated in the same atomic step), else nothing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Txn {
    pub when: Vec<Cmp>,
    pub then: Vec<Op>,
    pub otherwise: Option<Box<Txn>>,
}

impl Txn {
    fn always(then: Vec<Op>) -> Txn {
        Txn {
            when: vec![],
            then,
            otherwise: None,
        }
    }
}

/// A transaction, and what its outcome means (`Replica::done`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Write {
    pub txn: Txn,
    /// What no branch applying means.
    pub lost: Option<Lost>,
    /// A liveness key this replica holds if one of the first `owns`
    /// branches applied (the others only tell it stale).
    owns: Option<(u32, Vec<u8>, usize)>,
}

/// What a write that did not land means for the registry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Lost {
    /// Another replica claimed this agent's name or id first.
    Claim {
        id: u32,
        cloud: String,
        name: String,
    },
    /// The store holds a leave stamped at or after this registration (a
    /// clock tie or skew between replicas): the agent, connected here, is
    /// written again with a newer stamp.
    Superseded { id: u32 },
    /// Another replica's liveness key for the agent is as new or newer:
    /// the agent is held there (this connection is a stale one).
    HeldElsewhere { id: u32 },
}

/// A record as stored: with the replica that wrote it, so each replica
/// can skip the echo of its own writes.
#[derive(Debug, Serialize, Deserialize)]
struct Stored<T> {
    by: String,
    item: T,
}

/// `stamp` (big endian, so values compare as their stamps do) then `rest`.
fn stamped(stamp: u64, rest: &[u8]) -> Vec<u8> {
    let mut v = stamp.to_be_bytes().to_vec();
    v.extend_from_slice(rest);
    v
}

fn unstamp(v: &[u8]) -> Result<(u64, &[u8]), Bad> {
    let (head, rest) = v.split_at_checked(8).ok_or(Bad::Value)?;
    let stamp = u64::from_be_bytes(head.try_into().map_err(|_| Bad::Value)?);
    Ok((stamp, rest))
}

/// A change made by another replica, for the registry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Remote {
    /// `stamp`: of the change it records (see `Registry::stamp`).
    Record {
        record: AgentRecord,
        stamp: u64,
    },
    Online {
        id: u32,
        since_ms: u64,
    },
    Offline(u32),
    Token(TokenRecord),
    Enrolment(Enrolment),
}

/// A watched change, as the store reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Watched {
    Put {
        key: String,
        value: Vec<u8>,
    },
    /// `prev`: the value before the delete, when the store gave it.
    Delete {
        key: String,
        prev: Option<Vec<u8>>,
    },
}

/// Why a watched or loaded key was ignored; a metrics label.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Bad {
    /// Not a key this layout has (outside the prefix, unknown kind, bad id).
    Key,
    /// A value that does not decode, or names another key than its own.
    Value,
}

impl Bad {
    pub const ALL: [Bad; 2] = [Bad::Key, Bad::Value];
    pub fn label(self) -> &'static str {
        match self {
            Bad::Key => "bad_key",
            Bad::Value => "bad_value",
        }
    }
}

/// Bound on a decoded value: a record is small; a huge one is hostile.
const MAX_VALUE: usize = 64 * 1024;

fn enc<T: Serialize>(v: &T) -> Vec<u8> {
    // Encoding records this process built cannot fail below `usize::MAX`.
    pon_proto::codec::encode(v, usize::MAX).unwrap_or_default()
}

fn dec<T: serde::de::DeserializeOwned>(v: &[u8]) -> Result<T, Bad> {
    pon_proto::codec::decode(v, MAX_VALUE).map_err(|_| Bad::Value)
}

/// One replica's side of the shared registry.
#[derive(Debug)]
pub struct Replica {
    name: String,
    prefix: String,
    /// The liveness keys this replica wrote, with their values: a leave
    /// deletes one only if it still holds that value (the agent has not
    /// moved to another replica since).
    owned: HashMap<u32, Vec<u8>>,
}

impl Replica {
    /// `prefix` like `/pon` (a trailing `/` is ignored).
    pub fn new(name: &str, prefix: &str) -> Replica {
        Replica {
            name: name.into(),
            prefix: prefix.trim_end_matches('/').into(),
            owned: HashMap::new(),
        }
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// The prefix every key of this registry starts with (ends in `/`).
    pub fn root(&self) -> String {
        format!("{}/", self.prefix)
    }

    fn key(&self, rest: &str) -> String {
        format!("{}/{rest}", self.prefix)
    }

    pub fn idblock_prefix(&self) -> String {
        self.key("idblocks/")
    }

    /// Claims id block `n` if nobody has.
    pub fn claim_block(&self, n: u32) -> Txn {
        let key = self.key(&format!("idblocks/{n}"));
        Txn {
            when: vec![Cmp::Absent(key.clone())],
            then: vec![Op::Put {
                key,
                value: self.name.as_bytes().to_vec(),
                leased: false,
            }],
            otherwise: None,
        }
    }

    /// An `idblocks/<n>` key and its owner, if the key is one.
    pub fn parse_idblock(&self, key: &str, value: &[u8]) -> Option<(u32, bool)> {
        let n = key.strip_prefix(&self.idblock_prefix())?.parse().ok()?;
        Some((n, value == self.name.as_bytes()))
    }

    /// What to write for a record the registry persists. `stamp`: the
    /// agent's (`Registry::stamp`). `None`: not this replica's to write (a
    /// leave of an agent held elsewhere).
    pub fn write_for(&mut self, r: &Record, stamp: Option<u64>) -> Option<Write> {
        let put = |key: String, value: Vec<u8>| Op::Put {
            key,
            value,
            leased: false,
        };
        match r {
            Record::Agent(a) => {
                let id = a.info.id;
                let agent_key = self.key(&format!("agents/{id}"));
                let name_key = self.key(&format!("names/{}/{}", a.info.cloud, a.info.name));
                let online_key = self.key(&format!("online/{id}"));
                let stamp = stamp.unwrap_or(a.last_seen_ms);
                let record = stamped(
                    stamp,
                    &enc(&Stored {
                        by: self.name.clone(),
                        item: a,
                    }),
                );
                let id_text = id.to_string().into_bytes();
                if !a.online {
                    // Only the replica whose liveness key is still there
                    // tells the others the agent left.
                    let mine = self.owned.remove(&id)?;
                    return Some(Write {
                        txn: Txn {
                            when: vec![
                                Cmp::Value(online_key.clone(), mine),
                                Cmp::Value(name_key, id_text),
                                Cmp::Older(agent_key.clone(), record.clone()),
                            ],
                            then: vec![put(agent_key, record), Op::Delete(online_key)],
                            otherwise: None,
                        },
                        lost: None,
                        owns: None,
                    });
                }
                let online = stamped(stamp, self.name.as_bytes());
                let online_op = Op::Put {
                    key: online_key.clone(),
                    value: online.clone(),
                    leased: true,
                };
                let both = vec![put(agent_key.clone(), record.clone()), online_op.clone()];
                let known = Cmp::Value(name_key.clone(), id_text.clone());
                let newer = Cmp::Older(agent_key.clone(), record.clone());
                // Newer than the record and liveness key held (or none
                // held); a new agent's first write claims name and id; an
                // older write than what is held is dropped (stale, not lost).
                // Stale: a newer leave (the store holds no liveness key), or
                // another replica holding the agent.
                let stale = Txn {
                    when: vec![known.clone(), Cmp::Absent(online_key.clone())],
                    then: vec![],
                    otherwise: Some(Box::new(Txn {
                        when: vec![known.clone()],
                        then: vec![],
                        otherwise: None,
                    })),
                };
                // The same liveness key as this replica wrote (written again
                // after a new lease): moved onto the new lease.
                let same = Txn {
                    when: vec![
                        known.clone(),
                        Cmp::Value(online_key.clone(), online.clone()),
                    ],
                    then: vec![online_op.clone()],
                    otherwise: Some(Box::new(stale)),
                };
                let claim = Txn {
                    when: vec![
                        Cmp::Absent(name_key.clone()),
                        Cmp::Absent(agent_key.clone()),
                    ],
                    then: vec![put(name_key, id_text), put(agent_key, record), online_op],
                    otherwise: Some(Box::new(same)),
                };
                let free = Txn {
                    when: vec![
                        known.clone(),
                        newer.clone(),
                        Cmp::Absent(online_key.clone()),
                    ],
                    then: both.clone(),
                    otherwise: Some(Box::new(claim)),
                };
                Some(Write {
                    txn: Txn {
                        when: vec![known, newer, Cmp::Older(online_key, online.clone())],
                        then: both,
                        otherwise: Some(Box::new(free)),
                    },
                    owns: Some((id, online, 4)),
                    lost: Some(Lost::Claim {
                        id,
                        cloud: a.info.cloud.clone(),
                        name: a.info.name.clone(),
                    }),
                })
            }
            Record::Token(t) => Some(Write {
                txn: Txn::always(vec![put(
                    self.key(&format!("tokens/{}", hex(&t.hash))),
                    enc(&Stored {
                        by: self.name.clone(),
                        item: t,
                    }),
                )]),
                lost: None,
                owns: None,
            }),
            // Replicas forget no one (`CuConfig::settings` turns
            // `forget_offline_after` off with `[etcd]`): removing a record
            // every replica holds needs its own watched delete.
            Record::Forgotten(_) => None,
            Record::Enrolment(e) => Some(Write {
                txn: Txn::always(vec![put(
                    self.key(&format!("enrolments/{}", hex(&e.key.0))),
                    enc(&Stored {
                        by: self.name.clone(),
                        item: e,
                    }),
                )]),
                lost: None,
                owns: None,
            }),
        }
    }

    /// A write's outcome: the branch that applied (0 for the first), or
    /// none. Returns the lost claim, if that is what it means.
    pub fn done(&mut self, w: &Write, branch: Option<usize>) -> Option<Lost> {
        if let Some((id, value, owns)) = &w.owns {
            match branch {
                Some(b) if b < *owns => {
                    self.owned.insert(*id, value.clone());
                }
                _ => {
                    self.owned.remove(id);
                }
            }
        }
        match (branch, &w.owns) {
            (None, _) => w.lost.clone(),
            (Some(b), Some((id, _, owns))) if b == *owns => Some(Lost::Superseded { id: *id }),
            (Some(b), Some((id, _, owns))) if b == owns + 1 => {
                Some(Lost::HeldElsewhere { id: *id })
            }
            (Some(_), _) => None,
        }
    }

    /// After a new lease: every liveness key is to be written again.
    pub fn lease_renewed(&mut self) {
        self.owned.clear();
    }

    /// After etcd compacted past the watch (the changes in between are
    /// gone): what a fresh read of every key under the prefix means here.
    /// Each key is news as a put would be (stamps keep what is known
    /// newer); the agents another replica holds now are returned, so that
    /// the registry can tell which liveness keys vanished unseen
    /// (`Registry::remote_resync`). Bad keys are returned by reason.
    pub fn resync<'a>(
        &mut self,
        kvs: impl IntoIterator<Item = (&'a str, &'a [u8])>,
    ) -> (Vec<Remote>, HashSet<u32>, Vec<Bad>) {
        let (mut news, mut online, mut bad) = (Vec::new(), HashSet::new(), Vec::new());
        for (key, value) in kvs {
            let w = Watched::Put {
                key: key.into(),
                value: value.into(),
            };
            match self.watched(&w) {
                Ok(Some(r)) => {
                    if let Remote::Online { id, .. } = r {
                        online.insert(id);
                    }
                    news.push(r);
                }
                Ok(None) => {}
                Err(b) => bad.push(b),
            }
        }
        (news, online, bad)
    }

    /// What a watched (or loaded) change means here: `None` for this
    /// replica's own writes and keys of no interest to the registry.
    pub fn watched(&mut self, w: &Watched) -> Result<Option<Remote>, Bad> {
        let key = match w {
            Watched::Put { key, .. } | Watched::Delete { key, .. } => key,
        };
        let rest = key
            .strip_prefix(&self.prefix)
            .and_then(|k| k.strip_prefix('/'))
            .ok_or(Bad::Key)?;
        let (kind, arg) = rest.split_once('/').ok_or(Bad::Key)?;
        let id = || -> Result<u32, Bad> {
            match arg.parse() {
                Ok(id) if id != 0 => Ok(id),
                _ => Err(Bad::Key),
            }
        };
        match (kind, w) {
            ("agents", Watched::Put { value, .. }) => {
                let id = id()?;
                let (stamp, rest) = unstamp(value)?;
                let s: Stored<AgentRecord> = dec(rest)?;
                if s.item.info.id != id {
                    return Err(Bad::Value);
                }
                Ok((s.by != self.name).then_some(Remote::Record {
                    record: s.item,
                    stamp,
                }))
            }
            ("online", Watched::Put { value, .. }) => {
                let id = id()?;
                let (since_ms, by) = unstamp(value)?;
                if by == self.name.as_bytes() {
                    return Ok(None);
                }
                // Another replica holds it now, unless this is an older
                // write arriving late (the store kept the newer, ours).
                if self
                    .owned
                    .get(&id)
                    .is_some_and(|mine| mine.as_slice() <= value.as_slice())
                {
                    self.owned.remove(&id);
                }
                Ok(Some(Remote::Online { id, since_ms }))
            }
            ("online", Watched::Delete { prev, .. }) => {
                let id = id()?;
                // This replica's own key (deleted by a leave here, or its
                // lease lost: `etcd` writes them all again) is no news.
                if prev.is_some() && prev.as_ref() == self.owned.get(&id) {
                    return Ok(None);
                }
                Ok(Some(Remote::Offline(id)))
            }
            ("tokens", Watched::Put { value, .. }) => {
                let s: Stored<TokenRecord> = dec(value)?;
                if hex(&s.item.hash) != arg {
                    return Err(Bad::Value);
                }
                Ok((s.by != self.name).then_some(Remote::Token(s.item)))
            }
            ("enrolments", Watched::Put { value, .. }) => {
                let s: Stored<Enrolment> = dec(value)?;
                if hex(&s.item.key.0) != arg {
                    return Err(Bad::Value);
                }
                Ok((s.by != self.name).then_some(Remote::Enrolment(s.item)))
            }
            ("agents" | "tokens" | "enrolments" | "names" | "idblocks", _) => Ok(None),
            _ => Err(Bad::Key),
        }
    }
}

/// Feeds a change from another replica to the registry; returns its
/// actions and the agents it announced as gone (for metrics).
pub fn apply(
    registry: &mut Registry,
    r: Remote,
    now: Duration,
    wall_ms: u64,
) -> (Vec<Action>, Vec<(u32, LeaveReason)>) {
    match r {
        Remote::Record { record, stamp } => (registry.remote_record(record, stamp, now), vec![]),
        Remote::Online { id, since_ms } => (registry.remote_online(id, since_ms), vec![]),
        Remote::Offline(id) => (registry.remote_offline(id, now), vec![]),
        Remote::Token(t) => registry.remote_trust(vec![t], vec![], wall_ms),
        Remote::Enrolment(e) => registry.remote_trust(vec![], vec![e], wall_ms),
    }
}

#[cfg(test)]
mod tests;
