//! A proxy behind a cloud's 1:1 NAT: paris's proxy has a private address
//! and the rest of the world sees it at a public one (`[[site]] nat = true`:
//! stateless NAT on its gateway, so every site-to-site packet crosses it).
//! It registers without knowing its public address; the CU fills in the one
//! its connection comes from, peers reach it there, and when the NAT maps it
//! to another address mid-traffic, its peers follow its authenticated
//! packets there, and the CU, which sees its connection move, tells
//! everyone the new address.

use pon_e2e::clients::{iperf3, tcp_mbps, wait_reachable};
use pon_e2e::{parse_ping, require_root, text, wait_until, Lab};
use std::time::{Duration, Instant};

const TOKYO_APP: &str = "198.18.2.11";
const TOKYO_FWD: &str = "198.18.2.1:9100";
const PARIS_APP: &str = "198.18.1.11";
const PARIS_FWD: &str = "198.18.1.1:9100";
const EGRESS: &str = "pon_forwarder_packets_total{stage=\"egress\"}";

const TOPOLOGY: &str = r#"
[[site]]
name = "paris"
apps = 1
nat = true
[[site]]
name = "tokyo"
apps = 1
[[link]]
between = ["paris", "tokyo"]
delay_ms = 5
"#;

/// paris's proxy's address for peers, as the CU registered it.
fn registered_pon(lab: &Lab) -> Option<String> {
    let out = lab.ponctl(&["--json"]);
    assert!(out.status.success(), "ponctl: {}", text(&out));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("ponctl --json");
    v.as_array()?
        .iter()
        .find(|a| {
            a["cloud"] == "paris" && a["role"].as_str().is_some_and(|r| r.starts_with("PROXY"))
        })
        .and_then(|a| a["endpoints"]["Proxy"]["pon"].as_str().map(str::to_string))
}

/// The gateway's NAT now maps paris's proxy to `public`.
fn rebind(lab: &Lab, public: &str) {
    // One file: nft applies it atomically, as a NAT's remapping is.
    let rules = format!(
        "flush chain ip ponlab_nat pre\n\
         flush chain ip ponlab_nat post\n\
         add rule ip ponlab_nat pre ip daddr {public} ip daddr set 198.18.1.1\n\
         add rule ip ponlab_nat post oifname != {{ \"br1\", \"wan0\" }} ip saddr 198.18.1.1 ip saddr set {public}\n"
    );
    let file = lab.state_dir().join("rebind.nft");
    std::fs::write(&file, rules).unwrap();
    lab.exec_ok("inet", &["nft", "-f", file.to_str().unwrap()]);
}

#[test]
fn a_proxy_behind_nat_is_reached_at_its_public_address_and_followed_when_it_changes() {
    require_root();
    let lab = Lab::up(TOPOLOGY);
    wait_reachable(&lab, "paris/app1", TOKYO_APP);
    // The proxy registered 0.0.0.0:7300; the CU saw its connection come
    // from the NAT's public address.
    assert!(
        wait_until(Duration::from_secs(10), || registered_pon(&lab).as_deref()
            == Some("203.0.113.1:7300")),
        "registered as {:?}",
        registered_pon(&lab)
    );
    let egress = || lab.metric("tokyo/proxy", TOKYO_FWD, EGRESS);
    let before = egress();
    let out = lab.exec_ok(
        "paris/app1",
        &["ping", "-c", "20", "-i", "0.05", "-W", "2", TOKYO_APP],
    );
    let s = parse_ping(&out).expect("ping summary");
    assert_eq!(s.received, 20, "{out}");
    assert!(egress() >= before + 20, "the pings took the overlay");
    // Both ways, ping and TCP, through the overlay: tokyo reaches the NAT
    // site too (its proxy sends to the public address, the NAT maps it in).
    let paris_egress = || lab.metric("paris/proxy", PARIS_FWD, EGRESS);
    let before = paris_egress();
    let out = lab.exec_ok(
        "tokyo/app1",
        &["ping", "-c", "20", "-i", "0.05", "-W", "2", PARIS_APP],
    );
    assert_eq!(
        parse_ping(&out).expect("ping summary").received,
        20,
        "{out}"
    );
    assert!(
        paris_egress() >= before + 20,
        "tokyo's pings took the overlay"
    );
    for (server, addr, client) in [
        ("tokyo/app1", TOKYO_APP, "paris/app1"),
        ("paris/app1", PARIS_APP, "tokyo/app1"),
    ] {
        let (into_paris, into_tokyo) = (paris_egress(), egress());
        let mbps = tcp_mbps(&iperf3(&lab, server, addr, client, &[]));
        let delivered = if server.starts_with("paris") {
            paris_egress() - into_paris
        } else {
            egress() - into_tokyo
        };
        eprintln!("iperf3 {client} -> {server} across the NAT: {mbps:.0} Mbit/s");
        assert!(
            mbps > 1.0 && delivered > 1000,
            "{client} -> {server}: {mbps} Mbit/s, {delivered} packets through the overlay"
        );
    }

    // The NAT maps the proxy to another public address while a ping runs
    // every 20 ms: tokyo follows paris's authenticated packets there.
    let moves = || lab.metric("tokyo/proxy", TOKYO_FWD, "pon_proxy_peer_moves_total");
    let moved_before = moves();
    let ping = lab.spawn(
        "paris/app1",
        &["ping", "-c", "150", "-i", "0.02", "-W", "1", TOKYO_APP],
    );
    std::thread::sleep(Duration::from_millis(1000));
    let at = Instant::now();
    rebind(&lab, "203.0.113.101");
    assert!(
        wait_until(Duration::from_secs(10), || moves() > moved_before),
        "tokyo did not follow paris to its new address: {}",
        lab.metrics("tokyo/proxy", TOKYO_FWD)
    );
    let followed = at.elapsed();
    // The proxy's connection to the CU followed the NAT too (QUIC
    // migrates): the CU announces the new address to everyone.
    assert!(
        wait_until(Duration::from_secs(10), || registered_pon(&lab).as_deref()
            == Some("203.0.113.101:7300")),
        "the CU still has paris at {:?}",
        registered_pon(&lab)
    );
    let out = ping.wait_with_output().expect("ping");
    let s = parse_ping(&String::from_utf8_lossy(&out.stdout)).expect("ping summary");
    let lost = s.transmitted - s.received;
    eprintln!(
        "NAT rebinding: tokyo's metrics showed it following paris {:.0} ms later; {lost} of {} pings at 20 ms lost",
        followed.as_secs_f64() * 1000.0,
        s.transmitted
    );
    assert!(lost <= 5, "{lost} pings lost across the rebinding");
}
