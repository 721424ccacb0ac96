//! TUN devices for the agents.

use anyhow::Context;
use tun_rs::{DeviceBuilder, SyncDevice};

/// Creates (or attaches to) TUN `name` with `mtu`, brings it up, and keeps
/// IPv6 off it so the kernel sends it no autoconfiguration chatter.
///
/// `addr` gives the device an IPv4 address of its own: the kernel's
/// reverse-path filter rejects every packet arriving on an interface that
/// has none, so a TUN that delivers packets needs one.
///
/// `offload` turns on the virtio-net header offloads (TSO/GSO/GRO); the
/// agents' loops (`crate::io`) handle both modes.
pub fn open(
    name: &str,
    mtu: u16,
    addr: Option<std::net::Ipv4Addr>,
    offload: bool,
) -> anyhow::Result<SyncDevice> {
    let mut builder = DeviceBuilder::new()
        .name(name)
        .mtu(mtu)
        .enable(true)
        .offload(offload);
    if let Some(a) = addr {
        builder = builder.ipv4(a, 32u8, None);
    }
    let dev = builder.build_sync().with_context(|| {
        format!("creating TUN device {name} (needs CAP_NET_ADMIN and /dev/net/tun)")
    })?;
    if let Err(e) = pon_netio::write_sysctl(&format!("net/ipv6/conf/{name}/disable_ipv6"), "1") {
        tracing::debug!(error = %e, "IPv6 already unavailable");
    }
    Ok(dev)
}
