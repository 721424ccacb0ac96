//! Two (or three) `Tunnels` wired to each other by hand: every message is
//! delivered, dropped, duplicated or replayed as a test decides.

use super::*;
use proptest::prelude::*;

const MS: Duration = Duration::from_millis(1);

struct Node {
    t: Tunnels,
    table: Arc<SessionTable>,
    public: [u8; 32],
}

fn node(id: u32) -> Node {
    let (private, public) = generate_keypair();
    Node {
        t: Tunnels::new(id, private, Timers::default()),
        table: Arc::default(),
        public,
    }
}

fn pair() -> (Node, Node) {
    let (mut a, mut b) = (node(1), node(2));
    a.t.set_peers(Duration::ZERO, &[(2, b.public)]);
    b.t.set_peers(Duration::ZERO, &[(1, a.public)]);
    (a, b)
}

fn wall(now: Duration) -> u64 {
    1_700_000_000_000_000_000 + now.as_nanos() as u64
}

/// Delivers every message `from` has queued to `to`; returns what was sent.
fn deliver(from: &mut Node, to: &mut Node, now: Duration) -> Vec<Transmit> {
    let mut sent = Vec::new();
    while let Some(m) = from.t.poll_transmit() {
        refresh(from);
        refresh(to);
        if let Transmit::Keepalive { to: peer } = m {
            // The data path seals it with the newest session and the
            // peer opens it, which confirms the session there.
            send(from, to, peer).expect("a keepalive opens");
        } else {
            receive(to, from.t.my_id(), &m, now);
        }
        sent.push(m);
    }
    refresh(from);
    refresh(to);
    sent
}

fn receive(to: &mut Node, from: u32, m: &Transmit, now: Duration) -> Option<Result<(), Refused>> {
    match m {
        Transmit::Init { body, .. } => Some(to.t.handle_init(now, from, body)),
        Transmit::Response { body, .. } => Some(to.t.handle_response(now, from, body)),
        Transmit::Keepalive { .. } => None,
    }
}

fn refresh(n: &mut Node) {
    if let Some(t) = n.t.poll_table() {
        n.table = t;
    }
}

fn handshake(a: &mut Node, b: &mut Node, now: Duration) {
    a.t.handle_timeout(now, wall(now));
    b.t.handle_timeout(now, wall(now));
    for _ in 0..4 {
        deliver(a, b, now);
        deliver(b, a, now);
    }
}

/// Seals a packet from `a` to `b` as the data path does and opens it at `b`.
fn send(a: &Node, b: &Node, to: u32) -> Result<(), OpenError> {
    let s = a.table.sender(to).expect("a session to send with");
    let c = s.next_counter().unwrap();
    let mut data = b"payload".to_vec();
    let tag = s.seal(c, b"aad", &mut data);
    data.extend_from_slice(&tag);
    let r = b.table.session(s.remote_index()).ok_or(OpenError::Forged)?;
    r.open(c, b"aad", &mut data)
}

#[test]
fn a_handshake_gives_both_sides_one_working_session() {
    let (mut a, mut b) = pair();
    handshake(&mut a, &mut b, Duration::ZERO);
    assert_eq!(a.table.peers().collect::<Vec<_>>(), vec![2]);
    assert_eq!(b.table.peers().collect::<Vec<_>>(), vec![1]);
    send(&a, &b, 2).unwrap();
    send(&b, &a, 1).unwrap();
    assert_eq!(
        a.t.counters.completed.get() + b.t.counters.completed.get(),
        1
    );
    assert_eq!(
        a.t.counters.drop_collision.get() + b.t.counters.drop_collision.get(),
        1,
        "both initiated; the lower id's won"
    );
}

#[test]
fn the_responder_waits_for_proof_before_sending() {
    let (mut a, mut b) = pair();
    a.t.handle_timeout(Duration::ZERO, wall(Duration::ZERO));
    deliver(&mut a, &mut b, Duration::ZERO); // init
    assert!(
        b.table.sender(1).is_none(),
        "unconfirmed until the initiator speaks"
    );
    let sent = deliver(&mut b, &mut a, Duration::ZERO); // response
    assert!(matches!(sent[..], [Transmit::Response { .. }]));
    assert!(matches!(
        a.t.poll_transmit(),
        Some(Transmit::Keepalive { to: 2 })
    ));
    send(&a, &b, 2).unwrap(); // the keepalive, as the data path seals it
    send(&b, &a, 1).unwrap();
}

#[test]
fn a_responder_whose_keepalive_was_lost_makes_its_own_session() {
    let (mut a, mut b) = pair();
    a.t.handle_timeout(Duration::ZERO, wall(Duration::ZERO));
    deliver(&mut a, &mut b, Duration::ZERO); // init
    deliver(&mut b, &mut a, Duration::ZERO); // response
    assert!(matches!(
        a.t.poll_transmit(),
        Some(Transmit::Keepalive { .. })
    ));
    // The keepalive is lost and a sends nothing: b cannot send yet.
    assert!(b.table.sender(1).is_none());
    let later = Timers::default().retry;
    b.t.handle_timeout(later, wall(later));
    deliver(&mut b, &mut a, later); // b's own init
    deliver(&mut a, &mut b, later); // a's response
    refresh(&mut b);
    send(&b, &a, 1).expect("b sends with the session it initiated");
}

#[test]
fn replayed_forged_and_unknown_handshakes_are_refused() {
    let (mut a, mut b) = pair();
    a.t.handle_timeout(Duration::ZERO, wall(Duration::ZERO));
    let Some(init @ Transmit::Init { .. }) = a.t.poll_transmit() else {
        panic!("an initiation")
    };
    assert_eq!(receive(&mut b, 1, &init, Duration::ZERO), Some(Ok(())));
    let later = Duration::from_secs(1);
    assert_eq!(
        receive(&mut b, 1, &init, later),
        Some(Err(Refused::Replayed))
    );
    assert_eq!(
        receive(&mut b, 3, &init, later),
        Some(Err(Refused::UnknownPeer))
    );
    let Transmit::Init { body, .. } = &init else {
        unreachable!()
    };
    let mut forged = *body;
    forged[20] ^= 1;
    assert_eq!(b.t.handle_init(later, 1, &forged), Err(Refused::Forged));
    assert_eq!(
        b.t.handle_init(later, 1, &body[..10]),
        Err(Refused::Malformed)
    );

    // A response nobody asked for, and a forged one.
    let Some(Transmit::Response { body: resp, .. }) = b.t.poll_transmit() else {
        panic!("a response")
    };
    let mut bad = resp;
    bad[30] ^= 1;
    assert_eq!(a.t.handle_response(later, 2, &bad), Err(Refused::Forged));
    assert_eq!(
        a.t.handle_response(later, 2, &resp),
        Err(Refused::NoPending)
    );
    assert_eq!(b.t.counters.drop_replayed.get(), 1);
    assert_eq!(a.t.counters.drop_forged.get(), 1);
}

#[test]
fn an_outsider_with_its_own_key_gets_nothing() {
    let (mut a, _b) = pair();
    let mut mallory = node(2); // claims b's id with another key
    mallory.t.set_peers(Duration::ZERO, &[(1, a.public)]);
    mallory
        .t
        .handle_timeout(Duration::ZERO, wall(Duration::ZERO));
    deliver(&mut mallory, &mut a, Duration::ZERO);
    assert_eq!(a.t.counters.drop_forged.get(), 1);
    assert!(a.table.peers().next().is_none());
}

#[test]
fn rekeying_loses_no_packet_and_old_sessions_expire() {
    let (mut a, mut b) = pair();
    handshake(&mut a, &mut b, Duration::ZERO);
    let timers = Timers::default();
    let mut now = Duration::ZERO;
    let mut sent = 0;
    while now < timers.reject_after * 3 {
        now += 100 * MS;
        a.t.handle_timeout(now, wall(now));
        b.t.handle_timeout(now, wall(now));
        // Packets in flight while messages cross: both directions keep
        // working at every step of the exchange.
        loop {
            refresh(&mut a);
            refresh(&mut b);
            send(&a, &b, 2).unwrap();
            send(&b, &a, 1).unwrap();
            sent += 2;
            let moved = deliver(&mut a, &mut b, now).len() + deliver(&mut b, &mut a, now).len();
            if moved == 0 {
                break;
            }
        }
    }
    assert!(sent > 0);
    let rekeys = a.t.counters.rekeys.get() + b.t.counters.rekeys.get();
    assert!(rekeys >= 3, "rekeyed {rekeys} times over 9 minutes");
    assert!(a.t.counters.expired.get() > 0);
    assert!(a.t.status(now)[0].sessions <= SESSIONS_PER_PEER);
}

#[test]
fn a_rekey_by_volume() {
    let (mut a, mut b) = pair();
    a.t.timers.rekey_after_messages = 10;
    handshake(&mut a, &mut b, Duration::ZERO);
    for _ in 0..10 {
        send(&a, &b, 2).unwrap();
    }
    let now = Duration::from_millis(1);
    a.t.handle_timeout(now, wall(now));
    assert_eq!(a.t.counters.rekeys.get(), 1);
}

#[test]
fn a_removed_peer_loses_its_sessions_at_once() {
    let (mut a, mut b) = pair();
    handshake(&mut a, &mut b, Duration::ZERO);
    let s = b.table.sender(1).unwrap();
    let index = s.remote_index();
    a.t.set_peers(MS, &[]);
    refresh(&mut a);
    assert!(
        a.table.session(index).is_none(),
        "revoked: its packets name no session"
    );
    assert!(a.table.sender(2).is_none());
}

#[test]
fn a_restarted_peer_handshakes_again_and_traffic_resumes() {
    let (mut a, mut b) = pair();
    handshake(&mut a, &mut b, Duration::ZERO);
    // a restarts: same key, no state.
    let private = a.t.private;
    a.t = Tunnels::new(1, private, Timers::default());
    a.table = Arc::default();
    a.t.set_peers(Duration::from_secs(5), &[(2, b.public)]);
    handshake(&mut a, &mut b, Duration::from_secs(5));
    send(&a, &b, 2).unwrap();
    send(&b, &a, 1).unwrap();
}

proptest! {
    /// Whatever the network does to handshake messages (drop, duplicate,
    /// replay an old one), once it delivers again both sides end with a
    /// working session within a few retry intervals, and no replayed
    /// initiation is ever answered.
    #[test]
    fn handshakes_survive_a_hostile_network(fates in prop::collection::vec(0u8..4, 1..40)) {
        let (mut a, mut b) = pair();
        let mut now = Duration::ZERO;
        let mut seen: Vec<(u32, Transmit)> = Vec::new();
        for fate in fates {
            now += 300 * MS;
            a.t.handle_timeout(now, wall(now));
            b.t.handle_timeout(now, wall(now));
            for (from, to) in [(1u32, 2u32), (2, 1)] {
                let (src, dst) = if from == 1 { (&mut a, &mut b) } else { (&mut b, &mut a) };
                while let Some(m) = src.t.poll_transmit() {
                    match fate {
                        0 => {}
                        1 => { receive(dst, from, &m, now); }
                        2 => { receive(dst, from, &m, now); receive(dst, from, &m, now); }
                        _ => {
                            if let Some((f, old)) = seen.first().cloned() {
                                if f == from { receive(dst, from, &old, now); }
                            }
                        }
                    }
                    let _ = to;
                    seen.push((from, m));
                }
                refresh(src);
                refresh(dst);
            }
        }
        // The network heals.
        for _ in 0..6 {
            now += Timers::default().retry;
            handshake(&mut a, &mut b, now);
        }
        if let Some(s) = a.table.sender(2) {
            prop_assert!(b.table.session(s.remote_index()).is_some());
        }
        prop_assert!(send(&a, &b, 2).is_ok());
        prop_assert!(send(&b, &a, 1).is_ok());
    }
}

#[test]
fn a_lost_initiation_is_resent_at_once_when_the_peers_collides_with_it() {
    // b does not know a yet when a's initiation arrives (it started later,
    // or learnt of a later): a's is lost.
    let (mut a, mut b) = (node(1), node(2));
    a.t.set_peers(Duration::ZERO, &[(2, b.public)]);
    a.t.handle_timeout(Duration::ZERO, wall(Duration::ZERO));
    let lost = a.t.poll_transmit().expect("a initiates");
    assert_eq!(
        receive(&mut b, 1, &lost, Duration::ZERO),
        Some(Err(Refused::UnknownPeer))
    );
    // 200 ms later b knows a and initiates; a, the lower id, refuses it
    // (collision) but sends its own again at once, not after the retry.
    let now = 200 * MS;
    b.t.set_peers(now, &[(1, a.public)]);
    b.t.handle_timeout(now, wall(now));
    let theirs = b.t.poll_transmit().expect("b initiates");
    assert_eq!(
        receive(&mut a, 2, &theirs, now),
        Some(Err(Refused::Collision))
    );
    assert!(a.t.poll_timeout().is_some_and(|t| t <= now), "due now");
    a.t.handle_timeout(now, wall(now));
    for _ in 0..3 {
        deliver(&mut a, &mut b, now);
        deliver(&mut b, &mut a, now);
    }
    assert!(send(&a, &b, 2).is_ok() && send(&b, &a, 1).is_ok());
}
