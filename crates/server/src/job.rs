//! A job: what a client asked for ([`JobSpec`]), where it is in its life ([`JobStatus`]) and
//! what it produced ([`JobImage`]). [`Job`] is the live object a worker runs (and, with the
//! in-memory queue, the one the handlers watch); [`JobRecord`] is the snapshot any API
//! replica reads back from the queue.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Mutex, OnceLock};
use std::time::SystemTime;

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use crate::error::ApiError;
use crate::lock;
use crate::requests::{BuildContext, JobSpec};
use crate::work::Work;

/// Where a job is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum JobState {
    Queued,
    Running,
    Succeeded,
    Failed,
    Cancelled,
}

impl JobState {
    pub fn is_finished(self) -> bool {
        matches!(
            self,
            JobState::Succeeded | JobState::Failed | JobState::Cancelled
        )
    }

    pub fn label(self) -> &'static str {
        match self {
            JobState::Queued => "queued",
            JobState::Running => "running",
            JobState::Succeeded => "succeeded",
            JobState::Failed => "failed",
            JobState::Cancelled => "cancelled",
        }
    }

    pub const ALL: [JobState; 5] = [
        JobState::Queued,
        JobState::Running,
        JobState::Succeeded,
        JobState::Failed,
        JobState::Cancelled,
    ];
}

/// Whose a job's failure is: what synchronous callers get as HTTP status.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Failure {
    /// Ours (a model, a device, a file).
    #[default]
    Internal,
    /// The request's (e.g. a prompt that tokenizes to nothing).
    BadRequest,
    /// The server's state (shutting down, no model).
    Unavailable,
}

/// An image a job produced.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct JobImage {
    /// File name in the gallery, when the image was saved.
    pub name: Option<String>,
    /// Where to download it, when saved.
    pub url: Option<String>,
    pub seed: Option<u64>,
    pub infotext: String,
    /// A script's grid (X/Y/Z plot, prompt matrix) rather than a single image.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub grid: bool,
    /// The PNG itself, for API callers that asked for the images in the response. Kept out
    /// of every serialized form: the queue stores the bytes apart from the record.
    #[serde(skip)]
    pub png: Vec<u8>,
}

/// The changing part of a job.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct JobStatus {
    pub state: JobState,
    pub step: usize,
    pub total_steps: usize,
    pub started: Option<SystemTime>,
    pub finished: Option<SystemTime>,
    pub error: Option<String>,
    /// Whose the error is, when the job failed.
    #[serde(default)]
    pub failure: Failure,
    pub images: Vec<JobImage>,
    /// Latest preview as a PNG data URL (the queue keeps it apart from the record).
    #[serde(skip)]
    pub preview: Option<String>,
    /// A1111-style generation info (JSON), filled when the job ends.
    pub info: serde_json::Value,
    /// Set once the job was interrupted or skipped by A1111's endpoints (reported in info).
    pub interrupted: bool,
    /// How many jobs shared its device batch (1 = ran alone).
    pub batch_jobs: usize,
    /// The worker running or having run it (`host/pid/device`).
    #[serde(default)]
    pub worker: Option<String>,
    /// The checkpoint it ran on (its name), once a worker started it.
    #[serde(default)]
    pub model: Option<String>,
}

impl Default for JobStatus {
    fn default() -> Self {
        Self {
            state: JobState::Queued,
            step: 0,
            total_steps: 0,
            started: None,
            finished: None,
            error: None,
            failure: Failure::Internal,
            images: Vec::new(),
            preview: None,
            info: serde_json::Value::Null,
            interrupted: false,
            batch_jobs: 0,
            worker: None,
            model: None,
        }
    }
}

impl JobStatus {
    /// Seconds left, estimated from the progress so far.
    pub fn eta_seconds(&self) -> Option<f64> {
        let started = self.started?;
        if self.total_steps == 0 || self.step == 0 {
            return None;
        }
        let done = self.step as f64 / self.total_steps as f64;
        let elapsed = started.elapsed().map_or(0.0, |d| d.as_secs_f64());
        Some(elapsed / done * (1.0 - done))
    }
}

/// What does not change once a job is submitted.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct JobMeta {
    /// `txt2img`, `img2img`, `extras`, `create-embedding`, `train-embedding`.
    pub kind: String,
    /// The request as the client sent it (large images left out), for the UI and A1111's
    /// `parameters`.
    pub params: serde_json::Value,
    pub created: SystemTime,
    /// The checkpoint the job runs on: the one a client selected through the options when
    /// it was submitted, else (None) the worker's own `--model`.
    pub model: Option<String>,
}

/// A job as read back from the queue by any API replica.
#[derive(Debug, Clone)]
pub struct JobRecord {
    pub id: String,
    pub meta: JobMeta,
    pub status: JobStatus,
    /// Place in the queue (0 = next) while queued.
    pub position: Option<usize>,
    /// Bumped on every change (see [`crate::queue::JobQueue::wait_change`]).
    pub version: u64,
    /// A1111's interrupt (or a cancel) was asked for.
    pub interrupt_requested: bool,
    /// A1111's skip was asked for.
    pub skip_requested: bool,
}

/// A job in this process: submitted here (in-memory queue) or taken by a worker here.
pub struct Job {
    pub id: String,
    pub meta: JobMeta,
    pub spec: JobSpec,
    /// Set by cancel/interrupt: the worker stops at the next step.
    pub cancel: AtomicBool,
    /// A1111's "skip": stop the current iteration, go on with the next one.
    pub skip: AtomicBool,
    /// The worker is stopping: end at the next step and give the job back to the queue.
    pub release: AtomicBool,
    /// The spec turned into device work, once (at submission, or by the worker).
    work: OnceLock<Result<Work, ApiError>>,
    status: Mutex<JobStatus>,
    changed: tokio::sync::watch::Sender<u64>,
    version: AtomicU64,
}

impl Job {
    pub fn new(id: String, meta: JobMeta, spec: JobSpec) -> Job {
        let (changed, _) = tokio::sync::watch::channel(0);
        Job {
            id,
            meta,
            spec,
            cancel: AtomicBool::new(false),
            skip: AtomicBool::new(false),
            release: AtomicBool::new(false),
            work: OnceLock::new(),
            status: Mutex::new(JobStatus::default()),
            changed,
            version: AtomicU64::new(0),
        }
    }

    /// The device work of this job, built from its spec the first time it is asked for.
    pub fn work(&self, ctx: &BuildContext<'_>) -> Result<&Work, &ApiError> {
        self.work.get_or_init(|| self.spec.build(ctx)).as_ref()
    }

    /// The work built already (None before [`Job::work`] ran or when building failed).
    pub fn built_work(&self) -> Option<&Work> {
        self.work.get().and_then(|w| w.as_ref().ok())
    }

    /// Keeps work built elsewhere (the handler that validated the request).
    pub fn set_work(&self, work: Work) {
        let _ = self.work.set(Ok(work));
    }

    pub fn status(&self) -> JobStatus {
        lock(&self.status).clone()
    }

    pub fn version(&self) -> u64 {
        self.version.load(Ordering::SeqCst)
    }

    /// Changes the status and wakes every watcher.
    pub fn update(&self, f: impl FnOnce(&mut JobStatus)) {
        {
            let mut s = lock(&self.status);
            f(&mut s);
        }
        let v = self.version.fetch_add(1, Ordering::SeqCst) + 1;
        self.changed.send_replace(v);
    }

    /// A worker starts the job, in a device batch of `batch_jobs` jobs.
    pub fn start(&self, worker: &str, batch_jobs: usize) {
        self.update(|s| {
            s.state = JobState::Running;
            s.started = Some(SystemTime::now());
            s.batch_jobs = batch_jobs;
            s.worker = Some(worker.to_string());
            s.error = None;
        });
    }

    /// Sets the final state (through `f`), the end time, and drops the preview.
    pub fn complete(&self, f: impl FnOnce(&mut JobStatus)) {
        self.update(|s| {
            f(s);
            s.finished = Some(SystemTime::now());
            s.preview = None;
        });
    }

    /// Whether the sampler should stop at the next step (cancelled, or given back).
    pub fn should_stop(&self) -> bool {
        self.cancel.load(Ordering::SeqCst) || self.release.load(Ordering::SeqCst)
    }

    pub fn subscribe(&self) -> tokio::sync::watch::Receiver<u64> {
        self.changed.subscribe()
    }

    /// The job as a record (position is the queue's to fill in).
    pub fn record(&self) -> JobRecord {
        // Version first: a change racing with this read is seen as a newer version.
        let version = self.version();
        let mut status = self.status();
        // The PNG bytes stay with the job: records are read often (every event, every poll).
        status.images.iter_mut().for_each(|i| i.png = Vec::new());
        JobRecord {
            id: self.id.clone(),
            meta: self.meta.clone(),
            status,
            position: None,
            version,
            interrupt_requested: self.cancel.load(Ordering::SeqCst),
            skip_requested: self.skip.load(Ordering::SeqCst),
        }
    }
}

/// 16 hex digits, random: unguessable enough that one client cannot poll another's jobs by
/// counting.
pub fn new_job_id() -> String {
    format!("{:016x}", rand::random::<u64>())
}
