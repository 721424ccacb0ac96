//! pon-sim end to end: the binary runs, prints a row per selector, and a
//! series written with --write-csv and read back with --csv gives the same
//! results as the generated one.

use std::process::Command;

fn sim(args: &[&str]) -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_pon-sim"))
        .args(args)
        .output()
        .expect("pon-sim runs");
    assert!(
        out.status.success(),
        "pon-sim {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).expect("utf-8")
}

/// The selector rows of the quality table, without the timing column.
fn rows(report: &str) -> Vec<String> {
    report
        .lines()
        .take_while(|l| !l.starts_with("probe cost"))
        .filter(|l| {
            ["direct-ip ", "rnn ", "bandit ", "random ", "fullmesh "]
                .iter()
                .any(|p| l.starts_with(p))
        })
        .map(|l| {
            let mut f: Vec<&str> = l.split_whitespace().collect();
            f.pop();
            f.join(" ")
        })
        .collect()
}

#[test]
fn generated_and_csv_series_give_the_same_report() {
    let dir = std::env::temp_dir().join(format!("pon-sim-test-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let csv = dir.join("series.csv");
    let csv_s = csv.to_str().unwrap();
    let generated = sim(&[
        "--nodes",
        "10",
        "--intervals",
        "60",
        "--seed",
        "3",
        "--write-csv",
        csv_s,
    ]);
    let r = rows(&generated);
    assert_eq!(r.len(), 5, "{generated}");
    // k = 3 out of 9 candidates: a third of the full mesh at most.
    let rnn: Vec<&str> = r[1].split(' ').collect();
    assert_eq!(rnn[0], "rnn");
    let vs_mesh: f64 = rnn[rnn.len() - 1].parse().unwrap();
    assert!(vs_mesh > 0.0 && vs_mesh <= 3.0 / 9.0 + 1e-9, "{vs_mesh}");
    let from_csv = sim(&["--csv", csv_s, "--intervals", "60", "--seed", "3"]);
    assert_eq!(rows(&from_csv), r);
    assert_eq!(cost_rows(&from_csv), cost_rows(&generated));
    std::fs::remove_dir_all(&dir).unwrap();
}

/// The probe cost table's rows: selector, then the figures.
fn cost_rows(report: &str) -> Vec<(String, Vec<f64>)> {
    report
        .lines()
        .skip_while(|l| !l.starts_with("probe cost"))
        .skip(2)
        .take_while(|l| !l.starts_with("dst:"))
        .map(|l| {
            let mut f = l.split_whitespace().filter(|x| *x != "|");
            let name = f.next().unwrap().to_string();
            (name, f.map(|x| x.parse().unwrap_or(f64::NAN)).collect())
        })
        .collect()
}

#[test]
fn probe_cost_counts_keepalives_at_the_configured_rate() {
    let args = ["--nodes", "8", "--intervals", "40", "--selector", "rnn"];
    let default = cost_rows(&sim(&args));
    let faster = cost_rows(&sim(&[&args[..], &["--idle-keepalive-ms", "500"]].concat()));
    assert_eq!(default.len(), 1);
    let (name, d) = &default[0];
    assert_eq!(name, "rnn");
    // Per destination: learning at most k (and about half that once
    // steady), keepalives next to none (the learning budget probes the
    // current route at least every 2 s, within the 2.5 s keepalive period;
    // three fast ones at a busy pair's failover are rare), no trains for
    // latency, sent their sum; per proxy: 7 destinations' worth.
    let (learn, keep, bw, sent) = (d[0], d[1], d[2], d[3]);
    assert!(learn > 1.0 && learn <= 3.0, "{d:?}");
    assert!(keep < 0.2, "{d:?}");
    assert_eq!(bw, 0.0);
    assert!((sent - (learn + keep + bw)).abs() < 0.02, "{d:?}");
    assert!((d[7] - 7.0 * sent).abs() < 0.1, "{d:?}");
    // Every site runs a router: answers are known per proxy, and on
    // average a proxy answers about what it sends.
    assert!(d[8] > 0.9 * d[7] && d[8] <= d[7] + 1e-9, "{d:?}");
    // Reports: a fifth of the pairs busy, 5 reports/s each; all = sent
    // + the answers per destination (per proxy over its 7) + reports.
    // Everything an end of a pair spends stays within the 5 per
    // destination.
    let (reports, all) = (d[14], d[15]);
    assert!(reports > 0.5 && reports < 1.5, "{d:?}");
    assert!((all - (sent + d[8] / 7.0 + reports)).abs() < 0.05, "{d:?}");
    assert!(all <= 5.0, "{d:?}");
    // A keepalive period shorter than learning's fills the gaps: every
    // 500 ms, less the one a learning probe replaces (one in two for a
    // destination probed every interval, one in four once steady).
    let f = &faster[0].1;
    assert!(f[1] > 0.9 && f[1] < 1.6, "{f:?} vs {d:?}");
    assert_eq!(f[0], learn, "the routers decide the same");
}

#[test]
fn large_overlays_simulate_a_sample_of_sources() {
    let out = sim(&[
        "--nodes",
        "30",
        "--intervals",
        "30",
        "--selector",
        "rnn",
        "--sources",
        "5",
    ]);
    assert!(
        out.contains("routers simulated at 5 of the 30 sites"),
        "{out}"
    );
    let c = cost_rows(&out);
    // The busiest proxy's answers need every site simulated.
    assert!(c[0].1[12].is_nan(), "{out}");
    assert!(c[0].1[0] > 1.0, "{out}");
}

#[test]
fn bad_arguments_are_refused_with_a_message() {
    // Each refusal names the argument, the value and what would be accepted
    // (or why the file cannot be used), not just "something went wrong".
    for (args, says) in [
        (
            &["--selector", "oracle"][..],
            &[
                "--selector",
                "\"oracle\"",
                "expected rnn, bandit, random, fullmesh or all",
            ][..],
        ),
        (
            &["--policy", "fastest"],
            &[
                "--policy",
                "\"fastest\"",
                "expected latency, loss or bandwidth",
            ],
        ),
        (&["--nodes", "2"], &["--nodes 2", "expected 3..=1000"]),
        (&["--keepalive-ms", "0"], &["--keepalive-ms", "positive"]),
        (
            &["--nodes", "30", "--sources", "3", "--trace", "1,2"],
            &["--trace 1,2", "simulated sites (3 of 30"],
        ),
        (
            &["--csv", "/nonexistent/pon-sim.csv"],
            &[
                "opening /nonexistent/pon-sim.csv",
                "No such file or directory",
            ],
        ),
        (&["--max-relays", "3"], &["max_relays", "must be 1 or 2"]),
    ] {
        let out = Command::new(env!("CARGO_BIN_EXE_pon-sim"))
            .args(args)
            .output()
            .unwrap();
        assert!(!out.status.success(), "{args:?} accepted");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.starts_with("Error: "), "{args:?}: {err}");
        for s in says {
            assert!(err.contains(s), "{args:?}: no {s:?} in {err}");
        }
        assert!(out.stdout.is_empty(), "{args:?} printed a report");
    }
}
