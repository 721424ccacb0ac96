//! The README's first command, `netns-scripts/demo`, runs to the end: the
//! proxies find the relay through london by themselves, a cut of the
//! relayed path during a ping every 20 ms costs a bounded gap, and the
//! overlay is printed next to the direct IP path. Without this test the
//! demo could break (it did once) while every other test stays green.

use pon_e2e::{bin_dir, repo_root, require_root};
use std::process::Command;

#[test]
fn the_demo_finds_the_relay_survives_the_cut_and_compares_with_the_ip_path() {
    require_root();
    let out = Command::new(repo_root().join("netns-scripts/demo"))
        .current_dir(repo_root())
        .env("PON_DEMO_NO_BUILD", "1")
        .env("PON_BIN_DIR", bin_dir())
        .output()
        .expect("running netns-scripts/demo");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    eprintln!("{stdout}");
    assert!(out.status.success(), "demo failed:\n{stdout}\n{stderr}");
    let line = |prefix: &str| {
        stdout
            .lines()
            .find(|l| l.trim_start().starts_with(prefix))
            .unwrap_or_else(|| panic!("no line starting {prefix:?}:\n{stdout}"))
            .to_string()
    };
    assert!(
        line("1. PON found the relay by itself").ends_with("paris -> london -> tokyo"),
        "{stdout}"
    );
    // "N of 300 pings lost, longest gap G ms": the failover's gap, within
    // the second the router promises (the demo cuts the relayed path).
    let cut = line("2. paris <-> london cut");
    let gap: u64 = cut
        .split("longest gap ")
        .nth(1)
        .and_then(|r| r.split(' ').next())
        .and_then(|g| g.parse().ok())
        .unwrap_or_else(|| panic!("no gap in {cut:?}"));
    assert!(gap <= 1000, "{cut}");
    assert!(
        line("link back:").ends_with("paris -> london -> tokyo"),
        "{stdout}"
    );
    // Both paths measured: an RTT and a throughput on each line.
    for prefix in ["PON (", "direct IP path"] {
        let l = line(prefix);
        let numbers = l
            .split_whitespace()
            .filter(|w| w.parse::<f64>().is_ok_and(|v| v > 0.0))
            .count();
        assert!(numbers >= 2, "{l}");
    }
}
