//! `sdkube train-embedding`: textual-inversion training from the command line, through
//! the same `sdkube_pipeline::train` the server runs as a job. Prints a progress bar with
//! the loss, checkpoints to `--out` atomically, and continues a run with `--resume`.

use std::path::PathBuf;
use std::process::ExitCode;

use indicatif::{ProgressBar, ProgressStyle};
use sdkube_models::{LoadOptions, Prediction};
use sdkube_pipeline::sampler::Flow;
use sdkube_pipeline::train::{train_embedding, Template, TrainError, TrainOptions};

use super::device::{DeviceArgs, Precision};

#[derive(clap::Args, Debug)]
pub struct Args {
    /// Model: a diffusers folder, a single-file checkpoint (.safetensors, .ckpt), or a
    /// catalog name, fetched into the store on first use.
    #[arg(long, env = "SDKUBE_MODEL")]
    pub model: PathBuf,
    #[command(flatten)]
    pub store: super::fetch::StoreArgs,
    /// Separate VAE file replacing the model's (A1111 `--vae`).
    #[arg(long)]
    pub vae: Option<PathBuf>,
    /// Diffusers folder whose configs replace those inferred from a single file.
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// Force v-prediction (SD 2.x 768-v single files).
    #[arg(long)]
    pub v_prediction: bool,
    /// Folder of training images (png, jpg, webp); `NAME.txt` beside an image gives its
    /// `[filewords]`.
    #[arg(long)]
    pub images: PathBuf,
    /// The word prompts will use for the embedding.
    #[arg(long)]
    pub name: String,
    /// Text whose token embeddings start the vectors.
    #[arg(long, default_value = "*")]
    pub init_text: String,
    /// Vectors per token (1 to 75).
    #[arg(long, default_value_t = 1)]
    pub vectors: usize,
    /// Total steps (a resumed run counts its earlier steps).
    #[arg(long, default_value_t = 1000)]
    pub steps: usize,
    #[arg(long, default_value_t = 0.005)]
    pub learning_rate: f64,
    #[arg(long, default_value_t = 1)]
    pub batch_size: usize,
    /// Caption templates: `subject`, `style`, or a file with one caption per line using
    /// `[name]` and `[filewords]`.
    #[arg(long, default_value = "subject")]
    pub template: String,
    /// Training resolution (square, multiple of 8).
    #[arg(long, default_value_t = 512)]
    pub size: usize,
    /// Embedding file to write (.safetensors or .pt); default `embeddings/<name>.safetensors`.
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// Checkpoint every N steps (0: only at the end).
    #[arg(long, default_value_t = 500)]
    pub checkpoint_every: usize,
    /// Sample image every N steps (0: never).
    #[arg(long, default_value_t = 0)]
    pub sample_every: usize,
    /// Folder for sample images; default `<out>-samples/`.
    #[arg(long)]
    pub sample_dir: Option<PathBuf>,
    #[arg(long, default_value_t = 20)]
    pub sample_steps: usize,
    /// Continue from `--out` if it exists.
    #[arg(long)]
    pub resume: bool,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Also report the loss on a fixed validation set before and after.
    #[arg(long)]
    pub validation: bool,
    #[command(flatten)]
    pub device: DeviceArgs,
}

pub fn run(args: Args) -> anyhow::Result<ExitCode> {
    let template = match Template::parse(&args.template) {
        Ok(t) => t,
        Err(e) => return Ok(usage(&e)),
    };
    let out = args
        .out
        .clone()
        .unwrap_or_else(|| PathBuf::from("embeddings").join(format!("{}.safetensors", args.name)));
    let opts = TrainOptions {
        name: args.name.clone(),
        init_text: args.init_text.clone(),
        vectors: args.vectors,
        steps: args.steps,
        learning_rate: args.learning_rate,
        batch_size: args.batch_size,
        template,
        images: args.images.clone(),
        size: args.size,
        out,
        checkpoint_every: args.checkpoint_every,
        sample_every: args.sample_every,
        sample_dir: args.sample_dir.clone(),
        sample_steps: args.sample_steps,
        resume: args.resume,
        seed: args.seed,
        validation: args.validation,
    };
    let load = LoadOptions {
        prediction: args.v_prediction.then_some(Prediction::V),
        config_dir: args.config.clone(),
        vae: args.vae.clone(),
        ..LoadOptions::default()
    };
    let (device, dtype) = args.device.resolve()?;
    let model = super::generate::resolve_model(&args.model, &args.store)?;
    let weights = sdkube_models::load(&model, &load)?;
    eprintln!(
        "training {:?} ({} vectors) on {} model {} on {:?} ({}, vectors fp32)",
        opts.name,
        opts.vectors,
        weights.family.name(),
        args.model.display(),
        device,
        Precision::label(dtype)
    );
    let bar = ProgressBar::new(opts.steps as u64);
    bar.set_style(ProgressStyle::with_template(
        "{bar:40} {pos}/{len} steps  {msg}  {elapsed} (eta {eta})",
    )?);
    let result = train_embedding(&weights, &device, dtype, &opts, &mut |p| {
        bar.set_position(p.step as u64);
        bar.set_message(format!("loss {:.4} (avg {:.4})", p.loss, p.average_loss));
        if let Some(sample) = &p.sample {
            bar.println(format!("sample: {}", sample.display()));
        }
        Flow::Continue
    });
    bar.finish_and_clear();
    let outcome = match result {
        Ok(o) => o,
        Err(e @ (TrainError::Invalid(_) | TrainError::Exists(_))) => return Ok(usage(&e)),
        Err(e) => return Err(e.into()),
    };
    eprintln!(
        "steps {}..{} at {:.2} steps/s",
        outcome.first_step, outcome.step, outcome.steps_per_second
    );
    if let Some((before, after)) = outcome.validation_loss {
        eprintln!("validation loss {before:.5} -> {after:.5}");
    }
    println!("{}", outcome.path.display());
    Ok(ExitCode::SUCCESS)
}

fn usage(e: &TrainError) -> ExitCode {
    eprintln!("error: {e}");
    ExitCode::from(2)
}
