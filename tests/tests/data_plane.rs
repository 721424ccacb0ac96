//! The data plane end to end: real daemons in a three-site namespace lab,
//! real clients (ping, iperf3, curl) as the applications.

use pon_e2e::{parse_ping, repo_root, require_root, wait_until, Lab};
use std::sync::atomic::{AtomicU16, Ordering};
use std::time::Duration;

const THREE_SITES: &str = r#"
[[site]]
name = "paris"
apps = 2
[[site]]
name = "tokyo"
apps = 1
[[site]]
name = "london"
apps = 1
"#;

const RELAY: &str = r#"
[[path]]
between = ["paris", "tokyo"]
via = ["london"]
"#;

const PARIS_APP: &str = "198.18.1.11";
const TOKYO_APP: &str = "198.18.2.11";
const PARIS_FWD: &str = "198.18.1.1:9100";
const TOKYO_FWD: &str = "198.18.2.1:9100";
const LONDON_FWD: &str = "198.18.3.1:9100";

fn stage(stage: &str) -> String {
    format!("pon_forwarder_packets_total{{stage=\"{stage}\"}}")
}

fn drops(reason: &str) -> String {
    format!("pon_forwarder_drops_total{{reason=\"{reason}\"}}")
}

/// Waits until one ping from `host` to `dst` gets through (first packets
/// may meet ARP resolution), then runs `count` pings and returns the output.
fn ping(lab: &Lab, host: &str, dst: &str, count: u32, extra: &[&str]) -> String {
    let ready = wait_until(Duration::from_secs(15), || {
        lab.exec(host, &["ping", "-c", "1", "-W", "1", dst])
            .status
            .success()
    });
    assert!(ready, "{host} never reached {dst}");
    let count = count.to_string();
    let mut args = vec!["ping", "-c", &count, "-i", "0.05", "-W", "2"];
    args.extend_from_slice(extra);
    args.push(dst);
    lab.exec_ok(host, &args)
}

/// Runs an iperf3 client from `client` against a server started in
/// `server_host`; returns the client's JSON report.
fn iperf3(
    lab: &Lab,
    server_host: &str,
    server: &str,
    client: &str,
    args: &[&str],
) -> serde_json::Value {
    // A port per run, so a server still winding down never meets the next client.
    static PORT: AtomicU16 = AtomicU16::new(5201);
    let port = PORT.fetch_add(1, Ordering::Relaxed).to_string();
    let mut srv = lab.spawn(
        server_host,
        &["iperf3", "-s", "-1", "-B", server, "-p", &port],
    );
    let mut full = vec![
        "iperf3",
        "-c",
        server,
        "-p",
        &port,
        "-t",
        "2",
        "-J",
        "--connect-timeout",
        "2000",
    ];
    full.extend_from_slice(args);
    let mut report = None;
    // The server may need a moment to listen: retry the connection, bounded.
    let ok = wait_until(Duration::from_secs(20), || {
        let out = lab.exec(client, &full);
        // iperf3 -J may exit 0 on "connection refused": the report says so.
        let parsed: Option<serde_json::Value> = serde_json::from_slice(&out.stdout).ok();
        match parsed {
            Some(r) if out.status.success() && r.get("error").is_none() => {
                report = Some(r);
                true
            }
            _ => false,
        }
    });
    let _ = srv.kill();
    let _ = srv.wait();
    assert!(ok, "iperf3 {client} -> {server} {args:?} never succeeded");
    report.unwrap()
}

fn tcp_mbps(report: &serde_json::Value) -> f64 {
    let bps = report["end"]["sum_received"]["bits_per_second"].as_f64();
    bps.unwrap_or_else(|| panic!("no TCP summary in {report}")) / 1e6
}

fn check_udp(report: &serde_json::Value) {
    let sum = &report["end"]["sum"];
    let (Some(packets), Some(lost)) = (sum["packets"].as_u64(), sum["lost_percent"].as_f64())
    else {
        panic!("no UDP summary in {report}");
    };
    assert!(packets > 100, "UDP run carried only {packets} packets");
    assert!(lost < 5.0, "UDP run lost {lost}% of {packets} packets");
}

fn check_ping(out: &str, count: u64) {
    let s = parse_ping(out).expect("ping summary");
    assert_eq!((s.transmitted, s.received), (count, count), "{out}");
}

#[test]
fn direct_path_carries_ping_tcp_and_udp() {
    require_root();
    let lab = Lab::up(THREE_SITES);

    check_ping(&ping(&lab, "paris/app1", TOKYO_APP, 20, &[]), 20);
    check_ping(&ping(&lab, "tokyo/app1", PARIS_APP, 20, &[]), 20);
    // The packets took the overlay: ingress at paris, egress at tokyo, no relay.
    assert!(lab.metric("paris/proxy", PARIS_FWD, &stage("ingress")) >= 40);
    assert!(lab.metric("tokyo/proxy", TOKYO_FWD, &stage("egress")) >= 40);
    assert_eq!(lab.metric("london/proxy", LONDON_FWD, &stage("transit")), 0);
    assert!(
        lab.metric(
            "paris/app1",
            "198.18.1.11:9101",
            "pon_ta_packets_total{stage=\"captured\"}"
        ) >= 40
    );
    assert!(
        lab.metric(
            "paris/app1",
            "198.18.1.11:9102",
            "pon_ra_packets_total{stage=\"delivered\"}"
        ) >= 40
    );

    let up = iperf3(&lab, "tokyo/app1", TOKYO_APP, "paris/app1", &[]);
    let down = iperf3(&lab, "tokyo/app1", TOKYO_APP, "paris/app1", &["-R"]);
    assert!(
        tcp_mbps(&up) > 10.0 && tcp_mbps(&down) > 10.0,
        "TCP over the overlay is too slow"
    );
    check_udp(&iperf3(
        &lab,
        "tokyo/app1",
        TOKYO_APP,
        "paris/app1",
        &["-u", "-b", "20M"],
    ));
    check_udp(&iperf3(
        &lab,
        "tokyo/app1",
        TOKYO_APP,
        "paris/app1",
        &["-u", "-b", "20M", "-R"],
    ));

    // The second app VM of a site works too, and sites without a relay stay direct.
    check_ping(&ping(&lab, "paris/app2", "198.18.3.11", 5, &[]), 5);
    assert_eq!(lab.metric("paris/proxy", PARIS_FWD, &drops("malformed")), 0);
}

#[test]
fn relay_path_goes_through_the_third_site() {
    require_root();
    let lab = Lab::up(&format!("{THREE_SITES}{RELAY}"));

    let before = lab.metric("london/proxy", LONDON_FWD, &stage("transit"));
    check_ping(&ping(&lab, "paris/app1", TOKYO_APP, 20, &[]), 20);
    let after = lab.metric("london/proxy", LONDON_FWD, &stage("transit"));
    // Requests and replies both cross london.
    assert!(
        after - before >= 40,
        "london relayed {} packets for 20 pings",
        after - before
    );

    let up = iperf3(&lab, "tokyo/app1", TOKYO_APP, "paris/app1", &[]);
    let down = iperf3(&lab, "tokyo/app1", TOKYO_APP, "paris/app1", &["-R"]);
    assert!(tcp_mbps(&up) > 10.0 && tcp_mbps(&down) > 10.0);
    check_udp(&iperf3(
        &lab,
        "tokyo/app1",
        TOKYO_APP,
        "paris/app1",
        &["-u", "-b", "20M"],
    ));
    check_udp(&iperf3(
        &lab,
        "tokyo/app1",
        TOKYO_APP,
        "paris/app1",
        &["-u", "-b", "20M", "-R"],
    ));
    assert!(lab.metric("london/proxy", LONDON_FWD, &stage("transit")) > after + 1000);
    // london -> tokyo stays direct: london's own traffic is not relayed.
    check_ping(&ping(&lab, "london/app1", TOKYO_APP, 5, &[]), 5);
    assert_eq!(lab.metric("paris/proxy", PARIS_FWD, &stage("transit")), 0);
}

#[test]
fn oversized_packets_fit_or_get_frag_needed() {
    require_root();
    // Default TUN MTU: 1500 - (20 + 8 + 16 + 4x4 + 16) = 1424.
    let lab = Lab::up(THREE_SITES);
    check_ping(
        &ping(
            &lab,
            "paris/app1",
            TOKYO_APP,
            3,
            &["-M", "do", "-s", "1396"],
        ),
        3,
    );
    let out = lab.exec(
        "paris/app1",
        &[
            "ping", "-c", "1", "-W", "1", "-M", "do", "-s", "1397", TOKYO_APP,
        ],
    );
    let text =
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && text.contains("mtu=1424"),
        "expected a local 'message too long':\n{text}"
    );
    drop(lab);

    // TUN MTU larger than the path: the forwarder answers with ICMP.
    // The agent leg (IP-in-IP, 20 bytes) still fits 1480; the relay leg does not.
    let lab = Lab::up(&format!("ta_mtu = 1480\n{THREE_SITES}{RELAY}"));
    ping(&lab, "paris/app1", TOKYO_APP, 1, &[]);
    let out = lab.exec(
        "paris/app1",
        &[
            "ping", "-c", "1", "-W", "2", "-M", "do", "-s", "1452", TOKYO_APP,
        ],
    );
    let text =
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    // Relay route: 1500 - 20 IPv4 - 8 UDP - (16 + 2x4) PON = 1448.
    assert!(
        text.contains("Frag needed") && text.contains("1448"),
        "expected frag needed:\n{text}"
    );
    assert!(
        lab.metric(
            "paris/proxy",
            PARIS_FWD,
            "pon_forwarder_icmp_frag_needed_total"
        ) >= 1
    );
    // The sender learnt the path MTU: now it fits.
    check_ping(
        &ping(
            &lab,
            "paris/app1",
            TOKYO_APP,
            3,
            &["-M", "do", "-s", "1420"],
        ),
        3,
    );
    // TCP discovers the path MTU through the same ICMP and carries on.
    let report = iperf3(&lab, "tokyo/app1", TOKYO_APP, "paris/app1", &["-t", "1"]);
    assert!(tcp_mbps(&report) > 10.0);
}

#[test]
fn malformed_and_forged_burst_is_counted_while_ping_loses_nothing() {
    require_root();
    let lab = Lab::up(THREE_SITES);
    ping(&lab, "paris/app1", TOKYO_APP, 1, &[]);
    let pinger = lab.spawn(
        "paris/app1",
        &["ping", "-c", "300", "-i", "0.01", "-W", "2", TOKYO_APP],
    );

    let flood = repo_root().join("tests/tests/tools/flood.py");
    let n = 5000;
    lab.exec_ok(
        "inet",
        &[
            "python3",
            flood.to_str().unwrap(),
            "--target=198.18.1.1",
            "--peer=198.18.2.1",
            "--self-id=1",
            &format!("--malformed={n}"),
            &format!("--not-for-me={n}"),
            &format!("--stranger={n}"),
            &format!("--ipip={n}"),
        ],
    );
    let out = pinger.wait_with_output().expect("ping");
    check_ping(&String::from_utf8_lossy(&out.stdout), 300);

    let counted = |reason: &str| lab.metric("paris/proxy", PARIS_FWD, &drops(reason));
    let all = wait_until(Duration::from_secs(10), || {
        ["malformed", "not_for_me", "unknown_peer", "unknown_agent"]
            .iter()
            .all(|r| counted(r) >= n)
    });
    assert!(
        all,
        "drops: malformed {} not_for_me {} unknown_peer {} unknown_agent {}",
        counted("malformed"),
        counted("not_for_me"),
        counted("unknown_peer"),
        counted("unknown_agent")
    );
    // The forwarder is alive and still forwards.
    check_ping(&ping(&lab, "paris/app1", TOKYO_APP, 5, &[]), 5);
}

#[test]
fn udp_encapsulation_variant_works() {
    require_root();
    let lab = Lab::up(&format!("encap = \"udp\"\n{THREE_SITES}{RELAY}"));
    check_ping(&ping(&lab, "paris/app1", TOKYO_APP, 10, &[]), 10);
    check_ping(&ping(&lab, "tokyo/app1", PARIS_APP, 10, &[]), 10);
    let report = iperf3(&lab, "tokyo/app1", TOKYO_APP, "paris/app1", &["-t", "1"]);
    assert!(tcp_mbps(&report) > 10.0);
    assert!(
        lab.metric(
            "paris/app1",
            "198.18.1.11:9102",
            "pon_ra_packets_total{stage=\"delivered\"}"
        ) >= 10
    );
}
