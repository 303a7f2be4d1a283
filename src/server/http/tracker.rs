//! The private BitTorrent tracker: `/announce`, `/scrape`, `/admitted` with a passkey, and
//! `/api/v1/tracker`, the operator's announce URL.

use super::*;

/// What the tracker's handlers need, apart: they are the hot path (a fleet announces every
/// interval), and cloning the whole [`AppState`] per request showed up in profiles.
pub(super) struct TrackerState {
    tracker: Arc<Tracker>,
    locality: Arc<ServerLocality>,
    passkeys: Passkeys,
}

pub(super) fn tracker_routes(state: &AppState) -> Router<AppState> {
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

/// The answer of `GET /api/v1/tracker`.
#[derive(Serialize)]
pub(super) struct TrackerUrls {
    announce: String,
    scrape: String,
}

/// `GET /api/v1/tracker`: the announce and scrape URLs with the operator's passkey, for a
/// BitTorrent client on a technician's laptop (the `.torrent` files fetched with a token
/// carry the same).
pub(super) async fn operator_tracker(State(state): State<AppState>) -> Json<TrackerUrls> {
    let announce = state.passkeys.announce_url(
        &state.catalog.public_url(),
        crate::server::passkey::OPERATOR,
    );
    let scrape = announce.replacen("/announce/", "/scrape/", 1);
    Json(TrackerUrls { announce, scrape })
}

/// `GET /announce`: answered in the tracker protocol's own way (bencoded, failures included).
/// The tracker is private: only enrolled machines (their passkey in the announce URL, as
/// the torrents they are handed carry it), the server's seeder and the operator's clients.
pub(super) fn passkey_refusal(
    state: &TrackerState,
    machine: &str,
    passkey: &str,
) -> Option<Response> {
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

pub(super) async fn no_passkey(State(state): State<Arc<TrackerState>>) -> Response {
    tracker_response(state.tracker.refuse(
        403,
        "this private tracker needs a passkey: announce to the URL in the .torrent the server \
         hands an approved machine (/announce/<machine>/<passkey>)",
    ))
}

pub(super) async fn announce(
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
pub(super) struct AdmittedQuery {
    info_hash: String,
    ip: std::net::IpAddr,
}

/// `GET /admitted/<machine>/<passkey>?info_hash=<hex>&ip=<address>`: whether a peer at that
/// address is in the torrent's swarm, for an agent deciding whether to serve a peer that
/// dialled it. Only a passkey holder may ask.
pub(super) async fn admitted(
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
    Json(boottorrent_proto::Admission { admitted }).into_response()
}

pub(super) async fn scrape(
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

pub(super) fn tracker_response(answer: boottorrent_tracker::announce::Answer) -> Response {
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
