//! SRVGGNetCompact, the small RealESRGAN network of realesr-general-x4v3 and
//! realesr-animevideov3.
//!
//! Mirrors `realesrgan/archs/srvgg_arch.py`: `body` is a flat list alternating convolutions
//! (`body.{2i}`) and activations (`body.{2i+1}`, PReLU weights when `act_type='prelu'`), then a
//! pixel shuffle; the nearest-upsampled input is added so the network learns the residual.

use candle_core::{Module, Result, Tensor};
use candle_nn::{Conv2dConfig, PReLU, VarBuilder};
use sdkube_nn::{conv2d, Conv2d};

/// The reference's `act_type`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Activation {
    /// ReLU.
    Relu,
    /// PReLU, one slope per channel.
    Prelu,
    /// Slope 0.1, as the reference.
    LeakyRelu,
}

/// SRVGGNetCompact hyper-parameters.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SrvggConfig {
    /// Input channels.
    pub num_in_ch: usize,
    /// Output channels.
    pub num_out_ch: usize,
    /// Feature channels.
    pub num_feat: usize,
    /// Convolutions in the body.
    pub num_conv: usize,
    /// Scale factor (the final pixel shuffle's).
    pub upscale: usize,
    /// Activation after each convolution.
    pub act: Activation,
}

impl SrvggConfig {
    /// realesr-general-x4v3.pth.
    pub const GENERAL_X4V3: SrvggConfig = SrvggConfig {
        num_in_ch: 3,
        num_out_ch: 3,
        num_feat: 64,
        num_conv: 32,
        upscale: 4,
        act: Activation::Prelu,
    };
    /// realesr-animevideov3.pth.
    pub const ANIMEVIDEO_V3: SrvggConfig = SrvggConfig {
        num_conv: 16,
        ..Self::GENERAL_X4V3
    };

    /// Every convolution in forward order as (key, in, out), then the PReLU keys with their
    /// sizes: what an importer fills.
    pub fn convs(&self) -> Vec<(String, usize, usize)> {
        let mut out = vec![("body.0".to_string(), self.num_in_ch, self.num_feat)];
        for i in 1..=self.num_conv {
            out.push((format!("body.{}", 2 * i), self.num_feat, self.num_feat));
        }
        let last = 2 * (self.num_conv + 1);
        out.push((
            format!("body.{last}"),
            self.num_feat,
            self.num_out_ch * self.upscale * self.upscale,
        ));
        out
    }

    /// PReLU parameter keys, in forward order (empty for other activations).
    pub fn prelus(&self) -> Vec<(String, usize)> {
        if self.act != Activation::Prelu {
            return Vec::new();
        }
        (0..=self.num_conv)
            .map(|i| (format!("body.{}", 2 * i + 1), self.num_feat))
            .collect()
    }
}

enum Act {
    Relu,
    Prelu(PReLU),
    Leaky,
}

/// The network, weights loaded.
pub struct SrvggNet {
    cfg: SrvggConfig,
    convs: Vec<Conv2d>,
    acts: Vec<Act>,
}

impl SrvggNet {
    /// The network, its weights from `vb` under the reference's key names.
    pub fn new(cfg: SrvggConfig, vb: VarBuilder) -> Result<Self> {
        let conv_cfg = Conv2dConfig {
            padding: 1,
            ..Default::default()
        };
        let body = vb.pp("body");
        let mut convs = Vec::new();
        let mut acts = Vec::new();
        for (i, (_, cin, cout)) in cfg.convs().into_iter().enumerate() {
            convs.push(conv2d(cin, cout, 3, conv_cfg, body.pp(2 * i))?);
            if i <= cfg.num_conv {
                acts.push(match cfg.act {
                    Activation::Relu => Act::Relu,
                    Activation::LeakyRelu => Act::Leaky,
                    Activation::Prelu => {
                        Act::Prelu(candle_nn::prelu(Some(cfg.num_feat), body.pp(2 * i + 1))?)
                    }
                });
            }
        }
        Ok(Self { cfg, convs, acts })
    }

    /// Its hyper-parameters.
    pub fn config(&self) -> &SrvggConfig {
        &self.cfg
    }

    /// `(B, C, H, W)` → `(B, C, H·upscale, W·upscale)`.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let _span = tracing::trace_span!("srvgg").entered();
        let mut out = x.clone();
        for (i, conv) in self.convs.iter().enumerate() {
            out = conv.forward(&out)?;
            out = match self.acts.get(i) {
                Some(Act::Relu) => out.relu()?,
                Some(Act::Leaky) => sdkube_nn::leaky_relu(&out, 0.1)?,
                Some(Act::Prelu(p)) => p.forward(&out)?,
                None => out,
            };
        }
        let s = self.cfg.upscale;
        let out = candle_nn::ops::pixel_shuffle(&out, s)?;
        let (_, _, h, w) = x.dims4()?;
        out + x.upsample_nearest2d(h * s, w * s)?
    }
}
