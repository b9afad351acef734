//! LoRA through the A1111 API on a real server on loopback: `/sdapi/v1/loras`,
//! `refresh-loras`, `<lora:…>` in txt2img prompts, `Lora hashes` in the infotext, and the
//! errors for unknown names and files that do not fit the model.

mod common;

use common::*;
use serde_json::{json, Value};

fn lora_fixture(path: &str) -> std::path::PathBuf {
    repo().join("fixtures/lora").join(path)
}

async fn txt2img(s: &TestServer, prompt: &str) -> (u16, Value) {
    s.post(
        "/sdapi/v1/txt2img",
        json!({"prompt": prompt, "steps": 2, "width": 64, "height": 64, "seed": 9,
               "sampler_name": "Euler"}),
    )
    .await
}

#[tokio::test(flavor = "multi_thread")]
async fn loras_are_listed_used_in_prompts_and_refused_clearly() {
    let s = start(|_| {}).await;
    let dir = s.dir.path().join("loras");
    std::fs::create_dir_all(dir.join("people")).unwrap();
    for f in ["sd1/kohya-sd1.safetensors", "sdxl/kohya-sdxl.safetensors"] {
        let name = f.split('/').next_back().unwrap();
        std::fs::copy(lora_fixture(f), dir.join(name)).unwrap();
    }

    // A1111's fields: name, alias, path, metadata.
    let (status, list) = s.get("/sdapi/v1/loras").await;
    assert_eq!(status, 200, "{list}");
    assert_eq!(field_of(&list, "name"), ["kohya-sd1", "kohya-sdxl"]);
    assert_eq!(list[0]["alias"], "kohya-sd1-alias");
    assert_eq!(list[0]["metadata"]["ss_network_dim"], "2");
    assert!(list[0]["path"]
        .as_str()
        .unwrap()
        .ends_with("kohya-sd1.safetensors"));

    let (status, plain) = txt2img(&s, "a lighthouse").await;
    assert_eq!(status, 200, "{plain}");
    let (status, with) = txt2img(&s, "a lighthouse <lora:kohya-sd1:0.8>").await;
    assert_eq!(status, 200, "{with}");
    assert_ne!(
        plain["images"][0], with["images"][0],
        "the LoRA changed the image"
    );
    let text = first_infotext(&with);
    assert!(
        text.starts_with("a lighthouse <lora:kohya-sd1:0.8>\n"),
        "{text}"
    );
    assert!(
        text.contains(r#"Lora hashes: "kohya-sd1: 8d2ab056d855""#),
        "{text}"
    );
    // The LoRA is gone again for the next job: the base weights were kept.
    let (_, again) = txt2img(&s, "a lighthouse").await;
    assert_eq!(plain["images"][0], again["images"][0]);

    // Unknown names and bad tags: 400 before queueing, naming the problem.
    let (status, body) = txt2img(&s, "a lighthouse <lora:nope:1>").await;
    assert_eq!(status, 400, "{body}");
    assert!(
        body["detail"]
            .as_str()
            .unwrap()
            .contains("unknown LoRA `nope`"),
        "{body}"
    );
    let (status, body) = txt2img(&s, "a lighthouse <lora:kohya-sd1:strong>").await;
    assert_eq!(status, 400, "{body}");
    assert!(
        body["detail"]
            .as_str()
            .unwrap()
            .contains("<lora:kohya-sd1:strong>"),
        "{body}"
    );
    // An SDXL LoRA on this SD 1.x model: a 400 naming the file, never silently dropped.
    let (status, body) = txt2img(&s, "a lighthouse <lora:kohya-sdxl:1>").await;
    assert_eq!(status, 400, "{body}");
    let detail = body["detail"].as_str().unwrap();
    assert!(
        detail.contains("kohya-sdxl.safetensors") && detail.contains("SDXL LoRA"),
        "{detail}"
    );

    // A file added to a subfolder is listed after refresh-loras and usable at once.
    std::fs::copy(
        lora_fixture("sd1/peft-sd1.safetensors"),
        dir.join("people/peft-sd1.safetensors"),
    )
    .unwrap();
    let (status, _) = s.post("/sdapi/v1/refresh-loras", json!({})).await;
    assert_eq!(status, 200);
    let (_, list) = s.get("/sdapi/v1/loras").await;
    assert_eq!(
        field_of(&list, "name"),
        ["kohya-sd1", "kohya-sdxl", "peft-sd1"]
    );
    let (status, body) = txt2img(&s, "a lighthouse <lora:peft-sd1:0.5:1>").await;
    assert_eq!(status, 200, "{body}");
    assert!(first_infotext(&body).contains(r#"Lora hashes: "peft-sd1: 5a6b571cf638""#));
}

fn job(prompt: &str, steps: u32) -> Value {
    json!({"kind": "txt2img", "params": {"prompt": prompt, "steps": steps, "width": 64,
           "height": 64, "seed": 4, "sampler_name": "Euler"}})
}

#[tokio::test(flavor = "multi_thread")]
async fn jobs_with_different_loras_never_share_a_batch() {
    let s = start(|c| c.lora_dirs = vec![lora_fixture("sd1")]).await;
    // A long job keeps the worker busy while the others queue up behind it.
    let (_, long) = s.post("/api/v1/jobs", job("busy", 400)).await;
    let long_id = long["id"].as_str().unwrap().to_string();
    s.wait_sampling(&long_id).await;
    let mut queued = Vec::new();
    for prompt in [
        "a cat <lora:kohya-sd1:1>",
        "a dog <lora:kohya-sd1:1>",
        "a cat <lora:peft-sd1:1>",
        "a cat <lora:kohya-sd1:0.5>",
    ] {
        let (status, j) = s.post("/api/v1/jobs", job(prompt, 3)).await;
        assert_eq!(status, 202, "{j}");
        queued.push(j["id"].as_str().unwrap().to_string());
    }
    s.post(&format!("/api/v1/jobs/{long_id}/cancel"), json!({}))
        .await;
    let mut done = Vec::new();
    for id in &queued {
        done.push(s.wait_job(id).await);
    }
    let batch: Vec<u64> = done
        .iter()
        .map(|j| j["batch_jobs"].as_u64().unwrap())
        .collect();
    // Same LoRAs at the same weights share a batch; another LoRA or weight runs apart.
    assert_eq!(batch, [2, 2, 1, 1], "{done:?}");
    // And each image is the one its job makes alone.
    for (j, prompt) in done
        .iter()
        .zip(["a cat <lora:kohya-sd1:1>", "a dog <lora:kohya-sd1:1>"])
    {
        let (_, alone) = s.post("/api/v1/jobs", job(prompt, 3)).await;
        let alone = s.wait_job(alone["id"].as_str().unwrap()).await;
        assert_eq!(alone["batch_jobs"], 1);
        let get = |url: &str| {
            let (c, url) = (s.client.clone(), s.url(url));
            async move { c.get(url).send().await.unwrap().bytes().await.unwrap() }
        };
        let a = decode(&get(alone["images"][0]["url"].as_str().unwrap()).await);
        let b = decode(&get(j["images"][0]["url"].as_str().unwrap()).await);
        assert!(
            a == b,
            "{prompt}: the batched image equals the one made alone"
        );
    }
}

/// A catalog entry of kind `lora` fetched into the model store (`sdkube fetch NAME`) is listed
/// and used under its catalog name.
#[tokio::test(flavor = "multi_thread")]
async fn loras_fetched_into_the_store_are_listed_and_used() {
    let catalog = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(
        catalog.path(),
        "[[model]]\nname = \"ink-style\"\nkind = \"lora\"\ndescription = \"a LoRA\"\n\
         [[model.file]]\nurl = \"https://example.com/loras/ink.safetensors\"\n",
    )
    .unwrap();
    let s = start(|c| c.sources.catalog = Some(catalog.path().to_path_buf())).await;
    // What `sdkube fetch ink-style` leaves: the file and its manifest record.
    let store = s.dir.path().join("store");
    let bytes = std::fs::read(lora_fixture("sd1/kohya-sd1.safetensors")).unwrap();
    std::fs::create_dir_all(store.join("ink-style")).unwrap();
    std::fs::write(store.join("ink-style/ink.safetensors"), &bytes).unwrap();
    let record = json!({"path": "ink.safetensors", "size": bytes.len(), "sha256": "0".repeat(64),
                        "source": "url", "url": "https://example.com/loras/ink.safetensors",
                        "fetched_at": "2026-12-05T00:00:00Z"});
    let manifest = json!({"version": 1, "models": {"ink-style": {"files": [record]}}});
    std::fs::write(store.join("manifest.json"), manifest.to_string()).unwrap();

    let (_, list) = s.get("/sdapi/v1/loras").await;
    assert_eq!(field_of(&list, "name"), ["ink-style"], "{list}");
    let (status, body) = txt2img(&s, "a lighthouse <lora:ink-style:1>").await;
    assert_eq!(status, 200, "{body}");
    assert!(first_infotext(&body).contains(r#"Lora hashes: "ink-style: 8d2ab056d855""#));
}
