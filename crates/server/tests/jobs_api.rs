//! The native jobs API, the queue (bounds, FIFO, cancel, batching), SSE, the gallery.

mod common;

use std::time::Duration;

use common::*;
use serde_json::{json, Value};

fn txt2img(steps: usize, seed: u64) -> Value {
    json!({"kind": "txt2img", "params": {"prompt": "a red cube", "steps": steps, "width": 64,
           "height": 64, "seed": seed, "sampler_name": "Euler"}})
}

/// Reads SSE events of a job until `done` (or the limit), as (event, data).
async fn events(s: &TestServer, id: &str, limit: usize) -> Vec<(String, Value)> {
    let mut r = s
        .client
        .get(s.url(&format!("/api/v1/jobs/{id}/events")))
        .send()
        .await
        .unwrap();
    assert_eq!(r.headers()["content-type"], "text/event-stream");
    let mut buf = String::new();
    let mut out = Vec::new();
    while let Ok(Some(chunk)) = tokio::time::timeout(Duration::from_secs(60), r.chunk())
        .await
        .expect("events keep coming")
    {
        buf.push_str(&String::from_utf8_lossy(&chunk));
        while let Some(end) = buf.find("\n\n") {
            let block: String = buf.drain(..end + 2).collect();
            let mut event = String::new();
            let mut data = String::new();
            for line in block.lines() {
                if let Some(e) = line.strip_prefix("event: ") {
                    event = e.to_string();
                } else if let Some(d) = line.strip_prefix("data: ") {
                    data.push_str(d);
                }
            }
            if event.is_empty() {
                continue; // keep-alive comment
            }
            let done = event == "done";
            out.push((event, serde_json::from_str(&data).unwrap()));
            if done || out.len() >= limit {
                return out;
            }
        }
    }
    out
}

#[tokio::test(flavor = "multi_thread")]
async fn job_runs_with_live_events_and_lands_in_the_gallery() {
    let s = start(|_| {}).await;
    let (status, job) = s.post("/api/v1/jobs", txt2img(12, 3)).await;
    assert_eq!(status, 202, "{job}");
    let id = job["id"].as_str().unwrap().to_string();
    let evs = events(&s, &id, 1000).await;
    let kinds: Vec<&str> = evs.iter().map(|(e, _)| e.as_str()).collect();
    assert_eq!(kinds.last(), Some(&"done"), "{kinds:?}");
    assert!(kinds.contains(&"progress"), "{kinds:?}");
    let steps: Vec<u64> = evs
        .iter()
        .filter(|(e, _)| e == "progress")
        .map(|(_, d)| d["step"].as_u64().unwrap())
        .collect();
    assert!(
        steps.windows(2).all(|w| w[0] <= w[1]),
        "steps only go up: {steps:?}"
    );
    assert!(evs.iter().any(|(e, d)| e == "progress"
        && d["preview"]
            .as_str()
            .is_some_and(|p| p.starts_with("data:image/png;base64,"))));
    let done = &evs.last().unwrap().1;
    assert_eq!(done["state"], "succeeded", "{done}");
    assert_eq!(done["step"], 12);
    let image = &done["images"][0];
    let name = image["name"].as_str().unwrap();
    assert!(name.ends_with("-3.png"), "{name}");
    assert!(image["infotext"].as_str().unwrap().contains("Seed: 3"));

    // Saved into the outputs folder, served, and listed by the gallery with its infotext.
    let r = s
        .client
        .get(s.url(image["url"].as_str().unwrap()))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let png = r.bytes().await.unwrap();
    assert_eq!(decode(&png).dimensions(), (64, 64));
    for seed in [10, 11] {
        let (_, j) = s.post("/api/v1/jobs", txt2img(2, seed)).await;
        s.wait_job(j["id"].as_str().unwrap()).await;
    }
    let (_, page) = s.get("/api/v1/gallery?page=1&per_page=2").await;
    assert_eq!(page["total"], 3);
    assert_eq!(page["items"].as_array().unwrap().len(), 2);
    let (_, page2) = s.get("/api/v1/gallery?page=2&per_page=2").await;
    assert_eq!(page2["items"].as_array().unwrap().len(), 1);
    assert_eq!(page2["items"][0]["name"], name, "oldest last");
    assert!(page2["items"][0]["infotext"]
        .as_str()
        .unwrap()
        .contains("Seed: 3"));
    assert_eq!(page2["items"][0]["width"], 64);

    // The job list shows it finished; an unknown id is a 404 with a message.
    let (_, list) = s.get("/api/v1/jobs").await;
    assert!(list["jobs"]
        .as_array()
        .unwrap()
        .iter()
        .any(|j| j["id"] == id.as_str()));
    let (status, body) = s.get("/api/v1/jobs/ffffffffffffffff").await;
    assert_eq!(status, 404);
    assert!(body["error"].as_str().unwrap().contains("no job"));
    let (status, body) = s
        .post("/api/v1/jobs", json!({"kind": "paint", "params": {}}))
        .await;
    assert_eq!(status, 400);
    assert!(body["error"].as_str().unwrap().contains("unknown job kind"));
}

#[tokio::test(flavor = "multi_thread")]
async fn queue_is_fifo_bounded_cancellable_and_batches_compatible_jobs() {
    let s = start(|c| c.queue_size = 4).await;
    // A long job keeps the worker busy while the others queue up.
    let (_, long) = s.post("/api/v1/jobs", txt2img(400, 1)).await;
    let long_id = long["id"].as_str().unwrap().to_string();
    // Wait until it is running (sampling), so that the next ones queue behind it.
    s.wait_sampling(&long_id).await;
    let mut queued = Vec::new();
    for seed in [100, 200, 300] {
        let (status, j) = s.post("/api/v1/jobs", txt2img(3, seed)).await;
        assert_eq!(status, 202, "{j}");
        queued.push(j);
    }
    // Different size: cannot share their batch.
    let (_, odd) = s
        .post(
            "/api/v1/jobs",
            json!({"kind": "txt2img", "params": {"prompt": "x", "steps": 3, "width": 32, "height": 32}}),
        )
        .await;
    assert_eq!(odd["position"], 3);
    assert_eq!(queued[0]["position"], 0);
    assert_eq!(queued[2]["position"], 2);
    // Full: 429 with a body that says so.
    let (status, body) = s.post("/api/v1/jobs", txt2img(3, 9)).await;
    assert_eq!(status, 429, "{body}");
    assert!(
        body["error"].as_str().unwrap().contains("queue is full"),
        "{body}"
    );
    let (status, _) = s
        .post(
            "/sdapi/v1/txt2img",
            json!({"prompt": "x", "steps": 2, "width": 64, "height": 64}),
        )
        .await;
    assert_eq!(status, 429);
    let (_, metrics) = s.get("/metrics").await;
    assert!(metrics.as_str().unwrap().contains("sdkube_queue_depth 4"));

    // A1111's progress shows the running job.
    let (_, progress) = s.get("/sdapi/v1/progress").await;
    assert!(progress["progress"].as_f64().unwrap() > 0.0, "{progress}");
    assert!(progress["state"]["sampling_step"].as_u64().unwrap() > 0);
    assert_eq!(progress["state"]["job_count"], 5);

    // Cancel mid-sampling: it stops long before its 400 steps.
    let (status, _) = s
        .post(&format!("/api/v1/jobs/{long_id}/cancel"), json!({}))
        .await;
    assert_eq!(status, 200);
    let long = s.wait_job(&long_id).await;
    assert_eq!(long["state"], "cancelled", "{long}");
    assert!(long["step"].as_u64().unwrap() < 400);
    assert!(long["images"].as_array().unwrap().is_empty());

    let mut finished = Vec::new();
    for j in queued.iter().chain([&odd]) {
        finished.push(s.wait_job(j["id"].as_str().unwrap()).await);
    }
    for j in &finished[..3] {
        assert_eq!(j["state"], "succeeded", "{j}");
        assert_eq!(
            j["batch_jobs"], 3,
            "the three compatible jobs shared one batch: {j}"
        );
    }
    assert_eq!(finished[3]["batch_jobs"], 1, "the 32² job ran alone");
    // Batched images are the images each job makes alone (on the CPU to the bit).
    let (_, alone) = s.post("/api/v1/jobs", txt2img(3, 200)).await;
    let alone = s.wait_job(alone["id"].as_str().unwrap()).await;
    assert_eq!(alone["batch_jobs"], 1);
    let fetch = |url: String| {
        let c = s.client.clone();
        async move { decode(&c.get(url).send().await.unwrap().bytes().await.unwrap()) }
    };
    let a = fetch(s.url(alone["images"][0]["url"].as_str().unwrap())).await;
    let b = fetch(s.url(finished[1]["images"][0]["url"].as_str().unwrap())).await;
    assert!(
        a == b,
        "a batched image equals, to the bit, the image made alone"
    );

    // Cancelling a queued job removes it at once.
    let (_, busy) = s.post("/api/v1/jobs", txt2img(400, 1)).await;
    let (_, waiting) = s.post("/api/v1/jobs", txt2img(3, 5)).await;
    let wid = waiting["id"].as_str().unwrap();
    let (_, c) = s
        .post(&format!("/api/v1/jobs/{wid}/cancel"), json!({}))
        .await;
    assert_eq!(c["state"], "cancelled");
    // Interrupt acts on what is running: wait until the busy job samples.
    s.wait_sampling(busy["id"].as_str().unwrap()).await;
    s.post("/sdapi/v1/interrupt", json!({})).await;
    let busy = s.wait_job(busy["id"].as_str().unwrap()).await;
    assert_eq!(
        busy["state"], "cancelled",
        "A1111 interrupt stops the running job"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a1111_skip_ends_the_current_batch_only() {
    let s = start(|_| {}).await;
    let client = s.client.clone();
    let url = s.url("/sdapi/v1/txt2img");
    let call = tokio::spawn(async move {
        client
            .post(url)
            .json(&json!({"prompt": "x", "steps": 300, "n_iter": 2, "width": 64, "height": 64, "seed": 8}))
            .send()
            .await
            .unwrap()
            .json::<Value>()
            .await
            .unwrap()
    });
    loop {
        let (_, p) = s.get("/sdapi/v1/progress").await;
        if p["state"]["sampling_step"].as_u64().unwrap_or(0) > 2 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    s.post("/sdapi/v1/skip", json!({})).await;
    let body = call.await.unwrap();
    let info: Value = serde_json::from_str(body["info"].as_str().unwrap()).unwrap();
    assert_eq!(
        body["images"].as_array().unwrap().len(),
        1,
        "first batch skipped, second made"
    );
    assert_eq!(info["all_seeds"], json!([9]), "{info}");
}

#[tokio::test(flavor = "multi_thread")]
async fn one_worker_per_device_runs_jobs_side_by_side() {
    // Two devices (both the CPU here; GPUs in production): two workers, each with the model.
    let s = start(|c| c.devices = vec![candle_core::Device::Cpu, candle_core::Device::Cpu]).await;
    let (_, status) = s.get("/api/v1/status").await;
    assert_eq!(status["devices"], json!(["cpu", "cpu"]));
    // Different sizes, so they cannot share a batch: each worker takes one.
    let (_, a) = s.post("/api/v1/jobs", txt2img(400, 1)).await;
    let (_, b) = s
        .post(
            "/api/v1/jobs",
            json!({"kind": "txt2img", "params": {"prompt": "x", "steps": 400, "width": 32, "height": 32}}),
        )
        .await;
    let mut both_running = false;
    for _ in 0..500 {
        let (_, list) = s.get("/api/v1/jobs").await;
        let running = list["jobs"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|j| j["state"] == "running" && j["step"].as_u64().unwrap_or(0) > 0)
            .count();
        if running == 2 {
            both_running = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(both_running, "both jobs sampled at the same time");
    for j in [&a, &b] {
        s.post(
            &format!("/api/v1/jobs/{}/cancel", j["id"].as_str().unwrap()),
            json!({}),
        )
        .await;
    }
    for j in [&a, &b] {
        let done = s.wait_job(j["id"].as_str().unwrap()).await;
        assert_eq!(done["state"], "cancelled");
        assert_eq!(done["batch_jobs"], 1);
    }
}
