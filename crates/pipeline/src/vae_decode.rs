//! VAE decode/encode around the network: tiling for large images and the automatic fp32
//! re-run when half precision overflows (the seed's "always a green image", which its users
//! cured by hand with `--no-half --precision full`).

use candle_core::{DType, Device, Tensor};
use sdkube_models::checkpoint::Component;
use sdkube_models::config::VaeConfig;
use sdkube_models::vae::AutoencoderKL;

use crate::Error;

/// Latents larger than this (per side) are decoded in overlapping tiles on the CPU.
pub const TILE_LATENT: usize = 96;
/// The same on a GPU: SDXL's 1024² images decode whole, as A1111 and diffusers decode them
/// (2.4 GB at the peak in fp16 on an H100, 31 ms). Four tiles of 768² are 2.25× the pixels,
/// blended on the host: SDXL txt2img trailed compiled diffusers by 96 ms, of which the UNet
/// steps explain 21.
pub const GPU_TILE_LATENT: usize = 128;
const TILE_OVERLAP: usize = 16;

/// The largest latent side decoded (or encoded) whole on `device`.
fn tile_latent(device: &Device) -> usize {
    match device.is_cuda() {
        true => GPU_TILE_LATENT,
        false => TILE_LATENT,
    }
}

/// Whether `t` holds a NaN or an infinity: `t · 0` is NaN exactly there, and one NaN makes the
/// sum NaN, so one number leaves the device instead of the image.
fn non_finite(t: &Tensor) -> Result<bool, Error> {
    let sum = (t * 0.0)?
        .sum_all()?
        .to_dtype(DType::F32)?
        .to_scalar::<f32>()?;
    Ok(!sum.is_finite())
}

/// Decodes `latent` (already divided by the scaling factor); if the result holds NaN or inf
/// and the VAE runs below fp32, that stage is run again in fp32 and the fallback is logged.
pub fn decode_checked(
    vae: &AutoencoderKL,
    weights: &Component<VaeConfig>,
    latent: &Tensor,
    device: &Device,
) -> Result<Tensor, Error> {
    let out = decode_tiled(vae, latent)?;
    if latent.dtype() == DType::F32 || !non_finite(&out)? {
        return Ok(out);
    }
    tracing::warn!(dtype = ?latent.dtype(), "VAE output has NaN/inf; decoding again in fp32");
    let vae32 = weights.build(device, DType::F32)?;
    decode_tiled(&vae32, &latent.to_dtype(DType::F32)?)
}

/// Tile start offsets covering `len` with tiles of `tile` overlapping by `overlap`.
fn tile_starts(len: usize, tile: usize, overlap: usize) -> Vec<usize> {
    if len <= tile {
        return vec![0];
    }
    let stride = tile - overlap;
    let mut starts: Vec<usize> = (0..)
        .map(|i| i * stride)
        .take_while(|&s| s + tile < len)
        .collect();
    starts.push(len - tile);
    starts
}

/// Weight of a pixel at `i` in a tile of `n` whose edges fade over `ramp` pixels (edges at
/// the border of the whole image do not fade).
fn ramp(i: usize, n: usize, ramp: usize, fade_start: bool, fade_end: bool) -> f32 {
    let mut w = 1.0f32;
    if fade_start && i < ramp {
        w = w.min((i as f32 + 0.5) / ramp as f32);
    }
    if fade_end && n - i <= ramp {
        w = w.min(((n - i) as f32 - 0.5) / ramp as f32);
    }
    w
}

/// Runs `f` (latent tile → image tile, `factor`× larger) over overlapping tiles of a
/// `[B, C, h, w]` tensor and blends the results linearly in the overlaps.
fn tiled(
    input: &Tensor,
    tile: usize,
    overlap: usize,
    factor_num: usize,
    factor_den: usize,
    f: &dyn Fn(&Tensor) -> Result<Tensor, Error>,
) -> Result<Tensor, Error> {
    let (_, _, h, w) = input.dims4()?;
    // A seamless (circularly padded) image is one piece: a tile would wrap onto itself.
    if h <= tile && w <= tile || sdkube_nn::circular_padding() {
        return f(input);
    }
    let scale = |v: usize| v * factor_num / factor_den;
    let (ys, xs) = (tile_starts(h, tile, overlap), tile_starts(w, tile, overlap));
    // (weighted sum [B, C, H, W], weight [H, W], B, C)
    type Accumulator = (Vec<f32>, Vec<f32>, usize, usize);
    let mut acc: Option<Accumulator> = None;
    for &y0 in &ys {
        for &x0 in &xs {
            let th = tile.min(h);
            let tw = tile.min(w);
            let out = f(&input.narrow(2, y0, th)?.narrow(3, x0, tw)?)?;
            let (ob, oc, oh, ow) = out.dims4()?;
            let (hh, ww) = (scale(h), scale(w));
            let (sum, weight, _, _) = acc
                .get_or_insert_with(|| (vec![0.0; ob * oc * hh * ww], vec![0.0; hh * ww], ob, oc));
            let data = out
                .to_dtype(DType::F32)?
                .to_device(&Device::Cpu)?
                .flatten_all()?
                .to_vec1::<f32>()?;
            let r = scale(overlap);
            let (py, px) = (scale(y0), scale(x0));
            for yy in 0..oh {
                let wy = ramp(yy, oh, r, y0 > 0, y0 + th < h);
                for xx in 0..ow {
                    let wgt = wy * ramp(xx, ow, r, x0 > 0, x0 + tw < w);
                    let (gy, gx) = (py + yy, px + xx);
                    weight[gy * ww + gx] += wgt;
                    for bc in 0..ob * oc {
                        sum[(bc * hh + gy) * ww + gx] += wgt * data[(bc * oh + yy) * ow + xx];
                    }
                }
            }
        }
    }
    let (mut sum, weight, b, c) = acc.expect("at least one tile");
    let (hh, ww) = (scale(h), scale(w));
    for bc in 0..b * c {
        for i in 0..hh * ww {
            sum[bc * hh * ww + i] /= weight[i].max(1e-6);
        }
    }
    Ok(Tensor::from_vec(sum, (b, c, hh, ww), input.device())?.to_dtype(input.dtype())?)
}

/// Decodes in tiles when the latent is larger than [`TILE_LATENT`] ([`GPU_TILE_LATENT`] on a
/// GPU).
pub fn decode_tiled(vae: &AutoencoderKL, latent: &Tensor) -> Result<Tensor, Error> {
    let f = vae.downscale_factor();
    let tile = tile_latent(latent.device());
    tiled(latent, tile, TILE_OVERLAP, f, 1, &|t| Ok(vae.decode(t)?))
}

/// Encodes (distribution mean) in tiles when the image is larger than 8·[`TILE_LATENT`]
/// (8·[`GPU_TILE_LATENT`] on a GPU).
pub fn encode_tiled(vae: &AutoencoderKL, image: &Tensor) -> Result<Tensor, Error> {
    let f = vae.downscale_factor();
    let tile = tile_latent(image.device());
    tiled(image, tile * f, TILE_OVERLAP * f, 1, f, &|t| {
        Ok(vae.encode(t)?.mean)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// With a per-tile function that is exact (nearest ×4 upsampling), the blended tiled
    /// result equals the untiled one: overlaps and edges are weighted correctly.
    #[test]
    fn tiles_blend_back_to_the_whole() {
        let x = Tensor::rand(0f32, 1f32, (1, 2, 37, 50), &Device::Cpu).unwrap();
        let up = |t: &Tensor| -> Result<Tensor, Error> {
            let (_, _, h, w) = t.dims4()?;
            Ok(t.upsample_nearest2d(4 * h, 4 * w)?)
        };
        let whole = up(&x).unwrap();
        let tiled = tiled(&x, 16, 6, 4, 1, &up).unwrap();
        let diff = (whole - tiled)
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        assert!(diff < 1e-5, "tiled differs by {diff}");
        assert_eq!(tile_starts(37, 16, 6), vec![0, 10, 20, 21]);
    }

    /// One NaN or infinity anywhere is found; the largest finite fp16 values are not.
    #[test]
    fn non_finite_finds_one_bad_value() {
        let check = |v: &[f32]| {
            let t = Tensor::new(v, &Device::Cpu)
                .unwrap()
                .to_dtype(DType::F16)
                .unwrap();
            non_finite(&t.reshape((1, 1, 1, v.len())).unwrap()).unwrap()
        };
        assert!(!check(&[65504., -65504., 0., 1e-7]));
        assert!(check(&[1., f32::INFINITY, 2.]));
        assert!(check(&[1., 2., f32::NEG_INFINITY]));
        assert!(check(&[f32::NAN, 1., 2.]));
    }

    /// A VAE that overflows in fp16 is decoded again in fp32 instead of returning NaN/inf
    /// (the seed's green images).
    #[test]
    fn fp16_overflow_falls_back_to_fp32() {
        let dir = sdkube_testkit::fixtures().join("sd/sd1");
        let mut weights = sdkube_models::load(&dir, &Default::default()).unwrap().vae;
        // Scale one decoder convolution so that its fp16 activations exceed 65504.
        let key = "decoder.conv_in.weight";
        let scaled = (weights.tensors[key].to_dtype(DType::F32).unwrap() * 3.0e5).unwrap();
        weights.tensors.insert(key.into(), scaled);
        let latent = Tensor::ones((1, 4, 8, 8), DType::F16, &Device::Cpu).unwrap();
        let vae16 = weights.build(&Device::Cpu, DType::F16).unwrap();
        let raw = decode_tiled(&vae16, &latent).unwrap();
        assert!(
            non_finite(&raw).unwrap(),
            "the fixture must overflow in fp16"
        );
        let out = decode_checked(&vae16, &weights, &latent, &Device::Cpu).unwrap();
        assert!(!non_finite(&out).unwrap());
        assert_eq!(out.dtype(), DType::F32);
    }
}
