//! The monitor, without I/O: measures overlay paths to other proxies with its
//! own probe packets and answers the probes of other monitors.
//!
//! Probes are PON packets of kind `Probe` carrying a [`pon_proto::probe`]
//! body; they follow a source route exactly like data (relays, then the
//! destination proxy), and the destination's monitor turns each into a
//! `ProbeReply` routed back along the reversed route, stamped with its
//! receive time. A reply is matched to its probe by (session, sequence): the
//! session is random per monitor, so replies to a previous incarnation are
//! not mistaken for ours. A probe not answered within its timeout (from the
//! path's RTT) is lost.
//!
//! Inputs, each with an explicit `now`: [`Monitor::probe`] (on demand),
//! [`Monitor::bandwidth`] (a packet train), [`Monitor::set_rate`] (a path
//! probed periodically), [`Monitor::handle_packet`] (a probe or reply that
//! ended here) and [`Monitor::handle_timeout`] (when
//! [`Monitor::poll_timeout`] says). Outputs leave by two queues only:
//! [`Monitor::poll_transmit`] for every packet to send (probes, trains,
//! answers to other monitors), and [`Monitor::poll_event`] for results (RTT
//! or loss per probe, bandwidth per train), each carrying the
//! [`ProbeTag`] it was asked with.
//!
//! Probe traffic is bounded: a token bucket (`max_probes_per_sec`, with a
//! burst of a tenth of a second) caps everything this monitor sends, and
//! probes over it are refused and counted rather than queued.

pub mod stats;

pub use pon_proto::measurement::{ProbeOutcome, ProbeTag};
use pon_proto::pon::{self, Hops, Kind};
use pon_proto::probe;
use serde::{Deserialize, Serialize};
use stats::{PathEstimator, PathStats};
use std::collections::{BTreeSet, HashMap, VecDeque};
use std::time::Duration;

pon_telemetry::counters! {
    pub struct MonitorCounters {
        probes_sent => ("pon_monitor_probes_sent_total", "", "Probe packets sent (trains included)."),
        probe_bytes => ("pon_monitor_probe_bytes_sent_total", "", "PON bytes of probe packets sent."),
        replies => ("pon_monitor_replies_total", "", "Replies to our probes received in time."),
        lost => ("pon_monitor_probes_lost_total", "", "Probes not answered within their timeout."),
        late => ("pon_monitor_late_replies_total", "", "Replies after the timeout, or to another session (ignored)."),
        refused_budget => ("pon_monitor_probes_refused_total", "reason=\"budget\"", "Probes not sent, by reason."),
        refused_busy => ("pon_monitor_probes_refused_total", "reason=\"outstanding\"", "Probes not sent, by reason."),
        answered => ("pon_monitor_probes_answered_total", "", "Probes of other monitors answered."),
        answer_bytes => ("pon_monitor_answer_bytes_sent_total", "", "PON bytes of replies sent."),
        bad_packets => ("pon_monitor_bad_packets_total", "", "Probe packets that could not be parsed or answered."),
        queue_drops => ("pon_monitor_queue_drops_total", "", "Probe packets dropped because the monitor's queue was full."),
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields, default)]
pub struct MonitorConfig {
    /// Ceiling on probe packets this monitor sends per second (replies to
    /// other monitors not included: they are bounded by the others' budgets).
    pub max_probes_per_sec: u32,
    /// Timeout of the first probe on a path, before its RTT is known.
    pub initial_timeout_ms: u64,
    /// Lower bound of the RTT-derived probe timeout.
    pub min_timeout_ms: u64,
    /// Upper bound of the RTT-derived probe timeout.
    pub max_timeout_ms: u64,
    /// Probes the per-path loss rate is computed over.
    #[schemars(extend("x-unit" = "probes"))]
    pub loss_window: usize,
    /// Percentiles cover the samples of this period and the previous one.
    pub histogram_period_ms: u64,
    /// Probe body length (after the PON header, padding included).
    #[schemars(extend("x-unit" = "bytes"))]
    pub probe_len: usize,
    /// Packet trains for available bandwidth: packets per train.
    #[schemars(extend("x-unit" = "packets"))]
    pub train_len: u16,
    /// Packet trains: body length of each packet.
    #[schemars(extend("x-unit" = "bytes"))]
    pub train_probe_len: usize,
    /// Most probes waiting for an answer at once.
    #[schemars(extend("x-unit" = "probes"))]
    pub max_outstanding: usize,
}

impl Default for MonitorConfig {
    fn default() -> Self {
        MonitorConfig {
            max_probes_per_sec: 1000,
            initial_timeout_ms: 1000,
            min_timeout_ms: 50,
            max_timeout_ms: 2000,
            loss_window: 100,
            histogram_period_ms: 60_000,
            probe_len: probe::BODY_LEN,
            train_len: pon_proto::measurement::DEFAULT_TRAIN_LEN,
            train_probe_len: 1200,
            max_outstanding: 4096,
        }
    }
}

impl MonitorConfig {
    pub fn validate(&self) -> Result<(), String> {
        let bad = |f: &str, why: &str| Err(format!("monitor.{f}: {why}"));
        if self.max_probes_per_sec == 0 {
            return bad("max_probes_per_sec", "must be at least 1");
        }
        if self.min_timeout_ms == 0 || self.min_timeout_ms > self.max_timeout_ms {
            return bad(
                "min_timeout_ms",
                "must be positive and at most max_timeout_ms",
            );
        }
        if self.initial_timeout_ms == 0 {
            return bad("initial_timeout_ms", "must be positive");
        }
        if self.loss_window == 0 || self.loss_window > 10_000 {
            return bad("loss_window", "must be in 1..=10000");
        }
        if self.histogram_period_ms == 0 {
            return bad("histogram_period_ms", "must be positive");
        }
        for (f, v) in [
            ("probe_len", self.probe_len),
            ("train_probe_len", self.train_probe_len),
        ] {
            if !(probe::BODY_LEN..=MAX_BODY_LEN).contains(&v) {
                return bad(f, "must be in 32..=1400");
            }
        }
        if self.train_len < 2 {
            return bad("train_len", "must be at least 2");
        }
        if self.max_outstanding == 0 {
            return bad("max_outstanding", "must be at least 1");
        }
        Ok(())
    }
}

/// A monitor's probe budget and what it spent, for status pages.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct Budget {
    pub max_probes_per_sec: u32,
    pub probes_sent: u64,
    pub probe_bytes_sent: u64,
    /// Probes not sent: over the budget, or too many outstanding.
    pub refused: u64,
    /// Other monitors' probes answered.
    pub answered: u64,
}

/// Longest probe body: a train packet plus headers must fit a 1500-byte
/// underlay.
pub const MAX_BODY_LEN: usize = 1400;

/// A packet to send out of the forwarder's peer socket, to proxy `first_hop`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Transmit {
    pub first_hop: u32,
    pub bytes: Vec<u8>,
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub enum MonitorEvent {
    /// The fate of one probe on `path`, sent with `tag`.
    Probe {
        tag: ProbeTag,
        path: Hops,
        outcome: ProbeOutcome,
    },
    /// A packet train on `path` finished: the bottleneck rate seen by the
    /// far end (`None` if fewer than two packets arrived).
    Bandwidth {
        tag: ProbeTag,
        path: Hops,
        /// Packets in the train (all of them were sent).
        packets: u16,
        mbps: Option<f64>,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum Refused {
    #[error("probe budget exhausted")]
    Budget,
    #[error("too many probes outstanding")]
    Outstanding,
    #[error("path is empty or leads back here")]
    BadPath,
}

struct Outstanding {
    tag: ProbeTag,
    path: Hops,
    sent: Duration,
    deadline: Duration,
    train: Option<u32>,
}

struct Train {
    tag: ProbeTag,
    len: u16,
    path: Hops,
    /// Wire bytes of each packet (UDP payload + IP/UDP headers).
    wire_len: usize,
    /// (index, responder receive time) of each reply.
    arrivals: Vec<(u16, u64)>,
    pending: u16,
}

struct PeriodicTarget {
    tag: ProbeTag,
    every: Duration,
    next: Duration,
}

/// Token bucket over probe packets.
struct Bucket {
    rate: f64,
    burst: f64,
    tokens: f64,
    at: Duration,
}

impl Bucket {
    fn new(rate: u32) -> Self {
        let rate = f64::from(rate);
        let burst = (rate / 10.0).max(32.0);
        Bucket {
            rate,
            burst,
            tokens: burst,
            at: Duration::ZERO,
        }
    }
    fn take(&mut self, now: Duration, n: f64) -> bool {
        let dt = now.saturating_sub(self.at).as_secs_f64();
        self.at = self.at.max(now);
        self.tokens = (self.tokens + dt * self.rate).min(self.burst);
        if self.tokens >= n {
            self.tokens -= n;
            true
        } else {
            false
        }
    }
}

pub struct Monitor {
    my_id: u32,
    session: u32,
    cfg: MonitorConfig,
    next_seq: u32,
    next_train: u32,
    outstanding: HashMap<u32, Outstanding>,
    /// (deadline, sequence) of outstanding probes, earliest first.
    deadlines: BTreeSet<(Duration, u32)>,
    trains: HashMap<u32, Train>,
    paths: HashMap<Hops, PathEstimator>,
    periodic: HashMap<Hops, PeriodicTarget>,
    bucket: Bucket,
    events: VecDeque<MonitorEvent>,
    transmits: VecDeque<Transmit>,
    /// Shared so that the metrics endpoint can read them from its thread.
    pub counters: std::sync::Arc<MonitorCounters>,
}

impl Monitor {
    /// A monitor for proxy `my_id`; `session` should differ between runs
    /// (e.g. random), so that replies to a previous run are ignored.
    pub fn new(my_id: u32, session: u32, cfg: MonitorConfig) -> Self {
        Monitor {
            my_id,
            session,
            bucket: Bucket::new(cfg.max_probes_per_sec),
            cfg,
            next_seq: 0,
            next_train: 0,
            outstanding: HashMap::new(),
            deadlines: BTreeSet::new(),
            trains: HashMap::new(),
            paths: HashMap::new(),
            periodic: HashMap::new(),
            events: VecDeque::new(),
            transmits: VecDeque::new(),
            counters: Default::default(),
        }
    }

    pub fn my_id(&self) -> u32 {
        self.my_id
    }

    /// The CU may assign the id after start: probes in flight under the old
    /// id are forgotten (their replies will not come back here).
    pub fn set_my_id(&mut self, id: u32) {
        if id != self.my_id {
            self.my_id = id;
            self.outstanding.clear();
            self.deadlines.clear();
            self.trains.clear();
        }
    }

    pub fn config(&self) -> &MonitorConfig {
        &self.cfg
    }

    fn check_path(&self, path: &Hops) -> Result<(), Refused> {
        if path.is_empty() || path.as_slice().contains(&self.my_id) {
            return Err(Refused::BadPath);
        }
        Ok(())
    }

    fn estimator(&mut self, path: Hops) -> &mut PathEstimator {
        let (w, p) = (
            self.cfg.loss_window,
            Duration::from_millis(self.cfg.histogram_period_ms),
        );
        self.paths
            .entry(path)
            .or_insert_with(|| PathEstimator::new(w, p))
    }

    fn timeout_for(&self, path: &Hops) -> Duration {
        let c = &self.cfg;
        let (init, min, max) = (
            Duration::from_millis(c.initial_timeout_ms),
            Duration::from_millis(c.min_timeout_ms),
            Duration::from_millis(c.max_timeout_ms),
        );
        self.paths
            .get(path)
            .map_or(init, |e| e.timeout(init, min, max))
    }

    /// Builds one probe packet, records it as outstanding and queues it.
    fn emit(
        &mut self,
        now: Duration,
        path: Hops,
        tag: ProbeTag,
        body_len: usize,
        train: Option<(u32, u16, u16)>,
    ) {
        let seq = self.next_seq;
        self.next_seq = self.next_seq.wrapping_add(1);
        let header = pon::Repr {
            kind: Kind::Probe,
            hop_limit: pon::DEFAULT_HOP_LIMIT,
            hop_index: 0,
            flow_id: self.session,
            source: self.my_id,
            hops: path,
        };
        let hlen = header.header_len();
        // Room for the tags is kept: the forwarder seals in place.
        let mut bytes = vec![0u8; header.wire_len(body_len)];
        let (train_index, train_len) = train.map_or((0, 1), |(_, i, n)| (i, n));
        // Both emits write into a buffer sized for them from valid fields.
        let _ = header.emit(&mut bytes);
        let _ = probe::Repr {
            session: self.session,
            sequence: seq,
            sent_ns: now.as_nanos() as u64,
            train_index,
            train_len,
            reply_rx_ns: 0,
        }
        .emit(&mut bytes[hlen..]);
        let deadline = now + self.timeout_for(&path);
        self.outstanding.insert(
            seq,
            Outstanding {
                tag,
                path,
                sent: now,
                deadline,
                train: train.map(|t| t.0),
            },
        );
        self.deadlines.insert((deadline, seq));
        self.estimator(path).on_sent(now);
        self.counters.probes_sent.inc();
        self.counters.probe_bytes.add(bytes.len() as u64);
        self.transmits.push_back(Transmit {
            first_hop: path.as_slice()[0],
            bytes,
        });
    }

    fn admit(&mut self, now: Duration, n: usize) -> Result<(), Refused> {
        if self.outstanding.len() + n > self.cfg.max_outstanding {
            self.counters.refused_busy.add(n as u64);
            return Err(Refused::Outstanding);
        }
        if !self.bucket.take(now, n as f64) {
            self.counters.refused_budget.add(n as u64);
            return Err(Refused::Budget);
        }
        Ok(())
    }

    /// One probe on `path` (relays, then the destination proxy) now, queued
    /// for [`Monitor::poll_transmit`]; its result comes back as a
    /// [`MonitorEvent::Probe`] with `tag`.
    pub fn probe(&mut self, now: Duration, path: Hops, tag: ProbeTag) -> Result<(), Refused> {
        self.check_path(&path)?;
        self.admit(now, 1)?;
        let len = self.cfg.probe_len;
        self.emit(now, path, tag, len, None);
        // A rate is "at least one probe per period" on its path: any probe
        // on it (the router's learning probes pin the current route)
        // restarts the period, so keepalives add nothing where learning
        // already probes the route often enough.
        if let Some(t) = self.periodic.get_mut(&path) {
            t.next = t.next.max(now + t.every);
        }
        Ok(())
    }

    /// An available-bandwidth measurement: a train of back-to-back probes
    /// whose dispersion at the far end gives the bottleneck rate. The
    /// packets are queued in order: send them without pausing.
    pub fn bandwidth(&mut self, now: Duration, path: Hops, tag: ProbeTag) -> Result<(), Refused> {
        self.check_path(&path)?;
        let n = self.cfg.train_len;
        self.admit(now, usize::from(n))?;
        let id = self.next_train;
        self.next_train = self.next_train.wrapping_add(1);
        let body = self.cfg.train_probe_len;
        let wire_len = pon_proto::ip::UDP_OVERHEAD
            + pon::header_len(path.len())
            + body
            + pon::trailer_len(Kind::Probe, path.len());
        self.trains.insert(
            id,
            Train {
                tag,
                len: n,
                path,
                wire_len,
                arrivals: Vec::with_capacity(usize::from(n)),
                pending: n,
            },
        );
        for i in 0..n {
            self.emit(now, path, tag, body, Some((id, i, n)));
        }
        Ok(())
    }

    /// Probes `path` at least every `every` from now on (`None`: stop),
    /// with results tagged `tag`: any other probe on the path (see
    /// [`Monitor::probe`]) postpones the next one. The router uses this to
    /// watch its current routes closely, independently of its learning
    /// budget.
    pub fn set_rate(&mut self, now: Duration, path: Hops, tag: ProbeTag, every: Option<Duration>) {
        match every {
            None => {
                self.periodic.remove(&path);
            }
            Some(every) => {
                let every = every.max(Duration::from_millis(1));
                let t = self.periodic.entry(path).or_insert(PeriodicTarget {
                    tag,
                    every,
                    next: now,
                });
                t.tag = tag;
                if t.every != every {
                    t.every = every;
                    t.next = t.next.min(now + every);
                }
            }
        }
    }

    /// Paths probed at a rate, with their period.
    pub fn rates(&self) -> impl Iterator<Item = (Hops, Duration)> + '_ {
        self.periodic.iter().map(|(p, t)| (*p, t.every))
    }

    /// When `handle_timeout` next has work (a timeout or a periodic probe).
    pub fn poll_timeout(&self) -> Option<Duration> {
        let d = self.deadlines.first().map(|(d, _)| *d);
        let p = self.periodic.values().map(|t| t.next).min();
        match (d, p) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    /// Expires probes whose timeout passed (as losses) and queues the
    /// periodic probes due.
    pub fn handle_timeout(&mut self, now: Duration) {
        while let Some(&(deadline, seq)) = self.deadlines.first() {
            if deadline > now {
                break;
            }
            self.deadlines.pop_first();
            if let Some(o) = self.outstanding.remove(&seq) {
                self.counters.lost.inc();
                self.estimator(o.path).on_loss();
                match o.train {
                    Some(id) => self.train_progress(now, id),
                    None => self.events.push_back(MonitorEvent::Probe {
                        tag: o.tag,
                        path: o.path,
                        outcome: ProbeOutcome::Lost,
                    }),
                }
            }
        }
        let due: Vec<(Hops, ProbeTag)> = self
            .periodic
            .iter()
            .filter(|(_, t)| t.next <= now)
            .map(|(p, t)| (*p, t.tag))
            .collect();
        for (path, tag) in due {
            if let Some(t) = self.periodic.get_mut(&path) {
                // Keep the cadence, but never try to catch up a backlog.
                t.next = (t.next + t.every).max(now);
                if t.next == now {
                    t.next = now + t.every;
                }
            }
            match self.probe(now, path, tag) {
                Ok(()) => {}
                Err(Refused::BadPath) => {
                    self.periodic.remove(&path);
                }
                Err(_) => {}
            }
        }
    }

    /// The next result (probe outcome or train bandwidth).
    pub fn poll_event(&mut self) -> Option<MonitorEvent> {
        self.events.pop_front()
    }

    /// The next packet to send: every packet the monitor sends leaves here.
    pub fn poll_transmit(&mut self) -> Option<Transmit> {
        self.transmits.pop_front()
    }

    /// A probe or probe reply that ended at this proxy (the whole PON
    /// packet): a probe is answered (the reply is queued for
    /// `poll_transmit`), a reply to ours gives a result; anything else is
    /// counted and dropped.
    pub fn handle_packet(&mut self, now: Duration, bytes: &[u8]) {
        let Ok(p) = pon::Packet::new_checked(bytes) else {
            self.counters.bad_packets.inc();
            return;
        };
        let Ok(body) = probe::Packet::new_checked(p.payload()) else {
            self.counters.bad_packets.inc();
            return;
        };
        match p.kind() {
            Kind::Probe => match self.answer(now, &p) {
                Some(s) => {
                    self.counters.answered.inc();
                    self.counters.answer_bytes.add(s.bytes.len() as u64);
                    self.transmits.push_back(s);
                }
                None => self.counters.bad_packets.inc(),
            },
            Kind::ProbeReply => self.on_reply(now, &p, &body),
            _ => self.counters.bad_packets.inc(),
        }
    }

    /// Turns a probe into its reply: the relays reversed, ending at the
    /// probe's source; the body copied with our receive time (trimmed to the
    /// fixed part: the padding only matters on the way out).
    fn answer(&self, now: Duration, p: &pon::Packet<&[u8]>) -> Option<Transmit> {
        let source = p.source();
        let n = p.hop_count();
        if p.current_hop() != self.my_id || source == 0 || source == self.my_id {
            return None;
        }
        let mut ids = [0u32; pon::MAX_HOPS];
        for (k, slot) in ids.iter_mut().enumerate().take(n - 1) {
            *slot = p.hop(n - 2 - k);
        }
        ids[n - 1] = source;
        if ids[..n].contains(&self.my_id) {
            return None;
        }
        let hops = Hops::new(&ids[..n])?;
        let header = pon::Repr {
            kind: Kind::ProbeReply,
            hop_limit: pon::DEFAULT_HOP_LIMIT,
            hop_index: 0,
            flow_id: p.flow_id(),
            source: self.my_id,
            hops,
        };
        let hlen = header.header_len();
        let mut bytes = vec![0u8; header.wire_len(probe::BODY_LEN)];
        header.emit(&mut bytes).ok()?;
        let body = &mut bytes[hlen..hlen + probe::BODY_LEN];
        body.copy_from_slice(&p.payload()[..probe::BODY_LEN]);
        probe::Packet::new_checked(body)
            .ok()?
            .set_reply_rx_ns(now.as_nanos() as u64);
        Some(Transmit {
            first_hop: hops.as_slice()[0],
            bytes,
        })
    }

    fn on_reply(&mut self, now: Duration, p: &pon::Packet<&[u8]>, body: &probe::Packet<&[u8]>) {
        if body.session() != self.session {
            self.counters.late.inc();
            return;
        }
        let seq = body.sequence();
        let Some(o) = self.outstanding.get(&seq) else {
            self.counters.late.inc();
            return;
        };
        // The reply must come from the proxy the probe was sent to.
        if p.source() != o.path.last() {
            self.counters.bad_packets.inc();
            return;
        }
        let o = self.outstanding.remove(&seq).expect("looked up above");
        self.deadlines.remove(&(o.deadline, seq));
        let rtt = now.saturating_sub(o.sent);
        self.counters.replies.inc();
        self.estimator(o.path).on_reply(now, rtt);
        match o.train {
            Some(id) => {
                if let Some(t) = self.trains.get_mut(&id) {
                    t.arrivals.push((body.train_index(), body.reply_rx_ns()));
                }
                self.train_progress(now, id);
            }
            None => self.events.push_back(MonitorEvent::Probe {
                tag: o.tag,
                path: o.path,
                outcome: ProbeOutcome::Reply { rtt },
            }),
        }
    }

    /// One more packet of train `id` answered or lost; when none is
    /// pending, compute the rate from the far end's receive times.
    fn train_progress(&mut self, now: Duration, id: u32) {
        let Some(t) = self.trains.get_mut(&id) else {
            return;
        };
        t.pending = t.pending.saturating_sub(1);
        if t.pending > 0 {
            return;
        }
        let t = self.trains.remove(&id).expect("looked up above");
        let mbps = train_rate(&t.arrivals, t.wire_len);
        if let Some(m) = mbps {
            self.estimator(t.path).on_bandwidth(now, m);
        }
        self.events.push_back(MonitorEvent::Bandwidth {
            tag: t.tag,
            path: t.path,
            packets: t.len,
            mbps,
        });
    }

    /// The estimates for `path`, if it was ever probed.
    pub fn stats(&self, now: Duration, path: &Hops) -> Option<PathStats> {
        self.paths.get(path).map(|e| e.stats(now))
    }

    /// Every path probed so far.
    pub fn paths(&self) -> impl Iterator<Item = Hops> + '_ {
        self.paths.keys().copied()
    }

    /// Forgets paths not probed for `idle` (their estimates would be stale).
    pub fn forget_idle(&mut self, now: Duration, idle: Duration) {
        let periodic = &self.periodic;
        self.paths.retain(|p, e| {
            periodic.contains_key(p) || e.last_sent.is_some_and(|t| now.saturating_sub(t) < idle)
        });
    }

    /// What the monitor spent of its probe budget so far.
    pub fn budget(&self) -> Budget {
        let c = &self.counters;
        Budget {
            max_probes_per_sec: self.cfg.max_probes_per_sec,
            probes_sent: c.probes_sent.get(),
            probe_bytes_sent: c.probe_bytes.get(),
            refused: c.refused_budget.get() + c.refused_busy.get(),
            answered: c.answered.get(),
        }
    }

    pub fn outstanding(&self) -> usize {
        self.outstanding.len()
    }
}

/// Bottleneck rate from a train's arrivals at the far end: the bytes of the
/// packets after the first over the time between first and last arrival.
fn train_rate(arrivals: &[(u16, u64)], wire_len: usize) -> Option<f64> {
    let first = arrivals.iter().min_by_key(|a| a.0)?;
    let last = arrivals.iter().max_by_key(|a| a.0)?;
    let packets = u64::from(last.0 - first.0);
    let span_ns = last.1.checked_sub(first.1)?;
    if packets == 0 || span_ns == 0 {
        return None;
    }
    let bits = packets as f64 * wire_len as f64 * 8.0;
    Some(bits / (span_ns as f64 / 1e9) / 1e6)
}

#[cfg(test)]
mod tests;
