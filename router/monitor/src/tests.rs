use super::*;

fn ms(x: u64) -> Duration {
    Duration::from_millis(x)
}

fn hops(h: &[u32]) -> Hops {
    Hops::new(h).unwrap()
}

/// What the forwarders along the route do: move the hop index to the last
/// hop (transit), where the packet is for that proxy's monitor.
fn deliver(bytes: &[u8]) -> Vec<u8> {
    let mut v = bytes.to_vec();
    let mut p = pon::Packet::new_checked(&mut v[..]).unwrap();
    while p.advance().is_some() {}
    v
}

/// Everything the monitor queued to send.
fn sent(m: &mut Monitor) -> Vec<Transmit> {
    std::iter::from_fn(|| m.poll_transmit()).collect()
}

/// The one packet a call queued.
fn one(m: &mut Monitor) -> Transmit {
    let mut v = sent(m);
    assert_eq!(v.len(), 1, "{v:?}");
    v.pop().unwrap()
}

/// `m` handles a packet that ended at it; returns the answer it queued.
fn answer(m: &mut Monitor, now: Duration, bytes: &[u8]) -> Option<Transmit> {
    m.handle_packet(now, bytes);
    let mut v = sent(m);
    assert!(v.len() <= 1, "{v:?}");
    v.pop()
}

fn tag(x: u32) -> ProbeTag {
    ProbeTag::learning(2, x)
}

fn monitors() -> (Monitor, Monitor, Monitor) {
    let cfg = MonitorConfig::default();
    (
        Monitor::new(1, 0xa1, cfg.clone()),
        Monitor::new(2, 0xb2, cfg.clone()),
        Monitor::new(3, 0xc3, cfg),
    )
}

#[test]
fn relayed_probe_is_answered_along_the_reversed_route() {
    let (mut a, mut b, _) = monitors();
    let path = hops(&[3, 2]);
    a.probe(ms(0), path, tag(42)).unwrap();
    let s = one(&mut a);
    assert_eq!(s.first_hop, 3);
    let at_b = deliver(&s.bytes);
    let reply = answer(&mut b, ms(20), &at_b).expect("b must answer");
    assert_eq!(reply.first_hop, 3, "back through the relay");
    let p = pon::Packet::new_checked(&reply.bytes[..]).unwrap();
    assert_eq!(p.kind(), Kind::ProbeReply);
    assert_eq!(p.hop(1), 1, "ends at the probe's source");
    assert_eq!(p.source(), 2);
    let body = probe::Packet::new_checked(p.payload()).unwrap();
    assert_eq!(body.reply_rx_ns(), 20_000_000);
    assert_eq!(answer(&mut a, ms(41), &deliver(&reply.bytes)), None);
    assert_eq!(
        a.poll_event(),
        Some(MonitorEvent::Probe {
            tag: tag(42),
            path,
            outcome: ProbeOutcome::Reply { rtt: ms(41) }
        })
    );
    let st = a.stats(ms(41), &path).unwrap();
    assert_eq!(st.received, 1);
    assert_eq!(st.p50_us.map(|u| u / 1000), Some(41));
    assert_eq!(a.counters.replies.get(), 1);
    assert_eq!(b.counters.answered.get(), 1);
}

#[test]
fn unanswered_probes_time_out_as_losses_and_late_replies_are_ignored() {
    let (mut a, mut b, _) = monitors();
    let path = hops(&[2]);
    a.probe(ms(0), path, tag(7)).unwrap();
    let s = one(&mut a);
    assert_eq!(a.poll_timeout(), Some(ms(1000)), "initial timeout");
    a.handle_timeout(ms(999));
    assert_eq!(a.poll_event(), None);
    a.handle_timeout(ms(1000));
    assert_eq!(
        a.poll_event(),
        Some(MonitorEvent::Probe {
            tag: tag(7),
            path,
            outcome: ProbeOutcome::Lost
        })
    );
    let r = answer(&mut b, ms(1100), &deliver(&s.bytes)).unwrap();
    a.handle_packet(ms(1200), &deliver(&r.bytes));
    assert_eq!(a.poll_event(), None);
    assert_eq!(a.counters.late.get(), 1);
    assert_eq!(a.stats(ms(1200), &path).unwrap().loss, 1.0);
}

#[test]
fn replies_of_another_session_or_from_the_wrong_proxy_do_not_count() {
    let (mut a, mut b, mut c) = monitors();
    a.probe(ms(0), hops(&[2]), tag(1)).unwrap();
    let s = one(&mut a);
    // A restarted monitor (new session) gets the old run's reply.
    let mut a2 = Monitor::new(1, 0xdead, MonitorConfig::default());
    let r = answer(&mut b, ms(5), &deliver(&s.bytes)).unwrap();
    a2.handle_packet(ms(10), &deliver(&r.bytes));
    assert_eq!(a2.poll_event(), None);
    assert_eq!(a2.counters.late.get(), 1);
    // A probe to 2 answered by 3 (a forged or misrouted reply).
    let mut forged = s.bytes.clone();
    let mut h = pon::Repr::parse(&pon::Packet::new_checked(&forged[..]).unwrap()).unwrap();
    h.hops = hops(&[3]);
    h.emit(&mut forged).unwrap();
    let r = answer(&mut c, ms(5), &forged).unwrap();
    a.handle_packet(ms(10), &deliver(&r.bytes));
    assert_eq!(a.poll_event(), None);
    assert_eq!(a.counters.bad_packets.get(), 1);
}

#[test]
fn probes_not_for_us_and_garbage_are_counted() {
    let (mut a, mut b, _) = monitors();
    a.probe(ms(0), hops(&[3, 2]), tag(1)).unwrap();
    let s = one(&mut a);
    // Still at hop index 0 (meant for 3): 2 must not answer it.
    assert_eq!(answer(&mut b, ms(1), &s.bytes), None);
    assert_eq!(answer(&mut b, ms(1), &[1, 2, 3]), None);
    assert_eq!(b.counters.bad_packets.get(), 2);
    assert_eq!(a.probe(ms(0), hops(&[1]), tag(1)), Err(Refused::BadPath));
    assert!(sent(&mut a).is_empty());
}

#[test]
fn periodic_probes_keep_their_rate_and_the_budget_caps_everything() {
    let cfg = MonitorConfig {
        max_probes_per_sec: 100,
        ..Default::default()
    };
    let mut a = Monitor::new(1, 1, cfg);
    let path = hops(&[2]);
    a.set_rate(ms(0), path, ProbeTag::keepalive(2), Some(ms(50)));
    let mut n = 0;
    for t in 0..=1000 {
        a.handle_timeout(ms(t));
        n += sent(&mut a).len();
    }
    assert_eq!(n, 21, "every 50 ms for one second");
    a.set_rate(ms(1000), path, ProbeTag::keepalive(2), None);
    // On-demand probes beyond 100/s (burst 32) are refused and counted.
    let mut ok = 0;
    for i in 0..200 {
        if a.probe(ms(2000) + Duration::from_micros(i * 100), path, tag(0))
            .is_ok()
        {
            ok += 1;
        }
    }
    assert!((32..=35).contains(&ok), "{ok}");
    assert_eq!(a.counters.refused_budget.get(), 200 - ok as u64);
    assert_eq!(sent(&mut a).len(), ok, "only admitted probes are queued");
}

#[test]
fn a_rate_is_a_floor_other_probes_on_the_path_postpone_it() {
    let mut a = Monitor::new(1, 1, MonitorConfig::default());
    let (watched, other) = (hops(&[2]), hops(&[3, 2]));
    a.set_rate(ms(0), watched, ProbeTag::keepalive(2), Some(ms(1000)));
    let mut keepalives = 0;
    for t in 0..=10_000u64 {
        // A learning probe on the watched path every 800 ms, and on
        // another path every 300 ms (which must not postpone anything).
        if t % 800 == 400 {
            a.probe(ms(t), watched, tag(0)).unwrap();
        }
        if t % 300 == 0 {
            a.probe(ms(t), other, tag(1)).unwrap();
        }
        a.handle_timeout(ms(t));
        keepalives += sent(&mut a).iter().filter(|s| s.first_hop == 2).count();
    }
    let learning = (0..=10_000u64).filter(|t| t % 800 == 400).count();
    // The first keepalive at 0; after the first learning probe (400 ms) the
    // watched path is never 1 s without a probe, so no keepalive again.
    assert_eq!(keepalives, learning + 1);
    // Once learning stops, the keepalives come back at their period.
    let mut later = 0;
    for t in 10_001..=15_000u64 {
        a.handle_timeout(ms(t));
        later += sent(&mut a).iter().filter(|s| s.first_hop == 2).count();
    }
    // The last learning probe went at 9.2 s: keepalives at 10.2 ... 14.2 s.
    assert_eq!(later, 5);
}

#[test]
fn packet_train_gives_the_bottleneck_rate() {
    let (mut a, mut b, _) = monitors();
    let path = hops(&[2]);
    a.bandwidth(ms(0), path, ProbeTag::bandwidth(2, 5)).unwrap();
    let train = sent(&mut a);
    assert_eq!(train.len(), 16);
    // Packets arrive at b spaced by a 100 Mbit/s bottleneck.
    let wire = train[0].bytes.len() + pon_proto::ip::UDP_OVERHEAD;
    let gap_ns = (wire as f64 * 8.0 / 100e6 * 1e9) as u64;
    for (i, s) in train.iter().enumerate() {
        let at = Duration::from_nanos(10_000_000 + i as u64 * gap_ns);
        let r = answer(&mut b, at, &deliver(&s.bytes)).unwrap();
        a.handle_packet(at + ms(10), &deliver(&r.bytes));
    }
    let Some(MonitorEvent::Bandwidth {
        tag, mbps, packets, ..
    }) = a.poll_event()
    else {
        panic!("one bandwidth event")
    };
    assert_eq!(tag, ProbeTag::bandwidth(2, 5));
    assert_eq!(packets, 16);
    let mbps = mbps.unwrap();
    assert!((mbps - 100.0).abs() < 1.0, "{mbps}");
    assert!((a.stats(ms(100), &path).unwrap().bandwidth_mbps.unwrap() - mbps).abs() < 1e-9);
}

#[test]
fn a_train_with_losses_still_measures_from_what_arrived() {
    let (mut a, mut b, _) = monitors();
    let path = hops(&[2]);
    a.bandwidth(ms(0), path, ProbeTag::bandwidth(2, 5)).unwrap();
    let train = sent(&mut a);
    for (i, s) in train.iter().enumerate().filter(|(i, _)| i % 2 == 0) {
        let at = Duration::from_micros(1000 + i as u64 * 100);
        let r = answer(&mut b, at, &deliver(&s.bytes)).unwrap();
        a.handle_packet(at + ms(1), &deliver(&r.bytes));
    }
    assert_eq!(a.poll_event(), None, "half the train still pending");
    a.handle_timeout(ms(5000));
    let Some(MonitorEvent::Bandwidth { mbps: Some(m), .. }) = a.poll_event() else {
        panic!("the train completes through timeouts")
    };
    assert!(m > 0.0);
}
