//! Messages between the three parts of a proxy when they run as separate
//! processes (pon-forwarder, pon-monitor, pon-router, on one host or
//! several): one message per UDP datagram, postcard-encoded, at most
//! [`MAX_LOCAL_LEN`] bytes. Each daemon accepts them only from the
//! addresses its configuration names. Decoding never panics.
//!
//! ```text
//!             Arrived, Topology              Topology
//!  forwarder ───────────────────▶ monitor   forwarder ─────────▶ router
//!            ◀─────────────────── (Send)              ◀───────── (Routes)
//!  router ── Probe, Rate ──▶ monitor ── Result ──▶ router
//!  forwarder ── Traffic ──▶ router
//!  router ── Pmon ──▶ forwarder (which offers it to its CU client)
//! ```
//!
//! Every message is idempotent or periodic (Topology and Routes carry whole
//! state and are re-sent every second), so a lost datagram costs at most a
//! probe or a second of staleness.

use crate::codec::CodecError;
use crate::measurement::{ProbeOutcome, ProbeTag, TrafficSample};
use crate::pmon::{DestinationReport, Report, ReportError, MAX_DESTINATIONS};
use crate::pon::Hops;
use serde::{Deserialize, Serialize};

/// Largest message: a probe train packet with its hop list and framing.
pub const MAX_LOCAL_LEN: usize = 2048;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum LocalMsg {
    /// forwarder → monitor: a probe or probe reply (whole PON packet) that
    /// ended at this proxy.
    Arrived(Vec<u8>),
    /// monitor → forwarder: send this PON packet to peer `hop` from the
    /// proxy's PON socket (peers accept only that address).
    Send { hop: u32, packet: Vec<u8> },
    /// forwarder → monitor and router: this proxy's id, the peers (relay
    /// candidates) and the destinations to optimise; `from_cu` says the CU's
    /// role policy chose them (else every configured peer, which the
    /// router's `[[routing.destination]]` list may narrow).
    Topology {
        id: u32,
        peers: Vec<u32>,
        optimise: Vec<u32>,
        from_cu: bool,
    },
    /// router → forwarder: the chosen routes (`(to, relays)`) and the
    /// destinations no overlay path reaches (their traffic is left to the
    /// IP path: the forwarder steers its TAs).
    Routes {
        relays: Vec<(u32, Vec<u32>)>,
        unreachable: Vec<u32>,
    },
    /// router → monitor: probe `path` once; the result comes back tagged.
    Probe { tag: ProbeTag, path: Hops },
    /// router → monitor: measure `path`'s bandwidth with a packet train.
    Bandwidth { tag: ProbeTag, path: Hops },
    /// router → monitor: probe `path` every `every_ms` (0: stop).
    Rate {
        tag: ProbeTag,
        path: Hops,
        every_ms: u32,
    },
    /// monitor → router: the fate of a probe.
    Result {
        tag: ProbeTag,
        path: Hops,
        outcome: ProbeOutcome,
    },
    /// monitor → router: a packet train of `packets` probes finished; the
    /// bottleneck rate the far end saw (`None`: too few arrived).
    BandwidthResult {
        tag: ProbeTag,
        path: Hops,
        packets: u16,
        mbps: Option<f64>,
    },
    /// forwarder → router: the data counters of the peers whose counts
    /// changed since the last message (none: no message), for the passive
    /// watch of the current routes.
    Traffic(Vec<TrafficSample>),
    /// router → forwarder: a part of the router's PMon report, which the
    /// forwarder assembles ([`PmonAssembler`]), checks and offers to its
    /// CU client, as pon-proxy offers its own (sent with every status the
    /// router publishes).
    Pmon(PmonPart),
}

/// Destinations per [`LocalMsg::Pmon`]: a worst-case destination (ids of
/// five bytes, a route of `MAX_ROUTE_HOPS` hops, every figure of five
/// bytes) takes 83 bytes, so this many and the framing fit
/// [`MAX_LOCAL_LEN`] (`a_pmon_part_of_worst_case_destinations_fits`).
pub const PMON_PART_DESTINATIONS: usize = 24;

/// Parts of the largest report ([`MAX_DESTINATIONS`] destinations).
pub const MAX_PMON_PARTS: usize = MAX_DESTINATIONS.div_ceil(PMON_PART_DESTINATIONS);

/// Part `index` (from 0) of the `of` parts of the report the router sent
/// in round `round`. Rounds tell a report's parts from the previous one's:
/// over UDP a part may be lost, and then its round never completes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PmonPart {
    pub round: u32,
    pub index: u16,
    pub of: u16,
    pub destinations: Vec<DestinationReport>,
}

/// The messages that carry `report` in round `round`: one part per
/// [`PMON_PART_DESTINATIONS`] destinations (one part for an empty report).
/// A report of more than [`MAX_DESTINATIONS`] destinations (which
/// `Report::check` refuses anyway) makes parts the assembler refuses.
pub fn pmon_messages(report: Report, round: u32) -> Vec<LocalMsg> {
    let n = report
        .destinations
        .len()
        .div_ceil(PMON_PART_DESTINATIONS)
        .max(1);
    let of = u16::try_from(n).unwrap_or(u16::MAX);
    let mut rest = report.destinations.into_iter();
    (0..n)
        .map(|i| {
            LocalMsg::Pmon(PmonPart {
                round,
                index: u16::try_from(i).unwrap_or(u16::MAX),
                of,
                destinations: rest.by_ref().take(PMON_PART_DESTINATIONS).collect(),
            })
        })
        .collect()
}

/// Why the forwarder dropped what the router sent of a report.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum PmonDrop {
    /// A part that does not fit its round: no parts or too many, an index
    /// past them, more destinations than a part has, or a part the round
    /// already has or counts differently.
    #[error("a PMon part that does not fit its round")]
    BadPart,
    /// The whole report breaks its own rules.
    #[error("a PMon report the CU would refuse: {0}")]
    Invalid(ReportError),
}

impl PmonDrop {
    /// How many reasons there are ([`PmonDrop::index`] is below it).
    pub const KINDS: usize = 1 + ReportError::LABELS.len();

    /// A stable label per reason, in [`PmonDrop::index`] order:
    /// "bad_part", then [`ReportError::LABELS`].
    pub fn labels() -> impl Iterator<Item = &'static str> {
        std::iter::once("bad_part").chain(ReportError::LABELS)
    }

    pub fn index(&self) -> usize {
        match self {
            PmonDrop::BadPart => 0,
            PmonDrop::Invalid(e) => 1 + e.index(),
        }
    }
}

/// The forwarder's side of [`pmon_messages`]: feed it the router's parts;
/// it returns each report once all its parts came and it passes
/// `Report::check`. It keeps one round: a part of another round starts
/// that round and abandons the one in progress (a lost part costs one
/// report; the next comes with the router's next status). Holds at most
/// [`MAX_PMON_PARTS`] parts.
#[derive(Debug, Default)]
pub struct PmonAssembler {
    partial: Option<Round>,
}

/// A round in progress: its number, its parts so far, how many are missing.
#[derive(Debug)]
struct Round {
    round: u32,
    parts: Vec<Option<Vec<DestinationReport>>>,
    missing: usize,
}

impl PmonAssembler {
    pub fn push(&mut self, part: PmonPart) -> Result<Option<Report>, PmonDrop> {
        let (of, index) = (usize::from(part.of), usize::from(part.index));
        if of == 0
            || of > MAX_PMON_PARTS
            || index >= of
            || part.destinations.len() > PMON_PART_DESTINATIONS
        {
            return Err(PmonDrop::BadPart);
        }
        let r = match &mut self.partial {
            Some(r) if r.round == part.round => r,
            r => r.insert(Round {
                round: part.round,
                parts: vec![None; of],
                missing: of,
            }),
        };
        if r.parts.len() != of || r.parts[index].is_some() {
            return Err(PmonDrop::BadPart);
        }
        r.parts[index] = Some(part.destinations);
        r.missing -= 1;
        if r.missing > 0 {
            return Ok(None);
        }
        let Some(r) = self.partial.take() else {
            return Ok(None);
        };
        let report = Report {
            destinations: r.parts.into_iter().flatten().flatten().collect(),
        };
        report.check().map_err(PmonDrop::Invalid)?;
        Ok(Some(report))
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LocalError {
    #[error("local message of {0} bytes is too long")]
    TooLong(usize),
    #[error("malformed local message: {0}")]
    Malformed(String),
}

impl From<CodecError> for LocalError {
    fn from(e: CodecError) -> Self {
        match e {
            CodecError::TooLong { len, .. } => LocalError::TooLong(len),
            CodecError::Malformed(m) => LocalError::Malformed(m),
        }
    }
}

impl LocalMsg {
    pub fn encode(&self) -> Result<Vec<u8>, LocalError> {
        crate::codec::encode(self, MAX_LOCAL_LEN).map_err(LocalError::from)
    }

    pub fn decode(bytes: &[u8]) -> Result<Self, LocalError> {
        crate::codec::decode(bytes, MAX_LOCAL_LEN).map_err(LocalError::from)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn round_trips() {
        let h = |ids: &[u32]| Hops::new(ids).unwrap();
        for m in [
            LocalMsg::Arrived(vec![1; 1500]),
            LocalMsg::Send {
                hop: 3,
                packet: vec![2; 1464],
            },
            LocalMsg::Topology {
                id: 1,
                peers: vec![2, 3],
                optimise: vec![2],
                from_cu: true,
            },
            LocalMsg::Routes {
                relays: vec![(2, vec![3])],
                unreachable: vec![4],
            },
            LocalMsg::Probe {
                tag: ProbeTag::learning(2, 7),
                path: h(&[3, 2]),
            },
            LocalMsg::Bandwidth {
                tag: ProbeTag::bandwidth(2, 1),
                path: h(&[3, 2]),
            },
            LocalMsg::Rate {
                tag: ProbeTag::keepalive(2),
                path: h(&[2]),
                every_ms: 50,
            },
            LocalMsg::Result {
                tag: ProbeTag::keepalive(2),
                path: h(&[2]),
                outcome: ProbeOutcome::Reply {
                    rtt: std::time::Duration::from_micros(61_000),
                },
            },
            LocalMsg::BandwidthResult {
                tag: ProbeTag::bandwidth(2, 0),
                path: h(&[2]),
                packets: 16,
                mbps: Some(93.5),
            },
            LocalMsg::Traffic(vec![TrafficSample {
                peer: 2,
                sent: 1000,
                confirmed: 990,
            }]),
            LocalMsg::Pmon(PmonPart {
                round: 7,
                index: 0,
                of: 1,
                destinations: vec![reached(2, &[3, 2])],
            }),
        ] {
            assert_eq!(LocalMsg::decode(&m.encode().unwrap()).unwrap(), m);
        }
        assert!(LocalMsg::Arrived(vec![0; 4000]).encode().is_err());
    }

    #[test]
    fn routes_out_of_bounds_are_refused() {
        // A Probe whose path has no hops, and one with too many: both are
        // malformed, never a `Hops` that breaks its own invariant.
        let tag = ProbeTag::keepalive(2);
        let enc = |path: Vec<u32>| {
            let mut v = postcard::to_stdvec(&(4u8, tag)).unwrap();
            v.extend(postcard::to_stdvec(&path).unwrap());
            v
        };
        assert!(LocalMsg::decode(&enc(vec![])).is_err());
        assert!(LocalMsg::decode(&enc(vec![9; crate::pon::MAX_HOPS + 1])).is_err());
        let ok = LocalMsg::decode(&enc(vec![3, 2])).unwrap();
        assert_eq!(
            ok,
            LocalMsg::Probe {
                tag,
                path: Hops::new(&[3, 2]).unwrap()
            }
        );
    }

    use crate::pmon::{Figures, MAX_ROUTE_HOPS};

    /// `dst` reached over `route`, with some figures.
    fn reached(dst: u32, route: &[u32]) -> DestinationReport {
        DestinationReport {
            dst,
            reachable: true,
            route: route.to_vec(),
            figures: Figures {
                rtt_us: Some(61_000),
                loss_ppm: Some(0),
                ..Figures::default()
            },
        }
    }

    #[test]
    fn a_pmon_part_of_worst_case_destinations_fits() {
        let worst = DestinationReport {
            dst: u32::MAX,
            reachable: true,
            route: vec![u32::MAX; MAX_ROUTE_HOPS],
            figures: Figures {
                rtt_us: Some(u32::MAX),
                p50_us: Some(u32::MAX),
                p90_us: Some(u32::MAX),
                p99_us: Some(u32::MAX),
                jitter_us: Some(u32::MAX),
                loss_ppm: Some(u32::MAX),
            },
        };
        let m = LocalMsg::Pmon(PmonPart {
            round: u32::MAX,
            index: u16::MAX,
            of: u16::MAX,
            destinations: vec![worst; PMON_PART_DESTINATIONS],
        });
        let len = m.encode().expect("fits").len();
        assert!(len <= MAX_LOCAL_LEN, "{len}");
        // Not so few per part that a big report takes many datagrams.
        assert!(len + 83 > MAX_LOCAL_LEN, "{len}: room for more");
    }

    fn part(round: u32, index: u16, of: u16, destinations: Vec<DestinationReport>) -> PmonPart {
        PmonPart {
            round,
            index,
            of,
            destinations,
        }
    }

    #[test]
    fn pmon_parts_that_do_not_add_up_are_dropped() {
        let mut a = PmonAssembler::default();
        let d = || vec![reached(2, &[2])];
        assert_eq!(a.push(part(1, 0, 0, vec![])), Err(PmonDrop::BadPart));
        assert_eq!(a.push(part(1, 2, 2, d())), Err(PmonDrop::BadPart));
        let too_many = MAX_PMON_PARTS as u16 + 1;
        assert_eq!(a.push(part(1, 0, too_many, d())), Err(PmonDrop::BadPart));
        let crowd = vec![reached(2, &[2]); PMON_PART_DESTINATIONS + 1];
        assert_eq!(a.push(part(1, 0, 1, crowd)), Err(PmonDrop::BadPart));
        // A part twice, or counted differently within its round.
        assert_eq!(a.push(part(1, 0, 2, d())), Ok(None));
        assert_eq!(a.push(part(1, 0, 2, d())), Err(PmonDrop::BadPart));
        assert_eq!(a.push(part(1, 1, 3, d())), Err(PmonDrop::BadPart));
        // Round 1's second part was lost: round 2 replaces it.
        assert_eq!(a.push(part(2, 1, 2, vec![reached(3, &[3])])), Ok(None));
        let whole = a.push(part(2, 0, 2, d())).unwrap().unwrap();
        let dsts: Vec<u32> = whole.destinations.iter().map(|d| d.dst).collect();
        assert_eq!(dsts, [2, 3]);
        // Whole but refused by `Report::check`: one destination in two
        // parts, and a route that ends elsewhere.
        assert_eq!(a.push(part(3, 0, 2, d())), Ok(None));
        assert_eq!(
            a.push(part(3, 1, 2, d())),
            Err(PmonDrop::Invalid(ReportError::DuplicateDestination(2)))
        );
        let e = a.push(part(4, 0, 1, vec![reached(2, &[3])])).unwrap_err();
        assert_eq!(e, PmonDrop::Invalid(ReportError::BadRoute));
        let labels: Vec<&str> = PmonDrop::labels().collect();
        assert_eq!(labels.len(), PmonDrop::KINDS);
        assert_eq!(labels[e.index()], "bad_route");
        assert_eq!(labels[PmonDrop::BadPart.index()], "bad_part");
    }

    fn destination() -> impl Strategy<Value = DestinationReport> {
        crate::pmon::strategy::destination(0u32..200, 0u32..200)
    }

    /// A report that passes `Report::check`: distinct destinations, each
    /// reached directly or through relays that differ from it.
    fn valid_report() -> impl Strategy<Value = Report> {
        proptest::collection::btree_set(1u32..100_000, 0..120).prop_map(|dsts| Report {
            destinations: dsts
                .into_iter()
                .map(|d| match d % 3 {
                    0 => reached(d, &[d]),
                    1 => reached(d, &[100_000 + d, d]),
                    _ => DestinationReport {
                        dst: d,
                        ..DestinationReport::default()
                    },
                })
                .collect(),
        })
    }

    proptest! {
        #[test]
        fn decoding_garbage_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..3000)) {
            let _ = LocalMsg::decode(&bytes);
        }

        /// A report goes over the link in parts that each fit a datagram,
        /// and comes out whole and unchanged in whatever order they come.
        #[test]
        fn pmon_reports_survive_the_link_in_any_order(
            r in valid_report(),
            round in any::<u32>(),
            seed in any::<u64>(),
        ) {
            prop_assert!(r.check().is_ok());
            let mut parts: Vec<Vec<u8>> = pmon_messages(r.clone(), round)
                .iter()
                .map(|m| m.encode().unwrap())
                .collect();
            // A deterministic shuffle.
            let mut s = seed;
            for i in (1..parts.len()).rev() {
                s = s.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                parts.swap(i, (s >> 33) as usize % (i + 1));
            }
            let mut a = PmonAssembler::default();
            let mut out = Vec::new();
            for p in parts {
                let LocalMsg::Pmon(p) = LocalMsg::decode(&p).unwrap() else {
                    panic!("not a Pmon part");
                };
                out.extend(a.push(p).unwrap());
            }
            prop_assert_eq!(out, vec![r]);
        }

        /// Whatever parts come (any rounds, indices, counts, contents),
        /// the assembler never panics, and every report it lets out
        /// passes `Report::check`.
        #[test]
        fn only_checked_pmon_reports_come_out(
            parts in proptest::collection::vec(
                (0u32..3, 0u16..5, 0u16..5, proptest::collection::vec(destination(), 0..4)),
                0..40,
            ),
        ) {
            let mut a = PmonAssembler::default();
            for (round, index, of, destinations) in parts {
                match a.push(part(round, index, of, destinations)) {
                    Ok(Some(r)) => prop_assert!(r.check().is_ok()),
                    Ok(None) => {}
                    Err(e) => prop_assert!(e.index() < PmonDrop::KINDS),
                }
            }
        }
    }
}
