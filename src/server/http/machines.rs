//! `/api/v1/machines...` and `/api/v1/log`: machines, their keys and passkeys, and the event log.

use super::*;

/// A machine as the API shows it.
#[derive(Debug, Serialize)]
pub struct MachineView {
    pub id: MachineId,
    pub online: bool,
    pub zones: Vec<ZoneId>,
    /// RFC 3339 time of the last accepted message.
    pub last_seen: String,
    pub first_seen: String,
    pub images: Vec<HeldImage>,
    pub hostname: String,
    pub os: String,
    pub agent_version: String,
    pub ips: Vec<std::net::IpAddr>,
    /// Where the server saw the machine's signed requests come from (subnet zones use it).
    pub observed_ips: Vec<std::net::IpAddr>,
    pub macs: Vec<String>,
    pub free_disk_bytes: u64,
    /// The image the machine runs now, by its last startup; `null` for none BootTorrent
    /// booted (its installed system), or an agent too old to say.
    pub running: Option<boottorrent_proto::RunningImage>,
    /// `approved`, `pending` (new machine waiting), or `key_changed` (known machine presented
    /// another key, waiting).
    pub key_state: KeyState,
    pub public_key: Option<PublicKeyBytes>,
    /// What the agent prints for its key; `machines approve` names it.
    pub fingerprint: Option<String>,
    pub pending_key: Option<PublicKeyBytes>,
    pub pending_fingerprint: Option<String>,
}

impl MachineView {
    fn new(m: MachineRecord, k: KeyRecord) -> Self {
        let key_state = match (&k.approved, &k.pending) {
            (Some(_), None) => KeyState::Approved,
            (Some(_), Some(_)) => KeyState::KeyChanged,
            (None, _) => KeyState::Pending,
        };
        MachineView {
            id: m.id,
            online: m.online,
            zones: m.zones,
            last_seen: rfc3339(m.last_seen_ms),
            first_seen: rfc3339(m.first_seen_ms),
            images: m.images,
            hostname: m.hostname,
            os: m.os,
            agent_version: m.agent_version,
            ips: m.ips,
            observed_ips: m.observed_ips,
            macs: m.macs,
            free_disk_bytes: m.free_disk_bytes,
            running: m.running,
            key_state,
            public_key: k.approved,
            fingerprint: k.approved.as_ref().map(fingerprint),
            pending_key: k.pending,
            pending_fingerprint: k.pending.as_ref().map(fingerprint),
        }
    }
}

pub(super) async fn list_machines(
    State(state): State<AppState>,
) -> Result<Json<Vec<MachineView>>, ApiError> {
    let machines = state
        .store
        .machines()
        .map_err(|e| ApiError::internal("reading machines", e))?;
    Ok(Json(
        machines
            .into_iter()
            .map(|(m, k)| MachineView::new(m, k))
            .collect(),
    ))
}

pub(super) async fn show_machine(
    State(state): State<AppState>,
    IdPath(id): IdPath<MachineId>,
) -> Result<Json<MachineView>, ApiError> {
    match state.store.machine(&id) {
        Ok(Some((m, k))) => Ok(Json(MachineView::new(m, k))),
        Ok(None) => Err(ApiError::new(
            StatusCode::NOT_FOUND,
            format!("no machine {id}"),
        )),
        Err(e) => Err(ApiError::internal("reading machine", e)),
    }
}

pub(super) async fn approve_machine(
    State(state): State<AppState>,
    _admin: Admin,
    IdPath(id): IdPath<MachineId>,
    body: Result<Json<Approve>, axum::extract::rejection::JsonRejection>,
) -> Result<Json<MachineChange>, ApiError> {
    let body = json_body(body)?;
    let result = state
        .orchestrator
        .approve(id.clone(), body.fingerprint)
        .await
        .map_err(|e| ApiError::new(StatusCode::SERVICE_UNAVAILABLE, e.to_string()))?;
    let (outcome, key) = match result {
        Ok(Approval::Approved(key)) => (MachineOutcome::Approved, key),
        Ok(Approval::AlreadyApproved(key)) => (MachineOutcome::AlreadyApproved, key),
        Err(e) => return Err(ApiError::from(e)),
    };
    Ok(Json(MachineChange {
        id,
        outcome,
        fingerprint: Some(fingerprint(&key)),
        public_key: Some(key),
    }))
}

/// Forgets a machine: rejects a waiting key, or lets a reinstalled machine enroll again.
pub(super) async fn delete_machine(
    State(state): State<AppState>,
    _admin: Admin,
    IdPath(id): IdPath<MachineId>,
) -> Result<Json<MachineChange>, ApiError> {
    let record = state
        .orchestrator
        .delete_machine(id.clone())
        .await
        .map_err(|e| ApiError::new(StatusCode::SERVICE_UNAVAILABLE, e.to_string()))?
        .map_err(ApiError::from)?;
    Ok(Json(MachineChange {
        id: record.id,
        outcome: MachineOutcome::Deleted,
        public_key: None,
        fingerprint: None,
    }))
}

/// Query of `GET /api/v1/log`.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct EventsQuery {
    limit: Option<usize>,
}

/// The largest page of the event log one request may ask for.
pub(super) const MAX_EVENTS: usize = 1000;

/// The newest entries of the machine event log (registrations, approvals, offline, boot
/// reports), oldest first.
pub(super) async fn recent_log(
    State(state): State<AppState>,
    query: Result<Query<EventsQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Json<Vec<EventView>>, ApiError> {
    let Query(query) = query.map_err(|e| ApiError::new(StatusCode::BAD_REQUEST, e.body_text()))?;
    let limit = query.limit.unwrap_or(100);
    if limit == 0 || limit > MAX_EVENTS {
        return Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            format!("limit {limit} is out of range: ask for 1 to {MAX_EVENTS} events"),
        ));
    }
    let entries = state
        .store
        .recent_log(limit)
        .map_err(|e| ApiError::internal("reading the event log", e))?;
    Ok(Json(entries.into_iter().map(EventView::from).collect()))
}

/// An event log entry as the API shows it.
#[derive(Serialize)]
pub(super) struct EventView {
    seq: u64,
    at: String,
    machine: Option<MachineId>,
    kind: String,
    detail: String,
}

impl From<LogEntry> for EventView {
    fn from(e: LogEntry) -> Self {
        EventView {
            seq: e.seq,
            at: rfc3339(e.at_ms),
            machine: e.machine,
            kind: e.kind,
            detail: e.detail,
        }
    }
}

/// `POST /api/v1/machines/{id}/passkey`: a machine's tracker passkey, for a body proving it
/// holds the machine's approved key (see `boottorrent_proto::passkey_request`). The passkey
/// never goes over MQTT: an external broker, or a listener added in a broker file, has no
/// topic rules to keep other logins from reading it.
pub(super) async fn machine_passkey(
    State(state): State<AppState>,
    IdPath(id): IdPath<MachineId>,
    ConnectInfo(remote): ConnectInfo<std::net::SocketAddr>,
    body: String,
) -> Result<Json<boottorrent_proto::PasskeyAnswer>, ApiError> {
    let refuse = |why: String| {
        state.metrics.http_unauthorized();
        ApiError::new(StatusCode::UNAUTHORIZED, why)
    };
    let Some(known) = state.keyring.get(id.as_str()).filter(|k| k.approved) else {
        return Err(refuse(format!(
            "machine {id} is not approved; approve it (`boottorrent machines approve`) first"
        )));
    };
    let proof = boottorrent_proto::LoginPassword::parse(body.trim())
        .proof
        .ok_or_else(|| {
            refuse("the body is not a passkey request (bt1:<ts>:<signature>:)".into())
        })?;
    let key = boottorrent_proto::verifying_key_from_bytes(&known.key)
        .map_err(|e| ApiError::internal("reading the machine's key", e))?;
    proof
        .verify(
            boottorrent_proto::Purpose::Passkey,
            &id,
            &key,
            boottorrent_proto::now_ms(),
            state.proof_window_ms,
            None,
        )
        .map_err(|e| refuse(format!("passkey request for {id}: {e}")))?;
    // Signed by the machine's key, from this address: what its subnet zones go by.
    state.orchestrator.observed(id.clone(), remote.ip());
    Ok(Json(boottorrent_proto::PasskeyAnswer {
        passkey: state.passkeys.passkey(id.as_str()),
        machine: id,
    }))
}
