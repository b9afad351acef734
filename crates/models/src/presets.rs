//! Configurations of the released models, as in their diffusers `config.json` files
//! (stable-diffusion-v1-5, stable-diffusion-xl-base-1.0), and random-weight instances of them
//! for benchmarks: speed does not depend on weight values.

use std::collections::HashMap;
use std::path::PathBuf;

use candle_core::{DType, Device, Result, Tensor};
use candle_nn::{VarBuilder, VarMap};

use crate::checkpoint::{Component, Family, Prediction, SdWeights};
use crate::config::{ClipTextConfig, UNetConfig, VaeConfig};

fn parse<T: serde::de::DeserializeOwned>(json: &str) -> T {
    serde_json::from_str(json).expect("preset configs are valid")
}

/// `text_encoder/config.json` of SD 1.5 (OpenAI CLIP ViT-L/14).
pub fn sd15_text_encoder() -> ClipTextConfig {
    parse(
        r#"{"hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12, "num_attention_heads": 12}"#,
    )
}

/// `text_encoder_2/config.json` of SDXL base (OpenCLIP ViT-bigG/14 with projection).
pub fn sdxl_text_encoder_2() -> ClipTextConfig {
    parse(
        r#"{"hidden_size": 1280, "intermediate_size": 5120, "num_hidden_layers": 32, "num_attention_heads": 20, "hidden_act": "gelu", "projection_dim": 1280}"#,
    )
}

/// `unet/config.json` of SD 1.5.
pub fn sd15_unet() -> UNetConfig {
    parse(
        r#"{"layers_per_block": 2, "cross_attention_dim": 768, "attention_head_dim": 8,
      "block_out_channels": [320, 640, 1280, 1280],
      "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
      "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"]}"#,
    )
}

/// `unet/config.json` of SDXL base 1.0.
pub fn sdxl_unet() -> UNetConfig {
    parse(
        r#"{"layers_per_block": 2, "cross_attention_dim": 2048, "attention_head_dim": [5, 10, 20],
      "block_out_channels": [320, 640, 1280], "transformer_layers_per_block": [1, 2, 10],
      "use_linear_projection": true, "addition_embed_type": "text_time", "addition_time_embed_dim": 256,
      "projection_class_embeddings_input_dim": 2816,
      "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
      "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"]}"#,
    )
}

/// `vae/config.json` of SD 1.5 / SDXL (same architecture, different scaling).
pub fn sd_vae(scaling_factor: f64) -> VaeConfig {
    let mut cfg: VaeConfig =
        parse(r#"{"block_out_channels": [128, 256, 512, 512], "layers_per_block": 2}"#);
    cfg.scaling_factor = scaling_factor;
    cfg
}

/// The weights a network creates when `build` makes it over a `VarMap` (random init), as plain
/// tensors: detached, since a `Var` would make every op record its inputs, keep all activations
/// of a whole sampling run alive, and keep sdkube's GPU kernels out (as loaded weights do not).
pub fn random_tensors<E>(
    dtype: DType,
    device: &Device,
    build: impl FnOnce(VarBuilder) -> std::result::Result<(), E>,
) -> std::result::Result<HashMap<String, Tensor>, E> {
    let varmap = VarMap::new();
    build(VarBuilder::from_varmap(&varmap, dtype, device))?;
    let tensors = varmap.data().lock().expect("varmap lock");
    Ok(tensors
        .iter()
        .map(|(k, v)| (k.clone(), v.as_tensor().detach()))
        .collect())
}

/// Weights of one network with random values ([`random_tensors`]).
fn random<C>(
    config: C,
    dtype: DType,
    device: &Device,
    build: impl Fn(VarBuilder, &C) -> Result<()>,
) -> Result<Component<C>> {
    let tensors = random_tensors(dtype, device, |vb| build(vb, &config))?;
    Ok(Component { config, tensors })
}

/// A full-size SD 1.5 or SDXL UNet with random weights (on `device`, in `dtype`).
pub fn random_unet(family: Family, dtype: DType, device: &Device) -> Result<Component<UNetConfig>> {
    let cfg = match family {
        Family::Sdxl => sdxl_unet(),
        _ => sd15_unet(),
    };
    random(cfg, dtype, device, |vb, c| {
        crate::unet::UNet2DConditionModel::new(vb, c).map(|_| ())
    })
}

/// A full-size ControlNet for the SD 1.5 / SDXL UNet with random weights (on `device`, in
/// `dtype`), as diffusers' `ControlNetModel.from_unet` shapes it.
pub fn random_controlnet(
    family: Family,
    dtype: DType,
    device: &Device,
) -> Result<Component<crate::config::ControlNetConfig>> {
    let unet = match family {
        Family::Sdxl => sdxl_unet(),
        _ => sd15_unet(),
    };
    let cfg = crate::config::ControlNetConfig {
        unet,
        conditioning_channels: 3,
        conditioning_embedding_out_channels: vec![16, 32, 96, 256],
        controlnet_conditioning_channel_order: "rgb".into(),
        global_pool_conditions: false,
    };
    random(cfg, dtype, device, |vb, c| {
        crate::controlnet::ControlNetModel::new(vb, c).map(|_| ())
    })
}

/// The SD 1.5 / SDXL VAE with random weights (on `device`, in `dtype`).
pub fn random_vae(family: Family, dtype: DType, device: &Device) -> Result<Component<VaeConfig>> {
    let scaling = match family {
        Family::Sdxl => 0.13025,
        _ => 0.18215,
    };
    random(sd_vae(scaling), dtype, device, |vb, c| {
        crate::vae::AutoencoderKL::new(vb, c).map(|_| ())
    })
}

/// A full-size SD 1.5 or SDXL model with random weights (on `device`, in `dtype`).
pub fn random_model(family: Family, dtype: DType, device: &Device) -> Result<SdWeights> {
    let clip = |cfg: ClipTextConfig| {
        random(cfg, dtype, device, |vb, c| {
            crate::clip::ClipTextModel::new(vb, c).map(|_| ())
        })
    };
    let text_encoder_2 = match family {
        Family::Sdxl => {
            // The network only creates its projection when the weights have one (plain
            // CLIPTextModel configs carry a projection_dim too), so add it here.
            let mut clip_g = clip(sdxl_text_encoder_2())?;
            let projection =
                candle_core::Tensor::randn(0f32, 0.02, (1280, 1280), device)?.to_dtype(dtype)?;
            clip_g
                .tensors
                .insert("text_projection.weight".into(), projection);
            Some(clip_g)
        }
        _ => None,
    };
    Ok(SdWeights {
        family,
        prediction: Prediction::Epsilon,
        text_encoder: clip(sd15_text_encoder())?,
        text_encoder_2,
        unet: random_unet(family, dtype, device)?,
        vae: random_vae(family, dtype, device)?,
        source: PathBuf::from(format!("random {}", family.name())),
        unet_stacks: Default::default(),
    })
}
