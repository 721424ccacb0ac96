//! ponctl: the PON administrator's tool. It presents the admin credential
//! `pon-cu init` wrote (no agent holds it) and asks the CU for its registry
//! (with `--routes`, every online proxy for its routes), makes scoped join
//! tokens, and revokes agents.
//!
//! Routes come from each proxy's own status endpoint (`GET /status`), not
//! through the CU: they change with every probe, the CU has no use for them,
//! and the proxy's own answer is live. The CU supplies the list of proxies.

use anyhow::{bail, Context};
use clap::{Parser, Subcommand};
use pon_cu::config::parse_duration_s;
use pon_proto::control::{
    AdminRequest, AgentMsg, AgentRecord, CuMsg, Endpoints, TokenInfo, PROTOCOL_VERSION,
};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::{Duration, SystemTime};

/// Administers the PON Central Unit: lists the agents it knows (by cloud
/// and role, with their ids, addresses, state and last-seen time), makes
/// join tokens, revokes agents.
#[derive(Parser)]
#[command(version, about, long_about)]
struct Args {
    /// The CU's QUIC address.
    #[arg(long)]
    cu: SocketAddr,
    /// CA certificate (PEM) that signed the CU's certificate.
    #[arg(long)]
    ca: PathBuf,
    /// The admin certificate (admin.pem, made by pon-cu init).
    #[arg(long)]
    cert: PathBuf,
    /// Its key (admin.key).
    #[arg(long)]
    key: PathBuf,
    /// Name in the CU's certificate.
    #[arg(long, default_value = "pon-cu")]
    server_name: String,
    /// Print JSON instead of a table.
    #[arg(long, global = true)]
    json: bool,
    /// Also show, per online proxy, each destination's current path, its
    /// metric, the candidates and the probe budget used (asks the proxies).
    #[arg(long)]
    routes: bool,
    /// Port of the proxies' status endpoint, on their agent-side address.
    #[arg(long, default_value_t = pon_telemetry::metrics_port::FORWARDER)]
    status_port: u16,
    #[command(subcommand)]
    cmd: Option<Cmd>,
}

#[derive(Subcommand)]
enum Cmd {
    /// The registry (the default).
    List,
    /// Join tokens.
    #[command(subcommand)]
    Token(TokenCmd),
    /// Remove an agent (CLOUD/NAME): every peer is told it is gone at once,
    /// its key is refused from then on, its connection is closed.
    Revoke {
        /// CLOUD/NAME, as `list` shows them.
        agent: String,
    },
    /// The site-by-site matrix the CU keeps from the proxies' reports:
    /// every ordered pair of sites, its current route (relays), RTT,
    /// percentiles, jitter and loss.
    Matrix {
        #[command(flatten)]
        pair: Pair,
        #[command(flatten)]
        want: Want,
    },
    /// Streams events as they happen: route changed, destination
    /// unreachable and reachable again, RTT or loss threshold crossed.
    Watch {
        #[command(flatten)]
        pair: Pair,
        #[command(flatten)]
        want: Want,
        /// Also print every changed cell (the values), not only events.
        #[arg(long)]
        values: bool,
        /// Also a snapshot of every watched cell this often (at least 100;
        /// printed like --values).
        #[arg(long)]
        every_ms: Option<u32>,
    },
}

/// Which pairs: one pair of sites, every pair from or to a site, or all.
#[derive(clap::Args, Clone)]
struct Pair {
    /// Source site.
    #[arg(long)]
    from: Option<String>,
    /// Destination site.
    #[arg(long)]
    to: Option<String>,
}

/// What to watch: thresholds of one's own, and which metrics.
#[derive(clap::Args, Clone)]
struct Want {
    /// Own RTT threshold (ms): `above` / `below` events from it instead of
    /// the server's thresholds ...
    #[arg(long)]
    rtt_above_ms: Option<f64>,
    /// ... own loss threshold (fraction, e.g. 0.01) ...
    #[arg(long)]
    loss_above: Option<f64>,
    /// ... and how far (fraction of the threshold) a value must fall under
    /// it to be `below` again.
    #[arg(long, default_value_t = 0.2)]
    hysteresis: f64,
    /// Only these metrics (comma-separated: rtt, loss, percentiles,
    /// jitter, route); cells carry only these, events of others are left
    /// out. Default: all.
    #[arg(long, value_delimiter = ',', value_parser = parse_metric)]
    metrics: Vec<pon_proto::pmon::Metric>,
}

fn parse_metric(s: &str) -> Result<pon_proto::pmon::Metric, String> {
    use pon_proto::pmon::Metric;
    Metric::ALL
        .into_iter()
        .find(|m| m.name() == s)
        .ok_or_else(|| {
            let names: Vec<_> = Metric::ALL.iter().map(|m| m.name()).collect();
            format!("{s:?}: one of {}", names.join(", "))
        })
}

impl Want {
    /// The subscription's own thresholds, if any was given (the server
    /// checks the values and says what is wrong).
    fn thresholds(&self) -> Option<pon_proto::pmon::Thresholds> {
        if self.rtt_above_ms.is_none() && self.loss_above.is_none() {
            return None;
        }
        let ppm = |f: f64| (f * f64::from(pon_proto::pmon::PPM)).round() as u32;
        Some(pon_proto::pmon::Thresholds {
            rtt_us: self.rtt_above_ms.map(|ms| (ms * 1000.0).round() as u32),
            loss_ppm: self.loss_above.map(ppm),
            hysteresis_ppm: ppm(self.hysteresis),
        })
    }
}

#[derive(Subcommand)]
enum TokenCmd {
    /// Make a token and print it (it is shown once; the CU keeps a hash).
    Create {
        /// The cloud whose agents it may enrol ("*": any).
        #[arg(long)]
        cloud: String,
        /// The roles it may enrol: PROXY covers PROXY and PROXY.* (also
        /// written PROXY*), APP app VMs, "*" any.
        #[arg(long)]
        role: String,
        /// How many agents it may enrol, or "unlimited".
        #[arg(long, default_value = "1", value_parser = parse_uses)]
        uses: Uses,
        /// How long it is valid: 90s, 30m, 1h, 7d.
        #[arg(long, default_value = "1h", value_parser = parse_duration_s)]
        ttl: u64,
    },
    /// The tokens the CU knows (not their secrets).
    List,
}

#[derive(Clone, Copy)]
struct Uses(Option<u32>);

fn parse_uses(s: &str) -> Result<Uses, String> {
    if s == "unlimited" {
        return Ok(Uses(None));
    }
    match s.parse::<u32>() {
        Ok(n) if n > 0 => Ok(Uses(Some(n))),
        _ => Err(format!(
            "{s:?}: a number of uses (1 or more) or \"unlimited\""
        )),
    }
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let request = match &args.cmd {
        Some(Cmd::Matrix { pair, want }) => return pmon(&args, pair, want, None, false).await,
        Some(Cmd::Watch {
            pair,
            want,
            values,
            every_ms,
        }) => return pmon(&args, pair, want, *every_ms, *values).await,
        None | Some(Cmd::List) => AdminRequest::List,
        Some(Cmd::Token(TokenCmd::List)) => AdminRequest::ListTokens,
        Some(Cmd::Token(TokenCmd::Create {
            cloud,
            role,
            uses,
            ttl,
        })) => AdminRequest::CreateToken {
            cloud: cloud.clone(),
            role: role.clone(),
            uses: uses.0,
            ttl_s: *ttl,
        },
        Some(Cmd::Revoke { agent }) => {
            let Some((cloud, name)) = agent.split_once('/') else {
                bail!("revoke {agent:?}: name the agent as CLOUD/NAME");
            };
            AdminRequest::Revoke {
                cloud: cloud.into(),
                name: name.into(),
            }
        }
    };
    let (ep, conn) = connect(&args).await?;
    let msg = pon_cu::enrolment::request(
        &conn,
        &AgentMsg::Admin {
            version: PROTOCOL_VERSION,
            request,
        },
    )
    .await
    .map_err(|e| anyhow::anyhow!(e))
    .with_context(|| format!("asking the CU at {}", args.cu))?;
    conn.close(0u32.into(), b"done");
    ep.wait_idle().await;
    match msg {
        CuMsg::Registry(records) => show_registry(&args, &records)?,
        CuMsg::Token { token, info } if args.json => println!(
            "{}",
            serde_json::to_string_pretty(&serde_json::json!({"token": token, "info": info}))?
        ),
        CuMsg::Token { token, info } => {
            eprintln!("{}", describe(&info));
            println!("{token}");
        }
        CuMsg::Tokens(t) if args.json => println!("{}", serde_json::to_string_pretty(&t)?),
        CuMsg::Tokens(t) => t.iter().for_each(|t| println!("{}", describe(t))),
        CuMsg::Revoked { id } => match id {
            Some(id) => println!("revoked (id {id}; its peers were told it is gone)"),
            None => println!("revoked (it had not registered)"),
        },
        CuMsg::Refused(why) => bail!("the CU refused: {why}"),
        other => bail!("unexpected answer from the CU: {other:?}"),
    }
    Ok(())
}

/// A connection to the CU with the credential of the command line.
async fn connect(args: &Args) -> anyhow::Result<(quinn::Endpoint, quinn::Connection)> {
    let cert = pon_cu::tls::ClientCert::from_files(&args.cert, &args.key)?;
    let cfg = pon_cu::tls::client_config(&args.ca, Duration::from_secs(5), Some(cert))?;
    let ep = quinn::Endpoint::client("0.0.0.0:0".parse()?)?;
    match pon_cu::enrolment::connect(&ep, cfg, args.cu, &args.server_name).await {
        Ok(c) => Ok((ep, c)),
        Err(failed) => bail!("{}", failed.message()),
    }
}

/// `matrix` (the matrix once) and `watch` (then events, and with
/// `values` changed cells, and with `every_ms` snapshots, until the server
/// or the user ends it). One JSON document for `matrix --json`; JSON Lines
/// for `watch --json`. The server is the CU, or a proxy's PMon listener.
async fn pmon(
    args: &Args,
    pair: &Pair,
    want: &Want,
    every_ms: Option<u32>,
    values: bool,
) -> anyhow::Result<()> {
    use pon_cu::pmon_text;
    use pon_proto::control::{FrameDecoder, MAX_CU_FRAME};
    let stream = matches!(args.cmd, Some(Cmd::Watch { .. }));
    let values = values || every_ms.is_some();
    let (ep, conn) = connect(args).await?;
    let subscription = pon_proto::pmon::Subscription {
        from: pair.from.clone(),
        to: pair.to.clone(),
        stream,
        thresholds: want.thresholds(),
        metrics: want.metrics.clone(),
        every_ms,
    };
    let msg = AgentMsg::Subscribe {
        version: PROTOCOL_VERSION,
        subscription,
    };
    // The stream stays open both ways: the CU drops a watcher whose
    // stream ends. A one-off matrix ends when the CU closes it.
    let (mut send, mut recv) = conn.open_bi().await.context("opening a stream to the CU")?;
    send.write_all(&pon_proto::control::encode(&msg))
        .await
        .context("subscribing")?;
    let mut dec = FrameDecoder::new(MAX_CU_FRAME);
    // A large matrix comes in parts (a thousand sites: a million cells).
    let mut parts = pon_proto::pmon::MatrixAssembler::default();
    const MAX_CELLS: usize = 1 << 22;
    loop {
        while let Some(m) = dec.next_msg::<CuMsg>()? {
            if let CuMsg::Matrix(_) | CuMsg::MatrixPart { .. } = m {
                let Some(m) = parts.push(m, MAX_CELLS)? else {
                    continue;
                };
                match (stream, args.json) {
                    (false, true) => println!("{}", serde_json::to_string_pretty(&m)?),
                    (false, false) => print!("{}", pmon_text::matrix(&m)),
                    (true, true) => println!("{}", serde_json::json!({"matrix": m})),
                    (true, false) => eprint!("{}", pmon_text::matrix(&m)),
                }
                if !stream {
                    conn.close(0u32.into(), b"done");
                    ep.wait_idle().await;
                    return Ok(());
                }
                continue;
            }
            match m {
                CuMsg::Events(evs) => {
                    for e in evs {
                        if args.json {
                            println!("{}", serde_json::json!({"event": e}));
                        } else {
                            println!("{}", pmon_text::event(&e));
                        }
                    }
                }
                CuMsg::Cells(cells) if values => {
                    for c in cells {
                        if args.json {
                            println!("{}", serde_json::json!({"cell": c}));
                        } else {
                            println!(
                                "{} -> {}  {}  rtt {} ms  loss {}",
                                c.from,
                                c.to,
                                pmon_text::route(&c),
                                pmon_text::ms(c.figures.rtt_us),
                                pmon_text::loss(c.figures.loss_ppm),
                            );
                        }
                    }
                }
                CuMsg::Cells(_) => {}
                CuMsg::Refused(why) => bail!("the CU refused: {why}"),
                other => bail!("unexpected message from the CU: {other:?}"),
            }
        }
        match recv.read_chunk(1 << 20, true).await {
            Ok(Some(c)) => dec.push(&c.bytes)?,
            Ok(None) => bail!("the CU ended the stream"),
            Err(e) => bail!("connection to the CU lost: {e}"),
        }
    }
}

fn describe(t: &TokenInfo) -> String {
    let now = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64);
    let life = if now >= t.expires_ms {
        "expired".to_string()
    } else {
        format!("expires in {} s", (t.expires_ms - now) / 1000)
    };
    let uses = t
        .uses_left
        .map_or("unlimited uses".into(), |n| format!("{n} uses left"));
    format!(
        "token {}: cloud {}, roles {}, {uses}, {life}",
        t.id, t.cloud, t.role
    )
}

fn show_registry(args: &Args, records: &[AgentRecord]) -> anyhow::Result<()> {
    let routes = if args.routes {
        proxy_routes(records, args.status_port)
    } else {
        Vec::new()
    };
    if args.json && args.routes {
        let r: Vec<_> = routes
            .iter()
            .map(|(rec, st)| serde_json::json!({"id": rec.info.id, "cloud": rec.info.cloud, "status": st}))
            .collect();
        println!(
            "{}",
            serde_json::to_string_pretty(
                &serde_json::json!({"agents": json(records), "routes": r})
            )?
        );
    } else if args.json {
        println!("{}", serde_json::to_string_pretty(&json(records))?);
    } else {
        table(records);
        for (rec, st) in &routes {
            print_routes(rec, st);
        }
    }
    Ok(())
}

fn addresses(e: &Endpoints) -> String {
    match e {
        Endpoints::Proxy {
            pon,
            agent_addr,
            agent_udp_port,
        } => format!("pon={pon} agents={agent_addr} udp={agent_udp_port}"),
        Endpoints::App { addr, encap } => format!("{addr} ({encap:?})").to_lowercase(),
        Endpoints::Other { addrs } => addrs
            .iter()
            .map(|a| a.to_string())
            .collect::<Vec<_>>()
            .join(" "),
    }
}

fn json(records: &[AgentRecord]) -> serde_json::Value {
    serde_json::Value::Array(
        records
            .iter()
            .map(|r| {
                serde_json::json!({
                    "id": r.info.id,
                    "cloud": r.info.cloud,
                    "role": r.info.role,
                    "name": r.info.name,
                    "online": r.online,
                    "last_seen_ms": r.last_seen_ms,
                    "addresses": addresses(&r.info.endpoints),
                    "endpoints": r.info.endpoints,
                    "noise_key": r.info.noise_key,
                    "allowed": r.info.allowed,
                })
            })
            .collect(),
    )
}

fn ago(ms: u64) -> String {
    let now = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0);
    match now.saturating_sub(ms) / 1000 {
        s if s < 60 => format!("{s}s ago"),
        s if s < 3600 => format!("{}m ago", s / 60),
        s => format!("{}h ago", s / 3600),
    }
}

fn table(records: &[AgentRecord]) {
    let mut sorted: Vec<_> = records.iter().collect();
    sorted.sort_by(|a, b| {
        (&a.info.cloud, &a.info.role, a.info.id).cmp(&(&b.info.cloud, &b.info.role, b.info.id))
    });
    let rows: Vec<[String; 7]> = sorted
        .iter()
        .map(|r| {
            [
                r.info.cloud.clone(),
                r.info.role.clone(),
                r.info.id.to_string(),
                r.info.name.clone(),
                if r.online { "online" } else { "gone" }.into(),
                ago(r.last_seen_ms),
                addresses(&r.info.endpoints),
            ]
        })
        .collect();
    let header = [
        "CLOUD",
        "ROLE",
        "ID",
        "NAME",
        "STATE",
        "LAST SEEN",
        "ADDRESSES",
    ]
    .map(String::from);
    let mut widths = [0usize; 7];
    for row in std::iter::once(&header).chain(rows.iter()) {
        for (w, c) in widths.iter_mut().zip(row.iter()) {
            *w = (*w).max(c.len());
        }
    }
    for row in std::iter::once(&header).chain(rows.iter()) {
        let line: Vec<String> = row
            .iter()
            .zip(widths)
            .map(|(c, w)| format!("{c:<w$}"))
            .collect();
        println!("{}", line.join("  ").trim_end());
    }
}

/// The status page of every online proxy (`Null` where it did not answer).
fn proxy_routes(records: &[AgentRecord], port: u16) -> Vec<(&AgentRecord, serde_json::Value)> {
    let mut proxies: Vec<&AgentRecord> = records
        .iter()
        .filter(|r| r.online && r.info.is_proxy())
        .collect();
    proxies.sort_by_key(|r| r.info.id);
    proxies
        .into_iter()
        .map(|r| {
            let Endpoints::Proxy { agent_addr, .. } = r.info.endpoints else {
                return (r, serde_json::Value::Null);
            };
            let addr = SocketAddr::from((agent_addr, port));
            let st = http_get(addr, "/status")
                .ok()
                .and_then(|b| serde_json::from_str(&b).ok())
                .unwrap_or(serde_json::Value::Null);
            (r, st)
        })
        .collect()
}

/// A minimal HTTP/1.1 GET (the daemons' endpoint closes after one answer).
fn http_get(addr: SocketAddr, path: &str) -> std::io::Result<String> {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(3))?;
    s.set_read_timeout(Some(Duration::from_secs(3)))?;
    // One write: the whole request reaches the server in one segment.
    let req = format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
    s.write_all(req.as_bytes())?;
    // Read what arrives until the server closes; a reset after the answer
    // (the server closes with our request headers unread) is not an error.
    let mut raw = Vec::new();
    let mut buf = [0u8; 16 * 1024];
    loop {
        match s.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => raw.extend_from_slice(&buf[..n]),
            Err(e) if raw.is_empty() => return Err(e),
            Err(_) => break,
        }
    }
    let text = String::from_utf8_lossy(&raw).into_owned();
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    if !head.starts_with("HTTP/1.1 200") {
        return Err(std::io::Error::other(
            head.lines().next().unwrap_or("").to_string(),
        ));
    }
    Ok(body.to_string())
}

fn path_str(p: &serde_json::Value) -> String {
    p.as_array().map_or("-".into(), |hops| {
        hops.iter()
            .map(|h| h.to_string())
            .collect::<Vec<_>>()
            .join(">")
    })
}

fn print_routes(rec: &AgentRecord, st: &serde_json::Value) {
    println!();
    if st.is_null() {
        println!(
            "proxy {} ({}): no status (not a pon-proxy, or its status endpoint is unreachable)",
            rec.info.id, rec.info.cloud
        );
        return;
    }
    let b = &st["budget"];
    println!(
        "proxy {} ({}): probes {:.1}/s of a {}/s budget, {} sent; current routes probed every {} ms \
         ({} ms while their traffic goes unconfirmed), {} paths per destination every {} ms",
        rec.info.id,
        rec.info.cloud,
        b["probes_per_sec"].as_f64().unwrap_or(0.0),
        b["max_probes_per_sec"],
        b["probes_sent"],
        b["idle_keepalive_ms"],
        b["keepalive_ms"],
        b["probes_per_interval"],
        b["interval_ms"],
    );
    let Some(dests) = st["destinations"].as_array() else {
        return;
    };
    println!(
        "  DEST  POLICY   STATE        ROUTE   METRIC  PROBES/S  CHANGES  CANDIDATES (path cost)"
    );
    for d in dests {
        let cands: Vec<String> = d["candidates"]
            .as_array()
            .map(|c| {
                c.iter()
                    .map(|c| {
                        let cost = c["cost"].as_f64().map_or("-".into(), |v| format!("{v:.1}"));
                        format!("{} {cost}", path_str(&c["path"]))
                    })
                    .collect()
            })
            .unwrap_or_default();
        println!(
            "  {:<4}  {:<7}  {:<11}  {:<6}  {:>6}  {:>8.1}  {:>7}  {}",
            d["id"].to_string(),
            d["policy"].as_str().unwrap_or("?"),
            if d["reachable"].as_bool() == Some(true) {
                "overlay"
            } else {
                "ip-fallback"
            },
            path_str(&d["current"]),
            d["metric"]
                .as_f64()
                .map_or("-".into(), |v| format!("{v:.1}")),
            d["probes_per_sec"].as_f64().unwrap_or(0.0),
            d["route_changes"].to_string(),
            cands.join(", "),
        );
    }
}
