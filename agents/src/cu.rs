//! CU mode of the TA: register as an app VM, learn the local forwarder and
//! the app VMs behind distant forwarders, and keep the interception routes
//! in step with that while traffic flows.

use crate::config::TaConfig;
use crate::interception::Interception;
use ipnet::IpNet;
use pon_cu::client::{self, ClientStatus};
use pon_cu::view::View;
use pon_proto::control::Endpoints;
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

pub struct TaCu {
    pub status: Option<Arc<ClientStatus>>,
    forwarder: Option<mpsc::Receiver<(Ipv4Addr, u16)>>,
    fixed: Option<(Ipv4Addr, u16)>,
}

impl TaCu {
    /// The forwarder to send to: the configured one, or in CU mode the
    /// first one the CU names (blocks until then).
    pub fn forwarder(&mut self) -> anyhow::Result<(Ipv4Addr, u16)> {
        if let Some(f) = self.fixed {
            return Ok(f);
        }
        let rx = self.forwarder.take().expect("forwarder() is called once");
        tracing::info!("waiting for the CU to name this VM's forwarder");
        rx.recv()
            .map_err(|_| anyhow::anyhow!("the CU client stopped before naming a forwarder"))
    }
}

pub fn start(cfg: &TaConfig, interception: Arc<Mutex<Interception>>) -> anyhow::Result<TaCu> {
    let Some(cu) = cfg.cu.clone() else {
        let fwd = cfg.forwarder.expect("validated: forwarder or [cu]");
        return Ok(TaCu {
            status: None,
            forwarder: None,
            fixed: Some((fwd, cfg.forwarder_udp_port)),
        });
    };
    let endpoints = Endpoints::App {
        addr: cfg.local_addr,
        encap: cfg.encap(),
    };
    let register = cu
        .register("APP", &cfg.local_addr.to_string(), endpoints, None)
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    let (tx, rx) = mpsc::channel();
    let cloud = cu.cloud.clone();
    let configured = cfg.intercept.clone();
    let default_port = cfg.forwarder_udp_port;
    let mut current: Option<(Ipv4Addr, u16)> = None;
    let on_view = Box::new(move |view: &View| {
        if let Some(p) = view.proxy_of(&cloud) {
            let port = if p.agent_udp_port != 0 {
                p.agent_udp_port
            } else {
                default_port
            };
            let f = (p.agent_addr, port);
            match current {
                None => {
                    tracing::info!(forwarder = %f.0, "forwarder from the CU");
                    let _ = tx.send(f);
                    current = Some(f);
                }
                Some(c) if c != f => tracing::warn!(
                    old = %c.0,
                    new = %f.0,
                    "the CU names another forwarder; restart the TA to follow it"
                ),
                Some(_) => {}
            }
        }
        let want = wanted(view, &cloud, &configured);
        let mut i = interception.lock().unwrap_or_else(|p| p.into_inner());
        if let Err(e) = i.apply(&want) {
            tracing::error!(error = %format!("{e:#}"), "updating interception routes");
        }
    });
    let on_fatal = Box::new(|why: String| {
        tracing::error!("{why}");
        eprintln!("pon-ta: {why}");
        std::process::exit(2);
    });
    let status = client::spawn(&cu, register, on_view, on_fatal, true)?;
    Ok(TaCu {
        status: Some(status),
        forwarder: Some(rx),
        fixed: None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use pon_proto::control::{AgentInfo, Change, Config, Peer};

    fn peer(id: u32, cloud: &str, endpoints: Endpoints) -> Change {
        Change::Up(Peer {
            info: AgentInfo {
                id,
                cloud: cloud.into(),
                role: "X".into(),
                name: format!("n{id}"),
                endpoints,
            },
            optimise: false,
        })
    }

    #[test]
    fn intercepts_remote_apps_whose_cloud_has_a_proxy() {
        let mut v = View::default();
        v.apply_config(Config {
            id: 9,
            heartbeat_ms: 500,
            dead_after_ms: 2000,
            peers: vec![],
        });
        let app = |id, cloud: &str, last| {
            peer(
                id,
                cloud,
                Endpoints::App {
                    addr: Ipv4Addr::new(198, 18, 2, last),
                    encap: pon_proto::Encap::Ipip,
                },
            )
        };
        let a = Ipv4Addr::new(198, 18, 2, 1);
        v.apply_changes(vec![
            app(1, "tokyo", 11),
            app(2, "london", 12),
            peer(
                3,
                "tokyo",
                Endpoints::Proxy {
                    pon: (a, 7300).into(),
                    agent_addr: a,
                    agent_udp_port: 7301,
                },
            ),
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
}
