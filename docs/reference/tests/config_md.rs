//! docs/CONFIG.md is what the config types generate, and says something
//! about every key.

use pon_config_reference::{daemons, render, rows};
use std::path::Path;

#[test]
fn committed_page_is_what_the_config_types_generate() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../CONFIG.md");
    let committed = std::fs::read_to_string(&path).unwrap_or_default();
    let generated = render();
    if committed != generated {
        let first = committed
            .lines()
            .zip(generated.lines())
            .position(|(a, b)| a != b)
            .map_or_else(
                || "one is a prefix of the other".to_string(),
                |i| {
                    format!(
                        "line {}:\n  committed: {}\n  generated: {}",
                        i + 1,
                        committed.lines().nth(i).unwrap_or(""),
                        generated.lines().nth(i).unwrap_or("")
                    )
                },
            );
        panic!(
            "{} is stale ({first}).\nRegenerate it: cargo run --release -p pon-config-reference > docs/CONFIG.md",
            path.display()
        );
    }
}

#[test]
fn every_key_has_a_meaning_and_a_type() {
    for d in daemons() {
        let rows = rows(&d.schema);
        assert!(rows.len() >= 3, "{}: {} keys", d.name, rows.len());
        for r in rows {
            assert!(
                !r.meaning.is_empty(),
                "{} `{}` has no doc comment on its config field",
                d.name,
                r.key
            );
            assert!(
                !r.ty.is_empty() && r.ty != "any",
                "{} `{}`: {}",
                d.name,
                r.key,
                r.ty
            );
        }
    }
}

#[test]
fn keys_defaults_and_units_come_from_the_types() {
    let find = |daemon: &str, key: &str| {
        let d = daemons().into_iter().find(|d| d.name == daemon).unwrap();
        rows(&d.schema)
            .into_iter()
            .find(|r| r.key == key)
            .unwrap_or_else(|| panic!("{daemon}: no key {key}"))
    };
    // A default from a `default = "fn"`, one from a container's Default,
    // one from a well-known port; renamed arrays; a map of named tables.
    let hb = find("pon-cu", "heartbeat_ms");
    assert_eq!((hb.default.as_str(), hb.unit.as_str()), ("`500`", "ms"));
    assert_eq!(find("pon-proxy", "[routing] hold_ms").default, "`2000`");
    assert_eq!(find("pon-proxy", "agent_udp_port").default, "`7301`");
    assert_eq!(find("pon-proxy", "underlay_mtu").unit, "bytes");
    assert_eq!(
        find("pon-forwarder", "[[peer]] public_key").default,
        "required"
    );
    assert_eq!(
        find("pon-cu", "[clouds.NAME] prefixes").ty,
        "list of IP network"
    );
    assert_eq!(find("pon-agent", "[ta] encap").default, "`\"ipip\"`");
    assert!(find("pon-proxy", "[routing] policy")
        .ty
        .contains("weighted"));
    // pon-proxy refuses `[local]`; pon-forwarder takes it.
    let proxy = daemons()
        .into_iter()
        .find(|d| d.name == "pon-proxy")
        .unwrap();
    assert!(rows(&proxy.schema)
        .iter()
        .all(|r| !r.key.starts_with("[local]")));
    find("pon-forwarder", "[local] monitor_key");
}
