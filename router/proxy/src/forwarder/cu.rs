//! CU mode: the forwarder registers with the Central Unit as a proxy and
//! rebuilds its table from the CU's view whenever it changes. The table is
//! swapped whole; forwarding threads never wait for any of this, and keep
//! the last table while the CU is away.

use super::ForwarderConfig;
use ipnet::IpNet;
use pon_cu::client::{self, ClientStatus};
use pon_cu::view::View;
use pon_forwarder::{Agent, ForwardingTable};
use pon_identity::Identity;
use pon_proto::control::Endpoints;
use pon_proto::control::PublicKey;
use std::collections::HashSet;
use std::sync::Arc;

/// Builds the table from what the CU told us, with routes chosen at run
/// time (by the router, `(to, relays)`) taking the place of static
/// `[[route]]`s to the same proxy. Static `[[route]]`s apply once every
/// proxy they name is known; others are skipped for now.
pub fn table_from_view(
    cfg: &ForwarderConfig,
    my_cloud: &str,
    view: &View,
    chosen: &[(u32, Vec<u32>)],
) -> Result<ForwardingTable, pon_forwarder::TableError> {
    let mut seen = HashSet::new();
    seen.insert(cfg.listen);
    if let Some(p) = cfg.public {
        seen.insert(p);
    }
    let peers: Vec<_> = view
        .proxies()
        .filter(|(_, p)| seen.insert(p.pon))
        .map(|(_, p)| (p.id, p.pon))
        .collect();
    let known: HashSet<u32> = peers.iter().map(|p| p.0).collect();
    let mut agents = Vec::new();
    let mut destinations = Vec::new();
    let mut agent_addrs = HashSet::new();
    // Other clouds by their prefixes: every proxy of a cloud serves its
    // grant (ingress spreads flows over them). The own cloud's are left
    // out: its app VMs are this proxy's agents.
    for (info, p) in view.proxies() {
        if info.cloud != my_cloud && known.contains(&p.id) {
            destinations.extend(info.allowed.iter().map(|n| (n.trunc(), p.id)));
        }
    }
    for app in view.apps() {
        if app.cloud == my_cloud {
            if agent_addrs.insert(app.addr) {
                agents.push(Agent {
                    addr: app.addr,
                    encap: app.encap,
                    key: Some(app.noise_key),
                });
            }
        } else {
            // Every proxy of the app's site serves it (ingress spreads
            // flows over them).
            let net = ipnet::IpNet::from(std::net::IpAddr::V4(app.addr));
            for p in view
                .proxies_of(&app.cloud)
                .filter(|p| known.contains(&p.id))
            {
                destinations.push((net, p.id));
            }
        }
    }
    // Clouds with a grant but no proxy: the TAs intercept them too, and
    // are steered to the IP path for them until a proxy serves them.
    let served: HashSet<&str> = view
        .proxies()
        .filter(|(_, p)| known.contains(&p.id))
        .map(|(info, _)| info.cloud.as_str())
        .collect();
    let unserved: Vec<IpNet> = view
        .clouds()
        .iter()
        .filter(|c| c.cloud != my_cloud && !served.contains(c.cloud.as_str()))
        .flat_map(|c| c.prefixes.iter().map(|n| n.trunc()))
        .collect();
    let me = view.id();
    let usable = |to: u32, via: &[u32]| {
        known.contains(&to) && via.iter().all(|h| *h != me && known.contains(h))
    };
    let relays: Vec<_> = cfg
        .routes
        .iter()
        .filter(|r| !chosen.iter().any(|c| c.0 == r.to))
        .map(|r| (r.to, r.via.clone()))
        .chain(chosen.iter().cloned())
        .filter(|(to, via)| usable(*to, via))
        .collect();
    let mut table = ForwardingTable::build(me, &peers, &agents, &destinations, &relays)?;
    table.set_unserved(unserved);
    Ok(table)
}

/// What the data plane needs to trust a peer proxy: the static Noise key the
/// CU vouches for (bound to the proxy's enrolment), and the inner sources
/// its cloud may send (the cloud's address grant: allowed-IPs at egress).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerTrust {
    pub id: u32,
    pub pon: std::net::SocketAddr,
    pub noise_key: PublicKey,
    pub allowed: Vec<IpNet>,
}

/// Every peer proxy of the view, with its key and grant.
pub fn peer_trust(view: &View) -> Vec<PeerTrust> {
    view.proxies()
        .map(|(info, p)| PeerTrust {
            id: p.id,
            pon: p.pon,
            noise_key: info.noise_key,
            allowed: info.allowed.clone(),
        })
        .collect()
}

/// Starts the CU client if the config has a `[cu]` section, handing every
/// new view to `on_view` (on the client's thread) instead of building the
/// table: for daemons that compose the table from more than the view. The
/// proxy registers with `identity`'s Noise key, enrolling first if it has
/// no certificate yet.
pub fn start_with(
    cfg: &ForwarderConfig,
    identity: Arc<Identity>,
    on_view: client::ViewCallback,
) -> anyhow::Result<Option<Arc<ClientStatus>>> {
    let Some(cu) = cfg.cu.clone() else {
        return Ok(None);
    };
    // Without a configured public address, the CU fills in the one it sees
    // us connect from (the unspecified address says so).
    let pon = cfg.public.unwrap_or_else(|| {
        std::net::SocketAddr::new(std::net::Ipv4Addr::UNSPECIFIED.into(), cfg.listen.port())
    });
    let endpoints = Endpoints::Proxy {
        pon,
        agent_addr: cfg.local_addr,
        agent_udp_port: cfg.agent_udp_port,
    };
    let register = cu
        .register(
            "PROXY",
            &cfg.local_addr.to_string(),
            endpoints,
            cfg.id,
            identity.noise_public(),
        )
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    // Only a first-start misconfiguration gets here (pon_cu::session): once
    // the agent has a view, no CU trouble stops it.
    let on_fatal = Box::new(|why: String| {
        tracing::error!("{why}");
        eprintln!("pon-forwarder: {why}");
        std::process::exit(2);
    });
    Ok(Some(client::spawn(
        &cu, identity, register, on_view, on_fatal, true,
    )?))
}

#[cfg(test)]
mod tests {
    use super::*;
    use pon_proto::control::{AgentInfo, Change, Config, Peer};
    use std::net::Ipv4Addr;

    fn peer(id: u32, cloud: &str, endpoints: Endpoints) -> Peer {
        Peer {
            info: AgentInfo {
                id,
                cloud: cloud.into(),
                role: "X".into(),
                name: format!("n{id}"),
                endpoints,
                noise_key: pon_proto::control::PublicKey([id as u8; 32]),
                allowed: vec![],
            },
            optimise: false,
        }
    }

    fn proxy(id: u32, cloud: &str) -> Peer {
        let a = Ipv4Addr::new(198, 18, id as u8, 1);
        peer(
            id,
            cloud,
            Endpoints::Proxy {
                pon: (a, 7300).into(),
                agent_addr: a,
                agent_udp_port: 7301,
            },
        )
    }

    fn app(id: u32, cloud: &str, a: [u8; 4]) -> Peer {
        peer(
            id,
            cloud,
            Endpoints::App {
                addr: a.into(),
                encap: pon_proto::Encap::Ipip,
            },
        )
    }

    #[test]
    fn view_becomes_a_table() {
        let cfg = ForwarderConfig::parse(
            "listen = \"198.18.1.1:7300\"\nlocal_addr = \"198.18.1.1\"\n[[route]]\nto = 2\nvia = [3]\n[cu]\naddr = \"1.2.3.4:7400\"\nca = \"ca\"\ntoken = \"t\"\ncloud = \"paris\"\n",
        )
        .unwrap();
        let mut v = View::default();
        v.apply_config(Config {
            id: 1,
            heartbeat_ms: 500,
            dead_after_ms: 2000,
            peers: vec![
                proxy(2, "tokyo"),
                app(10, "paris", [198, 18, 1, 11]),
                app(11, "tokyo", [198, 18, 2, 11]),
                app(12, "nowhere", [198, 18, 9, 11]),
            ],
            clouds: ["paris", "tokyo", "berlin"]
                .iter()
                .enumerate()
                .map(|(i, c)| pon_proto::control::CloudGrant {
                    cloud: c.to_string(),
                    prefixes: vec![format!("198.18.{}.0/24", i + 1).parse().unwrap()],
                })
                .collect(),
        });
        let t = table_from_view(&cfg, "paris", &v, &[]).unwrap();
        // Berlin has a grant and no proxy: its prefixes take the IP path.
        // Paris is this proxy's own, tokyo has a proxy.
        assert_eq!(t.unserved(), ["198.18.3.0/24".parse().unwrap()]);
        assert_eq!(t.my_id(), 1);
        assert_eq!(t.peer_count(), 2 - 1);
        assert!(t.agent("198.18.1.11".parse().unwrap()).is_some());
        assert_eq!(t.egress_for("198.18.2.11".parse().unwrap(), 0), Some(2));
        // No proxy serves "nowhere"; the relay via 3 waits for 3.
        assert_eq!(t.egress_for("198.18.9.11".parse().unwrap(), 0), None);
        assert_eq!(t.route(2).unwrap().as_slice(), &[2]);
        v.apply_changes(vec![Change::Up(proxy(3, "london"))]);
        let t = table_from_view(&cfg, "paris", &v, &[]).unwrap();
        assert_eq!(t.route(2).unwrap().as_slice(), &[3, 2]);
        // A second proxy in tokyo serves tokyo's apps too.
        v.apply_changes(vec![Change::Up(proxy(4, "tokyo"))]);
        let t = table_from_view(&cfg, "paris", &v, &[]).unwrap();
        let tokyo_app = "198.18.2.11".parse().unwrap();
        assert!(t.serves(tokyo_app, 2) && t.serves(tokyo_app, 4));
        v.apply_changes(vec![Change::Down(2)]);
        let t = table_from_view(&cfg, "paris", &v, &[]).unwrap();
        assert_eq!(t.egress_for(tokyo_app, 0), Some(4));
        // Clouds by their prefixes: tokyo's grant reaches its app VMs the
        // view does not name.
        let mut granted = proxy(4, "tokyo");
        granted.info.allowed = vec!["198.18.2.0/24".parse().unwrap()];
        v.apply_changes(vec![Change::Up(granted)]);
        let t = table_from_view(&cfg, "paris", &v, &[]).unwrap();
        let unnamed = "198.18.2.77".parse().unwrap();
        assert_eq!(t.egress_for(unnamed, 0), Some(4));
        assert!(t.serves(unnamed, 4));
        v.apply_changes(vec![Change::Down(4)]);
        let t = table_from_view(&cfg, "paris", &v, &[]).unwrap();
        assert_eq!(t.egress_for(tokyo_app, 0), None);
        // Tokyo's last proxy gone: its grant is unserved too.
        assert_eq!(
            t.unserved(),
            [
                "198.18.2.0/24".parse().unwrap(),
                "198.18.3.0/24".parse().unwrap()
            ]
        );
    }

    #[test]
    fn peers_come_with_the_key_and_grant_the_cu_vouches_for() {
        let mut tokyo = proxy(2, "tokyo");
        tokyo.info.allowed = vec!["198.18.2.0/24".parse().unwrap()];
        let mut v = View::default();
        v.apply_config(Config {
            id: 1,
            heartbeat_ms: 500,
            dead_after_ms: 2000,
            peers: vec![tokyo, app(10, "paris", [198, 18, 1, 11])],
            clouds: vec![],
        });
        assert_eq!(
            peer_trust(&v),
            vec![PeerTrust {
                id: 2,
                pon: "198.18.2.1:7300".parse().unwrap(),
                noise_key: PublicKey([2; 32]),
                allowed: vec!["198.18.2.0/24".parse().unwrap()],
            }]
        );
        // A revoked (or departed) peer leaves the view, and with it its key.
        v.apply_changes(vec![Change::Down(2)]);
        assert!(peer_trust(&v).is_empty());
    }
}
