//! Probes, metrics, OpenAPI, auth, limits, CORS, path traversal, and a model fetched in the
//! background from a loopback server.

mod common;

use std::time::Duration;

use common::*;
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

#[tokio::test(flavor = "multi_thread")]
async fn metrics_count_jobs_steps_images_and_errors() {
    let s = start(|_| {}).await;
    s.post(
        "/sdapi/v1/txt2img",
        json!({"prompt": "x", "steps": 4, "width": 64, "height": 64, "batch_size": 3}),
    )
    .await;
    s.post("/sdapi/v1/txt2img", json!({"prompt": "x", "width": 63}))
        .await;
    let (status, m) = s.get("/metrics").await;
    assert_eq!(status, 200);
    let m = m.as_str().unwrap();
    for line in [
        "sdkube_images_generated_total 3",
        "sdkube_jobs_finished_total{kind=\"txt2img\",outcome=\"succeeded\"} 1",
        "sdkube_step_seconds_count 3",
        "sdkube_job_seconds_count 1",
        "sdkube_jobs{state=\"succeeded\"} 1",
        "sdkube_errors_total{where=\"http_4xx\"} 1",
        "sdkube_model_ready 1",
        "sdkube_queue_depth 0",
    ] {
        assert!(m.contains(line), "{line:?} missing in\n{m}");
    }
    assert!(m.contains("# TYPE sdkube_step_seconds histogram"));
    assert_eq!(s.get("/healthz").await, (200, Value::String("ok".into())));
}

#[tokio::test(flavor = "multi_thread")]
async fn openapi_covers_every_endpoint_and_docs_and_ui_are_served() {
    let s = start(|_| {}).await;
    let (status, doc) = s.get("/openapi.json").await;
    assert_eq!(status, 200);
    assert!(doc["openapi"].as_str().unwrap().starts_with("3."));
    let paths = doc["paths"].as_object().unwrap();
    let want = [
        "/sdapi/v1/txt2img",
        "/sdapi/v1/img2img",
        "/sdapi/v1/extra-single-image",
        "/sdapi/v1/extra-batch-images",
        "/sdapi/v1/png-info",
        "/sdapi/v1/progress",
        "/sdapi/v1/interrupt",
        "/sdapi/v1/skip",
        "/sdapi/v1/options",
        "/sdapi/v1/sd-models",
        "/sdapi/v1/sd-vae",
        "/sdapi/v1/samplers",
        "/sdapi/v1/schedulers",
        "/sdapi/v1/upscalers",
        "/sdapi/v1/face-restorers",
        "/sdapi/v1/embeddings",
        "/sdapi/v1/refresh-checkpoints",
        "/sdapi/v1/memory",
        "/sdapi/v1/cmd-flags",
        "/v1/images/generations",
        "/api/v1/jobs",
        "/api/v1/jobs/{id}",
        "/api/v1/jobs/{id}/events",
        "/api/v1/jobs/{id}/cancel",
        "/api/v1/gallery",
        "/api/v1/status",
        "/healthz",
        "/readyz",
        "/metrics",
    ];
    for p in want {
        assert!(paths.contains_key(p), "{p} documented");
    }
    // Every documented GET without parameters answers (nothing documented that isn't there).
    for (p, ops) in paths {
        if ops.get("get").is_some() && !p.contains('{') && !p.ends_with("/events") {
            let r = s.client.get(s.url(p)).send().await.unwrap();
            assert!(r.status().is_success(), "GET {p}: {}", r.status());
        }
    }
    // Request schemas carry A1111's field names.
    let schemas = &doc["components"]["schemas"];
    let txt2img = serde_json::to_string(&schemas["Txt2ImgRequest"]).unwrap();
    for f in [
        "enable_hr",
        "hr_scale",
        "prompt",
        "cfg_scale",
        "sampler_name",
    ] {
        assert!(txt2img.contains(f), "Txt2ImgRequest documents {f}");
    }
    for (path, kind) in [
        ("/", "text/html"),
        ("/docs", "text/html"),
        ("/ui/app.js", "javascript"),
        ("/ui/style.css", "text/css"),
    ] {
        let r = s.client.get(s.url(path)).send().await.unwrap();
        assert_eq!(r.status(), 200, "{path}");
        assert!(r.headers()["content-type"].to_str().unwrap().contains(kind));
        let body = r.text().await.unwrap();
        assert!(
            !body.contains("https://cdn") && !body.contains("//unpkg.com"),
            "{path} uses no CDN"
        );
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn api_key_and_basic_auth_guard_everything_but_probes() {
    let s = start(|c| c.auth.api_key = Some("s3cret".into())).await;
    let (status, body) = s.get("/sdapi/v1/sd-models").await;
    assert_eq!(status, 401);
    assert_eq!(body["auth"], "api_key");
    for (name, value) in [
        ("authorization", "Bearer s3cret"),
        ("x-api-key", "s3cret"),
        ("cookie", "theme=dark; sdkube_api_key=s3cret"),
    ] {
        let r = s
            .client
            .get(s.url("/sdapi/v1/sd-models"))
            .header(name, value)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200, "{name}");
    }
    let r = s
        .client
        .get(s.url("/api/v1/jobs"))
        .header("x-api-key", "wrong")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
    for open in ["/healthz", "/readyz", "/metrics", "/"] {
        assert_eq!(s.get(open).await.0, 200, "{open} open");
    }
    assert_eq!(s.get("/openapi.json").await.0, 401);

    let s = start(|c| c.auth.basic = Some(("ann".into(), "pw".into()))).await;
    let r = s.client.get(s.url("/")).send().await.unwrap();
    assert_eq!(r.status(), 401);
    assert_eq!(r.headers()["www-authenticate"], "Basic realm=\"sdkube\"");
    let r = s
        .client
        .get(s.url("/"))
        .basic_auth("ann", Some("pw"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let r = s
        .client
        .get(s.url("/sdapi/v1/options"))
        .basic_auth("ann", Some("nope"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
    assert_eq!(s.get("/healthz").await.0, 200);
}

#[tokio::test(flavor = "multi_thread")]
async fn body_limit_cors_and_path_traversal() {
    let s = start(|c| c.max_body_bytes = 64 * 1024).await;
    let big = "A".repeat(100 * 1024);
    let (status, body) = s.post("/sdapi/v1/png-info", json!({"image": big})).await;
    assert_eq!(status, 413, "{body}");
    // CORS is off unless configured.
    let r = s
        .client
        .get(s.url("/sdapi/v1/samplers"))
        .header("origin", "https://evil.example")
        .send()
        .await
        .unwrap();
    assert!(r.headers().get("access-control-allow-origin").is_none());
    // Nothing outside the outputs folder can be read through /outputs.
    std::fs::create_dir_all(s.dir.path().join("outputs")).unwrap();
    std::fs::write(s.dir.path().join("secret.png"), b"x").unwrap();
    for path in [
        "/outputs/..%2Fsecret.png",
        "/outputs/%2E%2E%2Fsecret.png",
        "/outputs/..%5Csecret.png",
        "/outputs/.hidden.png",
        "/outputs/%2Fetc%2Fpasswd",
    ] {
        let r = s.client.get(s.url(path)).send().await.unwrap();
        assert_eq!(r.status(), 404, "{path}");
    }
    let mut raw = tokio::net::TcpStream::connect(s.base.trim_start_matches("http://"))
        .await
        .unwrap();
    raw.write_all(b"GET /outputs/../secret.png HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    let mut resp = String::new();
    raw.read_to_string(&mut resp).await.unwrap();
    assert!(!resp.starts_with("HTTP/1.1 200"), "{resp}");

    let s = start(|c| c.cors_origins = vec!["https://app.example".into()]).await;
    let r = s
        .client
        .get(s.url("/sdapi/v1/samplers"))
        .header("origin", "https://app.example")
        .send()
        .await
        .unwrap();
    assert_eq!(
        r.headers()["access-control-allow-origin"],
        "https://app.example"
    );
    let r = s
        .client
        .get(s.url("/sdapi/v1/samplers"))
        .header("origin", "https://evil.example")
        .send()
        .await
        .unwrap();
    assert!(r.headers().get("access-control-allow-origin").is_none());
}

/// An HTTP server for the files of `root`, sending each slowly (so the fetch can be
/// watched).
async fn slow_file_server(root: std::path::PathBuf) -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let Ok((mut sock, _)) = listener.accept().await else {
                return;
            };
            let root = root.clone();
            tokio::spawn(async move {
                let mut req = vec![0u8; 4096];
                let n = sock.read(&mut req).await.unwrap_or(0);
                let head = String::from_utf8_lossy(&req[..n]).to_string();
                let path = head
                    .split_whitespace()
                    .nth(1)
                    .unwrap_or("/")
                    .trim_start_matches('/')
                    .to_string();
                let Ok(body) = std::fs::read(root.join(&path)) else {
                    let _ = sock.write_all(b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\nConnection: close\r\n\r\n").await;
                    return;
                };
                let head = format!(
                    "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nContent-Type: application/octet-stream\r\nConnection: close\r\n\r\n",
                    body.len()
                );
                let _ = sock.write_all(head.as_bytes()).await;
                for chunk in body.chunks(body.len() / 10 + 1) {
                    if sock.write_all(chunk).await.is_err() {
                        return;
                    }
                    tokio::time::sleep(Duration::from_millis(30)).await;
                }
            });
        }
    });
    format!("http://{addr}")
}

#[tokio::test(flavor = "multi_thread")]
async fn a_catalog_model_is_fetched_in_the_background_and_readyz_waits_for_it() {
    // The fixture's diffusers folder, file by file, as a catalog entry of plain URLs.
    let root = repo().join("fixtures/sd/sd1");
    let base = slow_file_server(root.clone()).await;
    let mut toml = String::from(
        "[[model]]\nname = \"tiny-sd\"\nkind = \"checkpoint\"\ndescription = \"test\"\n",
    );
    let mut stack = vec![root.clone()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                stack.push(p);
            } else {
                let rel = p
                    .strip_prefix(&root)
                    .unwrap()
                    .to_string_lossy()
                    .replace('\\', "/");
                toml.push_str(&format!(
                    "[[model.file]]\nurl = \"{base}/{rel}\"\nfile_name = \"{rel}\"\n"
                ));
            }
        }
    }
    let dir = tempfile::tempdir().unwrap();
    let catalog = dir.path().join("catalog.toml");
    std::fs::write(&catalog, toml).unwrap();
    let s = start_unready(|c| {
        c.model = "tiny-sd".into();
        c.sources.catalog = Some(catalog.clone());
        c.sources.checkpoint_dirs.clear();
    })
    .await;
    // Not ready while fetching, with progress; generation is refused with 503 meanwhile.
    let (mut saw_fetching, mut status_checked) = (false, false);
    for _ in 0..100 {
        let (status, body) = s.get("/readyz").await;
        if status == 200 {
            break;
        }
        assert_eq!(status, 503);
        if body["state"] == "fetching" {
            saw_fetching = true;
            let (st, err) = s
                .post(
                    "/sdapi/v1/txt2img",
                    json!({"prompt": "x", "steps": 2, "width": 64, "height": 64}),
                )
                .await;
            assert_eq!(st, 503);
            assert!(
                err["detail"].as_str().unwrap().contains("not ready"),
                "{err}"
            );
            // The status says the same, read between two readyz answers that both say
            // fetching (the fetch may end in between: then this round proves nothing).
            let (_, status_now) = s.get("/api/v1/status").await;
            let (_, after) = s.get("/readyz").await;
            if after["state"] == "fetching" {
                assert_eq!(status_now["model"]["state"], "fetching");
                status_checked = true;
            }
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(saw_fetching, "readyz reported the fetch");
    assert!(status_checked, "the status was read while fetching");
    let s = s.wait_ready().await;
    let (status, body) = s
        .post(
            "/sdapi/v1/txt2img",
            json!({"prompt": "x", "steps": 2, "width": 64, "height": 64}),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    assert!(s.dir.path().join("store").join("tiny-sd").is_dir());
}

#[tokio::test(flavor = "multi_thread")]
async fn a_model_that_cannot_load_is_reported_not_ready_with_the_reason() {
    let dir = tempfile::tempdir().unwrap();
    let bad = dir.path().join("broken.safetensors");
    std::fs::write(&bad, b"this is not a checkpoint").unwrap();
    let s = start_unready(|c| c.model = bad.display().to_string()).await;
    let mut last = Value::Null;
    for _ in 0..200 {
        let (status, body) = s.get("/readyz").await;
        assert_eq!(status, 503);
        if body["state"] == "failed" {
            last = body;
            break;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    assert_eq!(last["state"], "failed");
    assert!(
        last["message"].as_str().unwrap().contains("broken"),
        "{last}"
    );
}

/// `--warm-up`: the worker runs a generation after loading and before /readyz says ready, and
/// /readyz tells how long it took; off, neither. The warm-up is no user's job: no image, no
/// count.
#[tokio::test(flavor = "multi_thread")]
async fn readyz_comes_after_the_warm_up_generation() {
    let warm = start(|c| c.warm_up = true).await;
    let (status, body) = warm.get("/readyz").await;
    assert_eq!(status, 200, "{body}");
    let seconds = body["warm_up_seconds"].as_f64().expect("warm_up_seconds");
    assert!(seconds > 0.0, "{body}");
    let metrics = warm
        .client
        .get(warm.url("/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        !metrics
            .lines()
            .any(|l| l.starts_with("sdkube_images_generated_total") && !l.ends_with(" 0")),
        "{metrics}"
    );
    let (_, gallery) = warm.get("/api/v1/gallery").await;
    assert_eq!(gallery["total"], 0, "{gallery}");

    let cold = start(|_| {}).await;
    let (status, body) = cold.get("/readyz").await;
    assert_eq!(status, 200, "{body}");
    assert!(body.get("warm_up_seconds").is_none(), "{body}");
}
