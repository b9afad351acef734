//! Optional authentication: an API key (`Authorization: Bearer KEY`, `X-Api-Key: KEY`, or
//! the cookie `sdkube_api_key=KEY` that the web UI sets for EventSource, which cannot send
//! headers) and/or HTTP basic auth (A1111's `--api-auth`). Probes and metrics stay open so
//! that Kubernetes and Prometheus need no credentials; with an API key only, the UI's static
//! shell loads too (it holds no data and asks for the key).

use axum::extract::{Request, State};
use axum::http::{header, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use base64::Engine as _;

use crate::AppState;

/// Who may call the server: none of these set means anyone (routes but the probes and
/// metrics check them).
#[derive(Debug, Clone, Default)]
pub struct AuthConfig {
    /// A key clients send as `Authorization: Bearer <key>` (or `X-API-Key`).
    pub api_key: Option<String>,
    /// (user, password)
    pub basic: Option<(String, String)>,
}

impl AuthConfig {
    /// Parses `user:password` for basic auth.
    pub fn parse_basic(s: &str) -> Result<(String, String), String> {
        match s.split_once(':') {
            Some((u, p)) if !u.is_empty() && !p.is_empty() => Ok((u.into(), p.into())),
            _ => Err("--basic-auth must be user:password, both non-empty".into()),
        }
    }
}

const OPEN_PATHS: [&str; 3] = ["/healthz", "/readyz", "/metrics"];
const UI_SHELL: [&str; 4] = ["/", "/ui/app.js", "/ui/style.css", "/docs"];

/// Compares without stopping at the first difference.
fn same(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

fn presented_key(req: &Request) -> Option<String> {
    let h = req.headers();
    if let Some(v) = h.get(header::AUTHORIZATION).and_then(|v| v.to_str().ok()) {
        if let Some(k) = v.strip_prefix("Bearer ") {
            return Some(k.trim().to_string());
        }
    }
    if let Some(v) = h.get("x-api-key").and_then(|v| v.to_str().ok()) {
        return Some(v.trim().to_string());
    }
    h.get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .find_map(|c| c.trim().strip_prefix("sdkube_api_key=").map(str::to_string))
}

fn basic_ok(req: &Request, user: &str, password: &str) -> bool {
    let Some(v) = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Basic "))
    else {
        return false;
    };
    let Ok(decoded) = base64::engine::general_purpose::STANDARD.decode(v.trim()) else {
        return false;
    };
    same(&decoded, format!("{user}:{password}").as_bytes())
}

fn refuse(message: &str, scheme: &str) -> Response {
    let mut res = (
        StatusCode::UNAUTHORIZED,
        axum::Json(serde_json::json!({"error": message, "detail": message, "auth": scheme})),
    )
        .into_response();
    if scheme == "basic" {
        res.headers_mut().insert(
            header::WWW_AUTHENTICATE,
            header::HeaderValue::from_static("Basic realm=\"sdkube\""),
        );
    }
    res
}

pub async fn require_auth(State(state): State<AppState>, req: Request, next: Next) -> Response {
    let auth = &state.config.auth;
    let path = req.uri().path();
    if OPEN_PATHS.contains(&path) {
        return next.run(req).await;
    }
    if let Some((user, password)) = &auth.basic {
        // With an API key configured too, a valid key is enough (scripts), else basic.
        let key_ok = auth
            .api_key
            .as_ref()
            .zip(presented_key(&req))
            .is_some_and(|(want, got)| same(want.as_bytes(), got.as_bytes()));
        if !key_ok && !basic_ok(&req, user, password) {
            return refuse("authentication required (HTTP basic auth)", "basic");
        }
        return next.run(req).await;
    }
    if let Some(want) = &auth.api_key {
        if UI_SHELL.contains(&path) {
            return next.run(req).await;
        }
        match presented_key(&req) {
            Some(got) if same(want.as_bytes(), got.as_bytes()) => {}
            Some(_) => return refuse("the API key is wrong", "api_key"),
            None => {
                return refuse(
                    "an API key is required: send `Authorization: Bearer KEY` or `X-Api-Key: KEY`",
                    "api_key",
                )
            }
        }
    }
    next.run(req).await
}
