//! The OpenCV filters the model-free preprocessors call, from OpenCV's arithmetic
//! (`imgproc/src/smooth.dispatch.cpp`, `canny.cpp`): `cv2.GaussianBlur` with `ksize=(0, 0)`
//! (8-bit in its bit-exact fixed point, float in f32) and `cv2.Canny` (3×3 Sobel, L1 norm,
//! non-maximum suppression, hysteresis).

use crate::raster::Raster;

/// OpenCV's default border (`BORDER_REFLECT_101`): `…2 1 | 0 1 2 … n-1 | n-2 …`.
fn reflect101(i: i64, n: usize) -> usize {
    let n = n as i64;
    if n == 1 {
        return 0;
    }
    let period = 2 * (n - 1);
    let mut i = i.rem_euclid(period);
    if i >= n {
        i = period - i;
    }
    i as usize
}

/// `getGaussianKernelBitExact`: `exp(-x²/2σ²)` for `x = i - (n-1)/2`, normalised to sum 1
/// (the centre is `1/sum`).
fn gaussian_kernel(n: usize, sigma: f64) -> Vec<f64> {
    let scale = -0.125 / (sigma * sigma);
    let half = (n - 1) / 2;
    let values: Vec<f64> = (0..half)
        .map(|i| {
            let x = 1 - n as i64 + 2 * i as i64;
            ((x * x) as f64 * scale).exp()
        })
        .collect();
    let mut sum = 2.0 * values.iter().sum::<f64>() + 1.0;
    if n.is_multiple_of(2) {
        sum += 1.0;
    }
    let mul = 1.0 / sum;
    let mut k = vec![mul; n];
    for (i, v) in values.iter().enumerate() {
        k[i] = v * mul;
        k[n - 1 - i] = v * mul;
    }
    k
}

/// OpenCV's kernel size for `ksize=(0, 0)`: ±3σ for 8-bit images, ±4σ otherwise, odd.
fn kernel_size(sigma: f64, eight_bit: bool) -> usize {
    let span = if eight_bit { 3.0 } else { 4.0 };
    ((sigma * span * 2.0 + 1.0).round_ties_even() as usize) | 1
}

/// `getGaussianKernelFixedPoint_ED`: the kernel in 8 fractional bits, rounded from the outside
/// in with the rounding error carried along, the centre taking what makes the sum exactly 256.
fn fixed_point_kernel(kernel: &[f64]) -> Vec<i64> {
    let n = kernel.len();
    let half = n / 2;
    let mut out = vec![0i64; n];
    let mut err = 0.0f64;
    let mut sum = 0i64;
    for i in 0..half {
        let adjusted = kernel[i] * 256.0 + err;
        let v = adjusted.round_ties_even() as i64;
        err = adjusted - v as f64;
        out[i] = v;
        out[n - 1 - i] = v;
        sum += v;
    }
    out[half] = 256 - 2 * sum;
    out
}

/// `cv2.GaussianBlur(img, (0, 0), sigma)` on 8-bit pixels: OpenCV's bit-exact path (rows, then
/// columns, in fixed point; the result rounded half up).
pub(crate) fn gaussian_blur_u8(img: &Raster<u8>, sigma: f64) -> Raster<u8> {
    let k = fixed_point_kernel(&gaussian_kernel(kernel_size(sigma, true), sigma));
    let r = (k.len() / 2) as i64;
    let (w, h, cn) = (img.width, img.height, img.channels);
    let mut rows = vec![0i64; w * h * cn];
    for y in 0..h {
        for x in 0..w {
            for c in 0..cn {
                rows[(y * w + x) * cn + c] = k
                    .iter()
                    .enumerate()
                    .map(|(i, kv)| {
                        let sx = reflect101(x as i64 + i as i64 - r, w);
                        kv * i64::from(img.at(sx, y, c))
                    })
                    .sum();
            }
        }
    }
    let mut out = Raster::new(w, h, cn);
    for y in 0..h {
        for i in 0..w * cn {
            let v: i64 = k
                .iter()
                .enumerate()
                .map(|(j, kv)| kv * rows[reflect101(y as i64 + j as i64 - r, h) * w * cn + i])
                .sum();
            out.data[y * w * cn + i] = ((v + (1 << 15)) >> 16).clamp(0, 255) as u8;
        }
    }
    out
}

/// `cv2.GaussianBlur(img, (0, 0), sigma)` on f32 pixels (an f32 kernel, separable passes).
pub(crate) fn gaussian_blur_f32(img: &Raster<f32>, sigma: f64) -> Raster<f32> {
    let k: Vec<f32> = gaussian_kernel(kernel_size(sigma, false), sigma)
        .into_iter()
        .map(|v| v as f32)
        .collect();
    let r = (k.len() / 2) as i64;
    let (w, h, cn) = (img.width, img.height, img.channels);
    let mut rows = Raster::new(w, h, cn);
    for y in 0..h {
        for x in 0..w {
            for c in 0..cn {
                let v = k.iter().enumerate().fold(0f32, |acc, (i, kv)| {
                    acc + kv * img.at(reflect101(x as i64 + i as i64 - r, w), y, c)
                });
                rows.set(x, y, c, v);
            }
        }
    }
    let mut out = Raster::new(w, h, cn);
    for y in 0..h {
        for i in 0..w * cn {
            out.data[y * w * cn + i] = k.iter().enumerate().fold(0f32, |acc, (j, kv)| {
                acc + kv * rows.data[reflect101(y as i64 + j as i64 - r, h) * w * cn + i]
            });
        }
    }
    out
}

/// `cv2.Canny(img, low, high)` (aperture 3, L1 gradient): one channel of 0/255. On colour
/// images each pixel takes the gradient of its channel with the largest magnitude.
pub(crate) fn canny(img: &Raster<u8>, low: f64, high: f64) -> Raster<u8> {
    let (low, high) = if low > high { (high, low) } else { (low, high) };
    let (low, high) = (low.floor() as i32, high.floor() as i32);
    let (w, h, cn) = (img.width, img.height, img.channels);
    // Sobel 3×3 with replicated borders, as Canny calls it
    let px = |x: i64, y: i64, c: usize| {
        let x = x.clamp(0, w as i64 - 1) as usize;
        let y = y.clamp(0, h as i64 - 1) as usize;
        i32::from(img.at(x, y, c))
    };
    let mut dx = vec![0i32; w * h];
    let mut dy = vec![0i32; w * h];
    // the magnitude with a border of zeros, (w+2)×(h+2)
    let mw = w + 2;
    let mut mag = vec![0i32; mw * (h + 2)];
    for y in 0..h {
        for x in 0..w {
            let (xi, yi) = (x as i64, y as i64);
            let mut best = (-1, 0, 0);
            for c in 0..cn {
                let gx = (px(xi + 1, yi - 1, c) + 2 * px(xi + 1, yi, c) + px(xi + 1, yi + 1, c))
                    - (px(xi - 1, yi - 1, c) + 2 * px(xi - 1, yi, c) + px(xi - 1, yi + 1, c));
                let gy = (px(xi - 1, yi + 1, c) + 2 * px(xi, yi + 1, c) + px(xi + 1, yi + 1, c))
                    - (px(xi - 1, yi - 1, c) + 2 * px(xi, yi - 1, c) + px(xi + 1, yi - 1, c));
                let m = gx.abs() + gy.abs();
                if m > best.0 {
                    best = (m, gx, gy);
                }
            }
            dx[y * w + x] = best.1;
            dy[y * w + x] = best.2;
            mag[(y + 1) * mw + x + 1] = best.0;
        }
    }
    // non-maximum suppression along the gradient, quantised to 0°/45°/90°/135° by tan 22.5°
    const TG22: i64 = 13573; // round(tan(22.5°)·2^15)
    const NOT_EDGE: u8 = 1;
    const WEAK: u8 = 0;
    const STRONG: u8 = 2;
    let mut map = vec![NOT_EDGE; w * h];
    let mut stack = Vec::new();
    for y in 0..h {
        for x in 0..w {
            let at = |ox: i64, oy: i64| {
                mag[((y as i64 + 1 + oy) as usize) * mw + (x as i64 + 1 + ox) as usize]
            };
            let m = at(0, 0);
            if m <= low {
                continue;
            }
            let (gx, gy) = (dx[y * w + x], dy[y * w + x]);
            let ax = i64::from(gx.abs());
            let ay = i64::from(gy.abs()) << 15;
            let tg22x = ax * TG22;
            let is_max = if ay < tg22x {
                m > at(-1, 0) && m >= at(1, 0)
            } else if ay > tg22x + (ax << 16) {
                m > at(0, -1) && m >= at(0, 1)
            } else {
                let s = if (gx ^ gy) < 0 { -1 } else { 1 };
                m > at(-s, -1) && m > at(s, 1)
            };
            if !is_max {
                continue;
            }
            if m > high {
                map[y * w + x] = STRONG;
                stack.push((x, y));
            } else {
                map[y * w + x] = WEAK;
            }
        }
    }
    // hysteresis: weak maxima 8-connected to a strong one are edges
    while let Some((x, y)) = stack.pop() {
        for oy in -1i64..=1 {
            for ox in -1i64..=1 {
                let (nx, ny) = (x as i64 + ox, y as i64 + oy);
                if nx < 0 || ny < 0 || nx >= w as i64 || ny >= h as i64 {
                    continue;
                }
                let i = ny as usize * w + nx as usize;
                if map[i] == WEAK {
                    map[i] = STRONG;
                    stack.push((nx as usize, ny as usize));
                }
            }
        }
    }
    Raster {
        width: w,
        height: h,
        channels: 1,
        data: map
            .into_iter()
            .map(|v| if v == STRONG { 255 } else { 0 })
            .collect(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reflect101_mirrors_without_repeating_the_edge() {
        let got: Vec<usize> = (-3..8).map(|i| reflect101(i, 5)).collect();
        assert_eq!(got, [3, 2, 1, 0, 1, 2, 3, 4, 3, 2, 1]);
    }

    #[test]
    fn fixed_point_kernel_sums_to_256_and_is_symmetric() {
        for sigma in [0.5, 1.0, 3.0, 9.0] {
            let k = fixed_point_kernel(&gaussian_kernel(kernel_size(sigma, true), sigma));
            assert_eq!(k.iter().sum::<i64>(), 256);
            assert!(k.iter().eq(k.iter().rev()));
        }
    }
}
