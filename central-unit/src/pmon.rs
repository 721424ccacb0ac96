//! PMon on the CU, without I/O: the proxies' reports folded into a
//! site-by-site matrix kept current, and the events derived from it (route
//! changed, unreachable, reachable again, a threshold crossed with
//! hysteresis). The server feeds it reports with the reporter the
//! connection authenticated, and the directory of online proxies; it hands
//! events to subscribers and changed cells to streams and the web view.
//!
//! The CU measures nothing itself: it forwards what proxies already
//! measure for their routers.

use pon_proto::pmon::{
    Cell, DestinationReport, Event, EventKind, Figures, Matrix, Metric, ProxyRef, Report,
    ReportError, Subscription, Thresholds, PPM,
};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, BTreeSet, VecDeque};

/// The `[pmon]` section of cu.toml.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields, default)]
pub struct PmonSettings {
    /// A pair whose RTT rises above this is announced (`above`) ...
    pub rtt_threshold_ms: f64,
    /// ... and whose loss rises above this fraction.
    #[schemars(extend("x-unit" = "fraction"))]
    pub loss_threshold: f64,
    /// A pair above a threshold is announced back below it only once it
    /// has fallen this fraction under it, so a value hovering around the
    /// threshold makes one event, not one per report.
    #[schemars(extend("x-unit" = "fraction"))]
    pub hysteresis: f64,
    /// Events kept for the web view and new subscribers.
    #[schemars(extend("x-unit" = "events"))]
    pub recent_events: usize,
}

impl Default for PmonSettings {
    fn default() -> Self {
        PmonSettings {
            rtt_threshold_ms: 200.0,
            loss_threshold: 0.05,
            hysteresis: 0.2,
            recent_events: 100,
        }
    }
}

impl PmonSettings {
    pub fn check(&self) -> Result<(), String> {
        let ok = self.rtt_threshold_ms.is_finite()
            && self.rtt_threshold_ms > 0.0
            && self.rtt_threshold_ms <= 60_000.0
            && self.loss_threshold > 0.0
            && self.loss_threshold <= 1.0
            && (0.0..1.0).contains(&self.hysteresis)
            && self.recent_events <= 100_000;
        if ok {
            Ok(())
        } else {
            Err(
                "[pmon] wants 0 < rtt_threshold_ms <= 60000, 0 < loss_threshold <= 1, \
                 0 <= hysteresis < 1, recent_events <= 100000"
                    .into(),
            )
        }
    }

    fn rtt_us(&self) -> u32 {
        (self.rtt_threshold_ms * 1000.0) as u32
    }

    fn loss_ppm(&self) -> u32 {
        (self.loss_threshold * f64::from(PPM)) as u32
    }

    /// The thresholds every consumer gets unless it brings its own, in the
    /// form a subscription brings them (so one rule serves both).
    pub fn thresholds(&self) -> Thresholds {
        Thresholds {
            rtt_us: Some(self.rtt_us()),
            loss_ppm: Some(self.loss_ppm()),
            hysteresis_ppm: (self.hysteresis * f64::from(PPM)) as u32,
        }
    }
}

/// Whether a pair is above its RTT and loss thresholds: one per pair for
/// the server's thresholds, and one per pair per consumer with its own.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Crossed {
    pub rtt: bool,
    pub loss: bool,
}

/// The threshold events of one report of a pair, under thresholds `t`,
/// from the pair's state `c` (which it updates): `above` when a value
/// rises over its threshold, `below` once it has fallen under it less the
/// hysteresis, nothing in between. Only a working route's figures count.
pub fn cross(
    t: &Thresholds,
    reachable: bool,
    f: &Figures,
    c: &mut Crossed,
    out: &mut Vec<EventKind>,
) {
    if !reachable {
        return;
    }
    for (metric, value, threshold, above) in [
        (Metric::Rtt, f.rtt_us, t.rtt_us, &mut c.rtt),
        (Metric::Loss, f.loss_ppm, t.loss_ppm, &mut c.loss),
    ] {
        let (Some(v), Some(th)) = (value, threshold) else {
            continue;
        };
        if !*above && v > th {
            *above = true;
            out.push(EventKind::Above {
                metric,
                value: v,
                threshold: th,
            });
        } else if *above && v < t.lower(th) {
            *above = false;
            out.push(EventKind::Below {
                metric,
                value: v,
                threshold: th,
            });
        }
    }
}

/// In a changed pair's mask (beside the [`Metric::bit`]s): it appeared,
/// went, or its reachability changed.
pub const CHANGED_PAIR: u8 = 1 << 7;

/// What changed about a pair's figures between two reports, as a mask of
/// [`Metric::bit`]s and [`CHANGED_PAIR`].
fn what_changed(old: Option<&DestinationReport>, new: &DestinationReport) -> u8 {
    let Some(o) = old else {
        return CHANGED_PAIR;
    };
    let (a, b) = (&o.figures, &new.figures);
    let mut m = 0;
    for (metric, differs) in [
        (Metric::Rtt, a.rtt_us != b.rtt_us),
        (Metric::Loss, a.loss_ppm != b.loss_ppm),
        (
            Metric::Percentiles,
            (a.p50_us, a.p90_us, a.p99_us) != (b.p50_us, b.p90_us, b.p99_us),
        ),
        (Metric::Jitter, a.jitter_us != b.jitter_us),
        (Metric::Route, o.route != new.route),
    ] {
        if differs {
            m |= metric.bit();
        }
    }
    if o.reachable != new.reachable {
        m |= CHANGED_PAIR;
    }
    m
}

/// A pair's cell that changed, and what changed in it (see [`what_changed`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Changed {
    pub cell: Cell,
    pub what: u8,
}

/// One destination of a folded report, as consumers' own thresholds see it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Sample {
    pub from: u32,
    pub to: u32,
    pub reachable: bool,
    pub figures: Figures,
}

/// Why a report was not used at all, by label for the metrics.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refused {
    /// The connection is not an online proxy's.
    NotAProxy,
    Invalid(ReportError),
}

impl Refused {
    pub fn label(&self) -> &'static str {
        match self {
            Refused::NotAProxy => "not_a_proxy",
            Refused::Invalid(e) => e.label(),
        }
    }
}

/// What a report did besides its events: destinations left out because
/// they (or a relay on their route) are not online proxies of another site.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Folded {
    pub skipped: usize,
    /// The destinations folded in, in order.
    pub samples: Vec<Sample>,
    /// Pairs of the reporter that left the matrix (no longer reported):
    /// consumers' own state about them goes too.
    pub dropped: Vec<(u32, u32)>,
}

/// Online proxies by id: who may report, and what ids name.
pub type Directory = BTreeMap<u32, ProxyRef>;

#[derive(Debug, Clone)]
struct Entry {
    report: DestinationReport,
    at_ms: u64,
    crossed: Crossed,
}

#[derive(Debug)]
pub struct Pmon {
    settings: PmonSettings,
    thresholds: Thresholds,
    /// (reporting proxy, destination proxy) -> its latest report.
    entries: BTreeMap<(u32, u32), Entry>,
    recent: VecDeque<Event>,
    seq: u64,
    /// Pairs changed since [`Pmon::take_changed`], and what changed.
    changed: BTreeMap<(u32, u32), u8>,
}

impl Pmon {
    pub fn new(settings: PmonSettings) -> Self {
        Pmon {
            settings,
            thresholds: settings.thresholds(),
            entries: BTreeMap::new(),
            recent: VecDeque::new(),
            seq: 0,
            changed: BTreeMap::new(),
        }
    }

    /// Folds in the report that came on proxy `from`'s authenticated
    /// connection; returns the events it caused. The report speaks only for
    /// `from`: nothing in it names its sender.
    pub fn report(
        &mut self,
        from: u32,
        report: &Report,
        dir: &Directory,
        now_ms: u64,
    ) -> Result<(Vec<Event>, Folded), Refused> {
        let Some(me) = dir.get(&from) else {
            return Err(Refused::NotAProxy);
        };
        report.check().map_err(Refused::Invalid)?;
        let mut events = Vec::new();
        let mut folded = Folded::default();
        let mut kept = BTreeSet::new();
        for d in &report.destinations {
            let usable = dir.get(&d.dst).is_some_and(|to| {
                to.site != me.site && d.route.iter().all(|h| dir.contains_key(h))
            });
            if !usable {
                folded.skipped += 1;
                continue;
            }
            kept.insert(d.dst);
            self.fold(from, d, dir, now_ms, &mut events);
            folded.samples.push(Sample {
                from,
                to: d.dst,
                reachable: d.reachable,
                figures: d.figures.clone(),
            });
        }
        // Destinations the proxy no longer reports on (its router stopped
        // optimising them) leave the matrix.
        let stale: Vec<_> = self
            .entries
            .range((from, 0)..=(from, u32::MAX))
            .map(|(k, _)| *k)
            .filter(|(_, to)| !kept.contains(to))
            .collect();
        for k in stale {
            self.entries.remove(&k);
            self.changed.insert(k, CHANGED_PAIR);
            folded.dropped.push(k);
        }
        for e in &events {
            if self.recent.len() >= self.settings.recent_events {
                self.recent.pop_front();
            }
            if self.settings.recent_events > 0 {
                self.recent.push_back(e.clone());
            }
        }
        Ok((events, folded))
    }

    fn fold(
        &mut self,
        from: u32,
        d: &DestinationReport,
        dir: &Directory,
        now_ms: u64,
        events: &mut Vec<Event>,
    ) {
        let key = (from, d.dst);
        let mut kinds = Vec::new();
        let prev = self.entries.get(&key);
        if let Some(p) = prev {
            if p.report.reachable && !d.reachable {
                kinds.push(EventKind::Unreachable);
            }
            if !p.report.reachable && d.reachable {
                kinds.push(EventKind::Reachable);
            }
            if p.report.reachable && d.reachable && p.report.route != d.route {
                kinds.push(EventKind::RouteChanged {
                    before: p.report.route.clone(),
                    after: d.route.clone(),
                    before_via: via(&p.report.route, dir),
                    after_via: via(&d.route, dir),
                });
            }
        }
        let mut crossed = prev.map_or(Crossed::default(), |p| p.crossed);
        cross(
            &self.thresholds,
            d.reachable,
            &d.figures,
            &mut crossed,
            &mut kinds,
        );
        let what = what_changed(prev.map(|p| &p.report), d);
        if what != 0 {
            *self.changed.entry(key).or_insert(0) |= what;
        }
        self.entries.insert(
            key,
            Entry {
                report: d.clone(),
                at_ms: now_ms,
                crossed,
            },
        );
        for kind in kinds {
            events.push(self.stamp(from, d.dst, kind, dir, now_ms));
        }
    }

    /// An event of pair `from` -> `to` (both in `dir`) with the next
    /// sequence number: the server's own events, and those a consumer's
    /// own thresholds derive, share one sequence.
    pub fn stamp(
        &mut self,
        from: u32,
        to: u32,
        kind: EventKind,
        dir: &Directory,
        now_ms: u64,
    ) -> Event {
        self.seq += 1;
        Event {
            seq: self.seq,
            at_ms: now_ms,
            from: dir[&from].site.clone(),
            to: dir[&to].site.clone(),
            from_proxy: from,
            to_proxy: to,
            kind,
        }
    }

    /// The server's thresholds.
    pub fn thresholds(&self) -> &Thresholds {
        &self.thresholds
    }

    /// A proxy went away: its reports, and reports about it, go.
    pub fn forget(&mut self, proxy: u32) {
        let gone: Vec<_> = self
            .entries
            .keys()
            .filter(|(a, b)| *a == proxy || *b == proxy)
            .copied()
            .collect();
        for k in gone {
            self.entries.remove(&k);
            self.changed.insert(k, CHANGED_PAIR);
        }
    }

    /// Events kept for late comers, oldest first.
    pub fn recent(&self) -> impl DoubleEndedIterator<Item = &Event> {
        self.recent.iter()
    }

    fn cell(&self, from: &ProxyRef, to: &ProxyRef, dir: &Directory, now_ms: u64) -> Cell {
        let mut c = Cell {
            from: from.site.clone(),
            to: to.site.clone(),
            from_proxy: from.id,
            to_proxy: to.id,
            ..Cell::default()
        };
        if let Some(e) = self.entries.get(&(from.id, to.id)) {
            let r = &e.report;
            c.reported = true;
            c.reachable = r.reachable;
            c.route = r.route.clone();
            c.via = via(&r.route, dir);
            c.figures = r.figures.clone();
            c.age_ms = now_ms.saturating_sub(e.at_ms);
        }
        c
    }

    /// The cell of each ordered pair of distinct sites with online proxies
    /// that `filter` selects. Where a site has several proxies, the pair's
    /// cell is the most recent report between any two of them.
    pub fn matrix(&self, filter: &Subscription, dir: &Directory, now_ms: u64) -> Matrix {
        let mut best: BTreeMap<(&str, &str), Cell> = BTreeMap::new();
        for a in dir.values() {
            for b in dir.values() {
                if a.site == b.site || !filter.matches(&a.site, &b.site) {
                    continue;
                }
                let c = self.cell(a, b, dir, now_ms);
                let slot = best.entry((a.site.as_str(), b.site.as_str()));
                let fresher = |old: &Cell| {
                    (c.reported, std::cmp::Reverse(c.age_ms))
                        > (old.reported, std::cmp::Reverse(old.age_ms))
                };
                match slot {
                    std::collections::btree_map::Entry::Vacant(v) => {
                        v.insert(c);
                    }
                    std::collections::btree_map::Entry::Occupied(mut o) => {
                        if fresher(o.get()) {
                            o.insert(c);
                        }
                    }
                }
            }
        }
        Matrix {
            proxies: dir.values().cloned().collect(),
            cells: best.into_values().collect(),
            rtt_threshold_us: self.settings.rtt_us(),
            loss_threshold_ppm: self.settings.loss_ppm(),
        }
    }

    /// The cells of the pairs that changed since the last call (a pair
    /// whose report went shows as not reported).
    pub fn take_changed(&mut self, dir: &Directory, now_ms: u64) -> Vec<Changed> {
        let keys = std::mem::take(&mut self.changed);
        keys.into_iter()
            .filter_map(|((a, b), what)| {
                let cell = self.cell(dir.get(&a)?, dir.get(&b)?, dir, now_ms);
                Some(Changed { cell, what })
            })
            .collect()
    }

    /// Whether a pair changed since the last `take_changed`.
    pub fn has_changes(&self) -> bool {
        !self.changed.is_empty()
    }

    /// The (reporter, destination) pairs the CU holds a report for.
    pub fn pairs(&self) -> impl Iterator<Item = (u32, u32)> + '_ {
        self.entries.keys().copied()
    }

    /// Pairs the CU holds a report for.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }
}

/// The sites of a route's relays (every hop but the last).
fn via(route: &[u32], dir: &Directory) -> Vec<String> {
    let relays = route.split_last().map_or(&[][..], |(_, r)| r);
    relays
        .iter()
        .map(|h| {
            dir.get(h)
                .map_or_else(|| format!("#{h}"), |p| p.site.clone())
        })
        .collect()
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use pon_proto::pmon::Figures;

    pub(crate) fn dir() -> Directory {
        [(1, "paris"), (2, "tokyo"), (3, "london")]
            .into_iter()
            .map(|(id, site)| {
                (
                    id,
                    ProxyRef {
                        id,
                        site: site.into(),
                        name: format!("p{id}"),
                    },
                )
            })
            .collect()
    }

    fn dest(dst: u32, route: &[u32], rtt_ms: u32, loss_ppm: u32) -> DestinationReport {
        DestinationReport {
            dst,
            reachable: !route.is_empty(),
            route: route.to_vec(),
            figures: Figures {
                rtt_us: Some(rtt_ms * 1000),
                jitter_us: Some(100),
                loss_ppm: Some(loss_ppm),
                ..Figures::default()
            },
        }
    }

    fn report(ds: Vec<DestinationReport>) -> Report {
        Report { destinations: ds }
    }

    fn kinds(ev: &[Event]) -> Vec<&EventKind> {
        ev.iter().map(|e| &e.kind).collect()
    }

    #[test]
    fn route_changes_and_outages_become_events() {
        let (d, mut p) = (dir(), Pmon::new(PmonSettings::default()));
        let (ev, _) = p
            .report(1, &report(vec![dest(2, &[3, 2], 60, 0)]), &d, 10)
            .unwrap();
        assert!(ev.is_empty(), "a first report is no news: {ev:?}");
        let (ev, _) = p
            .report(1, &report(vec![dest(2, &[2], 150, 0)]), &d, 20)
            .unwrap();
        assert_eq!(
            kinds(&ev),
            [&EventKind::RouteChanged {
                before: vec![3, 2],
                after: vec![2],
                before_via: vec!["london".into()],
                after_via: vec![],
            }]
        );
        assert_eq!(
            (ev[0].from.as_str(), ev[0].to.as_str(), ev[0].at_ms),
            ("paris", "tokyo", 20)
        );
        let (ev, _) = p
            .report(1, &report(vec![dest(2, &[], 0, 0)]), &d, 30)
            .unwrap();
        assert_eq!(kinds(&ev), [&EventKind::Unreachable]);
        let (ev, _) = p
            .report(1, &report(vec![dest(2, &[3, 2], 60, 0)]), &d, 40)
            .unwrap();
        assert_eq!(kinds(&ev), [&EventKind::Reachable]);
        assert_eq!(p.recent().map(|e| e.seq).collect::<Vec<_>>(), [1, 2, 3]);
    }

    #[test]
    fn a_flapping_value_crosses_once_each_way() {
        let (d, mut p) = (dir(), Pmon::new(PmonSettings::default()));
        let mut all = Vec::new();
        // Around the 200 ms threshold: 190, 210, 195, 205, ..., then 150.
        for (i, rtt) in [190, 210, 195, 205, 199, 201, 170, 230, 150]
            .iter()
            .enumerate()
        {
            let (ev, _) = p
                .report(1, &report(vec![dest(2, &[2], *rtt, 0)]), &d, i as u64)
                .unwrap();
            all.extend(ev);
        }
        assert_eq!(
            kinds(&all),
            [
                &EventKind::Above {
                    metric: Metric::Rtt,
                    value: 210_000,
                    threshold: 200_000
                },
                &EventKind::Below {
                    metric: Metric::Rtt,
                    value: 150_000,
                    threshold: 200_000
                }
            ]
        );
        let (ev, _) = p
            .report(1, &report(vec![dest(2, &[2], 100, 60_000)]), &d, 99)
            .unwrap();
        assert!(matches!(
            ev[..],
            [Event {
                kind: EventKind::Above {
                    metric: Metric::Loss,
                    ..
                },
                ..
            }]
        ));
    }

    #[test]
    fn a_proxy_speaks_only_for_its_own_site() {
        let (d, mut p) = (dir(), Pmon::new(PmonSettings::default()));
        // Paris's proxy reports; whatever it says, only paris -> X cells move.
        let (_, folded) = p
            .report(
                1,
                &report(vec![
                    dest(2, &[2], 60, 0),
                    dest(3, &[3], 30, 0),
                    dest(1, &[1], 1, 0),
                    dest(9, &[9], 1, 0),
                ]),
                &d,
                5,
            )
            .unwrap();
        // Itself (same site) and an unknown proxy are skipped.
        assert_eq!(folded.skipped, 2);
        let m = p.matrix(&Subscription::default(), &d, 5);
        assert_eq!(m.cells.len(), 6, "every ordered pair of 3 sites");
        for c in &m.cells {
            assert_eq!(c.reported, c.from == "paris", "{c:?}");
        }
        // A connection that is not an online proxy reports nothing.
        assert_eq!(
            p.report(7, &report(vec![dest(2, &[2], 60, 0)]), &d, 6)
                .map(|_| ()),
            Err(Refused::NotAProxy)
        );
        // A report that breaks its own rules changes nothing.
        let bad = report(vec![dest(2, &[2], 60, 0), dest(2, &[2], 60, 0)]);
        assert!(matches!(p.report(2, &bad, &d, 7), Err(Refused::Invalid(_))));
        assert!(p
            .matrix(&Subscription::default(), &d, 7)
            .cells
            .iter()
            .all(|c| c.reported == (c.from == "paris")));
    }

    #[test]
    fn the_matrix_follows_filters_and_departures() {
        let (mut d, mut p) = (dir(), Pmon::new(PmonSettings::default()));
        p.report(1, &report(vec![dest(2, &[3, 2], 60, 0)]), &d, 0)
            .unwrap();
        let pair = Subscription {
            from: Some("paris".into()),
            to: Some("tokyo".into()),
            stream: false,
            ..Default::default()
        };
        let m = p.matrix(&pair, &d, 250);
        assert_eq!(m.cells.len(), 1);
        let c = &m.cells[0];
        assert_eq!(
            (c.via.clone(), c.figures.rtt_us, c.age_ms),
            (vec!["london".to_string()], Some(60_000), 250)
        );
        assert_eq!(p.take_changed(&d, 250).len(), 1);
        assert!(p.take_changed(&d, 260).is_empty());
        // The same report again changes no cell.
        p.report(1, &report(vec![dest(2, &[3, 2], 60, 0)]), &d, 300)
            .unwrap();
        assert!(p.take_changed(&d, 300).is_empty());
        // London goes: its cells go, and paris's route through it with them.
        p.forget(1);
        d.remove(&1);
        assert!(p.is_empty());
        assert_eq!(p.matrix(&Subscription::default(), &d, 300).cells.len(), 2);
        // A destination no longer reported leaves the matrix.
        p.report(2, &report(vec![dest(3, &[3], 30, 0)]), &d, 400)
            .unwrap();
        p.report(2, &report(vec![]), &d, 500).unwrap();
        assert!(p.is_empty());
    }
}
