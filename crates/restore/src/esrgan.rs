//! RealESRGAN inference: load a network from its weights, run it over an image in tiles.
//!
//! The tiling, padding and alpha handling follow `RealESRGANer` (`realesrgan/utils.py`):
//! reflect `pre_pad` on the right/bottom, reflect mod-pad for scales 2 and 1, tiles of
//! `tile` input pixels each read with `tile_pad` context and written back without it,
//! the alpha channel upscaled by the network as a grey image, and any other output scale
//! reached by resizing the network's result.

use std::collections::HashMap;
use std::path::Path;

use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;
use image::{DynamicImage, ImageBuffer, Luma, LumaA, Rgb, Rgba};

use crate::rrdbnet::{RrdbConfig, RrdbNet};
use crate::srvgg::{Activation, SrvggConfig, SrvggNet};
use crate::Error;

/// Which network and hyper-parameters a weight file holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EsrganArch {
    /// RRDBNet: RealESRGAN x4plus, x4plus-anime, x2plus.
    Rrdb(RrdbConfig),
    /// SRVGGNetCompact: realesr-general-x4v3, realesr-animevideov3.
    Srvgg(SrvggConfig),
}

impl EsrganArch {
    /// The overall scale factor of the network.
    pub fn scale(&self) -> usize {
        match self {
            EsrganArch::Rrdb(c) => c.scale,
            EsrganArch::Srvgg(c) => c.upscale,
        }
    }

    /// The official models by their release names.
    pub fn preset(name: &str) -> Option<EsrganArch> {
        let n = name.to_ascii_lowercase().replace('_', "-");
        let n = n.trim_end_matches(".pth");
        Some(match n {
            "realesrgan-x4plus" | "x4plus" => EsrganArch::Rrdb(RrdbConfig::X4PLUS),
            "realesrgan-x2plus" | "x2plus" => EsrganArch::Rrdb(RrdbConfig::X2PLUS),
            "realesrgan-x4plus-anime-6b" | "x4plus-anime-6b" | "x4plus-anime" => {
                EsrganArch::Rrdb(RrdbConfig::X4PLUS_ANIME_6B)
            }
            "realesr-general-x4v3" | "general-x4v3" => EsrganArch::Srvgg(SrvggConfig::GENERAL_X4V3),
            "realesr-animevideov3" | "animevideov3" => {
                EsrganArch::Srvgg(SrvggConfig::ANIMEVIDEO_V3)
            }
            _ => return None,
        })
    }

    /// Names [`EsrganArch::preset`] accepts (canonical spelling).
    pub const PRESETS: [&'static str; 5] = [
        "RealESRGAN_x4plus",
        "RealESRGAN_x2plus",
        "RealESRGAN_x4plus_anime_6B",
        "realesr-general-x4v3",
        "realesr-animevideov3",
    ];

    /// Reads the hyper-parameters off a state dict's key names and shapes, so any variant
    /// (other block counts, widths, scales) loads without being told what it is.
    pub fn infer(tensors: &HashMap<String, Tensor>) -> Result<EsrganArch, Error> {
        let dims = |k: &str| tensors.get(k).map(|t| t.dims().to_vec());
        if let Some(first) = dims("conv_first.weight") {
            let last = dims("conv_last.weight")
                .ok_or_else(|| Error::WrongWeights("RRDBNet without conv_last.weight".into()))?;
            let grow = dims("body.0.rdb1.conv1.weight").map(|d| d[0]).unwrap_or(32);
            let num_block = (0..)
                .take_while(|i| tensors.contains_key(&format!("body.{i}.rdb1.conv1.weight")))
                .count();
            let num_out_ch = last[0];
            let (scale, num_in_ch) = match first[1] / num_out_ch.max(1) {
                16 => (1, first[1] / 16),
                4 => (2, first[1] / 4),
                _ => (4, first[1]),
            };
            return Ok(EsrganArch::Rrdb(RrdbConfig {
                num_in_ch,
                num_out_ch,
                scale,
                num_feat: first[0],
                num_block,
                num_grow_ch: grow,
            }));
        }
        if let Some(first) = dims("body.0.weight") {
            let convs = (0..)
                .take_while(|i| tensors.contains_key(&format!("body.{}.weight", 2 * i)))
                .count();
            if convs < 2 || first.len() != 4 {
                return Err(Error::WrongWeights(
                    "`body.0.weight` is not the first convolution of SRVGGNetCompact".into(),
                ));
            }
            let last = dims(&format!("body.{}.weight", 2 * (convs - 1))).expect("counted");
            let num_out_ch = first[1];
            let up2 = last[0] / num_out_ch.max(1);
            let upscale = (1..=8).find(|u| u * u == up2).ok_or_else(|| {
                Error::WrongWeights(format!(
                    "last convolution has {} outputs, not {num_out_ch}·upscale²",
                    last[0]
                ))
            })?;
            let act = if tensors.contains_key("body.1.weight") {
                Activation::Prelu
            } else {
                // relu and leakyrelu leave no trace in the weights; the releases use prelu.
                Activation::Relu
            };
            return Ok(EsrganArch::Srvgg(SrvggConfig {
                num_in_ch: first[1],
                num_out_ch,
                num_feat: first[0],
                num_conv: convs - 2,
                upscale,
                act,
            }));
        }
        Err(Error::WrongWeights(
            "neither RRDBNet (`conv_first.weight`) nor SRVGGNetCompact (`body.0.weight`) keys found"
                .into(),
        ))
    }
}

enum Net {
    Rrdb(Box<RrdbNet>),
    Srvgg(SrvggNet),
}

/// A loaded RealESRGAN network.
pub struct Esrgan {
    net: Net,
    arch: EsrganArch,
    device: Device,
}

/// The state dict inside an official release: `params_ema` if present (the reference
/// prefers it), else `params`, else the file's top level.
pub fn state_dict(path: &Path) -> Result<HashMap<String, Tensor>, Error> {
    let tree = sdkube_weights::load_tree(path)?;
    let inner = tree
        .get("params_ema")
        .or_else(|| tree.get("params"))
        .unwrap_or(&tree);
    Ok(inner.flatten())
}

impl Esrgan {
    /// Builds the network from a state dict; `arch` is inferred from it when `None`.
    /// Missing keys or shapes that do not fit the architecture are [`Error::WrongWeights`].
    pub fn from_tensors(
        tensors: HashMap<String, Tensor>,
        arch: Option<EsrganArch>,
        device: &Device,
    ) -> Result<Self, Error> {
        let arch = match arch {
            Some(a) => a,
            None => EsrganArch::infer(&tensors)?,
        };
        let tensors = tensors
            .into_iter()
            .map(|(k, t)| Ok((k, t.to_dtype(DType::F32)?.to_device(device)?)))
            .collect::<Result<HashMap<_, _>, candle_core::Error>>()?;
        let vb = VarBuilder::from_tensors(tensors, DType::F32, device);
        let wrong = |e: candle_core::Error| Error::WrongWeights(format!("{arch:?}: {e}"));
        let net = match arch {
            EsrganArch::Rrdb(cfg) => Net::Rrdb(Box::new(RrdbNet::new(cfg, vb).map_err(wrong)?)),
            EsrganArch::Srvgg(cfg) => Net::Srvgg(SrvggNet::new(cfg, vb).map_err(wrong)?),
        };
        Ok(Self {
            net,
            arch,
            device: device.clone(),
        })
    }

    /// Loads an official `.pth` (`params_ema`/`params`) or a safetensors file.
    pub fn load(path: &Path, arch: Option<EsrganArch>, device: &Device) -> Result<Self, Error> {
        let tensors = state_dict(path)?;
        Self::from_tensors(tensors, arch, device).map_err(|e| match e {
            Error::WrongWeights(m) => Error::WrongWeights(format!("{}: {m}", path.display())),
            e => e,
        })
    }

    /// The network and hyper-parameters read off the weights (or forced).
    pub fn arch(&self) -> EsrganArch {
        self.arch
    }

    /// The network's own scale factor.
    pub fn scale(&self) -> usize {
        self.arch.scale()
    }

    /// Runs the network on `(B, C, H, W)` f32 in [0, 1].
    pub fn forward(&self, x: &Tensor) -> Result<Tensor, Error> {
        Ok(match &self.net {
            Net::Rrdb(n) => n.forward(x)?,
            Net::Srvgg(n) => n.forward(x)?,
        })
    }

    /// `RealESRGANer`'s pre-process → (tiled) process → post-process on one `(3, H, W)` RGB
    /// f32 image in [0, 1]; returns `(3, H·scale, W·scale)` clamped to [0, 1].
    pub fn upscale_tensor(&self, img: &Tensor, opts: &TileOptions) -> Result<Tensor, Error> {
        let (_, h, w) = img.dims3()?;
        let scale = self.scale();
        let mut x = img
            .to_device(&self.device)?
            .to_dtype(DType::F32)?
            .unsqueeze(0)?;
        if opts.pre_pad > 0 {
            x = reflect_pad(&x, opts.pre_pad, opts.pre_pad)?;
        }
        let modulus = match scale {
            2 => 2,
            1 => 4,
            _ => 1,
        };
        let (_, _, ph, pw) = x.dims4()?;
        let (mh, mw) = (
            (modulus - ph % modulus) % modulus,
            (modulus - pw % modulus) % modulus,
        );
        if mh + mw > 0 {
            x = reflect_pad(&x, mh, mw)?;
        }
        let out = if opts.tile == 0 {
            self.forward(&x)?
        } else {
            self.tiled(&x, opts.tile, opts.tile_pad)?
        };
        // Removing mod-pad then pre-pad (in output pixels) leaves exactly H·s × W·s.
        let out = out.narrow(2, 0, h * scale)?.narrow(3, 0, w * scale)?;
        Ok(out.squeeze(0)?.clamp(0f32, 1f32)?)
    }

    /// The network over `tile`² pieces of `x`, each read with `pad` pixels of context and
    /// written back without it. The output stays on the network's device, as the reference
    /// keeps it (one strip of tiles joined, then set into place): no per-tile copy to the host,
    /// which would wait for each tile before the next could be queued.
    fn tiled(&self, x: &Tensor, tile: usize, pad: usize) -> Result<Tensor, Error> {
        let (_, c, h, w) = x.dims4()?;
        let s = self.scale();
        let out = Tensor::zeros((1, c, h * s, w * s), DType::F32, x.device())?;
        let tiles_y = h.div_ceil(tile);
        let tiles_x = w.div_ceil(tile);
        for ty in 0..tiles_y {
            let mut strip = Vec::with_capacity(tiles_x);
            for tx in 0..tiles_x {
                let (x0, y0) = (tx * tile, ty * tile);
                let (x1, y1) = ((x0 + tile).min(w), (y0 + tile).min(h));
                let (px0, py0) = (x0.saturating_sub(pad), y0.saturating_sub(pad));
                let (px1, py1) = ((x1 + pad).min(w), (y1 + pad).min(h));
                let input = x
                    .narrow(2, py0, py1 - py0)?
                    .narrow(3, px0, px1 - px0)?
                    .contiguous()?;
                let result = self.forward(&input)?;
                strip.push(result.narrow(2, (y0 - py0) * s, (y1 - y0) * s)?.narrow(
                    3,
                    (x0 - px0) * s,
                    (x1 - x0) * s,
                )?);
                tracing::debug!(tile = ty * tiles_x + tx + 1, of = tiles_x * tiles_y, "tile");
            }
            // (a strip of one tile is that tile, a view: slice_set takes contiguous tensors)
            out.slice_set(&Tensor::cat(&strip, 3)?.contiguous()?, 2, ty * tile * s)?;
        }
        Ok(out)
    }

    /// Upscales an image as `RealESRGANer.enhance` does: 8- or 16-bit, grey, RGB or RGBA
    /// (alpha upscaled by the network too), then resized to `outscale` × the input size
    /// when that differs from the network's scale (Lanczos3; the reference uses OpenCV's
    /// Lanczos4, so that last step differs slightly).
    pub fn upscale_image(
        &self,
        img: &DynamicImage,
        opts: &TileOptions,
        outscale: Option<f32>,
    ) -> Result<DynamicImage, Error> {
        let (w, h) = (img.width() as usize, img.height() as usize);
        if w == 0 || h == 0 {
            return Err(Error::BadImage("image has zero width or height".into()));
        }
        let sixteen_bit = matches!(
            img,
            DynamicImage::ImageLuma16(_)
                | DynamicImage::ImageLumaA16(_)
                | DynamicImage::ImageRgb16(_)
                | DynamicImage::ImageRgba16(_)
        );
        let grey = matches!(
            img,
            DynamicImage::ImageLuma8(_)
                | DynamicImage::ImageLuma16(_)
                | DynamicImage::ImageLumaA8(_)
                | DynamicImage::ImageLumaA16(_)
        );
        let has_alpha = img.color().has_alpha();
        let rgba = img.to_rgba32f();
        let raw = rgba.as_raw();
        let plane = |ch: usize| -> Vec<f32> { raw.iter().skip(ch).step_by(4).copied().collect() };
        let rgb: Vec<f32> = [plane(0), plane(1), plane(2)].concat();
        let rgb = Tensor::from_vec(rgb, (3, h, w), &Device::Cpu)?;
        let out = self.upscale_tensor(&rgb, opts)?;
        let (oh, ow) = (h * self.scale(), w * self.scale());
        let out = out.to_device(&Device::Cpu)?.to_vec3::<f32>()?;
        let alpha = if has_alpha {
            let a = Tensor::from_vec(plane(3), (1, h, w), &Device::Cpu)?.repeat((3, 1, 1))?;
            let a = self
                .upscale_tensor(&a, opts)?
                .to_device(&Device::Cpu)?
                .to_vec3::<f32>()?;
            Some(a)
        } else {
            None
        };
        // OpenCV's BGR2GRAY weights, which the reference applies to grey and alpha outputs.
        let luma = |p: &Vec<Vec<Vec<f32>>>, y: usize, x: usize| {
            0.299 * p[0][y][x] + 0.587 * p[1][y][x] + 0.114 * p[2][y][x]
        };
        let max = if sixteen_bit { 65535.0 } else { 255.0 };
        let q = |v: f32| (v * max).round().clamp(0.0, max);
        let mut result = match (grey, alpha.as_ref(), sixteen_bit) {
            (true, None, false) => {
                DynamicImage::ImageLuma8(ImageBuffer::from_fn(ow as u32, oh as u32, |x, y| {
                    Luma([q(luma(&out, y as usize, x as usize)) as u8])
                }))
            }
            (true, None, true) => {
                DynamicImage::ImageLuma16(ImageBuffer::from_fn(ow as u32, oh as u32, |x, y| {
                    Luma([q(luma(&out, y as usize, x as usize)) as u16])
                }))
            }
            (true, Some(a), false) => {
                DynamicImage::ImageLumaA8(ImageBuffer::from_fn(ow as u32, oh as u32, |x, y| {
                    let (x, y) = (x as usize, y as usize);
                    LumaA([q(luma(&out, y, x)) as u8, q(luma(a, y, x)) as u8])
                }))
            }
            (true, Some(a), true) => {
                DynamicImage::ImageLumaA16(ImageBuffer::from_fn(ow as u32, oh as u32, |x, y| {
                    let (x, y) = (x as usize, y as usize);
                    LumaA([q(luma(&out, y, x)) as u16, q(luma(a, y, x)) as u16])
                }))
            }
            (false, None, false) => {
                DynamicImage::ImageRgb8(ImageBuffer::from_fn(ow as u32, oh as u32, |x, y| {
                    let (x, y) = (x as usize, y as usize);
                    Rgb([0, 1, 2].map(|c| q(out[c][y][x]) as u8))
                }))
            }
            (false, None, true) => {
                DynamicImage::ImageRgb16(ImageBuffer::from_fn(ow as u32, oh as u32, |x, y| {
                    let (x, y) = (x as usize, y as usize);
                    Rgb([0, 1, 2].map(|c| q(out[c][y][x]) as u16))
                }))
            }
            (false, Some(a), false) => {
                DynamicImage::ImageRgba8(ImageBuffer::from_fn(ow as u32, oh as u32, |x, y| {
                    let (x, y) = (x as usize, y as usize);
                    let [r, g, b] = [0, 1, 2].map(|c| q(out[c][y][x]) as u8);
                    Rgba([r, g, b, q(luma(a, y, x)) as u8])
                }))
            }
            (false, Some(a), true) => {
                DynamicImage::ImageRgba16(ImageBuffer::from_fn(ow as u32, oh as u32, |x, y| {
                    let (x, y) = (x as usize, y as usize);
                    let [r, g, b] = [0, 1, 2].map(|c| q(out[c][y][x]) as u16);
                    Rgba([r, g, b, q(luma(a, y, x)) as u16])
                }))
            }
        };
        if let Some(outscale) = outscale {
            if !(outscale > 0.0 && outscale.is_finite()) {
                return Err(Error::BadImage(format!(
                    "output scale {outscale} is not positive"
                )));
            }
            if outscale != self.scale() as f32 {
                // `int(w_input * outscale)` as the reference.
                let tw = ((w as f32 * outscale) as u32).max(1);
                let th = ((h as f32 * outscale) as u32).max(1);
                result = result.resize_exact(tw, th, image::imageops::FilterType::Lanczos3);
            }
        }
        Ok(result)
    }
}

/// `RealESRGANer`'s tiling knobs. `tile == 0` runs the whole image at once.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TileOptions {
    /// Tile side in input pixels; 0 runs the whole image at once.
    pub tile: usize,
    /// Context pixels read around each tile (and cropped from its output).
    pub tile_pad: usize,
    /// Reflection padding added to the bottom and right before inference.
    pub pre_pad: usize,
}

impl Default for TileOptions {
    /// The reference's pads; tiles of 128 input pixels (the reference defaults to none).
    /// Measured on CPU (2026-11-29): x4plus on a whole 256² input went past 16 GB RSS; the
    /// tiled bench (`examples/bench_upscale.rs`) peaked at 12 GB, still to be understood.
    fn default() -> Self {
        Self {
            tile: 128,
            tile_pad: 10,
            pre_pad: 10,
        }
    }
}

/// Reflect-pads the bottom by `ph` and the right by `pw` rows/columns (the edge itself is not
/// repeated, as `F.pad(mode='reflect')`). Pads larger than the image repeat the reflection.
fn reflect_pad(x: &Tensor, ph: usize, pw: usize) -> Result<Tensor, Error> {
    let (_, _, h, w) = x.dims4()?;
    let index = |n: usize, pad: usize| -> Vec<u32> {
        let period = 2 * (n - 1).max(1);
        (0..n + pad)
            .map(|i| {
                if n == 1 {
                    return 0;
                }
                let m = i % period;
                (if m < n { m } else { period - m }) as u32
            })
            .collect()
    };
    let dev = x.device();
    let rows = Tensor::new(index(h, ph), dev)?;
    let cols = Tensor::new(index(w, pw), dev)?;
    Ok(x.index_select(&rows, 2)?.index_select(&cols, 3)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reflect_pad_mirrors_without_repeating_the_edge() {
        let x = Tensor::arange(0f32, 4., &Device::Cpu)
            .unwrap()
            .reshape((1, 1, 1, 4))
            .unwrap();
        let p = reflect_pad(&x, 0, 3).unwrap();
        let v: Vec<f32> = p.flatten_all().unwrap().to_vec1().unwrap();
        assert_eq!(v, [0., 1., 2., 3., 2., 1., 0.]);
    }

    #[test]
    fn presets_resolve_by_release_name() {
        assert_eq!(
            EsrganArch::preset("RealESRGAN_x4plus_anime_6B"),
            Some(EsrganArch::Rrdb(RrdbConfig::X4PLUS_ANIME_6B))
        );
        for name in EsrganArch::PRESETS {
            assert!(EsrganArch::preset(name).is_some(), "{name}");
        }
        assert_eq!(EsrganArch::preset("gfpgan"), None);
    }
}
