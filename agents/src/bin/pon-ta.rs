//! pon-ta: the transmission agent of an app VM.

use anyhow::Context;
use clap::Parser;
use pon_agents::config::TaConfig;
use pon_agents::interception::Interception;
use pon_agents::ta::{Encapsulator, TaCounters};
use pon_agents::{Encap, BUFFER_LEN, HEADROOM};
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
    let tun = pon_agents::tun::open(&cfg.tun_name, mtu, None)?;
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
    let udp = match cfg.encap {
        Encap::Udp => Some(pon_netio::udp_socket(SocketAddr::V4(SocketAddrV4::new(
            cfg.local_addr,
            0,
        )))?),
        Encap::Ipip => None,
    };
    let raw = match cfg.encap {
        Encap::Ipip => {
            Some(pon_netio::RawSender::open().context("opening raw socket (needs CAP_NET_RAW)")?)
        }
        Encap::Udp => None,
    };
    let forwarder_udp = SocketAddr::V4(SocketAddrV4::new(cfg.forwarder, cfg.forwarder_udp_port));
    tracing::info!(tun = %cfg.tun_name, mtu, forwarder = %cfg.forwarder, encap = ?cfg.encap, "TA running");

    let mut buf = vec![0u8; BUFFER_LEN];
    loop {
        let n = match tun.recv(&mut buf[HEADROOM..]) {
            Ok(n) => n,
            Err(e) => {
                counters.rx_errors.inc();
                tracing::warn!(error = %e, "TUN read failed");
                continue;
            }
        };
        let Some(range) = enc.encapsulate(&mut buf, n, &counters) else {
            continue;
        };
        let sent = match (&raw, &udp) {
            (Some(raw), _) => raw.send_to(&buf[range], cfg.forwarder),
            (None, Some(udp)) => udp.send_to(&buf[range], forwarder_udp),
            (None, None) => unreachable!("one socket per encapsulation"),
        };
        if let Err(e) = sent {
            counters.tx_errors.inc();
            if counters.tx_errors.get().is_power_of_two() {
                tracing::warn!(error = %e, "send to forwarder failed");
            }
        }
    }
}
