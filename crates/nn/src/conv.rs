//! `nn.Conv2d` and the convolution under it: cuDNN on CUDA, candle's kernel elsewhere, and the
//! input's gradient alone when a frozen layer sits in a gradient graph.
//!
//! Circular padding (A1111's seamless tiling sets `padding_mode='circular'` on every `Conv2d`
//! of the model) is switched on for the calls made inside [`with_circular_padding`] on the
//! current thread: every [`Conv2d`] then wraps its input around explicitly and convolves it
//! without padding, so the convolution backends see nothing new.

use std::cell::Cell;

use candle_core::{Module, Result, Tensor};
use candle_nn::{Conv2dConfig, VarBuilder};

use crate::profile;

/// `nn.Conv2d`: candle's, except on CUDA, where cuDNN runs it ([`convolve`]).
#[derive(Debug, Clone)]
pub struct Conv2d(candle_nn::Conv2d);

impl From<candle_nn::Conv2d> for Conv2d {
    /// The layer, its weight laid out channels-last where its convolutions will run so
    /// ([`crate::channels_last_on`]): converted once here rather than on every call.
    fn from(conv: candle_nn::Conv2d) -> Self {
        let w = conv.weight();
        if conv.config().groups != 1 || !crate::channels_last_on(w) || crate::is_channels_last(w) {
            return Self(conv);
        }
        match crate::to_channels_last(w) {
            Ok(w) => Self(candle_nn::Conv2d::new(
                w,
                conv.bias().cloned(),
                *conv.config(),
            )),
            Err(_) => Self(conv),
        }
    }
}

/// A convolution with bias, its weights from `vb` (as `candle_nn::conv2d`).
pub fn conv2d(
    cin: usize,
    cout: usize,
    kernel: usize,
    cfg: Conv2dConfig,
    vb: VarBuilder,
) -> Result<Conv2d> {
    candle_nn::conv2d(cin, cout, kernel, cfg, vb).map(Conv2d::from)
}

/// A convolution without bias, its weights from `vb` (as `candle_nn::conv2d_no_bias`).
pub fn conv2d_no_bias(
    cin: usize,
    cout: usize,
    kernel: usize,
    cfg: Conv2dConfig,
    vb: VarBuilder,
) -> Result<Conv2d> {
    candle_nn::conv2d_no_bias(cin, cout, kernel, cfg, vb).map(Conv2d::from)
}

impl Module for Conv2d {
    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        let cfg = *self.0.config();
        if cfg.padding > 0 && circular_padding() {
            let xs = pad_circular(xs, cfg.padding)?;
            if cfg.groups != 1 || cfg.dilation != 1 {
                let y = profile::timed("convolution", xs.device(), || {
                    xs.conv2d(self.0.weight(), 0, cfg.stride, cfg.dilation, cfg.groups)
                })?;
                return match self.0.bias() {
                    Some(b) => crate::elementwise::add_bias(y, b, 1),
                    None => Ok(y),
                };
            }
            return convolve(&xs, self.0.weight(), self.0.bias(), 0, cfg.stride);
        }
        if cfg.groups != 1 || cfg.dilation != 1 {
            return profile::timed("convolution", xs.device(), || self.0.forward(xs));
        }
        convolve(xs, self.0.weight(), self.0.bias(), cfg.padding, cfg.stride)
    }
}

impl Conv2d {
    /// `forward(xs) + residual`, `residual` of the output's shape (a residual connection). On
    /// the GPU the add may run in the convolution's epilogue ([`crate::cuda::conv2d_add`]).
    pub fn forward_add(&self, xs: &Tensor, residual: &Tensor) -> Result<Tensor> {
        #[cfg(feature = "cuda")]
        if let Some(y) = self.fused_add(xs, residual)? {
            return Ok(y);
        }
        crate::layout::add(&self.forward(xs)?, residual)
    }

    /// [`Self::forward_add`] in one cuDNN kernel, where one can take it: a layer with a bias,
    /// zero padding, no gradient to follow.
    #[cfg(feature = "cuda")]
    fn fused_add(&self, xs: &Tensor, residual: &Tensor) -> Result<Option<Tensor>> {
        let cfg = *self.0.config();
        let plain =
            cfg.groups == 1 && cfg.dilation == 1 && !(cfg.padding > 0 && circular_padding());
        let untracked = !xs.track_op() && !residual.track_op();
        let Some(bias) = self.0.bias().filter(|_| plain && untracked) else {
            return Ok(None);
        };
        profile::timed("convolution", xs.device(), || {
            let (p, s) = (cfg.padding, cfg.stride);
            crate::cuda::conv2d_add(xs, self.0.weight(), bias, residual, p, s)
        })
    }
}

thread_local! {
    static CIRCULAR: Cell<bool> = const { Cell::new(false) };
}

/// Runs `f` with every [`Conv2d`] that pads on this thread padding circularly (`on`) or with
/// zeros, as PyTorch's `padding_mode`; the previous mode is back afterwards, also when `f`
/// panics.
pub fn with_circular_padding<R>(on: bool, f: impl FnOnce() -> R) -> R {
    struct Restore(bool);
    impl Drop for Restore {
        fn drop(&mut self) {
            CIRCULAR.with(|c| c.set(self.0));
        }
    }
    let _restore = Restore(CIRCULAR.with(|c| c.replace(on)));
    f()
}

/// Whether [`Conv2d`]s on this thread pad circularly now.
pub fn circular_padding() -> bool {
    CIRCULAR.with(|c| c.get())
}

/// `x` `[N, C, H, W]` wrapped around by `p` on each side of H and W (PyTorch's
/// `F.pad(x, (p, p, p, p), mode="circular")`).
pub fn pad_circular(x: &Tensor, p: usize) -> Result<Tensor> {
    let (_, _, h, w) = x.dims4()?;
    if p > h || p > w {
        candle_core::bail!("circular padding {p} is larger than the input {h}x{w}");
    }
    let x = Tensor::cat(&[&x.narrow(3, w - p, p)?, x, &x.narrow(3, 0, p)?], 3)?;
    Tensor::cat(&[&x.narrow(2, h - p, p)?, &x, &x.narrow(2, 0, p)?], 2)
}

/// A 2-D convolution (groups 1, dilation 1) plus `bias`: cuDNN on CUDA where it is the faster
/// (and always for large feature maps: candle's im2col there takes gigabytes), candle's kernel
/// elsewhere.
pub fn convolve(
    xs: &Tensor,
    w: &Tensor,
    bias: Option<&Tensor>,
    padding: usize,
    stride: usize,
) -> Result<Tensor> {
    if xs.track_op() && !w.track_op() && !bias.is_some_and(|b| b.track_op()) {
        let (w_in, b_in) = (w.clone(), bias.cloned());
        let w = w.clone();
        return crate::tracked::with_input_grad(
            xs,
            "convolution backward",
            |xs| convolve(xs, &w_in, b_in.as_ref(), padding, stride),
            move |xs, grad| {
                #[cfg(feature = "cuda")]
                if let Some(dx) = crate::cuda::conv2d_input_grad(
                    grad,
                    &w,
                    (xs.dim(2)?, xs.dim(3)?),
                    padding,
                    stride,
                )? {
                    return Ok(dx);
                }
                // conv_transpose2d's output side is (g - 1)·stride - 2·padding + k (+ out_padding)
                let (g, k) = (grad.dim(2)?, w.dim(2)?);
                let out_padding = xs.dim(2)? + 2 * padding - (g - 1) * stride - k;
                grad.conv_transpose2d(&w, padding, out_padding, stride, 1)
            },
        );
    }
    profile::timed("convolution", xs.device(), || {
        #[cfg(feature = "cuda")]
        if let Some(y) = crate::cuda::conv2d(xs, w, bias, padding, stride)? {
            return Ok(y);
        }
        let y = crate::per_sample(xs, |x| x.conv2d(w, padding, stride, 1, 1))?;
        match bias {
            Some(bias) => crate::elementwise::add_bias(y, bias, 1),
            None => Ok(y),
        }
    })
}

/// A 3×3 convolution with bias and padding 1 (`stride` 1 or 2), weights from `vb`.
pub fn conv3x3(cin: usize, cout: usize, stride: usize, vb: VarBuilder) -> Result<Conv2d> {
    let cfg = Conv2dConfig {
        padding: 1,
        stride,
        ..Default::default()
    };
    conv2d(cin, cout, 3, cfg, vb)
}

/// A 1×1 convolution with bias, weights from `vb`.
pub fn conv1x1(cin: usize, cout: usize, vb: VarBuilder) -> Result<Conv2d> {
    conv2d(cin, cout, 1, Conv2dConfig::default(), vb)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{DType, Device};
    use std::collections::HashMap;

    /// The input wrapped around by index arithmetic, independently of `pad_circular`.
    fn wrapped(x: &Tensor, p: usize) -> Tensor {
        let (n, c, h, w) = x.dims4().unwrap();
        let v = x.flatten_all().unwrap().to_vec1::<f64>().unwrap();
        let (hp, wp) = (h + 2 * p, w + 2 * p);
        let mut out = vec![0.0; n * c * hp * wp];
        for plane in 0..n * c {
            for y in 0..hp {
                for x in 0..wp {
                    let (sy, sx) = ((y + h - p) % h, (x + w - p) % w);
                    out[(plane * hp + y) * wp + x] = v[(plane * h + sy) * w + sx];
                }
            }
        }
        Tensor::from_vec(out, (n, c, hp, wp), &Device::Cpu).unwrap()
    }

    fn max_diff(a: &Tensor, b: &Tensor) -> f64 {
        (a - b)
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar()
            .unwrap()
    }

    /// A 3×3 convolution's weights of `k` outputs over `c` inputs, under `c.`.
    fn random_weights(k: usize, c: usize) -> HashMap<String, Tensor> {
        let dev = Device::Cpu;
        let weight = Tensor::randn(0f64, 1., (k, c, 3, 3), &dev).unwrap();
        let bias = Tensor::randn(0f64, 1., k, &dev).unwrap();
        HashMap::from([
            ("c.weight".to_string(), weight),
            ("c.bias".to_string(), bias),
        ])
    }

    #[test]
    fn circular_conv_is_the_conv_of_the_wrapped_input() {
        let dev = Device::Cpu;
        let weights = random_weights(5, 3);
        let vb = VarBuilder::from_tensors(weights.clone(), DType::F64, &dev);
        let bias = weights["c.bias"].reshape((1, 5, 1, 1)).unwrap();
        for (stride, (h, w)) in [(1, (6, 7)), (2, (8, 8)), (2, (7, 9))] {
            let conv = conv3x3(3, 5, stride, vb.pp("c")).unwrap();
            let x = Tensor::randn(0f64, 1., (2, 3, h, w), &dev).unwrap();
            let ours = with_circular_padding(true, || conv.forward(&x)).unwrap();
            let theirs = wrapped(&x, 1)
                .conv2d(&weights["c.weight"], 0, stride, 1, 1)
                .unwrap()
                .broadcast_add(&bias)
                .unwrap();
            assert_eq!(ours.dims(), theirs.dims());
            assert!(max_diff(&ours, &theirs) < 1e-12, "stride {stride} {h}x{w}");
            // Outside the scope: zero padding again, which differs at the border.
            let zero = conv.forward(&x).unwrap();
            let plain = x
                .conv2d(&weights["c.weight"], 1, stride, 1, 1)
                .unwrap()
                .broadcast_add(&bias)
                .unwrap();
            assert!(max_diff(&zero, &plain) < 1e-12);
            assert!(max_diff(&plain, &theirs) > 1e-3);
        }
    }

    /// The residual lands where the separate add puts it, also with circular padding on
    /// (where no fused kernel may take the convolution); a residual of another shape is an
    /// error, not a broadcast.
    #[test]
    fn the_residual_adds_where_a_separate_add_puts_it() {
        let dev = Device::Cpu;
        let vb = VarBuilder::from_tensors(random_weights(4, 3), DType::F64, &dev);
        let conv = conv3x3(3, 4, 1, vb.pp("c")).unwrap();
        let x = Tensor::randn(0f64, 1., (2, 3, 5, 6), &dev).unwrap();
        let residual = Tensor::randn(0f64, 1., (2, 4, 5, 6), &dev).unwrap();
        for circular in [false, true] {
            with_circular_padding(circular, || {
                let y = conv.forward(&x).unwrap();
                let added = conv.forward_add(&x, &residual).unwrap();
                assert!(max_diff(&added, &(&y + &residual).unwrap()) < 1e-12);
                let wrong = Tensor::zeros((2, 4, 5, 1), DType::F64, &dev).unwrap();
                assert!(conv.forward_add(&x, &wrong).is_err());
            });
        }
    }

    #[test]
    fn the_mode_is_restored_after_the_scope_even_on_panic() {
        let inner = with_circular_padding(true, || {
            let nested = with_circular_padding(false, circular_padding);
            (nested, circular_padding())
        });
        assert_eq!(inner, (false, true));
        assert!(!circular_padding());
        let caught = std::panic::catch_unwind(|| with_circular_padding(true, || panic!("x")));
        assert!(caught.is_err());
        assert!(!circular_padding());
        let small = Tensor::zeros((1, 1, 2, 2), DType::F32, &Device::Cpu).unwrap();
        assert!(pad_circular(&small, 3).is_err());
    }
}
