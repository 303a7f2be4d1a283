//! Error answers: what failed and what to do, with a stable code (`crate::api::ErrorCode`).

use super::*;

/// An API failure: a status and a message, rendered as `{"error": "..."}`.
#[derive(Debug)]
pub struct ApiError {
    status: StatusCode,
    code: ErrorCode,
    message: String,
}

impl ApiError {
    /// An error of the general kind its status says (`not_found` for 404, ...).
    pub(super) fn new(status: StatusCode, message: impl Into<String>) -> Self {
        let code = match status.as_u16() {
            400 => ErrorCode::InvalidRequest,
            401 => ErrorCode::Unauthorized,
            403 => ErrorCode::Forbidden,
            404 => ErrorCode::NotFound,
            409 => ErrorCode::Conflict,
            503 => ErrorCode::Unavailable,
            _ => ErrorCode::Internal,
        };
        ApiError {
            status,
            code,
            message: message.into(),
        }
    }

    /// An error of a kind more precise than its status.
    pub(super) fn coded(code: ErrorCode, message: impl Into<String>) -> Self {
        ApiError {
            status: StatusCode::from_u16(code.status()).unwrap_or(StatusCode::BAD_REQUEST),
            code,
            message: message.into(),
        }
    }

    pub(super) fn internal(context: &str, error: impl std::fmt::Display) -> Self {
        tracing::error!(error = %error, "{context}");
        ApiError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("{context}: {error}"),
        )
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut response = (
            self.status,
            Json(ErrorBody {
                error: self.message,
                code: self.code,
            }),
        )
            .into_response();
        if self.status == StatusCode::UNAUTHORIZED {
            response.headers_mut().insert(
                header::WWW_AUTHENTICATE,
                header::HeaderValue::from_static("Bearer"),
            );
        }
        response
    }
}

impl From<ApproveError> for ApiError {
    fn from(e: ApproveError) -> Self {
        match e {
            ApproveError::UnknownMachine(_) => ApiError::new(StatusCode::NOT_FOUND, e.to_string()),
            ApproveError::NothingToApprove(_) => ApiError::new(StatusCode::CONFLICT, e.to_string()),
            ApproveError::WrongKey { .. } => ApiError::coded(ErrorCode::KeyMismatch, e.to_string()),
            ApproveError::Store(e) => ApiError::internal("storing the machine's keys", e),
        }
    }
}

impl From<CatalogError> for ApiError {
    fn from(e: CatalogError) -> Self {
        match e {
            CatalogError::Invalid(m) => ApiError::new(StatusCode::BAD_REQUEST, m),
            CatalogError::NotFound(_) => ApiError::new(StatusCode::NOT_FOUND, e.to_string()),
            CatalogError::Store(e) => ApiError::internal("reading the catalog", e),
        }
    }
}

impl From<FleetError> for ApiError {
    fn from(e: FleetError) -> Self {
        match e {
            FleetError::NotFound(m) => ApiError::new(StatusCode::NOT_FOUND, m),
            FleetError::Invalid(m) => ApiError::new(StatusCode::BAD_REQUEST, m),
            FleetError::Store(e) => ApiError::internal("storing the change", e),
        }
    }
}

/// The orchestrator's answer, or 503 when it is not running.
pub(super) fn answered<T>(result: anyhow::Result<Result<T, FleetError>>) -> Result<T, ApiError> {
    result
        .map_err(|e| ApiError::new(StatusCode::SERVICE_UNAVAILABLE, e.to_string()))?
        .map_err(ApiError::from)
}

/// A JSON body, or a 400 that says what is wrong with it.
pub(super) fn json_body<T>(
    body: Result<Json<T>, axum::extract::rejection::JsonRejection>,
) -> Result<T, ApiError> {
    body.map(|Json(b)| b)
        .map_err(|e| ApiError::new(StatusCode::BAD_REQUEST, e.body_text()))
}
