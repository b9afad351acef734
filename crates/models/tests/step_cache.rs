//! Step caching against DeepCache's own helper (`DeepCacheSDHelper`, uniform mode) around
//! diffusers' UNet, on the tiny fixtures: references by `scripts/make_step_cache_fixtures.py`.

use std::collections::HashMap;

use candle_core::{DType, Device, Tensor};
use sdkube_models::unet::{AddedConditioning, StepCache, StepCaching, UNet2DConditionModel};
use sdkube_testkit::max_abs_diff;

fn fixtures() -> std::path::PathBuf {
    sdkube_testkit::fixtures().join("sd")
}

fn unet(family: &str) -> UNet2DConditionModel {
    let weights = sdkube_models::load(&fixtures().join(family), &Default::default()).unwrap();
    weights.unet.build(&Device::Cpu, DType::F32).unwrap()
}

struct Case {
    name: String,
    family: String,
    caching: StepCaching,
    timesteps: Vec<f32>,
}

fn cases() -> Vec<Case> {
    let text = std::fs::read_to_string(fixtures().join("refs/step_cache.json")).unwrap();
    let meta: serde_json::Value = serde_json::from_str(&text).unwrap();
    let as_usize = |v: &serde_json::Value| v.as_u64().unwrap() as usize;
    meta["cases"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| Case {
            name: c["name"].as_str().unwrap().into(),
            family: c["family"].as_str().unwrap().into(),
            caching: StepCaching {
                interval: as_usize(&c["interval"]),
                branch: as_usize(&c["branch"]),
            },
            timesteps: c["timesteps"]
                .as_array()
                .unwrap()
                .iter()
                .map(|t| t.as_f64().unwrap() as f32)
                .collect(),
        })
        .collect()
}

/// Every call of every case gives DeepCache's output: the whole UNet's on every
/// `interval`-th call, the shallow branch on the kept features between (which differs from the
/// whole UNet's, so a cache that did nothing would fail here).
#[test]
fn step_caching_matches_deepcache() {
    let refs: HashMap<String, Tensor> = candle_core::safetensors::load(
        fixtures().join("refs/step_cache.safetensors"),
        &Device::Cpu,
    )
    .unwrap();
    let cases = cases();
    assert!(cases.len() >= 8);
    let mut unets = HashMap::new();
    for case in &cases {
        let unet = unets
            .entry(case.family.clone())
            .or_insert_with(|| unet(&case.family));
        let n = &case.name;
        let ctx = &refs[&format!("{n}.ctx")];
        let added = refs
            .get(&format!("{n}.text_embeds"))
            .map(|te| AddedConditioning {
                text_embeds: te.clone(),
                time_ids: refs[&format!("{n}.time_ids")].clone(),
            });
        let mut cache = StepCache::new(case.caching);
        let mut reused = 0;
        for (i, t) in case.timesteps.iter().enumerate() {
            let x = &refs[&format!("{n}.x.{i}")];
            let t = Tensor::new(&[*t], &Device::Cpu).unwrap();
            let got = unet
                .forward_cached(x, &t, ctx, added.as_ref(), None, &mut cache)
                .unwrap();
            let want = &refs[&format!("{n}.out.{i}")];
            let d = max_abs_diff(&got, want);
            assert!(d <= 2e-5, "{n} call {i}: differs from DeepCache by {d}");
            let whole = unet.forward(x, &t, ctx, added.as_ref()).unwrap();
            let shallow = !i.is_multiple_of(case.caching.interval);
            if shallow {
                reused += 1;
                let apart = max_abs_diff(&whole, want);
                assert!(
                    apart > 1e-3,
                    "{n} call {i}: the shallow call is the whole one"
                );
            } else {
                assert!(max_abs_diff(&whole, &got) <= 2e-5, "{n} call {i}");
            }
        }
        assert_eq!(cache.shallow_calls(), reused, "{n}");
    }
}

/// Latents of a size that rounds when halved (7×9) still get their features back in the
/// shape they were kept in; a new size mid-run runs whole; a branch past the deepest skip
/// connection is an error naming it; interval 1 is the plain UNet.
#[test]
fn odd_sizes_new_sizes_and_bad_branches() {
    let dev = Device::Cpu;
    let unet = unet("sdxl");
    let added = AddedConditioning {
        text_embeds: Tensor::randn(0f32, 1., (2, 8), &dev).unwrap(),
        time_ids: Tensor::new(&[[64f32, 64., 0., 0., 64., 64.]; 2], &dev).unwrap(),
    };
    let ctx = Tensor::randn(0f32, 1., (2, 77, 16), &dev).unwrap();
    let t = Tensor::new(&[500f32], &dev).unwrap();
    for branch in 0..=8 {
        let mut cache = StepCache::new(StepCaching {
            interval: 2,
            branch,
        });
        for (h, w) in [(7, 9), (7, 9), (8, 8), (8, 8)] {
            let x = Tensor::randn(0f32, 1., (2, 4, h, w), &dev).unwrap();
            let out = unet
                .forward_cached(&x, &t, &ctx, Some(&added), None, &mut cache)
                .unwrap();
            assert_eq!(out.dims(), x.dims());
        }
        // Calls 1 and 3 reuse; call 2 has a new size and is due anyway.
        assert_eq!(cache.shallow_calls(), 2, "branch {branch}");
    }
    // A new size on a call that would reuse: whole.
    let mut cache = StepCache::new(StepCaching {
        interval: 3,
        branch: 2,
    });
    for (h, w) in [(8, 8), (7, 9)] {
        let x = Tensor::randn(0f32, 1., (2, 4, h, w), &dev).unwrap();
        let got = unet
            .forward_cached(&x, &t, &ctx, Some(&added), None, &mut cache)
            .unwrap();
        let whole = unet.forward(&x, &t, &ctx, Some(&added)).unwrap();
        assert!(max_abs_diff(&got, &whole) <= 2e-5);
    }
    assert_eq!(cache.shallow_calls(), 0);

    let x = Tensor::randn(0f32, 1., (2, 4, 8, 8), &dev).unwrap();
    let mut too_deep = StepCache::new(StepCaching {
        interval: 2,
        branch: 9,
    });
    let err = unet
        .forward_cached(&x, &t, &ctx, Some(&added), None, &mut too_deep)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("branch 9") && err.contains("deepest skip connection (8)"),
        "{err}"
    );

    let mut off = StepCache::new(StepCaching::OFF);
    for _ in 0..3 {
        let got = unet
            .forward_cached(&x, &t, &ctx, Some(&added), None, &mut off)
            .unwrap();
        let whole = unet.forward(&x, &t, &ctx, Some(&added)).unwrap();
        assert_eq!(max_abs_diff(&got, &whole), 0.0);
    }
    assert_eq!(off.shallow_calls(), 0);
}

/// Features the base UNet kept are not the refiner's, even where their shapes agree (branch 3
/// of both SDXL fixtures enters a [2, 16, 4, 4] map): its call that would reuse them runs whole
/// and keeps its own, which its next one reuses.
#[test]
fn features_kept_by_another_unet_are_not_reused() {
    let dev = Device::Cpu;
    let (base, refiner) = (unet("sdxl"), unet("sdxl-refiner"));
    let randn = |shape: (usize, usize, usize)| Tensor::randn(0f32, 1., shape, &dev).unwrap();
    let x = randn((2, 4, 64)).reshape((2, 4, 8, 8)).unwrap();
    let t = Tensor::new(&[500f32], &dev).unwrap();
    let base_added = AddedConditioning {
        text_embeds: randn((1, 2, 8)).squeeze(0).unwrap(),
        time_ids: Tensor::new(&[[64f32, 64., 0., 0., 64., 64.]; 2], &dev).unwrap(),
    };
    let refiner_added = AddedConditioning {
        text_embeds: randn((1, 2, 8)).squeeze(0).unwrap(),
        time_ids: Tensor::new(&[[64f32, 64., 0., 0., 6.]; 2], &dev).unwrap(),
    };
    let (base_ctx, refiner_ctx) = (randn((2, 77, 16)), randn((2, 77, 8)));
    let mut cache = StepCache::new(StepCaching {
        interval: 2,
        branch: 3,
    });
    let refine = |x: &Tensor, cache: &mut StepCache| {
        refiner
            .forward_cached(x, &t, &refiner_ctx, Some(&refiner_added), None, cache)
            .unwrap()
    };
    base.forward_cached(&x, &t, &base_ctx, Some(&base_added), None, &mut cache)
        .unwrap();
    let got = refine(&x, &mut cache); // call 1: would reuse, but the base kept those features
    let whole = refiner
        .forward(&x, &t, &refiner_ctx, Some(&refiner_added))
        .unwrap();
    assert!(max_abs_diff(&got, &whole) <= 2e-5);
    assert_eq!(cache.shallow_calls(), 0);
    refine(&x, &mut cache); // call 2: due anyway
    let next = randn((2, 4, 64)).reshape((2, 4, 8, 8)).unwrap();
    let reused = refine(&next, &mut cache); // call 3: the refiner's own features
    assert_eq!(cache.shallow_calls(), 1);
    let whole = refiner
        .forward(&next, &t, &refiner_ctx, Some(&refiner_added))
        .unwrap();
    assert!(
        max_abs_diff(&reused, &whole) > 1e-4,
        "the shallow call is the whole one"
    );
}
