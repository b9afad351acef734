//! The GPU path's own kernels, where candle 0.11's are slow (issue 9's per-op profile):
//! convolution through cuDNN with its plan made once per shape and one reused workspace, linear
//! layers through cuBLASLt with the bias in the epilogue, flash attention, group norm (+ SiLU)
//! in two fused passes, a bias add, the GEGLU gate and nearest ×2 upsampling
//! (`src/kernels.cu`); and the memory pool's high-water marks for benchmarks.
//!
//! The GPU build links libcudnn (9.x), as candle's `cudnn` feature would: the CUDA cuDNN
//! runtime image has it, and so does PyTorch's `nvidia-cudnn-cu13` wheel.
//!
//! Each entry point returns `None` where it does not apply (not on CUDA, a dtype or shape it
//! does not cover, gradients being tracked: none of these has a backward pass) and the caller
//! runs candle's op instead. `SDKUBE_GPU_KERNELS=candle` turns them all off, for A/B runs.
//! None of this is compiled without feature `cuda`; its checks run on the device
//! (`benches/gpu_run.sh`: stages `check` and `ops`), as CI has no GPU.

use std::any::Any;
use std::cell::RefCell;
use std::collections::HashMap;
use std::rc::Rc;
use std::sync::{Arc, OnceLock};

use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::cudarc;
use candle_core::cuda_backend::{CudaDevice, DeviceId, WrapErr};
use candle_core::{
    CpuStorage, CudaStorage, CustomOp2, CustomOp3, DType, Layout, Result, Shape, Tensor,
};
use cudarc::cudnn::{ConvForward, Cudnn, CudnnDataType};
use cudarc::driver::{CudaSlice, CudaView, DeviceRepr, LaunchConfig, PushKernelArg};
use half::{bf16, f16};

const PTX: &str = include_str!(concat!(env!("OUT_DIR"), "/kernels.ptx"));
const MODULE: &str = "sdkube_kernels";

/// Whether our kernels run at all: `SDKUBE_GPU_KERNELS=candle` turns them off (A/B runs).
fn enabled() -> bool {
    static ON: OnceLock<bool> = OnceLock::new();
    *ON.get_or_init(|| std::env::var("SDKUBE_GPU_KERNELS").as_deref() != Ok("candle"))
}

fn applies(t: &Tensor) -> bool {
    enabled() && t.device().is_cuda() && !t.track_op()
}

fn cpu_only(name: &str) -> Result<(CpuStorage, Shape)> {
    candle_core::bail!("{name} runs only on CUDA tensors")
}

/// Candle's custom ops have a fixed number of operands: an op with an optional bias is a
/// `CustomOp2` without it and a `CustomOp3` with it, both calling `$method(x, w, bias)`.
macro_rules! optional_bias_op {
    ($op:ty, $name:literal, $method:ident) => {
        impl CustomOp2 for $op {
            fn name(&self) -> &'static str {
                $name
            }

            fn cpu_fwd(
                &self,
                _: &CpuStorage,
                _: &Layout,
                _: &CpuStorage,
                _: &Layout,
            ) -> Result<(CpuStorage, Shape)> {
                cpu_only($name)
            }

            fn cuda_fwd(
                &self,
                x: &CudaStorage,
                xl: &Layout,
                w: &CudaStorage,
                wl: &Layout,
            ) -> Result<(CudaStorage, Shape)> {
                self.$method((x, xl), (w, wl), None)
            }
        }

        impl CustomOp3 for $op {
            fn name(&self) -> &'static str {
                concat!($name, "-bias")
            }

            fn cpu_fwd(
                &self,
                _: &CpuStorage,
                _: &Layout,
                _: &CpuStorage,
                _: &Layout,
                _: &CpuStorage,
                _: &Layout,
            ) -> Result<(CpuStorage, Shape)> {
                cpu_only($name)
            }

            fn cuda_fwd(
                &self,
                x: &CudaStorage,
                xl: &Layout,
                w: &CudaStorage,
                wl: &Layout,
                b: &CudaStorage,
                bl: &Layout,
            ) -> Result<(CudaStorage, Shape)> {
                self.$method((x, xl), (w, wl), Some((b, bl)))
            }
        }
    };
}

/// A one-operand op that runs only on CUDA, in fp16 or fp32: `$op::run::<T>(x, layout)` does
/// the work for each.
macro_rules! cuda_op1 {
    ($op:ty, $name:literal) => {
        impl candle_core::CustomOp1 for $op {
            fn name(&self) -> &'static str {
                $name
            }

            fn cpu_fwd(&self, _: &CpuStorage, _: &Layout) -> Result<(CpuStorage, Shape)> {
                cpu_only(self.name())
            }

            fn cuda_fwd(&self, x: &CudaStorage, xl: &Layout) -> Result<(CudaStorage, Shape)> {
                match x.dtype() {
                    DType::F16 => self.run::<f16>(x, xl),
                    DType::F32 => self.run::<f32>(x, xl),
                    dtype => candle_core::bail!("{}: no {dtype:?} support", $name),
                }
            }
        }
    };
}

// ---------------------------------------------------------------------------------------------
// Convolution

/// 2-D convolution (groups 1, dilation 1; the bias, if any, added in place by our kernel)
/// through cuDNN, where cuDNN is the faster
/// of the two for this shape: the first convolution of each small shape times cuDNN and
/// candle's kernel (three calls each) and remembers the winner, as
/// `torch.backends.cudnn.benchmark` does. Feature maps above [`TIMED_UP_TO`] pixels always go
/// to cuDNN: it won there by 3–18× at every shape measured, and timing candle's im2col there
/// would allocate gigabytes (2.4 GB for the VAE's 1024² stage) just to lose.
pub fn conv2d(
    x: &Tensor,
    w: &Tensor,
    bias: Option<&Tensor>,
    padding: usize,
    stride: usize,
) -> Result<Option<Tensor>> {
    let dtype_ok = matches!(x.dtype(), DType::F16 | DType::F32);
    if !applies(x) || !dtype_ok || w.dtype() != x.dtype() || x.rank() != 4 || w.rank() != 4 {
        return Ok(None);
    }
    let bias_ok = |b: &Tensor| b.dtype() == x.dtype() && !b.track_op() && b.dims() == [w.dims()[0]];
    if bias.is_some_and(|b| !bias_ok(b)) {
        return Ok(None);
    }
    let candle_core::Device::Cuda(dev) = x.device() else {
        return Ok(None);
    };
    let (x, w) = (x.contiguous()?, w.contiguous()?);
    let op = CudnnConv { padding, stride };
    let use_cudnn = x.dim(2)? * x.dim(3)? > TIMED_UP_TO || {
        let key = op.key(dev, x.dtype(), x.dims(), w.dims());
        match CHOICE.with(|c| c.borrow().get(&key).copied()) {
            Some(choice) => choice,
            None => {
                let choice = cudnn_is_faster(&x, &w, &op)?;
                CHOICE.with(|c| c.borrow_mut().insert(key, choice));
                choice
            }
        }
    };
    match (use_cudnn, bias) {
        (false, _) => Ok(None),
        (true, None) => x.apply_op2_no_bwd(&w, &op).map(Some),
        (true, Some(b)) => x.apply_op3_no_bwd(&w, &b.contiguous()?, &op).map(Some),
    }
}

/// [`conv2d`] always through cuDNN (for benchmarks).
pub fn conv2d_cudnn(
    x: &Tensor,
    w: &Tensor,
    bias: &Tensor,
    padding: usize,
    stride: usize,
) -> Result<Tensor> {
    let (x, w) = (x.contiguous()?, w.contiguous()?);
    x.apply_op3_no_bwd(&w, &bias.contiguous()?, &CudnnConv { padding, stride })
}

/// Input pixels (H·W) up to which [`conv2d`] times cuDNN against candle (32²: the largest UNet
/// feature map where candle came within 2× of cuDNN).
const TIMED_UP_TO: usize = 32 * 32;

fn cudnn_is_faster(x: &Tensor, w: &Tensor, op: &CudnnConv) -> Result<bool> {
    let time = |f: &dyn Fn() -> Result<Tensor>| -> Result<std::time::Duration> {
        f()?;
        x.device().synchronize()?;
        let start = std::time::Instant::now();
        for _ in 0..3 {
            f()?;
        }
        x.device().synchronize()?;
        Ok(start.elapsed())
    };
    let cudnn = time(&|| x.apply_op2_no_bwd(w, op))?;
    let candle = time(&|| x.conv2d(w, op.padding, op.stride, 1, 1))?;
    tracing::debug!(x = ?x.dims(), w = ?w.dims(), ?cudnn, ?candle, "convolution: cuDNN or candle");
    Ok(cudnn <= candle)
}

struct CudnnConv {
    padding: usize,
    stride: usize,
}

/// A convolution's device, dtype, input and filter shapes, padding and stride.
type ConvKey = (DeviceId, DType, [usize; 9]);

/// cuDNN's descriptors, algorithm and workspace size for one [`ConvKey`], made once.
struct ConvPlan<T: CudnnDataType> {
    conv: cudarc::cudnn::ConvDescriptor<f32>,
    x: cudarc::cudnn::TensorDescriptor<T>,
    w: cudarc::cudnn::FilterDescriptor<T>,
    y: cudarc::cudnn::TensorDescriptor<T>,
    algo: cudarc::cudnn::sys::cudnnConvolutionFwdAlgo_t,
    workspace: usize,
}

thread_local! {
    // cuDNN handles are neither Send nor Sync: one per device per thread, bound to candle's
    // stream, so work stays ordered with candle's own kernels.
    static CUDNN: RefCell<HashMap<DeviceId, Arc<Cudnn>>> = RefCell::new(HashMap::new());
    static CHOICE: RefCell<HashMap<ConvKey, bool>> = RefCell::new(HashMap::new());
    static PLANS: RefCell<HashMap<ConvKey, Rc<dyn Any>>> = RefCell::new(HashMap::new());
    // One scratch buffer per device for cuDNN and cuBLASLt, grown to the largest need up to
    // [`KEPT_WORKSPACE`] seen: every use is on the one stream, so uses never overlap.
    static WORKSPACE: RefCell<HashMap<DeviceId, CudaSlice<u8>>> = RefCell::new(HashMap::new());
}

/// The plan cached in `cache` under `key`, made by `make` the first time on this thread.
fn cached_plan<P: 'static>(
    cache: &'static std::thread::LocalKey<RefCell<HashMap<ConvKey, Rc<dyn Any>>>>,
    key: ConvKey,
    make: impl FnOnce() -> Result<P>,
) -> Result<Rc<P>> {
    let cached = cache.with(|m| m.borrow().get(&key).cloned());
    if let Some(plan) = cached.and_then(|p| p.downcast::<P>().ok()) {
        return Ok(plan);
    }
    let plan = Rc::new(make()?);
    cache.with(|m| m.borrow_mut().insert(key, plan.clone()));
    Ok(plan)
}

/// The largest scratch buffer kept between calls. Bigger needs (the VAE's 1024² convolutions
/// want about a gigabyte) take a buffer from the memory pool for the one call and give it back
/// after, as torch does with every workspace: kept, it would sit unused under every later step.
const KEPT_WORKSPACE: usize = 64 << 20;

/// Runs `f` with scratch space of at least `need` bytes (`None` when no scratch is needed).
fn with_workspace<R>(
    dev: &CudaDevice,
    need: usize,
    f: impl FnOnce(Option<&mut CudaSlice<u8>>) -> Result<R>,
) -> Result<R> {
    if need > KEPT_WORKSPACE {
        // SAFETY: scratch space, never read before it is written. Freed in stream order, so
        // the pool hands it out again only after this call's kernels.
        let mut scratch = unsafe { dev.alloc::<u8>(need)? };
        return f(Some(&mut scratch));
    }
    WORKSPACE.with(|map| {
        let mut map = map.borrow_mut();
        if need > 0 && map.get(&dev.id()).is_none_or(|ws| ws.len() < need) {
            map.remove(&dev.id()); // free the old buffer before taking the bigger one
                                   // SAFETY: scratch space, never read before it is written.
            map.insert(dev.id(), unsafe { dev.alloc::<u8>(need)? });
        }
        f(map.get_mut(&dev.id()).filter(|_| need > 0))
    })
}

fn cudnn_handle(dev: &CudaDevice) -> Result<Arc<Cudnn>> {
    CUDNN.with(|map| {
        if let Some(handle) = map.borrow().get(&dev.id()) {
            return Ok(handle.clone());
        }
        let handle = Cudnn::new(dev.cuda_stream()).map_err(candle_core::Error::wrap)?;
        map.borrow_mut().insert(dev.id(), handle.clone());
        Ok(handle)
    })
}

impl CudnnConv {
    fn key(&self, dev: &CudaDevice, dtype: DType, x: &[usize], w: &[usize]) -> ConvKey {
        let (p, s) = (self.padding, self.stride);
        (
            dev.id(),
            dtype,
            [x[0], x[1], x[2], x[3], w[0], w[2], w[3], p, s],
        )
    }

    fn out_size(&self, input: usize, kernel: usize) -> usize {
        (input + 2 * self.padding - kernel) / self.stride + 1
    }

    /// cuDNN's descriptors of this convolution (`x` NCHW, `w` KCRS): the convolution, `x`,
    /// `w` and `y`.
    #[allow(clippy::type_complexity)]
    fn descriptors<T: CudnnDataType>(
        &self,
        dev: &CudaDevice,
        dtype: DType,
        x: &[usize],
        w: &[usize],
    ) -> Result<(
        cudarc::cudnn::ConvDescriptor<f32>,
        cudarc::cudnn::TensorDescriptor<T>,
        cudarc::cudnn::FilterDescriptor<T>,
        cudarc::cudnn::TensorDescriptor<T>,
    )> {
        use cudarc::cudnn::sys::{
            cudnnConvolutionMode_t::CUDNN_CROSS_CORRELATION, cudnnMathType_t,
            cudnnTensorFormat_t::CUDNN_TENSOR_NCHW,
        };
        let cudnn = cudnn_handle(dev)?;
        let e = candle_core::Error::wrap;
        let (p, st) = (self.padding as i32, self.stride as i32);
        // fp16/bf16 accumulate in fp32 (as PyTorch does) on tensor cores; fp32 may use TF32
        // tensor cores, as PyTorch's convolutions do by default (`cudnn.allow_tf32`): the restore
        // networks, which run in fp32, went 1.4-1.7x faster on the H200; SD in fp32 on the GPU
        // moved from 0.000 to 0.004 8-bit levels (mean) off the CPU image.
        let mut conv = cudnn
            .create_conv2d::<f32>([p, p], [st, st], [1, 1], CUDNN_CROSS_CORRELATION)
            .map_err(e)?;
        let math = if dtype == DType::F32 {
            cudnnMathType_t::CUDNN_DEFAULT_MATH
        } else {
            cudnnMathType_t::CUDNN_TENSOR_OP_MATH
        };
        conv.set_math_type(math).map_err(e)?;
        let dims = |d: [usize; 4]| d.map(|v| v as i32);
        let (ho, wo) = (self.out_size(x[2], w[2]), self.out_size(x[3], w[3]));
        let xd = cudnn
            .create_4d_tensor::<T>(CUDNN_TENSOR_NCHW, dims([x[0], x[1], x[2], x[3]]))
            .map_err(e)?;
        let wd = cudnn
            .create_4d_filter::<T>(CUDNN_TENSOR_NCHW, dims([w[0], w[1], w[2], w[3]]))
            .map_err(e)?;
        let yd = cudnn
            .create_4d_tensor::<T>(CUDNN_TENSOR_NCHW, dims([x[0], w[0], ho, wo]))
            .map_err(e)?;
        Ok((conv, xd, wd, yd))
    }

    /// The plan for this shape; the first time, made and its algorithm chosen by timing on
    /// these buffers (`y` is overwritten).
    fn plan<T>(
        &self,
        dev: &CudaDevice,
        dtype: DType,
        (x, xs): (&[usize], &CudaView<T>),
        (w, ws): (&[usize], &CudaView<T>),
        y: &mut CudaSlice<T>,
    ) -> Result<Rc<ConvPlan<T>>>
    where
        T: CudnnDataType + DeviceRepr + num_one::One + 'static,
    {
        let key = self.key(dev, dtype, x, w);
        cached_plan(&PLANS, key, || {
            self.make_plan(dev, dtype, (x, xs), (w, ws), y)
        })
    }

    fn make_plan<T>(
        &self,
        dev: &CudaDevice,
        dtype: DType,
        (x, xs): (&[usize], &CudaView<T>),
        (w, ws): (&[usize], &CudaView<T>),
        y: &mut CudaSlice<T>,
    ) -> Result<ConvPlan<T>>
    where
        T: CudnnDataType + DeviceRepr + num_one::One + 'static,
    {
        let e = candle_core::Error::wrap;
        let (conv, xd, wd, yd) = self.descriptors::<T>(dev, dtype, x, w)?;
        let forward = ConvForward {
            conv: &conv,
            x: &xd,
            w: &wd,
            y: &yd,
        };
        let (algo, workspace) = if benchmark_algorithms() {
            fastest_algorithm(dev, &forward, xs, ws, y)?
        } else {
            let algo = forward.pick_algorithm().map_err(e)?;
            (algo, forward.get_workspace_size(algo).map_err(e)?)
        };
        let (padding, stride) = (self.padding, self.stride);
        tracing::debug!(
            ?x,
            ?w,
            padding,
            stride,
            ?dtype,
            ?algo,
            workspace,
            "cuDNN convolution plan"
        );
        Ok(ConvPlan {
            conv,
            x: xd,
            w: wd,
            y: yd,
            algo,
            workspace,
        })
    }

    fn run<T>(
        &self,
        (x, xl): (&CudaStorage, &Layout),
        (w, wl): (&CudaStorage, &Layout),
        bias: Option<(&CudaStorage, &Layout)>,
    ) -> Result<(CudaStorage, Shape)>
    where
        T: CudnnDataType
            + DeviceRepr
            + candle_core::cuda_backend::CudaDType
            + num_one::One
            + 'static,
    {
        let (n, c, h, wd) = xl.shape().dims4()?;
        let (k, c2, r, s) = wl.shape().dims4()?;
        if c != c2 || h + 2 * self.padding < r || wd + 2 * self.padding < s {
            candle_core::bail!(
                "conv2d: input {:?} does not fit filter {:?}",
                xl.shape(),
                wl.shape()
            )
        }
        let (ho, wo) = (self.out_size(h, r), self.out_size(wd, s));
        let dev = x.device().clone();
        let xs = x.as_cuda_slice::<T>()?.slice(xl.start_offset()..);
        let ws = w.as_cuda_slice::<T>()?.slice(wl.start_offset()..);
        // SAFETY: cuDNN writes every element.
        let mut y = unsafe { dev.alloc::<T>(n * k * ho * wo)? };
        let plan = self.plan::<T>(&dev, x.dtype(), (xl.dims(), &xs), (wl.dims(), &ws), &mut y)?;
        let forward = ConvForward {
            conv: &plan.conv,
            x: &plan.x,
            w: &plan.w,
            y: &plan.y,
        };
        with_workspace(&dev, plan.workspace, |workspace| {
            // SAFETY: the plan's descriptors describe exactly these buffers (contiguous NCHW).
            let scale = (T::one(), T::zero());
            unsafe { forward.launch(plan.algo, workspace, scale, &xs, &ws, &mut y) }
                .map_err(candle_core::Error::wrap)
        })?;
        if let Some((b, bl)) = bias {
            // In place: no second output-sized buffer (512 MB at the VAE's 1024² stage).
            let bs = b.as_cuda_slice::<T>()?.slice(bl.start_offset()..);
            launch_add_bias(&dev, x.dtype(), &y.slice(..), &bs, &y, ho * wo, k)?;
        }
        let out = CudaStorage::wrap_cuda_slice(y, dev);
        Ok((out, Shape::from((n, k, ho, wo))))
    }
}

/// `SDKUBE_CUDNN=benchmark`: time cuDNN's algorithms per shape ([`fastest_algorithm`]) instead
/// of taking its heuristic first pick, like `torch.backends.cudnn.benchmark`. Off by default, as
/// in PyTorch: in one H200 call the heuristic was as fast for SDXL and the VAE and 14 % faster
/// for SD1.5 end to end (timing three back-to-back runs with the input hot in L2 favours
/// algorithms that lose inside the network).
fn benchmark_algorithms() -> bool {
    static ON: OnceLock<bool> = OnceLock::new();
    *ON.get_or_init(|| std::env::var("SDKUBE_CUDNN").as_deref() == Ok("benchmark"))
}

/// The largest scratch a convolution algorithm may use: 256 MiB, or as much as its input and
/// output take where that is more. cuDNN's fast algorithms on NCHW half tensors want about that
/// (they transpose both); capping them at 256 MiB left the VAE's 1024² stages on an algorithm
/// twenty times slower.
fn workspace_limit(x_elems: usize, y_elems: usize, elem_bytes: usize) -> usize {
    ((x_elems + y_elems) * elem_bytes + (16 << 20)).max(256 << 20)
}

/// The fastest of cuDNN's algorithms for one convolution and its workspace size, each timed on
/// the real buffers (one warm-up, then three runs, between CUDA events), as
/// `torch.backends.cudnn.benchmark` does.
fn fastest_algorithm<T>(
    dev: &CudaDevice,
    forward: &ConvForward<T, f32, T>,
    xs: &CudaView<T>,
    ws: &CudaView<T>,
    y: &mut CudaSlice<T>,
) -> Result<(cudarc::cudnn::sys::cudnnConvolutionFwdAlgo_t, usize)>
where
    T: CudnnDataType + DeviceRepr + num_one::One,
{
    use cudarc::cudnn::sys::cudnnConvolutionFwdAlgo_t as Algo;
    use cudarc::driver::sys::CUevent_flags::CU_EVENT_DEFAULT;
    let stream = dev.cuda_stream();
    let limit = workspace_limit(xs.len(), y.len(), std::mem::size_of::<T>());
    let mut best: Option<(f32, Algo, usize)> = None;
    for algo in [
        Algo::CUDNN_CONVOLUTION_FWD_ALGO_IMPLICIT_GEMM,
        Algo::CUDNN_CONVOLUTION_FWD_ALGO_IMPLICIT_PRECOMP_GEMM,
        Algo::CUDNN_CONVOLUTION_FWD_ALGO_GEMM,
        Algo::CUDNN_CONVOLUTION_FWD_ALGO_DIRECT,
        Algo::CUDNN_CONVOLUTION_FWD_ALGO_FFT,
        Algo::CUDNN_CONVOLUTION_FWD_ALGO_FFT_TILING,
        Algo::CUDNN_CONVOLUTION_FWD_ALGO_WINOGRAD,
        Algo::CUDNN_CONVOLUTION_FWD_ALGO_WINOGRAD_NONFUSED,
    ] {
        // Algorithms that do not support this shape say so here or at their first launch.
        let Ok(need) = forward.get_workspace_size(algo) else {
            continue;
        };
        if need > limit {
            continue;
        }
        let ms = with_workspace(dev, need, |mut workspace| {
            let mut launch = || {
                let scratch = workspace.as_deref_mut();
                let scale = (T::one(), T::zero());
                // SAFETY: the descriptors describe exactly these buffers (contiguous NCHW).
                unsafe { forward.launch(algo, scratch, scale, xs, ws, &mut *y) }.is_ok()
            };
            if !launch() {
                return Ok(None);
            }
            let start = stream.record_event(Some(CU_EVENT_DEFAULT)).w()?;
            let mut ran = true;
            for _ in 0..3 {
                ran &= launch();
            }
            let end = stream.record_event(Some(CU_EVENT_DEFAULT)).w()?;
            ran.then(|| start.elapsed_ms(&end)).transpose().w()
        })?;
        if let Some(ms) = ms {
            tracing::trace!(?algo, ms, need, "cuDNN algorithm timed");
            if best.is_none_or(|(fastest, _, _)| ms < fastest) {
                best = Some((ms, algo, need));
            }
        }
    }
    match best {
        Some((_, algo, need)) => Ok((algo, need)),
        None => candle_core::bail!("cuDNN has no algorithm for this convolution"),
    }
}

/// `1` and `0` in each element type cuDNN's scaling takes.
mod num_one {
    pub trait One: Sized {
        fn one() -> Self;
        fn zero() -> Self;
    }
    impl One for f32 {
        fn one() -> Self {
            1.0
        }
        fn zero() -> Self {
            0.0
        }
    }
    impl One for super::f16 {
        fn one() -> Self {
            Self::ONE
        }
        fn zero() -> Self {
            Self::ZERO
        }
    }
}

optional_bias_op!(CudnnConv, "cudnn-conv2d", dispatch);

impl CudnnConv {
    fn dispatch(
        &self,
        x: (&CudaStorage, &Layout),
        w: (&CudaStorage, &Layout),
        bias: Option<(&CudaStorage, &Layout)>,
    ) -> Result<(CudaStorage, Shape)> {
        match x.0.dtype() {
            DType::F16 => self.run::<f16>(x, w, bias),
            DType::F32 => self.run::<f32>(x, w, bias),
            dtype => candle_core::bail!("cudnn-conv2d: no {dtype:?} support"),
        }
    }
}

/// The gradient of a convolution's input (cuDNN's backward-data), for training through a
/// frozen network: `grad` `[N, K, Ho, Wo]` of the output, `w` `[K, C, R, S]`, the input's
/// side `input_hw`; `[N, C, H, W]`. candle's route, its CUDA transposed convolution, is a
/// direct loop over every output element. `None` off CUDA or for other dtypes than fp16/fp32.
pub fn conv2d_input_grad(
    grad: &Tensor,
    w: &Tensor,
    input_hw: (usize, usize),
    padding: usize,
    stride: usize,
) -> Result<Option<Tensor>> {
    let dtype_ok = matches!(grad.dtype(), DType::F16 | DType::F32) && w.dtype() == grad.dtype();
    if !applies(grad) || w.track_op() || !dtype_ok || grad.rank() != 4 || w.rank() != 4 {
        return Ok(None);
    }
    let op = CudnnConvInputGrad {
        conv: CudnnConv { padding, stride },
        input_hw,
    };
    grad.contiguous()?
        .apply_op2_no_bwd(&w.contiguous()?, &op)
        .map(Some)
}

struct CudnnConvInputGrad {
    conv: CudnnConv,
    input_hw: (usize, usize),
}

/// cuDNN's descriptors, algorithm and workspace size for one input-gradient shape.
struct ConvInputGradPlan<T: CudnnDataType> {
    conv: cudarc::cudnn::ConvDescriptor<f32>,
    dx: cudarc::cudnn::TensorDescriptor<T>,
    w: cudarc::cudnn::FilterDescriptor<T>,
    dy: cudarc::cudnn::TensorDescriptor<T>,
    algo: cudarc::cudnn::sys::cudnnConvolutionBwdDataAlgo_t,
    workspace: usize,
}

thread_local! {
    static INPUT_GRAD_PLANS: RefCell<HashMap<ConvKey, Rc<dyn Any>>> = RefCell::new(HashMap::new());
}

impl CudnnConvInputGrad {
    fn run<T>(
        &self,
        (g, gl): (&CudaStorage, &Layout),
        (w, wl): (&CudaStorage, &Layout),
    ) -> Result<(CudaStorage, Shape)>
    where
        T: CudnnDataType
            + DeviceRepr
            + candle_core::cuda_backend::CudaDType
            + num_one::One
            + 'static,
    {
        let (n, k, ho, wo) = gl.shape().dims4()?;
        let (k2, c, r, s) = wl.shape().dims4()?;
        let (h, wd) = self.input_hw;
        let conv = &self.conv;
        let fits = h + 2 * conv.padding >= r && wd + 2 * conv.padding >= s;
        if k != k2 || !fits || conv.out_size(h, r) != ho || conv.out_size(wd, s) != wo {
            candle_core::bail!(
                "conv2d input gradient: {:?} is not the output of filter {:?} on {h}x{wd}",
                gl.shape(),
                wl.shape()
            )
        }
        let (x_dims, w_dims) = ([n, c, h, wd], [k, c, r, s]);
        let dev = g.device().clone();
        let e = candle_core::Error::wrap;
        let key = conv.key(&dev, g.dtype(), &x_dims, &w_dims);
        let plan = cached_plan(&INPUT_GRAD_PLANS, key, || {
            let (cd, dx, w, dy) = conv.descriptors::<T>(&dev, g.dtype(), &x_dims, &w_dims)?;
            let op = cudarc::cudnn::ConvBackwardData {
                conv: &cd,
                dx: &dx,
                w: &w,
                dy: &dy,
            };
            let algo = op.pick_algorithm().map_err(e)?;
            let workspace = op.get_workspace_size(algo).map_err(e)?;
            tracing::debug!(?key, ?algo, workspace, "cuDNN input-gradient plan");
            Ok(ConvInputGradPlan {
                conv: cd,
                dx,
                w,
                dy,
                algo,
                workspace,
            })
        })?;
        let gs = g.as_cuda_slice::<T>()?.slice(gl.start_offset()..);
        let ws = w.as_cuda_slice::<T>()?.slice(wl.start_offset()..);
        // SAFETY: cuDNN writes every element (beta 0).
        let mut dx = unsafe { dev.alloc::<T>(n * c * h * wd)? };
        let op = cudarc::cudnn::ConvBackwardData {
            conv: &plan.conv,
            dx: &plan.dx,
            w: &plan.w,
            dy: &plan.dy,
        };
        with_workspace(&dev, plan.workspace, |workspace| {
            let scale = (T::one(), T::zero());
            // SAFETY: the plan's descriptors describe exactly these buffers (contiguous NCHW).
            unsafe { op.launch(plan.algo, workspace, scale, &mut dx, &ws, &gs) }.map_err(e)
        })?;
        Ok((
            CudaStorage::wrap_cuda_slice(dx, dev),
            Shape::from((n, c, h, wd)),
        ))
    }
}

impl CustomOp2 for CudnnConvInputGrad {
    fn name(&self) -> &'static str {
        "cudnn-conv2d-input-grad"
    }

    fn cpu_fwd(
        &self,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        cpu_only(self.name())
    }

    fn cuda_fwd(
        &self,
        g: &CudaStorage,
        gl: &Layout,
        w: &CudaStorage,
        wl: &Layout,
    ) -> Result<(CudaStorage, Shape)> {
        match g.dtype() {
            DType::F16 => self.run::<f16>((g, gl), (w, wl)),
            DType::F32 => self.run::<f32>((g, gl), (w, wl)),
            dtype => candle_core::bail!("{}: no {dtype:?} support", self.name()),
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Linear layers

/// `x · wᵀ + bias` (torch's `F.linear`) through cuBLASLt with the bias added in the matrix
/// product's epilogue, as PyTorch does: candle multiplies through the older cuBLAS API and adds
/// a bias with a separate broadcast kernel. `x` is `[.., K]`, `w` `[N, K]`, `bias` `[N]`; fp16
/// and bf16 (fp32 stays on candle's exact path). The descriptors and the algorithm are made
/// once per shape.
pub fn linear(x: &Tensor, w: &Tensor, bias: Option<&Tensor>) -> Result<Option<Tensor>> {
    let dtype = x.dtype();
    let fits = matches!(dtype, DType::F16 | DType::BF16)
        && w.dtype() == dtype
        && w.rank() == 2
        && x.rank() >= 2
        && x.dim(candle_core::D::Minus1)? == w.dim(1)?
        && bias.is_none_or(|b| b.dtype() == dtype && b.dims() == [w.dim(0).unwrap_or(0)]);
    if !applies(x) || w.track_op() || bias.is_some_and(|b| b.track_op()) || !fits {
        return Ok(None);
    }
    let (x, w) = (x.contiguous()?, w.contiguous()?);
    let bias = bias.map(|b| b.contiguous()).transpose()?;
    // cuBLASLt's algorithms may assume 256-byte aligned operands.
    let aligned = |t: &Tensor| t.layout().start_offset().is_multiple_of(128);
    if !aligned(&x) || !aligned(&w) || bias.as_ref().is_some_and(|b| !aligned(b)) {
        return Ok(None);
    }
    match &bias {
        Some(b) => x.apply_op3_no_bwd(&w, b, &LtLinear).map(Some),
        None => x.apply_op2_no_bwd(&w, &LtLinear).map(Some),
    }
}

struct LtLinear;

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
        let (alpha, beta) = (1f32, 0f32);
        with_workspace(dev, plan.workspace, |scratch| {
            let (x_ptr, _x_guard) = xs.device_ptr(&stream);
            let (w_ptr, _w_guard) = ws.device_ptr(&stream);
            let (y_ptr, _y_guard) = y.device_ptr_mut(&stream);
            let bias_guard = bs.as_ref().map(|b| b.device_ptr(&stream));
            let (scratch_ptr, _scratch_guard, scratch_len) = match scratch {
                Some(s) => {
                    let len = s.len();
                    let (ptr, guard) = s.device_ptr_mut(&stream);
                    (ptr, Some(guard), len)
                }
                None => (0, None, 0),
            };
            // SAFETY: the plan's layouts describe these contiguous buffers (x [m, k], w [n, k],
            // y [m, n]); the bias pointer is set on this thread's plan just before its use.
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
                    y_ptr as *const _,
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

optional_bias_op!(LtLinear, "linear", run);

// ---------------------------------------------------------------------------------------------
// Flash attention

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
    let (q, k, v) = (q.contiguous()?, k.contiguous()?, v.contiguous()?);
    // 16-byte loads need every row to start 16-byte aligned.
    if [&q, &k, &v]
        .iter()
        .any(|t| t.layout().start_offset() % 8 != 0)
    {
        return Ok(None);
    }
    let op = FlashAttention {
        heads,
        scale: scale as f32,
    };
    q.apply_op3_no_bwd(&k, &v, &op).map(Some)
}

struct FlashAttention {
    heads: usize,
    scale: f32,
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

impl CustomOp3 for FlashAttention {
    fn name(&self) -> &'static str {
        "flash-attention"
    }

    fn cpu_fwd(
        &self,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        cpu_only(self.name())
    }

    fn cuda_fwd(
        &self,
        q: &CudaStorage,
        ql: &Layout,
        k: &CudaStorage,
        kl: &Layout,
        v: &CudaStorage,
        vl: &Layout,
    ) -> Result<(CudaStorage, Shape)> {
        let (b, n, inner) = ql.shape().dims3()?;
        let (bk, m, inner_k) = kl.shape().dims3()?;
        if (bk, inner_k) != (b, inner) || vl.shape() != kl.shape() || m == 0 {
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
        let out = unsafe { dev.alloc::<f16>(b * n * inner)? };
        let (name, rows, threads, smem) = flash_launch(dp);
        let func = dev.get_or_load_custom_func(&name, MODULE, PTX)?;
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
        let scale_log2 = self.scale * std::f32::consts::LOG2_E;
        let mut launch = func.builder();
        launch.arg(&qs).arg(&ks).arg(&vs).arg(&out);
        launch
            .arg(&n32)
            .arg(&m32)
            .arg(&h32)
            .arg(&d32)
            .arg(&scale_log2);
        // SAFETY: argument list matches the kernel's signature; shapes checked above.
        unsafe { launch.launch(cfg) }.w()?;
        Ok((CudaStorage::wrap_cuda_slice(out, dev), ql.shape().clone()))
    }
}

// ---------------------------------------------------------------------------------------------
// Group norm

/// `torch.nn.GroupNorm` (then SiLU when `silu`) over `[B, C, …]`; fp16 or fp32.
pub fn group_norm(
    x: &Tensor,
    weight: &Tensor,
    bias: &Tensor,
    groups: usize,
    eps: f64,
    silu: bool,
) -> Result<Option<Tensor>> {
    let dtype_ok = matches!(x.dtype(), DType::F16 | DType::F32);
    let same = weight.dtype() == x.dtype() && bias.dtype() == x.dtype();
    if !applies(x) || weight.track_op() || bias.track_op() || !dtype_ok || !same || x.rank() < 3 {
        return Ok(None);
    }
    let channels = x.dim(1)?;
    if groups == 0 || channels % groups != 0 || weight.elem_count() != channels {
        return Ok(None);
    }
    let x = x.contiguous()?;
    let op = GroupNormOp {
        groups,
        eps: eps as f32,
        silu,
    };
    x.apply_op3_no_bwd(&weight.contiguous()?, &bias.contiguous()?, &op)
        .map(Some)
}

struct GroupNormOp {
    groups: usize,
    eps: f32,
    silu: bool,
}

impl GroupNormOp {
    #[allow(clippy::too_many_arguments)]
    fn run<T: DeviceRepr + candle_core::cuda_backend::CudaDType>(
        &self,
        suffix: &str,
        x: &CudaStorage,
        xl: &Layout,
        w: &CudaStorage,
        wl: &Layout,
        b: &CudaStorage,
        bl: &Layout,
    ) -> Result<(CudaStorage, Shape)> {
        let geo = GroupGeometry::new(xl.dims(), self.groups);
        let dev = x.device().clone();
        let xs = x.as_cuda_slice::<T>()?.slice(xl.start_offset()..);
        let ws = w.as_cuda_slice::<T>()?.slice(wl.start_offset()..);
        let bs = b.as_cuda_slice::<T>()?.slice(bl.start_offset()..);
        let partial = geo.moments(&dev, suffix, &xs)?;
        // SAFETY: pass 2 writes every output.
        let out = unsafe { dev.alloc::<T>(xl.shape().elem_count())? };
        let cfg = geo.launch_config();
        let apply =
            dev.get_or_load_custom_func(&format!("group_norm_apply_{suffix}"), MODULE, PTX)?;
        let (len64, splits32) = (geo.len as i64, geo.splits as i32);
        let (hw64, cpg32, groups32) = (geo.hw as i64, geo.cpg as i32, self.groups as i32);
        let silu = self.silu as i32;
        let mut launch = apply.builder();
        launch.arg(&xs).arg(&out).arg(&partial).arg(&ws).arg(&bs);
        launch
            .arg(&len64)
            .arg(&splits32)
            .arg(&hw64)
            .arg(&cpg32)
            .arg(&groups32);
        launch.arg(&self.eps).arg(&silu);
        // SAFETY: argument list matches the kernel's signature.
        unsafe { launch.launch(cfg) }.w()?;
        Ok((CudaStorage::wrap_cuda_slice(out, dev), xl.shape().clone()))
    }
}

/// How the group-norm kernels walk an `[N, C, ..]` input: a block row per (sample, group),
/// each group's `len` elements cut into `splits` chunks.
struct GroupGeometry {
    blocks: usize,
    hw: usize,
    cpg: usize,
    len: usize,
    splits: usize,
}

impl GroupGeometry {
    fn new(dims: &[usize], groups: usize) -> GroupGeometry {
        let hw: usize = dims[2..].iter().product();
        let cpg = dims[1] / groups;
        let len = cpg * hw;
        GroupGeometry {
            blocks: dims[0] * groups,
            hw,
            cpg,
            len,
            // Enough blocks to fill the GPU at the VAE's 512² planes, few enough that merging
            // a group's chunks stays trivial.
            splits: len.div_ceil(8192).clamp(1, 64),
        }
    }

    fn launch_config(&self) -> LaunchConfig {
        LaunchConfig {
            grid_dim: (self.blocks as u32, self.splits as u32, 1),
            block_dim: (256, 1, 1),
            shared_mem_bytes: 0,
        }
    }

    /// The first pass of the forward and of the gradient alike: each chunk's count, mean and
    /// sum of squared deviations (Welford), 3 floats per chunk.
    fn moments<T: DeviceRepr>(
        &self,
        dev: &CudaDevice,
        suffix: &str,
        xs: &CudaView<T>,
    ) -> Result<CudaSlice<f32>> {
        // SAFETY: the kernel writes every chunk's moments.
        let partial = unsafe { dev.alloc::<f32>(self.blocks * self.splits * 3)? };
        let stats =
            dev.get_or_load_custom_func(&format!("group_norm_stats_{suffix}"), MODULE, PTX)?;
        let (len64, splits32) = (self.len as i64, self.splits as i32);
        let mut launch = stats.builder();
        launch.arg(xs).arg(&partial).arg(&len64).arg(&splits32);
        // SAFETY: argument list matches the kernel's signature.
        unsafe { launch.launch(self.launch_config()) }.w()?;
        Ok(partial)
    }
}

impl CustomOp3 for GroupNormOp {
    fn name(&self) -> &'static str {
        "group-norm"
    }

    fn cpu_fwd(
        &self,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        cpu_only(self.name())
    }

    fn cuda_fwd(
        &self,
        x: &CudaStorage,
        xl: &Layout,
        w: &CudaStorage,
        wl: &Layout,
        b: &CudaStorage,
        bl: &Layout,
    ) -> Result<(CudaStorage, Shape)> {
        match x.dtype() {
            DType::F16 => self.run::<f16>("f16", x, xl, w, wl, b, bl),
            DType::F32 => self.run::<f32>("f32", x, xl, w, wl, b, bl),
            dtype => candle_core::bail!("group-norm: no {dtype:?} support"),
        }
    }
}

/// The input gradient of [`group_norm`] (SiLU after it on request) for training: `x` the
/// layer's input, `grad` its output's gradient. Three passes (the forward's statistics, then
/// two over each group) instead of two dozen candle ops, most of them launch-bound.
#[allow(clippy::too_many_arguments)]
pub fn group_norm_input_grad(
    x: &Tensor,
    grad: &Tensor,
    weight: &Tensor,
    bias: &Tensor,
    groups: usize,
    eps: f64,
    silu: bool,
) -> Result<Option<Tensor>> {
    let dtype_ok = matches!(x.dtype(), DType::F16 | DType::F32);
    let same = [grad, weight, bias].iter().all(|t| t.dtype() == x.dtype());
    if !applies(x) || !applies(grad) || !dtype_ok || !same || x.rank() < 3 {
        return Ok(None);
    }
    let channels = x.dim(1)?;
    let fits = groups > 0 && channels % groups == 0 && weight.elem_count() == channels;
    if !fits || grad.dims() != x.dims() || bias.elem_count() != channels {
        return Ok(None);
    }
    let op = GroupNormGradOp {
        norm: GroupNormOp {
            groups,
            eps: eps as f32,
            silu,
        },
        weight: weight.contiguous()?,
        bias: bias.contiguous()?,
    };
    x.contiguous()?
        .apply_op2_no_bwd(&grad.contiguous()?, &op)
        .map(Some)
}

struct GroupNormGradOp {
    norm: GroupNormOp,
    weight: Tensor,
    bias: Tensor,
}

impl GroupNormGradOp {
    fn run<T: DeviceRepr + candle_core::cuda_backend::CudaDType>(
        &self,
        suffix: &str,
        (x, xl): (&CudaStorage, &Layout),
        (g, gl): (&CudaStorage, &Layout),
    ) -> Result<(CudaStorage, Shape)> {
        let (w_storage, wl) = self.weight.storage_and_layout();
        let (b_storage, bl) = self.bias.storage_and_layout();
        let (candle_core::Storage::Cuda(w), candle_core::Storage::Cuda(b)) =
            (&*w_storage, &*b_storage)
        else {
            candle_core::bail!("group-norm gradient: weights not on the GPU")
        };
        let groups = self.norm.groups;
        let geo = GroupGeometry::new(xl.dims(), groups);
        let dev = x.device().clone();
        let xs = x.as_cuda_slice::<T>()?.slice(xl.start_offset()..);
        let gs = g.as_cuda_slice::<T>()?.slice(gl.start_offset()..);
        let ws = w.as_cuda_slice::<T>()?.slice(wl.start_offset()..);
        let bs = b.as_cuda_slice::<T>()?.slice(bl.start_offset()..);
        let partial = geo.moments(&dev, suffix, &xs)?;
        // SAFETY: each pass writes every element of its output before the next reads it.
        let sums = unsafe { dev.alloc::<f32>(geo.blocks * geo.splits * 2)? };
        let dx = unsafe { dev.alloc::<T>(xl.shape().elem_count())? };
        let cfg = geo.launch_config();
        let (len64, splits32) = (geo.len as i64, geo.splits as i32);
        let (hw64, cpg32, groups32) = (geo.hw as i64, geo.cpg as i32, groups as i32);
        let (eps, silu) = (self.norm.eps, self.norm.silu as i32);
        let func =
            |name: &str| dev.get_or_load_custom_func(&format!("{name}_{suffix}"), MODULE, PTX);
        let sum = func("group_norm_grad_sums")?;
        let mut launch = sum.builder();
        launch
            .arg(&xs)
            .arg(&gs)
            .arg(&partial)
            .arg(&ws)
            .arg(&bs)
            .arg(&sums);
        launch
            .arg(&len64)
            .arg(&splits32)
            .arg(&hw64)
            .arg(&cpg32)
            .arg(&groups32);
        launch.arg(&eps).arg(&silu);
        // SAFETY: argument lists match the kernels' signatures.
        unsafe { launch.launch(cfg) }.w()?;
        let apply = func("group_norm_grad_apply")?;
        let mut launch = apply.builder();
        launch
            .arg(&xs)
            .arg(&gs)
            .arg(&partial)
            .arg(&sums)
            .arg(&ws)
            .arg(&bs)
            .arg(&dx);
        launch
            .arg(&len64)
            .arg(&splits32)
            .arg(&hw64)
            .arg(&cpg32)
            .arg(&groups32);
        launch.arg(&eps).arg(&silu);
        unsafe { launch.launch(cfg) }.w()?;
        Ok((CudaStorage::wrap_cuda_slice(dx, dev), xl.shape().clone()))
    }
}

impl CustomOp2 for GroupNormGradOp {
    fn name(&self) -> &'static str {
        "group-norm-input-grad"
    }

    fn cpu_fwd(
        &self,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        cpu_only(self.name())
    }

    fn cuda_fwd(
        &self,
        x: &CudaStorage,
        xl: &Layout,
        g: &CudaStorage,
        gl: &Layout,
    ) -> Result<(CudaStorage, Shape)> {
        match x.dtype() {
            DType::F16 => self.run::<f16>("f16", (x, xl), (g, gl)),
            DType::F32 => self.run::<f32>("f32", (x, xl), (g, gl)),
            dtype => candle_core::bail!("{}: no {dtype:?} support", self.name()),
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Elementwise: bias along an axis, GEGLU gate, where candle's broadcast kernels run at a tenth
// of memory speed (compared by `sdkube bench --what ops`).

fn elementwise_ok(t: &Tensor) -> bool {
    applies(t) && matches!(t.dtype(), DType::F16 | DType::F32) && t.elem_count() < (1 << 31)
}

fn launch_1d(elements: usize) -> LaunchConfig {
    LaunchConfig {
        grid_dim: (elements.div_ceil(256).min(65_535 * 16) as u32, 1, 1),
        block_dim: (256, 1, 1),
        shared_mem_bytes: 0,
    }
}

fn suffix(dtype: DType) -> Result<&'static str> {
    match dtype {
        DType::F16 => Ok("f16"),
        DType::F32 => Ok("f32"),
        other => candle_core::bail!("no {other:?} kernel"),
    }
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
    let inner: usize = y.dims()[axis + 1..].iter().product();
    let op = AddBias { inner };
    y.contiguous()?
        .apply_op2_no_bwd(&bias.contiguous()?, &op)
        .map(Some)
}

/// Whether `bias`'s shape is the axes of `y` that end at `axis` (at least one of them).
fn bias_fits(y: &[usize], bias: &[usize], axis: usize) -> bool {
    !bias.is_empty() && bias.len() <= axis + 1 && y[axis + 1 - bias.len()..=axis] == *bias
}

struct AddBias {
    inner: usize,
}

/// Our `add_bias` kernel over all of `out`: `out[i] = y[i] + bias[(i / inner) % channels]`.
/// `y` may view `out` itself: each thread reads its element before writing it.
fn launch_add_bias<T: DeviceRepr>(
    dev: &CudaDevice,
    dtype: DType,
    y: &CudaView<T>,
    bias: &CudaView<T>,
    out: &CudaSlice<T>,
    inner: usize,
    channels: usize,
) -> Result<()> {
    let n = out.len();
    let func = dev.get_or_load_custom_func(&format!("add_bias_{}", suffix(dtype)?), MODULE, PTX)?;
    let (n32, inner32, channels32) = (n as u32, inner as u32, channels as u32);
    let mut launch = func.builder();
    launch
        .arg(y)
        .arg(bias)
        .arg(out)
        .arg(&n32)
        .arg(&inner32)
        .arg(&channels32);
    // SAFETY: argument list matches the kernel's signature; `y` holds at least `n` elements.
    unsafe { launch.launch(launch_1d(n)) }.w()?;
    Ok(())
}

impl CustomOp2 for AddBias {
    fn name(&self) -> &'static str {
        "add-bias"
    }

    fn cpu_fwd(
        &self,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        cpu_only(self.name())
    }

    fn cuda_fwd(
        &self,
        y: &CudaStorage,
        yl: &Layout,
        b: &CudaStorage,
        bl: &Layout,
    ) -> Result<(CudaStorage, Shape)> {
        fn run<T: DeviceRepr + candle_core::cuda_backend::CudaDType>(
            op: &AddBias,
            y: &CudaStorage,
            yl: &Layout,
            b: &CudaStorage,
            bl: &Layout,
        ) -> Result<(CudaStorage, Shape)> {
            let n = yl.shape().elem_count();
            let dev = y.device().clone();
            let ys = y.as_cuda_slice::<T>()?.slice(yl.start_offset()..);
            let bs = b.as_cuda_slice::<T>()?.slice(bl.start_offset()..);
            // SAFETY: the kernel writes every element.
            let out = unsafe { dev.alloc::<T>(n)? };
            let channels = bl.shape().elem_count();
            launch_add_bias(&dev, y.dtype(), &ys, &bs, &out, op.inner, channels)?;
            Ok((CudaStorage::wrap_cuda_slice(out, dev), yl.shape().clone()))
        }
        match y.dtype() {
            DType::F16 => run::<f16>(self, y, yl, b, bl),
            DType::F32 => run::<f32>(self, y, yl, b, bl),
            dtype => candle_core::bail!("add-bias: no {dtype:?} support"),
        }
    }
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
        h: &CudaStorage,
        hl: &Layout,
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
        let name = format!("geglu_{}", suffix(h.dtype())?);
        let func = dev.get_or_load_custom_func(&name, MODULE, PTX)?;
        let (n32, f_u32) = (n as u32, f as u32);
        let mut launch = func.builder();
        launch.arg(&hs).arg(&out).arg(&n32).arg(&f_u32);
        // SAFETY: argument list matches the kernel's signature.
        unsafe { launch.launch(launch_1d(n)) }.w()?;
        Ok((CudaStorage::wrap_cuda_slice(out, dev), Shape::from(dims)))
    }
}

cuda_op1!(Geglu, "geglu");

// ---------------------------------------------------------------------------------------------
// Memory

/// The high-water marks of the memory pool candle allocates from (`cuMemAllocAsync`'s default
/// pool): bytes in use and bytes reserved at most since the last call with `reset` (PyTorch's
/// `max_memory_allocated` and `max_memory_reserved`). Not counted: the CUDA context, loaded
/// kernels, and what cuBLAS keeps on its own.
pub fn memory_high_water(dev: &CudaDevice, reset: bool) -> Result<(u64, u64)> {
    use cudarc::driver::sys;
    let check = |r: sys::CUresult| r.result().map_err(candle_core::Error::wrap);
    let stream = dev.cuda_stream();
    stream.context().bind_to_thread().w()?;
    let mut pool: sys::CUmemoryPool = std::ptr::null_mut();
    let attrs = [
        sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_USED_MEM_HIGH,
        sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_RESERVED_MEM_HIGH,
    ];
    let mut high = [0u64; 2];
    // SAFETY: plain queries on the device's current pool; the value type of both is cuuint64_t.
    unsafe {
        check(sys::cuDeviceGetMemPool(
            &mut pool,
            stream.context().cu_device(),
        ))?;
        for (attr, value) in attrs.iter().zip(high.iter_mut()) {
            check(sys::cuMemPoolGetAttribute(
                pool,
                *attr,
                (value as *mut u64).cast(),
            ))?;
            if reset {
                let mut zero = 0u64; // resets the mark to what is in use now
                check(sys::cuMemPoolSetAttribute(
                    pool,
                    *attr,
                    (&mut zero as *mut u64).cast(),
                ))?;
            }
        }
    }
    Ok((high[0], high[1]))
}

// ---------------------------------------------------------------------------------------------
// Leaky ReLU

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
        x: &CudaStorage,
        xl: &Layout,
    ) -> Result<(CudaStorage, Shape)> {
        let n = xl.shape().elem_count();
        let dev = x.device().clone();
        let xs = x.as_cuda_slice::<T>()?.slice(xl.start_offset()..);
        // SAFETY: the kernel writes every element.
        let out = unsafe { dev.alloc::<T>(n)? };
        let name = format!("leaky_relu_{}", suffix(x.dtype())?);
        let func = dev.get_or_load_custom_func(&name, MODULE, PTX)?;
        let n32 = n as u32;
        let mut launch = func.builder();
        launch.arg(&xs).arg(&out).arg(&n32).arg(&self.slope);
        // SAFETY: argument list matches the kernel's signature.
        unsafe { launch.launch(launch_1d(n)) }.w()?;
        Ok((CudaStorage::wrap_cuda_slice(out, dev), xl.shape().clone()))
    }
}

cuda_op1!(LeakyRelu, "leaky-relu");

// ---------------------------------------------------------------------------------------------
// Upsampling

/// Nearest-neighbour ×2 upsampling of NCHW `x` (`upsample_nearest2d(2h, 2w)`).
pub fn upsample_nearest_2x(x: &Tensor) -> Result<Option<Tensor>> {
    if !elementwise_ok(x) || x.rank() != 4 || x.elem_count() >= (1 << 29) {
        return Ok(None); // the output (4×) must stay below 2^31 elements
    }
    x.contiguous()?.apply_op1_no_bwd(&Upsample2x).map(Some)
}

struct Upsample2x;

impl Upsample2x {
    fn run<T: DeviceRepr + candle_core::cuda_backend::CudaDType>(
        &self,
        x: &CudaStorage,
        xl: &Layout,
    ) -> Result<(CudaStorage, Shape)> {
        let (b, c, h, w) = xl.shape().dims4()?;
        let n = b * c * h * w;
        let dev = x.device().clone();
        let xs = x.as_cuda_slice::<T>()?.slice(xl.start_offset()..);
        // SAFETY: the kernel writes every element.
        let out = unsafe { dev.alloc::<T>(4 * n)? };
        let name = format!("upsample_2x_{}", suffix(x.dtype())?);
        let func = dev.get_or_load_custom_func(&name, MODULE, PTX)?;
        let (n32, h32, w32) = (n as u32, h as u32, w as u32);
        let mut launch = func.builder();
        launch.arg(&xs).arg(&out).arg(&n32).arg(&h32).arg(&w32);
        // SAFETY: argument list matches the kernel's signature.
        unsafe { launch.launch(launch_1d(n)) }.w()?;
        Ok((
            CudaStorage::wrap_cuda_slice(out, dev),
            Shape::from((b, c, 2 * h, 2 * w)),
        ))
    }
}

cuda_op1!(Upsample2x, "upsample-nearest-2x");
