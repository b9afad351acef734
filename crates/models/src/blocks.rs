//! Building blocks shared by the networks, named as in `diffusers.models`:
//! `ResnetBlock2D`, `Downsample2D`, `Upsample2D` and the multi-head `Attention`. Their layers
//! and ops (convolution, linear, norms, attention, upsampling) are `sdkube-nn`'s.

use candle_core::{Module, Result, Tensor};
use candle_nn::{Conv2dConfig, VarBuilder};
use sdkube_nn::{
    conv1x1, conv2d, conv3x3, group_norm, linear, linear_no_bias, scaled_dot_product_attention,
    upsample_nearest_2x, Conv2d, GroupNorm, Linear,
};

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
    /// The block `cin` → `cout` channels, with a time embedding of `temb_channels` when given;
    /// group norms of `groups` groups and `eps`.
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

    /// `xs` `[B, C, H, W]`, plus the time embedding `temb` `[B, T]` where the block has one.
    pub fn forward(&self, xs: &Tensor, temb: Option<&Tensor>) -> Result<Tensor> {
        // One `h`, reassigned: each intermediate is freed as soon as the next exists (shadowed
        // `let`s would keep them all alive to the end, 256 MB each at the VAE's 1024² stage).
        let mut h = self.conv1.forward(&self.norm1.forward_silu(xs)?)?;
        h = match (&self.time_emb_proj, temb) {
            // [B, C] per sample and channel, added as norm2 reads h
            (Some(proj), Some(t)) => self
                .norm2
                .forward_silu_added(&h, &proj.forward(&t.silu()?)?)?,
            _ => self.norm2.forward_silu(&h)?,
        };
        match &self.conv_shortcut {
            Some(c) => self.conv2.forward_add(&h, &c.forward(xs)?),
            None => self.conv2.forward_add(&h, xs),
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
    /// A downsampler of `channels`; `asymmetric_pad` for the VAE's.
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

    /// `xs` at half its height and width.
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
    /// An upsampler of `channels`.
    pub fn new(vb: VarBuilder, channels: usize) -> Result<Self> {
        Ok(Self {
            conv: conv3x3(channels, channels, 1, vb.pp("conv"))?,
        })
    }

    /// `xs` at twice its size, or at `size` (height, width) when given.
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
    /// Attention of `query_dim` queries over `context_dim` keys and values, `heads` heads of
    /// `head_dim`; `qkv_bias` when the projections have a bias, `upcast` for fp32 scores.
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
        self.to_out.forward(&self.heads_out(xs, context)?)
    }

    /// `forward(xs, context) + residual`, the add in the output projection's epilogue on GPUs.
    pub fn forward_add(
        &self,
        xs: &Tensor,
        context: Option<&Tensor>,
        residual: &Tensor,
    ) -> Result<Tensor> {
        self.to_out
            .forward_add(&self.heads_out(xs, context)?, residual)
    }

    /// The attention's output before its projection.
    fn heads_out(&self, xs: &Tensor, context: Option<&Tensor>) -> Result<Tensor> {
        let context = context.unwrap_or(xs);
        let q = self.to_q.forward(xs)?;
        let k = self.to_k.forward(context)?;
        let v = self.to_v.forward(context)?;
        scaled_dot_product_attention(&q, &k, &v, self.heads, self.upcast)
    }
}
