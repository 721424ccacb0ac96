//! The CU over real QUIC on loopback: a well-behaved agent keeps getting its
//! updates while other clients send oversized or malformed frames, stall
//! without registering, or present the wrong token; and every way in that an
//! attacker would try (a token of the wrong scope, another key for an
//! enrolled name, an address outside the grant or held by another agent, an
//! agent's certificate as admin, a certificate of another CA, a revoked
//! key) is refused, counted by reason, while revocation reaches the peers at
//! once.

use pon_cu::config::CuConfig;
use pon_cu::registry::Refusal;
use pon_cu::server::{self, CuStats};
use pon_cu::tls::ClientCert;
use pon_proto::control::{
    self, AdminRequest, AgentMsg, Change, CuMsg, Endpoints, Enrol, FrameDecoder, PublicKey,
    Register, MAX_CU_FRAME, PROTOCOL_VERSION,
};
use std::net::{Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

struct Cu {
    addr: SocketAddr,
    dir: PathBuf,
    client: quinn::Endpoint,
    stats: Arc<CuStats>,
}

impl Drop for Cu {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A CU on loopback whose clouds a, b and c may use 127.0.1.0/24, 127.0.2.0/24
/// and 127.0.3.0/24.
async fn start() -> Cu {
    start_with("").await
}

/// The same, with more of cu.toml: `top` before the clouds' tables,
/// `extra` (tables) after them.
async fn start_with(extra: &str) -> Cu {
    start_with_top("", extra).await
}

async fn start_with_top(top: &str, extra: &str) -> Cu {
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let dir = std::env::temp_dir().join(format!(
        "pon-cu-it-{}-{}",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    ));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let files = pon_cu::pki::InitFiles::in_dir(&dir);
    pon_cu::pki::init(&files, "pon-cu", &["127.0.0.1".parse().unwrap()], true).unwrap();
    let mut cfg = CuConfig::parse(&format!(
        "listen = \"127.0.0.1:0\"\n{top}\
         [clouds.a]\nprefixes = [\"127.0.1.0/24\"]\n\
         [clouds.b]\nprefixes = [\"127.0.2.0/24\"]\n\
         [clouds.c]\nprefixes = [\"127.0.3.0/24\"]\n{extra}",
    ))
    .unwrap();
    cfg.cert = files.cert.clone();
    cfg.key = files.key.clone();
    cfg.ca = files.ca_cert.clone();
    cfg.ca_key = files.ca_key.clone();
    cfg.admin_cert = files.admin_cert.clone();
    cfg.store = files.store.clone();
    let stats = Arc::new(CuStats::default());
    let (tx, rx) = tokio::sync::oneshot::channel();
    tokio::spawn(server::serve(cfg, stats.clone(), Some(tx), None));
    let addr = rx.await.unwrap();
    let client = quinn::Endpoint::client("127.0.0.1:0".parse().unwrap()).unwrap();
    Cu {
        addr,
        dir,
        client,
        stats,
    }
}

impl Cu {
    fn ca(&self) -> PathBuf {
        self.dir.join("ca.pem")
    }

    fn config(&self, cert: Option<ClientCert>) -> quinn::ClientConfig {
        pon_cu::tls::client_config(&self.ca(), pon_cu::client::CU_IDLE_TIMEOUT, cert).unwrap()
    }

    async fn connect(&self, cert: Option<ClientCert>) -> quinn::Connection {
        self.try_connect(cert).await.unwrap()
    }

    /// A connection the CU may refuse.
    async fn try_connect(
        &self,
        cert: Option<ClientCert>,
    ) -> Result<quinn::Connection, quinn::ConnectionError> {
        self.client
            .connect_with(self.config(cert), self.addr, "pon-cu")
            .unwrap()
            .await
    }

    fn admin_cert(&self) -> ClientCert {
        ClientCert::from_files(&self.dir.join("admin.pem"), &self.dir.join("admin.key")).unwrap()
    }

    /// One request on a fresh connection presenting `cert`.
    async fn ask(&self, cert: Option<ClientCert>, msg: AgentMsg) -> CuMsg {
        let conn = self.connect(cert).await;
        let answer = pon_cu::enrolment::request(&conn, &msg).await.unwrap();
        conn.close(0u32.into(), b"done");
        answer
    }

    async fn admin(&self, cert: ClientCert, request: AdminRequest) -> CuMsg {
        self.ask(
            Some(cert),
            AgentMsg::Admin {
                version: PROTOCOL_VERSION,
                request,
            },
        )
        .await
    }

    /// A token for `cloud` and `role`, made with the admin credential.
    async fn token(&self, cloud: &str, role: &str, uses: Option<u32>) -> String {
        let req = AdminRequest::CreateToken {
            cloud: cloud.into(),
            role: role.into(),
            uses,
            ttl_s: 600,
        };
        match self.admin(self.admin_cert(), req).await {
            CuMsg::Token { token, info } => {
                assert_eq!((info.cloud.as_str(), info.uses_left), (cloud, uses));
                token
            }
            other => panic!("{other:?}"),
        }
    }

    fn refused(&self, why: Refusal) -> u64 {
        self.stats.refused(why).get()
    }
}

/// An agent's own key, as its identity would hold it.
struct Key {
    pair: rcgen::KeyPair,
    noise: PublicKey,
}

impl Key {
    fn new(noise: u8) -> Key {
        Key {
            pair: rcgen::KeyPair::generate().unwrap(),
            noise: PublicKey([noise; 32]),
        }
    }

    fn csr(&self) -> Vec<u8> {
        rcgen::CertificateParams::default()
            .serialize_request(&self.pair)
            .unwrap()
            .der()
            .to_vec()
    }
}

fn enrol_msg(token: &str, cloud: &str, name: &str, role: &str, key: &Key) -> AgentMsg {
    AgentMsg::Enrol(Enrol {
        version: PROTOCOL_VERSION,
        token: token.into(),
        cloud: cloud.into(),
        role: role.into(),
        name: name.into(),
        noise_key: key.noise,
        csr: key.csr(),
    })
}

/// Enrols `key` as `cloud`/`name`; the certificate it earned, or the refusal.
async fn enrol(
    cu: &Cu,
    token: &str,
    cloud: &str,
    name: &str,
    role: &str,
    key: &Key,
) -> Result<ClientCert, String> {
    match cu.ask(None, enrol_msg(token, cloud, name, role, key)).await {
        CuMsg::Enrolled { certificate } => Ok(ClientCert::new(
            pon_cu::tls::certs_from_pem(&certificate).unwrap(),
            key.pair.serialize_der(),
        )),
        CuMsg::Refused(why) => Err(why),
        other => panic!("{other:?}"),
    }
}

fn register(cloud: &str, name: &str, role: &str, endpoints: Endpoints, key: &Key) -> AgentMsg {
    AgentMsg::Register(Register {
        version: PROTOCOL_VERSION,
        cloud: cloud.into(),
        role: role.into(),
        name: name.into(),
        endpoints,
        id_hint: None,
        noise_key: key.noise,
    })
}

/// Cloud `n`'s address `last`: 127.0.n.last.
fn addr(n: u8, last: u8) -> Ipv4Addr {
    Ipv4Addr::new(127, 0, n, last)
}

fn app(a: Ipv4Addr) -> Endpoints {
    Endpoints::App {
        addr: a,
        encap: pon_proto::Encap::Ipip,
    }
}

struct Agent {
    conn: quinn::Connection,
    send: quinn::SendStream,
    inbox: Inbox,
}

struct Inbox {
    recv: quinn::RecvStream,
    dec: FrameDecoder,
}

impl Agent {
    async fn connect(cu: &Cu, cert: Option<ClientCert>) -> Agent {
        let conn = cu.connect(cert).await;
        let (send, recv) = conn.open_bi().await.unwrap();
        Agent {
            conn,
            send,
            inbox: Inbox {
                recv,
                dec: FrameDecoder::new(MAX_CU_FRAME),
            },
        }
    }

    async fn send(&mut self, m: &AgentMsg) {
        self.send.write_all(&control::encode(m)).await.unwrap();
    }

    async fn next(&mut self) -> Option<CuMsg> {
        self.inbox.next().await
    }

    /// Keeps the agent alive (heartbeats) from now on; its messages are
    /// read from what this returns.
    fn keep_alive(self) -> (Inbox, tokio::task::JoinHandle<()>) {
        let mut send = self.send;
        let hb = tokio::spawn(async move {
            while send
                .write_all(&control::encode(&AgentMsg::Heartbeat))
                .await
                .is_ok()
            {
                tokio::time::sleep(Duration::from_millis(300)).await;
            }
        });
        (self.inbox, hb)
    }
}

impl Inbox {
    /// The next message, or None if the CU closed the connection.
    async fn next(&mut self) -> Option<CuMsg> {
        loop {
            if let Some(m) = self.dec.next_msg::<CuMsg>().unwrap() {
                return Some(m);
            }
            match tokio::time::timeout(Duration::from_secs(10), self.recv.read_chunk(1 << 20, true))
                .await
                .expect("the CU answers within 10 s")
            {
                Ok(Some(c)) => self.dec.push(&c.bytes).unwrap(),
                _ => return None,
            }
        }
    }
}

/// Enrols and registers `cloud`/`name` at `endpoints` with a fresh key.
async fn join(cu: &Cu, token: &str, cloud: &str, name: &str, role: &str, ep: Endpoints) -> Agent {
    let key = Key::new(7);
    let cert = enrol(cu, token, cloud, name, role, &key).await.unwrap();
    let mut a = Agent::connect(cu, Some(cert)).await;
    a.send(&register(cloud, name, role, ep, &key)).await;
    match a.next().await {
        Some(CuMsg::Config(_)) => a,
        other => panic!("{cloud}/{name}: {other:?}"),
    }
}

/// Waits until the CU closes `conn`, returning its reason.
async fn closed_reason(conn: &quinn::Connection) -> String {
    let e = tokio::time::timeout(Duration::from_secs(10), conn.closed())
        .await
        .expect("closed within 10 s");
    e.to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_clients_never_disturb_a_good_agent() {
    let cu = start().await;
    let token = cu.token("*", "*", None).await;
    let good = join(
        &cu,
        &token,
        "a",
        "proxy",
        "PROXY",
        Endpoints::proxy(addr(1, 1)),
    )
    .await;
    let (mut good, hb) = good.keep_alive();

    // Oversized: refused from the length alone.
    let mut big = Agent::connect(&cu, None).await;
    big.send
        .write_all(&(1u32 << 24).to_be_bytes())
        .await
        .unwrap();
    assert!(closed_reason(&big.conn).await.contains("exceeds the limit"));
    // Malformed body.
    let mut bad = Agent::connect(&cu, None).await;
    bad.send
        .write_all(&[0, 0, 0, 3, 0xff, 0xff, 0xff])
        .await
        .unwrap();
    assert!(closed_reason(&bad.conn).await.contains("malformed"));
    // Wrong token.
    assert_eq!(
        enrol(&cu, "nope", "b", "p", "PROXY", &Key::new(1))
            .await
            .err(),
        Some("wrong join token".into())
    );
    // A client that connects and says nothing is cut off.
    let mut stall = Agent::connect(&cu, None).await;
    stall.send.write_all(&[0, 0]).await.unwrap(); // half a length prefix
    let why = closed_reason(&stall.conn).await;
    assert!(why.contains("no registration within 5 s"), "{why}");

    // Meanwhile the good agent hears of a real join and leave, as usual.
    let mut other = join(
        &cu,
        &token,
        "b",
        "proxy",
        "PROXY",
        Endpoints::proxy(addr(2, 1)),
    )
    .await;
    match good.next().await {
        Some(CuMsg::Update(ch)) => {
            assert!(matches!(&ch[..], [Change::Up(p)] if p.info.cloud == "b"
                && p.info.noise_key == PublicKey([7; 32])
                && p.info.allowed == vec!["127.0.2.0/24".parse().unwrap()]))
        }
        other => panic!("{other:?}"),
    }
    other.send(&AgentMsg::Goodbye).await;
    match good.next().await {
        Some(CuMsg::Update(ch)) => assert!(matches!(&ch[..], [Change::Down(_)])),
        other => panic!("{other:?}"),
    }
    let c = &cu.stats.counters;
    assert_eq!(c.bad_oversized.get(), 1);
    assert_eq!(c.bad_malformed.get(), 1);
    assert_eq!(cu.refused(Refusal::Token), 1);
    assert_eq!(c.register_timeouts.get(), 1);
    assert_eq!(c.leave_goodbye.get(), 1);
    assert_eq!(c.registrations.get(), 2);
    assert_eq!(c.enrolments.get(), 2);
    hb.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokens_enrol_only_within_their_scope_and_a_name_keeps_its_key() {
    let cu = start().await;
    let app_token = cu.token("a", "APP", None).await;
    // An app VM's token cannot enrol a proxy, nor an app VM of another cloud.
    let why = enrol(&cu, &app_token, "a", "p", "PROXY", &Key::new(1))
        .await
        .unwrap_err();
    assert!(why.contains("may enrol role APP, not PROXY"), "{why}");
    let why = enrol(&cu, &app_token, "b", "vm", "APP", &Key::new(1))
        .await
        .unwrap_err();
    assert!(why.contains("is for cloud a, not b"), "{why}");
    assert_eq!(cu.refused(Refusal::TokenScope), 2);
    // A one-use proxy token enrols one proxy.
    let once = cu.token("a", "PROXY*", Some(1)).await;
    let first = Key::new(1);
    enrol(&cu, &once, "a", "p", "PROXY.SRC", &first)
        .await
        .unwrap();
    let why = enrol(&cu, &once, "a", "p2", "PROXY", &Key::new(2))
        .await
        .unwrap_err();
    assert!(why.contains("used up"), "{why}");
    assert_eq!(cu.refused(Refusal::TokenUsedUp), 1);
    // Another key claiming a/p, even with a good token, is refused.
    let any = cu.token("a", "PROXY", None).await;
    let why = enrol(&cu, &any, "a", "p", "PROXY.SRC", &Key::new(3))
        .await
        .unwrap_err();
    assert!(why.contains("a/p is bound to another key"), "{why}");
    assert_eq!(cu.refused(Refusal::NameTaken), 1);
    // A request some other key signed (or none) proves nothing.
    let mut forged = enrol_msg(&any, "a", "q", "PROXY", &Key::new(4));
    if let AgentMsg::Enrol(e) = &mut forged {
        let n = e.csr.len();
        e.csr[n - 10] ^= 0xff; // inside the signature
    }
    assert!(
        matches!(cu.ask(None, forged).await, CuMsg::Refused(w) if w.contains("bad certificate request"))
    );
    // The token's secret is never shown again.
    match cu.admin(cu.admin_cert(), AdminRequest::ListTokens).await {
        CuMsg::Tokens(t) => {
            assert_eq!(t.len(), 3);
            assert!(t.iter().all(|t| t.id.len() == 8));
        }
        other => panic!("{other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn registrations_must_match_the_certificate_and_the_grant() {
    let cu = start().await;
    let token = cu.token("*", "*", None).await;
    // Without a certificate: nothing but enrolment.
    let mut anon = Agent::connect(&cu, None).await;
    anon.send(&register("a", "vm", "APP", app(addr(1, 11)), &Key::new(1)))
        .await;
    assert!(matches!(anon.next().await, Some(CuMsg::Refused(w)) if w.contains("enrol first")));
    assert_eq!(cu.refused(Refusal::NotEnrolled), 1);

    let key = Key::new(1);
    let cert = || enrol(&cu, &token, "a", "vm", "APP", &key);
    let first = cert().await.unwrap();
    // Another name, another cloud, another role or Noise key than enrolled.
    let other_noise = Key {
        pair: rcgen::KeyPair::from_pem(&key.pair.serialize_pem()).unwrap(),
        noise: PublicKey([2; 32]),
    };
    for (msg, what) in [
        (
            register("a", "vm2", "APP", app(addr(1, 11)), &key),
            "a/vm as APP, not a/vm2",
        ),
        (
            register("b", "vm", "APP", app(addr(2, 11)), &key),
            "not b/vm",
        ),
        (
            register("a", "vm", "APP.X", app(addr(1, 11)), &key),
            "as APP, not a/vm as APP.X",
        ),
        (
            register("a", "vm", "APP", app(addr(1, 11)), &other_noise),
            "Noise key",
        ),
    ] {
        let mut a = Agent::connect(&cu, Some(cert().await.unwrap())).await;
        a.send(&msg).await;
        match a.next().await {
            Some(CuMsg::Refused(w)) => assert!(w.contains(what), "{w}"),
            other => panic!("{other:?}"),
        }
    }
    assert_eq!(cu.refused(Refusal::IdentityMismatch), 4);
    // Outside the grant: another cloud's address, a metadata address.
    for bad in [addr(2, 11), Ipv4Addr::new(169, 254, 169, 254)] {
        let mut a = Agent::connect(&cu, Some(cert().await.unwrap())).await;
        a.send(&register("a", "vm", "APP", app(bad), &key)).await;
        match a.next().await {
            Some(CuMsg::Refused(w)) => assert!(
                w.contains(&format!("{bad} is outside cloud a's grant")),
                "{w}"
            ),
            other => panic!("{other:?}"),
        }
    }
    assert_eq!(cu.refused(Refusal::OutsideGrant), 2);
    // Held by another agent: a's proxy is at .1; an app VM claiming it is refused.
    let proxy = join(
        &cu,
        &token,
        "a",
        "proxy",
        "PROXY",
        Endpoints::proxy(addr(1, 1)),
    )
    .await;
    let mut a = Agent::connect(&cu, Some(first)).await;
    a.send(&register("a", "vm", "APP", app(addr(1, 1)), &key))
        .await;
    match a.next().await {
        Some(CuMsg::Refused(w)) => {
            assert!(w.contains("address 127.0.1.1 is held by a/proxy"), "{w}")
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(cu.refused(Refusal::AddressHeld), 1);
    // Its own address is fine.
    let mut a = Agent::connect(&cu, Some(cert().await.unwrap())).await;
    a.send(&register("a", "vm", "APP", app(addr(1, 11)), &key))
        .await;
    assert!(matches!(a.next().await, Some(CuMsg::Config(_))));
    drop(proxy);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_the_admin_credential_administers() {
    let cu = start().await;
    let token = cu.token("*", "*", None).await;
    let key = Key::new(1);
    let agent_cert = || enrol(&cu, &token, "a", "vm", "APP", &key);
    // An agent's certificate, no certificate at all, a token: not admin.
    for cert in [Some(agent_cert().await.unwrap()), None] {
        for req in [
            AdminRequest::List,
            AdminRequest::ListTokens,
            AdminRequest::CreateToken {
                cloud: "a".into(),
                role: "PROXY".into(),
                uses: None,
                ttl_s: 60,
            },
            AdminRequest::Revoke {
                cloud: "a".into(),
                name: "vm".into(),
            },
        ] {
            let cert = cert.as_ref().map(|c| ClientCert {
                chain: c.chain.clone(),
                key: c.key.clone_key(),
            });
            match cu.admin_with(cert, req).await {
                CuMsg::Refused(w) => assert!(w.contains("admin certificate"), "{w}"),
                other => panic!("{other:?}"),
            }
        }
    }
    assert_eq!(cu.refused(Refusal::NotAdmin), 8);
    // A certificate of another CA does not even get a TLS session.
    let other = cu.dir.join("other");
    std::fs::create_dir_all(&other).unwrap();
    let files = pon_cu::pki::InitFiles::in_dir(&other);
    pon_cu::pki::init(&files, "pon-cu", &[], true).unwrap();
    let foreign = ClientCert::from_files(&files.admin_cert, &files.admin_key).unwrap();
    let conn = cu
        .client
        .connect_with(cu.config(Some(foreign)), cu.addr, "pon-cu")
        .unwrap()
        .await;
    // (TLS 1.3: the client may finish its side before the CU has checked
    // its certificate; then the CU's alert closes the connection.)
    let refused = match conn {
        Err(e) => e.to_string(),
        Ok(c) => {
            let asked = pon_cu::enrolment::request(
                &c,
                &AgentMsg::Admin {
                    version: PROTOCOL_VERSION,
                    request: AdminRequest::List,
                },
            )
            .await;
            assert!(asked.is_err(), "{asked:?}");
            c.close_reason().map(|r| r.to_string()).unwrap_or_default()
        }
    };
    assert!(refused.contains("certificate"), "{refused}");
    assert_eq!(cu.stats.counters.handshake_failures.get(), 1);
    // The real admin can.
    assert!(matches!(
        cu.admin(cu.admin_cert(), AdminRequest::List).await,
        CuMsg::Registry(_)
    ));
    // A token for a cloud without a grant would be useless: refused.
    let req = AdminRequest::CreateToken {
        cloud: "nowhere".into(),
        role: "APP".into(),
        uses: None,
        ttl_s: 60,
    };
    assert!(
        matches!(cu.admin(cu.admin_cert(), req).await, CuMsg::Refused(w) if w.contains("no address grant"))
    );
}

impl Cu {
    async fn admin_with(&self, cert: Option<ClientCert>, request: AdminRequest) -> CuMsg {
        self.ask(
            cert,
            AgentMsg::Admin {
                version: PROTOCOL_VERSION,
                request,
            },
        )
        .await
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn revocation_reaches_every_peer_at_once_and_the_key_stays_out() {
    let cu = start().await;
    let token = cu.token("*", "PROXY", None).await;
    let (mut a, hb_a) = join(&cu, &token, "a", "p", "PROXY", Endpoints::proxy(addr(1, 1)))
        .await
        .keep_alive();
    let (mut c, hb_c) = join(&cu, &token, "c", "p", "PROXY", Endpoints::proxy(addr(3, 1)))
        .await
        .keep_alive();
    assert!(
        matches!(a.next().await, Some(CuMsg::Update(_))),
        "a hears of c"
    );
    // b's key, kept to come back with after the revocation.
    let key = Key::new(2);
    let cert = || enrol(&cu, &token, "b", "p", "PROXY", &key);
    let mut b = Agent::connect(&cu, Some(cert().await.unwrap())).await;
    b.send(&register(
        "b",
        "p",
        "PROXY",
        Endpoints::proxy(addr(2, 1)),
        &key,
    ))
    .await;
    let b_id = match b.next().await {
        Some(CuMsg::Config(cfg)) => cfg.id,
        other => panic!("{other:?}"),
    };
    let (mut b_inbox, hb_b) = b.keep_alive();
    for peer in [&mut a, &mut c] {
        assert!(
            matches!(peer.next().await, Some(CuMsg::Update(ch)) if matches!(&ch[..], [Change::Up(p)] if p.info.id == b_id))
        );
    }

    let t0 = Instant::now();
    let answer = cu
        .admin(
            cu.admin_cert(),
            AdminRequest::Revoke {
                cloud: "b".into(),
                name: "p".into(),
            },
        )
        .await;
    assert_eq!(answer, CuMsg::Revoked { id: Some(b_id) });
    for peer in [&mut a, &mut c] {
        match peer.next().await {
            Some(CuMsg::Update(ch)) => assert_eq!(ch, vec![Change::Down(b_id)]),
            other => panic!("{other:?}"),
        }
    }
    let took = t0.elapsed();
    eprintln!(
        "revocation reached both peers {:.1} ms after ponctl asked",
        took.as_secs_f64() * 1e3
    );
    assert!(took < Duration::from_secs(1), "{took:?}");
    // b's connection is closed ...
    assert_eq!(b_inbox.next().await, None);
    // ... and its key refused from then on: to register, and to enrol again.
    let mut again = Agent::connect(&cu, Some(cert_from_store(&cu, &key, &token).await)).await;
    again
        .send(&register(
            "b",
            "p",
            "PROXY",
            Endpoints::proxy(addr(2, 1)),
            &key,
        ))
        .await;
    assert!(matches!(again.next().await, Some(CuMsg::Refused(w)) if w.contains("revoked")));
    let why = cert().await.unwrap_err();
    assert!(why.contains("revoked"), "{why}");
    assert!(cu.refused(Refusal::Revoked) >= 2);
    assert_eq!(cu.stats.counters.leave_revoked.get(), 1);
    // The name is free for a new key (the operator replaced the machine).
    join(&cu, &token, "b", "p", "PROXY", Endpoints::proxy(addr(2, 1))).await;
    hb_a.abort();
    hb_b.abort();
    hb_c.abort();
}

/// The certificate `key` had before it was revoked: the one an attacker
/// who stole the machine would present. (Issued again here only because
/// the test did not keep the first; the CU refuses by key.)
async fn cert_from_store(cu: &Cu, key: &Key, _token: &str) -> ClientCert {
    let ca = pon_cu::pki::Ca::load(&cu.dir.join("ca.pem"), &cu.dir.join("ca.key")).unwrap();
    use pon_cu::registry::Issuer;
    let e = pon_cu::trust::Enrolment {
        key: ca.key_of(&key.csr()).unwrap(),
        cloud: "b".into(),
        name: "p".into(),
        role: "PROXY".into(),
        noise_key: key.noise,
        enrolled_ms: 0,
        revoked: false,
    };
    let pem = ca.issue(&key.csr(), &e).unwrap();
    ClientCert::new(
        pon_cu::tls::certs_from_pem(&pem).unwrap(),
        key.pair.serialize_der(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn under_load_clients_prove_their_address_and_one_address_gets_its_share() {
    // Every handshake counts as "under load": each new connection is first
    // sent a Retry, which a real client follows.
    let cu =
        start_with("[limits]\nconnections_per_address = 3\nretry_above_handshakes = 0\n").await;
    let token = cu.token("a", "APP", None).await;
    let agent = join(&cu, &token, "a", "v1", "APP", app(addr(1, 11))).await;
    let retries = cu.stats.counters.retries.get();
    assert!(
        retries >= 2,
        "enrolment and registration both retried: {retries}"
    );
    // The agent holds one connection from 127.0.0.1; two more fit, a
    // fourth is refused before any handshake, the agent untouched.
    let c2 = cu.connect(None).await;
    let _c3 = cu.connect(None).await;
    let fourth = cu.try_connect(None).await;
    assert!(fourth.is_err(), "a fourth connection from one address");
    assert_eq!(cu.stats.counters.per_address.get(), 1);
    assert!(agent.conn.close_reason().is_none());
    // A connection that ends gives its slot back.
    c2.close(0u32.into(), b"done");
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let again = cu.try_connect(None).await;
        if again.is_ok() {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the slot never came back"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A handshake that never finishes: a real client's first datagram (its
/// Initial), caught on a socket it took for the CU's and replayed to the
/// CU from one that never answers.
async fn stuck_handshake(cu: &Cu) -> tokio::net::UdpSocket {
    let decoy = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let at = decoy.local_addr().unwrap();
    let client = quinn::Endpoint::client("127.0.0.1:0".parse().unwrap()).unwrap();
    let connecting = client.connect_with(cu.config(None), at, "pon-cu").unwrap();
    let mut initial = vec![0u8; 2048];
    let (n, _) = tokio::time::timeout(Duration::from_secs(5), decoy.recv_from(&mut initial))
        .await
        .expect("the client sends its Initial")
        .unwrap();
    drop(connecting);
    let silent = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
    silent.send_to(&initial[..n], cu.addr).await.unwrap();
    silent
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn beyond_max_handshakes_a_new_connection_is_refused_before_any_tls_work() {
    let cu = start_with("[limits]\nmax_handshakes = 1\n").await;
    let token = cu.token("a", "APP", None).await;
    let _silent = stuck_handshake(&cu).await;
    let deadline = Instant::now() + Duration::from_secs(5);
    while cu.stats.handshakes.load(Ordering::Relaxed) < 1 {
        assert!(
            Instant::now() < deadline,
            "the stuck handshake never started"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    // The one slot is taken: the next connection is refused outright.
    let refused = cu.try_connect(None).await;
    assert!(refused.is_err(), "a connection beyond max_handshakes");
    assert_eq!(cu.stats.counters.busy.get(), 1);
    // When the stuck handshake times out, its slot is free again and an
    // agent joins as usual (the backoff a real agent has, in short).
    let deadline = Instant::now() + Duration::from_secs(30);
    while cu.stats.handshakes.load(Ordering::Relaxed) > 0 {
        assert!(Instant::now() < deadline, "the stuck handshake never ended");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let agent = join(&cu, &token, "a", "v1", "APP", app(addr(1, 11))).await;
    assert!(agent.conn.close_reason().is_none());
    // What the admission measures is fed: handshakes established, and the
    // agent's round trip (no connection came after it to take it).
    assert!(cu.stats.handshakes_established.load(Ordering::Relaxed) >= 2);
    assert!(cu.stats.least_rtt_us.load(Ordering::Relaxed) > 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_that_falls_silent_is_closed_and_announced_gone() {
    // Its QUIC connection stays up (the client's keep-alives): only the
    // CU's own clock on heartbeats can tell it fell silent.
    let cu = start_with_top("heartbeat_ms = 100\ndead_after_ms = 600\n", "").await;
    let token = cu.token("*", "PROXY", None).await;
    let (mut a, hb_a) = join(&cu, &token, "a", "p", "PROXY", Endpoints::proxy(addr(1, 1)))
        .await
        .keep_alive();
    let mut mute = join(&cu, &token, "b", "p", "PROXY", Endpoints::proxy(addr(2, 1))).await;
    let mute_id = match a.next().await {
        Some(CuMsg::Update(ch)) => match &ch[..] {
            [Change::Up(p)] => p.info.id,
            other => panic!("{other:?}"),
        },
        other => panic!("{other:?}"),
    };
    let t0 = Instant::now();
    // a keeps heartbeating and stays; b says nothing from now on.
    match a.next().await {
        Some(CuMsg::Update(ch)) => assert_eq!(ch, vec![Change::Down(mute_id)]),
        other => panic!("{other:?}"),
    }
    let took = t0.elapsed();
    assert!(
        took >= Duration::from_millis(500),
        "gone after {took:?}: too soon"
    );
    let why = closed_reason(&mute.conn).await;
    assert!(why.contains("no heartbeat for 600 ms"), "{why}");
    assert_eq!(mute.next().await, None);
    assert_eq!(cu.stats.counters.leave_silent.get(), 1);
    assert_eq!(cu.stats.counters.leave_closed.get(), 0);
    hb_a.abort();
}

/// Cloud `n`'s proxy, registered.
async fn proxy_of(cu: &Cu, token: &str, cloud: &str, n: u8) -> Agent {
    join(
        cu,
        token,
        cloud,
        "proxy",
        "PROXY",
        Endpoints::proxy(addr(n, 1)),
    )
    .await
}

/// An app VM's session as its site proxy relays it: TLS to the CU inside a
/// new stream of the proxy's connection (the proxy's relay only pipes the
/// bytes of this stream to and from the VM's TCP connection).
struct Relayed {
    tls: tokio_rustls::client::TlsStream<tokio::io::Join<quinn::RecvStream, quinn::SendStream>>,
    dec: FrameDecoder,
}

impl Relayed {
    async fn open(cu: &Cu, proxy: &quinn::Connection, cert: Option<ClientCert>) -> Relayed {
        let (send, recv) = tokio::time::timeout(Duration::from_secs(5), proxy.open_bi())
            .await
            .expect("the CU lets a registered proxy open relay streams")
            .unwrap();
        let tls = pon_cu::tls::client_tls(&cu.ca(), cert).unwrap();
        let tls = tokio_rustls::TlsConnector::from(Arc::new(tls))
            .connect("pon-cu".try_into().unwrap(), tokio::io::join(recv, send))
            .await
            .expect("TLS through the relay");
        Relayed {
            tls,
            dec: FrameDecoder::new(MAX_CU_FRAME),
        }
    }

    async fn send(&mut self, m: &AgentMsg) {
        use tokio::io::AsyncWriteExt;
        self.tls.write_all(&control::encode(m)).await.unwrap();
        self.tls.flush().await.unwrap();
    }

    /// The next message, or None once the CU ended the session.
    async fn next(&mut self) -> Option<CuMsg> {
        use tokio::io::AsyncReadExt;
        let mut buf = [0u8; 4096];
        loop {
            if let Some(m) = self.dec.next_msg::<CuMsg>().unwrap() {
                return Some(m);
            }
            match tokio::time::timeout(Duration::from_secs(10), self.tls.read(&mut buf))
                .await
                .expect("the CU answers within 10 s")
            {
                Ok(n) if n > 0 => self.dec.push(&buf[..n]).unwrap(),
                _ => return None,
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_proxy_relays_its_own_clouds_app_vms_and_nothing_else() {
    let cu = start().await;
    let token = cu.token("*", "*", None).await;
    // Before it is registered, and if it is not a proxy, a connection has
    // its control stream and nothing more: no relay stream opens.
    let vm_key = Key::new(12);
    let vm_cert = enrol(&cu, &token, "a", "direct-vm", "APP", &vm_key)
        .await
        .unwrap();
    let mut direct = Agent::connect(&cu, Some(vm_cert)).await;
    direct
        .send(&register(
            "a",
            "direct-vm",
            "APP",
            app(addr(1, 12)),
            &vm_key,
        ))
        .await;
    assert!(matches!(direct.next().await, Some(CuMsg::Config(_))));
    let extra = tokio::time::timeout(Duration::from_secs(1), direct.conn.open_bi()).await;
    assert!(
        extra.is_err(),
        "an app VM's connection opened a second stream"
    );
    let (_direct, direct_hb) = direct.keep_alive();

    let proxy = proxy_of(&cu, &token, "a", 1).await;
    let pconn = proxy.conn.clone();
    let (mut pinbox, phb) = proxy.keep_alive();

    // An app VM of the proxy's cloud, relayed: registered as if direct,
    // and the proxy hears of it as of any app VM of its site.
    let key = Key::new(11);
    let cert = enrol(&cu, &token, "a", "vm", "APP", &key).await.unwrap();
    let mut vm = Relayed::open(&cu, &pconn, Some(cert)).await;
    vm.send(&register("a", "vm", "APP", app(addr(1, 11)), &key))
        .await;
    match vm.next().await {
        Some(CuMsg::Config(c)) => assert!(c.id > 0),
        other => panic!("{other:?}"),
    }
    assert_eq!(cu.stats.relayed.load(Ordering::Relaxed), 1);
    match pinbox.next().await {
        Some(CuMsg::Update(ch)) => assert!(
            ch.iter()
                .any(|c| matches!(c, Change::Up(p) if p.info.name == "vm")),
            "{ch:?}"
        ),
        other => panic!("{other:?}"),
    }

    // Another cloud's app VM through a's proxy: refused, counted.
    let b_key = Key::new(21);
    let b_cert = enrol(&cu, &token, "b", "vm", "APP", &b_key).await.unwrap();
    let mut b_vm = Relayed::open(&cu, &pconn, Some(b_cert)).await;
    b_vm.send(&register("b", "vm", "APP", app(addr(2, 11)), &b_key))
        .await;
    match b_vm.next().await {
        Some(CuMsg::Refused(w)) => assert!(w.contains("relayed by a proxy of cloud"), "{w}"),
        other => panic!("{other:?}"),
    }
    assert!(b_vm.next().await.is_none(), "the refused session ended");
    // A proxy's registration through a relay: refused (a proxy's address
    // is its connection's, and it relays for others, not through them).
    let p2_key = Key::new(31);
    let p2_cert = enrol(&cu, &token, "a", "proxy2", "PROXY", &p2_key)
        .await
        .unwrap();
    let mut p2 = Relayed::open(&cu, &pconn, Some(p2_cert)).await;
    p2.send(&register(
        "a",
        "proxy2",
        "PROXY",
        Endpoints::proxy(addr(1, 2)),
        &p2_key,
    ))
    .await;
    match p2.next().await {
        Some(CuMsg::Refused(w)) => assert!(w.contains("own connection"), "{w}"),
        other => panic!("{other:?}"),
    }
    assert_eq!(cu.refused(Refusal::Relay), 2);
    // Administration through a relay: the session ends, nothing answered.
    let bad_before = cu.stats.counters.bad_unexpected.get();
    let mut admin = Relayed::open(&cu, &pconn, Some(cu.admin_cert())).await;
    admin
        .send(&AgentMsg::Admin {
            version: PROTOCOL_VERSION,
            request: AdminRequest::List,
        })
        .await;
    assert!(admin.next().await.is_none());
    assert_eq!(cu.stats.counters.bad_unexpected.get(), bad_before + 1);
    // A certificate of another CA gets no session through a relay either.
    let other = cu.dir.join("other-relay");
    std::fs::create_dir_all(&other).unwrap();
    let files = pon_cu::pki::InitFiles::in_dir(&other);
    pon_cu::pki::init(&files, "pon-cu", &[], true).unwrap();
    let foreign = ClientCert::from_files(&files.admin_cert, &files.admin_key).unwrap();
    let failures = cu.stats.counters.handshake_failures.get();
    let (send, recv) = pconn.open_bi().await.unwrap();
    let tls = Arc::new(pon_cu::tls::client_tls(&cu.ca(), Some(foreign)).unwrap());
    // (TLS 1.3: the client may finish its side before the CU has checked
    // its certificate; then the first read fails.)
    if let Ok(mut s) = tokio_rustls::TlsConnector::from(tls)
        .connect("pon-cu".try_into().unwrap(), tokio::io::join(recv, send))
        .await
    {
        use tokio::io::AsyncReadExt;
        let mut buf = [0u8; 64];
        let read = tokio::time::timeout(Duration::from_secs(10), s.read(&mut buf))
            .await
            .expect("the CU ends a foreign session within 10 s");
        assert!(!matches!(read, Ok(n) if n > 0), "{read:?}");
    }
    let deadline = Instant::now() + Duration::from_secs(10);
    while cu.stats.counters.handshake_failures.get() == failures {
        assert!(
            Instant::now() < deadline,
            "the foreign handshake was not counted"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    // Through all that, the relayed VM and the proxy carry on: a goodbye
    // on the relayed session reaches the proxy as the VM's leave.
    vm.send(&AgentMsg::Goodbye).await;
    match pinbox.next().await {
        Some(CuMsg::Update(ch)) => {
            assert!(ch.iter().any(|c| matches!(c, Change::Down(_))), "{ch:?}")
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(cu.stats.counters.leave_goodbye.get(), 1);
    phb.abort();
    direct_hb.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_relayed_vm_is_gone_when_its_proxy_connection_is() {
    let cu = start().await;
    let token = cu.token("*", "*", None).await;
    let watcher = proxy_of(&cu, &token, "b", 2).await;
    let (mut winbox, whb) = watcher.keep_alive();
    let proxy = proxy_of(&cu, &token, "a", 1).await;
    let pconn = proxy.conn.clone();
    let (_pinbox, phb) = proxy.keep_alive();
    let key = Key::new(11);
    let cert = enrol(&cu, &token, "a", "vm", "APP", &key).await.unwrap();
    let mut vm = Relayed::open(&cu, &pconn, Some(cert)).await;
    vm.send(&register("a", "vm", "APP", app(addr(1, 11)), &key))
        .await;
    assert!(matches!(vm.next().await, Some(CuMsg::Config(_))));
    // b's proxy heard of a's proxy; a's VM concerns only a's own proxies.
    assert!(matches!(winbox.next().await, Some(CuMsg::Update(_))));
    // The proxy goes: its relayed session ends with it, and the VM is
    // announced gone like any agent whose connection closed.
    pconn.close(0u32.into(), b"bye");
    assert!(vm.next().await.is_none());
    let deadline = Instant::now() + Duration::from_secs(10);
    while cu.stats.relayed.load(Ordering::Relaxed) > 0 || cu.stats.counters.leave_closed.get() < 2 {
        assert!(
            Instant::now() < deadline,
            "the relayed VM was not announced gone"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    whb.abort();
    phb.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_proxys_relay_stream_limit_follows_its_sessions() {
    let cu = start().await;
    let token = cu.token("*", "*", None).await;
    let proxy = proxy_of(&cu, &token, "a", 1).await;
    let pconn = proxy.conn.clone();
    let (_pinbox, phb) = proxy.keep_alive();
    // More sessions at once than the headroom the CU first allows (32):
    // each one open lets one more in, so all of them get their TLS
    // session. (Anonymous ones, as an enrolling VM's: they would be cut
    // off after 5 s without a message.)
    let mut open = Vec::new();
    for _ in 0..48 {
        open.push(Relayed::open(&cu, &pconn, None).await);
    }
    let deadline = Instant::now() + Duration::from_secs(10);
    while cu.stats.handshakes_established.load(Ordering::Relaxed) < 48 + 3 {
        assert!(
            Instant::now() < deadline,
            "relayed handshakes did not finish"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    drop(open);
    phb.abort();
}
