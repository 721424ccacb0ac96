//! PMon's matrix driven by arbitrary frames from arbitrary proxies (and
//! from connections that are not proxies), proxies coming and going, and
//! time passing. Properties: no panic; a report changes only cells whose
//! source is the site of the proxy it came on (a proxy cannot speak for
//! another site);
//! a refused report changes nothing; the matrix has exactly one cell per
//! ordered pair of distinct sites; every event names the reporter's site as
//! its source and follows the previous one in sequence.
//!
//! One harness, two drivers: the property test below (CI) and the fuzz
//! target `pmon` in `fuzz/` (which includes this file).

use arbitrary::{Result, Unstructured};
use pon_cu::pmon::{Directory, Pmon, PmonSettings};
use pon_proto::pmon::{ProxyRef, Report, Subscription};
use std::collections::BTreeSet;

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
    let mut p = Pmon::new(PmonSettings::default());
    let mut online: BTreeSet<u32> = (1..=4).collect();
    let mut now_ms = 0u64;
    let mut last_seq = 0;
    let all = Subscription::default();
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
                let before = p.matrix(&all, &dir, now_ms);
                let result = p.report(from, &report, &dir, now_ms);
                let after = p.matrix(&all, &dir, now_ms);
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
                if let Ok((events, _)) = result {
                    for e in events {
                        assert_eq!(e.from_proxy, from);
                        assert_eq!(e.from, dir[&from].site);
                        assert_eq!(e.seq, last_seq + 1);
                        last_seq = e.seq;
                    }
                }
            }
        }
        let dir = directory(&online);
        let sites: BTreeSet<&str> = dir.values().map(|p| p.site.as_str()).collect();
        let m = p.matrix(&all, &dir, now_ms);
        assert_eq!(m.cells.len(), sites.len() * sites.len().saturating_sub(1));
        let _ = p.take_changed(&dir, now_ms);
    }
    Ok(())
}

fn arbitrary_report(u: &mut Unstructured) -> Result<Report> {
    let n = u.int_in_range(0..=5usize)?;
    let mut destinations = Vec::with_capacity(n);
    for _ in 0..n {
        let dst = u.int_in_range(0..=6u32)?;
        let hops = u.int_in_range(0..=3usize)?;
        let mut route: Vec<u32> = (0..hops)
            .map(|_| u.int_in_range(0..=6u32))
            .collect::<Result<_>>()?;
        if u.arbitrary()? {
            route.push(dst);
        }
        let val = |u: &mut Unstructured| -> Result<Option<u32>> {
            Ok(if u.arbitrary()? {
                Some(u.int_in_range(0..=400_000u32)?)
            } else {
                None
            })
        };
        destinations.push(pon_proto::pmon::DestinationReport {
            dst,
            reachable: u.arbitrary()?,
            route,
            figures: pon_proto::pmon::Figures {
                rtt_us: val(u)?,
                p50_us: val(u)?,
                p90_us: val(u)?,
                p99_us: val(u)?,
                jitter_us: val(u)?,
                loss_ppm: val(u)?,
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
