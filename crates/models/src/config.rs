//! Network configurations, as serde structs mirroring the `config.json` files of a diffusers
//! folder (`text_encoder/config.json`, `unet/config.json`, `vae/config.json`). Field names are
//! the reference's; defaults are diffusers' defaults, so a minimal file parses the same way.

use serde::{Deserialize, Serialize};

/// A value that a config may give once for all blocks or once per block.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum PerBlock {
    One(usize),
    Each(Vec<usize>),
}

impl PerBlock {
    /// The value for block `i` of `n`.
    pub fn get(&self, i: usize) -> usize {
        match self {
            PerBlock::One(v) => *v,
            PerBlock::Each(v) => v.get(i).copied().unwrap_or(*v.last().unwrap_or(&1)),
        }
    }
}

/// `transformers.CLIPTextConfig` (CLIPTextModel and CLIPTextModelWithProjection).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ClipTextConfig {
    #[serde(default = "clip_vocab")]
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    #[serde(default = "clip_positions")]
    pub max_position_embeddings: usize,
    #[serde(default = "quick_gelu")]
    pub hidden_act: String,
    #[serde(default = "eps_1e5")]
    pub layer_norm_eps: f64,
    /// Output size of `text_projection` (CLIPTextModelWithProjection only).
    #[serde(default)]
    pub projection_dim: Option<usize>,
    #[serde(default = "eos_id")]
    pub eos_token_id: u32,
}

/// `diffusers.UNet2DConditionModel` config (the fields SD 1.x, 2.x and SDXL use).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct UNetConfig {
    #[serde(default = "four")]
    pub in_channels: usize,
    #[serde(default = "four")]
    pub out_channels: usize,
    pub down_block_types: Vec<String>,
    pub up_block_types: Vec<String>,
    pub block_out_channels: Vec<usize>,
    #[serde(default = "two")]
    pub layers_per_block: usize,
    pub cross_attention_dim: usize,
    /// Legacy name: diffusers reads it as the number of heads when `num_attention_heads` is
    /// absent (true for every SD 1.x/2.x/XL config).
    #[serde(default = "heads_8")]
    pub attention_head_dim: PerBlock,
    #[serde(default)]
    pub num_attention_heads: Option<PerBlock>,
    #[serde(default = "one_per_block")]
    pub transformer_layers_per_block: PerBlock,
    #[serde(default)]
    pub use_linear_projection: bool,
    #[serde(default = "groups_32")]
    pub norm_num_groups: usize,
    #[serde(default = "eps_1e5")]
    pub norm_eps: f64,
    #[serde(default)]
    pub upcast_attention: bool,
    #[serde(default = "yes")]
    pub flip_sin_to_cos: bool,
    #[serde(default)]
    pub freq_shift: usize,
    /// `"text_time"` for SDXL: pooled text embedding and size/crop time ids.
    #[serde(default)]
    pub addition_embed_type: Option<String>,
    #[serde(default)]
    pub addition_time_embed_dim: Option<usize>,
    #[serde(default)]
    pub projection_class_embeddings_input_dim: Option<usize>,
    #[serde(default)]
    pub sample_size: Option<usize>,
}

impl UNetConfig {
    /// Heads of the attention layers in down block `i` (diffusers' legacy reading).
    pub fn heads(&self, i: usize) -> usize {
        self.num_attention_heads
            .as_ref()
            .unwrap_or(&self.attention_head_dim)
            .get(i)
    }

    /// True for SDXL-style added conditioning (pooled text + time ids).
    pub fn has_text_time(&self) -> bool {
        self.addition_embed_type.as_deref() == Some("text_time")
    }
}

/// `diffusers.AutoencoderKL` config.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct VaeConfig {
    #[serde(default = "three")]
    pub in_channels: usize,
    #[serde(default = "three")]
    pub out_channels: usize,
    pub block_out_channels: Vec<usize>,
    #[serde(default = "one")]
    pub layers_per_block: usize,
    #[serde(default = "four")]
    pub latent_channels: usize,
    #[serde(default = "groups_32")]
    pub norm_num_groups: usize,
    #[serde(default = "sd1_scaling")]
    pub scaling_factor: f64,
}

fn clip_vocab() -> usize {
    49408
}
fn clip_positions() -> usize {
    77
}
fn quick_gelu() -> String {
    "quick_gelu".into()
}
fn eps_1e5() -> f64 {
    1e-5
}
fn eos_id() -> u32 {
    49407
}
fn one() -> usize {
    1
}
fn two() -> usize {
    2
}
fn three() -> usize {
    3
}
fn four() -> usize {
    4
}
fn heads_8() -> PerBlock {
    PerBlock::One(8)
}
fn one_per_block() -> PerBlock {
    PerBlock::One(1)
}
fn groups_32() -> usize {
    32
}
fn yes() -> bool {
    true
}
fn sd1_scaling() -> f64 {
    0.18215
}
