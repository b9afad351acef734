//! The hires fix run by the engine (`Engine::hires_fix`) on the tiny SD1 fixture: the same
//! image as the two passes spelled out by hand, A1111's infotext fields, and the image
//! upscaler the caller supplies.

use candle_core::{DType, Device};
use image::imageops::FilterType;
use image::DynamicImage;
use sdkube_models::{load, LoadOptions};
use sdkube_pipeline::latent_upscale::{upscale_latent, LatentMode};
use sdkube_pipeline::sampler::Flow;
use sdkube_pipeline::{Engine, HiresError, HiresFix, Infotext, Overrides, Request, VramMode};

fn engine() -> Engine {
    let dir = sdkube_testkit::fixtures().join("sd").join("sd1");
    let w = load(&dir, &LoadOptions::default()).unwrap();
    Engine::new(w, "sd1", Device::Cpu, DType::F32, VramMode::High).unwrap()
}

fn first_request() -> Request {
    Request {
        prompt: "a red house".into(),
        negative_prompt: "fog".into(),
        sampler: "Euler a".into(),
        steps: 3,
        width: 64,
        height: 64,
        seed: 11,
        ..Default::default()
    }
}

fn go(_: &sdkube_pipeline::Progress) -> Flow {
    Flow::Continue
}

#[test]
fn latent_hires_fix_equals_the_two_passes_by_hand_and_writes_a1111_fields() {
    let mut e = engine();
    let req = first_request();
    let first = e.generate(&req, &mut go).unwrap().remove(0);
    let hires = HiresFix::scaled(&req, 1.5, "Latent", 2, 0.6).unwrap();
    assert_eq!((hires.width, hires.height, hires.steps), (96, 96, 2));
    let mut no_upscaler = |_: &str, _: &DynamicImage, _: f32| -> Result<DynamicImage, String> {
        panic!("a latent upscale runs no image upscaler")
    };
    let out = e
        .hires_fix(&req, &first, &hires, &mut no_upscaler, &mut go)
        .unwrap();
    assert_eq!(out.image.dimensions(), (96, 96));
    assert_eq!(out.seed, 11);

    // By hand: the latent resized bilinearly, then img2img at 96² from the same seed.
    let by_hand = {
        let init =
            DynamicImage::ImageRgb8(first.image.clone()).resize_exact(96, 96, FilterType::Triangle);
        let second = Request {
            init_image: Some(init),
            strength: 0.6,
            steps: 2,
            width: 96,
            height: 96,
            ..req.clone()
        };
        let overrides = Overrides {
            init_latent: Some(upscale_latent(&first.latent, 12, 12, LatentMode::Bilinear).unwrap()),
            ..Overrides::default()
        };
        e.generate_with(&second, overrides, &mut go)
            .unwrap()
            .remove(0)
    };
    assert_eq!(
        out.image, by_hand.image,
        "the engine's hires fix is the two passes"
    );

    // The first pass's parameters (its size and steps) with A1111's hires fields.
    let parsed = Infotext::parse(&out.infotext);
    assert_eq!(parsed, out.parameters);
    assert_eq!(parsed.prompt, "a red house");
    assert_eq!(parsed.negative_prompt, "fog");
    for (k, v) in [
        ("Steps", "3"),
        ("Seed", "11"),
        ("Size", "64x64"),
        ("Denoising strength", "0.6"),
        ("Hires upscale", "1.5"),
        ("Hires steps", "2"),
        ("Hires upscaler", "Latent"),
    ] {
        assert_eq!(parsed.get(k), Some(v), "{k} in {}", out.infotext);
    }
    let keys: Vec<&str> = parsed.fields.iter().map(|(k, _)| k.as_str()).collect();
    assert_eq!(
        keys.last(),
        Some(&"Version"),
        "Version comes last as in A1111"
    );
}

#[test]
fn image_upscalers_are_the_callers_and_their_errors_come_back_as_such() {
    let mut e = engine();
    let req = first_request();
    let first = e.generate(&req, &mut go).unwrap().remove(0);
    let hires = HiresFix::scaled(&req, 2.0, "Lanczos", 0, 0.5).unwrap();
    assert_eq!((hires.width, hires.height), (128, 128));
    assert_eq!(hires.steps_after(req.steps), 3, "0 steps: the first pass's");
    let mut calls = Vec::new();
    let mut lanczos = |name: &str, img: &DynamicImage, factor: f32| -> Result<_, String> {
        calls.push((name.to_string(), img.width(), factor));
        Ok(img.resize_exact(128, 128, FilterType::Lanczos3))
    };
    let out = e
        .hires_fix(&req, &first, &hires, &mut lanczos, &mut go)
        .unwrap();
    assert_eq!(calls, vec![("Lanczos".to_string(), 64, 2.0)]);
    assert_eq!(out.image.dimensions(), (128, 128));
    assert!(out.infotext.contains("Hires upscaler: Lanczos"));
    assert!(
        !out.infotext.contains("Hires steps"),
        "A1111 writes no steps when they were not given: {}",
        out.infotext
    );
    assert!(
        out.infotext.contains("Hires upscale: 2.0,"),
        "{}",
        out.infotext
    );

    let mut failing = |_: &str, _: &DynamicImage, _: f32| -> Result<DynamicImage, String> {
        Err("no such upscaler".into())
    };
    match e.hires_fix(&req, &first, &hires, &mut failing, &mut go) {
        Err(HiresError::Upscale(m)) => assert_eq!(m, "no such upscaler"),
        other => panic!(
            "expected the upscaler's error, got {:?}",
            other.map(|g| g.seed)
        ),
    }
}

#[test]
fn hires_sizes_round_down_to_multiples_of_8_and_bad_values_are_refused() {
    let req = Request {
        width: 72,
        height: 64,
        ..first_request()
    };
    let h = HiresFix::scaled(&req, 1.3, "Latent", 0, 0.7).unwrap();
    assert_eq!((h.width, h.height), (88, 80));
    assert_eq!(h.latent_mode(), Some(LatentMode::Bilinear));
    for (name, mode) in [
        ("Latent (bicubic)", Some(LatentMode::Bicubic)),
        ("Latent (nearest-exact)", Some(LatentMode::NearestExact)),
        ("Latent (made up)", None),
        ("Lanczos", None),
    ] {
        let h = HiresFix::scaled(&req, 2.0, name, 0, 0.7).unwrap();
        assert_eq!(h.latent_mode(), mode, "{name}");
    }
    for (scale, strength) in [(0.5, 0.7), (9.0, 0.7), (2.0, 1.5)] {
        let err = HiresFix::scaled(&req, scale, "Latent", 0, strength).unwrap_err();
        assert!(err.to_string().contains("between"), "{err}");
    }
}
