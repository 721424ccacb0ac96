//! The emulator proper, without I/O: a plain struct fed packets and an
//! explicit `now`, which says what to send when. The I/O loop around it only
//! reads the TUN, asks, sleeps until [`Emulator::next_due`], and writes.
//!
//! Per ordered pair of sites (a *link*), a packet goes through, in order:
//!
//! 1. **down**: a link that is down drops everything, also packets already
//!    in flight on it when it went down (they are dropped when due);
//! 2. **loss**: dropped with probability `loss` (independently per packet);
//! 3. **rate**: a token bucket (burst [`BURST_MIN`] or two full packets,
//!    whichever is more) in front of a FIFO; a packet that would wait longer
//!    than the queue bound ([`QUEUE_MIN`] or [`QUEUE_MIN_BYTES`] worth,
//!    whichever is more) is dropped (drop tail);
//! 4. **delay**: `delay` plus a jitter drawn uniformly from
//!    `[-jitter, +jitter]` (the total is never negative). Without jitter the
//!    link keeps FIFO order even when its delay is lowered at run time; with
//!    jitter, packets may overtake each other, as with netem.
//!
//! Pairs without a link, and links whose settings are all neutral and which
//! hold nothing in flight, pass packets straight through ([`Arrival::Forward`])
//! so the emulator adds no queueing to them.

use crate::metrics::LinkCounters;
use rand::rngs::SmallRng;
use rand::{RngExt, SeedableRng};
use std::cmp::Ordering;
use std::collections::BinaryHeap;
use std::sync::Arc;
use std::time::Duration;

/// A site's number (1-based position in the topology; 0 is "no site").
pub type SiteId = u8;

/// Smallest token-bucket depth, as time at the link rate. Small, so the rate
/// holds over short intervals, but deep enough for back-to-back packets of a
/// TCP burst not to queue behind each other at high rates.
pub const BURST_MIN: Duration = Duration::from_millis(2);
/// Smallest queue bound, as time at the link rate (tc's tbf `latency`).
pub const QUEUE_MIN: Duration = Duration::from_millis(100);
/// Smallest queue bound in bytes, so slow links still hold a TCP window's
/// worth of full-size packets.
pub const QUEUE_MIN_BYTES: u64 = 32 * 1024;
/// The largest packet the token bucket must let through at once.
const MAX_PACKET_BYTES: u64 = 1600;

/// The settings of one direction of a link.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct LinkParams {
    /// One-way propagation delay.
    pub delay: Duration,
    /// Half-width of the uniform jitter added to `delay`.
    pub jitter: Duration,
    /// Probability that a packet is dropped, in `[0, 1]`.
    pub loss: f64,
    /// Rate limit in bits per second of IP packet bytes; 0 = unlimited.
    pub rate_bps: u64,
    /// Drops every packet while set; the other settings are kept for `up`.
    pub down: bool,
}

impl LinkParams {
    /// Settings under which the link does nothing to a packet.
    pub fn is_neutral(&self) -> bool {
        self.delay.is_zero()
            && self.jitter.is_zero()
            && self.loss <= 0.0
            && self.rate_bps == 0
            && !self.down
    }
}

/// Why a packet was dropped (the `reason` label of the drop counter).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DropReason {
    /// Random loss.
    Loss,
    /// The link is down.
    Down,
    /// The rate limiter's queue is full, or too many packets are in flight.
    Queue,
}

/// What happened to an arriving packet.
#[derive(Debug)]
pub enum Arrival<P> {
    /// Send it now: the pair is unimpaired.
    Forward(P),
    /// Held; [`Emulator::poll`] returns it when due.
    Scheduled,
    /// Dropped; the packet is handed back so its buffer can be reused.
    Dropped(P, DropReason),
}

/// What [`Emulator::poll`] returns for a packet that is due.
#[derive(Debug)]
pub enum Emit<P> {
    Send(P),
    /// Its link went down while it was in flight.
    Dropped(P, DropReason),
}

/// One direction of a link: settings, shaper state, counters.
#[derive(Debug)]
pub struct Link {
    pub from: SiteId,
    pub to: SiteId,
    pub params: LinkParams,
    pub counters: Arc<LinkCounters>,
    /// Token bucket as a "theoretical arrival time" (GCRA): the bucket is
    /// full again at `tat`; sending `cost` at `d` needs `tat + cost - burst <= d`.
    tat: Option<Duration>,
    /// When the last scheduled packet is due: with no jitter, no later packet
    /// may be due before it (FIFO also across delay changes).
    last_due: Option<Duration>,
    in_flight: usize,
}

struct Entry<P> {
    due: Duration,
    seq: u64,
    link: u16,
    len: u32,
    packet: P,
}

// Heap order: earliest `due` first, then arrival order, so packets due at the
// same instant leave in the order they came.
impl<P> Ord for Entry<P> {
    fn cmp(&self, other: &Self) -> Ordering {
        (other.due, other.seq).cmp(&(self.due, self.seq))
    }
}
impl<P> PartialOrd for Entry<P> {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}
impl<P> PartialEq for Entry<P> {
    fn eq(&self, other: &Self) -> bool {
        self.due == other.due && self.seq == other.seq
    }
}
impl<P> Eq for Entry<P> {}

const NO_LINK: u16 = u16::MAX;

/// The emulator: links by ordered pair of sites and one priority queue of
/// the packets they hold (a heap, not a thread or timer per packet).
pub struct Emulator<P> {
    /// `(from << 8) | to` → index into `links`, or `NO_LINK`: one indexed
    /// load per packet, no hashing.
    slots: Vec<u16>,
    links: Vec<Link>,
    heap: BinaryHeap<Entry<P>>,
    seq: u64,
    max_in_flight: usize,
    rng: SmallRng,
}

impl<P> Emulator<P> {
    /// `max_in_flight` bounds the packets held over all links (memory);
    /// `seed` makes loss and jitter reproducible.
    pub fn new(max_in_flight: usize, seed: u64) -> Self {
        Self {
            slots: vec![NO_LINK; 1 << 16],
            links: Vec::new(),
            heap: BinaryHeap::new(),
            seq: 0,
            max_in_flight,
            rng: SmallRng::seed_from_u64(seed),
        }
    }

    fn slot(from: SiteId, to: SiteId) -> usize {
        (usize::from(from) << 8) | usize::from(to)
    }

    /// Sets the settings of the link `from → to`, creating it if needed.
    /// Takes effect for the next packet; packets in flight keep their times
    /// (except that `down` also drops them). Returns whether it was created.
    pub fn set_link(&mut self, from: SiteId, to: SiteId, params: LinkParams) -> bool {
        let slot = Self::slot(from, to);
        if let Some(link) = self.links.get_mut(usize::from(self.slots[slot])) {
            if link.params.rate_bps != params.rate_bps {
                // Debt at the old rate would be mis-priced at the new one;
                // start the new rate with a full bucket.
                link.tat = None;
            }
            link.params = params;
            return false;
        }
        assert!(self.links.len() < usize::from(NO_LINK), "too many links");
        self.slots[slot] = self.links.len() as u16;
        self.links.push(Link {
            from,
            to,
            params,
            counters: Arc::default(),
            tat: None,
            last_due: None,
            in_flight: 0,
        });
        true
    }

    pub fn link(&self, from: SiteId, to: SiteId) -> Option<&Link> {
        self.links
            .get(usize::from(self.slots[Self::slot(from, to)]))
    }

    pub fn links(&self) -> impl Iterator<Item = &Link> {
        self.links.iter()
    }

    /// Packets held over all links.
    pub fn in_flight(&self) -> usize {
        self.heap.len()
    }

    /// A packet of `len` bytes from site `from` to site `to` arrives at `now`.
    pub fn arrive(
        &mut self,
        now: Duration,
        from: SiteId,
        to: SiteId,
        len: usize,
        packet: P,
    ) -> Arrival<P> {
        let index = self.slots[Self::slot(from, to)];
        let Some(link) = self.links.get_mut(usize::from(index)) else {
            return Arrival::Forward(packet);
        };
        let c = &link.counters;
        c.rx_packets.inc();
        c.rx_bytes.add(len as u64);
        let p = link.params;
        if p.is_neutral() && link.in_flight == 0 {
            c.tx_packets.inc();
            c.tx_bytes.add(len as u64);
            return Arrival::Forward(packet);
        }
        if p.down {
            c.drop_down.inc();
            return Arrival::Dropped(packet, DropReason::Down);
        }
        // `random::<f64>()` is in [0, 1): loss 0 never drops, loss 1 always does.
        if p.loss > 0.0 && self.rng.random::<f64>() < p.loss {
            c.drop_loss.inc();
            return Arrival::Dropped(packet, DropReason::Loss);
        }
        if self.heap.len() >= self.max_in_flight {
            c.drop_queue.inc();
            return Arrival::Dropped(packet, DropReason::Queue);
        }
        let Some(depart) = shape(link, now, len) else {
            link.counters.drop_queue.inc();
            return Arrival::Dropped(packet, DropReason::Queue);
        };
        let mut due = depart + p.delay;
        if !p.jitter.is_zero() {
            let j = p.jitter.as_nanos() as i64;
            let offset = self.rng.random_range(-j..=j);
            due = if offset >= 0 {
                due + Duration::from_nanos(offset as u64)
            } else {
                // Never before the packet left the shaper: a negative delay
                // would send packets into the past.
                due.checked_sub(Duration::from_nanos(offset.unsigned_abs()))
                    .map_or(depart, |d| d.max(depart))
            };
        } else if let Some(last) = link.last_due {
            due = due.max(last);
        }
        link.last_due = Some(link.last_due.map_or(due, |l| l.max(due)));
        link.in_flight += 1;
        self.seq += 1;
        self.heap.push(Entry {
            due,
            seq: self.seq,
            link: index,
            len: len as u32,
            packet,
        });
        Arrival::Scheduled
    }

    /// When the next held packet is due.
    pub fn next_due(&self) -> Option<Duration> {
        self.heap.peek().map(|e| e.due)
    }

    /// The next packet due at or before `now`, if any; call until `None`.
    pub fn poll(&mut self, now: Duration) -> Option<Emit<P>> {
        if self.heap.peek()?.due > now {
            return None;
        }
        let e = self.heap.pop()?;
        let link = &mut self.links[usize::from(e.link)];
        link.in_flight -= 1;
        if link.params.down {
            link.counters.drop_down.inc();
            return Some(Emit::Dropped(e.packet, DropReason::Down));
        }
        link.counters.tx_packets.inc();
        link.counters.tx_bytes.add(u64::from(e.len));
        Some(Emit::Send(e.packet))
    }
}

/// The rate limiter: when the packet leaves the token bucket, or `None` if
/// it would wait longer than the queue bound.
fn shape(link: &mut Link, now: Duration, len: usize) -> Option<Duration> {
    let rate = link.params.rate_bps;
    if rate == 0 {
        link.tat = None;
        return Some(now);
    }
    let at_rate =
        |bytes: u64| Duration::from_nanos((bytes * 8).saturating_mul(1_000_000_000) / rate);
    let cost = at_rate(len as u64);
    let burst = BURST_MIN.max(at_rate(2 * MAX_PACKET_BYTES));
    let limit = QUEUE_MIN.max(at_rate(QUEUE_MIN_BYTES));
    let tat = link.tat.map_or(now, |t| t.max(now));
    // Bucket depth is `burst`; a packet larger than the bucket (impossible
    // below MAX_PACKET_BYTES) still goes once the bucket is full.
    let depart = (tat + cost.min(burst))
        .checked_sub(burst)
        .map_or(now, |d| d.max(now));
    if depart - now > limit {
        return None;
    }
    link.tat = Some(tat + cost);
    Some(depart)
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: Duration = Duration::from_millis(1);

    fn params(delay_ms: u32) -> LinkParams {
        LinkParams {
            delay: delay_ms * MS,
            ..LinkParams::default()
        }
    }

    /// Runs the emulator over arrivals `(at, from, to, len, id)` and returns
    /// `(id, sent at)` for every packet sent, stepping time exactly to each
    /// due instant (what a perfect I/O loop would do).
    fn run(
        emu: &mut Emulator<u32>,
        t0: Duration,
        arrivals: &[(Duration, SiteId, SiteId, usize, u32)],
    ) -> Vec<(u32, Duration)> {
        let mut out = Vec::new();
        let mut i = 0;
        loop {
            let next_arrival = arrivals.get(i).map(|a| t0 + a.0);
            let next = match (next_arrival, emu.next_due()) {
                (Some(a), Some(d)) => a.min(d),
                (Some(a), None) => a,
                (None, Some(d)) => d,
                (None, None) => return out,
            };
            while let Some(e) = emu.poll(next) {
                if let Emit::Send(id) = e {
                    out.push((id, next - t0));
                }
            }
            while i < arrivals.len() && t0 + arrivals[i].0 == next {
                let (_, from, to, len, id) = arrivals[i];
                if let Arrival::Forward(id) = emu.arrive(next, from, to, len, id) {
                    out.push((id, next - t0));
                }
                i += 1;
            }
        }
    }

    #[test]
    fn unlinked_pairs_pass_straight_through() {
        let mut emu = Emulator::new(100, 1);
        emu.set_link(1, 2, params(50));
        let t0 = Duration::ZERO;
        assert!(matches!(emu.arrive(t0, 2, 1, 100, 7), Arrival::Forward(7)));
        assert!(matches!(emu.arrive(t0, 1, 3, 100, 8), Arrival::Forward(8)));
        assert!(emu.next_due().is_none());
    }

    #[test]
    fn delay_is_exact_and_fifo() {
        let mut emu = Emulator::new(1000, 1);
        emu.set_link(1, 2, params(120));
        let t0 = Duration::ZERO;
        let arrivals: Vec<_> = (0..100u32)
            .map(|k| (k * 100 * Duration::from_micros(1), 1, 2, 1000, k))
            .collect();
        let out = run(&mut emu, t0, &arrivals);
        assert_eq!(out.len(), 100);
        for (k, (id, at)) in out.iter().enumerate() {
            assert_eq!(*id, k as u32, "FIFO");
            assert_eq!(*at, arrivals[k].0 + 120 * MS, "exactly the delay");
        }
        let c = &emu.link(1, 2).unwrap().counters;
        assert_eq!(
            (c.rx_packets.get(), c.tx_packets.get(), c.tx_bytes.get()),
            (100, 100, 100_000)
        );
    }

    #[test]
    fn lowering_the_delay_without_jitter_keeps_fifo() {
        let mut emu = Emulator::new(1000, 1);
        emu.set_link(1, 2, params(100));
        let t0 = Duration::ZERO;
        assert!(matches!(emu.arrive(t0, 1, 2, 100, 1), Arrival::Scheduled));
        emu.set_link(1, 2, params(10));
        // Would be due at 11 ms, but packet 1 is due at 100 ms: wait for it.
        assert!(matches!(
            emu.arrive(t0 + MS, 1, 2, 100, 2),
            Arrival::Scheduled
        ));
        emu.set_link(1, 2, LinkParams::default());
        // Neutral now, but packets are still in flight: not forwarded ahead of them.
        assert!(matches!(
            emu.arrive(t0 + 2 * MS, 1, 2, 100, 3),
            Arrival::Scheduled
        ));
        let out = run(&mut emu, t0, &[]);
        assert_eq!(out, vec![(1, 100 * MS), (2, 100 * MS), (3, 100 * MS)]);
        // Drained: neutral links forward directly again.
        assert!(matches!(
            emu.arrive(t0 + 200 * MS, 1, 2, 100, 4),
            Arrival::Forward(4)
        ));
    }

    #[test]
    fn jitter_stays_in_bounds_and_averages_to_the_delay() {
        let mut emu = Emulator::new(100_000, 42);
        emu.set_link(
            1,
            2,
            LinkParams {
                delay: 50 * MS,
                jitter: 10 * MS,
                ..LinkParams::default()
            },
        );
        let t0 = Duration::ZERO;
        let n = 20_000u32;
        let arrivals: Vec<_> = (0..n)
            .map(|k| (k * Duration::from_micros(10), 1, 2, 100, k))
            .collect();
        let out = run(&mut emu, t0, &arrivals);
        assert_eq!(out.len(), n as usize);
        let mut sum = 0.0;
        let mut reordered = 0;
        let mut last = 0;
        for (id, at) in &out {
            let d = (*at - arrivals[*id as usize].0).as_secs_f64() * 1e3;
            assert!((40.0..=60.0).contains(&d), "delay {d} ms out of 50 ± 10");
            sum += d;
            reordered += u32::from(*id < last);
            last = last.max(*id);
        }
        // Uniform ±10 ms: sd 5.77 ms, so the mean of 20 000 has sd 0.04 ms.
        assert!(
            (sum / f64::from(n) - 50.0).abs() < 0.3,
            "mean {}",
            sum / f64::from(n)
        );
        assert!(reordered > 0, "jitter larger than the spacing reorders");
    }

    #[test]
    fn jitter_never_sends_into_the_past() {
        let mut emu = Emulator::new(1000, 3);
        emu.set_link(
            1,
            2,
            LinkParams {
                delay: MS,
                jitter: 5 * MS,
                ..LinkParams::default()
            },
        );
        let t0 = Duration::ZERO;
        let arrivals: Vec<_> = (0..500u32).map(|k| (k * MS, 1, 2, 100, k)).collect();
        for (id, at) in run(&mut emu, t0, &arrivals) {
            assert!(at >= arrivals[id as usize].0);
        }
    }

    #[test]
    fn loss_rate_matches_within_statistical_bounds() {
        for (seed, loss) in [(1, 0.01), (2, 0.05), (3, 0.3)] {
            let mut emu = Emulator::new(10, seed);
            emu.set_link(
                1,
                2,
                LinkParams {
                    loss,
                    ..LinkParams::default()
                },
            );
            let n = 100_000u32;
            let t0 = Duration::ZERO;
            let mut sent = 0u32;
            for k in 0..n {
                match emu.arrive(t0, 1, 2, 100, k) {
                    Arrival::Scheduled => {
                        while emu.poll(t0).is_some() {}
                        sent += 1;
                    }
                    Arrival::Dropped(_, DropReason::Loss) => {}
                    other => panic!("{other:?}"),
                }
            }
            let lost = f64::from(n - sent);
            let expect = f64::from(n) * loss;
            let sd = (f64::from(n) * loss * (1.0 - loss)).sqrt();
            // 5.5 sd: a correct generator fails this with p < 4e-8 (fixed seeds anyway).
            assert!(
                (lost - expect).abs() < 5.5 * sd,
                "loss {loss}: lost {lost}, expected {expect}"
            );
            assert_eq!(
                emu.link(1, 2).unwrap().counters.drop_loss.get(),
                n as u64 - u64::from(sent)
            );
        }
    }

    #[test]
    fn loss_one_drops_everything_and_zero_nothing() {
        let mut emu = Emulator::new(10, 9);
        let t0 = Duration::ZERO;
        emu.set_link(
            1,
            2,
            LinkParams {
                loss: 1.0,
                ..LinkParams::default()
            },
        );
        emu.set_link(
            2,
            1,
            LinkParams {
                loss: 0.0,
                delay: MS,
                ..LinkParams::default()
            },
        );
        for k in 0..1000 {
            assert!(matches!(
                emu.arrive(t0, 1, 2, 100, k),
                Arrival::Dropped(_, DropReason::Loss)
            ));
            assert!(matches!(emu.arrive(t0, 2, 1, 100, k), Arrival::Scheduled));
            while emu.poll(t0 + MS).is_some() {}
        }
    }

    #[test]
    fn down_drops_new_and_in_flight_packets_and_up_restores() {
        let mut emu = Emulator::new(100, 1);
        let mut p = params(30);
        emu.set_link(1, 2, p);
        let t0 = Duration::ZERO;
        assert!(matches!(emu.arrive(t0, 1, 2, 100, 1), Arrival::Scheduled));
        p.down = true;
        emu.set_link(1, 2, p);
        assert!(matches!(
            emu.arrive(t0 + MS, 1, 2, 100, 2),
            Arrival::Dropped(_, DropReason::Down)
        ));
        assert!(matches!(
            emu.poll(t0 + 30 * MS),
            Some(Emit::Dropped(1, DropReason::Down))
        ));
        p.down = false;
        emu.set_link(1, 2, p);
        assert!(matches!(
            emu.arrive(t0 + 40 * MS, 1, 2, 100, 3),
            Arrival::Scheduled
        ));
        assert_eq!(emu.next_due(), Some(t0 + 70 * MS), "previous delay kept");
        assert_eq!(emu.link(1, 2).unwrap().counters.drop_down.get(), 2);
    }

    #[test]
    fn token_bucket_holds_the_rate() {
        let mut emu = Emulator::new(100_000, 1);
        let rate_bps = 10_000_000; // 10 Mbit/s: a 1250-byte packet takes 1 ms
        emu.set_link(
            1,
            2,
            LinkParams {
                rate_bps,
                ..LinkParams::default()
            },
        );
        let t0 = Duration::ZERO;
        // Offer 20 Mbit/s for 1 s: one 1250-byte packet every 0.5 ms.
        let arrivals: Vec<_> = (0..2000u32)
            .map(|k| (k * Duration::from_micros(500), 1, 2, 1250, k))
            .collect();
        let out = run(&mut emu, t0, &arrivals);
        let c = &emu.link(1, 2).unwrap().counters;
        assert_eq!(c.drop_queue.get() as usize + out.len(), 2000);
        assert!(
            c.drop_queue.get() > 0,
            "overload must overflow the bounded queue"
        );
        // Sent in order, never faster than the rate after the initial burst.
        let burst = BURST_MIN.as_nanos() as f64 / 1e6; // packets (1 ms each)
        for w in out.windows(2) {
            assert!(w[0].0 < w[1].0, "FIFO");
        }
        for (n, (_, at)) in out.iter().enumerate() {
            let allowed = at.as_secs_f64() * 1e3 + burst + 1.0;
            assert!(
                (n as f64) < allowed + 1e-9,
                "packet {n} at {at:?} beats the rate"
            );
        }
        // Over the second of offered load, the link carries ~its rate.
        let in_first_second = out
            .iter()
            .filter(|(_, at)| *at < Duration::from_secs(1))
            .count();
        assert!(
            (999..=1003).contains(&in_first_second),
            "{in_first_second} packets in 1 s"
        );
        // The queue is bounded: no packet waited more than the bound.
        for (id, at) in &out {
            let waited = *at - arrivals[*id as usize].0;
            assert!(
                waited
                    <= QUEUE_MIN.max(Duration::from_micros(
                        QUEUE_MIN_BYTES * 8 * 1_000_000 / rate_bps
                    ))
            );
        }
    }

    #[test]
    fn below_the_rate_packets_are_not_delayed() {
        let mut emu = Emulator::new(1000, 1);
        emu.set_link(
            1,
            2,
            LinkParams {
                rate_bps: 100_000_000,
                delay: 5 * MS,
                ..LinkParams::default()
            },
        );
        let t0 = Duration::ZERO;
        // 1500-byte packets every ms = 12 Mbit/s, far below 100 Mbit/s.
        let arrivals: Vec<_> = (0..200u32).map(|k| (k * MS, 1, 2, 1500, k)).collect();
        for (id, at) in run(&mut emu, t0, &arrivals) {
            assert_eq!(at, arrivals[id as usize].0 + 5 * MS);
        }
    }

    #[test]
    fn in_flight_bound_is_enforced() {
        let mut emu = Emulator::new(3, 1);
        emu.set_link(1, 2, params(10));
        let t0 = Duration::ZERO;
        for k in 0..3 {
            assert!(matches!(emu.arrive(t0, 1, 2, 100, k), Arrival::Scheduled));
        }
        assert!(matches!(
            emu.arrive(t0, 1, 2, 100, 3),
            Arrival::Dropped(_, DropReason::Queue)
        ));
        assert_eq!(emu.in_flight(), 3);
    }

    #[test]
    fn links_are_per_ordered_pair() {
        let mut emu = Emulator::new(10, 1);
        emu.set_link(1, 2, params(10));
        emu.set_link(2, 1, params(20));
        let t0 = Duration::ZERO;
        emu.arrive(t0, 1, 2, 100, 1);
        emu.arrive(t0, 2, 1, 100, 2);
        assert_eq!(run(&mut emu, t0, &[]), vec![(1, 10 * MS), (2, 20 * MS)]);
    }
}
