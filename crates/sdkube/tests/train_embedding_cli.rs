//! `sdkube train-embedding` and `sdkube embeddings list` run as processes on the tiny
//! fixture model.

use std::process::Command;

use sdkube_testkit::fixtures;

fn sdkube() -> Command {
    Command::new(env!("CARGO_BIN_EXE_sdkube"))
}

#[test]
fn trains_then_lists_the_embedding() {
    let dir = tempfile::tempdir().unwrap();
    let images = dir.path().join("images");
    std::fs::create_dir(&images).unwrap();
    for name in ["astronaut_256.png", "pipeline_out.png"] {
        std::fs::copy(fixtures().join("face").join(name), images.join(name)).unwrap();
    }
    let out = dir.path().join("embeddings/astro.safetensors");
    let train = |extra: &[&str]| {
        let mut cmd = sdkube();
        cmd.args(["train-embedding", "--device", "cpu", "--model"])
            .arg(fixtures().join("sd/sd1"))
            .arg("--images")
            .arg(&images)
            .arg("--out")
            .arg(&out)
            .args(["--name", "astro", "--vectors", "2", "--size", "32"])
            .args(["--init-text", "astronaut", "--checkpoint-every", "2"])
            .args(extra);
        cmd.output().unwrap()
    };
    let run = train(&["--steps", "3"]);
    let stderr = String::from_utf8_lossy(&run.stderr);
    assert!(run.status.success(), "{stderr}");
    assert_eq!(
        String::from_utf8_lossy(&run.stdout).trim(),
        out.display().to_string()
    );
    assert!(stderr.contains("steps/s"), "{stderr}");

    // Training onto an existing embedding without --resume is a usage error.
    let again = train(&["--steps", "4"]);
    assert_eq!(again.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&again.stderr).contains("--resume"));
    let resumed = train(&["--steps", "4", "--resume"]);
    let stderr = String::from_utf8_lossy(&resumed.stderr);
    assert!(resumed.status.success(), "{stderr}");
    assert!(stderr.contains("steps 3..4"), "{stderr}");

    let list = sdkube()
        .args(["embeddings", "list", "--json", "--model"])
        .arg(fixtures().join("sd/sd1"))
        .arg("--dir")
        .arg(out.parent().unwrap())
        .output()
        .unwrap();
    assert!(list.status.success());
    let doc: serde_json::Value = serde_json::from_slice(&list.stdout).unwrap();
    assert_eq!(doc["loaded"][0]["name"], "astro");
    assert_eq!(doc["loaded"][0]["vectors"], 2);
    // For the released SD 1.x width the tiny embedding is skipped, with the reason.
    let list = sdkube()
        .args(["embeddings", "list", "--family", "sd1", "--dir"])
        .arg(out.parent().unwrap())
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&list.stdout);
    assert!(text.contains("skipped astro: vectors are 8 wide"), "{text}");
}
