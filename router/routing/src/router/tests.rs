use super::*;
use crate::selector::SelectorKind;
use proptest::prelude::*;

fn secs(s: u64) -> Duration {
    Duration::from_secs(s)
}
fn ms(x: u64) -> Duration {
    Duration::from_millis(x)
}
fn hops(h: &[u32]) -> Hops {
    Hops::new(h).unwrap()
}

/// Every interval probes (steady probing has tests of its own).
fn cfg() -> RoutingConfig {
    RoutingConfig {
        selector: SelectorKind::FullMesh,
        steady_every: 1,
        ..Default::default()
    }
}

/// A router for proxy 1 towards destination 2, with relays 3..=peers+2.
fn router(cfg: RoutingConfig, relays: u32) -> Router {
    let mut r = Router::new(1, cfg).unwrap();
    let peers: Vec<u32> = (2..relays + 3).collect();
    r.set_peers(Duration::ZERO, &peers);
    r.add_destination(2, None);
    r
}

/// Runs one interval at time `t` seconds: every probe is answered by
/// `world(path)` (None = lost), replies arriving in RTT order.
fn step(r: &mut Router, t: u64, world: &dyn Fn(&Hops) -> Option<u64>) -> Vec<RouterEvent> {
    let mut probes = Vec::new();
    r.on_tick(secs(t), &mut probes);
    let mut results: Vec<(Duration, ProbeRequest, ProbeOutcome)> = probes
        .iter()
        .map(|p| match world(&p.path) {
            Some(rtt) => (secs(t) + ms(rtt), *p, ProbeOutcome::Reply { rtt: ms(rtt) }),
            None => (secs(t) + ms(900), *p, ProbeOutcome::Lost),
        })
        .collect();
    results.sort_by_key(|(at, _, _)| *at);
    for (at, p, o) in results {
        r.on_probe_result(at, &p, o);
    }
    std::iter::from_fn(|| r.poll_event()).collect()
}

/// What `r` has measured on the candidate path `path` to `dst`.
fn measured<'a>(r: &'a Router, dst: u32, path: &[u32]) -> &'a Measurement {
    r.paths(dst)
        .unwrap()
        .find(|(h, _)| *h == hops(path))
        .map(|(_, m)| m)
        .expect("a candidate path")
}

/// The events of `dst` becoming reachable, routed over `path`.
fn reached(dst: u32, path: &[u32], reason: ChangeReason) -> Vec<RouterEvent> {
    vec![
        RouterEvent::RouteChanged {
            dst,
            path: hops(path),
            reason,
        },
        RouterEvent::Reachable { dst },
    ]
}

fn changed_to(ev: &[RouterEvent]) -> Vec<(Vec<u32>, ChangeReason)> {
    ev.iter()
        .filter_map(|e| match e {
            RouterEvent::RouteChanged { path, reason, .. } => {
                Some((path.as_slice().to_vec(), *reason))
            }
            _ => None,
        })
        .collect()
}

#[test]
fn candidates_are_direct_then_one_then_two_relays() {
    let c = candidate_paths(2, &[2, 3, 4], 1);
    assert_eq!(c, vec![hops(&[2]), hops(&[3, 2]), hops(&[4, 2])]);
    let c = candidate_paths(2, &[3, 4, 5], 2);
    assert_eq!(c.len(), 1 + 3 + 6);
    assert!(c.contains(&hops(&[5, 3, 2])));
    assert!(!c.iter().any(|h| h.as_slice()[..h.len() - 1].contains(&2)));
}

#[test]
fn budget_is_k_per_destination_per_interval_and_direct_is_always_probed() {
    let mut r = Router::new(
        1,
        RoutingConfig {
            selector: SelectorKind::Rnn,
            ..Default::default()
        },
    )
    .unwrap();
    r.set_peers(Duration::ZERO, &(2..40).collect::<Vec<_>>());
    for dst in 2..12 {
        r.add_destination(dst, None);
    }
    let mut probes = Vec::new();
    r.on_tick(secs(0), &mut probes);
    assert_eq!(probes.len(), 10 * 3);
    for dst in 2..12 {
        let mine: Vec<_> = probes.iter().filter(|p| p.dst == dst).collect();
        assert_eq!(mine.len(), 3);
        assert!(mine.iter().any(|p| p.path == hops(&[dst])));
        assert!(mine.iter().all(|p| p.path.last() == dst));
    }
    // A second call within the interval probes nothing more.
    let before = probes.len();
    r.on_tick(ms(500), &mut probes);
    assert_eq!(probes.len(), before);
    assert_eq!(r.poll_timeout(), Some(secs(1)));
    r.on_tick(secs(1), &mut probes);
    assert_eq!(probes.len(), before + 30);
}

#[test]
fn first_answer_makes_the_destination_reachable_route_first() {
    let mut r = router(cfg(), 3);
    assert!(!r.is_reachable(2));
    assert_eq!(r.current_path(2), None);
    // Relay 4 is the fastest; replies arrive in RTT order, so it answers first.
    let ev = step(&mut r, 0, &|h| {
        Some(if h.len() == 2 && h.as_slice()[0] == 4 {
            30
        } else {
            100
        })
    });
    assert_eq!(ev, reached(2, &[4, 2], ChangeReason::Initial));
    assert_eq!(r.current_path(2), Some(hops(&[4, 2])));
    assert_eq!(r.relays(), vec![(2, vec![4])]);
}

#[test]
fn hysteresis_needs_margin_and_hold_time() {
    let mut c = cfg();
    c.hold_ms = 3000;
    c.switch_margin = 0.10;
    let mut r = router(c, 2);
    // Direct 100 ms, relay 3: 95 ms (only 5 % better), relay 4: 300 ms.
    let slight = |h: &Hops| {
        Some(match h.as_slice() {
            [2] => 100,
            [3, 2] => 95,
            _ => 300,
        })
    };
    // Start on the direct path: make it answer first by being alone at t=0.
    let ev = step(&mut r, 0, &|h| (h.len() == 1).then_some(100));
    assert_eq!(changed_to(&ev), vec![(vec![2], ChangeReason::Initial)]);
    for t in 1..20 {
        assert!(
            changed_to(&step(&mut r, t, &slight)).is_empty(),
            "5 % is within the margin"
        );
    }
    // Relay 3 becomes 30 % better: the switch waits for the hold time.
    let better = |h: &Hops| {
        Some(match h.as_slice() {
            [2] => 100,
            [3, 2] => 70,
            _ => 300,
        })
    };
    let mut switched_at = None;
    for t in 20..40 {
        let ch = changed_to(&step(&mut r, t, &better));
        if !ch.is_empty() {
            assert_eq!(ch, vec![(vec![3, 2], ChangeReason::Better)]);
            switched_at = Some(t);
            break;
        }
    }
    // The EWMA needs a few samples to fall below 90 ms, then 3 s of hold.
    let t = switched_at.expect("switched");
    assert!((23..=28).contains(&t), "switched at {t}");
}

#[test]
fn paths_alternating_within_the_margin_do_not_flap() {
    let mut c = cfg();
    c.hold_ms = 2000;
    c.switch_margin = 0.10;
    let mut r = router(c, 2);
    step(&mut r, 0, &|h| (h.len() == 1).then_some(100));
    let mut changes = 0;
    for t in 1..200 {
        // Direct and relay 3 trade places every few seconds by ±8 %.
        let up = (t / 3) % 2 == 0;
        let ev = step(&mut r, t, &|h: &Hops| {
            Some(match h.as_slice() {
                [2] => {
                    if up {
                        104
                    } else {
                        96
                    }
                }
                [3, 2] => {
                    if up {
                        96
                    } else {
                        104
                    }
                }
                _ => 400,
            })
        });
        changes += changed_to(&ev).len();
    }
    assert_eq!(changes, 0);
}

/// Paths to 2: direct 50 ms, via 3 80 ms, via 4 60 ms, others 200 ms.
fn healthy(h: &Hops) -> Option<u64> {
    Some(match h.as_slice() {
        [2] => 50,
        [3, 2] => 80,
        [4, 2] => 60,
        _ => 200,
    })
}

/// A router (three failover losses, `relays` relays) after five healthy
/// intervals: routed direct.
fn healthy_start(relays: u32) -> Router {
    let mut c = cfg();
    c.failover_losses = 3;
    let mut r = router(c, relays);
    for t in 0..5 {
        step(&mut r, t, &healthy);
    }
    assert_eq!(r.current_path(2), Some(hops(&[2])));
    r
}

#[test]
fn failover_is_immediate_after_consecutive_losses() {
    let mut r = healthy_start(3);
    // The direct path dies.
    let broken = |h: &Hops| if h.len() == 1 { None } else { healthy(h) };
    assert!(changed_to(&step(&mut r, 5, &broken)).is_empty());
    assert!(changed_to(&step(&mut r, 6, &broken)).is_empty());
    let ev = step(&mut r, 7, &broken);
    assert_eq!(changed_to(&ev), vec![(vec![4, 2], ChangeReason::Failover)]);
    assert!(r.is_reachable(2));
    assert_eq!(r.stats(2).unwrap().failovers, 1);
}

/// Healthy paths to 2 (direct 50 ms, via 3 80 ms, via 4 60 ms) for five
/// intervals, then keepalives (as the proxy sends them, every 50 ms) on
/// the direct route at 5.00 s, 5.05 s and 5.10 s, answered by `world`.
/// Returns the router and the events of those keepalives.
fn keepalives_after_healthy_start(
    world: &dyn Fn(&Hops) -> Option<u64>,
) -> (Router, Vec<RouterEvent>) {
    let mut r = healthy_start(2);
    assert_eq!(r.poll_timeout(), Some(secs(5)));
    let mut events = Vec::new();
    for k in 0..3 {
        let at = secs(5) + ms(50 * k);
        let outcome = world(&hops(&[2])).map_or(ProbeOutcome::Lost, |rtt| ProbeOutcome::Reply {
            rtt: ms(rtt),
        });
        r.on_path_result(at, 2, &hops(&[2]), outcome);
        events.extend(std::iter::from_fn(|| r.poll_event()));
    }
    (r, events)
}

/// Runs the failover checks the router asked for, sent at `at`, answered by
/// `world` (a loss is known 100 ms later), and returns their paths and
/// the events.
fn run_checks(
    r: &mut Router,
    at: Duration,
    world: &dyn Fn(&Hops) -> Option<u64>,
) -> (Vec<Vec<u32>>, Vec<RouterEvent>) {
    let checks: Vec<ProbeRequest> = std::iter::from_fn(|| r.poll_check()).collect();
    let paths = checks.iter().map(|c| c.path.as_slice().to_vec()).collect();
    let mut results: Vec<(Duration, ProbeRequest, ProbeOutcome)> = checks
        .iter()
        .map(|p| match world(&p.path) {
            Some(rtt) => (at + ms(rtt), *p, ProbeOutcome::Reply { rtt: ms(rtt) }),
            None => (at + ms(100), *p, ProbeOutcome::Lost),
        })
        .collect();
    results.sort_by_key(|(t, _, _)| *t);
    for (t, p, o) in results {
        r.on_probe_result(t, &p, o);
    }
    (paths, std::iter::from_fn(|| r.poll_event()).collect())
}

#[test]
fn a_dead_destination_is_unreachable_one_check_after_the_failover() {
    // Every path ends in the destination, which died: the failover takes
    // the best alternative on the strength of answers from before, and
    // checks every alternative at once instead of spending the loss grace
    // on each in turn.
    let dead = |_: &Hops| None;
    let (mut r, ev) = keepalives_after_healthy_start(&dead);
    assert_eq!(changed_to(&ev), vec![(vec![4, 2], ChangeReason::Failover)]);
    let (mut checked, ev) = run_checks(&mut r, secs(5) + ms(100), &dead);
    checked.sort();
    // The first two losses each asked for the route again; the failover
    // for every alternative.
    assert_eq!(checked, vec![vec![2], vec![2], vec![3, 2], vec![4, 2]]);
    // The checks' losses arrive together: the route may pass through the
    // other alternative before none is left.
    assert_eq!(
        ev.last(),
        Some(&RouterEvent::Unreachable { dst: 2 }),
        "{ev:?}"
    );
    assert!(!r.is_reachable(2));
    let stats = r.stats(2).unwrap();
    assert_eq!(stats.failover_checks, 4);
    assert_eq!(r.poll_check(), None);
}

#[test]
fn a_cut_link_fails_over_once_and_the_checked_route_gets_its_grace_back() {
    let cut = |h: &Hops| match h.as_slice() {
        [2] => None,
        [3, 2] => Some(80),
        _ => Some(60),
    };
    let (mut r, ev) = keepalives_after_healthy_start(&cut);
    assert_eq!(changed_to(&ev), vec![(vec![4, 2], ChangeReason::Failover)]);
    let (_, ev) = run_checks(&mut r, secs(5) + ms(100), &cut);
    assert!(ev.is_empty(), "{ev:?}");
    assert_eq!(r.current_path(2), Some(hops(&[4, 2])));
    // The route answered: one loss no longer moves it.
    r.on_path_result(secs(5) + ms(300), 2, &hops(&[4, 2]), ProbeOutcome::Lost);
    assert_eq!(r.poll_event(), None);
    assert_eq!(r.current_path(2), Some(hops(&[4, 2])));
}

#[test]
fn a_route_taken_in_a_failover_moves_on_at_its_first_loss_until_it_answers() {
    // The best alternative (via 4) went down with the direct path; via 3
    // works.
    let world = |h: &Hops| (h.as_slice() == [3, 2]).then_some(80);
    let (mut r, ev) = keepalives_after_healthy_start(&world);
    assert_eq!(changed_to(&ev), vec![(vec![4, 2], ChangeReason::Failover)]);
    let (_, ev) = run_checks(&mut r, secs(5) + ms(100), &world);
    assert_eq!(changed_to(&ev), vec![(vec![3, 2], ChangeReason::Failover)]);
    assert!(r.is_reachable(2));
    // The second failover of the episode asked for no new checks (two
    // losses on the first route asked for it again, the failover for its
    // two alternatives).
    assert_eq!(r.stats(2).unwrap().failover_checks, 4);
    assert_eq!(r.poll_check(), None);
}

#[test]
fn routes_relayed_through_a_proxy_found_unreachable_fail_over_with_it() {
    // 2 is reached through 3 (direct is slow); 3 dies.
    let mut c = cfg();
    c.failover_losses = 3;
    let mut r = Router::new(1, c).unwrap();
    r.set_peers(Duration::ZERO, &[2, 3, 4]);
    r.add_destination(2, None);
    r.add_destination(3, None);
    let healthy = |h: &Hops| {
        Some(match h.as_slice() {
            [2] => 200,
            [3, 2] => 60,
            [4, 2] => 150,
            [3] => 20,
            [4, 3] => 40,
            _ => 300,
        })
    };
    for t in 0..5 {
        step(&mut r, t, &healthy);
    }
    assert_eq!(r.current_path(2), Some(hops(&[3, 2])));
    assert_eq!(r.current_path(3), Some(hops(&[3])));
    let dead3 = |h: &Hops| {
        if h.as_slice().contains(&3) {
            None
        } else {
            healthy(h)
        }
    };
    let mut events = Vec::new();
    for k in 0..3 {
        r.on_path_result(secs(5) + ms(50 * k), 3, &hops(&[3]), ProbeOutcome::Lost);
        events.extend(std::iter::from_fn(|| r.poll_event()));
    }
    assert_eq!(
        changed_to(&events),
        vec![(vec![4, 3], ChangeReason::Failover)]
    );
    // The checks find 3 dead; the route to 2 through it goes with it, in
    // the same step, without losses of its own.
    let (_, ev) = run_checks(&mut r, secs(5) + ms(100), &dead3);
    let gone = ev
        .iter()
        .position(|e| *e == RouterEvent::Unreachable { dst: 3 })
        .unwrap_or_else(|| panic!("{ev:?}"));
    assert_eq!(
        changed_to(&ev[gone..]),
        vec![(vec![4, 2], ChangeReason::Failover)],
        "{ev:?}"
    );
    assert_eq!(measured(&r, 2, &[3, 2]).consecutive_losses(), 0);
    // 2's new route is checked like any failover's.
    let (checked, ev) = run_checks(&mut r, secs(5) + ms(200), &dead3);
    assert!(checked.contains(&vec![4, 2]), "{checked:?}");
    assert!(ev.is_empty(), "{ev:?}");
    assert_eq!(r.current_path(2), Some(hops(&[4, 2])));
}

#[test]
fn unreachable_when_nothing_works_and_back_when_a_path_answers() {
    let mut r = router(cfg(), 2);
    for t in 0..3 {
        step(&mut r, t, &|_| Some(40));
    }
    assert!(r.is_reachable(2));
    let mut events = Vec::new();
    for t in 3..8 {
        events.extend(step(&mut r, t, &|_| None));
    }
    assert_eq!(events, vec![RouterEvent::Unreachable { dst: 2 }]);
    assert!(!r.is_reachable(2));
    assert_eq!(r.current_path(2), None);
    assert!(r.relays().is_empty());
    // Only relay 3 comes back.
    let ev = step(&mut r, 8, &|h| (h.as_slice() == [3, 2]).then_some(70));
    assert_eq!(ev, reached(2, &[3, 2], ChangeReason::Restored));
}

#[test]
fn loss_policy_avoids_a_lossy_fast_path() {
    let mut c = cfg();
    c.policy = Policy::Loss;
    let mut r = router(c, 1);
    // Direct: 50 ms but every 10th probe lost; relay 3: 250 ms, clean.
    let mut changes = Vec::new();
    for t in 0..60u64 {
        let ev = step(&mut r, t, &|h: &Hops| match h.as_slice() {
            [2] => (t % 10 != 5).then_some(50),
            _ => Some(250),
        });
        changes.extend(changed_to(&ev));
    }
    assert_eq!(r.current_path(2), Some(hops(&[3, 2])), "{changes:?}");
    // Under Latency the same world keeps the fast path.
    let mut r = router(cfg(), 1);
    for t in 0..60u64 {
        step(&mut r, t, &|h: &Hops| match h.as_slice() {
            [2] => (t % 10 != 5).then_some(50),
            _ => Some(250),
        });
    }
    assert_eq!(r.current_path(2), Some(hops(&[2])));
}

#[test]
fn relays_name_each_destination_and_its_relays() {
    let mut r = Router::new(1, cfg()).unwrap();
    r.set_peers(Duration::ZERO, &[2, 3, 4]);
    r.add_destination(2, None);
    r.add_destination(4, None);
    step(&mut r, 0, &|h: &Hops| {
        Some(match h.as_slice() {
            [3, 2] => 20,
            [4] => 10,
            _ => 90,
        })
    });
    // What the proxy lays over its forwarding table: (to, relays).
    assert_eq!(r.relays(), vec![(2, vec![3]), (4, vec![])]);
}

#[test]
fn topology_changes_keep_measurements_and_move_a_vanished_route() {
    let mut r = router(cfg(), 3);
    let w = |h: &Hops| {
        Some(match h.as_slice() {
            [3, 2] => 20,
            [4, 2] => 30,
            _ => 90,
        })
    };
    for t in 0..3 {
        step(&mut r, t, &w);
    }
    assert_eq!(r.current_path(2), Some(hops(&[3, 2])));
    // Relay 3 leaves the overlay.
    r.set_peers(ms(3500), &[2, 4, 5]);
    let ev: Vec<_> = std::iter::from_fn(|| r.poll_event()).collect();
    assert_eq!(changed_to(&ev), vec![(vec![4, 2], ChangeReason::Topology)]);
    let kept = measured(&r, 2, &[4, 2]).rtt_ms();
    assert_eq!(kept, Some(30.0));
}

#[test]
fn stray_results_are_ignored_and_lookup_by_path_works() {
    let mut r = router(cfg(), 2);
    r.on_path_result(secs(0), 9, &hops(&[9]), ProbeOutcome::Reply { rtt: ms(5) });
    r.on_path_result(
        secs(0),
        2,
        &hops(&[7, 2]),
        ProbeOutcome::Reply { rtt: ms(5) },
    );
    assert!(r.poll_event().is_none());
    r.on_path_result(
        secs(0),
        2,
        &hops(&[3, 2]),
        ProbeOutcome::Reply { rtt: ms(5) },
    );
    assert_eq!(r.current_path(2), Some(hops(&[3, 2])));
    r.on_bandwidth(secs(0), 2, &hops(&[3, 2]), 250.0);
    let bw = measured(&r, 2, &[3, 2]).bandwidth_mbps();
    assert_eq!(bw, Some(250.0));
    r.remove_destination(2);
    assert!(!r.is_reachable(2));
    assert_eq!(r.destinations().count(), 0);
}

#[test]
fn a_router_of_id_zero_or_with_a_bad_config_is_refused() {
    assert!(matches!(
        Router::new(0, RoutingConfig::default()),
        Err(RouterError::ZeroId)
    ));
    let bad = RoutingConfig {
        probes_per_interval: 0,
        ..Default::default()
    };
    assert!(matches!(Router::new(1, bad), Err(RouterError::Config(_))));
}

/// With 40 relays, one of which is far better than the direct path, a
/// budget of 3 finds it: the learners in well under the 40 intervals a
/// round-robin would need on average... and the RNN keeps using it.
#[test]
fn learners_find_the_one_good_relay() {
    for kind in [SelectorKind::Rnn, SelectorKind::Bandit] {
        let mut found = Vec::new();
        for seed in 0..10 {
            // Every interval: a steady destination explores at half the
            // rate, and may take far longer to find a better relay once
            // it settled on a mediocre one.
            let c = RoutingConfig {
                selector: kind,
                seed,
                hold_ms: 1000,
                steady_every: 1,
                ..Default::default()
            };
            let mut r = router(c, 40);
            let good = 3 + (seed as u32 * 7) % 40;
            let w = move |h: &Hops| {
                Some(match h.as_slice() {
                    [2] => 200,
                    [x, 2] if *x == good => 60,
                    [x, 2] => 150 + u64::from(*x % 5) * 30,
                    _ => unreachable!(),
                })
            };
            let mut at = None;
            for t in 0..200 {
                step(&mut r, t, &w);
                if at.is_none() && r.current_path(2) == Some(hops(&[good, 2])) {
                    at = Some(t);
                }
            }
            assert_eq!(
                r.current_path(2),
                Some(hops(&[good, 2])),
                "{kind:?} seed {seed}"
            );
            found.push(at.unwrap());
        }
        let mean = found.iter().sum::<u64>() as f64 / found.len() as f64;
        assert!(mean < 60.0, "{kind:?}: {found:?}");
    }
}

proptest! {
    /// Whatever the world does, the router keeps its promises: at most k
    /// probes per destination per interval (the direct path among them),
    /// routes that are candidates of their destination, Reachable only after
    /// a route, and identical runs for identical seeds.
    #[test]
    fn invariants_hold_under_arbitrary_outcomes(
        seed in 0u64..1000,
        k in 1usize..5,
        kind in prop_oneof![Just(SelectorKind::Rnn), Just(SelectorKind::Bandit), Just(SelectorKind::Random)],
        steady_every in 1u32..4,
        steady_after_ms in prop_oneof![Just(0u64), Just(3000), Just(10_000)],
        script in proptest::collection::vec(proptest::collection::vec(proptest::option::of(1u64..400), 12), 1..40),
    ) {
        let run = || {
            let c = RoutingConfig { selector: kind, seed, probes_per_interval: k, hold_ms: 2000, steady_every, steady_after_ms, ..Default::default() };
            let mut r = Router::new(1, c).unwrap();
            r.set_peers(Duration::ZERO, &[2, 3, 4, 5, 6, 7, 8]);
            r.add_destination(2, None);
            r.add_destination(5, Some(Policy::Loss));
            let mut log = Vec::new();
            // Intervals in a row each destination went without a probe.
            let mut unprobed = [0u32; 2];
            for (t, row) in script.iter().enumerate() {
                let mut probes = Vec::new();
                r.on_tick(secs(t as u64), &mut probes);
                for (i, dst) in [2, 5].into_iter().enumerate() {
                    let n = probes.iter().filter(|p| p.dst == dst).count();
                    assert!(n <= k);
                    if n == 0 {
                        // Only a steady destination skips, and never
                        // `steady_every` intervals in a row.
                        unprobed[i] += 1;
                        assert!(unprobed[i] < steady_every, "{dst} unprobed {} intervals", unprobed[i]);
                        continue;
                    }
                    unprobed[i] = 0;
                    assert!(probes.iter().any(|p| p.dst == dst && p.path.len() == 1) || k == 1);
                }
                for p in &probes {
                    let o = match row[p.index as usize % row.len()] {
                        Some(rtt) => ProbeOutcome::Reply { rtt: ms(rtt) },
                        None => ProbeOutcome::Lost,
                    };
                    r.on_probe_result(secs(t as u64) + ms(500), p, o);
                }
                while let Some(e) = r.poll_event() {
                    log.push(e);
                    if let RouterEvent::RouteChanged { dst, path, .. } = e {
                        assert_eq!(path.last(), dst);
                        assert!(r.paths(dst).unwrap().any(|(h, _)| h == path));
                    }
                }
                for dst in [2, 5] {
                    if let Some(p) = r.current_path(dst) {
                        assert_eq!(p.last(), dst);
                    }
                }
            }
            log
        };
        let a = run();
        let b = run();
        prop_assert_eq!(&a, &b);
        // Event grammar per destination: Reachable is preceded by a route,
        // and Reachable/Unreachable alternate starting with Reachable.
        for dst in [2, 5] {
            let mut have_route = false;
            let mut up = false;
            for e in &a {
                match *e {
                    RouterEvent::RouteChanged { dst: d, .. } if d == dst => have_route = true,
                    RouterEvent::Reachable { dst: d } if d == dst => {
                        prop_assert!(have_route && !up);
                        up = true;
                    }
                    RouterEvent::Unreachable { dst: d } if d == dst => {
                        prop_assert!(up);
                        up = false;
                    }
                    _ => {}
                }
            }
        }
    }
}

/// `fresh_paths` reads the short list, yet names exactly the candidates a
/// scan of all of them finds answered within `fresh`, in index order.
#[test]
fn fresh_paths_are_the_recently_answered_candidates() {
    let mut r = router(
        RoutingConfig {
            selector: SelectorKind::Random,
            ..cfg()
        },
        12,
    );
    let fresh = r.config().fresh();
    // Paths answer or not by their index; random probing spreads the
    // answers over time, so some go stale while others are fresh.
    let world =
        |h: &Hops| (!h.as_slice()[0].is_multiple_of(3)).then_some(20 + u64::from(h.as_slice()[0]));
    for t in 0..40 {
        step(&mut r, t, &world);
        let now = secs(t) + ms(500);
        let scan: Vec<(u32, Hops)> = r
            .paths(2)
            .unwrap()
            .enumerate()
            .filter(|(_, (_, m))| {
                m.last_reply()
                    .is_some_and(|x| now.saturating_sub(x) <= fresh)
            })
            .map(|(i, (h, _))| (i as u32, h))
            .collect();
        assert_eq!(r.fresh_paths(now, 2), scan, "t = {t}");
    }
    assert!(r.fresh_paths(secs(1000), 2).is_empty());
    assert!(r.fresh_paths(secs(1), 99).is_empty());
}

/// Probes per interval towards 2 over `intervals` seconds from `from`.
fn probes_per_interval(
    r: &mut Router,
    from: u64,
    intervals: u64,
    world: &dyn Fn(&Hops) -> Option<u64>,
) -> Vec<usize> {
    (from..from + intervals)
        .map(|t| {
            let mut probes = Vec::new();
            r.on_tick(secs(t), &mut probes);
            for p in &probes {
                let o = world(&p.path).map_or(ProbeOutcome::Lost, |rtt| ProbeOutcome::Reply {
                    rtt: ms(rtt),
                });
                r.on_probe_result(secs(t) + ms(100), p, o);
            }
            while r.poll_event().is_some() {}
            while r.poll_check().is_some() {}
            probes.len()
        })
        .collect()
}

#[test]
fn a_steady_destination_probes_every_other_interval_until_unsettled() {
    let c = RoutingConfig {
        steady_after_ms: 5000,
        ..cfg()
    };
    assert_eq!(RoutingConfig::default().steady_every, 2);
    let mut r = router(
        RoutingConfig {
            steady_every: 2,
            ..c
        },
        3,
    );
    // Settled from the first route (interval 0): every interval until 5 s,
    // then every other one.
    let n = probes_per_interval(&mut r, 0, 12, &healthy);
    assert!(n[..6].iter().all(|&n| n > 0), "{n:?}");
    assert_eq!(n[6..].iter().filter(|&&n| n == 0).count(), 3, "{n:?}");
    assert!(
        n[6..].windows(2).all(|w| (w[0] == 0) != (w[1] == 0)),
        "{n:?}"
    );
    // A loss on the route unsettles it: every interval again, for
    // `steady_after`.
    let mut probes = Vec::new();
    let t = (12..14).find(|&t| {
        probes.clear();
        r.on_tick(secs(t), &mut probes);
        !probes.is_empty()
    });
    let t = t.expect("probes within two intervals");
    for p in probes.clone() {
        let o = if p.path.len() == 1 {
            ProbeOutcome::Lost
        } else {
            ProbeOutcome::Reply { rtt: ms(80) }
        };
        r.on_probe_result(secs(t) + ms(100), &p, o);
    }
    // The loss asked for the route again at once.
    let check = r.poll_check().expect("a check of the route");
    assert_eq!(check.path, hops(&[2]));
    r.on_probe_result(
        secs(t) + ms(200),
        &check,
        ProbeOutcome::Reply { rtt: ms(50) },
    );
    assert_eq!(
        r.current_path(2),
        Some(hops(&[2])),
        "one loss is no failover"
    );
    let n = probes_per_interval(&mut r, t + 1, 5, &healthy);
    assert!(n.iter().all(|&n| n > 0), "{n:?}");
}

#[test]
fn an_idle_route_that_died_fails_over_within_a_few_probe_timeouts() {
    // Learning probes only (no keepalives): the first loss on the route
    // asks for it again, each loss of those checks for another, and the
    // third fails over before the next interval would have probed it.
    let mut r = healthy_start(3);
    let mut probes = Vec::new();
    r.on_tick(secs(5), &mut probes);
    let direct = *probes
        .iter()
        .find(|p| p.path.len() == 1)
        .expect("the route is probed");
    let mut at = secs(5) + ms(300);
    r.on_probe_result(at, &direct, ProbeOutcome::Lost);
    for _ in 0..2 {
        let check = r.poll_check().expect("the route asked for again");
        assert_eq!(check.path, hops(&[2]));
        at += ms(300);
        r.on_probe_result(at, &check, ProbeOutcome::Lost);
    }
    let ev: Vec<RouterEvent> = std::iter::from_fn(|| r.poll_event()).collect();
    assert_eq!(changed_to(&ev), vec![(vec![4, 2], ChangeReason::Failover)]);
    assert!(at < secs(6));
}
