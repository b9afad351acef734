//! Attention inside a gradient graph (textual-inversion training) through cuDNN's fused SDPA:
//! the forward keeps each query row's softmax statistics, and the backward computes `dq`,
//! `dk` and `dv` from them in one pass, where [`crate::tracked`] recomputes the probabilities a
//! block of query rows at a time through cuBLAS. Taken per shape where cuDNN has engines for
//! both passes, their results match the recomputation's and together they are faster.

use std::cell::RefCell;
use std::collections::HashMap;

use candle_core::cuda_backend::cudarc::driver::CudaView;
use candle_core::cuda_backend::{CudaDevice, DeviceId};
use candle_core::op::BackpropOp;
use candle_core::{CudaStorage, DType, Layout, Result, Shape, Storage, Tensor};
use half::f16;

use super::choice::{graph_aligned, remembered, replaces};
use super::cudnn_attention::{self, read, write, Pass, Role, SdpaShape};
use super::cudnn_backend::GRAPH_API;
use super::enabled;
use super::memory::with_workspace;

thread_local! {
    // Per device and shape: whether attention in a gradient graph goes through cuDNN.
    static CHOICE: RefCell<HashMap<(DeviceId, SdpaShape), bool>> = RefCell::new(HashMap::new());
}

/// What the backward pass of [`sdpa_forward_for_grad`]'s attention needs besides its operands and
/// output.
pub struct SavedSdpa {
    /// Each query row's log-sum-exp of its scaled scores, f32 `[B, H, N]`.
    stats: Tensor,
    shape: SdpaShape,
    scale: f32,
}

/// `[B, N, H·D]` attention of `heads` heads, scores scaled by `scale`, computed for a gradient
/// graph: the output and what [`sdpa_backward`] needs. `None` where this path does not apply: not
/// fp16 on CUDA with our kernels and cuDNN's graph API on, or, for this shape (decided once),
/// cuDNN has no engine for either pass, or its output and gradients differ from those of
/// `current` (the output and gradients `[out, dq, dk, dv]` of the path it would replace, for a
/// given gradient of the output), or it is slower.
pub fn sdpa_forward_for_grad(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    heads: usize,
    scale: f64,
    current: &dyn Fn(&Tensor) -> Result<Vec<Tensor>>,
) -> Result<Option<(Tensor, SavedSdpa)>> {
    let candle_core::Device::Cuda(dev) = q.device() else {
        return Ok(None);
    };
    let all_f16 = [q, k, v].iter().all(|t| t.dtype() == DType::F16);
    if !enabled() || !GRAPH_API.is_on() || !all_f16 || q.rank() != 3 || k.rank() != 3 {
        return Ok(None);
    }
    let (batch, queries, inner) = q.dims3()?;
    let keys = k.dim(1)?;
    if inner % heads != 0 || k.dims() != v.dims() || k.dims() != [batch, keys, inner] {
        return Ok(None);
    }
    let shape = SdpaShape::packed(batch, heads, queries, keys, inner / heads);
    let scale = scale as f32;
    let (q, k, v) = (operand(q)?, operand(k)?, operand(v)?);
    let taken = remembered(&CHOICE, (dev.id(), shape), || {
        // First the backward's plan: cuDNN 9.19 (the image's) refuses it at once (see
        // `cudnn_attention`'s tests), before the forward's plan is built for nothing.
        if let Err(e) = cudnn_attention::plan(dev, shape, Pass::Backward) {
            tracing::debug!(?shape, "cuDNN attention backward refused: {e}");
            return Ok(false);
        }
        // Any gradient shows a wrong layout or scale; this one has the output's shape. Drawn
        // on the CPU: the device's generator, seeded, stays as it would be without the check.
        let d_out = Tensor::randn(0f32, 1., q.shape(), &candle_core::Device::Cpu)?
            .to_dtype(DType::F16)?
            .to_device(q.device())?;
        replaces(
            "cuDNN attention backward",
            &[q.dims(), k.dims()],
            q.device(),
            &|| {
                let (out, saved) = run_forward(dev, &q, &k, &v, shape, scale)?;
                let [dq, dk, dv] = sdpa_backward(&saved, &q, &k, &v, &out, &d_out)?;
                Ok(vec![out, dq, dk, dv])
            },
            &|| current(&d_out),
        )
    })?;
    if !taken {
        return Ok(None);
    }
    run_forward(dev, &q, &k, &v, shape, scale).map(Some)
}

/// The gradients `[dq, dk, dv]` (fp16, in the operands' layout) of the attention
/// [`sdpa_forward_for_grad`] computed as `out` from `q`, `k`, `v` and saved as `saved`, given
/// `d_out`, the gradient of `out`.
pub fn sdpa_backward(
    saved: &SavedSdpa,
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    out: &Tensor,
    d_out: &Tensor,
) -> Result<[Tensor; 3]> {
    let dev = cuda_device(q)?;
    let SdpaShape {
        batch,
        queries,
        keys,
        ..
    } = saved.shape;
    let inner = saved.shape.heads * saved.shape.head_dim;
    for (t, rows) in [
        (q, queries),
        (out, queries),
        (d_out, queries),
        (k, keys),
        (v, keys),
    ] {
        if t.dims() != [batch, rows, inner] {
            candle_core::bail!(
                "cuDNN attention backward: {:?} where {:?} was saved",
                t.dims(),
                [batch, rows, inner]
            )
        }
    }
    let plan = cudnn_attention::plan(&dev, saved.shape, Pass::Backward)?;
    let operands = [q, k, v, out, &d_out.to_dtype(DType::F16)?, &saved.stats]
        .map(operand)
        .into_iter()
        .collect::<Result<Vec<_>>>()?;
    let storages: Vec<_> = operands.iter().map(|t| t.storage_and_layout()).collect();
    let views = storages[..5]
        .iter()
        .map(|(storage, layout)| view::<f16>(storage, layout))
        .collect::<Result<Vec<_>>>()?;
    let stats = view::<f32>(&storages[5].0, storages[5].1)?;
    // SAFETY: the plan writes every element of the gradients.
    let mut d_q = unsafe { dev.alloc::<f16>(batch * queries * inner)? };
    let mut d_k = unsafe { dev.alloc::<f16>(batch * keys * inner)? };
    let mut d_v = unsafe { dev.alloc::<f16>(batch * keys * inner)? };
    // The plan's fp32 scratch, which it fills before it reads.
    let rows = batch * saved.shape.heads * queries;
    let mut softmax_sum = unsafe { dev.alloc::<f32>(rows)? };
    let mut dq_accum = unsafe { dev.alloc::<f32>(rows * saved.shape.head_dim)? };
    {
        let stream = dev.cuda_stream();
        let mut guards = Vec::new();
        let roles = [Role::Q, Role::K, Role::V, Role::Out, Role::DOut];
        let mut list: Vec<_> = roles
            .into_iter()
            .zip(&views)
            .map(|(role, view)| read(role, view, &stream, &mut guards))
            .collect();
        list.push(read(Role::Stats, &stats, &stream, &mut guards));
        list.push(write(Role::DQ, &mut d_q, &stream, &mut guards));
        list.push(write(Role::DK, &mut d_k, &stream, &mut guards));
        list.push(write(Role::DV, &mut d_v, &stream, &mut guards));
        list.push(write(
            Role::SoftmaxSum,
            &mut softmax_sum,
            &stream,
            &mut guards,
        ));
        list.push(write(Role::DqAccum, &mut dq_accum, &stream, &mut guards));
        with_workspace(&dev, plan.workspace, |workspace| {
            // SAFETY: the operands are contiguous, aligned (`operand`) and of the plan's shape
            // (checked above); the gradients fresh from the pool.
            unsafe {
                cudnn_attention::run(&dev, &plan, Pass::Backward, &list, saved.scale, workspace)
            }
        })?;
    }
    Ok([
        wrap(d_q, &dev, (batch, queries, inner)),
        wrap(d_k, &dev, (batch, keys, inner)),
        wrap(d_v, &dev, (batch, keys, inner)),
    ])
}

/// The training forward: the output `[B, N, H·D]` and the statistics.
fn run_forward(
    dev: &CudaDevice,
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    shape: SdpaShape,
    scale: f32,
) -> Result<(Tensor, SavedSdpa)> {
    let plan = cudnn_attention::plan(dev, shape, Pass::Training)?;
    let SdpaShape {
        batch,
        heads,
        queries,
        ..
    } = shape;
    let storages = [q, k, v].map(|t| t.storage_and_layout());
    let views = storages
        .iter()
        .map(|(storage, layout)| view::<f16>(storage, layout))
        .collect::<Result<Vec<_>>>()?;
    // SAFETY: the plan writes every element.
    let mut out = unsafe { dev.alloc::<f16>(q.elem_count())? };
    let mut stats = unsafe { dev.alloc::<f32>(batch * heads * queries)? };
    {
        let stream = dev.cuda_stream();
        let mut guards = Vec::new();
        let list = [
            read(Role::Q, &views[0], &stream, &mut guards),
            read(Role::K, &views[1], &stream, &mut guards),
            read(Role::V, &views[2], &stream, &mut guards),
            write(Role::Out, &mut out, &stream, &mut guards),
            write(Role::Stats, &mut stats, &stream, &mut guards),
        ];
        with_workspace(dev, plan.workspace, |workspace| {
            // SAFETY: contiguous, aligned operands of this shape (`sdpa_forward_for_grad`); the
            // outputs fresh from the pool.
            unsafe { cudnn_attention::run(dev, &plan, Pass::Training, &list, scale, workspace) }
        })?;
    }
    let saved = SavedSdpa {
        stats: wrap(stats, dev, (batch, heads, queries)),
        shape,
        scale,
    };
    Ok((wrap(out, dev, q.shape().clone()), saved))
}

/// `t` as a cuDNN operand: contiguous from an aligned address (a copy where it is not).
fn operand(t: &Tensor) -> Result<Tensor> {
    if t.is_contiguous() && graph_aligned(t) {
        Ok(t.clone())
    } else {
        t.force_contiguous()
    }
}

/// A contiguous operand's elements on the GPU, from its first.
fn view<'a, T: candle_core::cuda_backend::CudaDType>(
    storage: &'a Storage,
    layout: &Layout,
) -> Result<CudaView<'a, T>> {
    match storage {
        Storage::Cuda(s) => Ok(s.as_cuda_slice::<T>()?.slice(layout.start_offset()..)),
        _ => candle_core::bail!("cuDNN attention: an operand is not on the GPU"),
    }
}

fn cuda_device(t: &Tensor) -> Result<CudaDevice> {
    match t.device() {
        candle_core::Device::Cuda(dev) => Ok(dev.clone()),
        _ => candle_core::bail!("cuDNN attention: an operand is not on the GPU"),
    }
}

/// A fresh buffer as an untracked tensor.
fn wrap<T: candle_core::cuda_backend::CudaDType>(
    slice: candle_core::cuda_backend::cudarc::driver::CudaSlice<T>,
    dev: &CudaDevice,
    shape: impl Into<Shape>,
) -> Tensor {
    let storage = CudaStorage::wrap_cuda_slice(slice, dev.clone());
    Tensor::from_storage(Storage::Cuda(storage), shape, BackpropOp::none(), false)
}
