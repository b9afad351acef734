//! Jobs and the queue: a bounded FIFO shared by the HTTP handlers (which submit and watch)
//! and the device workers (which take jobs, batching compatible ones).
//!
//! Everything here is plain data behind one mutex; watchers are woken through a
//! `tokio::sync::watch` per job, workers through a condition variable.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};

use crate::lock;
use std::time::{Duration, Instant, SystemTime};

use serde::Serialize;
use utoipa::ToSchema;

use crate::work::Work;

/// Where a job is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, ToSchema)]
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
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
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
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct JobImage {
    /// File name in the outputs directory, when the image was saved.
    pub name: Option<String>,
    /// Where to download it, when saved.
    pub url: Option<String>,
    pub seed: Option<u64>,
    pub infotext: String,
    /// The PNG itself (kept for API callers that asked for the images in the response).
    #[serde(skip)]
    pub png: Vec<u8>,
}

/// The changing part of a job.
#[derive(Debug, Clone)]
pub struct JobStatus {
    pub state: JobState,
    pub step: usize,
    pub total_steps: usize,
    pub started: Option<Instant>,
    pub finished: Option<Instant>,
    pub error: Option<String>,
    /// Whose the error is, when the job failed.
    pub failure: Failure,
    pub images: Vec<JobImage>,
    /// Latest preview as a PNG data URL.
    pub preview: Option<String>,
    /// A1111-style generation info (JSON), filled when the job ends.
    pub info: serde_json::Value,
    /// Set once the job was interrupted or skipped by A1111's endpoints (reported in info).
    pub interrupted: bool,
    /// How many jobs shared its device batch (1 = ran alone).
    pub batch_jobs: usize,
}

/// One unit of work submitted through any API.
pub struct Job {
    pub id: String,
    pub kind: &'static str,
    /// The request as the client sent it (for the queue view and the UI).
    pub params: serde_json::Value,
    pub created: SystemTime,
    pub work: Work,
    /// Set by cancel/interrupt: the worker stops at the next step.
    pub cancel: AtomicBool,
    /// A1111's "skip": stop the current iteration, go on with the next one.
    pub skip: AtomicBool,
    status: Mutex<JobStatus>,
    changed: tokio::sync::watch::Sender<u64>,
    version: AtomicU64,
}

impl Job {
    pub fn new(kind: &'static str, params: serde_json::Value, work: Work) -> Arc<Job> {
        let (changed, _) = tokio::sync::watch::channel(0);
        Arc::new(Job {
            id: new_job_id(),
            kind,
            params,
            created: SystemTime::now(),
            work,
            cancel: AtomicBool::new(false),
            skip: AtomicBool::new(false),
            status: Mutex::new(JobStatus {
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
            }),
            changed,
            version: AtomicU64::new(0),
        })
    }

    pub fn status(&self) -> JobStatus {
        lock(&self.status).clone()
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

    pub fn subscribe(&self) -> tokio::sync::watch::Receiver<u64> {
        self.changed.subscribe()
    }

    /// Waits until the job has finished and returns its final status.
    pub async fn finished(&self) -> JobStatus {
        let mut rx = self.subscribe();
        loop {
            let s = self.status();
            if s.state.is_finished() {
                return s;
            }
            if rx.changed().await.is_err() {
                return self.status();
            }
        }
    }

    /// Seconds left, estimated from the progress so far.
    pub fn eta_seconds(status: &JobStatus) -> Option<f64> {
        let started = status.started?;
        if status.total_steps == 0 || status.step == 0 {
            return None;
        }
        let done = status.step as f64 / status.total_steps as f64;
        let elapsed = started.elapsed().as_secs_f64();
        Some(elapsed / done * (1.0 - done))
    }
}

/// 16 hex digits, random: unguessable enough that one client cannot poll another's jobs by
/// counting.
fn new_job_id() -> String {
    format!("{:016x}", rand::random::<u64>())
}

/// Finished jobs whose images stay in memory.
const KEEP_IMAGES_OF: usize = 16;

/// Why a job was not accepted.
#[derive(Debug, thiserror::Error)]
pub enum SubmitError {
    #[error("queue is full ({0} jobs waiting); retry later")]
    Full(usize),
    #[error("the server is shutting down")]
    ShuttingDown,
}

struct Board {
    queue: VecDeque<Arc<Job>>,
    running: Vec<Arc<Job>>,
    jobs: HashMap<String, Arc<Job>>,
    /// Finished job ids, oldest first, for eviction.
    finished: VecDeque<String>,
    shutting_down: bool,
}

/// The queue and the record of recent jobs.
pub struct JobBoard {
    board: Mutex<Board>,
    wake: Condvar,
    capacity: usize,
    keep_finished: usize,
}

impl JobBoard {
    pub fn new(capacity: usize) -> Self {
        Self {
            board: Mutex::new(Board {
                queue: VecDeque::new(),
                running: Vec::new(),
                jobs: HashMap::new(),
                finished: VecDeque::new(),
                shutting_down: false,
            }),
            wake: Condvar::new(),
            capacity,
            keep_finished: 200,
        }
    }

    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// Queues a job, or refuses it when the queue is full.
    pub fn submit(&self, job: Arc<Job>) -> Result<Arc<Job>, SubmitError> {
        let mut b = lock(&self.board);
        if b.shutting_down {
            return Err(SubmitError::ShuttingDown);
        }
        if b.queue.len() >= self.capacity {
            return Err(SubmitError::Full(b.queue.len()));
        }
        b.jobs.insert(job.id.clone(), job.clone());
        b.queue.push_back(job.clone());
        drop(b);
        self.wake.notify_all();
        Ok(job)
    }

    pub fn get(&self, id: &str) -> Option<Arc<Job>> {
        lock(&self.board).jobs.get(id).cloned()
    }

    /// Place in the queue (0 = next), None when not queued.
    pub fn position(&self, id: &str) -> Option<usize> {
        lock(&self.board).queue.iter().position(|j| j.id == id)
    }

    /// Queued, then running, then finished jobs, newest finished first.
    pub fn list(&self) -> Vec<Arc<Job>> {
        let b = lock(&self.board);
        let mut out: Vec<Arc<Job>> = b.running.iter().chain(b.queue.iter()).cloned().collect();
        out.extend(
            b.finished
                .iter()
                .rev()
                .filter_map(|id| b.jobs.get(id).cloned()),
        );
        out
    }

    pub fn running(&self) -> Vec<Arc<Job>> {
        lock(&self.board).running.clone()
    }

    pub fn queued_len(&self) -> usize {
        lock(&self.board).queue.len()
    }

    /// Cancels a job: a queued one is removed at once, a running one stops at its next step.
    pub fn cancel(&self, id: &str) -> Option<Arc<Job>> {
        let mut b = lock(&self.board);
        let job = b.jobs.get(id).cloned()?;
        job.cancel.store(true, Ordering::SeqCst);
        if let Some(i) = b.queue.iter().position(|j| j.id == id) {
            b.queue.remove(i);
            drop(b);
            self.finish(&job, |s| {
                s.state = JobState::Cancelled;
                s.error = Some("cancelled before it started".into());
            });
        }
        Some(job)
    }

    /// Waits up to `wait` for work, then takes the first job and the queued jobs that
    /// `batchable` accepts alongside it (up to `max_batch` images in all). None when there
    /// was nothing to do (the worker then looks at the model and shutdown flags again).
    pub fn take(
        &self,
        batchable: &dyn Fn(&Job, &Job) -> bool,
        images_of: &dyn Fn(&Job) -> usize,
        max_batch: usize,
        wait: Duration,
    ) -> Option<Vec<Arc<Job>>> {
        let mut b = lock(&self.board);
        if b.queue.is_empty() && !b.shutting_down {
            b = self
                .wake
                .wait_timeout(b, wait)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
        let first = b.queue.pop_front()?;
        let mut taken = vec![first.clone()];
        let mut images = images_of(&first);
        let mut i = 0;
        while i < b.queue.len() {
            let j = &b.queue[i];
            if batchable(&first, j) && images + images_of(j) <= max_batch {
                images += images_of(j);
                if let Some(j) = b.queue.remove(i) {
                    taken.push(j);
                }
            } else {
                i += 1;
            }
        }
        b.running.extend(taken.iter().cloned());
        drop(b);
        let n = taken.len();
        for j in &taken {
            j.update(|s| {
                s.state = JobState::Running;
                s.started = Some(Instant::now());
                s.batch_jobs = n;
            });
        }
        Some(taken)
    }

    /// Wakes the workers (e.g. the model to serve changed).
    pub fn notify(&self) {
        self.wake.notify_all();
    }

    /// Marks a job finished (the change is applied by `f`) and records it.
    pub fn finish(&self, job: &Arc<Job>, f: impl FnOnce(&mut JobStatus)) {
        job.update(|s| {
            f(s);
            s.finished = Some(Instant::now());
            s.preview = None;
        });
        let mut b = lock(&self.board);
        b.running.retain(|j| j.id != job.id);
        b.finished.push_back(job.id.clone());
        while b.finished.len() > self.keep_finished {
            if let Some(old) = b.finished.pop_front() {
                b.jobs.remove(&old);
            }
        }
        // Older finished jobs keep their record but not their PNG bytes (their callers have
        // had them; the UI's images are in the outputs folder): memory stays bounded.
        let n = b.finished.len();
        if n > KEEP_IMAGES_OF {
            let old = b.finished[n - KEEP_IMAGES_OF - 1].clone();
            if let Some(j) = b.jobs.get(&old) {
                j.update(|s| s.images.iter_mut().for_each(|i| i.png = Vec::new()));
            }
        }
    }

    /// Stops accepting jobs; queued jobs fail with a clear message. Running jobs are left to
    /// finish (the caller waits for them).
    pub fn shut_down(&self) {
        let mut b = lock(&self.board);
        b.shutting_down = true;
        let queued: Vec<_> = b.queue.drain(..).collect();
        drop(b);
        for job in queued {
            self.finish(&job, |s| {
                s.state = JobState::Failed;
                s.error = Some("the server shut down before this job started".into());
                s.failure = Failure::Unavailable;
            });
        }
        self.wake.notify_all();
    }

    pub fn is_shutting_down(&self) -> bool {
        lock(&self.board).shutting_down
    }
}
