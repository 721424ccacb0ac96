//! The emulator's configuration file and the link settings shared with the
//! control protocol (milliseconds, fractions and Mbit/s, as in topologies).

use crate::emulator::{LinkParams, SiteId};
use ipnet::Ipv4Net;
use serde::{Deserialize, Serialize};
use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::Duration;

/// Largest accepted delay or jitter: a minute is already no WAN.
pub const MAX_DELAY_MS: f64 = 60_000.0;
/// Largest accepted rate limit (Mbit/s).
pub const MAX_RATE_MBIT: f64 = 1_000_000.0;

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("{file}: cannot read: {source}")]
    Read {
        file: String,
        source: std::io::Error,
    },
    #[error("{file}: {source}")]
    Parse {
        file: String,
        source: toml::de::Error,
    },
    #[error("{file}: {field}: {msg}")]
    Invalid {
        file: String,
        field: String,
        msg: String,
    },
}

/// A setting out of range: names the field.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("{field}: {msg}")]
pub struct InvalidSetting {
    pub field: String,
    pub msg: String,
}

fn invalid(field: impl Into<String>, msg: impl Into<String>) -> InvalidSetting {
    InvalidSetting {
        field: field.into(),
        msg: msg.into(),
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// The TUN device the lab routes inter-site traffic into.
    #[serde(default = "default_tun_name")]
    pub tun_name: String,
    #[serde(default = "default_mtu")]
    pub mtu: u16,
    /// Unix socket for run-time changes (`lab impair`).
    pub control: Option<PathBuf>,
    /// Address of the Prometheus endpoint (default 127.0.0.1:9110,
    /// loopback only).
    pub metrics: Option<SocketAddr>,
    /// Bound on packets held over all links (memory: one buffer each).
    #[serde(default = "default_max_in_flight")]
    pub max_in_flight: usize,
    /// Run the data path as a SCHED_FIFO thread at this priority (1..=99),
    /// so packets leave on time on a busy machine (see `io::set_realtime`).
    pub realtime_priority: Option<u8>,
    /// Seed for loss and jitter (reproducible runs); random if absent.
    pub seed: Option<u64>,
    #[serde(default)]
    pub site: Vec<Site>,
    #[serde(default)]
    pub link: Vec<LinkConfig>,
}

fn default_tun_name() -> String {
    "wan0".into()
}
fn default_mtu() -> u16 {
    1500
}
fn default_max_in_flight() -> usize {
    32_768
}

/// A site: packets from/to `prefix` belong to it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Site {
    pub index: SiteId,
    pub name: String,
    pub prefix: Ipv4Net,
}

/// One direction of a link in the configuration file. (The settings are
/// spelled out rather than `#[serde(flatten)]`ed: serde cannot combine
/// flattening with rejecting unknown keys, and a misspelt key must fail.)
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LinkConfig {
    pub from: String,
    pub to: String,
    #[serde(default)]
    pub delay_ms: f64,
    #[serde(default)]
    pub jitter_ms: f64,
    #[serde(default)]
    pub loss: f64,
    #[serde(default)]
    pub rate_mbit: f64,
    #[serde(default)]
    pub down: bool,
}

impl LinkConfig {
    pub fn settings(&self) -> LinkSettings {
        LinkSettings {
            delay_ms: self.delay_ms,
            jitter_ms: self.jitter_ms,
            loss: self.loss,
            rate_mbit: self.rate_mbit,
            down: self.down,
        }
    }
}

/// Link settings in the units of topology files. Every field defaults to
/// "no effect".
#[derive(Debug, Clone, Copy, PartialEq, Default, Serialize, Deserialize)]
#[serde(default)]
pub struct LinkSettings {
    pub delay_ms: f64,
    pub jitter_ms: f64,
    pub loss: f64,
    pub rate_mbit: f64,
    pub down: bool,
}

fn check_range(field: &str, v: f64, max: f64) -> Result<(), InvalidSetting> {
    if !v.is_finite() || !(0.0..=max).contains(&v) {
        return Err(invalid(
            field,
            format!("must be a number in 0..={max}, got {v}"),
        ));
    }
    Ok(())
}

impl LinkSettings {
    pub fn validate(&self) -> Result<(), InvalidSetting> {
        check_range("delay_ms", self.delay_ms, MAX_DELAY_MS)?;
        check_range("jitter_ms", self.jitter_ms, MAX_DELAY_MS)?;
        check_range("loss", self.loss, 1.0)?;
        check_range("rate_mbit", self.rate_mbit, MAX_RATE_MBIT)?;
        Ok(())
    }

    /// Converts validated settings.
    pub fn params(&self) -> LinkParams {
        let ms = |v: f64| Duration::from_nanos((v * 1e6).round() as u64);
        LinkParams {
            delay: ms(self.delay_ms),
            jitter: ms(self.jitter_ms),
            loss: self.loss,
            rate_bps: (self.rate_mbit * 1e6).round() as u64,
            down: self.down,
        }
    }

    pub fn from_params(p: &LinkParams) -> Self {
        Self {
            delay_ms: p.delay.as_nanos() as f64 / 1e6,
            jitter_ms: p.jitter.as_nanos() as f64 / 1e6,
            loss: p.loss,
            rate_mbit: p.rate_bps as f64 / 1e6,
            down: p.down,
        }
    }
}

/// Sites by address prefix.
#[derive(Debug, Clone, Default)]
pub struct Sites {
    sites: Vec<Site>,
}

impl Sites {
    pub fn new(sites: Vec<Site>) -> Result<Self, InvalidSetting> {
        let mut s = Sites::default();
        s.merge(sites)?;
        Ok(s)
    }

    /// Adds sites, or updates those with a known index (sites added to a
    /// running lab). Indexes and names stay unique.
    pub fn merge(&mut self, sites: Vec<Site>) -> Result<(), InvalidSetting> {
        let mut next = self.sites.clone();
        for site in sites {
            if site.index == 0 {
                return Err(invalid("site.index", "must be in 1..=255"));
            }
            if site.name.is_empty() {
                return Err(invalid("site.name", "must not be empty"));
            }
            next.retain(|s| s.index != site.index);
            if next.iter().any(|s| s.name == site.name) {
                return Err(invalid(
                    "site.name",
                    format!("duplicate site name {:?}", site.name),
                ));
            }
            next.push(site);
        }
        self.sites = next;
        Ok(())
    }

    /// The site an address belongs to (0: none), longest prefix first.
    pub fn site_of(&self, addr: Ipv4Addr) -> SiteId {
        self.sites
            .iter()
            .filter(|s| s.prefix.contains(&addr))
            .max_by_key(|s| s.prefix.prefix_len())
            .map_or(0, |s| s.index)
    }

    pub fn by_name(&self, name: &str) -> Option<&Site> {
        self.sites.iter().find(|s| s.name == name)
    }

    pub fn name(&self, index: SiteId) -> String {
        self.sites
            .iter()
            .find(|s| s.index == index)
            .map_or_else(|| format!("site{index}"), |s| s.name.clone())
    }
}

impl Config {
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let file = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            file: file.clone(),
            source,
        })?;
        Self::parse(&text, &file)
    }

    pub fn parse(text: &str, file: &str) -> Result<Self, ConfigError> {
        let cfg: Config = toml::from_str(text).map_err(|source| ConfigError::Parse {
            file: file.to_string(),
            source,
        })?;
        let bad = |e: InvalidSetting| ConfigError::Invalid {
            file: file.to_string(),
            field: e.field,
            msg: e.msg,
        };
        if cfg.max_in_flight == 0 {
            return Err(bad(invalid("max_in_flight", "must be at least 1")));
        }
        if let Some(p) = cfg.realtime_priority.filter(|p| !(1..=99).contains(p)) {
            return Err(bad(invalid(
                "realtime_priority",
                format!("must be in 1..=99, got {p}"),
            )));
        }
        if !(576..=9000).contains(&cfg.mtu) {
            return Err(bad(invalid(
                "mtu",
                format!("must be in 576..=9000, got {}", cfg.mtu),
            )));
        }
        let sites = Sites::new(cfg.site.clone()).map_err(bad)?;
        for (n, l) in cfg.link.iter().enumerate() {
            let field = |f: &str| format!("link[{}].{f}", n + 1);
            for (f, name) in [("from", &l.from), ("to", &l.to)] {
                if sites.by_name(name).is_none() {
                    return Err(bad(invalid(field(f), format!("unknown site {name:?}"))));
                }
            }
            if l.from == l.to {
                return Err(bad(invalid(field("to"), "must differ from `from`")));
            }
            l.settings()
                .validate()
                .map_err(|e| bad(invalid(field(&e.field), e.msg)))?;
        }
        Ok(cfg)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const OK: &str = r#"
control = "/tmp/x.sock"
metrics = "198.18.1.254:9110"
[[site]]
index = 1
name = "paris"
prefix = "198.18.1.0/24"
[[site]]
index = 2
name = "tokyo"
prefix = "198.18.2.0/24"
[[link]]
from = "paris"
to = "tokyo"
delay_ms = 120
jitter_ms = 2.5
loss = 0.01
"#;

    #[test]
    fn parses_and_converts() {
        let cfg = Config::parse(OK, "x.toml").unwrap();
        assert_eq!(cfg.tun_name, "wan0");
        let p = cfg.link[0].settings().params();
        assert_eq!(p.delay, Duration::from_millis(120));
        assert_eq!(p.jitter, Duration::from_micros(2500));
        assert_eq!(p.rate_bps, 0);
        let sites = Sites::new(cfg.site).unwrap();
        assert_eq!(sites.site_of("198.18.2.11".parse().unwrap()), 2);
        assert_eq!(sites.site_of("198.18.250.1".parse().unwrap()), 0);
        assert_eq!(LinkSettings::from_params(&p), cfg.link[0].settings());
    }

    #[test]
    fn errors_name_file_and_field() {
        let err = Config::parse(&OK.replace("loss = 0.01", "loss = 1.5"), "t.toml").unwrap_err();
        assert_eq!(
            err.to_string(),
            "t.toml: link[1].loss: must be a number in 0..=1, got 1.5"
        );
        let err =
            Config::parse(&OK.replace("to = \"tokyo\"", "to = \"rome\""), "t.toml").unwrap_err();
        assert!(
            err.to_string()
                .contains("link[1].to: unknown site \"rome\""),
            "{err}"
        );
        let err = Config::parse(&OK.replace("jitter_ms", "jiter_ms"), "t.toml").unwrap_err();
        assert!(
            err.to_string().contains("t.toml") && err.to_string().contains("jiter_ms"),
            "{err}"
        );
    }

    #[test]
    fn merged_sites_keep_unique_names() {
        let mut s = Sites::new(Config::parse(OK, "x").unwrap().site).unwrap();
        let dup = Site {
            index: 3,
            name: "paris".into(),
            prefix: "198.18.3.0/24".parse().unwrap(),
        };
        assert!(s.merge(vec![dup]).is_err());
        let new = Site {
            index: 3,
            name: "london".into(),
            prefix: "198.18.3.0/24".parse().unwrap(),
        };
        s.merge(vec![new]).unwrap();
        assert_eq!(s.site_of("198.18.3.1".parse().unwrap()), 3);
        assert_eq!(s.name(3), "london");
    }
}
