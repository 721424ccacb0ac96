//! The CU client every PON daemon embeds: a thread with its own small tokio
//! runtime that connects (retrying with backoff), registers, sends
//! heartbeats, reconnects after losing the CU, and hands each new view to
//! the daemon. The daemon's data path never waits on it.

use crate::session::{Session, SessionAction};
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
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// The `[cu]` section of an agent's configuration.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CuClientConfig {
    /// The CU's QUIC address.
    pub addr: SocketAddr,
    /// Name in the CU's certificate.
    #[serde(default = "default_server_name")]
    pub server_name: String,
    /// The CA certificate (PEM) made by `pon-cu init`.
    pub ca: PathBuf,
    /// The join token, inline ... (needed only until the agent has enrolled:
    /// from then on its certificate in its state directory authenticates it)
    #[serde(default)]
    pub token: Option<String>,
    /// ... or in a file.
    #[serde(default)]
    pub token_file: Option<PathBuf>,
    /// This agent's cloud (site) id.
    pub cloud: String,
    /// Dotted role, e.g. `PROXY.SRC` or `APP`.
    pub role: Option<String>,
    /// Stable name within the cloud (default: the agent's address).
    #[serde(default)]
    pub name: Option<String>,
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
        connect_failures => ("pon_cu_client_connect_failures_total", "", "Attempts to reach the CU that failed."),
        configs => ("pon_cu_client_messages_total", "kind=\"config\"", "Messages received from the CU."),
        updates => ("pon_cu_client_messages_total", "kind=\"update\"", "Messages received from the CU."),
        bad_messages => ("pon_cu_client_bad_messages_total", "", "Malformed or oversized messages from the CU (the connection is dropped)."),
        enrolments => ("pon_cu_client_enrolments_total", "", "Certificates obtained from the CU with the join token."),
    }
}

/// What the daemon can read about its CU client.
#[derive(Default)]
pub struct ClientStatus {
    pub counters: ClientCounters,
    /// The CU-assigned id (0 until registered).
    pub id: AtomicU32,
    /// 1 while registered.
    pub registered: AtomicU32,
}

impl ClientStatus {
    pub fn render(&self, w: &mut PromWriter) {
        self.counters.render(w);
        w.gauge(
            "pon_cu_client_registered",
            "",
            "1 while registered with the CU.",
            f64::from(self.registered.load(Ordering::Relaxed)),
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
/// once per burst of messages); `on_fatal` runs if the CU refuses this
/// agent or its certificate is not signed by our CA, which retrying cannot
/// fix. With `goodbye_on_signal`, SIGTERM/SIGINT send a goodbye (so others
/// hear at once) and then exit the process.
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
    let (addr, server_name) = (cfg.addr, cfg.server_name.clone());
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
            let fatal = rt.block_on(run(
                addr,
                server_name,
                credentials,
                register,
                on_view,
                st,
                goodbye_on_signal,
            ));
            on_fatal(fatal);
        })?;
    Ok(status)
}

pub(crate) fn seed() -> u64 {
    let t = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    (t.as_nanos() as u64) ^ (u64::from(std::process::id()) << 32)
}

/// Certificate problems are configuration errors: retrying cannot help.
pub(crate) fn is_fatal(e: &quinn::ConnectionError) -> bool {
    match e {
        quinn::ConnectionError::TransportError(t) => {
            let code = u64::from(t.code);
            (0x100..0x200).contains(&code)
        }
        quinn::ConnectionError::ConnectionClosed(c) => {
            let code = u64::from(c.error_code);
            (0x100..0x200).contains(&code)
        }
        _ => false,
    }
}

enum Ended {
    Lost(String),
    Fatal(String),
    Exit,
}

async fn run(
    addr: SocketAddr,
    server_name: String,
    credentials: crate::enrolment::Credentials,
    register: Register,
    mut on_view: ViewCallback,
    status: Arc<ClientStatus>,
    goodbye_on_signal: bool,
) -> String {
    let bind: SocketAddr = if addr.is_ipv4() {
        "0.0.0.0:0".parse().expect("literal")
    } else {
        "[::]:0".parse().expect("literal")
    };
    let mut endpoint = match quinn::Endpoint::client(bind) {
        Ok(e) => e,
        Err(e) => return format!("opening the CU client socket: {e}"),
    };
    let mut signals = goodbye_on_signal.then(Signals::new).flatten();
    let enrolled = tokio::select! {
        q = credentials.client_config(&endpoint, addr, &server_name, &status) => q,
        _ = Signals::wait(&mut signals) => std::process::exit(0),
    };
    match enrolled {
        Ok(quic) => endpoint.set_default_client_config(quic),
        Err(fatal) => return fatal,
    }
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
        let connecting = match endpoint.connect(addr, &server_name) {
            Ok(c) => c,
            Err(e) => return format!("connecting to the CU at {addr}: {e}"),
        };
        let conn = tokio::select! {
            c = connecting => c,
            _ = Signals::wait(&mut signals) => std::process::exit(0),
        };
        let ended = match conn {
            Ok(conn) => {
                status.counters.connects.inc();
                tracing::info!(cu = %addr, "connected to the CU");
                let ended =
                    serve(&conn, start, &mut session, &mut on_view, &status, &mut signals).await;
                status.registered.store(0, Ordering::Relaxed);
                conn.close(0u32.into(), b"bye");
                ended
            }
            Err(e) if is_fatal(&e) => Ended::Fatal(format!(
                "TLS handshake with the CU at {addr} failed: {e} (is [cu] ca the CA that made the CU's certificate, and server_name = {server_name:?} in it?)"
            )),
            Err(e) => {
                status.counters.connect_failures.inc();
                Ended::Lost(format!("cannot reach the CU at {addr}: {e}"))
            }
        };
        match ended {
            Ended::Exit => {
                endpoint.wait_idle().await;
                std::process::exit(0);
            }
            Ended::Fatal(why) => return why,
            Ended::Lost(why) => {
                let d = session.disconnected(start.elapsed());
                if status.counters.connect_failures.get() <= 1
                    || status.counters.connect_failures.get().is_power_of_two()
                {
                    tracing::warn!(retry_in_ms = d.as_millis() as u64, "{why}");
                } else {
                    tracing::debug!(retry_in_ms = d.as_millis() as u64, "{why}");
                }
            }
        }
    }
}

async fn serve(
    conn: &quinn::Connection,
    start: Instant,
    session: &mut Session,
    on_view: &mut ViewCallback,
    status: &ClientStatus,
    signals: &mut Option<Signals>,
) -> Ended {
    let (mut send, mut recv) = match conn.open_bi().await {
        Ok(s) => s,
        Err(e) => return Ended::Lost(format!("opening the control stream: {e}")),
    };
    let SessionAction::Send(reg) = session.connected() else {
        unreachable!("connected() always registers")
    };
    if let Err(e) = send.write_all(&pon_proto::control::encode(&reg)).await {
        return Ended::Lost(format!("sending the registration: {e}"));
    }
    let mut decoder = FrameDecoder::new(MAX_CU_FRAME);
    let register_by = start.elapsed() + REGISTER_TIMEOUT;
    loop {
        let now = start.elapsed();
        while let Some(SessionAction::Send(m)) = session.poll(now) {
            if let Err(e) = send.write_all(&pon_proto::control::encode(&m)).await {
                return Ended::Lost(format!("sending to the CU: {e}"));
            }
        }
        let wake = match session.next_deadline() {
            Some(t) => t,
            None if now >= register_by => {
                return Ended::Lost(format!(
                    "no configuration from the CU within {} s",
                    REGISTER_TIMEOUT.as_secs()
                ))
            }
            None => register_by,
        };
        let chunk = tokio::select! {
            c = recv.read_chunk(64 * 1024, true) => c,
            _ = tokio::time::sleep_until((start + wake).into()) => continue,
            _ = Signals::wait(signals) => {
                if let Some(bye) = session.goodbye() {
                    let _ = send.write_all(&pon_proto::control::encode(&bye)).await;
                    let _ = send.finish();
                    // Give the goodbye a moment to leave; the CU would find
                    // out from the silence anyway.
                    let _ = tokio::time::timeout(Duration::from_millis(500), send.stopped()).await;
                }
                return Ended::Exit;
            }
        };
        let chunk = match chunk {
            Ok(Some(c)) => c,
            Ok(None) => return Ended::Lost("the CU closed the control stream".into()),
            Err(e) => {
                if let quinn::ReadError::ConnectionLost(ce) = &e {
                    if is_fatal(ce) {
                        return Ended::Fatal(format!("the CU connection failed: {ce}"));
                    }
                }
                return Ended::Lost(format!("connection to the CU lost: {e}"));
            }
        };
        if let Err(e) = decoder.push(&chunk.bytes) {
            status.counters.bad_messages.inc();
            return Ended::Lost(format!("bad message from the CU: {e}"));
        }
        let mut changed = false;
        loop {
            let msg = match decoder.next_msg::<CuMsg>() {
                Ok(Some(m)) => m,
                Ok(None) => break,
                Err(e) => {
                    status.counters.bad_messages.inc();
                    return Ended::Lost(format!("bad message from the CU: {e}"));
                }
            };
            match &msg {
                CuMsg::Config(c) => {
                    status.counters.configs.inc();
                    status.id.store(c.id, Ordering::Relaxed);
                    status.registered.store(1, Ordering::Relaxed);
                    tracing::info!(id = c.id, peers = c.peers.len(), "registered with the CU");
                }
                CuMsg::Update(c) => {
                    status.counters.updates.inc();
                    tracing::debug!(changes = c.len(), "update from the CU");
                }
                _ => {}
            }
            match session.received(msg, start.elapsed()) {
                Ok(actions) => changed |= actions.contains(&SessionAction::ViewChanged),
                Err(refused) => return Ended::Fatal(refused.to_string()),
            }
        }
        if changed {
            on_view(session.view());
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
