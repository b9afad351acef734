//! `sdkube upscale`: RealESRGAN super-resolution of image files.
//!
//! Every input is read and checked (format, size limit) and the model is loaded before
//! anything is written; each output appears atomically, and existing files are not replaced
//! unless `--overwrite` is given. Exit codes: 0 done, 1 an input or the weights were
//! unusable, 2 usage (bad flags, model not found).

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::Context;
use sdkube_restore::{Esrgan, EsrganArch, TileOptions};

use super::fetch::Usage;
use super::files::ImageFileArgs;

#[derive(clap::Args)]
pub struct Args {
    /// Images to upscale (PNG, JPEG or WebP).
    #[arg(required = true)]
    images: Vec<PathBuf>,
    /// A weight file (`.pth` release or `.safetensors`), or a model name in the store
    /// (e.g. `realesrgan-x4plus`).
    #[arg(long, short)]
    model: String,
    /// Force the architecture instead of reading it off the weights (e.g. RealESRGAN_x4plus,
    /// realesr-general-x4v3).
    #[arg(long)]
    arch: Option<String>,
    /// Output size as a multiple of the input (default: the network's own scale).
    #[arg(long)]
    scale: Option<f32>,
    /// Tile size in input pixels; 0 processes each image in one piece.
    #[arg(long, default_value_t = 128)]
    tile: usize,
    /// Context pixels read around each tile.
    #[arg(long, default_value_t = 10)]
    tile_pad: usize,
    /// Reflection padding added to the bottom/right before inference.
    #[arg(long, default_value_t = 10)]
    pre_pad: usize,
    #[command(flatten)]
    files: ImageFileArgs,
}

pub fn run(args: Args) -> anyhow::Result<ExitCode> {
    match plan(&args) {
        Ok((model, arch, outputs)) => execute(&args, &model, arch, &outputs),
        Err(usage) => Ok(usage.report()),
    }
}

/// Resolves everything that is the operator's to fix (exit 2) before any work.
fn plan(args: &Args) -> Result<(PathBuf, Option<EsrganArch>, Vec<PathBuf>), Usage> {
    if let Some(s) = args.scale {
        if !(s > 0.0 && s <= 16.0) {
            return Err(Usage(format!("--scale {s} must be in (0, 16]")));
        }
    }
    let arch = match &args.arch {
        None => None,
        Some(name) => Some(EsrganArch::preset(name).ok_or_else(|| {
            Usage(format!(
                "unknown --arch {name}; known: {}",
                EsrganArch::PRESETS.join(", ")
            ))
        })?),
    };
    let model = args.files.find_model(&args.model, |p| p.is_file())?;
    let outputs = args.files.outputs(&args.images)?;
    Ok((model, arch, outputs))
}

fn execute(
    args: &Args,
    model: &Path,
    arch: Option<EsrganArch>,
    outputs: &[PathBuf],
) -> anyhow::Result<ExitCode> {
    let images = args.files.read_inputs(&args.images)?;
    let device = args.files.device()?;
    let net = Esrgan::load(model, arch, &device)?;
    tracing::info!(model = %model.display(), arch = ?net.arch(), "loaded");
    let opts = TileOptions {
        tile: args.tile,
        tile_pad: args.tile_pad,
        pre_pad: args.pre_pad,
    };
    let mut upscaled = Vec::with_capacity(images.len());
    for (img, input) in images.iter().zip(&args.images) {
        let started = std::time::Instant::now();
        let out = net
            .upscale_image(img, &opts, args.scale)
            .with_context(|| format!("upscaling {}", input.display()))?;
        tracing::info!(
            input = %input.display(),
            from = %format!("{}x{}", img.width(), img.height()),
            to = %format!("{}x{}", out.width(), out.height()),
            seconds = started.elapsed().as_secs_f32(),
            "upscaled"
        );
        upscaled.push(out);
    }
    args.files.write_outputs(&upscaled, outputs)?;
    Ok(ExitCode::SUCCESS)
}
