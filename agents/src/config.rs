//! TOML configuration of the TA and the RA.

use anyhow::Context;
use ipnet::IpNet;
use pon_proto::{Encap, EncapKind};
use serde::{Deserialize, Serialize};
use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};

#[derive(Debug, Clone, Serialize, Deserialize)]
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
    #[serde(default = "pon_proto::ports::defaults::agent_udp")]
    pub forwarder_udp_port: u16,
    /// MTU of the underlay; the TUN MTU is derived from it.
    #[serde(default = "pon_proto::ports::defaults::underlay_mtu")]
    pub underlay_mtu: u16,
    /// Longest source route the overlay may use; sizes the TUN MTU.
    #[serde(default = "default_max_hops")]
    pub max_hops: u8,
    /// Overrides the derived TUN MTU (larger values make the forwarder send
    /// ICMP "fragmentation needed" instead of the local stack refusing).
    #[serde(default)]
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
    pub state_dir: Option<PathBuf>,
    /// UDP port on which the local proxy's router says which destinations
    /// the overlay cannot reach (left to the IP path meanwhile); 0: off.
    #[serde(default = "pon_proto::ports::defaults::steering")]
    pub steering_port: u16,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RaConfig {
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
        pon_telemetry::load_toml(path, "TA").and_then(|mut c: Self| {
            c.validate()
                .with_context(|| format!("in TA config {}", path.display()))?;
            c.cu = c.cu.map(|cu| cu.relative_to(path));
            c.state_dir = c.state_dir.map(|d| pon_identity::relative_to(d, path));
            Ok(c)
        })
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
        pon_telemetry::load_toml(path, "RA").and_then(|mut c: Self| {
            check_tun_name(&c.tun_name)
                .with_context(|| format!("in RA config {}", path.display()))?;
            c.state_dir = c.state_dir.map(|d| pon_identity::relative_to(d, path));
            Ok(c)
        })
    }

    /// The directory of this VM's identity (the TA's).
    pub fn state_dir(&self) -> PathBuf {
        pon_identity::state_dir_or_default(self.state_dir.as_deref(), "ta")
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
