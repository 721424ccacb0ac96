//! pon-router: the [`Router`] in a process of its own. The forwarder tells
//! it the topology; it asks the monitor for probes (its interval's, and a
//! keepalive rate on every current route) and gets the results; it sends
//! the forwarder the chosen routes and the destinations to leave to the IP
//! path.

use super::link::Link;
use crate::control::{destinations_status, tag, BudgetStatus, Status, KEEPALIVE};
use anyhow::Context;
use pon_proto::local::LocalMsg;
use pon_proto::pon::Hops;
use pon_routing::{Outcome, ProbeRequest, Router, RouterEvent, RoutingConfig};
use serde::Deserialize;
use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::path::Path;
use std::sync::mpsc::{sync_channel, RecvTimeoutError};
use std::sync::Arc;
use std::time::{Duration, Instant};

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RouterDaemonConfig {
    /// UDP address for the forwarder's and the monitor's messages.
    pub listen: SocketAddr,
    pub forwarder: SocketAddr,
    pub monitor: SocketAddr,
    /// Prometheus endpoint; `GET /status` answers the routes (as pon-proxy).
    #[serde(default)]
    pub metrics: Option<SocketAddr>,
    /// Keepalive period of every current route (see pon-proxy's [proxy]).
    #[serde(default = "default_keepalive")]
    pub keepalive_ms: u32,
    #[serde(default)]
    pub routing: RoutingConfig,
}

fn default_keepalive() -> u32 {
    50
}

impl RouterDaemonConfig {
    pub fn load(path: &Path) -> anyhow::Result<Self> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("reading router config {}", path.display()))?;
        let c: Self = toml::from_str(&text)
            .with_context(|| format!("in router config {}", path.display()))?;
        c.routing.validate()?;
        if c.keepalive_ms == 0 {
            anyhow::bail!("keepalive_ms must be positive");
        }
        Ok(c)
    }
}

/// The routes are re-sent this often even when unchanged.
const ROUTES_EVERY: Duration = Duration::from_secs(1);

pub struct RouterDaemon {
    pub cfg: RouterDaemonConfig,
    pub link: Link,
    pub status: Arc<arc_swap::ArcSwap<Status>>,
    router: Option<Router>,
    watched: HashMap<u32, Hops>,
    probes: BTreeMap<u32, u64>,
    reqs: Vec<ProbeRequest>,
}

impl RouterDaemon {
    pub fn new(
        cfg: RouterDaemonConfig,
        link: Link,
        status: Arc<arc_swap::ArcSwap<Status>>,
    ) -> Self {
        RouterDaemon {
            cfg,
            link,
            status,
            router: None,
            watched: HashMap::new(),
            probes: BTreeMap::new(),
            reqs: Vec::new(),
        }
    }

    pub fn run(mut self) -> anyhow::Result<()> {
        let (tx, rx) = sync_channel(4096);
        self.link
            .spawn_reader(vec![self.cfg.forwarder, self.cfg.monitor], tx, |m, from| {
                (m, from)
            })?;
        let start = Instant::now();
        let mut next_routes = Duration::ZERO;
        let mut next_status = Duration::ZERO;
        loop {
            let now = start.elapsed();
            let tick = self
                .router
                .as_ref()
                .map_or(next_routes, |r| r.poll_timeout().unwrap_or(now));
            let wait = tick
                .min(next_routes)
                .min(next_status)
                .saturating_sub(now)
                .min(Duration::from_millis(100));
            let mut changed = false;
            match rx.recv_timeout(wait) {
                Ok((msg, from)) => changed |= self.on_msg(start.elapsed(), msg, from),
                Err(RecvTimeoutError::Timeout) => {}
                Err(RecvTimeoutError::Disconnected) => return Ok(()),
            }
            let now = start.elapsed();
            if let Some(r) = &mut self.router {
                if r.poll_timeout().is_none_or(|t| t <= now) {
                    self.reqs.clear();
                    r.on_tick(now, &mut self.reqs);
                    for q in &self.reqs {
                        *self.probes.entry(q.dst).or_default() += 1;
                        self.link.send(
                            self.cfg.monitor,
                            &LocalMsg::Probe {
                                tag: tag(q.dst, q.index),
                                path: q.path.as_slice().to_vec(),
                            },
                        );
                    }
                }
            }
            changed |= self.events(now);
            if changed || now >= next_routes {
                next_routes = now + ROUTES_EVERY;
                self.send_routes();
            }
            if now >= next_status {
                next_status = now + Duration::from_millis(250);
                self.publish(now);
            }
        }
    }

    /// Returns whether the routes changed.
    fn on_msg(&mut self, now: Duration, msg: LocalMsg, from: SocketAddr) -> bool {
        match msg {
            LocalMsg::Topology {
                id,
                peers,
                optimise,
            } if from == self.cfg.forwarder && id != 0 => {
                // Started once there is something to route to, so that its
                // first interval probes at once.
                if self.router.as_ref().is_none_or(|r| r.my_id() != id) && !optimise.is_empty() {
                    tracing::info!(id, "router starting for this proxy");
                    self.router = Router::new(id, self.cfg.routing.clone())
                        .map_err(|e| tracing::error!(error = %e, "cannot start the router"))
                        .ok();
                    for (_, p) in self.watched.drain() {
                        self.link.send(
                            self.cfg.monitor,
                            &LocalMsg::Rate {
                                tag: 0,
                                path: p.as_slice().to_vec(),
                                every_ms: 0,
                            },
                        );
                    }
                }
                let Some(r) = &mut self.router else {
                    return false;
                };
                r.set_peers(now, &peers);
                let configured: BTreeMap<u32, _> = r
                    .config()
                    .destinations
                    .iter()
                    .map(|d| (d.id, d.policy))
                    .collect();
                let current: Vec<u32> = r.destinations().collect();
                for d in current.iter().filter(|d| !optimise.contains(d)) {
                    r.remove_destination(*d);
                }
                for d in &optimise {
                    r.add_destination(*d, configured.get(d).copied().flatten());
                }
                self.events(now)
            }
            LocalMsg::Result { tag, path, rtt_us } if from == self.cfg.monitor => {
                let (Some(r), Some(path)) = (&mut self.router, Hops::new(&path)) else {
                    return false;
                };
                let req = ProbeRequest {
                    dst: (tag >> 32) as u32,
                    path,
                    index: tag as u32,
                };
                let outcome = match rtt_us {
                    Some(us) => Outcome::Reply {
                        rtt: Duration::from_micros(us),
                    },
                    None => Outcome::Lost,
                };
                r.on_probe_result(now, &req, outcome);
                self.events(now)
            }
            _ => {
                self.link.counters.malformed.inc();
                false
            }
        }
    }

    /// Drains the router's events; keepalives follow the current routes.
    fn events(&mut self, _now: Duration) -> bool {
        let Some(r) = &mut self.router else {
            return false;
        };
        let mut changed = false;
        while let Some(ev) = r.poll_event() {
            changed = true;
            match ev {
                RouterEvent::RouteChanged { dst, path, reason } => {
                    tracing::info!(dst, path = ?path.as_slice(), ?reason, "route changed")
                }
                RouterEvent::Unreachable { dst } => {
                    tracing::warn!(dst, "no overlay path works: traffic takes the IP path")
                }
                RouterEvent::Reachable { dst } => tracing::info!(dst, "reachable over the overlay"),
            }
        }
        if !changed {
            return false;
        }
        let want: HashMap<u32, Hops> = r
            .destinations()
            .filter_map(|d| r.current_path(d).map(|p| (d, p)))
            .collect();
        let old: Vec<(u32, Hops)> = self.watched.iter().map(|(d, p)| (*d, *p)).collect();
        for (d, p) in old {
            if want.get(&d) != Some(&p) {
                self.watched.remove(&d);
                let msg = LocalMsg::Rate {
                    tag: 0,
                    path: p.as_slice().to_vec(),
                    every_ms: 0,
                };
                self.link.send(self.cfg.monitor, &msg);
            }
        }
        for (d, p) in want {
            if self.watched.insert(d, p) != Some(p) {
                let msg = LocalMsg::Rate {
                    tag: tag(d, KEEPALIVE),
                    path: p.as_slice().to_vec(),
                    every_ms: self.cfg.keepalive_ms,
                };
                self.link.send(self.cfg.monitor, &msg);
            }
        }
        true
    }

    fn send_routes(&self) {
        let Some(r) = &self.router else {
            return;
        };
        let msg = LocalMsg::Routes {
            relays: r.relays(),
            unreachable: r.destinations().filter(|d| !r.is_reachable(*d)).collect(),
        };
        self.link.send(self.cfg.forwarder, &msg);
    }

    fn publish(&self, now: Duration) {
        let destinations = self.router.as_ref().map_or_else(Vec::new, |r| {
            destinations_status(r, None, now, &self.probes, &BTreeMap::new())
        });
        self.status.store(Arc::new(Status {
            id: self.router.as_ref().map_or(0, |r| r.my_id()),
            routing: self.router.is_some(),
            destinations,
            budget: BudgetStatus {
                max_probes_per_sec: 0,
                probes_per_sec: 0.0,
                probes_sent: self.probes.values().sum(),
                probe_bytes_sent: 0,
                refused: 0,
                answered: 0,
                keepalive_ms: u64::from(self.cfg.keepalive_ms),
                interval_ms: Some(self.cfg.routing.interval_ms),
                probes_per_interval: Some(self.cfg.routing.probes_per_interval),
            },
        }));
    }
}
