//! The fetcher: brings catalog models into a [`Store`], robustly.
//!
//! Order of work for one call of [`fetch`]: take the store lock; skip every file the manifest
//! already lists as verified (no request at all); ask the hub (or the URL) for the size and
//! sha256 of the rest; check free space; download each file to `<file>.partial` with retries
//! (exponential backoff with full jitter, `Retry-After` honoured), resuming with `Range` from
//! what is already on disk and, for large files, over several ranged connections; verify the
//! sha256; rename into place; record it in the manifest.
//!
//! The parts: [`options`] (what the caller sets), [`events`] (what it is told), [`error`]
//! (why it failed); [`resolve`](mod@resolve) turns a catalog entry into concrete files
//! (hub metadata, plain URLs); [`retry`] is the backoff policy and status handling every
//! request goes through; [`resume`] is what survives an interrupted download and how a file
//! is cut into ranges; [`download`] fetches one file over one stream or several ranged
//! connections, and [`writer`] is its blocking half (writes, the hash in file order,
//! checkpoints).

mod download;
mod error;
mod events;
mod options;
mod resolve;
mod resume;
mod retry;
mod writer;

use std::time::{Duration, Instant};

use serde::Serialize;

use crate::catalog::ModelEntry;
use crate::net::{build_clients, load_ca_bundle};
use crate::store::{free_space, io_err, Store, StoreLock, StoredFile};

pub use error::{FetchError, HumanBytes};
pub use events::ProgressEvent;
pub use options::{FetchOptions, FreeSpaceProbe};

use download::download_file;
use resolve::resolve;
use resume::{load_state, partial_path};

/// What a successful [`fetch`] did.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct FetchReport {
    /// Files already in the store, verified, not requested.
    pub files_present: usize,
    /// Files downloaded.
    pub files_downloaded: usize,
    /// Bytes those files hold.
    pub bytes_downloaded: u64,
}

/// One concrete file to bring into the store.
#[derive(Debug, Clone)]
struct FileJob {
    model: String,
    rel_path: String,
    url: String,
    /// Send the hub token with requests for this file.
    hub_auth: bool,
    size: Option<u64>,
    sha256: Option<String>,
    source_key: String,
}

struct Ctx<'a> {
    options: &'a FetchOptions,
    client: reqwest::Client,
    client_no_redirect: reqwest::Client,
    progress: &'a (dyn Fn(ProgressEvent) + Send + Sync),
}

/// Fetches `entries` into `store`. `progress` receives every [`ProgressEvent`] as it happens
/// (from the calling task; keep it cheap).
pub async fn fetch(
    store: &Store,
    entries: &[ModelEntry],
    options: &FetchOptions,
    progress: impl Fn(ProgressEvent) + Send + Sync,
) -> Result<FetchReport, FetchError> {
    let started = Instant::now();
    let extra_roots = match &options.ca_bundle {
        Some(path) => load_ca_bundle(path).map_err(FetchError::Config)?,
        None => Vec::new(),
    };
    let (client, client_no_redirect) = build_clients(
        &options.proxy,
        &extra_roots,
        options.connect_timeout,
        options.read_timeout,
    )
    .map_err(FetchError::Config)?;
    let ctx = Ctx {
        options,
        client,
        client_no_redirect,
        progress: &progress,
    };

    let lock = lock_store(store, &ctx).await?;
    let manifest = store.manifest()?;

    // 1. What is already there (no network), and which sources still need work.
    let mut report = FetchReport::default();
    let mut pending = Vec::new();
    for entry in entries {
        let stored = manifest.models.get(&entry.name);
        for spec in &entry.files {
            let key = spec.source.key();
            let files: Vec<&StoredFile> = stored
                .map(|m| m.files.iter().filter(|f| f.source == key).collect())
                .unwrap_or_default();
            let intact = !files.is_empty()
                && files.iter().all(|f| {
                    spec.sha256.as_ref().is_none_or(|s| *s == f.sha256)
                        && spec.size.is_none_or(|s| s == f.size)
                        && std::fs::metadata(store.file_path(&entry.name, &f.path))
                            .is_ok_and(|m| m.is_file() && m.len() == f.size)
                });
            if intact {
                for f in files {
                    report.files_present += 1;
                    (ctx.progress)(ProgressEvent::FilePresent {
                        model: entry.name.clone(),
                        file: f.path.clone(),
                        size: f.size,
                    });
                }
            } else {
                pending.push((entry, spec));
            }
        }
    }

    // 2. Resolve sizes and hashes of what is missing.
    let mut jobs = Vec::new();
    for (entry, spec) in pending {
        jobs.extend(resolve(&ctx, &entry.name, spec).await?);
    }

    // 3. Free space, counting what partial downloads already hold.
    let mut needed = 0u64;
    for job in &jobs {
        if let Some(size) = job.size {
            let partial = partial_path(&store.file_path(&job.model, &job.rel_path));
            let have = std::fs::metadata(&partial).map(|m| m.len()).unwrap_or(0);
            // A preallocated partial file is sparse, so only resume state says what is real.
            let kept = load_state(&partial, job)
                .map(|s| s.done())
                .unwrap_or(0)
                .min(have);
            needed += size.saturating_sub(kept);
        }
    }
    (ctx.progress)(ProgressEvent::Plan {
        models: entries.iter().map(|e| e.name.clone()).collect(),
        files_present: report.files_present,
        files_to_download: jobs.len(),
        bytes_to_download: needed,
    });
    if needed > 0 {
        let available = match &options.free_space {
            Some(probe) => probe(store.root()),
            None => free_space(store.root()),
        }
        .map_err(io_err("cannot query free space of", store.root()))?;
        if available < needed {
            return Err(FetchError::InsufficientSpace {
                needed: HumanBytes(needed),
                available: HumanBytes(available),
                path: store.root().to_owned(),
            });
        }
    }

    // 4. Download, verify, publish.
    for job in &jobs {
        let stored = download_file(&ctx, store, job, &lock).await?;
        report.files_downloaded += 1;
        report.bytes_downloaded += stored.size;
    }
    for entry in entries {
        if let Some(path) = store.model_path(&entry.name) {
            (ctx.progress)(ProgressEvent::ModelReady {
                model: entry.name.clone(),
                path: path.display().to_string(),
            });
        }
    }
    (ctx.progress)(ProgressEvent::Done {
        files_downloaded: report.files_downloaded,
        bytes_downloaded: report.bytes_downloaded,
        seconds: started.elapsed().as_secs_f64(),
    });
    Ok(report)
}

/// [`fetch`] for callers without an async runtime (the CLI): runs it on a private one.
pub fn fetch_blocking(
    store: &Store,
    entries: &[ModelEntry],
    options: &FetchOptions,
    progress: impl Fn(ProgressEvent) + Send + Sync,
) -> Result<FetchReport, FetchError> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .map_err(|e| FetchError::Config(format!("cannot start the async runtime: {e}")))?;
    runtime.block_on(fetch(store, entries, options, progress))
}

async fn lock_store(store: &Store, ctx: &Ctx<'_>) -> Result<StoreLock, FetchError> {
    let mut told = false;
    loop {
        if let Some(lock) = store.try_lock()? {
            return Ok(lock);
        }
        if !told {
            (ctx.progress)(ProgressEvent::WaitingForLock {
                store: store.root().display().to_string(),
            });
            told = true;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
