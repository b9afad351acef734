//! AdamW over the learned vectors, with moments a checkpoint can save.

use candle_core::{Tensor, Var};

use super::TrainError;

/// AdamW (weight decay 0, as A1111) whose moments can be saved with a checkpoint and
/// restored on resume (candle's optimizer keeps its state private).
pub(super) struct Adam {
    vars: Vec<Var>,
    m: Vec<Tensor>,
    v: Vec<Tensor>,
    /// Steps taken, counting a resumed run's earlier ones (bias correction).
    t: usize,
    lr: f64,
}

impl Adam {
    const BETA1: f64 = 0.9;
    const BETA2: f64 = 0.999;
    const EPS: f64 = 1e-8;

    pub(super) fn new(
        vars: Vec<Var>,
        lr: f64,
        t: usize,
        moments: Option<Moments>,
    ) -> Result<Self, TrainError> {
        let fresh = || -> candle_core::Result<(Vec<Tensor>, Vec<Tensor>)> {
            let zeros = vars
                .iter()
                .map(|v| v.as_tensor().zeros_like())
                .collect::<candle_core::Result<Vec<_>>>()?;
            Ok((zeros.clone(), zeros))
        };
        let (m, v) = match moments {
            Some(mo)
                if mo.m.len() == vars.len()
                    && mo
                        .m
                        .iter()
                        .zip(&vars)
                        .all(|(m, var)| m.dims() == var.dims()) =>
            {
                let dev = vars[0].device();
                (
                    mo.m.iter()
                        .map(|t| t.to_device(dev))
                        .collect::<candle_core::Result<_>>()?,
                    mo.v.iter()
                        .map(|t| t.to_device(dev))
                        .collect::<candle_core::Result<_>>()?,
                )
            }
            _ => fresh()?,
        };
        Ok(Self { vars, m, v, t, lr })
    }

    pub(super) fn backward_step(&mut self, loss: &Tensor) -> Result<(), TrainError> {
        let grads = loss.backward()?;
        self.t += 1;
        let c1 = 1.0 - Self::BETA1.powi(self.t as i32);
        let c2 = 1.0 - Self::BETA2.powi(self.t as i32);
        for ((var, m), v) in self.vars.iter().zip(&mut self.m).zip(&mut self.v) {
            let Some(g) = grads.get(var.as_tensor()) else {
                continue;
            };
            *m = ((&*m * Self::BETA1)? + (g * (1.0 - Self::BETA1))?)?;
            *v = ((&*v * Self::BETA2)? + (g.sqr()? * (1.0 - Self::BETA2))?)?;
            let update = ((&*m / c1)? / ((&*v / c2)?.sqrt()? + Self::EPS)?)?;
            var.set(&(var.as_tensor() - (update * self.lr)?)?)?;
        }
        Ok(())
    }

    pub(super) fn moments(&self) -> Moments {
        Moments {
            m: self.m.clone(),
            v: self.v.clone(),
        }
    }
}

/// AdamW's first and second moments, one per learned tensor.
pub(super) struct Moments {
    pub(super) m: Vec<Tensor>,
    pub(super) v: Vec<Tensor>,
}
