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
    // Default TUN MTU: 1500 - (20 + 8 + 16 + 4x4 + 2x12 + 2x16) = 1384.
    let lab = Lab::up(&three_sites());
    check_ping(
        &ping(
            &lab,
            "paris/app1",
            TOKYO_APP,
            3,
            &["-M", "do", "-s", "1356"],
        ),
        3,
    );
    let out = lab.exec(
        "paris/app1",
        &[
            "ping", "-c", "1", "-W", "1", "-M", "do", "-s", "1357", TOKYO_APP,
        ],
    );
    let said = text(&out);
    assert!(
        !out.status.success() && said.contains("mtu=1384"),
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
    // Relay route: 1500 - 20 IPv4 - 8 UDP - (16 + 2x4 + 2x12) PON - 2x16 tags = 1392.
    assert!(
        said.contains("Frag needed") && said.contains("1392"),
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
            &["-M", "do", "-s", "1364"],
        ),
        3,
    );
    // TCP discovers the path MTU through the same ICMP and carries on.
    let report = iperf3(&lab, "tokyo/app1", TOKYO_APP, "paris/app1", &["-t", "1"]);
    assert!(tcp_mbps(&report) > 10.0);
}

/// The application payload the wiretap looks for: ping fills its data
/// with this 16-byte pattern.
const SECRET: &str = "504f4e2d5345435245542d5041594c44";

/// Starts the wiretap capturing in `host` into `file`; returns once it listens.
fn wiretap(lab: &Lab, host: &str, file: &std::path::Path) -> std::process::Child {
    use std::io::BufRead;
    let tool = repo_root().join("tests/tests/tools/wiretap.py");
    let mut child = lab.spawn(
        host,
        &[
            "python3",
            tool.to_str().unwrap(),
            "capture",
            "--out",
            file.to_str().unwrap(),
            "--seconds",
            "20",
            "--needle",
            SECRET,
        ],
    );
    let mut line = String::new();
    let out = child.stdout.as_mut().expect("piped");
    std::io::BufReader::new(out)
        .read_line(&mut line)
        .expect("wiretap output");
    assert_eq!(line.trim(), "ready", "wiretap did not start in {host}");
    child
}

/// What a finished capture saw: (PON datagrams, data packets, with the secret).
fn captured(child: std::process::Child) -> (u64, u64, u64) {
    let out = child.wait_with_output().expect("wiretap");
    let text = String::from_utf8_lossy(&out.stdout);
    let last = text.lines().last().unwrap_or_default();
    let v: serde_json::Value =
        serde_json::from_str(last).unwrap_or_else(|_| panic!("wiretap said {text}"));
    let n = |k: &str| v[k].as_u64().unwrap();
    (n("captured"), n("data"), n("needle_seen"))
}

#[test]
fn a_wiretapper_reads_nothing_and_its_replays_and_forgeries_are_not_delivered() {
    require_root();
    // paris <-> tokyo relayed through london; paris <-> london direct.
    let lab = Lab::up(&format!("{}{RELAY}", three_sites()));
    ping(&lab, "paris/app1", TOKYO_APP, 1, &[]);
    ping(&lab, "paris/app1", "198.18.3.11", 1, &[]);
    let (inet_file, relay_file) = (
        lab.state_dir().join("wiretap-inet.bin"),
        lab.state_dir().join("wiretap-london.bin"),
    );
    // The attacker on the WAN, and one on the relay's own interfaces.
    let inet = wiretap(&lab, "inet", &inet_file);
    let relay = wiretap(&lab, "london/proxy", &relay_file);
    let egress_before = lab.metric("tokyo/proxy", TOKYO_FWD, &stage("egress"));
    let secret = ["-p", SECRET, "-s", "200"];
    check_ping(&ping(&lab, "paris/app1", TOKYO_APP, 40, &secret), 40);
    check_ping(&ping(&lab, "paris/app1", "198.18.3.11", 40, &secret), 40);
    // The pings crossed the overlay, not the plain IP path.
    assert!(lab.metric("tokyo/proxy", TOKYO_FWD, &stage("egress")) >= egress_before + 40);
    // Stop the captures (they end on their own after 20 s at the latest).
    let _ = lab.exec("inet", &["pkill", "-INT", "-f", "wiretap.py capture"]);
    let _ = lab.exec(
        "london/proxy",
        &["pkill", "-INT", "-f", "wiretap.py capture"],
    );
    let (seen, data, clear) = captured(inet);
    assert!(
        data >= 160,
        "the WAN capture saw the transfer ({seen} PON datagrams, {data} data)"
    );
    assert_eq!(clear, 0, "the payload is readable on the WAN");
    let (seen, data, clear) = captured(relay);
    assert!(
        data >= 80,
        "the relay capture saw the relayed pings ({seen} datagrams)"
    );
    assert_eq!(clear, 0, "the payload is readable at the relay");

    // Replays and altered copies from the real peers' addresses, while a
    // ping runs: none is delivered, each is counted by reason, and the
    // ping loses nothing.
    let pinger = lab.spawn(
        "paris/app1",
        &["ping", "-c", "200", "-i", "0.01", "-W", "2", "198.18.3.11"],
    );
    let tool = repo_root().join("tests/tests/tools/wiretap.py");
    let drops_at = |host: &str, addr: &str, reason: &str| lab.metric(host, addr, &drops(reason));
    let before = (
        drops_at("london/proxy", LONDON_FWD, "replayed"),
        drops_at("london/proxy", LONDON_FWD, "bad_tag"),
        lab.metric("london/proxy", LONDON_FWD, &stage("egress")),
    );
    let file = inet_file.to_str().unwrap();
    let tool = tool.to_str().unwrap();
    let resend = |extra: &[&str]| {
        let mut args = vec![
            "python3",
            tool,
            "replay",
            "--in",
            file,
            "--to",
            "198.18.3.1",
        ];
        args.extend_from_slice(extra);
        lab.exec_ok("inet", &args)
    };
    let (replay, alter) = (resend(&[]), resend(&["--alter"]));
    let sent = |out: &str| -> u64 {
        serde_json::from_str::<serde_json::Value>(out.trim()).unwrap()["sent"]
            .as_u64()
            .unwrap()
    };
    let (replayed, altered) = (sent(&replay), sent(&alter));
    assert!(
        replayed >= 40 && altered >= 40,
        "replayed {replayed}, altered {altered}"
    );
    let counted = wait_until(Duration::from_secs(10), || {
        drops_at("london/proxy", LONDON_FWD, "replayed") >= before.0 + replayed
            && drops_at("london/proxy", LONDON_FWD, "bad_tag") >= before.1 + altered
    });
    assert!(
        counted,
        "replays counted {} of {replayed}, forgeries {} of {altered}",
        drops_at("london/proxy", LONDON_FWD, "replayed") - before.0,
        drops_at("london/proxy", LONDON_FWD, "bad_tag") - before.1
    );
    let out = pinger.wait_with_output().expect("ping");
    let text = String::from_utf8_lossy(&out.stdout);
    check_ping(&text, 200);
    assert!(
        !text.contains("DUP!"),
        "a replay reached the application:\n{text}"
    );
    // Only the ping's own packets left london's egress.
    let egress = lab.metric("london/proxy", LONDON_FWD, &stage("egress")) - before.2;
    assert!(
        egress <= 200 + 5,
        "london delivered {egress} packets for 200 pings"
    );
}

/// The crypto drop reasons: a rekey that lost packets would show in one.
const SESSION_DROPS: [&str; 5] = [
    "no_session",
    "unknown_session",
    "wrong_peer",
    "bad_tag",
    "replayed",
];

fn session_drops(lab: &Lab, host: &str, addr: &str) -> u64 {
    let page = lab.metrics(host, addr);
    SESSION_DROPS
        .iter()
        .map(|r| metric_value(&page, &drops(r)))
        .sum()
}

#[test]
fn sessions_rekey_under_ping_and_iperf3_without_losing_a_packet() {
    require_root();
    // Sessions replaced every second (the default is two minutes).
    let lab = Lab::up(&format!(
        "[tunnel]\nrekey_after_ms = 1000\n{}",
        three_sites()
    ));
    ping(&lab, "paris/app1", TOKYO_APP, 1, &[]);
    let rekeys = |host: &str, addr: &str| lab.metric(host, addr, "pon_tunnel_rekeys_total");
    let before = (
        rekeys("paris/proxy", PARIS_FWD) + rekeys("tokyo/proxy", TOKYO_FWD),
        session_drops(&lab, "paris/proxy", PARIS_FWD),
        session_drops(&lab, "tokyo/proxy", TOKYO_FWD),
    );
    let pinger = lab.spawn(
        "paris/app1",
        &["ping", "-c", "600", "-i", "0.01", "-W", "2", TOKYO_APP],
    );
    let tcp = iperf3(&lab, "tokyo/app1", TOKYO_APP, "paris/app1", &["-t", "4"]);
    let out = pinger.wait_with_output().expect("ping");
    check_ping(&String::from_utf8_lossy(&out.stdout), 600);
    assert!(
        tcp_mbps(&tcp) > 10.0,
        "iperf3 across rekeys: {} Mbit/s",
        tcp_mbps(&tcp)
    );
    let after = rekeys("paris/proxy", PARIS_FWD) + rekeys("tokyo/proxy", TOKYO_FWD);
    assert!(
        after >= before.0 + 4,
        "only {} rekeys in 6 s",
        after - before.0
    );
    // Not one packet of either stream fell between two sessions.
    assert_eq!(session_drops(&lab, "paris/proxy", PARIS_FWD), before.1);
    assert_eq!(session_drops(&lab, "tokyo/proxy", TOKYO_FWD), before.2);
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
    // fifth of each of the three below, a fifth of random garbage, and a
    // fifth of well-formed packets whose seal names no session. The
    // stranger's packets are judged by their keys, not their address (peers
    // roam): their seals name no session either.
    let parse_errors = pon_proto::Error::LABELS;
    let fifth = n / 5;
    let all = wait_until(Duration::from_secs(10), || {
        let p = page();
        let counted = |r: &str| counted_in(&p, r);
        parse_errors.iter().map(|r| counted(r)).sum::<u64>() >= n - fifth
            && ["bad_version", "hop_index_out_of_range", "truncated"]
                .iter()
                .all(|r| counted(r) >= fifth)
            && counted("unknown_session") >= fifth + n
            && ["not_for_me", "unknown_agent"]
                .iter()
                .all(|r| counted(r) >= n)
    });
    let p = page();
    let seen: Vec<(&str, u64)> = parse_errors
        .iter()
        .chain(&["unknown_session", "not_for_me", "unknown_agent"])
        .map(|r| (*r, counted_in(&p, r)))
        .collect();
    assert!(all, "drops by reason: {seen:?}");
    // The forwarder is alive and still forwards.
    check_ping(&ping(&lab, "paris/app1", TOKYO_APP, 5, &[]), 5);
}

/// The public key kept in a state directory, as `pon-lab-config identity`
/// prints it.
fn public_key(dir: &std::path::Path) -> String {
    let out = std::process::Command::new(pon_e2e::bin_dir().join("pon-lab-config"))
        .arg("identity")
        .arg(dir)
        .output()
        .expect("pon-lab-config identity");
    assert!(out.status.success(), "{}", text(&out));
    let keys: serde_json::Value = serde_json::from_slice(&out.stdout).expect("JSON");
    keys[dir.to_str().unwrap()]
        .as_str()
        .expect("a key")
        .to_string()
}

#[test]
fn a_proxy_with_valid_keys_cannot_speak_for_another_cloud() {
    require_root();
    // Static configs, so that paris stays tokyo's peer while its forwarder
    // is stopped and an attacker holding paris's keys takes its place.
    let lab = Lab::up(&("cu = false\n".to_string() + &three_sites()));
    wait_reachable(&lab, "paris/app1", TOKYO_APP);
    lab.ctl("stop", &["paris/proxy"]);
    let stolen = lab.agent_state("paris/proxy", "pon-forwarder");
    let tokyo_key = public_key(&lab.agent_state("tokyo/proxy", "pon-forwarder"));
    let page = || lab.metrics("tokyo/proxy", TOKYO_FWD);
    let send = |inner_src: &str| {
        lab.exec_ok(
            "paris/proxy",
            &[
                pon_e2e::bin_dir().join("pon-loadgen").to_str().unwrap(),
                "send",
                "--bind=198.18.1.1:7300",
                "--to=198.18.2.1:7300",
                "--hops=2",
                &format!("--state-dir={}", stolen.display()),
                "--id=1",
                "--peer-id=2",
                &format!("--peer-key={tokyo_key}"),
                &format!("--inner-src={inner_src}"),
                &format!("--inner-dst={TOKYO_APP}"),
                "--count=100",
                "--rate=2000",
                "--seconds=10",
            ],
        )
    };
    // Packets that claim london's app as their source: a Noise session
    // with tokyo, sealed with it, opened by tokyo's egress, and dropped
    // there because london's addresses are not paris's to speak for.
    let before = page();
    let sent = send("198.18.3.11");
    assert!(sent.contains("\"sent\":100"), "{sent}");
    let foreign = |p: &str| metric_value(p, &drops("foreign_source"));
    let egress = |p: &str| metric_value(p, &stage("egress"));
    assert!(
        wait_until(Duration::from_secs(5), || foreign(&page())
            == foreign(&before) + 100),
        "tokyo did not drop the 100 foreign sources: {}",
        page()
    );
    assert_eq!(egress(&page()), egress(&before), "none was delivered");
    // The same attacker with paris's own addresses gets through: the
    // check is allowed IPs, not a refusal of everything from the key.
    let before = page();
    send(PARIS_APP);
    assert!(
        wait_until(Duration::from_secs(5), || egress(&page())
            >= egress(&before) + 100),
        "paris's own sources were not delivered: {}",
        page()
    );
    assert_eq!(foreign(&page()), foreign(&before));
}

#[test]
fn ipip_encapsulation_variant_works() {
    require_root();
    // The lab's default agent legs are UDP; the others here run on them.
    // The agents run as two processes here (pon-ra, pon-ta), as one elsewhere.
    let lab = Lab::up(&format!(
        "encap = \"ipip\"\nsplit_agents = true\n{}{RELAY}",
        three_sites()
    ));
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
