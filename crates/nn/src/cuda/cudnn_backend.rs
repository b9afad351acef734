//! cuDNN's backend (graph) API, what every graph here shares: descriptors, a handle per device
//! on candle's stream, tensors, and the execution plan of the first engine cuDNN's heuristics
//! rank that builds, as cudnn-frontend picks one without autotuning. The graphs themselves:
//! [`super::cudnn_graph`] (convolution + bias) and [`super::cudnn_attention`] (scaled
//! dot-product attention).

use std::cell::RefCell;
use std::collections::HashMap;
use std::ffi::c_void;
use std::rc::Rc;

use crate::switch::Switch;
use candle_core::cuda_backend::cudarc;
use candle_core::cuda_backend::{CudaDevice, DeviceId, WrapErr};
use candle_core::Result;
pub(super) use cudarc::cudnn::sys::{
    self, cudnnBackendAttributeName_t as Attr, cudnnBackendAttributeType_t as Type,
    cudnnBackendDescriptorType_t as Kind, cudnnDataType_t,
};

/// `SDKUBE_CUDNN_GRAPH` (on by default): convolutions ([`super::cudnn_graph`]) and attention
/// ([`super::cudnn_attention`]) may go through cuDNN's graph API where, for that shape, it gives
/// the values of the other path and is faster ([`super::choice`]). On one H100 it was faster
/// at every UNet and VAE convolution shape, images within 2 levels (README).
pub(crate) static GRAPH_API: Switch = Switch::new("SDKUBE_CUDNN_GRAPH", "on", "off", true);

/// The byte alignment every operand's address must have: what the plans are built for.
pub(super) const ALIGNMENT: usize = 16;

thread_local! {
    // Like the legacy convolution's handles: one per device per thread, on candle's stream.
    static HANDLES: RefCell<HashMap<DeviceId, Rc<Handle>>> = RefCell::new(HashMap::new());
}

/// A built execution plan and everything it was built from, kept alive with it. (Fields drop
/// in this order: the plan, what it was built from, then the handle.)
pub(super) struct Plan {
    plan: Descriptor,
    _parts: Vec<Descriptor>,
    handle: Rc<Handle>,
    /// The scratch bytes the plan needs.
    pub workspace: usize,
}

impl Plan {
    /// Runs the plan on candle's stream with the operands `ids` at `pointers`.
    ///
    /// # Safety
    /// Each pointer must be what the graph's tensor of that id describes: device memory of its
    /// type, shape and alignment, or host memory for a by-value tensor; `workspace` at least
    /// [`Plan::workspace`] bytes of device memory (null where that is 0).
    pub(super) unsafe fn execute(
        &self,
        ids: &[i64],
        pointers: &[*mut c_void],
        workspace: *mut c_void,
    ) -> Result<()> {
        let pack = Descriptor::new(Kind::CUDNN_BACKEND_VARIANT_PACK_DESCRIPTOR)?;
        pack.set_i64s(Attr::CUDNN_ATTR_VARIANT_PACK_UNIQUE_IDS, ids)?;
        // SAFETY: addresses, the type the attributes take.
        unsafe {
            pack.set(
                Attr::CUDNN_ATTR_VARIANT_PACK_DATA_POINTERS,
                Type::CUDNN_TYPE_VOID_PTR,
                pointers,
            )?;
            pack.set(
                Attr::CUDNN_ATTR_VARIANT_PACK_WORKSPACE,
                Type::CUDNN_TYPE_VOID_PTR,
                &[workspace],
            )?;
        }
        let pack = pack.finalize()?;
        // SAFETY: the caller vouches for the memory; the plan and the pack are finalized.
        check(
            unsafe { sys::cudnnBackendExecute(self.handle.0, self.plan.0, pack.0) },
            "execute",
        )
    }
}

/// The plan for the graph of `ops` (`parts`: the descriptors they reference) on `dev`: the
/// first engine of cuDNN's heuristic ranking, then of its fallback list (as cudnn-frontend
/// does), that builds and fits in `workspace_limit` bytes; where `exact`, also one that keeps
/// the inputs' precision and fp32 reductions ([`lossy_note`]).
pub(super) fn build_plan(
    dev: &CudaDevice,
    ops: Vec<Descriptor>,
    mut parts: Vec<Descriptor>,
    exact: bool,
    workspace_limit: usize,
) -> Result<Plan> {
    let handle = handle(dev)?;
    let graph = Descriptor::new(Kind::CUDNN_BACKEND_OPERATIONGRAPH_DESCRIPTOR)?;
    graph.set_handle(Attr::CUDNN_ATTR_OPERATIONGRAPH_HANDLE, &handle)?;
    graph.set_descriptors(
        Attr::CUDNN_ATTR_OPERATIONGRAPH_OPS,
        &ops.iter().collect::<Vec<_>>(),
    )?;
    let graph = graph.finalize()?;

    parts.extend(ops);
    parts.push(graph);
    let graph = parts.last().expect("just pushed");
    let mut refused = Vec::new();
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
            if exact {
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
            }
            let plan = Descriptor::new(Kind::CUDNN_BACKEND_EXECUTION_PLAN_DESCRIPTOR)?;
            plan.set_handle(Attr::CUDNN_ATTR_EXECUTION_PLAN_HANDLE, &handle)?;
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
            return Ok(Plan {
                plan,
                _parts: parts,
                handle,
                workspace,
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

/// A finalized tensor descriptor: `dims` with `strides` (elements), `id` in the variant pack;
/// a virtual one (an inner edge of the graph, never in memory) where `is_virtual`.
pub(super) fn tensor(
    id: i64,
    dtype: cudnnDataType_t,
    dims: [usize; 4],
    strides: [i64; 4],
    is_virtual: bool,
) -> Result<Descriptor> {
    tensor_with(id, dtype, dims, strides, |t| {
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
        Ok(())
    })
}

/// A finalized fp32 scalar passed by value (the variant pack points at host memory).
pub(super) fn scalar_by_value(id: i64) -> Result<Descriptor> {
    tensor_with(id, cudnnDataType_t::CUDNN_DATA_FLOAT, [1; 4], [1; 4], |t| {
        // SAFETY: cuDNN's boolean is a C `bool`.
        unsafe {
            t.set(
                Attr::CUDNN_ATTR_TENSOR_IS_BY_VALUE,
                Type::CUDNN_TYPE_BOOLEAN,
                &[true],
            )
        }
    })
}

fn tensor_with(
    id: i64,
    dtype: cudnnDataType_t,
    dims: [usize; 4],
    strides: [i64; 4],
    more: impl FnOnce(&Descriptor) -> Result<()>,
) -> Result<Descriptor> {
    let t = Descriptor::new(Kind::CUDNN_BACKEND_TENSOR_DESCRIPTOR)?;
    t.set_enum(Attr::CUDNN_ATTR_TENSOR_DATA_TYPE, dtype)?;
    t.set_i64s(Attr::CUDNN_ATTR_TENSOR_DIMENSIONS, &dims.map(|d| d as i64))?;
    t.set_i64s(Attr::CUDNN_ATTR_TENSOR_STRIDES, &strides)?;
    t.set_i64s(Attr::CUDNN_ATTR_TENSOR_UNIQUE_ID, &[id])?;
    t.set_i64s(Attr::CUDNN_ATTR_TENSOR_BYTE_ALIGNMENT, &[ALIGNMENT as i64])?;
    more(&t)?;
    t.finalize()
}

/// A cuDNN handle of our own for the graph API (the legacy path's keeps its raw handle
/// private), bound to candle's stream.
pub(super) struct Handle(sys::cudnnHandle_t);

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
pub(super) trait BackendEnum: Copy {
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

impl BackendEnum for sys::cudnnReduceTensorOp_t {
    const TYPE: Type = Type::CUDNN_TYPE_REDUCTION_OPERATOR_TYPE;
}

impl BackendEnum for sys::cudnnBackendHeurMode_t {
    const TYPE: Type = Type::CUDNN_TYPE_HEUR_MODE;
}

/// One backend descriptor, destroyed with it.
pub(super) struct Descriptor(sys::cudnnBackendDescriptor_t);

impl Drop for Descriptor {
    fn drop(&mut self) {
        // SAFETY: created by `new` and destroyed once, here.
        let _ = unsafe { sys::cudnnBackendDestroyDescriptor(self.0) };
    }
}

pub(super) fn check(status: sys::cudnnStatus_t, what: &str) -> Result<()> {
    status
        .result()
        .map_err(|e| candle_core::Error::Msg(format!("cuDNN graph API, {what}: {e}")))
}

impl Descriptor {
    pub(super) fn new(kind: Kind) -> Result<Self> {
        let mut raw = std::ptr::null_mut();
        // SAFETY: writes one descriptor handle into `raw`.
        check(
            unsafe { sys::cudnnBackendCreateDescriptor(kind, &mut raw) },
            "create",
        )?;
        Ok(Self(raw))
    }

    pub(super) fn finalize(self) -> Result<Self> {
        // SAFETY: a live descriptor.
        check(unsafe { sys::cudnnBackendFinalize(self.0) }, "finalize")?;
        Ok(self)
    }

    /// Sets `attr` to `values`.
    ///
    /// # Safety
    /// `V` must be the C type that `ty` names.
    pub(super) unsafe fn set<V>(&self, attr: Attr, ty: Type, values: &[V]) -> Result<()> {
        let n = values.len() as i64;
        // SAFETY: `values` holds `n` elements of the type `ty` names (the caller's promise).
        let status =
            unsafe { sys::cudnnBackendSetAttribute(self.0, attr, ty, n, values.as_ptr().cast()) };
        check(status, &format!("{attr:?}"))
    }

    pub(super) fn set_i64s(&self, attr: Attr, values: &[i64]) -> Result<()> {
        // SAFETY: int64_t.
        unsafe { self.set(attr, Type::CUDNN_TYPE_INT64, values) }
    }

    pub(super) fn set_f32(&self, attr: Attr, value: f32) -> Result<()> {
        // SAFETY: float.
        unsafe { self.set(attr, Type::CUDNN_TYPE_FLOAT, &[value]) }
    }

    pub(super) fn set_enum<E: BackendEnum>(&self, attr: Attr, value: E) -> Result<()> {
        // SAFETY: the C enum that `E::TYPE` names.
        unsafe { self.set(attr, E::TYPE, &[value]) }
    }

    pub(super) fn set_handle(&self, attr: Attr, handle: &Handle) -> Result<()> {
        // SAFETY: cudnnHandle_t.
        unsafe { self.set(attr, Type::CUDNN_TYPE_HANDLE, &[handle.0]) }
    }

    pub(super) fn set_descriptors(&self, attr: Attr, values: &[&Descriptor]) -> Result<()> {
        let raw: Vec<_> = values.iter().map(|d| d.0).collect();
        // SAFETY: cudnnBackendDescriptor_t.
        unsafe { self.set(attr, Type::CUDNN_TYPE_BACKEND_DESCRIPTOR, &raw) }
    }

    /// Reads up to `out.len()` values of `attr` into `out` (none: only counts them); how many
    /// `attr` has.
    ///
    /// # Safety
    /// `V` must be the C type that `ty` names.
    pub(super) unsafe fn get<V>(&self, attr: Attr, ty: Type, out: &mut [V]) -> Result<usize> {
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

    pub(super) fn i64(&self, attr: Attr) -> Result<i64> {
        let mut value = [0i64];
        // SAFETY: int64_t.
        unsafe { self.get(attr, Type::CUDNN_TYPE_INT64, &mut value)? };
        Ok(value[0])
    }

    /// The descriptors `attr` lists (each made here as a `kind`, then filled by cuDNN).
    pub(super) fn descriptors(&self, attr: Attr, kind: Kind) -> Result<Vec<Descriptor>> {
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
