//! A1111's lists: checkpoints, samplers, schedulers, upscalers, face restorers, and the
//! empty lists of features sdkube does not have. In the `api` role the lists that depend on
//! a worker's files come from the most recent live worker's report.

use axum::extract::State;
use axum::Json;
use sdkube_pipeline::latent_upscale::LatentMode;
use sdkube_pipeline::sampler::{Sampler, Scheduler};
use serde::Serialize;
use serde_json::{json, Map, Value};
use utoipa::ToSchema;

use crate::model::CheckpointInfo;
use crate::post::UpscalerInfo;
use crate::state::AppState;

/// Checkpoints a client may select: a worker's (or this process's) own list.
pub async fn checkpoints(state: &AppState) -> Vec<CheckpointInfo> {
    if let Some(r) = state.remote_report().await {
        return r.checkpoints;
    }
    let slot = state.model.clone();
    tokio::task::spawn_blocking(move || slot.checkpoints())
        .await
        .unwrap_or_default()
}

async fn upscaler_list(state: &AppState) -> Vec<UpscalerInfo> {
    match state.remote_report().await {
        Some(r) => r.upscalers,
        None => state.config.post.upscalers(),
    }
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
        checkpoints(&state)
            .await
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

#[utoipa::path(get, path = "/sdapi/v1/upscalers", tag = "a1111", responses((status = 200, body = Vec<UpscalerInfo>)))]
pub async fn upscalers(State(state): State<AppState>) -> Json<Vec<UpscalerInfo>> {
    Json(upscaler_list(&state).await)
}

#[derive(Debug, Serialize, ToSchema)]
pub struct LatentUpscaleMode {
    pub name: String,
}

/// Latent upscalers for hires fix.
#[utoipa::path(get, path = "/sdapi/v1/latent-upscale-modes", tag = "a1111", responses((status = 200, body = Vec<LatentUpscaleMode>)))]
pub async fn latent_upscale_modes() -> Json<Vec<LatentUpscaleMode>> {
    Json(
        LatentMode::ALL
            .iter()
            .map(|m| LatentUpscaleMode {
                name: m.name().to_string(),
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
    let names = match state.remote_report().await {
        Some(r) => r.face_restorers,
        None => state.config.post.face_restorers(),
    };
    Json(
        names
            .into_iter()
            .map(|name| FaceRestorerItem {
                name,
                cmd_dir: None,
            })
            .collect(),
    )
}

/// Re-reads the checkpoint folders and the store (listing is live; nothing to do).
#[utoipa::path(post, path = "/sdapi/v1/refresh-checkpoints", tag = "a1111", responses((status = 200, description = "refreshed")))]
pub async fn refresh_checkpoints() -> Json<Value> {
    Json(Value::Null)
}

/// Lists A1111 has for features sdkube does not have (styles, hypernetworks,
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

/// Extensions: none.
#[utoipa::path(get, path = "/sdapi/v1/extensions", tag = "a1111", responses((status = 200, body = Vec<Object>)))]
pub async fn extensions() -> Json<Vec<Value>> {
    Json(Vec::new())
}

/// The scripts `script_name` runs, per tab, by A1111's lower-case names.
#[utoipa::path(get, path = "/sdapi/v1/scripts", tag = "a1111", responses((status = 200, body = Object)))]
pub async fn scripts() -> Json<Value> {
    Json(json!({
        "txt2img": ["prompt matrix", "x/y/z plot"],
        "img2img": ["prompt matrix", "sd upscale", "x/y/z plot"],
    }))
}

/// Each script and tab with its positional arguments (A1111's `ScriptInfo`).
#[utoipa::path(get, path = "/sdapi/v1/script-info", tag = "a1111", responses((status = 200, body = Vec<Object>)))]
pub async fn script_info() -> Json<Vec<Value>> {
    use sdkube_pipeline::scripts::{xyz::axis_labels, Mode};
    let arg = |label: &str, value: Value| json!({"label": label, "value": value});
    let xyz = |mode: Mode| {
        let axes = axis_labels(mode);
        let mut args = Vec::new();
        for (axis, default) in [("X", 1), ("Y", 0), ("Z", 0)] {
            args.push(
                json!({"label": format!("{axis} type"), "value": axes[default], "choices": axes}),
            );
            args.push(arg(&format!("{axis} values"), json!("")));
            args.push(arg(&format!("{axis} values"), json!([])));
        }
        for (label, value) in [
            ("Draw legend", json!(true)),
            ("Include Sub Images", json!(false)),
            ("Include Sub Grids", json!(false)),
            ("Keep -1 for seeds", json!(false)),
            ("Vary seeds for X", json!(false)),
            ("Vary seeds for Y", json!(false)),
            ("Vary seeds for Z", json!(false)),
            ("Grid margins (px)", json!(0)),
            ("Use text inputs instead of dropdowns", json!(false)),
        ] {
            args.push(arg(label, value));
        }
        args
    };
    let matrix = vec![
        arg("Set at prompt start", json!(false)),
        arg("Random seeds", json!(false)),
        json!({"label": "Prompt type", "value": "positive", "choices": ["positive", "negative"]}),
        json!({"label": "Joining char", "value": "comma", "choices": ["comma", "space", "none"]}),
        arg("Grid margins", json!(0)),
    ];
    let upscale = vec![
        arg("", Value::Null),
        arg("Tile overlap", json!(64)),
        arg("Upscaler", json!(0)),
        arg("Scale Factor", json!(2)),
    ];
    let info = |name: &str, img2img: bool, args: Vec<Value>| json!({"name": name, "is_alwayson": false, "is_img2img": img2img, "args": args});
    Json(vec![
        info("x/y/z plot", false, xyz(Mode::Txt2Img)),
        info("prompt matrix", false, matrix.clone()),
        info("x/y/z plot", true, xyz(Mode::Img2Img)),
        info("prompt matrix", true, matrix),
        info("sd upscale", true, upscale),
    ])
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
        upscaler_list(&state)
            .await
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
