//! `/api/v1/zones...`: rooms and groups of machines.

use super::*;

/// A zone with its current members.
pub(super) fn zone_view(zone: &Zone, machines: &[(MachineRecord, KeyRecord)]) -> serde_json::Value {
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

pub(super) fn machines_of(state: &AppState) -> Result<Vec<(MachineRecord, KeyRecord)>, ApiError> {
    state
        .store
        .machines()
        .map_err(|e| ApiError::internal("reading machines", e))
}

pub(super) async fn list_zones(
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

pub(super) async fn show_zone(
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

pub(super) async fn put_zone(
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

pub(super) async fn delete_zone(
    State(state): State<AppState>,
    _admin: Admin,
    IdPath(id): IdPath<ZoneId>,
) -> Result<Json<serde_json::Value>, ApiError> {
    let zone = answered(state.orchestrator.delete_zone(id).await)?;
    Ok(Json(zone_view(&zone, &[])))
}
