//! What the status page (`GET /status`, `ponctl --routes`) and the
//! routing metrics show: plain data, built by the core's parts.

use pon_monitor::stats::PathStats;
use pon_routing::Policy;
use serde::Serialize;

pub fn policy_name(p: &Policy) -> String {
    match p {
        Policy::Latency => "latency".into(),
        Policy::Loss => "loss".into(),
        Policy::Bandwidth => "bandwidth".into(),
        Policy::Weighted(w) => {
            format!("weighted(rtt={},loss={},bw={})", w.rtt, w.loss, w.bandwidth)
        }
    }
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct Status {
    pub id: u32,
    /// This proxy's role among its site's proxies (`PROXY.MASTER`: the
    /// lowest id; every proxy of a site forwards); none in static mode.
    pub site_role: Option<&'static str>,
    pub routing: bool,
    pub destinations: Vec<DestinationStatus>,
    pub budget: BudgetStatus,
    /// The sessions with each peer proxy.
    pub tunnels: Vec<pon_tunnel::PeerStatus>,
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct DestinationStatus {
    pub id: u32,
    pub policy: String,
    pub reachable: bool,
    /// Hops after this proxy (relays, then the destination).
    pub current: Option<Vec<u32>>,
    /// The current route's cost under the policy (ms-equivalent).
    pub metric: Option<f64>,
    pub candidates: Vec<CandidateStatus>,
    /// Probes of every kind that came back answered or lost.
    pub probes_sent: u64,
    pub probes_per_sec: f64,
    /// The router's own counts: route changes, failovers, outages.
    #[serde(flatten)]
    pub stats: pon_routing::DestinationStats,
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct CandidateStatus {
    pub path: Vec<u32>,
    pub cost: Option<f64>,
    pub rtt_ms: Option<f64>,
    pub loss: f64,
    pub last_reply_ms_ago: Option<u64>,
    pub bandwidth_mbps: Option<f64>,
    /// The monitor's own estimates of the path (percentiles, jitter, its
    /// loss window), where the monitor runs in this process.
    pub monitor: Option<PathStats>,
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct BudgetStatus {
    /// The monitor's figures, where it runs in this process.
    #[serde(flatten)]
    pub monitor: pon_monitor::Budget,
    /// Probes per second over the last few seconds.
    pub probes_per_sec: f64,
    /// Answers to other monitors' probes per second, over the same window
    /// (where the monitor runs in this process).
    pub answers_per_sec: f64,
    /// Keepalive period of a current route whose traffic went unconfirmed.
    pub keepalive_ms: u64,
    /// Keepalive period of every other current route.
    pub idle_keepalive_ms: u64,
    pub interval_ms: Option<u64>,
    pub probes_per_interval: Option<usize>,
    /// A steady destination is probed every this many intervals.
    pub steady_every: Option<u32>,
}

impl Status {
    pub fn render(&self, w: &mut pon_telemetry::PromWriter) {
        w.gauge(
            "pon_monitor_probe_rate",
            "",
            "Probe packets sent per second (last few seconds).",
            self.budget.probes_per_sec,
        );
        w.gauge(
            "pon_monitor_answer_rate",
            "",
            "Answers to other monitors' probes sent per second (last few seconds).",
            self.budget.answers_per_sec,
        );
        w.gauge(
            "pon_monitor_probe_budget",
            "",
            "Ceiling on probe packets per second.",
            f64::from(self.budget.monitor.max_probes_per_sec),
        );
        for d in &self.destinations {
            let l = format!("dst=\"{}\"", d.id);
            w.gauge(
                "pon_router_reachable",
                &l,
                "1 while the destination is reachable over the overlay.",
                if d.reachable { 1.0 } else { 0.0 },
            );
            w.gauge(
                "pon_router_route_relays",
                &l,
                "Relays on the current route (-1: none, traffic takes the IP path).",
                d.current.as_ref().map_or(-1.0, |c| (c.len() - 1) as f64),
            );
            if let Some(m) = d.metric {
                w.gauge(
                    "pon_router_route_cost",
                    &l,
                    "Cost of the current route under the destination's policy (ms-equivalent).",
                    m,
                );
            }
            w.counter(
                "pon_router_probes_total",
                &l,
                "Probes sent towards the destination (learning and keepalive).",
                d.probes_sent,
            );
            w.gauge(
                "pon_router_probe_rate",
                &l,
                "Probes per second towards the destination.",
                d.probes_per_sec,
            );
            w.counter(
                "pon_router_destination_route_changes_total",
                &l,
                "Route changes of the destination.",
                d.stats.route_changes,
            );
        }
    }
}

/// What a daemon's `GET /status` answers, the gauges it adds to its
/// metrics, and what it reports to the CU (PMon), if anything.
pub trait StatusPage: Serialize + Send + Sync + 'static {
    fn render(&self, _w: &mut pon_telemetry::PromWriter) {}
    fn report(&self) -> Option<pon_proto::pmon::Report> {
        None
    }
}

impl StatusPage for Status {
    fn render(&self, w: &mut pon_telemetry::PromWriter) {
        Status::render(self, w)
    }
    fn report(&self) -> Option<pon_proto::pmon::Report> {
        self.routing.then(|| self.pmon_report())
    }
}

impl Status {
    /// What the CU's matrix wants from this proxy: per destination its
    /// reachability, current route and what the monitor measures on that
    /// route. Nothing is measured for it: these are the router's figures.
    pub fn pmon_report(&self) -> pon_proto::pmon::Report {
        use pon_proto::pmon::{DestinationReport, Figures, Report, MAX_DESTINATIONS, MAX_US, PPM};
        let us = |v: u64| v.min(u64::from(MAX_US)) as u32;
        let ms = |v: f64| us((v.max(0.0) * 1000.0) as u64);
        let destinations = self
            .destinations
            .iter()
            .take(MAX_DESTINATIONS)
            .map(|d| {
                let route = d
                    .current
                    .clone()
                    .filter(|_| d.reachable)
                    .unwrap_or_default();
                let c = d
                    .candidates
                    .iter()
                    .find(|c| !route.is_empty() && c.path == route);
                let m = c.and_then(|c| c.monitor.as_ref());
                DestinationReport {
                    dst: d.id,
                    reachable: !route.is_empty(),
                    route,
                    figures: Figures {
                        rtt_us: m
                            .and_then(|m| m.srtt_us)
                            .map(us)
                            .or(c.and_then(|c| c.rtt_ms).map(ms)),
                        p50_us: m.and_then(|m| m.p50_us).map(us),
                        p90_us: m.and_then(|m| m.p90_us).map(us),
                        p99_us: m.and_then(|m| m.p99_us).map(us),
                        jitter_us: m.map(|m| us(m.jitter_us)),
                        loss_ppm: c.map(|c| (c.loss.clamp(0.0, 1.0) * f64::from(PPM)) as u32),
                    },
                }
            })
            .collect();
        Report { destinations }
    }
}

impl StatusPage for MonitorStatus {}

impl StatusPage for ForwarderStatus {}

/// pon-forwarder's status page: the table's inputs as it last composed them.
#[derive(Debug, Clone, Default, Serialize)]
pub struct ForwarderStatus {
    pub id: u32,
    /// This proxy's role among its site's proxies (`PROXY.MASTER`: the
    /// lowest id; every proxy of a site forwards); none in static mode.
    pub site_role: Option<&'static str>,
    /// The router's routes laid over the base: (to, relays).
    pub routes: Vec<(u32, Vec<u32>)>,
    /// Destinations left to the IP path (their TAs are steered).
    pub unreachable: Vec<u32>,
    /// Whether a router has spoken (until then TAs are not steered).
    pub routed: bool,
    pub peers: usize,
    pub destinations: usize,
    pub agents: usize,
    /// The sessions with each peer proxy.
    pub tunnels: Vec<pon_tunnel::PeerStatus>,
}

/// pon-monitor's status page: every path's estimates and probe rate.
#[derive(Debug, Clone, Default, Serialize)]
pub struct MonitorStatus {
    pub id: u32,
    pub budget: BudgetStatus,
    pub paths: Vec<PathStatus>,
    /// (path, period in ms) of the paths probed at a rate.
    pub rates: Vec<(Vec<u32>, u64)>,
}

#[derive(Debug, Clone, Serialize)]
pub struct PathStatus {
    pub path: Vec<u32>,
    #[serde(flatten)]
    pub stats: PathStats,
}
