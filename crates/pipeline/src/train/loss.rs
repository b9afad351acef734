//! The denoising loss through the frozen networks, and the fixed validation set's loss.

use candle_core::{DType, Device, Tensor};
use sdkube_models::unet::{AddedConditioning, UNet2DConditionModel};
use sdkube_models::Prediction;

use super::dataset::Example;
use super::TrainError;
use crate::prompt::EmbeddingIndex;
use crate::sampler::{NoiseSource, SeededNoise};
use crate::text::{self, PromptTokens, TextEncoders};
use crate::tokenizer::ClipTokenizer;

/// Timesteps of the validation set: spread over the schedule.
const VALIDATION_TIMESTEPS: [usize; 4] = [100, 350, 600, 850];

/// The frozen networks and what a loss needs besides the batch.
pub(super) struct Networks<'a> {
    pub(super) encoders: TextEncoders<'a>,
    pub(super) unet: &'a UNet2DConditionModel,
    pub(super) prediction: Prediction,
    pub(super) alphas: &'a [f64],
    pub(super) tokenizer: &'a ClipTokenizer,
    pub(super) index: &'a EmbeddingIndex,
    pub(super) size: usize,
    pub(super) device: &'a Device,
    pub(super) dtype: DType,
}

impl Networks<'_> {
    /// The denoising loss of examples `picks` with `captions`, noised at `timesteps` with
    /// noise drawn from `noise_seed`: mean squared error of the UNet's ε (or v) prediction.
    pub(super) fn loss(
        &self,
        examples: &[Example],
        picks: &[usize],
        captions: &[String],
        timesteps: &[usize],
        noise_seed: u64,
    ) -> Result<Tensor, TrainError> {
        let (device, dtype, b) = (self.device, self.dtype, picks.len());
        // The loss in f32 at least (f64 networks keep f64, for gradient checks).
        let precise = if dtype == DType::F64 {
            DType::F64
        } else {
            DType::F32
        };
        let mut prompts: Vec<PromptTokens> = captions
            .iter()
            .map(|c| PromptTokens::new(self.tokenizer, c, self.index))
            .collect();
        let chunks = prompts
            .iter()
            .map(PromptTokens::chunk_count)
            .max()
            .unwrap_or(1);
        let mut contexts = Vec::with_capacity(b);
        let mut pooled = Vec::new();
        for p in &mut prompts {
            p.pad_to(chunks);
            let cond = text::encode(&self.encoders, p, 1)?;
            contexts.push(cond.context);
            pooled.extend(cond.pooled);
        }
        let context = Tensor::cat(&contexts, 0)?;
        let x0 = Tensor::cat(
            &picks
                .iter()
                .map(|&i| &examples[i].latent)
                .collect::<Vec<_>>(),
            0,
        )?
        .to_dtype(precise)?;
        let noise = SeededNoise::new(noise_seed)
            .noise(&x0, 0.0, 0.0)
            .map_err(crate::Error::from)?;
        let coef = |f: &dyn Fn(f64) -> f64| -> Result<Tensor, TrainError> {
            let v: Vec<f32> = timesteps
                .iter()
                .map(|&t| f(self.alphas[t]) as f32)
                .collect();
            Ok(Tensor::from_vec(v, (b, 1, 1, 1), device)?.to_dtype(precise)?)
        };
        let (sqrt_a, sqrt_1ma) = (coef(&|a| a.sqrt())?, coef(&|a| (1.0 - a).sqrt())?);
        let noisy = (x0.broadcast_mul(&sqrt_a)? + noise.broadcast_mul(&sqrt_1ma)?)?;
        let target = match self.prediction {
            Prediction::Epsilon => noise.clone(),
            Prediction::V => (noise.broadcast_mul(&sqrt_a)? - x0.broadcast_mul(&sqrt_1ma)?)?,
        };
        let t: Vec<f32> = timesteps.iter().map(|&t| t as f32).collect();
        let t = Tensor::from_vec(t, b, device)?;
        let added = if pooled.is_empty() {
            None
        } else {
            let s = self.size as f32;
            let ids = Tensor::from_slice(&[s, s, 0.0, 0.0, s, s], (1, 6), device)?;
            Some(AddedConditioning {
                text_embeds: Tensor::cat(&pooled, 0)?.to_dtype(dtype)?,
                time_ids: ids.repeat((b, 1))?.to_dtype(dtype)?,
            })
        };
        let prediction = self.unet.forward(
            &noisy.to_dtype(dtype)?,
            &t,
            &context.to_dtype(dtype)?,
            added.as_ref(),
        )?;
        Ok((prediction.to_dtype(precise)? - &target)?
            .sqr()?
            .mean_all()?)
    }

    /// Mean loss of every example at [`VALIDATION_TIMESTEPS`] with fixed noise.
    pub(super) fn validation_loss(
        &self,
        examples: &[Example],
        caption: &str,
        batch: usize,
        seed: u64,
    ) -> Result<f32, TrainError> {
        let mut total = 0.0;
        let mut count = 0;
        let all: Vec<usize> = (0..examples.len()).collect();
        for &t in &VALIDATION_TIMESTEPS {
            for picks in all.chunks(batch) {
                let captions = vec![caption.to_string(); picks.len()];
                let loss = self.loss(
                    examples,
                    picks,
                    &captions,
                    &vec![t; picks.len()],
                    seed ^ 0x0A11_DA7E ^ ((t as u64) << 32) ^ picks[0] as u64,
                )?;
                total += loss.to_scalar::<f32>()? * picks.len() as f32;
                count += picks.len();
            }
        }
        Ok(total / count as f32)
    }
}

#[cfg(test)]
mod tests {
    //! Gradients reach the learned vectors exactly: the analytic directional derivative
    //! matches central finite differences (f64 networks).

    use candle_core::Var;
    use sdkube_models::SdWeights;

    use super::*;
    use crate::sampler::NoiseSchedule;
    use crate::train::vectors::{initial_vectors, LearnedVectors};

    fn fixture(name: &str) -> SdWeights {
        let dir = sdkube_testkit::fixtures().join("sd").join(name);
        sdkube_models::load(&dir, &Default::default()).unwrap()
    }

    /// (analytic, numeric) directional derivative of `f` at the vectors, along the
    /// normalised gradient.
    fn directional(learned: &LearnedVectors, f: &dyn Fn(&LearnedVectors) -> Tensor) -> (f64, f64) {
        let loss = f(learned);
        let grads = loss.backward().unwrap();
        let g = grads.get(learned.first.as_tensor()).unwrap().clone();
        let norm = g
            .sqr()
            .unwrap()
            .sum_all()
            .unwrap()
            .to_scalar::<f64>()
            .unwrap()
            .sqrt();
        assert!(norm > 0.0, "no gradient reached the vectors");
        let d = (g / norm).unwrap();
        let eps = 1e-4;
        let at = |sign: f64| {
            let base = learned.first.as_tensor().clone();
            let moved = LearnedVectors {
                name: learned.name.clone(),
                first: Var::from_tensor(&(&base + (&d * (sign * eps)).unwrap()).unwrap()).unwrap(),
                second: None,
            };
            f(&moved).to_scalar::<f64>().unwrap()
        };
        (norm, (at(1.0) - at(-1.0)) / (2.0 * eps))
    }

    #[test]
    fn text_encoder_gradient_matches_finite_differences() {
        let w = fixture("sd1");
        let clip = w.text_encoder.build(&Device::Cpu, DType::F64).unwrap();
        let tokenizer = ClipTokenizer::shared().unwrap();
        let mut index = EmbeddingIndex::new();
        index.insert(tokenizer, "tidisc", 2).unwrap();
        let start = initial_vectors(&clip, tokenizer, "red ball", 2).unwrap();
        let learned = LearnedVectors {
            name: "tidisc".into(),
            first: Var::from_tensor(&start.to_dtype(DType::F64).unwrap()).unwrap(),
            second: None,
        };
        let target = SeededNoise::new(5)
            .noise(
                &Tensor::zeros((1, 77, 8), DType::F64, &Device::Cpu).unwrap(),
                0.0,
                0.0,
            )
            .unwrap();
        let f = |l: &LearnedVectors| {
            let enc = TextEncoders {
                family: w.family,
                clip: &clip,
                clip_g: None,
                embeddings: Some(l),
            };
            let p = PromptTokens::new(tokenizer, "a photo of a tidisc", &index);
            let z = text::encode(&enc, &p, 1).unwrap().context;
            (z - &target).unwrap().sqr().unwrap().mean_all().unwrap()
        };
        let (analytic, numeric) = directional(&learned, &f);
        let rel = (analytic - numeric).abs() / analytic;
        assert!(rel < 1e-5, "analytic {analytic} numeric {numeric}");
    }

    /// Through the UNet too: its attention softmax and transformer-block layer norms switch
    /// to their differentiable forms under gradient tracking (`sdkube_nn`).
    #[test]
    fn denoising_gradient_matches_finite_differences() {
        let w = fixture("sd1");
        let (dev, dt) = (Device::Cpu, DType::F64);
        let clip = w.text_encoder.build(&dev, dt).unwrap();
        let unet = w.unet.build(&dev, dt).unwrap();
        let tokenizer = ClipTokenizer::shared().unwrap();
        let mut index = EmbeddingIndex::new();
        index.insert(tokenizer, "tidisc", 2).unwrap();
        let start = initial_vectors(&clip, tokenizer, "red ball", 2).unwrap();
        let learned = LearnedVectors {
            name: "tidisc".into(),
            first: Var::from_tensor(&start.to_dtype(dt).unwrap()).unwrap(),
            second: None,
        };
        let examples = vec![Example {
            latent: SeededNoise::new(9)
                .noise(
                    &Tensor::zeros((1, 4, 4, 4), DType::F32, &dev).unwrap(),
                    0.0,
                    0.0,
                )
                .unwrap(),
            filewords: String::new(),
        }];
        let schedule = NoiseSchedule::stable_diffusion();
        let f = |l: &LearnedVectors| {
            let nets = Networks {
                encoders: TextEncoders {
                    family: w.family,
                    clip: &clip,
                    clip_g: None,
                    embeddings: Some(l),
                },
                unet: &unet,
                prediction: w.prediction,
                alphas: schedule.alphas_cumprod(),
                tokenizer,
                index: &index,
                size: 32,
                device: &dev,
                dtype: dt,
            };
            nets.loss(&examples, &[0], &["a photo of a tidisc".into()], &[500], 1)
                .unwrap()
                .to_dtype(DType::F64)
                .unwrap()
        };
        let (analytic, numeric) = directional(&learned, &f);
        let rel = (analytic - numeric).abs() / analytic;
        assert!(rel < 1e-4, "analytic {analytic} numeric {numeric}");
    }
}
