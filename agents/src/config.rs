//! TOML configuration of the TA and the RA.

use anyhow::Context;
use ipnet::IpNet;
use pon_proto::{Encap, EncapKind};
use serde::{Deserialize, Serialize};
use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};

#[derive(Debug, Clone, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct TaConfig {
    /// Name of the TUN device the TA creates.
    #[serde(default = "default_ta_tun")]
    pub tun_name: String,
    /// This VM's underlay address: source of the outer packets and of the
    /// intercepted ones.
    pub local_addr: Ipv4Addr,
    /// The local proxy's forwarder (in CU mode: learnt from the CU).
    #[serde(default)]
    pub forwarder: Option<Ipv4Addr>,
    /// The static key of the forwarder's proxy (static mode; in CU mode
    /// the CU vouches for it): steering and the agent legs are
    /// authenticated with the key this TA shares with it, so without it
    /// no steering is taken and nothing is sent.
    #[serde(default)]
    pub forwarder_key: Option<pon_proto::control::PublicKey>,
    /// Encrypt what the TA sends to the forwarder on the UDP leg (always
    /// authenticated; encryption on the site LAN is an option).
    #[serde(default)]
    pub encrypt_lan: bool,
    /// How both agent legs are encapsulated; with `udp`, the RA listens
    /// on `ra_port` (see [`TaConfig::encap`]).
    #[serde(default)]
    pub encap: EncapKind,
    /// The forwarder's UDP port for the UDP encapsulation.
    #[serde(default = "pon_proto::ports::defaults::agent_udp")]
    pub forwarder_udp_port: u16,
    /// MTU of the underlay; the TUN MTU is derived from it.
    #[schemars(extend("x-unit" = "bytes"))]
    #[serde(default = "pon_proto::ports::defaults::underlay_mtu")]
    pub underlay_mtu: u16,
    /// Longest source route the overlay may use; sizes the TUN MTU.
    #[serde(default = "default_max_hops")]
    pub max_hops: u8,
    /// Overrides the derived TUN MTU (larger values make the forwarder send
    /// ICMP "fragmentation needed" instead of the local stack refusing).
    #[serde(default)]
    #[schemars(extend("x-unit" = "bytes"))]
    pub mtu: Option<u16>,
    /// TUN offloads (TSO/GSO via virtio-net headers): TCP super-packets are
    /// read whole and cut into MTU-sized packets in one pass.
    #[serde(default = "default_true")]
    pub offload: bool,
    /// Destinations whose traffic goes through the overlay.
    #[serde(default)]
    pub intercept: Vec<IpNet>,
    /// Prometheus endpoint (default 127.0.0.1:9101, loopback only).
    #[serde(default)]
    #[schemars(extend("format" = "address:port"))]
    pub metrics: Option<SocketAddr>,
    /// The RA's UDP port on this VM, told to the CU for the UDP encapsulation.
    #[serde(default = "pon_proto::ports::defaults::ra_udp")]
    pub ra_port: u16,
    /// CU mode: register as an app VM, learn the forwarder and the remote
    /// app VMs to intercept from the Central Unit.
    #[serde(default)]
    pub cu: Option<pon_cu::client::CuClientConfig>,
    /// Where this agent keeps its keys and the CU's certificate for them
    /// (default /var/lib/pon/ta; relative to this file).
    #[serde(default)]
    #[schemars(extend("format" = "path"))]
    pub state_dir: Option<PathBuf>,
    /// UDP port on which the local proxy's router says which destinations
    /// the overlay cannot reach (left to the IP path meanwhile); 0: off.
    #[serde(default = "pon_proto::ports::defaults::steering")]
    pub steering_port: u16,
}

#[derive(Debug, Clone, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RaConfig {
    /// Name of the TUN device the RA creates.
    #[serde(default = "default_ra_tun")]
    pub tun_name: String,
    /// Address of the RA's TUN itself; link-local by default so that it is
    /// never chosen as a source for other traffic.
    #[serde(default = "default_ra_tun_addr")]
    pub tun_addr: Ipv4Addr,
    /// The only proxy the RA accepts packets from.
    pub proxy: Ipv4Addr,
    /// The proxy's static key: packets on the UDP leg must be sealed with
    /// the key this VM shares with it (without it, the UDP leg accepts
    /// nothing).
    #[serde(default)]
    pub proxy_key: Option<pon_proto::control::PublicKey>,
    /// This VM's identity: the TA's state directory (default
    /// /var/lib/pon/ta; relative to this file). The RA reads the key the
    /// TA made there and never makes one.
    #[serde(default)]
    #[schemars(extend("format" = "path"))]
    pub state_dir: Option<PathBuf>,
    /// This VM's address: packets for other addresses are refused.
    pub local_addr: Ipv4Addr,
    /// TUN offloads: deliver batches coalesced into super-packets (GRO).
    #[serde(default = "default_true")]
    pub offload: bool,
    /// UDP port of the UDP encapsulation (0 disables it).
    #[serde(default = "pon_proto::ports::defaults::ra_udp")]
    pub udp_port: u16,
    /// Prometheus endpoint (default 127.0.0.1:9102, loopback only).
    #[serde(default)]
    #[schemars(extend("format" = "address:port"))]
    pub metrics: Option<SocketAddr>,
}

fn default_true() -> bool {
    true
}
fn default_ta_tun() -> String {
    "ponta0".into()
}
fn default_ra_tun() -> String {
    "ponra0".into()
}
fn default_ra_tun_addr() -> Ipv4Addr {
    Ipv4Addr::new(169, 254, 80, 1)
}
fn default_max_hops() -> u8 {
    4
}

fn check_tun_name(name: &str) -> anyhow::Result<()> {
    if name.is_empty() || name.len() > 15 || name.contains(['/', ' ']) {
        anyhow::bail!("tun_name {name:?} is not a valid interface name (1-15 characters)");
    }
    Ok(())
}

impl TaConfig {
    pub fn load(path: &Path) -> anyhow::Result<Self> {
        pon_telemetry::load_toml(path, "TA").and_then(|c: Self| {
            c.validate()
                .with_context(|| format!("in TA config {}", path.display()))?;
            Ok(c.relative_to(path))
        })
    }

    /// Paths as written in `file`: relative to its directory.
    fn relative_to(mut self, file: &Path) -> Self {
        self.cu = self.cu.map(|cu| cu.relative_to(file));
        self.state_dir = self.state_dir.map(|d| pon_identity::relative_to(d, file));
        self
    }

    /// The directory of this agent's identity.
    pub fn state_dir(&self) -> PathBuf {
        pon_identity::state_dir_or_default(self.state_dir.as_deref(), "ta")
    }

    pub fn validate(&self) -> anyhow::Result<()> {
        check_tun_name(&self.tun_name)?;
        if self.forwarder.is_none() && self.cu.is_none() {
            anyhow::bail!("forwarder is required (or a [cu] section to learn it)");
        }
        if self.max_hops == 0 || usize::from(self.max_hops) > pon_proto::pon::MAX_HOPS {
            anyhow::bail!(
                "max_hops = {} must be within 1..={}",
                self.max_hops,
                pon_proto::pon::MAX_HOPS
            );
        }
        let mtu = self.tun_mtu();
        let agent_leg = match self.encap {
            EncapKind::Ipip => pon_proto::ip::IPIP_OVERHEAD,
            EncapKind::Udp => pon_proto::ip::UDP_OVERHEAD + pon_proto::lan::OVERHEAD,
        };
        let agent_leg_max = usize::from(self.underlay_mtu).saturating_sub(agent_leg);
        if usize::from(mtu) > agent_leg_max {
            // The TA cannot tell the sender about a packet its own leg cannot carry.
            anyhow::bail!("mtu = {mtu} does not fit the agent leg: at most {agent_leg_max} with underlay_mtu = {}", self.underlay_mtu);
        }
        if !(576..=65535).contains(&usize::from(mtu))
            || usize::from(self.underlay_mtu) <= self.overhead()
        {
            anyhow::bail!(
                "underlay_mtu = {} leaves a TUN MTU of {mtu}, below 576",
                self.underlay_mtu
            );
        }
        Ok(())
    }

    /// This VM's encapsulation as the CU and the forwarder know it.
    pub fn encap(&self) -> Encap {
        self.encap.with_port(self.ra_port)
    }

    fn overhead(&self) -> usize {
        pon_proto::pon::proxy_leg_overhead(usize::from(self.max_hops))
    }

    /// The largest inner packet that fits every leg: the proxy legs (outer
    /// IPv4 + UDP + a PON header of `max_hops` hops with a tag) dominate the
    /// agent legs (20 or 28 bytes).
    pub fn tun_mtu(&self) -> u16 {
        self.mtu.unwrap_or_else(|| {
            usize::from(self.underlay_mtu).saturating_sub(self.overhead()) as u16
        })
    }
}

impl RaConfig {
    pub fn load(path: &Path) -> anyhow::Result<Self> {
        pon_telemetry::load_toml(path, "RA").and_then(|c: Self| {
            c.validate()
                .with_context(|| format!("in RA config {}", path.display()))?;
            Ok(c.relative_to(path))
        })
    }

    pub fn validate(&self) -> anyhow::Result<()> {
        check_tun_name(&self.tun_name)
    }

    /// Paths as written in `file`: relative to its directory.
    fn relative_to(mut self, file: &Path) -> Self {
        self.state_dir = self.state_dir.map(|d| pon_identity::relative_to(d, file));
        self
    }

    /// The directory of this VM's identity (the TA's).
    pub fn state_dir(&self) -> PathBuf {
        pon_identity::state_dir_or_default(self.state_dir.as_deref(), "ta")
    }
}

/// pon-agent's configuration: one app VM's TA and RA in one process, each
/// in its own table with the fields and checks of pon-ta's and pon-ra's
/// files, plus the endpoint serving both parts' metrics.
#[derive(Debug, Clone, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct AgentConfig {
    /// Prometheus endpoint serving the TA's and the RA's counters (default
    /// 127.0.0.1:9105, loopback only). `[ta] metrics` and `[ra] metrics`,
    /// when set, also serve each part's own page there, as pon-ta and
    /// pon-ra do (for scrapers set up for the two daemons); unset, they
    /// serve nothing.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(extend("format" = "address:port"))]
    pub metrics: Option<SocketAddr>,
    /// The transmission agent: pon-ta's fields.
    pub ta: TaConfig,
    /// The reception agent: pon-ra's fields.
    pub ra: RaConfig,
}

impl AgentConfig {
    pub fn load(path: &Path) -> anyhow::Result<Self> {
        pon_telemetry::load_config(path, "agent", Self::parse).map(|c| AgentConfig {
            ta: c.ta.relative_to(path),
            ra: c.ra.relative_to(path),
            ..c
        })
    }

    /// The file's text, with every check pon-agent makes when it starts
    /// (paths are left as written).
    pub fn parse(text: &str) -> anyhow::Result<Self> {
        let c: Self = toml::from_str(text)?;
        c.validate()?;
        Ok(c)
    }

    /// Each part's own checks, then what one process running both needs.
    pub fn validate(&self) -> anyhow::Result<()> {
        let (ta, ra) = (&self.ta, &self.ra);
        ta.validate().context("[ta]")?;
        ra.validate().context("[ra]")?;
        if ra.local_addr != ta.local_addr {
            anyhow::bail!(
                "[ra] local_addr = {} differs from [ta] local_addr = {}: both parts serve one VM",
                ra.local_addr,
                ta.local_addr
            );
        }
        if ra.tun_name == ta.tun_name {
            anyhow::bail!(
                "[ra] tun_name = {:?} is also [ta] tun_name: each part needs its own TUN device",
                ra.tun_name
            );
        }
        // The RA takes the VM's identity from the TA in this process: a
        // second directory would name keys nobody uses.
        if ra.state_dir.is_some() && ra.state_dir() != ta.state_dir() {
            anyhow::bail!(
                "[ra] state_dir: the agent's RA uses the TA's identity ([ta] state_dir); leave it out"
            );
        }
        let mut endpoints: Vec<(&str, SocketAddr)> = vec![];
        for (name, addr) in [
            ("metrics", Some(self.metrics_addr())),
            ("[ta] metrics", ta.metrics),
            ("[ra] metrics", ra.metrics),
        ] {
            let Some(addr) = addr else { continue };
            if let Some((other, _)) = endpoints.iter().find(|(_, a)| *a == addr) {
                anyhow::bail!(
                    "{name} = {addr} is also {other}: each endpoint needs its own address"
                );
            }
            endpoints.push((name, addr));
        }
        Ok(())
    }

    /// Where both parts' metrics are served.
    pub fn metrics_addr(&self) -> SocketAddr {
        pon_telemetry::metrics_addr(self.metrics, pon_telemetry::metrics_port::AGENT)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tun_mtu_leaves_room_for_the_longest_route() {
        let c: TaConfig =
            toml::from_str("local_addr = \"198.18.1.11\"\nforwarder = \"198.18.1.1\"").unwrap();
        c.validate().unwrap();
        // 1500 - (20 IPv4 + 8 UDP + 16 PON + 4x4 hops + 2x12 sessions + 2x16 tags)
        assert_eq!(c.tun_mtu(), 1384);
        let c = TaConfig { max_hops: 9, ..c };
        assert!(c.validate().is_err());
        let c = TaConfig {
            max_hops: 4,
            mtu: Some(1481),
            ..c
        };
        assert!(c
            .validate()
            .unwrap_err()
            .to_string()
            .contains("at most 1480"));
        let udp = TaConfig {
            encap: EncapKind::Udp,
            ..c
        };
        assert!(udp
            .validate()
            .unwrap_err()
            .to_string()
            .contains("at most 1436"));
    }

    const AGENT: &str = r#"
metrics = "198.18.1.11:9105"
[ta]
local_addr = "198.18.1.11"
forwarder = "198.18.1.1"
state_dir = "state"
[ra]
proxy = "198.18.1.1"
local_addr = "198.18.1.11"
"#;

    /// `AGENT` with `from` replaced by `to`, parsed: the error's whole chain.
    fn agent_error(from: &str, to: &str) -> String {
        assert!(AGENT.contains(from), "{from}");
        format!(
            "{:#}",
            AgentConfig::parse(&AGENT.replacen(from, to, 1)).unwrap_err()
        )
    }

    #[test]
    fn agent_config_is_the_two_parts_with_their_defaults() {
        let c = AgentConfig::parse(AGENT).unwrap();
        assert_eq!(c.metrics_addr().to_string(), "198.18.1.11:9105");
        assert_eq!(
            (c.ta.tun_name.as_str(), c.ra.tun_name.as_str()),
            ("ponta0", "ponra0")
        );
        assert_eq!(c.ta.tun_mtu(), 1384);
        assert_eq!(c.ra.udp_port, pon_proto::ports::RA_UDP);
        let c =
            AgentConfig::parse(&AGENT.replacen("metrics = \"198.18.1.11:9105\"", "", 1)).unwrap();
        assert_eq!(
            c.metrics_addr(),
            SocketAddr::from(([127, 0, 0, 1], pon_telemetry::metrics_port::AGENT)),
            "loopback unless told"
        );
    }

    #[test]
    fn agent_config_errors_name_the_table_and_field() {
        for (from, to, want) in [
            // Each part's own checks, under its table's name.
            ("[ra]\n", "[ra]\nudp = 1\n", "unknown field `udp`"),
            ("[ta]\n", "[ta]\nmax_hops = 9\n", "[ta]: max_hops = 9"),
            (
                "[ra]\n",
                "[ra]\ntun_name = \"a/b\"\n",
                "[ra]: tun_name \"a/b\"",
            ),
            (
                "forwarder = \"198.18.1.1\"\n",
                "",
                "[ta]: forwarder is required",
            ),
            (
                "[ra]\nproxy = \"198.18.1.1\"\n",
                "[ra]\n",
                "missing field `proxy`",
            ),
            ("metrics", "metric", "unknown field `metric`"),
            // What one process running both needs.
            (
                "proxy = \"198.18.1.1\"\nlocal_addr = \"198.18.1.11\"",
                "proxy = \"198.18.1.1\"\nlocal_addr = \"198.18.1.12\"",
                "[ra] local_addr = 198.18.1.12 differs from [ta] local_addr",
            ),
            (
                "[ra]\n",
                "[ra]\ntun_name = \"ponta0\"\n",
                "[ra] tun_name = \"ponta0\" is also [ta] tun_name",
            ),
            ("[ra]\n", "[ra]\nstate_dir = \"other\"\n", "[ra] state_dir"),
            (
                "[ra]\n",
                "[ra]\nmetrics = \"198.18.1.11:9105\"\n",
                "[ra] metrics = 198.18.1.11:9105 is also metrics",
            ),
        ] {
            let e = agent_error(from, to);
            assert!(e.contains(want), "{from:?} -> {to:?}: {e}");
        }
        let e = format!(
            "{:#}",
            AgentConfig::parse("[ta]\nlocal_addr = \"198.18.1.11\"\nforwarder = \"198.18.1.1\"\n")
                .unwrap_err()
        );
        assert!(e.contains("missing field `ra`"), "{e}");
        // The RA may name the TA's directory: one identity all the same.
        AgentConfig::parse(&AGENT.replacen("[ra]\n", "[ra]\nstate_dir = \"state\"\n", 1)).unwrap();
    }

    #[test]
    fn agent_config_file_errors_name_the_file_and_paths_are_relative_to_it() {
        let dir = std::env::temp_dir().join(format!("pon-agent-config-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("agent.toml");
        std::fs::write(&path, AGENT).unwrap();
        let c = AgentConfig::load(&path).unwrap();
        assert_eq!(c.ta.state_dir(), dir.join("state"));
        assert_eq!(c.ra.state_dir, None, "the RA uses the TA's identity");
        std::fs::write(&path, AGENT.replacen("[ra]\n", "[ra]\nudp = 1\n", 1)).unwrap();
        let e = format!("{:#}", AgentConfig::load(&path).unwrap_err());
        assert!(
            e.contains(&format!("in agent config {}", path.display())),
            "{e}"
        );
        assert!(e.contains("udp"), "{e}");
        let missing = dir.join("none.toml");
        let e = format!("{:#}", AgentConfig::load(&missing).unwrap_err());
        assert!(
            e.contains(&format!("reading agent config {}", missing.display())),
            "{e}"
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn unknown_fields_are_named() {
        let e = toml::from_str::<RaConfig>(
            "proxy = \"198.18.1.1\"\nlocal_addr = \"198.18.1.11\"\nudp = 1",
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("udp"), "{e}");
    }
}
