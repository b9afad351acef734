//! A1111's variations (`modules/rng.py`, `ImageRNG.first`): an image's starting noise is its
//! seed's noise slerped towards a variation seed's ("Variation seed strength"), and with "Resize
//! seed from width/height" the noise of the seed at that other size is pasted, centred, into
//! the noise at the real size, so a composition found at one size survives at another.
//!
//! Also the seeds of a request's images and their noise streams, which the engine draws from.

use candle_core::{DType, Device, Tensor};

use crate::generate::Request;
use crate::sampler::{NoiseSource, SamplerError, SeededNoise};
use crate::Error;

/// What a request asks of its images' starting noise beyond the seed.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct Variation {
    /// The image's variation seed (A1111's subseed).
    pub subseed: u64,
    /// How far towards the variation seed's noise (0 = the seed's alone, 1 = the subseed's).
    pub strength: f64,
    /// The size, in pixels, whose noise is kept (width, height), if any.
    pub resize_from: Option<(usize, usize)>,
}

impl Variation {
    /// Whether the noise differs from the seed's own draw.
    pub fn is_active(&self) -> bool {
        self.strength != 0.0 || self.resize_from.is_some()
    }
}

/// A1111's `slerp(val, low, high)` on one image's noise `[1, C, H, W]` (or `[C, H, W]`): as
/// there, norms and angles are taken along the height, so each (channel, column) is
/// interpolated on its own, and when the mean cosine is above 0.9995 it falls back to
/// `low·val + high·(1 − val)` (A1111's order, kept).
pub fn slerp(val: f64, low: &Tensor, high: &Tensor) -> Result<Tensor, Error> {
    let dims = low.dims().to_vec();
    if dims != high.dims() || dims.len() < 3 {
        return Err(Error::Invalid(format!(
            "slerp of noises {:?} and {:?}",
            low.dims(),
            high.dims()
        )));
    }
    let n = dims.len();
    let (h, w) = (dims[n - 2], dims[n - 1]);
    let c = low.elem_count() / (h * w);
    let lo: Vec<f64> = low.flatten_all()?.to_dtype(DType::F64)?.to_vec1()?;
    let hi: Vec<f64> = high.flatten_all()?.to_dtype(DType::F64)?.to_vec1()?;
    let at = |ch: usize, y: usize, x: usize| (ch * h + y) * w + x;
    // Per (channel, column): the cosine of the two noises along the height.
    let mut dots = vec![0.0f64; c * w];
    for ch in 0..c {
        for x in 0..w {
            let (mut nl, mut nh, mut d) = (0.0, 0.0, 0.0);
            for y in 0..h {
                let (a, b) = (lo[at(ch, y, x)], hi[at(ch, y, x)]);
                nl += a * a;
                nh += b * b;
                d += a * b;
            }
            dots[ch * w + x] = d / (nl.sqrt() * nh.sqrt());
        }
    }
    let mean = dots.iter().sum::<f64>() / dots.len() as f64;
    let mut out = vec![0.0f32; lo.len()];
    for ch in 0..c {
        for x in 0..w {
            let (a, b) = if mean > 0.9995 {
                (val, 1.0 - val)
            } else {
                let omega = dots[ch * w + x].acos();
                let so = omega.sin();
                (((1.0 - val) * omega).sin() / so, (val * omega).sin() / so)
            };
            for y in 0..h {
                let i = at(ch, y, x);
                out[i] = (a * lo[i] + b * hi[i]) as f32;
            }
        }
    }
    Ok(Tensor::from_vec(out, dims, &Device::Cpu)?)
}

/// A first draw of a new stream of a seed: `(seed, dims) → noise`.
pub type FreshDraw<'a> = dyn FnMut(u64, &[usize]) -> Result<Tensor, Error> + 'a;

/// The starting noise of one image `[1, C, H, W]`, as A1111's `ImageRNG.first` makes it:
/// `full` is the image's own stream's first draw at the real size (the stream the sampler
/// goes on drawing from), `fresh(seed, dims)` a first draw of a new stream of `seed`.
/// Returns `full` itself when `v` asks for nothing.
pub fn initial_noise(
    full: &Tensor,
    seed: u64,
    v: &Variation,
    fresh: &mut FreshDraw<'_>,
) -> Result<Tensor, Error> {
    let (b, c, h, w) = full.dims4()?;
    let small = v.resize_from.map(|(rw, rh)| (rh / 8, rw / 8));
    let resized = small.filter(|&s| s != (h, w));
    let noise_dims = match resized {
        Some((sh, sw)) => vec![b, c, sh, sw],
        None => full.dims().to_vec(),
    };
    if v.strength == 0.0 && resized.is_none() {
        return Ok(full.clone());
    }
    let (dtype, device) = (full.dtype(), full.device().clone());
    let mut noise = match resized {
        Some(_) => fresh(seed, &noise_dims)?,
        None => full.to_device(&Device::Cpu)?,
    };
    if v.strength != 0.0 {
        let sub = fresh(v.subseed, &noise_dims)?;
        noise = slerp(
            v.strength,
            &noise.to_device(&Device::Cpu)?,
            &sub.to_device(&Device::Cpu)?,
        )?;
    }
    if let Some((sh, sw)) = resized {
        noise = paste_centred(&full.to_device(&Device::Cpu)?, &noise, (sh, sw))?;
    }
    Ok(noise.to_dtype(dtype)?.to_device(&device)?)
}

/// A1111's seed-resize paste: `small` (`sh`×`sw`) centred onto `full`, cropped where it is
/// larger; offsets use Python's floor division, as A1111's.
fn paste_centred(full: &Tensor, small: &Tensor, (sh, sw): (usize, usize)) -> Result<Tensor, Error> {
    let (_, _, h, w) = full.dims4()?;
    // One axis: (where in `full`, where in `small`, how many).
    let axis = |n: usize, s: usize| {
        let d = (n as i64 - s as i64).div_euclid(2);
        let len = if d >= 0 { s as i64 } else { s as i64 + 2 * d };
        (d.max(0) as usize, (-d).max(0) as usize, len.max(0) as usize)
    };
    let (ty, sy, hh) = axis(h, sh);
    let (tx, sx, ww) = axis(w, sw);
    let patch = small.narrow(2, sy, hh)?.narrow(3, sx, ww)?;
    let mut rows = Vec::new();
    if ty > 0 {
        rows.push(full.narrow(2, 0, ty)?);
    }
    let band = full.narrow(2, ty, hh)?;
    let mut cols = Vec::new();
    if tx > 0 {
        cols.push(band.narrow(3, 0, tx)?);
    }
    cols.push(patch.to_dtype(full.dtype())?);
    if tx + ww < w {
        cols.push(band.narrow(3, tx + ww, w - tx - ww)?);
    }
    rows.push(Tensor::cat(&cols, 3)?);
    if ty + hh < h {
        rows.push(full.narrow(2, ty + hh, h - ty - hh)?);
    }
    Ok(Tensor::cat(&rows, 2)?)
}

/// A first draw of a new stream of `seed`: `dims`, f32, on the CPU.
fn fresh_draw(seed: u64, dims: &[usize]) -> Result<Tensor, Error> {
    let like = Tensor::zeros(dims, DType::F32, &Device::Cpu)?;
    Ok(SeededNoise::new(seed).noise(&like, 0.0, 0.0)?)
}

/// Image i of `req`: its starting noise from `own`, its stream's first draw `[1, C, h, w]`.
pub fn first_noise(req: &Request, i: usize, own: &Tensor) -> Result<Tensor, Error> {
    let (seed, _) = req.image_seeds(i);
    initial_noise(own, seed, &req.variation(i), &mut fresh_draw)
}

/// The starting noise of every image of `req`, `[batch, channels, height / 8, width / 8]`
/// (f32, CPU), as the engine draws it.
pub fn request_noise(req: &Request, channels: usize) -> Result<Tensor, Error> {
    let dims = [1, channels, req.height / 8, req.width / 8];
    let parts = (0..req.batch_size)
        .map(|i| first_noise(req, i, &fresh_draw(req.image_seeds(i).0, &dims)?))
        .collect::<Result<Vec<_>, Error>>()?;
    Ok(Tensor::cat(&parts, 0)?)
}

impl Request {
    /// Image i's (seed, variation seed), as A1111's `all_seeds`/`all_subseeds`: seed + i, or
    /// with variations the same seed for all and subseed + i.
    pub fn image_seeds(&self, i: usize) -> (u64, u64) {
        let i = i as u64;
        match self.subseed_strength != 0.0 {
            true => (self.seed, self.subseed.wrapping_add(i)),
            false => (self.seed.wrapping_add(i), self.subseed.wrapping_add(i)),
        }
    }

    /// The request of batch `n` of A1111's batch count: its images continue the seeds
    /// (or, with variations, the variation seeds) where batch n − 1 stopped.
    pub fn iteration(&self, n: usize) -> Request {
        let step = (n * self.batch_size) as u64;
        let mut r = self.clone();
        match self.subseed_strength != 0.0 {
            true => r.subseed = self.subseed.wrapping_add(step),
            false => r.seed = self.seed.wrapping_add(step),
        }
        r
    }

    /// What image i's starting noise adds to its seed's.
    pub fn variation(&self, i: usize) -> Variation {
        Variation {
            subseed: self.image_seeds(i).1,
            strength: self.subseed_strength,
            resize_from: self.seed_resize_from,
        }
    }
}

/// One standard-normal stream per image of the batch (seed + i), concatenated.
pub(crate) struct BatchNoise {
    streams: Vec<SeededNoise>,
}

impl BatchNoise {
    pub(crate) fn new(seeds: &[u64]) -> Self {
        Self {
            streams: seeds.iter().map(|&s| SeededNoise::new(s)).collect(),
        }
    }

    pub(crate) fn draw(
        &mut self,
        dims: &[usize],
        dtype: DType,
        device: &Device,
    ) -> Result<Tensor, SamplerError> {
        let mut one = dims.to_vec();
        one[0] = 1;
        let like = Tensor::zeros(one.as_slice(), dtype, device)?;
        let parts = self
            .streams
            .iter_mut()
            .map(|s| s.noise(&like, 0.0, 0.0))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Tensor::cat(&parts, 0)?)
    }
}

impl NoiseSource for BatchNoise {
    fn noise(
        &mut self,
        like: &Tensor,
        _sigma: f64,
        _sigma_next: f64,
    ) -> Result<Tensor, SamplerError> {
        self.draw(like.dims(), like.dtype(), like.device())
    }
}
