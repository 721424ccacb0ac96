//! App VMs' CU sessions relayed by their site's proxy (`cu_relay = true`:
//! `[cu] relay` on the app VMs, `relay_listen` on the proxies): real
//! pon-cu, proxies and agents in the lab. The app VMs register through
//! their proxy (TLS to the CU inside the proxy's own connection), the
//! overlay carries their traffic as usual, and an app VM whose proxy goes
//! away registers with the CU directly.

use pon_e2e::clients::wait_reachable;
use pon_e2e::{parse_ping, require_root, wait_until, Lab};
use std::time::Duration;

const TOPOLOGY: &str = "cu_relay = true\n\
    [[site]]\nname = \"paris\"\napps = 1\n\
    [[site]]\nname = \"tokyo\"\napps = 1\n";
const PARIS_APP: &str = "198.18.1.11";
const TOKYO_APP: &str = "198.18.2.11";
const PARIS_TA: &str = "198.18.1.11:9101";
const CU_METRICS: &str = "198.18.250.1:9200";
const PROXIES: [(&str, &str); 2] = [
    ("paris/proxy", "198.18.1.1:9100"),
    ("tokyo/proxy", "198.18.2.1:9100"),
];

fn cu(lab: &Lab, sample: &str) -> u64 {
    lab.metric("cu", CU_METRICS, sample)
}

#[test]
fn app_vms_register_through_their_proxy_and_go_direct_when_it_is_gone() {
    require_root();
    let lab = Lab::up(TOPOLOGY);
    wait_reachable(&lab, "paris/app1", TOKYO_APP);
    wait_reachable(&lab, "tokyo/app1", PARIS_APP);
    // Each app VM's session is a stream of its proxy's connection: the CU
    // holds two connections (the proxies) and two relayed sessions.
    let relayed = |lab: &Lab| cu(lab, "pon_cu_relayed_sessions");
    let connections = |lab: &Lab| cu(lab, "pon_cu_connections");
    assert!(
        wait_until(Duration::from_secs(20), || relayed(&lab) == 2
            && connections(&lab) == 2),
        "relayed {}, connections {}",
        relayed(&lab),
        connections(&lab)
    );
    for (host, addr) in PROXIES {
        assert_eq!(
            lab.metric(host, addr, "pon_cu_client_relayed_sessions"),
            1,
            "{host}"
        );
    }
    // The overlay carries the app VMs' traffic as usual.
    let egress = "pon_forwarder_packets_total{stage=\"egress\"}";
    let before = lab.metric(PROXIES[1].0, PROXIES[1].1, egress);
    let out = lab.exec_ok(
        "paris/app1",
        &["ping", "-c", "20", "-i", "0.05", "-W", "2", TOKYO_APP],
    );
    assert_eq!(
        parse_ping(&out).expect("ping summary").received,
        20,
        "{out}"
    );
    let carried = lab.metric(PROXIES[1].0, PROXIES[1].1, egress) - before;
    assert!(
        carried >= 20,
        "tokyo's proxy delivered {carried} of 20 pings"
    );

    // Paris's proxy goes: paris's app VM loses its relayed session and
    // registers with the CU itself (its configuration names no other
    // relay), keeping its id.
    let id = lab.metric("paris/app1", PARIS_TA, "pon_cu_client_id");
    assert!(id > 0);
    lab.ctl("stop", &[PROXIES[0].0]);
    assert!(
        wait_until(Duration::from_secs(20), || relayed(&lab) == 1
            && connections(&lab) == 2
            && lab.metric("paris/app1", PARIS_TA, "pon_cu_client_registered")
                == 1),
        "relayed {}, connections {}",
        relayed(&lab),
        connections(&lab)
    );
    assert_eq!(
        lab.metric("paris/app1", PARIS_TA, "pon_cu_client_id"),
        id,
        "the app VM kept its id"
    );
}
