//! `sdkube generate` run as a process on the tiny fixture model: its outputs, options and
//! the errors bad input gets.

use std::path::{Path, PathBuf};
use std::process::Command;

fn fixture(name: &str) -> PathBuf {
    sdkube_testkit::fixtures().join("sd").join(name)
}

fn sdkube() -> Command {
    Command::new(env!("CARGO_BIN_EXE_sdkube"))
}

fn base_args(out: &Path) -> Vec<String> {
    [
        "generate",
        "--device",
        "cpu",
        "--steps",
        "3",
        "--width",
        "64",
        "--height",
        "64",
        "--seed",
        "5",
        "--prompt",
        "a lighthouse at dusk",
        "--negative-prompt",
        "blurry",
    ]
    .iter()
    .map(|s| s.to_string())
    .chain([
        "--model".into(),
        fixture("sd1").display().to_string(),
        "--out".into(),
        out.display().to_string(),
    ])
    .collect()
}

/// `args` with the value after `flag` replaced.
fn with_arg(mut args: Vec<String>, flag: &str, value: impl Into<String>) -> Vec<String> {
    let at = args.iter().position(|a| a == flag).expect("the flag");
    args[at + 1] = value.into();
    args
}

/// The files of `dir`, sorted (the images in the order they were written).
fn sorted_files(dir: &Path) -> Vec<PathBuf> {
    let mut files: Vec<_> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    files.sort();
    files
}

fn png_parameters(path: &Path) -> String {
    let bytes = std::fs::read(path).unwrap();
    sdkube_pipeline::image_io::read_png_parameters(&bytes)
        .unwrap()
        .expect("parameters chunk")
}

#[test]
fn writes_pngs_with_a1111_infotext_and_numbers_them_upwards() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out");
    let run = sdkube()
        .args(base_args(&out))
        .args(["--batch-size", "2"])
        .output()
        .unwrap();
    assert!(
        run.status.success(),
        "{}",
        String::from_utf8_lossy(&run.stderr)
    );
    let files: Vec<_> = sorted_files(&out)
        .iter()
        .map(|p| p.file_name().unwrap().to_str().unwrap().to_string())
        .collect();
    assert_eq!(files, vec!["00000-5.png", "00001-6.png"]);
    let text = png_parameters(&out.join("00001-6.png"));
    assert!(
        text.starts_with(
            "a lighthouse at dusk\nNegative prompt: blurry\nSteps: 3, Sampler: Euler a,"
        ),
        "{text}"
    );
    assert!(text.contains("Seed: 6, Size: 64x64, Model: sd1"), "{text}");

    // img2img from the first output, written after the existing files.
    let run = sdkube()
        .args(base_args(&out))
        .args([
            "--init-image",
            &out.join("00000-5.png").display().to_string(),
            "--strength",
            "0.5",
            "--sampler",
            "DPM++ 2M Karras",
        ])
        .output()
        .unwrap();
    assert!(
        run.status.success(),
        "{}",
        String::from_utf8_lossy(&run.stderr)
    );
    let text = png_parameters(&out.join("00002-5.png"));
    assert!(
        text.contains("Sampler: DPM++ 2M, Schedule type: Karras")
            && text.contains("Denoising strength: 0.5"),
        "{text}"
    );
}

#[test]
fn single_file_checkpoint_and_separate_vae_load() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out");
    let args = with_arg(
        base_args(&out),
        "--model",
        fixture("sd1.safetensors").display().to_string(),
    );
    let run = sdkube()
        .args(args)
        .args(["--config", &fixture("sd1").display().to_string()])
        .args([
            "--vae",
            &fixture("vae-sd1-alt.safetensors").display().to_string(),
        ])
        .output()
        .unwrap();
    assert!(
        run.status.success(),
        "{}",
        String::from_utf8_lossy(&run.stderr)
    );
    assert_eq!(std::fs::read_dir(&out).unwrap().count(), 1);
}

#[test]
fn bad_input_fails_clearly_and_writes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out");
    let garbage = dir.path().join("broken.ckpt");
    std::fs::write(&garbage, b"PK\x03\x04 definitely not a zip").unwrap();
    let not_image = dir.path().join("init.png");
    std::fs::write(&not_image, b"not a png").unwrap();
    let cases: Vec<(Vec<&str>, &str)> = vec![
        (vec!["--sampler", "Eulr"], "unknown sampler"),
        (vec!["--width", "65"], "multiple of 8"),
        (
            vec!["--steps", "0"],
            "steps must be between 1 and 150, got 0",
        ),
        (
            vec!["--steps", "500"],
            "steps must be between 1 and 150, got 500",
        ),
        (vec!["--prompt", "()[]"], "tokenizes to nothing"),
        (vec!["--step-cache-interval", "0"], "--step-cache-interval"),
        (
            vec!["--step-cache-interval", "2", "--step-cache-branch", "4"],
            "step cache branch 4: this model's UNet has branches 0 to 3",
        ),
        (
            vec!["--init-image", not_image.to_str().unwrap()],
            "not a readable image",
        ),
        (vec!["--model", garbage.to_str().unwrap()], "broken.ckpt"),
        (
            vec!["--model", "/nonexistent/model.safetensors"],
            "no such file",
        ),
    ];
    for (extra, want) in cases {
        let run = sdkube()
            .args(base_args(&out))
            .args(&extra)
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&run.stderr);
        assert!(!run.status.success(), "{extra:?} should fail");
        assert!(
            stderr.contains(want),
            "{extra:?}: expected {want:?} in {stderr}"
        );
        assert!(
            !out.exists() || std::fs::read_dir(&out).unwrap().count() == 0,
            "{extra:?} wrote files"
        );
    }
}

/// Serves one file over plain HTTP/1.1 on loopback (HEAD and GET), `count` requests.
fn serve_file(bytes: Vec<u8>, count: usize) -> String {
    use std::io::{BufRead, BufReader, Write};
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    std::thread::spawn(move || {
        for stream in listener.incoming().take(count) {
            let mut stream = stream.unwrap();
            let mut reader = BufReader::new(stream.try_clone().unwrap());
            let mut request_line = String::new();
            reader.read_line(&mut request_line).unwrap();
            loop {
                let mut line = String::new();
                if reader.read_line(&mut line).unwrap() == 0 || line == "\r\n" {
                    break;
                }
            }
            let head = format!(
                "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
                bytes.len()
            );
            stream.write_all(head.as_bytes()).unwrap();
            if request_line.starts_with("GET") {
                let _ = stream.write_all(&bytes);
            }
        }
    });
    format!("http://{addr}/tiny-sd1.safetensors")
}

#[test]
fn a_catalog_name_is_fetched_into_the_store_on_first_use() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out");
    let store = dir.path().join("store");
    let url = serve_file(std::fs::read(fixture("sd1.safetensors")).unwrap(), 8);
    let catalog = dir.path().join("catalog.toml");
    std::fs::write(
        &catalog,
        format!("[[model]]\nname = \"tiny-sd1\"\nkind = \"checkpoint\"\ndescription = \"test\"\n[[model.file]]\nurl = \"{url}\"\n"),
    )
    .unwrap();
    let args = with_arg(base_args(&out), "--model", "tiny-sd1");
    let run = |extra: &[&str]| {
        sdkube()
            .args(&args)
            .args([
                "--store",
                store.to_str().unwrap(),
                "--catalog",
                catalog.to_str().unwrap(),
            ])
            .args(["--config", fixture("sd1").to_str().unwrap()])
            .args(extra)
            .env_remove("HTTP_PROXY")
            .env_remove("http_proxy")
            .output()
            .unwrap()
    };
    let first = run(&[]);
    assert!(
        first.status.success(),
        "{}",
        String::from_utf8_lossy(&first.stderr)
    );
    assert!(String::from_utf8_lossy(&first.stderr).contains("fetching it"));
    assert!(store.join("tiny-sd1/tiny-sd1.safetensors").is_file());
    let second = run(&["--seed", "6"]);
    assert!(
        second.status.success(),
        "{}",
        String::from_utf8_lossy(&second.stderr)
    );
    assert!(
        !String::from_utf8_lossy(&second.stderr).contains("fetching it"),
        "second run uses the store"
    );
    assert_eq!(std::fs::read_dir(&out).unwrap().count(), 2);
}

#[test]
fn embeddings_folder_is_used_by_prompts() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out");
    let args = with_arg(base_args(&out), "--prompt", "a photo of (tiembed:1.2)");
    let status = sdkube()
        .args(&args)
        .arg("--embeddings")
        .arg(fixture("../ti/sd1"))
        .status()
        .unwrap();
    assert!(status.success());
    let png = std::fs::read_dir(&out)
        .unwrap()
        .next()
        .unwrap()
        .unwrap()
        .path();
    let text = png_parameters(&png);
    assert!(text.contains("TI hashes: \"tiembed: "), "{text}");
}

/// The hires fix runs in the engine, so the CLI has it: 64² → 128² through a latent upscale,
/// the infotext giving the first pass's size and the hires fields.
#[test]
fn hires_fix_doubles_the_size_and_records_it() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out");
    let run = sdkube()
        .args(base_args(&out))
        .args([
            "--hires-scale",
            "2",
            "--hires-steps",
            "2",
            "--hires-denoise",
            "0.5",
        ])
        .output()
        .unwrap();
    assert!(
        run.status.success(),
        "{}",
        String::from_utf8_lossy(&run.stderr)
    );
    let path = out.join("00000-5.png");
    let img = image::open(&path).unwrap();
    assert_eq!((img.width(), img.height()), (128, 128));
    let text = png_parameters(&path);
    for field in [
        "Size: 64x64",
        "Denoising strength: 0.5",
        "Hires upscale: 2.0",
        "Hires steps: 2",
        "Hires upscaler: Latent",
    ] {
        assert!(text.contains(field), "{field} in {text}");
    }

    // An image upscaler by name, and one that is neither a name nor a file.
    let run = sdkube()
        .args(base_args(&out))
        .args(["--hires-scale", "1.5", "--hires-upscaler", "Lanczos"])
        .output()
        .unwrap();
    assert!(
        run.status.success(),
        "{}",
        String::from_utf8_lossy(&run.stderr)
    );
    let img = image::open(out.join("00001-5.png")).unwrap();
    assert_eq!((img.width(), img.height()), (96, 96));
    let run = sdkube()
        .args(base_args(&out))
        .args([
            "--hires-scale",
            "2",
            "--hires-upscaler",
            "/no/such/esrgan.pth",
        ])
        .output()
        .unwrap();
    assert!(!run.status.success());
    let stderr = String::from_utf8_lossy(&run.stderr);
    assert!(
        stderr.contains("--hires-upscaler /no/such/esrgan.pth"),
        "{stderr}"
    );
}

/// Variations and tiling from the command line: one seed for the batch, variation seeds
/// counting up, recorded as A1111 records them.
#[test]
fn variations_tiling_and_step_caching_are_recorded_per_image() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out");
    let run = sdkube()
        .args(base_args(&out))
        .args([
            "--batch-size",
            "2",
            "--subseed",
            "40",
            "--subseed-strength",
            "0.25",
        ])
        .args(["--seed-resize-from", "80x48", "--tiling"])
        .args(["--step-cache-interval", "2", "--step-cache-branch", "1"])
        .output()
        .unwrap();
    assert!(
        run.status.success(),
        "{}",
        String::from_utf8_lossy(&run.stderr)
    );
    let text = png_parameters(&out.join("00001-5.png"));
    assert!(
        text.contains("Seed: 5, Size: 64x64, Model: sd1, Variation seed: 41, Variation seed strength: 0.25, Seed resize from: 80x48"),
        "{text}"
    );
    assert!(text.contains("Tiling: True"), "{text}");
    assert!(
        text.contains("Step cache interval: 2, Step cache branch: 1"),
        "{text}"
    );
    let run = sdkube()
        .args(base_args(&out))
        .args(["--seed-resize-from", "80by48"])
        .output()
        .unwrap();
    assert!(!run.status.success());
    assert!(String::from_utf8_lossy(&run.stderr).contains("WIDTHxHEIGHT"));
}

/// The refiner finishes an SDXL run from the CLI as through the API; one whose latents differ
/// from the model's is refused naming both.
#[test]
fn a_refiner_takes_over_the_run_and_is_recorded() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out");
    let with_model = |model: &str| {
        with_arg(
            base_args(&out),
            "--model",
            fixture(model).display().to_string(),
        )
    };
    let refiner = fixture("sdxl-refiner").display().to_string();
    let run = sdkube()
        .args(with_model("sdxl"))
        .args(["--refiner", &refiner, "--refiner-switch-at", "0.5"])
        .output()
        .unwrap();
    assert!(
        run.status.success(),
        "{}",
        String::from_utf8_lossy(&run.stderr)
    );
    let text = png_parameters(&out.join("00000-5.png"));
    assert!(
        text.contains("Refiner: sdxl-refiner, Refiner switch at: 0.5"),
        "{text}"
    );

    let run = sdkube()
        .args(with_model("sd1"))
        .args(["--refiner", &refiner])
        .output()
        .unwrap();
    assert!(!run.status.success());
    let stderr = String::from_utf8_lossy(&run.stderr);
    assert!(stderr.contains("cannot continue the latents"), "{stderr}");
}

/// A1111's scripts from the CLI: an X/Y/Z plot writes the grid, then each cell's image (each
/// as a plain run with its parameters); a prompt matrix writes the grid and 2^(n-1) images.
#[test]
fn scripts_write_their_grid_then_the_images() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out");
    let run = sdkube()
        .args(base_args(&out))
        .args(["--xyz-x", "Steps:2,3", "--xyz-images"])
        .output()
        .unwrap();
    assert!(
        run.status.success(),
        "{}",
        String::from_utf8_lossy(&run.stderr)
    );
    let files = sorted_files(&out);
    assert_eq!(files.len(), 3, "{files:?}");
    assert_eq!(image::open(&files[0]).unwrap().width(), 128, "the grid");
    let texts: Vec<String> = files.iter().map(|f| png_parameters(f)).collect();
    assert!(texts[1].contains("Steps: 2,"), "{}", texts[1]);
    assert!(texts[2].contains("Steps: 3,"), "{}", texts[2]);
    // The 3-step cell is what a plain 3-step run draws.
    let plain = dir.path().join("plain");
    let run = sdkube().args(base_args(&plain)).output().unwrap();
    assert!(run.status.success());
    let cell = image::open(&files[2]).unwrap().to_rgb8();
    let alone = image::open(plain.join("00000-5.png")).unwrap().to_rgb8();
    assert!(cell == alone, "the cell differs from the plain run");

    let matrix = dir.path().join("matrix");
    let args = with_arg(
        base_args(&matrix),
        "--prompt",
        "a lighthouse|at dusk|in fog",
    );
    let run = sdkube().args(args).arg("--prompt-matrix").output().unwrap();
    assert!(
        run.status.success(),
        "{}",
        String::from_utf8_lossy(&run.stderr)
    );
    assert_eq!(std::fs::read_dir(&matrix).unwrap().count(), 1 + 4);
    let bad = sdkube()
        .args(base_args(&dir.path().join("bad")))
        .args(["--xyz-x", "Nonsense:1,2"])
        .output()
        .unwrap();
    assert!(!bad.status.success());
    let stderr = String::from_utf8_lossy(&bad.stderr);
    assert!(stderr.contains("Nonsense"), "{stderr}");
}

/// The X/Y/Z plot's checkpoint axis from the CLI: each cell on its model (paths or catalog
/// names), as a plain run with that model draws it.
#[test]
fn a_checkpoint_axis_runs_each_cell_on_its_model() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out");
    let models = format!(
        "Checkpoint name:{},{}",
        fixture("sd1").display(),
        fixture("sd2v").display()
    );
    let run = sdkube()
        .args(base_args(&out))
        .args(["--xyz-x", &models, "--xyz-images"])
        .output()
        .unwrap();
    assert!(
        run.status.success(),
        "{}",
        String::from_utf8_lossy(&run.stderr)
    );
    let files = sorted_files(&out);
    assert_eq!(files.len(), 3, "{files:?}");
    let text = png_parameters(&files[2]);
    assert!(text.contains("Model: sd2v"), "{text}");
    let plain = dir.path().join("plain");
    let args = with_arg(
        base_args(&plain),
        "--model",
        fixture("sd2v").display().to_string(),
    );
    assert!(sdkube().args(args).output().unwrap().status.success());
    let cell = image::open(&files[2]).unwrap().to_rgb8();
    let alone = image::open(plain.join("00000-5.png")).unwrap().to_rgb8();
    assert!(cell == alone, "the sd2v cell differs from a plain sd2v run");
}
