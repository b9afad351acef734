//! txt2img and img2img requests (A1111's shapes) and the device work they become.

use sdkube_pipeline::loras;
use sdkube_pipeline::prompt::{tokenize_prompt, ChunkOptions, EmbeddingIndex};
use sdkube_pipeline::sampler::{SamplerError, SamplerSpec};
use sdkube_pipeline::tokenizer::ClipTokenizer;
use sdkube_pipeline::{Refiner, Request, StepCaching};
use serde::{Deserialize, Deserializer, Serialize};
use serde_json::{Map, Value};
use utoipa::ToSchema;

use super::controlnet::ControlJob;
use super::{
    decode_image, BuildContext, CLIP_SKIP_OPTION, GENERATION_OPTIONS, STEP_CACHE_BRANCH_OPTION,
    STEP_CACHE_INTERVAL_OPTION,
};
use crate::error::ApiError;
use crate::work::{GenerateWork, HiresFix, Work};
use sdkube_pipeline::HiresSize;

/// Fields shared by txt2img and img2img (A1111's `StableDiffusionProcessing`).
#[derive(Debug, Clone, Deserialize, Serialize, ToSchema)]
#[serde(default)]
pub struct CommonParams {
    pub prompt: String,
    pub negative_prompt: String,
    pub styles: Option<Vec<String>>,
    /// -1 = random.
    pub seed: i64,
    pub subseed: i64,
    pub subseed_strength: f64,
    pub seed_resize_from_h: i64,
    pub seed_resize_from_w: i64,
    pub sampler_name: Option<String>,
    /// Older clients send the sampler here.
    pub sampler_index: Option<String>,
    /// Schedule type: Automatic, Karras, Exponential, SGM Uniform, …
    pub scheduler: Option<String>,
    pub batch_size: usize,
    /// Batch count: batches run one after another.
    pub n_iter: usize,
    pub steps: usize,
    pub cfg_scale: f64,
    pub width: usize,
    pub height: usize,
    pub restore_faces: Option<bool>,
    pub tiling: Option<bool>,
    pub do_not_save_samples: bool,
    pub do_not_save_grid: bool,
    pub eta: Option<f64>,
    pub denoising_strength: Option<f64>,
    pub override_settings: Option<Map<String, Value>>,
    pub override_settings_restore_afterwards: bool,
    pub script_name: Option<String>,
    pub script_args: Vec<Value>,
    /// A1111's refiner: a checkpoint (title or name) that finishes the run…
    pub refiner_checkpoint: Option<String>,
    /// …once this share of the schedule is done (A1111: at once when not given).
    pub refiner_switch_at: Option<f64>,
    /// Return the images base64-encoded in the response.
    pub send_images: bool,
    /// Also write them into the outputs folder.
    pub save_images: bool,
    pub alwayson_scripts: Map<String, Value>,
}

impl Default for CommonParams {
    fn default() -> Self {
        Self {
            prompt: String::new(),
            negative_prompt: String::new(),
            styles: None,
            seed: -1,
            subseed: -1,
            subseed_strength: 0.0,
            seed_resize_from_h: -1,
            seed_resize_from_w: -1,
            sampler_name: None,
            sampler_index: None,
            scheduler: None,
            batch_size: 1,
            n_iter: 1,
            steps: 50,
            cfg_scale: 7.0,
            width: 512,
            height: 512,
            restore_faces: None,
            tiling: None,
            do_not_save_samples: false,
            do_not_save_grid: false,
            eta: None,
            denoising_strength: None,
            override_settings: None,
            override_settings_restore_afterwards: true,
            script_name: None,
            script_args: Vec::new(),
            refiner_checkpoint: None,
            refiner_switch_at: None,
            send_images: true,
            save_images: false,
            alwayson_scripts: Map::new(),
        }
    }
}

/// `POST /sdapi/v1/txt2img`.
#[derive(Debug, Clone, Default, Deserialize, Serialize, ToSchema)]
#[serde(default)]
pub struct Txt2ImgRequest {
    #[serde(flatten)]
    pub common: CommonParams,
    pub enable_hr: bool,
    pub firstphase_width: usize,
    pub firstphase_height: usize,
    pub hr_scale: Option<f64>,
    pub hr_upscaler: Option<String>,
    pub hr_second_pass_steps: usize,
    pub hr_resize_x: usize,
    pub hr_resize_y: usize,
    pub hr_checkpoint_name: Option<String>,
    pub hr_sampler_name: Option<String>,
    pub hr_scheduler: Option<String>,
    pub hr_prompt: String,
    pub hr_negative_prompt: String,
    /// Fields sdkube does not know; accepted and reported in `info`.
    #[serde(flatten)]
    #[schema(value_type = Object)]
    pub other: Map<String, Value>,
}

/// `POST /sdapi/v1/img2img`.
#[derive(Debug, Clone, Deserialize, Serialize, ToSchema)]
#[serde(default)]
pub struct Img2ImgRequest {
    #[serde(flatten)]
    pub common: CommonParams,
    /// Base64 images (plain or data URLs); the first one is used.
    pub init_images: Vec<String>,
    /// Inpainting mask, base64; white = repaint.
    pub mask: Option<String>,
    pub mask_blur: Option<u32>,
    pub mask_blur_x: u32,
    pub mask_blur_y: u32,
    /// 0 fill, 1 original, 2 latent noise, 3 latent nothing.
    pub inpainting_fill: u32,
    pub inpaint_full_res: bool,
    pub inpaint_full_res_padding: u32,
    /// 0 or 1; A1111's own clients send `false`/`true`.
    #[serde(deserialize_with = "zero_or_one")]
    #[schema(value_type = u32)]
    pub inpainting_mask_invert: u32,
    pub resize_mode: u32,
    pub image_cfg_scale: Option<f64>,
    pub initial_noise_multiplier: Option<f64>,
    pub include_init_images: bool,
    #[serde(flatten)]
    #[schema(value_type = Object)]
    pub other: Map<String, Value>,
}

impl Default for Img2ImgRequest {
    fn default() -> Self {
        Self {
            common: CommonParams::default(),
            init_images: Vec::new(),
            mask: None,
            mask_blur: None,
            mask_blur_x: 4,
            mask_blur_y: 4,
            inpainting_fill: 0,
            inpaint_full_res: true,
            inpaint_full_res_padding: 0,
            inpainting_mask_invert: 0,
            resize_mode: 0,
            image_cfg_scale: None,
            initial_noise_multiplier: None,
            include_init_images: false,
            other: Map::new(),
        }
    }
}

/// Fields given with a value sdkube does not act on.
fn ignored_fields(c: &CommonParams, other: &Map<String, Value>) -> Vec<String> {
    let mut out = Vec::new();
    let mut flag = |cond: bool, name: &str| {
        if cond {
            out.push(name.to_string());
        }
    };
    flag(c.styles.as_ref().is_some_and(|s| !s.is_empty()), "styles");
    // A1111 resizes the seed only when both sides are given.
    flag(
        (c.seed_resize_from_h > 0) != (c.seed_resize_from_w > 0),
        "seed_resize_from_h/w",
    );
    flag(c.eta.is_some(), "eta");
    // A script sdkube runs is acted on; another is accepted and reported.
    flag(
        c.script_name.is_some() && !super::scripts::is_run(c),
        "script_name",
    );
    out.extend(
        c.alwayson_scripts
            .keys()
            .filter(|k| !super::controlnet::is_controlnet_key(k))
            .map(|k| format!("alwayson_scripts.{k}")),
    );
    out.extend(
        c.override_settings
            .iter()
            .flat_map(|m| m.keys())
            .filter(|k| {
                !GENERATION_OPTIONS.contains(&k.as_str()) && *k != crate::state::MODEL_OPTION
            })
            .map(|k| format!("override_settings.{k}")),
    );
    out.extend(other.keys().cloned());
    out
}

/// A1111's token count of a prompt (75 per chunk before the last, plus the last chunk's).
fn token_count(text: &str) -> usize {
    // The engine's tokenizer, built while the model loads (so not by a first request).
    let Ok(tokenizer) = ClipTokenizer::shared() else {
        return 0;
    };
    tokenize_prompt(
        tokenizer,
        text,
        &EmbeddingIndex::new(),
        &ChunkOptions::clip_l(),
    )
    .token_count
}

/// Refuses a prompt over `--max-prompt-tokens` (each chunk of 75 tokens costs a pass of
/// the text encoder, and a megabyte of prompt a long while of tokenizing).
fn check_prompt(what: &str, text: &str, max_tokens: usize) -> Result<(), ApiError> {
    // No token is shorter than a byte on average over a long text: far beyond the limit,
    // the prompt is refused before it is tokenized.
    let too_long = |count: String| {
        Err(ApiError::bad_request(format!(
            "{what}: {count} is over the limit of {max_tokens} tokens (--max-prompt-tokens)"
        )))
    };
    if text.len() > max_tokens.saturating_mul(16) {
        return too_long(format!("{} bytes", text.len()));
    }
    match token_count(text) {
        n if n > max_tokens => too_long(format!("{n} tokens")),
        _ => Ok(()),
    }
}

/// Checks what can be checked before queueing: sizes, steps, batch, sampler names, prompt
/// length.
fn check(ctx: &BuildContext<'_>, req: &Request, n_iter: usize) -> Result<(), ApiError> {
    check_prompt("prompt", &req.prompt, ctx.max_prompt_tokens)?;
    check_prompt(
        "negative_prompt",
        &req.negative_prompt,
        ctx.max_prompt_tokens,
    )?;
    req.check_limits(&ctx.limits)
        .map_err(|e| ApiError::bad_request(e.to_string()))?;
    // LoRA tags: their syntax here, their names where the folders are (a worker checks that
    // the files fit its model).
    let (_, tags) =
        loras::extract_tags(&req.prompt).map_err(|e| ApiError::bad_request(e.to_string()))?;
    if let (Some(files), false) = (&ctx.files, tags.is_empty()) {
        crate::a1111::loras::library(files.lora_dirs, files.sources)
            .check(&tags)
            .map_err(|e| ApiError::bad_request(e.to_string()))?;
    }
    if n_iter == 0 || n_iter > 100 {
        return Err(ApiError::bad_request(format!(
            "n_iter must be between 1 and 100, got {n_iter}"
        )));
    }
    SamplerSpec::parse(&req.sampler, req.scheduler.as_deref()).map_err(|e| match e {
        // A1111 answers an unknown sampler with 404 "Sampler not found".
        SamplerError::UnknownSampler { .. } => {
            ApiError::not_found(format!("Sampler not found: {e}"))
        }
        _ => ApiError::bad_request(e.to_string()),
    })?;
    Ok(())
}

/// Clip skip for a request: its `override_settings` (where submission put the server's
/// option when the request had none), else 1.
fn clip_skip(c: &CommonParams) -> Result<usize, ApiError> {
    match override_setting(c, CLIP_SKIP_OPTION) {
        None => Ok(1),
        Some(v) => whole_number(CLIP_SKIP_OPTION, v, 1..=12),
    }
}

/// A setting of the request's `override_settings`.
fn override_setting<'c>(c: &'c CommonParams, key: &str) -> Option<&'c Value> {
    c.override_settings.as_ref().and_then(|m| m.get(key))
}

/// Setting `key`'s value `v`, a whole number in `range`.
fn whole_number(
    key: &str,
    v: &Value,
    range: std::ops::RangeInclusive<u64>,
) -> Result<usize, ApiError> {
    match v.as_u64().filter(|n| range.contains(n)) {
        Some(n) => Ok(n as usize),
        None => Err(ApiError::bad_request(format!(
            "{key} must be a whole number from {} to {}, got {v}",
            range.start(),
            range.end()
        ))),
    }
}

/// Step caching for a request: its `override_settings` (where submission put the server's
/// options when the request had none), else off. The worker checks the branch against its
/// model's UNet.
fn step_caching(c: &CommonParams) -> Result<StepCaching, ApiError> {
    let setting = |key: &str, range| match override_setting(c, key) {
        None | Some(Value::Null) => Ok(None),
        Some(v) => whole_number(key, v, range).map(Some),
    };
    let off = StepCaching::OFF;
    Ok(StepCaching {
        interval: setting(STEP_CACHE_INTERVAL_OPTION, 1..=MAX_STEP_CACHE_INTERVAL)?
            .unwrap_or(off.interval),
        branch: setting(STEP_CACHE_BRANCH_OPTION, 0..=MAX_STEP_CACHE_BRANCH)?.unwrap_or(off.branch),
    })
}

/// The largest step-cache interval taken (more steps than any request may have).
const MAX_STEP_CACHE_INTERVAL: u64 = 1000;
/// The deepest branch of any UNet sdkube serves (SD 1.x and 2.x have 12 skip connections).
const MAX_STEP_CACHE_BRANCH: u64 = 11;

fn base_request(c: &CommonParams) -> Result<Request, ApiError> {
    let sampler = c
        .sampler_name
        .clone()
        .or_else(|| c.sampler_index.clone())
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "Euler".into());
    Ok(Request {
        prompt: c.prompt.clone(),
        negative_prompt: c.negative_prompt.clone(),
        sampler,
        scheduler: c.scheduler.clone().filter(|s| !s.is_empty()),
        steps: c.steps,
        cfg_scale: c.cfg_scale,
        seed: c.seed.max(0) as u64,
        width: c.width,
        height: c.height,
        batch_size: c.batch_size,
        clip_skip: clip_skip(c)?,
        init_image: None,
        strength: 0.75,
        mask: None,
        mask_blur: 4,
        subseed: c.subseed.max(0) as u64,
        subseed_strength: c.subseed_strength,
        seed_resize_from: (c.seed_resize_from_w > 0 && c.seed_resize_from_h > 0)
            .then_some((c.seed_resize_from_w as usize, c.seed_resize_from_h as usize)),
        tiling: c.tiling.unwrap_or(false),
        step_caching: step_caching(c)?,
        control: Vec::new(),
        refiner: refiner(c)?,
    })
}

/// The refiner a request names: none for an empty name or "None" (as A1111's UI sends), or a
/// switch point of 1 (the schedule never gets there). A1111 switches at once when the point
/// is not given. The worker resolves the name among its checkpoints.
fn refiner(c: &CommonParams) -> Result<Option<Refiner>, ApiError> {
    let Some(name) = c
        .refiner_checkpoint
        .as_deref()
        .map(str::trim)
        .filter(|n| !n.is_empty() && !n.eq_ignore_ascii_case("none"))
    else {
        return Ok(None);
    };
    let switch_at = c.refiner_switch_at.unwrap_or(0.0);
    if !(0.0..=1.0).contains(&switch_at) {
        return Err(ApiError::bad_request(format!(
            "refiner_switch_at must be between 0 and 1, got {switch_at}"
        )));
    }
    Ok((switch_at < 1.0).then(|| Refiner {
        checkpoint: name.to_string(),
        switch_at,
    }))
}

/// Whether faces get restored. Without face-restorer weights the image comes back
/// unrestored with a warning, as A1111 does: the request is not refused for it.
fn check_faces(ctx: &BuildContext<'_>, wanted: Option<bool>, warnings: &mut Vec<String>) -> bool {
    let on = wanted.unwrap_or(false);
    if let (true, Some(files)) = (on, &ctx.files) {
        if let Err(e) = files.post.check_face_restorer() {
            warnings.push(format!("restore_faces: {e}; the images are not restored"));
            return false;
        }
    }
    on
}

/// A1111 declares some flags as integers, and its own clients send booleans for them.
fn zero_or_one<'de, D: Deserializer<'de>>(d: D) -> Result<u32, D::Error> {
    struct ZeroOrOne;
    impl serde::de::Visitor<'_> for ZeroOrOne {
        type Value = u32;
        fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
            f.write_str("0, 1, false or true")
        }
        fn visit_bool<E: serde::de::Error>(self, v: bool) -> Result<u32, E> {
            Ok(v as u32)
        }
        fn visit_u64<E: serde::de::Error>(self, v: u64) -> Result<u32, E> {
            match v {
                0 | 1 => Ok(v as u32),
                _ => Err(E::invalid_value(serde::de::Unexpected::Unsigned(v), &self)),
            }
        }
        fn visit_i64<E: serde::de::Error>(self, v: i64) -> Result<u32, E> {
            match v {
                0 | 1 => Ok(v as u32),
                _ => Err(E::invalid_value(serde::de::Unexpected::Signed(v), &self)),
            }
        }
    }
    d.deserialize_any(ZeroOrOne)
}

/// The device work of a txt2img request.
pub fn txt2img_work(
    ctx: &BuildContext<'_>,
    r: &Txt2ImgRequest,
    save: bool,
) -> Result<Work, ApiError> {
    let request = base_request(&r.common)?;
    check(ctx, &request, r.common.n_iter)?;
    let mut warnings = Vec::new();
    let restore_faces = check_faces(ctx, r.common.restore_faces, &mut warnings);
    let control = control_units(ctx, &r.common, &request, &mut warnings)?;
    let mut ignored = ignored_fields(&r.common, &r.other);
    let hires = if r.enable_hr {
        let (w, h) = if r.hr_resize_x > 0 || r.hr_resize_y > 0 {
            let aspect = request.width as f64 / request.height as f64;
            match (r.hr_resize_x, r.hr_resize_y) {
                (x, 0) => (x, (x as f64 / aspect).round() as usize),
                (0, y) => (((y as f64) * aspect).round() as usize, y),
                (x, y) => (x, y),
            }
        } else {
            let s = r.hr_scale.unwrap_or(2.0);
            if !(1.0..=8.0).contains(&s) {
                return Err(ApiError::bad_request(format!(
                    "hr_scale must be between 1 and 8, got {s}"
                )));
            }
            (
                (request.width as f64 * s) as usize,
                (request.height as f64 * s) as usize,
            )
        };
        // The second pass works on a latent: sizes are multiples of 8.
        let (w, h) = (w / 8 * 8, h / 8 * 8);
        if w == 0 || h == 0 {
            return Err(ApiError::bad_request(format!(
                "hr_resize_x/hr_resize_y ({}, {}): the upscaled size {w}x{h} has a side \
                 under 8 pixels",
                r.hr_resize_x, r.hr_resize_y
            )));
        }
        let upscaler = r.hr_upscaler.clone().unwrap_or_else(|| "Latent".into());
        if let Some(files) = &ctx.files {
            files
                .post
                .check_upscaler(&upscaler)
                .map_err(|e| ApiError::bad_request(e.to_string()))?;
        }
        let strength = r.common.denoising_strength.unwrap_or(0.7);
        if !(0.0..=1.0).contains(&strength) {
            return Err(ApiError::bad_request(format!(
                "denoising_strength must be between 0 and 1, got {strength}"
            )));
        }
        for (set, name) in [
            (r.hr_checkpoint_name.is_some(), "hr_checkpoint_name"),
            (r.hr_sampler_name.is_some(), "hr_sampler_name"),
            (r.hr_scheduler.is_some(), "hr_scheduler"),
            (!r.hr_prompt.is_empty(), "hr_prompt"),
            (!r.hr_negative_prompt.is_empty(), "hr_negative_prompt"),
        ] {
            if set {
                ignored.push(name.into());
            }
        }
        let size = match (r.hr_resize_x, r.hr_resize_y) {
            (0, 0) => HiresSize::Scale(r.hr_scale.unwrap_or(2.0)),
            (x, y) => HiresSize::Resize(x, y),
        };
        let hires = HiresFix {
            width: w,
            height: h,
            size,
            upscaler,
            steps: r.hr_second_pass_steps,
            denoising_strength: strength,
        };
        // The second pass meets the same limits (its size and steps).
        check(
            ctx,
            &hires.second_pass(&request, request.seed, request.subseed),
            1,
        )?;
        Some(hires)
    } else {
        None
    };
    let script = super::scripts::script_of(
        ctx,
        &r.common,
        sdkube_pipeline::scripts::Mode::Txt2Img,
        &request,
        hires.as_ref(),
        &|q| check(ctx, q, 1),
    )?;
    Ok(Work::Generate(GenerateWork {
        request,
        n_iter: r.common.n_iter,
        restore_faces,
        hires,
        save: save || r.common.save_images,
        ignored,
        control,
        warnings,
        script,
    }))
}

/// The request's ControlNet units, checked (the model only where this process has the
/// ControlNet folders).
fn control_units(
    ctx: &BuildContext<'_>,
    c: &CommonParams,
    request: &Request,
    warnings: &mut Vec<String>,
) -> Result<Vec<ControlJob>, ApiError> {
    let library = ctx
        .files
        .as_ref()
        .map(|f| super::controlnet::library(f.controlnet_dirs, f.sources));
    super::controlnet::units(
        &c.alwayson_scripts,
        (request.width, request.height),
        library.as_ref(),
        warnings,
    )
}

/// The device work of an img2img / inpainting request.
pub fn img2img_work(
    ctx: &BuildContext<'_>,
    r: &Img2ImgRequest,
    save: bool,
) -> Result<Work, ApiError> {
    let mut request = base_request(&r.common)?;
    let first = r
        .init_images
        .first()
        .ok_or_else(|| ApiError::bad_request("init_images: img2img needs one image"))?;
    request.init_image = Some(decode_image("init_images[0]", first)?);
    let strength = r.common.denoising_strength.unwrap_or(0.75);
    if !(0.0..=1.0).contains(&strength) {
        return Err(ApiError::bad_request(format!(
            "denoising_strength must be between 0 and 1, got {strength}"
        )));
    }
    request.strength = strength;
    if let Some(m) = &r.mask {
        let mut mask = decode_image("mask", m)?.to_luma8();
        if r.inpainting_mask_invert == 1 {
            image::imageops::invert(&mut mask);
        }
        request.mask = Some(mask);
        request.mask_blur = r.mask_blur.unwrap_or(r.mask_blur_x.max(r.mask_blur_y));
    }
    check(ctx, &request, r.common.n_iter)?;
    let mut warnings = Vec::new();
    let restore_faces = check_faces(ctx, r.common.restore_faces, &mut warnings);
    let control = control_units(ctx, &r.common, &request, &mut warnings)?;
    let mut ignored = ignored_fields(&r.common, &r.other);
    for (set, name) in [
        (r.resize_mode != 0, "resize_mode"),
        (
            r.mask.is_some() && r.inpainting_fill != 1,
            "inpainting_fill",
        ),
        (r.image_cfg_scale.is_some(), "image_cfg_scale"),
        (
            r.initial_noise_multiplier.is_some(),
            "initial_noise_multiplier",
        ),
        // A1111 inpaints "only masked" (a crop around the mask) by default; sdkube repaints
        // the mask on the whole image.
        (r.mask.is_some() && r.inpaint_full_res, "inpaint_full_res"),
        (r.include_init_images, "include_init_images"),
    ] {
        if set {
            ignored.push(name.into());
        }
    }
    let script = super::scripts::script_of(
        ctx,
        &r.common,
        sdkube_pipeline::scripts::Mode::Img2Img,
        &request,
        None,
        &|q| check(ctx, q, 1),
    )?;
    Ok(Work::Generate(GenerateWork {
        request,
        n_iter: r.common.n_iter,
        restore_faces,
        hires: None,
        save: save || r.common.save_images,
        ignored,
        control,
        warnings,
        script,
    }))
}

/// img2img's parameters as echoed back, with the (large) images left out.
pub fn img2img_echo(r: &Img2ImgRequest) -> Value {
    let mut echo = r.clone();
    echo.init_images = vec![format!("<{} image(s)>", r.init_images.len())];
    echo.mask = r.mask.as_ref().map(|_| "<mask>".into());
    serde_json::to_value(&echo).unwrap_or(Value::Null)
}
