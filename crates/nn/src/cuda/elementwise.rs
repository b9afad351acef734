//! Elementwise kernels: bias along an axis, the GEGLU gate, the softmax's input gradient, leaky
//! ReLU, nearest and bilinear ×2 upsampling, where candle's broadcast kernels run at a tenth of memory speed
//! (compared by `sdkube bench --what ops`).

use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::cudarc;
use candle_core::cuda_backend::{CudaDevice, WrapErr};
use candle_core::{CudaStorage, DType, Layout, Result, Shape, Tensor};
use cudarc::driver::{CudaSlice, CudaView, DeviceRepr, PushKernelArg};
use half::f16;

use super::{applies, cuda_op, kernel, launch_1d, suffix};

/// Whether our one-pass kernels take `t`: on a GPU they run on, fp16 or fp32, indexable in
/// 32 bits.
pub(super) fn elementwise_ok(t: &Tensor) -> bool {
    applies(t) && matches!(t.dtype(), DType::F16 | DType::F32) && t.elem_count() < (1 << 31)
}

/// `y + bias`, `bias` broadcast over the axes after `axis`: its shape is the axes of `y` up to
/// `axis`, or a suffix of them (a linear layer's bias along the last axis; a convolution's
/// bias `[C]` along axis 1 of NCHW; the time embedding `[B, C]` per sample and channel).
pub fn add_bias(y: &Tensor, bias: &Tensor, axis: usize) -> Result<Option<Tensor>> {
    if !elementwise_ok(y) || bias.dtype() != y.dtype() || bias.track_op() || axis >= y.rank() {
        return Ok(None);
    }
    if !bias_fits(y.dims(), bias.dims(), axis) {
        return Ok(None);
    }
    let bias = bias.contiguous()?;
    if axis == 1 && crate::is_channels_last(y) {
        // Memory [N, H·W, C]: a bias [C] repeats every C elements, a bias [N, C] also moves
        // on every H·W·C.
        let (n, c, h, w) = y.dims4()?;
        let per_sample = if bias.rank() == 2 {
            h * w * c
        } else {
            n * h * w * c
        };
        let op = AddBias {
            inner: 1,
            per_sample,
        };
        let sum = y.permute((0, 2, 3, 1))?.apply_op2_no_bwd(&bias, &op)?;
        return sum.permute((0, 3, 1, 2)).map(Some);
    }
    let inner: usize = y.dims()[axis + 1..].iter().product();
    let op = AddBias {
        inner,
        per_sample: y.elem_count(),
    };
    y.contiguous()?.apply_op2_no_bwd(&bias, &op).map(Some)
}

/// Whether `bias`'s shape is the axes of `y` that end at `axis` (at least one of them).
fn bias_fits(y: &[usize], bias: &[usize], axis: usize) -> bool {
    !bias.is_empty() && bias.len() <= axis + 1 && y[axis + 1 - bias.len()..=axis] == *bias
}

/// `out[i] = y[i] + bias[(i / per_sample) · C + (i / inner) % C]` over contiguous `y`, `C`
/// the channels of the bias: its last axis where `per_sample` < `y`'s size, all of it otherwise.
struct AddBias {
    inner: usize,
    per_sample: usize,
}

impl AddBias {
    fn run<T: DeviceRepr + candle_core::cuda_backend::CudaDType>(
        &self,
        (y, yl): (&CudaStorage, &Layout),
        (b, bl): (&CudaStorage, &Layout),
    ) -> Result<(CudaStorage, Shape)> {
        let n = yl.shape().elem_count();
        let dev = y.device().clone();
        let ys = y.as_cuda_slice::<T>()?.slice(yl.start_offset()..);
        let bs = b.as_cuda_slice::<T>()?.slice(bl.start_offset()..);
        // SAFETY: the kernel writes every element.
        let out = unsafe { dev.alloc::<T>(n)? };
        let channels = if self.per_sample < n {
            bl.dims()[bl.dims().len() - 1]
        } else {
            bl.shape().elem_count()
        };
        let (inner, per_sample) = (self.inner, self.per_sample);
        launch_add_bias(&dev, y.dtype(), &ys, &bs, &out, inner, channels, per_sample)?;
        Ok((CudaStorage::wrap_cuda_slice(out, dev), yl.shape().clone()))
    }
}

cuda_op!(AddBias, "add-bias", run(x, y) [F16 => f16, F32 => f32]);

/// Our `add_bias` kernel over all of `out`:
/// `out[i] = y[i] + bias[(i / per_sample) · channels + (i / inner) % channels]` (`per_sample`
/// at least `out`'s length for a bias shared by every sample). `y` may view `out` itself:
/// each thread reads its element before writing it.
#[allow(clippy::too_many_arguments)]
pub(super) fn launch_add_bias<T: DeviceRepr>(
    dev: &CudaDevice,
    dtype: DType,
    y: &CudaView<T>,
    bias: &CudaView<T>,
    out: &CudaSlice<T>,
    inner: usize,
    channels: usize,
    per_sample: usize,
) -> Result<()> {
    let n = out.len();
    let func = kernel(dev, &format!("add_bias_{}", suffix(dtype)?))?;
    let (n32, inner32, channels32) = (n as u32, inner as u32, channels as u32);
    let per_sample32 = per_sample.min(u32::MAX as usize) as u32;
    let mut launch = func.builder();
    launch
        .arg(y)
        .arg(bias)
        .arg(out)
        .arg(&n32)
        .arg(&inner32)
        .arg(&channels32)
        .arg(&per_sample32);
    // SAFETY: argument list matches the kernel's signature; `y` holds at least `n` elements.
    unsafe { launch.launch(launch_1d(n)) }.w()?;
    Ok(())
}

/// diffusers' GEGLU gate: `h[..., :F] * gelu(h[..., F:])` for `h` `[..., 2F]`.
pub fn geglu(h: &Tensor) -> Result<Option<Tensor>> {
    if !elementwise_ok(h) || h.rank() == 0 || !h.dims()[h.rank() - 1].is_multiple_of(2) {
        return Ok(None);
    }
    h.contiguous()?.apply_op1_no_bwd(&Geglu).map(Some)
}

struct Geglu;

impl Geglu {
    fn run<T: DeviceRepr + candle_core::cuda_backend::CudaDType>(
        &self,
        (h, hl): (&CudaStorage, &Layout),
    ) -> Result<(CudaStorage, Shape)> {
        let mut dims = hl.dims().to_vec();
        let last = dims.len() - 1;
        dims[last] /= 2;
        let f = dims[last];
        let n: usize = dims.iter().product();
        let dev = h.device().clone();
        let hs = h.as_cuda_slice::<T>()?.slice(hl.start_offset()..);
        // SAFETY: the kernel writes every element.
        let out = unsafe { dev.alloc::<T>(n)? };
        // 16 bytes per thread where rows split into whole vectors that start aligned (the
        // allocation is; the view's offset must keep it).
        let vec = 16 / h.dtype().size_in_bytes();
        let (kind, threads) = match f % vec == 0 && hl.start_offset() % vec == 0 {
            true => ("geglu_vec", n / vec),
            false => ("geglu", n),
        };
        let func = kernel(&dev, &format!("{kind}_{}", suffix(h.dtype())?))?;
        let (threads32, f_u32) = (threads as u32, f as u32);
        let mut launch = func.builder();
        launch.arg(&hs).arg(&out).arg(&threads32).arg(&f_u32);
        // SAFETY: argument list matches the kernel's signature.
        unsafe { launch.launch(launch_1d(threads)) }.w()?;
        Ok((CudaStorage::wrap_cuda_slice(out, dev), Shape::from(dims)))
    }
}

cuda_op!(Geglu, "geglu", run(x) [F16 => f16, F32 => f32]);

/// The softmax's input gradient over the last axis: `p · (dp − row_dot)`, `p` the softmax's
/// output, `dp` its gradient, `row_dot` `[..., 1]` each row's `Σ p·dp`; one pass where candle
/// takes a broadcast subtraction (strided, slow) and a product over score-sized tensors.
pub fn softmax_grad(p: &Tensor, dp: &Tensor, row_dot: &Tensor) -> Result<Option<Tensor>> {
    let same = [dp, row_dot]
        .iter()
        .all(|t| t.dtype() == p.dtype() && applies(t));
    let rows = p.dims().split_last().map(|(_, rows)| rows);
    let row_fits = row_dot
        .dims()
        .split_last()
        .map(|(last, rows)| (*last, rows));
    if !elementwise_ok(p) || !same || dp.dims() != p.dims() || row_fits != rows.map(|r| (1, r)) {
        return Ok(None);
    }
    p.contiguous()?
        .apply_op3_no_bwd(&dp.contiguous()?, &row_dot.contiguous()?, &SoftmaxGrad)
        .map(Some)
}

struct SoftmaxGrad;

impl SoftmaxGrad {
    fn run<T: DeviceRepr + candle_core::cuda_backend::CudaDType>(
        &self,
        (p, pl): (&CudaStorage, &Layout),
        (dp, dpl): (&CudaStorage, &Layout),
        (r, rl): (&CudaStorage, &Layout),
    ) -> Result<(CudaStorage, Shape)> {
        let n = pl.shape().elem_count();
        let m = pl.dims()[pl.dims().len() - 1];
        let dev = p.device().clone();
        let ps = p.as_cuda_slice::<T>()?.slice(pl.start_offset()..);
        let dps = dp.as_cuda_slice::<T>()?.slice(dpl.start_offset()..);
        let rs = r.as_cuda_slice::<T>()?.slice(rl.start_offset()..);
        // SAFETY: the kernel writes every element.
        let out = unsafe { dev.alloc::<T>(n)? };
        let func = kernel(&dev, &format!("softmax_grad_{}", suffix(p.dtype())?))?;
        let (n32, m32) = (n as u32, m as u32);
        let mut launch = func.builder();
        launch
            .arg(&ps)
            .arg(&dps)
            .arg(&rs)
            .arg(&out)
            .arg(&n32)
            .arg(&m32);
        // SAFETY: argument list matches the kernel's signature.
        unsafe { launch.launch(launch_1d(n)) }.w()?;
        Ok((CudaStorage::wrap_cuda_slice(out, dev), pl.shape().clone()))
    }
}

cuda_op!(SoftmaxGrad, "softmax-grad", run(x, y, z) [F16 => f16, F32 => f32]);

/// The input gradient of [`geglu`] given `grad`, that of its output: `dh` `[..., 2F]` from `h`
/// `[..., 2F]` and `grad` `[..., F]`, in one pass.
pub fn geglu_grad(h: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
    let Some((&last, rows)) = h.dims().split_last() else {
        return Ok(None);
    };
    let halved = grad.dims().split_last() == Some((&(last / 2), rows));
    let same = grad.dtype() == h.dtype() && applies(grad);
    if !elementwise_ok(h) || !same || !last.is_multiple_of(2) || !halved {
        return Ok(None);
    }
    h.contiguous()?
        .apply_op2_no_bwd(&grad.contiguous()?, &GegluGrad)
        .map(Some)
}

struct GegluGrad;

impl GegluGrad {
    fn run<T: DeviceRepr + candle_core::cuda_backend::CudaDType>(
        &self,
        (h, hl): (&CudaStorage, &Layout),
        (g, gl): (&CudaStorage, &Layout),
    ) -> Result<(CudaStorage, Shape)> {
        let n = gl.shape().elem_count();
        let f = gl.dims()[gl.dims().len() - 1];
        let dev = h.device().clone();
        let hs = h.as_cuda_slice::<T>()?.slice(hl.start_offset()..);
        let gs = g.as_cuda_slice::<T>()?.slice(gl.start_offset()..);
        // SAFETY: the kernel writes every element (both halves of each row).
        let out = unsafe { dev.alloc::<T>(2 * n)? };
        let func = kernel(&dev, &format!("geglu_grad_{}", suffix(h.dtype())?))?;
        let (n32, f32_) = (n as u32, f as u32);
        let mut launch = func.builder();
        launch.arg(&hs).arg(&gs).arg(&out).arg(&n32).arg(&f32_);
        // SAFETY: argument list matches the kernel's signature.
        unsafe { launch.launch(launch_1d(n)) }.w()?;
        Ok((CudaStorage::wrap_cuda_slice(out, dev), hl.shape().clone()))
    }
}

cuda_op!(GegluGrad, "geglu-grad", run(x, y) [F16 => f16, F32 => f32]);

/// `x >= 0 ? x : slope * x` in one pass.
pub fn leaky_relu(x: &Tensor, slope: f64) -> Result<Option<Tensor>> {
    if !elementwise_ok(x) {
        return Ok(None);
    }
    let op = LeakyRelu {
        slope: slope as f32,
    };
    x.contiguous()?.apply_op1_no_bwd(&op).map(Some)
}

struct LeakyRelu {
    slope: f32,
}

impl LeakyRelu {
    fn run<T: DeviceRepr + candle_core::cuda_backend::CudaDType>(
        &self,
        (x, xl): (&CudaStorage, &Layout),
    ) -> Result<(CudaStorage, Shape)> {
        let n = xl.shape().elem_count();
        let dev = x.device().clone();
        let xs = x.as_cuda_slice::<T>()?.slice(xl.start_offset()..);
        // SAFETY: the kernel writes every element.
        let out = unsafe { dev.alloc::<T>(n)? };
        let name = format!("leaky_relu_{}", suffix(x.dtype())?);
        let func = kernel(&dev, &name)?;
        let n32 = n as u32;
        let mut launch = func.builder();
        launch.arg(&xs).arg(&out).arg(&n32).arg(&self.slope);
        // SAFETY: argument list matches the kernel's signature.
        unsafe { launch.launch(launch_1d(n)) }.w()?;
        Ok((CudaStorage::wrap_cuda_slice(out, dev), xl.shape().clone()))
    }
}

cuda_op!(LeakyRelu, "leaky-relu", run(x) [F16 => f16, F32 => f32]);

/// Nearest-neighbour ×2 upsampling of `x` `[N, C, H, W]` (`upsample_nearest2d(2h, 2w)`),
/// channels-last where `x` is.
pub fn upsample_nearest_2x(x: &Tensor) -> Result<Option<Tensor>> {
    if !elementwise_ok(x) || x.rank() != 4 || x.elem_count() >= (1 << 29) {
        return Ok(None); // the output (4×) must stay below 2^31 elements
    }
    if crate::is_channels_last(x) {
        let up = x.permute((0, 2, 3, 1))?.apply_op1_no_bwd(&Upsample2xNhwc)?;
        return up.permute((0, 3, 1, 2)).map(Some);
    }
    let op = Upsample2x { bilinear: false };
    x.contiguous()?.apply_op1_no_bwd(&op).map(Some)
}

/// torch's `F.interpolate(x, scale_factor=2, mode="bilinear", align_corners=False)` over NCHW
/// `x`; `None` where the kernel does not apply (channels-last memory among them).
pub fn upsample_bilinear_2x(x: &Tensor) -> Result<Option<Tensor>> {
    // the output (4×) must stay below 2^31 elements
    if !elementwise_ok(x)
        || x.rank() != 4
        || x.elem_count() >= (1 << 29)
        || crate::is_channels_last(x)
    {
        return Ok(None);
    }
    let op = Upsample2x { bilinear: true };
    x.contiguous()?.apply_op1_no_bwd(&op).map(Some)
}

/// [`Upsample2x`] over channels-last memory `[B, H, W, C]`.
struct Upsample2xNhwc;

impl Upsample2xNhwc {
    fn run<T: DeviceRepr + candle_core::cuda_backend::CudaDType>(
        &self,
        (x, xl): (&CudaStorage, &Layout),
    ) -> Result<(CudaStorage, Shape)> {
        let (b, h, w, c) = xl.shape().dims4()?;
        let n = b * h * w * c;
        let dev = x.device().clone();
        let xs = x.as_cuda_slice::<T>()?.slice(xl.start_offset()..);
        // SAFETY: the kernel writes every element.
        let out = unsafe { dev.alloc::<T>(4 * n)? };
        let name = format!("upsample_2x_nhwc_{}", suffix(x.dtype())?);
        let func = kernel(&dev, &name)?;
        let (n32, h32, w32, c32) = (n as u32, h as u32, w as u32, c as u32);
        let mut launch = func.builder();
        launch
            .arg(&xs)
            .arg(&out)
            .arg(&n32)
            .arg(&h32)
            .arg(&w32)
            .arg(&c32);
        // SAFETY: argument list matches the kernel's signature.
        unsafe { launch.launch(launch_1d(n)) }.w()?;
        Ok((
            CudaStorage::wrap_cuda_slice(out, dev),
            Shape::from((b, 2 * h, 2 * w, c)),
        ))
    }
}

cuda_op!(Upsample2xNhwc, "upsample-nearest-2x-nhwc", run(x) [F16 => f16, F32 => f32]);

/// ×2 upsampling over NCHW memory: nearest (each input pixel's 2×2 block, a thread per input
/// element) or bilinear as torch's `align_corners=False` (a thread per output element).
struct Upsample2x {
    bilinear: bool,
}

impl Upsample2x {
    fn run<T: DeviceRepr + candle_core::cuda_backend::CudaDType>(
        &self,
        (x, xl): (&CudaStorage, &Layout),
    ) -> Result<(CudaStorage, Shape)> {
        let (b, c, h, w) = xl.shape().dims4()?;
        let n = b * c * h * w;
        let dev = x.device().clone();
        let xs = x.as_cuda_slice::<T>()?.slice(xl.start_offset()..);
        // SAFETY: the kernel writes every element.
        let out = unsafe { dev.alloc::<T>(4 * n)? };
        let (kind, threads) = if self.bilinear {
            ("upsample_bilinear_2x", 4 * n)
        } else {
            ("upsample_2x", n)
        };
        let func = kernel(&dev, &format!("{kind}_{}", suffix(x.dtype())?))?;
        let (n32, h32, w32) = (threads as u32, h as u32, w as u32);
        let mut launch = func.builder();
        launch.arg(&xs).arg(&out).arg(&n32).arg(&h32).arg(&w32);
        // SAFETY: argument list matches the kernel's signature.
        unsafe { launch.launch(launch_1d(threads)) }.w()?;
        Ok((
            CudaStorage::wrap_cuda_slice(out, dev),
            Shape::from((b, c, 2 * h, 2 * w)),
        ))
    }
}

cuda_op!(Upsample2x, "upsample-2x", run(x) [F16 => f16, F32 => f32]);
