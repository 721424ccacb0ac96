//! The lab itself: independent labs side by side, and nothing left behind,
//! also when bringing a lab up fails.

use pon_e2e::{bin_dir, lab_command, require_root, Lab};
use std::process::Command;

/// Static forwarders (`routing = false`): the failure test below fakes
/// pon-forwarder.
const TWO_SITES: &str =
    "routing = false\n[[site]]\nname = \"a\"\napps = 1\n[[site]]\nname = \"b\"\napps = 1\n";

fn namespaces_of(name: &str) -> Vec<String> {
    let out = Command::new("ip")
        .args(["netns", "list"])
        .output()
        .expect("ip netns list");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.split_whitespace().next())
        .filter(|n| n.starts_with(&format!("pon-{name}-")))
        .map(str::to_string)
        .collect()
}

#[test]
fn two_labs_run_side_by_side_and_clean_up() {
    require_root();
    let one = Lab::up(TWO_SITES);
    let two = Lab::up(TWO_SITES);
    for lab in [&one, &two] {
        let ok = pon_e2e::wait_until(std::time::Duration::from_secs(15), || {
            lab.exec("a/app1", &["ping", "-c", "1", "-W", "1", "198.18.2.11"])
                .status
                .success()
        });
        assert!(ok, "lab {} does not carry traffic", lab.name);
        let hosts = lab.status_json()["hosts"].as_array().unwrap().len();
        assert_eq!(hosts, 6, "two proxies, two apps, the internet, the CU");
        assert_eq!(namespaces_of(&lab.name).len(), 6);
    }
    let name = one.name.clone();
    drop(one);
    assert!(
        namespaces_of(&name).is_empty(),
        "lab down left namespaces behind"
    );
    assert!(two
        .exec("a/app1", &["ping", "-c", "1", "-W", "2", "198.18.2.11"])
        .status
        .success());
}

#[test]
fn failed_up_leaves_nothing_behind() {
    require_root();
    let dir = std::env::temp_dir().join(format!("pon-e2e-fail-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    // A forwarder that dies at start: up must fail and remove everything.
    let fake = dir.join("bin");
    std::fs::create_dir_all(&fake).unwrap();
    for bin in ["pon-agent", "pon-cu", "ponctl", "pon-lab-config"] {
        std::os::unix::fs::symlink(bin_dir().join(bin), fake.join(bin)).unwrap();
    }
    std::fs::write(
        fake.join("pon-forwarder"),
        "#!/bin/sh\necho 'forwarder: simulated crash' >&2\nexit 3\n",
    )
    .unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(
        fake.join("pon-forwarder"),
        std::fs::Permissions::from_mode(0o755),
    )
    .unwrap();
    let topo = dir.join("t.toml");
    std::fs::write(&topo, TWO_SITES).unwrap();
    let name = format!("f{:x}", std::process::id() & 0xfffffff);
    let out = lab_command()
        .arg("up")
        .arg(&topo)
        .args(["--name", &name, "--bin-dir"])
        .arg(&fake)
        .output()
        .unwrap();
    let text =
        String::from_utf8_lossy(&out.stderr).to_string() + &String::from_utf8_lossy(&out.stdout);
    assert!(!out.status.success(), "up should fail:\n{text}");
    assert!(
        text.contains("simulated crash"),
        "the daemon's log should be shown:\n{text}"
    );
    assert!(
        namespaces_of(&name).is_empty(),
        "failed up left namespaces behind"
    );

    // A topology error is reported with the field and creates nothing.
    std::fs::write(
        &topo,
        format!("{TWO_SITES}[[path]]\nbetween = [\"a\", \"zz\"]\n"),
    )
    .unwrap();
    let out = lab_command()
        .arg("up")
        .arg(&topo)
        .args(["--name", &name])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && text.contains("path[1].between"),
        "{text}"
    );
    assert!(namespaces_of(&name).is_empty());
    let _ = std::fs::remove_dir_all(&dir);
}
