//! The data plane end to end: real daemons in a three-site namespace lab,
//! real clients (ping, iperf3, curl) as the applications.

use pon_e2e::clients::{check_ping, check_udp, iperf3, tcp_mbps, wait_reachable};
use pon_e2e::{metric_value, repo_root, require_root, site, sites, text, wait_until, Lab};
use std::time::Duration;

/// Paris (two app VMs), tokyo and london.
fn three_sites() -> String {
    site("paris", 2) + &sites(&["tokyo", "london"])
}

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

/// TCP and UDP (20 Mbit/s) between paris's first app and tokyo's, each
/// way: TCP at more than 10 Mbit/s, UDP with little loss.
fn check_tcp_and_udp_both_ways(lab: &Lab) {
    let up = iperf3(lab, "tokyo/app1", TOKYO_APP, "paris/app1", &[]);
    let down = iperf3(lab, "tokyo/app1", TOKYO_APP, "paris/app1", &["-R"]);
    assert!(
        tcp_mbps(&up) > 10.0 && tcp_mbps(&down) > 10.0,
        "TCP over the overlay is too slow"
    );
    for reverse in [&[][..], &["-R"]] {
        let mut args = vec!["-u", "-b", "20M"];
        args.extend_from_slice(reverse);
        check_udp(&iperf3(lab, "tokyo/app1", TOKYO_APP, "paris/app1", &args));
    }
}

/// Waits until `host` reaches `dst`, then runs `count` pings and returns the output.
fn ping(lab: &Lab, host: &str, dst: &str, count: u32, extra: &[&str]) -> String {
    wait_reachable(lab, host, dst);
    let count = count.to_string();
    let mut args = vec!["ping", "-c", &count, "-i", "0.05", "-W", "2"];
    args.extend_from_slice(extra);
    args.push(dst);
    lab.exec_ok(host, &args)
}

#[test]
fn direct_path_carries_ping_tcp_and_udp() {
    require_root();
    let lab = Lab::up(&three_sites());

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

    check_tcp_and_udp_both_ways(&lab);

    // The second app VM of a site works too, and sites without a relay stay direct.
    check_ping(&ping(&lab, "paris/app2", "198.18.3.11", 5, &[]), 5);
    assert_eq!(lab.metric("paris/proxy", PARIS_FWD, &drops("malformed")), 0);
}

#[test]
fn relay_path_goes_through_the_third_site() {
    require_root();
    let lab = Lab::up(&format!("{}{RELAY}", three_sites()));
    // In CU mode the relay route exists once the CU has told paris about
    // london and tokyo: wait for it rather than measure a half-built table.
    let relayed = "pon_forwarder_route_hops{to=\"2\",hops=\"[3, 2]\"}";
    let ready = wait_until(Duration::from_secs(20), || {
        lab.metric("paris/proxy", PARIS_FWD, relayed) == 2
    });
    assert!(ready, "paris never installed the relay route to tokyo");

    let before = lab.metric("london/proxy", LONDON_FWD, &stage("transit"));
    check_ping(&ping(&lab, "paris/app1", TOKYO_APP, 20, &[]), 20);
    let after = lab.metric("london/proxy", LONDON_FWD, &stage("transit"));
    // Requests and replies both cross london.
    assert!(
        after - before >= 40,
        "london relayed {} packets for 20 pings",
        after - before
    );

    check_tcp_and_udp_both_ways(&lab);
    assert!(lab.metric("london/proxy", LONDON_FWD, &stage("transit")) > after + 1000);
    // london -> tokyo stays direct: london's own traffic is not relayed.
    check_ping(&ping(&lab, "london/app1", TOKYO_APP, 5, &[]), 5);
    assert_eq!(lab.metric("paris/proxy", PARIS_FWD, &stage("transit")), 0);
}

#[test]
fn oversized_packets_fit_or_get_frag_needed() {
    require_root();
    // Default TUN MTU: 1500 - (20 + 8 + 16 + 4x4 + 16) = 1424.
    let lab = Lab::up(&three_sites());
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
    let said = text(&out);
    assert!(
        !out.status.success() && said.contains("mtu=1424"),
        "expected a local 'message too long':\n{said}"
    );
    drop(lab);

    // TUN MTU larger than the path: the forwarder answers with ICMP.
    // The agent leg (IP-in-IP, 20 bytes) still fits 1480; the relay leg does not.
    let lab = Lab::up(&format!(
        "encap = \"ipip\"\nta_mtu = 1480\n{}{RELAY}",
        three_sites()
    ));
    ping(&lab, "paris/app1", TOKYO_APP, 1, &[]);
    let out = lab.exec(
        "paris/app1",
        &[
            "ping", "-c", "1", "-W", "2", "-M", "do", "-s", "1452", TOKYO_APP,
        ],
    );
    let said = text(&out);
    // Relay route: 1500 - 20 IPv4 - 8 UDP - (16 + 2x4) PON = 1448.
    assert!(
        said.contains("Frag needed") && said.contains("1448"),
        "expected frag needed:\n{said}"
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
    let lab = Lab::up(&three_sites());
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

    let page = || lab.metrics("paris/proxy", PARIS_FWD);
    let counted_in = |page: &str, reason: &str| metric_value(page, &drops(reason));
    // Every malformed datagram is counted under what is wrong with it (one
    // of the parser's reasons, each its own counter): the flood sends a
    // fifth of each of the four below, and a fifth of random garbage.
    let parse_errors = pon_proto::Error::LABELS;
    let fifth = n / 5;
    let all = wait_until(Duration::from_secs(10), || {
        let p = page();
        let counted = |r: &str| counted_in(&p, r);
        parse_errors.iter().map(|r| counted(r)).sum::<u64>() >= n
            && [
                "bad_version",
                "hop_index_out_of_range",
                "truncated",
                "inner_not_ip",
            ]
            .iter()
            .all(|r| counted(r) >= fifth)
            && ["not_for_me", "unknown_peer", "unknown_agent"]
                .iter()
                .all(|r| counted(r) >= n)
    });
    let p = page();
    let seen: Vec<(&str, u64)> = parse_errors
        .iter()
        .chain(&["not_for_me", "unknown_peer", "unknown_agent"])
        .map(|r| (*r, counted_in(&p, r)))
        .collect();
    assert!(all, "drops by reason: {seen:?}");
    // The forwarder is alive and still forwards.
    check_ping(&ping(&lab, "paris/app1", TOKYO_APP, 5, &[]), 5);
}

#[test]
fn ipip_encapsulation_variant_works() {
    require_root();
    // The lab's default agent legs are UDP; the others here run on them.
    let lab = Lab::up(&format!("encap = \"ipip\"\n{}{RELAY}", three_sites()));
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
