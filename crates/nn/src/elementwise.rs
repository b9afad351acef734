//! Elementwise and data-movement ops: leaky ReLU, nearest and bilinear ×2 upsampling, a bias
//! along an axis, the GEGLU gate, StyleGAN2's noise + leaky ReLU. One-pass kernels of ours on
//! CUDA, candle's ops elsewhere.

use candle_core::{Result, Tensor, D};

use crate::profile;

/// `leaky_relu(x, slope)`: our one-pass kernel on CUDA, candle's composition elsewhere.
pub fn leaky_relu(xs: &Tensor, slope: f64) -> Result<Tensor> {
    #[cfg(feature = "cuda")]
    if let Some(y) = crate::cuda::leaky_relu(xs, slope)? {
        return Ok(y);
    }
    candle_nn::ops::leaky_relu(xs, slope)
}

/// Nearest-neighbour ×2 upsampling of NCHW `xs`: our kernel on CUDA, candle's elsewhere.
pub fn upsample_nearest_2x(xs: &Tensor) -> Result<Tensor> {
    if xs.track_op() {
        // candle differentiates its upsampling as a convolution with one group per channel,
        // which it runs as one convolution per channel: thousands of kernels per UNet step.
        // The gradient is the sum of each 2×2 block.
        return crate::tracked::with_input_grad(
            xs,
            "upsampling backward",
            upsample_nearest_2x,
            |_, grad| {
                let (n, c, h, w) = grad.dims4()?;
                grad.reshape((n, c, h / 2, 2, w / 2, 2))?.sum(5)?.sum(3)
            },
        );
    }
    #[cfg(feature = "cuda")]
    if let Some(up) = crate::cuda::upsample_nearest_2x(xs)? {
        return Ok(up);
    }
    let (_, _, h, w) = xs.dims4()?;
    xs.upsample_nearest2d(2 * h, 2 * w)
}

/// torch's `F.interpolate(xs, scale_factor=2, mode="bilinear", align_corners=False)` over
/// NCHW: our one-pass kernel on CUDA (candle's computes its coordinates in fp64), candle's
/// elsewhere.
pub fn upsample_bilinear_2x(xs: &Tensor) -> Result<Tensor> {
    #[cfg(feature = "cuda")]
    if let Some(up) = crate::cuda::upsample_bilinear_2x(xs)? {
        return Ok(up);
    }
    xs.upsample_bilinear2d_with_scale(2.0, 2.0, false)
}

/// StyleGAN2's activation after a modulated convolution: `leaky_relu(x + strength · noise,
/// slope)`, `x` `[B, C, H, W]`, `noise` `[1 or B, 1, H, W]`, `strength` one element. With
/// `sft = Some((scale, shift))`, GFPGAN's spatial feature transform of the channels from
/// `C / 2` on follows: `v · scale + shift`, both `[B, C - C/2, H, W]`. One pass on CUDA,
/// candle's ops elsewhere.
pub fn noise_leaky_relu(
    x: &Tensor,
    noise: &Tensor,
    strength: &Tensor,
    slope: f64,
    sft: Option<(&Tensor, &Tensor)>,
) -> Result<Tensor> {
    let (b, c, h, w) = x.dims4()?;
    let noise_fits =
        matches!(noise.dims(), [nb, 1, nh, nw] if (*nb == 1 || *nb == b) && (*nh, *nw) == (h, w));
    let sft_fits = sft.is_none_or(|(scale, shift)| {
        let dims = [b, c - c / 2, h, w];
        scale.dims() == dims && shift.dims() == dims
    });
    if !noise_fits || strength.elem_count() != 1 || !sft_fits {
        candle_core::bail!(
            "noise + leaky ReLU: x {:?}, noise {:?}, strength {:?}, transform {:?} do not fit",
            x.dims(),
            noise.dims(),
            strength.dims(),
            sft.map(|(scale, shift)| (scale.dims().to_vec(), shift.dims().to_vec()))
        )
    }
    #[cfg(feature = "cuda")]
    if let Some(y) = crate::cuda::noise_leaky_relu(x, noise, strength, slope, sft)? {
        return Ok(y);
    }
    let strength = strength.reshape(())?;
    let y = leaky_relu(&x.broadcast_add(&noise.broadcast_mul(&strength)?)?, slope)?;
    let Some((scale, shift)) = sft else {
        return Ok(y);
    };
    let half = c / 2;
    let transformed = (y.narrow(1, half, c - half)? * scale)?.add(shift)?;
    Tensor::cat(&[y.narrow(1, 0, half)?, transformed], 1)
}

/// `y + bias`, `bias` broadcast over the axes after `axis` (its shape: the axes of `y` that
/// end at `axis`, e.g. `[C]` or `[B, C]` for NCHW and axis 1). Our kernel on CUDA
/// ([`crate::cuda::add_bias`]); candle's broadcast add elsewhere.
pub fn add_bias(y: Tensor, bias: &Tensor, axis: usize) -> Result<Tensor> {
    #[cfg(feature = "cuda")]
    if let Some(sum) = crate::cuda::add_bias(&y, bias, axis)? {
        return Ok(sum);
    }
    if bias.rank() == 0 || bias.rank() > axis + 1 {
        candle_core::bail!(
            "bias {:?} does not run along axis {axis} of {:?}",
            bias.dims(),
            y.dims()
        )
    }
    let mut shape = vec![1; y.rank()];
    shape[axis + 1 - bias.rank()..=axis].copy_from_slice(bias.dims());
    y.broadcast_add(&bias.reshape(shape)?)
}

/// The gradient of `h` given `grad`, that of [`geglu`]`(h)`: `grad · gelu(gate)` for the value
/// half, `grad · value · gelu'(gate)` for the gate half, with `gelu'(x) = Φ(x) + x·φ(x)`. One
/// kernel on CUDA.
fn geglu_input_grad(h: &Tensor, grad: &Tensor) -> Result<Tensor> {
    #[cfg(feature = "cuda")]
    if let Some(dh) = crate::cuda::geglu_grad(h, grad)? {
        return Ok(dh);
    }
    let precise = crate::tracked::precise(h.dtype());
    let half = h.dim(D::Minus1)? / 2;
    let part = |start: usize| {
        h.narrow(D::Minus1, start, half)?
            .to_dtype(precise)?
            .contiguous()
    };
    let (value, gate) = (part(0)?, part(half)?);
    let grad = grad.to_dtype(precise)?;
    let cdf = (gate.affine(std::f64::consts::FRAC_1_SQRT_2, 0.)?.erf()? + 1.)?.affine(0.5, 0.)?;
    let pdf = gate
        .sqr()?
        .affine(-0.5, 0.)?
        .exp()?
        .affine(0.398_942_280_401_432_7, 0.)?; // 1/√(2π)
    let d_value = (&grad * (&gate * &cdf)?)?;
    let d_gate = ((&grad * &value)? * (cdf + (&gate * pdf)?)?)?;
    Tensor::cat(&[d_value, d_gate], D::Minus1)?.to_dtype(h.dtype())
}

/// diffusers' GEGLU gate: `value · gelu(gate)` of the two halves of `h`'s last axis (the
/// feed-forward of a transformer block). On a tracked `h`, one op whose backward is
/// [`geglu_input_grad`].
pub fn geglu(h: &Tensor) -> Result<Tensor> {
    if h.track_op() {
        return crate::tracked::with_input_grad(
            h,
            "geglu backward",
            geglu_forward,
            geglu_input_grad,
        );
    }
    geglu_forward(h)
}

/// [`geglu`] on an untracked `h`: our kernel on CUDA, candle's ops elsewhere.
fn geglu_forward(h: &Tensor) -> Result<Tensor> {
    profile::timed("geglu gate", h.device(), || {
        #[cfg(feature = "cuda")]
        if let Some(gated) = crate::cuda::geglu(h)? {
            return Ok(gated);
        }
        let half = h.dim(D::Minus1)? / 2;
        let (value, gate) = (
            h.narrow(D::Minus1, 0, half)?,
            h.narrow(D::Minus1, half, half)?,
        );
        value * gate.gelu_erf()?
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    /// GEGLU on a tracked input: the same input gradient as candle's autograd of
    /// `value · gelu_erf(gate)`.
    #[test]
    fn geglu_gradient_matches_autograd() {
        let h0 = Tensor::randn(0f64, 2., (3, 5, 8), &Device::Cpu).unwrap();
        let r = Tensor::randn(0f64, 1., (3, 5, 4), &Device::Cpu).unwrap();
        let grad_of = |f: &dyn Fn(&Tensor) -> Result<Tensor>| {
            let h = Var::from_tensor(&h0).unwrap();
            let y = f(h.as_tensor()).unwrap();
            let grads = (y * &r).unwrap().sum_all().unwrap().backward().unwrap();
            grads.get(h.as_tensor()).unwrap().clone()
        };
        let ours = grad_of(&|h| {
            crate::tracked::with_input_grad(h, "geglu backward", geglu_forward, geglu_input_grad)
        });
        let theirs = grad_of(&|h| {
            let value = h.narrow(D::Minus1, 0, 4)?;
            value * h.narrow(D::Minus1, 4, 4)?.gelu_erf()?
        });
        let diff = crate::tracked::tests::max_diff(&ours, &theirs);
        // candle's erf is an approximation good to about 1e-7.
        assert!(diff < 1e-5, "{diff}");
        // And central differences of the forward pass, element by element.
        let loss = |h: &Tensor| -> f64 {
            (geglu_forward(h).unwrap() * &r)
                .unwrap()
                .sum_all()
                .unwrap()
                .to_scalar()
                .unwrap()
        };
        let flat = h0.flatten_all().unwrap().to_vec1::<f64>().unwrap();
        let ours = ours.flatten_all().unwrap().to_vec1::<f64>().unwrap();
        for i in [0, 3, 4, 7, 60, 119] {
            let at = |delta: f64| {
                let mut v = flat.clone();
                v[i] += delta;
                loss(&Tensor::from_vec(v, h0.shape(), &Device::Cpu).unwrap())
            };
            let numeric = (at(1e-5) - at(-1e-5)) / 2e-5;
            assert!(
                (numeric - ours[i]).abs() < 1e-5,
                "element {i}: {numeric} vs {}",
                ours[i]
            );
        }
    }
}
