//! Control messages between agents and the Central Unit (CU): register (R),
//! configuration (C), topology updates (U), heartbeats, and the registry
//! query of `ponctl`.
//!
//! On the wire a message is a frame: a 4-byte big-endian length, then the
//! message in postcard encoding. Each direction has its own size limit so a
//! peer can never make the other allocate more than the limit: agents only
//! ever send small messages, while the CU may send a whole topology.
//! Decoding never panics; bad input is an [`ControlError`].

use crate::codec::{self, CodecError};
use ipnet::IpNet;
use serde::{Deserialize, Serialize};
use std::net::{Ipv4Addr, SocketAddr};

/// Bumped on incompatible changes; the CU refuses other versions by name.
/// 2: per-agent identity (enrolment, certificates, Noise keys, grants).
/// 3: every agent is told each cloud's grant ([`Config::clouds`]); app VMs
/// no longer hear of other clouds' proxies.
pub const PROTOCOL_VERSION: u16 = 3;
/// Largest frame an agent (or `ponctl`) may send to the CU.
pub const MAX_AGENT_FRAME: usize = 64 * 1024;
/// Largest frame the CU sends; bigger updates are split into several frames.
pub const MAX_CU_FRAME: usize = 16 * 1024 * 1024;
/// Length prefix of every frame.
pub const FRAME_HEADER_LEN: usize = 4;
/// ALPN of the control protocol, so a CU never talks to something else on its port.
pub const ALPN: &[u8] = b"pon-cu/1";

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ControlError {
    #[error("frame of {len} bytes exceeds the limit of {max}")]
    Oversized { len: usize, max: usize },
    #[error("malformed message: {0}")]
    Malformed(String),
    #[error("frame ends {0} bytes early")]
    Truncated(usize),
}

impl ControlError {
    /// A short stable label for metrics.
    pub fn label(&self) -> &'static str {
        match self {
            ControlError::Oversized { .. } => "oversized",
            ControlError::Malformed(_) => "malformed",
            ControlError::Truncated(_) => "truncated",
        }
    }
}

pub use crate::Encap;

/// A static X25519 public key (the data plane's Noise handshakes), as the
/// CU vouches for it. Written as standard base64, like WireGuard keys.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
pub struct PublicKey(pub [u8; 32]);

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("not a public key: expected 32 bytes in standard base64 (44 characters)")]
pub struct BadPublicKey;

impl std::fmt::Display for PublicKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        use base64::Engine;
        f.write_str(&base64::engine::general_purpose::STANDARD.encode(self.0))
    }
}

impl std::fmt::Debug for PublicKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "PublicKey({self})")
    }
}

/// In configuration files: the base64 text.
impl schemars::JsonSchema for PublicKey {
    fn schema_name() -> std::borrow::Cow<'static, str> {
        "PublicKey".into()
    }
    fn json_schema(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
        schemars::json_schema!({"type": "string", "format": "public-key"})
    }
}

impl std::str::FromStr for PublicKey {
    type Err = BadPublicKey;
    fn from_str(s: &str) -> Result<Self, BadPublicKey> {
        use base64::Engine;
        let mut out = [0u8; 32];
        match base64::engine::general_purpose::STANDARD.decode_slice(s.trim(), &mut out) {
            Ok(32) => Ok(PublicKey(out)),
            _ => Err(BadPublicKey),
        }
    }
}

// Human-readable formats (JSON from ponctl, TOML) get the base64 text; the
// wire (postcard) gets the 32 bytes.
impl Serialize for PublicKey {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        if s.is_human_readable() {
            s.collect_str(self)
        } else {
            self.0.serialize(s)
        }
    }
}

impl<'de> Deserialize<'de> for PublicKey {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        if d.is_human_readable() {
            let s = String::deserialize(d)?;
            s.parse().map_err(serde::de::Error::custom)
        } else {
            <[u8; 32]>::deserialize(d).map(PublicKey)
        }
    }
}

/// Where an agent can be reached; the variant must match the role family.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Endpoints {
    /// A proxy: its PON UDP address for peers, the address its agents send
    /// IP-in-IP to, and its agent UDP port (0: none).
    Proxy {
        pon: SocketAddr,
        agent_addr: Ipv4Addr,
        agent_udp_port: u16,
    },
    /// An app VM: its address and how its RA receives.
    App { addr: Ipv4Addr, encap: Encap },
    /// Any other component (monitor, forwarder on another host, ...).
    Other { addrs: Vec<SocketAddr> },
}

impl Endpoints {
    /// A proxy at `addr` on the well-known ports: PON on [`ports::PON`],
    /// agents' IP-in-IP to `addr` and their UDP on [`ports::AGENT_UDP`].
    ///
    /// [`ports::PON`]: crate::ports::PON
    /// [`ports::AGENT_UDP`]: crate::ports::AGENT_UDP
    pub fn proxy(addr: Ipv4Addr) -> Self {
        Endpoints::Proxy {
            pon: SocketAddr::from((addr, crate::ports::PON)),
            agent_addr: addr,
            agent_udp_port: crate::ports::AGENT_UDP,
        }
    }
}

/// R: the first message on a connection authenticated by the agent's
/// certificate (mutual TLS); cloud, name and role must be the ones the
/// certificate was issued for.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Register {
    pub version: u16,
    /// Cloud (site) the agent runs in.
    pub cloud: String,
    /// Dotted role: `PROXY`, `PROXY.SRC`, `APP`, ...
    pub role: String,
    /// Stable name within the cloud; with the cloud it keys the agent's id.
    pub name: String,
    pub endpoints: Endpoints,
    /// An id the agent had (or is configured to ask for); granted if free.
    pub id_hint: Option<u32>,
    /// The agent's static Noise key; must be the one it enrolled with.
    pub noise_key: PublicKey,
}

/// The one message of a connection without a client certificate: an agent
/// asks, with a join token, for a certificate for its TLS key, bound to
/// (cloud, name, role, Noise key). The CU answers `Enrolled` or `Refused`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Enrol {
    pub version: u16,
    pub token: String,
    pub cloud: String,
    pub role: String,
    pub name: String,
    pub noise_key: PublicKey,
    /// PKCS#10 certificate request (DER), signed by the agent's TLS key:
    /// proof that the agent holds the key it wants certified.
    pub csr: Vec<u8>,
}

/// What the CU knows about an agent and tells others.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct AgentInfo {
    pub id: u32,
    pub cloud: String,
    pub role: String,
    pub name: String,
    pub endpoints: Endpoints,
    /// The agent's static Noise key, as enrolled.
    pub noise_key: PublicKey,
    /// For a proxy, its cloud's address grant: the inner sources its
    /// egress peers accept from it. Empty for other agents.
    pub allowed: Vec<IpNet>,
}

impl AgentInfo {
    pub fn is_proxy(&self) -> bool {
        matches!(self.endpoints, Endpoints::Proxy { .. })
    }
    pub fn is_app(&self) -> bool {
        matches!(self.endpoints, Endpoints::App { .. })
    }
}

/// Another agent, as seen by the receiver.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Peer {
    pub info: AgentInfo,
    /// The receiver (a router) must monitor and optimise paths towards it.
    pub optimise: bool,
}

/// C: the answer to a registration: the agent's id and everything it needs.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Config {
    pub id: u32,
    pub heartbeat_ms: u32,
    pub dead_after_ms: u32,
    pub peers: Vec<Peer>,
    /// Every cloud's address grant, whether it has a proxy now or not:
    /// what TAs intercept towards other clouds. Which of them the overlay
    /// can deliver to is the local proxy's to say (steering), so a cloud's
    /// proxies coming and going is not news to every app VM.
    pub clouds: Vec<CloudGrant>,
}

/// A cloud and the prefixes it may use (`[clouds.NAME] prefixes`).
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct CloudGrant {
    pub cloud: String,
    pub prefixes: Vec<IpNet>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Change {
    /// Joined, or changed its addresses.
    Up(Peer),
    /// Left (goodbye, closed connection, or missed heartbeats).
    Down(u32),
    /// The grants changed (the CU re-read them): the whole list, replacing
    /// [`Config::clouds`].
    Clouds(Vec<CloudGrant>),
}

/// A registry entry, for `ponctl`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AgentRecord {
    pub info: AgentInfo,
    pub online: bool,
    /// Last time the CU heard from the agent, Unix milliseconds.
    pub last_seen_ms: u64,
}

/// A join token as `ponctl token` shows it (the secret itself is only
/// printed once, when made; the CU keeps a hash).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TokenInfo {
    /// Short public handle: the first hex digits of the token's hash.
    pub id: String,
    pub cloud: String,
    /// Roles it may enrol: `PROXY` covers `PROXY` and `PROXY.*`; `*` all.
    pub role: String,
    /// Enrolments left; `None`: unlimited.
    pub uses_left: Option<u32>,
    /// Unix milliseconds.
    pub expires_ms: u64,
    pub created_ms: u64,
}

/// Administration (`ponctl`); only a connection with the admin certificate
/// may send these.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum AdminRequest {
    /// The registry.
    List,
    /// A new join token; `uses: None` for unlimited.
    CreateToken {
        cloud: String,
        role: String,
        uses: Option<u32>,
        ttl_s: u64,
    },
    ListTokens,
    /// Removes an agent: announced gone to every peer at once, its key
    /// refused from then on, its connection closed.
    Revoke {
        cloud: String,
        name: String,
    },
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum AgentMsg {
    Register(Register),
    Heartbeat,
    /// Clean leave: the CU announces the agent as gone at once.
    Goodbye,
    Enrol(Enrol),
    Admin {
        version: u16,
        request: AdminRequest,
    },
    /// A proxy's measurements (PMon), after its registration: periodically
    /// and whenever a route or a destination's reachability changes.
    Report(crate::pmon::Report),
    /// The first message of a consumer's connection (the admin or an
    /// enrolled agent's certificate): the matrix once, or as a stream of
    /// events and changed cells.
    Subscribe {
        version: u16,
        subscription: crate::pmon::Subscription,
    },
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum CuMsg {
    Config(Config),
    /// U: changes to the peers the receiver was given.
    Update(Vec<Change>),
    /// Registration (or enrolment, or an admin request) refused; the
    /// connection closes after this.
    Refused(String),
    Registry(Vec<AgentRecord>),
    /// The certificate (PEM) an enrolment earned.
    Enrolled {
        certificate: String,
    },
    /// A new token: the secret, shown once.
    Token {
        token: String,
        info: TokenInfo,
    },
    Tokens(Vec<TokenInfo>),
    /// The agent `ponctl revoke` named is revoked (its id, if it had one).
    Revoked {
        id: Option<u32>,
    },
    /// PMon: the site-by-site matrix (the first answer to a subscription).
    Matrix(crate::pmon::Matrix),
    /// PMon: events, in order, for a streaming subscription.
    Events(Vec<crate::pmon::Event>),
    /// PMon: cells that changed, for a streaming subscription.
    Cells(Vec<crate::pmon::Cell>),
    /// PMon: one part of a matrix too large for one frame (see
    /// `pon_proto::pmon::matrix_messages`); `last` ends it. Kept last in
    /// this enum so the variants before keep their wire index.
    MatrixPart {
        part: crate::pmon::Matrix,
        last: bool,
    },
}

/// Encodes one frame (length prefix + message).
pub fn encode<T: Serialize>(msg: &T) -> Vec<u8> {
    // Serializing into a Vec cannot fail for these types (no maps with
    // non-string keys, no unsized sequences), and the length prefix is
    // 32 bits wide: the limit is the receiver's, checked when it decodes.
    let mut out = codec::encode_after(msg, vec![0u8; FRAME_HEADER_LEN], u32::MAX as usize)
        .expect("serializing into a Vec");
    let len = (out.len() - FRAME_HEADER_LEN) as u32;
    out[..FRAME_HEADER_LEN].copy_from_slice(&len.to_be_bytes());
    out
}

/// Decodes one message body (without the length prefix).
/// The size limit is the frame decoder's, already applied to `body`.
pub fn decode<'a, T: Deserialize<'a>>(body: &'a [u8]) -> Result<T, ControlError> {
    codec::decode(body, usize::MAX).map_err(|e| match e {
        CodecError::TooLong { len, max } => ControlError::Oversized { len, max },
        CodecError::Malformed(m) => ControlError::Malformed(m),
    })
}

/// Splits a byte stream into frames. Sans-I/O: feed it whatever a read
/// returned, then pop complete frames. An oversized length is refused as soon
/// as its 4 bytes arrive, before anything is buffered for it.
#[derive(Debug)]
pub struct FrameDecoder {
    max: usize,
    buf: Vec<u8>,
}

impl FrameDecoder {
    pub fn new(max: usize) -> Self {
        FrameDecoder {
            max,
            buf: Vec::new(),
        }
    }

    /// Appends bytes read from the stream. Fails if the buffered bytes
    /// already announce an oversized frame.
    pub fn push(&mut self, data: &[u8]) -> Result<(), ControlError> {
        self.buf.extend_from_slice(data);
        self.check_len().map(|_| ())
    }

    fn check_len(&self) -> Result<Option<usize>, ControlError> {
        if self.buf.len() < FRAME_HEADER_LEN {
            return Ok(None);
        }
        let len = u32::from_be_bytes([self.buf[0], self.buf[1], self.buf[2], self.buf[3]]) as usize;
        if len > self.max {
            return Err(ControlError::Oversized { len, max: self.max });
        }
        Ok(Some(len))
    }

    /// The next complete frame body, if one has arrived.
    pub fn next_frame(&mut self) -> Result<Option<Vec<u8>>, ControlError> {
        match self.check_len()? {
            Some(len) if self.buf.len() >= FRAME_HEADER_LEN + len => {
                let body = self.buf[FRAME_HEADER_LEN..FRAME_HEADER_LEN + len].to_vec();
                self.buf.drain(..FRAME_HEADER_LEN + len);
                Ok(Some(body))
            }
            _ => Ok(None),
        }
    }

    /// Decodes the next complete message, if one has arrived.
    pub fn next_msg<T: serde::de::DeserializeOwned>(&mut self) -> Result<Option<T>, ControlError> {
        match self.next_frame()? {
            Some(body) => decode(&body).map(Some),
            None => Ok(None),
        }
    }

    /// Where a reader appends bytes in place (`AsyncReadExt::read_buf`),
    /// with no buffer of its own; [`FrameDecoder::appended`] must follow.
    pub fn tail(&mut self) -> &mut Vec<u8> {
        &mut self.buf
    }

    /// Checks what was appended through [`FrameDecoder::tail`], as `push`
    /// does: fails if it announces an oversized frame.
    pub fn appended(&mut self) -> Result<(), ControlError> {
        self.check_len().map(|_| ())
    }

    /// Bytes received but not yet part of a complete frame (at end of
    /// stream, anything here is a truncated frame).
    pub fn pending(&self) -> usize {
        self.buf.len()
    }
}

/// Splits a long list of changes into update frames that each fit `max`.
pub fn encode_updates(changes: &[Change], max: usize) -> Vec<Vec<u8>> {
    let mut frames = Vec::new();
    let mut start = 0;
    while start < changes.len() {
        let mut end = changes.len();
        loop {
            let frame = encode(&CuMsg::Update(changes[start..end].to_vec()));
            if frame.len() - FRAME_HEADER_LEN <= max || end - start == 1 {
                frames.push(frame);
                break;
            }
            end = start + (end - start).div_ceil(2);
        }
        start = end;
    }
    frames
}

/// True if `role` is a dotted role of upper-case words, e.g. `PROXY.SRC`.
pub fn valid_role(role: &str) -> bool {
    !role.is_empty()
        && role.len() <= 64
        && role.split('.').all(|w| {
            !w.is_empty()
                && w.bytes()
                    .all(|b| b.is_ascii_uppercase() || b.is_ascii_digit() || b == b'_')
        })
}

/// True if `name` is usable as a cloud or agent name (printable, short).
pub fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 64
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_.@:/".contains(&b))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample_register() -> AgentMsg {
        AgentMsg::Register(Register {
            version: PROTOCOL_VERSION,
            cloud: "paris".into(),
            role: "PROXY.SRC".into(),
            name: "proxy".into(),
            endpoints: Endpoints::Proxy {
                pon: "198.18.1.1:7300".parse().unwrap(),
                agent_addr: Ipv4Addr::new(198, 18, 1, 1),
                agent_udp_port: 7301,
            },
            id_hint: Some(1),
            noise_key: PublicKey([7; 32]),
        })
    }

    #[test]
    fn frames_round_trip_across_split_reads() {
        let msgs = vec![sample_register(), AgentMsg::Heartbeat, AgentMsg::Goodbye];
        let bytes: Vec<u8> = msgs.iter().flat_map(encode).collect();
        let mut d = FrameDecoder::new(MAX_AGENT_FRAME);
        let mut got = Vec::new();
        for chunk in bytes.chunks(3) {
            d.push(chunk).unwrap();
            while let Some(m) = d.next_msg::<AgentMsg>().unwrap() {
                got.push(m);
            }
        }
        assert_eq!(got, msgs);
        assert_eq!(d.pending(), 0);
    }

    #[test]
    fn oversized_frame_is_refused_from_its_header() {
        let mut d = FrameDecoder::new(16);
        assert_eq!(
            d.push(&100u32.to_be_bytes()),
            Err(ControlError::Oversized { len: 100, max: 16 })
        );
        // The same through the in-place tail a reader appends to.
        let mut d = FrameDecoder::new(16);
        d.tail().extend_from_slice(&100u32.to_be_bytes());
        assert_eq!(
            d.appended(),
            Err(ControlError::Oversized { len: 100, max: 16 })
        );
    }

    #[test]
    fn frames_appended_in_place_decode_as_pushed_ones() {
        let msgs = vec![sample_register(), AgentMsg::Heartbeat, AgentMsg::Goodbye];
        let bytes: Vec<u8> = msgs.iter().flat_map(encode).collect();
        let mut d = FrameDecoder::new(MAX_AGENT_FRAME);
        let mut got = Vec::new();
        for chunk in bytes.chunks(5) {
            d.tail().extend_from_slice(chunk);
            d.appended().unwrap();
            while let Some(m) = d.next_msg::<AgentMsg>().unwrap() {
                got.push(m);
            }
        }
        assert_eq!(got, msgs);
        assert_eq!(d.pending(), 0);
    }

    #[test]
    fn malformed_and_trailing_bytes_are_errors() {
        assert!(matches!(
            decode::<AgentMsg>(&[0xff, 0xff]),
            Err(ControlError::Malformed(_))
        ));
        let mut f = encode(&AgentMsg::Heartbeat);
        f.push(0);
        assert!(decode::<AgentMsg>(&f[FRAME_HEADER_LEN..]).is_err());
    }

    #[test]
    fn long_updates_are_split_to_fit() {
        let changes: Vec<Change> = (0..1000).map(Change::Down).collect();
        let frames = encode_updates(&changes, 300);
        assert!(frames.len() > 1);
        let mut all = Vec::new();
        for f in &frames {
            assert!(f.len() - FRAME_HEADER_LEN <= 300);
            match decode::<CuMsg>(&f[FRAME_HEADER_LEN..]).unwrap() {
                CuMsg::Update(c) => all.extend(c),
                other => panic!("{other:?}"),
            }
        }
        assert_eq!(all, changes);
    }

    #[test]
    fn public_keys_read_and_write_as_base64() {
        let k = PublicKey(core::array::from_fn(|i| i as u8));
        let text = k.to_string();
        assert_eq!(text, "AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8=");
        assert_eq!(text.parse::<PublicKey>(), Ok(k));
        for bad in ["", "AAEC", &text[..43], &format!("{text}AAAA"), "!!!"] {
            assert_eq!(bad.parse::<PublicKey>(), Err(BadPublicKey), "{bad:?}");
        }
        // The wire carries the 32 bytes as they are.
        let wire = codec::encode(&k, 64).unwrap();
        assert_eq!(wire, k.0);
        assert_eq!(codec::decode::<PublicKey>(&wire, 64).unwrap(), k);
    }

    #[test]
    fn roles_and_names() {
        assert!(valid_role("PROXY"));
        assert!(valid_role("PROXY.MASTER"));
        assert!(!valid_role("proxy"));
        assert!(!valid_role("PROXY."));
        assert!(valid_name("paris-1"));
        assert!(!valid_name("a b"));
        assert!(!valid_name(""));
    }
}
