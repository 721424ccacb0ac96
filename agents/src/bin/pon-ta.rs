//! pon-ta: the transmission agent of an app VM, alone (pon-agent runs it
//! with the RA in one process).

use pon_agents::config::TaConfig;

fn main() -> anyhow::Result<()> {
    let args = pon_telemetry::daemon_args!(
        "Captures this VM's packets for overlay destinations through a TUN device \
         and sends them, IP-in-IP (or UDP), to the local PON forwarder."
    );
    let cfg = TaConfig::load(&args.config)?;
    if args.check_done() {
        return Ok(());
    }
    match pon_agents::daemon::ta(&cfg)? {}
}
