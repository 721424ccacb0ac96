//! CU mode of the TA: register as an app VM, learn the local forwarder and
//! the app VMs behind distant forwarders, and keep the interception routes
//! in step with that while traffic flows.

use crate::config::TaConfig;
use crate::interception::Interception;
use crate::ta::CurrentForwarder;
use ipnet::IpNet;
use pon_cu::client::{self, ClientStatus};
use pon_cu::view::View;
use pon_proto::control::{Endpoints, PublicKey};
use std::collections::BTreeSet;
use std::net::{IpAddr, Ipv4Addr};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};

/// What to intercept: the configured prefixes, plus every app VM of another
/// cloud that has a proxy (without one, the overlay cannot deliver and the
/// plain IP path is the better choice).
pub fn wanted(view: &View, my_cloud: &str, configured: &[IpNet]) -> Vec<IpNet> {
    let mut set: BTreeSet<IpNet> = configured.iter().copied().collect();
    for app in view.apps() {
        if app.cloud != my_cloud && view.proxy_of(&app.cloud).is_some() {
            set.insert(IpNet::from(IpAddr::V4(app.addr)));
        }
    }
    set.into_iter().collect()
}

/// The forwarder the CU names for this VM: the proxy serving its cloud,
/// at its agent-leg address and UDP port.
pub fn forwarder_in(
    view: &View,
    my_cloud: &str,
    default_port: u16,
) -> Option<((Ipv4Addr, u16), PublicKey)> {
    let p = view.proxy_of(my_cloud)?;
    let port = if p.agent_udp_port != 0 {
        p.agent_udp_port
    } else {
        default_port
    };
    Some(((p.agent_addr, port), p.noise_key))
}

/// What following a view did to the TA's forwarder.
#[derive(Debug, PartialEq, Eq)]
pub enum Followed {
    Unchanged,
    First((Ipv4Addr, u16)),
    Moved {
        old: (Ipv4Addr, u16),
        new: (Ipv4Addr, u16),
    },
}

/// Points `current` at the forwarder `view` names, if it names one: the
/// data path and the steering thread follow from their next packet. A view
/// naming none (the cloud's proxies all gone) keeps the last one, since
/// there is nothing better to send to.
pub fn follow(
    current: &CurrentForwarder,
    view: &View,
    my_cloud: &str,
    default_port: u16,
) -> Followed {
    let Some((new, key)) = forwarder_in(view, my_cloud, default_port) else {
        return Followed::Unchanged;
    };
    match current.swap(new, Some(key)) {
        None => Followed::First(new),
        Some(old) if old != new => Followed::Moved { old, new },
        Some(_) => Followed::Unchanged,
    }
}

pub struct TaCu {
    pub status: Option<Arc<ClientStatus>>,
    forwarder: Arc<CurrentForwarder>,
    named: Option<mpsc::Receiver<()>>,
}

impl TaCu {
    /// The forwarder to send to: the configured one, or in CU mode the one
    /// the CU names, which may change later (blocks until the first).
    pub fn forwarder(&mut self) -> anyhow::Result<Arc<CurrentForwarder>> {
        if let Some(rx) = self.named.take() {
            tracing::info!("waiting for the CU to name this VM's forwarder");
            rx.recv()
                .map_err(|_| anyhow::anyhow!("the CU client stopped before naming a forwarder"))?;
        }
        Ok(self.forwarder.clone())
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
            forwarder: Arc::new(CurrentForwarder::new(
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
    let current = Arc::new(CurrentForwarder::default());
    let cur = current.clone();
    let on_view = Box::new(move |view: &View| {
        match follow(&cur, view, &cloud, default_port) {
            Followed::First(f) => {
                tracing::info!(forwarder = %f.0, "forwarder from the CU");
                let _ = tx.send(());
            }
            Followed::Moved { old, new } => {
                tracing::warn!(old = %old.0, new = %new.0, "the CU names another forwarder: following it");
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
        forwarder: current,
        named: Some(rx),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use pon_cu::view::testing;
    use pon_proto::control::{Change, Config, PublicKey};

    fn empty_view() -> View {
        let mut v = View::default();
        v.apply_config(Config {
            id: 9,
            heartbeat_ms: 500,
            dead_after_ms: 2000,
            peers: vec![],
        });
        v
    }

    #[test]
    fn intercepts_remote_apps_whose_cloud_has_a_proxy() {
        let mut v = empty_view();
        let app =
            |id, cloud, last| Change::Up(testing::app(id, cloud, Ipv4Addr::new(198, 18, 2, last)));
        v.apply_changes(vec![
            app(1, "tokyo", 11),
            app(2, "london", 12),
            Change::Up(testing::proxy(3, "tokyo", Ipv4Addr::new(198, 18, 2, 1))),
        ]);
        let extra: IpNet = "10.0.0.0/8".parse().unwrap();
        assert_eq!(
            wanted(&v, "paris", &[extra]),
            vec![extra, "198.18.2.11/32".parse().unwrap()]
        );
        // Our own cloud's apps are local: never intercepted.
        assert_eq!(wanted(&v, "tokyo", &[]), Vec::<IpNet>::new());
        v.apply_changes(vec![Change::Down(3)]);
        assert!(wanted(&v, "paris", &[]).is_empty());
    }

    fn proxy(id: u32, last: u8) -> Change {
        Change::Up(testing::proxy(id, "paris", Ipv4Addr::new(198, 18, 1, last)))
    }

    #[test]
    fn the_ta_follows_a_new_forwarder_and_its_steering_only() {
        use crate::steering::tests::datagram;
        use crate::steering::{SteeringCounters, SteeringState};
        use crate::ta::{Encapsulator, TaCounters};
        use pon_proto::ip::{IpProtocol, IpipPacket, Ipv4Repr};
        use std::time::Duration;

        let (old, new) = (Ipv4Addr::new(198, 18, 1, 1), Ipv4Addr::new(198, 18, 1, 2));
        let mut v = empty_view();
        v.apply_changes(vec![proxy(1, 1)]);
        let current = CurrentForwarder::default();
        assert_eq!(
            follow(&current, &v, "paris", 7301),
            Followed::First((old, 7301))
        );
        use crate::steering::tests::{proxy_key, TA_SECRET};
        let mut steering = SteeringState::new(TA_SECRET);
        let c = SteeringCounters::default();
        assert_eq!(current.key(), Some(PublicKey([1; 32])));
        // (Both test proxies seal with the same secret.)
        assert_eq!(
            steering.follow(current.get().unwrap().0, Some(proxy_key())),
            None
        );
        let msg = |epoch, seq| datagram(epoch, seq, vec![(Ipv4Addr::new(198, 18, 2, 11), 32)]);
        let t = Duration::from_secs(1);
        assert!(steering
            .on_datagram(&mut msg(5, 9), (old, 1).into(), t, &c)
            .is_some());

        // The old proxy leaves; the CU names the other proxy of the cloud.
        v.apply_changes(vec![Change::Down(1), proxy(2, 2)]);
        assert_eq!(
            follow(&current, &v, "paris", 7301),
            Followed::Moved {
                old: (old, 7301),
                new: (new, 7301)
            }
        );
        assert_eq!(current.get(), Some((new, 7301)));
        // What the old proxy said is dropped...
        assert_eq!(current.key(), Some(PublicKey([2; 32])));
        assert_eq!(steering.follow(new, Some(proxy_key())), Some(vec![]));
        // ... and it is no longer listened to, while the new one is, with
        // its own epoch and sequence.
        assert!(steering
            .on_datagram(&mut msg(5, 10), (old, 1).into(), t, &c)
            .is_none());
        assert!(steering
            .on_datagram(&mut msg(1, 1), (new, 1).into(), t, &c)
            .is_some());
        assert_eq!((c.accepted.get(), c.foreign.get()), (2, 1));

        // The data path sends to the new forwarder.
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
        let (fwd, _) = current.get().unwrap();
        let r = enc
            .encapsulate(&mut buf, 28, fwd, None, &TaCounters::default())
            .unwrap();
        assert_eq!(IpipPacket::new_checked(&buf[r]).unwrap().outer().dst(), new);
    }
}
