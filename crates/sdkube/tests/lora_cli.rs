//! `sdkube generate --lora-dirs` with `<lora:…>` in the prompt, run as a process on the tiny
//! fixture model.

use std::process::Command;

fn run(dir: &std::path::Path, prompt: &str) -> std::process::Output {
    let fixtures = sdkube_testkit::fixtures();
    Command::new(env!("CARGO_BIN_EXE_sdkube"))
        .args([
            "generate", "--device", "cpu", "--steps", "2", "--width", "64",
        ])
        .args([
            "--height", "64", "--seed", "5", "--prompt", prompt, "--model",
        ])
        .arg(fixtures.join("sd/sd1"))
        .arg("--lora-dirs")
        .arg(format!(
            "{},{}",
            fixtures.join("lora/sd1").display(),
            fixtures.join("lora/sdxl").display()
        ))
        .arg("--out")
        .arg(dir)
        .output()
        .unwrap()
}

#[test]
fn generate_applies_a_lora_named_in_the_prompt_and_refuses_unknown_or_unfit_ones() {
    let tmp = tempfile::tempdir().unwrap();
    let out = run(&tmp.path().join("a"), "a lighthouse <lora:kohya-sd1:0.7:1>");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let png = std::fs::read_dir(tmp.path().join("a"))
        .unwrap()
        .next()
        .unwrap()
        .unwrap();
    let text = sdkube_pipeline::image_io::read_png_parameters(&std::fs::read(png.path()).unwrap())
        .unwrap()
        .unwrap();
    assert!(
        text.starts_with("a lighthouse <lora:kohya-sd1:0.7:1>\n"),
        "{text}"
    );
    assert!(
        text.contains(r#"Lora hashes: "kohya-sd1: 8d2ab056d855""#),
        "{text}"
    );

    let out = run(&tmp.path().join("b"), "a lighthouse <lora:missing:1>");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("unknown LoRA `missing`"),
        "{err}"
    );
    let out = run(&tmp.path().join("c"), "a lighthouse <lora:kohya-sdxl:1>");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success()
            && err.contains("kohya-sdxl.safetensors")
            && err.contains("SDXL LoRA"),
        "{err}"
    );
    assert!(
        !tmp.path().join("c").exists()
            || std::fs::read_dir(tmp.path().join("c"))
                .unwrap()
                .next()
                .is_none()
    );
}
