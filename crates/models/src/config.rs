//! Network configurations, as serde structs mirroring the `config.json` files of a diffusers
//! folder (`text_encoder/config.json`, `unet/config.json`, `vae/config.json`). Field names are
//! the reference's; defaults are diffusers' defaults, so a minimal file parses the same way.

use serde::{Deserialize, Serialize};

/// A value that a config may give once for all blocks or once per block.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum PerBlock {
    /// The same value for every block.
    One(usize),
    /// One value per block.
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
    /// Tokens in the vocabulary.
    #[serde(default = "clip_vocab")]
    pub vocab_size: usize,
    /// Width of the hidden states.
    pub hidden_size: usize,
    /// Width of the MLP inside each layer.
    pub intermediate_size: usize,
    /// Transformer layers.
    pub num_hidden_layers: usize,
    /// Attention heads per layer.
    pub num_attention_heads: usize,
    /// Positions (tokens per prompt chunk, 77).
    #[serde(default = "clip_positions")]
    pub max_position_embeddings: usize,
    /// `quick_gelu` (CLIP ViT-L) or `gelu` (OpenCLIP).
    #[serde(default = "quick_gelu")]
    pub hidden_act: String,
    /// Epsilon of the layer norms.
    #[serde(default = "eps_1e5")]
    pub layer_norm_eps: f64,
    /// Output size of `text_projection` (CLIPTextModelWithProjection only).
    #[serde(default)]
    pub projection_dim: Option<usize>,
    /// Id of the end-of-text token, whose hidden state is pooled.
    #[serde(default = "eos_id")]
    pub eos_token_id: u32,
}

/// `diffusers.UNet2DConditionModel` config (the fields SD 1.x, 2.x and SDXL use).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct UNetConfig {
    /// Latent channels in (4; 9 for inpainting models).
    #[serde(default = "four")]
    pub in_channels: usize,
    /// Latent channels out.
    #[serde(default = "four")]
    pub out_channels: usize,
    /// Down blocks, by diffusers class name (`CrossAttnDownBlock2D`, `DownBlock2D`).
    pub down_block_types: Vec<String>,
    /// Up blocks, by diffusers class name (none in a ControlNet's config).
    #[serde(default)]
    pub up_block_types: Vec<String>,
    /// Channels of each resolution level.
    pub block_out_channels: Vec<usize>,
    /// ResNet blocks per down block (one more per up block).
    #[serde(default = "two")]
    pub layers_per_block: usize,
    /// Width of the text conditioning (768, 1024 or 2048).
    pub cross_attention_dim: usize,
    /// Legacy name: diffusers reads it as the number of heads when `num_attention_heads` is
    /// absent (true for every SD 1.x/2.x/XL config).
    #[serde(default = "heads_8")]
    pub attention_head_dim: PerBlock,
    /// Heads per attention layer, when the config names them so.
    #[serde(default)]
    pub num_attention_heads: Option<PerBlock>,
    /// Transformer blocks per attention layer (SDXL: 1, 2 and 10).
    #[serde(default = "one_per_block")]
    pub transformer_layers_per_block: PerBlock,
    /// Linear (SD 2.x, SDXL) rather than 1×1 convolution projections around the transformers.
    #[serde(default)]
    pub use_linear_projection: bool,
    /// Groups of the group norms.
    #[serde(default = "groups_32")]
    pub norm_num_groups: usize,
    /// Epsilon of the group norms.
    #[serde(default = "eps_1e5")]
    pub norm_eps: f64,
    /// Attention scores in fp32 (SD 2.x).
    #[serde(default)]
    pub upcast_attention: bool,
    /// Order of the timestep embedding's halves: cos then sin.
    #[serde(default = "yes")]
    pub flip_sin_to_cos: bool,
    /// Shift of the timestep embedding's frequencies.
    #[serde(default)]
    pub freq_shift: usize,
    /// `"text_time"` for SDXL: pooled text embedding and size/crop time ids.
    #[serde(default)]
    pub addition_embed_type: Option<String>,
    /// Width of each time id's embedding (SDXL: 256).
    #[serde(default)]
    pub addition_time_embed_dim: Option<usize>,
    /// Width of the pooled text embedding plus the time ids' embeddings (SDXL: 2816).
    #[serde(default)]
    pub projection_class_embeddings_input_dim: Option<usize>,
    /// Latent side the model was trained at.
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

    /// How many skip connections the down path makes: `conv_in`'s output, each down layer's,
    /// and each downsampler's (every level but the deepest has one).
    pub fn skip_connections(&self) -> usize {
        let levels = self.block_out_channels.len();
        1 + levels * self.layers_per_block + levels.saturating_sub(1)
    }
}

/// `diffusers.ControlNetModel` config: the UNet fields of its encoder half, plus the
/// conditioning image's embedding.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ControlNetConfig {
    /// The encoder half's configuration, under the UNet's field names.
    #[serde(flatten)]
    pub unet: UNetConfig,
    /// Channels of the conditioning image (3: RGB).
    #[serde(default = "three")]
    pub conditioning_channels: usize,
    /// Channels of the conditioning embedding's levels; each level after the first halves
    /// the image, so four levels take it to latent size.
    #[serde(default = "cond_embedding_channels")]
    pub conditioning_embedding_out_channels: Vec<usize>,
    /// `"rgb"`, or `"bgr"` for ControlNets trained on BGR images.
    #[serde(default = "rgb")]
    pub controlnet_conditioning_channel_order: String,
    /// Residuals averaged over the image (shuffle-style ControlNets).
    #[serde(default)]
    pub global_pool_conditions: bool,
}

/// `diffusers.AutoencoderKL` config.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct VaeConfig {
    /// Image channels in.
    #[serde(default = "three")]
    pub in_channels: usize,
    /// Image channels out.
    #[serde(default = "three")]
    pub out_channels: usize,
    /// Channels of each resolution level.
    pub block_out_channels: Vec<usize>,
    /// ResNet blocks per encoder block (one more per decoder block).
    #[serde(default = "one")]
    pub layers_per_block: usize,
    /// Latent channels.
    #[serde(default = "four")]
    pub latent_channels: usize,
    /// Groups of the group norms.
    #[serde(default = "groups_32")]
    pub norm_num_groups: usize,
    /// Latents are the encoder's output times this (SD: 0.18215, SDXL: 0.13025).
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
fn cond_embedding_channels() -> Vec<usize> {
    vec![16, 32, 96, 256]
}
fn rgb() -> String {
    "rgb".into()
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
