//! A machine's side of the protocol: signing its events, its MQTT login and last will, and
//! taking in the commands addressed to it.
//!
//! The agent and the load generator's simulated agents both speak as machines; they share
//! this so that a simulated agent is what a real one is on the wire.

use crate::{
    CodecError, Command, CommandKind, Encoding, Envelope, EnvelopeError, Event, MachineId,
    Presence, ReplayGuard, Scope, SenderId, Signer, SigningKey, Status, Topic, TopicError,
    VerifyingKey, ZoneId, decode_command, event_topic, login_password, zone_commands_filter,
};

/// Signs as one machine: its events (MessagePack, one sequence counter), its MQTT
/// passwords and its last will.
pub struct MachineSigner {
    machine: MachineId,
    inner: Signer,
}

impl MachineSigner {
    /// A signer for `machine` with its `key`; sequence numbers start at the clock `now_ms`.
    pub fn new(machine: MachineId, key: SigningKey, now_ms: i64) -> MachineSigner {
        let inner = Signer::new(SenderId::from(machine.clone()), key, now_ms);
        MachineSigner { machine, inner }
    }

    /// The machine it signs as.
    pub fn machine(&self) -> &MachineId {
        &self.machine
    }

    /// The machine's key.
    pub fn key(&self) -> &SigningKey {
        self.inner.key()
    }

    /// `event` signed at `now_ms` for its topic, encoded as MessagePack.
    ///
    /// Fails only if the event cannot be encoded (larger than the codec allows).
    pub fn event(&mut self, event: Event, now_ms: i64) -> Result<(Topic, Vec<u8>), CodecError> {
        let topic = event_topic(&self.machine, &event);
        let payload = self
            .inner
            .sign(&topic, event, Encoding::MessagePack, now_ms)?;
        Ok((topic, payload))
    }

    /// A fresh MQTT password: proof of this machine's key at `now_ms`, then the enrollment
    /// token (see [`crate::login`]). The server refuses a proof it has seen or that has gone
    /// stale, so every connection attempt needs a new one.
    pub fn password(&self, token: &str, now_ms: i64) -> String {
        login_password(&self.machine, self.inner.key(), token, now_ms)
    }

    /// The last will's topic and payload: `status` offline, to be published retained at
    /// QoS 1. The server accepts a correctly signed will whatever its age, so one signed
    /// at connect time stays good for the whole connection.
    pub fn offline_will(&mut self, now_ms: i64) -> Result<(Topic, Vec<u8>), CodecError> {
        self.event(
            Event::Status(Status {
                presence: Presence::Offline,
            }),
            now_ms,
        )
    }
}

/// Why a machine ignored a message on one of its subscriptions. The text says why, to follow
/// "ignored {kind} command on {topic}: " (or "ignored a message on {topic}: " without a kind).
#[derive(Debug, thiserror::Error)]
pub enum CommandRefused {
    /// The topic is not one of ours.
    #[error("{0}")]
    Topic(#[from] TopicError),
    /// An event topic, where only commands are expected.
    #[error("an event topic, not a command")]
    NotACommand,
    /// A command for another machine or for a zone this machine is not in.
    #[error("not addressed to this machine")]
    NotAddressed {
        /// The command's kind, from the topic.
        kind: CommandKind,
    },
    /// The payload is not an envelope of the topic's kind.
    #[error("not a signed envelope of that kind: {error}")]
    Decode {
        /// The command's kind, from the topic.
        kind: CommandKind,
        /// What the decoder said.
        error: CodecError,
    },
    /// Not signed by the server, stale or replayed.
    #[error("{error}")]
    Envelope {
        /// The command's kind, from the topic.
        kind: CommandKind,
        /// What the check said.
        error: EnvelopeError,
    },
}

impl CommandRefused {
    /// The command's kind, when the topic names one.
    pub fn kind(&self) -> Option<CommandKind> {
        match self {
            CommandRefused::Topic(_) | CommandRefused::NotACommand => None,
            CommandRefused::NotAddressed { kind }
            | CommandRefused::Decode { kind, .. }
            | CommandRefused::Envelope { kind, .. } => Some(*kind),
        }
    }
}

/// Takes in a message that `machine`, a member of `zones`, received on `topic`: it must be a
/// command for every machine, for this one or for one of its zones, signed by `server_key`,
/// fresh and not replayed (`guard` records it only then). Returns the verified envelope.
pub fn accept_command(
    topic: &str,
    payload: &[u8],
    machine: &MachineId,
    zones: &[ZoneId],
    server_key: &VerifyingKey,
    guard: &mut ReplayGuard,
    now_ms: i64,
) -> Result<Envelope<Command>, CommandRefused> {
    let topic: Topic = topic.parse()?;
    let Topic::Command { scope, kind } = &topic else {
        return Err(CommandRefused::NotACommand);
    };
    let kind = *kind;
    let addressed = match scope {
        Scope::Global => true,
        Scope::Machine(to) => to == machine,
        Scope::Zone(zone) => zones.contains(zone),
    };
    if !addressed {
        return Err(CommandRefused::NotAddressed { kind });
    }
    let envelope =
        decode_command(kind, payload).map_err(|error| CommandRefused::Decode { kind, error })?;
    envelope
        .accept(&topic, server_key, guard, now_ms)
        .map_err(|error| CommandRefused::Envelope { kind, error })?;
    Ok(envelope)
}

/// The subscriptions to change when a machine's zones go from `old` to `new`: the command
/// filters of the zones it left, then of the zones it joined.
pub fn zone_filter_changes(old: &[ZoneId], new: &[ZoneId]) -> (Vec<String>, Vec<String>) {
    let left = old
        .iter()
        .filter(|z| !new.contains(z))
        .map(zone_commands_filter)
        .collect();
    let joined = new
        .iter()
        .filter(|z| !old.contains(z))
        .map(zone_commands_filter)
        .collect();
    (left, joined)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{BootCommand, EventKind, decode_event, generate_signing_key, now_ms};

    #[test]
    fn events_and_the_will_verify_with_the_machine_key_and_seqs_increase() {
        let machine: MachineId = "pc-1".parse().unwrap();
        let mut signer = MachineSigner::new(machine, generate_signing_key().unwrap(), now_ms());
        let key = signer.key().verifying_key();
        let online = || {
            Event::Status(Status {
                presence: Presence::Online,
            })
        };
        let (t1, p1) = signer.event(online(), now_ms()).unwrap();
        let (_, p2) = signer.event(online(), now_ms()).unwrap();
        assert_eq!(t1.to_string(), "boottorrent/evt/machine/pc-1/status");
        let e1 = decode_event(EventKind::Status, &p1).unwrap();
        let e2 = decode_event(EventKind::Status, &p2).unwrap();
        e1.verify(&t1, &key).unwrap();
        assert!(e2.seq > e1.seq);
        let (will_topic, will) = signer.offline_will(now_ms()).unwrap();
        assert_eq!(will_topic, t1);
        let will = decode_event(EventKind::Status, &will).unwrap();
        will.verify(&will_topic, &key).unwrap();
        assert!(will.seq > e2.seq);
        assert!(signer.password("tok", now_ms()).ends_with(":tok"));
    }

    #[test]
    fn zone_changes_name_the_filters_left_and_joined() {
        let zones =
            |ids: &[&str]| -> Vec<ZoneId> { ids.iter().map(|z| z.parse().unwrap()).collect() };
        let (left, joined) = zone_filter_changes(&zones(&["a", "b"]), &zones(&["b", "c"]));
        assert_eq!(left, ["boottorrent/cmd/zone/a/#"]);
        assert_eq!(joined, ["boottorrent/cmd/zone/c/#"]);
        let (left, joined) = zone_filter_changes(&zones(&["a"]), &zones(&["a"]));
        assert!(left.is_empty() && joined.is_empty());
    }

    #[test]
    fn commands_are_taken_only_when_addressed_signed_and_fresh() {
        let server = generate_signing_key().unwrap();
        let machine: MachineId = "pc-1".parse().unwrap();
        let zones: Vec<ZoneId> = vec!["lab".parse().unwrap()];
        let mut guard = ReplayGuard::new(300_000);
        let mut seq = 1000;
        let mut sign = |topic: &str, key: &SigningKey| {
            seq += 1;
            let body = Command::Boot(BootCommand {
                image: "img".parse().unwrap(),
                deployment: None,
            });
            Envelope::sign(
                &topic.parse().unwrap(),
                SenderId::server(),
                now_ms(),
                seq,
                body,
                key,
            )
            .unwrap()
            .encode(Encoding::MessagePack)
            .unwrap()
        };
        let mut take = |topic: &str, payload: &[u8]| {
            accept_command(
                topic,
                payload,
                &machine,
                &zones,
                &server.verifying_key(),
                &mut guard,
                now_ms(),
            )
        };
        let mine = "boottorrent/cmd/machine/pc-1/boot";
        let good = sign(mine, &server);
        assert!(take(mine, &good).is_ok());
        assert!(matches!(
            take(mine, &good),
            Err(CommandRefused::Envelope { .. })
        ));
        let forged = sign(mine, &generate_signing_key().unwrap());
        assert!(matches!(
            take(mine, &forged),
            Err(CommandRefused::Envelope { .. })
        ));
        for (topic, addressed) in [
            ("boottorrent/cmd/global/boot", true),
            ("boottorrent/cmd/zone/lab/boot", true),
            ("boottorrent/cmd/zone/other/boot", false),
            ("boottorrent/cmd/machine/pc-2/boot", false),
        ] {
            let result = take(topic, &sign(topic, &server));
            assert_eq!(result.is_ok(), addressed, "{topic}: {result:?}");
        }
        assert!(matches!(
            take("boottorrent/evt/machine/pc-1/status", b""),
            Err(CommandRefused::NotACommand)
        ));
        assert!(matches!(
            take("elsewhere", b""),
            Err(CommandRefused::Topic(_))
        ));
        assert!(matches!(
            take(mine, b"\x00\x01"),
            Err(CommandRefused::Decode { .. })
        ));
    }
}
