//! pon-ta: the transmission agent of an app VM.

use anyhow::Context;
use clap::Parser;
use pon_agents::config::TaConfig;
use pon_agents::interception::Interception;
use pon_agents::io::{run_ta, TaUplink};
use pon_agents::ta::{Encapsulator, TaCounters};
use pon_agents::Encap;
use pon_telemetry::PromWriter;
use std::net::{SocketAddr, SocketAddrV4};
use std::path::PathBuf;
use std::sync::Arc;

/// Captures this VM's packets for overlay destinations through a TUN device
/// and sends them, IP-in-IP (or UDP), to the local PON forwarder.
#[derive(Parser)]
#[command(version, about, long_about)]
struct Args {
    /// TOML configuration: local address, forwarder, encapsulation, intercepted prefixes.
    #[arg(long, short)]
    config: PathBuf,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    pon_telemetry::init_logging();
    let cfg = TaConfig::load(&args.config)?;
    let mtu = cfg.tun_mtu();
    let tun = pon_agents::tun::open(&cfg.tun_name, mtu, None, cfg.offload)?;
    let counters = Arc::new(TaCounters::default());

    let mut interception = Interception::new(&cfg.tun_name, cfg.local_addr);
    interception.apply(&cfg.intercept)?;

    if let Some(addr) = cfg.metrics {
        let c = counters.clone();
        let intercepted = interception.active().len() as f64;
        pon_telemetry::serve_metrics(
            addr,
            Arc::new(move |w: &mut PromWriter| {
                c.render(w);
                w.gauge(
                    "pon_ta_tun_mtu",
                    "",
                    "MTU of the TA's TUN device.",
                    f64::from(mtu),
                );
                w.gauge(
                    "pon_ta_intercepted_prefixes",
                    "",
                    "Destination prefixes routed into the overlay.",
                    intercepted,
                );
            }),
        )
        .with_context(|| format!("serving metrics on {addr}"))?;
    }

    let enc = Encapsulator {
        local: cfg.local_addr,
        forwarder: cfg.forwarder,
        encap: cfg.encap,
    };
    let uplink = match cfg.encap {
        Encap::Ipip => TaUplink::Ipip(
            pon_netio::RawSender::open().context("opening raw socket (needs CAP_NET_RAW)")?,
        ),
        Encap::Udp => TaUplink::Udp {
            io: pon_netio::udp::UdpIo::bind(SocketAddr::V4(SocketAddrV4::new(cfg.local_addr, 0)))?,
            forwarder: SocketAddr::V4(SocketAddrV4::new(cfg.forwarder, cfg.forwarder_udp_port)),
        },
    };
    tracing::info!(tun = %cfg.tun_name, mtu, forwarder = %cfg.forwarder, encap = ?cfg.encap, "TA running");
    run_ta(&tun, mtu, &enc, &uplink, &counters)
}
