//! Step caching through the whole pipeline: the fixtures' 4-step A1111 Euler runs with their
//! UNet under DeepCache's helper (`scripts/make_step_cache_fixtures.py`), the infotext, and
//! the errors of a bad setting.

use std::collections::HashMap;

use candle_core::{DType, Device, Tensor};
use sdkube_models::unet::StepCaching;
use sdkube_models::{load, LoadOptions};
use sdkube_pipeline::sampler::Flow;
use sdkube_pipeline::{Engine, Generated, Overrides, Refiner, Request, VramMode};
use sdkube_testkit::max_abs_diff;

fn fixtures() -> std::path::PathBuf {
    sdkube_testkit::fixtures().join("sd")
}

fn refs(name: &str) -> HashMap<String, Tensor> {
    candle_core::safetensors::load(
        fixtures().join(format!("refs/{name}.safetensors")),
        &Device::Cpu,
    )
    .unwrap()
}

fn engine(family: &str) -> Engine {
    let w = load(&fixtures().join(family), &LoadOptions::default()).unwrap();
    Engine::new(w, family, Device::Cpu, DType::F32, VramMode::High).unwrap()
}

/// The fixtures' reference request (`make_sd_fixtures.py`'s run).
fn request(step_caching: StepCaching) -> Request {
    Request {
        prompt: "a photo of an astronaut riding a horse".into(),
        negative_prompt: "blurry, low quality".into(),
        sampler: "Euler".into(),
        steps: 4,
        cfg_scale: 7.0,
        width: 64,
        height: 64,
        step_caching,
        ..Default::default()
    }
}

fn run(e: &mut Engine, family: &str, step_caching: StepCaching) -> Generated {
    let overrides = Overrides {
        initial_noise: Some(refs(family)["run.init_noise"].clone()),
        init_latent: None,
    };
    e.generate_with(&request(step_caching), overrides, &mut |_| Flow::Continue)
        .unwrap()
        .remove(0)
}

#[test]
fn a_cached_run_matches_deepcache_and_says_so_in_its_infotext() {
    let cached = refs("step_cache");
    for (family, branch, interval) in [("sd1", 1, 2), ("sdxl", 2, 3)] {
        let mut e = engine(family);
        let caching = StepCaching { interval, branch };
        let got = run(&mut e, family, caching);
        let want = &cached[&format!("run.{family}.latent")];
        let scale = max_abs_diff(want, &want.zeros_like().unwrap());
        let d = max_abs_diff(&got.latent, want);
        eprintln!("{family}: latent differs from DeepCache's run by {d:e} (values up to {scale})");
        assert!(d <= 1e-5 * scale, "{family}: {d}");

        let plain = run(&mut e, family, StepCaching::OFF);
        let apart = max_abs_diff(&plain.latent, want);
        assert!(
            apart > 1e-3 * scale,
            "{family}: caching changed nothing ({apart})"
        );
        assert!(
            got.infotext.contains(&format!(
                "Step cache interval: {interval}, Step cache branch: {branch}"
            )),
            "{}",
            got.infotext
        );
        assert!(!plain.infotext.contains("Step cache"), "{}", plain.infotext);
    }
}

#[test]
fn a_bad_step_cache_setting_is_refused_naming_it() {
    let mut e = engine("sdxl");
    let cases = [
        (
            StepCaching {
                interval: 2,
                branch: 9,
            },
            "step cache branch 9: this model's UNet has branches 0 to 8",
        ),
        (
            StepCaching {
                interval: 0,
                branch: 0,
            },
            "step cache interval",
        ),
    ];
    for (caching, message) in cases {
        let err = e
            .generate_with(&request(caching), Overrides::default(), &mut |_| {
                Flow::Continue
            })
            .unwrap_err()
            .to_string();
        assert!(err.contains(message), "{err}");
    }
    // The engine still serves after refusing.
    run(&mut e, "sdxl", StepCaching::OFF);
}

/// A refiner taking over a step-cached run gets no features of the base UNet: its first call
/// runs whole. The run differs from the uncached one and records both.
#[test]
fn a_refiner_takes_over_a_cached_run() {
    let mut e = engine("sdxl");
    e.set_refiner(Some(engine("sdxl-refiner"))).unwrap();
    let caching = StepCaching {
        interval: 2,
        branch: 3,
    };
    let refined = |e: &mut Engine, step_caching: StepCaching| {
        let req = Request {
            refiner: Some(Refiner {
                checkpoint: "sdxl-refiner".into(),
                switch_at: 0.5,
            }),
            steps: 6,
            ..request(step_caching)
        };
        let overrides = Overrides {
            initial_noise: Some(refs("sdxl")["run.init_noise"].clone()),
            init_latent: None,
        };
        e.generate_with(&req, overrides, &mut |_| Flow::Continue)
            .unwrap()
            .remove(0)
    };
    let cached = refined(&mut e, caching);
    let plain = refined(&mut e, StepCaching::OFF);
    assert!(max_abs_diff(&cached.latent, &plain.latent) > 1e-3);
    for want in [
        "Refiner: sdxl-refiner",
        "Step cache interval: 2, Step cache branch: 3",
    ] {
        assert!(cached.infotext.contains(want), "{}", cached.infotext);
    }
}
