//! Prompt → UNet conditioning, as AUTOMATIC1111 builds it: 77-token chunks encoded one by
//! one, emphasis applied to the hidden states (A1111's "Original" mode: scale by the
//! multipliers, then restore the chunk's mean), chunks concatenated; SDXL concatenates the
//! penultimate layers of both encoders and takes the pooled embedding of the first chunk
//! (its refiner the same of its one encoder, bigG).
//! Textual-inversion vectors replace the token embeddings at their placements before the
//! transformer runs (A1111's `EmbeddingsWithFixes`), for each encoder its own vectors.

use candle_core::{DType, Device, Tensor, D};
use sdkube_models::clip::ClipTextModel;
use sdkube_models::unet::AddedConditioning;
use sdkube_models::Family;

use crate::embeddings::{EmbeddingSet, EncoderSlot};
use crate::generate::{repeat, Request};
use crate::prompt::{tokenize_prompt, ChunkOptions, EmbeddingIndex, PromptChunk, CHUNK_TOKENS};
use crate::tokenizer::ClipTokenizer;
use crate::tokenizer::EOS_ID;
use crate::Error;

/// The text encoders of a loaded model.
pub struct TextEncoders<'a> {
    /// Which conditioning to build (SDXL concatenates two encoders and pools).
    pub family: Family,
    /// The first (or only) encoder.
    pub clip: &'a ClipTextModel,
    /// SDXL's second encoder.
    pub clip_g: Option<&'a ClipTextModel>,
    /// Vectors for the prompt's embedding placements; `None` when the prompt was
    /// tokenized without embeddings.
    pub embeddings: Option<&'a dyn TokenVectors>,
}

/// Where the vectors of a prompt's textual-inversion placements come from: the loaded
/// [`EmbeddingSet`], or the vectors being trained.
pub trait TokenVectors {
    /// `[n, width]` vectors of embedding `name` for one encoder.
    fn vectors(&self, name: &str, slot: EncoderSlot) -> Option<Tensor>;
}

impl TokenVectors for EmbeddingSet {
    fn vectors(&self, name: &str, slot: EncoderSlot) -> Option<Tensor> {
        EmbeddingSet::vectors(self, name, slot).cloned()
    }
}

/// What the UNet is conditioned on for one prompt.
#[derive(Debug, Clone)]
pub struct Conditioning {
    /// `[1, 77·chunks, D]`.
    pub context: Tensor,
    /// SDXL: pooled, projected embedding `[1, P]`.
    pub pooled: Option<Tensor>,
}

/// A prompt split into 77-token chunks (EOS-padded; OpenCLIP encoders get their padding
/// rewritten when encoded, see [`chunk_ids`]).
pub struct PromptTokens {
    chunks: Vec<PromptChunk>,
}

impl PromptTokens {
    /// `prompt` parsed (emphasis, `BREAK`, embeddings) and split into chunks.
    pub fn new(tokenizer: &ClipTokenizer, prompt: &str, embeddings: &EmbeddingIndex) -> Self {
        let chunks = tokenize_prompt(tokenizer, prompt, embeddings, &ChunkOptions::clip_l()).chunks;
        Self { chunks }
    }

    /// Chunks of 77 tokens.
    pub fn chunk_count(&self) -> usize {
        self.chunks.len()
    }

    /// Names of the embeddings the prompt uses, each once, in prompt order.
    pub fn embeddings_used(&self) -> Vec<&str> {
        let mut names: Vec<&str> = Vec::new();
        for placement in self.chunks.iter().flat_map(|c| &c.embeddings) {
            if !names.contains(&placement.name.as_str()) {
                names.push(&placement.name);
            }
        }
        names
    }

    /// Pads with A1111's empty chunk so that prompt and negative prompt line up.
    pub fn pad_to(&mut self, n: usize) {
        while self.chunks.len() < n {
            self.chunks.push(PromptChunk::empty());
        }
    }
}

/// Token ids of a chunk for one encoder. OpenCLIP encoders (SD 2.x, SDXL's second) see
/// padding 0 after the first EOS, as A1111's `process_tokens` rewrites it (and as the
/// diffusers tokenizers pad).
fn chunk_ids(chunk: &PromptChunk, open_clip: bool, device: &Device) -> candle_core::Result<Tensor> {
    let mut ids = chunk.tokens;
    if open_clip {
        if let Some(first_eos) = ids.iter().position(|&t| t == EOS_ID) {
            for t in &mut ids[first_eos + 1..] {
                *t = 0;
            }
        }
    }
    Tensor::from_slice(&ids, (1, CHUNK_TOKENS), device)
}

/// A1111's "Original" emphasis: multiply by the per-token weights, then rescale so the mean
/// of the chunk's hidden states is what it was.
fn apply_emphasis(z: &Tensor, multipliers: &[f32]) -> candle_core::Result<Tensor> {
    if multipliers.iter().all(|&m| m == 1.0) {
        return Ok(z.clone());
    }
    let dtype = z.dtype();
    let z32 = z.to_dtype(DType::F32)?;
    let original_mean = z32.mean_all()?.to_scalar::<f32>()?;
    let m = Tensor::from_slice(multipliers, (1, multipliers.len(), 1), z.device())?;
    let weighted = z32.broadcast_mul(&m)?;
    let new_mean = weighted.mean_all()?.to_scalar::<f32>()?;
    (weighted * (original_mean / new_mean) as f64)?.to_dtype(dtype)
}

/// Token embeddings `[1, 77, D]` of a chunk for one encoder, with the embedding
/// placements' vectors written over their placeholder tokens.
fn chunk_embeds(
    clip: &ClipTextModel,
    ids: &Tensor,
    chunk: &PromptChunk,
    vectors: Option<(&dyn TokenVectors, EncoderSlot)>,
) -> Result<Tensor, Error> {
    let table = clip.embed_tokens(ids)?;
    let Some((source, slot)) = vectors.filter(|_| !chunk.embeddings.is_empty()) else {
        return Ok(table);
    };
    let width = clip.hidden_size();
    let mut parts = Vec::with_capacity(2 * chunk.embeddings.len() + 1);
    let mut at = 0;
    for placement in &chunk.embeddings {
        let v = source.vectors(&placement.name, slot).ok_or_else(|| {
            Error::Invalid(format!(
                "embedding {:?} is not loaded for this model",
                placement.name
            ))
        })?;
        if v.dims() != [placement.vectors, width] || placement.position < at {
            return Err(Error::Invalid(format!(
                "embedding {:?} has shape {:?}; this text encoder needs [{}, {width}]",
                placement.name,
                v.dims(),
                placement.vectors
            )));
        }
        if placement.position > at {
            parts.push(table.narrow(1, at, placement.position - at)?);
        }
        parts.push(
            v.to_device(table.device())?
                .to_dtype(table.dtype())?
                .unsqueeze(0)?,
        );
        at = placement.position + placement.vectors;
    }
    if at < CHUNK_TOKENS {
        parts.push(table.narrow(1, at, CHUNK_TOKENS - at)?);
    }
    Ok(Tensor::cat(&parts, 1)?)
}

/// Hidden states of one chunk from one encoder. `skip` = A1111's clip skip − 1 (layers not
/// run from the end); `penultimate_raw` takes the penultimate layer without the final norm
/// (SDXL).
#[allow(clippy::too_many_arguments)]
fn encode_chunk(
    clip: &ClipTextModel,
    chunk: &PromptChunk,
    vectors: Option<(&dyn TokenVectors, EncoderSlot)>,
    open_clip: bool,
    skip: usize,
    penultimate_raw: bool,
    want_pooled: bool,
) -> Result<(Tensor, Option<Tensor>), Error> {
    let device = clip.token_embeddings().device().clone();
    let ids = chunk_ids(chunk, open_clip, &device)?;
    let embeds = chunk_embeds(clip, &ids, chunk, vectors)?;
    if penultimate_raw {
        let out = clip.forward_embeds(
            &embeds,
            &ids,
            if want_pooled {
                None
            } else {
                Some(clip.num_layers() - 1)
            },
        )?;
        let n = out.hidden_states.len();
        let h = if want_pooled {
            out.hidden_states[n - 2].clone()
        } else {
            out.hidden_states[n - 1].clone()
        };
        Ok((h, out.text_embeds))
    } else {
        let layers = clip.num_layers().saturating_sub(skip).max(1);
        let out = clip.forward_embeds(&embeds, &ids, Some(layers))?;
        let last = out
            .hidden_states
            .last()
            .ok_or_else(|| Error::Invalid("the text encoder returned no hidden states".into()))?;
        Ok((clip.final_norm(last)?, None))
    }
}

/// Encodes a tokenized prompt into the UNet's conditioning. `clip_skip` is A1111's setting
/// (1 = last layer); SDXL always uses the penultimate layers, as A1111 does.
pub fn encode(
    encoders: &TextEncoders,
    tokens: &PromptTokens,
    clip_skip: usize,
) -> Result<Conditioning, Error> {
    let skip = clip_skip.max(1) - 1;
    let first = encoders.embeddings.map(|v| (v, EncoderSlot::First));
    let second = encoders.embeddings.map(|v| (v, EncoderSlot::Second));
    let mut parts = Vec::with_capacity(tokens.chunks.len());
    let mut pooled = None;
    for (i, chunk) in tokens.chunks.iter().enumerate() {
        let z = match (encoders.family, encoders.clip_g) {
            (Family::Sdxl, Some(clip_g)) => {
                let (l, _) = encode_chunk(encoders.clip, chunk, first, false, 0, true, false)?;
                let (g, p) = encode_chunk(clip_g, chunk, second, true, 0, true, i == 0)?;
                if i == 0 {
                    pooled = p;
                }
                let l = apply_emphasis(&l, &chunk.multipliers)?;
                let g = apply_emphasis(&g, &chunk.multipliers)?;
                Tensor::cat(&[l, g], D::Minus1)?
            }
            // The refiner conditions on bigG alone, taken as SDXL takes its second encoder.
            (Family::SdxlRefiner, _) => {
                let (g, p) = encode_chunk(encoders.clip, chunk, first, true, 0, true, i == 0)?;
                if i == 0 {
                    pooled = p;
                }
                apply_emphasis(&g, &chunk.multipliers)?
            }
            (Family::Sdxl, None) => {
                return Err(Error::Invalid(
                    "SDXL model without its second text encoder".into(),
                ))
            }
            (family, _) => {
                let (z, _) = encode_chunk(
                    encoders.clip,
                    chunk,
                    first,
                    family == Family::Sd2,
                    skip,
                    false,
                    false,
                )?;
                apply_emphasis(&z, &chunk.multipliers)?
            }
        };
        parts.push(z);
    }
    Ok(Conditioning {
        context: Tensor::cat(&parts, 1)?,
        pooled,
    })
}

/// The UNet's text conditioning for a batch: every request's negative prompt (repeated per
/// image), then every prompt, matching the batch layout the denoiser splits into
/// unconditional and conditional halves; SDXL's pooled embeddings and time ids beside it.
pub(crate) fn stack_conditioning(
    conds: &[(Conditioning, Conditioning)],
    reqs: &[Request],
    family: Family,
    dev: &Device,
    dt: DType,
) -> Result<(Tensor, Option<AddedConditioning>), Error> {
    let (mut context_rows, mut pooled_rows, mut time_ids) = (Vec::new(), Vec::new(), Vec::new());
    for negative in [true, false] {
        for ((pos, neg), r) in conds.iter().zip(reqs) {
            let c = if negative { neg } else { pos };
            context_rows.push(repeat(&c.context, r.batch_size)?);
            if let Some(p) = &c.pooled {
                pooled_rows.push(repeat(p, r.batch_size)?);
            }
            let (h, w) = (r.height as f32, r.width as f32);
            // Original size, crop, then the target size (SDXL) or A1111's (and diffusers')
            // aesthetic scores, 2.5 unconditional and 6 conditional (the refiner).
            let ids = match (family, negative) {
                (Family::SdxlRefiner, true) => vec![h, w, 0.0, 0.0, 2.5],
                (Family::SdxlRefiner, false) => vec![h, w, 0.0, 0.0, 6.0],
                _ => vec![h, w, 0.0, 0.0, h, w],
            };
            for _ in 0..r.batch_size {
                time_ids.push(ids.clone());
            }
        }
    }
    let context = Tensor::cat(&context_rows, 0)?.to_dtype(dt)?;
    if pooled_rows.is_empty() {
        return Ok((context, None));
    }
    let text_embeds = Tensor::cat(&pooled_rows, 0)?.to_dtype(dt)?;
    let time_ids = Tensor::new(time_ids, dev)?.to_dtype(dt)?;
    Ok((
        context,
        Some(AddedConditioning {
            text_embeds,
            time_ids,
        }),
    ))
}
