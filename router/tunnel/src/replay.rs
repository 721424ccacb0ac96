//! The sliding replay window of a session's receive side (RFC 6479's
//! bitmap, as WireGuard uses): a counter is accepted once, and only if it
//! is newer than the window's oldest edge.

/// Counters this far behind the newest one seen are still accepted once,
/// so packets reordered by relays or ECMP are not lost; older ones are not.
pub const WINDOW: u64 = 8192;
const WORD_BITS: u64 = 64;
const WORDS: usize = (WINDOW / WORD_BITS) as usize + 1;

#[derive(Debug, Clone)]
pub struct ReplayWindow {
    /// One past the newest counter accepted (0: none yet).
    next: u64,
    bits: [u64; WORDS],
}

impl Default for ReplayWindow {
    fn default() -> Self {
        ReplayWindow {
            next: 0,
            bits: [0; WORDS],
        }
    }
}

impl ReplayWindow {
    /// Whether `counter` would be accepted, without recording it: checked
    /// before the (costly) authentication so a replay costs no crypto.
    pub fn may_accept(&self, counter: u64) -> bool {
        if counter >= self.next {
            return true;
        }
        if self.next - counter > WINDOW {
            return false;
        }
        let (word, bit) = Self::slot(counter);
        self.bits[word] & bit == 0
    }

    /// Records `counter` (after the packet authenticated); false if it was
    /// a replay or too old.
    pub fn accept(&mut self, counter: u64) -> bool {
        if !self.may_accept(counter) {
            return false;
        }
        if counter >= self.next {
            // Clear the words the window slides over (after the newest
            // counter's word), then move its edge.
            let old_word = self.next.saturating_sub(1) / WORD_BITS;
            let new_word = counter / WORD_BITS;
            let clear = (new_word - old_word).min(WORDS as u64);
            for i in 1..=clear {
                self.bits[((old_word + i) % WORDS as u64) as usize] = 0;
            }
            self.next = counter + 1;
        }
        let (word, bit) = Self::slot(counter);
        self.bits[word] |= bit;
        true
    }

    fn slot(counter: u64) -> (usize, u64) {
        (
            ((counter / WORD_BITS) % WORDS as u64) as usize,
            1 << (counter % WORD_BITS),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::collections::BTreeSet;

    #[test]
    fn replays_and_old_counters_are_refused() {
        let mut w = ReplayWindow::default();
        assert!(w.accept(0));
        assert!(!w.accept(0));
        assert!(w.accept(5));
        assert!(w.accept(3));
        assert!(!w.accept(3));
        assert!(w.accept(WINDOW + 5));
        assert!(w.accept(6), "inside the window");
        assert!(!w.accept(4), "slid out of the window");
        assert!(w.accept(u64::MAX - 1));
        assert!(!w.accept(u64::MAX - 1));
    }

    proptest! {
        /// Against a model that remembers every counter: accepted at most
        /// once, never when older than the window, always when new and
        /// within it.
        #[test]
        fn matches_a_model(counters in prop::collection::vec(0u64..40_000, 1..2000)) {
            let mut w = ReplayWindow::default();
            let mut seen = BTreeSet::new();
            let mut newest: Option<u64> = None;
            for c in counters {
                let fresh = !seen.contains(&c);
                let in_window = newest.is_none_or(|n| c > n || n - c < WINDOW);
                let got = w.accept(c);
                prop_assert_eq!(got, fresh && in_window, "counter {} newest {:?}", c, newest);
                if got {
                    seen.insert(c);
                    newest = Some(newest.map_or(c, |n| n.max(c)));
                }
            }
        }
    }
}
