//! Relayed control sessions. An app VM's control session can go through
//! one of its site's proxies instead of a QUIC connection of its own: the
//! agent opens TCP to the proxy's relay listener and runs TLS 1.3 inside
//! it, end to end with the CU, exactly as it would inside QUIC; the proxy
//! opens a stream on its own (registered) connection to the CU and pipes
//! bytes both ways. The CU then holds a stream and a TLS session per app
//! VM instead of a whole QUIC connection (a third of the memory), and the
//! proxy can neither read nor forge what it carries: the CU authenticates
//! the agent by its certificate inside, and accepts on a proxy's streams
//! only agents of that proxy's cloud.
//!
//! This module is both halves outside the CU: the agent's connect, and the
//! proxy's listener and pipes.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

/// Relayed sessions a proxy pipes at once at most (each is a TCP socket
/// and a QUIC stream); the CU's own limit per proxy is usually lower.
const MAX_PIPES: u64 = 4096;
/// How long to get a stream from the CU for a new relayed session.
const OPEN_TIMEOUT: Duration = Duration::from_secs(5);

pon_telemetry::counters! {
    pub struct RelayCounters {
        relayed => ("pon_cu_client_relayed_total", "", "App VMs' control sessions this proxy relayed to the CU."),
        no_cu => ("pon_cu_client_relay_refused_total", "reason=\"no_cu\"", "Relayed sessions refused at once, by reason."),
        full => ("pon_cu_client_relay_refused_total", "reason=\"full\"", "Relayed sessions refused at once, by reason."),
    }
}

/// The proxy's relay: its CU connection while registered, and counts.
#[derive(Default)]
pub struct RelayStatus {
    pub counters: RelayCounters,
    pub active: AtomicU64,
}

impl RelayStatus {
    pub fn render(&self, w: &mut pon_telemetry::PromWriter) {
        self.counters.render(w);
        w.gauge(
            "pon_cu_client_relayed_sessions",
            "",
            "App VMs' control sessions this proxy relays now.",
            self.active.load(Ordering::Relaxed) as f64,
        );
    }
}

/// Sets what both ends of a relayed session's TCP leg need: no Nagle
/// delay for small control frames, and a dead peer noticed within
/// `dead_after` (the agent heartbeats, so unacknowledged data means the
/// other end is gone: TCP_USER_TIMEOUT, where QUIC has its idle timeout).
pub fn tune(tcp: &TcpStream, dead_after: Duration) {
    let _ = tcp.set_nodelay(true);
    let s = socket2::SockRef::from(tcp);
    let _ = s.set_tcp_user_timeout(Some(dead_after));
    let keepalive = socket2::TcpKeepalive::new()
        .with_time(dead_after / 2)
        .with_interval(dead_after / 4);
    let _ = s.set_tcp_keepalive(&keepalive);
}

/// Serves `listener` until the process ends: each connection becomes a
/// stream of the proxy's current CU connection (`cu`: None while not
/// registered, then the connection is closed at once and the agent tries
/// its next relay or the CU itself).
pub async fn serve(
    listener: TcpListener,
    cu: watch::Receiver<Option<quinn::Connection>>,
    status: Arc<RelayStatus>,
    dead_after: Duration,
) {
    loop {
        let (tcp, from) = match listener.accept().await {
            Ok(a) => a,
            Err(e) => {
                // Out of descriptors, say: wait rather than spin.
                tracing::warn!(error = %e, "relay: accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let Some(conn) = cu.borrow().clone() else {
            status.counters.no_cu.inc();
            continue;
        };
        if status.active.load(Ordering::Relaxed) >= MAX_PIPES {
            status.counters.full.inc();
            continue;
        }
        tune(&tcp, dead_after);
        status.active.fetch_add(1, Ordering::Relaxed);
        let st = status.clone();
        tokio::spawn(async move {
            match pipe(tcp, &conn, &st).await {
                Ok(()) => {}
                Err(e) => tracing::debug!(%from, error = %e, "relayed session ended"),
            }
            st.active.fetch_sub(1, Ordering::Relaxed);
        });
    }
}

/// Pipes one agent's TCP connection and one new stream of `conn` into each
/// other until either side ends. The bytes are TLS records between the
/// agent and the CU: nothing here looks into them.
async fn pipe(
    tcp: TcpStream,
    conn: &quinn::Connection,
    status: &RelayStatus,
) -> std::io::Result<()> {
    let (mut send, mut recv) = tokio::time::timeout(OPEN_TIMEOUT, conn.open_bi())
        .await
        .map_err(|_| std::io::Error::other("no stream from the CU in time"))?
        .map_err(std::io::Error::other)?;
    status.counters.relayed.inc();
    let (mut from_agent, mut to_agent) = tcp.into_split();
    let up = async {
        let r = tokio::io::copy(&mut from_agent, &mut send).await;
        let _ = send.finish();
        r
    };
    let down = async {
        let r = tokio::io::copy(&mut recv, &mut to_agent).await;
        let _ = to_agent.shutdown().await;
        r
    };
    // Either direction ending ends the session: a half-open control
    // session is of no use to either end.
    tokio::select! {
        r = up => r.map(|_| ()),
        r = down => r.map(|_| ()),
    }
}

/// The agent's side: TCP to the relay at `addr`, TLS inside to the CU.
pub async fn connect(
    addr: SocketAddr,
    tls: Arc<rustls::ClientConfig>,
    server_name: &str,
    dead_after: Duration,
) -> Result<tokio_rustls::client::TlsStream<TcpStream>, (crate::session::Failure, String)> {
    use crate::session::Failure;
    let name = rustls::pki_types::ServerName::try_from(server_name.to_string())
        .map_err(|e| (Failure::Config, format!("server_name {server_name:?}: {e}")))?;
    let tcp = match tokio::time::timeout(OPEN_TIMEOUT, TcpStream::connect(addr)).await {
        Ok(Ok(t)) => t,
        Ok(Err(e)) => {
            return Err((
                Failure::Closed,
                format!("cannot reach the relay at {addr}: {e}"),
            ))
        }
        Err(_) => {
            return Err((
                Failure::Timeout,
                format!("the relay at {addr} did not answer"),
            ))
        }
    };
    tune(&tcp, dead_after);
    let connector = tokio_rustls::TlsConnector::from(tls);
    match tokio::time::timeout(OPEN_TIMEOUT * 2, connector.connect(name, tcp)).await {
        Ok(Ok(t)) => Ok(t),
        Ok(Err(e)) => {
            let why = crate::stream::failure_of_io(&e);
            Err((
                why,
                format!("TLS with the CU through the relay at {addr}: {e}"),
            ))
        }
        Err(_) => Err((
            Failure::Timeout,
            format!("no TLS answer from the CU through the relay at {addr}"),
        )),
    }
}
