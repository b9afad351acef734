//! sd-webui-controlnet's API (`/controlnet/*`), which ControlNet clients (bots, Krita and
//! Photoshop plug-ins) call beside A1111's: the version, the models of `--controlnet-dirs`,
//! the preprocessors with their sliders, and `detect` (a preprocessor run on images). Units
//! themselves come with txt2img/img2img in `alwayson_scripts.controlnet`.

use std::io::Cursor;

use axum::extract::State;
use axum::Json;
use base64::Engine as _;
use candle_core::Device;
use sdkube_preprocess::Params;
use serde::{Deserialize, Serialize};
use serde_json::{json, Map, Value};
use utoipa::{IntoParams, ToSchema};

use crate::config::Role;
use crate::error::{ApiError, ApiJson, ApiQuery};
use crate::requests::controlnet::{library, load_annotators};
use crate::requests::decode_image;
use crate::state::{AppState, Shared};

/// The extension's API version that sdkube's answers follow.
const API_VERSION: u32 = 2;

/// Detect at most this many images per call.
const MAX_DETECT_IMAGES: usize = 16;

/// `{"version": 2}`.
#[utoipa::path(get, path = "/controlnet/version", tag = "controlnet", responses((status = 200, body = Object)))]
pub async fn version() -> Json<Value> {
    Json(json!({ "version": API_VERSION }))
}

/// Units a request may carry (the extension's `control_net_unit_count`).
#[utoipa::path(get, path = "/controlnet/settings", tag = "controlnet", responses((status = 200, body = Object)))]
pub async fn settings() -> Json<Value> {
    Json(json!({ "control_net_unit_count": 3 }))
}

#[derive(Debug, Deserialize, IntoParams)]
pub struct ModelListQuery {
    /// Accepted for the extension's clients; the folders are read on every call.
    #[serde(default)]
    #[allow(dead_code)]
    pub update: Option<bool>,
}

/// The ControlNets of `--controlnet-dirs` as units name them: `name [hash]`.
#[utoipa::path(get, path = "/controlnet/model_list", tag = "controlnet", params(ModelListQuery),
    responses((status = 200, body = Object)))]
pub async fn model_list(
    State(state): State<AppState>,
    ApiQuery(_q): ApiQuery<ModelListQuery>,
) -> Result<Json<Value>, ApiError> {
    let titles = match state.config.role {
        // An api replica mounts no model folders: the workers' reports say.
        Role::Api => state
            .remote_report()
            .await
            .and_then(|r| r.controlnets)
            .ok_or_else(|| ApiError::unavailable("no worker has reported its ControlNets yet"))?,
        _ => {
            let me = state.clone();
            tokio::task::spawn_blocking(move || local_models(&me))
                .await
                .map_err(|e| ApiError::internal(e.to_string()))?
        }
    };
    Ok(Json(json!({ "model_list": titles })))
}

/// This process's ControlNets as units name them (folder and store scans).
pub fn local_models(state: &Shared) -> Vec<String> {
    library(&state.config.controlnet_dirs, &state.config.sources)
        .entries()
        .iter()
        .map(|e| e.title())
        .collect()
}

#[derive(Debug, Deserialize, IntoParams)]
pub struct ModuleListQuery {
    /// List the preprocessors by their UI labels instead of their names.
    #[serde(default)]
    pub alias_names: bool,
}

/// The preprocessors, in the extension's order, with each one's sliders
/// (`module_detail`).
#[utoipa::path(get, path = "/controlnet/module_list", tag = "controlnet", params(ModuleListQuery),
    responses((status = 200, body = Object)))]
pub async fn module_list(ApiQuery(q): ApiQuery<ModuleListQuery>) -> Json<Value> {
    let modules = sdkube_preprocess::modules();
    let key = |m: &sdkube_preprocess::Module| match q.alias_names {
        true => m.label,
        false => m.name,
    };
    let list: Vec<&str> = modules.iter().map(key).collect();
    let detail: Map<String, Value> = modules
        .iter()
        .map(|m| {
            let d = json!({ "model_free": m.model_free, "sliders": m.sliders });
            (key(m).to_string(), d)
        })
        .collect();
    Json(json!({ "module_list": list, "module_detail": detail }))
}

/// `POST /controlnet/detect`, with the extension's field names and defaults.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(default)]
pub struct DetectRequest {
    pub controlnet_module: String,
    /// Base64 images.
    pub controlnet_input_images: Vec<String>,
    /// Base64 masks, one per image, for the inpaint preprocessors.
    pub controlnet_masks: Vec<String>,
    /// -1: the module's default.
    pub controlnet_processor_res: f64,
    pub controlnet_threshold_a: f64,
    pub controlnet_threshold_b: f64,
    /// Accepted; preprocessors here always run on the CPU.
    pub low_vram: bool,
}

impl Default for DetectRequest {
    fn default() -> Self {
        Self {
            controlnet_module: "none".into(),
            controlnet_input_images: Vec::new(),
            controlnet_masks: Vec::new(),
            controlnet_processor_res: -1.0,
            controlnet_threshold_a: -1.0,
            controlnet_threshold_b: -1.0,
            low_vram: false,
        }
    }
}

/// The detected maps, base64 PNGs, one per input image.
#[derive(Debug, Serialize, ToSchema)]
pub struct DetectResponse {
    pub images: Vec<String>,
    pub info: String,
}

/// Runs a preprocessor on images, as a unit would before generating: the maps come back as
/// base64 PNGs. Learned preprocessors need their weights in the model store.
#[utoipa::path(post, path = "/controlnet/detect", tag = "controlnet", request_body = DetectRequest,
    responses((status = 200, body = DetectResponse), (status = 422, body = crate::error::ErrorBody)))]
pub async fn detect(
    State(state): State<AppState>,
    ApiJson(r): ApiJson<DetectRequest>,
) -> Result<Json<DetectResponse>, ApiError> {
    let unprocessable = |m: String| ApiError::new(axum::http::StatusCode::UNPROCESSABLE_ENTITY, m);
    let module =
        sdkube_preprocess::find(&r.controlnet_module).map_err(|e| unprocessable(e.to_string()))?;
    if r.controlnet_input_images.is_empty() {
        return Err(unprocessable("No image selected".into()));
    }
    if r.controlnet_input_images.len() > MAX_DETECT_IMAGES {
        return Err(unprocessable(format!(
            "at most {MAX_DETECT_IMAGES} images per call, got {}",
            r.controlnet_input_images.len()
        )));
    }
    if module.requires_mask && r.controlnet_masks.len() != r.controlnet_input_images.len() {
        return Err(unprocessable(format!(
            "Preprocessor {} requires `controlnet_masks` param.",
            module.name
        )));
    }
    let params = Params {
        processor_res: Some(r.controlnet_processor_res),
        threshold_a: Some(r.controlnet_threshold_a),
        threshold_b: Some(r.controlnet_threshold_b),
    };
    module
        .resolve(&params)
        .map_err(|e| unprocessable(e.to_string()))?;
    let mut inputs = Vec::new();
    for (i, b64) in r.controlnet_input_images.iter().enumerate() {
        let image = decode_image(&format!("controlnet_input_images[{i}]"), b64)?;
        let mask = r
            .controlnet_masks
            .get(i)
            .map(|m| decode_image(&format!("controlnet_masks[{i}]"), m).map(|m| m.to_luma8()))
            .transpose()?;
        inputs.push((image, mask));
    }
    let store = state.config.post.store.clone();
    let name = module.name;
    let annotators = state.detect_annotators.clone();
    let images = tokio::task::spawn_blocking(move || -> Result<Vec<String>, ApiError> {
        let mut annotators = crate::lock(&annotators);
        load_annotators(&store, std::iter::once(name), &Device::Cpu, &mut annotators)?;
        inputs
            .iter()
            .map(|(image, mask)| {
                let map =
                    sdkube_preprocess::detect(name, image, mask.as_ref(), &params, &annotators)
                        .map_err(|e| unprocessable(e.to_string()))?;
                let mut png = Vec::new();
                map.write_to(&mut Cursor::new(&mut png), image::ImageFormat::Png)
                    .map_err(|e| ApiError::internal(e.to_string()))?;
                Ok(base64::engine::general_purpose::STANDARD.encode(png))
            })
            .collect()
    })
    .await
    .map_err(|e| ApiError::internal(e.to_string()))??;
    Ok(Json(DetectResponse {
        images,
        info: "Success".into(),
    }))
}
