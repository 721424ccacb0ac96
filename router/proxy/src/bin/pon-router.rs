//! pon-router: the proxy's router as a process of its own.

use pon_proxy::config::RouterDaemonConfig;
use pon_proxy::core::{Part, RouterPart};
use pon_proxy::daemon::{self, LocalAddrs, StatusOf};
use std::sync::Arc;
use std::time::Duration;

const ABOUT: &str = "Chooses each destination proxy's path within a probe budget (probes run \
by pon-monitor), fails over when the current path dies, and sends the routes, and the \
destinations to leave to the IP path, to the local pon-forwarder (configured with a [local] \
section). Configuration: listen, forwarder, monitor, metrics, keepalive_ms, [routing].";

fn main() -> anyhow::Result<()> {
    let args = pon_telemetry::daemon_args!(ABOUT);
    let cfg = RouterDaemonConfig::load(&args.config)?;
    let addrs = LocalAddrs {
        forwarder: cfg.forwarder,
        monitor: cfg.monitor,
        router: cfg.listen,
    };
    let status = StatusOf {
        every: Duration::from_millis(250),
        build: RouterPart::status,
    };
    let part = RouterPart::new(cfg.part(), Arc::default());
    let metrics = pon_telemetry::metrics_addr(cfg.metrics, pon_telemetry::metrics_port::ROUTER);
    daemon::run_part(&args, Part::Router, addrs, metrics, part, status)
}
