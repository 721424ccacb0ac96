//! pon-ra: the reception agent of an app VM.

use anyhow::Context;
use pon_agents::config::RaConfig;
use pon_agents::io::{run_ra_ipip, run_ra_udp};
use pon_agents::ra::{Decapsulator, RaCounters};
use pon_telemetry::PromWriter;
use std::net::{SocketAddr, SocketAddrV4};
use std::sync::Arc;
use std::thread;

/// The VM's identity, once the TA has made it (the RA never makes one: two
/// processes making keys in one directory could disagree).
fn wait_for_identity(dir: &std::path::Path) -> anyhow::Result<pon_identity::Identity> {
    let mut warned = false;
    loop {
        if dir.join(pon_identity::NOISE_KEY).exists() {
            return pon_identity::Identity::load_or_create(dir)
                .map_err(|e| anyhow::anyhow!("state_dir {}: {e}", dir.display()));
        }
        if !warned {
            tracing::info!(dir = %dir.display(), "waiting for the TA to make this VM's keys");
            warned = true;
        }
        thread::sleep(std::time::Duration::from_millis(200));
    }
}

fn main() -> anyhow::Result<()> {
    let args = pon_telemetry::daemon_args!(
        "Receives packets from the local PON proxy (IP-in-IP, or UDP) and delivers \
         them to this VM's network stack through a TUN device."
    );
    let cfg = RaConfig::load(&args.config)?;
    if args.check_done() {
        return Ok(());
    }
    let tun = Arc::new(pon_agents::tun::open(
        &cfg.tun_name,
        1500,
        Some(cfg.tun_addr),
        cfg.offload,
    )?);
    // Delivered packets arrive on this TUN while replies leave by the TA's:
    // strict reverse-path filtering would drop them; loose mode keeps the
    // spoofing check (the effective mode is the max of "all" and this one)
    // and needs the TUN to have an address (`tun_addr`).
    pon_netio::write_sysctl(&format!("net/ipv4/conf/{}/rp_filter", cfg.tun_name), "2")?;
    let counters = Arc::new(RaCounters::default());
    {
        let addr = pon_telemetry::metrics_addr(cfg.metrics, pon_telemetry::metrics_port::RA);
        let c = counters.clone();
        pon_telemetry::serve_metrics(addr, Arc::new(move |w: &mut PromWriter| c.render(w)))
            .with_context(|| format!("serving metrics on {addr}"))?;
    }

    // The UDP leg is sealed with the key this VM shares with its proxy:
    // the VM's identity is the TA's (one key per app VM, the one the CU
    // vouches for), read from the TA's state directory.
    let link = match cfg.proxy_key {
        Some(proxy_key) if cfg.udp_port != 0 => {
            let identity = wait_for_identity(&cfg.state_dir())?;
            let link = pon_tunnel::lan::PairKey::for_agent(&identity.noise_secret(), &proxy_key.0)
                .map(|p| p.receiver(pon_tunnel::lan::Channel::Downlink));
            if link.is_none() {
                anyhow::bail!("proxy_key shares no secret with this VM's key");
            }
            link
        }
        Some(_) => None,
        None => {
            if cfg.udp_port != 0 {
                tracing::warn!("no proxy_key: the UDP leg accepts nothing");
            }
            None
        }
    };
    let dec = Arc::new(Decapsulator {
        proxy: cfg.proxy,
        local: cfg.local_addr,
        link,
    });
    let ipip = pon_netio::IpipReceiver::open()
        .context("opening raw IP-in-IP socket (needs CAP_NET_RAW)")?;
    if cfg.udp_port != 0 {
        let bind = SocketAddr::V4(SocketAddrV4::new(cfg.local_addr, cfg.udp_port));
        let udp = pon_netio::udp::UdpIo::bind(bind).with_context(|| format!("binding {bind}"))?;
        let (tun, dec, c) = (tun.clone(), dec.clone(), counters.clone());
        thread::Builder::new()
            .name("ra-udp".into())
            .spawn(move || run_ra_udp(&udp, &tun, &dec, &c))?;
    }
    tracing::info!(tun = %cfg.tun_name, proxy = %cfg.proxy, udp_port = cfg.udp_port, "RA running");
    run_ra_ipip(&ipip, &tun, &dec, &counters)
}
