//! The signed envelope `{v, from, ts, seq, body, sig}` around every payload.
//!
//! The broker lets any client publish anywhere, so authenticity lives in the message: the
//! server signs commands, each machine signs its events, and receivers verify before they
//! act. The signature covers a canonical byte string rather than the wire bytes, so an
//! envelope verifies whether it travelled as JSON or MessagePack:
//!
//! ```text
//! "boottorrent-envelope-v1\0"
//! u64 BE length ‖ topic string
//! u32 BE v
//! u64 BE length ‖ from
//! i64 BE ts
//! u64 BE seq
//! u64 BE length ‖ body as named-field MessagePack
//! ```
//!
//! Lengths make the concatenation unambiguous; the topic binds the envelope to where it was
//! published, so a command signed for machine A is rejected on machine B's topic, and an
//! event cannot be replayed as another kind.

use ed25519_dalek::{Signature, Signer, SigningKey, VerifyingKey};
use serde::{Deserialize, Serialize};

use crate::codec::{self, CodecError, Encoding};
use crate::id::{MachineId, SenderId};
use crate::message::{Command, Event, SignatureBytes};
use crate::replay::{ReplayError, ReplayGuard};
use crate::topic::{CommandKind, EventKind, Scope, Topic};

/// The envelope version this crate writes and accepts.
pub const ENVELOPE_VERSION: u32 = 1;

/// Separates our signatures from any other use of the same key.
const SIGNING_DOMAIN: &[u8] = b"boottorrent-envelope-v1\0";

/// Why an envelope was rejected.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EnvelopeError {
    /// The envelope has a version this crate does not speak.
    #[error("envelope version {found} is not supported (expected {ENVELOPE_VERSION})")]
    Version {
        /// The version found.
        found: u32,
    },
    /// The envelope's sender cannot publish on this topic: events must come from the
    /// machine named in the topic, commands from the server.
    #[error("envelope from \"{found}\" on a topic that only \"{expected}\" may publish on")]
    Sender {
        /// Who may publish on the topic.
        expected: SenderId,
        /// Who the envelope claims to be from.
        found: SenderId,
    },
    /// The signature does not match the key, the topic and the content.
    #[error("envelope signature does not verify")]
    BadSignature,
    /// The body could not be re-encoded to check the signature.
    #[error("could not re-encode the envelope to verify it: {0}")]
    Codec(#[from] CodecError),
    /// The envelope is stale, from the future, or replayed.
    #[error("envelope rejected by replay guard: {0}")]
    Replay(#[from] ReplayError),
}

/// A signed message: who sent it, when, its sequence number, the body, and a signature.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Envelope<B> {
    /// Envelope version, [`ENVELOPE_VERSION`].
    pub v: u32,
    /// Who signed it.
    pub from: SenderId,
    /// When it was signed, Unix time in milliseconds.
    pub ts: i64,
    /// The sender's sequence number, strictly increasing per sender.
    pub seq: u64,
    /// The message.
    pub body: B,
    /// Ed25519 signature over the canonical bytes (see the module docs).
    pub sig: SignatureBytes,
}

impl<B: Serialize> Envelope<B> {
    /// Signs `body` for publication on `topic`.
    ///
    /// Fails only if the body cannot be encoded (in practice: if it is larger than
    /// [`codec::MAX_PAYLOAD_BYTES`]).
    pub fn sign(
        topic: &Topic,
        from: SenderId,
        ts: i64,
        seq: u64,
        body: B,
        key: &SigningKey,
    ) -> Result<Self, CodecError> {
        let message = signing_bytes(topic, ENVELOPE_VERSION, &from, ts, seq, &body)?;
        let sig = SignatureBytes::from(key.sign(&message).to_bytes());
        Ok(Envelope {
            v: ENVELOPE_VERSION,
            from,
            ts,
            seq,
            body,
            sig,
        })
    }

    /// Checks the version, that `from` may publish on `topic`, and the signature with
    /// `key`, using strict verification (no malleable or small-order signatures).
    ///
    /// Does not check freshness; see [`ReplayGuard`] or [`Envelope::accept`].
    pub fn verify(&self, topic: &Topic, key: &VerifyingKey) -> Result<(), EnvelopeError> {
        if self.v != ENVELOPE_VERSION {
            return Err(EnvelopeError::Version { found: self.v });
        }
        let expected = expected_sender(topic);
        if self.from != expected {
            return Err(EnvelopeError::Sender {
                expected,
                found: self.from.clone(),
            });
        }
        let message = signing_bytes(topic, self.v, &self.from, self.ts, self.seq, &self.body)?;
        key.verify_strict(&message, &Signature::from_bytes(&self.sig.0))
            .map_err(|_| EnvelopeError::BadSignature)
    }

    /// Checks freshness with `guard`, then [`verify`](Self::verify), then records the
    /// sequence number; the order means a forged envelope can never advance the guard.
    pub fn accept(
        &self,
        topic: &Topic,
        key: &VerifyingKey,
        guard: &mut ReplayGuard,
        now_ms: i64,
    ) -> Result<(), EnvelopeError> {
        guard.check(&self.from, self.ts, self.seq, now_ms)?;
        self.verify(topic, key)?;
        guard.record(&self.from, self.seq);
        Ok(())
    }

    /// Encodes the whole envelope for the wire.
    pub fn encode(&self, encoding: Encoding) -> Result<Vec<u8>, CodecError> {
        codec::encode(self, encoding)
    }
}

impl<B> Envelope<B> {
    /// Converts the body, keeping everything else; the signature is kept as is, so it
    /// verifies only if the new body encodes the same way (as a sum type does).
    pub fn map<C>(self, f: impl FnOnce(B) -> C) -> Envelope<C> {
        Envelope {
            v: self.v,
            from: self.from,
            ts: self.ts,
            seq: self.seq,
            body: f(self.body),
            sig: self.sig,
        }
    }
}

/// Who may sign envelopes published on `topic`.
fn expected_sender(topic: &Topic) -> SenderId {
    match topic {
        Topic::Event { machine, .. } => SenderId::from(machine.clone()),
        Topic::Command { .. } => SenderId::server(),
    }
}

/// The bytes a signature covers; see the module docs for the layout.
fn signing_bytes<B: Serialize>(
    topic: &Topic,
    v: u32,
    from: &SenderId,
    ts: i64,
    seq: u64,
    body: &B,
) -> Result<Vec<u8>, CodecError> {
    let body = codec::encode(body, Encoding::MessagePack)?;
    let topic = topic.to_string();
    // Three u64 length prefixes, v, ts and seq.
    let fixed = 3 * 8 + 4 + 8 + 8;
    let mut out = Vec::with_capacity(
        SIGNING_DOMAIN.len() + topic.len() + from.as_str().len() + body.len() + fixed,
    );
    out.extend_from_slice(SIGNING_DOMAIN);
    put_len_prefixed(&mut out, topic.as_bytes());
    out.extend_from_slice(&v.to_be_bytes());
    put_len_prefixed(&mut out, from.as_str().as_bytes());
    out.extend_from_slice(&ts.to_be_bytes());
    out.extend_from_slice(&seq.to_be_bytes());
    put_len_prefixed(&mut out, &body);
    Ok(out)
}

fn put_len_prefixed(out: &mut Vec<u8>, bytes: &[u8]) {
    // usize is at most 64 bits on every target Rust supports, so this never truncates.
    out.extend_from_slice(&(bytes.len() as u64).to_be_bytes());
    out.extend_from_slice(bytes);
}

/// Decodes an event envelope whose body type is given by the topic's `kind`.
pub fn decode_event(kind: EventKind, bytes: &[u8]) -> Result<Envelope<Event>, CodecError> {
    fn as_event<B: serde::de::DeserializeOwned>(
        bytes: &[u8],
        wrap: fn(B) -> Event,
    ) -> Result<Envelope<Event>, CodecError> {
        Ok(codec::decode::<Envelope<B>>(bytes)?.map(wrap))
    }
    match kind {
        EventKind::Startup => as_event(bytes, Event::Startup),
        EventKind::Heartbeat => as_event(bytes, Event::Heartbeat),
        EventKind::Progress => as_event(bytes, Event::Progress),
        EventKind::Status => as_event(bytes, Event::Status),
        EventKind::Boot => as_event(bytes, Event::Boot),
        EventKind::Error => as_event(bytes, Event::Error),
        EventKind::Shutdown => as_event(bytes, Event::Shutdown),
    }
}

/// Decodes a command envelope whose body type is given by the topic's `kind`.
pub fn decode_command(kind: CommandKind, bytes: &[u8]) -> Result<Envelope<Command>, CodecError> {
    fn as_command<B: serde::de::DeserializeOwned>(
        bytes: &[u8],
        wrap: fn(B) -> Command,
    ) -> Result<Envelope<Command>, CodecError> {
        Ok(codec::decode::<Envelope<B>>(bytes)?.map(wrap))
    }
    match kind {
        CommandKind::ArtifactAssignment => as_command(bytes, Command::ArtifactAssignment),
        CommandKind::ArtifactUnassignment => as_command(bytes, Command::ArtifactUnassignment),
        CommandKind::MachineConfiguration => as_command(bytes, Command::MachineConfiguration),
        CommandKind::Boot => as_command(bytes, Command::Boot),
        CommandKind::Reboot => as_command(bytes, Command::Reboot),
    }
}

/// The topic an event envelope from `machine` is published on; a shorthand for agents.
pub fn event_topic(machine: &MachineId, event: &Event) -> Topic {
    Topic::event(machine.clone(), event.kind())
}

/// The topic a command for `scope` is published on; a shorthand for the server.
pub fn command_topic(scope: Scope, command: &Command) -> Topic {
    Topic::command(scope, command.kind())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::message::{Reboot, Shutdown};

    fn key(seed: u8) -> SigningKey {
        SigningKey::from_bytes(&[seed; 32])
    }

    fn machine_topic(m: &str) -> Topic {
        Topic::command(Scope::Machine(m.parse().unwrap()), CommandKind::Reboot)
    }

    fn signed_reboot() -> Envelope<Command> {
        let body = Command::Reboot(Reboot { delay_secs: 3 });
        Envelope::sign(
            &machine_topic("a"),
            SenderId::server(),
            1_000,
            7,
            body,
            &key(1),
        )
        .unwrap()
    }

    #[test]
    fn verifies_in_both_encodings() {
        let env = signed_reboot();
        let vk = key(1).verifying_key();
        for encoding in [Encoding::MessagePack, Encoding::Json] {
            let bytes = env.encode(encoding).unwrap();
            let back = decode_command(CommandKind::Reboot, &bytes).unwrap();
            assert_eq!(back, env);
            back.verify(&machine_topic("a"), &vk).unwrap();
        }
    }

    #[test]
    fn a_command_for_one_machine_fails_on_another() {
        let env = signed_reboot();
        let vk = key(1).verifying_key();
        assert_eq!(
            env.verify(&machine_topic("b"), &vk),
            Err(EnvelopeError::BadSignature)
        );
        let global = Topic::command(Scope::Global, CommandKind::Reboot);
        assert_eq!(env.verify(&global, &vk), Err(EnvelopeError::BadSignature));
    }

    #[test]
    fn wrong_key_fails() {
        let env = signed_reboot();
        assert_eq!(
            env.verify(&machine_topic("a"), &key(2).verifying_key()),
            Err(EnvelopeError::BadSignature)
        );
    }

    #[test]
    fn version_is_checked() {
        let mut env = signed_reboot();
        env.v = 2;
        assert_eq!(
            env.verify(&machine_topic("a"), &key(1).verifying_key()),
            Err(EnvelopeError::Version { found: 2 })
        );
    }

    #[test]
    fn sender_must_match_topic() {
        // A machine signing a command with its own key, or an event as another machine.
        let vk = key(1).verifying_key();
        let body = Command::Reboot(Reboot { delay_secs: 0 });
        let topic = machine_topic("a");
        let forged = Envelope::sign(&topic, "a".parse().unwrap(), 1, 1, body, &key(1)).unwrap();
        assert!(matches!(
            forged.verify(&topic, &vk),
            Err(EnvelopeError::Sender { .. })
        ));

        let topic = Topic::event("pc-1".parse().unwrap(), EventKind::Shutdown);
        let body = Event::Shutdown(Shutdown { reason: "x".into() });
        let env = Envelope::sign(&topic, "pc-2".parse().unwrap(), 1, 1, body, &key(1)).unwrap();
        let err = env.verify(&topic, &vk).unwrap_err();
        assert!(err.to_string().contains("pc-2"), "{err}");
    }

    #[test]
    fn accept_checks_verifies_and_records() {
        let env = signed_reboot();
        let topic = machine_topic("a");
        let vk = key(1).verifying_key();
        let mut guard = ReplayGuard::new(5_000);
        env.accept(&topic, &vk, &mut guard, 2_000).unwrap();
        assert_eq!(guard.last_seq(&SenderId::server()), Some(7));
        assert!(matches!(
            env.accept(&topic, &vk, &mut guard, 2_000),
            Err(EnvelopeError::Replay(ReplayError::Replayed {
                seq: 7,
                last: 7
            }))
        ));

        // A forgery with a huge seq must not advance the guard.
        let mut forged = env.clone();
        forged.seq = u64::MAX;
        let mut guard = ReplayGuard::new(5_000);
        assert_eq!(
            forged.accept(&topic, &vk, &mut guard, 2_000),
            Err(EnvelopeError::BadSignature)
        );
        assert_eq!(guard.last_seq(&SenderId::server()), None);
    }

    #[test]
    fn decode_picks_the_body_by_kind() {
        let bytes = signed_reboot().encode(Encoding::MessagePack).unwrap();
        assert!(decode_command(CommandKind::Reboot, &bytes).is_ok());
        assert!(decode_command(CommandKind::Boot, &bytes).is_err());
        assert!(decode_event(EventKind::Shutdown, &bytes).is_err());
    }

    #[test]
    fn topic_helpers() {
        let m: MachineId = "m".parse().unwrap();
        let ev = Event::Shutdown(Shutdown {
            reason: String::new(),
        });
        assert_eq!(
            event_topic(&m, &ev),
            Topic::event(m.clone(), EventKind::Shutdown)
        );
        let cmd = Command::Reboot(Reboot { delay_secs: 0 });
        assert_eq!(
            command_topic(Scope::Global, &cmd),
            Topic::command(Scope::Global, CommandKind::Reboot)
        );
    }
}
