//! CU mode of the TA: register as an app VM, learn the local forwarder and
//! the app VMs behind distant forwarders, and keep the interception routes
//! in step with that while traffic flows.

use crate::config::TaConfig;
use crate::interception::Interception;
use crate::ta::{Forwarder, SiteForwarders};
use ipnet::IpNet;
use pon_cu::client::{self, ClientStatus};
use pon_cu::view::View;
use pon_proto::control::{Endpoints, PublicKey};
use std::collections::BTreeSet;
use std::net::{IpAddr, Ipv4Addr};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};

/// What to intercept: the configured prefixes, plus every other cloud's
/// grant, whether it has a proxy now or not, plus any app VM of another
/// cloud the view names one by one. Which of these the overlay cannot
/// deliver to (a cloud without a proxy, or none reachable) the site's proxy
/// says by steering, and those take the plain IP path: a cloud's proxies
/// coming and going is news to its peers' proxies, not to every TA.
pub fn wanted(view: &View, my_cloud: &str, configured: &[IpNet]) -> Vec<IpNet> {
    let mut set: BTreeSet<IpNet> = configured.iter().copied().collect();
    for c in view.clouds() {
        if c.cloud != my_cloud {
            set.extend(c.prefixes.iter().map(|n| n.trunc()));
        }
    }
    for app in view.apps() {
        if app.cloud != my_cloud {
            set.insert(IpNet::from(IpAddr::V4(app.addr)));
        }
    }
    set.into_iter().collect()
}

/// The forwarders the CU names for this VM: every proxy serving its
/// cloud, at its agent-leg address and UDP port, with its static key.
pub fn forwarders_in(view: &View, my_cloud: &str, default_port: u16) -> Vec<Forwarder> {
    view.proxies_of(my_cloud)
        .map(|p| Forwarder {
            id: p.id,
            addr: (
                p.agent_addr,
                if p.agent_udp_port != 0 {
                    p.agent_udp_port
                } else {
                    default_port
                },
            ),
            key: Some(p.noise_key),
        })
        .collect()
}

/// What following a view did to the TA's forwarders.
#[derive(Debug, PartialEq, Eq)]
pub enum Followed {
    Unchanged,
    First(Vec<(Ipv4Addr, u16)>),
    Changed {
        old: Vec<(Ipv4Addr, u16)>,
        new: Vec<(Ipv4Addr, u16)>,
    },
}

/// Points `forwarders` at the proxies `view` names for the site, if it
/// names any: the data path and the steering thread follow from their next
/// packet. A view naming none (the cloud's proxies all gone) keeps the last
/// ones, since there is nothing better to send to.
pub fn follow(
    forwarders: &SiteForwarders,
    view: &View,
    my_cloud: &str,
    default_port: u16,
) -> Followed {
    let named = forwarders_in(view, my_cloud, default_port);
    let addrs = |v: &[Forwarder]| v.iter().map(|f| f.addr).collect::<Vec<_>>();
    let new = addrs(&named);
    match forwarders.name(named) {
        None => Followed::Unchanged,
        Some(old) if old.is_empty() => Followed::First(new),
        Some(old) => Followed::Changed {
            old: addrs(&old),
            new,
        },
    }
}

pub struct TaCu {
    pub status: Option<Arc<ClientStatus>>,
    forwarders: Arc<SiteForwarders>,
    named: Option<mpsc::Receiver<()>>,
}

impl TaCu {
    /// The forwarders to send to: the configured one, or in CU mode the
    /// proxies the CU names for the site, which may change later (blocks
    /// until the first are named).
    pub fn forwarders(&mut self) -> anyhow::Result<Arc<SiteForwarders>> {
        if let Some(rx) = self.named.take() {
            tracing::info!("waiting for the CU to name this VM's forwarders");
            rx.recv()
                .map_err(|_| anyhow::anyhow!("the CU client stopped before naming a forwarder"))?;
        }
        Ok(self.forwarders.clone())
    }
}

/// Told the proxies of this VM's site (agent-side address, static key) with
/// every view: pon-agent's RA takes packets from any of them.
pub type SiteProxies = Box<dyn Fn(&[(Ipv4Addr, PublicKey)]) + Send>;

/// The proxies of `my_cloud` in `view`, lowest id first.
pub fn site_proxies(view: &View, my_cloud: &str) -> Vec<(Ipv4Addr, PublicKey)> {
    let mut v: Vec<(u32, Ipv4Addr, PublicKey)> = view
        .proxies()
        .filter(|(info, _)| info.cloud == my_cloud)
        .map(|(info, p)| (p.id, p.agent_addr, info.noise_key))
        .collect();
    v.sort_by_key(|p| p.0);
    v.into_iter().map(|(_, a, k)| (a, k)).collect()
}

pub fn start(
    cfg: &TaConfig,
    identity: Arc<pon_identity::Identity>,
    interception: Arc<Mutex<Interception>>,
    on_site_proxies: Option<SiteProxies>,
) -> anyhow::Result<TaCu> {
    let Some(cu) = cfg.cu.clone() else {
        let fwd = cfg.forwarder.expect("validated: forwarder or [cu]");
        return Ok(TaCu {
            status: None,
            forwarders: Arc::new(SiteForwarders::new(
                (fwd, cfg.forwarder_udp_port),
                cfg.forwarder_key,
            )),
            named: None,
        });
    };
    let endpoints = Endpoints::App {
        addr: cfg.local_addr,
        encap: cfg.encap(),
    };
    let register = cu
        .register(
            "APP",
            &cfg.local_addr.to_string(),
            endpoints,
            None,
            identity.noise_public(),
        )
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    let (tx, rx) = mpsc::channel();
    let cloud = cu.cloud.clone();
    let configured = cfg.intercept.clone();
    let default_port = cfg.forwarder_udp_port;
    let forwarders = Arc::new(SiteForwarders::default());
    let named = forwarders.clone();
    let on_view = Box::new(move |view: &View| {
        match follow(&named, view, &cloud, default_port) {
            Followed::First(f) => {
                tracing::info!(forwarders = ?f, "forwarders from the CU");
                let _ = tx.send(());
            }
            Followed::Changed { old, new } => {
                tracing::warn!(
                    ?old,
                    ?new,
                    "the CU names other forwarders for this site: following them"
                );
            }
            Followed::Unchanged => {}
        }
        if let Some(tell) = &on_site_proxies {
            let here = site_proxies(view, &cloud);
            if !here.is_empty() {
                tell(&here);
            }
        }
        let want = wanted(view, &cloud, &configured);
        let mut i = interception.lock().unwrap_or_else(|p| p.into_inner());
        if let Err(e) = i.apply(&want) {
            tracing::error!(error = %format!("{e:#}"), "updating interception routes");
        }
    });
    // Only a first-start misconfiguration gets here (pon_cu::session): once
    // the agent has a view, no CU trouble stops it.
    let on_fatal = Box::new(|why: String| {
        tracing::error!("{why}");
        eprintln!("pon-ta: {why}");
        std::process::exit(2);
    });
    let status = client::spawn(&cu, identity, register, on_view, on_fatal, true)?;
    Ok(TaCu {
        status: Some(status),
        forwarders,
        named: Some(rx),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use pon_cu::view::testing;
    use pon_proto::control::{Change, Config};

    fn empty_view() -> View {
        let mut v = View::default();
        v.apply_config(Config {
            id: 9,
            heartbeat_ms: 500,
            dead_after_ms: 2000,
            peers: vec![],
            clouds: vec![],
        });
        v
    }

    #[test]
    fn intercepts_every_other_clouds_grant_with_or_without_a_proxy() {
        use pon_proto::control::CloudGrant;
        let grant = |cloud: &str, p: &str| CloudGrant {
            cloud: cloud.into(),
            prefixes: vec![p.parse().unwrap()],
        };
        let mut v = empty_view();
        let extra: IpNet = "10.0.0.0/8".parse().unwrap();
        // No grants known yet: only what is configured.
        assert_eq!(wanted(&v, "paris", &[extra]), vec![extra]);
        v.apply_changes(vec![Change::Clouds(vec![
            grant("paris", "198.18.1.0/24"),
            grant("tokyo", "198.18.2.0/24"),
        ])]);
        // Tokyo has no proxy: its grant is intercepted all the same (the
        // site's proxy steers it to the IP path while the overlay cannot
        // deliver there). Our own cloud's grant never is.
        assert_eq!(
            wanted(&v, "paris", &[extra]),
            vec![extra, "198.18.2.0/24".parse().unwrap()]
        );
        assert_eq!(
            wanted(&v, "tokyo", &[]),
            vec!["198.18.1.0/24".parse::<IpNet>().unwrap()]
        );
        // A remote app VM the view names one by one (outside any grant).
        let app =
            |id, cloud, last| Change::Up(testing::app(id, cloud, Ipv4Addr::new(203, 0, 113, last)));
        v.apply_changes(vec![app(1, "tokyo", 11), app(2, "paris", 12)]);
        assert_eq!(
            wanted(&v, "paris", &[]),
            vec![
                "198.18.2.0/24".parse::<IpNet>().unwrap(),
                "203.0.113.11/32".parse().unwrap()
            ]
        );
        // New grants replace the old ones.
        v.apply_changes(vec![Change::Clouds(vec![grant("tokyo", "10.2.0.0/16")])]);
        assert_eq!(
            wanted(&v, "paris", &[]),
            vec![
                "10.2.0.0/16".parse::<IpNet>().unwrap(),
                "203.0.113.11/32".parse().unwrap()
            ]
        );
    }

    /// Proxy `id` of paris, sealing steering as the test proxy does.
    fn proxy(id: u32, last: u8) -> Change {
        let mut p = testing::proxy(id, "paris", Ipv4Addr::new(198, 18, 1, last));
        p.info.noise_key = crate::steering::tests::proxy_key();
        Change::Up(p)
    }

    #[test]
    fn the_ta_follows_the_sites_proxies_and_their_steering_only() {
        use crate::steering::tests::datagram;
        use crate::steering::{SiteSteering, SteeringCounters};
        use crate::ta::{choose, Encapsulator, TaCounters};
        use pon_proto::ip::{IpProtocol, IpipPacket, Ipv4Repr};
        use std::time::Duration;

        let (p1, p2) = (Ipv4Addr::new(198, 18, 1, 1), Ipv4Addr::new(198, 18, 1, 2));
        let mut v = empty_view();
        v.apply_changes(vec![proxy(1, 1)]);
        let fwds = SiteForwarders::default();
        assert_eq!(
            follow(&fwds, &v, "paris", 7301),
            Followed::First(vec![(p1, 7301)])
        );
        use crate::steering::tests::TA_SECRET;
        let mut steering = SiteSteering::new(TA_SECRET);
        steering.follow(&fwds.load());
        let c = SteeringCounters::default();
        let msg = |epoch, seq| datagram(epoch, seq, vec![(Ipv4Addr::new(198, 18, 2, 11), 32)]);
        let t = Duration::from_secs(1);
        steering.on_datagram(&mut msg(5, 9), (p1, 1).into(), t, &c);
        assert_eq!(steering.bypass(), vec!["198.18.2.11/32".parse().unwrap()]);

        // A second proxy joins the site: both are named, and the bypass set
        // is what neither reaches (the new one has no verdict yet).
        v.apply_changes(vec![proxy(2, 2)]);
        assert_eq!(
            follow(&fwds, &v, "paris", 7301),
            Followed::Changed {
                old: vec![(p1, 7301)],
                new: vec![(p1, 7301), (p2, 7301)]
            }
        );
        steering.follow(&fwds.load());
        assert_eq!(steering.bypass(), vec![]);
        // (Both test proxies seal with the same secret.)
        steering.on_datagram(&mut msg(1, 1), (p2, 1).into(), t, &c);
        assert_eq!(steering.bypass(), vec!["198.18.2.11/32".parse().unwrap()]);
        // Someone else on the LAN is nobody's forwarder.
        steering.on_datagram(&mut msg(5, 10), ([198, 18, 1, 99], 1).into(), t, &c);
        assert_eq!((c.accepted.get(), c.foreign.get()), (2, 1));

        // The first proxy falls silent: it is dead for the data path, and
        // every flow goes to the second.
        let later = t + crate::steering::LEASE + Duration::from_millis(100);
        steering.on_datagram(&mut msg(1, 2), (p2, 1).into(), later, &c);
        assert_eq!(steering.on_tick(later, &c), vec![p1]);
        assert_eq!(steering.live_mask(), 0b10);
        let set = fwds.load();
        assert!((0..100).all(|f| choose(&set, steering.live_mask(), f) == Some(1)));

        // The data path sends to the chosen forwarder.
        let local = Ipv4Addr::new(198, 18, 1, 11);
        let enc = Encapsulator {
            local,
            encap: pon_proto::EncapKind::Ipip,
        };
        let mut buf = vec![0u8; crate::BUFFER_LEN];
        Ipv4Repr {
            src: local,
            dst: Ipv4Addr::new(198, 18, 2, 11),
            protocol: IpProtocol::Icmp,
            ttl: 64,
            dont_fragment: true,
            payload_len: 8,
        }
        .emit(&mut buf[crate::HEADROOM..])
        .unwrap();
        let i = choose(&set, steering.live_mask(), enc.flow(&buf, 28)).unwrap();
        let r = enc
            .encapsulate(
                &mut buf,
                28,
                set.members[i].addr.0,
                None,
                &TaCounters::default(),
            )
            .unwrap();
        assert_eq!(IpipPacket::new_checked(&buf[r]).unwrap().outer().dst(), p2);

        // Both silent: everything takes the IP path.
        let much_later = later + crate::steering::LEASE + Duration::from_millis(100);
        assert_eq!(steering.on_tick(much_later, &c), vec![p2]);
        assert_eq!(steering.bypass(), vec!["0.0.0.0/0".parse().unwrap()]);
        assert_eq!(
            steering.take_change(),
            Some(vec!["0.0.0.0/0".parse().unwrap()])
        );
        assert_eq!(steering.take_change(), None, "applied once");
    }
}
