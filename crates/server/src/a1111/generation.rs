//! A1111's synchronous generation endpoints: txt2img, img2img and extras. Each queues a job
//! like every other API and answers when it has ended, with A1111's response shape.

use axum::extract::State;
use axum::Json;
use serde::Serialize;
use serde_json::{json, Value};
use utoipa::ToSchema;

use crate::error::{ApiError, ApiJson};
use crate::job::{JobRecord, JobState};
use crate::queue;
use crate::requests::generate::img2img_echo;
use crate::requests::{
    b64, ExtrasBatchRequest, ExtrasSingleRequest, Img2ImgRequest, JobSpec, Txt2ImgRequest,
};
use crate::state::{AppState, Submitted};
use crate::work::Work;

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

/// Queues a job and waits for its end (on whichever worker takes it).
pub async fn run_job(state: &AppState, spec: JobSpec) -> Result<(Submitted, JobRecord), ApiError> {
    state.check_ready()?;
    let submitted = state.submit(spec).await?;
    let record = queue::wait_finished(&*state.queue, &submitted.record.id).await?;
    Ok((submitted, record))
}

/// The base64 PNGs of a finished job.
pub async fn images_b64(state: &AppState, id: &str) -> Result<Vec<String>, ApiError> {
    Ok(state.queue.pngs(id).await?.iter().map(|p| b64(p)).collect())
}

/// Runs a generation job and shapes A1111's response.
async fn run_generation(
    state: &AppState,
    spec: JobSpec,
    parameters: Value,
    send_images: bool,
) -> Result<Json<GenerationResponse>, ApiError> {
    let (submitted, record) = run_job(state, spec).await?;
    let status = &record.status;
    if status.state == JobState::Failed {
        return Err(ApiError::of_job(status, "the job failed"));
    }
    let Some(Work::Generate(work)) = submitted.job.built_work() else {
        return Err(ApiError::internal("not a generation job"));
    };
    let job = &record;
    let req = &work.request;
    // Generated images only: ControlNet's detected maps follow them without a seed or text.
    let infotexts: Vec<&str> = status
        .images
        .iter()
        .filter(|i| i.seed.is_some())
        .map(|i| i.infotext.as_str())
        .collect();
    let seeds: Vec<u64> = status.images.iter().filter_map(|i| i.seed).collect();
    // A1111 counts variation seeds up over the whole batch count, as seeds without them.
    let variations = req.subseed_strength != 0.0;
    let all_subseeds: Vec<i64> = (0..seeds.len())
        .map(|k| match variations {
            true => req.subseed.wrapping_add(k as u64) as i64,
            false => -1,
        })
        .collect();
    let mut info = json!({
        "prompt": req.prompt,
        "all_prompts": vec![&req.prompt; seeds.len()],
        "negative_prompt": req.negative_prompt,
        "all_negative_prompts": vec![&req.negative_prompt; seeds.len()],
        "seed": req.seed,
        "all_seeds": seeds,
        "subseed": if variations { req.subseed as i64 } else { -1 },
        "all_subseeds": all_subseeds,
        "subseed_strength": req.subseed_strength,
        "width": req.width,
        "height": req.height,
        "sampler_name": req.sampler,
        "scheduler": req.scheduler.clone().unwrap_or_else(|| "Automatic".into()),
        "cfg_scale": req.cfg_scale,
        "steps": req.steps,
        "batch_size": req.batch_size,
        "restore_faces": work.restore_faces,
        "face_restoration_model": if work.restore_faces { Some("GFPGAN") } else { None },
        "sd_model_name": status.model,
        "sd_model_hash": Value::Null,
        "sd_vae_name": Value::Null,
        "seed_resize_from_w": req.seed_resize_from.map_or(-1, |(w, _)| w as i64),
        "seed_resize_from_h": req.seed_resize_from.map_or(-1, |(_, h)| h as i64),
        "denoising_strength": if req.init_image.is_some() { Some(req.strength) } else { work.hires.as_ref().map(|h| h.denoising_strength) },
        "extra_generation_params": {},
        "index_of_first_image": 0,
        "infotexts": infotexts,
        "styles": [],
        "job_timestamp": humantime::format_rfc3339_seconds(job.meta.created).to_string(),
        "clip_skip": req.clip_skip,
        "is_using_inpainting_conditioning": false,
        "version": format!("sdkube {}", env!("CARGO_PKG_VERSION")),
        "interrupted": status.interrupted,
        "sdkube_job_id": job.id,
        "sdkube_saved_images": status.images.iter().filter_map(|i| i.name.clone()).collect::<Vec<_>>(),
        "sdkube_ignored_fields": work.ignored,
        "sdkube_warnings": status.info.get("warnings").cloned().unwrap_or(json!([])),
    });
    // A script's lists are its own (A1111 leaves the main grid out of them).
    if let (Some(script), Some(fields)) = (status.info.get("script"), info.as_object_mut()) {
        for key in [
            "all_prompts",
            "all_negative_prompts",
            "all_seeds",
            "index_of_first_image",
        ] {
            if let Some(v) = script.get(key) {
                fields.insert(key.into(), v.clone());
            }
        }
    }
    Ok(Json(GenerationResponse {
        images: if send_images {
            images_b64(state, &job.id).await?
        } else {
            Vec::new()
        },
        parameters,
        info: info.to_string(),
    }))
}

/// Text to image, synchronously (A1111).
#[utoipa::path(post, path = "/sdapi/v1/txt2img", tag = "a1111", request_body = Txt2ImgRequest,
    responses((status = 200, body = GenerationResponse), (status = 400, body = crate::error::ErrorBody),
        (status = 429, body = crate::error::ErrorBody), (status = 503, body = crate::error::ErrorBody)))]
pub async fn txt2img(
    State(state): State<AppState>,
    ApiJson(r): ApiJson<Txt2ImgRequest>,
) -> Result<Json<GenerationResponse>, ApiError> {
    let send = r.common.send_images;
    let params = serde_json::to_value(&r).unwrap_or(Value::Null);
    let spec = JobSpec::Txt2img {
        request: r,
        save: false,
    };
    run_generation(&state, spec, params, send).await
}

/// Image to image and inpainting, synchronously (A1111).
#[utoipa::path(post, path = "/sdapi/v1/img2img", tag = "a1111", request_body = Img2ImgRequest,
    responses((status = 200, body = GenerationResponse), (status = 400, body = crate::error::ErrorBody),
        (status = 429, body = crate::error::ErrorBody), (status = 503, body = crate::error::ErrorBody)))]
pub async fn img2img(
    State(state): State<AppState>,
    ApiJson(r): ApiJson<Img2ImgRequest>,
) -> Result<Json<GenerationResponse>, ApiError> {
    let send = r.common.send_images;
    let params = img2img_echo(&r);
    let spec = JobSpec::Img2img {
        request: r,
        save: false,
    };
    run_generation(&state, spec, params, send).await
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

async fn run_extras(
    state: &AppState,
    request: ExtrasBatchRequest,
) -> Result<(String, Vec<String>), ApiError> {
    let spec = JobSpec::Extras {
        request,
        save: false,
    };
    let (_, record) = run_job(state, spec).await?;
    let status = &record.status;
    if status.state != JobState::Succeeded {
        return Err(ApiError::of_job(status, "the job did not finish"));
    }
    let info = status
        .images
        .first()
        .map(|i| i.infotext.clone())
        .unwrap_or_default();
    Ok((info, images_b64(state, &record.id).await?))
}

/// Upscale and/or restore faces on one image (A1111 "Extras").
#[utoipa::path(post, path = "/sdapi/v1/extra-single-image", tag = "a1111", request_body = ExtrasSingleRequest,
    responses((status = 200, body = ExtrasSingleResponse), (status = 400, body = crate::error::ErrorBody)))]
pub async fn extra_single_image(
    State(state): State<AppState>,
    ApiJson(r): ApiJson<ExtrasSingleRequest>,
) -> Result<Json<ExtrasSingleResponse>, ApiError> {
    let (html_info, mut images) = run_extras(&state, r.into_batch()).await?;
    Ok(Json(ExtrasSingleResponse {
        html_info,
        image: images.pop().unwrap_or_default(),
    }))
}

/// Upscale and/or restore faces on several images.
#[utoipa::path(post, path = "/sdapi/v1/extra-batch-images", tag = "a1111", request_body = ExtrasBatchRequest,
    responses((status = 200, body = ExtrasBatchResponse), (status = 400, body = crate::error::ErrorBody)))]
pub async fn extra_batch_images(
    State(state): State<AppState>,
    ApiJson(r): ApiJson<ExtrasBatchRequest>,
) -> Result<Json<ExtrasBatchResponse>, ApiError> {
    let (html_info, images) = run_extras(&state, r).await?;
    Ok(Json(ExtrasBatchResponse { html_info, images }))
}
