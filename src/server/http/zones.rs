//! `/api/v1/zones...`: rooms and groups of machines.

use super::*;

/// A zone as the API shows it: the zone and its current members.
#[derive(Serialize)]
pub(super) struct ZoneView<'a> {
    #[serde(flatten)]
    zone: &'a Zone,
    members: Vec<&'a MachineId>,
}

/// `zone` with its members among `machines`.
pub(super) fn zone_view<'a>(
    zone: &'a Zone,
    machines: &'a [(MachineRecord, KeyRecord)],
) -> ZoneView<'a> {
    let members = machines
        .iter()
        .filter(|(m, _)| m.zones.contains(&zone.id))
        .map(|(m, _)| &m.id)
        .collect();
    ZoneView { zone, members }
}

pub(super) fn machines_of(state: &AppState) -> Result<Vec<(MachineRecord, KeyRecord)>, ApiError> {
    state
        .store
        .machines()
        .map_err(|e| ApiError::internal("reading machines", e))
}

pub(super) async fn list_zones(State(state): State<AppState>) -> Result<Response, ApiError> {
    let zones = state
        .store
        .zones()
        .map_err(|e| ApiError::internal("reading zones", e))?;
    let machines = machines_of(&state)?;
    Ok(Json(
        zones
            .iter()
            .map(|z| zone_view(z, &machines))
            .collect::<Vec<_>>(),
    )
    .into_response())
}

pub(super) async fn show_zone(
    State(state): State<AppState>,
    IdPath(id): IdPath<ZoneId>,
) -> Result<Response, ApiError> {
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
    Ok(Json(zone_view(zone, &machines_of(&state)?)).into_response())
}

pub(super) async fn put_zone(
    State(state): State<AppState>,
    _admin: Admin,
    IdPath(id): IdPath<ZoneId>,
    body: Result<Json<ZoneSpec>, axum::extract::rejection::JsonRejection>,
) -> Result<Response, ApiError> {
    let spec = json_body(body)?;
    // Checked here so that a bad image leaves the zone as it was.
    let images = spec
        .images
        .iter()
        .map(|image| deployable_image(&state, image.as_str()))
        .collect::<Result<Vec<_>, _>>()?;
    let zone = answered(state.orchestrator.put_zone(id, spec, images).await)?;
    Ok(Json(zone_view(&zone, &machines_of(&state)?)).into_response())
}

pub(super) async fn delete_zone(
    State(state): State<AppState>,
    _admin: Admin,
    IdPath(id): IdPath<ZoneId>,
) -> Result<Response, ApiError> {
    let zone = answered(state.orchestrator.delete_zone(id).await)?;
    Ok(Json(zone_view(&zone, &[])).into_response())
}
