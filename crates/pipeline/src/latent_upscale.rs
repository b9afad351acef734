//! A1111's "Latent" hires-fix upscalers: a latent resized by PyTorch's `interpolate` in one of
//! six modes. Each is a separable resampling, so each axis becomes an `out × in` weight matrix
//! built here to PyTorch's formulas (`align_corners=False`), and the latent is multiplied by
//! them: `Wy · x · Wxᵀ`.

use candle_core::{DType, Tensor};

use crate::Error;

/// One of A1111's latent upscale modes (`shared.latent_upscale_modes`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LatentMode {
    /// "Latent": bilinear.
    Bilinear,
    /// "Latent (antialiased)": bilinear with `antialias=True`.
    BilinearAntialiased,
    /// "Latent (bicubic)".
    Bicubic,
    /// "Latent (bicubic antialiased)".
    BicubicAntialiased,
    /// "Latent (nearest)".
    Nearest,
    /// "Latent (nearest-exact)".
    NearestExact,
}

impl LatentMode {
    /// Every mode, in A1111's order.
    pub const ALL: [LatentMode; 6] = [
        LatentMode::Bilinear,
        LatentMode::BilinearAntialiased,
        LatentMode::Bicubic,
        LatentMode::BicubicAntialiased,
        LatentMode::Nearest,
        LatentMode::NearestExact,
    ];

    /// A1111's name of the mode.
    pub fn name(self) -> &'static str {
        match self {
            LatentMode::Bilinear => "Latent",
            LatentMode::BilinearAntialiased => "Latent (antialiased)",
            LatentMode::Bicubic => "Latent (bicubic)",
            LatentMode::BicubicAntialiased => "Latent (bicubic antialiased)",
            LatentMode::Nearest => "Latent (nearest)",
            LatentMode::NearestExact => "Latent (nearest-exact)",
        }
    }

    /// The mode an upscaler name names, if it is a latent one.
    pub fn parse(name: &str) -> Option<LatentMode> {
        Self::ALL.into_iter().find(|m| m.name() == name)
    }

    /// The `[n_out, n_in]` weights of one axis, row-major.
    fn weights(self, n_in: usize, n_out: usize) -> Vec<f32> {
        let scale = n_in as f64 / n_out as f64;
        let mut w = vec![0f64; n_out * n_in];
        let clamp = |i: i64| i.clamp(0, n_in as i64 - 1) as usize;
        for d in 0..n_out {
            let row = &mut w[d * n_in..(d + 1) * n_in];
            match self {
                // PyTorch computes these source indices in f32.
                LatentMode::Nearest => row[clamp((d as f32 * scale as f32).floor() as i64)] = 1.0,
                LatentMode::NearestExact => {
                    row[clamp(((d as f32 + 0.5) * scale as f32).floor() as i64)] = 1.0
                }
                LatentMode::Bilinear => {
                    let src = ((d as f64 + 0.5) * scale - 0.5).max(0.0);
                    let lo = clamp(src.floor() as i64);
                    let t = src - lo as f64;
                    row[lo] += 1.0 - t;
                    row[clamp(lo as i64 + 1)] += t;
                }
                LatentMode::Bicubic => {
                    // Not clamped at 0 (PyTorch's cubic source index); taps clamped instead.
                    let src = (d as f64 + 0.5) * scale - 0.5;
                    let lo = src.floor() as i64;
                    let t = src - lo as f64;
                    let taps = [1.0 + t, t, 1.0 - t, 2.0 - t];
                    for (k, x) in taps.into_iter().enumerate() {
                        row[clamp(lo - 1 + k as i64)] += cubic(x, -0.75);
                    }
                }
                LatentMode::BilinearAntialiased | LatentMode::BicubicAntialiased => {
                    let (size, filter): (f64, fn(f64) -> f64) = match self {
                        LatentMode::BilinearAntialiased => (2.0, |x| (1.0 - x.abs()).max(0.0)),
                        _ => (4.0, |x| cubic(x, -0.5)),
                    };
                    // PyTorch's `_upsample_*_aa` (PIL's resampling): the filter widened by
                    // the scale when shrinking, taps normalised to sum to one.
                    let support = size / 2.0 * scale.max(1.0);
                    let inv = if scale >= 1.0 { 1.0 / scale } else { 1.0 };
                    let center = scale * (d as f64 + 0.5);
                    let min = ((center - support + 0.5) as i64).max(0) as usize;
                    let max = ((center + support + 0.5) as i64).min(n_in as i64) as usize;
                    let taps: Vec<f64> = (min..max)
                        .map(|j| filter((j as f64 - center + 0.5) * inv))
                        .collect();
                    let total: f64 = taps.iter().sum();
                    for (j, t) in (min..max).zip(taps) {
                        row[j] = if total != 0.0 { t / total } else { 0.0 };
                    }
                }
            }
        }
        w.into_iter().map(|v| v as f32).collect()
    }
}

/// Keys' cubic convolution kernel with parameter `a` (PyTorch: −0.75; antialiased: −0.5).
fn cubic(x: f64, a: f64) -> f64 {
    let x = x.abs();
    if x < 1.0 {
        ((a + 2.0) * x - (a + 3.0)) * x * x + 1.0
    } else if x < 2.0 {
        ((a * x - 5.0 * a) * x + 8.0 * a) * x - 4.0 * a
    } else {
        0.0
    }
}

/// A latent `[B, C, h, w]` resized to `[B, C, height, width]` as
/// `torch.nn.functional.interpolate` does in `mode` (A1111's hires fix, latent upscalers).
pub fn upscale_latent(
    latent: &Tensor,
    height: usize,
    width: usize,
    mode: LatentMode,
) -> Result<Tensor, Error> {
    let (b, c, h, w) = latent.dims4()?;
    let dev = latent.device();
    let wy = Tensor::from_vec(mode.weights(h, height), (height, h), dev)?;
    let wx = Tensor::from_vec(mode.weights(w, width), (width, w), dev)?.t()?;
    let x = latent.to_dtype(DType::F32)?.reshape((b * c, h, w))?;
    let rows = wy.unsqueeze(0)?.broadcast_matmul(&x)?;
    let out = rows.broadcast_matmul(&wx.unsqueeze(0)?)?;
    Ok(out
        .reshape((b, c, height, width))?
        .to_dtype(latent.dtype())?)
}
