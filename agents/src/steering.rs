//! The TA's end of the router → TA channel: the local proxy's router tells
//! its TAs, over UDP on the site LAN, which destinations the overlay cannot
//! reach right now; the TA leaves them to the plain IP path (removes their
//! interception routes) until the router says they are reachable again.
//!
//! Direct rather than through the CU: the proxy is one LAN hop away, so the
//! switch to the IP path takes a datagram instead of a round through a CU
//! that may be away; the CU is not on the data path's failure path.
//! Only datagrams from the forwarder's address are accepted; each carries
//! the whole bypass set, so a lost one is repaired by the next refresh.

use crate::interception::Interception;
use ipnet::{IpNet, Ipv4Net};
use pon_proto::steering::{Steering, MAX_STEERING_LEN};
use std::net::{IpAddr, Ipv4Addr, SocketAddr, UdpSocket};
use std::sync::{Arc, Mutex};

pon_telemetry::counters! {
    pub struct SteeringCounters {
        accepted => ("pon_ta_steering_messages_total", "result=\"accepted\"", "Steering messages from the local proxy, by result."),
        stale => ("pon_ta_steering_messages_total", "result=\"stale\"", "Steering messages from the local proxy, by result."),
        foreign => ("pon_ta_steering_messages_total", "result=\"foreign_source\"", "Steering messages from the local proxy, by result."),
        malformed => ("pon_ta_steering_messages_total", "result=\"malformed\"", "Steering messages from the local proxy, by result."),
        apply_errors => ("pon_ta_steering_apply_errors_total", "", "Bypass sets that could not be applied to the routing table."),
    }
}

/// What a datagram means for the TA, without I/O.
#[derive(Default)]
pub struct SteeringState {
    last: Option<Steering>,
}

impl SteeringState {
    /// The bypass set to apply, if `bytes` from `from` is a newer message
    /// from the forwarder at `forwarder`.
    pub fn on_datagram(
        &mut self,
        bytes: &[u8],
        from: SocketAddr,
        forwarder: Ipv4Addr,
        c: &SteeringCounters,
    ) -> Option<Vec<IpNet>> {
        if from.ip() != IpAddr::V4(forwarder) {
            c.foreign.inc();
            return None;
        }
        let m = match Steering::decode(bytes) {
            Ok(m) => m,
            Err(e) => {
                c.malformed.inc();
                tracing::debug!(error = %e, "bad steering message");
                return None;
            }
        };
        if self.last.as_ref().is_some_and(|old| !m.newer_than(old)) {
            c.stale.inc();
            return None;
        }
        c.accepted.inc();
        let set = m
            .bypass
            .iter()
            .filter_map(|(a, l)| Ipv4Net::new(*a, *l).ok().map(IpNet::V4))
            .collect();
        self.last = Some(m);
        Some(set)
    }
}

/// Listens on `bind` for the forwarder's steering messages and applies
/// them to `interception`, on a thread of its own.
pub fn start(
    bind: SocketAddr,
    forwarder: Ipv4Addr,
    interception: Arc<Mutex<Interception>>,
    counters: Arc<SteeringCounters>,
) -> anyhow::Result<()> {
    use anyhow::Context;
    let sock = UdpSocket::bind(bind).with_context(|| format!("binding steering socket {bind}"))?;
    std::thread::Builder::new()
        .name("ta-steering".into())
        .spawn(move || {
            let mut state = SteeringState::default();
            let mut buf = vec![0u8; MAX_STEERING_LEN + 1];
            loop {
                let (n, from) = match sock.recv_from(&mut buf) {
                    Ok(x) => x,
                    Err(e) => {
                        tracing::warn!(error = %e, "steering socket");
                        continue;
                    }
                };
                let Some(set) = state.on_datagram(&buf[..n], from, forwarder, &counters) else {
                    continue;
                };
                let mut i = interception.lock().unwrap_or_else(|p| p.into_inner());
                if i.bypass().iter().copied().collect::<Vec<_>>() != set {
                    tracing::info!(bypass = ?set, "the proxy's router changed the destinations left to the IP path");
                }
                if let Err(e) = i.set_bypass(&set) {
                    counters.apply_errors.inc();
                    tracing::error!(error = %format!("{e:#}"), "applying the bypass set");
                }
            }
        })?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use pon_proto::steering::STEERING_VERSION;

    #[test]
    fn only_newer_messages_from_the_forwarder_count() {
        let fwd = Ipv4Addr::new(198, 18, 1, 1);
        let c = SteeringCounters::default();
        let mut s = SteeringState::default();
        let msg = |epoch, seq, last: u8| {
            Steering {
                version: STEERING_VERSION,
                epoch,
                seq,
                bypass: vec![(Ipv4Addr::new(198, 18, 2, last), 32)],
            }
            .encode()
            .unwrap()
        };
        let from = SocketAddr::from((fwd, 40000));
        let got = s.on_datagram(&msg(1, 1, 11), from, fwd, &c).unwrap();
        assert_eq!(got, vec!["198.18.2.11/32".parse::<IpNet>().unwrap()]);
        assert!(s.on_datagram(&msg(1, 1, 12), from, fwd, &c).is_none());
        assert!(s
            .on_datagram(
                &msg(1, 2, 12),
                SocketAddr::from(([198, 18, 1, 99], 1)),
                fwd,
                &c
            )
            .is_none());
        assert!(s.on_datagram(b"junk", from, fwd, &c).is_none());
        // A restarted proxy (new epoch) starts its sequence again.
        assert!(s.on_datagram(&msg(2, 0, 13), from, fwd, &c).is_some());
        assert_eq!(
            (
                c.accepted.get(),
                c.stale.get(),
                c.foreign.get(),
                c.malformed.get()
            ),
            (2, 1, 1, 1)
        );
    }
}
