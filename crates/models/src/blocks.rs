//! Building blocks shared by the networks, named as in `diffusers.models`:
//! `ResnetBlock2D`, `Downsample2D`, `Upsample2D` and the multi-head `Attention`, with the text
//! context its cross-attentions read ([`CrossContext`], [`ContextProjections`]). Their layers
//! and ops (convolution, linear, norms, attention, upsampling) are `sdkube-nn`'s.

use std::collections::HashMap;

use candle_core::{DType, Module, Result, Tensor, D};
use candle_nn::{Conv2dConfig, VarBuilder};
use sdkube_nn::{
    conv1x1, conv2d, conv3x3, group_norm, linear, linear_no_bias, scaled_dot_product_attention,
    upsample_nearest_2x, Conv2d, GroupNorm, Linear,
};

use crate::ldm::TensorMap;

/// `diffusers.models.resnet.ResnetBlock2D` (time embedding optional: the VAE has none).
#[derive(Debug)]
pub struct ResnetBlock2D {
    norm1: GroupNorm,
    conv1: Conv2d,
    time_emb_proj: Option<Linear>,
    /// Where its time term comes projected in a [`TimeEmbedding`] of its network.
    time_slot: Option<Slot>,
    norm2: GroupNorm,
    conv2: Conv2d,
    conv_shortcut: Option<Conv2d>,
}

impl ResnetBlock2D {
    /// The block `cin` → `cout` channels, with a time embedding of `temb_channels` when given;
    /// group norms of `groups` groups and `eps`.
    pub fn new(
        vb: VarBuilder,
        cin: usize,
        cout: usize,
        temb_channels: Option<usize>,
        groups: usize,
        eps: f64,
    ) -> Result<Self> {
        let conv_shortcut = if cin != cout {
            Some(conv1x1(cin, cout, vb.pp("conv_shortcut"))?)
        } else {
            None
        };
        Ok(Self {
            norm1: group_norm(groups, cin, eps, vb.pp("norm1"))?,
            conv1: conv3x3(cin, cout, 1, vb.pp("conv1"))?,
            time_emb_proj: temb_channels
                .map(|t| linear(t, cout, vb.pp("time_emb_proj")))
                .transpose()?,
            time_slot: None,
            norm2: group_norm(groups, cout, eps, vb.pp("norm2"))?,
            conv2: conv3x3(cout, cout, 1, vb.pp("conv2"))?,
            conv_shortcut,
        })
    }

    /// `xs` `[B, C, H, W]`, plus the time embedding `temb` where the block has one.
    pub fn forward(&self, xs: &Tensor, temb: Option<&TimeEmbedding>) -> Result<Tensor> {
        // One `h`, reassigned: each intermediate is freed as soon as the next exists (shadowed
        // `let`s would keep them all alive to the end, 256 MB each at the VAE's 1024² stage).
        let mut h = self.conv1.forward(&self.norm1.forward_silu(xs)?)?;
        h = match (&self.time_emb_proj, temb) {
            // [B, C] per sample and channel, added as norm2 reads h
            (Some(proj), Some(t)) => {
                let term = match t.term(self.time_slot)? {
                    Some(term) => term,
                    None => proj.forward(&t.activated)?,
                };
                self.norm2.forward_silu_added(&h, &term)?
            }
            _ => self.norm2.forward_silu(&h)?,
        };
        match &self.conv_shortcut {
            Some(c) => self.conv2.forward_add(&h, &c.forward(xs)?),
            None => self.conv2.forward_add(&h, xs),
        }
    }
}

/// The time embedding the ResNet blocks of one network read: `silu(emb)` `[B, T]`, which
/// each block projects to its channels, and, where the network gathered those projections
/// ([`TimeProjections::project`]), every block's projected term.
#[derive(Debug, Clone)]
pub struct TimeEmbedding {
    /// The embedding through SiLU, once for all blocks.
    activated: Tensor,
    /// Per stack `[L, B, C]`: each block's term.
    projected: Vec<Tensor>,
}

impl TimeEmbedding {
    /// The embedding `emb` `[B, T]`: each block projects it itself.
    pub fn new(emb: &Tensor) -> Result<Self> {
        Ok(Self {
            activated: emb.silu()?,
            projected: vec![],
        })
    }

    /// The term `[B, C]` projected for the block at `slot`, if any.
    fn term(&self, slot: Option<Slot>) -> Result<Option<Tensor>> {
        match slot.and_then(|s| Some((s, self.projected.get(s.stack)?))) {
            Some((slot, stack)) => stack.get(slot.member).map(Some),
            None => Ok(None),
        }
    }
}

/// The time-embedding projections of a network's ResNet blocks, stacked per width, so that a
/// pass projects the embedding for all of them in one batched product per width instead of
/// one small product each (SD1.5's UNet has 22 blocks, SDXL's 17): one launch per width where
/// there were one per block, each a product of two rows. The blocks keep their weights as views
/// into the stacks: no second copy.
#[derive(Debug, Default)]
pub struct TimeProjections {
    /// Per distinct width: `[L, C, T]` weights and `[L, 1, C]` biases of L blocks.
    stacks: Vec<(Tensor, Tensor)>,
}

/// `SDKUBE_TIME_PROJECTIONS=on|off` (on by default): see [`TimeProjections::gather_on`].
static TIME_PROJECTIONS: sdkube_nn::Switch =
    sdkube_nn::Switch::new("SDKUBE_TIME_PROJECTIONS", "on", "off", true);

impl TimeProjections {
    /// [`gather`](Self::gather) for a network on `device` where it pays: on GPUs, where the
    /// many small products cost launches. Not on the CPU, whose linear layers run one sample at
    /// a time so that an image does not depend on the batch it was made in.
    pub fn gather_on<'a>(
        device: &candle_core::Device,
        resnets: impl IntoIterator<Item = &'a mut ResnetBlock2D>,
    ) -> Result<Self> {
        match device.is_cuda() && TIME_PROJECTIONS.is_on() {
            true => Self::gather(resnets),
            false => Ok(Self::default()),
        }
    }

    /// Stacks the time projections of `resnets` (those with one, with a bias) per shape and
    /// dtype, and points each block at its slot.
    pub fn gather<'a>(resnets: impl IntoIterator<Item = &'a mut ResnetBlock2D>) -> Result<Self> {
        let groups = grouped(resnets, |block| {
            let proj = block.time_emb_proj.as_ref()?;
            proj.bias().map(|_| proj.weight())
        });
        let mut stacks = Vec::with_capacity(groups.len());
        for (stack, members) in groups.into_iter().enumerate() {
            let projections = || members.iter().filter_map(|b| b.time_emb_proj.as_ref());
            let weights: Vec<&Tensor> = projections().map(Linear::weight).collect();
            let biases: Vec<&Tensor> = projections().filter_map(Linear::bias).collect();
            let weight = Tensor::stack(&weights, 0)?;
            let bias = Tensor::stack(&biases, 0)?.unsqueeze(1)?;
            for (member, block) in members.into_iter().enumerate() {
                let b = bias.get(member)?.squeeze(0)?;
                block.time_emb_proj = Some(Linear::from_weight(weight.get(member)?, Some(b)));
                block.time_slot = Some(Slot { stack, member });
            }
            stacks.push((weight, bias));
        }
        Ok(Self { stacks })
    }

    /// How many blocks it gathered.
    pub fn blocks(&self) -> usize {
        self.stacks.iter().map(|(w, _)| w.dim(0).unwrap_or(0)).sum()
    }

    /// `emb` `[B, T]` with every gathered block's term projected.
    pub fn project(&self, emb: &Tensor) -> Result<TimeEmbedding> {
        let mut time = TimeEmbedding::new(emb)?;
        let (b, t) = time.activated.dims2()?;
        time.projected = self
            .stacks
            .iter()
            .map(|(w, bias)| {
                let all = time
                    .activated
                    .unsqueeze(0)?
                    .broadcast_as((w.dim(0)?, b, t))?;
                all.matmul(&w.transpose(1, 2)?)?.broadcast_add(bias)
            })
            .collect::<Result<_>>()?;
        Ok(time)
    }
}

/// `Downsample2D`: a stride-2 3×3 convolution. The VAE pads asymmetrically (right/bottom)
/// with no conv padding; the UNet uses padding 1.
#[derive(Debug)]
pub struct Downsample2D {
    conv: Conv2d,
    asymmetric_pad: bool,
}

impl Downsample2D {
    /// A downsampler of `channels`; `asymmetric_pad` for the VAE's.
    pub fn new(vb: VarBuilder, channels: usize, asymmetric_pad: bool) -> Result<Self> {
        let cfg = Conv2dConfig {
            padding: if asymmetric_pad { 0 } else { 1 },
            stride: 2,
            ..Default::default()
        };
        Ok(Self {
            conv: conv2d(channels, channels, 3, cfg, vb.pp("conv"))?,
            asymmetric_pad,
        })
    }

    /// `xs` at half its height and width.
    pub fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        if self.asymmetric_pad {
            let xs = xs.pad_with_zeros(2, 0, 1)?.pad_with_zeros(3, 0, 1)?;
            self.conv.forward(&xs)
        } else {
            self.conv.forward(xs)
        }
    }
}

/// `Upsample2D`: nearest-neighbour ×2 (or to the size of the matching skip connection, for
/// latents whose sides are not a multiple of the total downsampling), then a 3×3 convolution.
#[derive(Debug)]
pub struct Upsample2D {
    conv: Conv2d,
}

impl Upsample2D {
    /// An upsampler of `channels`.
    pub fn new(vb: VarBuilder, channels: usize) -> Result<Self> {
        Ok(Self {
            conv: conv3x3(channels, channels, 1, vb.pp("conv"))?,
        })
    }

    /// `xs` at twice its size, or at `size` (height, width) when given.
    pub fn forward(&self, xs: &Tensor, size: Option<(usize, usize)>) -> Result<Tensor> {
        let (_, _, h, w) = xs.dims4()?;
        let (th, tw) = size.unwrap_or((2 * h, 2 * w));
        if (th, tw) == (2 * h, 2 * w) {
            return self.conv.forward(&upsample_nearest_2x(xs)?);
        }
        self.conv.forward(&xs.upsample_nearest2d(th, tw)?)
    }
}

/// `diffusers.models.attention_processor.Attention` without a group norm: multi-head scaled
/// dot-product attention with `to_q/to_k/to_v/to_out.0`.
#[derive(Debug)]
pub struct Attention {
    to_q: Linear,
    to_k: Linear,
    to_v: Linear,
    to_out: Linear,
    /// The three projections in one product, for self-attention ([`Self::fuse_projections`]):
    /// `to_q`, `to_k` and `to_v` are then views into its weight.
    to_qkv: Option<Linear>,
    /// Its path in the network's weights (`…attn1`), where [`ProjectionStacks`] keep its stack.
    name: String,
    heads: usize,
    /// SD 2.x computes the scores in fp32 (`upcast_attention`).
    upcast: bool,
    /// Where its keys and values come projected in a [`CrossContext`] of its network.
    slot: Option<Slot>,
}

impl Attention {
    /// Attention of `query_dim` queries over `context_dim` keys and values, `heads` heads of
    /// `head_dim`; `qkv_bias` when the projections have a bias, `upcast` for fp32 scores.
    pub fn new(
        vb: VarBuilder,
        query_dim: usize,
        context_dim: usize,
        heads: usize,
        head_dim: usize,
        qkv_bias: bool,
        upcast: bool,
    ) -> Result<Self> {
        let inner = heads * head_dim;
        let proj = |i: usize, name: &str| {
            if qkv_bias {
                linear(i, inner, vb.pp(name))
            } else {
                linear_no_bias(i, inner, vb.pp(name))
            }
        };
        Ok(Self {
            to_q: proj(query_dim, "to_q")?,
            to_k: proj(context_dim, "to_k")?,
            to_v: proj(context_dim, "to_v")?,
            to_out: linear(inner, query_dim, vb.pp("to_out.0"))?,
            to_qkv: None,
            name: vb.prefix(),
            heads,
            upcast,
            slot: None,
        })
    }

    /// Runs the query, key and value projections as one product of three times the width
    /// instead of three: fewer launches, and fuller waves on the GPU at the UNet's small token
    /// counts. The attention reads q, k and v where the product wrote them (rows three widths
    /// apart). The stack is the one in `stacks` where this attention's weights are views into
    /// it (no copy), else one made here; the separate projections become views into it (for
    /// gradient passes, which keep them). Left as it is where the three do not stack (shapes,
    /// dtypes, or a bias on some only).
    pub fn fuse_projections(&mut self, stacks: &ProjectionStacks) -> Result<()> {
        let weights = [&self.to_q, &self.to_k, &self.to_v].map(Linear::weight);
        let biases = [&self.to_q, &self.to_k, &self.to_v].map(Linear::bias);
        let same = |t: &Tensor| t.dims() == weights[0].dims() && t.dtype() == weights[0].dtype();
        if self.to_qkv.is_some() || !weights.iter().all(|w| same(w)) {
            return Ok(());
        }
        let bias = match biases {
            [None, None, None] => None,
            [Some(q), Some(k), Some(v)] => Some(Tensor::cat(&[q, k, v], 0)?),
            _ => return Ok(()),
        };
        let weight = match stacks.0.get(&self.name) {
            Some(stack) if bias.is_none() && views_into(stack, &weights) => stack.clone(),
            _ => Tensor::cat(&weights, 0)?,
        };
        let rows = weights[0].dim(0)?;
        let part = |i: usize| -> Result<Linear> {
            Ok(Linear::from_weight(
                weight.narrow(0, i * rows, rows)?,
                bias.as_ref()
                    .map(|b| b.narrow(0, i * rows, rows))
                    .transpose()?,
            ))
        };
        (self.to_q, self.to_k, self.to_v) = (part(0)?, part(1)?, part(2)?);
        self.to_qkv = Some(Linear::from_weight(weight, bias));
        Ok(())
    }

    /// Whether its projections are fused.
    pub fn is_fused(&self) -> bool {
        self.to_qkv.is_some()
    }

    /// `xs` `[B, N, C]`; `context` (`[B, M, Cc]`) for cross-attention, `None` for self-attention.
    pub fn forward(&self, xs: &Tensor, context: Option<&CrossContext>) -> Result<Tensor> {
        self.to_out.forward(&self.heads_out(xs, context)?)
    }

    /// `forward(xs, context) + residual`, the add in the output projection's epilogue on GPUs.
    pub fn forward_add(
        &self,
        xs: &Tensor,
        context: Option<&CrossContext>,
        residual: &Tensor,
    ) -> Result<Tensor> {
        self.to_out
            .forward_add(&self.heads_out(xs, context)?, residual)
    }

    /// The attention's output before its projection.
    fn heads_out(&self, xs: &Tensor, context: Option<&CrossContext>) -> Result<Tensor> {
        // Fused for inference only: in a gradient graph, slicing one product's output would
        // give each slice's gradient at the full width.
        if let (None, Some(qkv), false) = (context, &self.to_qkv, xs.track_op()) {
            let all = qkv.forward(xs)?;
            let inner = all.dim(D::Minus1)? / 3;
            let part = |i: usize| all.narrow(D::Minus1, i * inner, inner);
            return scaled_dot_product_attention(
                &part(0)?,
                &part(1)?,
                &part(2)?,
                self.heads,
                self.upcast,
            );
        }
        let q = self.to_q.forward(xs)?;
        let (k, v) = match context {
            None => (self.to_k.forward(xs)?, self.to_v.forward(xs)?),
            Some(context) => match context.keys_values(self.slot)? {
                Some(kv) => kv,
                None => (
                    self.to_k.forward(&context.hidden)?,
                    self.to_v.forward(&context.hidden)?,
                ),
            },
        };
        scaled_dot_product_attention(&q, &k, &v, self.heads, self.upcast)
    }
}

/// `items` grouped by the shape and dtype of the weight `stacked` gives each (those it gives
/// none are left out), the groups in order of their first member: the layers one stack takes.
fn grouped<'a, T>(
    items: impl IntoIterator<Item = &'a mut T>,
    stacked: impl Fn(&T) -> Option<&Tensor>,
) -> Vec<Vec<&'a mut T>> {
    type Shape = (Vec<usize>, DType);
    let mut groups: Vec<(Shape, Vec<&'a mut T>)> = vec![];
    for item in items {
        let Some(key) = stacked(item).map(|w| (w.dims().to_vec(), w.dtype())) else {
            continue;
        };
        match groups.iter_mut().find(|(k, _)| *k == key) {
            Some((_, members)) => members.push(item),
            None => groups.push((key, vec![item])),
        }
    }
    groups.into_iter().map(|(_, members)| members).collect()
}

/// Where a layer's stacked weights sit in its network's gathered projections: the stack of its
/// width, and its place in that stack (a cross-attention's pair of keys and values, a ResNet
/// block's time projection).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Slot {
    stack: usize,
    member: usize,
}

/// The text context the cross-attentions of one network read: the text encoder's hidden
/// states `[B, M, Cc]` and, where that network gathered its projections
/// ([`ContextProjections::project`]), every cross-attention's keys and values.
#[derive(Debug, Clone)]
pub struct CrossContext {
    hidden: Tensor,
    /// Per stack `[2L, B·M, C]`: each attention's keys, then its values.
    projected: Vec<Tensor>,
}

impl CrossContext {
    /// `hidden` alone: each cross-attention projects it itself.
    pub fn new(hidden: Tensor) -> Self {
        Self {
            hidden,
            projected: vec![],
        }
    }

    /// The keys and values `[B, M, C]` projected for the attention at `slot`, if any.
    fn keys_values(&self, slot: Option<Slot>) -> Result<Option<(Tensor, Tensor)>> {
        let Some((slot, stack)) = slot.and_then(|s| Some((s, self.projected.get(s.stack)?))) else {
            return Ok(None);
        };
        let (b, m, _) = self.hidden.dims3()?;
        let shape = (b, m, stack.dim(2)?);
        let k = stack.get(2 * slot.member)?.reshape(shape)?;
        let v = stack.get(2 * slot.member + 1)?.reshape(shape)?;
        Ok(Some((k, v)))
    }
}

/// The key and value weights of a network's cross-attentions, stacked per width, so that a
/// pass projects the text context for all of them in one batched product per width instead of
/// two small products each (SD1.5 has 16 cross-attentions, SDXL 70). Replayed in a CUDA graph
/// on one H100, SD1.5's 32 products took 0.139 ms per CFG step against 0.028 ms batched, SDXL's
/// 140 took 0.889 against 0.269 ms (`benches/gpu_kv_probe.py`). The attentions keep their
/// weights as views into the stacks: no second copy.
#[derive(Debug, Default)]
pub struct ContextProjections {
    /// `[2L, C, Cc]` per distinct width: keys then values of each of L attentions.
    stacks: Vec<Tensor>,
}

/// `SDKUBE_FUSED_QKV=on|off` (on by default): see [`fuse_self_attentions_on`].
static FUSED_QKV: sdkube_nn::Switch = sdkube_nn::Switch::new("SDKUBE_FUSED_QKV", "on", "off", true);

/// Whether self-attentions on `device` run fused projections: on GPUs, where each product
/// costs a launch and a partly filled wave. The CPU keeps the three.
fn fuses_on(device: &candle_core::Device) -> bool {
    device.is_cuda() && FUSED_QKV.is_on()
}

/// [`Attention::fuse_projections`] for a network's self-attentions on `device` where it pays
/// ([`fuses_on`]).
pub fn fuse_self_attentions_on<'a>(
    device: &candle_core::Device,
    self_attentions: impl IntoIterator<Item = &'a mut Attention>,
    stacks: &ProjectionStacks,
) -> Result<()> {
    if fuses_on(device) {
        for attn in self_attentions {
            attn.fuse_projections(stacks)?;
        }
    }
    Ok(())
}

/// The query, key and value weights of a network's self-attentions (diffusers' transformer
/// blocks' `attn1`), each attention's three stacked in one tensor, by the attention's path.
/// Kept beside weights that networks are built from more than once (the base weights LoRAs
/// patch): the weights' own entries are views into the stacks, so networks built from them
/// fuse their projections without a copy ([`Attention::fuse_projections`]), and a LoRA that
/// replaces one of the three makes only that attention stack its own.
#[derive(Debug, Clone, Default)]
pub struct ProjectionStacks(HashMap<String, Tensor>);

impl ProjectionStacks {
    /// Stacks `weights`' self-attention projections where networks on `device` fuse them
    /// ([`fuses_on`]); none otherwise.
    pub fn stack_on(weights: &mut TensorMap, device: &candle_core::Device) -> Result<Self> {
        match fuses_on(device) {
            true => Self::stack(weights),
            false => Ok(Self::default()),
        }
    }

    /// Stacks every `….attn1` whose `to_q`, `to_k` and `to_v` weights have one shape and dtype
    /// and no biases, and points `weights`' entries at their rows of the stack.
    pub fn stack(weights: &mut TensorMap) -> Result<Self> {
        let names: Vec<String> = weights
            .keys()
            .filter_map(|k| k.strip_suffix(".attn1.to_q.weight"))
            .map(|p| format!("{p}.attn1"))
            .collect();
        let mut stacks = HashMap::new();
        for name in names {
            let keys = ["to_q", "to_k", "to_v"].map(|p| format!("{name}.{p}.weight"));
            let Some(parts) = keys
                .iter()
                .map(|k| weights.get(k))
                .collect::<Option<Vec<&Tensor>>>()
            else {
                continue;
            };
            let biased = ["to_q", "to_k", "to_v"]
                .iter()
                .any(|p| weights.contains_key(&format!("{name}.{p}.bias")));
            let same = |t: &&Tensor| t.dims() == parts[0].dims() && t.dtype() == parts[0].dtype();
            if biased || !parts.iter().all(same) {
                continue;
            }
            let stack = Tensor::cat(&parts, 0)?;
            let rows = parts[0].dim(0)?;
            for (i, key) in keys.into_iter().enumerate() {
                weights.insert(key, stack.narrow(0, i * rows, rows)?);
            }
            stacks.insert(name, stack);
        }
        Ok(Self(stacks))
    }

    /// How many attentions it stacked.
    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// Whether it stacked none.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

/// Whether `parts` are `stack`'s rows in order, in place (views, not copies).
fn views_into(stack: &Tensor, parts: &[&Tensor]) -> bool {
    let at = |t: &Tensor| -> *const candle_core::Storage {
        let (storage, _) = t.storage_and_layout();
        &*storage
    };
    let base = at(stack);
    let mut offset = stack.layout().start_offset();
    parts.iter().all(|t| {
        let here =
            std::ptr::eq(at(t), base) && t.is_contiguous() && t.layout().start_offset() == offset;
        offset += t.elem_count();
        here
    })
}

/// `SDKUBE_CONTEXT_PROJECTIONS=on|off` (on by default): see [`ContextProjections::gather_on`].
static CONTEXT_PROJECTIONS: sdkube_nn::Switch =
    sdkube_nn::Switch::new("SDKUBE_CONTEXT_PROJECTIONS", "on", "off", true);

impl ContextProjections {
    /// [`gather`](Self::gather) for a network on `device` where it pays: on GPUs, where the many
    /// small products cost launches and tails. Not on the CPU, whose linear layers run one
    /// sample at a time so that an image does not depend on the batch it was made in.
    pub fn gather_on<'a>(
        device: &candle_core::Device,
        attentions: impl IntoIterator<Item = &'a mut Attention>,
    ) -> Result<Self> {
        match device.is_cuda() && CONTEXT_PROJECTIONS.is_on() {
            true => Self::gather(attentions),
            false => Ok(Self::default()),
        }
    }

    /// Stacks the key and value weights of `attentions` (those without biases; an attention
    /// with biases keeps projecting on its own) and points each attention at its slot.
    pub fn gather<'a>(attentions: impl IntoIterator<Item = &'a mut Attention>) -> Result<Self> {
        let groups = grouped(attentions, |attn| {
            let (w, wv) = (attn.to_k.weight(), attn.to_v.weight());
            let biased = attn.to_k.bias().is_some() || attn.to_v.bias().is_some();
            let stackable = !biased && w.dims() == wv.dims() && w.dtype() == wv.dtype();
            stackable.then_some(w)
        });
        let mut stacks = Vec::with_capacity(groups.len());
        for (stack, members) in groups.into_iter().enumerate() {
            let weights: Vec<&Tensor> = members
                .iter()
                .flat_map(|a| [a.to_k.weight(), a.to_v.weight()])
                .collect();
            let stacked = Tensor::stack(&weights, 0)?;
            for (pair, attn) in members.into_iter().enumerate() {
                attn.to_k = Linear::from_weight(stacked.get(2 * pair)?, None);
                attn.to_v = Linear::from_weight(stacked.get(2 * pair + 1)?, None);
                attn.slot = Some(Slot {
                    stack,
                    member: pair,
                });
            }
            stacks.push(stacked);
        }
        Ok(Self { stacks })
    }

    /// How many attentions it gathered.
    pub fn attentions(&self) -> usize {
        self.stacks.iter().map(|s| s.dim(0).unwrap_or(0) / 2).sum()
    }

    /// `hidden` `[B, M, Cc]` with every gathered attention's keys and values projected.
    pub fn project(&self, hidden: &Tensor) -> Result<CrossContext> {
        let (b, m, cc) = hidden.dims3()?;
        let rows = hidden.reshape((b * m, cc))?;
        let projected = self
            .stacks
            .iter()
            .map(|w| {
                let all = rows.unsqueeze(0)?.broadcast_as((w.dim(0)?, b * m, cc))?;
                all.matmul(&w.transpose(1, 2)?)
            })
            .collect::<Result<_>>()?;
        Ok(CrossContext {
            hidden: hidden.clone(),
            projected,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;
    use candle_nn::VarMap;

    fn attention(vars: &VarMap, name: &str, dim: usize, bias: bool) -> Attention {
        let vb = VarBuilder::from_varmap(vars, DType::F32, &Device::Cpu);
        Attention::new(vb.pp(name), dim, 6, 2, dim / 2, bias, false).unwrap()
    }

    fn largest_difference(a: &Tensor, b: &Tensor) -> f32 {
        let diff = (a - b).unwrap().abs().unwrap().max_all().unwrap();
        diff.to_scalar::<f32>().unwrap()
    }

    /// Gathered, each attention reads its own keys and values out of the batched products: the
    /// same output as projecting the context itself. Widths 8 and 16 make two stacks; the
    /// attention with biases is left to project on its own.
    #[test]
    fn gathered_projections_give_each_attention_its_own_keys_and_values() -> Result<()> {
        let vars = VarMap::new();
        let mut attentions = [
            attention(&vars, "a", 8, false),
            attention(&vars, "b", 16, false),
            attention(&vars, "c", 8, false),
            attention(&vars, "d", 8, true),
        ];
        let dev = Device::Cpu;
        let hidden = Tensor::randn(0f32, 1., (2, 3, 6), &dev)?;
        let queries =
            |a: &Attention| Tensor::randn(0f32, 1., (2, 5, a.to_q.weight().dim(1)?), &dev);
        let xs = attentions.iter().map(queries).collect::<Result<Vec<_>>>()?;
        let plain = CrossContext::new(hidden.clone());
        let before = attentions
            .iter()
            .zip(&xs)
            .map(|(a, x)| a.forward(x, Some(&plain)))
            .collect::<Result<Vec<_>>>()?;

        let projections = ContextProjections::gather(attentions.iter_mut())?;
        let stacks: Vec<_> = projections
            .stacks
            .iter()
            .map(|s| s.dims().to_vec())
            .collect();
        assert_eq!(stacks, [vec![4, 8, 6], vec![2, 16, 6]]);
        let slots: Vec<_> = attentions.iter().map(|a| a.slot).collect();
        let slot = |stack, member| Some(Slot { stack, member });
        assert_eq!(slots, [slot(0, 0), slot(1, 0), slot(0, 1), None]);

        let projected = projections.project(&hidden)?;
        for (i, ((a, x), want)) in attentions.iter().zip(&xs).zip(&before).enumerate() {
            let got = a.forward(x, Some(&projected))?;
            assert!(largest_difference(&got, want) < 1e-5, "attention {i}");
            // The plain context still works: the weights are views into the stacks.
            let alone = a.forward(x, Some(&plain))?;
            assert!(
                largest_difference(&alone, want) < 1e-6,
                "attention {i} alone"
            );
        }
        Ok(())
    }

    /// One product of three times the width, with biases: the same output as three, and the
    /// separate projections are views into the stack (no second copy of the weights).
    #[test]
    fn fused_projections_give_the_same_attention() -> Result<()> {
        let dev = Device::Cpu;
        let vars = VarMap::new();
        let vb = VarBuilder::from_varmap(&vars, DType::F32, &dev);
        let mut attn = Attention::new(vb.pp("attn"), 64, 64, 4, 16, true, false)?;
        let xs = Tensor::randn(0f32, 1., (2, 10, 64), &dev)?;
        let want = attn.forward(&xs, None)?;
        attn.fuse_projections(&ProjectionStacks::default())?;
        assert!(attn.is_fused());
        let stack = attn.to_qkv.as_ref().unwrap().weight();
        assert_eq!(stack.dims(), [192, 64]);
        assert_eq!(attn.to_k.weight().layout().start_offset(), 64 * 64);
        let got = attn.forward(&xs, None)?;
        assert!(largest_difference(&got, &want) < 1e-5);
        // Cross-attention still projects its context itself.
        let ctx = CrossContext::new(Tensor::randn(0f32, 1., (2, 7, 64), &dev)?);
        let unfused = Attention::new(vb.pp("attn"), 64, 64, 4, 16, true, false)?;
        let d = largest_difference(
            &attn.forward(&xs, Some(&ctx))?,
            &unfused.forward(&xs, Some(&ctx))?,
        );
        assert!(d < 1e-5, "{d}");
        Ok(())
    }

    /// Projections that do not stack (here, a key width unlike the query's) stay separate.
    #[test]
    fn projections_that_do_not_stack_stay_separate() -> Result<()> {
        let dev = Device::Cpu;
        let vars = VarMap::new();
        let vb = VarBuilder::from_varmap(&vars, DType::F32, &dev);
        let mut attn = Attention::new(vb.pp("attn"), 64, 32, 4, 16, false, false)?;
        attn.fuse_projections(&ProjectionStacks::default())?;
        assert!(!attn.is_fused());
        Ok(())
    }

    /// Weights stacked beforehand: the fused projection is the stack itself (no copy); where
    /// one of the three was replaced since (as a LoRA's patch does), the attention stacks its
    /// own, with the new weight in it.
    #[test]
    fn stacked_weights_are_fused_without_a_copy() -> Result<()> {
        let dev = Device::Cpu;
        let w = |seed: f32| Tensor::randn(seed, 1f32, (16, 16), &dev);
        let mut map: TensorMap = ["to_q", "to_k", "to_v", "to_out.0"]
            .iter()
            .enumerate()
            .map(|(i, p)| Ok((format!("blk.attn1.{p}.weight"), w(i as f32)?)))
            .collect::<Result<_>>()?;
        map.insert(
            "blk.attn1.to_out.0.bias".into(),
            Tensor::zeros(16, DType::F32, &dev)?,
        );
        let stacks = ProjectionStacks::stack(&mut map)?;
        assert_eq!(stacks.len(), 1);
        let stack = &stacks.0["blk.attn1"];
        assert!(views_into(
            stack,
            &[
                &map["blk.attn1.to_q.weight"],
                &map["blk.attn1.to_k.weight"],
                &map["blk.attn1.to_v.weight"]
            ]
        ));

        let build = |map: &TensorMap| {
            let vb = VarBuilder::from_tensors(map.clone(), DType::F32, &dev);
            Attention::new(vb.pp("blk.attn1"), 16, 16, 2, 8, false, false)
        };
        let xs = Tensor::randn(0f32, 1., (1, 5, 16), &dev)?;
        let mut attn = build(&map)?;
        let want = attn.forward(&xs, None)?;
        attn.fuse_projections(&stacks)?;
        let fused = attn.to_qkv.as_ref().unwrap().weight();
        assert!(views_into(fused, &[stack]), "the stack itself");
        assert!(largest_difference(&attn.forward(&xs, None)?, &want) < 1e-5);

        let mut patched = map.clone();
        patched.insert("blk.attn1.to_k.weight".into(), w(9.)?);
        let mut attn = build(&patched)?;
        let want = attn.forward(&xs, None)?;
        attn.fuse_projections(&stacks)?;
        let fused = attn.to_qkv.as_ref().unwrap().weight();
        assert!(!views_into(fused, &[stack]), "a stack of its own");
        assert!(largest_difference(&attn.forward(&xs, None)?, &want) < 1e-5);
        Ok(())
    }
}
