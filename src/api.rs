//! What the HTTP API's answers mean, shared by the server that writes them and the client
//! commands that read them, so that neither side guesses the other's meaning.

use std::collections::BTreeMap;

use boottorrent_proto::{AfterDownload, MachineId, Persistence, PublicKeyBytes, ZoneId};
use serde::{Deserialize, Serialize};

/// The body of every error answer: `{"error": "<what failed and what to do>", "code": "<code>"}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorBody {
    /// For people: what failed, with what input, and what to do. Its wording may change.
    pub error: String,
    /// For programs: what kind of failure it is. Stable; new codes may be added.
    pub code: ErrorCode,
}

/// What kind of failure an error answer is. Scripts and the client commands act on this, not
/// on the HTTP status (which it implies) or the text.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorCode {
    /// The request is malformed or names something invalid (400).
    InvalidRequest,
    /// No token, a wrong one, or a passkey or proof that does not hold (401).
    Unauthorized,
    /// The token is valid but may not do this (403).
    Forbidden,
    /// A change sent with the viewer token, which only reads (403).
    ReadOnlyToken,
    /// A token sent over plain HTTP to a server that has HTTPS (401); the text names the
    /// HTTPS address, and the token should be rotated if the network is not trusted.
    HttpsRequired,
    /// A machine asked for an image no deployment gives it (403).
    NotGiven,
    /// The server has no such endpoint (404): an older server than the client, usually.
    NoSuchEndpoint,
    /// What the request names does not exist (404).
    NotFound,
    /// The request conflicts with the current state (409), e.g. an image not ready yet.
    Conflict,
    /// The key named in an approval is not the one waiting (409); the text names it.
    KeyMismatch,
    /// The server cannot do it now, e.g. its orchestrator is not running (503); retrying
    /// later may work.
    Unavailable,
    /// The server failed (500); its log says why.
    Internal,
}

impl ErrorCode {
    /// The HTTP status an answer with this code has.
    pub fn status(self) -> u16 {
        match self {
            ErrorCode::InvalidRequest => 400,
            ErrorCode::Unauthorized | ErrorCode::HttpsRequired => 401,
            ErrorCode::Forbidden | ErrorCode::ReadOnlyToken | ErrorCode::NotGiven => 403,
            ErrorCode::NoSuchEndpoint | ErrorCode::NotFound => 404,
            ErrorCode::Conflict | ErrorCode::KeyMismatch => 409,
            ErrorCode::Unavailable => 503,
            ErrorCode::Internal => 500,
        }
    }

    /// Whether asking again later may succeed.
    pub fn is_transient(self) -> bool {
        matches!(self, ErrorCode::Unavailable | ErrorCode::Internal)
    }
}

/// An image's state as the API shows it (`state` of an image).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ImageStatus {
    /// An import job is validating and hashing the file.
    Importing,
    /// Imported; the seeder is reading its resume record (or re-hashing a file that changed)
    /// and the image can be deployed once it is done.
    Checking,
    /// Catalogued and seeding: it can be deployed.
    Ready,
    /// The import failed; `error` says why.
    Failed,
    /// The file has the same content as an image already catalogued (`same_as`).
    Duplicate,
    /// Catalogued, but the seeder cannot serve the file (gone, changed, unreadable); `error`
    /// says why.
    Unavailable,
}

impl ImageStatus {
    /// The state's word on the wire.
    pub fn as_str(self) -> &'static str {
        match self {
            ImageStatus::Importing => "importing",
            ImageStatus::Checking => "checking",
            ImageStatus::Ready => "ready",
            ImageStatus::Failed => "failed",
            ImageStatus::Duplicate => "duplicate",
            ImageStatus::Unavailable => "unavailable",
        }
    }

    /// Whether the server is still working on the image (a client waiting for an import
    /// waits while this holds).
    pub fn is_in_progress(self) -> bool {
        matches!(self, ImageStatus::Importing | ImageStatus::Checking)
    }
}

/// Who a deployment is for, as the operator gave it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum Target {
    /// Every machine (`{"global": true}`).
    Global(bool),
    /// Every member of a zone, also those that join later.
    Zone(ZoneId),
    /// These machines.
    Machines(Vec<MachineId>),
}

impl Target {
    /// Whether machines that appear later join the deployment.
    pub fn is_open(&self) -> bool {
        !matches!(self, Target::Machines(_))
    }

    /// Whether a machine in `zones` is targeted.
    pub fn includes(&self, machine: &MachineId, zones: &[ZoneId]) -> bool {
        match self {
            Target::Global(_) => true,
            Target::Zone(zone) => zones.contains(zone),
            Target::Machines(list) => list.contains(machine),
        }
    }
}

impl std::fmt::Display for Target {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Target::Global(_) => f.write_str("every machine"),
            Target::Zone(zone) => write!(f, "zone {zone}"),
            Target::Machines(list) => write!(f, "{} machine(s)", list.len()),
        }
    }
}

/// What agents do once the image is verified.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Action {
    /// Keep it ready.
    #[default]
    Stage,
    /// Make it the next boot entry.
    SetBoot,
    /// Make it the next boot entry and reboot into it.
    Reboot,
}

impl Action {
    pub fn after_download(self) -> AfterDownload {
        match self {
            Action::Stage => AfterDownload::Stage,
            Action::SetBoot => AfterDownload::SetBoot,
            Action::Reboot => AfterDownload::Reboot,
        }
    }

    /// The state a machine ends in when all went well.
    pub fn final_state(self) -> MachineState {
        match self {
            Action::Stage => MachineState::Staged,
            Action::SetBoot | Action::Reboot => MachineState::Booted,
        }
    }
}

/// Where one machine of a deployment stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum MachineState {
    Pending,
    Downloading,
    Verifying,
    Staged,
    Booting,
    Booted,
    Failed,
    Stalled,
    Cancelled,
}

impl MachineState {
    pub fn as_str(self) -> &'static str {
        match self {
            MachineState::Pending => "pending",
            MachineState::Downloading => "downloading",
            MachineState::Verifying => "verifying",
            MachineState::Staged => "staged",
            MachineState::Booting => "booting",
            MachineState::Booted => "booted",
            MachineState::Failed => "failed",
            MachineState::Stalled => "stalled",
            MachineState::Cancelled => "cancelled",
        }
    }
}

/// The deployment as a whole.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OverallState {
    Running,
    Completed,
    Failed,
    Cancelled,
}

impl OverallState {
    pub fn as_str(self) -> &'static str {
        match self {
            OverallState::Running => "running",
            OverallState::Completed => "completed",
            OverallState::Failed => "failed",
            OverallState::Cancelled => "cancelled",
        }
    }
}

/// The body of `POST /api/v1/deployments`: what the operator asks for.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CreateDeployment {
    /// An image id, or a name only one image has.
    pub image: String,
    pub target: Target,
    #[serde(default)]
    pub action: Action,
    /// What becomes of a booted machine's writes; `reset` needs `set_boot` or `reboot`.
    #[serde(default)]
    pub persistence: Persistence,
}

/// Where a zone's definition came from (`source` of a zone).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ZoneSource {
    /// The server's config file.
    #[default]
    Config,
    /// The HTTP API (operator), which wins over the file until the zone is deleted.
    Api,
}

/// What became of a machine (`outcome` of an approval or a deletion).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum MachineOutcome {
    /// Its waiting key is now trusted.
    Approved,
    /// The key named was trusted already; nothing changed.
    AlreadyApproved,
    /// Forgotten: it may enroll again.
    Deleted,
}

/// The answer to approving or deleting a machine.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MachineChange {
    pub id: MachineId,
    pub outcome: MachineOutcome,
    /// The trusted key, after an approval.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub public_key: Option<PublicKeyBytes>,
    /// Its fingerprint, as `machines list` shows it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fingerprint: Option<String>,
}

/// Whether every subsystem does its job (`status` of `/healthz`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum HealthState {
    Ok,
    /// Some subsystem carries on degraded; `problems` says which and why (503).
    Degraded,
}

/// The answer of `/healthz`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct HealthView {
    pub status: HealthState,
    /// Degraded subsystem to why; left out when empty.
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub problems: BTreeMap<&'static str, String>,
}

/// Whether a machine's key is trusted (`key_state` of a machine).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum KeyState {
    /// Its key is trusted.
    Approved,
    /// A new machine waiting for approval.
    Pending,
    /// A known machine that presented another key, waiting; the trusted key still holds.
    KeyChanged,
}

/// The body of `POST /api/v1/images`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AddImage {
    /// Absolute path of the file on the server's disk.
    pub path: std::path::PathBuf,
    /// The name to list it by; the file's name when not given.
    pub name: Option<String>,
    /// Catalogue the file as it is, without checking it is a VHDX.
    #[serde(default)]
    pub raw: bool,
}

/// The body of `POST /api/v1/machines/{id}/approve`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Approve {
    /// The fingerprint of the key that waits, as the agent printed it: approving names the
    /// key, so that a key swapped in meanwhile is not approved by mistake.
    pub fingerprint: String,
}

/// A machine came online or went offline: the `machine` event of `GET /api/v1/events`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Presence<'a> {
    pub id: &'a MachineId,
    pub online: bool,
    /// When the server noticed, in Unix milliseconds.
    pub at_ms: i64,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_are_snake_case_words_on_the_wire() {
        let body = ErrorBody {
            error: "no zone lab".into(),
            code: ErrorCode::NotFound,
        };
        let json = serde_json::to_value(&body).unwrap();
        assert_eq!(
            json,
            serde_json::json!({"error": "no zone lab", "code": "not_found"})
        );
        assert_eq!(serde_json::from_value::<ErrorBody>(json).unwrap(), body);
        assert_eq!(
            serde_json::to_value(ErrorCode::ReadOnlyToken).unwrap(),
            "read_only_token"
        );
        assert_eq!(ErrorCode::KeyMismatch.status(), 409);
    }

    #[test]
    fn image_states_are_their_words_on_the_wire() {
        for status in [
            ImageStatus::Importing,
            ImageStatus::Checking,
            ImageStatus::Ready,
            ImageStatus::Failed,
            ImageStatus::Duplicate,
            ImageStatus::Unavailable,
        ] {
            let json = serde_json::to_value(status).unwrap();
            assert_eq!(json, status.as_str());
            assert_eq!(serde_json::from_value::<ImageStatus>(json).unwrap(), status);
        }
    }
}
