//! The vectors being learned: where they start, how they reach the text encoders, and the
//! snapshot a checkpoint writes.

use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor, Var};
use sdkube_models::SdWeights;

use super::checkpoint::{save_checkpoint, CheckpointState};
use super::TrainError;
use crate::embeddings::{EmbeddingVectors, EncoderSlot};
use crate::text::TokenVectors;
use crate::tokenizer::ClipTokenizer;

/// The vectors being learned, in f32.
pub(super) struct LearnedVectors {
    pub(super) name: String,
    pub(super) first: Var,
    pub(super) second: Option<Var>,
}

impl TokenVectors for LearnedVectors {
    fn vectors(&self, name: &str, slot: EncoderSlot) -> Option<Tensor> {
        if name != self.name {
            return None;
        }
        match slot {
            EncoderSlot::First => Some(self.first.as_tensor().clone()),
            EncoderSlot::Second => self.second.as_ref().map(|v| v.as_tensor().clone()),
        }
    }
}

impl LearnedVectors {
    /// The vectors on the CPU, refused when they are no longer finite (a diverged run
    /// must not replace the last good checkpoint).
    pub(super) fn snapshot(&self) -> Result<EmbeddingVectors, TrainError> {
        let finite = |t: &Tensor| -> Result<bool, TrainError> {
            let sum = t
                .abs()?
                .sum_all()?
                .to_dtype(DType::F64)?
                .to_scalar::<f64>()?;
            Ok(sum.is_finite())
        };
        let all_finite = finite(self.first.as_tensor())?
            && match &self.second {
                Some(v) => finite(v.as_tensor())?,
                None => true,
            };
        if !all_finite {
            return Err(TrainError::Invalid(
                "the vectors diverged (not finite); lower the learning rate (the last \
                 checkpoint is kept)"
                    .into(),
            ));
        }
        Ok(EmbeddingVectors {
            first: self.first.as_tensor().to_device(&Device::Cpu)?,
            second: self
                .second
                .as_ref()
                .map(|v| v.as_tensor().to_device(&Device::Cpu))
                .transpose()?,
        })
    }
}

/// A1111's "Create embedding": a new embedding `name` of `vectors` vectors initialised from
/// `init_text`'s token embeddings, written to `out` (`.safetensors` or `.pt`) with a
/// step-0 training state, ready to train with `resume`. Refuses to replace an existing
/// file unless `overwrite`.
pub fn create_embedding(
    weights: &SdWeights,
    name: &str,
    init_text: &str,
    vectors: usize,
    out: &Path,
    overwrite: bool,
) -> Result<PathBuf, TrainError> {
    if !(1..=75).contains(&vectors) {
        return Err(TrainError::Invalid(format!(
            "vectors per token must be between 1 and 75, got {vectors}"
        )));
    }
    if out.exists() && !overwrite {
        return Err(TrainError::Exists(out.to_path_buf()));
    }
    let tokenizer = ClipTokenizer::shared().map_err(|e| TrainError::Invalid(e.to_string()))?;
    let device = Device::Cpu;
    let clip = weights.text_encoder.build(&device, DType::F32)?;
    let clip_g = weights
        .text_encoder_2
        .as_ref()
        .map(|c| c.build(&device, DType::F32))
        .transpose()?;
    let start = EmbeddingVectors {
        first: initial_vectors(&clip, tokenizer, init_text, vectors)?,
        second: clip_g
            .as_ref()
            .map(|g| initial_vectors(g, tokenizer, init_text, vectors))
            .transpose()?,
    };
    let state = CheckpointState {
        name: name.to_string(),
        step: 0,
        vectors,
    };
    save_checkpoint(out, &start, &state, None)?;
    Ok(out.to_path_buf())
}

/// Initial vectors for one encoder: rows of the token embeddings of `init_text`, spread
/// over `n` vectors as A1111 does (`vec[i] = embedded[i * k / n]`).
pub(super) fn initial_vectors(
    clip: &sdkube_models::clip::ClipTextModel,
    tokenizer: &ClipTokenizer,
    init_text: &str,
    n: usize,
) -> Result<Tensor, TrainError> {
    let text = if init_text.trim().is_empty() {
        "*"
    } else {
        init_text
    };
    let ids = tokenizer.encode(text);
    let device = clip.token_embeddings().device();
    if ids.is_empty() {
        return Ok(Tensor::zeros((n, clip.hidden_size()), DType::F32, device)?);
    }
    let k = ids.len();
    let picked: Vec<u32> = (0..n).map(|i| ids[i * k / n]).collect();
    let ids = Tensor::from_slice(&picked, (1, n), device)?;
    Ok(clip.embed_tokens(&ids)?.squeeze(0)?.to_dtype(DType::F32)?)
}
