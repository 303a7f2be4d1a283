//! How many new machines may join, and how fast.
//!
//! The enrollment token is in every golden image, so anyone in the lab can make up machine
//! ids and send signed startups for them, thousands a second. Each new id costs a database
//! record, a place in the operator's lists and, with auto-approve, a place in deployments.
//! So new ids are admitted at a bounded rate (a token bucket whose burst is one minute's worth)
//! and machines waiting for approval are capped; whatever is over is dropped, counted, and
//! reported in one log line per interval instead of one per message. A real agent whose
//! startup was dropped sends it again with its next heartbeat until the server answers, so a
//! legitimate power-on storm of new machines is slowed, never lost.

use std::time::Duration;

/// Limits from the config.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// New machine ids admitted per minute (also the burst).
    pub per_minute: u32,
    /// Most machines waiting for approval at once.
    pub max_pending: u32,
}

/// Why a new id was not admitted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refused {
    Rate,
    PendingFull,
}

/// The limiter; owned by the registry (single writer), so no locking.
pub struct Gate {
    limits: Limits,
    /// Admissions left, refilled continuously at `per_minute`.
    tokens: f64,
    refilled_at_ms: i64,
    /// Refusals since the last report, and when that was.
    refused_rate: u64,
    refused_pending: u64,
    reported_at_ms: i64,
}

/// At most one flood report per this interval.
pub const REPORT_EVERY: Duration = Duration::from_secs(10);

impl Gate {
    pub fn new(limits: Limits, now_ms: i64) -> Gate {
        Gate {
            limits,
            tokens: f64::from(limits.per_minute),
            refilled_at_ms: now_ms,
            refused_rate: 0,
            refused_pending: 0,
            reported_at_ms: now_ms,
        }
    }

    /// Whether one more new id may join now; `pending` is how many wait for approval and
    /// `needs_approval` whether this one would wait too.
    pub fn admit(
        &mut self,
        now_ms: i64,
        pending: usize,
        needs_approval: bool,
    ) -> Result<(), Refused> {
        self.refill(now_ms);
        if needs_approval && pending >= self.limits.max_pending as usize {
            self.refused_pending += 1;
            return Err(Refused::PendingFull);
        }
        if self.tokens < 1.0 {
            self.refused_rate += 1;
            return Err(Refused::Rate);
        }
        self.tokens -= 1.0;
        Ok(())
    }

    /// Logs what was refused since the last report, at most once per [`REPORT_EVERY`].
    pub fn report(&mut self, now_ms: i64) {
        if self.refused_rate + self.refused_pending == 0
            || now_ms - self.reported_at_ms < REPORT_EVERY.as_millis() as i64
        {
            return;
        }
        tracing::warn!(
            refused_over_rate = self.refused_rate,
            refused_pending_full = self.refused_pending,
            limit_per_minute = self.limits.per_minute,
            max_pending = self.limits.max_pending,
            "refused startups of new machine ids in the last {} s (a flood of made-up ids, or a \
             larger first enrollment than `enroll_per_minute` allows; agents retry by themselves)",
            (now_ms - self.reported_at_ms) / 1000
        );
        self.refused_rate = 0;
        self.refused_pending = 0;
        self.reported_at_ms = now_ms;
    }

    fn refill(&mut self, now_ms: i64) {
        let elapsed = (now_ms - self.refilled_at_ms).max(0) as f64;
        let per_minute = f64::from(self.limits.per_minute);
        self.tokens = (self.tokens + elapsed * per_minute / 60_000.0).min(per_minute);
        self.refilled_at_ms = now_ms;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const LIMITS: Limits = Limits {
        per_minute: 60,
        max_pending: 3,
    };

    #[test]
    fn a_burst_of_one_minute_then_the_rate() {
        let mut gate = Gate::new(LIMITS, 0);
        for _ in 0..60 {
            gate.admit(0, 0, false).unwrap();
        }
        assert_eq!(gate.admit(0, 0, false), Err(Refused::Rate));
        // One per second refills.
        assert_eq!(gate.admit(500, 0, false), Err(Refused::Rate));
        gate.admit(1000, 0, false).unwrap();
        assert_eq!(gate.admit(1000, 0, false), Err(Refused::Rate));
        // Never more than a minute's worth saved up.
        for _ in 0..60 {
            gate.admit(3_600_000, 0, false).unwrap();
        }
        assert_eq!(gate.admit(3_600_000, 0, false), Err(Refused::Rate));
    }

    #[test]
    fn pending_machines_are_capped_but_auto_approved_ones_are_not() {
        let mut gate = Gate::new(LIMITS, 0);
        assert_eq!(gate.admit(0, 3, true), Err(Refused::PendingFull));
        gate.admit(0, 2, true).unwrap();
        gate.admit(0, 3, false).unwrap();
    }

    #[test]
    fn refusals_are_reported_once_per_interval() {
        let mut gate = Gate::new(LIMITS, 0);
        for _ in 0..100 {
            let _ = gate.admit(0, 0, false);
        }
        assert_eq!(gate.refused_rate, 40);
        gate.report(1000);
        assert_eq!(gate.refused_rate, 40, "too soon to report");
        gate.report(REPORT_EVERY.as_millis() as i64);
        assert_eq!(gate.refused_rate, 0);
        assert_eq!(gate.reported_at_ms, REPORT_EVERY.as_millis() as i64);
    }
}
