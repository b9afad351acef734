//! The application: every route (per role), its OpenAPI description (collected from the
//! handlers' `#[utoipa::path]` by `utoipa-axum`), auth, CORS, body limits and the access log.

use axum::extract::{DefaultBodyLimit, State};
use axum::http::{HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Router;
use tower_http::cors::{AllowOrigin, CorsLayer};
use tower_http::timeout::RequestBodyTimeoutLayer;
use utoipa::OpenApi;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use crate::config::Role;
use crate::error::{ApiError, ErrorBody};
use crate::state::AppState;
use crate::{a1111, native, openai, operations, ui};

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

/// The OpenAPI document and the routes it describes: every API for the `all` and `api`
/// roles, the probes and metrics alone for a `worker`.
fn api_routes(role: Role) -> (Router<AppState>, utoipa::openapi::OpenApi) {
    let ops = OpenApiRouter::with_openapi(ApiDoc::openapi())
        .routes(routes!(operations::healthz))
        .routes(routes!(operations::readyz))
        .routes(routes!(operations::metrics));
    if !role.serves_api() {
        return ops.split_for_parts();
    }
    ops.merge(a1111::routes())
        .merge(openai::routes())
        .merge(native::routes())
        .split_for_parts()
}

/// The whole application: API, UI, OpenAPI document, with auth, CORS and size limits.
pub fn router(state: AppState) -> Router {
    let role = state.config.role;
    let (mut api, doc) = api_routes(role);
    if role.serves_api() {
        api = api.merge(ui::routes());
    }
    let doc_json = doc.to_pretty_json().unwrap_or_else(|_| "{}".into());
    let mut app = api
        .fallback(|req: axum::extract::Request| async move {
            ApiError::not_found(format!(
                "no such endpoint: {} {} (see /openapi.json)",
                req.method(),
                req.uri().path()
            ))
        })
        .method_not_allowed_fallback(|req: axum::extract::Request| async move {
            ApiError::new(
                StatusCode::METHOD_NOT_ALLOWED,
                format!(
                    "{} is not allowed on {} (see /openapi.json)",
                    req.method(),
                    req.uri().path()
                ),
            )
        })
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
        .layer(DefaultBodyLimit::max(state.config.max_body_bytes))
        .layer(RequestBodyTimeoutLayer::new(state.config.body_timeout));
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
    let mut res = next.run(req).await;
    if res.status() == StatusCode::PAYLOAD_TOO_LARGE {
        let limit = state.config.max_body_bytes;
        res = ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            format!(
                "the request body is over the limit of {} MiB (--max-body-mb)",
                limit / (1024 * 1024)
            ),
        )
        .into_response();
    }
    let ms = started.elapsed().as_secs_f64() * 1e3;
    let status = res.status().as_u16();
    if QUIET_PATHS.contains(&path.as_str()) && status < 400 {
        tracing::debug!(target: "sdkube::http", %method, %path, status, ms, "request");
    } else {
        tracing::info!(target: "sdkube::http", %method, %path, status, ms, "request");
    }
    // A 503 of a probe says "not ready yet" (starting, loading): no server error.
    let probe = path == "/readyz" || path == "/healthz";
    if res.status().is_server_error() && !probe {
        state.metrics.error("http_5xx");
    } else if res.status().is_client_error() {
        state.metrics.error("http_4xx");
    }
    res
}
