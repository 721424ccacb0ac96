//! pon-router: the proxy's router as a process of its own.

use anyhow::Context;
use arc_swap::ArcSwap;
use clap::Parser;
use pon_proxy::control::{BudgetStatus, Status};
use pon_proxy::split::link::Link;
use pon_proxy::split::router::{RouterDaemon, RouterDaemonConfig};
use pon_telemetry::PromWriter;
use std::path::PathBuf;
use std::sync::Arc;

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
    let link = Link::bind(cfg.listen).with_context(|| format!("binding {}", cfg.listen))?;
    let status = Arc::new(ArcSwap::from_pointee(Status {
        id: 0,
        routing: false,
        destinations: vec![],
        budget: BudgetStatus {
            max_probes_per_sec: 0,
            probes_per_sec: 0.0,
            probes_sent: 0,
            probe_bytes_sent: 0,
            refused: 0,
            answered: 0,
            keepalive_ms: u64::from(cfg.keepalive_ms),
            interval_ms: Some(cfg.routing.interval_ms),
            probes_per_interval: Some(cfg.routing.probes_per_interval),
        },
    }));
    if let Some(addr) = cfg.metrics {
        let (lc, st) = (link.counters.clone(), status.clone());
        let render = Arc::new(move |w: &mut PromWriter| {
            lc.render(w);
            st.load().render(w);
        });
        let st = status.clone();
        let json = Arc::new(move || serde_json::to_string_pretty(&**st.load()).unwrap_or_default());
        pon_telemetry::serve_http(addr, render, Some(json))
            .with_context(|| format!("serving metrics on {addr}"))?;
    }
    tracing::info!(listen = %cfg.listen, forwarder = %cfg.forwarder, monitor = %cfg.monitor, "router running");
    RouterDaemon::new(cfg, link, status).run()
}
