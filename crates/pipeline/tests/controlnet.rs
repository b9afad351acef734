//! ControlNet units in the engine against whole reference runs
//! (`scripts/make_controlnet_fixtures.py`: the 4-step A1111 "Euler" run of the sd1 fixture with
//! diffusers' ControlNet steering it by sd-webui-controlnet's rules), and the engine's checks.

use std::collections::HashMap;
use std::path::PathBuf;

use candle_core::{DType, Device, Tensor};
use image::RgbImage;
use sdkube_models::{load, LoadOptions};
use sdkube_pipeline::control::{ControlMode, ControlNetLibrary, ControlUnit, ResizeMode};
use sdkube_pipeline::sampler::Flow;
use sdkube_pipeline::{Engine, Overrides, Request, VramMode};
use sdkube_testkit::max_abs_diff;

fn fixtures() -> PathBuf {
    sdkube_testkit::fixtures()
}

fn refs(path: &str) -> HashMap<String, Tensor> {
    candle_core::safetensors::load(fixtures().join(path), &Device::Cpu).unwrap()
}

fn engine(name: &str, vram: VramMode) -> Engine {
    let w = load(&fixtures().join("sd").join(name), &LoadOptions::default()).unwrap();
    let mut e = Engine::new(w, name, Device::Cpu, DType::F32, vram).unwrap();
    e.set_controlnets(ControlNetLibrary::new(vec![fixtures().join("controlnet")]));
    e
}

/// The reference request of the sd1 fixture's run (`fixtures/sd/refs/sd1.json`).
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

/// The control image the references were made with (`hint`, values k/255).
fn hint_image(r: &HashMap<String, Tensor>) -> RgbImage {
    let hint = r["hint"].squeeze(0).unwrap();
    let (c, h, w) = hint.dims3().unwrap();
    assert_eq!(c, 3);
    let v: Vec<f32> = hint
        .permute((1, 2, 0))
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap();
    RgbImage::from_raw(
        w as u32,
        h as u32,
        v.iter().map(|x| (x * 255.0).round() as u8).collect(),
    )
    .unwrap()
}

/// The final latent of `req` from the starting noise of the engine's fixture run
/// (`fixtures/sd/refs/<model>.safetensors`).
fn final_latent(e: &mut Engine, req: &Request) -> Tensor {
    let noise = refs(&format!("sd/refs/{}.safetensors", e.model_name()))["run.init_noise"].clone();
    let out = e
        .generate_with(
            req,
            Overrides {
                initial_noise: Some(noise),
                init_latent: None,
            },
            &mut |_| Flow::Continue,
        )
        .unwrap();
    out[0].latent.clone()
}

#[test]
fn controlled_runs_match_the_reference() {
    let r = refs("controlnet/refs/sd1-run.safetensors");
    let hint = hint_image(&r);
    let cases = [
        ("balanced", 0.7, 0.0, 1.0, ControlMode::Balanced),
        ("window", 1.0, 0.25, 0.5, ControlMode::PromptMoreImportant),
        (
            "control",
            0.9,
            0.0,
            1.0,
            ControlMode::ControlNetMoreImportant,
        ),
    ];
    for vram in [VramMode::High, VramMode::Low] {
        let mut e = engine("sd1", vram);
        for (name, weight, start, end, mode) in cases {
            let req = Request {
                control: vec![ControlUnit {
                    weight,
                    guidance_start: start,
                    guidance_end: end,
                    mode,
                    ..ControlUnit::new("sd1", hint.clone())
                }],
                ..reference_request()
            };
            let got = final_latent(&mut e, &req);
            let want = &r[&format!("{name}.latent")];
            let d = max_abs_diff(&got, want);
            let scale = max_abs_diff(want, &want.zeros_like().unwrap());
            eprintln!("{name} ({vram:?}): final latent max abs diff {d:e} (values up to {scale})");
            assert!(d <= 1e-4 * scale.max(1.0), "{name}: latent differs by {d}");
        }
    }
}

#[test]
fn two_units_add_and_a_zero_weight_unit_changes_nothing() {
    let r = refs("controlnet/refs/sd1-run.safetensors");
    let hint = hint_image(&r);
    let mut e = engine("sd1", VramMode::High);
    let plain = final_latent(&mut e, &reference_request());
    let unit = |weight| ControlUnit {
        weight,
        ..ControlUnit::new("sd1", hint.clone())
    };
    let off = final_latent(
        &mut e,
        &Request {
            control: vec![unit(0.0)],
            ..reference_request()
        },
    );
    assert!(max_abs_diff(&plain, &off) < 1e-5);
    // 0.35 + 0.35 is the balanced 0.7 case: residuals are linear in the weight.
    let two = final_latent(
        &mut e,
        &Request {
            control: vec![unit(0.35), unit(0.35)],
            ..reference_request()
        },
    );
    let d = max_abs_diff(&two, &r["balanced.latent"]);
    assert!(d < 1e-3, "two half units differ from one by {d}");
}

#[test]
fn bad_units_are_refused_naming_the_problem() {
    let hint = RgbImage::new(64, 64);
    let mut e = engine("sd1", VramMode::High);
    let run = |e: &mut Engine, unit: ControlUnit| {
        e.generate(
            &Request {
                control: vec![unit],
                ..reference_request()
            },
            &mut |_| Flow::Continue,
        )
        .unwrap_err()
        .to_string()
    };
    let err = run(
        &mut e,
        ControlUnit::new("control_v11p_sd15_canny", hint.clone()),
    );
    assert!(err.contains("unknown ControlNet model"), "{err}");
    assert!(err.contains("sd1 ["), "lists the known ones: {err}");
    let err = run(&mut e, ControlUnit::new("sdxl", hint.clone()));
    assert!(err.contains("is for SDXL") && err.contains("SD"), "{err}");
    let err = run(
        &mut e,
        ControlUnit {
            guidance_start: 0.8,
            guidance_end: 0.2,
            ..ControlUnit::new("sd1", hint.clone())
        },
    );
    assert!(err.contains("guidance_start"), "{err}");
    let err = run(
        &mut e,
        ControlUnit {
            weight: 3.0,
            ..ControlUnit::new("sd1", hint)
        },
    );
    assert!(err.contains("weight"), "{err}");
}

#[test]
fn units_name_models_with_or_without_their_hash() {
    let lib = ControlNetLibrary::new(vec![fixtures().join("controlnet")]);
    let sd1 = lib.find("sd1").unwrap();
    assert_eq!(lib.find(&sd1.title()).unwrap(), sd1);
    assert_eq!(sd1.hash.len(), 8);
    let names: Vec<&str> = lib.entries().iter().map(|e| e.name.as_str()).collect();
    assert_eq!(names, ["sd1", "sd1-ldm", "sdxl"]);
}

#[test]
fn guidance_window_and_soft_weights_follow_the_extension() {
    let unit = ControlUnit {
        guidance_start: 0.25,
        guidance_end: 0.5,
        ..ControlUnit::new("x", RgbImage::new(8, 8))
    };
    let acts: Vec<bool> = (0..4).map(|i| unit.acts_at(i, 4)).collect();
    assert_eq!(acts, [false, true, true, false]);
    let soft = ControlUnit {
        weight: 2.0,
        mode: ControlMode::PromptMoreImportant,
        ..unit.clone()
    };
    let s = soft.scales(13);
    assert!((s[12] - 2.0).abs() < 1e-12 && (s[0] - 2.0 * 0.825f64.powi(12)).abs() < 1e-12);
    assert_eq!(
        ControlMode::parse("2").unwrap(),
        ControlMode::ControlNetMoreImportant
    );
    assert!(ControlMode::parse("Strong").is_err());
}

#[test]
fn resize_modes_fit_the_image_as_named() {
    // A 2:1 image of a white left half onto a square.
    let img = RgbImage::from_fn(128, 64, |x, _| {
        if x < 64 {
            image::Rgb([255, 255, 255])
        } else {
            image::Rgb([0, 0, 0])
        }
    });
    let unit = |mode| ControlUnit {
        resize_mode: mode,
        ..ControlUnit::new("x", img.clone())
    };
    let just = unit(ResizeMode::Resize).fitted(64, 64);
    let crop = unit(ResizeMode::CropAndResize).fitted(64, 64);
    let fill = unit(ResizeMode::ResizeAndFill).fitted(64, 64);
    for i in [&just, &crop, &fill] {
        assert_eq!(i.dimensions(), (64, 64));
    }
    // Stretched: left half white. Cropped: the middle, so white then black at the centre.
    // Filled: 64×32 in the middle, bands above and below in the border's median colour
    // (the border is half white, half black: numpy's median of the two is 127).
    assert_eq!(just.get_pixel(10, 32).0, [255; 3]);
    assert_eq!(crop.get_pixel(10, 32).0, [255; 3]);
    assert_eq!(crop.get_pixel(54, 32).0, [0; 3]);
    assert_eq!(fill.get_pixel(10, 2).0, [127; 3]);
    assert_eq!(fill.get_pixel(10, 32).0, [255; 3]);
}

#[test]
fn an_inpainting_unit_hides_the_masked_pixels() {
    let r = refs("controlnet/refs/sd1-run.safetensors");
    let hint = hint_image(&r);
    let mut e = engine("sd1", VramMode::High);
    let with_mask = |e: &mut Engine, mask: Option<image::GrayImage>| {
        final_latent(
            e,
            &Request {
                control: vec![ControlUnit {
                    mask,
                    ..ControlUnit::new("sd1", hint.clone())
                }],
                ..reference_request()
            },
        )
    };
    let none = with_mask(&mut e, None);
    let empty = with_mask(&mut e, Some(image::GrayImage::new(64, 64)));
    assert!(
        max_abs_diff(&none, &empty) < 1e-5,
        "an empty mask changes nothing"
    );
    let half =
        image::GrayImage::from_fn(64, 64, |x, _| image::Luma([if x < 32 { 255 } else { 0 }]));
    let masked = with_mask(&mut e, Some(half));
    assert!(
        max_abs_diff(&none, &masked) > 0.01,
        "masked pixels reach the ControlNet as -1"
    );
}

#[test]
fn the_hires_fix_pass_is_steered_too_with_the_image_fitted_to_its_size() {
    use sdkube_pipeline::HiresFix;
    let r = refs("controlnet/refs/sd1-run.safetensors");
    let mut e = engine("sd1", VramMode::High);
    let req = Request {
        control: vec![ControlUnit::new("sd1", hint_image(&r))],
        ..reference_request()
    };
    let first = e.generate(&req, &mut |_| Flow::Continue).unwrap().remove(0);
    let hires = HiresFix::scaled(&req, 1.5, "Latent", 2, 0.6).unwrap();
    let mut none =
        |_: &str, _: &image::DynamicImage, _: f32| -> Result<image::DynamicImage, String> {
            unreachable!("a latent upscale runs no image upscaler")
        };
    let mut go = |_: &sdkube_pipeline::Progress| Flow::Continue;
    let steered = e
        .hires_fix(&req, &first, &hires, &mut none, &mut go)
        .unwrap();
    let plain_req = Request {
        control: Vec::new(),
        ..req.clone()
    };
    let plain = e
        .hires_fix(&plain_req, &first, &hires, &mut none, &mut go)
        .unwrap();
    assert_eq!(steered.image.dimensions(), (96, 96));
    assert_ne!(steered.image, plain.image, "the second pass is steered");
}

/// The balanced unit against diffusers' own StableDiffusionControlNetPipeline (its Euler
/// scheduler on the same sigmas, integer timesteps): within what separates the plain runs of
/// the two samplers (`fixtures/sd/refs/sd1.json`: 9.6e-5).
#[test]
fn a_balanced_unit_matches_diffusers_controlnet_pipeline() {
    let r = refs("controlnet/refs/sd1-run.safetensors");
    let mut e = engine("sd1", VramMode::High);
    let req = Request {
        control: vec![ControlUnit {
            weight: 0.7,
            ..ControlUnit::new("sd1", hint_image(&r))
        }],
        ..reference_request()
    };
    let got = final_latent(&mut e, &req);
    let d = max_abs_diff(&got, &r["balanced.diffusers_pipeline.latent"]);
    eprintln!("engine vs StableDiffusionControlNetPipeline: final latent max abs diff {d:e}");
    assert!(d < 5e-4, "latent differs from diffusers' pipeline by {d}");
}

#[test]
fn an_sdxl_controlled_run_matches_the_reference() {
    let r = refs("controlnet/refs/sdxl-run.safetensors");
    let mut e = engine("sdxl", VramMode::High);
    let req = Request {
        control: vec![ControlUnit {
            weight: 0.7,
            ..ControlUnit::new("sdxl", hint_image(&r))
        }],
        ..reference_request()
    };
    let want = &r["balanced.latent"];
    let d = max_abs_diff(&final_latent(&mut e, &req), want);
    let scale = max_abs_diff(want, &want.zeros_like().unwrap());
    eprintln!("sdxl balanced: final latent max abs diff {d:e} (values up to {scale})");
    assert!(d <= 1e-4 * scale.max(1.0), "latent differs by {d}");
}
