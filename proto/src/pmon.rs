//! Monitoring as a service (PMon): what proxies report to the CU about
//! their destinations, and what the CU serves to consumers (`ponctl
//! matrix`, `ponctl watch`, the web view): the site-by-site matrix and the
//! events derived from it.
//!
//! A report carries no sender: the CU files it under the proxy whose
//! authenticated connection it came on, so a proxy can only ever speak for
//! its own site. Every report is checked with [`Report::check`] before the
//! CU looks at it.

use serde::{Deserialize, Serialize};

/// Most destinations one report may name (a frame from an agent is at most
/// [`crate::control::MAX_AGENT_FRAME`] bytes anyway).
pub const MAX_DESTINATIONS: usize = 1024;
/// Longest route a report may name: the PON header's hop limit.
pub const MAX_ROUTE_HOPS: usize = crate::pon::MAX_HOPS;
/// Largest RTT (or percentile, or jitter) a report may carry: a minute.
pub const MAX_US: u32 = 60_000_000;
/// Loss is in parts per million: this is all packets lost.
pub const PPM: u32 = 1_000_000;

/// A proxy's measurements of the destinations its router optimises, as
/// its router and monitor last saw them.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct Report {
    pub destinations: Vec<DestinationReport>,
}

/// One destination proxy, from the reporting proxy.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct DestinationReport {
    /// The destination proxy's id.
    pub dst: u32,
    /// Whether any overlay path to it works (if not, traffic takes the IP path).
    pub reachable: bool,
    /// The current route: hops after the reporter (relays, then `dst`);
    /// empty while unreachable.
    pub route: Vec<u32>,
    /// What the monitor measures on the current route.
    pub figures: Figures,
}

/// A route's figures, as the proxy's monitor has them (integers on the
/// wire: no NaN to check, and messages compare exactly).
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct Figures {
    /// Smoothed RTT, µs.
    pub rtt_us: Option<u32>,
    pub p50_us: Option<u32>,
    pub p90_us: Option<u32>,
    pub p99_us: Option<u32>,
    /// RFC 3550 jitter, µs.
    pub jitter_us: Option<u32>,
    /// Probes lost, parts per million.
    pub loss_ppm: Option<u32>,
}

impl Figures {
    fn check(&self) -> Result<(), ReportError> {
        let us = [
            self.rtt_us,
            self.p50_us,
            self.p90_us,
            self.p99_us,
            self.jitter_us,
        ];
        if us.iter().flatten().any(|v| *v > MAX_US) || self.loss_ppm.is_some_and(|l| l > PPM) {
            return Err(ReportError::BadValue);
        }
        Ok(())
    }
}

/// Why a report was refused: a stable label each, for the CU's metrics.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum ReportError {
    #[error("more than {MAX_DESTINATIONS} destinations")]
    TooManyDestinations,
    #[error("destination {0} named twice")]
    DuplicateDestination(u32),
    #[error("a route of more than {MAX_ROUTE_HOPS} hops")]
    RouteTooLong,
    #[error("proxy id 0 is reserved")]
    ZeroId,
    #[error("a route that does not end at its destination, or passes a proxy twice")]
    BadRoute,
    #[error("a reachable destination without a route, or an unreachable one with one")]
    Inconsistent,
    #[error("a value out of range (a time over a minute, or loss over 100 %)")]
    BadValue,
}

impl ReportError {
    pub const LABELS: [&'static str; 7] = [
        "too_many_destinations",
        "duplicate_destination",
        "route_too_long",
        "zero_id",
        "bad_route",
        "inconsistent",
        "bad_value",
    ];

    /// A short stable label for metrics (one of [`ReportError::LABELS`]).
    pub fn label(&self) -> &'static str {
        Self::LABELS[self.index()]
    }

    pub fn index(&self) -> usize {
        match self {
            ReportError::TooManyDestinations => 0,
            ReportError::DuplicateDestination(_) => 1,
            ReportError::RouteTooLong => 2,
            ReportError::ZeroId => 3,
            ReportError::BadRoute => 4,
            ReportError::Inconsistent => 5,
            ReportError::BadValue => 6,
        }
    }
}

impl Report {
    /// Checks everything a report says about itself; what it says about
    /// others (whether its destinations exist) is the CU's to check.
    pub fn check(&self) -> Result<(), ReportError> {
        if self.destinations.len() > MAX_DESTINATIONS {
            return Err(ReportError::TooManyDestinations);
        }
        let mut seen = std::collections::HashSet::with_capacity(self.destinations.len());
        for d in &self.destinations {
            if !seen.insert(d.dst) {
                return Err(ReportError::DuplicateDestination(d.dst));
            }
            d.check()?;
        }
        Ok(())
    }
}

impl DestinationReport {
    fn check(&self) -> Result<(), ReportError> {
        if self.dst == 0 || self.route.contains(&0) {
            return Err(ReportError::ZeroId);
        }
        if self.route.len() > MAX_ROUTE_HOPS {
            return Err(ReportError::RouteTooLong);
        }
        if !self.route.is_empty() {
            let mut hops = self.route.clone();
            hops.sort_unstable();
            hops.dedup();
            if self.route.last() != Some(&self.dst) || hops.len() != self.route.len() {
                return Err(ReportError::BadRoute);
            }
        }
        if self.reachable == self.route.is_empty() {
            return Err(ReportError::Inconsistent);
        }
        self.figures.check()
    }
}

/// What a consumer asks for: the cells of pairs matching the filter (a
/// site pair, every pair from or to a site, or all), once or as a stream;
/// optionally its own thresholds, the metrics it wants, and a periodic
/// snapshot. Every subscription is checked with [`Subscription::check`]
/// before the server acts on it.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct Subscription {
    /// Source site; `None`: any.
    pub from: Option<String>,
    /// Destination site; `None`: any.
    pub to: Option<String>,
    /// `false`: the matrix once, then the server closes. `true`: the
    /// matrix, then every event and every changed cell as they come.
    pub stream: bool,
    /// This consumer's own thresholds: its `above` / `below` events are
    /// derived from these (per pair, with their hysteresis) instead of the
    /// server's. `None`: the server's thresholds.
    pub thresholds: Option<Thresholds>,
    /// The metrics wanted (each at most once); empty: all. Cells carry only
    /// these figures, a changed cell is sent only when one of them (or the
    /// pair's reachability) changed, and events about a metric not asked
    /// for are left out (`route_changed` goes with [`Metric::Route`]).
    /// Reachability events always come.
    pub metrics: Vec<Metric>,
    /// A streaming subscription may also ask for a snapshot of all its
    /// cells this often (at least [`MIN_EVERY_MS`]); `None`: on change only.
    pub every_ms: Option<u32>,
}

/// A consumer's own thresholds (see [`Subscription::thresholds`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct Thresholds {
    /// `above` when the RTT rises over this (µs); `None`: no RTT events.
    pub rtt_us: Option<u32>,
    /// `above` when loss rises over this (ppm); `None`: no loss events.
    pub loss_ppm: Option<u32>,
    /// `below` only once the value has fallen this fraction (ppm) under
    /// the threshold, so a value hovering around it makes one event.
    pub hysteresis_ppm: u32,
}

impl Thresholds {
    /// The value a metric above `threshold` must fall under to be `below`.
    pub fn lower(&self, threshold: u32) -> u32 {
        let cut = u64::from(threshold) * u64::from(self.hysteresis_ppm) / u64::from(PPM);
        threshold - cut as u32
    }
}

/// The shortest schedule a subscription may ask for.
pub const MIN_EVERY_MS: u32 = 100;
/// The longest: a day.
pub const MAX_EVERY_MS: u32 = 86_400_000;
/// Longest site name a subscription may filter on (as agents' names).
pub const MAX_SITE_NAME: usize = 64;

/// Why a subscription was refused: a stable label each, for metrics.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum SubscriptionError {
    #[error("a site name that is empty or over {MAX_SITE_NAME} bytes")]
    BadSite,
    #[error(
        "thresholds out of range: RTT 1 us ..= 60 s, loss 1 ..= 1000000 ppm, at least one of them"
    )]
    BadThreshold,
    #[error("hysteresis out of range: 0 ..= 999999 ppm of the threshold")]
    BadHysteresis,
    #[error("a metric named twice")]
    BadMetrics,
    #[error("every_ms out of range ({MIN_EVERY_MS} ..= {MAX_EVERY_MS}), or without stream")]
    BadSchedule,
}

impl SubscriptionError {
    pub const LABELS: [&'static str; 5] = [
        "bad_site",
        "bad_threshold",
        "bad_hysteresis",
        "bad_metrics",
        "bad_schedule",
    ];

    pub fn index(&self) -> usize {
        match self {
            SubscriptionError::BadSite => 0,
            SubscriptionError::BadThreshold => 1,
            SubscriptionError::BadHysteresis => 2,
            SubscriptionError::BadMetrics => 3,
            SubscriptionError::BadSchedule => 4,
        }
    }

    /// A short stable label for metrics (one of [`SubscriptionError::LABELS`]).
    pub fn label(&self) -> &'static str {
        Self::LABELS[self.index()]
    }
}

impl Subscription {
    pub fn matches(&self, from: &str, to: &str) -> bool {
        self.from.as_deref().is_none_or(|f| f == from) && self.to.as_deref().is_none_or(|t| t == to)
    }

    /// Checks everything a subscription says (it comes off the network).
    pub fn check(&self) -> Result<(), SubscriptionError> {
        let site_ok = |s: &Option<String>| {
            s.as_ref()
                .is_none_or(|s| !s.is_empty() && s.len() <= MAX_SITE_NAME)
        };
        if !site_ok(&self.from) || !site_ok(&self.to) {
            return Err(SubscriptionError::BadSite);
        }
        if let Some(t) = &self.thresholds {
            let rtt_ok = t.rtt_us.is_none_or(|v| (1..=MAX_US).contains(&v));
            let loss_ok = t.loss_ppm.is_none_or(|v| (1..=PPM).contains(&v));
            if !rtt_ok || !loss_ok || (t.rtt_us.is_none() && t.loss_ppm.is_none()) {
                return Err(SubscriptionError::BadThreshold);
            }
            if t.hysteresis_ppm >= PPM {
                return Err(SubscriptionError::BadHysteresis);
            }
        }
        let mut seen = 0u8;
        for m in &self.metrics {
            if seen & m.bit() != 0 {
                return Err(SubscriptionError::BadMetrics);
            }
            seen |= m.bit();
        }
        if let Some(e) = self.every_ms {
            if !self.stream || !(MIN_EVERY_MS..=MAX_EVERY_MS).contains(&e) {
                return Err(SubscriptionError::BadSchedule);
            }
        }
        Ok(())
    }

    /// The metrics wanted, as a mask of [`Metric::bit`]s (all when none named).
    pub fn wanted(&self) -> u8 {
        if self.metrics.is_empty() {
            Metric::ALL_BITS
        } else {
            self.metrics.iter().fold(0, |m, x| m | x.bit())
        }
    }

    /// `cell` with only the figures this subscription asked for.
    pub fn trim(&self, cell: &mut Cell) {
        let w = self.wanted();
        let f = &mut cell.figures;
        if w & Metric::Rtt.bit() == 0 {
            f.rtt_us = None;
        }
        if w & Metric::Percentiles.bit() == 0 {
            (f.p50_us, f.p90_us, f.p99_us) = (None, None, None);
        }
        if w & Metric::Jitter.bit() == 0 {
            f.jitter_us = None;
        }
        if w & Metric::Loss.bit() == 0 {
            f.loss_ppm = None;
        }
        if w & Metric::Route.bit() == 0 {
            cell.route.clear();
            cell.via.clear();
        }
    }

    /// Whether an event of this kind is for this subscription (the pair
    /// filter aside).
    pub fn wants_event(&self, kind: &EventKind) -> bool {
        let w = self.wanted();
        match kind {
            EventKind::Unreachable | EventKind::Reachable => true,
            EventKind::RouteChanged { .. } => w & Metric::Route.bit() != 0,
            EventKind::Above { metric, .. } | EventKind::Below { metric, .. } => {
                w & metric.bit() != 0
            }
        }
    }
}

/// A proxy as the matrix names it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProxyRef {
    pub id: u32,
    pub site: String,
    pub name: String,
}

/// One ordered pair of sites: what the source site's proxy last reported
/// about the destination site's proxy.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct Cell {
    pub from: String,
    pub to: String,
    pub from_proxy: u32,
    pub to_proxy: u32,
    /// Whether the source proxy has reported on this pair yet; until it
    /// has, nothing below is known.
    pub reported: bool,
    pub reachable: bool,
    /// Proxy ids after the source: relays, then the destination proxy.
    pub route: Vec<u32>,
    /// The relays' sites, in order (empty: direct).
    pub via: Vec<String>,
    pub figures: Figures,
    /// How old the report is, ms.
    pub age_ms: u64,
}

/// The site-by-site matrix: every ordered pair of sites that have an
/// online proxy.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct Matrix {
    pub proxies: Vec<ProxyRef>,
    pub cells: Vec<Cell>,
    /// Thresholds the CU's events use.
    pub rtt_threshold_us: u32,
    pub loss_threshold_ppm: u32,
}

/// Cells per matrix message. A cell is at most about 700 bytes encoded
/// (two site names of 64 bytes, a route of `MAX_ROUTE_HOPS` ids and the
/// relays' site names, the figures), so a part stays well under the CU's
/// 16 MiB frame (`matrix_part_of_worst_case_cells_fits_a_frame`); a
/// thousand sites make a million cells, about sixty parts.
pub const MATRIX_PART_CELLS: usize = 16_384;

/// The messages that carry `m`: one `CuMsg::Matrix` when it fits in one
/// part (what every client understands), else `CuMsg::MatrixPart`s of at
/// most [`MATRIX_PART_CELLS`] cells each, the first with the proxies and
/// thresholds, the last marked.
pub fn matrix_messages(m: Matrix) -> Vec<crate::control::CuMsg> {
    use crate::control::CuMsg;
    if m.cells.len() <= MATRIX_PART_CELLS {
        return vec![CuMsg::Matrix(m)];
    }
    let Matrix {
        proxies,
        cells,
        rtt_threshold_us,
        loss_threshold_ppm,
    } = m;
    let n = cells.len().div_ceil(MATRIX_PART_CELLS);
    let mut out = Vec::with_capacity(n);
    let mut proxies = Some(proxies);
    let mut rest = cells.into_iter();
    for i in 0..n {
        out.push(CuMsg::MatrixPart {
            part: Matrix {
                proxies: proxies.take().unwrap_or_default(),
                cells: rest.by_ref().take(MATRIX_PART_CELLS).collect(),
                rtt_threshold_us,
                loss_threshold_ppm,
            },
            last: i + 1 == n,
        });
    }
    out
}

/// A client's side of [`matrix_messages`]: feed it the CU's messages;
/// it returns the whole matrix once complete, and refuses parts that do
/// not add up (a part after the last, or more cells than any matrix of
/// `max_cells` pairs has).
#[derive(Debug, Default)]
pub struct MatrixAssembler {
    partial: Option<Matrix>,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum AssembleError {
    #[error("a matrix part of {0} cells is over the {MATRIX_PART_CELLS} a part may have")]
    PartTooLarge(usize),
    #[error("the matrix's parts add up to more than {0} cells")]
    TooManyCells(usize),
}

impl MatrixAssembler {
    /// A whole `Matrix`, or the matrix a `MatrixPart` with `last` ends.
    /// Other messages are not the assembler's: `Ok(None)`.
    pub fn push(
        &mut self,
        msg: crate::control::CuMsg,
        max_cells: usize,
    ) -> Result<Option<Matrix>, AssembleError> {
        use crate::control::CuMsg;
        match msg {
            CuMsg::Matrix(m) => {
                self.partial = None;
                Ok(Some(m))
            }
            CuMsg::MatrixPart { part, last } => {
                if part.cells.len() > MATRIX_PART_CELLS {
                    self.partial = None;
                    return Err(AssembleError::PartTooLarge(part.cells.len()));
                }
                let whole = match self.partial.take() {
                    None => part,
                    Some(mut m) => {
                        m.cells.extend(part.cells);
                        m
                    }
                };
                if whole.cells.len() > max_cells {
                    return Err(AssembleError::TooManyCells(max_cells));
                }
                if last {
                    Ok(Some(whole))
                } else {
                    self.partial = Some(whole);
                    Ok(None)
                }
            }
            _ => Ok(None),
        }
    }
}

/// What a proxy measures on a pair's current route. Events name `Rtt`
/// and `Loss` (thresholds); subscriptions name any of them. New kinds go
/// last: the wire knows them by position.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Metric {
    /// Smoothed RTT.
    Rtt,
    /// Probes lost.
    Loss,
    /// RTT percentiles: p50, p90, p99.
    Percentiles,
    /// RFC 3550 jitter.
    Jitter,
    /// The current route (and its relays' sites).
    Route,
}

impl Metric {
    pub const ALL: [Metric; 5] = [
        Metric::Rtt,
        Metric::Loss,
        Metric::Percentiles,
        Metric::Jitter,
        Metric::Route,
    ];
    pub const ALL_BITS: u8 = 0b1_1111;

    /// Its name, as in JSON and on ponctl's command line.
    pub fn name(self) -> &'static str {
        match self {
            Metric::Rtt => "rtt",
            Metric::Loss => "loss",
            Metric::Percentiles => "percentiles",
            Metric::Jitter => "jitter",
            Metric::Route => "route",
        }
    }

    /// This metric in a mask of metrics.
    pub fn bit(self) -> u8 {
        1 << (self as u8)
    }
}

/// Externally tagged (serde's default), as postcard needs: in JSON an
/// event's `kind` is `"unreachable"`, or `{"route_changed": {...}}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum EventKind {
    /// The source proxy moved the pair to another route.
    RouteChanged {
        before: Vec<u32>,
        after: Vec<u32>,
        before_via: Vec<String>,
        after_via: Vec<String>,
    },
    /// No overlay path works any more: traffic takes the IP path.
    Unreachable,
    /// An overlay path works again.
    Reachable,
    /// `metric` rose above the threshold (`value` and `threshold` in µs
    /// for RTT, ppm for loss) ...
    Above {
        metric: Metric,
        value: u32,
        threshold: u32,
    },
    /// ... and fell back below it, less the hysteresis.
    Below {
        metric: Metric,
        value: u32,
        threshold: u32,
    },
}

/// Something that happened to a pair of sites.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Event {
    /// Increases by one per event of this CU run.
    pub seq: u64,
    /// When the CU learnt of it, Unix ms.
    pub at_ms: u64,
    pub from: String,
    pub to: String,
    pub from_proxy: u32,
    pub to_proxy: u32,
    pub kind: EventKind,
}

/// Arbitrary destination reports for the property tests of this crate
/// (the CU's matrix here, the local link's report parts in `local`).
#[cfg(test)]
pub(crate) mod strategy {
    use super::{DestinationReport, Figures, PPM};
    use proptest::prelude::*;

    /// A figure: absent, anything, or around the valid range.
    fn value() -> impl Strategy<Value = Option<u32>> {
        prop_oneof![
            Just(None),
            any::<u32>().prop_map(Some),
            (0..2 * PPM).prop_map(Some)
        ]
    }

    /// A destination among `dsts`, with a route of up to 9 hops among
    /// `hops`: valid or not, as it comes.
    pub fn destination(
        dsts: impl Strategy<Value = u32>,
        hops: std::ops::Range<u32>,
    ) -> impl Strategy<Value = DestinationReport> {
        (
            dsts,
            any::<bool>(),
            proptest::collection::vec(hops, 0..10),
            [value(), value(), value(), value(), value(), value()],
        )
            .prop_map(|(dst, reachable, route, v)| DestinationReport {
                dst,
                reachable,
                route,
                figures: Figures {
                    rtt_us: v[0],
                    p50_us: v[1],
                    p90_us: v[2],
                    p99_us: v[3],
                    jitter_us: v[4],
                    loss_ppm: v[5],
                },
            })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn ok() -> DestinationReport {
        DestinationReport {
            dst: 2,
            reachable: true,
            route: vec![3, 2],
            figures: Figures {
                rtt_us: Some(61_000),
                p50_us: Some(60_000),
                p90_us: Some(62_000),
                p99_us: Some(70_000),
                jitter_us: Some(500),
                loss_ppm: Some(0),
            },
        }
    }

    /// The largest cell a matrix can hold: 64-byte site names, a route of
    /// every hop, every relay's site named, every figure at its widest.
    fn worst_cell(i: usize) -> Cell {
        let name = |k: usize| format!("{:064}", k);
        Cell {
            from: name(i),
            to: name(i + 1),
            from_proxy: u32::MAX,
            to_proxy: u32::MAX,
            reported: true,
            reachable: true,
            route: vec![u32::MAX; MAX_ROUTE_HOPS],
            via: (0..MAX_ROUTE_HOPS - 1).map(name).collect(),
            figures: Figures {
                rtt_us: Some(u32::MAX),
                p50_us: Some(u32::MAX),
                p90_us: Some(u32::MAX),
                p99_us: Some(u32::MAX),
                jitter_us: Some(u32::MAX),
                loss_ppm: Some(u32::MAX),
            },
            age_ms: u64::MAX,
        }
    }

    #[test]
    fn matrix_part_of_worst_case_cells_fits_a_frame() {
        let m = Matrix {
            proxies: Vec::new(),
            cells: (0..MATRIX_PART_CELLS).map(worst_cell).collect(),
            ..Matrix::default()
        };
        let frame = crate::control::encode(&crate::control::CuMsg::MatrixPart {
            part: m,
            last: true,
        });
        assert!(
            frame.len() <= crate::control::MAX_CU_FRAME,
            "{} bytes",
            frame.len()
        );
    }

    #[test]
    fn a_large_matrix_goes_in_parts_and_comes_back_whole() {
        let small = Matrix {
            cells: (0..3).map(worst_cell).collect(),
            ..Matrix::default()
        };
        // What fits goes as one Matrix, as before.
        assert_eq!(
            matrix_messages(small.clone()),
            vec![crate::control::CuMsg::Matrix(small)]
        );
        let n = 2 * MATRIX_PART_CELLS + 5;
        let big = Matrix {
            proxies: vec![ProxyRef {
                id: 1,
                site: "paris".into(),
                name: "p".into(),
            }],
            cells: (0..n)
                .map(|i| Cell {
                    from_proxy: i as u32,
                    ..Cell::default()
                })
                .collect(),
            rtt_threshold_us: 7,
            loss_threshold_ppm: 9,
        };
        let msgs = matrix_messages(big.clone());
        assert_eq!(msgs.len(), 3);
        let mut a = MatrixAssembler::default();
        let mut got = None;
        for (i, m) in msgs.iter().enumerate() {
            let r = a.push(m.clone(), n).unwrap();
            assert_eq!(r.is_some(), i == 2);
            got = r.or(got);
        }
        assert_eq!(got, Some(big.clone()));
        // A client that expects fewer pairs refuses the flood.
        let mut a = MatrixAssembler::default();
        let r: Result<Vec<_>, _> = msgs.into_iter().map(|m| a.push(m, n - 1)).collect();
        assert_eq!(r, Err(AssembleError::TooManyCells(n - 1)));
        // An oversized part is refused.
        let fat = crate::control::CuMsg::MatrixPart {
            part: Matrix {
                cells: vec![Cell::default(); MATRIX_PART_CELLS + 1],
                ..Matrix::default()
            },
            last: true,
        };
        assert_eq!(
            MatrixAssembler::default().push(fat, usize::MAX),
            Err(AssembleError::PartTooLarge(MATRIX_PART_CELLS + 1))
        );
    }

    #[test]
    fn good_reports_pass_and_bad_ones_say_why() {
        let r = |d: DestinationReport| Report {
            destinations: vec![d],
        };
        assert_eq!(r(ok()).check(), Ok(()));
        let unreachable = DestinationReport {
            reachable: false,
            route: vec![],
            ..ok()
        };
        assert_eq!(r(unreachable).check(), Ok(()));
        let cases = [
            (
                DestinationReport {
                    route: vec![2, 3],
                    ..ok()
                },
                ReportError::BadRoute,
            ),
            (
                DestinationReport {
                    route: vec![2, 3, 2],
                    ..ok()
                },
                ReportError::BadRoute,
            ),
            (
                DestinationReport {
                    route: (1..=9).chain([2]).collect(),
                    ..ok()
                },
                ReportError::RouteTooLong,
            ),
            (
                DestinationReport {
                    reachable: false,
                    ..ok()
                },
                ReportError::Inconsistent,
            ),
            (
                DestinationReport {
                    figures: Figures {
                        rtt_us: Some(MAX_US + 1),
                        ..ok().figures
                    },
                    ..ok()
                },
                ReportError::BadValue,
            ),
            (
                DestinationReport {
                    figures: Figures {
                        loss_ppm: Some(PPM + 1),
                        ..ok().figures
                    },
                    ..ok()
                },
                ReportError::BadValue,
            ),
            (
                DestinationReport {
                    figures: Figures {
                        p99_us: Some(u32::MAX),
                        ..ok().figures
                    },
                    ..ok()
                },
                ReportError::BadValue,
            ),
            (
                DestinationReport {
                    dst: 0,
                    route: vec![0],
                    ..ok()
                },
                ReportError::ZeroId,
            ),
        ];
        for (d, why) in cases {
            assert_eq!(r(d.clone()).check(), Err(why), "{d:?}");
            assert!(ReportError::LABELS.contains(&why.label()));
        }
        assert_eq!(
            Report {
                destinations: vec![ok(), ok()]
            }
            .check(),
            Err(ReportError::DuplicateDestination(2))
        );
        assert_eq!(
            Report {
                destinations: (1..=MAX_DESTINATIONS as u32 + 1)
                    .map(|d| DestinationReport {
                        dst: d,
                        route: vec![d],
                        ..ok()
                    })
                    .collect()
            }
            .check(),
            Err(ReportError::TooManyDestinations)
        );
    }

    #[test]
    fn events_and_matrices_cross_the_wire() {
        use crate::control::{decode, encode, CuMsg, FRAME_HEADER_LEN};
        let ev = |kind| Event {
            seq: 1,
            at_ms: 2,
            from: "paris".into(),
            to: "tokyo".into(),
            from_proxy: 1,
            to_proxy: 2,
            kind,
        };
        let msgs = [
            CuMsg::Events(vec![
                ev(EventKind::RouteChanged {
                    before: vec![3, 2],
                    after: vec![2],
                    before_via: vec!["london".into()],
                    after_via: vec![],
                }),
                ev(EventKind::Unreachable),
                ev(EventKind::Above {
                    metric: Metric::Loss,
                    value: 60_000,
                    threshold: 50_000,
                }),
            ]),
            CuMsg::Matrix(Matrix {
                cells: vec![Cell {
                    reported: true,
                    figures: ok().figures,
                    ..Cell::default()
                }],
                ..Matrix::default()
            }),
        ];
        for m in msgs {
            let f = encode(&m);
            assert_eq!(decode::<CuMsg>(&f[FRAME_HEADER_LEN..]).unwrap(), m);
        }
    }

    #[test]
    fn subscriptions_filter_pairs() {
        let all = Subscription::default();
        assert!(all.matches("paris", "tokyo"));
        let pair = Subscription {
            from: Some("paris".into()),
            to: Some("tokyo".into()),
            stream: true,
            ..Default::default()
        };
        assert!(pair.matches("paris", "tokyo"));
        assert!(!pair.matches("tokyo", "paris"));
        let dst = Subscription {
            to: Some("tokyo".into()),
            ..Default::default()
        };
        assert!(dst.matches("london", "tokyo"));
        assert!(!dst.matches("tokyo", "london"));
    }

    #[test]
    fn subscriptions_are_checked_and_trim_what_was_not_asked() {
        let ok = Subscription {
            stream: true,
            thresholds: Some(Thresholds {
                rtt_us: Some(50_000),
                loss_ppm: None,
                hysteresis_ppm: 200_000,
            }),
            metrics: vec![Metric::Rtt, Metric::Route],
            every_ms: Some(MIN_EVERY_MS),
            ..Default::default()
        };
        assert_eq!(ok.check(), Ok(()));
        assert_eq!(ok.thresholds.unwrap().lower(50_000), 40_000);
        let bad = |f: &dyn Fn(&mut Subscription)| {
            let mut s = ok.clone();
            f(&mut s);
            s.check().unwrap_err()
        };
        use SubscriptionError::*;
        assert_eq!(bad(&|s| s.from = Some(String::new())), BadSite);
        assert_eq!(bad(&|s| s.to = Some("x".repeat(65))), BadSite);
        let t = |s: &mut Subscription| s.thresholds.unwrap();
        assert_eq!(
            bad(&|s| s.thresholds.as_mut().unwrap().rtt_us = Some(MAX_US + 1)),
            BadThreshold
        );
        assert_eq!(
            bad(&|s| s.thresholds.as_mut().unwrap().rtt_us = Some(0)),
            BadThreshold
        );
        assert_eq!(
            bad(&|s| {
                let mut x = t(s);
                (x.rtt_us, x.loss_ppm) = (None, None);
                s.thresholds = Some(x);
            }),
            BadThreshold
        );
        assert_eq!(
            bad(&|s| s.thresholds.as_mut().unwrap().loss_ppm = Some(PPM + 1)),
            BadThreshold
        );
        assert_eq!(
            bad(&|s| s.thresholds.as_mut().unwrap().hysteresis_ppm = PPM),
            BadHysteresis
        );
        assert_eq!(bad(&|s| s.metrics.push(Metric::Rtt)), BadMetrics);
        assert_eq!(bad(&|s| s.every_ms = Some(MIN_EVERY_MS - 1)), BadSchedule);
        assert_eq!(bad(&|s| s.stream = false), BadSchedule);
        for e in [
            BadSite,
            BadThreshold,
            BadHysteresis,
            BadMetrics,
            BadSchedule,
        ] {
            assert!(SubscriptionError::LABELS.contains(&e.label()));
        }
        // Only what was asked stays in a cell; events follow the metrics.
        let mut c = Cell {
            route: vec![3, 2],
            via: vec!["london".into()],
            figures: self::tests::ok().figures,
            ..Cell::default()
        };
        ok.trim(&mut c);
        assert_eq!(c.figures.rtt_us, Some(61_000));
        assert_eq!(
            (c.figures.p99_us, c.figures.jitter_us, c.figures.loss_ppm),
            (None, None, None)
        );
        assert_eq!(c.route, vec![3, 2]);
        let above = |metric| EventKind::Above {
            metric,
            value: 2,
            threshold: 1,
        };
        assert!(ok.wants_event(&above(Metric::Rtt)));
        assert!(!ok.wants_event(&above(Metric::Loss)));
        assert!(ok.wants_event(&EventKind::Unreachable));
        let all = Subscription::default();
        assert_eq!(all.wanted(), Metric::ALL_BITS);
        assert!(all.wants_event(&above(Metric::Loss)));
        let mut whole = c.clone();
        all.trim(&mut whole);
        assert_eq!(whole, c);
        let (bits, n) = Metric::ALL
            .iter()
            .fold((0, 0), |(b, n), m| (b | m.bit(), n + 1));
        assert_eq!((bits, n), (Metric::ALL_BITS, 5));
    }

    fn destination() -> impl Strategy<Value = DestinationReport> {
        strategy::destination(any::<u32>(), 0u32..12)
    }

    proptest! {
        /// Whatever a report holds, checking it never panics, a checked
        /// report keeps its promises, and it survives the wire unchanged.
        #[test]
        fn checked_reports_keep_their_promises(ds in proptest::collection::vec(destination(), 0..6)) {
            let r = Report { destinations: ds };
            if r.check().is_ok() {
                for d in &r.destinations {
                    prop_assert!(d.route.len() <= MAX_ROUTE_HOPS);
                    prop_assert_eq!(d.reachable, d.route.last() == Some(&d.dst));
                    prop_assert!(d.figures.loss_ppm.is_none_or(|l| l <= PPM));
                    prop_assert!(d.figures.rtt_us.is_none_or(|v| v <= MAX_US));
                }
            }
            let bytes = crate::codec::encode(&r, usize::MAX).unwrap();
            let back: Report = crate::codec::decode(&bytes, usize::MAX).unwrap();
            prop_assert_eq!(back, r);
        }

        /// Arbitrary bytes never make the decoder panic.
        #[test]
        fn arbitrary_bytes_decode_or_fail_cleanly(bytes in proptest::collection::vec(any::<u8>(), 0..256)) {
            let _ = crate::codec::decode::<Report>(&bytes, usize::MAX).map(|r| r.check());
        }
    }
}
