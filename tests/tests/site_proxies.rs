//! Several proxies per site (`[[site]] proxies = 2`): all of them carry the
//! site's traffic, and they cover for each other. TAs spread flows over
//! their site's live proxies by a hash of the flow; ingress proxies spread
//! them over the destination site's reachable proxies the same way; RAs
//! take packets from any proxy of their site. A proxy killed mid-traffic
//! loses its flows to a survivor of its site within a second, and the
//! traffic stays on the overlay.

use pon_e2e::clients::{iperf3, tcp_mbps, wait_reachable};
use pon_e2e::{parse_ping, require_root, text, wait_until, Lab};
use std::time::{Duration, Instant};

const PARIS_APP: &str = "paris/app1";
const TOKYO_APP: &str = "tokyo/app1";
const PARIS_APP_ADDR: &str = "198.18.1.11";
const TOKYO_APP_ADDR: &str = "198.18.2.11";
const PARIS: [(&str, &str); 2] = [
    ("paris/proxy", "198.18.1.1:9100"),
    ("paris/proxy2", "198.18.1.2:9100"),
];
const TOKYO: [(&str, &str); 2] = [
    ("tokyo/proxy", "198.18.2.1:9100"),
    ("tokyo/proxy2", "198.18.2.2:9100"),
];
const INGRESS: &str = "pon_forwarder_packets_total{stage=\"ingress\"}";
const EGRESS: &str = "pon_forwarder_packets_total{stage=\"egress\"}";

/// The 4-stream run fills both cores; the kill tests measure a failover
/// bound in milliseconds. They never overlap: the throughput test holds
/// this exclusively, the kill tests share it.
static CPU: std::sync::RwLock<()> = std::sync::RwLock::new(());

fn topology(proxies: u32) -> String {
    format!(
        "routing = true\n\
         [[site]]\nname = \"paris\"\napps = 1\nproxies = {proxies}\n\
         [[site]]\nname = \"tokyo\"\napps = 1\nproxies = {proxies}\n\
         [[link]]\nbetween = [\"paris\", \"tokyo\"]\ndelay_ms = 5\n"
    )
}

/// One counter of each proxy of a site.
fn counters(lab: &Lab, site: &[(&str, &str)], sample: &str) -> Vec<u64> {
    site.iter()
        .map(|(host, addr)| lab.metric(host, addr, sample))
        .collect()
}

fn deltas(after: &[u64], before: &[u64]) -> Vec<u64> {
    after.iter().zip(before).map(|(a, b)| a - b).collect()
}

/// Every proxy of both sites is registered and every app reaches the other
/// site over the overlay.
fn wait_overlay(lab: &Lab) {
    wait_reachable(lab, PARIS_APP, TOKYO_APP_ADDR);
    wait_reachable(lab, TOKYO_APP, PARIS_APP_ADDR);
}

#[test]
fn four_streams_use_both_proxies_of_each_site() {
    require_root();
    let _alone = CPU.write().unwrap_or_else(|p| p.into_inner());
    let two = Lab::up(&topology(2));
    wait_overlay(&two);
    // The roles seed 000 names: the lowest id is its site's master.
    for (site, roles) in [
        (PARIS, ["PROXY.MASTER", "PROXY.SLAVE"]),
        (TOKYO, ["PROXY.MASTER", "PROXY.SLAVE"]),
    ] {
        for ((host, addr), role) in site.iter().zip(roles) {
            let status = two.exec_ok(
                host,
                &["curl", "-sf", "-m", "5", &format!("http://{addr}/status")],
            );
            let status: serde_json::Value = serde_json::from_str(&status).expect("status JSON");
            assert_eq!(status["site_role"], role, "{host}: {status}");
        }
    }
    // Flows land on proxies by hash: a run of four may, by chance, put
    // all four on one proxy of a site (1 in 8 per site); the next run's
    // fresh ports hash anew. Bounded.
    let mut runs = 0;
    let mut spread = None;
    let mut mbps_two = 0.0;
    while runs < 8 && spread.is_none() {
        runs += 1;
        let (ing0, egr0) = (
            counters(&two, &PARIS, INGRESS),
            counters(&two, &TOKYO, EGRESS),
        );
        let report = iperf3(&two, TOKYO_APP, TOKYO_APP_ADDR, PARIS_APP, &["-P", "4"]);
        mbps_two = tcp_mbps(&report);
        let ing = deltas(&counters(&two, &PARIS, INGRESS), &ing0);
        let egr = deltas(&counters(&two, &TOKYO, EGRESS), &egr0);
        eprintln!("run {runs}: paris ingress {ing:?}, tokyo egress {egr:?}, {mbps_two:.0} Mbit/s");
        // A proxy carrying a stream carries thousands of packets in 2 s.
        if ing.iter().all(|n| *n > 1000) && egr.iter().all(|n| *n > 1000) {
            spread = Some((ing, egr));
        }
    }
    let (ing, egr) =
        spread.expect("in 8 runs of 4 streams, one proxy of a site carried everything every time");
    drop(two);
    // The same run with one proxy per site, side by side.
    let one = Lab::up(&topology(1));
    wait_overlay(&one);
    let mbps_one = tcp_mbps(&iperf3(
        &one,
        TOKYO_APP,
        TOKYO_APP_ADDR,
        PARIS_APP,
        &["-P", "4"],
    ));
    eprintln!(
        "iperf3 -P 4 paris -> tokyo: two proxies per site {mbps_two:.0} Mbit/s \
         (paris ingress {ing:?}, tokyo egress {egr:?} packets), one proxy per site \
         {mbps_one:.0} Mbit/s: ratio {:.2}",
        mbps_two / mbps_one
    );
}

/// Kills, during a ping every 20 ms from paris to tokyo, the proxy of
/// `site` that carries the ping's flow (the one whose `counter` moves with
/// the pings); checks that at most a second of pings is lost and that the
/// site's other proxy carries the flow on the overlay.
fn kill_the_carrier(site: [(&str, &str); 2], counter: &str) {
    require_root();
    let _shared = CPU.read().unwrap_or_else(|p| p.into_inner());
    let lab = Lab::up(&topology(2));
    wait_overlay(&lab);
    // Which proxy carries the ping's flow (it hashes to one). An app
    // reaches the other site over the plain IP path too, so the first
    // pings after `wait_overlay` may not be on the overlay yet (the TA's
    // steering or the ingress's view of the destination's proxies still
    // settling): wait, with a deadline, for a run the overlay carries
    // whole through one proxy.
    let mut last = Vec::new();
    let mut carrier = None;
    let settled = wait_until(Duration::from_secs(20), || {
        let before = counters(&lab, &site, counter);
        let out = lab.exec_ok(
            PARIS_APP,
            &["ping", "-c", "20", "-i", "0.05", "-W", "2", TOKYO_APP_ADDR],
        );
        let received = parse_ping(&out).expect("ping summary").received;
        last = deltas(&counters(&lab, &site, counter), &before);
        carrier = last.iter().position(|n| *n >= 20);
        received == 20 && carrier.is_some()
    });
    assert!(settled, "no proxy carried a whole run of pings: {last:?}");
    let carrier = carrier.expect("settled on a carrier");
    let survivor = 1 - carrier;

    let survivor_before = lab.metric(site[survivor].0, site[survivor].1, counter);
    let carrier_before = lab.metric(site[carrier].0, site[carrier].1, counter);
    let ping = lab.spawn(
        PARIS_APP,
        &[
            "ping",
            "-q",
            "-c",
            "250",
            "-i",
            "0.02",
            "-W",
            "1",
            TOKYO_APP_ADDR,
        ],
    );
    // A second of pings before the kill.
    let mut carrier_seen = 0;
    assert!(
        wait_until(Duration::from_secs(10), || {
            carrier_seen = lab.metric(site[carrier].0, site[carrier].1, counter);
            carrier_seen >= carrier_before + 50
        }),
        "the pings did not reach {}",
        site[carrier].0
    );
    let killed = Instant::now();
    lab.ctl("stop", &[site[carrier].0]);
    // The dead proxy carried pings until `lab stop` killed it.
    let stopping = killed.elapsed();
    let out = ping.wait_with_output().expect("ping");
    let s = parse_ping(&String::from_utf8_lossy(&out.stdout))
        .unwrap_or_else(|| panic!("no ping summary:\n{}", text(&out)));
    let lost = s.transmitted - s.received;
    let carried = lab.metric(site[survivor].0, site[survivor].1, counter) - survivor_before;
    eprintln!(
        "killed {} ({:.1} s before the run ended): {lost} of {} pings at 20 ms lost (= {} ms of traffic); \
         the survivor {} carried {carried} packets meanwhile",
        site[carrier].0,
        killed.elapsed().as_secs_f64(),
        s.transmitted,
        lost * 20,
        site[survivor].0
    );
    assert!(
        lost * 20 <= 1000,
        "{lost} pings lost: the flow took more than a second to move"
    );
    // The traffic stayed on the overlay: every answered ping the dead
    // proxy did not carry, the survivor did (the IP path would have left
    // it nothing). The dead one's count was last read just before `lab
    // stop`: it carried one ping per 20 ms more while that ran (and one
    // more read's worth, 10).
    let by_carrier = carrier_seen - carrier_before;
    let until_dead = stopping.as_millis() as u64 / 20 + 10;
    assert!(
        carried + until_dead >= s.received.saturating_sub(by_carrier),
        "the survivor carried {carried} packets, the dead proxy {by_carrier} (as last seen, \
         {until_dead} more until it died), of {} answered: the rest left the overlay",
        s.received
    );
}

/// Ingress proxies (paris's) move the flow to tokyo's other proxy once
/// their routers find the dead one unreachable.
#[test]
fn killing_a_proxy_of_the_destination_site_moves_its_flows_to_the_survivor() {
    kill_the_carrier(TOKYO, EGRESS);
}

/// The TA moves the flow to paris's other proxy once the dead one's
/// steering lease runs out.
#[test]
fn killing_a_proxy_of_the_source_site_moves_its_flows_to_the_survivor() {
    kill_the_carrier(PARIS, INGRESS);
}
