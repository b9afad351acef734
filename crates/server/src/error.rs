//! The error every handler returns, its JSON body, and the JSON body extractor whose errors
//! name the field at fault.

use axum::extract::rejection::JsonRejection;
use axum::extract::FromRequest;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::Serialize;
use utoipa::ToSchema;

use crate::queue::QueueError;

/// Every error a handler returns: a status and a message naming the problem.
#[derive(Debug, Clone)]
pub struct ApiError {
    pub status: StatusCode,
    pub message: String,
    /// Seconds a client should wait before trying again (429, 503 of a full queue).
    pub retry_after: Option<u32>,
}

/// The JSON body of every error (A1111's clients read `detail`; ours read `error`).
#[derive(Serialize, ToSchema)]
pub struct ErrorBody {
    pub error: String,
    pub detail: String,
}

impl ApiError {
    pub fn new(status: StatusCode, message: impl Into<String>) -> Self {
        Self {
            status,
            message: message.into(),
            retry_after: None,
        }
    }
    pub fn bad_request(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, message)
    }
    pub fn not_found(message: impl Into<String>) -> Self {
        Self::new(StatusCode::NOT_FOUND, message)
    }
    pub fn unavailable(message: impl Into<String>) -> Self {
        Self::new(StatusCode::SERVICE_UNAVAILABLE, message)
    }
    pub fn internal(message: impl Into<String>) -> Self {
        Self::new(StatusCode::INTERNAL_SERVER_ERROR, message)
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let retry_after = self.retry_after;
        let body = ErrorBody {
            detail: self.message.clone(),
            error: self.message,
        };
        let mut res = (self.status, Json(body)).into_response();
        if let Some(s) = retry_after {
            res.headers_mut()
                .insert(axum::http::header::RETRY_AFTER, s.into());
        }
        res
    }
}

impl From<JsonRejection> for ApiError {
    fn from(r: JsonRejection) -> Self {
        let status = match r.status() {
            StatusCode::PAYLOAD_TOO_LARGE => StatusCode::PAYLOAD_TOO_LARGE,
            StatusCode::UNSUPPORTED_MEDIA_TYPE => StatusCode::UNSUPPORTED_MEDIA_TYPE,
            _ => StatusCode::UNPROCESSABLE_ENTITY,
        };
        ApiError::new(status, format!("invalid request body: {}", r.body_text()))
    }
}

impl From<QueueError> for ApiError {
    fn from(e: QueueError) -> Self {
        let (status, retry_after) = match e {
            QueueError::Full(_) => (StatusCode::TOO_MANY_REQUESTS, Some(5)),
            QueueError::Engine(_) => (StatusCode::SERVICE_UNAVAILABLE, Some(5)),
            QueueError::ShuttingDown => (StatusCode::SERVICE_UNAVAILABLE, None),
        };
        ApiError {
            retry_after,
            ..ApiError::new(status, e.to_string())
        }
    }
}

/// A query string whose errors are [`ApiError`]s naming the parameter (axum's own answer is
/// plain text).
pub struct ApiQuery<T>(pub T);

impl<T: serde::de::DeserializeOwned, S: Send + Sync> axum::extract::FromRequestParts<S>
    for ApiQuery<T>
{
    type Rejection = ApiError;

    async fn from_request_parts(
        parts: &mut axum::http::request::Parts,
        _: &S,
    ) -> Result<Self, ApiError> {
        let query = parts.uri.query().unwrap_or("");
        serde_urlencoded::from_str::<T>(query)
            .map(ApiQuery)
            .map_err(|e| {
                // serde_urlencoded's message names no parameter: find the one at fault.
                let pairs: Vec<(String, String)> =
                    serde_urlencoded::from_str(query).unwrap_or_default();
                let culprit = pairs.iter().find(|(k, v)| {
                    let alone = serde_urlencoded::to_string([(k, v)]).unwrap_or_default();
                    serde_urlencoded::from_str::<T>(&alone).is_err()
                });
                ApiError::bad_request(match culprit {
                    Some((k, v)) => format!("query string: {k}={v:?}: {e}"),
                    None => format!("query string: {e}"),
                })
            })
    }
}

/// A JSON body whose errors are [`ApiError`]s naming the bad field.
pub struct ApiJson<T>(pub T);

impl<T: serde::de::DeserializeOwned, S: Send + Sync> FromRequest<S> for ApiJson<T> {
    type Rejection = ApiError;

    async fn from_request(req: axum::extract::Request, state: &S) -> Result<Self, ApiError> {
        let Json(value) = Json::<serde_json::Value>::from_request(req, state).await?;
        from_json(value).map(ApiJson)
    }
}

/// Deserializes a request body; on a type error, names the field at fault (serde_json's
/// own message has only a line and column, and none at all through flattened structs).
pub fn from_json<T: serde::de::DeserializeOwned>(value: serde_json::Value) -> Result<T, ApiError> {
    match serde_json::from_value::<T>(value.clone()) {
        Ok(v) => Ok(v),
        Err(e) => {
            let field = value.as_object().and_then(|fields| {
                fields.iter().find_map(|(k, v)| {
                    let alone = serde_json::json!({ k.as_str(): v });
                    let bad = matches!(serde_json::from_value::<T>(alone), Err(ref e2) if e2.to_string() == e.to_string());
                    bad.then(|| k.clone())
                })
            });
            Err(ApiError::new(
                StatusCode::UNPROCESSABLE_ENTITY,
                match field {
                    Some(f) => format!("field `{f}`: {e}"),
                    None => format!("invalid request body: {e}"),
                },
            ))
        }
    }
}

impl ApiError {
    /// The error of a job that did not succeed: the worker says whose the failure is.
    pub fn of_job(status: &crate::job::JobStatus, otherwise: &str) -> Self {
        use crate::job::Failure;
        let message = status
            .error
            .clone()
            .unwrap_or_else(|| otherwise.to_string());
        match status.failure {
            Failure::BadRequest => ApiError::bad_request(message),
            Failure::Unavailable => ApiError::unavailable(message),
            Failure::Internal => ApiError::internal(message),
        }
    }
}
