//! PMon's consumers, without I/O: the engine ([`Pmon`]) with its
//! subscribers around it, as both the CU and each proxy serve them. A
//! server feeds it reports (with the reporter its connection
//! authenticated), subscriptions (with whether the certificate may
//! subscribe) and ticks; what it wants sent comes back as [`Out`].
//!
//! Each subscriber may bring its own thresholds (its `above` / `below`
//! events are derived from them, per pair, with [`crate::pmon::cross`] as
//! the server's are, so equal thresholds give equal events), ask for some
//! metrics only (cells carry only those figures; a changed cell is sent
//! only when one of them, or the pair's reachability, changed; events of
//! other metrics are left out), and ask for a snapshot of its cells on a
//! schedule.
//!
//! Bounded: [`Limits::max_streams`] streaming subscribers, and
//! [`MAX_PAIR_STATES`] pairs of own-threshold state per subscriber (pairs
//! beyond get no own-threshold events, counted).

use crate::pmon::{cross, Changed, Crossed, Directory, Pmon, PmonSettings, Refused, CHANGED_PAIR};
use pon_proto::control::{CuMsg, PROTOCOL_VERSION};
use pon_proto::pmon::{
    Cell, EventKind, Matrix, Report, ReportError, Subscription, SubscriptionError, Thresholds,
    MATRIX_PART_CELLS,
};
use pon_telemetry::{Counter, PromWriter};
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

pub type ConnId = u64;

/// Pairs a subscriber with its own thresholds keeps state for: every pair
/// of 256 sites. Pairs beyond get no own-threshold events.
pub const MAX_PAIR_STATES: usize = 65_536;

#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Streaming subscribers at once; more are refused.
    pub max_streams: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits { max_streams: 1024 }
    }
}

/// Why a subscription was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    Version,
    NotAuthorised,
    TooManyStreams,
    Invalid(SubscriptionError),
}

const REFUSALS: usize = 3 + SubscriptionError::LABELS.len();

impl Refusal {
    pub fn index(&self) -> usize {
        match self {
            Refusal::Version => 0,
            Refusal::NotAuthorised => 1,
            Refusal::TooManyStreams => 2,
            Refusal::Invalid(e) => 3 + e.index(),
        }
    }

    /// Every label, in [`Refusal::index`] order.
    pub fn labels() -> impl Iterator<Item = &'static str> {
        ["version", "not_authorised", "too_many_streams"]
            .into_iter()
            .chain(SubscriptionError::LABELS)
    }
}

/// The metric names a server exports its PMon under (`pon_cu_pmon_*` on
/// the CU, `pon_proxy_pmon_*` on a proxy).
pub struct Names {
    pub reports: &'static str,
    pub reports_refused: &'static str,
    pub skipped: &'static str,
    pub events: &'static str,
    pub subscriptions: &'static str,
    pub subscriptions_refused: &'static str,
    pub streams: &'static str,
    pub pairs: &'static str,
    pub state_full: &'static str,
}

impl Names {
    pub const CU: Names = Names {
        reports: "pon_cu_pmon_reports_total",
        reports_refused: "pon_cu_pmon_reports_refused_total",
        skipped: "pon_cu_pmon_destinations_skipped_total",
        events: "pon_cu_pmon_events_total",
        subscriptions: "pon_cu_pmon_subscriptions_total",
        subscriptions_refused: "pon_cu_pmon_subscriptions_refused_total",
        streams: "pon_cu_pmon_streams",
        pairs: "pon_cu_pmon_pairs",
        state_full: "pon_cu_pmon_own_threshold_pairs_dropped_total",
    };
    pub const PROXY: Names = Names {
        reports: "pon_proxy_pmon_reports_total",
        reports_refused: "pon_proxy_pmon_reports_refused_total",
        skipped: "pon_proxy_pmon_destinations_skipped_total",
        events: "pon_proxy_pmon_events_total",
        subscriptions: "pon_proxy_pmon_subscriptions_total",
        subscriptions_refused: "pon_proxy_pmon_subscriptions_refused_total",
        streams: "pon_proxy_pmon_streams",
        pairs: "pon_proxy_pmon_pairs",
        state_full: "pon_proxy_pmon_own_threshold_pairs_dropped_total",
    };
}

const EVENT_KINDS: [&str; 5] = [
    "route_changed",
    "unreachable",
    "reachable",
    "above",
    "below",
];
const REPORT_REFUSALS: usize = ReportError::LABELS.len() + 1;

#[derive(Default)]
pub struct PmonStats {
    pub reports: Counter,
    /// By [`Refused::label`]: "not_a_proxy", then [`ReportError::LABELS`].
    refused: [Counter; REPORT_REFUSALS],
    pub skipped: Counter,
    events: [Counter; EVENT_KINDS.len()],
    pub subscriptions: Counter,
    /// By [`Refusal::index`].
    subscriptions_refused: [Counter; REFUSALS],
    /// Own-threshold pairs a subscriber could not keep state for.
    pub state_full: Counter,
    pub streams: AtomicU64,
    pub pairs: AtomicU64,
}

impl PmonStats {
    fn refused(&self, why: Refused) -> &Counter {
        match why {
            Refused::NotAProxy => &self.refused[0],
            Refused::Invalid(e) => &self.refused[1 + e.index()],
        }
    }

    pub fn subscriptions_refused(&self, why: Refusal) -> u64 {
        self.subscriptions_refused[why.index()].get()
    }

    pub fn render(&self, n: &Names, w: &mut PromWriter) {
        w.counter(
            n.reports,
            "",
            "Measurement reports folded into the matrix.",
            self.reports.get(),
        );
        let labels = std::iter::once("not_a_proxy").chain(ReportError::LABELS);
        for (why, c) in labels.zip(&self.refused) {
            w.counter(
                n.reports_refused,
                &format!("reason=\"{why}\""),
                "Measurement reports refused, by reason.",
                c.get(),
            );
        }
        w.counter(
            n.skipped,
            "",
            "Destinations of reports left out: not an online proxy of another site, or a relay that is not.",
            self.skipped.get(),
        );
        for (kind, c) in EVENT_KINDS.iter().zip(&self.events) {
            w.counter(
                n.events,
                &format!("kind=\"{kind}\""),
                "Events derived from the reports under the server's thresholds, by kind.",
                c.get(),
            );
        }
        let refused: u64 = self.subscriptions_refused.iter().map(Counter::get).sum();
        for (result, v) in [("accepted", self.subscriptions.get()), ("refused", refused)] {
            w.counter(
                n.subscriptions,
                &format!("result=\"{result}\""),
                "Subscriptions to the matrix and events.",
                v,
            );
        }
        for (why, c) in Refusal::labels().zip(&self.subscriptions_refused) {
            w.counter(
                n.subscriptions_refused,
                &format!("reason=\"{why}\""),
                "Subscriptions refused, by reason.",
                c.get(),
            );
        }
        w.counter(
            n.state_full,
            "",
            "Pairs a subscriber with its own thresholds got no events for: its state was full.",
            self.state_full.get(),
        );
        w.gauge(
            n.streams,
            "",
            "Subscribers streaming events now.",
            self.streams.load(Ordering::Relaxed) as f64,
        );
        w.gauge(
            n.pairs,
            "",
            "Proxy pairs the matrix holds a report for.",
            self.pairs.load(Ordering::Relaxed) as f64,
        );
    }
}

/// What the hub wants done on a connection.
#[derive(Debug, PartialEq)]
pub enum Out {
    Send(ConnId, CuMsg),
    /// Send this, then close (a one-off answer, or a refusal).
    Last(ConnId, CuMsg),
}

/// A streaming subscriber.
struct Sub {
    sub: Subscription,
    wanted: u8,
    own: Option<Own>,
    /// When its next snapshot is due (Unix ms), if it asked for them.
    next_ms: Option<u64>,
}

/// A subscriber's own thresholds and, per pair, where it stands.
struct Own {
    t: Thresholds,
    state: HashMap<(u32, u32), Crossed>,
}

pub struct Hub {
    pmon: Pmon,
    subs: HashMap<ConnId, Sub>,
    stats: Arc<PmonStats>,
    limits: Limits,
}

impl Hub {
    pub fn new(settings: PmonSettings, stats: Arc<PmonStats>, limits: Limits) -> Self {
        Hub {
            pmon: Pmon::new(settings),
            subs: HashMap::new(),
            stats,
            limits,
        }
    }

    pub fn pmon(&self) -> &Pmon {
        &self.pmon
    }

    /// Pairs of own-threshold state subscriber `conn` holds.
    pub fn own_states(&self, conn: ConnId) -> usize {
        self.subs
            .get(&conn)
            .and_then(|s| s.own.as_ref())
            .map_or(0, |o| o.state.len())
    }

    /// A report from proxy `from` (as its connection authenticated it, or
    /// the proxy itself): folded in; its events go to the subscribers.
    pub fn report(&mut self, from: u32, report: &Report, dir: &Directory, now_ms: u64) -> Vec<Out> {
        let (events, folded) = match self.pmon.report(from, report, dir, now_ms) {
            Err(why) => {
                self.stats.refused(why).inc();
                tracing::debug!(from, reason = why.label(), "measurement report refused");
                return Vec::new();
            }
            Ok(r) => r,
        };
        self.stats.reports.inc();
        self.stats.skipped.add(folded.skipped as u64);
        self.stats
            .pairs
            .store(self.pmon.len() as u64, Ordering::Relaxed);
        for e in &events {
            let i = match e.kind {
                EventKind::RouteChanged { .. } => 0,
                EventKind::Unreachable => 1,
                EventKind::Reachable => 2,
                EventKind::Above { .. } => 3,
                EventKind::Below { .. } => 4,
            };
            self.stats.events[i].inc();
        }
        let mut out = Vec::new();
        let mut kinds = Vec::new();
        for (conn, s) in &mut self.subs {
            let theirs = |k: &EventKind| {
                s.sub.wants_event(k)
                    && !(s.own.is_some()
                        && matches!(k, EventKind::Above { .. } | EventKind::Below { .. }))
            };
            let mut mine: Vec<_> = events
                .iter()
                .filter(|e| s.sub.matches(&e.from, &e.to) && theirs(&e.kind))
                .cloned()
                .collect();
            if let Some(own) = &mut s.own {
                // Own state lives as long as the pair's report does, as
                // the server's does: equal thresholds, equal events.
                for k in &folded.dropped {
                    own.state.remove(k);
                }
                for x in &folded.samples {
                    if !s.sub.matches(&dir[&x.from].site, &dir[&x.to].site) {
                        continue;
                    }
                    let full = own.state.len() >= MAX_PAIR_STATES;
                    let st = match own.state.get_mut(&(x.from, x.to)) {
                        Some(st) => st,
                        None if full => {
                            self.stats.state_full.inc();
                            continue;
                        }
                        None => own.state.entry((x.from, x.to)).or_default(),
                    };
                    cross(&own.t, x.reachable, &x.figures, st, &mut kinds);
                    for k in kinds.drain(..) {
                        if s.sub.wants_event(&k) {
                            mine.push(self.pmon.stamp(x.from, x.to, k, dir, now_ms));
                        }
                    }
                }
            }
            if !mine.is_empty() {
                out.push(Out::Send(*conn, CuMsg::Events(mine)));
            }
        }
        out
    }

    /// The matrix as `sub` sees it: its pairs, its metrics, its thresholds.
    pub fn matrix(&self, sub: &Subscription, dir: &Directory, now_ms: u64) -> Matrix {
        let mut m = self.pmon.matrix(sub, dir, now_ms);
        for c in &mut m.cells {
            sub.trim(c);
        }
        if let Some(t) = &sub.thresholds {
            m.rtt_threshold_us = t.rtt_us.unwrap_or(0);
            m.loss_threshold_ppm = t.loss_ppm.unwrap_or(0);
        }
        m
    }

    /// A consumer's first message on connection `conn`. `authorised`:
    /// whether its certificate may subscribe, or the refusal to send.
    pub fn subscribe(
        &mut self,
        conn: ConnId,
        authorised: Result<(), &str>,
        version: u16,
        sub: Subscription,
        dir: &Directory,
        now_ms: u64,
    ) -> Vec<Out> {
        let refused = match (version, authorised, sub.check()) {
            (v, _, _) if v != PROTOCOL_VERSION => Some((
                Refusal::Version,
                format!("protocol version {v}, this server speaks {PROTOCOL_VERSION}"),
            )),
            (_, Err(why), _) => Some((Refusal::NotAuthorised, why.to_string())),
            (_, _, Err(e)) => Some((Refusal::Invalid(e), format!("subscription refused: {e}"))),
            _ if sub.stream && self.subs.len() >= self.limits.max_streams => Some((
                Refusal::TooManyStreams,
                format!(
                    "this server already streams to {} subscribers",
                    self.limits.max_streams
                ),
            )),
            _ => None,
        };
        if let Some((why, text)) = refused {
            self.stats.subscriptions_refused[why.index()].inc();
            return vec![Out::Last(conn, CuMsg::Refused(text))];
        }
        self.stats.subscriptions.inc();
        // A matrix too large for one frame goes in parts.
        let mut out: Vec<Out> = pon_proto::pmon::matrix_messages(self.matrix(&sub, dir, now_ms))
            .into_iter()
            .map(|m| Out::Send(conn, m))
            .collect();
        if !sub.stream {
            if let Some(Out::Send(c, m)) = out.pop() {
                out.push(Out::Last(c, m));
            }
            return out;
        }
        let s = Sub {
            wanted: sub.wanted(),
            own: sub.thresholds.map(|t| Own {
                t,
                state: HashMap::new(),
            }),
            next_ms: sub.every_ms.map(|e| now_ms + u64::from(e)),
            sub,
        };
        self.subs.insert(conn, s);
        self.stats
            .streams
            .store(self.subs.len() as u64, Ordering::Relaxed);
        out
    }

    /// Connection `conn` ended.
    pub fn gone(&mut self, conn: ConnId) {
        if self.subs.remove(&conn).is_some() {
            self.stats
                .streams
                .store(self.subs.len() as u64, Ordering::Relaxed);
        }
    }

    /// Proxy `proxy` went away: its pairs go, from the matrix and from
    /// every subscriber's own state.
    pub fn forget(&mut self, proxy: u32) {
        self.pmon.forget(proxy);
        for s in self.subs.values_mut() {
            if let Some(own) = &mut s.own {
                own.state.retain(|(a, b), _| *a != proxy && *b != proxy);
            }
        }
        self.stats
            .pairs
            .store(self.pmon.len() as u64, Ordering::Relaxed);
    }

    /// Whether [`Hub::tick`] has anything to do now: changed pairs, or a
    /// snapshot due.
    pub fn needs_tick(&self, now_ms: u64) -> bool {
        self.pmon.has_changes()
            || self
                .subs
                .values()
                .any(|s| s.next_ms.is_some_and(|t| t <= now_ms))
    }

    /// Changed cells to the streams that want them, and the snapshots due.
    pub fn tick(&mut self, dir: &Directory, now_ms: u64) -> Vec<Out> {
        let changed: Vec<Changed> = if self.pmon.has_changes() {
            self.pmon.take_changed(dir, now_ms)
        } else {
            Vec::new()
        };
        let mut out = Vec::new();
        for (conn, s) in &mut self.subs {
            let mine: Vec<Cell> = changed
                .iter()
                .filter(|x| {
                    x.what & (s.wanted | CHANGED_PAIR) != 0
                        && s.sub.matches(&x.cell.from, &x.cell.to)
                })
                .map(|x| {
                    let mut c = x.cell.clone();
                    s.sub.trim(&mut c);
                    c
                })
                .collect();
            if !mine.is_empty() {
                out.push(Out::Send(*conn, CuMsg::Cells(mine)));
            }
            let (Some(due), Some(every)) = (s.next_ms, s.sub.every_ms) else {
                continue;
            };
            if due > now_ms {
                continue;
            }
            // The next one a period from now: a late tick does not make a
            // burst of snapshots.
            s.next_ms = Some(now_ms + u64::from(every));
            let mut cells = self.pmon.matrix(&s.sub, dir, now_ms).cells;
            for c in &mut cells {
                s.sub.trim(c);
            }
            // Like a matrix, a snapshot goes in parts that fit a frame.
            while !cells.is_empty() {
                let rest = cells.split_off(cells.len().min(MATRIX_PART_CELLS));
                out.push(Out::Send(*conn, CuMsg::Cells(cells)));
                cells = rest;
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pmon::tests::dir;
    use pon_proto::pmon::{DestinationReport, Figures, Metric};

    fn report(dst: u32, rtt_ms: u32, jitter_us: u32) -> Report {
        Report {
            destinations: vec![DestinationReport {
                dst,
                reachable: true,
                route: vec![dst],
                figures: Figures {
                    rtt_us: Some(rtt_ms * 1000),
                    jitter_us: Some(jitter_us),
                    loss_ppm: Some(0),
                    ..Figures::default()
                },
            }],
        }
    }

    fn hub() -> Hub {
        Hub::new(
            PmonSettings::default(),
            Arc::new(PmonStats::default()),
            Limits { max_streams: 2 },
        )
    }

    fn events(out: &[Out], conn: ConnId) -> Vec<EventKind> {
        out.iter()
            .filter_map(|o| match o {
                Out::Send(c, CuMsg::Events(e)) if *c == conn => Some(e.clone()),
                _ => None,
            })
            .flatten()
            .map(|e| e.kind)
            .collect()
    }

    #[test]
    fn a_subscriber_with_its_own_threshold_hears_what_the_default_would_not() {
        let (d, mut h) = (dir(), hub());
        let own = Subscription {
            stream: true,
            thresholds: Some(Thresholds {
                rtt_us: Some(50_000),
                loss_ppm: None,
                hysteresis_ppm: 200_000,
            }),
            ..Default::default()
        };
        let plain = Subscription {
            stream: true,
            ..Default::default()
        };
        assert!(matches!(
            h.subscribe(1, Ok(()), PROTOCOL_VERSION, own, &d, 0)[..],
            [Out::Send(
                1,
                CuMsg::Matrix(Matrix {
                    rtt_threshold_us: 50_000,
                    ..
                })
            )]
        ));
        h.subscribe(2, Ok(()), PROTOCOL_VERSION, plain, &d, 0);
        h.report(1, &report(2, 30, 0), &d, 10);
        // 60 ms: over the subscriber's 50, under the server's 200.
        let out = h.report(1, &report(2, 60, 0), &d, 20);
        let above = EventKind::Above {
            metric: Metric::Rtt,
            value: 60_000,
            threshold: 50_000,
        };
        assert_eq!(events(&out, 1), [above]);
        assert!(events(&out, 2).is_empty());
        // Hovering just under the threshold is no news; under it less the
        // hysteresis is.
        assert!(events(&h.report(1, &report(2, 45, 0), &d, 30), 1).is_empty());
        assert!(matches!(
            events(&h.report(1, &report(2, 39, 0), &d, 40), 1)[..],
            [EventKind::Below { value: 39_000, .. }]
        ));
        assert_eq!(h.own_states(1), 1);
        // A proxy that goes takes its pairs' state with it.
        h.forget(1);
        assert_eq!(h.own_states(1), 0);
    }

    #[test]
    fn cells_carry_what_was_asked_and_snapshots_come_on_schedule() {
        let (d, mut h) = (dir(), hub());
        let rtt_only = Subscription {
            stream: true,
            metrics: vec![Metric::Rtt],
            every_ms: Some(500),
            ..Default::default()
        };
        h.subscribe(1, Ok(()), PROTOCOL_VERSION, rtt_only, &d, 0);
        h.report(1, &report(2, 30, 100), &d, 10);
        let out = h.tick(&d, 10);
        let [Out::Send(1, CuMsg::Cells(c))] = &out[..] else {
            panic!("{out:?}")
        };
        assert_eq!(c[0].figures.rtt_us, Some(30_000));
        assert_eq!((c[0].figures.jitter_us, c[0].route.len()), (None, 0));
        // Only the jitter changed: nothing this subscriber asked for.
        h.report(1, &report(2, 30, 900), &d, 20);
        assert!(h.needs_tick(20));
        assert!(h.tick(&d, 20).is_empty());
        assert!(!h.needs_tick(499));
        // The snapshot: every pair it filters, trimmed, once a period.
        assert!(h.needs_tick(500));
        let out = h.tick(&d, 500);
        let [Out::Send(1, CuMsg::Cells(c))] = &out[..] else {
            panic!("{out:?}")
        };
        assert_eq!(c.len(), 6);
        assert!(c.iter().all(|c| c.figures.jitter_us.is_none()));
        assert!(h.tick(&d, 600).is_empty());
        assert_eq!(h.tick(&d, 1000).len(), 1);
    }

    #[test]
    fn bad_subscriptions_are_refused_and_counted_by_reason() {
        let (d, mut h) = (dir(), hub());
        let stream = Subscription {
            stream: true,
            ..Default::default()
        };
        let refused = |o: &[Out]| matches!(o, [Out::Last(_, CuMsg::Refused(_))]);
        assert!(refused(&h.subscribe(1, Ok(()), 999, stream.clone(), &d, 0)));
        assert!(refused(&h.subscribe(
            1,
            Err("no"),
            PROTOCOL_VERSION,
            stream.clone(),
            &d,
            0
        )));
        let bad = Subscription {
            every_ms: Some(1),
            ..stream.clone()
        };
        assert!(refused(&h.subscribe(
            1,
            Ok(()),
            PROTOCOL_VERSION,
            bad,
            &d,
            0
        )));
        for c in 1..=2 {
            assert!(!refused(&h.subscribe(
                c,
                Ok(()),
                PROTOCOL_VERSION,
                stream.clone(),
                &d,
                0
            )));
        }
        assert!(refused(&h.subscribe(
            3,
            Ok(()),
            PROTOCOL_VERSION,
            stream.clone(),
            &d,
            0
        )));
        // A one-off matrix needs no stream slot.
        let once = h.subscribe(3, Ok(()), PROTOCOL_VERSION, Subscription::default(), &d, 0);
        assert!(matches!(once[..], [Out::Last(3, CuMsg::Matrix(_))]));
        let s = &h.stats;
        for why in [
            Refusal::Version,
            Refusal::NotAuthorised,
            Refusal::TooManyStreams,
            Refusal::Invalid(SubscriptionError::BadSchedule),
        ] {
            assert_eq!(s.subscriptions_refused(why), 1, "{why:?}");
        }
        h.gone(1);
        assert!(!refused(&h.subscribe(
            4,
            Ok(()),
            PROTOCOL_VERSION,
            stream,
            &d,
            0
        )));
    }
}
