//! A real sdkube server on a loopback port, serving the tiny fixture models, for the tests.

#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use base64::Engine as _;
use sdkube_server::{AppState, AuthConfig, Config, ModelSources, PostModels};
use serde_json::Value;

pub fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

pub fn fixture_model(name: &str) -> String {
    repo().join("fixtures/sd").join(name).display().to_string()
}

pub struct TestServer {
    pub base: String,
    pub state: AppState,
    pub client: reqwest::Client,
    pub dir: tempfile::TempDir,
}

impl Drop for TestServer {
    fn drop(&mut self) {
        // Lets the worker threads end.
        self.state.queue.shut_down();
    }
}

pub fn config(dir: &Path) -> Config {
    Config {
        role: sdkube_server::Role::All,
        shared: None,
        model: fixture_model("sd1"),
        model_config: None,
        sources: ModelSources {
            store: dir.join("store"),
            catalog: None,
            checkpoint_dirs: vec![repo().join("fixtures/sd")],
        },
        post: PostModels {
            store: dir.join("store"),
            upscaler_dirs: vec![repo().join("fixtures/esrgan")],
            face_restorer: "gfpgan-1.4".into(),
            face_detector: "retinaface-resnet50".into(),
        },
        outputs: dir.join("outputs"),
        embeddings: dir.join("embeddings"),
        lora_dirs: vec![dir.join("loras")],
        controlnet_dirs: vec![repo().join("fixtures/controlnet")],
        training: dir.join("training"),
        listen: "127.0.0.1:0".parse().unwrap(),
        devices: vec![candle_core::Device::Cpu],
        dtype: candle_core::DType::F32,
        vram: sdkube_pipeline::VramMode::High,
        warm_up: false,
        auth: AuthConfig::default(),
        queue_size: 32,
        cors_origins: Vec::new(),
        limits: sdkube_pipeline::Limits {
            max_size: 256,
            max_steps: 400,
            max_batch: 8,
        },
        max_prompt_tokens: 1000,
        max_body_bytes: 8 * 1024 * 1024,
        connections: sdkube_server::ConnectionLimits {
            max_connections: 1000,
            header_timeout: Duration::from_secs(30),
        },
        body_timeout: Duration::from_secs(60),
        shutdown_grace: Duration::from_secs(5),
        flags: serde_json::json!({"model": "sd1"}),
    }
}

/// Starts a server with the fixture model; `configure` adjusts the defaults.
pub async fn start(configure: impl FnOnce(&mut Config)) -> TestServer {
    start_unready(configure).await.wait_ready().await
}

/// Starts a server without waiting for the model.
pub async fn start_unready(configure: impl FnOnce(&mut Config)) -> TestServer {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = config(dir.path());
    configure(&mut cfg);
    let state = sdkube_server::Shared::new(cfg);
    sdkube_server::start(&state).unwrap();
    let app = sdkube_server::router(state.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let limits = state.config.connections;
    tokio::spawn(async move {
        let never = std::future::pending::<()>();
        sdkube_server::serve_connections(listener, app, limits, never, Duration::from_secs(1))
            .await
            .unwrap()
    });
    let _ = rustls::crypto::ring::default_provider().install_default();
    TestServer {
        base: format!("http://{addr}"),
        state,
        client: reqwest::Client::new(),
        dir,
    }
}

impl TestServer {
    pub async fn wait_ready(self) -> TestServer {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let r = self.client.get(self.url("/readyz")).send().await.unwrap();
            if r.status() == 200 {
                return self;
            }
            let body: Value = r.json().await.unwrap();
            assert_ne!(body["state"], "failed", "model failed: {body}");
            assert!(Instant::now() < deadline, "not ready in time: {body}");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    pub async fn get(&self, path: &str) -> (u16, Value) {
        let r = self.client.get(self.url(path)).send().await.unwrap();
        let status = r.status().as_u16();
        let text = r.text().await.unwrap();
        (
            status,
            serde_json::from_str(&text).unwrap_or(Value::String(text)),
        )
    }

    pub async fn post(&self, path: &str, body: Value) -> (u16, Value) {
        let r = self
            .client
            .post(self.url(path))
            .json(&body)
            .send()
            .await
            .unwrap();
        let status = r.status().as_u16();
        let text = r.text().await.unwrap();
        (
            status,
            serde_json::from_str(&text).unwrap_or(Value::String(text)),
        )
    }

    /// Polls a native job until it is sampling (step > 0).
    pub async fn wait_sampling(&self, id: &str) {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let (_, job) = self.get(&format!("/api/v1/jobs/{id}")).await;
            if job["step"].as_u64().unwrap_or(0) > 0 {
                return;
            }
            assert!(Instant::now() < deadline, "job {id} did not start: {job}");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// Polls a native job until it has finished.
    pub async fn wait_job(&self, id: &str) -> Value {
        let deadline = Instant::now() + Duration::from_secs(120);
        loop {
            let (_, job) = self.get(&format!("/api/v1/jobs/{id}")).await;
            let state = job["state"].as_str().unwrap_or("").to_string();
            if ["succeeded", "failed", "cancelled"].contains(&state.as_str()) {
                return job;
            }
            assert!(Instant::now() < deadline, "job {id} did not finish: {job}");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

/// `key` of every object of a JSON list, e.g. the names of `/sdapi/v1/samplers`.
pub fn field_of<'a>(list: &'a Value, key: &str) -> Vec<&'a str> {
    list.as_array()
        .expect("a JSON list")
        .iter()
        .map(|v| v[key].as_str().expect("a string field"))
        .collect()
}

pub fn b64(bytes: &[u8]) -> String {
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

pub fn unb64(s: &str) -> Vec<u8> {
    base64::engine::general_purpose::STANDARD
        .decode(s)
        .expect("base64")
}

pub fn png_of(img: &image::RgbImage) -> Vec<u8> {
    let mut out = Vec::new();
    img.write_to(&mut std::io::Cursor::new(&mut out), image::ImageFormat::Png)
        .unwrap();
    out
}

pub fn decode(png: &[u8]) -> image::RgbImage {
    image::load_from_memory(png).unwrap().to_rgb8()
}

/// The A1111 infotext of a PNG.
pub fn infotext_of(png: &[u8]) -> String {
    sdkube_pipeline::image_io::read_png_parameters(png)
        .unwrap()
        .expect("an infotext")
}

/// The infotext of an A1111 response's first image.
pub fn first_infotext(response: &Value) -> String {
    infotext_of(&unb64(response["images"][0].as_str().unwrap()))
}

/// `base` (a JSON object) with the fields of `extra` set over it.
pub fn merged(mut base: Value, extra: Value) -> Value {
    let fields = extra.as_object().expect("an object").clone();
    base.as_object_mut().expect("an object").extend(fields);
    base
}
