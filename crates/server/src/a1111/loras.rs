//! A1111's LoRA listing (`extensions-builtin/Lora/scripts/lora_script.py`): the files of
//! `--lora-dirs` with name, alias, path and the safetensors metadata.

use axum::extract::State;
use axum::Json;
use sdkube_pipeline::loras::{LoraInfo, LoraLibrary};
use serde_json::Value;

use crate::error::ApiError;
use crate::state::AppState;

async fn list(state: &AppState) -> Result<Vec<LoraInfo>, ApiError> {
    let dirs = state.config.lora_dirs.clone();
    tokio::task::spawn_blocking(move || LoraLibrary::new(dirs).list().to_vec())
        .await
        .map_err(|e| ApiError::internal(e.to_string()))
}

/// LoRA files a prompt may name with `<lora:name:weight>` (or `<lora:name:te:unet>`): each
/// with `name` (the file stem), `alias` (`ss_output_name` from its metadata), `path` and
/// `metadata` (the safetensors header's `__metadata__`). The folders are read on every call.
#[utoipa::path(get, path = "/sdapi/v1/loras", tag = "a1111", responses((status = 200, body = Vec<Object>)))]
pub async fn loras(State(state): State<AppState>) -> Result<Json<Vec<Value>>, ApiError> {
    let list = list(&state).await?;
    Ok(Json(
        list.iter()
            .map(|l| serde_json::to_value(l).unwrap_or(Value::Null))
            .collect(),
    ))
}

/// Re-reads the LoRA folders (listing and generation read them anyway; kept for clients
/// that call it).
#[utoipa::path(post, path = "/sdapi/v1/refresh-loras", tag = "a1111", responses((status = 200, description = "refreshed")))]
pub async fn refresh_loras(State(state): State<AppState>) -> Result<Json<Value>, ApiError> {
    list(&state).await?;
    Ok(Json(Value::Null))
}
