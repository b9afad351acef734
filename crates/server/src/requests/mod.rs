//! The request→job code every API shares: a client's request becomes a [`JobSpec`] (what
//! the queue carries between processes, plain data), and a worker turns the spec into device
//! [`Work`] (decoded images, checked names and limits). Submission builds the work once too,
//! so that a bad request is a 400 at once rather than a failed job.

pub mod controlnet;
pub mod embedding;
pub mod extras;
pub mod generate;
pub mod scripts;

use std::io::Cursor;
use std::path::{Path, PathBuf};

use base64::Engine as _;
use image::DynamicImage;
use sdkube_pipeline::Limits;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use crate::error::ApiError;
use crate::post::PostModels;
use crate::state::MODEL_OPTION;
use crate::work::Work;

pub use embedding::{CreateEmbeddingRequest, TrainEmbeddingRequest};
pub use extras::{ExtrasBatchRequest, ExtrasSingleRequest};
pub use generate::{CommonParams, Img2ImgRequest, Txt2ImgRequest};

/// A1111's clip-skip setting, in `options` or a request's `override_settings`.
pub const CLIP_SKIP_OPTION: &str = "CLIP_stop_at_last_layers";

/// sdkube's step-caching settings (DeepCache), in `options` or `override_settings`: every
/// this many steps one runs the whole UNet (1 = off)…
pub const STEP_CACHE_INTERVAL_OPTION: &str = "step_cache_interval";
/// …and the skip connection the other steps' shallow branch ends at.
pub const STEP_CACHE_BRANCH_OPTION: &str = "step_cache_branch";

/// The settings a generation acts on, copied from `options` into a request's
/// `override_settings` at submission when the request does not set them.
pub const GENERATION_OPTIONS: [&str; 3] = [
    CLIP_SKIP_OPTION,
    STEP_CACHE_INTERVAL_OPTION,
    STEP_CACHE_BRANCH_OPTION,
];

/// A job as the queue carries it: the request, made self-contained at submission (a random
/// seed drawn, the server's clip skip copied in), so that any worker, or the same one again
/// after a crash, makes the same images.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "kebab-case")]
pub enum JobSpec {
    Txt2img {
        request: Txt2ImgRequest,
        /// Save into the gallery (the UI's jobs do; A1111's API only with `save_images`).
        save: bool,
    },
    Img2img {
        request: Img2ImgRequest,
        save: bool,
    },
    Extras {
        request: ExtrasBatchRequest,
        save: bool,
    },
    CreateEmbedding {
        request: CreateEmbeddingRequest,
    },
    TrainEmbedding {
        request: TrainEmbeddingRequest,
    },
}

/// A control character other than tab and line breaks: nothing a prompt means.
fn is_stray_control(c: char) -> bool {
    c.is_control() && !matches!(c, '\t' | '\n' | '\r')
}

/// Keeps the keys of `fields` (so that they are reported as ignored), drops their values.
fn names_only(fields: &mut Map<String, Value>) {
    fields.values_mut().for_each(|v| *v = Value::Null);
}

/// What turning a spec into work may look at.
pub struct BuildContext<'a> {
    pub limits: Limits,
    /// Longest prompt accepted, in CLIP tokens (`--max-prompt-tokens`).
    pub max_prompt_tokens: usize,
    /// This process's files. None in the `api` role of a shared queue, which has no model
    /// store: the checks that need one (upscaler and face-restorer weights, embedding and
    /// training folders) are then the worker's, and fail the job with a 400.
    pub files: Option<Files<'a>>,
}

/// The folders a worker reads and writes.
pub struct Files<'a> {
    pub post: &'a PostModels,
    pub embeddings: &'a Path,
    pub training: &'a Path,
    /// `--lora-dirs`.
    pub lora_dirs: &'a [PathBuf],
    /// The model store and catalog (LoRAs fetched into the store).
    pub sources: &'a crate::model::ModelSources,
    /// `--controlnet-dirs`.
    pub controlnet_dirs: &'a [PathBuf],
}

impl JobSpec {
    /// The kind of job, as the APIs name it.
    pub fn kind(&self) -> &'static str {
        match self {
            JobSpec::Txt2img { .. } => "txt2img",
            JobSpec::Img2img { .. } => "img2img",
            JobSpec::Extras { .. } => "extras",
            JobSpec::CreateEmbedding { .. } => "create-embedding",
            JobSpec::TrainEmbedding { .. } => "train-embedding",
        }
    }

    /// The checkpoint a request names in `override_settings.sd_model_checkpoint` (A1111 runs
    /// the request on it; with `override_settings_restore_afterwards` the next request without
    /// it runs on the selected model again, as here).
    pub fn model_override(&self) -> Option<String> {
        let common = match self {
            JobSpec::Txt2img { request, .. } => &request.common,
            JobSpec::Img2img { request, .. } => &request.common,
            _ => return None,
        };
        let name = common
            .override_settings
            .as_ref()?
            .get(MODEL_OPTION)?
            .as_str()?;
        Some(name.to_string()).filter(|n| !n.trim().is_empty())
    }

    /// The request as echoed back (A1111's `parameters`, the UI's job view), large images
    /// left out.
    pub fn params(&self) -> Value {
        let value = match self {
            JobSpec::Txt2img { request, .. } => serde_json::to_value(request),
            JobSpec::Img2img { request, .. } => return generate::img2img_echo(request),
            JobSpec::Extras { request, .. } => serde_json::to_value(&request.params),
            JobSpec::CreateEmbedding { request } => serde_json::to_value(request),
            JobSpec::TrainEmbedding { request } => serde_json::to_value(request),
        };
        value.unwrap_or(Value::Null)
    }

    /// Makes the spec self-contained and bounded before it is queued: draws the seed of a
    /// random-seed generation, copies in the server's options the request does not override,
    /// removes control characters from the prompts (a NUL would cut the PNG's infotext), and
    /// drops the values of fields sdkube does not act on (their names are still reported):
    /// a client's unknown fields must not stay in memory with the job.
    pub fn settle(&mut self, options: &Map<String, Value>) {
        let (common, other) = match self {
            JobSpec::Txt2img { request, .. } => (&mut request.common, &mut request.other),
            JobSpec::Img2img { request, .. } => (&mut request.common, &mut request.other),
            JobSpec::TrainEmbedding { request } => {
                names_only(&mut request.other);
                return;
            }
            _ => return,
        };
        if common.seed < 0 && !scripts::keeps_random_seed(common) {
            common.seed = sdkube_pipeline::random_seed() as i64;
        }
        if common.subseed < 0 && common.subseed_strength != 0.0 {
            common.subseed = sdkube_pipeline::random_seed() as i64;
        }
        for key in GENERATION_OPTIONS {
            if let Some(v) = options.get(key) {
                common
                    .override_settings
                    .get_or_insert_with(Map::new)
                    .entry(key)
                    .or_insert_with(|| v.clone());
            }
        }
        for prompt in [&mut common.prompt, &mut common.negative_prompt] {
            if prompt.chars().any(is_stray_control) {
                prompt.retain(|c| !is_stray_control(c));
            }
        }
        names_only(other);
        // ControlNet's units are acted on and travel with the job; other scripts are not.
        common
            .alwayson_scripts
            .iter_mut()
            .filter(|(k, _)| !controlnet::is_controlnet_key(k))
            .for_each(|(_, v)| *v = Value::Null);
        if let Some(settings) = &mut common.override_settings {
            for (k, v) in settings.iter_mut() {
                if !GENERATION_OPTIONS.contains(&k.as_str()) && k != MODEL_OPTION {
                    *v = Value::Null;
                }
            }
        }
        // A script sdkube runs needs its arguments on the worker; another's are dropped.
        if !scripts::is_run(common) {
            common.script_args.clear();
        }
    }

    /// The device work: images decoded, names and limits checked.
    pub fn build(&self, ctx: &BuildContext<'_>) -> Result<Work, ApiError> {
        match self {
            JobSpec::Txt2img { request, save } => generate::txt2img_work(ctx, request, *save),
            JobSpec::Img2img { request, save } => generate::img2img_work(ctx, request, *save),
            JobSpec::Extras { request, save } => extras::extras_work(ctx, request, *save),
            JobSpec::CreateEmbedding { request } => {
                embedding::create_embedding_work(Self::files(ctx)?, request)
            }
            JobSpec::TrainEmbedding { request } => {
                embedding::train_work(Self::files(ctx)?, request)
            }
        }
    }

    /// Checks what this process can check: everything where it has the files, else what
    /// needs none (the worker checks the rest).
    pub fn validate(&self, ctx: &BuildContext<'_>) -> Result<(), ApiError> {
        match (self, &ctx.files) {
            (JobSpec::CreateEmbedding { request }, None) => {
                embedding::check_embedding_name(&request.name)
            }
            (JobSpec::TrainEmbedding { request }, None) => {
                embedding::check_embedding_name(&request.embedding_name)
            }
            _ => self.build(ctx).map(drop),
        }
    }

    fn files<'c, 'a>(ctx: &'c BuildContext<'a>) -> Result<&'c Files<'a>, ApiError> {
        ctx.files
            .as_ref()
            .ok_or_else(|| ApiError::internal("this process has no embeddings folder"))
    }
}

/// The bytes of a base64 field, with or without a `data:image/...;base64,` prefix (A1111
/// clients send both).
pub fn decode_base64(what: &str, b64: &str) -> Result<Vec<u8>, ApiError> {
    let data = match b64.find("base64,") {
        Some(i) if b64.starts_with("data:") => &b64[i + 7..],
        _ => b64,
    };
    base64::engine::general_purpose::STANDARD
        .decode(data.trim().as_bytes())
        .map_err(|e| ApiError::bad_request(format!("{what}: not valid base64 ({e})")))
}

/// Decodes a base64 image (see [`decode_base64`]).
pub fn decode_image(what: &str, b64: &str) -> Result<DynamicImage, ApiError> {
    let bytes = decode_base64(what, b64)?;
    let reader = || {
        image::ImageReader::new(Cursor::new(&bytes))
            .with_guessed_format()
            .map_err(|e| ApiError::bad_request(format!("{what}: {e}")))
    };
    // Sizes first: a small file can claim a gigantic image.
    let (w, h) = reader()?
        .into_dimensions()
        .map_err(|e| ApiError::bad_request(format!("{what}: not a readable image ({e})")))?;
    let limit = sdkube_restore::io::DEFAULT_MAX_PIXELS;
    if w as u64 * h as u64 > limit || w == 0 || h == 0 {
        return Err(ApiError::bad_request(format!(
            "{what}: {w}x{h} is empty or above the limit of {limit} pixels"
        )));
    }
    reader()?
        .decode()
        .map_err(|e| ApiError::bad_request(format!("{what}: not a readable image ({e})")))
}

pub fn b64(bytes: &[u8]) -> String {
    base64::engine::general_purpose::STANDARD.encode(bytes)
}
