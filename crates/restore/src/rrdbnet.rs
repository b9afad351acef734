//! RRDBNet, the ESRGAN generator used by RealESRGAN_x4plus, x2plus and x4plus_anime_6B.
//!
//! Mirrors `basicsr/archs/rrdbnet_arch.py` (Wang et al., "ESRGAN", 2018; "Real-ESRGAN",
//! 2021): the struct tree is the checkpoint key tree (`conv_first`,
//! `body.{i}.rdb{1,2,3}.conv{1..5}`, `conv_body`, `conv_up1`, `conv_up2`, `conv_hr`,
//! `conv_last`). Scales 2 and 1 pixel-unshuffle the input first, as the reference does; the
//! trunk always upsamples 4×.

use candle_core::{Module, Result, Tensor};
use candle_nn::{Conv2dConfig, VarBuilder};
use sdkube_nn::Conv2d;

/// RRDBNet hyper-parameters (the reference constructor's arguments).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RrdbConfig {
    /// Image channels in (3); the x2 and x1 variants pixel-unshuffle them first.
    pub num_in_ch: usize,
    /// Output channels.
    pub num_out_ch: usize,
    /// 4, 2 or 1: the network's overall scale.
    pub scale: usize,
    /// Feature channels.
    pub num_feat: usize,
    /// RRDB blocks in the trunk.
    pub num_block: usize,
    /// Growth channels of each dense block.
    pub num_grow_ch: usize,
}

impl RrdbConfig {
    /// RealESRGAN_x4plus.pth.
    pub const X4PLUS: RrdbConfig = RrdbConfig {
        num_in_ch: 3,
        num_out_ch: 3,
        scale: 4,
        num_feat: 64,
        num_block: 23,
        num_grow_ch: 32,
    };
    /// RealESRGAN_x2plus.pth.
    pub const X2PLUS: RrdbConfig = RrdbConfig {
        scale: 2,
        ..Self::X4PLUS
    };
    /// RealESRGAN_x4plus_anime_6B.pth.
    pub const X4PLUS_ANIME_6B: RrdbConfig = RrdbConfig {
        num_block: 6,
        ..Self::X4PLUS
    };

    /// Input channels after pixel-unshuffle (what `conv_first` sees).
    pub fn first_conv_in(&self) -> usize {
        self.num_in_ch * self.unshuffle() * self.unshuffle()
    }

    fn unshuffle(&self) -> usize {
        match self.scale {
            2 => 2,
            1 => 4,
            _ => 1,
        }
    }

    /// Every convolution, in forward order, as (key, in, out): the list an importer fills.
    pub fn convs(&self) -> Vec<(String, usize, usize)> {
        let (f, g) = (self.num_feat, self.num_grow_ch);
        let mut out = vec![("conv_first".to_string(), self.first_conv_in(), f)];
        for b in 0..self.num_block {
            for r in 1..=3 {
                for c in 1..=5 {
                    let cin = f + (c - 1) * g;
                    let cout = if c == 5 { f } else { g };
                    out.push((format!("body.{b}.rdb{r}.conv{c}"), cin, cout));
                }
            }
        }
        for name in ["conv_body", "conv_up1", "conv_up2", "conv_hr"] {
            out.push((name.to_string(), f, f));
        }
        out.push(("conv_last".to_string(), f, self.num_out_ch));
        out
    }
}

fn conv3(cin: usize, cout: usize, vb: VarBuilder) -> Result<Conv2d> {
    sdkube_nn::conv3x3(cin, cout, 1, vb)
}

/// [`conv3`] with its output scaled by `scale`, folded into the weights and bias (one pass
/// over the feature map fewer than scaling the output).
fn conv3_scaled(cin: usize, cout: usize, scale: f64, vb: VarBuilder) -> Result<Conv2d> {
    let weight = (vb.get((cout, cin, 3, 3), "weight")? * scale)?;
    let bias = (vb.get(cout, "bias")? * scale)?;
    let cfg = Conv2dConfig {
        padding: 1,
        ..Default::default()
    };
    Ok(candle_nn::Conv2d::new(weight, Some(bias), cfg).into())
}

fn lrelu(x: &Tensor) -> Result<Tensor> {
    sdkube_nn::leaky_relu(x, 0.2)
}

/// The reference's residual scale of a dense block and of an RRDB.
const RESIDUAL_SCALE: f64 = 0.2;

struct ResidualDenseBlock {
    convs: [Conv2d; 5],
}

impl ResidualDenseBlock {
    fn new(f: usize, g: usize, vb: VarBuilder) -> Result<Self> {
        Ok(Self {
            convs: [
                conv3(f, g, vb.pp("conv1"))?,
                conv3(f + g, g, vb.pp("conv2"))?,
                conv3(f + 2 * g, g, vb.pp("conv3"))?,
                conv3(f + 3 * g, g, vb.pp("conv4"))?,
                conv3_scaled(f + 4 * g, f, RESIDUAL_SCALE, vb.pp("conv5"))?,
            ],
        })
    }

    /// `x` through the block. `dense` is scratch space of shape `[N, f + 4g, H, W]` that holds
    /// the block's features side by side (`x`, then each convolution's output), each written
    /// once: concatenating them anew before each convolution copied about three times the
    /// bytes (at 512², 64 channels of fp32 are 64 MB).
    fn forward(&self, x: &Tensor, dense: &Tensor) -> Result<Tensor> {
        dense.slice_set(x, 1, 0)?;
        let mut filled = x.dim(1)?;
        for conv in &self.convs[..4] {
            let y = lrelu(&conv.forward(&dense.narrow(1, 0, filled)?)?)?;
            dense.slice_set(&y, 1, filled)?;
            filled += y.dim(1)?;
        }
        self.convs[4].forward(dense)? + x
    }
}

struct Rrdb {
    rdbs: [ResidualDenseBlock; 3],
}

impl Rrdb {
    fn forward(&self, x: &Tensor, dense: &Tensor) -> Result<Tensor> {
        let mut out = x.clone();
        for rdb in &self.rdbs {
            out = rdb.forward(&out, dense)?;
        }
        (out * RESIDUAL_SCALE)? + x
    }
}

/// The network, weights loaded.
pub struct RrdbNet {
    cfg: RrdbConfig,
    conv_first: Conv2d,
    body: Vec<Rrdb>,
    conv_body: Conv2d,
    conv_up1: Conv2d,
    conv_up2: Conv2d,
    conv_hr: Conv2d,
    conv_last: Conv2d,
}

impl RrdbNet {
    /// The network, its weights from `vb` under the reference's key names.
    pub fn new(cfg: RrdbConfig, vb: VarBuilder) -> Result<Self> {
        let (f, g) = (cfg.num_feat, cfg.num_grow_ch);
        let body = (0..cfg.num_block)
            .map(|i| {
                let vb = vb.pp(format!("body.{i}"));
                Ok(Rrdb {
                    rdbs: [
                        ResidualDenseBlock::new(f, g, vb.pp("rdb1"))?,
                        ResidualDenseBlock::new(f, g, vb.pp("rdb2"))?,
                        ResidualDenseBlock::new(f, g, vb.pp("rdb3"))?,
                    ],
                })
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Self {
            cfg,
            conv_first: conv3(cfg.first_conv_in(), f, vb.pp("conv_first"))?,
            body,
            conv_body: conv3(f, f, vb.pp("conv_body"))?,
            conv_up1: conv3(f, f, vb.pp("conv_up1"))?,
            conv_up2: conv3(f, f, vb.pp("conv_up2"))?,
            conv_hr: conv3(f, f, vb.pp("conv_hr"))?,
            conv_last: conv3(f, cfg.num_out_ch, vb.pp("conv_last"))?,
        })
    }

    /// Its hyper-parameters.
    pub fn config(&self) -> &RrdbConfig {
        &self.cfg
    }

    /// `(B, C, H, W)` → `(B, C, H·scale, W·scale)`; H and W must divide by the unshuffle factor.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let _span = tracing::trace_span!("rrdbnet").entered();
        let feat = match self.cfg.unshuffle() {
            1 => x.clone(),
            s => pixel_unshuffle(x, s)?,
        };
        let feat = self.conv_first.forward(&feat)?;
        let (n, f, h, w) = feat.dims4()?;
        let dense = Tensor::zeros(
            (n, f + 4 * self.cfg.num_grow_ch, h, w),
            feat.dtype(),
            feat.device(),
        )?;
        let mut trunk = feat.clone();
        for block in &self.body {
            trunk = block.forward(&trunk, &dense)?;
        }
        let feat = (feat + self.conv_body.forward(&trunk)?)?;
        let up = |f: &Tensor, conv: &Conv2d| -> Result<Tensor> {
            lrelu(&conv.forward(&sdkube_nn::upsample_nearest_2x(f)?)?)
        };
        let feat = up(&feat, &self.conv_up1)?;
        let feat = up(&feat, &self.conv_up2)?;
        self.conv_last
            .forward(&lrelu(&self.conv_hr.forward(&feat)?)?)
    }
}

/// Inverse of pixel shuffle: `(B, C, H·s, W·s)` → `(B, C·s², H, W)`, channel-major as basicsr.
pub fn pixel_unshuffle(x: &Tensor, s: usize) -> Result<Tensor> {
    let (b, c, hh, ww) = x.dims4()?;
    let (h, w) = (hh / s, ww / s);
    x.reshape(vec![b, c, h, s, w, s])?
        .permute(vec![0, 1, 3, 5, 2, 4])?
        .reshape((b, c * s * s, h, w))
}
