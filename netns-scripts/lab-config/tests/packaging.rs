//! The systemd units and example configurations under `packaging/`: each
//! unit's daemon reads its example with its own loader, at the path and
//! with the state directory the unit gives it, so that neither drifts from
//! the daemons unnoticed.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Command;

fn packaging() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../packaging")
}

fn files(ext: &str) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(packaging())
        .expect("packaging/")
        .map(|e| e.expect("entry").path())
        .filter(|p| p.extension().is_some_and(|e| e == ext))
        .collect();
    v.sort();
    v
}

/// The value of `key` in a unit file (the last one set, as systemd reads it).
fn setting(unit: &str, key: &str) -> Option<String> {
    unit.lines()
        .rev()
        .find_map(|l| l.strip_prefix(key)?.strip_prefix('='))
        .map(str::to_string)
}

#[test]
fn every_unit_runs_its_daemon_on_an_example_that_loads() {
    let mut used = BTreeSet::new();
    let units = files("service");
    assert_eq!(units.len(), 3, "pon-agent, pon-cu, pon-proxy: {units:?}");
    for path in units {
        let unit = std::fs::read_to_string(&path).unwrap();
        let name = path.file_name().unwrap().to_string_lossy();
        let get = |key| setting(&unit, key).unwrap_or_else(|| panic!("{name}: no {key}="));
        assert_eq!(get("Type"), "simple", "{name}");
        assert_eq!(get("Restart"), "on-failure", "{name}");
        let exec = get("ExecStart");
        let args: Vec<&str> = exec.split_whitespace().collect();
        let daemon = args[0]
            .strip_prefix("/usr/bin/")
            .expect("ExecStart in /usr/bin");
        let config = args
            .iter()
            .position(|a| *a == "--config")
            .map(|i| Path::new(args[i + 1]))
            .unwrap_or_else(|| panic!("{name}: ExecStart has no --config"));
        assert!(
            config.starts_with("/etc/pon"),
            "{name}: {}",
            config.display()
        );
        let example = packaging().join(config.file_name().unwrap());
        used.insert(example.clone());
        // Where the daemon keeps its state is where systemd makes it writable.
        let state = Path::new("/var/lib").join(get("StateDirectory"));
        let caps = setting(&unit, "AmbientCapabilities").unwrap_or_default();
        let caps: BTreeSet<&str> = caps.split_whitespace().collect();
        let (kept, needs): (PathBuf, &[&str]) = match daemon {
            "pon-agent" => {
                let c = pon_agents::config::AgentConfig::load(&example).unwrap();
                // A TUN, routes and sysctls; raw IP-in-IP sockets.
                (c.ta.state_dir(), &["CAP_NET_ADMIN", "CAP_NET_RAW"])
            }
            "pon-proxy" => {
                let c = pon_proxy::ProxyConfig::load(&example).unwrap();
                c.forwarder.table().unwrap();
                (c.forwarder.state_dir(), &["CAP_NET_RAW"])
            }
            "pon-cu" => {
                assert_eq!(args[1], "run", "{name}");
                let c = pon_cu::config::CuConfig::load(&example).unwrap();
                c.settings().unwrap();
                for f in [&c.cert, &c.key, &c.ca, &c.ca_key, &c.admin_cert] {
                    assert_eq!(f.parent(), Some(state.as_path()), "{}", f.display());
                }
                (c.store.parent().unwrap().to_path_buf(), &[])
            }
            other => panic!("{name}: unknown daemon {other}"),
        };
        assert_eq!(
            kept, state,
            "{name}: StateDirectory= is not where {daemon} keeps its state"
        );
        for cap in needs {
            assert!(caps.contains(cap), "{name}: {daemon} needs {cap}");
        }
        // Never root: the capabilities above are all a daemon gets.
        assert_eq!(get("User"), "pon", "{name}");
    }
    let examples: BTreeSet<PathBuf> = files("toml").into_iter().collect();
    assert_eq!(examples, used, "every example is some unit's configuration");
}

#[test]
fn units_pass_systemd_analyze_verify() {
    if Command::new("systemd-analyze")
        .arg("--version")
        .output()
        .is_err()
    {
        eprintln!("systemd-analyze is not installed: the units are not verified here");
        return;
    }
    let dir = std::env::temp_dir().join(format!("pon-units-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    for path in files("service") {
        let name = path.file_name().unwrap();
        // verify checks that ExecStart's binary exists: the daemons are not
        // installed here, so an executable stands in for them.
        let text = std::fs::read_to_string(&path)
            .unwrap()
            .replace("ExecStart=/usr/bin/", "ExecStart=/bin/true /usr/bin/");
        std::fs::write(dir.join(name), text).unwrap();
        let out = Command::new("systemd-analyze")
            .args(["verify", "--man=no"])
            .arg(dir.join(name))
            .output()
            .expect("systemd-analyze verify");
        let said = String::from_utf8_lossy(&out.stderr).to_string()
            + &String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success() && said.trim().is_empty(),
            "{}: {said}",
            name.to_string_lossy()
        );
    }
    std::fs::remove_dir_all(&dir).unwrap();
}
