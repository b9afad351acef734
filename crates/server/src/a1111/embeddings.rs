//! Textual-inversion embeddings through A1111's API: the list (for the loaded model),
//! "Create embedding" and "Train embedding" (both run as jobs on a worker).

use axum::extract::State;
use axum::Json;
use sdkube_pipeline::embeddings::EmbeddingSet;
use serde::Serialize;
use serde_json::{json, Map, Value};
use utoipa::ToSchema;

use super::generation::run_job;
use crate::config::Role;
use crate::error::{ApiError, ApiJson};
use crate::job::JobState;
use crate::requests::{CreateEmbeddingRequest, JobSpec, TrainEmbeddingRequest};
use crate::state::{AppState, Shared};

#[derive(Debug, Serialize, ToSchema)]
pub struct EmbeddingsResponse {
    /// name → `{step, sd_checkpoint, sd_checkpoint_name, shape, vectors}` (A1111's shape).
    #[schema(value_type = Object)]
    pub loaded: Map<String, Value>,
    /// name → the same, plus `reason` (A1111 lists skipped ones without one).
    #[schema(value_type = Object)]
    pub skipped: Map<String, Value>,
}

/// This process's embeddings folder read for its loaded model's text-encoder widths, in
/// `/sdapi/v1/embeddings`' shape (blocking: reads every file).
pub fn local_embeddings(state: &Shared) -> Result<Value, ApiError> {
    let widths = *crate::lock(&state.text_widths);
    let widths = widths.ok_or_else(|| ApiError::unavailable("no model is loaded yet"))?;
    let set = EmbeddingSet::load_dir(&state.config.embeddings, widths)
        .map_err(|e| ApiError::internal(format!("reading the embeddings folder: {e}")))?;
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
    serde_json::to_value(EmbeddingsResponse { loaded, skipped })
        .map_err(|e| ApiError::internal(e.to_string()))
}

/// The embeddings a worker can use: this process's, or in the `api` role the most recent
/// worker report's.
async fn embedding_list(state: &AppState) -> Result<Value, ApiError> {
    if state.config.role == Role::Api {
        return state
            .remote_report()
            .await
            .and_then(|r| r.embeddings)
            .ok_or_else(|| ApiError::unavailable("no worker has loaded a model yet"));
    }
    let me = state.clone();
    tokio::task::spawn_blocking(move || local_embeddings(&me))
        .await
        .map_err(|e| ApiError::internal(e.to_string()))?
}

/// Textual inversion embeddings in the embeddings folder: loaded, and skipped with the
/// reason (wrong width for this model, unreadable, not tensors only, …).
#[utoipa::path(get, path = "/sdapi/v1/embeddings", tag = "a1111", responses((status = 200, body = EmbeddingsResponse)))]
pub async fn embeddings(State(state): State<AppState>) -> Result<Json<Value>, ApiError> {
    Ok(Json(embedding_list(&state).await?))
}

/// Re-reads the embeddings folder (generation also picks up changes before each job).
#[utoipa::path(post, path = "/sdapi/v1/refresh-embeddings", tag = "a1111", responses((status = 200, description = "refreshed")))]
pub async fn refresh_embeddings(State(state): State<AppState>) -> Result<Json<Value>, ApiError> {
    embedding_list(&state).await?;
    Ok(Json(Value::Null))
}

#[derive(Debug, Serialize, ToSchema)]
pub struct InfoResponse {
    pub info: String,
}

/// A1111's "Create embedding": a new embedding initialised from `init_text`, written to
/// `<embeddings>/<name>.safetensors`.
#[utoipa::path(post, path = "/sdapi/v1/create/embedding", tag = "a1111", request_body = CreateEmbeddingRequest,
    responses((status = 200, body = InfoResponse), (status = 400, body = crate::error::ErrorBody)))]
pub async fn create_embedding(
    State(state): State<AppState>,
    ApiJson(request): ApiJson<CreateEmbeddingRequest>,
) -> Result<Json<InfoResponse>, ApiError> {
    let (_, record) = run_job(&state, JobSpec::CreateEmbedding { request }).await?;
    let status = &record.status;
    if status.state != JobState::Succeeded {
        return Err(ApiError::of_job(status, "not created"));
    }
    Ok(Json(InfoResponse {
        info: format!(
            "Embedding created: {}",
            status.info["path"].as_str().unwrap_or_default()
        ),
    }))
}

/// Trains an embedding as a job (progress through `/sdapi/v1/progress` and the job's
/// events); answers when training ends, as A1111 does.
#[utoipa::path(post, path = "/sdapi/v1/train/embedding", tag = "a1111", request_body = TrainEmbeddingRequest,
    responses((status = 200, body = InfoResponse), (status = 400, body = crate::error::ErrorBody)))]
pub async fn train_embedding(
    State(state): State<AppState>,
    ApiJson(request): ApiJson<TrainEmbeddingRequest>,
) -> Result<Json<InfoResponse>, ApiError> {
    let (_, record) = run_job(&state, JobSpec::TrainEmbedding { request }).await?;
    let status = &record.status;
    match status.state {
        JobState::Succeeded | JobState::Cancelled => Ok(Json(InfoResponse {
            info: format!("train embedding complete: {}", status.info),
        })),
        _ => Err(ApiError::of_job(status, "training failed")),
    }
}
