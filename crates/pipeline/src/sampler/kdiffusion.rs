//! The k-diffusion samplers A1111 uses (`k_diffusion/sampling.py`, Crowson), plus LCM.
//!
//! Each walks `x` (variance-exploding: `x = x0 + sigma * eps`) down a sigma list that
//! ends in 0. Per-step scalars are `f64`; tensor arithmetic stays in `x`'s dtype.

use candle_core::Tensor;

use super::{Run, SamplerError};

type R<T> = Result<T, SamplerError>;

/// `a * x + b * y`.
pub(crate) fn lin(x: &Tensor, a: f64, y: &Tensor, b: f64) -> R<Tensor> {
    Ok((x.affine(a, 0.0)? + y.affine(b, 0.0)?)?)
}

/// The ODE derivative `(x - denoised) / sigma`.
fn to_d(x: &Tensor, sigma: f64, denoised: &Tensor) -> R<Tensor> {
    Ok((x - denoised)?.affine(1.0 / sigma, 0.0)?)
}

/// Euler step of the ODE from `sigma` to `sigma_next` with derivative `d`.
fn euler_step(x: &Tensor, d: &Tensor, dt: f64) -> R<Tensor> {
    Ok((x + d.affine(dt, 0.0)?)?)
}

/// Ancestral split (eta = 1): step down deterministically to `sigma_down`, then add
/// `sigma_up` of fresh noise so that the marginal noise level is `sigma_next`.
fn ancestral_step(sigma: f64, sigma_next: f64) -> (f64, f64) {
    let up = (sigma_next * sigma_next * (sigma * sigma - sigma_next * sigma_next)
        / (sigma * sigma))
        .sqrt()
        .min(sigma_next);
    let down = (sigma_next * sigma_next - up * up).sqrt();
    (down, up)
}

fn add_noise(run: &mut Run, x: Tensor, sigma: f64, sigma_next: f64, amount: f64) -> R<Tensor> {
    let n = run.noise.noise(&x, sigma, sigma_next)?;
    Ok((x + n.affine(amount, 0.0)?)?)
}

pub(crate) fn euler(run: &mut Run, mut x: Tensor, sigmas: &[f64]) -> R<Tensor> {
    for i in 0..sigmas.len() - 1 {
        let (s, next) = (sigmas[i], sigmas[i + 1]);
        let den = run.denoise(&x, s)?;
        run.report(i, s, &x, &den)?;
        let d = to_d(&x, s, &den)?;
        x = euler_step(&x, &d, next - s)?;
    }
    Ok(x)
}

pub(crate) fn euler_ancestral(run: &mut Run, mut x: Tensor, sigmas: &[f64]) -> R<Tensor> {
    for i in 0..sigmas.len() - 1 {
        let (s, next) = (sigmas[i], sigmas[i + 1]);
        let den = run.denoise(&x, s)?;
        let (down, up) = ancestral_step(s, next);
        run.report(i, s, &x, &den)?;
        let d = to_d(&x, s, &den)?;
        x = euler_step(&x, &d, down - s)?;
        if next > 0.0 {
            x = add_noise(run, x, s, next, up)?;
        }
    }
    Ok(x)
}

pub(crate) fn heun(run: &mut Run, mut x: Tensor, sigmas: &[f64]) -> R<Tensor> {
    for i in 0..sigmas.len() - 1 {
        let (s, next) = (sigmas[i], sigmas[i + 1]);
        let den = run.denoise(&x, s)?;
        run.report(i, s, &x, &den)?;
        let d = to_d(&x, s, &den)?;
        let dt = next - s;
        if next == 0.0 {
            x = euler_step(&x, &d, dt)?;
        } else {
            let x2 = euler_step(&x, &d, dt)?;
            let den2 = run.denoise(&x2, next)?;
            let d2 = to_d(&x2, next, &den2)?;
            let d_prime = lin(&d, 0.5, &d2, 0.5)?;
            x = euler_step(&x, &d_prime, dt)?;
        }
    }
    Ok(x)
}

/// The midpoint of `a` and `b` in log space.
fn log_mid(a: f64, b: f64) -> f64 {
    (0.5 * (a.ln() + b.ln())).exp()
}

pub(crate) fn dpm2(run: &mut Run, mut x: Tensor, sigmas: &[f64]) -> R<Tensor> {
    for i in 0..sigmas.len() - 1 {
        let (s, next) = (sigmas[i], sigmas[i + 1]);
        let den = run.denoise(&x, s)?;
        run.report(i, s, &x, &den)?;
        let d = to_d(&x, s, &den)?;
        if next == 0.0 {
            x = euler_step(&x, &d, next - s)?;
        } else {
            let mid = log_mid(s, next);
            let x2 = euler_step(&x, &d, mid - s)?;
            let den2 = run.denoise(&x2, mid)?;
            let d2 = to_d(&x2, mid, &den2)?;
            x = euler_step(&x, &d2, next - s)?;
        }
    }
    Ok(x)
}

pub(crate) fn dpm2_ancestral(run: &mut Run, mut x: Tensor, sigmas: &[f64]) -> R<Tensor> {
    for i in 0..sigmas.len() - 1 {
        let (s, next) = (sigmas[i], sigmas[i + 1]);
        let den = run.denoise(&x, s)?;
        let (down, up) = ancestral_step(s, next);
        run.report(i, s, &x, &den)?;
        let d = to_d(&x, s, &den)?;
        if down == 0.0 {
            x = euler_step(&x, &d, down - s)?;
        } else {
            let mid = log_mid(s, down);
            let x2 = euler_step(&x, &d, mid - s)?;
            let den2 = run.denoise(&x2, mid)?;
            let d2 = to_d(&x2, mid, &den2)?;
            x = euler_step(&x, &d2, down - s)?;
            x = add_noise(run, x, s, next, up)?;
        }
    }
    Ok(x)
}

/// One DPM-Solver++ first-order step from `s` to `to` with data estimate `den`:
/// `(to / s) * x - expm1(-h) * den` with `h = ln(s / to)`, i.e. `expm1(-h) = to/s - 1`.
fn dpmpp_first_order(x: &Tensor, s: f64, to: f64, den: &Tensor) -> R<Tensor> {
    let ratio = to / s;
    lin(x, ratio, den, 1.0 - ratio)
}

pub(crate) fn dpmpp_2s_ancestral(run: &mut Run, mut x: Tensor, sigmas: &[f64]) -> R<Tensor> {
    for i in 0..sigmas.len() - 1 {
        let (s, next) = (sigmas[i], sigmas[i + 1]);
        let den = run.denoise(&x, s)?;
        let (down, up) = ancestral_step(s, next);
        run.report(i, s, &x, &den)?;
        if down == 0.0 {
            let d = to_d(&x, s, &den)?;
            x = euler_step(&x, &d, down - s)?;
        } else {
            // Midpoint in lambda = -ln(sigma): sigma_mid = sqrt(s * down).
            let mid = (s * down).sqrt();
            let x2 = dpmpp_first_order(&x, s, mid, &den)?;
            let den2 = run.denoise(&x2, mid)?;
            x = dpmpp_first_order(&x, s, down, &den2)?;
        }
        if next > 0.0 {
            x = add_noise(run, x, s, next, up)?;
        }
    }
    Ok(x)
}

pub(crate) fn dpmpp_2m(run: &mut Run, mut x: Tensor, sigmas: &[f64]) -> R<Tensor> {
    let mut old: Option<Tensor> = None;
    for i in 0..sigmas.len() - 1 {
        let (s, next) = (sigmas[i], sigmas[i + 1]);
        let den = run.denoise(&x, s)?;
        run.report(i, s, &x, &den)?;
        x = match &old {
            Some(old) if next != 0.0 => {
                let h = (s / next).ln();
                let h_last = (sigmas[i - 1] / s).ln();
                let r = h_last / h;
                let den_d = lin(&den, 1.0 + 1.0 / (2.0 * r), old, -1.0 / (2.0 * r))?;
                dpmpp_first_order(&x, s, next, &den_d)?
            }
            _ => dpmpp_first_order(&x, s, next, &den)?,
        };
        old = Some(den);
    }
    Ok(x)
}

/// Coefficient `j` of the order-`order` Adams–Bashforth step `i` in sigma: the integral
/// over `[sigmas[i], sigmas[i + 1]]` of the Lagrange basis polynomial through
/// `sigmas[i - k]`, `k < order`, that is 1 at `sigmas[i - j]`. The integrand is a
/// polynomial of degree < 4, so 4-point Gauss–Legendre is exact (k-diffusion uses
/// `scipy.integrate.quad`, which agrees to rounding).
pub(crate) fn lms_coefficient(order: usize, sigmas: &[f64], i: usize, j: usize) -> f64 {
    const NODES: [f64; 4] = [
        -0.861_136_311_594_052_6,
        -0.339_981_043_584_856_3,
        0.339_981_043_584_856_3,
        0.861_136_311_594_052_6,
    ];
    const WEIGHTS: [f64; 4] = [
        0.347_854_845_137_453_9,
        0.652_145_154_862_546_1,
        0.652_145_154_862_546_1,
        0.347_854_845_137_453_9,
    ];
    let (a, b) = (sigmas[i], sigmas[i + 1]);
    let basis = |tau: f64| {
        (0..order)
            .filter(|&k| k != j)
            .map(|k| (tau - sigmas[i - k]) / (sigmas[i - j] - sigmas[i - k]))
            .product::<f64>()
    };
    let half = 0.5 * (b - a);
    let centre = 0.5 * (a + b);
    NODES
        .iter()
        .zip(WEIGHTS)
        .map(|(n, w)| w * basis(centre + half * n))
        .sum::<f64>()
        * half
}

pub(crate) fn lms(run: &mut Run, mut x: Tensor, sigmas: &[f64]) -> R<Tensor> {
    const ORDER: usize = 4;
    let mut ds: Vec<Tensor> = Vec::with_capacity(ORDER + 1);
    for i in 0..sigmas.len() - 1 {
        let s = sigmas[i];
        let den = run.denoise(&x, s)?;
        ds.push(to_d(&x, s, &den)?);
        if ds.len() > ORDER {
            ds.remove(0);
        }
        run.report(i, s, &x, &den)?;
        let order = (i + 1).min(ORDER);
        for (j, d) in ds.iter().rev().enumerate().take(order) {
            let c = lms_coefficient(order, sigmas, i, j);
            x = (x + d.affine(c, 0.0)?)?;
        }
    }
    Ok(x)
}

/// LCM (A1111 `sample_lcm`): jump to the consistency estimate, re-noise to the next sigma.
pub(crate) fn lcm(run: &mut Run, mut x: Tensor, sigmas: &[f64]) -> R<Tensor> {
    for i in 0..sigmas.len() - 1 {
        let (s, next) = (sigmas[i], sigmas[i + 1]);
        let den = run.denoise(&x, s)?;
        run.report(i, s, &x, &den)?;
        x = den;
        if next > 0.0 {
            x = add_noise(run, x, s, next, next)?;
        }
    }
    Ok(x)
}

/// A1111's PLMS (CompVis's pseudo linear multistep, `plms` of A1111's timestep samplers), in
/// sigma terms: each step is DDIM's (an Euler step in sigma on the model's noise estimate)
/// with the estimate replaced by an Adams–Bashforth combination of the last four; the first
/// step averages the estimates at both of its ends (a second model call: "pseudo improved
/// Euler").
pub(crate) fn plms(run: &mut Run, mut x: Tensor, sigmas: &[f64]) -> R<Tensor> {
    // Earlier steps' estimates, oldest first (at most three).
    let mut old: Vec<Tensor> = Vec::with_capacity(3);
    for i in 0..sigmas.len() - 1 {
        let (s, next) = (sigmas[i], sigmas[i + 1]);
        let den = run.denoise(&x, s)?;
        run.report(i, s, &x, &den)?;
        let d = to_d(&x, s, &den)?;
        let dt = next - s;
        let d_prime = match old.as_slice() {
            [] => {
                let x2 = euler_step(&x, &d, dt)?;
                let den2 = run.denoise(&x2, next)?;
                lin(&d, 0.5, &to_d(&x2, next, &den2)?, 0.5)?
            }
            [a] => lin(&d, 1.5, a, -0.5)?,
            [b, a] => ((lin(&d, 23.0, a, -16.0)? + b.affine(5.0, 0.0)?)? / 12.0)?,
            [c, b, a, ..] => {
                let ab = lin(&d, 55.0, a, -59.0)?;
                ((ab + lin(b, 37.0, c, -9.0)?)? / 24.0)?
            }
        };
        x = euler_step(&x, &d_prime, dt)?;
        old.push(d);
        if old.len() > 3 {
            old.remove(0);
        }
    }
    Ok(x)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lms_coefficients_sum_to_the_step() {
        // The basis polynomials sum to 1, so the coefficients sum to sigma_{i+1} - sigma_i.
        let sigmas = [14.6, 9.0, 5.1, 2.7, 1.3, 0.0];
        for i in 0..5 {
            let order = (i + 1).min(4);
            let sum: f64 = (0..order)
                .map(|j| lms_coefficient(order, &sigmas, i, j))
                .sum();
            assert!(
                (sum - (sigmas[i + 1] - sigmas[i])).abs() < 1e-12,
                "step {i}: {sum}"
            );
        }
    }

    #[test]
    fn ancestral_split_keeps_the_marginal_sigma() {
        let (down, up) = ancestral_step(3.0, 1.5);
        assert!((down * down + up * up - 1.5 * 1.5).abs() < 1e-12);
        assert_eq!(ancestral_step(3.0, 0.0), (0.0, 0.0));
    }
}
