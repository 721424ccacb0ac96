//! The CU registry driven by arbitrary sequences of token creations,
//! enrolments, registrations (right, wrong or no key; addresses in and out
//! of grants; id hints), heartbeats, leaves, revocations and time passing.
//! Properties: no panic; admin requests without the admin key change
//! nothing; a registration is accepted only for the key that enrolled that
//! (cloud, name, role, Noise key) and was not revoked since; a token
//! enrols at most its number of uses; present agents have distinct non-zero
//! ids and no two hold clashing addresses; a proxy's addresses are in its
//! cloud's grant.
//!
//! One harness, two drivers: the property test below (CI) and the fuzz
//! target `registry` in `fuzz/` (which includes this file).

use arbitrary::{Result, Unstructured};
use pon_cu::registry::{Action, Issuer, Registry, Settings};
use pon_cu::trust::{claims, Enrolment, Grant, Grants, KeyId};
use pon_cu::Policy;
use pon_proto::control::{AdminRequest, Endpoints, Enrol, PublicKey, Register, PROTOCOL_VERSION};
use pon_proto::Encap;
use std::collections::HashMap;
use std::net::{Ipv4Addr, SocketAddr};
use std::time::Duration;

const ADMIN: KeyId = KeyId([0xad; 32]);
const CLOUDS: [&str; 3] = ["a", "b", "zz"];
const NAMES: [&str; 3] = ["p", "q", "app"];
const ROLES: [&str; 4] = ["PROXY", "PROXY.SRC", "APP", "MONITOR"];

/// A CSR is one byte here: the key it proves.
struct TestIssuer;

impl Issuer for TestIssuer {
    fn key_of(&self, csr: &[u8]) -> std::result::Result<KeyId, String> {
        match csr {
            [k] if *k != 0xad => Ok(KeyId([*k; 32])),
            _ => Err("not a CSR".into()),
        }
    }
    fn issue(&self, _: &[u8], _: &Enrolment) -> std::result::Result<String, String> {
        Ok("cert".into())
    }
}

struct World {
    r: Registry,
    now: Duration,
    wall_ms: u64,
    tokens: Vec<(String, Option<u32>)>,
    /// Enrolments per token, and the identity each enrolled key holds.
    used: HashMap<String, u32>,
    enrolled: HashMap<KeyId, (String, String, String, PublicKey)>,
    next_token: u32,
}

fn pick(u: &mut Unstructured, from: &[&str]) -> Result<String> {
    Ok(u.choose(from)?.to_string())
}

fn endpoints(u: &mut Unstructured, role: &str) -> Result<Endpoints> {
    let a = Ipv4Addr::new(198, 18, u.int_in_range(1..=3)?, u.int_in_range(1..=4)?);
    Ok(match u.int_in_range(0..=2u8)? {
        0 if role.starts_with("PROXY") => Endpoints::proxy(a),
        0 | 1 => Endpoints::App {
            addr: a,
            encap: Encap::Ipip,
        },
        _ => Endpoints::Other {
            addrs: vec![SocketAddr::from((a, 7400))],
        },
    })
}

impl World {
    fn new() -> Self {
        let grant = |p: &str| Grant {
            prefixes: vec![p.parse().unwrap()],
            endpoints: vec![],
            max_agents: None,
        };
        let grants = [("a", grant("198.18.1.0/24")), ("b", grant("198.18.2.0/24"))]
            .map(|(c, g)| (c.to_string(), g))
            .into();
        let r = Registry::new(
            Settings {
                grants: Grants(grants),
                admins: vec![ADMIN],
                ..Settings::default()
            },
            Policy::default(),
        );
        World {
            r,
            now: Duration::ZERO,
            wall_ms: 1_700_000_000_000,
            tokens: Vec::new(),
            used: HashMap::new(),
            enrolled: HashMap::new(),
            next_token: 0,
        }
    }

    fn admin(&mut self, u: &mut Unstructured, request: AdminRequest) -> Result<()> {
        let key = if u.ratio(3, 4)? {
            Some(ADMIN)
        } else {
            Some(KeyId([u.arbitrary()?; 32]))
        };
        let conn = u.int_in_range(100..=103)?;
        let before = self.r.records();
        self.next_token += 1;
        let secret = format!("token-{}", self.next_token);
        let mut made = None;
        let (actions, done) = self.r.admin(
            conn,
            key,
            request.clone(),
            PROTOCOL_VERSION,
            self.wall_ms,
            &mut || {
                made = Some(secret.clone());
                made.clone()
            },
        );
        if key != Some(ADMIN) {
            assert!(done.is_err(), "an agent key administered the CU");
            assert!(!actions.iter().any(|a| matches!(a, Action::Persist(_))));
            assert_eq!(self.r.records(), before);
            return Ok(());
        }
        match (request, done) {
            (AdminRequest::CreateToken { uses, .. }, Ok(_)) => {
                self.tokens.push((made.expect("a secret was made"), uses));
            }
            (AdminRequest::Revoke { cloud, name }, Ok(_)) => {
                self.enrolled.retain(|_, e| (&e.0, &e.1) != (&cloud, &name));
            }
            _ => {}
        }
        Ok(())
    }

    fn enrol(&mut self, u: &mut Unstructured) -> Result<()> {
        let token = if !self.tokens.is_empty() && u.ratio(4, 5)? {
            self.tokens[u.choose_index(self.tokens.len())?].0.clone()
        } else {
            "wrong".into()
        };
        let e = Enrol {
            version: PROTOCOL_VERSION,
            token: token.clone(),
            cloud: pick(u, &CLOUDS)?,
            role: pick(u, &ROLES)?,
            name: pick(u, &NAMES)?,
            noise_key: PublicKey([u.int_in_range(1..=3)?; 32]),
            csr: vec![u.int_in_range(1..=6)?],
        };
        let key = KeyId([e.csr[0]; 32]);
        let conn = u.int_in_range(200..=203)?;
        let (_, done) = self.r.enrol(conn, e.clone(), self.wall_ms, &TestIssuer);
        if done.is_ok() {
            let n = self.used.entry(token.clone()).or_default();
            *n += 1;
            let uses = self.tokens.iter().find(|t| t.0 == token).map(|t| t.1);
            let uses = uses.expect("enrolled with a token no admin made");
            assert!(uses.is_none_or(|m| *n <= m), "token used beyond its uses");
            self.enrolled
                .insert(key, (e.cloud, e.name, e.role, e.noise_key));
        }
        Ok(())
    }

    fn register(&mut self, u: &mut Unstructured) -> Result<()> {
        let role = pick(u, &ROLES)?;
        let r = Register {
            version: PROTOCOL_VERSION,
            cloud: pick(u, &CLOUDS)?,
            name: pick(u, &NAMES)?,
            endpoints: endpoints(u, &role)?,
            role,
            id_hint: if u.arbitrary()? {
                Some(u.int_in_range(0..=5)?)
            } else {
                None
            },
            noise_key: PublicKey([u.int_in_range(1..=3)?; 32]),
        };
        let key = if u.ratio(1, 8)? {
            None
        } else {
            Some(KeyId([u.int_in_range(1..=6)?; 32]))
        };
        let conn = u.int_in_range(1..=6)?;
        let (_, refused) = self
            .r
            .register(conn, key, r.clone(), self.now, self.wall_ms);
        if refused.is_none() {
            let e = key.and_then(|k| self.enrolled.get(&k));
            assert_eq!(
                e,
                Some(&(r.cloud.clone(), r.name.clone(), r.role.clone(), r.noise_key)),
                "registered without the key that enrolled this identity"
            );
            assert!(self.r.id_of(conn).is_some_and(|id| id != 0));
        }
        Ok(())
    }

    fn check(&self) {
        let records = self.r.records();
        let present: Vec<_> = records.iter().filter(|r| r.online).collect();
        for (i, a) in present.iter().enumerate() {
            assert_ne!(a.info.id, 0);
            for b in &present[i + 1..] {
                assert_ne!(a.info.id, b.info.id, "two agents with one id");
                for x in claims(&a.info.endpoints) {
                    for y in claims(&b.info.endpoints) {
                        assert!(!x.clashes(y), "{a:?} and {b:?} hold one address");
                    }
                }
            }
        }
        let mut keys: Vec<_> = records
            .iter()
            .map(|r| (&r.info.cloud, &r.info.name))
            .collect();
        keys.sort();
        keys.dedup();
        assert_eq!(keys.len(), records.len(), "one (cloud, name), two entries");
    }

    fn step(&mut self, u: &mut Unstructured) -> Result<()> {
        match u.int_in_range(0..=9u8)? {
            0 => {
                let request = AdminRequest::CreateToken {
                    cloud: pick(u, &["a", "b", "*", "zz"])?,
                    role: pick(u, &["PROXY", "APP", "PROXY.*", "*", "bad role"])?,
                    uses: if u.arbitrary()? {
                        Some(u.int_in_range(0..=2)?)
                    } else {
                        None
                    },
                    ttl_s: u.int_in_range(0..=100)?,
                };
                self.admin(u, request)?;
            }
            1 | 2 => self.enrol(u)?,
            3..=5 => self.register(u)?,
            6 => {
                let conn = u.int_in_range(1..=6)?;
                self.r.heartbeat(conn, self.now, self.wall_ms);
            }
            7 => {
                let conn = u.int_in_range(1..=6)?;
                let _ = self.r.disconnected(conn, u.arbitrary()?, self.wall_ms);
            }
            8 => {
                let request = AdminRequest::Revoke {
                    cloud: pick(u, &CLOUDS)?,
                    name: pick(u, &NAMES)?,
                };
                self.admin(u, request)?;
            }
            _ => {
                let dt = u.int_in_range(0..=15_000)?;
                self.now += Duration::from_millis(dt);
                self.wall_ms += dt;
                let _ = self.r.tick(self.now);
            }
        }
        self.check();
        Ok(())
    }
}

/// Runs one arbitrary sequence of events (at most 128).
pub fn run(data: &[u8]) {
    let mut u = Unstructured::new(data);
    let mut w = World::new();
    for _ in 0..128 {
        if u.is_empty() || w.step(&mut u).is_err() {
            break;
        }
    }
}

#[cfg(test)]
mod properties {
    use proptest::prelude::*;

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(256))]
        #[test]
        fn registration_binds_identities_to_keys(data in proptest::collection::vec(any::<u8>(), 0..2048)) {
            super::run(&data);
        }
    }
}
