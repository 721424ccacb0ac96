//! pon-cu-bench: registers many simulated agents with one real `pon-cu` over
//! the real protocol (QUIC + TLS 1.3 on loopback) and prints registrations
//! per second, how long a join takes to reach every agent concerned (an app
//! VM's join concerns its site's proxies, a proxy's every agent), the CU's
//! memory per agent, and how long a re-registration storm takes to settle
//! (the CU killed and restarted: every agent notices at once and
//! reconnects with the real agents' backoff). A benchmark, not a test: bounded in agents and
//! time. Every simulated agent has its own key and enrols first (not timed),
//! as a real one does on its first start; the storms measure registrations
//! with mutual TLS.

use anyhow::{bail, Context};
use clap::Parser;
use pon_cu::session::Backoff;
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
}

/// The CU child process, killed when the bench ends however it ends.
struct CuProcess(Child);
impl Drop for CuProcess {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
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

/// Starts the CU in `dir` (after `pon-cu init` there when `init`; without,
/// on the store and keys of the last run).
fn start_cu(
    bin: &Path,
    dir: &Path,
    port: u16,
    sites: usize,
    init: bool,
) -> anyhow::Result<CuProcess> {
    if init {
        let out = Command::new(bin)
            .args(["init", "--force", "--ip", "127.0.0.1", "--dir"])
            .arg(dir)
            .output()
            .with_context(|| format!("running {} init", bin.display()))?;
        if !out.status.success() {
            bail!("pon-cu init: {}", String::from_utf8_lossy(&out.stderr));
        }
    }
    // Heartbeats every 5 s: 10,000 agents still send 2,000 a second, which
    // the CU handles, but the bench's own two cores are better spent on joins.
    let mut toml = format!("listen = \"127.0.0.1:{port}\"\nheartbeat_ms = 5000\ndead_after_ms = 30000\n[clouds.warmup]\nprefixes = [\"192.0.2.0/24\"]\n");
    for site in 0..sites {
        toml += &format!(
            "[clouds.site{site}]\nprefixes = [\"{}/20\"]\n",
            site_base(site)
        );
    }
    // Every simulated agent connects from 127.0.0.1: as many hosts, not one.
    toml += "[limits]\nconnections_per_address = 1000000\n";
    std::fs::write(dir.join("cu.toml"), toml)?;
    let child = Command::new(bin)
        .args(["run", "--config"])
        .arg(dir.join("cu.toml"))
        .env("RUST_LOG", "warn")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .with_context(|| format!("starting {}", bin.display()))?;
    Ok(CuProcess(child))
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
) -> Result<quinn::ClientConfig, String> {
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
            pon_cu::tls::client_config(ca, Duration::from_secs(30), Some(cert))
                .map_err(|e| e.to_string())
        }
        CuMsg::Refused(why) => Err(why),
        other => Err(format!("unexpected answer: {other:?}")),
    }
}

/// One simulated agent: registers, then reads updates (recording probe
/// arrivals) and sends heartbeats until the bench ends. `registered` hears
/// how the first registration went; after that, once `reconnect` is set, a
/// lost CU is retried with the real agents' backoff.
async fn agent(
    index: Option<usize>,
    ep: quinn::Endpoint,
    tls: quinn::ClientConfig,
    cu: SocketAddr,
    reg: Register,
    probes: Arc<Probes>,
    registered: tokio::sync::oneshot::Sender<Result<(), String>>,
) {
    let mut registered = Some(registered);
    let seed = index.map_or(7, |i| i as u64 + 1);
    let mut backoff = Backoff::new(Duration::from_millis(200), Duration::from_secs(5), seed);
    loop {
        let configured = session(index, &ep, &tls, cu, &reg, &probes, &mut registered).await;
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

/// One connection: register, then read and heartbeat until it ends.
/// Whether the CU sent a configuration on it.
async fn session(
    index: Option<usize>,
    ep: &quinn::Endpoint,
    tls: &quinn::ClientConfig,
    cu: SocketAddr,
    reg: &Register,
    probes: &Probes,
    registered: &mut Option<tokio::sync::oneshot::Sender<Result<(), String>>>,
) -> bool {
    let fail = |registered: &mut Option<tokio::sync::oneshot::Sender<Result<(), String>>>,
                why: String| {
        if let Some(r) = registered.take() {
            let _ = r.send(Err(why));
        }
    };
    let run = async {
        let conn = ep
            .connect_with(tls.clone(), cu, "pon-cu")
            .map_err(|e| e.to_string())?
            .await
            .map_err(|e| e.to_string())?;
        let (mut send, recv) = conn.open_bi().await.map_err(|e| e.to_string())?;
        send.write_all(&control::encode(&AgentMsg::Register(reg.clone())))
            .await
            .map_err(|e| e.to_string())?;
        Ok::<_, String>((conn, send, recv))
    };
    let (conn, mut send, mut recv) = match tokio::time::timeout(Duration::from_secs(10), run).await
    {
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
    let mut configured = false;
    let mut cu_gone = probes.cu_gone.subscribe();
    let mut dec = FrameDecoder::new(MAX_CU_FRAME);
    let mut heartbeat = tokio::time::interval(Duration::from_secs(5));
    loop {
        tokio::select! {
            chunk = recv.read_chunk(1 << 20, true) => {
                let chunk = match chunk {
                    Ok(Some(c)) => c,
                    other => {
                        fail(registered, format!("stream ended: {other:?}"));
                        break;
                    }
                };
                if let Err(e) = dec.push(&chunk.bytes) {
                    fail(registered, e.to_string());
                    break;
                }
                while let Ok(Some(body)) = dec.next_frame() {
                    // postcard writes the variant index first: 0 Config, 1 Update.
                    match body.first() {
                        Some(0) => {
                            configured = true;
                            probes.configs.fetch_add(1, Ordering::Relaxed);
                            if let Some(i) = index { probes.alive[i].store(true, Ordering::Relaxed); }
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
                if send.write_all(&control::encode(&AgentMsg::Heartbeat)).await.is_err() { break }
            }
            _ = cu_gone.changed() => break,
        }
    }
    drop(conn);
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
    let port = free_udp_port()?;
    let mut cu = Some(start_cu(&cu_bin, &dir, port, args.sites, true)?);
    let cu_pid = cu.as_ref().map_or(0, |c| c.0.id());
    let addr: SocketAddr = ([127, 0, 0, 1], port).into();
    let token = std::fs::read_to_string(dir.join("token"))?
        .trim()
        .to_string();
    let ca = dir.join("ca.pem");
    let endpoints: Vec<quinn::Endpoint> = (0..args.sockets.max(1))
        .map(|_| {
            Ok(quinn::Endpoint::client(
                "127.0.0.1:0".parse().expect("literal"),
            )?)
        })
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
    });
    let mut up = false;
    let mut warmup = population(1, 1).remove(0).register;
    warmup.name = "warmup".into();
    warmup.cloud = "warmup".into();
    warmup.endpoints = Endpoints::proxy(Ipv4Addr::new(192, 0, 2, 1));
    let mut warmup_tls = None;
    for _ in 0..100 {
        if warmup_tls.is_none() {
            warmup_tls = enrol(&endpoints[0], addr, &ca, &token, &warmup).await.ok();
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
            addr,
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
        bail!("the CU did not come up on {addr}");
    }
    // Let the warm-up agent settle before measuring the baseline.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let rss_before = rss_kib(cu_pid);

    // Phase 0 (not timed): every agent enrols, as on its first start.
    let pop = population(args.agents, args.sites);
    let sem = Arc::new(tokio::sync::Semaphore::new(args.concurrency));
    let t_enrol = Instant::now();
    let mut enrolling = Vec::with_capacity(pop.len());
    for (i, a) in pop.iter().enumerate() {
        let permit = sem.clone().acquire_owned().await?;
        let (ep, ca, token, reg) = (
            endpoints[i % endpoints.len()].clone(),
            ca.clone(),
            token.clone(),
            a.register.clone(),
        );
        enrolling.push(tokio::spawn(async move {
            let mut last = String::new();
            for attempt in 0..5u32 {
                if attempt > 0 {
                    tokio::time::sleep(Duration::from_millis(200 << attempt)).await;
                }
                match enrol(&ep, addr, &ca, &token, &reg).await {
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
        let (ep, probes, retries) = (
            endpoints[i % endpoints.len()].clone(),
            probes.clone(),
            retries.clone(),
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
                    addr,
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
    let rss_after = rss_kib(cu_pid);
    println!(
        "CU resident memory: {} MiB before, {} MiB after: {:.1} KiB per agent",
        rss_before / 1024,
        rss_after / 1024,
        (rss_after.saturating_sub(rss_before)) as f64 / args.agents as f64
    );

    // Phase 2: single joins, each to be heard by every agent concerned.
    // Even probes are app VMs, whose join concerns the proxies of their
    // site; odd ones are a site's second proxy, whose join concerns every
    // agent (each TA intercepts towards every proxy's prefixes).
    let up = |i: usize| probes.alive[i].load(Ordering::Relaxed);
    let cut_off = (0..args.agents)
        .filter(|&i| registered[i] && !up(i))
        .count();
    if cut_off > 0 {
        println!("{cut_off} simulated agents were cut off by the CU (stalled during the storm) and are not counted below");
    }
    let (mut app_lat, mut proxy_lat) = (Vec::new(), Vec::new());
    let mut probe_proxies: Vec<usize> = Vec::new();
    let (mut app_fanout, mut proxy_fanout) = (0, 0);
    let mut missed = 0;
    for k in 0..args.probes {
        let site = k % args.sites;
        let is_proxy = k % 2 == 1;
        let mut r = population(args.sites + 1, args.sites)
            .pop()
            .expect("one")
            .register;
        r.cloud = format!("site{site}");
        r.name = format!("probe{k}");
        if is_proxy {
            r.role = "PROXY".into();
            r.endpoints = Endpoints::proxy(site_addr(site, 2 + k / args.sites));
        } else {
            r.endpoints = Endpoints::App {
                addr: site_addr(site, 4080 + k / args.sites),
                encap: Encap::Ipip,
            };
        }
        // Enrolled before the clock starts: what is measured is the join.
        let tls = enrol(&endpoints[0], addr, &ca, &token, &r)
            .await
            .map_err(|e| anyhow::anyhow!("enrolling probe {k}: {e}"))?;
        let expected = if is_proxy {
            // Every connected agent, and the earlier probes (all connected).
            (0..args.agents).filter(|&i| up(i)).count() + k
        } else {
            // The site's proxy and the earlier probe proxies of the site.
            usize::from(up(site))
                + probe_proxies
                    .iter()
                    .filter(|&&j| j % args.sites == site)
                    .count()
        };
        let (tx, rx) = tokio::sync::oneshot::channel();
        let sent_us = probes.start.elapsed().as_micros() as u64;
        tokio::spawn(agent(
            None,
            endpoints[k % endpoints.len()].clone(),
            tls,
            addr,
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
        if is_proxy {
            proxy_lat.push(lat);
            proxy_fanout = expected;
            probe_proxies.push(k);
        } else {
            app_lat.push(lat);
            app_fanout = expected;
        }
        tokio::time::sleep(Duration::from_millis(args.probe_gap_ms)).await;
    }
    for (what, fanout, lat) in [
        (
            "an app VM's join -> its site's proxies",
            app_fanout,
            &mut app_lat,
        ),
        (
            "a proxy's join -> every agent",
            proxy_fanout,
            &mut proxy_lat,
        ),
    ] {
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
        drop(cu.take());
        probes.cu_gone.send_modify(|n| *n += 1);
        // From now on `alive` counts the agents registered again (an old
        // session that ends later only clears it again).
        for a in probes.alive.iter() {
            a.store(false, Ordering::Relaxed);
        }
        let configs_before = probes.configs.load(Ordering::Relaxed);
        let t0 = Instant::now();
        let restarted = cu.insert(start_cu(&cu_bin, &dir, port, args.sites, false)?);
        let settle_deadline = t0 + Duration::from_secs(args.timeout.min(300));
        let mut next_report = t0 + Duration::from_secs(10);
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
                next_report += Duration::from_secs(10);
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let settled = t0.elapsed();
        let rss = rss_kib(restarted.0.id());
        println!(
            "re-registration storm (CU killed and restarted, {population_up} agents reconnecting with backoff): \
             all back in {:.2} s ({} registrations; {:.0}/s); CU resident memory after: {} MiB",
            settled.as_secs_f64(),
            probes.configs.load(Ordering::Relaxed) - configs_before,
            population_up as f64 / settled.as_secs_f64(),
            rss / 1024
        );
    }
    drop(cu);
    let _ = std::fs::remove_dir_all(&dir);
    std::process::exit(0);
}
