//! ControlNet preprocessors ("annotators"): the control maps sd-webui-controlnet's modules make
//! from an input image, under the same names, sliders and defaults, so `/controlnet/detect` and
//! a txt2img unit's `module` behave as the extension's do.
//!
//! - [`modules`] lists them in the extension's order (`/controlnet/module_list`, with labels and
//!   sliders for `module_detail`); [`find`] looks one up by name or label;
//! - [`detect`] runs one on an image with a unit's `processor_res` / `threshold_a` /
//!   `threshold_b` ([`Params`]); learned modules take their network from [`Annotators`];
//! - model-free ones: `none`, `invert`, `canny`, `threshold`, `blur_gaussian`,
//!   `tile_resample`, `scribble_xdog`, `inpaint`/`inpaint_only` (the mask in the alpha
//!   channel; [`inpaint_hint`] is the ControlNet input the pipeline builds from it);
//! - learned: `depth_anything` ([`depth::DepthAnythingDetector`] over the network in
//!   [`depth_anything`], transformers' `DepthAnythingForDepthEstimation`).
//!
//! Resizing and filtering follow OpenCV's arithmetic (`cv2.resize` area/bicubic, the 8-bit
//! fixed-point `GaussianBlur`, `Canny`), so maps equal the Python ones; the parity tests say
//! how closely.

pub mod depth;
pub mod depth_anything;
mod filters;
mod modules;
mod raster;
mod resize;

use candle_core::{Device, Tensor};
use image::{DynamicImage, GrayImage, RgbImage, RgbaImage};

pub use depth::DepthAnythingDetector;
pub use modules::{
    find, modules, pixel_perfect_resolution, Kind, Module, Params, ResizeMode, Resolved, Slider,
};

use raster::{resize_with_pad, Raster};

/// What can go wrong running a preprocessor; each message names the module or value at fault.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The module name is neither a module's name nor its label.
    #[error("unknown ControlNet preprocessor {name:?}; known: {known}")]
    UnknownModule {
        /// The name asked for.
        name: String,
        /// The known names, comma-separated.
        known: String,
    },
    /// A parameter lies outside its slider's range.
    #[error("{module}: {field} = {value} is outside {slider}'s range {minimum}..={maximum}")]
    OutOfRange {
        /// The module.
        module: &'static str,
        /// The unit's field (`processor_res`, `threshold_a`, `threshold_b`).
        field: &'static str,
        /// The slider it sets.
        slider: &'static str,
        /// The value sent.
        value: f64,
        /// The slider's minimum.
        minimum: f64,
        /// The slider's maximum.
        maximum: f64,
    },
    /// An inpaint module got no mask.
    #[error("{module} needs a mask (controlnet_masks / the unit's mask)")]
    MaskRequired {
        /// The module.
        module: &'static str,
    },
    /// The mask's size differs from the image's.
    #[error("the mask is {mask_width}x{mask_height}, the image {width}x{height}")]
    MaskSize {
        /// Image width.
        width: u32,
        /// Image height.
        height: u32,
        /// Mask width.
        mask_width: u32,
        /// Mask height.
        mask_height: u32,
    },
    /// The image has no pixels.
    #[error("the input image is empty ({width}x{height})")]
    EmptyImage {
        /// Width.
        width: u32,
        /// Height.
        height: u32,
    },
    /// The image would be scaled beyond [`MAX_PIXELS`] (a very long image at a high resolution).
    #[error("{module}: a {width}x{height} image at processor_res {resolution} would be {scaled_width}x{scaled_height}, above {max} pixels")]
    TooLarge {
        /// The module.
        module: &'static str,
        /// Image width.
        width: u32,
        /// Image height.
        height: u32,
        /// The processor resolution.
        resolution: f64,
        /// The scaled width.
        scaled_width: usize,
        /// The scaled height.
        scaled_height: usize,
        /// [`MAX_PIXELS`].
        max: usize,
    },
    /// A learned module's network was not loaded.
    #[error("{module} needs its network: fetch it with `sdkube fetch {weights}` and load it")]
    ModelNotLoaded {
        /// The module.
        module: &'static str,
        /// The catalog name of its weights.
        weights: &'static str,
    },
    /// A weight file could not be read.
    #[error(transparent)]
    Weights(#[from] sdkube_weights::Error),
    /// A checkpoint lacks a tensor or has one of the wrong shape, or the network failed.
    #[error("{context}: {source}")]
    Model {
        /// What was being done (the file, or the module).
        context: String,
        /// candle's error.
        source: candle_core::Error,
    },
}

/// The most pixels an image may be scaled to before detection: the largest resolution (2048)
/// at an aspect ratio of 1:4.
pub const MAX_PIXELS: usize = 2048 * 8192;

/// The networks learned modules use, loaded by the caller (absent ones make those modules an
/// [`Error::ModelNotLoaded`]).
#[derive(Default)]
pub struct Annotators {
    /// For `depth_anything`.
    pub depth_anything: Option<DepthAnythingDetector>,
}

/// Runs the preprocessor `module` (name or label) on `image`, as the extension's detect does.
/// `mask` is the inpaint modules' mask (white = repaint; without one, an RGBA image's alpha is
/// the mask, as the extension's canvas sends it), ignored by the others. The result is
/// RGB, except the inpaint modules' RGBA (the image, its alpha `255 − mask/2`, the extension's
/// `visualize_inpaint_mask`).
pub fn detect(
    module: &str,
    image: &DynamicImage,
    mask: Option<&GrayImage>,
    params: &Params,
    annotators: &Annotators,
) -> Result<DynamicImage, Error> {
    let m = find(module)?;
    let p = m.resolve(params)?;
    if image.width() == 0 || image.height() == 0 {
        return Err(Error::EmptyImage {
            width: image.width(),
            height: image.height(),
        });
    }
    let resizes = matches!(
        m.kind,
        Kind::Canny
            | Kind::Threshold
            | Kind::BlurGaussian
            | Kind::ScribbleXdog
            | Kind::DepthAnything
    );
    if resizes {
        let (w, h) = raster::processor_size(
            image.width() as usize,
            image.height() as usize,
            p.resolution,
        );
        if w * h > MAX_PIXELS {
            return Err(Error::TooLarge {
                module: m.name,
                width: image.width(),
                height: image.height(),
                resolution: p.resolution,
                scaled_width: w,
                scaled_height: h,
                max: MAX_PIXELS,
            });
        }
    }
    let img = Raster::from_image(image);
    let rgb = |r: Raster<u8>| Ok(DynamicImage::ImageRgb8(r.into_rgb_image()));
    match m.kind {
        Kind::None => rgb(img),
        Kind::Invert => rgb(img.map(|v| 255 - v)),
        Kind::Canny => {
            let (padded, (w, h)) = resize_with_pad(&img, p.resolution);
            rgb(filters::canny(&padded, p.a, p.b).crop(w, h))
        }
        Kind::Threshold => {
            let (padded, (w, h)) = resize_with_pad(&img, p.resolution);
            rgb(binarize(&padded, |px| min3(px) as f64 > p.a).crop(w, h))
        }
        Kind::BlurGaussian => {
            let (padded, (w, h)) = resize_with_pad(&img, p.resolution);
            rgb(filters::gaussian_blur_u8(&padded.crop(w, h), p.a))
        }
        Kind::TileResample => rgb(tile_resample(&img, p.a)),
        Kind::ScribbleXdog => {
            let (padded, (w, h)) = resize_with_pad(&img, p.resolution);
            rgb(scribble_xdog(&padded, p.a).crop(w, h))
        }
        Kind::Inpaint => {
            // the colour channels as they are (no compositing): the alpha is the mask here
            let alpha;
            let mask = match mask {
                Some(m) => m,
                None if image.color().has_alpha() => {
                    alpha = alpha_channel(image);
                    &alpha
                }
                None => return Err(Error::MaskRequired { module: m.name }),
            };
            Ok(DynamicImage::ImageRgba8(inpaint_visual(
                &image.to_rgb8(),
                mask,
            )?))
        }
        Kind::DepthAnything => {
            let detector = annotators
                .depth_anything
                .as_ref()
                .ok_or(Error::ModelNotLoaded {
                    module: m.name,
                    weights: depth::CATALOG_NAME,
                })?;
            let (padded, (w, h)) = resize_with_pad(&img, p.resolution);
            let depth = detector.detect_raster(&padded)?;
            rgb(depth.crop(w, h))
        }
    }
}

fn min3(px: &[u8]) -> u8 {
    px.iter().copied().min().unwrap_or(0)
}

/// 255 in every channel where `on(pixel)`, 0 elsewhere (`result[cond] = 255` on a
/// `zeros_like(img)`).
fn binarize(img: &Raster<u8>, on: impl Fn(&[u8]) -> bool) -> Raster<u8> {
    let mut out = Raster::new(img.width, img.height, 3);
    for (dst, px) in out
        .data
        .chunks_exact_mut(3)
        .zip(img.data.chunks_exact(img.channels))
    {
        if on(px) {
            dst.fill(255);
        }
    }
    out
}

/// `tile_resample`: below a rate of 1.1 the image as it is, else shrunk by the rate (area
/// averaging, sides truncated). The enlarging back to the generation size is the ControlNet
/// pipeline's resize of every control map.
fn tile_resample(img: &Raster<u8>, rate: f64) -> Raster<u8> {
    if rate < 1.1 {
        return img.clone();
    }
    let w = ((img.width as f64 / rate) as usize).max(1);
    let h = ((img.height as f64 / rate) as usize).max(1);
    resize::resize_area(img, w, h)
}

/// `scribble_xdog`: the difference of Gaussians σ 0.5 and σ 5 (f32, darkest channel), white
/// where `2·(255 − dog)` exceeds the threshold. numpy computes that product in uint8, so it
/// wraps around above 255; kept, since it is what the extension draws.
fn scribble_xdog(img: &Raster<u8>, threshold: f64) -> Raster<u8> {
    let f = img.map(f32::from);
    let g1 = filters::gaussian_blur_f32(&f, 0.5);
    let g2 = filters::gaussian_blur_f32(&f, 5.0);
    let cn = img.channels;
    let mut out = Raster::new(img.width, img.height, 3);
    for i in 0..img.width * img.height {
        let m = (0..cn)
            .map(|c| g2.data[i * cn + c] - g1.data[i * cn + c])
            .fold(f32::INFINITY, f32::min);
        let dog = (255.0 - m).clamp(0.0, 255.0) as u8;
        let edge = (255 - dog).wrapping_mul(2);
        if f64::from(edge) > threshold {
            out.data[i * 3..i * 3 + 3].fill(255);
        }
    }
    out
}

fn check_mask(img: &RgbImage, mask: &GrayImage) -> Result<(), Error> {
    if mask.dimensions() != img.dimensions() {
        return Err(Error::MaskSize {
            width: img.width(),
            height: img.height(),
            mask_width: mask.width(),
            mask_height: mask.height(),
        });
    }
    Ok(())
}

/// The inpaint modules' detect result: the image with alpha `255 − mask/2` (masked parts shown
/// half transparent).
fn inpaint_visual(img: &RgbImage, mask: &GrayImage) -> Result<RgbaImage, Error> {
    check_mask(img, mask)?;
    let mut out = RgbaImage::new(img.width(), img.height());
    for ((dst, px), m) in out.pixels_mut().zip(img.pixels()).zip(mask.as_raw()) {
        *dst = image::Rgba([px[0], px[1], px[2], 255 - m / 2]);
    }
    Ok(out)
}

/// The alpha channel of an image, as a mask.
fn alpha_channel(image: &DynamicImage) -> GrayImage {
    let rgba = image.to_rgba8();
    GrayImage::from_fn(rgba.width(), rgba.height(), |x, y| {
        image::Luma([rgba.get_pixel(x, y)[3]])
    })
}

/// The ControlNet input an inpaint unit feeds the network (the extension's "inpaint protocol"):
/// `[1, 3, H, W]`, the image in 0..1 where the mask is at most half, −1 where it is above.
/// The pipeline calls this after resizing image and mask to the generation size.
pub fn inpaint_hint(image: &RgbImage, mask: &GrayImage, device: &Device) -> Result<Tensor, Error> {
    check_mask(image, mask)?;
    let (w, h) = (image.width() as usize, image.height() as usize);
    let rgb = image.as_raw();
    let mut chw = vec![0f32; 3 * w * h];
    for (i, &m) in mask.as_raw().iter().enumerate() {
        let masked = f32::from(m) / 255.0 > 0.5;
        for c in 0..3 {
            chw[c * w * h + i] = if masked {
                -1.0
            } else {
                f32::from(rgb[i * 3 + c]) / 255.0
            };
        }
    }
    Tensor::from_vec(chw, (1, 3, h, w), device).map_err(|source| Error::Model {
        context: "inpaint hint".into(),
        source,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn photo() -> RgbImage {
        RgbImage::from_fn(8, 6, |x, y| image::Rgb([x as u8 * 30, y as u8 * 40, 7]))
    }

    fn mask() -> GrayImage {
        GrayImage::from_fn(8, 6, |x, _| image::Luma([if x < 3 { 255 } else { 0 }]))
    }

    #[test]
    fn inpaint_takes_an_rgba_images_alpha_as_its_mask() {
        let (rgb, mask) = (photo(), mask());
        let with_mask = detect(
            "inpaint_only",
            &DynamicImage::ImageRgb8(rgb.clone()),
            Some(&mask),
            &Params::default(),
            &Annotators::default(),
        )
        .unwrap();
        let rgba = RgbaImage::from_fn(8, 6, |x, y| {
            let p = rgb.get_pixel(x, y);
            image::Rgba([p[0], p[1], p[2], mask.get_pixel(x, y)[0]])
        });
        let from_alpha = detect(
            "inpaint_global_harmonious",
            &DynamicImage::ImageRgba8(rgba),
            None,
            &Params::default(),
            &Annotators::default(),
        )
        .unwrap();
        assert_eq!(with_mask, from_alpha);
        assert_eq!(with_mask.to_rgba8().get_pixel(0, 0)[3], 255 - 255 / 2);
        let err = detect(
            "inpaint",
            &DynamicImage::ImageRgb8(rgb),
            None,
            &Params::default(),
            &Annotators::default(),
        )
        .unwrap_err();
        assert!(
            matches!(err, Error::MaskRequired { module: "inpaint" }),
            "{err}"
        );
    }

    #[test]
    fn inpaint_hint_is_minus_one_under_the_mask() {
        let hint = inpaint_hint(&photo(), &mask(), &Device::Cpu).unwrap();
        assert_eq!(hint.dims(), [1, 3, 6, 8]);
        let px = hint.squeeze(0).unwrap().to_vec3::<f32>().unwrap();
        assert_eq!(px[0][0][0], -1.0);
        assert_eq!(px[0][0][5], 150.0 / 255.0);
        assert_eq!(px[1][2][4], 80.0 / 255.0);
    }

    #[test]
    fn empty_images_and_mismatched_masks_are_errors() {
        let err = detect(
            "canny",
            &DynamicImage::new_rgb8(0, 4),
            None,
            &Params::default(),
            &Annotators::default(),
        )
        .unwrap_err();
        assert!(matches!(err, Error::EmptyImage { .. }));
        let small = GrayImage::new(2, 2);
        let err = inpaint_hint(&photo(), &small, &Device::Cpu).unwrap_err();
        assert!(err.to_string().contains("2x2"), "{err}");
        // 1×1000 at resolution 2048 would be 2048×2048000
        let err = detect(
            "canny",
            &DynamicImage::new_rgb8(1, 1000),
            None,
            &Params {
                processor_res: Some(2048.0),
                ..Params::default()
            },
            &Annotators::default(),
        )
        .unwrap_err();
        assert!(err.to_string().contains("2048x2048000"), "{err}");
    }
}
