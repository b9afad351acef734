//! Parity with diffusers/transformers on the tiny random-weight fixtures made by
//! `scripts/make_sd_fixtures.py` (references computed in fp32 from the same fp16 weights).

use sdkube_testkit::max_abs_diff;
use std::path::PathBuf;

use candle_core::{DType, Device, Tensor, D};
use sdkube_models::unet::AddedConditioning;
use sdkube_models::{load, Family, LoadOptions, Prediction, SdWeights};

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

fn assert_close(what: &str, got: &Tensor, want: &Tensor, tol: f32) {
    let d = max_abs_diff(got, want);
    eprintln!("{what}: max abs diff {d:e}");
    assert!(d <= tol, "{what}: max abs diff {d} > {tol}");
}

/// Text conditioning as diffusers' encode_prompt builds it, from our networks.
fn check_text(name: &str, w: &SdWeights, r: &std::collections::HashMap<String, Tensor>) {
    let dev = Device::Cpu;
    let ids = &r["text.ids"];
    let te = w.text_encoder.build(&dev, DType::F32).unwrap();
    let out = te.forward(ids, None).unwrap();
    match w.family {
        Family::Sd1 | Family::Sd2 => {
            let last = out.hidden_states.last().unwrap();
            assert_close(
                &format!("{name} text.hidden"),
                &te.final_norm(last).unwrap(),
                &r["text.hidden"],
                1e-5,
            );
            if let Some(skip2) = r.get("text.hidden_skip2") {
                let h = &out.hidden_states[out.hidden_states.len() - 2];
                assert_close(
                    &format!("{name} clip skip 2"),
                    &te.final_norm(h).unwrap(),
                    skip2,
                    1e-5,
                );
            }
        }
        Family::SdxlRefiner => {
            unreachable!("the refiner's references are in crates/pipeline/tests/refiner.rs")
        }
        Family::Sdxl => {
            let te2 = w
                .text_encoder_2
                .as_ref()
                .unwrap()
                .build(&dev, DType::F32)
                .unwrap();
            let out2 = te2.forward(&r["text.ids_2"], None).unwrap();
            let n = out.hidden_states.len();
            let n2 = out2.hidden_states.len();
            let hidden = Tensor::cat(
                &[&out.hidden_states[n - 2], &out2.hidden_states[n2 - 2]],
                D::Minus1,
            )
            .unwrap();
            assert_close(
                &format!("{name} text.hidden"),
                &hidden,
                &r["text.hidden"],
                1e-5,
            );
            assert_close(
                &format!("{name} text.pooled"),
                out2.text_embeds.as_ref().unwrap(),
                &r["text.pooled"],
                1e-5,
            );
        }
    }
}

fn check_unet(name: &str, w: &SdWeights, r: &std::collections::HashMap<String, Tensor>) {
    let unet = w.unet.build(&Device::Cpu, DType::F32).unwrap();
    let added = r.get("unet.text_embeds").map(|te| AddedConditioning {
        text_embeds: te.clone(),
        time_ids: r["unet.time_ids"].clone(),
    });
    let out = unet
        .forward(&r["unet.x"], &r["unet.t"], &r["unet.ctx"], added.as_ref())
        .unwrap();
    assert_close(&format!("{name} unet.out"), &out, &r["unet.out"], 2e-5);
}

fn check_vae(
    name: &str,
    vae: &sdkube_models::checkpoint::Component<sdkube_models::config::VaeConfig>,
    r: &std::collections::HashMap<String, Tensor>,
) {
    let vae = vae.build(&Device::Cpu, DType::F32).unwrap();
    let decoded = vae.decode(&r["vae.latent"]).unwrap();
    assert_close(
        &format!("{name} vae.decoded"),
        &decoded,
        &r["vae.decoded"],
        5e-5,
    );
    let dist = vae.encode(&r["vae.image"]).unwrap();
    assert_close(
        &format!("{name} vae.encoded_mean"),
        &dist.mean,
        &r["vae.encoded_mean"],
        2e-5,
    );
    assert_close(
        &format!("{name} vae.encoded_logvar"),
        &dist.logvar,
        &r["vae.encoded_logvar"],
        2e-5,
    );
}

fn check_all(name: &str, w: &SdWeights) {
    let r = refs(name);
    check_text(name, w, &r);
    check_unet(name, w, &r);
    if r.contains_key("vae.latent") {
        check_vae(name, &w.vae, &r);
    }
}

#[test]
fn diffusers_folders_match_reference() {
    for (name, family, prediction) in [
        ("sd1", Family::Sd1, Prediction::Epsilon),
        ("sd2v", Family::Sd2, Prediction::V),
        ("sdxl", Family::Sdxl, Prediction::Epsilon),
        ("sd1-inpaint", Family::Sd1, Prediction::Epsilon),
    ] {
        let w = load(&fixtures().join(name), &LoadOptions::default()).unwrap();
        assert_eq!(w.family, family, "{name}");
        assert_eq!(w.prediction, prediction, "{name}");
        check_all(name, &w);
    }
}

#[test]
fn single_file_checkpoints_match_reference() {
    for (name, family) in [
        ("sd1", Family::Sd1),
        ("sd2v", Family::Sd2),
        ("sdxl", Family::Sdxl),
    ] {
        // Tiny networks break the head-width conventions of real models, so their configs come
        // from the folder (as diffusers' `from_single_file(config=…)`); keys, layer counts and
        // the family still come from the file.
        let opts = LoadOptions {
            config_dir: Some(fixtures().join(name)),
            ..Default::default()
        };
        let w = load(&fixtures().join(format!("{name}.safetensors")), &opts).unwrap();
        assert_eq!(w.family, family, "{name}");
        check_all(name, &w);
    }
}

#[test]
fn separate_vae_file_replaces_the_models_vae() {
    let opts = LoadOptions {
        vae: Some(fixtures().join("vae-sd1-alt.safetensors")),
        config_dir: Some(fixtures().join("sd1")),
        ..Default::default()
    };
    let w = load(&fixtures().join("sd1"), &opts).unwrap();
    check_vae("vae-sd1-alt", &w.vae, &refs("vae-sd1-alt"));
}

#[test]
fn not_a_model_is_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let bogus = dir.path().join("model.safetensors");
    std::fs::write(&bogus, b"this is not a checkpoint").unwrap();
    let err = load(&bogus, &LoadOptions::default())
        .unwrap_err()
        .to_string();
    assert!(err.contains("model.safetensors"), "{err}");
    let missing = load(
        &dir.path().join("nope.safetensors"),
        &LoadOptions::default(),
    )
    .unwrap_err()
    .to_string();
    assert!(missing.contains("no such file"), "{missing}");
    let empty_dir = load(dir.path(), &LoadOptions::default())
        .unwrap_err()
        .to_string();
    assert!(
        empty_dir.contains("not a diffusers model folder"),
        "{empty_dir}"
    );
}

#[test]
fn ckpt_checkpoint_reads_as_tensors_only() {
    // A `.ckpt` (torch zip pickle) of the same weights loads like the safetensors file.
    let dir = tempfile::tempdir().unwrap();
    let ckpt = dir.path().join("sd1.ckpt");
    let tensors =
        candle_core::safetensors::load(fixtures().join("sd1.safetensors"), &Device::Cpu).unwrap();
    sdkube_weights::save_torch_zip(&ckpt, &tensors).unwrap();
    let opts = LoadOptions {
        config_dir: Some(fixtures().join("sd1")),
        ..Default::default()
    };
    let w = load(&ckpt, &opts).unwrap();
    assert_eq!(w.family, Family::Sd1);
    check_unet("sd1.ckpt", &w, &refs("sd1"));

    // A pickle that calls anything but tensor rebuilding is refused, naming the call.
    let evil =
        sdkube_testkit::repo_root().join("crates/weights/tests/fixtures/malicious_system.pt");
    let err = load(&evil, &LoadOptions::default())
        .unwrap_err()
        .to_string();
    assert!(err.contains("system"), "{err}");
}

#[test]
fn a_model_saved_as_a_diffusers_folder_loads_back_unchanged() {
    for name in ["sd1", "sdxl", "sd2v"] {
        let src = fixtures().join(name);
        let a = sdkube_models::load(&src, &sdkube_models::LoadOptions::default()).unwrap();
        let dir = tempfile::tempdir().unwrap();
        sdkube_models::save_diffusers(&a, dir.path()).unwrap();
        let b = sdkube_models::load(dir.path(), &sdkube_models::LoadOptions::default()).unwrap();
        assert_eq!(a.family, b.family, "{name}");
        assert_eq!(a.prediction, b.prediction, "{name}");
        assert_eq!(a.unet.config, b.unet.config, "{name}");
        assert_eq!(a.text_encoder.config, b.text_encoder.config, "{name}");
        for (k, t) in &a.unet.tensors {
            let u = &b.unet.tensors[k];
            assert_eq!(max_abs_diff(t, u), 0.0, "{name} {k}");
        }
        assert_eq!(a.text_encoder_2.is_some(), b.text_encoder_2.is_some());
        assert_eq!(a.vae.tensors.len(), b.vae.tensors.len());
    }
}

#[test]
fn single_files_get_their_family_s_native_size() {
    // A single file records no training size; the server warms up at the one it is given, so
    // it comes from the family (and SD 2.x's prediction, from the A1111 sidecar yaml).
    let dir = tempfile::tempdir().unwrap();
    for (name, v, side) in [
        ("sd1", false, 64),
        ("sd2v", false, 64),
        ("sd2v", true, 96),
        ("sdxl", false, 128),
    ] {
        // The folder's configs, less the UNet's sample_size.
        let configs = dir.path().join(format!("{name}-{v}"));
        for part in ["text_encoder", "text_encoder_2", "unet", "vae"] {
            let from = fixtures().join(name).join(part).join("config.json");
            let Ok(text) = std::fs::read_to_string(&from) else {
                continue;
            };
            let mut config: serde_json::Value = serde_json::from_str(&text).unwrap();
            config.as_object_mut().unwrap().remove("sample_size");
            std::fs::create_dir_all(configs.join(part)).unwrap();
            std::fs::write(configs.join(part).join("config.json"), config.to_string()).unwrap();
        }
        let file = dir.path().join(format!("{name}-{v}.safetensors"));
        std::os::unix::fs::symlink(fixtures().join(format!("{name}.safetensors")), &file).unwrap();
        if v {
            std::fs::write(
                file.with_extension("yaml"),
                "model:\n  params:\n    parameterization: \"v\"\n",
            )
            .unwrap();
        }
        let opts = LoadOptions {
            config_dir: Some(configs),
            ..Default::default()
        };
        let w = load(&file, &opts).unwrap();
        assert_eq!(w.unet.config.sample_size, Some(side), "{name} v={v}");
    }
    // A config that names its size keeps it.
    let opts = LoadOptions {
        config_dir: Some(fixtures().join("sdxl")),
        ..Default::default()
    };
    let w = load(&fixtures().join("sdxl.safetensors"), &opts).unwrap();
    assert_eq!(w.unet.config.sample_size, Some(8));
}
