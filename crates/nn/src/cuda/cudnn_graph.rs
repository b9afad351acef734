//! The forward convolution through cuDNN's graph (backend) API: the convolution, with its bias
//! and a residual added in the same kernel where an engine can, as one operation graph; cuDNN's
//! heuristics rank the engines that can run it and the first that builds is kept, as PyTorch
//! does through cudnn-frontend without `cudnn.benchmark`. The legacy `cudnnConvolutionForward`
//! reaches a subset of those engines through its eight algorithms, and always adds the bias
//! separately.
//!
//! fp16 and fp32 operands, fp32 accumulation (fp32 may use TF32 tensor cores, as the legacy
//! path and PyTorch's convolutions do). Used where `SDKUBE_CUDNN_GRAPH=on` and, per shape,
//! [`super::conv`] found it as exact as the legacy path and faster.

use std::cell::RefCell;
use std::collections::HashMap;
use std::ffi::c_void;
use std::rc::Rc;

use candle_core::cuda_backend::cudarc;
use candle_core::cuda_backend::{CudaDevice, DeviceId};
use candle_core::Result;
use cudarc::driver::{CudaSlice, CudaView, DevicePtr, DevicePtrMut};

use super::choice::remembered;
use super::cudnn_backend::{
    build_plan, cudnnDataType_t, sys, tensor, Attr, Descriptor, Kind, Plan,
};

/// The operands' ids in the graph and the variant pack.
const X: i64 = 1;
const W: i64 = 2;
const Y: i64 = 3;
const BIAS: i64 = 4;
/// The convolution's fp32 output before the bias, never in memory (a fused graph's inner edge).
const CONV_OUT: i64 = 5;
/// A tensor of `y`'s shape added after the bias (a residual connection).
const RESIDUAL: i64 = 6;
/// The fp32 sum of the convolution and its bias before the residual add, never in memory.
const BIASED: i64 = 7;

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

/// What a graph adds to the convolution in the same kernel: a bias (`[K]`, per output
/// channel), then a residual of the output's shape.
///
/// (A bias per sample and channel, `[N, K]`, which would fold a ResNet block's time embedding
/// in, is left out: on an H200 with cuDNN 9.x its fused engine read a misaligned address at
/// N = 2, a fault that ends the process rather than an error a choice could catch.)
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub(super) struct Epilogue {
    pub bias: bool,
    pub residual: bool,
}

impl Epilogue {
    /// The plain convolution.
    pub const NONE: Self = Self {
        bias: false,
        residual: false,
    };

    /// `conv + bias`.
    pub const BIAS: Self = Self {
        bias: true,
        residual: false,
    };
}

/// A convolution's plan.
pub(super) struct GraphConvPlan {
    plan: Plan,
    /// What the plan adds to the convolution (else the caller does).
    pub epilogue: Epilogue,
}

thread_local! {
    static PLANS: RefCell<HashMap<(DeviceId, GraphConvShape, Epilogue), Rc<GraphConvPlan>>> =
        RefCell::new(HashMap::new());
}

/// The plan for this shape and `epilogue`, built the first time on this thread; an error where
/// no engine within `workspace_limit` builds. A per-channel bias alone falls back to the plain
/// convolution (the plan's `epilogue` says so, and the caller adds the bias); any other
/// epilogue is fused or refused.
pub(super) fn plan(
    dev: &CudaDevice,
    shape: GraphConvShape,
    epilogue: Epilogue,
    workspace_limit: usize,
) -> Result<Rc<GraphConvPlan>> {
    remembered(&PLANS, (dev.id(), shape, epilogue), || {
        // Engines compiled at run time (fused ones) compile when their plan is built: the time
        // is logged, as it adds to a model's warm-up.
        let start = std::time::Instant::now();
        let plan = match build(dev, shape, epilogue, workspace_limit) {
            Ok(plan) => plan,
            Err(e) if epilogue == Epilogue::BIAS => {
                tracing::debug!(?shape, "no fused conv + bias engine: {e}");
                build(dev, shape, Epilogue::NONE, workspace_limit)?
            }
            Err(e) => return Err(e),
        };
        tracing::debug!(
            ?shape,
            epilogue = ?plan.epilogue,
            workspace = plan.plan.workspace,
            built_in = ?start.elapsed(),
            "cuDNN graph convolution plan"
        );
        Ok(Rc::new(plan))
    })
}

impl GraphConvPlan {
    /// Runs the plan: `y = conv(x, w) (+ bias, + residual where its epilogue has them)`, on
    /// candle's stream. A bias the epilogue lacks is ignored (the caller adds it).
    ///
    /// # Safety
    /// The buffers must be of the plan's element type (its shape's `dtype`), its shape's
    /// operands in its layout (the bias `[K]`, the residual `y`'s shape and layout), each at an
    /// address aligned to [`super::cudnn_backend::ALIGNMENT`].
    pub(super) unsafe fn execute<T>(
        &self,
        dev: &CudaDevice,
        (x, w): (&CudaView<T>, &CudaView<T>),
        (bias, residual): (Option<&CudaView<T>>, Option<&CudaView<T>>),
        y: &mut CudaSlice<T>,
        workspace: Option<&mut CudaSlice<u8>>,
    ) -> Result<()> {
        let stream = dev.cuda_stream();
        let (x_ptr, _x) = x.device_ptr(&stream);
        let (w_ptr, _w) = w.device_ptr(&stream);
        let (y_ptr, _y) = y.device_ptr_mut(&stream);
        let bias = bias
            .filter(|_| self.epilogue.bias)
            .map(|b| b.device_ptr(&stream));
        let residual = residual.map(|r| r.device_ptr(&stream));
        let scratch = match workspace {
            Some(s) if self.plan.workspace > 0 => {
                let (ptr, guard) = s.device_ptr_mut(&stream);
                Some((ptr, guard))
            }
            _ => None,
        };
        if self.epilogue.bias != bias.is_some()
            || self.epilogue.residual != residual.is_some()
            || (self.plan.workspace > 0) != scratch.is_some()
        {
            candle_core::bail!("cuDNN graph convolution: the plan's operands are missing")
        }
        let mut ids = vec![X, W, Y];
        let mut pointers = vec![x_ptr as *mut c_void, w_ptr as _, y_ptr as _];
        for (id, operand) in [(BIAS, &bias), (RESIDUAL, &residual)] {
            if let Some((ptr, _)) = operand {
                ids.push(id);
                pointers.push(*ptr as _);
            }
        }
        let scratch = scratch
            .as_ref()
            .map_or(std::ptr::null_mut(), |(p, _)| *p as *mut c_void);
        // SAFETY: the caller vouches for the buffers, which the graph's tensors describe.
        unsafe { self.plan.execute(&ids, &pointers, scratch) }
    }

    /// The scratch bytes the plan needs.
    pub(super) fn workspace(&self) -> usize {
        self.plan.workspace
    }
}

/// The operations of the graph for `shape`, in order (the convolution, then the adds of
/// `epilogue`: bias, residual), and the descriptors they reference. Each add reads the fp32
/// result of the step before; only the last writes `y`.
fn operations(
    shape: GraphConvShape,
    epilogue: Epilogue,
) -> Result<(Vec<Descriptor>, Vec<Descriptor>)> {
    use cudnnDataType_t::CUDNN_DATA_FLOAT;
    let (y_dims, dtype) = (shape.y(), shape.dtype);
    let x = tensor(X, dtype, shape.x, shape.strides(shape.x), false)?;
    let w = tensor(W, dtype, shape.w, shape.strides(shape.w), false)?;
    let y = tensor(Y, dtype, y_dims, shape.strides(y_dims), false)?;
    let inner = |id| tensor(id, CUDNN_DATA_FLOAT, y_dims, shape.strides(y_dims), true);

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

    // The convolution writes y, or an fp32 virtual tensor the first add reads.
    let conv_out = (epilogue != Epilogue::NONE)
        .then(|| inner(CONV_OUT))
        .transpose()?;
    let forward = Descriptor::new(Kind::CUDNN_BACKEND_OPERATION_CONVOLUTION_FORWARD_DESCRIPTOR)?;
    forward.set_descriptors(Attr::CUDNN_ATTR_OPERATION_CONVOLUTION_FORWARD_X, &[&x])?;
    forward.set_descriptors(Attr::CUDNN_ATTR_OPERATION_CONVOLUTION_FORWARD_W, &[&w])?;
    forward.set_descriptors(
        Attr::CUDNN_ATTR_OPERATION_CONVOLUTION_FORWARD_Y,
        &[conv_out.as_ref().unwrap_or(&y)],
    )?;
    forward.set_descriptors(
        Attr::CUDNN_ATTR_OPERATION_CONVOLUTION_FORWARD_CONV_DESC,
        &[&conv],
    )?;
    forward.set_f32(Attr::CUDNN_ATTR_OPERATION_CONVOLUTION_FORWARD_ALPHA, 1.0)?;
    forward.set_f32(Attr::CUDNN_ATTR_OPERATION_CONVOLUTION_FORWARD_BETA, 0.0)?;
    let mut ops = vec![forward.finalize()?];
    let mut parts = vec![x, w, conv];

    if let Some(conv_out) = conv_out {
        // With both adds, the bias add writes an fp32 virtual tensor the residual add reads.
        let biased = (epilogue.bias && epilogue.residual)
            .then(|| inner(BIASED))
            .transpose()?;
        if epilogue.bias {
            // [1, K, 1, 1], broadcast over the rest
            let dims = [1, shape.w[0], 1, 1];
            let bias = tensor(BIAS, dtype, dims, shape.strides(dims), false)?;
            let (op, add) = add_op(&conv_out, &bias, biased.as_ref().unwrap_or(&y))?;
            ops.push(op);
            parts.extend([bias, add]);
        }
        if epilogue.residual {
            let residual = tensor(RESIDUAL, dtype, y_dims, shape.strides(y_dims), false)?;
            let (op, add) = add_op(biased.as_ref().unwrap_or(&conv_out), &residual, &y)?;
            ops.push(op);
            parts.extend([residual, add]);
        }
        parts.push(conv_out);
        parts.extend(biased);
    }
    parts.push(y);
    Ok((ops, parts))
}

/// The plan of the graph for `shape` and `epilogue` (see [`operations`]): its engine keeps
/// fp32 accumulation.
fn build(
    dev: &CudaDevice,
    shape: GraphConvShape,
    epilogue: Epilogue,
    workspace_limit: usize,
) -> Result<GraphConvPlan> {
    let (ops, parts) = operations(shape, epilogue)?;
    Ok(GraphConvPlan {
        plan: build_plan(dev, ops, parts, true, workspace_limit)?,
        epilogue,
    })
}

/// The pointwise operation `y = x + b` (`b` broadcast where its dimensions are 1), computed in
/// fp32, and the pointwise descriptor it holds.
fn add_op(x: &Descriptor, b: &Descriptor, y: &Descriptor) -> Result<(Descriptor, Descriptor)> {
    let add = Descriptor::new(Kind::CUDNN_BACKEND_POINTWISE_DESCRIPTOR)?;
    add.set_enum(
        Attr::CUDNN_ATTR_POINTWISE_MODE,
        sys::cudnnPointwiseMode_t::CUDNN_POINTWISE_ADD,
    )?;
    add.set_enum(
        Attr::CUDNN_ATTR_POINTWISE_MATH_PREC,
        cudnnDataType_t::CUDNN_DATA_FLOAT,
    )?;
    let add = add.finalize()?;
    let op = Descriptor::new(Kind::CUDNN_BACKEND_OPERATION_POINTWISE_DESCRIPTOR)?;
    op.set_descriptors(Attr::CUDNN_ATTR_OPERATION_POINTWISE_PW_DESCRIPTOR, &[&add])?;
    op.set_descriptors(Attr::CUDNN_ATTR_OPERATION_POINTWISE_XDESC, &[x])?;
    op.set_descriptors(Attr::CUDNN_ATTR_OPERATION_POINTWISE_BDESC, &[b])?;
    op.set_descriptors(Attr::CUDNN_ATTR_OPERATION_POINTWISE_YDESC, &[y])?;
    Ok((op.finalize()?, add))
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

    /// Every epilogue a convolution may carry.
    fn epilogues() -> Vec<Epilogue> {
        let all =
            [false, true].map(|bias| [false, true].map(|residual| Epilogue { bias, residual }));
        all.into_iter().flatten().collect()
    }

    /// cuDNN checks each descriptor when it is finalized: the operations finalize for both
    /// layouts and element types, with every epilogue: one add per term, and an fp32 inner
    /// tensor between the convolution and its adds. (Needs libcudnn, not a GPU: only the graph
    /// and its engines need a handle.)
    #[test]
    fn the_operations_are_valid_cudnn_descriptors() {
        use cudnnDataType_t::{CUDNN_DATA_FLOAT, CUDNN_DATA_HALF};
        let layouts = [
            (true, CUDNN_DATA_HALF),
            (false, CUDNN_DATA_HALF),
            (false, CUDNN_DATA_FLOAT),
        ];
        for (channels_last, dtype) in layouts {
            for epilogue in epilogues() {
                let shape = GraphConvShape {
                    dtype,
                    x: [2, 320, 64, 64],
                    w: [640, 320, 3, 3],
                    padding: 1,
                    stride: 2,
                    channels_last,
                };
                let (ops, parts) = operations(shape, epilogue).unwrap_or_else(|e| {
                    panic!("channels_last {channels_last}, {dtype:?}, {epilogue:?}: {e}")
                });
                let adds = epilogue.bias as usize + epilogue.residual as usize;
                assert_eq!(ops.len(), 1 + adds, "{epilogue:?}");
                // x, w, the convolution, y; each add's operand and pointwise descriptor; the
                // inner tensors: one after the convolution, one between two adds.
                let inner = (adds > 0) as usize + (adds == 2) as usize;
                assert_eq!(parts.len(), 4 + 2 * adds + inner, "{epilogue:?}");
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
        let error = operations(wrong, Epilogue::NONE).err().expect("refused");
        assert!(error.to_string().contains("cuDNN graph API"), "{error}");
    }
}
