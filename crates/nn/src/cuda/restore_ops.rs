//! StyleGAN2's noise + leaky ReLU, with GFPGAN's spatial feature transform after it, in one
//! pass (`restore_kernels.cuh`, which also holds the bilinear upsampling of `elementwise.rs`).

use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::cudarc;
use candle_core::cuda_backend::WrapErr;
use candle_core::{CudaStorage, Layout, Result, Shape, Storage, Tensor};
use cudarc::driver::{DeviceRepr, PushKernelArg};
use half::f16;

use super::elementwise::elementwise_ok;
use super::{cuda_op, kernel, launch_1d, suffix};

/// `leaky_relu(x + strength · noise, slope)`, then with `sft` GFPGAN's transform of the
/// channels from `C / 2` on (`v · scale + shift`). Shapes as `sdkube_nn::noise_leaky_relu`
/// checks them; `None` where the kernel does not apply.
pub fn noise_leaky_relu(
    x: &Tensor,
    noise: &Tensor,
    strength: &Tensor,
    slope: f64,
    sft: Option<(&Tensor, &Tensor)>,
) -> Result<Option<Tensor>> {
    let operands = [noise, strength].into_iter().chain(sft.map(|s| s.0));
    let operands: Vec<_> = operands.chain(sft.map(|s| s.1)).collect();
    let same = operands
        .iter()
        .all(|t| t.dtype() == x.dtype() && elementwise_ok(t));
    if !elementwise_ok(x) || !same || crate::is_channels_last(x) {
        return Ok(None);
    }
    let sft = match sft {
        Some((scale, shift)) => Some((scale.contiguous()?, shift.contiguous()?)),
        None => None,
    };
    let op = NoiseLeaky {
        slope: slope as f32,
        sft,
    };
    x.contiguous()?
        .apply_op3_no_bwd(&noise.contiguous()?, &strength.contiguous()?, &op)
        .map(Some)
}

struct NoiseLeaky {
    slope: f32,
    /// The transform's scale and shift, contiguous `[B, C - C/2, H, W]`.
    sft: Option<(Tensor, Tensor)>,
}

impl NoiseLeaky {
    fn run<T: DeviceRepr + candle_core::cuda_backend::CudaDType>(
        &self,
        (x, xl): (&CudaStorage, &Layout),
        (noise, nl): (&CudaStorage, &Layout),
        (strength, sl): (&CudaStorage, &Layout),
    ) -> Result<(CudaStorage, Shape)> {
        let (b, c, h, w) = xl.shape().dims4()?;
        let (n, hw) = (b * c * h * w, h * w);
        let noise_stride = if nl.dims()[0] == 1 { 0 } else { hw };
        let dev = x.device().clone();
        let xs = x.as_cuda_slice::<T>()?.slice(xl.start_offset()..);
        let ns = noise.as_cuda_slice::<T>()?.slice(nl.start_offset()..);
        let ss = strength.as_cuda_slice::<T>()?.slice(sl.start_offset()..);
        // SAFETY: the kernel writes every element.
        let out = unsafe { dev.alloc::<T>(n)? };
        let suffix = suffix(x.dtype())?;
        let (n32, c32, hw32, stride32) = (n as u32, c as u32, hw as u32, noise_stride as u32);
        match &self.sft {
            None => {
                let func = kernel(&dev, &format!("noise_leaky_{suffix}"))?;
                let mut launch = func.builder();
                launch.arg(&xs).arg(&out).arg(&ns).arg(&stride32).arg(&ss);
                launch.arg(&n32).arg(&c32).arg(&hw32).arg(&self.slope);
                // SAFETY: argument list matches the kernel's signature.
                unsafe { launch.launch(launch_1d(n)) }.w()?;
            }
            Some((scale, shift)) => {
                let (scale, scale_layout) = scale.storage_and_layout();
                let (shift, shift_layout) = shift.storage_and_layout();
                let (Storage::Cuda(scale), Storage::Cuda(shift)) = (&*scale, &*shift) else {
                    candle_core::bail!("noise + leaky ReLU: the transform is not on the GPU")
                };
                let scale = scale
                    .as_cuda_slice::<T>()?
                    .slice(scale_layout.start_offset()..);
                let shift = shift
                    .as_cuda_slice::<T>()?
                    .slice(shift_layout.start_offset()..);
                let from32 = (c / 2) as u32;
                let func = kernel(&dev, &format!("noise_leaky_sft_{suffix}"))?;
                let mut launch = func.builder();
                launch.arg(&xs).arg(&out).arg(&ns).arg(&stride32).arg(&ss);
                launch.arg(&scale).arg(&shift);
                launch
                    .arg(&n32)
                    .arg(&c32)
                    .arg(&hw32)
                    .arg(&from32)
                    .arg(&self.slope);
                // SAFETY: argument list matches the kernel's signature.
                unsafe { launch.launch(launch_1d(n)) }.w()?;
            }
        }
        Ok((CudaStorage::wrap_cuda_slice(out, dev), xl.shape().clone()))
    }
}

cuda_op!(NoiseLeaky, "noise-leaky-relu", run(x, y, z) [F16 => f16, F32 => f32]);
