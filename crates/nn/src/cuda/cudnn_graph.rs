//! The forward convolution through cuDNN's graph (backend) API: the convolution, with its bias
//! added in the same kernel where an engine can, as one operation graph; cuDNN's heuristics
//! rank the engines that can run it and the first that builds is kept, as PyTorch does through
//! cudnn-frontend without `cudnn.benchmark`. The legacy `cudnnConvolutionForward` reaches a
//! subset of those engines through its eight algorithms, and always adds the bias separately.
//!
//! fp16 and fp32 operands, fp32 accumulation (fp32 may use TF32 tensor cores, as the legacy
//! path and PyTorch's convolutions do). Used where `SDKUBE_CUDNN_GRAPH=on` and, per shape,
//! [`super::conv`] found it as exact as the legacy path and faster.

use std::cell::RefCell;
use std::collections::HashMap;
use std::ffi::c_void;
use std::rc::Rc;

use candle_core::cuda_backend::cudarc;
use candle_core::cuda_backend::{CudaDevice, DeviceId, WrapErr};
use candle_core::Result;
use cudarc::cudnn::sys::{
    self, cudnnBackendAttributeName_t as Attr, cudnnBackendAttributeType_t as Type,
    cudnnBackendDescriptorType_t as Kind, cudnnDataType_t,
};
use cudarc::driver::{CudaSlice, CudaView, DevicePtr, DevicePtrMut};

/// The byte alignment every operand's address must have: what the plans are built for.
pub(super) const ALIGNMENT: usize = 16;

/// The operands' ids in the graph and the variant pack.
const X: i64 = 1;
const W: i64 = 2;
const Y: i64 = 3;
const BIAS: i64 = 4;
/// The convolution's fp32 output before the bias, never in memory (a fused graph's inner edge).
const CONV_OUT: i64 = 5;

/// A convolution's shapes as the graph takes them: NCHW dimensions of `x` and `w` (`[K, C, R,
/// S]`), padding, stride, whether the memory is channels-last (NHWC, KRSC, NKHW otherwise), and
/// the operands' element type (half or float).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub(super) struct GraphConvShape {
    pub dtype: cudnnDataType_t,
    pub x: [usize; 4],
    pub w: [usize; 4],
    pub padding: usize,
    pub stride: usize,
    pub channels_last: bool,
}

impl GraphConvShape {
    fn y(&self) -> [usize; 4] {
        let out = |i: usize, k: usize| (i + 2 * self.padding - k) / self.stride + 1;
        [
            self.x[0],
            self.w[0],
            out(self.x[2], self.w[2]),
            out(self.x[3], self.w[3]),
        ]
    }

    /// The strides of a `[N, C, H, W]` operand in this shape's memory layout.
    fn strides(&self, [_, c, h, w]: [usize; 4]) -> [i64; 4] {
        let s = if self.channels_last {
            [h * w * c, 1, w * c, c]
        } else {
            [c * h * w, h * w, w, 1]
        };
        s.map(|v| v as i64)
    }
}

/// A built execution plan and everything it was built from, kept alive with it. (Fields drop
/// in this order: the plan, what it was built from, then the handle.)
pub(super) struct GraphConvPlan {
    plan: Descriptor,
    _parts: Vec<Descriptor>,
    handle: Rc<Handle>,
    workspace: usize,
    /// Whether the plan adds the bias (else the caller does).
    pub fused_bias: bool,
}

thread_local! {
    // Like the legacy path's handles: one per device per thread, on candle's stream.
    static HANDLES: RefCell<HashMap<DeviceId, Rc<Handle>>> = RefCell::new(HashMap::new());
    static PLANS: RefCell<HashMap<(DeviceId, GraphConvShape, bool), Rc<GraphConvPlan>>> =
        RefCell::new(HashMap::new());
}

/// The plan for this shape (with the bias fused where `with_bias` and an engine can), built
/// the first time on this thread; an error where no engine within `workspace_limit` builds.
pub(super) fn plan(
    dev: &CudaDevice,
    shape: GraphConvShape,
    with_bias: bool,
    workspace_limit: usize,
) -> Result<Rc<GraphConvPlan>> {
    let key = (dev.id(), shape, with_bias);
    if let Some(plan) = PLANS.with(|p| p.borrow().get(&key).cloned()) {
        return Ok(plan);
    }
    let handle = handle(dev)?;
    // Engines compiled at run time (fused ones) compile when their plan is built: the time is
    // logged, as it adds to a model's warm-up.
    let start = std::time::Instant::now();
    let fused = with_bias
        .then(|| build(&handle, shape, true, workspace_limit))
        .and_then(|fused| {
            fused
                .map_err(|e| tracing::debug!(?shape, "no fused conv + bias engine: {e}"))
                .ok()
        });
    let plan = Rc::new(match fused {
        Some(plan) => plan,
        None => build(&handle, shape, false, workspace_limit)?,
    });
    tracing::debug!(
        ?shape,
        fused_bias = plan.fused_bias,
        workspace = plan.workspace,
        built_in = ?start.elapsed(),
        "cuDNN graph convolution plan"
    );
    PLANS.with(|p| p.borrow_mut().insert(key, plan.clone()));
    Ok(plan)
}

impl GraphConvPlan {
    /// Runs the plan: `y = conv(x, w) (+ bias where fused)`, on candle's stream.
    ///
    /// # Safety
    /// The buffers must be of the plan's element type (its shape's `dtype`), its shape's
    /// operands in its layout, each at an address aligned to [`ALIGNMENT`].
    pub(super) unsafe fn execute<T>(
        &self,
        dev: &CudaDevice,
        x: &CudaView<T>,
        w: &CudaView<T>,
        bias: Option<&CudaView<T>>,
        y: &mut CudaSlice<T>,
        workspace: Option<&mut CudaSlice<u8>>,
    ) -> Result<()> {
        let stream = dev.cuda_stream();
        let (x_ptr, _x) = x.device_ptr(&stream);
        let (w_ptr, _w) = w.device_ptr(&stream);
        let (y_ptr, _y) = y.device_ptr_mut(&stream);
        let bias = bias
            .filter(|_| self.fused_bias)
            .map(|b| b.device_ptr(&stream));
        let scratch = match workspace {
            Some(s) if self.workspace > 0 => {
                let (ptr, guard) = s.device_ptr_mut(&stream);
                Some((ptr, guard))
            }
            _ => None,
        };
        if self.fused_bias != bias.is_some() || (self.workspace > 0) != scratch.is_some() {
            candle_core::bail!("cuDNN graph convolution: the plan's operands are missing")
        }
        let mut ids = vec![X, W, Y];
        let mut ptrs = vec![x_ptr as *mut c_void, w_ptr as _, y_ptr as _];
        if let Some((b, _)) = &bias {
            ids.push(BIAS);
            ptrs.push(*b as _);
        }
        let pack = Descriptor::new(Kind::CUDNN_BACKEND_VARIANT_PACK_DESCRIPTOR)?;
        pack.set_i64s(Attr::CUDNN_ATTR_VARIANT_PACK_UNIQUE_IDS, &ids)?;
        // SAFETY: device addresses, the type the attribute takes.
        unsafe {
            pack.set(
                Attr::CUDNN_ATTR_VARIANT_PACK_DATA_POINTERS,
                Type::CUDNN_TYPE_VOID_PTR,
                &ptrs,
            )?;
            let scratch = scratch
                .as_ref()
                .map_or(std::ptr::null_mut(), |(p, _)| *p as *mut c_void);
            pack.set(
                Attr::CUDNN_ATTR_VARIANT_PACK_WORKSPACE,
                Type::CUDNN_TYPE_VOID_PTR,
                &[scratch],
            )?;
        }
        let pack = pack.finalize()?;
        // SAFETY: the caller vouches for the buffers; the plan and the pack are finalized.
        check(
            unsafe { sys::cudnnBackendExecute(self.handle.0, self.plan.0, pack.0) },
            "execute",
        )
    }

    /// The scratch bytes the plan needs.
    pub(super) fn workspace(&self) -> usize {
        self.workspace
    }
}

/// The operations of the graph for `shape`, in order (the convolution, then the bias add where
/// `with_bias`), and the descriptors they reference.
fn operations(
    shape: GraphConvShape,
    with_bias: bool,
) -> Result<(Vec<Descriptor>, Vec<Descriptor>)> {
    use cudnnDataType_t::CUDNN_DATA_FLOAT;
    let (y_dims, dtype) = (shape.y(), shape.dtype);
    let x = tensor(X, dtype, shape.x, shape.strides(shape.x), false)?;
    let w = tensor(W, dtype, shape.w, shape.strides(shape.w), false)?;
    let y = tensor(Y, dtype, y_dims, shape.strides(y_dims), false)?;

    let conv = Descriptor::new(Kind::CUDNN_BACKEND_CONVOLUTION_DESCRIPTOR)?;
    let (p, s) = (shape.padding as i64, shape.stride as i64);
    conv.set_i64s(Attr::CUDNN_ATTR_CONVOLUTION_SPATIAL_DIMS, &[2])?;
    conv.set_enum(Attr::CUDNN_ATTR_CONVOLUTION_COMP_TYPE, CUDNN_DATA_FLOAT)?;
    conv.set_enum(
        Attr::CUDNN_ATTR_CONVOLUTION_CONV_MODE,
        sys::cudnnConvolutionMode_t::CUDNN_CROSS_CORRELATION,
    )?;
    conv.set_i64s(Attr::CUDNN_ATTR_CONVOLUTION_DILATIONS, &[1, 1])?;
    conv.set_i64s(Attr::CUDNN_ATTR_CONVOLUTION_FILTER_STRIDES, &[s, s])?;
    conv.set_i64s(Attr::CUDNN_ATTR_CONVOLUTION_PRE_PADDINGS, &[p, p])?;
    conv.set_i64s(Attr::CUDNN_ATTR_CONVOLUTION_POST_PADDINGS, &[p, p])?;
    let conv = conv.finalize()?;

    // The convolution writes y, or an fp32 virtual tensor the bias add reads.
    let conv_out = with_bias
        .then(|| {
            tensor(
                CONV_OUT,
                CUDNN_DATA_FLOAT,
                y_dims,
                shape.strides(y_dims),
                true,
            )
        })
        .transpose()?;
    let forward = Descriptor::new(Kind::CUDNN_BACKEND_OPERATION_CONVOLUTION_FORWARD_DESCRIPTOR)?;
    forward.set_descriptors(Attr::CUDNN_ATTR_OPERATION_CONVOLUTION_FORWARD_X, &[&x])?;
    forward.set_descriptors(Attr::CUDNN_ATTR_OPERATION_CONVOLUTION_FORWARD_W, &[&w])?;
    let forward_y = conv_out.as_ref().unwrap_or(&y);
    forward.set_descriptors(
        Attr::CUDNN_ATTR_OPERATION_CONVOLUTION_FORWARD_Y,
        &[forward_y],
    )?;
    forward.set_descriptors(
        Attr::CUDNN_ATTR_OPERATION_CONVOLUTION_FORWARD_CONV_DESC,
        &[&conv],
    )?;
    forward.set_f32(Attr::CUDNN_ATTR_OPERATION_CONVOLUTION_FORWARD_ALPHA, 1.0)?;
    forward.set_f32(Attr::CUDNN_ATTR_OPERATION_CONVOLUTION_FORWARD_BETA, 0.0)?;
    let forward = forward.finalize()?;
    let bias_add = match &conv_out {
        Some(conv_out) => Some(bias_add(shape, conv_out, &y)?),
        None => None,
    };
    let mut parts = vec![x, w, y, conv];
    parts.extend(conv_out);
    Ok(match bias_add {
        Some((op, inputs)) => {
            parts.extend(inputs);
            (vec![forward, op], parts)
        }
        None => (vec![forward], parts),
    })
}

/// The graph for `shape` (see [`operations`]) and the first engine of cuDNN's heuristic ranking
/// that builds for it, keeps fp32 accumulation and fits in `workspace_limit` bytes.
fn build(
    handle: &Rc<Handle>,
    shape: GraphConvShape,
    with_bias: bool,
    workspace_limit: usize,
) -> Result<GraphConvPlan> {
    let (ops, mut parts) = operations(shape, with_bias)?;
    let graph = Descriptor::new(Kind::CUDNN_BACKEND_OPERATIONGRAPH_DESCRIPTOR)?;
    graph.set_handle(Attr::CUDNN_ATTR_OPERATIONGRAPH_HANDLE, handle)?;
    graph.set_descriptors(
        Attr::CUDNN_ATTR_OPERATIONGRAPH_OPS,
        &ops.iter().collect::<Vec<_>>(),
    )?;
    let graph = graph.finalize()?;

    parts.extend(ops);
    parts.push(graph);
    let graph = parts.last().expect("just pushed");
    let mut refused = Vec::new();
    // The ranked engines first, then cuDNN's fallback list (as cudnn-frontend does).
    for mode in [
        sys::cudnnBackendHeurMode_t::CUDNN_HEUR_MODE_A,
        sys::cudnnBackendHeurMode_t::CUDNN_HEUR_MODE_FALLBACK,
    ] {
        let configs = match engine_configs(graph, mode) {
            Ok(configs) => configs,
            Err(e) => {
                refused.push(format!("{mode:?}: {e}"));
                continue;
            }
        };
        for config in configs {
            match lossy_note(&config) {
                Ok(None) => {}
                Ok(Some(note)) => {
                    refused.push(format!("{note:?}"));
                    continue;
                }
                Err(e) => {
                    refused.push(e.to_string());
                    continue;
                }
            }
            let plan = Descriptor::new(Kind::CUDNN_BACKEND_EXECUTION_PLAN_DESCRIPTOR)?;
            plan.set_handle(Attr::CUDNN_ATTR_EXECUTION_PLAN_HANDLE, handle)?;
            plan.set_descriptors(Attr::CUDNN_ATTR_EXECUTION_PLAN_ENGINE_CONFIG, &[&config])?;
            let plan = match plan.finalize() {
                Ok(plan) => plan,
                Err(e) => {
                    refused.push(e.to_string());
                    continue;
                }
            };
            let workspace = plan.i64(Attr::CUDNN_ATTR_EXECUTION_PLAN_WORKSPACE_SIZE)? as usize;
            if workspace > workspace_limit {
                refused.push(format!("workspace {workspace}"));
                continue;
            }
            parts.push(config);
            parts.reverse(); // dropped after the plan, each before what it references
            return Ok(GraphConvPlan {
                plan,
                _parts: parts,
                handle: handle.clone(),
                workspace,
                fused_bias: with_bias,
            });
        }
    }
    candle_core::bail!("cuDNN has no engine for this graph (refused: {refused:?})")
}

/// The engine configurations cuDNN's heuristics in `mode` propose for `graph`, best first.
fn engine_configs(
    graph: &Descriptor,
    mode: sys::cudnnBackendHeurMode_t,
) -> Result<Vec<Descriptor>> {
    let heuristics = Descriptor::new(Kind::CUDNN_BACKEND_ENGINEHEUR_DESCRIPTOR)?;
    heuristics.set_descriptors(Attr::CUDNN_ATTR_ENGINEHEUR_OPERATION_GRAPH, &[graph])?;
    heuristics.set_enum(Attr::CUDNN_ATTR_ENGINEHEUR_MODE, mode)?;
    heuristics.finalize()?.descriptors(
        Attr::CUDNN_ATTR_ENGINEHEUR_RESULTS,
        Kind::CUDNN_BACKEND_ENGINECFG_DESCRIPTOR,
    )
}

/// The pointwise operation `y = conv_out + bias` (bias `[1, K, 1, 1]`, broadcast over the
/// rest), with the descriptors it holds.
fn bias_add(
    shape: GraphConvShape,
    conv_out: &Descriptor,
    y: &Descriptor,
) -> Result<(Descriptor, [Descriptor; 2])> {
    use cudnnDataType_t::CUDNN_DATA_FLOAT;
    let k = shape.w[0];
    let bias = tensor(
        BIAS,
        shape.dtype,
        [1, k, 1, 1],
        shape.strides([1, k, 1, 1]),
        false,
    )?;
    let add = Descriptor::new(Kind::CUDNN_BACKEND_POINTWISE_DESCRIPTOR)?;
    add.set_enum(
        Attr::CUDNN_ATTR_POINTWISE_MODE,
        sys::cudnnPointwiseMode_t::CUDNN_POINTWISE_ADD,
    )?;
    add.set_enum(Attr::CUDNN_ATTR_POINTWISE_MATH_PREC, CUDNN_DATA_FLOAT)?;
    let add = add.finalize()?;
    let op = Descriptor::new(Kind::CUDNN_BACKEND_OPERATION_POINTWISE_DESCRIPTOR)?;
    op.set_descriptors(Attr::CUDNN_ATTR_OPERATION_POINTWISE_PW_DESCRIPTOR, &[&add])?;
    op.set_descriptors(Attr::CUDNN_ATTR_OPERATION_POINTWISE_XDESC, &[conv_out])?;
    op.set_descriptors(Attr::CUDNN_ATTR_OPERATION_POINTWISE_BDESC, &[&bias])?;
    op.set_descriptors(Attr::CUDNN_ATTR_OPERATION_POINTWISE_YDESC, &[y])?;
    Ok((op.finalize()?, [bias, add]))
}

/// A numerical note of the engine behind `config` that would change the results against the
/// legacy path (inputs rounded down, reductions below fp32), if it has one.
fn lossy_note(config: &Descriptor) -> Result<Option<sys::cudnnBackendNumericalNote_t>> {
    use sys::cudnnBackendNumericalNote_t::{
        CUDNN_NUMERICAL_NOTE_DOWN_CONVERT_INPUTS, CUDNN_NUMERICAL_NOTE_REDUCED_PRECISION_REDUCTION,
        CUDNN_NUMERICAL_NOTE_TYPE_COUNT,
    };
    let engine = Descriptor::new(Kind::CUDNN_BACKEND_ENGINE_DESCRIPTOR)?;
    // SAFETY: cudnnBackendDescriptor_t, filling the descriptor made above.
    unsafe {
        config.get(
            Attr::CUDNN_ATTR_ENGINECFG_ENGINE,
            Type::CUDNN_TYPE_BACKEND_DESCRIPTOR,
            &mut [engine.0],
        )?
    };
    let mut notes = [CUDNN_NUMERICAL_NOTE_TYPE_COUNT; CUDNN_NUMERICAL_NOTE_TYPE_COUNT as usize];
    // SAFETY: cudnnBackendNumericalNote_t, a C enum.
    let count = unsafe {
        engine.get(
            Attr::CUDNN_ATTR_ENGINE_NUMERICAL_NOTE,
            Type::CUDNN_TYPE_NUMERICAL_NOTE,
            &mut notes,
        )?
    }
    .min(notes.len());
    Ok(notes[..count].iter().copied().find(|n| {
        matches!(
            n,
            CUDNN_NUMERICAL_NOTE_DOWN_CONVERT_INPUTS
                | CUDNN_NUMERICAL_NOTE_REDUCED_PRECISION_REDUCTION
        )
    }))
}

/// A finalized tensor descriptor.
fn tensor(
    id: i64,
    dtype: cudnnDataType_t,
    dims: [usize; 4],
    strides: [i64; 4],
    is_virtual: bool,
) -> Result<Descriptor> {
    let t = Descriptor::new(Kind::CUDNN_BACKEND_TENSOR_DESCRIPTOR)?;
    t.set_enum(Attr::CUDNN_ATTR_TENSOR_DATA_TYPE, dtype)?;
    t.set_i64s(Attr::CUDNN_ATTR_TENSOR_DIMENSIONS, &dims.map(|d| d as i64))?;
    t.set_i64s(Attr::CUDNN_ATTR_TENSOR_STRIDES, &strides)?;
    t.set_i64s(Attr::CUDNN_ATTR_TENSOR_UNIQUE_ID, &[id])?;
    t.set_i64s(Attr::CUDNN_ATTR_TENSOR_BYTE_ALIGNMENT, &[ALIGNMENT as i64])?;
    if is_virtual {
        // SAFETY: cuDNN's boolean is a C `bool`.
        unsafe {
            t.set(
                Attr::CUDNN_ATTR_TENSOR_IS_VIRTUAL,
                Type::CUDNN_TYPE_BOOLEAN,
                &[true],
            )?
        };
    }
    t.finalize()
}

/// A cuDNN handle of our own for the graph API (the legacy path's keeps its raw handle
/// private), bound to candle's stream.
struct Handle(sys::cudnnHandle_t);

impl Drop for Handle {
    fn drop(&mut self) {
        // SAFETY: made by `handle` below and destroyed once, here.
        let _ = unsafe { cudarc::cudnn::result::destroy_handle(self.0) };
    }
}

fn handle(dev: &CudaDevice) -> Result<Rc<Handle>> {
    HANDLES.with(|map| {
        if let Some(handle) = map.borrow().get(&dev.id()) {
            return Ok(handle.clone());
        }
        let stream = dev.cuda_stream();
        stream.context().bind_to_thread().w()?;
        let e = candle_core::Error::wrap;
        let handle = Handle(cudarc::cudnn::result::create_handle().map_err(e)?);
        // SAFETY: a live handle and candle's live stream (kept by the device).
        unsafe { cudarc::cudnn::result::set_stream(handle.0, stream.cu_stream() as _) }
            .map_err(e)?;
        let handle = Rc::new(handle);
        map.borrow_mut().insert(dev.id(), handle.clone());
        Ok(handle)
    })
}

/// The C enums backend attributes take, each with the attribute type that names it.
trait BackendEnum: Copy {
    const TYPE: Type;
}

impl BackendEnum for cudnnDataType_t {
    const TYPE: Type = Type::CUDNN_TYPE_DATA_TYPE;
}

impl BackendEnum for sys::cudnnConvolutionMode_t {
    const TYPE: Type = Type::CUDNN_TYPE_CONVOLUTION_MODE;
}

impl BackendEnum for sys::cudnnPointwiseMode_t {
    const TYPE: Type = Type::CUDNN_TYPE_POINTWISE_MODE;
}

impl BackendEnum for sys::cudnnBackendHeurMode_t {
    const TYPE: Type = Type::CUDNN_TYPE_HEUR_MODE;
}

/// One backend descriptor, destroyed with it.
struct Descriptor(sys::cudnnBackendDescriptor_t);

impl Drop for Descriptor {
    fn drop(&mut self) {
        // SAFETY: created by `new` and destroyed once, here.
        let _ = unsafe { sys::cudnnBackendDestroyDescriptor(self.0) };
    }
}

fn check(status: sys::cudnnStatus_t, what: &str) -> Result<()> {
    status
        .result()
        .map_err(|e| candle_core::Error::Msg(format!("cuDNN graph API, {what}: {e}")))
}

impl Descriptor {
    fn new(kind: Kind) -> Result<Self> {
        let mut raw = std::ptr::null_mut();
        // SAFETY: writes one descriptor handle into `raw`.
        check(
            unsafe { sys::cudnnBackendCreateDescriptor(kind, &mut raw) },
            "create",
        )?;
        Ok(Self(raw))
    }

    fn finalize(self) -> Result<Self> {
        // SAFETY: a live descriptor.
        check(unsafe { sys::cudnnBackendFinalize(self.0) }, "finalize")?;
        Ok(self)
    }

    /// Sets `attr` to `values`.
    ///
    /// # Safety
    /// `V` must be the C type that `ty` names.
    unsafe fn set<V>(&self, attr: Attr, ty: Type, values: &[V]) -> Result<()> {
        let n = values.len() as i64;
        // SAFETY: `values` holds `n` elements of the type `ty` names (the caller's promise).
        let status =
            unsafe { sys::cudnnBackendSetAttribute(self.0, attr, ty, n, values.as_ptr().cast()) };
        check(status, &format!("{attr:?}"))
    }

    fn set_i64s(&self, attr: Attr, values: &[i64]) -> Result<()> {
        // SAFETY: int64_t.
        unsafe { self.set(attr, Type::CUDNN_TYPE_INT64, values) }
    }

    fn set_f32(&self, attr: Attr, value: f32) -> Result<()> {
        // SAFETY: float.
        unsafe { self.set(attr, Type::CUDNN_TYPE_FLOAT, &[value]) }
    }

    fn set_enum<E: BackendEnum>(&self, attr: Attr, value: E) -> Result<()> {
        // SAFETY: the C enum that `E::TYPE` names.
        unsafe { self.set(attr, E::TYPE, &[value]) }
    }

    fn set_handle(&self, attr: Attr, handle: &Handle) -> Result<()> {
        // SAFETY: cudnnHandle_t.
        unsafe { self.set(attr, Type::CUDNN_TYPE_HANDLE, &[handle.0]) }
    }

    fn set_descriptors(&self, attr: Attr, values: &[&Descriptor]) -> Result<()> {
        let raw: Vec<_> = values.iter().map(|d| d.0).collect();
        // SAFETY: cudnnBackendDescriptor_t.
        unsafe { self.set(attr, Type::CUDNN_TYPE_BACKEND_DESCRIPTOR, &raw) }
    }

    /// Reads up to `out.len()` values of `attr` into `out` (none: only counts them); how many
    /// `attr` has.
    ///
    /// # Safety
    /// `V` must be the C type that `ty` names.
    unsafe fn get<V>(&self, attr: Attr, ty: Type, out: &mut [V]) -> Result<usize> {
        let mut count = 0i64;
        let array = match out.is_empty() {
            true => std::ptr::null_mut(),
            false => out.as_mut_ptr().cast(),
        };
        // SAFETY: writes at most `out.len()` elements of the type `ty` names (the caller's
        // promise) into `out`.
        let status = unsafe {
            sys::cudnnBackendGetAttribute(self.0, attr, ty, out.len() as i64, &mut count, array)
        };
        check(status, &format!("{attr:?}"))?;
        Ok(count.max(0) as usize)
    }

    fn i64(&self, attr: Attr) -> Result<i64> {
        let mut value = [0i64];
        // SAFETY: int64_t.
        unsafe { self.get(attr, Type::CUDNN_TYPE_INT64, &mut value)? };
        Ok(value[0])
    }

    /// The descriptors `attr` lists (each made here as a `kind`, then filled by cuDNN).
    fn descriptors(&self, attr: Attr, kind: Kind) -> Result<Vec<Descriptor>> {
        let ty = Type::CUDNN_TYPE_BACKEND_DESCRIPTOR;
        // SAFETY: counts only.
        let count = unsafe { self.get::<sys::cudnnBackendDescriptor_t>(attr, ty, &mut [])? };
        let mut made = (0..count)
            .map(|_| Descriptor::new(kind))
            .collect::<Result<Vec<_>>>()?;
        let mut raw: Vec<_> = made.iter().map(|d| d.0).collect();
        // SAFETY: cudnnBackendDescriptor_t, filling the descriptors made above.
        let filled = unsafe { self.get(attr, ty, &mut raw)? };
        made.truncate(filled);
        Ok(made)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shapes_describe_the_memory_of_each_layout() {
        // SD1.5's first down-sampling convolution: 320 channels, 64² → 32², stride 2.
        let mut shape = GraphConvShape {
            dtype: cudnnDataType_t::CUDNN_DATA_HALF,
            x: [2, 320, 64, 64],
            w: [320, 320, 3, 3],
            padding: 1,
            stride: 2,
            channels_last: true,
        };
        assert_eq!(shape.y(), [2, 320, 32, 32]);
        // NHWC: channels adjacent, then columns, rows, samples.
        assert_eq!(shape.strides(shape.x), [64 * 64 * 320, 1, 64 * 320, 320]);
        // KRSC filters.
        assert_eq!(shape.strides(shape.w), [9 * 320, 1, 3 * 320, 320]);
        shape.channels_last = false;
        assert_eq!(shape.strides(shape.x), [320 * 64 * 64, 64 * 64, 64, 1]);
        assert_eq!(shape.strides([1, 320, 1, 1]), [320, 1, 1, 1]);
        // A 1×1 projection keeps the size; a 3×3 without padding loses a border.
        shape.w = [640, 320, 1, 1];
        shape.padding = 0;
        shape.stride = 1;
        assert_eq!(shape.y(), [2, 640, 64, 64]);
        shape.w = [4, 320, 3, 3];
        assert_eq!(shape.y(), [2, 4, 62, 62]);
    }

    /// cuDNN checks each descriptor when it is finalized: the operations finalize for both
    /// layouts and element types, with and without the fused bias. (Needs libcudnn, not a GPU: only the graph and
    /// its engines need a handle.)
    #[test]
    fn the_operations_are_valid_cudnn_descriptors() {
        use cudnnDataType_t::{CUDNN_DATA_FLOAT, CUDNN_DATA_HALF};
        let layouts = [
            (true, CUDNN_DATA_HALF),
            (false, CUDNN_DATA_HALF),
            (false, CUDNN_DATA_FLOAT),
        ];
        for (channels_last, dtype) in layouts {
            for with_bias in [true, false] {
                let shape = GraphConvShape {
                    dtype,
                    x: [2, 320, 64, 64],
                    w: [640, 320, 3, 3],
                    padding: 1,
                    stride: 2,
                    channels_last,
                };
                let (ops, parts) = operations(shape, with_bias).unwrap_or_else(|e| {
                    panic!("channels_last {channels_last}, {dtype:?}, bias {with_bias}: {e}")
                });
                assert_eq!(ops.len(), 1 + with_bias as usize);
                assert_eq!(parts.len(), 4 + 3 * with_bias as usize);
            }
        }
        // cuDNN does check: a filter over 321 channels does not fit a 320-channel input.
        let wrong = GraphConvShape {
            dtype: cudnnDataType_t::CUDNN_DATA_HALF,
            x: [2, 320, 64, 64],
            w: [640, 321, 3, 3],
            padding: 1,
            stride: 1,
            channels_last: true,
        };
        let error = operations(wrong, false).err().expect("refused");
        assert!(error.to_string().contains("cuDNN graph API"), "{error}");
    }
}
