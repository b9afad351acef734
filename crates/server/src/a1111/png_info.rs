//! A1111's PNG Info: the generation parameters stored in a PNG's `parameters` chunk, and
//! the parser of that text.

use axum::Json;
use sdkube_pipeline::Infotext;
use serde::{Deserialize, Serialize};
use serde_json::{json, Map, Value};
use utoipa::ToSchema;

use crate::error::{ApiError, ApiJson};
use crate::requests::decode_base64;

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
    responses((status = 200, body = PngInfoResponse), (status = 400, body = crate::error::ErrorBody)))]
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

/// A1111's infotext → fields (`parse_generation_parameters`): `Prompt`, `Negative prompt`,
/// then each `Key: value`, numbers as JSON numbers; a `WxH` value also as `Key-1`/`Key-2`.
pub fn parse_infotext(text: &str) -> Map<String, Value> {
    let mut out = Map::new();
    if text.trim().is_empty() {
        return out;
    }
    let parsed = Infotext::parse(text);
    for (i, (k, v)) in parsed.parameters().into_iter().enumerate() {
        // The prompts stay text even when they read as numbers.
        let value = if i < 2 { Value::String(v) } else { typed(&v) };
        out.insert(k, value);
    }
    // Kept whole as well, as earlier versions of this endpoint answered.
    for (k, v) in &parsed.fields {
        out.entry(k.clone()).or_insert_with(|| typed(v));
    }
    out
}

/// A value as JSON: a whole number, a number, else the text.
fn typed(v: &str) -> Value {
    match (v.parse::<i64>(), v.parse::<f64>()) {
        (Ok(n), _) => json!(n),
        (_, Ok(n)) if n.is_finite() => json!(n),
        _ => Value::String(v.to_string()),
    }
}
