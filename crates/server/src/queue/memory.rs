//! The queue of one process: a bounded FIFO and the records of recent jobs, in memory.
//! Nothing else needs to run; jobs do not outlive the process.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;

use super::{BatchRule, JobQueue, QueueCounts, QueueError, Signal};
use crate::job::{Failure, Job, JobRecord, JobState};
use crate::lock;

/// Finished jobs whose records are kept.
const KEEP_FINISHED: usize = 200;
/// Finished jobs whose PNG bytes stay in memory (callers have had them by then; saved
/// images are in the gallery): memory stays bounded.
const KEEP_IMAGES_OF: usize = 16;

/// A job that ended: its record and images, without its request (images a client sent,
/// decoded work), which would otherwise stay in memory with the last 200 jobs.
struct Finished {
    record: JobRecord,
    pngs: Vec<Vec<u8>>,
}

struct Board {
    queue: VecDeque<Arc<Job>>,
    running: Vec<Arc<Job>>,
    /// Queued and running jobs.
    jobs: HashMap<String, Arc<Job>>,
    /// Oldest first.
    finished: VecDeque<Finished>,
    shutting_down: bool,
}

impl Board {
    fn finished(&self, id: &str) -> Option<&Finished> {
        self.finished.iter().rev().find(|f| f.record.id == id)
    }
}

pub struct MemoryQueue {
    board: Mutex<Board>,
    wake: tokio::sync::Notify,
    capacity: usize,
}

impl MemoryQueue {
    pub fn new(capacity: usize) -> Self {
        Self {
            board: Mutex::new(Board {
                queue: VecDeque::new(),
                running: Vec::new(),
                jobs: HashMap::new(),
                finished: VecDeque::new(),
                shutting_down: false,
            }),
            wake: tokio::sync::Notify::new(),
            capacity,
        }
    }

    fn record_of(b: &Board, job: &Job) -> JobRecord {
        let mut r = job.record();
        if r.status.state == JobState::Queued {
            r.position = b.queue.iter().position(|j| j.id == job.id);
        }
        r
    }

    fn take_now(&self, worker: &str, rule: &BatchRule<'_>) -> Option<Vec<Arc<Job>>> {
        let mut b = lock(&self.board);
        let first = b.queue.pop_front()?;
        let mut taken = vec![first.clone()];
        let mut images = (rule.images_of)(&first);
        let mut i = 0;
        while i < b.queue.len() {
            let j = &b.queue[i];
            let more = (rule.images_of)(j);
            if images + more <= rule.max_images && (rule.batchable)(&first, j) {
                images += more;
                if let Some(j) = b.queue.remove(i) {
                    taken.push(j);
                }
            } else {
                i += 1;
            }
        }
        b.running.extend(taken.iter().cloned());
        drop(b);
        for j in &taken {
            j.start(worker, taken.len());
        }
        Some(taken)
    }

    fn get_now(&self, id: &str) -> Option<JobRecord> {
        let b = lock(&self.board);
        match b.jobs.get(id) {
            Some(j) => Some(Self::record_of(&b, j)),
            None => b.finished(id).map(|f| f.record.clone()),
        }
    }

    /// Moves a job that ended into the finished records, evicting the oldest.
    fn record_finished(&self, job: &Arc<Job>) {
        let mut b = lock(&self.board);
        b.running.retain(|j| j.id != job.id);
        if b.jobs.remove(&job.id).is_none() {
            return;
        }
        let pngs = job.status().images.into_iter().map(|i| i.png).collect();
        b.finished.push_back(Finished {
            record: job.record(),
            pngs,
        });
        while b.finished.len() > KEEP_FINISHED {
            b.finished.pop_front();
        }
        let n = b.finished.len();
        if n > KEEP_IMAGES_OF {
            b.finished[n - KEEP_IMAGES_OF - 1].pngs = Vec::new();
        }
    }
}

#[async_trait]
impl JobQueue for MemoryQueue {
    fn backend(&self) -> &'static str {
        "memory"
    }

    async fn submit(&self, job: Arc<Job>) -> Result<JobRecord, QueueError> {
        let mut b = lock(&self.board);
        if b.shutting_down {
            return Err(QueueError::ShuttingDown);
        }
        if b.queue.len() >= self.capacity {
            return Err(QueueError::Full(b.queue.len()));
        }
        b.jobs.insert(job.id.clone(), job.clone());
        b.queue.push_back(job.clone());
        let record = Self::record_of(&b, &job);
        drop(b);
        self.wake.notify_waiters();
        Ok(record)
    }

    async fn get(&self, id: &str) -> Result<Option<JobRecord>, QueueError> {
        Ok(self.get_now(id))
    }

    async fn pngs(&self, id: &str) -> Result<Vec<Vec<u8>>, QueueError> {
        let b = lock(&self.board);
        Ok(match b.jobs.get(id) {
            Some(j) => j.status().images.into_iter().map(|i| i.png).collect(),
            None => b.finished(id).map(|f| f.pngs.clone()).unwrap_or_default(),
        })
    }

    async fn preview(&self, id: &str) -> Result<Option<String>, QueueError> {
        let job = lock(&self.board).jobs.get(id).cloned();
        Ok(job.and_then(|j| j.status().preview))
    }

    async fn list(&self) -> Result<Vec<JobRecord>, QueueError> {
        let b = lock(&self.board);
        let mut out: Vec<JobRecord> = b
            .running
            .iter()
            .chain(b.queue.iter())
            .map(|j| Self::record_of(&b, j))
            .collect();
        out.extend(b.finished.iter().rev().map(|f| f.record.clone()));
        Ok(out)
    }

    async fn running(&self) -> Result<Vec<JobRecord>, QueueError> {
        let b = lock(&self.board);
        Ok(b.running.iter().map(|j| j.record()).collect())
    }

    async fn cancel(&self, id: &str) -> Result<Option<JobRecord>, QueueError> {
        let mut b = lock(&self.board);
        let Some(job) = b.jobs.get(id).cloned() else {
            return Ok(b.finished(id).map(|f| f.record.clone()));
        };
        job.cancel.store(true, Ordering::SeqCst);
        if let Some(i) = b.queue.iter().position(|j| j.id == id) {
            b.queue.remove(i);
            drop(b);
            job.complete(|s| {
                s.state = JobState::Cancelled;
                s.error = Some("cancelled before it started".into());
            });
            self.record_finished(&job);
            return Ok(self.get_now(id));
        }
        Ok(Some(Self::record_of(&b, &job)))
    }

    async fn signal_running(&self, signal: Signal) -> Result<(), QueueError> {
        for j in self.local_running() {
            match signal {
                Signal::Interrupt => j.cancel.store(true, Ordering::SeqCst),
                Signal::Skip => j.skip.store(true, Ordering::SeqCst),
            }
        }
        Ok(())
    }

    async fn counts(&self) -> Result<QueueCounts, QueueError> {
        let b = lock(&self.board);
        Ok(QueueCounts {
            queued: b.queue.len(),
            running: b.running.len(),
            capacity: self.capacity,
        })
    }

    async fn wait_change(&self, id: &str, version: u64, timeout: Duration) {
        let Some(job) = lock(&self.board).jobs.get(id).cloned() else {
            return;
        };
        let mut rx = job.subscribe();
        if job.version() > version {
            return;
        }
        // Queue places move without the job changing: callers look again after `timeout`.
        let _ = tokio::time::timeout(timeout, rx.changed()).await;
    }

    async fn ping(&self) -> Result<(), QueueError> {
        Ok(())
    }

    async fn take(
        &self,
        worker: &str,
        rule: &BatchRule<'_>,
        wait: Duration,
    ) -> Result<Vec<Arc<Job>>, QueueError> {
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            // Registered before looking, so that a submission in between is not missed.
            let notified = self.wake.notified();
            if let Some(taken) = self.take_now(worker, rule) {
                return Ok(taken);
            }
            if self.is_shutting_down() || tokio::time::timeout_at(deadline, notified).await.is_err()
            {
                return Ok(Vec::new());
            }
        }
    }

    async fn finish(&self, job: &Arc<Job>) -> Result<(), QueueError> {
        self.record_finished(job);
        Ok(())
    }

    async fn release(&self, jobs: &[Arc<Job>]) -> Result<(), QueueError> {
        // Nobody else would run them in this process: they end with the server.
        for job in jobs {
            job.complete(|s| {
                s.state = JobState::Failed;
                s.error = Some("the server shut down before this job finished".into());
                s.failure = Failure::Unavailable;
            });
            self.record_finished(job);
        }
        Ok(())
    }

    fn shut_down(&self) {
        let mut b = lock(&self.board);
        b.shutting_down = true;
        let queued: Vec<_> = b.queue.drain(..).collect();
        drop(b);
        for job in queued {
            job.complete(|s| {
                s.state = JobState::Failed;
                s.error = Some("the server shut down before this job started".into());
                s.failure = Failure::Unavailable;
            });
            self.record_finished(&job);
        }
        self.wake.notify_waiters();
    }

    fn is_shutting_down(&self) -> bool {
        lock(&self.board).shutting_down
    }

    fn local_running(&self) -> Vec<Arc<Job>> {
        lock(&self.board).running.clone()
    }
}
