//! pon-monitor: the [`Monitor`] in a process of its own. Probes that end at
//! the proxy arrive from the forwarder; probes and answers leave through it
//! (peers accept PON packets only from the forwarder's address); the router
//! asks for probes and rates and gets the results.

use super::link::Link;
use anyhow::Context;
use pon_monitor::{Handled, Monitor, MonitorConfig, MonitorEvent, ProbeOutcome, Send};
use pon_proto::local::LocalMsg;
use pon_proto::pon::Hops;
use serde::{Deserialize, Serialize};
use std::net::SocketAddr;
use std::path::Path;
use std::sync::mpsc::{sync_channel, RecvTimeoutError};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MonitorDaemonConfig {
    /// UDP address for the forwarder's and the router's messages.
    pub listen: SocketAddr,
    /// The forwarder's local-link address.
    pub forwarder: SocketAddr,
    /// The router's local-link address.
    pub router: SocketAddr,
    /// Prometheus endpoint; `GET /status` answers per-path estimates.
    #[serde(default)]
    pub metrics: Option<SocketAddr>,
    #[serde(default)]
    pub monitor: MonitorConfig,
}

impl MonitorDaemonConfig {
    pub fn load(path: &Path) -> anyhow::Result<Self> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("reading monitor config {}", path.display()))?;
        let c: Self = toml::from_str(&text)
            .with_context(|| format!("in monitor config {}", path.display()))?;
        c.monitor.validate().map_err(anyhow::Error::msg)?;
        Ok(c)
    }
}

/// What a query for the monitor's estimates answers.
#[derive(Debug, Clone, Default, Serialize)]
pub struct MonitorStatus {
    pub id: u32,
    pub paths: Vec<(Vec<u32>, pon_monitor::stats::PathStats)>,
    pub rates: Vec<(Vec<u32>, u64)>,
}

pub struct MonitorDaemon {
    pub cfg: MonitorDaemonConfig,
    pub monitor: Monitor,
    pub link: Link,
    pub status: Arc<Mutex<MonitorStatus>>,
}

fn hops(path: &[u32]) -> Option<Hops> {
    Hops::new(path)
}

impl MonitorDaemon {
    pub fn run(mut self) -> anyhow::Result<()> {
        let (tx, rx) = sync_channel(4096);
        self.link
            .spawn_reader(vec![self.cfg.forwarder, self.cfg.router], tx, |m, from| {
                (m, from)
            })?;
        let start = Instant::now();
        let mut out: Vec<Send> = Vec::new();
        let mut next_status = Duration::ZERO;
        loop {
            let now = start.elapsed();
            let wait = self
                .monitor
                .poll_timeout()
                .map_or(Duration::from_millis(100), |t| t.saturating_sub(now))
                .min(Duration::from_millis(100));
            match rx.recv_timeout(wait) {
                Ok((msg, from)) => self.on_msg(start.elapsed(), msg, from, &mut out),
                Err(RecvTimeoutError::Timeout) => {}
                Err(RecvTimeoutError::Disconnected) => return Ok(()),
            }
            let now = start.elapsed();
            self.monitor.on_tick(now, &mut out);
            self.flush(&mut out);
            while let Some(ev) = self.monitor.poll_event() {
                if let MonitorEvent::Probe { tag, path, outcome } = ev {
                    let rtt_us = match outcome {
                        ProbeOutcome::Reply { rtt } => Some(rtt.as_micros() as u64),
                        ProbeOutcome::Lost => None,
                    };
                    self.link.send(
                        self.cfg.router,
                        &LocalMsg::Result {
                            tag,
                            path: path.as_slice().to_vec(),
                            rtt_us,
                        },
                    );
                }
            }
            if now >= next_status {
                next_status = now + Duration::from_millis(500);
                let mut st = self.status.lock().unwrap_or_else(|p| p.into_inner());
                st.id = self.monitor.my_id();
                st.paths = self
                    .monitor
                    .paths()
                    .filter_map(|p| Some((p.as_slice().to_vec(), self.monitor.stats(now, &p)?)))
                    .collect();
                st.rates = self
                    .monitor
                    .rates()
                    .map(|(p, d)| (p.as_slice().to_vec(), d.as_millis() as u64))
                    .collect();
                self.monitor.forget_idle(now, Duration::from_secs(120));
            }
        }
    }

    fn on_msg(&mut self, now: Duration, msg: LocalMsg, from: SocketAddr, out: &mut Vec<Send>) {
        let from_router = from == self.cfg.router;
        match msg {
            LocalMsg::Arrived(b) if from == self.cfg.forwarder => {
                if let Handled::Answer(s) = self.monitor.on_packet(now, &b) {
                    out.push(s);
                    // Answers leave at once: their delay is the other side's RTT.
                    self.flush(out);
                }
            }
            LocalMsg::Topology { id, .. } if from == self.cfg.forwarder => {
                self.monitor.set_my_id(id);
            }
            LocalMsg::Probe { tag, path } if from_router => {
                if let Some(s) = hops(&path).and_then(|h| self.monitor.probe(now, h, tag).ok()) {
                    out.push(s);
                }
            }
            LocalMsg::Rate {
                tag,
                path,
                every_ms,
            } if from_router => {
                if let Some(h) = hops(&path) {
                    let every = (every_ms > 0).then(|| Duration::from_millis(u64::from(every_ms)));
                    self.monitor.set_rate(now, h, tag, every);
                }
            }
            _ => self.link.counters.malformed.inc(),
        }
    }

    fn flush(&self, out: &mut Vec<Send>) {
        for s in out.drain(..) {
            self.link.send(
                self.cfg.forwarder,
                &LocalMsg::Send {
                    hop: s.first_hop,
                    packet: s.bytes,
                },
            );
        }
    }
}
