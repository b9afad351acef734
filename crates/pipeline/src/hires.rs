//! A1111's "Hires. fix": the first pass at the requested size, its result upscaled (the
//! latent itself for the "Latent" upscalers, else the decoded image through an image
//! upscaler), then img2img at the larger size from the same seed.

use candle_core::{DType, Tensor};
use image::imageops::FilterType;
use image::DynamicImage;

use crate::generate::{Engine, Generated, Overrides, Progress, Request};
use crate::infotext::{self, ImageInfo};
use crate::sampler::Flow;
use crate::Error;

/// The second pass of a hires fix.
#[derive(Debug, Clone, PartialEq)]
pub struct HiresFix {
    /// Width of the final image (a multiple of 8).
    pub width: usize,
    /// Height of the final image (a multiple of 8).
    pub height: usize,
    /// "Latent" (or a "Latent (…)" variant: bilinear resize of the latent) or the name of an
    /// image upscaler, which the caller runs.
    pub upscaler: String,
    /// Sampling steps of the second pass.
    pub steps: usize,
    /// img2img denoising strength of the second pass (0..1).
    pub denoising_strength: f64,
}

impl HiresFix {
    /// A1111's `hr_scale`: the first pass's size times `scale` (1 to 8), rounded down to a
    /// multiple of 8; `steps` 0 means the first pass's steps.
    pub fn scaled(
        first: &Request,
        scale: f64,
        upscaler: &str,
        steps: usize,
        denoising_strength: f64,
    ) -> Result<Self, Error> {
        if !(1.0..=8.0).contains(&scale) {
            return Err(Error::Invalid(format!(
                "the hires scale must be between 1 and 8, got {scale}"
            )));
        }
        if !(0.0..=1.0).contains(&denoising_strength) {
            return Err(Error::Invalid(format!(
                "the hires denoising strength must be between 0 and 1, got {denoising_strength}"
            )));
        }
        let side = |v: usize| (v as f64 * scale) as usize / 8 * 8;
        Ok(Self {
            width: side(first.width),
            height: side(first.height),
            upscaler: upscaler.to_string(),
            steps: if steps > 0 { steps } else { first.steps },
            denoising_strength,
        })
    }

    /// Whether the upscale happens on the latent (A1111's "Latent" upscalers).
    pub fn in_latent_space(&self) -> bool {
        self.upscaler.starts_with("Latent")
    }

    /// The second pass's request for the image of `first` made with `seed` and `subseed`
    /// (its init image still to be set): A1111 draws its noise with the same seeds and
    /// variation settings.
    pub fn second_pass(&self, first: &Request, seed: u64, subseed: u64) -> Request {
        Request {
            init_image: None,
            strength: self.denoising_strength,
            steps: self.steps,
            width: self.width,
            height: self.height,
            seed,
            subseed,
            batch_size: 1,
            mask: None,
            ..first.clone()
        }
    }
}

/// Why a hires fix failed: the caller's image upscaler, or the engine.
#[derive(Debug)]
pub enum HiresError<E> {
    /// The image upscaler failed.
    Upscale(E),
    /// The second pass failed.
    Generate(Error),
}

impl<E> From<Error> for HiresError<E> {
    fn from(e: Error) -> Self {
        HiresError::Generate(e)
    }
}

impl Engine {
    /// The hires fix's second pass on `image`, one image that `first` made: upscales it
    /// (`upscale(name, image, factor)` runs image upscalers; "Latent" ones resize the latent
    /// here), then runs img2img at the hires size from the image's seed. The result's
    /// infotext is the first pass's with A1111's hires fields.
    pub fn hires_fix<E>(
        &mut self,
        first: &Request,
        image: &Generated,
        hires: &HiresFix,
        upscale: &mut dyn FnMut(&str, &DynamicImage, f32) -> Result<DynamicImage, E>,
        on_step: &mut dyn FnMut(&Progress) -> Flow,
    ) -> Result<Generated, HiresError<E>> {
        let (w, h) = (hires.width as u32, hires.height as u32);
        let decoded = DynamicImage::ImageRgb8(image.image.clone());
        let factor = hires.width as f32 / decoded.width() as f32;
        // Image upscalers resize the decoded image, which the second pass encodes again; the
        // latent ones resize the latent itself (A1111: bilinear), the image only riding along
        // for masks and inpainting models.
        let (upscaled, init_latent) = if hires.in_latent_space() {
            let latent = upscale_latent(&image.latent, hires.height / 8, hires.width / 8)?;
            (
                decoded.resize_exact(w, h, FilterType::Triangle),
                Some(latent),
            )
        } else {
            let up = upscale(&hires.upscaler, &decoded, factor).map_err(HiresError::Upscale)?;
            (up.resize_exact(w, h, FilterType::Lanczos3), None)
        };
        let req = Request {
            init_image: Some(upscaled),
            ..hires.second_pass(first, image.seed, image.subseed)
        };
        let overrides = Overrides {
            init_latent,
            ..Overrides::default()
        };
        let mut second = self.generate_with(&req, overrides, on_step)?;
        let mut out = second
            .pop()
            .ok_or_else(|| Error::Invalid("the hires pass produced no image".into()))?;
        let spec = self.validate(first)?;
        let ti_hashes = self.ti_hashes(first);
        out.parameters = infotext::generation(
            first,
            &ImageInfo {
                spec: &spec,
                seed: image.seed,
                subseed: image.subseed,
                model: self.model_name(),
                family: self.family(),
                ti_hashes: &ti_hashes,
                lora_hashes: &self.lora_hashes(first),
                hires: Some(hires),
                refiner: self.refiner_used(first),
            },
        );
        out.infotext = out.parameters.to_string();
        Ok(out)
    }
}

/// Bilinear resize of a latent `[B, C, h, w]` to `[B, C, height, width]`, as PyTorch's
/// `interpolate(mode="bilinear", align_corners=False)` (A1111's "Latent" hires upscaler).
pub fn upscale_latent(latent: &Tensor, height: usize, width: usize) -> Result<Tensor, Error> {
    let (_, _, h, w) = latent.dims4()?;
    let dev = latent.device();
    // Source indices and weights along one axis.
    let axis = |n_in: usize, n_out: usize| {
        let scale = n_in as f64 / n_out as f64;
        let (mut i0, mut i1, mut frac) = (Vec::new(), Vec::new(), Vec::new());
        for d in 0..n_out {
            let src = ((d as f64 + 0.5) * scale - 0.5).max(0.0);
            let lo = (src.floor() as usize).min(n_in - 1);
            i0.push(lo as u32);
            i1.push((lo + 1).min(n_in - 1) as u32);
            frac.push((src - lo as f64) as f32);
        }
        (i0, i1, frac)
    };
    let x = latent.to_dtype(DType::F32)?;
    let (y0, y1, fy) = axis(h, height);
    let (x0, x1, fx) = axis(w, width);
    let idx = |v: Vec<u32>| Tensor::from_vec(v.clone(), v.len(), dev);
    let fy = Tensor::from_vec(fy, (1, 1, height, 1), dev)?;
    let fx = Tensor::from_vec(fx, (1, 1, 1, width), dev)?;
    let top = x.index_select(&idx(y0)?, 2)?;
    let bottom = x.index_select(&idx(y1)?, 2)?;
    let rows = (top.broadcast_mul(&(1.0 - &fy)?)? + bottom.broadcast_mul(&fy)?)?;
    let left = rows.index_select(&idx(x0)?, 3)?;
    let right = rows.index_select(&idx(x1)?, 3)?;
    let out = (left.broadcast_mul(&(1.0 - &fx)?)? + right.broadcast_mul(&fx)?)?;
    Ok(out.to_dtype(latent.dtype())?)
}
