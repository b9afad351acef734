//! The fetcher: brings catalog models into a [`Store`], robustly.
//!
//! Order of work for one call of [`fetch`]: take the store lock; skip every file the manifest
//! already lists as verified (no request at all); ask the hub (or the URL) for the size and
//! sha256 of the rest; check free space; download each file to `<file>.partial` with retries
//! (exponential backoff with full jitter, `Retry-After` honoured), resuming with `Range` from
//! what is already on disk and, for large files, over several ranged connections; verify the
//! sha256; rename into place; record it in the manifest.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use futures_util::StreamExt;
use reqwest::header::{HeaderMap, AUTHORIZATION, CONTENT_RANGE, RANGE, RETRY_AFTER};
use reqwest::StatusCode;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use tokio::sync::mpsc;

use crate::catalog::{check_relative_path, glob_matches, FileSource, ModelEntry};
use crate::direct::StreamWriter;
use crate::net::{build_clients, load_ca_bundle, ProxyConfig};
use crate::store::{hex, io_err, sha256_file, sync_dir, Store, StoreError, StoreLock, StoredFile};

/// Returns the free bytes on the filesystem holding a path.
pub type FreeSpaceProbe = Arc<dyn Fn(&Path) -> std::io::Result<u64> + Send + Sync>;

/// How to fetch. [`FetchOptions::from_env`] gives the defaults plus `HF_ENDPOINT`, `HF_TOKEN`
/// and the proxy variables.
#[derive(Clone)]
pub struct FetchOptions {
    /// Hugging Face endpoint (a mirror may be set with `HF_ENDPOINT`).
    pub hf_endpoint: String,
    /// Sent as `Authorization: Bearer` to the hub endpoint only (never to plain URLs; dropped
    /// on redirects to other hosts such as the CDN).
    pub hf_token: Option<String>,
    pub proxy: ProxyConfig,
    /// A PEM file of root certificates trusted besides the system's (`SDKUBE_CA_BUNDLE`): the CA
    /// of a TLS-inspecting corporate proxy, or of a mirror with a private certificate.
    pub ca_bundle: Option<PathBuf>,
    /// Parallel ranged connections for files of at least `ranged_min_size` bytes.
    pub connections: usize,
    pub ranged_min_size: u64,
    pub connect_timeout: Duration,
    /// A read that waits longer than this (a stalled server) is retried.
    pub read_timeout: Duration,
    /// Attempts allowed without any progress before giving up on a file.
    pub max_retries: u32,
    pub retry_base_delay: Duration,
    pub retry_max_delay: Duration,
    /// A server's `Retry-After` is honoured up to this long.
    pub retry_after_max: Duration,
    /// Minimum time between two `file_progress` events of one file.
    pub progress_interval: Duration,
    /// Replaces the filesystem's free-space query (tests; `None` = ask the OS).
    pub free_space: Option<FreeSpaceProbe>,
}

impl Default for FetchOptions {
    fn default() -> Self {
        FetchOptions {
            hf_endpoint: "https://huggingface.co".into(),
            hf_token: None,
            proxy: ProxyConfig::default(),
            ca_bundle: None,
            connections: 4,
            ranged_min_size: 64 << 20,
            connect_timeout: Duration::from_secs(10),
            read_timeout: Duration::from_secs(30),
            max_retries: 8,
            retry_base_delay: Duration::from_millis(500),
            retry_max_delay: Duration::from_secs(30),
            retry_after_max: Duration::from_secs(300),
            progress_interval: Duration::from_millis(500),
            free_space: None,
        }
    }
}

impl FetchOptions {
    /// Defaults, with `HF_ENDPOINT`, `HF_TOKEN` (or `HUGGING_FACE_HUB_TOKEN`),
    /// `SDKUBE_CA_BUNDLE` and the proxy variables taken from the environment.
    pub fn from_env() -> FetchOptions {
        let var = |k: &str| std::env::var(k).ok().filter(|v| !v.trim().is_empty());
        let mut options = FetchOptions {
            proxy: ProxyConfig::from_env(),
            hf_token: var("HF_TOKEN").or_else(|| var("HUGGING_FACE_HUB_TOKEN")),
            ca_bundle: var("SDKUBE_CA_BUNDLE").map(PathBuf::from),
            ..FetchOptions::default()
        };
        if let Some(endpoint) = var("HF_ENDPOINT") {
            options.hf_endpoint = endpoint;
        }
        options
    }
}

/// One step of a fetch, for progress bars, `--progress json` lines and the server's UI.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(tag = "event", rename_all = "snake_case")]
pub enum ProgressEvent {
    /// Another fetcher holds the store lock; this one waits.
    WaitingForLock {
        store: String,
    },
    /// What this run will do, after looking at the manifest and asking the servers.
    Plan {
        models: Vec<String>,
        files_present: usize,
        files_to_download: usize,
        /// Bytes still to transfer (sizes the servers did not tell are not counted).
        bytes_to_download: u64,
    },
    /// A verified file is already in the store; nothing was requested for it.
    FilePresent {
        model: String,
        file: String,
        size: u64,
    },
    FileStart {
        model: String,
        file: String,
        size: Option<u64>,
        /// Bytes kept from an earlier interrupted download.
        resumed_from: u64,
        connections: usize,
    },
    FileProgress {
        model: String,
        file: String,
        bytes: u64,
        size: Option<u64>,
        bytes_per_sec: f64,
    },
    Retry {
        model: String,
        file: String,
        attempt: u32,
        delay_ms: u64,
        reason: String,
    },
    FileDone {
        model: String,
        file: String,
        size: u64,
        sha256: String,
        seconds: f64,
    },
    ModelReady {
        model: String,
        path: String,
    },
    Done {
        files_downloaded: usize,
        bytes_downloaded: u64,
        seconds: f64,
    },
}

/// Why a fetch failed. Nothing partially downloaded or unverified is ever visible afterwards.
#[derive(Debug, thiserror::Error)]
pub enum FetchError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("{0}")]
    Config(String),
    #[error("needs {needed}, {available} free on {}", path.display())]
    InsufficientSpace {
        needed: HumanBytes,
        available: HumanBytes,
        path: PathBuf,
    },
    #[error("{url}: HTTP {status}: {hint}")]
    Denied {
        url: String,
        status: u16,
        hint: String,
    },
    #[error("{url}: HTTP {status}")]
    Http { url: String, status: u16 },
    #[error("{url}: gave up after {attempts} attempts without progress; last error: {last}")]
    GaveUp {
        url: String,
        attempts: u32,
        last: String,
    },
    #[error("{file}: sha256 is {actual}, expected {expected}; the download was discarded")]
    ChecksumMismatch {
        file: String,
        expected: String,
        actual: String,
    },
    #[error("{file}: {actual} bytes, expected {expected}; the download was discarded")]
    SizeMismatch {
        file: String,
        expected: u64,
        actual: u64,
    },
    #[error("{file}: the hub reports sha256 {hub} but the catalog expects {catalog}; the upstream file changed, update the catalog")]
    HubHashMismatch {
        file: String,
        hub: String,
        catalog: String,
    },
    #[error("{file}: the hub reports {hub} bytes but the catalog expects {catalog}; the upstream file changed, update the catalog")]
    HubSizeMismatch {
        file: String,
        hub: u64,
        catalog: u64,
    },
    #[error("{url}: {message}")]
    Protocol { url: String, message: String },
    #[error("{url}: the server's TLS certificate is not trusted ({detail}); behind a TLS-inspecting proxy or for a private mirror, set SDKUBE_CA_BUNDLE to a PEM file with its CA certificate")]
    UntrustedCertificate { url: String, detail: String },
    #[error("no file of {repo} matches {pattern:?}")]
    NoMatch { repo: String, pattern: String },
}

impl FetchError {
    /// True when the fix lies with the operator (configuration, credentials, disk space, the
    /// catalog) rather than with a flaky network or server: exit code 2 in the CLI.
    pub fn is_environment(&self) -> bool {
        matches!(
            self,
            FetchError::Store(_)
                | FetchError::Config(_)
                | FetchError::InsufficientSpace { .. }
                | FetchError::Denied { .. }
                | FetchError::HubHashMismatch { .. }
                | FetchError::HubSizeMismatch { .. }
                | FetchError::NoMatch { .. }
                | FetchError::UntrustedCertificate { .. }
        )
    }
}

/// Byte counts printed the way disk sizes are sold: "6.9 GB".
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HumanBytes(pub u64);

impl std::fmt::Display for HumanBytes {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let b = self.0 as f64;
        match self.0 {
            n if n >= 1_000_000_000 => write!(f, "{:.1} GB", b / 1e9),
            n if n >= 1_000_000 => write!(f, "{:.1} MB", b / 1e6),
            n if n >= 1_000 => write!(f, "{:.1} kB", b / 1e3),
            n => write!(f, "{n} B"),
        }
    }
}

/// What a successful [`fetch`] did.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct FetchReport {
    pub files_present: usize,
    pub files_downloaded: usize,
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
            None => fs4::available_space(store.root()),
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

// ---------------------------------------------------------------------------------------------
// Resolution: hub metadata and plain URLs.

fn encode_path(path: &str, keep_slash: bool) -> String {
    let mut out = String::with_capacity(path.len());
    for b in path.bytes() {
        if b.is_ascii_alphanumeric()
            || matches!(b, b'-' | b'.' | b'_' | b'~')
            || (keep_slash && b == b'/')
        {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

fn resolve_url(endpoint: &str, repo: &str, revision: &str, path: &str) -> String {
    format!(
        "{}/{}/resolve/{}/{}",
        endpoint.trim_end_matches('/'),
        repo,
        encode_path(revision, false),
        encode_path(path, true)
    )
}

/// A lower-case sha256 from an ETag-like header value, if it is one (quotes and `W/` removed).
fn sha256_from_etag(value: &str) -> Option<String> {
    let v = value
        .trim()
        .trim_start_matches("W/")
        .trim_matches('"')
        .to_ascii_lowercase();
    (v.len() == 64 && v.chars().all(|c| c.is_ascii_hexdigit())).then_some(v)
}

fn header_str<'h>(headers: &'h HeaderMap, name: &str) -> Option<&'h str> {
    headers.get(name).and_then(|v| v.to_str().ok())
}

async fn resolve(
    ctx: &Ctx<'_>,
    model: &str,
    spec: &crate::FileSpec,
) -> Result<Vec<FileJob>, FetchError> {
    let endpoint = &ctx.options.hf_endpoint;
    match &spec.source {
        FileSource::Hub {
            repo,
            revision,
            path,
        } => {
            let url = resolve_url(endpoint, repo, revision, path);
            let (size, sha) = hub_head(ctx, &url).await?;
            let sha256 = match (&spec.sha256, sha) {
                (Some(expected), Some(hub)) if *expected != hub => {
                    return Err(FetchError::HubHashMismatch {
                        file: format!("{model}/{path}"),
                        hub,
                        catalog: expected.clone(),
                    })
                }
                (Some(expected), _) => Some(expected.clone()),
                (None, hub) => hub,
            };
            if let (Some(expected), Some(hub)) = (spec.size, size) {
                if expected != hub {
                    return Err(FetchError::HubSizeMismatch {
                        file: format!("{model}/{path}"),
                        hub,
                        catalog: expected,
                    });
                }
            }
            let size = spec.size.or(size);
            Ok(vec![FileJob {
                model: model.to_owned(),
                rel_path: path.clone(),
                url,
                hub_auth: true,
                size,
                sha256,
                source_key: spec.source.key(),
            }])
        }
        FileSource::HubPattern {
            repo,
            revision,
            pattern,
        } => {
            let listing = hub_tree(ctx, repo, revision).await?;
            let jobs: Vec<FileJob> = listing
                .into_iter()
                .filter(|e| e.kind == "file" && glob_matches(pattern, &e.path))
                .map(|e| {
                    check_relative_path(&e.path).map_err(|message| FetchError::Protocol {
                        url: format!("{endpoint}/api/models/{repo}"),
                        message,
                    })?;
                    let sha256 = e.lfs.as_ref().and_then(|l| sha256_from_etag(&l.oid));
                    let size = e.lfs.as_ref().map(|l| l.size).or(e.size);
                    Ok(FileJob {
                        model: model.to_owned(),
                        url: resolve_url(endpoint, repo, revision, &e.path),
                        rel_path: e.path,
                        hub_auth: true,
                        size,
                        sha256,
                        source_key: spec.source.key(),
                    })
                })
                .collect::<Result<_, FetchError>>()?;
            if jobs.is_empty() {
                return Err(FetchError::NoMatch {
                    repo: repo.clone(),
                    pattern: pattern.clone(),
                });
            }
            Ok(jobs)
        }
        FileSource::Url { url, file_name } => {
            let size = match spec.size {
                Some(size) => Some(size),
                // Only for the free-space check; servers that refuse HEAD are fine.
                None => ctx
                    .client
                    .head(url)
                    .send()
                    .await
                    .ok()
                    .filter(|r| r.status().is_success())
                    .and_then(|r| header_str(r.headers(), "content-length")?.parse().ok()),
            };
            Ok(vec![FileJob {
                model: model.to_owned(),
                rel_path: file_name.clone(),
                url: url.clone(),
                hub_auth: false,
                size,
                sha256: spec.sha256.clone(),
                source_key: spec.source.key(),
            }])
        }
    }
}

/// HEAD on a resolve URL without following the redirect: LFS files answer with a redirect
/// carrying `X-Linked-Etag` (the sha256) and `X-Linked-Size`; small files answer 200.
async fn hub_head(ctx: &Ctx<'_>, url: &str) -> Result<(Option<u64>, Option<String>), FetchError> {
    let response = send_with_retry(ctx, url, None, || {
        with_auth(ctx, ctx.client_no_redirect.head(url), true)
    })
    .await?;
    let headers = response.headers();
    let linked_size = header_str(headers, "x-linked-size").and_then(|v| v.parse().ok());
    let size = linked_size.or_else(|| {
        if response.status().is_success() {
            header_str(headers, "content-length").and_then(|v| v.parse().ok())
        } else {
            None
        }
    });
    let sha = header_str(headers, "x-linked-etag")
        .and_then(sha256_from_etag)
        .or_else(|| header_str(headers, "etag").and_then(sha256_from_etag));
    Ok((size, sha))
}

#[derive(Deserialize)]
struct TreeEntry {
    #[serde(rename = "type")]
    kind: String,
    path: String,
    size: Option<u64>,
    lfs: Option<TreeLfs>,
}

#[derive(Deserialize)]
struct TreeLfs {
    oid: String,
    size: u64,
}

/// The hub's recursive file listing, following `Link: <…>; rel="next"` pages.
async fn hub_tree(ctx: &Ctx<'_>, repo: &str, revision: &str) -> Result<Vec<TreeEntry>, FetchError> {
    let mut url = format!(
        "{}/api/models/{}/tree/{}?recursive=true",
        ctx.options.hf_endpoint.trim_end_matches('/'),
        repo,
        encode_path(revision, false)
    );
    let mut entries = Vec::new();
    for _page in 0..1000 {
        let response = send_with_retry(ctx, &url, None, || {
            with_auth(ctx, ctx.client.get(&url), true)
        })
        .await?;
        let next = header_str(response.headers(), "link").and_then(next_link);
        let body = response.bytes().await.map_err(|e| FetchError::Protocol {
            url: url.clone(),
            message: format!("reading listing: {e}"),
        })?;
        let page: Vec<TreeEntry> =
            serde_json::from_slice(&body).map_err(|e| FetchError::Protocol {
                url: url.clone(),
                message: format!("listing is not the expected JSON: {e}"),
            })?;
        entries.extend(page);
        match next {
            Some(next) => url = next,
            None => return Ok(entries),
        }
    }
    Err(FetchError::Protocol {
        url,
        message: "listing has more than 1000 pages".into(),
    })
}

fn next_link(link: &str) -> Option<String> {
    link.split(',').find_map(|part| {
        let (target, params) = part.split_once(';')?;
        params.contains("rel=\"next\"").then(|| {
            target
                .trim()
                .trim_start_matches('<')
                .trim_end_matches('>')
                .to_owned()
        })
    })
}

fn with_auth(
    ctx: &Ctx<'_>,
    request: reqwest::RequestBuilder,
    hub: bool,
) -> reqwest::RequestBuilder {
    match (&ctx.options.hf_token, hub) {
        (Some(token), true) => request.header(AUTHORIZATION, format!("Bearer {token}")),
        _ => request,
    }
}

// ---------------------------------------------------------------------------------------------
// Retries.

/// Backoff state for one request stream (a file's metadata, or one download range).
struct Retrier {
    attempts: u32,
}

impl Retrier {
    /// Waits before the next attempt, or says to give up.
    async fn wait(
        &mut self,
        ctx: &Ctx<'_>,
        file: Option<(&str, &str)>,
        url: &str,
        reason: String,
        retry_after: Option<Duration>,
    ) -> Result<(), FetchError> {
        self.attempts += 1;
        if self.attempts > ctx.options.max_retries {
            return Err(FetchError::GaveUp {
                url: url.to_owned(),
                attempts: self.attempts,
                last: reason,
            });
        }
        let o = ctx.options;
        let cap = o
            .retry_base_delay
            .saturating_mul(1 << (self.attempts - 1).min(20))
            .min(o.retry_max_delay);
        let jittered = cap.mul_f64(rand::random::<f64>());
        let delay = match retry_after {
            Some(after) => after.min(o.retry_after_max),
            None => jittered,
        };
        let (model, file) = file.unwrap_or(("", url));
        (ctx.progress)(ProgressEvent::Retry {
            model: model.to_owned(),
            file: file.to_owned(),
            attempt: self.attempts,
            delay_ms: delay.as_millis() as u64,
            reason,
        });
        tokio::time::sleep(delay).await;
        Ok(())
    }

    fn progressed(&mut self) {
        self.attempts = 0;
    }
}

fn retry_after(headers: &HeaderMap) -> Option<Duration> {
    let value = headers.get(RETRY_AFTER)?.to_str().ok()?.trim();
    if let Ok(seconds) = value.parse::<u64>() {
        return Some(Duration::from_secs(seconds));
    }
    let when = httpdate::parse_http_date(value).ok()?;
    Some(
        when.duration_since(SystemTime::now())
            .unwrap_or(Duration::ZERO),
    )
}

fn is_transient(status: StatusCode) -> bool {
    status.is_server_error()
        || status == StatusCode::TOO_MANY_REQUESTS
        || status == StatusCode::REQUEST_TIMEOUT
}

/// Sends a request until it gets a non-transient answer. Redirects (from the non-following
/// client) and 2xx come back; 4xx become errors saying what to do.
async fn send_with_retry(
    ctx: &Ctx<'_>,
    url: &str,
    file: Option<(&str, &str)>,
    build: impl Fn() -> reqwest::RequestBuilder,
) -> Result<reqwest::Response, FetchError> {
    let mut retrier = Retrier { attempts: 0 };
    loop {
        match build().send().await {
            Ok(response) if is_transient(response.status()) => {
                let after = retry_after(response.headers());
                let reason = format!("HTTP {}", response.status().as_u16());
                retrier.wait(ctx, file, url, reason, after).await?;
            }
            Ok(response) => return check_status(ctx, url, response),
            Err(e) => {
                if let Some(detail) = untrusted_certificate(&e) {
                    return Err(FetchError::UntrustedCertificate {
                        url: url.to_owned(),
                        detail,
                    });
                }
                let reason = error_chain(&e);
                retrier.wait(ctx, file, url, reason, None).await?;
            }
        }
    }
}

fn check_status(
    ctx: &Ctx<'_>,
    url: &str,
    response: reqwest::Response,
) -> Result<reqwest::Response, FetchError> {
    let status = response.status();
    if status.is_success() || status.is_redirection() {
        return Ok(response);
    }
    let code = status.as_u16();
    let hint = match code {
        401 | 403 if ctx.options.hf_token.is_none() => {
            "the repository is gated or private: accept its license on the hub and set HF_TOKEN"
                .to_owned()
        }
        401 | 403 => {
            "HF_TOKEN was sent but refused: check the token and that it may read this repository"
                .to_owned()
        }
        404 => "not found: check the repository, revision and path (or HF_ENDPOINT)".to_owned(),
        _ => {
            return Err(FetchError::Http {
                url: url.to_owned(),
                status: code,
            })
        }
    };
    Err(FetchError::Denied {
        url: url.to_owned(),
        status: code,
        hint,
    })
}

/// The rustls certificate error somewhere in an error's chain, as text: retrying cannot help,
/// only trusting the right CA can. (`io::Error` hides a wrapped error from `source()`, hence
/// `get_ref`.)
fn untrusted_certificate(e: &(dyn std::error::Error + 'static)) -> Option<String> {
    let mut next = Some(e);
    while let Some(e) = next {
        let inner = e
            .downcast_ref::<std::io::Error>()
            .and_then(|io| io.get_ref())
            .map(|i| i as &(dyn std::error::Error + 'static));
        for candidate in [Some(e), inner].into_iter().flatten() {
            if let Some(err @ rustls::Error::InvalidCertificate(_)) =
                candidate.downcast_ref::<rustls::Error>()
            {
                return Some(err.to_string());
            }
        }
        next = e.source();
    }
    None
}

fn error_chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        text.push_str(": ");
        text.push_str(&s.to_string());
        source = s.source();
    }
    text
}

// ---------------------------------------------------------------------------------------------
// Downloading one file.

fn partial_path(final_path: &Path) -> PathBuf {
    let mut name = final_path.as_os_str().to_owned();
    name.push(".partial");
    PathBuf::from(name)
}

fn state_path(partial: &Path) -> PathBuf {
    let mut name = partial.as_os_str().to_owned();
    name.push(".json");
    PathBuf::from(name)
}

/// What survives an interrupted download, next to the partial file.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct ResumeState {
    url: String,
    size: Option<u64>,
    sha256: Option<String>,
    chunks: Vec<ChunkState>,
}

#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
struct ChunkState {
    start: u64,
    /// Exclusive; `None` when the file size is unknown (single chunk to the end).
    end: Option<u64>,
    /// Bytes written (and flushed before this state was saved) from `start`.
    done: u64,
}

impl ResumeState {
    fn done(&self) -> u64 {
        self.chunks.iter().map(|c| c.done).sum()
    }
}

fn load_state(partial: &Path, job: &FileJob) -> Option<ResumeState> {
    let bytes = std::fs::read(state_path(partial)).ok()?;
    let state: ResumeState = serde_json::from_slice(&bytes).ok()?;
    let valid = state.url == job.url
        && state.size == job.size
        && state.sha256 == job.sha256
        && !state.chunks.is_empty()
        && state
            .chunks
            .iter()
            .all(|c| c.end.is_none_or(|end| c.start + c.done <= end));
    valid.then_some(state)
}

/// A ranged download is cut into up to this many pieces per connection, of at least
/// [`MIN_PIECE`] bytes. The connections take the pieces in file order, so the complete prefix
/// of the file, which is all that can be hashed yet, grows at the speed of all connections
/// together and the hash ends a piece or so after the last byte arrives.
const PIECES_PER_CONNECTION: u64 = 8;
const MIN_PIECE: u64 = 8 << 20;

fn plan_chunks(size: Option<u64>, connections: usize, ranged_min_size: u64) -> Vec<ChunkState> {
    match size {
        Some(size) if connections > 1 && size >= ranged_min_size.max(connections as u64) => {
            let per_connection =
                (size / (connections as u64 * MIN_PIECE)).clamp(1, PIECES_PER_CONNECTION);
            let n = connections as u64 * per_connection;
            (0..n)
                .map(|i| ChunkState {
                    start: size * i / n,
                    end: Some(size * (i + 1) / n),
                    done: 0,
                })
                .collect()
        }
        _ => vec![ChunkState {
            start: 0,
            end: size,
            done: 0,
        }],
    }
}

/// How often (in bytes written) the partial file is flushed and resume state saved. The flush
/// runs beside the download ([`Checkpointer`]); flushing often keeps the final fsync, which
/// the download does wait for, short.
const SAVE_EVERY: u64 = 64 << 20;

enum WriteOp {
    Data {
        chunk: usize,
        offset: u64,
        bytes: bytes::Bytes,
    },
    /// The server ignored our Range: the single chunk starts over from byte 0.
    Restart,
}

fn save_state(path: &Path, state: &ResumeState) -> std::io::Result<()> {
    let tmp = {
        let mut name = path.as_os_str().to_owned();
        name.push(".tmp");
        PathBuf::from(name)
    };
    std::fs::write(
        &tmp,
        serde_json::to_vec(state).map_err(std::io::Error::other)?,
    )?;
    std::fs::rename(&tmp, path)
}

fn thread_panicked(what: &str) -> std::io::Error {
    std::io::Error::other(format!("the {what} thread panicked"))
}

/// Flushes the partial file and then saves resume state, on its own thread so that a slow
/// disk never holds up the download. A state is queued only after the bytes it claims were
/// written, and the flush starts after it is queued, so a saved state never claims bytes that
/// are not on disk.
struct Checkpointer {
    queue: Option<std::sync::mpsc::SyncSender<ResumeState>>,
    thread: Option<std::thread::JoinHandle<std::io::Result<()>>>,
}

impl Checkpointer {
    fn spawn(file: &std::fs::File, state_file: &Path) -> std::io::Result<Checkpointer> {
        let file = file.try_clone()?;
        let state_file = state_file.to_owned();
        // One state waiting at most: a disk slower than the network slows the download down
        // instead of queueing memory.
        let (queue, states) = std::sync::mpsc::sync_channel::<ResumeState>(1);
        let thread = std::thread::Builder::new()
            .name("sdkube-fetch-fsync".into())
            .spawn(move || {
                for state in states {
                    file.sync_data()?;
                    save_state(&state_file, &state)?;
                }
                Ok(())
            })?;
        Ok(Checkpointer {
            queue: Some(queue),
            thread: Some(thread),
        })
    }

    /// Queues a checkpoint. A failed flush stops the thread; [`Checkpointer::finish`] says why.
    fn save(&self, state: ResumeState) {
        if let Some(queue) = &self.queue {
            let _ = queue.send(state);
        }
    }

    /// Waits for every queued checkpoint; the first error, if any.
    fn finish(mut self) -> std::io::Result<()> {
        drop(self.queue.take());
        match self.thread.take() {
            Some(thread) => thread.join().map_err(|_| thread_panicked("fsync"))?,
            None => Ok(()),
        }
    }
}

impl Drop for Checkpointer {
    fn drop(&mut self) {
        drop(self.queue.take());
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

enum HashOp {
    /// The next bytes of the file, in order (a single stream hands its chunks over).
    Data(bytes::Bytes),
    /// The file is complete up to this offset: hash what is not hashed yet, read back from the
    /// file (ranged downloads, whose pieces arrive out of order; the pages are still cached).
    UpTo(u64),
    /// Start over from byte 0.
    Restart,
}

/// SHA-256 of the file computed in file order on its own thread, while the download runs:
/// hashing costs about as much CPU as receiving and writing together, so doing it beside the
/// writes (instead of between them, or after the download) is what lets one stream keep up
/// with curl and spares ranged downloads a second pass over the file.
struct OrderedHasher {
    queue: Option<std::sync::mpsc::SyncSender<HashOp>>,
    thread: Option<std::thread::JoinHandle<std::io::Result<(Sha256, u64)>>>,
}

impl OrderedHasher {
    /// Continues `hasher`, which has hashed the first `hashed` bytes of `file`.
    fn spawn(
        file: &std::fs::File,
        mut hasher: Sha256,
        mut hashed: u64,
    ) -> std::io::Result<OrderedHasher> {
        use std::os::unix::fs::FileExt;
        let file = file.try_clone()?;
        // Chunks are a few hundred kB: a short queue is enough to keep both threads busy.
        let (queue, ops) = std::sync::mpsc::sync_channel::<HashOp>(16);
        let thread = std::thread::Builder::new()
            .name("sdkube-fetch-sha256".into())
            .spawn(move || {
                let mut buf = Vec::new();
                for op in ops {
                    match op {
                        HashOp::Data(bytes) => {
                            hasher.update(&bytes);
                            hashed += bytes.len() as u64;
                        }
                        HashOp::UpTo(end) => {
                            buf.resize(1 << 20, 0);
                            while hashed < end {
                                let n = (end - hashed).min(buf.len() as u64) as usize;
                                file.read_exact_at(&mut buf[..n], hashed)?;
                                hasher.update(&buf[..n]);
                                hashed += n as u64;
                            }
                        }
                        HashOp::Restart => {
                            hasher = Sha256::new();
                            hashed = 0;
                        }
                    }
                }
                Ok((hasher, hashed))
            })?;
        Ok(OrderedHasher {
            queue: Some(queue),
            thread: Some(thread),
        })
    }

    /// Queues work. A failed read stops the thread; [`OrderedHasher::finish`] says why.
    fn send(&self, op: HashOp) {
        if let Some(queue) = &self.queue {
            let _ = queue.send(op);
        }
    }

    /// The hash and how many bytes from the start of the file it covers.
    fn finish(mut self) -> std::io::Result<(Sha256, u64)> {
        drop(self.queue.take());
        self.thread
            .take()
            .ok_or_else(|| thread_panicked("sha256"))?
            .join()
            .map_err(|_| thread_panicked("sha256"))?
    }
}

impl Drop for OrderedHasher {
    fn drop(&mut self) {
        drop(self.queue.take());
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// Where the complete prefix of the file ends: chunks are contiguous and in file order.
fn complete_prefix(state: &ResumeState) -> u64 {
    let mut end = 0;
    for chunk in &state.chunks {
        if chunk.start != end {
            break;
        }
        end = chunk.start + chunk.done;
        if chunk.end != Some(end) {
            break;
        }
    }
    end
}

/// A ranged download tells the hasher about its complete prefix in steps of at least this.
const HASH_STEP: u64 = 8 << 20;

/// The blocking half of a download: the writes (a single stream's through [`StreamWriter`],
/// ranged pieces positional), the hash in file order ([`OrderedHasher`]), and resume state
/// that only ever claims bytes already flushed to the partial file ([`Checkpointer`], every
/// `checkpoint_every` bytes). The hash comes back when it covers the whole file.
fn run_writer(
    file: std::fs::File,
    partial: &Path,
    single: bool,
    mut state: ResumeState,
    mut rx: mpsc::Receiver<WriteOp>,
    checkpoint_every: u64,
) -> std::io::Result<(Option<Sha256>, ResumeState)> {
    use std::io::Read;
    use std::os::unix::fs::FileExt;
    let state_file = state_path(partial);
    let mut stream = None;
    let hasher = if single {
        // Hash what an earlier run already wrote, so the stream's hash covers the whole file.
        let mut h = Sha256::new();
        let kept = state.chunks[0].done;
        let mut reader = std::io::BufReader::with_capacity(1 << 20, (&file).take(kept));
        let copied = std::io::copy(&mut reader, &mut HashWriter(&mut h))?;
        if copied != kept {
            return Err(std::io::Error::other(
                "partial file is shorter than its resume state",
            ));
        }
        // Staging no more than a checkpoint's worth lets every checkpoint claim recent bytes.
        stream = Some(StreamWriter::new(&file, partial, kept, checkpoint_every)?);
        OrderedHasher::spawn(&file, h, kept)?
    } else {
        OrderedHasher::spawn(&file, Sha256::new(), 0)?
    };
    let mut told_prefix = 0u64;
    let mut tell_prefix = |state: &ResumeState, force: bool| {
        let prefix = complete_prefix(state);
        if prefix > told_prefix && (force || prefix >= told_prefix + HASH_STEP) {
            hasher.send(HashOp::UpTo(prefix));
            told_prefix = prefix;
        }
    };
    if !single {
        tell_prefix(&state, true);
    }
    let mut checkpoints = Checkpointer::spawn(&file, &state_file)?;
    let mut unsaved = 0u64;
    while let Some(op) = rx.blocking_recv() {
        match op {
            WriteOp::Data {
                chunk,
                offset,
                bytes,
            } => {
                let n = bytes.len() as u64;
                match &mut stream {
                    Some(stream) => {
                        if offset != stream.end() {
                            return Err(std::io::Error::other("single-stream write out of order"));
                        }
                        stream.write(&bytes)?;
                        hasher.send(HashOp::Data(bytes));
                        // Only what left the stage is in the file.
                        let written = stream.written();
                        unsaved += written - state.chunks[0].done;
                        state.chunks[0].done = written;
                    }
                    None => {
                        file.write_all_at(&bytes, offset)?;
                        state.chunks[chunk].done += n;
                        tell_prefix(&state, false);
                        unsaved += n;
                    }
                }
                if unsaved >= checkpoint_every {
                    checkpoints.save(state.clone());
                    unsaved = 0;
                }
            }
            WriteOp::Restart => {
                // Let queued checkpoints land before the file shrinks under them.
                checkpoints.finish()?;
                hasher.send(HashOp::Restart);
                state.chunks[0].done = 0;
                if let Some(stream) = &mut stream {
                    stream.restart_at(0)?;
                }
                if state.size.is_none() {
                    file.set_len(0)?;
                }
                save_state(&state_file, &state)?;
                unsaved = 0;
                checkpoints = Checkpointer::spawn(&file, &state_file)?;
            }
        }
    }
    if let Some(stream) = &mut stream {
        stream.finish()?;
        state.chunks[0].done = stream.written();
    }
    if !single {
        tell_prefix(&state, true);
    }
    checkpoints.finish()?;
    if state.size.is_none() {
        file.set_len(state.chunks[0].done)?;
    }
    file.sync_data()?;
    save_state(&state_file, &state)?;
    let (hash, hashed) = hasher.finish()?;
    let whole = hashed == state.done() && state.size.is_none_or(|size| size == hashed);
    Ok((whole.then_some(hash), state))
}

struct HashWriter<'a>(&'a mut Sha256);

impl std::io::Write for HashWriter<'_> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.update(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

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

async fn download_file(
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chunks_cover_the_file_exactly() {
        for (size, pieces) in [
            (64u64 << 20, 8),
            ((64 << 20) + 7, 8),
            (100 << 20, 12),
            (1 << 31, 32),
        ] {
            let chunks = plan_chunks(Some(size), 4, 64 << 20);
            assert_eq!(chunks.len(), pieces, "{size}");
            assert_eq!(chunks[0].start, 0);
            assert_eq!(chunks[pieces - 1].end, Some(size));
            for pair in chunks.windows(2) {
                assert_eq!(pair[0].end, Some(pair[1].start));
            }
        }
        assert_eq!(plan_chunks(Some(1000), 4, 64 << 20).len(), 1);
        assert_eq!(plan_chunks(None, 4, 0).len(), 1);
    }

    /// The writer's own threads: in-order hashing across a restart, a checkpoint saved while
    /// the download still runs (claiming only bytes already in the file), the final state.
    #[test]
    fn writer_hashes_in_order_checkpoints_on_the_way_and_restarts() {
        let dir = tempfile::tempdir().unwrap();
        let partial = dir.path().join("f.partial");
        let file = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .read(true)
            .write(true)
            .open(&partial)
            .unwrap();
        let data: Vec<u8> = (0..100_000u32).map(|i| (i * 7 % 251) as u8).collect();
        let state = ResumeState {
            url: "http://x/f".into(),
            size: None,
            sha256: None,
            chunks: plan_chunks(None, 1, 0),
        };
        let state_file = state_path(&partial);
        let (tx, rx) = mpsc::channel(4);
        let writer = std::thread::spawn({
            let partial = partial.clone();
            move || run_writer(file, &partial, true, state, rx, 10_000)
        });
        let send = |offset: usize, bytes: &[u8]| {
            tx.blocking_send(WriteOp::Data {
                chunk: 0,
                offset: offset as u64,
                bytes: bytes::Bytes::copy_from_slice(bytes),
            })
            .unwrap()
        };
        // A server that ignored our Range: what came first is thrown away, hash included.
        // Less than one checkpoint's worth, so every checkpoint the test can read below was
        // saved after the restart (a larger prefix raced the poll: CI once read a checkpoint
        // of the thrown-away bytes).
        send(0, &[0xAA; 9_000]);
        tx.blocking_send(WriteOp::Restart).unwrap();
        let pieces: Vec<&[u8]> = data.chunks(7_000).collect();
        for (i, piece) in pieces[..3].iter().enumerate() {
            send(i * 7_000, piece);
        }
        // 21 000 bytes written, checkpoint every 10 000: one lands while the writer waits.
        let deadline = Instant::now() + Duration::from_secs(10);
        let saved = loop {
            let saved = std::fs::read(&state_file)
                .ok()
                .and_then(|b| serde_json::from_slice::<ResumeState>(&b).ok());
            match saved {
                Some(s) if s.done() > 0 => break s,
                _ if Instant::now() > deadline => panic!("no checkpoint was saved"),
                _ => std::thread::sleep(Duration::from_millis(10)),
            }
        };
        let claimed = saved.done() as usize;
        assert!((10_000..=21_000).contains(&claimed), "{claimed}");
        assert_eq!(std::fs::read(&partial).unwrap()[..claimed], data[..claimed]);
        for (i, piece) in pieces.iter().enumerate().skip(3) {
            send(i * 7_000, piece);
        }
        drop(tx);
        let (hasher, state) = writer.join().unwrap().unwrap();
        assert_eq!(
            hex(&hasher.unwrap().finalize()),
            hex(&Sha256::digest(&data))
        );
        assert_eq!(state.done(), data.len() as u64);
        assert_eq!(std::fs::read(&partial).unwrap(), data);
        let saved: ResumeState =
            serde_json::from_slice(&std::fs::read(&state_file).unwrap()).unwrap();
        assert_eq!(saved, state);
    }

    /// Ranged pieces arrive out of order; the hash still comes out of the writer, read back in
    /// file order, including a piece an earlier run had already finished.
    #[test]
    fn writer_hashes_ranged_pieces_in_file_order() {
        let dir = tempfile::tempdir().unwrap();
        let partial = dir.path().join("f.partial");
        let data: Vec<u8> = (0..100_000u32).map(|i| (i * 13 % 253) as u8).collect();
        let mut kept = data[..25_000].to_vec();
        kept.resize(data.len(), 0); // preallocated file: only the first piece is real
        std::fs::write(&partial, &kept).unwrap();
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(&partial)
            .unwrap();
        let mut chunks = plan_chunks(Some(100_000), 4, 0);
        assert_eq!(chunks.len(), 4);
        chunks[0].done = 25_000;
        let state = ResumeState {
            url: "http://x/f".into(),
            size: Some(100_000),
            sha256: None,
            chunks,
        };
        let (tx, rx) = mpsc::channel(4);
        let writer = std::thread::spawn({
            let partial = partial.clone();
            move || run_writer(file, &partial, false, state, rx, 10_000)
        });
        for chunk in [3usize, 1, 2] {
            for offset in (chunk * 25_000..(chunk + 1) * 25_000).step_by(5_000) {
                tx.blocking_send(WriteOp::Data {
                    chunk,
                    offset: offset as u64,
                    bytes: bytes::Bytes::copy_from_slice(&data[offset..offset + 5_000]),
                })
                .unwrap();
            }
        }
        drop(tx);
        let (hasher, state) = writer.join().unwrap().unwrap();
        assert_eq!(state.done(), 100_000);
        assert_eq!(std::fs::read(&partial).unwrap(), data);
        assert_eq!(
            hex(&hasher.expect("the hash covers the file").finalize()),
            hex(&Sha256::digest(&data))
        );
    }

    #[test]
    fn header_parsing() {
        let sha = "a".repeat(64);
        assert_eq!(sha256_from_etag(&format!("\"{sha}\"")), Some(sha.clone()));
        assert_eq!(
            sha256_from_etag(&format!("W/\"{}\"", sha.to_uppercase())),
            Some(sha)
        );
        assert_eq!(sha256_from_etag("\"0123abcd\""), None);
        assert_eq!(
            next_link("<https://h/api/x?cursor=2>; rel=\"next\""),
            Some("https://h/api/x?cursor=2".into())
        );
        assert_eq!(next_link("<https://h/a>; rel=\"prev\""), None);
        let mut headers = HeaderMap::new();
        headers.insert(RETRY_AFTER, "3".parse().unwrap());
        assert_eq!(retry_after(&headers), Some(Duration::from_secs(3)));
        let later = httpdate::fmt_http_date(SystemTime::now() + Duration::from_secs(60));
        headers.insert(RETRY_AFTER, later.parse().unwrap());
        let d = retry_after(&headers).unwrap();
        assert!(
            d > Duration::from_secs(55) && d <= Duration::from_secs(60),
            "{d:?}"
        );
        assert_eq!(
            resolve_url("https://hf.co/", "a/b", "refs/pr/1", "dir/my file.bin"),
            "https://hf.co/a/b/resolve/refs%2Fpr%2F1/dir/my%20file.bin"
        );
        assert_eq!(HumanBytes(6_900_000_000).to_string(), "6.9 GB");
        assert_eq!(HumanBytes(1_234_567).to_string(), "1.2 MB");
    }
}
