//! pon-monitor: the proxy's monitor as a process of its own.

use anyhow::Context;
use arc_swap::ArcSwap;
use clap::Parser;
use pon_proxy::config::MonitorDaemonConfig;
use pon_proxy::core::{MonitorPart, MonitorStatus, Part};
use pon_proxy::daemon::{self, EventLoop, Link};
use pon_telemetry::PromWriter;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

/// Measures overlay paths to other proxies with probe packets (RTT
/// percentiles, jitter, loss, bandwidth on demand) at the rates pon-router
/// asks for, and answers other monitors' probes; its packets enter and leave
/// through the local pon-forwarder (configured with a [local] section).
#[derive(Parser)]
#[command(version, about, long_about)]
struct Args {
    /// TOML configuration: listen, forwarder, router, metrics, [monitor].
    #[arg(long, short)]
    config: PathBuf,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    pon_telemetry::init_logging();
    let cfg = MonitorDaemonConfig::load(&args.config)?;
    let partners = daemon::partners(Part::Monitor, cfg.forwarder, cfg.listen, cfg.router);
    let link =
        Link::bind(cfg.listen, partners).with_context(|| format!("binding {}", cfg.listen))?;
    let (mailbox, inbox) = daemon::mailbox(4096, 1);
    link.spawn_reader(mailbox.clone())?;
    let (_, session) = daemon::run_ids();
    let part = MonitorPart::new(session, cfg.monitor.clone());
    let status = Arc::new(ArcSwap::from_pointee(MonitorStatus::default()));
    if let Some(addr) = cfg.metrics {
        let (mc, lc) = (part.monitor().counters.clone(), link.counters.clone());
        let (pc, mbc) = (part.counters.clone(), mailbox.counters.clone());
        let render = move |w: &mut PromWriter| {
            mc.render(w);
            pc.render(w);
            lc.render(w);
            mbc.render(w);
        };
        daemon::serve_status(addr, render, status.clone())?;
    }
    tracing::info!(listen = %cfg.listen, forwarder = %cfg.forwarder, router = %cfg.router, "monitor running");
    drop(mailbox);
    let publish = Box::new(move |m: &MonitorPart, now| status.store(Arc::new(m.status(now))));
    EventLoop::over_link(part, inbox, link, publish, Duration::from_millis(500)).run();
    Ok(())
}
