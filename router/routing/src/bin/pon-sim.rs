//! pon-sim: drives the router's sans-I/O path selection over a time series
//! of link RTT/loss matrices and compares what each probe selector achieves
//! with an oracle that knows every path at every instant.

use anyhow::{bail, Context};
use clap::Parser;
use pon_routing::config::{
    DEFAULT_BANDWIDTH_EVERY_MS, DEFAULT_IDLE_KEEPALIVE_MS, DEFAULT_KEEPALIVE_MS,
};
use pon_routing::sim::{self, CostConfig, Counts, GenParams, Report, RunConfig, Scenario};
use pon_routing::{Policy, RoutingConfig, SelectorKind};
use std::io::BufReader;
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Simulates PON routers on a generated or recorded series of link matrices
/// and prints, per probe selector, the achieved path RTT relative to a
/// full-knowledge oracle and the probes it cost relative to a full mesh.
///
/// CSV input (--csv): rows `t,src,dst,rtt_ms,loss` (t = interval index;
/// src/dst = site names; rtt_ms empty/inf = link down; loss optional, 0..1).
/// A row holds until the link's next row; a link given one way is used both
/// ways; links never given are down.
#[derive(Parser)]
#[command(version, about, long_about)]
struct Args {
    /// Sites in the generated topology (ignored with --csv).
    #[arg(long, short, default_value_t = 20)]
    nodes: usize,
    /// Intervals to simulate (with --csv: at least this many, holding the
    /// last matrix).
    #[arg(long, short, default_value_t = 200)]
    intervals: usize,
    /// Probe budget per destination per interval.
    #[arg(long, short, default_value_t = 3)]
    k: usize,
    /// Seed of the generated series and of every random choice.
    #[arg(long, short, default_value_t = 1)]
    seed: u64,
    /// rnn, bandit, random, fullmesh, or all.
    #[arg(long, default_value = "all")]
    selector: String,
    /// Read the series from this CSV file instead of generating one.
    #[arg(long)]
    csv: Option<PathBuf>,
    /// Router settings (TOML, as the daemon's [routing] table); the flags
    /// below override it.
    #[arg(long)]
    config: Option<PathBuf>,
    /// 1: direct and one relay; 2: also two relays (n² paths: small n only).
    #[arg(long)]
    max_relays: Option<u8>,
    /// latency, loss or bandwidth.
    #[arg(long)]
    policy: Option<String>,
    /// Hysteresis margin (fraction).
    #[arg(long)]
    margin: Option<f64>,
    /// Hysteresis hold time in ms.
    #[arg(long)]
    hold_ms: Option<u64>,
    /// A steady destination is probed every this many intervals (1: every
    /// interval, as before steady probing).
    #[arg(long)]
    steady_every: Option<u32>,
    /// RNN exploration probability.
    #[arg(long)]
    exploration: Option<f64>,
    /// Intervals not scored at the start (default: a tenth).
    #[arg(long)]
    warmup: Option<usize>,
    /// Relative noise of a probe's RTT.
    #[arg(long, default_value_t = 0.02)]
    jitter: f64,
    /// Share of inflated direct links in the generated series.
    #[arg(long, default_value_t = 0.15)]
    inflated: f64,
    /// Link outages per link per interval in the generated series.
    #[arg(long, default_value_t = 0.0005)]
    outage_rate: f64,
    /// Write the series (generated or read) to this CSV file, in the format
    /// --csv reads.
    #[arg(long)]
    write_csv: Option<PathBuf>,
    /// Print each interval of one pair (site indices SRC,DST) to stderr.
    #[arg(long, value_parser = parse_pair)]
    trace: Option<(usize, usize)>,
    /// Worker threads (selectors run side by side).
    #[arg(long)]
    threads: Option<usize>,
    /// Simulate the routers of this many sites only, spread evenly over
    /// all of them (each still routes to every site, over every relay).
    /// Default: every site up to 200 sites, 16 beyond (a router over a
    /// thousand sites keeps a million candidate paths).
    #[arg(long)]
    sources: Option<usize>,
    /// Keepalive period of a current route whose traffic the egress's
    /// reports stopped confirming, as the proxy's [proxy] keepalive_ms:
    /// counted in the probe cost of busy pairs' failovers.
    #[arg(long, default_value_t = DEFAULT_KEEPALIVE_MS)]
    keepalive_ms: u64,
    /// Keepalive period of every other current route (idle, or traffic
    /// confirmed), as the proxy's [proxy] idle_keepalive_ms.
    #[arg(long, default_value_t = DEFAULT_IDLE_KEEPALIVE_MS)]
    idle_keepalive_ms: u64,
    /// Share of (source, destination) pairs that carry traffic: their
    /// egress sends reports (passive measurement).
    #[arg(long, default_value_t = 0.2)]
    busy: f64,
    /// Bandwidth trains (for policies that weigh bandwidth) this often, as
    /// the proxy's [proxy] bandwidth_every_ms; 0: never.
    #[arg(long, default_value_t = DEFAULT_BANDWIDTH_EVERY_MS)]
    bandwidth_every_ms: u64,
    /// Packets per bandwidth train, as the monitor's train_len.
    #[arg(long, default_value_t = pon_proto::measurement::DEFAULT_TRAIN_LEN)]
    train_len: u16,
}

/// Above this many sites, only a sample of them runs a router by default.
const ALL_SOURCES_UP_TO: usize = 200;
const DEFAULT_SAMPLED_SOURCES: usize = 16;

fn parse_pair(s: &str) -> Result<(usize, usize), String> {
    let (a, b) = s.split_once(',').ok_or("expected SRC,DST")?;
    let a = a
        .trim()
        .parse()
        .map_err(|_| format!("bad site index {a:?}"))?;
    let b = b
        .trim()
        .parse()
        .map_err(|_| format!("bad site index {b:?}"))?;
    Ok((a, b))
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let mut routing = match &args.config {
        Some(p) => RoutingConfig::load(p)?,
        None => RoutingConfig::default(),
    };
    routing.probes_per_interval = args.k;
    routing.seed = args.seed;
    if let Some(n) = args.steady_every {
        routing.steady_every = n;
    }
    if let Some(m) = args.max_relays {
        routing.max_relays = m;
    }
    if let Some(p) = &args.policy {
        routing.policy = match p.as_str() {
            "latency" => Policy::Latency,
            "loss" => Policy::Loss,
            "bandwidth" => Policy::Bandwidth,
            other => bail!("--policy {other:?}: expected latency, loss or bandwidth"),
        };
    }
    if let Some(m) = args.margin {
        routing.switch_margin = m;
    }
    if let Some(h) = args.hold_ms {
        routing.hold_ms = h;
    }
    if let Some(e) = args.exploration {
        routing.rnn.exploration = e;
    }
    routing.validate()?;
    let selectors: Vec<SelectorKind> = if args.selector == "all" {
        SelectorKind::ALL.to_vec()
    } else {
        args.selector
            .split(',')
            .map(|s| {
                SelectorKind::parse(s.trim()).with_context(|| {
                    format!("--selector {s:?}: expected rnn, bandit, random, fullmesh or all")
                })
            })
            .collect::<anyhow::Result<_>>()?
    };
    let threads = args
        .threads
        .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()))
        .max(1);

    let t0 = Instant::now();
    let scenario: Scenario = match &args.csv {
        Some(path) => {
            let f =
                std::fs::File::open(path).with_context(|| format!("opening {}", path.display()))?;
            sim::from_csv(BufReader::new(f), args.intervals)
                .with_context(|| format!("reading {}", path.display()))?
        }
        None => {
            if !(3..=1000).contains(&args.nodes) {
                bail!("--nodes {}: expected 3..=1000", args.nodes);
            }
            sim::generate(&GenParams {
                inflated_share: args.inflated,
                link_outage_rate: args.outage_rate,
                ..GenParams::new(args.nodes, args.intervals, args.seed)
            })
        }
    };
    if let Some(path) = &args.write_csv {
        let f =
            std::fs::File::create(path).with_context(|| format!("creating {}", path.display()))?;
        scenario
            .write_csv(std::io::BufWriter::new(f))
            .with_context(|| format!("writing {}", path.display()))?;
    }
    if scenario.nodes < 3 {
        bail!("need at least 3 sites, the series has {}", scenario.nodes);
    }
    if routing.max_relays >= 2 && scenario.nodes > 40 {
        eprintln!(
            "warning: two relays over {} sites means {} candidate paths per destination; this will be slow",
            scenario.nodes,
            (scenario.nodes - 2) * (scenario.nodes - 2)
        );
    }
    let warmup = args.warmup.unwrap_or(scenario.intervals / 10);
    if args.keepalive_ms == 0 || args.idle_keepalive_ms == 0 {
        bail!("--keepalive-ms and --idle-keepalive-ms must be positive (the proxy requires it)");
    }
    if !(0.0..=1.0).contains(&args.busy) {
        bail!("--busy is a share of pairs, between 0 and 1");
    }
    let sources = sim::spread_sources(
        scenario.nodes,
        args.sources
            .unwrap_or(if scenario.nodes <= ALL_SOURCES_UP_TO {
                scenario.nodes
            } else {
                DEFAULT_SAMPLED_SOURCES
            })
            .max(1),
    );
    if let Some((src, dst)) = args.trace {
        if dst >= scenario.nodes || !sources.contains(&src) {
            bail!(
                "--trace {src},{dst}: the source must be one of the simulated sites ({} of {}, see --sources) and the destination below {}",
                sources.len(),
                scenario.nodes,
                scenario.nodes
            );
        }
    }
    let oracle = sim::oracle_for(
        &scenario,
        &routing.policy,
        routing.max_relays,
        threads,
        &sources,
    );
    let prep = t0.elapsed();

    let base = RunConfig {
        routing: routing.clone(),
        warmup,
        probe_jitter: args.jitter,
        probe_timeout: Duration::from_millis(routing.interval_ms.min(2000)),
        seed: args.seed,
        trace: args.trace,
        cost: CostConfig {
            keepalive: Duration::from_millis(args.keepalive_ms),
            idle_keepalive: Duration::from_millis(args.idle_keepalive_ms),
            busy: args.busy,
            report_every: Duration::from_millis(pon_proto::report::REPORT_EVERY_MS),
            failover_losses: routing.failover_losses,
            bandwidth_every: (args.bandwidth_every_ms > 0)
                .then(|| Duration::from_millis(args.bandwidth_every_ms)),
            train_len: args.train_len,
        },
    };
    let next = AtomicUsize::new(0);
    let reports: Mutex<Vec<(usize, Report)>> = Mutex::new(Vec::new());
    std::thread::scope(|scope| {
        for _ in 0..threads.min(selectors.len()) {
            scope.spawn(|| loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                let Some(&kind) = selectors.get(i) else {
                    break;
                };
                let mut rc = base.clone();
                rc.routing.selector = kind;
                let r = sim::run(&scenario, &oracle, &rc);
                reports
                    .lock()
                    .expect("no panics while holding")
                    .push((i, r));
            });
        }
    });
    let mut reports = reports.into_inner().expect("no panics while holding");
    reports.sort_by_key(|(i, _)| *i);

    println!("pon-sim: {}", scenario.description);
    println!(
        "{} intervals of {} ms ({} scored), k = {} (every {} intervals once steady for {} ms), max relays {}, policy {:?}, margin {:.0} %, hold {} ms, failover after {} lost probes",
        scenario.intervals,
        routing.interval_ms,
        scenario.intervals.saturating_sub(warmup),
        routing.probes_per_interval,
        routing.steady_every,
        routing.steady_after_ms,
        routing.max_relays,
        routing.policy,
        routing.switch_margin * 100.0,
        routing.hold_ms,
        routing.failover_losses,
    );
    println!(
        "{} pairs, {} candidate paths per destination (a full mesh probes all of them every interval); setup {:.1} s",
        scenario.nodes * (scenario.nodes - 1),
        oracle.candidates,
        prep.as_secs_f64()
    );
    if sources.len() < scenario.nodes {
        println!(
            "routers simulated at {} of the {} sites (--sources), each routing to all the others: {} pairs scored",
            sources.len(),
            scenario.nodes,
            sources.len() * (scenario.nodes - 1)
        );
    }
    println!();
    println!(
        "{:<10} {:>9} {:>8} {:>8} {:>8} {:>7} {:>7} {:>8} {:>9} {:>9} {:>10} {:>9} {:>6}",
        "selector",
        "rtt/orcl",
        "median",
        "p95",
        "worst",
        "≤5%",
        "dead%",
        "unreach%",
        "chg/100i",
        "fail/100i",
        "probes/dst",
        "vs mesh",
        "secs"
    );
    let mut rows = vec![sim::direct_baseline(&scenario, &oracle, warmup)];
    rows.extend(reports.into_iter().map(|(_, r)| r));
    for r in &rows {
        let probes = if r.selector == "direct-ip" {
            "-".to_string()
        } else {
            format!("{:.2}", r.probes_per_dst_interval)
        };
        let vs = if r.selector == "direct-ip" {
            "-".to_string()
        } else {
            format!(
                "{:.3}",
                r.probes_per_dst_interval / r.full_mesh_probes as f64
            )
        };
        println!(
            "{:<10} {:>9.4} {:>8.4} {:>8.4} {:>8.3} {:>6.1}% {:>6.3}% {:>7.3}% {:>9.3} {:>9.3} {:>10} {:>9} {:>6.1}",
            r.selector,
            r.ratio_mean,
            r.ratio_p50,
            r.ratio_p95,
            r.ratio_max,
            r.pairs_within_5pct * 100.0,
            r.dead_share * 100.0,
            r.unreachable_share * 100.0,
            r.changes_per_pair_per_100,
            r.failovers_per_pair_per_100,
            probes,
            vs,
            r.elapsed.as_secs_f64()
        );
    }
    println!();
    print_cost(&rows, &base.cost);
    println!();
    let worst: Vec<String> = rows
        .iter()
        .map(|r| format!("{} {}→{}", r.selector, r.worst_pair.0, r.worst_pair.1))
        .collect();
    println!(
        "worst pairs (site indices, see --trace): {}",
        worst.join(", ")
    );
    println!("rtt/orcl: per (src,dst) pair, Σ RTT of the route in use / Σ RTT of the oracle's best path over scored intervals where both were up; mean, median, p95 and worst over pairs. ≤5%: pairs within 5 % of the oracle.");
    println!("dead%: share of pair-intervals (with some path up) spent on a dead route; unreach%: ...spent declared unreachable (traffic on the IP path).");
    println!("chg/100i, fail/100i: route changes and failovers per pair per 100 intervals. probes/dst: per destination per interval; vs mesh: that / full mesh.");
    Ok(())
}

/// The probe cost table: probes/s per destination and per proxy, by kind.
fn print_cost(rows: &[Report], cfg: &CostConfig) {
    println!(
        "probe cost, probes/s (keepalive every {} ms on each current route, every {} ms while its traffic goes unconfirmed; {:.0} % of pairs carry traffic, reported every {} ms; bandwidth trains of {} every {}):",
        cfg.idle_keepalive.as_millis(),
        cfg.keepalive.as_millis(),
        cfg.busy * 100.0,
        cfg.report_every.as_millis(),
        cfg.train_len,
        cfg.bandwidth_every
            .map_or("never".to_string(), |d| format!("{} ms", d.as_millis())),
    );
    println!(
        "{:<10} {:>8} {:>8} {:>8} {:>8} | {:>8} {:>8} {:>8} {:>8} {:>8} {:>8} | {:>8} {:>8} {:>8} {:>8} | {:>8} {:>8}",
        "selector",
        "dst:lrn",
        "keepal",
        "bw",
        "sent",
        "prx:lrn",
        "keepal",
        "bw",
        "sent",
        "answers",
        "relayed",
        "wire",
        "max:sent",
        "answers",
        "wire",
        "dst:rep",
        "all"
    );
    let f = |x: f64| {
        if x.is_nan() {
            "-".to_string()
        } else {
            format!("{x:.2}")
        }
    };
    let mut estimated = false;
    for r in rows {
        let Some(c) = &r.cost else {
            continue;
        };
        estimated |= !c.all_sources;
        let (d, m, x): (&Counts, &Counts, &Counts) =
            (&c.per_destination, &c.per_proxy_mean, &c.per_proxy_max);
        println!(
            "{:<10} {:>8} {:>8} {:>8} {:>8} | {:>8} {:>8} {:>8} {:>8} {:>8} {:>8} | {:>8} {:>8} {:>8} {:>8} | {:>8} {:>8}",
            r.selector,
            f(d.learning()),
            f(d.keepalive()),
            f(d.bandwidth()),
            f(d.sent()),
            f(m.learning()),
            f(m.keepalive()),
            f(m.bandwidth()),
            f(m.sent()),
            f(m.answers()),
            f(m.relayed()),
            f(m.wire()),
            f(c.max_sent),
            f(x.answers()),
            f(c.max_wire),
            f(d.reports()),
            f(d.spent()),
        );
    }
    println!("dst:…: per destination (mean over pairs), probes it originates: learning (the router's budget), keepalive (current route), bandwidth (train packets), sent = their sum.");
    println!("dst:rep: reports per destination (the egress's, for busy pairs); all: per destination, everything an end of a pair spends on measurement = sent + the answers to it + reports.");
    println!("prx:…: per proxy (mean over proxies): what it originates, the answers it sends to others' probes, the probes and answers it forwards as a relay (twice per answered probe per relay), wire = all of them. max:…: the busiest proxy.");
    if estimated {
        println!("sampled sources: answers and relayed per proxy are what a simulated source's probes cause (every probe is answered by one proxy, so the mean is the same); their max needs every site simulated (-).");
    }
}
