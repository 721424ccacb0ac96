//! The CU client against real CUs on loopback: once it has a view, a CU
//! that goes away, comes back with a certificate from another CA, or
//! refuses it (its address no longer in the grant, or the agent revoked)
//! never stops the client; each failure is counted by reason and it
//! registers again, with its id, once the right CU is back. Only a first
//! start with the wrong CA or token (or, enrolled, a refusal) gives up, with
//! a clear error.

use pon_cu::client::{self, ClientStatus, CuClientConfig};
use pon_cu::config::CuConfig;
use pon_cu::pki::InitFiles;
use pon_cu::registry::Record;
use pon_cu::session::Failure;
use pon_cu::tls::ClientCert;
use pon_identity::Identity;
use pon_proto::control::{AdminRequest, AgentMsg, CuMsg, Endpoints, PROTOCOL_VERSION};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::mpsc;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// A directory of its own per test and CA.
fn dir(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("pon-cu-client-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// A CA, the CU's certificate and the admin credential in `dir`, and a
/// join token for paris's proxies in its store (the secret in `token`),
/// as `pon-cu init` and `ponctl token create` make them.
fn pki(dir: &Path) -> InitFiles {
    let files = InitFiles::in_dir(dir);
    pon_cu::pki::init(&files, "pon-cu", &["127.0.0.1".parse().unwrap()], true).unwrap();
    let store = pon_cu::store::Store::open(&files.store).unwrap();
    for (path, role) in [(&files.token, "PROXY"), (&dir.join("app-token"), "APP")] {
        let secret = pon_cu::pki::new_token().unwrap();
        let wall_ms = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_millis() as u64;
        let token = pon_cu::trust::Trust::default()
            .create_token(&secret, "paris", role, None, 3600, wall_ms)
            .unwrap();
        store.write(&[Record::Token(token)]).unwrap();
        pon_cu::pki::write_token(path, &secret, true).unwrap();
    }
    files
}

/// Paris's grant: the loopback addresses the clients register with ...
const GRANT: &str = "127.0.0.0/24";
/// ... and one an operator narrowed it to by mistake.
const NARROWED: &str = "127.0.9.0/24";

/// A CU running on its own runtime until dropped (then its socket and
/// connections are gone, as with a killed process).
struct RunningCu {
    rt: Option<tokio::runtime::Runtime>,
    addr: SocketAddr,
}

impl RunningCu {
    /// Serves with `files` (CA, certificates, store) and paris's grant
    /// `prefix` on `listen` (port 0: any); None if it cannot start.
    fn try_start(files: &InitFiles, prefix: &str, listen: SocketAddr) -> Option<RunningCu> {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .unwrap();
        let mut cfg = CuConfig::parse(&format!(
            "listen = \"{listen}\"\n[clouds.paris]\nprefixes = [\"{prefix}\"]\n"
        ))
        .unwrap();
        cfg.cert = files.cert.clone();
        cfg.key = files.key.clone();
        cfg.ca = files.ca_cert.clone();
        cfg.ca_key = files.ca_key.clone();
        cfg.admin_cert = files.admin_cert.clone();
        cfg.store = files.store.clone();
        let (tx, rx) = tokio::sync::oneshot::channel();
        let stats = Arc::new(pon_cu::server::CuStats::default());
        rt.spawn(async move {
            if let Err(e) = pon_cu::server::serve(cfg, stats, Some(tx), None).await {
                eprintln!("CU: {e:#}");
            }
        });
        let addr = rt.block_on(rx).ok()?;
        Some(RunningCu { rt: Some(rt), addr })
    }

    fn start(files: &InitFiles) -> RunningCu {
        let any = "127.0.0.1:0".parse().unwrap();
        RunningCu::try_start(files, GRANT, any).expect("the CU started")
    }

    /// Like `start`, on the address a stopped CU used (its store is free
    /// again once that CU is dropped); retried for a moment in case the old
    /// socket is not closed yet.
    fn restart(files: &InitFiles, prefix: &str, addr: SocketAddr) -> RunningCu {
        let end = Instant::now() + Duration::from_secs(10);
        loop {
            if let Some(cu) = RunningCu::try_start(files, prefix, addr) {
                return cu;
            }
            assert!(Instant::now() < end, "no CU on {addr} within 10 s");
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// `ponctl revoke paris/NAME`, with the admin credential of `files`.
    fn revoke(&self, files: &InitFiles, name: &str) -> CuMsg {
        let cfg = pon_cu::tls::client_config(
            &files.ca_cert,
            client::CU_IDLE_TIMEOUT,
            Some(ClientCert::from_files(&files.admin_cert, &files.admin_key).unwrap()),
        )
        .unwrap();
        let addr = self.addr;
        self.rt.as_ref().unwrap().block_on(async move {
            let ep = quinn::Endpoint::client("127.0.0.1:0".parse().unwrap()).unwrap();
            let conn = ep.connect_with(cfg, addr, "pon-cu").unwrap().await.unwrap();
            let msg = AgentMsg::Admin {
                version: PROTOCOL_VERSION,
                request: AdminRequest::Revoke {
                    cloud: "paris".into(),
                    name: name.into(),
                },
            };
            let answer = pon_cu::enrolment::request(&conn, &msg).await.unwrap();
            conn.close(0u32.into(), b"done");
            answer
        })
    }
}

impl Drop for RunningCu {
    fn drop(&mut self) {
        if let Some(rt) = self.rt.take() {
            rt.shutdown_timeout(Duration::from_secs(5));
        }
    }
}

/// A client thread as a daemon runs it; views and a fatal error come back
/// on channels.
struct Client {
    status: Arc<ClientStatus>,
    views: mpsc::Receiver<usize>,
    fatal: mpsc::Receiver<String>,
}

/// A client trusting `ca`, keeping its keys and certificate in `state`
/// (enrolling with `token` if it has no certificate there yet).
fn client(addr: SocketAddr, ca: &Path, token: &Path, state: &Path, name: &str) -> Client {
    let cfg: CuClientConfig = toml::from_str(&format!(
        "addr = \"{addr}\"\nca = \"{}\"\ntoken_file = \"{}\"\ncloud = \"paris\"\nname = \"{name}\"\n",
        ca.display(),
        token.display()
    ))
    .unwrap();
    let identity = Arc::new(Identity::load_or_create(state).unwrap());
    let register = cfg
        .register(
            "PROXY",
            name,
            Endpoints::proxy("127.0.0.1".parse().unwrap()),
            None,
            identity.noise_public(),
        )
        .unwrap();
    let (vtx, views) = mpsc::channel();
    let (ftx, fatal) = mpsc::channel();
    let status = client::spawn(
        &cfg,
        identity,
        register,
        Box::new(move |v| {
            let _ = vtx.send(v.peers().count());
        }),
        Box::new(move |why| {
            let _ = ftx.send(why);
        }),
        false,
    )
    .unwrap();
    Client {
        status,
        views,
        fatal,
    }
}

impl Client {
    fn registered(&self) -> bool {
        self.status.registered.load(Ordering::Relaxed) == 1
    }

    fn failures(&self, why: Failure) -> u64 {
        self.status.counters.failures(why).get()
    }

    /// The client never gave up.
    fn assert_alive(&self) {
        assert_eq!(self.fatal.try_recv().ok(), None, "the client gave up");
    }
}

/// Polls `cond` every 50 ms until it holds, for at most `within`.
fn wait(within: Duration, what: &str, mut cond: impl FnMut() -> bool) {
    let end = Instant::now() + within;
    while !cond() {
        assert!(Instant::now() < end, "{what}: not within {within:?}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Long enough for the 3 s idle timeout plus the 5 s (+25 %) backoff cap,
/// on a loaded machine.
const NOTICE: Duration = Duration::from_secs(20);

#[test]
fn a_running_client_outlives_a_lost_refusing_or_impostor_cu() {
    let (da, db) = (dir("a"), dir("b"));
    let (a, b) = (pki(&da), pki(&db));
    let state = da.join("agent");
    let cu = RunningCu::start(&a);
    let addr = cu.addr;
    let c = client(addr, &a.ca_cert, &a.token, &state, "p1");
    c.views.recv_timeout(NOTICE).expect("a first view");
    wait(NOTICE, "registered", || c.registered());
    let id = c.status.id.load(Ordering::Relaxed);
    assert!(id > 0);
    assert_eq!(c.status.counters.enrolments.get(), 1);

    // The CU goes away: the idle timeout notices, the client retries.
    drop(cu);
    wait(NOTICE, "the CU's loss noticed", || {
        !c.registered() && c.failures(Failure::Timeout) >= 1
    });
    assert!(c.status.since_contact() > Duration::ZERO);
    c.assert_alive();

    // Back with a certificate from another CA (an impostor on the path, or
    // a rotation this agent has not had): a TLS failure, not an exit.
    let impostor = RunningCu::restart(&b, GRANT, addr);
    wait(NOTICE, "the impostor's certificate refused", || {
        c.failures(Failure::Tls) >= 2
    });
    c.assert_alive();
    drop(impostor);

    // The right CU, but it refuses the registration: restarted with paris's
    // grant narrowed so that it no longer covers the agent's address (an
    // operator's mistake in [clouds]). That is a refusal an enrolled,
    // running agent can meet and that the CU can take back: the agent
    // keeps its certificate, and once the grant is right again it is
    // accepted as before. (A token plays no part any more once enrolled;
    // revocation, the other refusal, is for good: see below.)
    let narrowed = RunningCu::restart(&a, NARROWED, addr);
    wait(NOTICE, "the refusal counted", || {
        c.failures(Failure::Refused) >= 2
    });
    c.assert_alive();
    assert!(!c.registered());
    drop(narrowed);

    // The right CU and grant again: the client registers, with its id.
    let cu = RunningCu::restart(&a, GRANT, addr);
    wait(NOTICE, "registered again", || c.registered());
    assert_eq!(c.status.id.load(Ordering::Relaxed), id);
    assert_eq!(c.status.since_contact(), Duration::ZERO);
    assert_eq!(c.status.counters.enrolments.get(), 1, "enrolled once");
    c.assert_alive();
    let mut w = pon_telemetry::PromWriter::new();
    c.status.render(&mut w);
    let page = w.finish();
    for reason in ["timeout", "tls", "refused"] {
        let sample = format!("pon_cu_client_connect_failures_total{{reason=\"{reason}\"}} ");
        assert!(page.contains(&sample), "{sample} missing:\n{page}");
    }

    // Revoked: the CU closes its connection and refuses its key from then
    // on. A running agent does not exit on that either (it would not
    // help: every peer has dropped it from its view, which is what keeps
    // its packets out); it stays unregistered and keeps reporting it ...
    let refused = c.failures(Failure::Refused);
    assert_eq!(cu.revoke(&a, "p1"), CuMsg::Revoked { id: Some(id) });
    wait(NOTICE, "the revocation's refusal counted", || {
        !c.registered() && c.failures(Failure::Refused) > refused
    });
    c.assert_alive();
    // ... while the same agent started again (no view) stops at once.
    let again = client(addr, &a.ca_cert, &a.token, &state, "p1");
    let why = again
        .fatal
        .recv_timeout(NOTICE)
        .expect("the restart gave up");
    assert!(why.contains("revoked"), "{why}");
    c.assert_alive();
    drop(cu);
    let _ = std::fs::remove_dir_all(da);
    let _ = std::fs::remove_dir_all(db);
}

#[test]
fn a_first_start_with_the_wrong_ca_or_token_gives_up_with_a_clear_error() {
    let (da, db) = (dir("first-a"), dir("first-b"));
    let (a, b) = (pki(&da), pki(&db));
    let cu = RunningCu::start(&a);
    let app_token = da.join("app-token");
    for (n, (ca, token, expect, why)) in [
        (
            &b.ca_cert,
            &a.token,
            "TLS handshake with the CU",
            Failure::Tls,
        ),
        (&a.ca_cert, &b.token, "wrong join token", Failure::Refused),
        (
            &a.ca_cert,
            &app_token,
            "may enrol role APP, not PROXY",
            Failure::Refused,
        ),
    ]
    .into_iter()
    .enumerate()
    {
        let state = da.join(format!("agent-{n}"));
        let c = client(cu.addr, ca, token, &state, "p");
        let fatal = c.fatal.recv_timeout(NOTICE).expect("the client gave up");
        assert!(fatal.contains(expect), "{fatal}");
        assert_eq!(c.failures(why), 1, "{fatal}");
        assert!(!state.join("cert.pem").exists(), "no certificate");
    }
    // A CU that is merely not there yet is waited for.
    drop(cu);
    let c = client(
        any_free_port(),
        &a.ca_cert,
        &a.token,
        &da.join("agent-wait"),
        "p",
    );
    wait(NOTICE, "a failed attempt", || {
        c.failures(Failure::Timeout) >= 1
    });
    c.assert_alive();
    let _ = std::fs::remove_dir_all(da);
    let _ = std::fs::remove_dir_all(db);
}

/// A loopback UDP port nothing listens on (bound, then released).
fn any_free_port() -> SocketAddr {
    std::net::UdpSocket::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
}
