//! Monitoring end to end: the Grafana dashboard against what the daemons
//! really export, the CU's site-by-site matrix and event stream (`ponctl
//! matrix`, `ponctl watch`) across a link cut, and the CU's live web view
//! rendered in headless Chromium.

use pon_e2e::{link, repo_root, require_root, sites, wait_until, Lab};
use std::collections::BTreeSet;
use std::time::Duration;

const CU_METRICS: (&str, &str) = ("cu", "198.18.250.1:9200");
/// Paris's proxy's own PMon listener (`proxy_pmon = true`).
const PARIS_PMON: &str = "198.18.1.1:7401";

/// paris-tokyo slow (150 ms RTT), through london fast (2 x 30 ms RTT): the
/// routers pick london as the relay of paris <-> tokyo.
fn triangle() -> String {
    format!(
        "routing = {{ policy = \"latency\" }}\n{}{}{}{}",
        sites(&["paris", "tokyo", "london"]),
        link("paris", "tokyo", "delay_ms = 75"),
        link("paris", "london", "delay_ms = 15"),
        link("london", "tokyo", "delay_ms = 15"),
    )
}

/// The metric names a PromQL expression reads: identifiers outside label
/// matchers (`{...}`), ranges (`[...]`) and grouping clauses (`by (...)`),
/// that are neither functions (followed by `(`) nor keywords.
fn promql_metrics(expr: &str) -> Vec<String> {
    const KEYWORDS: [&str; 11] = [
        "by",
        "without",
        "on",
        "ignoring",
        "group_left",
        "group_right",
        "bool",
        "and",
        "or",
        "unless",
        "offset",
    ];
    // Aggregations may take their grouping before the parenthesis.
    const AGGREGATIONS: [&str; 12] = [
        "sum",
        "min",
        "max",
        "avg",
        "group",
        "stddev",
        "stdvar",
        "count",
        "count_values",
        "bottomk",
        "topk",
        "quantile",
    ];
    let b = expr.as_bytes();
    let mut out = Vec::new();
    let mut i = 0;
    let mut skip_group = false;
    while i < b.len() {
        let c = b[i];
        if c == b'{' || c == b'[' || (c == b'(' && skip_group) {
            let close = match c {
                b'{' => b'}',
                b'[' => b']',
                _ => b')',
            };
            skip_group = false;
            while i < b.len() && b[i] != close {
                if b[i] == b'"' {
                    i += 1;
                    while i < b.len() && b[i] != b'"' {
                        i += if b[i] == b'\\' { 2 } else { 1 };
                    }
                }
                i += 1;
            }
            i += 1;
            continue;
        }
        if c.is_ascii_digit() {
            while i < b.len() && (b[i].is_ascii_alphanumeric() || b[i] == b'.') {
                i += 1;
            }
            continue;
        }
        if c.is_ascii_alphabetic() || c == b'_' || c == b':' {
            let start = i;
            while i < b.len() && (b[i].is_ascii_alphanumeric() || b[i] == b'_' || b[i] == b':') {
                i += 1;
            }
            let word = &expr[start..i];
            let next = expr[i..].trim_start().bytes().next();
            if KEYWORDS.contains(&word) || AGGREGATIONS.contains(&word) {
                skip_group = matches!(word, "by" | "without" | "on" | "ignoring");
            } else if next != Some(b'(') {
                out.push(word.to_string());
            }
            continue;
        }
        i += 1;
    }
    out
}

#[test]
fn promql_metric_names_are_extracted() {
    assert_eq!(
        promql_metrics(
            "sum by (instance, stage) (rate(pon_forwarder_packets_total{stage=~\"in.*\"}[1m])) / \
             clamp_min(sum without (x) (pon_a:b), 1) * 60 + count(pon_c == 0) offset 5m"
        ),
        ["pon_forwarder_packets_total", "pon_a:b", "pon_c"]
    );
}

/// Every expression of the dashboard.
fn dashboard_exprs() -> Vec<String> {
    let path = repo_root().join("packaging/grafana/pon.json");
    let text = std::fs::read_to_string(&path).expect("read the dashboard");
    let d: serde_json::Value = serde_json::from_str(&text).expect("the dashboard is JSON");
    let mut exprs = Vec::new();
    let mut panels: Vec<&serde_json::Value> = d["panels"].as_array().unwrap().iter().collect();
    while let Some(p) = panels.pop() {
        panels.extend(p["panels"].as_array().into_iter().flatten());
        for t in p["targets"].as_array().into_iter().flatten() {
            exprs.push(t["expr"].as_str().expect("a target's expr").to_string());
        }
    }
    exprs
}

/// The metric names on a Prometheus text page.
fn exported(page: &str) -> BTreeSet<String> {
    page.lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
        .filter_map(|l| l.split(['{', ' ']).next())
        .map(String::from)
        .collect()
}

#[test]
fn the_grafana_dashboard_queries_only_metrics_the_daemons_export() {
    require_root();
    let wanted: BTreeSet<String> = dashboard_exprs()
        .iter()
        .flat_map(|e| promql_metrics(e))
        .collect();
    assert!(wanted.len() > 20, "too few metrics found: {wanted:?}");
    let lab = Lab::up(&triangle());
    // Every daemon kind of a deployment: the CU, pon-proxy on each site,
    // pon-agent on each app VM.
    let mut targets = vec![CU_METRICS];
    let hosts: Vec<(String, String)> = (1..=3)
        .flat_map(|i| {
            let site = ["paris", "tokyo", "london"][i - 1];
            [
                (format!("{site}/proxy"), format!("198.18.{i}.1:9100")),
                (format!("{site}/app1"), format!("198.18.{i}.11:9105")),
            ]
        })
        .collect();
    targets.extend(hosts.iter().map(|(h, a)| (h.as_str(), a.as_str())));
    // Gauges of routes appear once the routers have picked them.
    let mut missing = wanted.clone();
    let ok = wait_until(Duration::from_secs(60), || {
        let mut seen = BTreeSet::new();
        for (host, addr) in &targets {
            let out = lab.exec(
                host,
                &["curl", "-sf", "-m", "5", &format!("http://{addr}/metrics")],
            );
            seen.extend(exported(&String::from_utf8_lossy(&out.stdout)));
        }
        missing = wanted.difference(&seen).cloned().collect();
        missing.is_empty()
    });
    assert!(
        ok,
        "the dashboard queries metrics no daemon exports: {missing:?}"
    );
    println!(
        "dashboard: {} expressions, {} metrics, all exported by the lab's daemons",
        dashboard_exprs().len(),
        wanted.len()
    );
}

/// `ponctl matrix --json`, parsed (Null when it fails, e.g. while starting).
fn matrix(lab: &Lab) -> serde_json::Value {
    let out = lab.ponctl(&["--json", "matrix"]);
    serde_json::from_slice(&out.stdout).unwrap_or_default()
}

/// The matrix's cell for `from` -> `to`.
fn cell(m: &serde_json::Value, from: &str, to: &str) -> serde_json::Value {
    m["cells"]
        .as_array()
        .and_then(|c| c.iter().find(|c| c["from"] == from && c["to"] == to))
        .cloned()
        .unwrap_or_default()
}

/// Whether the pair's current route is reachable and relayed through `via`
/// (sites; empty: direct).
fn routed(m: &serde_json::Value, from: &str, to: &str, via: &[&str]) -> bool {
    let c = cell(m, from, to);
    c["reachable"] == true && c["via"] == serde_json::json!(via)
}

/// Waits until every ordered pair of the three sites is reported and
/// paris <-> tokyo goes through london.
fn wait_for_relayed_matrix(lab: &Lab) -> serde_json::Value {
    let mut m = serde_json::Value::Null;
    let ok = wait_until(Duration::from_secs(60), || {
        m = matrix(lab);
        let cells = m["cells"].as_array().map_or(0, |c| c.len());
        let reported = m["cells"]
            .as_array()
            .is_some_and(|c| c.iter().all(|c| c["reported"] == true));
        cells == 6
            && reported
            && routed(&m, "paris", "tokyo", &["london"])
            && routed(&m, "tokyo", "paris", &["london"])
    });
    assert!(
        ok,
        "the matrix never showed the relay through london:\n{m:#}"
    );
    m
}

/// Unix time in ms of a log line's RFC 3339 timestamp
/// (`2026-11-30T02:41:28.123456Z ...`, possibly behind colour codes).
fn log_time_ms(line: &str) -> Option<u64> {
    let line = strip_ansi(line);
    let start = line.find(|c: char| c.is_ascii_digit())?;
    let ts = line[start..].split_whitespace().next()?;
    let ts = ts.trim_end_matches(|c: char| !c.is_ascii_digit());
    let (date, time) = ts.split_once('T')?;
    let d: Vec<i64> = date
        .split('-')
        .map(|x| x.parse().ok())
        .collect::<Option<_>>()?;
    let (hms, frac) = time.split_once('.').unwrap_or((time, "0"));
    let t: Vec<i64> = hms
        .split(':')
        .map(|x| x.parse().ok())
        .collect::<Option<_>>()?;
    let ms: i64 = format!("{frac:0<3}")[..3].parse().ok()?;
    // Days from the civil date (Howard Hinnant's algorithm).
    let (y, m) = if d[1] <= 2 {
        (d[0] - 1, d[1] + 9)
    } else {
        (d[0], d[1] - 3)
    };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let doy = (153 * m + 2) / 5 + d[2] - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    Some((((days * 24 + t[0]) * 60 + t[1]) * 60 + t[2]) as u64 * 1000 + ms as u64)
}

#[test]
fn log_timestamps_read_as_unix_ms() {
    assert_eq!(
        log_time_ms(
            "\u{1b}[2m2026-11-30T02:41:28.123456Z\u{1b}[0m \u{1b}[32m INFO\u{1b}[0m route changed"
        ),
        Some(1_796_006_488_123)
    );
    assert_eq!(log_time_ms("1970-01-01T00:00:01Z x"), Some(1000));
}

/// When `proxy`'s router last logged a line containing all of `needles`
/// (Unix ms), from the lab's log of its pon-proxy.
fn decided_at(lab: &Lab, site: &str, needles: &[&str]) -> Option<u64> {
    let log = lab
        .state_dir()
        .join(format!("logs/{site}-proxy-pon-proxy.log"));
    let text = strip_ansi(&std::fs::read_to_string(log).ok()?);
    text.lines()
        .filter(|l| needles.iter().all(|n| l.contains(n)))
        .filter_map(log_time_ms)
        .next_back()
}

/// `text` without terminal colour codes (`ESC [ ... m`).
fn strip_ansi(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut it = text.chars();
    while let Some(c) = it.next() {
        if c == '\u{1b}' {
            for d in it.by_ref() {
                if d.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// Lines of `ponctl watch --json` as they arrive, with when (Unix ms).
struct Watch {
    child: std::process::Child,
    lines: std::sync::mpsc::Receiver<(u64, serde_json::Value)>,
    seen: Vec<(u64, serde_json::Value)>,
}

impl Watch {
    fn start(lab: &Lab, extra: &[&str]) -> Watch {
        let ponctl = pon_e2e::bin_dir().join("ponctl");
        let c = lab.state_dir().join("cu");
        let path = |f: &str| c.join(f).to_str().unwrap().to_string();
        let mut args = vec![
            ponctl.to_str().unwrap().to_string(),
            "--cu".into(),
            "198.18.250.1:7400".into(),
            "--ca".into(),
            path("ca.pem"),
            "--cert".into(),
            path("admin.pem"),
            "--key".into(),
            path("admin.key"),
            "--json".into(),
            "watch".into(),
        ];
        args.extend(extra.iter().map(|s| s.to_string()));
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let mut child = lab.spawn("cu", &args);
        let stdout = child.stdout.take().expect("piped stdout");
        let (tx, lines) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            use std::io::BufRead;
            for line in std::io::BufReader::new(stdout)
                .lines()
                .map_while(Result::ok)
            {
                if let Ok(v) = serde_json::from_str(&line) {
                    if tx.send((now_ms(), v)).is_err() {
                        return;
                    }
                }
            }
        });
        Watch {
            child,
            lines,
            seen: Vec::new(),
        }
    }

    /// Waits (bounded) for a line `pick` accepts; returns it with when it came.
    fn wait_for(
        &mut self,
        what: &str,
        pick: impl Fn(&serde_json::Value) -> bool,
    ) -> (u64, serde_json::Value) {
        self.wait_for_nth(what, 1, pick)
    }

    /// Waits (bounded) for the `n`th line `pick` accepts.
    fn wait_for_nth(
        &mut self,
        what: &str,
        n: usize,
        pick: impl Fn(&serde_json::Value) -> bool,
    ) -> (u64, serde_json::Value) {
        let end = std::time::Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(hit) = self.seen.iter().filter(|(_, v)| pick(v)).nth(n - 1) {
                return hit.clone();
            }
            let left = end.saturating_duration_since(std::time::Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(l) => self.seen.push(l),
                Err(_) => panic!(
                    "ponctl watch never showed {what}; it showed:\n{:#?}",
                    self.seen
                ),
            }
        }
    }
}

impl Drop for Watch {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Checks that ponctl watch showed paris -> tokyo's `what` (at `seen`,
/// Unix ms) within a second of paris's router logging `logged` for it.
fn shown_within_a_second(lab: &Lab, seen: u64, what: &str, logged: &str) {
    let decided = decided_at(lab, "paris", &[logged, "dst=2"])
        .unwrap_or_else(|| panic!("paris's router never logged {logged:?}"));
    let lag = seen as i64 - decided as i64;
    println!("{what} paris -> tokyo: in ponctl watch {lag} ms after paris's router decided");
    assert!(lag <= 1000, "{what} shown {lag} ms after the decision");
}

/// Whether the watch line is an event of `kind` for `from` -> `to`; its
/// kind is `"unreachable"` or `{"route_changed": {...}}`.
fn event_is(v: &serde_json::Value, kind: &str, from: &str, to: &str) -> bool {
    let e = &v["event"];
    let named = e["kind"] == kind || e["kind"].get(kind).is_some();
    named && e["from"] == from && e["to"] == to
}

#[test]
fn ponctl_watch_shows_a_link_cut_within_a_second_of_the_routers_decision() {
    require_root();
    let lab = Lab::up(&triangle());
    let m = wait_for_relayed_matrix(&lab);
    // Every pair has a current route and its measurements.
    for c in m["cells"].as_array().unwrap() {
        assert!(c["figures"]["rtt_us"].as_u64().is_some(), "no RTT in {c}");
    }
    let rtt = |from, to| cell(&m, from, to)["figures"]["rtt_us"].as_u64().unwrap() as f64 / 1000.0;
    println!(
        "matrix: 6 pairs; paris -> tokyo via london {:.1} ms, paris -> london {:.1} ms",
        rtt("paris", "tokyo"),
        rtt("paris", "london")
    );
    let mut watch = Watch::start(&lab, &[]);
    watch.wait_for("the matrix first", |v| v.get("matrix").is_some());

    // The relay's first leg goes: paris -> tokyo falls back to the direct path.
    lab.impair_ok(&["paris", "london", "--down"]);
    let (seen, e) = watch.wait_for("paris -> tokyo's route change", |v| {
        event_is(v, "route_changed", "paris", "tokyo")
            && v["event"]["kind"]["route_changed"]["after_via"] == serde_json::json!([])
    });
    assert_eq!(
        e["event"]["kind"]["route_changed"]["before_via"],
        serde_json::json!(["london"]),
        "{e}"
    );
    shown_within_a_second(&lab, seen, "route change", "route changed");

    // Tokyo cut off from both: unreachable, then reachable again.
    lab.impair_ok(&["paris", "tokyo", "--down"]);
    lab.impair_ok(&["london", "tokyo", "--down"]);
    let (seen, _) = watch.wait_for("paris -> tokyo unreachable", |v| {
        event_is(v, "unreachable", "paris", "tokyo")
    });
    shown_within_a_second(&lab, seen, "unreachable", "no overlay path works");
    lab.impair_ok(&["paris", "tokyo", "--up"]);
    lab.impair_ok(&["london", "tokyo", "--up"]);
    let (seen, _) = watch.wait_for("paris -> tokyo reachable again", |v| {
        event_is(v, "reachable", "paris", "tokyo")
    });
    shown_within_a_second(&lab, seen, "reachable", "reachable over the overlay");

    // The matrix says it too, for every pair.
    let m = matrix(&lab);
    assert_eq!(m["cells"].as_array().map(|c| c.len()), Some(6), "{m:#}");
    assert!(cell(&m, "london", "tokyo")["reported"] == true, "{m:#}");
    // A pair filter: only paris -> tokyo.
    let out = lab.ponctl(&["--json", "matrix", "--from", "paris", "--to", "tokyo"]);
    let one: serde_json::Value = serde_json::from_slice(&out.stdout).expect("matrix --json");
    assert_eq!(one["cells"].as_array().map(|c| c.len()), Some(1), "{one:#}");
    // And the text table names every pair.
    let table = String::from_utf8_lossy(&lab.ponctl(&["matrix"]).stdout).into_owned();
    assert_eq!(table.lines().count(), 7, "{table}");
    println!("{table}");
}

/// Split proxies (pon-forwarder + pon-monitor + pon-router on every
/// proxy host): each router's report crosses the local link to its
/// forwarder, whose CU client offers it, so the matrix has every pair with
/// its route (relays and all) and RTT, as with pon-proxy.
#[test]
fn split_proxies_report_their_routes_to_the_cus_matrix() {
    require_root();
    let lab = Lab::up(&format!("split = true\n{}", triangle()));
    let start = std::time::Instant::now();
    let m = wait_for_relayed_matrix(&lab);
    let took = start.elapsed();
    for c in m["cells"].as_array().unwrap() {
        let route = c["route"].as_array().map_or(0, |r| r.len());
        assert!(
            c["reported"] == true && c["reachable"] == true && route > 0,
            "{c}"
        );
        assert!(c["figures"]["rtt_us"].as_u64().is_some(), "no RTT in {c}");
    }
    // Every forwarder passed its router's reports on, and dropped none.
    let mut passed = Vec::new();
    for i in 1..=3 {
        let (host, addr) = (
            format!("{}/proxy", ["paris", "tokyo", "london"][i - 1]),
            format!("198.18.{i}.1:9100"),
        );
        let page = lab.metrics(&host, &addr);
        let dropped: Vec<&str> = page
            .lines()
            .filter(|l| l.starts_with("pon_proxy_pmon_drops_total") && !l.ends_with(" 0"))
            .collect();
        assert!(dropped.is_empty(), "{host}: {dropped:?}");
        passed.push(pon_e2e::metric_value(&page, "pon_proxy_pmon_reports_total"));
    }
    assert!(
        passed.iter().all(|&n| n > 0),
        "reports passed on: {passed:?}"
    );
    let rtt = |from, to| cell(&m, from, to)["figures"]["rtt_us"].as_u64().unwrap() as f64 / 1000.0;
    println!(
        "split proxies: all 6 pairs reported {:.1} s after the lab was up; paris -> tokyo via \
         london {:.1} ms; reports passed on by the forwarders: {passed:?}",
        took.as_secs_f64(),
        rtt("paris", "tokyo"),
    );
}

/// A watcher's own threshold, metrics and schedule, against the CU; and
/// the same protocol served by one proxy: its row of the matrix, for the
/// admin credential, and nothing for a certificate of another CA.
#[test]
fn ponctl_watches_with_its_own_threshold_and_asks_a_proxy_for_its_row() {
    require_root();
    let lab = Lab::up(&format!("proxy_pmon = true\n{}", triangle()));
    let m = wait_for_relayed_matrix(&lab);
    let global = m["rtt_threshold_us"]
        .as_u64()
        .expect("the CU's RTT threshold");
    let rtt = cell(&m, "paris", "tokyo")["figures"]["rtt_us"]
        .as_u64()
        .unwrap();
    assert!(
        rtt < global,
        "paris -> tokyo {rtt} us is already over the CU's {global} us"
    );

    // (a) An RTT threshold of 40 ms: paris -> tokyo (about 60 ms through
    // london) is above it, while under the CU's own threshold. RTT only,
    // and a snapshot of the pair every 200 ms.
    let mut watch = Watch::start(
        &lab,
        &[
            "--from",
            "paris",
            "--to",
            "tokyo",
            "--rtt-above-ms",
            "40",
            "--metrics",
            "rtt",
            "--every-ms",
            "200",
        ],
    );
    let (_, first) = watch.wait_for("the matrix first", |v| v.get("matrix").is_some());
    assert_eq!(first["matrix"]["rtt_threshold_us"], 40_000, "{first}");
    let (_, e) = watch.wait_for("paris -> tokyo above 40 ms", |v| {
        event_is(v, "above", "paris", "tokyo")
    });
    let above = &e["event"]["kind"]["above"];
    assert_eq!(
        (above["metric"].as_str(), above["threshold"].as_u64()),
        (Some("rtt"), Some(40_000)),
        "{e}"
    );
    let value = above["value"].as_u64().unwrap();
    assert!(
        value > 40_000 && value < global,
        "{e}: the CU's threshold would say nothing"
    );
    println!(
        "own threshold: above 40 ms at {:.1} ms (the CU's threshold is {} ms)",
        value as f64 / 1000.0,
        global / 1000
    );
    // Snapshots keep coming (the RTT barely moves: these are not changes),
    // with only the RTT in them.
    let is_cell = |v: &serde_json::Value| v.get("cell").is_some();
    let (t1, c1) = watch.wait_for_nth("a snapshot", 1, is_cell);
    let (t5, c5) = watch.wait_for_nth("five snapshots", 5, is_cell);
    println!("five snapshots in {} ms (every 200 ms asked)", t5 - t1);
    for c in [&c1, &c5] {
        let f = &c["cell"]["figures"];
        assert!(f["rtt_us"].as_u64().is_some(), "{c}");
        assert!(
            f["jitter_us"].is_null()
                && f["loss_ppm"].is_null()
                && c["cell"]["route"] == serde_json::json!([]),
            "{c}"
        );
    }
    drop(watch);

    // (b) Paris's proxy serves its own row.
    let cu = lab.state_dir().join("cu");
    let (ca, admin, admin_key) = (
        cu.join("ca.pem"),
        cu.join("admin.pem"),
        cu.join("admin.key"),
    );
    let at_paris = |cert: &std::path::Path, key: &std::path::Path, extra: &[&str]| {
        let mut args = vec!["--server-name", "pmon.paris"];
        args.extend_from_slice(extra);
        lab.ponctl_at("paris/proxy", PARIS_PMON, &ca, cert, key, &args)
    };
    let mut row = serde_json::Value::Null;
    let ok = wait_until(Duration::from_secs(30), || {
        let out = at_paris(&admin, &admin_key, &["--json", "matrix"]);
        row = serde_json::from_slice(&out.stdout).unwrap_or_default();
        routed(&row, "paris", "tokyo", &["london"]) && routed(&row, "paris", "london", &[])
    });
    assert!(ok, "paris's proxy never showed its row:\n{row:#}");
    let cells = row["cells"].as_array().unwrap();
    assert_eq!(cells.len(), 2, "{row:#}");
    assert!(
        cells
            .iter()
            .all(|c| c["from"] == "paris" && c["reported"] == true),
        "{row:#}"
    );
    println!(
        "paris's proxy: paris -> tokyo via london {:.1} ms, paris -> london {:.1} ms",
        cell(&row, "paris", "tokyo")["figures"]["rtt_us"]
            .as_f64()
            .unwrap()
            / 1000.0,
        cell(&row, "paris", "london")["figures"]["rtt_us"]
            .as_f64()
            .unwrap()
            / 1000.0
    );

    // A certificate of another CA: refused in the handshake, and counted.
    let foreign = lab.state_dir().join("foreign-ca");
    let init = std::process::Command::new(pon_e2e::bin_dir().join("pon-cu"))
        .args(["init", "--force", "--dir"])
        .arg(&foreign)
        .output()
        .expect("pon-cu init");
    assert!(init.status.success(), "{}", pon_e2e::text(&init));
    let out = at_paris(
        &foreign.join("admin.pem"),
        &foreign.join("admin.key"),
        &["--json", "matrix"],
    );
    assert!(
        !out.status.success(),
        "a foreign certificate got: {}",
        pon_e2e::text(&out)
    );
    assert!(out.stdout.is_empty(), "{}", pon_e2e::text(&out));
    let refused = "pon_proxy_pmon_connections_refused_total{reason=\"handshake\"}";
    assert!(lab.metric("paris/proxy", "198.18.1.1:9100", refused) >= 1);
    println!(
        "foreign certificate refused: {}",
        pon_e2e::text(&out).trim()
    );
}

/// Where test artefacts (screenshots) are kept: beside the binaries.
fn artefacts() -> std::path::PathBuf {
    let dir = pon_e2e::bin_dir()
        .parent()
        .expect("target dir")
        .join("test-artefacts");
    std::fs::create_dir_all(&dir).expect("artefacts dir");
    dir
}

/// One headless Chromium page on the CU's web view, kept open (see
/// `pon-webview`) in the CU's host.
struct Page {
    child: std::process::Child,
    stdin: std::process::ChildStdin,
    stdout: std::io::BufReader<std::process::ChildStdout>,
}

impl Page {
    fn open(lab: &Lab, url: &str) -> Page {
        use std::process::Stdio;
        let bin = pon_e2e::bin_dir().join("pon-webview");
        let mut child = pon_e2e::lab_command()
            .args(["exec", &lab.name, "cu", "--"])
            .arg(bin)
            .arg(url)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .expect("start pon-webview");
        let stdin = child.stdin.take().unwrap();
        let stdout = std::io::BufReader::new(child.stdout.take().unwrap());
        Page {
            child,
            stdin,
            stdout,
        }
    }

    fn ask(&mut self, cmd: &str) -> String {
        use std::io::{BufRead, Write};
        writeln!(self.stdin, "{cmd}").expect("pon-webview is gone");
        let mut line = String::new();
        self.stdout
            .read_line(&mut line)
            .expect("pon-webview answers");
        assert!(!line.is_empty(), "pon-webview ended on {cmd:?}");
        line.trim_end().to_string()
    }

    /// Waits (bounded) until the JavaScript expression holds on the page.
    fn wait(&mut self, what: &str, js: &str) -> u64 {
        let a = self.ask(&format!("wait 30 {js}"));
        let ms = a.strip_prefix("ok ").and_then(|m| m.parse().ok());
        ms.unwrap_or_else(|| {
            panic!(
                "the page never showed {what}: {a}\npage text:\n{}",
                self.ask("eval document.body.innerText")
            )
        })
    }

    fn shot(&mut self, path: &std::path::Path) {
        let a = self.ask(&format!("shot {}", path.display()));
        let bytes: u64 = a
            .strip_prefix("ok ")
            .and_then(|b| b.parse().ok())
            .unwrap_or(0);
        assert!(bytes > 10_000, "no screenshot: {a}");
    }
}

impl Drop for Page {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// JavaScript: the text of the route cell of `from` -> `to` on the page.
fn route_js(from: &str, to: &str) -> String {
    format!("document.querySelector('tr[data-pair=\"{from}>{to}\"] td.via')?.textContent")
}

#[test]
fn the_web_view_shows_sites_and_relays_and_follows_a_cut_in_chromium() {
    require_root();
    let lab = Lab::up(&triangle());
    wait_for_relayed_matrix(&lab);
    let shots = artefacts();
    let mut page = Page::open(&lab, "http://198.18.250.1:9200/");
    // The page draws what the CU pushes: every site, and the relay of the
    // relayed pair (in the table, and as a path on the map).
    let ms = page.wait(
        "paris -> tokyo via london",
        &format!("{} === 'via london'", route_js("paris", "tokyo")),
    );
    println!("relay shown {ms} ms after the page opened");
    for site in ["paris", "tokyo", "london"] {
        page.wait(
            site,
            &format!("document.querySelector('g.site[data-site=\"{site}\"]') !== null"),
        );
    }
    page.wait(
        "the relay path on the map",
        "document.querySelectorAll('polyline.relay-path').length > 0",
    );
    // A mark a reload would wipe: the page must change by itself.
    page.ask("eval window.__ponMark = 42");
    let before = shots.join("pon-web-view-relayed.png");
    page.shot(&before);

    lab.impair_ok(&["paris", "london", "--down"]);
    let ms = page.wait(
        "paris -> tokyo direct after the cut",
        &format!("{} === 'direct'", route_js("paris", "tokyo")),
    );
    page.wait(
        "the route change in the events",
        "document.getElementById('events').textContent.includes('route changed: via london')",
    );
    println!("the page showed the cut {ms} ms after it was made");
    assert_eq!(
        page.ask("eval window.__ponMark"),
        "42",
        "the page was reloaded"
    );
    let after = shots.join("pon-web-view-after-cut.png");
    page.shot(&after);
    println!("screenshots: {} and {}", before.display(), after.display());
}
