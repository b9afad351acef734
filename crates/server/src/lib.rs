//! `sdkube serve`: the HTTP server. One process serves the embedded web UI, the
//! AUTOMATIC1111-compatible API (`/sdapi/v1`), an OpenAI-style images API, the native jobs
//! API with live events (`/api/v1`), `/openapi.json`, health probes and Prometheus metrics.
//!
//! Requests become [`jobs::Job`]s on one bounded FIFO [`jobs::JobBoard`]; one
//! [`worker::Worker`] thread per device takes them (batching compatible ones) and runs the
//! pipeline off the async runtime.

pub mod a1111;
pub mod api;
pub mod auth;
pub mod jobs;
pub mod metrics;
pub mod model;
pub mod native;
pub mod openai;
pub mod outputs;
pub mod post;
pub mod ui;
pub mod work;
pub mod worker;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use candle_core::{DType, Device};
use sdkube_pipeline::{Limits, VramMode};

pub use api::router;

/// Everything `sdkube serve` is configured with.
#[derive(Debug, Clone)]
pub struct Config {
    /// Model to serve first: a path or a catalog name.
    pub model: String,
    pub sources: model::ModelSources,
    pub post: post::PostModels,
    pub outputs: PathBuf,
    pub embeddings: PathBuf,
    /// Training images live in folders under here (`data_root` of a training request).
    pub training: PathBuf,
    pub listen: SocketAddr,
    /// One worker per device.
    pub devices: Vec<Device>,
    pub dtype: DType,
    pub vram: VramMode,
    pub auth: auth::AuthConfig,
    pub queue_size: usize,
    pub cors_origins: Vec<String>,
    pub limits: Limits,
    pub max_body_bytes: usize,
    /// How long running jobs may take to finish at shutdown before they are cancelled.
    pub shutdown_grace: Duration,
    /// Flags as given, for `/sdapi/v1/cmd-flags`.
    pub flags: serde_json::Value,
}

/// Locks a mutex; a worker that panicked mid-update leaves plain data behind, so poisoning
/// is ignored and the server keeps serving.
pub(crate) fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// What every handler and worker shares.
pub struct Shared {
    pub config: Config,
    pub jobs: jobs::JobBoard,
    pub model: Arc<model::ModelSlot>,
    pub outputs: outputs::Outputs,
    pub metrics: metrics::Metrics,
    /// A1111 options set through `POST /sdapi/v1/options` (beyond the model).
    pub options: Mutex<serde_json::Map<String, serde_json::Value>>,
    /// Text-encoder widths of the loaded model, which embeddings must match.
    pub text_widths: Mutex<Option<sdkube_pipeline::embeddings::TextWidths>>,
}

pub type AppState = Arc<Shared>;

impl Shared {
    pub fn new(config: Config) -> AppState {
        let workers = config.devices.len().max(1);
        Arc::new(Shared {
            jobs: jobs::JobBoard::new(config.queue_size),
            model: model::ModelSlot::new(config.sources.clone(), workers),
            outputs: outputs::Outputs::new(config.outputs.clone()),
            metrics: metrics::Metrics::default(),
            options: Mutex::new(serde_json::Map::new()),
            text_widths: Mutex::new(None),
            config,
        })
    }

    /// Device labels of the workers, e.g. `cpu`, `cuda:0`.
    pub fn device_labels(&self) -> Vec<String> {
        self.config
            .devices
            .iter()
            .map(|d| match d.location() {
                candle_core::DeviceLocation::Cpu => "cpu".to_string(),
                candle_core::DeviceLocation::Cuda { gpu_id } => format!("cuda:{gpu_id}"),
                candle_core::DeviceLocation::Metal { gpu_id } => format!("metal:{gpu_id}"),
            })
            .collect()
    }
}

/// Starts the workers and the model selection; returns their thread handles.
pub fn start(state: &AppState) -> anyhow::Result<Vec<std::thread::JoinHandle<()>>> {
    state
        .model
        .select(&state.config.model, true)
        .map_err(anyhow::Error::msg)?;
    let mut handles = Vec::new();
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
    Ok(handles)
}

/// Runs the server until SIGTERM / Ctrl-C, then shuts down gracefully: no new jobs, queued
/// jobs fail with a clear message, running jobs get `shutdown_grace` to finish and are then
/// cancelled.
pub async fn serve(config: Config) -> anyhow::Result<()> {
    let listen = config.listen;
    let state = Shared::new(config);
    let workers = start(&state)?;
    let app = router(state.clone());
    let listener = tokio::net::TcpListener::bind(listen)
        .await
        .map_err(|e| anyhow::anyhow!("cannot listen on {listen}: {e}"))?;
    tracing::info!(address = %listener.local_addr()?, "sdkube serving");
    let drain = state.clone();
    axum::serve(listener, app)
        .with_graceful_shutdown(async move {
            shutdown_signal().await;
            tracing::info!("shutting down: finishing running jobs");
            drain.jobs.shut_down();
            let grace = drain.config.shutdown_grace;
            std::thread::spawn(move || {
                let deadline = std::time::Instant::now() + grace;
                while !drain.jobs.running().is_empty() {
                    if std::time::Instant::now() > deadline {
                        tracing::warn!("grace period over: cancelling running jobs");
                        for j in drain.jobs.running() {
                            j.cancel.store(true, std::sync::atomic::Ordering::SeqCst);
                        }
                    }
                    std::thread::sleep(Duration::from_millis(100));
                }
            });
        })
        .await?;
    tokio::task::spawn_blocking(move || {
        for w in workers {
            let _ = w.join();
        }
    })
    .await?;
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
