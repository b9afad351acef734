//! `sdkube generate`: txt2img / img2img / inpainting from the command line, through the same
//! pipeline as the server. Writes PNGs carrying A1111's "parameters" infotext. Nothing is
//! written unless every image of the run succeeded.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::Context;
use candle_core::Device;
use image::imageops::FilterType;
use image::DynamicImage;
use indicatif::{ProgressBar, ProgressStyle};
use sdkube_models::{LoadOptions, Prediction};
use sdkube_pipeline::control::{ControlMode, ControlNetLibrary, ControlUnit, ResizeMode};
use sdkube_pipeline::image_io::{encode_png, read_image};
use sdkube_pipeline::latent_upscale::LatentMode;
use sdkube_pipeline::sampler::Flow;
use sdkube_pipeline::{
    Engine, HiresError, HiresFix, Progress, Refiner, Request, StepCaching, VramMode,
};
use sdkube_restore::{Esrgan, TileOptions};

use sdkube_pipeline::scripts::{Cell, Mode};

use super::device::{DeviceArgs, Precision};

#[path = "generate_scripts.rs"]
mod scripts;
use super::fetch::StoreArgs;

/// A path is used as it is; otherwise a catalog name is looked up in the store and fetched
/// when missing.
pub(crate) fn resolve_model(model: &Path, store_args: &StoreArgs) -> anyhow::Result<PathBuf> {
    if model.exists() {
        return Ok(model.to_path_buf());
    }
    let name = model.to_string_lossy();
    let catalog = store_args.catalog().map_err(|u| anyhow::anyhow!(u.0))?;
    let Some(entry) = catalog.get(&name) else {
        anyhow::bail!(
            "{name}: no such file, and not a model of the catalog (see `sdkube models list`)"
        );
    };
    let store = store_args.open_store().map_err(|u| anyhow::anyhow!(u.0))?;
    if let Some(path) = store.model_path(&name) {
        return Ok(path);
    }
    eprintln!(
        "{name} is not in the store {}: fetching it",
        store_args.store.display()
    );
    let options = sdkube_store::FetchOptions::from_env();
    sdkube_store::fetch_blocking(&store, std::slice::from_ref(entry), &options, |event| {
        if let Ok(line) = serde_json::to_string(&event) {
            eprintln!("{line}");
        }
    })?;
    store
        .model_path(&name)
        .ok_or_else(|| anyhow::anyhow!("{name} was fetched but is not in the store"))
}

#[derive(clap::Args, Debug)]
pub struct Args {
    /// Model: a diffusers folder, a single-file checkpoint (.safetensors, .ckpt), or a
    /// catalog name (`sdkube models list`), fetched into the store on first use.
    #[arg(long, env = "SDKUBE_MODEL")]
    pub model: PathBuf,
    #[command(flatten)]
    pub store: StoreArgs,
    /// Separate VAE file replacing the model's (A1111 `--vae`).
    #[arg(long)]
    pub vae: Option<PathBuf>,
    /// Textual-inversion embeddings folder: a prompt word equal to a file stem uses it.
    #[arg(long, env = "SDKUBE_EMBEDDINGS")]
    pub embeddings: Option<PathBuf>,
    /// Folders of LoRA files that `<lora:name:w>` in the prompt names.
    #[arg(long, env = "SDKUBE_LORA_DIRS", value_delimiter = ',')]
    pub lora_dirs: Vec<PathBuf>,
    /// Diffusers folder whose configs replace those inferred from a single file.
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// Force v-prediction (SD 2.x 768-v single files without a .yaml beside them).
    #[arg(long)]
    pub v_prediction: bool,
    #[arg(long, short = 'p', default_value = "")]
    pub prompt: String,
    #[arg(long, short = 'n', default_value = "")]
    pub negative_prompt: String,
    /// A1111 sampler name (Euler a, DPM++ 2M Karras, …).
    #[arg(long, default_value = "Euler a")]
    pub sampler: String,
    /// Schedule type (Automatic, Karras, Exponential, SGM Uniform).
    #[arg(long)]
    pub scheduler: Option<String>,
    #[arg(long, default_value_t = 20)]
    pub steps: usize,
    #[arg(long, default_value_t = 7.0)]
    pub cfg_scale: f64,
    /// Seed; -1 (default) picks a random one, printed and stored in the infotext.
    #[arg(long, default_value_t = -1, allow_negative_numbers = true)]
    pub seed: i64,
    /// A1111's variation seed; -1 (default) picks a random one when --subseed-strength is set.
    #[arg(long, default_value_t = -1, allow_negative_numbers = true)]
    pub subseed: i64,
    /// How far each image's noise moves towards its variation seed's (0 = off, 1 = all).
    #[arg(long, default_value_t = 0.0)]
    pub subseed_strength: f64,
    /// A1111's "Resize seed from": WIDTHxHEIGHT whose noise the seed keeps, centred.
    #[arg(long, value_parser = parse_size)]
    pub seed_resize_from: Option<(usize, usize)>,
    /// Seamless tiling (A1111's "Tiling"): the image's opposite edges continue each other.
    #[arg(long)]
    pub tiling: bool,
    #[arg(long, default_value_t = 512)]
    pub width: usize,
    #[arg(long, default_value_t = 512)]
    pub height: usize,
    #[arg(long, default_value_t = 1)]
    pub batch_size: usize,
    /// A1111's clip skip (1 = last layer).
    #[arg(long, default_value_t = 1)]
    pub clip_skip: usize,
    /// Step caching (DeepCache): every this many steps one runs the whole UNet, the others
    /// only its shallow branch on the deep features kept (1 = off). Faster, less faithful.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=1000))]
    pub step_cache_interval: u32,
    /// The skip connection the shallow branch ends at (0 = least computed; SD 1.x/2.x up to
    /// 11, SDXL up to 8).
    #[arg(long, default_value_t = 0)]
    pub step_cache_branch: usize,
    /// Init image for img2img / inpainting.
    #[arg(long)]
    pub init_image: Option<PathBuf>,
    /// Denoising strength for img2img.
    #[arg(long, default_value_t = 0.75)]
    pub strength: f64,
    /// Inpainting mask (white = repaint); needs --init-image.
    #[arg(long)]
    pub mask: Option<PathBuf>,
    #[arg(long, default_value_t = 4)]
    pub mask_blur: u32,
    #[arg(long, default_value_t = 150)]
    pub max_steps: usize,
    /// Hires fix (A1111's "Hires. fix"): after the first pass, upscale by this factor (1 to 8)
    /// and run img2img at the larger size.
    #[arg(long)]
    pub hires_scale: Option<f64>,
    /// Hires fix: second-pass steps (0 = as many as the first pass).
    #[arg(long, default_value_t = 0)]
    pub hires_steps: usize,
    /// Hires fix: denoising strength of the second pass.
    #[arg(long, default_value_t = 0.7)]
    pub hires_denoise: f64,
    /// Hires fix: a Latent mode ("Latent", "Latent (bicubic)", … : the latent is resized),
    /// "Lanczos", "Nearest", "None", or a
    /// RealESRGAN weight file (`.pth`, `.safetensors`).
    #[arg(long, default_value = "Latent")]
    pub hires_upscaler: String,
    /// SDXL refiner (A1111's `refiner_checkpoint`): a model file, folder or catalog name that
    /// takes over the sampling once --refiner-switch-at of the schedule is done.
    #[arg(long)]
    pub refiner: Option<PathBuf>,
    /// The share of the schedule (0 to 1) after which the refiner denoises.
    #[arg(long, default_value_t = 0.8, requires = "refiner")]
    pub refiner_switch_at: f64,
    /// Folders of ControlNet files (`.safetensors`, `.pth`) and diffusers ControlNet folders.
    #[arg(long, env = "SDKUBE_CONTROLNET_DIRS", value_delimiter = ',')]
    pub controlnet_dirs: Vec<PathBuf>,
    /// ControlNet to steer with (a name in --controlnet-dirs); needs --control-image.
    #[arg(long, requires = "control_image")]
    pub controlnet: Option<String>,
    /// ControlNet: the control image (edges, depth, pose…), already preprocessed.
    #[arg(long, requires = "controlnet")]
    pub control_image: Option<PathBuf>,
    /// ControlNet: weight (0 to 2).
    #[arg(long, default_value_t = 1.0)]
    pub control_weight: f64,
    /// ControlNet: fraction of the steps before which it does not act.
    #[arg(long, default_value_t = 0.0)]
    pub control_start: f64,
    /// ControlNet: fraction of the steps after which it does not act.
    #[arg(long, default_value_t = 1.0)]
    pub control_end: f64,
    /// ControlNet: "Balanced", "My prompt is more important" or "ControlNet is more important".
    #[arg(long, default_value = "Balanced")]
    pub control_mode: String,
    /// ControlNet: "Just Resize", "Crop and Resize" or "Resize and Fill".
    #[arg(long, default_value = "Crop and Resize")]
    pub control_resize: String,
    /// A1111's scripts (X/Y/Z plot, prompt matrix, SD upscale).
    #[command(flatten)]
    pub scripts: Box<scripts::ScriptArgs>,
    /// Output folder.
    #[arg(long, default_value = "outputs")]
    pub out: PathBuf,
    #[command(flatten)]
    pub device: DeviceArgs,
}

/// The ControlNet unit the options describe, if any.
fn control_units(args: &Args) -> anyhow::Result<Vec<ControlUnit>> {
    let (Some(model), Some(image)) = (&args.controlnet, &args.control_image) else {
        return Ok(Vec::new());
    };
    Ok(vec![ControlUnit {
        weight: args.control_weight,
        guidance_start: args.control_start,
        guidance_end: args.control_end,
        mode: ControlMode::parse(&args.control_mode)?,
        resize_mode: ResizeMode::parse(&args.control_resize).map_err(anyhow::Error::msg)?,
        ..ControlUnit::new(model, read_image(image)?.to_rgb8())
    }])
}

/// An engine for `model` (a path or catalog name) on the command's device, with its limits,
/// embeddings, LoRA and ControlNet folders and refiner.
fn engine_for(args: &Args, model: &Path, opts: &LoadOptions) -> anyhow::Result<Engine> {
    let (device, dtype) = args.device.resolve()?;
    let vram: VramMode = args.device.vram.into();
    // Networks kept on the GPU are read straight onto it.
    let opts = LoadOptions {
        device: vram.read_onto(&device),
        ..opts.clone()
    };
    let weights = sdkube_models::load(&resolve_model(model, &args.store)?, &opts)?;
    let name = sdkube_models::model_name(model);
    let widths = sdkube_pipeline::embeddings::TextWidths::of(&weights);
    let mut engine = Engine::new(weights, &name, device, dtype, vram)?;
    engine.limits.max_steps = args.max_steps;
    if let Some(dir) = &args.embeddings {
        let set = sdkube_pipeline::embeddings::EmbeddingSet::load_dir(dir, widths)?;
        for (name, reason) in set.skipped() {
            eprintln!("embedding {name} skipped: {reason}");
        }
        engine.set_embeddings(set);
    }
    engine.set_loras(sdkube_pipeline::loras::LoraLibrary::new(
        args.lora_dirs.clone(),
    ));
    engine.set_controlnets(ControlNetLibrary::new(args.controlnet_dirs.clone()));
    if let Some(r) = &args.refiner {
        let weights =
            sdkube_models::load(&resolve_model(r, &args.store)?, &LoadOptions::default())?;
        let (device, dtype) = args.device.resolve()?;
        let refiner = Engine::new(
            weights,
            &sdkube_models::model_name(r),
            device,
            dtype,
            args.device.vram.into(),
        )?;
        engine.set_refiner(Some(refiner))?;
    }
    Ok(engine)
}

pub fn run(args: Args) -> anyhow::Result<ExitCode> {
    let init_image = args.init_image.as_deref().map(read_image).transpose()?;
    let mask = args
        .mask
        .as_deref()
        .map(|p| read_image(p).map(|m| m.to_luma8()))
        .transpose()?;
    let seed = if args.seed < 0 {
        sdkube_pipeline::random_seed()
    } else {
        args.seed as u64
    };
    let subseed = match args.subseed {
        s if s < 0 && args.subseed_strength != 0.0 => sdkube_pipeline::random_seed(),
        s => s.max(0) as u64,
    };
    let req = Request {
        prompt: args.prompt.clone(),
        negative_prompt: args.negative_prompt.clone(),
        sampler: args.sampler.clone(),
        scheduler: args.scheduler.clone(),
        steps: args.steps,
        cfg_scale: args.cfg_scale,
        seed,
        width: args.width,
        height: args.height,
        batch_size: args.batch_size,
        clip_skip: args.clip_skip,
        init_image,
        strength: args.strength,
        mask,
        mask_blur: args.mask_blur,
        subseed,
        subseed_strength: args.subseed_strength,
        seed_resize_from: args.seed_resize_from,
        tiling: args.tiling,
        step_caching: StepCaching {
            interval: args.step_cache_interval as usize,
            branch: args.step_cache_branch,
        },
        control: control_units(&args)?,
        refiner: args.refiner.as_ref().map(|r| Refiner {
            checkpoint: sdkube_models::model_name(r),
            switch_at: args.refiner_switch_at,
        }),
    };
    let opts = LoadOptions {
        prediction: args.v_prediction.then_some(Prediction::V),
        config_dir: args.config.clone(),
        vae: args.vae.clone(),
        ..LoadOptions::default()
    };
    let (_, dtype) = args.device.resolve()?;
    let name = sdkube_models::model_name(&args.model);
    let mut engine = engine_for(&args, &args.model, &opts)?;
    engine.validate(&req)?;
    let hires = args
        .hires_scale
        .map(|scale| {
            HiresFix::scaled(
                &req,
                scale,
                &args.hires_upscaler,
                args.hires_steps,
                args.hires_denoise,
            )
        })
        .transpose()?;
    // The upscaler is loaded before any work, so that a bad name fails at once.
    let mut upscaler = match &hires {
        Some(h) => {
            engine.validate(&h.second_pass(&req, seed, req.subseed))?;
            Some(ImageUpscaler::new(&h.upscaler, engine.device())?)
        }
        None => None,
    };
    eprintln!(
        "{} model {name} on {:?} ({}), seed {seed}",
        engine.family().name(),
        engine.device(),
        Precision::label(dtype)
    );
    let mode = match req.init_image {
        Some(_) => Mode::Img2Img,
        None => Mode::Txt2Img,
    };
    if let Some(script) = scripts::script_of(&args.scripts, mode)? {
        let base = Cell {
            request: req.clone(),
            hires: hires.clone(),
            checkpoint: None,
        };
        // A checkpoint axis's models: loaded as the command's, the --vae kept.
        let cell_opts = LoadOptions {
            vae: args.vae.clone(),
            ..LoadOptions::default()
        };
        let load = |model: &str| engine_for(&args, Path::new(model), &cell_opts);
        let images = scripts::run(&script, &base, engine, upscaler.as_mut(), &load)?;
        let pngs = images
            .iter()
            .map(|i| Ok((i.seed, encode_png(&i.image, Some(&i.infotext.to_string()))?)))
            .collect::<anyhow::Result<Vec<_>>>()?;
        return write_outputs(&args.out, pngs);
    }
    let bar = ProgressBar::new(args.steps as u64);
    bar.set_style(ProgressStyle::with_template(
        "{bar:40} {pos}/{len} steps  {elapsed} (eta {eta})",
    )?);
    let mut on_step = |p: &Progress| {
        bar.set_length(p.total as u64);
        bar.set_position(p.step as u64 + 1);
        Flow::Continue
    };
    let mut images = engine.generate(&req, &mut on_step)?;
    if let (Some(h), Some(upscaler)) = (&hires, upscaler.as_mut()) {
        let mut upscale = |_: &str, img: &DynamicImage, factor: f32| upscaler.run(img, factor);
        images = images
            .iter()
            .map(|g| {
                engine
                    .hires_fix(&req, g, h, &mut upscale, &mut on_step)
                    .map_err(|e| match e {
                        HiresError::Upscale(e) => e.context("hires fix upscaler"),
                        HiresError::Generate(e) => anyhow::Error::from(e).context("hires fix"),
                    })
            })
            .collect::<anyhow::Result<_>>()?;
    }
    bar.finish_and_clear();

    // Encode everything first so that a failure leaves nothing behind.
    let pngs = images
        .iter()
        .map(|g| Ok((g.seed, encode_png(&g.image, Some(&g.infotext))?)))
        .collect::<anyhow::Result<Vec<_>>>()?;
    write_outputs(&args.out, pngs)
}

/// Writes PNGs into `out`, numbered on after the highest present, as A1111 (and the server)
/// name outputs, and prints their paths.
fn write_outputs(out: &Path, pngs: Vec<(u64, Vec<u8>)>) -> anyhow::Result<ExitCode> {
    let outputs = sdkube_server::FolderGallery::new(out.to_path_buf());
    for (seed, png) in pngs {
        let name = outputs
            .save(&png, Some(seed))
            .with_context(|| format!("writing into {}", out.display()))?;
        println!("{}", out.join(name).display());
    }
    Ok(ExitCode::SUCCESS)
}

/// `WIDTHxHEIGHT` in pixels.
fn parse_size(s: &str) -> Result<(usize, usize), String> {
    let bad = || format!("{s:?}: expected WIDTHxHEIGHT, e.g. 512x768");
    let (w, h) = s.split_once('x').ok_or_else(bad)?;
    Ok((w.parse().map_err(|_| bad())?, h.parse().map_err(|_| bad())?))
}

/// The hires fix's image upscaler: a plain resize, or a RealESRGAN network from a file.
enum ImageUpscaler {
    Resize(Option<FilterType>),
    Esrgan(Box<Esrgan>),
}

impl ImageUpscaler {
    fn new(name: &str, device: &Device) -> anyhow::Result<Self> {
        Ok(match name {
            n if LatentMode::parse(n).is_some() || n.eq_ignore_ascii_case("None") => {
                Self::Resize(None)
            }
            n if n.eq_ignore_ascii_case("Lanczos") => Self::Resize(Some(FilterType::Lanczos3)),
            n if n.eq_ignore_ascii_case("Nearest") => Self::Resize(Some(FilterType::Nearest)),
            path => {
                let net = Esrgan::load(Path::new(path), None, device).with_context(|| {
                    format!(
                        "--hires-upscaler {path}: not a Latent mode, Lanczos, Nearest or None, \
                         and not a readable RealESRGAN weight file"
                    )
                })?;
                Self::Esrgan(Box::new(net))
            }
        })
    }

    fn run(&mut self, img: &DynamicImage, factor: f32) -> anyhow::Result<DynamicImage> {
        let (w, h) = (
            ((img.width() as f32 * factor).round() as u32).max(1),
            ((img.height() as f32 * factor).round() as u32).max(1),
        );
        Ok(match self {
            Self::Resize(None) => img.clone(),
            Self::Resize(Some(filter)) => img.resize_exact(w, h, *filter),
            Self::Esrgan(net) => net.upscale_image(img, &TileOptions::default(), Some(factor))?,
        })
    }
}
