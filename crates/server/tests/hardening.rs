//! One client must never take the server down or break it for the others: a
//! failed model switch, invalid option values, unbounded client data, hostile connections.

mod common;

use std::time::{Duration, Instant};

use common::*;
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// A loopback HTTP server answering 404 to everything (a hub that lost the file).
async fn not_found_server() -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut sock, _)) = listener.accept().await {
            tokio::spawn(async move {
                let mut buf = vec![0u8; 4096];
                let _ = sock.read(&mut buf).await;
                let _ = sock
                    .write_all(
                        b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
                    )
                    .await;
            });
        }
    });
    format!("http://{addr}")
}

#[tokio::test(flavor = "multi_thread")]
async fn a_failed_model_switch_keeps_the_served_model() {
    let base = not_found_server().await;
    let dir = tempfile::tempdir().unwrap();
    let catalog = dir.path().join("catalog.toml");
    std::fs::write(
        &catalog,
        format!(
            "[[model]]\nname = \"gone-model\"\nkind = \"checkpoint\"\ndescription = \"test\"\n\
             [[model.file]]\nurl = \"{base}/unet.safetensors\"\nfile_name = \"unet.safetensors\"\n"
        ),
    )
    .unwrap();
    // A checkpoint folder that lists but cannot load (no networks in it).
    let broken = dir.path().join("checkpoints/broken");
    std::fs::create_dir_all(&broken).unwrap();
    std::fs::write(
        broken.join("model_index.json"),
        r#"{"_class_name": "StableDiffusionPipeline"}"#,
    )
    .unwrap();
    let checkpoints = dir.path().join("checkpoints");
    let s = start(|c| {
        c.sources.catalog = Some(catalog.clone());
        c.sources.checkpoint_dirs.push(checkpoints.clone());
    })
    .await;
    let generate =
        json!({"prompt": "a red cube", "steps": 2, "width": 64, "height": 64, "seed": 1});

    for (model, code, cause) in [
        ("gone-model", 503, "fetching gone-model failed"),
        ("broken", 500, "loading broken failed"),
    ] {
        let (status, body) = s
            .post("/sdapi/v1/options", json!({"sd_model_checkpoint": model}))
            .await;
        assert_eq!(status, code, "{body}");
        let detail = body["detail"].as_str().unwrap();
        assert!(detail.contains(cause), "{detail}");
        assert!(detail.contains("still serving sd1"), "{detail}");
        // Still in service, on the old model.
        let (ready, state) = s.get("/readyz").await;
        assert_eq!(ready, 200, "{state}");
        assert_eq!(state["switching"]["name"], model);
        assert_eq!(state["switching"]["state"], "failed");
        let (_, opts) = s.get("/sdapi/v1/options").await;
        assert_eq!(opts["sd_model_checkpoint"], "sd1");
        let (status, body) = s.post("/sdapi/v1/txt2img", generate.clone()).await;
        assert_eq!(status, 200, "{body}");
        let info: serde_json::Value = serde_json::from_str(body["info"].as_str().unwrap()).unwrap();
        assert_eq!(info["sd_model_name"], "sd1");
    }
    // A good switch still works afterwards.
    let (status, body) = s
        .post("/sdapi/v1/options", json!({"sd_model_checkpoint": "sd2v"}))
        .await;
    assert_eq!(status, 200, "{body}");
    let (_, opts) = s.get("/sdapi/v1/options").await;
    assert_eq!(opts["sd_model_checkpoint"], "sd2v");
    let (_, ready) = s.get("/readyz").await;
    assert!(ready.get("switching").is_none(), "{ready}");
}

#[tokio::test(flavor = "multi_thread")]
async fn options_are_checked_before_they_are_stored_and_bounded() {
    let s = start(|_| {}).await;
    let (_, before) = s.get("/sdapi/v1/options").await;
    // Every A1111 setting, with its default: clients read one before writing it.
    assert_eq!(before["send_seed"], true);
    assert_eq!(before["CLIP_stop_at_last_layers"], 1);
    assert!(before.as_object().unwrap().len() > 200);
    for bad in [
        json!({"CLIP_stop_at_last_layers": "abc"}),
        json!({"CLIP_stop_at_last_layers": 40, "send_seed": false}),
        json!({"send_seed": "no"}),
        json!({"my_blob": "x".repeat(10_000)}),
    ] {
        let (status, body) = s.post("/sdapi/v1/options", bad.clone()).await;
        assert_eq!(status, 400, "{bad}: {body}");
        let key = bad.as_object().unwrap().keys().next().unwrap().clone();
        assert!(body["detail"].as_str().unwrap().contains(&key), "{body}");
    }
    // Nothing of a refused write was stored, and every client still generates.
    let (_, after) = s.get("/sdapi/v1/options").await;
    assert_eq!(after, before);
    let (status, body) = s
        .post(
            "/sdapi/v1/txt2img",
            json!({"prompt": "x", "steps": 2, "width": 64, "height": 64}),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    // A valid write is stored; settings A1111 does not have are kept, within bounds.
    let (status, _) = s
        .post(
            "/sdapi/v1/options",
            json!({"send_seed": false, "my_ext_flag": 3}),
        )
        .await;
    assert_eq!(status, 200);
    let (_, now) = s.get("/sdapi/v1/options").await;
    assert_eq!(now["send_seed"], false);
    assert_eq!(now["my_ext_flag"], 3);
    let many: serde_json::Map<String, serde_json::Value> =
        (0..300).map(|i| (format!("ext_{i}"), json!(i))).collect();
    let (status, body) = s.post("/sdapi/v1/options", json!(many)).await;
    assert_eq!(status, 400, "{body}");
    assert!(
        body["detail"].as_str().unwrap().contains("at most 256"),
        "{body}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn prompts_are_bounded_stripped_of_nul_and_unknown_fields_are_not_kept() {
    let s = start(|c| c.max_prompt_tokens = 300).await;
    let base = json!({"steps": 2, "width": 64, "height": 64, "seed": 5});
    let with = |extra: serde_json::Value| {
        let mut r = base.clone();
        r.as_object_mut()
            .unwrap()
            .extend(extra.as_object().unwrap().clone());
        r
    };
    // A normal long prompt (about 250 tokens) works; one over the limit is a 400 naming it,
    // a megabyte one too, at once.
    let words = |n: usize| {
        (0..n)
            .map(|i| format!("word{i}"))
            .collect::<Vec<_>>()
            .join(" ")
    };
    let (status, body) = s
        .post("/sdapi/v1/txt2img", with(json!({"prompt": words(80)})))
        .await;
    assert_eq!(status, 200, "{body}");
    for prompt in [words(400), "x ".repeat(500_000)] {
        let started = std::time::Instant::now();
        let (status, body) = s
            .post("/sdapi/v1/txt2img", with(json!({"prompt": prompt})))
            .await;
        assert_eq!(status, 400, "{body}");
        let detail = body["detail"].as_str().unwrap();
        assert!(
            detail.contains("--max-prompt-tokens") && detail.contains("300"),
            "{detail}"
        );
        assert!(started.elapsed().as_secs() < 5, "refused quickly");
    }
    let (status, body) = s
        .post(
            "/sdapi/v1/txt2img",
            with(json!({"prompt": "x", "negative_prompt": words(400)})),
        )
        .await;
    assert_eq!(status, 400);
    assert!(body["detail"]
        .as_str()
        .unwrap()
        .starts_with("negative_prompt"));

    // A NUL in a prompt never reaches the PNG's text chunk: the whole infotext reads back.
    let (status, body) = s
        .post(
            "/sdapi/v1/txt2img",
            with(json!({"prompt": "a red\u{0} cube\u{7}", "save_images": true})),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    let png = unb64(body["images"][0].as_str().unwrap());
    let (_, info) = s
        .post("/sdapi/v1/png-info", json!({"image": b64(&png)}))
        .await;
    let text = info["info"].as_str().unwrap();
    assert!(text.starts_with("a red cube\n"), "{text:?}");
    assert!(text.contains("Seed: 5"), "the infotext is whole: {text:?}");

    // Fields sdkube does not know are reported by name; their values are not kept.
    let big = "y".repeat(1_000_000);
    let (status, body) = s
        .post(
            "/api/v1/jobs",
            json!({"kind": "txt2img", "params": with(json!({"prompt": "x", "my_field": big}))}),
        )
        .await;
    assert_eq!(status, 202, "{body}");
    let job = s.wait_job(body["id"].as_str().unwrap()).await;
    assert_eq!(job["state"], "succeeded", "{job}");
    assert!(job["params"]["my_field"].is_null(), "only the name is kept");
    assert!(job.to_string().len() < 100_000, "the record stays small");
}

/// Opens `n` connections that send half a request header and then nothing.
async fn half_headers(base: &str, n: usize) -> Vec<tokio::net::TcpStream> {
    let addr = base.trim_start_matches("http://").to_string();
    let mut out = Vec::new();
    for _ in 0..n {
        let mut c = tokio::net::TcpStream::connect(&addr).await.unwrap();
        c.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Slow: ")
            .await
            .unwrap();
        out.push(c);
    }
    out
}

#[tokio::test(flavor = "multi_thread")]
async fn slow_clients_cannot_hold_the_server_down() {
    let s = start(|c| {
        c.connections.header_timeout = Duration::from_secs(2);
        c.connections.max_connections = 400;
    })
    .await;
    // 300 connections stuck in their headers: /healthz still answers at once.
    let mut slow = half_headers(&s.base, 300).await;
    for _ in 0..5 {
        let started = Instant::now();
        let (status, _) = s.get("/healthz").await;
        assert_eq!(status, 200);
        assert!(
            started.elapsed() < Duration::from_secs(1),
            "{:?}",
            started.elapsed()
        );
    }
    // The server closes them once their header time is up.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let mut closed = 0;
    for c in &mut slow {
        let mut buf = [0u8; 256];
        match tokio::time::timeout(Duration::from_millis(200), c.read(&mut buf)).await {
            Ok(Ok(_)) | Ok(Err(_)) => closed += 1, // a 408, or EOF / reset
            Err(_) => {}
        }
    }
    assert_eq!(closed, 300, "every slow connection was closed");
}

#[tokio::test(flavor = "multi_thread")]
async fn connections_past_the_cap_get_a_503_at_once() {
    let s = start(|c| {
        c.connections.max_connections = 20;
    })
    .await;
    let _held = half_headers(&s.base, 20).await;
    tokio::time::sleep(Duration::from_millis(100)).await;
    let started = Instant::now();
    let r = reqwest::Client::new()
        .get(s.url("/healthz"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 503);
    assert_eq!(r.headers()["retry-after"], "1");
    let body: serde_json::Value = r.json().await.unwrap();
    assert!(
        body["error"].as_str().unwrap().contains("limit is 20"),
        "{body}"
    );
    assert!(started.elapsed() < Duration::from_secs(1));
}

#[tokio::test(flavor = "multi_thread")]
async fn every_error_is_json_naming_the_problem() {
    let s = start(|c| {
        c.limits.max_steps = 10;
        c.queue_size = 1;
    })
    .await;
    let client = reqwest::Client::new();
    let json_error = |r: reqwest::Response| async move {
        let status = r.status().as_u16();
        assert_eq!(
            r.headers()["content-type"],
            "application/json",
            "status {status}"
        );
        let body: serde_json::Value = r.json().await.unwrap();
        (status, body["error"].as_str().unwrap().to_string())
    };
    for (path, want_status, want) in [
        (
            "/sdapi/v1/progress?skip_current_image=maybe",
            400,
            "skip_current_image",
        ),
        ("/api/v1/gallery?page=-1", 400, "query string"),
        (
            "/no/such/thing",
            404,
            "no such endpoint: GET /no/such/thing",
        ),
    ] {
        let (status, error) = json_error(client.get(s.url(path)).send().await.unwrap()).await;
        assert_eq!(status, want_status, "{path}: {error}");
        assert!(error.contains(want), "{path}: {error}");
    }
    let r = client
        .delete(s.url("/sdapi/v1/txt2img"))
        .send()
        .await
        .unwrap();
    let (status, error) = json_error(r).await;
    assert_eq!(status, 405);
    assert!(error.contains("DELETE is not allowed"), "{error}");
    // The body limit says what it is.
    let big = vec![b' '; 9 * 1024 * 1024];
    let r = client
        .post(s.url("/sdapi/v1/txt2img"))
        .header("content-type", "application/json")
        .body(big)
        .send()
        .await
        .unwrap();
    let (status, error) = json_error(r).await;
    assert_eq!(status, 413);
    assert!(error.contains("8 MiB (--max-body-mb)"), "{error}");
    // OpenAI's endpoint names its own fields, and works with --max-steps under 20.
    let (status, body) = s
        .post("/v1/images/generations", json!({"prompt": "x", "n": 1000}))
        .await;
    assert_eq!(status, 400);
    assert!(
        body["error"].as_str().unwrap().starts_with("n must be"),
        "{body}"
    );
    let (status, body) = s
        .post(
            "/v1/images/generations",
            json!({"prompt": "x", "size": "65x64"}),
        )
        .await;
    assert_eq!(status, 400);
    assert!(
        body["error"].as_str().unwrap().starts_with("size 65x64"),
        "{body}"
    );
    let (status, body) = s
        .post(
            "/v1/images/generations",
            json!({"prompt": "x", "size": "64x64"}),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    // hr_resize_y alone, too small: named.
    let (status, body) = s
        .post(
            "/sdapi/v1/txt2img",
            json!({"prompt": "x", "steps": 2, "width": 64, "height": 64,
                   "enable_hr": true, "hr_resize_y": 1}),
        )
        .await;
    assert_eq!(status, 400);
    assert!(
        body["error"]
            .as_str()
            .unwrap()
            .contains("hr_resize_x/hr_resize_y"),
        "{body}"
    );
    // A full queue says when to come back.
    let (_, long) = s
        .post(
            "/api/v1/jobs",
            json!({"kind": "txt2img", "params": {"prompt": "x", "steps": 10, "width": 64, "height": 64}}),
        )
        .await;
    s.wait_sampling(long["id"].as_str().unwrap()).await;
    let job = json!({"kind": "txt2img", "params": {"prompt": "x", "steps": 2, "width": 64, "height": 64}});
    let _queued = s.post("/api/v1/jobs", job.clone()).await;
    let r = client
        .post(s.url("/api/v1/jobs"))
        .json(&job)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 429);
    assert_eq!(r.headers()["retry-after"], "5");
    // Probes answering 503 (starting up) are not counted as server errors.
    let (_, metrics) = s.get("/metrics").await;
    assert!(
        !metrics.as_str().unwrap().contains("where=\"http_5xx\""),
        "{metrics}"
    );
}
