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

/// The selector rows of the table, without the timing column.
fn rows(report: &str) -> Vec<String> {
    report
        .lines()
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
    std::fs::remove_dir_all(&dir).unwrap();
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
        (&["--nodes", "2"], &["--nodes 2", "expected 3..=500"]),
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
