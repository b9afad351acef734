//! The job queue and the job records, behind one trait with two implementations:
//! - [`memory::MemoryQueue`]: one process (`--role all`, the default); nothing else to run;
//! - [`crate::redis::RedisQueue`]: Redis shared by `api` and `worker` processes (`--queue
//!   redis://…`): any API replica answers any job, a job held by a dead worker is delivered
//!   again after the visibility timeout.
//!
//! The handlers submit, read, watch and cancel jobs; the workers take them (with the
//! compatible ones that can share a device batch), report through the [`Job`] they hold, and
//! finish them. The same trait serves both sides, so a worker's code does not know which
//! queue it runs on.

pub mod memory;

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;

use crate::job::{Job, JobRecord};

/// Why the queue could not do what was asked.
#[derive(Debug, Clone, thiserror::Error)]
pub enum QueueError {
    #[error("queue is full ({0} jobs waiting); retry later")]
    Full(usize),
    #[error("the server is shutting down")]
    ShuttingDown,
    /// The shared engine (Redis) is unreachable or answered an error.
    #[error("the job queue is unavailable: {0}")]
    Engine(String),
}

/// Jobs waiting and running, for the queue views, metrics and 429s.
#[derive(Debug, Clone, Copy, Default)]
pub struct QueueCounts {
    pub queued: usize,
    pub running: usize,
    pub capacity: usize,
}

/// A1111's signals to the running jobs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Signal {
    /// Stop at the next step (`/sdapi/v1/interrupt`).
    Interrupt,
    /// End the current iteration and go on (`/sdapi/v1/skip`).
    Skip,
}

/// What a worker may put into one device batch next to the first job it takes.
pub struct BatchRule<'a> {
    /// Whether the second job can share the first one's batch.
    pub batchable: &'a (dyn Fn(&Job, &Job) -> bool + Sync),
    /// Images a job puts into the batch.
    pub images_of: &'a (dyn Fn(&Job) -> usize + Sync),
    /// Most images in one batch.
    pub max_images: usize,
}

#[async_trait]
pub trait JobQueue: Send + Sync {
    /// `memory` or `redis`, for logs and `/api/v1/status`.
    fn backend(&self) -> &'static str;

    // --- what the handlers use ---

    /// Queues a job, or refuses it when the queue is full (across every replica).
    async fn submit(&self, job: Arc<Job>) -> Result<JobRecord, QueueError>;

    /// A job by id (None when unknown or expired).
    async fn get(&self, id: &str) -> Result<Option<JobRecord>, QueueError>;

    /// The PNG bytes of a finished job's images, in order (empty once expired).
    async fn pngs(&self, id: &str) -> Result<Vec<Vec<u8>>, QueueError>;

    /// The latest preview of a running job (a PNG data URL).
    async fn preview(&self, id: &str) -> Result<Option<String>, QueueError>;

    /// Running jobs (oldest first), queued jobs (in order), then recent finished ones
    /// (newest first).
    async fn list(&self) -> Result<Vec<JobRecord>, QueueError>;

    /// Running jobs, oldest first.
    async fn running(&self) -> Result<Vec<JobRecord>, QueueError>;

    /// Cancels a job: a queued one ends at once, a running one at its next step.
    async fn cancel(&self, id: &str) -> Result<Option<JobRecord>, QueueError>;

    /// Sends A1111's interrupt or skip to every running job.
    async fn signal_running(&self, signal: Signal) -> Result<(), QueueError>;

    async fn counts(&self) -> Result<QueueCounts, QueueError>;

    /// Waits until job `id` changes past `version` (its record's), at most `timeout`.
    async fn wait_change(&self, id: &str, version: u64, timeout: Duration);

    /// Whether the queue answers (the `api` role's readiness).
    async fn ping(&self) -> Result<(), QueueError>;

    // --- what the workers use ---

    /// Takes the next job and the queued jobs `rule` lets share its device batch; waits up
    /// to `wait` for one. Empty when there was nothing to do.
    async fn take(
        &self,
        worker: &str,
        rule: &BatchRule<'_>,
        wait: Duration,
    ) -> Result<Vec<Arc<Job>>, QueueError>;

    /// Records a job the worker ended (its final status is already set on `job`). Writing
    /// the result twice (a job delivered again after a slow worker came back) keeps the
    /// first result.
    async fn finish(&self, job: &Arc<Job>) -> Result<(), QueueError>;

    /// Gives back jobs a worker holds but will not finish (it is stopping): another worker
    /// takes them at once, from the start.
    async fn release(&self, jobs: &[Arc<Job>]) -> Result<(), QueueError>;

    /// Stops taking jobs in this process. The in-memory queue also fails its queued jobs
    /// (nobody else would run them); a shared queue keeps them for other workers.
    fn shut_down(&self);

    fn is_shutting_down(&self) -> bool;

    /// Jobs this process's workers are running.
    fn local_running(&self) -> Vec<Arc<Job>>;
}

/// Waits until a job has finished; returns its record.
pub async fn wait_finished(queue: &dyn JobQueue, id: &str) -> Result<JobRecord, QueueError> {
    loop {
        match queue.get(id).await? {
            Some(r) if r.status.state.is_finished() => return Ok(r),
            Some(r) => {
                queue
                    .wait_change(id, r.version, Duration::from_millis(500))
                    .await
            }
            None => {
                return Err(QueueError::Engine(format!(
                    "job {id} is no longer known to the queue"
                )))
            }
        }
    }
}
