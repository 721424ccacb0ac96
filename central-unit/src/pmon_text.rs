//! How `ponctl matrix` and `ponctl watch` print PMon's matrix and events
//! for a person (with `--json` they print the messages as they are).

use pon_proto::pmon::{Cell, Event, EventKind, Matrix, Metric};

pub fn ms(us: Option<u32>) -> String {
    us.map_or("-".into(), |v| format!("{:.1}", f64::from(v) / 1000.0))
}

pub fn loss(ppm: Option<u32>) -> String {
    ppm.map_or("-".into(), |v| format!("{:.1}%", f64::from(v) / 10_000.0))
}

fn via(v: &[String]) -> String {
    if v.is_empty() {
        "direct".into()
    } else {
        format!("via {}", v.join(">"))
    }
}

/// A cell's route, as the table and the web view say it.
pub fn route(c: &Cell) -> String {
    match (c.reported, c.reachable) {
        (false, _) => "not reported".into(),
        (true, false) => "unreachable (IP path)".into(),
        (true, true) => via(&c.via),
    }
}

/// The matrix as a table, one ordered pair of sites a line.
pub fn matrix(m: &Matrix) -> String {
    let mut rows = vec![[
        "FROM", "TO", "ROUTE", "RTT ms", "P50", "P99", "JITTER", "LOSS", "AGE s",
    ]
    .map(String::from)];
    let mut cells: Vec<&Cell> = m.cells.iter().collect();
    cells.sort_by(|a, b| (&a.from, &a.to).cmp(&(&b.from, &b.to)));
    for c in cells {
        rows.push([
            c.from.clone(),
            c.to.clone(),
            route(c),
            ms(c.figures.rtt_us),
            ms(c.figures.p50_us),
            ms(c.figures.p99_us),
            ms(c.figures.jitter_us),
            loss(c.figures.loss_ppm),
            if c.reported {
                format!("{:.1}", c.age_ms as f64 / 1000.0)
            } else {
                "-".into()
            },
        ]);
    }
    let mut widths = [0usize; 9];
    for r in &rows {
        for (w, c) in widths.iter_mut().zip(r) {
            *w = (*w).max(c.chars().count());
        }
    }
    let mut out = String::new();
    for r in &rows {
        let line: Vec<String> = r
            .iter()
            .zip(widths)
            .map(|(c, w)| format!("{c:<w$}"))
            .collect();
        out.push_str(line.join("  ").trim_end());
        out.push('\n');
    }
    out
}

/// Unix ms as UTC time of day, `HH:MM:SS.mmm`.
pub fn time_of_day(at_ms: u64) -> String {
    let ms = at_ms % 86_400_000;
    format!(
        "{:02}:{:02}:{:02}.{:03}",
        ms / 3_600_000,
        ms / 60_000 % 60,
        ms / 1000 % 60,
        ms % 1000
    )
}

/// One event as a line.
pub fn event(e: &Event) -> String {
    let what = match &e.kind {
        EventKind::RouteChanged {
            before_via,
            after_via,
            ..
        } => format!("route changed: {} => {}", via(before_via), via(after_via)),
        EventKind::Unreachable => "unreachable: traffic takes the IP path".into(),
        EventKind::Reachable => "reachable again over the overlay".into(),
        EventKind::Above {
            metric,
            value,
            threshold,
        }
        | EventKind::Below {
            metric,
            value,
            threshold,
        } => {
            let dir = if matches!(e.kind, EventKind::Above { .. }) {
                "above"
            } else {
                "back below"
            };
            // Thresholds are on times (µs) or loss (ppm).
            let f = |v: u32| match metric {
                Metric::Loss => loss(Some(v)),
                _ => format!("{} ms", ms(Some(v))),
            };
            let name = metric.name();
            format!("{name} {dir} {}: {}", f(*threshold), f(*value))
        }
    };
    format!(
        "{}Z  #{}  {} -> {}  {what}",
        time_of_day(e.at_ms),
        e.seq,
        e.from,
        e.to
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn events_and_cells_read_as_sentences() {
        let e = Event {
            seq: 7,
            at_ms: 3_723_004,
            from: "paris".into(),
            to: "tokyo".into(),
            from_proxy: 1,
            to_proxy: 2,
            kind: EventKind::RouteChanged {
                before: vec![3, 2],
                after: vec![2],
                before_via: vec!["london".into()],
                after_via: vec![],
            },
        };
        assert_eq!(
            event(&e),
            "01:02:03.004Z  #7  paris -> tokyo  route changed: via london => direct"
        );
        let m = Matrix {
            cells: vec![Cell {
                from: "paris".into(),
                to: "tokyo".into(),
                reported: true,
                reachable: true,
                via: vec!["london".into()],
                figures: pon_proto::pmon::Figures {
                    rtt_us: Some(61_234),
                    loss_ppm: Some(10_000),
                    ..Default::default()
                },
                ..Cell::default()
            }],
            ..Matrix::default()
        };
        let t = matrix(&m);
        assert!(
            t.lines()
                .nth(1)
                .unwrap()
                .starts_with("paris  tokyo  via london  61.2"),
            "{t}"
        );
        assert!(t.contains("1.0%"), "{t}");
    }
}
