//! pon-linkemu: the lab's WAN link emulator (runs in the internet namespace).

use anyhow::Context;
use pon_linkemu::config::{Config, Sites};
use pon_linkemu::control::{self, Controlled};
use pon_linkemu::emulator::Emulator;
use pon_linkemu::io::{DataPath, Waker};
use pon_linkemu::metrics::Registry;
use pon_telemetry::PromWriter;
use rand::rngs::SmallRng;
use rand::RngExt;
use std::sync::{mpsc, Arc};
use tun_rs::DeviceBuilder;

fn main() -> anyhow::Result<()> {
    let args = pon_telemetry::daemon_args!(
        "Emulates WAN links between lab sites: packets routed into a TUN device \
         are delayed, jittered, dropped and rate-limited per ordered pair of sites \
         (by source and destination prefix), then written back to be routed on. \
         Settings change at run time through a Unix control socket."
    );
    let cfg = Config::load(&args.config)?;
    if args.check_done() {
        return Ok(());
    }
    let seed = cfg
        .seed
        .unwrap_or_else(|| rand::make_rng::<SmallRng>().random());
    let registry = Arc::new(Registry::default());
    let mut state = Controlled {
        emu: Emulator::new(cfg.max_in_flight, seed),
        sites: Sites::new(cfg.site.clone()).context("sites")?,
        registry: registry.clone(),
    };
    for l in &cfg.link {
        let from = state.sites.by_name(&l.from).expect("validated").index;
        let to = state.sites.by_name(&l.to).expect("validated").index;
        state.set_link(from, to, l.settings().params());
    }

    // The TUN carries no address: it only receives what policy routing sends
    // it, and the lab turns reverse-path filtering off for it.
    let tun = DeviceBuilder::new()
        .name(&cfg.tun_name)
        .mtu(cfg.mtu)
        .enable(true)
        .build_sync()
        .with_context(|| {
            format!(
                "creating TUN device {} (needs CAP_NET_ADMIN and /dev/net/tun)",
                cfg.tun_name
            )
        })?;
    let ipv6 = format!("/proc/sys/net/ipv6/conf/{}/disable_ipv6", cfg.tun_name);
    if let Err(e) = std::fs::write(&ipv6, "1") {
        tracing::debug!(error = %e, "IPv6 already unavailable");
    }

    let waker = Waker::new().context("eventfd")?;
    let (jobs_tx, jobs_rx) = mpsc::channel();
    if let Some(path) = &cfg.control {
        let w = waker.try_clone().context("eventfd")?;
        control::serve(path, jobs_tx, move || w.wake())
            .with_context(|| format!("serving control socket {}", path.display()))?;
    }
    // Metrics last: the lab takes a serving endpoint to mean "ready", and
    // routes traffic into the TUN only then.
    {
        let addr = pon_telemetry::metrics_addr(cfg.metrics, pon_telemetry::metrics_port::LINKEMU);
        let r = registry.clone();
        pon_telemetry::serve_metrics(addr, Arc::new(move |w: &mut PromWriter| r.render(w)))
            .with_context(|| format!("serving metrics on {addr}"))?;
    }
    tracing::info!(tun = %cfg.tun_name, links = cfg.link.len(), seed, "link emulator running");
    let mut dp = DataPath::new(tun, state, jobs_rx, waker, cfg.mtu).context("TUN set-up")?;
    dp.run(cfg.realtime_priority).context("data path")
}
