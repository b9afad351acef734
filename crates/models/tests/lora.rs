//! LoRA files (`sdkube_models::lora`): every layout onto the tiny fixture models, UNet output
//! against diffusers' `load_lora_weights`/`set_adapters` (LyCORIS LoHa/LoKr against the math
//! of `scripts/make_lora_fixtures.py`), and files that do not fit.

use std::collections::HashMap;
use std::path::PathBuf;

use candle_core::{DType, Device, Tensor};
use sdkube_models::ldm::{self, TensorMap};
use sdkube_models::lora::{patch, BoundLora, LoraError, LoraFile, Part};
use sdkube_models::unet::AddedConditioning;
use sdkube_models::{load, LoadOptions, SdWeights};
use sdkube_testkit::max_abs_diff;

fn lora(path: &str) -> PathBuf {
    sdkube_testkit::fixtures().join("lora").join(path)
}

fn refs() -> HashMap<String, Tensor> {
    candle_core::safetensors::load(lora("refs.safetensors"), &Device::Cpu).unwrap()
}

fn model(name: &str) -> SdWeights {
    load(
        &sdkube_testkit::fixtures().join("sd").join(name),
        &LoadOptions::default(),
    )
    .unwrap()
}

fn bind(w: &SdWeights, file: &str) -> BoundLora {
    LoraFile::read(&lora(file)).unwrap().bind(w).unwrap()
}

/// The UNet output with `loras` merged at their multipliers.
fn unet_out(w: &SdWeights, fam: &str, loras: &[(&BoundLora, f64)]) -> Tensor {
    let r = refs();
    let mut tensors: TensorMap = w.unet.tensors.clone();
    let patched = patch(&tensors, Part::UNet, loras, &Device::Cpu, DType::F32).unwrap();
    tensors.extend(patched);
    let vb = candle_nn::VarBuilder::from_tensors(tensors, DType::F32, &Device::Cpu);
    let unet = sdkube_models::unet::UNet2DConditionModel::new(vb, &w.unet.config).unwrap();
    let added = r
        .get(&format!("{fam}.unet.text_embeds"))
        .map(|te| AddedConditioning {
            text_embeds: te.clone(),
            time_ids: r[&format!("{fam}.unet.time_ids")].clone(),
        });
    unet.forward(
        &r[&format!("{fam}.unet.x")],
        &r[&format!("{fam}.unet.t")],
        &r[&format!("{fam}.unet.ctx")],
        added.as_ref(),
    )
    .unwrap()
}

fn check(fam: &str, case: &str, got: &Tensor) -> f32 {
    let r = refs();
    let err = max_abs_diff(got, &r[&format!("{fam}.{case}.unet")]);
    let effect = max_abs_diff(
        &r[&format!("{fam}.base.unet")],
        &r[&format!("{fam}.{case}.unet")],
    );
    println!("{fam} {case}: unet max abs err {err:.2e} (LoRA effect {effect:.2e})");
    assert!(
        case == "base" || effect > 1e-2,
        "{fam} {case}: the LoRA changes nothing"
    );
    assert!(err < 1e-4, "{fam} {case}: unet max abs err {err}");
    err
}

#[test]
fn unet_output_matches_diffusers_for_kohya_and_peft_files() {
    for fam in ["sd1", "sdxl"] {
        let w = model(fam);
        let kohya = bind(&w, &format!("{fam}/kohya-{fam}.safetensors"));
        let peft = bind(&w, &format!("{fam}/peft-{fam}.safetensors"));
        check(fam, "base", &unet_out(&w, fam, &[]));
        check(fam, "kohya", &unet_out(&w, fam, &[(&kohya, 1.0)]));
        check(fam, "peft", &unet_out(&w, fam, &[(&peft, 0.7)]));
        check(
            fam,
            "both",
            &unet_out(&w, fam, &[(&kohya, 0.8), (&peft, 0.5)]),
        );
    }
}

#[test]
fn lycoris_loha_and_lokr_match_the_scripts_math() {
    let w = model("sd1");
    let loha = bind(&w, "sd1/loha-sd1.safetensors");
    let lokr = bind(&w, "sd1/lokr-sd1.safetensors");
    check("sd1", "loha", &unet_out(&w, "sd1", &[(&loha, 1.0)]));
    check("sd1", "lokr", &unet_out(&w, "sd1", &[(&lokr, 0.6)]));
}

#[test]
fn kohya_files_cover_conv_layers_and_sgm_names() {
    let sd1 = model("sd1");
    let kohya = bind(&sd1, "sd1/kohya-sd1.safetensors");
    let keys: Vec<&str> = kohya.keys(Part::UNet).collect();
    // LoCon on a 3×3 resnet convolution and a 1×1 proj_in.
    assert!(
        keys.contains(&"down_blocks.0.resnets.0.conv1.weight"),
        "{keys:?}"
    );
    assert!(keys.contains(&"down_blocks.0.attentions.0.proj_in.weight"));
    assert_eq!(kohya.keys(Part::TextEncoder).count(), 3);
    // kohya's SDXL files name UNet modules by the original SGM blocks.
    let xl = model("sdxl");
    let kohya = bind(&xl, "sdxl/kohya-sdxl.safetensors");
    let keys: Vec<&str> = kohya.keys(Part::UNet).collect();
    assert!(
        keys.contains(&"up_blocks.1.attentions.2.proj_out.weight"),
        "{keys:?}"
    );
    assert!(keys.contains(&"down_blocks.1.resnets.0.conv1.weight"));
    assert!(kohya.touches(Part::TextEncoder) && kohya.touches(Part::TextEncoder2));
    let meta = &LoraFile::read(&lora("sdxl/kohya-sdxl.safetensors"))
        .unwrap()
        .metadata;
    assert_eq!(meta["ss_output_name"], "kohya-sdxl-alias");
}

#[test]
fn sgm_names_invert_the_checkpoint_renaming() {
    // Every UNet key of both fixtures goes to its LDM name and back through convert_unet.
    for fam in ["sd1", "sdxl"] {
        let w = model(fam);
        let cfg = &w.unet.config;
        let up: Vec<bool> = cfg
            .up_block_types
            .iter()
            .map(|t| t.contains("CrossAttn"))
            .collect();
        let mut as_ldm = TensorMap::new();
        for (k, t) in &w.unet.tensors {
            let ldm_key = ldm::ldm_unet_module(k, cfg.layers_per_block, &up)
                .unwrap_or_else(|| panic!("{fam}: no LDM name for {k}"));
            as_ldm.insert(ldm_key, t.clone());
        }
        let back = ldm::convert_unet(&as_ldm, cfg.layers_per_block);
        let mut a: Vec<&String> = back.keys().collect();
        let mut b: Vec<&String> = w.unet.tensors.keys().collect();
        a.sort();
        b.sort();
        assert_eq!(a, b, "{fam}");
    }
}

fn mismatch(w: &SdWeights, file: &str) -> String {
    match LoraFile::read(&lora(file)).unwrap().bind(w) {
        Err(e @ LoraError::Mismatch { .. }) => e.to_string(),
        other => panic!("{file}: expected a mismatch, got {other:?}"),
    }
}

#[test]
fn files_that_do_not_fit_are_errors_naming_the_file() {
    let xl = model("sdxl");
    let msg = mismatch(&xl, "sd1/kohya-sd1.safetensors");
    assert!(
        msg.contains("kohya-sd1.safetensors") && msg.contains("SD 1.x/2.x LoRA"),
        "{msg}"
    );
    let sd1 = model("sd1");
    let msg = mismatch(&sd1, "sdxl/kohya-sdxl.safetensors");
    assert!(
        msg.contains("kohya-sdxl.safetensors") && msg.contains("SDXL LoRA"),
        "{msg}"
    );
    // diffusers layout: no family prefix to tell, the shapes do.
    let msg = mismatch(&xl, "sd1/peft-sd1.safetensors");
    assert!(
        msg.contains("peft-sd1.safetensors") && msg.contains("match no layer"),
        "{msg}"
    );
    let msg = mismatch(&sd1, "bad/unknown-key.safetensors");
    assert!(
        msg.contains("unknown-key.safetensors") && msg.contains("lora_unet_not_a_layer"),
        "{msg}"
    );
    assert!(msg.contains("1 of its 2 modules"), "{msg}");
    // Not a LoRA at all.
    let err = LoraFile::read(&sdkube_testkit::fixtures().join("ti/sd1/tiembed.safetensors"))
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("tiembed.safetensors") && err.contains("emb_params"),
        "{err}"
    );
}

/// SD 2.x checkpoints keep 23 of OpenCLIP's 24 text layers; kohya LoRAs trained on the full
/// encoder have deltas for the 24th, which changes nothing: they bind, the rest applies.
#[test]
fn deltas_for_a_text_layer_the_model_drops_are_not_an_error() {
    let w = model("sd1");
    let layers = w.text_encoder.config.num_hidden_layers;
    let mut t = TensorMap::new();
    let z = |s: &[usize]| Tensor::ones(s, DType::F32, &Device::Cpu).unwrap();
    for (layer, module) in [(0, "self_attn_q_proj"), (layers, "self_attn_q_proj")] {
        let m = format!("lora_te_text_model_encoder_layers_{layer}_{module}");
        t.insert(format!("{m}.lora_down.weight"), z(&[2, 8]));
        t.insert(format!("{m}.lora_up.weight"), z(&[8, 2]));
    }
    let file =
        LoraFile::from_tensors(&PathBuf::from("sd2.safetensors"), t, Default::default()).unwrap();
    let bound = file.bind(&w).unwrap();
    let keys: Vec<&str> = bound.keys(Part::TextEncoder).collect();
    assert_eq!(
        keys,
        ["text_model.encoder.layers.0.self_attn.q_proj.weight"]
    );
    // A layer index the encoder never had is still an error … of a module, not of a layer.
    let mut t = TensorMap::new();
    let m = "lora_te_text_model_encoder_layers_0_self_attn_nope";
    t.insert(format!("{m}.lora_down.weight"), z(&[2, 8]));
    t.insert(format!("{m}.lora_up.weight"), z(&[8, 2]));
    let file =
        LoraFile::from_tensors(&PathBuf::from("bad.safetensors"), t, Default::default()).unwrap();
    assert!(file.bind(&w).is_err());
}

#[test]
fn unsupported_parameters_are_refused_not_dropped() {
    let mut t = TensorMap::new();
    let z = |s: &[usize]| Tensor::zeros(s, DType::F32, &Device::Cpu).unwrap();
    let m = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q";
    t.insert(format!("{m}.lora_down.weight"), z(&[2, 8]));
    t.insert(format!("{m}.lora_up.weight"), z(&[8, 2]));
    t.insert(format!("{m}.dora_scale"), z(&[8, 1]));
    let err = LoraFile::from_tensors(&PathBuf::from("dora.safetensors"), t, Default::default())
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("dora.safetensors") && err.contains("dora_scale"),
        "{err}"
    );
}

/// What switching a LoRA costs on a full-size SD 1.5 UNet (random weights, CPU, f32): the
/// deltas of the touched tensors and a rebuild of the network from the kept base map, which
/// copies no untouched weight. `cargo test -p sdkube-models --release --test lora -- --ignored
/// --nocapture`.
#[test]
#[ignore = "builds a full-size UNet: seconds of CPU and 3.4 GB of memory"]
fn full_size_unet_switch_cost() {
    use sdkube_models::presets;
    use std::time::Instant;
    let dev = Device::Cpu;
    let unet = presets::random_unet(sdkube_models::Family::Sd1, DType::F32, &dev).unwrap();
    let mut weights = model("sd1");
    weights.unet = unet;
    // A kohya LoRA of rank 32 on every attention and feed-forward projection, as trained LoRAs
    // usually are.
    let mut t = TensorMap::new();
    let targets = [
        "to_q",
        "to_k",
        "to_v",
        "to_out.0",
        "ff.net.0.proj",
        "ff.net.2",
        "proj_in",
        "proj_out",
    ];
    let mut touched = 0usize;
    for (key, w) in &weights.unet.tensors {
        let Some(module) = key.strip_suffix(".weight") else {
            continue;
        };
        if w.rank() < 2 || !targets.iter().any(|s| module.ends_with(s)) {
            continue;
        }
        let (out, inner) = (w.dims()[0], w.elem_count() / w.dims()[0]);
        let name = format!("lora_unet_{}", module.replace('.', "_"));
        let r = 32;
        t.insert(
            format!("{name}.lora_down.weight"),
            Tensor::randn(0f32, 0.01, (r, inner), &dev).unwrap(),
        );
        t.insert(
            format!("{name}.lora_up.weight"),
            Tensor::randn(0f32, 0.01, (out, r), &dev).unwrap(),
        );
        t.insert(format!("{name}.alpha"), Tensor::new(16f32, &dev).unwrap());
        touched += w.elem_count();
    }
    let modules = t.len() / 3;
    let file =
        LoraFile::from_tensors(&PathBuf::from("full.safetensors"), t, Default::default()).unwrap();
    let started = Instant::now();
    let bound = file.bind(&weights).unwrap();
    let bind = started.elapsed();
    let started = Instant::now();
    let patched = patch(
        &weights.unet.tensors,
        Part::UNet,
        &[(&bound, 0.8)],
        &dev,
        DType::F32,
    )
    .unwrap();
    let deltas = started.elapsed();
    let started = Instant::now();
    let mut map = weights.unet.tensors.clone();
    map.extend(patched);
    let vb = candle_nn::VarBuilder::from_tensors(map, DType::F32, &dev);
    sdkube_models::unet::UNet2DConditionModel::new(vb, &weights.unet.config).unwrap();
    let rebuild = started.elapsed();
    let total: usize = weights.unet.tensors.values().map(|t| t.elem_count()).sum();
    println!(
        "full-size SD 1.5 UNet, rank-32 LoRA on {modules} modules ({:.0} M of {:.0} M weights): \
         bind {bind:?}, deltas {deltas:?}, rebuild from the kept map {rebuild:?}",
        touched as f64 / 1e6,
        total as f64 / 1e6
    );
}
