//! pon-proxy: forwarder, monitor and router of one proxy in one process.

use arc_swap::ArcSwap;
use clap::Parser;
use pon_proxy::daemon::{self, EventLoop, Io};
use pon_proxy::forwarder::{io, Engine};
use pon_proxy::{ProxyConfig, ProxyCore};
use pon_telemetry::PromWriter;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

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
    let fcfg = &cfg.forwarder;
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
    let (mailbox, inbox) = daemon::mailbox(cfg.control.queue, cfg.control.queue);
    let sockets = Arc::new(daemon::open_sockets(fcfg, Some(mailbox.sink()))?);
    let (epoch, session) = daemon::run_ids();
    let core = ProxyCore::new(&cfg, session, epoch);
    let start = Instant::now();
    let status = Arc::new(ArcSwap::from_pointee(core.status(Duration::ZERO)));
    let counters = (
        core.forwarder().counters.clone(),
        core.monitor().monitor().counters.clone(),
        core.router().map(|r| r.counters.clone()),
        mailbox.counters.clone(),
    );
    let io = Io {
        sockets: Some(sockets.clone()),
        table: Some(shared.clone()),
        steering: daemon::steering_socket(fcfg, cfg.control.steering_port)?,
        ..Io::default()
    };
    let loop_counters = io.counters.clone();
    // CU mode: views go to the control thread, the one writer of the table.
    let cu_status = daemon::start_cu(fcfg, &mailbox)?;
    let st = status.clone();
    EventLoop {
        core,
        inbox,
        io,
        publish: Box::new(move |c: &ProxyCore, now| st.store(Arc::new(c.status(now)))),
        status_every: Duration::from_millis(cfg.control.status_every_ms),
        start,
    }
    .spawn("proxy-control")?;
    drop(mailbox);
    if let Some(addr) = fcfg.metrics {
        let engine_counters = engine.counters.clone();
        let table = shared.clone();
        let st = status.clone();
        let render = move |w: &mut PromWriter| {
            engine_counters.render(w);
            if let Some(s) = &cu_status {
                s.render(w);
            }
            counters.0.render(w);
            counters.1.render(w);
            if let Some(r) = &counters.2 {
                r.render(w);
            }
            counters.3.render(w);
            loop_counters.render(w);
            st.load().render(w);
            table.load().render(w);
        };
        daemon::serve_status(addr, render, status)?;
    }
    tracing::info!(id = ?fcfg.id, cu = ?fcfg.cu.as_ref().map(|c| c.addr), listen = %fcfg.listen, routing = cfg.routing.is_some(), "proxy running");
    for t in io::spawn(engine, sockets)? {
        let _ = t.join();
    }
    Ok(())
}
