//! Time series of link matrices: one RTT/loss matrix per interval, either
//! generated (geography-like RTTs, inflated direct links that relays beat,
//! congestion episodes, link and site outages) or read from a CSV file.

use crate::rng::Rng;
use std::fmt::Write as _;
use std::io::BufRead;

/// RTT (ms) and loss of every directed link at every interval. A link that
/// is down has loss 1 (its RTT is then meaningless).
#[derive(Debug, Clone)]
pub struct Scenario {
    pub nodes: usize,
    pub intervals: usize,
    rtt: Vec<f32>,
    loss: Vec<f32>,
    /// One line saying where the series came from.
    pub description: String,
}

/// The true state of a path at one interval.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct PathTruth {
    pub rtt_ms: f64,
    pub loss: f64,
}

impl PathTruth {
    pub fn alive(&self) -> bool {
        self.loss < 1.0
    }
}

/// Forwarding time added at each relay (a userspace proxy).
pub const RELAY_MS: f64 = 0.3;

impl Scenario {
    fn at(&self, t: usize, i: usize, j: usize) -> usize {
        (t * self.nodes + i) * self.nodes + j
    }

    /// RTT and loss of the link from `i` to `j` during interval `t`.
    pub fn link(&self, t: usize, i: usize, j: usize) -> (f64, f64) {
        let k = self.at(t, i, j);
        (f64::from(self.rtt[k]), f64::from(self.loss[k]))
    }

    /// A path from `src` through `hops` (node indices, destination last):
    /// RTTs add up (plus forwarding at each relay), deliveries multiply.
    pub fn path(&self, t: usize, src: usize, hops: &[usize]) -> PathTruth {
        let mut rtt = 0.0;
        let mut deliver = 1.0;
        let mut from = src;
        for &h in hops {
            let (r, l) = self.link(t, from, h);
            rtt += r;
            deliver *= 1.0 - l;
            from = h;
        }
        rtt += RELAY_MS * (hops.len() - 1) as f64;
        PathTruth {
            rtt_ms: rtt,
            loss: if deliver <= 0.0 { 1.0 } else { 1.0 - deliver },
        }
    }
}

/// Knobs of the generated series. Rates are per link (or site) per interval.
#[derive(Debug, Clone)]
pub struct GenParams {
    pub nodes: usize,
    pub intervals: usize,
    pub seed: u64,
    /// Share of links whose direct Internet route is inflated (a BGP detour),
    /// so that going through a relay is faster: triangle-inequality
    /// violations.
    pub inflated_share: f64,
    pub link_outage_rate: f64,
    pub link_outage_mean: f64,
    pub site_outage_rate: f64,
    pub site_outage_mean: f64,
    pub congestion_rate: f64,
    pub congestion_mean: f64,
}

impl GenParams {
    pub fn new(nodes: usize, intervals: usize, seed: u64) -> Self {
        GenParams {
            nodes,
            intervals,
            seed,
            inflated_share: 0.15,
            link_outage_rate: 0.0005,
            link_outage_mean: 20.0,
            site_outage_rate: 0.0001,
            site_outage_mean: 15.0,
            congestion_rate: 0.002,
            congestion_mean: 30.0,
        }
    }
}

/// Cloud regions (latitude, longitude) that sites are scattered around.
const REGIONS: [(f64, f64); 14] = [
    (39.0, -77.5),  // US east
    (45.6, -121.2), // US west
    (41.9, -87.6),  // US central
    (-23.5, -46.6), // Brazil
    (53.3, -6.3),   // Ireland
    (50.1, 8.7),    // Frankfurt
    (48.9, 2.4),    // Paris
    (59.3, 18.1),   // Stockholm
    (25.3, 55.3),   // Gulf
    (19.1, 72.9),   // Mumbai
    (1.3, 103.8),   // Singapore
    (35.7, 139.7),  // Tokyo
    (-33.9, 151.2), // Sydney
    (-26.2, 28.0),  // Johannesburg
];

/// Light in fibre: about 200 km per millisecond one way.
const FIBRE_KM_PER_MS: f64 = 200.0;

fn great_circle_km(a: (f64, f64), b: (f64, f64)) -> f64 {
    let (la1, lo1) = (a.0.to_radians(), a.1.to_radians());
    let (la2, lo2) = (b.0.to_radians(), b.1.to_radians());
    let h = ((la2 - la1) / 2.0).sin().powi(2)
        + la1.cos() * la2.cos() * ((lo2 - lo1) / 2.0).sin().powi(2);
    2.0 * 6371.0 * h.sqrt().min(1.0).asin()
}

#[derive(Clone, Copy, Default)]
struct Episode {
    until: usize,
    factor: f64,
    loss: f64,
}

/// Generates a series. Links are symmetric (the same RTT both ways).
pub fn generate(p: &GenParams) -> Scenario {
    let n = p.nodes;
    let mut rng = Rng::new(p.seed);
    let sites: Vec<(f64, f64)> = (0..n)
        .map(|_| {
            let (la, lo) = REGIONS[rng.below(REGIONS.len())];
            (la + 3.0 * rng.normal(), lo + 3.0 * rng.normal())
        })
        .collect();
    // Static part of each link: propagation over a stretched route, access
    // delay, background loss, and for some links a detour.
    let mut base = vec![0.0f64; n * n];
    let mut base_loss = vec![0.0f64; n * n];
    let mut inflated = 0usize;
    for i in 0..n {
        for j in i + 1..n {
            let km = great_circle_km(sites[i], sites[j]);
            let stretch = 1.3 + 0.4 * rng.normal().abs();
            let mut rtt = 2.0 * km * stretch / FIBRE_KM_PER_MS + rng.range(1.0, 4.0);
            if rng.chance(p.inflated_share) {
                rtt *= rng.range(1.5, 3.0);
                rtt += rng.range(10.0, 60.0);
                inflated += 1;
            }
            let loss = if rng.chance(0.3) {
                rng.range(0.0, 0.005)
            } else {
                0.0
            };
            for (a, b) in [(i, j), (j, i)] {
                base[a * n + b] = rtt;
                base_loss[a * n + b] = loss;
            }
        }
    }
    let t_max = p.intervals;
    let mut rtt = vec![0.0f32; t_max * n * n];
    let mut loss = vec![0.0f32; t_max * n * n];
    let mut congestion = vec![Episode::default(); n * n];
    let mut link_down = vec![0usize; n * n];
    let mut site_down = vec![0usize; n];
    let (mut link_outages, mut site_outages, mut congestions) = (0usize, 0usize, 0usize);
    for t in 0..t_max {
        for down in site_down.iter_mut() {
            if *down <= t && rng.chance(p.site_outage_rate) {
                *down = t + rng.geometric(p.site_outage_mean) as usize;
                site_outages += 1;
            }
        }
        for i in 0..n {
            for j in i + 1..n {
                let l = i * n + j;
                if link_down[l] <= t && rng.chance(p.link_outage_rate) {
                    link_down[l] = t + rng.geometric(p.link_outage_mean) as usize;
                    link_outages += 1;
                }
                if congestion[l].until <= t && rng.chance(p.congestion_rate) {
                    congestion[l] = Episode {
                        until: t + rng.geometric(p.congestion_mean) as usize,
                        factor: rng.range(1.2, 2.0),
                        loss: rng.range(0.005, 0.05),
                    };
                    congestions += 1;
                }
                let c = congestion[l];
                let (factor, extra_loss) = if c.until > t {
                    (c.factor, c.loss)
                } else {
                    (1.0, 0.0)
                };
                // Slow wander of a few percent around the base.
                let r = base[l] * factor * (1.0 + 0.02 * rng.normal()).max(0.9);
                let down = link_down[l] > t || site_down[i] > t || site_down[j] > t;
                let lo = if down {
                    1.0
                } else {
                    (base_loss[l] + extra_loss).min(1.0)
                };
                for (a, b) in [(i, j), (j, i)] {
                    let k = (t * n + a) * n + b;
                    rtt[k] = r as f32;
                    loss[k] = lo as f32;
                }
            }
        }
    }
    let mut description = String::new();
    let _ = write!(
        description,
        "generated: {n} sites in {} regions, seed {}, {inflated} of {} links inflated (triangle-inequality violations), \
         {link_outages} link outages, {site_outages} site outages, {congestions} congestion episodes",
        REGIONS.len(),
        p.seed,
        n * (n - 1) / 2,
    );
    Scenario {
        nodes: n,
        intervals: t_max,
        rtt,
        loss,
        description,
    }
}

impl Scenario {
    /// Writes the series in the format `from_csv` reads: the whole matrix at
    /// t = 0, then only the links that changed. Sites are named by index.
    pub fn write_csv<W: std::io::Write>(&self, mut w: W) -> std::io::Result<()> {
        writeln!(w, "t,src,dst,rtt_ms,loss")?;
        let n = self.nodes;
        for t in 0..self.intervals {
            for i in 0..n {
                for j in 0..n {
                    if i == j {
                        continue;
                    }
                    let k = self.at(t, i, j);
                    if t > 0 {
                        let p = self.at(t - 1, i, j);
                        if self.rtt[k] == self.rtt[p] && self.loss[k] == self.loss[p] {
                            continue;
                        }
                    }
                    if self.loss[k] >= 1.0 {
                        writeln!(w, "{t},{i},{j},inf,1")?;
                    } else {
                        // Shortest text that reads back as the same f32.
                        writeln!(w, "{t},{i},{j},{},{}", self.rtt[k], self.loss[k])?;
                    }
                }
            }
        }
        Ok(())
    }
}

#[derive(Debug, thiserror::Error)]
pub enum CsvError {
    #[error("line {line}: {problem}")]
    Line { line: usize, problem: String },
    #[error("reading: {0}")]
    Io(#[from] std::io::Error),
    #[error("no link rows")]
    Empty,
    #[error("{0} intervals x {1} nodes is too large")]
    TooLarge(usize, usize),
}

/// Reads a series from CSV rows `t,src,dst,rtt_ms,loss`:
///
/// - `t`: interval index (0, 1, ...); rows need not be sorted;
/// - `src`, `dst`: site names (any text without commas; numbered in sorted
///   order, numerically when all are numbers);
/// - `rtt_ms`: round-trip time of the link; empty, `inf` or `-` means down;
/// - `loss`: fraction 0..=1 (optional, default 0; 1 means down).
///
/// A row holds from its interval until the same link's next row, so a file
/// may give a full matrix at t = 0 and only changes after. A link given in
/// one direction only is used in both. Links never given are down. Lines
/// starting with `#`, blank lines and a header line starting with `t,` are
/// skipped. `min_intervals` extends the series by holding the last matrix.
pub fn from_csv<R: BufRead>(reader: R, min_intervals: usize) -> Result<Scenario, CsvError> {
    struct Row {
        t: usize,
        src: String,
        dst: String,
        rtt: f64,
        loss: f64,
    }
    let mut rows = Vec::new();
    for (idx, line) in reader.lines().enumerate() {
        let line = line?;
        let s = line.trim();
        if s.is_empty() || s.starts_with('#') || s.starts_with("t,") {
            continue;
        }
        let bad = |problem: String| CsvError::Line {
            line: idx + 1,
            problem,
        };
        let f: Vec<&str> = s.split(',').map(str::trim).collect();
        if f.len() < 4 || f.len() > 5 {
            return Err(bad(format!(
                "expected t,src,dst,rtt_ms[,loss], got {} fields",
                f.len()
            )));
        }
        let t: usize = f[0]
            .parse()
            .map_err(|_| bad(format!("t {:?} is not an interval index", f[0])))?;
        if f[1].is_empty() || f[2].is_empty() || f[1] == f[2] {
            return Err(bad("src and dst must be two different sites".into()));
        }
        let mut rtt = match f[3] {
            "" | "-" | "inf" => f64::INFINITY,
            x => x
                .parse::<f64>()
                .ok()
                .filter(|v| *v >= 0.0)
                .ok_or_else(|| bad(format!("rtt_ms {x:?} is not a non-negative number")))?,
        };
        let loss = match f.get(4) {
            None | Some(&"") => 0.0,
            Some(x) => x
                .parse::<f64>()
                .ok()
                .filter(|v| (0.0..=1.0).contains(v))
                .ok_or_else(|| bad(format!("loss {x:?} is not in 0..=1")))?,
        };
        let loss = if rtt.is_infinite() { 1.0 } else { loss };
        if loss >= 1.0 {
            rtt = 0.0;
        }
        rows.push(Row {
            t,
            src: f[1].to_string(),
            dst: f[2].to_string(),
            rtt,
            loss,
        });
    }
    if rows.is_empty() {
        return Err(CsvError::Empty);
    }
    let mut names: Vec<String> = rows
        .iter()
        .flat_map(|r| [r.src.clone(), r.dst.clone()])
        .collect();
    names.sort_unstable();
    names.dedup();
    if names.iter().all(|n| n.parse::<u64>().is_ok()) {
        names.sort_by_key(|n| n.parse::<u64>().unwrap_or(0));
    }
    let n = names.len();
    let id_of: std::collections::HashMap<&str, usize> = names
        .iter()
        .enumerate()
        .map(|(i, s)| (s.as_str(), i))
        .collect();
    let intervals = (rows.iter().map(|r| r.t).max().unwrap_or(0) + 1).max(min_intervals);
    if intervals.saturating_mul(n).saturating_mul(n) > 400_000_000 {
        return Err(CsvError::TooLarge(intervals, n));
    }
    rows.sort_by_key(|r| r.t);
    // Current state, and whether each direction was given explicitly.
    let mut cur_rtt = vec![0.0f32; n * n];
    let mut cur_loss = vec![1.0f32; n * n];
    let mut explicit = vec![false; n * n];
    let mut rtt = vec![0.0f32; intervals * n * n];
    let mut loss = vec![1.0f32; intervals * n * n];
    let mut next = 0;
    for t in 0..intervals {
        while next < rows.len() && rows[next].t == t {
            let r = &rows[next];
            let (a, b) = (id_of[r.src.as_str()], id_of[r.dst.as_str()]);
            cur_rtt[a * n + b] = r.rtt as f32;
            cur_loss[a * n + b] = r.loss as f32;
            explicit[a * n + b] = true;
            if !explicit[b * n + a] {
                cur_rtt[b * n + a] = r.rtt as f32;
                cur_loss[b * n + a] = r.loss as f32;
            }
            next += 1;
        }
        let at = t * n * n;
        rtt[at..at + n * n].copy_from_slice(&cur_rtt);
        loss[at..at + n * n].copy_from_slice(&cur_loss);
    }
    Ok(Scenario {
        nodes: n,
        intervals,
        rtt,
        loss,
        description: format!("csv: {n} sites, {intervals} intervals, {} rows", rows.len()),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generated_series_has_violations_outages_and_is_reproducible() {
        let p = GenParams {
            link_outage_rate: 0.002,
            ..GenParams::new(20, 100, 4)
        };
        let a = generate(&p);
        let b = generate(&p);
        assert_eq!(a.rtt, b.rtt);
        assert_eq!(a.description, b.description);
        // Triangle-inequality violations: some direct links beaten by a relay.
        let mut violations = 0;
        for i in 0..20 {
            for j in 0..20 {
                if i == j {
                    continue;
                }
                let direct = a.path(0, i, &[j]).rtt_ms;
                if (0..20).any(|r| r != i && r != j && a.path(0, i, &[r, j]).rtt_ms < direct * 0.9)
                {
                    violations += 1;
                }
            }
        }
        assert!(violations > 20, "{violations}");
        // Outages: some link is down at some time, up at others.
        let downs = (0..100)
            .flat_map(|t| (0..20).flat_map(move |i| (0..20).map(move |j| (t, i, j))))
            .filter(|&(t, i, j)| i != j && a.link(t, i, j).1 >= 1.0)
            .count();
        assert!(downs > 0);
        assert!(downs < 100 * 380 / 10);
        // Symmetric links, plausible intercontinental RTTs.
        for i in 0..20 {
            for j in 0..20 {
                if i != j {
                    assert_eq!(a.link(7, i, j), a.link(7, j, i));
                    let r = a.link(7, i, j).0;
                    assert!((1.0..2000.0).contains(&r), "{r}");
                }
            }
        }
    }

    #[test]
    fn path_truth_adds_rtt_and_compounds_loss() {
        let csv = "t,src,dst,rtt_ms,loss\n0,a,b,10,0.1\n0,b,c,20,0.5\n0,a,c,50\n";
        let s = from_csv(csv.as_bytes(), 1).unwrap();
        let p = s.path(0, 0, &[1, 2]);
        assert!((p.rtt_ms - (30.0 + RELAY_MS)).abs() < 1e-6);
        assert!((p.loss - (1.0 - 0.9 * 0.5)).abs() < 1e-6);
        assert_eq!(s.path(0, 0, &[2]).rtt_ms, 50.0);
    }

    #[test]
    fn csv_rows_hold_until_changed_and_mirror_one_way_links() {
        let csv = "# a comment\n\
                   t,src,dst,rtt_ms,loss\n\
                   0,1,2,10,0\n\
                   0,2,1,12,0\n\
                   0,1,3,30,\n\
                   3,1,3,inf,\n\
                   5,1,3,31,0.02\n";
        let s = from_csv(csv.as_bytes(), 8).unwrap();
        assert_eq!(s.nodes, 3);
        assert_eq!(s.intervals, 8);
        assert_eq!(s.link(0, 0, 1), (10.0, 0.0));
        assert_eq!(s.link(0, 1, 0), (12.0, 0.0));
        assert_eq!(s.link(2, 2, 0), (30.0, 0.0), "mirrored");
        assert_eq!(s.link(4, 0, 2).1, 1.0, "down");
        assert!(!s.path(4, 0, &[2]).alive());
        let (r, l) = s.link(7, 0, 2);
        assert!((r - 31.0).abs() < 1e-4 && (l - 0.02).abs() < 1e-6);
        assert_eq!(s.link(0, 1, 2).1, 1.0, "never given: down");
    }

    #[test]
    fn written_csv_reads_back_identically() {
        let g = generate(&GenParams {
            link_outage_rate: 0.01,
            ..GenParams::new(6, 30, 2)
        });
        let mut buf = Vec::new();
        g.write_csv(&mut buf).unwrap();
        let r = from_csv(buf.as_slice(), 1).unwrap();
        assert_eq!((r.nodes, r.intervals), (6, 30));
        for t in 0..30 {
            for i in 0..6 {
                for j in 0..6 {
                    if i == j {
                        continue;
                    }
                    let (a, b) = (g.link(t, i, j), r.link(t, i, j));
                    assert_eq!(a.1, b.1, "loss t={t} {i}->{j}");
                    if a.1 < 1.0 {
                        assert_eq!(a.0, b.0, "rtt t={t} {i}->{j}");
                    }
                }
            }
        }
    }

    #[test]
    fn csv_errors_name_the_line() {
        for (doc, needle) in [
            ("0,a,b\n", "line 1"),
            ("0,a,b,10\nx,a,b,10\n", "line 2"),
            ("0,a,a,10\n", "different"),
            ("0,a,b,-5\n", "rtt_ms"),
            ("0,a,b,5,2\n", "loss"),
        ] {
            let e = from_csv(doc.as_bytes(), 1).unwrap_err().to_string();
            assert!(e.contains(needle), "{doc:?}: {e}");
        }
        assert!(matches!(
            from_csv("# nothing\n".as_bytes(), 1),
            Err(CsvError::Empty)
        ));
    }
}
