//! Harness for end-to-end tests: brings up a lab with `netns-scripts/lab`,
//! runs commands in its hosts, reads daemon metrics, and always tears the lab
//! down (also when a test panics) through `Drop`.
//!
//! Waiting is done by polling a condition until a deadline, never by fixed
//! sleeps, so the tests stay green on a loaded machine.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("workspace root")
        .to_path_buf()
}

/// The directory holding the PON binaries built with this test's profile.
pub fn bin_dir() -> PathBuf {
    if let Ok(dir) = std::env::var("PON_BIN_DIR") {
        return dir.into();
    }
    let exe = std::env::current_exe().expect("test executable path");
    // target/<profile>/deps/<test> -> target/<profile>
    let dir = exe
        .parent()
        .and_then(Path::parent)
        .expect("target dir")
        .to_path_buf();
    for bin in [
        "pon-forwarder",
        "pon-proxy",
        "pon-agent",
        "pon-ta",
        "pon-ra",
        "pon-linkemu",
        "pon-cu",
        "ponctl",
    ] {
        assert!(
            dir.join(bin).exists(),
            "{bin} is not built in {}: run `cargo build --workspace --bins` with the same profile first",
            dir.display()
        );
    }
    dir
}

/// A name no other lab on this machine uses: 8 characters, `[a-z0-9]`.
fn unique_name() -> String {
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let n = NEXT.fetch_add(1, Ordering::Relaxed);
    format!("t{:04x}{:03x}", std::process::id() & 0xffff, n & 0xfff)
}

pub fn lab_command() -> Command {
    Command::new(repo_root().join("netns-scripts/lab"))
}

/// A command's stdout then stderr, for assertions and failure messages.
pub fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

pub struct Lab {
    pub name: String,
    dir: PathBuf,
}

impl Lab {
    /// Brings up a lab from the given topology (TOML text). Panics, after
    /// cleaning up, if it does not come up.
    ///
    /// The lab runs the self-optimising proxy by default; a test topology
    /// that says nothing about `routing` gets static forwarders instead
    /// (`routing = false`): those tests exercise the data plane and the CU
    /// with routes they set, and a router measuring paths meanwhile would
    /// leave traffic to the IP path until it has. Tests of the router say
    /// `routing = ...`.
    pub fn up(topology: &str) -> Lab {
        let says_routing = topology
            .lines()
            .any(|l| l.trim_start().starts_with("routing"));
        let topology = if says_routing {
            topology.to_string()
        } else {
            format!("routing = false\n{topology}")
        };
        let topology = topology.as_str();
        let name = unique_name();
        let dir = std::env::temp_dir().join(format!("pon-e2e-{name}"));
        std::fs::create_dir_all(&dir).expect("temp dir");
        let file = dir.join("topology.toml");
        std::fs::write(&file, topology).expect("write topology");
        let lab = Lab { name, dir };
        let out = lab_command()
            .arg("up")
            .arg(&file)
            .args(["--name", &lab.name, "--bin-dir"])
            .arg(bin_dir())
            .output()
            .expect("run netns-scripts/lab");
        assert!(out.status.success(), "lab up failed:\n{}", text(&out));
        lab
    }

    /// Runs `args` inside `host` (e.g. "paris/app1") and returns its output.
    pub fn exec(&self, host: &str, args: &[&str]) -> Output {
        lab_command()
            .args(["exec", &self.name, host, "--"])
            .args(args)
            .stdin(Stdio::null())
            .output()
            .expect("run lab exec")
    }

    /// Like `exec`, but panics with the output unless the command succeeds.
    pub fn exec_ok(&self, host: &str, args: &[&str]) -> String {
        let out = self.exec(host, args);
        assert!(
            out.status.success(),
            "{host}: {} failed:\n{}",
            args.join(" "),
            text(&out)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Runs `daemon` (a binary of [`bin_dir`]) inside `host` with `--config
    /// config`, for a daemon expected to exit by itself: one still running
    /// after `seconds` is stopped (by `timeout`, whose status then shows).
    pub fn run_daemon(&self, host: &str, daemon: &str, config: &str, seconds: u32) -> Output {
        let bin = bin_dir().join(daemon);
        let limit = seconds.to_string();
        let bin = bin.to_str().expect("UTF-8 path");
        self.exec(host, &["timeout", &limit, bin, "--config", config])
    }

    /// Starts `args` inside `host` in the background.
    pub fn spawn(&self, host: &str, args: &[&str]) -> Child {
        lab_command()
            .args(["exec", &self.name, host, "--"])
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn lab exec")
    }

    /// The Prometheus page of the daemon listening on `addr` in `host`, fetched with curl.
    pub fn metrics(&self, host: &str, addr: &str) -> String {
        self.exec_ok(
            host,
            &["curl", "-sf", "-m", "5", &format!("http://{addr}/metrics")],
        )
    }

    /// One sample (`name{labels}`) of a daemon's metrics; 0 if absent.
    pub fn metric(&self, host: &str, addr: &str, sample: &str) -> u64 {
        metric_value(&self.metrics(host, addr), sample)
    }

    /// Whether one ping from `host` to `dst` gets an answer within a second.
    pub fn ping_ok(&self, host: &str, dst: &str) -> bool {
        self.exec(host, &["ping", "-c", "1", "-W", "1", dst])
            .status
            .success()
    }

    /// Runs `lab impair NAME ARGS...` and returns its output (the caller
    /// checks it: some tests expect it to fail).
    pub fn impair(&self, args: &[&str]) -> Output {
        lab_command()
            .args(["impair", &self.name])
            .args(args)
            .output()
            .expect("run lab impair")
    }

    /// Like `impair`, but panics with the output unless it succeeds.
    pub fn impair_ok(&self, args: &[&str]) {
        let out = self.impair(args);
        assert!(out.status.success(), "impair {args:?}:\n{}", text(&out));
    }

    /// Runs ponctl in the CU's host against the lab's CU, trusting `ca`
    /// and presenting the certificate `cert` with its key `key`.
    pub fn ponctl_with(&self, ca: &Path, cert: &Path, key: &Path, extra: &[&str]) -> Output {
        self.ponctl_at("cu", "198.18.250.1:7400", ca, cert, key, extra)
    }

    /// Runs ponctl inside `host` against the CU at `cu` (a replica, say).
    pub fn ponctl_at(
        &self,
        host: &str,
        cu: &str,
        ca: &Path,
        cert: &Path,
        key: &Path,
        extra: &[&str],
    ) -> Output {
        let ponctl = bin_dir().join("ponctl");
        let mut args = vec![
            ponctl.to_str().expect("UTF-8 path"),
            "--cu",
            cu,
            "--ca",
            ca.to_str().expect("UTF-8 path"),
            "--cert",
            cert.to_str().expect("UTF-8 path"),
            "--key",
            key.to_str().expect("UTF-8 path"),
        ];
        args.extend_from_slice(extra);
        self.exec(host, &args)
    }

    /// Runs ponctl with the lab's own CA and admin credential.
    pub fn ponctl(&self, extra: &[&str]) -> Output {
        self.admin_ponctl("cu", "198.18.250.1:7400", extra)
    }

    /// ponctl with the lab's own CA and admin credential, inside `host`
    /// against the CU at `cu`.
    pub fn admin_ponctl(&self, host: &str, cu: &str, extra: &[&str]) -> Output {
        let dir = self.state_dir().join("cu");
        let (ca, cert, key) = (
            dir.join("ca.pem"),
            dir.join("admin.pem"),
            dir.join("admin.key"),
        );
        self.ponctl_at(host, cu, &ca, &cert, &key, extra)
    }

    /// (cloud, name) -> (id, online) as the CU at `cu` lists its registry
    /// (`ponctl --json`, run inside `host`).
    pub fn registry_on(
        &self,
        host: &str,
        cu: &str,
    ) -> std::collections::BTreeMap<(String, String), (u64, bool)> {
        let out = self.admin_ponctl(host, cu, &["--json"]);
        assert!(out.status.success(), "ponctl on {host}: {}", text(&out));
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("ponctl --json");
        v.as_array()
            .expect("a list of agents")
            .iter()
            .map(|a| {
                let s = |f: &str| a[f].as_str().expect("a string field").to_string();
                (
                    (s("cloud"), s("name")),
                    (
                        a["id"].as_u64().expect("an id"),
                        a["online"].as_bool().expect("online"),
                    ),
                )
            })
            .collect()
    }

    /// The state directory (keys, certificate) of `daemon` on `host`
    /// ("paris/proxy"), as the lab configures it in CU mode.
    pub fn agent_state(&self, host: &str, daemon: &str) -> PathBuf {
        self.state_dir()
            .join("state")
            .join(format!("{}-{daemon}", host.replace('/', "-")))
    }

    pub fn status_json(&self) -> serde_json::Value {
        let out = lab_command()
            .args(["status", &self.name, "--json"])
            .output()
            .expect("lab status");
        assert!(out.status.success(), "lab status failed:\n{}", text(&out));
        serde_json::from_slice(&out.stdout).expect("status --json is JSON")
    }

    /// Runs `lab CMD NAME ARGS...` (e.g. `stop`, `start`, `add-site`) and
    /// panics with its output unless it succeeds.
    pub fn ctl(&self, cmd: &str, args: &[&str]) -> String {
        let out = lab_command()
            .args([cmd, &self.name])
            .args(args)
            .output()
            .expect("run netns-scripts/lab");
        assert!(
            out.status.success(),
            "lab {cmd} {}: failed:\n{}",
            args.join(" "),
            text(&out)
        );
        text(&out)
    }

    /// The lab's state directory (configs, logs, the CU's CA, admin
    /// credential and tokens, the agents' state directories).
    pub fn state_dir(&self) -> PathBuf {
        PathBuf::from("/run/pon-lab").join(&self.name)
    }

    pub fn down(&self) -> Output {
        lab_command()
            .args(["down", &self.name])
            .output()
            .expect("lab down")
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        let out = self.down();
        if !out.status.success() {
            eprintln!("lab down {} failed:\n{}", self.name, text(&out));
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Reads `name{labels} value` from a Prometheus text page.
pub fn metric_value(page: &str, sample: &str) -> u64 {
    page.lines()
        .find_map(|l| {
            l.strip_prefix(sample)
                .and_then(|rest| rest.strip_prefix(' '))
        })
        .and_then(|v| v.trim().parse::<f64>().ok())
        .map(|v| v as u64)
        .unwrap_or(0)
}

/// Polls `cond` until it holds or `deadline` passes; returns whether it held.
pub fn wait_until(deadline: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let end = Instant::now() + deadline;
    loop {
        if cond() {
            return true;
        }
        if Instant::now() >= end {
            return false;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// A topology's `[[site]]` entry.
pub fn site(name: &str, apps: u32) -> String {
    format!("[[site]]\nname = \"{name}\"\napps = {apps}\n")
}

/// `[[site]]` entries of one app VM each, in this order (site ids 1, 2, ...).
pub fn sites(names: &[&str]) -> String {
    names.iter().map(|n| site(n, 1)).collect()
}

/// A topology's `[[link]]` between two sites, with its settings (TOML lines).
pub fn link(a: &str, b: &str, settings: &str) -> String {
    format!("[[link]]\nbetween = [\"{a}\", \"{b}\"]\n{settings}\n")
}

/// Parsed summary of a `ping` run.
#[derive(Debug, Clone, Copy)]
pub struct PingStats {
    pub transmitted: u64,
    pub received: u64,
    pub avg_ms: f64,
}

pub fn parse_ping(out: &str) -> Option<PingStats> {
    let line = out.lines().find(|l| l.contains("packets transmitted"))?;
    let nums: Vec<u64> = line
        .split(',')
        .filter_map(|part| part.split_whitespace().next()?.parse().ok())
        .take(2)
        .collect();
    let avg_ms = out
        .lines()
        .find(|l| l.starts_with("rtt") || l.starts_with("round-trip"))
        .and_then(|l| l.split('=').nth(1))
        .and_then(|v| v.trim().split('/').nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(f64::NAN);
    Some(PingStats {
        transmitted: *nums.first()?,
        received: *nums.get(1)?,
        avg_ms,
    })
}

/// The summary of a finished ping; panics with all its output if it has none.
pub fn ping_stats(out: &Output) -> PingStats {
    parse_ping(&String::from_utf8_lossy(&out.stdout))
        .unwrap_or_else(|| panic!("no ping summary:\n{}", text(out)))
}

/// Fails the calling test unless we may build namespaces.
pub fn require_root() {
    // SAFETY: geteuid has no preconditions; declared here to avoid a libc dependency.
    extern "C" {
        fn geteuid() -> u32;
    }
    assert_eq!(
        unsafe { geteuid() },
        0,
        "end-to-end tests build network namespaces and must run as root"
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_ping_summary() {
        let out = "5 packets transmitted, 4 received, 20% packet loss, time 4005ms\nrtt min/avg/max/mdev = 0.050/0.075/0.101/0.020 ms\n";
        let s = parse_ping(out).unwrap();
        assert_eq!((s.transmitted, s.received), (5, 4));
        assert!((s.avg_ms - 0.075).abs() < 1e-9);
    }

    #[test]
    fn writes_topology_entries() {
        assert_eq!(
            site("paris", 2) + &sites(&["tokyo"]) + &link("paris", "tokyo", "delay_ms = 5"),
            "[[site]]\nname = \"paris\"\napps = 2\n[[site]]\nname = \"tokyo\"\napps = 1\n\
             [[link]]\nbetween = [\"paris\", \"tokyo\"]\ndelay_ms = 5\n"
        );
    }

    #[test]
    fn reads_metric_samples() {
        let page = "# HELP x y\nx_total{a=\"b\"} 12\nx_total 3\n";
        assert_eq!(metric_value(page, "x_total{a=\"b\"}"), 12);
        assert_eq!(metric_value(page, "x_total"), 3);
        assert_eq!(metric_value(page, "nope"), 0);
    }
}

/// Real clients run inside lab hosts, shared by the end-to-end tests.
pub mod clients {
    use super::{parse_ping, wait_until, Lab, PingStats};
    use std::sync::atomic::{AtomicU16, Ordering};
    use std::time::Duration;

    /// Waits (bounded) until one ping from `host` to `dst` gets through:
    /// first packets may meet ARP resolution or a route still being set up.
    pub fn wait_reachable(lab: &Lab, host: &str, dst: &str) {
        let ok = wait_until(Duration::from_secs(15), || lab.ping_ok(host, dst));
        assert!(ok, "{host} never reached {dst}");
    }

    /// Pings `dst` from `host` without a break until `stop` is set, in
    /// back-to-back runs of `ping -c 100 -i 0.05` (the gap between runs is
    /// a process start), and returns what all runs sent and received. For
    /// "traffic flows throughout" while a test changes things around it:
    /// run it on a scoped thread. Bounded: at most `limit` in all.
    pub fn ping_while(
        lab: &Lab,
        host: &str,
        dst: &str,
        stop: &std::sync::atomic::AtomicBool,
        limit: Duration,
    ) -> PingStats {
        let end = std::time::Instant::now() + limit;
        let mut sum = PingStats {
            transmitted: 0,
            received: 0,
            avg_ms: f64::NAN,
        };
        while !stop.load(Ordering::Relaxed) && std::time::Instant::now() < end {
            let out = lab.exec(host, &["ping", "-c", "100", "-i", "0.05", "-W", "2", dst]);
            let s = parse_ping(&String::from_utf8_lossy(&out.stdout))
                .unwrap_or_else(|| panic!("no ping summary:\n{}", super::text(&out)));
            sum.transmitted += s.transmitted;
            sum.received += s.received;
        }
        sum
    }

    /// Sets the flag when dropped: stops a `ping_while` also when a test
    /// panics.
    struct StopOnDrop<'a>(&'a std::sync::atomic::AtomicBool);

    impl Drop for StopOnDrop<'_> {
        fn drop(&mut self) {
            self.0.store(true, Ordering::Relaxed);
        }
    }

    /// Runs `phases` while `host` pings `dst` every 50 ms without a break
    /// (`ping_while`, at most 300 s); returns what was sent and received.
    pub fn ping_during(lab: &Lab, host: &str, dst: &str, phases: impl FnOnce()) -> PingStats {
        let stop = std::sync::atomic::AtomicBool::new(false);
        std::thread::scope(|s| {
            let pinger = s.spawn(|| ping_while(lab, host, dst, &stop, Duration::from_secs(300)));
            let _stop = StopOnDrop(&stop);
            phases();
            drop(_stop);
            pinger.join().expect("pinger")
        })
    }

    /// Asserts that a ping run's summary shows `count` sent and received.
    pub fn check_ping(out: &str, count: u64) {
        let s = parse_ping(out).expect("ping summary");
        assert_eq!((s.transmitted, s.received), (count, count), "{out}");
    }

    /// Runs an iperf3 client in `client` against a one-off server started
    /// in `server_host` on `server` (a fresh port per run, so a server still
    /// winding down never meets the next client); returns the JSON report.
    pub fn iperf3(
        lab: &Lab,
        server_host: &str,
        server: &str,
        client: &str,
        args: &[&str],
    ) -> serde_json::Value {
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
            match serde_json::from_slice::<serde_json::Value>(&out.stdout) {
                Ok(r) if out.status.success() && r.get("error").is_none() => {
                    report = Some(r);
                    true
                }
                _ => false,
            }
        });
        let _ = srv.kill();
        let _ = srv.wait();
        assert!(ok, "iperf3 {client} -> {server} {args:?} never succeeded");
        report.expect("report")
    }

    /// Received TCP throughput of an iperf3 report, in Mbit/s.
    pub fn tcp_mbps(report: &serde_json::Value) -> f64 {
        let bps = report["end"]["sum_received"]["bits_per_second"].as_f64();
        bps.unwrap_or_else(|| panic!("no TCP summary in {report}")) / 1e6
    }

    /// Asserts a UDP iperf3 run carried real traffic with little loss.
    pub fn check_udp(report: &serde_json::Value) {
        let sum = &report["end"]["sum"];
        let (Some(packets), Some(lost)) = (sum["packets"].as_u64(), sum["lost_percent"].as_f64())
        else {
            panic!("no UDP summary in {report}");
        };
        assert!(packets > 100, "UDP run carried only {packets} packets");
        assert!(lost < 5.0, "UDP run lost {lost}% of {packets} packets");
    }
}
