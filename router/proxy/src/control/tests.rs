//! Three proxies' control cores wired through a simulated overlay (link
//! delays, links going down), with the forwarders' transit done here: the
//! whole monitor → router → table → steering loop, deterministically.

use super::*;
use crate::config::ProxyConfig;
use pon_proto::steering::Steering;
use std::collections::BinaryHeap;
use std::net::Ipv4Addr;

fn ms(x: u64) -> Duration {
    Duration::from_millis(x)
}

/// A packet in flight: (arrival, order, next proxy, bytes).
type InFlight = std::cmp::Reverse<(Duration, u64, u32, Vec<u8>)>;

struct Net {
    nodes: Vec<Control>,
    /// One-way delay between proxies i and j (ids 1..=3), `None` = down.
    delay: [[Option<u64>; 4]; 4],
    queue: BinaryHeap<InFlight>,
    n: u64,
    /// Drop every k-th packet between proxies a and b (either direction).
    drop_every: Option<(u32, u32, u64)>,
    crossed: u64,
    /// Bottleneck rate of a direction (Mbit/s) and when it is free again.
    rate: [[Option<f64>; 4]; 4],
    busy: [[Duration; 4]; 4],
    now: Duration,
    /// Route changes seen at proxy 1 towards 2: (time, hops).
    routes: Vec<(Duration, Vec<u32>)>,
}

fn config(id: u32, policy: &str) -> ProxyConfig {
    config_with(id, policy, "")
}

fn config_with(id: u32, policy: &str, proxy: &str) -> ProxyConfig {
    let mut t = format!(
        "id = {id}\nlisten = \"198.18.{id}.1:7300\"\nlocal_addr = \"198.18.{id}.1\"\n[[agent]]\naddr = \"198.18.{id}.11\"\n"
    );
    for p in (1..=3).filter(|p| *p != id) {
        t += &format!("[[peer]]\nid = {p}\naddr = \"198.18.{p}.1:7300\"\n[[destination]]\nprefix = \"198.18.{p}.11/32\"\nproxy = {p}\n");
    }
    t += &format!("[routing]\npolicy = \"{policy}\"\nloss_window = 64\n[proxy]\n{proxy}\n");
    ProxyConfig::parse(&t).unwrap()
}

impl Net {
    fn new(direct: u64, leg: u64, policy: &str) -> Self {
        let mut delay = [[None; 4]; 4];
        for (a, b, d) in [(1, 2, direct), (1, 3, leg), (2, 3, leg)] {
            delay[a][b] = Some(d);
            delay[b][a] = Some(d);
        }
        Net {
            nodes: (1..=3)
                .map(|id| Control::new(&config(id, policy), id * 1000, 1))
                .collect(),
            delay,
            queue: BinaryHeap::new(),
            n: 0,
            drop_every: None,
            crossed: 0,
            rate: [[None; 4]; 4],
            busy: [[Duration::ZERO; 4]; 4],
            now: Duration::ZERO,
            routes: Vec::new(),
        }
    }

    fn set(&mut self, a: usize, b: usize, d: Option<u64>) {
        self.delay[a][b] = d;
        self.delay[b][a] = d;
    }

    fn send(&mut self, from: u32, to: u32, bytes: Vec<u8>) {
        if let Some((a, b, k)) = self.drop_every {
            if (from, to) == (a, b) || (from, to) == (b, a) {
                self.crossed += 1;
                if self.crossed.is_multiple_of(k) {
                    return;
                }
            }
        }
        let (f, t) = (from as usize, to as usize);
        if let Some(d) = self.delay[f][t] {
            let mut leave = self.now;
            if let Some(mbps) = self.rate[f][t] {
                let wire = (bytes.len() + pon_proto::ip::UDP_OVERHEAD) as f64 * 8.0;
                leave = leave.max(self.busy[f][t]) + Duration::from_secs_f64(wire / (mbps * 1e6));
                self.busy[f][t] = leave;
            }
            self.n += 1;
            self.queue
                .push(std::cmp::Reverse((leave + ms(d), self.n, to, bytes)));
        }
    }

    /// Runs until `until`, in 1 ms steps.
    fn run(&mut self, until: Duration) {
        let mut out = Vec::new();
        while self.now < until {
            while let Some(std::cmp::Reverse((t, _, _, _))) = self.queue.peek() {
                if *t > self.now {
                    break;
                }
                let std::cmp::Reverse((arrival, _, at, mut bytes)) = self.queue.pop().unwrap();
                let mut p = pon::Packet::new_checked(&mut bytes[..]).unwrap();
                assert_eq!(p.current_hop(), at);
                if let Some(next) = p.advance() {
                    self.send(at, next, bytes);
                    continue;
                }
                if let Some(s) = self.nodes[at as usize - 1].on_packet(arrival, &bytes) {
                    self.send(at, s.first_hop, s.bytes);
                }
            }
            for i in 0..3 {
                let id = i as u32 + 1;
                if self.nodes[i].poll_timeout().is_some_and(|t| t <= self.now) {
                    self.nodes[i].on_tick(self.now, &mut out);
                    for s in out.drain(..) {
                        self.send(id, s.first_hop, s.bytes);
                    }
                }
                let _ = self.nodes[i].take_table();
                let _ = self.nodes[i].steering(self.now);
            }
            let cur = self.nodes[0]
                .router()
                .unwrap()
                .current_path(2)
                .map(|h| h.as_slice().to_vec())
                .unwrap_or_default();
            if self.routes.last().map(|r| &r.1) != Some(&cur) {
                self.routes.push((self.now, cur));
            }
            self.now += ms(1);
        }
    }

    fn route(&self) -> Vec<u32> {
        self.routes.last().map(|r| r.1.clone()).unwrap_or_default()
    }
}

use pon_proto::pon;

#[test]
fn picks_the_relayed_path_fails_over_fast_and_returns_once() {
    let mut net = Net::new(75, 15, "latency");
    net.run(ms(3000));
    assert_eq!(net.route(), vec![3, 2], "{:?}", net.routes);
    let first = net.routes.iter().find(|r| r.1 == vec![3, 2]).unwrap().0;
    assert!(first < ms(500), "relayed route after {first:?}");
    let table = net.nodes[0].table.as_ref().unwrap();
    assert_eq!(table.route(2).unwrap().as_slice(), &[3, 2]);

    // The relay's first leg dies.
    let down = ms(5000);
    net.run(down);
    net.set(1, 3, None);
    net.run(ms(8000));
    let moved = net
        .routes
        .iter()
        .find(|r| r.0 > down && r.1 == vec![2])
        .unwrap_or_else(|| panic!("no failover: {:?}", net.routes))
        .0;
    assert!(moved - down < ms(600), "failover took {:?}", moved - down);
    assert_eq!(
        net.nodes[0]
            .table
            .as_ref()
            .unwrap()
            .route(2)
            .unwrap()
            .as_slice(),
        &[2]
    );

    // Back: the better path again, once.
    let up = net.now;
    net.set(1, 3, Some(15));
    net.run(ms(20_000));
    let after: Vec<_> = net.routes.iter().filter(|r| r.0 > up).collect();
    assert_eq!(after.len(), 1, "{after:?}");
    assert_eq!(after[0].1, vec![3, 2]);
    // Probe budget: bounded and reported.
    let st = net.nodes[0].status(net.now);
    let d2 = st.destinations.iter().find(|d| d.id == 2).unwrap();
    assert!(
        d2.probes_per_sec > 5.0 && d2.probes_per_sec < 40.0,
        "{d2:?}"
    );
    assert_eq!(d2.current, Some(vec![3, 2]));
}

#[test]
fn a_lossy_fastest_path_is_avoided_under_the_loss_policy() {
    // Direct 20 ms with every 10th packet lost each way; relayed 2 x 30 ms clean.
    let mut net = Net::new(20, 30, "loss");
    net.drop_every = Some((1, 2, 10));
    net.run(ms(30_000));
    let late: Vec<_> = net.routes.iter().filter(|r| r.0 > ms(10_000)).collect();
    assert!(late.is_empty(), "route changed late: {:?}", net.routes);
    assert_eq!(net.route(), vec![3, 2], "{:?}", net.routes);
}

#[test]
fn unreachable_destinations_are_left_to_the_ip_path_and_taken_back() {
    let mut net = Net::new(20, 20, "latency");
    net.run(ms(2000));
    let st = |n: &mut Net| {
        let s = n.nodes[0].steering(n.now + ms(10_000)).unwrap();
        (Steering::decode(&s.bytes).unwrap().bypass, s.agents)
    };
    let (bypass, agents) = st(&mut net);
    assert!(bypass.is_empty());
    assert_eq!(agents, vec![Ipv4Addr::new(198, 18, 1, 11)]);
    // Proxy 2 cut off from everyone: every overlay path to it is dead.
    net.set(1, 2, None);
    net.set(3, 2, None);
    let cut = net.now;
    net.run(ms(5000));
    assert!(!net.nodes[0].router().unwrap().is_reachable(2));
    assert_eq!(st(&mut net).0, vec![(Ipv4Addr::new(198, 18, 2, 11), 32)]);
    let gone = net
        .routes
        .iter()
        .find(|r| r.0 > cut && r.1.is_empty())
        .unwrap()
        .0;
    assert!(gone - cut < ms(1500), "unreachable after {:?}", gone - cut);
    net.set(1, 2, Some(20));
    net.set(3, 2, Some(20));
    net.run(ms(8000));
    assert!(net.nodes[0].router().unwrap().is_reachable(2));
    assert!(st(&mut net).0.is_empty());
}

#[test]
fn bandwidth_policy_measures_trains_and_takes_the_fat_path() {
    // Direct: 10 ms each way but a 10 Mbit/s bottleneck; through 3: 2 x 10 ms at 200 Mbit/s.
    let mut net = Net::new(10, 10, "bandwidth");
    for id in 1..=3 {
        net.nodes[id as usize - 1] = Control::new(
            &config_with(id, "bandwidth", "bandwidth_every_ms = 2000"),
            id * 1000,
            1,
        );
    }
    for (a, b, r) in [(1, 2, 10.0), (1, 3, 200.0), (3, 2, 200.0)] {
        net.rate[a][b] = Some(r);
        net.rate[b][a] = Some(r);
    }
    net.run(ms(15_000));
    assert_eq!(net.route(), vec![3, 2], "{:?}", net.routes);
    let st = net.nodes[0].status(net.now);
    let d2 = st.destinations.iter().find(|d| d.id == 2).unwrap();
    let bw = |p: &[u32]| {
        d2.candidates
            .iter()
            .find(|c| c.path == p)
            .and_then(|c| c.bandwidth_mbps)
            .unwrap()
    };
    assert!((bw(&[2]) - 10.0).abs() < 1.5, "{d2:?}");
    assert!(bw(&[3, 2]) > 150.0, "{d2:?}");
}
