//! pon-monitor: the proxy's monitor as a process of its own.

use pon_proxy::config::MonitorDaemonConfig;
use pon_proxy::core::{MonitorPart, Part};
use pon_proxy::daemon::{self, StatusOf};
use std::sync::Arc;
use std::time::Duration;

const ABOUT: &str = "Measures overlay paths to other proxies with probe packets (RTT \
percentiles, jitter, loss, bandwidth on demand) at the rates pon-router asks for, and answers \
other monitors' probes; its packets enter and leave through the local pon-forwarder \
(configured with a [local] section). Configuration: listen, forwarder, forwarder_key, router, \
router_key, state_dir, metrics, [monitor].";

fn main() -> anyhow::Result<()> {
    let args = pon_telemetry::daemon_args!(ABOUT);
    let cfg = MonitorDaemonConfig::load(&args.config)?;
    if args.check_done() {
        return Ok(());
    }
    let (epoch, session) = daemon::run_ids();
    let part = MonitorPart::new(session, cfg.monitor.clone(), Arc::default());
    let every = Duration::from_millis(500);
    let status = StatusOf {
        every,
        build: MonitorPart::status,
    };
    let link = cfg.link(epoch)?;
    let metrics = pon_telemetry::metrics_addr(cfg.metrics, pon_telemetry::metrics_port::MONITOR);
    daemon::run_part(Part::Monitor, link, metrics, part, status)
}
