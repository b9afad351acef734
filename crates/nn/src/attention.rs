//! Scaled dot-product attention: flash attention on CUDA, otherwise the composed product with
//! the scores in row blocks; and the softmax it uses.

use candle_core::{DType, Result, Tensor, D};

use crate::profile;

/// Softmax over the last axis: the fused kernel, or the differentiable composition when
/// gradients are being tracked.
pub fn softmax_last_dim(xs: &Tensor) -> Result<Tensor> {
    if xs.track_op() {
        candle_nn::ops::softmax(xs, D::Minus1)
    } else {
        candle_nn::ops::softmax_last_dim(xs)
    }
}

/// Attention over `[B, N, H·D]` inputs, split into `heads`; returns `[B, N, H·D]`.
pub fn scaled_dot_product_attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    heads: usize,
    upcast: bool,
) -> Result<Tensor> {
    profile::timed("attention", q.device(), || {
        attention(q, k, v, heads, upcast)
    })
}

fn attention(q: &Tensor, k: &Tensor, v: &Tensor, heads: usize, upcast: bool) -> Result<Tensor> {
    if q.track_op() || k.track_op() || v.track_op() {
        return crate::tracked::tracked_attention(q, k, v, heads, |q, k, v| {
            attention(q, k, v, heads, upcast)
        });
    }
    let (b, n, inner) = q.dims3()?;
    let m = k.dim(1)?;
    let d = inner / heads;
    #[cfg(feature = "cuda")]
    if let Some(out) = crate::cuda::flash_attention(q, k, v, heads, (d as f64).powf(-0.5))? {
        return Ok(out); // scores accumulate in fp32 there: `upcast` holds already
    }
    let split = |t: &Tensor, len: usize| -> Result<Tensor> {
        t.reshape((b, len, heads, d))?.transpose(1, 2)?.contiguous()
    };
    let dtype = q.dtype();
    let (q, k, v) = (split(q, n)?, split(k, m)?, split(v, m)?);
    let (q, k) = if upcast && dtype != DType::F32 {
        (q.to_dtype(DType::F32)?, k.to_dtype(DType::F32)?)
    } else {
        (q, k)
    };
    let k_t = k.t()?;
    let rows_at_once = (MAX_SCORES / (b * heads * m)).max(1);
    let mut outs = Vec::with_capacity(n.div_ceil(rows_at_once));
    for first in (0..n).step_by(rows_at_once) {
        let q = q.narrow(2, first, rows_at_once.min(n - first))?;
        let scores = (q.matmul(&k_t)? * (d as f64).powf(-0.5))?;
        let probs = softmax_last_dim(&scores)?.to_dtype(dtype)?;
        outs.push(probs.matmul(&v)?);
    }
    let out = if outs.len() == 1 {
        outs.pop().unwrap()
    } else {
        Tensor::cat(&outs, 2)?
    };
    out.transpose(1, 2)?.reshape((b, n, inner))
}

/// Attention scores computed at once, at most: query rows go in chunks beyond it. The VAE's
/// mid block at 1024² has 16384² scores, 1 GiB in fp32 and as much again for the softmax.
const MAX_SCORES: usize = 1 << 26;

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn attention_over_more_scores_than_fit_at_once_matches_the_direct_product() {
        let (n, m, d) = (8200, 8200, 8); // 8200² > MAX_SCORES: two chunks of query rows
        assert!(n * m > MAX_SCORES && n / (MAX_SCORES / m) == 1);
        let dev = Device::Cpu;
        let q = Tensor::randn(0f32, 1., (1, n, d), &dev).unwrap();
        let k = Tensor::randn(0f32, 1., (1, m, d), &dev).unwrap();
        let v = Tensor::randn(0f32, 1., (1, m, d), &dev).unwrap();
        let got = scaled_dot_product_attention(&q, &k, &v, 1, false).unwrap();
        let scores = (q.matmul(&k.t().unwrap()).unwrap() * (d as f64).powf(-0.5)).unwrap();
        let want = candle_nn::ops::softmax_last_dim(&scores)
            .unwrap()
            .matmul(&v)
            .unwrap();
        assert_eq!(got.dims(), [1, n, d]);
        let diff = (got - want).unwrap().abs().unwrap().max_all().unwrap();
        assert!(diff.to_scalar::<f32>().unwrap() < 1e-5);
    }
}
