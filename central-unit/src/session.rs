//! The agent side of the protocol, without I/O: when to (re)connect, what
//! to send, when to send heartbeats, what the CU's messages mean for the
//! agent's view, and what a failure to reach the CU means: retry (and
//! whether to say so loudly) or, only at a first start, give up. The client
//! task feeds it events and carries out its actions.
//!
//! The failure policy: control-plane trouble never stops an agent that has
//! had a view, since its data path forwards on that view whatever the CU
//! does; it retries with the backoff below for as long as it runs. Only an
//! agent that has never had a view in this process, and meets a failure
//! that retrying cannot fix without someone changing a configuration (the
//! CU refuses it, the TLS handshake fails, the `[cu]` section cannot make a
//! connection), gives up, so that a wrong token, CA or name is a clear error
//! at start rather than a silent retry loop. A CU that does not answer is
//! never a reason to give up: it may be starting, or be restarted.

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
    /// Registered again after `failures` failed attempts over `outage`
    /// (from the first failure to this configuration).
    Recovered {
        outage: Duration,
        failures: u64,
    },
}

/// Why an attempt to reach the CU, or a connection to it, failed: the
/// client sorts its I/O errors into these, the session decides from them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Failure {
    /// The CU answered the registration with a refusal.
    Refused,
    /// The TLS handshake failed, or the connection was closed with a TLS
    /// error code: a certificate from another CA (a path attacker, a
    /// rotation), or ours not accepted.
    Tls,
    /// No answer in time: the handshake, the registration, or an idle
    /// connection (a CU that is down or cut off).
    Timeout,
    /// The CU closed or reset the connection or the control stream.
    Closed,
    /// A malformed or oversized message from the CU.
    BadMessage,
    /// The `[cu]` section cannot make a connection at all (e.g. a server
    /// name that is not a valid name).
    Config,
    /// The CU's name did not resolve (DNS may be down for a while, or the
    /// record is being moved: retried like a CU that does not answer).
    Resolve,
}

impl Failure {
    pub const ALL: [Failure; 7] = [
        Failure::Refused,
        Failure::Tls,
        Failure::Timeout,
        Failure::Closed,
        Failure::BadMessage,
        Failure::Config,
        Failure::Resolve,
    ];

    /// The `reason` label of the failure metrics.
    pub fn label(self) -> &'static str {
        match self {
            Failure::Refused => "refused",
            Failure::Tls => "tls",
            Failure::Timeout => "timeout",
            Failure::Closed => "closed",
            Failure::BadMessage => "bad_message",
            Failure::Config => "config",
            Failure::Resolve => "resolve",
        }
    }

    /// Whether trying again can succeed without anyone changing a
    /// configuration (ours or the CU's).
    pub fn retry_can_fix(self) -> bool {
        !matches!(self, Failure::Refused | Failure::Tls | Failure::Config)
    }
}

/// What to do after a failure.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Try again in `after`. `alert`: tell the operator (a warning); else
    /// the failure is one more of a storm already reported (debug).
    Retry { after: Duration, alert: bool },
    /// A first-start misconfiguration: the daemon should stop with the
    /// error, since retrying cannot help and no view is being kept alive.
    GiveUp,
}

/// A still-failing outage is reported again this often, so a long outage
/// stays visible in the log without a line per attempt.
pub const ALERT_EVERY: Duration = Duration::from_secs(60);

/// A run of failures since the agent last was registered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Outage {
    /// The first failure.
    pub since: Duration,
    pub failures: u64,
    pub last: Failure,
    last_alert: Duration,
}

/// The CU refused the registration (the client reports it as
/// [`Failure::Refused`]).
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
    /// Whether any configuration arrived in this process's life: from then
    /// on the data path depends on the view, and nothing makes us give up.
    had_view: bool,
    outage: Option<Outage>,
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
            had_view: false,
            outage: None,
        }
    }

    /// Whether a configuration ever arrived (the data path has a view).
    pub fn had_view(&self) -> bool {
        self.had_view
    }

    /// The current run of failures, if the agent is not registered after one.
    pub fn outage(&self) -> Option<&Outage> {
        self.outage.as_ref()
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

    /// Connecting failed or the connection dropped (`why`): retry after a
    /// backoff, unless this is a first-start misconfiguration (see the
    /// module's policy). The view is kept: the data path goes on with what
    /// it last knew.
    pub fn failed(&mut self, now: Duration, why: Failure) -> Verdict {
        if !self.had_view && !why.retry_can_fix() {
            return Verdict::GiveUp;
        }
        let after = self.backoff.next_delay();
        self.state = State::Idle {
            retry_at: now + after,
        };
        self.next_heartbeat = None;
        let alert = match &mut self.outage {
            None => {
                self.outage = Some(Outage {
                    since: now,
                    failures: 1,
                    last: why,
                    last_alert: now,
                });
                true
            }
            Some(o) => {
                o.failures += 1;
                let alert = o.last != why || now.saturating_sub(o.last_alert) >= ALERT_EVERY;
                o.last = why;
                if alert {
                    o.last_alert = now;
                }
                alert
            }
        };
        Verdict::Retry { after, alert }
    }

    pub fn received(&mut self, msg: CuMsg, now: Duration) -> Result<Vec<SessionAction>, Refused> {
        match msg {
            CuMsg::Config(cfg) => {
                self.heartbeat = Duration::from_millis(u64::from(cfg.heartbeat_ms.max(50)));
                self.next_heartbeat = Some(now + self.heartbeat);
                self.state = State::Registered;
                self.backoff.reset();
                self.had_view = true;
                let mut actions = vec![];
                if let Some(o) = self.outage.take() {
                    actions.push(SessionAction::Recovered {
                        outage: now.saturating_sub(o.since),
                        failures: o.failures,
                    });
                }
                let before = self.view.clone();
                self.view.apply_config(cfg);
                if before != self.view {
                    actions.push(SessionAction::ViewChanged);
                }
                Ok(actions)
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
            | CuMsg::Revoked { .. }
            | CuMsg::Matrix(_)
            | CuMsg::MatrixPart { .. }
            | CuMsg::Events(_)
            | CuMsg::Cells(_) => Ok(vec![]),
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
            clouds: vec![],
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

    /// A session that connected and is waiting for its configuration.
    fn registering(t: Duration) -> Session {
        let mut s = Session::new(reg(), t, 1);
        assert_eq!(s.poll(t), Some(SessionAction::Connect));
        s.connected();
        s
    }

    fn retry(v: Verdict) -> (Duration, bool) {
        match v {
            Verdict::Retry { after, alert } => (after, alert),
            Verdict::GiveUp => panic!("gave up"),
        }
    }

    #[test]
    fn connect_register_heartbeat_reconnect() {
        let t = Duration::ZERO;
        let mut s = Session::new(reg(), t, 1);
        assert_eq!(s.poll(t), Some(SessionAction::Connect));
        assert_eq!(s.poll(t), None);
        // The CU is not there yet: retry later, with growing delays.
        let (d1, _) = retry(s.failed(t, Failure::Timeout));
        assert_eq!(s.poll(t), None);
        assert_eq!(s.poll(t + d1), Some(SessionAction::Connect));
        let (d2, _) = retry(s.failed(t + d1, Failure::Timeout));
        assert!(d2 > d1 / 2);
        assert_eq!(s.poll(t + d1 + d2), Some(SessionAction::Connect));
        match s.connected() {
            SessionAction::Send(AgentMsg::Register(r)) => assert_eq!(r.id_hint, None),
            other => panic!("{other:?}"),
        }
        let at = t + d1 + d2;
        assert_eq!(
            s.received(cfg(7), at).unwrap(),
            vec![
                SessionAction::Recovered {
                    outage: d1 + d2,
                    failures: 2
                },
                SessionAction::ViewChanged
            ]
        );
        assert_eq!(s.state(), State::Registered);
        assert_eq!(s.outage(), None);
        assert_eq!(s.poll(at + Duration::from_millis(100)), None);
        assert_eq!(
            s.poll(at + Duration::from_millis(500)),
            Some(SessionAction::Send(AgentMsg::Heartbeat))
        );
        // The CU goes away; we come back asking for our id.
        s.failed(at, Failure::Closed);
        assert_eq!(s.view().id(), 7, "the view survives the disconnect");
        assert_eq!(
            s.poll(at + Duration::from_secs(1)),
            Some(SessionAction::Connect)
        );
        match s.connected() {
            SessionAction::Send(AgentMsg::Register(r)) => assert_eq!(r.id_hint, Some(7)),
            other => panic!("{other:?}"),
        }
        // The same config again is no change for the data path.
        let back = s.received(cfg(7), at + Duration::from_secs(1)).unwrap();
        assert_eq!(
            back,
            vec![SessionAction::Recovered {
                outage: Duration::from_secs(1),
                failures: 1
            }]
        );
        assert_eq!(s.goodbye(), Some(AgentMsg::Goodbye));
    }

    #[test]
    fn a_first_start_gives_up_only_on_what_retrying_cannot_fix() {
        let t = Duration::from_secs(3);
        for why in Failure::ALL {
            let mut s = registering(t);
            let v = s.failed(t, why);
            assert_eq!(v == Verdict::GiveUp, !why.retry_can_fix(), "{why:?}");
        }
        // A CU that never answers is waited for, however long.
        let mut s = registering(t);
        let mut now = t;
        for _ in 0..1000 {
            let (after, _) = retry(s.failed(now, Failure::Timeout));
            now += after;
            assert_eq!(s.poll(now), Some(SessionAction::Connect));
        }
        assert!(now > Duration::from_secs(3600));
        // A refusal after it was first reached unreachable still ends it:
        // that is still a first start.
        assert_eq!(s.failed(now, Failure::Refused), Verdict::GiveUp);
        assert!(!s.had_view());
    }

    #[test]
    fn with_a_view_nothing_stops_the_agent_and_the_backoff_is_capped() {
        let t = Duration::ZERO;
        let mut s = registering(t);
        s.received(cfg(7), t).unwrap();
        assert!(s.had_view());
        let mut now = t;
        let mut delays = vec![];
        for i in 0..40 {
            let why = Failure::ALL[i % Failure::ALL.len()];
            let (after, _) = retry(s.failed(now, why));
            delays.push(after);
            now += after;
            assert_eq!(s.poll(now), Some(SessionAction::Connect));
            if i % 2 == 0 {
                // A connection that gets through but is refused again.
                s.connected();
                assert_eq!(
                    s.received(CuMsg::Refused("wrong join token".into()), now),
                    Err(Refused("wrong join token".into()))
                );
            }
        }
        // 0.2 s doubling to the 5 s cap, ±25 %.
        assert!(delays[0] <= Duration::from_millis(250));
        assert!(delays[10..]
            .iter()
            .all(|d| *d >= Duration::from_millis(3750) && *d <= Duration::from_millis(6250)));
        assert_eq!(s.view().id(), 7, "the view is kept through it all");
        assert_eq!(s.outage().unwrap().failures, 40);
        // The CU is back: the backoff starts again from the bottom.
        s.connected();
        s.received(cfg(7), now).unwrap();
        let (after, alert) = retry(s.failed(now, Failure::Tls));
        assert!(after <= Duration::from_millis(250) && alert);
    }

    #[test]
    fn alerts_are_sparse_in_a_storm() {
        let t = Duration::ZERO;
        let mut s = registering(t);
        s.received(cfg(7), t).unwrap();
        let ms = Duration::from_millis;
        // The first failure is reported, the same again is not...
        assert!(retry(s.failed(ms(1000), Failure::Timeout)).1);
        assert!(!retry(s.failed(ms(2000), Failure::Timeout)).1);
        assert!(!retry(s.failed(ms(9000), Failure::Timeout)).1);
        // ... a different one is (the CU is back, with another certificate) ...
        assert!(retry(s.failed(ms(10_000), Failure::Tls)).1);
        assert!(!retry(s.failed(ms(15_000), Failure::Tls)).1);
        // ... and one still failing is reported again once per ALERT_EVERY.
        assert!(!retry(s.failed(ms(10_000) + ALERT_EVERY - ms(1), Failure::Tls)).1);
        assert!(retry(s.failed(ms(10_000) + ALERT_EVERY, Failure::Tls)).1);
        assert!(!retry(s.failed(ms(11_000) + ALERT_EVERY, Failure::Tls)).1);
        let o = *s.outage().unwrap();
        assert_eq!((o.since, o.failures, o.last), (ms(1000), 8, Failure::Tls));
    }
}
