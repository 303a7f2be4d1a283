//! The router in process: who may do what, and how each kind of failure is answered.
//!
//! Each test builds the real state (a redb store in a temporary directory, the catalog and a
//! seeder on loopback) and sends requests through `router` with `oneshot`. The orchestrator's
//! end of the channel is dropped, so a change that reaches it is answered as the server
//! answers when its orchestrator has stopped (503): the tests here are about the HTTP layer.
//! The whole server over real sockets, with agents and real clients, is tested in tests/.

use axum::body::Body;
use axum::http::Request;
use tower::ServiceExt;

use super::*;
use crate::server::passkey::Grants;

const ADMIN: &str = "admin-token-for-tests";
const VIEWER: &str = "viewer-token-for-tests";
const METRICS: &str = "metrics-token-for-tests";

struct Fixture {
    state: AppState,
    _dir: tempfile::TempDir,
}

async fn fixture() -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(&dir.path().join("state.redb")).unwrap();
    let server_key = boottorrent_proto::generate_signing_key().unwrap();
    let keyring = Keyring::default();
    let passkeys = Passkeys::new(&server_key, keyring.clone(), Grants::default());
    let tracker = Arc::new(Tracker::new(Default::default()));
    let seeder = boottorrent_swarm::session::Session::start(
        boottorrent_swarm::session::SessionConfig {
            listen: "127.0.0.1:0".parse().unwrap(),
            ..Default::default()
        },
        CancellationToken::new(),
    )
    .await
    .unwrap();
    let seeder_port = seeder.local_addr().port();
    let catalog = Catalog::start(
        store.clone(),
        seeder,
        tracker.clone(),
        "http://127.0.0.1:1".into(),
        dir.path(),
        passkeys.clone(),
        tokio_util::task::TaskTracker::new(),
        CancellationToken::new(),
    )
    .unwrap();
    // The orchestrator is not running: its requests fail as after it stopped.
    let (orchestrator, _) = orchestrator::channel();
    let state = AppState {
        live: tokio::sync::broadcast::channel(16).0,
        shutdown: CancellationToken::new(),
        locality: Arc::new(ServerLocality::new(store.clone(), seeder_port)),
        store,
        metrics: Arc::default(),
        health: Health::default(),
        admin_token: Secret::new(ADMIN.into()),
        viewer_token: Secret::new(VIEWER.into()),
        metrics_token: None,
        listener: Arc::default(),
        server_key: server_key.verifying_key(),
        orchestrator,
        catalog,
        tracker,
        passkeys,
        keyring,
        proof_window_ms: 30_000,
        https_url: None,
        certificates: None,
    };
    Fixture { state, _dir: dir }
}

/// A request with `token` as its bearer token, if any, and `body` as JSON, if any.
fn request(method: &str, uri: &str, token: Option<&str>, body: Option<&str>) -> Request<Body> {
    let mut builder = Request::builder().method(method).uri(uri);
    if let Some(token) = token {
        builder = builder.header(header::AUTHORIZATION, format!("Bearer {token}"));
    }
    match body {
        Some(json) => builder
            .header(header::CONTENT_TYPE, "application/json")
            .body(Body::from(json.to_owned())),
        None => builder.body(Body::empty()),
    }
    .unwrap()
}

/// Sends `request` through the router; the status, the `WWW-Authenticate` header and the body.
async fn send(state: &AppState, request: Request<Body>) -> (StatusCode, Option<String>, Vec<u8>) {
    let response = router(state.clone()).oneshot(request).await.unwrap();
    let status = response.status();
    let challenge = response
        .headers()
        .get(header::WWW_AUTHENTICATE)
        .map(|v| v.to_str().unwrap().to_owned());
    let body = axum::body::to_bytes(response.into_body(), 1 << 20)
        .await
        .unwrap();
    (status, challenge, body.to_vec())
}

/// The error answer of `request`: its status and its body, which must be the API's.
async fn refusal(state: &AppState, request: Request<Body>) -> (StatusCode, ErrorBody) {
    let (status, _, body) = send(state, request).await;
    let error: ErrorBody = serde_json::from_slice(&body)
        .unwrap_or_else(|e| panic!("not the API's error body ({e}): {body:?}"));
    assert_eq!(error.code.status(), status.as_u16(), "{error:?}");
    (status, error)
}

#[tokio::test]
async fn reads_need_a_token_and_say_which() {
    let f = fixture().await;
    let (status, challenge, body) =
        send(&f.state, request("GET", "/api/v1/machines", None, None)).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    assert_eq!(challenge.as_deref(), Some("Bearer"));
    let error: ErrorBody = serde_json::from_slice(&body).unwrap();
    assert_eq!(error.code, ErrorCode::Unauthorized);
    assert!(error.error.contains("admin.token"), "{}", error.error);

    let (_, error) = refusal(
        &f.state,
        request("GET", "/api/v1/zones", Some("guess"), None),
    )
    .await;
    assert_eq!(error.code, ErrorCode::Unauthorized);
    assert!(error.error.contains("neither"), "{}", error.error);

    for token in [ADMIN, VIEWER] {
        let (status, _, body) = send(
            &f.state,
            request("GET", "/api/v1/machines", Some(token), None),
        )
        .await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(
            serde_json::from_slice::<serde_json::Value>(&body).unwrap(),
            serde_json::json!([])
        );
    }
    // Both refusals were counted, the successes were not.
    assert_eq!(f.state.metrics.snapshot().http_unauthorized, 2);
}

#[tokio::test]
async fn changes_need_the_admin_token() {
    let f = fixture().await;
    for (method, uri, body) in [
        ("DELETE", "/api/v1/zones/lab", None),
        (
            "PUT",
            "/api/v1/zones/lab",
            Some(r#"{"machines": ["pc-01"]}"#),
        ),
        ("DELETE", "/api/v1/deployments/d-1", None),
        ("DELETE", "/api/v1/machines/pc-01", None),
    ] {
        let (status, error) = refusal(&f.state, request(method, uri, Some(VIEWER), body)).await;
        assert_eq!(status, StatusCode::FORBIDDEN, "{method} {uri}");
        assert_eq!(error.code, ErrorCode::ReadOnlyToken, "{method} {uri}");
    }
    // The admin token passes; with the orchestrator stopped, the change is refused as
    // unavailable (retry later) rather than lost or half done.
    let (status, error) = refusal(
        &f.state,
        request("DELETE", "/api/v1/zones/lab", Some(ADMIN), None),
    )
    .await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(error.code, ErrorCode::Unavailable);
    assert!(error.code.is_transient());
}

#[tokio::test]
async fn tokens_in_clear_are_refused_where_https_exists() {
    let mut f = fixture().await;
    f.state.https_url = Some("https://server:8443".into());
    let (status, error) = refusal(
        &f.state,
        request("GET", "/api/v1/machines", Some(ADMIN), None),
    )
    .await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    assert_eq!(error.code, ErrorCode::HttpsRequired);
    assert!(
        error.error.contains("https://server:8443"),
        "{}",
        error.error
    );

    let mut over_tls = request("GET", "/api/v1/machines", Some(ADMIN), None);
    over_tls.extensions_mut().insert(Transport::Tls);
    assert_eq!(send(&f.state, over_tls).await.0, StatusCode::OK);
}

#[tokio::test]
async fn ids_in_paths_are_checked_and_named() {
    let f = fixture().await;
    for (uri, what) in [
        ("/api/v1/machines/pc%2001", "machine id"),
        ("/api/v1/zones/lab%2F2", "zone id"),
        ("/api/v1/deployments/%C3%A9", "deployment id"),
    ] {
        let (status, error) = refusal(&f.state, request("GET", uri, Some(ADMIN), None)).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{uri}");
        assert_eq!(error.code, ErrorCode::InvalidRequest, "{uri}");
        assert!(error.error.starts_with(what), "{uri}: {}", error.error);
    }
    let (status, error) = refusal(
        &f.state,
        request("GET", "/api/v1/deployments/d-9", Some(ADMIN), None),
    )
    .await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    assert_eq!(error.code, ErrorCode::NotFound);
    assert!(error.error.contains("deployments list"), "{}", error.error);
}

#[tokio::test]
async fn unknown_endpoints_are_told_apart_from_unknown_things() {
    let f = fixture().await;
    let (status, error) = refusal(
        &f.state,
        request("GET", "/api/v2/machines", Some(ADMIN), None),
    )
    .await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    assert_eq!(error.code, ErrorCode::NoSuchEndpoint);
}

#[tokio::test]
async fn malformed_deployment_requests_say_what_is_wrong() {
    let f = fixture().await;
    let post = |body: &str| request("POST", "/api/v1/deployments", Some(ADMIN), Some(body));
    for body in [
        "{",
        r#"{"image": 1, "target": {"global": true}}"#,
        r#"{"image": "win11", "target": {"global": true}, "colour": "red"}"#,
        r#"{"image": "win11", "target": {"zone": "no such/zone"}}"#,
        r#"{"image": "win11", "target": {"zone": "lab"}, "action": "format_disk"}"#,
    ] {
        let (status, error) = refusal(&f.state, post(body)).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
        assert_eq!(error.code, ErrorCode::InvalidRequest, "{body}");
        assert!(!error.error.is_empty(), "{body}");
    }
    // Well formed, but nothing by that name in the catalog.
    let (status, error) = refusal(
        &f.state,
        post(r#"{"image": "win11", "target": {"zone": "lab"}}"#),
    )
    .await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    assert!(
        error.error.contains("no image \"win11\""),
        "{}",
        error.error
    );
    // The body the client sends is the one the server reads.
    let ours = serde_json::to_string(&CreateDeployment {
        image: "win11".into(),
        target: crate::api::Target::Zone("lab".parse().unwrap()),
        action: crate::api::Action::Reboot,
        persistence: boottorrent_proto::Persistence::Reset,
    })
    .unwrap();
    assert_eq!(
        refusal(&f.state, post(&ours)).await.0,
        StatusCode::NOT_FOUND
    );
}

#[tokio::test]
async fn health_names_each_degraded_subsystem() {
    let f = fixture().await;
    let (status, _, body) = send(&f.state, request("GET", "/healthz", None, None)).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(
        serde_json::from_slice::<serde_json::Value>(&body).unwrap(),
        serde_json::json!({"status": "ok"})
    );
    f.state.health.degraded("mqtt_link", "broker unreachable");
    let (status, _, body) = send(&f.state, request("GET", "/healthz", None, None)).await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(
        serde_json::from_slice::<serde_json::Value>(&body).unwrap(),
        serde_json::json!({"status": "degraded", "problems": {"mqtt_link": "broker unreachable"}})
    );
}

#[tokio::test]
async fn metrics_take_their_token_when_one_is_set() {
    let mut f = fixture().await;
    let (status, _, body) = send(&f.state, request("GET", "/metrics", None, None)).await;
    assert_eq!(status, StatusCode::OK, "open by default");
    assert!(
        String::from_utf8(body)
            .unwrap()
            .contains("boottorrent_tracker_announces_total 0")
    );

    f.state.metrics_token = Some(Secret::new(METRICS.into()));
    let (status, _) = refusal(&f.state, request("GET", "/metrics", None, None)).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    let (status, _) = refusal(&f.state, request("GET", "/metrics", Some("guess"), None)).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    for token in [METRICS, ADMIN, VIEWER] {
        let (status, _, _) = send(&f.state, request("GET", "/metrics", Some(token), None)).await;
        assert_eq!(status, StatusCode::OK);
    }
}

#[tokio::test]
async fn error_kinds_follow_their_status_unless_told_otherwise() {
    async fn answer(error: ApiError) -> (StatusCode, bool, ErrorBody) {
        let response = error.into_response();
        let status = response.status();
        let challenge = response.headers().contains_key(header::WWW_AUTHENTICATE);
        let body = axum::body::to_bytes(response.into_body(), 1 << 16)
            .await
            .unwrap();
        (status, challenge, serde_json::from_slice(&body).unwrap())
    }
    for (status, code) in [
        (StatusCode::BAD_REQUEST, ErrorCode::InvalidRequest),
        (StatusCode::UNAUTHORIZED, ErrorCode::Unauthorized),
        (StatusCode::FORBIDDEN, ErrorCode::Forbidden),
        (StatusCode::NOT_FOUND, ErrorCode::NotFound),
        (StatusCode::CONFLICT, ErrorCode::Conflict),
        (StatusCode::SERVICE_UNAVAILABLE, ErrorCode::Unavailable),
        (StatusCode::INTERNAL_SERVER_ERROR, ErrorCode::Internal),
        (StatusCode::IM_A_TEAPOT, ErrorCode::Internal),
    ] {
        let (answered, challenge, body) = answer(ApiError::new(status, "what failed")).await;
        assert_eq!((answered, body.code), (status, code));
        assert_eq!(body.error, "what failed");
        // Only a missing or wrong credential asks for one.
        assert_eq!(challenge, status == StatusCode::UNAUTHORIZED, "{status}");
    }
    let (status, _, body) = answer(ApiError::coded(ErrorCode::KeyMismatch, "not that key")).await;
    assert_eq!(
        (status, body.code),
        (StatusCode::CONFLICT, ErrorCode::KeyMismatch)
    );
    // A machine's request for an image it was not given is told apart from a bad token.
    let (status, challenge, body) = answer(ApiError::coded(ErrorCode::NotGiven, "no")).await;
    assert_eq!(
        (status, body.code),
        (StatusCode::FORBIDDEN, ErrorCode::NotGiven)
    );
    assert!(!challenge);
}

/// The next server-sent event of `body` that is not a keep-alive: its type and its data.
async fn next_event(
    body: &mut axum::body::BodyDataStream,
    buffer: &mut String,
) -> (String, serde_json::Value) {
    use futures_util::StreamExt;
    loop {
        if let Some(end) = buffer.find("\n\n") {
            let block: String = buffer.drain(..end + 2).collect();
            let field = |name: &str| {
                block
                    .lines()
                    .find_map(|l| l.strip_prefix(name)?.strip_prefix(':'))
                    .map(|v| v.trim_start().to_owned())
            };
            if let (Some(kind), Some(data)) = (field("event"), field("data")) {
                return (kind, serde_json::from_str(&data).unwrap());
            }
            continue;
        }
        let chunk = tokio::time::timeout(std::time::Duration::from_secs(10), body.next())
            .await
            .expect("an event within 10 s")
            .expect("the stream goes on")
            .unwrap();
        buffer.push_str(std::str::from_utf8(&chunk).unwrap());
    }
}

/// A dashboard watching a deployment of thousands asks for a few machine rows: the replayed
/// and the live `deployment` events carry those, furthest behind first, and how many more; a
/// watcher that does not ask gets every machine.
#[tokio::test]
async fn event_streams_cut_deployments_short_when_asked() {
    let f = fixture().await;
    let mut d = Deployment::new(
        "d-1".parse().unwrap(),
        ImageRef::sample(),
        crate::api::Target::Global(true),
        crate::api::Action::Stage,
        0,
    );
    for i in 0..30 {
        d.add_machine(&format!("pc-{i:02}").parse().unwrap(), 100, 0);
    }
    f.state.store.write(|b| b.put_deployment(&d)).unwrap();
    let open = |uri: &str| {
        let state = f.state.clone();
        let request = request("GET", uri, Some(VIEWER), None);
        async move {
            let response = router(state).oneshot(request).await.unwrap();
            assert_eq!(response.status(), StatusCode::OK);
            response.into_body().into_data_stream()
        }
    };
    let rows = |data: &serde_json::Value| data["machines"].as_array().unwrap().len();

    let (mut cut, mut cut_buffer) = (open("/api/v1/events?machines=3").await, String::new());
    let (kind, replayed) = next_event(&mut cut, &mut cut_buffer).await;
    assert_eq!(kind, "deployment");
    assert_eq!(
        (rows(&replayed), &replayed["more_machines"]),
        (3, &27.into())
    );
    let (mut whole, mut whole_buffer) = (open("/api/v1/events").await, String::new());
    let (_, replayed) = next_event(&mut whole, &mut whole_buffer).await;
    assert_eq!(rows(&replayed), 30);
    assert!(replayed.get("more_machines").is_none(), "{replayed}");

    // A live change: one machine failed goes first in the cut.
    d.machines
        .get_mut(&"pc-17".parse::<MachineId>().unwrap())
        .unwrap()
        .state = crate::api::MachineState::Failed;
    f.state.live.send(Live::deployment(d)).unwrap();
    let (kind, live) = next_event(&mut cut, &mut cut_buffer).await;
    assert_eq!(kind, "deployment");
    assert_eq!(rows(&live), 3, "{live}");
    assert_eq!(live["machines"][0]["id"], "pc-17");
    assert_eq!(live["more_machines"], 27);
    assert_eq!(live["counts"]["pending"], 29);
    let (_, live) = next_event(&mut whole, &mut whole_buffer).await;
    assert_eq!(rows(&live), 30);

    let (status, error) = refusal(
        &f.state,
        request("GET", "/api/v1/events?machines=1001", Some(VIEWER), None),
    )
    .await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{error:?}");
}

/// Runs the real orchestrator for `state` (its applier thread, a registry on the fixture's
/// store with the keyring `state` reads, a fleet), linked to an in-process rumqttd router
/// without listeners; new machines wait for approval, at most `max_pending` at once. Cancel
/// the token and await the task to stop it, as the server stops.
fn run_orchestrator(
    state: &mut AppState,
    max_pending: u32,
) -> (
    CancellationToken,
    tokio::task::JoinHandle<anyhow::Result<()>>,
) {
    let now = boottorrent_proto::now_ms();
    let registry = crate::server::registry::Registry::new(
        state.store.clone(),
        crate::server::registry::Settings {
            auto_approve: false,
            heartbeat_interval_secs: 30,
            replay_window_ms: 300_000,
            enrollment: crate::server::enrollment::Limits {
                per_minute: 100,
                max_pending,
            },
        },
        boottorrent_proto::generate_signing_key().unwrap(),
        state.keyring.clone(),
        state.metrics.clone(),
        now,
    )
    .unwrap();
    let fleet = crate::server::fleet::Fleet::load(
        state.store.clone(),
        &[],
        600,
        900,
        state.live.clone(),
        Grants::default(),
    )
    .unwrap();
    let config: rumqttd::Config = toml::from_str(crate::server::broker::EMBEDDED_CONFIG).unwrap();
    let broker = rumqttd::Broker::new(config);
    let (link_tx, link_rx) = broker.link("boottorrent-orchestrator").unwrap();
    let link = orchestrator::BrokerLink::Embedded(crate::server::broker::Running {
        link_tx,
        link_rx,
        spares: Vec::new(),
    });
    let (handle, requests) = orchestrator::channel();
    state.orchestrator = handle;
    let stop = CancellationToken::new();
    let task = tokio::spawn(orchestrator::run(
        link,
        registry,
        fleet,
        requests,
        state.live.clone(),
        state.metrics.clone(),
        Health::default(),
        std::time::Duration::from_secs(10),
        stop.clone(),
    ));
    (stop, task)
}

/// The broker certificate endpoint, with new machines waiting for approval: the token admits
/// a new id once, up to the cap on waiting machines, and never a known id with another key,
/// not even after a restart (the pin is stored before the certificate is issued).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broker_certificates_pin_new_ids_and_respect_the_waiting_cap() {
    let mut fixture = fixture().await;
    let ca_dir = tempfile::tempdir().unwrap();
    const ENROLL: &str = "enroll-token-for-tests";
    fixture.state.certificates = Some(Arc::new(crate::server::machine_ca::Certificates {
        ca: crate::server::machine_ca::MachineCa::load_or_create(ca_dir.path()).unwrap(),
        enroll_token: Secret::new(ENROLL.into()),
    }));
    let (stop, orchestrator) = run_orchestrator(&mut fixture.state, 2);
    let state = &fixture.state;
    let ask = |id: &str, key: &boottorrent_proto::SigningKey, token: &str| {
        let body = serde_json::to_string(&boottorrent_proto::certificate_request(
            &id.parse().unwrap(),
            key,
            token,
            boottorrent_proto::now_ms(),
        ))
        .unwrap();
        request(
            "POST",
            &format!("/api/v1/machines/{id}/certificate"),
            None,
            Some(&body),
        )
    };
    let key = |seed: u8| boottorrent_proto::SigningKey::from_bytes(&[seed; 32]);

    let (status, _, body) = send(state, ask("pc-1", &key(1), ENROLL)).await;
    assert_eq!(status, StatusCode::OK, "{}", String::from_utf8_lossy(&body));
    let answer: boottorrent_proto::CertificateAnswer = serde_json::from_slice(&body).unwrap();
    assert_eq!(answer.machine.as_str(), "pc-1");
    assert!(answer.certificate.contains("BEGIN CERTIFICATE"));
    assert!(
        !state.keyring.get("pc-1").unwrap().approved,
        "pinned, waiting"
    );
    // Again for the same key: fine (renewal); for another key: refused.
    assert_eq!(
        send(state, ask("pc-1", &key(1), ENROLL)).await.0,
        StatusCode::OK
    );
    let (status, error) = refusal(state, ask("pc-1", &key(2), ENROLL)).await;
    assert_eq!(status, StatusCode::CONFLICT, "{error:?}");
    // Reserved ids, a wrong token, a proof by another key than the one presented.
    let (status, _) = refusal(state, ask("boottorrent-seeder", &key(3), ENROLL)).await;
    assert_eq!(status, StatusCode::FORBIDDEN);
    let (status, _) = refusal(state, ask("pc-3", &key(3), "wrong-token-for-tests")).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    let mut forged: serde_json::Value = serde_json::from_str(
        &serde_json::to_string(&boottorrent_proto::certificate_request(
            &"pc-3".parse().unwrap(),
            &key(3),
            ENROLL,
            boottorrent_proto::now_ms(),
        ))
        .unwrap(),
    )
    .unwrap();
    forged["public_key"] = hex::encode(key(4).verifying_key().to_bytes()).into();
    let (status, _) = refusal(
        state,
        request(
            "POST",
            "/api/v1/machines/pc-3/certificate",
            None,
            Some(&forged.to_string()),
        ),
    )
    .await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    assert!(state.keyring.get("pc-3").is_none(), "nothing pinned");
    // Two machines may wait (max_pending 2): the third new id is refused for now.
    assert_eq!(
        send(state, ask("pc-2", &key(2), ENROLL)).await.0,
        StatusCode::OK
    );
    let (status, error) = refusal(state, ask("pc-4", &key(4), ENROLL)).await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{error:?}");
    assert!(state.keyring.get("pc-4").is_none());
    // Stored, not only pinned in memory: the API shows pc-1 waiting with its key.
    let (status, _, body) = send(
        state,
        request("GET", "/api/v1/machines/pc-1", Some(VIEWER), None),
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    let shown: serde_json::Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(shown["key_state"], "pending", "{shown}");
    assert_eq!(
        shown["pending_key"],
        hex::encode(key(1).verifying_key().to_bytes()),
        "{shown}"
    );

    // A restart: a new orchestrator and keyring over the same database. Another key for
    // pc-1 is still refused, and pc-1's own key still gets its renewal.
    stop.cancel();
    orchestrator.await.unwrap().unwrap();
    fixture.state.keyring = Keyring::default();
    let (stop, orchestrator) = run_orchestrator(&mut fixture.state, 2);
    let state = &fixture.state;
    let (status, error) = refusal(state, ask("pc-1", &key(5), ENROLL)).await;
    assert_eq!(status, StatusCode::CONFLICT, "{error:?}");
    assert_eq!(
        send(state, ask("pc-1", &key(1), ENROLL)).await.0,
        StatusCode::OK
    );
    assert!(!state.keyring.get("pc-1").unwrap().approved);
    // Two token holders asking for one new id at once: the single writer lets exactly one
    // have it (pc-2 was approved to make room under the cap).
    let (status, _, body) = send(
        state,
        request(
            "POST",
            "/api/v1/machines/pc-2/approve",
            Some(ADMIN),
            Some(&serde_json::json!({ "fingerprint": fingerprint(&key(2).verifying_key().to_bytes().into()) }).to_string()),
        ),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{}", String::from_utf8_lossy(&body));
    let (first, second) = tokio::join!(
        send(state, ask("pc-9", &key(6), ENROLL)),
        send(state, ask("pc-9", &key(7), ENROLL))
    );
    let mut statuses = [first.0, second.0];
    statuses.sort();
    assert_eq!(statuses, [StatusCode::OK, StatusCode::CONFLICT]);
    stop.cancel();
    orchestrator.await.unwrap().unwrap();
}
