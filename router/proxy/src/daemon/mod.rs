//! What moves the core's inputs and outputs, shared by every proxy daemon:
//!
//! - [`mailbox`]: how the forwarding threads, the local link and the CU
//!   client hand inputs to the control thread without ever waiting on it;
//! - [`event_loop`]: the control thread itself, one loop for every daemon;
//! - [`link`]: the local link between split processes;
//! - here: the forwarder's sockets, run identifiers and the CU client,
//!   set up the same way by pon-proxy and pon-forwarder.

pub mod event_loop;
pub mod link;
pub mod mailbox;

pub use event_loop::{partners, EventLoop, Io};
pub use link::Link;
pub use mailbox::{mailbox, Inbox, Input, Mailbox};

use crate::forwarder::{io::Sockets, ForwarderConfig};
use anyhow::Context;
use arc_swap::ArcSwap;
use pon_cu::client::ClientStatus;
use pon_forwarder::io::MonitorSink;
use pon_telemetry::PromWriter;
use std::net::{SocketAddr, SocketAddrV4, UdpSocket};
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

/// The forwarder's sockets: peers, agents (IP-in-IP and the UDP variant);
/// probes that end here go to `monitor` (`None`: dropped and counted).
pub fn open_sockets(
    cfg: &ForwarderConfig,
    monitor: Option<MonitorSink>,
) -> anyhow::Result<Sockets> {
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
        monitor,
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
pub fn start_cu(
    cfg: &ForwarderConfig,
    mailbox: &Mailbox,
) -> anyhow::Result<Option<Arc<ClientStatus>>> {
    let mb = mailbox.clone();
    crate::forwarder::cu::start_with(cfg, Box::new(move |v| mb.post_view(v.clone())))
}

/// Serves Prometheus metrics (`render`) and `GET /status` (the JSON of the
/// latest published status) on `addr`.
pub fn serve_status<S: serde::Serialize + Send + Sync + 'static>(
    addr: SocketAddr,
    render: impl Fn(&mut PromWriter) + Send + Sync + 'static,
    status: Arc<ArcSwap<S>>,
) -> anyhow::Result<()> {
    let json = Arc::new(move || serde_json::to_string_pretty(&**status.load()).unwrap_or_default());
    pon_telemetry::serve_http(addr, Arc::new(render), Some(json))
        .with_context(|| format!("serving metrics on {addr}"))?;
    Ok(())
}
