//! What an agent knows from the CU: its id and the peers it was given,
//! kept up to date by applying configurations (replace) and updates
//! (change). Sans-I/O; the daemons turn it into their tables.

use pon_proto::control::{AgentInfo, Change, CloudGrant, Config, Endpoints, Peer, PublicKey};
use std::collections::BTreeMap;
use std::net::{Ipv4Addr, SocketAddr};

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct View {
    id: u32,
    peers: BTreeMap<u32, Peer>,
    clouds: Vec<CloudGrant>,
}

/// A proxy as the data path needs it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ProxyRef {
    pub id: u32,
    pub pon: SocketAddr,
    pub agent_addr: Ipv4Addr,
    pub agent_udp_port: u16,
    pub optimise: bool,
    /// The static key the CU vouches for.
    pub noise_key: PublicKey,
}

/// The roles seed 000 gives the proxies of a site (`PROXY.MASTER`,
/// `PROXY.SLAVE`). Every proxy of a site forwards; the master is the one
/// named where one must be (a static TA that takes a single forwarder, the
/// status pages), and the survivor with the lowest id becomes master when
/// it leaves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SiteRole {
    Master,
    Slave,
}

impl SiteRole {
    pub fn as_str(self) -> &'static str {
        match self {
            SiteRole::Master => "PROXY.MASTER",
            SiteRole::Slave => "PROXY.SLAVE",
        }
    }
}

/// An app VM as the data path needs it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AppRef {
    pub id: u32,
    pub cloud: String,
    pub addr: Ipv4Addr,
    pub encap: pon_proto::Encap,
    /// The static key the CU vouches for.
    pub noise_key: PublicKey,
}

impl View {
    /// C: replaces everything (a fresh registration, or a resync).
    pub fn apply_config(&mut self, cfg: Config) {
        self.id = cfg.id;
        self.peers = cfg.peers.into_iter().map(|p| (p.info.id, p)).collect();
        self.clouds = cfg.clouds;
    }

    /// U: applies changes in order; returns whether anything changed.
    pub fn apply_changes(&mut self, changes: Vec<Change>) -> bool {
        let mut changed = false;
        for c in changes {
            match c {
                Change::Up(p) => {
                    if p.info.id != self.id && self.peers.get(&p.info.id) != Some(&p) {
                        self.peers.insert(p.info.id, p);
                        changed = true;
                    }
                }
                Change::Down(id) => changed |= self.peers.remove(&id).is_some(),
                Change::Clouds(clouds) => {
                    changed |= self.clouds != clouds;
                    self.clouds = clouds;
                }
            }
        }
        changed
    }

    /// The CU-assigned id (0 before the first configuration).
    pub fn id(&self) -> u32 {
        self.id
    }

    /// Every cloud's grant, with a proxy or not.
    pub fn clouds(&self) -> &[CloudGrant] {
        &self.clouds
    }

    pub fn peers(&self) -> impl Iterator<Item = &Peer> {
        self.peers.values()
    }

    pub fn get(&self, id: u32) -> Option<&AgentInfo> {
        self.peers.get(&id).map(|p| &p.info)
    }

    pub fn proxies(&self) -> impl Iterator<Item = (&AgentInfo, ProxyRef)> {
        self.peers.values().filter_map(|p| match p.info.endpoints {
            Endpoints::Proxy {
                pon,
                agent_addr,
                agent_udp_port,
            } => Some((
                &p.info,
                ProxyRef {
                    id: p.info.id,
                    pon,
                    agent_addr,
                    agent_udp_port,
                    optimise: p.optimise,
                    noise_key: p.info.noise_key,
                },
            )),
            _ => None,
        })
    }

    pub fn apps(&self) -> impl Iterator<Item = AppRef> + '_ {
        self.peers.values().filter_map(|p| match p.info.endpoints {
            Endpoints::App { addr, encap } => Some(AppRef {
                id: p.info.id,
                cloud: p.info.cloud.clone(),
                addr,
                encap,
                noise_key: p.info.noise_key,
            }),
            _ => None,
        })
    }

    /// The proxies serving `cloud`, lowest id first. All of them carry the
    /// site's traffic (flows are spread over them by hash); the first is
    /// the site's master ([`SiteRole`]).
    pub fn proxies_of<'a>(&'a self, cloud: &'a str) -> impl Iterator<Item = ProxyRef> + 'a {
        // `peers` is ordered by id.
        self.proxies()
            .filter(move |(i, _)| i.cloud == cloud)
            .map(|(_, p)| p)
    }

    /// The master proxy of `cloud`: the one with the lowest id, so that
    /// every agent names the same without further coordination.
    pub fn proxy_of(&self, cloud: &str) -> Option<ProxyRef> {
        self.proxies_of(cloud).next()
    }
}

/// Peers as the CU announces them, for tests of what agents make of their
/// view (feature `testing`).
#[cfg(any(test, feature = "testing"))]
pub mod testing {
    use super::*;

    /// Proxy `id` of `cloud` at `addr` on the well-known ports; routers
    /// optimise paths towards it.
    pub fn proxy(id: u32, cloud: &str, addr: Ipv4Addr) -> Peer {
        Peer {
            info: AgentInfo {
                id,
                cloud: cloud.into(),
                role: "PROXY".into(),
                name: "proxy".into(),
                endpoints: Endpoints::proxy(addr),
                noise_key: PublicKey([id as u8; 32]),
                allowed: vec![],
            },
            optimise: true,
        }
    }

    /// App VM `id` of `cloud` at `addr`, receiving IP-in-IP.
    pub fn app(id: u32, cloud: &str, addr: Ipv4Addr) -> Peer {
        Peer {
            info: AgentInfo {
                id,
                cloud: cloud.into(),
                role: "APP".into(),
                name: format!("app{id}"),
                endpoints: Endpoints::App {
                    addr,
                    encap: pon_proto::Encap::Ipip,
                },
                noise_key: PublicKey([id as u8; 32]),
                allowed: vec![],
            },
            optimise: false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn proxy(id: u32, cloud: &str) -> Peer {
        testing::proxy(id, cloud, Ipv4Addr::new(198, 18, id as u8, 1))
    }

    fn app(id: u32, cloud: &str, last: u8) -> Peer {
        testing::app(id, cloud, Ipv4Addr::new(198, 18, 9, last))
    }

    fn grant(cloud: &str, prefix: &str) -> CloudGrant {
        CloudGrant {
            cloud: cloud.into(),
            prefixes: vec![prefix.parse().unwrap()],
        }
    }

    #[test]
    fn config_replaces_and_updates_change() {
        let mut v = View::default();
        v.apply_config(Config {
            id: 5,
            heartbeat_ms: 500,
            dead_after_ms: 2000,
            peers: vec![proxy(1, "a"), app(2, "a", 11)],
            clouds: vec![grant("a", "198.18.1.0/24")],
        });
        assert_eq!(v.id(), 5);
        assert_eq!(v.clouds(), [grant("a", "198.18.1.0/24")]);
        assert!(v.apply_changes(vec![Change::Up(proxy(3, "b")), Change::Down(2)]));
        assert_eq!(v.proxies().count(), 2);
        assert_eq!(v.apps().count(), 0);
        // Repeating a change changes nothing; our own id is never a peer.
        assert!(!v.apply_changes(vec![Change::Up(proxy(3, "b")), Change::Down(2)]));
        assert!(!v.apply_changes(vec![Change::Up(proxy(5, "x"))]));
        // Grants are replaced whole, and only a different list is a change.
        let both = vec![grant("a", "198.18.1.0/24"), grant("b", "198.18.2.0/24")];
        assert!(v.apply_changes(vec![Change::Clouds(both.clone())]));
        assert!(!v.apply_changes(vec![Change::Clouds(both.clone())]));
        assert_eq!(v.clouds(), both);
        v.apply_config(Config {
            id: 5,
            heartbeat_ms: 500,
            dead_after_ms: 2000,
            peers: vec![],
            clouds: vec![],
        });
        assert_eq!(v.peers().count(), 0);
        assert!(v.clouds().is_empty());
    }

    #[test]
    fn the_lowest_id_proxy_serves_a_cloud() {
        let mut v = View::default();
        v.apply_changes(vec![
            Change::Up(proxy(9, "a")),
            Change::Up(proxy(4, "a")),
            Change::Up(proxy(2, "b")),
        ]);
        assert_eq!(v.proxy_of("a").unwrap().id, 4);
        assert!(v.proxy_of("c").is_none());
        let ids: Vec<u32> = v.proxies_of("a").map(|p| p.id).collect();
        assert_eq!(ids, vec![4, 9]);
        // The master leaves: the survivor takes over.
        v.apply_changes(vec![Change::Down(4)]);
        assert_eq!(v.proxy_of("a").unwrap().id, 9);
    }
}
