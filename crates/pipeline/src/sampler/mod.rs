//! Samplers with AUTOMATIC1111 names, in the k-diffusion (sigma) formulation.
//!
//! A sampler walks a latent from pure noise (or a noised init image) down a list of
//! noise levels *sigma*, asking the caller's [`Denoiser`] for `D(x, sigma)`, the clean
//! latent estimate, once or twice per step. The maths follows the implementations A1111
//! runs: k-diffusion's `sample_*` functions (Euler, Euler a, Heun, DPM2, DPM2 a,
//! DPM++ 2S a, DPM++ 2M, LMS), A1111's own `sample_lcm`, DDIM and UniPC. Parity with
//! those references is tested in `tests/sampler_parity.rs` (fixtures from
//! `scripts/make_sampler_fixtures.py`).
//!
//! Usage: build a [`Plan`] ([`Plan::txt2img`] or [`Plan::img2img`]), make the starting
//! latent with [`Plan::initial_latent`], then [`Plan::run`] it with a denoiser (see
//! [`ModelScalings`] for turning a UNet into one), a [`NoiseSource`] and a per-step
//! callback. The callback returns [`Flow::Stop`] to cancel: `run` then returns
//! [`SamplerError::Interrupted`] before asking the denoiser for anything more.

mod denoiser;
mod kdiffusion;
mod schedule;
mod unipc;

use candle_core::Tensor;

pub use denoiser::{
    seeded_normal, Denoiser, ModelScalings, NoiseSource, Prediction, RecordedNoise, SeededNoise,
};
pub use schedule::{
    a1111_timesteps, img2img_sigmas, img2img_t_enc, karras, NoiseSchedule, Scheduler,
    TRAIN_TIMESTEPS,
};
pub use unipc::{UniPcOptions, UniPcVariant};

use schedule::normalise;

/// Everything that can go wrong when choosing or running a sampler.
#[derive(Debug, thiserror::Error)]
pub enum SamplerError {
    /// No sampler has this name.
    #[error("unknown sampler {name:?}; valid samplers: {valid}")]
    UnknownSampler {
        /// The name asked for.
        name: String,
        /// The names there are.
        valid: String,
    },
    /// No scheduler has this name.
    #[error("unknown scheduler {name:?}; valid schedulers: {valid}")]
    UnknownScheduler {
        /// The name asked for.
        name: String,
        /// The names there are.
        valid: String,
    },
    /// Zero steps were asked for.
    #[error("steps must be at least 1")]
    ZeroSteps,
    /// More steps than allowed.
    #[error("{steps} steps is more than the limit of {max}")]
    TooManySteps {
        /// Steps asked for.
        steps: usize,
        /// The limit.
        max: usize,
    },
    /// An img2img strength outside 0..=1.
    #[error("denoising strength must be between 0 and 1, got {0}")]
    BadStrength(f64),
    /// A sigma schedule that is not positive and decreasing.
    #[error("invalid sigma schedule: {0}")]
    BadSigmas(String),
    /// Tensors of mismatched shapes.
    #[error("shape mismatch: {0}")]
    Shape(String),
    /// A recorded noise source (tests) has no draws left.
    #[error("the recorded noise ran out after {drawn} draws")]
    NoiseExhausted {
        /// Draws made before it ran out.
        drawn: usize,
    },
    /// The callback stopped the run.
    #[error("sampling interrupted at step {step} of {total}")]
    Interrupted {
        /// The step it stopped at.
        step: usize,
        /// Steps the run had.
        total: usize,
    },
    /// The model (denoiser) failed.
    #[error("denoiser failed: {0}")]
    Denoiser(Box<dyn std::error::Error + Send + Sync>),
    /// A tensor operation failed.
    #[error(transparent)]
    Tensor(#[from] candle_core::Error),
}

/// A sampling algorithm (the scheduler is chosen separately, see [`SamplerSpec`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Sampler {
    /// "Euler" (k-diffusion `sample_euler`).
    Euler,
    /// "Euler a": ancestral Euler.
    EulerA,
    /// "Heun": second order, two model calls per step.
    Heun,
    /// "DPM2".
    Dpm2,
    /// "DPM2 a": ancestral DPM2.
    Dpm2A,
    /// "DPM++ 2S a".
    DpmPp2SA,
    /// "DPM++ 2M".
    DpmPp2M,
    /// "LMS": linear multistep.
    Lms,
    /// "DDIM".
    Ddim,
    /// "PLMS".
    Plms,
    /// "UniPC".
    UniPc,
    /// "LCM": latent consistency models.
    Lcm,
}

/// One entry of the sampler list A1111's `/sdapi/v1/samplers` reports.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SamplerInfo {
    /// A1111's label, e.g. "DPM++ 2M Karras".
    pub name: &'static str,
    /// Other accepted names (A1111's `k_…` aliases).
    pub aliases: &'static [&'static str],
    /// The algorithm.
    pub sampler: Sampler,
    /// The scheduler the name implies when the request says "Automatic".
    pub scheduler: Scheduler,
}

const fn info(
    name: &'static str,
    aliases: &'static [&'static str],
    sampler: Sampler,
    scheduler: Scheduler,
) -> SamplerInfo {
    SamplerInfo {
        name,
        aliases,
        sampler,
        scheduler,
    }
}

use Scheduler::{Automatic as Auto, Karras as Kar};

/// A1111's names, in A1111's order.
const SAMPLERS: &[SamplerInfo] = &[
    info("DPM++ 2M", &["k_dpmpp_2m"], Sampler::DpmPp2M, Auto),
    info("DPM++ 2M Karras", &["k_dpmpp_2m_ka"], Sampler::DpmPp2M, Kar),
    info(
        "Euler a",
        &["k_euler_a", "k_euler_ancestral"],
        Sampler::EulerA,
        Auto,
    ),
    info("Euler", &["k_euler"], Sampler::Euler, Auto),
    info("LMS", &["k_lms"], Sampler::Lms, Auto),
    info("LMS Karras", &["k_lms_ka"], Sampler::Lms, Kar),
    info("Heun", &["k_heun"], Sampler::Heun, Auto),
    info("DPM2", &["k_dpm_2"], Sampler::Dpm2, Auto),
    info("DPM2 Karras", &["k_dpm_2_ka"], Sampler::Dpm2, Kar),
    info("DPM2 a", &["k_dpm_2_a"], Sampler::Dpm2A, Auto),
    info("DPM2 a Karras", &["k_dpm_2_a_ka"], Sampler::Dpm2A, Kar),
    info("DPM++ 2S a", &["k_dpmpp_2s_a"], Sampler::DpmPp2SA, Auto),
    info(
        "DPM++ 2S a Karras",
        &["k_dpmpp_2s_a_ka"],
        Sampler::DpmPp2SA,
        Kar,
    ),
    info("DDIM", &["ddim"], Sampler::Ddim, Auto),
    info("PLMS", &["plms"], Sampler::Plms, Auto),
    info("UniPC", &["unipc"], Sampler::UniPc, Auto),
    info("LCM", &["k_lcm"], Sampler::Lcm, Auto),
];

impl Sampler {
    /// Every accepted sampler name (for `/samplers` and for error messages).
    pub fn all() -> &'static [SamplerInfo] {
        SAMPLERS
    }

    /// The A1111 label of the plain algorithm ("DPM++ 2M", "Euler a", …).
    pub fn name(self) -> &'static str {
        SAMPLERS
            .iter()
            .find(|i| i.sampler == self && i.scheduler == Scheduler::Automatic)
            .map(|i| i.name)
            .unwrap_or("?")
    }

    /// Whether the sampler draws fresh noise at every step (needs a real [`NoiseSource`]).
    pub fn is_stochastic(self) -> bool {
        matches!(
            self,
            Sampler::EulerA | Sampler::Dpm2A | Sampler::DpmPp2SA | Sampler::Lcm
        )
    }

    /// DDIM and UniPC are A1111 "timestep" samplers: they take and return latents in the
    /// model's variance-preserving space, on A1111's own timestep grid (schedulers do
    /// not apply to them, as in A1111).
    fn is_timestep_sampler(self) -> bool {
        matches!(self, Sampler::Ddim | Sampler::Plms | Sampler::UniPc)
    }
}

/// A sampler plus the scheduler it runs with.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct SamplerSpec {
    /// The algorithm.
    pub sampler: Sampler,
    /// Never [`Scheduler::Automatic`] once parsed: resolved to the name's default.
    pub scheduler: Scheduler,
}

impl SamplerSpec {
    /// Parses an A1111 sampler name (case-insensitive; labels or aliases) and an optional
    /// scheduler ("Automatic", "Karras", …; A1111 ≥ 1.9's separate "Schedule type").
    /// An explicit scheduler wins over the one a "… Karras" name implies.
    pub fn parse(name: &str, scheduler: Option<&str>) -> Result<Self, SamplerError> {
        let wanted = normalise(name);
        let found = SAMPLERS
            .iter()
            .find(|i| {
                normalise(i.name) == wanted || i.aliases.iter().any(|a| normalise(a) == wanted)
            })
            .ok_or_else(|| SamplerError::UnknownSampler {
                name: name.to_string(),
                valid: SAMPLERS
                    .iter()
                    .map(|i| i.name)
                    .collect::<Vec<_>>()
                    .join(", "),
            })?;
        let explicit = match scheduler {
            Some(s) => Scheduler::parse(s)?,
            None => Scheduler::Automatic,
        };
        let scheduler = match (explicit, found.scheduler) {
            (Scheduler::Automatic, Scheduler::Automatic) => Scheduler::Uniform,
            (Scheduler::Automatic, implied) => implied,
            (explicit, _) => explicit,
        };
        Ok(Self {
            sampler: found.sampler,
            scheduler,
        })
    }
}

/// What the per-step callback tells the sampler.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Flow {
    /// Go on.
    Continue,
    /// Stop after this step (interrupt, skip, cancel).
    Stop,
}

/// Progress of one step, handed to the callback once per step (before the update).
#[derive(Debug)]
pub struct StepInfo<'a> {
    /// 0-based step index.
    pub step: usize,
    /// Number of steps of the plan ([`Plan::steps`]).
    pub total: usize,
    /// The noise level at this step.
    pub sigma: f64,
    /// The current latent (in the sampler's working sigma space).
    pub x: &'a Tensor,
    /// The denoiser's clean-latent estimate at this step (what live previews decode).
    pub denoised: &'a Tensor,
}

/// The state a running sampler threads through its steps.
pub(crate) struct Run<'a> {
    denoiser: &'a mut dyn Denoiser,
    noise: &'a mut dyn NoiseSource,
    on_step: &'a mut dyn FnMut(&StepInfo) -> Flow,
    total: usize,
}

impl Run<'_> {
    fn denoise(&mut self, x: &Tensor, sigma: f64) -> Result<Tensor, SamplerError> {
        let d = self.denoiser.denoise(x, sigma)?;
        denoiser::check_same_shape(x, &d)?;
        Ok(d)
    }

    fn report(
        &mut self,
        step: usize,
        sigma: f64,
        x: &Tensor,
        denoised: &Tensor,
    ) -> Result<(), SamplerError> {
        let info = StepInfo {
            step,
            total: self.total,
            sigma,
            x,
            denoised,
        };
        match (self.on_step)(&info) {
            Flow::Continue => Ok(()),
            Flow::Stop => Err(SamplerError::Interrupted {
                step,
                total: self.total,
            }),
        }
    }
}

/// A ready-to-run sampling schedule: the sampler, the sigmas it walks, and how the
/// starting latent is noised.
#[derive(Debug, Clone, PartialEq)]
pub struct Plan {
    sampler: Sampler,
    sigmas: Vec<f64>,
    /// The noise level of the starting latent (differs from `sigmas[0]` only for A1111's
    /// DDIM/UniPC img2img, which noise to one timestep and start at the next).
    noise_sigma: f64,
    unipc: UniPcOptions,
}

fn check_steps(steps: usize, max_steps: usize) -> Result<(), SamplerError> {
    if steps == 0 {
        return Err(SamplerError::ZeroSteps);
    }
    if steps > max_steps {
        return Err(SamplerError::TooManySteps {
            steps,
            max: max_steps,
        });
    }
    if steps > TRAIN_TIMESTEPS {
        return Err(SamplerError::TooManySteps {
            steps,
            max: TRAIN_TIMESTEPS,
        });
    }
    Ok(())
}

impl Plan {
    /// The sigmas of a full `steps`-step run, as A1111 builds them for `spec`.
    fn full_sigmas(schedule: &NoiseSchedule, spec: SamplerSpec, steps: usize) -> Vec<f64> {
        match spec.sampler {
            // A1111 'discard_next_to_last_sigma': one more sigma, then drop the penultimate.
            Sampler::Dpm2 | Sampler::Dpm2A => {
                let mut s = schedule.sigmas(steps + 1, spec.scheduler);
                s.remove(s.len() - 2);
                s
            }
            // A1111's LCMCompVisDenoiser: only the 50 LCM levels, spaced uniformly.
            Sampler::Lcm => denoiser::lcm_schedule(schedule).sigmas(steps, Scheduler::Uniform),
            _ => schedule.sigmas(steps, spec.scheduler),
        }
    }

    /// The plan for text-to-image with `steps` steps (1..=`max_steps`).
    pub fn txt2img(
        schedule: &NoiseSchedule,
        spec: SamplerSpec,
        steps: usize,
        max_steps: usize,
    ) -> Result<Self, SamplerError> {
        check_steps(steps, max_steps)?;
        let sigmas: Vec<f64> = match spec.sampler {
            Sampler::Ddim | Sampler::Plms => {
                let ts = a1111_timesteps(steps);
                ts.iter().rev().map(|&t| schedule.table()[t]).collect()
            }
            Sampler::UniPc => {
                let n = a1111_timesteps(steps).len();
                let top = (TRAIN_TIMESTEPS - 1) as f64;
                schedule::linspace(top, 0.0, n + 1)
                    .into_iter()
                    .map(|u| schedule.vp_time_to_sigma(u))
                    .collect()
            }
            _ => Self::full_sigmas(schedule, spec, steps),
        };
        let noise_sigma = sigmas[0];
        Ok(Self {
            sampler: spec.sampler,
            sigmas,
            noise_sigma,
            unipc: UniPcOptions::default(),
        })
    }

    /// The plan for image-to-image: A1111's `t_enc = int(min(strength, 0.999) * steps)`,
    /// running the last `t_enc + 1` steps of the full `steps`-step schedule (DDIM and
    /// UniPC follow A1111's timestep samplers, which run `t_enc - 1` and `t_enc` steps).
    pub fn img2img(
        schedule: &NoiseSchedule,
        spec: SamplerSpec,
        steps: usize,
        max_steps: usize,
        strength: f64,
    ) -> Result<Self, SamplerError> {
        check_steps(steps, max_steps)?;
        if !(0.0..=1.0).contains(&strength) {
            return Err(SamplerError::BadStrength(strength));
        }
        let t_enc = img2img_t_enc(steps, strength);
        let (sigmas, noise_sigma) = match spec.sampler {
            Sampler::Ddim | Sampler::Plms => {
                let ts = a1111_timesteps(steps);
                let walk: Vec<f64> = ts[..t_enc.max(1)]
                    .iter()
                    .rev()
                    .map(|&t| schedule.table()[t])
                    .collect();
                (walk, schedule.table()[ts[t_enc]])
            }
            Sampler::UniPc => {
                let ts = a1111_timesteps(steps);
                let n = t_enc.max(1);
                let walk: Vec<f64> = schedule::linspace(ts[n - 1] as f64, 0.0, n + 1)
                    .into_iter()
                    .map(|u| schedule.vp_time_to_sigma(u))
                    .collect();
                (walk, schedule.table()[ts[t_enc]])
            }
            _ => {
                let full = Self::full_sigmas(schedule, spec, steps);
                let walk = img2img_sigmas(&full, t_enc).to_vec();
                let first = walk[0];
                (walk, first)
            }
        };
        Ok(Self {
            sampler: spec.sampler,
            sigmas,
            noise_sigma,
            unipc: UniPcOptions::default(),
        })
    }

    /// A plan over explicit sigmas (decreasing, positive except possibly a final 0).
    /// For DDIM/UniPC the latents are in the variance-preserving space at `sigmas[0]`.
    pub fn from_sigmas(sampler: Sampler, sigmas: Vec<f64>) -> Result<Self, SamplerError> {
        if sigmas.is_empty() {
            return Err(SamplerError::BadSigmas("no sigmas".into()));
        }
        let last = sigmas.len() - 1;
        for (i, pair) in sigmas.windows(2).enumerate() {
            if pair[1].partial_cmp(&pair[0]) != Some(std::cmp::Ordering::Less) {
                return Err(SamplerError::BadSigmas(format!(
                    "sigmas must decrease, but sigma[{}] = {} follows {}",
                    i + 1,
                    pair[1],
                    pair[0]
                )));
            }
        }
        let bad = |s: f64| s.is_nan() || s.is_infinite() || s < 0.0;
        if sigmas.iter().any(|s| bad(*s)) || sigmas[..last].contains(&0.0) {
            return Err(SamplerError::BadSigmas(
                "sigmas must be finite and positive (the last may be 0)".into(),
            ));
        }
        let noise_sigma = sigmas[0];
        Ok(Self {
            sampler,
            sigmas,
            noise_sigma,
            unipc: UniPcOptions::default(),
        })
    }

    /// The same plan with other UniPC settings (A1111's defaults otherwise).
    pub fn with_unipc(mut self, options: UniPcOptions) -> Self {
        self.unipc = options;
        self
    }

    /// The algorithm.
    pub fn sampler(&self) -> Sampler {
        self.sampler
    }

    /// The sigmas walked, first to last (the last is 0 for the k-diffusion samplers).
    pub fn sigmas(&self) -> &[f64] {
        &self.sigmas
    }

    /// Number of steps the callback will report.
    pub fn steps(&self) -> usize {
        self.sigmas.len() - 1
    }

    /// The latent to start from: unit `noise` scaled to the first sigma (text-to-image),
    /// or `init` (the encoded image) noised to the plan's level (image-to-image).
    pub fn initial_latent(
        &self,
        noise: &Tensor,
        init: Option<&Tensor>,
    ) -> Result<Tensor, SamplerError> {
        let s = self.noise_sigma;
        let vp = self.sampler.is_timestep_sampler();
        Ok(match (init, vp) {
            (None, false) => noise.affine(s, 0.0)?,
            // A1111 starts its timestep samplers from plain unit noise.
            (None, true) => noise.clone(),
            (Some(init), false) => kdiffusion::lin(init, 1.0, noise, s)?,
            (Some(init), true) => {
                let a = 1.0 / (s * s + 1.0).sqrt();
                kdiffusion::lin(init, a, noise, s * a)?
            }
        })
    }

    /// Runs the sampler from `x` (from [`Plan::initial_latent`]) and returns the final
    /// latent for the VAE. `on_step` sees every step and may stop the run
    /// ([`SamplerError::Interrupted`]). Stochastic samplers draw from `noise`.
    pub fn run(
        &self,
        x: Tensor,
        denoiser: &mut dyn Denoiser,
        noise: &mut dyn NoiseSource,
        on_step: &mut dyn FnMut(&StepInfo) -> Flow,
    ) -> Result<Tensor, SamplerError> {
        let mut run = Run {
            denoiser,
            noise,
            on_step,
            total: self.steps(),
        };
        if self.steps() == 0 {
            return Ok(x);
        }
        let sigmas = &self.sigmas;
        match self.sampler {
            Sampler::Euler => kdiffusion::euler(&mut run, x, sigmas),
            Sampler::EulerA => kdiffusion::euler_ancestral(&mut run, x, sigmas),
            Sampler::Heun => kdiffusion::heun(&mut run, x, sigmas),
            Sampler::Dpm2 => kdiffusion::dpm2(&mut run, x, sigmas),
            Sampler::Dpm2A => kdiffusion::dpm2_ancestral(&mut run, x, sigmas),
            Sampler::DpmPp2SA => kdiffusion::dpmpp_2s_ancestral(&mut run, x, sigmas),
            Sampler::DpmPp2M => kdiffusion::dpmpp_2m(&mut run, x, sigmas),
            Sampler::Lms => kdiffusion::lms(&mut run, x, sigmas),
            Sampler::Lcm => kdiffusion::lcm(&mut run, x, sigmas),
            Sampler::Ddim | Sampler::Plms | Sampler::UniPc => {
                // Variance-preserving in and out: x_vp = x / sqrt(sigma^2 + 1).
                let first = sigmas[0];
                let last = sigmas[sigmas.len() - 1];
                let x = x.affine((first * first + 1.0).sqrt(), 0.0)?;
                let x = match self.sampler {
                    // DDIM with eta 0 is exactly an Euler step in sigma.
                    Sampler::Ddim => kdiffusion::euler(&mut run, x, sigmas)?,
                    Sampler::Plms => kdiffusion::plms(&mut run, x, sigmas)?,
                    _ => unipc::unipc(&mut run, x, sigmas, &self.unipc)?,
                };
                Ok(x.affine(1.0 / (last * last + 1.0).sqrt(), 0.0)?)
            }
        }
    }
}
