//! Textual-inversion training on the tiny fixture model: the loss goes down, the
//! checkpoint loads back as an embedding, runs resume, stop, and fail without losing the
//! last good checkpoint.

use sdkube_testkit::max_abs_diff;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device};
use image::{Rgb, RgbImage};
use sdkube_models::{load, LoadOptions, SdWeights};
use sdkube_pipeline::embeddings::{read_embedding, EmbeddingSet, TextWidths};
use sdkube_pipeline::sampler::Flow;
use sdkube_pipeline::train::{train_embedding, Template, TrainError, TrainOptions};

fn model(name: &str) -> SdWeights {
    load(
        &sdkube_testkit::fixtures().join("sd").join(name),
        &LoadOptions::default(),
    )
    .unwrap()
}

/// Four 48×40 images of a red disc on a blue ground, at different places (cropped to 32).
fn write_images(dir: &Path) {
    for (i, (cx, cy)) in [(12.0, 12.0), (30.0, 20.0), (20.0, 28.0), (24.0, 16.0)]
        .into_iter()
        .enumerate()
    {
        let img = RgbImage::from_fn(48, 40, |x, y| {
            let d = ((x as f32 - cx).powi(2) + (y as f32 - cy).powi(2)).sqrt();
            if d < 9.0 {
                Rgb([220, 30, 30])
            } else {
                Rgb([20, 40, 200])
            }
        });
        img.save(dir.join(format!("{i:02}-red_disc.png"))).unwrap();
    }
}

fn options(images: &Path, out: PathBuf) -> TrainOptions {
    TrainOptions {
        name: "tidisc".into(),
        init_text: "red ball".into(),
        vectors: 2,
        steps: 40,
        learning_rate: 0.05,
        batch_size: 2,
        template: Template::Subject,
        images: images.to_path_buf(),
        size: 32,
        out,
        checkpoint_every: 10,
        sample_every: 0,
        seed: 3,
        validation: true,
        ..Default::default()
    }
}

fn mean(xs: &[f32]) -> f32 {
    xs.iter().sum::<f32>() / xs.len() as f32
}

#[test]
fn loss_decreases_and_the_embedding_loads_back() {
    let dir = tempfile::tempdir().unwrap();
    write_images(dir.path());
    let w = model("sd1");
    let out = dir.path().join("out/tidisc.safetensors");
    let opts = options(dir.path(), out.clone());
    let mut seen = Vec::new();
    let outcome = train_embedding(&w, &Device::Cpu, DType::F32, &opts, &mut |p| {
        seen.push((p.step, p.checkpoint.is_some()));
        Flow::Continue
    })
    .unwrap();
    assert_eq!((outcome.first_step, outcome.step), (0, 40));
    assert!(!outcome.cancelled);
    let losses = &outcome.losses;
    assert_eq!(losses.len(), 40);
    let (first, last) = (mean(&losses[..5]), mean(&losses[35..]));
    let (before, after) = outcome.validation_loss.unwrap();
    eprintln!("step losses: first 5 {first}, last 5 {last}; validation {before} -> {after}");
    assert!(after < before, "validation loss {before} -> {after}");
    // Checkpoints every 10 steps.
    let checkpoints: Vec<usize> = seen.iter().filter(|s| s.1).map(|s| s.0).collect();
    assert_eq!(checkpoints, [10, 20, 30, 40]);

    let set = EmbeddingSet::load_dir(out.parent().unwrap(), TextWidths::of(&w)).unwrap();
    let info = set.get("tidisc").expect("the trained embedding loads");
    assert_eq!((info.vectors, info.shape.clone()), (2, vec![2, 8]));
    let state = std::fs::read_to_string(out.with_extension("safetensors.train.json")).unwrap();
    assert!(state.contains("\"step\": 40"), "{state}");
}

#[test]
fn resume_stop_and_failures_keep_the_last_checkpoint() {
    let dir = tempfile::tempdir().unwrap();
    write_images(dir.path());
    let w = model("sd1");
    let out = dir.path().join("tidisc.pt");
    let mut opts = options(dir.path(), out.clone());
    opts.steps = 6;
    opts.checkpoint_every = 0;

    // Stopped at step 3: saved there.
    let stopped = train_embedding(&w, &Device::Cpu, DType::F32, &opts, &mut |p| {
        if p.step == 3 {
            Flow::Stop
        } else {
            Flow::Continue
        }
    })
    .unwrap();
    assert!(stopped.cancelled);
    assert_eq!(stopped.step, 3);
    let at_3 = std::fs::read(&out).unwrap();

    // Not resuming onto an existing file is refused, and the file is untouched.
    opts.resume = false;
    let err =
        train_embedding(&w, &Device::Cpu, DType::F32, &opts, &mut |_| Flow::Continue).unwrap_err();
    assert!(matches!(err, TrainError::Exists(_)), "{err}");
    assert!(err.to_string().contains("--resume"));

    // An image that cannot be decoded stops the run before it starts; file untouched.
    opts.resume = true;
    std::fs::write(dir.path().join("broken.png"), b"not a png").unwrap();
    let err =
        train_embedding(&w, &Device::Cpu, DType::F32, &opts, &mut |_| Flow::Continue).unwrap_err();
    assert!(err.to_string().contains("broken.png"), "{err}");
    assert_eq!(std::fs::read(&out).unwrap(), at_3);
    std::fs::remove_file(dir.path().join("broken.png")).unwrap();

    // Resumed from step 3 to 6; the `.pt` (a flat torch dict) reads back.
    let resumed =
        train_embedding(&w, &Device::Cpu, DType::F32, &opts, &mut |_| Flow::Continue).unwrap();
    assert_eq!((resumed.first_step, resumed.step), (3, 6));
    assert_eq!(resumed.losses.len(), 3);
    let v = read_embedding(&out).unwrap();
    assert_eq!(v.first.dims(), [2, 8]);
    let at_6 = std::fs::read(&out).unwrap();
    assert_ne!(at_6, at_3);

    // A diverging run fails with a clear error and leaves the step-6 checkpoint.
    opts.steps = 12;
    opts.checkpoint_every = 1;
    opts.learning_rate = 1e38;
    let err =
        train_embedding(&w, &Device::Cpu, DType::F32, &opts, &mut |_| Flow::Continue).unwrap_err();
    assert!(err.to_string().contains("lower the learning rate"), "{err}");
    assert_eq!(std::fs::read(&out).unwrap(), at_6);
}

#[test]
fn bad_options_are_refused_before_any_work() {
    let dir = tempfile::tempdir().unwrap();
    let w = model("sd1");
    let base = options(dir.path(), dir.path().join("x.safetensors"));
    let cases: Vec<(TrainOptions, &str)> = vec![
        (
            TrainOptions {
                vectors: 0,
                ..base.clone()
            },
            "--vectors",
        ),
        (
            TrainOptions {
                name: "   ".into(),
                ..base.clone()
            },
            "has no tokens",
        ),
        (
            TrainOptions {
                out: dir.path().join("x.bin"),
                ..base.clone()
            },
            ".safetensors or .pt",
        ),
        (base.clone(), "no training images"),
    ];
    for (opts, expected) in cases {
        let err = train_embedding(&w, &Device::Cpu, DType::F32, &opts, &mut |_| Flow::Continue)
            .unwrap_err();
        assert!(err.to_string().contains(expected), "{err}");
    }
    assert!(!dir.path().join("x.safetensors").exists());
}

#[test]
fn sdxl_trains_a_pair_and_samples() {
    let dir = tempfile::tempdir().unwrap();
    write_images(dir.path());
    let w = model("sdxl");
    let mut opts = options(dir.path(), dir.path().join("xl.safetensors"));
    opts.steps = 2;
    opts.sample_every = 2;
    opts.sample_steps = 2;
    let mut sample = None;
    train_embedding(&w, &Device::Cpu, DType::F32, &opts, &mut |p| {
        sample = sample.clone().or(p.sample.clone());
        Flow::Continue
    })
    .unwrap();
    let v = read_embedding(&opts.out).unwrap();
    assert_eq!(v.first.dims(), [2, 8]);
    assert_eq!(v.second.as_ref().unwrap().dims(), [2, 8]);
    let sample = sample.expect("a sample image at step 2");
    let png = std::fs::read(&sample).unwrap();
    let text = sdkube_pipeline::image_io::read_png_parameters(&png)
        .unwrap()
        .unwrap();
    assert!(text.contains("TI hashes: \"tidisc: "), "{text}");
}

#[test]
fn a_resumed_run_continues_exactly_as_an_uninterrupted_one() {
    let dir = tempfile::tempdir().unwrap();
    write_images(dir.path());
    let w = model("sd1");
    let mut straight = options(dir.path(), dir.path().join("straight.safetensors"));
    straight.steps = 4;
    straight.checkpoint_every = 0;
    train_embedding(&w, &Device::Cpu, DType::F32, &straight, &mut |_| {
        Flow::Continue
    })
    .unwrap();

    let mut halves = options(dir.path(), dir.path().join("halves.safetensors"));
    halves.steps = 4;
    halves.checkpoint_every = 0;
    train_embedding(&w, &Device::Cpu, DType::F32, &halves, &mut |p| {
        if p.step == 2 {
            Flow::Stop
        } else {
            Flow::Continue
        }
    })
    .unwrap();
    assert!(dir
        .path()
        .join("halves.safetensors.optim.safetensors")
        .is_file());
    halves.resume = true;
    let resumed = train_embedding(&w, &Device::Cpu, DType::F32, &halves, &mut |_| {
        Flow::Continue
    })
    .unwrap();
    assert_eq!((resumed.first_step, resumed.step), (2, 4));

    let a = read_embedding(&straight.out).unwrap().first;
    let b = read_embedding(&halves.out).unwrap().first;
    let d = max_abs_diff(&a, &b);
    assert!(
        d < 1e-6,
        "resumed vectors differ by {d} (optimizer state lost?)"
    );
}
