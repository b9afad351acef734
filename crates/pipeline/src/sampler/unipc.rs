//! UniPC (Zhao et al. 2023, "UniPC: A Unified Predictor-Corrector Framework"), multistep,
//! data prediction, B(h) variants — the options A1111 exposes (`uni_pc_variant` "bh1",
//! `uni_pc_order` 3, `uni_pc_lower_order_final` on).
//!
//! Written in sigma (variance-exploding) form: with `lambda = -ln sigma`, the VP update
//! `x_t = (sigma_vp_t / sigma_vp_0) x - alpha_t phi_1 m0 - alpha_t B(h) res` divided by
//! `alpha_t` becomes `x_t = (sigma_t / sigma_0) x - phi_1 m0 - B(h) res`, so no alpha
//! appears and the same code runs on any sigma list.

use candle_core::Tensor;

use super::kdiffusion::lin;
use super::{Run, SamplerError};

type R<T> = Result<T, SamplerError>;

/// The B(h) choice of UniPC.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UniPcVariant {
    /// `B(h) = h` (A1111's default).
    Bh1,
    /// `B(h) = e^h - 1` (diffusers' default).
    Bh2,
}

/// UniPC settings.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct UniPcOptions {
    /// The `B(h)` variant.
    pub variant: UniPcVariant,
    /// Highest order (capped by the number of steps).
    pub order: usize,
    /// Drop to lower orders on the last steps.
    pub lower_order_final: bool,
}

impl Default for UniPcOptions {
    /// A1111's defaults.
    fn default() -> Self {
        Self {
            variant: UniPcVariant::Bh1,
            order: 3,
            lower_order_final: true,
        }
    }
}

/// Solves the small dense system `a x = b` (Gaussian elimination, partial pivoting).
fn solve(mut a: Vec<Vec<f64>>, mut b: Vec<f64>) -> R<Vec<f64>> {
    let n = b.len();
    for col in 0..n {
        let pivot = (col..n)
            .max_by(|&i, &j| a[i][col].abs().total_cmp(&a[j][col].abs()))
            .unwrap_or(col);
        if a[pivot][col].abs() < 1e-300 {
            return Err(SamplerError::BadSigmas(
                "UniPC met a singular system: repeated sigmas".into(),
            ));
        }
        a.swap(col, pivot);
        b.swap(col, pivot);
        let (upper, lower) = a.split_at_mut(col + 1);
        let pivot_row = &upper[col];
        for (offset, row) in lower.iter_mut().enumerate() {
            let f = row[col] / pivot_row[col];
            for (r, p) in row[col..].iter_mut().zip(&pivot_row[col..]) {
                *r -= f * p;
            }
            b[col + 1 + offset] -= f * b[col];
        }
    }
    let mut x = vec![0.0; n];
    for row in (0..n).rev() {
        let s: f64 = (row + 1..n).map(|k| a[row][k] * x[k]).sum();
        x[row] = (b[row] - s) / a[row][row];
    }
    Ok(x)
}

/// `sum_k w_k * t_k`.
fn weighted_sum(terms: &[Tensor], weights: &[f64]) -> R<Option<Tensor>> {
    let mut acc: Option<Tensor> = None;
    for (t, w) in terms.iter().zip(weights) {
        let scaled = t.affine(*w, 0.0)?;
        acc = Some(match acc {
            None => scaled,
            Some(a) => (a + scaled)?,
        });
    }
    Ok(acc)
}

/// One predictor(-corrector) update from the last point of `prev` to `sigma_t`.
/// Returns the new `x` and, when the corrector ran, the model value at the predicted `x`.
fn update(
    run: &mut Run,
    opts: &UniPcOptions,
    x: &Tensor,
    prev: &[(f64, Tensor)],
    sigma_t: f64,
    order: usize,
    use_corrector: bool,
) -> R<(Tensor, Option<Tensor>)> {
    let (sigma_0, m0) = &prev[prev.len() - 1];
    let sigma_0 = *sigma_0;
    // Reaching sigma = 0 makes h infinite; only the first-order step stays finite there.
    let order = if sigma_t == 0.0 { 1 } else { order };
    let h = (sigma_0 / sigma_t).ln();
    let hh = -h;
    let mut rks = Vec::with_capacity(order);
    let mut d1s = Vec::with_capacity(order);
    for i in 1..order {
        let (sigma_i, m_i) = &prev[prev.len() - 1 - i];
        let rk = (sigma_0 / sigma_i).ln() / h;
        rks.push(rk);
        d1s.push((m_i - m0)?.affine(1.0 / rk, 0.0)?);
    }
    rks.push(1.0);

    let h_phi_1 = hh.exp_m1();
    let b_h = match opts.variant {
        UniPcVariant::Bh1 => hh,
        UniPcVariant::Bh2 => hh.exp_m1(),
    };
    let mut r_mat = Vec::with_capacity(order);
    let mut b = Vec::with_capacity(order);
    let mut h_phi_k = h_phi_1 / hh - 1.0;
    let mut factorial = 1.0;
    for i in 1..=order {
        r_mat.push(rks.iter().map(|r| r.powi(i as i32 - 1)).collect::<Vec<_>>());
        b.push(h_phi_k * factorial / b_h);
        factorial *= (i + 1) as f64;
        h_phi_k = h_phi_k / hh - 1.0 / factorial;
    }

    let ratio = sigma_t / sigma_0;
    let x_base = if sigma_t == 0.0 {
        m0.clone()
    } else {
        lin(x, ratio, m0, -h_phi_1)?
    };
    let x_pred = if d1s.is_empty() {
        x_base.clone()
    } else {
        let rhos_p = if order == 2 {
            vec![0.5]
        } else {
            let sub: Vec<Vec<f64>> = r_mat[..order - 1]
                .iter()
                .map(|row| row[..order - 1].to_vec())
                .collect();
            solve(sub, b[..order - 1].to_vec())?
        };
        match weighted_sum(&d1s, &rhos_p)? {
            Some(res) => (&x_base - res.affine(b_h, 0.0)?)?,
            None => x_base.clone(),
        }
    };
    if !use_corrector {
        return Ok((x_pred, None));
    }
    let rhos_c = if order == 1 {
        vec![0.5]
    } else {
        solve(r_mat, b)?
    };
    let model_t = run.denoise(&x_pred, sigma_t)?;
    let d1_t = (&model_t - m0)?;
    let mut corr = d1_t.affine(rhos_c[order - 1], 0.0)?;
    if let Some(res) = weighted_sum(&d1s, &rhos_c[..order - 1])? {
        corr = (corr + res)?;
    }
    let x_t = (&x_base - corr.affine(b_h, 0.0)?)?;
    Ok((x_t, Some(model_t)))
}

/// Multistep UniPC over `sigmas` (all > 0 except possibly the last), A1111's loop:
/// warm up with orders 1..order, then `min(order, steps_left)` with lower_order_final,
/// corrector everywhere except the last step (whose model value is never needed).
pub(crate) fn unipc(
    run: &mut Run,
    mut x: Tensor,
    sigmas: &[f64],
    opts: &UniPcOptions,
) -> R<Tensor> {
    let steps = sigmas.len() - 1;
    let order = opts.order.clamp(1, steps.max(1));
    let m = run.denoise(&x, sigmas[0])?;
    run.report(0, sigmas[0], &x, &m)?;
    let mut prev: Vec<(f64, Tensor)> = vec![(sigmas[0], m)];
    for (step, &sigma_t) in sigmas.iter().enumerate().skip(1) {
        let step_order = if step < order {
            step
        } else if opts.lower_order_final {
            order.min(steps + 1 - step)
        } else {
            order
        };
        let use_corrector = step != steps;
        let (new_x, model_x) = update(run, opts, &x, &prev, sigma_t, step_order, use_corrector)?;
        x = new_x;
        if step < steps {
            let model_x = match model_x {
                Some(m) => m,
                None => run.denoise(&x, sigma_t)?,
            };
            run.report(step, sigma_t, &x, &model_x)?;
            prev.push((sigma_t, model_x));
            if prev.len() > order {
                prev.remove(0);
            }
        }
    }
    Ok(x)
}

#[cfg(test)]
mod tests {
    use super::solve;

    #[test]
    fn solves_a_small_system() {
        let x = solve(
            vec![
                vec![1.0, 1.0, 1.0],
                vec![-1.0, 2.0, 1.0],
                vec![1.0, 4.0, 1.0],
            ],
            vec![6.0, 6.0, 12.0],
        )
        .unwrap();
        for (got, want) in x.iter().zip([1.0, 2.0, 3.0]) {
            assert!((got - want).abs() < 1e-12, "{x:?}");
        }
        assert!(solve(vec![vec![1.0, 1.0], vec![1.0, 1.0]], vec![1.0, 2.0]).is_err());
    }
}
