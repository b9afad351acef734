//! AUTOMATIC1111 prompt syntax: emphasis, BREAK, and chunking into 77-token windows.
//!
//! Two steps, as in the web UI (`modules/prompt_parser.py`, `modules/sd_hijack_clip.py`):
//!
//! 1. [`parse_prompt_attention`] turns `a (red:1.3) [cat]` into text runs with weights:
//!    `(x)` ×1.1, `[x]` ÷1.1, `(x:1.3)` ×1.3, nesting multiplies, `\(` `\)` `\[` `\]` `\\`
//!    are literal, unclosed brackets apply up to the end, `BREAK` becomes
//!    `("BREAK", -1.0)`, and neighbouring runs of equal weight are joined.
//! 2. [`tokenize_prompt`] tokenizes each run and packs the tokens into chunks of 75, each
//!    framed as BOS + 75 + EOS = 77 (the CLIP context), padded with the encoder's pad
//!    token, with one emphasis multiplier per token. `BREAK` starts a new chunk; when a
//!    chunk fills up and its last comma is at most `comma_padding_backtrack` tokens back,
//!    the words after that comma move to the next chunk; textual-inversion embeddings
//!    (matched by token ids, like A1111) occupy one slot per vector and never straddle
//!    two chunks.
//!
//! The text encoder encodes every chunk separately, scales each token's hidden state by
//! its multiplier (A1111 then restores the original mean), and concatenates the chunks
//! along the sequence axis.

use std::collections::HashMap;
use std::sync::OnceLock;

use regex::Regex;

use crate::tokenizer::{ClipTokenizer, BOS_ID, EOS_ID};

/// Tokens of prompt text per chunk.
pub const CHUNK_TEXT_TOKENS: usize = 75;
/// Tokens per chunk fed to the text encoder: BOS + 75 + EOS.
pub const CHUNK_TOKENS: usize = CHUNK_TEXT_TOKENS + 2;
/// Weight [`parse_prompt_attention`] gives a `BREAK` marker.
pub const BREAK_WEIGHT: f32 = -1.0;
const ROUND_MULTIPLIER: f64 = 1.1;
const SQUARE_MULTIPLIER: f64 = 1.0 / 1.1;

/// Why a prompt could not be turned into chunks.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum PromptError {
    /// The embedding's name tokenizes to nothing.
    #[error("embedding name {0:?} has no tokens, so no prompt can refer to it")]
    EmptyEmbeddingName(String),
    /// The embedding has too many vectors (or none) for one chunk.
    #[error(
        "embedding {name:?} has {vectors} vectors; it must have 1 to {CHUNK_TEXT_TOKENS} \
         to fit in one {CHUNK_TOKENS}-token chunk"
    )]
    EmbeddingSize {
        /// The embedding.
        name: String,
        /// Its vector count.
        vectors: usize,
    },
}

/// Python's `\s` (Unicode whitespace plus the ASCII information separators).
const PY_SPACE: &str = r"[\s\x1c-\x1f]";

fn attention_pattern() -> &'static Regex {
    static PATTERN: OnceLock<Regex> = OnceLock::new();
    PATTERN.get_or_init(|| {
        // Alternatives are tried left to right, as in A1111's `re_attention`.
        let pattern = format!(
            r"\\\(|\\\)|\\\[|\\\]|\\\\|\\|\(|\[|:{PY_SPACE}*([+-]?[.\d]+){PY_SPACE}*\)|\)|\]|[^\\()\[\]:]+|:"
        );
        Regex::new(&pattern).expect("the attention pattern is a valid regex")
    })
}

fn break_pattern() -> &'static Regex {
    static PATTERN: OnceLock<Regex> = OnceLock::new();
    PATTERN.get_or_init(|| {
        let pattern = format!(r"{PY_SPACE}*\bBREAK\b{PY_SPACE}*");
        Regex::new(&pattern).expect("the BREAK pattern is a valid regex")
    })
}

/// Text runs of `text` with their emphasis weights, A1111's `parse_prompt_attention`.
///
/// Weights are computed in f64 (as Python does) and returned as f32. `BREAK` (a whole
/// word, upper case) yields `("BREAK", -1.0)`. An empty result is `[("", 1.0)]`.
/// Where A1111 would raise (a weight such as `(x:1.2.3)` that Python's `float` rejects),
/// the text `:1.2.3)` is kept literally instead.
pub fn parse_prompt_attention(text: &str) -> Vec<(String, f32)> {
    let mut runs: Vec<(String, f64)> = Vec::new();
    let mut round: Vec<usize> = Vec::new();
    let mut square: Vec<usize> = Vec::new();
    let multiply_from = |runs: &mut Vec<(String, f64)>, start: usize, by: f64| {
        for run in &mut runs[start..] {
            run.1 *= by;
        }
    };
    for m in attention_pattern().captures_iter(text) {
        let whole = m.get(0).map_or("", |g| g.as_str());
        let weight = m.get(1).and_then(|g| g.as_str().parse::<f64>().ok());
        if let Some(escaped) = whole.strip_prefix('\\') {
            runs.push((escaped.to_string(), 1.0));
        } else if whole == "(" {
            round.push(runs.len());
        } else if whole == "[" {
            square.push(runs.len());
        } else if let (Some(weight), Some(start)) = (weight, round.last().copied()) {
            round.pop();
            multiply_from(&mut runs, start, weight);
        } else if whole == ")" && !round.is_empty() {
            let start = round.pop().unwrap_or(0);
            multiply_from(&mut runs, start, ROUND_MULTIPLIER);
        } else if whole == "]" && !square.is_empty() {
            let start = square.pop().unwrap_or(0);
            multiply_from(&mut runs, start, SQUARE_MULTIPLIER);
        } else {
            for (i, part) in break_pattern().split(whole).enumerate() {
                if i > 0 {
                    runs.push(("BREAK".to_string(), f64::from(BREAK_WEIGHT)));
                }
                runs.push((part.to_string(), 1.0));
            }
        }
    }
    for start in round {
        multiply_from(&mut runs, start, ROUND_MULTIPLIER);
    }
    for start in square {
        multiply_from(&mut runs, start, SQUARE_MULTIPLIER);
    }
    if runs.is_empty() {
        runs.push((String::new(), 1.0));
    }
    let mut merged: Vec<(String, f64)> = Vec::with_capacity(runs.len());
    for (text, weight) in runs {
        match merged.last_mut() {
            Some(last) if last.1 == weight => last.0.push_str(&text),
            _ => merged.push((text, weight)),
        }
    }
    merged.into_iter().map(|(t, w)| (t, w as f32)).collect()
}

/// Textual-inversion embeddings a prompt may name, matched like A1111: on the token ids
/// of the name, longest name first, wherever those ids occur in a text run.
#[derive(Debug, Clone, Default)]
pub struct EmbeddingIndex {
    /// First token id of a name → (name's ids, name, vector count), longest ids first.
    by_first_token: HashMap<u32, Vec<(Vec<u32>, String, usize)>>,
}

impl EmbeddingIndex {
    /// No embeddings.
    pub fn new() -> Self {
        Self::default()
    }

    /// Register embedding `name` with `vectors` vectors (its token slots in a chunk).
    /// A later embedding whose name tokenizes the same replaces the earlier one.
    pub fn insert(
        &mut self,
        tokenizer: &ClipTokenizer,
        name: &str,
        vectors: usize,
    ) -> Result<(), PromptError> {
        if vectors == 0 || vectors > CHUNK_TEXT_TOKENS {
            return Err(PromptError::EmbeddingSize {
                name: name.to_string(),
                vectors,
            });
        }
        let ids = tokenizer.encode(name);
        let Some(&first) = ids.first() else {
            return Err(PromptError::EmptyEmbeddingName(name.to_string()));
        };
        let entries = self.by_first_token.entry(first).or_default();
        entries.retain(|(other, _, _)| *other != ids);
        entries.push((ids, name.to_string(), vectors));
        entries.sort_by_key(|(ids, _, _)| std::cmp::Reverse(ids.len()));
        Ok(())
    }

    /// Whether no embedding is registered.
    pub fn is_empty(&self) -> bool {
        self.by_first_token.is_empty()
    }

    /// The embedding whose name's ids start at `tokens[position]`: (name, vectors, ids
    /// consumed).
    fn find_at(&self, tokens: &[u32], position: usize) -> Option<(&str, usize, usize)> {
        let candidates = self.by_first_token.get(tokens.get(position)?)?;
        candidates
            .iter()
            .find(|(ids, _, _)| tokens[position..].starts_with(ids))
            .map(|(ids, name, vectors)| (name.as_str(), *vectors, ids.len()))
    }
}

/// Chunking settings; the pad token depends on the text encoder.
#[derive(Debug, Clone, PartialEq)]
pub struct ChunkOptions {
    /// Fills a chunk after the prompt's tokens (before the final EOS): EOS (49407) for
    /// OpenAI CLIP (SD1, SDXL's first encoder), 0 for OpenCLIP (SD2, SDXL's `clip_g`).
    pub pad_token: u32,
    /// A1111's "Prompt word wrap length limit": when a chunk is full and its last comma is
    /// at most this many tokens back, the tokens after the comma start the next chunk.
    /// 0 disables it.
    pub comma_padding_backtrack: usize,
    /// Parse `(x:1.3)`, `[x]`, `BREAK` (A1111's emphasis "Original"); `false` takes the
    /// prompt literally with weight 1 (emphasis "None").
    pub parse_attention: bool,
    /// Where the EOS goes in a chunk that is not full.
    pub eos: EosPlacement,
}

/// Where a chunk's EOS sits when the prompt leaves room. With a causal text encoder the
/// prompt's hidden states are the same either way, the padding positions (which the UNet
/// also attends to) are not. Both are the same for SD1, which pads with EOS.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum EosPlacement {
    /// BOS, prompt, padding, EOS in the last slot: A1111.
    #[default]
    LastSlot,
    /// BOS, prompt, EOS, padding: transformers / diffusers `padding="max_length"`.
    AfterText,
}

impl ChunkOptions {
    /// OpenAI CLIP ViT-L/14 (SD1.x, SDXL `text_encoder`): pads with EOS.
    pub fn clip_l() -> Self {
        Self {
            pad_token: EOS_ID,
            comma_padding_backtrack: 20,
            parse_attention: true,
            eos: EosPlacement::LastSlot,
        }
    }

    /// OpenCLIP ViT-H/14 and ViT-bigG/14 (SD2.x, SDXL `text_encoder_2`): pads with 0.
    pub fn open_clip() -> Self {
        Self {
            pad_token: 0,
            ..Self::clip_l()
        }
    }
}

impl Default for ChunkOptions {
    fn default() -> Self {
        Self::clip_l()
    }
}

/// Where an embedding's vectors go in a chunk.
#[derive(Debug, Clone, PartialEq)]
pub struct EmbeddingPlacement {
    /// Index in [`PromptChunk::tokens`] of the first vector (≥ 1, after BOS); the vectors
    /// fill `position..position + vectors`, whose token ids are placeholders (0).
    pub position: usize,
    /// The name it was registered under in [`EmbeddingIndex::insert`].
    pub name: String,
    /// Its vector count.
    pub vectors: usize,
}

/// One 77-token window for the text encoder.
#[derive(Debug, Clone, PartialEq)]
pub struct PromptChunk {
    /// BOS, 75 prompt tokens or padding, EOS.
    pub tokens: [u32; CHUNK_TOKENS],
    /// Emphasis per token; 1.0 for BOS, EOS and padding.
    pub multipliers: [f32; CHUNK_TOKENS],
    /// Embedding vectors to write over the token embeddings, in position order.
    pub embeddings: Vec<EmbeddingPlacement>,
}

impl PromptChunk {
    /// A1111's `empty_chunk`, used to give the prompts of one batch (and the negative
    /// prompt) the same number of chunks: BOS then EOS everywhere, whatever the pad token.
    pub fn empty() -> Self {
        let mut tokens = [EOS_ID; CHUNK_TOKENS];
        tokens[0] = BOS_ID;
        Self {
            tokens,
            multipliers: [1.0; CHUNK_TOKENS],
            embeddings: Vec::new(),
        }
    }

    /// Index of the first EOS: where CLIP reads its pooled output (transformers and
    /// OpenCLIP take the first maximal id; EOS is the largest id). With
    /// [`EosPlacement::LastSlot`] and pad 0 that is the last slot, as in A1111.
    pub fn eos_position(&self) -> usize {
        self.tokens
            .iter()
            .skip(1)
            .position(|&t| t == EOS_ID)
            .map_or(CHUNK_TOKENS - 1, |i| i + 1)
    }
}

/// A prompt ready for the text encoder.
#[derive(Debug, Clone, PartialEq)]
pub struct TokenizedPrompt {
    /// At least one chunk (an empty prompt gives BOS, padding, EOS).
    pub chunks: Vec<PromptChunk>,
    /// A1111's token counter: 75 per chunk before the last, plus the last chunk's prompt
    /// tokens (what the UI shows as "n/75").
    pub token_count: usize,
}

/// Split `text` into encoder chunks, A1111's `tokenize_line`.
///
/// Divergence from A1111, deliberately: when the comma backtrack moves tokens to the
/// next chunk, embeddings among them move too (A1111 leaves their placement behind).
pub fn tokenize_prompt(
    tokenizer: &ClipTokenizer,
    text: &str,
    embeddings: &EmbeddingIndex,
    options: &ChunkOptions,
) -> TokenizedPrompt {
    let runs = if options.parse_attention {
        parse_prompt_attention(text)
    } else {
        vec![(text.to_string(), 1.0)]
    };
    let comma = tokenizer.token_id(",</w>");
    let mut packer = ChunkPacker::new(options.pad_token, options.eos);
    for (run, weight) in &runs {
        if run == "BREAK" && *weight == BREAK_WEIGHT && options.parse_attention {
            packer.finish_chunk(false);
            continue;
        }
        let tokens = tokenizer.encode(run);
        let mut position = 0;
        while position < tokens.len() {
            let token = tokens[position];
            if Some(token) == comma {
                packer.last_comma = Some(packer.tokens.len());
            } else if let Some(last_comma) = packer.last_comma {
                let backtrack = options.comma_padding_backtrack;
                if backtrack != 0
                    && packer.tokens.len() == CHUNK_TEXT_TOKENS
                    && CHUNK_TEXT_TOKENS - last_comma <= backtrack
                {
                    packer.wrap_after(last_comma + 1);
                }
            }
            if packer.tokens.len() == CHUNK_TEXT_TOKENS {
                packer.finish_chunk(false);
            }
            match embeddings.find_at(&tokens, position) {
                None => {
                    packer.tokens.push(token);
                    packer.multipliers.push(*weight);
                    position += 1;
                }
                Some((name, vectors, consumed)) => {
                    if packer.tokens.len() + vectors > CHUNK_TEXT_TOKENS {
                        packer.finish_chunk(false);
                    }
                    packer
                        .embeddings
                        .push((packer.tokens.len(), name.to_string(), vectors));
                    packer.tokens.extend(std::iter::repeat_n(0, vectors));
                    packer
                        .multipliers
                        .extend(std::iter::repeat_n(*weight, vectors));
                    position += consumed;
                }
            }
        }
    }
    if !packer.tokens.is_empty() || packer.chunks.is_empty() {
        packer.finish_chunk(true);
    }
    TokenizedPrompt {
        chunks: packer.chunks,
        token_count: packer.token_count,
    }
}

/// The chunk being filled, and those already done.
struct ChunkPacker {
    pad_token: u32,
    eos: EosPlacement,
    chunks: Vec<PromptChunk>,
    token_count: usize,
    /// Prompt tokens of the current chunk (at most 75).
    tokens: Vec<u32>,
    multipliers: Vec<f32>,
    /// (offset in `tokens`, name, vectors).
    embeddings: Vec<(usize, String, usize)>,
    /// Offset in `tokens` of the last comma of the current chunk.
    last_comma: Option<usize>,
}

impl ChunkPacker {
    fn new(pad_token: u32, eos: EosPlacement) -> Self {
        Self {
            pad_token,
            eos,
            chunks: Vec::new(),
            token_count: 0,
            tokens: Vec::with_capacity(CHUNK_TEXT_TOKENS),
            multipliers: Vec::with_capacity(CHUNK_TEXT_TOKENS),
            embeddings: Vec::new(),
            last_comma: None,
        }
    }

    /// Close the current chunk at `split` and carry the tokens after it into a new one.
    fn wrap_after(&mut self, split: usize) {
        let tokens = self.tokens.split_off(split);
        let multipliers = self.multipliers.split_off(split);
        let (moved, kept) = std::mem::take(&mut self.embeddings)
            .into_iter()
            .partition(|(offset, _, _)| *offset >= split);
        self.embeddings = kept;
        self.finish_chunk(false);
        self.tokens = tokens;
        self.multipliers = multipliers;
        self.embeddings = moved
            .into_iter()
            .map(|(offset, name, vectors)| (offset - split, name, vectors))
            .collect();
    }

    /// Pad, frame with BOS/EOS and store the current chunk; start an empty one.
    fn finish_chunk(&mut self, is_last: bool) {
        self.token_count += if is_last {
            self.tokens.len()
        } else {
            CHUNK_TEXT_TOKENS
        };
        let mut chunk = PromptChunk {
            tokens: [self.pad_token; CHUNK_TOKENS],
            multipliers: [1.0; CHUNK_TOKENS],
            embeddings: Vec::new(),
        };
        // Never more than 75: embeddings are at most 75 vectors and start a fresh chunk
        // when they do not fit.
        let n = self.tokens.len().min(CHUNK_TEXT_TOKENS);
        chunk.tokens[0] = BOS_ID;
        let eos_at = match self.eos {
            EosPlacement::LastSlot => CHUNK_TOKENS - 1,
            EosPlacement::AfterText => n + 1,
        };
        chunk.tokens[eos_at] = EOS_ID;
        chunk.tokens[1..=n].copy_from_slice(&self.tokens[..n]);
        chunk.multipliers[1..=n].copy_from_slice(&self.multipliers[..n]);
        chunk.embeddings = self
            .embeddings
            .drain(..)
            .map(|(offset, name, vectors)| EmbeddingPlacement {
                position: offset + 1,
                name,
                vectors,
            })
            .collect();
        self.tokens.clear();
        self.multipliers.clear();
        self.last_comma = None;
        self.chunks.push(chunk);
    }
}
