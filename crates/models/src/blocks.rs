//! Building blocks shared by the networks, named as in `diffusers.models`:
//! `ResnetBlock2D`, `Downsample2D`, `Upsample2D` and the multi-head `Attention`.
//!
//! Textual-inversion training back-propagates through the text encoder and the UNet. When a
//! layer's input is part of a gradient graph ([`Tensor::track_op`]) and its weights are not,
//! the layer runs as one op of [`crate::tracked`]: the inference path forward, the input's
//! gradient alone backward. Where a layer is differentiated op by op (inside that backward,
//! or with tracked weights), candle's fused layer-norm and softmax kernels, which have no
//! backward pass, give way to their composed forms (same math).

use candle_core::{DType, Module, Result, Tensor, D};
use candle_nn::{layer_norm, Conv2dConfig, LayerNorm, VarBuilder};

use crate::profile;
use crate::tracked::Normalized;

/// Softmax over the last axis: the fused kernel, or the differentiable composition when
/// gradients are being tracked.
pub(crate) fn softmax_last_dim(xs: &Tensor) -> Result<Tensor> {
    if xs.track_op() {
        candle_nn::ops::softmax(xs, D::Minus1)
    } else {
        candle_nn::ops::softmax_last_dim(xs)
    }
}

/// `transformers`' `nn.LayerNorm`, differentiable when gradients are tracked.
#[derive(Debug, Clone)]
pub(crate) struct Norm {
    inner: LayerNorm,
    eps: f64,
}

impl Norm {
    pub(crate) fn new(size: usize, eps: f64, vb: VarBuilder) -> Result<Self> {
        Ok(Self {
            inner: layer_norm(size, eps, vb)?,
            eps,
        })
    }

    pub(crate) fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        if xs.track_op() && !self.tracks() {
            // The forward takes eps as f32 (candle's layer-norm API): so does its gradient.
            let (weight, eps) = (self.inner.weight().clone(), self.eps as f32 as f64);
            return crate::tracked::with_input_grad(
                xs,
                "layer norm backward",
                |xs| self.run(xs),
                move |xs, grad| {
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
            // The fused kernel has no backward pass and no f64 version.
            Some(bias) if xs.track_op() || xs.dtype() == DType::F64 => {
                candle_nn::ops::layer_norm_slow(xs, self.inner.weight(), bias, self.eps as f32)
            }
            _ => self.inner.forward(xs),
        })
    }
}

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
        let y = per_sample(xs, |x| x.conv2d(w, padding, stride, 1, 1))?;
        match bias {
            Some(bias) => add_bias(y, bias, 1),
            None => Ok(y),
        }
    })
}

/// `f` on each sample of a batch alone, on the CPU. candle folds a batch into the rows of one
/// matrix product (linear layers, the convolution's im2col), whose blocking, and so its
/// rounding, depends on the row count: a sample would come out a little different in a batch
/// than alone. Per sample, batched generation equals generating each request alone, to the
/// bit (the server batches requests of different clients).
fn per_sample(xs: &Tensor, f: impl Fn(&Tensor) -> Result<Tensor>) -> Result<Tensor> {
    let batch = xs.dim(0)?;
    if !xs.device().is_cpu() || batch < 2 {
        return f(xs);
    }
    let samples = (0..batch)
        .map(|i| f(&xs.narrow(0, i, 1)?))
        .collect::<Result<Vec<_>>>()?;
    Tensor::cat(&samples, 0)
}

/// `leaky_relu(x, slope)`: our one-pass kernel on CUDA, candle's composition elsewhere.
pub fn leaky_relu(xs: &Tensor, slope: f64) -> Result<Tensor> {
    #[cfg(feature = "cuda")]
    if let Some(y) = crate::cuda::leaky_relu(xs, slope)? {
        return Ok(y);
    }
    candle_nn::ops::leaky_relu(xs, slope)
}

/// Nearest-neighbour ×2 upsampling of NCHW `xs`: our kernel on CUDA, candle's elsewhere.
pub fn upsample_nearest_2x(xs: &Tensor) -> Result<Tensor> {
    if xs.track_op() {
        // candle differentiates its upsampling as a convolution with one group per channel,
        // which it runs as one convolution per channel: thousands of kernels per UNet step.
        // The gradient is the sum of each 2×2 block.
        return crate::tracked::with_input_grad(
            xs,
            "upsampling backward",
            upsample_nearest_2x,
            |_, grad| {
                let (n, c, h, w) = grad.dims4()?;
                grad.reshape((n, c, h / 2, 2, w / 2, 2))?.sum(5)?.sum(3)
            },
        );
    }
    #[cfg(feature = "cuda")]
    if let Some(up) = crate::cuda::upsample_nearest_2x(xs)? {
        return Ok(up);
    }
    let (_, _, h, w) = xs.dims4()?;
    xs.upsample_nearest2d(2 * h, 2 * w)
}

/// `y + bias`, `bias` broadcast over the axes after `axis` (its shape: the axes of `y` that
/// end at `axis`, e.g. `[C]` or `[B, C]` for NCHW and axis 1). Our kernel on CUDA
/// ([`crate::cuda::add_bias`]); candle's broadcast add elsewhere.
pub(crate) fn add_bias(y: Tensor, bias: &Tensor, axis: usize) -> Result<Tensor> {
    #[cfg(feature = "cuda")]
    if let Some(sum) = crate::cuda::add_bias(&y, bias, axis)? {
        return Ok(sum);
    }
    if bias.rank() == 0 || bias.rank() > axis + 1 {
        candle_core::bail!(
            "bias {:?} does not run along axis {axis} of {:?}",
            bias.dims(),
            y.dims()
        )
    }
    let mut shape = vec![1; y.rank()];
    shape[axis + 1 - bias.rank()..=axis].copy_from_slice(bias.dims());
    y.broadcast_add(&bias.reshape(shape)?)
}

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
}

pub(crate) fn linear(cin: usize, cout: usize, vb: VarBuilder) -> Result<Linear> {
    candle_nn::linear(cin, cout, vb).map(Linear::new)
}

pub(crate) fn linear_no_bias(cin: usize, cout: usize, vb: VarBuilder) -> Result<Linear> {
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
    fn run(&self, xs: &Tensor) -> Result<Tensor> {
        #[cfg(feature = "cuda")]
        if let Some(y) = crate::cuda::linear(xs, self.inner.weight(), self.inner.bias())? {
            return Ok(y);
        }
        #[cfg(feature = "cuda")]
        if let Some(bias) = self.inner.bias() {
            if xs.device().is_cuda() {
                let without_bias = candle_nn::Linear::new(self.inner.weight().clone(), None);
                let y = without_bias.forward(xs)?;
                let axis = y.rank() - 1;
                return add_bias(y, bias, axis);
            }
        }
        if xs.rank() >= 2 {
            return per_sample(xs, |x| self.inner.forward(x));
        }
        self.inner.forward(xs)
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

pub(crate) fn group_norm(
    groups: usize,
    channels: usize,
    eps: f64,
    vb: VarBuilder,
) -> Result<GroupNorm> {
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
    pub fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        self.run(xs, false)
    }

    /// `silu(group_norm(xs))`.
    pub fn forward_silu(&self, xs: &Tensor) -> Result<Tensor> {
        self.run(xs, true)
    }

    fn run(&self, xs: &Tensor, silu: bool) -> Result<Tensor> {
        if xs.track_op() && !self.weight.track_op() && !self.bias.track_op() {
            let norm = self.clone();
            return crate::tracked::with_input_grad(
                xs,
                "group norm backward",
                |xs| self.timed(xs, silu),
                move |xs, grad| norm.input_grad(xs, grad, silu),
            );
        }
        self.timed(xs, silu)
    }

    fn timed(&self, xs: &Tensor, silu: bool) -> Result<Tensor> {
        profile::timed("group norm", xs.device(), || self.norm(xs, silu))
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

    fn norm(&self, xs: &Tensor, silu: bool) -> Result<Tensor> {
        #[cfg(feature = "cuda")]
        {
            let (w, b) = (&self.weight, &self.bias);
            let fused = crate::cuda::group_norm(xs, w, b, self.groups, self.eps, silu)?;
            if let Some(y) = fused {
                return Ok(y);
            }
        }
        let y = self.inner.forward(xs)?;
        if silu {
            y.silu()
        } else {
            Ok(y)
        }
    }
}

pub(crate) fn conv3x3(cin: usize, cout: usize, stride: usize, vb: VarBuilder) -> Result<Conv2d> {
    let cfg = Conv2dConfig {
        padding: 1,
        stride,
        ..Default::default()
    };
    conv2d(cin, cout, 3, cfg, vb)
}

pub(crate) fn conv1x1(cin: usize, cout: usize, vb: VarBuilder) -> Result<Conv2d> {
    conv2d(cin, cout, 1, Conv2dConfig::default(), vb)
}

/// `diffusers.models.resnet.ResnetBlock2D` (time embedding optional: the VAE has none).
#[derive(Debug)]
pub struct ResnetBlock2D {
    norm1: GroupNorm,
    conv1: Conv2d,
    time_emb_proj: Option<Linear>,
    norm2: GroupNorm,
    conv2: Conv2d,
    conv_shortcut: Option<Conv2d>,
}

impl ResnetBlock2D {
    pub fn new(
        vb: VarBuilder,
        cin: usize,
        cout: usize,
        temb_channels: Option<usize>,
        groups: usize,
        eps: f64,
    ) -> Result<Self> {
        let conv_shortcut = if cin != cout {
            Some(conv1x1(cin, cout, vb.pp("conv_shortcut"))?)
        } else {
            None
        };
        Ok(Self {
            norm1: group_norm(groups, cin, eps, vb.pp("norm1"))?,
            conv1: conv3x3(cin, cout, 1, vb.pp("conv1"))?,
            time_emb_proj: temb_channels
                .map(|t| linear(t, cout, vb.pp("time_emb_proj")))
                .transpose()?,
            norm2: group_norm(groups, cout, eps, vb.pp("norm2"))?,
            conv2: conv3x3(cout, cout, 1, vb.pp("conv2"))?,
            conv_shortcut,
        })
    }

    pub fn forward(&self, xs: &Tensor, temb: Option<&Tensor>) -> Result<Tensor> {
        // One `h`, reassigned: each intermediate is freed as soon as the next exists (shadowed
        // `let`s would keep them all alive to the end, 256 MB each at the VAE's 1024² stage).
        let mut h = self.conv1.forward(&self.norm1.forward_silu(xs)?)?;
        if let (Some(proj), Some(t)) = (&self.time_emb_proj, temb) {
            // [B, C] per sample and channel
            h = add_bias(h, &proj.forward(&t.silu()?)?, 1)?;
        }
        h = self.norm2.forward_silu(&h)?;
        h = self.conv2.forward(&h)?;
        match &self.conv_shortcut {
            Some(c) => c.forward(xs)? + h,
            None => xs + h,
        }
    }
}

/// `Downsample2D`: a stride-2 3×3 convolution. The VAE pads asymmetrically (right/bottom)
/// with no conv padding; the UNet uses padding 1.
#[derive(Debug)]
pub struct Downsample2D {
    conv: Conv2d,
    asymmetric_pad: bool,
}

impl Downsample2D {
    pub fn new(vb: VarBuilder, channels: usize, asymmetric_pad: bool) -> Result<Self> {
        let cfg = Conv2dConfig {
            padding: if asymmetric_pad { 0 } else { 1 },
            stride: 2,
            ..Default::default()
        };
        Ok(Self {
            conv: conv2d(channels, channels, 3, cfg, vb.pp("conv"))?,
            asymmetric_pad,
        })
    }

    pub fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        if self.asymmetric_pad {
            let xs = xs.pad_with_zeros(2, 0, 1)?.pad_with_zeros(3, 0, 1)?;
            self.conv.forward(&xs)
        } else {
            self.conv.forward(xs)
        }
    }
}

/// `Upsample2D`: nearest-neighbour ×2 (or to the size of the matching skip connection, for
/// latents whose sides are not a multiple of the total downsampling), then a 3×3 convolution.
#[derive(Debug)]
pub struct Upsample2D {
    conv: Conv2d,
}

impl Upsample2D {
    pub fn new(vb: VarBuilder, channels: usize) -> Result<Self> {
        Ok(Self {
            conv: conv3x3(channels, channels, 1, vb.pp("conv"))?,
        })
    }

    pub fn forward(&self, xs: &Tensor, size: Option<(usize, usize)>) -> Result<Tensor> {
        let (_, _, h, w) = xs.dims4()?;
        let (th, tw) = size.unwrap_or((2 * h, 2 * w));
        if (th, tw) == (2 * h, 2 * w) {
            return self.conv.forward(&upsample_nearest_2x(xs)?);
        }
        self.conv.forward(&xs.upsample_nearest2d(th, tw)?)
    }
}

/// `diffusers.models.attention_processor.Attention` without a group norm: multi-head scaled
/// dot-product attention with `to_q/to_k/to_v/to_out.0`.
#[derive(Debug)]
pub struct Attention {
    to_q: Linear,
    to_k: Linear,
    to_v: Linear,
    to_out: Linear,
    heads: usize,
    /// SD 2.x computes the scores in fp32 (`upcast_attention`).
    upcast: bool,
}

impl Attention {
    pub fn new(
        vb: VarBuilder,
        query_dim: usize,
        context_dim: usize,
        heads: usize,
        head_dim: usize,
        qkv_bias: bool,
        upcast: bool,
    ) -> Result<Self> {
        let inner = heads * head_dim;
        let proj = |i: usize, name: &str| {
            if qkv_bias {
                linear(i, inner, vb.pp(name))
            } else {
                linear_no_bias(i, inner, vb.pp(name))
            }
        };
        Ok(Self {
            to_q: proj(query_dim, "to_q")?,
            to_k: proj(context_dim, "to_k")?,
            to_v: proj(context_dim, "to_v")?,
            to_out: linear(inner, query_dim, vb.pp("to_out.0"))?,
            heads,
            upcast,
        })
    }

    /// `xs` `[B, N, C]`; `context` `[B, M, Cc]` for cross-attention, `None` for self-attention.
    pub fn forward(&self, xs: &Tensor, context: Option<&Tensor>) -> Result<Tensor> {
        let context = context.unwrap_or(xs);
        let q = self.to_q.forward(xs)?;
        let k = self.to_k.forward(context)?;
        let v = self.to_v.forward(context)?;
        let out = scaled_dot_product_attention(&q, &k, &v, self.heads, self.upcast)?;
        self.to_out.forward(&out)
    }
}

/// Attention over `[B, N, H·D]` inputs, split into `heads`; returns `[B, N, H·D]`.
pub(crate) fn scaled_dot_product_attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    heads: usize,
    upcast: bool,
) -> Result<Tensor> {
    profile::timed("attention", q.device(), || {
        attention(q, k, v, heads, upcast)
    })
}

fn attention(q: &Tensor, k: &Tensor, v: &Tensor, heads: usize, upcast: bool) -> Result<Tensor> {
    if q.track_op() || k.track_op() || v.track_op() {
        return crate::tracked::tracked_attention(q, k, v, heads, |q, k, v| {
            attention(q, k, v, heads, upcast)
        });
    }
    let (b, n, inner) = q.dims3()?;
    let m = k.dim(1)?;
    let d = inner / heads;
    #[cfg(feature = "cuda")]
    if let Some(out) = crate::cuda::flash_attention(q, k, v, heads, (d as f64).powf(-0.5))? {
        return Ok(out); // scores accumulate in fp32 there: `upcast` holds already
    }
    let split = |t: &Tensor, len: usize| -> Result<Tensor> {
        t.reshape((b, len, heads, d))?.transpose(1, 2)?.contiguous()
    };
    let dtype = q.dtype();
    let (q, k, v) = (split(q, n)?, split(k, m)?, split(v, m)?);
    let (q, k) = if upcast && dtype != DType::F32 {
        (q.to_dtype(DType::F32)?, k.to_dtype(DType::F32)?)
    } else {
        (q, k)
    };
    let k_t = k.t()?;
    let rows_at_once = (MAX_SCORES / (b * heads * m)).max(1);
    let mut outs = Vec::with_capacity(n.div_ceil(rows_at_once));
    for first in (0..n).step_by(rows_at_once) {
        let q = q.narrow(2, first, rows_at_once.min(n - first))?;
        let scores = (q.matmul(&k_t)? * (d as f64).powf(-0.5))?;
        let probs = softmax_last_dim(&scores)?.to_dtype(dtype)?;
        outs.push(probs.matmul(&v)?);
    }
    let out = if outs.len() == 1 {
        outs.pop().unwrap()
    } else {
        Tensor::cat(&outs, 2)?
    };
    out.transpose(1, 2)?.reshape((b, n, inner))
}

/// Attention scores computed at once, at most: query rows go in chunks beyond it. The VAE's
/// mid block at 1024² has 16384² scores, 1 GiB in fp32 and as much again for the softmax.
const MAX_SCORES: usize = 1 << 26;

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tracked::tests::max_diff;
    use candle_core::{Device, Var};
    use std::collections::HashMap;

    fn randn(shape: &[usize]) -> Tensor {
        Tensor::randn(0f64, 1., shape, &Device::Cpu).unwrap()
    }

    /// The gradient of `sum(f(x) · r)` with respect to `x`, by candle's autograd.
    fn input_grad(x: &Tensor, r: &Tensor, f: impl Fn(&Tensor) -> Result<Tensor>) -> Tensor {
        let x = Var::from_tensor(x).unwrap();
        let y = f(x.as_tensor()).unwrap();
        let grads = (y * r).unwrap().sum_all().unwrap().backward().unwrap();
        grads.get(x.as_tensor()).expect("a gradient").clone()
    }

    /// Linear, convolution (the downsampling one included, on even and odd sides), group
    /// norm with and without SiLU, layer norm and upsampling on a tracked input run as single ops
    /// (`crate::tracked`): the same values and input gradients as candle's autograd through
    /// the composed ops.
    #[test]
    fn tracked_layers_match_autograd_of_their_composed_forms() {
        let dev = Device::Cpu;
        let weights: HashMap<String, Tensor> = [
            ("lin.weight", randn(&[6, 5])),
            ("lin.bias", randn(&[6])),
            ("conv.weight", randn(&[4, 3, 3, 3])),
            ("conv.bias", randn(&[4])),
            ("gn.weight", randn(&[4])),
            ("gn.bias", randn(&[4])),
            ("ln.weight", randn(&[5])),
            ("ln.bias", randn(&[5])),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v))
        .collect();
        let vb = VarBuilder::from_tensors(weights.clone(), DType::F64, &dev);
        let w = |k: &str| weights[k].clone();

        // linear
        let lin = linear(5, 6, vb.pp("lin")).unwrap();
        let x = randn(&[2, 7, 5]);
        let r = randn(&[2, 7, 6]);
        let ours = input_grad(&x, &r, |x| lin.forward(x));
        let theirs = input_grad(&x, &r, |x| {
            x.broadcast_matmul(&w("lin.weight").t()?)?
                .broadcast_add(&w("lin.bias"))
        });
        assert!(max_diff(&ours, &theirs) < 1e-12, "linear");

        // convolutions, stride 1 and 2
        for (stride, side) in [(1, 8), (2, 8), (2, 9)] {
            let conv: Conv2d = candle_nn::conv2d(
                3,
                4,
                3,
                Conv2dConfig {
                    padding: 1,
                    stride,
                    ..Default::default()
                },
                vb.pp("conv"),
            )
            .unwrap()
            .into();
            let x = randn(&[2, 3, side, side]);
            let out_side = (side + 2 - 3) / stride + 1;
            let r = randn(&[2, 4, out_side, out_side]);
            let ours = input_grad(&x, &r, |x| conv.forward(x));
            let theirs = input_grad(&x, &r, |x| {
                x.conv2d(&w("conv.weight"), 1, stride, 1, 1)?
                    .broadcast_add(&w("conv.bias").reshape((1, 4, 1, 1))?)
            });
            assert!(
                max_diff(&ours, &theirs) < 1e-12,
                "conv stride {stride} side {side}"
            );
        }

        // group norm (+ SiLU)
        let gn = group_norm(2, 4, 1e-5, vb.pp("gn")).unwrap();
        let reference =
            candle_nn::GroupNorm::new(w("gn.weight"), w("gn.bias"), 4, 2, 1e-5).unwrap();
        let x = randn(&[2, 4, 5, 5]);
        let r = randn(&[2, 4, 5, 5]);
        for silu in [false, true] {
            let ours = input_grad(&x, &r, |x| {
                if silu {
                    gn.forward_silu(x)
                } else {
                    gn.forward(x)
                }
            });
            let theirs = input_grad(&x, &r, |x| {
                let y = reference.forward(x)?;
                if silu {
                    y.silu()
                } else {
                    Ok(y)
                }
            });
            assert!(max_diff(&ours, &theirs) < 1e-10, "group norm, silu {silu}");
        }

        // layer norm
        let ln = Norm::new(5, 1e-5, vb.pp("ln")).unwrap();
        let x = randn(&[2, 7, 5]);
        let r = randn(&[2, 7, 5]);
        let ours = input_grad(&x, &r, |x| ln.forward(x));
        let theirs = input_grad(&x, &r, |x| {
            candle_nn::ops::layer_norm_slow(x, &w("ln.weight"), &w("ln.bias"), 1e-5)
        });
        assert!(max_diff(&ours, &theirs) < 1e-10, "layer norm");

        // nearest ×2 upsampling
        let x = randn(&[2, 3, 4, 5]);
        let r = randn(&[2, 3, 8, 10]);
        let ours = input_grad(&x, &r, upsample_nearest_2x);
        let theirs = input_grad(&x, &r, |x| x.upsample_nearest2d(8, 10));
        assert!(max_diff(&ours, &theirs) < 1e-12, "upsampling");
        assert!(
            max_diff(&ours, &ours.zeros_like().unwrap()) > 1e-3,
            "all-zero gradient"
        );
    }

    #[test]
    fn attention_over_more_scores_than_fit_at_once_matches_the_direct_product() {
        let (n, m, d) = (8200, 8200, 8); // 8200² > MAX_SCORES: two chunks of query rows
        assert!(n * m > MAX_SCORES && n / (MAX_SCORES / m) == 1);
        let dev = Device::Cpu;
        let q = Tensor::randn(0f32, 1., (1, n, d), &dev).unwrap();
        let k = Tensor::randn(0f32, 1., (1, m, d), &dev).unwrap();
        let v = Tensor::randn(0f32, 1., (1, m, d), &dev).unwrap();
        let got = scaled_dot_product_attention(&q, &k, &v, 1, false).unwrap();
        let scores = (q.matmul(&k.t().unwrap()).unwrap() * (d as f64).powf(-0.5)).unwrap();
        let want = candle_nn::ops::softmax_last_dim(&scores)
            .unwrap()
            .matmul(&v)
            .unwrap();
        assert_eq!(got.dims(), [1, n, d]);
        let diff = (got - want).unwrap().abs().unwrap().max_all().unwrap();
        assert!(diff.to_scalar::<f32>().unwrap() < 1e-5);
    }
}
