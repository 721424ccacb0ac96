//! pon-ta: the transmission agent of an app VM.

use anyhow::Context;
use pon_agents::config::TaConfig;
use pon_agents::interception::Interception;
use pon_agents::io::{run_ta, TaKeys, TaUplink};
use pon_agents::ta::{Encapsulator, TaCounters};
use pon_proto::EncapKind;
use pon_telemetry::PromWriter;
use std::net::{SocketAddr, SocketAddrV4};
use std::sync::{Arc, Mutex};

fn main() -> anyhow::Result<()> {
    let args = pon_telemetry::daemon_args!(
        "Captures this VM's packets for overlay destinations through a TUN device \
         and sends them, IP-in-IP (or UDP), to the local PON forwarder."
    );
    let cfg = TaConfig::load(&args.config)?;
    if args.check_done() {
        return Ok(());
    }
    // The TA's clock: its sans-I/O parts get time as "since this instant".
    let started = std::time::Instant::now();
    let mtu = cfg.tun_mtu();
    let tun = pon_agents::tun::open(&cfg.tun_name, mtu, None, cfg.offload)?;
    let counters = Arc::new(TaCounters::default());
    let steering = Arc::new(pon_agents::steering::SteeringCounters::default());

    let interception = Arc::new(Mutex::new(Interception::new(&cfg.tun_name, cfg.local_addr)));
    interception
        .lock()
        .expect("not shared yet")
        .apply(&cfg.intercept)?;
    // CU mode: the client thread keeps the interception routes in step with
    // the CU's view; the forwarder is known once the CU has named it.
    let identity = Arc::new(
        pon_identity::Identity::load_or_create(&cfg.state_dir())
            .map_err(|e| anyhow::anyhow!("state_dir: {e}"))?,
    );
    let mut cu = pon_agents::cu::start(&cfg, identity.clone(), interception.clone())?;

    {
        let addr = pon_telemetry::metrics_addr(cfg.metrics, pon_telemetry::metrics_port::TA);
        let c = counters.clone();
        let (interception, cu_status) = (interception.clone(), cu.status.clone());
        let steering = steering.clone();
        pon_telemetry::serve_metrics(
            addr,
            Arc::new(move |w: &mut PromWriter| {
                c.render(w);
                steering.render(w);
                if let Some(s) = &cu_status {
                    s.render(w);
                }
                let (intercepted, bypassed) = interception
                    .lock()
                    .map_or((0, 0), |i| (i.active().len(), i.bypass().len()));
                w.gauge(
                    "pon_ta_bypassed_prefixes",
                    "",
                    "Prefixes the proxy's router left to the IP path (overlay cannot reach them).",
                    bypassed as f64,
                );
                let intercepted = intercepted as f64;
                w.gauge(
                    "pon_ta_tun_mtu",
                    "",
                    "MTU of the TA's TUN device.",
                    f64::from(mtu),
                );
                w.gauge(
                    "pon_ta_intercepted_prefixes",
                    "",
                    "Destination prefixes routed into the overlay.",
                    intercepted,
                );
            }),
        )
        .with_context(|| format!("serving metrics on {addr}"))?;
    }

    let forwarder = cu.forwarder()?;
    if cfg.steering_port != 0 {
        // The router's reachability verdicts, from the forwarder we send to.
        let bind = SocketAddr::V4(SocketAddrV4::new(cfg.local_addr, cfg.steering_port));
        pon_agents::steering::start(
            bind,
            identity.noise_secret(),
            forwarder.clone(),
            interception.clone(),
            steering,
            started,
        )?;
    }
    let enc = Encapsulator {
        local: cfg.local_addr,
        encap: cfg.encap,
    };
    let uplink = match cfg.encap {
        EncapKind::Ipip => TaUplink::Ipip(
            pon_netio::RawSender::open().context("opening raw socket (needs CAP_NET_RAW)")?,
        ),
        EncapKind::Udp => TaUplink::Udp(pon_netio::udp::UdpIo::bind(SocketAddr::V4(
            SocketAddrV4::new(cfg.local_addr, 0),
        ))?),
    };
    let (fwd, _) = forwarder
        .get()
        .expect("cu.forwarder() returns once one is named");
    // This run's epoch: it names the uplink's keys, and grows across restarts.
    let keys = TaKeys {
        secret: identity.noise_secret(),
        epoch: std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(1, |d| d.as_nanos() as u64),
        encrypt: cfg.encrypt_lan,
    };
    if cfg.encap == EncapKind::Udp && forwarder.key().is_none() {
        tracing::warn!("the forwarder's key is not known (forwarder_key): nothing is sent on the UDP leg until it is");
    }
    tracing::info!(tun = %cfg.tun_name, mtu, forwarder = %fwd, encap = ?cfg.encap, encrypt_lan = cfg.encrypt_lan, "TA running");
    run_ta(&tun, mtu, &enc, &uplink, &forwarder, &keys, &counters)
}
