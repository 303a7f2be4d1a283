//! Property tests: every message round-trips through signing and both encodings, tampering
//! is caught, and no input makes the decoders or the topic parser panic.

use std::net::IpAddr;

use boottorrent_proto::*;
use proptest::prelude::*;

fn id_string() -> impl Strategy<Value = String> {
    "[A-Za-z0-9._-]{1,64}"
}

fn machine_id() -> impl Strategy<Value = MachineId> {
    id_string().prop_map(|s| s.parse().unwrap())
}

fn zone_id() -> impl Strategy<Value = ZoneId> {
    id_string().prop_map(|s| s.parse().unwrap())
}

fn image_id() -> impl Strategy<Value = ImageId> {
    id_string().prop_map(|s| s.parse().unwrap())
}

fn deployment_id() -> impl Strategy<Value = DeploymentId> {
    id_string().prop_map(|s| s.parse().unwrap())
}

/// Any characters at all, control characters and quotes included, to exercise escaping.
fn text() -> impl Strategy<Value = String> {
    prop::collection::vec(any::<char>(), 0..24).prop_map(String::from_iter)
}

fn image_state() -> impl Strategy<Value = ImageState> {
    prop_oneof![
        Just(ImageState::Downloading),
        Just(ImageState::Verifying),
        Just(ImageState::Staged),
        Just(ImageState::Seeding),
        Just(ImageState::Failed),
    ]
}

fn held_image() -> impl Strategy<Value = HeldImage> {
    (
        image_id(),
        any::<[u8; 20]>(),
        image_state(),
        any::<u64>(),
        any::<u64>(),
    )
        .prop_map(|(image, hash, state, bytes_done, bytes_total)| HeldImage {
            image,
            info_hash: Bytes(hash),
            state,
            bytes_done,
            bytes_total,
        })
}

fn held_images() -> impl Strategy<Value = Vec<HeldImage>> {
    prop::collection::vec(held_image(), 0..4)
}

fn startup() -> impl Strategy<Value = Startup> {
    (
        (text(), text(), text()),
        prop::collection::vec(any::<IpAddr>(), 0..4),
        prop::collection::vec(text(), 0..4),
        any::<u64>(),
        held_images(),
        any::<[u8; 32]>(),
        prop::option::of((image_id(), prop::option::of(deployment_id()))),
    )
        .prop_map(
            |((agent_version, hostname, os), ips, macs, free_disk_bytes, images, key, running)| {
                Startup {
                    agent_version,
                    hostname,
                    os,
                    ips,
                    macs,
                    free_disk_bytes,
                    images,
                    public_key: Bytes(key),
                    running: running.map(|(image, deployment)| RunningImage { image, deployment }),
                }
            },
        )
}

fn event() -> impl Strategy<Value = Event> {
    prop_oneof![
        startup().prop_map(Event::Startup),
        (any::<u64>(), held_images()).prop_map(|(uptime_secs, images)| Event::Heartbeat(
            Heartbeat {
                uptime_secs,
                images
            }
        )),
        (
            deployment_id(),
            image_id(),
            any::<[u64; 4]>(),
            any::<u32>(),
            image_state()
        )
            .prop_map(
                |(deployment, image, [done, total, down, up], peers, state)| {
                    Event::Progress(Progress {
                        deployment,
                        image,
                        bytes_done: done,
                        bytes_total: total,
                        download_bps: down,
                        upload_bps: up,
                        peers,
                        state,
                    })
                }
            ),
        prop_oneof![Just(Presence::Online), Just(Presence::Offline)]
            .prop_map(|presence| Event::Status(Status { presence })),
        (
            prop::option::of(deployment_id()),
            prop::option::of(image_id()),
            any::<bool>(),
            text()
        )
            .prop_map(|(deployment, image, ok, message)| {
                Event::Boot(BootReport {
                    deployment,
                    image,
                    ok,
                    message,
                })
            }),
        (text(), text(), prop::option::of(deployment_id())).prop_map(
            |(code, message, deployment)| Event::Error(ErrorReport {
                code,
                message,
                deployment
            })
        ),
        text().prop_map(|reason| Event::Shutdown(Shutdown { reason })),
    ]
}

fn after_download() -> impl Strategy<Value = AfterDownload> {
    prop_oneof![
        Just(AfterDownload::Stage),
        Just(AfterDownload::SetBoot),
        Just(AfterDownload::Reboot),
    ]
}

fn persistence() -> impl Strategy<Value = Persistence> {
    prop_oneof![Just(Persistence::Keep), Just(Persistence::Reset)]
}

fn command() -> impl Strategy<Value = Command> {
    prop_oneof![
        (
            (deployment_id(), image_id(), text()),
            any::<[u8; 20]>(),
            any::<u64>(),
            any::<[u8; 32]>(),
            (text(), text()),
            (after_download(), persistence()),
        )
            .prop_map(
                |(
                    (deployment, image, name),
                    hash,
                    size,
                    sha,
                    (torrent_url, save_path),
                    (action, persistence),
                )| {
                    Command::ArtifactAssignment(ArtifactAssignment {
                        deployment,
                        image,
                        name,
                        info_hash: Bytes(hash),
                        size,
                        sha256: Bytes(sha),
                        torrent_url,
                        save_path,
                        action,
                        persistence,
                    })
                }
            ),
        (deployment_id(), image_id()).prop_map(|(deployment, image)| {
            Command::ArtifactUnassignment(ArtifactUnassignment { deployment, image })
        }),
        (
            prop::collection::vec(zone_id(), 0..4),
            any::<u32>(),
            any::<Option<u64>>(),
            any::<Option<u64>>(),
            text()
        )
            .prop_map(|(zones, heartbeat_interval_secs, down, up, config_hash)| {
                Command::MachineConfiguration(MachineConfiguration {
                    zones,
                    heartbeat_interval_secs,
                    download_limit_bps: down,
                    upload_limit_bps: up,
                    config_hash,
                })
            }),
        (image_id(), prop::option::of(deployment_id()))
            .prop_map(|(image, deployment)| Command::Boot(BootCommand { image, deployment })),
        any::<u32>().prop_map(|delay_secs| Command::Reboot(Reboot { delay_secs })),
    ]
}

fn scope() -> impl Strategy<Value = Scope> {
    prop_oneof![
        Just(Scope::Global),
        zone_id().prop_map(Scope::Zone),
        machine_id().prop_map(Scope::Machine),
    ]
}

fn event_kind() -> impl Strategy<Value = EventKind> {
    prop::sample::select(EventKind::ALL)
}

fn command_kind() -> impl Strategy<Value = CommandKind> {
    prop::sample::select(CommandKind::ALL)
}

fn topic() -> impl Strategy<Value = Topic> {
    prop_oneof![
        (scope(), command_kind()).prop_map(|(scope, kind)| Topic::command(scope, kind)),
        (machine_id(), event_kind()).prop_map(|(machine, kind)| Topic::event(machine, kind)),
    ]
}

/// A body of the same kind that differs from `event`.
fn tamper_event(event: &Event) -> Event {
    let mut event = event.clone();
    match &mut event {
        Event::Startup(b) => b.hostname.push('x'),
        Event::Heartbeat(b) => b.uptime_secs = b.uptime_secs.wrapping_add(1),
        Event::Progress(b) => b.peers = b.peers.wrapping_add(1),
        Event::Status(b) => {
            b.presence = match b.presence {
                Presence::Online => Presence::Offline,
                Presence::Offline => Presence::Online,
            }
        }
        Event::Boot(b) => b.ok = !b.ok,
        Event::Error(b) => b.code.push('x'),
        Event::Shutdown(b) => b.reason.push('x'),
    }
    event
}

/// A body of the same kind that differs from `command`.
fn tamper_command(command: &Command) -> Command {
    let mut command = command.clone();
    match &mut command {
        Command::ArtifactAssignment(b) => b.sha256.0[0] ^= 1,
        Command::ArtifactUnassignment(b) => {
            // Swap the last character, keeping the id valid and its length.
            let s = b.image.as_str();
            let last = if s.ends_with('x') { 'y' } else { 'x' };
            b.image = format!("{}{last}", &s[..s.len() - 1]).parse().unwrap();
        }
        Command::MachineConfiguration(b) => {
            b.upload_limit_bps = b.upload_limit_bps.map_or(Some(0), |_| None)
        }
        Command::Boot(b) => {
            b.deployment = b
                .deployment
                .take()
                .map_or(Some("d".parse().unwrap()), |_| None)
        }
        Command::Reboot(b) => b.delay_secs = b.delay_secs.wrapping_add(1),
    }
    command
}

/// Envelope fields other than the body: `(ts, seq, key seed)`.
fn envelope_fields() -> impl Strategy<Value = (i64, u64, [u8; 32])> {
    (any::<i64>(), any::<u64>(), any::<[u8; 32]>())
}

/// Prefixes under which arbitrary bytes reach each decoder rather than `detect`'s refusal.
fn hostile_payload() -> impl Strategy<Value = Vec<u8>> {
    let prefixes: Vec<Vec<u8>> = [
        b"".as_slice(),
        b"{",
        b" {",
        &[0x80],
        &[0x85],
        &[0x8f],
        &[0xde],
        &[0xdf],
    ]
    .iter()
    .map(|p| p.to_vec())
    .collect();
    (
        prop::sample::select(prefixes),
        prop::collection::vec(any::<u8>(), 0..512),
    )
        .prop_map(|(mut prefix, tail)| {
            prefix.extend(tail);
            prefix
        })
}

fn decode_with_every_kind(bytes: &[u8]) {
    for &kind in EventKind::ALL {
        let _ = decode_event(kind, bytes);
    }
    for &kind in CommandKind::ALL {
        let _ = decode_command(kind, bytes);
    }
}

proptest! {
    #[test]
    fn events_round_trip_signed_in_both_encodings(
        body in event(),
        machine in machine_id(),
        (ts, seq, seed) in envelope_fields(),
    ) {
        let key = SigningKey::from_bytes(&seed);
        let topic = Topic::event(machine.clone(), body.kind());
        let env = Envelope::sign(&topic, SenderId::from(machine), ts, seq, body, &key).unwrap();
        let packed = env.encode(Encoding::MessagePack).unwrap();
        let json = env.encode(Encoding::Json).unwrap();
        prop_assert_eq!(detect(&packed), Ok(Encoding::MessagePack));
        prop_assert_eq!(detect(&json), Ok(Encoding::Json));

        let from_packed = decode_event(env.body.kind(), &packed).unwrap();
        let from_json = decode_event(env.body.kind(), &json).unwrap();
        prop_assert_eq!(&from_packed, &env);
        prop_assert_eq!(&from_json, &from_packed);
        prop_assert_eq!(from_packed.verify(&topic, &key.verifying_key()), Ok(()));
        prop_assert_eq!(from_json.verify(&topic, &key.verifying_key()), Ok(()));
    }

    #[test]
    fn commands_round_trip_signed_in_both_encodings(
        body in command(),
        scope in scope(),
        (ts, seq, seed) in envelope_fields(),
    ) {
        let key = SigningKey::from_bytes(&seed);
        let topic = Topic::command(scope, body.kind());
        let env = Envelope::sign(&topic, SenderId::server(), ts, seq, body, &key).unwrap();
        let packed = env.encode(Encoding::MessagePack).unwrap();
        let json = env.encode(Encoding::Json).unwrap();

        let from_packed = decode_command(env.body.kind(), &packed).unwrap();
        let from_json = decode_command(env.body.kind(), &json).unwrap();
        prop_assert_eq!(&from_packed, &env);
        prop_assert_eq!(&from_json, &from_packed);
        prop_assert_eq!(from_packed.verify(&topic, &key.verifying_key()), Ok(()));
        prop_assert_eq!(from_json.verify(&topic, &key.verifying_key()), Ok(()));
    }

    #[test]
    fn tampered_events_fail_verification(
        body in event(),
        machine in machine_id(),
        other_machine in machine_id(),
        other_kind in event_kind(),
        (ts, seq, seed) in envelope_fields(),
        sig_bit in 0usize..512,
    ) {
        let key = SigningKey::from_bytes(&seed).verifying_key();
        let topic = Topic::event(machine.clone(), body.kind());
        let env = Envelope::sign(&topic, SenderId::from(machine.clone()), ts, seq, body, &SigningKey::from_bytes(&seed)).unwrap();
        prop_assert_eq!(env.verify(&topic, &key), Ok(()));

        let mut t = env.clone();
        t.body = tamper_event(&t.body);
        prop_assert_eq!(t.verify(&topic, &key), Err(EnvelopeError::BadSignature));
        let mut t = env.clone();
        t.ts = t.ts.wrapping_add(1);
        prop_assert_eq!(t.verify(&topic, &key), Err(EnvelopeError::BadSignature));
        let mut t = env.clone();
        t.seq = t.seq.wrapping_add(1);
        prop_assert_eq!(t.verify(&topic, &key), Err(EnvelopeError::BadSignature));
        let mut t = env.clone();
        t.sig.0[sig_bit / 8] ^= 1 << (sig_bit % 8);
        prop_assert_eq!(t.verify(&topic, &key), Err(EnvelopeError::BadSignature));

        if other_kind != env.body.kind() {
            let moved = Topic::event(machine.clone(), other_kind);
            prop_assert_eq!(env.verify(&moved, &key), Err(EnvelopeError::BadSignature));
        }
        if other_machine != machine {
            // Under another machine's topic, with `from` rewritten to match it: the
            // signature still binds the original topic and sender.
            let moved = Topic::event(other_machine.clone(), env.body.kind());
            let mut t = env.clone();
            t.from = SenderId::from(other_machine);
            prop_assert_eq!(t.verify(&moved, &key), Err(EnvelopeError::BadSignature));
        }
    }

    #[test]
    fn tampered_commands_fail_verification(
        body in command(),
        scope in scope(),
        other_scope in scope(),
        other_kind in command_kind(),
        (ts, seq, seed) in envelope_fields(),
    ) {
        let signing = SigningKey::from_bytes(&seed);
        let key = signing.verifying_key();
        let topic = Topic::command(scope.clone(), body.kind());
        let env = Envelope::sign(&topic, SenderId::server(), ts, seq, body, &signing).unwrap();

        let mut t = env.clone();
        t.body = tamper_command(&t.body);
        prop_assert_ne!(&t.body, &env.body);
        prop_assert_eq!(t.verify(&topic, &key), Err(EnvelopeError::BadSignature));
        let mut t = env.clone();
        t.ts = t.ts.wrapping_sub(1);
        prop_assert_eq!(t.verify(&topic, &key), Err(EnvelopeError::BadSignature));
        let mut t = env.clone();
        t.seq = t.seq.wrapping_sub(1);
        prop_assert_eq!(t.verify(&topic, &key), Err(EnvelopeError::BadSignature));
        if other_scope != scope {
            let moved = Topic::command(other_scope, env.body.kind());
            prop_assert_eq!(env.verify(&moved, &key), Err(EnvelopeError::BadSignature));
        }
        if other_kind != env.body.kind() {
            let moved = Topic::command(scope, other_kind);
            prop_assert_eq!(env.verify(&moved, &key), Err(EnvelopeError::BadSignature));
        }
    }

    #[test]
    fn decoding_arbitrary_bytes_never_panics(bytes in hostile_payload()) {
        decode_with_every_kind(&bytes);
    }

    #[test]
    fn decoding_damaged_envelopes_never_panics(
        body in event(),
        json in any::<bool>(),
        edits in prop::collection::vec((any::<prop::sample::Index>(), any::<u8>(), 0u8..3), 1..8),
    ) {
        let key = SigningKey::from_bytes(&[7; 32]);
        let machine: MachineId = "m".parse().unwrap();
        let topic = Topic::event(machine.clone(), body.kind());
        let env = Envelope::sign(&topic, SenderId::from(machine), 0, 0, body, &key).unwrap();
        let encoding = if json { Encoding::Json } else { Encoding::MessagePack };
        let mut bytes = env.encode(encoding).unwrap();
        for (at, byte, op) in edits {
            if bytes.is_empty() {
                break;
            }
            let i = at.index(bytes.len());
            match op {
                0 => bytes[i] = byte,
                1 => bytes.insert(i, byte),
                _ => bytes.truncate(i),
            }
        }
        decode_with_every_kind(&bytes);
    }

    #[test]
    fn topic_parse_never_panics(s in any::<String>()) {
        if let Ok(topic) = s.parse::<Topic>() {
            // Parsing is strict, so anything accepted is already canonical.
            prop_assert_eq!(topic.to_string(), s);
        }
    }

    #[test]
    fn topic_parse_of_near_misses_never_panics(
        segments in prop::collection::vec(
            prop_oneof![
                prop::sample::select(vec![
                    "boottorrent", "cmd", "evt", "global", "zone", "machine", "startup",
                    "reboot", "boot", "+", "#", "", "é", "a b",
                ]).prop_map(str::to_owned),
                id_string(),
            ],
            0..8,
        ),
    ) {
        let s = segments.join("/");
        if let Ok(topic) = s.parse::<Topic>() {
            prop_assert_eq!(topic.to_string(), s);
        }
    }

    #[test]
    fn topics_round_trip_through_display(t in topic()) {
        prop_assert_eq!(t.to_string().parse::<Topic>(), Ok(t));
    }

    #[test]
    fn seq_counter_is_strictly_increasing(
        start in any::<u64>(),
        clock in prop::collection::vec(any::<u64>(), 1..64),
    ) {
        let mut counter = SeqCounter::from_clock(start);
        let mut last = None;
        for now in clock {
            let seq = counter.next(now);
            prop_assert!(seq >= now);
            if let Some(last) = last {
                // Only `u64::MAX` may repeat, where the counter saturates.
                prop_assert!(seq > last || seq == u64::MAX);
            }
            last = Some(seq);
        }
    }

    /// A restarted sender keeps no state; its new seqs still beat the old ones when the
    /// restart took `gap` microseconds and the clock went back by less than that (`back`
    /// = 0 is a clock left alone). The old run sends at most one message per microsecond,
    /// as an agent does by a wide margin.
    #[test]
    fn seq_counter_survives_a_restart(
        start in 0u64..1 << 52,
        steps in prop::collection::vec(1u64..5_000_000, 1..32),
        gap in 1u64..60_000_000,
        back_fraction in 0u64..1000,
    ) {
        let mut now = start;
        let mut old = SeqCounter::from_clock(now);
        let mut guard = ReplayGuard::new(i64::MAX);
        let sender = SenderId::server();
        for step in steps {
            now += step;
            let seq = old.next(now);
            prop_assert_eq!(guard.check(&sender, 0, seq, 0), Ok(()));
            guard.record(&sender, seq);
        }
        let back = gap * back_fraction / 1000;
        let restarted_at = now + gap - back;
        let mut new = SeqCounter::from_clock(restarted_at);
        for i in 0..3 {
            let seq = new.next(restarted_at + i);
            prop_assert_eq!(guard.check(&sender, 0, seq, 0), Ok(()));
            guard.record(&sender, seq);
        }
    }
}

/// The documented limit: a clock stepped back further than the restart took makes the new
/// seqs look replayed, until the clock passes the old seqs again.
#[test]
fn seq_counter_after_a_large_clock_step_back_is_locked_out_until_the_clock_catches_up() {
    let sender = SenderId::server();
    let mut guard = ReplayGuard::new(i64::MAX);
    let mut old = SeqCounter::from_clock(10_000_000);
    let last = old.next(10_000_000);
    guard.record(&sender, last);

    // Restarted 1 s later, but the clock was stepped back by 5 s.
    let mut new = SeqCounter::from_clock(6_000_000);
    let seq = new.next(6_000_000);
    assert_eq!(
        guard.check(&sender, 0, seq, 0),
        Err(ReplayError::Replayed { seq, last })
    );
    // Once the clock is past the old seq, the sender is accepted again.
    let seq = new.next(last + 1);
    assert_eq!(guard.check(&sender, 0, seq, 0), Ok(()));
}
