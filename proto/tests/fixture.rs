//! Captured wire bytes: a fixed envelope must encode to exactly these bytes, so any change to
//! field names, encodings or the signed byte string shows up here before it reaches agents
//! already in the field. If this fails on purpose, bump `ENVELOPE_VERSION` rather than
//! updating the constants.

use boottorrent_proto::*;

/// `startup_envelope()` as named-field MessagePack.
const STARTUP_MSGPACK_HEX: &str = concat!(
    "86a17601a466726f6da96c6162312d70633037a27473cf0000018bcfe56800a3736571cf00060a24",
    "181e4000a4626f647988ad6167656e745f76657273696f6ea5302e312e30a8686f73746e616d65a4",
    "50433037a26f73af57696e646f77732031312032334832a369707392ab3139322e3136382e312e37",
    "a7666538303a3a31a46d61637391b130303a31313a32323a33333a34343a3535af667265655f6469",
    "736b5f6279746573cf0000007735940000a6696d616765739185a5696d616765aa77696e31312d62",
    "617365a9696e666f5f68617368c414ababababababababababababababababababababa573746174",
    "65a773656564696e67aa62797465735f646f6e65cf00000009502f9000ab62797465735f746f7461",
    "6ccf00000009502f9000aa7075626c69635f6b6579c42003a107bff3ce10be1d70dd18e74bc09967",
    "e4d6309ba50d5f1ddc8664125531b8a3736967c4407d0e08fe223afd21c91f8881e55d9d78651b8f",
    "e43bfe5645fbfde951184067fc5407bbb7ede9364d3260da83bbb3b0e16b0e8fd3afaec969b3304f",
    "9c65c7f90b",
);

/// `startup_envelope()` as JSON.
const STARTUP_JSON: &str = r#"{"v":1,"from":"lab1-pc07","ts":1700000000000,"seq":1700000000000000,"body":{"agent_version":"0.1.0","hostname":"PC07","os":"Windows 11 23H2","ips":["192.168.1.7","fe80::1"],"macs":["00:11:22:33:44:55"],"free_disk_bytes":512000000000,"images":[{"image":"win11-base","info_hash":"abababababababababababababababababababab","state":"seeding","bytes_done":40000000000,"bytes_total":40000000000}],"public_key":"03a107bff3ce10be1d70dd18e74bc09967e4d6309ba50d5f1ddc8664125531b8"},"sig":"7d0e08fe223afd21c91f8881e55d9d78651b8fe43bfe5645fbfde951184067fc5407bbb7ede9364d3260da83bbb3b0e16b0e8fd3afaec969b3304f9c65c7f90b"}"#;

fn startup_envelope() -> Envelope<Event> {
    let seed: [u8; 32] = std::array::from_fn(|i| i as u8);
    let key = SigningKey::from_bytes(&seed);
    let machine: MachineId = "lab1-pc07".parse().unwrap();
    let body = Event::Startup(Startup {
        agent_version: "0.1.0".into(),
        hostname: "PC07".into(),
        os: "Windows 11 23H2".into(),
        ips: vec!["192.168.1.7".parse().unwrap(), "fe80::1".parse().unwrap()],
        macs: vec!["00:11:22:33:44:55".into()],
        free_disk_bytes: 512_000_000_000,
        images: vec![HeldImage {
            image: "win11-base".parse().unwrap(),
            info_hash: Bytes([0xab; 20]),
            state: ImageState::Seeding,
            bytes_done: 40_000_000_000,
            bytes_total: 40_000_000_000,
        }],
        public_key: Bytes(key.verifying_key().to_bytes()),
        // An agent that runs no booted image sends what agents sent before `running`
        // existed: these bytes are unchanged, so older servers still take them.
        running: None,
    });
    let topic = Topic::event(machine.clone(), EventKind::Startup);
    Envelope::sign(
        &topic,
        machine.into(),
        1_700_000_000_000,
        1_700_000_000_000_000,
        body,
        &key,
    )
    .unwrap()
}

fn topic() -> Topic {
    "boottorrent/evt/machine/lab1-pc07/startup".parse().unwrap()
}

#[test]
fn startup_messagepack_bytes_are_stable() {
    let env = startup_envelope();
    let packed = env.encode(Encoding::MessagePack).unwrap();
    assert_eq!(hex::encode(&packed), STARTUP_MSGPACK_HEX);

    let fixture = hex::decode(STARTUP_MSGPACK_HEX).unwrap();
    let decoded = decode_event(EventKind::Startup, &fixture).unwrap();
    assert_eq!(decoded, env);
    let Event::Startup(startup) = &decoded.body else {
        panic!("not a startup: {decoded:?}")
    };
    let key = verifying_key_from_bytes(&startup.public_key).unwrap();
    decoded.verify(&topic(), &key).unwrap();
}

#[test]
fn startup_json_bytes_are_stable() {
    let env = startup_envelope();
    let json = env.encode(Encoding::Json).unwrap();
    assert_eq!(String::from_utf8(json).unwrap(), STARTUP_JSON);

    let decoded = decode_event(EventKind::Startup, STARTUP_JSON.as_bytes()).unwrap();
    assert_eq!(decoded, env);
    let Event::Startup(startup) = &decoded.body else {
        panic!("not a startup: {decoded:?}")
    };
    decoded
        .verify(
            &topic(),
            &verifying_key_from_bytes(&startup.public_key).unwrap(),
        )
        .unwrap();
}

/// A startup that says which image runs: it round-trips in both encodings and its signature
/// holds after decoding, and it differs from the fixture only by the added field.
#[test]
fn startup_with_running_verifies_in_both_encodings() {
    let seed: [u8; 32] = std::array::from_fn(|i| i as u8);
    let key = SigningKey::from_bytes(&seed);
    let mut body = match startup_envelope().body {
        Event::Startup(s) => s,
        other => panic!("not a startup: {other:?}"),
    };
    body.running = Some(RunningImage {
        image: "win11-base".parse().unwrap(),
        deployment: Some("d-1700000000000-00ab".parse().unwrap()),
    });
    let env = Envelope::sign(
        &topic(),
        "lab1-pc07".parse::<MachineId>().unwrap().into(),
        1_700_000_000_000,
        1_700_000_000_000_001,
        Event::Startup(body),
        &key,
    )
    .unwrap();
    for encoding in [Encoding::MessagePack, Encoding::Json] {
        let bytes = env.encode(encoding).unwrap();
        let decoded = decode_event(EventKind::Startup, &bytes).unwrap();
        assert_eq!(decoded, env);
        decoded.verify(&topic(), &key.verifying_key()).unwrap();
    }
    let json = String::from_utf8(env.encode(Encoding::Json).unwrap()).unwrap();
    assert!(
        json.contains(r#""running":{"image":"win11-base","deployment":"d-1700000000000-00ab"}"#),
        "{json}"
    );
}
