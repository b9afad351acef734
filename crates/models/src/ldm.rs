//! Single-file A1111/LDM checkpoints: the key names of the original CompVis/Stability code
//! (`model.diffusion_model.*`, `first_stage_model.*`, `cond_stage_model.*`, `conditioner.*`)
//! renamed into the diffusers/transformers key trees our networks use, and the network
//! configurations inferred from tensor shapes.

use std::collections::HashMap;

use candle_core::{Result, Tensor};

use crate::config::{ClipTextConfig, PerBlock, UNetConfig, VaeConfig};

/// Tensors by checkpoint key.
pub type TensorMap = HashMap<String, Tensor>;

/// Takes the tensors under `prefix`, with the prefix removed.
pub fn strip_prefix(all: &TensorMap, prefix: &str) -> TensorMap {
    all.iter()
        .filter_map(|(k, v)| k.strip_prefix(prefix).map(|s| (s.to_string(), v.clone())))
        .collect()
}

fn shape(map: &TensorMap, key: &str) -> Result<Vec<usize>> {
    map.get(key)
        .map(|t| t.dims().to_vec())
        .ok_or_else(|| candle_core::Error::Msg(format!("checkpoint has no tensor {key:?}")))
}

fn count_indices(map: &TensorMap, prefix: &str) -> usize {
    map.keys()
        .filter_map(|k| k.strip_prefix(prefix))
        .filter_map(|rest| rest.split('.').next()?.parse::<usize>().ok())
        .map(|i| i + 1)
        .max()
        .unwrap_or(0)
}

fn resnet_rename(rest: &str) -> String {
    [
        ("in_layers.0", "norm1"),
        ("in_layers.2", "conv1"),
        ("emb_layers.1", "time_emb_proj"),
        ("out_layers.0", "norm2"),
        ("out_layers.3", "conv2"),
        ("skip_connection", "conv_shortcut"),
    ]
    .iter()
    .find_map(|(from, to)| rest.strip_prefix(from).map(|r| format!("{to}{r}")))
    .unwrap_or_else(|| rest.to_string())
}

/// Renames an LDM UNet (keys without `model.diffusion_model.`) into diffusers keys.
pub fn convert_unet(ldm: &TensorMap, layers_per_block: usize) -> TensorMap {
    let lpb = layers_per_block;
    let mut out = TensorMap::new();
    for (key, t) in ldm {
        let parts: Vec<&str> = key.splitn(4, '.').collect();
        let new = match parts.as_slice() {
            ["time_embed", "0", rest @ ..] => {
                Some(format!("time_embedding.linear_1.{}", rest.join(".")))
            }
            ["time_embed", "2", rest @ ..] => {
                Some(format!("time_embedding.linear_2.{}", rest.join(".")))
            }
            ["out", "0", rest @ ..] => Some(format!("conv_norm_out.{}", rest.join("."))),
            ["out", "2", rest @ ..] => Some(format!("conv_out.{}", rest.join("."))),
            ["label_emb", "0", "0", rest] => Some(format!("add_embedding.linear_1.{rest}")),
            ["label_emb", "0", "2", rest] => Some(format!("add_embedding.linear_2.{rest}")),
            ["input_blocks", "0", "0", rest] => Some(format!("conv_in.{rest}")),
            ["input_blocks", n, slot, rest] => n.parse::<usize>().ok().and_then(|n| {
                let (level, layer) = ((n - 1) / (lpb + 1), (n - 1) % (lpb + 1));
                match *slot {
                    "0" if layer == lpb => rest
                        .strip_prefix("op.")
                        .map(|r| format!("down_blocks.{level}.downsamplers.0.conv.{r}")),
                    "0" => Some(format!(
                        "down_blocks.{level}.resnets.{layer}.{}",
                        resnet_rename(rest)
                    )),
                    "1" => Some(format!("down_blocks.{level}.attentions.{layer}.{rest}")),
                    _ => None,
                }
            }),
            ["middle_block", "0", rest @ ..] => Some(format!(
                "mid_block.resnets.0.{}",
                resnet_rename(&rest.join("."))
            )),
            ["middle_block", "1", rest @ ..] => {
                Some(format!("mid_block.attentions.0.{}", rest.join(".")))
            }
            ["middle_block", "2", rest @ ..] => Some(format!(
                "mid_block.resnets.1.{}",
                resnet_rename(&rest.join("."))
            )),
            ["output_blocks", n, slot, rest] => n.parse::<usize>().ok().and_then(|n| {
                let (level, layer) = (n / (lpb + 1), n % (lpb + 1));
                let is_upsampler = rest.starts_with("conv.");
                match *slot {
                    "0" => Some(format!(
                        "up_blocks.{level}.resnets.{layer}.{}",
                        resnet_rename(rest)
                    )),
                    _ if is_upsampler => Some(format!("up_blocks.{level}.upsamplers.0.{rest}")),
                    "1" => Some(format!("up_blocks.{level}.attentions.{layer}.{rest}")),
                    _ => None,
                }
            }),
            _ => None,
        };
        if let Some(new) = new {
            out.insert(new, t.clone());
        }
    }
    out
}

/// Renames an LDM VAE (keys without `first_stage_model.`) into diffusers keys. The mid-block
/// attention's 1×1 convolutions become linear weights.
pub fn convert_vae(ldm: &TensorMap) -> Result<TensorMap> {
    let up_levels = count_indices(ldm, "decoder.up.");
    let mut out = TensorMap::new();
    for (key, t) in ldm {
        let mut t = t.clone();
        let new = if let Some(rest) = key
            .strip_prefix("encoder.down.")
            .or_else(|| key.strip_prefix("decoder.up."))
        {
            let (side, blocks) = if key.starts_with("encoder") {
                ("encoder", "down_blocks")
            } else {
                ("decoder", "up_blocks")
            };
            let (i, rest) = rest.split_once('.').unwrap_or((rest, ""));
            let mut i: usize = i
                .parse()
                .map_err(|_| candle_core::Error::Msg(format!("bad vae key {key}")))?;
            if side == "decoder" {
                i = up_levels - 1 - i;
            }
            let rest = if let Some(r) = rest.strip_prefix("block.") {
                format!("resnets.{}", r.replace("nin_shortcut", "conv_shortcut"))
            } else if let Some(r) = rest.strip_prefix("downsample.") {
                format!("downsamplers.0.{r}")
            } else if let Some(r) = rest.strip_prefix("upsample.") {
                format!("upsamplers.0.{r}")
            } else {
                rest.to_string()
            };
            format!("{side}.{blocks}.{i}.{rest}")
        } else if let Some((side, rest)) = key.split_once(".mid.") {
            let rest = rest
                .replace("block_1.", "resnets.0.")
                .replace("block_2.", "resnets.1.")
                .replace("nin_shortcut", "conv_shortcut");
            let rest = match rest.strip_prefix("attn_1.") {
                Some(a) => {
                    let (name, param) = a.split_once('.').unwrap_or((a, ""));
                    let name = match name {
                        "norm" => "group_norm",
                        "q" => "to_q",
                        "k" => "to_k",
                        "v" => "to_v",
                        "proj_out" => "to_out.0",
                        other => other,
                    };
                    if t.rank() == 4 {
                        t = t.squeeze(3)?.squeeze(2)?;
                    }
                    format!("attentions.0.{name}.{param}")
                }
                None => rest,
            };
            format!("{side}.mid_block.{rest}")
        } else {
            key.replace("norm_out", "conv_norm_out")
        };
        out.insert(new, t);
    }
    Ok(out)
}

/// Renames an OpenCLIP text tower (`…model.` prefix removed) into transformers' CLIP keys,
/// splitting the fused attention projections. `keep_layers` drops trailing resblocks (SD 2.x
/// conditions on the penultimate layer).
pub fn convert_open_clip(oc: &TensorMap, keep_layers: usize) -> Result<TensorMap> {
    let mut out = TensorMap::new();
    for (key, t) in oc {
        if let Some(rest) = key.strip_prefix("transformer.resblocks.") {
            let (i, rest) = rest.split_once('.').unwrap_or((rest, ""));
            let i: usize = i
                .parse()
                .map_err(|_| candle_core::Error::Msg(format!("bad open_clip key {key}")))?;
            if i >= keep_layers {
                continue;
            }
            let base = format!("text_model.encoder.layers.{i}");
            match rest {
                "attn.in_proj_weight" | "attn.in_proj_bias" => {
                    let kind = if rest.ends_with("weight") {
                        "weight"
                    } else {
                        "bias"
                    };
                    let d = t.dim(0)? / 3;
                    for (j, name) in ["q_proj", "k_proj", "v_proj"].iter().enumerate() {
                        out.insert(
                            format!("{base}.self_attn.{name}.{kind}"),
                            t.narrow(0, j * d, d)?,
                        );
                    }
                }
                _ => {
                    let rest = rest
                        .replace("attn.out_proj", "self_attn.out_proj")
                        .replace("ln_1", "layer_norm1")
                        .replace("ln_2", "layer_norm2")
                        .replace("mlp.c_fc", "mlp.fc1")
                        .replace("mlp.c_proj", "mlp.fc2");
                    out.insert(format!("{base}.{rest}"), t.clone());
                }
            }
        } else {
            match key.as_str() {
                "token_embedding.weight" => {
                    out.insert(
                        "text_model.embeddings.token_embedding.weight".into(),
                        t.clone(),
                    );
                }
                "positional_embedding" => {
                    out.insert(
                        "text_model.embeddings.position_embedding.weight".into(),
                        t.clone(),
                    );
                }
                "ln_final.weight" | "ln_final.bias" => {
                    out.insert(
                        key.replace("ln_final", "text_model.final_layer_norm"),
                        t.clone(),
                    );
                }
                "text_projection" => {
                    out.insert("text_projection.weight".into(), t.t()?.contiguous()?);
                }
                _ => {}
            }
        }
    }
    Ok(out)
}

/// Text encoder config from transformers-layout weights. Heads follow CLIP's 64-wide heads
/// (every released SD text encoder); `quick_gelu` is OpenAI CLIP, `gelu` OpenCLIP.
pub fn infer_clip_config(map: &TensorMap, open_clip: bool) -> Result<ClipTextConfig> {
    let [vocab, hidden] = shape(map, "text_model.embeddings.token_embedding.weight")?[..] else {
        candle_core::bail!("token embedding is not 2-d")
    };
    let positions = shape(map, "text_model.embeddings.position_embedding.weight")?[0];
    let intermediate = shape(map, "text_model.encoder.layers.0.mlp.fc1.weight")?[0];
    let layers = count_indices(map, "text_model.encoder.layers.");
    let projection_dim = map.get("text_projection.weight").map(|t| t.dims()[0]);
    Ok(ClipTextConfig {
        vocab_size: vocab,
        hidden_size: hidden,
        intermediate_size: intermediate,
        num_hidden_layers: layers,
        num_attention_heads: (hidden / 64).max(1),
        max_position_embeddings: positions,
        hidden_act: if open_clip { "gelu" } else { "quick_gelu" }.into(),
        layer_norm_eps: 1e-5,
        projection_dim,
        eos_token_id: 49407,
    })
}

/// UNet config from LDM-layout weights. Heads: SD 1.x uses 8 per block, SD 2.x and SDXL
/// 64-wide heads (`sd1_heads`).
pub fn infer_unet_config(ldm: &TensorMap, sd1_heads: bool) -> Result<UNetConfig> {
    let conv_in = shape(ldm, "input_blocks.0.0.weight")?;
    let (model_ch, in_ch) = (conv_in[0], conv_in[1]);
    // A ControlNet (the encoder half alone) has no output convolution.
    let out_ch = shape(ldm, "out.2.weight").map_or(in_ch, |s| s[0]);
    let inputs = count_indices(ldm, "input_blocks.");
    let downsamplers = (1..inputs)
        .filter(|n| ldm.contains_key(&format!("input_blocks.{n}.0.op.weight")))
        .count();
    let levels = downsamplers + 1;
    let lpb = (inputs - 1 - downsamplers) / levels;
    let mut boc = Vec::new();
    let mut down = Vec::new();
    let mut tlpb = Vec::new();
    let mut ctx_dim = 0;
    let mut linear = false;
    for level in 0..levels {
        let first = 1 + level * (lpb + 1);
        boc.push(shape(ldm, &format!("input_blocks.{first}.0.out_layers.3.weight"))?[0]);
        let attn = format!("input_blocks.{first}.1.");
        if ldm.contains_key(&format!("{attn}proj_in.weight")) {
            down.push("CrossAttnDownBlock2D".to_string());
            tlpb.push(count_indices(ldm, &format!("{attn}transformer_blocks.")));
            ctx_dim = shape(
                ldm,
                &format!("{attn}transformer_blocks.0.attn2.to_k.weight"),
            )?[1];
            linear = shape(ldm, &format!("{attn}proj_in.weight"))?.len() == 2;
        } else {
            down.push("DownBlock2D".to_string());
            tlpb.push(1);
        }
    }
    let _ = model_ch;
    let up: Vec<String> = down.iter().rev().map(|d| d.replace("Down", "Up")).collect();
    // diffusers takes the mid block's depth from the last level.
    if let Some(last) = tlpb.last_mut() {
        *last = count_indices(ldm, "middle_block.1.transformer_blocks.").max(1);
    }
    let heads: Vec<usize> = boc
        .iter()
        .map(|&c| if sd1_heads { 8 } else { (c / 64).max(1) })
        .collect();
    let label = ldm.get("label_emb.0.0.weight").map(|t| t.dims()[1]);
    Ok(UNetConfig {
        in_channels: in_ch,
        out_channels: out_ch,
        down_block_types: down,
        up_block_types: up,
        block_out_channels: boc,
        layers_per_block: lpb,
        cross_attention_dim: ctx_dim,
        attention_head_dim: PerBlock::Each(heads),
        num_attention_heads: None,
        transformer_layers_per_block: PerBlock::Each(tlpb),
        use_linear_projection: linear,
        norm_num_groups: 32,
        norm_eps: 1e-5,
        upcast_attention: !sd1_heads && label.is_none(),
        flip_sin_to_cos: true,
        freq_shift: 0,
        addition_embed_type: label.map(|_| "text_time".to_string()),
        addition_time_embed_dim: label.map(|_| 256),
        projection_class_embeddings_input_dim: label,
        sample_size: None,
    })
}

/// VAE config from LDM-layout weights.
pub fn infer_vae_config(ldm: &TensorMap, scaling_factor: f64) -> Result<VaeConfig> {
    let levels = count_indices(ldm, "encoder.down.");
    let boc = (0..levels)
        .map(|i| Ok(shape(ldm, &format!("encoder.down.{i}.block.0.conv2.weight"))?[0]))
        .collect::<Result<Vec<_>>>()?;
    Ok(VaeConfig {
        in_channels: shape(ldm, "encoder.conv_in.weight")?[1],
        out_channels: shape(ldm, "decoder.conv_out.weight")?[0],
        block_out_channels: boc,
        layers_per_block: count_indices(ldm, "encoder.down.0.block."),
        latent_channels: shape(ldm, "quant_conv.weight")?[0] / 2,
        norm_num_groups: 32,
        scaling_factor,
    })
}

/// The original LDM/SGM path (`input_blocks.4.1.proj_in`) of a diffusers UNet module path
/// (`down_blocks.1.attentions.0.proj_in`): the inverse of [`convert_unet`]'s renaming, which
/// kohya's SDXL LoRAs name their modules by. `up_attention[l]` tells whether up level `l` has
/// attentions (its upsampler then sits in slot 2, else 1).
pub fn ldm_unet_module(
    path: &str,
    layers_per_block: usize,
    up_attention: &[bool],
) -> Option<String> {
    let lpb = layers_per_block;
    let resnet = |rest: &[&str]| -> String {
        let first = match rest.first().copied().unwrap_or("") {
            "norm1" => "in_layers.0",
            "conv1" => "in_layers.2",
            "time_emb_proj" => "emb_layers.1",
            "norm2" => "out_layers.0",
            "conv2" => "out_layers.3",
            "conv_shortcut" => "skip_connection",
            other => other,
        };
        std::iter::once(first)
            .chain(rest.iter().skip(1).copied())
            .collect::<Vec<_>>()
            .join(".")
    };
    let parts: Vec<&str> = path.split('.').collect();
    let index = |s: &str| s.parse::<usize>().ok();
    Some(
        match parts.as_slice() {
            ["conv_in", rest @ ..] => format!("input_blocks.0.0.{}", rest.join(".")),
            ["time_embedding", "linear_1", rest @ ..] => format!("time_embed.0.{}", rest.join(".")),
            ["time_embedding", "linear_2", rest @ ..] => format!("time_embed.2.{}", rest.join(".")),
            ["add_embedding", "linear_1", rest @ ..] => format!("label_emb.0.0.{}", rest.join(".")),
            ["add_embedding", "linear_2", rest @ ..] => format!("label_emb.0.2.{}", rest.join(".")),
            ["conv_norm_out", rest @ ..] => format!("out.0.{}", rest.join(".")),
            ["conv_out", rest @ ..] => format!("out.2.{}", rest.join(".")),
            ["down_blocks", l, "resnets", j, rest @ ..] => {
                let n = 1 + index(l)? * (lpb + 1) + index(j)?;
                format!("input_blocks.{n}.0.{}", resnet(rest))
            }
            ["down_blocks", l, "attentions", j, rest @ ..] => {
                let n = 1 + index(l)? * (lpb + 1) + index(j)?;
                format!("input_blocks.{n}.1.{}", rest.join("."))
            }
            ["down_blocks", l, "downsamplers", "0", "conv", rest @ ..] => {
                let n = 1 + index(l)? * (lpb + 1) + lpb;
                format!("input_blocks.{n}.0.op.{}", rest.join("."))
            }
            ["mid_block", "resnets", j, rest @ ..] => {
                format!("middle_block.{}.{}", 2 * index(j)?, resnet(rest))
            }
            ["mid_block", "attentions", "0", rest @ ..] => {
                format!("middle_block.1.{}", rest.join("."))
            }
            ["up_blocks", l, "resnets", j, rest @ ..] => {
                let n = index(l)? * (lpb + 1) + index(j)?;
                format!("output_blocks.{n}.0.{}", resnet(rest))
            }
            ["up_blocks", l, "attentions", j, rest @ ..] => {
                let n = index(l)? * (lpb + 1) + index(j)?;
                format!("output_blocks.{n}.1.{}", rest.join("."))
            }
            ["up_blocks", l, "upsamplers", "0", rest @ ..] => {
                let level = index(l)?;
                let slot = if *up_attention.get(level)? { 2 } else { 1 };
                format!(
                    "output_blocks.{}.{slot}.{}",
                    level * (lpb + 1) + lpb,
                    rest.join(".")
                )
            }
            _ => return None,
        }
        .trim_end_matches('.')
        .to_string(),
    )
}
