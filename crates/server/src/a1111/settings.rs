//! A1111's settings (`/sdapi/v1/options`): every setting A1111 1.x has, with its default, so
//! that clients reading one before writing it (A1111's own tests read `send_seed`) find it.
//! `settings.json` lists them (name → default, and the range or choices A1111's settings page
//! offers); a write is checked against that before anything is stored, so that one client
//! cannot store a value that breaks every later request. sdkube acts on
//! `sd_model_checkpoint`, `sd_vae` and `CLIP_stop_at_last_layers`, and on two settings of its
//! own listed last, `step_cache_interval` and `step_cache_branch` (step caching, off by
//! default); the others are kept and echoed for the clients that read them back.
//!
//! Settings A1111 does not have (extensions' ones) are kept too, within bounds: at most
//! [`MAX_UNKNOWN`] of them, each at most [`MAX_UNKNOWN_BYTES`] as JSON.

use std::sync::LazyLock;

use serde::Deserialize;
use serde_json::{Map, Value};

/// Settings sdkube does not know, kept at most.
pub const MAX_UNKNOWN: usize = 256;
/// Largest value of a setting sdkube does not know, as JSON.
pub const MAX_UNKNOWN_BYTES: usize = 4096;

#[derive(Debug, Deserialize)]
struct Setting {
    default: Value,
    min: Option<f64>,
    max: Option<f64>,
    #[serde(default)]
    integer: bool,
    choices: Option<Vec<String>>,
}

static SETTINGS: LazyLock<Map<String, Value>> = LazyLock::new(|| {
    serde_json::from_str(include_str!("settings.json")).expect("settings.json is valid JSON")
});

fn setting(key: &str) -> Option<Setting> {
    SETTINGS
        .get(key)
        .and_then(|v| serde_json::from_value(v.clone()).ok())
}

/// Every known setting with its default.
pub fn defaults() -> Map<String, Value> {
    SETTINGS
        .iter()
        .map(|(k, v)| (k.clone(), v["default"].clone()))
        .collect()
}

/// Whether A1111 has this setting.
pub fn is_known(key: &str) -> bool {
    SETTINGS.contains_key(key)
}

/// Checks every change; the message names each bad one. `unknown_stored`: how many unknown
/// settings are kept already (the new ones count against [`MAX_UNKNOWN`]).
pub fn check(
    changes: &Map<String, Value>,
    unknown_stored: &Map<String, Value>,
) -> Result<(), String> {
    let mut problems = Vec::new();
    let mut unknown = unknown_stored.len();
    for (key, value) in changes {
        match setting(key) {
            Some(s) => {
                if let Err(e) = check_value(&s, value) {
                    problems.push(format!("{key}: {e}"));
                }
            }
            None => {
                if !unknown_stored.contains_key(key) {
                    unknown += 1;
                }
                let size = value.to_string().len();
                if size > MAX_UNKNOWN_BYTES {
                    problems.push(format!(
                        "{key}: not an A1111 setting, and its value ({size} bytes as JSON) is \
                         over the {MAX_UNKNOWN_BYTES} bytes kept for such settings"
                    ));
                }
            }
        }
    }
    if unknown > MAX_UNKNOWN {
        problems.push(format!(
            "at most {MAX_UNKNOWN} settings A1111 does not have are kept; this would make \
             {unknown}"
        ));
    }
    match problems.is_empty() {
        true => Ok(()),
        false => Err(problems.join("; ")),
    }
}

fn check_value(s: &Setting, v: &Value) -> Result<(), String> {
    let kind = |v: &Value| match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "a list",
        Value::Object(_) => "an object",
    };
    match (&s.default, v) {
        (Value::Bool(_), Value::Bool(_)) => Ok(()),
        (Value::Number(_), Value::Number(n)) => {
            let x = n.as_f64().unwrap_or(f64::NAN);
            if s.integer && x.fract() != 0.0 {
                return Err(format!("must be a whole number, got {v}"));
            }
            match (s.min, s.max) {
                (Some(lo), Some(hi)) if !(lo..=hi).contains(&x) => {
                    Err(format!("must be from {lo} to {hi}, got {v}"))
                }
                _ => Ok(()),
            }
        }
        (Value::String(_), Value::String(text)) => match &s.choices {
            Some(c) if !c.contains(text) => Err(format!("must be one of {c:?}, got {text:?}")),
            _ if text.len() > MAX_UNKNOWN_BYTES => Err(format!(
                "at most {MAX_UNKNOWN_BYTES} bytes, got {}",
                text.len()
            )),
            _ => Ok(()),
        },
        (Value::Array(_), Value::Array(items)) => {
            if items.iter().all(|i| i.is_string()) && v.to_string().len() <= MAX_UNKNOWN_BYTES {
                Ok(())
            } else {
                Err(format!(
                    "must be a list of names of at most {MAX_UNKNOWN_BYTES} bytes"
                ))
            }
        }
        // No default (a checkpoint, an upscaler): a name, or null.
        (Value::Null, Value::Null | Value::String(_)) => Ok(()),
        (Value::Null, v) => Err(format!("must be a name or null, got {}", kind(v))),
        (d, v) => Err(format!("must be {}, got {}", kind(d), kind(v))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn changes(v: Value) -> Map<String, Value> {
        v.as_object().unwrap().clone()
    }

    #[test]
    fn every_setting_parses_and_its_default_passes_its_own_check() {
        assert!(SETTINGS.len() > 200, "{}", SETTINGS.len());
        for (key, default) in defaults() {
            let s = setting(&key).unwrap_or_else(|| panic!("{key} does not parse"));
            check_value(&s, &default).unwrap_or_else(|e| panic!("{key}: {e}"));
        }
    }

    #[test]
    fn values_are_checked_by_type_range_and_choice() {
        let none = Map::new();
        assert!(check(
            &changes(json!({"send_seed": false, "CLIP_stop_at_last_layers": 2})),
            &none
        )
        .is_ok());
        for (bad, says) in [
            (
                json!({"CLIP_stop_at_last_layers": "abc"}),
                "must be a number, got a string",
            ),
            (json!({"CLIP_stop_at_last_layers": 13}), "from 1 to 12"),
            (json!({"CLIP_stop_at_last_layers": 1.5}), "whole number"),
            (json!({"send_seed": "yes"}), "must be a boolean"),
            (json!({"randn_source": "TPU"}), "must be one of"),
            (
                json!({"sd_model_checkpoint": 3}),
                "must be a name or null, got a number",
            ),
        ] {
            let e = check(&changes(bad.clone()), &none).unwrap_err();
            assert!(e.contains(says), "{bad}: {e}");
        }
        // Unknown settings: kept, but not big ones nor too many.
        assert!(check(&changes(json!({"my_extension_flag": 3})), &none).is_ok());
        let big = json!({"my_blob": "x".repeat(MAX_UNKNOWN_BYTES)});
        assert!(check(&changes(big), &none).unwrap_err().contains("bytes"));
        let full: Map<String, Value> = (0..MAX_UNKNOWN)
            .map(|i| (format!("k{i}"), json!(1)))
            .collect();
        assert!(
            check(&changes(json!({"k0": 2})), &full).is_ok(),
            "replacing one is fine"
        );
        assert!(check(&changes(json!({"one_more": 2})), &full)
            .unwrap_err()
            .contains("at most 256"));
    }
}
