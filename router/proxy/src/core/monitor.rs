//! The monitor's part of the core: the [`Monitor`] fed with the packets the
//! forwarder hands it and the router's requests; its packets leave through
//! the forwarder (peers accept PON packets only from the forwarder's
//! address), its results go to the router.

use super::rate::RateMeter;
use super::status::{MonitorStatus, PathStatus, Status};
use super::{CoreCounters, Output, Outputs, Part};
use pon_monitor::{Monitor, MonitorConfig, MonitorEvent};
use pon_proto::local::LocalMsg;
use std::collections::VecDeque;
use std::sync::Arc;
use std::time::Duration;

/// Paths not probed for this long are forgotten (their estimates are stale).
const FORGET_IDLE: Duration = Duration::from_secs(600);

pub struct MonitorPart {
    monitor: Monitor,
    /// Probes sent per second, over the last few seconds.
    /// Probes sent (`false`) and answers sent (`true`) per second.
    rate: RateMeter<bool>,
    out: VecDeque<Output>,
    pub counters: Arc<CoreCounters>,
}

impl MonitorPart {
    /// `session` tells this run's probes from a previous run's. The id
    /// comes with the forwarder's first topology message.
    pub fn new(session: u32, cfg: MonitorConfig, counters: Arc<CoreCounters>) -> Self {
        MonitorPart {
            monitor: Monitor::new(0, session, cfg),
            rate: RateMeter::default(),
            out: VecDeque::new(),
            counters,
        }
    }

    pub fn monitor(&self) -> &Monitor {
        &self.monitor
    }

    pub(super) fn unexpected(&self) {
        self.counters.unexpected_monitor.inc()
    }

    pub fn handle_message(&mut self, now: Duration, from: Part, msg: LocalMsg) {
        let m = &mut self.monitor;
        match (from, msg) {
            (Part::Forwarder, LocalMsg::Arrived(packet)) => m.handle_packet(now, &packet),
            (Part::Forwarder, LocalMsg::Topology { id, .. }) => m.set_my_id(id),
            // A refused probe is counted by the monitor (budget, outstanding)
            // and simply gives no result: the router sees no answer.
            (Part::Router, LocalMsg::Probe { tag, path }) => {
                let _ = m.probe(now, path, tag);
            }
            (Part::Router, LocalMsg::Bandwidth { tag, path }) => {
                let _ = m.bandwidth(now, path, tag);
            }
            (
                Part::Router,
                LocalMsg::Rate {
                    tag,
                    path,
                    every_ms,
                },
            ) => {
                let every = (every_ms > 0).then(|| Duration::from_millis(u64::from(every_ms)));
                m.set_rate(now, path, tag, every);
            }
            _ => self.unexpected(),
        }
        self.drain();
    }

    pub fn handle_timeout(&mut self, now: Duration) {
        self.monitor.handle_timeout(now);
        if self.rate.update(
            now,
            [
                (false, self.monitor.counters.probes_sent.get()),
                (true, self.monitor.counters.answered.get()),
            ],
        ) {
            self.monitor.forget_idle(now, FORGET_IDLE);
        }
        self.drain();
    }

    pub fn poll_timeout(&self) -> Option<Duration> {
        // The rate meter needs a look now and then even when idle.
        let meter = self.rate.next_update();
        [self.monitor.poll_timeout(), Some(meter)]
            .into_iter()
            .flatten()
            .min()
    }

    /// Packets to the forwarder, results to the router.
    fn drain(&mut self) {
        while let Some(t) = self.monitor.poll_transmit() {
            self.out.push_back(Output::Local {
                to: Part::Forwarder,
                msg: LocalMsg::Send {
                    hop: t.first_hop,
                    packet: t.bytes,
                },
            });
        }
        while let Some(ev) = self.monitor.poll_event() {
            let msg = match ev {
                MonitorEvent::Probe { tag, path, outcome } => {
                    LocalMsg::Result { tag, path, outcome }
                }
                MonitorEvent::Bandwidth {
                    tag,
                    path,
                    packets,
                    mbps,
                } => LocalMsg::BandwidthResult {
                    tag,
                    path,
                    packets,
                    mbps,
                },
            };
            self.out.push_back(Output::Local {
                to: Part::Router,
                msg,
            });
        }
    }

    /// The core's counters and the monitor's (the core's are shared with
    /// the other parts in pon-proxy, so this renders all of them).
    pub fn metrics(&self) -> pon_telemetry::Renderer {
        let (c, m) = (self.counters.clone(), self.monitor.counters.clone());
        Arc::new(move |w: &mut pon_telemetry::PromWriter| {
            c.render(w);
            m.render(w);
        })
    }

    /// Adds the monitor's estimates and budget to a status.
    pub fn fill(&self, now: Duration, s: &mut Status) {
        s.budget.monitor = self.monitor.budget();
        s.budget.probes_per_sec = self.rate.get(&false);
        s.budget.answers_per_sec = self.rate.get(&true);
        for d in &mut s.destinations {
            for cand in &mut d.candidates {
                cand.monitor =
                    pon_proto::pon::Hops::new(&cand.path).and_then(|h| self.monitor.stats(now, &h));
            }
        }
    }

    /// Every path's estimates and probe rate (pon-monitor's status page).
    pub fn status(&self, now: Duration) -> MonitorStatus {
        let mut s = Status::default();
        self.fill(now, &mut s);
        MonitorStatus {
            id: self.monitor.my_id(),
            budget: s.budget,
            paths: self
                .monitor
                .paths()
                .filter_map(|p| {
                    Some(PathStatus {
                        path: p.as_slice().to_vec(),
                        stats: self.monitor.stats(now, &p)?,
                    })
                })
                .collect(),
            rates: self
                .monitor
                .rates()
                .map(|(p, d)| (p.as_slice().to_vec(), d.as_millis() as u64))
                .collect(),
        }
    }
}

impl Outputs for MonitorPart {
    fn poll_output(&mut self) -> Option<Output> {
        self.out.pop_front()
    }
}
