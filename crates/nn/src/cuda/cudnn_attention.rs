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
    build_plan, cudnnDataType_t, scalar_by_value, sys, tensor, Attr, Descriptor, Kind, Plan,
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
    /// The backward's fp32 scratch: each query row's `rowsum(do·o)`, `[B, H, N, 1]`.
    SoftmaxSum,
    /// The backward's fp32 scratch: `dq` as it accumulates, `[B, H, N, D]`.
    DqAccum,
}

/// The scale's id (a scalar passed by value, not a buffer).
const SCALE: i64 = 20;
/// The id of the backward's constant 1 (the dropout factor of cudnn-frontend's graph, which
/// the engines' pattern expects).
const ONE: i64 = 21;

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
/// write it: no transposes). The query rows are `q_row` elements apart and the key and value
/// rows `kv_row`: `H·D` when packed, more where they are slices of one fused projection's
/// rows. Outputs and gradients are packed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub(super) struct SdpaShape {
    pub batch: usize,
    pub heads: usize,
    pub queries: usize,
    pub keys: usize,
    pub head_dim: usize,
    pub q_row: usize,
    pub kv_row: usize,
}

impl SdpaShape {
    /// The shape of packed operands.
    pub fn packed(
        batch: usize,
        heads: usize,
        queries: usize,
        keys: usize,
        head_dim: usize,
    ) -> Self {
        Self {
            batch,
            heads,
            queries,
            keys,
            head_dim,
            q_row: heads * head_dim,
            kv_row: heads * head_dim,
        }
    }

    /// The `[B, H, rows, D]` dimensions and strides of a `[B, rows, H·D]` operand whose rows
    /// are `row` elements apart.
    fn operand(&self, rows: usize, row: usize) -> ([usize; 4], [i64; 4]) {
        let (h, d) = (self.heads, self.head_dim);
        let strides = [rows * row, d, row, 1].map(|s| s as i64);
        ([self.batch, h, rows, d], strides)
    }

    /// [`operand`](Self::operand) packed.
    fn packed_operand(&self, rows: usize) -> ([usize; 4], [i64; 4]) {
        self.operand(rows, self.heads * self.head_dim)
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

/// Runs `plan`, built for `pass`, on `operands` (the scalars added here), on candle's stream:
/// for [`Pass::Inference`] `out = softmax(q kᵀ · scale) v` per head.
///
/// # Safety
/// `operands` must be every tensor of `plan`'s graph but the scalars (`[B, N, H·D]` / `[B, M,
/// H·D]` fp16, rows as the plan's shape says; the statistics and the backward's scratch fp32, as [`Role`] says),
/// each at an address aligned to [`super::cudnn_backend::ALIGNMENT`]; `workspace` at least
/// the plan's.
pub(super) unsafe fn run(
    dev: &CudaDevice,
    plan: &Plan,
    pass: Pass,
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
    // By value: cuDNN reads them when it launches.
    let (mut scale, mut one) = (scale, 1f32);
    let mut ids: Vec<i64> = operands.iter().map(|o| o.0).collect();
    let mut pointers: Vec<*mut c_void> = operands.iter().map(|o| o.1).collect();
    ids.push(SCALE);
    pointers.push((&mut scale as *mut f32).cast());
    if pass == Pass::Backward {
        ids.push(ONE);
        pointers.push((&mut one as *mut f32).cast());
    }
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
    let (q_dims, q_strides) = shape.operand(shape.queries, shape.q_row);
    let (kv_dims, kv_strides) = shape.operand(shape.keys, shape.kv_row);
    let (o_dims, o_strides) = shape.packed_operand(shape.queries);
    let q = tensor(Role::Q as i64, half, q_dims, q_strides, false)?;
    let k = tensor(Role::K as i64, half, kv_dims, kv_strides, false)?;
    let v = tensor(Role::V as i64, half, kv_dims, kv_strides, false)?;
    let o = tensor(Role::Out as i64, half, o_dims, o_strides, false)?;
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

/// The backward graph for `shape`, composed as cudnn-frontend composes `sdpa_backward` for
/// cuDNN 9 (PyTorch's path; cuDNN matches the pattern to its fused flash-attention backward
/// engines). cuDNN's own SDPA backward operation would be one node, but 9.19 (the image's and
/// PyTorch 2.11's) does not take it in a graph. With `p = exp(q kᵀ·scale − stats)`:
/// `dv = pᵀ do`; `ds = p·(do vᵀ − rowsum(do·o))·scale`; `dk = dsᵀ q`; `dq = ds k`, through
/// an fp32 accumulator ([`Role::DqAccum`]). `k` and `v` are described transposed, as the
/// engines take them.
fn backward(shape: SdpaShape) -> Result<(Vec<Descriptor>, Vec<Descriptor>)> {
    use cudnnDataType_t::{CUDNN_DATA_FLOAT as F32, CUDNN_DATA_HALF as F16};
    use sys::cudnnPointwiseMode_t::*;
    let SdpaShape {
        batch: b,
        heads: h,
        queries: n,
        keys: m,
        head_dim: d,
        ..
    } = shape;
    // The training forward's operands, packed (`attention_grad` makes them so).
    let (q_dims, q_strides) = shape.packed_operand(n);
    let (kv_dims, kv_strides) = shape.packed_operand(m);
    let transposed = |[s0, s1, s2, s3]: [i64; 4]| [s0, s1, s3, s2];
    let kt_dims = [b, h, d, m];
    let mut g = Ops::default();
    let mut io = |role: Role, dtype, dims, strides| g.tensor(role as i64, dtype, dims, strides);
    let q = io(Role::Q, F16, q_dims, q_strides)?;
    let kt = io(Role::K, F16, kt_dims, transposed(kv_strides))?;
    let vt = io(Role::V, F16, kt_dims, transposed(kv_strides))?;
    let o = io(Role::Out, F16, q_dims, q_strides)?;
    let d_out = io(Role::DOut, F16, q_dims, q_strides)?;
    let d_q = io(Role::DQ, F16, q_dims, q_strides)?;
    let d_k = io(Role::DK, F16, kv_dims, kv_strides)?;
    let d_v = io(Role::DV, F16, kv_dims, kv_strides)?;
    let packed = |dims: [usize; 4]| {
        [dims[1] * dims[2] * dims[3], dims[2] * dims[3], dims[3], 1].map(|s| s as i64)
    };
    let per_row = [b, h, n, 1];
    let softmax_sum = io(Role::SoftmaxSum, F32, per_row, packed(per_row))?;
    let dq_accum = io(Role::DqAccum, F32, q_dims, packed(q_dims))?;
    let stats = g.keep(stats(shape)?);
    let scale = g.keep(scalar_by_value(SCALE)?);
    let one = g.keep(scalar_by_value(ONE)?);

    // rowsum(do·o): the softmax gradient's row term.
    let per_head = [(h * n * d) as i64, (n * d) as i64, (h * d) as i64, 1];
    let do_o = g.inner(F32, q_dims, per_head)?;
    g.pointwise(CUDNN_POINTWISE_MUL, d_out, Some(o), do_o)?;
    let row_sum = g.inner(F32, per_row, packed(per_row))?;
    g.reduce_sum(do_o, row_sum)?;
    g.pointwise(CUDNN_POINTWISE_MUL, row_sum, Some(one), softmax_sum)?;

    // p = exp(q kᵀ·scale − stats); dv = pᵀ do.
    let scores = [b, h, n, m];
    let scores_t = ([b, h, m, n], transposed(packed(scores)));
    let score = |g: &mut Ops| g.inner(F32, scores, packed(scores));
    let s = score(&mut g)?;
    g.matmul(q, kt, s)?;
    let s_scaled = score(&mut g)?;
    g.pointwise(CUDNN_POINTWISE_MUL, s, Some(scale), s_scaled)?;
    let s_shifted = score(&mut g)?;
    g.pointwise(CUDNN_POINTWISE_SUB, s_scaled, Some(stats), s_shifted)?;
    let p = score(&mut g)?;
    g.pointwise(CUDNN_POINTWISE_EXP, s_shifted, None, p)?;
    let p_t = g.inner(F16, scores_t.0, scores_t.1)?;
    g.reshape(p, p_t)?;
    g.matmul(p_t, d_out, d_v)?;

    // ds = p·(do vᵀ − rowsum)·scale; dk = dsᵀ q.
    let dp = score(&mut g)?;
    g.matmul(d_out, vt, dp)?;
    let dp_centred = score(&mut g)?;
    g.pointwise(CUDNN_POINTWISE_SUB, dp, Some(softmax_sum), dp_centred)?;
    let dp_p = score(&mut g)?;
    g.pointwise(CUDNN_POINTWISE_MUL, dp_centred, Some(p), dp_p)?;
    let ds = score(&mut g)?;
    g.pointwise(CUDNN_POINTWISE_MUL, dp_p, Some(scale), ds)?;
    let ds_t = g.inner(F16, scores_t.0, scores_t.1)?;
    g.reshape(ds, ds_t)?;
    g.matmul(ds_t, q, d_k)?;

    // dq = ds k, accumulated in fp32.
    let k = g.inner(F32, kv_dims, kv_strides)?;
    g.reshape(kt, k)?;
    g.matmul(ds, k, dq_accum)?;
    g.pointwise(CUDNN_POINTWISE_IDENTITY, dq_accum, None, d_q)?;
    Ok((g.ops, g.parts))
}

/// An operation graph being described: its operations, and every descriptor they reference
/// (tensors by index into `parts`).
#[derive(Default)]
struct Ops {
    ops: Vec<Descriptor>,
    parts: Vec<Descriptor>,
    /// Ids for inner tensors, above every [`Role`] and scalar.
    next_inner: i64,
}

impl Ops {
    fn keep(&mut self, descriptor: Descriptor) -> usize {
        self.parts.push(descriptor);
        self.parts.len() - 1
    }

    /// A tensor in memory, `id` in the variant pack.
    fn tensor(
        &mut self,
        id: i64,
        dtype: cudnnDataType_t,
        dims: [usize; 4],
        strides: [i64; 4],
    ) -> Result<usize> {
        Ok(self.keep(tensor(id, dtype, dims, strides, false)?))
    }

    /// An inner (virtual) tensor of the graph.
    fn inner(
        &mut self,
        dtype: cudnnDataType_t,
        dims: [usize; 4],
        strides: [i64; 4],
    ) -> Result<usize> {
        let id = 100 + self.next_inner;
        self.next_inner += 1;
        Ok(self.keep(tensor(id, dtype, dims, strides, true)?))
    }

    /// `y = mode(x, b)` elementwise (`b` broadcast), computed in fp32.
    fn pointwise(
        &mut self,
        mode: sys::cudnnPointwiseMode_t,
        x: usize,
        b: Option<usize>,
        y: usize,
    ) -> Result<()> {
        use Attr::*;
        let pw = Descriptor::new(Kind::CUDNN_BACKEND_POINTWISE_DESCRIPTOR)?;
        pw.set_enum(CUDNN_ATTR_POINTWISE_MODE, mode)?;
        pw.set_enum(
            CUDNN_ATTR_POINTWISE_MATH_PREC,
            cudnnDataType_t::CUDNN_DATA_FLOAT,
        )?;
        let mut operands = vec![
            (CUDNN_ATTR_OPERATION_POINTWISE_XDESC, x),
            (CUDNN_ATTR_OPERATION_POINTWISE_YDESC, y),
        ];
        operands.extend(b.map(|b| (CUDNN_ATTR_OPERATION_POINTWISE_BDESC, b)));
        let config = (CUDNN_ATTR_OPERATION_POINTWISE_PW_DESCRIPTOR, pw.finalize()?);
        self.operation(
            Kind::CUDNN_BACKEND_OPERATION_POINTWISE_DESCRIPTOR,
            &operands,
            Some(config),
        )
    }

    /// `c = a b` per batch and head, accumulated in fp32.
    fn matmul(&mut self, a: usize, b: usize, c: usize) -> Result<()> {
        use Attr::*;
        let mm = Descriptor::new(Kind::CUDNN_BACKEND_MATMUL_DESCRIPTOR)?;
        mm.set_enum(
            CUDNN_ATTR_MATMUL_COMP_TYPE,
            cudnnDataType_t::CUDNN_DATA_FLOAT,
        )?;
        let operands = [
            (CUDNN_ATTR_OPERATION_MATMUL_ADESC, a),
            (CUDNN_ATTR_OPERATION_MATMUL_BDESC, b),
            (CUDNN_ATTR_OPERATION_MATMUL_CDESC, c),
        ];
        let config = (CUDNN_ATTR_OPERATION_MATMUL_DESC, mm.finalize()?);
        self.operation(
            Kind::CUDNN_BACKEND_OPERATION_MATMUL_DESCRIPTOR,
            &operands,
            Some(config),
        )
    }

    /// `y` = the sum of `x` over the dimensions where `y` has size 1, in fp32.
    fn reduce_sum(&mut self, x: usize, y: usize) -> Result<()> {
        use Attr::*;
        let sum = Descriptor::new(Kind::CUDNN_BACKEND_REDUCTION_DESCRIPTOR)?;
        let add = sys::cudnnReduceTensorOp_t::CUDNN_REDUCE_TENSOR_ADD;
        sum.set_enum(CUDNN_ATTR_REDUCTION_OPERATOR, add)?;
        sum.set_enum(
            CUDNN_ATTR_REDUCTION_COMP_TYPE,
            cudnnDataType_t::CUDNN_DATA_FLOAT,
        )?;
        let operands = [
            (CUDNN_ATTR_OPERATION_REDUCTION_XDESC, x),
            (CUDNN_ATTR_OPERATION_REDUCTION_YDESC, y),
        ];
        let config = (CUDNN_ATTR_OPERATION_REDUCTION_DESC, sum.finalize()?);
        self.operation(
            Kind::CUDNN_BACKEND_OPERATION_REDUCTION_DESCRIPTOR,
            &operands,
            Some(config),
        )
    }

    /// `y`: the elements of `x` under other dimensions and strides (a transpose here), and
    /// the element type `y` names.
    fn reshape(&mut self, x: usize, y: usize) -> Result<()> {
        use Attr::*;
        let operands = [
            (CUDNN_ATTR_OPERATION_RESHAPE_XDESC, x),
            (CUDNN_ATTR_OPERATION_RESHAPE_YDESC, y),
        ];
        self.operation(
            Kind::CUDNN_BACKEND_OPERATION_RESHAPE_DESCRIPTOR,
            &operands,
            None,
        )
    }

    /// One operation of `kind` on the tensors `operands` names (attribute, index in `parts`),
    /// with its configuration descriptor where it has one (kept in `parts`).
    fn operation(
        &mut self,
        kind: Kind,
        operands: &[(Attr, usize)],
        config: Option<(Attr, Descriptor)>,
    ) -> Result<()> {
        let op = Descriptor::new(kind)?;
        for &(attr, index) in operands {
            op.set_descriptors(attr, &[&self.parts[index]])?;
        }
        if let Some((attr, config)) = config {
            op.set_descriptors(attr, &[&config])?;
            self.keep(config);
        }
        self.ops.push(op.finalize()?);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn operands_are_described_in_place_in_their_projection_layout() {
        // SD1.5's first self-attention: 8 heads of 40 over 64² tokens, batch 2.
        let shape = SdpaShape::packed(2, 8, 4096, 77, 40);
        // Query row n of head h starts at n·320 + h·40.
        assert_eq!(
            shape.packed_operand(4096),
            ([2, 8, 4096, 40], [4096 * 320, 40, 320, 1])
        );
        assert_eq!(
            shape.packed_operand(77),
            ([2, 8, 77, 40], [77 * 320, 40, 320, 1])
        );
        // Sliced out of a fused q/k/v projection, rows are 960 apart.
        assert_eq!(
            shape.operand(4096, 960),
            ([2, 8, 4096, 40], [4096 * 960, 40, 960, 1])
        );
    }

    /// cuDNN checks each operation when it is finalized (needs libcudnn 9.13+, not a GPU).
    #[test]
    fn the_operation_is_a_valid_cudnn_descriptor() {
        let shape = SdpaShape::packed(2, 10, 1024, 1024, 64);
        let (ops, parts) = forward(shape, false).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!((ops.len(), parts.len()), (1, 5));
        let (ops, parts) = forward(shape, true).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!((ops.len(), parts.len()), (1, 6));
        // q, k and v slices of one fused projection: rows three widths apart
        let fused = SdpaShape {
            q_row: 3 * 640,
            kv_row: 3 * 640,
            ..shape
        };
        let (ops, parts) = forward(fused, false).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!((ops.len(), parts.len()), (1, 5));
    }

    /// The backward's operations form a graph cuDNN takes, for self- and cross-attention
    /// shapes (SD1.5's 64² self-attention and its 77-token cross-attention, SDXL's head size).
    /// Whether an engine runs it is known only on a GPU: the `grad` stage of
    /// `benches/gpu_run.sh`.
    #[test]
    fn the_backward_graph_is_one_cudnn_takes() {
        let graph = |ops: Vec<Descriptor>| -> Result<Descriptor> {
            let graph = Descriptor::new(Kind::CUDNN_BACKEND_OPERATIONGRAPH_DESCRIPTOR)?;
            graph.set_descriptors(
                Attr::CUDNN_ATTR_OPERATIONGRAPH_OPS,
                &ops.iter().collect::<Vec<_>>(),
            )?;
            graph.finalize()
        };
        for (heads, queries, keys, head_dim) in
            [(8, 4096, 4096, 40), (8, 4096, 77, 40), (10, 1024, 77, 64)]
        {
            let shape = SdpaShape::packed(2, heads, queries, keys, head_dim);
            let (training, _parts) = forward(shape, true).unwrap();
            graph(training).unwrap_or_else(|e| panic!("the training forward, {shape:?}: {e}"));
            let (ops, _parts) = backward(shape).unwrap_or_else(|e| panic!("{shape:?}: {e}"));
            assert_eq!(ops.len(), 18);
            graph(ops).unwrap_or_else(|e| panic!("the backward, {shape:?}: {e}"));
        }
    }
}
