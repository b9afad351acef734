//! A1111's PNG Info: the generation parameters stored in a PNG's `parameters` chunk, and
//! the parser of that text.

use axum::Json;
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
