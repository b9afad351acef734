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
//!
//! The parts: `dataset` (training images, their words, caption templates, the seeded
//! order of batches), `vectors` (the learned vectors and where they start),
//! `optimizer` (AdamW with moments that survive a resume), `checkpoint` (what is written
//! beside the embedding and read back on resume), `loss` (the denoising loss through the
//! frozen networks); this module holds the settings and the loop.

mod checkpoint;
mod dataset;
mod loss;
mod optimizer;
mod vectors;

use std::path::{Path, PathBuf};
use std::time::Instant;

use candle_core::{DType, Device, Var};
use sdkube_models::SdWeights;

use crate::embeddings::{read_embedding, short_hash, EmbeddingSet, EmbeddingVectors, TextWidths};
use crate::generate::{Engine, Request, VramMode};
use crate::image_io::{crop_resize, encode_png, image_to_tensor, read_image};
use crate::prompt::{EmbeddingIndex, CHUNK_TEXT_TOKENS};
use crate::sampler::{Flow, NoiseSchedule};
use crate::text::TextEncoders;
use crate::tokenizer::ClipTokenizer;

use checkpoint::{read_moments, resume_point, save_checkpoint, CheckpointState};
use dataset::{batch_indices, caption, filewords, step_rng, Example};
use loss::Networks;
use optimizer::Adam;
use vectors::{initial_vectors, LearnedVectors};

pub use dataset::{list_images, Template, IMAGE_EXTENSIONS};
pub use vectors::create_embedding;

/// Why training could not start or continue.
#[derive(Debug, thiserror::Error)]
pub enum TrainError {
    /// The settings or files cannot be used; the message says why.
    #[error("{0}")]
    Invalid(String),
    /// The output exists and `resume` was not asked for.
    #[error(
        "{} already exists; pass --resume to continue training it, or choose another --out",
        .0.display()
    )]
    Exists(PathBuf),
    /// A file could not be read or written.
    #[error("{}: {source}", path.display())]
    Io {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// Generating a sample failed.
    #[error(transparent)]
    Pipeline(#[from] crate::Error),
    /// The embedding to resume cannot be read.
    #[error(transparent)]
    Embedding(#[from] crate::embeddings::EmbeddingError),
    /// A checkpoint could not be written.
    #[error(transparent)]
    Weights(#[from] sdkube_weights::Error),
    /// A tensor operation failed.
    #[error("tensor computation failed: {0}")]
    Tensor(#[from] candle_core::Error),
}

fn io_error(path: &Path) -> impl FnOnce(std::io::Error) -> TrainError + '_ {
    move |source| TrainError::Io {
        path: path.to_path_buf(),
        source,
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
    /// AdamW's learning rate.
    pub learning_rate: f64,
    /// Images per step.
    pub batch_size: usize,
    /// Caption templates.
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
    /// Sampling steps of each sample image.
    pub sample_steps: usize,
    /// Continue from `out` (and its `.train.json`) if it exists.
    pub resume: bool,
    /// Seed of the image order, captions, timesteps and noise.
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
    /// Steps the run will make in all.
    pub total: usize,
    /// This step's loss.
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
    let unet = weights.build_unet(device, dtype)?;

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
