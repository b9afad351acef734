//! Convolution through cuDNN: the forward (where it beats candle's kernel) and the input's
//! gradient, each planned once per shape.

use std::any::Any;
use std::cell::RefCell;
use std::collections::HashMap;
use std::rc::Rc;
use std::sync::Arc;

use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::cudarc;
use candle_core::cuda_backend::{CudaDevice, DeviceId, WrapErr};
use candle_core::{CudaStorage, DType, Layout, Result, Shape, Tensor};
use cudarc::cudnn::{ConvForward, Cudnn, CudnnDataType};
use cudarc::driver::{CudaSlice, CudaView, DevicePtr, DeviceRepr};
use half::f16;

use super::choice::{best_times, graph_aligned, remembered, replaces};
use super::cudnn_graph::{self, Epilogue, GraphConvShape};
use super::elementwise::launch_add_bias;
use super::memory::with_workspace;
use super::{applies, cuda_op};
use crate::switch::Switch;

/// 2-D convolution (groups 1, dilation 1; the bias, if any, added in place by our kernel)
/// through cuDNN, where cuDNN is the faster
/// of the two for this shape: the first convolution of each small shape times cuDNN and
/// candle's kernel ([`best_times`]) and remembers the winner, as
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
    Ok(match chosen(x, w, bias, padding, stride)? {
        Some(Chosen { op, x, w, .. }) => Some(op.apply(&x, &w, bias)?),
        None => None,
    })
}

/// The way [`conv2d`] takes for this shape, with the operands in its layout; `None` where
/// candle's kernel does (or the operands are not cuDNN's to take).
struct Chosen {
    op: CudnnConv,
    key: ConvKey,
    x: Tensor,
    w: Tensor,
}

fn chosen(
    x: &Tensor,
    w: &Tensor,
    bias: Option<&Tensor>,
    padding: usize,
    stride: usize,
) -> Result<Option<Chosen>> {
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
    // Channels-last at tensor-core widths only (SD's first and last convolutions, 4 channels,
    // stay NCHW).
    let (c, k) = (x.dim(1)?, w.dim(0)?);
    let channels_last = crate::channels_last_on(x) && c.is_multiple_of(8) && k.is_multiple_of(8);
    let op = CudnnConv {
        padding,
        stride,
        channels_last,
        graph_api: false,
    };
    let (x, w) = (op.in_layout(x)?, op.in_layout(w)?);
    let key = op.key(dev, x.dtype(), x.dims(), w.dims());
    let aligned = || {
        [Some(&x), Some(&w), bias]
            .into_iter()
            .flatten()
            .all(graph_aligned)
    };
    let graph = CudnnConv {
        graph_api: true,
        ..op
    };
    let use_graph = super::cudnn_backend::GRAPH_API.is_on()
        && aligned()
        && remembered(&GRAPH_CHOICE, (key, bias.is_some()), || {
            replaces(
                "cuDNN graph API convolution",
                &[x.dims(), w.dims()],
                x.device(),
                &|| graph.apply(&x, &w, bias),
                &|| op.apply(&x, &w, bias),
            )
        })?;
    let op = if use_graph { graph } else { op };
    // On small maps candle's kernel may be faster: timed against the call this shape takes
    // (see `TIMED_UP_TO`).
    if x.dim(2)? * x.dim(3)? <= TIMED_UP_TO
        && !remembered(&CHOICE, (key, use_graph, bias.is_some()), || {
            cudnn_is_faster(&x, &w, bias, &op)
        })?
    {
        return Ok(None);
    }
    Ok(Some(Chosen { op, key, x, w }))
}

/// `conv(x, w) + bias + residual` in one cuDNN kernel (the adds in the convolution's
/// epilogue, in fp32 before the one rounding to the output type), where this shape's
/// convolution goes through cuDNN's graph API and, checked once per shape as every choice here
/// ([`replaces`]), the fused graph gives the values of the convolution followed by the
/// separate add and is faster. `None` elsewhere: the caller convolves and adds.
pub fn conv2d_add(
    x: &Tensor,
    w: &Tensor,
    bias: &Tensor,
    residual: &Tensor,
    padding: usize,
    stride: usize,
) -> Result<Option<Tensor>> {
    let Some(Chosen { op, key, x, w }) = chosen(x, w, Some(bias), padding, stride)? else {
        return Ok(None);
    };
    let out = |i: usize, k: usize| op.out_size(i, k);
    let y_dims = [
        x.dim(0)?,
        w.dim(0)?,
        out(x.dim(2)?, w.dim(2)?),
        out(x.dim(3)?, w.dim(3)?),
    ];
    let fits = residual.dtype() == x.dtype() && residual.dims() == y_dims;
    if !op.graph_api || !fits || residual.track_op() {
        return Ok(None);
    }
    let residual = op.in_layout(residual)?;
    if ![&x, &w, bias, &residual].into_iter().all(graph_aligned) {
        return Ok(None);
    }
    let fused = || op.apply_add(&x, &w, bias, &residual);
    let separate = || crate::layout::add(&op.apply(&x, &w, Some(bias))?, &residual);
    let faster = remembered(&ADD_CHOICE, key, || {
        replaces(
            "cuDNN convolution + residual in one kernel",
            &[x.dims(), w.dims()],
            x.device(),
            &fused,
            &separate,
        )
    })?;
    faster.then(fused).transpose()
}

/// [`conv2d`] always through cuDNN (for benchmarks), channels-last where `x` is; through its
/// graph API ([`cudnn_graph`]) where `graph_api`, which is an error where no engine builds or
/// an operand's address is not aligned for it.
pub fn conv2d_cudnn(
    x: &Tensor,
    w: &Tensor,
    bias: &Tensor,
    (padding, stride): (usize, usize),
    graph_api: bool,
) -> Result<Tensor> {
    let op = CudnnConv {
        padding,
        stride,
        channels_last: crate::is_channels_last(x),
        graph_api,
    };
    let (x, w, bias) = (op.in_layout(x)?, op.in_layout(w)?, bias.contiguous()?);
    if graph_api && ![&x, &w, &bias].into_iter().all(graph_aligned) {
        candle_core::bail!("cuDNN graph API: operands at 16-byte aligned addresses only")
    }
    op.apply(&x, &w, Some(&bias))
}

/// Input pixels (H·W) up to which [`conv2d`] times cuDNN against candle (32²: the largest UNet
/// feature map where candle came within 2× of cuDNN). The cuDNN side is the call the shape then
/// takes (the graph API's where it won, with the bias): timed against the legacy call instead,
/// without the bias, some 1×1 convolutions went to candle in some processes and not in others,
/// and 2 of 6 SD1.5 processes ran the CFG step at 7.58 and 8.03 ms instead of 6.54–6.61; timed
/// against the call taken, all 6 ran it at 6.536–6.546 (H200, 2026-12-07).
const TIMED_UP_TO: usize = 32 * 32;

fn cudnn_is_faster(x: &Tensor, w: &Tensor, bias: Option<&Tensor>, op: &CudnnConv) -> Result<bool> {
    let candle = || {
        let y = x.conv2d(w, op.padding, op.stride, 1, 1)?;
        match bias {
            Some(b) => crate::elementwise::add_bias(y, b, 1),
            None => Ok(y),
        }
    };
    let (cudnn, candle) = best_times(x.device(), &|| op.apply(x, w, bias), &candle)?;
    tracing::debug!(x = ?x.dims(), w = ?w.dims(), ?cudnn, ?candle, "convolution: cuDNN or candle");
    Ok(cudnn <= candle)
}

/// A convolution through cuDNN. Channels-last, it takes `x` `[N, H, W, C]` and `w`
/// `[K, R, S, C]` and writes `[N, Ho, Wo, K]` (the memory of channels-last feature maps,
/// [`crate::is_channels_last`]); otherwise NCHW, KCRS and NKHW. Through the graph API
/// ([`cudnn_graph`]) where `graph_api` and the operands are aligned for it, else the legacy one.
#[derive(Clone, Copy)]
struct CudnnConv {
    padding: usize,
    stride: usize,
    channels_last: bool,
    graph_api: bool,
}

/// A convolution's device, dtype, input and filter shapes (NCHW, KCRS), padding, stride and
/// layout (1: channels-last).
type ConvKey = (DeviceId, DType, [usize; 10]);

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
    // Per shape, cuDNN call (graph API or legacy) and bias or not: whether that call beats
    // candle's kernel (small maps only, see `TIMED_UP_TO`).
    static CHOICE: RefCell<HashMap<(ConvKey, bool, bool), bool>> = RefCell::new(HashMap::new());
    // Per shape and bias or not: whether the graph API's plan is used (see `replaces`).
    static GRAPH_CHOICE: RefCell<HashMap<(ConvKey, bool), bool>> = RefCell::new(HashMap::new());
    // Per shape: whether `conv2d_add` adds the residual in the convolution's kernel.
    static ADD_CHOICE: RefCell<HashMap<ConvKey, bool>> = RefCell::new(HashMap::new());
    static PLANS: RefCell<HashMap<ConvKey, Rc<dyn Any>>> = RefCell::new(HashMap::new());
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
    /// `t` (`[N, C, H, W]` or `[K, C, R, S]`) in this convolution's layout: channels-last or
    /// contiguous.
    fn in_layout(&self, t: &Tensor) -> Result<Tensor> {
        if self.channels_last {
            crate::to_channels_last(t)
        } else {
            t.contiguous()
        }
    }

    /// `x` convolved with `w` (+ `bias`), both already [`Self::in_layout`]; the output in that
    /// layout too.
    fn apply(&self, x: &Tensor, w: &Tensor, bias: Option<&Tensor>) -> Result<Tensor> {
        let (x, w) = (self.memory(x)?, self.memory(w)?);
        let y = match bias {
            None => x.apply_op2_no_bwd(&w, self)?,
            Some(b) => x.apply_op3_no_bwd(&w, &b.contiguous()?, self)?,
        };
        self.logical_output(y)
    }

    /// [`Self::apply`] with `residual` (the output's shape, in this layout) added in the same
    /// cuDNN kernel, through the graph API.
    fn apply_add(
        &self,
        x: &Tensor,
        w: &Tensor,
        bias: &Tensor,
        residual: &Tensor,
    ) -> Result<Tensor> {
        let op = CudnnConvAdd {
            conv: *self,
            residual: self.memory(residual)?,
        };
        let (x, w) = (self.memory(x)?, self.memory(w)?);
        self.logical_output(x.apply_op3_no_bwd(&w, &bias.contiguous()?, &op)?)
    }

    /// An operand in this layout as its memory: `[N, H, W, C]` channels-last.
    fn memory(&self, t: &Tensor) -> Result<Tensor> {
        if self.channels_last {
            t.permute((0, 2, 3, 1))
        } else {
            Ok(t.clone())
        }
    }

    /// The output's memory as its logical `[N, K, H, W]`.
    fn logical_output(&self, y: Tensor) -> Result<Tensor> {
        if self.channels_last {
            y.permute((0, 3, 1, 2))
        } else {
            Ok(y)
        }
    }

    /// NCHW (or KCRS) dimensions of an operand's memory `dims` in this layout.
    fn logical(&self, dims: &[usize]) -> Result<[usize; 4]> {
        let [a, b, c, d] = dims else {
            candle_core::bail!("conv2d: {dims:?} is not 4-D")
        };
        Ok(if self.channels_last {
            [*a, *d, *b, *c]
        } else {
            [*a, *b, *c, *d]
        })
    }

    fn key(&self, dev: &CudaDevice, dtype: DType, x: &[usize], w: &[usize]) -> ConvKey {
        let (p, s, cl) = (self.padding, self.stride, self.channels_last as usize);
        (
            dev.id(),
            dtype,
            [x[0], x[1], x[2], x[3], w[0], w[2], w[3], p, s, cl],
        )
    }

    fn out_size(&self, input: usize, kernel: usize) -> usize {
        (input + 2 * self.padding - kernel) / self.stride + 1
    }

    /// cuDNN's descriptors of this convolution (`x` `[N, C, H, W]`, `w` `[K, C, R, S]`, laid
    /// out in this op's layout): the convolution, `x`, `w` and `y`.
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
            cudnnConvolutionMode_t::CUDNN_CROSS_CORRELATION,
            cudnnMathType_t,
            cudnnTensorFormat_t::{CUDNN_TENSOR_NCHW, CUDNN_TENSOR_NHWC},
        };
        let format = if self.channels_last {
            CUDNN_TENSOR_NHWC
        } else {
            CUDNN_TENSOR_NCHW
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
            .create_4d_tensor::<T>(format, dims([x[0], x[1], x[2], x[3]]))
            .map_err(e)?;
        let wd = cudnn
            .create_4d_filter::<T>(format, dims([w[0], w[1], w[2], w[3]]))
            .map_err(e)?;
        let yd = cudnn
            .create_4d_tensor::<T>(format, dims([x[0], w[0], ho, wo]))
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
        x: (&CudaStorage, &Layout),
        w: (&CudaStorage, &Layout),
        bias: Option<(&CudaStorage, &Layout)>,
    ) -> Result<(CudaStorage, Shape)>
    where
        T: ConvElem,
    {
        self.run_with::<T>(x, w, bias, None)
    }

    /// `conv(x, w) (+ bias) (+ residual)`: the bias alone may be added by our kernel after the
    /// convolution (the legacy API, or no fused engine); with a residual, the graph API adds
    /// both in one kernel or it is an error.
    fn run_with<T>(
        &self,
        (x, xl): (&CudaStorage, &Layout),
        (w, wl): (&CudaStorage, &Layout),
        bias: Option<(&CudaStorage, &Layout)>,
        residual: Option<&Tensor>,
    ) -> Result<(CudaStorage, Shape)>
    where
        T: ConvElem,
    {
        let [n, c, h, wd] = self.logical(xl.dims())?;
        let [k, c2, r, s] = self.logical(wl.dims())?;
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
        let (x_dims, w_dims) = ([n, c, h, wd], [k, c, r, s]);
        let bias = match bias {
            Some((b, bl)) if bl.shape().dims() == [k] && bl.is_contiguous() => {
                Some(b.as_cuda_slice::<T>()?.slice(bl.start_offset()..))
            }
            Some(_) => candle_core::bail!("conv2d: the bias does not fit {k} output channels"),
            None => None,
        };
        let residual_storage = residual.map(|r| r.storage_and_layout());
        let residual = match &residual_storage {
            Some((storage, layout)) => {
                let candle_core::Storage::Cuda(r) = &**storage else {
                    candle_core::bail!("conv2d: the residual is not on the GPU")
                };
                if !layout.is_contiguous() || layout.shape().elem_count() != y.len() {
                    candle_core::bail!("conv2d: the residual is not the output's memory")
                }
                Some(r.as_cuda_slice::<T>()?.slice(layout.start_offset()..))
            }
            None => None,
        };
        let epilogue = Epilogue {
            bias: bias.is_some(),
            residual: residual.is_some(),
        };
        let stream = dev.cuda_stream();
        let address = |v: &CudaView<T>| v.device_ptr(&stream).0 as usize;
        let aligned = [Some(&xs), Some(&ws), bias.as_ref(), residual.as_ref()]
            .into_iter()
            .flatten()
            .all(|v| address(v).is_multiple_of(super::cudnn_backend::ALIGNMENT));
        let graph = self.graph_api && aligned;
        if !graph && epilogue.residual {
            candle_core::bail!("conv2d: the residual add needs the graph API and aligned operands")
        }
        let added = if graph {
            let operands = ((x_dims, &xs), (w_dims, &ws));
            self.forward_graph(
                &dev,
                operands,
                (bias.as_ref(), residual.as_ref()),
                epilogue,
                &mut y,
            )?
        } else {
            self.forward_legacy(&dev, x.dtype(), (x_dims, &xs), (w_dims, &ws), &mut y)?;
            Epilogue::NONE
        };
        if let Some(bs) = bias.filter(|_| !added.bias) {
            // In place: no second output-sized buffer (512 MB at the VAE's 1024² stage).
            let inner = if self.channels_last { 1 } else { ho * wo };
            launch_add_bias(&dev, x.dtype(), &y.slice(..), &bs, &y, inner, k, y.len())?;
        }
        let out = CudaStorage::wrap_cuda_slice(y, dev);
        let shape = if self.channels_last {
            Shape::from((n, ho, wo, k))
        } else {
            Shape::from((n, k, ho, wo))
        };
        Ok((out, shape))
    }
}

impl CudnnConv {
    /// `y = conv(x, w)` through the legacy API's plan for this shape.
    fn forward_legacy<T>(
        &self,
        dev: &CudaDevice,
        dtype: DType,
        (x_dims, xs): ([usize; 4], &CudaView<T>),
        (w_dims, ws): ([usize; 4], &CudaView<T>),
        y: &mut CudaSlice<T>,
    ) -> Result<()>
    where
        T: CudnnDataType + DeviceRepr + num_one::One + 'static,
    {
        let plan = self.plan::<T>(dev, dtype, (&x_dims, xs), (&w_dims, ws), y)?;
        let forward = ConvForward {
            conv: &plan.conv,
            x: &plan.x,
            w: &plan.w,
            y: &plan.y,
        };
        with_workspace(dev, plan.workspace, |workspace| {
            // SAFETY: the plan's descriptors describe exactly these buffers (contiguous, in
            // this op's layout).
            let scale = (T::one(), T::zero());
            unsafe { forward.launch(plan.algo, workspace, scale, xs, ws, y) }
                .map_err(candle_core::Error::wrap)
        })
    }

    /// `y = conv(x, w) (+ the terms of epilogue)` through the graph API's plan for this shape;
    /// what the plan added (a per-channel bias may be left to the caller). For operands at
    /// [`super::cudnn_backend::ALIGNMENT`]ed addresses only.
    #[allow(clippy::type_complexity)]
    fn forward_graph<T: CudnnDataType>(
        &self,
        dev: &CudaDevice,
        ((x_dims, xs), (w_dims, ws)): (([usize; 4], &CudaView<T>), ([usize; 4], &CudaView<T>)),
        (bias, residual): (Option<&CudaView<T>>, Option<&CudaView<T>>),
        epilogue: Epilogue,
        y: &mut CudaSlice<T>,
    ) -> Result<Epilogue> {
        let shape = GraphConvShape {
            dtype: T::DATA_TYPE,
            x: x_dims,
            w: w_dims,
            padding: self.padding,
            stride: self.stride,
            channels_last: self.channels_last,
        };
        let limit = workspace_limit(xs.len(), y.len(), std::mem::size_of::<T>());
        let plan = cudnn_graph::plan(dev, shape, epilogue, limit)?;
        with_workspace(dev, plan.workspace(), |workspace| {
            // SAFETY: operands of T, the shape's dtype, of exactly this shape, contiguous in
            // this op's layout, aligned (the caller's check); y fresh from the pool.
            unsafe { plan.execute(dev, (xs, ws), (bias, residual), y, workspace) }
        })?;
        Ok(plan.epilogue)
    }
}

/// `SDKUBE_CUDNN=benchmark`: time cuDNN's algorithms per shape ([`fastest_algorithm`]) instead
/// of taking its heuristic first pick, like `torch.backends.cudnn.benchmark`. Off by default, as
/// in PyTorch: in one H200 call the heuristic was as fast for SDXL and the VAE and 14 % faster
/// for SD1.5 end to end (timing three back-to-back runs with the input hot in L2 favours
/// algorithms that lose inside the network).
static BENCHMARK: Switch = Switch::new("SDKUBE_CUDNN", "benchmark", "heuristic", false);

fn benchmark_algorithms() -> bool {
    BENCHMARK.is_on()
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
                // SAFETY: the descriptors describe exactly these buffers.
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

/// An element type the cuDNN convolutions here run in (fp16, fp32).
trait ConvElem:
    CudnnDataType + DeviceRepr + candle_core::cuda_backend::CudaDType + num_one::One + 'static
{
}

impl<T> ConvElem for T where
    T: CudnnDataType + DeviceRepr + candle_core::cuda_backend::CudaDType + num_one::One + 'static
{
}

cuda_op!(CudnnConv, "cudnn-conv2d", run(x, w, bias?) [F16 => f16, F32 => f32]);

/// A graph-API convolution with its bias and `residual` (in the output's memory layout) added
/// in the same kernel ([`conv2d_add`]).
struct CudnnConvAdd {
    conv: CudnnConv,
    residual: Tensor,
}

impl CudnnConvAdd {
    fn run<T>(
        &self,
        x: (&CudaStorage, &Layout),
        w: (&CudaStorage, &Layout),
        bias: (&CudaStorage, &Layout),
    ) -> Result<(CudaStorage, Shape)>
    where
        T: ConvElem,
    {
        self.conv
            .run_with::<T>(x, w, Some(bias), Some(&self.residual))
    }
}

cuda_op!(CudnnConvAdd, "cudnn-conv2d-add", run(x, y, z) [F16 => f16, F32 => f32]);

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
        conv: CudnnConv {
            padding,
            stride,
            channels_last: false,
            graph_api: false,
        },
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
        T: ConvElem,
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

cuda_op!(CudnnConvInputGrad, "cudnn-conv2d-input-grad", run(x, y) [F16 => f16, F32 => f32]);
