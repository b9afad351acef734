//! Normalisation layers: `nn.LayerNorm` and `nn.GroupNorm` (with SiLU fused on request), each
//! with the closed-form input gradient for training through a frozen network.

use candle_core::{DType, Module, Result, Tensor, D};
use candle_nn::{layer_norm, VarBuilder};

use crate::profile;
use crate::tracked::Normalized;

/// `transformers`' `nn.LayerNorm`, differentiable when gradients are tracked.
#[derive(Debug, Clone)]
pub struct LayerNorm {
    inner: candle_nn::LayerNorm,
    eps: f64,
}

impl LayerNorm {
    /// A layer norm over the last axis of `size`, its weight and bias from `vb`.
    pub fn new(size: usize, eps: f64, vb: VarBuilder) -> Result<Self> {
        Ok(Self {
            inner: layer_norm(size, eps, vb)?,
            eps,
        })
    }

    /// The normalised `xs`, over its last axis.
    pub fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        if xs.track_op() && !self.tracks() {
            // The forward takes eps as f32 (candle's layer-norm API): so does its gradient.
            let (weight, eps) = (self.inner.weight().clone(), self.eps as f32 as f64);
            return crate::tracked::with_input_grad(
                xs,
                "layer norm backward",
                |xs| self.run(xs),
                move |xs, grad| {
                    #[cfg(feature = "cuda")]
                    if let Some(dx) = crate::cuda::layer_norm_input_grad(xs, grad, &weight, eps)? {
                        return Ok(dx);
                    }
                    let (shape, d) = (xs.shape().clone(), xs.dim(D::Minus1)?);
                    let precise = crate::tracked::precise(xs.dtype());
                    let rows = Normalized::new(&xs.to_dtype(precise)?.reshape(((), d))?, eps)?;
                    let dxhat = grad.to_dtype(precise)?.reshape(((), d))?;
                    let dxhat = dxhat.broadcast_mul(&weight.to_dtype(precise)?)?;
                    rows.input_grad(&dxhat)?
                        .reshape(shape)?
                        .to_dtype(xs.dtype())
                },
            );
        }
        self.run(xs)
    }

    fn tracks(&self) -> bool {
        self.inner.weight().track_op() || self.inner.bias().is_some_and(|b| b.track_op())
    }

    fn run(&self, xs: &Tensor) -> Result<Tensor> {
        profile::timed("layer norm", xs.device(), || match self.inner.bias() {
            // The fused kernels have no backward pass and no f64 version.
            Some(bias) if xs.track_op() || xs.dtype() == DType::F64 => {
                candle_nn::ops::layer_norm_slow(xs, self.inner.weight(), bias, self.eps as f32)
            }
            #[cfg(feature = "cuda")]
            Some(bias) => match crate::cuda::layer_norm(xs, self.inner.weight(), bias, self.eps)? {
                Some(ys) => Ok(ys),
                None => self.inner.forward(xs),
            },
            _ => self.inner.forward(xs),
        })
    }
}

/// `nn.GroupNorm`, with SiLU after it on request: one fused kernel on CUDA
/// ([`crate::cuda::group_norm`]), candle's ops elsewhere.
#[derive(Debug, Clone)]
pub struct GroupNorm {
    inner: candle_nn::GroupNorm,
    // What the fused kernel and the gradient check take (candle's `GroupNorm` does not
    // expose them).
    weight: Tensor,
    bias: Tensor,
    groups: usize,
    eps: f64,
}

/// A group norm of `channels` in `groups` groups, its weight and bias from `vb` (1 and 0 by
/// default).
pub fn group_norm(groups: usize, channels: usize, eps: f64, vb: VarBuilder) -> Result<GroupNorm> {
    let weight = vb.get_with_hints(channels, "weight", candle_nn::Init::Const(1.))?;
    let bias = vb.get_with_hints(channels, "bias", candle_nn::Init::Const(0.))?;
    Ok(GroupNorm {
        inner: candle_nn::GroupNorm::new(weight.clone(), bias.clone(), channels, groups, eps)?,
        weight,
        bias,
        groups,
        eps,
    })
}

impl GroupNorm {
    /// `group_norm(xs)` over `[N, C, ..]`.
    pub fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        self.run(xs, false)
    }

    /// `silu(group_norm(xs))`.
    pub fn forward_silu(&self, xs: &Tensor) -> Result<Tensor> {
        self.run(xs, true)
    }

    /// `silu(group_norm(xs + added))`, `added` `[N, C]` added to every pixel of each sample's
    /// channel (a ResNet block's time embedding before its second norm). On the GPU, for
    /// channels-last maps, the kernels add it as they read `xs`: the sum is never stored.
    pub fn forward_silu_added(&self, xs: &Tensor, added: &Tensor) -> Result<Tensor> {
        if xs.track_op() || added.track_op() {
            // inside a gradient graph: the sum, then the norm that has a backward pass
            return self.forward_silu(&crate::elementwise::add_bias(xs.clone(), added, 1)?);
        }
        self.timed(xs, true, Some(added))
    }

    fn run(&self, xs: &Tensor, silu: bool) -> Result<Tensor> {
        if xs.track_op() && !self.weight.track_op() && !self.bias.track_op() {
            let norm = self.clone();
            return crate::tracked::with_input_grad(
                xs,
                "group norm backward",
                |xs| self.timed(xs, silu, None),
                move |xs, grad| norm.input_grad(xs, grad, silu),
            );
        }
        self.timed(xs, silu, None)
    }

    fn timed(&self, xs: &Tensor, silu: bool, added: Option<&Tensor>) -> Result<Tensor> {
        profile::timed("group norm", xs.device(), || self.norm(xs, silu, added))
    }

    /// The gradient of `xs` `[N, C, ..]` given `grad`, that of the output.
    fn input_grad(&self, xs: &Tensor, grad: &Tensor, silu: bool) -> Result<Tensor> {
        #[cfg(feature = "cuda")]
        {
            let (w, b) = (&self.weight, &self.bias);
            let fused =
                crate::cuda::group_norm_input_grad(xs, grad, w, b, self.groups, self.eps, silu)?;
            if let Some(dx) = fused {
                return Ok(dx);
            }
        }
        let (shape, n, c) = (xs.shape().clone(), xs.dim(0)?, xs.dim(1)?);
        let precise = crate::tracked::precise(xs.dtype());
        let per_channel = |t: &Tensor| {
            let mut dims = vec![1, c];
            dims.resize(shape.rank(), 1);
            t.to_dtype(precise)?.reshape(dims)
        };
        let rows = xs.to_dtype(precise)?.reshape((n * self.groups, ()))?;
        let rows = Normalized::new(&rows, self.eps)?;
        let gamma = per_channel(&self.weight)?;
        let mut grad = grad.to_dtype(precise)?;
        if silu {
            // d/dy y·σ(y) = σ(y)·(1 + y·(1 − σ(y)))
            let xhat = rows.xhat.reshape(&shape)?;
            let y = xhat
                .broadcast_mul(&gamma)?
                .broadcast_add(&per_channel(&self.bias)?)?;
            let s = candle_nn::ops::sigmoid(&y)?;
            let slope = (&s * (&y * s.affine(-1., 1.)?)?.affine(1., 1.)?)?;
            grad = (grad * slope)?;
        }
        let dxhat = grad.broadcast_mul(&gamma)?.reshape((n * self.groups, ()))?;
        rows.input_grad(&dxhat)?
            .reshape(shape)?
            .to_dtype(xs.dtype())
    }

    /// The norm (then SiLU where `silu`) of `xs`, or of `xs + added` (`[N, C]`).
    fn norm(&self, xs: &Tensor, silu: bool, added: Option<&Tensor>) -> Result<Tensor> {
        #[cfg(feature = "cuda")]
        {
            let (w, b) = (&self.weight, &self.bias);
            let fused = crate::cuda::group_norm(xs, w, b, (self.groups, self.eps, silu), added)?;
            if let Some(y) = fused {
                return Ok(y);
            }
        }
        if let Some(a) = added {
            // no kernel adds it as it reads: the sum, then its norm
            return self.norm(&crate::elementwise::add_bias(xs.clone(), a, 1)?, silu, None);
        }
        let y = self.inner.forward(xs)?;
        if silu {
            y.silu()
        } else {
            Ok(y)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;
    use std::collections::HashMap;

    /// The added term is each sample's own, per channel, before the statistics (so it moves a
    /// group's mean and spread, not just its output): the norm of the explicit sum.
    #[test]
    fn an_added_term_is_normalised_with_the_map_it_is_added_to() -> Result<()> {
        let dev = Device::Cpu;
        let weights: HashMap<String, Tensor> = [
            ("n.weight", Tensor::randn(0f64, 1., 8, &dev)?),
            ("n.bias", Tensor::randn(0f64, 1., 8, &dev)?),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect();
        let vb = VarBuilder::from_tensors(weights, DType::F64, &dev);
        let norm = group_norm(4, 8, 1e-5, vb.pp("n"))?;
        let x = Tensor::randn(0f64, 1., (2, 8, 3, 5), &dev)?;
        // Within a group, channels get different terms; the two samples differ.
        let added = Tensor::randn(0f64, 3., (2, 8), &dev)?;
        let ours = norm.forward_silu_added(&x, &added)?;
        let sum = x.broadcast_add(&added.reshape((2, 8, 1, 1))?)?;
        let theirs = norm.forward_silu(&sum)?;
        let diff = (&ours - &theirs)?.abs()?.max_all()?.to_scalar::<f64>()?;
        assert!(diff < 1e-12, "{diff}");
        // Not the same as normalising x alone.
        let plain = norm.forward_silu(&x)?;
        let moved = (&ours - &plain)?.abs()?.max_all()?.to_scalar::<f64>()?;
        assert!(moved > 1e-3, "{moved}");
        Ok(())
    }
}
