//! The `depth_anything` module around the network of [`crate::depth_anything`], as the
//! extension's `DepthAnythingDetector` runs it: the image scaled (bicubic, f64) so its short
//! side is at least 518 and both sides are multiples of 14, normalised with ImageNet's mean and
//! deviation, the predicted depth resized (bilinear) back to the image and stretched min–max
//! to 0..255 (truncated to 8 bits), grey.
//!
//! One deliberate difference: the extension calls `cv2.cvtColor(image, cv2.COLOR_BGR2RGB)` on
//! an image that is already RGB, so its network sees BGR. Here the network sees RGB, the
//! channel order Depth Anything was trained on.

use std::path::Path;

use candle_core::{DType, Device, Tensor};
use image::{GrayImage, RgbImage};

use crate::depth_anything::{self, Config, DepthAnything};
use crate::raster::Raster;
use crate::resize::resize_cubic_f64;
use crate::Error;

/// The catalog entry of the weights (`sdkube fetch depth-anything-small`).
pub const CATALOG_NAME: &str = "depth-anything-small";

const TARGET: usize = 518;
const MEAN: [f64; 3] = [0.485, 0.456, 0.406];
const STD: [f64; 3] = [0.229, 0.224, 0.225];

/// The network's input size for a `width×height` image: Depth Anything's `Resize` with
/// `keep_aspect_ratio`, `lower_bound`, `ensure_multiple_of=14`, target 518.
pub fn input_size(width: usize, height: usize) -> (usize, usize) {
    let multiple = 14.0;
    let scale = (TARGET as f64 / width as f64).max(TARGET as f64 / height as f64);
    let constrain = |x: f64| {
        let y = (x / multiple).round_ties_even() * multiple;
        if y < TARGET as f64 {
            (x / multiple).ceil() * multiple
        } else {
            y
        }
    };
    (
        constrain(scale * width as f64) as usize,
        constrain(scale * height as f64) as usize,
    )
}

/// Depth Anything with its pre- and post-processing, on one device.
pub struct DepthAnythingDetector {
    net: DepthAnything,
    device: Device,
    dtype: DType,
}

impl DepthAnythingDetector {
    /// Wraps a built network whose weights live on `device` in `dtype`.
    pub fn new(net: DepthAnything, device: Device, dtype: DType) -> Self {
        Self { net, device, dtype }
    }

    /// Loads a checkpoint (the HF release's `model.safetensors`, either transformers layout).
    pub fn load(path: &Path, cfg: &Config, device: &Device, dtype: DType) -> Result<Self, Error> {
        let net = depth_anything::load(path, cfg, device, dtype)?;
        Ok(Self::new(net, device.clone(), dtype))
    }

    /// The normalised network input for an RGB image: `[1, 3, H', W']` f32.
    pub fn preprocess(image: &RgbImage) -> Tensor {
        let img = Raster::from_image(&image::DynamicImage::ImageRgb8(image.clone()));
        Self::preprocess_raster(&img)
    }

    fn preprocess_raster(img: &Raster<u8>) -> Tensor {
        let (w, h) = input_size(img.width, img.height);
        let scaled = resize_cubic_f64(&img.map(|v| f64::from(v) / 255.0), w, h);
        let mut chw = vec![0f32; 3 * w * h];
        for i in 0..w * h {
            for c in 0..3 {
                chw[c * w * h + i] = ((scaled.data[i * 3 + c] - MEAN[c]) / STD[c]) as f32;
            }
        }
        Tensor::from_vec(chw, (1, 3, h, w), &Device::Cpu).expect("the buffer has 3·h·w values")
    }

    /// Relative depth of an RGB image as 8-bit grey of the same size (white is near).
    pub fn predict(&self, image: &RgbImage) -> Result<GrayImage, Error> {
        let img = Raster::from_image(&image::DynamicImage::ImageRgb8(image.clone()));
        Ok(self.predict_raster(&img)?.into_gray_image())
    }

    pub(crate) fn predict_raster(&self, img: &Raster<u8>) -> Result<Raster<u8>, Error> {
        let err = |source| Error::Model {
            context: "depth_anything".into(),
            source,
        };
        let depth = (|| {
            let x = Self::preprocess_raster(img)
                .to_device(&self.device)?
                .to_dtype(self.dtype)?;
            let depth = self.net.forward(&x)?.unsqueeze(1)?.to_dtype(DType::F32)?;
            let depth = depth.upsample_bilinear2d(img.height, img.width, false)?;
            depth
                .flatten_all()?
                .to_device(&Device::Cpu)?
                .to_vec1::<f32>()
        })()
        .map_err(err)?;
        Ok(Raster {
            width: img.width,
            height: img.height,
            channels: 1,
            data: stretch_to_u8(&depth),
        })
    }

    /// The module's result on an already padded image: grey depth as three channels.
    pub(crate) fn detect_raster(&self, img: &Raster<u8>) -> Result<Raster<u8>, Error> {
        Ok(self.predict_raster(img)?.grey_to_rgb())
    }
}

/// `(d − min) / (max − min) · 255`, truncated to 8 bits; a flat map becomes black.
fn stretch_to_u8(depth: &[f32]) -> Vec<u8> {
    let min = depth.iter().copied().fold(f32::INFINITY, f32::min);
    let max = depth.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    if max.partial_cmp(&min) != Some(std::cmp::Ordering::Greater) {
        return vec![0; depth.len()];
    }
    depth
        .iter()
        .map(|&d| ((d - min) / (max - min) * 255.0) as u8)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn input_size_is_at_least_518_and_a_multiple_of_14() {
        assert_eq!(input_size(512, 512), (518, 518));
        // 777 = 55.5·14: numpy rounds half to even, to 56·14
        assert_eq!(input_size(768, 512), (784, 518));
        let (w, h) = input_size(640, 1024);
        assert_eq!((w % 14, h % 14), (0, 0));
        assert!(w >= 518 && h >= 518);
    }

    #[test]
    fn stretch_spans_0_to_255() {
        assert_eq!(stretch_to_u8(&[2.0, 3.0, 4.0]), [0, 127, 255]);
        assert_eq!(stretch_to_u8(&[1.0, 1.0]), [0, 0]);
    }
}
