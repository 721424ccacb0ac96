//! The CU daemon's I/O: a QUIC endpoint, one task per agent session (its
//! own QUIC connection, or a stream of its site proxy's connection with TLS
//! inside: see `relay`), and one actor task that owns the sans-I/O
//! [`Registry`] and carries out its actions. A store thread commits
//! registry changes to redb in groups.
//!
//! Isolation between agents: a session only ever parses its own bounded
//! frames; what the actor sends it waits in a bounded queue (when it
//! overflows the agent gets a full configuration instead of the updates it
//! missed); a session whose agent does not read is cut off after
//! `STALL_TIMEOUT`. Nothing one agent does can block the actor.

use crate::config::CuConfig;
use crate::pki::Ca;
use crate::pmon_service::{self, PmonStats};
use crate::registry::{Action, AdminDone, ConnId, Outgoing, Record, Refusal, Registry};
use crate::store::{Backend, PendingWrites, Store};
use crate::stream::{self, FrameSink, FrameSource, ReadFail};
use crate::trust::{Grants, KeyId};
use crate::wall_ms;
use anyhow::Context;
use pon_proto::control::{
    self, AdminRequest, AgentMsg, ControlError, CuMsg, Endpoints, FrameDecoder, MAX_AGENT_FRAME,
    MAX_CU_FRAME,
};
use pon_telemetry::{Counter, PromWriter};
use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::io::AsyncWriteExt;
use tokio::sync::mpsc;

/// A new connection must register within this time.
pub const REGISTER_TIMEOUT: Duration = Duration::from_secs(5);
/// A writer that cannot make progress for this long closes its connection.
pub const STALL_TIMEOUT: Duration = Duration::from_secs(10);
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Handshakes in progress at most, however many the round trip would park
/// (about 40 KiB each: 160 MiB).
const MAX_HANDSHAKES_IN_PROGRESS: u64 = 4096;
const WRITER_QUEUE: usize = 4096;
/// The shortest time between two flushes to one agent. It grows with the
/// number of agents so that a join storm costs the CU at most about
/// 1 / COALESCE_PER_AGENT flushes per second in all, however many agents.
const COALESCE_MIN: Duration = Duration::from_millis(100);
const COALESCE_MAX: Duration = Duration::from_secs(1);
const COALESCE_PER_AGENT: Duration = Duration::from_micros(100);

fn coalesce_window(connections: u64) -> Duration {
    (COALESCE_PER_AGENT * connections.min(u64::from(u32::MAX)) as u32)
        .clamp(COALESCE_MIN, COALESCE_MAX)
}
const TICK: Duration = Duration::from_millis(100);
/// Offline agents are looked for every 10 s (a scan of the registry).
const FORGET_EVERY_TICKS: u64 = 100;

pub use crate::tls::close_code;

pon_telemetry::counters! {
    pub struct CuCounters {
        registrations => ("pon_cu_registrations_total", "", "Registrations accepted."),
        enrolments => ("pon_cu_enrolments_total", "", "Agents enrolled (certificates issued)."),
        revocations => ("pon_cu_revocations_total", "", "Agents revoked by ponctl."),
        reloads => ("pon_cu_reloads_total", "", "Address grants re-read from cu.toml (SIGHUP)."),
        reload_failures => ("pon_cu_reload_failures_total", "", "SIGHUPs whose cu.toml could not be used (the grants in force stay)."),
        leave_goodbye => ("pon_cu_leaves_total", "reason=\"goodbye\"", "Agents announced as gone, by how it was detected."),
        leave_closed => ("pon_cu_leaves_total", "reason=\"closed\"", "Agents announced as gone, by how it was detected."),
        leave_silent => ("pon_cu_leaves_total", "reason=\"missed_heartbeats\"", "Agents announced as gone, by how it was detected."),
        leave_not_back => ("pon_cu_leaves_total", "reason=\"not_back_after_restart\"", "Agents announced as gone, by how it was detected."),
        leave_revoked => ("pon_cu_leaves_total", "reason=\"revoked\"", "Agents announced as gone, by how it was detected."),
        bad_malformed => ("pon_cu_bad_messages_total", "reason=\"malformed\"", "Connections dropped for a bad message, by reason."),
        bad_oversized => ("pon_cu_bad_messages_total", "reason=\"oversized\"", "Connections dropped for a bad message, by reason."),
        bad_truncated => ("pon_cu_bad_messages_total", "reason=\"truncated\"", "Connections dropped for a bad message, by reason."),
        bad_unexpected => ("pon_cu_bad_messages_total", "reason=\"unexpected\"", "Connections dropped for a bad message, by reason."),
        register_timeouts => ("pon_cu_timeouts_total", "stage=\"register\"", "Connections dropped for being too slow."),
        stalled => ("pon_cu_timeouts_total", "stage=\"write\"", "Connections dropped for being too slow."),
        relayed_idle => ("pon_cu_timeouts_total", "stage=\"relayed_idle\"", "Connections dropped for being too slow."),
        handshake_failures => ("pon_cu_handshake_failures_total", "", "QUIC/TLS handshakes that failed."),
        retries => ("pon_cu_quic_retries_total", "", "New connections asked to prove their address first (QUIC Retry), because too many handshakes were in progress."),
        per_address => ("pon_cu_connections_refused_total", "reason=\"per_address\"", "New connections refused before their handshake, by reason."),
        busy => ("pon_cu_connections_refused_total", "reason=\"busy\"", "New connections refused before their handshake, by reason."),
        forgotten => ("pon_cu_agents_forgotten_total", "", "Agent records forgotten after [limits] forget_offline_after_s offline."),
        config_frames => ("pon_cu_frames_sent_total", "kind=\"config\"", "Frames sent to agents."),
        update_frames => ("pon_cu_frames_sent_total", "kind=\"update\"", "Frames sent to agents."),
        resyncs => ("pon_cu_resyncs_total", "", "Agents sent a full configuration because their update queue overflowed."),
        store_errors => ("pon_cu_store_errors_total", "op=\"write\"", "Store errors: failed commits (retried) and bad records skipped at start."),
        store_skipped => ("pon_cu_store_errors_total", "op=\"load\"", "Store errors: failed commits (retried) and bad records skipped at start."),
        admin_requests => ("pon_cu_admin_requests_total", "", "Administration requests served (ponctl)."),
    }
}

#[derive(Default)]
pub struct CuStats {
    pub counters: CuCounters,
    /// Refused enrolments, registrations and admin requests, by reason.
    refused: [Counter; Refusal::ALL.len()],
    pub known: AtomicU64,
    pub online: AtomicU64,
    pub connections: AtomicU64,
    /// Agents' sessions relayed by their site proxies (on the proxies'
    /// connections).
    pub relayed: AtomicU64,
    /// Connections accepted whose handshake is not over.
    pub handshakes: AtomicU64,
    /// Relayed sessions whose TLS handshake is not over.
    pub relayed_handshakes: AtomicU64,
    /// Handshakes established since the start.
    pub handshakes_established: AtomicU64,
    /// Handshakes admitted at once now (see `admission`).
    pub handshake_limit: AtomicU64,
    /// Handshakes the CU establishes per second, as the admission estimates.
    pub handshake_rate: AtomicU64,
    /// The least round trip (µs) of the connections established since the
    /// admission last looked; 0: none.
    pub least_rtt_us: AtomicU64,
}

impl CuStats {
    /// Agents' sessions: direct connections and relayed ones.
    pub fn sessions(&self) -> u64 {
        self.connections.load(Ordering::Relaxed) + self.relayed.load(Ordering::Relaxed)
    }

    /// Notes an established connection's round trip for the admission.
    fn observe_rtt(&self, rtt: Duration) {
        let sample = u64::try_from(rtt.as_micros()).unwrap_or(u64::MAX).max(1);
        let _ = self
            .least_rtt_us
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |old| {
                (old == 0 || sample < old).then_some(sample)
            });
    }

    /// The least round trip noted since the last call, forgotten.
    fn take_least_rtt(&self) -> Option<Duration> {
        match self.least_rtt_us.swap(0, Ordering::Relaxed) {
            0 => None,
            us => Some(Duration::from_micros(us)),
        }
    }

    pub fn refused(&self, why: Refusal) -> &Counter {
        let i = Refusal::ALL.iter().position(|r| *r == why).unwrap_or(0);
        &self.refused[i]
    }

    pub fn render(&self, w: &mut PromWriter) {
        self.counters.render(w);
        for (why, c) in Refusal::ALL.iter().zip(&self.refused) {
            w.counter(
                "pon_cu_refused_total",
                &format!("reason=\"{}\"", why.label()),
                "Enrolments, registrations and admin requests refused, by reason.",
                c.get(),
            );
        }
        let g = |v: &AtomicU64| v.load(Ordering::Relaxed) as f64;
        w.gauge(
            "pon_cu_agents",
            "state=\"known\"",
            "Agents in the registry, by state.",
            g(&self.known),
        );
        w.gauge(
            "pon_cu_agents",
            "state=\"online\"",
            "Agents in the registry, by state.",
            g(&self.online),
        );
        w.gauge(
            "pon_cu_connections",
            "",
            "Open agent connections.",
            g(&self.connections),
        );
        w.gauge(
            "pon_cu_relayed_sessions",
            "",
            "Agents' sessions relayed by their site proxies, on the proxies' connections.",
            g(&self.relayed),
        );
        w.gauge(
            "pon_cu_handshakes",
            "",
            "Connections whose QUIC/TLS handshake is in progress.",
            g(&self.handshakes),
        );
        w.gauge(
            "pon_cu_relayed_handshakes",
            "",
            "Relayed sessions whose TLS handshake is in progress (admitted up to pon_cu_handshake_limit, apart from connections').",
            g(&self.relayed_handshakes),
        );
        w.gauge(
            "pon_cu_handshake_limit",
            "",
            "Handshakes admitted at once, as of the last new connection: [limits] max_handshakes plus room for those waiting for their agents' answer (twice the CU's rate times the least recent round trip).",
            g(&self.handshake_limit),
        );
        w.gauge(
            "pon_cu_handshake_rate",
            "",
            "Handshakes the CU establishes per second, as its admission estimates it (the best lately, decaying), as of the last new connection.",
            g(&self.handshake_rate),
        );
        if let Some(rss) = resident_memory() {
            w.gauge(
                "process_resident_memory_bytes",
                "",
                "Resident memory of the CU.",
                rss as f64,
            );
        }
    }
}

/// This process's resident set size, from /proc.
pub fn resident_memory() -> Option<u64> {
    resident_memory_of("self")
}

/// Resident set size of process `pid` ("self" for this one), in bytes.
pub fn resident_memory_of(pid: &str) -> Option<u64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let kb: u64 = s
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))?
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()
        .ok()?;
    Some(kb * 1024)
}

/// Boxed: a channel's first block holds 32 messages whether sent or not,
/// and with the messages inline that block was 4.5 KiB of every agent's
/// memory at rest (a Config is large; almost every message is small).
enum WriterMsg {
    Out(Box<Outgoing>),
    /// A message outside the registry's (PMon's).
    Msg(Box<CuMsg>),
    Close(String),
}

struct ConnHandle {
    tx: mpsc::Sender<WriterMsg>,
    resync: Arc<AtomicBool>,
    peer: Peer,
    /// A proxy's connection: told when its registration is accepted, from
    /// when on it may relay its site's app VMs' sessions.
    on_registered: Option<tokio::sync::oneshot::Sender<()>>,
}

/// How the CU ends an agent's session from outside its tasks.
#[derive(Clone)]
enum Peer {
    /// The agent's own QUIC connection.
    Quic(quinn::Connection),
    /// TLS inside a stream its site proxy relays: the session's task
    /// watches this and ends the session (the proxy's connection and the
    /// other sessions on it carry on).
    Relayed(Arc<tokio::sync::Notify>),
}

impl Peer {
    fn close(&self, code: u32, reason: &[u8]) {
        match self {
            Peer::Quic(c) => c.close(code.into(), reason),
            Peer::Relayed(end) => end.notify_one(),
        }
    }
}

enum Event {
    Register {
        conn: ConnId,
        key: Option<KeyId>,
        reg: control::Register,
        handle: ConnHandle,
        /// The proxy connection that relays it, if relayed.
        via: Option<ConnId>,
    },
    Enrol {
        conn: ConnId,
        enrol: control::Enrol,
        handle: ConnHandle,
        via: Option<ConnId>,
    },
    Admin {
        conn: ConnId,
        key: Option<KeyId>,
        version: u16,
        request: AdminRequest,
        handle: ConnHandle,
    },
    /// cu.toml's grants, re-read.
    Reload(Grants),
    Heartbeat(ConnId),
    /// A proxy whose address the CU observed connects from another one now.
    Moved {
        conn: ConnId,
        seen: std::net::IpAddr,
    },
    Gone {
        conn: ConnId,
        goodbye: bool,
    },
    Resync(ConnId),
    /// PMon: a proxy's measurements, on its registered connection.
    Report {
        conn: ConnId,
        report: pon_proto::pmon::Report,
    },
    /// PMon: a consumer's subscription (the first message of its connection).
    Subscribe {
        conn: ConnId,
        key: Option<KeyId>,
        version: u16,
        subscription: pon_proto::pmon::Subscription,
        handle: ConnHandle,
    },
}

/// Runs the CU until the process is stopped; SIGHUP re-reads the address
/// grants from `path`.
pub fn run(mut cfg: CuConfig, path: PathBuf) -> anyhow::Result<()> {
    // The daemon always serves metrics, on loopback unless told; `serve`
    // alone (tests, benchmarks in-process) serves them only when told.
    cfg.metrics = Some(pon_telemetry::metrics_addr(
        cfg.metrics,
        pon_telemetry::metrics_port::CU,
    ));
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .thread_name("cu")
        .build()
        .context("starting the tokio runtime")?;
    rt.block_on(serve(cfg, Arc::new(CuStats::default()), None, Some(path)))
}

/// Serves on `cfg.listen`; `bound` receives the actual address (port 0 in
/// tests); with `reload_from`, SIGHUP re-reads that file's `[clouds]`.
pub async fn serve(
    cfg: CuConfig,
    stats: Arc<CuStats>,
    bound: Option<tokio::sync::oneshot::Sender<std::net::SocketAddr>>,
    reload_from: Option<PathBuf>,
) -> anyhow::Result<()> {
    let settings = cfg.settings()?;
    let policy = cfg.policy().context("[policy]")?;
    let idle = settings.dead_after + Duration::from_secs(1);
    let server_cfg = crate::tls::server_config(&cfg.cert, &cfg.key, &cfg.ca, idle)
        .context("loading the CU certificate")?;
    let ca =
        Ca::load(&cfg.ca, &cfg.ca_key).context("loading the CA that signs agents' certificates")?;
    let mut registry = Registry::new(settings, policy);
    let etcd_stats = Arc::new(crate::etcd::EtcdStats::default());
    // The store: this CU's redb file, or etcd shared with other replicas.
    let (loaded, backend) = match cfg.etcd.clone() {
        None => {
            let store = Store::open(&cfg.store)?;
            (store.load()?, Ok(store))
        }
        Some(e) => {
            let s = crate::etcd::start(e, &etcd_stats).await?;
            registry.use_id_blocks();
            for b in s.blocks {
                registry.grant_ids(b);
            }
            (s.loaded, Err((s.task, s.online)))
        }
    };
    stats.counters.store_skipped.add(loaded.skipped);
    let restored = loaded.records.len();
    registry.restore_trust(loaded.tokens, loaded.enrolments);
    // The registry's clock: time since this start, picked once.
    let start = Instant::now();
    registry.restore(loaded.records, start.elapsed());
    let endpoint = quinn::Endpoint::server(server_cfg, cfg.listen)
        .with_context(|| format!("listening on {}", cfg.listen))?;
    let local = endpoint.local_addr()?;
    if let Some(tx) = bound {
        let _ = tx.send(local);
    }
    let pmon_stats = Arc::new(PmonStats::default());
    let picture = Arc::new(crate::web::Picture::default());
    if let Some(addr) = cfg.metrics {
        let (s, p, e) = (stats.clone(), pmon_stats.clone(), etcd_stats.clone());
        let replicated = cfg.etcd.is_some();
        let render = Arc::new(move |w: &mut PromWriter| {
            s.render(w);
            pmon_service::render(&p, w);
            if replicated {
                e.render(w);
            }
        });
        crate::web::serve(addr, render, picture.clone())
            .await
            .with_context(|| format!("serving metrics and the web view on {addr}"))?;
    }
    let pmon = pmon_service::Service::new(cfg.pmon, pmon_stats, picture);
    let (sink, from_replicas) = match backend {
        Ok(store) => {
            tracing::info!(listen = %local, restored, skipped = loaded.skipped, store = %cfg.store.display(), "CU running");
            let (store_tx, store_rx) = std::sync::mpsc::channel::<Record>();
            let st = stats.clone();
            std::thread::Builder::new()
                .name("cu-store".into())
                .spawn(move || store_loop(store, store_rx, &st))?;
            (Sink::Redb(store_tx), None)
        }
        Err((task, online)) => {
            let e = cfg.etcd.as_ref().expect("etcd mode");
            tracing::info!(listen = %local, restored, skipped = loaded.skipped, replica = %e.replica, endpoints = ?e.endpoints, "CU replica running on etcd");
            let (to_task, from_actor) = mpsc::unbounded_channel();
            let (to_actor, from_task) = mpsc::unbounded_channel();
            // Agents already held by other replicas: present, not pending.
            for r in online {
                let _ = to_actor.send(crate::etcd::ToActor::Remote(r));
            }
            let need_ids = Arc::new(tokio::sync::Notify::new());
            tokio::spawn(task.run(from_actor, need_ids.clone(), to_actor, etcd_stats.clone()));
            (Sink::Etcd(to_task, need_ids), Some(from_task))
        }
    };

    let (events_tx, events_rx) = mpsc::channel::<Event>(65536);
    if let Some(path) = reload_from {
        tokio::spawn(reload_on_sighup(path, events_tx.clone(), stats.clone()));
    }
    let actor = tokio::spawn(actor(
        registry,
        pmon,
        ca,
        start,
        events_rx,
        sink,
        from_replicas,
        stats.clone(),
    ));
    let shared = Arc::new(Shared {
        events: events_tx.clone(),
        stats: stats.clone(),
        next_conn: AtomicU64::new(1),
        relay_tls: crate::tls::relay_server_config(&cfg.cert, &cfg.key, &cfg.ca)
            .context("loading the CU certificate")?,
        relays_per_proxy: cfg.limits.relays_per_proxy,
        relayed_idle: idle,
    });
    let per_address = Arc::new(crate::per_address::PerAddress::new(
        cfg.limits.connections_per_address,
    ));
    let retry_above = u64::from(cfg.limits.retry_above_handshakes);
    let mut admission = crate::admission::HandshakeAdmission::new(
        u64::from(cfg.limits.max_handshakes),
        MAX_HANDSHAKES_IN_PROGRESS,
    );
    while let Some(incoming) = endpoint.accept().await {
        // Under load, a client proves it owns its address before it gets a
        // handshake (a Retry costs the CU one stateless packet).
        let handshakes = stats.handshakes.load(Ordering::Relaxed);
        let max_handshakes = admission.limit(
            start.elapsed(),
            stats.handshakes_established.load(Ordering::Relaxed),
            || stats.take_least_rtt(),
        );
        stats
            .handshake_limit
            .store(max_handshakes, Ordering::Relaxed);
        stats
            .handshake_rate
            .store(admission.rate() as u64, Ordering::Relaxed);
        if handshakes >= retry_above && !incoming.remote_address_validated() && incoming.may_retry()
        {
            stats.counters.retries.inc();
            if let Err(e) = incoming.retry() {
                e.into_incoming().ignore();
            }
            continue;
        }
        // Beyond what the CU finishes in time, a handshake only slows the
        // others down: refused before any TLS work, the client backs off
        // and comes back when the storm has thinned.
        if handshakes >= max_handshakes {
            stats.counters.busy.inc();
            incoming.refuse();
            continue;
        }
        let Some(slot) = per_address.take(incoming.remote_address().ip()) else {
            stats.counters.per_address.inc();
            incoming.refuse();
            continue;
        };
        let id = shared.next_conn.fetch_add(1, Ordering::Relaxed);
        tokio::spawn(connection(incoming, id, shared.clone(), slot));
    }
    actor.abort();
    Ok(())
}

/// SIGHUP: re-reads `[clouds]` from `path` and hands the grants to the
/// actor. A file that does not parse changes nothing (and is counted).
async fn reload_on_sighup(path: PathBuf, events: mpsc::Sender<Event>, stats: Arc<CuStats>) {
    use tokio::signal::unix::{signal, SignalKind};
    let Ok(mut hup) = signal(SignalKind::hangup()) else {
        tracing::warn!("cannot listen for SIGHUP: grants are fixed until a restart");
        return;
    };
    while hup.recv().await.is_some() {
        match CuConfig::load(&path).and_then(|c| c.grants()) {
            Ok(g) => {
                if events.send(Event::Reload(g)).await.is_err() {
                    return;
                }
            }
            Err(e) => {
                stats.counters.reload_failures.inc();
                tracing::error!(config = %path.display(), error = %format!("{e:#}"), "SIGHUP: keeping the grants in force");
            }
        }
    }
}

/// Commits what the actor persists, grouping everything queued meanwhile
/// into one transaction, and retries failed commits with backoff (see
/// `PendingWrites`) so a passing disk problem loses nothing.
fn store_loop(mut store: impl Backend, rx: std::sync::mpsc::Receiver<Record>, stats: &CuStats) {
    use std::sync::mpsc::RecvTimeoutError;
    let start = Instant::now();
    let mut pending = PendingWrites::default();
    loop {
        let got = match pending.poll_timeout() {
            None => rx.recv().map_err(|_| RecvTimeoutError::Disconnected),
            Some(at) => rx.recv_timeout(at.saturating_sub(start.elapsed())),
        };
        let closing = match got {
            Ok(r) => {
                pending.push(r);
                while let Ok(r) = rx.try_recv() {
                    pending.push(r);
                }
                false
            }
            Err(RecvTimeoutError::Timeout) => false,
            Err(RecvTimeoutError::Disconnected) => true,
        };
        // When the actor is gone, one last try whatever the backoff says.
        let now = if closing {
            Duration::MAX
        } else {
            start.elapsed()
        };
        match pending.write_due(now, &mut store) {
            Ok(_) => {}
            Err(e) => {
                stats.counters.store_errors.inc();
                tracing::error!(error = %e, retry_in = ?pending.backoff(), "store commit failed; will retry");
            }
        }
        if closing {
            return;
        }
    }
}

#[allow(clippy::too_many_arguments)]
async fn actor(
    mut registry: Registry,
    mut pmon: pmon_service::Service,
    ca: Ca,
    start: Instant,
    mut events: mpsc::Receiver<Event>,
    store: Sink,
    mut replicas: Option<mpsc::UnboundedReceiver<crate::etcd::ToActor>>,
    stats: Arc<CuStats>,
) {
    let mut handles: HashMap<ConnId, ConnHandle> = HashMap::new();
    let mut tick = tokio::time::interval(TICK);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut ticks: u64 = 0;
    loop {
        let actions = tokio::select! {
            ev = events.recv() => {
                let Some(ev) = ev else { return };
                match ev {
                    Event::Report { conn, report } => {
                        let out = pmon.report(&registry, conn, &report, wall_ms());
                        execute_pmon(out, &handles);
                        continue;
                    }
                    Event::Subscribe { conn, key, version, subscription, handle } => {
                        handles.insert(conn, handle);
                        let out = pmon.subscribe(&registry, conn, key, version, subscription, wall_ms());
                        execute_pmon(out, &handles);
                        continue;
                    }
                    Event::Gone { conn, .. } => pmon.gone(conn, registry.id_of(conn)),
                    _ => {}
                }
                handle_event(&mut registry, &ca, &mut handles, ev, start.elapsed(), &stats)
            }
            Some(m) = async { match replicas.as_mut() { Some(r) => r.recv().await, None => None } }, if replicas.is_some() => {
                let (actions, gone) = crate::etcd::on_actor(&mut registry, m, start.elapsed(), wall_ms());
                for (id, why) in gone {
                    count_leave(&stats, why);
                    tracing::info!(id, reason = why.label(), "agent gone (revoked on another replica)");
                }
                actions
            }
            _ = tick.tick() => {
                let (mut actions, gone) = registry.tick(start.elapsed());
                // Counting is a scan of the registry: once a tick, not after
                // every event (every heartbeat of 100,000 agents).
                stats.known.store(registry.len() as u64, Ordering::Relaxed);
                stats.online.store(registry.online() as u64, Ordering::Relaxed);
                ticks += 1;
                if ticks.is_multiple_of(FORGET_EVERY_TICKS) {
                    let (forget, n) = registry.forget_offline(wall_ms());
                    if n > 0 {
                        stats.counters.forgotten.add(n as u64);
                        tracing::info!(forgotten = n, "agents offline too long forgotten");
                    }
                    actions.extend(forget);
                }
                for (id, why) in gone {
                    count_leave(&stats, why);
                    tracing::info!(id, reason = why.label(), "agent gone");
                }
                execute_pmon(pmon.tick(&registry, start.elapsed(), wall_ms()), &handles);
                actions
            }
        };
        for a in actions {
            execute(a, &handles, &store, &registry, &stats);
        }
    }
}

fn count_leave(stats: &CuStats, why: crate::registry::LeaveReason) {
    use crate::registry::LeaveReason::*;
    let c = &stats.counters;
    match why {
        Goodbye => c.leave_goodbye.inc(),
        Closed => c.leave_closed.inc(),
        MissedHeartbeats => c.leave_silent.inc(),
        NotBack => c.leave_not_back.inc(),
        Revoked => c.leave_revoked.inc(),
    }
}

fn handle_event(
    registry: &mut Registry,
    ca: &Ca,
    handles: &mut HashMap<ConnId, ConnHandle>,
    ev: Event,
    now: Duration,
    stats: &CuStats,
) -> Vec<Action> {
    match ev {
        Event::Register {
            conn,
            key,
            reg,
            handle,
            via,
        } => {
            handles.insert(conn, handle);
            let (cloud, name, role) = (reg.cloud.clone(), reg.name.clone(), reg.role.clone());
            if let Some(via) = via {
                let proxy = matches!(reg.endpoints, Endpoints::Proxy { .. });
                if let Some(refused) = refuse_relay(registry, via, conn, &cloud, proxy) {
                    refused_as(
                        stats,
                        Refusal::Relay,
                        "registration",
                        &cloud,
                        &name,
                        &refused,
                    );
                    return refused;
                }
            }
            let (actions, refused) = registry.register(conn, key, reg, now, wall_ms());
            match refused {
                None => {
                    stats.counters.registrations.inc();
                    let id = registry.id_of(conn).unwrap_or(0);
                    if let Some(told) = handles.get_mut(&conn).and_then(|h| h.on_registered.take())
                    {
                        let _ = told.send(());
                    }
                    tracing::info!(id, %cloud, %name, %role, relayed = via.is_some(), "agent registered");
                }
                Some(why) => refused_as(stats, why, "registration", &cloud, &name, &actions),
            }
            actions
        }
        Event::Enrol {
            conn,
            enrol,
            handle,
            via,
        } => {
            handles.insert(conn, handle);
            let (cloud, name, role) = (enrol.cloud.clone(), enrol.name.clone(), enrol.role.clone());
            if let Some(via) = via {
                let proxy = role.split('.').next() == Some("PROXY");
                if let Some(refused) = refuse_relay(registry, via, conn, &cloud, proxy) {
                    refused_as(stats, Refusal::Relay, "enrolment", &cloud, &name, &refused);
                    return refused;
                }
            }
            let (actions, done) = registry.enrol(conn, enrol, wall_ms(), ca);
            match done {
                Ok(_) => {
                    stats.counters.enrolments.inc();
                    tracing::info!(%cloud, %name, %role, "agent enrolled");
                }
                Err(why) => refused_as(stats, why, "enrolment", &cloud, &name, &actions),
            }
            actions
        }
        Event::Admin {
            conn,
            key,
            version,
            request,
            handle,
        } => {
            handles.insert(conn, handle);
            let (actions, done) =
                registry.admin(conn, key, request, version, wall_ms(), &mut || {
                    crate::pki::new_token().ok()
                });
            match done {
                Ok(d) => {
                    stats.counters.admin_requests.inc();
                    match d {
                        AdminDone::TokenCreated(t) => {
                            tracing::info!(token = %t.id, cloud = %t.cloud, role = %t.role, uses = ?t.uses_left, "join token created")
                        }
                        AdminDone::Revoked { cloud, name, id } => {
                            stats.counters.revocations.inc();
                            if id.is_some() {
                                count_leave(stats, crate::registry::LeaveReason::Revoked);
                            }
                            tracing::warn!(%cloud, %name, ?id, "agent revoked");
                        }
                        AdminDone::Listed | AdminDone::TokensListed => {}
                    }
                }
                Err(why) => refused_as(stats, why, "admin request", "-", "-", &actions),
            }
            actions
        }
        Event::Reload(grants) => {
            stats.counters.reloads.inc();
            tracing::info!(clouds = grants.0.len(), "address grants reloaded");
            registry.set_grants(grants)
        }
        Event::Heartbeat(conn) => {
            registry.heartbeat(conn, now, wall_ms());
            vec![]
        }
        Event::Moved { conn, seen } => {
            let (actions, moved) = registry.proxy_moved(conn, seen);
            match moved {
                Ok(()) if !actions.is_empty() => {
                    tracing::info!(conn, %seen, "a proxy's NAT moved it: its peers are told")
                }
                Ok(()) => {}
                Err((why, text)) => {
                    tracing::warn!(conn, %seen, reason = why.label(), "a proxy moved to an address it may not use: {text}")
                }
            }
            actions
        }
        Event::Gone { conn, goodbye } => {
            handles.remove(&conn);
            let (actions, left) = registry.disconnected(conn, goodbye, wall_ms());
            if let Some((id, why)) = left {
                count_leave(stats, why);
                tracing::info!(id, reason = why.label(), "agent gone");
            }
            actions
        }
        // PMon's events are the actor's own (see `actor`).
        Event::Report { .. } | Event::Subscribe { .. } => vec![],
        Event::Resync(conn) => match registry.id_of(conn) {
            Some(id) => {
                stats.counters.resyncs.inc();
                vec![Action::Send {
                    conn,
                    msg: Outgoing::Config(registry.config_for(id)),
                }]
            }
            None => vec![],
        },
    }
}

/// What to do with a session relayed by `via` for `cloud` that the relay
/// may not carry (see `Registry::may_relay`); None: it may.
fn refuse_relay(
    registry: &Registry,
    via: ConnId,
    conn: ConnId,
    cloud: &str,
    proxy: bool,
) -> Option<Vec<Action>> {
    let why = if proxy {
        "a proxy registers on its own connection, not through a relay".to_string()
    } else {
        registry.may_relay(via, cloud).err()?
    };
    Some(vec![
        Action::Send {
            conn,
            msg: Outgoing::Refused(why.clone()),
        },
        Action::Close { conn, reason: why },
    ])
}

/// Counts and logs a refusal, with the text the peer was sent.
fn refused_as(
    stats: &CuStats,
    why: Refusal,
    what: &str,
    cloud: &str,
    name: &str,
    actions: &[Action],
) {
    stats.refused(why).inc();
    let text = actions.iter().find_map(|a| match a {
        Action::Send {
            msg: Outgoing::Refused(t),
            ..
        } => Some(t.as_str()),
        _ => None,
    });
    tracing::warn!(%cloud, %name, reason = why.label(), why = text.unwrap_or(""), "{what} refused");
}

/// Where the actor's records go: the store thread (redb), or the etcd
/// task of a replica.
enum Sink {
    Redb(std::sync::mpsc::Sender<Record>),
    /// Writes in order, and the claim of a new id block, which must not
    /// wait behind them.
    Etcd(
        mpsc::UnboundedSender<crate::etcd::FromActor>,
        Arc<tokio::sync::Notify>,
    ),
}

fn execute(
    a: Action,
    handles: &HashMap<ConnId, ConnHandle>,
    store: &Sink,
    registry: &Registry,
    stats: &CuStats,
) {
    use crate::etcd::FromActor;
    match a {
        Action::Persist(r) => match store {
            Sink::Redb(tx) => {
                let _ = tx.send(r);
            }
            Sink::Etcd(tx, _) => {
                let since = match &r {
                    Record::Agent(a) => registry.stamp(a.info.id),
                    _ => None,
                };
                let _ = tx.send(FromActor::Write(Box::new(r), since));
            }
        },
        Action::NeedIds => {
            if let Sink::Etcd(_, need_ids) = store {
                need_ids.notify_one();
            }
        }
        Action::Send { conn, msg } => {
            let Some(h) = handles.get(&conn) else { return };
            if let Err(mpsc::error::TrySendError::Full(_)) =
                h.tx.try_send(WriterMsg::Out(Box::new(msg)))
            {
                // The agent is behind: drop its backlog, send it the whole
                // picture when its writer catches up.
                h.resync.store(true, Ordering::Relaxed);
            }
        }
        Action::Close { conn, reason } => {
            let Some(h) = handles.get(&conn) else { return };
            if h.tx.try_send(WriterMsg::Close(reason.clone())).is_err() {
                h.peer.close(close_code::BY_CU, reason.as_bytes());
            }
        }
    }
    let _ = stats;
}

/// PMon's messages to its subscribers; a stream whose writer is behind
/// loses messages (it asked for news, not a log) rather than block anyone.
fn execute_pmon(out: Vec<pmon_service::Out>, handles: &HashMap<ConnId, ConnHandle>) {
    for o in out {
        let (conn, msg, last) = match o {
            pmon_service::Out::Send(c, m) => (c, m, false),
            pmon_service::Out::Last(c, m) => (c, m, true),
        };
        let Some(h) = handles.get(&conn) else {
            continue;
        };
        let _ = h.tx.try_send(WriterMsg::Msg(Box::new(msg)));
        if last && h.tx.try_send(WriterMsg::Close("done".into())).is_err() {
            h.peer.close(close_code::BY_CU, b"done");
        }
    }
}

fn count_bad(stats: &CuStats, e: &ControlError) {
    let c = &stats.counters;
    match e {
        ControlError::Oversized { .. } => c.bad_oversized.inc(),
        ControlError::Malformed(_) => c.bad_malformed.inc(),
        ControlError::Truncated(_) => c.bad_truncated.inc(),
    }
}

/// Takes one off a gauge when dropped.
struct Gauge<'a>(&'a AtomicU64);
impl Drop for Gauge<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Relay streams a proxy may open beyond those open now.
const RELAY_HEADROOM: u64 = 32;

/// Runs a handshake (QUIC's, or TLS inside a relayed stream) counted as
/// in progress, within `HANDSHAKE_TIMEOUT`; None if it failed (counted).
async fn handshake<T, E: std::fmt::Display>(
    stats: &CuStats,
    in_progress: &AtomicU64,
    hs: impl std::future::Future<Output = Result<T, E>>,
    failed: &str,
) -> Option<T> {
    in_progress.fetch_add(1, Ordering::Relaxed);
    let handshaking = Gauge(in_progress);
    let done = tokio::time::timeout(HANDSHAKE_TIMEOUT, hs).await;
    drop(handshaking);
    match done {
        Ok(Ok(t)) => {
            stats.handshakes_established.fetch_add(1, Ordering::Relaxed);
            Some(t)
        }
        Ok(Err(e)) => {
            stats.counters.handshake_failures.inc();
            tracing::debug!(error = %e, "{failed}");
            None
        }
        Err(_) => {
            stats.counters.handshake_failures.inc();
            None
        }
    }
}

/// What every connection task shares.
struct Shared {
    events: mpsc::Sender<Event>,
    stats: Arc<CuStats>,
    next_conn: AtomicU64,
    /// TLS for sessions proxies relay.
    relay_tls: Arc<rustls::ServerConfig>,
    /// Sessions one proxy may relay at once.
    relays_per_proxy: u32,
    /// A relayed session silent this long is gone: what a direct one's
    /// QUIC idle timeout is (its agent heartbeats well within it).
    relayed_idle: Duration,
}

/// Who is at the other end of a session, for its task.
struct SessionOf {
    id: ConnId,
    key: Option<KeyId>,
    /// The agent's address; a relayed one's is its proxy's.
    remote: std::net::SocketAddr,
    peer: Peer,
    /// The proxy connection relaying it.
    via: Option<ConnId>,
}

async fn connection(
    incoming: quinn::Incoming,
    id: ConnId,
    shared: Arc<Shared>,
    _slot: crate::per_address::AddressSlot,
) {
    let stats = &shared.stats;
    let Some(conn) = handshake(
        stats,
        &stats.handshakes,
        std::future::IntoFuture::into_future(incoming),
        "handshake failed",
    )
    .await
    else {
        return;
    };
    stats.observe_rtt(conn.rtt());
    stats.connections.fetch_add(1, Ordering::Relaxed);
    let _guard = Gauge(&stats.connections);
    let remote = conn.remote_address();
    // The TLS layer checked the chain against our CA; what identifies the
    // peer is its key.
    let key = match peer_key(&conn) {
        Ok(k) => k,
        Err(e) => {
            stats.counters.handshake_failures.inc();
            tracing::warn!(%remote, error = %e, "unreadable client certificate");
            conn.close(
                close_code::PROTOCOL.into(),
                b"unreadable client certificate",
            );
            return;
        }
    };
    let deadline = tokio::time::Instant::now() + REGISTER_TIMEOUT;
    let (send, recv) = match tokio::time::timeout_at(deadline, conn.accept_bi()).await {
        Ok(Ok(s)) => s,
        Ok(Err(_)) => return,
        Err(_) => {
            stats.counters.register_timeouts.inc();
            conn.close(close_code::TIMEOUT.into(), b"no control stream");
            return;
        }
    };
    let of = SessionOf {
        id,
        key,
        remote,
        peer: Peer::Quic(conn.clone()),
        via: None,
    };
    let io = stream::Duplex { recv, send };
    session(of, io, deadline, &shared, Some(&conn)).await;
}

/// A registered proxy's connection: every further stream its proxy opens
/// carries one app VM's session, TLS end to end inside it. Until the
/// registration is accepted the connection allows one stream, so nobody
/// else gets here.
async fn relays(
    conn: quinn::Connection,
    via: ConnId,
    registered: tokio::sync::oneshot::Receiver<()>,
    shared: Arc<Shared>,
) {
    if registered.await.is_err() || shared.relays_per_proxy == 0 {
        return;
    }
    // quinn keeps state for every stream the limit allows, open or not:
    // the limit follows the sessions open, with room for a burst, rather
    // than sitting at `relays_per_proxy` (about 90 bytes per allowed
    // stream, per proxy).
    let most = u64::from(shared.relays_per_proxy);
    let active = Arc::new(AtomicU64::new(0));
    let mut allowed = 0;
    let mut allow = |open: u64| {
        let want = (open + RELAY_HEADROOM).min(most);
        if want > allowed {
            allowed = want;
            // The proxy's own control stream is one of them.
            conn.set_max_concurrent_bi_streams(
                quinn::VarInt::from_u64(1 + want).unwrap_or(quinn::VarInt::MAX),
            );
        }
    };
    allow(0);
    let stats = &shared.stats;
    while let Ok((mut send, mut recv)) = conn.accept_bi().await {
        // A relayed handshake costs what a direct one does: the same
        // admission (its agent backs off and comes back, as when refused),
        // with a budget of its own. A storm of app VMs through their
        // proxies must not keep the proxies themselves out: 100,000 agents
        // behind 1,000 proxies once left 195 proxies refused for minutes,
        // and so their sites' VMs, while relayed handshakes held every place.
        let limit = stats.handshake_limit.load(Ordering::Relaxed).max(1);
        if stats.relayed_handshakes.load(Ordering::Relaxed) >= limit {
            stats.counters.busy.inc();
            let _ = send.reset(close_code::BUSY.into());
            let _ = recv.stop(close_code::BUSY.into());
            continue;
        }
        allow(active.fetch_add(1, Ordering::Relaxed) + 1);
        let id = shared.next_conn.fetch_add(1, Ordering::Relaxed);
        tokio::spawn(relayed(
            send,
            recv,
            id,
            via,
            conn.remote_address(),
            shared.clone(),
            active.clone(),
        ));
    }
}

/// One relayed session: its TLS handshake, then the session as over QUIC.
/// (Boxed with its type spelled out: a session spawns a proxy's relays,
/// which spawn relayed sessions, and only a named type ends that cycle.)
fn relayed(
    send: quinn::SendStream,
    recv: quinn::RecvStream,
    id: ConnId,
    via: ConnId,
    remote: std::net::SocketAddr,
    shared: Arc<Shared>,
    active: Arc<AtomicU64>,
) -> std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send>> {
    Box::pin(async move {
        let _open = Gauge(&active);
        let stats = &shared.stats;
        let acceptor = tokio_rustls::TlsAcceptor::from(shared.relay_tls.clone());
        // Boxed: the handshake holds the whole TLS state inline, and this
        // future would otherwise keep room for it for the session's life.
        let accept = Box::pin(acceptor.accept(tokio::io::join(recv, send)));
        let Some(tls) = handshake(
            stats,
            &stats.relayed_handshakes,
            accept,
            "relayed handshake failed",
        )
        .await
        else {
            return;
        };
        // Boxed at once: the TLS state (about 1.2 KiB) lives once, on the
        // heap, not inline in this future and again in the session's.
        let tls = Box::new(tls);
        stats.relayed.fetch_add(1, Ordering::Relaxed);
        let _guard = Gauge(&stats.relayed);
        let key = match tls.get_ref().1.peer_certificates() {
            None => None,
            Some(chain) => match chain.first().map(|c| crate::pki::key_of_certificate(c)) {
                Some(Ok(k)) => Some(k),
                _ => {
                    stats.counters.handshake_failures.inc();
                    tracing::warn!(%remote, "unreadable client certificate on a relayed session");
                    return;
                }
            },
        };
        let of = SessionOf {
            id,
            key,
            remote,
            peer: Peer::Relayed(Arc::new(tokio::sync::Notify::new())),
            via: Some(via),
        };
        let deadline = tokio::time::Instant::now() + REGISTER_TIMEOUT;
        session(of, stream::Bytes(tls), deadline, &shared, None).await;
    })
}

/// An agent's session, direct or relayed: its first message (by
/// `deadline`), then its messages and what the CU sends it, in one loop,
/// until it ends. `conn`: its own QUIC connection, if direct.
async fn session(
    of: SessionOf,
    mut io: impl FrameSource + FrameSink,
    deadline: tokio::time::Instant,
    shared: &Arc<Shared>,
    conn: Option<&quinn::Connection>,
) {
    let (stats, events) = (&shared.stats, &shared.events);
    let SessionOf {
        id,
        key,
        remote,
        peer,
        via,
    } = of;
    let mut dec = FrameDecoder::new(MAX_AGENT_FRAME);
    let bad = |e: &ControlError| {
        count_bad(stats, e);
        tracing::warn!(%remote, error = %e, "dropping connection: bad message");
        peer.close(close_code::PROTOCOL, e.to_string().as_bytes());
    };
    let first = match tokio::time::timeout_at(deadline, stream::read_msg(&mut io, &mut dec)).await {
        Err(_) => {
            stats.counters.register_timeouts.inc();
            tracing::debug!(%remote, "no registration");
            peer.close(
                close_code::TIMEOUT,
                format!("no registration within {} s", REGISTER_TIMEOUT.as_secs()).as_bytes(),
            );
            return;
        }
        Ok(Err(ReadFail::Bad(e))) => return bad(&e),
        Ok(Err(ReadFail::Lost(..))) | Ok(Ok(None)) => return,
        Ok(Ok(Some(m))) => m,
    };
    let (tx, mut rx) = mpsc::channel(WRITER_QUEUE);
    let resync = Arc::new(AtomicBool::new(false));
    let mut handle = ConnHandle {
        tx,
        resync: resync.clone(),
        peer: peer.clone(),
        on_registered: None,
    };
    // A proxy that left its address to us: its connection's address is its
    // address, also when its NAT maps it elsewhere later (QUIC follows).
    let mut observed = false;
    let ev = match (first, via) {
        (AgentMsg::Register(mut reg), _) => {
            if let (Some(conn), Endpoints::Proxy { pon, .. }) = (conn, &reg.endpoints) {
                observed = pon.ip().is_unspecified();
                let (told, registered) = tokio::sync::oneshot::channel();
                handle.on_registered = Some(told);
                tokio::spawn(relays(conn.clone(), id, registered, shared.clone()));
            }
            if via.is_none() {
                reg.endpoints = crate::registry::with_observed_address(reg.endpoints, remote.ip());
            }
            Event::Register {
                conn: id,
                key,
                reg,
                handle,
                via,
            }
        }
        (AgentMsg::Enrol(enrol), _) => Event::Enrol {
            conn: id,
            enrol,
            handle,
            via,
        },
        (AgentMsg::Admin { version, request }, None) => Event::Admin {
            conn: id,
            key,
            version,
            request,
            handle,
        },
        (
            AgentMsg::Subscribe {
                version,
                subscription,
            },
            None,
        ) => Event::Subscribe {
            conn: id,
            key,
            version,
            subscription,
            handle,
        },
        _ => {
            stats.counters.bad_unexpected.inc();
            let why = match via {
                None => "the first message must be Register",
                Some(_) => "a relayed session may only register or enrol",
            };
            peer.close(close_code::PROTOCOL, why.as_bytes());
            return;
        }
    };
    // Boxed while it waits for room in the actor's queue: an `Event` is
    // hundreds of bytes this future would otherwise keep room for.
    let ev = Box::new(ev);
    if tell(events, move || *ev).await.is_err() {
        return;
    }
    // One task reads the agent's messages and writes what the CU sends it
    // (a task per direction was a third of a relayed session's memory).
    let mut out = Outbound::default();
    let mut goodbye = false;
    let mut seen_at = remote.ip();
    // A relayed session has no QUIC idle timeout of its own (its proxy's
    // connection lives on): an agent silent for longer than an idle
    // connection would be is gone.
    let end = match &peer {
        Peer::Quic(_) => None,
        Peer::Relayed(end) => Some(end.clone()),
    };
    let mut read_by = tokio::time::Instant::now() + shared.relayed_idle;
    // Whether what the actor still has for the agent can go out when the
    // reading ends.
    let mut writable = true;
    loop {
        let step = tokio::select! {
            biased;
            _ = async { match &end { Some(e) => e.notified().await, None => std::future::pending().await } } => break,
            n = rx.recv_many(&mut out.batch, WRITER_QUEUE), if out.flush_at.is_none() => Step::Queued(n),
            _ = tokio::time::sleep_until(out.flush_at.unwrap_or(read_by)), if out.flush_at.is_some() => Step::Flush,
            _ = tokio::time::sleep_until(read_by), if end.is_some() => {
                stats.counters.relayed_idle.inc();
                break;
            }
            got = stream::read_msg(&mut io, &mut dec) => Step::Read(got),
        };
        let got = match step {
            // The actor let go of this session: nothing more to say.
            Step::Queued(0) => break,
            Step::Queued(_) => {
                // At most one flush per window: an idle agent hears of a
                // join at once, while during a burst of joins each agent
                // gets one frame per window instead of a packet per join
                // (the cost that grows with the square of the population).
                let window = coalesce_window(stats.sessions());
                let now = tokio::time::Instant::now();
                if let Some(at) = out.last_flush.map(|t| t + window).filter(|at| *at > now) {
                    out.flush_at = Some(at);
                    continue;
                }
                None
            }
            Step::Flush => {
                out.flush_at = None;
                while out.batch.len() < WRITER_QUEUE {
                    match rx.try_recv() {
                        Ok(m) => out.batch.push(m),
                        Err(_) => break,
                    }
                }
                None
            }
            Step::Read(got) => Some(got),
        };
        let Some(got) = got else {
            // Boxed: a flush's state is large and short-lived.
            if let Flushed::Ended = Box::pin(out.flush(&mut io, &peer, remote, stats)).await {
                writable = false;
                break;
            }
            if resync.swap(false, Ordering::Relaxed)
                && tell(events, || Event::Resync(id)).await.is_err()
            {
                return;
            }
            continue;
        };
        read_by = tokio::time::Instant::now() + shared.relayed_idle;
        match got {
            Ok(Some(AgentMsg::Heartbeat)) => {
                if tell(events, || Event::Heartbeat(id)).await.is_err() {
                    return;
                }
                let Some(conn) = conn.filter(|_| observed) else {
                    continue;
                };
                let now_at = conn.remote_address().ip();
                if now_at != seen_at {
                    seen_at = now_at;
                    let moved = || Event::Moved {
                        conn: id,
                        seen: now_at,
                    };
                    if tell(events, moved).await.is_err() {
                        return;
                    }
                }
            }
            Ok(Some(AgentMsg::Goodbye)) => {
                goodbye = true;
                break;
            }
            Ok(Some(AgentMsg::Report(report))) if via.is_none() => {
                // Whose it is, the actor decides from the registration.
                if tell(events, || Event::Report { conn: id, report })
                    .await
                    .is_err()
                {
                    return;
                }
            }
            Ok(Some(_)) => {
                stats.counters.bad_unexpected.inc();
                peer.close(
                    close_code::PROTOCOL,
                    b"unexpected message after registration",
                );
                break;
            }
            Ok(None) | Err(ReadFail::Lost(..)) => break,
            Err(ReadFail::Bad(e)) => {
                bad(&e);
                break;
            }
        }
    }
    let _ = tell(events, || Event::Gone { conn: id, goodbye }).await;
    // What the actor answered before it heard of the end still goes out:
    // a one-shot client (an enrolment, ponctl) finishes its side of the
    // stream right after asking. The actor lets go of the queue on `Gone`.
    while writable && rx.recv_many(&mut out.batch, WRITER_QUEUE).await > 0 {
        writable = matches!(
            Box::pin(out.flush(&mut io, &peer, remote, stats)).await,
            Flushed::Open
        );
    }
}

/// The key of the client certificate on `conn`, if it presented one.
fn peer_key(conn: &quinn::Connection) -> Result<Option<KeyId>, String> {
    use rustls::pki_types::CertificateDer;
    let Some(any) = conn.peer_identity() else {
        return Ok(None);
    };
    let chain = any
        .downcast::<Vec<CertificateDer<'static>>>()
        .map_err(|_| "no certificate chain".to_string())?;
    let leaf = chain.first().ok_or("empty certificate chain")?;
    crate::pki::key_of_certificate(leaf).map(Some)
}

fn to_msg(o: Outgoing) -> CuMsg {
    match o {
        Outgoing::Config(c) => CuMsg::Config(c),
        Outgoing::Changes(c) => CuMsg::Update(c),
        Outgoing::Refused(r) => CuMsg::Refused(r),
        Outgoing::Registry(r) => CuMsg::Registry(r),
        Outgoing::Enrolled(certificate) => CuMsg::Enrolled { certificate },
        Outgoing::Token(token, info) => CuMsg::Token { token, info },
        Outgoing::Tokens(t) => CuMsg::Tokens(t),
        Outgoing::Revoked(id) => CuMsg::Revoked { id },
    }
}

/// Hands the actor an event, waiting for room in its queue. The room is
/// reserved first and the event made after: a session waiting here then
/// does not hold an `Event` (hundreds of bytes) in its state.
async fn tell(events: &mpsc::Sender<Event>, ev: impl FnOnce() -> Event) -> Result<(), ()> {
    let permit = events.reserve().await.map_err(|_| ())?;
    permit.send(ev());
    Ok(())
}

/// What one turn of a session's loop brought.
enum Step {
    /// Messages for the agent (0: the actor let go of the session).
    Queued(usize),
    /// The coalescing window is over: send what waited for it.
    Flush,
    Read(Result<Option<AgentMsg>, ReadFail>),
}

/// Whether a session goes on after a flush.
enum Flushed {
    Open,
    /// Closed by the CU (a refusal, a revocation) or the agent stopped
    /// reading or went away.
    Ended,
}

/// The CU's side of a session's sending: messages taken from the actor's
/// queue, and when the last flush was (and the next may be).
#[derive(Default)]
struct Outbound {
    batch: Vec<WriterMsg>,
    last_flush: Option<tokio::time::Instant>,
    flush_at: Option<tokio::time::Instant>,
}

impl Outbound {
    /// Sends the batch: consecutive updates as one frame (or as few as the
    /// frame limit allows), so a burst of joins costs each agent a handful
    /// of writes rather than one per join.
    async fn flush(
        &mut self,
        io: &mut impl FrameSink,
        peer: &Peer,
        remote: std::net::SocketAddr,
        stats: &CuStats,
    ) -> Flushed {
        let mut frames = Vec::new();
        let mut changes = Vec::new();
        let mut close = None;
        let flush = |changes: &mut Vec<_>, frames: &mut Vec<Vec<u8>>| {
            if !changes.is_empty() {
                let f = control::encode_updates(changes, MAX_CU_FRAME);
                stats.counters.update_frames.add(f.len() as u64);
                frames.extend(f);
                changes.clear();
            }
        };
        for m in self.batch.drain(..) {
            match m {
                WriterMsg::Out(o) => match *o {
                    Outgoing::Changes(c) => changes.extend(c),
                    o => {
                        flush(&mut changes, &mut frames);
                        if matches!(o, Outgoing::Config(_)) {
                            stats.counters.config_frames.inc();
                        }
                        frames.push(control::encode(&to_msg(o)));
                    }
                },
                WriterMsg::Msg(m) => {
                    flush(&mut changes, &mut frames);
                    frames.push(control::encode(&*m));
                }
                WriterMsg::Close(r) => {
                    close = Some(r);
                    break;
                }
            }
        }
        flush(&mut changes, &mut frames);
        self.last_flush = Some(tokio::time::Instant::now());
        let written = async {
            for f in &frames {
                io.write_all(f).await?;
            }
            io.flush().await
        };
        match tokio::time::timeout(STALL_TIMEOUT, written).await {
            Ok(Ok(())) => {}
            Ok(Err(_)) => return Flushed::Ended,
            Err(_) => {
                stats.counters.stalled.inc();
                tracing::warn!(%remote, "agent does not read its updates; closing");
                peer.close(close_code::TIMEOUT, b"stalled: updates not read");
                return Flushed::Ended;
            }
        }
        if let Some(reason) = close {
            // Let the last frames (e.g. a refusal) reach the agent first.
            io.end().await;
            peer.close(close_code::BY_CU, reason.as_bytes());
            return Flushed::Ended;
        }
        Flushed::Open
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::StoreError;

    fn rec(id: u32, last_seen_ms: u64) -> Record {
        Record::Agent(pon_proto::control::AgentRecord {
            last_seen_ms,
            ..crate::store::tests::rec(id)
        })
    }

    #[test]
    fn a_failed_store_write_is_retried_and_lands() {
        let (landed_tx, landed) = std::sync::mpsc::channel();
        let mut fail = 1;
        let backend = move |records: &[Record]| {
            if fail > 0 {
                fail -= 1;
                return Err(StoreError::Db("disk full".into()));
            }
            landed_tx.send(records.to_vec()).unwrap();
            Ok(())
        };
        let stats = Arc::new(CuStats::default());
        let (tx, rx) = std::sync::mpsc::channel();
        let st = stats.clone();
        let thread = std::thread::spawn(move || store_loop(backend, rx, &st));
        tx.send(rec(1, 10)).unwrap();
        let got = landed
            .recv_timeout(Duration::from_secs(10))
            .expect("the failed write never landed");
        assert_eq!(got, vec![rec(1, 10)]);
        assert_eq!(stats.counters.store_errors.get(), 1);
        drop(tx);
        thread.join().unwrap();
    }
}
