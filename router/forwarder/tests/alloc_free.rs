//! The forwarder's per-packet path must not allocate. A counting global
//! allocator watches this thread while the engine handles packets on every
//! path: ingress (sealing), transit (checking and renewing the link tag),
//! egress (opening the seal), ICMP "fragmentation needed", and drops.

use arc_swap::ArcSwap;
use pon_forwarder::engine::{BUFFER_LEN, HEADROOM};
use pon_forwarder::{Agent, AgentLink, Encap, Engine, ForwardingTable, Output};
use pon_proto::ip::{IpProtocol, Ipv4Repr, IPV4_HEADER_LEN};
use pon_proto::lan;
use pon_tunnel::lan::{Channel, PairKey};
use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::Arc;

struct Counting;

thread_local! {
    static WATCHING: Cell<bool> = const { Cell::new(false) };
    static ALLOCATIONS: Cell<u64> = const { Cell::new(0) };
}

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        if WATCHING.with(|w| w.get()) {
            ALLOCATIONS.with(|a| a.set(a.get() + 1));
        }
        System.alloc(layout)
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        System.dealloc(ptr, layout)
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        if WATCHING.with(|w| w.get()) {
            ALLOCATIONS.with(|a| a.set(a.get() + 1));
        }
        System.realloc(ptr, layout, new_size)
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

fn allocations_during(f: impl FnOnce()) -> u64 {
    ALLOCATIONS.with(|a| a.set(0));
    WATCHING.with(|w| w.set(true));
    f();
    WATCHING.with(|w| w.set(false));
    ALLOCATIONS.with(|a| a.get())
}

const APP_A: Ipv4Addr = Ipv4Addr::new(198, 18, 1, 11);
const APP_B: Ipv4Addr = Ipv4Addr::new(198, 18, 2, 11);

fn peer(id: u8) -> SocketAddr {
    SocketAddr::from(([198, 18, id, 1], 7300))
}

fn engine(id: u8, relays: Vec<(u32, Vec<u32>)>) -> Engine {
    let peers: Vec<_> = (1..=3u8)
        .filter(|p| *p != id)
        .map(|p| (u32::from(p), peer(p)))
        .collect();
    // Proxy 2's app VM takes the UDP leg (sealed), the others IP-in-IP;
    // every one has its key, so proxy 1's also sends sealed UDP.
    let addr = Ipv4Addr::new(198, 18, id, 11);
    let encap = if id == 2 {
        Encap::Udp { ra_port: 7302 }
    } else {
        Encap::Ipip
    };
    let app_public = pon_tunnel::lan::public_key(&app_secret(addr));
    let agents = [Agent {
        addr,
        encap,
        key: Some(pon_proto::control::PublicKey(app_public)),
    }];
    let dests = [
        ("198.18.2.0/24".parse().unwrap(), 2),
        ("198.18.1.0/24".parse().unwrap(), 1),
    ];
    let dests: Vec<_> = dests
        .into_iter()
        .filter(|(_, p)| *p != u32::from(id))
        .collect();
    let mut t = ForwardingTable::build(u32::from(id), &peers, &agents, &dests, &relays).unwrap();
    let pair = PairKey::for_proxy(&proxy_secret(id), &app_public).unwrap();
    t.set_link(
        addr,
        Arc::new(AgentLink {
            uplink: pair.receiver(Channel::Uplink),
            downlink: pair.sender(Channel::Downlink, 1, true),
        }),
    );
    // Data counters on every peer, as the proxy core attaches them: the
    // passive measurement's counting is on the measured path.
    let ids: Vec<u32> = t.peer_ids().collect();
    for p in ids {
        t.set_traffic(p, Arc::default());
    }
    let e = Engine::new(
        Arc::new(ArcSwap::from_pointee(t)),
        Ipv4Addr::new(198, 18, id, 1),
        1500,
        16,
    );
    e.sessions.store(mesh()[&u32::from(id)].clone());
    e
}

fn proxy_secret(id: u8) -> [u8; 32] {
    [20 + id; 32]
}
fn app_secret(addr: Ipv4Addr) -> [u8; 32] {
    [addr.octets()[2] + 100; 32]
}

/// Real sessions between the three proxies, made once.
fn mesh() -> &'static rustc_hash::FxHashMap<u32, Arc<pon_tunnel::SessionTable>> {
    static MESH: std::sync::OnceLock<rustc_hash::FxHashMap<u32, Arc<pon_tunnel::SessionTable>>> =
        std::sync::OnceLock::new();
    MESH.get_or_init(|| pon_tunnel::local_mesh(&[1, 2, 3]))
}

/// An IP-in-IP packet from APP_A's TA at the receive offset of `buf`.
fn load_from_ta(buf: &mut [u8], payload: usize) -> usize {
    let inner_len = IPV4_HEADER_LEN + payload;
    let outer = Ipv4Repr::ipip(APP_A, Ipv4Addr::new(198, 18, 1, 1), inner_len);
    outer.emit(&mut buf[HEADROOM..]).unwrap();
    let inner = Ipv4Repr {
        src: APP_A,
        dst: APP_B,
        protocol: IpProtocol::Udp,
        ttl: 64,
        dont_fragment: true,
        payload_len: payload,
    };
    inner.emit(&mut buf[HEADROOM + IPV4_HEADER_LEN..]).unwrap();
    IPV4_HEADER_LEN + inner_len
}

#[test]
fn per_packet_paths_do_not_allocate() {
    let ingress = engine(1, vec![(2, vec![3])]);
    let relay = engine(3, vec![]);
    let egress = engine(2, vec![]);
    let mut buf = vec![0u8; BUFFER_LEN];
    let mut wire = vec![0u8; BUFFER_LEN];
    let garbage = [1u8, 1, 0, 4, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0, 9];
    // APP_A's TA, sealing (and encrypting) its UDP leg.
    let ta = PairKey::for_agent(
        &app_secret(APP_A),
        &pon_tunnel::lan::public_key(&proxy_secret(1)),
    )
    .unwrap()
    .sender(Channel::Uplink, 1, true);
    let app_a = SocketAddr::from((APP_A, 40000));

    let mut run = |rounds: usize| {
        for _ in 0..rounds {
            // Ingress, then transit at the relay, then egress.
            let len = load_from_ta(&mut buf, 1000);
            let d = ingress.from_agent_ipip(
                &ingress.table.load(),
                &ingress.sessions.load(),
                &mut buf,
                HEADROOM,
                len,
            );
            assert_eq!(d.output, Output::Peer(peer(3)));
            let pon_len = d.range.len();
            wire[HEADROOM..HEADROOM + pon_len].copy_from_slice(&buf[d.range]);
            let d = relay.from_peer(
                &relay.table.load(),
                &relay.sessions.load(),
                &mut wire,
                HEADROOM,
                pon_len,
                peer(1),
            );
            assert_eq!(d.output, Output::Peer(peer(2)));
            let d = egress.from_peer(
                &egress.table.load(),
                &egress.sessions.load(),
                &mut wire,
                HEADROOM,
                pon_len,
                peer(3),
            );
            assert_eq!(
                d.output,
                Output::AgentUdp(std::net::SocketAddrV4::new(APP_B, 7302))
            );

            // The UDP leg from the TA: opened, then sealed onwards.
            let inner = load_from_ta(&mut buf, 1000) - IPV4_HEADER_LEN;
            buf.copy_within(
                HEADROOM + IPV4_HEADER_LEN..HEADROOM + IPV4_HEADER_LEN + inner,
                HEADROOM + lan::HEADER_LEN,
            );
            let len = ta.seal(&mut buf[HEADROOM..], inner).unwrap();
            let d = ingress.from_agent_udp(
                &ingress.table.load(),
                &ingress.sessions.load(),
                &mut buf,
                HEADROOM,
                len,
                app_a,
            );
            assert_eq!(d.output, Output::Peer(peer(3)));

            // Too big with DF: ICMP back to the sender.
            let len = load_from_ta(&mut buf, 1460);
            let d = ingress.from_agent_ipip(
                &ingress.table.load(),
                &ingress.sessions.load(),
                &mut buf,
                HEADROOM,
                len,
            );
            assert_eq!(d.output, Output::AgentIpip(APP_A));

            // Garbage and strangers.
            wire[HEADROOM..HEADROOM + garbage.len()].copy_from_slice(&garbage);
            let d = egress.from_peer(
                &egress.table.load(),
                &egress.sessions.load(),
                &mut wire,
                HEADROOM,
                garbage.len(),
                peer(3),
            );
            assert_eq!(d.output, Output::Drop);
            let stranger = SocketAddr::from(([203, 0, 113, 1], 7300));
            let d = egress.from_peer(
                &egress.table.load(),
                &egress.sessions.load(),
                &mut wire,
                HEADROOM,
                garbage.len(),
                stranger,
            );
            assert_eq!(d.output, Output::Drop);
        }
    };
    // arc-swap sets up its per-thread state on a thread's first load: once
    // per forwarding thread, not per packet.
    run(1);
    let n = allocations_during(|| run(10_000));
    assert_eq!(
        n, 0,
        "the forwarder allocated {n} times on its per-packet path"
    );
    assert_eq!(relay.counters.transit.get(), 10_001);
    assert_eq!(ingress.counters.frag_needed.get(), 10_001);
    assert_eq!(egress.counters.parse.total(), 20_002);
}
