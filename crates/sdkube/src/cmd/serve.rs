//! `sdkube serve`: the HTTP server (web UI, A1111-compatible API, jobs).
//!
//! Every flag can be set by an environment variable so that the Helm chart can configure the
//! server without rewriting its command line. `--print-config` prints the parsed settings as
//! JSON and exits: the chart's tests use it to prove that values reach the binary.

use std::path::PathBuf;
use std::process::ExitCode;

use candle_core::Device;
use sdkube_pipeline::{Limits, VramMode};

#[derive(clap::Args, Debug, serde::Serialize)]
pub struct Args {
    /// What this process does: `all` (the APIs and a worker per device, one process),
    /// `api` (the UI and APIs, no device; needs `--queue redis://…`) or `worker` (runs the
    /// shared queue's jobs on its devices; serves probes and metrics only).
    #[arg(long, env = "SDKUBE_ROLE", default_value = "all")]
    pub role: String,
    /// The job queue: `memory` (this process alone) or `redis://[user:password@]HOST:PORT[/DB]`
    /// shared by `api` and `worker` replicas.
    #[arg(
        long,
        env = "SDKUBE_QUEUE",
        default_value = "memory",
        hide_env_values = true
    )]
    pub queue: String,
    /// The queue's password, apart from the URL (from a Kubernetes Secret, say: it need not be
    /// URL-safe); it wins over one in the URL.
    #[arg(long, env = "SDKUBE_QUEUE_PASSWORD", hide_env_values = true)]
    pub queue_password: Option<String>,
    /// Prefix of every key sdkube writes in Redis (several deployments may share one).
    #[arg(long, env = "SDKUBE_QUEUE_PREFIX", default_value = "sdkube")]
    pub queue_prefix: String,
    /// Seconds after which a job whose worker stopped answering goes to another worker.
    #[arg(long, env = "SDKUBE_VISIBILITY_TIMEOUT", default_value_t = 60)]
    pub visibility_timeout: u64,
    /// Seconds finished jobs (records and images) stay readable in the shared queue.
    #[arg(long, env = "SDKUBE_RESULT_TTL", default_value_t = 3600)]
    pub result_ttl: u64,
    /// Most images kept in the shared queue's gallery (the oldest go first).
    #[arg(long, env = "SDKUBE_GALLERY_KEEP", default_value_t = 500)]
    pub gallery_keep: usize,
    /// A job whose worker died this many times is failed instead of tried again.
    #[arg(long, env = "SDKUBE_MAX_DELIVERIES", default_value_t = 3)]
    pub max_deliveries: u32,
    /// Model to serve: a catalog name (fetched into the store when missing) or a path.
    #[arg(long, env = "SDKUBE_MODEL", default_value = "sd-1.5")]
    pub model: String,
    /// Diffusers folder whose configs replace those inferred from `--model` when it is a
    /// single checkpoint file (as `generate --config`; A1111's `--config`).
    #[arg(long, env = "SDKUBE_MODEL_CONFIG")]
    pub config: Option<PathBuf>,
    /// Model store root (the chart's volume).
    #[arg(long, env = "SDKUBE_STORE", default_value = "./data/models")]
    pub store: PathBuf,
    /// Where generated images are saved.
    #[arg(long, env = "SDKUBE_OUTPUTS", default_value = "./data/outputs")]
    pub outputs: PathBuf,
    /// Textual inversion embeddings directory.
    #[arg(long, env = "SDKUBE_EMBEDDINGS", default_value = "./data/embeddings")]
    pub embeddings: PathBuf,
    /// Folders of LoRA files (subfolders included) that prompts name with `<lora:name:w>`.
    #[arg(
        long,
        env = "SDKUBE_LORA_DIRS",
        value_delimiter = ',',
        default_value = "./data/loras"
    )]
    pub lora_dirs: Vec<PathBuf>,
    /// Folders of ControlNet files (`.safetensors`, `.pth`) and diffusers ControlNet
    /// folders, which `alwayson_scripts.controlnet` units name.
    #[arg(
        long,
        env = "SDKUBE_CONTROLNET_DIRS",
        value_delimiter = ',',
        default_value = "./data/controlnet"
    )]
    pub controlnet_dirs: Vec<PathBuf>,
    /// Folder of training image folders (`data_root` of a training request is inside it).
    #[arg(long, env = "SDKUBE_TRAINING", default_value = "./data/training")]
    pub training: PathBuf,
    /// Address to listen on (A1111's port by default).
    #[arg(long, env = "SDKUBE_LISTEN", default_value = "0.0.0.0:7860")]
    pub listen: String,
    /// Devices, one worker each: `cpu`; `cuda` or `auto` = every visible GPU (`auto` falls
    /// back to the CPU when there is none); `cuda:N`; or a list `cuda:0,cuda:1`.
    #[arg(long, env = "SDKUBE_DEVICE", default_value = "auto")]
    pub device: String,
    /// Numeric precision: fp16, bf16 or fp32 (auto: fp16 on GPU, fp32 on CPU).
    #[arg(long, env = "SDKUBE_PRECISION", default_value = "auto")]
    pub precision: String,
    /// `low` keeps only the network in use on the GPU; `high` keeps all resident.
    #[arg(long, env = "SDKUBE_VRAM", default_value = "high")]
    pub vram: String,
    /// After loading a model, run a 3-step generation at its native size before /readyz says
    /// ready, so that the first request does not pay for the GPU's per-shape preparations:
    /// auto (on for GPUs), on or off.
    #[arg(long, env = "SDKUBE_WARM_UP", default_value = "auto")]
    pub warm_up: String,
    /// Require this API key (header `Authorization: Bearer KEY` or `X-Api-Key`).
    #[arg(long, env = "SDKUBE_API_KEY", hide_env_values = true)]
    pub api_key: Option<String>,
    /// Require HTTP basic auth, `user:password` (A1111's `--api-auth`).
    #[arg(long, env = "SDKUBE_BASIC_AUTH", hide_env_values = true)]
    pub basic_auth: Option<String>,
    /// Most jobs waiting in the queue; more are refused with 429.
    #[arg(long, env = "SDKUBE_QUEUE_SIZE", default_value_t = 32)]
    pub queue_size: usize,
    /// Origins allowed by CORS (comma separated); none by default.
    #[arg(long, env = "SDKUBE_CORS_ORIGINS", value_delimiter = ',')]
    pub cors_origins: Vec<String>,
    /// Largest width or height accepted, in pixels.
    #[arg(long, env = "SDKUBE_MAX_SIZE", default_value_t = 2048)]
    pub max_size: u32,
    /// Most sampling steps accepted.
    #[arg(long, env = "SDKUBE_MAX_STEPS", default_value_t = 150)]
    pub max_steps: u32,
    /// Largest batch accepted.
    #[arg(long, env = "SDKUBE_MAX_BATCH", default_value_t = 8)]
    pub max_batch: u32,
    /// User catalog file extending the built-in one.
    #[arg(long, env = "SDKUBE_CATALOG")]
    pub catalog: Option<PathBuf>,
    /// Extra folders of checkpoints (`.safetensors`, `.ckpt`, diffusers folders) listed by
    /// `/sdapi/v1/sd-models` (comma separated).
    #[arg(long, env = "SDKUBE_CHECKPOINT_DIRS", value_delimiter = ',')]
    pub checkpoint_dirs: Vec<PathBuf>,
    /// Folders of RealESRGAN weights (`.pth`, `.safetensors`) offered as upscalers, besides
    /// the ones in the store (comma separated).
    #[arg(long, env = "SDKUBE_UPSCALER_DIRS", value_delimiter = ',')]
    pub upscaler_dirs: Vec<PathBuf>,
    /// GFPGAN weights for face restoration: a store name or a path.
    #[arg(long, env = "SDKUBE_FACE_RESTORER", default_value = "gfpgan-1.4")]
    pub face_restorer: String,
    /// Face detector for face restoration: a store name or a path.
    #[arg(
        long,
        env = "SDKUBE_FACE_DETECTOR",
        default_value = "retinaface-resnet50"
    )]
    pub face_detector: String,
    /// Longest prompt (and negative prompt) accepted, in CLIP tokens (A1111 counts 75 per
    /// chunk); longer ones are refused with a 400.
    #[arg(long, env = "SDKUBE_MAX_PROMPT_TOKENS", default_value_t = 1000)]
    pub max_prompt_tokens: usize,
    /// Most client connections open at once (lowered to what the open-files limit allows);
    /// past it a connection gets a 503 at once.
    #[arg(long, env = "SDKUBE_MAX_CONNECTIONS", default_value_t = 4096)]
    pub max_connections: usize,
    /// Seconds a client has to send a request's headers, and between requests on a kept-alive
    /// connection; a request body has eight times that.
    #[arg(long, env = "SDKUBE_HEADER_TIMEOUT", default_value_t = 15)]
    pub header_timeout: u64,
    /// Largest request body, in MiB (images travel base64-encoded in JSON).
    #[arg(long, env = "SDKUBE_MAX_BODY_MB", default_value_t = 64)]
    pub max_body_mb: usize,
    /// Seconds running jobs get to finish at shutdown before they are cancelled.
    #[arg(long, env = "SDKUBE_SHUTDOWN_GRACE", default_value_t = 25)]
    pub shutdown_grace: u64,
    /// Print the parsed settings as JSON and exit.
    #[arg(long)]
    #[serde(skip)]
    pub print_config: bool,
}

pub fn run(args: Args) -> anyhow::Result<ExitCode> {
    if args.print_config {
        println!("{}", serde_json::to_string_pretty(&settings(&args)?)?);
        return Ok(ExitCode::SUCCESS);
    }
    let config = config(&args)?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    runtime.block_on(sdkube_server::serve(config))?;
    Ok(ExitCode::SUCCESS)
}

/// The settings as JSON, secrets reported as present or not, never printed.
fn settings(args: &Args) -> anyhow::Result<serde_json::Value> {
    let mut value = serde_json::to_value(args)?;
    for key in ["api_key", "basic_auth", "queue_password"] {
        if let Some(v) = value.get_mut(key) {
            if !v.is_null() {
                *v = serde_json::Value::String("<set>".into());
            }
        }
    }
    // The queue URL may carry a password.
    value["queue"] = serde_json::Value::String(sdkube_server::redact(&args.queue));
    Ok(value)
}

/// The devices named by `--device`, one worker each.
fn devices(spec: &str) -> anyhow::Result<Vec<Device>> {
    let all_gpus = || -> Vec<Device> { (0..16).map_while(|i| Device::new_cuda(i).ok()).collect() };
    Ok(match spec {
        "cpu" => vec![Device::Cpu],
        "auto" => {
            let gpus = all_gpus();
            if gpus.is_empty() {
                vec![Device::Cpu]
            } else {
                gpus
            }
        }
        "cuda" => {
            let gpus = all_gpus();
            if gpus.is_empty() {
                anyhow::bail!(
                    "--device cuda: no CUDA device is usable (is this build made with --features cuda, \
                     and does the pod have a GPU? `sdkube doctor` tells)"
                );
            }
            gpus
        }
        list => list
            .split(',')
            .map(|d| {
                super::device::device_named(d.trim()).map_err(|e| {
                    anyhow::anyhow!("--device {list:?}: {e} (or a comma list of them)")
                })
            })
            .collect::<anyhow::Result<Vec<_>>>()?,
    })
}

/// The shared queue `--queue` names, None for the in-memory one.
fn shared_queue(args: &Args) -> anyhow::Result<Option<sdkube_server::SharedQueue>> {
    let url = args.queue.trim();
    if url == "memory" {
        return Ok(None);
    }
    if !(url.starts_with("redis://") || url.starts_with("rediss://")) {
        anyhow::bail!(
            "--queue {:?}: use memory or redis://[user:password@]HOST:PORT[/DB]",
            sdkube_server::redact(url)
        );
    }
    for (what, v) in [
        ("--visibility-timeout", args.visibility_timeout),
        ("--result-ttl", args.result_ttl),
        ("--gallery-keep", args.gallery_keep as u64),
        ("--max-deliveries", args.max_deliveries as u64),
    ] {
        if v == 0 {
            anyhow::bail!("{what} must be at least 1");
        }
    }
    Ok(Some(sdkube_server::SharedQueue {
        url: url.to_string(),
        password: args.queue_password.clone().filter(|p| !p.is_empty()),
        prefix: args.queue_prefix.clone(),
        visibility_timeout: std::time::Duration::from_secs(args.visibility_timeout),
        result_ttl: std::time::Duration::from_secs(args.result_ttl),
        gallery_keep: args.gallery_keep,
        max_deliveries: args.max_deliveries,
    }))
}

fn config(args: &Args) -> anyhow::Result<sdkube_server::Config> {
    let role =
        sdkube_server::Role::parse(&args.role).map_err(|e| anyhow::anyhow!("--role: {e}"))?;
    let shared = shared_queue(args)?;
    // The api role has no device: it never touches one (a GPU-less pod).
    let devices = if role.runs_jobs() {
        devices(&args.device)?
    } else {
        Vec::new()
    };
    let on_cpu = devices.iter().all(|d| d.is_cpu());
    // The api role runs nothing on a device: the workers' precision is theirs to check.
    let dtype = match role.runs_jobs() {
        true => super::device::precision_named(&args.precision, on_cpu)?,
        false => candle_core::DType::F32,
    };
    let vram = match args.vram.as_str() {
        "high" => VramMode::High,
        "low" => VramMode::Low,
        other => anyhow::bail!("unknown --vram {other:?}: use high or low"),
    };
    let warm_up = match args.warm_up.as_str() {
        "auto" => devices.iter().any(|d| !d.is_cpu()),
        "on" => true,
        "off" => false,
        other => anyhow::bail!("unknown --warm-up {other:?}: use auto, on or off"),
    };
    let listen = args
        .listen
        .parse()
        .map_err(|e| anyhow::anyhow!("--listen {:?}: {e} (expected ADDRESS:PORT)", args.listen))?;
    let basic = args
        .basic_auth
        .as_deref()
        .map(sdkube_server::AuthConfig::parse_basic)
        .transpose()
        .map_err(anyhow::Error::msg)?;
    if args.api_key.as_deref() == Some("") {
        anyhow::bail!("--api-key must not be empty");
    }
    for (what, v) in [
        ("--max-size", args.max_size as usize),
        ("--max-steps", args.max_steps as usize),
        ("--max-batch", args.max_batch as usize),
        ("--queue-size", args.queue_size),
        ("--max-prompt-tokens", args.max_prompt_tokens),
        ("--max-connections", args.max_connections),
        ("--header-timeout", args.header_timeout as usize),
    ] {
        if v == 0 {
            anyhow::bail!("{what} must be at least 1");
        }
    }
    let flags = settings(args)?;
    let config = sdkube_server::Config {
        role,
        shared,
        model: args.model.clone(),
        model_config: args.config.clone(),
        sources: sdkube_server::ModelSources {
            store: args.store.clone(),
            catalog: args.catalog.clone(),
            checkpoint_dirs: args.checkpoint_dirs.clone(),
        },
        post: sdkube_server::PostModels {
            store: args.store.clone(),
            upscaler_dirs: args.upscaler_dirs.clone(),
            face_restorer: args.face_restorer.clone(),
            face_detector: args.face_detector.clone(),
        },
        outputs: args.outputs.clone(),
        embeddings: args.embeddings.clone(),
        lora_dirs: args.lora_dirs.clone(),
        controlnet_dirs: args.controlnet_dirs.clone(),
        training: args.training.clone(),
        listen,
        devices,
        dtype,
        vram,
        warm_up,
        auth: sdkube_server::AuthConfig {
            api_key: args.api_key.clone(),
            basic,
        },
        queue_size: args.queue_size,
        cors_origins: args.cors_origins.clone(),
        limits: Limits {
            max_size: args.max_size as usize,
            max_steps: args.max_steps as usize,
            max_batch: args.max_batch as usize,
        },
        max_prompt_tokens: args.max_prompt_tokens,
        max_body_bytes: args.max_body_mb * 1024 * 1024,
        connections: sdkube_server::ConnectionLimits {
            max_connections: args.max_connections,
            header_timeout: std::time::Duration::from_secs(args.header_timeout),
        },
        body_timeout: std::time::Duration::from_secs(args.header_timeout * 8),
        shutdown_grace: std::time::Duration::from_secs(args.shutdown_grace),
        flags,
    };
    config.check().map_err(anyhow::Error::msg)?;
    Ok(config)
}
