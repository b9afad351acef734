//! Face restoration pipeline: detect → align to the FFHQ template → GFPGAN → paste back.
//!
//! Follows facexlib's `FaceRestoreHelper` as GFPGANer drives it (square soft mask, no face
//! parsing): RetinaFace finds faces (confidence 0.97, eye distance ≥ 5 px); a 5-point
//! similarity transform (least squares, like `cv2.estimateAffinePartial2D`) maps each face
//! onto facexlib's 512 template; the crop is warped bilinearly (grey border), restored, warped
//! back with the inverse transform and blended through a mask that is eroded and Gaussian
//! blurred at the edges. The background is resized (or handed to a [`BackgroundUpscaler`],
//! e.g. RealESRGAN) to the output scale first. `visibility` blends the result with that
//! background, like A1111's "GFPGAN visibility".

use candle_core::{Device, Tensor};
use image::RgbImage;

use crate::gfpgan::{Gfpgan, Noise};
use crate::retinaface::{DetectOptions, Detection, RetinaFace};

pub use crate::error::FaceError;

/// facexlib's FFHQ 5-point template for 512×512 faces: eyes, nose, mouth corners.
pub const FFHQ_TEMPLATE_512: [[f32; 2]; 5] = [
    [192.98138, 239.94708],
    [318.90277, 240.1936],
    [256.63416, 314.01935],
    [201.26117, 371.41043],
    [313.08905, 371.15118],
];

/// Crop border colour (RGB) used by facexlib when the face touches the image edge.
const CROP_BORDER_RGB: [f32; 3] = [132.0, 133.0, 135.0];

/// A 2×3 affine matrix `[[a, b, tx], [c, d, ty]]` mapping `(x, y, 1)`.
pub type Affine = [[f64; 3]; 2];

/// Least-squares similarity transform (rotation, uniform scale, translation) taking `src`
/// points onto `dst` points.
pub fn similarity_transform(src: &[[f32; 2]], dst: &[[f32; 2]]) -> Result<Affine, FaceError> {
    if src.len() != dst.len() || src.len() < 2 {
        return Err(FaceError::Input(
            "a similarity transform needs ≥ 2 point pairs".into(),
        ));
    }
    let n = src.len() as f64;
    let mean = |p: &[[f32; 2]]| {
        let (sx, sy) = p
            .iter()
            .fold((0.0, 0.0), |(a, b), q| (a + q[0] as f64, b + q[1] as f64));
        (sx / n, sy / n)
    };
    let (mx, my) = mean(src);
    let (mu, mv) = mean(dst);
    let (mut num_a, mut num_b, mut den) = (0.0, 0.0, 0.0);
    for (p, q) in src.iter().zip(dst) {
        let (x, y) = (p[0] as f64 - mx, p[1] as f64 - my);
        let (u, v) = (q[0] as f64 - mu, q[1] as f64 - mv);
        num_a += x * u + y * v;
        num_b += x * v - y * u;
        den += x * x + y * y;
    }
    if den <= f64::EPSILON {
        return Err(FaceError::Input("landmarks are all at one point".into()));
    }
    let (a, b) = (num_a / den, num_b / den);
    Ok([
        [a, -b, mu - (a * mx - b * my)],
        [b, a, mv - (b * mx + a * my)],
    ])
}

/// Inverse of an affine matrix (`cv2.invertAffineTransform`).
pub fn invert_affine(m: &Affine) -> Result<Affine, FaceError> {
    let det = m[0][0] * m[1][1] - m[0][1] * m[1][0];
    if det.abs() < 1e-12 {
        return Err(FaceError::Input(
            "degenerate (non-invertible) face transform".into(),
        ));
    }
    let (a, b, c, d) = (m[1][1] / det, -m[0][1] / det, -m[1][0] / det, m[0][0] / det);
    Ok([
        [a, b, -(a * m[0][2] + b * m[1][2])],
        [c, d, -(c * m[0][2] + d * m[1][2])],
    ])
}

/// An interleaved float image.
#[derive(Debug, Clone, PartialEq)]
pub struct Planar {
    /// Pixels per row.
    pub width: usize,
    /// Rows.
    pub height: usize,
    /// Values per pixel.
    pub channels: usize,
    /// `height × width × channels` values, row by row, channels interleaved.
    pub data: Vec<f32>,
}

impl Planar {
    fn from_rgb(img: &RgbImage) -> Self {
        Self {
            width: img.width() as usize,
            height: img.height() as usize,
            channels: 3,
            data: img.as_raw().iter().map(|&v| v as f32).collect(),
        }
    }

    fn filled(width: usize, height: usize, channels: usize, v: f32) -> Self {
        Self {
            width,
            height,
            channels,
            data: vec![v; width * height * channels],
        }
    }
}

/// `cv2.warpAffine` with bilinear sampling: `dst(x, y) = src(M⁻¹·(x, y))` where `forward`
/// maps source to destination pixel coordinates; samples outside use `border`.
pub fn warp_affine(
    src: &Planar,
    forward: &Affine,
    width: usize,
    height: usize,
    border: &[f32],
) -> Result<Planar, FaceError> {
    if border.len() != src.channels {
        return Err(FaceError::Input(format!(
            "border needs {} channel values",
            src.channels
        )));
    }
    let inv = invert_affine(forward)?;
    let ch = src.channels;
    let mut out = Planar::filled(width, height, ch, 0.0);
    let (sw, sh) = (src.width as i64, src.height as i64);
    for y in 0..height {
        for x in 0..width {
            let fx = inv[0][0] * x as f64 + inv[0][1] * y as f64 + inv[0][2];
            let fy = inv[1][0] * x as f64 + inv[1][1] * y as f64 + inv[1][2];
            let (x0, y0) = (fx.floor(), fy.floor());
            let (ax, ay) = ((fx - x0) as f32, (fy - y0) as f32);
            let (x0, y0) = (x0 as i64, y0 as i64);
            let o = (y * width + x) * ch;
            for (c, &fill) in border.iter().enumerate().take(ch) {
                let px = |xx: i64, yy: i64| {
                    if xx < 0 || yy < 0 || xx >= sw || yy >= sh {
                        fill
                    } else {
                        src.data[((yy * sw + xx) as usize) * ch + c]
                    }
                };
                let top = px(x0, y0) * (1.0 - ax) + px(x0 + 1, y0) * ax;
                let bottom = px(x0, y0 + 1) * (1.0 - ax) + px(x0 + 1, y0 + 1) * ax;
                out.data[o + c] = top * (1.0 - ay) + bottom * ay;
            }
        }
    }
    Ok(out)
}

/// Grey-scale erosion with a `k × k` box anchored at `k / 2` (OpenCV's convention); pixels
/// outside the image are ignored.
pub fn erode(mask: &[f32], width: usize, height: usize, k: usize) -> Vec<f32> {
    let k = if k == 0 { 3 } else { k }; // OpenCV: an empty kernel means 3×3
    let anchor = k / 2;
    let min_line = |get: &dyn Fn(usize) -> f32, len: usize, out: &mut dyn FnMut(usize, f32)| {
        for i in 0..len {
            let lo = i.saturating_sub(anchor);
            let hi = (i + k - anchor).min(len); // exclusive
            out(i, (lo..hi).map(get).fold(f32::INFINITY, f32::min));
        }
    };
    let mut tmp = vec![0f32; mask.len()];
    for y in 0..height {
        let row = &mask[y * width..(y + 1) * width];
        min_line(&|i| row[i], width, &mut |i, v| tmp[y * width + i] = v);
    }
    let mut out = vec![0f32; mask.len()];
    for x in 0..width {
        min_line(&|i| tmp[i * width + x], height, &mut |i, v| {
            out[i * width + x] = v
        });
    }
    out
}

/// `cv2.GaussianBlur(mask, (k, k), 0)` for odd `k`: OpenCV's fixed small kernels up to 7,
/// else a sampled Gaussian with σ = 0.3·((k−1)/2 − 1) + 0.8; border reflect-101.
pub fn gaussian_blur(mask: &[f32], width: usize, height: usize, k: usize) -> Vec<f32> {
    let kernel: Vec<f32> = match k {
        0 | 1 => return mask.to_vec(),
        3 => vec![0.25, 0.5, 0.25],
        5 => vec![0.0625, 0.25, 0.375, 0.25, 0.0625],
        7 => vec![
            0.03125, 0.109375, 0.21875, 0.28125, 0.21875, 0.109375, 0.03125,
        ],
        _ => {
            let sigma = 0.3 * ((k as f64 - 1.0) * 0.5 - 1.0) + 0.8;
            let r = (k / 2) as f64;
            let w: Vec<f64> = (0..k)
                .map(|i| (-(i as f64 - r).powi(2) / (2.0 * sigma * sigma)).exp())
                .collect();
            let s: f64 = w.iter().sum();
            w.iter().map(|v| (v / s) as f32).collect()
        }
    };
    let r = (kernel.len() / 2) as i64;
    let reflect = |i: i64, n: i64| -> usize {
        if n == 1 {
            return 0;
        }
        let mut i = i;
        while i < 0 || i >= n {
            i = if i < 0 { -i } else { 2 * (n - 1) - i };
        }
        i as usize
    };
    let (w, h) = (width as i64, height as i64);
    let mut tmp = vec![0f32; mask.len()];
    for y in 0..h {
        for x in 0..w {
            tmp[(y * w + x) as usize] = kernel
                .iter()
                .enumerate()
                .map(|(j, kv)| kv * mask[(y * w) as usize + reflect(x + j as i64 - r, w)])
                .sum();
        }
    }
    let mut out = vec![0f32; mask.len()];
    for y in 0..h {
        for x in 0..w {
            out[(y * w + x) as usize] = kernel
                .iter()
                .enumerate()
                .map(|(j, kv)| kv * tmp[reflect(y + j as i64 - r, h) * width + x as usize])
                .sum();
        }
    }
    out
}

/// Upscales the whole image behind the faces (e.g. RealESRGAN); `scale` is the output factor.
pub trait BackgroundUpscaler {
    /// `image` resized by `scale`.
    fn upscale(&self, image: &RgbImage, scale: f64) -> Result<RgbImage, FaceError>;
}

impl<F> BackgroundUpscaler for F
where
    F: Fn(&RgbImage, f64) -> Result<RgbImage, FaceError>,
{
    fn upscale(&self, image: &RgbImage, scale: f64) -> Result<RgbImage, FaceError> {
        self(image, scale)
    }
}

/// Knobs of [`FaceRestorer::restore`].
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RestoreOptions {
    /// Output size factor (≥ 1); the background is resized or upscaled by it.
    pub upscale: f64,
    /// 0 = background only, 1 = fully restored faces (A1111 "GFPGAN visibility").
    pub visibility: f32,
    /// facexlib FaceRestoreHelper uses confidence 0.97.
    pub detect: DetectOptions,
    /// Faces whose eyes are closer than this (pixels) are left alone.
    pub min_eye_distance: f32,
    /// GFPGAN's decoder noise: the checkpoint's fixed maps, or seeded ones.
    pub noise: Noise,
}

impl Default for RestoreOptions {
    fn default() -> Self {
        Self {
            upscale: 1.0,
            visibility: 1.0,
            detect: DetectOptions {
                conf_threshold: 0.97,
                nms_threshold: 0.4,
            },
            min_eye_distance: 5.0,
            noise: Noise::Stored,
        }
    }
}

/// What happened to one face.
#[derive(Debug, Clone, PartialEq)]
pub struct RestoredFace {
    /// Input-image landmarks the face was aligned with.
    pub landmarks: [[f32; 2]; 5],
    /// Input image → aligned crop.
    pub affine: Affine,
    /// The aligned crop, RGB 0–255.
    pub cropped: Planar,
    /// GFPGAN's output, RGB 0–255 (rounded like the reference's uint8 conversion).
    pub restored: Planar,
}

/// Detector + restorer.
pub struct FaceRestorer {
    /// RetinaFace; `None` when the faces come as landmarks ([`FaceRestorer::restore_landmarks`]).
    pub detector: Option<RetinaFace>,
    /// The restoration network.
    pub gfpgan: Gfpgan,
    device: Device,
}

impl FaceRestorer {
    /// A restorer running its networks on `device`.
    pub fn new(detector: Option<RetinaFace>, gfpgan: Gfpgan, device: Device) -> Self {
        Self {
            detector,
            gfpgan,
            device,
        }
    }

    /// The facexlib template scaled to this GFPGAN's face size.
    pub fn template(&self) -> [[f32; 2]; 5] {
        let s = self.gfpgan.config().out_size as f32 / 512.0;
        FFHQ_TEMPLATE_512.map(|[x, y]| [x * s, y * s])
    }

    /// Detects the faces to restore (threshold, eye-distance filter), best first.
    pub fn detect(
        &self,
        image: &RgbImage,
        opts: &RestoreOptions,
    ) -> Result<Vec<Detection>, FaceError> {
        let detector = self
            .detector
            .as_ref()
            .ok_or_else(|| FaceError::Config("no face detector loaded".into()))?;
        let dets = detector.detect(
            image.as_raw(),
            image.width() as usize,
            image.height() as usize,
            opts.detect,
        )?;
        Ok(dets
            .into_iter()
            .filter(|d| {
                let [l, r] = [d.landmarks[0], d.landmarks[1]];
                (l[0] - r[0]).hypot(l[1] - r[1]) >= opts.min_eye_distance
            })
            .collect())
    }

    /// Detects, restores and pastes back every face.
    pub fn restore(
        &self,
        image: &RgbImage,
        opts: &RestoreOptions,
        background: Option<&dyn BackgroundUpscaler>,
    ) -> Result<(RgbImage, Vec<RestoredFace>), FaceError> {
        let landmarks: Vec<_> = self
            .detect(image, opts)?
            .into_iter()
            .map(|d| d.landmarks)
            .collect();
        self.restore_landmarks(image, &landmarks, opts, background)
    }

    /// Restores the faces at the given landmarks (skipping detection).
    pub fn restore_landmarks(
        &self,
        image: &RgbImage,
        landmarks: &[[[f32; 2]; 5]],
        opts: &RestoreOptions,
        background: Option<&dyn BackgroundUpscaler>,
    ) -> Result<(RgbImage, Vec<RestoredFace>), FaceError> {
        if !(1.0..=16.0).contains(&opts.upscale) || !(0.0..=1.0).contains(&opts.visibility) {
            return Err(FaceError::Config(format!(
                "upscale must be in 1..=16 and visibility in 0..=1 (got {} and {})",
                opts.upscale, opts.visibility
            )));
        }
        if image.width() == 0 || image.height() == 0 {
            return Err(FaceError::Input("the image is empty (0 pixels)".into()));
        }
        let template = self.template();
        let size = self.gfpgan.config().out_size;
        let src = Planar::from_rgb(image);
        let mut faces = Vec::with_capacity(landmarks.len());
        for lm in landmarks {
            let affine = similarity_transform(lm, &template)?;
            let cropped = warp_affine(&src, &affine, size, size, &CROP_BORDER_RGB)?;
            let cropped = round_u8(cropped);
            let restored = self.run_gfpgan(&cropped, opts.noise)?;
            faces.push(RestoredFace {
                landmarks: *lm,
                affine,
                cropped,
                restored,
            });
        }
        let out = self.paste_back(image, &faces, opts, background)?;
        Ok((out, faces))
    }

    fn run_gfpgan(&self, crop: &Planar, noise: Noise) -> Result<Planar, FaceError> {
        let s = crop.width;
        let x = Tensor::from_slice(&crop.data, (s, s, 3), &self.device)?
            .permute((2, 0, 1))?
            .unsqueeze(0)?;
        let x = ((x / 127.5)? - 1.0)?;
        let y = self.gfpgan.forward(&x, noise)?;
        let y = ((y.clamp(-1f32, 1f32)?.squeeze(0)?.permute((1, 2, 0))? + 1.0)? / 2.0)?;
        let data = (y * 255.0)?.flatten_all()?.to_vec1::<f32>()?;
        Ok(Planar {
            width: s,
            height: s,
            channels: 3,
            data: data.into_iter().map(|v| v.round()).collect(),
        })
    }

    fn paste_back(
        &self,
        image: &RgbImage,
        faces: &[RestoredFace],
        opts: &RestoreOptions,
        background: Option<&dyn BackgroundUpscaler>,
    ) -> Result<RgbImage, FaceError> {
        let s = opts.upscale;
        let (w_up, h_up) = (
            (image.width() as f64 * s) as u32,
            (image.height() as f64 * s) as u32,
        );
        let bg = match background {
            Some(up) => up.upscale(image, s)?,
            None => image.clone(),
        };
        let bg = if bg.dimensions() == (w_up, h_up) {
            bg
        } else {
            image::imageops::resize(&bg, w_up, h_up, image::imageops::FilterType::Lanczos3)
        };
        let base = Planar::from_rgb(&bg);
        let mut out = base.clone();
        let (w, h) = (w_up as usize, h_up as usize);
        let size = self.gfpgan.config().out_size;
        for face in faces {
            let mut inv = invert_affine(&face.affine)?;
            for row in &mut inv {
                for v in row.iter_mut() {
                    *v *= s;
                }
                if s > 1.0 {
                    row[2] += 0.5 * s;
                }
            }
            // `inv` maps crop pixels to output pixels: the forward map of this warp.
            let pasted = round_u8(warp_affine(&face.restored, &inv, w, h, &[0.0; 3])?);
            let ones = Planar::filled(size, size, 1, 1.0);
            let inv_mask = warp_affine(&ones, &inv, w, h, &[0.0])?;
            let mask = erode(&inv_mask.data, w, h, (2.0 * s) as usize);
            let area: f64 = mask.iter().map(|&v| v as f64).sum();
            let w_edge = (area.sqrt() as usize) / 20;
            let center = erode(&mask, w, h, w_edge * 2);
            let soft = gaussian_blur(&center, w, h, w_edge * 2 + 1);
            for p in 0..w * h {
                let (m, e) = (soft[p], mask[p]);
                for c in 0..3 {
                    let i = p * 3 + c;
                    out.data[i] = m * (e * pasted.data[i]) + (1.0 - m) * out.data[i];
                }
            }
        }
        let v = opts.visibility;
        let data = out
            .data
            .iter()
            .zip(&base.data)
            .map(|(&r, &b)| {
                let x = if v < 1.0 { b + (r - b) * v } else { r };
                x.clamp(0.0, 255.0) as u8 // truncation, like the reference's astype(uint8)
            })
            .collect();
        RgbImage::from_raw(w_up, h_up, data)
            .ok_or_else(|| FaceError::Input("output buffer size mismatch".into()))
    }
}

fn round_u8(mut p: Planar) -> Planar {
    for v in &mut p.data {
        *v = v.round().clamp(0.0, 255.0);
    }
    p
}

/// RealESRGAN as the background upscaler of the face pipeline.
pub struct EsrganBackground<'a> {
    /// The network.
    pub net: &'a crate::Esrgan,
    /// How it tiles the background.
    pub tiles: crate::TileOptions,
}

impl BackgroundUpscaler for EsrganBackground<'_> {
    fn upscale(&self, image: &RgbImage, scale: f64) -> Result<RgbImage, FaceError> {
        self.net
            .upscale_image(
                &image::DynamicImage::ImageRgb8(image.clone()),
                &self.tiles,
                Some(scale as f32),
            )
            .map(|d| d.to_rgb8())
            .map_err(|e| FaceError::Upscaler(e.to_string()))
    }
}

impl FaceRestorer {
    /// [`FaceRestorer::restore`] for any decoded image: faces are restored on its RGB, and an
    /// alpha channel, if any, is resized to the output and kept.
    pub fn restore_image(
        &self,
        image: &image::DynamicImage,
        opts: &RestoreOptions,
        background: Option<&dyn BackgroundUpscaler>,
    ) -> Result<(image::DynamicImage, Vec<RestoredFace>), FaceError> {
        let (rgb, faces) = self.restore(&image.to_rgb8(), opts, background)?;
        if !image.color().has_alpha() {
            return Ok((image::DynamicImage::ImageRgb8(rgb), faces));
        }
        let (w, h) = rgb.dimensions();
        let alpha = image::imageops::resize(
            &image.to_luma_alpha8(),
            w,
            h,
            image::imageops::FilterType::Lanczos3,
        );
        let rgba = image::RgbaImage::from_fn(w, h, |x, y| {
            let [r, g, b] = rgb.get_pixel(x, y).0;
            image::Rgba([r, g, b, alpha.get_pixel(x, y).0[1]])
        });
        Ok((image::DynamicImage::ImageRgba8(rgba), faces))
    }
}
