//! The CU client every PON daemon embeds: a thread with its own small tokio
//! runtime that connects (retrying with backoff), registers, sends
//! heartbeats, reconnects after losing the CU, and hands each new view to
//! the daemon. The daemon's data path never waits on it. It only does the
//! I/O: what a failure means (retry, report, or give up at a first start)
//! is the session's policy.

use crate::session::{Failure, Session, SessionAction, Verdict};
pub(crate) use crate::stream::failure_of;
use crate::stream::{FrameSink, FrameSource, ReadFail};
use crate::targets::CuAddrs;
use crate::tls;
use crate::view::View;
use pon_identity::Identity;
use pon_proto::control::{
    AgentMsg, CuMsg, Endpoints, FrameDecoder, PublicKey, Register, MAX_CU_FRAME, PROTOCOL_VERSION,
};
use pon_telemetry::PromWriter;
use serde::{Deserialize, Serialize};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::watch;

/// The `[cu]` section of an agent's configuration.
#[derive(Debug, Clone, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct CuClientConfig {
    /// The CU's QUIC address: `host:port` (a DNS name, resolved at every
    /// connection attempt, or an address), or a list of them tried in turn
    /// after failures.
    pub addr: CuAddrs,
    /// Name in the CU's certificate.
    #[serde(default = "default_server_name")]
    pub server_name: String,
    /// The CA certificate (PEM) made by `pon-cu init` (relative to this
    /// file).
    #[schemars(extend("format" = "path"))]
    pub ca: PathBuf,
    /// The join token (`ponctl token create`), inline; or give
    /// `token_file`. Needed only until the agent has enrolled: from then on
    /// its certificate in its state directory authenticates it.
    #[serde(default)]
    pub token: Option<String>,
    /// The join token in a file (relative to this file), instead of
    /// `token`.
    #[serde(default)]
    #[schemars(extend("format" = "path"))]
    pub token_file: Option<PathBuf>,
    /// This agent's cloud (site) id.
    pub cloud: String,
    /// Dotted role, e.g. `PROXY.SRC` or `APP` (default: `PROXY` for a
    /// proxy, `APP` for an agent).
    pub role: Option<String>,
    /// Stable name within the cloud (default: the agent's address).
    #[serde(default)]
    pub name: Option<String>,
    /// App VMs: their site proxies' relay listeners (`relay_listen`),
    /// tried in turn before the CU itself. The session then runs TLS to the
    /// CU inside TCP to the proxy and a stream of the proxy's own
    /// connection: the CU holds a third of the memory it holds for a
    /// connection of the agent's own, and the proxy reads and forges
    /// nothing. After a relay fails the next is tried, then the CU
    /// directly, with the usual backoff. Enrolment (the first start with a
    /// token) always goes to the CU directly.
    #[serde(default)]
    pub relay: Vec<SocketAddr>,
    /// Proxies: where to listen (TCP) for the site's app VMs whose `relay`
    /// names this proxy, and carry their sessions to the CU. The CU accepts
    /// on a proxy's streams only agents of the proxy's cloud. None: relay
    /// nothing.
    #[serde(default)]
    pub relay_listen: Option<SocketAddr>,
}

fn default_server_name() -> String {
    "pon-cu".into()
}

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("[cu] has both `token` and `token_file`: give one")]
    Token,
    #[error(
        "this agent has not enrolled yet (no certificate in {state_dir}) and [cu] has no \
         `token` or `token_file` to enrol with"
    )]
    NoToken { state_dir: String },
    #[error("[cu] the certificate in {path}: {why}")]
    Certificate { path: String, why: String },
    #[error("identity: {0}")]
    Identity(#[from] pon_identity::IdentityError),
    #[error("[cu] token_file {path}: {err}")]
    TokenFile { path: String, err: std::io::Error },
    #[error("[cu] {field} = {value:?} is invalid: {why}")]
    Field {
        field: &'static str,
        value: String,
        why: &'static str,
    },
    #[error("[cu] ca: {0}")]
    Tls(#[from] tls::TlsError),
    #[error("starting the CU client thread: {0}")]
    Io(#[from] std::io::Error),
}

impl CuClientConfig {
    /// The token, read from the file if given there; None if neither is.
    pub fn token(&self) -> Result<Option<String>, ClientError> {
        match (&self.token, &self.token_file) {
            (Some(t), None) => Ok(Some(t.trim().to_string())),
            (None, Some(p)) => std::fs::read_to_string(p)
                .map(|s| Some(s.trim().to_string()))
                .map_err(|err| ClientError::TokenFile {
                    path: p.display().to_string(),
                    err,
                }),
            (None, None) => Ok(None),
            (Some(_), Some(_)) => Err(ClientError::Token),
        }
    }

    /// Checks the fields and builds the registration for this agent, whose
    /// static Noise key is `noise_key`.
    pub fn register(
        &self,
        default_role: &str,
        default_name: &str,
        endpoints: Endpoints,
        id_hint: Option<u32>,
        noise_key: PublicKey,
    ) -> Result<Register, ClientError> {
        if self.token.is_some() && self.token_file.is_some() {
            return Err(ClientError::Token);
        }
        let role = self.role.clone().unwrap_or_else(|| default_role.into());
        let name = self.name.clone().unwrap_or_else(|| default_name.into());
        if !pon_proto::control::valid_role(&role) {
            return Err(ClientError::Field {
                field: "role",
                value: role,
                why: "expected dotted upper-case words, e.g. PROXY.SRC",
            });
        }
        let proxy = role.split('.').next() == Some("PROXY");
        if proxy && !self.relay.is_empty() {
            return Err(ClientError::Field {
                field: "relay",
                value: format!("{:?}", self.relay),
                why: "a proxy connects to the CU itself (it is what relays app VMs)",
            });
        }
        if let (false, Some(l)) = (proxy, self.relay_listen) {
            return Err(ClientError::Field {
                field: "relay_listen",
                value: l.to_string(),
                why: "only a proxy relays app VMs' sessions",
            });
        }
        for (field, value) in [("cloud", &self.cloud), ("name", &name)] {
            if !pon_proto::control::valid_name(value) {
                return Err(ClientError::Field {
                    field,
                    value: value.clone(),
                    why: "1-64 characters of [A-Za-z0-9-_.@:/]",
                });
            }
        }
        Ok(Register {
            version: PROTOCOL_VERSION,
            cloud: self.cloud.clone(),
            role,
            name,
            endpoints,
            id_hint,
            noise_key,
        })
    }

    /// Resolves relative paths against the directory of the config file.
    pub fn relative_to(mut self, config_file: &Path) -> Self {
        let base = config_file.parent().unwrap_or(Path::new("."));
        self.ca = base.join(&self.ca);
        self.token_file = self.token_file.map(|p| base.join(p));
        self
    }
}

pon_telemetry::counters! {
    pub struct ClientCounters {
        connects => ("pon_cu_client_connects_total", "", "Connections established with the CU."),
        refused => ("pon_cu_client_connect_failures_total", "reason=\"refused\"", "Attempts to reach the CU that failed and connections to it that ended, by reason."),
        tls => ("pon_cu_client_connect_failures_total", "reason=\"tls\"", "Attempts to reach the CU that failed and connections to it that ended, by reason."),
        timeout => ("pon_cu_client_connect_failures_total", "reason=\"timeout\"", "Attempts to reach the CU that failed and connections to it that ended, by reason."),
        closed => ("pon_cu_client_connect_failures_total", "reason=\"closed\"", "Attempts to reach the CU that failed and connections to it that ended, by reason."),
        bad_message => ("pon_cu_client_connect_failures_total", "reason=\"bad_message\"", "Attempts to reach the CU that failed and connections to it that ended, by reason."),
        config => ("pon_cu_client_connect_failures_total", "reason=\"config\"", "Attempts to reach the CU that failed and connections to it that ended, by reason."),
        resolve => ("pon_cu_client_connect_failures_total", "reason=\"resolve\"", "Attempts to reach the CU that failed and connections to it that ended, by reason."),
        configs => ("pon_cu_client_messages_total", "kind=\"config\"", "Messages received from the CU."),
        updates => ("pon_cu_client_messages_total", "kind=\"update\"", "Messages received from the CU."),
        bad_messages => ("pon_cu_client_bad_messages_total", "", "Malformed or oversized messages from the CU (the connection is dropped)."),
        enrolments => ("pon_cu_client_enrolments_total", "", "Certificates obtained from the CU with the join token."),
    }
}

impl ClientCounters {
    /// The counter of failures for `why`.
    pub fn failures(&self, why: Failure) -> &pon_telemetry::Counter {
        match why {
            Failure::Refused => &self.refused,
            Failure::Tls => &self.tls,
            Failure::Timeout => &self.timeout,
            Failure::Closed => &self.closed,
            Failure::BadMessage => &self.bad_message,
            Failure::Config => &self.config,
            Failure::Resolve => &self.resolve,
        }
    }
}

/// Measurements the daemon offers the CU (PMon): the latest only; the
/// client thread sends it when it is news (see [`ReportPacer`]).
#[derive(Default)]
pub struct Reports {
    latest: std::sync::Mutex<Option<pon_proto::pmon::Report>>,
    ready: tokio::sync::Notify,
}

/// A report goes to the CU at once when a route or a destination's
/// reachability changed, and otherwise at most every [`REPORT_EVERY`], so
/// events reach the CU within one status period of the router's decision
/// while steady values cost one small message a second.
pub const REPORT_EVERY: Duration = Duration::from_secs(1);

/// When to send a report (sans-I/O: the client thread asks it with `now`).
#[derive(Debug, Default)]
pub struct ReportPacer {
    last: Option<(pon_proto::pmon::Report, Duration)>,
}

impl ReportPacer {
    /// Whether `r`, offered at `now`, should be sent; if so it is recorded
    /// as sent.
    pub fn due(&mut self, r: &pon_proto::pmon::Report, now: Duration) -> bool {
        let shape = |r: &pon_proto::pmon::Report| {
            r.destinations
                .iter()
                .map(|d| (d.dst, d.reachable, d.route.clone()))
                .collect::<Vec<_>>()
        };
        let due = match &self.last {
            None => true,
            Some((last, at)) => shape(last) != shape(r) || now.saturating_sub(*at) >= REPORT_EVERY,
        };
        if due {
            self.last = Some((r.clone(), now));
        }
        due
    }
}

/// What the daemon can read about its CU client.
pub struct ClientStatus {
    pub counters: ClientCounters,
    /// The CU-assigned id (0 until registered; kept, with the view, after).
    pub id: AtomicU32,
    /// 1 while registered.
    pub registered: AtomicU32,
    /// When the client started ...
    started: Instant,
    /// ... and when it was last registered, in ms after that (0: never).
    lost_at_ms: AtomicU64,
    /// What the daemon measured, for the CU.
    reports: Reports,
    /// A proxy's relay for its site's app VMs (see `relay_listen`).
    pub relay: Arc<crate::relay::RelayStatus>,
    relaying: std::sync::atomic::AtomicBool,
}

impl Default for ClientStatus {
    fn default() -> Self {
        ClientStatus {
            counters: ClientCounters::default(),
            id: AtomicU32::new(0),
            registered: AtomicU32::new(0),
            started: Instant::now(),
            lost_at_ms: AtomicU64::new(0),
            reports: Reports::default(),
            relay: Arc::default(),
            relaying: Default::default(),
        }
    }
}

impl ClientStatus {
    /// The registration ended now.
    fn lost(&self) {
        if self.registered.swap(0, Ordering::Relaxed) == 1 {
            let ms = self.started.elapsed().as_millis() as u64;
            self.lost_at_ms.store(ms, Ordering::Relaxed);
        }
    }

    /// Offers the CU the daemon's latest measurements; never waits. The
    /// client thread sends them while registered, when they are news.
    pub fn offer_report(&self, r: pon_proto::pmon::Report) {
        if let Ok(mut l) = self.reports.latest.lock() {
            *l = Some(r);
        }
        self.reports.ready.notify_one();
    }

    fn take_report(&self) -> Option<pon_proto::pmon::Report> {
        self.reports.latest.lock().ok()?.take()
    }

    /// How long since this agent was last registered with the CU: zero
    /// while it is, the time since start if it never was.
    pub fn since_contact(&self) -> Duration {
        if self.registered.load(Ordering::Relaxed) == 1 {
            return Duration::ZERO;
        }
        let lost = Duration::from_millis(self.lost_at_ms.load(Ordering::Relaxed));
        self.started.elapsed().saturating_sub(lost)
    }

    pub fn render(&self, w: &mut PromWriter) {
        self.counters.render(w);
        if self.relaying.load(Ordering::Relaxed) {
            self.relay.render(w);
        }
        w.gauge(
            "pon_cu_client_registered",
            "",
            "1 while registered with the CU.",
            f64::from(self.registered.load(Ordering::Relaxed)),
        );
        w.gauge(
            "pon_cu_client_seconds_since_contact",
            "",
            "Seconds since the agent was last registered with the CU (0 while registered, since start if never); with pon_cu_client_id > 0 it forwards on its last view meanwhile.",
            self.since_contact().as_secs_f64(),
        );
        w.gauge(
            "pon_cu_client_id",
            "",
            "The id the CU assigned to this agent.",
            f64::from(self.id.load(Ordering::Relaxed)),
        );
    }
}

/// How long without a packet from the CU before the connection counts as
/// lost; QUIC keep-alives make sure a healthy idle link never gets there.
pub const CU_IDLE_TIMEOUT: Duration = Duration::from_secs(3);
const REGISTER_TIMEOUT: Duration = Duration::from_secs(5);

pub type ViewCallback = Box<dyn FnMut(&View) + Send>;
pub type FatalCallback = Box<dyn FnOnce(String) + Send>;

/// Starts the client thread. An agent without a certificate in its state
/// directory first enrols with the join token (retrying while the CU is
/// unreachable) and keeps the certificate; from then on it connects with
/// mutual TLS. `on_view` runs on that thread after every change (batched:
/// once per burst of messages); `on_fatal` runs only on a first-start
/// misconfiguration (no view yet, and the CU refuses this agent or its TLS
/// handshake fails: see [`crate::session`]), or if the client cannot start
/// at all. Anything else is retried for as long as the process runs,
/// reported in the log and the metrics. With `goodbye_on_signal`,
/// SIGTERM/SIGINT send a goodbye (so others hear at once) and then exit the
/// process.
pub fn spawn(
    cfg: &CuClientConfig,
    identity: Arc<Identity>,
    register: Register,
    on_view: ViewCallback,
    on_fatal: FatalCallback,
    goodbye_on_signal: bool,
) -> Result<Arc<ClientStatus>, ClientError> {
    let credentials = crate::enrolment::Credentials::new(cfg, identity, &register)?;
    let status = Arc::new(ClientStatus::default());
    let st = status.clone();
    let targets = Targets {
        addrs: cfg.addr.clone(),
        relays: cfg.relay.clone(),
        server_name: cfg.server_name.clone(),
    };
    // Bound here, so that an address in use is a start-up error.
    let relay_listener = match cfg.relay_listen {
        None => None,
        Some(addr) => {
            let l = std::net::TcpListener::bind(addr).map_err(|e| {
                std::io::Error::new(e.kind(), format!("[cu] relay_listen {addr}: {e}"))
            })?;
            l.set_nonblocking(true)?;
            status.relaying.store(true, Ordering::Relaxed);
            Some(l)
        }
    };
    std::thread::Builder::new()
        .name("cu-client".into())
        .spawn(move || {
            let rt = match tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            {
                Ok(rt) => rt,
                Err(e) => return on_fatal(format!("starting the CU client runtime: {e}")),
            };
            let fatal = rt.block_on(async move {
                let (cu_tx, cu_rx) = watch::channel(None);
                if let Some(l) = relay_listener {
                    match tokio::net::TcpListener::from_std(l) {
                        Ok(l) => {
                            tracing::info!(listen = %l.local_addr().map(|a| a.to_string()).unwrap_or_default(), "relaying the site's app VMs' sessions to the CU");
                            tokio::spawn(crate::relay::serve(l, cu_rx, st.relay.clone(), CU_IDLE_TIMEOUT));
                        }
                        Err(e) => return format!("relay listener: {e}"),
                    }
                }
                run(
                    targets,
                    credentials,
                    register,
                    on_view,
                    st,
                    goodbye_on_signal,
                    cu_tx,
                )
                .await
            });
            on_fatal(fatal);
        })?;
    Ok(status)
}

/// Where the client goes: the CU's addresses, and the relays before them.
struct Targets {
    addrs: CuAddrs,
    relays: Vec<SocketAddr>,
    server_name: String,
}

impl Targets {
    /// The relay attempt `attempt` goes through, if it goes through one:
    /// each relay in turn, then the CU directly, then round again.
    fn relay(&self, attempt: usize) -> Option<SocketAddr> {
        let n = self.relays.len();
        (n > 0)
            .then(|| attempt % (n + 1))
            .and_then(|i| self.relays.get(i).copied())
    }

    /// Which of the CU's own addresses a direct attempt tries: the direct
    /// attempts counted alone, so that each of the CU's addresses gets its
    /// turn whatever the number of relays.
    fn direct(&self, attempt: usize) -> usize {
        attempt / (self.relays.len() + 1)
    }
}

pub(crate) fn seed() -> u64 {
    let t = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    (t.as_nanos() as u64) ^ (u64::from(std::process::id()) << 32)
}

enum Ended {
    Failed(Failure, String),
    Exit,
}

async fn run(
    targets: Targets,
    credentials: crate::enrolment::Credentials,
    register: Register,
    mut on_view: ViewCallback,
    status: Arc<ClientStatus>,
    goodbye_on_signal: bool,
    relay_cu: watch::Sender<Option<quinn::Connection>>,
) -> String {
    let Targets {
        addrs,
        relays: _,
        server_name,
    } = &targets;
    let mut endpoint = match CuAddrs::endpoint() {
        Ok(e) => e,
        Err(e) => return format!("opening the CU client socket: {e}"),
    };
    let mut signals = goodbye_on_signal.then(Signals::new).flatten();
    // Failed attempts so far: which of the CU's addresses is tried next.
    let mut attempt = 0usize;
    let enrolled = tokio::select! {
        q = credentials.client_config(&endpoint, addrs, server_name, &status, &mut attempt) => q,
        _ = Signals::wait(&mut signals) => std::process::exit(0),
    };
    let relay_tls = match enrolled {
        Ok(ready) => {
            endpoint.set_default_client_config(ready.quic);
            ready.tls
        }
        Err(fatal) => return fatal,
    };
    // The session's clock: time since this start, picked once.
    let start = Instant::now();
    let mut session = Session::new(register, start.elapsed(), seed());
    loop {
        let now = start.elapsed();
        match session.poll(now) {
            Some(SessionAction::Connect) => {}
            _ => {
                let at = session
                    .next_deadline()
                    .unwrap_or(now + Duration::from_secs(1));
                tokio::select! {
                    _ = tokio::time::sleep_until((start + at).into()) => {}
                    _ = Signals::wait(&mut signals) => std::process::exit(0),
                }
                continue;
            }
        }
        let mut io = Io {
            start,
            session: &mut session,
            on_view: &mut on_view,
            status: &status,
            signals: &mut signals,
        };
        let ended = match targets.relay(attempt) {
            Some(relay) => {
                let connecting =
                    crate::relay::connect(relay, relay_tls.clone(), server_name, CU_IDLE_TIMEOUT);
                let tls = tokio::select! {
                    t = connecting => t,
                    _ = Signals::wait(io.signals) => std::process::exit(0),
                };
                match tls {
                    Err((why, detail)) => Ended::Failed(why, detail),
                    Ok(tls) => {
                        status.counters.connects.inc();
                        tracing::debug!(%relay, "connected to the CU through a relay");
                        let (r, w) = tokio::io::split(tls);
                        let ended = io
                            .serve(crate::stream::Bytes(w), crate::stream::Bytes(r), None)
                            .await;
                        status.lost();
                        ended
                    }
                }
            }
            None => {
                let picked = addrs
                    .pick(targets.direct(attempt), |a| {
                        CuAddrs::reachable(&endpoint, a)
                    })
                    .await;
                match picked {
                    Err(why) => Ended::Failed(Failure::Resolve, why),
                    Ok(addr) => match connect(&endpoint, addr, server_name, io.signals).await {
                        Err(ended) => ended,
                        Ok(conn) => {
                            status.counters.connects.inc();
                            // Debug only: a refused agent connects every few
                            // seconds; "registered" is the news worth a line.
                            tracing::debug!(cu = %addr, "connected to the CU");
                            let ended = match conn.open_bi().await {
                                Ok((send, recv)) => {
                                    io.serve(send, recv, Some((&conn, &relay_cu))).await
                                }
                                Err(e) => Ended::Failed(
                                    failure_of(&e),
                                    format!("opening the control stream: {e}"),
                                ),
                            };
                            relay_cu.send_replace(None);
                            status.lost();
                            conn.close(0u32.into(), b"bye");
                            ended
                        }
                    },
                }
            }
        };
        let (why, detail) = match ended {
            Ended::Exit => {
                endpoint.wait_idle().await;
                std::process::exit(0);
            }
            Ended::Failed(why, detail) => (why, detail),
        };
        status.counters.failures(why).inc();
        attempt = attempt.wrapping_add(1);
        match session.failed(start.elapsed(), why) {
            Verdict::GiveUp => return detail,
            Verdict::Retry { after, alert } => {
                let retry_in_ms = after.as_millis() as u64;
                let failures = session.outage().map_or(0, |o| o.failures);
                if !alert {
                    tracing::debug!(reason = why.label(), retry_in_ms, failures, "{detail}");
                } else if session.had_view() {
                    let peers = session.view().peers().count();
                    tracing::warn!(
                        reason = why.label(),
                        retry_in_ms,
                        failures,
                        "{detail}; forwarding on the last view ({peers} peers) meanwhile"
                    );
                } else {
                    tracing::warn!(
                        reason = why.label(),
                        retry_in_ms,
                        failures,
                        "{detail}; nothing to forward on until the CU answers"
                    );
                }
            }
        }
    }
}

/// A connection to the CU at `addr`, or how trying ended.
async fn connect(
    endpoint: &quinn::Endpoint,
    addr: SocketAddr,
    server_name: &str,
    signals: &mut Option<Signals>,
) -> Result<quinn::Connection, Ended> {
    let connecting = endpoint.connect(addr, server_name).map_err(|e| {
        use quinn::ConnectError as E;
        let why = match e {
            E::InvalidServerName(_)
            | E::InvalidRemoteAddress(_)
            | E::UnsupportedVersion
            | E::NoDefaultClientConfig => Failure::Config,
            _ => Failure::Closed,
        };
        Ended::Failed(why, format!("connecting to the CU at {addr}: {e}"))
    })?;
    let conn = tokio::select! {
        c = connecting => c,
        _ = Signals::wait(signals) => std::process::exit(0),
    };
    conn.map_err(|e| match failure_of(&e) {
        Failure::Tls => Ended::Failed(Failure::Tls, format!(
            "TLS handshake with the CU at {addr} failed: {e} (is [cu] ca the CA that made the CU's certificate, and server_name = {server_name:?} in it?)"
        )),
        why => Ended::Failed(why, format!("cannot reach the CU at {addr}: {e}")),
    })
}

/// What one session with the CU works with, whichever way it goes.
struct Io<'a> {
    start: Instant,
    session: &'a mut Session,
    on_view: &'a mut ViewCallback,
    status: &'a ClientStatus,
    signals: &'a mut Option<Signals>,
}

fn lost(e: ReadFail, what: &str) -> Ended {
    match e {
        ReadFail::Lost(why, detail) => Ended::Failed(why, format!("{what}: {detail}")),
        ReadFail::Bad(e) => Ended::Failed(Failure::BadMessage, format!("{what}: {e}")),
    }
}

impl Io<'_> {
    /// Registers and then serves the session on `send`/`recv` until it
    /// ends. `relay`: a direct connection, and where to publish it for the
    /// proxy's relay once registered.
    async fn serve(
        &mut self,
        mut send: impl FrameSink,
        mut recv: impl FrameSource,
        relay: Option<(
            &quinn::Connection,
            &watch::Sender<Option<quinn::Connection>>,
        )>,
    ) -> Ended {
        let Io {
            start,
            session,
            on_view,
            status,
            signals,
        } = self;
        let start = *start;
        let SessionAction::Send(reg) = session.connected() else {
            unreachable!("connected() always registers")
        };
        if let Err(e) =
            crate::stream::write_frame(&mut send, &pon_proto::control::encode(&reg)).await
        {
            return lost(e, "sending the registration");
        }
        let mut decoder = FrameDecoder::new(MAX_CU_FRAME);
        let register_by = start.elapsed() + REGISTER_TIMEOUT;
        // A new connection starts afresh: the first report goes at once.
        let mut pacer = ReportPacer::default();
        loop {
            let now = start.elapsed();
            while let Some(SessionAction::Send(m)) = session.poll(now) {
                if let Err(e) =
                    crate::stream::write_frame(&mut send, &pon_proto::control::encode(&m)).await
                {
                    return lost(e, "sending to the CU");
                }
            }
            let wake = match session.next_deadline() {
                Some(t) => t,
                None if now >= register_by => {
                    return Ended::Failed(
                        Failure::Timeout,
                        format!(
                            "no configuration from the CU within {} s",
                            REGISTER_TIMEOUT.as_secs()
                        ),
                    )
                }
                None => register_by,
            };
            let read = tokio::select! {
                r = recv.read_into(&mut decoder) => r,
                _ = tokio::time::sleep_until((start + wake).into()) => continue,
                _ = status.reports.ready.notified() => {
                    let Some(r) = status.take_report() else { continue };
                    let registered = status.registered.load(Ordering::Relaxed) == 1;
                    if registered && pacer.due(&r, start.elapsed()) {
                        let msg = pon_proto::control::encode(&AgentMsg::Report(r));
                        if let Err(e) = crate::stream::write_frame(&mut send, &msg).await {
                            return lost(e, "sending to the CU");
                        }
                    }
                    continue;
                }
                _ = Signals::wait(signals) => {
                    if let Some(bye) = session.goodbye() {
                        let _ = crate::stream::write_frame(&mut send, &pon_proto::control::encode(&bye)).await;
                        // Give the goodbye a moment to leave; the CU would
                        // find out from the silence anyway.
                        let _ = tokio::time::timeout(Duration::from_millis(500), send.end()).await;
                    }
                    return Ended::Exit;
                }
            };
            match read {
                Ok(true) => {}
                Ok(false) => {
                    return Ended::Failed(
                        Failure::Closed,
                        "the CU closed the control stream".into(),
                    )
                }
                Err(ReadFail::Bad(e)) => {
                    status.counters.bad_messages.inc();
                    return Ended::Failed(
                        Failure::BadMessage,
                        format!("bad message from the CU: {e}"),
                    );
                }
                Err(e) => return lost(e, "connection to the CU lost"),
            }
            let mut changed = false;
            loop {
                let msg = match decoder.next_msg::<CuMsg>() {
                    Ok(Some(m)) => m,
                    Ok(None) => break,
                    Err(e) => {
                        status.counters.bad_messages.inc();
                        return Ended::Failed(
                            Failure::BadMessage,
                            format!("bad message from the CU: {e}"),
                        );
                    }
                };
                match &msg {
                    CuMsg::Config(c) => {
                        status.counters.configs.inc();
                        status.id.store(c.id, Ordering::Relaxed);
                        status.registered.store(1, Ordering::Relaxed);
                        tracing::info!(id = c.id, peers = c.peers.len(), "registered with the CU");
                        // Registered: the CU now takes relayed sessions on
                        // this connection.
                        if let Some((conn, publish)) = relay {
                            publish.send_replace(Some(conn.clone()));
                        }
                    }
                    CuMsg::Update(c) => {
                        status.counters.updates.inc();
                        tracing::debug!(changes = c.len(), "update from the CU");
                    }
                    _ => {}
                }
                match session.received(msg, start.elapsed()) {
                    Ok(actions) => {
                        for a in actions {
                            match a {
                                SessionAction::ViewChanged => changed = true,
                                SessionAction::Recovered { outage, failures } => tracing::info!(
                                    outage_s = outage.as_secs_f64(),
                                    failures,
                                    "registered with the CU again after an outage"
                                ),
                                _ => {}
                            }
                        }
                    }
                    Err(refused) => return Ended::Failed(Failure::Refused, refused.to_string()),
                }
            }
            if changed {
                on_view(session.view());
            }
        }
    }
}

/// SIGTERM/SIGINT, when the daemon asked for a goodbye on them.
struct Signals {
    term: tokio::signal::unix::Signal,
    int: tokio::signal::unix::Signal,
}

impl Signals {
    fn new() -> Option<Self> {
        use tokio::signal::unix::{signal, SignalKind};
        Some(Signals {
            term: signal(SignalKind::terminate()).ok()?,
            int: signal(SignalKind::interrupt()).ok()?,
        })
    }

    async fn wait(s: &mut Option<Self>) {
        match s {
            Some(s) => {
                tokio::select! {
                    _ = s.term.recv() => {}
                    _ = s.int.recv() => {}
                }
            }
            None => std::future::pending().await,
        }
    }
}

/// Messages an agent sends; exposed for tests and the load generator.
pub fn encode_agent(msg: &AgentMsg) -> Vec<u8> {
    pon_proto::control::encode(msg)
}

#[cfg(test)]
mod tests {
    use super::*;
    use pon_proto::pmon::{DestinationReport, Report};

    fn report(route: &[u32], rtt_us: u32) -> Report {
        Report {
            destinations: vec![DestinationReport {
                dst: 2,
                reachable: !route.is_empty(),
                route: route.to_vec(),
                figures: pon_proto::pmon::Figures {
                    rtt_us: Some(rtt_us),
                    ..Default::default()
                },
            }],
        }
    }

    #[test]
    fn every_relay_and_every_cu_address_gets_its_turn() {
        let targets = Targets {
            addrs: "127.0.0.1:1".parse().unwrap(),
            relays: vec!["10.0.0.1:7402".parse().unwrap()],
            server_name: "pon-cu".into(),
        };
        let turns: Vec<_> = (0..8)
            .map(|a| targets.relay(a).ok_or(targets.direct(a) % 2))
            .collect();
        let relay = Ok("10.0.0.1:7402".parse().unwrap());
        // Relay, the CU's address 0, relay, its address 1, ...: with one
        // relay and two CU addresses, both addresses are tried.
        assert_eq!(
            turns,
            vec![relay, Err(0), relay, Err(1), relay, Err(0), relay, Err(1)]
        );
    }

    #[test]
    fn reports_go_on_change_at_once_and_otherwise_once_a_second() {
        let mut p = ReportPacer::default();
        let ms = Duration::from_millis;
        assert!(p.due(&report(&[3, 2], 60_000), ms(0)));
        // New values on the same route wait for the period ...
        assert!(!p.due(&report(&[3, 2], 61_000), ms(250)));
        assert!(!p.due(&report(&[3, 2], 62_000), ms(750)));
        assert!(p.due(&report(&[3, 2], 62_000), ms(1000)));
        // ... a new route or an outage does not.
        assert!(p.due(&report(&[2], 150_000), ms(1100)));
        assert!(p.due(&report(&[], 0), ms(1200)));
        assert!(!p.due(&report(&[], 0), ms(1300)));
    }
}
