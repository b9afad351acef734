//! The native API used by the web UI: asynchronous jobs with live server-sent events,
//! the status of the server, and the gallery of saved outputs.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::{Path, Query, State};
use axum::http::{header, StatusCode};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::Json;
use futures_util::stream::Stream;
use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};

use crate::api::{ApiError, ApiJson};
use crate::jobs::{Job, JobImage, JobState, JobStatus};
use crate::model::ModelStatus;
use crate::AppState;

/// A job as the API shows it.
#[derive(Serialize, ToSchema)]
pub struct JobView {
    pub id: String,
    /// `txt2img`, `img2img`, `extras`, …
    pub kind: String,
    pub state: JobState,
    /// Place in the queue (0 = next); null when not queued.
    pub position: Option<usize>,
    pub step: usize,
    pub total_steps: usize,
    pub eta_seconds: Option<f64>,
    pub error: Option<String>,
    /// RFC 3339.
    pub created: String,
    pub images: Vec<JobImage>,
    /// How many jobs shared its device batch (compatible jobs are batched); 0 before it ran.
    pub batch_jobs: usize,
    /// The parameters as submitted.
    pub params: serde_json::Value,
}

impl JobView {
    pub fn of(state: &AppState, job: &Job) -> Self {
        let s = job.status();
        Self::with_status(state, job, &s)
    }

    fn with_status(state: &AppState, job: &Job, s: &JobStatus) -> Self {
        JobView {
            id: job.id.clone(),
            kind: job.kind.to_string(),
            state: s.state,
            position: if s.state == JobState::Queued {
                state.jobs.position(&job.id)
            } else {
                None
            },
            step: s.step,
            total_steps: s.total_steps,
            eta_seconds: if s.state == JobState::Running {
                Job::eta_seconds(s)
            } else {
                None
            },
            error: s.error.clone(),
            created: humantime::format_rfc3339_seconds(job.created).to_string(),
            images: s.images.clone(),
            batch_jobs: s.batch_jobs,
            params: job.params.clone(),
        }
    }
}

#[derive(Serialize, ToSchema)]
pub struct QueueStatus {
    pub queued: usize,
    pub running: usize,
    pub capacity: usize,
}

#[derive(Serialize, ToSchema)]
pub struct LimitsView {
    pub max_size: usize,
    pub max_steps: usize,
    pub max_batch: usize,
}

#[derive(Serialize, ToSchema)]
pub struct ServerStatus {
    pub model: ModelStatus,
    pub family: Option<String>,
    /// Devices of the workers, e.g. `["cpu"]`, `["cuda:0", "cuda:1"]`.
    pub devices: Vec<String>,
    pub device: String,
    pub limits: LimitsView,
    pub queue: QueueStatus,
    pub version: String,
}

/// The server at a glance: the model's state (fetching with progress, loading, ready,
/// failed and why), devices, limits and queue.
#[utoipa::path(get, path = "/api/v1/status", tag = "jobs", responses((status = 200, body = ServerStatus)))]
pub async fn status(State(state): State<AppState>) -> Json<ServerStatus> {
    let model = state.model.status();
    let l = state.config.limits;
    let devices = state.device_labels();
    Json(ServerStatus {
        family: model.family.clone(),
        model,
        device: devices.first().cloned().unwrap_or_default(),
        devices,
        limits: LimitsView {
            max_size: l.max_size,
            max_steps: l.max_steps,
            max_batch: l.max_batch,
        },
        queue: QueueStatus {
            queued: state.jobs.queued_len(),
            running: state.jobs.running().len(),
            capacity: state.jobs.capacity(),
        },
        version: env!("CARGO_PKG_VERSION").to_string(),
    })
}

/// A job to create: its kind and A1111-style parameters.
#[derive(Deserialize, ToSchema)]
#[schema(example = json!({"kind": "txt2img", "params": {"prompt": "a lighthouse at dusk", "steps": 20, "width": 512, "height": 512, "sampler_name": "Euler a", "seed": -1}}))]
pub struct CreateJob {
    /// `txt2img`, `img2img`, `extras` or `train-embedding`.
    pub kind: String,
    /// Same fields as `/sdapi/v1/txt2img`, `/sdapi/v1/img2img` or
    /// `/sdapi/v1/extra-single-image`.
    #[schema(value_type = Object)]
    pub params: serde_json::Value,
}

/// Queues a job and returns at once (202). Images are saved into the outputs folder.
#[utoipa::path(post, path = "/api/v1/jobs", tag = "jobs", request_body = CreateJob, responses(
    (status = 202, body = JobView),
    (status = 400, description = "bad parameters", body = crate::api::ErrorBody),
    (status = 429, description = "queue full", body = crate::api::ErrorBody),
    (status = 503, description = "model not ready", body = crate::api::ErrorBody)))]
pub async fn create_job(
    State(state): State<AppState>,
    ApiJson(body): ApiJson<CreateJob>,
) -> Result<Response, ApiError> {
    let job = match body.kind.as_str() {
        "txt2img" => {
            let req: crate::a1111::Txt2ImgRequest = parse_params(&body.params)?;
            crate::a1111::txt2img_job(&state, req, true)?
        }
        "img2img" => {
            let req: crate::a1111::Img2ImgRequest = parse_params(&body.params)?;
            crate::a1111::img2img_job(&state, req, true)?
        }
        "train-embedding" => {
            let req: crate::a1111::TrainEmbeddingRequest = parse_params(&body.params)?;
            crate::a1111::train_job(&state, req)?
        }
        "extras" => {
            let req: crate::a1111::ExtrasSingleRequest = parse_params(&body.params)?;
            crate::a1111::extras_job(&state, req.into_batch(), true)?
        }
        other => {
            return Err(ApiError::bad_request(format!(
                "unknown job kind {other:?}; expected txt2img, img2img, extras or train-embedding"
            )))
        }
    };
    let job = state.jobs.submit(job)?;
    Ok((StatusCode::ACCEPTED, Json(JobView::of(&state, &job))).into_response())
}

fn parse_params<T: serde::de::DeserializeOwned>(v: &serde_json::Value) -> Result<T, ApiError> {
    crate::api::from_json(v.clone())
        .map_err(|e| ApiError::new(e.status, format!("params: {}", e.message)))
}

#[derive(Serialize, ToSchema)]
pub struct JobList {
    pub jobs: Vec<JobView>,
}

/// Running and queued jobs, then the most recent finished ones.
#[utoipa::path(get, path = "/api/v1/jobs", tag = "jobs", responses((status = 200, body = JobList)))]
pub async fn list_jobs(State(state): State<AppState>) -> Json<JobList> {
    Json(JobList {
        jobs: state
            .jobs
            .list()
            .iter()
            .map(|j| JobView::of(&state, j))
            .collect(),
    })
}

fn find(state: &AppState, id: &str) -> Result<Arc<Job>, ApiError> {
    state.jobs.get(id).ok_or_else(|| {
        ApiError::not_found(format!(
            "no job {id:?} (finished jobs are kept for a while)"
        ))
    })
}

#[utoipa::path(get, path = "/api/v1/jobs/{id}", tag = "jobs",
    params(("id" = String, Path, description = "job id")),
    responses((status = 200, body = JobView), (status = 404, body = crate::api::ErrorBody)))]
pub async fn get_job(
    State(state): State<AppState>,
    Path(id): Path<String>,
) -> Result<Json<JobView>, ApiError> {
    let job = find(&state, &id)?;
    Ok(Json(JobView::of(&state, &job)))
}

/// Cancels a job: a queued job is dropped, a running one stops at its next step.
#[utoipa::path(post, path = "/api/v1/jobs/{id}/cancel", tag = "jobs",
    params(("id" = String, Path, description = "job id")),
    responses((status = 200, body = JobView), (status = 404, body = crate::api::ErrorBody)))]
pub async fn cancel_job(
    State(state): State<AppState>,
    Path(id): Path<String>,
) -> Result<Json<JobView>, ApiError> {
    let job = state
        .jobs
        .cancel(&id)
        .ok_or_else(|| ApiError::not_found(format!("no job {id:?}")))?;
    Ok(Json(JobView::of(&state, &job)))
}

/// One progress event.
#[derive(Serialize, ToSchema)]
pub struct ProgressEvent {
    pub step: usize,
    pub total_steps: usize,
    pub eta_seconds: Option<f64>,
    /// PNG data URL of the current estimate, when a new one is available.
    pub preview: Option<String>,
}

#[derive(Serialize, ToSchema)]
pub struct StateEvent {
    pub state: JobState,
    pub position: Option<usize>,
}

/// Server-sent events of one job: `state` (queued/running and place in the queue),
/// `progress` (step, ETA, preview image), then `done` with the final job; the stream ends
/// after `done`.
#[utoipa::path(get, path = "/api/v1/jobs/{id}/events", tag = "jobs",
    params(("id" = String, Path, description = "job id")),
    responses((status = 200, description = "text/event-stream of state, progress and done events", content_type = "text/event-stream", body = String),
        (status = 404, body = crate::api::ErrorBody)))]
pub async fn job_events(
    State(state): State<AppState>,
    Path(id): Path<String>,
) -> Result<Sse<impl Stream<Item = Result<Event, Infallible>>>, ApiError> {
    let job = find(&state, &id)?;
    let cursor = EventCursor {
        rx: job.subscribe(),
        state,
        job,
        sent_state: None,
        sent_preview: None,
        sent_step: 0,
        done: false,
    };
    let stream = futures_util::stream::unfold(cursor, |mut c| async move {
        let ev = c.next_event().await?;
        Some((Ok(ev), c))
    });
    Ok(Sse::new(stream).keep_alive(KeepAlive::default()))
}

/// What one job's event stream has sent so far.
struct EventCursor {
    state: AppState,
    job: Arc<Job>,
    rx: tokio::sync::watch::Receiver<u64>,
    sent_state: Option<(JobState, Option<usize>)>,
    sent_preview: Option<String>,
    sent_step: usize,
    done: bool,
}

impl EventCursor {
    /// The next event to send: `state` when state or queue place changed, `progress` on a
    /// new step or preview, `done` once; None after `done`.
    async fn next_event(&mut self) -> Option<Event> {
        if self.done {
            return None;
        }
        loop {
            let s = self.job.status();
            let position = if s.state == JobState::Queued {
                self.state.jobs.position(&self.job.id)
            } else {
                None
            };
            if s.state.is_finished() {
                self.done = true;
                let view = JobView::with_status(&self.state, &self.job, &s);
                return Some(
                    Event::default()
                        .event("done")
                        .json_data(&view)
                        .unwrap_or_default(),
                );
            }
            if self.sent_state != Some((s.state, position)) {
                self.sent_state = Some((s.state, position));
                let ev = StateEvent {
                    state: s.state,
                    position,
                };
                return Some(
                    Event::default()
                        .event("state")
                        .json_data(ev)
                        .unwrap_or_default(),
                );
            }
            if s.state == JobState::Running
                && (s.step != self.sent_step || s.preview != self.sent_preview)
            {
                let preview = (s.preview != self.sent_preview)
                    .then(|| s.preview.clone())
                    .flatten();
                self.sent_step = s.step;
                self.sent_preview = s.preview.clone();
                let ev = ProgressEvent {
                    step: s.step,
                    total_steps: s.total_steps,
                    eta_seconds: Job::eta_seconds(&s),
                    preview,
                };
                return Some(
                    Event::default()
                        .event("progress")
                        .json_data(ev)
                        .unwrap_or_default(),
                );
            }
            // Queue positions move without this job changing: look again now and then.
            let _ = tokio::time::timeout(Duration::from_millis(500), self.rx.changed()).await;
        }
    }
}

#[derive(Deserialize, IntoParams)]
pub struct GalleryQuery {
    /// 1-based page.
    pub page: Option<usize>,
    /// Items per page (at most 200).
    pub per_page: Option<usize>,
}

/// Images saved in the outputs folder, newest first, with their infotext.
#[utoipa::path(get, path = "/api/v1/gallery", tag = "jobs", params(GalleryQuery),
    responses((status = 200, body = crate::outputs::GalleryPage)))]
pub async fn gallery(
    State(state): State<AppState>,
    Query(q): Query<GalleryQuery>,
) -> Result<Json<crate::outputs::GalleryPage>, ApiError> {
    let per_page = q.per_page.unwrap_or(24).clamp(1, 200);
    let page = q.page.unwrap_or(1).max(1);
    let st = state.clone();
    let result = tokio::task::spawn_blocking(move || st.outputs.gallery(page, per_page))
        .await
        .map_err(|e| ApiError::internal(e.to_string()))?
        .map_err(|e| ApiError::internal(format!("reading the outputs folder: {e}")))?;
    Ok(Json(result))
}

/// A saved image. Names are `[A-Za-z0-9._-]+.png` inside the outputs folder; nothing else
/// can be reached through this path.
#[utoipa::path(get, path = "/outputs/{name}", tag = "jobs",
    params(("name" = String, Path, description = "file name from the gallery or a job")),
    responses((status = 200, content_type = "image/png", body = Vec<u8>), (status = 404, body = crate::api::ErrorBody)))]
pub async fn output_file(
    State(state): State<AppState>,
    Path(name): Path<String>,
) -> Result<Response, ApiError> {
    let path = state
        .outputs
        .path_of(&name)
        .ok_or_else(|| ApiError::not_found(format!("no output image {name:?}")))?;
    let bytes = tokio::fs::read(&path)
        .await
        .map_err(|e| ApiError::internal(format!("reading {name}: {e}")))?;
    Ok(([(header::CONTENT_TYPE, "image/png")], bytes).into_response())
}
