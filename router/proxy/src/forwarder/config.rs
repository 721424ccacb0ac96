//! The forwarder's TOML configuration. Two modes: static (peers, agents and
//! destinations listed here) and CU mode (a `[cu]` section: they come from
//! the Central Unit at run time; `id` is then only the id to ask for).

use anyhow::Context;
use ipnet::IpNet;
use pon_forwarder::{Agent, ForwardingTable};
use pon_proto::control::PublicKey;
use pon_proto::EncapKind;
use serde::{Deserialize, Serialize};
use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};

#[derive(Debug, Clone, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ForwarderConfig {
    /// This proxy's id (nonzero, unique in the overlay). In CU mode the CU
    /// assigns the id; this one is asked for and granted if free.
    #[serde(default)]
    pub id: Option<u32>,
    /// Register with the Central Unit and take peers, agents and
    /// destinations from it.
    #[serde(default)]
    pub cu: Option<pon_cu::client::CuClientConfig>,
    /// Where this proxy keeps its keys and the CU's certificate for them
    /// (default /var/lib/pon/proxy; relative to this file).
    #[serde(default)]
    #[schemars(extend("format" = "path"))]
    pub state_dir: Option<PathBuf>,
    /// UDP address for PON packets from peer proxies (may be 0.0.0.0:port).
    #[schemars(extend("format" = "address:port"))]
    pub listen: SocketAddr,
    /// Where peers reach this proxy, when that is not `listen` (a cloud's
    /// 1:1 NAT: the public address and port). CU mode without it: the
    /// address the CU sees this proxy's connection come from, with
    /// `listen`'s port.
    #[serde(default)]
    #[schemars(extend("format" = "address:port"))]
    pub public: Option<SocketAddr>,
    /// Address agents send IP-in-IP to, and the source of packets to agents.
    pub local_addr: Ipv4Addr,
    /// UDP port for agents using the UDP encapsulation (0: disabled).
    #[serde(default = "pon_proto::ports::defaults::agent_udp")]
    pub agent_udp_port: u16,
    /// MTU of the underlay between proxies (at least 576).
    #[schemars(extend("x-unit" = "bytes"))]
    #[serde(default = "pon_proto::ports::defaults::underlay_mtu")]
    pub underlay_mtu: u16,
    /// Hop limit written into new PON headers (at least 1).
    #[serde(default = "default_hop_limit")]
    pub hop_limit: u8,
    /// Prometheus endpoint (`GET /metrics`, and `/status`; default
    /// 127.0.0.1:9100, loopback only).
    #[serde(default)]
    #[schemars(extend("format" = "address:port"))]
    pub metrics: Option<SocketAddr>,
    /// Static mode: the other proxies (from the CU in CU mode).
    #[serde(default, rename = "peer")]
    pub peers: Vec<PeerConfig>,
    /// Static mode: this site's app VMs, whose RAs get the packets for
    /// them (from the CU in CU mode).
    #[serde(default, rename = "agent")]
    pub agents: Vec<AgentConfig>,
    /// Static mode: which proxy serves which inner prefix (from the CU in
    /// CU mode).
    #[serde(default, rename = "destination")]
    pub destinations: Vec<DestinationConfig>,
    /// Static source routes towards destination proxies (default: direct;
    /// the router's routes replace them when it runs).
    #[serde(default, rename = "route")]
    pub routes: Vec<RouteConfig>,
    /// The monitor and the router run as separate processes (pon-monitor,
    /// pon-router) and talk to this forwarder over UDP.
    #[serde(default)]
    pub local: Option<LocalConfig>,
    /// Session lifetimes of the tunnels between proxies.
    #[serde(default)]
    pub tunnel: TunnelConfig,
    /// Encrypt what this proxy sends to its agents' RAs on the UDP leg
    /// (always authenticated; encryption on the site LAN is an option).
    #[serde(default)]
    pub encrypt_lan: bool,
}

/// When the sessions between proxies are replaced (defaults: WireGuard's).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct TunnelConfig {
    /// A session is replaced after this long (and given up half as long
    /// again later; at least 100).
    #[serde(default = "default_rekey_after_ms")]
    pub rekey_after_ms: u64,
    /// ... or after this many messages sent in it.
    #[schemars(extend("x-unit" = "messages"))]
    #[serde(default = "default_rekey_after_messages")]
    pub rekey_after_messages: u64,
}

impl Default for TunnelConfig {
    fn default() -> Self {
        TunnelConfig {
            rekey_after_ms: default_rekey_after_ms(),
            rekey_after_messages: default_rekey_after_messages(),
        }
    }
}

fn default_rekey_after_ms() -> u64 {
    pon_tunnel::Timers::default().rekey_after.as_millis() as u64
}
fn default_rekey_after_messages() -> u64 {
    pon_tunnel::Timers::default().rekey_after_messages
}

impl TunnelConfig {
    /// A session is given up half a rekey period after it should have
    /// been replaced (WireGuard: 120 s and 180 s).
    pub fn timers(&self) -> pon_tunnel::Timers {
        let rekey = std::time::Duration::from_millis(self.rekey_after_ms);
        pon_tunnel::Timers {
            rekey_after: rekey,
            reject_after: rekey + rekey / 2,
            rekey_after_messages: self.rekey_after_messages,
            ..pon_tunnel::Timers::default()
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct LocalConfig {
    /// UDP address for the monitor's and the router's messages.
    #[schemars(extend("format" = "address:port"))]
    pub listen: SocketAddr,
    /// Where pon-monitor listens (probes that end here go there).
    #[schemars(extend("format" = "address:port"))]
    pub monitor: SocketAddr,
    /// pon-monitor's public key (the local link is authenticated: see
    /// `daemon::link`; pon-monitor logs it at start).
    pub monitor_key: PublicKey,
    /// Where pon-router listens (the topology goes there).
    #[schemars(extend("format" = "address:port"))]
    pub router: SocketAddr,
    /// pon-router's public key.
    pub router_key: PublicKey,
    /// UDP port of the local TAs' steering listeners (0: do not steer).
    #[serde(default = "pon_proto::ports::defaults::steering")]
    pub steering_port: u16,
}

#[derive(Debug, Clone, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct PeerConfig {
    /// The peer proxy's id.
    pub id: u32,
    /// Where it receives PON packets (its `listen`, or its `public`).
    #[schemars(extend("format" = "address:port"))]
    pub addr: SocketAddr,
    /// The peer's static key (a proxy logs its own at start; `pon-lab-config
    /// identity DIR` prints the key kept in a state directory).
    pub public_key: PublicKey,
}

#[derive(Debug, Clone, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct AgentConfig {
    /// The app VM's address.
    pub addr: Ipv4Addr,
    /// How its agent legs are encapsulated (its TA's `encap`).
    #[serde(default)]
    pub encap: EncapKind,
    /// The RA's UDP port, used with `encap = "udp"`.
    #[serde(default = "pon_proto::ports::defaults::ra_udp")]
    pub ra_port: u16,
    /// The agent's static key (`pon-lab-config identity` prints the key of
    /// a state directory): its UDP legs and steering are authenticated with
    /// the key it shares with this proxy. Without it, the proxy neither
    /// accepts its UDP packets nor steers it.
    #[serde(default)]
    pub public_key: Option<PublicKey>,
}

#[derive(Debug, Clone, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct DestinationConfig {
    /// Inner destinations ...
    pub prefix: IpNet,
    /// ... served by this proxy (its id).
    pub proxy: u32,
}

#[derive(Debug, Clone, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RouteConfig {
    /// The destination proxy's id.
    pub to: u32,
    /// The relays in between, in order (empty: direct).
    #[serde(default)]
    pub via: Vec<u32>,
}

fn default_hop_limit() -> u8 {
    pon_proto::pon::DEFAULT_HOP_LIMIT
}

impl ForwarderConfig {
    pub fn load(path: &Path) -> anyhow::Result<Self> {
        let mut cfg = pon_telemetry::load_config(path, "forwarder", Self::parse)?;
        cfg.cu = cfg.cu.map(|c| c.relative_to(path));
        cfg.state_dir = cfg.state_dir.map(|d| pon_identity::relative_to(d, path));
        Ok(cfg)
    }

    /// The directory of this proxy's identity.
    pub fn state_dir(&self) -> PathBuf {
        pon_identity::state_dir_or_default(self.state_dir.as_deref(), "proxy")
    }

    /// This proxy's identity, made on first start.
    pub fn identity(&self) -> anyhow::Result<pon_identity::Identity> {
        pon_identity::Identity::load_or_create(&self.state_dir()).context("state_dir")
    }

    pub fn parse(text: &str) -> anyhow::Result<Self> {
        let cfg: ForwarderConfig = toml::from_str(text)?;
        if cfg.underlay_mtu < 576 {
            anyhow::bail!(
                "underlay_mtu = {} is below the IPv4 minimum of 576",
                cfg.underlay_mtu
            );
        }
        if cfg.hop_limit == 0 {
            anyhow::bail!("hop_limit must be at least 1");
        }
        if cfg.tunnel.rekey_after_ms < 100 || cfg.tunnel.rekey_after_messages == 0 {
            anyhow::bail!(
                "[tunnel] rekey_after_ms must be at least 100 and rekey_after_messages at least 1"
            );
        }
        match (&cfg.cu, cfg.id) {
            (None, None) => anyhow::bail!("id is required (or a [cu] section to get one)"),
            (Some(_), _)
                if !(cfg.peers.is_empty()
                    && cfg.agents.is_empty()
                    && cfg.destinations.is_empty()) =>
            {
                anyhow::bail!("[[peer]], [[agent]] and [[destination]] come from the CU when [cu] is set; remove them")
            }
            (Some(_), _) => return Ok(cfg),
            (None, Some(_)) => {}
        }
        cfg.table()
            .context("in [[peer]], [[agent]], [[destination]] or [[route]]")?;
        Ok(cfg)
    }

    pub fn table(&self) -> Result<ForwardingTable, super::TableError> {
        let peers: Vec<_> = self.peers.iter().map(|p| (p.id, p.addr)).collect();
        let agents: Vec<_> = self
            .agents
            .iter()
            .map(|a| Agent {
                addr: a.addr,
                encap: a.encap.with_port(a.ra_port),
                key: a.public_key,
            })
            .collect();
        let dests: Vec<_> = self
            .destinations
            .iter()
            .map(|d| (d.prefix, d.proxy))
            .collect();
        // In CU mode the routes' proxies are not known yet: `cu::table_from_view`
        // adds each route once its hops are peers.
        let relays: Vec<_> = match self.cu {
            Some(_) => vec![],
            None => self.routes.iter().map(|r| (r.to, r.via.clone())).collect(),
        };
        // In CU mode the table starts empty under a placeholder id and is
        // replaced as soon as the CU has assigned one.
        let id = self.id.unwrap_or(u32::MAX);
        ForwardingTable::build(id, &peers, &agents, &dests, &relays)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SAMPLE: &str = r#"
id = 1
listen = "198.18.1.1:7300"
local_addr = "198.18.1.1"
metrics = "198.18.1.1:9100"
[[peer]]
id = 2
addr = "198.18.2.1:7300"
public_key = "AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA="
[[peer]]
id = 3
addr = "198.18.3.1:7300"
public_key = "AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA="
[[agent]]
addr = "198.18.1.11"
[[agent]]
addr = "198.18.1.12"
encap = "udp"
[[destination]]
prefix = "198.18.2.11/32"
proxy = 2
[[route]]
to = 2
via = [3]
"#;

    #[test]
    fn parses_sample() {
        let c = ForwarderConfig::parse(SAMPLE).unwrap();
        let t = c.table().unwrap();
        assert_eq!(t.route(2).unwrap().as_slice(), &[3, 2]);
        assert_eq!(
            t.agent("198.18.1.12".parse().unwrap()).unwrap().encap,
            pon_proto::Encap::Udp { ra_port: 7302 }
        );
        assert_eq!(c.underlay_mtu, 1500);
    }

    #[test]
    fn cu_mode_takes_no_static_peers() {
        let cu = "[cu]\naddr = \"198.18.250.1:7400\"\nca = \"ca.pem\"\ntoken_file = \"token\"\ncloud = \"paris\"\n";
        let c = ForwarderConfig::parse(&format!("{SAMPLE}{cu}")).unwrap_err();
        assert!(format!("{c:#}").contains("come from the CU"), "{c:#}");
        let c = ForwarderConfig::parse(&format!(
            "listen = \"198.18.1.1:7300\"\nlocal_addr = \"198.18.1.1\"\n{cu}"
        ))
        .unwrap();
        assert_eq!(c.cu.unwrap().cloud, "paris");
        let e =
            ForwarderConfig::parse("listen = \"198.18.1.1:7300\"\nlocal_addr = \"198.18.1.1\"\n")
                .unwrap_err();
        assert!(format!("{e:#}").contains("id is required"));
    }

    #[test]
    fn errors_name_the_problem() {
        let bad = SAMPLE.replace("via = [3]", "via = [4]");
        let e = format!("{:#}", ForwarderConfig::parse(&bad).unwrap_err());
        assert!(e.contains("hop 4"), "{e}");
        let bad = SAMPLE.replace("local_addr", "local_adr");
        let e = format!("{:#}", ForwarderConfig::parse(&bad).unwrap_err());
        assert!(e.contains("local_adr"), "{e}");
    }
}
