//! The layers and ops under sdkube's networks (the Stable Diffusion UNet, VAE and text
//! encoders in `sdkube-models`; RealESRGAN, GFPGAN and RetinaFace in `sdkube-restore`), as
//! `candle-nn` is under `candle-transformers`:
//!
//! - layers named as in PyTorch: [`Conv2d`], [`Linear`], [`GroupNorm`] (SiLU fused on
//!   request), [`LayerNorm`];
//! - ops: [`convolve`], [`scaled_dot_product_attention`], [`softmax_last_dim`], [`geglu`],
//!   [`leaky_relu`], [`upsample_nearest_2x`], [`add_bias`];
//! - [`cuda`] (feature `cuda`): the GPU path's own kernels behind them (cuDNN convolution,
//!   cuBLASLt linear layers, flash attention, fused group norm, elementwise kernels), each used
//!   where it applies and candle's op otherwise;
//! - [`GraphCache`]: a network's forward pass replayed as a CUDA graph;
//! - channels-last feature maps on the GPU ([`channels_last_on`], [`add`], [`cat_channels`],
//!   [`from_nhwc`]): the layout cuDNN's tensor-core convolutions run in;
//! - [`profile`]: GPU time per kind of operation (`sdkube bench --profile`).
//!
//! Textual-inversion training back-propagates through frozen networks. When a layer's input is
//! part of a gradient graph ([`Tensor::track_op`]) and its weights are not, the layer runs as
//! one op (the private `tracked` module): the inference path forward, the input's gradient
//! alone backward, so candle's autograd keeps neither the layer's intermediates nor gradients
//! for its weights. Where a layer is differentiated op by op (inside that backward, or with
//! tracked weights), candle's fused layer-norm and softmax kernels, which have no backward
//! pass, give way to their composed forms (same math).
//!
//! On the CPU, batched layers run one sample at a time, so a sample comes out bit for bit as
//! it would alone (see `per_sample`).

mod attention;
mod conv;
// Raw CUDA: device allocations, kernel launches, cuDNN and cuBLASLt calls (each `unsafe`
// block says why it holds).
#[cfg(feature = "cuda")]
#[allow(unsafe_code)]
pub mod cuda;
mod elementwise;
// Without CUDA only the tests drive the graph bookkeeping.
#[cfg_attr(not(feature = "cuda"), allow(dead_code))]
mod graph;
mod layout;
mod linear;
mod norm;
pub mod profile;
mod switch;
mod tracked;

pub use attention::{scaled_dot_product_attention, softmax_last_dim};
pub use conv::{
    circular_padding, conv1x1, conv2d, conv2d_no_bias, conv3x3, convolve, pad_circular,
    with_circular_padding, Conv2d,
};
pub use elementwise::{
    add_bias, geglu, leaky_relu, noise_leaky_relu, upsample_bilinear_2x, upsample_nearest_2x,
};
pub use graph::{GraphCache, Pass};
pub use layout::{
    add, cat_channels, channels_last_on, from_nhwc, is_channels_last, to_channels_last,
};
pub use linear::{linear, linear_no_bias, Linear};
pub use norm::{group_norm, GroupNorm, LayerNorm};
pub use switch::Switch;

use candle_core::{DType, Device, Result, Tensor};

/// `tensors` on `device`, in order. From host memory to a GPU they go together through
/// pinned staging buffers ([`cuda::upload`]): a model's weights arrive several times faster
/// than tensor by tensor.
pub fn to_device_all(tensors: &[&Tensor], device: &Device) -> Result<Vec<Tensor>> {
    #[cfg(feature = "cuda")]
    if let Device::Cuda(dev) = device {
        return cuda::upload(tensors, dev);
    }
    tensors.iter().map(|t| t.to_device(device)).collect()
}

/// One tensor stored in a file: `shape` elements of `dtype`, their bytes from `offset` on.
#[derive(Debug, Clone)]
pub struct StoredTensor {
    /// Where its bytes start.
    pub offset: u64,
    /// Its element type.
    pub dtype: DType,
    /// Its shape.
    pub shape: Vec<usize>,
}

/// `tensors` of `file` on `device`, in order. To a GPU the bytes go from the file straight
/// into pinned staging buffers and on ([`cuda::upload_from_file`]), the reads overlapping the
/// copies, with no host copy of the whole; elsewhere each tensor is read into host memory.
pub fn read_to_device(
    file: &std::fs::File,
    tensors: &[StoredTensor],
    device: &Device,
) -> Result<Vec<Tensor>> {
    #[cfg(feature = "cuda")]
    if let Device::Cuda(dev) = device {
        return cuda::upload_from_file(file, tensors, dev);
    }
    use std::os::unix::fs::FileExt;
    tensors
        .iter()
        .map(|t| {
            let mut bytes = vec![0u8; t.shape.iter().product::<usize>() * t.dtype.size_in_bytes()];
            file.read_exact_at(&mut bytes, t.offset)?;
            Tensor::from_raw_buffer(&bytes, t.dtype, &t.shape, &Device::Cpu)?.to_device(device)
        })
        .collect()
}

/// `f` on each sample of a batch alone, on the CPU. candle folds a batch into the rows of one
/// matrix product (linear layers, the convolution's im2col), whose blocking, and so its
/// rounding, depends on the row count: a sample would come out a little different in a batch
/// than alone. Per sample, batched generation equals generating each request alone, to the
/// bit (the server batches requests of different clients).
pub(crate) fn per_sample(xs: &Tensor, f: impl Fn(&Tensor) -> Result<Tensor>) -> Result<Tensor> {
    let batch = xs.dim(0)?;
    if !xs.device().is_cpu() || batch < 2 {
        return f(xs);
    }
    let samples = (0..batch)
        .map(|i| f(&xs.narrow(0, i, 1)?))
        .collect::<Result<Vec<_>>>()?;
    Tensor::cat(&samples, 0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tracked::tests::max_diff;
    use candle_core::{DType, Device, Module, Var};
    use candle_nn::{Conv2dConfig, VarBuilder};
    use std::collections::HashMap;

    fn randn(shape: &[usize]) -> Tensor {
        Tensor::randn(0f64, 1., shape, &Device::Cpu).unwrap()
    }

    /// The gradient of `sum(f(x) · r)` with respect to `x`, by candle's autograd.
    fn input_grad(x: &Tensor, r: &Tensor, f: impl Fn(&Tensor) -> Result<Tensor>) -> Tensor {
        let x = Var::from_tensor(x).unwrap();
        let y = f(x.as_tensor()).unwrap();
        let grads = (y * r).unwrap().sum_all().unwrap().backward().unwrap();
        grads.get(x.as_tensor()).expect("a gradient").clone()
    }

    /// Linear, convolution (the downsampling one included, on even and odd sides), group
    /// norm with and without SiLU, layer norm and upsampling on a tracked input run as single ops
    /// (`crate::tracked`): the same values and input gradients as candle's autograd through
    /// the composed ops.
    #[test]
    fn tracked_layers_match_autograd_of_their_composed_forms() {
        let dev = Device::Cpu;
        let weights: HashMap<String, Tensor> = [
            ("lin.weight", randn(&[6, 5])),
            ("lin.bias", randn(&[6])),
            ("conv.weight", randn(&[4, 3, 3, 3])),
            ("conv.bias", randn(&[4])),
            ("gn.weight", randn(&[4])),
            ("gn.bias", randn(&[4])),
            ("ln.weight", randn(&[5])),
            ("ln.bias", randn(&[5])),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v))
        .collect();
        let vb = VarBuilder::from_tensors(weights.clone(), DType::F64, &dev);
        let w = |k: &str| weights[k].clone();

        // linear
        let lin = linear(5, 6, vb.pp("lin")).unwrap();
        let x = randn(&[2, 7, 5]);
        let r = randn(&[2, 7, 6]);
        let ours = input_grad(&x, &r, |x| lin.forward(x));
        let theirs = input_grad(&x, &r, |x| {
            x.broadcast_matmul(&w("lin.weight").t()?)?
                .broadcast_add(&w("lin.bias"))
        });
        assert!(max_diff(&ours, &theirs) < 1e-12, "linear");

        // convolutions, stride 1 and 2
        for (stride, side) in [(1, 8), (2, 8), (2, 9)] {
            let conv: Conv2d = candle_nn::conv2d(
                3,
                4,
                3,
                Conv2dConfig {
                    padding: 1,
                    stride,
                    ..Default::default()
                },
                vb.pp("conv"),
            )
            .unwrap()
            .into();
            let x = randn(&[2, 3, side, side]);
            let out_side = (side + 2 - 3) / stride + 1;
            let r = randn(&[2, 4, out_side, out_side]);
            let ours = input_grad(&x, &r, |x| conv.forward(x));
            let theirs = input_grad(&x, &r, |x| {
                x.conv2d(&w("conv.weight"), 1, stride, 1, 1)?
                    .broadcast_add(&w("conv.bias").reshape((1, 4, 1, 1))?)
            });
            assert!(
                max_diff(&ours, &theirs) < 1e-12,
                "conv stride {stride} side {side}"
            );
        }

        // group norm (+ SiLU)
        let gn = group_norm(2, 4, 1e-5, vb.pp("gn")).unwrap();
        let reference =
            candle_nn::GroupNorm::new(w("gn.weight"), w("gn.bias"), 4, 2, 1e-5).unwrap();
        let x = randn(&[2, 4, 5, 5]);
        let r = randn(&[2, 4, 5, 5]);
        for silu in [false, true] {
            let ours = input_grad(&x, &r, |x| {
                if silu {
                    gn.forward_silu(x)
                } else {
                    gn.forward(x)
                }
            });
            let theirs = input_grad(&x, &r, |x| {
                let y = reference.forward(x)?;
                if silu {
                    y.silu()
                } else {
                    Ok(y)
                }
            });
            assert!(max_diff(&ours, &theirs) < 1e-10, "group norm, silu {silu}");
        }

        // layer norm
        let ln = LayerNorm::new(5, 1e-5, vb.pp("ln")).unwrap();
        let x = randn(&[2, 7, 5]);
        let r = randn(&[2, 7, 5]);
        let ours = input_grad(&x, &r, |x| ln.forward(x));
        let theirs = input_grad(&x, &r, |x| {
            candle_nn::ops::layer_norm_slow(x, &w("ln.weight"), &w("ln.bias"), 1e-5)
        });
        assert!(max_diff(&ours, &theirs) < 1e-10, "layer norm");

        // nearest ×2 upsampling
        let x = randn(&[2, 3, 4, 5]);
        let r = randn(&[2, 3, 8, 10]);
        let ours = input_grad(&x, &r, upsample_nearest_2x);
        let theirs = input_grad(&x, &r, |x| x.upsample_nearest2d(8, 10));
        assert!(max_diff(&ours, &theirs) < 1e-12, "upsampling");
        assert!(
            max_diff(&ours, &ours.zeros_like().unwrap()) > 1e-3,
            "all-zero gradient"
        );
    }
}
