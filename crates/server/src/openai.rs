//! OpenAI-style `POST /v1/images/generations`, for clients that speak that API (Open WebUI
//! can use either this or A1111's).

use axum::extract::State;
use axum::Json;
use base64::Engine as _;
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use crate::a1111::generation::run_job;
use crate::error::{ApiError, ApiJson};
use crate::job::JobState;
use crate::requests::{CommonParams, JobSpec, Txt2ImgRequest};
use crate::state::AppState;

pub fn routes() -> OpenApiRouter<AppState> {
    OpenApiRouter::new().routes(routes!(images_generations))
}

/// OpenAI's `images/generations` request. Fields marked "Ignored" are accepted, so that
/// OpenAI clients need no change, and listed in the schema, but not read.
#[allow(dead_code)]
#[derive(Debug, Deserialize, ToSchema)]
pub struct ImagesRequest {
    pub prompt: String,
    /// Ignored: the served model answers.
    pub model: Option<String>,
    /// Number of images (1–max batch).
    #[serde(default = "one")]
    pub n: usize,
    /// `WIDTHxHEIGHT`, e.g. `512x512`.
    pub size: Option<String>,
    /// `b64_json` (default) or `url` (the image is saved and served from `/outputs/`).
    pub response_format: Option<String>,
    /// Ignored: one quality, the request's steps.
    pub quality: Option<String>,
    /// Ignored.
    pub style: Option<String>,
    /// Ignored.
    pub user: Option<String>,
}

fn one() -> usize {
    1
}

#[derive(Debug, Serialize, ToSchema)]
pub struct ImageData {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub b64_json: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub url: Option<String>,
    pub revised_prompt: Option<String>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct ImagesResponse {
    /// Unix seconds.
    pub created: u64,
    pub data: Vec<ImageData>,
}

/// Generates images from a prompt (OpenAI images API shape).
#[utoipa::path(post, path = "/v1/images/generations", tag = "openai", request_body = ImagesRequest,
    responses((status = 200, body = ImagesResponse), (status = 400, body = crate::error::ErrorBody)))]
pub async fn images_generations(
    State(state): State<AppState>,
    ApiJson(r): ApiJson<ImagesRequest>,
) -> Result<Json<ImagesResponse>, ApiError> {
    let (width, height) = match r.size.as_deref() {
        None | Some("auto") => (512, 512),
        Some(s) => {
            let (w, h) = s.split_once('x').ok_or_else(|| {
                ApiError::bad_request(format!("size {s:?} must be WIDTHxHEIGHT, e.g. 512x512"))
            })?;
            let parse = |v: &str| {
                v.trim()
                    .parse::<usize>()
                    .map_err(|_| ApiError::bad_request(format!("size {s:?} must be WIDTHxHEIGHT")))
            };
            (parse(w)?, parse(h)?)
        }
    };
    let as_url = match r.response_format.as_deref() {
        None | Some("b64_json") => false,
        Some("url") => true,
        Some(other) => {
            return Err(ApiError::bad_request(format!(
                "response_format {other:?}: expected b64_json or url"
            )))
        }
    };
    // Errors name this API's fields, not the A1111 ones they become.
    let limits = state.config.limits;
    if r.n == 0 || r.n > limits.max_batch {
        return Err(ApiError::bad_request(format!(
            "n must be between 1 and {}, got {}",
            limits.max_batch, r.n
        )));
    }
    for v in [width, height] {
        if v == 0 || v % 8 != 0 || v > limits.max_size {
            return Err(ApiError::bad_request(format!(
                "size {width}x{height}: each side must be a multiple of 8 from 8 to {}",
                limits.max_size
            )));
        }
    }
    let req = Txt2ImgRequest {
        common: CommonParams {
            prompt: r.prompt.clone(),
            batch_size: r.n,
            width,
            height,
            steps: 20.min(limits.max_steps),
            sampler_name: Some("Euler a".into()),
            ..CommonParams::default()
        },
        ..Txt2ImgRequest::default()
    };
    let spec = JobSpec::Txt2img {
        request: req,
        save: as_url,
    };
    let (_, record) = run_job(&state, spec).await?;
    let status = &record.status;
    if status.state != JobState::Succeeded {
        return Err(ApiError::of_job(status, "generation did not finish"));
    }
    let pngs = if as_url {
        Vec::new()
    } else {
        state.queue.pngs(&record.id).await?
    };
    let created = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    Ok(Json(ImagesResponse {
        created,
        data: status
            .images
            .iter()
            .enumerate()
            .map(|(n, i)| ImageData {
                b64_json: pngs
                    .get(n)
                    .map(|p| base64::engine::general_purpose::STANDARD.encode(p)),
                url: if as_url { i.url.clone() } else { None },
                revised_prompt: Some(r.prompt.clone()),
            })
            .collect(),
    }))
}
