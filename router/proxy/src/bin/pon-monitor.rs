//! pon-monitor: the proxy's monitor as a process of its own.

use anyhow::Context;
use clap::Parser;
use pon_monitor::Monitor;
use pon_proxy::split::link::Link;
use pon_proxy::split::monitor::{MonitorDaemon, MonitorDaemonConfig, MonitorStatus};
use pon_telemetry::PromWriter;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

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
    let link = Link::bind(cfg.listen).with_context(|| format!("binding {}", cfg.listen))?;
    let session = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(1, |d| d.subsec_nanos() ^ std::process::id());
    // The id comes with the forwarder's first topology message.
    let monitor = Monitor::new(0, session, cfg.monitor.clone());
    let status = Arc::new(Mutex::new(MonitorStatus::default()));
    if let Some(addr) = cfg.metrics {
        let (mc, lc, st) = (
            monitor.counters.clone(),
            link.counters.clone(),
            status.clone(),
        );
        let render = Arc::new(move |w: &mut PromWriter| {
            mc.render(w);
            lc.render(w);
        });
        let json = Arc::new(move || {
            let s = st.lock().unwrap_or_else(|p| p.into_inner());
            serde_json::to_string_pretty(&*s).unwrap_or_default()
        });
        pon_telemetry::serve_http(addr, render, Some(json))
            .with_context(|| format!("serving metrics on {addr}"))?;
    }
    tracing::info!(listen = %cfg.listen, forwarder = %cfg.forwarder, router = %cfg.router, "monitor running");
    MonitorDaemon {
        cfg,
        monitor,
        link,
        status,
    }
    .run()
}
