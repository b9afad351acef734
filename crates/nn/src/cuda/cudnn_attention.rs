//! Scaled dot-product attention through cuDNN's graph API: one SDPA forward operation (cuDNN
//! 9.13 and later), which cuDNN runs on its flash-attention engines (on Hopper the warp-group
//! MMA kernels PyTorch's SDPA reaches through cudnn-frontend). [`super::attention`] uses it
//! where `SDKUBE_CUDNN_GRAPH` is on and, per shape, it gave our kernel's values and was faster.

use std::cell::RefCell;
use std::collections::HashMap;
use std::ffi::c_void;
use std::rc::Rc;

use candle_core::cuda_backend::cudarc;
use candle_core::cuda_backend::{CudaDevice, DeviceId};
use candle_core::Result;
use cudarc::driver::{CudaSlice, CudaView, DevicePtr, DevicePtrMut};
use half::f16;

use super::choice::remembered;
use super::cudnn_backend::{
    build_plan, cudnnDataType_t, scalar_by_value, tensor, Attr, Descriptor, Kind, Plan,
};

/// The operands' ids in the graph and the variant pack.
const Q: i64 = 1;
const K: i64 = 2;
const V: i64 = 3;
const O: i64 = 4;
const SCALE: i64 = 5;

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
    static PLANS: RefCell<HashMap<(DeviceId, SdpaShape), Rc<Plan>>> = RefCell::new(HashMap::new());
}

/// Scratch an attention plan may take (the flash engines take none or a little).
const WORKSPACE_LIMIT: usize = 256 << 20;

/// The plan for this shape (fp16 operands, fp32 softmax), built the first time on this thread;
/// an error where this cuDNN has no engine for it.
pub(super) fn plan(dev: &CudaDevice, shape: SdpaShape) -> Result<Rc<Plan>> {
    remembered(&PLANS, (dev.id(), shape), || {
        let start = std::time::Instant::now();
        let (ops, parts) = operation(shape)?;
        // Not `exact`: every flash engine rounds the softmax's probabilities to fp16 for the
        // second product, as ours does; the per-shape check against our kernel
        // ([`super::choice`]) decides.
        let plan = Rc::new(build_plan(dev, ops, parts, false, WORKSPACE_LIMIT)?);
        tracing::debug!(?shape, workspace = plan.workspace, built_in = ?start.elapsed(), "cuDNN attention plan");
        Ok(plan)
    })
}

/// Runs `plan`: `out = softmax(q kᵀ · scale) v` per head, on candle's stream.
///
/// # Safety
/// `plan` must be this shape's, the operands `[B, N, H·D]` / `[B, M, H·D]` of it, contiguous,
/// each at an address aligned to [`super::cudnn_backend::ALIGNMENT`]; `workspace` at least the
/// plan's.
#[allow(clippy::too_many_arguments)]
pub(super) unsafe fn execute(
    dev: &CudaDevice,
    plan: &Plan,
    q: &CudaView<f16>,
    k: &CudaView<f16>,
    v: &CudaView<f16>,
    out: &mut CudaSlice<f16>,
    scale: f32,
    workspace: Option<&mut CudaSlice<u8>>,
) -> Result<()> {
    let stream = dev.cuda_stream();
    let (q_ptr, _q) = q.device_ptr(&stream);
    let (k_ptr, _k) = k.device_ptr(&stream);
    let (v_ptr, _v) = v.device_ptr(&stream);
    let (o_ptr, _o) = out.device_ptr_mut(&stream);
    let scratch = match workspace {
        Some(s) if plan.workspace > 0 => Some(s.device_ptr_mut(&stream)),
        _ if plan.workspace > 0 => candle_core::bail!("cuDNN attention: no workspace"),
        _ => None,
    };
    let mut scale = scale; // by value: cuDNN reads it when it launches
    let pointers = [
        q_ptr as *mut c_void,
        k_ptr as _,
        v_ptr as _,
        o_ptr as _,
        (&mut scale as *mut f32).cast(),
    ];
    let scratch = scratch
        .as_ref()
        .map_or(std::ptr::null_mut(), |(p, _)| *p as *mut c_void);
    // SAFETY: the caller vouches for the device buffers; the scale lives through the call.
    unsafe { plan.execute(&[Q, K, V, O, SCALE], &pointers, scratch) }
}

/// The SDPA forward operation for `shape` (no mask, no dropout, no statistics: inference) and
/// the descriptors it references.
fn operation(shape: SdpaShape) -> Result<(Vec<Descriptor>, Vec<Descriptor>)> {
    let half = cudnnDataType_t::CUDNN_DATA_HALF;
    let (q_dims, q_strides) = shape.operand(shape.queries);
    let (kv_dims, kv_strides) = shape.operand(shape.keys);
    let q = tensor(Q, half, q_dims, q_strides, false)?;
    let k = tensor(K, half, kv_dims, kv_strides, false)?;
    let v = tensor(V, half, kv_dims, kv_strides, false)?;
    let o = tensor(O, half, q_dims, q_strides, false)?;
    let scale = scalar_by_value(SCALE)?;
    let sdpa = Descriptor::new(Kind::CUDNN_BACKEND_OPERATION_SDPA_FWD_DESCRIPTOR)?;
    sdpa.set_descriptors(Attr::CUDNN_ATTR_OPERATION_SDPA_FWD_QDESC, &[&q])?;
    sdpa.set_descriptors(Attr::CUDNN_ATTR_OPERATION_SDPA_FWD_KDESC, &[&k])?;
    sdpa.set_descriptors(Attr::CUDNN_ATTR_OPERATION_SDPA_FWD_VDESC, &[&v])?;
    sdpa.set_descriptors(Attr::CUDNN_ATTR_OPERATION_SDPA_FWD_ODESC, &[&o])?;
    sdpa.set_descriptors(Attr::CUDNN_ATTR_OPERATION_SDPA_FWD_SCALEDESC, &[&scale])?;
    Ok((vec![sdpa.finalize()?], vec![q, k, v, o, scale]))
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

    /// cuDNN checks the operation when it is finalized (needs libcudnn 9.13+, not a GPU).
    #[test]
    fn the_operation_is_a_valid_cudnn_descriptor() {
        let shape = SdpaShape {
            batch: 2,
            heads: 10,
            queries: 1024,
            keys: 1024,
            head_dim: 64,
        };
        let (ops, parts) = operation(shape).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!((ops.len(), parts.len()), (1, 5));
    }
}
