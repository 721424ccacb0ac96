//! The CU's TOML configuration.

use crate::policy::Policy;
use crate::registry::Settings;
use anyhow::Context;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CuConfig {
    /// QUIC address agents connect to.
    pub listen: SocketAddr,
    /// The CU's certificate and key (PEM), as made by `pon-cu init`.
    #[serde(default = "default_cert")]
    pub cert: PathBuf,
    #[serde(default = "default_key")]
    pub key: PathBuf,
    #[serde(default = "default_token_file")]
    pub token_file: PathBuf,
    /// The registry store (redb).
    #[serde(default = "default_store")]
    pub store: PathBuf,
    /// Prometheus endpoint (default 127.0.0.1:9200, loopback only).
    #[serde(default)]
    pub metrics: Option<SocketAddr>,
    #[serde(default = "default_heartbeat_ms")]
    pub heartbeat_ms: u64,
    #[serde(default = "default_dead_after_ms")]
    pub dead_after_ms: u64,
    #[serde(default = "default_restart_grace_ms")]
    pub restart_grace_ms: u64,
    /// Role policy: role pattern -> role patterns it optimises towards.
    /// Replaces the built-in PANACEA policy when given.
    #[serde(default)]
    pub policy: Option<BTreeMap<String, Vec<String>>>,
}

fn default_cert() -> PathBuf {
    "cu.pem".into()
}
fn default_key() -> PathBuf {
    "cu.key".into()
}
fn default_token_file() -> PathBuf {
    "token".into()
}
fn default_store() -> PathBuf {
    "registry.redb".into()
}
fn default_heartbeat_ms() -> u64 {
    500
}
fn default_dead_after_ms() -> u64 {
    2000
}
fn default_restart_grace_ms() -> u64 {
    10_000
}

impl CuConfig {
    pub fn load(path: &Path) -> anyhow::Result<Self> {
        let mut cfg = pon_telemetry::load_config(path, "CU", Self::parse)?;
        let base = path.parent().unwrap_or(Path::new("."));
        for p in [
            &mut cfg.cert,
            &mut cfg.key,
            &mut cfg.token_file,
            &mut cfg.store,
        ] {
            *p = base.join(&*p);
        }
        Ok(cfg)
    }

    pub fn parse(text: &str) -> anyhow::Result<Self> {
        let cfg: CuConfig = toml::from_str(text)?;
        if cfg.heartbeat_ms < 50 {
            anyhow::bail!("heartbeat_ms = {} is below 50", cfg.heartbeat_ms);
        }
        if cfg.dead_after_ms < 2 * cfg.heartbeat_ms {
            anyhow::bail!(
                "dead_after_ms = {} must be at least twice heartbeat_ms = {}",
                cfg.dead_after_ms,
                cfg.heartbeat_ms
            );
        }
        cfg.policy().context("in [policy]")?;
        Ok(cfg)
    }

    pub fn policy(&self) -> Result<Policy, crate::policy::PolicyError> {
        match &self.policy {
            Some(rules) => Policy::from_rules(rules.clone()),
            None => Ok(Policy::default()),
        }
    }

    pub fn settings(&self) -> anyhow::Result<Settings> {
        let token = std::fs::read_to_string(&self.token_file)
            .with_context(|| format!("token_file {}", self.token_file.display()))?
            .trim()
            .to_string();
        if token.len() < 16 {
            anyhow::bail!(
                "token_file {}: the token is shorter than 16 characters",
                self.token_file.display()
            );
        }
        Ok(Settings {
            token,
            heartbeat: Duration::from_millis(self.heartbeat_ms),
            dead_after: Duration::from_millis(self.dead_after_ms),
            restart_grace: Duration::from_millis(self.restart_grace_ms),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_names_bad_fields() {
        let c = CuConfig::parse(
            "listen = \"127.0.0.1:7400\"\n[policy]\n\"PROXY.EDGE\" = [\"PROXY.CORE\"]\n",
        )
        .unwrap();
        assert!(c.policy().unwrap().optimises("PROXY.EDGE", "PROXY.CORE"));
        assert_eq!(c.dead_after_ms, 2000);
        let e = format!(
            "{:#}",
            CuConfig::parse("listen = \"127.0.0.1:7400\"\nheartbeat = 3\n").unwrap_err()
        );
        assert!(e.contains("heartbeat"), "{e}");
        let e = format!(
            "{:#}",
            CuConfig::parse("listen = \"127.0.0.1:7400\"\n[policy]\n\"proxy\" = []\n").unwrap_err()
        );
        assert!(e.contains("[policy]") && e.contains("proxy"), "{e}");
        let e = format!(
            "{:#}",
            CuConfig::parse("listen = \"127.0.0.1:7400\"\ndead_after_ms = 600\n").unwrap_err()
        );
        assert!(e.contains("dead_after_ms"), "{e}");
    }
}
