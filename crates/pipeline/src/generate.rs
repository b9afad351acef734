//! The txt2img / img2img / inpainting pipeline: text → conditioning, sampling with CFG,
//! VAE decode with the fp32 fallback, images with their infotext.

use std::time::Instant;

use candle_core::{DType, Device, Tensor};
use image::{DynamicImage, GrayImage, RgbImage};
use sdkube_models::clip::ClipTextModel;
use sdkube_models::controlnet::ControlNetModel;
use sdkube_models::lora::Part;
use sdkube_models::unet::{StepCache, StepCaching, UNet2DConditionModel};
use sdkube_models::vae::AutoencoderKL;
use sdkube_models::{Family, SdWeights};
use sdkube_nn::with_circular_padding;

use crate::control::{self, ActiveUnits, ControlNetCache, ControlNetLibrary, ControlUnit};
use crate::embeddings::{EmbeddingSet, TextWidths};
use crate::image_io::{crop_resize, latent_preview, tensor_to_images};
use crate::infotext::{self, ImageInfo, Infotext};
use crate::init_image::{blend, blurred_mask, overlay, prepare_init};
use crate::loras::{self, LoraLibrary, LoraNetworks};
use crate::prompt::{parse_prompt_attention, BREAK_WEIGHT};
use crate::refiner::{Refiner, RefinerStage, StageUNets, UNetRef};
use crate::sampler::{
    self, Flow, ModelScalings, NoiseSchedule, Plan, SamplerError, SamplerSpec, StepInfo,
};
use crate::text::{self, stack_conditioning, Conditioning, PromptTokens, TextEncoders};
use crate::tokenizer::ClipTokenizer;
use crate::vae_decode::decode_checked;
use crate::variation::{self, BatchNoise};
use crate::Error;

/// Which networks stay on the device between uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VramMode {
    /// All networks resident (fastest).
    High,
    /// Only the network in use is on the device (text encoders → UNet → VAE), as the
    /// seed's `--optimized` did: the peak is the largest network, not the sum.
    Low,
}

impl VramMode {
    /// The device a model's text encoders and UNet are read straight onto
    /// ([`sdkube_models::LoadOptions::device`]) for an engine on `device` in this mode: that
    /// device where the networks stay on it, none where they are built from host memory.
    pub fn read_onto(self, device: &Device) -> Option<Device> {
        (self == VramMode::High).then(|| device.clone())
    }
}

/// Bounds a request must respect (the server makes them configurable).
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Largest width or height, in pixels.
    pub max_size: usize,
    /// Most sampling steps.
    pub max_steps: usize,
    /// Most images in one request.
    pub max_batch: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_size: 2048,
            max_steps: 150,
            max_batch: 8,
        }
    }
}

impl Request {
    /// The bounds every front end checks before a request reaches a device: size, batch,
    /// steps and CFG scale (named as the request's fields). [`Engine::validate`] checks them
    /// too, with the prompt and images.
    pub fn check_limits(&self, l: &Limits) -> Result<(), Error> {
        let bad = |msg: String| Err(Error::Invalid(msg));
        for (what, v) in [("width", self.width), ("height", self.height)] {
            if v == 0 || v % 8 != 0 {
                return bad(format!("{what} must be a positive multiple of 8, got {v}"));
            }
            if v > l.max_size {
                return bad(format!("{what} {v} is above the limit of {}", l.max_size));
            }
        }
        if self.batch_size == 0 || self.batch_size > l.max_batch {
            return bad(format!(
                "batch_size must be between 1 and {}, got {}",
                l.max_batch, self.batch_size
            ));
        }
        if self.steps == 0 || self.steps > l.max_steps {
            return bad(format!(
                "steps must be between 1 and {}, got {}",
                l.max_steps, self.steps
            ));
        }
        if !(0.0..=1.0).contains(&self.subseed_strength) {
            return bad(format!(
                "subseed_strength must be between 0 and 1, got {}",
                self.subseed_strength
            ));
        }
        if let Some((w, h)) = self.seed_resize_from {
            if !(8..=l.max_size).contains(&w) || !(8..=l.max_size).contains(&h) {
                return bad(format!(
                    "seed_resize_from {w}x{h}: each side must be between 8 and {}",
                    l.max_size
                ));
            }
        }
        if let Some(Refiner { switch_at: at, .. }) = self.refiner {
            if !(0.0..=1.0).contains(&at) {
                return bad(format!(
                    "refiner_switch_at must be between 0 and 1, got {at}"
                ));
            }
        }
        if !self.cfg_scale.is_finite() || !(0.0..=100.0).contains(&self.cfg_scale) {
            return bad(format!(
                "cfg_scale must be between 0 and 100, got {}",
                self.cfg_scale
            ));
        }
        Ok(())
    }
}

/// One generation request, with A1111's meaning for every field.
#[derive(Debug, Clone)]
pub struct Request {
    /// What to draw (A1111 syntax: emphasis, `BREAK`, embeddings).
    pub prompt: String,
    /// What to steer away from (the unconditional side of CFG).
    pub negative_prompt: String,
    /// A1111 sampler name, e.g. "DPM++ 2M Karras".
    pub sampler: String,
    /// A1111 "Schedule type" ("Karras", …); `None` is the sampler name's own.
    pub scheduler: Option<String>,
    /// Sampling steps.
    pub steps: usize,
    /// Classifier-free guidance scale.
    pub cfg_scale: f64,
    /// Seed of the first image; image i uses seed + i.
    pub seed: u64,
    /// Output width in pixels (a multiple of 8).
    pub width: usize,
    /// Output height in pixels (a multiple of 8).
    pub height: usize,
    /// Images to make.
    pub batch_size: usize,
    /// 1 = last layer (A1111's "Clip skip").
    pub clip_skip: usize,
    /// img2img / inpainting source.
    pub init_image: Option<DynamicImage>,
    /// Denoising strength for img2img (0..1).
    pub strength: f64,
    /// Inpainting mask: white = repaint.
    pub mask: Option<GrayImage>,
    /// Gaussian blur radius (pixels) applied to the mask.
    pub mask_blur: u32,
    /// A1111's variation seed: with a strength above 0 every image of the request uses
    /// `seed`, and image i's noise moves towards that of `subseed + i`.
    pub subseed: u64,
    /// How far the noise moves towards the variation seed's (0..1; 0 = off).
    pub subseed_strength: f64,
    /// A1111's "Resize seed from width/height": the noise the seed gives at this size
    /// (width, height), centred in the noise of the real size.
    pub seed_resize_from: Option<(usize, usize)>,
    /// A1111's "Tiling": every UNet and VAE convolution pads circularly, so the image's
    /// opposite edges continue each other (a seamless texture).
    pub tiling: bool,
    /// ControlNet units steering the generation (their residuals add up).
    pub control: Vec<ControlUnit>,
    /// A1111's refiner: the checkpoint that finishes the run (loaded with
    /// [`Engine::set_refiner`]).
    pub refiner: Option<Refiner>,
    /// DeepCache-style reuse of the UNet's deep features between steps (off by default).
    pub step_caching: StepCaching,
}

/// A random seed as A1111 draws one for seed -1 (32 bits, so that it fits its UI and infotext).
pub fn random_seed() -> u64 {
    rand::random::<u32>() as u64
}

impl Request {
    /// Whether two txt2img requests can be sampled in one device batch: same shape, steps,
    /// sampler, CFG and clip skip, and no init image.
    pub fn batchable_with(&self, other: &Request) -> bool {
        self.init_image.is_none()
            && other.init_image.is_none()
            && self.width == other.width
            && self.height == other.height
            && self.steps == other.steps
            && self.sampler == other.sampler
            && self.scheduler == other.scheduler
            && self.cfg_scale == other.cfg_scale
            && self.clip_skip == other.clip_skip
            && self.tiling == other.tiling
            && self.refiner == other.refiner
            && self.step_caching == other.step_caching
            && self.control.is_empty()
            && other.control.is_empty()
            && loras::tags_of(&self.prompt) == loras::tags_of(&other.prompt)
    }
}

impl Default for Request {
    fn default() -> Self {
        Self {
            prompt: String::new(),
            negative_prompt: String::new(),
            sampler: "Euler a".into(),
            scheduler: None,
            steps: 20,
            cfg_scale: 7.0,
            seed: 0,
            width: 512,
            height: 512,
            batch_size: 1,
            clip_skip: 1,
            init_image: None,
            strength: 0.75,
            mask: None,
            mask_blur: 4,
            subseed: 0,
            subseed_strength: 0.0,
            seed_resize_from: None,
            tiling: false,
            control: Vec::new(),
            refiner: None,
            step_caching: StepCaching::OFF,
        }
    }
}

/// Inputs given instead of derived from the request.
#[derive(Debug, Clone, Default)]
pub struct Overrides {
    /// Unit-variance starting noise `[B, C, h, w]` instead of the seeded draw.
    pub initial_noise: Option<Tensor>,
    /// Scaled init latent for img2img instead of encoding `init_image`.
    pub init_latent: Option<Tensor>,
}

/// A finished image with its seed and A1111 infotext.
#[derive(Debug, Clone)]
pub struct Generated {
    /// The image.
    pub image: RgbImage,
    /// The seed it was made with.
    pub seed: u64,
    /// Its variation seed (used when the request's `subseed_strength` is not 0).
    pub subseed: u64,
    /// A1111's `parameters` text (what PNG Info shows): `parameters` written out.
    pub infotext: String,
    /// The generation parameters the infotext is written from.
    pub parameters: Infotext,
    /// The final latent `[1, C, h, w]` (scaled, as the UNet sees it), e.g. for a hires-fix
    /// second pass through latent upscaling.
    pub latent: Tensor,
}

/// What the progress callback sees each step.
pub struct Progress<'a> {
    /// Steps done.
    pub step: usize,
    /// Steps in all.
    pub total: usize,
    /// Cheap preview of the current estimate, built only when asked for via `preview()`.
    denoised: &'a Tensor,
    sdxl: bool,
}

impl Progress<'_> {
    /// Preview of the batch's first image.
    pub fn preview(&self) -> Result<RgbImage, Error> {
        self.preview_of(0)
    }

    /// Preview of image `index` of the batch (in [`Engine::generate_batch`], request r's
    /// first image comes after the images of the requests before it).
    pub fn preview_of(&self, index: usize) -> Result<RgbImage, Error> {
        latent_preview(&self.denoised.narrow(0, index, 1)?, self.sdxl)
    }
}

struct Networks {
    clip: ClipTextModel,
    clip_g: Option<ClipTextModel>,
    unet: UNet2DConditionModel,
    vae: AutoencoderKL,
}

/// A loaded model ready to generate on one device.
pub struct Engine {
    weights: SdWeights,
    device: Device,
    dtype: DType,
    vram: VramMode,
    resident: Option<Networks>,
    /// The process-wide tokenizer ([`ClipTokenizer::shared`]): built while the model loads,
    /// so a server's first request does not build one.
    tokenizer: &'static ClipTokenizer,
    schedule: NoiseSchedule,
    model_name: String,
    /// Textual-inversion embeddings prompts may name.
    embeddings: EmbeddingSet,
    /// LoRA files prompts may name, and the set the networks run with.
    loras: LoraNetworks,
    /// ControlNet files requests may name.
    controlnets: ControlNetLibrary,
    /// ControlNets built on the device (kept with `--vram high`).
    controlnet_cache: ControlNetCache,
    /// The model that finishes requests naming it as their refiner.
    refiner: Option<Box<Engine>>,
    /// Bounds every request is checked against.
    pub limits: Limits,
}

impl Engine {
    /// An engine for `weights` (named `model_name` in infotexts) on `device` in `dtype`; with
    /// `VramMode::High` every network is built now, and the weights of the text encoders and
    /// the UNet are then the ones on the device.
    pub fn new(
        mut weights: SdWeights,
        model_name: &str,
        device: Device,
        dtype: DType,
        vram: VramMode,
    ) -> Result<Self, Error> {
        let tokenizer = ClipTokenizer::shared().map_err(|e| Error::Invalid(e.to_string()))?;
        let started = Instant::now();
        // The LoRA state keeps the base weights; the resident networks share their memory.
        let loras = LoraNetworks::new(&mut weights, &device, dtype, vram == VramMode::High)?;
        let uploaded = started.elapsed().as_secs_f64();
        let resident = match vram {
            VramMode::High => Some(Networks {
                clip: loras.build_clip(&weights, Part::TextEncoder)?,
                clip_g: weights
                    .text_encoder_2
                    .as_ref()
                    .map(|_| loras.build_clip(&weights, Part::TextEncoder2))
                    .transpose()?,
                unet: loras.build_unet(&weights)?,
                vae: weights.vae.build(&device, dtype)?,
            }),
            VramMode::Low => None,
        };
        tracing::info!(
            uploaded_seconds = uploaded,
            built_seconds = started.elapsed().as_secs_f64() - uploaded,
            "networks on the device"
        );
        let embeddings = EmbeddingSet::empty(TextWidths::of(&weights));
        Ok(Self {
            embeddings,
            loras,
            controlnets: ControlNetLibrary::default(),
            controlnet_cache: ControlNetCache::default(),
            refiner: None,
            weights,
            device,
            dtype,
            vram,
            resident,
            tokenizer,
            schedule: NoiseSchedule::stable_diffusion(),
            model_name: model_name.to_string(),
            limits: Limits::default(),
        })
    }

    /// Makes `refiner` the model that finishes requests naming it as their [`Refiner`]
    /// (`None` frees it). It must denoise the same latents as this model.
    pub fn set_refiner(&mut self, refiner: Option<Engine>) -> Result<(), Error> {
        if let Some(r) = &refiner {
            let (mine, theirs) = (self.weights.family, r.weights.family);
            if !mine.shares_latents_with(theirs) {
                return Err(Error::Invalid(format!(
                    "the refiner {} is an {} model; it cannot continue the latents of {} ({})",
                    r.model_name,
                    theirs.name(),
                    self.model_name,
                    mine.name()
                )));
            }
        }
        self.refiner = refiner.map(Box::new);
        Ok(())
    }

    /// The refiner set with [`Engine::set_refiner`].
    pub fn refiner(&self) -> Option<&Engine> {
        self.refiner.as_deref()
    }

    /// Takes the refiner out (e.g. to hand its weights to another engine).
    pub fn take_refiner(&mut self) -> Option<Engine> {
        self.refiner.take().map(|r| *r)
    }

    /// A three-step generation at the model's native size (its UNet's `sample_size`), so that
    /// what a device prepares per shape on first use (cuDNN plans, kernel modules, the memory
    /// pool's growth; with CUDA graphs on, the UNet's graph, captured on the second step and
    /// checked on the third) is ready before a server says it is: without it the first
    /// request after a cold start pays for all of it.
    pub fn warm_up(&mut self) -> Result<(), Error> {
        let side = self.weights.unet.config.sample_size.map_or(512, |s| s * 8);
        let side = side.min(self.limits.max_size) / 8 * 8;
        let req = Request {
            prompt: "warm-up".into(),
            sampler: "Euler".into(),
            steps: 3,
            width: side,
            height: side,
            ..Request::default()
        };
        self.generate(&req, &mut |_| crate::sampler::Flow::Continue)
            .map(|_| ())
    }

    /// Uses the ControlNet files of `library` from now on.
    pub fn set_controlnets(&mut self, library: ControlNetLibrary) {
        self.controlnets = library;
    }

    /// The ControlNet files requests may name.
    pub fn controlnets(&self) -> &ControlNetLibrary {
        &self.controlnets
    }

    /// The units of `req` with their networks on the device, checked against the model.
    fn control_units(
        &mut self,
        req: &Request,
    ) -> Result<Vec<(ControlUnit, std::sync::Arc<ControlNetModel>)>, Error> {
        let keep = self.vram == VramMode::High;
        req.control
            .iter()
            .map(|unit| {
                unit.check()?;
                let info = self.controlnets.find(&unit.model)?.clone();
                let net = self
                    .controlnet_cache
                    .get(&info, &self.device, self.dtype, keep)?;
                control::check_fits(&net, &info.name, &self.weights.unet.config)?;
                Ok((unit.clone(), net))
            })
            .collect()
    }

    /// Uses the LoRA files of `library` from now on.
    pub fn set_loras(&mut self, library: LoraLibrary) {
        self.loras.set_library(library);
    }

    /// The LoRA files prompts may name.
    pub fn loras(&self) -> &LoraLibrary {
        self.loras.library()
    }

    /// Scans the LoRA folders again (A1111's `refresh-loras`).
    pub fn refresh_loras(&mut self) {
        self.loras.refresh();
    }

    /// A1111's "Lora hashes" entries of the LoRAs `req`'s prompt names.
    pub(crate) fn lora_hashes(&self, req: &Request) -> Vec<String> {
        self.loras.hashes(&loras::tags_of(&req.prompt))
    }

    /// Takes the `<lora:…>` tags out of the requests' prompts and makes their LoRAs the ones
    /// the networks run with, rebuilding only the networks whose deltas change.
    fn apply_loras(&mut self, reqs: &[Request]) -> Result<Vec<Request>, Error> {
        let mut stripped = Vec::with_capacity(reqs.len());
        let mut tags = None;
        for r in reqs {
            let (prompt, t) = loras::extract_tags(&r.prompt)?;
            match &tags {
                Some(first) if *first != t => {
                    return Err(Error::Invalid(
                        "requests with different LoRAs cannot share a batch".into(),
                    ))
                }
                _ => tags = Some(t),
            }
            stripped.push(Request {
                prompt,
                ..r.clone()
            });
        }
        let started = Instant::now();
        let rebuild = self
            .loras
            .activate(&tags.unwrap_or_default(), &self.weights)?;
        if let (Some(n), false) = (&mut self.resident, rebuild.is_empty()) {
            for part in &rebuild {
                match part {
                    Part::TextEncoder => n.clip = self.loras.build_clip(&self.weights, *part)?,
                    Part::TextEncoder2 => {
                        n.clip_g = Some(self.loras.build_clip(&self.weights, *part)?)
                    }
                    Part::UNet => n.unet = self.loras.build_unet(&self.weights)?,
                }
            }
            tracing::info!(
                networks = ?rebuild,
                seconds = started.elapsed().as_secs_f64(),
                "LoRAs switched"
            );
        }
        Ok(stripped)
    }

    /// Uses `set` from now on, re-sorted into loaded/skipped for this model's encoders.
    pub fn set_embeddings(&mut self, mut set: EmbeddingSet) {
        let widths = TextWidths::of(&self.weights);
        if set.widths() != widths {
            set.set_widths(widths);
        }
        self.embeddings = set;
    }

    /// The embeddings prompts may use.
    pub fn embeddings(&self) -> &EmbeddingSet {
        &self.embeddings
    }

    /// Re-scans the embeddings directory (only changed files are read again).
    pub fn reload_embeddings(&mut self) -> Result<bool, crate::embeddings::EmbeddingError> {
        self.embeddings.reload()
    }

    /// A1111's "TI hashes": `name: shorthash` of every embedding the prompt or negative
    /// prompt uses.
    pub(crate) fn ti_hashes(&self, req: &Request) -> Vec<String> {
        let mut names: Vec<String> = Vec::new();
        for prompt in [&req.prompt, &req.negative_prompt] {
            let tokens = PromptTokens::new(self.tokenizer, prompt, self.embeddings.index());
            for name in tokens.embeddings_used() {
                if !names.iter().any(|n| n == name) {
                    names.push(name.to_string());
                }
            }
        }
        names
            .into_iter()
            .filter_map(|n| Some(format!("{n}: {}", self.embeddings.get(&n)?.hash)))
            .collect()
    }

    /// The model's family.
    pub fn family(&self) -> Family {
        self.weights.family
    }

    /// The model's name, as infotexts give it.
    pub fn model_name(&self) -> &str {
        &self.model_name
    }

    /// Where it runs.
    pub fn device(&self) -> &Device {
        &self.device
    }

    /// The loaded weights (kept on the CPU), e.g. for textual-inversion training.
    pub fn weights(&self) -> &SdWeights {
        &self.weights
    }

    /// The networks' dtype.
    pub fn dtype(&self) -> DType {
        self.dtype
    }

    /// How many networks stay on the device.
    pub fn vram(&self) -> VramMode {
        self.vram
    }

    /// A step-caching branch that the model's UNet has, and the refiner's where one finishes
    /// the run (SDXL's has 9 skip connections, SD 1.x and 2.x 12).
    fn check_step_caching(&self, req: &Request) -> Result<(), Error> {
        let caching = req.step_caching;
        if caching.interval == 0 {
            return Err(Error::Invalid(
                "step cache interval: 1 (every step runs the whole UNet) or more, not 0".into(),
            ));
        }
        let refiner = self.refiner.as_deref().filter(|_| req.refiner.is_some());
        let unets = std::iter::once(self).chain(refiner);
        for cfg in unets.map(|e| &e.weights.unet.config) {
            let deepest = cfg.skip_connections() - 1;
            if caching.is_on() && caching.branch > deepest {
                return Err(Error::Invalid(format!(
                    "step cache branch {}: this model's UNet has branches 0 to {deepest}",
                    caching.branch
                )));
            }
        }
        Ok(())
    }

    /// What the UNet predicts, in the sampler's terms.
    fn prediction(&self) -> sampler::Prediction {
        match self.weights.prediction {
            sdkube_models::Prediction::Epsilon => sampler::Prediction::Epsilon,
            sdkube_models::Prediction::V => sampler::Prediction::V,
        }
    }

    /// The UNet on the device: the resident one, or (`--vram low`) one built now.
    pub(crate) fn unet(&self) -> Result<UNetRef<'_>, Error> {
        Ok(match &self.resident {
            Some(n) => UNetRef::Borrowed(&n.unet),
            None => UNetRef::Owned(Box::new(self.loras.build_unet(&self.weights)?)),
        })
    }

    /// Checks a request before any work: sizes, steps, batch, sampler, prompt.
    pub fn validate(&self, req: &Request) -> Result<SamplerSpec, Error> {
        req.check_limits(&self.limits)?;
        if req.init_image.is_some() && !(0.0..=1.0).contains(&req.strength) {
            return Err(SamplerError::BadStrength(req.strength).into());
        }
        if let Some(wanted) = &req.refiner {
            let loaded = self.refiner.as_ref().map(|r| r.model_name());
            if loaded != Some(wanted.checkpoint.as_str()) {
                return Err(Error::Invalid(format!(
                    "the refiner {:?} is not loaded{}",
                    wanted.checkpoint,
                    loaded.map_or(String::new(), |l| format!(" ({l:?} is)"))
                )));
            }
        }
        if req.refiner.is_some() && !req.control.is_empty() {
            return Err(Error::Invalid(
                "ControlNet units cannot steer a refiner (its UNet has other shapes): \
                 leave out refiner_checkpoint or the units"
                    .into(),
            ));
        }
        if req.mask.is_some() && req.init_image.is_none() {
            return Err(Error::Invalid(
                "a mask needs an init image (inpainting)".into(),
            ));
        }
        self.check_step_caching(req)?;
        let (prompt, tags) = loras::extract_tags(&req.prompt)?;
        self.loras.check_names(&tags)?;
        let text_tokens: usize = parse_prompt_attention(&prompt)
            .iter()
            .filter(|(text, weight)| !(text == "BREAK" && *weight == BREAK_WEIGHT))
            .map(|(text, _)| self.tokenizer.encode(text).len())
            .sum();
        if !prompt.trim().is_empty() && text_tokens == 0 {
            return Err(Error::Invalid(format!(
                "the prompt {:?} tokenizes to nothing",
                req.prompt
            )));
        }
        Ok(SamplerSpec::parse(&req.sampler, req.scheduler.as_deref())?)
    }

    /// (positive, negative) conditioning of each request, all padded to the same number of
    /// chunks so that they can share one UNet batch.
    fn conditioning(
        &mut self,
        reqs: &[Request],
    ) -> Result<Vec<(Conditioning, Conditioning)>, Error> {
        let family = self.weights.family;
        let index = self.embeddings.index();
        let mut tokens: Vec<(PromptTokens, PromptTokens)> = reqs
            .iter()
            .map(|req| {
                (
                    PromptTokens::new(self.tokenizer, &req.prompt, index),
                    PromptTokens::new(self.tokenizer, &req.negative_prompt, index),
                )
            })
            .collect();
        let n = tokens
            .iter()
            .map(|(p, n)| p.chunk_count().max(n.chunk_count()))
            .max()
            .unwrap_or(1);
        for (pos, neg) in &mut tokens {
            pos.pad_to(n);
            neg.pad_to(n);
        }
        let clip_skip = reqs.first().map_or(1, |r| r.clip_skip);
        let encode = |clip: &ClipTextModel,
                      clip_g: Option<&ClipTextModel>|
         -> Result<Vec<(Conditioning, Conditioning)>, Error> {
            let enc = TextEncoders {
                family,
                clip,
                clip_g,
                embeddings: Some(&self.embeddings),
            };
            tokens
                .iter()
                .map(|(pos, neg)| {
                    Ok((
                        text::encode(&enc, pos, clip_skip)?,
                        text::encode(&enc, neg, clip_skip)?,
                    ))
                })
                .collect()
        };
        match &self.resident {
            Some(n) => encode(&n.clip, n.clip_g.as_ref()),
            None => {
                let clip = self.loras.build_clip(&self.weights, Part::TextEncoder)?;
                let clip_g = self
                    .weights
                    .text_encoder_2
                    .as_ref()
                    .map(|_| self.loras.build_clip(&self.weights, Part::TextEncoder2))
                    .transpose()?;
                encode(&clip, clip_g.as_ref())
            }
        }
    }

    pub(crate) fn vae(&self) -> Result<VaeRef<'_>, Error> {
        Ok(match &self.resident {
            Some(n) => VaeRef::Borrowed(&n.vae),
            None => VaeRef::Owned(Box::new(self.weights.vae.build(&self.device, self.dtype)?)),
        })
    }

    /// Generates `req.batch_size` images. `on_step` sees every step and may stop the run.
    pub fn generate(
        &mut self,
        req: &Request,
        on_step: &mut dyn FnMut(&Progress) -> Flow,
    ) -> Result<Vec<Generated>, Error> {
        self.generate_with(req, Overrides::default(), on_step)
    }

    /// [`Engine::generate`] with some inputs given instead of derived (parity tests, and
    /// callers that already hold latents).
    pub fn generate_with(
        &mut self,
        req: &Request,
        overrides: Overrides,
        on_step: &mut dyn FnMut(&Progress) -> Flow,
    ) -> Result<Vec<Generated>, Error> {
        let mut out = self.run(std::slice::from_ref(req), overrides, on_step)?;
        Ok(out.pop().unwrap_or_default())
    }

    /// Whether `a` and `b` can be sampled in one device batch and come out exactly as when
    /// generated alone: [`Request::batchable_with`], and prompts of the same number of
    /// 77-token chunks (padding a prompt with an empty chunk would change its image).
    pub fn can_batch(&self, a: &Request, b: &Request) -> bool {
        let index = self.embeddings.index();
        let chunks = |r: &Request| {
            let prompt =
                loras::extract_tags(&r.prompt).map_or_else(|_| r.prompt.clone(), |(p, _)| p);
            let p = PromptTokens::new(self.tokenizer, &prompt, index).chunk_count();
            let n = PromptTokens::new(self.tokenizer, &r.negative_prompt, index).chunk_count();
            p.max(n)
        };
        a.batchable_with(b) && chunks(a) == chunks(b)
    }

    /// Several txt2img requests sampled as one batch on the device (the server batches
    /// concurrent jobs this way). They must be [`Request::batchable_with`] each other; each
    /// request gets its own images, identical to generating it alone.
    pub fn generate_batch(
        &mut self,
        reqs: &[Request],
        on_step: &mut dyn FnMut(&Progress) -> Flow,
    ) -> Result<Vec<Vec<Generated>>, Error> {
        if let (Some(first), true) = (reqs.first(), reqs.len() > 1) {
            if let Some(other) = reqs.iter().find(|r| !self.can_batch(first, r)) {
                return Err(Error::Invalid(format!(
                    "requests cannot share a batch: {:?} and {:?} differ in size, steps, \
                     sampler, CFG, clip skip or prompt length, or use an init image",
                    first.prompt, other.prompt
                )));
            }
        }
        let total: usize = reqs.iter().map(|r| r.batch_size).sum();
        if total > self.limits.max_batch {
            return Err(Error::Invalid(format!(
                "a batch of {total} images is above the limit of {}",
                self.limits.max_batch
            )));
        }
        self.run(reqs, Overrides::default(), on_step)
    }

    fn run(
        &mut self,
        reqs: &[Request],
        overrides: Overrides,
        on_step: &mut dyn FnMut(&Progress) -> Flow,
    ) -> Result<Vec<Vec<Generated>>, Error> {
        // Infotexts keep the prompts as given, tags included (as A1111 writes them).
        let given = reqs;
        let stripped = self.apply_loras(reqs)?;
        let reqs = &stripped[..];
        let Some(req) = reqs.first() else {
            return Ok(Vec::new());
        };
        let specs = reqs
            .iter()
            .map(|r| self.validate(r))
            .collect::<Result<Vec<_>, _>>()?;
        let spec = specs[0];
        let started = Instant::now();
        let conds = self.conditioning(reqs)?;
        let b: usize = reqs.iter().map(|r| r.batch_size).sum();
        let dev = self.device.clone();
        let dt = self.dtype;
        let scaling = self.weights.vae.config.scaling_factor;
        let (lh, lw) = (req.height / 8, req.width / 8);
        let latent_channels = self.weights.vae.config.latent_channels;

        // Image i of a request uses seed + i, with its own noise stream, as A1111 does: it
        // comes out the same as when generated alone.
        // With variations (A1111's subseed), its own formula on the first draw.
        let images: Vec<(&Request, usize)> = reqs
            .iter()
            .flat_map(|r| (0..r.batch_size).map(move |i| (r, i)))
            .collect();
        let seeds: Vec<(u64, u64)> = images.iter().map(|(r, i)| r.image_seeds(*i)).collect();
        let main_seeds: Vec<u64> = seeds.iter().map(|s| s.0).collect();
        let mut noise = BatchNoise::new(&main_seeds);
        let initial = match overrides.initial_noise {
            Some(n) => n.to_dtype(dt)?.to_device(&dev)?,
            None => {
                // Drawn as before (f32 on the CPU, then cast and moved), variations applied
                // in between.
                let drawn = noise.draw(&[b, latent_channels, lh, lw], DType::F32, &Device::Cpu)?;
                let parts = images
                    .iter()
                    .enumerate()
                    .map(|(k, (r, i))| variation::first_noise(r, *i, &drawn.narrow(0, k, 1)?))
                    .collect::<Result<Vec<_>, Error>>()?;
                Tensor::cat(&parts, 0)?.to_dtype(dt)?.to_device(&dev)?
            }
        };

        // img2img / inpainting inputs in latent space.
        let (init_latent, latent_mask, image_cond) = match &overrides.init_latent {
            // A given latent (hires fix) needs no encoding unless a mask or an inpainting
            // UNet wants the image too.
            Some(_) if req.mask.is_none() && self.weights.unet.config.in_channels == 4 => {
                (None, None, None)
            }
            _ => with_circular_padding(req.tiling, || prepare_init(self, req, b, scaling))?,
        };
        let init_latent = match overrides.init_latent {
            Some(l) => Some(l.to_dtype(dt)?.to_device(&dev)?),
            None => init_latent,
        };
        let plan = match &init_latent {
            None => Plan::txt2img(&self.schedule, spec, req.steps, self.limits.max_steps)?,
            Some(_) => {
                if !(0.0..=1.0).contains(&req.strength) {
                    return Err(SamplerError::BadStrength(req.strength).into());
                }
                Plan::img2img(
                    &self.schedule,
                    spec,
                    req.steps,
                    self.limits.max_steps,
                    req.strength,
                )?
            }
        };
        let x = plan.initial_latent(&initial, init_latent.as_ref())?;

        let scalings = ModelScalings::new(self.schedule.clone(), self.prediction(), plan.sampler());
        let (context, added) = stack_conditioning(&conds, reqs, self.weights.family, &dev, dt)?;
        // The refiner's own conditioning (its encoder, its time ids) and output scalings.
        let refiner_stage = match (&req.refiner, self.refiner.as_deref_mut()) {
            (Some(Refiner { switch_at: at, .. }), Some(r)) => {
                let conds = r.conditioning(reqs)?;
                let (context, added) =
                    stack_conditioning(&conds, reqs, r.weights.family, &dev, dt)?;
                let scalings =
                    ModelScalings::new(self.schedule.clone(), r.prediction(), plan.sampler());
                Some(RefinerStage {
                    switch_at: *at,
                    context,
                    added,
                    scalings,
                })
            }
            _ => None,
        };
        let cfg = req.cfg_scale;
        let sdxl = matches!(self.weights.family, Family::Sdxl | Family::SdxlRefiner);
        let units = self.control_units(req)?;
        let control = match units.is_empty() {
            true => None,
            false => Some(ActiveUnits::new(
                units,
                req.width as u32,
                req.height as u32,
                b,
                &dev,
                dt,
            )?),
        };
        // The step the sampler is at, for the units' guidance start/end: the step callback
        // moves it on, the denoiser reads it.
        let step_now = std::cell::Cell::new(0usize);
        let total_steps = plan.steps();

        // In a block: with `--vram low` the UNet built for this job leaves the GPU before the VAE
        // decodes (SDXL's UNet is 5 GB, the decode of a batch at 1024² several more).
        let latent = {
            let unets = StageUNets {
                base: self,
                refiner: self.refiner.as_deref().filter(|_| refiner_stage.is_some()),
                current: std::cell::RefCell::new(None),
            };
            // The model's UNet is on the device before sampling starts (errors come first).
            unets.with(false, |_| ())?;
            // Once the refiner takes over it keeps the run (A1111 swaps the model for good).
            let refining = std::cell::Cell::new(false);
            // One for the run: the refiner's first call runs whole (the features are per UNet).
            let mut step_cache = StepCache::new(req.step_caching);
            let mut denoiser = |x: &Tensor, sigma: f64| -> Result<Tensor, SamplerError> {
                if let Some(r) = &refiner_stage {
                    // A1111's rule: the share of the schedule done is read off the timestep
                    // nearest to sigma.
                    let t = self.schedule.sigma_to_nearest_t(sigma) as f64;
                    let done = (999.0 - t) / 1000.0;
                    if done >= r.switch_at {
                        refining.set(true);
                    }
                }
                let (scalings, context, added) = match (&refiner_stage, refining.get()) {
                    (Some(r), true) => (&r.scalings, &r.context, r.added.as_ref()),
                    _ => (&scalings, &context, added.as_ref()),
                };
                let (x_in, t) = scalings.model_input(x, sigma)?;
                let x_in = Tensor::cat(&[&x_in, &x_in], 0)?;
                let out = unets
                    .with(refining.get(), |unet| -> Result<Tensor, SamplerError> {
                        let x_in = match &image_cond {
                            Some(c) if unet.config().in_channels == 9 => {
                                Tensor::cat(&[&x_in, &Tensor::cat(&[c, c], 0)?], 1)?
                            }
                            _ => x_in,
                        };
                        let t = Tensor::new(&[t as f32], &dev)?;
                        let residuals = match &control {
                            Some(units) => units.residuals(
                                &x_in,
                                &t,
                                context,
                                added,
                                step_now.get(),
                                total_steps,
                            )?,
                            None => None,
                        };
                        Ok(unet.forward_cached(
                            &x_in,
                            &t,
                            context,
                            added,
                            residuals.as_ref(),
                            &mut step_cache,
                        )?)
                    })
                    .map_err(|e| SamplerError::Denoiser(Box::new(e)))??;
                let (u, c) = (out.narrow(0, 0, b)?, out.narrow(0, b, b)?);
                let guided = (&u + ((c - &u)? * cfg)?)?;
                let d = scalings.denoised(x, sigma, &guided)?;
                // Plain models inpaint by keeping the unmasked latent (A1111's latent masking).
                match (&latent_mask, &init_latent, &image_cond) {
                    (Some(m), Some(init), None) => Ok(blend(&d, init, m)?),
                    _ => Ok(d),
                }
            };
            let mut on_sampler_step = |s: &StepInfo| {
                step_now.set(s.step + 1);
                on_step(&Progress {
                    step: s.step,
                    total: s.total,
                    denoised: s.denoised,
                    sdxl,
                })
            };
            with_circular_padding(req.tiling, || {
                plan.run(x, &mut denoiser, &mut noise, &mut on_sampler_step)
            })?
        };
        let latent = match (&latent_mask, &init_latent) {
            (Some(m), Some(init)) => blend(&latent, init, m)?,
            _ => latent,
        };

        let vae = self.vae()?;
        let decoded = with_circular_padding(req.tiling, || {
            decode_checked(vae.get(), &self.weights.vae, &(&latent / scaling)?, &dev)
        })?;
        let mut images = tensor_to_images(&decoded)?;
        if let (Some(mask), Some(init)) = (&req.mask, &req.init_image) {
            // Outside the (blurred) mask the result is the original image, as A1111 overlays it.
            let init = crop_resize(init, req.width as u32, req.height as u32).to_rgb8();
            let mask = blurred_mask(mask, req.width as u32, req.height as u32, req.mask_blur);
            for img in &mut images {
                overlay(img, &init, &mask);
            }
        }
        tracing::info!(
            steps = plan.steps(),
            batch = b,
            seconds = started.elapsed().as_secs_f64(),
            "generated"
        );
        let latents = (0..b)
            .map(|i| latent.narrow(0, i, 1))
            .collect::<candle_core::Result<Vec<_>>>()?;
        let mut images = images.into_iter().zip(seeds).zip(latents);
        Ok(reqs
            .iter()
            .zip(given)
            .zip(&specs)
            .map(|((r, given), spec)| {
                images
                    .by_ref()
                    .take(r.batch_size)
                    .map(|((image, (seed, subseed)), latent)| {
                        let parameters = infotext::generation(
                            given,
                            &ImageInfo {
                                spec,
                                seed,
                                subseed,
                                model: &self.model_name,
                                family: self.weights.family,
                                ti_hashes: &self.ti_hashes(r),
                                lora_hashes: &self.lora_hashes(given),
                                hires: None,
                            },
                        );
                        Generated {
                            latent,
                            infotext: parameters.to_string(),
                            parameters,
                            image,
                            seed,
                            subseed,
                        }
                    })
                    .collect()
            })
            .collect())
    }
}

pub(crate) enum VaeRef<'a> {
    Borrowed(&'a AutoencoderKL),
    Owned(Box<AutoencoderKL>),
}

impl VaeRef<'_> {
    pub(crate) fn get(&self) -> &AutoencoderKL {
        match self {
            VaeRef::Borrowed(v) => v,
            VaeRef::Owned(v) => v,
        }
    }
}

pub(crate) fn repeat(t: &Tensor, n: usize) -> candle_core::Result<Tensor> {
    if n == 1 {
        return Ok(t.clone());
    }
    let mut dims = vec![n];
    dims.extend(std::iter::repeat_n(1, t.rank() - 1));
    t.repeat(dims.as_slice())
}
