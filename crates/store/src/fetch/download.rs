//! Downloading one file: over one stream or several ranged connections, resumed from what an
//! earlier run left, verified (size, sha256) and renamed into place.

use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Instant, SystemTime};

use futures_util::StreamExt;
use reqwest::header::{CONTENT_RANGE, RANGE};
use reqwest::StatusCode;
use sha2::{Digest, Sha256};
use tokio::sync::mpsc;

use super::resolve::{header_str, with_auth};
use super::resume::{load_state, partial_path, plan_chunks, state_path, ChunkState, ResumeState};
use super::retry::{error_chain, send_with_retry, Retrier};
use super::writer::{run_writer, WriteOp, SAVE_EVERY};
use super::{Ctx, FetchError, FileJob, ProgressEvent};
use crate::store::{hex, io_err, sha256_file, sync_dir, Store, StoreLock, StoredFile};

/// Emits `file_progress` at most once per interval for one file.
struct ProgressThrottle<'c> {
    ctx: &'c Ctx<'c>,
    job: &'c FileJob,
    received: AtomicU64,
    started: Instant,
    start_bytes: u64,
    last: Mutex<Instant>,
}

impl ProgressThrottle<'_> {
    fn add(&self, n: u64) {
        let total = self.received.fetch_add(n, Ordering::Relaxed) + n;
        let now = Instant::now();
        {
            let mut last = self.last.lock().unwrap_or_else(|p| p.into_inner());
            if now.duration_since(*last) < self.ctx.options.progress_interval {
                return;
            }
            *last = now;
        }
        let secs = now.duration_since(self.started).as_secs_f64().max(1e-6);
        (self.ctx.progress)(ProgressEvent::FileProgress {
            model: self.job.model.clone(),
            file: self.job.rel_path.clone(),
            bytes: total,
            size: self.job.size,
            bytes_per_sec: total.saturating_sub(self.start_bytes) as f64 / secs,
        });
    }

    fn sub(&self, n: u64) {
        self.received.fetch_sub(n, Ordering::Relaxed);
    }
}

enum AttemptError {
    /// A ranged request was answered with the whole file: fall back to one stream.
    RangesUnsupported,
    Failed(FetchError),
}

impl From<FetchError> for AttemptError {
    fn from(e: FetchError) -> Self {
        AttemptError::Failed(e)
    }
}

fn discard(partial: &Path) {
    let _ = std::fs::remove_file(partial);
    let _ = std::fs::remove_file(state_path(partial));
}

pub(super) async fn download_file(
    ctx: &Ctx<'_>,
    store: &Store,
    job: &FileJob,
    lock: &StoreLock,
) -> Result<StoredFile, FetchError> {
    let started = Instant::now();
    let final_path = store.file_path(&job.model, &job.rel_path);
    let partial = partial_path(&final_path);
    let dir = final_path.parent().unwrap_or(store.root()).to_owned();
    std::fs::create_dir_all(&dir).map_err(io_err("cannot create", &dir))?;
    let mut connections = ctx.options.connections.max(1);
    let (hasher, state) = loop {
        let state = match load_state(&partial, job) {
            Some(state) if partial.exists() => state,
            _ => {
                discard(&partial);
                ResumeState {
                    url: job.url.clone(),
                    size: job.size,
                    sha256: job.sha256.clone(),
                    chunks: plan_chunks(job.size, connections, ctx.options.ranged_min_size),
                }
            }
        };
        match attempt(ctx, job, &partial, state, connections).await {
            Ok(done) => break done,
            Err(AttemptError::RangesUnsupported) if connections > 1 => {
                discard(&partial);
                connections = 1;
            }
            Err(AttemptError::RangesUnsupported) => {
                return Err(FetchError::Protocol {
                    url: job.url.clone(),
                    message: "server ignored a Range request".into(),
                })
            }
            Err(AttemptError::Failed(e)) => return Err(e),
        }
    };

    let label = format!("{}/{}", job.model, job.rel_path);
    let size = std::fs::metadata(&partial)
        .map_err(io_err("cannot read", &partial))?
        .len();
    let written = state.done();
    if job.size.is_some_and(|expected| expected != size) || written != size {
        discard(&partial);
        return Err(FetchError::SizeMismatch {
            file: label,
            expected: job.size.unwrap_or(written),
            actual: if job.size.is_some() { written } else { size },
        });
    }
    let sha256 = match hasher {
        Some(h) => hex(&h.finalize()),
        None => {
            let p = partial.clone();
            tokio::task::spawn_blocking(move || sha256_file(&p))
                .await
                .map_err(|e| std::io::Error::other(e.to_string()))
                .and_then(|r| r)
                .map_err(io_err("cannot hash", &partial))?
        }
    };
    if let Some(expected) = &job.sha256 {
        if *expected != sha256 {
            discard(&partial);
            return Err(FetchError::ChecksumMismatch {
                file: label,
                expected: expected.clone(),
                actual: sha256,
            });
        }
    }
    std::fs::rename(&partial, &final_path)
        .map_err(io_err("cannot rename into place", &final_path))?;
    let _ = std::fs::remove_file(state_path(&partial));
    sync_dir(&dir);
    let stored = StoredFile {
        path: job.rel_path.clone(),
        size,
        sha256: sha256.clone(),
        source: job.source_key.clone(),
        url: job.url.clone(),
        fetched_at: humantime::format_rfc3339_seconds(SystemTime::now()).to_string(),
    };
    store.record(&job.model, stored.clone(), lock)?;
    (ctx.progress)(ProgressEvent::FileDone {
        model: job.model.clone(),
        file: job.rel_path.clone(),
        size,
        sha256,
        seconds: started.elapsed().as_secs_f64(),
    });
    Ok(stored)
}

/// One pass over all chunks of a file, taken in file order by up to `connections` parallel
/// requests; on error the writer has saved what was written.
async fn attempt(
    ctx: &Ctx<'_>,
    job: &FileJob,
    partial: &Path,
    state: ResumeState,
    connections: usize,
) -> Result<(Option<Sha256>, ResumeState), AttemptError> {
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .read(true)
        .write(true)
        .open(partial)
        .map_err(io_err("cannot open", partial))
        .map_err(FetchError::from)?;
    if let Some(size) = job.size {
        // Preallocate (sparse) so ranged writes land anywhere; the state says what is real.
        let len = file.metadata().map(|m| m.len()).unwrap_or(0);
        if len != size {
            file.set_len(size)
                .map_err(io_err("cannot size", partial))
                .map_err(FetchError::from)?;
        }
    }
    let single = state.chunks.len() == 1;
    let chunks = state.chunks.clone();
    let workers = connections.clamp(1, chunks.len());
    let resumed_from = state.done();
    (ctx.progress)(ProgressEvent::FileStart {
        model: job.model.clone(),
        file: job.rel_path.clone(),
        size: job.size,
        resumed_from,
        connections: workers,
    });
    let (tx, rx) = mpsc::channel(64);
    let partial_owned = partial.to_owned();
    let writer = tokio::task::spawn_blocking(move || {
        run_writer(file, &partial_owned, single, state, rx, SAVE_EVERY)
    });
    let throttle = ProgressThrottle {
        ctx,
        job,
        received: AtomicU64::new(resumed_from),
        started: Instant::now(),
        start_bytes: resumed_from,
        last: Mutex::new(Instant::now()),
    };
    let next_chunk = std::sync::atomic::AtomicUsize::new(0);
    let downloads = futures_util::future::try_join_all((0..workers).map(|_| async {
        loop {
            let i = next_chunk.fetch_add(1, Ordering::Relaxed);
            let Some(chunk) = chunks.get(i) else {
                return Ok::<(), AttemptError>(());
            };
            download_chunk(ctx, job, i, *chunk, single, &tx, &throttle).await?;
        }
    }))
    .await;
    drop(tx);
    let written = writer
        .await
        .map_err(|e| std::io::Error::other(e.to_string()))
        .and_then(|r| r)
        .map_err(io_err("cannot write", partial));
    downloads?;
    Ok(written.map_err(FetchError::from)?)
}

async fn download_chunk(
    ctx: &Ctx<'_>,
    job: &FileJob,
    index: usize,
    chunk: ChunkState,
    single: bool,
    tx: &mpsc::Sender<WriteOp>,
    throttle: &ProgressThrottle<'_>,
) -> Result<(), AttemptError> {
    let who = Some((job.model.as_str(), job.rel_path.as_str()));
    let writer_gone = || {
        AttemptError::Failed(FetchError::Protocol {
            url: job.url.clone(),
            message: "the file writer stopped (disk error)".into(),
        })
    };
    let mut sent = chunk.done;
    let mut retrier = Retrier { attempts: 0 };
    loop {
        let from = chunk.start + sent;
        if chunk.end.is_some_and(|end| from >= end) {
            return Ok(());
        }
        let range = match chunk.end {
            Some(end) if !single || sent > 0 => Some(format!("bytes={from}-{}", end - 1)),
            None if sent > 0 => Some(format!("bytes={from}-")),
            _ => None,
        };
        let response = send_with_retry(ctx, &job.url, who, || {
            let request = with_auth(ctx, ctx.client.get(&job.url), job.hub_auth);
            match &range {
                Some(r) => request.header(RANGE, r),
                None => request,
            }
        })
        .await?;
        let status = response.status();
        if status.is_redirection() {
            return Err(FetchError::Protocol {
                url: job.url.clone(),
                message: format!("redirect {status} without a usable Location"),
            }
            .into());
        }
        if range.is_some() {
            if status == StatusCode::PARTIAL_CONTENT {
                let start = header_str(response.headers(), CONTENT_RANGE.as_str())
                    .and_then(|v| v.strip_prefix("bytes "))
                    .and_then(|v| v.split('-').next())
                    .and_then(|v| v.parse::<u64>().ok());
                if start != Some(from) {
                    return Err(FetchError::Protocol {
                        url: job.url.clone(),
                        message: format!(
                            "asked for bytes from {from}, got Content-Range {start:?}"
                        ),
                    }
                    .into());
                }
            } else if single {
                tx.send(WriteOp::Restart).await.map_err(|_| writer_gone())?;
                throttle.sub(sent);
                sent = 0;
            } else {
                return Err(AttemptError::RangesUnsupported);
            }
        }
        let mut stream = response.bytes_stream();
        let mut failure = None;
        while let Some(item) = stream.next().await {
            match item {
                Ok(mut bytes) => {
                    let offset = chunk.start + sent;
                    let mut full = false;
                    if let Some(end) = chunk.end {
                        let room = end - offset;
                        if bytes.len() as u64 >= room {
                            bytes.truncate(room as usize);
                            full = true;
                        }
                    }
                    let n = bytes.len() as u64;
                    if n > 0 {
                        tx.send(WriteOp::Data {
                            chunk: index,
                            offset,
                            bytes,
                        })
                        .await
                        .map_err(|_| writer_gone())?;
                        sent += n;
                        throttle.add(n);
                        retrier.progressed();
                    }
                    if full {
                        return Ok(());
                    }
                }
                Err(e) => {
                    failure = Some(error_chain(&e));
                    break;
                }
            }
        }
        let reason = match (failure, chunk.end) {
            (None, None) => return Ok(()),
            (None, Some(_)) => "connection closed before the end of the data".to_owned(),
            (Some(reason), _) => reason,
        };
        retrier.wait(ctx, who, &job.url, reason, None).await?;
    }
}
