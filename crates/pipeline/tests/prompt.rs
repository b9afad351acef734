//! A1111 prompt syntax and chunking. Expected values come from the examples in the
//! docstring of A1111's `modules/prompt_parser.py` and, for chunk boundaries, from the
//! documented behaviour of `modules/sd_hijack_clip.py` (`tokenize_line`), reasoned out
//! token by token in each test.

use anyhow::Result;
use rand::{Rng, SeedableRng};
use sdkube_pipeline::prompt::{
    parse_prompt_attention, tokenize_prompt, ChunkOptions, EmbeddingIndex, EmbeddingPlacement,
    EosPlacement, PromptChunk, PromptError, TokenizedPrompt, CHUNK_TOKENS,
};
use sdkube_pipeline::tokenizer::{ClipTokenizer, BOS_ID, EOS_ID, VOCAB_SIZE};

fn runs(expected: &[(&str, f64)]) -> Vec<(String, f32)> {
    expected
        .iter()
        .map(|(t, w)| (t.to_string(), *w as f32))
        .collect()
}

#[test]
fn a1111_docstring_examples() {
    assert_eq!(
        parse_prompt_attention("normal text"),
        runs(&[("normal text", 1.0)])
    );
    assert_eq!(
        parse_prompt_attention("an (important) word"),
        runs(&[("an ", 1.0), ("important", 1.1), (" word", 1.0)])
    );
    assert_eq!(
        parse_prompt_attention("(unbalanced"),
        runs(&[("unbalanced", 1.1)])
    );
    assert_eq!(
        parse_prompt_attention(r"\(literal\]"),
        runs(&[("(literal]", 1.0)])
    );
    assert_eq!(
        parse_prompt_attention("(unnecessary)(parens)"),
        runs(&[("unnecessaryparens", 1.1)])
    );
    assert_eq!(
        parse_prompt_attention("a (((house:1.3)) [on] a (hill:0.5), sun, (((sky)))."),
        runs(&[
            ("a ", 1.0),
            ("house", 1.5730000000000004),
            (" ", 1.1),
            ("on", 1.0),
            (" a ", 1.1),
            ("hill", 0.55),
            (", sun, ", 1.1),
            ("sky", 1.4641000000000006),
            (".", 1.1),
        ])
    );
}

#[test]
fn emphasis_edge_cases() {
    // Nesting multiplies; square brackets divide.
    assert_eq!(parse_prompt_attention("((a))"), runs(&[("a", 1.1 * 1.1)]));
    assert_eq!(
        parse_prompt_attention("[[a]]"),
        runs(&[("a", 1.0 / 1.1 / 1.1)])
    );
    assert_eq!(parse_prompt_attention("[a"), runs(&[("a", 1.0 / 1.1)]));
    // Explicit weights, with spaces and signs.
    assert_eq!(parse_prompt_attention("(a: 1.5 )"), runs(&[("a", 1.5)]));
    assert_eq!(
        parse_prompt_attention("(a:-0.5)b"),
        runs(&[("a", -0.5), ("b", 1.0)])
    );
    assert_eq!(parse_prompt_attention("(a:.5)"), runs(&[("a", 0.5)]));
    // A weight without an open bracket, or unclosed, is text.
    assert_eq!(parse_prompt_attention("a:1.3)"), runs(&[("a:1.3)", 1.0)]));
    assert_eq!(parse_prompt_attention("(a:1.3"), runs(&[("a:1.3", 1.1)]));
    // Unmatched closers are text.
    assert_eq!(parse_prompt_attention("a) b]"), runs(&[("a) b]", 1.0)]));
    // A weight Python's float() rejects stays text (A1111 raises).
    assert_eq!(
        parse_prompt_attention("(x:1.2.3)"),
        runs(&[("x:1.2.3)", 1.1)])
    );
    // Escapes; a backslash before anything else disappears.
    assert_eq!(
        parse_prompt_attention(r"\\ \[a\) a\b"),
        runs(&[(r"\ [a) ab", 1.0)])
    );
    // Empty prompt.
    assert_eq!(parse_prompt_attention(""), runs(&[("", 1.0)]));
    assert_eq!(parse_prompt_attention("()"), runs(&[("", 1.0)]));
}

#[test]
fn break_is_a_marker_only_as_a_whole_word() {
    assert_eq!(
        parse_prompt_attention("a cat BREAK a dog"),
        runs(&[("a cat", 1.0), ("BREAK", -1.0), ("a dog", 1.0)])
    );
    assert_eq!(
        parse_prompt_attention("BREAKFAST break aBREAK"),
        runs(&[("BREAKFAST break aBREAK", 1.0)])
    );
    // Inside brackets the marker is weighted too, and then is no marker any more.
    assert_eq!(
        parse_prompt_attention("(a BREAK b)"),
        runs(&[("a", 1.1), ("BREAK", -1.1), ("b", 1.1)])
    );
    assert_eq!(
        parse_prompt_attention("BREAK"),
        runs(&[("", 1.0), ("BREAK", -1.0), ("", 1.0)])
    );
}

struct Words {
    tok: &'static ClipTokenizer,
    cat: u32,
    dog: u32,
    comma: u32,
}

fn words() -> Result<Words> {
    let tok = ClipTokenizer::shared()?;
    let single = |w: &str| -> Result<u32> {
        let ids = tok.encode(w);
        anyhow::ensure!(ids.len() == 1, "{w:?} is {} tokens", ids.len());
        Ok(ids[0])
    };
    let (cat, dog, comma) = (single("cat")?, single("dog")?, single(",")?);
    Ok(Words {
        tok,
        cat,
        dog,
        comma,
    })
}

fn chunk_text(chunk: &PromptChunk) -> &[u32] {
    &chunk.tokens[1..CHUNK_TOKENS - 1]
}

/// The prompt tokens of a chunk, padding stripped.
fn content(chunk: &PromptChunk, pad: u32) -> Vec<u32> {
    let text = chunk_text(chunk);
    let end = text.iter().rposition(|&t| t != pad).map_or(0, |i| i + 1);
    text[..end].to_vec()
}

fn check_frame(prompt: &TokenizedPrompt, pad: u32) {
    assert!(!prompt.chunks.is_empty());
    for chunk in &prompt.chunks {
        assert_eq!(chunk.tokens[0], BOS_ID);
        assert_eq!(chunk.tokens[CHUNK_TOKENS - 1], EOS_ID);
        let text = chunk_text(chunk);
        let len = content(chunk, pad).len();
        assert!(text[len..].iter().all(|&t| t == pad));
        assert!(chunk.multipliers[len + 1..].iter().all(|&m| m == 1.0));
        assert_eq!(
            (chunk.multipliers[0], chunk.multipliers[CHUNK_TOKENS - 1]),
            (1.0, 1.0)
        );
    }
}

fn plain(w: &Words, text: &str) -> TokenizedPrompt {
    tokenize_prompt(w.tok, text, &EmbeddingIndex::new(), &ChunkOptions::clip_l())
}

#[test]
fn an_empty_prompt_is_one_padded_chunk() -> Result<()> {
    let w = words()?;
    let p = plain(&w, "");
    assert_eq!(p.chunks.len(), 1);
    assert_eq!(p.token_count, 0);
    let mut expected = [EOS_ID; CHUNK_TOKENS];
    expected[0] = BOS_ID;
    assert_eq!(p.chunks[0].tokens, expected);
    assert_eq!(p.chunks[0], PromptChunk::empty());
    // OpenCLIP pads with 0 but still ends with EOS.
    let p = tokenize_prompt(
        w.tok,
        "",
        &EmbeddingIndex::new(),
        &ChunkOptions::open_clip(),
    );
    let mut expected = [0; CHUNK_TOKENS];
    expected[0] = BOS_ID;
    expected[CHUNK_TOKENS - 1] = EOS_ID;
    assert_eq!(p.chunks[0].tokens, expected);
    Ok(())
}

#[test]
fn a_short_prompt_keeps_its_tokens_and_weights() -> Result<()> {
    let w = words()?;
    let p = plain(&w, "a (cat:1.3) and a [dog]");
    assert_eq!(p.chunks.len(), 1);
    check_frame(&p, EOS_ID);
    let c = &p.chunks[0];
    let expected: Vec<u32> = ["a ", "cat", " and a ", "dog"]
        .iter()
        .flat_map(|t| w.tok.encode(t))
        .collect();
    assert_eq!(content(c, EOS_ID), expected);
    assert_eq!(p.token_count, expected.len());
    let weights: Vec<f32> = c.multipliers[1..=expected.len()].to_vec();
    assert_eq!(weights, vec![1.0, 1.3, 1.0, 1.0, (1.0f64 / 1.1) as f32]);
    Ok(())
}

#[test]
fn a_weight_covers_every_token_of_a_multi_token_word() -> Result<()> {
    let w = words()?;
    let word = "supercalifragilisticexpialidocious";
    let word_ids = w.tok.encode(word);
    assert!(
        word_ids.len() > 3,
        "the word should split into several tokens"
    );
    let p = plain(&w, &format!("({word}:1.3) cat"));
    let c = &p.chunks[0];
    let n = word_ids.len();
    assert_eq!(&c.tokens[1..=n], &word_ids[..]);
    assert!(c.multipliers[1..=n].iter().all(|&m| m == 1.3));
    assert_eq!((c.tokens[n + 1], c.multipliers[n + 1]), (w.cat, 1.0));
    Ok(())
}

#[test]
fn long_prompts_fill_chunks_of_75() -> Result<()> {
    let w = words()?;
    // Exactly 75 tokens: one full chunk, no padding.
    let p = plain(&w, &"cat ".repeat(75));
    assert_eq!(p.chunks.len(), 1);
    assert_eq!(content(&p.chunks[0], EOS_ID), vec![w.cat; 75]);
    assert_eq!(p.token_count, 75);
    // 76 tokens: the 76th starts a second chunk.
    let p = plain(&w, &"cat ".repeat(76));
    assert_eq!(p.chunks.len(), 2);
    assert_eq!(content(&p.chunks[1], EOS_ID), vec![w.cat]);
    assert_eq!(p.token_count, 76);
    // 160 tokens: 75 + 75 + 10.
    let p = plain(&w, &"cat ".repeat(160));
    check_frame(&p, EOS_ID);
    let lens: Vec<usize> = p.chunks.iter().map(|c| content(c, EOS_ID).len()).collect();
    assert_eq!(lens, vec![75, 75, 10]);
    assert_eq!(p.token_count, 160);
    Ok(())
}

#[test]
fn break_starts_a_new_chunk() -> Result<()> {
    let w = words()?;
    let p = plain(&w, "cat BREAK dog");
    assert_eq!(p.chunks.len(), 2);
    check_frame(&p, EOS_ID);
    assert_eq!(content(&p.chunks[0], EOS_ID), vec![w.cat]);
    assert_eq!(content(&p.chunks[1], EOS_ID), vec![w.dog]);
    assert_eq!(p.token_count, 75 + 1);
    // A trailing BREAK adds nothing; a lone BREAK is one empty chunk.
    assert_eq!(plain(&w, "cat BREAK").chunks.len(), 1);
    let p = plain(&w, "BREAK");
    assert_eq!(p.chunks, vec![PromptChunk::empty()]);
    // A weighted BREAK is just the word "break".
    let p = plain(&w, "(cat BREAK dog)");
    assert_eq!(p.chunks.len(), 1);
    assert_eq!(content(&p.chunks[0], EOS_ID), w.tok.encode("cat BREAK dog"));
    Ok(())
}

fn cats_comma_dogs(cats: usize, dogs: usize) -> String {
    format!("{}, {}", "cat ".repeat(cats), "dog ".repeat(dogs))
}

#[test]
fn comma_backtrack_moves_the_words_after_the_last_comma() -> Result<()> {
    let w = words()?;
    // 70 cats, a comma at offset 70, 10 dogs. The chunk is full after 4 dogs; the comma
    // is 75 - 70 = 5 <= 20 tokens back, so the 4 dogs move on with the other 6.
    let p = plain(&w, &cats_comma_dogs(70, 10));
    check_frame(&p, EOS_ID);
    assert_eq!(p.chunks.len(), 2);
    let mut first = vec![w.cat; 70];
    first.push(w.comma);
    assert_eq!(content(&p.chunks[0], EOS_ID), first);
    assert_eq!(content(&p.chunks[1], EOS_ID), vec![w.dog; 10]);
    assert_eq!(p.token_count, 75 + 10);

    // Disabled: a plain cut after 75 tokens.
    let options = ChunkOptions {
        comma_padding_backtrack: 0,
        ..ChunkOptions::clip_l()
    };
    let p = tokenize_prompt(
        w.tok,
        &cats_comma_dogs(70, 10),
        &EmbeddingIndex::new(),
        &options,
    );
    assert_eq!(content(&p.chunks[0], EOS_ID).len(), 75);
    assert_eq!(content(&p.chunks[1], EOS_ID), vec![w.dog; 6]);

    // The limit is inclusive: comma at offset 55 is 20 back (moves), at 54 is 21 (stays).
    let p = plain(&w, &cats_comma_dogs(55, 30));
    assert_eq!(content(&p.chunks[0], EOS_ID).len(), 56);
    assert_eq!(content(&p.chunks[1], EOS_ID), vec![w.dog; 30]);
    let p = plain(&w, &cats_comma_dogs(54, 30));
    assert_eq!(content(&p.chunks[0], EOS_ID).len(), 75);
    assert_eq!(content(&p.chunks[1], EOS_ID), vec![w.dog; 10]);
    Ok(())
}

#[test]
fn open_clip_chunks_pad_with_zero() -> Result<()> {
    let w = words()?;
    let p = tokenize_prompt(
        w.tok,
        &"cat ".repeat(80),
        &EmbeddingIndex::new(),
        &ChunkOptions::open_clip(),
    );
    check_frame(&p, 0);
    assert_eq!(content(&p.chunks[1], 0), vec![w.cat; 5]);
    assert_eq!(p.chunks[1].tokens[6..CHUNK_TOKENS - 1], [0; 70]);
    Ok(())
}

#[test]
fn eos_placement_and_pooled_position() -> Result<()> {
    let w = words()?;
    let none = EmbeddingIndex::new();
    // A1111 + OpenCLIP: BOS cat dog 0... EOS; the pooled output is read at the last slot.
    let a1111 = tokenize_prompt(w.tok, "cat dog", &none, &ChunkOptions::open_clip());
    let c = &a1111.chunks[0];
    assert_eq!(c.tokens[..4], [BOS_ID, w.cat, w.dog, 0]);
    assert_eq!(
        (c.tokens[CHUNK_TOKENS - 1], c.eos_position()),
        (EOS_ID, CHUNK_TOKENS - 1)
    );
    // transformers layout: BOS cat dog EOS 0...
    let options = ChunkOptions {
        eos: EosPlacement::AfterText,
        ..ChunkOptions::open_clip()
    };
    let hf = tokenize_prompt(w.tok, "cat dog", &none, &options);
    let c = &hf.chunks[0];
    assert_eq!(c.tokens[..5], [BOS_ID, w.cat, w.dog, EOS_ID, 0]);
    assert_eq!(c.tokens[CHUNK_TOKENS - 1], 0);
    assert_eq!(c.eos_position(), 3);
    // SD1 pads with EOS: both layouts agree, pooled at the first EOS after the text.
    let sd1 = ChunkOptions {
        eos: EosPlacement::AfterText,
        ..ChunkOptions::clip_l()
    };
    let p = tokenize_prompt(w.tok, "cat dog", &none, &sd1);
    assert_eq!(
        p,
        tokenize_prompt(w.tok, "cat dog", &none, &ChunkOptions::clip_l())
    );
    assert_eq!(p.chunks[0].eos_position(), 3);
    // A full chunk has its EOS in the last slot in both layouts.
    let full = tokenize_prompt(w.tok, &"cat ".repeat(75), &none, &options);
    assert_eq!(full.chunks[0].eos_position(), CHUNK_TOKENS - 1);
    Ok(())
}

#[test]
fn embeddings_take_one_slot_per_vector() -> Result<()> {
    let w = words()?;
    let mut index = EmbeddingIndex::new();
    index.insert(w.tok, "myemb", 3)?;
    index.insert(w.tok, "myemb2", 2)?;
    let p = tokenize_prompt(
        w.tok,
        "cat (myemb:1.2), myemb2 dog",
        &index,
        &ChunkOptions::clip_l(),
    );
    let c = &p.chunks[0];
    // BOS, cat, 3 slots, comma, 2 slots, dog.
    assert_eq!(c.tokens[1..=8], [w.cat, 0, 0, 0, w.comma, 0, 0, w.dog]);
    assert_eq!(
        c.multipliers[1..=8],
        [1.0, 1.2, 1.2, 1.2, 1.0, 1.0, 1.0, 1.0]
    );
    assert_eq!(
        c.embeddings,
        vec![
            EmbeddingPlacement {
                position: 2,
                name: "myemb".into(),
                vectors: 3
            },
            EmbeddingPlacement {
                position: 6,
                name: "myemb2".into(),
                vectors: 2
            },
        ]
    );
    assert_eq!(p.token_count, 8);
    Ok(())
}

#[test]
fn an_embedding_never_straddles_two_chunks() -> Result<()> {
    let w = words()?;
    let mut index = EmbeddingIndex::new();
    index.insert(w.tok, "myemb", 3)?;
    // 73 cats leave room for 2 slots; the 3-vector embedding goes to the next chunk.
    let p = tokenize_prompt(
        w.tok,
        &format!("{}myemb", "cat ".repeat(73)),
        &index,
        &ChunkOptions::clip_l(),
    );
    check_frame(&p, EOS_ID);
    assert_eq!(content(&p.chunks[0], EOS_ID), vec![w.cat; 73]);
    assert!(p.chunks[0].embeddings.is_empty());
    assert_eq!(
        p.chunks[1].embeddings,
        vec![EmbeddingPlacement {
            position: 1,
            name: "myemb".into(),
            vectors: 3
        }]
    );
    assert_eq!(p.token_count, 75 + 3);
    Ok(())
}

#[test]
fn comma_backtrack_carries_embeddings_along() -> Result<()> {
    let w = words()?;
    let mut index = EmbeddingIndex::new();
    index.insert(w.tok, "myemb", 2)?;
    // 60 cats, comma (offset 60), 12 cats, 2 slots = 75; "dog" triggers the backtrack
    // (75 - 60 = 15 <= 20): 12 cats and the embedding move to chunk 2, slots at 13..15.
    let text = format!("{}, {}myemb dog", "cat ".repeat(60), "cat ".repeat(12));
    let p = tokenize_prompt(w.tok, &text, &index, &ChunkOptions::clip_l());
    assert_eq!(p.chunks.len(), 2);
    assert_eq!(content(&p.chunks[0], EOS_ID).len(), 61);
    assert!(p.chunks[0].embeddings.is_empty());
    assert_eq!(
        p.chunks[1].embeddings,
        vec![EmbeddingPlacement {
            position: 13,
            name: "myemb".into(),
            vectors: 2
        }]
    );
    assert_eq!(p.chunks[1].tokens[13..=15], [0, 0, w.dog]);
    Ok(())
}

#[test]
fn bad_embeddings_are_refused_with_a_reason() -> Result<()> {
    let w = words()?;
    let mut index = EmbeddingIndex::new();
    for vectors in [0, 76] {
        let err = index.insert(w.tok, "big", vectors).unwrap_err();
        assert_eq!(
            err,
            PromptError::EmbeddingSize {
                name: "big".into(),
                vectors
            }
        );
    }
    let err = index.insert(w.tok, "  ", 1).unwrap_err();
    assert_eq!(err, PromptError::EmptyEmbeddingName("  ".into()));
    assert!(index.is_empty());
    // A 75-vector embedding fills a chunk on its own.
    index.insert(w.tok, "huge", 75)?;
    let p = tokenize_prompt(w.tok, "cat huge cat", &index, &ChunkOptions::clip_l());
    assert_eq!(p.chunks.len(), 3);
    assert_eq!(p.chunks[1].embeddings[0].position, 1);
    Ok(())
}

#[test]
fn literal_mode_ignores_the_syntax() -> Result<()> {
    let w = words()?;
    let options = ChunkOptions {
        parse_attention: false,
        ..ChunkOptions::clip_l()
    };
    let p = tokenize_prompt(
        w.tok,
        "(cat:1.5) BREAK dog",
        &EmbeddingIndex::new(),
        &options,
    );
    assert_eq!(p.chunks.len(), 1);
    assert_eq!(
        content(&p.chunks[0], EOS_ID),
        w.tok.encode("(cat:1.5) BREAK dog")
    );
    assert!(p.chunks[0].multipliers.iter().all(|&m| m == 1.0));
    Ok(())
}

#[test]
fn random_prompts_never_panic_and_stay_well_formed() -> Result<()> {
    let w = words()?;
    let mut index = EmbeddingIndex::new();
    index.insert(w.tok, "cat", 4)?;
    let alphabet: Vec<char> = "()[]\\:.,-+0123456789 BREAKcatdog éß東😀\t\n"
        .chars()
        .collect();
    let mut rng = rand::rngs::StdRng::seed_from_u64(11);
    for _ in 0..1500 {
        let len = rng.random_range(0..200);
        let text: String = (0..len)
            .map(|_| {
                if rng.random_bool(0.1) {
                    char::from_u32(rng.random_range(0..0x11000)).unwrap_or('x')
                } else {
                    alphabet[rng.random_range(0..alphabet.len())]
                }
            })
            .collect();
        let _ = parse_prompt_attention(&text);
        for options in [ChunkOptions::clip_l(), ChunkOptions::open_clip()] {
            let p = tokenize_prompt(w.tok, &text, &index, &options);
            assert!(!p.chunks.is_empty());
            for chunk in &p.chunks {
                assert_eq!(
                    (chunk.tokens[0], chunk.tokens[CHUNK_TOKENS - 1]),
                    (BOS_ID, EOS_ID)
                );
                assert!(chunk.tokens.iter().all(|&t| (t as usize) < VOCAB_SIZE));
                for e in &chunk.embeddings {
                    assert!(
                        e.position >= 1 && e.position + e.vectors < CHUNK_TOKENS,
                        "{text:?}"
                    );
                }
            }
        }
    }
    Ok(())
}
