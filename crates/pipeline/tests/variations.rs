//! A1111's variations (subseed, subseed strength, seed resize): the starting noise against
//! A1111's formula on torch's draws (`scripts/make_variation_fixture.py` →
//! `fixtures/samplers/variations.safetensors`), and the engine's use of it on the tiny SD1
//! fixture (seeds, infotext, batches).

use std::collections::HashMap;

use candle_core::{DType, Device, Tensor};
use sdkube_models::{load, LoadOptions};
use sdkube_pipeline::sampler::Flow;
use sdkube_pipeline::variation::{initial_noise, request_noise, Variation};
use sdkube_pipeline::{Engine, Infotext, Overrides, Request, VramMode};
use sdkube_testkit::max_abs_diff;

fn go(_: &sdkube_pipeline::Progress) -> Flow {
    Flow::Continue
}

#[test]
fn starting_noise_equals_a1111s_formula_on_the_same_draws() {
    let path = sdkube_testkit::fixtures().join("samplers/variations.safetensors");
    let t: HashMap<String, Tensor> = candle_core::safetensors::load(path, &Device::Cpu).unwrap();
    let mut names: Vec<&str> = t.keys().filter_map(|k| k.strip_suffix(".params")).collect();
    names.sort();
    assert_eq!(names.len(), 8);
    for name in names {
        let get = |what: &str| t.get(&format!("{name}.{what}")).cloned();
        let p = get("params").unwrap().to_vec1::<f64>().unwrap();
        let (seed, subseed, strength) = (p[0] as u64, p[1] as u64, p[2]);
        let (rw, rh) = (p[3] as usize, p[4] as usize);
        let v = Variation {
            subseed,
            strength,
            resize_from: (rw > 0).then_some((rw, rh)),
        };
        let full = get("full").unwrap().unsqueeze(0).unwrap();
        // The formula's fresh draws are torch's, looked up by seed and shape.
        let mut fresh = |s: u64, dims: &[usize]| {
            let key = if s == subseed && strength != 0.0 && s != seed {
                "sub_noise"
            } else if s == seed && dims != full.dims() {
                "seed_noise"
            } else if s == seed && strength != 0.0 {
                "sub_noise" // seed == subseed: the same draw
            } else {
                panic!("{name}: unexpected draw of seed {s} {dims:?}")
            };
            let n = get(key).unwrap_or_else(|| panic!("{name}: no {key}"));
            assert_eq!(&n.unsqueeze(0).unwrap().dims(), &dims, "{name} {key}");
            Ok(n.unsqueeze(0).unwrap())
        };
        let ours = initial_noise(&full, seed, &v, &mut fresh).unwrap();
        let expected = get("expected").unwrap().unsqueeze(0).unwrap();
        let diff = max_abs_diff(&ours, &expected);
        eprintln!("{name}: max |ours − A1111| = {diff:e}");
        assert!(diff < 1e-6, "{name}: max |ours − A1111| = {diff}");
        if name == "resize_same" {
            assert_eq!(max_abs_diff(&ours, &full), 0.0, "same size: no resize");
        }
    }
}

fn engine() -> Engine {
    let dir = sdkube_testkit::fixtures().join("sd").join("sd1");
    let w = load(&dir, &LoadOptions::default()).unwrap();
    Engine::new(w, "sd1", Device::Cpu, DType::F32, VramMode::High).unwrap()
}

fn base() -> Request {
    Request {
        prompt: "a tree on a hill".into(),
        sampler: "Euler".into(),
        steps: 3,
        width: 64,
        height: 64,
        seed: 100,
        ..Default::default()
    }
}

#[test]
fn the_engine_starts_from_the_variation_noise() {
    let mut e = engine();
    let req = Request {
        subseed: 7,
        subseed_strength: 0.4,
        seed_resize_from: Some((96, 48)),
        batch_size: 2,
        ..base()
    };
    let out = e.generate(&req, &mut go).unwrap();
    // The same request with its starting noise given from variation::request_noise.
    let given = Overrides {
        initial_noise: Some(request_noise(&req, 4).unwrap()),
        ..Overrides::default()
    };
    let same = e.generate_with(&req, given, &mut go).unwrap();
    for (a, b) in out.iter().zip(&same) {
        assert_eq!(a.image, b.image);
    }
    // A1111's batch: one seed for all, variation seeds counting up.
    assert_eq!((out[0].seed, out[1].seed), (100, 100));
    assert_eq!((out[0].subseed, out[1].subseed), (7, 8));
    assert_ne!(out[0].image, out[1].image);
    let info = Infotext::parse(&out[1].infotext);
    for (k, v) in [
        ("Seed", "100"),
        ("Variation seed", "8"),
        ("Variation seed strength", "0.4"),
        ("Seed resize from", "96x48"),
    ] {
        assert_eq!(info.get(k), Some(v), "{k} in {}", out[1].infotext);
    }
    let keys: Vec<&str> = info.fields.iter().map(|(k, _)| k.as_str()).collect();
    let at = |k: &str| keys.iter().position(|x| *x == k).unwrap();
    assert!(at("Model") < at("Variation seed") && at("Seed resize from") < at("Version"));

    // The variation noise really moved: far from the seed's own noise, and about
    // strength-wise between the seed's and the subseed's.
    let plain = request_noise(&base(), 4).unwrap();
    let varied = request_noise(
        &Request {
            seed_resize_from: None,
            ..req.clone()
        },
        4,
    )
    .unwrap();
    let sub = request_noise(&Request { seed: 7, ..base() }, 4).unwrap();
    let (d_seed, d_sub) = (
        max_abs_diff(&varied.narrow(0, 0, 1).unwrap(), &plain),
        max_abs_diff(&varied.narrow(0, 0, 1).unwrap(), &sub),
    );
    assert!(d_seed > 0.1 && d_seed < d_sub, "{d_seed} {d_sub}");
}

#[test]
fn full_strength_is_the_variation_seeds_image_and_resize_to_the_same_size_changes_nothing() {
    let mut e = engine();
    // Euler draws no noise after the first: strength 1 gives the image of seed 7 itself.
    let full = Request {
        subseed: 7,
        subseed_strength: 1.0,
        ..base()
    };
    let a = e.generate(&full, &mut go).unwrap().remove(0);
    let b = e
        .generate(&Request { seed: 7, ..base() }, &mut go)
        .unwrap()
        .remove(0);
    assert_eq!(a.image, b.image);
    // Resizing "from" the real size is no resize.
    let same = Request {
        seed_resize_from: Some((64, 64)),
        ..base()
    };
    let c = e.generate(&same, &mut go).unwrap().remove(0);
    let d = e.generate(&base(), &mut go).unwrap().remove(0);
    assert_eq!(c.image, d.image);
    assert!(c.infotext.contains("Seed resize from: 64x64"));
    assert!(!d.infotext.contains("Variation seed"));
}

#[test]
fn batch_count_continues_variation_seeds_and_bad_values_are_refused() {
    let req = Request {
        subseed: 50,
        subseed_strength: 0.2,
        batch_size: 3,
        ..base()
    };
    let third = req.iteration(2);
    assert_eq!((third.seed, third.subseed), (100, 56));
    let plain = base().iteration(2);
    assert_eq!((plain.seed, plain.subseed), (102, 0));

    let e = engine();
    for (bad, want) in [
        (
            Request {
                subseed_strength: 1.5,
                ..base()
            },
            "subseed_strength",
        ),
        (
            Request {
                seed_resize_from: Some((4, 64)),
                ..base()
            },
            "seed_resize_from",
        ),
    ] {
        let err = e.validate(&bad).unwrap_err().to_string();
        assert!(err.contains(want), "{err}");
    }
}
