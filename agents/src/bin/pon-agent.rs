//! pon-agent: the TA and the RA of an app VM in one process, from one
//! configuration file (`[ta]` and `[ra]`): one service per VM.

use pon_agents::config::AgentConfig;

fn main() -> anyhow::Result<()> {
    let args = pon_telemetry::daemon_args!(
        "Runs the PON agents of an app VM in one process: the transmission agent \
         (captures the VM's packets for overlay destinations through a TUN device and \
         sends them to the local PON forwarder) and the reception agent (delivers what \
         the proxy sends to this VM). The configuration has a [ta] and an [ra] table, \
         as pon-ta's and pon-ra's files; if either part stops, the process exits."
    );
    let cfg = AgentConfig::load(&args.config)?;
    if args.check_done() {
        return Ok(());
    }
    match pon_agents::daemon::agent(&cfg)? {}
}
