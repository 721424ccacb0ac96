//! pon-ra: the reception agent of an app VM, alone (pon-agent runs it with
//! the TA in one process).

use pon_agents::config::RaConfig;

fn main() -> anyhow::Result<()> {
    let args = pon_telemetry::daemon_args!(
        "Receives packets from the local PON proxy (IP-in-IP, or UDP) and delivers \
         them to this VM's network stack through a TUN device."
    );
    let cfg = RaConfig::load(&args.config)?;
    if args.check_done() {
        return Ok(());
    }
    match pon_agents::daemon::ra(&cfg)? {}
}
