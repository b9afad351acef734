//! Step caching (sdkube's `step_cache_interval` / `step_cache_branch` settings) on a real server
//! on loopback, serving the tiny SDXL fixture: from a request's `override_settings` and from
//! the server's options, the image the engine makes itself, and clear errors for bad values.

mod common;

use candle_core::{DType, Device};
use common::*;
use sdkube_pipeline::sampler::Flow;
use sdkube_pipeline::{Engine, Request, StepCaching, VramMode};
use serde_json::{json, Value};

fn body(extra: Value) -> Value {
    let base = json!({"prompt": "a lighthouse", "negative_prompt": "blurry", "steps": 6,
                      "width": 64, "height": 64, "seed": 5, "sampler_name": "Euler",
                      "cfg_scale": 7});
    merged(base, extra)
}

/// The same request run by the engine itself, in this process.
fn engine_image(step_caching: StepCaching) -> image::RgbImage {
    let w = sdkube_models::load(&repo().join("fixtures/sd/sdxl"), &Default::default()).unwrap();
    let mut e = Engine::new(w, "sdxl", Device::Cpu, DType::F32, VramMode::High).unwrap();
    let req = Request {
        prompt: "a lighthouse".into(),
        negative_prompt: "blurry".into(),
        sampler: "Euler".into(),
        steps: 6,
        width: 64,
        height: 64,
        seed: 5,
        step_caching,
        ..Default::default()
    };
    e.generate(&req, &mut |_| Flow::Continue).unwrap()[0]
        .image
        .clone()
}

fn image_of(response: &Value) -> image::RgbImage {
    decode(&unb64(response["images"][0].as_str().unwrap()))
}

fn ignored_fields(response: &Value) -> Value {
    let info: Value = serde_json::from_str(response["info"].as_str().unwrap()).unwrap();
    info["sdkube_ignored_fields"].clone()
}

#[tokio::test(flavor = "multi_thread")]
async fn step_caching_from_a_request_and_from_the_options() {
    let s = start(|c| c.model = fixture_model("sdxl")).await;
    let (status, plain) = s.post("/sdapi/v1/txt2img", body(json!({}))).await;
    assert_eq!(status, 200, "{plain}");
    assert!(!first_infotext(&plain).contains("Step cache"));

    let cached = json!({"override_settings":
        {"step_cache_interval": 2, "step_cache_branch": 3}});
    let (status, r) = s.post("/sdapi/v1/txt2img", body(cached)).await;
    assert_eq!(status, 200, "{r}");
    let caching = StepCaching {
        interval: 2,
        branch: 3,
    };
    assert_eq!(
        image_of(&r),
        engine_image(caching),
        "the engine's own image"
    );
    assert_ne!(image_of(&r), image_of(&plain));
    let text = first_infotext(&r);
    assert!(
        text.contains("Step cache interval: 2, Step cache branch: 3"),
        "{text}"
    );
    assert!(
        !ignored_fields(&r).to_string().contains("step_cache"),
        "{r}"
    );

    // The server's options apply to requests that do not set their own.
    let (status, set) = s
        .post("/sdapi/v1/options", json!({"step_cache_interval": 3}))
        .await;
    assert_eq!(status, 200, "{set}");
    let (_, opts) = s.get("/sdapi/v1/options").await;
    assert_eq!(
        (&opts["step_cache_interval"], &opts["step_cache_branch"]),
        (&json!(3), &json!(0))
    );
    let (_, r) = s.post("/sdapi/v1/txt2img", body(json!({}))).await;
    let text = first_infotext(&r);
    assert!(
        text.contains("Step cache interval: 3, Step cache branch: 0"),
        "{text}"
    );
    let off = json!({"override_settings": {"step_cache_interval": 1}});
    let (_, r) = s.post("/sdapi/v1/txt2img", body(off)).await;
    assert_eq!(image_of(&r), image_of(&plain), "1 is off");
}

#[tokio::test(flavor = "multi_thread")]
async fn bad_step_cache_values_are_refused_naming_them() {
    let s = start(|c| c.model = fixture_model("sdxl")).await;
    let cases = [
        (json!({"step_cache_interval": 0}), "step_cache_interval"),
        (json!({"step_cache_interval": "3"}), "step_cache_interval"),
        (json!({"step_cache_branch": -1}), "step_cache_branch"),
        (json!({"step_cache_branch": 2.5}), "step_cache_branch"),
        (json!({"step_cache_branch": 12}), "step_cache_branch"),
    ];
    for (settings, name) in &cases {
        let req = body(json!({ "override_settings": settings }));
        let (status, r) = s.post("/sdapi/v1/txt2img", req).await;
        assert_eq!(status, 400, "{settings}: {r}");
        assert!(r.to_string().contains(name), "{settings}: {r}");
        let (status, r) = s.post("/sdapi/v1/options", settings.clone()).await;
        assert_eq!(status, 400, "{settings}: {r}");
        assert!(r.to_string().contains(name), "{settings}: {r}");
    }
    // A branch SD 1.x has but this SDXL UNet has not: the worker says which it has.
    let req = body(json!({"override_settings":
        {"step_cache_interval": 2, "step_cache_branch": 9}}));
    let (status, r) = s.post("/sdapi/v1/txt2img", req).await;
    assert_eq!(status, 400, "{r}");
    assert!(r.to_string().contains("branches 0 to 8"), "{r}");
    // Nothing bad was stored, and the server still serves.
    let (_, opts) = s.get("/sdapi/v1/options").await;
    assert_eq!(opts["step_cache_interval"], 1);
    let (status, r) = s.post("/sdapi/v1/txt2img", body(json!({}))).await;
    assert_eq!(status, 200, "{r}");
}
