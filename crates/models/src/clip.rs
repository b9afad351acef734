//! CLIP text encoder: `transformers.CLIPTextModel` / `CLIPTextModelWithProjection`
//! (Radford et al. 2021, <https://arxiv.org/abs/2103.00020>). The key tree is the
//! transformers one (`text_model.encoder.layers.N.self_attn.q_proj`…); single-file checkpoints
//! are renamed into it by [`crate::checkpoint`].
//!
//! Textual-inversion training back-propagates through this encoder (see
//! [`LayerNorm`] and [`softmax_last_dim`]).

use candle_core::{DType, Device, Module, Result, Tensor};
use candle_nn::{embedding, linear, linear_no_bias, Embedding, Linear, VarBuilder};

use crate::config::ClipTextConfig;
use sdkube_nn::{softmax_last_dim, LayerNorm};

#[derive(Debug, Clone, Copy)]
enum Activation {
    QuickGelu,
    Gelu,
}

impl Activation {
    fn forward(self, xs: &Tensor) -> Result<Tensor> {
        match self {
            Activation::QuickGelu => xs * candle_nn::ops::sigmoid(&(xs * 1.702)?)?,
            Activation::Gelu => xs.gelu_erf(),
        }
    }
}

#[derive(Debug)]
struct SelfAttention {
    q_proj: Linear,
    k_proj: Linear,
    v_proj: Linear,
    out_proj: Linear,
    heads: usize,
}

impl SelfAttention {
    fn new(vb: VarBuilder, cfg: &ClipTextConfig) -> Result<Self> {
        let d = cfg.hidden_size;
        Ok(Self {
            q_proj: linear(d, d, vb.pp("q_proj"))?,
            k_proj: linear(d, d, vb.pp("k_proj"))?,
            v_proj: linear(d, d, vb.pp("v_proj"))?,
            out_proj: linear(d, d, vb.pp("out_proj"))?,
            heads: cfg.num_attention_heads,
        })
    }

    fn forward(&self, xs: &Tensor, causal_mask: &Tensor) -> Result<Tensor> {
        let (b, n, d) = xs.dims3()?;
        let head_dim = d / self.heads;
        let split = |t: Tensor| -> Result<Tensor> {
            t.reshape((b, n, self.heads, head_dim))?
                .transpose(1, 2)?
                .contiguous()
        };
        let scale = (head_dim as f64).powf(-0.5);
        let q = split((self.q_proj.forward(xs)? * scale)?)?;
        let k = split(self.k_proj.forward(xs)?)?;
        let v = split(self.v_proj.forward(xs)?)?;
        let scores = q.matmul(&k.t()?)?.broadcast_add(causal_mask)?;
        let probs = softmax_last_dim(&scores)?;
        let out = probs.matmul(&v)?.transpose(1, 2)?.reshape((b, n, d))?;
        self.out_proj.forward(&out)
    }
}

#[derive(Debug)]
struct EncoderLayer {
    self_attn: SelfAttention,
    layer_norm1: LayerNorm,
    fc1: Linear,
    fc2: Linear,
    layer_norm2: LayerNorm,
    act: Activation,
}

impl EncoderLayer {
    fn new(vb: VarBuilder, cfg: &ClipTextConfig, act: Activation) -> Result<Self> {
        let d = cfg.hidden_size;
        Ok(Self {
            self_attn: SelfAttention::new(vb.pp("self_attn"), cfg)?,
            layer_norm1: LayerNorm::new(d, cfg.layer_norm_eps, vb.pp("layer_norm1"))?,
            fc1: linear(d, cfg.intermediate_size, vb.pp("mlp.fc1"))?,
            fc2: linear(cfg.intermediate_size, d, vb.pp("mlp.fc2"))?,
            layer_norm2: LayerNorm::new(d, cfg.layer_norm_eps, vb.pp("layer_norm2"))?,
            act,
        })
    }

    fn forward(&self, xs: &Tensor, causal_mask: &Tensor) -> Result<Tensor> {
        let h = self
            .self_attn
            .forward(&self.layer_norm1.forward(xs)?, causal_mask)?;
        let xs = (xs + h)?;
        let h = self.layer_norm2.forward(&xs)?;
        let h = self
            .fc2
            .forward(&self.act.forward(&self.fc1.forward(&h)?)?)?;
        xs + h
    }
}

/// What one text-encoder pass returns.
#[derive(Debug)]
pub struct ClipOutput {
    /// `hidden_states` as transformers returns them: index 0 is the embeddings, index i the
    /// output of layer i (before the final layer norm). Only the layers that were run.
    pub hidden_states: Vec<Tensor>,
    /// Pooled and projected embedding (`text_embeds`), when the model has a projection and
    /// all layers were run.
    pub text_embeds: Option<Tensor>,
}

/// CLIP text transformer, optionally with its text projection.
#[derive(Debug)]
pub struct ClipTextModel {
    token_embedding: Embedding,
    position_embedding: Tensor,
    layers: Vec<EncoderLayer>,
    final_layer_norm: LayerNorm,
    text_projection: Option<Linear>,
    cfg: ClipTextConfig,
}

impl ClipTextModel {
    /// `vb` at the root of the checkpoint (the one holding `text_model.*`).
    pub fn new(vb: VarBuilder, cfg: &ClipTextConfig) -> Result<Self> {
        let act = match cfg.hidden_act.as_str() {
            "quick_gelu" => Activation::QuickGelu,
            "gelu" => Activation::Gelu,
            other => candle_core::bail!("unsupported CLIP hidden_act {other:?}"),
        };
        let tm = vb.pp("text_model");
        let emb = tm.pp("embeddings");
        let token_embedding =
            embedding(cfg.vocab_size, cfg.hidden_size, emb.pp("token_embedding"))?;
        let position_embedding = emb.get(
            (cfg.max_position_embeddings, cfg.hidden_size),
            "position_embedding.weight",
        )?;
        let layers = (0..cfg.num_hidden_layers)
            .map(|i| EncoderLayer::new(tm.pp(format!("encoder.layers.{i}")), cfg, act))
            .collect::<Result<Vec<_>>>()?;
        let final_layer_norm = LayerNorm::new(
            cfg.hidden_size,
            cfg.layer_norm_eps,
            tm.pp("final_layer_norm"),
        )?;
        let text_projection = match cfg.projection_dim {
            Some(p) if vb.contains_tensor("text_projection.weight") => Some(linear_no_bias(
                cfg.hidden_size,
                p,
                vb.pp("text_projection"),
            )?),
            _ => None,
        };
        Ok(Self {
            token_embedding,
            position_embedding,
            layers,
            final_layer_norm,
            text_projection,
            cfg: cfg.clone(),
        })
    }

    /// Its configuration.
    pub fn config(&self) -> &ClipTextConfig {
        &self.cfg
    }

    /// Width of the hidden states (and of a token embedding).
    pub fn hidden_size(&self) -> usize {
        self.cfg.hidden_size
    }

    /// The token embedding table (textual inversion reads and extends it).
    pub fn token_embeddings(&self) -> &Tensor {
        self.token_embedding.embeddings()
    }

    /// Embeds token ids `[B, N]` into `[B, N, D]` (without positions).
    pub fn embed_tokens(&self, ids: &Tensor) -> Result<Tensor> {
        self.token_embedding.forward(ids)
    }

    /// Runs the transformer on token ids `[B, N]`.
    pub fn forward(&self, ids: &Tensor, layers: Option<usize>) -> Result<ClipOutput> {
        let embeds = self.embed_tokens(ids)?;
        self.forward_embeds(&embeds, ids, layers)
    }

    /// Runs the transformer on token embeddings `[B, N, D]` (already looked up, possibly with
    /// textual-inversion vectors spliced in). `ids` locate the end-of-text token for pooling.
    /// `layers` limits how many layers run (clip skip); `None` runs all.
    pub fn forward_embeds(
        &self,
        embeds: &Tensor,
        ids: &Tensor,
        layers: Option<usize>,
    ) -> Result<ClipOutput> {
        let (b, n, _) = embeds.dims3()?;
        let positions = self
            .position_embedding
            .narrow(0, 0, n)?
            .to_dtype(embeds.dtype())?;
        let mut xs = embeds.broadcast_add(&positions)?;
        let mask = causal_mask(n, embeds.dtype(), embeds.device())?;
        let run = layers.unwrap_or(self.layers.len()).min(self.layers.len());
        let mut hidden_states = Vec::with_capacity(run + 1);
        hidden_states.push(xs.clone());
        for layer in &self.layers[..run] {
            xs = layer.forward(&xs, &mask)?;
            hidden_states.push(xs.clone());
        }
        let text_embeds = match (&self.text_projection, run == self.layers.len()) {
            (Some(proj), true) => {
                let last = self.final_layer_norm.forward(&xs)?;
                let eos = eos_positions(ids, self.cfg.eos_token_id)?;
                let pooled = (0..b)
                    .map(|i| last.get(i)?.get(eos[i]))
                    .collect::<Result<Vec<_>>>()?;
                Some(proj.forward(&Tensor::stack(&pooled, 0)?)?)
            }
            _ => None,
        };
        Ok(ClipOutput {
            hidden_states,
            text_embeds,
        })
    }

    /// Applies the final layer norm (transformers' `last_hidden_state` and A1111's clip skip).
    pub fn final_norm(&self, xs: &Tensor) -> Result<Tensor> {
        self.final_layer_norm.forward(xs)
    }

    /// Transformer layers.
    pub fn num_layers(&self) -> usize {
        self.layers.len()
    }
}

/// Position of the first end-of-text token in each row (the last position if there is none),
/// as transformers pools CLIP outputs.
fn eos_positions(ids: &Tensor, eos: u32) -> Result<Vec<usize>> {
    let rows = ids.to_dtype(DType::U32)?.to_vec2::<u32>()?;
    Ok(rows
        .iter()
        .map(|r| r.iter().position(|&t| t == eos).unwrap_or(r.len() - 1))
        .collect())
}

fn causal_mask(n: usize, dtype: DType, device: &Device) -> Result<Tensor> {
    let mask: Vec<f32> = (0..n)
        .flat_map(|i| (0..n).map(move |j| if j > i { f32::NEG_INFINITY } else { 0.0 }))
        .collect();
    Tensor::from_slice(&mask, (n, n), device)?.to_dtype(dtype)
}
