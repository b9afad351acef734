//! End-to-end parity of the txt2img / img2img pipeline with the reference runs in
//! `fixtures/sd/refs` (A1111 "Euler": k-diffusion's sampler over diffusers' networks), and
//! behaviour of the engine: validation, seeds, batches, the infotext.

use sdkube_testkit::max_abs_diff;
use std::path::PathBuf;

use candle_core::{DType, Device, Tensor};
use sdkube_models::{load, LoadOptions};
use sdkube_pipeline::image_io::{
    encode_png, image_to_tensor, read_png_parameters, tensor_to_images,
};
use sdkube_pipeline::sampler::Flow;
use sdkube_pipeline::{Engine, Overrides, Request, VramMode};

fn fixtures() -> PathBuf {
    sdkube_testkit::fixtures().join("sd")
}

fn refs(name: &str) -> std::collections::HashMap<String, Tensor> {
    candle_core::safetensors::load(
        fixtures().join(format!("refs/{name}.safetensors")),
        &Device::Cpu,
    )
    .unwrap()
}

fn engine(name: &str, vram: VramMode) -> Engine {
    let w = load(&fixtures().join(name), &LoadOptions::default()).unwrap();
    let mut e = Engine::new(w, name, Device::Cpu, DType::F32, vram).unwrap();
    e.limits.max_size = 256;
    e
}

/// The reference image quantised to 8 bits as the engine's output is, back as a tensor.
fn quantised(reference: &Tensor) -> Tensor {
    let img = tensor_to_images(reference).unwrap();
    image_to_tensor(&img[0], &Device::Cpu, DType::F32).unwrap()
}

fn reference_request() -> Request {
    Request {
        prompt: "a photo of an astronaut riding a horse".into(),
        negative_prompt: "blurry, low quality".into(),
        sampler: "Euler".into(),
        steps: 4,
        cfg_scale: 7.0,
        width: 64,
        height: 64,
        ..Default::default()
    }
}

/// Runs the engine and returns its (8-bit) image as a tensor in [-1, 1].
fn run_image(e: &mut Engine, req: &Request, overrides: Overrides) -> Tensor {
    let mut last = None;
    let out = e
        .generate_with(req, overrides, &mut |p| {
            if p.step + 1 == p.total {
                last = Some(());
            }
            Flow::Continue
        })
        .unwrap();
    assert!(last.is_some());
    let img = &out[0].image;
    image_to_tensor(img, &Device::Cpu, DType::F32).unwrap()
}

#[test]
fn txt2img_matches_reference_run_for_every_family() {
    for name in ["sd1", "sd2v", "sdxl"] {
        let r = refs(name);
        let mut e = engine(name, VramMode::High);
        let got = run_image(
            &mut e,
            &reference_request(),
            Overrides {
                initial_noise: Some(r["run.init_noise"].clone()),
                init_latent: None,
            },
        );
        // 8-bit output: compare against the reference image quantised the same way.
        let diff = max_abs_diff(&got, &quantised(&r["run.image"]));
        eprintln!(
            "{name}: txt2img image max abs diff {diff} (one 8-bit level = {})",
            2.0 / 255.0
        );
        assert!(
            diff <= 2.0 / 255.0 + 1e-6,
            "{name}: image differs by {diff}"
        );
    }
}

#[test]
fn img2img_matches_reference_run() {
    let r = refs("sd1");
    let mut e = engine("sd1", VramMode::Low);
    let req = Request {
        strength: 0.5,
        ..reference_request()
    };
    let got = run_image(
        &mut e,
        &req,
        Overrides {
            initial_noise: Some(r["img2img.noise"].clone()),
            init_latent: Some(r["img2img.init_latent"].clone()),
        },
    );
    let diff = max_abs_diff(&got, &quantised(&r["img2img.image"]));
    eprintln!("img2img image max abs diff {diff}");
    assert!(
        diff <= 2.0 / 255.0 + 1e-6,
        "img2img image differs by {diff}"
    );
}

/// img2img on the 9-channel model without a mask against diffusers' inpainting pipeline under
/// an all-white mask (`scripts/make_sd_fixtures.py --inpaint-img2img`).
#[test]
fn img2img_without_a_mask_on_an_inpainting_model_matches_diffusers() {
    let r = refs("sd1-inpaint-img2img");
    let mut e = engine("sd1-inpaint", VramMode::High);
    let req = Request {
        strength: 0.5,
        ..reference_request()
    };
    let got = run_image(
        &mut e,
        &req,
        Overrides {
            initial_noise: Some(r["noise"].clone()),
            init_latent: Some(r["init_latent"].clone()),
        },
    );
    let diff = max_abs_diff(&got, &quantised(&r["image"]));
    eprintln!("inpainting img2img without a mask: image max abs diff {diff}");
    assert!(diff <= 2.0 / 255.0 + 1e-6, "image differs by {diff}");
}

#[test]
fn seeds_are_reproducible_and_batch_image_i_uses_seed_plus_i() {
    let mut e = engine("sd1", VramMode::High);
    let req = Request {
        prompt: "a red cube".into(),
        sampler: "Euler a".into(),
        steps: 3,
        width: 64,
        height: 64,
        seed: 41,
        batch_size: 2,
        ..Default::default()
    };
    let batch = e.generate(&req, &mut |_| Flow::Continue).unwrap();
    assert_eq!(
        batch.iter().map(|g| g.seed).collect::<Vec<_>>(),
        vec![41, 42]
    );
    let alone = e
        .generate(
            &Request {
                seed: 42,
                batch_size: 1,
                ..req.clone()
            },
            &mut |_| Flow::Continue,
        )
        .unwrap();
    // Batched and single convolutions round differently in the last float bits, so allow
    // one 8-bit level.
    let max_diff = alone[0]
        .image
        .as_raw()
        .iter()
        .zip(batch[1].image.as_raw())
        .map(|(a, b)| a.abs_diff(*b))
        .max()
        .unwrap();
    assert!(
        max_diff <= 1,
        "image 1 of the batch equals seed 42 alone (max diff {max_diff})"
    );
    assert_ne!(batch[0].image, batch[1].image);
    let again = e.generate(&req, &mut |_| Flow::Continue).unwrap();
    assert_eq!(again[0].image, batch[0].image, "same seed, same image");
}

fn max_pixel_diff(a: &image::RgbImage, b: &image::RgbImage) -> u8 {
    a.as_raw()
        .iter()
        .zip(b.as_raw())
        .map(|(x, y)| x.abs_diff(*y))
        .max()
        .unwrap()
}

#[test]
fn requests_batched_together_equal_each_alone() {
    for family in ["sd1", "sdxl"] {
        let mut e = engine(family, VramMode::High);
        let a = Request {
            prompt: "a red cube".into(),
            negative_prompt: "blurry".into(),
            sampler: "Euler a".into(),
            steps: 3,
            width: 64,
            height: 64,
            seed: 7,
            batch_size: 2,
            ..Default::default()
        };
        let b = Request {
            prompt: "green sphere".into(),
            negative_prompt: String::new(),
            seed: 1000,
            batch_size: 1,
            ..a.clone()
        };
        // Previews: request b's first image is image 2 of the shared batch.
        let mut batch_preview = None;
        let together = e
            .generate_batch(&[a.clone(), b.clone()], &mut |p| {
                batch_preview = Some(p.preview_of(2).unwrap());
                Flow::Continue
            })
            .unwrap();
        assert_eq!(together.len(), 2);
        assert_eq!(together[0].len(), 2);
        assert_eq!(together[1].len(), 1);
        assert_eq!(together[1][0].seed, 1000);
        assert!(together[1][0].infotext.starts_with("green sphere"));
        let alone_a = e.generate(&a, &mut |_| Flow::Continue).unwrap();
        let mut alone_preview = None;
        let alone_b = e
            .generate(&b, &mut |p| {
                alone_preview = Some(p.preview().unwrap());
                Flow::Continue
            })
            .unwrap();
        let d = max_pixel_diff(&batch_preview.unwrap(), &alone_preview.unwrap());
        assert!(
            d <= 1,
            "{family}: b's preview in the batch differs by {d} levels"
        );
        for (t, s) in together[0].iter().zip(&alone_a) {
            let d = max_pixel_diff(&t.image, &s.image);
            assert!(d <= 1, "{family}: batched image differs by {d} levels");
        }
        let d = max_pixel_diff(&together[1][0].image, &alone_b[0].image);
        assert!(
            d <= 1,
            "{family}: second request batched differs by {d} levels"
        );
        // A prompt longer than one 77-token chunk would need the others padded: not batched.
        let long = Request {
            prompt: vec!["green sphere"; 50].join(", "),
            ..b.clone()
        };
        assert!(!e.can_batch(&a, &long));
        assert!(e.can_batch(&a, &b));
        // Requests that cannot share a batch are refused, naming the problem.
        let other = Request {
            steps: 4,
            ..a.clone()
        };
        let err = e
            .generate_batch(&[a.clone(), other], &mut |_| Flow::Continue)
            .unwrap_err()
            .to_string();
        assert!(err.contains("cannot share a batch"), "{err}");
    }
}

#[test]
fn bad_requests_are_refused_with_a_clear_error() {
    let mut e = engine("sd1", VramMode::High);
    let ok = Request {
        prompt: "x".into(),
        width: 64,
        height: 64,
        steps: 2,
        ..Default::default()
    };
    let cases: Vec<(Request, &str)> = vec![
        (
            Request {
                sampler: "Eulr".into(),
                ..ok.clone()
            },
            "unknown sampler",
        ),
        (
            Request {
                width: 60,
                ..ok.clone()
            },
            "multiple of 8",
        ),
        (
            Request {
                steps: 0,
                ..ok.clone()
            },
            "steps must be between 1 and 150, got 0",
        ),
        (
            Request {
                steps: 1000,
                ..ok.clone()
            },
            "steps must be between 1 and 150, got 1000",
        ),
        (
            Request {
                width: 4096,
                ..ok.clone()
            },
            "limit",
        ),
        (
            Request {
                batch_size: 0,
                ..ok.clone()
            },
            "batch_size must be between 1 and 8, got 0",
        ),
        (
            Request {
                prompt: "() [] BREAK".into(),
                ..ok.clone()
            },
            "tokenizes to nothing",
        ),
        (
            Request {
                cfg_scale: f64::NAN,
                ..ok.clone()
            },
            "cfg_scale",
        ),
    ];
    for (req, want) in cases {
        match e.generate(&req, &mut |_| Flow::Continue) {
            Ok(_) => panic!("request expected to fail with {want:?} succeeded"),
            Err(err) => assert!(err.to_string().contains(want), "expected {want:?} in {err}"),
        }
    }
}

#[test]
fn interrupt_stops_the_run_and_preview_is_available() {
    let mut e = engine("sd1", VramMode::High);
    let req = Request {
        prompt: "x".into(),
        width: 64,
        height: 64,
        steps: 5,
        ..Default::default()
    };
    let mut seen = 0;
    let err = e
        .generate(&req, &mut |p| {
            let preview = p.preview().unwrap();
            assert_eq!(preview.dimensions(), (8, 8));
            seen += 1;
            if p.step == 1 {
                Flow::Stop
            } else {
                Flow::Continue
            }
        })
        .unwrap_err();
    assert!(err.to_string().contains("interrupted"), "{err}");
    assert_eq!(seen, 2);
}

#[test]
fn infotext_is_a1111_layout_and_round_trips_through_png() {
    let mut e = engine("sd1", VramMode::High);
    let req = Request {
        prompt: "a cat, (masterpiece:1.2)".into(),
        negative_prompt: "blurry".into(),
        sampler: "DPM++ 2M Karras".into(),
        steps: 2,
        width: 64,
        height: 64,
        seed: 7,
        clip_skip: 2,
        ..Default::default()
    };
    let out = e.generate(&req, &mut |_| Flow::Continue).unwrap();
    let text = &out[0].infotext;
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines[0], "a cat, (masterpiece:1.2)");
    assert_eq!(lines[1], "Negative prompt: blurry");
    assert!(lines[2].starts_with("Steps: 2, Sampler: DPM++ 2M, Schedule type: Karras, CFG scale: 7, Seed: 7, Size: 64x64, Model: sd1"), "{}", lines[2]);
    assert!(lines[2].contains("Clip skip: 2"));
    let png = encode_png(&out[0].image, Some(text)).unwrap();
    assert_eq!(
        read_png_parameters(&png).unwrap().as_deref(),
        Some(text.as_str())
    );
}

#[test]
fn inpainting_keeps_unmasked_pixels_on_plain_and_9_channel_models() {
    for name in ["sd1", "sd1-inpaint"] {
        let mut e = engine(name, VramMode::High);
        let init = image::RgbImage::from_fn(64, 64, |x, y| {
            image::Rgb([(x * 4) as u8, (y * 4) as u8, 128])
        });
        let mask =
            image::GrayImage::from_fn(64, 64, |x, _| image::Luma([if x >= 32 { 255 } else { 0 }]));
        let req = Request {
            prompt: "x".into(),
            width: 64,
            height: 64,
            steps: 3,
            init_image: Some(image::DynamicImage::ImageRgb8(init.clone())),
            mask: Some(mask),
            mask_blur: 0,
            strength: 1.0,
            ..Default::default()
        };
        let out = e.generate(&req, &mut |_| Flow::Continue).unwrap();
        let img = &out[0].image;
        for y in 0..64 {
            for x in 0..16 {
                assert_eq!(
                    img.get_pixel(x, y),
                    init.get_pixel(x, y),
                    "{name}: kept pixel ({x},{y})"
                );
            }
        }
        let changed = (40..64)
            .flat_map(|x| (0..64).map(move |y| (x, y)))
            .filter(|&(x, y)| img.get_pixel(x, y) != init.get_pixel(x, y))
            .count();
        assert!(
            changed > 100,
            "{name}: masked area repainted ({changed} px changed)"
        );
    }
}

/// img2img on a 9-channel inpainting model without a mask repaints the whole image, as A1111
/// does (it failed with "in_channel mismatch" before): the conditioning is an all-white mask
/// over an all-zero masked image, which an explicit all-white mask gives too.
#[test]
fn img2img_on_an_inpainting_model_without_a_mask_repaints_everything() {
    let mut e = engine("sd1-inpaint", VramMode::High);
    let init = image::RgbImage::from_fn(64, 64, |x, y| {
        image::Rgb([(x * 4) as u8, (y * 4) as u8, 128])
    });
    let req = Request {
        prompt: "x".into(),
        width: 64,
        height: 64,
        steps: 4,
        seed: 9,
        init_image: Some(image::DynamicImage::ImageRgb8(init.clone())),
        strength: 0.6,
        ..Default::default()
    };
    let out = e.generate(&req, &mut |_| Flow::Continue).unwrap();
    let changed = out[0]
        .image
        .pixels()
        .zip(init.pixels())
        .filter(|(a, b)| a != b)
        .count();
    assert!(
        changed > 64 * 64 / 2,
        "the image was repainted ({changed} px changed)"
    );
    // The same as an explicit all-white mask, whose blending then keeps nothing of the init
    // latent (conditioning images differ only in how "to be painted" is written: 0 here, the
    // masked branch's grey 128 there).
    let white = Request {
        mask: Some(image::GrayImage::from_pixel(64, 64, image::Luma([255]))),
        mask_blur: 0,
        ..req.clone()
    };
    let masked = e.generate(&white, &mut |_| Flow::Continue).unwrap();
    let max = out[0]
        .image
        .as_raw()
        .iter()
        .zip(masked[0].image.as_raw())
        .map(|(a, b)| a.abs_diff(*b))
        .max()
        .unwrap();
    assert!(
        max <= 2,
        "no mask vs an all-white mask differ by {max} levels"
    );
}

#[test]
fn half_precision_runs_stay_close_to_fp32() {
    let req = Request {
        prompt: "a photo of an astronaut riding a horse".into(),
        sampler: "Euler".into(),
        steps: 4,
        width: 64,
        height: 64,
        seed: 9,
        ..Default::default()
    };
    let run = |dtype: DType| {
        let w = load(&fixtures().join("sd1"), &LoadOptions::default()).unwrap();
        let mut e = Engine::new(w, "sd1", Device::Cpu, dtype, VramMode::High).unwrap();
        e.generate(&req, &mut |_| Flow::Continue)
            .unwrap()
            .remove(0)
            .image
    };
    let full = run(DType::F32);
    // bf16 has no CPU matmul in candle: it is a GPU-only precision (the CLI says so).
    let dtype = DType::F16;
    {
        let half = run(dtype);
        let diffs: Vec<u8> = full
            .as_raw()
            .iter()
            .zip(half.as_raw())
            .map(|(a, b)| a.abs_diff(*b))
            .collect();
        let mean = diffs.iter().map(|&d| d as f64).sum::<f64>() / diffs.len() as f64;
        eprintln!(
            "{dtype:?}: mean abs diff {mean:.2} levels, max {}",
            diffs.iter().max().unwrap()
        );
        assert!(
            mean < 6.0,
            "{dtype:?} drifts from fp32 by {mean} levels on average"
        );
    }
}

#[test]
fn latent_upscale_matches_torch_in_every_a1111_mode() {
    use sdkube_pipeline::latent_upscale::{upscale_latent, LatentMode};
    let r = refs("latent_upscale");
    for mode in LatentMode::ALL {
        assert_eq!(LatentMode::parse(mode.name()), Some(mode));
        for (h, w) in [(12, 9), (10, 14), (3, 4)] {
            let key = format!("{}.{h}x{w}", mode.name());
            let out = upscale_latent(&r["input"], h, w, mode).unwrap();
            assert_eq!(out.dims(), r[&key].dims());
            let d = max_abs_diff(&out, &r[&key]);
            assert!(d < 1e-5, "{key}: max diff {d}");
        }
    }
    assert_eq!(LatentMode::parse("Latent (lanczos)"), None);
}

/// An engine that keeps its networks built (`--vram high`) reports the weights they were built
/// from, in its dtype, and keeps no second copy in the file's dtype (on a GPU, the host copy of
/// the whole model); `--vram low` builds from the stored weights each time, so keeps them.
#[test]
fn a_resident_engine_keeps_one_copy_of_its_weights() {
    let stored = load(&fixtures().join("sd1"), &LoadOptions::default()).unwrap();
    let stored_dtype = stored.unet.tensors.values().next().unwrap().dtype();
    assert_ne!(
        stored_dtype,
        DType::F32,
        "the fixture is stored in half precision"
    );
    let dtypes = |e: &Engine| {
        let w = e.weights();
        let mut all = std::collections::HashSet::new();
        for map in [&w.unet.tensors, &w.text_encoder.tensors] {
            all.extend(
                map.values()
                    .filter(|t| t.dtype().is_float())
                    .map(|t| t.dtype()),
            );
        }
        all
    };
    let mut high = engine("sd1", VramMode::High);
    assert_eq!(
        dtypes(&high),
        [DType::F32].into(),
        "the built networks' weights"
    );
    let mut low = engine("sd1", VramMode::Low);
    assert_eq!(dtypes(&low), [stored_dtype].into(), "the stored weights");
    // Both generate the same image from them.
    let req = Request {
        prompt: "a lighthouse".into(),
        steps: 2,
        width: 64,
        height: 64,
        ..Request::default()
    };
    let a = high.generate(&req, &mut |_| Flow::Continue).unwrap();
    let b = low.generate(&req, &mut |_| Flow::Continue).unwrap();
    assert_eq!(a[0].image.as_raw(), b[0].image.as_raw());
}
