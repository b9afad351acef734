//! An interleaved `H×W×C` pixel buffer, the shape OpenCV and numpy give the extension's
//! preprocessors, with the conversions to and from the `image` crate and the extension's own
//! helpers around every detector: `HWC3` (grey → RGB, RGBA composited over white) and
//! `resize_image_with_pad` (short side to the processor resolution, edge-padded to ×64).

use image::{DynamicImage, GrayImage, RgbImage, RgbaImage};

use crate::resize::{resize_area, resize_cubic};

/// Pixels in row-major `H×W×C` order.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Raster<T> {
    pub width: usize,
    pub height: usize,
    pub channels: usize,
    pub data: Vec<T>,
}

impl<T: Copy + Default> Raster<T> {
    pub fn new(width: usize, height: usize, channels: usize) -> Self {
        Self {
            width,
            height,
            channels,
            data: vec![T::default(); width * height * channels],
        }
    }

    pub fn at(&self, x: usize, y: usize, c: usize) -> T {
        self.data[(y * self.width + x) * self.channels + c]
    }

    pub fn set(&mut self, x: usize, y: usize, c: usize, v: T) {
        self.data[(y * self.width + x) * self.channels + c] = v;
    }

    /// The top-left `width×height` part (the extension's `remove_pad`).
    pub fn crop(&self, width: usize, height: usize) -> Self {
        let mut out = Self::new(width, height, self.channels);
        let row = width * self.channels;
        for y in 0..height {
            let src = y * self.width * self.channels;
            out.data[y * row..(y + 1) * row].copy_from_slice(&self.data[src..src + row]);
        }
        out
    }

    /// Padded right and bottom by repeating the last column and row (`np.pad(mode='edge')`).
    pub fn pad_edge(&self, width: usize, height: usize) -> Self {
        let mut out = Self::new(width, height, self.channels);
        for y in 0..height {
            let sy = y.min(self.height - 1);
            for x in 0..width {
                let sx = x.min(self.width - 1);
                for c in 0..self.channels {
                    out.set(x, y, c, self.at(sx, sy, c));
                }
            }
        }
        out
    }

    pub fn map<U>(&self, f: impl Fn(T) -> U) -> Raster<U> {
        Raster {
            width: self.width,
            height: self.height,
            channels: self.channels,
            data: self.data.iter().map(|&v| f(v)).collect(),
        }
    }
}

impl Raster<u8> {
    /// The extension's `HWC3`: grey becomes three equal channels, RGBA is composited over white
    /// (`color·α + 255·(1−α)`, truncated), RGB stays.
    pub fn from_image(image: &DynamicImage) -> Self {
        match image {
            DynamicImage::ImageLuma8(g) => {
                let rgb = DynamicImage::ImageLuma8(g.clone()).to_rgb8();
                Self::from_rgb(&rgb)
            }
            DynamicImage::ImageRgb8(rgb) => Self::from_rgb(rgb),
            DynamicImage::ImageRgba8(rgba) => Self::from_rgba_over_white(rgba),
            other if other.color().has_alpha() => Self::from_rgba_over_white(&other.to_rgba8()),
            other => Self::from_rgb(&other.to_rgb8()),
        }
    }

    fn from_rgb(rgb: &RgbImage) -> Self {
        Self {
            width: rgb.width() as usize,
            height: rgb.height() as usize,
            channels: 3,
            data: rgb.as_raw().clone(),
        }
    }

    fn from_rgba_over_white(rgba: &RgbaImage) -> Self {
        let mut out = Self::new(rgba.width() as usize, rgba.height() as usize, 3);
        for (dst, px) in out.data.chunks_exact_mut(3).zip(rgba.pixels()) {
            let alpha = f32::from(px[3]) / 255.0;
            for c in 0..3 {
                let v = f32::from(px[c]) * alpha + 255.0 * (1.0 - alpha);
                // numpy's astype(uint8) after clip: truncation
                dst[c] = v.clamp(0.0, 255.0) as u8;
            }
        }
        out
    }

    /// One channel repeated three times (`cv2.COLOR_GRAY2RGB`, `HWC3` of a 2-D map).
    pub fn grey_to_rgb(&self) -> Self {
        debug_assert_eq!(self.channels, 1);
        let mut out = Self::new(self.width, self.height, 3);
        for (dst, &v) in out.data.chunks_exact_mut(3).zip(&self.data) {
            dst.fill(v);
        }
        out
    }

    pub fn into_rgb_image(self) -> RgbImage {
        let rgb = if self.channels == 1 {
            self.grey_to_rgb()
        } else {
            self
        };
        RgbImage::from_raw(rgb.width as u32, rgb.height as u32, rgb.data)
            .expect("a raster's buffer matches its size")
    }

    pub fn into_gray_image(self) -> GrayImage {
        debug_assert_eq!(self.channels, 1);
        GrayImage::from_raw(self.width as u32, self.height as u32, self.data)
            .expect("a raster's buffer matches its size")
    }
}

/// The extension's `pad64`: what rounds `x` up to a multiple of 64.
fn pad64(x: usize) -> usize {
    x.div_ceil(64) * 64 - x
}

/// The size `resize_image_with_pad` scales to: the short side becomes `resolution`, the long one
/// keeps the aspect ratio (numpy's round, half to even).
pub(crate) fn processor_size(width: usize, height: usize, resolution: f64) -> (usize, usize) {
    let k = resolution / width.min(height) as f64;
    let w = (width as f64 * k).round_ties_even() as usize;
    let h = (height as f64 * k).round_ties_even() as usize;
    (w.max(1), h.max(1))
}

/// The extension's `resize_image_with_pad`: the short side to `resolution` (bicubic when
/// enlarging, area averaging when shrinking, as `cv2.resize` does them), then edge-padded to
/// multiples of 64. Returns the padded image and the size before padding (`remove_pad` crops
/// back to it).
pub(crate) fn resize_with_pad(img: &Raster<u8>, resolution: f64) -> (Raster<u8>, (usize, usize)) {
    let k = resolution / img.width.min(img.height) as f64;
    let (w, h) = processor_size(img.width, img.height, resolution);
    let resized = if k > 1.0 {
        resize_cubic(img, w, h)
    } else {
        resize_area(img, w, h)
    };
    (resized.pad_edge(w + pad64(w), h + pad64(h)), (w, h))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pad64_rounds_up_to_64() {
        assert_eq!(pad64(64), 0);
        assert_eq!(pad64(65), 63);
        assert_eq!(pad64(512), 0);
        assert_eq!(pad64(683), 21);
    }

    #[test]
    fn processor_size_keeps_the_short_side_at_the_resolution() {
        assert_eq!(processor_size(1024, 768, 512.0), (683, 512));
        assert_eq!(processor_size(100, 300, 512.0), (512, 1536));
    }
}
