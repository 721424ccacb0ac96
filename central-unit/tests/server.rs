//! The CU over real QUIC on loopback: a well-behaved agent keeps getting its
//! updates while other clients send oversized or malformed frames, stall
//! without registering, or present the wrong token.

use pon_cu::config::CuConfig;
use pon_cu::server::{self, CuStats};
use pon_proto::control::{
    self, AgentMsg, Change, CuMsg, Endpoints, FrameDecoder, Register, MAX_CU_FRAME,
    PROTOCOL_VERSION,
};
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

struct Cu {
    addr: SocketAddr,
    token: String,
    client: quinn::Endpoint,
    stats: Arc<CuStats>,
}

async fn start() -> Cu {
    let dir = std::env::temp_dir().join(format!("pon-cu-it-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let files = pon_cu::pki::InitFiles::in_dir(&dir);
    pon_cu::pki::init(&files, "pon-cu", &["127.0.0.1".parse().unwrap()], true).unwrap();
    let mut cfg = CuConfig::parse("listen = \"127.0.0.1:0\"\n").unwrap();
    cfg.cert = files.cert.clone();
    cfg.key = files.key.clone();
    cfg.token_file = files.token.clone();
    cfg.store = dir.join("registry.redb");
    let stats = Arc::new(CuStats::default());
    let (tx, rx) = tokio::sync::oneshot::channel();
    tokio::spawn(server::serve(cfg, stats.clone(), Some(tx)));
    let addr = rx.await.unwrap();
    let mut client = quinn::Endpoint::client("127.0.0.1:0".parse().unwrap()).unwrap();
    client.set_default_client_config(
        pon_cu::tls::client_config(&files.ca_cert, pon_cu::client::CU_IDLE_TIMEOUT).unwrap(),
    );
    let token = std::fs::read_to_string(&files.token)
        .unwrap()
        .trim()
        .to_string();
    Cu {
        addr,
        token,
        client,
        stats,
    }
}

fn register(token: &str, cloud: &str, last: u8) -> AgentMsg {
    let a = Ipv4Addr::new(127, 0, 0, last);
    AgentMsg::Register(Register {
        version: PROTOCOL_VERSION,
        token: token.into(),
        cloud: cloud.into(),
        role: "PROXY".into(),
        name: "proxy".into(),
        endpoints: Endpoints::proxy(a),
        id_hint: None,
    })
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
    async fn connect(cu: &Cu) -> Agent {
        let conn = cu.client.connect(cu.addr, "pon-cu").unwrap().await.unwrap();
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
    let mut good = Agent::connect(&cu).await;
    good.send(&register(&cu.token, "a", 1)).await;
    match good.next().await {
        Some(CuMsg::Config(c)) => assert!(c.peers.is_empty()),
        other => panic!("{other:?}"),
    }
    // Keep the good agent alive while the rest goes on.
    let mut hb_send = good.send;
    let mut good = good.inbox;
    let hb = tokio::spawn(async move {
        loop {
            if hb_send
                .write_all(&control::encode(&AgentMsg::Heartbeat))
                .await
                .is_err()
            {
                break;
            }
            tokio::time::sleep(Duration::from_millis(300)).await;
        }
    });

    // Oversized: refused from the length alone.
    let mut big = Agent::connect(&cu).await;
    big.send
        .write_all(&(1u32 << 24).to_be_bytes())
        .await
        .unwrap();
    assert!(closed_reason(&big.conn).await.contains("exceeds the limit"));
    // Malformed body.
    let mut bad = Agent::connect(&cu).await;
    bad.send
        .write_all(&[0, 0, 0, 3, 0xff, 0xff, 0xff])
        .await
        .unwrap();
    assert!(closed_reason(&bad.conn).await.contains("malformed"));
    // Wrong token.
    let mut wrong = Agent::connect(&cu).await;
    wrong.send(&register("nope", "b", 2)).await;
    assert_eq!(
        wrong.next().await,
        Some(CuMsg::Refused("wrong join token".into()))
    );
    // A client that connects and says nothing is cut off.
    let mut stall = Agent::connect(&cu).await;
    stall.send.write_all(&[0, 0]).await.unwrap(); // half a length prefix
    let why = closed_reason(&stall.conn).await;
    assert!(why.contains("no registration within 5 s"), "{why}");

    // Meanwhile the good agent hears of a real join and leave, as usual.
    let mut other = Agent::connect(&cu).await;
    other.send(&register(&cu.token, "b", 2)).await;
    assert!(matches!(other.next().await, Some(CuMsg::Config(_))));
    match good.next().await {
        Some(CuMsg::Update(ch)) => {
            assert!(matches!(&ch[..], [Change::Up(p)] if p.info.cloud == "b"))
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
    assert_eq!(c.refused_token.get(), 1);
    assert_eq!(c.register_timeouts.get(), 1);
    assert_eq!(c.leave_goodbye.get(), 1);
    assert_eq!(c.registrations.get(), 2);
    hb.abort();
}
