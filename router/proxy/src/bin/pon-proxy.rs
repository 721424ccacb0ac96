//! pon-proxy: forwarder, monitor and router of one proxy in one process.

use anyhow::Context;
use arc_swap::ArcSwap;
use clap::Parser;
use pon_proxy::forwarder::{io, Engine};
use pon_proxy::run::{self, ControlThread, Event, RunCounters};
use pon_proxy::{Control, ProxyConfig};
use pon_telemetry::PromWriter;
use std::net::{SocketAddr, SocketAddrV4};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

/// Runs a PON proxy: the forwarder (ingress, transit, egress of application
/// packets), the monitor (probes to other proxies' monitors, answers to
/// theirs) and the router (picks each destination's path within a probe
/// budget, writes it into the forwarding table, fails over, and tells the
/// local TAs which destinations to leave to the IP path).
#[derive(Parser)]
#[command(version, about, long_about)]
struct Args {
    /// TOML configuration: a forwarder configuration plus optional
    /// [routing], [monitor] and [proxy] sections.
    #[arg(long, short)]
    config: PathBuf,
    /// Validate the configuration and exit.
    #[arg(long)]
    check: bool,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    pon_telemetry::init_logging();
    let cfg = ProxyConfig::load(&args.config)?;
    let fcfg = cfg.forwarder.clone();
    let table = fcfg.table()?;
    if args.check {
        println!(
            "{}: ok ({} peers, routing {})",
            args.config.display(),
            table.peer_count(),
            if cfg.routing.is_some() { "on" } else { "off" }
        );
        return Ok(());
    }
    let shared = Arc::new(ArcSwap::from_pointee(table));
    let engine = Arc::new(
        Engine::new(
            shared.clone(),
            fcfg.local_addr,
            fcfg.underlay_mtu,
            fcfg.hop_limit,
        )
        .with_monitor(),
    );
    let run_counters = Arc::new(RunCounters::default());
    let (tx, rx, sink) = run::channel(cfg.control.queue, run_counters.clone());
    let agent_udp = match fcfg.agent_udp_port {
        0 => None,
        port => {
            let bind = SocketAddr::V4(SocketAddrV4::new(fcfg.local_addr, port));
            Some(
                pon_netio::udp::UdpIo::bind(bind)
                    .with_context(|| format!("binding agent UDP socket {bind}"))?,
            )
        }
    };
    let sockets = Arc::new(io::Sockets {
        peer: pon_netio::udp::UdpIo::bind(fcfg.listen)
            .with_context(|| format!("binding {}", fcfg.listen))?,
        ipip_rx: pon_netio::IpipReceiver::open()
            .context("opening raw IP-in-IP socket (needs CAP_NET_RAW)")?,
        raw_tx: pon_netio::RawSender::open()
            .context("opening raw send socket (needs CAP_NET_RAW)")?,
        agent_udp,
        max_datagram: usize::from(fcfg.underlay_mtu) - pon_proto::ip::UDP_OVERHEAD,
        monitor: Some(sink),
    });
    let steering = match cfg.control.steering_port {
        0 => None,
        port => {
            let bind = SocketAddr::V4(SocketAddrV4::new(fcfg.local_addr, 0));
            let s = std::net::UdpSocket::bind(bind)
                .with_context(|| format!("binding steering socket {bind}"))?;
            Some((s, port))
        }
    };
    // Distinct per run, so replies and steering of a previous run are ignored.
    let epoch = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(1, |d| d.as_nanos() as u64);
    let session = (epoch ^ (epoch >> 32) ^ u64::from(std::process::id())) as u32;
    let control = Control::new(&cfg, session, epoch);
    let start = Instant::now();
    let status = Arc::new(ArcSwap::from_pointee(control.status(start.elapsed())));
    // CU mode: views go to the control thread, the one writer of the table.
    let views = tx.clone();
    let cu_status = pon_proxy::forwarder::cu::start_with(
        &fcfg,
        Box::new(move |v| {
            let _ = views.send(Event::View(Box::new(v.clone())));
        }),
    )?;
    drop(tx);
    let monitor_counters = control.monitor.counters.clone();
    let control_counters = control.counters.clone();
    ControlThread {
        control,
        events: rx,
        sockets: sockets.clone(),
        table: shared.clone(),
        status: status.clone(),
        status_every: std::time::Duration::from_millis(cfg.control.status_every_ms),
        steering,
        counters: run_counters.clone(),
        start,
    }
    .spawn()?;
    if let Some(addr) = fcfg.metrics {
        let counters = engine.counters.clone();
        let table = shared.clone();
        let st = status.clone();
        let render = Arc::new(move |w: &mut PromWriter| {
            counters.render(w);
            if let Some(s) = &cu_status {
                s.render(w);
            }
            run_counters.render(w);
            monitor_counters.render(w);
            control_counters.render(w);
            st.load().render(w);
            table.load().render(w);
        });
        let json =
            Arc::new(move || serde_json::to_string_pretty(&**status.load()).unwrap_or_default());
        pon_telemetry::serve_http(addr, render, Some(json))
            .with_context(|| format!("serving metrics on {addr}"))?;
    }
    tracing::info!(id = ?fcfg.id, cu = ?fcfg.cu.as_ref().map(|c| c.addr), listen = %fcfg.listen, routing = cfg.routing.is_some(), "proxy running");
    for t in io::spawn(engine, sockets)? {
        let _ = t.join();
    }
    Ok(())
}
