//! `diffusers.UNet2DConditionModel` for SD 1.x, SD 2.x and SDXL (Rombach et al. 2022,
//! <https://arxiv.org/abs/2112.10752>; Podell et al. 2023, <https://arxiv.org/abs/2307.01952>).
//!
//! Unlike candle-transformers' UNet, this one implements SDXL's added conditioning
//! (`addition_embed_type = "text_time"`): the pooled text embedding and the size/crop time ids
//! are embedded and added to the timestep embedding, as the reference does.

use candle_core::{Module, Result, Tensor, D};
use candle_nn::{Conv2dConfig, VarBuilder};

use sdkube_nn::{
    add, cat_channels, conv1x1, conv2d, conv3x3, from_nhwc, geglu, group_norm, is_channels_last,
    linear, Conv2d, GroupNorm, LayerNorm, Linear,
};

use crate::blocks::{
    fuse_self_attentions_on, Attention, ContextProjections, CrossContext, Downsample2D,
    ProjectionStacks, ResnetBlock2D, TimeEmbedding, TimeProjections, Upsample2D,
};
use crate::config::UNetConfig;

mod step_cache;
pub use step_cache::{StepCache, StepCaching};

/// Sinusoidal embedding of `t` `[B]` into `[B, dim]` (`diffusers.models.embeddings.Timesteps`).
pub fn timestep_embedding(
    t: &Tensor,
    dim: usize,
    flip_sin_to_cos: bool,
    shift: f64,
) -> Result<Tensor> {
    let half = dim / 2;
    let exponent: Vec<f32> = (0..half)
        .map(|i| (-(10000f64.ln()) * i as f64 / (half as f64 - shift)).exp() as f32)
        .collect();
    let freqs = Tensor::from_vec(exponent, (1, half), t.device())?;
    let args = t
        .to_dtype(candle_core::DType::F32)?
        .unsqueeze(1)?
        .broadcast_mul(&freqs)?;
    let (sin, cos) = (args.sin()?, args.cos()?);
    if flip_sin_to_cos {
        Tensor::cat(&[cos, sin], D::Minus1)
    } else {
        Tensor::cat(&[sin, cos], D::Minus1)
    }
}

/// `TimestepEmbedding`: linear, SiLU, linear.
#[derive(Debug)]
struct TimestepEmbedding {
    linear_1: Linear,
    linear_2: Linear,
}

impl TimestepEmbedding {
    fn new(vb: VarBuilder, cin: usize, cout: usize) -> Result<Self> {
        Ok(Self {
            linear_1: linear(cin, cout, vb.pp("linear_1"))?,
            linear_2: linear(cout, cout, vb.pp("linear_2"))?,
        })
    }

    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        self.linear_2.forward(&self.linear_1.forward(xs)?.silu()?)
    }
}

/// `FeedForward` with GEGLU activation.
#[derive(Debug)]
struct FeedForward {
    proj_in: Linear,
    proj_out: Linear,
}

impl FeedForward {
    fn new(vb: VarBuilder, dim: usize) -> Result<Self> {
        let inner = dim * 4;
        Ok(Self {
            proj_in: linear(dim, inner * 2, vb.pp("net.0.proj"))?,
            proj_out: linear(inner, dim, vb.pp("net.2"))?,
        })
    }

    /// `forward(xs) + residual`, the add in the last projection's epilogue on GPUs.
    fn forward_add(&self, xs: &Tensor, residual: &Tensor) -> Result<Tensor> {
        let h = self.proj_in.forward(xs)?;
        let gated = geglu(&h)?;
        drop(h); // the widest tensor of the block: gone before the next product
        self.proj_out.forward_add(&gated, residual)
    }
}

/// Which attention of each transformer block.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum AttentionKind {
    /// Over the block's own tokens.
    SelfAttention,
    /// Over the text context.
    Cross,
}

/// `BasicTransformerBlock`: self-attention, cross-attention, GEGLU feed-forward, pre-norm.
#[derive(Debug)]
struct BasicTransformerBlock {
    norm1: LayerNorm,
    attn1: Attention,
    norm2: LayerNorm,
    attn2: Attention,
    norm3: LayerNorm,
    ff: FeedForward,
}

impl BasicTransformerBlock {
    fn new(vb: VarBuilder, dim: usize, ctx_dim: usize, heads: usize, upcast: bool) -> Result<Self> {
        let head_dim = dim / heads;
        Ok(Self {
            norm1: LayerNorm::new(dim, 1e-5, vb.pp("norm1"))?,
            attn1: Attention::new(vb.pp("attn1"), dim, dim, heads, head_dim, false, upcast)?,
            norm2: LayerNorm::new(dim, 1e-5, vb.pp("norm2"))?,
            attn2: Attention::new(vb.pp("attn2"), dim, ctx_dim, heads, head_dim, false, upcast)?,
            norm3: LayerNorm::new(dim, 1e-5, vb.pp("norm3"))?,
            ff: FeedForward::new(vb.pp("ff"), dim)?,
        })
    }

    fn attention_mut(&mut self, kind: AttentionKind) -> &mut Attention {
        match kind {
            AttentionKind::SelfAttention => &mut self.attn1,
            AttentionKind::Cross => &mut self.attn2,
        }
    }

    fn forward(&self, xs: &Tensor, ctx: &CrossContext) -> Result<Tensor> {
        // Reassigned, not shadowed: each residual sum is freed once the next exists. Each
        // residual add happens in the epilogue of the product before it (on GPUs).
        let mut h = self.attn1.forward_add(&self.norm1.forward(xs)?, None, xs)?;
        h = self
            .attn2
            .forward_add(&self.norm2.forward(&h)?, Some(ctx), &h)?;
        self.ff.forward_add(&self.norm3.forward(&h)?, &h)
    }
}

/// Input/output projection of `Transformer2DModel`: a 1×1 conv (SD 1.x) or a linear layer over
/// the flattened tokens (`use_linear_projection`: SD 2.x, SDXL).
#[derive(Debug)]
enum Projection {
    Conv(Conv2d),
    Linear(Linear),
}

/// `Transformer2DModel`: group norm, projection in, transformer blocks, projection out, residual.
#[derive(Debug)]
struct Transformer2DModel {
    norm: GroupNorm,
    proj_in: Projection,
    blocks: Vec<BasicTransformerBlock>,
    proj_out: Projection,
}

impl Transformer2DModel {
    fn new(
        vb: VarBuilder,
        channels: usize,
        layers: usize,
        heads: usize,
        cfg: &UNetConfig,
    ) -> Result<Self> {
        let proj = |name: &str| -> Result<Projection> {
            Ok(if cfg.use_linear_projection {
                Projection::Linear(linear(channels, channels, vb.pp(name))?)
            } else {
                Projection::Conv(conv1x1(channels, channels, vb.pp(name))?)
            })
        };
        Ok(Self {
            norm: group_norm(cfg.norm_num_groups, channels, 1e-6, vb.pp("norm"))?,
            proj_in: proj("proj_in")?,
            blocks: (0..layers)
                .map(|i| {
                    BasicTransformerBlock::new(
                        vb.pp(format!("transformer_blocks.{i}")),
                        channels,
                        cfg.cross_attention_dim,
                        heads,
                        cfg.upcast_attention,
                    )
                })
                .collect::<Result<_>>()?,
            proj_out: proj("proj_out")?,
        })
    }

    fn forward(&self, xs: &Tensor, ctx: &CrossContext) -> Result<Tensor> {
        let (b, c, h, w) = xs.dims4()?;
        let normed = self.norm.forward(xs)?;
        let to_tokens =
            |t: Tensor| -> Result<Tensor> { t.permute((0, 2, 3, 1))?.reshape((b, h * w, c)) };
        let mut tokens = match &self.proj_in {
            Projection::Conv(conv) => to_tokens(conv.forward(&normed)?)?,
            Projection::Linear(lin) => lin.forward(&to_tokens(normed)?)?,
        };
        for block in &self.blocks {
            tokens = block.forward(&tokens, ctx)?;
        }
        let to_image = |t: Tensor| -> Result<Tensor> { from_nhwc(&t.reshape((b, h, w, c))?) };
        match &self.proj_out {
            Projection::Conv(conv) => conv.forward_add(&to_image(tokens)?, xs),
            // Channels-last, the input's tokens are a free view: the residual add goes into
            // the projection's epilogue.
            Projection::Linear(lin) if is_channels_last(xs) => {
                to_image(lin.forward_add(&tokens, &to_tokens(xs.clone())?)?)
            }
            Projection::Linear(lin) => add(&to_image(lin.forward(&tokens)?)?, xs),
        }
    }

    fn attentions_mut(&mut self, kind: AttentionKind) -> impl Iterator<Item = &mut Attention> {
        self.blocks
            .iter_mut()
            .map(move |block| block.attention_mut(kind))
    }
}

/// One resolution level: resnets, optional cross-attention transformers, optional resampler.
#[derive(Debug)]
struct Level {
    resnets: Vec<ResnetBlock2D>,
    attentions: Vec<Transformer2DModel>,
}

impl Level {
    fn run_layer(
        &self,
        j: usize,
        xs: &Tensor,
        temb: &TimeEmbedding,
        ctx: &CrossContext,
    ) -> Result<Tensor> {
        let xs = self.resnets[j].forward(xs, Some(temb))?;
        match self.attentions.get(j) {
            Some(attn) => attn.forward(&xs, ctx),
            None => Ok(xs),
        }
    }

    fn attentions_mut(&mut self, kind: AttentionKind) -> impl Iterator<Item = &mut Attention> {
        self.attentions
            .iter_mut()
            .flat_map(move |t| t.attentions_mut(kind))
    }
}

#[derive(Debug)]
struct DownBlock {
    level: Level,
    downsampler: Option<Downsample2D>,
}

#[derive(Debug)]
struct UpBlock {
    level: Level,
    upsampler: Option<Upsample2D>,
}

/// Conditioning beyond the text hidden states, for SDXL.
#[derive(Debug, Clone)]
pub struct AddedConditioning {
    /// Pooled, projected text embedding of the second text encoder `[B, P]`.
    pub text_embeds: Tensor,
    /// `[B, 6]`: original height/width, crop top/left, target height/width.
    pub time_ids: Tensor,
}

/// What a ControlNet adds to the UNet: one residual per skip connection (in the order the
/// down path makes them) and one for the mid block's output.
#[derive(Debug, Clone)]
pub struct ControlResiduals {
    /// `[B, C, H, W]` each, one per skip connection.
    pub down: Vec<Tensor>,
    /// Added to the mid block's output.
    pub mid: Tensor,
}

/// The UNet's first half, which a ControlNet copies (same keys): the input convolution, the
/// time embedding (and SDXL's added one), the down blocks and the mid block.
#[derive(Debug)]
pub(crate) struct Encoder {
    conv_in: Conv2d,
    time_embedding: TimestepEmbedding,
    add_embedding: Option<TimestepEmbedding>,
    down_blocks: Vec<DownBlock>,
    mid_resnets: [ResnetBlock2D; 2],
    mid_attention: Transformer2DModel,
    cfg: UNetConfig,
}

/// One UNet call's inputs.
struct Inputs<'a> {
    xs: &'a Tensor,
    t: &'a Tensor,
    ctx: &'a Tensor,
    added: Option<&'a AddedConditioning>,
    control: Option<&'a ControlResiduals>,
}

impl<'a> Inputs<'a> {
    /// As a CUDA graph's inputs: the latents, timestep and context, SDXL's added conditioning,
    /// then `kept` (a shallow step's features, see `step_cache.rs`).
    fn tensors(&self, kept: Option<&'a Tensor>) -> Vec<&'a Tensor> {
        let mut tensors = vec![self.xs, self.t, self.ctx];
        if let Some(a) = self.added {
            tensors.extend([&a.text_embeds, &a.time_ids]);
        }
        tensors.extend(kept);
        tensors
    }

    /// Back from a graph's inputs (those of [`tensors`](Self::tensors) before `kept`), with
    /// `added` made of them ([`added_of`]).
    fn of_graph(x: &'a [Tensor], added: Option<&'a AddedConditioning>) -> Self {
        Self {
            xs: &x[0],
            t: &x[1],
            ctx: &x[2],
            added,
            control: None,
        }
    }
}

/// SDXL's added conditioning among a graph's inputs ([`Inputs::tensors`], `kept` left out).
fn added_of(x: &[Tensor]) -> Option<AddedConditioning> {
    match x {
        [_, _, _, text_embeds, time_ids] => Some(AddedConditioning {
            text_embeds: text_embeds.clone(),
            time_ids: time_ids.clone(),
        }),
        _ => None,
    }
}

/// The denoising UNet.
#[derive(Debug)]
pub struct UNet2DConditionModel {
    encoder: Encoder,
    up_blocks: Vec<UpBlock>,
    conv_norm_out: GroupNorm,
    conv_out: Conv2d,
    cfg: UNetConfig,
    /// Tells it from every other UNet of the process (step caching reuses only its own
    /// features).
    id: u64,
    /// Its steps as CUDA graphs, per input shapes (ControlNet steps run eagerly).
    graphs: sdkube_nn::GraphCache,
    /// Its cross-attentions' keys and values, projected at once per pass (on GPUs).
    projections: ContextProjections,
    /// Its ResNet blocks' time projections, at once per pass (on GPUs).
    time_projections: TimeProjections,
}

fn has_cross_attention(block_type: &str) -> bool {
    block_type.starts_with("CrossAttn")
}

/// The `attentions.{j}` of a block of type `kind` at resolution `level` (none for plain
/// `DownBlock2D`/`UpBlock2D`); depth and heads are the level's, as diffusers reads them.
fn cross_attentions(
    vb: &VarBuilder,
    kind: &str,
    count: usize,
    channels: usize,
    level: usize,
    cfg: &UNetConfig,
) -> Result<Vec<Transformer2DModel>> {
    if !has_cross_attention(kind) {
        return Ok(vec![]);
    }
    (0..count)
        .map(|j| {
            Transformer2DModel::new(
                vb.pp(format!("attentions.{j}")),
                channels,
                cfg.transformer_layers_per_block.get(level),
                cfg.heads(level),
                cfg,
            )
        })
        .collect()
}

impl Encoder {
    /// The encoder half, its weights from `vb` under diffusers' key names.
    pub(crate) fn new(vb: &VarBuilder, cfg: &UNetConfig) -> Result<Self> {
        let boc = &cfg.block_out_channels;
        let n = boc.len();
        if boc.is_empty() || cfg.down_block_types.len() != n {
            candle_core::bail!("unet config: down_block_types do not match block_out_channels");
        }
        let temb_dim = boc[0] * 4;
        let groups = cfg.norm_num_groups;
        let eps = cfg.norm_eps;
        let conv_in = conv2d(
            cfg.in_channels,
            boc[0],
            3,
            Conv2dConfig {
                padding: 1,
                ..Default::default()
            },
            vb.pp("conv_in"),
        )?;
        let time_embedding = TimestepEmbedding::new(vb.pp("time_embedding"), boc[0], temb_dim)?;
        let add_embedding = if cfg.has_text_time() {
            let input = cfg.projection_class_embeddings_input_dim.ok_or_else(|| {
                candle_core::Error::Msg(
                    "text_time unet without projection_class_embeddings_input_dim".into(),
                )
            })?;
            Some(TimestepEmbedding::new(
                vb.pp("add_embedding"),
                input,
                temb_dim,
            )?)
        } else {
            None
        };

        let mut down_blocks = Vec::with_capacity(n);
        let mut out_ch = boc[0];
        for (i, kind) in cfg.down_block_types.iter().enumerate() {
            let in_ch = out_ch;
            out_ch = boc[i];
            let vb = vb.pp(format!("down_blocks.{i}"));
            let resnets = (0..cfg.layers_per_block)
                .map(|j| {
                    let cin = if j == 0 { in_ch } else { out_ch };
                    ResnetBlock2D::new(
                        vb.pp(format!("resnets.{j}")),
                        cin,
                        out_ch,
                        Some(temb_dim),
                        groups,
                        eps,
                    )
                })
                .collect::<Result<_>>()?;
            let attentions = cross_attentions(&vb, kind, cfg.layers_per_block, out_ch, i, cfg)?;
            let downsampler = if i + 1 < n {
                Some(Downsample2D::new(vb.pp("downsamplers.0"), out_ch, false)?)
            } else {
                None
            };
            down_blocks.push(DownBlock {
                level: Level {
                    resnets,
                    attentions,
                },
                downsampler,
            });
        }

        let mid_ch = boc[n - 1];
        let mvb = vb.pp("mid_block");
        let mid_resnets = [
            ResnetBlock2D::new(
                mvb.pp("resnets.0"),
                mid_ch,
                mid_ch,
                Some(temb_dim),
                groups,
                eps,
            )?,
            ResnetBlock2D::new(
                mvb.pp("resnets.1"),
                mid_ch,
                mid_ch,
                Some(temb_dim),
                groups,
                eps,
            )?,
        ];
        let mid_attention = Transformer2DModel::new(
            mvb.pp("attentions.0"),
            mid_ch,
            cfg.transformer_layers_per_block.get(n - 1),
            cfg.heads(n - 1),
            cfg,
        )?;
        Ok(Self {
            conv_in,
            time_embedding,
            add_embedding,
            down_blocks,
            mid_resnets,
            mid_attention,
            cfg: cfg.clone(),
        })
    }

    /// The timestep embedding (plus SDXL's added conditioning) for a batch of `b`.
    pub(crate) fn embedding(
        &self,
        t: &Tensor,
        added: Option<&AddedConditioning>,
        b: usize,
        dtype: candle_core::DType,
    ) -> Result<Tensor> {
        let t = t.flatten_all()?.to_dtype(candle_core::DType::F32)?;
        let t = if t.dim(0)? == b {
            t
        } else {
            t.broadcast_as(b)?.contiguous()?
        };
        let t_emb = timestep_embedding(
            &t,
            self.cfg.block_out_channels[0],
            self.cfg.flip_sin_to_cos,
            self.cfg.freq_shift as f64,
        )?
        .to_dtype(dtype)?;
        let mut emb = self.time_embedding.forward(&t_emb)?;
        if let Some(add_embedding) = &self.add_embedding {
            let added = added.ok_or_else(|| {
                candle_core::Error::Msg(
                    "this UNet (SDXL) needs the pooled text embedding and time ids".into(),
                )
            })?;
            let dim = self.cfg.addition_time_embed_dim.unwrap_or(256);
            let ids = added.time_ids.flatten_all()?;
            let time_embeds = timestep_embedding(&ids, dim, true, 0.0)?
                .reshape((b, ()))?
                .to_dtype(dtype)?;
            let add = Tensor::cat(
                &[added.text_embeds.to_dtype(dtype)?, time_embeds],
                D::Minus1,
            )?;
            emb = (emb + add_embedding.forward(&add)?)?;
        }
        Ok(emb)
    }

    /// `conv_in` of `xs`.
    pub(crate) fn conv_in(&self, xs: &Tensor) -> Result<Tensor> {
        self.conv_in.forward(xs)
    }

    /// The down blocks from `h` (after `conv_in`): the mid block's input and every skip
    /// connection, `h` itself first.
    pub(crate) fn down(
        &self,
        h: Tensor,
        emb: &TimeEmbedding,
        ctx: &CrossContext,
    ) -> Result<(Tensor, Vec<Tensor>)> {
        self.down_to(h, emb, ctx, usize::MAX)
    }

    /// [`down`](Self::down), stopped once `count` skip connections are made.
    pub(crate) fn down_to(
        &self,
        mut h: Tensor,
        emb: &TimeEmbedding,
        ctx: &CrossContext,
        count: usize,
    ) -> Result<(Tensor, Vec<Tensor>)> {
        let mut skips = vec![h.clone()];
        for block in &self.down_blocks {
            for j in 0..block.level.resnets.len() {
                if skips.len() >= count {
                    return Ok((h, skips));
                }
                h = block.level.run_layer(j, &h, emb, ctx)?;
                skips.push(h.clone());
            }
            if let Some(down) = &block.downsampler {
                if skips.len() >= count {
                    return Ok((h, skips));
                }
                h = down.forward(&h)?;
                skips.push(h.clone());
            }
        }
        Ok((h, skips))
    }

    /// The mid block.
    pub(crate) fn mid(
        &self,
        h: &Tensor,
        emb: &TimeEmbedding,
        ctx: &CrossContext,
    ) -> Result<Tensor> {
        let h = self.mid_resnets[0].forward(h, Some(emb))?;
        let h = self.mid_attention.forward(&h, ctx)?;
        self.mid_resnets[1].forward(&h, Some(emb))
    }

    /// Its ResNet blocks: the down blocks', then the mid block's.
    pub(crate) fn resnets_mut(&mut self) -> impl Iterator<Item = &mut ResnetBlock2D> {
        self.down_blocks
            .iter_mut()
            .flat_map(|block| block.level.resnets.iter_mut())
            .chain(self.mid_resnets.iter_mut())
    }

    /// Its attentions of one kind: the down blocks', then the mid block's.
    pub(crate) fn attentions_mut(
        &mut self,
        kind: AttentionKind,
    ) -> impl Iterator<Item = &mut Attention> {
        self.down_blocks
            .iter_mut()
            .flat_map(move |block| block.level.attentions_mut(kind))
            .chain(self.mid_attention.attentions_mut(kind))
    }
}

impl UNet2DConditionModel {
    /// The UNet, its weights from `vb` under diffusers' key names.
    pub fn new(vb: VarBuilder, cfg: &UNetConfig) -> Result<Self> {
        Self::new_sharing(vb, cfg, &ProjectionStacks::default())
    }

    /// [`new`](Self::new) from weights whose self-attention projections are views into
    /// `stacks` ([`ProjectionStacks::stack_on`]): on GPUs its fused projections are those
    /// stacks, not copies.
    pub fn new_sharing(
        vb: VarBuilder,
        cfg: &UNetConfig,
        stacks: &ProjectionStacks,
    ) -> Result<Self> {
        let boc = &cfg.block_out_channels;
        let n = boc.len();
        if cfg.down_block_types.len() != n || cfg.up_block_types.len() != n {
            candle_core::bail!("unet config: block type lists do not match block_out_channels");
        }
        let encoder = Encoder::new(&vb, cfg)?;
        let temb_dim = boc[0] * 4;
        let groups = cfg.norm_num_groups;
        let eps = cfg.norm_eps;

        let mut up_blocks = Vec::with_capacity(n);
        let rev: Vec<usize> = boc.iter().rev().copied().collect();
        let mut out_ch = rev[0];
        for (i, kind) in cfg.up_block_types.iter().enumerate() {
            let prev_out = out_ch;
            out_ch = rev[i];
            let in_ch = rev[(i + 1).min(n - 1)];
            let level_index = n - 1 - i; // the down level this up block mirrors
            let layers = cfg.layers_per_block + 1;
            let vb = vb.pp(format!("up_blocks.{i}"));
            let resnets = (0..layers)
                .map(|j| {
                    let skip = if j == layers - 1 { in_ch } else { out_ch };
                    let cin = if j == 0 { prev_out } else { out_ch };
                    ResnetBlock2D::new(
                        vb.pp(format!("resnets.{j}")),
                        cin + skip,
                        out_ch,
                        Some(temb_dim),
                        groups,
                        eps,
                    )
                })
                .collect::<Result<_>>()?;
            let attentions = cross_attentions(&vb, kind, layers, out_ch, level_index, cfg)?;
            let upsampler = if i + 1 < n {
                Some(Upsample2D::new(vb.pp("upsamplers.0"), out_ch)?)
            } else {
                None
            };
            up_blocks.push(UpBlock {
                level: Level {
                    resnets,
                    attentions,
                },
                upsampler,
            });
        }

        let mut unet = Self {
            encoder,
            up_blocks,
            conv_norm_out: group_norm(groups, boc[0], eps, vb.pp("conv_norm_out"))?,
            conv_out: conv3x3(boc[0], cfg.out_channels, 1, vb.pp("conv_out"))?,
            cfg: cfg.clone(),
            id: step_cache::new_unet_id(),
            graphs: Default::default(),
            projections: Default::default(),
            time_projections: Default::default(),
        };
        let cross = unet.attentions_mut(AttentionKind::Cross);
        unet.projections = ContextProjections::gather_on(vb.device(), cross)?;
        unet.time_projections = TimeProjections::gather_on(vb.device(), unet.resnets_mut())?;
        let self_attentions = unet.attentions_mut(AttentionKind::SelfAttention);
        fuse_self_attentions_on(vb.device(), self_attentions, stacks)?;
        Ok(unet)
    }

    /// Its ResNet blocks: the encoder's, then the up blocks'.
    fn resnets_mut(&mut self) -> impl Iterator<Item = &mut ResnetBlock2D> {
        let up = self
            .up_blocks
            .iter_mut()
            .flat_map(|block| block.level.resnets.iter_mut());
        self.encoder.resnets_mut().chain(up)
    }

    /// Its attentions of one kind: the encoder's, then the up blocks'.
    fn attentions_mut(&mut self, kind: AttentionKind) -> impl Iterator<Item = &mut Attention> {
        let up = self
            .up_blocks
            .iter_mut()
            .flat_map(move |block| block.level.attentions_mut(kind));
        self.encoder.attentions_mut(kind).chain(up)
    }

    /// Its configuration.
    pub fn config(&self) -> &UNetConfig {
        &self.cfg
    }

    /// Predicts the noise (or v) for latents `xs` `[B, C, H, W]` at timestep `t` (a scalar or
    /// `[B]`), conditioned on `ctx` `[B, N, cross_attention_dim]`; SDXL also needs `added`.
    pub fn forward(
        &self,
        xs: &Tensor,
        t: &Tensor,
        ctx: &Tensor,
        added: Option<&AddedConditioning>,
    ) -> Result<Tensor> {
        let inputs = Inputs {
            xs,
            t,
            ctx,
            added,
            control: None,
        };
        self.graphs.run(&inputs.tensors(None), &|x| {
            let added = added_of(x);
            Ok(self.pass(&Inputs::of_graph(x, added.as_ref()), None)?.0)
        })
    }

    /// [`forward`](Self::forward) with a ControlNet's residuals added to the skip connections
    /// and to the mid block's output.
    pub fn forward_with_control(
        &self,
        xs: &Tensor,
        t: &Tensor,
        ctx: &Tensor,
        added: Option<&AddedConditioning>,
        control: Option<&ControlResiduals>,
    ) -> Result<Tensor> {
        let Some(control) = control else {
            return self.forward(xs, t, ctx, added);
        };
        let inputs = Inputs {
            xs,
            t,
            ctx,
            added,
            control: Some(control),
        };
        Ok(self.pass(&inputs, None)?.0)
    }

    /// One pass, run eagerly; where `keep` names an up layer (see [`up`](Self::up)), its input
    /// too.
    fn pass(&self, i: &Inputs<'_>, keep: Option<usize>) -> Result<(Tensor, Option<Tensor>)> {
        let (emb, ctx) = self.conditioning(i)?;
        let (emb, ctx) = (&emb, &ctx);
        let h = self.encoder.conv_in(i.xs)?;
        let (h, mut skips) = self.encoder.down(h, emb, ctx)?;
        let mut h = self.encoder.mid(&h, emb, ctx)?;
        if let Some(control) = i.control {
            self.add_control(&mut skips, control)?;
            h = add(&h, &control.mid)?;
        }
        self.up(h, skips, emb, ctx, 0, keep)
    }

    /// The time embedding and the text context as every block of a pass reads them.
    fn conditioning(&self, i: &Inputs<'_>) -> Result<(TimeEmbedding, CrossContext)> {
        let emb = self
            .encoder
            .embedding(i.t, i.added, i.xs.dim(0)?, i.xs.dtype())?;
        Ok((
            self.time_projections.project(&emb)?,
            self.projections.project(i.ctx)?,
        ))
    }

    /// Adds a ControlNet's residuals to the skip connections made so far (all of them, or the
    /// first few in a shallow step).
    fn add_control(&self, skips: &mut [Tensor], control: &ControlResiduals) -> Result<()> {
        let count = self.cfg.skip_connections();
        if control.down.len() != count {
            candle_core::bail!(
                "the ControlNet gives {} residuals, the UNet has {count} skip connections",
                control.down.len(),
            );
        }
        for (skip, residual) in skips.iter_mut().zip(&control.down) {
            *skip = add(skip, residual)?;
        }
        Ok(())
    }

    /// The up path on `h` from its layer `first`, then the output convolution. Up layers are
    /// counted over every up block in order; each joins the last of `skips` to its input
    /// (layer 0 joins the deepest skip connection). Where `keep` names a layer, its input
    /// (before the join) is returned too.
    fn up(
        &self,
        mut h: Tensor,
        mut skips: Vec<Tensor>,
        emb: &TimeEmbedding,
        ctx: &CrossContext,
        first: usize,
        keep: Option<usize>,
    ) -> Result<(Tensor, Option<Tensor>)> {
        let mut kept = None;
        let mut layer = 0;
        for block in &self.up_blocks {
            let layers = block.level.resnets.len();
            if layer + layers <= first {
                layer += layers; // the whole block is before `first`, its upsampler too
                continue;
            }
            for j in 0..layers {
                if layer + j < first {
                    continue;
                }
                if keep == Some(layer + j) {
                    kept = Some(h.clone());
                }
                let skip = skips
                    .pop()
                    .ok_or_else(|| candle_core::Error::Msg("unet skip underflow".into()))?;
                h = cat_channels(&[&h, &skip])?;
                h = block.level.run_layer(j, &h, emb, ctx)?;
            }
            layer += layers;
            if let Some(up) = &block.upsampler {
                // Upsample to the size of the next skip connection (odd latent sizes).
                let size = skips
                    .last()
                    .map(|s| (s.dim(2).unwrap_or(0), s.dim(3).unwrap_or(0)));
                h = up.forward(&h, size)?;
            }
        }
        let out = self
            .conv_out
            .forward(&self.conv_norm_out.forward_silu(&h)?)?;
        Ok((out, kept))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{DType, Device};

    /// Gathered as on GPUs (here on the CPU), every cross-attention of the down, mid and up
    /// blocks reads its own keys and values from the batched products: the prediction is the
    /// one each attention's own projections give.
    #[test]
    fn a_unet_with_gathered_projections_predicts_the_same() -> Result<()> {
        let dir = sdkube_testkit::fixtures().join("sd/sd1");
        let weights = crate::load(&dir, &Default::default()).unwrap().unet;
        let dev = Device::Cpu;
        let plain = weights.build(&dev, DType::F32)?;
        let mut gathered = weights.build(&dev, DType::F32)?;
        gathered.projections =
            ContextProjections::gather(gathered.attentions_mut(AttentionKind::Cross))?;

        let cfg = plain.config();
        let levels = cfg.block_out_channels.len();
        let depth = |level: usize| cfg.transformer_layers_per_block.get(level);
        let crossed = |kinds: &[String], layers: usize, level_of: &dyn Fn(usize) -> usize| {
            let with_cross = kinds
                .iter()
                .enumerate()
                .filter(|(_, k)| has_cross_attention(k));
            with_cross
                .map(|(i, _)| layers * depth(level_of(i)))
                .sum::<usize>()
        };
        let expected = crossed(&cfg.down_block_types, cfg.layers_per_block, &|i| i)
            + depth(levels - 1)
            + crossed(&cfg.up_block_types, cfg.layers_per_block + 1, &|i| {
                levels - 1 - i
            });
        assert!(expected > 0);
        assert_eq!(gathered.projections.attentions(), expected);

        assert_same_prediction(&plain, &gathered)
    }

    /// Fused as on GPUs (here on the CPU), every self-attention runs one q/k/v product and
    /// reads its slices of it in place: the prediction is the one the three products give.
    #[test]
    fn a_unet_with_fused_self_attention_projections_predicts_the_same() -> Result<()> {
        let dir = sdkube_testkit::fixtures().join("sd/sd1");
        let weights = crate::load(&dir, &Default::default()).unwrap().unet;
        let dev = Device::Cpu;
        let plain = weights.build(&dev, DType::F32)?;
        let mut fused = weights.build(&dev, DType::F32)?;
        let mut count = 0;
        for attn in fused.attentions_mut(AttentionKind::SelfAttention) {
            assert!(!attn.is_fused(), "the CPU keeps three products");
            attn.fuse_projections(&ProjectionStacks::default())?;
            assert!(attn.is_fused());
            count += 1;
        }
        let crossed = fused.attentions_mut(AttentionKind::Cross).count();
        assert!(
            count > 0 && count == crossed,
            "{count} self, {crossed} cross"
        );
        // Stacked beforehand, as the base weights on a GPU are: every self-attention's three.
        let mut stacked = weights.tensors.clone();
        assert_eq!(ProjectionStacks::stack(&mut stacked)?.len(), count);
        assert!(fused
            .attentions_mut(AttentionKind::Cross)
            .all(|a| !a.is_fused()));
        assert_same_prediction(&plain, &fused)
    }

    /// Gathered as on GPUs (here on the CPU), every ResNet block of the down, mid and up blocks
    /// adds its own time term from the batched products: the prediction is the one each
    /// block's own projection gives.
    #[test]
    fn a_unet_with_gathered_time_projections_predicts_the_same() -> Result<()> {
        let dir = sdkube_testkit::fixtures().join("sd/sd1");
        let weights = crate::load(&dir, &Default::default()).unwrap().unet;
        let dev = Device::Cpu;
        let plain = weights.build(&dev, DType::F32)?;
        let mut gathered = weights.build(&dev, DType::F32)?;
        assert_eq!(
            plain.time_projections.blocks(),
            0,
            "the CPU projects per block"
        );
        gathered.time_projections = TimeProjections::gather(gathered.resnets_mut())?;
        let blocks = gathered.resnets_mut().count();
        assert!(blocks > 0);
        assert_eq!(gathered.time_projections.blocks(), blocks);
        assert_same_prediction(&plain, &gathered)
    }

    /// `other` predicts what `plain` does (within 1e-5 of the largest value) on the CPU.
    fn assert_same_prediction(
        plain: &UNet2DConditionModel,
        other: &UNet2DConditionModel,
    ) -> Result<()> {
        let dev = Device::Cpu;
        let width = plain.config().cross_attention_dim;
        let x = Tensor::randn(0f32, 1., (2, 4, 8, 8), &dev)?;
        let ctx = Tensor::randn(0f32, 1., (2, 77, width), &dev)?;
        let t = Tensor::new(&[500f32], &dev)?;
        let want = plain.forward(&x, &t, &ctx, None)?;
        let got = other.forward(&x, &t, &ctx, None)?;
        let diff = (got - &want)?.abs()?.max_all()?.to_scalar::<f32>()?;
        let scale = want.abs()?.max_all()?.to_scalar::<f32>()?;
        assert!(
            diff <= 1e-5 * scale.max(1.0),
            "differs by {diff} (scale {scale})"
        );
        Ok(())
    }
}
