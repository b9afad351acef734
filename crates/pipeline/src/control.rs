//! ControlNet units in a generation, applied as sd-webui-controlnet (A1111's ControlNet
//! extension) applies them: a unit names a ControlNet file, carries its control image (already
//! preprocessed: edges, depth, pose…), a weight, the part of the sampling it acts in, and a
//! control mode. Several units add their residuals.
//!
//! The extension's rules, kept here: a unit acts at step `i` of `n` unless `i / n` is below
//! `guidance_start` or above `guidance_end`; "My prompt is more important" weights the
//! residual of skip connection `k` by `0.825^(12 − k)` (the mid block last), "ControlNet is
//! more important" does the same and leaves the unconditional half of CFG uncontrolled.

use std::collections::HashMap;
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use candle_core::{DType, Device, Tensor};
use image::{imageops, DynamicImage, GrayImage, RgbImage};
use sdkube_models::config::UNetConfig;
use sdkube_models::controlnet::{load_controlnet, ControlNetModel};
use sdkube_models::unet::{AddedConditioning, ControlResiduals};
use sha2::{Digest, Sha256};

use crate::image_io::image_to_tensor;
use crate::Error;

/// How a unit's residuals are balanced against the prompt (the extension's `control_mode`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ControlMode {
    /// The same weight everywhere, both halves of CFG.
    #[default]
    Balanced,
    /// Soft weights: the deep skip connections count more than the shallow ones.
    PromptMoreImportant,
    /// Soft weights, and the unconditional half of CFG is left alone.
    ControlNetMoreImportant,
}

impl ControlMode {
    /// The extension's names ("Balanced", "My prompt is more important", "ControlNet is more
    /// important") or their indices 0–2.
    pub fn parse(s: &str) -> Result<Self, Error> {
        match s.trim() {
            "Balanced" | "0" => Ok(Self::Balanced),
            "My prompt is more important" | "1" => Ok(Self::PromptMoreImportant),
            "ControlNet is more important" | "2" => Ok(Self::ControlNetMoreImportant),
            other => Err(Error::Invalid(format!(
                "unknown control_mode {other:?}: use \"Balanced\", \"My prompt is more \
                 important\" or \"ControlNet is more important\" (or 0, 1, 2)"
            ))),
        }
    }

    /// The extension's name.
    pub fn name(self) -> &'static str {
        match self {
            Self::Balanced => "Balanced",
            Self::PromptMoreImportant => "My prompt is more important",
            Self::ControlNetMoreImportant => "ControlNet is more important",
        }
    }
}

/// How the control image is fitted to the generated size (the extension's `resize_mode`);
/// the preprocessors' pixel-perfect resolution reads it too.
pub use sdkube_preprocess::ResizeMode;

/// One ControlNet unit of a request.
#[derive(Debug, Clone)]
pub struct ControlUnit {
    /// The ControlNet, by name as [`ControlNetLibrary`] lists it (with or without the
    /// ` [hash]` suffix).
    pub model: String,
    /// The control image, already preprocessed.
    pub image: RgbImage,
    /// Strength (the extension's `weight`, 0–2).
    pub weight: f64,
    /// Fraction of the steps before which the unit does not act.
    pub guidance_start: f64,
    /// Fraction of the steps after which the unit does not act.
    pub guidance_end: f64,
    /// Balance against the prompt.
    pub mode: ControlMode,
    /// How the image is fitted to the generated size.
    pub resize_mode: ResizeMode,
    /// An inpainting ControlNet's mask (white = repaint): those pixels reach the network as
    /// −1, the extension's inpaint protocol.
    pub mask: Option<GrayImage>,
}

impl ControlUnit {
    /// A unit of `model` steered by `image` with the extension's defaults.
    pub fn new(model: &str, image: RgbImage) -> Self {
        Self {
            model: model.to_string(),
            image,
            weight: 1.0,
            guidance_start: 0.0,
            guidance_end: 1.0,
            mode: ControlMode::Balanced,
            resize_mode: ResizeMode::CropAndResize,
            mask: None,
        }
    }

    /// Checks the numbers, naming the bad one.
    pub fn check(&self) -> Result<(), Error> {
        if !(0.0..=2.0).contains(&self.weight) {
            return Err(Error::Invalid(format!(
                "ControlNet weight must be between 0 and 2, got {}",
                self.weight
            )));
        }
        let range = |what: &str, v: f64| {
            if (0.0..=1.0).contains(&v) {
                Ok(())
            } else {
                Err(Error::Invalid(format!(
                    "ControlNet {what} must be between 0 and 1, got {v}"
                )))
            }
        };
        range("guidance_start", self.guidance_start)?;
        range("guidance_end", self.guidance_end)?;
        if self.guidance_start > self.guidance_end {
            return Err(Error::Invalid(format!(
                "ControlNet guidance_start ({}) is after guidance_end ({})",
                self.guidance_start, self.guidance_end
            )));
        }
        if self.image.width() == 0 || self.image.height() == 0 {
            return Err(Error::Image("the ControlNet image has no pixels".into()));
        }
        Ok(())
    }

    /// Whether the unit acts at step `step` (from 0) of `total`.
    pub fn acts_at(&self, step: usize, total: usize) -> bool {
        let done = step as f64 / total.max(1) as f64;
        !(done < self.guidance_start || done > self.guidance_end)
    }

    /// The weight of each of `count` residuals (skip connections, then the mid block).
    pub fn scales(&self, count: usize) -> Vec<f64> {
        match self.mode {
            ControlMode::Balanced => vec![self.weight; count],
            // The extension's soft weights, written for SD 1.x's 13 residuals and cut to
            // SDXL's 10 as it does.
            _ => (0..count)
                .map(|k| self.weight * 0.825f64.powi(12 - k as i32))
                .collect(),
        }
    }

    /// The control image fitted to `width` × `height`.
    pub fn fitted(&self, width: u32, height: u32) -> RgbImage {
        fit(
            DynamicImage::ImageRgb8(self.image.clone()),
            self.resize_mode,
            width,
            height,
        )
        .to_rgb8()
    }
}

/// `img` fitted to `width` × `height` as `mode` says.
fn fit(img: DynamicImage, mode: ResizeMode, width: u32, height: u32) -> DynamicImage {
    let filter = imageops::FilterType::Lanczos3;
    match mode {
        ResizeMode::Resize => img.resize_exact(width, height, filter),
        ResizeMode::CropAndResize => img.resize_to_fill(width, height, filter),
        ResizeMode::ResizeAndFill => {
            // The rest is filled with the median colour of the image's border, as the
            // extension fills it.
            let fill = border_median(&img.to_rgb8());
            let inner = img.resize(width, height, filter).to_rgb8();
            let mut out = RgbImage::from_pixel(width, height, image::Rgb(fill));
            let x = (width - inner.width()) / 2;
            let y = (height - inner.height()) / 2;
            imageops::replace(&mut out, &inner, x as i64, y as i64);
            match img {
                DynamicImage::ImageLuma8(_) => DynamicImage::ImageRgb8(out).to_luma8().into(),
                _ => DynamicImage::ImageRgb8(out),
            }
        }
    }
}

/// The per-channel median of the pixels on an image's four edges (corners counted twice,
/// as the extension concatenates the edges).
fn border_median(img: &RgbImage) -> [u8; 3] {
    let (w, h) = img.dimensions();
    let mut edge: Vec<[u8; 3]> = (0..w)
        .flat_map(|x| [(x, 0), (x, h - 1)])
        .chain((0..h).flat_map(|y| [(0, y), (w - 1, y)]))
        .map(|(x, y)| img.get_pixel(x, y).0)
        .collect();
    let mut out = [0u8; 3];
    for (c, v) in out.iter_mut().enumerate() {
        edge.sort_unstable_by_key(|p| p[c]);
        let n = edge.len();
        // numpy's median: the mean of the two middle values of an even count, then cast.
        *v = match n % 2 {
            1 => edge[n / 2][c],
            _ => ((u16::from(edge[n / 2 - 1][c]) + u16::from(edge[n / 2][c])) / 2) as u8,
        };
    }
    out
}

/// A ControlNet file (or diffusers folder) the server can use.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ControlNetInfo {
    /// File stem or folder name.
    pub name: String,
    /// The file or folder.
    pub path: PathBuf,
    /// A1111's short model hash (8 hex digits).
    pub hash: String,
}

impl ControlNetInfo {
    /// `name [hash]`, as the extension lists models.
    pub fn title(&self) -> String {
        format!("{} [{}]", self.name, self.hash)
    }
}

/// The ControlNets in some folders: files (`.safetensors`, `.pth`, `.ckpt`, `.bin`) and
/// diffusers folders (`config.json` + weights).
#[derive(Debug, Clone, Default)]
pub struct ControlNetLibrary {
    dirs: Vec<PathBuf>,
    /// Named files or folders outside the folders (the model store's ControlNets).
    files: Vec<(String, PathBuf)>,
    entries: Vec<ControlNetInfo>,
}

impl ControlNetLibrary {
    /// Scans `dirs` (missing folders list nothing).
    pub fn new(dirs: Vec<PathBuf>) -> Self {
        Self::with_files(dirs, Vec::new())
    }

    /// Scans `dirs`, and lists `files` (files or diffusers folders) under their given names,
    /// e.g. the model store's; a name also found in the folders is the folder's.
    pub fn with_files(dirs: Vec<PathBuf>, files: Vec<(String, PathBuf)>) -> Self {
        let mut lib = Self {
            dirs,
            files,
            entries: Vec::new(),
        };
        lib.refresh();
        lib
    }

    /// Scans the folders again.
    pub fn refresh(&mut self) {
        let mut entries = Vec::new();
        let listed = self.dirs.iter().flat_map(|dir| {
            std::fs::read_dir(dir)
                .into_iter()
                .flatten()
                .flatten()
                .map(|e| (None, e.path()))
        });
        let named = self.files.iter().map(|(n, p)| (Some(n.clone()), p.clone()));
        for (given_name, path) in listed.chain(named) {
            let weights = if path.is_dir() {
                if !path.join("config.json").is_file() {
                    continue;
                }
                match sdkube_models::checkpoint::component_weights(&path) {
                    Some(w) => w,
                    None => continue,
                }
            } else {
                let ext = path.extension().and_then(|e| e.to_str()).unwrap_or("");
                if !matches!(ext, "safetensors" | "pth" | "ckpt" | "bin" | "pt") {
                    continue;
                }
                path.clone()
            };
            let name = given_name.unwrap_or_else(|| {
                path.file_stem()
                    .map(|s| s.to_string_lossy().into_owned())
                    .unwrap_or_default()
            });
            if entries.iter().any(|e: &ControlNetInfo| e.name == name) {
                continue;
            }
            let hash = model_hash(&weights).unwrap_or_else(|_| "NOFILE".into());
            entries.push(ControlNetInfo { name, path, hash });
        }
        entries.sort_by_key(|e| e.name.to_lowercase());
        self.entries = entries;
    }

    /// Every ControlNet found, by name.
    pub fn entries(&self) -> &[ControlNetInfo] {
        &self.entries
    }

    /// The ControlNet `name` names: its name (in any case, as the extension matches it) or
    /// its title (`name [hash]`).
    pub fn find(&self, name: &str) -> Result<&ControlNetInfo, Error> {
        let plain = name.split(" [").next().unwrap_or(name).trim();
        self.entries
            .iter()
            .find(|e| e.title() == name || e.name.eq_ignore_ascii_case(plain))
            .ok_or_else(|| {
                let known: Vec<String> = self.entries.iter().map(|e| e.title()).collect();
                Error::Invalid(format!(
                    "unknown ControlNet model {name:?}; available: {}",
                    if known.is_empty() {
                        "none (put ControlNet files in --controlnet-dirs)".to_string()
                    } else {
                        known.join(", ")
                    }
                ))
            })
    }
}

/// A1111's short model hash: the first 8 hex digits of the sha256 of the 64 KiB at 1 MiB.
fn model_hash(path: &Path) -> std::io::Result<String> {
    let mut f = std::fs::File::open(path)?;
    f.seek(SeekFrom::Start(0x100000))?;
    let mut buf = Vec::with_capacity(0x10000);
    f.take(0x10000).read_to_end(&mut buf)?;
    let digest = Sha256::digest(&buf);
    Ok(digest.iter().take(4).map(|b| format!("{b:02x}")).collect())
}

/// Refuses a ControlNet made for another kind of UNet, naming it.
pub fn check_fits(net: &ControlNetModel, name: &str, unet: &UNetConfig) -> Result<(), Error> {
    let c = &net.config().unet;
    let fits = c.block_out_channels == unet.block_out_channels
        && c.cross_attention_dim == unet.cross_attention_dim
        && c.layers_per_block == unet.layers_per_block
        && c.has_text_time() == unet.has_text_time();
    if fits {
        return Ok(());
    }
    let kind = |cfg: &UNetConfig| match (cfg.has_text_time(), cfg.cross_attention_dim) {
        (true, _) => "SDXL".to_string(),
        (false, 768) => "SD 1.x".to_string(),
        (false, 1024) => "SD 2.x".to_string(),
        (false, d) => format!("a UNet with {d}-wide text"),
    };
    Err(Error::Invalid(format!(
        "ControlNet {name:?} is for {}, the loaded model is {}",
        kind(c),
        kind(unet)
    )))
}

/// A request's units with their networks and control images on the device, ready for the
/// sampling loop.
pub(crate) struct ActiveUnits {
    units: Vec<(ControlUnit, Arc<ControlNetModel>, Tensor)>,
    /// Images per half of the CFG batch.
    batch: usize,
}

impl ActiveUnits {
    /// The units with their networks; each control image fitted to `width` × `height`,
    /// repeated for the `batch` images of both CFG halves.
    pub(crate) fn new(
        units: Vec<(ControlUnit, Arc<ControlNetModel>)>,
        width: u32,
        height: u32,
        batch: usize,
        device: &Device,
        dtype: DType,
    ) -> Result<Self, Error> {
        let units = units
            .into_iter()
            .map(|(unit, net)| {
                // In [0, 1], as the extension feeds it (not the VAE's [-1, 1]).
                let hint = image_to_tensor(&unit.fitted(width, height), device, dtype)?;
                let mut hint = ((hint + 1.0)? * 0.5)?;
                if let Some(mask) = &unit.mask {
                    let mask = fit(
                        DynamicImage::ImageLuma8(mask.clone()),
                        unit.resize_mode,
                        width,
                        height,
                    )
                    .to_luma8();
                    let m: Vec<f32> = mask.pixels().map(|p| f32::from(p.0[0] > 127)).collect();
                    let m = Tensor::from_vec(m, (1, 1, height as usize, width as usize), device)?
                        .to_dtype(dtype)?;
                    // Masked pixels become −1: c·(1 − m) − m.
                    hint = (hint.broadcast_mul(&(1.0 - &m)?)?).broadcast_sub(&m)?;
                }
                let hint = hint.repeat((2 * batch, 1, 1, 1))?;
                Ok((unit, net, hint))
            })
            .collect::<Result<_, Error>>()?;
        Ok(Self { units, batch })
    }

    /// The summed residuals at step `step` of `total` for the UNet input `x_in` (both CFG
    /// halves, unconditional first); `None` when no unit acts.
    pub(crate) fn residuals(
        &self,
        x_in: &Tensor,
        t: &Tensor,
        context: &Tensor,
        added: Option<&AddedConditioning>,
        step: usize,
        total: usize,
    ) -> candle_core::Result<Option<ControlResiduals>> {
        // Inpainting UNets take 9 channels; their ControlNets see the latent alone.
        let x = x_in.narrow(1, 0, 4.min(x_in.dim(1)?))?;
        let mut sum: Option<ControlResiduals> = None;
        for (unit, net, hint) in &self.units {
            if !unit.acts_at(step, total) {
                continue;
            }
            let r = match unit.mode {
                // The unconditional half gets nothing: the network runs on the conditional
                // half alone and zeros stand in for the rest.
                ControlMode::ControlNetMoreImportant => {
                    let b = self.batch;
                    let cond = |t: &Tensor| t.narrow(0, b, b);
                    let added = added
                        .map(|a| -> candle_core::Result<_> {
                            Ok(AddedConditioning {
                                text_embeds: cond(&a.text_embeds)?,
                                time_ids: cond(&a.time_ids)?,
                            })
                        })
                        .transpose()?;
                    let t = if t.elem_count() == 2 * b {
                        cond(t)?
                    } else {
                        t.clone()
                    };
                    let raw = net.forward(
                        &cond(&x)?,
                        &t,
                        &cond(context)?,
                        added.as_ref(),
                        &cond(hint)?,
                    )?;
                    with_zero_uncond(&raw.scaled(&unit.scales(raw.down.len() + 1))?)?
                }
                _ => {
                    let raw = net.forward(&x, t, context, added, hint)?;
                    raw.scaled(&unit.scales(raw.down.len() + 1))?
                }
            };
            sum = Some(match sum {
                Some(s) => s.add(&r)?,
                None => r,
            });
        }
        Ok(sum)
    }
}

/// Residuals of the conditional half `r` preceded by zeros for the unconditional half.
fn with_zero_uncond(r: &ControlResiduals) -> candle_core::Result<ControlResiduals> {
    let pad =
        |t: &Tensor| -> candle_core::Result<Tensor> { Tensor::cat(&[&t.zeros_like()?, t], 0) };
    Ok(ControlResiduals {
        down: r.down.iter().map(pad).collect::<candle_core::Result<_>>()?,
        mid: pad(&r.mid)?,
    })
}

/// Built ControlNets kept between jobs (by path), so a unit costs its load once.
#[derive(Default)]
pub(crate) struct ControlNetCache {
    built: HashMap<PathBuf, Arc<ControlNetModel>>,
}

impl ControlNetCache {
    /// The network at `info`, built on `device` now or taken from the cache (with `keep`).
    pub(crate) fn get(
        &mut self,
        info: &ControlNetInfo,
        device: &Device,
        dtype: DType,
        keep: bool,
    ) -> Result<Arc<ControlNetModel>, Error> {
        if let Some(net) = self.built.get(&info.path) {
            return Ok(net.clone());
        }
        let net = Arc::new(load_controlnet(&info.path, None)?.build(device, dtype)?);
        if keep {
            self.built.insert(info.path.clone(), net.clone());
        }
        Ok(net)
    }
}
