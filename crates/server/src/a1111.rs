//! AUTOMATIC1111's web UI API (`/sdapi/v1`): same paths, field names, defaults and
//! response shapes, so that existing clients (Open WebUI, webuiapi, bots) work unchanged.
//! Fields sdkube does not act on are accepted and listed in the response's `info`
//! (`sdkube_ignored_fields`), never an error.

use std::io::Cursor;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use axum::extract::State;
use axum::Json;
use base64::Engine as _;
use image::DynamicImage;
use sdkube_pipeline::sampler::{Sampler, SamplerSpec, Scheduler};
use sdkube_pipeline::Request;
use serde::{Deserialize, Serialize};
use serde_json::{json, Map, Value};
use utoipa::ToSchema;

use crate::api::{ApiError, ApiJson};
use crate::jobs::{Job, JobState};
use crate::work::{ExtrasWork, GenerateWork, HiresFix, UpscaleSpec, UpscaleTarget, Work};
use crate::AppState;

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

/// Response of txt2img and img2img.
#[derive(Debug, Serialize, ToSchema)]
pub struct GenerationResponse {
    /// Base64 PNGs (with their infotext chunk).
    pub images: Vec<String>,
    /// The request as understood.
    #[schema(value_type = Object)]
    pub parameters: Value,
    /// A JSON string: seeds, infotexts, … as A1111 returns it.
    pub info: String,
}

/// The bytes of a base64 field, with or without a `data:image/...;base64,` prefix (A1111
/// clients send both).
fn decode_base64(what: &str, b64: &str) -> Result<Vec<u8>, ApiError> {
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

fn b64(bytes: &[u8]) -> String {
    base64::engine::general_purpose::STANDARD.encode(bytes)
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
    flag(c.subseed_strength != 0.0, "subseed_strength");
    flag(
        c.seed_resize_from_h > 0 || c.seed_resize_from_w > 0,
        "seed_resize_from_h/w",
    );
    flag(c.tiling == Some(true), "tiling");
    flag(c.eta.is_some(), "eta");
    flag(c.script_name.is_some(), "script_name");
    flag(!c.alwayson_scripts.is_empty(), "alwayson_scripts");
    out.extend(
        c.override_settings
            .iter()
            .flat_map(|m| m.keys())
            .filter(|k| *k != CLIP_SKIP_OPTION)
            .map(|k| format!("override_settings.{k}")),
    );
    out.extend(other.keys().cloned());
    out
}

fn seed_of(seed: i64) -> u64 {
    if seed < 0 {
        sdkube_pipeline::random_seed()
    } else {
        seed as u64
    }
}

/// Checks what can be checked before queueing: sizes, steps, batch, sampler names.
fn check(state: &AppState, req: &Request, n_iter: usize) -> Result<(), ApiError> {
    req.check_limits(&state.config.limits)
        .map_err(|e| ApiError::bad_request(e.to_string()))?;
    if n_iter == 0 || n_iter > 100 {
        return Err(ApiError::bad_request(format!(
            "n_iter must be between 1 and 100, got {n_iter}"
        )));
    }
    SamplerSpec::parse(&req.sampler, req.scheduler.as_deref())
        .map_err(|e| ApiError::bad_request(e.to_string()))?;
    Ok(())
}

fn ready(state: &AppState) -> Result<(), ApiError> {
    let s = state.model.status();
    if s.state == crate::model::ModelState::Ready {
        return Ok(());
    }
    Err(ApiError::unavailable(format!(
        "the model {} is not ready ({}): {}",
        s.name,
        serde_json::to_value(s.state)
            .ok()
            .and_then(|v| v.as_str().map(str::to_string))
            .unwrap_or_default(),
        s.message.unwrap_or_default()
    )))
}

/// A1111's clip-skip setting, in `options` or a request's `override_settings`.
const CLIP_SKIP_OPTION: &str = "CLIP_stop_at_last_layers";

/// Clip skip for a request: its `override_settings`, else the server's options, else 1.
fn clip_skip(state: &AppState, c: &CommonParams) -> Result<usize, ApiError> {
    let value = c
        .override_settings
        .as_ref()
        .and_then(|m| m.get(CLIP_SKIP_OPTION).cloned())
        .or_else(|| crate::lock(&state.options).get(CLIP_SKIP_OPTION).cloned());
    match value {
        None => Ok(1),
        Some(v) => match v.as_u64() {
            Some(n @ 1..=12) => Ok(n as usize),
            _ => Err(ApiError::bad_request(format!(
                "{CLIP_SKIP_OPTION} must be a whole number from 1 to 12, got {v}"
            ))),
        },
    }
}

fn base_request(state: &AppState, c: &CommonParams) -> Result<Request, ApiError> {
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
        seed: seed_of(c.seed),
        width: c.width,
        height: c.height,
        batch_size: c.batch_size,
        clip_skip: clip_skip(state, c)?,
        init_image: None,
        strength: 0.75,
        mask: None,
        mask_blur: 4,
    })
}

fn check_faces(state: &AppState, wanted: Option<bool>) -> Result<bool, ApiError> {
    let on = wanted.unwrap_or(false);
    if on {
        state
            .config
            .post
            .check_face_restorer()
            .map_err(ApiError::bad_request)?;
    }
    Ok(on)
}

/// Builds the job of a txt2img request (the native API uses it too).
pub fn txt2img_job(state: &AppState, r: Txt2ImgRequest, save: bool) -> Result<Arc<Job>, ApiError> {
    ready(state)?;
    let request = base_request(state, &r.common)?;
    check(state, &request, r.common.n_iter)?;
    let restore_faces = check_faces(state, r.common.restore_faces)?;
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
        let upscaler = r.hr_upscaler.clone().unwrap_or_else(|| "Latent".into());
        state
            .config
            .post
            .check_upscaler(&upscaler)
            .map_err(ApiError::bad_request)?;
        let strength = r.common.denoising_strength.unwrap_or(0.7);
        if !(0.0..=1.0).contains(&strength) {
            return Err(ApiError::bad_request(format!(
                "denoising_strength must be between 0 and 1, got {strength}"
            )));
        }
        let second = Request {
            width: w,
            height: h,
            steps: if r.hr_second_pass_steps > 0 {
                r.hr_second_pass_steps
            } else {
                request.steps
            },
            ..request.clone()
        };
        check(state, &second, 1)?;
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
        Some(HiresFix {
            width: w,
            height: h,
            upscaler,
            steps: second.steps,
            denoising_strength: strength,
        })
    } else {
        None
    };
    let params = serde_json::to_value(&r).unwrap_or(Value::Null);
    let work = Work::Generate(GenerateWork {
        request,
        n_iter: r.common.n_iter,
        restore_faces,
        hires,
        save: save || r.common.save_images,
        ignored,
    });
    Ok(Job::new("txt2img", params, work))
}

/// Builds the job of an img2img / inpainting request.
pub fn img2img_job(state: &AppState, r: Img2ImgRequest, save: bool) -> Result<Arc<Job>, ApiError> {
    ready(state)?;
    let mut request = base_request(state, &r.common)?;
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
    check(state, &request, r.common.n_iter)?;
    let restore_faces = check_faces(state, r.common.restore_faces)?;
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
    // Keep the (large) images out of the echoed parameters.
    let mut echo = r.clone();
    echo.init_images = vec![format!("<{} image(s)>", r.init_images.len())];
    echo.mask = r.mask.as_ref().map(|_| "<mask>".into());
    let params = serde_json::to_value(&echo).unwrap_or(Value::Null);
    let work = Work::Generate(GenerateWork {
        request,
        n_iter: r.common.n_iter,
        restore_faces,
        hires: None,
        save: save || r.common.save_images,
        ignored,
    });
    Ok(Job::new("img2img", params, work))
}

/// The HTTP error for a job that did not succeed: the worker says whose the failure is.
pub fn job_error(status: crate::jobs::JobStatus, otherwise: &str) -> ApiError {
    let message = status.error.unwrap_or_else(|| otherwise.to_string());
    match status.failure {
        crate::jobs::Failure::BadRequest => ApiError::bad_request(message),
        crate::jobs::Failure::Unavailable => ApiError::unavailable(message),
        crate::jobs::Failure::Internal => ApiError::internal(message),
    }
}

/// Waits for a generation job and shapes A1111's response.
async fn run_generation(
    state: &AppState,
    job: Arc<Job>,
    parameters: Value,
    send_images: bool,
) -> Result<Json<GenerationResponse>, ApiError> {
    let job = state.jobs.submit(job)?;
    let status = job.finished().await;
    if status.state == JobState::Failed {
        return Err(job_error(status, "the job failed"));
    }
    let Work::Generate(work) = &job.work else {
        return Err(ApiError::internal("not a generation job"));
    };
    let req = &work.request;
    let infotexts: Vec<&str> = status.images.iter().map(|i| i.infotext.as_str()).collect();
    let seeds: Vec<u64> = status.images.iter().filter_map(|i| i.seed).collect();
    let info = json!({
        "prompt": req.prompt,
        "all_prompts": vec![&req.prompt; seeds.len()],
        "negative_prompt": req.negative_prompt,
        "all_negative_prompts": vec![&req.negative_prompt; seeds.len()],
        "seed": req.seed,
        "all_seeds": seeds,
        "subseed": -1,
        "all_subseeds": vec![-1; seeds.len()],
        "subseed_strength": 0,
        "width": req.width,
        "height": req.height,
        "sampler_name": req.sampler,
        "scheduler": req.scheduler.clone().unwrap_or_else(|| "Automatic".into()),
        "cfg_scale": req.cfg_scale,
        "steps": req.steps,
        "batch_size": req.batch_size,
        "restore_faces": work.restore_faces,
        "face_restoration_model": if work.restore_faces { Some("GFPGAN") } else { None },
        "sd_model_name": state.model.status().name,
        "sd_model_hash": Value::Null,
        "sd_vae_name": Value::Null,
        "seed_resize_from_w": -1,
        "seed_resize_from_h": -1,
        "denoising_strength": if req.init_image.is_some() { Some(req.strength) } else { work.hires.as_ref().map(|h| h.denoising_strength) },
        "extra_generation_params": {},
        "index_of_first_image": 0,
        "infotexts": infotexts,
        "styles": [],
        "job_timestamp": humantime::format_rfc3339_seconds(job.created).to_string(),
        "clip_skip": req.clip_skip,
        "is_using_inpainting_conditioning": false,
        "version": format!("sdkube {}", env!("CARGO_PKG_VERSION")),
        "interrupted": status.interrupted,
        "sdkube_job_id": job.id,
        "sdkube_saved_images": status.images.iter().filter_map(|i| i.name.clone()).collect::<Vec<_>>(),
        "sdkube_ignored_fields": work.ignored,
    });
    Ok(Json(GenerationResponse {
        images: if send_images {
            status.images.iter().map(|i| b64(&i.png)).collect()
        } else {
            Vec::new()
        },
        parameters,
        info: info.to_string(),
    }))
}

/// Text to image, synchronously (A1111).
#[utoipa::path(post, path = "/sdapi/v1/txt2img", tag = "a1111", request_body = Txt2ImgRequest,
    responses((status = 200, body = GenerationResponse), (status = 400, body = crate::api::ErrorBody),
        (status = 429, body = crate::api::ErrorBody), (status = 503, body = crate::api::ErrorBody)))]
pub async fn txt2img(
    State(state): State<AppState>,
    ApiJson(r): ApiJson<Txt2ImgRequest>,
) -> Result<Json<GenerationResponse>, ApiError> {
    let send = r.common.send_images;
    let params = serde_json::to_value(&r).unwrap_or(Value::Null);
    let job = txt2img_job(&state, r, false)?;
    run_generation(&state, job, params, send).await
}

/// Image to image and inpainting, synchronously (A1111).
#[utoipa::path(post, path = "/sdapi/v1/img2img", tag = "a1111", request_body = Img2ImgRequest,
    responses((status = 200, body = GenerationResponse), (status = 400, body = crate::api::ErrorBody),
        (status = 429, body = crate::api::ErrorBody), (status = 503, body = crate::api::ErrorBody)))]
pub async fn img2img(
    State(state): State<AppState>,
    ApiJson(r): ApiJson<Img2ImgRequest>,
) -> Result<Json<GenerationResponse>, ApiError> {
    let send = r.common.send_images;
    let job = img2img_job(&state, r, false)?;
    let params = job.params.clone();
    run_generation(&state, job, params, send).await
}

/// Extras options shared by single and batch (A1111's `ExtrasBaseRequest`).
#[derive(Debug, Clone, Deserialize, Serialize, ToSchema)]
#[serde(default)]
pub struct ExtrasParams {
    /// 0: scale by `upscaling_resize`; 1: to `upscaling_resize_w` × `upscaling_resize_h`.
    pub resize_mode: u32,
    pub show_extras_results: bool,
    pub gfpgan_visibility: f32,
    pub codeformer_visibility: f32,
    pub codeformer_weight: f32,
    pub upscaling_resize: f32,
    pub upscaling_resize_w: u32,
    pub upscaling_resize_h: u32,
    pub upscaling_crop: bool,
    pub upscaler_1: String,
    pub upscaler_2: String,
    pub extras_upscaler_2_visibility: f32,
    pub upscale_first: bool,
}

impl Default for ExtrasParams {
    fn default() -> Self {
        Self {
            resize_mode: 0,
            show_extras_results: true,
            gfpgan_visibility: 0.0,
            codeformer_visibility: 0.0,
            codeformer_weight: 0.0,
            upscaling_resize: 2.0,
            upscaling_resize_w: 512,
            upscaling_resize_h: 512,
            upscaling_crop: true,
            upscaler_1: "None".into(),
            upscaler_2: "None".into(),
            extras_upscaler_2_visibility: 0.0,
            upscale_first: false,
        }
    }
}

#[derive(Debug, Clone, Default, Deserialize, Serialize, ToSchema)]
#[serde(default)]
pub struct ExtrasSingleRequest {
    #[serde(flatten)]
    pub params: ExtrasParams,
    /// Base64 image.
    pub image: String,
}

/// One image of `extra-batch-images`.
#[derive(Debug, Clone, Default, Deserialize, Serialize, ToSchema)]
#[serde(default)]
pub struct FileData {
    /// Base64 image (A1111 sends data URLs here).
    pub data: String,
    pub name: String,
}

#[derive(Debug, Clone, Default, Deserialize, Serialize, ToSchema)]
#[serde(default)]
pub struct ExtrasBatchRequest {
    #[serde(flatten)]
    pub params: ExtrasParams,
    #[serde(rename = "imageList")]
    pub image_list: Vec<FileData>,
}

impl ExtrasSingleRequest {
    pub fn into_batch(self) -> ExtrasBatchRequest {
        ExtrasBatchRequest {
            params: self.params,
            image_list: vec![FileData {
                data: self.image,
                name: "image".into(),
            }],
        }
    }
}

#[derive(Debug, Serialize, ToSchema)]
pub struct ExtrasSingleResponse {
    pub html_info: String,
    /// Base64 PNG.
    pub image: String,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct ExtrasBatchResponse {
    pub html_info: String,
    pub images: Vec<String>,
}

/// Builds an extras job: upscaling and/or face restoration on given images.
pub fn extras_job(
    state: &AppState,
    r: ExtrasBatchRequest,
    save: bool,
) -> Result<Arc<Job>, ApiError> {
    let p = &r.params;
    if r.image_list.is_empty() {
        return Err(ApiError::bad_request("no image given"));
    }
    if r.image_list.len() > 64 {
        return Err(ApiError::bad_request(format!(
            "at most 64 images per request, got {}",
            r.image_list.len()
        )));
    }
    let images = r
        .image_list
        .iter()
        .enumerate()
        .map(|(i, f)| {
            Ok((
                f.name.clone(),
                decode_image(&format!("image {i}"), &f.data)?,
            ))
        })
        .collect::<Result<Vec<_>, ApiError>>()?;
    let post = &state.config.post;
    for u in [&p.upscaler_1, &p.upscaler_2] {
        post.check_upscaler(u).map_err(ApiError::bad_request)?;
    }
    if !(0.0..=1.0).contains(&p.gfpgan_visibility) {
        return Err(ApiError::bad_request(format!(
            "gfpgan_visibility must be between 0 and 1, got {}",
            p.gfpgan_visibility
        )));
    }
    if p.gfpgan_visibility > 0.0 {
        post.check_face_restorer().map_err(ApiError::bad_request)?;
    }
    let target = if p.resize_mode == 1 {
        if p.upscaling_resize_w == 0 || p.upscaling_resize_h == 0 {
            return Err(ApiError::bad_request(
                "upscaling_resize_w and upscaling_resize_h must be positive",
            ));
        }
        UpscaleTarget::Size {
            width: p.upscaling_resize_w,
            height: p.upscaling_resize_h,
            crop: p.upscaling_crop,
        }
    } else {
        if !(p.upscaling_resize > 0.0 && p.upscaling_resize <= 8.0) {
            return Err(ApiError::bad_request(format!(
                "upscaling_resize must be in (0, 8], got {}",
                p.upscaling_resize
            )));
        }
        UpscaleTarget::Factor(p.upscaling_resize)
    };
    let max = state.config.limits.max_size as f32 * 4.0;
    for (name, img) in &images {
        let f = match target {
            UpscaleTarget::Factor(f) => f,
            UpscaleTarget::Size { width, height, .. } => {
                (width as f32 / img.width() as f32).max(height as f32 / img.height() as f32)
            }
        };
        if img.width() as f32 * f > max || img.height() as f32 * f > max {
            return Err(ApiError::bad_request(format!(
                "{name}: the result would be larger than {max} pixels on a side"
            )));
        }
    }
    let work = Work::Extras(ExtrasWork {
        images,
        upscale: UpscaleSpec {
            upscaler_1: p.upscaler_1.clone(),
            upscaler_2: p.upscaler_2.clone(),
            upscaler_2_visibility: p.extras_upscaler_2_visibility.clamp(0.0, 1.0),
            target,
        },
        gfpgan_visibility: p.gfpgan_visibility,
        upscale_first: p.upscale_first,
        save,
    });
    Ok(Job::new(
        "extras",
        serde_json::to_value(p).unwrap_or(Value::Null),
        work,
    ))
}

async fn run_extras(state: &AppState, job: Arc<Job>) -> Result<(String, Vec<String>), ApiError> {
    let job = state.jobs.submit(job)?;
    let status = job.finished().await;
    if status.state != JobState::Succeeded {
        return Err(job_error(status, "the job did not finish"));
    }
    let info = status
        .images
        .first()
        .map(|i| i.infotext.clone())
        .unwrap_or_default();
    Ok((info, status.images.iter().map(|i| b64(&i.png)).collect()))
}

/// Upscale and/or restore faces on one image (A1111 "Extras").
#[utoipa::path(post, path = "/sdapi/v1/extra-single-image", tag = "a1111", request_body = ExtrasSingleRequest,
    responses((status = 200, body = ExtrasSingleResponse), (status = 400, body = crate::api::ErrorBody)))]
pub async fn extra_single_image(
    State(state): State<AppState>,
    ApiJson(r): ApiJson<ExtrasSingleRequest>,
) -> Result<Json<ExtrasSingleResponse>, ApiError> {
    let job = extras_job(&state, r.into_batch(), false)?;
    let (html_info, mut images) = run_extras(&state, job).await?;
    Ok(Json(ExtrasSingleResponse {
        html_info,
        image: images.pop().unwrap_or_default(),
    }))
}

/// Upscale and/or restore faces on several images.
#[utoipa::path(post, path = "/sdapi/v1/extra-batch-images", tag = "a1111", request_body = ExtrasBatchRequest,
    responses((status = 200, body = ExtrasBatchResponse), (status = 400, body = crate::api::ErrorBody)))]
pub async fn extra_batch_images(
    State(state): State<AppState>,
    ApiJson(r): ApiJson<ExtrasBatchRequest>,
) -> Result<Json<ExtrasBatchResponse>, ApiError> {
    let job = extras_job(&state, r, false)?;
    let (html_info, images) = run_extras(&state, job).await?;
    Ok(Json(ExtrasBatchResponse { html_info, images }))
}

#[derive(Debug, Deserialize, ToSchema)]
pub struct PngInfoRequest {
    /// Base64 PNG.
    pub image: String,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct PngInfoResponse {
    /// The "parameters" text.
    pub info: String,
    /// Every text chunk.
    #[schema(value_type = Object)]
    pub items: Map<String, Value>,
    /// The infotext parsed into fields (A1111's `parse_generation_parameters`).
    #[schema(value_type = Object)]
    pub parameters: Map<String, Value>,
}

/// Reads the generation parameters stored in a PNG.
#[utoipa::path(post, path = "/sdapi/v1/png-info", tag = "a1111", request_body = PngInfoRequest,
    responses((status = 200, body = PngInfoResponse), (status = 400, body = crate::api::ErrorBody)))]
pub async fn png_info(
    ApiJson(r): ApiJson<PngInfoRequest>,
) -> Result<Json<PngInfoResponse>, ApiError> {
    let bytes = decode_base64("image", &r.image)?;
    let info = sdkube_pipeline::image_io::read_png_parameters(&bytes)
        .map_err(|e| ApiError::bad_request(format!("image: {e}")))?
        .unwrap_or_default();
    let mut items = Map::new();
    if !info.is_empty() {
        items.insert("parameters".into(), Value::String(info.clone()));
    }
    let parameters = parse_infotext(&info);
    Ok(Json(PngInfoResponse {
        info,
        items,
        parameters,
    }))
}

/// A1111's infotext → fields: prompt, negative prompt, then `Key: value` pairs (values may be
/// quoted when they contain commas).
pub fn parse_infotext(text: &str) -> Map<String, Value> {
    let mut out = Map::new();
    if text.trim().is_empty() {
        return out;
    }
    let mut lines: Vec<&str> = text.lines().collect();
    let last = lines.last().copied().unwrap_or("");
    let params_line = if last.contains("Steps: ") {
        lines.pop()
    } else {
        None
    };
    let mut prompt = Vec::new();
    let mut negative = Vec::new();
    let mut in_negative = false;
    for l in lines {
        if let Some(rest) = l.strip_prefix("Negative prompt:") {
            in_negative = true;
            negative.push(rest.trim_start());
        } else if in_negative {
            negative.push(l);
        } else {
            prompt.push(l);
        }
    }
    out.insert("Prompt".into(), Value::String(prompt.join("\n")));
    out.insert("Negative prompt".into(), Value::String(negative.join("\n")));
    if let Some(line) = params_line {
        for (k, v) in split_params(line) {
            let value = match v.parse::<f64>() {
                Ok(_) if v.parse::<i64>().is_ok() => json!(v.parse::<i64>().unwrap_or(0)),
                Ok(n) => json!(n),
                Err(_) => Value::String(v.to_string()),
            };
            if k == "Size" {
                if let Some((w, h)) = v.split_once('x') {
                    out.insert("Size-1".into(), json!(w.parse::<i64>().unwrap_or(0)));
                    out.insert("Size-2".into(), json!(h.parse::<i64>().unwrap_or(0)));
                }
            }
            out.insert(k.to_string(), value);
        }
    }
    out
}

/// `Key: value, Key: "quoted, value", …`
fn split_params(line: &str) -> Vec<(String, String)> {
    let mut out = Vec::new();
    let mut rest = line.trim();
    while !rest.is_empty() {
        let Some(colon) = rest.find(": ") else { break };
        let key = rest[..colon].trim().to_string();
        rest = &rest[colon + 2..];
        let value;
        if let Some(stripped) = rest.strip_prefix('"') {
            let end = stripped.find('"').unwrap_or(stripped.len());
            value = stripped[..end].to_string();
            rest = stripped.get(end + 1..).unwrap_or("");
            rest = rest.trim_start_matches(',').trim_start();
        } else {
            let end = rest.find(", ").unwrap_or(rest.len());
            value = rest[..end].to_string();
            rest = rest.get(end + 2..).unwrap_or("");
        }
        out.push((key, value));
    }
    out
}

#[derive(Debug, Serialize, ToSchema)]
pub struct ProgressState {
    pub skipped: bool,
    pub interrupted: bool,
    pub job: String,
    pub job_count: usize,
    pub job_timestamp: String,
    pub job_no: usize,
    pub sampling_step: usize,
    pub sampling_steps: usize,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct ProgressResponse {
    /// 0..1 of the running job.
    pub progress: f64,
    /// Seconds left.
    pub eta_relative: f64,
    pub state: ProgressState,
    /// Base64 PNG preview of the running job, when there is one.
    pub current_image: Option<String>,
    pub textinfo: Option<String>,
    pub current_task: Option<String>,
}

#[derive(Debug, Deserialize, utoipa::IntoParams)]
pub struct ProgressQuery {
    /// Leave out the preview image.
    #[serde(default)]
    pub skip_current_image: bool,
}

/// Progress of the running job (A1111's polling endpoint).
#[utoipa::path(get, path = "/sdapi/v1/progress", tag = "a1111", params(ProgressQuery),
    responses((status = 200, body = ProgressResponse)))]
pub async fn progress(
    State(state): State<AppState>,
    axum::extract::Query(q): axum::extract::Query<ProgressQuery>,
) -> Json<ProgressResponse> {
    let running = state.jobs.running();
    let queued = state.jobs.queued_len();
    let Some(job) = running.first() else {
        return Json(ProgressResponse {
            progress: 0.0,
            eta_relative: 0.0,
            state: ProgressState {
                skipped: false,
                interrupted: false,
                job: String::new(),
                job_count: queued,
                job_timestamp: "0".into(),
                job_no: 0,
                sampling_step: 0,
                sampling_steps: 0,
            },
            current_image: None,
            textinfo: None,
            current_task: None,
        });
    };
    let s = job.status();
    let progress = if s.total_steps > 0 {
        (s.step as f64 / s.total_steps as f64).min(1.0)
    } else {
        0.0
    };
    let current_image = if q.skip_current_image {
        None
    } else {
        s.preview
            .as_deref()
            .and_then(|p| p.strip_prefix("data:image/png;base64,"))
            .map(str::to_string)
    };
    Json(ProgressResponse {
        progress,
        eta_relative: Job::eta_seconds(&s).unwrap_or(0.0),
        state: ProgressState {
            skipped: job.skip.load(Ordering::SeqCst),
            interrupted: job.cancel.load(Ordering::SeqCst),
            job: job.kind.to_string(),
            job_count: running.len() + queued,
            job_timestamp: humantime::format_rfc3339_seconds(job.created).to_string(),
            job_no: 0,
            sampling_step: s.step,
            sampling_steps: s.total_steps,
        },
        current_image,
        textinfo: None,
        current_task: Some(job.id.clone()),
    })
}

/// Stops the running job(s) at the next step; images finished so far are returned.
#[utoipa::path(post, path = "/sdapi/v1/interrupt", tag = "a1111", responses((status = 200, description = "interrupted")))]
pub async fn interrupt(State(state): State<AppState>) -> Json<Value> {
    for j in state.jobs.running() {
        j.cancel.store(true, Ordering::SeqCst);
    }
    Json(json!({}))
}

/// Ends the current batch of the running job(s) and goes on with the next one.
#[utoipa::path(post, path = "/sdapi/v1/skip", tag = "a1111", responses((status = 200, description = "skipped")))]
pub async fn skip(State(state): State<AppState>) -> Json<Value> {
    for j in state.jobs.running() {
        j.skip.store(true, Ordering::SeqCst);
    }
    Json(json!({}))
}

fn options_value(state: &AppState) -> Map<String, Value> {
    let model = state.model.status();
    let mut m = Map::new();
    m.insert("sd_model_checkpoint".into(), Value::String(model.name));
    m.insert("sd_checkpoint_hash".into(), Value::Null);
    m.insert("sd_vae".into(), json!("Automatic"));
    m.insert("CLIP_stop_at_last_layers".into(), json!(1));
    m.insert("samples_save".into(), json!(true));
    m.insert("samples_format".into(), json!("png"));
    m.insert(
        "outdir_samples".into(),
        json!(state.config.outputs.display().to_string()),
    );
    m.insert("face_restoration_model".into(), json!("GFPGAN"));
    m.insert("show_progress_every_n_steps".into(), json!(1));
    m.insert("enable_pnginfo".into(), json!(true));
    for (k, v) in crate::lock(&state.options).iter() {
        m.insert(k.clone(), v.clone());
    }
    m
}

/// Settings, A1111's `options`.
#[utoipa::path(get, path = "/sdapi/v1/options", tag = "a1111", responses((status = 200, body = Object)))]
pub async fn get_options(State(state): State<AppState>) -> Json<Map<String, Value>> {
    Json(options_value(&state))
}

/// Changes settings. `sd_model_checkpoint` switches the served model and answers once it
/// is loaded (as A1111 does); other keys are stored and echoed back.
#[utoipa::path(post, path = "/sdapi/v1/options", tag = "a1111", request_body = Object,
    responses((status = 200, description = "applied"), (status = 400, body = crate::api::ErrorBody)))]
pub async fn set_options(
    State(state): State<AppState>,
    ApiJson(body): ApiJson<Map<String, Value>>,
) -> Result<Json<Value>, ApiError> {
    if let Some(v) = body.get("sd_model_checkpoint") {
        let name = v
            .as_str()
            .ok_or_else(|| ApiError::bad_request("sd_model_checkpoint must be a string"))?;
        let current = state.model.status();
        let wanted = name.split(" [").next().unwrap_or(name);
        if current.name != wanted || current.state == crate::model::ModelState::Failed {
            state
                .model
                .select(name, false)
                .map_err(ApiError::bad_request)?;
            state.jobs.notify();
            // A1111 answers once the new model is loaded.
            loop {
                let s = state.model.status();
                match s.state {
                    crate::model::ModelState::Ready => break,
                    crate::model::ModelState::Failed => {
                        return Err(ApiError::internal(
                            s.message.unwrap_or_else(|| "loading failed".into()),
                        ))
                    }
                    _ => tokio::time::sleep(std::time::Duration::from_millis(100)).await,
                }
            }
        }
    }
    if let Some(v) = body.get("sd_vae") {
        // No separate VAE files are offered (see /sdapi/v1/sd-vae): say so rather than
        // pretend to switch.
        if !matches!(v.as_str(), Some("Automatic" | "None" | "")) {
            return Err(ApiError::bad_request(format!(
                "sd_vae {v}: sdkube serves each checkpoint with its own VAE; \
                 only \"Automatic\" is available (see /sdapi/v1/sd-vae)"
            )));
        }
    }
    let mut opts = crate::lock(&state.options);
    for (k, v) in body {
        if k != "sd_model_checkpoint" {
            opts.insert(k, v);
        }
    }
    Ok(Json(Value::Null))
}

#[derive(Debug, Serialize, ToSchema)]
pub struct SdModel {
    pub title: String,
    pub model_name: String,
    pub hash: Option<String>,
    pub sha256: Option<String>,
    pub filename: String,
    pub config: Option<String>,
}

/// Checkpoints that can be selected (present ones, and catalog entries fetched on first use).
#[utoipa::path(get, path = "/sdapi/v1/sd-models", tag = "a1111", responses((status = 200, body = Vec<SdModel>)))]
pub async fn sd_models(State(state): State<AppState>) -> Json<Vec<SdModel>> {
    Json(
        state
            .model
            .checkpoints()
            .into_iter()
            .map(|c| SdModel {
                filename: c
                    .path
                    .map(|p| p.display().to_string())
                    .unwrap_or_else(|| format!("(catalog: {}, fetched on first use)", c.title)),
                title: c.title,
                model_name: c.name,
                hash: None,
                sha256: None,
                config: None,
            })
            .collect(),
    )
}

#[derive(Debug, Serialize, ToSchema)]
pub struct SdVae {
    pub model_name: String,
    pub filename: String,
}

/// Separate VAE files. sdkube uses each checkpoint's own VAE; none are listed.
#[utoipa::path(get, path = "/sdapi/v1/sd-vae", tag = "a1111", responses((status = 200, body = Vec<SdVae>)))]
pub async fn sd_vae() -> Json<Vec<SdVae>> {
    Json(Vec::new())
}

#[derive(Debug, Serialize, ToSchema)]
pub struct SamplerItem {
    pub name: String,
    pub aliases: Vec<String>,
    #[schema(value_type = Object)]
    pub options: Map<String, Value>,
}

#[utoipa::path(get, path = "/sdapi/v1/samplers", tag = "a1111", responses((status = 200, body = Vec<SamplerItem>)))]
pub async fn samplers() -> Json<Vec<SamplerItem>> {
    Json(
        Sampler::all()
            .iter()
            .map(|s| SamplerItem {
                name: s.name.to_string(),
                aliases: s.aliases.iter().map(|a| a.to_string()).collect(),
                options: Map::new(),
            })
            .collect(),
    )
}

#[derive(Debug, Serialize, ToSchema)]
pub struct SchedulerItem {
    pub name: String,
    pub label: String,
    pub aliases: Option<Vec<String>>,
    pub default_rho: f64,
    pub need_inner_model: bool,
}

#[utoipa::path(get, path = "/sdapi/v1/schedulers", tag = "a1111", responses((status = 200, body = Vec<SchedulerItem>)))]
pub async fn schedulers() -> Json<Vec<SchedulerItem>> {
    Json(
        Scheduler::ALL
            .iter()
            .map(|(s, name, aliases)| SchedulerItem {
                name: name.to_string(),
                label: s.label().to_string(),
                aliases: (!aliases.is_empty())
                    .then(|| aliases.iter().map(|a| a.to_string()).collect()),
                default_rho: -1.0,
                need_inner_model: false,
            })
            .collect(),
    )
}

#[utoipa::path(get, path = "/sdapi/v1/upscalers", tag = "a1111", responses((status = 200, body = Vec<crate::post::UpscalerInfo>)))]
pub async fn upscalers(State(state): State<AppState>) -> Json<Vec<crate::post::UpscalerInfo>> {
    Json(state.config.post.upscalers())
}

#[derive(Debug, Serialize, ToSchema)]
pub struct LatentUpscaleMode {
    pub name: String,
}

/// Latent upscalers for hires fix.
#[utoipa::path(get, path = "/sdapi/v1/latent-upscale-modes", tag = "a1111", responses((status = 200, body = Vec<LatentUpscaleMode>)))]
pub async fn latent_upscale_modes() -> Json<Vec<LatentUpscaleMode>> {
    Json(
        ["Latent"]
            .iter()
            .map(|n| LatentUpscaleMode {
                name: n.to_string(),
            })
            .collect(),
    )
}

#[derive(Debug, Serialize, ToSchema)]
pub struct FaceRestorerItem {
    pub name: String,
    pub cmd_dir: Option<String>,
}

#[utoipa::path(get, path = "/sdapi/v1/face-restorers", tag = "a1111", responses((status = 200, body = Vec<FaceRestorerItem>)))]
pub async fn face_restorers(State(state): State<AppState>) -> Json<Vec<FaceRestorerItem>> {
    Json(
        state
            .config
            .post
            .face_restorers()
            .into_iter()
            .map(|name| FaceRestorerItem {
                name,
                cmd_dir: None,
            })
            .collect(),
    )
}

#[derive(Debug, Serialize, ToSchema)]
pub struct EmbeddingsResponse {
    /// name → `{step, sd_checkpoint, sd_checkpoint_name, shape, vectors}` (A1111's shape).
    #[schema(value_type = Object)]
    pub loaded: Map<String, Value>,
    /// name → the same, plus `reason` (A1111 lists skipped ones without one).
    #[schema(value_type = Object)]
    pub skipped: Map<String, Value>,
}

/// The embeddings folder read for the loaded model's text-encoder widths.
async fn embedding_set(
    state: &AppState,
) -> Result<sdkube_pipeline::embeddings::EmbeddingSet, ApiError> {
    let widths = *crate::lock(&state.text_widths);
    let widths = widths.ok_or_else(|| ApiError::unavailable("no model is loaded yet"))?;
    let dir = state.config.embeddings.clone();
    tokio::task::spawn_blocking(move || {
        sdkube_pipeline::embeddings::EmbeddingSet::load_dir(&dir, widths)
    })
    .await
    .map_err(|e| ApiError::internal(e.to_string()))?
    .map_err(|e| ApiError::internal(format!("reading the embeddings folder: {e}")))
}

/// Textual inversion embeddings in the embeddings folder: loaded, and skipped with the
/// reason (wrong width for this model, unreadable, not tensors only, …).
#[utoipa::path(get, path = "/sdapi/v1/embeddings", tag = "a1111", responses((status = 200, body = EmbeddingsResponse)))]
pub async fn embeddings(
    State(state): State<AppState>,
) -> Result<Json<EmbeddingsResponse>, ApiError> {
    let set = embedding_set(&state).await?;
    let model = state.model.status().name;
    let loaded = set
        .loaded()
        .iter()
        .map(|e| {
            (
                e.name.clone(),
                json!({
                    "step": Value::Null,
                    "sd_checkpoint": Value::Null,
                    "sd_checkpoint_name": Value::Null,
                    "shape": e.shape.get(1).copied().unwrap_or(0),
                    "vectors": e.vectors,
                    "hash": e.hash,
                    "loaded_for": model,
                }),
            )
        })
        .collect();
    let skipped = set
        .skipped()
        .iter()
        .map(|(name, reason)| {
            (
                name.clone(),
                json!({"step": Value::Null, "sd_checkpoint": Value::Null,
                       "sd_checkpoint_name": Value::Null, "shape": Value::Null,
                       "vectors": Value::Null, "reason": reason}),
            )
        })
        .collect();
    Ok(Json(EmbeddingsResponse { loaded, skipped }))
}

/// Re-reads the embeddings folder (generation also picks up changes before each job).
#[utoipa::path(post, path = "/sdapi/v1/refresh-embeddings", tag = "a1111", responses((status = 200, description = "refreshed")))]
pub async fn refresh_embeddings(State(state): State<AppState>) -> Result<Json<Value>, ApiError> {
    embedding_set(&state).await?;
    Ok(Json(Value::Null))
}

/// An embedding name usable as a file stem: letters, digits, `_`, `-`, `.`, no leading dot,
/// so that no name reaches outside the embeddings folder.
pub fn check_embedding_name(name: &str) -> Result<(), ApiError> {
    let ok = !name.is_empty()
        && name.len() <= 64
        && !name.starts_with('.')
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.'));
    if ok {
        Ok(())
    } else {
        Err(ApiError::bad_request(format!(
            "embedding name {name:?}: use 1–64 letters, digits, '_', '-' or '.', not starting with '.'"
        )))
    }
}

#[derive(Debug, Clone, Deserialize, Serialize, ToSchema)]
#[serde(default)]
pub struct CreateEmbeddingRequest {
    pub name: String,
    pub num_vectors_per_token: usize,
    pub overwrite_old: bool,
    pub init_text: String,
}

impl Default for CreateEmbeddingRequest {
    fn default() -> Self {
        Self {
            name: String::new(),
            num_vectors_per_token: 1,
            overwrite_old: false,
            init_text: "*".into(),
        }
    }
}

#[derive(Debug, Serialize, ToSchema)]
pub struct InfoResponse {
    pub info: String,
}

/// A1111's "Create embedding": a new embedding initialised from `init_text`, written to
/// `<embeddings>/<name>.safetensors`.
#[utoipa::path(post, path = "/sdapi/v1/create/embedding", tag = "a1111", request_body = CreateEmbeddingRequest,
    responses((status = 200, body = InfoResponse), (status = 400, body = crate::api::ErrorBody)))]
pub async fn create_embedding(
    State(state): State<AppState>,
    ApiJson(r): ApiJson<CreateEmbeddingRequest>,
) -> Result<Json<InfoResponse>, ApiError> {
    ready(&state)?;
    check_embedding_name(&r.name)?;
    let out = state
        .config
        .embeddings
        .join(format!("{}.safetensors", r.name));
    let existing = ["safetensors", "pt", "bin"]
        .iter()
        .map(|ext| state.config.embeddings.join(format!("{}.{ext}", r.name)))
        .find(|p| p.exists());
    if let (Some(p), false) = (existing, r.overwrite_old) {
        return Err(ApiError::bad_request(format!(
            "embedding {:?} exists ({}); set overwrite_old to replace it",
            r.name,
            p.display()
        )));
    }
    let params = serde_json::to_value(&r).unwrap_or(Value::Null);
    let job = Job::new(
        "create-embedding",
        params,
        Work::CreateEmbedding(crate::work::CreateEmbeddingWork {
            name: r.name.clone(),
            init_text: r.init_text.clone(),
            vectors: r.num_vectors_per_token,
            overwrite: r.overwrite_old,
            out: out.clone(),
        }),
    );
    let job = state.jobs.submit(job)?;
    let status = job.finished().await;
    if status.state != JobState::Succeeded {
        return Err(job_error(status, "not created"));
    }
    Ok(Json(InfoResponse {
        info: format!("Embedding created: {}", out.display()),
    }))
}

/// A1111's training request (fields it has that sdkube does not act on are accepted).
#[derive(Debug, Clone, Deserialize, Serialize, ToSchema)]
#[serde(default)]
pub struct TrainEmbeddingRequest {
    /// An embedding of the embeddings folder (create it first).
    pub embedding_name: String,
    /// A number; A1111's schedules (`0.005:100, 1e-3:1000`) use their first rate.
    #[schema(value_type = String)]
    pub learn_rate: Value,
    pub batch_size: usize,
    pub gradient_step: usize,
    /// A folder of images under the server's training folder.
    pub data_root: String,
    pub training_width: usize,
    pub training_height: usize,
    pub steps: usize,
    /// `subject.txt`, `style.txt`, `subject_filewords.txt`, … (by A1111's file names).
    pub template_filename: String,
    pub create_image_every: usize,
    pub save_embedding_every: usize,
    #[serde(flatten)]
    #[schema(value_type = Object)]
    pub other: Map<String, Value>,
}

impl Default for TrainEmbeddingRequest {
    fn default() -> Self {
        Self {
            embedding_name: String::new(),
            learn_rate: json!("0.005"),
            batch_size: 1,
            gradient_step: 1,
            data_root: String::new(),
            training_width: 512,
            training_height: 512,
            steps: 100_000,
            template_filename: "subject.txt".into(),
            create_image_every: 500,
            save_embedding_every: 500,
            other: Map::new(),
        }
    }
}

/// Builds a training job from A1111's request.
pub fn train_job(state: &AppState, r: TrainEmbeddingRequest) -> Result<Arc<Job>, ApiError> {
    use sdkube_pipeline::train::{Template, TrainOptions};
    ready(state)?;
    check_embedding_name(&r.embedding_name)?;
    let dir = &state.config.embeddings;
    let out = ["safetensors", "pt"]
        .iter()
        .map(|ext| dir.join(format!("{}.{ext}", r.embedding_name)))
        .find(|p| p.is_file())
        .ok_or_else(|| {
            ApiError::bad_request(format!(
                "no embedding {:?} in the embeddings folder: create it first (/sdapi/v1/create/embedding)",
                r.embedding_name
            ))
        })?;
    let rate_text = match &r.learn_rate {
        Value::Number(n) => n.to_string(),
        Value::String(s) => s.clone(),
        other => other.to_string(),
    };
    let first_rate = rate_text
        .split(',')
        .next()
        .unwrap_or("")
        .split(':')
        .next()
        .unwrap_or("");
    let learning_rate: f64 = first_rate
        .trim()
        .parse()
        .map_err(|_| ApiError::bad_request(format!("learn_rate {rate_text:?} is not a number")))?;
    if r.training_width != r.training_height {
        return Err(ApiError::bad_request(format!(
            "training_width and training_height must be equal (square training), got {}x{}",
            r.training_width, r.training_height
        )));
    }
    if r.steps == 0 || r.steps > 1_000_000 {
        return Err(ApiError::bad_request(format!(
            "steps must be between 1 and 1000000, got {}",
            r.steps
        )));
    }
    // The images must be a folder inside the training folder: a request names a folder,
    // it cannot make the server read anywhere else.
    let root = state.config.training.clone();
    let wanted = root.join(r.data_root.trim_start_matches('/'));
    let inside = match (wanted.canonicalize(), root.canonicalize()) {
        (Ok(w), Ok(r)) => w.starts_with(&r) && w.is_dir(),
        _ => false,
    };
    if !inside || r.data_root.split(['/', '\\']).any(|seg| seg == "..") {
        return Err(ApiError::bad_request(format!(
            "data_root {:?} must be a folder of images inside the training folder {}",
            r.data_root,
            root.display()
        )));
    }
    let template = if r.template_filename.contains("style") {
        Template::Style
    } else {
        Template::Subject
    };
    // Training continues the embedding's own vectors (A1111 trains what "Create" made).
    let vectors = sdkube_pipeline::embeddings::read_embedding(&out)
        .map_err(|e| ApiError::bad_request(format!("{}: {e}", out.display())))?
        .count();
    let opts = TrainOptions {
        name: r.embedding_name.clone(),
        vectors,
        steps: r.steps,
        learning_rate,
        batch_size: r.batch_size.max(1),
        template,
        images: wanted,
        size: r.training_width,
        out,
        checkpoint_every: r.save_embedding_every,
        sample_every: r.create_image_every,
        resume: true,
        ..TrainOptions::default()
    };
    let params = serde_json::to_value(&r).unwrap_or(Value::Null);
    Ok(Job::new(
        "train-embedding",
        params,
        Work::TrainEmbedding(opts),
    ))
}

/// Trains an embedding as a job (progress through `/sdapi/v1/progress` and the job's
/// events); answers when training ends, as A1111 does.
#[utoipa::path(post, path = "/sdapi/v1/train/embedding", tag = "a1111", request_body = TrainEmbeddingRequest,
    responses((status = 200, body = InfoResponse), (status = 400, body = crate::api::ErrorBody)))]
pub async fn train_embedding(
    State(state): State<AppState>,
    ApiJson(r): ApiJson<TrainEmbeddingRequest>,
) -> Result<Json<InfoResponse>, ApiError> {
    let job = state.jobs.submit(train_job(&state, r)?)?;
    let status = job.finished().await;
    match status.state {
        JobState::Succeeded | JobState::Cancelled => Ok(Json(InfoResponse {
            info: format!("train embedding complete: {}", status.info),
        })),
        _ => Err(job_error(status, "training failed")),
    }
}

/// Re-reads the checkpoint folders and the store (listing is live; nothing to do).
#[utoipa::path(post, path = "/sdapi/v1/refresh-checkpoints", tag = "a1111", responses((status = 200, description = "refreshed")))]
pub async fn refresh_checkpoints() -> Json<Value> {
    Json(Value::Null)
}

/// Memory of the process and the devices (A1111's shape: `ram` and `cuda`).
#[utoipa::path(get, path = "/sdapi/v1/memory", tag = "a1111", responses((status = 200, body = Object)))]
pub async fn memory(State(state): State<AppState>) -> Json<Value> {
    let (total, free) = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .map(|m| {
            let field = |name: &str| {
                m.lines()
                    .find(|l| l.starts_with(name))
                    .and_then(|l| l.split_whitespace().nth(1))
                    .and_then(|v| v.parse::<u64>().ok())
                    .map_or(0, |kb| kb * 1024)
            };
            (field("MemTotal:"), field("MemAvailable:"))
        })
        .unwrap_or((0, 0));
    let rss = crate::metrics::resident_memory_bytes().unwrap_or(0);
    let cuda = crate::metrics::cuda_memory_used(&state.device_labels());
    Json(json!({
        "ram": {"free": free, "used": rss, "total": total},
        "cuda": if cuda.is_empty() {
            json!({"error": "no CUDA device in use"})
        } else {
            json!({"system": cuda.iter().map(|(d, b)| (d.clone(), json!({"used": b}))).collect::<Map<_, _>>()})
        },
    }))
}

/// The server's settings as flags.
#[utoipa::path(get, path = "/sdapi/v1/cmd-flags", tag = "a1111", responses((status = 200, body = Object)))]
pub async fn cmd_flags(State(state): State<AppState>) -> Json<Value> {
    Json(state.config.flags.clone())
}

/// Lists A1111 has for features sdkube does not have (styles, hypernetworks, LoRA, scripts,
/// extensions): answered empty so that clients which read them at start-up work unchanged.
#[utoipa::path(get, path = "/sdapi/v1/prompt-styles", tag = "a1111", responses((status = 200, body = Vec<Object>)))]
pub async fn prompt_styles() -> Json<Vec<Value>> {
    Json(Vec::new())
}

/// Hypernetworks: none (see `/sdapi/v1/prompt-styles`).
#[utoipa::path(get, path = "/sdapi/v1/hypernetworks", tag = "a1111", responses((status = 200, body = Vec<Object>)))]
pub async fn hypernetworks() -> Json<Vec<Value>> {
    Json(Vec::new())
}

/// LoRA networks (A1111's built-in Lora extension): none.
#[utoipa::path(get, path = "/sdapi/v1/loras", tag = "a1111", responses((status = 200, body = Vec<Object>)))]
pub async fn loras() -> Json<Vec<Value>> {
    Json(Vec::new())
}

/// Extensions: none.
#[utoipa::path(get, path = "/sdapi/v1/extensions", tag = "a1111", responses((status = 200, body = Vec<Object>)))]
pub async fn extensions() -> Json<Vec<Value>> {
    Json(Vec::new())
}

/// Scripts per tab: none.
#[utoipa::path(get, path = "/sdapi/v1/scripts", tag = "a1111", responses((status = 200, body = Object)))]
pub async fn scripts() -> Json<Value> {
    Json(json!({"txt2img": [], "img2img": []}))
}

/// Script details: none.
#[utoipa::path(get, path = "/sdapi/v1/script-info", tag = "a1111", responses((status = 200, body = Vec<Object>)))]
pub async fn script_info() -> Json<Vec<Value>> {
    Json(Vec::new())
}

#[derive(Debug, Serialize, ToSchema)]
pub struct RealesrganModel {
    pub name: String,
    pub path: Option<String>,
    pub scale: f32,
}

/// The RealESRGAN upscalers available (A1111's list of its RealESRGAN models).
#[utoipa::path(get, path = "/sdapi/v1/realesrgan-models", tag = "a1111", responses((status = 200, body = Vec<RealesrganModel>)))]
pub async fn realesrgan_models(State(state): State<AppState>) -> Json<Vec<RealesrganModel>> {
    Json(
        state
            .config
            .post
            .upscalers()
            .into_iter()
            .filter(|u| u.model_path.is_some())
            .map(|u| RealesrganModel {
                name: u.name,
                path: u.model_path,
                scale: u.scale,
            })
            .collect(),
    )
}
