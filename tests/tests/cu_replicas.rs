//! CU replicas on etcd end to end (`cu_replicas = 3`): hosts cu1, cu2 and
//! cu3 each run one etcd member and one pon-cu replica; site i's agents
//! try replica i (mod 3) first, then the others. A replica dying, a site
//! joining while it is down, and etcd members restarting one at a time must
//! cost no ping and change no id.

use pon_e2e::clients::ping_during;
use pon_e2e::{metric_value, require_root, sites, wait_until, Lab, PingStats};
use std::collections::BTreeMap;
use std::time::{Duration, Instant};

const PARIS_APP: &str = "198.18.1.11";
const TOKYO_APP: &str = "198.18.2.11";
const LONDON_APP: &str = "198.18.3.11";
const BERLIN_APP: &str = "198.18.4.11";
const REPLICAS: u32 = 3;
/// Proxy and app VM per site.
const AGENTS: u64 = 6;

fn replicas_lab() -> Lab {
    Lab::up(&format!(
        "cu_replicas = {REPLICAS}\n{}",
        sites(&["paris", "tokyo", "london"])
    ))
}

fn cu_host(k: u32) -> String {
    format!("cu{k}")
}

/// The metrics page at `http://198.18.250.K:port` on cuK ("" while it
/// does not answer).
fn metrics_of(lab: &Lab, k: u32, port: u16) -> String {
    let url = format!("http://198.18.250.{k}:{port}/metrics");
    let out = lab.exec(&cu_host(k), &["curl", "-sf", "-m", "2", &url]);
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A replica's metrics page.
fn cu_metrics(lab: &Lab, k: u32) -> String {
    metrics_of(lab, k, 9200)
}

/// Agents connected to replica `k` itself.
fn connected_to(lab: &Lab, k: u32) -> u64 {
    metric_value(&cu_metrics(lab, k), "pon_cu_agents{state=\"online\"}")
}

fn connected_to_all(lab: &Lab, replicas: &[u32]) -> u64 {
    replicas.iter().map(|&k| connected_to(lab, k)).sum()
}

/// (cloud, name) -> (id, present) as replica `k` lists them (`ponctl --json`).
fn registry(lab: &Lab, k: u32) -> BTreeMap<(String, String), (u64, bool)> {
    lab.registry_on(&cu_host(k), &format!("198.18.250.{k}:7400"))
}

fn intercepts(lab: &Lab, host: &str, dst: &str) -> bool {
    let out = lab.exec(host, &["ip", "route", "get", dst]);
    String::from_utf8_lossy(&out.stdout).contains("ponta0")
}

/// `from` reaches `to` through the overlay (its TA intercepts it and a
/// ping answers).
fn reaches(lab: &Lab, from: &str, to: &str) -> bool {
    intercepts(lab, from, to) && lab.ping_ok(from, to)
}

/// Every agent registered (with some replica) and paris reaches tokyo
/// over the overlay.
fn wait_ready(lab: &Lab) {
    let all: Vec<u32> = (1..=REPLICAS).collect();
    assert!(
        wait_until(Duration::from_secs(30), || connected_to_all(lab, &all)
            == AGENTS),
        "not every agent registered with a replica"
    );
    assert!(
        wait_until(Duration::from_secs(20), || reaches(
            lab,
            "paris/app1",
            TOKYO_APP
        ) && reaches(
            lab,
            "tokyo/app1",
            PARIS_APP
        )),
        "overlay never came up"
    );
}

/// Runs `phases` while paris/app1 pings tokyo's app every 50 ms; returns
/// what was sent and received.
fn while_pinging(lab: &Lab, phases: impl FnOnce()) -> PingStats {
    ping_during(lab, "paris/app1", TOKYO_APP, phases)
}

/// Each replica's counts, for failure messages: agents known and
/// connected, etcd errors by operation.
fn replicas_report(lab: &Lab) -> String {
    (1..=REPLICAS)
        .map(|k| {
            let page = cu_metrics(lab, k);
            let m = |s: &str| metric_value(&page, s);
            format!(
                "cu{k}: known {} connected {} etcd errors write {} watch {} lease {}, leases lost {}",
                m("pon_cu_agents{state=\"known\"}"),
                m("pon_cu_agents{state=\"online\"}"),
                m("pon_cu_etcd_errors_total{op=\"write\"}"),
                m("pon_cu_etcd_errors_total{op=\"watch\"}"),
                m("pon_cu_etcd_errors_total{op=\"lease\"}"),
                m("pon_cu_etcd_leases_lost_total"),
            )
        })
        .collect::<Vec<_>>()
        .join("\n")
}

fn leaves(lab: &Lab, k: u32) -> u64 {
    let page = cu_metrics(lab, k);
    [
        "goodbye",
        "closed",
        "missed_heartbeats",
        "not_back_after_restart",
    ]
    .iter()
    .map(|r| metric_value(&page, &format!("pon_cu_leaves_total{{reason=\"{r}\"}}")))
    .sum()
}

fn daemon_pid(lab: &Lab, host: &str, daemon: &str) -> u64 {
    lab.status_json()["hosts"]
        .as_array()
        .unwrap()
        .iter()
        .find(|h| h["name"] == host)
        .and_then(|h| {
            h["daemons"]
                .as_array()
                .unwrap()
                .iter()
                .find(|d| d["name"] == daemon)
        })
        .and_then(|d| d["pid"].as_u64())
        .unwrap_or_else(|| panic!("no {daemon} on {host}"))
}

fn daemon_alive(lab: &Lab, host: &str, daemon: &str) -> bool {
    lab.status_json()["hosts"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|h| h["name"] == host)
        .flat_map(|h| h["daemons"].as_array().unwrap().clone())
        .any(|d| d["name"] == daemon && d["alive"] == true)
}

/// Whether replica `k`'s etcd member is part of a cluster with a leader.
fn etcd_has_leader(lab: &Lab, k: u32) -> bool {
    metric_value(&metrics_of(lab, k, 2379), "etcd_server_has_leader") == 1
}

#[test]
fn a_dead_replica_costs_no_ping_and_a_site_added_meanwhile_is_reachable_within_10_s() {
    require_root();
    let lab = replicas_lab();
    wait_ready(&lab);
    // Paris (site 1) uses cu1.
    assert_eq!(connected_to(&lab, 1), 2, "paris's agents are not on cu1");
    let ids_before = registry(&lab, 2);
    assert_eq!(ids_before.len() as u64, AGENTS);
    let mut added_after = Duration::ZERO;
    let pinged = while_pinging(&lab, || {
        // cu1 dies: its etcd member and its replica (SIGKILL).
        lab.ctl("stop", &["cu1"]);
        let t = Instant::now();
        assert!(
            wait_until(Duration::from_secs(30), || connected_to_all(&lab, &[2, 3])
                == AGENTS),
            "paris's agents did not move to another replica"
        );
        eprintln!("paris's agents moved to cu2/cu3 within {:?}", t.elapsed());
        // A site joins while cu1 is down (berlin is site 4: it tries cu1 first).
        lab.ctl("add-site", &["berlin", "--apps", "1"]);
        let t = Instant::now();
        let pairs = [
            ("paris/app1", BERLIN_APP),
            ("tokyo/app1", BERLIN_APP),
            ("london/app1", BERLIN_APP),
            ("berlin/app1", PARIS_APP),
            ("berlin/app1", LONDON_APP),
        ];
        // The pairs are checked at once (each check is process starts in
        // the lab and a ping that may wait 1 s), and one that got through
        // is not checked again: what is timed is the overlay, not the test.
        let mut pending = pairs.to_vec();
        let reached = wait_until(Duration::from_secs(10), || {
            let through: Vec<bool> = std::thread::scope(|s| {
                let checks: Vec<_> = pending
                    .iter()
                    .map(|(from, to)| s.spawn(|| reaches(&lab, from, to)))
                    .collect();
                checks.into_iter().map(|c| c.join().unwrap()).collect()
            });
            let mut it = through.into_iter();
            pending.retain(|_| !it.next().unwrap_or(false));
            pending.is_empty()
        });
        assert!(
            reached,
            "berlin was not reachable from every site within 10 s of add-site: {pending:?}\n{}",
            replicas_report(&lab)
        );
        added_after = t.elapsed();
    });
    eprintln!(
        "berlin reachable from every site {added_after:?} after add-site; pings while cu1 was down: {} sent, {} received",
        pinged.transmitted, pinged.received
    );
    assert!(pinged.transmitted > 0);
    assert_eq!(pinged.transmitted, pinged.received, "pings were lost");
    // Nobody was announced gone by the surviving replicas, and every id
    // held.
    for k in [2, 3] {
        assert_eq!(leaves(&lab, k), 0, "cu{k} announced an agent gone");
    }
    let after = registry(&lab, 3);
    for (who, (id, _)) in &ids_before {
        assert_eq!(after.get(who), Some(&(*id, true)), "{who:?}");
    }
    assert_eq!(after.len() as u64, AGENTS + 2, "berlin's proxy and app VM");
    // cu1 comes back and knows the whole registry, with the same ids.
    lab.ctl("start", &["cu1"]);
    assert!(
        wait_until(Duration::from_secs(20), || registry(&lab, 1) == after),
        "the restarted cu1 does not list what cu3 does"
    );
}

#[test]
fn etcd_members_restarted_one_at_a_time_lose_nothing_and_keep_every_id() {
    require_root();
    let lab = replicas_lab();
    wait_ready(&lab);
    let ids_before = registry(&lab, 1);
    assert_eq!(ids_before.len() as u64, AGENTS);
    let pinged = while_pinging(&lab, || {
        for k in 1..=REPLICAS {
            let host = cu_host(k);
            let pid = daemon_pid(&lab, &host, "etcd");
            let killed = std::process::Command::new("kill")
                .args(["-KILL", &pid.to_string()])
                .status()
                .expect("kill");
            assert!(killed.success());
            assert!(
                wait_until(Duration::from_secs(10), || !daemon_alive(
                    &lab, &host, "etcd"
                )),
                "etcd on {host} did not die"
            );
            // Back (lab start restarts what is down: the member alone),
            // and in the cluster again before the next one goes.
            lab.ctl("start", &[&host]);
            assert!(
                wait_until(Duration::from_secs(20), || etcd_has_leader(&lab, k)),
                "etcd on {host} did not rejoin the cluster"
            );
        }
    });
    eprintln!(
        "pings while etcd members restarted: {} sent, {} received",
        pinged.transmitted, pinged.received
    );
    assert!(pinged.transmitted > 0);
    assert_eq!(pinged.transmitted, pinged.received, "pings were lost");
    // Every replica still lists every agent, present, with its id; none
    // was announced gone; all stayed connected.
    eprintln!("after the etcd restarts:\n{}", replicas_report(&lab));
    for k in 1..=REPLICAS {
        assert_eq!(registry(&lab, k), ids_before, "cu{k}'s registry changed");
        assert_eq!(leaves(&lab, k), 0, "cu{k} announced an agent gone");
    }
    let all: Vec<u32> = (1..=REPLICAS).collect();
    assert_eq!(connected_to_all(&lab, &all), AGENTS);
    // The store still takes writes and every replica sees them: a site
    // added now (its tokens made through one replica, its agents enrolling
    // with another) is reachable.
    lab.ctl("add-site", &["berlin", "--apps", "1"]);
    assert!(
        wait_until(Duration::from_secs(10), || reaches(
            &lab,
            "paris/app1",
            BERLIN_APP
        ) && reaches(
            &lab,
            "berlin/app1",
            TOKYO_APP
        )),
        "berlin not reachable after the etcd restarts:\n{}",
        replicas_report(&lab)
    );
}
