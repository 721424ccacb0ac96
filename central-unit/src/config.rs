//! The CU's TOML configuration.

use crate::policy::Policy;
use crate::registry::Settings;
use crate::trust::{Grant, Grants};
use anyhow::Context;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

#[derive(Debug, Clone, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct CuConfig {
    /// QUIC address agents connect to.
    #[schemars(extend("format" = "address:port"))]
    pub listen: SocketAddr,
    /// The CU's certificate (PEM), as made by `pon-cu init`. This and the
    /// other files are relative to this file's directory.
    #[serde(default = "default_cert")]
    #[schemars(extend("format" = "path"))]
    pub cert: PathBuf,
    /// The CU's private key (PEM), as made by `pon-cu init`.
    #[serde(default = "default_key")]
    #[schemars(extend("format" = "path"))]
    pub key: PathBuf,
    /// The CA certificate that signs agents' certificates; agents and the
    /// admin present certificates it signed.
    #[serde(default = "default_ca")]
    #[schemars(extend("format" = "path"))]
    pub ca: PathBuf,
    /// The CA's private key.
    #[serde(default = "default_ca_key")]
    #[schemars(extend("format" = "path"))]
    pub ca_key: PathBuf,
    /// The admin credential's certificate: `ponctl` presenting it (with its
    /// key) may list the registry, make tokens and revoke agents.
    #[serde(default = "default_admin_cert")]
    #[schemars(extend("format" = "path"))]
    pub admin_cert: PathBuf,
    /// The registry store (redb).
    #[serde(default = "default_store")]
    #[schemars(extend("format" = "path"))]
    pub store: PathBuf,
    /// Prometheus endpoint (default 127.0.0.1:9200, loopback only).
    #[serde(default)]
    #[schemars(extend("format" = "address:port"))]
    pub metrics: Option<SocketAddr>,
    /// How often agents send a heartbeat (told to them at registration;
    /// at least 50).
    #[serde(default = "default_heartbeat_ms")]
    pub heartbeat_ms: u64,
    /// An agent silent this long is declared gone and its peers told (at
    /// least twice `heartbeat_ms`).
    #[serde(default = "default_dead_after_ms")]
    pub dead_after_ms: u64,
    /// After the CU restarts, agents known from its store stay in everyone's
    /// view for `dead_after_ms` plus this long while they reconnect.
    #[serde(default = "default_restart_grace_ms")]
    pub restart_grace_ms: u64,
    /// Role policy: role pattern -> role patterns it optimises towards.
    /// Replaces the built-in PANACEA policy when given.
    #[serde(default)]
    pub policy: Option<BTreeMap<String, Vec<String>>>,
    /// Address grants: the prefixes each cloud may use. A cloud without
    /// one cannot register agents. Re-read on SIGHUP.
    #[serde(default)]
    pub clouds: BTreeMap<String, Grant>,
    /// Monitoring as a service: the thresholds of the matrix's events.
    #[serde(default)]
    pub pmon: crate::pmon::PmonSettings,
    /// Run as one of several replicas sharing the registry in etcd
    /// (`store` is then unused). Absent: one CU with its redb store.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub etcd: Option<crate::etcd::EtcdSettings>,
    /// What one client or one cloud may take of the CU, and how long an
    /// offline agent is remembered.
    #[serde(default)]
    pub limits: Limits,
}

/// `[limits]`: hygiene against clients that would take more than their
/// share (per-cloud quotas are `[clouds.NAME] max_agents`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields, default)]
pub struct Limits {
    /// Connections one source address may hold at once; beyond, new ones
    /// are refused before their handshake. Agents behind one NAT share an
    /// address, so this is generous; it stops one host from exhausting
    /// the CU's connections.
    pub connections_per_address: u32,
    /// Handshakes in progress above which a new connection must first
    /// prove its address with a QUIC Retry: a flood of (possibly spoofed)
    /// Initial packets then costs one stateless packet each instead of a
    /// TLS handshake. 0: always.
    pub retry_above_handshakes: u32,
    /// Handshakes the CU works on at once: beyond them (and those waiting
    /// for their agents' answer, which the CU counts from its rate and the
    /// agents' round trip), a new connection (its address proven) is
    /// refused at once, before any TLS work, and its client backs off. In
    /// a re-registration storm the CU then spends its CPU on handshakes
    /// that finish, not on thousands progressing together, each too slowly
    /// for its client; and agents far away are not held to a fixed number
    /// of handshakes per round trip.
    pub max_handshakes: u32,
    /// Sessions one registered proxy may relay at once for its site's app
    /// VMs (agents whose `[cu] relay` names it). A relayed session is a
    /// stream of the proxy's own connection with TLS end to end inside:
    /// it costs the CU about a third of an agent's own QUIC connection.
    /// 0: proxies relay nothing.
    pub relays_per_proxy: u32,
    /// Agents offline this long (seconds) are forgotten: record deleted,
    /// id and name free again (the name stays bound to its key). 0: never.
    /// A single CU only: replicas on etcd keep every record.
    #[schemars(extend("x-unit" = "s"))]
    pub forget_offline_after_s: u64,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            connections_per_address: 4096,
            retry_above_handshakes: 256,
            max_handshakes: 64,
            relays_per_proxy: 1024,
            forget_offline_after_s: 30 * 24 * 3600,
        }
    }
}

fn default_cert() -> PathBuf {
    "cu.pem".into()
}
fn default_key() -> PathBuf {
    "cu.key".into()
}
fn default_ca() -> PathBuf {
    "ca.pem".into()
}
fn default_ca_key() -> PathBuf {
    "ca.key".into()
}
fn default_admin_cert() -> PathBuf {
    "admin.pem".into()
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
            &mut cfg.ca,
            &mut cfg.ca_key,
            &mut cfg.admin_cert,
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
        if cfg.limits.max_handshakes == 0 {
            anyhow::bail!("[limits] max_handshakes = 0 would refuse every agent");
        }
        if cfg.limits.connections_per_address == 0 {
            anyhow::bail!("[limits] connections_per_address = 0 would refuse every agent");
        }
        cfg.policy().context("in [policy]")?;
        cfg.grants()?;
        if let Some(e) = &cfg.etcd {
            e.check()?;
        }
        Ok(cfg)
    }

    /// `[clouds]`, checked: valid cloud names, at least one prefix each, and
    /// no address in two clouds' prefixes (each inner source has one cloud).
    pub fn grants(&self) -> anyhow::Result<Grants> {
        let mut seen: Vec<(&str, ipnet::IpNet)> = Vec::new();
        for (cloud, g) in &self.clouds {
            if !pon_proto::control::valid_name(cloud) {
                anyhow::bail!("[clouds.{cloud}]: invalid cloud name");
            }
            if g.prefixes.is_empty() {
                anyhow::bail!(
                    "[clouds.{cloud}] prefixes: empty (leave the cloud out to grant it nothing)"
                );
            }
            for p in &g.prefixes {
                if let Some((other, q)) = seen
                    .iter()
                    .find(|(_, q)| q.contains(&p.network()) || p.contains(&q.network()))
                {
                    anyhow::bail!(
                        "[clouds.{cloud}] prefixes: {p} overlaps {q} of cloud {other}; a prefix belongs to one cloud"
                    );
                }
                seen.push((cloud, *p));
            }
        }
        Ok(Grants(self.clouds.clone()))
    }

    pub fn policy(&self) -> Result<Policy, crate::policy::PolicyError> {
        match &self.policy {
            Some(rules) => Policy::from_rules(rules.clone()),
            None => Ok(Policy::default()),
        }
    }

    pub fn settings(&self) -> anyhow::Result<Settings> {
        let admins = if self.admin_cert.exists() {
            crate::pki::keys_of_pem_file(&self.admin_cert).context("admin_cert")?
        } else {
            tracing::warn!(admin_cert = %self.admin_cert.display(), "no admin certificate: ponctl will be refused");
            Vec::new()
        };
        if self.clouds.is_empty() {
            tracing::warn!("no [clouds] address grants in the configuration: every registration will be refused");
        }
        Ok(Settings {
            heartbeat: Duration::from_millis(self.heartbeat_ms),
            dead_after: Duration::from_millis(self.dead_after_ms),
            restart_grace: Duration::from_millis(self.restart_grace_ms),
            grants: self.grants()?,
            admins,
            // Only a single CU forgets: replicas on etcd keep every record
            // (see `Replica::write_for`).
            forget_offline_after: (self.limits.forget_offline_after_s > 0 && self.etcd.is_none())
                .then(|| Duration::from_secs(self.limits.forget_offline_after_s)),
        })
    }
}

/// A duration as operators write one: `90s`, `30m`, `1h`, `7d` (or plain
/// seconds); in seconds.
pub fn parse_duration_s(s: &str) -> Result<u64, String> {
    let s = s.trim();
    let (num, unit) = s.split_at(s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len()));
    let n: u64 = num
        .parse()
        .map_err(|_| format!("{s:?}: expected e.g. 90s, 30m, 1h or 7d"))?;
    let mult = match unit {
        "" | "s" => 1,
        "m" => 60,
        "h" => 3600,
        "d" => 86400,
        _ => return Err(format!("{s:?}: unit must be s, m, h or d")),
    };
    n.checked_mul(mult)
        .ok_or_else(|| format!("{s:?}: too long"))
}

#[cfg(test)]
mod tests {
    #[test]
    fn durations() {
        assert_eq!(super::parse_duration_s("90"), Ok(90));
        assert_eq!(super::parse_duration_s("30m"), Ok(1800));
        assert_eq!(super::parse_duration_s("1h"), Ok(3600));
        assert_eq!(super::parse_duration_s("7d"), Ok(604800));
        for bad in ["", "h", "1w", "-1h", "1.5h", "99999999999999999999d"] {
            assert!(super::parse_duration_s(bad).is_err(), "{bad}");
        }
    }

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

    #[test]
    fn grants_are_read_and_checked() {
        let c = CuConfig::parse(
            "listen = \"127.0.0.1:7400\"\n[clouds.paris]\nprefixes = [\"198.18.1.0/24\"]\nendpoints = [\"203.0.113.7/32\"]\n[clouds.tokyo]\nprefixes = [\"198.18.2.0/24\", \"10.2.0.0/16\"]\n",
        )
        .unwrap();
        let g = c.grants().unwrap();
        assert_eq!(g.allowed("tokyo").len(), 2);
        assert_eq!(g.0["paris"].endpoints.len(), 1);
        for (bad, field) in [
            ("[clouds.paris]\nprefixes = [\"198.18.1.0/24\"]\n[clouds.tokyo]\nprefixes = [\"198.18.0.0/16\"]\n", "overlaps"),
            ("[clouds.paris]\nprefixes = []\n", "empty"),
            ("[clouds.paris]\nprefixes = [\"nope\"]\n", "prefixes"),
            ("[clouds.paris]\nprefix = [\"198.18.1.0/24\"]\n", "prefix"),
            ("[clouds.\"a b\"]\nprefixes = [\"198.18.1.0/24\"]\n", "invalid cloud name"),
        ] {
            let e = format!(
                "{:#}",
                CuConfig::parse(&format!("listen = \"127.0.0.1:7400\"\n{bad}")).unwrap_err()
            );
            assert!(e.contains(field), "{bad}: {e}");
        }
    }
}
