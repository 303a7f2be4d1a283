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
//! is open unless `metrics_token` is set. The tracker and `.torrent` downloads take a
//! machine's passkey instead (`tracker`, `images`); the dashboard's static files are open.
//!
//! This module holds the router, the shared state and who may do what; the handlers live by
//! resource: `machines` (and the event log), `images` (and `.torrent` files), `deployments`,
//! `zones`, `tracker`, `events` (the live stream), `dashboard` (the web page's files), and
//! `error` (the error answers).

use std::collections::BTreeMap;
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

use crate::api::{
    AddImage, Approve, CreateDeployment, ErrorBody, ErrorCode, HealthState, HealthView,
    ImageStatus, KeyState, MachineChange, MachineOutcome, OverallState,
};
use crate::server::catalog::{Catalog, CatalogError, ImageView};
use crate::server::config::Secret;
use crate::server::credentials::token_matches;
use crate::server::deployment::{Deployment, DeploymentView, ImageRef};
use crate::server::fleet::{FleetError, Live, NewDeployment};
use crate::server::health::Health;
use crate::server::keyring::Keyring;
use crate::server::listener::Transport;
use crate::server::locality::ServerLocality;
use crate::server::metrics::Metrics;
use crate::server::orchestrator;
use crate::server::passkey::Passkeys;
use crate::server::registry::{Approval, ApproveError, Pin};
use crate::server::store::{KeyRecord, LogEntry, MachineRecord, Store};
use crate::server::zone::{Zone, ZoneSpec};

mod dashboard;
mod deployments;
mod error;
mod events;
mod images;
mod machines;
#[cfg(test)]
mod tests;
mod tracker;
mod zones;

use deployments::*;
use error::*;
use events::*;
use images::*;
use machines::*;
use tracker::*;
use zones::*;

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
    /// Broker certificates for machines, when the server uses an external broker.
    pub certificates: Option<Arc<crate::server::machine_ca::Certificates>>,
}

/// The router with every route of this issue.
pub fn router(state: AppState) -> Router {
    // A layer on the whole group, not an extractor per handler, so that a read endpoint added
    // later is closed by default.
    let api = Router::new()
        .route("/api/v1/machines", get(list_machines))
        .route("/api/v1/fleet", get(fleet_summary))
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
        .route(
            "/api/v1/machines/{id}/certificate",
            post(machine_certificate),
        )
        .merge(api)
        .route("/torrents/{file}", get(torrent_file))
        .merge(tracker_routes(&state))
        .merge(dashboard::routes())
        .fallback(|| async { ApiError::coded(ErrorCode::NoSuchEndpoint, "no such endpoint") })
        .with_state(state)
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

fn rfc3339(ms: i64) -> String {
    let t =
        std::time::UNIX_EPOCH + std::time::Duration::from_millis(u64::try_from(ms).unwrap_or(0));
    humantime::format_rfc3339_millis(t).to_string()
}

/// 200 `ok`, or 503 `degraded` with each failing subsystem and why, so that a probe
/// restarts a server that cannot recover by itself and an operator sees the reason.
async fn healthz(State(state): State<AppState>) -> (StatusCode, Json<HealthView>) {
    let problems = state.health.problems();
    let (status, word) = if problems.is_empty() {
        (StatusCode::OK, HealthState::Ok)
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, HealthState::Degraded)
    };
    (
        status,
        Json(HealthView {
            status: word,
            problems,
        }),
    )
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
    // Counted, not read: a scrape every few seconds should not decode the whole fleet.
    let (machines, online) = state
        .store
        .machine_counts()
        .map_err(|e| ApiError::internal("counting machines", e))?;
    let mut body = state.metrics.render(machines as usize, online as usize);
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
    let connections = state.catalog.seeder_connections();
    crate::server::metrics::family(
        &mut body,
        "boottorrent_seeder_connections_total",
        "Peer connections the seeder was offered, by encryption: plaintext, rc4 (message \
         stream encryption), mse_plaintext (MSE that selected plaintext), refused (not RC4 \
         while bt_require_encryption is set).",
        "counter",
        "encryption",
        [
            ("plaintext", connections.plaintext),
            ("rc4", connections.encrypted),
            ("mse_plaintext", connections.mse_plaintext),
            ("refused", connections.refused_unencrypted),
        ],
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

async fn server_key(State(state): State<AppState>) -> Json<boottorrent_proto::ServerKeyAnswer> {
    Json(boottorrent_proto::ServerKeyAnswer {
        algorithm: "ed25519".into(),
        public_key: hex::encode(state.server_key.as_bytes()),
    })
}
