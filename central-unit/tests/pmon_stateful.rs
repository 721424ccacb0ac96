//! PMon's matrix driven by arbitrary frames from arbitrary proxies (and
//! from connections that are not proxies), proxies coming and going, and
//! time passing. Properties: no panic; a report changes only cells whose
//! source is the site of the proxy it came on (a proxy cannot speak for
//! another site);
//! a refused report changes nothing; the matrix has exactly one cell per
//! ordered pair of distinct sites; every event names the reporter's site as
//! its source and follows the previous one in sequence.
//!
//! Three subscribers stream all the while: one with the server's
//! thresholds, one with its own set equal to them (it must hear exactly
//! the same `above` / `below` events), and one with arbitrary thresholds of
//! its own (per pair and metric, `above` and `below` alternate, starting
//! with `above`; an `above` is over its threshold, a `below` under it less
//! the hysteresis; its events keep their order).
//!
//! One harness, two drivers: the property test below (CI) and the fuzz
//! target `pmon` in `fuzz/` (which includes this file).

use arbitrary::{Result, Unstructured};
use pon_cu::pmon::{Directory, PmonSettings};
use pon_cu::pmon_hub::{Hub, Limits, Out, PmonStats};
use pon_proto::control::{CuMsg, PROTOCOL_VERSION};
use pon_proto::pmon::{Event, EventKind, Metric, ProxyRef, Report, Subscription, Thresholds};
use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

const SITES: [&str; 3] = ["paris", "tokyo", "london"];

fn directory(online: &BTreeSet<u32>) -> Directory {
    online
        .iter()
        .map(|&id| {
            let p = ProxyRef {
                id,
                site: SITES[(id as usize - 1) % SITES.len()].into(),
                name: format!("p{id}"),
            };
            (id, p)
        })
        .collect()
}

/// Runs one arbitrary sequence of steps (at most 64).
pub fn run(data: &[u8]) {
    let mut u = Unstructured::new(data);
    let _ = steps(&mut u);
}

fn steps(u: &mut Unstructured) -> Result<()> {
    let settings = PmonSettings::default();
    let mut p = Hub::new(settings, Arc::new(PmonStats::default()), Limits::default());
    let mut online: BTreeSet<u32> = (1..=4).collect();
    let mut now_ms = 0u64;
    let all = Subscription::default();
    // The subscribers: 1 the server's thresholds, 2 its own equal to them,
    // 3 its own, arbitrary.
    let theirs = Thresholds {
        rtt_us: Some(u.int_in_range(1..=400_000u32)?),
        loss_ppm: if u.arbitrary()? {
            Some(u.int_in_range(1..=1_000_000u32)?)
        } else {
            None
        },
        hysteresis_ppm: u.int_in_range(0..=999_999u32)?,
    };
    let stream = |t: Option<Thresholds>| Subscription {
        stream: true,
        thresholds: t,
        ..Default::default()
    };
    let dir = directory(&online);
    for (conn, t) in [
        (1, None),
        (2, Some(settings.thresholds())),
        (3, Some(theirs)),
    ] {
        let out = p.subscribe(conn, Ok(()), PROTOCOL_VERSION, stream(t), &dir, 0);
        assert!(
            matches!(out[..], [Out::Send(_, CuMsg::Matrix(_))]),
            "{out:?}"
        );
    }
    let mut model = Model::default();
    for _ in 0..64 {
        if u.is_empty() {
            break;
        }
        now_ms += u64::from(u.int_in_range(0..=2000u32)?);
        let dir = directory(&online);
        match u.int_in_range(0..=9u8)? {
            0 => {
                let id = u.int_in_range(1..=5u32)?;
                if !online.remove(&id) {
                    online.insert(id);
                } else {
                    p.forget(id);
                }
                model.forget(id);
            }
            k => {
                let from = u.int_in_range(0..=5u32)?;
                // Mostly structured reports, sometimes raw bytes off the wire.
                let report: Report = if k == 1 {
                    let bytes: Vec<u8> = u.arbitrary()?;
                    match pon_proto::codec::decode(&bytes, 64 * 1024) {
                        Ok(r) => r,
                        Err(_) => continue,
                    }
                } else {
                    arbitrary_report(u)?
                };
                let before = p.pmon().matrix(&all, &dir, now_ms);
                let refused_before = p.pmon().len();
                let out = p.report(from, &report, &dir, now_ms);
                let after = p.pmon().matrix(&all, &dir, now_ms);
                let result: std::result::Result<(), ()> =
                    if report.check().is_ok() && dir.contains_key(&from) {
                        Ok(())
                    } else {
                        assert!(out.is_empty(), "a refused report made news: {out:?}");
                        assert_eq!(refused_before, p.pmon().len());
                        Err(())
                    };
                assert_eq!(before.cells.len(), after.cells.len());
                for (b, a) in before.cells.iter().zip(&after.cells) {
                    if b != a {
                        assert!(result.is_ok(), "a refused report changed {a:?}");
                        assert_eq!(
                            a.from, dir[&from].site,
                            "proxy {from} changed another site's cell: {a:?}"
                        );
                    }
                }
                let mut heard: BTreeMap<u64, Vec<Event>> = BTreeMap::new();
                for o in out {
                    let Out::Send(conn, CuMsg::Events(ev)) = o else {
                        panic!("a report answered with {o:?}");
                    };
                    assert!(heard.insert(conn, ev).is_none(), "two batches for {conn}");
                }
                for ev in heard.values() {
                    for e in ev {
                        assert_eq!(e.from_proxy, from);
                        assert_eq!(e.from, dir[&from].site);
                    }
                }
                model.check(&heard, &theirs);
                model.keep(p.pmon().pairs().collect());
            }
        }
        let dir = directory(&online);
        let sites: BTreeSet<&str> = dir.values().map(|p| p.site.as_str()).collect();
        let m = p.pmon().matrix(&all, &dir, now_ms);
        assert_eq!(m.cells.len(), sites.len() * sites.len().saturating_sub(1));
        let _ = p.tick(&dir, now_ms);
    }
    Ok(())
}

/// What the subscribers heard so far, to check each batch against.
#[derive(Default)]
struct Model {
    /// Last sequence number each subscriber saw.
    seq: BTreeMap<u64, u64>,
    /// Subscriber 3: per (pair, metric), whether its last event was `above`.
    above: BTreeMap<(u32, u32, bool), bool>,
}

fn threshold_events(ev: Option<&Vec<Event>>) -> Vec<(u32, u32, EventKind)> {
    ev.into_iter()
        .flatten()
        .filter(|e| matches!(e.kind, EventKind::Above { .. } | EventKind::Below { .. }))
        .map(|e| (e.from_proxy, e.to_proxy, e.kind.clone()))
        .collect()
}

impl Model {
    fn check(&mut self, heard: &BTreeMap<u64, Vec<Event>>, theirs: &Thresholds) {
        for (conn, ev) in heard {
            for e in ev {
                let last = self.seq.entry(*conn).or_insert(0);
                assert!(e.seq > *last, "subscriber {conn}: {} after {last}", e.seq);
                *last = e.seq;
            }
        }
        // The same thresholds, the same threshold events, whether the
        // server's or the subscriber's own; and the same other events.
        assert_eq!(
            threshold_events(heard.get(&1)),
            threshold_events(heard.get(&2))
        );
        let others = |c| -> Vec<EventKind> {
            heard
                .get(&c)
                .into_iter()
                .flatten()
                .map(|e| e.kind.clone())
                .filter(|k| !matches!(k, EventKind::Above { .. } | EventKind::Below { .. }))
                .collect()
        };
        assert_eq!(others(1), others(2));
        assert_eq!(others(1), others(3));
        for (a, b, kind) in threshold_events(heard.get(&3)) {
            let (metric, value, threshold, up) = match kind {
                EventKind::Above {
                    metric,
                    value,
                    threshold,
                } => (metric, value, threshold, true),
                EventKind::Below {
                    metric,
                    value,
                    threshold,
                } => (metric, value, threshold, false),
                _ => unreachable!(),
            };
            let rtt = metric == Metric::Rtt;
            let own = if rtt { theirs.rtt_us } else { theirs.loss_ppm };
            assert_eq!(Some(threshold), own, "{metric:?} event without a threshold");
            if up {
                assert!(value > threshold, "above at {value} <= {threshold}");
            } else {
                assert!(
                    value < theirs.lower(threshold),
                    "below at {value}, threshold {threshold}"
                );
            }
            let was = self.above.insert((a, b, rtt), up).unwrap_or(false);
            assert_ne!(
                was,
                up,
                "{a} -> {b}: two {} in a row",
                if up { "above" } else { "below" }
            );
        }
    }

    /// Pairs whose report left the matrix start afresh.
    fn keep(&mut self, pairs: BTreeSet<(u32, u32)>) {
        self.above.retain(|(a, b, _), _| pairs.contains(&(*a, *b)));
    }

    /// A proxy went: its pairs start afresh.
    fn forget(&mut self, id: u32) {
        self.above.retain(|(a, b, _), _| *a != id && *b != id);
    }
}

/// Mostly reports that pass their own checks (distinct destinations,
/// routes that end at them, relays once each), so that the matrix moves
/// and events happen; one in eight anything at all, to be refused.
fn arbitrary_report(u: &mut Unstructured) -> Result<Report> {
    let wild = u.ratio(1, 8)?;
    let n = u.int_in_range(0..=5usize)?;
    let mut destinations = Vec::with_capacity(n);
    let mut pool: Vec<u32> = (1..=6).collect();
    for _ in 0..n {
        let dst = if wild {
            u.int_in_range(0..=6u32)?
        } else if pool.is_empty() {
            break;
        } else {
            pool.swap_remove(u.choose_index(pool.len())?)
        };
        let reachable: bool = u.arbitrary()?;
        let mut route = Vec::new();
        if wild || reachable {
            let hops = u.int_in_range(0..=2usize)?;
            for _ in 0..hops {
                let h = u.int_in_range(if wild { 0 } else { 1 }..=6u32)?;
                if wild || (h != dst && !route.contains(&h)) {
                    route.push(h);
                }
            }
            if !wild || u.arbitrary()? {
                route.push(dst);
            }
        }
        // Values around the thresholds (200 ms, 5 %), both ways.
        let val = |u: &mut Unstructured, max: u32| -> Result<Option<u32>> {
            Ok(if u.ratio(7, 8)? {
                Some(u.int_in_range(0..=max)?)
            } else {
                None
            })
        };
        destinations.push(pon_proto::pmon::DestinationReport {
            dst,
            reachable: if wild { u.arbitrary()? } else { reachable },
            route,
            figures: pon_proto::pmon::Figures {
                rtt_us: val(u, 400_000)?,
                p50_us: val(u, 400_000)?,
                p90_us: val(u, 400_000)?,
                p99_us: val(u, 400_000)?,
                jitter_us: val(u, 400_000)?,
                loss_ppm: val(u, 100_000)?,
            },
        });
    }
    Ok(Report { destinations })
}

#[cfg(test)]
mod properties {
    use proptest::prelude::*;

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(512))]
        #[test]
        fn proxies_speak_only_for_themselves(data in proptest::collection::vec(any::<u8>(), 0..2048)) {
            super::run(&data);
        }
    }
}
