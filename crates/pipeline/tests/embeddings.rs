//! Textual-inversion embeddings: every file layout, bad files, the loaded/skipped
//! split, re-scanning, and parity of the conditioning with diffusers'
//! `load_textual_inversion` (references from `scripts/make_ti_fixtures.py`).

use sdkube_testkit::max_abs_diff;
use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use sdkube_models::{load, Family, LoadOptions, SdWeights};
use sdkube_pipeline::embeddings::{
    read_embedding, read_embedding_bytes, EmbeddingSet, EncoderSlot, TextWidths,
};
use sdkube_pipeline::prompt::{tokenize_prompt, ChunkOptions};
use sdkube_pipeline::sampler::Flow;
use sdkube_pipeline::text::{self, PromptTokens, TextEncoders};
use sdkube_pipeline::tokenizer::ClipTokenizer;
use sdkube_pipeline::{Engine, Request, VramMode};

fn root() -> PathBuf {
    sdkube_testkit::fixtures()
}

fn ti(path: &str) -> PathBuf {
    root().join("ti").join(path)
}

fn refs() -> HashMap<String, Tensor> {
    candle_core::safetensors::load(ti("refs.safetensors"), &Device::Cpu).unwrap()
}

fn model(name: &str) -> SdWeights {
    load(&root().join("sd").join(name), &LoadOptions::default()).unwrap()
}

const TINY: TextWidths = TextWidths {
    first: 8,
    second: None,
};

fn reason<'a>(set: &'a EmbeddingSet, name: &str) -> &'a str {
    set.skipped()
        .iter()
        .find(|(n, _)| n == name)
        .map(|(_, r)| r.as_str())
        .unwrap_or_else(|| panic!("{name} not skipped: {:?}", set.skipped()))
}

#[test]
fn every_layout_reads_the_same_vectors() {
    let expected = refs()["vectors"].clone();
    let set = EmbeddingSet::load_dir(&ti("formats"), TINY).unwrap();
    let names: Vec<&str> = set.loaded().iter().map(|e| e.name.as_str()).collect();
    // `ti-diffusers.bin` and `ti-diffusers.safetensors` share a name: one is skipped.
    assert_eq!(names, ["ti-diffusers", "ti-pt", "ti-single"]);
    assert!(reason(&set, "ti-diffusers").contains("already used by"));
    for name in ["ti-diffusers", "ti-pt"] {
        let info = set.get(name).unwrap();
        assert_eq!((info.vectors, info.shape.clone()), (2, vec![2, 8]));
        let v = set.vectors(name, EncoderSlot::First).unwrap();
        assert_eq!(max_abs_diff(v, &expected), 0.0, "{name}");
        assert!(set.vectors(name, EncoderSlot::Second).is_none());
    }
    // A diffusers single vector `[8]` is one token.
    let single = set.vectors("ti-single", EncoderSlot::First).unwrap();
    assert_eq!(single.dims(), [1, 8]);
    assert_eq!(
        max_abs_diff(single, &expected.narrow(0, 0, 1).unwrap()),
        0.0
    );
    // Each layout also reads through the plain file reader.
    for file in ["ti-diffusers.bin", "ti-diffusers.safetensors", "ti-pt.pt"] {
        let v = read_embedding(&ti(&format!("formats/{file}"))).unwrap();
        assert_eq!(max_abs_diff(&v.first, &expected), 0.0, "{file}");
    }
}

/// An embedding of no width (a 1-D tensor of 0 values) was taken as one vector 0 wide
/// (found by the `embedding` fuzz target).
#[test]
fn empty_vectors_are_refused() {
    let header = r#"{"emb_params":{"dtype":"F32","shape":[0],"data_offsets":[0,0]}}"#;
    let mut file = (header.len() as u64).to_le_bytes().to_vec();
    file.extend_from_slice(header.as_bytes());
    let err = read_embedding_bytes(Path::new("empty.safetensors"), &file)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("empty.safetensors") && err.contains("has shape [0]"),
        "{err}"
    );
    // A file that is no weight file at all is named too.
    let err = read_embedding_bytes(Path::new("junk.pt"), b"junk")
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("junk.pt") && err.contains("not a weight file"),
        "{err}"
    );
}

#[test]
fn bad_files_are_skipped_with_the_reason() {
    let set = EmbeddingSet::load_dir(&ti("bad"), TINY).unwrap();
    assert!(set.loaded().is_empty());
    let evil = reason(&set, "evil");
    assert!(
        evil.contains("fractions.Fraction") && evil.contains("not tensor data"),
        "{evil}"
    );
    let two = reason(&set, "two-tensors");
    assert!(
        two.contains("no embedding in it") && two.contains("2 tensors"),
        "{two}"
    );
    let wide = reason(&set, "wide");
    assert!(
        wide.contains("12 wide") && wide.contains("8 wide"),
        "{wide}"
    );
    // The same wide file is fine for a model whose encoder is 12 wide.
    let wide_model = EmbeddingSet::load_dir(
        &ti("bad"),
        TextWidths {
            first: 12,
            second: None,
        },
    )
    .unwrap();
    assert_eq!(wide_model.loaded().len(), 1);
    assert!(read_embedding(&ti("bad/evil.pt")).is_err());
}

#[test]
fn family_pairs_only_load_on_their_family() {
    // SDXL pair on a one-encoder model, and SD1 vectors on SDXL.
    let on_sd1 = EmbeddingSet::load_dir(&ti("sdxl"), TINY).unwrap();
    assert!(reason(&on_sd1, "tixl").contains("one text encoder"));
    let on_sdxl = EmbeddingSet::load_dir(&ti("sd1"), TextWidths::of(&model("sdxl"))).unwrap();
    assert!(reason(&on_sdxl, "tiembed").contains("needs a `clip_l` + `clip_g` pair"));
    // The released models' widths: an 8-wide embedding is not for SD 1.x.
    let released = EmbeddingSet::load_dir(&ti("sd1"), Family::Sd1).unwrap();
    assert!(reason(&released, "tiembed").contains("768 wide"));
    let xl = EmbeddingSet::load_dir(&ti("sdxl"), TextWidths::of(&model("sdxl"))).unwrap();
    let info = xl.get("tixl").unwrap();
    assert_eq!(info.shape, vec![2, 16]);
    let r = refs();
    assert_eq!(
        max_abs_diff(
            xl.vectors("tixl", EncoderSlot::Second).unwrap(),
            &r["sdxl.clip_g"]
        ),
        0.0
    );
}

fn encode_sd1(set: &EmbeddingSet, prompt: &str) -> Tensor {
    let w = model("sd1");
    let clip = w.text_encoder.build(&Device::Cpu, DType::F32).unwrap();
    let tokens = PromptTokens::new(ClipTokenizer::shared().unwrap(), prompt, set.index());
    assert_eq!(tokens.embeddings_used(), ["tiembed"]);
    let enc = TextEncoders {
        family: w.family,
        clip: &clip,
        clip_g: None,
        embeddings: Some(set),
    };
    text::encode(&enc, &tokens, 1).unwrap().context
}

#[test]
fn sd1_conditioning_matches_diffusers_load_textual_inversion() {
    let set = EmbeddingSet::load_dir(&ti("sd1"), TextWidths::of(&model("sd1"))).unwrap();
    let r = refs();
    let got = encode_sd1(&set, "a photo of tiembed riding a horse");
    let err = max_abs_diff(&got, &r["sd1.hidden"]);
    assert!(err < 1e-5, "max abs {err}");
    // Emphasis applies to the vectors as in A1111.
    let got = encode_sd1(&set, "a photo of (tiembed:1.3) riding a horse");
    let err = max_abs_diff(&got, &r["sd1.hidden_weighted"]);
    assert!(err < 1e-5, "weighted: max abs {err}");
    // And without the embedding the output differs: the vectors really were used.
    let plain = EmbeddingSet::empty(TINY);
    let w = model("sd1");
    let clip = w.text_encoder.build(&Device::Cpu, DType::F32).unwrap();
    let tokens = PromptTokens::new(
        ClipTokenizer::shared().unwrap(),
        "a photo of tiembed riding a horse",
        plain.index(),
    );
    let enc = TextEncoders {
        family: w.family,
        clip: &clip,
        clip_g: None,
        embeddings: Some(&plain),
    };
    let without = text::encode(&enc, &tokens, 1).unwrap().context;
    assert!(max_abs_diff(&without, &r["sd1.hidden"]) > 1e-3);
}

#[test]
fn sdxl_conditioning_matches_diffusers_on_both_encoders() {
    let w = model("sdxl");
    let set = EmbeddingSet::load_dir(&ti("sdxl"), TextWidths::of(&w)).unwrap();
    let clip = w.text_encoder.build(&Device::Cpu, DType::F32).unwrap();
    let clip_g = w
        .text_encoder_2
        .as_ref()
        .unwrap()
        .build(&Device::Cpu, DType::F32)
        .unwrap();
    let tokens = PromptTokens::new(
        ClipTokenizer::shared().unwrap(),
        "a photo of tixl riding a horse",
        set.index(),
    );
    let enc = TextEncoders {
        family: w.family,
        clip: &clip,
        clip_g: Some(&clip_g),
        embeddings: Some(&set),
    };
    let cond = text::encode(&enc, &tokens, 1).unwrap();
    let r = refs();
    let err = max_abs_diff(&cond.context, &r["sdxl.hidden"]);
    assert!(err < 1e-5, "hidden max abs {err}");
    let err = max_abs_diff(cond.pooled.as_ref().unwrap(), &r["sdxl.pooled"]);
    assert!(err < 1e-5, "pooled max abs {err}");
}

#[test]
fn reload_reads_only_what_changed() {
    let dir = tempfile::tempdir().unwrap();
    let sub = dir.path().join("people");
    std::fs::create_dir(&sub).unwrap();
    std::fs::copy(ti("sd1/tiembed.safetensors"), sub.join("alice.safetensors")).unwrap();
    let mut set = EmbeddingSet::load_dir(dir.path(), TINY).unwrap();
    assert_eq!(set.loaded().len(), 1);
    assert_eq!(set.loaded()[0].name, "alice");
    assert!(!set.reload().unwrap(), "nothing changed");

    std::fs::copy(ti("formats/ti-single.bin"), dir.path().join("bob.bin")).unwrap();
    assert!(set.reload().unwrap());
    let names: Vec<&str> = set.loaded().iter().map(|e| e.name.as_str()).collect();
    assert_eq!(names, ["alice", "bob"]);
    assert_eq!(set.get("bob").unwrap().vectors, 1);

    // Replaced by a bad file: moves to skipped, nothing else lost.
    std::fs::copy(ti("bad/evil.pt"), sub.join("alice.safetensors")).unwrap();
    assert!(set.reload().unwrap());
    assert!(reason(&set, "alice").contains("not tensor data"));
    assert_eq!(set.loaded().len(), 1);

    std::fs::remove_file(dir.path().join("bob.bin")).unwrap();
    assert!(set.reload().unwrap());
    assert!(set.loaded().is_empty());

    // A name the tokenizer turns into nothing cannot be called: skipped, with why.
    std::fs::copy(
        ti("sd1/tiembed.safetensors"),
        dir.path().join("  .safetensors"),
    )
    .unwrap();
    set.reload().unwrap();
    assert!(reason(&set, "  ").contains("has no tokens"));

    // A missing directory is an empty set, not an error.
    let missing = EmbeddingSet::load_dir(&dir.path().join("nope"), TINY).unwrap();
    assert!(missing.loaded().is_empty() && missing.skipped().is_empty());
}

#[test]
fn engine_uses_embeddings_and_records_ti_hashes() {
    let w = model("sd1");
    let mut engine = Engine::new(w, "sd1", Device::Cpu, DType::F32, VramMode::High).unwrap();
    // Loaded for the released SD 1.x width, re-sorted for this tiny model by the engine.
    let set = EmbeddingSet::load_dir(&ti("sd1"), Family::Sd1).unwrap();
    assert!(set.loaded().is_empty());
    engine.set_embeddings(set);
    let info = &engine.embeddings().loaded()[0];
    // sha256sum fixtures/ti/sd1/tiembed.safetensors = ec3f0ee53e3f…
    assert_eq!(info.hash, "ec3f0ee53e3f");

    let req = Request {
        prompt: "a photo of (tiembed:1.2)".into(),
        negative_prompt: "blurry".into(),
        sampler: "Euler".into(),
        steps: 2,
        width: 64,
        height: 64,
        ..Default::default()
    };
    let with = engine.generate(&req, &mut |_| Flow::Continue).unwrap();
    assert!(
        with[0]
            .infotext
            .contains(r#"TI hashes: "tiembed: ec3f0ee53e3f", Version"#),
        "{}",
        with[0].infotext
    );
    engine.set_embeddings(EmbeddingSet::empty(TINY));
    let without = engine.generate(&req, &mut |_| Flow::Continue).unwrap();
    assert!(!without[0].infotext.contains("TI hashes"));
    assert_ne!(
        with[0].image, without[0].image,
        "the embedding changed the image"
    );
}

#[test]
fn a_name_that_is_a_word_replaces_that_word_as_in_a1111() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::copy(
        ti("sd1/tiembed.safetensors"),
        dir.path().join("horse.safetensors"),
    )
    .unwrap();
    let set = EmbeddingSet::load_dir(dir.path(), TINY).unwrap();
    let tokenizer = ClipTokenizer::shared().unwrap();
    let tokens = PromptTokens::new(tokenizer, "a (horse:1.2), a horses", set.index());
    assert_eq!(tokens.embeddings_used(), ["horse"]);
    // "horse" is replaced (also inside emphasis, weighted); "horses" is another token.
    let chunk = &tokenize_prompt(
        tokenizer,
        "a (horse:1.2), a horses",
        set.index(),
        &ChunkOptions::clip_l(),
    )
    .chunks[0];
    assert_eq!(chunk.embeddings.len(), 1);
    let at = chunk.embeddings[0].position;
    assert_eq!(chunk.multipliers[at..at + 2], [1.2, 1.2]);
    let w = model("sd1");
    let clip = w.text_encoder.build(&Device::Cpu, DType::F32).unwrap();
    let enc = TextEncoders {
        family: w.family,
        clip: &clip,
        clip_g: None,
        embeddings: Some(&set),
    };
    let with = text::encode(&enc, &tokens, 1).unwrap().context;
    let plain = PromptTokens::new(
        tokenizer,
        "a (horse:1.2), a horses",
        EmbeddingSet::empty(TINY).index(),
    );
    let without = text::encode(&enc, &plain, 1).unwrap().context;
    assert!(max_abs_diff(&with, &without) > 1e-3);
}
