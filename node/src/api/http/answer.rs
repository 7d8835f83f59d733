//! How the HTTP door answers: the socket's answers as JSON with an HTTP status, and the door's
//! own errors in the socket's error shape (`{"type":"error","code":…,"message":…}`).

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response as HttpResponse};
use konor_sdk::protocol::{ErrorCode, Response};

/// An error of the HTTP door itself, answered in the socket's error shape.
#[derive(Debug)]
pub(super) struct HttpError {
    status: StatusCode,
    code: &'static str,
    message: String,
}

impl IntoResponse for HttpError {
    fn into_response(self) -> HttpResponse {
        let body = serde_json::json!({ "type": "error", "code": self.code, "message": self.message });
        (self.status, axum::Json(body)).into_response()
    }
}

pub(super) fn http_error(status: StatusCode, code: &'static str, message: impl Into<String>) -> HttpError {
    HttpError { status, code, message: message.into() }
}

/// What a handler answers.
pub(super) type Answer = Result<HttpResponse, HttpError>;

/// The HTTP status of a socket error code.
fn status_of(code: ErrorCode) -> StatusCode {
    match code {
        ErrorCode::BadRequest | ErrorCode::Protocol => StatusCode::BAD_REQUEST,
        ErrorCode::UnknownGroup | ErrorCode::NotFound => StatusCode::NOT_FOUND,
        ErrorCode::AlreadyExists | ErrorCode::Unchanged | ErrorCode::Aborted => StatusCode::CONFLICT,
        ErrorCode::Forbidden => StatusCode::FORBIDDEN,
        ErrorCode::Unavailable | ErrorCode::NotCommitted => StatusCode::SERVICE_UNAVAILABLE,
        ErrorCode::Busy => StatusCode::TOO_MANY_REQUESTS,
        ErrorCode::ConditionFailed => StatusCode::PRECONDITION_FAILED,
        ErrorCode::SchemaViolation => StatusCode::UNPROCESSABLE_ENTITY,
        ErrorCode::OutcomeUnknown => StatusCode::GATEWAY_TIMEOUT,
        ErrorCode::NotDurable => StatusCode::INSUFFICIENT_STORAGE,
        ErrorCode::Idle => StatusCode::REQUEST_TIMEOUT,
        _ => StatusCode::INTERNAL_SERVER_ERROR,
    }
}

/// A socket answer as an HTTP answer: 201 for a created group, the error's status for an
/// error, 200 otherwise; the body is the answer's JSON either way.
pub(super) fn answer(response: Response) -> HttpResponse {
    let status = match &response {
        Response::Error { code, .. } => status_of(*code),
        Response::GroupCreated { .. } => StatusCode::CREATED,
        _ => StatusCode::OK,
    };
    (status, axum::Json(response)).into_response()
}
