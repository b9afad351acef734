//! A1111's progress polling and its interrupt and skip. With several workers, `progress`
//! shows the job running longest (A1111 runs one at a time), counts every queued and running
//! job of the cluster, and says so when jobs wait for a worker; `interrupt` and `skip` act
//! on every running job, as A1111's act on "the" running one.

use axum::extract::State;
use axum::Json;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use utoipa::ToSchema;

use crate::config::Role;
use crate::error::{ApiError, ApiQuery};
use crate::queue::Signal;
use crate::state::AppState;

#[derive(Debug, Serialize, ToSchema)]
pub struct ProgressState {
    pub skipped: bool,
    pub interrupted: bool,
    pub job: String,
    pub job_count: usize,
    pub job_timestamp: String,
    pub job_no: usize,
    pub sampling_step: usize,
    pub sampling_steps: usize,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct ProgressResponse {
    /// 0..1 of the running job.
    pub progress: f64,
    /// Seconds left.
    pub eta_relative: f64,
    pub state: ProgressState,
    /// Base64 PNG preview of the running job, when there is one.
    pub current_image: Option<String>,
    /// What the cluster is doing when that is not plain progress (jobs waiting for a
    /// worker).
    pub textinfo: Option<String>,
    pub current_task: Option<String>,
}

#[derive(Debug, Deserialize, utoipa::IntoParams)]
pub struct ProgressQuery {
    /// Leave out the preview image.
    #[serde(default)]
    pub skip_current_image: bool,
}

/// "waiting for a GPU worker (N queued)" while jobs wait and no worker runs (a shared queue
/// scaled to zero workers); None otherwise.
pub async fn waiting_for_worker(state: &AppState, queued: usize) -> Option<String> {
    if state.config.role != Role::Api || queued == 0 {
        return None;
    }
    let workers = state.cluster.workers().await.unwrap_or_default();
    workers
        .is_empty()
        .then(|| format!("waiting for a GPU worker ({queued} queued)"))
}

/// Progress of the running job (A1111's polling endpoint).
#[utoipa::path(get, path = "/sdapi/v1/progress", tag = "a1111", params(ProgressQuery),
    responses((status = 200, body = ProgressResponse), (status = 503, body = crate::error::ErrorBody)))]
pub async fn progress(
    State(state): State<AppState>,
    ApiQuery(q): ApiQuery<ProgressQuery>,
) -> Result<Json<ProgressResponse>, ApiError> {
    let counts = state.queue.counts().await?;
    let running = state.queue.running().await?;
    let textinfo = waiting_for_worker(&state, counts.queued).await;
    let Some(job) = running.first() else {
        return Ok(Json(ProgressResponse {
            progress: 0.0,
            eta_relative: 0.0,
            state: ProgressState {
                skipped: false,
                interrupted: false,
                job: String::new(),
                job_count: counts.queued,
                job_timestamp: "0".into(),
                job_no: 0,
                sampling_step: 0,
                sampling_steps: 0,
            },
            current_image: None,
            textinfo,
            current_task: None,
        }));
    };
    let s = &job.status;
    let progress = if s.total_steps > 0 {
        (s.step as f64 / s.total_steps as f64).min(1.0)
    } else {
        0.0
    };
    let current_image = if q.skip_current_image {
        None
    } else {
        state
            .queue
            .preview(&job.id)
            .await?
            .as_deref()
            .and_then(|p| p.strip_prefix("data:image/png;base64,"))
            .map(str::to_string)
    };
    Ok(Json(ProgressResponse {
        progress,
        eta_relative: s.eta_seconds().unwrap_or(0.0),
        state: ProgressState {
            skipped: job.skip_requested,
            interrupted: job.interrupt_requested,
            job: job.meta.kind.clone(),
            job_count: counts.running + counts.queued,
            job_timestamp: humantime::format_rfc3339_seconds(job.meta.created).to_string(),
            job_no: 0,
            sampling_step: s.step,
            sampling_steps: s.total_steps,
        },
        current_image,
        textinfo,
        current_task: Some(job.id.clone()),
    }))
}

/// Stops the running job(s) at the next step; images finished so far are returned.
#[utoipa::path(post, path = "/sdapi/v1/interrupt", tag = "a1111", responses((status = 200, description = "interrupted")))]
pub async fn interrupt(State(state): State<AppState>) -> Result<Json<Value>, ApiError> {
    state.queue.signal_running(Signal::Interrupt).await?;
    Ok(Json(json!({})))
}

/// Ends the current batch of the running job(s) and goes on with the next one.
#[utoipa::path(post, path = "/sdapi/v1/skip", tag = "a1111", responses((status = 200, description = "skipped")))]
pub async fn skip(State(state): State<AppState>) -> Result<Json<Value>, ApiError> {
    state.queue.signal_running(Signal::Skip).await?;
    Ok(Json(json!({})))
}
