//! pon-agent, the one service of an app VM: when one of its parts cannot
//! run, the whole process ends with an error (for the service manager to
//! restart), never running on as half an agent.

use pon_e2e::clients::wait_reachable;
use pon_e2e::{require_root, sites, text, Lab};
use std::io::{BufRead, BufReader};

const PARIS_APP: &str = "198.18.1.11";
const TOKYO_APP: &str = "198.18.2.11";

#[test]
fn a_part_that_stops_ends_pon_agent_with_its_cause() {
    require_root();
    let lab = Lab::up(&sites(&["paris", "tokyo"]));
    wait_reachable(&lab, "paris/app1", TOKYO_APP);
    let status = lab.status_json();
    let config = status["hosts"]
        .as_array()
        .unwrap()
        .iter()
        .find(|h| h["name"] == "paris/app1")
        .and_then(|h| h["daemons"].as_array())
        .and_then(|d| d.iter().find(|d| d["name"] == "pon-agent"))
        .and_then(|d| d["config"].as_str())
        .expect("paris/app1 runs pon-agent")
        .to_string();
    lab.ctl("stop", &["paris/app1"]);

    // Something else holds the TA's steering port: the TA part stops once
    // the CU has named its forwarder, while the RA part is running.
    let steering = pon_proto::ports::STEERING;
    let hold = format!(
        "import socket, time\ns = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\n\
         s.bind(('{PARIS_APP}', {steering}))\nprint('bound', flush=True)\ntime.sleep(60)"
    );
    let mut holder = lab.spawn("paris/app1", &["python3", "-c", &hold]);
    let mut line = String::new();
    BufReader::new(holder.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    assert_eq!(line.trim(), "bound");

    // Bounded: an agent running on as half an agent would be stopped by
    // `timeout` instead of exiting by itself with status 1.
    let out = lab.run_daemon("paris/app1", "pon-agent", &config, 30);
    let _ = holder.kill();
    let _ = holder.wait();
    let said = text(&out);
    assert_eq!(out.status.code(), Some(1), "{said}");
    assert!(said.contains("RA running"), "the RA part was up: {said}");
    assert!(
        said.contains("thread ta stopped")
            && said.contains(&format!("binding steering socket {PARIS_APP}:{steering}")),
        "{said}"
    );

    // With the port free again, the lab's agent runs whole.
    lab.ctl("start", &["paris/app1"]);
    wait_reachable(&lab, "paris/app1", TOKYO_APP);
}
