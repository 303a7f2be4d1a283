//! `/api/v1/events`: the live event stream.

use super::deployments::{DeploymentQuery, view};
use super::*;

/// Most running deployments a new watcher of `GET /api/v1/events` is sent before the live
/// events. Each is a whole deployment view, which for a big zone is megabytes; a watcher
/// that needs more reads `GET /api/v1/deployments`, as it is told by a `lagged` event.
pub(super) const REPLAY_MAX: usize = 32;

/// `GET /api/v1/events`: server-sent events. A new watcher first gets the running
/// deployments (the newest [`REPLAY_MAX`]; if there are more, a `lagged` event first), then
/// live changes. One that falls more than the channel's capacity behind is told so with a
/// `lagged` event and goes on with the newest. With `?machines=N` every `deployment` event
/// carries at most N machine rows, those furthest behind first, as `GET /api/v1/deployments`
/// does with it.
///
/// Memory per watcher is bounded: the replay is read from the store one deployment at a time
/// as the connection has room for it (not rendered up front), the live events sit once in the
/// shared broadcast ring, and hyper stops pulling from this stream while the connection's
/// write buffer is full. A watcher that stops reading altogether is dropped by the listener's
/// write deadline.
pub(super) async fn live_events(
    State(state): State<AppState>,
    query: Result<Query<DeploymentQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<
    axum::response::sse::Sse<
        impl futures_util::Stream<Item = Result<axum::response::sse::Event, std::convert::Infallible>>,
    >,
    ApiError,
> {
    use axum::response::sse::{Event as Sse, KeepAlive};
    use futures_util::StreamExt;
    let rows = DeploymentQuery::parse(query)?;
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
            .data(lagged_data(skipped as u64))
    });
    let store = state.store.clone();
    let replay = futures_util::stream::iter(running.into_iter().skip(skipped)).filter_map(
        move |id| {
            let view = match store.deployment(&id) {
                Ok(Some(d)) => Some(Sse::default()
                    .event("deployment")
                    .data(serde_json::to_string(&view(&d, rows)).unwrap_or_default())),
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
    let live = futures_util::stream::unfold(rx, move |mut rx| async move {
        let event = match rx.recv().await {
            Ok(live) => {
                let data = match (rows, &live.deployment) {
                    // Written for this watcher: a few rows of a deployment of thousands.
                    (Some(rows), Some(d)) => {
                        serde_json::to_string(&d.view_cut(rows)).unwrap_or_default()
                    }
                    _ => live.data,
                };
                Sse::default().event(live.kind).data(data)
            }
            Err(tokio::sync::broadcast::error::RecvError::Lagged(n)) => {
                Sse::default().event("lagged").data(lagged_data(n))
            }
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

/// The data of a `lagged` event: how many events the client will not see (it reads the
/// deployments again instead).
fn lagged_data(missed: u64) -> String {
    #[derive(Serialize)]
    struct Lagged {
        missed: u64,
    }
    serde_json::to_string(&Lagged { missed }).unwrap_or_default()
}
