//! A1111's `refiner_checkpoint` / `refiner_switch_at` on a real server on loopback, serving
//! the tiny SDXL fixture with the tiny refiner beside it in the checkpoint folder.

mod common;

use candle_core::{DType, Device};
use common::*;
use sdkube_pipeline::sampler::Flow;
use sdkube_pipeline::{Engine, Refiner, Request, VramMode};
use serde_json::{json, Value};

fn body(extra: Value) -> Value {
    let base = json!({"prompt": "a lighthouse", "negative_prompt": "blurry", "steps": 4,
                      "width": 64, "height": 64, "seed": 5, "sampler_name": "Euler",
                      "cfg_scale": 7});
    merged(base, extra)
}

/// The same request run by the engine itself, in this process.
fn engine_image(switch_at: f64) -> image::RgbImage {
    let load = |name: &str| {
        let w = sdkube_models::load(&repo().join("fixtures/sd").join(name), &Default::default())
            .unwrap();
        Engine::new(w, name, Device::Cpu, DType::F32, VramMode::High).unwrap()
    };
    let mut e = load("sdxl");
    e.set_refiner(Some(load("sdxl-refiner"))).unwrap();
    let req = Request {
        prompt: "a lighthouse".into(),
        negative_prompt: "blurry".into(),
        sampler: "Euler".into(),
        steps: 4,
        width: 64,
        height: 64,
        seed: 5,
        refiner: Some(Refiner {
            checkpoint: "sdxl-refiner".into(),
            switch_at,
        }),
        ..Default::default()
    };
    e.generate(&req, &mut |_| Flow::Continue).unwrap()[0]
        .image
        .clone()
}

#[tokio::test(flavor = "multi_thread")]
async fn the_refiner_finishes_the_run_as_the_engine_does() {
    let s = start(|c| c.model = fixture_model("sdxl")).await;
    let (status, plain) = s.post("/sdapi/v1/txt2img", body(json!({}))).await;
    assert_eq!(status, 200, "{plain}");

    let refined_body = body(json!({"refiner_checkpoint": "sdxl-refiner",
                                   "refiner_switch_at": 0.5}));
    let (status, refined) = s.post("/sdapi/v1/txt2img", refined_body).await;
    assert_eq!(status, 200, "{refined}");
    assert_ne!(plain["images"][0], refined["images"][0]);
    let png = unb64(refined["images"][0].as_str().unwrap());
    assert_eq!(decode(&png), engine_image(0.5), "the engine's own image");
    let text = first_infotext(&refined);
    assert!(
        text.contains("Refiner: sdxl-refiner, Refiner switch at: 0.5"),
        "{text}"
    );
    let info: Value = serde_json::from_str(refined["info"].as_str().unwrap()).unwrap();
    let ignored = info.to_string();
    assert!(!ignored.contains("refiner_"), "reported as ignored: {info}");

    // By title with A1111's hash suffix, the refiner already loaded: the same image.
    let (status, again) = s
        .post(
            "/sdapi/v1/txt2img",
            body(json!({"refiner_checkpoint": "sdxl-refiner [0123456789]",
                        "refiner_switch_at": 0.5})),
        )
        .await;
    assert_eq!(status, 200, "{again}");
    assert_eq!(again["images"][0], refined["images"][0]);

    // No switch point: A1111 hands over at once.
    let (status, at_once) = s
        .post(
            "/sdapi/v1/txt2img",
            body(json!({"refiner_checkpoint": "sdxl-refiner"})),
        )
        .await;
    assert_eq!(status, 200, "{at_once}");
    let png = unb64(at_once["images"][0].as_str().unwrap());
    assert_eq!(decode(&png), engine_image(0.0));

    // "None", a switch point of 1 and the model itself as its refiner: the plain run.
    for extra in [
        json!({"refiner_checkpoint": "None", "refiner_switch_at": 0.5}),
        json!({"refiner_checkpoint": "sdxl-refiner", "refiner_switch_at": 1.0}),
        json!({"refiner_checkpoint": "sdxl", "refiner_switch_at": 0.5}),
    ] {
        let (status, out) = s.post("/sdapi/v1/txt2img", body(extra.clone())).await;
        assert_eq!(status, 200, "{extra}: {out}");
        assert_eq!(out["images"][0], plain["images"][0], "{extra}");
        assert!(!first_infotext(&out).contains("Refiner"), "{extra}");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_refiner_that_cannot_serve_is_refused_naming_it() {
    let s = start(|c| c.model = fixture_model("sdxl")).await;
    for (extra, says) in [
        (
            json!({"refiner_checkpoint": "nope", "refiner_switch_at": 0.5}),
            "refiner_checkpoint \"nope\" is not a checkpoint this server knows",
        ),
        (
            json!({"refiner_checkpoint": "sd1", "refiner_switch_at": 0.5}),
            "cannot continue the latents",
        ),
        (
            json!({"refiner_checkpoint": "sdxl-refiner", "refiner_switch_at": 1.5}),
            "refiner_switch_at must be between 0 and 1",
        ),
    ] {
        let (status, out) = s.post("/sdapi/v1/txt2img", body(extra.clone())).await;
        assert_eq!(status, 400, "{extra}: {out}");
        let detail = out["detail"].as_str().unwrap_or_default();
        assert!(detail.contains(says), "{extra}: {detail}");
    }
    // The server still serves.
    let (status, out) = s
        .post(
            "/sdapi/v1/txt2img",
            body(json!({"refiner_checkpoint": "sdxl-refiner", "refiner_switch_at": 0.5})),
        )
        .await;
    assert_eq!(status, 200, "{out}");
}

#[tokio::test(flavor = "multi_thread")]
async fn an_xyz_plot_runs_every_cell_with_the_refiner() {
    let s = start(|c| c.model = fixture_model("sdxl")).await;
    let (status, out) = s
        .post(
            "/sdapi/v1/txt2img",
            body(json!({
                "refiner_checkpoint": "sdxl-refiner", "refiner_switch_at": 0.5,
                "script_name": "x/y/z plot",
                "script_args": ["Seed", "5, 6", "", "Nothing", "", "", "Nothing", "", "",
                                true, true],
            })),
        )
        .await;
    assert_eq!(status, 200, "{out}");
    let images = out["images"].as_array().unwrap();
    assert_eq!(images.len(), 3, "the grid and two images");
    // The seed-5 cell is the plain refined request's image.
    let png = unb64(images[1].as_str().unwrap());
    assert_eq!(decode(&png), engine_image(0.5));
    let text = infotext_of(&png);
    assert!(text.contains("Refiner: sdxl-refiner"), "{text}");
}
