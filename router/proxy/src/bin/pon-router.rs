//! pon-router: the proxy's router as a process of its own.

use anyhow::Context;
use arc_swap::ArcSwap;
use clap::Parser;
use pon_proxy::config::RouterDaemonConfig;
use pon_proxy::core::{Part, RouterPart};
use pon_proxy::daemon::{self, EventLoop, Link};
use pon_telemetry::PromWriter;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

/// Chooses each destination proxy's path within a probe budget (probes run
/// by pon-monitor), fails over when the current path dies, and sends the
/// routes, and the destinations to leave to the IP path, to the local
/// pon-forwarder (configured with a [local] section).
#[derive(Parser)]
#[command(version, about, long_about)]
struct Args {
    /// TOML configuration: listen, forwarder, monitor, metrics, keepalive_ms, [routing].
    #[arg(long, short)]
    config: PathBuf,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    pon_telemetry::init_logging();
    let cfg = RouterDaemonConfig::load(&args.config)?;
    let partners = daemon::partners(Part::Router, cfg.forwarder, cfg.monitor, cfg.listen);
    let link =
        Link::bind(cfg.listen, partners).with_context(|| format!("binding {}", cfg.listen))?;
    let (mailbox, inbox) = daemon::mailbox(4096, 1);
    link.spawn_reader(mailbox.clone())?;
    let part = RouterPart::new(cfg.part());
    let status = Arc::new(ArcSwap::from_pointee(part.status(Duration::ZERO)));
    if let Some(addr) = cfg.metrics {
        let (lc, pc) = (link.counters.clone(), part.counters.clone());
        let (mbc, st) = (mailbox.counters.clone(), status.clone());
        let render = move |w: &mut PromWriter| {
            lc.render(w);
            pc.render(w);
            mbc.render(w);
            st.load().render(w);
        };
        daemon::serve_status(addr, render, status.clone())?;
    }
    tracing::info!(listen = %cfg.listen, forwarder = %cfg.forwarder, monitor = %cfg.monitor, "router running");
    drop(mailbox);
    let publish = Box::new(move |r: &RouterPart, now| status.store(Arc::new(r.status(now))));
    EventLoop::over_link(part, inbox, link, publish, Duration::from_millis(250)).run();
    Ok(())
}
