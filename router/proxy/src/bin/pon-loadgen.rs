//! pon-loadgen: a load generator and sink speaking PON, for benchmarking
//! forwarders (see netns-scripts/bench-transit) and for playing a rogue
//! proxy in tests. Not part of a deployment.
//!
//! Both ends are keyed peers: each holds a proxy identity (`--state-dir`,
//! whose public key the forwarder under test lists for our id) and runs a
//! real Noise handshake with the one forwarder it talks to (`--peer-id`,
//! `--peer-key`) before anything else, so the forwarder takes its packets
//! as it takes a proxy's. On a relayed route (`--hops 3,2`) the first leg
//! is authenticated with that session; the end-to-end seal, which only the
//! egress opens, is made with a session the sink never checks. On a direct
//! route the seal is the real one, so the forwarder under test is the
//! egress and opens it: what a compromised proxy could send.

use clap::{Parser, Subcommand};
use pon_forwarder::engine::{seal, seal_with};
use pon_netio::udp::{GsoBatch, RecvBatch, UdpIo};
use pon_proto::control::PublicKey;
use pon_proto::ip::{Ipv4Repr, IPV4_HEADER_LEN, UDP_HEADER_LEN};
use pon_proto::pon::{self, Hops, Kind, MAX_SEAL_AAD_LEN};
use pon_tunnel::{SessionTable, Timers, Transmit, Tunnels};
use std::net::{Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// Sends PON data packets along a source route as fast as asked, or counts
/// what arrives. Prints one JSON line with its counts when done.
#[derive(Parser)]
#[command(version, about)]
struct Args {
    #[command(subcommand)]
    mode: Mode,
}

/// Who we are and the one forwarder we key with.
#[derive(clap::Args)]
struct Keying {
    /// Our proxy identity's directory (made on first use).
    #[arg(long)]
    state_dir: PathBuf,
    /// Our proxy id.
    #[arg(long)]
    id: u32,
    /// The forwarder we talk to: its id and public key.
    #[arg(long)]
    peer_id: u32,
    #[arg(long)]
    peer_key: PublicKey,
    /// How long to wait for the handshake.
    #[arg(long, default_value_t = 10.0)]
    handshake_seconds: f64,
}

#[derive(Subcommand)]
enum Mode {
    /// Send PON data packets (UDP GSO batches of 64).
    Send {
        /// Local address (must be the address:port of a peer the forwarder knows).
        #[arg(long)]
        bind: SocketAddr,
        /// The forwarder under test.
        #[arg(long)]
        to: SocketAddr,
        /// Source route, comma-separated proxy ids (first = the forwarder under test).
        #[arg(long, value_delimiter = ',')]
        hops: Vec<u32>,
        #[command(flatten)]
        keying: Keying,
        /// Inner UDP payload bytes.
        #[arg(long, default_value_t = 64)]
        payload: usize,
        /// The inner packet's source and destination addresses.
        #[arg(long, default_value = "198.18.1.11")]
        inner_src: Ipv4Addr,
        #[arg(long, default_value = "198.18.2.11")]
        inner_dst: Ipv4Addr,
        /// Packets per second to offer (0: as fast as possible).
        #[arg(long, default_value_t = 0)]
        rate: u64,
        #[arg(long, default_value_t = 5.0)]
        seconds: f64,
        /// Stop after this many packets (0: no limit but time).
        #[arg(long, default_value_t = 0)]
        count: u64,
    },
    /// Count PON packets arriving on an address until `seconds` pass or
    /// nothing has arrived for `idle` seconds after the first packet.
    Sink {
        #[arg(long)]
        bind: SocketAddr,
        /// The forwarder that relays to us (its PON address).
        #[arg(long)]
        peer_addr: SocketAddr,
        #[command(flatten)]
        keying: Keying,
        #[arg(long, default_value_t = 30.0)]
        seconds: f64,
        #[arg(long, default_value_t = 1.0)]
        idle: f64,
    },
}

/// An unsealed data packet (trailer room included) from `src` to `dst`.
fn packet(hops: &[u32], source: u32, payload: usize, src: Ipv4Addr, dst: Ipv4Addr) -> Vec<u8> {
    let header = pon::Repr {
        kind: Kind::Data,
        hop_limit: pon::DEFAULT_HOP_LIMIT,
        hop_index: 0,
        flow_id: 1,
        source,
        hops: Hops::new(hops).expect("1 to 8 hops"),
    };
    let inner_len = IPV4_HEADER_LEN + UDP_HEADER_LEN + payload;
    let mut v = vec![0u8; header.wire_len(inner_len)];
    header.emit(&mut v).expect("sized");
    Ipv4Repr {
        src,
        dst,
        protocol: pon_proto::ip::IpProtocol::Udp,
        ttl: 64,
        dont_fragment: false,
        payload_len: UDP_HEADER_LEN + payload,
    }
    .emit(&mut v[header.header_len()..])
    .expect("sized");
    v
}

/// This generator as a proxy with one peer: the handshake, and the keys it
/// leaves.
struct Keyed {
    tunnels: Tunnels,
    me: u32,
    peer: u32,
    addr: SocketAddr,
    table: Arc<SessionTable>,
    start: Instant,
}

impl Keyed {
    fn new(k: &Keying, addr: SocketAddr) -> anyhow::Result<Self> {
        let identity = pon_identity::Identity::load_or_create(&k.state_dir)?;
        let mut tunnels = Tunnels::new(k.id, identity.noise_secret(), Timers::default());
        tunnels.set_peers(Duration::ZERO, &[(k.peer_id, k.peer_key.0)]);
        Ok(Keyed {
            tunnels,
            me: k.id,
            peer: k.peer_id,
            addr,
            table: Arc::default(),
            start: Instant::now(),
        })
    }

    fn now(&self) -> Duration {
        self.start.elapsed()
    }

    /// Runs the tunnels' timers and sends what they want sent.
    fn tick(&mut self, io: &UdpIo) {
        let wall = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(1, |d| d.as_nanos() as u64);
        self.tunnels.handle_timeout(self.now(), wall);
        self.flush(io);
    }

    fn flush(&mut self, io: &UdpIo) {
        if let Some(t) = self.tunnels.poll_table() {
            self.table = t;
        }
        while let Some(t) = self.tunnels.poll_transmit() {
            let (kind, body): (Kind, &[u8]) = match &t {
                Transmit::Init { body, .. } => (Kind::HandshakeInit, body),
                Transmit::Response { body, .. } => (Kind::HandshakeResponse, body),
                Transmit::Keepalive { .. } => (Kind::Keepalive, &[]),
            };
            let header = pon::Repr {
                kind,
                hop_limit: pon::DEFAULT_HOP_LIMIT,
                hop_index: 0,
                flow_id: 0,
                source: self.me,
                hops: Hops::new(&[self.peer]).expect("one hop"),
            };
            let mut bytes = vec![0u8; header.wire_len(body.len())];
            header.emit(&mut bytes).expect("sized");
            let hl = header.header_len();
            bytes[hl..hl + body.len()].copy_from_slice(body);
            let len = bytes.len();
            if seal(&self.table, &mut bytes, 0, len).is_ok() {
                let mut one = GsoBatch::new(len);
                let sent = one.push(io, self.addr, &bytes).is_ok();
                if !(sent && one.flush(io).is_ok()) {
                    eprintln!("pon-loadgen: a {kind:?} to {} was not sent", self.addr);
                }
            }
        }
    }

    /// A datagram from the peer: handshake messages go to the tunnels and a
    /// keepalive is opened (which confirms our responder session). Returns
    /// whether it was one of those.
    fn handle(&mut self, io: &UdpIo, datagram: &mut [u8]) -> bool {
        let Ok(mut p) = pon::Packet::new_checked(&mut *datagram) else {
            return false;
        };
        let now = self.now();
        let from = p.source();
        match p.kind() {
            Kind::HandshakeInit => {
                let _ = self.tunnels.handle_init(now, from, p.payload());
            }
            Kind::HandshakeResponse => {
                let _ = self.tunnels.handle_response(now, from, p.payload());
            }
            Kind::Keepalive => {
                if let Some(s) = self.table.session(p.seal_index()) {
                    let counter = p.seal_counter();
                    let mut aad = [0u8; MAX_SEAL_AAD_LEN];
                    let aad = p.seal_aad(&mut aad).to_vec();
                    let _ = s.open(counter, &aad, p.sealed_mut());
                }
            }
            _ => return false,
        }
        self.flush(io);
        true
    }

    /// Until both ends hold a confirmed session (or `within` passes).
    fn handshake(&mut self, io: &UdpIo, within: Duration) -> anyhow::Result<()> {
        let deadline = Instant::now() + within;
        let mut rb = RecvBatch::default();
        while self.table.sender(self.peer).is_none() {
            anyhow::ensure!(
                Instant::now() < deadline,
                "no session with peer {} at {} within {within:?} (does it list our key for id {}?)",
                self.peer,
                self.addr,
                self.me
            );
            self.tick(io);
            for i in 0..rb.recv_within(io, Duration::from_millis(50))? {
                let from = rb.source(i);
                let datagrams: Vec<Vec<u8>> = rb.datagrams(i).map(<[u8]>::to_vec).collect();
                for mut d in datagrams {
                    if from == self.addr {
                        self.handle(io, &mut d);
                    }
                }
            }
        }
        Ok(())
    }
}

fn main() -> anyhow::Result<()> {
    match Args::parse().mode {
        Mode::Send {
            bind,
            to,
            hops,
            keying,
            payload,
            inner_src,
            inner_dst,
            rate,
            seconds,
            count,
        } => {
            anyhow::ensure!(
                hops.first() == Some(&keying.peer_id),
                "the first hop must be the peer we key with"
            );
            let io = UdpIo::bind(bind)?;
            let mut keyed = Keyed::new(&keying, to)?;
            keyed.handshake(&io, Duration::from_secs_f64(keying.handshake_seconds))?;
            let egress = *hops.last().expect("checked above");
            // The end-to-end seal: the real session on a direct route, else
            // one with the egress that only this process and its twin
            // hold (the sink does not open it; relays never do).
            let e2e = if hops.len() == 1 {
                keyed.table.clone()
            } else {
                pon_tunnel::local_mesh(&[keying.id, egress])
                    .remove(&keying.id)
                    .expect("ours")
            };
            let template = packet(&hops, keying.id, payload, inner_src, inner_dst);
            let mut pkt = template.clone();
            let mut gso = GsoBatch::new(1472);
            let start = Instant::now();
            let deadline = start + Duration::from_secs_f64(seconds);
            let mut sent: u64 = 0;
            let mut errors: u64 = 0;
            let batch = io.max_gso_segments().clamp(1, 64) as u64;
            while Instant::now() < deadline && (count == 0 || sent < count) {
                if rate > 0 {
                    // Pace per batch: sleep until this batch is due.
                    let due = start + Duration::from_secs_f64(sent as f64 / rate as f64);
                    if let Some(wait) = due.checked_duration_since(Instant::now()) {
                        std::thread::sleep(wait);
                    }
                }
                let n = if count == 0 {
                    batch
                } else {
                    batch.min(count - sent)
                };
                // Errors count lost packets, not failed system calls.
                for _ in 0..n {
                    // Fresh counters for every packet, as a proxy seals.
                    pkt.copy_from_slice(&template);
                    let len = pkt.len();
                    seal_with(&e2e, &keyed.table, &mut pkt, 0, len)
                        .map_err(|e| anyhow::anyhow!("sealing: {e:?}"))?;
                    if let Err(e) = gso.push(&io, to, &pkt) {
                        errors += e.datagrams;
                    }
                }
                if let Err(e) = gso.flush(&io) {
                    errors += e.datagrams;
                }
                sent += n;
            }
            let secs = start.elapsed().as_secs_f64();
            println!(
                "{{\"sent\":{sent},\"errors\":{errors},\"seconds\":{secs:.3},\"pps\":{:.0},\"bytes_per_packet\":{}}}",
                sent as f64 / secs,
                pkt.len()
            );
        }
        Mode::Sink {
            bind,
            peer_addr,
            keying,
            seconds,
            idle,
        } => {
            let io = UdpIo::bind(bind)?;
            let mut keyed = Keyed::new(&keying, peer_addr)?;
            keyed.handshake(&io, Duration::from_secs_f64(keying.handshake_seconds))?;
            println!("{{\"listening\":\"{bind}\"}}");
            let mut rb = RecvBatch::default();
            let deadline = Instant::now() + Duration::from_secs_f64(seconds);
            let idle = Duration::from_secs_f64(idle);
            let mut got: u64 = 0;
            let mut first: Option<Instant> = None;
            let mut last = Instant::now();
            while Instant::now() < deadline {
                let n = rb.recv_within(&io, idle)?;
                if n == 0 {
                    if first.is_some() {
                        break;
                    }
                    keyed.tick(&io);
                    continue;
                }
                for i in 0..n {
                    for d in rb.datagrams_mut(i) {
                        // Data is counted unopened; a rekey is answered.
                        let data =
                            pon::Packet::new_checked(&*d).is_ok_and(|p| p.kind() == Kind::Data);
                        if data {
                            got += 1;
                        } else {
                            let mut d = d.to_vec();
                            keyed.handle(&io, &mut d);
                        }
                    }
                }
                first.get_or_insert_with(Instant::now);
                last = Instant::now();
            }
            let active = first
                .map(|f| last.duration_since(f).as_secs_f64())
                .unwrap_or(0.0);
            println!("{{\"received\":{got},\"active_seconds\":{active:.3}}}");
        }
    }
    Ok(())
}
