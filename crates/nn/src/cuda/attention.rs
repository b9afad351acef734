//! Flash attention, forward only: our kernel (`flash_attention_f16_*` in `kernels.cu`), or
//! cuDNN's ([`super::cudnn_attention`]) where, per shape, it gives our kernel's values and is
//! faster.

use std::cell::RefCell;
use std::collections::HashMap;

use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::cudarc;
use candle_core::cuda_backend::{DeviceId, WrapErr};
use candle_core::{CudaStorage, DType, Layout, Result, Shape, Tensor};
use cudarc::driver::{LaunchConfig, PushKernelArg};
use half::f16;

use super::choice::{graph_aligned, remembered, replaces};
use super::cudnn_attention::{self, read, write, Pass, Role, SdpaShape};
use super::memory::with_workspace;
use super::{applies, cuda_op, kernel};

/// Head dims the kernels are instantiated for (the real one is padded up to the next).
const FLASH_HEAD_DIMS: [usize; 8] = [16, 32, 48, 64, 80, 96, 128, 160];

/// Softmax attention over `[B, N, H·D]` queries and `[B, M, H·D]` keys and values, `heads`
/// heads, scores scaled by `scale`; returns `[B, N, H·D]`. fp16 only.
pub fn flash_attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    heads: usize,
    scale: f64,
) -> Result<Option<Tensor>> {
    let all_f16 = [q, k, v].iter().all(|t| t.dtype() == DType::F16);
    if !applies(q) || k.track_op() || v.track_op() || !all_f16 || q.rank() != 3 {
        return Ok(None);
    }
    let inner = q.dim(2)?;
    let d = inner / heads;
    let dp = d.div_ceil(16) * 16;
    if inner % heads != 0 || !d.is_multiple_of(8) || !FLASH_HEAD_DIMS.contains(&dp) {
        return Ok(None);
    }
    let (q, mut k, mut v) = (in_rows(q)?, in_rows(k)?, in_rows(v)?);
    if row_stride(k.layout()) != row_stride(v.layout()) {
        (k, v) = (k.contiguous()?, v.contiguous()?);
    }
    // 16-byte loads need every row to start 16-byte aligned.
    if [&q, &k, &v].iter().any(|t| {
        !t.layout().start_offset().is_multiple_of(8) || !row_stride(t.layout()).is_multiple_of(8)
    }) {
        return Ok(None);
    }
    let ours = FlashAttention {
        heads,
        scale: scale as f32,
        cudnn: false,
    };
    let cudnn = FlashAttention {
        cudnn: true,
        ..ours
    };
    let candle_core::Device::Cuda(dev) = q.device() else {
        return Ok(None);
    };
    let shape = SdpaShape {
        batch: q.dim(0)?,
        heads,
        queries: q.dim(1)?,
        keys: k.dim(1)?,
        head_dim: d,
        q_row: row_stride(q.layout()),
        kv_row: row_stride(k.layout()),
    };
    let use_cudnn = super::cudnn_backend::GRAPH_API.is_on()
        && [&q, &k, &v].into_iter().all(graph_aligned)
        && remembered(&CUDNN_CHOICE, (dev.id(), shape), || {
            replaces(
                "cuDNN attention",
                &[q.dims(), k.dims()],
                q.device(),
                &|| q.apply_op3_no_bwd(&k, &v, &cudnn),
                &|| q.apply_op3_no_bwd(&k, &v, &ours),
            )
        })?;
    let op = if use_cudnn { cudnn } else { ours };
    q.apply_op3_no_bwd(&k, &v, &op).map(Some)
}

/// `t` `[B, N, C]` as the kernels read it: in place where its rows are contiguous and evenly
/// spaced (q, k and v sliced out of one fused projection's `[B, N, 3C]` rows are), else a
/// contiguous copy.
fn in_rows(t: &Tensor) -> Result<Tensor> {
    let (_, n, c) = t.dims3()?;
    let s = t.stride();
    let rows = s[2] == 1 && s[1] >= c && (t.dim(0)? == 1 || s[0] == n * s[1]);
    if rows {
        Ok(t.clone())
    } else {
        t.contiguous()
    }
}

/// Elements between the rows of a `[B, N, C]` operand [`in_rows`] accepted.
fn row_stride(layout: &Layout) -> usize {
    layout.stride()[1]
}

thread_local! {
    // Per device and shape: whether cuDNN's attention is used (see `replaces`).
    static CUDNN_CHOICE: RefCell<HashMap<(DeviceId, SdpaShape), bool>> = RefCell::new(HashMap::new());
}

#[derive(Clone, Copy)]
struct FlashAttention {
    heads: usize,
    scale: f32,
    /// Through cuDNN's SDPA plan instead of our kernel.
    cudnn: bool,
}

/// Kernel name, query rows per block, threads per block and dynamic shared memory in bytes at
/// padded head dim `dp`. These mirror kernels.cu and must match it: `v2_rows<DP>()` = 4 warps
/// x 16 rows x `v2_wm<DP>()` (2 m tiles for dp <= 64, else 1), `V2_THREADS` = 128, two stages
/// of one K and one V tile of [64 keys][dp + 8] halves.
fn flash_launch(dp: usize) -> (String, usize, u32, usize) {
    let tile_bytes = 64 * (dp + 8) * 2;
    let rows = 4 * 16 * if dp <= 64 { 2 } else { 1 };
    (
        format!("flash_attention_f16_{dp}"),
        rows,
        128,
        2 * 2 * tile_bytes,
    )
}

impl FlashAttention {
    fn run(
        &self,
        (q, ql): (&CudaStorage, &Layout),
        (k, kl): (&CudaStorage, &Layout),
        (v, vl): (&CudaStorage, &Layout),
    ) -> Result<(CudaStorage, Shape)> {
        let (b, n, inner) = ql.shape().dims3()?;
        let (bk, m, inner_k) = kl.shape().dims3()?;
        let (ldq, ldkv) = (row_stride(ql), row_stride(kl));
        let fits = |l: &Layout, rows: usize, ld: usize| {
            let s = l.stride();
            s[2] == 1 && s[1] == ld && ld >= inner && (b == 1 || s[0] == rows * ld)
        };
        if (bk, inner_k) != (b, inner)
            || vl.shape() != kl.shape()
            || m == 0
            || !fits(ql, n, ldq)
            || !fits(kl, m, ldkv)
            || !fits(vl, m, ldkv)
        {
            candle_core::bail!(
                "flash-attention: q {:?}, k {:?}, v {:?} do not fit",
                ql.shape(),
                kl.shape(),
                vl.shape()
            )
        }
        let d = inner / self.heads;
        let dp = d.div_ceil(16) * 16;
        let dev = q.device().clone();
        let qs = q.as_cuda_slice::<f16>()?.slice(ql.start_offset()..);
        let ks = k.as_cuda_slice::<f16>()?.slice(kl.start_offset()..);
        let vs = v.as_cuda_slice::<f16>()?.slice(vl.start_offset()..);
        // SAFETY: the kernel writes every element.
        let mut out = unsafe { dev.alloc::<f16>(b * n * inner)? };
        if self.cudnn {
            let shape = SdpaShape {
                batch: b,
                heads: self.heads,
                queries: n,
                keys: m,
                head_dim: d,
                q_row: ldq,
                kv_row: ldkv,
            };
            let plan = cudnn_attention::plan(&dev, shape, Pass::Inference)?;
            let stream = dev.cuda_stream();
            let mut guards = Vec::new();
            let operands = [
                read(Role::Q, &qs, &stream, &mut guards),
                read(Role::K, &ks, &stream, &mut guards),
                read(Role::V, &vs, &stream, &mut guards),
                write(Role::Out, &mut out, &stream, &mut guards),
            ];
            with_workspace(&dev, plan.workspace, |workspace| {
                // SAFETY: fp16 operands of this shape and these row strides (the checks above
                // and in `flash_attention`, alignment included); `out` fresh from the pool.
                unsafe {
                    cudnn_attention::run(
                        &dev,
                        &plan,
                        Pass::Inference,
                        &operands,
                        self.scale,
                        workspace,
                    )
                }
            })?;
            drop(guards);
            return Ok((CudaStorage::wrap_cuda_slice(out, dev), ql.shape().clone()));
        }
        let (name, rows, threads, smem) = flash_launch(dp);
        let func = kernel(&dev, &name)?;
        func.set_attribute(
            cudarc::driver::sys::CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
            smem as i32,
        )
        .w()?;
        let cfg = LaunchConfig {
            grid_dim: (n.div_ceil(rows) as u32, (b * self.heads) as u32, 1),
            block_dim: (threads, 1, 1),
            shared_mem_bytes: smem as u32,
        };
        let (n32, m32, h32, d32) = (n as i32, m as i32, self.heads as i32, d as i32);
        let (ldq32, ldkv32) = (ldq as i32, ldkv as i32);
        let scale_log2 = self.scale * std::f32::consts::LOG2_E;
        let mut launch = func.builder();
        launch.arg(&qs).arg(&ks).arg(&vs).arg(&out);
        launch
            .arg(&n32)
            .arg(&m32)
            .arg(&h32)
            .arg(&d32)
            .arg(&ldq32)
            .arg(&ldkv32)
            .arg(&scale_log2);
        // SAFETY: argument list matches the kernel's signature; shapes checked above.
        unsafe { launch.launch(cfg) }.w()?;
        Ok((CudaStorage::wrap_cuda_slice(out, dev), ql.shape().clone()))
    }
}

cuda_op!(FlashAttention, "flash-attention", run(x, y, z) []);
