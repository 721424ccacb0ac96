//! The site LAN: a neighbour VM of the same site, spoofing its neighbours'
//! addresses, cannot inject anything into the forwarder's agent port, an
//! RA's port or a TA's steering port (each leg is sealed with the key the
//! agent shares with its proxy), while the real traffic is unaffected.

use pon_e2e::clients::{check_ping, wait_reachable};
use pon_e2e::{metric_value, repo_root, require_root, site, sites, wait_until, Lab};
use std::time::Duration;

const PARIS_FWD: &str = "198.18.1.1";
const PARIS_APP: &str = "198.18.1.11";
const TOKYO_APP: &str = "198.18.2.11";

/// Sends the spoofed burst from paris/app2.
fn spoof(lab: &Lab, src: &str, dst: &str, port: u16, n: u64) {
    let tool = repo_root().join("tests/tests/tools/lan_spoof.py");
    lab.exec_ok(
        "paris/app2",
        &[
            "python3",
            tool.to_str().unwrap(),
            &format!("--src={src}"),
            &format!("--dst={dst}"),
            &format!("--port={port}"),
            &format!("--plain={n}"),
            &format!("--sealed={n}"),
        ],
    );
}

#[test]
fn spoofed_site_lan_packets_are_dropped_by_reason_while_ping_loses_nothing() {
    // CU mode (the lab's default): the keys come from the CU's view.
    spoofed_packets_are_dropped("");
}

#[test]
fn the_same_with_static_configs_naming_the_keys_and_the_lan_encrypted() {
    spoofed_packets_are_dropped("cu = false\nencrypt_lan = true\n");
}

fn spoofed_packets_are_dropped(options: &str) {
    require_root();
    let lab = Lab::up(&(options.to_string() + &site("paris", 2) + &sites(&["tokyo"])));
    wait_reachable(&lab, "paris/app1", TOKYO_APP);
    use pon_proto::ports::{AGENT_UDP, RA_UDP, STEERING};
    let (agent_port, ra_port, steering_port) = (AGENT_UDP, RA_UDP, STEERING);

    let fwd_metrics = format!("{PARIS_FWD}:9100");
    let ta_metrics = format!("{PARIS_APP}:9101");
    let ra_metrics = format!("{PARIS_APP}:9102");
    let pages = || {
        (
            lab.metrics("paris/proxy", &fwd_metrics),
            lab.metrics("paris/app1", &ra_metrics),
            lab.metrics("paris/app1", &ta_metrics),
        )
    };
    let fwd =
        |p: &str, r: &str| metric_value(p, &format!("pon_forwarder_drops_total{{reason=\"{r}\"}}"));
    let ra = |p: &str, r: &str| metric_value(p, &format!("pon_ra_drops_total{{reason=\"{r}\"}}"));
    let ta = |p: &str, r: &str| {
        metric_value(p, &format!("pon_ta_steering_drops_total{{reason=\"{r}\"}}"))
    };
    let before = pages();

    let pinger = lab.spawn(
        "paris/app1",
        &["ping", "-c", "300", "-i", "0.01", "-W", "2", TOKYO_APP],
    );
    let n = 2000;
    // paris/app2 pretends to be paris/app1 towards the forwarder, and the
    // proxy towards paris/app1's RA and TA.
    spoof(&lab, PARIS_APP, PARIS_FWD, agent_port, n);
    spoof(&lab, PARIS_FWD, PARIS_APP, ra_port, n);
    spoof(&lab, PARIS_FWD, PARIS_APP, steering_port, n);
    let out = pinger.wait_with_output().expect("ping");
    check_ping(&String::from_utf8_lossy(&out.stdout), 300);

    let counted = |p: &(String, String, String)| {
        [
            fwd(&p.0, "agent_unsealed") - fwd(&before.0, "agent_unsealed"),
            fwd(&p.0, "agent_bad_tag") - fwd(&before.0, "agent_bad_tag"),
            ra(&p.1, "malformed") - ra(&before.1, "malformed"),
            ra(&p.1, "bad_tag") - ra(&before.1, "bad_tag"),
            ta(&p.2, "malformed") - ta(&before.2, "malformed"),
            ta(&p.2, "bad_tag") - ta(&before.2, "bad_tag"),
        ]
    };
    let all = wait_until(Duration::from_secs(10), || {
        counted(&pages()).iter().all(|c| *c >= n)
    });
    let p = pages();
    assert!(
        all,
        "drops (forwarder unsealed, bad tag; RA malformed, bad tag; TA steering malformed, bad tag): {:?}",
        counted(&p)
    );
    // Nothing spoofed got through: the forwarder sent nothing of it on,
    // the RA delivered only the ping's replies, the TA applied no set but
    // its proxy's own (in CU mode the proxy steers, every 150 ms: far fewer
    // sets than the 2,000 spoofed; with static configs it does not steer).
    let sent = metric_value(
        &lab.metrics("paris/proxy", &fwd_metrics),
        "pon_proxy_steering_messages_total",
    );
    let applied = metric_value(&p.2, "pon_ta_steering_applied_total");
    assert!(
        applied <= sent && sent < n,
        "the TA applied {applied} steering sets, its proxy sent {sent}"
    );
    assert_eq!(metric_value(&p.2, "pon_ta_bypassed_prefixes"), 0);
    let delivered = metric_value(&p.1, "pon_ra_packets_total{stage=\"delivered\"}")
        - metric_value(&before.1, "pon_ra_packets_total{stage=\"delivered\"}");
    assert!(
        delivered <= 300 + 5,
        "the RA delivered {delivered} packets for 300 pings"
    );
    check_ping(
        &lab.exec_ok(
            "paris/app1",
            &["ping", "-c", "5", "-i", "0.05", "-W", "2", TOKYO_APP],
        ),
        5,
    );
}
