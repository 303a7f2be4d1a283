//! What the HTTP API's answers mean, shared by the server that writes them and the client
//! commands that read them, so that neither side guesses the other's meaning.

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
