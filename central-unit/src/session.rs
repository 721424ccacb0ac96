//! The agent side of the protocol, without I/O: when to (re)connect, what
//! to send, when to send heartbeats, and what the CU's messages mean for the
//! agent's view. The client task feeds it events and carries out its actions.

use crate::view::View;
use pon_proto::control::{AgentMsg, CuMsg, Register};
use std::time::Duration;

/// Exponential backoff with jitter, so that agents started together (or
/// all cut off by a CU restart) do not reconnect in lockstep.
#[derive(Debug, Clone)]
pub struct Backoff {
    min: Duration,
    max: Duration,
    current: Duration,
    seed: u64,
}

impl Backoff {
    pub fn new(min: Duration, max: Duration, seed: u64) -> Self {
        Backoff {
            min,
            max,
            current: min,
            seed: seed | 1,
        }
    }

    /// The next delay: the current step ±25%, then the step doubles.
    pub fn next_delay(&mut self) -> Duration {
        // xorshift64: jitter only, no need for a real RNG.
        self.seed ^= self.seed << 13;
        self.seed ^= self.seed >> 7;
        self.seed ^= self.seed << 17;
        let base = self.current.as_millis() as u64;
        let jitter = (self.seed % (base / 2 + 1)) as i64 - (base / 4) as i64;
        let d = Duration::from_millis((base as i64 + jitter).max(1) as u64);
        self.current = (self.current * 2).min(self.max);
        d
    }

    pub fn reset(&mut self) {
        self.current = self.min;
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum State {
    /// Not connected; connect at `retry_at`.
    Idle {
        retry_at: Duration,
    },
    Connecting,
    /// Connected, Register sent, waiting for the configuration.
    Registering,
    Registered,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SessionAction {
    Connect,
    Send(AgentMsg),
    /// The view changed: rebuild whatever depends on it.
    ViewChanged,
}

/// Why the session cannot go on: retrying would only repeat the refusal.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("the CU refused this agent: {0}")]
pub struct Refused(pub String);

pub struct Session {
    register: Register,
    state: State,
    backoff: Backoff,
    heartbeat: Duration,
    next_heartbeat: Option<Duration>,
    view: View,
}

impl Session {
    pub fn new(register: Register, now: Duration, seed: u64) -> Self {
        Session {
            register,
            state: State::Idle { retry_at: now },
            backoff: Backoff::new(Duration::from_millis(200), Duration::from_secs(5), seed),
            heartbeat: Duration::from_millis(500),
            next_heartbeat: None,
            view: View::default(),
        }
    }

    pub fn state(&self) -> State {
        self.state
    }

    pub fn view(&self) -> &View {
        &self.view
    }

    /// When `poll` next has something to do.
    pub fn next_deadline(&self) -> Option<Duration> {
        match self.state {
            State::Idle { retry_at } => Some(retry_at),
            State::Registered => self.next_heartbeat,
            _ => None,
        }
    }

    /// Time passes: connect when the backoff expired, heartbeat when due.
    pub fn poll(&mut self, now: Duration) -> Option<SessionAction> {
        match self.state {
            State::Idle { retry_at } if now >= retry_at => {
                self.state = State::Connecting;
                Some(SessionAction::Connect)
            }
            State::Registered if self.next_heartbeat.is_some_and(|t| now >= t) => {
                self.next_heartbeat = Some(now + self.heartbeat);
                Some(SessionAction::Send(AgentMsg::Heartbeat))
            }
            _ => None,
        }
    }

    /// The connection is up: register, asking for the id we had if any.
    pub fn connected(&mut self) -> SessionAction {
        self.state = State::Registering;
        let mut r = self.register.clone();
        if self.view.id() != 0 {
            r.id_hint = Some(self.view.id());
        }
        SessionAction::Send(AgentMsg::Register(r))
    }

    /// Connecting failed or the connection dropped: retry after a backoff.
    /// The view is kept: the data path goes on with what it last knew.
    pub fn disconnected(&mut self, now: Duration) -> Duration {
        let d = self.backoff.next_delay();
        self.state = State::Idle { retry_at: now + d };
        self.next_heartbeat = None;
        d
    }

    pub fn received(&mut self, msg: CuMsg, now: Duration) -> Result<Vec<SessionAction>, Refused> {
        match msg {
            CuMsg::Config(cfg) => {
                self.heartbeat = Duration::from_millis(u64::from(cfg.heartbeat_ms.max(50)));
                self.next_heartbeat = Some(now + self.heartbeat);
                self.state = State::Registered;
                self.backoff.reset();
                let before = self.view.clone();
                self.view.apply_config(cfg);
                Ok(if before != self.view {
                    vec![SessionAction::ViewChanged]
                } else {
                    vec![]
                })
            }
            CuMsg::Update(changes) if self.state == State::Registered => {
                Ok(if self.view.apply_changes(changes) {
                    vec![SessionAction::ViewChanged]
                } else {
                    vec![]
                })
            }
            // An update before the configuration would be a CU bug; the
            // configuration that follows holds the truth anyway. The rest
            // answer enrolments and admin requests, never a registration.
            CuMsg::Update(_)
            | CuMsg::Registry(_)
            | CuMsg::Enrolled { .. }
            | CuMsg::Token { .. }
            | CuMsg::Tokens(_)
            | CuMsg::Revoked { .. } => Ok(vec![]),
            CuMsg::Refused(why) => Err(Refused(why)),
        }
    }

    /// Clean shutdown: tell the CU, so others hear at once.
    pub fn goodbye(&self) -> Option<AgentMsg> {
        (self.state == State::Registered).then_some(AgentMsg::Goodbye)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use pon_proto::control::{Config, Endpoints, PROTOCOL_VERSION};

    fn reg() -> Register {
        Register {
            version: PROTOCOL_VERSION,
            cloud: "paris".into(),
            role: "APP".into(),
            name: "app1".into(),
            endpoints: Endpoints::App {
                addr: "198.18.1.11".parse().unwrap(),
                encap: pon_proto::Encap::Ipip,
            },
            id_hint: None,
            noise_key: pon_proto::control::PublicKey([1; 32]),
        }
    }

    fn cfg(id: u32) -> CuMsg {
        CuMsg::Config(Config {
            id,
            heartbeat_ms: 500,
            dead_after_ms: 2000,
            peers: vec![],
        })
    }

    #[test]
    fn backoff_grows_to_the_cap_with_jitter() {
        let mut b = Backoff::new(Duration::from_millis(200), Duration::from_secs(5), 42);
        let d: Vec<_> = (0..10).map(|_| b.next_delay()).collect();
        assert!(d[0] >= Duration::from_millis(150) && d[0] <= Duration::from_millis(250));
        assert!(d[9] >= Duration::from_millis(3750) && d[9] <= Duration::from_millis(6250));
        b.reset();
        assert!(b.next_delay() <= Duration::from_millis(250));
    }

    #[test]
    fn connect_register_heartbeat_reconnect() {
        let t = Duration::ZERO;
        let mut s = Session::new(reg(), t, 1);
        assert_eq!(s.poll(t), Some(SessionAction::Connect));
        assert_eq!(s.poll(t), None);
        // The CU is not there yet: retry later, with growing delays.
        let d1 = s.disconnected(t);
        assert_eq!(s.poll(t), None);
        assert_eq!(s.poll(t + d1), Some(SessionAction::Connect));
        let d2 = s.disconnected(t + d1);
        assert!(d2 > d1 / 2);
        assert_eq!(s.poll(t + d1 + d2), Some(SessionAction::Connect));
        match s.connected() {
            SessionAction::Send(AgentMsg::Register(r)) => assert_eq!(r.id_hint, None),
            other => panic!("{other:?}"),
        }
        assert_eq!(
            s.received(cfg(7), t).unwrap(),
            vec![SessionAction::ViewChanged]
        );
        assert_eq!(s.state(), State::Registered);
        assert_eq!(s.poll(t + Duration::from_millis(100)), None);
        assert_eq!(
            s.poll(t + Duration::from_millis(500)),
            Some(SessionAction::Send(AgentMsg::Heartbeat))
        );
        // The CU goes away; we come back asking for our id.
        s.disconnected(t);
        assert_eq!(s.view().id(), 7, "the view survives the disconnect");
        assert_eq!(
            s.poll(t + Duration::from_secs(1)),
            Some(SessionAction::Connect)
        );
        match s.connected() {
            SessionAction::Send(AgentMsg::Register(r)) => assert_eq!(r.id_hint, Some(7)),
            other => panic!("{other:?}"),
        }
        // The same config again is no change for the data path.
        assert_eq!(s.received(cfg(7), t).unwrap(), vec![]);
        assert_eq!(s.goodbye(), Some(AgentMsg::Goodbye));
    }

    #[test]
    fn refusal_is_final() {
        let t = Duration::ZERO;
        let mut s = Session::new(reg(), t, 1);
        s.poll(t);
        s.connected();
        assert_eq!(
            s.received(CuMsg::Refused("wrong join token".into()), t),
            Err(Refused("wrong join token".into()))
        );
    }
}
