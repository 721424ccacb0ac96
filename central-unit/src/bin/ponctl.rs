//! ponctl: asks the CU for its registry.

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
    if args.json {
        println!("{}", serde_json::to_string_pretty(&json(&records))?);
    } else {
        table(&records);
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
