//! Depth Anything (Yang et al. 2024, <https://arxiv.org/abs/2401.10891>): a DINOv2 ViT
//! backbone, a DPT neck and a depth head, as transformers' `DepthAnythingForDepthEstimation`
//! (`models/depth_anything/modeling_depth_anything.py` over `models/dinov2/modeling_dinov2.py`).
//!
//! The struct tree is the checkpoint's key tree of the Hugging Face releases
//! (`LiheYoung/depth-anything-{small,base,large}-hf`): `backbone.embeddings…`,
//! `backbone.encoder.layer.N.attention.attention.{query,key,value}`, `neck.…`, `head.…`.
//! transformers ≥ 5 saves the attention as `attention.{q,k,v,o}_proj`, and the original
//! repository's `DPT_DINOv2` (the `.pth` files the extension downloads) names everything its own
//! way with a fused `attn.qkv`; [`load`] maps both onto the released names.

use std::collections::HashMap;
use std::path::Path;

use candle_core::{DType, Device, Module, Result, Tensor};
use candle_nn::{Conv2dConfig, ConvTranspose2d, ConvTranspose2dConfig, VarBuilder};
use sdkube_nn::{
    conv2d, conv2d_no_bias, linear, scaled_dot_product_attention, Conv2d, LayerNorm, Linear,
};
use serde::Deserialize;

/// The network's shape: the fields of transformers' `DepthAnythingConfig` and its
/// `backbone_config` (a `Dinov2Config`) that the forward pass uses.
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct Config {
    /// The ViT width.
    pub hidden_size: usize,
    /// Transformer layers.
    pub num_hidden_layers: usize,
    /// Attention heads.
    pub num_attention_heads: usize,
    /// MLP width over `hidden_size`.
    pub mlp_ratio: f64,
    /// Patch side in pixels (14).
    pub patch_size: usize,
    /// The image side the position embeddings were trained for (518).
    pub image_size: usize,
    /// Layer-norm epsilon.
    pub layer_norm_eps: f64,
    /// The layers (1-based, `stageN`) whose outputs feed the neck.
    pub out_indices: Vec<usize>,
    /// Channels of the four reassembled feature maps.
    pub neck_hidden_sizes: Vec<usize>,
    /// Their scale against the patch grid (4, 2, 1, 0.5).
    pub reassemble_factors: Vec<f64>,
    /// Channels of the fusion stage.
    pub fusion_hidden_size: usize,
    /// Channels of the head's second convolution.
    pub head_hidden_size: usize,
    /// The head's output scale (1 for relative depth).
    pub max_depth: f64,
}

impl Config {
    fn preset(
        hidden: usize,
        layers: usize,
        heads: usize,
        out: [usize; 4],
        neck: [usize; 4],
        fusion: usize,
    ) -> Self {
        Self {
            hidden_size: hidden,
            num_hidden_layers: layers,
            num_attention_heads: heads,
            mlp_ratio: 4.0,
            patch_size: 14,
            image_size: 518,
            layer_norm_eps: 1e-6,
            out_indices: out.to_vec(),
            neck_hidden_sizes: neck.to_vec(),
            reassemble_factors: vec![4.0, 2.0, 1.0, 0.5],
            fusion_hidden_size: fusion,
            head_hidden_size: 32,
            max_depth: 1.0,
        }
    }

    /// `LiheYoung/depth-anything-small-hf`'s `config.json` (ViT-S/14, 24.8 M parameters).
    pub fn small() -> Self {
        Self::preset(384, 12, 6, [9, 10, 11, 12], [48, 96, 192, 384], 64)
    }

    /// `LiheYoung/depth-anything-base-hf` (ViT-B/14).
    pub fn base() -> Self {
        Self::preset(768, 12, 12, [9, 10, 11, 12], [96, 192, 384, 768], 128)
    }

    /// `LiheYoung/depth-anything-large-hf` (ViT-L/14; the extension's `depth_anything` loads
    /// these weights in the original repository's layout, `depth_anything_vitl14.pth`).
    pub fn large() -> Self {
        Self::preset(1024, 24, 16, [21, 22, 23, 24], [256, 512, 1024, 1024], 256)
    }

    /// Reads a transformers `config.json` (`DepthAnythingConfig` with a `backbone_config`).
    pub fn from_transformers_json(json: &str) -> std::result::Result<Self, String> {
        #[derive(Deserialize)]
        struct Backbone {
            hidden_size: usize,
            num_hidden_layers: usize,
            num_attention_heads: usize,
            #[serde(default = "four")]
            mlp_ratio: f64,
            patch_size: usize,
            image_size: usize,
            #[serde(default = "eps")]
            layer_norm_eps: f64,
            out_indices: Vec<usize>,
        }
        #[derive(Deserialize)]
        struct Top {
            backbone_config: Backbone,
            neck_hidden_sizes: Vec<usize>,
            reassemble_factors: Vec<f64>,
            fusion_hidden_size: usize,
            head_hidden_size: usize,
            #[serde(default = "one")]
            max_depth: f64,
            #[serde(default)]
            depth_estimation_type: Option<String>,
        }
        fn four() -> f64 {
            4.0
        }
        fn eps() -> f64 {
            1e-6
        }
        fn one() -> f64 {
            1.0
        }
        let t: Top = serde_json::from_str(json).map_err(|e| e.to_string())?;
        if t.depth_estimation_type
            .as_deref()
            .is_some_and(|d| d != "relative")
        {
            return Err(
                "only relative depth (depth_estimation_type = \"relative\") is supported".into(),
            );
        }
        let b = t.backbone_config;
        Ok(Self {
            hidden_size: b.hidden_size,
            num_hidden_layers: b.num_hidden_layers,
            num_attention_heads: b.num_attention_heads,
            mlp_ratio: b.mlp_ratio,
            patch_size: b.patch_size,
            image_size: b.image_size,
            layer_norm_eps: b.layer_norm_eps,
            out_indices: b.out_indices,
            neck_hidden_sizes: t.neck_hidden_sizes,
            reassemble_factors: t.reassemble_factors,
            fusion_hidden_size: t.fusion_hidden_size,
            head_hidden_size: t.head_hidden_size,
            max_depth: t.max_depth,
        })
    }
}

fn relu(xs: &Tensor) -> Result<Tensor> {
    xs.relu()
}

/// `Dinov2Embeddings`: patches, the class token, position embeddings resized to the grid.
struct Embeddings {
    cls_token: Tensor,
    position_embeddings: Tensor,
    projection: Conv2d,
    patch_size: usize,
}

impl Embeddings {
    fn new(cfg: &Config, vb: VarBuilder) -> Result<Self> {
        let grid = cfg.image_size / cfg.patch_size;
        let conv = Conv2dConfig {
            stride: cfg.patch_size,
            ..Default::default()
        };
        Ok(Self {
            cls_token: vb.get((1, 1, cfg.hidden_size), "cls_token")?,
            position_embeddings: vb
                .get((1, grid * grid + 1, cfg.hidden_size), "position_embeddings")?,
            projection: conv2d(
                3,
                cfg.hidden_size,
                cfg.patch_size,
                conv,
                vb.pp("patch_embeddings.projection"),
            )?,
            patch_size: cfg.patch_size,
        })
    }

    /// `interpolate_pos_encoding`: the trained grid as it is for a square image of that grid,
    /// else resized bicubically (`align_corners=False`) in f32.
    fn position_embeddings(&self, grid_h: usize, grid_w: usize) -> Result<Tensor> {
        let positions = self.position_embeddings.dim(1)? - 1;
        if grid_h * grid_w == positions && grid_h == grid_w {
            return Ok(self.position_embeddings.clone());
        }
        let side = (positions as f64).sqrt() as usize;
        let dim = self.position_embeddings.dim(2)?;
        let dtype = self.position_embeddings.dtype();
        let cls = self.position_embeddings.narrow(1, 0, 1)?;
        let grid = self
            .position_embeddings
            .narrow(1, 1, positions)?
            .to_dtype(DType::F32)?
            .to_device(&Device::Cpu)?
            .reshape((side, side, dim))?
            .to_vec3::<f32>()?;
        let rows = bicubic_taps(side, grid_h);
        let cols = bicubic_taps(side, grid_w);
        let mut out = Vec::with_capacity(grid_h * grid_w * dim);
        for (ry, wy) in &rows {
            for (rx, wx) in &cols {
                let mut acc = vec![0f64; dim];
                for (a, &y) in ry.iter().enumerate() {
                    for (b, &x) in rx.iter().enumerate() {
                        let w = wy[a] * wx[b];
                        for (o, &g) in acc.iter_mut().zip(&grid[y][x]) {
                            *o += w * f64::from(g);
                        }
                    }
                }
                out.extend(acc.iter().map(|&v| v as f32));
            }
        }
        let patches = Tensor::from_vec(out, (1, grid_h * grid_w, dim), &Device::Cpu)?
            .to_device(self.position_embeddings.device())?
            .to_dtype(dtype)?;
        Tensor::cat(&[cls, patches], 1)
    }

    fn forward(&self, pixels: &Tensor) -> Result<Tensor> {
        let (b, _, h, w) = pixels.dims4()?;
        let patches = self
            .projection
            .forward(pixels)?
            .flatten_from(2)?
            .transpose(1, 2)?;
        let cls = self
            .cls_token
            .broadcast_as((b, 1, self.cls_token.dim(2)?))?;
        let xs = Tensor::cat(&[cls, patches], 1)?;
        xs.broadcast_add(&self.position_embeddings(h / self.patch_size, w / self.patch_size)?)
    }
}

/// PyTorch's bicubic interpolation (`align_corners=False`, A = −0.75) along one axis: for each
/// output index, four clamped source indices and their weights.
fn bicubic_taps(src: usize, dst: usize) -> Vec<([usize; 4], [f64; 4])> {
    const A: f64 = -0.75;
    let near = |x: f64| ((A + 2.0) * x - (A + 3.0)) * x * x + 1.0;
    let far = |x: f64| ((A * x - 5.0 * A) * x + 8.0 * A) * x - 4.0 * A;
    let scale = src as f32 / dst as f32;
    (0..dst)
        .map(|d| {
            let real = f64::from(scale * (d as f32 + 0.5) - 0.5);
            let i = real.floor();
            let t = real - i;
            let idx = [-1, 0, 1, 2].map(|k| (i as i64 + k).clamp(0, src as i64 - 1) as usize);
            (idx, [far(t + 1.0), near(t), near(1.0 - t), far(2.0 - t)])
        })
        .collect()
}

/// `Dinov2Layer`: pre-norm attention and MLP, each scaled by a learned `lambda1`.
struct Layer {
    norm1: LayerNorm,
    query: Linear,
    key: Linear,
    value: Linear,
    output: Linear,
    layer_scale1: Tensor,
    norm2: LayerNorm,
    fc1: Linear,
    fc2: Linear,
    layer_scale2: Tensor,
    heads: usize,
}

impl Layer {
    fn new(cfg: &Config, vb: VarBuilder) -> Result<Self> {
        let d = cfg.hidden_size;
        let hidden = (d as f64 * cfg.mlp_ratio) as usize;
        let attn = vb.pp("attention");
        Ok(Self {
            norm1: LayerNorm::new(d, cfg.layer_norm_eps, vb.pp("norm1"))?,
            query: linear(d, d, attn.pp("attention.query"))?,
            key: linear(d, d, attn.pp("attention.key"))?,
            value: linear(d, d, attn.pp("attention.value"))?,
            output: linear(d, d, attn.pp("output.dense"))?,
            layer_scale1: vb.get(d, "layer_scale1.lambda1")?,
            norm2: LayerNorm::new(d, cfg.layer_norm_eps, vb.pp("norm2"))?,
            fc1: linear(d, hidden, vb.pp("mlp.fc1"))?,
            fc2: linear(hidden, d, vb.pp("mlp.fc2"))?,
            layer_scale2: vb.get(d, "layer_scale2.lambda1")?,
            heads: cfg.num_attention_heads,
        })
    }

    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        let h = self.norm1.forward(xs)?;
        let (q, k, v) = (
            self.query.forward(&h)?,
            self.key.forward(&h)?,
            self.value.forward(&h)?,
        );
        let attn = scaled_dot_product_attention(&q, &k, &v, self.heads, false)?;
        let attn = self
            .output
            .forward(&attn)?
            .broadcast_mul(&self.layer_scale1)?;
        let xs = (xs + attn)?;
        let h = self.fc1.forward(&self.norm2.forward(&xs)?)?.gelu_erf()?;
        let h = self.fc2.forward(&h)?.broadcast_mul(&self.layer_scale2)?;
        xs + h
    }
}

/// `Dinov2Backbone` with `apply_layernorm`: the outputs of the `out_indices` layers, normed.
struct Backbone {
    embeddings: Embeddings,
    layers: Vec<Layer>,
    layernorm: LayerNorm,
    out_indices: Vec<usize>,
}

impl Backbone {
    fn new(cfg: &Config, vb: VarBuilder) -> Result<Self> {
        let layers = (0..cfg.num_hidden_layers)
            .map(|i| Layer::new(cfg, vb.pp(format!("encoder.layer.{i}"))))
            .collect::<Result<_>>()?;
        Ok(Self {
            embeddings: Embeddings::new(cfg, vb.pp("embeddings"))?,
            layers,
            layernorm: LayerNorm::new(cfg.hidden_size, cfg.layer_norm_eps, vb.pp("layernorm"))?,
            out_indices: cfg.out_indices.clone(),
        })
    }

    fn forward(&self, pixels: &Tensor) -> Result<Vec<Tensor>> {
        let mut xs = self.embeddings.forward(pixels)?;
        let mut out = Vec::new();
        for (i, layer) in self.layers.iter().enumerate() {
            xs = layer.forward(&xs)?;
            if self.out_indices.contains(&(i + 1)) {
                out.push(self.layernorm.forward(&xs)?);
            }
        }
        Ok(out)
    }
}

/// `DepthAnythingReassembleLayer`'s resize: transposed convolution up, identity, or a strided
/// convolution down.
enum Resize {
    Up(ConvTranspose2d),
    Same,
    Down(Conv2d),
}

/// `DepthAnythingPreActResidualLayer`: ReLU → conv → ReLU → conv, plus the input.
struct Residual {
    convolution1: Conv2d,
    convolution2: Conv2d,
}

impl Residual {
    fn new(ch: usize, vb: VarBuilder) -> Result<Self> {
        let cfg = Conv2dConfig {
            padding: 1,
            ..Default::default()
        };
        Ok(Self {
            convolution1: conv2d(ch, ch, 3, cfg, vb.pp("convolution1"))?,
            convolution2: conv2d(ch, ch, 3, cfg, vb.pp("convolution2"))?,
        })
    }

    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        let h = self.convolution1.forward(&relu(xs)?)?;
        let h = self.convolution2.forward(&relu(&h)?)?;
        h + xs
    }
}

/// `DepthAnythingFeatureFusionLayer`.
struct Fusion {
    projection: Conv2d,
    residual_layer1: Residual,
    residual_layer2: Residual,
}

impl Fusion {
    fn forward(
        &self,
        xs: &Tensor,
        residual: Option<&Tensor>,
        size: Option<(usize, usize)>,
    ) -> Result<Tensor> {
        let mut xs = xs.clone();
        if let Some(r) = residual {
            let (_, _, h, w) = xs.dims4()?;
            let r = if r.dims() != xs.dims() {
                r.upsample_bilinear2d(h, w, false)?
            } else {
                r.clone()
            };
            xs = (xs + self.residual_layer1.forward(&r)?)?;
        }
        let xs = self.residual_layer2.forward(&xs)?;
        let (_, _, h, w) = xs.dims4()?;
        let (th, tw) = size.unwrap_or((2 * h, 2 * w));
        self.projection
            .forward(&xs.upsample_bilinear2d(th, tw, true)?)
    }
}

/// `DepthAnythingForDepthEstimation` (relative depth).
pub struct DepthAnything {
    backbone: Backbone,
    reassemble: Vec<(Conv2d, Resize)>,
    convs: Vec<Conv2d>,
    fusion: Vec<Fusion>,
    head_conv1: Conv2d,
    head_conv2: Conv2d,
    head_conv3: Conv2d,
    patch_size: usize,
    max_depth: f64,
}

impl DepthAnything {
    /// Builds the network from weights under transformers' key names.
    pub fn new(cfg: &Config, vb: VarBuilder) -> Result<Self> {
        let neck = vb.pp("neck");
        let mut reassemble = Vec::new();
        for (i, (&ch, &factor)) in cfg
            .neck_hidden_sizes
            .iter()
            .zip(&cfg.reassemble_factors)
            .enumerate()
        {
            let vb = neck.pp(format!("reassemble_stage.layers.{i}"));
            let projection = conv2d(
                cfg.hidden_size,
                ch,
                1,
                Conv2dConfig::default(),
                vb.pp("projection"),
            )?;
            let resize = if factor > 1.0 {
                let k = factor as usize;
                let tcfg = ConvTranspose2dConfig {
                    stride: k,
                    ..Default::default()
                };
                Resize::Up(candle_nn::conv_transpose2d(
                    ch,
                    ch,
                    k,
                    tcfg,
                    vb.pp("resize"),
                )?)
            } else if factor == 1.0 {
                Resize::Same
            } else {
                let dcfg = Conv2dConfig {
                    padding: 1,
                    stride: (1.0 / factor) as usize,
                    ..Default::default()
                };
                Resize::Down(conv2d(ch, ch, 3, dcfg, vb.pp("resize"))?)
            };
            reassemble.push((projection, resize));
        }
        let pad1 = Conv2dConfig {
            padding: 1,
            ..Default::default()
        };
        let f = cfg.fusion_hidden_size;
        let convs = cfg
            .neck_hidden_sizes
            .iter()
            .enumerate()
            .map(|(i, &ch)| conv2d_no_bias(ch, f, 3, pad1, neck.pp(format!("convs.{i}"))))
            .collect::<Result<_>>()?;
        let fusion = (0..cfg.neck_hidden_sizes.len())
            .map(|i| {
                let vb = neck.pp(format!("fusion_stage.layers.{i}"));
                Ok(Fusion {
                    projection: conv2d(f, f, 1, Conv2dConfig::default(), vb.pp("projection"))?,
                    residual_layer1: Residual::new(f, vb.pp("residual_layer1"))?,
                    residual_layer2: Residual::new(f, vb.pp("residual_layer2"))?,
                })
            })
            .collect::<Result<_>>()?;
        let head = vb.pp("head");
        Ok(Self {
            backbone: Backbone::new(cfg, vb.pp("backbone"))?,
            reassemble,
            convs,
            fusion,
            head_conv1: conv2d(f, f / 2, 3, pad1, head.pp("conv1"))?,
            head_conv2: conv2d(f / 2, cfg.head_hidden_size, 3, pad1, head.pp("conv2"))?,
            head_conv3: conv2d(
                cfg.head_hidden_size,
                1,
                1,
                Conv2dConfig::default(),
                head.pp("conv3"),
            )?,
            patch_size: cfg.patch_size,
            max_depth: cfg.max_depth,
        })
    }

    /// `[B, 3, H, W]` normalised pixels (sides multiples of the patch size) → `[B, H, W]`
    /// relative depth (larger is nearer).
    pub fn forward(&self, pixels: &Tensor) -> Result<Tensor> {
        let (_, _, h, w) = pixels.dims4()?;
        let (ph, pw) = (h / self.patch_size, w / self.patch_size);
        let hidden = self.backbone.forward(pixels)?;
        // reassemble: tokens (class token dropped) → maps at 4, 2, 1, ½ the patch grid
        let mut maps = Vec::new();
        for ((xs, (projection, resize)), conv) in
            hidden.iter().zip(&self.reassemble).zip(&self.convs)
        {
            let (b, n, c) = xs.dims3()?;
            let xs = xs
                .narrow(1, 1, n - 1)?
                .reshape((b, ph, pw, c))?
                .permute((0, 3, 1, 2))?
                .contiguous()?;
            let xs = projection.forward(&xs)?;
            let xs = match resize {
                Resize::Up(t) => t.forward(&xs)?,
                Resize::Same => xs,
                Resize::Down(d) => d.forward(&xs)?,
            };
            maps.push(conv.forward(&xs)?);
        }
        // fusion, deepest first, each step upsampled to the next map's size
        maps.reverse();
        let mut fused: Option<Tensor> = None;
        for (i, layer) in self.fusion.iter().enumerate() {
            let size = match maps.get(i + 1) {
                Some(next) => {
                    let (_, _, h, w) = next.dims4()?;
                    Some((h, w))
                }
                None => None,
            };
            fused = Some(match &fused {
                None => layer.forward(&maps[i], None, size)?,
                Some(prev) => layer.forward(prev, Some(&maps[i]), size)?,
            });
        }
        let xs = fused.expect("four feature maps");
        let xs = self.head_conv1.forward(&xs)?;
        let xs = xs.upsample_bilinear2d(ph * self.patch_size, pw * self.patch_size, true)?;
        let xs = relu(&self.head_conv2.forward(&xs)?)?;
        let xs = relu(&self.head_conv3.forward(&xs)?)?;
        (xs * self.max_depth)?.squeeze(1)
    }
}

/// transformers ≥ 5's names for the attention weights → the released checkpoints' names.
fn canonical_key(key: &str) -> String {
    key.replace("attention.q_proj", "attention.attention.query")
        .replace("attention.k_proj", "attention.attention.key")
        .replace("attention.v_proj", "attention.attention.value")
        .replace("attention.o_proj", "attention.output.dense")
}

/// A name of the original repository's `DPT_DINOv2` (LiheYoung/Depth-Anything, the
/// extension's `depth_anything_vitl14.pth`) → the released name, as transformers' conversion
/// script renames them; `None` for the fused `attn.qkv`, which [`canonical_tensors`] splits.
fn original_key(key: &str) -> Option<String> {
    let fixed = [
        ("pretrained.cls_token", "backbone.embeddings.cls_token"),
        ("pretrained.mask_token", "backbone.embeddings.mask_token"),
        (
            "pretrained.pos_embed",
            "backbone.embeddings.position_embeddings",
        ),
        (
            "pretrained.patch_embed.proj.",
            "backbone.embeddings.patch_embeddings.projection.",
        ),
        ("pretrained.norm.", "backbone.layernorm."),
        ("depth_head.scratch.output_conv1.", "head.conv1."),
        ("depth_head.scratch.output_conv2.0.", "head.conv2."),
        ("depth_head.scratch.output_conv2.2.", "head.conv3."),
    ];
    for (from, to) in fixed {
        if let Some(rest) = key.strip_prefix(from) {
            return Some(format!("{to}{rest}"));
        }
    }
    if let Some(rest) = key.strip_prefix("pretrained.blocks.") {
        let (layer, rest) = rest.split_once('.')?;
        let part = [
            ("ls1.gamma", "layer_scale1.lambda1"),
            ("ls2.gamma", "layer_scale2.lambda1"),
            ("attn.proj.", "attention.output.dense."),
            ("norm1.", "norm1."),
            ("norm2.", "norm2."),
            ("mlp.", "mlp."),
        ]
        .into_iter()
        .find_map(|(from, to)| rest.strip_prefix(from).map(|r| format!("{to}{r}")))?;
        return Some(format!("backbone.encoder.layer.{layer}.{part}"));
    }
    let head = key.strip_prefix("depth_head.")?;
    if let Some(rest) = head.strip_prefix("projects.") {
        let (i, rest) = rest.split_once('.')?;
        return Some(format!(
            "neck.reassemble_stage.layers.{i}.projection.{rest}"
        ));
    }
    if let Some(rest) = head.strip_prefix("resize_layers.") {
        let (i, rest) = rest.split_once('.')?;
        return Some(format!("neck.reassemble_stage.layers.{i}.resize.{rest}"));
    }
    let scratch = head.strip_prefix("scratch.")?;
    if let Some(rest) = scratch.strip_prefix("layer") {
        // layer{1..4}_rn.weight → convs.{0..3}.weight
        let (n, rest) = rest.split_once("_rn.")?;
        let i = n.parse::<usize>().ok()?.checked_sub(1)?;
        return Some(format!("neck.convs.{i}.{rest}"));
    }
    // refinenet{1..4} → fusion_stage.layers.{3..0}: the original fuses from refinenet4 down
    let rest = scratch.strip_prefix("refinenet")?;
    let (n, rest) = rest.split_once('.')?;
    let j = 4usize.checked_sub(n.parse::<usize>().ok()?)?;
    let part = [
        ("out_conv.", "projection."),
        ("resConfUnit1.conv1.", "residual_layer1.convolution1."),
        ("resConfUnit1.conv2.", "residual_layer1.convolution2."),
        ("resConfUnit2.conv1.", "residual_layer2.convolution1."),
        ("resConfUnit2.conv2.", "residual_layer2.convolution2."),
    ]
    .into_iter()
    .find_map(|(from, to)| rest.strip_prefix(from).map(|r| format!("{to}{r}")))?;
    Some(format!("neck.fusion_stage.layers.{j}.{part}"))
}

/// The tensors of a Depth Anything checkpoint under the released key names, from either
/// transformers layout (an optional `depth_anything.` wrapper dropped) or the original
/// repository's (its fused `attn.qkv` split into query, key and value). Names of neither are
/// kept as they are.
pub fn canonical_tensors(tensors: HashMap<String, Tensor>) -> Result<HashMap<String, Tensor>> {
    let mut out = HashMap::with_capacity(tensors.len());
    for (k, v) in tensors {
        let k = k.strip_prefix("depth_anything.").unwrap_or(&k).to_owned();
        if let Some(rest) = k.strip_prefix("pretrained.blocks.") {
            if let Some((layer, suffix)) = rest.split_once(".attn.qkv.") {
                let third = v.dim(0)? / 3;
                for (i, name) in ["query", "key", "value"].iter().enumerate() {
                    let key = format!(
                        "backbone.encoder.layer.{layer}.attention.attention.{name}.{suffix}"
                    );
                    out.insert(key, v.narrow(0, i * third, third)?.contiguous()?);
                }
                continue;
            }
        }
        let k = original_key(&k).unwrap_or_else(|| canonical_key(&k));
        out.insert(k, v);
    }
    Ok(out)
}

/// Loads a Depth Anything checkpoint (safetensors or `.pth`/`.bin` through `sdkube-weights`)
/// onto `device` in `dtype`.
pub fn load(
    path: &Path,
    cfg: &Config,
    device: &Device,
    dtype: DType,
) -> std::result::Result<DepthAnything, crate::Error> {
    let tensors = sdkube_weights::load(path, device, dtype)?;
    let net = canonical_tensors(tensors).and_then(|tensors| {
        DepthAnything::new(cfg, VarBuilder::from_tensors(tensors, dtype, device))
    });
    net.map_err(|source| crate::Error::Model {
        context: format!("Depth Anything weights {}", path.display()),
        source,
    })
}
