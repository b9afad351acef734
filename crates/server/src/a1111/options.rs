//! A1111's settings: `options` (the selected checkpoint among them), `cmd-flags`, `memory`.
//!
//! With a shared queue the options live in Redis, so every replica reads and writes the same
//! ones; a checkpoint selected there is recorded with each job submitted afterwards, and the
//! worker that takes the job loads it first (the `api` role answers at once instead of after
//! the load, as it has no model of its own).

use axum::extract::State;
use axum::Json;
use serde_json::{json, Map, Value};

use super::settings;
use crate::config::Role;
use crate::error::{ApiError, ApiJson};
use crate::model::{ModelState, Outcome};
use crate::state::{AppState, MODEL_OPTION};

async fn options_value(state: &AppState) -> Result<Map<String, Value>, ApiError> {
    let stored = state.cluster.options().await?;
    let mut m = settings::defaults();
    // What sdkube does, where it differs from A1111's defaults.
    m.insert("face_restoration_model".into(), json!("GFPGAN"));
    m.insert("outdir_samples".into(), json!(state.gallery.location()));
    m.insert("sd_checkpoint_hash".into(), Value::Null);
    for (k, v) in stored {
        m.insert(k, v);
    }
    m.insert(
        MODEL_OPTION.into(),
        Value::String(current_model(state).await),
    );
    Ok(m)
}

/// The checkpoint jobs run on now: the local model, or in the `api` role the selection
/// (else what a worker has loaded, else the `--model` default).
async fn current_model(state: &AppState) -> String {
    if state.config.role != Role::Api {
        return state.model.status().name;
    }
    let selected = state.cluster.options().await.ok().and_then(|o| {
        o.get(MODEL_OPTION)
            .and_then(|v| v.as_str())
            .map(str::to_string)
    });
    if let Some(s) = selected {
        return s;
    }
    match state.remote_report().await {
        Some(r) if !r.model.name.is_empty() => r.model.name,
        _ => sdkube_models::model_name(std::path::Path::new(&state.config.model)),
    }
}

/// Settings, A1111's `options`.
#[utoipa::path(get, path = "/sdapi/v1/options", tag = "a1111", responses((status = 200, body = Object)))]
pub async fn get_options(
    State(state): State<AppState>,
) -> Result<Json<Map<String, Value>>, ApiError> {
    Ok(Json(options_value(&state).await?))
}

/// Changes settings. `sd_model_checkpoint` switches the served model and answers once it
/// is loaded (as A1111 does; in the `api` role once recorded); other keys are stored and
/// echoed back.
#[utoipa::path(post, path = "/sdapi/v1/options", tag = "a1111", request_body = Object,
    responses((status = 200, description = "applied"), (status = 400, body = crate::error::ErrorBody)))]
pub async fn set_options(
    State(state): State<AppState>,
    ApiJson(body): ApiJson<Map<String, Value>>,
) -> Result<Json<Value>, ApiError> {
    let mut changes = body.clone();
    // Nothing is stored unless every value is valid: a bad value stored would fail every
    // later request of every client.
    let stored = state.cluster.options().await?;
    let unknown: Map<String, Value> = stored
        .into_iter()
        .filter(|(k, _)| !settings::is_known(k))
        .collect();
    settings::check(&body, &unknown).map_err(ApiError::bad_request)?;
    if let Some(v) = body.get(MODEL_OPTION) {
        let name = v
            .as_str()
            .ok_or_else(|| ApiError::bad_request("sd_model_checkpoint must be a string"))?;
        // A1111 clients send the title, possibly with a " [hash]" suffix.
        let wanted = name.split(" [").next().unwrap_or(name).to_string();
        if state.config.role == Role::Api {
            check_known_checkpoint(&state, &wanted).await?;
        } else {
            switch_local_model(&state, &wanted).await?;
        }
        changes.insert(MODEL_OPTION.into(), Value::String(wanted));
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
    state.cluster.set_options(&changes).await?;
    Ok(Json(Value::Null))
}

/// Selects a checkpoint for this process's workers and waits until they have loaded it. A
/// checkpoint that cannot be fetched or loaded is an error naming the cause, and the served
/// one stays.
async fn switch_local_model(state: &AppState, wanted: &str) -> Result<(), ApiError> {
    let generation = state
        .model
        .select(wanted, false)
        .map_err(ApiError::bad_request)?;
    loop {
        match state.model.outcome(generation) {
            Outcome::Serving => return Ok(()),
            Outcome::Replaced => {
                return Err(ApiError::new(
                    axum::http::StatusCode::CONFLICT,
                    format!("switching to {wanted}: another model was selected meanwhile"),
                ))
            }
            Outcome::Failed(message) => {
                let served = state.model.status();
                let kept = match served.state {
                    ModelState::Ready => format!("; still serving {}", served.name),
                    _ => String::new(),
                };
                let cause = format!("switching to {wanted} failed: {message}{kept}");
                return Err(if message.starts_with("fetching") {
                    ApiError::unavailable(cause)
                } else {
                    ApiError::internal(cause)
                });
            }
            Outcome::Pending => tokio::time::sleep(std::time::Duration::from_millis(100)).await,
        }
    }
}

/// In the `api` role: a checkpoint is selectable when a worker lists it, or the catalog has
/// it (a worker fetches it on first use).
async fn check_known_checkpoint(state: &AppState, wanted: &str) -> Result<(), ApiError> {
    let listed = crate::a1111::listings::checkpoints(state).await;
    if listed.iter().any(|c| c.title == wanted || c.name == wanted) {
        return Ok(());
    }
    Err(ApiError::bad_request(format!(
        "model {wanted:?} is not a checkpoint this server knows (see /sdapi/v1/sd-models)"
    )))
}

/// Memory of the process and the devices (A1111's shape: `ram` and `cuda`); in the `api`
/// role the devices are the workers'.
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
    let cuda = match state.config.role {
        Role::Api => state
            .cluster
            .workers()
            .await
            .unwrap_or_default()
            .into_iter()
            .flat_map(|w| {
                w.device_memory
                    .into_iter()
                    .map(move |(d, b)| (format!("{}/{d}", w.id), b))
            })
            .collect(),
        _ => crate::metrics::cuda_memory_used(&state.device_labels()),
    };
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
