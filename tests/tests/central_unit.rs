//! The Central Unit end to end: real pon-cu, forwarders and TAs in the lab
//! (CU mode), agents joining, crashing and coming back, the CU itself
//! crashing, intruders (wrong token or CA, a token of the wrong scope,
//! another key for an enrolled name, addresses not theirs), and revocation.

use pon_e2e::clients::ping_during;
use pon_e2e::{bin_dir, metric_value, ping_stats, require_root, sites, text, wait_until, Lab};
use std::collections::BTreeMap;
use std::time::{Duration, Instant};

const THREE_SITES: [&str; 3] = ["paris", "tokyo", "london"];

const PARIS_APP: &str = "198.18.1.11";
const TOKYO_APP: &str = "198.18.2.11";
const PARIS_FWD: &str = "198.18.1.1:9100";
const TOKYO_FWD: &str = "198.18.2.1:9100";
const LONDON_FWD: &str = "198.18.3.1:9100";
const PARIS_TA: &str = "198.18.1.11:9101";
const TOKYO_TA: &str = "198.18.2.11:9101";
/// The CU clients of a two-site lab: (host, metrics address).
const AGENTS: [(&str, &str); 4] = [
    ("paris/proxy", PARIS_FWD),
    ("paris/app1", PARIS_TA),
    ("tokyo/proxy", TOKYO_FWD),
    ("tokyo/app1", TOKYO_TA),
];
const EGRESS: &str = "pon_forwarder_packets_total{stage=\"egress\"}";
const CU_METRICS: &str = "198.18.250.1:9200";
/// The lab's CU declares an agent gone after 2 s without a heartbeat; the
/// update then has to reach the others. Generous for a loaded machine.
const LEAVE_BOUND: Duration = Duration::from_secs(4);

/// (cloud, name) -> (id, online), from `ponctl --json`.
fn registry(lab: &Lab) -> BTreeMap<(String, String), (u64, bool)> {
    lab.registry_on("cu", "198.18.250.1:7400")
}

fn metric(lab: &Lab, host: &str, addr: &str, sample: &str) -> u64 {
    // A daemon being restarted has no endpoint for a moment: count that as 0.
    let out = lab.exec(
        host,
        &["curl", "-sf", "-m", "2", &format!("http://{addr}/metrics")],
    );
    metric_value(&String::from_utf8_lossy(&out.stdout), sample)
}

/// How often an agent's CU client failed for `reason`.
fn failures(lab: &Lab, host: &str, addr: &str, reason: &str) -> u64 {
    let sample = format!("pon_cu_client_connect_failures_total{{reason=\"{reason}\"}}");
    metric(lab, host, addr, &sample)
}

/// Waits (bounded) until every agent of a two-site lab counts a CU failure
/// for `reason`; returns how long that took.
fn wait_failures(lab: &Lab, reason: &str, within: Duration) -> Duration {
    let t = Instant::now();
    assert!(
        wait_until(within, || AGENTS
            .iter()
            .all(|(h, a)| failures(lab, h, a, reason) >= 1)),
        "not every agent counted a {reason} failure within {within:?}"
    );
    t.elapsed()
}

/// Every daemon's host and pid, in the lab's order.
fn pids(lab: &Lab) -> Vec<(String, u64)> {
    let mut all = vec![];
    for h in lab.status_json()["hosts"].as_array().unwrap() {
        for d in h["daemons"].as_array().unwrap() {
            let host = h["name"].as_str().unwrap().to_string();
            all.push((host, d["pid"].as_u64().unwrap_or(0)));
        }
    }
    all
}

/// The agents' pids (every daemon but the CU's).
fn agent_pids(lab: &Lab) -> Vec<(String, u64)> {
    pids(lab).into_iter().filter(|(h, _)| h != "cu").collect()
}

/// Runs `phases` while paris/app1 pings tokyo's app without a break, and
/// asserts that no ping was lost and that (nearly) all took the overlay.
fn while_pinging(lab: &Lab, phases: impl FnOnce()) {
    let delivered = metric(lab, "tokyo/proxy", TOKYO_FWD, EGRESS);
    let pinged = ping_during(lab, "paris/app1", TOKYO_APP, phases);
    eprintln!(
        "pings while the CU was in trouble: {} sent, {} received",
        pinged.transmitted, pinged.received
    );
    assert!(pinged.transmitted > 0);
    assert_eq!(pinged.transmitted, pinged.received, "pings were lost");
    // No lab link impairs anything, so the overlay has nothing to lose; and
    // the pings did take it (tokyo's egress delivered every request), rather
    // than the plain IP path.
    let through = metric(lab, "tokyo/proxy", TOKYO_FWD, EGRESS) - delivered;
    assert_eq!(
        through, pinged.received,
        "only {through} of {} pings went through the overlay",
        pinged.received
    );
    assert!(intercepts(lab, "paris/app1", TOKYO_APP));
}

fn peers(lab: &Lab, host: &str, addr: &str) -> u64 {
    metric(lab, host, addr, "pon_forwarder_peers")
}

/// Whether `host` routes `dst` into its TA (by whatever prefix: the CU
/// names remote clouds by their prefixes).
fn intercepts(lab: &Lab, host: &str, dst: &str) -> bool {
    let out = lab.exec(host, &["ip", "route", "get", dst]);
    String::from_utf8_lossy(&out.stdout).contains("ponta0")
}

/// Waits (bounded) until paris's app reaches tokyo's over the overlay:
/// both TAs intercept the other's address (a router that has not yet
/// measured a path leaves it to the IP path, where a ping also succeeds)
/// and a ping goes through.
fn wait_overlay_up(lab: &Lab) {
    assert!(
        wait_until(Duration::from_secs(20), || intercepts(
            lab,
            "paris/app1",
            TOKYO_APP
        ) && intercepts(
            lab,
            "tokyo/app1",
            PARIS_APP
        ) && lab
            .ping_ok("paris/app1", TOKYO_APP)),
        "overlay never came up"
    );
}

/// Paris, tokyo and london, one app VM each: six agents in all.
fn three_sites() -> Lab {
    Lab::up(&sites(&THREE_SITES))
}

/// Waits (bounded) until the CU counts `n` agents online.
fn wait_registered(lab: &Lab, n: u64, within: Duration) {
    assert!(
        wait_until(within, || metric(
            lab,
            "cu",
            CU_METRICS,
            "pon_cu_agents{state=\"online\"}"
        ) == n),
        "the CU never had {n} agents online"
    );
}

fn assert_no_loss(out: &std::process::Output) {
    let s = ping_stats(out);
    assert_eq!(
        s.transmitted,
        s.received,
        "ping lost packets:\n{}",
        text(out)
    );
}

#[test]
fn agents_started_before_the_cu_come_up_once_it_appears() {
    require_root();
    let lab = three_sites();
    wait_registered(&lab, 6, Duration::from_secs(20));
    // Take the CU away, and start paris and tokyo afresh while it is away.
    lab.ctl("stop", &["cu"]);
    for h in ["paris/app1", "paris/proxy", "tokyo/app1", "tokyo/proxy"] {
        lab.ctl("stop", &[h]);
    }
    for h in ["paris/proxy", "paris/app1", "tokyo/proxy", "tokyo/app1"] {
        lab.ctl("start", &[h]);
    }
    // Up, but knowing nothing: no peers, nothing intercepted.
    assert_eq!(
        metric(&lab, "paris/proxy", PARIS_FWD, "pon_cu_client_registered"),
        0
    );
    assert_eq!(peers(&lab, "paris/proxy", PARIS_FWD), 0);
    assert!(!intercepts(&lab, "paris/app1", TOKYO_APP));
    // The CU appears: everyone registers and the overlay carries traffic.
    lab.ctl("start", &["cu"]);
    assert!(
        wait_until(Duration::from_secs(30), || {
            peers(&lab, "paris/proxy", PARIS_FWD) == 2 && intercepts(&lab, "paris/app1", TOKYO_APP)
        }),
        "paris never configured itself from the CU"
    );
    let before = metric(
        &lab,
        "tokyo/proxy",
        TOKYO_FWD,
        "pon_forwarder_packets_total{stage=\"egress\"}",
    );
    assert!(wait_until(Duration::from_secs(15), || lab
        .ping_ok("paris/app1", TOKYO_APP)));
    let after = metric(
        &lab,
        "tokyo/proxy",
        TOKYO_FWD,
        "pon_forwarder_packets_total{stage=\"egress\"}",
    );
    assert!(after > before, "the ping did not take the overlay");
}

#[test]
fn a_site_added_while_a_ping_runs_becomes_reachable_without_restarts() {
    require_root();
    let lab = three_sites();
    wait_overlay_up(&lab);
    let before = pids(&lab);
    let pinger = lab.spawn(
        "paris/app1",
        &["ping", "-c", "200", "-i", "0.05", "-W", "2", TOKYO_APP],
    );
    lab.ctl("add-site", &["berlin", "--apps", "1"]);
    let berlin_app = "198.18.4.11";
    // The join reaches paris's TA in two hops: the CU tells paris's proxy,
    // whose steering then stops sending berlin's grant to the IP path
    // (once its router has had an answer from berlin). Timed, not bounded
    // here: the loop below bounds the whole.
    let t = Instant::now();
    if wait_until(Duration::from_secs(20), || {
        peers(&lab, "paris/proxy", PARIS_FWD) == 3
    }) {
        let heard = t.elapsed();
        if wait_until(Duration::from_secs(20), || {
            intercepts(&lab, "paris/app1", berlin_app)
        }) {
            eprintln!(
                "paris's proxy knew berlin's {:.2} s after add-site returned; \
                 paris's TA intercepted berlin {:.2} s after that",
                heard.as_secs_f64(),
                (t.elapsed() - heard).as_secs_f64()
            );
        }
    }
    for (from, to) in [
        ("paris/app1", berlin_app),
        ("tokyo/app1", berlin_app),
        ("berlin/app1", PARIS_APP),
    ] {
        assert!(
            wait_until(Duration::from_secs(20), || intercepts(&lab, from, to)
                && lab.ping_ok(from, to)),
            "{from} never reached {to} through the overlay"
        );
    }
    assert!(
        metric(
            &lab,
            "berlin/proxy",
            "198.18.4.1:9100",
            "pon_forwarder_packets_total{stage=\"egress\"}"
        ) >= 2,
        "berlin's traffic did not take the overlay"
    );
    assert_no_loss(&pinger.wait_with_output().unwrap());
    // Nothing already running was restarted.
    assert_eq!(&pids(&lab)[..before.len()], &before[..]);
}

#[test]
fn a_proxy_killed_with_sigkill_is_announced_gone_within_the_bound() {
    require_root();
    let lab = three_sites();
    assert!(wait_until(Duration::from_secs(20), || {
        peers(&lab, "paris/proxy", PARIS_FWD) == 2 && peers(&lab, "tokyo/proxy", TOKYO_FWD) == 2
    }));
    let killed = Instant::now();
    lab.ctl("stop", &["london/proxy"]);
    assert!(
        wait_until(LEAVE_BOUND, || {
            peers(&lab, "paris/proxy", PARIS_FWD) == 1 && peers(&lab, "tokyo/proxy", TOKYO_FWD) == 1
        }),
        "london was not announced as gone within {LEAVE_BOUND:?}"
    );
    let took = killed.elapsed();
    eprintln!("london announced as gone after {took:?}");
    // London's app is no longer reachable through the overlay: its grant
    // has no proxy now, and paris's proxy steers its TA to the plain IP
    // path for it.
    assert!(wait_until(Duration::from_secs(5), || !intercepts(
        &lab,
        "paris/app1",
        "198.18.3.11"
    )));
    let reg = registry(&lab);
    assert_eq!(
        reg[&("london".to_string(), "198.18.3.1".to_string())],
        (3, false)
    );
    // It comes back with the same id.
    lab.ctl("start", &["london/proxy"]);
    assert!(wait_until(Duration::from_secs(15), || peers(
        &lab,
        "paris/proxy",
        PARIS_FWD
    ) == 2));
    assert_eq!(
        registry(&lab)[&("london".to_string(), "198.18.3.1".to_string())],
        (3, true)
    );
}

#[test]
fn a_cu_killed_and_restarted_loses_no_ping_and_every_agent_keeps_its_id() {
    require_root();
    let lab = three_sites();
    wait_registered(&lab, 6, Duration::from_secs(20));
    wait_overlay_up(&lab);
    let ids_before = registry(&lab);
    assert_eq!(ids_before.len(), 6);
    let pinger = lab.spawn(
        "paris/app1",
        &["ping", "-c", "300", "-i", "0.05", "-W", "2", TOKYO_APP],
    );
    lab.ctl("stop", &["cu"]);
    // The agents notice the CU is gone ...
    assert!(wait_until(Duration::from_secs(15), || metric(
        &lab,
        "paris/proxy",
        PARIS_FWD,
        "pon_cu_client_registered"
    ) == 0));
    lab.ctl("start", &["cu"]);
    // ... and come back to the restarted one, which knew them all along.
    wait_registered(&lab, 6, Duration::from_secs(30));
    assert_no_loss(&pinger.wait_with_output().unwrap());
    assert_eq!(
        registry(&lab),
        ids_before,
        "ids changed across the CU restart"
    );
    assert_eq!(
        metric(&lab, "paris/proxy", PARIS_FWD, "pon_cu_client_id"),
        1
    );
    assert_eq!(peers(&lab, "paris/proxy", PARIS_FWD), 2);
    // Nobody was announced as gone.
    assert_eq!(
        metric(
            &lab,
            "cu",
            CU_METRICS,
            "pon_cu_leaves_total{reason=\"not_back_after_restart\"}"
        ),
        0
    );
}

#[test]
fn intruders_are_refused_with_a_clear_error() {
    require_root();
    let lab = Lab::up(&sites(&THREE_SITES[..2]));
    wait_overlay_up(&lab);
    let dir = lab.state_dir();
    std::fs::write(dir.join("bad-token"), "not-the-token\n").unwrap();
    let other = dir.join("other-ca");
    let init = std::process::Command::new(bin_dir().join("pon-cu"))
        .args(["init", "--dir"])
        .arg(&other)
        .output()
        .unwrap();
    assert!(init.status.success(), "{}", text(&init));

    // ponctl: an agent's own certificate is no admin credential, and a
    // CU certificate of another CA is not trusted.
    let cu = dir.join("cu");
    let tokyo = lab.agent_state("tokyo/proxy", "pon-forwarder");
    let out = lab.ponctl_with(
        &cu.join("ca.pem"),
        &tokyo.join("cert.pem"),
        &tokyo.join("tls.key"),
        &["revoke", "paris/198.18.1.1"],
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("needs the CU's admin certificate"),
        "{err}"
    );
    let out = lab.ponctl_with(
        &other.join("ca.pem"),
        &cu.join("admin.pem"),
        &cu.join("admin.key"),
        &[],
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("invalid peer certificate"),
        "{err}"
    );

    // Forwarders that have not enrolled yet (fresh state directories) with
    // a wrong token, an app VM's token, trusting another CA, claiming
    // tokyo's enrolled name with another key, an address tokyo's proxy
    // holds, or an address outside their cloud's grant: each stops with a
    // clear error instead of retrying forever, and nothing of it reaches
    // the other agents.
    let cfg = std::fs::read_to_string(dir.join("configs/tokyo-proxy-pon-forwarder.toml")).unwrap();
    let s = |p: &std::path::Path| p.to_str().unwrap().to_string();
    let token = s(&cu.join("tokens/tokyo-proxy"));
    let state = s(&tokyo);
    // Another process on tokyo's proxy host: its own ports, no metrics.
    let beside = |c: &str, name: &str| {
        let c = c
            .replace("198.18.2.1:7300", "198.18.2.1:7399")
            .replace("[cu]\n", &format!("[cu]\nname = \"{name}\"\n"));
        let c: String = c
            .lines()
            .filter(|l| !l.starts_with("metrics = "))
            .map(|l| format!("{l}\n"))
            .collect();
        format!("agent_udp_port = 0\n{c}")
    };
    // Beside tokyo's running forwarder first (the address it holds), then
    // in its place (its ports, its name) while it is stopped.
    let cases = [
        (
            "held-address",
            beside(&cfg, "thief"),
            "address 198.18.2.1 is held by tokyo/198.18.2.1",
        ),
        (
            "outside-grant",
            beside(&cfg, "thief2")
                .replace("cloud = \"tokyo\"", "cloud = \"paris\"")
                .replace(&token, &s(&cu.join("tokens/paris-proxy"))),
            "198.18.2.1 is outside cloud paris's grant (198.18.1.0/24)",
        ),
        (
            "bad-token",
            cfg.replace(&token, &s(&dir.join("bad-token"))),
            "wrong join token",
        ),
        (
            "app-token",
            cfg.replace(&token, &s(&cu.join("tokens/tokyo-app"))),
            "may enrol role APP, not PROXY",
        ),
        (
            "bad-ca",
            cfg.replace(&s(&cu.join("ca.pem")), &s(&other.join("ca.pem"))),
            "TLS handshake with the CU",
        ),
        (
            "stolen-name",
            cfg.clone(),
            "tokyo/198.18.2.1 is bound to another key",
        ),
    ];
    for (name, bad, expect) in cases {
        let fresh = s(&dir.join(format!("state-{name}")));
        let path = dir.join(format!("{name}.toml"));
        std::fs::write(&path, bad.replace(&state, &fresh)).unwrap();
        if name == "bad-token" {
            lab.ctl("stop", &["tokyo/proxy"]);
        }
        let out = lab.run_daemon("tokyo/proxy", "pon-forwarder", path.to_str().unwrap(), 30);
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{name}: {err}");
        assert!(err.contains(expect), "{name}: {err}");
    }
    lab.ctl("start", &["tokyo/proxy"]);
    for reason in [
        "bad_token",
        "token_scope",
        "name_bound_to_another_key",
        "address_held",
        "outside_grant",
    ] {
        assert_eq!(
            metric(
                &lab,
                "cu",
                CU_METRICS,
                &format!("pon_cu_refused_total{{reason=\"{reason}\"}}")
            ),
            1,
            "{reason}"
        );
    }
    // The CU and its agents carried on.
    wait_overlay_up(&lab);
    assert_eq!(
        metric(&lab, "cu", CU_METRICS, "pon_cu_agents{state=\"online\"}"),
        4
    );

    // A running agent is another matter: it forwards on its view, so a
    // refusal is retried with backoff and reported, never a reason to stop.
    // Here the CU comes back with its grants narrowed by mistake, so that
    // no agent's address is in them any more (a join token plays no part
    // once an agent has enrolled), then with the right ones again.
    let before = agent_pids(&lab);
    let cu_toml = dir.join("configs/cu-pon-cu.toml");
    let kept = std::fs::read_to_string(&cu_toml).unwrap();
    let narrowed = kept
        .replace("198.18.1.0/24", "198.18.201.0/24")
        .replace("198.18.2.0/24", "198.18.202.0/24");
    assert!(
        !narrowed.contains("198.18.1.0/24") && !narrowed.contains("198.18.2.0/24"),
        "{narrowed}"
    );
    while_pinging(&lab, || {
        std::fs::write(&cu_toml, &narrowed).unwrap();
        lab.ctl("stop", &["cu"]);
        lab.ctl("start", &["cu"]);
        let took = wait_failures(&lab, "refused", Duration::from_secs(30));
        eprintln!(
            "every agent refused {:.1} s after the CU's restart",
            took.as_secs_f64()
        );
        std::fs::write(&cu_toml, &kept).unwrap();
        lab.ctl("stop", &["cu"]);
        lab.ctl("start", &["cu"]);
        wait_registered(&lab, 4, Duration::from_secs(30));
    });
    assert_eq!(agent_pids(&lab), before, "an agent restarted");
}

#[test]
fn a_running_proxy_and_ta_keep_forwarding_while_their_cu_is_gone_or_an_impostor() {
    require_root();
    // pon-proxy (the router's topology), so the whole proxy is covered;
    // the test above covers pon-forwarder.
    let lab = Lab::up(&format!("routing = true\n{}", sites(&THREE_SITES[..2])));
    wait_registered(&lab, 4, Duration::from_secs(20));
    wait_overlay_up(&lab);
    let before = agent_pids(&lab);
    // An impostor's CU: the same name and address in its certificate, but
    // signed by another CA (a path attacker, or a CA rotation the agents
    // have not had).
    let dir = lab.state_dir();
    let (cu, impostor) = (dir.join("cu"), dir.join("impostor"));
    let init = std::process::Command::new(bin_dir().join("pon-cu"))
        .args(["init", "--ip", "198.18.250.1", "--dir"])
        .arg(&impostor)
        .output()
        .unwrap();
    assert!(init.status.success(), "{}", text(&init));
    let use_cert = |from: &std::path::Path| {
        for f in ["cu.pem", "cu.key"] {
            std::fs::copy(from.join(f), cu.join(f)).unwrap();
        }
    };
    let kept = dir.join("kept");
    std::fs::create_dir_all(&kept).unwrap();
    for f in ["cu.pem", "cu.key"] {
        std::fs::copy(cu.join(f), kept.join(f)).unwrap();
    }

    while_pinging(&lab, || {
        // The CU stops: every agent notices (QUIC idle timeout) and retries.
        lab.ctl("stop", &["cu"]);
        let took = wait_failures(&lab, "timeout", Duration::from_secs(15));
        eprintln!(
            "every agent noticed the CU gone after {:.1} s",
            took.as_secs_f64()
        );
        assert_eq!(
            metric(&lab, "paris/proxy", PARIS_FWD, "pon_cu_client_registered"),
            0
        );
        // The TA may have been the last to notice, an instant ago: its
        // time out of contact grows from there (it stays 0 while
        // registered).
        assert!(wait_until(Duration::from_secs(5), || metric(
            &lab,
            "paris/app1",
            PARIS_TA,
            "pon_cu_client_seconds_since_contact"
        ) >= 1));
        // The impostor answers: every handshake fails, and nobody stops.
        use_cert(&impostor);
        lab.ctl("start", &["cu"]);
        let took = wait_failures(&lab, "tls", Duration::from_secs(20));
        eprintln!(
            "every agent failed the impostor's handshake {:.1} s after it started",
            took.as_secs_f64()
        );
        assert_eq!(agent_pids(&lab), before, "an agent stopped");
        // The real CU is back: everyone registers again.
        lab.ctl("stop", &["cu"]);
        use_cert(&kept);
        lab.ctl("start", &["cu"]);
        let t = Instant::now();
        wait_registered(&lab, 4, Duration::from_secs(30));
        assert!(wait_until(Duration::from_secs(10), || AGENTS.iter().all(
            |(h, a)| metric(&lab, h, a, "pon_cu_client_registered") == 1
        )));
        eprintln!(
            "every agent registered again {:.1} s after the real CU started",
            t.elapsed().as_secs_f64()
        );
    });
    assert_eq!(agent_pids(&lab), before, "an agent restarted");
    assert_eq!(
        metric(
            &lab,
            "paris/proxy",
            PARIS_FWD,
            "pon_cu_client_seconds_since_contact"
        ),
        0
    );
}

#[test]
fn a_revoked_proxy_is_gone_from_every_peer_at_once_and_stays_out() {
    require_root();
    let lab = three_sites();
    assert!(wait_until(Duration::from_secs(20), || {
        peers(&lab, "paris/proxy", PARIS_FWD) == 2 && peers(&lab, "tokyo/proxy", TOKYO_FWD) == 2
    }));
    let london_pids = || {
        pids(&lab)
            .into_iter()
            .filter(|(h, _)| h == "london/proxy")
            .collect::<Vec<_>>()
    };
    let london = london_pids();
    let revoked = Instant::now();
    let out = lab.ponctl(&["revoke", "london/198.18.3.1"]);
    assert!(out.status.success(), "ponctl revoke: {}", text(&out));
    assert!(text(&out).contains("revoked (id 3"), "{}", text(&out));
    assert!(
        wait_until(Duration::from_secs(1), || {
            peers(&lab, "paris/proxy", PARIS_FWD) == 1 && peers(&lab, "tokyo/proxy", TOKYO_FWD) == 1
        }),
        "london still in a peer's table 1 s after its revocation"
    );
    eprintln!(
        "london out of every peer's table {:.0} ms after ponctl revoke",
        revoked.elapsed().as_secs_f64() * 1e3
    );
    // Its forwarder keeps its key and certificate; the CU refuses them.
    assert!(wait_until(Duration::from_secs(10), || metric(
        &lab,
        "cu",
        CU_METRICS,
        "pon_cu_refused_total{reason=\"revoked\"}"
    ) >= 1));
    let reg = registry(&lab);
    assert_eq!(
        reg[&("london".to_string(), "198.18.3.1".to_string())],
        (3, false)
    );
    assert_eq!(
        metric(
            &lab,
            "cu",
            CU_METRICS,
            "pon_cu_leaves_total{reason=\"revoked\"}"
        ),
        1
    );
    assert_eq!(peers(&lab, "paris/proxy", PARIS_FWD), 1);
    // The revoked forwarder itself keeps running (nothing the CU says stops
    // a running agent), refused at every attempt: its peers dropping it is
    // what keeps it out.
    assert!(wait_until(Duration::from_secs(10), || failures(
        &lab,
        "london/proxy",
        LONDON_FWD,
        "refused"
    ) >= 1));
    assert_eq!(london_pids(), london, "the revoked forwarder stopped");
}

/// A process started in a lab host, killed (and reaped) when the test ends,
/// also when it panics.
struct Spawned(std::process::Child);

impl Drop for Spawned {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn a_ta_follows_the_forwarder_the_cu_names() {
    require_root();
    let lab = three_sites();
    wait_overlay_up(&lab);
    // A second forwarder for paris, on another address of the proxy host
    // and asking for another id; the CU names it to paris's TA once the
    // first one is gone.
    let configs = lab.state_dir().join("configs");
    let first = std::fs::read_to_string(configs.join("paris-proxy-pon-forwarder.toml"))
        .expect("paris's forwarder config");
    // Its own identity: a key is never shared by two agents.
    let second = first
        .replace("198.18.1.1", "198.18.1.2")
        .replacen("id = 1\n", "id = 11\n", 1)
        .replace(
            "paris-proxy-pon-forwarder\"",
            "paris-proxy-second-forwarder\"",
        );
    assert!(second.contains("id = 11\n") && second.contains("198.18.1.2:7300"));
    let file = configs.join("paris-proxy-second-forwarder.toml");
    std::fs::write(&file, second).unwrap();

    lab.ctl("stop", &["paris/proxy"]);
    assert!(
        wait_until(LEAVE_BOUND, || peers(&lab, "tokyo/proxy", TOKYO_FWD) == 1),
        "paris's forwarder was not announced as gone"
    );
    // The old forwarder's address goes with it: a raw IP-in-IP socket takes
    // protocol-4 packets to any local address, so with 198.18.1.1 still
    // here the new forwarder would get packets sent to the old one.
    for cmd in [
        "addr del 198.18.1.1/24 dev eth0",
        "addr add 198.18.1.2/24 dev eth0",
        "route replace default via 198.18.1.254 dev eth0",
    ] {
        let mut args = vec!["ip"];
        args.extend(cmd.split(' '));
        lab.exec_ok("paris/proxy", &args);
    }
    let bin = bin_dir().join("pon-forwarder");
    let _second = Spawned(lab.spawn(
        "paris/proxy",
        &[bin.to_str().unwrap(), "--config", file.to_str().unwrap()],
    ));
    let named = Instant::now();

    // Paris's TA now sends to the new forwarder, which carries its packets
    // to tokyo.
    let ingress = "pon_forwarder_packets_total{stage=\"ingress\"}";
    let egress = "pon_forwarder_packets_total{stage=\"egress\"}";
    let tokyo_before = metric(&lab, "tokyo/proxy", TOKYO_FWD, egress);
    assert!(
        wait_until(Duration::from_secs(15), || {
            let _ = lab.exec("paris/app1", &["ping", "-c", "1", "-W", "1", TOKYO_APP]);
            metric(&lab, "paris/proxy", "198.18.1.2:9100", ingress) > 0
        }),
        "paris's TA never sent to the forwarder the CU named"
    );
    let followed = named.elapsed();
    assert!(
        metric(&lab, "tokyo/proxy", TOKYO_FWD, egress) > tokyo_before,
        "tokyo delivered nothing from the new forwarder"
    );
    eprintln!(
        "paris's TA sent through the new forwarder {:.1} s after it started",
        followed.as_secs_f64()
    );
    // And the replies come back through it: paris's RA takes packets from
    // the proxies the CU names for its site (pon-agent gives its RA the
    // TA's view), not only from the address it was configured with.
    let back = || metric(&lab, "paris/proxy", "198.18.1.2:9100", egress);
    let before = back();
    assert!(
        wait_until(Duration::from_secs(10), || lab
            .ping_ok("paris/app1", TOKYO_APP)
            && back() > before),
        "no reply came back through the new forwarder"
    );
}

#[test]
fn agents_reach_the_cu_by_name_and_try_the_next_name_when_one_does_not_resolve() {
    require_root();
    // Every agent's [cu] addr lists a name nobody resolves, then the CU's.
    let lab = Lab::up(&format!(
        "cu_names = [\"gone.pon.lab\", \"cu.pon.lab\"]\n{}",
        sites(&THREE_SITES[..2])
    ));
    wait_registered(&lab, 4, Duration::from_secs(30));
    wait_overlay_up(&lab);
    for (host, addr) in AGENTS {
        assert_eq!(
            metric(&lab, host, addr, "pon_cu_client_registered"),
            1,
            "{host}"
        );
        assert!(
            metric(
                &lab,
                host,
                addr,
                "pon_cu_client_connect_failures_total{reason=\"resolve\"}"
            ) >= 1,
            "{host} never tried the name that does not resolve"
        );
    }
    // The agents were given names, not the CU's address.
    let cfg = std::fs::read_to_string(
        lab.state_dir()
            .join("configs/paris-proxy-pon-forwarder.toml"),
    )
    .unwrap();
    assert!(
        cfg.contains("\"gone.pon.lab:7400\"")
            && cfg.contains("\"cu.pon.lab:7400\"")
            && !cfg.contains("198.18.250.1"),
        "{cfg}"
    );
}
