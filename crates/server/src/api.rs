//! The router: every endpoint, its OpenAPI description (collected from the handlers'
//! `#[utoipa::path]` by `utoipa-axum`), the error body, auth, CORS and body limits.

use axum::extract::rejection::JsonRejection;
use axum::extract::{DefaultBodyLimit, FromRequest, State};
use axum::http::{HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::{Json, Router};
use serde::Serialize;
use tower_http::cors::{AllowOrigin, CorsLayer};
use utoipa::{OpenApi, ToSchema};
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use crate::{a1111, native, openai, ui, AppState};

/// Every error a handler returns: a status and a message naming the problem.
#[derive(Debug)]
pub struct ApiError {
    pub status: StatusCode,
    pub message: String,
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
        let body = ErrorBody {
            detail: self.message.clone(),
            error: self.message,
        };
        (self.status, Json(body)).into_response()
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

impl From<crate::jobs::SubmitError> for ApiError {
    fn from(e: crate::jobs::SubmitError) -> Self {
        let status = match e {
            crate::jobs::SubmitError::Full(_) => StatusCode::TOO_MANY_REQUESTS,
            crate::jobs::SubmitError::ShuttingDown => StatusCode::SERVICE_UNAVAILABLE,
        };
        ApiError::new(status, e.to_string())
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

#[derive(OpenApi)]
#[openapi(
    info(
        title = "sdkube",
        description = "Stable Diffusion as a Kubernetes service: AUTOMATIC1111-compatible API \
                       (/sdapi/v1), OpenAI-style images API (/v1), native jobs API (/api/v1).",
    ),
    tags(
        (name = "a1111", description = "AUTOMATIC1111 web UI API, same paths, fields and shapes"),
        (name = "jobs", description = "Native asynchronous jobs with live events (used by the web UI)"),
        (name = "openai", description = "OpenAI-style image generation"),
        (name = "operations", description = "Probes and metrics"),
    ),
    components(schemas(ErrorBody))
)]
struct ApiDoc;

/// The OpenAPI document and the routes it describes.
fn api_routes() -> (Router<AppState>, utoipa::openapi::OpenApi) {
    OpenApiRouter::with_openapi(ApiDoc::openapi())
        .routes(routes!(a1111::txt2img))
        .routes(routes!(a1111::img2img))
        .routes(routes!(a1111::extra_single_image))
        .routes(routes!(a1111::extra_batch_images))
        .routes(routes!(a1111::png_info))
        .routes(routes!(a1111::progress))
        .routes(routes!(a1111::interrupt))
        .routes(routes!(a1111::skip))
        .routes(routes!(a1111::get_options, a1111::set_options))
        .routes(routes!(a1111::sd_models))
        .routes(routes!(a1111::sd_vae))
        .routes(routes!(a1111::samplers))
        .routes(routes!(a1111::schedulers))
        .routes(routes!(a1111::upscalers))
        .routes(routes!(a1111::latent_upscale_modes))
        .routes(routes!(a1111::face_restorers))
        .routes(routes!(a1111::embeddings))
        .routes(routes!(a1111::refresh_embeddings))
        .routes(routes!(a1111::create_embedding))
        .routes(routes!(a1111::train_embedding))
        .routes(routes!(a1111::refresh_checkpoints))
        .routes(routes!(a1111::memory))
        .routes(routes!(a1111::cmd_flags))
        .routes(routes!(a1111::prompt_styles))
        .routes(routes!(a1111::hypernetworks))
        .routes(routes!(a1111::loras))
        .routes(routes!(a1111::extensions))
        .routes(routes!(a1111::scripts))
        .routes(routes!(a1111::script_info))
        .routes(routes!(a1111::realesrgan_models))
        .routes(routes!(openai::images_generations))
        .routes(routes!(native::status))
        .routes(routes!(native::create_job, native::list_jobs))
        .routes(routes!(native::get_job))
        .routes(routes!(native::job_events))
        .routes(routes!(native::cancel_job))
        .routes(routes!(native::gallery))
        .routes(routes!(native::output_file))
        .routes(routes!(healthz))
        .routes(routes!(readyz))
        .routes(routes!(metrics))
        .split_for_parts()
}

/// The whole application: API, UI, OpenAPI document, with auth, CORS and size limits.
pub fn router(state: AppState) -> Router {
    let (api, doc) = api_routes();
    let doc_json = doc.to_pretty_json().unwrap_or_else(|_| "{}".into());
    let mut app = api
        .merge(ui::routes())
        .route(
            "/openapi.json",
            axum::routing::get(move || async move {
                ([("content-type", "application/json")], doc_json.clone())
            }),
        )
        .layer(axum::middleware::from_fn_with_state(
            state.clone(),
            crate::auth::require_auth,
        ))
        .layer(axum::middleware::from_fn_with_state(
            state.clone(),
            count_http_errors,
        ))
        .layer(DefaultBodyLimit::max(state.config.max_body_bytes));
    if !state.config.cors_origins.is_empty() {
        let origins: Vec<HeaderValue> = state
            .config
            .cors_origins
            .iter()
            .filter_map(|o| HeaderValue::from_str(o).ok())
            .collect();
        app = app.layer(
            CorsLayer::new()
                .allow_origin(AllowOrigin::list(origins))
                .allow_methods(tower_http::cors::Any)
                .allow_headers(tower_http::cors::Any),
        );
    }
    app.with_state(state)
}

/// Paths polled all the time (probes, progress and status polling): logged at debug only.
const QUIET_PATHS: [&str; 5] = [
    "/healthz",
    "/readyz",
    "/metrics",
    "/sdapi/v1/progress",
    "/api/v1/status",
];

/// Counts errors for the metrics and writes one access-log line per request (JSON with
/// `--log-json`): method, path, status, milliseconds.
async fn count_http_errors(
    State(state): State<AppState>,
    req: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    let started = std::time::Instant::now();
    let method = req.method().clone();
    let path = req.uri().path().to_string();
    let res = next.run(req).await;
    let ms = started.elapsed().as_secs_f64() * 1e3;
    let status = res.status().as_u16();
    if QUIET_PATHS.contains(&path.as_str()) && status < 400 {
        tracing::debug!(target: "sdkube::http", %method, %path, status, ms, "request");
    } else {
        tracing::info!(target: "sdkube::http", %method, %path, status, ms, "request");
    }
    if res.status().is_server_error() {
        state.metrics.error("http_5xx");
    } else if res.status().is_client_error() {
        state.metrics.error("http_4xx");
    }
    res
}

/// Liveness: the process answers.
#[utoipa::path(get, path = "/healthz", tag = "operations", responses((status = 200, description = "alive", body = String)))]
pub async fn healthz() -> &'static str {
    "ok"
}

/// Readiness: 200 once the model is loaded on every worker, 503 with the model's state
/// (fetching / loading / failed and why) before.
#[utoipa::path(get, path = "/readyz", tag = "operations", responses(
    (status = 200, description = "ready", body = crate::model::ModelStatus),
    (status = 503, description = "not ready", body = crate::model::ModelStatus)))]
pub async fn readyz(State(state): State<AppState>) -> Response {
    let status = state.model.status();
    let code = if status.state == crate::model::ModelState::Ready && !state.jobs.is_shutting_down()
    {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (code, Json(status)).into_response()
}

/// Prometheus metrics (text exposition format).
#[utoipa::path(get, path = "/metrics", tag = "operations", responses((status = 200, description = "metrics", body = String)))]
pub async fn metrics(State(state): State<AppState>) -> Response {
    let jobs = state.jobs.list();
    let jobs_by_state = crate::jobs::JobState::ALL
        .iter()
        .map(|s| {
            (
                s.label(),
                jobs.iter().filter(|j| j.status().state == *s).count(),
            )
        })
        .collect();
    let gauges = crate::metrics::Gauges {
        queue_depth: state.jobs.queued_len(),
        queue_capacity: state.jobs.capacity(),
        jobs_by_state,
        model_ready: state.model.is_ready(),
        device_memory: crate::metrics::cuda_memory_used(&state.device_labels()),
    };
    (
        [("content-type", "text/plain; version=0.0.4")],
        state.metrics.render(&gauges),
    )
        .into_response()
}
