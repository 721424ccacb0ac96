//! The registry on disk, in redb: one table of agent records keyed by id.
//! Every write is a redb transaction committed with immediate durability, so
//! a CU killed at any point restarts with the last committed registry.

use pon_proto::control::AgentRecord;
use redb::{Database, ReadableTable, TableDefinition};
use std::path::Path;

const AGENTS: TableDefinition<u32, &[u8]> = TableDefinition::new("agents");

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

impl Store {
    pub fn open(path: &Path) -> Result<Self, StoreError> {
        let db = Database::create(path).map_err(|e| StoreError::Open {
            path: path.display().to_string(),
            detail: e.to_string(),
        })?;
        let tx = db.begin_write().map_err(db_err)?;
        tx.open_table(AGENTS).map_err(db_err)?;
        tx.commit().map_err(db_err)?;
        Ok(Store { db })
    }

    /// Every record. A record that no longer decodes (written by an
    /// incompatible version) is skipped with a warning, not fatal.
    pub fn load(&self) -> Result<Vec<AgentRecord>, StoreError> {
        let tx = self.db.begin_read().map_err(db_err)?;
        let table = tx.open_table(AGENTS).map_err(db_err)?;
        let mut out = Vec::new();
        for row in table.iter().map_err(db_err)? {
            let (k, v) = row.map_err(db_err)?;
            match pon_proto::codec::decode::<AgentRecord>(v.value(), usize::MAX) {
                Ok(r) => out.push(r),
                Err(e) => tracing::warn!(id = k.value(), error = %e, "skipping unreadable record"),
            }
        }
        Ok(out)
    }

    /// Writes records in one transaction (group commit).
    pub fn write(&self, records: &[AgentRecord]) -> Result<(), StoreError> {
        let tx = self.db.begin_write().map_err(db_err)?;
        {
            let mut table = tx.open_table(AGENTS).map_err(db_err)?;
            for r in records {
                let bytes = pon_proto::codec::encode(r, usize::MAX).map_err(db)?;
                table.insert(r.info.id, bytes.as_slice()).map_err(db_err)?;
            }
        }
        tx.commit().map_err(db_err)
    }
}

fn db_err<E: Into<redb::Error>>(e: E) -> StoreError {
    StoreError::Db(e.into().to_string())
}

#[cfg(test)]
mod tests {
    use super::*;
    use pon_proto::control::{AgentInfo, Endpoints};

    #[test]
    fn records_survive_reopening() {
        let dir = std::env::temp_dir().join(format!("pon-cu-store-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("r.redb");
        let rec = |id: u32, online| AgentRecord {
            info: AgentInfo {
                id,
                cloud: "paris".into(),
                role: "PROXY".into(),
                name: format!("p{id}"),
                endpoints: Endpoints::Other { addrs: vec![] },
            },
            online,
            last_seen_ms: 42,
        };
        {
            let s = Store::open(&path).unwrap();
            s.write(&[rec(1, true), rec(2, true)]).unwrap();
            s.write(&[rec(2, false)]).unwrap();
        }
        let s = Store::open(&path).unwrap();
        assert_eq!(s.load().unwrap(), vec![rec(1, true), rec(2, false)]);
        let _ = std::fs::remove_dir_all(&dir);
    }
}
