//! Loading a Stable Diffusion model: a diffusers folder (`model_index.json`, `unet/`, `vae/`,
//! `text_encoder/`, `text_encoder_2/`) or a single-file A1111/LDM checkpoint (`.safetensors`,
//! or `.ckpt` read as tensors only), plus separate VAE files as A1111's `--vae`.
//!
//! The family (SD 1.x, SD 2.x, SDXL) is told from the weights' key tree, never the file name.
//! Weights stay on the CPU in their stored dtype; networks are built on a device on demand,
//! which is what lets `--vram low` keep only the network in use on the GPU. A loader that keeps
//! every network on a GPU can have a diffusers folder's text encoders and UNet read straight
//! onto it instead ([`LoadOptions::device`]).

use std::path::{Path, PathBuf};

use candle_core::{DType, Device};
use candle_nn::VarBuilder;
use serde::de::DeserializeOwned;

use crate::blocks::ProjectionStacks;
use crate::clip::ClipTextModel;
use crate::config::{ClipTextConfig, UNetConfig, VaeConfig};
use crate::ldm::{self, TensorMap};
use crate::unet::UNet2DConditionModel;
use crate::vae::AutoencoderKL;

/// Why a model could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    /// The file or folder is not a model this crate can load.
    #[error("{path}: {message}")]
    Invalid {
        /// The file or folder.
        path: PathBuf,
        /// What is wrong with it.
        message: String,
    },
    /// A file could not be read.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// A weight file could not be read.
    #[error(transparent)]
    Weights(#[from] sdkube_weights::Error),
    /// A network could not be built from the weights.
    #[error("building the network: {0}")]
    Candle(#[from] candle_core::Error),
}

pub(crate) fn invalid(path: &Path, message: impl Into<String>) -> LoadError {
    LoadError::Invalid {
        path: path.to_path_buf(),
        message: message.into(),
    }
}

/// Model family, as detected from the weights.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub enum Family {
    /// SD 1.x: CLIP ViT-L text encoder, ε prediction.
    Sd1,
    /// SD 2.x: OpenCLIP ViT-H text encoder, ε or v prediction.
    Sd2,
    /// SDXL: two text encoders and the added time/text conditioning.
    Sdxl,
    /// SDXL's refiner: OpenCLIP ViT-bigG alone (in `text_encoder`), and time ids that end in
    /// an aesthetic score instead of the target size. It denoises SDXL latents.
    SdxlRefiner,
}

impl Family {
    /// The family's name as people write it ("SD 1.x", "SDXL").
    pub fn name(self) -> &'static str {
        match self {
            Family::Sd1 => "SD 1.x",
            Family::Sd2 => "SD 2.x",
            Family::Sdxl => "SDXL",
            Family::SdxlRefiner => "SDXL refiner",
        }
    }

    /// Default VAE latent scaling factor.
    pub fn vae_scaling(self) -> f64 {
        match self {
            Family::Sdxl | Family::SdxlRefiner => 0.13025,
            _ => 0.18215,
        }
    }

    /// The latent side the family's models were trained at, which a single file does not
    /// record: 1024² for SDXL and its refiner, 768² for SD 2.x v-prediction (768-v), 512²
    /// otherwise (the sizes diffusers' `from_single_file` assumes).
    pub fn native_sample_size(self, prediction: Prediction) -> usize {
        match (self, prediction) {
            (Family::Sdxl | Family::SdxlRefiner, _) => 128,
            (Family::Sd2, Prediction::V) => 96,
            _ => 64,
        }
    }

    /// Whether both families' UNets denoise the same latents (SD 1.x and 2.x share one VAE,
    /// SDXL and its refiner another), so that one can finish what the other started.
    pub fn shares_latents_with(self, other: Family) -> bool {
        let xl = |f: Family| matches!(f, Family::Sdxl | Family::SdxlRefiner);
        xl(self) == xl(other)
    }
}

/// What the UNet predicts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub enum Prediction {
    /// The noise (ε) added to the latent.
    Epsilon,
    /// The velocity `v = √ᾱ·ε − √(1−ᾱ)·x₀` (SD 2.x 768-v models).
    V,
}

/// A network's configuration and its weights (CPU, stored dtype).
#[derive(Debug, Clone)]
pub struct Component<C> {
    /// The network's configuration.
    pub config: C,
    /// Its weights by checkpoint key.
    pub tensors: TensorMap,
}

impl<C> Component<C> {
    pub(crate) fn var_builder(&self, device: &Device, dtype: DType) -> VarBuilder<'static> {
        VarBuilder::from_tensors(self.tensors.clone(), dtype, device)
    }

    /// Bytes the weights take in `dtype`.
    pub fn size_in(&self, dtype: DType) -> usize {
        self.tensors
            .values()
            .map(|t| t.elem_count() * dtype.size_in_bytes())
            .sum()
    }
}

impl Component<ClipTextConfig> {
    /// The text encoder on `device`, weights cast to `dtype`.
    pub fn build(&self, device: &Device, dtype: DType) -> candle_core::Result<ClipTextModel> {
        ClipTextModel::new(self.var_builder(device, dtype), &self.config)
    }
}

impl Component<UNetConfig> {
    /// The UNet on `device`, weights cast to `dtype`.
    pub fn build(
        &self,
        device: &Device,
        dtype: DType,
    ) -> candle_core::Result<UNet2DConditionModel> {
        UNet2DConditionModel::new(self.var_builder(device, dtype), &self.config)
    }

    /// [`build`](Self::build), these weights consumed: where the GPU fuses self-attention
    /// projections, each attention's q, k and v are stacked in place and freed as its stack is
    /// made, so the device never holds both (as a served engine's base weights).
    pub fn into_unet(
        mut self,
        device: &Device,
        dtype: DType,
    ) -> candle_core::Result<UNet2DConditionModel> {
        let stacks = ProjectionStacks::stack_on(&mut self.tensors, device)?;
        let vb = VarBuilder::from_tensors(std::mem::take(&mut self.tensors), dtype, device);
        UNet2DConditionModel::new_sharing(vb, &self.config, &stacks)
    }
}

impl Component<VaeConfig> {
    /// The VAE on `device`, weights cast to `dtype`.
    pub fn build(&self, device: &Device, dtype: DType) -> candle_core::Result<AutoencoderKL> {
        AutoencoderKL::new(self.var_builder(device, dtype), &self.config)
    }
}

/// Everything needed to build a Stable Diffusion model.
#[derive(Debug, Clone)]
pub struct SdWeights {
    /// SD 1.x, 2.x or SDXL.
    pub family: Family,
    /// What the UNet predicts.
    pub prediction: Prediction,
    /// CLIP ViT-L (SD 1.x, SDXL's first encoder), OpenCLIP ViT-H (SD 2.x) or, for the SDXL
    /// refiner, its only encoder (OpenCLIP ViT-bigG with its projection).
    pub text_encoder: Component<ClipTextConfig>,
    /// SDXL's OpenCLIP ViT-bigG, with its projection.
    pub text_encoder_2: Option<Component<ClipTextConfig>>,
    /// The denoising UNet.
    pub unet: Component<UNetConfig>,
    /// Where `unet`'s self-attention projections are stacked on a GPU (its q, k and v entries
    /// views into them): set by an engine that keeps the weights there, so each UNet built from
    /// them ([`SdWeights::build_unet`]) fuses without a copy. Empty otherwise.
    pub unet_stacks: ProjectionStacks,
    /// The latent ↔ image autoencoder.
    pub vae: Component<VaeConfig>,
    /// Where the model was loaded from (a diffusers folder or a single file).
    pub source: PathBuf,
}

impl SdWeights {
    /// The UNet on `device`, weights cast to `dtype`; where they are stacked
    /// ([`unet_stacks`](Self::unet_stacks)), its fused projections are the stacks.
    pub fn build_unet(
        &self,
        device: &Device,
        dtype: DType,
    ) -> candle_core::Result<UNet2DConditionModel> {
        UNet2DConditionModel::new_sharing(
            self.unet.var_builder(device, dtype),
            &self.unet.config,
            &self.unet_stacks,
        )
    }
}

/// Choices a caller can make when loading.
#[derive(Debug, Clone, Default)]
pub struct LoadOptions {
    /// Force the prediction type (single files cannot always tell: A1111 uses a `.yaml`).
    pub prediction: Option<Prediction>,
    /// A diffusers folder whose `*/config.json` replace the configs inferred from a single
    /// file (as diffusers' `from_single_file(config=…)`).
    pub config_dir: Option<PathBuf>,
    /// A separate VAE file that replaces the model's VAE (A1111 `--vae`).
    pub vae: Option<PathBuf>,
    /// A GPU that the text encoders and the UNet are read straight onto, in their stored
    /// dtype, for an engine that keeps them there (`--vram high`): the file reads overlap the
    /// copies to the device, and the host never holds the gigabytes. Safetensors files only
    /// (diffusers folders and single files); the VAE, `.ckpt` files and any other device are
    /// read to the host as usual. The device needs room for both models where one is still
    /// loaded.
    pub device: Option<Device>,
}

/// Reads every tensor of a weight file, CPU, stored dtype.
pub fn read_tensors(path: &Path) -> Result<TensorMap, LoadError> {
    if !path.is_file() {
        return Err(invalid(path, "no such file"));
    }
    let mut map = sdkube_weights::load_tree(path)?.flatten();
    // `.ckpt` files wrap the weights in {"state_dict": …}.
    if map.keys().any(|k| k.starts_with("state_dict.")) {
        map = ldm::strip_prefix(&map, "state_dict.");
    }
    Ok(map)
}

/// Loads a model from a diffusers folder or a single checkpoint file.
pub fn load(path: &Path, opts: &LoadOptions) -> Result<SdWeights, LoadError> {
    let started = std::time::Instant::now();
    let mut weights = if path.is_dir() {
        load_diffusers(path, opts)?
    } else {
        load_single_file(path, opts)?
    };
    if let Some(vae) = &opts.vae {
        let scaling = weights.vae.config.scaling_factor;
        weights.vae = load_vae_file(vae, scaling, opts.config_dir.as_deref())?;
    }
    tracing::info!(
        path = %path.display(),
        seconds = started.elapsed().as_secs_f64(),
        onto = ?opts.device,
        "weights read"
    );
    Ok(weights)
}

pub(crate) fn read_json<T: DeserializeOwned>(path: &Path) -> Result<T, LoadError> {
    let text = std::fs::read_to_string(path).map_err(|source| LoadError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    serde_json::from_str(&text).map_err(|e| invalid(path, format!("invalid config: {e}")))
}

/// The weight file of a diffusers component folder, if it has one.
pub fn component_weights(dir: &Path) -> Option<PathBuf> {
    component_file(dir).ok()
}

/// The weight file of a diffusers component folder.
pub(crate) fn component_file(dir: &Path) -> Result<PathBuf, LoadError> {
    let names = [
        "diffusion_pytorch_model.safetensors",
        "model.safetensors",
        "diffusion_pytorch_model.fp16.safetensors",
        "model.fp16.safetensors",
        "diffusion_pytorch_model.bin",
        "pytorch_model.bin",
    ];
    names
        .iter()
        .map(|n| dir.join(n))
        .find(|p| p.is_file())
        .ok_or_else(|| {
            invalid(
                dir,
                "no weight file (diffusion_pytorch_model.safetensors / model.safetensors)",
            )
        })
}

/// Reads every tensor of a weight file: those whose key `onto_device` accepts onto `device`,
/// where that is a GPU and the file a safetensors file of element types kept as stored, the
/// rest to the host; all to the host otherwise ([`read_tensors`]).
fn read_tensors_onto(
    path: &Path,
    device: Option<&Device>,
    onto_device: impl Fn(&str) -> bool,
) -> Result<TensorMap, LoadError> {
    let index = match device {
        Some(d) if !d.is_cpu() => sdkube_weights::safetensors_index(path)?,
        _ => None,
    };
    match (device, index) {
        (Some(device), Some(index)) => read_indexed(path, index, device, onto_device),
        _ => read_tensors(path),
    }
}

/// The tensors of `index` (of the safetensors file `path`): those whose key `onto_device`
/// accepts onto `device`, the rest to the host.
fn read_indexed(
    path: &Path,
    index: Vec<sdkube_weights::StoredTensor>,
    device: &Device,
    onto_device: impl Fn(&str) -> bool,
) -> Result<TensorMap, LoadError> {
    let file = std::fs::File::open(path).map_err(|source| LoadError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    let (there, here): (Vec<_>, Vec<_>) = index.into_iter().partition(|t| onto_device(&t.name));
    let mut map = TensorMap::new();
    for (part, to) in [(there, device), (here, &Device::Cpu)] {
        let tensors = sdkube_nn::read_to_device(&file, &places(&part), to)
            .map_err(|e| invalid(path, format!("reading onto {to:?}: {e}")))?;
        map.extend(part.into_iter().map(|t| t.name).zip(tensors));
    }
    Ok(map)
}

/// Where the index says each tensor is, as the device reader takes it.
fn places(index: &[sdkube_weights::StoredTensor]) -> Vec<sdkube_nn::StoredTensor> {
    index
        .iter()
        .map(|t| sdkube_nn::StoredTensor {
            offset: t.offset,
            dtype: t.dtype,
            shape: t.shape.clone(),
        })
        .collect()
}

fn load_component<C: DeserializeOwned>(
    dir: &Path,
    device: Option<&Device>,
) -> Result<Component<C>, LoadError> {
    if !dir.is_dir() {
        return Err(invalid(dir, "missing component folder"));
    }
    let config = read_json(&dir.join("config.json"))?;
    let mut tensors = read_tensors_onto(&component_file(dir)?, device, |_| true)?;
    // transformers ≥ 5.6 writes text encoders without the `text_model.` prefix.
    if tensors.contains_key("embeddings.token_embedding.weight") {
        tensors = tensors
            .into_iter()
            .map(|(k, t)| {
                let k = if k.starts_with("text_projection") {
                    k
                } else {
                    format!("text_model.{k}")
                };
                (k, t)
            })
            .collect();
    }
    Ok(Component { config, tensors })
}

/// A model's display name (the infotext's `Model:`): a folder's name, a file's stem.
pub fn model_name(path: &Path) -> String {
    let base = if path.is_dir() {
        path.file_name()
    } else {
        path.file_stem()
    };
    base.map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_else(|| "model".into())
}

/// Writes `weights` as a diffusers folder that [`load`] reads back (used to carry full-size
/// random-weight models to a GPU machine for end-to-end server measurements).
pub fn save_diffusers(weights: &SdWeights, dir: &Path) -> Result<(), LoadError> {
    fn component<C: serde::Serialize>(
        c: &Component<C>,
        dir: &Path,
        file: &str,
    ) -> Result<(), LoadError> {
        let io = |e: std::io::Error| invalid(dir, format!("writing: {e}"));
        std::fs::create_dir_all(dir).map_err(io)?;
        let config = serde_json::to_string_pretty(&c.config)
            .map_err(|e| invalid(dir, format!("config: {e}")))?;
        std::fs::write(dir.join("config.json"), config).map_err(io)?;
        candle_core::safetensors::save(&c.tensors, dir.join(file))
            .map_err(|e| invalid(dir, format!("writing weights: {e}")))
    }
    let io = |e: std::io::Error| invalid(dir, format!("writing: {e}"));
    std::fs::create_dir_all(dir).map_err(io)?;
    let class = match weights.family {
        Family::Sdxl => "StableDiffusionXLPipeline",
        Family::SdxlRefiner => "StableDiffusionXLImg2ImgPipeline",
        _ => "StableDiffusionPipeline",
    };
    std::fs::write(
        dir.join("model_index.json"),
        format!("{{\"_class_name\": \"{class}\"}}\n"),
    )
    .map_err(io)?;
    // diffusers keeps the refiner's only encoder in the second encoder's folder.
    let first_encoder = match weights.family {
        Family::SdxlRefiner => "text_encoder_2",
        _ => "text_encoder",
    };
    component(
        &weights.text_encoder,
        &dir.join(first_encoder),
        "model.safetensors",
    )?;
    if let Some(c) = &weights.text_encoder_2 {
        component(c, &dir.join("text_encoder_2"), "model.safetensors")?;
    }
    component(
        &weights.unet,
        &dir.join("unet"),
        "diffusion_pytorch_model.safetensors",
    )?;
    component(
        &weights.vae,
        &dir.join("vae"),
        "diffusion_pytorch_model.safetensors",
    )?;
    std::fs::create_dir_all(dir.join("scheduler")).map_err(io)?;
    let prediction = match weights.prediction {
        Prediction::V => "v_prediction",
        Prediction::Epsilon => "epsilon",
    };
    std::fs::write(
        dir.join("scheduler/scheduler_config.json"),
        format!("{{\"prediction_type\": \"{prediction}\"}}\n"),
    )
    .map_err(io)
}

fn load_diffusers(dir: &Path, opts: &LoadOptions) -> Result<SdWeights, LoadError> {
    if !dir.join("model_index.json").is_file() && !dir.join("unet").is_dir() {
        return Err(invalid(
            dir,
            "not a diffusers model folder (no model_index.json)",
        ));
    }
    let onto = opts.device.as_ref();
    let unet: Component<UNetConfig> = load_component(&dir.join("unet"), onto)?;
    // The VAE stays on the host: its fp16 overflow fallback builds an fp32 copy from there.
    let vae = load_component(&dir.join("vae"), None)?;
    let has_second = dir.join("text_encoder_2").is_dir();
    // The SDXL refiner has no first encoder: diffusers writes `text_encoder: [null, null]`.
    let refiner = unet.config.has_text_time() && has_second && !dir.join("text_encoder").is_dir();
    let (text_encoder, text_encoder_2): (Component<ClipTextConfig>, _) = if refiner {
        (load_component(&dir.join("text_encoder_2"), onto)?, None)
    } else {
        let second = has_second
            .then(|| load_component(&dir.join("text_encoder_2"), onto))
            .transpose()?;
        (load_component(&dir.join("text_encoder"), onto)?, second)
    };
    let family = if refiner {
        Family::SdxlRefiner
    } else if unet.config.has_text_time() {
        Family::Sdxl
    } else if text_encoder.config.hidden_act == "gelu" {
        Family::Sd2
    } else {
        Family::Sd1
    };
    if family == Family::Sdxl && text_encoder_2.is_none() {
        return Err(invalid(dir, "SDXL UNet but no text_encoder_2 folder"));
    }
    let scheduler: serde_json::Value = match dir.join("scheduler/scheduler_config.json") {
        p if p.is_file() => read_json(&p)?,
        _ => serde_json::Value::Null,
    };
    let prediction = opts.prediction.unwrap_or(
        match scheduler.get("prediction_type").and_then(|v| v.as_str()) {
            Some("v_prediction") => Prediction::V,
            _ => Prediction::Epsilon,
        },
    );
    Ok(SdWeights {
        family,
        prediction,
        text_encoder,
        text_encoder_2,
        unet,
        vae,
        source: dir.to_path_buf(),
        unet_stacks: ProjectionStacks::default(),
    })
}

/// A1111 marks v-prediction single files with a sidecar `<name>.yaml` (the LDM config).
fn sidecar_says_v(path: &Path) -> bool {
    let yaml = path.with_extension("yaml");
    std::fs::read_to_string(yaml)
        .map(|t| {
            t.lines().any(|l| {
                let l = l.trim().replace(['"', '\''], "");
                l == "parameterization: v"
            })
        })
        .unwrap_or(false)
}

fn load_single_file(path: &Path, opts: &LoadOptions) -> Result<SdWeights, LoadError> {
    // The UNet and the text encoders onto the device where asked, the rest (the VAE, an EMA
    // copy) to the host.
    let networks = |k: &str| {
        [
            "model.diffusion_model.",
            "cond_stage_model.",
            "conditioner.",
        ]
        .iter()
        .any(|p| k.starts_with(p))
    };
    let all = read_tensors_onto(path, opts.device.as_ref(), networks)?;
    let unet_ldm = ldm::strip_prefix(&all, "model.diffusion_model.");
    if unet_ldm.is_empty() {
        return Err(invalid(
            path,
            "not a Stable Diffusion checkpoint (no model.diffusion_model.* tensors)",
        ));
    }
    let family = if all
        .keys()
        .any(|k| k.starts_with("conditioner.embedders.1."))
    {
        Family::Sdxl
    } else if all
        .keys()
        .any(|k| k.starts_with("conditioner.embedders.0.model."))
    {
        Family::SdxlRefiner
    } else if all.keys().any(|k| k.starts_with("cond_stage_model.model.")) {
        Family::Sd2
    } else if all
        .keys()
        .any(|k| k.starts_with("cond_stage_model.transformer."))
    {
        Family::Sd1
    } else {
        return Err(invalid(
            path,
            "checkpoint has no text encoder weights this loader knows",
        ));
    };
    let override_config = |component: &str| -> Result<Option<serde_json::Value>, LoadError> {
        match &opts.config_dir {
            Some(dir) => Ok(Some(read_json(&dir.join(component).join("config.json"))?)),
            None => Ok(None),
        }
    };
    let wrap = |e: candle_core::Error| invalid(path, e.to_string());

    let (text_encoder, text_encoder_2) = match family {
        Family::Sd1 => {
            let t = ldm::strip_prefix(&all, "cond_stage_model.transformer.");
            (
                clip_component(t, false, override_config("text_encoder")?, path)?,
                None,
            )
        }
        Family::Sd2 => {
            let oc = ldm::strip_prefix(&all, "cond_stage_model.model.");
            // SD 2.x conditions on the penultimate layer: drop the last resblock.
            let layers = count_resblocks(&oc);
            let t = ldm::convert_open_clip(&oc, layers.saturating_sub(1)).map_err(wrap)?;
            (
                clip_component(t, true, override_config("text_encoder")?, path)?,
                None,
            )
        }
        Family::Sdxl => {
            let l = ldm::strip_prefix(&all, "conditioner.embedders.0.transformer.");
            let oc = ldm::strip_prefix(&all, "conditioner.embedders.1.model.");
            let layers = count_resblocks(&oc);
            let g = ldm::convert_open_clip(&oc, layers).map_err(wrap)?;
            (
                clip_component(l, false, override_config("text_encoder")?, path)?,
                Some(clip_component(
                    g,
                    true,
                    override_config("text_encoder_2")?,
                    path,
                )?),
            )
        }
        Family::SdxlRefiner => {
            let oc = ldm::strip_prefix(&all, "conditioner.embedders.0.model.");
            let layers = count_resblocks(&oc);
            let g = ldm::convert_open_clip(&oc, layers).map_err(wrap)?;
            (
                clip_component(g, true, override_config("text_encoder_2")?, path)?,
                None,
            )
        }
    };
    let prediction = opts.prediction.unwrap_or(if sidecar_says_v(path) {
        Prediction::V
    } else {
        Prediction::Epsilon
    });
    let mut unet_config: UNetConfig = match override_config("unet")? {
        Some(v) => {
            serde_json::from_value(v).map_err(|e| invalid(path, format!("unet config: {e}")))?
        }
        None => ldm::infer_unet_config(&unet_ldm, family == Family::Sd1).map_err(wrap)?,
    };
    // The server warms up at this size: at the wrong one an SDXL's first image paid its
    // per-shape preparations after ready (2.4 s against 0.88 s for the second, H100).
    unet_config.sample_size = unet_config
        .sample_size
        .or(Some(family.native_sample_size(prediction)));
    let unet = Component {
        tensors: ldm::convert_unet(&unet_ldm, unet_config.layers_per_block),
        config: unet_config,
    };
    let vae_ldm = ldm::strip_prefix(&all, "first_stage_model.");
    let vae_config = match override_config("vae")? {
        Some(v) => {
            serde_json::from_value(v).map_err(|e| invalid(path, format!("vae config: {e}")))?
        }
        None => ldm::infer_vae_config(&vae_ldm, family.vae_scaling()).map_err(wrap)?,
    };
    let vae = Component {
        tensors: ldm::convert_vae(&vae_ldm).map_err(wrap)?,
        config: vae_config,
    };
    Ok(SdWeights {
        family,
        prediction,
        text_encoder,
        text_encoder_2,
        unet,
        vae,
        source: path.to_path_buf(),
        unet_stacks: ProjectionStacks::default(),
    })
}

fn count_resblocks(oc: &TensorMap) -> usize {
    oc.keys()
        .filter_map(|k| k.strip_prefix("transformer.resblocks."))
        .filter_map(|r| r.split('.').next()?.parse::<usize>().ok())
        .map(|i| i + 1)
        .max()
        .unwrap_or(0)
}

fn clip_component(
    tensors: TensorMap,
    open_clip: bool,
    config: Option<serde_json::Value>,
    path: &Path,
) -> Result<Component<ClipTextConfig>, LoadError> {
    let mut config: ClipTextConfig = match config {
        Some(v) => serde_json::from_value(v)
            .map_err(|e| invalid(path, format!("text encoder config: {e}")))?,
        None => {
            ldm::infer_clip_config(&tensors, open_clip).map_err(|e| invalid(path, e.to_string()))?
        }
    };
    // The layer count always comes from the weights (SD 2.x files carry one layer more).
    config.num_hidden_layers = tensors
        .keys()
        .filter_map(|k| k.strip_prefix("text_model.encoder.layers."))
        .filter_map(|r| r.split('.').next()?.parse::<usize>().ok())
        .map(|i| i + 1)
        .max()
        .unwrap_or(0);
    Ok(Component { config, tensors })
}

/// A separate VAE file: LDM keys (with or without `first_stage_model.`) or diffusers keys.
pub fn load_vae_file(
    path: &Path,
    scaling_factor: f64,
    config_dir: Option<&Path>,
) -> Result<Component<VaeConfig>, LoadError> {
    let all = read_tensors(path)?;
    let all = if all.keys().any(|k| k.starts_with("first_stage_model.")) {
        ldm::strip_prefix(&all, "first_stage_model.")
    } else {
        all
    };
    let wrap = |e: candle_core::Error| invalid(path, e.to_string());
    let is_ldm = all.contains_key("encoder.conv_in.weight")
        && all.keys().any(|k| k.starts_with("encoder.down."));
    let is_diffusers = all.keys().any(|k| k.starts_with("encoder.down_blocks."));
    if !is_ldm && !is_diffusers {
        return Err(invalid(path, "not a VAE file (no encoder/decoder tensors)"));
    }
    let mut config: VaeConfig = match config_dir {
        Some(dir) => read_json(&dir.join("vae/config.json"))?,
        None if is_ldm => ldm::infer_vae_config(&all, scaling_factor).map_err(wrap)?,
        None => {
            return Err(invalid(
                path,
                "diffusers-layout VAE file needs its config.json (use a folder)",
            ))
        }
    };
    config.scaling_factor = scaling_factor;
    let tensors = if is_ldm {
        ldm::convert_vae(&all).map_err(wrap)?
    } else {
        all
    };
    Ok(Component { config, tensors })
}

/// Checks every tensor the network needs is present with the right shape, by building it on
/// the CPU in the stored dtype (cheap: weights are shared, not copied).
pub fn validate(weights: &SdWeights) -> Result<(), LoadError> {
    let check = |what: &str, r: candle_core::Result<()>| {
        r.map_err(|e| invalid(&weights.source, format!("{what}: {e}")))
    };
    let dev = Device::Cpu;
    let dt = DType::F32;
    check(
        "text encoder",
        weights.text_encoder.build(&dev, dt).map(|_| ()),
    )?;
    if let Some(t2) = &weights.text_encoder_2 {
        check("text encoder 2", t2.build(&dev, dt).map(|_| ()))?;
    }
    check("unet", weights.unet.build(&dev, dt).map(|_| ()))?;
    check("vae", weights.vae.build(&dev, dt).map(|_| ()))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use candle_core::{DType, Device, Tensor};

    use super::{places, read_indexed, read_tensors, read_tensors_onto};

    /// Where the index says each tensor is, reading it there gives what the host reader gives
    /// (the path a GPU takes, read here onto the CPU).
    #[test]
    fn tensors_read_at_their_indexed_places_are_the_file_s() {
        let dev = Device::Cpu;
        let saved: HashMap<String, Tensor> = [
            (
                "conv.weight",
                Tensor::randn(0f32, 1., (4, 3, 3, 3), &dev).unwrap(),
            ),
            (
                "norm.bias",
                Tensor::arange(0f32, 7., &dev)
                    .unwrap()
                    .to_dtype(DType::F16)
                    .unwrap(),
            ),
            ("ids", Tensor::arange(0i64, 5, &dev).unwrap()),
        ]
        .into_iter()
        .map(|(k, t)| (k.to_string(), t))
        .collect();
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("m.safetensors");
        candle_core::safetensors::save(&saved, &path).unwrap();
        let index = sdkube_weights::safetensors_index(&path).unwrap().unwrap();
        let file = std::fs::File::open(&path).unwrap();
        let read = sdkube_nn::read_to_device(&file, &places(&index), &dev).unwrap();
        let host = read_tensors(&path).unwrap();
        let onto_cpu = read_tensors_onto(&path, Some(&dev), |_| true).unwrap();
        // Split as a single file's networks and the rest are (here both onto the CPU).
        let split = read_indexed(&path, index.clone(), &dev, |k| k.starts_with("conv.")).unwrap();
        assert_eq!(split.len(), saved.len());
        assert_eq!(read.len(), saved.len());
        for (t, got) in index.iter().zip(&read) {
            let want = &saved[&t.name];
            let flat = |x: &Tensor| -> Vec<f64> {
                x.flatten_all()
                    .unwrap()
                    .to_dtype(DType::F64)
                    .unwrap()
                    .to_vec1()
                    .unwrap()
            };
            assert_eq!(
                (got.dtype(), got.dims()),
                (want.dtype(), want.dims()),
                "{}",
                t.name
            );
            assert_eq!(flat(got), flat(want), "{}", t.name);
            assert_eq!(flat(&host[&t.name]), flat(want), "{}", t.name);
            assert_eq!(flat(&onto_cpu[&t.name]), flat(want), "{}", t.name);
            assert_eq!(flat(&split[&t.name]), flat(want), "{}", t.name);
        }
    }
}
