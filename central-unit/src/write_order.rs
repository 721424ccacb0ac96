//! The order of a replica's etcd writes, without I/O: many in flight at
//! once (etcd commits concurrent transactions together, one disk sync for
//! many), but one at a time per lane: per agent, per token, per
//! enrolment.
//!
//! One write per agent at a time: a write is built from what the previous
//! one of the same agent left (`Replica::write_for` after
//! `Replica::done`), and a later registration must not land before an
//! earlier leave. Writes of one token or enrolment are puts of one key:
//! the last must land last.
//!
//! Written one transaction at a time, a replica wrote slower than agents
//! enrolled and registered: under a join storm its writes queued for tens
//! of seconds, and the other replicas heard of a join only after them.

use std::collections::{HashMap, HashSet, VecDeque};
use std::hash::Hash;

/// What a write must follow: the earlier writes of its lane.
pub type Lane = u64;

/// The lane of agent `id`'s writes.
pub fn agent_lane(id: u32) -> Lane {
    u64::from(id)
}

/// The lane of the writes of one key that is no agent's (a token's hash,
/// an enrolment's key): apart from the agents' lanes (two keys sharing a
/// lane only wait for each other).
pub fn key_lane(key: &[u8; 32]) -> Lane {
    let mut b = [0u8; 8];
    b.copy_from_slice(&key[..8]);
    u64::from_le_bytes(b) | 1 << 63
}

#[derive(Debug)]
pub struct WriteOrder<K, T> {
    max_in_flight: usize,
    in_flight: usize,
    /// Lanes with a write in flight or in `ready`.
    active: HashSet<K>,
    /// Writes whose lane has no earlier write pending, in arrival order.
    ready: VecDeque<(K, T)>,
    /// Later writes of an active lane, in order.
    behind: HashMap<K, VecDeque<T>>,
}

impl<K: Hash + Eq + Copy, T> WriteOrder<K, T> {
    pub fn new(max_in_flight: usize) -> Self {
        WriteOrder {
            max_in_flight: max_in_flight.max(1),
            in_flight: 0,
            active: HashSet::new(),
            ready: VecDeque::new(),
            behind: HashMap::new(),
        }
    }

    /// Writes in flight (taken, not yet completed).
    pub fn in_flight(&self) -> usize {
        self.in_flight
    }

    /// Writes not yet taken.
    pub fn waiting(&self) -> usize {
        self.ready.len() + self.behind.values().map(VecDeque::len).sum::<usize>()
    }

    pub fn push(&mut self, lane: K, item: T) {
        if self.active.insert(lane) {
            self.ready.push_back((lane, item));
        } else {
            self.behind.entry(lane).or_default().push_back(item);
        }
    }

    /// The next write to start, if one may start now.
    pub fn take(&mut self) -> Option<(K, T)> {
        if self.in_flight >= self.max_in_flight {
            return None;
        }
        let next = self.ready.pop_front()?;
        self.in_flight += 1;
        Some(next)
    }

    /// A taken write is done (landed, or not this replica's to write): the
    /// next of its lane may start.
    pub fn complete(&mut self, lane: K) {
        self.in_flight = self.in_flight.saturating_sub(1);
        match self.behind.get_mut(&lane).and_then(VecDeque::pop_front) {
            Some(next) => self.ready.push_back((lane, next)),
            None => {
                self.behind.remove(&lane);
                self.active.remove(&lane);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn one_write_per_lane_in_order() {
        let mut q = WriteOrder::new(8);
        q.push(1, "a1");
        q.push(1, "a1'");
        q.push(2, "b");
        assert_eq!(q.take(), Some((1, "a1")));
        assert_eq!(q.take(), Some((2, "b")));
        assert_eq!(q.take(), None, "a1' waits for a1");
        q.complete(1);
        assert_eq!(q.take(), Some((1, "a1'")));
        q.complete(2);
        q.complete(1);
        assert_eq!(q.waiting() + q.in_flight(), 0);
    }

    #[test]
    fn at_most_the_limit_in_flight() {
        let mut q = WriteOrder::new(2);
        for id in 0..5u64 {
            q.push(id, id);
        }
        assert!(q.take().is_some() && q.take().is_some());
        assert_eq!(q.take(), None);
        q.complete(0);
        assert_eq!(q.take(), Some((2, 2)));
    }

    #[test]
    fn agents_and_keys_keep_apart() {
        assert_ne!(agent_lane(u32::MAX), key_lane(&[0; 32]));
        assert_eq!(key_lane(&[7; 32]), key_lane(&[7; 32]));
    }

    #[derive(Debug, Clone)]
    enum Step {
        Push(u8),
        Take,
        /// Complete the in-flight write at this index (modulo).
        Complete(usize),
    }

    fn step() -> impl Strategy<Value = Step> {
        prop_oneof![
            4 => (0u8..6).prop_map(Step::Push),
            4 => Just(Step::Take),
            3 => any::<usize>().prop_map(Step::Complete),
        ]
    }

    /// What the test saw: each write's lane, what is in flight, taken.
    #[derive(Default)]
    struct Model {
        lanes: Vec<u8>,
        flying: Vec<(u8, u32)>,
        taken: HashSet<u32>,
    }

    impl Model {
        /// Checks a write the order let start against the rules.
        fn started(&mut self, lane: u8, n: u32, max: usize) -> Result<(), TestCaseError> {
            prop_assert_eq!(lane, self.lanes[n as usize]);
            prop_assert!(self.flying.len() < max, "over the limit");
            prop_assert!(
                self.flying.iter().all(|(l, _)| *l != lane),
                "two of one lane in flight"
            );
            for m in 0..n {
                if self.lanes[m as usize] == lane {
                    prop_assert!(self.taken.contains(&m), "{} overtook {}", n, m);
                }
            }
            self.flying.push((lane, n));
            self.taken.insert(n);
            Ok(())
        }

        fn complete(&mut self, q: &mut WriteOrder<u8, u32>, i: usize) {
            let (lane, _) = self.flying.remove(i % self.flying.len());
            q.complete(lane);
        }
    }

    proptest! {
        /// Against the rules: never two writes of one lane in flight, each
        /// lane's writes in push order, the limit holds, and everything is
        /// taken in the end.
        #[test]
        fn order_holds(steps in prop::collection::vec(step(), 1..200), max in 1usize..5) {
            let mut q = WriteOrder::new(max);
            let mut m = Model::default();
            for s in steps {
                match s {
                    Step::Push(lane) => {
                        q.push(lane, m.lanes.len() as u32);
                        m.lanes.push(lane);
                    }
                    Step::Take => {
                        if let Some((lane, n)) = q.take() {
                            m.started(lane, n, max)?;
                        }
                    }
                    Step::Complete(i) if !m.flying.is_empty() => m.complete(&mut q, i),
                    Step::Complete(_) => {}
                }
            }
            loop {
                while let Some((lane, n)) = q.take() {
                    m.started(lane, n, max)?;
                }
                if m.flying.is_empty() {
                    break;
                }
                m.complete(&mut q, 0);
            }
            prop_assert_eq!(m.taken.len(), m.lanes.len(), "some never started");
            prop_assert_eq!(q.waiting(), 0);
            prop_assert_eq!(q.in_flight(), 0);
        }
    }
}
