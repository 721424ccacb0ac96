//! ponctl: asks the CU for its registry, and with `--routes` every online
//! proxy for its routes.
//!
//! Routes come from each proxy's own status endpoint (`GET /status`), not
//! through the CU: they change with every probe, the CU has no use for them,
//! and the proxy's own answer is live. The CU supplies the list of proxies.

use anyhow::{bail, Context};
use clap::Parser;
use pon_proto::control::{
    self, AgentMsg, AgentRecord, CuMsg, Endpoints, FrameDecoder, MAX_CU_FRAME, PROTOCOL_VERSION,
};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::{Duration, SystemTime};

/// Lists the agents the PON Central Unit knows: by cloud and role, with
/// their ids, addresses, state and last-seen time.
#[derive(Parser)]
#[command(version, about, long_about)]
struct Args {
    /// The CU's QUIC address.
    #[arg(long)]
    cu: SocketAddr,
    /// CA certificate (PEM) that signed the CU's certificate.
    #[arg(long)]
    ca: PathBuf,
    /// File holding the join token.
    #[arg(long)]
    token_file: PathBuf,
    /// Name in the CU's certificate.
    #[arg(long, default_value = "pon-cu")]
    server_name: String,
    /// Print JSON instead of a table.
    #[arg(long)]
    json: bool,
    /// Also show, per online proxy, each destination's current path, its
    /// metric, the candidates and the probe budget used (asks the proxies).
    #[arg(long)]
    routes: bool,
    /// Port of the proxies' status endpoint, on their agent-side address.
    #[arg(long, default_value_t = pon_telemetry::metrics_port::FORWARDER)]
    status_port: u16,
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let token = std::fs::read_to_string(&args.token_file)
        .with_context(|| format!("reading token file {}", args.token_file.display()))?
        .trim()
        .to_string();
    let cfg = pon_cu::tls::client_config(&args.ca, Duration::from_secs(5))?;
    let mut ep = quinn::Endpoint::client("0.0.0.0:0".parse()?)?;
    ep.set_default_client_config(cfg);
    let conn = tokio::time::timeout(
        Duration::from_secs(10),
        ep.connect(args.cu, &args.server_name)?,
    )
    .await
    .with_context(|| format!("timed out connecting to the CU at {}", args.cu))?
    .with_context(|| format!("connecting to the CU at {}", args.cu))?;
    let (mut send, mut recv) = conn.open_bi().await?;
    send.write_all(&control::encode(&AgentMsg::List {
        version: PROTOCOL_VERSION,
        token,
    }))
    .await?;
    let mut dec = FrameDecoder::new(MAX_CU_FRAME);
    let msg = loop {
        if let Some(m) = dec.next_msg::<CuMsg>()? {
            break m;
        }
        match tokio::time::timeout(Duration::from_secs(10), recv.read_chunk(1 << 20, true)).await {
            Ok(Ok(Some(c))) => dec.push(&c.bytes)?,
            Ok(Ok(None)) => bail!("the CU closed the stream without answering"),
            Ok(Err(e)) => bail!("reading from the CU: {e}"),
            Err(_) => bail!("the CU did not answer within 10 s"),
        }
    };
    conn.close(0u32.into(), b"done");
    let records = match msg {
        CuMsg::Registry(r) => r,
        CuMsg::Refused(why) => bail!("the CU refused: {why}"),
        other => bail!("unexpected answer from the CU: {other:?}"),
    };
    let routes = if args.routes {
        proxy_routes(&records, args.status_port)
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
                &serde_json::json!({"agents": json(&records), "routes": r})
            )?
        );
    } else if args.json {
        println!("{}", serde_json::to_string_pretty(&json(&records))?);
    } else {
        table(&records);
        for (rec, st) in &routes {
            print_routes(rec, st);
        }
    }
    ep.wait_idle().await;
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
        "proxy {} ({}): probes {:.1}/s of a {}/s budget, {} sent; current routes probed every {} ms, \
         {} paths per destination every {} ms",
        rec.info.id,
        rec.info.cloud,
        b["probes_per_sec"].as_f64().unwrap_or(0.0),
        b["max_probes_per_sec"],
        b["probes_sent"],
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
