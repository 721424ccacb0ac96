//! What moves the core's inputs and outputs, shared by every proxy daemon:
//!
//! - [`mailbox`]: how the forwarding threads, the local link and the CU
//!   client hand inputs to the control thread without ever waiting on it;
//! - [`event_loop`]: the control thread itself, one loop for every daemon;
//! - [`link`]: the local link between split processes;
//! - here: the forwarder's sockets, run identifiers and the CU client,
//!   set up the same way by pon-proxy and pon-forwarder.

pon_telemetry::counters! {
    /// What a daemon's control side counts besides its core: inputs it
    /// could not take, datagrams it could not send, the local link.
    pub struct DaemonCounters {
        urgent_full => ("pon_proxy_input_drops_total", "reason=\"urgent_queue_full\"", "Inputs of the control loop dropped, by reason."),
        bulk_full => ("pon_proxy_input_drops_total", "reason=\"probe_queue_full\"", "Inputs of the control loop dropped, by reason."),
        too_long => ("pon_proxy_input_drops_total", "reason=\"probe_too_long\"", "Inputs of the control loop dropped, by reason."),
        not_probe => ("pon_proxy_input_drops_total", "reason=\"not_a_probe\"", "Inputs of the control loop dropped, by reason."),
        peer_send_errors => ("pon_proxy_send_errors_total", "to=\"peer\"", "Datagrams the control loop could not send, by destination."),
        steering_send_errors => ("pon_proxy_send_errors_total", "to=\"ta\"", "Datagrams the control loop could not send, by destination."),
        not_sealed => ("pon_proxy_send_errors_total", "to=\"peer_without_session\"", "Datagrams the control loop could not send, by destination."),
        no_socket => ("pon_proxy_send_errors_total", "to=\"none\"", "Datagrams the control loop could not send, by destination."),
        local_received => ("pon_local_messages_total", "dir=\"rx\"", "Local-link messages between the proxy's processes."),
        local_sent => ("pon_local_messages_total", "dir=\"tx\"", "Local-link messages between the proxy's processes."),
        local_foreign => ("pon_local_drops_total", "reason=\"foreign_source\"", "Local-link datagrams dropped, by reason."),
        local_malformed => ("pon_local_drops_total", "reason=\"malformed\"", "Local-link datagrams dropped, by reason."),
        local_bad_tag => ("pon_local_drops_total", "reason=\"bad_tag\"", "Local-link datagrams dropped, by reason."),
        local_replayed => ("pon_local_drops_total", "reason=\"replayed\"", "Local-link datagrams dropped, by reason."),
        local_stale_epoch => ("pon_local_drops_total", "reason=\"stale_epoch\"", "Local-link datagrams dropped, by reason."),
        local_send_errors => ("pon_local_drops_total", "reason=\"send_error\"", "Local-link datagrams dropped, by reason."),
        local_no_partner => ("pon_local_drops_total", "reason=\"no_partner\"", "Local-link datagrams dropped, by reason."),
    }
}

pub mod event_loop;
pub mod link;
pub mod mailbox;
pub mod pmon;

pub use event_loop::{EventLoop, Io, ReportTo};
pub use link::{Link, Partner};
pub use mailbox::{mailbox, Inbox, Input, Mailbox};
pub use pmon::LocalPmon;

use crate::core::{Core, Part, StatusPage};
use crate::forwarder::{io::Sockets, Engine, ForwarderConfig};
use anyhow::Context;
use arc_swap::ArcSwap;
use event_loop::Publish;
use pon_cu::client::ClientStatus;
use pon_forwarder::io::CoreSink;
use pon_telemetry::{PromWriter, Renderer};
use std::net::{SocketAddr, SocketAddrV4, UdpSocket};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// The forwarder's sockets: peers, agents (IP-in-IP and the UDP variant);
/// packets for the core (probes, handshake messages) and news of roaming
/// peers go to `core` (`None`: dropped).
pub fn open_sockets(cfg: &ForwarderConfig, core: Option<CoreSink>) -> anyhow::Result<Sockets> {
    let agent_udp = match cfg.agent_udp_port {
        0 => None,
        port => {
            let bind = SocketAddr::V4(SocketAddrV4::new(cfg.local_addr, port));
            Some(
                pon_netio::udp::UdpIo::bind(bind)
                    .with_context(|| format!("binding agent UDP socket {bind}"))?,
            )
        }
    };
    Ok(Sockets {
        peer: pon_netio::udp::UdpIo::bind(cfg.listen)
            .with_context(|| format!("binding {}", cfg.listen))?,
        ipip_rx: pon_netio::IpipReceiver::open()
            .context("opening raw IP-in-IP socket (needs CAP_NET_RAW)")?,
        raw_tx: pon_netio::RawSender::open()
            .context("opening raw send socket (needs CAP_NET_RAW)")?,
        agent_udp,
        max_datagram: usize::from(cfg.underlay_mtu) - pon_proto::ip::UDP_OVERHEAD,
        core,
    })
}

/// The socket steering datagrams leave from (the proxy's agent-side
/// address), when steering is on.
pub fn steering_socket(cfg: &ForwarderConfig, port: u16) -> anyhow::Result<Option<UdpSocket>> {
    if port == 0 {
        return Ok(None);
    }
    let bind = SocketAddr::V4(SocketAddrV4::new(cfg.local_addr, 0));
    let s = UdpSocket::bind(bind).with_context(|| format!("binding steering socket {bind}"))?;
    Ok(Some(s))
}

/// The proxy's static key, from its state directory (made there, mode
/// 0600, on first start).
pub fn private_key(cfg: &ForwarderConfig) -> anyhow::Result<[u8; 32]> {
    let id = cfg.identity()?;
    tracing::info!(public_key = %id.noise_public(), state_dir = %id.dir().display(), "identity");
    Ok(id.noise_secret())
}

/// This run's identifiers: the steering epoch (nanoseconds since the Unix
/// epoch) and the monitor session, distinct per run so that replies and
/// steering of a previous run are ignored.
pub fn run_ids() -> (u64, u32) {
    let epoch = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(1, |d| d.as_nanos() as u64);
    let session = (epoch ^ (epoch >> 32) ^ u64::from(std::process::id())) as u32;
    (epoch, session)
}

/// Starts the CU client if the config has a `[cu]` section; its views go
/// to the control thread's latest-view slot (the client never waits).
/// With `pmon`, each view also goes to the proxy's own PMon listener.
pub fn start_cu(
    cfg: &ForwarderConfig,
    mailbox: &Mailbox,
    pmon: Option<LocalPmon>,
) -> anyhow::Result<Option<Arc<ClientStatus>>> {
    if cfg.cu.is_none() {
        return Ok(None);
    }
    let identity = Arc::new(cfg.identity()?);
    let mb = mailbox.clone();
    let on_view = Box::new(move |v: &pon_cu::View| {
        if let Some(p) = &pmon {
            p.view(v);
        }
        mb.post_view(v.clone())
    });
    crate::forwarder::cu::start_with(cfg, identity, on_view)
}

/// How a core's status is published, and how often.
pub struct StatusOf<C, S> {
    pub every: Duration,
    pub build: fn(&C, Duration) -> S,
}

/// Serves the core's and the daemon's counters, `extra` metrics and the
/// latest published status (`GET /status`) on `addr`, and returns how the
/// control loop publishes that status (which hands the loop the status's
/// PMon report, for its [`ReportTo`]).
fn serve<C: Core + 'static, S: StatusPage>(
    addr: SocketAddr,
    core: &C,
    counters: &Arc<DaemonCounters>,
    extra: Renderer,
    status: StatusOf<C, S>,
    now: Duration,
) -> anyhow::Result<Publish<C>> {
    let page = Arc::new(ArcSwap::from_pointee((status.build)(core, now)));
    let (metrics, counters, st) = (core.metrics(), counters.clone(), page.clone());
    let render = Arc::new(move |w: &mut PromWriter| {
        metrics(w);
        counters.render(w);
        extra(w);
        st.load().render(w);
    });
    let st = page.clone();
    let json = Arc::new(move || serde_json::to_string_pretty(&**st.load()).unwrap_or_default());
    pon_telemetry::serve_http(addr, render, Some(json))
        .with_context(|| format!("serving metrics on {addr}"))?;
    let build = status.build;
    Ok(Box::new(move |c: &C, now| {
        let p = Arc::new(build(c, now));
        let report = p.report();
        page.store(p);
        report
    }))
}

/// One end of a split proxy's local link: where this part listens, its
/// static secret, this run's epoch and the other parts.
#[derive(Clone)]
pub struct LinkSetup {
    pub listen: SocketAddr,
    pub secret: [u8; 32],
    pub epoch: u64,
    pub partners: Vec<Partner>,
}

/// Never prints the secret (a configuration dump or an error's context
/// must not leak the part's key).
impl std::fmt::Debug for LinkSetup {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LinkSetup")
            .field("listen", &self.listen)
            .field("epoch", &self.epoch)
            .field("partners", &self.partners)
            .finish_non_exhaustive()
    }
}

impl LinkSetup {
    /// Binds it for part `me`; messages go to `mailbox`.
    fn start(&self, me: Part, mailbox: &Mailbox) -> anyhow::Result<Link> {
        let listen = self.listen;
        let link = Link::bind(
            listen,
            me,
            &self.secret,
            self.epoch,
            &self.partners,
            mailbox.counters.clone(),
        )
        .with_context(|| format!("binding the local link {listen}"))?;
        link.spawn_reader(mailbox.clone())?;
        Ok(link)
    }
}

/// Runs a split proxy's monitor or router (`me`): its part, over the local
/// link to the other two, until the process ends. Metrics and status on
/// `metrics` (see [`pon_telemetry::metrics_addr`]).
pub fn run_part<C: Core + Send + 'static, S: StatusPage>(
    me: Part,
    link: LinkSetup,
    metrics: SocketAddr,
    core: C,
    status: StatusOf<C, S>,
) -> anyhow::Result<()> {
    let (mailbox, inbox) = mailbox(4096, 1);
    let (listen, epoch) = (link.listen, link.epoch);
    let link = link.start(me, &mailbox)?;
    let every = status.every;
    let none: Renderer = Arc::new(|_: &mut PromWriter| {});
    let publish = serve(
        metrics,
        &core,
        &mailbox.counters,
        none,
        status,
        Duration::ZERO,
    )?;
    tracing::info!(part = ?me, %listen, "running");
    let mut l = EventLoop::over_link(core, inbox, link, publish, every);
    // Rounds of a restarted router's reports differ from the last run's,
    // whose parts the forwarder may still hold.
    l.io.pmon_round = epoch as u32;
    l.run();
    Ok(())
}

/// Runs the forwarder's data plane around `core` (pon-proxy's whole core,
/// or pon-forwarder's part): the forwarding threads, the control loop, the
/// CU client and the metrics endpoint. `link`: the local link to a
/// pon-monitor and pon-router, for pon-forwarder with `[local]`; `pmon`:
/// pon-proxy's own PMon listener, if configured.
#[allow(clippy::too_many_arguments)]
pub fn run_data_plane<C: Core + Send + 'static, S: StatusPage>(
    cfg: &ForwarderConfig,
    core: C,
    link: Option<LinkSetup>,
    queue: usize,
    steering_port: u16,
    status: StatusOf<C, S>,
    pmon: Option<LocalPmon>,
) -> anyhow::Result<()> {
    let table = Arc::new(ArcSwap::from_pointee(cfg.table()?));
    let (mailbox, inbox) = mailbox(queue, queue);
    let link = match link {
        Some(l) => Some(l.start(Part::Forwarder, &mailbox)?),
        None => None,
    };
    // Probes that end here go to the control loop when there is a monitor
    // (in-process, or over the link); without one the engine drops them.
    let has_monitor = link.is_some() || core.has_monitor();
    let engine = Engine::new(
        table.clone(),
        cfg.local_addr,
        cfg.underlay_mtu,
        cfg.hop_limit,
    );
    let engine = Arc::new(if has_monitor {
        engine.with_monitor()
    } else {
        engine
    });
    // Handshake messages always go to the control loop; probes only when
    // there is a monitor (the engine drops them otherwise).
    let sockets = Arc::new(open_sockets(cfg, Some(mailbox.sink()))?);
    // CU mode: views go to the control loop, the one writer of the table.
    let local = pmon.as_ref().map(|p| p.feed.clone());
    let cu = start_cu(cfg, &mailbox, pmon)?;
    let reports = cu
        .clone()
        .map_or(ReportTo::Nowhere, |cu| ReportTo::Cu(cu, local.clone()));
    let extra: Renderer = {
        let (engine, table, local) = (engine.counters.clone(), table.clone(), local.clone());
        Arc::new(move |w: &mut PromWriter| {
            engine.render(w);
            if let Some(s) = &cu {
                s.render(w);
            }
            if let Some(l) = &local {
                l.render(w);
            }
            table.load().render(w);
        })
    };
    let every = status.every;
    let publish = serve(
        pon_telemetry::metrics_addr(cfg.metrics, pon_telemetry::metrics_port::FORWARDER),
        &core,
        &mailbox.counters,
        extra,
        status,
        Duration::ZERO,
    )?;
    EventLoop {
        core,
        inbox,
        io: Io {
            sockets: Some(sockets.clone()),
            engine: Some(engine.clone()),
            steering: steering_socket(cfg, steering_port)?,
            link,
            reports,
            pmon_round: 0,
            counters: mailbox.counters.clone(),
        },
        publish,
        status_every: every,
        start: Instant::now(),
    }
    .spawn("control")?;
    drop(mailbox);
    tracing::info!(id = ?cfg.id, cu = ?cfg.cu.as_ref().map(|c| c.addr.to_string()), listen = %cfg.listen, local = %cfg.local_addr, "forwarding");
    for t in pon_forwarder::io::spawn(engine, sockets)? {
        let _ = t.join();
    }
    Ok(())
}
