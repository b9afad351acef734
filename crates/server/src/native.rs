//! The native API used by the web UI: asynchronous jobs with live server-sent events,
//! the status of the server, and the gallery of saved outputs.

use std::convert::Infallible;
use std::time::Duration;

use axum::extract::{Path, State};
use axum::http::{header, StatusCode};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::Json;
use futures_util::stream::Stream;
use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use crate::config::Role;
use crate::error::{ApiError, ApiJson, ApiQuery};
use crate::job::{JobImage, JobRecord, JobState};
use crate::model::{ModelState, ModelStatus};
use crate::requests::{
    ExtrasSingleRequest, Img2ImgRequest, JobSpec, TrainEmbeddingRequest, Txt2ImgRequest,
};
use crate::state::AppState;

pub fn routes() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(status))
        .routes(routes!(create_job, list_jobs))
        .routes(routes!(get_job))
        .routes(routes!(job_events))
        .routes(routes!(cancel_job))
        .routes(routes!(gallery))
        .routes(routes!(output_file))
}

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
    /// The worker that runs or ran it (`host/pid/device`).
    pub worker: Option<String>,
    /// The parameters as submitted.
    pub params: serde_json::Value,
}

impl JobView {
    pub fn of(job: &JobRecord) -> Self {
        let s = &job.status;
        JobView {
            id: job.id.clone(),
            kind: job.meta.kind.clone(),
            state: s.state,
            position: job.position,
            step: s.step,
            total_steps: s.total_steps,
            eta_seconds: if s.state == JobState::Running {
                s.eta_seconds()
            } else {
                None
            },
            error: s.error.clone(),
            created: humantime::format_rfc3339_seconds(job.meta.created).to_string(),
            images: s.images.clone(),
            batch_jobs: s.batch_jobs,
            worker: s.worker.clone(),
            params: job.meta.params.clone(),
        }
    }
}

#[derive(Serialize, ToSchema)]
pub struct QueueStatus {
    pub queued: usize,
    pub running: usize,
    pub capacity: usize,
    /// `memory` (one process) or `redis` (shared by every replica).
    pub backend: String,
    /// "waiting for a GPU worker (N queued)" while jobs wait and no worker runs.
    pub waiting: Option<String>,
}

/// A worker of the shared queue, as the `api` role sees it.
#[derive(Serialize, ToSchema)]
pub struct WorkerView {
    pub id: String,
    pub devices: Vec<String>,
    pub model: ModelStatus,
    pub running: usize,
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
    /// `all`, `api` or `worker`.
    pub role: String,
    /// With a shared queue: the live workers.
    pub workers: Vec<WorkerView>,
    pub version: String,
}

/// The server at a glance: the model's state (fetching with progress, loading, ready,
/// failed and why), devices, limits and queue.
#[utoipa::path(get, path = "/api/v1/status", tag = "jobs", responses((status = 200, body = ServerStatus)))]
pub async fn status(State(state): State<AppState>) -> Result<Json<ServerStatus>, ApiError> {
    let l = state.config.limits;
    let counts = state.queue.counts().await?;
    let workers: Vec<WorkerView> = match state.config.role {
        Role::Api => state
            .cluster
            .workers()
            .await?
            .into_iter()
            .map(|w| WorkerView {
                id: w.id,
                devices: w.devices,
                model: w.model,
                running: w.running,
            })
            .collect(),
        _ => Vec::new(),
    };
    let (model, devices) = match (state.config.role, workers.first()) {
        (Role::Api, Some(w)) => (
            w.model.clone(),
            workers.iter().flat_map(|w| w.devices.clone()).collect(),
        ),
        // The API is ready; jobs wait for a worker (the queue's `waiting` says so).
        (Role::Api, None) => (
            ModelStatus {
                name: String::new(),
                state: ModelState::Ready,
                message: Some("no GPU worker is running: jobs wait for one".into()),
                ..ModelStatus::default()
            },
            Vec::new(),
        ),
        _ => (state.model.status(), state.device_labels()),
    };
    let waiting = crate::a1111::progress::waiting_for_worker(&state, counts.queued).await;
    Ok(Json(ServerStatus {
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
            queued: counts.queued,
            running: counts.running,
            capacity: counts.capacity,
            backend: state.queue.backend().to_string(),
            waiting,
        },
        role: state.config.role.name().to_string(),
        workers,
        version: env!("CARGO_PKG_VERSION").to_string(),
    }))
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
    (status = 400, description = "bad parameters", body = crate::error::ErrorBody),
    (status = 429, description = "queue full", body = crate::error::ErrorBody),
    (status = 503, description = "model not ready", body = crate::error::ErrorBody)))]
pub async fn create_job(
    State(state): State<AppState>,
    ApiJson(body): ApiJson<CreateJob>,
) -> Result<Response, ApiError> {
    let spec = match body.kind.as_str() {
        "txt2img" => JobSpec::Txt2img {
            request: parse_params::<Txt2ImgRequest>(&body.params)?,
            save: true,
        },
        "img2img" => JobSpec::Img2img {
            request: parse_params::<Img2ImgRequest>(&body.params)?,
            save: true,
        },
        "train-embedding" => JobSpec::TrainEmbedding {
            request: parse_params::<TrainEmbeddingRequest>(&body.params)?,
        },
        "extras" => JobSpec::Extras {
            request: parse_params::<ExtrasSingleRequest>(&body.params)?.into_batch(),
            save: true,
        },
        other => {
            return Err(ApiError::bad_request(format!(
                "unknown job kind {other:?}; expected txt2img, img2img, extras or train-embedding"
            )))
        }
    };
    state.check_ready()?;
    let submitted = state.submit(spec).await?;
    Ok((StatusCode::ACCEPTED, Json(JobView::of(&submitted.record))).into_response())
}

fn parse_params<T: serde::de::DeserializeOwned>(v: &serde_json::Value) -> Result<T, ApiError> {
    crate::error::from_json(v.clone())
        .map_err(|e| ApiError::new(e.status, format!("params: {}", e.message)))
}

#[derive(Serialize, ToSchema)]
pub struct JobList {
    pub jobs: Vec<JobView>,
}

/// Running and queued jobs, then the most recent finished ones.
#[utoipa::path(get, path = "/api/v1/jobs", tag = "jobs", responses((status = 200, body = JobList)))]
pub async fn list_jobs(State(state): State<AppState>) -> Result<Json<JobList>, ApiError> {
    Ok(Json(JobList {
        jobs: state.queue.list().await?.iter().map(JobView::of).collect(),
    }))
}

async fn find(state: &AppState, id: &str) -> Result<JobRecord, ApiError> {
    state.queue.get(id).await?.ok_or_else(|| {
        ApiError::not_found(format!(
            "no job {id:?} (finished jobs are kept for a while)"
        ))
    })
}

#[utoipa::path(get, path = "/api/v1/jobs/{id}", tag = "jobs",
    params(("id" = String, Path, description = "job id")),
    responses((status = 200, body = JobView), (status = 404, body = crate::error::ErrorBody)))]
pub async fn get_job(
    State(state): State<AppState>,
    Path(id): Path<String>,
) -> Result<Json<JobView>, ApiError> {
    Ok(Json(JobView::of(&find(&state, &id).await?)))
}

/// Cancels a job: a queued job is dropped, a running one stops at its next step.
#[utoipa::path(post, path = "/api/v1/jobs/{id}/cancel", tag = "jobs",
    params(("id" = String, Path, description = "job id")),
    responses((status = 200, body = JobView), (status = 404, body = crate::error::ErrorBody)))]
pub async fn cancel_job(
    State(state): State<AppState>,
    Path(id): Path<String>,
) -> Result<Json<JobView>, ApiError> {
    let job = state
        .queue
        .cancel(&id)
        .await?
        .ok_or_else(|| ApiError::not_found(format!("no job {id:?}")))?;
    Ok(Json(JobView::of(&job)))
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
        (status = 404, body = crate::error::ErrorBody)))]
pub async fn job_events(
    State(state): State<AppState>,
    Path(id): Path<String>,
) -> Result<Sse<impl Stream<Item = Result<Event, Infallible>>>, ApiError> {
    find(&state, &id).await?;
    let cursor = EventCursor {
        state,
        id,
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
    id: String,
    sent_state: Option<(JobState, Option<usize>)>,
    sent_preview: Option<String>,
    sent_step: usize,
    done: bool,
}

impl EventCursor {
    /// The next event to send: `state` when state or queue place changed, `progress` on a
    /// new step or preview, `done` once; None after `done` (or when the job is gone).
    async fn next_event(&mut self) -> Option<Event> {
        if self.done {
            return None;
        }
        loop {
            let queue = &self.state.queue;
            let job = match queue.get(&self.id).await {
                Ok(Some(j)) => j,
                Ok(None) => return None,
                Err(e) => {
                    tracing::warn!(job = %self.id, error = %e, "events: queue unavailable");
                    tokio::time::sleep(Duration::from_millis(500)).await;
                    continue;
                }
            };
            let s = &job.status;
            if s.state.is_finished() {
                self.done = true;
                return Some(
                    Event::default()
                        .event("done")
                        .json_data(JobView::of(&job))
                        .unwrap_or_default(),
                );
            }
            if self.sent_state != Some((s.state, job.position)) {
                self.sent_state = Some((s.state, job.position));
                let ev = StateEvent {
                    state: s.state,
                    position: job.position,
                };
                return Some(
                    Event::default()
                        .event("state")
                        .json_data(ev)
                        .unwrap_or_default(),
                );
            }
            if s.state == JobState::Running {
                let preview = queue.preview(&self.id).await.ok().flatten();
                if s.step != self.sent_step || preview != self.sent_preview {
                    let fresh = (preview != self.sent_preview)
                        .then(|| preview.clone())
                        .flatten();
                    self.sent_step = s.step;
                    self.sent_preview = preview;
                    let ev = ProgressEvent {
                        step: s.step,
                        total_steps: s.total_steps,
                        eta_seconds: s.eta_seconds(),
                        preview: fresh,
                    };
                    return Some(
                        Event::default()
                            .event("progress")
                            .json_data(ev)
                            .unwrap_or_default(),
                    );
                }
            }
            // Queue positions move without this job changing: look again now and then.
            queue
                .wait_change(&self.id, job.version, Duration::from_millis(500))
                .await;
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
    responses((status = 200, body = crate::gallery::GalleryPage)))]
pub async fn gallery(
    State(state): State<AppState>,
    ApiQuery(q): ApiQuery<GalleryQuery>,
) -> Result<Json<crate::gallery::GalleryPage>, ApiError> {
    let per_page = q.per_page.unwrap_or(24).clamp(1, 200);
    let page = q.page.unwrap_or(1).max(1);
    let result = state
        .gallery
        .page(page, per_page)
        .await
        .map_err(|e| ApiError::internal(format!("reading the gallery: {e}")))?;
    Ok(Json(result))
}

/// A saved image. Names are `[A-Za-z0-9._-]+.png` inside the outputs folder; nothing else
/// can be reached through this path.
#[utoipa::path(get, path = "/outputs/{name}", tag = "jobs",
    params(("name" = String, Path, description = "file name from the gallery or a job")),
    responses((status = 200, content_type = "image/png", body = Vec<u8>), (status = 404, body = crate::error::ErrorBody)))]
pub async fn output_file(
    State(state): State<AppState>,
    Path(name): Path<String>,
) -> Result<Response, ApiError> {
    let bytes = state
        .gallery
        .read(&name)
        .await
        .map_err(|e| ApiError::internal(format!("reading {name}: {e}")))?
        .ok_or_else(|| ApiError::not_found(format!("no output image {name:?}")))?;
    Ok(([(header::CONTENT_TYPE, "image/png")], bytes).into_response())
}
