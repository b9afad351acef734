//! What every handler and worker of one process shares: the configuration, the queue, the
//! gallery, the cluster's options and worker reports, the local model and the metrics.

use std::sync::{Arc, Mutex};
use std::time::SystemTime;

use sdkube_pipeline::embeddings::TextWidths;

use crate::cluster::{Cluster, MemoryCluster, WorkerReport};
use crate::config::{Config, Role};
use crate::error::ApiError;
use crate::gallery::{FolderGallery, Gallery};
use crate::job::{new_job_id, Job, JobMeta, JobRecord};
use crate::metrics::Metrics;
use crate::model::{ModelSlot, ModelState};
use crate::queue::memory::MemoryQueue;
use crate::queue::JobQueue;
use crate::requests::{BuildContext, Files, JobSpec};

/// The option A1111 clients select a checkpoint with.
pub const MODEL_OPTION: &str = "sd_model_checkpoint";

/// What the HTTP handlers and the worker threads share.
pub struct Shared {
    /// How the server was started.
    pub config: Config,
    /// Waiting and running jobs.
    pub queue: Arc<dyn JobQueue>,
    /// Saved images.
    pub gallery: Arc<dyn Gallery>,
    /// A1111's options and the workers' reports, shared by every replica.
    pub cluster: Arc<dyn Cluster>,
    /// The checkpoint this process's workers load (unused in the `api` role).
    pub model: Arc<ModelSlot>,
    /// Prometheus counters.
    pub metrics: Metrics,
    /// Text-encoder widths of the loaded model, which embeddings must match.
    pub text_widths: Mutex<Option<TextWidths>>,
    /// The networks of `/controlnet/detect`'s learned preprocessors (CPU), loaded on first use.
    pub detect_annotators: Arc<Mutex<sdkube_preprocess::Annotators>>,
    /// `host/pid`: names this process's workers in job records and worker reports.
    pub process_id: String,
    /// The runtime the worker threads reach the queue through.
    pub runtime: tokio::runtime::Handle,
}

/// The handlers' state.
pub type AppState = Arc<Shared>;

/// A job just queued: its record, and the job as built here (its settled spec and work).
pub struct Submitted {
    pub record: JobRecord,
    pub job: Arc<Job>,
}

impl Shared {
    /// One process with the in-memory queue. Call inside a tokio runtime.
    pub fn new(config: Config) -> AppState {
        let queue = Arc::new(MemoryQueue::new(config.queue_size));
        let gallery = Arc::new(FolderGallery::new(config.outputs.clone()));
        Self::with_backends(config, queue, gallery, Arc::new(MemoryCluster::default()))
    }

    /// The process `config` describes: with a shared queue, connects to it first. Call
    /// inside a tokio runtime.
    pub async fn connect(config: Config) -> anyhow::Result<AppState> {
        config.check().map_err(anyhow::Error::msg)?;
        let Some(shared) = config.shared.clone() else {
            return Ok(Self::new(config));
        };
        let engine = crate::redis::Engine::connect(&shared, config.queue_size).await?;
        Ok(Self::with_backends(
            config,
            Arc::new(engine.queue(&process_id())),
            Arc::new(engine.gallery()),
            Arc::new(engine.cluster()),
        ))
    }

    fn with_backends(
        config: Config,
        queue: Arc<dyn JobQueue>,
        gallery: Arc<dyn Gallery>,
        cluster: Arc<dyn Cluster>,
    ) -> AppState {
        let workers = config.devices.len().max(1);
        Arc::new(Shared {
            queue,
            gallery,
            cluster,
            model: ModelSlot::new(config.sources.clone(), workers),
            metrics: Metrics::default(),
            text_widths: Mutex::new(None),
            detect_annotators: Arc::default(),
            process_id: process_id(),
            runtime: tokio::runtime::Handle::current(),
            config,
        })
    }

    /// What turning a request into work may look at here.
    pub fn build_context(&self) -> BuildContext<'_> {
        BuildContext {
            limits: self.config.limits,
            max_prompt_tokens: self.config.max_prompt_tokens,
            files: (self.config.role != Role::Api).then(|| Files {
                post: &self.config.post,
                embeddings: &self.config.embeddings,
                training: &self.config.training,
                lora_dirs: &self.config.lora_dirs,
                sources: &self.config.sources,
                controlnet_dirs: &self.config.controlnet_dirs,
            }),
        }
    }

    /// 503 while this process cannot run a job yet. With a shared queue, jobs wait for a
    /// worker instead: the `api` role accepts them at any time.
    pub fn check_ready(&self) -> Result<(), ApiError> {
        if self.config.role == Role::Api {
            return Ok(());
        }
        let s = self.model.status();
        if s.state == ModelState::Ready {
            return Ok(());
        }
        Err(ApiError::unavailable(format!(
            "the model {} is not ready ({}): {}",
            s.name,
            s.state.label(),
            s.message.unwrap_or_default()
        )))
    }

    /// Checks a request and queues it: the seed drawn, the server's options copied in, the
    /// checkpoint selected now recorded with it.
    pub async fn submit(&self, mut spec: JobSpec) -> Result<Submitted, ApiError> {
        let options = self.cluster.options().await?;
        spec.settle(&options);
        let params = spec.params();
        let selected = options.get(MODEL_OPTION).and_then(|v| v.as_str());
        let meta = JobMeta {
            kind: spec.kind().to_string(),
            params,
            created: SystemTime::now(),
            model: spec.model_override().or(selected.map(str::to_string)),
        };
        let job = Arc::new(Job::new(new_job_id(), meta, spec));
        let ctx = self.build_context();
        let needs_files = matches!(
            job.spec,
            JobSpec::CreateEmbedding { .. } | JobSpec::TrainEmbedding { .. }
        );
        if ctx.files.is_none() && needs_files {
            job.spec.validate(&ctx)?;
        } else {
            job.work(&ctx).map_err(Clone::clone)?;
        }
        let record = self.queue.submit(job.clone()).await?;
        Ok(Submitted { record, job })
    }

    /// Device labels of this process's workers, e.g. `cpu`, `cuda:0`.
    pub fn device_labels(&self) -> Vec<String> {
        if !self.config.role.runs_jobs() {
            return Vec::new();
        }
        self.config.devices.iter().map(device_label).collect()
    }

    /// What a worker here can do (its model, upscalers, face restorers, checkpoints; the
    /// embeddings and LoRAs only when `embeddings` is set: reading them costs folder scans).
    pub fn local_report(&self, embeddings: bool) -> WorkerReport {
        let loras = embeddings
            .then(|| crate::a1111::loras::local_loras(self))
            .flatten();
        let controlnets = embeddings.then(|| crate::a1111::controlnet::local_models(self));
        let embeddings = embeddings
            .then(|| crate::a1111::embeddings::local_embeddings(self).ok())
            .flatten();
        WorkerReport {
            id: self.process_id.clone(),
            devices: self.device_labels(),
            model: self.model.status(),
            checkpoints: self.model.checkpoints(),
            upscalers: self.config.post.upscalers(),
            face_restorers: self.config.post.face_restorers(),
            embeddings,
            loras,
            controlnets,
            device_memory: crate::metrics::cuda_memory_used(&self.device_labels()),
            running: self.queue.local_running().len(),
            seen: SystemTime::now(),
        }
    }

    /// In the `api` role, the most recent report of a live worker: what the A1111 lists
    /// answer from there. None elsewhere (the lists are this process's own), and while no
    /// worker runs (the lists then show what this process sees itself).
    pub async fn remote_report(&self) -> Option<WorkerReport> {
        if self.config.role != Role::Api {
            return None;
        }
        self.cluster
            .workers()
            .await
            .ok()
            .and_then(|w| w.into_iter().next())
    }
}

/// `cpu`, `cuda:0`, …
pub fn device_label(d: &candle_core::Device) -> String {
    match d.location() {
        candle_core::DeviceLocation::Cpu => "cpu".to_string(),
        candle_core::DeviceLocation::Cuda { gpu_id } => format!("cuda:{gpu_id}"),
        candle_core::DeviceLocation::Metal { gpu_id } => format!("metal:{gpu_id}"),
    }
}

/// `host/pid` (Kubernetes sets HOSTNAME to the pod's name).
fn process_id() -> String {
    let host = std::env::var("HOSTNAME")
        .ok()
        .filter(|h| !h.is_empty())
        .or_else(|| {
            std::fs::read_to_string("/etc/hostname")
                .ok()
                .map(|h| h.trim().to_string())
        })
        .unwrap_or_else(|| "localhost".into());
    format!("{host}/{}", std::process::id())
}
