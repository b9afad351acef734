//! Scaled dot-product attention through cuDNN's graph API: one SDPA operation (forward since
//! cuDNN 9.13, backward since 9.17), which cuDNN runs on its flash-attention engines (on Hopper
//! the warp-group MMA kernels PyTorch's SDPA reaches through cudnn-frontend).
//! [`super::attention`] uses the forward where `SDKUBE_CUDNN_GRAPH` is on and, per shape, it
//! gave our kernel's values and was faster; [`super::attention_grad`] the training forward and
//! the backward on the same terms.

use std::cell::RefCell;
use std::collections::HashMap;
use std::ffi::c_void;
use std::rc::Rc;

use candle_core::cuda_backend::cudarc;
use candle_core::cuda_backend::{CudaDevice, DeviceId};
use candle_core::Result;
use cudarc::driver::{CudaSlice, CudaStream, CudaView, DevicePtr, DevicePtrMut};

use super::choice::remembered;
use super::cudnn_backend::{
    build_plan, cudnnDataType_t, scalar_by_value, tensor, Attr, Descriptor, Kind, Plan,
};

/// The tensors of SDPA graphs; the value is the id in the graph and the variant pack.
#[derive(Clone, Copy, Debug)]
pub(super) enum Role {
    Q = 1,
    K,
    V,
    Out,
    /// Each query row's log-sum-exp of its scaled scores, fp32 `[B, H, N, 1]`.
    Stats,
    DOut,
    DQ,
    DK,
    DV,
}

/// The scale's id (a scalar passed by value, not a buffer).
const SCALE: i64 = 20;

/// Which SDPA graph a plan runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub(super) enum Pass {
    /// `out = softmax(q kᵀ · scale) v`.
    Inference,
    /// The output and its statistics ([`Role::Stats`]), which the backward pass reads.
    Training,
    /// `dq, dk, dv` from `q, k, v`, the output, its gradient and the statistics.
    Backward,
}

/// One attention's shapes: `batch` samples of `queries` query rows and `keys` key and value
/// rows, each row `heads` heads of `head_dim` (the memory of `[B, N, H·D]`, as the projections
/// write it: no transposes).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub(super) struct SdpaShape {
    pub batch: usize,
    pub heads: usize,
    pub queries: usize,
    pub keys: usize,
    pub head_dim: usize,
}

impl SdpaShape {
    /// The `[B, H, rows, D]` dimensions and strides of a `[B, rows, H·D]` operand.
    fn operand(&self, rows: usize) -> ([usize; 4], [i64; 4]) {
        let (h, d) = (self.heads, self.head_dim);
        let strides = [rows * h * d, d, h * d, 1].map(|s| s as i64);
        ([self.batch, h, rows, d], strides)
    }
}

thread_local! {
    static PLANS: RefCell<HashMap<(DeviceId, SdpaShape, Pass), Rc<Plan>>> = RefCell::new(HashMap::new());
}

/// Scratch an attention plan may take (the flash engines take none or a little).
const WORKSPACE_LIMIT: usize = 256 << 20;

/// The plan for this shape and pass (fp16 operands, fp32 softmax), built the first time on
/// this thread; an error where this cuDNN has no engine for it.
pub(super) fn plan(dev: &CudaDevice, shape: SdpaShape, pass: Pass) -> Result<Rc<Plan>> {
    remembered(&PLANS, (dev.id(), shape, pass), || {
        let start = std::time::Instant::now();
        let (ops, parts) = match pass {
            Pass::Inference => forward(shape, false)?,
            Pass::Training => forward(shape, true)?,
            Pass::Backward => backward(shape)?,
        };
        // Not `exact`: every flash engine rounds the softmax's probabilities to fp16 for the
        // second product, as ours does; the per-shape check against our kernel
        // ([`super::choice`]) decides.
        let plan = Rc::new(build_plan(dev, ops, parts, false, WORKSPACE_LIMIT)?);
        tracing::debug!(?shape, ?pass, workspace = plan.workspace, built_in = ?start.elapsed(), "cuDNN attention plan");
        Ok(plan)
    })
}

/// An operand of an SDPA plan: its id in the graph and its device address.
pub(super) struct Operand(i64, *mut c_void);

type Guards<'a> = Vec<cudarc::driver::SyncOnDrop<'a>>;

/// `view` as the operand `role`, read on `stream`; the guard kept in `guards` orders the read
/// after the buffer's last write (cudarc's event tracking).
pub(super) fn read<'a, T>(
    role: Role,
    view: &'a CudaView<'a, T>,
    stream: &'a CudaStream,
    guards: &mut Guards<'a>,
) -> Operand {
    let (ptr, guard) = view.device_ptr(stream);
    guards.push(guard);
    Operand(role as i64, ptr as *mut c_void)
}

/// `slice` as the operand `role`, written on `stream`.
pub(super) fn write<'a, T>(
    role: Role,
    slice: &'a mut CudaSlice<T>,
    stream: &'a CudaStream,
    guards: &mut Guards<'a>,
) -> Operand {
    let (ptr, guard) = slice.device_ptr_mut(stream);
    guards.push(guard);
    Operand(role as i64, ptr as *mut c_void)
}

/// Runs `plan` on `operands` (the scale added here), on candle's stream: for
/// [`Pass::Inference`] `out = softmax(q kᵀ · scale) v` per head.
///
/// # Safety
/// `operands` must be every tensor of `plan`'s graph but the scale (`[B, N, H·D]` / `[B, M,
/// H·D]` fp16, contiguous; the statistics fp32 `[B, H, N]`), each at an address aligned to
/// [`super::cudnn_backend::ALIGNMENT`]; `workspace` at least the plan's.
pub(super) unsafe fn run(
    dev: &CudaDevice,
    plan: &Plan,
    operands: &[Operand],
    scale: f32,
    workspace: Option<&mut CudaSlice<u8>>,
) -> Result<()> {
    let stream = dev.cuda_stream();
    let scratch = match workspace {
        Some(s) if plan.workspace > 0 => Some(s.device_ptr_mut(&stream)),
        _ if plan.workspace > 0 => candle_core::bail!("cuDNN attention: no workspace"),
        _ => None,
    };
    let mut scale = scale; // by value: cuDNN reads it when it launches
    let mut ids: Vec<i64> = operands.iter().map(|o| o.0).collect();
    let mut pointers: Vec<*mut c_void> = operands.iter().map(|o| o.1).collect();
    ids.push(SCALE);
    pointers.push((&mut scale as *mut f32).cast());
    let scratch = scratch
        .as_ref()
        .map_or(std::ptr::null_mut(), |(p, _)| *p as *mut c_void);
    // SAFETY: the caller vouches for the device buffers; the scale lives through the call.
    unsafe { plan.execute(&ids, &pointers, scratch) }
}

/// The statistics' descriptor: fp32 `[B, H, N, 1]`, contiguous.
fn stats(shape: SdpaShape) -> Result<Descriptor> {
    let (h, n) = (shape.heads, shape.queries);
    let strides = [h * n, n, 1, 1].map(|s| s as i64);
    let dims = [shape.batch, h, n, 1];
    tensor(
        Role::Stats as i64,
        cudnnDataType_t::CUDNN_DATA_FLOAT,
        dims,
        strides,
        false,
    )
}

/// The SDPA forward operation for `shape` (no mask, no dropout; the statistics as an output
/// where `training`) and the descriptors it references.
fn forward(shape: SdpaShape, training: bool) -> Result<(Vec<Descriptor>, Vec<Descriptor>)> {
    let half = cudnnDataType_t::CUDNN_DATA_HALF;
    let (q_dims, q_strides) = shape.operand(shape.queries);
    let (kv_dims, kv_strides) = shape.operand(shape.keys);
    let q = tensor(Role::Q as i64, half, q_dims, q_strides, false)?;
    let k = tensor(Role::K as i64, half, kv_dims, kv_strides, false)?;
    let v = tensor(Role::V as i64, half, kv_dims, kv_strides, false)?;
    let o = tensor(Role::Out as i64, half, q_dims, q_strides, false)?;
    let scale = scalar_by_value(SCALE)?;
    let sdpa = Descriptor::new(Kind::CUDNN_BACKEND_OPERATION_SDPA_FWD_DESCRIPTOR)?;
    sdpa.set_descriptors(Attr::CUDNN_ATTR_OPERATION_SDPA_FWD_QDESC, &[&q])?;
    sdpa.set_descriptors(Attr::CUDNN_ATTR_OPERATION_SDPA_FWD_KDESC, &[&k])?;
    sdpa.set_descriptors(Attr::CUDNN_ATTR_OPERATION_SDPA_FWD_VDESC, &[&v])?;
    sdpa.set_descriptors(Attr::CUDNN_ATTR_OPERATION_SDPA_FWD_ODESC, &[&o])?;
    sdpa.set_descriptors(Attr::CUDNN_ATTR_OPERATION_SDPA_FWD_SCALEDESC, &[&scale])?;
    let mut parts = vec![q, k, v, o, scale];
    if training {
        let stats = stats(shape)?;
        sdpa.set_descriptors(Attr::CUDNN_ATTR_OPERATION_SDPA_FWD_STATSDESC, &[&stats])?;
        parts.push(stats);
    }
    Ok((vec![sdpa.finalize()?], parts))
}

/// The SDPA backward operation for `shape`: the gradients in the operands' own layout.
fn backward(shape: SdpaShape) -> Result<(Vec<Descriptor>, Vec<Descriptor>)> {
    let half = cudnnDataType_t::CUDNN_DATA_HALF;
    let (q_dims, q_strides) = shape.operand(shape.queries);
    let (kv_dims, kv_strides) = shape.operand(shape.keys);
    let queries = |role: Role| tensor(role as i64, half, q_dims, q_strides, false);
    let keys = |role: Role| tensor(role as i64, half, kv_dims, kv_strides, false);
    let (q, o, d_out, d_q) = (
        queries(Role::Q)?,
        queries(Role::Out)?,
        queries(Role::DOut)?,
        queries(Role::DQ)?,
    );
    let (k, v, d_k, d_v) = (
        keys(Role::K)?,
        keys(Role::V)?,
        keys(Role::DK)?,
        keys(Role::DV)?,
    );
    let (stats, scale) = (stats(shape)?, scalar_by_value(SCALE)?);
    use Attr::*;
    let sdpa = Descriptor::new(Kind::CUDNN_BACKEND_OPERATION_SDPA_BWD_DESCRIPTOR)?;
    for (attr, desc) in [
        (CUDNN_ATTR_OPERATION_SDPA_BWD_QDESC, &q),
        (CUDNN_ATTR_OPERATION_SDPA_BWD_KDESC, &k),
        (CUDNN_ATTR_OPERATION_SDPA_BWD_VDESC, &v),
        (CUDNN_ATTR_OPERATION_SDPA_BWD_ODESC, &o),
        (CUDNN_ATTR_OPERATION_SDPA_BWD_DODDESC, &d_out),
        (CUDNN_ATTR_OPERATION_SDPA_BWD_STATSDESC, &stats),
        (CUDNN_ATTR_OPERATION_SDPA_BWD_SCALEDESC, &scale),
        (CUDNN_ATTR_OPERATION_SDPA_BWD_DQDESC, &d_q),
        (CUDNN_ATTR_OPERATION_SDPA_BWD_DKDESC, &d_k),
        (CUDNN_ATTR_OPERATION_SDPA_BWD_DVDESC, &d_v),
    ] {
        sdpa.set_descriptors(attr, &[desc])?;
    }
    let parts = vec![q, k, v, o, d_out, stats, scale, d_q, d_k, d_v];
    Ok((vec![sdpa.finalize()?], parts))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn operands_are_described_in_place_in_their_projection_layout() {
        // SD1.5's first self-attention: 8 heads of 40 over 64² tokens, batch 2.
        let shape = SdpaShape {
            batch: 2,
            heads: 8,
            queries: 4096,
            keys: 77,
            head_dim: 40,
        };
        // Query row n of head h starts at n·320 + h·40.
        assert_eq!(
            shape.operand(4096),
            ([2, 8, 4096, 40], [4096 * 320, 40, 320, 1])
        );
        assert_eq!(shape.operand(77), ([2, 8, 77, 40], [77 * 320, 40, 320, 1]));
    }

    /// cuDNN checks each operation when it is finalized (needs libcudnn 9.17+, not a GPU).
    #[test]
    fn the_operation_is_a_valid_cudnn_descriptor() {
        let shape = SdpaShape {
            batch: 2,
            heads: 10,
            queries: 1024,
            keys: 1024,
            head_dim: 64,
        };
        let (ops, parts) = forward(shape, false).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!((ops.len(), parts.len()), (1, 5));
        let (ops, parts) = forward(shape, true).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!((ops.len(), parts.len()), (1, 6));
        // The backward operation: cuDNN 9.17+.
        let (ops, parts) = backward(shape).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!((ops.len(), parts.len()), (1, 10));
    }

    /// An operation graph of the backward operation: cuDNN 9.28 builds it (without a GPU, as
    /// here); 9.19, the CUDA image's and PyTorch 2.11's, refuses it (its graphs do not take
    /// the operation: `NOT_IMPLEMENTED` in cuDNN's log), so training keeps the recomputed
    /// backward there. Versions between are not known either way.
    #[test]
    fn the_backward_graph_builds_only_where_cudnn_takes_the_operation() {
        let shape = SdpaShape {
            batch: 2,
            heads: 8,
            queries: 4096,
            keys: 77,
            head_dim: 40,
        };
        let graph = |ops: Vec<Descriptor>| -> Result<Descriptor> {
            let graph = Descriptor::new(Kind::CUDNN_BACKEND_OPERATIONGRAPH_DESCRIPTOR)?;
            graph.set_descriptors(
                Attr::CUDNN_ATTR_OPERATIONGRAPH_OPS,
                &ops.iter().collect::<Vec<_>>(),
            )?;
            graph.finalize()
        };
        let (training, _parts) = forward(shape, true).unwrap();
        graph(training).unwrap_or_else(|e| panic!("the training forward: {e}"));
        let (ops, _parts) = backward(shape).unwrap();
        let built = graph(ops);
        let version = cudarc::cudnn::result::get_version();
        if version >= 92800 {
            built.unwrap_or_else(|e| panic!("cuDNN {version}: {e}"));
        } else if version <= 91900 {
            let e = built
                .err()
                .expect("cuDNN 9.19 refused this graph when this was written");
            assert!(e.to_string().contains("BAD_PARAM"), "{e}");
        }
    }
}
