//! The X/Y/Z plot's checkpoint axis on a real server on loopback: each cell runs on its
//! checkpoint (the fixture folder's sd1 and sd2v), as a plain txt2img on that model does; and
//! A1111's per-request `override_settings.sd_model_checkpoint`.

mod common;

use common::*;
use serde_json::{json, Value};

fn body(extra: Value) -> Value {
    let base = json!({"prompt": "a lighthouse", "negative_prompt": "blurry", "steps": 2,
                      "width": 64, "height": 64, "seed": 8, "sampler_name": "Euler"});
    merged(base, extra)
}

#[tokio::test(flavor = "multi_thread")]
async fn a_checkpoint_axis_runs_each_cell_on_its_model() {
    let s = start(|_| {}).await;
    let mut plain = Vec::new();
    for model in ["sd2v", "sd1"] {
        let (status, out) = s
            .post("/sdapi/v1/options", json!({"sd_model_checkpoint": model}))
            .await;
        assert_eq!(status, 200, "{out}");
        let (status, out) = s.post("/sdapi/v1/txt2img", body(json!({}))).await;
        assert_eq!(status, 200, "{out}");
        plain.push(out["images"][0].as_str().unwrap().to_string());
    }
    plain.reverse();
    assert!(plain[0] != plain[1], "the two models draw differently");
    // A1111's per-request model: override_settings, the selected model again afterwards.
    let (status, out) = s
        .post(
            "/sdapi/v1/txt2img",
            body(json!({"override_settings": {"sd_model_checkpoint": "sd2v"}})),
        )
        .await;
    assert_eq!(status, 200, "{out}");
    assert!(out["images"][0] == plain[1].as_str(), "run on sd2v");
    assert!(
        !out["info"]
            .as_str()
            .unwrap()
            .contains("sd_model_checkpoint"),
        "{}",
        out["info"]
    );
    let (_, out) = s.post("/sdapi/v1/txt2img", body(json!({}))).await;
    assert!(out["images"][0] == plain[0].as_str(), "back on sd1");
    let (status, out) = s
        .post(
            "/sdapi/v1/txt2img",
            body(json!({"override_settings": {"sd_model_checkpoint": "nope"}})),
        )
        .await;
    assert_eq!(status, 400, "{out}");

    let (status, out) = s
        .post(
            "/sdapi/v1/txt2img",
            body(json!({
                "script_name": "x/y/z plot",
                "script_args": ["Checkpoint name", "", ["sd1", "sd2v"], "Nothing", "", "",
                                "Nothing", "", "", false, true],
            })),
        )
        .await;
    assert_eq!(status, 200, "{out}");
    let images = out["images"].as_array().unwrap();
    assert_eq!(images.len(), 3, "the grid and one image per checkpoint");
    assert!(images[1] == plain[0].as_str(), "the sd1 cell");
    assert!(images[2] == plain[1].as_str(), "the sd2v cell");
    let info: Value = serde_json::from_str(out["info"].as_str().unwrap()).unwrap();
    let texts: Vec<&str> = info["infotexts"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t.as_str().unwrap())
        .collect();
    assert!(texts[1].contains("Model: sd1"), "{}", texts[1]);
    assert!(texts[2].contains("Model: sd2v"), "{}", texts[2]);
    // As A1111 (override_settings restored afterwards), the served model is the one before.
    let (_, options) = s.get("/sdapi/v1/options").await;
    assert_eq!(
        options["sd_model_checkpoint"], "sd1",
        "{}",
        options["sd_model_checkpoint"]
    );
}

/// The native jobs API marks a script's grids: with a Z axis and sub-grids, the grid of grids
/// and each Z value's grid come first, marked, then the single images, not marked.
#[tokio::test(flavor = "multi_thread")]
async fn a_jobs_grids_are_marked_as_such() {
    let s = start(|_| {}).await;
    let (status, job) = s
        .post(
            "/api/v1/jobs",
            json!({"kind": "txt2img", "params": body(json!({
                "script_name": "x/y/z plot",
                "script_args": ["Steps", "1,2", "", "Nothing", "", "", "CFG Scale", "5,7", "",
                                false, true, true],
            }))}),
        )
        .await;
    assert_eq!(status, 202, "{job}");
    let done = s.wait_job(job["id"].as_str().unwrap()).await;
    assert_eq!(done["state"], "succeeded", "{done}");
    let marks: Vec<bool> = done["images"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| i["grid"] == true)
        .collect();
    assert_eq!(
        marks,
        [true, true, true, false, false, false, false],
        "the grid of grids, two sub-grids, four images: {done}"
    );
}
