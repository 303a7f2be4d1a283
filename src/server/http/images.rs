//! `/api/v1/images...` and `/torrents/...`: the catalog and the `.torrent` files.

use super::*;

pub(super) async fn list_images(
    State(state): State<AppState>,
) -> Result<Json<Vec<ImageView>>, ApiError> {
    Ok(Json(state.catalog.list()?))
}

pub(super) async fn show_image(
    State(state): State<AppState>,
    IdPath(id): IdPath<ImageId>,
) -> Result<Json<ImageView>, ApiError> {
    Ok(Json(state.catalog.get(&id)?))
}

/// Starts importing a file on the server's disk; answers 202 with the image (state
/// `importing`), or 200 when the same unchanged file is already catalogued.
pub(super) async fn add_image(
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

pub(super) async fn remove_image(
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
pub(super) fn torrent_holder(
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

pub(super) async fn torrent_file(
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
