//! Signing as one sender: the clock envelopes carry, and the one sequence counter a sender's
//! envelopes take their numbers from.
//!
//! Receivers refuse a `seq` that is not above the last one they accepted from the sender
//! (see [`crate::replay`]), so everything one sender signs (the server's commands, or one
//! machine's events) must be numbered by one counter. The counter starts at the clock in
//! microseconds, so a restarted sender continues above what it signed before.

use serde::Serialize;

use crate::{CodecError, Encoding, Envelope, SenderId, SeqCounter, SigningKey, Topic};

/// Wall-clock Unix milliseconds: the time envelopes and login proofs carry.
pub fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

/// Microseconds of a millisecond clock reading, as the sequence counter counts.
fn micros(ms: i64) -> u64 {
    u64::try_from(ms).unwrap_or(0).saturating_mul(1000)
}

/// Signs envelopes as one sender with its key and its one sequence counter.
pub struct Signer {
    from: SenderId,
    key: SigningKey,
    seq: SeqCounter,
}

impl Signer {
    /// A signer for `from` whose first `seq` is at least the clock reading `now_ms`.
    pub fn new(from: SenderId, key: SigningKey, now_ms: i64) -> Signer {
        Signer {
            from,
            key,
            seq: SeqCounter::from_clock(micros(now_ms)),
        }
    }

    /// The sender's key.
    pub fn key(&self) -> &SigningKey {
        &self.key
    }

    /// `body` signed for `topic` at `now_ms` with the next sequence number, encoded.
    ///
    /// Fails only if the body cannot be encoded (larger than the codec allows).
    pub fn sign<B: Serialize>(
        &mut self,
        topic: &Topic,
        body: B,
        encoding: Encoding,
        now_ms: i64,
    ) -> Result<Vec<u8>, CodecError> {
        let seq = self.seq.next(micros(now_ms));
        Envelope::sign(topic, self.from.clone(), now_ms, seq, body, &self.key)?.encode(encoding)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{Event, EventKind, Heartbeat, MachineId, decode_event, generate_signing_key};

    #[test]
    fn numbers_rise_even_when_the_clock_does_not() {
        let machine: MachineId = "pc-1".parse().unwrap();
        let key = generate_signing_key().unwrap();
        let public = key.verifying_key();
        let mut signer = Signer::new(SenderId::from(machine.clone()), key, 1_000);
        let topic = Topic::event(machine, EventKind::Heartbeat);
        let heartbeat = || {
            Event::Heartbeat(Heartbeat {
                uptime_secs: 1,
                images: vec![],
            })
        };
        let mut last = 0;
        for now in [1_000, 1_000, 999, 5_000] {
            let bytes = signer
                .sign(&topic, heartbeat(), Encoding::MessagePack, now)
                .unwrap();
            let envelope = decode_event(EventKind::Heartbeat, &bytes).unwrap();
            envelope.verify(&topic, &public).unwrap();
            assert!(envelope.seq > last, "{} after {last}", envelope.seq);
            assert!(envelope.seq >= micros(1_000));
            assert_eq!(envelope.ts, now);
            last = envelope.seq;
        }
    }
}
