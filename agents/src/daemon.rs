//! The agents' daemons as library functions: `pon-ta`, `pon-ra` and
//! `pon-agent` (both parts of an app VM in one process) set up and run each
//! part with the same code.
//!
//! A part starts in two steps: `start` does the fallible set-up (TUN
//! device, interception routes, sockets, the CU client) and returns the
//! part with its counters, so that the binary can serve its metrics before
//! anything waits; `run` hands its loops to [`Vital`] threads. A process
//! runs whole or not at all: the first vital thread to end, by error or
//! panic, ends it with an error ([`Watch::wait`]), so a service manager
//! restarts the agent instead of leaving half of it running.

use crate::config::{AgentConfig, RaConfig, TaConfig};
use crate::cu::TaCu;
use crate::interception::Interception;
use crate::io::{run_ra_ipip, run_ra_udp, run_ta, TaKeys, TaUplink};
use crate::ra::{Decapsulator, RaCounters};
use crate::steering::SteeringCounters;
use crate::ta::{Encapsulator, TaCounters};
use anyhow::{anyhow, Context};
use pon_identity::Identity;
use pon_proto::control::PublicKey;
use pon_proto::EncapKind;
use pon_telemetry::{PromWriter, Renderer};
use std::convert::Infallible;
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::panic::AssertUnwindSafe;
use std::path::Path;
use std::sync::{mpsc, Arc, Mutex};
use std::time::{Duration, Instant};
use tun_rs::SyncDevice;

/// Starts the threads a daemon cannot live without; cheap to clone, so a
/// vital thread can start others.
#[derive(Clone)]
pub struct Vital {
    ended: mpsc::Sender<anyhow::Error>,
}

/// Hears of the first vital thread to end.
pub struct Watch {
    ended: mpsc::Receiver<anyhow::Error>,
}

/// A new set of vital threads and its watch.
pub fn vital() -> (Vital, Watch) {
    let (tx, rx) = mpsc::channel();
    (Vital { ended: tx }, Watch { ended: rx })
}

impl Vital {
    /// Runs `f` on a thread named `name`. Its end (an error, or a panic,
    /// whose message the panic hook has already logged) is reported to the
    /// [`Watch`]: these loops never return while all is well.
    pub fn spawn<F>(&self, name: &str, f: F) -> anyhow::Result<()>
    where
        F: FnOnce() -> anyhow::Result<Infallible> + Send + 'static,
    {
        let ended = self.ended.clone();
        let thread = name.to_string();
        std::thread::Builder::new()
            .name(thread.clone())
            .spawn(move || {
                let why = match std::panic::catch_unwind(AssertUnwindSafe(f)) {
                    Ok(Ok(never)) => match never {},
                    Ok(Err(e)) => e.context(format!("thread {thread} stopped")),
                    Err(panic) => {
                        let msg = panic
                            .downcast_ref::<&str>()
                            .map(|s| s.to_string())
                            .or_else(|| panic.downcast_ref::<String>().cloned())
                            .unwrap_or_default();
                        anyhow!("thread {thread} panicked: {msg}")
                    }
                };
                // The watch is gone only when the process is exiting anyway.
                let _ = ended.send(why);
            })
            .with_context(|| format!("starting thread {name}"))?;
        Ok(())
    }
}

impl Watch {
    /// Blocks until a vital thread ends; returns why, for the daemon to
    /// exit with.
    pub fn wait(self) -> anyhow::Error {
        self.ended
            .recv()
            .unwrap_or_else(|_| anyhow!("no vital thread was running"))
    }
}

/// Serves `render` as `/metrics` on `addr`.
pub fn serve_metrics(addr: SocketAddr, render: Renderer) -> anyhow::Result<()> {
    pon_telemetry::serve_metrics(addr, render)
        .with_context(|| format!("serving metrics on {addr}"))?;
    Ok(())
}

/// pon-ta: the TA alone. Returns only when it stops.
pub fn ta(cfg: &TaConfig) -> anyhow::Result<Infallible> {
    let (vital, watch) = vital();
    let ta = TaDaemon::start(cfg, TaDaemon::identity(cfg)?, None)?;
    let addr = pon_telemetry::metrics_addr(cfg.metrics, pon_telemetry::metrics_port::TA);
    serve_metrics(addr, ta.metrics())?;
    ta.run(&vital)?;
    Err(watch.wait())
}

/// pon-ra: the RA alone, with the identity the VM's TA made. Returns only
/// when it stops.
pub fn ra(cfg: &RaConfig) -> anyhow::Result<Infallible> {
    let (vital, watch) = vital();
    let ra = RaDaemon::start(cfg)?;
    let addr = pon_telemetry::metrics_addr(cfg.metrics, pon_telemetry::metrics_port::RA);
    serve_metrics(addr, ra.metrics())?;
    let dir = cfg.state_dir();
    ra.run(&vital, || wait_for_identity(&dir).map(|i| i.noise_secret()))?;
    Err(watch.wait())
}

/// pon-agent: the TA and the RA of one VM in one process, sharing the VM's
/// identity, their counters on one page. Returns only when a part stops.
pub fn agent(cfg: &AgentConfig) -> anyhow::Result<Infallible> {
    let (vital, watch) = vital();
    // The RA's TUN and sockets exist (its sockets queue what arrives until
    // its loops run) before the TA diverts anything, as when pon-ra is
    // started before pon-ta: replies never meet a VM that cannot take them.
    let identity = TaDaemon::identity(&cfg.ta)?;
    let ra = RaDaemon::start(&cfg.ra)?;
    // In CU mode the RA takes packets from every proxy the CU names for the
    // site (the TA's view), not only the one its configuration names.
    let follow = {
        let (dec, secret) = (ra.decapsulator.clone(), identity.noise_secret());
        Box::new(move |proxies: &[(Ipv4Addr, PublicKey)]| {
            let wanted: Vec<_> = proxies.iter().map(|&(a, k)| (a, Some(k))).collect();
            let now = dec.senders();
            if now.addrs().eq(wanted.iter().map(|w| w.0))
                && now.keys().eq(wanted.iter().map(|w| w.1))
            {
                return;
            }
            tracing::info!(proxies = ?wanted.iter().map(|w| w.0).collect::<Vec<_>>(), "the RA takes packets from the site's proxies");
            dec.set_senders(now.with(&wanted, &secret));
        }) as crate::cu::SiteProxies
    };
    let ta = TaDaemon::start(&cfg.ta, identity.clone(), Some(follow))?;
    let (ta_page, ra_page) = (ta.metrics(), ra.metrics());
    let both = {
        let (ta_page, ra_page) = (ta_page.clone(), ra_page.clone());
        Arc::new(move |w: &mut PromWriter| {
            ta_page(w);
            ra_page(w);
        })
    };
    serve_metrics(cfg.metrics_addr(), both)?;
    for (addr, page) in [(cfg.ta.metrics, ta_page), (cfg.ra.metrics, ra_page)] {
        if let Some(addr) = addr {
            serve_metrics(addr, page)?;
        }
    }
    ra.run(&vital, || Ok(identity.noise_secret()))?;
    ta.run(&vital)?;
    tracing::info!("agent started: the RA runs, the TA once it knows its forwarder");
    Err(watch.wait())
}

/// A TA set up: its TUN open, the configured interception in place, its CU
/// client started, its uplink socket open.
pub struct TaDaemon {
    cfg: TaConfig,
    /// The TA's clock: its sans-I/O parts get time as "since this instant".
    started: Instant,
    mtu: u16,
    tun: SyncDevice,
    counters: Arc<TaCounters>,
    steering: Arc<SteeringCounters>,
    interception: Arc<Mutex<Interception>>,
    identity: Arc<Identity>,
    cu: TaCu,
    uplink: TaUplink,
}

impl TaDaemon {
    /// This VM's identity, kept in the TA's state directory (made there on
    /// the first start). Its key is logged: a static proxy configuration
    /// names it (`[[agent]] public_key`).
    pub fn identity(cfg: &TaConfig) -> anyhow::Result<Arc<Identity>> {
        let id =
            Identity::load_or_create(&cfg.state_dir()).map_err(|e| anyhow!("state_dir: {e}"))?;
        tracing::info!(public_key = %id.noise_public(), state_dir = %id.dir().display(), "identity");
        Ok(Arc::new(id))
    }

    /// `site_proxies`: told the site's proxies with every CU view.
    pub fn start(
        cfg: &TaConfig,
        identity: Arc<Identity>,
        site_proxies: Option<crate::cu::SiteProxies>,
    ) -> anyhow::Result<Self> {
        let started = Instant::now();
        let mtu = cfg.tun_mtu();
        let tun = crate::tun::open(&cfg.tun_name, mtu, None, cfg.offload)?;
        let interception = Arc::new(Mutex::new(Interception::new(&cfg.tun_name, cfg.local_addr)));
        interception
            .lock()
            .expect("not shared yet")
            .apply(&cfg.intercept)?;
        // CU mode: the client thread keeps the interception routes in step
        // with the CU's view; the forwarder is known once the CU has named it.
        let cu = crate::cu::start(cfg, identity.clone(), interception.clone(), site_proxies)?;
        let uplink = match cfg.encap {
            EncapKind::Ipip => TaUplink::Ipip(
                pon_netio::RawSender::open().context("opening raw socket (needs CAP_NET_RAW)")?,
            ),
            EncapKind::Udp => TaUplink::Udp(pon_netio::udp::UdpIo::bind(SocketAddr::V4(
                SocketAddrV4::new(cfg.local_addr, 0),
            ))?),
        };
        Ok(TaDaemon {
            cfg: cfg.clone(),
            started,
            mtu,
            tun,
            counters: Arc::new(TaCounters::default()),
            steering: Arc::new(SteeringCounters::default()),
            interception,
            identity,
            cu,
            uplink,
        })
    }

    /// The TA's metrics page.
    pub fn metrics(&self) -> Renderer {
        let c = self.counters.clone();
        let (interception, cu_status) = (self.interception.clone(), self.cu.status.clone());
        let steering = self.steering.clone();
        let mtu = self.mtu;
        Arc::new(move |w: &mut PromWriter| {
            c.render(w);
            steering.render(w);
            if let Some(s) = &cu_status {
                s.render(w);
            }
            let (intercepted, bypassed) = interception
                .lock()
                .map_or((0, 0), |i| (i.active().len(), i.bypass().len()));
            w.gauge(
                "pon_ta_bypassed_prefixes",
                "",
                "Prefixes the proxy's router left to the IP path (overlay cannot reach them).",
                bypassed as f64,
            );
            w.gauge(
                "pon_ta_tun_mtu",
                "",
                "MTU of the TA's TUN device.",
                f64::from(mtu),
            );
            w.gauge(
                "pon_ta_intercepted_prefixes",
                "",
                "Destination prefixes routed into the overlay.",
                intercepted as f64,
            );
        })
    }

    /// Starts the TA's vital thread: it waits for the forwarder (in CU mode,
    /// until the CU names one), starts steering, then forwards.
    pub fn run(self, vital: &Vital) -> anyhow::Result<()> {
        let v = vital.clone();
        vital.spawn("ta", move || self.forward(&v))
    }

    fn forward(mut self, vital: &Vital) -> anyhow::Result<Infallible> {
        let cfg = &self.cfg;
        let forwarders = self.cu.forwarders()?;
        if cfg.steering_port != 0 {
            // The routers' reachability verdicts and the proxies' leases,
            // from the site's forwarders.
            let bind = SocketAddr::V4(SocketAddrV4::new(cfg.local_addr, cfg.steering_port));
            crate::steering::start(
                bind,
                self.identity.noise_secret(),
                forwarders.clone(),
                self.interception.clone(),
                self.steering.clone(),
                self.started,
                vital,
            )?;
        }
        let enc = Encapsulator {
            local: cfg.local_addr,
            encap: cfg.encap,
        };
        let named: Vec<_> = forwarders.load().members.iter().map(|f| f.addr.0).collect();
        // This run's epoch: it names the uplink's keys, and grows across restarts.
        let keys = TaKeys {
            secret: self.identity.noise_secret(),
            epoch: std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(1, |d| d.as_nanos() as u64),
            encrypt: cfg.encrypt_lan,
        };
        if cfg.encap == EncapKind::Udp && forwarders.load().members.iter().any(|f| f.key.is_none())
        {
            tracing::warn!("the forwarder's key is not known (forwarder_key): nothing is sent on the UDP leg until it is");
        }
        tracing::info!(tun = %cfg.tun_name, mtu = self.mtu, forwarders = ?named, encap = ?cfg.encap, encrypt_lan = cfg.encrypt_lan, "TA running");
        run_ta(
            &self.tun,
            self.mtu,
            &enc,
            &self.uplink,
            &forwarders,
            &keys,
            &self.counters,
        )
    }
}

/// An RA set up: its TUN open and its sockets bound.
pub struct RaDaemon {
    cfg: RaConfig,
    tun: Arc<SyncDevice>,
    counters: Arc<RaCounters>,
    ipip: pon_netio::IpipReceiver,
    udp: Option<pon_netio::udp::UdpIo>,
    /// Which proxies it takes packets from; pon-agent's TA updates it from
    /// the CU's view.
    pub decapsulator: Arc<Decapsulator>,
}

impl RaDaemon {
    pub fn start(cfg: &RaConfig) -> anyhow::Result<Self> {
        let tun = Arc::new(crate::tun::open(
            &cfg.tun_name,
            1500,
            Some(cfg.tun_addr),
            cfg.offload,
        )?);
        // Delivered packets arrive on this TUN while replies leave by the
        // TA's: strict reverse-path filtering would drop them; loose mode
        // keeps the spoofing check (the effective mode is the max of "all"
        // and this one) and needs the TUN to have an address (`tun_addr`).
        pon_netio::write_sysctl(&format!("net/ipv4/conf/{}/rp_filter", cfg.tun_name), "2")?;
        let ipip = pon_netio::IpipReceiver::open()
            .context("opening raw IP-in-IP socket (needs CAP_NET_RAW)")?;
        let udp = match cfg.udp_port {
            0 => None,
            port => {
                let bind = SocketAddr::V4(SocketAddrV4::new(cfg.local_addr, port));
                let udp =
                    pon_netio::udp::UdpIo::bind(bind).with_context(|| format!("binding {bind}"))?;
                Some(udp)
            }
        };
        Ok(RaDaemon {
            cfg: cfg.clone(),
            tun,
            counters: Arc::new(RaCounters::default()),
            ipip,
            udp,
            decapsulator: Arc::new(Decapsulator::new(cfg.local_addr)),
        })
    }

    /// The RA's metrics page.
    pub fn metrics(&self) -> Renderer {
        let c = self.counters.clone();
        Arc::new(move |w: &mut PromWriter| c.render(w))
    }

    /// Starts the RA's vital threads (IP-in-IP, and UDP when on).
    /// `vm_secret` gives this VM's static secret; it is asked for only when
    /// the UDP leg needs it, and may block until the TA has made it.
    pub fn run(
        self,
        vital: &Vital,
        vm_secret: impl FnOnce() -> anyhow::Result<[u8; 32]>,
    ) -> anyhow::Result<()> {
        let cfg = &self.cfg;
        // The UDP leg is sealed with the key this VM shares with its proxy:
        // the VM's identity is the TA's (one key per app VM, the one the CU
        // vouches for).
        if self.udp.is_some() && cfg.proxy_key.is_none() {
            tracing::warn!(
                "no proxy_key: the UDP leg accepts nothing until the CU names the site's proxies"
            );
        }
        let secret = match (cfg.proxy_key, &self.udp) {
            (Some(_), Some(_)) => vm_secret()?,
            _ => [0; 32],
        };
        if let Some(k) = cfg.proxy_key {
            if pon_tunnel::lan::PairKey::for_agent(&secret, &k.0).is_none() && self.udp.is_some() {
                anyhow::bail!("proxy_key shares no secret with this VM's key");
            }
        }
        // The configured proxy, unless the CU already named the site's (in
        // pon-agent, the TA's view may have come first).
        let dec = self.decapsulator.clone();
        if dec.senders().addrs().next().is_none() {
            dec.set_senders(dec.senders().with(&[(cfg.proxy, cfg.proxy_key)], &secret));
        }
        tracing::info!(tun = %cfg.tun_name, proxy = %cfg.proxy, udp_port = cfg.udp_port, "RA running");
        if let Some(udp) = self.udp {
            let (tun, dec, c) = (self.tun.clone(), dec.clone(), self.counters.clone());
            vital.spawn("ra-udp", move || run_ra_udp(&udp, &tun, &dec, &c))?;
        }
        let (ipip, tun, c) = (self.ipip, self.tun, self.counters);
        vital.spawn("ra-ipip", move || run_ra_ipip(&ipip, &tun, &dec, &c))
    }
}

/// The VM's identity, once the TA has made it in `dir` (an RA running apart
/// never makes one: two processes making keys in one directory could
/// disagree).
pub fn wait_for_identity(dir: &Path) -> anyhow::Result<Identity> {
    let mut warned = false;
    loop {
        if dir.join(pon_identity::NOISE_KEY).exists() {
            return Identity::load_or_create(dir)
                .map_err(|e| anyhow!("state_dir {}: {e}", dir.display()));
        }
        if !warned {
            tracing::info!(dir = %dir.display(), "waiting for the TA to make this VM's keys");
            warned = true;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_first_vital_thread_to_end_is_reported_whatever_the_way() {
        let (v, watch) = vital();
        v.spawn("fails", || Err(anyhow!("socket gone"))).unwrap();
        let e = format!("{:#}", watch.wait());
        assert!(e.contains("thread fails stopped: socket gone"), "{e}");

        let (v, watch) = vital();
        v.spawn("panics", || panic!("bad state")).unwrap();
        let e = watch.wait().to_string();
        assert_eq!(e, "thread panics panicked: bad state");

        // A thread a vital thread started is watched too.
        let (v, watch) = vital();
        let inner = v.clone();
        v.spawn("outer", move || {
            inner.spawn("inner", || Err(anyhow!("inner died")))?;
            loop {
                std::thread::park();
            }
        })
        .unwrap();
        assert!(format!("{:#}", watch.wait()).contains("inner died"));
    }
}
