//! `nn.Linear`: cuBLASLt on CUDA, candle's elsewhere, one sample at a time on the CPU.

use candle_core::{Module, Result, Tensor};
use candle_nn::VarBuilder;

use crate::profile;

/// `nn.Linear`: on CUDA through cuBLASLt with the bias fused ([`crate::cuda::linear`], fp16 and
/// bf16) or with the bias added by our kernel; candle's elsewhere.
#[derive(Debug, Clone)]
pub struct Linear {
    inner: candle_nn::Linear,
}

impl Linear {
    fn new(inner: candle_nn::Linear) -> Self {
        Self { inner }
    }

    /// The layer `weight` `[out, in]` (and `bias` `[out]`) make.
    pub fn from_weight(weight: Tensor, bias: Option<Tensor>) -> Self {
        Self::new(candle_nn::Linear::new(weight, bias))
    }

    /// Its weight, `[out, in]`.
    pub fn weight(&self) -> &Tensor {
        self.inner.weight()
    }

    /// Its bias, `[out]`, if it has one.
    pub fn bias(&self) -> Option<&Tensor> {
        self.inner.bias()
    }
}

/// A linear layer with bias, `cin` → `cout` features, weights from `vb`.
pub fn linear(cin: usize, cout: usize, vb: VarBuilder) -> Result<Linear> {
    candle_nn::linear(cin, cout, vb).map(Linear::new)
}

/// A linear layer without bias, `cin` → `cout` features, weights from `vb`.
pub fn linear_no_bias(cin: usize, cout: usize, vb: VarBuilder) -> Result<Linear> {
    candle_nn::linear_no_bias(cin, cout, vb).map(Linear::new)
}

impl Module for Linear {
    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        let (w, bias) = (self.inner.weight(), self.inner.bias());
        if xs.track_op() && !w.track_op() && !bias.is_some_and(|b| b.track_op()) {
            let w = w.clone();
            return crate::tracked::with_input_grad(
                xs,
                "linear backward",
                |xs| self.forward(xs),
                move |_, grad| {
                    // [.., out] · [out, in], as one 2-D product
                    let mut dims = grad.dims().to_vec();
                    let out = dims.pop().unwrap_or(1);
                    let dx = grad.contiguous()?.reshape(((), out))?.matmul(&w)?;
                    dims.push(w.dim(1)?);
                    dx.reshape(dims)
                },
            );
        }
        profile::timed("linear", xs.device(), || self.run(xs))
    }
}

impl Linear {
    /// `forward(xs) + residual` (a transformer's residual connection); on the GPU one matrix
    /// product that reads the residual in its epilogue, no separate add.
    pub fn forward_add(&self, xs: &Tensor, residual: &Tensor) -> Result<Tensor> {
        #[cfg(feature = "cuda")]
        if !xs.track_op() {
            let (w, bias) = (self.inner.weight(), self.inner.bias());
            let fused = profile::timed("linear", xs.device(), || {
                crate::cuda::linear(xs, w, bias, Some(residual))
            })?;
            if let Some(y) = fused {
                return Ok(y);
            }
        }
        self.forward(xs)? + residual
    }

    fn run(&self, xs: &Tensor) -> Result<Tensor> {
        #[cfg(feature = "cuda")]
        if let Some(y) = crate::cuda::linear(xs, self.inner.weight(), self.inner.bias(), None)? {
            return Ok(y);
        }
        #[cfg(feature = "cuda")]
        if let Some(bias) = self.inner.bias() {
            if xs.device().is_cuda() {
                let without_bias = candle_nn::Linear::new(self.inner.weight().clone(), None);
                let y = without_bias.forward(xs)?;
                let axis = y.rank() - 1;
                return crate::elementwise::add_bias(y, bias, axis);
            }
        }
        if xs.rank() >= 2 {
            return crate::per_sample(xs, |x| self.inner.forward(x));
        }
        self.inner.forward(xs)
    }
}
