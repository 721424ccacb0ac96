//! pon-forwarder: the PON data path of one proxy.

use anyhow::Context;
use arc_swap::ArcSwap;
use clap::Parser;
use pon_proxy::forwarder::{io, Engine, ForwarderConfig};
use pon_telemetry::PromWriter;
use std::net::{SocketAddr, SocketAddrV4};
use std::path::PathBuf;
use std::sync::Arc;

/// Forwards application packets through the PON overlay: from local
/// transmission agents into the overlay (ingress), between proxies along the
/// source route in the PON header (transit), and out to the destination's
/// reception agent (egress).
#[derive(Parser)]
#[command(version, about, long_about)]
struct Args {
    /// TOML configuration: id, listen address, peers, agents, destinations, routes.
    #[arg(long, short)]
    config: PathBuf,
    /// Validate the configuration and exit.
    #[arg(long)]
    check: bool,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    pon_telemetry::init_logging();
    let cfg = ForwarderConfig::load(&args.config)?;
    let table = cfg.table()?;
    if args.check {
        println!(
            "{}: ok ({} peers)",
            args.config.display(),
            table.peer_count()
        );
        return Ok(());
    }
    let engine = Engine::new(
        Arc::new(ArcSwap::from_pointee(table)),
        cfg.local_addr,
        cfg.underlay_mtu,
        cfg.hop_limit,
    );
    // [local]: pon-monitor and pon-router run as separate processes; probes
    // that end here go to the monitor, and one link thread owns the table.
    let split = match &cfg.local {
        Some(l) => Some(
            pon_proxy::split::forwarder::Split::new(l)
                .with_context(|| format!("binding the local link {}", l.listen))?,
        ),
        None => None,
    };
    let engine = Arc::new(if split.is_some() {
        engine.with_monitor()
    } else {
        engine
    });
    let agent_udp = match cfg.agent_udp_port {
        0 => None,
        port => {
            let bind = SocketAddr::V4(SocketAddrV4::new(cfg.local_addr, port));
            Some(
                pon_netio::udp::UdpIo::bind(bind)
                    .with_context(|| format!("binding agent UDP socket {bind}"))?,
            )
        }
    };
    let sockets = Arc::new(io::Sockets {
        peer: pon_netio::udp::UdpIo::bind(cfg.listen)
            .with_context(|| format!("binding {}", cfg.listen))?,
        ipip_rx: pon_netio::IpipReceiver::open()
            .context("opening raw IP-in-IP socket (needs CAP_NET_RAW)")?,
        raw_tx: pon_netio::RawSender::open()
            .context("opening raw send socket (needs CAP_NET_RAW)")?,
        agent_udp,
        max_datagram: usize::from(cfg.underlay_mtu) - pon_proto::ip::UDP_OVERHEAD,
        // Without [local] there is no monitor (the engine drops probes that
        // end here); pon-proxy answers them in-process.
        monitor: split.as_ref().map(|s| s.sink.clone()),
    });
    // CU mode: the client thread swaps the table as the CU's view changes.
    let link_counters = split.as_ref().map(|s| s.counters());
    let cu_status = match split {
        Some(s) => s.start(&cfg, engine.table.clone(), sockets.clone())?,
        None => pon_proxy::forwarder::cu::start(&cfg, engine.table.clone())?,
    };
    if let Some(addr) = cfg.metrics {
        let cu_status = cu_status.clone();
        let counters = engine.counters.clone();
        let table = engine.table.clone();
        pon_telemetry::serve_metrics(
            addr,
            Arc::new(move |w: &mut PromWriter| {
                counters.render(w);
                if let Some(l) = &link_counters {
                    l.render(w);
                }
                if let Some(s) = &cu_status {
                    s.render(w);
                }
                table.load().render(w);
            }),
        )
        .with_context(|| format!("serving metrics on {addr}"))?;
    }
    tracing::info!(id = ?cfg.id, cu = ?cfg.cu.as_ref().map(|c| c.addr), listen = %cfg.listen, local = %cfg.local_addr, "forwarder running");
    for t in io::spawn(engine, sockets)? {
        let _ = t.join();
    }
    Ok(())
}
