//! Image ↔ tensor conversions, PNG files with A1111's "parameters" infotext, and the cheap
//! latent → RGB preview shown during sampling.

use std::path::Path;

use candle_core::{DType, Device, Tensor};
use image::{imageops::FilterType, DynamicImage, GrayImage, RgbImage};

use crate::Error;

/// `[H, W]` RGB image → `[1, 3, H, W]` tensor in [-1, 1].
pub fn image_to_tensor(img: &RgbImage, device: &Device, dtype: DType) -> Result<Tensor, Error> {
    let (w, h) = img.dimensions();
    let data: Vec<f32> = img
        .as_raw()
        .iter()
        .map(|&v| v as f32 / 127.5 - 1.0)
        .collect();
    Ok(Tensor::from_vec(data, (h as usize, w as usize, 3), device)?
        .permute((2, 0, 1))?
        .unsqueeze(0)?
        .to_dtype(dtype)?)
}

/// `[B, 3, H, W]` tensor in [-1, 1] → images.
pub fn tensor_to_images(t: &Tensor) -> Result<Vec<RgbImage>, Error> {
    let t =
        ((t.to_dtype(DType::F32)?.to_device(&Device::Cpu)? + 1.0)? * 127.5)?.clamp(0f32, 255f32)?;
    let (b, _, h, w) = t.dims4()?;
    (0..b)
        .map(|i| {
            let data: Vec<u8> = t
                .get(i)?
                .permute((1, 2, 0))?
                .flatten_all()?
                .to_vec1::<f32>()?
                .into_iter()
                .map(|v| v.round() as u8)
                .collect();
            RgbImage::from_raw(w as u32, h as u32, data)
                .ok_or_else(|| Error::Invalid("image buffer size".into()))
        })
        .collect()
}

/// Mask `[H, W]` (white = repaint) → `[1, 1, H, W]` in [0, 1].
pub fn mask_to_tensor(mask: &GrayImage, device: &Device, dtype: DType) -> Result<Tensor, Error> {
    let (w, h) = mask.dimensions();
    let data: Vec<f32> = mask.as_raw().iter().map(|&v| v as f32 / 255.0).collect();
    Ok(Tensor::from_vec(data, (1, 1, h as usize, w as usize), device)?.to_dtype(dtype)?)
}

/// Resizes to exactly `width`×`height` by scaling to cover and centre-cropping (A1111's
/// "Crop and resize").
pub fn crop_resize(img: &DynamicImage, width: u32, height: u32) -> DynamicImage {
    img.resize_to_fill(width, height, FilterType::Lanczos3)
}

/// Reads an image file with a clear error for missing, truncated or non-image files.
pub fn read_image(path: &Path) -> Result<DynamicImage, Error> {
    let img = image::ImageReader::open(path)
        .map_err(|e| Error::Image(format!("{}: {e}", path.display())))?
        .with_guessed_format()
        .map_err(|e| Error::Image(format!("{}: {e}", path.display())))?
        .decode()
        .map_err(|e| Error::Image(format!("{}: not a readable image: {e}", path.display())))?;
    if img.width() == 0 || img.height() == 0 {
        return Err(Error::Image(format!(
            "{}: image has no pixels",
            path.display()
        )));
    }
    Ok(img)
}

/// Encodes a PNG carrying `parameters` (A1111's infotext key; iTXt when not Latin-1).
pub fn encode_png(img: &RgbImage, parameters: Option<&str>) -> Result<Vec<u8>, Error> {
    let mut out = Vec::new();
    {
        let mut enc = png::Encoder::new(&mut out, img.width(), img.height());
        enc.set_color(png::ColorType::Rgb);
        enc.set_depth(png::BitDepth::Eight);
        if let Some(text) = parameters {
            let latin1 = text.chars().all(|c| (c as u32) < 256);
            let r = if latin1 {
                enc.add_text_chunk("parameters".into(), text.into())
            } else {
                enc.add_itxt_chunk("parameters".into(), text.into())
            };
            r.map_err(|e| Error::Image(format!("png text: {e}")))?;
        }
        let mut writer = enc
            .write_header()
            .map_err(|e| Error::Image(format!("png: {e}")))?;
        writer
            .write_image_data(img.as_raw())
            .map_err(|e| Error::Image(format!("png: {e}")))?;
    }
    Ok(out)
}

/// Reads the `parameters` text of a PNG (A1111's PNG Info), if any.
pub fn read_png_parameters(bytes: &[u8]) -> Result<Option<String>, Error> {
    let decoder = png::Decoder::new(std::io::Cursor::new(bytes));
    let reader = decoder
        .read_info()
        .map_err(|e| Error::Image(format!("png: {e}")))?;
    let info = reader.info();
    if let Some(t) = info
        .uncompressed_latin1_text
        .iter()
        .find(|t| t.keyword == "parameters")
    {
        return Ok(Some(t.text.clone()));
    }
    if let Some(t) = info
        .compressed_latin1_text
        .iter()
        .find(|t| t.keyword == "parameters")
    {
        return Ok(t.get_text().ok());
    }
    if let Some(t) = info.utf8_text.iter().find(|t| t.keyword == "parameters") {
        return Ok(t.get_text().ok());
    }
    Ok(None)
}

/// Linear latent → RGB factors (the widely used "approx cheap" preview), per latent space.
const SD_LATENT_RGB: [[f32; 3]; 4] = [
    [0.3512, 0.2297, 0.3227],
    [0.3250, 0.4974, 0.2350],
    [-0.2829, 0.1762, 0.2721],
    [-0.2120, -0.2616, -0.7177],
];
const SDXL_LATENT_RGB: [[f32; 3]; 4] = [
    [0.3651, 0.4232, 0.4341],
    [-0.2533, -0.0042, 0.1068],
    [0.1076, 0.1111, -0.0362],
    [-0.3165, -0.2492, -0.2188],
];

/// A quick preview of the first latent of a batch `[B, 4, h, w]` (no VAE): one pixel per
/// latent cell, 1/8 of the final size.
pub fn latent_preview(latent: &Tensor, sdxl: bool) -> Result<RgbImage, Error> {
    let factors = if sdxl { SDXL_LATENT_RGB } else { SD_LATENT_RGB };
    let l = latent
        .get(0)?
        .to_dtype(DType::F32)?
        .to_device(&Device::Cpu)?;
    let (c, h, w) = l.dims3()?;
    if c != 4 {
        return Err(Error::Invalid(format!(
            "preview needs 4 latent channels, got {c}"
        )));
    }
    let m = Tensor::new(&factors, &Device::Cpu)?; // [4, 3]
    let rgb = l.reshape((4, h * w))?.t()?.matmul(&m)?; // [hw, 3]
    let rgb = ((rgb + 1.0)? * 127.5)?.clamp(0f32, 255f32)?;
    let data: Vec<u8> = rgb
        .flatten_all()?
        .to_vec1::<f32>()?
        .into_iter()
        .map(|v| v as u8)
        .collect();
    RgbImage::from_raw(w as u32, h as u32, data)
        .ok_or_else(|| Error::Invalid("preview size".into()))
}
