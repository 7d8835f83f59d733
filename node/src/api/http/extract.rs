//! Extractors whose refusals answer in the door's JSON error shape (axum's own answer in plain
//! text): the `{group}` and `{group}/{key}` of a route, a query string, and a JSON body read
//! strictly, as the socket reads frames (a key given twice or an integer past 64 bits is
//! refused, not rounded or dropped; an empty body reads as `{}`).

use axum::body::Bytes;
use axum::extract::{FromRequest, FromRequestParts, Path, Query, Request};
use axum::http::StatusCode;
use axum::http::request::Parts;
use serde::de::DeserializeOwned;

use super::answer::{HttpError, http_error};
use crate::limits::HTTP_CALL_TIMEOUT;

fn bad_request(detail: impl Into<String>) -> HttpError {
    http_error(StatusCode::BAD_REQUEST, "bad_request", detail)
}

/// The one `{group}` or `{node}` of a route.
#[derive(Debug)]
pub(super) struct PathSegment(pub(super) String);

impl<S: Send + Sync> FromRequestParts<S> for PathSegment {
    type Rejection = HttpError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<PathSegment, HttpError> {
        let Path(group) = Path::<String>::from_request_parts(parts, state)
            .await
            .map_err(|rejection| bad_request(rejection.body_text()))?;
        Ok(PathSegment(group))
    }
}

/// The `{group}` and `{key}` (or `{version}`) of a route.
#[derive(Debug)]
pub(super) struct GroupKey(pub(super) String, pub(super) String);

impl<S: Send + Sync> FromRequestParts<S> for GroupKey {
    type Rejection = HttpError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<GroupKey, HttpError> {
        let Path((group, key)) = Path::<(String, String)>::from_request_parts(parts, state)
            .await
            .map_err(|rejection| bad_request(rejection.body_text()))?;
        Ok(GroupKey(group, key))
    }
}

/// The query string as `T`.
#[derive(Debug)]
pub(super) struct QueryOf<T>(pub(super) T);

impl<S: Send + Sync, T: DeserializeOwned> FromRequestParts<S> for QueryOf<T> {
    type Rejection = HttpError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<QueryOf<T>, HttpError> {
        let Query(query) = Query::<T>::from_request_parts(parts, state)
            .await
            .map_err(|rejection| bad_request(rejection.body_text()))?;
        Ok(QueryOf(query))
    }
}

/// The body as `T`, read strictly; at most `HTTP_BODY_BYTES_MAX` (the router's body limit),
/// within `HTTP_CALL_TIMEOUT` (a body trickled in slower holds no connection longer).
#[derive(Debug)]
pub(super) struct JsonBody<T>(pub(super) T);

impl<S: Send + Sync, T: DeserializeOwned> FromRequest<S> for JsonBody<T> {
    type Rejection = HttpError;

    async fn from_request(request: Request, state: &S) -> Result<JsonBody<T>, HttpError> {
        let read = tokio::time::timeout(HTTP_CALL_TIMEOUT, Bytes::from_request(request, state));
        let bytes = read
            .await
            .map_err(|_| {
                http_error(
                    StatusCode::REQUEST_TIMEOUT,
                    "timeout",
                    format!("the body did not arrive within {}s", HTTP_CALL_TIMEOUT.as_secs()),
                )
            })?
            .map_err(|rejection| {
                http_error(
                    rejection.status(),
                    "bad_request",
                    format!("cannot read the body: {}", rejection.body_text()),
                )
            })?;
        let bad = |detail: String| bad_request(format!("bad JSON body: {detail}"));
        let text = std::str::from_utf8(&bytes).map_err(|error| bad(error.to_string()))?;
        let text = if text.trim().is_empty() { "{}" } else { text };
        let value = konor_crdt::json_strict::parse(text).map_err(|error| bad(error.to_string()))?;
        serde_json::from_value(value).map(JsonBody).map_err(|error| bad(error.to_string()))
    }
}
