//! The CU client against real CUs on loopback: once it has a view, a CU
//! that goes away, comes back with a certificate from another CA, or
//! refuses it never stops the client; each failure is counted by reason and
//! it registers again once the right CU is back. Only a first start with
//! the wrong CA or token gives up, with a clear error.

use pon_cu::client::{self, ClientStatus, CuClientConfig};
use pon_cu::config::CuConfig;
use pon_cu::pki::InitFiles;
use pon_cu::session::Failure;
use pon_proto::control::Endpoints;
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

/// A CA, a CU certificate and a token in `dir`.
fn pki(dir: &Path) -> InitFiles {
    let files = InitFiles::in_dir(dir);
    pon_cu::pki::init(&files, "pon-cu", &["127.0.0.1".parse().unwrap()], true).unwrap();
    files
}

/// A CU running on its own runtime until dropped (then its socket and
/// connections are gone, as with a killed process).
struct RunningCu {
    rt: Option<tokio::runtime::Runtime>,
    addr: SocketAddr,
}

impl RunningCu {
    /// Serves with `files`' certificate and `token` on `listen` (port 0:
    /// any), keeping its registry in `store`; None if it cannot start.
    fn try_start(
        files: &InitFiles,
        token: &Path,
        store: &Path,
        listen: SocketAddr,
    ) -> Option<RunningCu> {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .unwrap();
        let mut cfg = CuConfig::parse(&format!("listen = \"{listen}\"\n")).unwrap();
        cfg.cert = files.cert.clone();
        cfg.key = files.key.clone();
        cfg.token_file = token.to_path_buf();
        cfg.store = store.to_path_buf();
        let (tx, rx) = tokio::sync::oneshot::channel();
        let stats = Arc::new(pon_cu::server::CuStats::default());
        rt.spawn(async move {
            if let Err(e) = pon_cu::server::serve(cfg, stats, Some(tx)).await {
                eprintln!("CU: {e:#}");
            }
        });
        let addr = rt.block_on(rx).ok()?;
        Some(RunningCu { rt: Some(rt), addr })
    }

    fn start(files: &InitFiles, token: &Path, store: &Path) -> RunningCu {
        let any = "127.0.0.1:0".parse().unwrap();
        RunningCu::try_start(files, token, store, any).expect("the CU started")
    }

    /// Like `start`, on the address a stopped CU used; retried for a
    /// moment in case the old socket is not closed yet.
    fn restart(files: &InitFiles, token: &Path, store: &Path, addr: SocketAddr) -> RunningCu {
        let end = Instant::now() + Duration::from_secs(10);
        loop {
            if let Some(cu) = RunningCu::try_start(files, token, store, addr) {
                return cu;
            }
            assert!(Instant::now() < end, "no CU on {addr} within 10 s");
            std::thread::sleep(Duration::from_millis(100));
        }
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

fn client(addr: SocketAddr, ca: &Path, token: &Path, name: &str) -> Client {
    let cfg: CuClientConfig = toml::from_str(&format!(
        "addr = \"{addr}\"\nca = \"{}\"\ntoken_file = \"{}\"\ncloud = \"paris\"\nname = \"{name}\"\n",
        ca.display(),
        token.display()
    ))
    .unwrap();
    let register = cfg
        .register(
            "PROXY",
            name,
            Endpoints::proxy("127.0.0.1".parse().unwrap()),
            None,
        )
        .unwrap();
    let (vtx, views) = mpsc::channel();
    let (ftx, fatal) = mpsc::channel();
    let status = client::spawn(
        &cfg,
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
    let cu = RunningCu::start(&a, &a.token, &da.join("r1.redb"));
    let addr = cu.addr;
    let c = client(addr, &a.ca_cert, &a.token, "p1");
    c.views.recv_timeout(NOTICE).expect("a first view");
    wait(NOTICE, "registered", || c.registered());
    let id = c.status.id.load(Ordering::Relaxed);
    assert!(id > 0);

    // The CU goes away: the idle timeout notices, the client retries.
    drop(cu);
    wait(NOTICE, "the CU's loss noticed", || {
        !c.registered() && c.failures(Failure::Timeout) >= 1
    });
    assert!(c.status.since_contact() > Duration::ZERO);
    c.assert_alive();

    // Back with a certificate from another CA (an impostor on the path, or
    // a rotation this agent has not had): a TLS failure, not an exit.
    let impostor = RunningCu::restart(&b, &b.token, &db.join("r.redb"), addr);
    wait(NOTICE, "the impostor's certificate refused", || {
        c.failures(Failure::Tls) >= 2
    });
    c.assert_alive();
    drop(impostor);

    // The right certificate, but the token was rotated: refused, retried.
    let rotated = RunningCu::restart(&a, &b.token, &da.join("r2.redb"), addr);
    wait(NOTICE, "the refusal counted", || {
        c.failures(Failure::Refused) >= 2
    });
    c.assert_alive();
    assert!(!c.registered());
    drop(rotated);

    // The right CU again: the client registers, with the id it had (asked
    // for, since this CU's store is new).
    let _cu = RunningCu::restart(&a, &a.token, &da.join("r3.redb"), addr);
    wait(NOTICE, "registered again", || c.registered());
    assert_eq!(c.status.id.load(Ordering::Relaxed), id);
    assert_eq!(c.status.since_contact(), Duration::ZERO);
    c.assert_alive();
    let mut w = pon_telemetry::PromWriter::new();
    c.status.render(&mut w);
    let page = w.finish();
    for reason in ["timeout", "tls", "refused"] {
        let sample = format!("pon_cu_client_connect_failures_total{{reason=\"{reason}\"}} ");
        assert!(page.contains(&sample), "{sample} missing:\n{page}");
    }
    let _ = std::fs::remove_dir_all(da);
    let _ = std::fs::remove_dir_all(db);
}

#[test]
fn a_first_start_with_the_wrong_ca_or_token_gives_up_with_a_clear_error() {
    let (da, db) = (dir("first-a"), dir("first-b"));
    let (a, b) = (pki(&da), pki(&db));
    let cu = RunningCu::start(&a, &a.token, &da.join("r.redb"));
    for (ca, token, expect) in [
        (&b.ca_cert, &a.token, "TLS handshake with the CU"),
        (&a.ca_cert, &b.token, "wrong join token"),
    ] {
        let c = client(cu.addr, ca, token, "p");
        let why = c.fatal.recv_timeout(NOTICE).expect("the client gave up");
        assert!(why.contains(expect), "{why}");
        assert_eq!(c.failures(Failure::Tls) + c.failures(Failure::Refused), 1);
    }
    // A CU that is merely not there yet is waited for.
    drop(cu);
    let c = client(any_free_port(), &a.ca_cert, &a.token, "p");
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
