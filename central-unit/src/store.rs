//! The registry on disk, in redb: agent records keyed by id, join tokens
//! keyed by their hash, enrolments keyed by their key's id. Every write is a
//! redb transaction committed with immediate durability, so a CU killed at
//! any point restarts with the last committed registry.

use crate::registry::Record;
use crate::trust::{Enrolment, TokenRecord};
use pon_proto::control::AgentRecord;
use redb::{Database, ReadableTable, TableDefinition};
use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

const AGENTS: TableDefinition<u32, &[u8]> = TableDefinition::new("agents");
const TOKENS: TableDefinition<&[u8; 32], &[u8]> = TableDefinition::new("tokens");
const ENROLMENTS: TableDefinition<&[u8; 32], &[u8]> = TableDefinition::new("enrolments");

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("store {path}: {detail}")]
    Open { path: String, detail: String },
    #[error("store: {0}")]
    Db(String),
}

fn db<E: std::fmt::Display>(e: E) -> StoreError {
    StoreError::Db(e.to_string())
}

pub struct Store {
    db: Database,
}

/// Where the CU's store thread commits records: the redb `Store`, or in
/// tests anything whose writes can be made to fail.
pub trait Backend {
    fn write(&mut self, records: &[Record]) -> Result<(), StoreError>;
}

impl Backend for Store {
    fn write(&mut self, records: &[Record]) -> Result<(), StoreError> {
        Store::write(self, records)
    }
}

impl<F: FnMut(&[Record]) -> Result<(), StoreError>> Backend for F {
    fn write(&mut self, records: &[Record]) -> Result<(), StoreError> {
        self(records)
    }
}

impl Store {
    pub fn open(path: &Path) -> Result<Self, StoreError> {
        let db = Database::create(path).map_err(|e| StoreError::Open {
            path: path.display().to_string(),
            detail: e.to_string(),
        })?;
        let tx = db.begin_write().map_err(db_err)?;
        tx.open_table(AGENTS).map_err(db_err)?;
        tx.open_table(TOKENS).map_err(db_err)?;
        tx.open_table(ENROLMENTS).map_err(db_err)?;
        tx.commit().map_err(db_err)?;
        Ok(Store { db })
    }

    /// Every good record. A bad one (unreadable, not decoding because an
    /// incompatible version wrote it, or filed under another agent's key) is
    /// skipped, counted and logged with its key: one bad record must not
    /// keep the CU from starting with all the others.
    pub fn load(&self) -> Result<Loaded, StoreError> {
        let tx = self.db.begin_read().map_err(db_err)?;
        let table = tx.open_table(AGENTS).map_err(db_err)?;
        let mut out = Loaded::default();
        for row in table.iter().map_err(db_err)? {
            let (k, v) = match row {
                Ok(row) => row,
                Err(e) => {
                    out.skipped += 1;
                    tracing::warn!(error = %e, "skipping unreadable store row");
                    continue;
                }
            };
            let key = k.value();
            match pon_proto::codec::decode::<AgentRecord>(v.value(), usize::MAX) {
                Ok(r) if r.info.id == key => out.records.push(r),
                Ok(r) => {
                    out.skipped += 1;
                    tracing::warn!(
                        key,
                        id = r.info.id,
                        "skipping record filed under another id"
                    );
                }
                Err(e) => {
                    out.skipped += 1;
                    tracing::warn!(key, error = %e, "skipping undecodable record");
                }
            }
        }
        out.tokens = load_keyed(
            &tx,
            TOKENS,
            "token",
            |t: &TokenRecord| t.hash,
            &mut out.skipped,
        )?;
        out.enrolments = load_keyed(
            &tx,
            ENROLMENTS,
            "enrolment",
            |e: &Enrolment| e.key.0,
            &mut out.skipped,
        )?;
        Ok(out)
    }

    /// Writes records in one transaction (group commit).
    pub fn write(&self, records: &[Record]) -> Result<(), StoreError> {
        let tx = self.db.begin_write().map_err(db_err)?;
        {
            let mut agents = tx.open_table(AGENTS).map_err(db_err)?;
            let mut tokens = tx.open_table(TOKENS).map_err(db_err)?;
            let mut enrolments = tx.open_table(ENROLMENTS).map_err(db_err)?;
            for r in records {
                match r {
                    Record::Agent(a) => agents.insert(a.info.id, enc(a)?.as_slice()).map(drop),
                    Record::Forgotten(id) => agents.remove(id).map(drop),
                    Record::Token(t) => tokens.insert(&t.hash, enc(t)?.as_slice()).map(drop),
                    Record::Enrolment(e) => {
                        enrolments.insert(&e.key.0, enc(e)?.as_slice()).map(drop)
                    }
                }
                .map_err(db_err)?;
            }
        }
        tx.commit().map_err(db_err)
    }
}

fn enc<T: serde::Serialize>(v: &T) -> Result<Vec<u8>, StoreError> {
    pon_proto::codec::encode(v, usize::MAX).map_err(db)
}

/// Every good record of a table keyed by 32 bytes; bad ones are skipped
/// and counted, as agent records are.
fn load_keyed<T: serde::de::DeserializeOwned>(
    tx: &redb::ReadTransaction,
    def: TableDefinition<&[u8; 32], &[u8]>,
    what: &str,
    key_of: impl Fn(&T) -> [u8; 32],
    skipped: &mut u64,
) -> Result<Vec<T>, StoreError> {
    let table = tx.open_table(def).map_err(db_err)?;
    let mut out = Vec::new();
    for row in table.iter().map_err(db_err)? {
        let Ok((k, v)) = row else {
            *skipped += 1;
            tracing::warn!("skipping unreadable {what} row");
            continue;
        };
        match pon_proto::codec::decode::<T>(v.value(), usize::MAX) {
            Ok(r) if key_of(&r) == *k.value() => out.push(r),
            _ => {
                *skipped += 1;
                tracing::warn!("skipping bad {what} record");
            }
        }
    }
    Ok(out)
}

/// What `Store::load` found.
#[derive(Debug, Default, PartialEq)]
pub struct Loaded {
    pub records: Vec<AgentRecord>,
    pub tokens: Vec<TokenRecord>,
    pub enrolments: Vec<Enrolment>,
    /// Bad records left out.
    pub skipped: u64,
}

/// First wait after a failed write; it doubles per failure up to `RETRY_MAX`.
pub const RETRY_MIN: Duration = Duration::from_millis(100);
pub const RETRY_MAX: Duration = Duration::from_secs(5);

/// Records waiting to be written, without I/O: the store thread feeds it
/// records and an explicit `now` (time since the CU started). Only the
/// latest record per agent is kept, so a retry never writes a value older
/// than one already queued, and what waits is bounded by the number of
/// agents however long the store fails. A failed write is retried after a
/// backoff that doubles up to `RETRY_MAX`, never given up.
#[derive(Debug, Default)]
pub struct PendingWrites {
    pending: BTreeMap<RecordKey, Record>,
    failures: u32,
    retry_at: Duration,
}

/// What a record is filed under: a newer record with the same key
/// replaces a pending one.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum RecordKey {
    Agent(u32),
    Token([u8; 32]),
    Enrolment([u8; 32]),
}

fn key_of(r: &Record) -> RecordKey {
    match r {
        Record::Agent(a) => RecordKey::Agent(a.info.id),
        Record::Forgotten(id) => RecordKey::Agent(*id),
        Record::Token(t) => RecordKey::Token(t.hash),
        Record::Enrolment(e) => RecordKey::Enrolment(e.key.0),
    }
}

impl PendingWrites {
    pub fn push(&mut self, r: Record) {
        self.pending.insert(key_of(&r), r);
    }

    pub fn is_empty(&self) -> bool {
        self.pending.is_empty()
    }

    /// When to call `write_due` next; `None` while nothing is pending.
    pub fn poll_timeout(&self) -> Option<Duration> {
        (!self.is_empty()).then_some(self.retry_at)
    }

    /// Writes everything pending in one transaction if it is due at `now`;
    /// returns how many records landed (0 when nothing was due). On failure
    /// the records stay pending and the next try is pushed back.
    pub fn write_due(
        &mut self,
        now: Duration,
        backend: &mut impl Backend,
    ) -> Result<usize, StoreError> {
        if self.is_empty() || now < self.retry_at {
            return Ok(0);
        }
        let records: Vec<Record> = self.pending.values().cloned().collect();
        match backend.write(&records) {
            Ok(()) => {
                self.pending.clear();
                self.failures = 0;
                self.retry_at = Duration::ZERO;
                Ok(records.len())
            }
            Err(e) => {
                self.failures = self.failures.saturating_add(1);
                self.retry_at = now.saturating_add(self.backoff());
                Err(e)
            }
        }
    }

    /// The wait after the latest failure.
    pub fn backoff(&self) -> Duration {
        let doublings = self.failures.saturating_sub(1).min(16);
        (RETRY_MIN * (1 << doublings)).min(RETRY_MAX)
    }
}

fn db_err<E: Into<redb::Error>>(e: E) -> StoreError {
    StoreError::Db(e.into().to_string())
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::trust::KeyId;
    use pon_proto::control::{AgentInfo, Endpoints, PublicKey, TokenInfo};

    pub(crate) fn rec(id: u32) -> AgentRecord {
        AgentRecord {
            info: AgentInfo {
                id,
                cloud: "paris".into(),
                role: "PROXY".into(),
                name: format!("p{id}"),
                endpoints: Endpoints::Other { addrs: vec![] },
                noise_key: PublicKey([id as u8; 32]),
                allowed: vec![],
            },
            online: true,
            last_seen_ms: 42,
        }
    }

    fn agents(v: &[AgentRecord]) -> Vec<Record> {
        v.iter().cloned().map(Record::Agent).collect()
    }

    #[test]
    fn tokens_and_enrolments_survive_reopening() {
        let dir = std::env::temp_dir().join(format!("pon-cu-store-trust-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("r.redb");
        let token = TokenRecord {
            hash: [3; 32],
            info: TokenInfo {
                id: "03030303".into(),
                cloud: "paris".into(),
                role: "APP".into(),
                uses_left: Some(2),
                expires_ms: 9,
                created_ms: 1,
            },
        };
        let enrolment = Enrolment {
            key: KeyId([4; 32]),
            cloud: "paris".into(),
            name: "p".into(),
            role: "PROXY".into(),
            noise_key: PublicKey([5; 32]),
            enrolled_ms: 3,
            revoked: false,
        };
        {
            let s = Store::open(&path).unwrap();
            s.write(&[
                Record::Token(token.clone()),
                Record::Enrolment(enrolment.clone()),
            ])
            .unwrap();
            let revoked = Enrolment {
                revoked: true,
                ..enrolment.clone()
            };
            s.write(&[Record::Enrolment(revoked)]).unwrap();
        }
        let loaded = Store::open(&path).unwrap().load().unwrap();
        assert_eq!(loaded.tokens, vec![token]);
        assert_eq!(loaded.enrolments.len(), 1);
        assert!(loaded.enrolments[0].revoked, "the latest write wins");
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn records_survive_reopening() {
        let dir = std::env::temp_dir().join(format!("pon-cu-store-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("r.redb");
        let rec = |id: u32, online| AgentRecord { online, ..rec(id) };
        {
            let s = Store::open(&path).unwrap();
            s.write(&agents(&[rec(1, true), rec(2, true)])).unwrap();
            s.write(&agents(&[rec(2, false)])).unwrap();
        }
        let s = Store::open(&path).unwrap();
        assert_eq!(s.load().unwrap().records, vec![rec(1, true), rec(2, false)]);
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn corrupt_records_are_skipped_and_the_rest_loads() {
        let dir = std::env::temp_dir().join(format!("pon-cu-store-bad-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("r.redb");
        let s = Store::open(&path).unwrap();
        s.write(&agents(&[rec(1), rec(2), rec(3)])).unwrap();
        {
            // Corrupt two rows behind the store's back: bytes that do not
            // decode, and a record filed under another agent's key.
            let tx = s.db.begin_write().unwrap();
            {
                let mut t = tx.open_table(AGENTS).unwrap();
                t.insert(2, &[0xff, 0xff, 0xff][..]).unwrap();
                let misfiled = pon_proto::codec::encode(&rec(1), usize::MAX).unwrap();
                t.insert(9, misfiled.as_slice()).unwrap();
            }
            tx.commit().unwrap();
        }
        let loaded = s.load().unwrap();
        assert_eq!(loaded.records, vec![rec(1), rec(3)]);
        assert_eq!(loaded.skipped, 2);
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn failed_writes_back_off_and_the_latest_value_lands() {
        let mut written: Vec<Vec<Record>> = Vec::new();
        let mut fails = 3;
        let mut backend = |records: &[Record]| {
            if fails > 0 {
                fails -= 1;
                return Err(StoreError::Db("disk full".into()));
            }
            written.push(records.to_vec());
            Ok(())
        };
        let ms = Duration::from_millis;
        let mut p = PendingWrites::default();
        let stale = AgentRecord {
            last_seen_ms: 1,
            ..rec(1)
        };
        p.push(Record::Agent(stale));
        assert!(p.write_due(ms(0), &mut backend).is_err());
        assert_eq!(p.poll_timeout(), Some(ms(100)));
        // A newer value for the same agent replaces the one waiting.
        p.push(Record::Agent(rec(1)));
        p.push(Record::Agent(rec(2)));
        assert_eq!(p.write_due(ms(99), &mut backend).unwrap(), 0, "not due yet");
        assert!(p.write_due(ms(100), &mut backend).is_err());
        assert_eq!(p.poll_timeout(), Some(ms(300)), "backoff doubles");
        assert!(p.write_due(ms(300), &mut backend).is_err());
        assert_eq!(p.poll_timeout(), Some(ms(700)));
        assert_eq!(p.write_due(ms(700), &mut backend).unwrap(), 2);
        assert_eq!(p.poll_timeout(), None);
        assert_eq!(written, vec![agents(&[rec(1), rec(2)])]);
    }

    #[test]
    fn backoff_is_bounded() {
        let mut p = PendingWrites::default();
        let mut failing = |_: &[Record]| Err(StoreError::Db("gone".into()));
        p.push(Record::Agent(rec(1)));
        let mut now = Duration::ZERO;
        for _ in 0..100 {
            assert!(p.write_due(now, &mut failing).is_err());
            now = p.poll_timeout().unwrap();
        }
        assert_eq!(p.backoff(), RETRY_MAX);
    }
}
