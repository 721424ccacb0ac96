//! The daemons' configurations. pon-proxy's: a forwarder configuration
//! (same fields, same checks) plus `[routing]` (path selection; without it
//! the proxy only forwards and answers other monitors' probes), `[monitor]`
//! and `[proxy]`. pon-monitor's and pon-router's: their local-link
//! addresses and keys, their state directory (their own key) and the same
//! `[monitor]` / `[routing]` sections.

use crate::core::Part;
use crate::daemon::{LinkSetup, Partner};
use crate::forwarder::ForwarderConfig;
use anyhow::Context;
use pon_monitor::MonitorConfig;
use pon_proto::control::PublicKey;
use pon_routing::RoutingConfig;
use serde::{Deserialize, Serialize, Serializer};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

#[derive(Debug, Clone)]
pub struct ProxyConfig {
    pub forwarder: ForwarderConfig,
    pub routing: Option<RoutingConfig>,
    pub monitor: MonitorConfig,
    pub control: ControlConfig,
    /// The proxy's own PMon subscription service; off unless given.
    pub pmon: Option<pon_cu::pmon_listen::ListenConfig>,
}

/// The longest steering refresh that keeps a live proxy's lease with its
/// TAs (500 ms) over a lost datagram or two.
pub const MAX_STEERING_REFRESH_MS: u64 = 200;

/// The steering refresh by default, and of a pon-forwarder whose router
/// runs apart.
pub const STEERING_REFRESH_MS: u64 = 150;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields, default)]
pub struct ControlConfig {
    /// A current route whose traffic the egress's reports stopped
    /// confirming is probed this often, whatever the learning budget: with
    /// `routing.failover_losses` consecutive losses this bounds how long
    /// traffic stays on a dead path.
    pub keepalive_ms: u64,
    /// Every other current route (idle, or its traffic confirmed) is
    /// probed this often.
    pub idle_keepalive_ms: u64,
    /// UDP port of the local TAs' steering listeners (0: do not steer).
    pub steering_port: u16,
    /// The bypass set is re-sent this often even when unchanged, so a TA
    /// that restarted or lost a datagram catches up. It is also the
    /// proxy's lease with its TAs: three refreshes missed (the TA's
    /// `LEASE`, 500 ms) and a TA moves its flows to the site's other
    /// proxies, so it must stay well under a third of that.
    pub steering_refresh_ms: u64,
    /// How often the status page and the routing metrics are refreshed.
    pub status_every_ms: u64,
    /// Bounded queue between the forwarding threads and the control thread
    /// (probes and replies); packets beyond it are dropped and counted.
    #[schemars(extend("x-unit" = "packets"))]
    pub queue: usize,
    /// Destinations whose policy weighs bandwidth get their recently
    /// answering candidates measured with a packet train this often
    /// (0: never; the policies then fall back to the TCP model).
    pub bandwidth_every_ms: u64,
}

impl Default for ControlConfig {
    fn default() -> Self {
        ControlConfig {
            keepalive_ms: pon_routing::config::DEFAULT_KEEPALIVE_MS,
            idle_keepalive_ms: pon_routing::config::DEFAULT_IDLE_KEEPALIVE_MS,
            steering_port: pon_proto::ports::STEERING,
            steering_refresh_ms: STEERING_REFRESH_MS,
            status_every_ms: 250,
            queue: 4096,
            bandwidth_every_ms: pon_routing::config::DEFAULT_BANDWIDTH_EVERY_MS,
        }
    }
}

impl ControlConfig {
    pub fn keepalive(&self) -> Duration {
        Duration::from_millis(self.keepalive_ms)
    }
}

/// pon-proxy's file as it is read and written: the forwarder's fields at
/// the top level, then `[routing]` (when routing), `[monitor]` and
/// `[proxy]`. Its schema is the config reference's (docs/CONFIG.md).
#[derive(Serialize, schemars::JsonSchema)]
struct ProxyFile<'a> {
    #[serde(flatten)]
    forwarder: &'a ForwarderConfig,
    /// Path selection: the router part. Without it the proxy forwards on
    /// direct paths (or static `[[route]]`s) and answers other monitors'
    /// probes, and measures nothing itself.
    #[serde(skip_serializing_if = "Option::is_none")]
    routing: Option<&'a RoutingConfig>,
    /// The monitor part: probing other proxies' paths.
    monitor: &'a MonitorConfig,
    /// The proxy core: keepalives, steering of the TAs, status.
    proxy: &'a ControlConfig,
    /// The proxy's own PMon service (off unless given; needs `[cu]`): the
    /// CU's subscription protocol (`ponctl --cu ADDR matrix | watch`)
    /// over this proxy's own measurements, for the admin credential and
    /// the agents the CU vouches for to this proxy.
    #[serde(skip_serializing_if = "Option::is_none")]
    pmon: Option<&'a pon_cu::pmon_listen::ListenConfig>,
}

impl schemars::JsonSchema for ProxyConfig {
    fn schema_name() -> std::borrow::Cow<'static, str> {
        "ProxyConfig".into()
    }
    fn json_schema(g: &mut schemars::SchemaGenerator) -> schemars::Schema {
        ProxyFile::json_schema(g)
    }
}

impl Serialize for ProxyConfig {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        ProxyFile {
            forwarder: &self.forwarder,
            routing: self.routing.as_ref(),
            monitor: &self.monitor,
            proxy: &self.control,
            pmon: self.pmon.as_ref(),
        }
        .serialize(s)
    }
}

impl ProxyConfig {
    pub fn load(path: &Path) -> anyhow::Result<Self> {
        let mut cfg = pon_telemetry::load_config(path, "proxy", Self::parse)?;
        cfg.forwarder.cu = cfg.forwarder.cu.map(|c| c.relative_to(path));
        cfg.pmon = cfg.pmon.map(|p| p.relative_to(path));
        Ok(cfg)
    }

    /// The forwarder's part of the core under this configuration.
    pub fn forwarder_part(
        &self,
        epoch: u64,
        private_key: [u8; 32],
    ) -> crate::core::ForwarderPartConfig {
        crate::core::ForwarderPartConfig {
            forwarder: self.forwarder.clone(),
            epoch,
            private_key,
            timers: self.forwarder.tunnel.timers(),
            steering_port: self.control.steering_port,
            steering_refresh: Duration::from_millis(self.control.steering_refresh_ms),
        }
    }

    /// The router's part, when `[routing]` is on.
    pub fn router_part(&self) -> Option<crate::core::RouterPartConfig> {
        let c = &self.control;
        self.routing
            .clone()
            .map(|routing| crate::core::RouterPartConfig {
                routing,
                keepalive: c.keepalive(),
                idle_keepalive: Duration::from_millis(c.idle_keepalive_ms),
                bandwidth_every: (c.bandwidth_every_ms > 0)
                    .then(|| Duration::from_millis(c.bandwidth_every_ms)),
            })
    }

    /// The forwarder's fields are checked by the forwarder's own parser,
    /// so errors read the same as pon-forwarder's.
    pub fn parse(text: &str) -> anyhow::Result<Self> {
        let mut doc: toml::Table = toml::from_str(text)?;
        let routing = doc
            .remove("routing")
            .map(|v| -> anyhow::Result<RoutingConfig> {
                let r: RoutingConfig = v.try_into().context("in [routing]")?;
                r.validate()?;
                Ok(r)
            })
            .transpose()?;
        let monitor: MonitorConfig = match doc.remove("monitor") {
            Some(v) => v.try_into().context("in [monitor]")?,
            None => MonitorConfig::default(),
        };
        monitor.validate().map_err(anyhow::Error::msg)?;
        let control: ControlConfig = match doc.remove("proxy") {
            Some(v) => v.try_into().context("in [proxy]")?,
            None => ControlConfig::default(),
        };
        if control.keepalive_ms == 0
            || control.idle_keepalive_ms == 0
            || control.status_every_ms == 0
            || control.queue == 0
        {
            anyhow::bail!("[proxy] keepalive_ms, idle_keepalive_ms, status_every_ms and queue must be positive");
        }
        if !(1..=MAX_STEERING_REFRESH_MS).contains(&control.steering_refresh_ms) {
            anyhow::bail!("[proxy] steering_refresh_ms must be between 1 and {MAX_STEERING_REFRESH_MS}: the TAs take a proxy that missed three refreshes in 500 ms for dead");
        }
        let pmon = doc
            .remove("pmon")
            .map(|v| -> anyhow::Result<pon_cu::pmon_listen::ListenConfig> {
                let p: pon_cu::pmon_listen::ListenConfig = v.try_into().context("in [pmon]")?;
                p.check().map_err(anyhow::Error::msg)?;
                Ok(p)
            })
            .transpose()?;
        let forwarder = ForwarderConfig::parse(&toml::to_string(&doc)?)?;
        if pmon.is_some() && forwarder.cu.is_none() {
            anyhow::bail!("[pmon] needs [cu]: the overlay CA its consumers' certificates chain to, and the CU's view of the destinations");
        }
        if forwarder.local.is_some() {
            anyhow::bail!("[local] is for pon-forwarder with a separate pon-monitor and pon-router; pon-proxy runs them in-process");
        }
        Ok(ProxyConfig {
            forwarder,
            routing,
            monitor,
            control,
            pmon,
        })
    }
}

/// pon-monitor's configuration.
#[derive(Debug, Clone, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct MonitorDaemonConfig {
    /// UDP address for the forwarder's and the router's messages.
    #[schemars(extend("format" = "address:port"))]
    pub listen: SocketAddr,
    /// The forwarder's local-link address (its `[local] listen`).
    #[schemars(extend("format" = "address:port"))]
    pub forwarder: SocketAddr,
    /// The forwarder's public key (pon-forwarder logs it at start).
    pub forwarder_key: PublicKey,
    /// The router's local-link address (its `listen`).
    #[schemars(extend("format" = "address:port"))]
    pub router: SocketAddr,
    /// The router's public key (pon-router logs it at start).
    pub router_key: PublicKey,
    /// This monitor's own key lives here (made on first start, mode 0600;
    /// default /var/lib/pon/monitor).
    #[serde(default)]
    #[schemars(extend("format" = "path"))]
    pub state_dir: Option<PathBuf>,
    /// Prometheus endpoint; `GET /status` answers per-path estimates
    /// (default 127.0.0.1:9103, loopback only).
    #[serde(default)]
    #[schemars(extend("format" = "address:port"))]
    pub metrics: Option<SocketAddr>,
    /// Probing, as pon-proxy's `[monitor]`.
    #[serde(default)]
    pub monitor: MonitorConfig,
}

impl MonitorDaemonConfig {
    pub fn load(path: &Path) -> anyhow::Result<Self> {
        let mut c: Self = pon_telemetry::load_toml(path, "monitor")?;
        c.monitor.validate().map_err(anyhow::Error::msg)?;
        c.state_dir = c.state_dir.map(|d| pon_identity::relative_to(d, path));
        Ok(c)
    }

    /// Its end of the local link for this run (`epoch`), with its key (made
    /// on first start).
    pub fn link(&self, epoch: u64) -> anyhow::Result<LinkSetup> {
        link_setup(
            self.state_dir.as_deref(),
            "monitor",
            self.listen,
            epoch,
            [
                (Part::Forwarder, self.forwarder, self.forwarder_key),
                (Part::Router, self.router, self.router_key),
            ],
        )
    }
}

/// pon-router's configuration.
#[derive(Debug, Clone, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RouterDaemonConfig {
    /// UDP address for the forwarder's and the monitor's messages.
    #[schemars(extend("format" = "address:port"))]
    pub listen: SocketAddr,
    /// The forwarder's local-link address (its `[local] listen`).
    #[schemars(extend("format" = "address:port"))]
    pub forwarder: SocketAddr,
    /// The forwarder's public key (pon-forwarder logs it at start).
    pub forwarder_key: PublicKey,
    /// The monitor's local-link address (its `listen`).
    #[schemars(extend("format" = "address:port"))]
    pub monitor: SocketAddr,
    /// The monitor's public key (pon-monitor logs it at start).
    pub monitor_key: PublicKey,
    /// This router's own key lives here (made on first start, mode 0600;
    /// default /var/lib/pon/router).
    #[serde(default)]
    #[schemars(extend("format" = "path"))]
    pub state_dir: Option<PathBuf>,
    /// Prometheus endpoint; `GET /status` answers the routes (as pon-proxy;
    /// default 127.0.0.1:9104, loopback only).
    #[serde(default)]
    #[schemars(extend("format" = "address:port"))]
    pub metrics: Option<SocketAddr>,
    /// Keepalive period of a current route whose traffic went unconfirmed
    /// (see pon-proxy's [proxy]).
    #[serde(default = "default_keepalive")]
    pub keepalive_ms: u32,
    /// Keepalive period of every other current route.
    #[serde(default = "default_idle_keepalive")]
    pub idle_keepalive_ms: u32,
    /// Bandwidth trains for the policies that weigh bandwidth, this often
    /// (see pon-proxy's [proxy]; 0: never).
    #[serde(default = "default_bandwidth_every")]
    pub bandwidth_every_ms: u64,
    /// Path selection, as pon-proxy's `[routing]`.
    #[serde(default)]
    pub routing: RoutingConfig,
}

fn default_keepalive() -> u32 {
    ControlConfig::default().keepalive_ms as u32
}

fn default_idle_keepalive() -> u32 {
    ControlConfig::default().idle_keepalive_ms as u32
}

fn default_bandwidth_every() -> u64 {
    ControlConfig::default().bandwidth_every_ms
}

impl RouterDaemonConfig {
    pub fn load(path: &Path) -> anyhow::Result<Self> {
        let mut c: Self = pon_telemetry::load_toml(path, "router")?;
        c.routing.validate()?;
        if c.keepalive_ms == 0 || c.idle_keepalive_ms == 0 {
            anyhow::bail!("keepalive_ms and idle_keepalive_ms must be positive");
        }
        c.state_dir = c.state_dir.map(|d| pon_identity::relative_to(d, path));
        Ok(c)
    }

    /// Its end of the local link for this run (`epoch`), with its key (made
    /// on first start).
    pub fn link(&self, epoch: u64) -> anyhow::Result<LinkSetup> {
        link_setup(
            self.state_dir.as_deref(),
            "router",
            self.listen,
            epoch,
            [
                (Part::Forwarder, self.forwarder, self.forwarder_key),
                (Part::Monitor, self.monitor, self.monitor_key),
            ],
        )
    }

    pub fn part(&self) -> crate::core::RouterPartConfig {
        crate::core::RouterPartConfig {
            routing: self.routing.clone(),
            keepalive: Duration::from_millis(u64::from(self.keepalive_ms)),
            idle_keepalive: Duration::from_millis(u64::from(self.idle_keepalive_ms)),
            bandwidth_every: (self.bandwidth_every_ms > 0)
                .then(|| Duration::from_millis(self.bandwidth_every_ms)),
        }
    }
}

/// A split monitor's or router's end of the local link: its identity
/// (from `state_dir`, default /var/lib/pon/`daemon`) and its two partners.
fn link_setup(
    state_dir: Option<&Path>,
    daemon: &str,
    listen: SocketAddr,
    epoch: u64,
    partners: [(Part, SocketAddr, PublicKey); 2],
) -> anyhow::Result<LinkSetup> {
    let dir = pon_identity::state_dir_or_default(state_dir, daemon);
    let id = pon_identity::Identity::load_or_create(&dir).context("state_dir")?;
    tracing::info!(public_key = %id.noise_public(), state_dir = %dir.display(), "identity");
    Ok(LinkSetup {
        listen,
        secret: id.noise_secret(),
        epoch,
        partners: partners
            .into_iter()
            .map(|(part, addr, key)| Partner { part, addr, key })
            .collect(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const BASE: &str = "id = 1\nlisten = \"198.18.1.1:7300\"\nlocal_addr = \"198.18.1.1\"\n[[peer]]\nid = 2\naddr = \"198.18.2.1:7300\"\npublic_key = \"AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=\"\n";

    #[test]
    fn sections_split_off_the_forwarder_config() {
        let c = ProxyConfig::parse(&format!(
            "{BASE}[routing]\npolicy = \"loss\"\n[monitor]\nmax_probes_per_sec = 10\n[proxy]\nkeepalive_ms = 20\n"
        ))
        .unwrap();
        assert_eq!(c.forwarder.id, Some(1));
        assert_eq!(c.routing.unwrap().policy, pon_routing::Policy::Loss);
        assert_eq!(c.monitor.max_probes_per_sec, 10);
        assert_eq!(c.control.keepalive_ms, 20);
        let plain = ProxyConfig::parse(BASE).unwrap();
        assert!(
            plain.routing.is_none(),
            "no [routing]: forward and answer only"
        );
    }

    #[test]
    fn errors_name_the_section_and_field() {
        for (extra, want) in [
            ("[routing]\nmax_relays = 3\n", "max_relays"),
            ("[monitor]\nmin_timeout_ms = 0\n", "min_timeout_ms"),
            ("[proxy]\nkeepalive = 1\n", "keepalive"),
            ("bogus = 1\n", "bogus"),
        ] {
            let e = format!(
                "{:#}",
                ProxyConfig::parse(&format!("{BASE}{extra}")).unwrap_err()
            );
            assert!(e.contains(want), "{extra}: {e}");
        }
    }
}
