//! Observability shared by every PON daemon: lock-free counters, their
//! Prometheus text exposition, a minimal HTTP endpoint that serves it, and
//! `tracing` setup, with the command line every daemon starts from.

use std::fmt::Write as _;
use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

/// Conventional ports of each daemon's Prometheus endpoint (`metrics = ...`
/// in its configuration; on loopback unless told, see [`metrics_addr`]).
/// The lab and `ponctl` use them, so one host can run several daemons.
pub mod metrics_port {
    pub const FORWARDER: u16 = 9100;
    pub const TA: u16 = 9101;
    pub const RA: u16 = 9102;
    pub const MONITOR: u16 = 9103;
    pub const ROUTER: u16 = 9104;
    /// pon-agent: the TA's and the RA's counters on one page.
    pub const AGENT: u16 = 9105;
    pub const LINKEMU: u16 = 9110;
    pub const CU: u16 = 9200;
}

/// Where a daemon serves `/metrics` (and `/status`): the configured
/// address, or loopback on its conventional `port`. Both pages tell
/// whoever reads them about the overlay (peers, routes, failures), so
/// nothing beyond the host sees them unless the operator says so.
pub fn metrics_addr(configured: Option<SocketAddr>, port: u16) -> SocketAddr {
    configured.unwrap_or(SocketAddr::from((std::net::Ipv4Addr::LOCALHOST, port)))
}

/// What every daemon takes on its command line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DaemonArgs {
    /// Its TOML configuration.
    pub config: std::path::PathBuf,
    /// Validate the configuration and exit.
    pub check: bool,
}

impl DaemonArgs {
    /// Call once the configuration is loaded and validated: with `--check`,
    /// says so ("<path>: ok") and returns true, for the daemon to exit.
    pub fn check_done(&self) -> bool {
        if self.check {
            println!("{}: ok", self.config.display());
        }
        self.check
    }
}

/// Parses a daemon's command line (`--config FILE [--check]`, with `about`
/// as its `--help`) and sets up logging. Use [`daemon_args!`].
pub fn start_daemon(name: &'static str, version: &'static str, about: &'static str) -> DaemonArgs {
    let args = daemon_command(name, version, about).get_matches();
    init_logging();
    DaemonArgs {
        config: args
            .get_one::<std::path::PathBuf>("config")
            .cloned()
            .expect("required"),
        check: args.get_flag("check"),
    }
}

fn daemon_command(name: &'static str, version: &'static str, about: &'static str) -> clap::Command {
    use clap::{Arg, ArgAction};
    clap::Command::new(name)
        .version(version)
        .about(about)
        .arg(
            Arg::new("config")
                .long("config")
                .short('c')
                .required(true)
                .value_parser(clap::value_parser!(std::path::PathBuf))
                .help("TOML configuration"),
        )
        .arg(
            Arg::new("check")
                .long("check")
                .action(ArgAction::SetTrue)
                .help("Validate the configuration and exit"),
        )
}

/// Reads a daemon's configuration file and parses its text with `parse`;
/// either error names the file ("reading {what} config PATH", "in {what}
/// config PATH"), so every daemon reports a bad file the same way.
pub fn load_config<T>(
    path: &std::path::Path,
    what: &str,
    parse: impl FnOnce(&str) -> anyhow::Result<T>,
) -> anyhow::Result<T> {
    use anyhow::Context as _;
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("reading {what} config {}", path.display()))?;
    parse(&text).with_context(|| format!("in {what} config {}", path.display()))
}

/// [`load_config`] of a plain TOML document.
pub fn load_toml<T: serde::de::DeserializeOwned>(
    path: &std::path::Path,
    what: &str,
) -> anyhow::Result<T> {
    load_config(path, what, |text| Ok(toml::from_str(text)?))
}

/// The calling daemon's command line: `daemon_args!("what it does")`.
#[macro_export]
macro_rules! daemon_args {
    ($about:expr) => {
        $crate::start_daemon(env!("CARGO_BIN_NAME"), env!("CARGO_PKG_VERSION"), $about)
    };
}

/// Logs to stderr, filtered by `RUST_LOG` (default `info`).
pub fn init_logging() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(io::stderr)
        .try_init();
}

/// A monotonically increasing counter, updated with relaxed atomics so the
/// data path never waits on a reader.
#[derive(Debug, Default)]
pub struct Counter(AtomicU64);

impl Counter {
    #[inline]
    pub fn inc(&self) {
        self.0.fetch_add(1, Ordering::Relaxed);
    }
    #[inline]
    pub fn add(&self, n: u64) {
        self.0.fetch_add(n, Ordering::Relaxed);
    }
    pub fn get(&self) -> u64 {
        self.0.load(Ordering::Relaxed)
    }
    /// Adds `n` and returns the new total if it passed a power of two (the
    /// 1st, 2nd, 4th, 8th... occurrence), for error paths that log sparsely
    /// so a storm cannot flood the log; with `add(n)` totals skip values, so
    /// "is the total a power of two" would miss most of them.
    pub fn add_sparse(&self, n: u64) -> Option<u64> {
        let before = self.0.fetch_add(n, Ordering::Relaxed);
        let after = before.wrapping_add(n);
        (n > 0 && (before == 0 || after.ilog2() > before.ilog2())).then_some(after)
    }

    /// Counts `n` occurrences of error `e` and logs it as `what` sparsely
    /// (see [`Counter::add_sparse`]), for the data path's error paths.
    pub fn add_and_warn(&self, n: u64, what: &str, e: &dyn std::fmt::Display) {
        if let Some(total) = self.add_sparse(n) {
            tracing::warn!(error = %e, occurrences = total, "{what}");
        }
    }
}

/// Builds a Prometheus text-format page, writing HELP/TYPE once per metric.
#[derive(Default)]
pub struct PromWriter {
    out: String,
    described: Vec<&'static str>,
}

impl PromWriter {
    pub fn new() -> Self {
        Self::default()
    }

    fn describe(&mut self, name: &'static str, help: &str, kind: &str) {
        if !self.described.contains(&name) {
            self.described.push(name);
            let _ = writeln!(self.out, "# HELP {name} {help}");
            let _ = writeln!(self.out, "# TYPE {name} {kind}");
        }
    }

    /// `labels` is the inside of the braces, e.g. `reason="malformed"`, or "".
    pub fn counter(&mut self, name: &'static str, labels: &str, help: &str, value: u64) {
        self.describe(name, help, "counter");
        self.sample(name, labels, value as f64);
    }

    pub fn gauge(&mut self, name: &'static str, labels: &str, help: &str, value: f64) {
        self.describe(name, help, "gauge");
        self.sample(name, labels, value);
    }

    fn sample(&mut self, name: &str, labels: &str, value: f64) {
        if labels.is_empty() {
            let _ = writeln!(self.out, "{name} {value}");
        } else {
            let _ = writeln!(self.out, "{name}{{{labels}}} {value}");
        }
    }

    pub fn finish(self) -> String {
        self.out
    }
}

/// Declares a struct of counters and its Prometheus rendering:
///
/// ```
/// pon_telemetry::counters! {
///     pub struct Demo {
///         rx => ("pon_demo_packets_total", "dir=\"rx\"", "Packets seen."),
///     }
/// }
/// let d = Demo::default();
/// d.rx.inc();
/// let mut w = pon_telemetry::PromWriter::new();
/// d.render(&mut w);
/// assert!(w.finish().contains("pon_demo_packets_total{dir=\"rx\"} 1"));
/// ```
#[macro_export]
macro_rules! counters {
    ($(#[$m:meta])* pub struct $name:ident {
        $( $field:ident => ($metric:literal, $labels:literal, $help:literal) ),* $(,)?
    }) => {
        $(#[$m])*
        #[derive(Debug, Default)]
        pub struct $name { $( pub $field: $crate::Counter, )* }
        impl $name {
            pub fn render(&self, w: &mut $crate::PromWriter) {
                $( w.counter($metric, $labels, $help, self.$field.get()); )*
            }
        }
    };
}

/// Something that can render its metrics.
pub type Renderer = Arc<dyn Fn(&mut PromWriter) + Send + Sync>;

/// Produces a JSON document (a daemon's status) on demand.
pub type StatusFn = Arc<dyn Fn() -> String + Send + Sync>;

/// How long one request may take in all, however its bytes trickle in.
pub const REQUEST_DEADLINE: Duration = Duration::from_secs(2);

/// Connections served at once; more are closed at once, so a crowd of
/// stuck clients costs a bounded number of threads, each for at most
/// `REQUEST_DEADLINE`.
pub const MAX_CONNECTIONS: usize = 16;

/// Serves `GET /metrics` (Prometheus text) and `GET /healthz` on `addr`
/// from background threads, off the data path.
pub fn serve_metrics(addr: SocketAddr, render: Renderer) -> io::Result<SocketAddr> {
    serve_http(addr, render, None)
}

/// Like [`serve_metrics`], plus `GET /status` (JSON from `status`) when given.
/// Each connection gets its own thread and `REQUEST_DEADLINE` in all, so a
/// slow client never holds up another's scrape.
pub fn serve_http(
    addr: SocketAddr,
    render: Renderer,
    status: Option<StatusFn>,
) -> io::Result<SocketAddr> {
    let listener = TcpListener::bind(addr)?;
    let bound = listener.local_addr()?;
    let busy = Arc::new(AtomicUsize::new(0));
    thread::Builder::new()
        .name("metrics".into())
        .spawn(move || {
            for stream in listener.incoming().flatten() {
                if busy.fetch_add(1, Ordering::AcqRel) >= MAX_CONNECTIONS {
                    busy.fetch_sub(1, Ordering::AcqRel);
                    tracing::debug!("metrics: too many connections, closing one");
                    continue;
                }
                let slot = Slot(busy.clone());
                let (render, status) = (render.clone(), status.clone());
                let spawned = thread::Builder::new()
                    .name("metrics-conn".into())
                    .spawn(move || {
                        let _slot = slot;
                        if let Err(e) = answer(stream, &render, status.as_ref()) {
                            tracing::debug!(error = %e, "metrics request failed");
                        }
                    });
                if let Err(e) = spawned {
                    tracing::warn!(error = %e, "metrics: cannot start a connection thread");
                }
            }
        })?;
    Ok(bound)
}

/// One taken connection slot, given back when dropped: also when the
/// thread fails to start or a renderer panics.
struct Slot(Arc<AtomicUsize>);

impl Drop for Slot {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

/// The time left before `deadline`, or a timeout error once it has passed;
/// socket timeouts are per call, so each call gets only what is left.
fn left(deadline: Instant) -> io::Result<Duration> {
    let d = deadline.saturating_duration_since(Instant::now());
    if d.is_zero() {
        return Err(io::Error::new(
            io::ErrorKind::TimedOut,
            "request deadline passed",
        ));
    }
    Ok(d)
}

fn answer(mut stream: TcpStream, render: &Renderer, status: Option<&StatusFn>) -> io::Result<()> {
    let deadline = Instant::now() + REQUEST_DEADLINE;
    let mut req = [0u8; 1024];
    let mut n = 0;
    // Read until the end of the request head (all of it, so that closing
    // does not reset the connection over unread bytes and discard the
    // answer at the client); a slow or huge client is cut off.
    while n < req.len() && !req[..n].windows(4).any(|w| w == b"\r\n\r\n") {
        stream.set_read_timeout(Some(left(deadline)?))?;
        let got = stream.read(&mut req[n..])?;
        if got == 0 {
            break;
        }
        n += got;
    }
    let line = String::from_utf8_lossy(&req[..n]);
    let path = line.split_whitespace().nth(1).unwrap_or("");
    let (status, ctype, body) = match path {
        "/metrics" => {
            let mut w = PromWriter::new();
            render(&mut w);
            ("200 OK", "text/plain; version=0.0.4", w.finish())
        }
        "/healthz" => ("200 OK", "text/plain", "ok\n".to_string()),
        "/status" if status.is_some() => (
            "200 OK",
            "application/json",
            status.map(|f| f()).unwrap_or_default(),
        ),
        _ => ("404 Not Found", "text/plain", "not found\n".to_string()),
    };
    let page = format!(
        "HTTP/1.1 {status}\r\nContent-Type: {ctype}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    // The write shares the deadline too: a client that never reads is cut off.
    let mut rest = page.as_bytes();
    while !rest.is_empty() {
        stream.set_write_timeout(Some(left(deadline)?))?;
        match stream.write(rest)? {
            0 => return Err(io::ErrorKind::WriteZero.into()),
            k => rest = &rest[k..],
        }
    }
    stream.flush()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn daemon_command_line() {
        let m = daemon_command("pon-x", "0", "x")
            .try_get_matches_from(["pon-x", "-c", "a.toml", "--check"])
            .unwrap();
        assert_eq!(
            m.get_one::<std::path::PathBuf>("config").unwrap().to_str(),
            Some("a.toml")
        );
        assert!(m.get_flag("check"));
        let e = daemon_command("pon-x", "0", "x")
            .try_get_matches_from(["pon-x"])
            .unwrap_err();
        assert!(e.to_string().contains("--config"), "{e}");
    }

    #[test]
    fn config_errors_name_the_file() {
        #[derive(serde::Deserialize)]
        struct C {
            #[allow(dead_code)]
            x: u32,
        }
        let dir = std::env::temp_dir().join(format!("pon-telemetry-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let (good, bad) = (dir.join("good.toml"), dir.join("bad.toml"));
        std::fs::write(&good, "x = 1\n").unwrap();
        std::fs::write(&bad, "x = \"one\"\n").unwrap();
        assert_eq!(load_toml::<C>(&good, "X").unwrap().x, 1);
        let e = load_toml::<C>(&bad, "X").err().unwrap();
        assert_eq!(e.to_string(), format!("in X config {}", bad.display()));
        let e = load_toml::<C>(&dir.join("none.toml"), "X").err().unwrap();
        assert!(e.to_string().starts_with("reading X config "), "{e}");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    counters! {
        pub struct Sample {
            a => ("pon_test_total", "k=\"a\"", "Test counter."),
            b => ("pon_test_total", "k=\"b\"", "Test counter."),
        }
    }

    #[test]
    fn help_written_once_per_metric() {
        let s = Sample::default();
        s.a.add(3);
        let mut w = PromWriter::new();
        s.render(&mut w);
        let text = w.finish();
        assert_eq!(text.matches("# HELP pon_test_total").count(), 1);
        assert!(text.contains("pon_test_total{k=\"a\"} 3\n"));
        assert!(text.contains("pon_test_total{k=\"b\"} 0\n"));
    }

    #[test]
    fn metrics_listen_on_loopback_unless_configured() {
        let d = metrics_addr(None, metrics_port::TA);
        assert!(d.ip().is_loopback() && d.port() == 9101, "{d}");
        let mine: SocketAddr = "198.18.1.11:9101".parse().unwrap();
        assert_eq!(metrics_addr(Some(mine), metrics_port::TA), mine);
    }

    #[test]
    fn endpoint_serves_metrics_and_404() {
        let s = Arc::new(Sample::default());
        s.b.inc();
        let s2 = s.clone();
        let addr = serve_metrics(
            "127.0.0.1:0".parse().unwrap(),
            Arc::new(move |w: &mut PromWriter| s2.render(w)),
        )
        .unwrap();
        let get = |path: &str| {
            let mut c = TcpStream::connect(addr).unwrap();
            write!(c, "GET {path} HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
            let mut out = String::new();
            c.read_to_string(&mut out).unwrap();
            out
        };
        let page = get("/metrics");
        assert!(page.starts_with("HTTP/1.1 200"));
        assert!(page.contains("pon_test_total{k=\"b\"} 1"));
        assert!(get("/nope").starts_with("HTTP/1.1 404"));
    }

    fn sample_server() -> SocketAddr {
        let s = Arc::new(Sample::default());
        serve_metrics(
            "127.0.0.1:0".parse().unwrap(),
            Arc::new(move |w: &mut PromWriter| s.render(w)),
        )
        .unwrap()
    }

    fn scrape(addr: SocketAddr) -> String {
        let mut c = TcpStream::connect(addr).unwrap();
        write!(c, "GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
        let mut out = String::new();
        c.read_to_string(&mut out).unwrap();
        out
    }

    #[test]
    fn silent_client_does_not_delay_a_scrape() {
        let addr = sample_server();
        // Connected but silent: a serial server waits on it until its deadline.
        let _silent = TcpStream::connect(addr).unwrap();
        let start = std::time::Instant::now();
        assert!(scrape(addr).starts_with("HTTP/1.1 200"));
        let took = start.elapsed();
        assert!(
            took < REQUEST_DEADLINE / 4,
            "scrape waited {took:?} behind a silent client"
        );
    }

    #[test]
    fn trickling_client_is_cut_off_at_the_deadline() {
        let addr = sample_server();
        let mut c = TcpStream::connect(addr).unwrap();
        // One byte per 200 ms: every single read is quick, the request never ends.
        c.set_read_timeout(Some(Duration::from_millis(200)))
            .unwrap();
        let start = std::time::Instant::now();
        let mut buf = [0u8; 64];
        loop {
            assert!(
                start.elapsed() < REQUEST_DEADLINE * 2,
                "server still listening to a trickle after {:?}",
                start.elapsed()
            );
            if c.write_all(b"G").is_err() {
                break;
            }
            match c.read(&mut buf) {
                Ok(_) => break, // closed (or answered): cut off
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) if e.kind() == io::ErrorKind::TimedOut => {}
                Err(_) => break,
            }
        }
        assert!(start.elapsed() >= REQUEST_DEADLINE - Duration::from_millis(300));
        // And the server still answers others.
        assert!(scrape(addr).starts_with("HTTP/1.1 200"));
    }

    #[test]
    fn connections_past_the_bound_are_closed_at_once() {
        let addr = sample_server();
        let silent: Vec<TcpStream> = (0..MAX_CONNECTIONS)
            .map(|_| TcpStream::connect(addr).unwrap())
            .collect();
        // One more finds every slot taken: closed without waiting for the
        // deadline of the others (no thread is spent on it).
        let start = std::time::Instant::now();
        let mut extra = TcpStream::connect(addr).unwrap();
        extra.set_read_timeout(Some(REQUEST_DEADLINE * 2)).unwrap();
        let mut buf = [0u8; 16];
        assert!(matches!(extra.read(&mut buf), Ok(0) | Err(_)));
        assert!(
            start.elapsed() < REQUEST_DEADLINE / 2,
            "{:?}",
            start.elapsed()
        );
        // Slots come back as their clients go.
        drop(silent);
        let deadline = std::time::Instant::now() + REQUEST_DEADLINE * 2;
        loop {
            let mut c = TcpStream::connect(addr).unwrap();
            let _ = write!(c, "GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n");
            let mut out = String::new();
            if c.read_to_string(&mut out).is_ok() && out.starts_with("HTTP/1.1 200") {
                break;
            }
            assert!(std::time::Instant::now() < deadline, "slots never freed");
        }
    }
}
