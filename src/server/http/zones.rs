//! `/api/v1/zones...`: rooms and groups of machines.

use super::*;
use crate::api::ZoneSource;
use crate::server::zone::Subnet;

/// A zone as the API shows it: the zone (its fields spelled out, so that its machine list
/// can be cut short) and its current members.
#[derive(Serialize)]
pub(super) struct ZoneView<'a> {
    id: &'a ZoneId,
    machines: &'a [MachineId],
    subnets: &'a [Subnet],
    images: &'a [ImageId],
    source: &'a ZoneSource,
    members: Vec<&'a MachineId>,
    /// With `?ids=N`: how many ids `machines` leaves out; absent otherwise.
    #[serde(skip_serializing_if = "Option::is_none")]
    more_machines: Option<u64>,
    /// With `?ids=N`: how many members `members` leaves out; absent otherwise.
    #[serde(skip_serializing_if = "Option::is_none")]
    more_members: Option<u64>,
}

impl ZoneView<'_> {
    /// Keeps the first `shown` listed machines and members (each in its order), if a number is
    /// given, and counts the rest.
    fn cut(mut self, shown: Option<usize>) -> Self {
        if let Some(shown) = shown {
            self.more_machines = Some(self.machines.len().saturating_sub(shown) as u64);
            self.machines = &self.machines[..shown.min(self.machines.len())];
            self.more_members = Some(self.members.len().saturating_sub(shown) as u64);
            self.members.truncate(shown);
        }
        self
    }
}

/// The most ids `?ids=N` may ask for per list.
const MAX_IDS: usize = 1000;

/// Query of `GET /api/v1/zones` and `GET /api/v1/zones/{id}`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct ZonesQuery {
    /// At most this many machine ids in each zone's `machines` and `members` (a zone of a
    /// whole campus lists thousands); every id without it.
    ids: Option<usize>,
}

impl ZonesQuery {
    fn parse(
        query: Result<Query<ZonesQuery>, axum::extract::rejection::QueryRejection>,
    ) -> Result<Option<usize>, ApiError> {
        let Query(query) =
            query.map_err(|e| ApiError::new(StatusCode::BAD_REQUEST, e.body_text()))?;
        match query.ids {
            Some(n) if n > MAX_IDS => Err(ApiError::new(
                StatusCode::BAD_REQUEST,
                format!(
                    "ids={n} is out of range: ask for 0 to {MAX_IDS} ids per list, or leave it \
                     out for every id; `GET /api/v1/machines?zone=ID` lists a zone's members \
                     a page at a time"
                ),
            )),
            shown => Ok(shown),
        }
    }
}

/// `zone` with its members among `machines`.
pub(super) fn zone_view<'a>(
    zone: &'a Zone,
    machines: &'a [(MachineId, Vec<ZoneId>)],
) -> ZoneView<'a> {
    let members = machines
        .iter()
        .filter(|(_, zones)| zones.contains(&zone.id))
        .map(|(id, _)| id)
        .collect();
    ZoneView {
        id: &zone.id,
        machines: &zone.machines,
        subnets: &zone.subnets,
        images: &zone.images,
        source: &zone.source,
        members,
        more_machines: None,
        more_members: None,
    }
}

/// Every machine in a zone, with its zones, in id order; from the store's in-memory index
/// (not by decoding every record).
pub(super) fn machines_of(state: &AppState) -> Result<Vec<(MachineId, Vec<ZoneId>)>, ApiError> {
    let mut out = Vec::new();
    state.store.for_each_facets(|id, m| {
        if !m.zones.is_empty() {
            out.push((id.clone(), m.zones.clone()));
        }
    });
    out.sort_unstable_by(|a, b| a.0.cmp(&b.0));
    Ok(out)
}

pub(super) async fn list_zones(
    State(state): State<AppState>,
    query: Result<Query<ZonesQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Response, ApiError> {
    let shown = ZonesQuery::parse(query)?;
    let zones = state
        .store
        .zones()
        .map_err(|e| ApiError::internal("reading zones", e))?;
    let machines = machines_of(&state)?;
    Ok(Json(
        zones
            .iter()
            .map(|z| zone_view(z, &machines).cut(shown))
            .collect::<Vec<_>>(),
    )
    .into_response())
}

pub(super) async fn show_zone(
    State(state): State<AppState>,
    IdPath(id): IdPath<ZoneId>,
    query: Result<Query<ZonesQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Response, ApiError> {
    let shown = ZonesQuery::parse(query)?;
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
    Ok(Json(zone_view(zone, &machines_of(&state)?).cut(shown)).into_response())
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
