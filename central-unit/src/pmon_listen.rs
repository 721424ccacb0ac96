//! PMon on a proxy: the CU's subscription protocol (`AgentMsg::Subscribe`,
//! then the matrix, events and cells) served by the proxy itself over
//! QUIC with mutual TLS, from its own reports (its row of the matrix: its
//! site to each destination), so `ponctl --cu <this address> matrix |
//! watch` works against a proxy as against the CU (a subscription that
//! names no source site gets the proxy's site: the only row it knows). The engine and the
//! subscribers are the CU's ([`Hub`]); this module only moves bytes.
//!
//! Who may subscribe: the TLS handshake admits only certificates of the
//! overlay CA (the one the proxy's `[cu] ca` names); of those, the admin
//! credential (when `admin_cert` names it) and the agents the CU vouches
//! for to this proxy now (the key in the certificate's `urn:pon:noise:`
//! name is a peer of its current view, so a revoked agent is refused
//! within a second of its revocation). Bounded: connections at once and
//! per address, one stream per connection, a deadline for the first
//! message, streaming subscribers; refusals are counted by reason.

use crate::per_address::PerAddress;
use crate::pmon::{Directory, PmonSettings};
use crate::pmon_hub::{ConnId, Hub, Limits, Names, Out, PmonStats};
use crate::tls::close_code;
use crate::trust::KeyId;
pub use crate::trust::{presented, Presented};
use crate::view::View;
use crate::wall_ms;
use pon_proto::control::{AgentMsg, CuMsg, FrameDecoder, PublicKey, MAX_AGENT_FRAME};
use pon_proto::pmon::{ProxyRef, Report, Subscription};
use pon_telemetry::PromWriter;
use serde::{Deserialize, Serialize};
use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::{mpsc, Notify, Semaphore};

/// A proxy's `[pmon]` section: off unless given.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ListenConfig {
    /// Where consumers (`ponctl --cu ADDR matrix | watch`) connect: QUIC.
    pub listen: SocketAddr,
    /// This listener's certificate (PEM), signed by the overlay CA for
    /// server authentication: `pon-cu cert` makes one (relative to this
    /// file). Consumers name it with `ponctl --server-name`.
    #[schemars(extend("format" = "path"))]
    pub cert: PathBuf,
    /// Its key (PEM).
    #[schemars(extend("format" = "path"))]
    pub key: PathBuf,
    /// The admin certificate (`admin.pem`, no key): its holder may
    /// subscribe. Without it only agents the CU vouches for to this proxy
    /// may.
    #[serde(default)]
    #[schemars(extend("format" = "path"))]
    pub admin_cert: Option<PathBuf>,
    /// Connections at once; more are refused.
    #[serde(default = "default_max_connections")]
    #[schemars(extend("x-unit" = "connections"))]
    pub max_connections: usize,
    /// Connections at once from one address.
    #[serde(default = "default_max_per_address")]
    #[schemars(extend("x-unit" = "connections"))]
    pub max_per_address: u32,
    /// Streaming subscribers at once.
    #[serde(default = "default_max_streams")]
    #[schemars(extend("x-unit" = "subscribers"))]
    pub max_streams: usize,
    /// The thresholds consumers get unless they bring their own.
    #[serde(default)]
    pub events: PmonSettings,
}

fn default_max_connections() -> usize {
    64
}
fn default_max_per_address() -> u32 {
    8
}
fn default_max_streams() -> usize {
    32
}

impl ListenConfig {
    /// Paths relative to the configuration file that named them.
    pub fn relative_to(mut self, config_file: &Path) -> Self {
        let base = config_file.parent().unwrap_or(Path::new("."));
        self.cert = base.join(&self.cert);
        self.key = base.join(&self.key);
        self.admin_cert = self.admin_cert.map(|p| base.join(p));
        self
    }

    pub fn check(&self) -> Result<(), String> {
        if self.max_connections == 0 || self.max_per_address == 0 || self.max_streams == 0 {
            return Err(
                "[pmon] max_connections, max_per_address and max_streams must be positive".into(),
            );
        }
        self.events.check()
    }
}

pon_telemetry::counters! {
    /// Connections the listener turned away before any subscription, by reason.
    pub struct ListenCounters {
        too_many => ("pon_proxy_pmon_connections_refused_total", "reason=\"too_many_connections\"", "Connections to the proxy's PMon listener refused before a subscription, by reason."),
        per_address => ("pon_proxy_pmon_connections_refused_total", "reason=\"too_many_from_address\"", "Connections to the proxy's PMon listener refused before a subscription, by reason."),
        handshake => ("pon_proxy_pmon_connections_refused_total", "reason=\"handshake\"", "Connections to the proxy's PMon listener refused before a subscription, by reason."),
        no_certificate => ("pon_proxy_pmon_connections_refused_total", "reason=\"no_certificate\"", "Connections to the proxy's PMon listener refused before a subscription, by reason."),
        timeout => ("pon_proxy_pmon_connections_refused_total", "reason=\"timeout\"", "Connections to the proxy's PMon listener refused before a subscription, by reason."),
        bad_message => ("pon_proxy_pmon_connections_refused_total", "reason=\"bad_message\"", "Connections to the proxy's PMon listener refused before a subscription, by reason."),
    }
}

/// What the daemon hands the listener: its latest report and view. The
/// daemon never waits on it.
#[derive(Default)]
pub struct Feed {
    report: Mutex<Option<Report>>,
    view: Mutex<Option<Seen>>,
    ready: Notify,
    pub stats: Arc<PmonStats>,
    pub counters: ListenCounters,
}

/// The proxy as the CU last described its world.
#[derive(Clone)]
struct Seen {
    me: u32,
    dir: Directory,
    vouched: HashSet<PublicKey>,
}

impl Feed {
    /// The proxy's latest measurements (its status's PMon report).
    pub fn offer_report(&self, r: Report) {
        if let Ok(mut l) = self.report.lock() {
            *l = Some(r);
        }
        self.ready.notify_one();
    }

    /// The CU's latest view, and this proxy's own site and name: who the
    /// destinations are, which agents may subscribe.
    pub fn offer_view(&self, view: &View, site: &str, name: &str) {
        let me = view.id();
        let mut dir: Directory = view
            .proxies()
            .map(|(info, _)| {
                let p = ProxyRef {
                    id: info.id,
                    site: info.cloud.clone(),
                    name: info.name.clone(),
                };
                (info.id, p)
            })
            .collect();
        dir.insert(
            me,
            ProxyRef {
                id: me,
                site: site.into(),
                name: name.into(),
            },
        );
        let vouched = view.peers().map(|p| p.info.noise_key).collect();
        if let Ok(mut v) = self.view.lock() {
            *v = Some(Seen { me, dir, vouched });
        }
        self.ready.notify_one();
    }

    pub fn render(&self, w: &mut PromWriter) {
        self.stats.render(&Names::PROXY, w);
        self.counters.render(w);
    }
}

/// Whether the holder of a certificate the CA signed may subscribe here.
pub fn may_subscribe(
    who: &Presented,
    admins: &[KeyId],
    vouched: &HashSet<PublicKey>,
) -> Result<(), &'static str> {
    if admins.contains(&who.key) || who.noise.is_some_and(|k| vouched.contains(&k)) {
        Ok(())
    } else {
        Err("subscribing at a proxy needs the admin certificate or the certificate of an agent the CU vouches for to it")
    }
}

/// How long a client has for the TLS handshake, then for its subscription.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(5);
const SUBSCRIBE_TIMEOUT: Duration = Duration::from_secs(5);
/// A subscriber that does not read for this long is dropped.
const STALL_TIMEOUT: Duration = Duration::from_secs(10);
/// Messages queued for one subscriber; beyond, news is dropped (it asked
/// for news, not a log) rather than held.
const WRITER_QUEUE: usize = 256;
const TICK: Duration = Duration::from_millis(100);

enum ToActor {
    Subscribe {
        conn: ConnId,
        who: Presented,
        version: u16,
        sub: Subscription,
        tx: mpsc::Sender<Write>,
    },
    Gone(ConnId),
}

enum Write {
    Msg(CuMsg),
    Last(CuMsg),
}

/// Starts the listener on its own thread: binds now (an error is the
/// caller's), serves until the process ends. `ca`: the overlay CA's
/// certificate (PEM). Returns the feed the daemon offers its reports and
/// views to, and the address bound.
pub fn start(cfg: &ListenConfig, ca: &Path) -> anyhow::Result<(Arc<Feed>, SocketAddr)> {
    use anyhow::Context;
    cfg.check().map_err(anyhow::Error::msg)?;
    let admins = match &cfg.admin_cert {
        Some(p) => crate::tls::load_certs(p, "admin certificate")
            .map_err(anyhow::Error::msg)?
            .iter()
            .map(|c| presented(c).map(|p| p.key))
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| anyhow::anyhow!("[pmon] admin_cert {}: {e}", p.display()))?,
        None => Vec::new(),
    };
    let server =
        crate::tls::server_config_for_members(&cfg.cert, &cfg.key, ca, Duration::from_secs(30))
            .context("[pmon] cert, key and the CA")?;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the PMon listener's runtime")?;
    let endpoint = rt
        .block_on(async { quinn::Endpoint::server(server, cfg.listen) })
        .with_context(|| format!("[pmon] listen {}", cfg.listen))?;
    let bound = endpoint.local_addr()?;
    let feed = Arc::new(Feed::default());
    let (f, c) = (feed.clone(), cfg.clone());
    std::thread::Builder::new()
        .name("pmon-listen".into())
        .spawn(move || rt.block_on(run(endpoint, f, c, admins)))
        .context("starting the PMon listener's thread")?;
    tracing::info!(listen = %bound, "PMon listener running");
    Ok((feed, bound))
}

async fn run(endpoint: quinn::Endpoint, feed: Arc<Feed>, cfg: ListenConfig, admins: Vec<KeyId>) {
    let (to_actor, from_conns) = mpsc::channel(1024);
    tokio::spawn(actor(feed.clone(), cfg.clone(), admins, from_conns));
    let open = Arc::new(Semaphore::new(cfg.max_connections));
    let per_address = Arc::new(PerAddress::new(cfg.max_per_address));
    let mut next: ConnId = 1;
    while let Some(incoming) = endpoint.accept().await {
        let ip = incoming.remote_address().ip();
        let Ok(slot) = open.clone().try_acquire_owned() else {
            feed.counters.too_many.inc();
            incoming.refuse();
            continue;
        };
        let Some(addr_slot) = per_address.take(ip) else {
            feed.counters.per_address.inc();
            incoming.refuse();
            continue;
        };
        let id = next;
        next += 1;
        let (feed, to_actor) = (feed.clone(), to_actor.clone());
        tokio::spawn(async move {
            connection(incoming, id, &feed, to_actor).await;
            drop((slot, addr_slot));
        });
    }
}

async fn connection(
    incoming: quinn::Incoming,
    id: ConnId,
    feed: &Feed,
    to_actor: mpsc::Sender<ToActor>,
) {
    let conn = match tokio::time::timeout(HANDSHAKE_TIMEOUT, incoming).await {
        Ok(Ok(c)) => c,
        Ok(Err(e)) => {
            // A certificate of another CA ends here.
            feed.counters.handshake.inc();
            tracing::debug!(error = %e, "PMon handshake failed");
            return;
        }
        Err(_) => {
            feed.counters.handshake.inc();
            return;
        }
    };
    let who = conn
        .peer_identity()
        .and_then(|any| {
            any.downcast::<Vec<rustls::pki_types::CertificateDer<'static>>>()
                .ok()
        })
        .and_then(|chain| chain.first().and_then(|leaf| presented(leaf).ok()));
    let Some(who) = who else {
        feed.counters.no_certificate.inc();
        conn.close(
            close_code::PROTOCOL.into(),
            b"a certificate of the overlay CA is needed",
        );
        return;
    };
    let first = async {
        let (send, mut recv) = conn.accept_bi().await.ok()?;
        let mut dec = FrameDecoder::new(MAX_AGENT_FRAME);
        loop {
            match dec.next_msg::<AgentMsg>() {
                Ok(Some(m)) => return Some((send, recv, m)),
                Ok(None) => {}
                Err(_) => return None,
            }
            let chunk = recv.read_chunk(MAX_AGENT_FRAME, true).await.ok()??;
            dec.push(&chunk.bytes).ok()?;
        }
    };
    let (send, mut recv, msg) = match tokio::time::timeout(SUBSCRIBE_TIMEOUT, first).await {
        Err(_) => {
            feed.counters.timeout.inc();
            conn.close(close_code::TIMEOUT.into(), b"no subscription in time");
            return;
        }
        Ok(None) => {
            feed.counters.bad_message.inc();
            conn.close(
                close_code::PROTOCOL.into(),
                b"the first message must be a subscription",
            );
            return;
        }
        Ok(Some(x)) => x,
    };
    let AgentMsg::Subscribe {
        version,
        subscription,
    } = msg
    else {
        feed.counters.bad_message.inc();
        conn.close(
            close_code::PROTOCOL.into(),
            b"the first message must be a subscription",
        );
        return;
    };
    let (tx, rx) = mpsc::channel(WRITER_QUEUE);
    let sub = ToActor::Subscribe {
        conn: id,
        who,
        version,
        sub: subscription,
        tx,
    };
    if to_actor.send(sub).await.is_err() {
        return;
    }
    let writer = tokio::spawn(writer(send, rx, conn.clone()));
    // The consumer says nothing more: its stream's end (or the
    // connection's) is its leaving.
    let _ = recv.read_to_end(MAX_AGENT_FRAME).await;
    let _ = to_actor.send(ToActor::Gone(id)).await;
    writer.abort();
}

async fn writer(
    mut send: quinn::SendStream,
    mut rx: mpsc::Receiver<Write>,
    conn: quinn::Connection,
) {
    while let Some(w) = rx.recv().await {
        let (msg, last) = match w {
            Write::Msg(m) => (m, false),
            Write::Last(m) => (m, true),
        };
        let frame = pon_proto::control::encode(&msg);
        match tokio::time::timeout(STALL_TIMEOUT, send.write_all(&frame)).await {
            Ok(Ok(())) => {}
            Ok(Err(_)) => return,
            Err(_) => {
                conn.close(close_code::TIMEOUT.into(), b"stalled: not reading");
                return;
            }
        }
        if last {
            let _ = send.finish();
            // Let the last frame (a matrix, a refusal) reach the consumer.
            let _ = tokio::time::timeout(Duration::from_secs(1), send.stopped()).await;
            conn.close(close_code::BY_CU.into(), b"done");
            return;
        }
    }
}

async fn actor(
    feed: Arc<Feed>,
    cfg: ListenConfig,
    admins: Vec<KeyId>,
    mut rx: mpsc::Receiver<ToActor>,
) {
    // The feed's stats are the hub's: one set, rendered by the daemon.
    let mut hub = Hub::new(
        cfg.events,
        feed.stats.clone(),
        Limits {
            max_streams: cfg.max_streams,
        },
    );
    let mut writers: HashMap<ConnId, mpsc::Sender<Write>> = HashMap::new();
    let mut seen: Option<Seen> = None;
    let mut tick = tokio::time::interval(TICK);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        let out = tokio::select! {
            m = rx.recv() => match m {
                None => return,
                Some(ToActor::Gone(c)) => {
                    writers.remove(&c);
                    hub.gone(c);
                    Vec::new()
                }
                Some(ToActor::Subscribe { conn, who, version, mut sub, tx }) => {
                    writers.insert(conn, tx);
                    let empty = Seen { me: 0, dir: Directory::new(), vouched: HashSet::new() };
                    let s = seen.as_ref().unwrap_or(&empty);
                    // A proxy knows its own row only: that is what "any
                    // source" means here.
                    if sub.from.is_none() {
                        sub.from = s.dir.get(&s.me).map(|p| p.site.clone());
                    }
                    let ok = may_subscribe(&who, &admins, &s.vouched);
                    hub.subscribe(conn, ok, version, sub, &s.dir, wall_ms())
                }
            },
            _ = feed.ready.notified() => {
                if let Some(new) = feed.view.lock().ok().and_then(|mut v| v.take()) {
                    // Proxies the CU no longer names leave the matrix.
                    for id in seen.iter().flat_map(|s| s.dir.keys()) {
                        if !new.dir.contains_key(id) {
                            hub.forget(*id);
                        }
                    }
                    seen = Some(new);
                }
                let report = feed.report.lock().ok().and_then(|mut r| r.take());
                match (report, &seen) {
                    (Some(r), Some(s)) => hub.report(s.me, &r, &s.dir, wall_ms()),
                    _ => Vec::new(),
                }
            }
            _ = tick.tick() => {
                let now = wall_ms();
                match &seen {
                    Some(s) if hub.needs_tick(now) => hub.tick(&s.dir, now),
                    _ => Vec::new(),
                }
            }
        };
        for o in out {
            let (conn, w) = match o {
                Out::Send(c, m) => (c, Write::Msg(m)),
                Out::Last(c, m) => (c, Write::Last(m)),
            };
            if let Some(tx) = writers.get(&conn) {
                let _ = tx.try_send(w);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn admins_and_vouched_agents_may_subscribe_others_not() {
        let admin = KeyId([1; 32]);
        let agent = PublicKey([2; 32]);
        let vouched: HashSet<_> = [agent].into_iter().collect();
        let who = |key, noise| Presented { key, noise };
        assert!(may_subscribe(&who(admin, None), &[admin], &vouched).is_ok());
        assert!(may_subscribe(&who(KeyId([3; 32]), Some(agent)), &[admin], &vouched).is_ok());
        // Signed by the CA, but not an agent the CU vouches for (revoked,
        // or never a peer of this proxy), nor the admin.
        assert!(may_subscribe(
            &who(KeyId([3; 32]), Some(PublicKey([4; 32]))),
            &[admin],
            &vouched
        )
        .is_err());
        assert!(may_subscribe(&who(KeyId([3; 32]), None), &[], &vouched).is_err());
        let uri = |h: &str| format!("urn:pon:noise:{h}");
        let parse = crate::trust::noise_key_of_uri;
        assert_eq!(parse(&uri(&"ab".repeat(32))), Some(PublicKey([0xab; 32])));
        assert_eq!(parse(&uri("abc")), None);
        assert_eq!(parse(&uri(&"zz".repeat(32))), None);
    }
}
