//! `nn.Conv2d` and the convolution under it: cuDNN on CUDA, candle's kernel elsewhere, and the
//! input's gradient alone when a frozen layer sits in a gradient graph.

use candle_core::{Module, Result, Tensor};
use candle_nn::{Conv2dConfig, VarBuilder};

use crate::profile;

/// `nn.Conv2d`: candle's, except on CUDA, where cuDNN runs it ([`convolve`]).
#[derive(Debug, Clone)]
pub struct Conv2d(candle_nn::Conv2d);

impl From<candle_nn::Conv2d> for Conv2d {
    fn from(conv: candle_nn::Conv2d) -> Self {
        Self(conv)
    }
}

/// A convolution with bias, its weights from `vb` (as `candle_nn::conv2d`).
pub fn conv2d(
    cin: usize,
    cout: usize,
    kernel: usize,
    cfg: Conv2dConfig,
    vb: VarBuilder,
) -> Result<Conv2d> {
    candle_nn::conv2d(cin, cout, kernel, cfg, vb).map(Conv2d)
}

/// A convolution without bias, its weights from `vb` (as `candle_nn::conv2d_no_bias`).
pub fn conv2d_no_bias(
    cin: usize,
    cout: usize,
    kernel: usize,
    cfg: Conv2dConfig,
    vb: VarBuilder,
) -> Result<Conv2d> {
    candle_nn::conv2d_no_bias(cin, cout, kernel, cfg, vb).map(Conv2d)
}

impl Module for Conv2d {
    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        let cfg = self.0.config();
        if cfg.groups != 1 || cfg.dilation != 1 {
            return profile::timed("convolution", xs.device(), || self.0.forward(xs));
        }
        convolve(xs, self.0.weight(), self.0.bias(), cfg.padding, cfg.stride)
    }
}

/// A 2-D convolution (groups 1, dilation 1) plus `bias`: cuDNN on CUDA where it is the faster
/// (and always for large feature maps: candle's im2col there takes gigabytes), candle's kernel
/// elsewhere.
pub fn convolve(
    xs: &Tensor,
    w: &Tensor,
    bias: Option<&Tensor>,
    padding: usize,
    stride: usize,
) -> Result<Tensor> {
    if xs.track_op() && !w.track_op() && !bias.is_some_and(|b| b.track_op()) {
        let (w_in, b_in) = (w.clone(), bias.cloned());
        let w = w.clone();
        return crate::tracked::with_input_grad(
            xs,
            "convolution backward",
            |xs| convolve(xs, &w_in, b_in.as_ref(), padding, stride),
            move |xs, grad| {
                #[cfg(feature = "cuda")]
                if let Some(dx) = crate::cuda::conv2d_input_grad(
                    grad,
                    &w,
                    (xs.dim(2)?, xs.dim(3)?),
                    padding,
                    stride,
                )? {
                    return Ok(dx);
                }
                // conv_transpose2d's output side is (g - 1)·stride - 2·padding + k (+ out_padding)
                let (g, k) = (grad.dim(2)?, w.dim(2)?);
                let out_padding = xs.dim(2)? + 2 * padding - (g - 1) * stride - k;
                grad.conv_transpose2d(&w, padding, out_padding, stride, 1)
            },
        );
    }
    profile::timed("convolution", xs.device(), || {
        #[cfg(feature = "cuda")]
        if let Some(y) = crate::cuda::conv2d(xs, w, bias, padding, stride)? {
            return Ok(y);
        }
        let y = crate::per_sample(xs, |x| x.conv2d(w, padding, stride, 1, 1))?;
        match bias {
            Some(bias) => crate::elementwise::add_bias(y, bias, 1),
            None => Ok(y),
        }
    })
}

/// A 3×3 convolution with bias and padding 1 (`stride` 1 or 2), weights from `vb`.
pub fn conv3x3(cin: usize, cout: usize, stride: usize, vb: VarBuilder) -> Result<Conv2d> {
    let cfg = Conv2dConfig {
        padding: 1,
        stride,
        ..Default::default()
    };
    conv2d(cin, cout, 3, cfg, vb)
}

/// A 1×1 convolution with bias, weights from `vb`.
pub fn conv1x1(cin: usize, cout: usize, vb: VarBuilder) -> Result<Conv2d> {
    conv2d(cin, cout, 1, Conv2dConfig::default(), vb)
}
