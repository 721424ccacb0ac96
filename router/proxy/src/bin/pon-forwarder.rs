//! pon-forwarder: the PON data path of one proxy.

use anyhow::Context;
use arc_swap::ArcSwap;
use clap::Parser;
use pon_proxy::core::{ForwarderPart, ForwarderPartConfig, Part};
use pon_proxy::daemon::{self, EventLoop, Io, Link};
use pon_proxy::forwarder::{io, Engine, ForwarderConfig};
use pon_telemetry::PromWriter;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Forwards application packets through the PON overlay: from local
/// transmission agents into the overlay (ingress), between proxies along the
/// source route in the PON header (transit), and out to the destination's
/// reception agent (egress). With a [local] section, pon-monitor and
/// pon-router run as separate processes and talk to it over a local link.
#[derive(Parser)]
#[command(version, about, long_about)]
struct Args {
    /// TOML configuration: id, listen address, peers, agents, destinations, routes.
    #[arg(long, short)]
    config: PathBuf,
    /// Validate the configuration and exit.
    #[arg(long)]
    check: bool,
}

/// The table's and the steering's refresh when the router runs apart.
const STEERING_REFRESH: Duration = Duration::from_secs(1);

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    pon_telemetry::init_logging();
    let cfg = ForwarderConfig::load(&args.config)?;
    let table = cfg.table()?;
    if args.check {
        println!(
            "{}: ok ({} peers)",
            args.config.display(),
            table.peer_count()
        );
        return Ok(());
    }
    let shared = Arc::new(ArcSwap::from_pointee(table));
    let engine = Engine::new(
        shared.clone(),
        cfg.local_addr,
        cfg.underlay_mtu,
        cfg.hop_limit,
    );
    let (mailbox, inbox) = daemon::mailbox(4096, 4096);
    // [local]: probes that end here go to pon-monitor, over the link.
    let link = match &cfg.local {
        Some(l) => {
            let partners = daemon::partners(Part::Forwarder, l.listen, l.monitor, l.router);
            let link = Link::bind(l.listen, partners)
                .with_context(|| format!("binding the local link {}", l.listen))?;
            link.spawn_reader(mailbox.clone())?;
            Some(link)
        }
        None => None,
    };
    let engine = Arc::new(match &link {
        Some(_) => engine.with_monitor(),
        None => engine,
    });
    let sink = link.as_ref().map(|_| mailbox.sink());
    let sockets = Arc::new(daemon::open_sockets(&cfg, sink)?);
    let steering_port = cfg.local.as_ref().map_or(0, |l| l.steering_port);
    let (epoch, _) = daemon::run_ids();
    let part = ForwarderPart::new(ForwarderPartConfig {
        forwarder: cfg.clone(),
        epoch,
        steering_port,
        steering_refresh: STEERING_REFRESH,
    });
    let part_counters = part.counters.clone();
    let link_counters = link.as_ref().map(|l| l.counters.clone());
    let io = Io {
        sockets: Some(sockets.clone()),
        table: Some(shared.clone()),
        steering: daemon::steering_socket(&cfg, steering_port)?,
        link,
        ..Io::default()
    };
    let loop_counters = io.counters.clone();
    // CU mode: views go to the control thread, the one writer of the table.
    let cu_status = daemon::start_cu(&cfg, &mailbox)?;
    let mailbox_counters = mailbox.counters.clone();
    EventLoop {
        core: part,
        inbox,
        io,
        publish: Box::new(|_: &ForwarderPart, _| {}),
        status_every: Duration::from_secs(1),
        start: Instant::now(),
    }
    .spawn("fwd-control")?;
    drop(mailbox);
    if let Some(addr) = cfg.metrics {
        let counters = engine.counters.clone();
        pon_telemetry::serve_metrics(
            addr,
            Arc::new(move |w: &mut PromWriter| {
                counters.render(w);
                part_counters.render(w);
                loop_counters.render(w);
                mailbox_counters.render(w);
                if let Some(l) = &link_counters {
                    l.render(w);
                }
                if let Some(s) = &cu_status {
                    s.render(w);
                }
                shared.load().render(w);
            }),
        )
        .with_context(|| format!("serving metrics on {addr}"))?;
    }
    tracing::info!(id = ?cfg.id, cu = ?cfg.cu.as_ref().map(|c| c.addr), listen = %cfg.listen, local = %cfg.local_addr, "forwarder running");
    for t in io::spawn(engine, sockets)? {
        let _ = t.join();
    }
    Ok(())
}
