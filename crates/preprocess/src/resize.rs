//! `cv2.resize` as the extension calls it: `INTER_AREA` to shrink, `INTER_CUBIC` to enlarge,
//! written from OpenCV's `imgproc/src/resize.cpp` arithmetic so control maps match the Python
//! ones: area averaging with OpenCV's float weight table and the 2×2 fast path's
//! `(sum + 2) >> 2` (exact), bicubic with OpenCV's f32 weights (A = −0.75, replicated border).

use crate::raster::Raster;

/// OpenCV's `interpolateCubic` (A = −0.75), in f32 as OpenCV computes it.
fn cubic_coeffs(x: f32) -> [f32; 4] {
    const A: f32 = -0.75;
    let c0 = ((A * (x + 1.0) - 5.0 * A) * (x + 1.0) + 8.0 * A) * (x + 1.0) - 4.0 * A;
    let c1 = ((A + 2.0) * x - (A + 3.0)) * x * x + 1.0;
    let c2 = ((A + 2.0) * (1.0 - x) - (A + 3.0)) * (1.0 - x) * (1.0 - x) + 1.0;
    [c0, c1, c2, 1.0 - c0 - c1 - c2]
}

/// For each destination index: the four source taps (clamped to the border, as OpenCV's cubic
/// resize replicates edges) and their f32 weights.
fn cubic_taps(src: usize, dst: usize) -> Vec<([usize; 4], [f32; 4])> {
    let scale = src as f64 / dst as f64;
    (0..dst)
        .map(|d| {
            let f = ((d as f64 + 0.5) * scale - 0.5) as f32;
            let s = f.floor();
            let frac = f - s;
            let s = s as i64;
            let taps = [-1, 0, 1, 2].map(|k| (s + k).clamp(0, src as i64 - 1) as usize);
            (taps, cubic_coeffs(frac))
        })
        .collect()
}

/// `cv2.resize(img, (width, height), interpolation=cv2.INTER_CUBIC)` on 8-bit pixels. OpenCV 4
/// computed this in 11-bit fixed point; the OpenCV 5 of today's `opencv-python` wheels agrees
/// with f32 weights and f64 sums, rounded half to even, except at a handful of near-ties (±1).
pub(crate) fn resize_cubic(img: &Raster<u8>, width: usize, height: usize) -> Raster<u8> {
    if (width, height) == (img.width, img.height) {
        return img.clone();
    }
    resize_cubic_f64(&img.map(f64::from), width, height)
        .map(|v| v.round_ties_even().clamp(0.0, 255.0) as u8)
}

/// `cv2.resize(..., interpolation=cv2.INTER_CUBIC)` on float pixels (OpenCV's f32 weights,
/// f64 sums: the `float64` image Depth Anything's transform resizes).
pub(crate) fn resize_cubic_f64(img: &Raster<f64>, width: usize, height: usize) -> Raster<f64> {
    if (width, height) == (img.width, img.height) {
        return img.clone();
    }
    let xs = cubic_taps(img.width, width);
    let ys = cubic_taps(img.height, height);
    let cn = img.channels;
    let mut rows = vec![0f64; img.height * width * cn];
    for sy in 0..img.height {
        for (dx, (taps, w)) in xs.iter().enumerate() {
            for c in 0..cn {
                rows[(sy * width + dx) * cn + c] = (0..4)
                    .map(|k| img.at(taps[k], sy, c) * f64::from(w[k]))
                    .sum();
            }
        }
    }
    let mut out = Raster::new(width, height, cn);
    for (dy, (taps, w)) in ys.iter().enumerate() {
        for i in 0..width * cn {
            out.data[dy * width * cn + i] = (0..4)
                .map(|k| rows[taps[k] * width * cn + i] * f64::from(w[k]))
                .sum();
        }
    }
    out
}

/// OpenCV's `computeResizeAreaTab`: (destination, source, weight) triples, where a destination
/// pixel covers `scale` source pixels and partly covered ones weigh their covered fraction.
fn area_table(src: usize, dst: usize, scale: f64) -> Vec<(usize, usize, f32)> {
    let mut tab = Vec::new();
    for d in 0..dst {
        let f1 = d as f64 * scale;
        let f2 = f1 + scale;
        let cell = scale.min(src as f64 - f1);
        let mut s2 = f2.floor() as i64;
        s2 = s2.min(src as i64 - 1);
        let s1 = (f1.ceil() as i64).min(s2);
        if s1 as f64 - f1 > 1e-3 {
            tab.push((d, (s1 - 1) as usize, ((s1 as f64 - f1) / cell) as f32));
        }
        for s in s1..s2 {
            tab.push((d, s as usize, (1.0 / cell) as f32));
        }
        if f2 - s2 as f64 > 1e-3 {
            let w = (f2 - s2 as f64).min(1.0).min(cell) / cell;
            tab.push((d, s2 as usize, w as f32));
        }
    }
    tab
}

/// `cv2.resize(img, (width, height), interpolation=cv2.INTER_AREA)` for shrinking 8-bit pixels.
pub(crate) fn resize_area(img: &Raster<u8>, width: usize, height: usize) -> Raster<u8> {
    if (width, height) == (img.width, img.height) {
        return img.clone();
    }
    let scale_x = img.width as f64 / width as f64;
    let scale_y = img.height as f64 / height as f64;
    let (ix, iy) = (scale_x.round(), scale_y.round());
    if (scale_x - ix).abs() < f64::EPSILON && (scale_y - iy).abs() < f64::EPSILON {
        return resize_area_integer(img, width, height, ix as usize, iy as usize);
    }
    let cn = img.channels;
    let xtab = area_table(img.width, width, scale_x);
    let ytab = area_table(img.height, height, scale_y);
    let mut out = Raster::new(width, height, cn);
    let mut buf = vec![0f32; width * cn];
    let mut sum = vec![0f32; width * cn];
    let mut prev_dy: Option<usize> = None;
    let flush = |out: &mut Raster<u8>, dy: usize, sum: &[f32]| {
        for (d, &v) in out.data[dy * width * cn..(dy + 1) * width * cn]
            .iter_mut()
            .zip(sum)
        {
            *d = v.round_ties_even().clamp(0.0, 255.0) as u8;
        }
    };
    for &(dy, sy, beta) in &ytab {
        buf.fill(0.0);
        for &(dx, sx, alpha) in &xtab {
            for c in 0..cn {
                buf[dx * cn + c] += f32::from(img.at(sx, sy, c)) * alpha;
            }
        }
        if prev_dy != Some(dy) {
            if let Some(p) = prev_dy {
                flush(&mut out, p, &sum);
            }
            for (s, b) in sum.iter_mut().zip(&buf) {
                *s = beta * b;
            }
            prev_dy = Some(dy);
        } else {
            for (s, b) in sum.iter_mut().zip(&buf) {
                *s += beta * b;
            }
        }
    }
    if let Some(p) = prev_dy {
        flush(&mut out, p, &sum);
    }
    out
}

/// OpenCV's `resizeAreaFast`: whole blocks averaged; the 2×2 case rounds half up
/// (`(sum + 2) >> 2`), other factors multiply by `1/area` in f32 and round half to even.
fn resize_area_integer(
    img: &Raster<u8>,
    width: usize,
    height: usize,
    sx: usize,
    sy: usize,
) -> Raster<u8> {
    let cn = img.channels;
    let area = sx * sy;
    let inv = 1.0f32 / area as f32;
    let mut out = Raster::new(width, height, cn);
    for dy in 0..height {
        for dx in 0..width {
            for c in 0..cn {
                let mut s = 0u32;
                for y in dy * sy..(dy + 1) * sy {
                    for x in dx * sx..(dx + 1) * sx {
                        s += u32::from(img.at(x, y, c));
                    }
                }
                let v = if sx == 2 && sy == 2 {
                    ((s + 2) >> 2) as u8
                } else {
                    (s as f32 * inv).round_ties_even().clamp(0.0, 255.0) as u8
                };
                out.set(dx, dy, c, v);
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cubic_weights_sum_to_one_and_interpolate() {
        for x in [0.0f32, 0.25, 0.5, 0.9] {
            let w = cubic_coeffs(x);
            assert!((w.iter().sum::<f32>() - 1.0).abs() < 1e-6);
        }
        assert_eq!(cubic_coeffs(0.0), [0.0, 1.0, 0.0, 0.0]);
    }

    #[test]
    fn area_weights_of_a_destination_pixel_sum_to_one() {
        let tab = area_table(10, 3, 10.0 / 3.0);
        for d in 0..3 {
            let s: f32 = tab.iter().filter(|t| t.0 == d).map(|t| t.2).sum();
            assert!((s - 1.0).abs() < 1e-5, "{d}: {s}");
        }
    }
}
