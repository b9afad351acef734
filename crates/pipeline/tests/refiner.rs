//! The SDXL refiner (A1111's `refiner_checkpoint` / `refiner_switch_at`) against the
//! references of `scripts/make_refiner_fixtures.py`: its conditioning and UNet against
//! diffusers' refiner pipeline, and the SDXL fixture's 4-step run handed to it halfway, against
//! the A1111-rule run and diffusers' `denoising_end` → `denoising_start` pair.

use std::collections::HashMap;
use std::path::PathBuf;

use candle_core::{DType, Device, Tensor};
use sdkube_models::unet::AddedConditioning;
use sdkube_models::{load, Family, LoadOptions, SdWeights};
use sdkube_pipeline::prompt::EmbeddingIndex;
use sdkube_pipeline::sampler::Flow;
use sdkube_pipeline::text::{self, PromptTokens, TextEncoders};
use sdkube_pipeline::tokenizer::ClipTokenizer;
use sdkube_pipeline::{Engine, Generated, Overrides, Refiner, Request, VramMode};
use sdkube_testkit::max_abs_diff;

const PROMPT: &str = "a photo of an astronaut riding a horse";
const NEGATIVE: &str = "blurry, low quality";

fn sd() -> PathBuf {
    sdkube_testkit::fixtures().join("sd")
}

fn refs() -> HashMap<String, Tensor> {
    candle_core::safetensors::load(sd().join("refs/sdxl-refiner.safetensors"), &Device::Cpu)
        .unwrap()
}

fn weights(name: &str) -> SdWeights {
    let opts = LoadOptions {
        // The tiny UNet's head counts cannot be told from a single file's shapes.
        config_dir: name
            .ends_with(".safetensors")
            .then(|| sd().join("sdxl-refiner")),
        ..Default::default()
    };
    load(&sd().join(name), &opts).unwrap()
}

fn engine(name: &str, vram: VramMode) -> Engine {
    Engine::new(weights(name), name, Device::Cpu, DType::F32, vram).unwrap()
}

fn refined(vram: VramMode, refiner: &str) -> Engine {
    let mut base = engine("sdxl", vram);
    base.set_refiner(Some(engine(refiner, vram))).unwrap();
    base
}

/// The reference request, handed to the loaded refiner at `switch_at`.
fn request(switch_at: Option<f64>) -> Request {
    named_request("sdxl-refiner", switch_at)
}

fn named_request(refiner: &str, switch_at: Option<f64>) -> Request {
    Request {
        prompt: PROMPT.into(),
        negative_prompt: NEGATIVE.into(),
        sampler: "Euler".into(),
        steps: 4,
        cfg_scale: 7.0,
        width: 64,
        height: 64,
        refiner: switch_at.map(|switch_at| Refiner {
            checkpoint: refiner.into(),
            switch_at,
        }),
        ..Default::default()
    }
}

fn run(e: &mut Engine, req: &Request) -> Generated {
    let noise = candle_core::safetensors::load(sd().join("refs/sdxl.safetensors"), &Device::Cpu)
        .unwrap()["run.init_noise"]
        .clone();
    let overrides = Overrides {
        initial_noise: Some(noise),
        init_latent: None,
    };
    e.generate_with(req, overrides, &mut |_| Flow::Continue)
        .unwrap()
        .remove(0)
}

fn assert_close(what: &str, got: &Tensor, want: &Tensor, tolerance: f32) {
    let d = max_abs_diff(got, want);
    let scale = max_abs_diff(want, &want.zeros_like().unwrap()).max(1.0);
    eprintln!("{what}: max abs diff {d:e} (values up to {scale})");
    assert!(d <= tolerance * scale, "{what} differs by {d}");
}

#[test]
fn the_refiner_loads_from_a_folder_and_a_single_file() {
    for name in ["sdxl-refiner", "sdxl-refiner.safetensors"] {
        let w = weights(name);
        assert_eq!(w.family, Family::SdxlRefiner, "{name}");
        assert!(w.text_encoder_2.is_none(), "{name}");
        assert_eq!(w.text_encoder.config.hidden_size, 8, "{name}");
        assert_eq!(w.unet.config.cross_attention_dim, 8, "{name}");
    }
    // Written back, it reads as the same model.
    let dir = tempfile::tempdir().unwrap();
    sdkube_models::save_diffusers(&weights("sdxl-refiner"), dir.path()).unwrap();
    let again = load(dir.path(), &LoadOptions::default()).unwrap();
    assert_eq!(again.family, Family::SdxlRefiner);
}

#[test]
fn its_conditioning_and_unet_match_diffusers_refiner_pipeline() {
    let r = refs();
    let w = weights("sdxl-refiner");
    let clip = w.text_encoder.build(&Device::Cpu, DType::F32).unwrap();
    let encoders = TextEncoders {
        family: Family::SdxlRefiner,
        clip: &clip,
        clip_g: None,
        embeddings: None,
    };
    let tokenizer = ClipTokenizer::new().unwrap();
    let encode = |prompt: &str| {
        let tokens = PromptTokens::new(&tokenizer, prompt, &EmbeddingIndex::new());
        text::encode(&encoders, &tokens, 1).unwrap()
    };
    let (cond, uncond) = (encode(PROMPT), encode(NEGATIVE));
    assert_close("context", &cond.context, &r["text.hidden"], 1e-5);
    assert_close(
        "pooled",
        cond.pooled.as_ref().unwrap(),
        &r["text.pooled"],
        1e-5,
    );
    assert_close(
        "negative context",
        &uncond.context,
        &r["text.hidden_uncond"],
        1e-5,
    );

    let unet = w.unet.build(&Device::Cpu, DType::F32).unwrap();
    let added = AddedConditioning {
        text_embeds: Tensor::cat(&[&r["text.pooled_uncond"], &r["text.pooled"]], 0).unwrap(),
        time_ids: Tensor::cat(&[&r["text.time_ids_uncond"], &r["text.time_ids"]], 0).unwrap(),
    };
    let context = Tensor::cat(&[&r["text.hidden_uncond"], &r["text.hidden"]], 0).unwrap();
    let t = Tensor::new(&[500f32], &Device::Cpu).unwrap();
    let out = unet
        .forward(&r["unet.x"], &t, &context, Some(&added))
        .unwrap();
    assert_close("unet", &out, &r["unet.out"], 1e-5);
}

#[test]
fn a_run_handed_to_the_refiner_matches_a1111_and_diffusers() {
    let r = refs();
    for (vram, refiner) in [
        (VramMode::High, "sdxl-refiner"),
        (VramMode::Low, "sdxl-refiner"),
        (VramMode::High, "sdxl-refiner.safetensors"),
    ] {
        let mut e = refined(vram, refiner);
        let out = run(&mut e, &named_request(refiner, Some(0.5)));
        let what = format!("{vram:?} {refiner}");
        assert_close(
            &format!("{what} vs A1111 rule"),
            &out.latent,
            &r["run.latent"],
            1e-4,
        );
        assert_close(
            &format!("{what} vs diffusers"),
            &out.latent,
            &r["run.diffusers_latent"],
            1e-4,
        );
        assert!(
            out.infotext
                .contains(&format!("Refiner: {refiner}, Refiner switch at: 0.5")),
            "{}",
            out.infotext
        );
    }
}

#[test]
fn the_switch_point_decides_how_much_the_refiner_does() {
    let base = candle_core::safetensors::load(sd().join("refs/sdxl.safetensors"), &Device::Cpu)
        .unwrap()["run.latent"]
        .clone();
    let mut e = refined(VramMode::High, "sdxl-refiner");
    // At 1 the schedule never gets there: the base run, and no refiner in the infotext.
    let never = run(&mut e, &request(Some(1.0)));
    assert_close("switch at 1", &never.latent, &base, 1e-4);
    // Without the field the refiner stays unused though loaded.
    let unused = run(&mut e, &request(None));
    assert_close("no switch", &unused.latent, &base, 1e-4);
    assert!(!unused.infotext.contains("Refiner"), "{}", unused.infotext);
    // From the first step, the run is the refiner's alone: far from the base.
    let all = run(&mut e, &request(Some(0.0)));
    let half = run(&mut e, &request(Some(0.5)));
    assert!(max_abs_diff(&all.latent, &base) > 0.1);
    assert!(max_abs_diff(&all.latent, &half.latent) > 0.1);
}

#[test]
fn bad_refiner_use_is_refused_naming_the_problem() {
    let mut e = engine("sdxl", VramMode::High);
    let err = e
        .generate(&request(Some(0.8)), &mut |_| Flow::Continue)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("the refiner \"sdxl-refiner\" is not loaded"),
        "{err}"
    );

    let sd1 = engine("sd1", VramMode::High);
    let err = e.set_refiner(Some(sd1)).unwrap_err().to_string();
    assert!(err.contains("cannot continue the latents"), "{err}");

    let mut e = refined(VramMode::High, "sdxl-refiner");
    let err = e
        .generate(&named_request("other", Some(0.5)), &mut |_| Flow::Continue)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("the refiner \"other\" is not loaded (\"sdxl-refiner\" is)"),
        "{err}"
    );
    for at in [-0.1, 1.5, f64::NAN] {
        let err = e
            .generate(&request(Some(at)), &mut |_| Flow::Continue)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("refiner_switch_at must be between 0 and 1"),
            "{err}"
        );
    }
}

#[test]
fn the_refiner_can_serve_as_the_model_itself() {
    // A1111 lets the refiner be the selected checkpoint (img2img polishing): its own time ids.
    let mut e = engine("sdxl-refiner", VramMode::High);
    let out = e
        .generate(&request(None), &mut |_| Flow::Continue)
        .unwrap()
        .remove(0);
    assert_eq!(out.image.dimensions(), (64, 64));
    assert!(!out.infotext.contains("Clip skip"));
}

#[test]
fn refined_requests_batched_together_come_out_as_alone() {
    let mut e = refined(VramMode::High, "sdxl-refiner");
    let a = Request {
        seed: 3,
        ..request(Some(0.5))
    };
    let b = Request {
        seed: 4,
        prompt: "a red boat".into(),
        ..request(Some(0.5))
    };
    assert!(e.can_batch(&a, &b));
    assert!(
        !e.can_batch(&a, &request(Some(0.6))),
        "another switch point"
    );
    assert!(!e.can_batch(&a, &request(None)), "no refiner");
    let together = e
        .generate_batch(&[a.clone(), b.clone()], &mut |_| Flow::Continue)
        .unwrap();
    for (req, batched) in [(&a, &together[0][0]), (&b, &together[1][0])] {
        let alone = e.generate(req, &mut |_| Flow::Continue).unwrap().remove(0);
        assert_close("batched vs alone", &batched.latent, &alone.latent, 1e-5);
    }
}
