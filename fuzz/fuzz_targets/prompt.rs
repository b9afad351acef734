//! The prompt parser (`crates/pipeline/src/prompt.rs`): A1111 emphasis and BREAK, then CLIP
//! tokens packed into 77-token chunks with the comma backtrack and embeddings of 1, 3 and
//! 75 vectors. The first byte picks the chunk options.
#![no_main]

use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use sdkube_pipeline::prompt::{
    parse_prompt_attention, tokenize_prompt, ChunkOptions, EmbeddingIndex, EosPlacement,
    CHUNK_TEXT_TOKENS, CHUNK_TOKENS,
};
use sdkube_pipeline::tokenizer::ClipTokenizer;

fn setup() -> &'static (ClipTokenizer, EmbeddingIndex) {
    static SETUP: OnceLock<(ClipTokenizer, EmbeddingIndex)> = OnceLock::new();
    SETUP.get_or_init(|| {
        let tokenizer = ClipTokenizer::new().expect("the embedded vocabulary");
        let mut index = EmbeddingIndex::new();
        for (name, vectors) in [("emb", 3), ("one-vec", 1), ("huge style", 75)] {
            index
                .insert(&tokenizer, name, vectors)
                .expect("a valid embedding");
        }
        (tokenizer, index)
    })
}

fuzz_target!(|data: &[u8]| {
    let Some((&flags, text)) = data.split_first() else {
        return;
    };
    let text = String::from_utf8_lossy(text);
    let runs = parse_prompt_attention(&text);
    assert!(!runs.is_empty());
    let (tokenizer, index) = setup();
    let mut options = if flags & 1 == 0 {
        ChunkOptions::clip_l()
    } else {
        ChunkOptions::open_clip()
    };
    options.parse_attention = flags & 2 == 0;
    options.comma_padding_backtrack = [20, 0, 1, 74][(flags >> 2 & 3) as usize];
    if flags & 16 != 0 {
        options.eos = EosPlacement::AfterText;
    }
    let empty = EmbeddingIndex::new();
    let embeddings = if flags & 32 == 0 { index } else { &empty };
    let prompt = tokenize_prompt(tokenizer, &text, embeddings, &options);
    assert!(!prompt.chunks.is_empty());
    assert!(prompt.token_count <= prompt.chunks.len() * CHUNK_TEXT_TOKENS);
    for chunk in &prompt.chunks {
        for e in &chunk.embeddings {
            assert!(
                e.position >= 1 && e.position + e.vectors < CHUNK_TOKENS,
                "{e:?}"
            );
        }
    }
});
