//! A1111's "Hires. fix": the first pass at the requested size, its result upscaled (the
//! latent itself for the "Latent" upscalers, else the decoded image through an image
//! upscaler), then img2img at the larger size from the same seed.

use image::imageops::FilterType;
use image::DynamicImage;

use crate::generate::{Engine, Generated, Overrides, Progress, Request};
use crate::infotext::{self, ImageInfo};
use crate::latent_upscale::{upscale_latent, LatentMode};
use crate::sampler::Flow;
use crate::Error;

/// How the hires size was asked for, as A1111's infotext records it.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum HiresSize {
    /// `hr_scale`: the first pass's size times this ("Hires upscale").
    Scale(f64),
    /// `hr_resize_x` × `hr_resize_y` as given, 0 for a side taken from the other's aspect
    /// ("Hires resize").
    Resize(usize, usize),
}

/// The second pass of a hires fix.
#[derive(Debug, Clone, PartialEq)]
pub struct HiresFix {
    /// Width of the final image (a multiple of 8).
    pub width: usize,
    /// Height of the final image (a multiple of 8).
    pub height: usize,
    /// How the size was asked for.
    pub size: HiresSize,
    /// One of the "Latent" upscalers (see [`LatentMode`]: the latent itself is resized) or the
    /// name of an image upscaler, which the caller runs.
    pub upscaler: String,
    /// Sampling steps of the second pass as asked (A1111's `hr_second_pass_steps`): 0 means
    /// as many as the first pass ([`HiresFix::steps_after`]).
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
            size: HiresSize::Scale(scale),
            upscaler: upscaler.to_string(),
            steps,
            denoising_strength,
        })
    }

    /// The second pass's steps after a first pass of `first_steps`.
    pub fn steps_after(&self, first_steps: usize) -> usize {
        match self.steps {
            0 => first_steps,
            n => n,
        }
    }

    /// The latent mode, when the upscale happens on the latent (A1111's "Latent" upscalers).
    pub fn latent_mode(&self) -> Option<LatentMode> {
        LatentMode::parse(&self.upscaler)
    }

    /// The second pass's request for the image of `first` made with `seed` and `subseed`
    /// (its init image still to be set): A1111 draws its noise with the same seeds and
    /// variation settings.
    pub fn second_pass(&self, first: &Request, seed: u64, subseed: u64) -> Request {
        Request {
            init_image: None,
            strength: self.denoising_strength,
            steps: self.steps_after(first.steps),
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
        // latent ones resize the latent itself (as torch's interpolate), the image only riding along
        // for masks and inpainting models.
        let (upscaled, init_latent) = if let Some(mode) = hires.latent_mode() {
            let latent = upscale_latent(&image.latent, hires.height / 8, hires.width / 8, mode)?;
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
            },
        );
        out.infotext = out.parameters.to_string();
        Ok(out)
    }
}
