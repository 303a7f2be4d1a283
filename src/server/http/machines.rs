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

/// Whether a machine's key is trusted, as the API says it.
fn key_state(k: &KeyRecord) -> KeyState {
    match (&k.approved, &k.pending) {
        (Some(_), None) => KeyState::Approved,
        (Some(_), Some(_)) => KeyState::KeyChanged,
        (None, _) => KeyState::Pending,
    }
}

impl MachineView {
    fn new(m: MachineRecord, k: KeyRecord) -> Self {
        let key_state = key_state(&k);
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

/// Machines in one answer when the request does not say.
pub(super) const MACHINES_PAGE: usize = 500;

/// The most machines one answer may carry.
pub(super) const MAX_MACHINES_PAGE: usize = 1000;

/// Query of `GET /api/v1/machines`: a page, and which machines count.
#[derive(Debug, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct MachinesQuery {
    #[serde(skip_serializing_if = "Option::is_none")]
    limit: Option<usize>,
    /// The page starts after this machine id.
    #[serde(skip_serializing_if = "Option::is_none")]
    after: Option<MachineId>,
    /// Members of this zone.
    #[serde(skip_serializing_if = "Option::is_none")]
    zone: Option<ZoneId>,
    #[serde(skip_serializing_if = "Option::is_none")]
    online: Option<bool>,
    #[serde(skip_serializing_if = "Option::is_none")]
    key_state: Option<KeyState>,
    /// Machines holding this image, in any state.
    #[serde(skip_serializing_if = "Option::is_none")]
    image: Option<ImageId>,
    /// Machines running this image.
    #[serde(skip_serializing_if = "Option::is_none")]
    running: Option<ImageId>,
}

impl MachinesQuery {
    fn keeps(&self, m: &MachineRecord, k: &KeyRecord) -> bool {
        self.zone.as_ref().is_none_or(|z| m.zones.contains(z))
            && self.online.is_none_or(|o| m.online == o)
            && self.key_state.is_none_or(|s| key_state(k) == s)
            && self
                .image
                .as_ref()
                .is_none_or(|i| m.images.iter().any(|h| &h.image == i))
            && self
                .running
                .as_ref()
                .is_none_or(|i| m.running.as_ref().is_some_and(|r| &r.image == i))
    }
}

/// A page of the machines, in id order, that the query's filters keep. A fleet has
/// thousands, so no answer carries them all: when more follow, the `Link` header names the
/// next page (`rel="next"`, the same query after the page's last id).
pub(super) async fn list_machines(
    State(state): State<AppState>,
    query: Result<Query<MachinesQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Response, ApiError> {
    let Query(query) = query.map_err(|e| ApiError::new(StatusCode::BAD_REQUEST, e.body_text()))?;
    let limit = query.limit.unwrap_or(MACHINES_PAGE);
    if limit == 0 || limit > MAX_MACHINES_PAGE {
        return Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            format!(
                "limit {limit} is out of range: ask for 1 to {MAX_MACHINES_PAGE} machines, and \
                 follow the Link header for the next page"
            ),
        ));
    }
    let (page, more) = state
        .store
        .machines_page(query.after.as_ref(), limit, |m, k| query.keeps(m, k))
        .map_err(|e| ApiError::internal("reading machines", e))?;
    let next = match page.last() {
        Some((last, _)) if more => Some(MachinesQuery {
            after: Some(last.id.clone()),
            limit: query.limit,
            ..query
        }),
        _ => None,
    };
    let views: Vec<MachineView> = page
        .into_iter()
        .map(|(m, k)| MachineView::new(m, k))
        .collect();
    let mut response = Json(views).into_response();
    if let Some(next) = next {
        // Ids, zone names and words only: nothing in the query needs escaping beyond this.
        let query = serde_urlencoded::to_string(&next)
            .map_err(|e| ApiError::internal("writing the next page's link", e))?;
        let link = format!("</api/v1/machines?{query}>; rel=\"next\"");
        if let Ok(value) = axum::http::HeaderValue::from_str(&link) {
            response
                .headers_mut()
                .insert(axum::http::header::LINK, value);
        }
    }
    Ok(response)
}

/// `GET /api/v1/fleet`: the fleet counted at a glance, without listing it.
#[derive(Debug, Default, Serialize)]
pub(super) struct FleetSummary {
    machines: u64,
    online: u64,
    /// Machines by key state; only states that occur.
    key_states: BTreeMap<&'static str, u64>,
    /// Per zone: its members and how many of them are online.
    zones: BTreeMap<ZoneId, ZoneCount>,
    /// Per image: how many machines hold it in each state.
    images: BTreeMap<ImageId, BTreeMap<&'static str, u64>>,
    /// Per image: how many machines run it.
    running: BTreeMap<ImageId, u64>,
}

#[derive(Debug, Default, Serialize)]
struct ZoneCount {
    machines: u64,
    online: u64,
}

pub(super) async fn fleet_summary(
    State(state): State<AppState>,
) -> Result<Json<FleetSummary>, ApiError> {
    // Counted from the store's in-memory index: decoding every record took 0.4 s a
    // request at 11,000 machines.
    let mut s = FleetSummary::default();
    state.store.for_each_facets(|_, m| {
        s.machines += 1;
        s.online += u64::from(m.online);
        let word = match key_state(&m.keys) {
            KeyState::Approved => "approved",
            KeyState::Pending => "pending",
            KeyState::KeyChanged => "key_changed",
        };
        *s.key_states.entry(word).or_default() += 1;
        for z in &m.zones {
            let count = s.zones.entry(z.clone()).or_default();
            count.machines += 1;
            count.online += u64::from(m.online);
        }
        for (image, held) in &m.images {
            *s.images
                .entry(image.clone())
                .or_default()
                .entry(held.as_str())
                .or_default() += 1;
        }
        if let Some(image) = &m.running {
            *s.running.entry(image.clone()).or_default() += 1;
        }
    });
    Ok(Json(s))
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

/// `POST /api/v1/machines/{id}/certificate`: a certificate to log in to the external broker
/// with, for the machine's own key. The body ([`boottorrent_proto::CertificateRequest`])
/// names the key and proves it, with the enrollment token. The token admits only a new id: a
/// machine the server holds a key for gets a certificate only for that key, so a token holder
/// cannot log in to the broker as a known machine (nor kick it off with its client id), and the
/// first request for a new id stores its key before answering (as a first `startup` would), so
/// two token holders cannot both get that id, even across a restart.
/// Reserved ids (the server's own) get none.
pub(super) async fn machine_certificate(
    State(state): State<AppState>,
    IdPath(id): IdPath<MachineId>,
    body: String,
) -> Result<Json<boottorrent_proto::CertificateAnswer>, ApiError> {
    let Some(certificates) = state.certificates.clone() else {
        return Err(ApiError::coded(
            ErrorCode::NoSuchEndpoint,
            "this server runs its embedded broker, which takes the agents' MQTT password; \
             certificates are for a server started with --broker",
        ));
    };
    let refuse = |code: ErrorCode, why: String| {
        state.metrics.http_unauthorized();
        ApiError::coded(code, why)
    };
    if crate::server::broker::is_reserved(id.as_str()) {
        return Err(refuse(
            ErrorCode::Forbidden,
            format!("{id} is reserved for the server; no machine may have it"),
        ));
    }
    let request: boottorrent_proto::CertificateRequest =
        serde_json::from_str(&body).map_err(|e| {
            ApiError::coded(
                ErrorCode::InvalidRequest,
                format!(
                    "the body is not a certificate request ({{\"public_key\", \"proof\"}}): {e}"
                ),
            )
        })?;
    let mut presented = [0u8; 32];
    hex::decode_to_slice(request.public_key.trim(), &mut presented).map_err(|e| {
        ApiError::coded(
            ErrorCode::InvalidRequest,
            format!("public_key must be 64 hex digits (an Ed25519 key): {e}"),
        )
    })?;
    let key = boottorrent_proto::verifying_key_from_bytes(&PublicKeyBytes::from(presented))
        .map_err(|e| ApiError::coded(ErrorCode::InvalidRequest, format!("public_key: {e}")))?;
    let password = boottorrent_proto::LoginPassword::parse(request.proof.trim());
    let proof = password.proof.ok_or_else(|| {
        refuse(
            ErrorCode::Unauthorized,
            "the proof is not bt1:<ts>:<signature>:<enrollment token>".into(),
        )
    })?;
    // No replay check: a replayed request gets a certificate for the key in it, which only
    // the holder of that key can use.
    let now = boottorrent_proto::now_ms();
    proof
        .verify(
            boottorrent_proto::Purpose::Certificate,
            &id,
            &key,
            now,
            state.proof_window_ms,
            None,
        )
        .map_err(|e| {
            refuse(
                ErrorCode::Unauthorized,
                format!("certificate request for {id}: {e}"),
            )
        })?;
    if !token_matches(&certificates.enroll_token, password.token) {
        return Err(refuse(
            ErrorCode::Unauthorized,
            "wrong enrollment token (the server keeps it in <data-dir>/enroll.token)".into(),
        ));
    }
    let presented = PublicKeyBytes::from(presented);
    let held = match state.keyring.get(id.as_str()) {
        Some(known) => Some(known.key),
        // A new id, as far as the broker's keys say: the orchestrator stores the key (through
        // the enrollment gate) and answers once it is committed, so the pin outlives a
        // restart. Of two token holders asking for one new id, its single writer lets one win.
        None => match state
            .orchestrator
            .pin_new_key(id.clone(), presented)
            .await
            .map_err(|e| ApiError::coded(ErrorCode::Unavailable, e.to_string()))?
            .map_err(|e| ApiError::internal("storing a new machine's key", e))?
        {
            Pin::Pinned => {
                tracing::info!(machine = %id, key = %fingerprint(&presented), "new machine's key stored for its broker certificate");
                Some(presented)
            }
            Pin::Known(held) => held,
            Pin::Refused(why) => {
                return Err(ApiError::coded(
                    ErrorCode::Unavailable,
                    format!("new machine {id} refused for now ({why:?}); try again later"),
                ));
            }
        },
    };
    if held != Some(presented) {
        let known = held
            .as_ref()
            .map(|k| format!("with key {}", fingerprint(k)))
            .unwrap_or_else(|| "without a key".into());
        return Err(refuse(
            ErrorCode::KeyMismatch,
            format!(
                "machine {id} is known {known}, not {}: a certificate is issued only for the key \
                 the server holds (after a reinstall, `boottorrent machines delete {id}` lets it \
                 enroll again)",
                fingerprint(&presented)
            ),
        ));
    }
    let (certificate, not_after_ms) = certificates
        .ca
        .issue_machine(id.as_str(), &presented.0, now)
        .map_err(|e| ApiError::internal("issuing a machine certificate", format!("{e:#}")))?;
    Ok(Json(boottorrent_proto::CertificateAnswer {
        machine: id,
        certificate,
        ca: certificates.ca.cert_pem().to_owned(),
        not_after_ms,
    }))
}
