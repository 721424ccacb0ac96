//! pon-cu-bench: registers many simulated agents with one real `pon-cu` over
//! the real protocol (QUIC + TLS 1.3 on loopback) and prints registrations
//! per second, how long a join takes to reach every agent concerned (an app
//! VM's join concerns its site's proxies, a site's second proxy every proxy
//! and the site's app VMs, a new cloud's first proxy every proxy), the CU's
//! memory per agent, and how long a re-registration storm takes to settle
//! (the CU killed and restarted: every agent notices at once and
//! reconnects with the real agents' backoff). With `--replicas N`, N CU
//! replicas share the registry in an etcd member the bench starts, the
//! agents spread over them. A benchmark, not a test: bounded in agents and
//! time. Every simulated agent has its own key and enrols first (not timed),
//! as a real one does on its first start; the storms measure registrations
//! with mutual TLS.

use anyhow::{bail, Context};
use clap::Parser;
use pon_cu::enrolment::Ready;
use pon_cu::session::Backoff;
use pon_cu::stream::{write_frame, Bytes, FrameSink, FrameSource};
use pon_proto::control::{
    self, AgentMsg, Change, CuMsg, Encap, Endpoints, Enrol, FrameDecoder, PublicKey, Register,
    MAX_CU_FRAME, PROTOCOL_VERSION,
};
use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Simulated population: SITES clouds, each with one proxy (role PROXY) and
/// the rest of the agents spread over them as app VMs (role APP).
#[derive(Parser)]
#[command(version, about, long_about)]
struct Args {
    /// Agents to register (proxies + app VMs).
    #[arg(long, default_value_t = 10_000)]
    agents: usize,
    /// Clouds; each gets one proxy.
    #[arg(long, default_value_t = 100)]
    sites: usize,
    /// Joins measured after the population is up, one at a time.
    #[arg(long, default_value_t = 50)]
    probes: usize,
    /// Pause between two measured joins (ms). The CU sends an agent at most
    /// one update per coalescing window (0.1-1 s, growing with the number
    /// of agents); pausing longer measures a join in a quiet overlay.
    #[arg(long, default_value_t = 1100)]
    probe_gap_ms: u64,
    /// Registrations in flight at once.
    #[arg(long, default_value_t = 64)]
    concurrency: usize,
    /// Client UDP sockets the simulated agents are spread over.
    #[arg(long, default_value_t = 4)]
    sockets: usize,
    /// Give up after this many seconds.
    #[arg(long, default_value_t = 600)]
    timeout: u64,
    /// After the joins, kill the CU, start it again on its store and time
    /// until every agent is registered again (the re-registration storm).
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
    restart: bool,
    /// The pon-cu binary (default: next to this one).
    #[arg(long)]
    cu_bin: Option<PathBuf>,
    /// CU replicas sharing the registry in etcd (one etcd member the bench
    /// starts); 1 runs a single CU on its redb store. Agent i starts on
    /// replica i mod N and moves to the next when its replica fails.
    #[arg(long, default_value_t = 1)]
    replicas: usize,
    /// The etcd binary, for --replicas above 1.
    #[arg(long, default_value = "etcd")]
    etcd_bin: PathBuf,
    /// Round-trip time between the agents and the CU (ms): every datagram
    /// a simulated agent sends waits this long before it leaves. Loopback
    /// has none, and a CU that admits a fixed number of handshakes at a
    /// time is bound by it (a handshake holds its place for a round trip).
    #[arg(long, default_value_t = 0)]
    rtt_ms: u64,
    /// App VMs' sessions go through their site's proxy, as with `[cu]
    /// relay`: a stream of the proxy's connection with TLS to the CU
    /// inside (the bench plays the proxy's relay: it opens the stream on
    /// the simulated proxy's connection).
    #[arg(long)]
    relayed: bool,
}

struct Probes {
    start: Instant,
    /// Set once the join storm is over: only then do agents decode updates
    /// (during the storm they only need to know their configuration came,
    /// and the bench's own decoding would compete with the CU for the CPU).
    measuring: std::sync::atomic::AtomicBool,
    /// Per probe: agents that heard of it, and when the last one did (µs since start).
    heard: Vec<AtomicUsize>,
    /// Per agent of the population: still connected.
    alive: Vec<std::sync::atomic::AtomicBool>,
    last_us: Vec<AtomicU64>,
    /// Set before the CU is restarted: agents reconnect (with backoff) when
    /// they lose it instead of ending.
    reconnect: std::sync::atomic::AtomicBool,
    /// Registrations that got a configuration, over the whole run.
    configs: AtomicUsize,
    /// Bumped when the CU is killed: every session ends at once, as a real
    /// agent's would within its 3 s idle timeout.
    cu_gone: tokio::sync::watch::Sender<u64>,
    /// Per site: its proxy's connection while registered (what a proxy's
    /// relay opens app VMs' streams on).
    proxies: Vec<tokio::sync::watch::Sender<Option<quinn::Connection>>>,
}

/// How a simulated agent reaches the CU.
#[derive(Clone, Copy)]
enum Route {
    Direct,
    /// A proxy: its connection, once registered, relays site `.0`'s VMs.
    Proxy(usize),
    /// An app VM relayed by site `.0`'s proxy.
    Relayed(usize),
}

impl Route {
    fn of(reg: &Register, site: usize, relayed: bool) -> Route {
        match &reg.endpoints {
            Endpoints::Proxy { .. } => Route::Proxy(site),
            Endpoints::App { .. } if relayed => Route::Relayed(site),
            _ => Route::Direct,
        }
    }
}

/// The simulated agents' side of loopback: a client endpoint whose every
/// datagram leaves `rtt` after quinn hands it over (none: a plain socket).
fn agents_endpoint(rtt: Duration) -> anyhow::Result<quinn::Endpoint> {
    let bind: SocketAddr = "127.0.0.1:0".parse().expect("literal");
    if rtt.is_zero() {
        return Ok(quinn::Endpoint::client(bind)?);
    }
    let socket = std::net::UdpSocket::bind(bind)?;
    let sender = tokio::net::UdpSocket::from_std({
        let s = socket.try_clone()?;
        s.set_nonblocking(true)?;
        s
    })?;
    let runtime: Arc<dyn quinn::Runtime> = Arc::new(quinn::TokioRuntime);
    let inner = runtime.wrap_udp_socket(socket)?;
    let (queue, mut due) = tokio::sync::mpsc::unbounded_channel::<(Instant, SocketAddr, Vec<u8>)>();
    // One queue, one delay: datagrams leave in the order they were sent.
    tokio::spawn(async move {
        while let Some((at, to, datagram)) = due.recv().await {
            tokio::time::sleep_until(at.into()).await;
            let _ = sender.send_to(&datagram, to).await;
        }
    });
    let socket = Arc::new(DelayedSocket { inner, rtt, queue });
    Ok(quinn::Endpoint::new_with_abstract_socket(
        quinn::EndpointConfig::default(),
        None,
        socket,
        runtime,
    )?)
}

/// A UDP socket that receives at once and sends `rtt` late (the whole round
/// trip's delay put on one direction).
#[derive(Debug)]
struct DelayedSocket {
    inner: Arc<dyn quinn::AsyncUdpSocket>,
    rtt: Duration,
    queue: tokio::sync::mpsc::UnboundedSender<(Instant, SocketAddr, Vec<u8>)>,
}

impl quinn::AsyncUdpSocket for DelayedSocket {
    fn create_io_poller(self: Arc<Self>) -> std::pin::Pin<Box<dyn quinn::UdpPoller>> {
        self.inner.clone().create_io_poller()
    }

    fn try_send(&self, t: &quinn::udp::Transmit) -> std::io::Result<()> {
        // One datagram per transmit (max_transmit_segments is 1).
        let _ = self.queue.send((
            Instant::now() + self.rtt,
            t.destination,
            t.contents.to_vec(),
        ));
        Ok(())
    }

    fn poll_recv(
        &self,
        cx: &mut std::task::Context,
        bufs: &mut [std::io::IoSliceMut<'_>],
        meta: &mut [quinn::udp::RecvMeta],
    ) -> std::task::Poll<std::io::Result<usize>> {
        self.inner.poll_recv(cx, bufs, meta)
    }

    fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.inner.local_addr()
    }

    fn max_receive_segments(&self) -> usize {
        self.inner.max_receive_segments()
    }
}

fn free_tcp_port() -> anyhow::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

fn free_udp_port() -> anyhow::Result<u16> {
    Ok(std::net::UdpSocket::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

/// Site `s` has 10.0.0.0 + s * 4096 /20: its proxy is .1, its app VMs
/// from +16, the measured joins from +4080.
fn site_base(site: usize) -> Ipv4Addr {
    Ipv4Addr::from(0x0a00_0000u32 + (site as u32) * 4096)
}

fn site_addr(site: usize, offset: usize) -> Ipv4Addr {
    Ipv4Addr::from(u32::from(site_base(site)) + offset as u32)
}

/// A child process, killed when dropped however the bench ends.
struct Process(Child);
impl Drop for Process {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// What the agents register with: one CU on its redb store, or N replicas
/// sharing the registry in one etcd member. All replicas share the CA and
/// the CU's certificate (`pon-cu init` once), as in the lab.
struct Cluster {
    bin: PathBuf,
    dir: PathBuf,
    ports: Vec<u16>,
    cus: Vec<Option<Process>>,
    _etcd: Option<Process>,
}

impl Cluster {
    /// Starts it in `dir`, granting `clouds` site prefixes.
    fn start(args: &Args, bin: &Path, dir: &Path, clouds: usize) -> anyhow::Result<Cluster> {
        let out = Command::new(bin)
            .args(["init", "--force", "--ip", "127.0.0.1", "--dir"])
            .arg(dir)
            .output()
            .with_context(|| format!("running {} init", bin.display()))?;
        if !out.status.success() {
            bail!("pon-cu init: {}", String::from_utf8_lossy(&out.stderr));
        }
        let replicas = args.replicas.max(1);
        let etcd = if replicas > 1 {
            Some(start_etcd(&args.etcd_bin, dir)?)
        } else {
            None
        };
        let ports = (0..replicas)
            .map(|_| free_udp_port())
            .collect::<anyhow::Result<Vec<_>>>()?;
        // Heartbeats every 5 s: 10,000 agents still send 2,000 a second,
        // which the CU handles, but the bench's own two cores are better
        // spent on joins.
        let mut common = "heartbeat_ms = 5000\ndead_after_ms = 30000\n[clouds.warmup]\nprefixes = [\"192.0.2.0/24\"]\n".to_string();
        for site in 0..clouds {
            common += &format!(
                "[clouds.site{site}]\nprefixes = [\"{}/20\"]\n",
                site_base(site)
            );
        }
        // Every simulated agent connects from 127.0.0.1: as many hosts, not one.
        common += "[limits]\nconnections_per_address = 1000000\n";
        for (k, port) in ports.iter().enumerate() {
            // Metrics on a port of its own: never a running lab's.
            let metrics = free_tcp_port()?;
            let mut toml = format!(
                "listen = \"127.0.0.1:{port}\"\nmetrics = \"127.0.0.1:{metrics}\"\nstore = \"{}\"\n{common}",
                dir.join(format!("registry-{k}.redb")).display()
            );
            if let Some((_, url)) = &etcd {
                toml += &format!(
                    "[etcd]\nendpoints = [\"{url}\"]\nprefix = \"/bench\"\nreplica = \"cu{k}\"\n"
                );
            }
            std::fs::write(dir.join(format!("cu-{k}.toml")), toml)?;
        }
        let mut cluster = Cluster {
            bin: bin.to_path_buf(),
            dir: dir.to_path_buf(),
            ports,
            cus: Vec::new(),
            _etcd: etcd.map(|(p, _)| p),
        };
        cluster.start_all()?;
        Ok(cluster)
    }

    /// (Re)starts every replica on its store (or etcd) and the keys of `init`.
    fn start_all(&mut self) -> anyhow::Result<()> {
        self.cus.clear();
        for k in 0..self.ports.len() {
            let child = Command::new(&self.bin)
                .args(["run", "--config"])
                .arg(self.dir.join(format!("cu-{k}.toml")))
                .env("RUST_LOG", "warn")
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::inherit())
                .spawn()
                .with_context(|| format!("starting {}", self.bin.display()))?;
            self.cus.push(Some(Process(child)));
        }
        Ok(())
    }

    /// A join token for any cloud and role, made with `ponctl` (next to
    /// pon-cu) once the first replica answers: with replicas the tokens
    /// live in etcd, not in the store `init` wrote its first one to.
    fn join_token(&mut self) -> anyhow::Result<String> {
        let ponctl = self.bin.with_file_name("ponctl");
        let until = Instant::now() + Duration::from_secs(60);
        loop {
            let out = Command::new(&ponctl)
                .arg("--cu")
                .arg(format!("127.0.0.1:{}", self.ports[0]))
                .arg("--ca")
                .arg(self.dir.join("ca.pem"))
                .arg("--cert")
                .arg(self.dir.join("admin.pem"))
                .arg("--key")
                .arg(self.dir.join("admin.key"))
                .args(["token", "create", "--cloud", "*", "--role", "*"])
                .args(["--uses", "unlimited", "--ttl", "1h", "--json"])
                .output()
                .with_context(|| format!("running {}", ponctl.display()))?;
            if out.status.success() {
                let v: serde_json::Value =
                    serde_json::from_slice(&out.stdout).context("ponctl token create --json")?;
                return v["token"]
                    .as_str()
                    .map(str::to_string)
                    .context("no token in ponctl's answer");
            }
            if let Some(k) = self.exited() {
                bail!("CU replica {k} exited (its error is above)");
            }
            if Instant::now() > until {
                bail!(
                    "ponctl token create: {}",
                    String::from_utf8_lossy(&out.stderr)
                );
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// A replica that exited (it failed to start, or crashed).
    fn exited(&mut self) -> Option<usize> {
        self.cus.iter_mut().position(|c| {
            c.as_mut()
                .is_some_and(|c| !matches!(c.0.try_wait(), Ok(None)))
        })
    }

    fn kill_all(&mut self) {
        for c in &mut self.cus {
            drop(c.take());
        }
    }

    fn addrs(&self) -> Vec<SocketAddr> {
        self.ports
            .iter()
            .map(|&p| ([127, 0, 0, 1], p).into())
            .collect()
    }

    /// The replicas' resident memory, summed.
    fn rss_kib(&self) -> u64 {
        self.cus.iter().flatten().map(|c| rss_kib(c.0.id())).sum()
    }
}

/// One etcd member on loopback, its data in `dir`; returns it and its
/// client URL once it accepts connections.
fn start_etcd(bin: &Path, dir: &Path) -> anyhow::Result<(Process, String)> {
    let (client, peer) = (free_tcp_port()?, free_tcp_port()?);
    let url = format!("http://127.0.0.1:{client}");
    let peer_url = format!("http://127.0.0.1:{peer}");
    let child = Command::new(bin)
        .arg("--name")
        .arg("bench")
        .arg("--data-dir")
        .arg(dir.join("etcd"))
        .args([
            "--listen-client-urls",
            &url,
            "--advertise-client-urls",
            &url,
        ])
        .args(["--listen-peer-urls", &peer_url])
        .args(["--initial-advertise-peer-urls", &peer_url])
        .args(["--initial-cluster", &format!("bench={peer_url}")])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .with_context(|| format!("starting {} (Debian: etcd-server)", bin.display()))?;
    let etcd = Process(child);
    let until = Instant::now() + Duration::from_secs(30);
    while std::net::TcpStream::connect(("127.0.0.1", client)).is_err() {
        if Instant::now() > until {
            bail!("etcd did not listen on {url} within 30 s");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    Ok((etcd, url))
}

fn rss_kib(pid: u32) -> u64 {
    pon_cu::server::resident_memory_of(&pid.to_string()).unwrap_or(0) / 1024
}

struct Agent {
    register: Register,
}

fn population(n: usize, sites: usize) -> Vec<Agent> {
    (0..n)
        .map(|i| {
            let site = i % sites;
            let (role, endpoints) = if i < sites {
                ("PROXY", Endpoints::proxy(site_addr(site, 1)))
            } else {
                (
                    "APP",
                    Endpoints::App {
                        addr: site_addr(site, 16 + i / sites),
                        encap: Encap::Ipip,
                    },
                )
            };
            Agent {
                register: Register {
                    version: PROTOCOL_VERSION,
                    cloud: format!("site{site}"),
                    role: role.into(),
                    name: format!("agent{i}"),
                    endpoints,
                    id_hint: None,
                    noise_key: PublicKey([(i % 251) as u8; 32]),
                },
            }
        })
        .collect()
}

/// Enrols `reg`'s identity with a fresh key, as an agent on its first start
/// does; returns the configuration that presents the certificate.
async fn enrol(
    ep: &quinn::Endpoint,
    cu: SocketAddr,
    ca: &Path,
    token: &str,
    reg: &Register,
) -> Result<Ready, String> {
    use pon_cu::enrolment::{connect, request, Attempt};
    let key = rcgen::KeyPair::generate().map_err(|e| e.to_string())?;
    let csr = rcgen::CertificateParams::default()
        .serialize_request(&key)
        .map_err(|e| e.to_string())?;
    let anon =
        pon_cu::tls::client_config(ca, Duration::from_secs(30), None).map_err(|e| e.to_string())?;
    let conn = connect(ep, anon, cu, "pon-cu")
        .await
        .map_err(Attempt::message)?;
    let answer = request(
        &conn,
        &AgentMsg::Enrol(Enrol {
            version: PROTOCOL_VERSION,
            token: token.into(),
            cloud: reg.cloud.clone(),
            role: reg.role.clone(),
            name: reg.name.clone(),
            noise_key: reg.noise_key,
            csr: csr.der().to_vec(),
        }),
    )
    .await;
    conn.close(0u32.into(), b"done");
    match answer? {
        CuMsg::Enrolled { certificate } => {
            let chain = pon_cu::tls::certs_from_pem(&certificate)?;
            let cert = pon_cu::tls::ClientCert::new(chain, key.serialize_der());
            // A long idle timeout: ten thousand agents in one process on
            // shared cores may not be scheduled for seconds at a time (the
            // restart phase tells them when the CU is gone).
            let tls = pon_cu::tls::client_tls(ca, Some(cert)).map_err(|e| e.to_string())?;
            Ok(Ready {
                quic: pon_cu::tls::quic_client(tls.clone(), Duration::from_secs(30))
                    .map_err(|e| e.to_string())?,
                tls: Arc::new(tls),
            })
        }
        CuMsg::Refused(why) => Err(why),
        other => Err(format!("unexpected answer: {other:?}")),
    }
}

/// One simulated agent: registers, then reads updates (recording probe
/// arrivals) and sends heartbeats until the bench ends. `registered` hears
/// how the first registration went; after that, once `reconnect` is set, a
/// lost CU is retried with the real agents' backoff.
/// `cus`: the CU replicas, tried from the `first`, moving to the next
/// each time a session ends, as a real agent with a list of CUs does.
#[allow(clippy::too_many_arguments)]
async fn agent(
    index: Option<usize>,
    ep: quinn::Endpoint,
    tls: Ready,
    route: Route,
    cus: Arc<[SocketAddr]>,
    first: usize,
    reg: Register,
    probes: Arc<Probes>,
    registered: tokio::sync::oneshot::Sender<Result<(), String>>,
) {
    let mut registered = Some(registered);
    let seed = index.map_or(7, |i| i as u64 + 1);
    let mut backoff = Backoff::new(Duration::from_millis(200), Duration::from_secs(5), seed);
    let mut at = first;
    loop {
        let cu = cus[at % cus.len()];
        at += 1;
        let configured = match route {
            Route::Relayed(site) => {
                relayed_session(index, &tls, site, &reg, &probes, &mut registered).await
            }
            _ => {
                session(
                    index,
                    &ep,
                    &tls.quic,
                    route,
                    cu,
                    &reg,
                    &probes,
                    &mut registered,
                )
                .await
            }
        };
        if let Some(i) = index {
            probes.alive[i].store(false, Ordering::Relaxed);
        }
        if registered.is_some() || !probes.reconnect.load(Ordering::Relaxed) {
            return;
        }
        if configured {
            backoff.reset();
        }
        tokio::time::sleep(backoff.next_delay()).await;
    }
}

type Registered = Option<tokio::sync::oneshot::Sender<Result<(), String>>>;

fn fail(registered: &mut Registered, why: String) {
    if let Some(r) = registered.take() {
        let _ = r.send(Err(why));
    }
}

/// One connection: register, then read and heartbeat until it ends.
/// Whether the CU sent a configuration on it.
#[allow(clippy::too_many_arguments)]
async fn session(
    index: Option<usize>,
    ep: &quinn::Endpoint,
    tls: &quinn::ClientConfig,
    route: Route,
    cu: SocketAddr,
    reg: &Register,
    probes: &Probes,
    registered: &mut Registered,
) -> bool {
    let run = async {
        let conn = ep
            .connect_with(tls.clone(), cu, "pon-cu")
            .map_err(|e| e.to_string())?
            .await
            .map_err(|e| e.to_string())?;
        let (send, recv) = conn.open_bi().await.map_err(|e| e.to_string())?;
        Ok::<_, String>((conn, send, recv))
    };
    let (conn, send, recv) = match tokio::time::timeout(Duration::from_secs(10), run).await {
        Ok(Ok(x)) => x,
        Ok(Err(e)) => {
            fail(registered, e);
            return false;
        }
        Err(_) => {
            fail(registered, "no connection within 10 s".into());
            return false;
        }
    };
    // A proxy's connection relays its site's VMs once registered.
    let publish = match route {
        Route::Proxy(site) => probes.proxies.get(site).map(|p| (p, conn.clone())),
        _ => None,
    };
    let configured = serve(index, send, recv, reg, probes, registered, publish.as_ref()).await;
    if let Some((p, _)) = publish {
        p.send_replace(None);
    }
    drop(conn);
    configured
}

/// One relayed session: a stream of the site's proxy's connection (once
/// it has one), TLS to the CU inside, then as a direct one.
async fn relayed_session(
    index: Option<usize>,
    tls: &Ready,
    site: usize,
    reg: &Register,
    probes: &Probes,
    registered: &mut Registered,
) -> bool {
    let run = async {
        let mut proxy = probes.proxies[site].subscribe();
        let conn = proxy
            .wait_for(|c| c.is_some())
            .await
            .map_err(|e| e.to_string())?
            .clone()
            .expect("waited for it");
        let (send, recv) = conn.open_bi().await.map_err(|e| e.to_string())?;
        let name = "pon-cu".try_into().expect("a valid name");
        tokio_rustls::TlsConnector::from(tls.tls.clone())
            .connect(name, tokio::io::join(recv, send))
            .await
            .map_err(|e| e.to_string())
    };
    let tls = match tokio::time::timeout(Duration::from_secs(10), run).await {
        Ok(Ok(x)) => x,
        Ok(Err(e)) => {
            fail(registered, e);
            return false;
        }
        Err(_) => {
            fail(registered, "no relayed session within 10 s".into());
            return false;
        }
    };
    let (r, w) = tokio::io::split(tls);
    serve(index, Bytes(w), Bytes(r), reg, probes, registered, None).await
}

/// Registers on `send`, then reads updates (recording probe arrivals) and
/// heartbeats until the session ends. Whether the CU sent a configuration.
async fn serve(
    index: Option<usize>,
    mut send: impl FrameSink,
    mut recv: impl FrameSource,
    reg: &Register,
    probes: &Probes,
    registered: &mut Registered,
    publish: Option<&(
        &tokio::sync::watch::Sender<Option<quinn::Connection>>,
        quinn::Connection,
    )>,
) -> bool {
    if let Err(e) = write_frame(
        &mut send,
        &control::encode(&AgentMsg::Register(reg.clone())),
    )
    .await
    {
        fail(registered, format!("{e:?}"));
        return false;
    }
    let mut configured = false;
    let mut cu_gone = probes.cu_gone.subscribe();
    let mut dec = FrameDecoder::new(MAX_CU_FRAME);
    let mut heartbeat = tokio::time::interval(Duration::from_secs(5));
    loop {
        tokio::select! {
            read = recv.read_into(&mut dec) => {
                match read {
                    Ok(true) => {}
                    other => {
                        fail(registered, format!("stream ended: {other:?}"));
                        break;
                    }
                }
                while let Ok(Some(body)) = dec.next_frame() {
                    // postcard writes the variant index first: 0 Config, 1 Update.
                    match body.first() {
                        Some(0) => {
                            configured = true;
                            probes.configs.fetch_add(1, Ordering::Relaxed);
                            if let Some(i) = index { probes.alive[i].store(true, Ordering::Relaxed); }
                            if let Some((p, conn)) = publish { p.send_replace(Some(conn.clone())); }
                            if let Some(r) = registered.take() { let _ = r.send(Ok(())); }
                            continue;
                        }
                        Some(1) if !probes.measuring.load(Ordering::Relaxed) => continue,
                        _ => {}
                    }
                    let Ok(msg) = control::decode::<CuMsg>(&body) else { break };
                    match msg {
                        CuMsg::Update(changes) => {
                            let now = probes.start.elapsed().as_micros() as u64;
                            for c in changes {
                                if let Change::Up(p) = c {
                                    if let Some(k) = p.info.name.strip_prefix("probe").and_then(|k| k.parse::<usize>().ok()) {
                                        probes.heard[k].fetch_add(1, Ordering::Relaxed);
                                        probes.last_us[k].fetch_max(now, Ordering::Relaxed);
                                    }
                                }
                            }
                        }
                        CuMsg::Refused(why) => {
                            fail(registered, why);
                            return configured;
                        }
                        _ => {}
                    }
                }
            }
            _ = heartbeat.tick() => {
                if write_frame(&mut send, &control::encode(&AgentMsg::Heartbeat)).await.is_err() { break }
            }
            _ = cu_gone.changed() => break,
        }
    }
    configured
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    sorted[((sorted.len() as f64 - 1.0) * p).round() as usize]
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    pon_telemetry::init_logging();
    if args.sites == 0 || args.agents < args.sites {
        bail!("--agents must be at least --sites (one proxy per site)");
    }
    if args.agents / args.sites > 4000 || args.probes / args.sites > 15 || args.sites > 4096 {
        bail!("at most 4000 agents and 15 probes per site, 4096 sites (one /20 each)");
    }
    let cu_bin = match args.cu_bin.clone() {
        Some(b) => b,
        None => std::env::current_exe()?.with_file_name("pon-cu"),
    };
    let dir = std::env::temp_dir().join(format!("pon-cu-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let mut cluster = Cluster::start(&args, &cu_bin, &dir, args.sites + args.probes)?;
    let cus: Arc<[SocketAddr]> = cluster.addrs().into();
    let token = cluster.join_token()?;
    let ca = dir.join("ca.pem");
    let rtt = Duration::from_millis(args.rtt_ms);
    let endpoints: Vec<quinn::Endpoint> = (0..args.sockets.max(1))
        .map(|_| agents_endpoint(rtt))
        .collect::<anyhow::Result<_>>()?;
    let deadline = Instant::now() + Duration::from_secs(args.timeout);

    // Wait for the CU to listen (a registration of a throwaway name).
    let probes = Arc::new(Probes {
        start: Instant::now(),
        measuring: std::sync::atomic::AtomicBool::new(false),
        alive: (0..args.agents)
            .map(|_| std::sync::atomic::AtomicBool::new(false))
            .collect(),
        heard: (0..args.probes).map(|_| AtomicUsize::new(0)).collect(),
        last_us: (0..args.probes).map(|_| AtomicU64::new(0)).collect(),
        reconnect: std::sync::atomic::AtomicBool::new(false),
        configs: AtomicUsize::new(0),
        cu_gone: tokio::sync::watch::Sender::new(0),
        proxies: (0..args.sites)
            .map(|_| tokio::sync::watch::Sender::new(None))
            .collect(),
    });
    // Wait for every replica to listen (a registration of a throwaway
    // name on each).
    for (k, &at) in cus.iter().enumerate() {
        let mut up = false;
        let mut warmup = population(1, 1).remove(0).register;
        warmup.name = format!("warmup{k}");
        warmup.cloud = "warmup".into();
        warmup.endpoints = Endpoints::proxy(Ipv4Addr::new(192, 0, 2, 1 + k as u8));
        let mut warmup_tls = None;
        for _ in 0..100 {
            if let Some(k) = cluster.exited() {
                bail!("CU replica {k} exited (its error is above)");
            }
            if warmup_tls.is_none() {
                warmup_tls = enrol(&endpoints[0], at, &ca, &token, &warmup).await.ok();
            }
            let Some(tls) = warmup_tls.clone() else {
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            };
            let (tx, rx) = tokio::sync::oneshot::channel();
            tokio::spawn(agent(
                None,
                endpoints[0].clone(),
                tls,
                Route::Direct,
                cus.clone(),
                k,
                warmup.clone(),
                probes.clone(),
                tx,
            ));
            if let Ok(Ok(Ok(()))) = tokio::time::timeout(Duration::from_secs(2), rx).await {
                up = true;
                break;
            }
        }
        if !up {
            bail!("CU replica {k} did not come up on {at}");
        }
    }
    // Let the warm-up agent settle before measuring the baseline.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let rss_before = cluster.rss_kib();

    // Phase 0 (not timed): every agent enrols, as on its first start.
    let pop = population(args.agents, args.sites);
    let sem = Arc::new(tokio::sync::Semaphore::new(args.concurrency));
    let t_enrol = Instant::now();
    let mut enrolling = Vec::with_capacity(pop.len());
    for (i, a) in pop.iter().enumerate() {
        let permit = sem.clone().acquire_owned().await?;
        let (ep, ca, token, reg, at) = (
            endpoints[i % endpoints.len()].clone(),
            ca.clone(),
            token.clone(),
            a.register.clone(),
            cus[i % cus.len()],
        );
        enrolling.push(tokio::spawn(async move {
            let mut last = String::new();
            for attempt in 0..5u32 {
                if attempt > 0 {
                    tokio::time::sleep(Duration::from_millis(200 << attempt)).await;
                }
                match enrol(&ep, at, &ca, &token, &reg).await {
                    Ok(tls) => return Ok(tls),
                    Err(e) => last = e,
                }
            }
            drop(permit);
            Err(last)
        }));
    }
    let mut tls = Vec::with_capacity(pop.len());
    for e in enrolling {
        match e.await? {
            Ok(t) => tls.push(t),
            Err(why) => bail!("enrolment failed: {why}"),
        }
    }
    println!(
        "enrolled {} agents in {:.2} s (not part of the figures below)",
        tls.len(),
        t_enrol.elapsed().as_secs_f64()
    );

    // Phase 1: the join storm.
    let t0 = Instant::now();
    let mut waits = Vec::with_capacity(pop.len());
    let retries = Arc::new(AtomicUsize::new(0));
    for (i, (a, tls)) in pop.into_iter().zip(tls).enumerate() {
        let permit = sem.clone().acquire_owned().await?;
        let route = Route::of(&a.register, i % args.sites, args.relayed);
        let (ep, probes, retries, cus) = (
            endpoints[i % endpoints.len()].clone(),
            probes.clone(),
            retries.clone(),
            cus.clone(),
        );
        // Like a real agent: retry with backoff when the CU is too busy.
        waits.push(tokio::spawn(async move {
            let mut last = String::new();
            for attempt in 0..5u32 {
                if attempt > 0 {
                    retries.fetch_add(1, Ordering::Relaxed);
                    tokio::time::sleep(Duration::from_millis(200 << attempt)).await;
                }
                let (tx, rx) = tokio::sync::oneshot::channel();
                tokio::spawn(agent(
                    Some(i),
                    ep.clone(),
                    tls.clone(),
                    route,
                    cus.clone(),
                    i,
                    a.register.clone(),
                    probes.clone(),
                    tx,
                ));
                match rx.await {
                    Ok(Ok(())) => {
                        drop(permit);
                        return Ok(i);
                    }
                    Ok(Err(e)) => last = e,
                    Err(_) => last = "agent task ended".into(),
                }
            }
            drop(permit);
            Err(last)
        }));
    }
    let mut failed = 0;
    let mut registered = vec![false; args.agents];
    let mut next_report = Instant::now() + Duration::from_secs(30);
    for (n, w) in waits.into_iter().enumerate() {
        if Instant::now() >= next_report {
            eprintln!(
                "... {n} registered after {:.0} s",
                t0.elapsed().as_secs_f64()
            );
            next_report += Duration::from_secs(30);
        }
        let left = deadline.saturating_duration_since(Instant::now());
        match tokio::time::timeout(left, w).await {
            Ok(Ok(Ok(i))) => registered[i] = true,
            Ok(Ok(Err(e))) => {
                if failed == 0 {
                    eprintln!("first failed registration: {e}");
                }
                failed += 1
            }
            Ok(Err(_)) => failed += 1,
            Err(_) => bail!("timed out during the join storm"),
        }
    }
    let storm = t0.elapsed();
    let ok = args.agents - failed;
    let per_sec = ok as f64 / storm.as_secs_f64();
    println!(
        "registered {ok} of {} agents ({} sites) in {:.2} s: {:.0} registrations/s ({failed} failed, {} retried)",
        args.agents,
        args.sites,
        storm.as_secs_f64(),
        per_sec,
        retries.load(Ordering::Relaxed)
    );
    if failed * 100 > args.agents {
        bail!("more than 1% of the registrations failed");
    }
    // Let the storm's updates drain before measuring memory and latency.
    tokio::time::sleep(Duration::from_secs(3)).await;
    probes.measuring.store(true, Ordering::Relaxed);
    let rss_after = cluster.rss_kib();
    println!(
        "CU resident memory: {} MiB before, {} MiB after: {:.1} KiB per agent",
        rss_before / 1024,
        rss_after / 1024,
        (rss_after.saturating_sub(rss_before)) as f64 / args.agents as f64
    );

    // Phase 2: single joins, each to be heard by every agent concerned,
    // three kinds in turn:
    // - an app VM: its site's proxies;
    // - a site's second proxy: every proxy and the site's app VMs (other
    //   sites' app VMs know a cloud by its grant, not by its proxies);
    // - the first proxy of a new cloud: every proxy (TAs intercept every
    //   cloud's grant already; their proxy stops steering them to the IP
    //   path for it, a datagram on their own site).
    let up = |i: usize| probes.alive[i].load(Ordering::Relaxed);
    let cut_off = (0..args.agents)
        .filter(|&i| registered[i] && !up(i))
        .count();
    if cut_off > 0 {
        println!("{cut_off} simulated agents were cut off by the CU (stalled during the storm) and are not counted below");
    }
    #[derive(Clone, Copy, PartialEq)]
    enum Kind {
        App,
        SecondProxy,
        NewCloud,
    }
    let mut joins: [(Kind, Vec<Duration>, usize); 3] = [
        (Kind::App, Vec::new(), 0),
        (Kind::SecondProxy, Vec::new(), 0),
        (Kind::NewCloud, Vec::new(), 0),
    ];
    let mut earlier: Vec<(Kind, usize)> = Vec::new();
    let mut missed = 0;
    for k in 0..args.probes {
        let kind = joins[k % 3].0;
        let site = match kind {
            Kind::NewCloud => args.sites + k,
            _ => k % args.sites,
        };
        let mut r = population(args.sites + 1, args.sites)
            .pop()
            .expect("one")
            .register;
        r.cloud = format!("site{site}");
        r.name = format!("probe{k}");
        match kind {
            Kind::App => {
                r.endpoints = Endpoints::App {
                    addr: site_addr(site, 4080 + k / args.sites),
                    encap: Encap::Ipip,
                }
            }
            Kind::SecondProxy | Kind::NewCloud => {
                r.role = "PROXY".into();
                r.endpoints = Endpoints::proxy(site_addr(site, 2 + k / args.sites));
            }
        }
        // Enrolled before the clock starts: what is measured is the join.
        let tls = enrol(&endpoints[0], cus[k % cus.len()], &ca, &token, &r)
            .await
            .map_err(|e| anyhow::anyhow!("enrolling probe {k}: {e}"))?;
        let earlier_at = |what: &[Kind], at: Option<usize>| {
            earlier
                .iter()
                .filter(|(kind, s)| what.contains(kind) && at.is_none_or(|at| *s == at))
                .count()
        };
        let expected = match kind {
            // The site's proxy and the earlier probe proxies of the site.
            Kind::App => usize::from(up(site)) + earlier_at(&[Kind::SecondProxy], Some(site)),
            // Every proxy, and the site's app VMs.
            Kind::SecondProxy => {
                (0..args.sites).filter(|&i| up(i)).count()
                    + earlier_at(&[Kind::SecondProxy, Kind::NewCloud], None)
                    + (args.sites..args.agents)
                        .filter(|&i| i % args.sites == site && up(i))
                        .count()
                    + earlier_at(&[Kind::App], Some(site))
            }
            // Every proxy: app VMs know every cloud by its grant already,
            // and their site's proxy steers them while it has no proxy.
            Kind::NewCloud => {
                (0..args.sites).filter(|&i| up(i)).count()
                    + earlier_at(&[Kind::SecondProxy, Kind::NewCloud], None)
            }
        };
        let (tx, rx) = tokio::sync::oneshot::channel();
        let sent_us = probes.start.elapsed().as_micros() as u64;
        tokio::spawn(agent(
            None,
            endpoints[k % endpoints.len()].clone(),
            tls,
            Route::of(&r, site, args.relayed),
            cus.clone(),
            k,
            r,
            probes.clone(),
            tx,
        ));
        match tokio::time::timeout(Duration::from_secs(10), rx).await {
            Ok(Ok(Ok(()))) => {}
            other => bail!("probe {k} did not register: {other:?}"),
        }
        let until = Instant::now() + Duration::from_secs(10);
        while probes.heard[k].load(Ordering::Relaxed) < expected && Instant::now() < until {
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        let heard = probes.heard[k].load(Ordering::Relaxed);
        if heard < expected {
            // An agent the CU cut off meanwhile, or one this process did not
            // schedule: counted, and the join timed over those that heard.
            missed += expected - heard;
            if (expected - heard) * 100 > expected {
                bail!("probe {k}: only {heard} of {expected} concerned agents heard of it within 10 s");
            }
        }
        let lat = Duration::from_micros(
            probes.last_us[k]
                .load(Ordering::Relaxed)
                .saturating_sub(sent_us),
        );
        let slot = &mut joins[k % 3];
        slot.1.push(lat);
        slot.2 = expected;
        earlier.push((kind, site));
        tokio::time::sleep(Duration::from_millis(args.probe_gap_ms)).await;
    }
    for (kind, lat, fanout) in &mut joins {
        let what = match kind {
            Kind::App => "an app VM's join -> its site's proxies",
            Kind::SecondProxy => "a site's second proxy -> every proxy and the site's app VMs",
            Kind::NewCloud => "a new cloud's first proxy -> every proxy",
        };
        lat.sort();
        if let Some(max) = lat.last() {
            println!(
                "{what} ({} probes, {fanout} agents at the last): p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms",
                lat.len(),
                percentile(lat, 0.5).as_secs_f64() * 1e3,
                percentile(lat, 0.99).as_secs_f64() * 1e3,
                max.as_secs_f64() * 1e3,
            );
        }
    }

    if missed > 0 {
        println!("{missed} times a concerned agent did not hear of a join within 10 s (not in the figures)");
    }

    // Phase 3: the re-registration storm. The CU is killed and started
    // again on the same store; every agent reconnects with the real
    // agents' backoff (0.2 s doubling to 5 s, +-25 %).
    if args.restart {
        let population_up = (0..args.agents).filter(|&i| up(i)).count();
        probes.reconnect.store(true, Ordering::Relaxed);
        probes.measuring.store(false, Ordering::Relaxed);
        cluster.kill_all();
        probes.cu_gone.send_modify(|n| *n += 1);
        // From now on `alive` counts the agents registered again (an old
        // session that ends later only clears it again).
        for a in probes.alive.iter() {
            a.store(false, Ordering::Relaxed);
        }
        let configs_before = probes.configs.load(Ordering::Relaxed);
        let t0 = Instant::now();
        cluster.start_all()?;
        let settle_deadline = t0 + Duration::from_secs(args.timeout.min(300));
        let mut next_report = t0 + Duration::from_secs(5);
        loop {
            let back = (0..args.agents).filter(|&i| up(i)).count();
            if back >= population_up {
                break;
            }
            if Instant::now() >= settle_deadline {
                bail!(
                    "re-registration storm: {back} of {population_up} agents back after {:.0} s",
                    t0.elapsed().as_secs_f64()
                );
            }
            if Instant::now() >= next_report {
                eprintln!(
                    "... {back} of {population_up} back after {:.0} s",
                    t0.elapsed().as_secs_f64()
                );
                next_report += Duration::from_secs(5);
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let settled = t0.elapsed();
        let rss = cluster.rss_kib();
        println!(
            "re-registration storm ({} killed and restarted, {population_up} agents reconnecting with backoff): \
             all back in {:.2} s ({} registrations; {:.0}/s); CU resident memory after: {} MiB",
            match cluster.ports.len() {
                1 => "the CU".to_string(),
                n => format!("all {n} CU replicas"),
            },
            settled.as_secs_f64(),
            probes.configs.load(Ordering::Relaxed) - configs_before,
            population_up as f64 / settled.as_secs_f64(),
            rss / 1024
        );
    }
    drop(cluster);
    let _ = std::fs::remove_dir_all(&dir);
    std::process::exit(0);
}
