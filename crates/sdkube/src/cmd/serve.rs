//! `sdkube serve`: the HTTP server (web UI, A1111-compatible API, jobs).
//!
//! Every flag can be set by an environment variable so that the Helm chart can configure the
//! server without rewriting its command line. `--print-config` prints the parsed settings as
//! JSON and exits: the chart's tests use it to prove that values reach the binary.

use std::path::PathBuf;
use std::process::ExitCode;

#[derive(clap::Args, Debug, serde::Serialize)]
pub struct Args {
    /// Model to serve: a catalog name (fetched into the store when missing) or a path.
    #[arg(long, env = "SDKUBE_MODEL", default_value = "sd-1.5")]
    pub model: String,
    /// Model store root (the chart's volume).
    #[arg(long, env = "SDKUBE_STORE", default_value = "./data/models")]
    pub store: PathBuf,
    /// Where generated images are saved.
    #[arg(long, env = "SDKUBE_OUTPUTS", default_value = "./data/outputs")]
    pub outputs: PathBuf,
    /// Textual inversion embeddings directory.
    #[arg(long, env = "SDKUBE_EMBEDDINGS", default_value = "./data/embeddings")]
    pub embeddings: PathBuf,
    /// Address to listen on (A1111's port by default).
    #[arg(long, env = "SDKUBE_LISTEN", default_value = "0.0.0.0:7860")]
    pub listen: String,
    /// Device: `cpu`, `cuda` or `cuda:N`; `auto` takes the first GPU if there is one.
    #[arg(long, env = "SDKUBE_DEVICE", default_value = "auto")]
    pub device: String,
    /// Numeric precision: fp16, bf16 or fp32 (auto: fp16 on GPU, fp32 on CPU).
    #[arg(long, env = "SDKUBE_PRECISION", default_value = "auto")]
    pub precision: String,
    /// `low` keeps only the network in use on the GPU; `high` keeps all resident.
    #[arg(long, env = "SDKUBE_VRAM", default_value = "high")]
    pub vram: String,
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
    /// Print the parsed settings as JSON and exit.
    #[arg(long)]
    #[serde(skip)]
    pub print_config: bool,
}

pub fn run(args: Args) -> anyhow::Result<ExitCode> {
    if args.print_config {
        let mut value = serde_json::to_value(&args)?;
        // Secrets are reported as present or not, never printed.
        for key in ["api_key", "basic_auth"] {
            if let Some(v) = value.get_mut(key) {
                if !v.is_null() {
                    *v = serde_json::Value::String("<set>".into());
                }
            }
        }
        println!("{}", serde_json::to_string_pretty(&value)?);
        return Ok(ExitCode::SUCCESS);
    }
    anyhow::bail!("`sdkube serve` is not implemented yet (issue 4)")
}
