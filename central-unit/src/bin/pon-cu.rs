//! pon-cu: the PON Central Unit.

use anyhow::Context;
use clap::{Parser, Subcommand};
use pon_cu::config::{parse_duration_s, CuConfig};
use pon_cu::pki;
use pon_cu::registry::Record;
use pon_cu::trust::Trust;
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
    /// Create a CA, the CU's certificate, the admin credential (admin.pem,
    /// admin.key: what ponctl presents) and a first join token in DIR (and
    /// a sample cu.toml if there is none).
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
        /// The first token's scope: the cloud it may enrol agents of ("*": any) ...
        #[arg(long, default_value = "*")]
        token_cloud: String,
        /// ... the roles (e.g. PROXY, APP; "*": any) ...
        #[arg(long, default_value = "*")]
        token_role: String,
        /// ... how long it lives ...
        #[arg(long, default_value = "24h", value_parser = parse_duration_s)]
        token_ttl: u64,
        /// ... and how many agents it may enrol (default: unlimited).
        #[arg(long)]
        token_uses: Option<u32>,
    },
    /// Make a server certificate signed by the CA in DIR (ca.pem, ca.key)
    /// for a proxy's PMon listener (`[pmon] cert` / `key`): consumers name
    /// it with `ponctl --server-name NAME` (or one of its IPs).
    Cert {
        #[arg(long, default_value = ".")]
        dir: PathBuf,
        /// DNS name in the certificate.
        #[arg(long)]
        name: String,
        /// IP addresses to put in the certificate as well.
        #[arg(long = "ip")]
        ips: Vec<IpAddr>,
        /// Where to write the certificate ...
        #[arg(long)]
        cert: PathBuf,
        /// ... and its key (mode 0600).
        #[arg(long)]
        key: PathBuf,
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
            token_cloud,
            token_role,
            token_ttl,
            token_uses,
        } => {
            std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
            let files = pki::InitFiles::in_dir(&dir);
            pki::init(&files, &name, &ips, force)?;
            // The first token goes into the store (hashed) and its secret
            // into a file only root reads.
            let secret = pki::new_token()?;
            let wall_ms = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_millis() as u64);
            let token = Trust::default()
                .create_token(
                    &secret,
                    &token_cloud,
                    &token_role,
                    token_uses,
                    token_ttl,
                    wall_ms,
                )
                .map_err(|e| anyhow::anyhow!("the first token: {e}"))?;
            let store = pon_cu::store::Store::open(&files.store)?;
            store.write(&[Record::Token(token.clone())])?;
            drop(store);
            pki::write_token(&files.token, &secret, force)?;
            let cfg = dir.join("cu.toml");
            if !cfg.exists() {
                std::fs::write(
                    &cfg,
                    format!(
                        "listen = \"{listen}\"\ncert = \"cu.pem\"\nkey = \"cu.key\"\nca = \"ca.pem\"\nca_key = \"ca.key\"\nadmin_cert = \"admin.pem\"\nstore = \"registry.redb\"\nheartbeat_ms = 500\ndead_after_ms = 2000\n\n# The prefixes each cloud may use; agents of a cloud without a grant are refused.\n# [clouds.paris]\n# prefixes = [\"198.18.1.0/24\"]\n"
                    ),
                )
                .with_context(|| format!("writing {}", cfg.display()))?;
            }
            let t = &token.info;
            println!(
                "CA {}, certificate {} (for {name}{}), admin credential {} + {}, config {}\n\
                 join token {} (cloud {}, roles {}, {}, {} s) in {}",
                files.ca_cert.display(),
                files.cert.display(),
                ips.iter().map(|i| format!(", {i}")).collect::<String>(),
                files.admin_cert.display(),
                files.admin_key.display(),
                cfg.display(),
                t.id,
                t.cloud,
                t.role,
                t.uses_left
                    .map_or("unlimited uses".into(), |n| format!("{n} uses")),
                token_ttl,
                files.token.display(),
            );
            Ok(())
        }
        Cmd::Cert {
            dir,
            name,
            ips,
            cert,
            key,
            force,
        } => {
            let files = pki::InitFiles::in_dir(&dir);
            pki::server_cert(&files, &name, &ips, &cert, &key, force)?;
            println!(
                "certificate {} (for {name}{}) and key {}, signed by {}",
                cert.display(),
                ips.iter().map(|i| format!(", {i}")).collect::<String>(),
                key.display(),
                files.ca_cert.display()
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
            pon_cu::server::run(cfg, config)
        }
    }
}
