//! pon-loadgen: a load generator and sink speaking PON, for benchmarking
//! forwarders (see netns-scripts/bench-transit). Not part of a deployment.

use clap::{Parser, Subcommand};
use pon_netio::udp::{GsoBatch, RecvBatch, UdpIo};
use pon_proto::ip::{Ipv4Repr, IPV4_HEADER_LEN, UDP_HEADER_LEN};
use pon_proto::pon::{self, Hops, Kind};
use std::net::{Ipv4Addr, SocketAddr};
use std::time::{Duration, Instant};

/// Sends PON data packets along a source route as fast as asked, or counts
/// what arrives. Prints one JSON line with its counts when done.
#[derive(Parser)]
#[command(version, about)]
struct Args {
    #[command(subcommand)]
    mode: Mode,
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
        /// Our proxy id, written as the header's source.
        #[arg(long, default_value_t = 1)]
        source: u32,
        /// Inner UDP payload bytes.
        #[arg(long, default_value_t = 64)]
        payload: usize,
        /// Packets per second to offer (0: as fast as possible).
        #[arg(long, default_value_t = 0)]
        rate: u64,
        #[arg(long, default_value_t = 5.0)]
        seconds: f64,
    },
    /// Count PON packets arriving on an address until `seconds` pass or
    /// nothing has arrived for `idle` seconds after the first packet.
    Sink {
        #[arg(long)]
        bind: SocketAddr,
        #[arg(long, default_value_t = 30.0)]
        seconds: f64,
        #[arg(long, default_value_t = 1.0)]
        idle: f64,
    },
}

fn packet(hops: &[u32], source: u32, payload: usize) -> Vec<u8> {
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
        src: Ipv4Addr::new(198, 18, 1, 11),
        dst: Ipv4Addr::new(198, 18, 2, 11),
        protocol: pon_proto::ip::IpProtocol::Udp,
        ttl: 64,
        dont_fragment: false,
        payload_len: UDP_HEADER_LEN + payload,
    }
    .emit(&mut v[header.header_len()..])
    .expect("sized");
    v
}

fn main() -> anyhow::Result<()> {
    match Args::parse().mode {
        Mode::Send {
            bind,
            to,
            hops,
            source,
            payload,
            rate,
            seconds,
        } => {
            let io = UdpIo::bind(bind)?;
            let pkt = packet(&hops, source, payload);
            let mut gso = GsoBatch::new(1472);
            let start = Instant::now();
            let deadline = start + Duration::from_secs_f64(seconds);
            let mut sent: u64 = 0;
            let mut errors: u64 = 0;
            let batch = io.max_gso_segments().clamp(1, 64) as u64;
            while Instant::now() < deadline {
                if rate > 0 {
                    // Pace per batch: sleep until this batch is due.
                    let due = start + Duration::from_secs_f64(sent as f64 / rate as f64);
                    if let Some(wait) = due.checked_duration_since(Instant::now()) {
                        std::thread::sleep(wait);
                    }
                }
                // Errors count lost packets, not failed system calls.
                for _ in 0..batch {
                    if let Err(e) = gso.push(&io, to, &pkt) {
                        errors += e.datagrams;
                    }
                }
                if let Err(e) = gso.flush(&io) {
                    errors += e.datagrams;
                }
                sent += batch;
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
            seconds,
            idle,
        } => {
            let io = UdpIo::bind(bind)?;
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
                    continue;
                }
                for i in 0..n {
                    got += rb.datagrams(i).count() as u64;
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
