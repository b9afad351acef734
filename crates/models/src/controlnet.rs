//! `diffusers.ControlNetModel` for SD 1.x, 2.x and SDXL (Zhang et al. 2023,
//! <https://arxiv.org/abs/2302.05543>): a copy of the UNet's encoder half whose input also
//! gets an embedding of the control image (edges, depth, pose…), and a zero-initialised 1×1
//! convolution per skip connection and for the mid block. Their outputs are residuals the
//! UNet adds to its skip connections and mid block ([`ControlResiduals`]).
//!
//! Loaded from a diffusers folder (`config.json` + weights) or from an lllyasviel/A1111
//! single file (`control_model.` + LDM keys: `input_blocks`, `zero_convs`,
//! `input_hint_block`, `middle_block_out`), whose configuration is inferred from its shapes.

use std::path::Path;

use candle_core::{DType, Device, Module, Result, Tensor};
use candle_nn::VarBuilder;

use sdkube_nn::{conv1x1, conv3x3, Conv2d};

use crate::blocks::{fuse_self_attentions_on, ContextProjections, TimeProjections};
use crate::checkpoint::{component_file, invalid, read_json, read_tensors, Component, LoadError};
use crate::config::ControlNetConfig;
use crate::ldm::{self, TensorMap};
use crate::unet::{AddedConditioning, AttentionKind, ControlResiduals, Encoder};

/// `ControlNetConditioningEmbedding`: the control image down to latent size, in
/// `block_out_channels[0]` channels.
#[derive(Debug)]
struct ConditioningEmbedding {
    conv_in: Conv2d,
    /// Pairs of a 3×3 convolution and a stride-2 one, a pair per level after the first.
    blocks: Vec<Conv2d>,
    conv_out: Conv2d,
}

impl ConditioningEmbedding {
    fn new(vb: VarBuilder, cfg: &ControlNetConfig) -> Result<Self> {
        let ch = &cfg.conditioning_embedding_out_channels;
        if ch.is_empty() {
            candle_core::bail!("controlnet config: conditioning_embedding_out_channels is empty");
        }
        let mut blocks = Vec::new();
        for (i, pair) in ch.windows(2).enumerate() {
            let bvb = vb.pp("blocks");
            blocks.push(conv3x3(pair[0], pair[0], 1, bvb.pp(2 * i))?);
            blocks.push(conv3x3(pair[0], pair[1], 2, bvb.pp(2 * i + 1))?);
        }
        Ok(Self {
            conv_in: conv3x3(cfg.conditioning_channels, ch[0], 1, vb.pp("conv_in"))?,
            blocks,
            conv_out: conv3x3(
                ch[ch.len() - 1],
                cfg.unet.block_out_channels[0],
                1,
                vb.pp("conv_out"),
            )?,
        })
    }

    fn forward(&self, cond: &Tensor) -> Result<Tensor> {
        let mut h = self.conv_in.forward(cond)?.silu()?;
        for block in &self.blocks {
            h = block.forward(&h)?.silu()?;
        }
        self.conv_out.forward(&h)
    }
}

/// A ControlNet on a device.
#[derive(Debug)]
pub struct ControlNetModel {
    encoder: Encoder,
    cond_embedding: ConditioningEmbedding,
    down_convs: Vec<Conv2d>,
    mid_conv: Conv2d,
    cfg: ControlNetConfig,
    /// Its cross-attentions' keys and values, projected at once per pass (on GPUs).
    projections: ContextProjections,
    /// Its ResNet blocks' time projections, at once per pass (on GPUs).
    time_projections: TimeProjections,
}

impl ControlNetModel {
    /// The ControlNet, its weights from `vb` under diffusers' key names.
    pub fn new(vb: VarBuilder, cfg: &ControlNetConfig) -> Result<Self> {
        let unet = &cfg.unet;
        let mut encoder = Encoder::new(&vb, unet)?;
        let cross = encoder.attentions_mut(AttentionKind::Cross);
        let projections = ContextProjections::gather_on(vb.device(), cross)?;
        let self_attentions = encoder.attentions_mut(AttentionKind::SelfAttention);
        fuse_self_attentions_on(vb.device(), self_attentions, &Default::default())?;
        let time_projections = TimeProjections::gather_on(vb.device(), encoder.resnets_mut())?;
        let boc = &unet.block_out_channels;
        // One convolution per skip connection: conv_in's output, each layer's, and each
        // downsampler's (every level but the last has one).
        let mut channels = vec![boc[0]];
        for (i, &c) in boc.iter().enumerate() {
            channels.extend(std::iter::repeat_n(c, unet.layers_per_block));
            if i + 1 < boc.len() {
                channels.push(c);
            }
        }
        let down_convs = channels
            .iter()
            .enumerate()
            .map(|(k, &c)| conv1x1(c, c, vb.pp(format!("controlnet_down_blocks.{k}"))))
            .collect::<Result<_>>()?;
        let mid = boc[boc.len() - 1];
        Ok(Self {
            encoder,
            cond_embedding: ConditioningEmbedding::new(vb.pp("controlnet_cond_embedding"), cfg)?,
            down_convs,
            mid_conv: conv1x1(mid, mid, vb.pp("controlnet_mid_block"))?,
            cfg: cfg.clone(),
            projections,
            time_projections,
        })
    }

    /// Its configuration.
    pub fn config(&self) -> &ControlNetConfig {
        &self.cfg
    }

    /// The residuals for latents `xs` at timestep `t` with text `ctx` (and SDXL's `added`),
    /// steered by `cond` `[B, 3, 8h, 8w]` in `[0, 1]`, before any weighting
    /// ([`ControlResiduals::scaled`]).
    pub fn forward(
        &self,
        xs: &Tensor,
        t: &Tensor,
        ctx: &Tensor,
        added: Option<&AddedConditioning>,
        cond: &Tensor,
    ) -> Result<ControlResiduals> {
        let cond = if self.cfg.controlnet_conditioning_channel_order == "bgr" {
            let rgb = cond.chunk(3, 1)?;
            Tensor::cat(&[&rgb[2], &rgb[1], &rgb[0]], 1)?
        } else {
            cond.clone()
        };
        let emb = self.encoder.embedding(t, added, xs.dim(0)?, xs.dtype())?;
        let emb = &self.time_projections.project(&emb)?;
        let h = sdkube_nn::add(
            &self.encoder.conv_in(xs)?,
            &self.cond_embedding.forward(&cond)?,
        )?;
        let ctx = &self.projections.project(ctx)?;
        let (h, skips) = self.encoder.down(h, emb, ctx)?;
        let h = self.encoder.mid(&h, emb, ctx)?;
        let pool = |t: Tensor| -> Result<Tensor> {
            if self.cfg.global_pool_conditions {
                t.mean_keepdim(3)?.mean_keepdim(2)
            } else {
                Ok(t)
            }
        };
        let down = skips
            .iter()
            .zip(&self.down_convs)
            .map(|(s, conv)| pool(conv.forward(s)?))
            .collect::<Result<_>>()?;
        Ok(ControlResiduals {
            down,
            mid: pool(self.mid_conv.forward(&h)?)?,
        })
    }
}

impl ControlResiduals {
    /// Each residual times its weight: `weights` has one per skip connection, then one for
    /// the mid block (A1111's control scales); a residual past the end of `weights` gets the
    /// last one.
    pub fn scaled(&self, weights: &[f64]) -> Result<ControlResiduals> {
        let weight = |k: usize| weights.get(k).or(weights.last()).copied().unwrap_or(1.0);
        Ok(ControlResiduals {
            down: self
                .down
                .iter()
                .enumerate()
                .map(|(k, t)| t.affine(weight(k), 0.0))
                .collect::<Result<_>>()?,
            mid: self.mid.affine(weight(self.down.len()), 0.0)?,
        })
    }

    /// The sum of two ControlNets' residuals (several units at once).
    pub fn add(&self, other: &ControlResiduals) -> Result<ControlResiduals> {
        if self.down.len() != other.down.len() {
            candle_core::bail!("the two ControlNets do not fit the same UNet");
        }
        Ok(ControlResiduals {
            down: self
                .down
                .iter()
                .zip(&other.down)
                .map(|(a, b)| a + b)
                .collect::<Result<_>>()?,
            mid: (&self.mid + &other.mid)?,
        })
    }
}

impl Component<ControlNetConfig> {
    /// The ControlNet on `device`, weights cast to `dtype`.
    pub fn build(&self, device: &Device, dtype: DType) -> Result<ControlNetModel> {
        ControlNetModel::new(self.var_builder(device, dtype), &self.config)
    }
}

/// Loads a ControlNet from a diffusers folder or an lllyasviel/A1111 single file. A single
/// file's configuration is inferred from its shapes unless `config` (a `config.json`, or a
/// folder holding one) is given, as diffusers' `from_single_file(config=…)`.
pub fn load_controlnet(
    path: &Path,
    config: Option<&Path>,
) -> std::result::Result<Component<ControlNetConfig>, LoadError> {
    if path.is_dir() {
        let config = read_json(&path.join("config.json"))?;
        let tensors = read_tensors(&component_file(path)?)?;
        return Ok(Component { config, tensors });
    }
    let all = read_tensors(path)?;
    let ldm_keys = if all.keys().any(|k| k.starts_with("control_model.")) {
        ldm::strip_prefix(&all, "control_model.")
    } else {
        all
    };
    if !ldm_keys.contains_key("input_hint_block.0.weight") {
        return Err(invalid(
            path,
            "not a ControlNet: no `input_hint_block` (an lllyasviel/A1111 ControlNet file) \
             — for a diffusers ControlNet give its folder, with config.json",
        ));
    }
    let config: ControlNetConfig = match config {
        Some(c) if c.is_dir() => read_json(&c.join("config.json"))?,
        Some(c) => read_json(c)?,
        None => infer_config(&ldm_keys).map_err(|e| invalid(path, e.to_string()))?,
    };
    let tensors = convert_ldm(&ldm_keys, &config);
    Ok(Component { config, tensors })
}

/// The configuration of an LDM-layout ControlNet, from its shapes.
fn infer_config(ldm: &TensorMap) -> Result<ControlNetConfig> {
    let probe = ldm
        .keys()
        .find(|k| k.ends_with("attn2.to_k.weight"))
        .and_then(|k| ldm.get(k))
        .map(|t| t.dims()[1]);
    // SD 1.x (768-wide text) uses 8 heads per block; SD 2.x and SDXL 64-wide heads.
    let unet = ldm::infer_unet_config(ldm, probe == Some(768))?;
    // input_hint_block: convolutions at even indices, SiLUs between them; the last is
    // conv_out, whose input is the embedding's widest level.
    let mut convs: Vec<usize> = ldm
        .keys()
        .filter_map(|k| k.strip_prefix("input_hint_block.")?.strip_suffix(".weight"))
        .filter_map(|i| i.parse().ok())
        .collect();
    convs.sort_unstable();
    let out_channel = |i: usize| -> Result<usize> {
        let key = format!("input_hint_block.{i}.weight");
        ldm.get(&key)
            .map(|t| t.dims()[0])
            .ok_or_else(|| candle_core::Error::Msg(format!("no tensor {key}")))
    };
    let first = ldm
        .get("input_hint_block.0.weight")
        .map(|t| t.dims().to_vec())
        .unwrap_or_default();
    if convs.len() < 2 || first.len() != 4 {
        candle_core::bail!("input_hint_block is not a stack of convolutions");
    }
    let mut levels = vec![first[0]];
    // After conv_in: (3×3, stride-2) pairs; each stride-2 one starts a level.
    for pair in convs[1..convs.len() - 1].chunks(2) {
        if let [_, down] = pair {
            levels.push(out_channel(*down)?);
        }
    }
    Ok(ControlNetConfig {
        unet,
        conditioning_channels: first[1],
        conditioning_embedding_out_channels: levels,
        controlnet_conditioning_channel_order: "rgb".into(),
        global_pool_conditions: false,
    })
}

/// LDM ControlNet keys → diffusers keys.
fn convert_ldm(ldm: &TensorMap, cfg: &ControlNetConfig) -> TensorMap {
    let mut out = ldm::convert_unet(ldm, cfg.unet.layers_per_block);
    // conv_in, a pair per level after the first, conv_out: 2 × levels convolutions, each
    // followed by a SiLU in the Sequential, so conv_out sits at index 2 × (2 × levels − 1).
    let levels = cfg.conditioning_embedding_out_channels.len().max(1);
    let last_hint = 2 * (2 * levels - 1);
    for (key, t) in ldm {
        let parts: Vec<&str> = key.splitn(4, '.').collect();
        let new = match parts.as_slice() {
            ["zero_convs", k, "0", rest] => Some(format!("controlnet_down_blocks.{k}.{rest}")),
            ["middle_block_out", "0", rest] => Some(format!("controlnet_mid_block.{rest}")),
            ["input_hint_block", i, rest] => i.parse::<usize>().ok().map(|i| match i {
                0 => format!("controlnet_cond_embedding.conv_in.{rest}"),
                i if i == last_hint => format!("controlnet_cond_embedding.conv_out.{rest}"),
                i => format!("controlnet_cond_embedding.blocks.{}.{rest}", i / 2 - 1),
            }),
            _ => None,
        };
        if let Some(new) = new {
            out.insert(new, t.clone());
        }
    }
    out
}
