//! pon-forwarder: the PON data path of one proxy.

use pon_proxy::core::{ForwarderPart, ForwarderPartConfig, Part};
use pon_proxy::daemon::{self, LinkSetup, Partner, StatusOf};
use pon_proxy::forwarder::ForwarderConfig;
use std::sync::Arc;
use std::time::Duration;

const ABOUT: &str = "Forwards application packets through the PON overlay: from local \
transmission agents into the overlay (ingress), between proxies along the source route in the \
PON header (transit), and out to the destination's reception agent (egress). With a [local] \
section, pon-monitor and pon-router run as separate processes and talk to it over a local link.";

/// The steering refresh when the router runs apart (the TAs' lease).
const STEERING_REFRESH: Duration = Duration::from_millis(pon_proxy::config::STEERING_REFRESH_MS);

fn main() -> anyhow::Result<()> {
    let args = pon_telemetry::daemon_args!(ABOUT);
    let cfg = ForwarderConfig::load(&args.config)?;
    let table = cfg.table()?;
    if args.check {
        let (path, peers) = (args.config.display(), table.peer_count());
        println!("{path}: ok ({peers} peers)");
        return Ok(());
    }
    // Alone (no [local] router), it steers in CU mode only: its TAs
    // intercept every cloud's grant, and the clouds without a proxy are its
    // to name.
    let alone = if cfg.cu.is_some() {
        pon_proto::ports::STEERING
    } else {
        0
    };
    let steering_port = cfg.local.as_ref().map_or(alone, |l| l.steering_port);
    let (epoch, _) = daemon::run_ids();
    let private_key = daemon::private_key(&cfg)?;
    let link = cfg.local.as_ref().map(|l| LinkSetup {
        listen: l.listen,
        secret: private_key,
        epoch,
        partners: vec![
            Partner {
                part: Part::Monitor,
                addr: l.monitor,
                key: l.monitor_key,
            },
            Partner {
                part: Part::Router,
                addr: l.router,
                key: l.router_key,
            },
        ],
    });
    let part_cfg = ForwarderPartConfig {
        forwarder: cfg.clone(),
        epoch,
        steering_port,
        steering_refresh: STEERING_REFRESH,
        private_key,
        timers: cfg.tunnel.timers(),
    };
    let part = ForwarderPart::new(part_cfg, Arc::default());
    let status = StatusOf {
        every: Duration::from_secs(1),
        build: |f: &ForwarderPart, now| f.status(now),
    };
    daemon::run_data_plane(&cfg, part, link, 4096, steering_port, status, None)
}
