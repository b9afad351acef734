//! Linear layers through cuBLASLt, the bias in the matrix product's epilogue.

use std::cell::RefCell;
use std::collections::HashMap;
use std::rc::Rc;

use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::cudarc;
use candle_core::cuda_backend::{CudaDevice, DeviceId};
use candle_core::{CudaStorage, DType, Layout, Result, Shape, Tensor};
use cudarc::driver::DeviceRepr;
use half::{bf16, f16};

use super::memory::with_workspace;
use super::{applies, cuda_op};

/// `x · wᵀ + bias (+ residual)` (torch's `F.linear`, then a residual add where `residual` is
/// given) through cuBLASLt with the bias added in the matrix product's epilogue and the
/// residual read as its `C` operand (`D = A·B + C + bias`), as PyTorch does for the bias and
/// inductor for the add: candle multiplies through the older cuBLAS API and adds a bias with a
/// separate broadcast kernel. `x` is `[.., K]`, `w` `[N, K]`, `bias` `[N]`, `residual` the
/// output's shape; fp16 and bf16 (fp32 stays on candle's exact path). The descriptors and the
/// algorithm are made once per shape.
pub fn linear(
    x: &Tensor,
    w: &Tensor,
    bias: Option<&Tensor>,
    residual: Option<&Tensor>,
) -> Result<Option<Tensor>> {
    let dtype = x.dtype();
    let fits = matches!(dtype, DType::F16 | DType::BF16)
        && w.dtype() == dtype
        && w.rank() == 2
        && x.rank() >= 2
        && x.dim(candle_core::D::Minus1)? == w.dim(1)?
        && bias.is_none_or(|b| b.dtype() == dtype && b.dims() == [w.dim(0).unwrap_or(0)]);
    let tracked = [Some(w), bias, residual]
        .into_iter()
        .flatten()
        .any(|t| t.track_op());
    if !applies(x) || tracked || !fits {
        return Ok(None);
    }
    if let Some(r) = residual {
        let mut out = x.dims().to_vec();
        *out.last_mut().expect("rank >= 2") = w.dim(0)?;
        if r.dtype() != dtype || r.dims() != out.as_slice() {
            return Ok(None);
        }
    }
    let (x, w) = (x.contiguous()?, w.contiguous()?);
    let bias = bias.map(|b| b.contiguous()).transpose()?;
    let residual = residual.map(|r| r.contiguous()).transpose()?;
    // cuBLASLt's algorithms may assume 256-byte aligned operands.
    let aligned = |t: &Tensor| t.layout().start_offset().is_multiple_of(128);
    if ![Some(&x), Some(&w), bias.as_ref(), residual.as_ref()]
        .into_iter()
        .flatten()
        .all(aligned)
    {
        return Ok(None);
    }
    let op = LtLinear { residual };
    match &bias {
        Some(b) => x.apply_op3_no_bwd(&w, b, &op).map(Some),
        None => x.apply_op2_no_bwd(&w, &op).map(Some),
    }
}

struct LtLinear {
    /// Added to the product (cuBLASLt's `C`, `beta` 1): contiguous, the output's shape.
    residual: Option<Tensor>,
}

/// A matrix product's dtype, rows, output and input features, and whether it adds a bias.
type LinearKey = (DeviceId, DType, usize, usize, usize, bool);

/// cuBLASLt's descriptors and chosen algorithm for one [`LinearKey`], made once.
struct LinearPlan {
    desc: cudarc::cublaslt::sys::cublasLtMatmulDesc_t,
    layouts: [cudarc::cublaslt::sys::cublasLtMatrixLayout_t; 3],
    algo: cudarc::cublaslt::sys::cublasLtMatmulAlgo_t,
    workspace: usize,
}

impl Drop for LinearPlan {
    fn drop(&mut self) {
        use cudarc::cublaslt::result;
        // SAFETY: made by `LinearPlan::new`, destroyed once here.
        unsafe {
            let _ = result::destroy_matmul_desc(self.desc);
            for layout in self.layouts {
                let _ = result::destroy_matrix_layout(layout);
            }
        }
    }
}

/// cuBLASLt's scratch limit (NVIDIA's recommendation for Hopper).
const LT_WORKSPACE: usize = 32 << 20;

thread_local! {
    static LT_HANDLES: RefCell<HashMap<DeviceId, cudarc::cublaslt::sys::cublasLtHandle_t>> =
        RefCell::new(HashMap::new());
    static LINEAR_PLANS: RefCell<HashMap<LinearKey, Rc<LinearPlan>>> =
        RefCell::new(HashMap::new());
}

impl LinearPlan {
    /// Row-major `y[m, n] = x[m, k] · w[n, k]ᵀ` is column-major `yᵀ = w · xᵀ`: A = w read
    /// transposed (ld k), B = xᵀ (ld k), D = yᵀ (ld n); the bias runs along D's rows.
    fn new(
        lt: cudarc::cublaslt::sys::cublasLtHandle_t,
        dtype: DType,
        (m, n, k): (usize, usize, usize),
        with_bias: bool,
    ) -> std::result::Result<Self, cudarc::cublaslt::result::CublasError> {
        use cudarc::cublaslt::{result, sys};
        let ty = match dtype {
            DType::BF16 => sys::cudaDataType_t::CUDA_R_16BF,
            _ => sys::cudaDataType_t::CUDA_R_16F,
        };
        let desc = result::create_matmul_desc(
            sys::cublasComputeType_t::CUBLAS_COMPUTE_32F,
            sys::cudaDataType_t::CUDA_R_32F,
        )?;
        let layouts = [
            result::create_matrix_layout(ty, k as u64, n as u64, k as i64)?,
            result::create_matrix_layout(ty, k as u64, m as u64, k as i64)?,
            result::create_matrix_layout(ty, n as u64, m as u64, n as i64)?,
        ];
        let mut plan = Self {
            desc,
            layouts,
            // SAFETY: plain data, overwritten by the heuristic's choice below.
            algo: unsafe { std::mem::zeroed() },
            workspace: 0,
        };
        let set = |attr, value: &[u8]| {
            // SAFETY: `value` is the attribute's type, as bytes.
            unsafe {
                result::set_matmul_desc_attribute(desc, attr, value.as_ptr().cast(), value.len())
            }
        };
        use sys::cublasLtMatmulDescAttributes_t as Attr;
        set(Attr::CUBLASLT_MATMUL_DESC_TRANSA, &1i32.to_ne_bytes())?;
        set(Attr::CUBLASLT_MATMUL_DESC_TRANSB, &0i32.to_ne_bytes())?;
        let epilogue = if with_bias {
            sys::cublasLtEpilogue_t::CUBLASLT_EPILOGUE_BIAS
        } else {
            sys::cublasLtEpilogue_t::CUBLASLT_EPILOGUE_DEFAULT
        };
        set(
            Attr::CUBLASLT_MATMUL_DESC_EPILOGUE,
            &(epilogue as u32).to_ne_bytes(),
        )?;
        if with_bias {
            // The heuristic wants a bias pointer set; the real one is set before each call.
            set(
                Attr::CUBLASLT_MATMUL_DESC_BIAS_POINTER,
                &(256 as cudarc::driver::sys::CUdeviceptr).to_ne_bytes(),
            )?;
        }
        let pref = result::create_matmul_pref()?;
        // SAFETY: the preference lives until destroyed below; all descriptors are valid.
        let heuristic = unsafe {
            let limit = LT_WORKSPACE;
            result::set_matmul_pref_attribute(
                pref,
                sys::cublasLtMatmulPreferenceAttributes_t::CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES,
                (&limit as *const usize).cast(),
                std::mem::size_of::<usize>(),
            )
            .and_then(|_| {
                result::get_matmul_algo_heuristic(
                    lt, desc, layouts[0], layouts[1], layouts[2], layouts[2], pref,
                )
            })
        };
        // SAFETY: made above.
        let _ = unsafe { result::destroy_matmul_pref(pref) };
        let heuristic = heuristic?;
        plan.algo = heuristic.algo;
        plan.workspace = heuristic.workspaceSize;
        Ok(plan)
    }
}

fn lt_handle(dev: &CudaDevice) -> Result<cudarc::cublaslt::sys::cublasLtHandle_t> {
    LT_HANDLES.with(|map| {
        if let Some(handle) = map.borrow().get(&dev.id()) {
            return Ok(*handle);
        }
        // Kept for the thread's life, like candle's own cuBLAS handle.
        let handle = cudarc::cublaslt::result::create_handle().map_err(candle_core::Error::wrap)?;
        map.borrow_mut().insert(dev.id(), handle);
        Ok(handle)
    })
}

impl LtLinear {
    fn run(
        &self,
        x: (&CudaStorage, &Layout),
        w: (&CudaStorage, &Layout),
        bias: Option<(&CudaStorage, &Layout)>,
    ) -> Result<(CudaStorage, Shape)> {
        let (x, xl) = x;
        let (w, wl) = w;
        let dtype = x.dtype();
        let (n, k) = wl.shape().dims2()?;
        let m = xl.shape().elem_count() / k;
        let mut out_dims = xl.dims().to_vec();
        *out_dims.last_mut().expect("rank >= 2") = n;
        let dev = x.device().clone();
        let key = (dev.id(), dtype, m, n, k, bias.is_some());
        let plan = match LINEAR_PLANS.with(|p| p.borrow().get(&key).cloned()) {
            Some(plan) => plan,
            None => {
                let plan = LinearPlan::new(lt_handle(&dev)?, dtype, (m, n, k), bias.is_some())
                    .map_err(|e| {
                        candle_core::Error::Msg(format!("cuBLASLt linear {key:?}: {e:?}"))
                    })?;
                tracing::debug!(?key, workspace = plan.workspace, "cuBLASLt linear plan");
                let plan = Rc::new(plan);
                LINEAR_PLANS.with(|p| p.borrow_mut().insert(key, plan.clone()));
                plan
            }
        };
        match dtype {
            DType::F16 => self.launch::<f16>(&dev, &plan, (x, xl), (w, wl), bias, m * n),
            DType::BF16 => self.launch::<bf16>(&dev, &plan, (x, xl), (w, wl), bias, m * n),
            other => candle_core::bail!("linear: no {other:?} support"),
        }
        .map(|y| (y, Shape::from(out_dims)))
    }

    fn launch<T: DeviceRepr + candle_core::cuda_backend::CudaDType>(
        &self,
        dev: &CudaDevice,
        plan: &LinearPlan,
        (x, xl): (&CudaStorage, &Layout),
        (w, wl): (&CudaStorage, &Layout),
        bias: Option<(&CudaStorage, &Layout)>,
        len: usize,
    ) -> Result<CudaStorage> {
        use cudarc::cublaslt::{result, sys};
        use cudarc::driver::{DevicePtr, DevicePtrMut};
        let lt = lt_handle(dev)?;
        let stream = dev.cuda_stream();
        let xs = x.as_cuda_slice::<T>()?.slice(xl.start_offset()..);
        let ws = w.as_cuda_slice::<T>()?.slice(wl.start_offset()..);
        // SAFETY: the product writes every element.
        let mut y = unsafe { dev.alloc::<T>(len)? };
        let bs = match bias {
            Some((b, bl)) => Some(b.as_cuda_slice::<T>()?.slice(bl.start_offset()..)),
            None => None,
        };
        let residual_storage = self.residual.as_ref().map(|r| r.storage_and_layout());
        let residual = match &residual_storage {
            Some((storage, layout)) => {
                let candle_core::Storage::Cuda(storage) = &**storage else {
                    candle_core::bail!("linear: the residual is not on the GPU")
                };
                Some(storage.as_cuda_slice::<T>()?.slice(layout.start_offset()..))
            }
            None => None,
        };
        let (alpha, beta) = (1f32, if residual.is_some() { 1f32 } else { 0f32 });
        with_workspace(dev, plan.workspace, |scratch| {
            let (x_ptr, _x_guard) = xs.device_ptr(&stream);
            let (w_ptr, _w_guard) = ws.device_ptr(&stream);
            let (y_ptr, _y_guard) = y.device_ptr_mut(&stream);
            let bias_guard = bs.as_ref().map(|b| b.device_ptr(&stream));
            let residual_guard = residual.as_ref().map(|r| r.device_ptr(&stream));
            let (scratch_ptr, _scratch_guard, scratch_len) = match scratch {
                Some(s) => {
                    let len = s.len();
                    let (ptr, guard) = s.device_ptr_mut(&stream);
                    (ptr, Some(guard), len)
                }
                None => (0, None, 0),
            };
            // SAFETY: the plan's layouts describe these contiguous buffers (x [m, k], w [n, k],
            // y and the residual [m, n]); the bias pointer is set on this thread's plan just
            // before its use.
            unsafe {
                if let Some((bias_ptr, _)) = &bias_guard {
                    result::set_matmul_desc_attribute(
                        plan.desc,
                        sys::cublasLtMatmulDescAttributes_t::CUBLASLT_MATMUL_DESC_BIAS_POINTER,
                        (bias_ptr as *const cudarc::driver::sys::CUdeviceptr).cast(),
                        std::mem::size_of::<cudarc::driver::sys::CUdeviceptr>(),
                    )
                    .map_err(candle_core::Error::wrap)?;
                }
                let [a_layout, b_layout, d_layout] = plan.layouts;
                result::matmul(
                    lt,
                    plan.desc,
                    (&alpha as *const f32).cast(),
                    (&beta as *const f32).cast(),
                    w_ptr as *const _,
                    a_layout,
                    x_ptr as *const _,
                    b_layout,
                    residual_guard.as_ref().map_or(y_ptr, |(r, _)| *r) as *const _,
                    d_layout,
                    y_ptr as *mut _,
                    d_layout,
                    &plan.algo,
                    scratch_ptr as *mut _,
                    scratch_len,
                    stream.cu_stream() as *mut _,
                )
                .map_err(candle_core::Error::wrap)
            }
        })?;
        Ok(CudaStorage::wrap_cuda_slice(y, dev.clone()))
    }
}

cuda_op!(LtLinear, "linear", run(x, w, bias?) []);
