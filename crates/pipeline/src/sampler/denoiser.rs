//! What a sampler needs from the caller: a denoiser `D(x, sigma)` and fresh noise.
//!
//! The samplers only ever see `D(x, sigma)`, the estimate of the clean latent from a
//! latent `x = x0 + sigma * eps` (classifier-free guidance already applied). The UNet
//! predicts something else (epsilon or v, at a timestep, on a rescaled input);
//! [`ModelScalings`] does that translation the way k-diffusion's `CompVisDenoiser` /
//! `CompVisVDenoiser` do, so the caller only runs the network:
//!
//! ```ignore
//! let scalings = ModelScalings::new(schedule.clone(), Prediction::Epsilon, sampler);
//! let mut denoiser = |x: &Tensor, sigma: f64| -> Result<Tensor, SamplerError> {
//!     let (x_in, t) = scalings.model_input(x, sigma)?;
//!     let eps = unet_with_cfg(&x_in, t)?; // any linear CFG mix of raw outputs is fine
//!     scalings.denoised(x, sigma, &eps)
//! };
//! ```

use std::collections::VecDeque;

use candle_core::{DType, Device, Tensor};
use rand::SeedableRng;
use rand_distr::Distribution;

use super::schedule::NoiseSchedule;
use super::{Sampler, SamplerError};

/// The clean-latent estimate `D(x, sigma)` for a latent at noise level `sigma`.
pub trait Denoiser {
    /// Returns `D(x, sigma)`, same shape, device and dtype as `x`.
    fn denoise(&mut self, x: &Tensor, sigma: f64) -> Result<Tensor, SamplerError>;
}

impl<F> Denoiser for F
where
    F: FnMut(&Tensor, f64) -> Result<Tensor, SamplerError>,
{
    fn denoise(&mut self, x: &Tensor, sigma: f64) -> Result<Tensor, SamplerError> {
        self(x, sigma)
    }
}

/// Fresh standard-normal noise for ancestral samplers and LCM.
pub trait NoiseSource {
    /// A tensor like `like` (shape, device, dtype) of N(0, 1) noise, drawn for the step
    /// from `sigma` to `sigma_next`.
    fn noise(&mut self, like: &Tensor, sigma: f64, sigma_next: f64)
        -> Result<Tensor, SamplerError>;
}

/// Noise drawn from a seeded `StdRng` (f32 standard normal, then moved to `like`'s device
/// and dtype): reproducible for a seed, but not bit-equal to torch's generator.
pub struct SeededNoise {
    rng: rand::rngs::StdRng,
}

impl SeededNoise {
    /// A source whose draws depend only on `seed`.
    pub fn new(seed: u64) -> Self {
        Self {
            rng: rand::rngs::StdRng::seed_from_u64(seed),
        }
    }
}

impl NoiseSource for SeededNoise {
    fn noise(&mut self, like: &Tensor, _: f64, _: f64) -> Result<Tensor, SamplerError> {
        let n = like.elem_count();
        let values: Vec<f32> = (0..n)
            .map(|_| rand_distr::StandardNormal.sample(&mut self.rng))
            .collect();
        Ok(Tensor::from_vec(values, like.dims(), &Device::Cpu)?
            .to_dtype(like.dtype())?
            .to_device(like.device())?)
    }
}

/// Noise replayed from a list (tests, or noise drawn elsewhere), in order.
pub struct RecordedNoise {
    queue: VecDeque<Tensor>,
    drawn: usize,
}

impl RecordedNoise {
    /// Replays `noises` first to last.
    pub fn new(noises: impl IntoIterator<Item = Tensor>) -> Self {
        Self {
            queue: noises.into_iter().collect(),
            drawn: 0,
        }
    }

    /// How many tensors have been handed out.
    pub fn drawn(&self) -> usize {
        self.drawn
    }
}

impl NoiseSource for RecordedNoise {
    fn noise(&mut self, like: &Tensor, _: f64, _: f64) -> Result<Tensor, SamplerError> {
        let next = self
            .queue
            .pop_front()
            .ok_or(SamplerError::NoiseExhausted { drawn: self.drawn })?;
        if next.dims() != like.dims() {
            return Err(SamplerError::Shape(format!(
                "recorded noise {:?} does not match the latent {:?}",
                next.dims(),
                like.dims()
            )));
        }
        self.drawn += 1;
        Ok(next.to_dtype(like.dtype())?.to_device(like.device())?)
    }
}

/// What the network was trained to predict.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Prediction {
    /// The added noise (SD 1.x, SD 2.x base, SDXL).
    Epsilon,
    /// `v = alpha * eps - sigma_vp * x0` (SD 2.x 768-v).
    V,
}

/// LCM's skipping: only every 20th timestep (19, 39, …, 999) is a valid noise level.
const LCM_ORIGINAL_STEPS: usize = 50;

/// Converts between the sampler's `(x, sigma)` and the network's `(input, t, output)`.
#[derive(Debug, Clone)]
pub struct ModelScalings {
    schedule: NoiseSchedule,
    prediction: Prediction,
    /// For LCM: the 50-entry table whose nearest entry gives the (quantised) timestep,
    /// and the consistency-model boundary scalings (A1111's `LCMCompVisDenoiser`).
    lcm: Option<NoiseSchedule>,
}

impl ModelScalings {
    /// Scalings for `schedule`; `sampler` matters only for [`Sampler::Lcm`].
    pub fn new(schedule: NoiseSchedule, prediction: Prediction, sampler: Sampler) -> Self {
        let lcm = (sampler == Sampler::Lcm).then(|| lcm_schedule(&schedule));
        Self {
            schedule,
            prediction,
            lcm,
        }
    }

    /// The network input `x / sqrt(sigma^2 + 1)` and the timestep to give it.
    pub fn model_input(&self, x: &Tensor, sigma: f64) -> Result<(Tensor, f64), SamplerError> {
        let c_in = 1.0 / (sigma * sigma + 1.0).sqrt();
        Ok((x.affine(c_in, 0.0)?, self.timestep(sigma)))
    }

    /// The timestep the network sees for `sigma`.
    pub fn timestep(&self, sigma: f64) -> f64 {
        match &self.lcm {
            Some(table) => lcm_timestep(table, sigma) as f64,
            None => self.schedule.sigma_to_t(sigma),
        }
    }

    /// `D(x, sigma)` from the network's (guided) output for `model_input(x, sigma)`.
    pub fn denoised(
        &self,
        x: &Tensor,
        sigma: f64,
        output: &Tensor,
    ) -> Result<Tensor, SamplerError> {
        let output = output.to_dtype(x.dtype())?;
        let d = match self.prediction {
            Prediction::Epsilon => (x - output.affine(sigma, 0.0)?)?,
            Prediction::V => {
                let s2 = sigma * sigma + 1.0;
                let c_skip = 1.0 / s2;
                let c_out = -sigma / s2.sqrt();
                (x.affine(c_skip, 0.0)? + output.affine(c_out, 0.0)?)?
            }
        };
        match &self.lcm {
            None => Ok(d),
            Some(table) => {
                // Consistency boundary condition on the timestep scaled by 10.
                let sigma_data = 0.5f64;
                let st = lcm_timestep(table, sigma) as f64 * 10.0;
                let c_skip = sigma_data * sigma_data / (st * st + sigma_data * sigma_data);
                let c_out = st / (st * st + sigma_data * sigma_data).sqrt();
                Ok((d.affine(c_out, 0.0)? + x.affine(c_skip, 0.0)?)?)
            }
        }
    }
}

/// The 50 valid LCM noise levels: `alphas_cumprod[20 k + 19]` for k = 0..50.
pub(crate) fn lcm_schedule(schedule: &NoiseSchedule) -> NoiseSchedule {
    let ac = schedule.alphas_cumprod();
    let skip = ac.len() / LCM_ORIGINAL_STEPS;
    let valid = (0..LCM_ORIGINAL_STEPS)
        .map(|k| ac[(k * skip + skip - 1).min(ac.len() - 1)])
        .collect();
    NoiseSchedule::from_alphas_cumprod(valid)
}

/// The training timestep of the LCM level nearest to `sigma`.
pub(crate) fn lcm_timestep(table: &NoiseSchedule, sigma: f64) -> usize {
    let skip = super::schedule::TRAIN_TIMESTEPS / LCM_ORIGINAL_STEPS;
    table.sigma_to_nearest_t(sigma) * skip + skip - 1
}

/// Checks that a denoiser kept the latent's shape (a wrong CFG split shows up here).
pub(crate) fn check_same_shape(x: &Tensor, d: &Tensor) -> Result<(), SamplerError> {
    if x.dims() != d.dims() {
        return Err(SamplerError::Shape(format!(
            "the denoiser returned {:?} for a latent of {:?}",
            d.dims(),
            x.dims()
        )));
    }
    Ok(())
}

/// Standard-normal noise shaped like `dims` from a seed (initial latents in tests/CLI).
pub fn seeded_normal(
    seed: u64,
    dims: &[usize],
    dtype: DType,
    device: &Device,
) -> Result<Tensor, SamplerError> {
    let like = Tensor::zeros(dims, dtype, device)?;
    SeededNoise::new(seed).noise(&like, 0.0, 0.0)
}
