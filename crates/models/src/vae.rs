//! `diffusers.AutoencoderKL`: the latent ↔ image autoencoder (Rombach et al. 2022).
//!
//! The pipeline decides precision; this module only runs the network. Tiled encode/decode and
//! the NaN fallback live in the pipeline crate, which calls [`AutoencoderKL::decode`] per tile.

use candle_core::{Module, Result, Tensor};
use candle_nn::VarBuilder;

use sdkube_nn::{
    conv1x1, conv3x3, group_norm, linear, scaled_dot_product_attention, Conv2d, GroupNorm, Linear,
};

use crate::blocks::{Downsample2D, ResnetBlock2D, Upsample2D};
use crate::config::VaeConfig;

const EPS: f64 = 1e-6;

/// Single-head self-attention over pixels with its own group norm (the VAE mid block).
#[derive(Debug)]
struct AttentionBlock {
    group_norm: GroupNorm,
    to_q: Linear,
    to_k: Linear,
    to_v: Linear,
    to_out: Linear,
}

impl AttentionBlock {
    fn new(vb: VarBuilder, c: usize, groups: usize) -> Result<Self> {
        Ok(Self {
            group_norm: group_norm(groups, c, EPS, vb.pp("group_norm"))?,
            to_q: linear(c, c, vb.pp("to_q"))?,
            to_k: linear(c, c, vb.pp("to_k"))?,
            to_v: linear(c, c, vb.pp("to_v"))?,
            to_out: linear(c, c, vb.pp("to_out.0"))?,
        })
    }

    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        let (b, c, h, w) = xs.dims4()?;
        let tokens = self
            .group_norm
            .forward(xs)?
            .reshape((b, c, h * w))?
            .transpose(1, 2)?;
        let q = self.to_q.forward(&tokens)?;
        let k = self.to_k.forward(&tokens)?;
        let v = self.to_v.forward(&tokens)?;
        let out = self
            .to_out
            .forward(&scaled_dot_product_attention(&q, &k, &v, 1, false)?)?;
        sdkube_nn::add(&out.transpose(1, 2)?.reshape((b, c, h, w))?, xs)
    }
}

#[derive(Debug)]
struct MidBlock {
    resnet_0: ResnetBlock2D,
    attention: AttentionBlock,
    resnet_1: ResnetBlock2D,
}

impl MidBlock {
    fn new(vb: VarBuilder, c: usize, groups: usize) -> Result<Self> {
        Ok(Self {
            resnet_0: ResnetBlock2D::new(vb.pp("resnets.0"), c, c, None, groups, EPS)?,
            attention: AttentionBlock::new(vb.pp("attentions.0"), c, groups)?,
            resnet_1: ResnetBlock2D::new(vb.pp("resnets.1"), c, c, None, groups, EPS)?,
        })
    }

    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        let xs = self.resnet_0.forward(xs, None)?;
        let xs = self.attention.forward(&xs)?;
        self.resnet_1.forward(&xs, None)
    }
}

#[derive(Debug)]
struct Encoder {
    conv_in: Conv2d,
    down_blocks: Vec<(Vec<ResnetBlock2D>, Option<Downsample2D>)>,
    mid_block: MidBlock,
    conv_norm_out: GroupNorm,
    conv_out: Conv2d,
}

impl Encoder {
    fn new(vb: VarBuilder, cfg: &VaeConfig) -> Result<Self> {
        let boc = &cfg.block_out_channels;
        let g = cfg.norm_num_groups;
        let mut down_blocks = Vec::new();
        let mut out_ch = boc[0];
        for i in 0..boc.len() {
            let in_ch = out_ch;
            out_ch = boc[i];
            let bvb = vb.pp(format!("down_blocks.{i}"));
            let resnets = (0..cfg.layers_per_block)
                .map(|j| {
                    let cin = if j == 0 { in_ch } else { out_ch };
                    ResnetBlock2D::new(bvb.pp(format!("resnets.{j}")), cin, out_ch, None, g, EPS)
                })
                .collect::<Result<_>>()?;
            let down = if i + 1 < boc.len() {
                Some(Downsample2D::new(bvb.pp("downsamplers.0"), out_ch, true)?)
            } else {
                None
            };
            down_blocks.push((resnets, down));
        }
        let top = *boc.last().expect("non-empty block_out_channels");
        Ok(Self {
            conv_in: conv3x3(cfg.in_channels, boc[0], 1, vb.pp("conv_in"))?,
            down_blocks,
            mid_block: MidBlock::new(vb.pp("mid_block"), top, g)?,
            conv_norm_out: group_norm(g, top, EPS, vb.pp("conv_norm_out"))?,
            conv_out: conv3x3(top, 2 * cfg.latent_channels, 1, vb.pp("conv_out"))?,
        })
    }

    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        let mut h = self.conv_in.forward(xs)?;
        for (resnets, down) in &self.down_blocks {
            for r in resnets {
                h = r.forward(&h, None)?;
            }
            if let Some(d) = down {
                h = d.forward(&h)?;
            }
        }
        let h = self.mid_block.forward(&h)?;
        self.conv_out.forward(&self.conv_norm_out.forward_silu(&h)?)
    }
}

#[derive(Debug)]
struct Decoder {
    conv_in: Conv2d,
    mid_block: MidBlock,
    up_blocks: Vec<(Vec<ResnetBlock2D>, Option<Upsample2D>)>,
    conv_norm_out: GroupNorm,
    conv_out: Conv2d,
}

impl Decoder {
    fn new(vb: VarBuilder, cfg: &VaeConfig) -> Result<Self> {
        let rev: Vec<usize> = cfg.block_out_channels.iter().rev().copied().collect();
        let g = cfg.norm_num_groups;
        let mut up_blocks = Vec::new();
        let mut out_ch = rev[0];
        for (i, &ch) in rev.iter().enumerate() {
            let prev = out_ch;
            out_ch = ch;
            let bvb = vb.pp(format!("up_blocks.{i}"));
            let resnets = (0..cfg.layers_per_block + 1)
                .map(|j| {
                    let cin = if j == 0 { prev } else { out_ch };
                    ResnetBlock2D::new(bvb.pp(format!("resnets.{j}")), cin, out_ch, None, g, EPS)
                })
                .collect::<Result<_>>()?;
            let up = if i + 1 < rev.len() {
                Some(Upsample2D::new(bvb.pp("upsamplers.0"), out_ch)?)
            } else {
                None
            };
            up_blocks.push((resnets, up));
        }
        let bottom = *rev.last().expect("non-empty block_out_channels");
        Ok(Self {
            conv_in: conv3x3(cfg.latent_channels, rev[0], 1, vb.pp("conv_in"))?,
            mid_block: MidBlock::new(vb.pp("mid_block"), rev[0], g)?,
            up_blocks,
            conv_norm_out: group_norm(g, bottom, EPS, vb.pp("conv_norm_out"))?,
            conv_out: conv3x3(bottom, cfg.out_channels, 1, vb.pp("conv_out"))?,
        })
    }

    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        let h = self.conv_in.forward(xs)?;
        let mut h = self.mid_block.forward(&h)?;
        for (resnets, up) in &self.up_blocks {
            for r in resnets {
                h = r.forward(&h, None)?;
            }
            if let Some(u) = up {
                h = u.forward(&h, None)?;
            }
        }
        self.conv_out.forward(&self.conv_norm_out.forward_silu(&h)?)
    }
}

/// The Gaussian the encoder predicts for a latent.
#[derive(Debug)]
pub struct LatentDistribution {
    /// Mean of the latent's distribution (what encoding for img2img takes).
    pub mean: Tensor,
    /// Log variance.
    pub logvar: Tensor,
}

impl LatentDistribution {
    /// A sample `mean + std·noise` for a given standard normal `noise`.
    pub fn sample(&self, noise: &Tensor) -> Result<Tensor> {
        let std = (self.logvar.clone() * 0.5)?.exp()?;
        self.mean.clone() + std.mul(noise)?
    }
}

/// `diffusers.AutoencoderKL`: images ↔ latents.
#[derive(Debug)]
pub struct AutoencoderKL {
    encoder: Encoder,
    decoder: Decoder,
    quant_conv: Conv2d,
    post_quant_conv: Conv2d,
    cfg: VaeConfig,
}

impl AutoencoderKL {
    /// The VAE, its weights from `vb` under diffusers' key names.
    pub fn new(vb: VarBuilder, cfg: &VaeConfig) -> Result<Self> {
        let l = cfg.latent_channels;
        Ok(Self {
            encoder: Encoder::new(vb.pp("encoder"), cfg)?,
            decoder: Decoder::new(vb.pp("decoder"), cfg)?,
            quant_conv: conv1x1(2 * l, 2 * l, vb.pp("quant_conv"))?,
            post_quant_conv: conv1x1(l, l, vb.pp("post_quant_conv"))?,
            cfg: cfg.clone(),
        })
    }

    /// Its configuration.
    pub fn config(&self) -> &VaeConfig {
        &self.cfg
    }

    /// Image `[B, 3, H, W]` in [-1, 1] → latent distribution (unscaled).
    pub fn encode(&self, image: &Tensor) -> Result<LatentDistribution> {
        let moments = self.quant_conv.forward(&self.encoder.forward(image)?)?;
        let l = self.cfg.latent_channels;
        let mean = moments.narrow(1, 0, l)?;
        let logvar = moments.narrow(1, l, l)?.clamp(-30f32, 20f32)?;
        Ok(LatentDistribution { mean, logvar })
    }

    /// Unscaled latent `[B, C, h, w]` → image `[B, 3, 8h, 8w]`, roughly in [-1, 1].
    pub fn decode(&self, latent: &Tensor) -> Result<Tensor> {
        self.decoder.forward(&self.post_quant_conv.forward(latent)?)
    }

    /// Spatial factor between image and latent.
    pub fn downscale_factor(&self) -> usize {
        1 << (self.cfg.block_out_channels.len() - 1)
    }
}
