//! Replay protection: the receiver's [`ReplayGuard`] and the sender's [`SeqCounter`].
//!
//! A signature proves who wrote a message, not that it is new: anyone on the broker can
//! re-publish a captured `reboot`. The receiver therefore drops envelopes whose `ts` is
//! outside a window around its own clock, and envelopes whose `seq` is not above the last
//! one it accepted from that sender. The window bounds how long a capture stays useful even
//! where the last seq was lost (a receiver restarted without persisted state).
//!
//! Senders keep no state on disk: [`SeqCounter`] starts from the clock in microseconds, so a
//! restarted sender resumes above everything it sent before, as long as its clock did not
//! go back further than the time the restart took. If it went back further, the receiver
//! drops the new envelopes as replayed until the clock passes the old seqs again; the
//! sender recovers by itself, but is locked out for about the size of the step.

use std::collections::HashMap;

use crate::id::SenderId;

/// Why an envelope was judged stale, early or replayed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ReplayError {
    /// `ts` is older than the window allows.
    #[error("timestamp {ts} ms is more than {window_ms} ms before now ({now} ms)")]
    Stale {
        /// The envelope's timestamp, Unix milliseconds.
        ts: i64,
        /// The receiver's clock, Unix milliseconds.
        now: i64,
        /// The window, milliseconds.
        window_ms: i64,
    },
    /// `ts` is further in the future than the window allows.
    #[error("timestamp {ts} ms is more than {window_ms} ms after now ({now} ms)")]
    Future {
        /// The envelope's timestamp, Unix milliseconds.
        ts: i64,
        /// The receiver's clock, Unix milliseconds.
        now: i64,
        /// The window, milliseconds.
        window_ms: i64,
    },
    /// `seq` is not above the last accepted one from the same sender.
    #[error("sequence number {seq} is not above the last accepted {last}")]
    Replayed {
        /// The envelope's sequence number.
        seq: u64,
        /// The last sequence number accepted from its sender.
        last: u64,
    },
}

/// Receiver-side replay state: the last accepted seq per sender, and a clock window.
///
/// Holds one entry per sender ever recorded; since only verified envelopes are recorded,
/// that is bounded by the number of keys the receiver trusts.
#[derive(Clone, Debug, Default)]
pub struct ReplayGuard {
    window_ms: i64,
    last: HashMap<SenderId, u64>,
}

impl ReplayGuard {
    /// A guard accepting timestamps within `now ± window_ms`; a negative window counts
    /// as zero.
    pub fn new(window_ms: i64) -> Self {
        ReplayGuard {
            window_ms: window_ms.max(0),
            last: HashMap::new(),
        }
    }

    /// The window, in milliseconds.
    pub fn window_ms(&self) -> i64 {
        self.window_ms
    }

    /// Whether an envelope from `from` with `ts` and `seq` is fresh at `now_ms`.
    ///
    /// Records nothing: call [`record`](Self::record) once the signature has verified.
    pub fn check(
        &self,
        from: &SenderId,
        ts: i64,
        seq: u64,
        now_ms: i64,
    ) -> Result<(), ReplayError> {
        let window_ms = self.window_ms;
        // Saturating, because `ts` is attacker-chosen and may sit at either end of i64.
        if ts < now_ms.saturating_sub(window_ms) {
            return Err(ReplayError::Stale {
                ts,
                now: now_ms,
                window_ms,
            });
        }
        if ts > now_ms.saturating_add(window_ms) {
            return Err(ReplayError::Future {
                ts,
                now: now_ms,
                window_ms,
            });
        }
        match self.last.get(from) {
            Some(&last) if seq <= last => Err(ReplayError::Replayed { seq, last }),
            _ => Ok(()),
        }
    }

    /// Records `seq` as accepted from `from`. Call only after the signature verified, so
    /// that a forged envelope with a huge seq cannot lock the real sender out. Never
    /// lowers the recorded seq.
    pub fn record(&mut self, from: &SenderId, seq: u64) {
        match self.last.get_mut(from) {
            Some(last) => *last = (*last).max(seq),
            None => {
                self.last.insert(from.clone(), seq);
            }
        }
    }

    /// The last seq accepted from `from`, if any.
    pub fn last_seq(&self, from: &SenderId) -> Option<u64> {
        self.last.get(from).copied()
    }

    /// Seeds the last seq of `from` from persisted state, e.g. after a restart. Like
    /// [`record`](Self::record), never lowers what is already there.
    pub fn restore(&mut self, from: SenderId, seq: u64) {
        let last = self.last.entry(from).or_insert(seq);
        *last = (*last).max(seq);
    }

    /// Every sender and its last accepted seq, for persisting.
    pub fn iter(&self) -> impl Iterator<Item = (&SenderId, u64)> {
        self.last.iter().map(|(from, &seq)| (from, seq))
    }
}

/// Sender-side sequence numbers: strictly increasing, and seeded from the clock so that a
/// restart without saved state still continues above the previous run.
///
/// Each seq is `max(previous + 1, now_micros)`: it follows the clock while messages are
/// rarer than one per microsecond, and runs ahead of it (by one per message) otherwise,
/// so a clock that goes back never makes it repeat.
#[derive(Clone, Debug)]
pub struct SeqCounter {
    /// The smallest seq the next call may return.
    floor: u64,
}

impl SeqCounter {
    /// A counter whose first seq is at least `now_micros` (microseconds since the Unix
    /// epoch).
    pub fn from_clock(now_micros: u64) -> Self {
        SeqCounter { floor: now_micros }
    }

    /// The next seq: `max(last + 1, now_micros)`.
    ///
    /// Strictly increasing until `u64::MAX`, which a microsecond clock reaches in the
    /// year 586,000; from there it stays at `u64::MAX`.
    pub fn next(&mut self, now_micros: u64) -> u64 {
        let seq = self.floor.max(now_micros);
        self.floor = seq.saturating_add(1);
        seq
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sender(s: &str) -> SenderId {
        s.parse().unwrap()
    }

    #[test]
    fn window_edges() {
        let g = ReplayGuard::new(1_000);
        let a = sender("a");
        assert_eq!(g.check(&a, 9_000, 1, 10_000), Ok(()));
        assert_eq!(g.check(&a, 11_000, 1, 10_000), Ok(()));
        assert_eq!(
            g.check(&a, 8_999, 1, 10_000),
            Err(ReplayError::Stale {
                ts: 8_999,
                now: 10_000,
                window_ms: 1_000
            })
        );
        assert_eq!(
            g.check(&a, 11_001, 1, 10_000),
            Err(ReplayError::Future {
                ts: 11_001,
                now: 10_000,
                window_ms: 1_000
            })
        );
    }

    #[test]
    fn extreme_timestamps_do_not_overflow() {
        let g = ReplayGuard::new(i64::MAX);
        let a = sender("a");
        assert_eq!(g.check(&a, -i64::MAX, 1, 0), Ok(()));
        assert_eq!(g.check(&a, i64::MAX, 1, 0), Ok(()));
        assert_eq!(g.check(&a, 0, 1, i64::MAX), Ok(()));
        assert!(matches!(
            g.check(&a, i64::MIN, 1, i64::MAX),
            Err(ReplayError::Stale { .. })
        ));
        let g = ReplayGuard::new(10);
        assert!(matches!(
            g.check(&a, i64::MIN, 1, 0),
            Err(ReplayError::Stale { .. })
        ));
        assert!(matches!(
            g.check(&a, i64::MAX, 1, 0),
            Err(ReplayError::Future { .. })
        ));
        assert!(matches!(
            g.check(&a, 0, 1, i64::MIN),
            Err(ReplayError::Future { .. })
        ));
        assert_eq!(ReplayGuard::new(-5).window_ms(), 0);
    }

    #[test]
    fn seq_must_increase_per_sender() {
        let mut g = ReplayGuard::new(1_000);
        let (a, b) = (sender("a"), sender("b"));
        assert_eq!(g.check(&a, 0, 5, 0), Ok(()));
        g.record(&a, 5);
        assert_eq!(
            g.check(&a, 0, 5, 0),
            Err(ReplayError::Replayed { seq: 5, last: 5 })
        );
        assert_eq!(
            g.check(&a, 0, 4, 0),
            Err(ReplayError::Replayed { seq: 4, last: 5 })
        );
        assert_eq!(g.check(&a, 0, 6, 0), Ok(()));
        assert_eq!(g.check(&b, 0, 1, 0), Ok(()));
        // Check alone records nothing.
        assert_eq!(g.last_seq(&b), None);
        g.record(&a, 3);
        assert_eq!(g.last_seq(&a), Some(5));
    }

    #[test]
    fn restore_seeds_and_never_lowers() {
        let mut g = ReplayGuard::new(1_000);
        g.restore(sender("a"), 10);
        assert_eq!(
            g.check(&sender("a"), 0, 10, 0),
            Err(ReplayError::Replayed { seq: 10, last: 10 })
        );
        g.restore(sender("a"), 2);
        assert_eq!(g.last_seq(&sender("a")), Some(10));
        assert_eq!(g.iter().collect::<Vec<_>>(), vec![(&sender("a"), 10)]);
    }

    #[test]
    fn counter_follows_the_clock_and_never_repeats() {
        let mut c = SeqCounter::from_clock(100);
        assert_eq!(c.next(100), 100);
        assert_eq!(c.next(100), 101);
        assert_eq!(c.next(50), 102);
        assert_eq!(c.next(1_000), 1_000);
        let mut c = SeqCounter::from_clock(u64::MAX);
        assert_eq!(c.next(0), u64::MAX);
        assert_eq!(c.next(0), u64::MAX);
    }

    #[test]
    fn error_messages_name_the_values() {
        let msg = ReplayError::Replayed { seq: 4, last: 9 }.to_string();
        assert!(msg.contains('4') && msg.contains('9'), "{msg}");
        let msg = ReplayError::Stale {
            ts: 1,
            now: 5000,
            window_ms: 30,
        }
        .to_string();
        assert!(msg.contains("5000") && msg.contains("30"), "{msg}");
    }
}
