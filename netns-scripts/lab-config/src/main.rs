//! pon-lab-config: the lab's daemon configurations, written by the daemons'
//! own config types, so that the lab (Python) keeps no copy of their schema.
//!
//! ```text
//! pon-lab-config ports                   the well-known ports, as JSON
//! pon-lab-config render DAEMON [--full]  one config: JSON on stdin, TOML on stdout
//! pon-lab-config render-batch [--full]   [{"daemon": .., "path": .., "config": {..}}, ..] on
//!                                        stdin: checks them all, then writes each file
//! ```
//!
//! A config goes JSON → TOML → the daemon's own parser (the checks the
//! daemon makes when it starts, with its messages naming the field) → the
//! parsed struct, serialized back with serde. By default only the keys the
//! lab gave are written, as the type writes them: defaults (ports among
//! them) stay the daemon's own, and binaries older than a new field still
//! read the file (the benchmarks run older builds). `--full` writes every
//! field. pon-monitor and pon-router are checked by their loaders and
//! written as given (their config types have no `Serialize` yet).

use anyhow::{bail, Context};
use clap::{Parser, Subcommand};
use serde::{Deserialize, Serialize};
use std::io::Read;
use std::path::{Path, PathBuf};

#[derive(Parser)]
#[command(
    name = "pon-lab-config",
    about = "Daemon configurations for the lab, written by the daemons' own config types"
)]
struct Args {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Print the well-known ports (protocols, the split daemons' local
    /// link, each daemon's metrics endpoint) as JSON.
    Ports,
    /// Read one configuration as JSON on stdin, print it as TOML.
    Render {
        /// pon-forwarder, pon-proxy, pon-monitor, pon-router, pon-agent, pon-ta, pon-ra, pon-cu
        /// or pon-linkemu.
        daemon: String,
        /// Write every field, defaults included.
        #[arg(long)]
        full: bool,
    },
    /// Read a JSON array of {"daemon", "path", "config"} on stdin; check
    /// every configuration, then write each to its path.
    RenderBatch {
        #[arg(long)]
        full: bool,
    },
    /// Make (or load) the identity kept in each state directory and print
    /// its public keys as JSON ({dir: key}), for the static configs that
    /// name their peers' keys.
    Identity { dirs: Vec<PathBuf> },
}

pub const DAEMONS: [&str; 9] = [
    "pon-forwarder",
    "pon-proxy",
    "pon-monitor",
    "pon-router",
    "pon-agent",
    "pon-ta",
    "pon-ra",
    "pon-cu",
    "pon-linkemu",
];

#[derive(Serialize)]
struct Ports {
    pon: u16,
    agent_udp: u16,
    ra_udp: u16,
    steering: u16,
    cu: u16,
    /// A proxy's own PMon listener (`[pmon] listen`, in the lab).
    pmon: u16,
    /// The split daemons' local link on one host.
    local: std::collections::BTreeMap<&'static str, u16>,
    /// Each daemon's metrics endpoint.
    metrics: std::collections::BTreeMap<&'static str, u16>,
}

fn ports() -> Ports {
    use pon_proto::ports as p;
    use pon_telemetry::metrics_port as m;
    Ports {
        pon: p::PON,
        agent_udp: p::AGENT_UDP,
        ra_udp: p::RA_UDP,
        steering: p::STEERING,
        cu: p::CU,
        pmon: p::PMON,
        local: [
            ("pon-forwarder", p::LOCAL_FORWARDER),
            ("pon-monitor", p::LOCAL_MONITOR),
            ("pon-router", p::LOCAL_ROUTER),
        ]
        .into(),
        metrics: [
            ("pon-forwarder", m::FORWARDER),
            ("pon-proxy", m::FORWARDER),
            ("pon-monitor", m::MONITOR),
            ("pon-router", m::ROUTER),
            ("pon-agent", m::AGENT),
            ("pon-ta", m::TA),
            ("pon-ra", m::RA),
            ("pon-cu", m::CU),
            ("pon-linkemu", m::LINKEMU),
        ]
        .into(),
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Job {
    daemon: String,
    path: PathBuf,
    config: serde_json::Value,
}

fn main() {
    let args = Args::parse();
    if let Err(e) = run(args) {
        eprintln!("pon-lab-config: {e:#}");
        std::process::exit(1);
    }
}

fn run(args: Args) -> anyhow::Result<()> {
    match args.cmd {
        Cmd::Ports => println!("{}", serde_json::to_string_pretty(&ports())?),
        Cmd::Render { daemon, full } => {
            let input: serde_json::Value =
                serde_json::from_str(&stdin()?).context("stdin is not JSON")?;
            print!("{}", render(&daemon, &input, full)?);
        }
        Cmd::Identity { dirs } => {
            let keys = dirs
                .iter()
                .map(|d| {
                    let id = pon_identity::Identity::load_or_create(d)
                        .with_context(|| format!("identity in {}", d.display()))?;
                    Ok((d.display().to_string(), id.noise_public().to_string()))
                })
                .collect::<anyhow::Result<std::collections::BTreeMap<_, _>>>()?;
            println!("{}", serde_json::to_string_pretty(&keys)?);
        }
        Cmd::RenderBatch { full } => {
            let jobs: Vec<Job> = serde_json::from_str(&stdin()?).context("stdin")?;
            // All checked before any is written: a bad one leaves no half-written set.
            let texts = jobs
                .iter()
                .map(|j| {
                    render(&j.daemon, &j.config, full)
                        .with_context(|| format!("{} ({})", j.path.display(), j.daemon))
                })
                .collect::<anyhow::Result<Vec<_>>>()?;
            for (j, text) in jobs.iter().zip(texts) {
                std::fs::write(&j.path, text)
                    .with_context(|| format!("writing {}", j.path.display()))?;
            }
        }
    }
    Ok(())
}

fn stdin() -> anyhow::Result<String> {
    let mut s = String::new();
    std::io::stdin()
        .read_to_string(&mut s)
        .context("reading stdin")?;
    Ok(s)
}

/// `input` (a JSON object) as `daemon`'s TOML configuration, checked by the
/// daemon's parser; the result is checked again, as the daemon will read it.
pub fn render(daemon: &str, input: &serde_json::Value, full: bool) -> anyhow::Result<String> {
    let given: toml::Table = match input {
        serde_json::Value::Object(_) => {
            toml::Table::try_from(without_nulls(input)).context("not representable in TOML")?
        }
        _ => bail!("a configuration must be a JSON object"),
    };
    let typed = check(daemon, &toml::to_string(&given)?)?;
    let out = match typed {
        typed if full => typed,
        typed => prune(&typed, &given),
    };
    let text = toml::to_string(&out)?;
    check(daemon, &text).context("the rendered configuration does not read back")?;
    Ok(text)
}

/// TOML has no null: a null field is an absent one (the type's default).
fn without_nulls(v: &serde_json::Value) -> serde_json::Value {
    use serde_json::Value;
    match v {
        Value::Object(m) => Value::Object(
            m.iter()
                .filter(|(_, v)| !v.is_null())
                .map(|(k, v)| (k.clone(), without_nulls(v)))
                .collect(),
        ),
        Value::Array(a) => Value::Array(a.iter().map(without_nulls).collect()),
        v => v.clone(),
    }
}

/// Parses `text` as `daemon` does at start-up. Returns the parsed
/// configuration as a TOML table.
fn check(daemon: &str, text: &str) -> anyhow::Result<toml::Table> {
    use pon_agents::config::{AgentConfig, RaConfig, TaConfig};
    use pon_proxy::config::{MonitorDaemonConfig, RouterDaemonConfig};
    use pon_proxy::forwarder::ForwarderConfig;
    use pon_proxy::ProxyConfig;
    fn table<T: Serialize>(cfg: T) -> anyhow::Result<toml::Table> {
        Ok(toml::Table::try_from(cfg)?)
    }
    match daemon {
        "pon-forwarder" => table(ForwarderConfig::parse(text)?),
        "pon-proxy" => table(ProxyConfig::parse(text)?),
        "pon-ta" => {
            let cfg: TaConfig = toml::from_str(text)?;
            cfg.validate()?;
            table(cfg)
        }
        "pon-ra" => table(via_file(text, RaConfig::load)?),
        "pon-agent" => table(AgentConfig::parse(text)?),
        "pon-cu" => table(pon_cu::config::CuConfig::parse(text)?),
        "pon-linkemu" => table(pon_linkemu::config::Config::parse(
            text,
            "pon-linkemu config",
        )?),
        "pon-monitor" => table(via_file(text, MonitorDaemonConfig::load)?),
        "pon-router" => table(via_file(text, RouterDaemonConfig::load)?),
        _ => bail!("unknown daemon {daemon:?} (one of: {})", DAEMONS.join(", ")),
    }
}

/// Runs a loader that only reads files on `text`.
fn via_file<T>(text: &str, load: impl Fn(&Path) -> anyhow::Result<T>) -> anyhow::Result<T> {
    let path = std::env::temp_dir().join(format!("pon-lab-config-{}.toml", std::process::id()));
    std::fs::write(&path, text).with_context(|| format!("writing {}", path.display()))?;
    let result = load(&path);
    let _ = std::fs::remove_file(&path);
    result
}

/// The keys of `given`, with the values `typed` has for them.
fn prune(typed: &toml::Table, given: &toml::Table) -> toml::Table {
    given
        .iter()
        .map(|(k, g)| {
            let v = match (typed.get(k), g) {
                (Some(toml::Value::Table(t)), toml::Value::Table(g)) => {
                    toml::Value::Table(prune(t, g))
                }
                (Some(toml::Value::Array(t)), toml::Value::Array(g)) if t.len() == g.len() => {
                    toml::Value::Array(
                        t.iter()
                            .zip(g)
                            .map(|(t, g)| match (t, g) {
                                (toml::Value::Table(t), toml::Value::Table(g)) => {
                                    toml::Value::Table(prune(t, g))
                                }
                                (t, _) => t.clone(),
                            })
                            .collect(),
                    )
                }
                (Some(t), _) => t.clone(),
                (None, g) => g.clone(),
            };
            (k.clone(), v)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn forwarder_renders_the_given_keys_as_the_type_writes_them() {
        let text = render(
            "pon-forwarder",
            &json!({"id": 1, "listen": "198.18.1.1:7300", "local_addr": "198.18.1.1",
                    "peer": [{"id": 2, "addr": "198.18.2.1:7300", "public_key": "AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA="}],
                    "agent": [{"addr": "198.18.1.11", "encap": "udp"}],
                    "destination": [{"prefix": "198.18.2.11/32", "proxy": 2}]}),
            false,
        )
        .unwrap();
        let doc: toml::Table = toml::from_str(&text).unwrap();
        assert!(!doc.contains_key("hop_limit"), "{text}");
        assert_eq!(doc["agent"][0]["encap"].as_str(), Some("udp"));
        assert!(doc["agent"][0].get("ra_port").is_none(), "{text}");
        let full = render(
            "pon-forwarder",
            &json!({"id": 1, "listen": "198.18.1.1:7300", "local_addr": "198.18.1.1"}),
            true,
        )
        .unwrap();
        let doc: toml::Table = toml::from_str(&full).unwrap();
        assert_eq!(
            doc["agent_udp_port"].as_integer(),
            Some(pon_proto::ports::AGENT_UDP.into())
        );
    }

    #[test]
    fn proxy_keeps_its_sections() {
        let text = render(
            "pon-proxy",
            &json!({"id": 1, "listen": "198.18.1.1:7300", "local_addr": "198.18.1.1",
                    "routing": {"policy": "loss", "interval_ms": 500}}),
            true,
        )
        .unwrap();
        let cfg = pon_proxy::ProxyConfig::parse(&text).unwrap();
        assert_eq!(cfg.routing.unwrap().interval_ms, 500);
    }

    #[test]
    fn agent_renders_its_two_tables_as_given() {
        let text = render(
            "pon-agent",
            &json!({"metrics": "198.18.1.11:9105",
                    "ta": {"local_addr": "198.18.1.11", "forwarder": "198.18.1.1", "metrics": "198.18.1.11:9101"},
                    "ra": {"proxy": "198.18.1.1", "local_addr": "198.18.1.11", "metrics": "198.18.1.11:9102"}}),
            false,
        )
        .unwrap();
        let cfg = pon_agents::config::AgentConfig::parse(&text).unwrap();
        assert_eq!(cfg.ta.metrics.unwrap().port(), 9101);
        assert_eq!(cfg.ra.metrics.unwrap().port(), 9102);
        let doc: toml::Table = toml::from_str(&text).unwrap();
        assert!(
            doc["ta"].get("tun_name").is_none(),
            "defaults stay the daemon's: {text}"
        );
        assert_eq!(
            ports().metrics["pon-agent"],
            pon_telemetry::metrics_port::AGENT
        );
    }

    #[test]
    fn errors_name_the_field() {
        const KEY: &str = "AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=";
        for (daemon, cfg, field) in [
            (
                "pon-forwarder",
                json!({"id": 1, "listen": "198.18.1.1:7300", "local_addr": "198.18.1.1", "underlay_mtu": 100}),
                "underlay_mtu",
            ),
            (
                "pon-forwarder",
                json!({"id": 1, "listen": 5, "local_addr": "198.18.1.1"}),
                "listen",
            ),
            (
                "pon-proxy",
                json!({"id": 1, "listen": "198.18.1.1:7300", "local_addr": "198.18.1.1", "routing": {"max_relays": 3}}),
                "max_relays",
            ),
            (
                "pon-ta",
                json!({"local_addr": "198.18.1.11", "forwarder": "198.18.1.1", "tun_name": "a/b"}),
                "tun_name",
            ),
            (
                "pon-ra",
                json!({"proxy": "198.18.1.1", "local_addr": "198.18.1.11", "udp": 1}),
                "udp",
            ),
            (
                "pon-agent",
                json!({"ta": {"local_addr": "198.18.1.11", "forwarder": "198.18.1.1"},
                       "ra": {"proxy": "198.18.1.1", "local_addr": "198.18.1.12"}}),
                "[ra] local_addr",
            ),
            (
                "pon-cu",
                json!({"listen": "198.18.250.1:7400", "heartbeat_ms": 10}),
                "heartbeat_ms",
            ),
            ("pon-linkemu", json!({"mtu": 100}), "mtu"),
            (
                "pon-router",
                json!({"listen": "127.0.0.1:7312", "forwarder": "127.0.0.1:7310", "forwarder_key": KEY, "monitor": "127.0.0.1:7311", "monitor_key": KEY, "keepalive_ms": 0}),
                "keepalive_ms",
            ),
            (
                "pon-monitor",
                json!({"listen": "127.0.0.1:7311", "forwarder": "127.0.0.1:7310", "forwarder_key": KEY, "router": "127.0.0.1:7312", "router_key": KEY, "monitor": {"min_timeout_ms": 0}}),
                "min_timeout_ms",
            ),
        ] {
            let e = format!("{:#}", render(daemon, &cfg, false).unwrap_err());
            assert!(e.contains(field), "{daemon} {cfg}: {e}");
        }
    }
}
