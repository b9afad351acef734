//! `sdkube serve`: the HTTP server. One process serves the embedded web UI, the
//! AUTOMATIC1111-compatible API (`/sdapi/v1`), an OpenAI-style images API, the native jobs
//! API with live events (`/api/v1`), `/openapi.json`, health probes and Prometheus metrics.
//!
//! Every API turns a request into a job (`requests::JobSpec`) on a queue
//! (`queue::JobQueue`): in memory for one process, or in Redis shared by `api` replicas
//! (no GPU, any replica answers any job) and `worker` replicas (one per GPU). One
//! `worker::Worker` thread per device takes jobs (batching compatible ones) and runs the
//! pipeline off the async runtime.

mod a1111;
mod app;
mod auth;
mod cluster;
mod config;
mod error;
mod gallery;
mod job;
mod listen;
mod metrics;
mod model;
mod native;
mod openai;
mod operations;
mod post;
mod queue;
mod redis;
mod requests;
mod state;
mod ui;
mod work;
mod worker;

use std::sync::atomic::Ordering;
use std::sync::Mutex;
use std::time::Duration;

pub use a1111::png_info::parse_infotext;
pub use app::router;
pub use auth::AuthConfig;
pub use config::{Config, Role, SharedQueue};
pub use gallery::FolderGallery;
pub use listen::{serve_connections, ConnectionLimits};
pub use model::ModelSources;
pub use post::PostModels;
pub use redis::redact;
pub use state::{AppState, Shared};

/// Locks a mutex; a worker that panicked mid-update leaves plain data behind, so poisoning
/// is ignored and the server keeps serving.
pub(crate) fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// How often a worker of a shared queue reports itself.
const REPORT_EVERY: Duration = Duration::from_secs(2);

/// Starts what runs beside the HTTP server: the model selection and one worker thread per
/// device (`all` and `worker` roles), and a worker's reports to the shared queue. Returns
/// the worker threads.
pub fn start(state: &AppState) -> anyhow::Result<Vec<std::thread::JoinHandle<()>>> {
    let mut handles = Vec::new();
    if !state.config.role.runs_jobs() {
        return Ok(handles);
    }
    state
        .model
        .select(&state.config.model, true)
        .map_err(anyhow::Error::msg)?;
    for (i, device) in state.config.devices.iter().enumerate() {
        let w = worker::Worker::new(
            state.clone(),
            device.clone(),
            state.config.dtype,
            state.config.vram,
        );
        handles.push(
            std::thread::Builder::new()
                .name(format!("sdkube-worker-{i}"))
                .spawn(move || w.run())?,
        );
    }
    if state.config.role == Role::Worker {
        let state = state.clone();
        tokio::spawn(async move { report_while_running(state).await });
    }
    Ok(handles)
}

/// A worker's report (model, lists, load) every [`REPORT_EVERY`] until it stops; the
/// embeddings and LoRAs (folder scans) every fifth time.
async fn report_while_running(state: AppState) {
    let (mut embeddings, mut loras) = (None, None);
    let mut n = 0u64;
    while !state.queue.is_shutting_down() {
        let me = state.clone();
        let fresh = n.is_multiple_of(5);
        if let Ok(mut report) = tokio::task::spawn_blocking(move || me.local_report(fresh)).await {
            if fresh {
                embeddings = report.embeddings.clone();
                loras = report.loras.clone();
            } else {
                report.embeddings = embeddings.clone();
                report.loras = loras.clone();
            }
            if let Err(e) = state.cluster.report(&report).await {
                tracing::warn!(error = %e, "cannot report to the shared queue");
            }
        }
        n += 1;
        tokio::time::sleep(REPORT_EVERY).await;
    }
    let _ = state.cluster.forget(&state.process_id).await;
}

/// Runs the server until SIGTERM / Ctrl-C, then shuts down gracefully: no new jobs; running
/// jobs get `shutdown_grace` to finish and are then cancelled (one process) or handed back
/// to the shared queue for another worker. Queued jobs fail with a clear message in one
/// process, and stay queued for the other workers with a shared queue.
pub async fn serve(config: Config) -> anyhow::Result<()> {
    let listen = config.listen;
    let state = Shared::connect(config).await?;
    // Prompt checks count tokens: an api replica (no engine to build the tokenizer while its
    // model loads) builds it now rather than in its first request.
    std::thread::spawn(|| sdkube_pipeline::tokenizer::ClipTokenizer::shared().map(drop));
    let workers = start(&state)?;
    let app = router(state.clone());
    let listener = tokio::net::TcpListener::bind(listen)
        .await
        .map_err(|e| anyhow::anyhow!("cannot listen on {listen}: {e}"))?;
    tracing::info!(
        address = %listener.local_addr()?,
        role = state.config.role.name(),
        queue = state.queue.backend(),
        "sdkube serving"
    );
    let drain = state.clone();
    let shutdown = async move {
        shutdown_signal().await;
        tracing::info!("shutting down: finishing running jobs");
        drain.queue.shut_down();
        let grace = drain.config.shutdown_grace;
        let shared = drain.config.shared.is_some();
        std::thread::spawn(move || {
            let deadline = std::time::Instant::now() + grace;
            while !drain.queue.local_running().is_empty() {
                if std::time::Instant::now() > deadline {
                    tracing::warn!(
                        "grace period over: {} running jobs",
                        if shared { "handing back" } else { "cancelling" }
                    );
                    for j in drain.queue.local_running() {
                        let flag = if shared { &j.release } else { &j.cancel };
                        flag.store(true, Ordering::SeqCst);
                    }
                }
                std::thread::sleep(Duration::from_millis(100));
            }
        });
    };
    // Requests still open at shutdown (a synchronous txt2img) get the jobs' grace period.
    let drain_for = state.config.shutdown_grace + Duration::from_secs(5);
    listen::serve_connections(listener, app, state.config.connections, shutdown, drain_for).await?;
    tokio::task::spawn_blocking(move || {
        for w in workers {
            let _ = w.join();
        }
    })
    .await?;
    let _ = state.cluster.forget(&state.process_id).await;
    tracing::info!("stopped");
    Ok(())
}

async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term =
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(s) => s,
                Err(_) => {
                    let _ = ctrl_c.await;
                    return;
                }
            };
        tokio::select! {
            _ = ctrl_c => {},
            _ = term.recv() => {},
        }
    }
    #[cfg(not(unix))]
    {
        let _ = ctrl_c.await;
    }
}
