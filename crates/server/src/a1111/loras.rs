//! A1111's LoRA listing (`extensions-builtin/Lora/scripts/lora_script.py`): the files of
//! `--lora-dirs` and the LoRAs fetched into the model store, with name, alias, path and the
//! safetensors metadata. In the `api` role, which has no folders, the list is the most recent
//! worker's report.

use std::path::PathBuf;

use axum::extract::State;
use axum::Json;
use sdkube_pipeline::loras::LoraLibrary;
use serde_json::Value;

use crate::config::Role;
use crate::error::ApiError;
use crate::model::ModelSources;
use crate::state::{AppState, Shared};

/// The LoRAs a worker here can use: the files of `dirs`, and the model store's catalog entries
/// of kind `lora` that are fetched (`sdkube fetch NAME`), under their catalog names.
pub fn library(dirs: &[PathBuf], sources: &ModelSources) -> LoraLibrary {
    LoraLibrary::with_files(dirs.to_vec(), sources.fetched("lora"))
}

/// This process's LoRA files as `/sdapi/v1/loras` lists them (folder scans).
pub fn local_loras(state: &Shared) -> Option<Value> {
    let library = library(&state.config.lora_dirs, &state.config.sources);
    serde_json::to_value(library.list()).ok()
}

async fn list(state: &AppState) -> Result<Value, ApiError> {
    if state.config.role == Role::Api {
        return state
            .remote_report()
            .await
            .and_then(|r| r.loras)
            .ok_or_else(|| ApiError::unavailable("no worker has reported its LoRA files yet"));
    }
    let me = state.clone();
    tokio::task::spawn_blocking(move || local_loras(&me))
        .await
        .map_err(|e| ApiError::internal(e.to_string()))?
        .ok_or_else(|| ApiError::internal("listing the LoRA folders"))
}

/// LoRA files a prompt may name with `<lora:name:weight>` (or `<lora:name:te:unet>`): each
/// with `name` (the file stem, or the catalog name of one fetched into the store), `alias`
/// (`ss_output_name` from its metadata), `path` and `metadata` (the safetensors header's
/// `__metadata__`). The folders are read on every call.
#[utoipa::path(get, path = "/sdapi/v1/loras", tag = "a1111", responses((status = 200, body = Vec<Object>)))]
pub async fn loras(State(state): State<AppState>) -> Result<Json<Value>, ApiError> {
    Ok(Json(list(&state).await?))
}

/// Re-reads the LoRA folders (listing and generation read them anyway; kept for clients
/// that call it).
#[utoipa::path(post, path = "/sdapi/v1/refresh-loras", tag = "a1111", responses((status = 200, description = "refreshed")))]
pub async fn refresh_loras(State(state): State<AppState>) -> Result<Json<Value>, ApiError> {
    list(&state).await?;
    Ok(Json(Value::Null))
}
