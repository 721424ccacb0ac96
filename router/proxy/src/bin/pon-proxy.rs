//! pon-proxy: forwarder, monitor and router of one proxy in one process.

use pon_proxy::daemon::{self, StatusOf};
use pon_proxy::{ProxyConfig, ProxyCore};
use std::time::Duration;

const ABOUT: &str = "Runs a PON proxy: the forwarder (ingress, transit, egress of application \
packets), the monitor (probes to other proxies' monitors, answers to theirs) and the router \
(picks each destination's path within a probe budget, writes it into the forwarding table, \
fails over, and tells the local TAs which destinations to leave to the IP path). The \
configuration is a forwarder's plus optional [routing], [monitor] and [proxy] sections.";

fn main() -> anyhow::Result<()> {
    let args = pon_telemetry::daemon_args!(ABOUT);
    let cfg = ProxyConfig::load(&args.config)?;
    let table = cfg.forwarder.table()?;
    if args.check {
        let routing = if cfg.routing.is_some() { "on" } else { "off" };
        let (path, peers) = (args.config.display(), table.peer_count());
        println!("{path}: ok ({peers} peers, routing {routing})");
        return Ok(());
    }
    let (epoch, session) = daemon::run_ids();
    let status = StatusOf {
        every: Duration::from_millis(cfg.control.status_every_ms),
        build: |c: &ProxyCore, now| c.status(now),
    };
    let key = daemon::private_key(&cfg.forwarder)?;
    let core = ProxyCore::new(&cfg, session, epoch, key);
    let c = &cfg.control;
    let pmon = daemon::LocalPmon::start(&cfg)?;
    daemon::run_data_plane(
        &cfg.forwarder,
        core,
        None,
        c.queue,
        c.steering_port,
        status,
        pmon,
    )
}
