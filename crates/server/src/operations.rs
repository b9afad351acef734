//! Probes and metrics: what Kubernetes and Prometheus read, open without credentials.

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;

use crate::config::Role;
use crate::job::JobState;
use crate::model::{ModelState, ModelStatus};
use crate::state::AppState;

/// Liveness: the process answers.
#[utoipa::path(get, path = "/healthz", tag = "operations", responses((status = 200, description = "alive", body = String)))]
pub async fn healthz() -> &'static str {
    "ok"
}

/// Readiness. `all` and `worker`: 200 once the model is loaded on every device (and, for a
/// worker, the queue answers), 503 with the model's state (fetching / loading / failed and
/// why) before. `api`: 200 while the queue answers, whether or not a worker runs (jobs wait
/// for one), with the workers and queue in the message.
#[utoipa::path(get, path = "/readyz", tag = "operations", responses(
    (status = 200, description = "ready", body = crate::model::ModelStatus),
    (status = 503, description = "not ready", body = crate::model::ModelStatus)))]
pub async fn readyz(State(state): State<AppState>) -> Response {
    if let Err(e) = state.queue.ping().await {
        let status = ModelStatus {
            state: ModelState::Failed,
            message: Some(e.to_string()),
            ..state.model.status()
        };
        return (StatusCode::SERVICE_UNAVAILABLE, Json(status)).into_response();
    }
    let status = match state.config.role {
        Role::Api => api_status(&state).await,
        _ => state.model.status(),
    };
    let ready = status.state == ModelState::Ready && !state.queue.is_shutting_down();
    let code = if ready {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (code, Json(status)).into_response()
}

/// The `api` role's readiness body: the selected model and what the workers are doing.
async fn api_status(state: &AppState) -> ModelStatus {
    let workers = state.cluster.workers().await.unwrap_or_default();
    let queued = state.queue.counts().await.map_or(0, |c| c.queued);
    let ready = workers
        .iter()
        .filter(|w| w.model.state == ModelState::Ready)
        .count();
    ModelStatus {
        name: workers
            .first()
            .map(|w| w.model.name.clone())
            .unwrap_or_default(),
        state: ModelState::Ready,
        message: Some(if workers.is_empty() && queued > 0 {
            format!("waiting for a GPU worker ({queued} queued)")
        } else {
            format!(
                "{} worker(s), {ready} with the model loaded; {queued} job(s) queued",
                workers.len()
            )
        }),
        progress: None,
        family: workers.first().and_then(|w| w.model.family.clone()),
        ..ModelStatus::default()
    }
}

/// Prometheus metrics (text exposition format).
#[utoipa::path(get, path = "/metrics", tag = "operations", responses((status = 200, description = "metrics", body = String)))]
pub async fn metrics(State(state): State<AppState>) -> Response {
    let jobs = state.queue.list().await.unwrap_or_default();
    let counts = state.queue.counts().await.unwrap_or_default();
    let jobs_by_state = JobState::ALL
        .iter()
        .map(|s| {
            (
                s.label(),
                jobs.iter().filter(|j| j.status.state == *s).count(),
            )
        })
        .collect();
    let workers = match state.config.role {
        Role::Api => state.cluster.workers().await.map(|w| w.len()).ok(),
        _ => None,
    };
    let gauges = crate::metrics::Gauges {
        queue_depth: counts.queued,
        queue_capacity: counts.capacity,
        jobs_by_state,
        model_ready: state.model.is_ready(),
        workers,
        device_memory: crate::metrics::cuda_memory_used(&state.device_labels()),
    };
    (
        [("content-type", "text/plain; version=0.0.4")],
        state.metrics.render(&gauges),
    )
        .into_response()
}
