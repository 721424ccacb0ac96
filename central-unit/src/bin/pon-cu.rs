//! pon-cu: the PON Central Unit.

use anyhow::Context;
use clap::{Parser, Subcommand};
use pon_cu::config::CuConfig;
use pon_cu::pki;
use std::net::IpAddr;
use std::path::PathBuf;

/// The PON manager: agents register with it, get their id and
/// configuration, and are told when agents they depend on join or leave.
#[derive(Parser)]
#[command(version, about, long_about)]
struct Args {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Create a CA, the CU's certificate and a join token in DIR (and a
    /// sample cu.toml if there is none).
    Init {
        #[arg(long, default_value = ".")]
        dir: PathBuf,
        /// DNS name in the certificate (agents' `server_name`).
        #[arg(long, default_value = "pon-cu")]
        name: String,
        /// IP addresses to put in the certificate as well.
        #[arg(long = "ip")]
        ips: Vec<IpAddr>,
        /// Address the sample cu.toml listens on.
        #[arg(long, default_value = "0.0.0.0:7400")]
        listen: String,
        /// Replace existing files.
        #[arg(long)]
        force: bool,
    },
    /// Run the CU.
    Run {
        #[arg(long, short)]
        config: PathBuf,
        /// Validate the configuration and exit.
        #[arg(long)]
        check: bool,
    },
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    pon_telemetry::init_logging();
    match args.cmd {
        Cmd::Init {
            dir,
            name,
            ips,
            listen,
            force,
        } => {
            std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
            let files = pki::InitFiles::in_dir(&dir);
            pki::init(&files, &name, &ips, force)?;
            let cfg = dir.join("cu.toml");
            if !cfg.exists() {
                std::fs::write(
                    &cfg,
                    format!(
                        "listen = \"{listen}\"\ncert = \"cu.pem\"\nkey = \"cu.key\"\ntoken_file = \"token\"\nstore = \"registry.redb\"\nheartbeat_ms = 500\ndead_after_ms = 2000\n"
                    ),
                )
                .with_context(|| format!("writing {}", cfg.display()))?;
            }
            println!(
                "CA {}, certificate {} (for {name}{}), token {}, config {}",
                files.ca_cert.display(),
                files.cert.display(),
                ips.iter().map(|i| format!(", {i}")).collect::<String>(),
                files.token.display(),
                cfg.display()
            );
            Ok(())
        }
        Cmd::Run { config, check } => {
            let cfg = CuConfig::load(&config)?;
            cfg.settings()
                .with_context(|| format!("in CU config {}", config.display()))?;
            if check {
                println!("{}: ok", config.display());
                return Ok(());
            }
            pon_cu::server::run(cfg)
        }
    }
}
