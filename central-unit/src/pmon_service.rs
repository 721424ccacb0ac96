//! PMon's place in the CU daemon: between the actor (which owns the
//! registry) and [`Pmon`] it checks who is speaking, keeps the
//! subscribers, counts, and publishes the picture for the web view. It
//! does no I/O itself: what it wants sent comes back as `(conn, message)`.

use crate::pmon::{Directory, Pmon, PmonSettings, Refused};
use crate::registry::{ConnId, Registry};
use crate::trust::KeyId;
use pon_proto::control::{CuMsg, PROTOCOL_VERSION};
use pon_proto::pmon::{EventKind, Report, ReportError, Subscription};
use pon_telemetry::{Counter, PromWriter};
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

/// The web view is refreshed at most this often while things change ...
const PUBLISH_MIN: Duration = Duration::from_millis(250);
/// ... and at least this often (report ages, proxies joining).
const PUBLISH_MAX: Duration = Duration::from_secs(1);

const EVENT_KINDS: [&str; 5] = [
    "route_changed",
    "unreachable",
    "reachable",
    "above",
    "below",
];
const REFUSALS: usize = ReportError::LABELS.len() + 1;

#[derive(Default)]
pub struct PmonStats {
    pub reports: Counter,
    /// By [`Refused::label`]: "not_a_proxy", then [`ReportError::LABELS`].
    refused: [Counter; REFUSALS],
    pub skipped: Counter,
    events: [Counter; EVENT_KINDS.len()],
    pub subscriptions: Counter,
    pub subscriptions_refused: Counter,
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

    pub fn render(&self, w: &mut PromWriter) {
        w.counter(
            "pon_cu_pmon_reports_total",
            "",
            "Measurement reports from proxies folded into the matrix.",
            self.reports.get(),
        );
        let labels = std::iter::once("not_a_proxy").chain(ReportError::LABELS);
        for (why, c) in labels.zip(&self.refused) {
            w.counter(
                "pon_cu_pmon_reports_refused_total",
                &format!("reason=\"{why}\""),
                "Measurement reports refused, by reason.",
                c.get(),
            );
        }
        w.counter(
            "pon_cu_pmon_destinations_skipped_total",
            "",
            "Destinations of reports left out: not an online proxy of another site, or a relay that is not.",
            self.skipped.get(),
        );
        for (kind, c) in EVENT_KINDS.iter().zip(&self.events) {
            w.counter(
                "pon_cu_pmon_events_total",
                &format!("kind=\"{kind}\""),
                "Events derived from the proxies' reports, by kind.",
                c.get(),
            );
        }
        w.counter(
            "pon_cu_pmon_subscriptions_total",
            "result=\"accepted\"",
            "Subscriptions to the matrix and events.",
            self.subscriptions.get(),
        );
        w.counter(
            "pon_cu_pmon_subscriptions_total",
            "result=\"refused\"",
            "Subscriptions to the matrix and events.",
            self.subscriptions_refused.get(),
        );
        w.gauge(
            "pon_cu_pmon_streams",
            "",
            "Subscribers streaming events now.",
            self.streams.load(Ordering::Relaxed) as f64,
        );
        w.gauge(
            "pon_cu_pmon_pairs",
            "",
            "Proxy pairs the matrix holds a report for.",
            self.pairs.load(Ordering::Relaxed) as f64,
        );
    }
}

/// What the service wants done on a connection.
pub enum Out {
    Send(ConnId, CuMsg),
    /// Send this, then close (a one-off answer, or a refusal).
    Last(ConnId, CuMsg),
}

pub struct Service {
    pmon: Pmon,
    streams: HashMap<ConnId, Subscription>,
    stats: Arc<PmonStats>,
    web: Arc<crate::web::Picture>,
    last_publish: Option<Duration>,
    dirty: bool,
}

impl Service {
    pub fn new(
        settings: PmonSettings,
        stats: Arc<PmonStats>,
        web: Arc<crate::web::Picture>,
    ) -> Self {
        Service {
            pmon: Pmon::new(settings),
            streams: HashMap::new(),
            stats,
            web,
            last_publish: None,
            dirty: true,
        }
    }

    /// A report on connection `conn`: filed under the proxy registered on
    /// it, whatever it says.
    pub fn report(
        &mut self,
        registry: &Registry,
        conn: ConnId,
        report: &Report,
        now_ms: u64,
    ) -> Vec<Out> {
        let dir = registry.online_proxies();
        let from = registry.id_of(conn).unwrap_or(0);
        match self.pmon.report(from, report, &dir, now_ms) {
            Err(why) => {
                self.stats.refused(why).inc();
                tracing::debug!(conn, reason = why.label(), "measurement report refused");
                Vec::new()
            }
            Ok((events, folded)) => {
                self.stats.reports.inc();
                self.stats.skipped.add(folded.skipped as u64);
                self.stats
                    .pairs
                    .store(self.pmon.len() as u64, Ordering::Relaxed);
                self.dirty = true;
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
                if events.is_empty() {
                    return Vec::new();
                }
                self.streams
                    .iter()
                    .filter_map(|(c, sub)| {
                        let mine: Vec<_> = events
                            .iter()
                            .filter(|e| sub.matches(&e.from, &e.to))
                            .cloned()
                            .collect();
                        (!mine.is_empty()).then_some(Out::Send(*c, CuMsg::Events(mine)))
                    })
                    .collect()
            }
        }
    }

    /// A consumer's first message. Refused unless it presents the admin
    /// certificate or an enrolled agent's.
    pub fn subscribe(
        &mut self,
        registry: &Registry,
        conn: ConnId,
        key: Option<KeyId>,
        version: u16,
        sub: Subscription,
        now_ms: u64,
    ) -> Vec<Out> {
        let refuse = |why: String| vec![Out::Last(conn, CuMsg::Refused(why))];
        if version != PROTOCOL_VERSION {
            self.stats.subscriptions_refused.inc();
            return refuse(format!(
                "protocol version {version}, this CU speaks {PROTOCOL_VERSION}"
            ));
        }
        if !registry.may_subscribe(key) {
            self.stats.subscriptions_refused.inc();
            return refuse(
                "subscribing needs the admin certificate or an enrolled agent's certificate".into(),
            );
        }
        self.stats.subscriptions.inc();
        // A matrix too large for one frame goes in parts.
        let mut out: Vec<Out> = pon_proto::pmon::matrix_messages(self.pmon.matrix(
            &sub,
            &registry.online_proxies(),
            now_ms,
        ))
        .into_iter()
        .map(|m| Out::Send(conn, m))
        .collect();
        if !sub.stream {
            if let Some(Out::Send(c, m)) = out.pop() {
                out.push(Out::Last(c, m));
            }
            return out;
        }
        self.streams.insert(conn, sub);
        self.stats
            .streams
            .store(self.streams.len() as u64, Ordering::Relaxed);
        out
    }

    /// Connection `conn` ended; `proxy` is the proxy it carried, if any.
    pub fn gone(&mut self, conn: ConnId, proxy: Option<u32>) {
        if self.streams.remove(&conn).is_some() {
            self.stats
                .streams
                .store(self.streams.len() as u64, Ordering::Relaxed);
        }
        if let Some(id) = proxy {
            self.pmon.forget(id);
            self.stats
                .pairs
                .store(self.pmon.len() as u64, Ordering::Relaxed);
            self.dirty = true;
        }
    }

    /// Every tick: changed cells to the streams; the web view's picture
    /// refreshed when due.
    pub fn tick(&mut self, registry: &Registry, now: Duration, now_ms: u64) -> Vec<Out> {
        let since = self.last_publish.map(|t| now.saturating_sub(t));
        let due = match since {
            None => true,
            Some(s) => s >= PUBLISH_MAX || (self.dirty && s >= PUBLISH_MIN),
        };
        // The web view's picture is the whole matrix (a million pairs at a
        // thousand sites): built only while someone looks at it.
        let publish = due && self.web.watched();
        let mut out = Vec::new();
        if !publish && !self.pmon.has_changes() {
            return out;
        }
        let dir: Directory = registry.online_proxies();
        let changed = self.pmon.take_changed(&dir, now_ms);
        if !changed.is_empty() {
            for (c, sub) in &self.streams {
                let mine: Vec<_> = changed
                    .iter()
                    .filter(|x| sub.matches(&x.from, &x.to))
                    .cloned()
                    .collect();
                if !mine.is_empty() {
                    out.push(Out::Send(*c, CuMsg::Cells(mine)));
                }
            }
        }
        if publish {
            let matrix = self.pmon.matrix(&Subscription::default(), &dir, now_ms);
            self.web.publish(&matrix, self.pmon.recent(), now_ms);
            self.last_publish = Some(now);
            self.dirty = false;
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::Policy;
    use crate::registry::Settings;

    #[test]
    fn the_web_picture_is_built_only_while_someone_looks() {
        let web = Arc::new(crate::web::Picture::default());
        let mut s = Service::new(
            PmonSettings::default(),
            Arc::new(PmonStats::default()),
            web.clone(),
        );
        let r = Registry::new(Settings::default(), Policy::default());
        let ms = Duration::from_millis;
        // Nobody looks: no picture, however long.
        s.tick(&r, ms(0), 0);
        s.tick(&r, ms(5000), 5000);
        assert_eq!(&*web.current(), "{}");
        // A one-shot request gets the next tick's picture, and only one.
        let mut asked = web.ask();
        s.tick(&r, ms(5100), 5100);
        assert!(asked.try_recv().is_ok());
        s.tick(&r, ms(9000), 9000);
        assert!(asked.try_recv().is_err(), "built again with nobody asking");
        // A streaming page gets one every second while it stays.
        let (slot, mut rx, _) = web.open_stream().expect("a slot");
        s.tick(&r, ms(9100), 9100);
        s.tick(&r, ms(10100), 10100);
        assert!(rx.try_recv().is_ok() && rx.try_recv().is_ok());
        drop(slot);
        s.tick(&r, ms(11100), 11100);
        assert!(rx.try_recv().is_err(), "built after the page went");
    }
}
