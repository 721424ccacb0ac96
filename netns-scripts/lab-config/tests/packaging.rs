//! The systemd units and example configurations under `packaging/`: each
//! unit's daemon reads its example with its own loader, at the path and
//! with the state directory the unit gives it, so that neither drifts from
//! the daemons unnoticed. Then the .deb packages made of them: built with
//! `cargo deb --no-build` from the release binaries, unpacked into a
//! scratch root, their contents and units checked, and every installed
//! daemon run with `--check` on its installed configuration.

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

/// `systemd-analyze verify` on the unit at `path`, copied to `copy` with
/// `/usr/bin/` in ExecStart replaced by `bin` (verify checks that the
/// binary exists): clean, with nothing to say.
fn verify_unit(path: &Path, copy: &Path, bin: &str) {
    let text = std::fs::read_to_string(path)
        .unwrap()
        .replace("ExecStart=/usr/bin/", &format!("ExecStart={bin}"));
    std::fs::write(copy, text).unwrap();
    let out = Command::new("systemd-analyze")
        .args(["verify", "--man=no"])
        .arg(copy)
        .output()
        .expect("systemd-analyze verify");
    let said =
        String::from_utf8_lossy(&out.stderr).to_string() + &String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && said.trim().is_empty(),
        "{}: systemd-analyze verify: {said}",
        path.display()
    );
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
        verify_unit(&path, &dir.join(name), "/bin/true /usr/bin/");
    }
    std::fs::remove_dir_all(&dir).unwrap();
}

/// The three .deb packages: what each installs, and the daemons whose
/// installed binary is run with `--check` on the installed config (the
/// unit's) or on an installed example.
struct Package {
    name: &'static str,
    crate_name: &'static str,
    binaries: &'static [&'static str],
    /// (binary, its config in the package, extra leading arguments).
    checks: &'static [(&'static str, &'static str, &'static [&'static str])],
}

const PACKAGES: &[Package] = &[
    Package {
        name: "pon-cu",
        crate_name: "pon-cu",
        binaries: &["pon-cu", "ponctl"],
        checks: &[("pon-cu", "etc/pon/cu.toml", &["run"])],
    },
    Package {
        name: "pon-proxy",
        crate_name: "pon-proxy",
        binaries: &["pon-forwarder", "pon-monitor", "pon-proxy", "pon-router"],
        checks: &[
            ("pon-proxy", "etc/pon/proxy.toml", &[]),
            (
                "pon-forwarder",
                "usr/share/doc/pon-proxy/examples/forwarder.toml",
                &[],
            ),
            (
                "pon-monitor",
                "usr/share/doc/pon-proxy/examples/monitor.toml",
                &[],
            ),
            (
                "pon-router",
                "usr/share/doc/pon-proxy/examples/router.toml",
                &[],
            ),
        ],
    },
    Package {
        name: "pon-agent",
        crate_name: "pon-agents",
        binaries: &["pon-agent", "pon-ra", "pon-ta"],
        checks: &[
            ("pon-agent", "etc/pon/agent.toml", &[]),
            ("pon-ta", "usr/share/doc/pon-agent/examples/ta.toml", &[]),
            ("pon-ra", "usr/share/doc/pon-agent/examples/ra.toml", &[]),
        ],
    },
];

/// A scratch directory, removed also when the test fails.
struct Scratch(PathBuf);

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn run(cmd: &mut Command) -> String {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("{cmd:?}: cannot run: {e}"));
    let said =
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{cmd:?} failed: {said}");
    said
}

/// The release directory the test binary was built in
/// (`<target>/release/deps/packaging-…`): where `cargo build --release
/// --workspace --bins` left the daemons.
fn release_dir() -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    exe.parent().and_then(Path::parent).unwrap().to_path_buf()
}

/// Whether `systemd-analyze verify` works here at all (it needs no running
/// systemd, but some containers lack what it loads): the reason if not.
fn systemd_analyze_unusable(dir: &Path) -> Option<String> {
    let probe = dir.join("pon-probe.service");
    std::fs::write(&probe, "[Service]\nExecStart=/bin/true\n").unwrap();
    match Command::new("systemd-analyze")
        .args(["verify", "--man=no"])
        .arg(&probe)
        .output()
    {
        Err(e) => Some(format!("systemd-analyze is not installed ({e})")),
        Ok(o) if !o.status.success() => Some(format!(
            "systemd-analyze verify fails on a trivial unit: {}",
            String::from_utf8_lossy(&o.stderr).trim()
        )),
        Ok(_) => None,
    }
}

#[test]
fn packages_install_into_a_scratch_root_and_their_daemons_check_their_configs() {
    let workspace = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    let release = release_dir();
    let target = release.parent().unwrap().to_path_buf();
    for p in PACKAGES {
        for b in p.binaries {
            assert!(
                release.join(b).is_file(),
                "{} is missing: run `cargo build --release --workspace --bins` first (the README's test command does)",
                release.join(b).display()
            );
        }
    }
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let has_deb = Command::new(&cargo)
        .args(["deb", "--version"])
        .output()
        .is_ok_and(|o| o.status.success());
    assert!(
        has_deb,
        "cargo-deb is not installed: netns-scripts/install-deps installs it (cargo install cargo-deb --locked)"
    );
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .subsec_nanos();
    let scratch =
        Scratch(std::env::temp_dir().join(format!("pon-packages-{}-{nanos}", std::process::id())));
    let (debs, root, control) = (
        scratch.0.join("debs"),
        scratch.0.join("root"),
        scratch.0.join("control"),
    );
    for d in [&debs, &root, &control] {
        std::fs::create_dir_all(d).unwrap();
    }

    for p in PACKAGES {
        // Built from the binaries already there, unstripped and lightly
        // compressed to keep the test quick (`cargo deb` proper strips).
        let out = debs.join(p.name);
        std::fs::create_dir_all(&out).unwrap();
        run(Command::new(&cargo)
            .args([
                "deb",
                "--no-build",
                "--no-strip",
                "--fast",
                "-p",
                p.crate_name,
            ])
            .arg("--manifest-path")
            .arg(workspace.join("Cargo.toml"))
            .arg("--output")
            .arg(&out)
            .env("CARGO_TARGET_DIR", &target));
        let deb: Vec<PathBuf> = std::fs::read_dir(&out)
            .unwrap()
            .map(|e| e.unwrap().path())
            .filter(|p| p.extension().is_some_and(|e| e == "deb"))
            .collect();
        assert_eq!(deb.len(), 1, "{}: {deb:?}", p.name);
        let deb = &deb[0];
        let name = run(Command::new("dpkg-deb")
            .args(["-f"])
            .arg(deb)
            .arg("Package"));
        assert_eq!(name.trim(), p.name);
        run(Command::new("dpkg-deb").arg("-x").arg(deb).arg(&root));
        let ctrl = control.join(p.name);
        run(Command::new("dpkg-deb").arg("-e").arg(deb).arg(&ctrl));
        let contents = run(Command::new("dpkg-deb").arg("-c").arg(deb));

        // What it installs: exactly its binaries, its unit, its sysusers
        // file, its docs; every file under /etc is a conffile.
        let bins: BTreeSet<String> = contents
            .lines()
            .filter_map(|l| l.split_whitespace().last()?.strip_prefix("./usr/bin/"))
            .filter(|b| !b.is_empty())
            .map(str::to_string)
            .collect();
        let want: BTreeSet<String> = p.binaries.iter().map(|b| b.to_string()).collect();
        assert_eq!(bins, want, "{}: binaries", p.name);
        let conffiles = std::fs::read_to_string(ctrl.join("conffiles")).unwrap_or_default();
        let conffiles: BTreeSet<&str> = conffiles.lines().collect();
        let etc: BTreeSet<&str> = contents
            .lines()
            .filter_map(|l| l.split_whitespace().last()?.strip_prefix('.'))
            .filter(|f| f.starts_with("/etc/") && !f.ends_with('/'))
            .collect();
        assert!(!etc.is_empty(), "{}: no default config in /etc", p.name);
        assert_eq!(
            etc, conffiles,
            "{}: every file in /etc is a conffile",
            p.name
        );
        for doc in ["README.md", "CONFIG.md", "copyright"] {
            let f = root.join(format!("usr/share/doc/{}/{doc}", p.name));
            assert!(f.is_file(), "{}: no {}", p.name, f.display());
        }
        let sysusers = root.join(format!("usr/lib/sysusers.d/{}.conf", p.name));
        let sysusers = std::fs::read_to_string(&sysusers)
            .unwrap_or_else(|e| panic!("{}: {}: {e}", p.name, sysusers.display()));
        assert!(
            sysusers.lines().any(|l| l.starts_with("u pon ")),
            "{}: the sysusers file makes the pon user: {sysusers}",
            p.name
        );
        // Installing creates the user before anything runs as it.
        let postinst = std::fs::read_to_string(ctrl.join("postinst")).unwrap_or_default();
        assert!(
            postinst.contains("systemd-sysusers"),
            "{}: postinst does not create the pon user: {postinst}",
            p.name
        );

        // The unit: ExecStart is an installed binary with an installed,
        // conffile config.
        let unit_path = root.join(format!("usr/lib/systemd/system/{}.service", p.name));
        let unit = std::fs::read_to_string(&unit_path)
            .unwrap_or_else(|e| panic!("{}: {}: {e}", p.name, unit_path.display()));
        let exec = setting(&unit, "ExecStart").expect("ExecStart=");
        let args: Vec<&str> = exec.split_whitespace().collect();
        let bin = root.join(args[0].trim_start_matches('/'));
        assert!(
            bin.is_file(),
            "{}: ExecStart {} is not installed",
            p.name,
            args[0]
        );
        let config = args[args.iter().position(|a| *a == "--config").unwrap() + 1];
        assert!(
            root.join(config.trim_start_matches('/')).is_file(),
            "{}: the unit's config {config} is not installed",
            p.name
        );
        assert!(
            conffiles.contains(config),
            "{}: {config} is not a conffile",
            p.name
        );

        // Every daemon starts on its installed config far enough to check it.
        for (daemon, config, pre) in p.checks {
            let out = run(Command::new(root.join("usr/bin").join(daemon))
                .args(*pre)
                .arg("--config")
                .arg(root.join(config))
                .arg("--check"));
            assert!(out.contains(": ok"), "{daemon} --check: {out}");
            eprintln!("installed {daemon} --check {config}: {}", out.trim());
        }
        for b in p.binaries {
            run(Command::new(root.join("usr/bin").join(b)).arg("--version"));
        }
    }

    // What the postinsts do first, in the scratch root: the three sysusers
    // files make one pon user, the one the units run as.
    run(Command::new("systemd-sysusers").arg(format!("--root={}", root.display())));
    let passwd = std::fs::read_to_string(root.join("etc/passwd")).unwrap();
    assert!(
        passwd.lines().filter(|l| l.starts_with("pon:")).count() == 1,
        "{passwd}"
    );

    // The installed units, with their binaries where the scratch root has
    // them (verify checks that ExecStart's file exists).
    let units = scratch.0.join("units");
    std::fs::create_dir_all(&units).unwrap();
    if let Some(why) = systemd_analyze_unusable(&units) {
        eprintln!(
            "NOT VERIFIED by systemd-analyze: {why}; the units were only checked statically above"
        );
        return;
    }
    for p in PACKAGES {
        let name = format!("{}.service", p.name);
        verify_unit(
            &root.join("usr/lib/systemd/system").join(&name),
            &units.join(&name),
            &format!("{}/usr/bin/", root.display()),
        );
        eprintln!("systemd-analyze verify {}.service: clean", p.name);
    }
}
