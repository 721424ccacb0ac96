//! The forwarding table's inputs and the TAs' steering, without I/O, shared
//! by pon-proxy's control thread and pon-forwarder's local link (when the
//! router runs in another process): whoever owns a [`Composer`] is the one
//! writer of the table.

use crate::forwarder::config::RouteConfig;
use crate::forwarder::cu::table_from_view;
use crate::forwarder::{ForwarderConfig, ForwardingTable, TableError};
use pon_cu::view::View;
use pon_proto::control::PublicKey;
use pon_proto::lan;
use pon_proto::steering::Steering;
use pon_tunnel::lan::{Channel, LanSender, PairKey};
use std::collections::{BTreeSet, HashMap};
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::Duration;

/// The base of the table (static configuration, or the CU's latest view)
/// and how routes chosen at run time are laid over it.
pub struct Composer {
    fcfg: ForwarderConfig,
    cloud: Option<String>,
    view: Option<View>,
    /// Peers followed to where their authenticated packets come from:
    /// (the address the configuration or the CU gave when they moved, where
    /// they are now). Dropped once the given address changes: the CU knows
    /// better by then.
    moved: HashMap<u32, (SocketAddr, SocketAddr)>,
}

impl Composer {
    pub fn new(fcfg: ForwarderConfig) -> Self {
        Composer {
            cloud: fcfg.cu.as_ref().map(|c| c.cloud.clone()),
            fcfg,
            view: None,
            moved: HashMap::new(),
        }
    }

    /// Where the configuration or the CU says peer `id` is.
    fn given_addr(&self, id: u32) -> Option<SocketAddr> {
        match (&self.cloud, &self.view) {
            (Some(_), Some(v)) => v.proxies().find(|(_, p)| p.id == id).map(|(_, p)| p.pon),
            (Some(_), None) => None,
            (None, _) => self.fcfg.peers.iter().find(|p| p.id == id).map(|p| p.addr),
        }
    }

    /// Peer `id` authenticated from `at`: follow it there. Returns whether
    /// that changes the table.
    pub fn peer_moved(&mut self, id: u32, at: SocketAddr) -> bool {
        let Some(given) = self.given_addr(id) else {
            return false;
        };
        let before = self.moved.get(&id).map_or(given, |m| m.1);
        if at == given {
            self.moved.remove(&id);
        } else {
            self.moved.insert(id, (given, at));
        }
        before != at
    }

    /// This proxy's role among its site's proxies, as the CU's view has it.
    pub fn site_role(&self) -> Option<pon_cu::view::SiteRole> {
        let v = self.view.as_ref()?;
        let cloud = self.cloud.as_ref()?;
        // The view holds peers only: this proxy is master unless a peer of
        // its site has a lower id.
        let me = v.id();
        Some(match v.proxy_of(cloud) {
            Some(p) if p.id < me => pon_cu::view::SiteRole::Slave,
            _ => pon_cu::view::SiteRole::Master,
        })
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
        let mut t = self.compose_given(chosen)?;
        for (id, (given, at)) in &self.moved {
            if t.peer_addr(*id) == Some(*given) {
                t.set_peer_addr(*id, *at);
            }
        }
        Ok(t)
    }

    fn compose_given(&self, chosen: &[(u32, Vec<u32>)]) -> Result<ForwardingTable, TableError> {
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

/// A steering message, sealed for each TA: `(agent, datagrams)`.
pub struct SteeringOut {
    pub to: Vec<(Ipv4Addr, Vec<Vec<u8>>)>,
    /// Agents not steered: no key known for them.
    pub unkeyed: usize,
}

/// Builds the steering messages: the prefixes served by destinations the
/// overlay cannot reach, sent when they change and refreshed periodically.
/// Each datagram is sealed with the key this proxy shares with the TA it
/// goes to (`pon_tunnel::lan`, channel `Steering`, this run's epoch), so a
/// TA takes steering only from its proxy.
pub struct Steerer {
    epoch: u64,
    seq: u64,
    last: Vec<(Ipv4Addr, u8)>,
    due: Option<Duration>,
    refresh: Duration,
    private_key: [u8; 32],
    /// One sender per TA (address and key), kept while the TA is in the table.
    senders: HashMap<(Ipv4Addr, PublicKey), LanSender>,
}

impl Steerer {
    pub fn new(epoch: u64, refresh: Duration, private_key: [u8; 32]) -> Self {
        Steerer {
            epoch,
            seq: 0,
            last: Vec::new(),
            due: None,
            refresh,
            private_key,
            senders: HashMap::new(),
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
        // A destination takes the IP path when no proxy serving it can be
        // reached (with one left, ingress sends its flows there), and so
        // does a cloud that has no proxy at all.
        let mut bypass: Vec<(Ipv4Addr, u8)> = table
            .destination_groups()
            .filter(|(_, g)| g.all().iter().all(|p| unreachable.contains(p)))
            .map(|(net, _)| net)
            .chain(table.unserved().iter().copied())
            .filter_map(|net| match net.addr() {
                IpAddr::V4(a) => Some((a, net.prefix_len())),
                IpAddr::V6(_) => None,
            })
            .collect();
        bypass.sort_unstable();
        bypass.dedup();
        if bypass != self.last {
            tracing::info!(bypass = ?bypass, "telling the TAs which destinations take the IP path");
            self.last = bypass.clone();
        }
        self.seq += 1;
        // Any size: several datagrams when one does not hold the set.
        let plain: Vec<Vec<u8>> = match Steering::split(self.epoch, self.seq, &bypass) {
            Ok(parts) => parts.iter().filter_map(|p| p.encode().ok()).collect(),
            Err(e) => {
                tracing::error!(error = %e, "the bypass set is too large to send");
                return None;
            }
        };
        let keyed: Vec<(Ipv4Addr, PublicKey)> = table
            .agents()
            .filter_map(|a| a.key.map(|k| (a.addr, k)))
            .collect();
        let unkeyed = table.agents().count() - keyed.len();
        self.senders.retain(|k, _| keyed.contains(k));
        let mut to = Vec::with_capacity(keyed.len());
        for (addr, key) in keyed {
            let sender = match self.senders.entry((addr, key)) {
                std::collections::hash_map::Entry::Occupied(e) => e.into_mut(),
                std::collections::hash_map::Entry::Vacant(v) => {
                    let Some(pair) = PairKey::for_proxy(&self.private_key, &key.0) else {
                        tracing::warn!(agent = %addr, "agent key shares no secret: not steered");
                        continue;
                    };
                    v.insert(pair.sender(Channel::Steering, self.epoch, false))
                }
            };
            let sealed = plain
                .iter()
                .filter_map(|p| {
                    let mut d = vec![0u8; lan::OVERHEAD + p.len()];
                    d[lan::HEADER_LEN..lan::HEADER_LEN + p.len()].copy_from_slice(p);
                    sender.seal(&mut d, p.len()).map(|_| d)
                })
                .collect();
            to.push((addr, sealed));
        }
        Some(SteeringOut { to, unkeyed })
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
                key: Some(PublicKey(pon_tunnel::lan::public_key(&[5; 32]))),
            }],
            &destinations,
            &[],
        )
        .unwrap();
        let proxy_secret = [7; 32];
        let mut s = Steerer::new(42, Duration::from_secs(1), proxy_secret);
        s.wake(Duration::ZERO);
        let out = s
            .message(Duration::ZERO, &table, &BTreeSet::from([2]))
            .unwrap();
        assert_eq!(out.to.len(), 1);
        let (agent, datagrams) = &out.to[0];
        assert_eq!(*agent, Ipv4Addr::new(198, 18, 1, 11));
        assert_eq!(datagrams.len(), 3);
        // The TA (secret [5; 32]) opens them with the key it shares with the proxy.
        let rx = PairKey::for_agent(&[5; 32], &pon_tunnel::lan::public_key(&proxy_secret))
            .unwrap()
            .receiver(Channel::Steering);
        let mut got = BTreeSet::new();
        for d in datagrams {
            let mut d = d.clone();
            let r = rx.open(&mut d).unwrap();
            let m = Steering::decode(&d[r]).unwrap();
            assert_eq!((m.epoch, m.seq, m.parts), (42, 1, 3));
            got.extend(m.bypass);
        }
        assert_eq!(got.len(), 600);
        assert!(!got.contains(&(Ipv4Addr::new(198, 18, 3, 11), 32)));
    }

    #[test]
    fn a_cloud_without_a_proxy_is_steered_to_the_ip_path_until_one_serves_it() {
        let ta_secret = [5; 32];
        let proxy_secret = [7; 32];
        let agent = Agent {
            addr: Ipv4Addr::new(198, 18, 1, 11),
            encap: Encap::Ipip,
            key: Some(PublicKey(pon_tunnel::lan::public_key(&ta_secret))),
        };
        let tokyo: ipnet::IpNet = "198.18.2.0/24".parse().unwrap();
        let berlin: ipnet::IpNet = "198.18.3.0/24".parse().unwrap();
        let rx = PairKey::for_agent(&ta_secret, &pon_tunnel::lan::public_key(&proxy_secret))
            .unwrap()
            .receiver(Channel::Steering);
        let bypass_of = |out: SteeringOut| -> Vec<(Ipv4Addr, u8)> {
            let mut got = Vec::new();
            for d in &out.to[0].1 {
                let mut d = d.clone();
                let r = rx.open(&mut d).unwrap();
                got.extend(Steering::decode(&d[r]).unwrap().bypass);
            }
            got
        };
        let mut s = Steerer::new(42, Duration::from_secs(1), proxy_secret);
        // Tokyo is served by proxy 2 (reachable); berlin has a grant and
        // no proxy.
        let mut table = ForwardingTable::build(
            1,
            &[(2, "198.18.2.1:7300".parse().unwrap())],
            std::slice::from_ref(&agent),
            &[(tokyo, 2)],
            &[],
        )
        .unwrap();
        table.set_unserved(vec![berlin]);
        s.wake(Duration::ZERO);
        let out = s.message(Duration::ZERO, &table, &BTreeSet::new()).unwrap();
        assert_eq!(bypass_of(out), vec![(Ipv4Addr::new(198, 18, 3, 0), 24)]);
        // Berlin's first proxy joins (the table is rebuilt and the steerer
        // woken): nothing takes the IP path any more.
        let mut table = ForwardingTable::build(
            1,
            &[
                (2, "198.18.2.1:7300".parse().unwrap()),
                (3, "198.18.3.1:7300".parse().unwrap()),
            ],
            std::slice::from_ref(&agent),
            &[(tokyo, 2), (berlin, 3)],
            &[],
        )
        .unwrap();
        table.set_unserved(vec![]);
        s.wake(Duration::from_millis(10));
        let out = s
            .message(Duration::from_millis(10), &table, &BTreeSet::new())
            .unwrap();
        assert!(bypass_of(out).is_empty());
    }
}
