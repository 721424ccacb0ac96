//! pon-router: the proxy's router as a process of its own.

use pon_proxy::config::RouterDaemonConfig;
use pon_proxy::core::{Part, RouterPart};
use pon_proxy::daemon::{self, StatusOf};
use std::sync::Arc;
use std::time::Duration;

const ABOUT: &str = "Chooses each destination proxy's path within a probe budget (probes run \
by pon-monitor), fails over when the current path dies, and sends the routes, and the \
destinations to leave to the IP path, to the local pon-forwarder (configured with a [local] \
section). Configuration: listen, forwarder, forwarder_key, monitor, monitor_key, state_dir, \
metrics, keepalive_ms, [routing].";

fn main() -> anyhow::Result<()> {
    let args = pon_telemetry::daemon_args!(ABOUT);
    let cfg = RouterDaemonConfig::load(&args.config)?;
    if args.check_done() {
        return Ok(());
    }
    let (epoch, _) = daemon::run_ids();
    let link = cfg.link(epoch)?;
    let status = StatusOf {
        every: Duration::from_millis(250),
        build: RouterPart::status,
    };
    let part = RouterPart::new(cfg.part(), Arc::default());
    let metrics = pon_telemetry::metrics_addr(cfg.metrics, pon_telemetry::metrics_port::ROUTER);
    daemon::run_part(Part::Router, link, metrics, part, status)
}
