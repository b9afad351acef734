//! Textual-inversion training (Gal et al. 2022, <https://arxiv.org/abs/2208.01618>), as
//! AUTOMATIC1111's `modules/textual_inversion/textual_inversion.py::train_embedding`.
//!
//! Only the new token vectors learn: they are candle [`Var`]s in f32 (the master copy,
//! whatever the model's precision) optimised by AdamW (weight decay 0, as A1111); every
//! network weight is a plain tensor, so nothing else can change. Each step takes
//! `batch_size` training images (every image once per epoch, in a seeded order), a caption
//! from the template with `[name]` → the embedding's name and `[filewords]` → the image's
//! words, noises the image latent at a random timestep and minimises the mean squared
//! error of the UNet's prediction (ε, or v for v-prediction models).
//!
//! Images are resized to cover `size`×`size` and centre-cropped (A1111's "crop and
//! resize"), encoded once to the VAE's distribution mean. The embedding is checkpointed
//! to `out` atomically (temporary file + rename, then a `<out>.train.json` with the step),
//! so a run that fails or is stopped leaves the last good checkpoint; `resume` continues
//! from it: vectors, step and AdamW's moments (`<out>.optim.safetensors`), so a resumed run
//! continues exactly as an uninterrupted one.
//! The batches of step `k` depend only on the seed and `k`, so a resumed run sees the
//! same data an uninterrupted one would.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::Instant;

use candle_core::{DType, Device, Tensor, Var};
use rand::seq::SliceRandom;
use rand::SeedableRng;
use sdkube_models::unet::{AddedConditioning, UNet2DConditionModel};
use sdkube_models::{Prediction, SdWeights};

use crate::embeddings::{
    read_embedding, short_hash, EmbeddingSet, EmbeddingVectors, EncoderSlot, TextWidths,
};
use crate::generate::{Engine, Request, VramMode};
use crate::image_io::{crop_resize, encode_png, image_to_tensor, read_image};
use crate::prompt::{EmbeddingIndex, CHUNK_TEXT_TOKENS};
use crate::sampler::{Flow, NoiseSchedule, NoiseSource, SeededNoise};
use crate::text::{self, PromptTokens, TextEncoders, TokenVectors};
use crate::tokenizer::ClipTokenizer;

/// Image files a training set may hold.
pub const IMAGE_EXTENSIONS: [&str; 4] = ["png", "jpg", "jpeg", "webp"];

/// Why training could not start or continue.
#[derive(Debug, thiserror::Error)]
pub enum TrainError {
    #[error("{0}")]
    Invalid(String),
    #[error(
        "{} already exists; pass --resume to continue training it, or choose another --out",
        .0.display()
    )]
    Exists(PathBuf),
    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(transparent)]
    Pipeline(#[from] crate::Error),
    #[error(transparent)]
    Embedding(#[from] crate::embeddings::EmbeddingError),
    #[error(transparent)]
    Weights(#[from] sdkube_weights::Error),
    #[error("tensor computation failed: {0}")]
    Tensor(#[from] candle_core::Error),
}

fn io_error(path: &Path) -> impl FnOnce(std::io::Error) -> TrainError + '_ {
    move |source| TrainError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// Caption templates: `[name]` is the embedding's name, `[filewords]` the image's words.
#[derive(Debug, Clone, PartialEq)]
pub enum Template {
    /// An object or a person ("a photo of a [name]"…).
    Subject,
    /// An artistic style ("a painting in the style of [name]"…).
    Style,
    /// One caption per non-empty line.
    Lines(Vec<String>),
}

const SUBJECT: [&str; 8] = [
    "a photo of a [name]",
    "a rendering of a [name]",
    "a cropped photo of the [name]",
    "a close-up photo of a [name]",
    "a bright photo of the [name]",
    "a good photo of a [name]",
    "a photo of one [name]",
    "a photo of the small [name]",
];

const STYLE: [&str; 6] = [
    "a painting in the style of [name]",
    "a rendering in the style of [name]",
    "a picture in the style of [name]",
    "an illustration in the style of [name]",
    "a drawing in the style of [name]",
    "artwork in the style of [name]",
];

impl Template {
    /// `subject`, `style`, or the path of a file with one caption per line.
    pub fn parse(text: &str) -> Result<Self, TrainError> {
        match text {
            "subject" => Ok(Self::Subject),
            "style" => Ok(Self::Style),
            path => {
                let path = Path::new(path);
                let content = std::fs::read_to_string(path).map_err(io_error(path))?;
                let lines: Vec<String> = content
                    .lines()
                    .map(str::trim)
                    .filter(|l| !l.is_empty())
                    .map(String::from)
                    .collect();
                if lines.is_empty() {
                    return Err(TrainError::Invalid(format!(
                        "template file {} has no captions",
                        path.display()
                    )));
                }
                Ok(Self::Lines(lines))
            }
        }
    }

    pub fn lines(&self) -> Vec<&str> {
        match self {
            Self::Subject => SUBJECT.to_vec(),
            Self::Style => STYLE.to_vec(),
            Self::Lines(lines) => lines.iter().map(String::as_str).collect(),
        }
    }
}

/// A training run's settings (A1111's "Train" tab).
#[derive(Debug, Clone)]
pub struct TrainOptions {
    /// The word prompts will use; also the default file stem.
    pub name: String,
    /// Text whose token embeddings start the vectors (A1111: `*` when empty).
    pub init_text: String,
    /// Vectors per token (1..=75).
    pub vectors: usize,
    /// Total steps, counting those of a resumed run.
    pub steps: usize,
    pub learning_rate: f64,
    pub batch_size: usize,
    pub template: Template,
    /// Directory of training images.
    pub images: PathBuf,
    /// Training resolution (square, a multiple of 8).
    pub size: usize,
    /// `.safetensors` (`emb_params` / `clip_l`+`clip_g`) or `.pt` (a flat torch dict with
    /// the same keys); both load in A1111 and here.
    pub out: PathBuf,
    /// Checkpoint every N steps (0: only at the end).
    pub checkpoint_every: usize,
    /// Sample image every N steps (0: never), written to `sample_dir`.
    pub sample_every: usize,
    /// Default: `<out without extension>-samples/`.
    pub sample_dir: Option<PathBuf>,
    pub sample_steps: usize,
    /// Continue from `out` (and its `.train.json`) if it exists.
    pub resume: bool,
    pub seed: u64,
    /// Measure the loss on a fixed validation set before and after the run (costs four
    /// forward passes per image each time): the step losses themselves are dominated by
    /// the random timestep and noise of each step.
    pub validation: bool,
}

impl Default for TrainOptions {
    fn default() -> Self {
        Self {
            name: String::new(),
            init_text: "*".into(),
            vectors: 1,
            steps: 1000,
            learning_rate: 0.005,
            batch_size: 1,
            template: Template::Subject,
            images: PathBuf::new(),
            size: 512,
            out: PathBuf::new(),
            checkpoint_every: 500,
            sample_every: 0,
            sample_dir: None,
            sample_steps: 20,
            resume: false,
            seed: 0,
            validation: false,
        }
    }
}

/// Seen by the step callback after each optimiser step.
#[derive(Debug, Clone)]
pub struct TrainProgress {
    /// Steps done (1-based, counting a resumed run's earlier steps).
    pub step: usize,
    pub total: usize,
    pub loss: f32,
    /// Mean loss over the last (up to) 32 steps.
    pub average_loss: f32,
    /// Checkpoint written at this step.
    pub checkpoint: Option<PathBuf>,
    /// Sample image written at this step.
    pub sample: Option<PathBuf>,
}

/// How a run ended.
#[derive(Debug, Clone)]
pub struct TrainOutcome {
    /// The embedding file (the last checkpoint).
    pub path: PathBuf,
    /// Step the run started from (0, or the resumed checkpoint's).
    pub first_step: usize,
    /// Step reached.
    pub step: usize,
    /// Loss of every step this run made.
    pub losses: Vec<f32>,
    /// Stopped by the callback before `steps`.
    pub cancelled: bool,
    /// Optimiser steps per second (training only, without image encoding and saving).
    pub steps_per_second: f64,
    /// With [`TrainOptions::validation`]: the loss on a fixed set (every image at four
    /// fixed timesteps, fixed noise) before and after this run.
    pub validation_loss: Option<(f32, f32)>,
}

/// What `<out>.train.json` records next to a checkpoint.
#[derive(Debug, serde::Serialize, serde::Deserialize)]
struct CheckpointState {
    name: String,
    step: usize,
    vectors: usize,
}

/// One training image: its latent `[1, C, h, w]` (f32, scaled) and its words.
struct Example {
    latent: Tensor,
    filewords: String,
}

/// The vectors being learned, in f32.
struct LearnedVectors {
    name: String,
    first: Var,
    second: Option<Var>,
}

impl TokenVectors for LearnedVectors {
    fn vectors(&self, name: &str, slot: EncoderSlot) -> Option<Tensor> {
        if name != self.name {
            return None;
        }
        match slot {
            EncoderSlot::First => Some(self.first.as_tensor().clone()),
            EncoderSlot::Second => self.second.as_ref().map(|v| v.as_tensor().clone()),
        }
    }
}

impl LearnedVectors {
    /// The vectors on the CPU, refused when they are no longer finite (a diverged run
    /// must not replace the last good checkpoint).
    fn snapshot(&self) -> Result<EmbeddingVectors, TrainError> {
        let finite = |t: &Tensor| -> Result<bool, TrainError> {
            let sum = t
                .abs()?
                .sum_all()?
                .to_dtype(DType::F64)?
                .to_scalar::<f64>()?;
            Ok(sum.is_finite())
        };
        let all_finite = finite(self.first.as_tensor())?
            && match &self.second {
                Some(v) => finite(v.as_tensor())?,
                None => true,
            };
        if !all_finite {
            return Err(TrainError::Invalid(
                "the vectors diverged (not finite); lower the learning rate (the last \
                 checkpoint is kept)"
                    .into(),
            ));
        }
        Ok(EmbeddingVectors {
            first: self.first.as_tensor().to_device(&Device::Cpu)?,
            second: self
                .second
                .as_ref()
                .map(|v| v.as_tensor().to_device(&Device::Cpu))
                .transpose()?,
        })
    }
}

fn validate(opts: &TrainOptions, tokenizer: &ClipTokenizer) -> Result<(), TrainError> {
    let invalid = |m: String| Err(TrainError::Invalid(m));
    if tokenizer.encode(&opts.name).is_empty() {
        return invalid(format!(
            "embedding name {:?} has no tokens, so no prompt could use it",
            opts.name
        ));
    }
    if opts.vectors == 0 || opts.vectors > CHUNK_TEXT_TOKENS {
        return invalid(format!(
            "--vectors must be 1 to {CHUNK_TEXT_TOKENS}, not {}",
            opts.vectors
        ));
    }
    if opts.template.lines().is_empty() {
        return invalid("the caption template has no lines".into());
    }
    if opts.steps == 0 || opts.batch_size == 0 {
        return invalid("--steps and --batch-size must be at least 1".into());
    }
    if !(opts.learning_rate > 0.0 && opts.learning_rate.is_finite()) {
        return invalid(format!(
            "--learning-rate must be positive, not {}",
            opts.learning_rate
        ));
    }
    if opts.size == 0 || !opts.size.is_multiple_of(8) {
        return invalid(format!(
            "the training size must be a positive multiple of 8, not {}",
            opts.size
        ));
    }
    let ext = opts.out.extension().and_then(|e| e.to_str()).unwrap_or("");
    if !matches!(ext, "safetensors" | "pt") {
        return invalid(format!(
            "--out {} must end in .safetensors or .pt",
            opts.out.display()
        ));
    }
    Ok(())
}

/// A1111's `[filewords]`: the `.txt` next to the image, or the file stem without leading
/// numbers and with `_` as spaces.
fn filewords(path: &Path) -> Result<String, TrainError> {
    let sidecar = path.with_extension("txt");
    if sidecar.is_file() {
        let text = std::fs::read_to_string(&sidecar).map_err(io_error(&sidecar))?;
        return Ok(text.trim().to_string());
    }
    let stem = path
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_default();
    let trimmed = stem.trim_start_matches(|c: char| c.is_ascii_digit() || c == '-');
    Ok(trimmed.replace('_', " ").trim().to_string())
}

/// The training images of `dir`, sorted by name; any file that is not a readable image
/// (by extension) stops training before it starts.
pub fn list_images(dir: &Path) -> Result<Vec<PathBuf>, TrainError> {
    let mut paths: Vec<PathBuf> = std::fs::read_dir(dir)
        .map_err(io_error(dir))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            p.is_file()
                && p.extension()
                    .and_then(|e| e.to_str())
                    .is_some_and(|e| IMAGE_EXTENSIONS.contains(&e.to_ascii_lowercase().as_str()))
        })
        .collect();
    paths.sort();
    if paths.is_empty() {
        return Err(TrainError::Invalid(format!(
            "{} has no training images ({})",
            dir.display(),
            IMAGE_EXTENSIONS.join(", ")
        )));
    }
    Ok(paths)
}

/// A1111's "Create embedding": a new embedding `name` of `vectors` vectors initialised from
/// `init_text`'s token embeddings, written to `out` (`.safetensors` or `.pt`) with a
/// step-0 training state, ready to train with `resume`. Refuses to replace an existing
/// file unless `overwrite`.
pub fn create_embedding(
    weights: &SdWeights,
    name: &str,
    init_text: &str,
    vectors: usize,
    out: &Path,
    overwrite: bool,
) -> Result<PathBuf, TrainError> {
    if !(1..=75).contains(&vectors) {
        return Err(TrainError::Invalid(format!(
            "vectors per token must be between 1 and 75, got {vectors}"
        )));
    }
    if out.exists() && !overwrite {
        return Err(TrainError::Exists(out.to_path_buf()));
    }
    let tokenizer = ClipTokenizer::shared().map_err(|e| TrainError::Invalid(e.to_string()))?;
    let device = Device::Cpu;
    let clip = weights.text_encoder.build(&device, DType::F32)?;
    let clip_g = weights
        .text_encoder_2
        .as_ref()
        .map(|c| c.build(&device, DType::F32))
        .transpose()?;
    let start = EmbeddingVectors {
        first: initial_vectors(&clip, tokenizer, init_text, vectors)?,
        second: clip_g
            .as_ref()
            .map(|g| initial_vectors(g, tokenizer, init_text, vectors))
            .transpose()?,
    };
    let state = CheckpointState {
        name: name.to_string(),
        step: 0,
        vectors,
    };
    save_checkpoint(out, &start, &state, None)?;
    Ok(out.to_path_buf())
}

/// Initial vectors for one encoder: rows of the token embeddings of `init_text`, spread
/// over `n` vectors as A1111 does (`vec[i] = embedded[i * k / n]`).
fn initial_vectors(
    clip: &sdkube_models::clip::ClipTextModel,
    tokenizer: &ClipTokenizer,
    init_text: &str,
    n: usize,
) -> Result<Tensor, TrainError> {
    let text = if init_text.trim().is_empty() {
        "*"
    } else {
        init_text
    };
    let ids = tokenizer.encode(text);
    let device = clip.token_embeddings().device();
    if ids.is_empty() {
        return Ok(Tensor::zeros((n, clip.hidden_size()), DType::F32, device)?);
    }
    let k = ids.len();
    let picked: Vec<u32> = (0..n).map(|i| ids[i * k / n]).collect();
    let ids = Tensor::from_slice(&picked, (1, n), device)?;
    Ok(clip.embed_tokens(&ids)?.squeeze(0)?.to_dtype(DType::F32)?)
}

/// AdamW (weight decay 0, as A1111) whose moments can be saved with a checkpoint and
/// restored on resume (candle's optimizer keeps its state private).
struct Adam {
    vars: Vec<Var>,
    m: Vec<Tensor>,
    v: Vec<Tensor>,
    /// Steps taken, counting a resumed run's earlier ones (bias correction).
    t: usize,
    lr: f64,
}

impl Adam {
    const BETA1: f64 = 0.9;
    const BETA2: f64 = 0.999;
    const EPS: f64 = 1e-8;

    fn new(
        vars: Vec<Var>,
        lr: f64,
        t: usize,
        moments: Option<Moments>,
    ) -> Result<Self, TrainError> {
        let fresh = || -> candle_core::Result<(Vec<Tensor>, Vec<Tensor>)> {
            let zeros = vars
                .iter()
                .map(|v| v.as_tensor().zeros_like())
                .collect::<candle_core::Result<Vec<_>>>()?;
            Ok((zeros.clone(), zeros))
        };
        let (m, v) = match moments {
            Some(mo)
                if mo.m.len() == vars.len()
                    && mo
                        .m
                        .iter()
                        .zip(&vars)
                        .all(|(m, var)| m.dims() == var.dims()) =>
            {
                let dev = vars[0].device();
                (
                    mo.m.iter()
                        .map(|t| t.to_device(dev))
                        .collect::<candle_core::Result<_>>()?,
                    mo.v.iter()
                        .map(|t| t.to_device(dev))
                        .collect::<candle_core::Result<_>>()?,
                )
            }
            _ => fresh()?,
        };
        Ok(Self { vars, m, v, t, lr })
    }

    fn backward_step(&mut self, loss: &Tensor) -> Result<(), TrainError> {
        let grads = loss.backward()?;
        self.t += 1;
        let c1 = 1.0 - Self::BETA1.powi(self.t as i32);
        let c2 = 1.0 - Self::BETA2.powi(self.t as i32);
        for ((var, m), v) in self.vars.iter().zip(&mut self.m).zip(&mut self.v) {
            let Some(g) = grads.get(var.as_tensor()) else {
                continue;
            };
            *m = ((&*m * Self::BETA1)? + (g * (1.0 - Self::BETA1))?)?;
            *v = ((&*v * Self::BETA2)? + (g.sqr()? * (1.0 - Self::BETA2))?)?;
            let update = ((&*m / c1)? / ((&*v / c2)?.sqrt()? + Self::EPS)?)?;
            var.set(&(var.as_tensor() - (update * self.lr)?)?)?;
        }
        Ok(())
    }

    fn moments(&self) -> Moments {
        Moments {
            m: self.m.clone(),
            v: self.v.clone(),
        }
    }
}

/// AdamW's first and second moments, one per learned tensor.
struct Moments {
    m: Vec<Tensor>,
    v: Vec<Tensor>,
}

fn optim_path(out: &Path) -> PathBuf {
    let mut name = out.as_os_str().to_owned();
    name.push(".optim.safetensors");
    PathBuf::from(name)
}

fn read_moments(out: &Path) -> Option<Moments> {
    let t = candle_core::safetensors::load(optim_path(out), &Device::Cpu).ok()?;
    let (mut m, mut v) = (Vec::new(), Vec::new());
    for i in 0.. {
        match (t.get(&format!("m.{i}")), t.get(&format!("v.{i}"))) {
            (Some(a), Some(b)) => {
                m.push(a.clone());
                v.push(b.clone());
            }
            _ => break,
        }
    }
    (!m.is_empty()).then_some(Moments { m, v })
}

/// Writes `vectors` to `out` in the format its extension names, atomically, then the
/// `.train.json` state.
fn save_checkpoint(
    out: &Path,
    vectors: &EmbeddingVectors,
    state: &CheckpointState,
    moments: Option<&Moments>,
) -> Result<(), TrainError> {
    let mut tensors: HashMap<String, Tensor> = HashMap::new();
    match &vectors.second {
        None => {
            tensors.insert("emb_params".into(), vectors.first.clone());
        }
        Some(g) => {
            tensors.insert("clip_l".into(), vectors.first.clone());
            tensors.insert("clip_g".into(), g.clone());
        }
    }
    let dir = out
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir).map_err(io_error(dir))?;
    let file_name = out
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    // The optimizer state first, the embedding next, the step last: the step file is what a
    // resume trusts, so a crash in between never pairs a step with older vectors.
    let optim = optim_path(out);
    match moments {
        Some(mo) => {
            let mut t: HashMap<String, Tensor> = HashMap::new();
            for (i, (m, v)) in mo.m.iter().zip(&mo.v).enumerate() {
                t.insert(format!("m.{i}"), m.to_device(&Device::Cpu)?);
                t.insert(format!("v.{i}"), v.to_device(&Device::Cpu)?);
            }
            let tmp = dir.join(format!(".{file_name}.optim.partial"));
            candle_core::safetensors::save(&t, &tmp)?;
            std::fs::rename(&tmp, &optim).map_err(io_error(&optim))?;
        }
        None => {
            // A new embedding replacing an old one must not inherit its moments.
            let _ = std::fs::remove_file(&optim);
        }
    }
    let tmp = dir.join(format!(".{file_name}.partial"));
    if out.extension().is_some_and(|e| e == "pt") {
        // `save_torch_zip` itself writes through a temporary file and renames.
        sdkube_weights::save_torch_zip(out, &tensors)?;
    } else {
        candle_core::safetensors::save(&tensors, &tmp)?;
        std::fs::rename(&tmp, out).map_err(io_error(out))?;
    }
    let json = state_path(out);
    let tmp = dir.join(format!(".{file_name}.train.json.partial"));
    let text = serde_json::to_string_pretty(state)
        .map_err(|e| TrainError::Invalid(format!("writing the training state: {e}")))?;
    std::fs::write(&tmp, text).map_err(io_error(&tmp))?;
    std::fs::rename(&tmp, &json).map_err(io_error(&json))?;
    Ok(())
}

fn state_path(out: &Path) -> PathBuf {
    let mut name = out.as_os_str().to_owned();
    name.push(".train.json");
    PathBuf::from(name)
}

/// `(vectors, step)` of the checkpoint to resume from, or `None` to start afresh.
fn resume_point(
    opts: &TrainOptions,
    widths: TextWidths,
) -> Result<Option<(EmbeddingVectors, usize)>, TrainError> {
    if !opts.out.exists() {
        return Ok(None);
    }
    if !opts.resume {
        return Err(TrainError::Exists(opts.out.clone()));
    }
    let vectors = read_embedding(&opts.out)?;
    let dims_ok = vectors.first.dims() == [opts.vectors, widths.first]
        && match (&vectors.second, widths.second) {
            (None, None) => true,
            (Some(g), Some(w)) => g.dims() == [opts.vectors, w],
            _ => false,
        };
    if !dims_ok {
        return Err(TrainError::Invalid(format!(
            "{} holds {} vectors of shape {:?}, not {} for this model; it cannot be resumed",
            opts.out.display(),
            vectors.count(),
            vectors.first.dims(),
            opts.vectors
        )));
    }
    let json = state_path(&opts.out);
    let step = match std::fs::read_to_string(&json) {
        Ok(text) => {
            serde_json::from_str::<CheckpointState>(&text)
                .map_err(|e| TrainError::Invalid(format!("{}: {e}", json.display())))?
                .step
        }
        Err(_) => 0,
    };
    Ok(Some((vectors, step)))
}

/// Trains `opts.name` on `weights` (networks built on `device` in `dtype`, vectors in f32).
/// `on_step` sees every step and may stop the run; the state at that point is saved.
pub fn train_embedding(
    weights: &SdWeights,
    device: &Device,
    dtype: DType,
    opts: &TrainOptions,
    on_step: &mut dyn FnMut(&TrainProgress) -> Flow,
) -> Result<TrainOutcome, TrainError> {
    let tokenizer = ClipTokenizer::shared().map_err(|e| TrainError::Invalid(e.to_string()))?;
    validate(opts, tokenizer)?;
    let widths = TextWidths::of(weights);
    let resumed = resume_point(opts, widths)?;
    let image_paths = list_images(&opts.images)?;
    let captions = opts.template.lines();

    // Latents once, then the VAE is dropped.
    let scaling = weights.vae.config.scaling_factor;
    let examples = {
        let vae = weights.vae.build(device, dtype)?;
        let side = opts.size as u32;
        image_paths
            .iter()
            .map(|path| {
                let img = crop_resize(&read_image(path)?, side, side).to_rgb8();
                let x = image_to_tensor(&img, device, dtype)?;
                let latent = (vae.encode(&x)?.mean * scaling)?.to_dtype(DType::F32)?;
                Ok(Example {
                    latent,
                    filewords: filewords(path)?,
                })
            })
            .collect::<Result<Vec<_>, TrainError>>()?
    };

    let clip = weights.text_encoder.build(device, dtype)?;
    let clip_g = weights
        .text_encoder_2
        .as_ref()
        .map(|c| c.build(device, dtype))
        .transpose()?;
    let unet = weights.unet.build(device, dtype)?;

    let (start, first_step) = match resumed {
        Some((v, step)) => (v, step),
        None => (
            EmbeddingVectors {
                first: initial_vectors(&clip, tokenizer, &opts.init_text, opts.vectors)?,
                second: clip_g
                    .as_ref()
                    .map(|g| initial_vectors(g, tokenizer, &opts.init_text, opts.vectors))
                    .transpose()?,
            },
            0,
        ),
    };
    let learned = LearnedVectors {
        name: opts.name.clone(),
        first: Var::from_tensor(&start.first.to_device(device)?.to_dtype(DType::F32)?)?,
        second: start
            .second
            .map(|g| Var::from_tensor(&g.to_device(device)?.to_dtype(DType::F32)?))
            .transpose()?,
    };
    let mut vars = vec![learned.first.clone()];
    vars.extend(learned.second.clone());
    let moments = if first_step > 0 {
        read_moments(&opts.out)
    } else {
        None
    };
    if first_step > 0 && moments.is_none() {
        tracing::warn!("no optimizer state beside the checkpoint: AdamW's moments start afresh");
    }
    let mut optimizer = Adam::new(vars, opts.learning_rate, first_step, moments)?;
    let mut index = EmbeddingIndex::new();
    index
        .insert(tokenizer, &opts.name, opts.vectors)
        .map_err(|e| TrainError::Invalid(e.to_string()))?;

    let schedule = NoiseSchedule::stable_diffusion();
    let nets = Networks {
        encoders: TextEncoders {
            family: weights.family,
            clip: &clip,
            clip_g: clip_g.as_ref(),
            embeddings: Some(&learned),
        },
        unet: &unet,
        prediction: weights.prediction,
        alphas: schedule.alphas_cumprod(),
        tokenizer,
        index: &index,
        size: opts.size,
        device,
        dtype,
    };
    let validation_caption = caption(captions[0], &opts.name, "");
    let validate = |nets: &Networks| -> Result<f32, TrainError> {
        nets.validation_loss(&examples, &validation_caption, opts.batch_size, opts.seed)
    };
    let validation_before = if opts.validation {
        Some(validate(&nets)?)
    } else {
        None
    };
    let sample_dir = opts.sample_dir.clone().unwrap_or_else(|| {
        let mut dir = opts.out.with_extension("").into_os_string();
        dir.push("-samples");
        PathBuf::from(dir)
    });
    let state = |step| CheckpointState {
        name: opts.name.clone(),
        step,
        vectors: opts.vectors,
    };

    let mut losses = Vec::new();
    let mut trained_for = 0.0;
    let mut step = first_step;
    let mut cancelled = false;
    while step < opts.steps {
        let started = Instant::now();
        let mut rng = step_rng(opts.seed, step as u64);
        let picks = batch_indices(opts.seed, step, opts.batch_size, examples.len());
        let captions_now: Vec<String> = picks
            .iter()
            .map(|&i| {
                let line = captions[rand::Rng::random_range(&mut rng, 0..captions.len())];
                caption(line, &opts.name, &examples[i].filewords)
            })
            .collect();
        let timesteps: Vec<usize> = (0..picks.len())
            .map(|_| rand::Rng::random_range(&mut rng, 0..nets.alphas.len()))
            .collect();
        let loss = nets.loss(
            &examples,
            &picks,
            &captions_now,
            &timesteps,
            opts.seed ^ (step as u64).wrapping_mul(0x9E37_79B9),
        )?;
        optimizer.backward_step(&loss)?;
        let loss = loss.to_scalar::<f32>()?;
        if !loss.is_finite() {
            return Err(TrainError::Invalid(format!(
                "the loss became {loss} at step {}; lower the learning rate (the last \
                 checkpoint is kept)",
                step + 1
            )));
        }
        trained_for += started.elapsed().as_secs_f64();
        losses.push(loss);
        step += 1;

        let due = |every: usize| every > 0 && step.is_multiple_of(every);
        let save = || {
            save_checkpoint(
                &opts.out,
                &learned.snapshot()?,
                &state(step),
                Some(&optimizer.moments()),
            )
        };
        let mut checkpoint = None;
        if due(opts.checkpoint_every) || due(opts.sample_every) || step == opts.steps {
            save()?;
            checkpoint = Some(opts.out.clone());
        }
        let sample = if due(opts.sample_every) {
            Some(write_sample(
                weights,
                device,
                dtype,
                opts,
                captions[0],
                &sample_dir,
                step,
            )?)
        } else {
            None
        };
        let recent = &losses[losses.len().saturating_sub(32)..];
        let progress = TrainProgress {
            step,
            total: opts.steps,
            loss,
            average_loss: recent.iter().sum::<f32>() / recent.len() as f32,
            checkpoint: checkpoint.clone(),
            sample,
        };
        if on_step(&progress) == Flow::Stop {
            if checkpoint.is_none() {
                save()?;
            }
            cancelled = step < opts.steps;
            break;
        }
    }
    if step == first_step {
        // Nothing to do (a resumed run already at `steps`): the file is as it was.
        tracing::info!(step, "embedding already trained for the requested steps");
    }
    let validation_loss = match validation_before {
        Some(before) => Some((before, validate(&nets)?)),
        None => None,
    };
    Ok(TrainOutcome {
        validation_loss,
        path: opts.out.clone(),
        first_step,
        step,
        steps_per_second: if trained_for > 0.0 {
            losses.len() as f64 / trained_for
        } else {
            0.0
        },
        losses,
        cancelled,
    })
}

/// Timesteps of the validation set: spread over the schedule.
const VALIDATION_TIMESTEPS: [usize; 4] = [100, 350, 600, 850];

/// A template line with its placeholders filled.
fn caption(line: &str, name: &str, filewords: &str) -> String {
    line.replace("[name]", name)
        .replace("[filewords]", filewords)
}

/// The frozen networks and what a loss needs besides the batch.
struct Networks<'a> {
    encoders: TextEncoders<'a>,
    unet: &'a UNet2DConditionModel,
    prediction: Prediction,
    alphas: &'a [f64],
    tokenizer: &'a ClipTokenizer,
    index: &'a EmbeddingIndex,
    size: usize,
    device: &'a Device,
    dtype: DType,
}

impl Networks<'_> {
    /// The denoising loss of examples `picks` with `captions`, noised at `timesteps` with
    /// noise drawn from `noise_seed`: mean squared error of the UNet's ε (or v) prediction.
    fn loss(
        &self,
        examples: &[Example],
        picks: &[usize],
        captions: &[String],
        timesteps: &[usize],
        noise_seed: u64,
    ) -> Result<Tensor, TrainError> {
        let (device, dtype, b) = (self.device, self.dtype, picks.len());
        // The loss in f32 at least (f64 networks keep f64, for gradient checks).
        let precise = if dtype == DType::F64 {
            DType::F64
        } else {
            DType::F32
        };
        let mut prompts: Vec<PromptTokens> = captions
            .iter()
            .map(|c| PromptTokens::new(self.tokenizer, c, self.index))
            .collect();
        let chunks = prompts
            .iter()
            .map(PromptTokens::chunk_count)
            .max()
            .unwrap_or(1);
        let mut contexts = Vec::with_capacity(b);
        let mut pooled = Vec::new();
        for p in &mut prompts {
            p.pad_to(chunks);
            let cond = text::encode(&self.encoders, p, 1)?;
            contexts.push(cond.context);
            pooled.extend(cond.pooled);
        }
        let context = Tensor::cat(&contexts, 0)?;
        let x0 = Tensor::cat(
            &picks
                .iter()
                .map(|&i| &examples[i].latent)
                .collect::<Vec<_>>(),
            0,
        )?
        .to_dtype(precise)?;
        let noise = SeededNoise::new(noise_seed)
            .noise(&x0, 0.0, 0.0)
            .map_err(crate::Error::from)?;
        let coef = |f: &dyn Fn(f64) -> f64| -> Result<Tensor, TrainError> {
            let v: Vec<f32> = timesteps
                .iter()
                .map(|&t| f(self.alphas[t]) as f32)
                .collect();
            Ok(Tensor::from_vec(v, (b, 1, 1, 1), device)?.to_dtype(precise)?)
        };
        let (sqrt_a, sqrt_1ma) = (coef(&|a| a.sqrt())?, coef(&|a| (1.0 - a).sqrt())?);
        let noisy = (x0.broadcast_mul(&sqrt_a)? + noise.broadcast_mul(&sqrt_1ma)?)?;
        let target = match self.prediction {
            Prediction::Epsilon => noise.clone(),
            Prediction::V => (noise.broadcast_mul(&sqrt_a)? - x0.broadcast_mul(&sqrt_1ma)?)?,
        };
        let t: Vec<f32> = timesteps.iter().map(|&t| t as f32).collect();
        let t = Tensor::from_vec(t, b, device)?;
        let added = if pooled.is_empty() {
            None
        } else {
            let s = self.size as f32;
            let ids = Tensor::from_slice(&[s, s, 0.0, 0.0, s, s], (1, 6), device)?;
            Some(AddedConditioning {
                text_embeds: Tensor::cat(&pooled, 0)?.to_dtype(dtype)?,
                time_ids: ids.repeat((b, 1))?.to_dtype(dtype)?,
            })
        };
        let prediction = self.unet.forward(
            &noisy.to_dtype(dtype)?,
            &t,
            &context.to_dtype(dtype)?,
            added.as_ref(),
        )?;
        Ok((prediction.to_dtype(precise)? - &target)?
            .sqr()?
            .mean_all()?)
    }

    /// Mean loss of every example at [`VALIDATION_TIMESTEPS`] with fixed noise.
    fn validation_loss(
        &self,
        examples: &[Example],
        caption: &str,
        batch: usize,
        seed: u64,
    ) -> Result<f32, TrainError> {
        let mut total = 0.0;
        let mut count = 0;
        let all: Vec<usize> = (0..examples.len()).collect();
        for &t in &VALIDATION_TIMESTEPS {
            for picks in all.chunks(batch) {
                let captions = vec![caption.to_string(); picks.len()];
                let loss = self.loss(
                    examples,
                    picks,
                    &captions,
                    &vec![t; picks.len()],
                    seed ^ 0x0A11_DA7E ^ ((t as u64) << 32) ^ picks[0] as u64,
                )?;
                total += loss.to_scalar::<f32>()? * picks.len() as f32;
                count += picks.len();
            }
        }
        Ok(total / count as f32)
    }
}

/// A seeded generator for step `step` alone (resumable: no state carried between steps).
fn step_rng(seed: u64, step: u64) -> rand::rngs::StdRng {
    rand::rngs::StdRng::seed_from_u64(seed.wrapping_mul(0x2545_F491_4F6C_DD1D) ^ step)
}

/// Images of step `step`: epochs walk a seeded permutation, so every image is seen once
/// per epoch.
fn batch_indices(seed: u64, step: usize, batch: usize, n: usize) -> Vec<usize> {
    (0..batch)
        .map(|j| {
            let k = step * batch + j;
            let epoch = (k / n) as u64;
            let mut order: Vec<usize> = (0..n).collect();
            order.shuffle(&mut step_rng(seed ^ 0x5EED, epoch));
            order[k % n]
        })
        .collect()
}

/// Generates one image with the checkpoint just written and saves it as
/// `<sample_dir>/<name>-<step>.png` (with its infotext).
fn write_sample(
    weights: &SdWeights,
    device: &Device,
    dtype: DType,
    opts: &TrainOptions,
    line: &str,
    dir: &Path,
    step: usize,
) -> Result<PathBuf, TrainError> {
    let mut engine = Engine::new(
        weights.clone(),
        &opts.name,
        device.clone(),
        dtype,
        VramMode::Low,
    )?;
    let mut set = EmbeddingSet::empty(TextWidths::of(weights));
    set.insert(
        &opts.name,
        read_embedding(&opts.out)?,
        &opts.out,
        &short_hash(&opts.out)?,
    );
    engine.set_embeddings(set);
    let req = Request {
        prompt: caption(line, &opts.name, ""),
        sampler: "Euler a".into(),
        steps: opts.sample_steps.max(1),
        seed: opts.seed,
        width: opts.size,
        height: opts.size,
        ..Default::default()
    };
    let image = engine.generate(&req, &mut |_| Flow::Continue)?.remove(0);
    let png = encode_png(&image.image, Some(&image.infotext))?;
    std::fs::create_dir_all(dir).map_err(io_error(dir))?;
    let path = dir.join(format!("{}-{step}.png", opts.name));
    std::fs::write(&path, png).map_err(io_error(&path))?;
    Ok(path)
}

#[cfg(test)]
mod tests {
    //! Gradients reach the learned vectors exactly: the analytic directional derivative
    //! matches central finite differences (f64 networks).

    use super::*;

    fn fixture(name: &str) -> SdWeights {
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fixtures/sd");
        sdkube_models::load(&root.join(name), &Default::default()).unwrap()
    }

    /// (analytic, numeric) directional derivative of `f` at the vectors, along the
    /// normalised gradient.
    fn directional(learned: &LearnedVectors, f: &dyn Fn(&LearnedVectors) -> Tensor) -> (f64, f64) {
        let loss = f(learned);
        let grads = loss.backward().unwrap();
        let g = grads.get(learned.first.as_tensor()).unwrap().clone();
        let norm = g
            .sqr()
            .unwrap()
            .sum_all()
            .unwrap()
            .to_scalar::<f64>()
            .unwrap()
            .sqrt();
        assert!(norm > 0.0, "no gradient reached the vectors");
        let d = (g / norm).unwrap();
        let eps = 1e-4;
        let at = |sign: f64| {
            let base = learned.first.as_tensor().clone();
            let moved = LearnedVectors {
                name: learned.name.clone(),
                first: Var::from_tensor(&(&base + (&d * (sign * eps)).unwrap()).unwrap()).unwrap(),
                second: None,
            };
            f(&moved).to_scalar::<f64>().unwrap()
        };
        (norm, (at(1.0) - at(-1.0)) / (2.0 * eps))
    }

    #[test]
    fn text_encoder_gradient_matches_finite_differences() {
        let w = fixture("sd1");
        let clip = w.text_encoder.build(&Device::Cpu, DType::F64).unwrap();
        let tokenizer = ClipTokenizer::shared().unwrap();
        let mut index = EmbeddingIndex::new();
        index.insert(tokenizer, "tidisc", 2).unwrap();
        let start = initial_vectors(&clip, tokenizer, "red ball", 2).unwrap();
        let learned = LearnedVectors {
            name: "tidisc".into(),
            first: Var::from_tensor(&start.to_dtype(DType::F64).unwrap()).unwrap(),
            second: None,
        };
        let target = SeededNoise::new(5)
            .noise(
                &Tensor::zeros((1, 77, 8), DType::F64, &Device::Cpu).unwrap(),
                0.0,
                0.0,
            )
            .unwrap();
        let f = |l: &LearnedVectors| {
            let enc = TextEncoders {
                family: w.family,
                clip: &clip,
                clip_g: None,
                embeddings: Some(l),
            };
            let p = PromptTokens::new(tokenizer, "a photo of a tidisc", &index);
            let z = text::encode(&enc, &p, 1).unwrap().context;
            (z - &target).unwrap().sqr().unwrap().mean_all().unwrap()
        };
        let (analytic, numeric) = directional(&learned, &f);
        let rel = (analytic - numeric).abs() / analytic;
        assert!(rel < 1e-5, "analytic {analytic} numeric {numeric}");
    }

    /// Through the UNet too: its attention softmax and transformer-block layer norms switch
    /// to their differentiable forms under gradient tracking (`sdkube_models::blocks`).
    #[test]
    fn denoising_gradient_matches_finite_differences() {
        let w = fixture("sd1");
        let (dev, dt) = (Device::Cpu, DType::F64);
        let clip = w.text_encoder.build(&dev, dt).unwrap();
        let unet = w.unet.build(&dev, dt).unwrap();
        let tokenizer = ClipTokenizer::shared().unwrap();
        let mut index = EmbeddingIndex::new();
        index.insert(tokenizer, "tidisc", 2).unwrap();
        let start = initial_vectors(&clip, tokenizer, "red ball", 2).unwrap();
        let learned = LearnedVectors {
            name: "tidisc".into(),
            first: Var::from_tensor(&start.to_dtype(dt).unwrap()).unwrap(),
            second: None,
        };
        let examples = vec![Example {
            latent: SeededNoise::new(9)
                .noise(
                    &Tensor::zeros((1, 4, 4, 4), DType::F32, &dev).unwrap(),
                    0.0,
                    0.0,
                )
                .unwrap(),
            filewords: String::new(),
        }];
        let schedule = NoiseSchedule::stable_diffusion();
        let f = |l: &LearnedVectors| {
            let nets = Networks {
                encoders: TextEncoders {
                    family: w.family,
                    clip: &clip,
                    clip_g: None,
                    embeddings: Some(l),
                },
                unet: &unet,
                prediction: w.prediction,
                alphas: schedule.alphas_cumprod(),
                tokenizer,
                index: &index,
                size: 32,
                device: &dev,
                dtype: dt,
            };
            nets.loss(&examples, &[0], &["a photo of a tidisc".into()], &[500], 1)
                .unwrap()
                .to_dtype(DType::F64)
                .unwrap()
        };
        let (analytic, numeric) = directional(&learned, &f);
        let rel = (analytic - numeric).abs() / analytic;
        assert!(rel < 1e-4, "analytic {analytic} numeric {numeric}");
    }
}
