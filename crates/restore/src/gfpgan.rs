//! GFPGAN v1.3 / v1.4 face restoration network (`GFPGANv1Clean`), 512×512 aligned faces.
//!
//! Reference: Wang et al., "Towards Real-World Blind Face Restoration with Generative Facial
//! Prior" (CVPR 2021); PyTorch code `gfpgan/archs/gfpganv1_clean_arch.py` and
//! `stylegan2_clean_arch.py` (TencentARC/GFPGAN). The official v1.3/v1.4 checkpoints use
//! `channel_multiplier=2, narrow=1, input_is_latent=True, different_w=True, sft_half=True`;
//! this module implements exactly that variant, with `narrow` and the style width kept
//! configurable so the tests can run a tiny random-weight instance against the reference.
//!
//! The struct tree mirrors the checkpoint's `params_ema` key tree (`conv_body_down.0.conv1`,
//! `stylegan_decoder.style_convs.3.modulated_conv.modulation`, …), so the official file loads
//! directly. Unused training-only keys (`toRGB.*`, `stylegan_decoder.style_mlp.*`) are ignored.
//!
//! Modulated convolutions modulate the weights per sample, as the reference does, and run one
//! convolution per sample instead of its grouped convolution.

use std::collections::HashMap;

use candle_core::{DType, Device, Module, Tensor};
use candle_nn::{Conv2dConfig, Linear, VarBuilder};
use rand::{rngs::StdRng, SeedableRng};
use rand_distr::{Distribution, StandardNormal};
use sdkube_nn::{convolve, Conv2d};

use crate::error::FaceError;
use crate::keys::strip_prefix;

/// Shape of a GFPGANv1Clean network.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct GfpganConfig {
    /// Side of the (square) face the network takes and returns; a power of two, ≥ 8.
    pub out_size: usize,
    /// Width of the StyleGAN2 style vectors (512 in the official models).
    pub num_style_feat: usize,
    /// StyleGAN2 channel multiplier for the 64–1024 resolutions (2 in the official models).
    pub channel_multiplier: usize,
    /// Channel scale of the whole network (1 in the official models; the U-Net uses half).
    pub narrow: f64,
}

impl GfpganConfig {
    /// GFPGANv1.3 / GFPGANv1.4 (`GFPGANer(arch='clean', channel_multiplier=2)`).
    pub const V1_4: Self = Self {
        out_size: 512,
        num_style_feat: 512,
        channel_multiplier: 2,
        narrow: 1.0,
    };

    /// Reads the configuration off a checkpoint's shapes (keys without `params_ema.`).
    pub fn infer(tensors: &HashMap<String, Tensor>) -> Result<Self, FaceError> {
        let dim = |key: &str, i: usize| -> Result<usize, FaceError> {
            let t = tensors.get(key).ok_or_else(|| {
                FaceError::Weights(format!(
                    "not a GFPGANv1Clean checkpoint: `{key}` is missing"
                ))
            })?;
            Ok(t.dims().get(i).copied().unwrap_or(0))
        };
        let downs = tensors
            .keys()
            .filter(|k| k.starts_with("conv_body_down.") && k.ends_with(".conv1.weight"))
            .count();
        let log_size = downs + 2;
        let narrow = dim("final_conv.weight", 0)? as f64 * 2.0 / 512.0;
        let num_style_feat = dim(
            "stylegan_decoder.style_conv1.modulated_conv.modulation.weight",
            1,
        )?;
        // The 64-px level (to_rgbs index 3) is the first whose width depends on the multiplier.
        let channel_multiplier = if log_size >= 6 {
            let c64 = dim("stylegan_decoder.to_rgbs.3.modulated_conv.weight", 2)? as f64;
            (c64 / (256.0 * narrow)).round().max(1.0) as usize
        } else {
            2
        };
        let cfg = Self {
            out_size: 1 << log_size,
            num_style_feat,
            channel_multiplier,
            narrow,
        };
        cfg.validate()?;
        Ok(cfg)
    }

    fn log_size(&self) -> usize {
        self.out_size.trailing_zeros() as usize
    }

    /// Number of per-layer style vectors (`different_w`): `2·log2(out_size) − 2`.
    pub fn num_latent(&self) -> usize {
        self.log_size() * 2 - 2
    }

    /// StyleGAN2's channel table at `resolution`, scaled by `narrow` (truncated like `int()`).
    fn channels(&self, resolution: usize, narrow: f64) -> usize {
        let m = self.channel_multiplier as f64;
        let base = match resolution {
            0..=32 => 512.0,
            64 => 256.0 * m,
            128 => 128.0 * m,
            256 => 64.0 * m,
            512 => 32.0 * m,
            _ => 16.0 * m,
        };
        (base * narrow) as usize
    }

    fn unet_channels(&self, resolution: usize) -> usize {
        self.channels(resolution, self.narrow * 0.5)
    }

    fn decoder_channels(&self, resolution: usize) -> usize {
        self.channels(resolution, self.narrow)
    }

    fn validate(&self) -> Result<(), FaceError> {
        let ok = self.out_size.is_power_of_two()
            && (8..=1024).contains(&self.out_size)
            && self.num_style_feat > 0
            && self.channel_multiplier > 0
            && self.narrow > 0.0
            && self.unet_channels(4) > 0
            && self.decoder_channels(self.out_size) >= 2
            // SFT on half of the channels needs the U-Net width to be half the decoder's.
            && (3..=self.log_size()).all(|i| {
                2 * self.unet_channels(1 << i) == self.decoder_channels(1 << i)
            });
        if ok {
            Ok(())
        } else {
            Err(FaceError::Config(format!(
                "GFPGAN config {self:?}: out_size must be a power of two in 8..=1024 and the \
                 channel scale must keep every layer at least 2 channels wide and even"
            )))
        }
    }
}

/// Where the StyleGAN2 decoder's per-layer noise comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Noise {
    /// The fixed noise maps stored in the checkpoint (`stylegan_decoder.noises.noise{i}`):
    /// deterministic, the reference's `randomize_noise=False`.
    #[default]
    Stored,
    /// Fresh standard-normal maps from this seed, like the reference's default
    /// `randomize_noise=True` (GFPGANer), but reproducible.
    Seeded(u64),
}

fn leaky(xs: &Tensor) -> candle_core::Result<Tensor> {
    sdkube_nn::leaky_relu(xs, 0.2)
}

fn up2(xs: &Tensor) -> candle_core::Result<Tensor> {
    sdkube_nn::upsample_bilinear_2x(xs)
}

/// Bilinear ×0.5 with `align_corners=False` samples exactly between pixel pairs: a 2×2 mean.
fn down2(xs: &Tensor) -> candle_core::Result<Tensor> {
    xs.avg_pool2d(2)
}

fn conv(
    vb: VarBuilder,
    cin: usize,
    cout: usize,
    k: usize,
    bias: bool,
) -> candle_core::Result<Conv2d> {
    let cfg = Conv2dConfig {
        padding: k / 2,
        ..Default::default()
    };
    if bias {
        sdkube_nn::conv2d(cin, cout, k, cfg, vb)
    } else {
        sdkube_nn::conv2d_no_bias(cin, cout, k, cfg, vb)
    }
}

/// U-Net residual block that halves or doubles the resolution (`ResBlock`).
struct ResBlock {
    conv1: Conv2d,
    conv2: Conv2d,
    skip: Conv2d,
    up: bool,
}

impl ResBlock {
    fn new(vb: VarBuilder, cin: usize, cout: usize, up: bool) -> candle_core::Result<Self> {
        Ok(Self {
            conv1: conv(vb.pp("conv1"), cin, cin, 3, true)?,
            conv2: conv(vb.pp("conv2"), cin, cout, 3, true)?,
            skip: conv(vb.pp("skip"), cin, cout, 1, false)?,
            up,
        })
    }

    fn resize(&self, xs: &Tensor) -> candle_core::Result<Tensor> {
        if self.up {
            up2(xs)
        } else {
            down2(xs)
        }
    }

    fn forward(&self, xs: &Tensor) -> candle_core::Result<Tensor> {
        let out = leaky(&self.conv1.forward(xs)?)?;
        let out = leaky(&self.conv2.forward(&self.resize(&out)?)?)?;
        out + self.skip.forward(&self.resize(xs)?)?
    }
}

/// StyleGAN2 modulated convolution (`ModulatedConv2d`); it has no bias of its own (the layer
/// around it passes its bias into the convolution).
struct ModulatedConv2d {
    /// `(c_out, c_in, k, k)` (the checkpoint stores a leading 1).
    weight: Tensor,
    /// `Σ_{k,k} weight²` per `(c_out, c_in)`, for demodulation.
    weight_sq: Option<Tensor>,
    modulation: Linear,
    upsample: bool,
    padding: usize,
}

impl ModulatedConv2d {
    fn new(
        vb: VarBuilder,
        cin: usize,
        cout: usize,
        k: usize,
        num_style_feat: usize,
        demodulate: bool,
        upsample: bool,
    ) -> candle_core::Result<Self> {
        let weight = vb.get((1, cout, cin, k, k), "weight")?.squeeze(0)?;
        let weight_sq = if demodulate {
            Some(weight.sqr()?.sum((2, 3))?)
        } else {
            None
        };
        Ok(Self {
            weight,
            weight_sq,
            modulation: candle_nn::linear(num_style_feat, cin, vb.pp("modulation"))?,
            upsample,
            padding: k / 2,
        })
    }

    /// `conv(xs, weight modulated by the style (demodulated) · gain) + bias`, each sample with
    /// its own weights, as the reference modulates: the weights are small, the feature maps
    /// (64 channels at 512² in fp32: 64 MB) are not, so scaling the maps instead took two extra
    /// passes over them per layer.
    fn forward(
        &self,
        xs: &Tensor,
        style: &Tensor,
        gain: f64,
        bias: Option<&Tensor>,
    ) -> candle_core::Result<Tensor> {
        let s = self.modulation.forward(style)?; // (b, c_in)
        let xs = if self.upsample { up2(xs)? } else { xs.clone() };
        // The weight's factor per (sample, c_out, c_in): s · demodulation · gain.
        let factor = match &self.weight_sq {
            None => (s.unsqueeze(1)? * gain)?,
            Some(wsq) => {
                let demod = (s.sqr()?.matmul(&wsq.t()?)? + 1e-8)?.sqrt()?.recip()?; // (b, c_out)
                (demod * gain)?.unsqueeze(2)?.matmul(&s.unsqueeze(1)?)?
            }
        };
        let mut outs = (0..xs.dim(0)?)
            .map(|i| {
                let w = self
                    .weight
                    .broadcast_mul(&factor.get(i)?.unsqueeze(2)?.unsqueeze(3)?)?;
                convolve(&xs.narrow(0, i, 1)?, &w, bias, self.padding, 1)
            })
            .collect::<candle_core::Result<Vec<_>>>()?;
        match outs.len() {
            1 => Ok(outs.remove(0)),
            _ => Tensor::cat(&outs, 0),
        }
    }
}

/// Modulated 3×3 conv + noise injection + bias + leaky ReLU (`StyleConv`).
struct StyleConv {
    modulated_conv: ModulatedConv2d,
    noise_strength: Tensor,
    bias: Tensor,
}

impl StyleConv {
    fn new(
        vb: VarBuilder,
        cin: usize,
        cout: usize,
        num_style_feat: usize,
        upsample: bool,
    ) -> candle_core::Result<Self> {
        Ok(Self {
            modulated_conv: ModulatedConv2d::new(
                vb.pp("modulated_conv"),
                cin,
                cout,
                3,
                num_style_feat,
                true,
                upsample,
            )?,
            noise_strength: vb.get(1, "weight")?,
            bias: vb.get((1, cout, 1, 1), "bias")?.flatten_all()?,
        })
    }

    /// The reference's `leaky(conv · √2 + strength · noise + bias)`, the gain in the weights;
    /// with `sft`, the decoder's spatial feature transform of the second half of the channels
    /// in the same pass.
    fn forward(
        &self,
        xs: &Tensor,
        style: &Tensor,
        noise: &Tensor,
        sft: Option<(&Tensor, &Tensor)>,
    ) -> candle_core::Result<Tensor> {
        let gain = std::f64::consts::SQRT_2;
        let out = self
            .modulated_conv
            .forward(xs, style, gain, Some(&self.bias))?;
        sdkube_nn::noise_leaky_relu(&out, noise, &self.noise_strength, 0.2, sft)
    }
}

/// Features → RGB with a modulated 1×1 conv, added to the upsampled previous RGB (`ToRGB`).
struct ToRgb {
    modulated_conv: ModulatedConv2d,
    bias: Tensor,
    upsample: bool,
}

impl ToRgb {
    fn new(
        vb: VarBuilder,
        cin: usize,
        num_style_feat: usize,
        upsample: bool,
    ) -> candle_core::Result<Self> {
        Ok(Self {
            modulated_conv: ModulatedConv2d::new(
                vb.pp("modulated_conv"),
                cin,
                3,
                1,
                num_style_feat,
                false,
                false,
            )?,
            bias: vb.get((1, 3, 1, 1), "bias")?.flatten_all()?,
            upsample,
        })
    }

    fn forward(
        &self,
        xs: &Tensor,
        style: &Tensor,
        skip: Option<&Tensor>,
    ) -> candle_core::Result<Tensor> {
        let out = self
            .modulated_conv
            .forward(xs, style, 1.0, Some(&self.bias))?;
        match skip {
            None => Ok(out),
            Some(skip) if self.upsample => out + up2(skip)?,
            Some(skip) => out + skip,
        }
    }
}

/// StyleGAN2 generator whose features are modulated by the U-Net's SFT conditions
/// (`StyleGAN2GeneratorCSFT` with `sft_half=True`).
struct StyleDecoder {
    constant_input: Tensor,
    style_conv1: StyleConv,
    to_rgb1: ToRgb,
    style_convs: Vec<StyleConv>,
    to_rgbs: Vec<ToRgb>,
    noises: Vec<Tensor>,
}

impl StyleDecoder {
    fn new(vb: VarBuilder, cfg: &GfpganConfig) -> candle_core::Result<Self> {
        let nsf = cfg.num_style_feat;
        let c4 = cfg.decoder_channels(4);
        let num_layers = (cfg.log_size() - 2) * 2 + 1;
        let noises = (0..num_layers)
            .map(|i| {
                let r = 1usize << ((i + 5) / 2);
                vb.pp("noises").get((1, 1, r, r), &format!("noise{i}"))
            })
            .collect::<candle_core::Result<Vec<_>>>()?;
        let mut style_convs = Vec::new();
        let mut to_rgbs = Vec::new();
        let mut cin = c4;
        for (n, i) in (3..=cfg.log_size()).enumerate() {
            let cout = cfg.decoder_channels(1 << i);
            let vbs = vb.pp("style_convs");
            style_convs.push(StyleConv::new(vbs.pp(2 * n), cin, cout, nsf, true)?);
            style_convs.push(StyleConv::new(vbs.pp(2 * n + 1), cout, cout, nsf, false)?);
            to_rgbs.push(ToRgb::new(vb.pp("to_rgbs").pp(n), cout, nsf, true)?);
            cin = cout;
        }
        Ok(Self {
            constant_input: vb.pp("constant_input").get((1, c4, 4, 4), "weight")?,
            style_conv1: StyleConv::new(vb.pp("style_conv1"), c4, c4, nsf, false)?,
            to_rgb1: ToRgb::new(vb.pp("to_rgb1"), c4, nsf, false)?,
            style_convs,
            to_rgbs,
            noises,
        })
    }

    fn noise_maps(&self, batch: usize, noise: Noise) -> candle_core::Result<Vec<Tensor>> {
        match noise {
            Noise::Stored => Ok(self.noises.clone()),
            Noise::Seeded(seed) => {
                let mut rng = StdRng::seed_from_u64(seed);
                self.noises
                    .iter()
                    .map(|n| {
                        let (_, _, h, w) = n.dims4()?;
                        let v: Vec<f32> = (0..batch * h * w)
                            .map(|_| StandardNormal.sample(&mut rng))
                            .collect();
                        Tensor::from_vec(v, (batch, 1, h, w), n.device())?.to_dtype(n.dtype())
                    })
                    .collect()
            }
        }
    }

    /// `latent`: `(b, num_latent, num_style_feat)`; `conditions`: `[scale, shift]` per level.
    fn forward(
        &self,
        latent: &Tensor,
        conditions: &[(Tensor, Tensor)],
        noise: Noise,
    ) -> candle_core::Result<Tensor> {
        let b = latent.dim(0)?;
        let noises = self.noise_maps(b, noise)?;
        let w = |i: usize| latent.narrow(1, i, 1)?.squeeze(1);
        let (_, c4, h4, w4) = self.constant_input.dims4()?;
        let out = self
            .constant_input
            .broadcast_as((b, c4, h4, w4))?
            .contiguous()?;
        let mut out = self.style_conv1.forward(&out, &w(0)?, &noises[0], None)?;
        let mut skip = self.to_rgb1.forward(&out, &w(1)?, None)?;
        let mut i = 1;
        for (level, to_rgb) in self.to_rgbs.iter().enumerate() {
            // the level's condition transforms the second half of the channels (`sft_half`)
            let sft = conditions.get(level).map(|(scale, shift)| (scale, shift));
            out = self.style_convs[2 * level].forward(&out, &w(i)?, &noises[i], sft)?;
            out =
                self.style_convs[2 * level + 1].forward(&out, &w(i + 1)?, &noises[i + 1], None)?;
            skip = to_rgb.forward(&out, &w(i + 2)?, Some(&skip))?;
            i += 2;
        }
        Ok(skip)
    }
}

/// Two 3×3 convs with a leaky ReLU between (one SFT scale or shift branch).
struct ConditionBranch {
    conv0: Conv2d,
    conv2: Conv2d,
}

impl ConditionBranch {
    fn new(vb: VarBuilder, c: usize) -> candle_core::Result<Self> {
        Ok(Self {
            conv0: conv(vb.pp(0), c, c, 3, true)?,
            conv2: conv(vb.pp(2), c, c, 3, true)?,
        })
    }

    fn forward(&self, xs: &Tensor) -> candle_core::Result<Tensor> {
        self.conv2.forward(&leaky(&self.conv0.forward(xs)?)?)
    }
}

/// The GFPGANv1Clean network: U-Net encoder/decoder producing per-layer style codes and SFT
/// conditions for a StyleGAN2 decoder.
pub struct Gfpgan {
    cfg: GfpganConfig,
    conv_body_first: Conv2d,
    conv_body_down: Vec<ResBlock>,
    final_conv: Conv2d,
    conv_body_up: Vec<ResBlock>,
    final_linear: Linear,
    condition_scale: Vec<ConditionBranch>,
    condition_shift: Vec<ConditionBranch>,
    stylegan_decoder: StyleDecoder,
}

impl Gfpgan {
    /// Builds the network from a var builder rooted at the checkpoint's `params_ema`.
    pub fn new(vb: VarBuilder, cfg: GfpganConfig) -> Result<Self, FaceError> {
        cfg.validate()?;
        Self::build(vb, cfg).map_err(|e| FaceError::Weights(format!("GFPGAN ({cfg:?}): {e}")))
    }

    /// Builds the network from a name → tensor map as read from a checkpoint (keys with or
    /// without the `params_ema.` prefix of the official `.pth` files).
    pub fn from_tensors(
        tensors: HashMap<String, Tensor>,
        cfg: GfpganConfig,
        device: &Device,
    ) -> Result<Self, FaceError> {
        let tensors = strip_prefix(tensors, &["params_ema.", "params."]);
        Self::new(VarBuilder::from_tensors(tensors, DType::F32, device), cfg)
    }

    /// Loads an official `GFPGANv1.3.pth` / `GFPGANv1.4.pth` (tensor-only unpickling) or a
    /// safetensors export of it; the configuration is read off the tensor shapes.
    pub fn load(path: &std::path::Path, device: &Device) -> Result<Self, FaceError> {
        let in_file = |e: FaceError| match e {
            FaceError::Weights(m) => FaceError::Weights(format!("{}: {m}", path.display())),
            e => e,
        };
        let tensors = sdkube_weights::load(path, device, DType::F32)
            .map_err(|e| FaceError::Weights(format!("{}: {e}", path.display())))?;
        let tensors = strip_prefix(tensors, &["params_ema.", "params."]);
        let cfg = GfpganConfig::infer(&tensors).map_err(in_file)?;
        Self::from_tensors(tensors, cfg, device).map_err(in_file)
    }

    fn build(vb: VarBuilder, cfg: GfpganConfig) -> candle_core::Result<Self> {
        let log = cfg.log_size();
        let first = cfg.unet_channels(cfg.out_size);
        let conv_body_first = conv(vb.pp("conv_body_first"), 3, first, 1, true)?;
        let mut cin = first;
        let mut conv_body_down = Vec::new();
        for (n, i) in (3..=log).rev().enumerate() {
            let cout = cfg.unet_channels(1 << (i - 1));
            conv_body_down.push(ResBlock::new(
                vb.pp("conv_body_down").pp(n),
                cin,
                cout,
                false,
            )?);
            cin = cout;
        }
        let c4 = cfg.unet_channels(4);
        let final_conv = conv(vb.pp("final_conv"), cin, c4, 3, true)?;
        let mut conv_body_up = Vec::new();
        let mut condition_scale = Vec::new();
        let mut condition_shift = Vec::new();
        let mut cin = c4;
        for (n, i) in (3..=log).enumerate() {
            let cout = cfg.unet_channels(1 << i);
            conv_body_up.push(ResBlock::new(vb.pp("conv_body_up").pp(n), cin, cout, true)?);
            condition_scale.push(ConditionBranch::new(vb.pp("condition_scale").pp(n), cout)?);
            condition_shift.push(ConditionBranch::new(vb.pp("condition_shift").pp(n), cout)?);
            cin = cout;
        }
        let final_linear = candle_nn::linear(
            c4 * 16,
            cfg.num_latent() * cfg.num_style_feat,
            vb.pp("final_linear"),
        )?;
        Ok(Self {
            cfg,
            conv_body_first,
            conv_body_down,
            final_conv,
            conv_body_up,
            final_linear,
            condition_scale,
            condition_shift,
            stylegan_decoder: StyleDecoder::new(vb.pp("stylegan_decoder"), &cfg)?,
        })
    }

    /// The configuration read off the weights.
    pub fn config(&self) -> &GfpganConfig {
        &self.cfg
    }

    /// Restores aligned faces: `faces` is `(b, 3, out_size, out_size)` RGB in `[-1, 1]`;
    /// returns the same shape (unclamped, as the network produces it).
    pub fn forward(&self, faces: &Tensor, noise: Noise) -> Result<Tensor, FaceError> {
        let s = self.cfg.out_size;
        match faces.dims() {
            [_, 3, h, w] if *h == s && *w == s => {}
            dims => {
                return Err(FaceError::Input(format!(
                    "GFPGAN expects faces of shape (batch, 3, {s}, {s}), got {dims:?}"
                )))
            }
        }
        Ok(self.forward_unchecked(faces, noise)?)
    }

    fn forward_unchecked(&self, x: &Tensor, noise: Noise) -> candle_core::Result<Tensor> {
        let b = x.dim(0)?;
        let mut feat = leaky(&self.conv_body_first.forward(x)?)?;
        let mut skips = Vec::with_capacity(self.conv_body_down.len());
        for down in &self.conv_body_down {
            feat = down.forward(&feat)?;
            skips.push(feat.clone());
        }
        feat = leaky(&self.final_conv.forward(&feat)?)?;
        let style = self
            .final_linear
            .forward(&feat.flatten_from(1)?)?
            .reshape((b, self.cfg.num_latent(), self.cfg.num_style_feat))?;
        let mut conditions = Vec::with_capacity(self.conv_body_up.len());
        for (n, up) in self.conv_body_up.iter().enumerate() {
            feat = (feat + &skips[skips.len() - 1 - n])?;
            feat = up.forward(&feat)?;
            conditions.push((
                self.condition_scale[n].forward(&feat)?,
                self.condition_shift[n].forward(&feat)?,
            ));
        }
        self.stylegan_decoder.forward(&style, &conditions, noise)
    }
}
