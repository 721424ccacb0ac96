//! Who may be an agent, without I/O: scoped join tokens (kept hashed),
//! enrolments that bind a (cloud, name) to the first key that enrolled it,
//! revoked keys, admin keys, and the address grants of each cloud.
//!
//! The registry asks this module; the server supplies what needs I/O or
//! parsing (the key behind a connection's certificate or a certificate
//! request, fresh token secrets, signing) and persists what it returns.

use crate::policy::{covers, valid_pattern};
use ipnet::IpNet;
use pon_proto::control::{valid_name, CloudGrant, Endpoints, PublicKey, TokenInfo};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, HashMap, HashSet};
use std::net::{IpAddr, SocketAddr};

/// Identifies a key: SHA-256 of its public key bits (as in the
/// certificate's or the request's SubjectPublicKeyInfo).
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct KeyId(pub [u8; 32]);

impl KeyId {
    pub fn of_public_key(bits: &[u8]) -> KeyId {
        KeyId(sha256(bits))
    }
}

impl std::fmt::Debug for KeyId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "KeyId({})", hex(&self.0[..8]))
    }
}

fn sha256(b: &[u8]) -> [u8; 32] {
    let d = ring::digest::digest(&ring::digest::SHA256, b);
    let mut out = [0u8; 32];
    out.copy_from_slice(d.as_ref());
    out
}

pub fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

const NOISE_URI: &str = "urn:pon:noise:";

/// The name an agent's certificate carries for its Noise key (a URI
/// subject alternative name), binding the TLS identity to the data-plane one.
pub fn noise_uri(key: &PublicKey) -> String {
    format!("{NOISE_URI}{}", hex(&key.0))
}

/// Who a client certificate names.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Presented {
    pub key: KeyId,
    /// The agent's Noise key, from its `urn:pon:noise:` name.
    pub noise: Option<PublicKey>,
}

/// The key and Noise name of a certificate (DER).
#[cfg(feature = "pmon-listen")]
pub fn presented(der: &[u8]) -> Result<Presented, String> {
    use x509_parser::extensions::GeneralName;
    let (_, cert) = x509_parser::parse_x509_certificate(der).map_err(|e| e.to_string())?;
    let key = KeyId::of_public_key(&cert.tbs_certificate.subject_pki.subject_public_key.data);
    let noise = cert
        .subject_alternative_name()
        .ok()
        .flatten()
        .and_then(|san| {
            san.value.general_names.iter().find_map(|n| match n {
                GeneralName::URI(u) => noise_key_of_uri(u),
                _ => None,
            })
        });
    Ok(Presented { key, noise })
}

/// The Noise key a [`noise_uri`] names; `None` for any other URI.
pub fn noise_key_of_uri(uri: &str) -> Option<PublicKey> {
    let h = uri.strip_prefix(NOISE_URI)?.as_bytes();
    // Hex digits only: `from_str_radix` alone would take "+a".
    if h.len() != 64 || !h.iter().all(u8::is_ascii_hexdigit) {
        return None;
    }
    let mut k = [0u8; 32];
    for (i, pair) in h.chunks(2).enumerate() {
        k[i] = u8::from_str_radix(std::str::from_utf8(pair).ok()?, 16).ok()?;
    }
    Some(PublicKey(k))
}

/// A join token as the store keeps it: its hash, never the secret.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TokenRecord {
    pub hash: [u8; 32],
    pub info: TokenInfo,
}

/// An agent's key, bound to the identity its certificate was issued for.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Enrolment {
    pub key: KeyId,
    pub cloud: String,
    pub name: String,
    pub role: String,
    pub noise_key: PublicKey,
    pub enrolled_ms: u64,
    /// Revoked keys are kept, so they stay refused.
    pub revoked: bool,
}

/// Why an agent (or `ponctl`) was refused: a metrics label each.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    Version,
    /// Unknown join token.
    Token,
    TokenExpired,
    TokenUsedUp,
    /// The token is for another cloud or other roles.
    TokenScope,
    /// The (cloud, name) is bound to another key.
    NameTaken,
    /// The key is already enrolled under another (cloud, name).
    KeyTaken,
    Revoked,
    /// No certificate, or one this CU has no enrolment for.
    NotEnrolled,
    /// Register names another cloud, name, role or Noise key than the
    /// certificate.
    IdentityMismatch,
    NoGrant,
    OutsideGrant,
    AddressHeld,
    NotAdmin,
    Invalid,
    /// The cloud has its `max_agents`.
    Quota,
    /// Relayed by a proxy that may not carry it: of another cloud, or a
    /// proxy's own registration (a proxy registers on its own connection).
    Relay,
}

impl Refusal {
    pub const ALL: [Refusal; 17] = [
        Refusal::Version,
        Refusal::Token,
        Refusal::TokenExpired,
        Refusal::TokenUsedUp,
        Refusal::TokenScope,
        Refusal::NameTaken,
        Refusal::KeyTaken,
        Refusal::Revoked,
        Refusal::NotEnrolled,
        Refusal::IdentityMismatch,
        Refusal::NoGrant,
        Refusal::OutsideGrant,
        Refusal::AddressHeld,
        Refusal::NotAdmin,
        Refusal::Invalid,
        Refusal::Quota,
        Refusal::Relay,
    ];

    pub fn label(self) -> &'static str {
        match self {
            Refusal::Version => "bad_version",
            Refusal::Token => "bad_token",
            Refusal::TokenExpired => "token_expired",
            Refusal::TokenUsedUp => "token_used_up",
            Refusal::TokenScope => "token_scope",
            Refusal::NameTaken => "name_bound_to_another_key",
            Refusal::KeyTaken => "key_enrolled_elsewhere",
            Refusal::Revoked => "revoked",
            Refusal::NotEnrolled => "not_enrolled",
            Refusal::IdentityMismatch => "identity_mismatch",
            Refusal::NoGrant => "no_grant",
            Refusal::OutsideGrant => "outside_grant",
            Refusal::AddressHeld => "address_held",
            Refusal::NotAdmin => "not_admin",
            Refusal::Invalid => "invalid_register",
            Refusal::Quota => "cloud_quota",
            Refusal::Relay => "bad_relay",
        }
    }
}

pub type Refused = (Refusal, String);

/// The prefixes one cloud may use.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Grant {
    /// The cloud's own addresses: its app VMs', its proxies' agent-side
    /// addresses, and the inner sources its proxies may send.
    pub prefixes: Vec<IpNet>,
    /// Where peers may reach this cloud's proxies, when that is not in
    /// `prefixes` (a public 1:1 NAT address, say).
    #[serde(default)]
    pub endpoints: Vec<IpNet>,
    /// Most agents (records, online or not) the cloud may have; none: no
    /// limit. A new name beyond it is refused (`cloud_quota`).
    #[serde(default)]
    pub max_agents: Option<u32>,
}

/// Every cloud's grant. A cloud without one may not register anything:
/// an address no operator vouched for is never announced to peers.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Grants(pub BTreeMap<String, Grant>);

impl Grants {
    /// Every cloud's grant, as agents are told it.
    pub fn clouds(&self) -> Vec<CloudGrant> {
        self.0
            .iter()
            .map(|(cloud, g)| CloudGrant {
                cloud: cloud.clone(),
                prefixes: g.prefixes.clone(),
            })
            .collect()
    }

    /// What a proxy of `cloud` may send as inner source (its peers'
    /// allowed-IPs); empty for a cloud without a grant.
    pub fn allowed(&self, cloud: &str) -> Vec<IpNet> {
        self.0
            .get(cloud)
            .map(|g| g.prefixes.clone())
            .unwrap_or_default()
    }

    /// Whether every address `endpoints` claims is in `cloud`'s grant.
    pub fn check(&self, cloud: &str, endpoints: &Endpoints) -> Result<(), Refused> {
        let Some(g) = self.0.get(cloud) else {
            return Err((
                Refusal::NoGrant,
                format!("cloud {cloud} has no address grant ([clouds.{cloud}] prefixes in the CU's cu.toml)"),
            ));
        };
        let inside = |ip: IpAddr, nets: &[&[IpNet]]| {
            nets.iter().flat_map(|n| n.iter()).any(|n| n.contains(&ip))
        };
        let own: &[&[IpNet]] = &[&g.prefixes];
        let reach: &[&[IpNet]] = &[&g.prefixes, &g.endpoints];
        let mut wanted: Vec<(&str, IpAddr, &[&[IpNet]])> = Vec::new();
        match endpoints {
            Endpoints::App { addr, .. } => wanted.push(("address", IpAddr::V4(*addr), own)),
            Endpoints::Proxy {
                pon, agent_addr, ..
            } => {
                wanted.push(("agent address", IpAddr::V4(*agent_addr), own));
                wanted.push(("PON address", pon.ip(), reach));
            }
            Endpoints::Other { addrs } => {
                wanted.extend(addrs.iter().map(|a| ("address", a.ip(), reach)));
            }
        }
        for (what, ip, nets) in wanted {
            if !inside(ip, nets) {
                let granted: Vec<String> = nets
                    .iter()
                    .flat_map(|n| n.iter())
                    .map(|n| n.to_string())
                    .collect();
                return Err((
                    Refusal::OutsideGrant,
                    format!(
                        "{what} {ip} is outside cloud {cloud}'s grant ({})",
                        granted.join(", ")
                    ),
                ));
            }
        }
        Ok(())
    }
}

/// An address an agent holds while present: an IP (an app VM's, a proxy's
/// agent side) or a UDP endpoint (a proxy's PON address, which a NAT may
/// share between several proxies on different ports).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Claim {
    Ip(IpAddr),
    Udp(SocketAddr),
}

/// What `e` claims, without allocating: the registry checks a new agent
/// against every present one.
pub fn claims(e: &Endpoints) -> impl Iterator<Item = Claim> + '_ {
    let (ip, udp, others): (Option<Claim>, Option<Claim>, &[SocketAddr]) = match e {
        Endpoints::App { addr, .. } => (Some(Claim::Ip(IpAddr::V4(*addr))), None, &[]),
        Endpoints::Proxy {
            pon, agent_addr, ..
        } => (
            Some(Claim::Ip(IpAddr::V4(*agent_addr))),
            Some(Claim::Udp(*pon)),
            &[],
        ),
        Endpoints::Other { addrs } => (None, None, addrs.as_slice()),
    };
    ip.into_iter()
        .chain(udp)
        .chain(others.iter().map(|a| Claim::Udp(*a)))
}

impl Claim {
    /// The IP address it is on.
    pub fn ip(self) -> IpAddr {
        match self {
            Claim::Ip(a) => a,
            Claim::Udp(s) => s.ip(),
        }
    }

    /// Whether two agents holding these would take each other's traffic.
    pub fn clashes(self, other: Claim) -> bool {
        match (self, other) {
            // Two UDP endpoints share an address only on one port.
            (Claim::Udp(a), Claim::Udp(b)) => a == b,
            _ => self.ip() == other.ip(),
        }
    }

    pub fn addr(self) -> String {
        match self {
            Claim::Ip(a) => a.to_string(),
            Claim::Udp(s) => s.to_string(),
        }
    }
}

/// A token role pattern as an operator writes it (`PROXY`, `PROXY*`,
/// `PROXY.*`, `APP`, `*`), normalised to the policy's pattern form, where
/// `PROXY` covers `PROXY` and every `PROXY.…`.
pub fn role_pattern(p: &str) -> Option<String> {
    let p = p.trim();
    let base = if p == "*" {
        p
    } else {
        p.trim_end_matches('*').trim_end_matches('.')
    };
    valid_pattern(base).then(|| base.to_string())
}

/// Longest life of a token: tokens are for joining, not for keeping.
pub const MAX_TOKEN_TTL_S: u64 = 366 * 24 * 3600;

#[derive(Debug, Default)]
pub struct Trust {
    tokens: HashMap<[u8; 32], TokenInfo>,
    enrolments: HashMap<KeyId, Enrolment>,
    /// (cloud, name) -> the key bound to it (not revoked).
    bound: HashMap<(String, String), KeyId>,
    admins: HashSet<KeyId>,
}

impl Trust {
    pub fn new(admins: impl IntoIterator<Item = KeyId>) -> Self {
        Trust {
            admins: admins.into_iter().collect(),
            ..Trust::default()
        }
    }

    /// What the store kept.
    pub fn restore(
        &mut self,
        tokens: impl IntoIterator<Item = TokenRecord>,
        enrolments: impl IntoIterator<Item = Enrolment>,
    ) {
        for t in tokens {
            self.tokens.insert(t.hash, t.info);
        }
        for e in enrolments {
            self.add(e);
        }
    }

    fn add(&mut self, e: Enrolment) {
        let at = (e.cloud.clone(), e.name.clone());
        if e.revoked {
            if self.bound.get(&at) == Some(&e.key) {
                self.bound.remove(&at);
            }
        } else {
            self.bound.insert(at, e.key);
        }
        self.enrolments.insert(e.key, e);
    }

    pub fn is_admin(&self, key: Option<KeyId>) -> bool {
        key.is_some_and(|k| self.admins.contains(&k))
    }

    pub fn enrolment(&self, key: &KeyId) -> Option<&Enrolment> {
        self.enrolments.get(key)
    }

    /// A new token with secret `secret` (made by the caller from the
    /// system's randomness).
    pub fn create_token(
        &mut self,
        secret: &str,
        cloud: &str,
        role: &str,
        uses: Option<u32>,
        ttl_s: u64,
        wall_ms: u64,
    ) -> Result<TokenRecord, String> {
        if cloud != "*" && !valid_name(cloud) {
            return Err(format!("invalid cloud {cloud:?}"));
        }
        let Some(role) = role_pattern(role) else {
            return Err(format!(
                "invalid role pattern {role:?} (e.g. PROXY, PROXY*, PROXY.SRC, APP or *)"
            ));
        };
        if uses == Some(0) {
            return Err("a token needs at least one use".into());
        }
        if ttl_s == 0 || ttl_s > MAX_TOKEN_TTL_S {
            return Err(format!(
                "a token lives between 1 s and {} days",
                MAX_TOKEN_TTL_S / 86400
            ));
        }
        let hash = sha256(secret.as_bytes());
        let info = TokenInfo {
            id: hex(&hash[..4]),
            cloud: cloud.to_string(),
            role,
            uses_left: uses,
            expires_ms: wall_ms.saturating_add(ttl_s.saturating_mul(1000)),
            created_ms: wall_ms,
        };
        self.tokens.insert(hash, info.clone());
        Ok(TokenRecord { hash, info })
    }

    pub fn tokens(&self) -> Vec<TokenInfo> {
        let mut v: Vec<TokenInfo> = self.tokens.values().cloned().collect();
        v.sort_by_key(|t| t.created_ms);
        v
    }

    /// Checks an enrolment request for `cloud`/`name` as `role`, by the
    /// holder of `key` with token `secret`, at `wall_ms`. Returns the
    /// token's hash to charge if the enrolment goes through.
    pub fn check_enrol(
        &self,
        secret: &str,
        cloud: &str,
        name: &str,
        role: &str,
        key: KeyId,
        wall_ms: u64,
    ) -> Result<[u8; 32], Refused> {
        let hash = sha256(secret.as_bytes());
        // A lookup by hash: its timing tells nothing about the secret.
        let Some(t) = self.tokens.get(&hash) else {
            return Err((Refusal::Token, "wrong join token".into()));
        };
        if wall_ms >= t.expires_ms {
            return Err((
                Refusal::TokenExpired,
                format!(
                    "join token {} expired {} s ago (make a new one: ponctl token create)",
                    t.id,
                    (wall_ms - t.expires_ms) / 1000
                ),
            ));
        }
        if t.uses_left == Some(0) {
            return Err((
                Refusal::TokenUsedUp,
                format!("join token {} is used up", t.id),
            ));
        }
        if t.cloud != "*" && t.cloud != cloud {
            return Err((
                Refusal::TokenScope,
                format!("join token {} is for cloud {}, not {cloud}", t.id, t.cloud),
            ));
        }
        if !covers(&t.role, role) {
            return Err((
                Refusal::TokenScope,
                format!("join token {} may enrol role {}, not {role}", t.id, t.role),
            ));
        }
        if self.admins.contains(&key) {
            return Err((
                Refusal::KeyTaken,
                "this key is the CU's admin key, not an agent's".into(),
            ));
        }
        match self.enrolments.get(&key) {
            Some(e) if e.revoked => {
                return Err((
                    Refusal::Revoked,
                    format!(
                        "this key was revoked (it was {}/{}); make new keys",
                        e.cloud, e.name
                    ),
                ))
            }
            Some(e) if (e.cloud.as_str(), e.name.as_str()) != (cloud, name) => {
                return Err((
                    Refusal::KeyTaken,
                    format!(
                        "this key is already enrolled as {}/{}; one key, one agent",
                        e.cloud, e.name
                    ),
                ))
            }
            // Re-enrolling renews a certificate; it never changes what the
            // key is: a role or Noise key changed under a live agent would
            // let the certificate say one thing and the registry another.
            Some(e) if e.role != role => {
                return Err((
                    Refusal::KeyTaken,
                    format!(
                        "this key is enrolled as {}/{} with role {}, not {role}; \
                         `ponctl revoke {}/{}` and enrol with new keys to change it",
                        e.cloud, e.name, e.role, e.cloud, e.name
                    ),
                ))
            }
            _ => {}
        }
        match self.bound.get(&(cloud.to_string(), name.to_string())) {
            Some(k) if *k != key => Err((
                Refusal::NameTaken,
                format!(
                    "{cloud}/{name} is bound to another key; if that agent is gone, \
                     `ponctl revoke {cloud}/{name}` first"
                ),
            )),
            _ => Ok(hash),
        }
    }

    /// Records an enrolment checked by `check_enrol`, charging the token.
    /// Returns what to persist.
    pub fn enrol(&mut self, token: [u8; 32], e: Enrolment) -> (Option<TokenRecord>, Enrolment) {
        let charged = self.tokens.get_mut(&token).map(|t| {
            if let Some(n) = t.uses_left.as_mut() {
                *n = n.saturating_sub(1);
            }
            TokenRecord {
                hash: token,
                info: t.clone(),
            }
        });
        self.add(e.clone());
        (charged, e)
    }

    /// Whether the holder of `key` may register as `cloud`/`name`/`role`
    /// with `noise_key`.
    pub fn check_register(
        &self,
        key: Option<KeyId>,
        cloud: &str,
        name: &str,
        role: &str,
        noise_key: &PublicKey,
    ) -> Result<(), Refused> {
        let Some(key) = key else {
            return Err((
                Refusal::NotEnrolled,
                "no client certificate: enrol first (with a join token)".into(),
            ));
        };
        let Some(e) = self.enrolments.get(&key) else {
            return Err((
                Refusal::NotEnrolled,
                "this CU has no enrolment for this certificate's key; enrol again".into(),
            ));
        };
        if e.revoked {
            return Err((
                Refusal::Revoked,
                format!("{}/{} was revoked", e.cloud, e.name),
            ));
        }
        if (e.cloud.as_str(), e.name.as_str(), e.role.as_str()) != (cloud, name, role) {
            return Err((
                Refusal::IdentityMismatch,
                format!(
                    "the certificate is for {}/{} as {}, not {cloud}/{name} as {role}",
                    e.cloud, e.name, e.role
                ),
            ));
        }
        if e.noise_key != *noise_key {
            return Err((
                Refusal::IdentityMismatch,
                format!(
                    "Noise key {noise_key} is not the one {cloud}/{name} enrolled with ({})",
                    e.noise_key
                ),
            ));
        }
        Ok(())
    }

    /// Revokes the key bound to `cloud`/`name`; returns the record to
    /// persist, if there was one.
    pub fn revoke(&mut self, cloud: &str, name: &str) -> Option<Enrolment> {
        let key = self.bound.remove(&(cloud.to_string(), name.to_string()))?;
        let e = self.enrolments.get_mut(&key)?;
        e.revoked = true;
        Some(e.clone())
    }

    /// Whether the holder of `key` is a revoked agent.
    pub fn is_revoked(&self, key: &KeyId) -> bool {
        self.enrolments.get(key).is_some_and(|e| e.revoked)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::net::Ipv4Addr;

    const HOUR_MS: u64 = 3_600_000;

    proptest! {
        /// A certificate's Noise name gives back its key; anything else
        /// (another scheme, a short, long or non-hex key) gives none.
        #[test]
        fn noise_uris_round_trip_and_nothing_else_parses(k in any::<[u8; 32]>(), junk in ".{0,80}") {
            let key = PublicKey(k);
            prop_assert_eq!(noise_key_of_uri(&noise_uri(&key)), Some(key));
            let u = noise_uri(&key);
            prop_assert_eq!(noise_key_of_uri(&u[..u.len() - 1]), None);
            prop_assert_eq!(noise_key_of_uri(&format!("{u}0")), None);
            prop_assert_eq!(noise_key_of_uri(&u.replace("urn:pon:noise:", "urn:x:")), None);
            prop_assert_eq!(noise_key_of_uri(&format!("urn:pon:noise:+a{}", &u[16..])), None);
            if let Some(parsed) = noise_key_of_uri(&junk) {
                prop_assert_eq!(noise_uri(&parsed), junk.to_lowercase());
            }
        }
    }

    fn key(n: u8) -> KeyId {
        KeyId([n; 32])
    }

    fn trust_with(cloud: &str, role: &str, uses: Option<u32>) -> Trust {
        let mut t = Trust::new([key(99)]);
        t.create_token("s3cret", cloud, role, uses, 3600, 0)
            .unwrap();
        t
    }

    fn enrolment(k: KeyId, cloud: &str, name: &str, role: &str) -> Enrolment {
        Enrolment {
            key: k,
            cloud: cloud.into(),
            name: name.into(),
            role: role.into(),
            noise_key: PublicKey([k.0[0]; 32]),
            enrolled_ms: 1,
            revoked: false,
        }
    }

    #[test]
    fn tokens_are_scoped_to_cloud_role_time_and_uses() {
        let t = trust_with("paris", "APP", Some(2));
        let check = |secret: &str, cloud: &str, role: &str, at: u64| {
            t.check_enrol(secret, cloud, "n", role, key(1), at)
                .map(|_| ())
                .map_err(|(r, _)| r)
        };
        assert_eq!(check("s3cret", "paris", "APP", 10), Ok(()));
        assert_eq!(check("s3cret", "paris", "APP.X", 10), Ok(()));
        assert_eq!(check("nope", "paris", "APP", 10), Err(Refusal::Token));
        // An app VM's token cannot enrol a proxy, nor anything elsewhere.
        assert_eq!(
            check("s3cret", "paris", "PROXY", 10),
            Err(Refusal::TokenScope)
        );
        assert_eq!(
            check("s3cret", "paris", "APPX", 10),
            Err(Refusal::TokenScope)
        );
        assert_eq!(
            check("s3cret", "tokyo", "APP", 10),
            Err(Refusal::TokenScope)
        );
        assert_eq!(
            check("s3cret", "paris", "APP", HOUR_MS),
            Err(Refusal::TokenExpired)
        );
        // Two uses, then none.
        let mut t = t;
        for n in 1..=2u8 {
            let h = t
                .check_enrol("s3cret", "paris", &format!("a{n}"), "APP", key(n), 10)
                .unwrap();
            let (charged, _) = t.enrol(h, enrolment(key(n), "paris", &format!("a{n}"), "APP"));
            assert_eq!(charged.unwrap().info.uses_left, Some(2 - u32::from(n)));
        }
        let (why, text) = t
            .check_enrol("s3cret", "paris", "a3", "APP", key(3), 10)
            .unwrap_err();
        assert_eq!(why, Refusal::TokenUsedUp);
        assert!(text.contains("used up"), "{text}");
    }

    #[test]
    fn role_patterns() {
        assert_eq!(role_pattern("PROXY*").as_deref(), Some("PROXY"));
        assert_eq!(role_pattern("PROXY.*").as_deref(), Some("PROXY"));
        assert_eq!(role_pattern("*").as_deref(), Some("*"));
        assert_eq!(role_pattern("APP").as_deref(), Some("APP"));
        assert_eq!(role_pattern("proxy"), None);
        assert_eq!(role_pattern(""), None);
        let mut t = Trust::default();
        assert!(t
            .create_token("x", "paris", "bad role", None, 60, 0)
            .is_err());
        assert!(t.create_token("x", "paris", "APP", Some(0), 60, 0).is_err());
        assert!(t.create_token("x", "paris", "APP", None, 0, 0).is_err());
        assert!(t.create_token("x", "a b", "APP", None, 60, 0).is_err());
    }

    #[test]
    fn a_name_belongs_to_the_first_key_and_a_key_to_one_name() {
        let mut t = trust_with("*", "*", None);
        let h = t
            .check_enrol("s3cret", "paris", "p", "PROXY", key(1), 0)
            .unwrap();
        t.enrol(h, enrolment(key(1), "paris", "p", "PROXY"));
        // Another key for the same name.
        let (why, text) = t
            .check_enrol("s3cret", "paris", "p", "PROXY", key(2), 0)
            .unwrap_err();
        assert_eq!(why, Refusal::NameTaken);
        assert!(text.contains("paris/p is bound to another key"), "{text}");
        // The same key for another name.
        let (why, _) = t
            .check_enrol("s3cret", "paris", "q", "PROXY", key(1), 0)
            .unwrap_err();
        assert_eq!(why, Refusal::KeyTaken);
        // The same key again (its certificate was lost): fine.
        assert!(t
            .check_enrol("s3cret", "paris", "p", "PROXY", key(1), 0)
            .is_ok());
        // ... but not as another role.
        let (why, msg) = t
            .check_enrol("s3cret", "paris", "p", "APP", key(1), 0)
            .unwrap_err();
        assert_eq!(why, Refusal::KeyTaken);
        assert!(msg.contains("role PROXY, not APP"), "{msg}");
        // The admin key is nobody's agent key.
        let (why, _) = t
            .check_enrol("s3cret", "paris", "z", "APP", key(99), 0)
            .unwrap_err();
        assert_eq!(why, Refusal::KeyTaken);
        // Revoked: the key is refused for good, the name is free again.
        assert!(t.revoke("paris", "p").unwrap().revoked);
        assert!(t.revoke("paris", "p").is_none());
        let (why, _) = t
            .check_enrol("s3cret", "paris", "p", "PROXY", key(1), 0)
            .unwrap_err();
        assert_eq!(why, Refusal::Revoked);
        assert!(t
            .check_enrol("s3cret", "paris", "p", "PROXY", key(2), 0)
            .is_ok());
        // And all of that survives a restart.
        let mut again = trust_with("*", "*", None);
        again.restore([], t.enrolments.values().cloned());
        assert_eq!(
            again
                .check_enrol("s3cret", "paris", "p", "PROXY", key(1), 0)
                .unwrap_err()
                .0,
            Refusal::Revoked
        );
        assert_eq!(
            again
                .check_register(Some(key(1)), "paris", "p", "PROXY", &PublicKey([1; 32]))
                .unwrap_err()
                .0,
            Refusal::Revoked
        );
    }

    #[test]
    fn register_must_match_the_certificate() {
        let mut t = trust_with("*", "*", None);
        let h = t
            .check_enrol("s3cret", "paris", "p", "PROXY", key(1), 0)
            .unwrap();
        t.enrol(h, enrolment(key(1), "paris", "p", "PROXY"));
        let nk = PublicKey([1; 32]);
        assert!(t
            .check_register(Some(key(1)), "paris", "p", "PROXY", &nk)
            .is_ok());
        for (k, cloud, name, role, noise, why) in [
            (None, "paris", "p", "PROXY", nk, Refusal::NotEnrolled),
            (
                Some(key(7)),
                "paris",
                "p",
                "PROXY",
                nk,
                Refusal::NotEnrolled,
            ),
            (
                Some(key(1)),
                "tokyo",
                "p",
                "PROXY",
                nk,
                Refusal::IdentityMismatch,
            ),
            (
                Some(key(1)),
                "paris",
                "q",
                "PROXY",
                nk,
                Refusal::IdentityMismatch,
            ),
            (
                Some(key(1)),
                "paris",
                "p",
                "PROXY.SRC",
                nk,
                Refusal::IdentityMismatch,
            ),
            (
                Some(key(1)),
                "paris",
                "p",
                "PROXY",
                PublicKey([2; 32]),
                Refusal::IdentityMismatch,
            ),
        ] {
            assert_eq!(
                t.check_register(k, cloud, name, role, &noise)
                    .unwrap_err()
                    .0,
                why
            );
        }
    }

    fn grants() -> Grants {
        Grants(BTreeMap::from([(
            "paris".to_string(),
            Grant {
                prefixes: vec!["198.18.1.0/24".parse().unwrap()],
                endpoints: vec!["203.0.113.7/32".parse().unwrap()],
                max_agents: None,
            },
        )]))
    }

    #[test]
    fn addresses_must_be_in_the_clouds_grant() {
        let g = grants();
        let app = |a: [u8; 4]| Endpoints::App {
            addr: a.into(),
            encap: pon_proto::Encap::Ipip,
        };
        assert!(g.check("paris", &app([198, 18, 1, 11])).is_ok());
        let (why, text) = g.check("paris", &app([198, 18, 2, 11])).unwrap_err();
        assert_eq!(why, Refusal::OutsideGrant);
        assert!(
            text.contains("198.18.2.11 is outside cloud paris's grant (198.18.1.0/24)"),
            "{text}"
        );
        // The public endpoint is for PON addresses only.
        assert!(g.check("paris", &app([203, 0, 113, 7])).is_err());
        let proxy = |pon: &str, agent: [u8; 4]| Endpoints::Proxy {
            pon: pon.parse().unwrap(),
            agent_addr: agent.into(),
            agent_udp_port: 7301,
        };
        assert!(g
            .check("paris", &proxy("198.18.1.1:7300", [198, 18, 1, 1]))
            .is_ok());
        assert!(g
            .check("paris", &proxy("203.0.113.7:7300", [198, 18, 1, 1]))
            .is_ok());
        assert!(g
            .check("paris", &proxy("203.0.113.8:7300", [198, 18, 1, 1]))
            .is_err());
        assert!(g
            .check("paris", &proxy("198.18.1.1:7300", [203, 0, 113, 7]))
            .is_err());
        let (why, _) = g.check("tokyo", &app([198, 18, 1, 11])).unwrap_err();
        assert_eq!(why, Refusal::NoGrant);
        assert_eq!(
            g.allowed("paris"),
            vec!["198.18.1.0/24".parse::<IpNet>().unwrap()]
        );
        assert!(g.allowed("tokyo").is_empty());
    }

    #[test]
    fn claims_clash_on_the_same_address() {
        let ip = |s: &str| Claim::Ip(s.parse().unwrap());
        let udp = |s: &str| Claim::Udp(s.parse().unwrap());
        assert!(ip("198.18.1.1").clashes(ip("198.18.1.1")));
        assert!(!ip("198.18.1.1").clashes(ip("198.18.1.2")));
        assert!(ip("198.18.1.1").clashes(udp("198.18.1.1:7300")));
        assert!(udp("198.18.1.1:7300").clashes(ip("198.18.1.1")));
        // Two proxies behind one NAT address, on different ports.
        assert!(!udp("203.0.113.7:7300").clashes(udp("203.0.113.7:7301")));
        assert_eq!(
            claims(&Endpoints::proxy(Ipv4Addr::new(198, 18, 1, 1))).collect::<Vec<_>>(),
            vec![ip("198.18.1.1"), udp("198.18.1.1:7300")]
        );
    }

    proptest! {
        /// Whatever an attacker puts in a request, a token only ever
        /// enrols within its scope and lifetime.
        #[test]
        fn hostile_enrolments_stay_in_scope(
            secret in "[ -~]{0,40}",
            cloud in "[a-z]{1,6}",
            role in "[A-Z]{1,6}(\\.[A-Z]{1,4})?",
            at in 0u64..2 * HOUR_MS,
        ) {
            let t = trust_with("paris", "APP", Some(1));
            if t.check_enrol(&secret, &cloud, "n", &role, key(1), at).is_ok() {
                prop_assert_eq!(secret.as_str(), "s3cret");
                prop_assert_eq!(cloud.as_str(), "paris");
                prop_assert!(role == "APP" || role.starts_with("APP."));
                prop_assert!(at < HOUR_MS);
            }
        }

        #[test]
        fn nothing_outside_a_grant_passes(a in any::<[u8; 4]>(), port in any::<u16>()) {
            let g = grants();
            let ep = Endpoints::Proxy {
                pon: SocketAddr::from((a, port)),
                agent_addr: a.into(),
                agent_udp_port: 7301,
            };
            if g.check("paris", &ep).is_ok() {
                prop_assert_eq!(&a[..3], &[198, 18, 1]);
            }
        }
    }
}
