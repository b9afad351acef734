//! The job queue in Redis (see the module above for the layout).

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use async_trait::async_trait;
use futures_util::StreamExt;
use redis::{AsyncCommands, Script, Value};

use super::{engine_error, manager, now_ms, Conn, Keys, GROUP};
use crate::config::SharedQueue;
use crate::job::{Failure, Job, JobMeta, JobRecord, JobState, JobStatus};
use crate::lock;
use crate::queue::{BatchRule, JobQueue, QueueCounts, QueueError, Signal};

/// Finished jobs listed by `/api/v1/jobs` (their records expire after the result TTL).
const KEEP_RECENT: usize = 200;
/// Jobs read ahead of the stream's head when looking for compatible ones to batch.
const READ_AHEAD: usize = 8;
/// How often a running job's preview is written at most.
const PREVIEW_EVERY: Duration = Duration::from_millis(300);

struct Scripts {
    submit: Script,
    claim: Script,
    update: Script,
    finish: Script,
    cancel: Script,
    release: Script,
}

/// A job this process took: its stream entry, for acknowledging and keeping it fresh.
struct Taken {
    job: Arc<Job>,
    entry: String,
}

pub struct RedisQueue {
    client: redis::Client,
    conn: Conn,
    /// A connection of its own for the blocking stream reads, which would hold up every
    /// other command on a shared one.
    reader: tokio::sync::Mutex<Option<Conn>>,
    keys: Keys,
    config: SharedQueue,
    capacity: usize,
    scripts: Arc<Scripts>,
    /// This process's name in the consumer group.
    consumer: String,
    local: Arc<Mutex<HashMap<String, Taken>>>,
    /// Jobs delivered to this process that did not fit the batch they were read for.
    held: Mutex<Vec<Arc<Job>>>,
    /// Job ids whose records changed, from the events channel.
    events: tokio::sync::broadcast::Sender<String>,
    stopping: Arc<AtomicBool>,
    background: Mutex<bool>,
}

impl RedisQueue {
    pub fn new(
        client: redis::Client,
        conn: Conn,
        keys: Keys,
        config: SharedQueue,
        capacity: usize,
    ) -> Self {
        let scripts = Scripts {
            submit: Script::new(include_str!("scripts/submit.lua")),
            claim: Script::new(include_str!("scripts/claim.lua")),
            update: Script::new(include_str!("scripts/update.lua")),
            finish: Script::new(include_str!("scripts/finish.lua")),
            cancel: Script::new(include_str!("scripts/cancel.lua")),
            release: Script::new(include_str!("scripts/release.lua")),
        };
        let (events, _) = tokio::sync::broadcast::channel(1024);
        Self {
            client,
            conn,
            reader: tokio::sync::Mutex::new(None),
            keys,
            config,
            capacity,
            scripts: Arc::new(scripts),
            consumer: String::new(),
            local: Arc::new(Mutex::new(HashMap::new())),
            held: Mutex::new(Vec::new()),
            events,
            stopping: Arc::new(AtomicBool::new(false)),
            background: Mutex::new(false),
        }
    }

    /// Names this process in the consumer group (its workers' `host/pid`).
    pub fn with_consumer(mut self, consumer: &str) -> Self {
        self.consumer = consumer.to_string();
        self
    }

    /// Starts the listener of the events and signals channels and the keeper of this
    /// process's stream entries, once (on first use: they need the runtime).
    fn start_background(&self) {
        let mut started = lock(&self.background);
        if *started {
            return;
        }
        *started = true;
        tokio::spawn(listen(
            self.client.clone(),
            self.conn.clone(),
            self.keys.clone(),
            self.events.clone(),
            self.local.clone(),
            self.stopping.clone(),
        ));
        tokio::spawn(keep_fresh(
            self.conn.clone(),
            self.keys.clone(),
            self.consumer.clone(),
            self.local.clone(),
            self.config.visibility_timeout,
        ));
    }

    async fn record(&self, id: &str) -> Result<Option<JobRecord>, QueueError> {
        let mut c = self.conn.clone();
        let (fields, rank): (Vec<Option<String>>, Option<usize>) = redis::pipe()
            .cmd("HMGET")
            .arg(self.keys.job(id))
            .arg(&["meta", "status", "v", "cancel", "skip"])
            .zrank(self.keys.waiting(), id)
            .query_async(&mut c)
            .await
            .map_err(engine_error)?;
        Ok(parse_record(id, &fields, rank))
    }

    async fn records(&self, ids: &[String]) -> Result<Vec<JobRecord>, QueueError> {
        if ids.is_empty() {
            return Ok(Vec::new());
        }
        let mut pipe = redis::pipe();
        for id in ids {
            pipe.cmd("HMGET")
                .arg(self.keys.job(id))
                .arg(&["meta", "status", "v", "cancel", "skip"])
                .zrank(self.keys.waiting(), id);
        }
        let mut c = self.conn.clone();
        let values: Vec<Value> = pipe.query_async(&mut c).await.map_err(engine_error)?;
        let mut out = Vec::new();
        for (id, pair) in ids.iter().zip(values.chunks(2)) {
            let fields: Vec<Option<String>> =
                redis::from_redis_value(pair[0].clone()).unwrap_or_default();
            let rank: Option<usize> = redis::from_redis_value(pair[1].clone()).unwrap_or(None);
            out.extend(parse_record(id, &fields, rank));
        }
        Ok(out)
    }

    async fn ids(&self, key: String, newest_first: bool) -> Result<Vec<String>, QueueError> {
        let mut c = self.conn.clone();
        let ids: Vec<String> = if newest_first {
            c.zrevrange(key, 0, KEEP_RECENT as isize - 1).await
        } else {
            c.zrange(key, 0, -1).await
        }
        .map_err(engine_error)?;
        Ok(ids)
    }

    /// The connection for blocking reads, made on first use.
    async fn reader(&self) -> Result<Conn, QueueError> {
        let mut r = self.reader.lock().await;
        if r.is_none() {
            *r = Some(manager(&self.client).await.map_err(engine_error)?);
        }
        Ok(r.clone().expect("made above"))
    }

    /// The next job for this process: an entry another worker abandoned (idle past the
    /// visibility timeout), else a new one (waiting up to `wait`).
    async fn next_job(&self, wait: Duration) -> Result<Option<Arc<Job>>, QueueError> {
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            let entries = match self.abandoned_entry().await? {
                Some(e) => vec![e],
                None => {
                    let left = deadline.saturating_duration_since(tokio::time::Instant::now());
                    self.read_entries(left).await?
                }
            };
            if entries.is_empty() {
                return Ok(None);
            }
            for (entry, id) in entries {
                if let Some(job) = self.claim(&entry, &id).await? {
                    return Ok(Some(job));
                }
            }
            if tokio::time::Instant::now() >= deadline {
                return Ok(None);
            }
        }
    }

    /// One entry whose worker stopped keeping it fresh, now this process's.
    async fn abandoned_entry(&self) -> Result<Option<(String, String)>, QueueError> {
        let mut c = self.conn.clone();
        let reply: Value = redis::cmd("XAUTOCLAIM")
            .arg(self.keys.queue())
            .arg(GROUP)
            .arg(&self.consumer)
            .arg(self.config.visibility_timeout.as_millis() as u64)
            .arg("0-0")
            .arg("COUNT")
            .arg(1)
            .query_async(&mut c)
            .await
            .map_err(engine_error)?;
        // [next cursor, [[entry, [field, value, …]], …], [deleted ids]]
        let Value::Array(parts) = reply else {
            return Ok(None);
        };
        Ok(parts
            .get(1)
            .and_then(|v| stream_entries(v).into_iter().next()))
    }

    /// New entries for this process (at most one), waiting up to `wait`.
    async fn read_entries(&self, wait: Duration) -> Result<Vec<(String, String)>, QueueError> {
        let mut c = self.reader().await?;
        let mut cmd = redis::cmd("XREADGROUP");
        cmd.arg("GROUP")
            .arg(GROUP)
            .arg(&self.consumer)
            .arg("COUNT")
            .arg(1);
        if !wait.is_zero() {
            cmd.arg("BLOCK").arg(wait.as_millis().max(1) as u64);
        }
        let reply: Value = cmd
            .arg("STREAMS")
            .arg(self.keys.queue())
            .arg(">")
            .query_async(&mut c)
            .await
            .map_err(engine_error)?;
        // [[stream, [[entry, [field, value, …]], …]]] or nil
        let Value::Array(streams) = reply else {
            return Ok(Vec::new());
        };
        Ok(streams
            .first()
            .and_then(|s| match s {
                Value::Array(kv) => kv.get(1).map(stream_entries),
                _ => None,
            })
            .unwrap_or_default())
    }

    /// Moves a delivered job to running and builds it here; None (entry acknowledged) when it
    /// ended meanwhile, or failed (entry acknowledged, job failed) when its workers keep
    /// dying on it.
    async fn claim(&self, entry: &str, id: &str) -> Result<Option<Arc<Job>>, QueueError> {
        let mut c = self.conn.clone();
        let reply: Option<(String, String, String, String, u32)> = self
            .scripts
            .claim
            .key(self.keys.job(id))
            .key(self.keys.waiting())
            .key(self.keys.running())
            .arg(id)
            .arg(now_ms())
            .invoke_async(&mut c)
            .await
            .map_err(engine_error)?;
        let Some((meta, spec, cancel, _, deliveries)) = reply else {
            self.acknowledge(entry).await?;
            return Ok(None);
        };
        let built = serde_json::from_str::<JobMeta>(&meta)
            .and_then(|m| Ok((m, serde_json::from_str(&spec)?)));
        let (meta, spec) = match built {
            Ok(parts) => parts,
            Err(e) => {
                tracing::error!(job = %id, error = %e, "unreadable job in the queue: dropped");
                self.acknowledge(entry).await?;
                return Ok(None);
            }
        };
        let job = Arc::new(Job::new(id.to_string(), meta, spec));
        job.cancel.store(cancel == "1", Ordering::SeqCst);
        lock(&self.local).insert(
            id.to_string(),
            Taken {
                job: job.clone(),
                entry: entry.to_string(),
            },
        );
        if deliveries > self.config.max_deliveries {
            job.complete(|s| {
                s.state = JobState::Failed;
                s.failure = Failure::Internal;
                s.error = Some(format!(
                    "the job was started {} times and its worker stopped each time (out of \
                     memory? the workers' logs tell); it is not tried again",
                    deliveries - 1
                ));
            });
            self.finish(&job).await?;
            return Ok(None);
        }
        if deliveries > 1 {
            tracing::warn!(job = %id, deliveries, "running a job whose worker stopped");
        }
        Ok(Some(job))
    }

    async fn acknowledge(&self, entry: &str) -> Result<(), QueueError> {
        let mut c = self.conn.clone();
        redis::pipe()
            .cmd("XACK")
            .arg(self.keys.queue())
            .arg(GROUP)
            .arg(entry)
            .ignore()
            .cmd("XDEL")
            .arg(self.keys.queue())
            .arg(entry)
            .ignore()
            .query_async::<()>(&mut c)
            .await
            .map_err(engine_error)
    }

    /// The id of the entry the next read would deliver, if any.
    async fn peek_next(&self) -> Result<Option<String>, QueueError> {
        let mut c = self.conn.clone();
        let groups: Value = redis::cmd("XINFO")
            .arg("GROUPS")
            .arg(self.keys.queue())
            .query_async(&mut c)
            .await
            .map_err(engine_error)?;
        let Some(last) = group_field(&groups, "last-delivered-id") else {
            return Ok(None);
        };
        let entries: Value = redis::cmd("XRANGE")
            .arg(self.keys.queue())
            .arg(format!("({last}"))
            .arg("+")
            .arg("COUNT")
            .arg(1)
            .query_async(&mut c)
            .await
            .map_err(engine_error)?;
        Ok(stream_entries(&entries)
            .into_iter()
            .next()
            .map(|(_, id)| id))
    }

    /// A queued job built from its record without taking it, to see whether it can share a
    /// batch.
    async fn peek_job(&self, id: &str) -> Result<Option<Job>, QueueError> {
        let mut c = self.conn.clone();
        let fields: Vec<Option<String>> = redis::cmd("HMGET")
            .arg(self.keys.job(id))
            .arg(&["meta", "spec"])
            .query_async(&mut c)
            .await
            .map_err(engine_error)?;
        let (Some(meta), Some(spec)) = (&fields[0], &fields[1]) else {
            return Ok(None);
        };
        Ok(serde_json::from_str(meta)
            .ok()
            .zip(serde_json::from_str(spec).ok())
            .map(|(m, s)| Job::new(id.to_string(), m, s)))
    }

    /// Writes a running job's changes to Redis until it ends (the end itself is `finish`'s).
    fn mirror(&self, job: Arc<Job>) {
        let conn = self.conn.clone();
        let keys = self.keys.clone();
        let script = self.scripts.clone();
        tokio::spawn(async move {
            let mut rx = job.subscribe();
            let mut sent_preview: Option<String> = None;
            let mut preview_at = tokio::time::Instant::now() - PREVIEW_EVERY;
            loop {
                let status = job.status();
                if status.state.is_finished() {
                    return;
                }
                let fresh_preview = status.preview.as_ref().filter(|p| {
                    Some(*p) != sent_preview.as_ref() && preview_at.elapsed() >= PREVIEW_EVERY
                });
                let preview = fresh_preview.cloned().unwrap_or_default();
                if !preview.is_empty() {
                    sent_preview = Some(preview.clone());
                    preview_at = tokio::time::Instant::now();
                }
                let json = serde_json::to_string(&status).unwrap_or_default();
                let mut c = conn.clone();
                let written: Result<i64, _> = script
                    .update
                    .key(keys.job(&job.id))
                    .arg(&job.id)
                    .arg(json)
                    .arg(preview)
                    .arg(keys.events())
                    .invoke_async(&mut c)
                    .await;
                if let Err(e) = written {
                    tracing::warn!(job = %job.id, error = %e, "cannot write progress");
                }
                if rx.changed().await.is_err() {
                    return;
                }
            }
        });
    }

    fn stop_tracking(&self, id: &str) -> Option<String> {
        lock(&self.local).remove(id).map(|t| t.entry)
    }
}

#[async_trait]
impl JobQueue for RedisQueue {
    fn backend(&self) -> &'static str {
        "redis"
    }

    async fn submit(&self, job: Arc<Job>) -> Result<JobRecord, QueueError> {
        self.start_background();
        let meta =
            serde_json::to_string(&job.meta).map_err(|e| QueueError::Engine(e.to_string()))?;
        let spec =
            serde_json::to_string(&job.spec).map_err(|e| QueueError::Engine(e.to_string()))?;
        let status = serde_json::to_string(&job.status()).unwrap_or_default();
        let mut c = self.conn.clone();
        let (seq, waiting): (i64, usize) = self
            .scripts
            .submit
            .key(self.keys.waiting())
            .key(self.keys.queue())
            .key(self.keys.job(&job.id))
            .key(self.keys.seq())
            .arg(&job.id)
            .arg(self.capacity)
            .arg(meta)
            .arg(spec)
            .arg(status)
            .arg(job.meta.model.clone().unwrap_or_default())
            .invoke_async(&mut c)
            .await
            .map_err(engine_error)?;
        if seq < 0 {
            return Err(QueueError::Full(waiting));
        }
        let mut record = job.record();
        record.position = Some(waiting);
        Ok(record)
    }

    async fn get(&self, id: &str) -> Result<Option<JobRecord>, QueueError> {
        self.record(id).await
    }

    async fn pngs(&self, id: &str) -> Result<Vec<Vec<u8>>, QueueError> {
        let Some(record) = self.record(id).await? else {
            return Ok(Vec::new());
        };
        let keys: Vec<String> = (0..record.status.images.len())
            .map(|i| self.keys.png(id, i))
            .collect();
        if keys.is_empty() {
            return Ok(Vec::new());
        }
        let mut c = self.conn.clone();
        let pngs: Vec<Option<Vec<u8>>> = c.mget(keys).await.map_err(engine_error)?;
        Ok(pngs.into_iter().map(Option::unwrap_or_default).collect())
    }

    async fn preview(&self, id: &str) -> Result<Option<String>, QueueError> {
        let mut c = self.conn.clone();
        c.hget(self.keys.job(id), "preview")
            .await
            .map_err(engine_error)
    }

    async fn list(&self) -> Result<Vec<JobRecord>, QueueError> {
        let mut ids = self.ids(self.keys.running(), false).await?;
        ids.extend(self.ids(self.keys.waiting(), false).await?);
        ids.extend(self.ids(self.keys.recent(), true).await?);
        self.records(&ids).await
    }

    async fn running(&self) -> Result<Vec<JobRecord>, QueueError> {
        let ids = self.ids(self.keys.running(), false).await?;
        self.records(&ids).await
    }

    async fn cancel(&self, id: &str) -> Result<Option<JobRecord>, QueueError> {
        let cancelled = JobStatus {
            state: JobState::Cancelled,
            error: Some("cancelled before it started".into()),
            finished: Some(SystemTime::now()),
            ..JobStatus::default()
        };
        let mut c = self.conn.clone();
        let done: i64 = self
            .scripts
            .cancel
            .key(self.keys.job(id))
            .key(self.keys.waiting())
            .key(self.keys.recent())
            .arg(id)
            .arg(serde_json::to_string(&cancelled).unwrap_or_default())
            .arg(self.config.result_ttl.as_secs().max(1))
            .arg(now_ms())
            .arg(self.keys.events())
            .arg(self.keys.signals())
            .arg(KEEP_RECENT)
            .invoke_async(&mut c)
            .await
            .map_err(engine_error)?;
        if done < 0 {
            return Ok(None);
        }
        if let Some(t) = lock(&self.local).get(id) {
            t.job.cancel.store(true, Ordering::SeqCst);
        }
        self.record(id).await
    }

    async fn signal_running(&self, signal: Signal) -> Result<(), QueueError> {
        let ids = self.ids(self.keys.running(), false).await?;
        let (field, message) = match signal {
            Signal::Interrupt => ("cancel", "interrupt"),
            Signal::Skip => ("skip", "skip"),
        };
        let mut pipe = redis::pipe();
        for id in &ids {
            pipe.hset(self.keys.job(id), field, "1").ignore();
        }
        pipe.publish(self.keys.signals(), message).ignore();
        let mut c = self.conn.clone();
        pipe.query_async::<()>(&mut c).await.map_err(engine_error)?;
        apply_signal(&self.local, message);
        Ok(())
    }

    async fn counts(&self) -> Result<QueueCounts, QueueError> {
        let mut c = self.conn.clone();
        let (queued, running): (usize, usize) = redis::pipe()
            .zcard(self.keys.waiting())
            .zcard(self.keys.running())
            .query_async(&mut c)
            .await
            .map_err(engine_error)?;
        Ok(QueueCounts {
            queued,
            running,
            capacity: self.capacity,
        })
    }

    async fn wait_change(&self, id: &str, version: u64, timeout: Duration) {
        self.start_background();
        let mut rx = self.events.subscribe();
        let mut c = self.conn.clone();
        let now: Option<u64> = c.hget(self.keys.job(id), "v").await.unwrap_or(None);
        if now.is_none_or(|v| v > version) {
            return;
        }
        let _ = tokio::time::timeout(timeout, async {
            loop {
                match rx.recv().await {
                    Ok(changed) if changed == id => return,
                    Ok(_) => {}
                    // Missed messages: let the caller read again.
                    Err(_) => return,
                }
            }
        })
        .await;
    }

    async fn ping(&self) -> Result<(), QueueError> {
        let mut c = self.conn.clone();
        // Probes must answer quickly: a Redis that is down is "not ready" within this.
        let limit = Duration::from_secs(2);
        match tokio::time::timeout(limit, redis::cmd("PING").query_async::<String>(&mut c)).await {
            Ok(answer) => answer.map(drop).map_err(engine_error),
            Err(_) => Err(QueueError::Engine(format!(
                "Redis did not answer within {} s",
                limit.as_secs()
            ))),
        }
    }

    async fn take(
        &self,
        worker: &str,
        rule: &BatchRule<'_>,
        wait: Duration,
    ) -> Result<Vec<Arc<Job>>, QueueError> {
        self.start_background();
        if self.stopping.load(Ordering::SeqCst) {
            tokio::time::sleep(wait).await;
            return Ok(Vec::new());
        }
        let held = lock(&self.held).pop();
        let first = match held {
            Some(j) => j,
            None => match self.next_job(wait).await? {
                Some(j) => j,
                None => return Ok(Vec::new()),
            },
        };
        let mut taken = vec![first];
        let mut images = (rule.images_of)(&taken[0]);
        // Read ahead while the next job can share the batch (FIFO is kept: only the jobs
        // at the head of the line join).
        for _ in 0..READ_AHEAD {
            if images >= rule.max_images || first_cancelled(&taken) {
                break;
            }
            let Some(next) = self.peek_next().await? else {
                break;
            };
            let Some(candidate) = self.peek_job(&next).await? else {
                break;
            };
            let more = (rule.images_of)(&candidate);
            if images + more > rule.max_images || !(rule.batchable)(&taken[0], &candidate) {
                break;
            }
            let delivered = self.read_entries(Duration::ZERO).await?;
            let Some((entry, id)) = delivered.into_iter().next() else {
                break;
            };
            let Some(job) = self.claim(&entry, &id).await? else {
                continue;
            };
            if job.id == candidate.id {
                images += more;
                taken.push(job);
            } else {
                // Another worker took the candidate first: this one runs next here.
                lock(&self.held).push(job);
                break;
            }
        }
        for job in &taken {
            job.start(worker, taken.len());
            self.mirror(job.clone());
        }
        Ok(taken)
    }

    async fn finish(&self, job: &Arc<Job>) -> Result<(), QueueError> {
        let entry = self.stop_tracking(&job.id).unwrap_or_default();
        let status = job.status();
        let mut inv = self.scripts.finish.prepare_invoke();
        inv.key(self.keys.job(&job.id))
            .key(self.keys.running())
            .key(self.keys.recent())
            .key(self.keys.queue());
        for i in 0..status.images.len() {
            inv.key(self.keys.png(&job.id, i));
        }
        inv.arg(&job.id)
            .arg(serde_json::to_string(&status).unwrap_or_default())
            .arg(entry)
            .arg(self.config.result_ttl.as_secs().max(1))
            .arg(now_ms())
            .arg(self.keys.events())
            .arg(KEEP_RECENT)
            .arg(GROUP);
        for image in &status.images {
            inv.arg(image.png.as_slice());
        }
        let mut c = self.conn.clone();
        let first: i64 = inv.invoke_async(&mut c).await.map_err(engine_error)?;
        if first == 0 {
            tracing::info!(job = %job.id, "the job's result was written already: kept the first");
        }
        Ok(())
    }

    async fn release(&self, jobs: &[Arc<Job>]) -> Result<(), QueueError> {
        for job in jobs {
            let entry = self.stop_tracking(&job.id).unwrap_or_default();
            let queued = serde_json::to_string(&JobStatus::default()).unwrap_or_default();
            let mut c = self.conn.clone();
            let _: i64 = self
                .scripts
                .release
                .key(self.keys.job(&job.id))
                .key(self.keys.running())
                .key(self.keys.waiting())
                .key(self.keys.queue())
                .arg(&job.id)
                .arg(queued)
                .arg(entry)
                .arg(&self.consumer)
                .arg(GROUP)
                .arg(self.keys.events())
                .invoke_async(&mut c)
                .await
                .map_err(engine_error)?;
        }
        Ok(())
    }

    fn shut_down(&self) {
        self.stopping.store(true, Ordering::SeqCst);
        // Jobs read ahead but not started go back at once.
        let held: Vec<Arc<Job>> = lock(&self.held).drain(..).collect();
        if !held.is_empty() {
            let me = self.clone_handles();
            tokio::spawn(async move {
                if let Err(e) = me.release(&held).await {
                    tracing::warn!(error = %e, "could not hand back read-ahead jobs");
                }
            });
        }
    }

    fn is_shutting_down(&self) -> bool {
        self.stopping.load(Ordering::SeqCst)
    }

    fn local_running(&self) -> Vec<Arc<Job>> {
        lock(&self.local).values().map(|t| t.job.clone()).collect()
    }
}

impl RedisQueue {
    /// A second handle on the same queue state, for background work.
    fn clone_handles(&self) -> RedisQueue {
        RedisQueue {
            client: self.client.clone(),
            conn: self.conn.clone(),
            reader: tokio::sync::Mutex::new(None),
            keys: self.keys.clone(),
            config: self.config.clone(),
            capacity: self.capacity,
            scripts: self.scripts.clone(),
            consumer: self.consumer.clone(),
            local: self.local.clone(),
            held: Mutex::new(Vec::new()),
            events: self.events.clone(),
            stopping: self.stopping.clone(),
            background: Mutex::new(true),
        }
    }
}

fn first_cancelled(taken: &[Arc<Job>]) -> bool {
    taken[0].cancel.load(Ordering::SeqCst)
}

/// A record from `HMGET meta status v cancel skip` and the waiting rank.
fn parse_record(id: &str, fields: &[Option<String>], rank: Option<usize>) -> Option<JobRecord> {
    let meta: JobMeta = serde_json::from_str(fields.first()?.as_deref()?).ok()?;
    let status: JobStatus = fields
        .get(1)
        .and_then(|s| s.as_deref())
        .and_then(|s| serde_json::from_str(s).ok())
        .unwrap_or_default();
    let flag = |i: usize| fields.get(i).and_then(|f| f.as_deref()) == Some("1");
    Some(JobRecord {
        id: id.to_string(),
        position: if status.state == JobState::Queued {
            rank
        } else {
            None
        },
        version: fields
            .get(2)
            .and_then(|v| v.as_deref())
            .and_then(|v| v.parse().ok())
            .unwrap_or(0),
        interrupt_requested: flag(3),
        skip_requested: flag(4),
        meta,
        status,
    })
}

/// `(entry id, job id)` of each entry of an `XRANGE`-shaped reply.
fn stream_entries(v: &Value) -> Vec<(String, String)> {
    let Value::Array(entries) = v else {
        return Vec::new();
    };
    entries
        .iter()
        .filter_map(|e| {
            let Value::Array(parts) = e else { return None };
            let entry: String = redis::from_redis_value(parts.first()?.clone()).ok()?;
            let fields: Vec<String> = redis::from_redis_value(parts.get(1)?.clone()).ok()?;
            let id = fields
                .chunks(2)
                .find(|kv| kv[0] == "id")
                .and_then(|kv| kv.get(1).cloned())?;
            Some((entry, id))
        })
        .collect()
}

/// A field of our consumer group in an `XINFO GROUPS` reply.
fn group_field(groups: &Value, field: &str) -> Option<String> {
    let Value::Array(groups) = groups else {
        return None;
    };
    groups.iter().find_map(|g| {
        let pairs: Vec<Value> = match g {
            Value::Array(p) => p.clone(),
            Value::Map(m) => m.iter().flat_map(|(k, v)| [k.clone(), v.clone()]).collect(),
            _ => return None,
        };
        let text = |v: &Value| redis::from_redis_value::<String>(v.clone()).ok();
        let is_ours = pairs.chunks(2).any(|kv| {
            text(&kv[0]).as_deref() == Some("name") && text(&kv[1]).as_deref() == Some(GROUP)
        });
        if !is_ours {
            return None;
        }
        pairs
            .chunks(2)
            .find(|kv| text(&kv[0]).as_deref() == Some(field))
            .and_then(|kv| text(&kv[1]))
    })
}

/// Sets A1111's signal on every job this process runs.
fn apply_signal(local: &Mutex<HashMap<String, Taken>>, message: &str) {
    for t in lock(local).values() {
        match message {
            "interrupt" => t.job.cancel.store(true, Ordering::SeqCst),
            "skip" => t.job.skip.store(true, Ordering::SeqCst),
            _ => {}
        }
    }
}

/// Listens to the events channel (job ids whose records changed, for `wait_change`) and the
/// signals channel (interrupt, skip for the jobs running here); reconnects when Redis goes
/// away. It also reads the cancel flags of the jobs running here four times a second, so
/// that a cancel (and a message lost in a reconnect) reaches a running job within a quarter
/// of a second.
async fn listen(
    client: redis::Client,
    conn: Conn,
    keys: Keys,
    events: tokio::sync::broadcast::Sender<String>,
    local: Arc<Mutex<HashMap<String, Taken>>>,
    stopping: Arc<AtomicBool>,
) {
    let poll_flags = {
        let local = local.clone();
        let keys = keys.clone();
        async move {
            loop {
                tokio::time::sleep(Duration::from_millis(250)).await;
                let ids: Vec<String> = lock(&local).keys().cloned().collect();
                for id in ids {
                    let mut c = conn.clone();
                    let cancel: Option<String> =
                        c.hget(keys.job(&id), "cancel").await.unwrap_or(None);
                    if cancel.as_deref() == Some("1") {
                        if let Some(t) = lock(&local).get(&id) {
                            t.job.cancel.store(true, Ordering::SeqCst);
                        }
                    }
                }
            }
        }
    };
    tokio::spawn(poll_flags);
    let mut backoff = Duration::from_millis(100);
    loop {
        let subscribed = async {
            let mut ps = client.get_async_pubsub().await?;
            ps.subscribe(keys.events()).await?;
            ps.subscribe(keys.signals()).await?;
            Ok::<_, redis::RedisError>(ps)
        }
        .await;
        match subscribed {
            Ok(mut ps) => {
                backoff = Duration::from_millis(100);
                let mut messages = ps.on_message();
                while let Some(msg) = messages.next().await {
                    let payload: String = msg.get_payload().unwrap_or_default();
                    if msg.get_channel_name() == keys.signals() {
                        // A cancel names no job: the poll above reads the flags.
                        apply_signal(&local, &payload);
                    } else {
                        let _ = events.send(payload);
                    }
                }
            }
            Err(e) => {
                if stopping.load(Ordering::SeqCst) {
                    return;
                }
                tracing::warn!(error = %e, "queue events: reconnecting");
            }
        }
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(Duration::from_secs(5));
    }
}

/// Keeps this process's stream entries fresh (their idle time reset) while its workers run
/// them, so that no other worker claims a job that is still running.
async fn keep_fresh(
    conn: Conn,
    keys: Keys,
    consumer: String,
    local: Arc<Mutex<HashMap<String, Taken>>>,
    visibility: Duration,
) {
    let every = (visibility / 4).max(Duration::from_millis(200));
    loop {
        tokio::time::sleep(every).await;
        let entries: Vec<String> = lock(&local).values().map(|t| t.entry.clone()).collect();
        if entries.is_empty() {
            continue;
        }
        let mut c = conn.clone();
        let kept: Result<Value, _> = redis::cmd("XCLAIM")
            .arg(keys.queue())
            .arg(GROUP)
            .arg(&consumer)
            .arg(0)
            .arg(&entries)
            .arg("JUSTID")
            .query_async(&mut c)
            .await;
        if let Err(e) = kept {
            tracing::warn!(error = %e, "cannot keep running jobs claimed");
        }
    }
}
