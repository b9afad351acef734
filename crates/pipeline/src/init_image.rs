//! img2img and inpainting inputs: the init image and mask in latent space, and the mask's
//! blending (A1111's latent masking and its final overlay of the original pixels).

use candle_core::Tensor;
use image::{imageops, DynamicImage, GrayImage, RgbImage};

use crate::generate::{repeat, Engine, Request};
use crate::image_io::{crop_resize, image_to_tensor, mask_to_tensor};
use crate::vae_decode::encode_tiled;
use crate::Error;

/// Encodes the init image (and mask) for img2img/inpainting: the scaled init latent, the
/// latent-space mask, and for 9-channel inpainting UNets the extra input channels.
#[allow(clippy::type_complexity)]
pub(crate) fn prepare_init(
    engine: &Engine,
    req: &Request,
    b: usize,
    scaling: f64,
) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>), Error> {
    let dev = engine.device();
    let dt = engine.dtype();
    let inpaint_unet = engine.weights().unet.config.in_channels == 9;
    let (w, h) = (req.width as u32, req.height as u32);
    let vae = engine.vae()?;
    let encode = |img: &RgbImage| -> Result<Tensor, Error> {
        let t = image_to_tensor(img, dev, dt)?;
        Ok((encode_tiled(vae.get(), &t)? * scaling)?)
    };
    // An inpainting model without a mask (txt2img, or img2img as A1111 runs it): the whole
    // image is "to be painted", its masked image all zeros, as diffusers' inpainting
    // pipeline conditions it under an all-white mask.
    let paint_everything = || -> Result<Option<Tensor>, Error> {
        if !inpaint_unet {
            return Ok(None);
        }
        let zeros = Tensor::zeros((1, 3, h as usize, w as usize), dt, dev)?;
        let lat = (encode_tiled(vae.get(), &zeros)? * scaling)?;
        let ones = Tensor::ones((1, 1, h as usize / 8, w as usize / 8), dt, dev)?;
        Ok(Some(repeat(&Tensor::cat(&[ones, lat], 1)?, b)?))
    };
    let Some(init) = &req.init_image else {
        return Ok((None, None, paint_everything()?));
    };
    let init = crop_resize(init, w, h).to_rgb8();
    let init_latent = repeat(&encode(&init)?, b)?;
    let Some(mask) = &req.mask else {
        return Ok((Some(init_latent), None, paint_everything()?));
    };
    let mask = blurred_mask(mask, w, h, req.mask_blur);
    let small = imageops::resize(&mask, w / 8, h / 8, imageops::FilterType::Triangle);
    let latent_mask = mask_to_tensor(&small, dev, dt)?;
    let image_cond = if inpaint_unet {
        // The masked image: pixels to repaint set to 0 (grey in [-1, 1] terms → 0).
        let mut masked = init.clone();
        for (p, m) in masked.pixels_mut().zip(mask.pixels()) {
            if m.0[0] >= 128 {
                *p = image::Rgb([128, 128, 128]);
            }
        }
        let hard = GrayImage::from_fn(w / 8, h / 8, |x, y| {
            if small.get_pixel(x, y).0[0] >= 128 {
                image::Luma([255])
            } else {
                image::Luma([0])
            }
        });
        let m = mask_to_tensor(&hard, dev, dt)?;
        Some(repeat(&Tensor::cat(&[m, encode(&masked)?], 1)?, b)?)
    } else {
        None
    };
    Ok((Some(init_latent), Some(latent_mask), image_cond))
}

/// `x·m + keep·(1 − m)` with `m` `[1,1,h,w]` broadcast over batch and channels.
pub(crate) fn blend(x: &Tensor, keep: &Tensor, m: &Tensor) -> candle_core::Result<Tensor> {
    let m = m.to_dtype(x.dtype())?;
    let inv = (1.0 - &m)?;
    x.broadcast_mul(&m)? + keep.to_dtype(x.dtype())?.broadcast_mul(&inv)?
}

pub(crate) fn blurred_mask(mask: &GrayImage, w: u32, h: u32, blur: u32) -> GrayImage {
    let resized = DynamicImage::ImageLuma8(mask.clone())
        .resize_exact(w, h, imageops::FilterType::Triangle)
        .to_luma8();
    if blur == 0 {
        resized
    } else {
        imageops::blur(&resized, blur as f32)
    }
}

pub(crate) fn overlay(img: &mut RgbImage, original: &RgbImage, mask: &GrayImage) {
    for ((p, o), m) in img.pixels_mut().zip(original.pixels()).zip(mask.pixels()) {
        let a = m.0[0] as f32 / 255.0;
        for c in 0..3 {
            p.0[c] = (p.0[c] as f32 * a + o.0[c] as f32 * (1.0 - a)).round() as u8;
        }
    }
}
