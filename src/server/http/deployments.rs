//! `/api/v1/deployments...`: starting, reading and cancelling deployments.

use super::*;

/// Finds a catalogued image by id or by its unique name, and checks it can be deployed.
pub(super) fn deployable_image(state: &AppState, wanted: &str) -> Result<ImageRef, ApiError> {
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

pub(super) async fn create_deployment(
    State(state): State<AppState>,
    _admin: Admin,
    body: Result<Json<CreateDeployment>, axum::extract::rejection::JsonRejection>,
) -> Result<Response, ApiError> {
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
                persistence: body.persistence,
            })
            .await,
    )?;
    Ok((StatusCode::CREATED, Json(deployment.view())).into_response())
}

/// The most machine rows `?machines=N` may ask for per deployment.
pub(super) const MAX_MACHINE_ROWS: usize = 1000;

/// Query of `GET /api/v1/deployments` and `GET /api/v1/deployments/{id}`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct DeploymentQuery {
    /// At most this many machine rows per deployment, those furthest behind first (a view of
    /// a 10,000-machine deployment is megabytes); every machine, in id order, without it.
    machines: Option<usize>,
}

impl DeploymentQuery {
    pub(super) fn parse(
        query: Result<Query<DeploymentQuery>, axum::extract::rejection::QueryRejection>,
    ) -> Result<Option<usize>, ApiError> {
        let Query(query) =
            query.map_err(|e| ApiError::new(StatusCode::BAD_REQUEST, e.body_text()))?;
        machine_rows(query.machines)
    }
}

/// Query of `GET /api/v1/deployments`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct DeploymentListQuery {
    /// As in [`DeploymentQuery`].
    machines: Option<usize>,
    /// Only the newest this many deployments, and every older one still running: a site
    /// keeps hundreds of finished ones over a term.
    limit: Option<usize>,
}

/// `?machines=N` checked.
fn machine_rows(rows: Option<usize>) -> Result<Option<usize>, ApiError> {
    match rows {
        Some(n) if n > MAX_MACHINE_ROWS => Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            format!(
                "machines={n} is out of range: ask for 0 to {MAX_MACHINE_ROWS} machine rows per \
                 deployment, or leave it out for every machine"
            ),
        )),
        rows => Ok(rows),
    }
}

/// The view of `d` with every machine, or at most `rows` of them.
pub(super) fn view(d: &Deployment, rows: Option<usize>) -> DeploymentView<'_> {
    match rows {
        Some(rows) => d.view_cut(rows),
        None => d.view(),
    }
}

pub(super) async fn list_deployments(
    State(state): State<AppState>,
    query: Result<Query<DeploymentListQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Response, ApiError> {
    let Query(query) = query.map_err(|e| ApiError::new(StatusCode::BAD_REQUEST, e.body_text()))?;
    let rows = machine_rows(query.machines)?;
    let newest = query.limit.unwrap_or(usize::MAX);
    let mut all = state
        .store
        .deployments()
        .map_err(|e| ApiError::internal("reading deployments", e))?;
    // Ids start with the creation time.
    all.reverse();
    Ok(Json(
        all.iter()
            .enumerate()
            .filter(|(i, d)| *i < newest || d.overall() == OverallState::Running)
            .map(|(_, d)| view(d, rows))
            .collect::<Vec<_>>(),
    )
    .into_response())
}

pub(super) async fn show_deployment(
    State(state): State<AppState>,
    IdPath(id): IdPath<DeploymentId>,
    query: Result<Query<DeploymentQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Response, ApiError> {
    let rows = DeploymentQuery::parse(query)?;
    match state.store.deployment(&id) {
        Ok(Some(d)) => Ok(Json(view(&d, rows)).into_response()),
        Ok(None) => Err(ApiError::new(
            StatusCode::NOT_FOUND,
            format!("no deployment {id}; `boottorrent deployments list` shows them"),
        )),
        Err(e) => Err(ApiError::internal("reading the deployment", e)),
    }
}

pub(super) async fn cancel_deployment(
    State(state): State<AppState>,
    _admin: Admin,
    IdPath(id): IdPath<DeploymentId>,
) -> Result<Response, ApiError> {
    let deployment = answered(state.orchestrator.cancel(id).await)?;
    Ok(Json(deployment.view()).into_response())
}
