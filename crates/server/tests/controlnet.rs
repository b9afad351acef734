//! sd-webui-controlnet's API on a real server on loopback, with the tiny fixture model and
//! ControlNets (`fixtures/controlnet`): units in `alwayson_scripts.controlnet` steer txt2img
//! and img2img, `/controlnet/model_list`, `module_list` and `detect` answer as the extension
//! does, and bad units are refused naming the problem.

mod common;

use common::*;
use serde_json::{json, Value};

/// A 64×64 PNG with a bright disc on black: edges for canny.
fn disc_png() -> String {
    let img = image::RgbImage::from_fn(64, 64, |x, y| {
        let (dx, dy) = (x as f64 - 30.0, y as f64 - 34.0);
        if dx * dx + dy * dy < 300.0 {
            image::Rgb([230, 220, 200])
        } else {
            image::Rgb([10, 10, 20])
        }
    });
    let mut png = Vec::new();
    img.write_to(&mut std::io::Cursor::new(&mut png), image::ImageFormat::Png)
        .unwrap();
    b64(&png)
}

/// A 64×64 black/white mask PNG, white where `white(x)`.
fn mask_png(white: impl Fn(u32) -> bool) -> String {
    let img =
        image::GrayImage::from_fn(64, 64, |x, _| image::Luma([if white(x) { 255 } else { 0 }]));
    let mut png = Vec::new();
    img.write_to(&mut std::io::Cursor::new(&mut png), image::ImageFormat::Png)
        .unwrap();
    b64(&png)
}

fn unit(extra: Value) -> Value {
    let mut u = json!({"image": disc_png(), "module": "canny", "model": "sd1", "weight": 1.0});
    for (k, v) in extra.as_object().unwrap() {
        u[k] = v.clone();
    }
    u
}

async fn txt2img(s: &TestServer, units: Option<Vec<Value>>) -> (u16, Value) {
    let mut body = json!({"prompt": "a lighthouse", "steps": 3, "width": 64, "height": 64,
                          "seed": 5, "sampler_name": "Euler"});
    if let Some(units) = units {
        body["alwayson_scripts"] = json!({"controlnet": {"args": units}});
    }
    s.post("/sdapi/v1/txt2img", body).await
}

#[tokio::test(flavor = "multi_thread")]
async fn units_steer_txt2img_and_img2img() {
    let s = start(|_| {}).await;
    let (status, plain) = txt2img(&s, None).await;
    assert_eq!(status, 200, "{plain}");
    let (status, steered) = txt2img(&s, Some(vec![unit(json!({}))])).await;
    assert_eq!(status, 200, "{steered}");
    assert_ne!(
        plain["images"][0], steered["images"][0],
        "the unit changed the image"
    );
    let info: Value = serde_json::from_str(steered["info"].as_str().unwrap()).unwrap();
    let ignored = info["sdkube_ignored_fields"].to_string();
    assert!(!ignored.contains("alwayson_scripts"), "{ignored}");
    // The detected map follows the image, as the extension appends it: the canny edges of the
    // disc at the generated size, without a seed or an infotext of its own.
    assert_eq!(steered["images"].as_array().unwrap().len(), 2, "{steered}");
    let map = image::load_from_memory(&unb64(steered["images"][1].as_str().unwrap()))
        .unwrap()
        .to_luma8();
    assert_eq!(map.dimensions(), (64, 64));
    // (Detected at 512 px, the default resolution, then fitted down: thin, faint edges.)
    let edges = map.pixels().filter(|p| p.0[0] > 16).count();
    assert!(edges > 20 && edges < 64 * 64 / 2, "{edges} edge pixels");
    assert_eq!(info["infotexts"].as_array().unwrap().len(), 1);
    assert_eq!(info["all_seeds"].as_array().unwrap().len(), 1);
    let (_, unsaved) = txt2img(&s, Some(vec![unit(json!({"save_detected_map": false}))])).await;
    assert_eq!(unsaved["images"].as_array().unwrap().len(), 1);
    assert_eq!(unsaved["images"][0], steered["images"][0]);

    // The same unit again gives the same image; a title with the hash names the same model.
    let (_, model_list) = s.get("/controlnet/model_list").await;
    let title = model_list["model_list"]
        .as_array()
        .unwrap()
        .iter()
        .find(|t| t.as_str().unwrap().starts_with("sd1 ["))
        .unwrap()
        .clone();
    let (status, again) = txt2img(&s, Some(vec![unit(json!({"model": title}))])).await;
    assert_eq!(status, 200, "{again}");
    assert_eq!(again["images"][0], steered["images"][0]);

    // A disabled unit, or one without a model, leaves the image alone.
    let (_, off) = txt2img(&s, Some(vec![unit(json!({"enabled": false}))])).await;
    assert_eq!(off["images"][0], plain["images"][0]);
    let (_, no_model) = txt2img(&s, Some(vec![unit(json!({"model": "None"}))])).await;
    assert_eq!(no_model["images"][0], plain["images"][0]);

    // An inpainting unit: an empty mask leaves the image as "none" sends it; a mask hides
    // its pixels from the ControlNet.
    let (_, none) = txt2img(&s, Some(vec![unit(json!({"module": "none"}))])).await;
    let (status, empty) = txt2img(
        &s,
        Some(vec![unit(
            json!({"module": "inpaint_only", "mask": mask_png(|_| false)}),
        )]),
    )
    .await;
    assert_eq!(status, 200, "{empty}");
    assert_eq!(empty["images"][0], none["images"][0]);
    let (_, half) = txt2img(
        &s,
        Some(vec![unit(
            json!({"module": "inpaint_only", "mask": mask_png(|x| x < 32)}),
        )]),
    )
    .await;
    assert_ne!(half["images"][0], none["images"][0]);

    // img2img takes units too.
    let body = json!({"prompt": "a lighthouse", "steps": 3, "width": 64, "height": 64,
                      "seed": 5, "sampler_name": "Euler", "init_images": [disc_png()],
                      "denoising_strength": 0.6});
    let (status, i2i) = s.post("/sdapi/v1/img2img", body.clone()).await;
    assert_eq!(status, 200, "{i2i}");
    let mut with = body;
    with["alwayson_scripts"] = json!({"ControlNet": {"args": [unit(json!({"control_mode": "ControlNet is more important"}))]}});
    let (status, i2i_steered) = s.post("/sdapi/v1/img2img", with).await;
    assert_eq!(status, 200, "{i2i_steered}");
    assert_ne!(i2i["images"][0], i2i_steered["images"][0]);

    // Inpainting (img2img with a mask) takes units too.
    let mut inpaint = json!({"prompt": "a lighthouse", "steps": 3, "width": 64, "height": 64,
                         "seed": 5, "sampler_name": "Euler", "init_images": [disc_png()],
                         "mask": mask_png(|x| x < 40), "denoising_strength": 0.8});
    let (status, plain_inpaint) = s.post("/sdapi/v1/img2img", inpaint.clone()).await;
    assert_eq!(status, 200, "{plain_inpaint}");
    inpaint["alwayson_scripts"] = json!({"controlnet": {"args": [unit(json!({}))]}});
    let (status, steered_inpaint) = s.post("/sdapi/v1/img2img", inpaint).await;
    assert_eq!(status, 200, "{steered_inpaint}");
    assert_ne!(plain_inpaint["images"][0], steered_inpaint["images"][0]);
}

#[tokio::test(flavor = "multi_thread")]
async fn bad_units_are_refused_naming_the_problem() {
    let s = start(|_| {}).await;
    let cases = [
        (
            unit(json!({"model": "control_v11p_sd15_canny"})),
            "unknown ControlNet model",
        ),
        (
            unit(json!({"module": "openpose_hand_sparkles"})),
            "openpose_hand_sparkles",
        ),
        (unit(json!({"threshold_a": 9999})), "threshold_a"),
        (unit(json!({"weight": 7})), "weight"),
        (
            unit(json!({"guidance_start": 0.9, "guidance_end": 0.1})),
            "guidance_start",
        ),
        (unit(json!({"control_mode": "Loud"})), "control_mode"),
        (unit(json!({"image": "not base64!"})), "base64"),
        (json!({"module": "canny", "model": "sd1"}), "no image"),
        (unit(json!({"model": "sdxl"})), "is for SDXL"),
    ];
    for (u, expect) in cases {
        let (status, body) = txt2img(&s, Some(vec![u])).await;
        let detail = body["detail"].as_str().unwrap_or_default().to_string();
        assert_eq!(status, 400, "{expect}: {body}");
        assert!(detail.contains(expect), "{expect}: {detail}");
    }
    // The server still serves.
    let (status, _) = txt2img(&s, None).await;
    assert_eq!(status, 200);
}

#[tokio::test(flavor = "multi_thread")]
async fn lists_and_detect_answer_as_the_extension() {
    let s = start(|_| {}).await;
    let (status, v) = s.get("/controlnet/version").await;
    assert_eq!((status, v["version"].as_u64()), (200, Some(2)));

    let (status, models) = s.get("/controlnet/model_list?update=true").await;
    assert_eq!(status, 200, "{models}");
    let titles: Vec<&str> = models["model_list"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t.as_str().unwrap())
        .collect();
    assert_eq!(titles.len(), 3, "{titles:?}");
    assert!(titles.iter().all(|t| t.ends_with(']') && t.contains(" [")));

    let (status, modules) = s.get("/controlnet/module_list").await;
    assert_eq!(status, 200, "{modules}");
    let list = modules["module_list"].as_array().unwrap();
    assert!(list.iter().any(|m| m == "canny"), "{list:?}");
    let canny = &modules["module_detail"]["canny"];
    assert_eq!(canny["sliders"][1]["value"], 100.0, "{canny}");

    let (status, detected) = s
        .post(
            "/controlnet/detect",
            json!({"controlnet_module": "canny", "controlnet_input_images": [disc_png()],
                   "controlnet_processor_res": 64, "controlnet_threshold_a": 50,
                   "controlnet_threshold_b": 120}),
        )
        .await;
    assert_eq!(status, 200, "{detected}");
    let png = unb64(detected["images"][0].as_str().unwrap());
    let map = image::load_from_memory(&png).unwrap().to_luma8();
    let edge = map.pixels().filter(|p| p.0[0] > 128).count();
    // The disc's outline: a ring of edge pixels, a small part of the image.
    assert!(edge > 20 && edge < 64 * 64 / 4, "{edge} edge pixels");

    for (body, expect) in [
        (json!({"controlnet_module": "canny"}), "No image"),
        (
            json!({"controlnet_module": "nope", "controlnet_input_images": [disc_png()]}),
            "nope",
        ),
        (
            json!({"controlnet_module": "inpaint_only", "controlnet_input_images": [disc_png()]}),
            "controlnet_masks",
        ),
    ] {
        let (status, err) = s.post("/controlnet/detect", body).await;
        assert_eq!(status, 422, "{err}");
        assert!(err["detail"].as_str().unwrap().contains(expect), "{err}");
    }
}

/// Puts the fixture ControlNet into the model store as `sdkube fetch` would leave a catalog
/// entry (its files under the entry's name, listed in the manifest).
fn store_controlnet(store: &std::path::Path, name: &str) {
    let dir = store.join(name);
    std::fs::create_dir_all(&dir).unwrap();
    let mut files = Vec::new();
    for f in ["config.json", "diffusion_pytorch_model.safetensors"] {
        let bytes = std::fs::read(repo().join("fixtures/controlnet/sd1").join(f)).unwrap();
        std::fs::write(dir.join(f), &bytes).unwrap();
        files.push(json!({"path": f, "size": bytes.len(), "sha256": "0".repeat(64),
                          "source": "test", "url": "file://test", "fetched_at": "2026-12-05T00:00:00Z"}));
    }
    let manifest = json!({"version": 1, "models": {name: {"files": files}}});
    std::fs::write(store.join("manifest.json"), manifest.to_string()).unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn controlnets_fetched_into_the_store_are_listed_and_used() {
    let s = start(|_| {}).await;
    store_controlnet(&s.dir.path().join("store"), "control-v11p-sd15-canny");
    let (_, models) = s.get("/controlnet/model_list").await;
    let titles = models["model_list"].to_string();
    assert!(titles.contains("control-v11p-sd15-canny ["), "{titles}");
    let (status, by_store) = txt2img(
        &s,
        Some(vec![unit(json!({"model": "control-v11p-sd15-canny"}))]),
    )
    .await;
    assert_eq!(status, 200, "{by_store}");
    // The same network as the fixture folder's `sd1`: the same image.
    let (_, by_folder) = txt2img(&s, Some(vec![unit(json!({}))])).await;
    assert_eq!(by_store["images"][0], by_folder["images"][0]);
}
