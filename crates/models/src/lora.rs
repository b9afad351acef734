//! LoRA add-on weights (Hu et al. 2021, <https://arxiv.org/abs/2106.09685>) and the LyCORIS
//! variants (LoCon, LoHa, LoKr): files of small updates to a model's linear and convolution
//! weights, read in the layouts people share them in and turned into weight deltas on the
//! model's own (diffusers/transformers) keys.
//!
//! Layouts read:
//! - kohya/A1111: `lora_unet_*`, `lora_te_*`, SDXL `lora_te1_*`/`lora_te2_*`. A module name is
//!   the diffusers/transformers module path with `.` → `_`, or for the UNet the original SGM
//!   path (kohya's SDXL files: `lora_unet_input_blocks_4_1_…`). Parameters `lora_down`/`lora_up`
//!   (+ `lora_mid`: LoCon's CP form) with `alpha`; LyCORIS `hada_w{1,2}_{a,b}` (LoHa),
//!   `lokr_w{1,2}[_a,_b]` (LoKr), `diff` (a full difference).
//! - diffusers/PEFT: `unet.…`, `text_encoder.…`, `text_encoder_2.…` with `lora_A`/`lora_B`
//!   (or the older `lora.down`/`lora.up`, `lora_linear_layer`, attention-processor `to_q_lora`),
//!   scaled by the `lora_alpha`/`r` that diffusers' `save_lora_weights` keeps in the header
//!   (`lora_adapter_metadata`); without it the scale is 1, as diffusers loads such files.
//!
//! Deltas follow A1111's `extensions-builtin/Lora/network_*.py`: LoRA `ΔW = alpha/rank ·
//! up·down`, LoHa `alpha/rank · (w1a·w1b) ⊙ (w2a·w2b)`, LoKr `[alpha/rank ·] w1 ⊗ w2`. A job's
//! weight is `W + Σ multiplier·ΔW`, summed in f32 and cast once ([`patch`]): the base weights
//! stay as they are, so switching LoRAs costs the touched tensors only.
//!
//! Nothing is dropped quietly: a parameter this module does not know (DoRA's `dora_scale`, a
//! Tucker-form `hada_t1`, biases), a module no layer of the model has, or a shape that does
//! not fit is an error naming the file.

use std::collections::{BTreeMap, HashMap};
use std::io::Read;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};

use crate::checkpoint::{Family, SdWeights};
use crate::ldm::{self, TensorMap};

/// The network a delta applies to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Part {
    /// The (first) text encoder.
    TextEncoder,
    /// SDXL's second text encoder.
    TextEncoder2,
    /// The UNet.
    UNet,
}

impl Part {
    /// Whether the part is a text encoder (A1111's `te` multiplier applies to it).
    pub fn is_text(self) -> bool {
        self != Part::UNet
    }
}

/// Why a LoRA file cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum LoraError {
    /// The file cannot be read as weights, or its content is not a LoRA.
    #[error("LoRA {}: {message}", path.display())]
    Invalid {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        message: String,
    },
    /// The LoRA is valid but made for another model.
    #[error("LoRA {} does not fit this {family} model: {message}", path.display())]
    Mismatch {
        /// The file.
        path: PathBuf,
        /// The model's family name.
        family: &'static str,
        /// What does not fit.
        message: String,
    },
}

/// How one module's weight changes.
#[derive(Debug, Clone)]
enum Update {
    /// `up · [mid ·] down` (LoRA, LoCon).
    LowRank {
        down: Tensor,
        up: Tensor,
        mid: Option<Tensor>,
    },
    /// `(w1a · w1b) ⊙ (w2a · w2b)` (LoHa).
    Hadamard([Tensor; 4]),
    /// `w1 ⊗ w2` (LoKr); each factor whole or a product of two.
    Kronecker(Factor, Factor),
    /// A full difference (`diff`).
    Full(Tensor),
}

#[derive(Debug, Clone)]
enum Factor {
    Whole(Tensor),
    Product(Tensor, Tensor),
}

impl Factor {
    fn dims(&self) -> (usize, usize) {
        match self {
            Factor::Whole(t) => (t.dims()[0], t.elem_count() / t.dims()[0].max(1)),
            Factor::Product(a, b) => (a.dims()[0], b.elem_count() / b.dims()[0].max(1)),
        }
    }

    fn tensor(&self, device: &Device) -> candle_core::Result<Tensor> {
        match self {
            Factor::Whole(t) => f32_on(t, device),
            Factor::Product(a, b) => {
                f32_on(a, device)?.matmul(&f32_on(b, device)?.flatten_from(1)?)
            }
        }
    }
}

/// How the file names a module.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Naming {
    /// kohya `lora_unet_`, `lora_te_`, `lora_te1_`, `lora_te2_` (module path with `_`).
    Kohya(KohyaPrefix),
    /// diffusers `unet.`, `text_encoder.`, `text_encoder_2.` (dotted module path).
    Diffusers(Part),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum KohyaPrefix {
    Unet,
    Te,
    Te1,
    Te2,
}

#[derive(Debug, Clone)]
struct Module {
    naming: Naming,
    name: String,
    update: Update,
    scale: f64,
}

/// A LoRA file as read, before it meets a model.
#[derive(Debug, Clone)]
pub struct LoraFile {
    /// Where it was read from.
    pub path: PathBuf,
    /// The safetensors header's `__metadata__` (empty for other formats).
    pub metadata: BTreeMap<String, String>,
    modules: Vec<Module>,
}

/// A LoRA mapped onto one model's weight keys, ready to patch.
#[derive(Debug, Clone)]
pub struct BoundLora {
    /// The file it came from.
    pub path: PathBuf,
    patches: Vec<Patch>,
}

#[derive(Debug, Clone)]
struct Patch {
    part: Part,
    key: String,
    update: Update,
    scale: f64,
}

fn take(params: &mut HashMap<String, Tensor>, p: &str) -> Option<Tensor> {
    params.remove(p)
}

/// A LoKr factor: `<base>` whole, or `<base>_a · <base>_b`.
fn kron_factor(params: &mut HashMap<String, Tensor>, base: &str) -> Option<Factor> {
    if let Some(t) = params.remove(base) {
        return Some(Factor::Whole(t));
    }
    let a = params.remove(&format!("{base}_a"))?;
    let b = params.remove(&format!("{base}_b"))?;
    Some(Factor::Product(a, b))
}

fn f32_on(t: &Tensor, device: &Device) -> candle_core::Result<Tensor> {
    t.to_device(device)?.to_dtype(DType::F32)
}

fn scalar(t: &Tensor) -> candle_core::Result<f64> {
    t.to_dtype(DType::F64)?
        .flatten_all()?
        .to_vec1::<f64>()?
        .first()
        .copied()
        .ok_or_else(|| candle_core::Error::Msg("empty alpha".into()))
}

/// The `__metadata__` of a safetensors file's header (empty for other formats or none).
pub fn read_metadata(path: &Path) -> std::io::Result<BTreeMap<String, String>> {
    let mut f = std::fs::File::open(path)?;
    let mut len = [0u8; 8];
    if f.read_exact(&mut len).is_err() {
        return Ok(BTreeMap::new());
    }
    let len = u64::from_le_bytes(len);
    let size = f.metadata()?.len();
    // Not a safetensors file (torch zip or pickle), or a header too big to be one.
    if len.saturating_add(8) > size || len > 100 << 20 {
        return Ok(BTreeMap::new());
    }
    let mut header = vec![0u8; len as usize];
    f.read_exact(&mut header)?;
    let Ok(serde_json::Value::Object(map)) = serde_json::from_slice::<serde_json::Value>(&header)
    else {
        return Ok(BTreeMap::new());
    };
    let Some(serde_json::Value::Object(meta)) = map.get("__metadata__") else {
        return Ok(BTreeMap::new());
    };
    Ok(meta
        .iter()
        .map(|(k, v)| {
            let v = match v {
                serde_json::Value::String(s) => s.clone(),
                other => other.to_string(),
            };
            (k.clone(), v)
        })
        .collect())
}

/// Splits a file key into how it names its module, the module, and the parameter.
fn split_key(key: &str) -> Option<(Naming, String, String)> {
    for (prefix, kind) in [
        ("lora_unet_", KohyaPrefix::Unet),
        ("lora_te1_", KohyaPrefix::Te1),
        ("lora_te2_", KohyaPrefix::Te2),
        ("lora_te_", KohyaPrefix::Te),
    ] {
        if let Some(rest) = key.strip_prefix(prefix) {
            let (module, param) = rest.split_once('.')?;
            let param = match param {
                "lora_down.weight" => "down",
                "lora_up.weight" => "up",
                "lora_mid.weight" => "mid",
                other => other,
            };
            return Some((Naming::Kohya(kind), module.to_string(), param.to_string()));
        }
    }
    for (prefix, part) in [
        ("unet.", Part::UNet),
        ("text_encoder_2.", Part::TextEncoder2),
        ("text_encoder.", Part::TextEncoder),
    ] {
        let Some(rest) = key.strip_prefix(prefix) else {
            continue;
        };
        for (suffix, param) in [
            (".lora_A.weight", "down"),
            (".lora_B.weight", "up"),
            (".lora.down.weight", "down"),
            (".lora.up.weight", "up"),
            (".lora_down.weight", "down"),
            (".lora_up.weight", "up"),
            (".lora_linear_layer.down.weight", "down"),
            (".lora_linear_layer.up.weight", "up"),
            (".alpha", "alpha"),
        ] {
            if let Some(module) = rest.strip_suffix(suffix) {
                // The attention-processor form: `attn1.processor.to_q_lora` is `attn1.to_q`.
                let module = match module.strip_suffix("_lora") {
                    Some(m) => {
                        let m = m.replace(".processor.", ".");
                        if m.ends_with(".to_out") {
                            format!("{m}.0")
                        } else {
                            m
                        }
                    }
                    None => module.to_string(),
                };
                return Some((Naming::Diffusers(part), module, param.to_string()));
            }
        }
        // A parameter of a known prefix that is not a LoRA factor (a bias, DoRA's magnitude).
        let (module, param) = rest.rsplit_once('.')?;
        return Some((
            Naming::Diffusers(part),
            module.to_string(),
            param.to_string(),
        ));
    }
    None
}

/// PEFT's scale for one module: `lora_alpha / r` (or `/ √r` with rsLoRA), per-module patterns
/// first, from diffusers' `lora_adapter_metadata`.
fn peft_scale(meta: &serde_json::Value, part: Part, module: &str) -> Option<f64> {
    let prefix = match part {
        Part::UNet => "unet",
        Part::TextEncoder => "text_encoder",
        Part::TextEncoder2 => "text_encoder_2",
    };
    let get = |k: &str| meta.get(format!("{prefix}.{k}"));
    let pattern = |k: &str| -> Option<f64> {
        get(k)?.as_object()?.iter().find_map(|(pat, v)| {
            (module == pat || module.ends_with(&format!(".{pat}"))).then(|| v.as_f64())?
        })
    };
    let r = pattern("rank_pattern").or_else(|| get("r")?.as_f64())?;
    let alpha = pattern("alpha_pattern").or_else(|| get("lora_alpha")?.as_f64())?;
    let rs = get("use_rslora").and_then(|v| v.as_bool()).unwrap_or(false);
    Some(if rs { alpha / r.sqrt() } else { alpha / r })
}

impl LoraFile {
    /// Reads a LoRA file (`.safetensors`, or `.pt`/`.ckpt` through the tensor-only reader).
    pub fn read(path: &Path) -> Result<Self, LoraError> {
        let invalid = |message: String| LoraError::Invalid {
            path: path.to_path_buf(),
            message,
        };
        let tensors = crate::checkpoint::read_tensors(path).map_err(|e| invalid(e.to_string()))?;
        let metadata = read_metadata(path).map_err(|e| invalid(e.to_string()))?;
        Self::from_tensors(path, tensors, metadata)
    }

    /// A LoRA from tensors already read (`path` names it in errors).
    pub fn from_tensors(
        path: &Path,
        tensors: TensorMap,
        metadata: BTreeMap<String, String>,
    ) -> Result<Self, LoraError> {
        let invalid = |message: String| LoraError::Invalid {
            path: path.to_path_buf(),
            message,
        };
        let peft: Option<serde_json::Value> = metadata
            .get("lora_adapter_metadata")
            .and_then(|s| serde_json::from_str(s).ok());
        let mut grouped: BTreeMap<(Naming, String), HashMap<String, Tensor>> = BTreeMap::new();
        for (key, t) in tensors {
            let (naming, module, param) = split_key(&key).ok_or_else(|| {
                invalid(format!(
                    "`{key}` is not a LoRA key (kohya `lora_unet_…`/`lora_te_…`, or diffusers \
                     `unet.…`/`text_encoder.…`)"
                ))
            })?;
            grouped
                .entry((naming, module))
                .or_default()
                .insert(param, t);
        }
        if grouped.is_empty() {
            return Err(invalid("no LoRA modules in it".into()));
        }
        let mut modules = Vec::with_capacity(grouped.len());
        for ((naming, name), mut params) in grouped {
            let alpha = take(&mut params, "alpha").map(|t| scalar(&t)).transpose();
            let alpha = alpha.map_err(|e| invalid(format!("`{name}.alpha`: {e}")))?;
            let has = |params: &HashMap<String, Tensor>, p: &str| params.contains_key(p);
            let (update, dim) = if has(&params, "down") && has(&params, "up") {
                let (down, up) = (take(&mut params, "down"), take(&mut params, "up"));
                let (Some(down), Some(up)) = (down, up) else {
                    unreachable!("both checked above")
                };
                let dim = down.dims()[0];
                let mid = take(&mut params, "mid");
                (Update::LowRank { down, up, mid }, Some(dim))
            } else if has(&params, "hada_w1_a") {
                let mut w = Vec::with_capacity(4);
                for p in ["hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b"] {
                    w.push(
                        take(&mut params, p)
                            .ok_or_else(|| invalid(format!("LoHa module `{name}` has no `{p}`")))?,
                    );
                }
                let dim = w[1].dims()[0];
                let w: [Tensor; 4] = w.try_into().expect("four factors");
                (Update::Hadamard(w), Some(dim))
            } else if has(&params, "lokr_w1") || has(&params, "lokr_w1_a") {
                let w1 = kron_factor(&mut params, "lokr_w1")
                    .ok_or_else(|| invalid(format!("LoKr module `{name}` has no `lokr_w1`")))?;
                let w2 = kron_factor(&mut params, "lokr_w2")
                    .ok_or_else(|| invalid(format!("LoKr module `{name}` has no `lokr_w2`")))?;
                // A1111: the rank of the first decomposed factor, none if both are whole.
                let dim = [&w1, &w2].into_iter().find_map(|f| match f {
                    Factor::Product(_, b) => Some(b.dims()[0]),
                    Factor::Whole(_) => None,
                });
                (Update::Kronecker(w1, w2), dim)
            } else if let Some(diff) = take(&mut params, "diff") {
                (Update::Full(diff), None)
            } else {
                let found: Vec<&String> = params.keys().collect();
                return Err(invalid(format!(
                    "module `{name}` has no LoRA factors (found {found:?})"
                )));
            };
            if let Some(param) = params.keys().next() {
                return Err(invalid(format!(
                    "module `{name}`: parameter `{param}` is not supported (DoRA, Tucker-form \
                     LyCORIS and bias updates are not)"
                )));
            }
            let scale = match (naming, alpha, dim) {
                (_, Some(alpha), Some(dim)) => alpha / dim as f64,
                (Naming::Diffusers(part), None, _) => peft
                    .as_ref()
                    .and_then(|m| peft_scale(m, part, &name))
                    .unwrap_or(1.0),
                _ => 1.0,
            };
            modules.push(Module {
                naming,
                name,
                update,
                scale,
            });
        }
        Ok(Self {
            path: path.to_path_buf(),
            metadata,
            modules,
        })
    }
}

impl LoraFile {
    /// Modules (layers) the file changes.
    pub fn module_count(&self) -> usize {
        self.modules.len()
    }

    /// Maps the file onto `weights`' keys, checking every module has a layer of the right
    /// shape. A LoRA for another family, or with modules the model lacks, is an error that
    /// names the file and the first modules that do not fit.
    pub fn bind(&self, weights: &SdWeights) -> Result<BoundLora, LoraError> {
        let family = weights.family;
        let mismatch = |message: String| LoraError::Mismatch {
            path: self.path.clone(),
            family: family.name(),
            message,
        };
        let sdxl = family == Family::Sdxl;
        let kohya_te = self
            .modules
            .iter()
            .any(|m| m.naming == Naming::Kohya(KohyaPrefix::Te));
        let kohya_te12 = self
            .modules
            .iter()
            .any(|m| matches!(m.naming, Naming::Kohya(KohyaPrefix::Te1 | KohyaPrefix::Te2)));
        if sdxl && kohya_te {
            return Err(mismatch(
                "it is an SD 1.x/2.x LoRA (`lora_te_` text-encoder keys; SDXL LoRAs have \
                 `lora_te1_`/`lora_te2_`)"
                    .into(),
            ));
        }
        if !sdxl && kohya_te12 {
            return Err(mismatch(
                "it is an SDXL LoRA (`lora_te1_`/`lora_te2_` text-encoder keys)".into(),
            ));
        }
        let index = ModelIndex::new(weights);
        let mut patches = Vec::with_capacity(self.modules.len());
        let mut unknown = Vec::new();
        for m in &self.modules {
            let part = match m.naming {
                Naming::Kohya(KohyaPrefix::Unet) | Naming::Diffusers(Part::UNet) => Part::UNet,
                Naming::Kohya(KohyaPrefix::Te | KohyaPrefix::Te1)
                | Naming::Diffusers(Part::TextEncoder) => Part::TextEncoder,
                Naming::Kohya(KohyaPrefix::Te2) | Naming::Diffusers(Part::TextEncoder2) => {
                    Part::TextEncoder2
                }
            };
            let Some((key, shape)) = index.find(part, &m.name) else {
                // SD 2.x checkpoints drop the text encoder's last layer (they condition on the
                // penultimate one): a delta to it would change nothing, as in A1111.
                if index.beyond_text_layers(part, &m.name) {
                    tracing::debug!(module = %m.display_name(), "LoRA module for an unused layer");
                    continue;
                }
                unknown.push(m.display_name());
                continue;
            };
            if let Some(why) = m.update.misfit(shape) {
                unknown.push(format!("{} ({why})", m.display_name()));
                continue;
            }
            patches.push(Patch {
                part,
                key: key.to_string(),
                update: m.update.clone(),
                scale: m.scale,
            });
        }
        if !unknown.is_empty() {
            let shown: Vec<&str> = unknown.iter().take(4).map(String::as_str).collect();
            let more = unknown.len().saturating_sub(shown.len());
            return Err(mismatch(format!(
                "{} of its {} modules match no layer of the model: {}{}",
                unknown.len(),
                self.modules.len(),
                shown.join(", "),
                if more > 0 {
                    format!(" and {more} more")
                } else {
                    String::new()
                }
            )));
        }
        Ok(BoundLora {
            path: self.path.clone(),
            patches,
        })
    }
}

impl Module {
    fn display_name(&self) -> String {
        match self.naming {
            Naming::Kohya(p) => {
                let prefix = match p {
                    KohyaPrefix::Unet => "lora_unet_",
                    KohyaPrefix::Te => "lora_te_",
                    KohyaPrefix::Te1 => "lora_te1_",
                    KohyaPrefix::Te2 => "lora_te2_",
                };
                format!("{prefix}{}", self.name)
            }
            Naming::Diffusers(Part::UNet) => format!("unet.{}", self.name),
            Naming::Diffusers(Part::TextEncoder) => format!("text_encoder.{}", self.name),
            Naming::Diffusers(Part::TextEncoder2) => format!("text_encoder_2.{}", self.name),
        }
    }
}

impl Update {
    /// Why the delta cannot have `shape` (the layer's weight), if it cannot.
    fn misfit(&self, shape: &[usize]) -> Option<String> {
        let out = shape[0];
        let inner: usize = shape[1..].iter().product();
        let (o, i) = match self {
            Update::LowRank { down, up, mid } => {
                let rank = down.dims()[0];
                if up.elem_count() != up.dims()[0] * rank {
                    return Some(format!(
                        "up {:?} and down {:?} ranks differ",
                        up.dims(),
                        down.dims()
                    ));
                }
                let i = match mid {
                    Some(mid) => {
                        down.dims().get(1).copied().unwrap_or(0)
                            * mid.dims()[2..].iter().product::<usize>()
                    }
                    None => down.elem_count() / rank.max(1),
                };
                (up.dims()[0], i)
            }
            Update::Hadamard([w1a, w1b, ..]) => {
                (w1a.dims()[0], w1b.elem_count() / w1b.dims()[0].max(1))
            }
            Update::Kronecker(w1, w2) => {
                let ((a, b), (c, d)) = (w1.dims(), w2.dims());
                (a * c, b * d)
            }
            Update::Full(d) => (d.dims()[0], d.elem_count() / d.dims()[0].max(1)),
        };
        (o != out || i != inner).then(|| format!("a {o}×{i} update for a {shape:?} weight"))
    }

    /// `ΔW` in f32 on `device`, shaped like the weight (before the file's scale).
    fn delta(&self, shape: &[usize], device: &Device) -> candle_core::Result<Tensor> {
        let d = match self {
            Update::LowRank {
                down,
                up,
                mid: None,
            } => f32_on(up, device)?
                .flatten_from(1)?
                .matmul(&f32_on(down, device)?.flatten_from(1)?)?,
            Update::LowRank {
                down,
                up,
                mid: Some(mid),
            } => {
                // ΔW[o, i, k, l] = Σ_ab up[o, a] · mid[a, b, k, l] · down[b, i]
                let up = f32_on(up, device)?.flatten_from(1)?;
                let down = f32_on(down, device)?.flatten_from(1)?;
                let mid = f32_on(mid, device)?;
                let (r_up, r_down, kh, kw) = mid.dims4()?;
                let (out, inp, k) = (up.dim(0)?, down.dim(1)?, kh * kw);
                up.matmul(&mid.reshape((r_up, r_down * k))?)?
                    .reshape((out, r_down, k))?
                    .transpose(1, 2)?
                    .reshape((out * k, r_down))?
                    .matmul(&down)?
                    .reshape((out, k, inp))?
                    .transpose(1, 2)?
                    .contiguous()?
            }
            Update::Hadamard([w1a, w1b, w2a, w2b]) => {
                let product = |a: &Tensor, b: &Tensor| {
                    f32_on(a, device)?.matmul(&f32_on(b, device)?.flatten_from(1)?)
                };
                (product(w1a, w1b)? * product(w2a, w2b)?)?
            }
            Update::Kronecker(w1, w2) => {
                // w1 ⊗ w2, w2's trailing kernel dimensions kept (A1111's `make_kron`).
                let w1 = w1.tensor(device)?;
                let w2 = w2.tensor(device)?;
                let (a, b) = (w1.dim(0)?, w1.elem_count() / w1.dim(0)?);
                let kernel: usize = shape[2..].iter().product();
                let c = w2.dim(0)?;
                let d = w2.elem_count() / (c * kernel);
                w1.reshape((a, 1, b, 1, 1))?
                    .broadcast_mul(&w2.reshape((1, c, 1, d, kernel))?)?
                    .reshape((a * c, b * d * kernel))?
            }
            Update::Full(d) => f32_on(d, device)?,
        };
        d.reshape(shape)
    }
}

/// The model's layers by every name a LoRA may give them.
struct ModelIndex<'a> {
    names: HashMap<(Part, String), (&'a str, &'a [usize])>,
    text_layers: HashMap<Part, usize>,
}

impl<'a> ModelIndex<'a> {
    fn new(weights: &'a SdWeights) -> Self {
        let mut names = HashMap::new();
        let mut add = |part: Part, tensors: &'a TensorMap, extra: &dyn Fn(&str) -> Vec<String>| {
            for (key, t) in tensors {
                let Some(module) = key.strip_suffix(".weight") else {
                    continue;
                };
                if t.rank() < 2 {
                    continue;
                }
                let entry = (key.as_str(), t.dims());
                let mut aliases = vec![module.to_string()];
                aliases.extend(extra(module));
                for alias in aliases {
                    names.insert((part, alias.replace('.', "_")), entry);
                    names.insert((part, alias), entry);
                }
            }
        };
        // transformers 5 saves CLIPTextModel without its `text_model.` level.
        let text = |m: &str| {
            m.strip_prefix("text_model.")
                .map(str::to_string)
                .into_iter()
                .collect()
        };
        add(Part::TextEncoder, &weights.text_encoder.tensors, &text);
        if let Some(te2) = &weights.text_encoder_2 {
            add(Part::TextEncoder2, &te2.tensors, &text);
        }
        let cfg = &weights.unet.config;
        let up_attention: Vec<bool> = cfg
            .up_block_types
            .iter()
            .map(|t| t.contains("CrossAttn"))
            .collect();
        let lpb = cfg.layers_per_block;
        let sgm = |m: &str| {
            ldm::ldm_unet_module(m, lpb, &up_attention)
                .into_iter()
                .collect()
        };
        add(Part::UNet, &weights.unet.tensors, &sgm);
        let mut text_layers = HashMap::from([(
            Part::TextEncoder,
            weights.text_encoder.config.num_hidden_layers,
        )]);
        if let Some(te2) = &weights.text_encoder_2 {
            text_layers.insert(Part::TextEncoder2, te2.config.num_hidden_layers);
        }
        Self { names, text_layers }
    }

    /// Whether `name` is a layer of a text encoder past the ones the model keeps.
    fn beyond_text_layers(&self, part: Part, name: &str) -> bool {
        let Some(&layers) = self.text_layers.get(&part) else {
            return false;
        };
        let rest = ["encoder_layers_", "encoder.layers."]
            .iter()
            .find_map(|p| name.split_once(p).map(|(_, r)| r));
        let index = rest.and_then(|r| {
            let digits: String = r.chars().take_while(char::is_ascii_digit).collect();
            digits.parse::<usize>().ok()
        });
        index.is_some_and(|i| i >= layers)
    }

    fn find(&self, part: Part, name: &str) -> Option<(&'a str, &'a [usize])> {
        self.names.get(&(part, name.to_string())).copied()
    }
}

impl BoundLora {
    /// The weight keys of `part` this LoRA changes.
    pub fn keys(&self, part: Part) -> impl Iterator<Item = &str> {
        self.patches
            .iter()
            .filter(move |p| p.part == part)
            .map(|p| p.key.as_str())
    }

    /// Whether it changes `part` at all.
    pub fn touches(&self, part: Part) -> bool {
        self.patches.iter().any(|p| p.part == part)
    }
}

/// The weights of `part` that `loras` change, each `W + Σ multiplier·scale·ΔW` summed in f32
/// on `device` and cast to `dtype`; untouched keys are not in the result. `base` holds the
/// part's unpatched weights on any device.
pub fn patch(
    base: &TensorMap,
    part: Part,
    loras: &[(&BoundLora, f64)],
    device: &Device,
    dtype: DType,
) -> candle_core::Result<TensorMap> {
    let mut sums: BTreeMap<&str, Tensor> = BTreeMap::new();
    for (lora, multiplier) in loras {
        if *multiplier == 0.0 {
            continue;
        }
        for p in lora.patches.iter().filter(|p| p.part == part) {
            let Some(w) = base.get(&p.key) else {
                candle_core::bail!("LoRA {}: no weight {}", lora.path.display(), p.key)
            };
            let d = (p.update.delta(w.dims(), device)? * (multiplier * p.scale))?;
            let sum = match sums.remove(p.key.as_str()) {
                Some(s) => (s + d)?,
                None => d,
            };
            sums.insert(&p.key, sum);
        }
    }
    sums.into_iter()
        .map(|(key, d)| {
            let w = f32_on(&base[key], device)?;
            Ok((key.to_string(), (w + d)?.to_dtype(dtype)?))
        })
        .collect()
}
