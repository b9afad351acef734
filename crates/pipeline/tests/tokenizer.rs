//! The CLIP tokenizer against transformers' `CLIPTokenizer` ids for a corpus of tricky
//! prompts (`fixtures/tokenizer/tokens.json`, written by
//! `scripts/make_tokenizer_fixtures.py`).

use anyhow::{Context, Result};
use rand::{Rng, SeedableRng};
use sdkube_pipeline::tokenizer::{ClipTokenizer, TokenizerError, BOS_ID, EOS_ID, VOCAB_SIZE};
use serde_json::Value;

fn fixtures() -> Result<Value> {
    let path = sdkube_testkit::fixtures().join("tokenizer/tokens.json");
    let text =
        std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
    Ok(serde_json::from_str(&text)?)
}

fn ids(value: &Value) -> Vec<u32> {
    value
        .as_array()
        .expect("ids array")
        .iter()
        .map(|v| v.as_u64().expect("id") as u32)
        .collect()
}

#[test]
fn every_corpus_prompt_matches_transformers() -> Result<()> {
    let tok = ClipTokenizer::shared()?;
    let doc = fixtures()?;
    let cases = doc["cases"].as_array().context("cases")?;
    assert!(cases.len() > 100, "corpus too small: {}", cases.len());
    let mut failures = Vec::new();
    for case in cases {
        let text = case["text"].as_str().context("text")?;
        let expected = ids(&case["ids"]);
        let got = tok.encode(text);
        if got != expected {
            failures.push(format!(
                "{text:?}\n  expected {expected:?}\n  got      {got:?}"
            ));
        }
    }
    assert!(
        failures.is_empty(),
        "{} mismatches:\n{}",
        failures.len(),
        failures.join("\n")
    );
    Ok(())
}

#[test]
fn special_and_named_ids_match_transformers() -> Result<()> {
    let tok = ClipTokenizer::new()?;
    let doc = fixtures()?;
    assert_eq!(doc["bos"].as_u64(), Some(u64::from(tok.bos())));
    assert_eq!(doc["eos"].as_u64(), Some(u64::from(tok.eos())));
    assert_eq!((tok.bos(), tok.eos()), (BOS_ID, EOS_ID));
    assert_eq!(tok.vocab_size(), VOCAB_SIZE);
    for (name, id) in doc["named_tokens"].as_object().context("named_tokens")? {
        assert_eq!(tok.token_id(name).map(u64::from), id.as_u64(), "{name}");
        assert_eq!(
            tok.token_text(id.as_u64().unwrap() as u32),
            Some(name.as_str())
        );
    }
    assert_eq!(tok.token_id("no-such-token</w>"), None);
    Ok(())
}

#[test]
fn decode_inverts_encode_up_to_case_and_spacing() -> Result<()> {
    let tok = ClipTokenizer::new()?;
    let cases = [
        ("A Photo of a CAT", "a photo of a cat"),
        ("hello   world!!!", "hello world !!!"),
        ("café 東京 😀", "café 東京 😀"),
        ("it's", "it 's"),
    ];
    for (text, expected) in cases {
        assert_eq!(tok.decode(&tok.encode(text))?, expected, "{text:?}");
    }
    assert_eq!(
        tok.decode(&[BOS_ID, 320, EOS_ID])?,
        "<|startoftext|>a <|endoftext|>"
    );
    assert!(matches!(
        tok.decode(&[320, 49_408]),
        Err(TokenizerError::UnknownId(49_408))
    ));
    Ok(())
}

#[test]
fn the_shared_tokenizer_is_built_once() -> Result<()> {
    let a = ClipTokenizer::shared()?;
    let b = ClipTokenizer::shared()?;
    assert!(std::ptr::eq(a, b));
    assert_eq!(
        a.encode("a photo of a cat"),
        ClipTokenizer::new()?.encode("a photo of a cat")
    );
    Ok(())
}

#[test]
fn a_corrupt_merge_list_is_an_error_naming_the_line() {
    let err = ClipTokenizer::from_merges("#version: 0.2\ni n\nthis line has three\n").unwrap_err();
    assert!(
        matches!(err, TokenizerError::CorruptMerges { line: 3, .. }),
        "{err}"
    );
    let err = ClipTokenizer::from_merges("i n\n").unwrap_err();
    assert!(
        matches!(err, TokenizerError::CorruptMerges { line: 1, .. }),
        "{err}"
    );
    let err = ClipTokenizer::from_merges("#version: 0.2\ni n\nt h\n").unwrap_err();
    assert!(err.to_string().contains("only 2 merges"), "{err}");
    let err = ClipTokenizer::from_merges("#version: 0.2\nin x\n").unwrap_err();
    assert!(err.to_string().contains("\"in\""), "{err}");
}

#[test]
fn random_unicode_never_panics_and_stays_in_the_vocabulary() -> Result<()> {
    let tok = ClipTokenizer::new()?;
    let mut rng = rand::rngs::StdRng::seed_from_u64(7);
    for _ in 0..2000 {
        let len = rng.random_range(0..64);
        let text: String = (0..len)
            .map(|_| loop {
                // Bias towards the BMP, but reach every plane.
                let max = if rng.random_bool(0.8) {
                    0xFFFF
                } else {
                    0x10FFFF
                };
                if let Some(c) = char::from_u32(rng.random_range(0..=max)) {
                    break c;
                }
            })
            .collect();
        let encoded = tok.encode(&text);
        assert!(
            encoded.iter().all(|&id| (id as usize) < VOCAB_SIZE),
            "{text:?}"
        );
        tok.decode(&encoded)?;
    }
    Ok(())
}

#[test]
fn a_huge_single_word_encodes_quickly() -> Result<()> {
    let tok = ClipTokenizer::new()?;
    let word = "ab".repeat(50_000);
    let start = std::time::Instant::now();
    let encoded = tok.encode(&word);
    assert!(!encoded.is_empty());
    assert_eq!(tok.decode(&encoded)?, word);
    assert!(start.elapsed().as_secs() < 5, "took {:?}", start.elapsed());
    Ok(())
}
