//! Stable Diffusion's discrete noise schedule and the sigma lists A1111 walks.
//!
//! Everything here is plain `f64` arithmetic. A noise level is a *sigma* in the
//! variance-exploding (k-diffusion) parameterisation: `x = x0 + sigma * eps`, with
//! `sigma_t = sqrt((1 - alphas_cumprod[t]) / alphas_cumprod[t])`. The mapping between a
//! continuous timestep and sigma is k-diffusion's `DiscreteSchedule` (linear
//! interpolation of `log sigma` between the 1000 training timesteps, not quantised),
//! which is what AUTOMATIC1111 uses for its k-diffusion samplers.

use super::SamplerError;

/// How sigmas are spread over the steps: A1111's "Schedule type" setting.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Scheduler {
    /// The sampler's own default (Karras for the `… Karras` names, else [`Scheduler::Uniform`]).
    Automatic,
    /// k-diffusion `get_sigmas(n)`: timesteps `linspace(999, 0, n)` mapped to sigmas.
    Uniform,
    /// Karras et al. (2022), rho = 7, between the model's smallest and largest sigma.
    Karras,
    /// Evenly spaced in `log sigma`.
    Exponential,
    /// Timesteps `linspace(999, 0, n + 1)` without the last one (SDXL/SGM style).
    SgmUniform,
}

impl Scheduler {
    /// Every scheduler with the label A1111 shows and the aliases it accepts.
    pub const ALL: &'static [(Scheduler, &'static str, &'static [&'static str])] = &[
        (Scheduler::Automatic, "Automatic", &["automatic"]),
        (Scheduler::Uniform, "Uniform", &["uniform", "normal"]),
        (Scheduler::Karras, "Karras", &["karras"]),
        (Scheduler::Exponential, "Exponential", &["exponential"]),
        (
            Scheduler::SgmUniform,
            "SGM Uniform",
            &["sgm_uniform", "SGMUniform"],
        ),
    ];

    /// The A1111 label ("Karras", "SGM Uniform", …).
    pub fn label(self) -> &'static str {
        Self::ALL
            .iter()
            .find(|(s, _, _)| *s == self)
            .map(|(_, label, _)| *label)
            .unwrap_or("Automatic")
    }

    /// Parses a label or alias, ignoring case, spaces, `-` and `_`.
    pub fn parse(name: &str) -> Result<Self, SamplerError> {
        let wanted = normalise(name);
        for (scheduler, label, aliases) in Self::ALL {
            if normalise(label) == wanted || aliases.iter().any(|a| normalise(a) == wanted) {
                return Ok(*scheduler);
            }
        }
        Err(SamplerError::UnknownScheduler {
            name: name.to_string(),
            valid: Self::ALL
                .iter()
                .map(|(_, label, _)| *label)
                .collect::<Vec<_>>()
                .join(", "),
        })
    }
}

/// Lower-case with spaces, `-` and `_` removed: how sampler and scheduler names compare.
pub(crate) fn normalise(name: &str) -> String {
    name.chars()
        .filter(|c| !matches!(c, ' ' | '-' | '_'))
        .flat_map(char::to_lowercase)
        .collect()
}

/// The number of training timesteps of every Stable Diffusion model.
pub const TRAIN_TIMESTEPS: usize = 1000;

/// A discrete DDPM schedule and its sigma table (k-diffusion `DiscreteSchedule`).
#[derive(Debug, Clone, PartialEq)]
pub struct NoiseSchedule {
    alphas_cumprod: Vec<f64>,
    sigmas: Vec<f64>,
    log_sigmas: Vec<f64>,
}

impl NoiseSchedule {
    /// SD 1.x/2.x/XL: "scaled_linear" betas from 0.00085 to 0.012 over 1000 steps.
    pub fn stable_diffusion() -> Self {
        Self::scaled_linear(0.00085, 0.012, TRAIN_TIMESTEPS)
    }

    /// Betas linear in `sqrt(beta)` from `beta_start` to `beta_end` (LDM's "scaled_linear").
    pub fn scaled_linear(beta_start: f64, beta_end: f64, timesteps: usize) -> Self {
        let (a, b) = (beta_start.sqrt(), beta_end.sqrt());
        let n = timesteps.max(2);
        let mut cumprod = 1.0;
        let alphas_cumprod = (0..n)
            .map(|i| {
                let beta = (a + (b - a) * i as f64 / (n - 1) as f64).powi(2);
                cumprod *= 1.0 - beta;
                cumprod
            })
            .collect();
        Self::from_alphas_cumprod(alphas_cumprod)
    }

    /// A schedule from its `alphas_cumprod` (increasing noise; at least two entries in (0, 1)).
    pub fn from_alphas_cumprod(alphas_cumprod: Vec<f64>) -> Self {
        let sigmas: Vec<f64> = alphas_cumprod
            .iter()
            .map(|a| ((1.0 - a) / a).sqrt())
            .collect();
        let log_sigmas = sigmas.iter().map(|s| s.ln()).collect();
        Self {
            alphas_cumprod,
            sigmas,
            log_sigmas,
        }
    }

    /// `alphas_cumprod[t]` for every training timestep.
    pub fn alphas_cumprod(&self) -> &[f64] {
        &self.alphas_cumprod
    }

    /// The sigma of every training timestep (increasing).
    pub fn table(&self) -> &[f64] {
        &self.sigmas
    }

    /// The sigma of timestep 0.
    pub fn sigma_min(&self) -> f64 {
        self.sigmas[0]
    }

    /// The sigma of the last timestep.
    pub fn sigma_max(&self) -> f64 {
        self.sigmas[self.sigmas.len() - 1]
    }

    /// Continuous timestep for a sigma: linear in `log sigma` between table entries.
    pub fn sigma_to_t(&self, sigma: f64) -> f64 {
        let log_sigma = sigma.ln();
        let n = self.log_sigmas.len();
        // Last index whose log sigma is <= log_sigma (0 when none), kept below n - 1.
        let low = self
            .log_sigmas
            .iter()
            .rposition(|&l| l <= log_sigma)
            .unwrap_or(0)
            .min(n - 2);
        let (lo, hi) = (self.log_sigmas[low], self.log_sigmas[low + 1]);
        let w = ((lo - log_sigma) / (lo - hi)).clamp(0.0, 1.0);
        low as f64 + w
    }

    /// Index of the timestep nearest in `log sigma` (quantised `sigma_to_t`).
    pub fn sigma_to_nearest_t(&self, sigma: f64) -> usize {
        let log_sigma = sigma.ln();
        let mut best = 0;
        for (i, l) in self.log_sigmas.iter().enumerate() {
            if (l - log_sigma).abs() < (self.log_sigmas[best] - log_sigma).abs() {
                best = i;
            }
        }
        best
    }

    /// Sigma of a continuous timestep: `exp` of the interpolated `log sigma`.
    pub fn t_to_sigma(&self, t: f64) -> f64 {
        let t = t.clamp(0.0, (self.sigmas.len() - 1) as f64);
        let low = t.floor() as usize;
        let high = t.ceil() as usize;
        let w = t - low as f64;
        ((1.0 - w) * self.log_sigmas[low] + w * self.log_sigmas[high]).exp()
    }

    /// `steps` sigmas from high to low, plus a final 0 (`steps + 1` values).
    pub fn sigmas(&self, steps: usize, scheduler: Scheduler) -> Vec<f64> {
        let t_max = (self.sigmas.len() - 1) as f64;
        let mut out: Vec<f64> = match scheduler {
            Scheduler::Automatic | Scheduler::Uniform => linspace(t_max, 0.0, steps)
                .into_iter()
                .map(|t| self.t_to_sigma(t))
                .collect(),
            Scheduler::Karras => karras(steps, self.sigma_min(), self.sigma_max(), 7.0),
            Scheduler::Exponential => linspace(self.sigma_max().ln(), self.sigma_min().ln(), steps)
                .into_iter()
                .map(f64::exp)
                .collect(),
            Scheduler::SgmUniform => {
                let start = self.sigma_to_t(self.sigma_max());
                let end = self.sigma_to_t(self.sigma_min());
                let mut ts = linspace(start, end, steps + 1);
                ts.pop();
                ts.into_iter().map(|t| self.t_to_sigma(t)).collect()
            }
        };
        out.push(0.0);
        out
    }

    /// Sigma of the variance-preserving continuous time that A1111's UniPC uses:
    /// `log alpha` (= `0.5 ln alphas_cumprod`) interpolated linearly in the timestep.
    pub fn vp_time_to_sigma(&self, t: f64) -> f64 {
        let n = self.alphas_cumprod.len();
        let t = t.clamp(0.0, (n - 1) as f64);
        let low = (t.floor() as usize).min(n - 2);
        let w = t - low as f64;
        let log_alpha = 0.5
            * ((1.0 - w) * self.alphas_cumprod[low].ln() + w * self.alphas_cumprod[low + 1].ln());
        let alpha2 = (2.0 * log_alpha).exp();
        ((1.0 - alpha2) / alpha2).sqrt()
    }
}

/// `n` evenly spaced values from `start` to `end` inclusive (`torch.linspace`).
pub(crate) fn linspace(start: f64, end: f64, n: usize) -> Vec<f64> {
    match n {
        0 => Vec::new(),
        1 => vec![start],
        _ => (0..n)
            .map(|i| start + (end - start) * i as f64 / (n - 1) as f64)
            .collect(),
    }
}

/// Karras et al. (2022) sigmas, without the final zero (k-diffusion `get_sigmas_karras`).
pub fn karras(steps: usize, sigma_min: f64, sigma_max: f64, rho: f64) -> Vec<f64> {
    let min_inv = sigma_min.powf(1.0 / rho);
    let max_inv = sigma_max.powf(1.0 / rho);
    linspace(0.0, 1.0, steps)
        .into_iter()
        .map(|r| (max_inv + r * (min_inv - max_inv)).powf(rho))
        .collect()
}

/// A1111's timesteps for DDIM and UniPC: `clip(range(0, 1000, 1000 // steps) + 1, 0, 999)`.
/// There are more than `steps` of them when 1000 is not a multiple of `steps`.
pub fn a1111_timesteps(steps: usize) -> Vec<usize> {
    let stride = (TRAIN_TIMESTEPS / steps.max(1)).max(1);
    (0..TRAIN_TIMESTEPS)
        .step_by(stride)
        .map(|t| (t + 1).min(TRAIN_TIMESTEPS - 1))
        .collect()
}

/// A1111's img2img split: `t_enc = int(min(strength, 0.999) * steps)`; the sampler then
/// runs the last `t_enc + 1` steps of the full `steps`-step schedule.
pub fn img2img_t_enc(steps: usize, strength: f64) -> usize {
    (strength.min(0.999) * steps as f64).floor() as usize
}

/// The tail of a full schedule that img2img walks: `sigmas[steps - t_enc - 1..]`
/// (`t_enc + 2` values, `t_enc + 1` steps, ending with the schedule's last sigma).
pub fn img2img_sigmas(full: &[f64], t_enc: usize) -> &[f64] {
    let steps = full.len().saturating_sub(1);
    let start = steps.saturating_sub(t_enc + 1);
    &full[start..]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sigma_and_t_round_trip() {
        let s = NoiseSchedule::stable_diffusion();
        for t in [0.0, 1.0, 17.25, 500.5, 998.9, 999.0] {
            let back = s.sigma_to_t(s.t_to_sigma(t));
            assert!((back - t).abs() < 1e-9, "{t} -> {back}");
        }
        // SD's well-known extremes.
        assert!((s.sigma_max() - 14.6146).abs() < 1e-3, "{}", s.sigma_max());
        assert!((s.sigma_min() - 0.029168).abs() < 1e-5, "{}", s.sigma_min());
    }

    #[test]
    fn vp_time_matches_table_at_integers() {
        let s = NoiseSchedule::stable_diffusion();
        for t in [0usize, 1, 500, 999] {
            let a = s.vp_time_to_sigma(t as f64);
            assert!((a - s.table()[t]).abs() < 1e-9 * s.table()[t]);
        }
    }

    #[test]
    fn a1111_timesteps_follow_range_quirk() {
        assert_eq!(a1111_timesteps(5), vec![1, 201, 401, 601, 801]);
        // 1000 // 7 = 142 gives eight timesteps, the last one 7 * 142 + 1 = 995.
        assert_eq!(a1111_timesteps(7).len(), 8);
        assert_eq!(*a1111_timesteps(1000).last().unwrap(), 999);
    }
}
