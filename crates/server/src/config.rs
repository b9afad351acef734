//! What `sdkube serve` is configured with (the binary fills it from flags and `SDKUBE_*`).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use candle_core::{DType, Device};
use sdkube_pipeline::{Limits, VramMode};

/// What this process does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// Everything in one process: the APIs and one worker per device (the default).
    All,
    /// The UI and every API, no device: validates, queues, reads job state. Needs a shared
    /// queue.
    Api,
    /// Takes jobs from the shared queue and runs them on its devices; serves only probes
    /// and metrics.
    Worker,
}

impl Role {
    /// `all`, `api` or `worker`.
    pub fn parse(s: &str) -> Result<Role, String> {
        match s {
            "all" => Ok(Role::All),
            "api" => Ok(Role::Api),
            "worker" => Ok(Role::Worker),
            other => Err(format!("unknown role {other:?}: use all, api or worker")),
        }
    }

    /// The name [`Role::parse`] reads.
    pub fn name(self) -> &'static str {
        match self {
            Role::All => "all",
            Role::Api => "api",
            Role::Worker => "worker",
        }
    }

    /// Whether this process runs jobs on devices.
    pub fn runs_jobs(self) -> bool {
        self != Role::Api
    }

    /// Whether this process serves the APIs and the UI.
    pub fn serves_api(self) -> bool {
        self != Role::Worker
    }
}

/// The shared queue in Redis and how it treats jobs.
#[derive(Debug, Clone)]
pub struct SharedQueue {
    /// `redis://[user:password@]host:port[/db]` (or `rediss://` for TLS).
    pub url: String,
    /// A password given apart from the URL (it wins over the URL's).
    pub password: Option<String>,
    /// Jobs are namespaced under this prefix, so that several deployments can share one
    /// Redis.
    pub prefix: String,
    /// A job whose worker has not reported for this long is given to another worker.
    pub visibility_timeout: Duration,
    /// How long finished jobs (record, images) stay readable.
    pub result_ttl: Duration,
    /// Most images kept in the gallery (the oldest go first).
    pub gallery_keep: usize,
    /// A job handed out this many times without finishing (its workers died) fails.
    pub max_deliveries: u32,
}

/// Everything `sdkube serve` is configured with.
#[derive(Debug, Clone)]
pub struct Config {
    /// What this process does.
    pub role: Role,
    /// None: the in-memory queue of one process.
    pub shared: Option<SharedQueue>,
    /// Model to serve first: a path or a catalog name.
    pub model: String,
    /// Diffusers folder whose configs replace those inferred from `model`, a single file
    /// (`--config`, as `generate`'s: for files whose architecture the weights do not tell).
    pub model_config: Option<PathBuf>,
    /// Where checkpoints are found.
    pub sources: crate::model::ModelSources,
    /// Where upscaler and face-restoration weights are found.
    pub post: crate::post::PostModels,
    /// The gallery folder (`--role all`; a shared queue keeps the gallery in Redis).
    pub outputs: PathBuf,
    /// Textual-inversion embeddings.
    pub embeddings: PathBuf,
    /// Folders of LoRA files prompts may name (`<lora:name:w>`).
    pub lora_dirs: Vec<PathBuf>,
    /// Folders of ControlNet files and diffusers ControlNet folders (`--controlnet-dirs`).
    pub controlnet_dirs: Vec<PathBuf>,
    /// Training images live in folders under here (`data_root` of a training request).
    pub training: PathBuf,
    /// Address the HTTP server binds.
    pub listen: SocketAddr,
    /// One worker per device.
    pub devices: Vec<Device>,
    /// Precision of the networks.
    pub dtype: DType,
    /// Which networks stay on the device.
    pub vram: VramMode,
    /// Run a small generation after loading a model, before saying ready (see
    /// `Engine::warm_up`).
    pub warm_up: bool,
    /// Who may call.
    pub auth: crate::auth::AuthConfig,
    /// Jobs that may wait; more get 429.
    pub queue_size: usize,
    /// Origins allowed by CORS; empty: CORS off.
    pub cors_origins: Vec<String>,
    /// Largest size, steps and batch a request may ask for.
    pub limits: Limits,
    /// Longest prompt (and negative prompt) accepted, in CLIP tokens.
    pub max_prompt_tokens: usize,
    /// Largest request body.
    pub max_body_bytes: usize,
    /// Open connections and their deadlines.
    pub connections: crate::listen::ConnectionLimits,
    /// Time a request body has to arrive.
    pub body_timeout: Duration,
    /// How long running jobs may take to finish at shutdown before they are cancelled (and,
    /// with a shared queue, handed to another worker).
    pub shutdown_grace: Duration,
    /// Flags as given, for `/sdapi/v1/cmd-flags`.
    pub flags: serde_json::Value,
}

impl Config {
    /// Contradictions between settings, as one message.
    pub fn check(&self) -> Result<(), String> {
        if self.role != Role::All && self.shared.is_none() {
            return Err(format!(
                "--role {} needs a shared queue: --queue redis://HOST:6379 (the in-memory \
                 queue lives in one process)",
                self.role.name()
            ));
        }
        if self.role.runs_jobs() && self.devices.is_empty() {
            return Err("no device to run jobs on".into());
        }
        if let Some(dir) = &self.model_config {
            if !Path::new(&self.model).is_file() {
                return Err(format!(
                    "--config {}: it applies to a single checkpoint file given as --model, and \
                     {:?} is not a file",
                    dir.display(),
                    self.model
                ));
            }
            if !dir.join("unet").join("config.json").is_file() {
                return Err(format!(
                    "--config {}: no unet/config.json there (expected a diffusers model \
                     folder's configs)",
                    dir.display()
                ));
            }
        }
        Ok(())
    }

    /// The config folder to load `path` with: `model_config` where `path` is `model`.
    pub fn config_dir_for(&self, path: &Path) -> Option<PathBuf> {
        let dir = self.model_config.as_ref()?;
        let model = Path::new(&self.model);
        let same = match (path.canonicalize(), model.canonicalize()) {
            (Ok(a), Ok(b)) => a == b,
            _ => path == model,
        };
        same.then(|| dir.clone())
    }
}
