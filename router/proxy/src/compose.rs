//! The forwarding table's inputs and the TAs' steering, without I/O, shared
//! by pon-proxy's control thread and pon-forwarder's local link (when the
//! router runs in another process): whoever owns a [`Composer`] is the one
//! writer of the table.

use crate::forwarder::config::RouteConfig;
use crate::forwarder::cu::table_from_view;
use crate::forwarder::{ForwarderConfig, ForwardingTable, TableError};
use pon_cu::view::View;
use pon_proto::steering::Steering;
use std::collections::BTreeSet;
use std::net::{IpAddr, Ipv4Addr};
use std::time::Duration;

/// The base of the table (static configuration, or the CU's latest view)
/// and how routes chosen at run time are laid over it.
pub struct Composer {
    fcfg: ForwarderConfig,
    cloud: Option<String>,
    view: Option<View>,
}

impl Composer {
    pub fn new(fcfg: ForwarderConfig) -> Self {
        Composer {
            cloud: fcfg.cu.as_ref().map(|c| c.cloud.clone()),
            fcfg,
            view: None,
        }
    }

    pub fn cu_mode(&self) -> bool {
        self.cloud.is_some()
    }

    pub fn set_view(&mut self, view: View) {
        self.view = Some(view);
    }

    /// This proxy's id (0 in CU mode until the CU assigned one).
    pub fn my_id(&self) -> u32 {
        match (&self.cloud, &self.view) {
            (Some(_), Some(v)) => v.id(),
            (Some(_), None) => 0,
            (None, _) => self.fcfg.id.unwrap_or(0),
        }
    }

    /// The peers (relay candidates) and the destinations to optimise: the
    /// CU's role policy, or in static mode every peer.
    pub fn topology(&self) -> (Vec<u32>, Vec<u32>) {
        match (&self.cloud, &self.view) {
            (Some(_), Some(v)) => (
                v.proxies().map(|(_, p)| p.id).collect(),
                v.proxies()
                    .filter(|(_, p)| p.optimise)
                    .map(|(_, p)| p.id)
                    .collect(),
            ),
            (Some(_), None) => (vec![], vec![]),
            (None, _) => {
                let peers: Vec<u32> = self.fcfg.peers.iter().map(|p| p.id).collect();
                (peers.clone(), peers)
            }
        }
    }

    /// Every peer proxy's static key, for the tunnels: from the
    /// configuration, or as the CU vouches for them.
    pub fn peer_keys(&self) -> Vec<(u32, [u8; 32])> {
        match (&self.cloud, &self.view) {
            (Some(_), Some(v)) => v
                .proxies()
                .map(|(info, p)| (p.id, info.noise_key.0))
                .collect(),
            (Some(_), None) => vec![],
            (None, _) => self
                .fcfg
                .peers
                .iter()
                .map(|p| (p.id, p.public_key.0))
                .collect(),
        }
    }

    /// The table with `chosen` routes (`(to, relays)`) in place of static ones.
    pub fn compose(&self, chosen: &[(u32, Vec<u32>)]) -> Result<ForwardingTable, TableError> {
        match (&self.cloud, &self.view) {
            (Some(cloud), Some(view)) => table_from_view(&self.fcfg, cloud, view, chosen),
            (Some(_), None) => self.fcfg.table(),
            (None, _) => {
                let mut cfg = self.fcfg.clone();
                cfg.routes.retain(|r| !chosen.iter().any(|c| c.0 == r.to));
                cfg.routes
                    .extend(chosen.iter().map(|(to, via)| RouteConfig {
                        to: *to,
                        via: via.clone(),
                    }));
                cfg.table()
            }
        }
    }
}

/// A steering message: its datagrams, and the TAs to send them to.
pub struct SteeringOut {
    pub datagrams: Vec<Vec<u8>>,
    pub agents: Vec<Ipv4Addr>,
}

/// Builds the steering messages: the prefixes served by destinations the
/// overlay cannot reach, sent when they change and refreshed periodically.
pub struct Steerer {
    epoch: u64,
    seq: u64,
    last: Vec<(Ipv4Addr, u8)>,
    due: Option<Duration>,
    refresh: Duration,
}

impl Steerer {
    pub fn new(epoch: u64, refresh: Duration) -> Self {
        Steerer {
            epoch,
            seq: 0,
            last: Vec::new(),
            due: None,
            refresh,
        }
    }

    /// Something changed: send at `now` rather than at the next refresh.
    pub fn wake(&mut self, now: Duration) {
        self.due = Some(self.due.map_or(now, |d| d.min(now)));
    }

    pub fn due(&self) -> Option<Duration> {
        self.due
    }

    /// The message for the TAs of `table`, when due.
    pub fn message(
        &mut self,
        now: Duration,
        table: &ForwardingTable,
        unreachable: &BTreeSet<u32>,
    ) -> Option<SteeringOut> {
        if self.due.is_none_or(|t| now < t) {
            return None;
        }
        self.due = Some(now + self.refresh);
        let mut bypass: Vec<(Ipv4Addr, u8)> = table
            .destinations()
            .iter()
            .filter(|(_, proxy)| unreachable.contains(proxy))
            .filter_map(|(net, _)| match net.addr() {
                IpAddr::V4(a) => Some((a, net.prefix_len())),
                IpAddr::V6(_) => None,
            })
            .collect();
        bypass.sort_unstable();
        if bypass != self.last {
            tracing::info!(bypass = ?bypass, "telling the TAs which destinations take the IP path");
            self.last = bypass.clone();
        }
        self.seq += 1;
        // Any size: several datagrams when one does not hold the set.
        let datagrams = match Steering::split(self.epoch, self.seq, &bypass) {
            Ok(parts) => parts.iter().filter_map(|p| p.encode().ok()).collect(),
            Err(e) => {
                tracing::error!(error = %e, "the bypass set is too large to send");
                return None;
            }
        };
        Some(SteeringOut {
            datagrams,
            agents: table.agents().map(|a| a.addr).collect(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::forwarder::Agent;
    use pon_proto::Encap;

    #[test]
    fn a_bypass_set_of_any_size_reaches_the_tas_whole() {
        // 600 app VMs behind proxy 2, which the overlay cannot reach: more
        // than one datagram holds (the old message silently kept 250).
        let destinations: Vec<(ipnet::IpNet, u32)> = (0..600u32)
            .map(|i| {
                let a = Ipv4Addr::from(0x0a02_0000 + i);
                (ipnet::IpNet::from(IpAddr::V4(a)), 2)
            })
            .chain([("198.18.3.11/32".parse().unwrap(), 3)])
            .collect();
        let table = ForwardingTable::build(
            1,
            &[
                (2, "198.18.2.1:7300".parse().unwrap()),
                (3, "198.18.3.1:7300".parse().unwrap()),
            ],
            &[Agent {
                addr: Ipv4Addr::new(198, 18, 1, 11),
                encap: Encap::Ipip,
            }],
            &destinations,
            &[],
        )
        .unwrap();
        let mut s = Steerer::new(42, Duration::from_secs(1));
        s.wake(Duration::ZERO);
        let out = s
            .message(Duration::ZERO, &table, &BTreeSet::from([2]))
            .unwrap();
        assert_eq!(out.datagrams.len(), 3);
        let mut got = BTreeSet::new();
        for d in &out.datagrams {
            let m = Steering::decode(d).unwrap();
            assert_eq!((m.epoch, m.seq, m.parts), (42, 1, 3));
            got.extend(m.bypass);
        }
        assert_eq!(got.len(), 600);
        assert!(!got.contains(&(Ipv4Addr::new(198, 18, 3, 11), 32)));
        assert_eq!(out.agents, vec![Ipv4Addr::new(198, 18, 1, 11)]);
    }
}
