//! The HTTP listener: REST API, health and metrics, the BitTorrent tracker (`/announce`,
//! `/scrape`), `.torrent` downloads and the dashboard.
//!
//! Reads go straight to the store (redb snapshots run beside the orchestrator's writes);
//! mutations go through the orchestrator, the single writer of machine state.
//!
//! Who may do what: everything under `/api/v1` needs a bearer token, the admin token or the
//! read-only viewer token ([`require_reader`]), except `server-key`, which agents fetch before
//! they hold any credential (they compare its fingerprint out of band). Changes need the
//! admin token ([`Admin`]); the viewer token gets 403 there. `/healthz` is open, `/metrics`
//! is open unless `metrics_token` is set. The tracker, `.torrent` downloads and the
//! dashboard's static files are open.

use std::sync::Arc;

use axum::extract::rejection::PathRejection;
use axum::extract::{ConnectInfo, FromRequestParts, Path, Query, RawQuery, State};
use axum::http::request::Parts;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use boottorrent_proto::{
    DeploymentId, HeldImage, ImageId, MachineId, PublicKeyBytes, VerifyingKey, ZoneId, fingerprint,
};
use boottorrent_tracker::swarm::Tracker;
use serde::{Deserialize, Serialize};
use tokio_util::sync::CancellationToken;

use crate::api::{ErrorBody, ErrorCode, ImageStatus};
use crate::server::catalog::{Catalog, CatalogError, ImageView};
use crate::server::config::Secret;
use crate::server::credentials::token_matches;
use crate::server::deployment::{Action, Deployment, ImageRef, OverallState, Target};
use crate::server::fleet::{FleetError, Live, NewDeployment};
use crate::server::health::Health;
use crate::server::keyring::Keyring;
use crate::server::listener::Transport;
use crate::server::locality::ServerLocality;
use crate::server::metrics::Metrics;
use crate::server::orchestrator;
use crate::server::passkey::Passkeys;
use crate::server::registry::{Approval, ApproveError};
use crate::server::store::{KeyRecord, LogEntry, MachineRecord, Store};
use crate::server::zone::{Zone, ZoneSpec};

/// Shared state of every handler.
#[derive(Clone)]
pub struct AppState {
    /// Live events for `GET /api/v1/events`, sent by the orchestrator.
    pub live: tokio::sync::broadcast::Sender<Live>,
    /// Cancelled when the server stops: ends the event streams, which would otherwise hold
    /// the graceful shutdown until its deadline.
    pub shutdown: CancellationToken,
    pub store: Store,
    pub metrics: Arc<Metrics>,
    /// Degraded subsystems, for `/healthz`.
    pub health: Health,
    pub admin_token: Secret,
    /// Reads everything the admin token reads, changes nothing.
    pub viewer_token: Secret,
    /// Required by `GET /metrics` when set.
    pub metrics_token: Option<Secret>,
    /// The HTTP listener's counters, for `/metrics`.
    pub listener: Arc<crate::server::listener::ListenerStats>,
    pub server_key: VerifyingKey,
    pub orchestrator: orchestrator::Handle,
    pub catalog: Arc<Catalog>,
    pub tracker: Arc<Tracker>,
    pub locality: Arc<ServerLocality>,
    /// Tracker passkeys; also what the torrents handed out announce with.
    pub passkeys: Passkeys,
    /// Machine keys, for the proof in a passkey request.
    pub keyring: Keyring,
    /// How far a passkey request's time may be from ours.
    pub proof_window_ms: i64,
    /// Where the HTTPS listener is, when one is configured: tokens are taken only there.
    pub https_url: Option<String>,
}

/// The router with every route of this issue.
pub fn router(state: AppState) -> Router {
    // A layer on the whole group, not an extractor per handler, so that a read endpoint added
    // later is closed by default.
    let api = Router::new()
        .route("/api/v1/machines", get(list_machines))
        .route(
            "/api/v1/machines/{id}",
            get(show_machine).delete(delete_machine),
        )
        .route("/api/v1/machines/{id}/approve", post(approve_machine))
        .route("/api/v1/log", get(recent_log))
        .route("/api/v1/events", get(live_events))
        .route("/api/v1/zones", get(list_zones))
        .route(
            "/api/v1/zones/{id}",
            get(show_zone).put(put_zone).delete(delete_zone),
        )
        .route(
            "/api/v1/deployments",
            get(list_deployments).post(create_deployment),
        )
        .route(
            "/api/v1/deployments/{id}",
            get(show_deployment).delete(cancel_deployment),
        )
        .route("/api/v1/tracker", get(operator_tracker))
        .route("/api/v1/images", get(list_images).post(add_image))
        .route("/api/v1/images/{id}", get(show_image).delete(remove_image))
        .route_layer(axum::middleware::from_fn_with_state(
            state.clone(),
            require_reader,
        ));
    Router::new()
        .route("/healthz", get(healthz))
        .route("/metrics", get(metrics))
        .route("/api/v1/server-key", get(server_key))
        // A machine proves its key instead of sending a token (it holds none).
        .route("/api/v1/machines/{id}/passkey", post(machine_passkey))
        .merge(api)
        .route("/torrents/{file}", get(torrent_file))
        .merge(tracker_routes(&state))
        .merge(crate::server::dashboard::routes())
        .fallback(|| async { ApiError::coded(ErrorCode::NoSuchEndpoint, "no such endpoint") })
        .with_state(state)
}

/// What the tracker's handlers need, apart: they are the hot path (a fleet announces every
/// interval), and cloning the whole [`AppState`] per request showed up in profiles.
struct TrackerState {
    tracker: Arc<Tracker>,
    locality: Arc<ServerLocality>,
    passkeys: Passkeys,
}

fn tracker_routes(state: &AppState) -> Router<AppState> {
    Router::new()
        .route("/announce/{machine}/{passkey}", get(announce))
        .route("/scrape/{machine}/{passkey}", get(scrape))
        .route("/admitted/{machine}/{passkey}", get(admitted))
        .route("/announce", get(no_passkey))
        .route("/scrape", get(no_passkey))
        .with_state(Arc::new(TrackerState {
            tracker: state.tracker.clone(),
            locality: state.locality.clone(),
            passkeys: state.passkeys.clone(),
        }))
}

/// Serves `router` on `listener` until `shutdown` is cancelled, within `limits`.
pub async fn serve(
    listener: tokio::net::TcpListener,
    state: AppState,
    limits: crate::server::listener::Limits,
    tls: Option<crate::server::listener::TlsAcceptor>,
    shutdown: CancellationToken,
) -> std::io::Result<()> {
    let stats = state.listener.clone();
    crate::server::listener::serve(listener, router(state), limits, stats, tls, shutdown).await
}

/// An API failure: a status and a message, rendered as `{"error": "..."}`.
#[derive(Debug)]
pub struct ApiError {
    status: StatusCode,
    code: ErrorCode,
    message: String,
}

impl ApiError {
    /// An error of the general kind its status says (`not_found` for 404, ...).
    fn new(status: StatusCode, message: impl Into<String>) -> Self {
        let code = match status.as_u16() {
            400 => ErrorCode::InvalidRequest,
            401 => ErrorCode::Unauthorized,
            403 => ErrorCode::Forbidden,
            404 => ErrorCode::NotFound,
            409 => ErrorCode::Conflict,
            503 => ErrorCode::Unavailable,
            _ => ErrorCode::Internal,
        };
        ApiError {
            status,
            code,
            message: message.into(),
        }
    }

    /// An error of a kind more precise than its status.
    fn coded(code: ErrorCode, message: impl Into<String>) -> Self {
        ApiError {
            status: StatusCode::from_u16(code.status()).unwrap_or(StatusCode::BAD_REQUEST),
            code,
            message: message.into(),
        }
    }

    fn internal(context: &str, error: impl std::fmt::Display) -> Self {
        tracing::error!(error = %error, "{context}");
        ApiError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("{context}: {error}"),
        )
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut response = (
            self.status,
            Json(ErrorBody {
                error: self.message,
                code: self.code,
            }),
        )
            .into_response();
        if self.status == StatusCode::UNAUTHORIZED {
            response.headers_mut().insert(
                header::WWW_AUTHENTICATE,
                header::HeaderValue::from_static("Bearer"),
            );
        }
        response
    }
}

/// An id taken from the path, validated once here.
struct IdPath<T>(T);

/// The ids a path can carry, with the word an error message uses for them.
trait PathId: std::str::FromStr<Err = boottorrent_proto::IdError> {
    const WHAT: &'static str;
}

impl PathId for MachineId {
    const WHAT: &'static str = "machine";
}
impl PathId for ImageId {
    const WHAT: &'static str = "image";
}
impl PathId for ZoneId {
    const WHAT: &'static str = "zone";
}
impl PathId for DeploymentId {
    const WHAT: &'static str = "deployment";
}

impl<T: PathId> FromRequestParts<AppState> for IdPath<T> {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, ApiError> {
        let Path(raw): Path<String> = Path::from_request_parts(parts, state)
            .await
            .map_err(|e: PathRejection| ApiError::new(StatusCode::BAD_REQUEST, e.body_text()))?;
        raw.parse::<T>().map(IdPath).map_err(|e| {
            let shown: String = raw.chars().take(80).collect();
            ApiError::new(
                StatusCode::BAD_REQUEST,
                format!("{} id {shown:?}: {e}", T::WHAT),
            )
        })
    }
}

/// What a request's bearer token lets it do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Role {
    Admin,
    Viewer,
}

/// The bearer token of a request, if it sent one.
fn bearer(headers: &axum::http::HeaderMap) -> Option<&str> {
    headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::trim)
}

/// The role of the request's token; 401, counted, when it has none or a wrong one.
fn role(
    headers: &axum::http::HeaderMap,
    extensions: &axum::http::Extensions,
    state: &AppState,
) -> Result<Role, ApiError> {
    // With HTTPS configured, a token sent in clear is refused: whoever is on the segment saw
    // it, and the operator should learn that now rather than after it was abused.
    if let Some(https) = &state.https_url
        && extensions.get::<Transport>() != Some(&Transport::Tls)
        && bearer(headers).is_some()
    {
        state.metrics.http_unauthorized();
        return Err(ApiError::coded(
            ErrorCode::HttpsRequired,
            format!(
                "this server takes tokens only over HTTPS ({https}); the token just sent in \
                 clear should be considered seen: rotate it if this network is not trusted"
            ),
        ));
    }
    // Both comparisons always run, so the time taken does not tell which token was close.
    let (admin, viewer) = match bearer(headers) {
        Some(token) => (
            token_matches(&state.admin_token, token),
            token_matches(&state.viewer_token, token),
        ),
        None => {
            state.metrics.http_unauthorized();
            return Err(ApiError::new(
                StatusCode::UNAUTHORIZED,
                "this endpoint needs `Authorization: Bearer <token>`: the admin token \
                 (<data-dir>/admin.token) or, to read only, the viewer token \
                 (<data-dir>/viewer.token)",
            ));
        }
    };
    match (admin, viewer) {
        (true, _) => Ok(Role::Admin),
        (false, true) => Ok(Role::Viewer),
        (false, false) => {
            state.metrics.http_unauthorized();
            Err(ApiError::new(
                StatusCode::UNAUTHORIZED,
                "the bearer token is neither the admin token nor the viewer token; \
                 use the contents of <data-dir>/admin.token or <data-dir>/viewer.token",
            ))
        }
    }
}

/// Admits requests with the admin or the viewer token to the API's routes.
async fn require_reader(
    State(state): State<AppState>,
    request: axum::extract::Request,
    next: axum::middleware::Next,
) -> Result<Response, ApiError> {
    role(request.headers(), request.extensions(), &state)?;
    Ok(next.run(request).await)
}

/// Proof that the request carried the admin token.
struct Admin;

impl FromRequestParts<AppState> for Admin {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, ApiError> {
        match role(&parts.headers, &parts.extensions, state)? {
            Role::Admin => Ok(Admin),
            Role::Viewer => {
                state.metrics.http_unauthorized();
                Err(ApiError::coded(
                    ErrorCode::ReadOnlyToken,
                    "the viewer token can only read; this change needs the admin token \
                     (<data-dir>/admin.token)",
                ))
            }
        }
    }
}

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
    /// `approved`, `pending` (new machine waiting), or `key_changed` (known machine presented
    /// another key, waiting).
    pub key_state: &'static str,
    pub public_key: Option<PublicKeyBytes>,
    /// What the agent prints for its key; `machines approve` names it.
    pub fingerprint: Option<String>,
    pub pending_key: Option<PublicKeyBytes>,
    pub pending_fingerprint: Option<String>,
}

impl MachineView {
    fn new(m: MachineRecord, k: KeyRecord) -> Self {
        let key_state = match (&k.approved, &k.pending) {
            (Some(_), None) => "approved",
            (Some(_), Some(_)) => "key_changed",
            (None, _) => "pending",
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
            key_state,
            public_key: k.approved,
            fingerprint: k.approved.as_ref().map(fingerprint),
            pending_key: k.pending,
            pending_fingerprint: k.pending.as_ref().map(fingerprint),
        }
    }
}

fn rfc3339(ms: i64) -> String {
    let t =
        std::time::UNIX_EPOCH + std::time::Duration::from_millis(u64::try_from(ms).unwrap_or(0));
    humantime::format_rfc3339_millis(t).to_string()
}

/// 200 `ok`, or 503 `degraded` with each failing subsystem and why, so that a probe
/// restarts a server that cannot recover by itself and an operator sees the reason.
async fn healthz(State(state): State<AppState>) -> (StatusCode, Json<serde_json::Value>) {
    let problems = state.health.problems();
    if problems.is_empty() {
        (StatusCode::OK, Json(serde_json::json!({ "status": "ok" })))
    } else {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(serde_json::json!({ "status": "degraded", "problems": problems })),
        )
    }
}

async fn metrics(
    State(state): State<AppState>,
    headers: axum::http::HeaderMap,
) -> Result<Response, ApiError> {
    if let Some(expected) = &state.metrics_token {
        let allowed = bearer(&headers).is_some_and(|token| {
            // Evaluated in full, like `role`: no early exit on the first match.
            token_matches(expected, token)
                | token_matches(&state.admin_token, token)
                | token_matches(&state.viewer_token, token)
        });
        if !allowed {
            state.metrics.http_unauthorized();
            return Err(ApiError::new(
                StatusCode::UNAUTHORIZED,
                "GET /metrics needs `Authorization: Bearer <metrics token>` (metrics_token in \
                 the server's configuration; the admin and viewer tokens work too)",
            ));
        }
    }
    let machines = state
        .store
        .machines()
        .map_err(|e| ApiError::internal("reading machines", e))?;
    let online = machines.iter().filter(|(m, _)| m.online).count();
    let mut body = state.metrics.render(machines.len(), online);
    let t = state.tracker.counters();
    body.push_str(&format!(
        "# HELP boottorrent_tracker_announces_total Announce requests, failed ones included.\n\
         # TYPE boottorrent_tracker_announces_total counter\n\
         boottorrent_tracker_announces_total {}\n\
         # HELP boottorrent_tracker_scrapes_total Scrape requests, failed ones included.\n\
         # TYPE boottorrent_tracker_scrapes_total counter\n\
         boottorrent_tracker_scrapes_total {}\n\
         # HELP boottorrent_tracker_failures_total Tracker requests answered with a failure reason.\n\
         # TYPE boottorrent_tracker_failures_total counter\n\
         boottorrent_tracker_failures_total {}\n",
        t.announces, t.scrapes, t.failures
    ));
    state.listener.render(&mut body);
    let deployments = state
        .store
        .deployments()
        .map_err(|e| ApiError::internal("reading deployments", e))?;
    let by_state = [
        OverallState::Running,
        OverallState::Completed,
        OverallState::Failed,
        OverallState::Cancelled,
    ]
    .map(|wanted| {
        let n = deployments.iter().filter(|d| d.overall() == wanted).count();
        (wanted.as_str(), n as u64)
    });
    crate::server::metrics::family(
        &mut body,
        "boottorrent_deployments",
        "Deployments, by overall state.",
        "gauge",
        "state",
        by_state,
    );
    let images = state.catalog.list()?;
    crate::server::metrics::family(
        &mut body,
        "boottorrent_seeder_uploaded_bytes_total",
        "Bytes of each image the server's seeder uploaded since it started.",
        "counter",
        "image",
        images.iter().map(|i| (i.id.as_str(), i.uploaded)),
    );
    let import_states = [
        ImageStatus::Importing,
        ImageStatus::Ready,
        ImageStatus::Failed,
        ImageStatus::Unavailable,
        ImageStatus::Checking,
    ]
    .map(|s| {
        (
            s.as_str(),
            images.iter().filter(|i| i.state == s).count() as u64,
        )
    });
    crate::server::metrics::family(
        &mut body,
        "boottorrent_images",
        "Catalogued images, by state (importing: an import job is running).",
        "gauge",
        "state",
        import_states,
    );
    Ok(([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], body).into_response())
}

async fn server_key(State(state): State<AppState>) -> Json<serde_json::Value> {
    Json(serde_json::json!({
        "algorithm": "ed25519",
        "public_key": hex::encode(state.server_key.as_bytes()),
    }))
}

async fn list_machines(State(state): State<AppState>) -> Result<Json<Vec<MachineView>>, ApiError> {
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

async fn show_machine(
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

/// Body of `POST /api/v1/machines/{id}/approve`: the operator names the key it approves,
/// so a key swapped in since the operator looked is not approved by mistake.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ApproveBody {
    fingerprint: String,
}

async fn approve_machine(
    State(state): State<AppState>,
    _admin: Admin,
    IdPath(id): IdPath<MachineId>,
    body: Result<Json<ApproveBody>, axum::extract::rejection::JsonRejection>,
) -> Result<Json<serde_json::Value>, ApiError> {
    let body = json_body(body)?;
    let result = state
        .orchestrator
        .approve(id.clone(), body.fingerprint)
        .await
        .map_err(|e| ApiError::new(StatusCode::SERVICE_UNAVAILABLE, e.to_string()))?;
    let (outcome, key) = match result {
        Ok(Approval::Approved(key)) => ("approved", key),
        Ok(Approval::AlreadyApproved(key)) => ("already_approved", key),
        Err(e) => return Err(ApiError::from(e)),
    };
    Ok(Json(serde_json::json!({
        "id": id,
        "outcome": outcome,
        "public_key": key,
        "fingerprint": fingerprint(&key),
    })))
}

/// Forgets a machine: rejects a waiting key, or lets a reinstalled machine enroll again.
async fn delete_machine(
    State(state): State<AppState>,
    _admin: Admin,
    IdPath(id): IdPath<MachineId>,
) -> Result<Json<serde_json::Value>, ApiError> {
    let record = state
        .orchestrator
        .delete_machine(id.clone())
        .await
        .map_err(|e| ApiError::new(StatusCode::SERVICE_UNAVAILABLE, e.to_string()))?
        .map_err(ApiError::from)?;
    Ok(Json(
        serde_json::json!({ "id": record.id, "outcome": "deleted" }),
    ))
}

impl From<ApproveError> for ApiError {
    fn from(e: ApproveError) -> Self {
        match e {
            ApproveError::UnknownMachine(_) => ApiError::new(StatusCode::NOT_FOUND, e.to_string()),
            ApproveError::NothingToApprove(_) => ApiError::new(StatusCode::CONFLICT, e.to_string()),
            ApproveError::WrongKey { .. } => ApiError::coded(ErrorCode::KeyMismatch, e.to_string()),
            ApproveError::Store(e) => ApiError::internal("storing the machine's keys", e),
        }
    }
}

/// Query of `GET /api/v1/log`.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct EventsQuery {
    limit: Option<usize>,
}

/// The largest page of the event log one request may ask for.
const MAX_EVENTS: usize = 1000;

/// The newest entries of the machine event log (registrations, approvals, offline, boot
/// reports), oldest first.
async fn recent_log(
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
struct EventView {
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

impl From<CatalogError> for ApiError {
    fn from(e: CatalogError) -> Self {
        match e {
            CatalogError::Invalid(m) => ApiError::new(StatusCode::BAD_REQUEST, m),
            CatalogError::NotFound(_) => ApiError::new(StatusCode::NOT_FOUND, e.to_string()),
            CatalogError::Store(e) => ApiError::internal("reading the catalog", e),
        }
    }
}

async fn list_images(State(state): State<AppState>) -> Result<Json<Vec<ImageView>>, ApiError> {
    Ok(Json(state.catalog.list()?))
}

async fn show_image(
    State(state): State<AppState>,
    IdPath(id): IdPath<ImageId>,
) -> Result<Json<ImageView>, ApiError> {
    Ok(Json(state.catalog.get(&id)?))
}

/// Body of `POST /api/v1/images`.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct AddImage {
    /// Absolute path of the file on the server's disk.
    path: std::path::PathBuf,
    name: Option<String>,
    #[serde(default)]
    raw: bool,
}

/// Starts importing a file on the server's disk; answers 202 with the image (state
/// `importing`), or 200 when the same unchanged file is already catalogued.
async fn add_image(
    State(state): State<AppState>,
    _admin: Admin,
    body: Result<Json<AddImage>, axum::extract::rejection::JsonRejection>,
) -> Result<(StatusCode, Json<ImageView>), ApiError> {
    let Json(body) = body.map_err(|e| ApiError::new(StatusCode::BAD_REQUEST, e.body_text()))?;
    let catalog = state.catalog.clone();
    // VHDX validation reads the file's headers: keep it off the async workers.
    let view = tokio::task::spawn_blocking(move || catalog.add(&body.path, body.name, body.raw))
        .await
        .map_err(|e| ApiError::internal("adding the image", e))??;
    let status = if view.state == ImageStatus::Importing {
        StatusCode::ACCEPTED
    } else {
        StatusCode::OK
    };
    Ok((status, Json(view)))
}

async fn remove_image(
    State(state): State<AppState>,
    _admin: Admin,
    IdPath(id): IdPath<ImageId>,
) -> Result<StatusCode, ApiError> {
    state.catalog.remove(&id).await?;
    Ok(StatusCode::NO_CONTENT)
}

/// `GET /torrents/{info_hash}.torrent`.
/// Who asks for a `.torrent`: a machine with its passkey (`Authorization: Passkey
/// <machine>:<passkey>`), or the operator with the admin or viewer token, whose torrent then
/// announces with the operator's passkey (for a client on a technician's laptop).
fn torrent_holder(
    headers: &axum::http::HeaderMap,
    extensions: &axum::http::Extensions,
    state: &AppState,
) -> Result<String, ApiError> {
    let passkey = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Passkey "))
        .and_then(|v| v.trim().split_once(':'));
    match passkey {
        Some((machine, passkey)) if state.passkeys.admits(machine, passkey) => {
            Ok(machine.to_owned())
        }
        Some(_) => {
            state.metrics.http_unauthorized();
            Err(ApiError::new(
                StatusCode::UNAUTHORIZED,
                "the passkey is not that of an approved machine; ask for it again \
                 (POST /api/v1/machines/<id>/passkey)",
            ))
        }
        None => {
            role(headers, extensions, state).map(|_| crate::server::passkey::OPERATOR.to_owned())
        }
    }
}

/// `GET /api/v1/tracker`: the announce and scrape URLs with the operator's passkey, for a
/// BitTorrent client on a technician's laptop (the `.torrent` files fetched with a token
/// carry the same).
async fn operator_tracker(State(state): State<AppState>) -> Json<serde_json::Value> {
    let announce = state.passkeys.announce_url(
        &state.catalog.public_url(),
        crate::server::passkey::OPERATOR,
    );
    let scrape = announce.replacen("/announce/", "/scrape/", 1);
    Json(serde_json::json!({ "announce": announce, "scrape": scrape }))
}

/// `POST /api/v1/machines/{id}/passkey`: a machine's tracker passkey, for a body proving it
/// holds the machine's approved key (see `boottorrent_proto::passkey_request`). The passkey
/// never goes over MQTT, where anyone with the enrollment token may listen.
async fn machine_passkey(
    State(state): State<AppState>,
    IdPath(id): IdPath<MachineId>,
    ConnectInfo(remote): ConnectInfo<std::net::SocketAddr>,
    body: String,
) -> Result<Json<serde_json::Value>, ApiError> {
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
    Ok(Json(serde_json::json!({
        "machine": id,
        "passkey": state.passkeys.passkey(id.as_str()),
    })))
}

async fn torrent_file(
    State(state): State<AppState>,
    Path(file): Path<String>,
    request: axum::extract::Request,
) -> Result<Response, ApiError> {
    let holder = torrent_holder(request.headers(), request.extensions(), &state)?;
    let mut info_hash = [0u8; 20];
    let hash = file
        .strip_suffix(".torrent")
        .filter(|h| hex::decode_to_slice(h, &mut info_hash).is_ok())
        .ok_or_else(|| {
            ApiError::new(
                StatusCode::NOT_FOUND,
                format!("{file:?} is not <40 hex digits of an info hash>.torrent"),
            )
        })?;
    if !state.passkeys.may_fetch(&holder, &info_hash) {
        state.metrics.http_unauthorized();
        return Err(ApiError::coded(
            ErrorCode::NotGiven,
            format!(
                "image {hash} is not given to machine {holder}: a machine gets the images of \
                 the deployments that include it (`boottorrent deploy IMAGE --machine {holder}`)"
            ),
        ));
    }
    match state.catalog.torrent(hash, &holder)? {
        Some(bytes) => Ok((
            [
                (header::CONTENT_TYPE, "application/x-bittorrent".to_owned()),
                (
                    header::CONTENT_DISPOSITION,
                    format!("attachment; filename=\"{hash}.torrent\""),
                ),
            ],
            bytes,
        )
            .into_response()),
        None => Err(ApiError::new(
            StatusCode::NOT_FOUND,
            format!("no catalogued image has info hash {hash}"),
        )),
    }
}

/// `GET /announce`: answered in the tracker protocol's own way (bencoded, failures included).
/// The tracker is private: only enrolled machines (their passkey in the announce URL, as
/// the torrents they are handed carry it), the server's seeder and the operator's clients.
fn passkey_refusal(state: &TrackerState, machine: &str, passkey: &str) -> Option<Response> {
    if state.passkeys.admits(machine, passkey) {
        return None;
    }
    let shown: String = machine.chars().take(64).collect();
    tracing::debug!(machine = ?shown, "tracker request with a wrong passkey");
    Some(tracker_response(state.tracker.refuse(
        403,
        "this private tracker needs the passkey of an approved machine in the announce URL; \
         fetch the .torrent again from the server",
    )))
}

async fn no_passkey(State(state): State<Arc<TrackerState>>) -> Response {
    tracker_response(state.tracker.refuse(
        403,
        "this private tracker needs a passkey: announce to the URL in the .torrent the server \
         hands an approved machine (/announce/<machine>/<passkey>)",
    ))
}

async fn announce(
    State(state): State<Arc<TrackerState>>,
    Path((machine, passkey)): Path<(String, String)>,
    ConnectInfo(remote): ConnectInfo<std::net::SocketAddr>,
    RawQuery(query): RawQuery,
) -> Response {
    if let Some(refusal) = passkey_refusal(&state, &machine, &passkey) {
        return refusal;
    }
    let answer = state.tracker.announce_for(
        query.as_deref().unwrap_or(""),
        remote.ip(),
        state.locality.as_ref(),
        std::time::Instant::now(),
        &|info_hash| state.passkeys.may_fetch(&machine, info_hash),
    );
    tracker_response(answer)
}

/// Query of `/admitted/...`.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct AdmittedQuery {
    info_hash: String,
    ip: std::net::IpAddr,
}

/// `GET /admitted/<machine>/<passkey>?info_hash=<hex>&ip=<address>`: whether a peer at that
/// address is in the torrent's swarm, for an agent deciding whether to serve a peer that
/// dialled it. Only a passkey holder may ask.
async fn admitted(
    State(state): State<Arc<TrackerState>>,
    Path((machine, passkey)): Path<(String, String)>,
    query: Result<axum::extract::Query<AdmittedQuery>, axum::extract::rejection::QueryRejection>,
) -> Response {
    if let Some(refusal) = passkey_refusal(&state, &machine, &passkey) {
        return refusal;
    }
    let query = match query {
        Ok(axum::extract::Query(q)) => q,
        Err(e) => {
            return ApiError::new(StatusCode::BAD_REQUEST, e.body_text()).into_response();
        }
    };
    let mut hash = [0u8; 20];
    if hex::decode_to_slice(&query.info_hash, &mut hash).is_err() {
        return ApiError::new(
            StatusCode::BAD_REQUEST,
            "info_hash must be 40 hex digits".to_owned(),
        )
        .into_response();
    }
    // Only about swarms the asking machine may join itself.
    let admitted =
        state.passkeys.may_fetch(&machine, &hash) && state.tracker.has_address(hash, query.ip);
    Json(serde_json::json!({ "admitted": admitted })).into_response()
}

async fn scrape(
    State(state): State<Arc<TrackerState>>,
    Path((machine, passkey)): Path<(String, String)>,
    RawQuery(query): RawQuery,
) -> Response {
    if let Some(refusal) = passkey_refusal(&state, &machine, &passkey) {
        return refusal;
    }
    let answer = state.tracker.scrape_for(
        query.as_deref().unwrap_or(""),
        std::time::Instant::now(),
        &|info_hash| state.passkeys.may_fetch(&machine, info_hash),
    );
    tracker_response(answer)
}

fn tracker_response(answer: boottorrent_tracker::announce::Answer) -> Response {
    let status = StatusCode::from_u16(answer.status).unwrap_or(StatusCode::BAD_REQUEST);
    (
        status,
        [(
            header::CONTENT_TYPE,
            boottorrent_tracker::announce::CONTENT_TYPE,
        )],
        answer.body,
    )
        .into_response()
}

impl From<FleetError> for ApiError {
    fn from(e: FleetError) -> Self {
        match e {
            FleetError::NotFound(m) => ApiError::new(StatusCode::NOT_FOUND, m),
            FleetError::Invalid(m) => ApiError::new(StatusCode::BAD_REQUEST, m),
            FleetError::Store(e) => ApiError::internal("storing the change", e),
        }
    }
}

/// The orchestrator's answer, or 503 when it is not running.
fn answered<T>(result: anyhow::Result<Result<T, FleetError>>) -> Result<T, ApiError> {
    result
        .map_err(|e| ApiError::new(StatusCode::SERVICE_UNAVAILABLE, e.to_string()))?
        .map_err(ApiError::from)
}

/// A JSON body, or a 400 that says what is wrong with it.
fn json_body<T>(
    body: Result<Json<T>, axum::extract::rejection::JsonRejection>,
) -> Result<T, ApiError> {
    body.map(|Json(b)| b)
        .map_err(|e| ApiError::new(StatusCode::BAD_REQUEST, e.body_text()))
}

/// Finds a catalogued image by id or by its unique name, and checks it can be deployed.
fn deployable_image(state: &AppState, wanted: &str) -> Result<ImageRef, ApiError> {
    let images = state.catalog.list()?;
    let by_id: Vec<&ImageView> = images.iter().filter(|i| i.id.as_str() == wanted).collect();
    let by_name: Vec<&ImageView> = images.iter().filter(|i| i.name == wanted).collect();
    let image = match (by_id.as_slice(), by_name.as_slice()) {
        ([image], _) | ([], [image]) => *image,
        ([], []) => {
            let shown: String = wanted.chars().take(80).collect();
            return Err(ApiError::new(
                StatusCode::NOT_FOUND,
                format!(
                    "no image {shown:?} in the catalog; `boottorrent image list` shows the images"
                ),
            ));
        }
        (_, several) => {
            return Err(ApiError::new(
                StatusCode::BAD_REQUEST,
                format!(
                    "{} images are named {wanted:?} ({}); give the id",
                    several.len(),
                    several
                        .iter()
                        .map(|i| i.id.as_str())
                        .collect::<Vec<_>>()
                        .join(", ")
                ),
            ));
        }
    };
    match (&image.info_hash, &image.sha256, &image.torrent_url) {
        (Some(info_hash), Some(sha256), Some(torrent_url)) if image.state == ImageStatus::Ready => {
            Ok(ImageRef {
                id: image.id.clone(),
                name: image.name.clone(),
                info_hash: *info_hash,
                sha256: *sha256,
                size: image.size,
                torrent_url: torrent_url.clone(),
            })
        }
        _ => Err(ApiError::new(
            StatusCode::CONFLICT,
            format!(
                "image {} is {}{}; only ready images can be deployed",
                image.id,
                image.state.as_str(),
                image
                    .error
                    .as_deref()
                    .map(|e| format!(" ({e})"))
                    .unwrap_or_default()
            ),
        )),
    }
}

/// Body of `POST /api/v1/deployments`.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct CreateDeployment {
    image: String,
    target: Target,
    #[serde(default)]
    action: Action,
}

async fn create_deployment(
    State(state): State<AppState>,
    _admin: Admin,
    body: Result<Json<CreateDeployment>, axum::extract::rejection::JsonRejection>,
) -> Result<(StatusCode, Json<serde_json::Value>), ApiError> {
    let body = json_body(body)?;
    // The target itself (empty, `global: false`, unknown zone or machines) is checked by the
    // fleet, which knows the zones and machines.
    let image = deployable_image(&state, &body.image)?;
    let deployment = answered(
        state
            .orchestrator
            .deploy(NewDeployment {
                image,
                target: body.target,
                action: body.action,
            })
            .await,
    )?;
    Ok((StatusCode::CREATED, Json(deployment.view())))
}

async fn list_deployments(
    State(state): State<AppState>,
) -> Result<Json<Vec<serde_json::Value>>, ApiError> {
    let mut all = state
        .store
        .deployments()
        .map_err(|e| ApiError::internal("reading deployments", e))?;
    // Ids start with the creation time.
    all.reverse();
    Ok(Json(all.iter().map(Deployment::view).collect()))
}

async fn show_deployment(
    State(state): State<AppState>,
    IdPath(id): IdPath<DeploymentId>,
) -> Result<Json<serde_json::Value>, ApiError> {
    match state.store.deployment(&id) {
        Ok(Some(d)) => Ok(Json(d.view())),
        Ok(None) => Err(ApiError::new(
            StatusCode::NOT_FOUND,
            format!("no deployment {id}; `boottorrent deployments list` shows them"),
        )),
        Err(e) => Err(ApiError::internal("reading the deployment", e)),
    }
}

async fn cancel_deployment(
    State(state): State<AppState>,
    _admin: Admin,
    IdPath(id): IdPath<DeploymentId>,
) -> Result<Json<serde_json::Value>, ApiError> {
    let deployment = answered(state.orchestrator.cancel(id).await)?;
    Ok(Json(deployment.view()))
}

/// A zone with its current members.
fn zone_view(zone: &Zone, machines: &[(MachineRecord, KeyRecord)]) -> serde_json::Value {
    let members: Vec<&MachineId> = machines
        .iter()
        .filter(|(m, _)| m.zones.contains(&zone.id))
        .map(|(m, _)| &m.id)
        .collect();
    serde_json::json!({
        "id": zone.id,
        "machines": zone.machines,
        "subnets": zone.subnets,
        "images": zone.images,
        "source": zone.source,
        "members": members,
    })
}

fn machines_of(state: &AppState) -> Result<Vec<(MachineRecord, KeyRecord)>, ApiError> {
    state
        .store
        .machines()
        .map_err(|e| ApiError::internal("reading machines", e))
}

async fn list_zones(
    State(state): State<AppState>,
) -> Result<Json<Vec<serde_json::Value>>, ApiError> {
    let zones = state
        .store
        .zones()
        .map_err(|e| ApiError::internal("reading zones", e))?;
    let machines = machines_of(&state)?;
    Ok(Json(
        zones.iter().map(|z| zone_view(z, &machines)).collect(),
    ))
}

async fn show_zone(
    State(state): State<AppState>,
    IdPath(id): IdPath<ZoneId>,
) -> Result<Json<serde_json::Value>, ApiError> {
    let zones = state
        .store
        .zones()
        .map_err(|e| ApiError::internal("reading zones", e))?;
    let zone = zones.iter().find(|z| z.id == id).ok_or_else(|| {
        ApiError::new(
            StatusCode::NOT_FOUND,
            format!("no zone {id}; `boottorrent zones list` shows the zones"),
        )
    })?;
    Ok(Json(zone_view(zone, &machines_of(&state)?)))
}

async fn put_zone(
    State(state): State<AppState>,
    _admin: Admin,
    IdPath(id): IdPath<ZoneId>,
    body: Result<Json<ZoneSpec>, axum::extract::rejection::JsonRejection>,
) -> Result<Json<serde_json::Value>, ApiError> {
    let spec = json_body(body)?;
    // Checked here so that a bad image leaves the zone as it was.
    let images = spec
        .images
        .iter()
        .map(|image| deployable_image(&state, image.as_str()))
        .collect::<Result<Vec<_>, _>>()?;
    let zone = answered(state.orchestrator.put_zone(id, spec, images).await)?;
    Ok(Json(zone_view(&zone, &machines_of(&state)?)))
}

async fn delete_zone(
    State(state): State<AppState>,
    _admin: Admin,
    IdPath(id): IdPath<ZoneId>,
) -> Result<Json<serde_json::Value>, ApiError> {
    let zone = answered(state.orchestrator.delete_zone(id).await)?;
    Ok(Json(zone_view(&zone, &[])))
}

/// Most running deployments a new watcher of `GET /api/v1/events` is sent before the live
/// events. Each is a whole deployment view, which for a big zone is megabytes; a watcher
/// that needs more reads `GET /api/v1/deployments`, as it is told by a `lagged` event.
const REPLAY_MAX: usize = 32;

/// `GET /api/v1/events`: server-sent events. A new watcher first gets the running
/// deployments (the newest [`REPLAY_MAX`]; if there are more, a `lagged` event first), then
/// live changes. One that falls more than the channel's capacity behind is told so with a
/// `lagged` event and goes on with the newest.
///
/// Memory per watcher is bounded: the replay is read from the store one deployment at a time
/// as the connection has room for it (not rendered up front), the live events sit once in the
/// shared broadcast ring, and hyper stops pulling from this stream while the connection's
/// write buffer is full. A watcher that stops reading altogether is dropped by the listener's
/// write deadline.
async fn live_events(
    State(state): State<AppState>,
) -> Result<
    axum::response::sse::Sse<
        impl futures_util::Stream<Item = Result<axum::response::sse::Event, std::convert::Infallible>>,
    >,
    ApiError,
> {
    use axum::response::sse::{Event as Sse, KeepAlive};
    use futures_util::StreamExt;
    // Subscribe before reading the store, so nothing falls between the two.
    let rx = state.live.subscribe();
    let running: Vec<DeploymentId> = state
        .store
        .deployments()
        .map_err(|e| ApiError::internal("reading deployments", e))?
        .iter()
        .filter(|d| d.overall() == OverallState::Running)
        .map(|d| d.id.clone())
        .collect();
    // Ids start with the creation time: the newest are at the end.
    let skipped = running.len().saturating_sub(REPLAY_MAX);
    let lagged = (skipped > 0).then(|| {
        Sse::default()
            .event("lagged")
            .data(serde_json::json!({ "missed": skipped }).to_string())
    });
    let store = state.store.clone();
    let replay = futures_util::stream::iter(running.into_iter().skip(skipped)).filter_map(
        move |id| {
            let view = match store.deployment(&id) {
                Ok(Some(d)) => Some(Sse::default().event("deployment").data(d.view().to_string())),
                Ok(None) => None,
                Err(e) => {
                    tracing::warn!(deployment = %id, error = %e, "reading a deployment for an event stream");
                    None
                }
            };
            std::future::ready(view)
        },
    );
    let initial = futures_util::stream::iter(lagged).chain(replay).map(Ok);
    let live = futures_util::stream::unfold(rx, |mut rx| async move {
        let event = match rx.recv().await {
            Ok(live) => Sse::default().event(live.kind).data(live.data),
            Err(tokio::sync::broadcast::error::RecvError::Lagged(n)) => Sse::default()
                .event("lagged")
                .data(serde_json::json!({ "missed": n }).to_string()),
            Err(tokio::sync::broadcast::error::RecvError::Closed) => return None,
        };
        Some((Ok(event), rx))
    });
    let events = initial
        .chain(live)
        .take_until(state.shutdown.clone().cancelled_owned());
    Ok(axum::response::sse::Sse::new(events).keep_alive(
        KeepAlive::new()
            .interval(std::time::Duration::from_secs(15))
            .text("keep-alive"),
    ))
}
