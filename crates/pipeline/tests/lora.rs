//! LoRA in generation: the `<lora:…>` tags, conditioning against diffusers'
//! `load_lora_weights`/`set_adapters` (references from `scripts/make_lora_fixtures.py`), the
//! engine switching LoRAs without a model load (and what it costs), batching, infotext hashes
//! and clear errors.

use std::collections::HashMap;
use std::path::PathBuf;

use candle_core::{DType, Device, Tensor};
use sdkube_models::lora::{patch, LoraFile, Part};
use sdkube_models::{load, LoadOptions, SdWeights};
use sdkube_pipeline::embeddings::EmbeddingSet;
use sdkube_pipeline::loras::{extract_tags, LoraLibrary, LoraTag};
use sdkube_pipeline::sampler::Flow;
use sdkube_pipeline::text::{self, PromptTokens, TextEncoders};
use sdkube_pipeline::tokenizer::ClipTokenizer;
use sdkube_pipeline::{Engine, Request, VramMode};
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

fn tag(name: &str, te: f64, unet: f64) -> LoraTag {
    LoraTag {
        name: name.into(),
        te,
        unet,
    }
}

#[test]
fn tags_are_read_as_a1111_reads_them_and_removed_from_the_prompt() {
    let (text, tags) =
        extract_tags("a cat <lora:one>, <lora:two:0.5> <lora:three:0.5:0.25> <hypernet:x:1>")
            .unwrap();
    assert_eq!(text, "a cat ,   <hypernet:x:1>");
    // A1111: the first number is the text encoder's, the second the UNet's (default: the first).
    assert_eq!(
        tags,
        [
            tag("one", 1.0, 1.0),
            tag("two", 0.5, 0.5),
            tag("three", 0.5, 0.25)
        ]
    );
    let (_, tags) = extract_tags("<lora:n:te=0.3:unet=0.7> <lyco:m:unet=0>").unwrap();
    assert_eq!(tags, [tag("n", 0.3, 0.7), tag("m", 1.0, 0.0)]);
    for bad in [
        "<lora:n:lots>",
        "<lora:n:1:1:8>",
        "<lora::1>",
        "<lora:n:dyn=4>",
    ] {
        let err = extract_tags(&format!("x {bad}")).unwrap_err().to_string();
        assert!(err.contains(bad), "{bad}: {err}");
    }
}

/// Text-encoder output of `fam` for the fixture prompt with `loras` merged.
fn conditioning(fam: &str, loras: &[(&str, f64)]) -> (Tensor, Option<Tensor>) {
    let w = model(fam);
    let bound: Vec<_> = loras
        .iter()
        .map(|(f, m)| (LoraFile::read(&lora(f)).unwrap().bind(&w).unwrap(), *m))
        .collect();
    let list: Vec<_> = bound.iter().map(|(b, m)| (b, *m)).collect();
    let build = |part: Part| {
        let c = match part {
            Part::TextEncoder2 => w.text_encoder_2.as_ref().unwrap(),
            _ => &w.text_encoder,
        };
        let mut tensors = c.tensors.clone();
        tensors.extend(patch(&c.tensors, part, &list, &Device::Cpu, DType::F32).unwrap());
        let vb = candle_nn::VarBuilder::from_tensors(tensors, DType::F32, &Device::Cpu);
        sdkube_models::clip::ClipTextModel::new(vb, &c.config).unwrap()
    };
    let clip = build(Part::TextEncoder);
    let clip_g = w.text_encoder_2.as_ref().map(|_| build(Part::TextEncoder2));
    let set = EmbeddingSet::empty(sdkube_pipeline::embeddings::TextWidths::of(&w));
    let tokens = PromptTokens::new(
        ClipTokenizer::shared().unwrap(),
        "a photo of an astronaut riding a horse",
        set.index(),
    );
    let enc = TextEncoders {
        family: w.family,
        clip: &clip,
        clip_g: clip_g.as_ref(),
        embeddings: Some(&set),
    };
    let c = text::encode(&enc, &tokens, 1).unwrap();
    (c.context, c.pooled)
}

#[test]
fn conditioning_matches_diffusers_for_both_layouts_and_families() {
    let r = refs();
    let cases: [(&str, Vec<(String, f64)>); 3] = [
        ("kohya", vec![("kohya".into(), 1.0)]),
        ("peft", vec![("peft".into(), 0.7)]),
        ("both", vec![("kohya".into(), 0.8), ("peft".into(), 0.5)]),
    ];
    for fam in ["sd1", "sdxl"] {
        for (case, loras) in &cases {
            let files: Vec<(String, f64)> = loras
                .iter()
                .map(|(k, m)| (format!("{fam}/{k}-{fam}.safetensors"), *m))
                .collect();
            let list: Vec<(&str, f64)> = files.iter().map(|(f, m)| (f.as_str(), *m)).collect();
            let (hidden, pooled) = conditioning(fam, &list);
            let want = &r[&format!("{fam}.{case}.hidden")];
            let err = max_abs_diff(&hidden, want);
            let effect = max_abs_diff(&r[&format!("{fam}.base.hidden")], want);
            println!("{fam} {case}: hidden max abs err {err:.2e} (LoRA effect {effect:.2e})");
            assert!(err < 1e-4 && effect > 1e-2, "{fam} {case}: {err}");
            if let Some(p) = pooled {
                let err = max_abs_diff(&p, &r[&format!("{fam}.{case}.pooled")]);
                println!("{fam} {case}: pooled max abs err {err:.2e}");
                assert!(err < 1e-4, "{fam} {case} pooled: {err}");
            }
        }
    }
    for (kind, m) in [("loha", 1.0), ("lokr", 0.6)] {
        let (hidden, _) = conditioning("sd1", &[(&format!("sd1/{kind}-sd1.safetensors"), m)]);
        let err = max_abs_diff(&hidden, &r[&format!("sd1.{kind}.hidden")]);
        println!("sd1 {kind}: hidden max abs err {err:.2e}");
        assert!(err < 1e-4, "{kind}: {err}");
    }
}

fn engine(fam: &str, vram: VramMode) -> Engine {
    let mut e = Engine::new(model(fam), fam, Device::Cpu, DType::F32, vram).unwrap();
    e.set_loras(LoraLibrary::new(vec![
        lora("sd1"),
        lora("sdxl"),
        lora("bad"),
    ]));
    e
}

fn request(prompt: &str) -> Request {
    Request {
        prompt: prompt.into(),
        negative_prompt: "blurry".into(),
        sampler: "Euler".into(),
        steps: 2,
        width: 64,
        height: 64,
        seed: 5,
        ..Default::default()
    }
}

fn image(e: &mut Engine, prompt: &str) -> (image::RgbImage, String) {
    let mut out = e
        .generate(&request(prompt), &mut |_| Flow::Continue)
        .unwrap();
    let g = out.remove(0);
    (g.image, g.infotext)
}

#[test]
fn the_engine_switches_loras_without_a_reload_and_restores_the_base_exactly() {
    for vram in [VramMode::High, VramMode::Low] {
        let mut e = engine("sd1", vram);
        let (base, info) = image(&mut e, "an astronaut");
        assert!(!info.contains("Lora hashes"));
        let (with, info) = image(&mut e, "an astronaut <lora:kohya-sd1:1>");
        assert_ne!(base, with, "{vram:?}: the LoRA changed nothing");
        // The prompt keeps its tag in the infotext; the hash is A1111's (sha256 of the bytes
        // after the safetensors header: python hashlib gives 8d2ab056d855…).
        assert!(
            info.starts_with("an astronaut <lora:kohya-sd1:1>\n"),
            "{info}"
        );
        assert!(
            info.contains(r#"Lora hashes: "kohya-sd1: 8d2ab056d855", "#),
            "{info}"
        );
        let (other, _) = image(&mut e, "an astronaut <lora:peft-sd1:0.7>");
        assert_ne!(other, with);
        // Back to no LoRA: the base weights were kept, so the image is the first one exactly.
        assert_eq!(image(&mut e, "an astronaut").0, base, "{vram:?}");
        assert_eq!(image(&mut e, "an astronaut <lora:kohya-sd1:1>").0, with);
        // Multiplier 0 is no LoRA; te and unet multipliers act on their own networks.
        assert_eq!(image(&mut e, "an astronaut <lora:kohya-sd1:0>").0, base);
        let te_only = image(&mut e, "an astronaut <lora:kohya-sd1:1:0>").0;
        let unet_only = image(&mut e, "an astronaut <lora:kohya-sd1:0:1>").0;
        assert!(te_only != base && unet_only != base && te_only != unet_only);
        // Alias from the metadata (ss_output_name) names it too.
        assert_eq!(
            image(&mut e, "an astronaut <lora:kohya-sd1-alias:1>").0,
            with
        );
    }
    // Resident and per-job networks give the same images.
    let (mut hi, mut lo) = (engine("sd1", VramMode::High), engine("sd1", VramMode::Low));
    let p = "an astronaut <lora:kohya-sd1:0.8> <lora:peft-sd1:0.5>";
    assert_eq!(image(&mut hi, p).0, image(&mut lo, p).0);
}

#[test]
fn jobs_with_different_loras_are_not_batched_together() {
    let e = engine("sd1", VramMode::High);
    let a = request("an astronaut <lora:kohya-sd1:1>");
    assert!(e.can_batch(&a, &request("a horse <lora:kohya-sd1:1>")));
    assert!(!e.can_batch(&a, &request("a horse <lora:kohya-sd1:0.5>")));
    assert!(!e.can_batch(&a, &request("a horse")));
    assert!(!a.batchable_with(&request("a horse <lora:peft-sd1:1>")));
}

#[test]
fn unknown_names_and_files_that_do_not_fit_are_errors_naming_them() {
    let mut e = engine("sdxl", VramMode::High);
    let err = e
        .validate(&request("x <lora:nope:1>"))
        .unwrap_err()
        .to_string();
    assert!(err.contains("unknown LoRA `nope`"), "{err}");
    let err = e
        .generate(&request("x <lora:kohya-sd1:1>"), &mut |_| Flow::Continue)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("kohya-sd1.safetensors") && err.contains("SD 1.x/2.x LoRA"),
        "{err}"
    );
    let mut e = engine("sd1", VramMode::Low);
    let err = e
        .generate(&request("x <lora:unknown-key>"), &mut |_| Flow::Continue)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("unknown-key.safetensors") && err.contains("lora_unet_not_a_layer"),
        "{err}"
    );
    // A failed LoRA leaves the engine usable.
    image(&mut e, "an astronaut <lora:kohya-sd1:1>");
}

#[test]
fn the_library_lists_names_aliases_and_metadata() {
    let mut lib = LoraLibrary::new(vec![lora("sd1")]);
    let names: Vec<&str> = lib.list().iter().map(|l| l.name.as_str()).collect();
    assert_eq!(names, ["kohya-sd1", "loha-sd1", "lokr-sd1", "peft-sd1"]);
    let k = lib.get("kohya-sd1").unwrap();
    assert_eq!(k.alias, "kohya-sd1-alias");
    assert_eq!(k.metadata["ss_network_dim"], "2");
    // diffusers' adapter metadata is a JSON object, parsed as A1111 parses such values.
    let p = lib.get("peft-sd1").unwrap();
    assert_eq!(p.metadata["lora_adapter_metadata"]["unet.lora_alpha"], 4);
    assert_eq!(lib.short_hash(p).unwrap(), "5a6b571cf638");
    // A new file appears on refresh.
    let dir = tempfile::tempdir().unwrap();
    let mut lib2 = LoraLibrary::new(vec![dir.path().to_path_buf()]);
    assert!(lib2.list().is_empty());
    std::fs::create_dir(dir.path().join("sub")).unwrap();
    std::fs::copy(
        lora("sd1/kohya-sd1.safetensors"),
        dir.path().join("sub/mine.safetensors"),
    )
    .unwrap();
    lib2.refresh();
    assert_eq!(lib2.list()[0].name, "mine");
    lib.refresh();
    assert_eq!(lib.list().len(), 4);
}
