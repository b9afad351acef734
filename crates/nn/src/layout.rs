//! Channels-last feature maps (PyTorch's `torch.channels_last`) for the GPU's fp16 networks.
//!
//! A channels-last tensor has the logical shape `[N, C, H, W]` of every other feature map; only
//! its memory is laid out `[N, H, W, C]` (it is the `permute(0, 3, 1, 2)` view of a contiguous
//! `[N, H, W, C]` tensor). cuDNN's tensor-core convolutions read and write that layout
//! natively; given NCHW they transpose around the computation. And a transformer's tokens
//! `[N, H·W, C]` are a free view of it, where NCHW needs a copy each way.
//!
//! Model code does not depend on the layout: every op gives the same values in either one. The
//! layout only decides which kernels run. Where [`channels_last_on`] says so, convolutions
//! write channels-last, and the ops between them keep it: group norm, bias adds, [`add`],
//! [`cat_channels`], nearest upsampling, [`from_nhwc`]. Any other op sees an ordinary strided
//! tensor (candle's ops take any layout), so a missed spot costs a copy, never a wrong value.
//!
//! On by default; `SDKUBE_CHANNELS_LAST=off` keeps every feature map NCHW.

use candle_core::{DType, Result, Tensor};

use crate::switch::Switch;

/// Whether convolutions on `t`'s device and dtype write channels-last: CUDA, fp16 or bf16
/// (tensor-core widths), and not `SDKUBE_CHANNELS_LAST=off`.
pub fn channels_last_on(t: &Tensor) -> bool {
    enabled() && t.device().is_cuda() && matches!(t.dtype(), DType::F16 | DType::BF16)
}

/// Whether channels-last runs where `SDKUBE_CHANNELS_LAST` says nothing (`on` / `off`). On: on
/// an H100 the SD1.5 UNet step took 11.95 ms instead of 12.94 and txt2img 274 ms instead of 289
/// (SDXL the same), images within one 8-bit level of NCHW's (issue 19).
const CHANNELS_LAST_BY_DEFAULT: bool = true;

static CHANNELS_LAST: Switch = Switch::new(
    "SDKUBE_CHANNELS_LAST",
    "on",
    "off",
    CHANNELS_LAST_BY_DEFAULT,
);

fn enabled() -> bool {
    CHANNELS_LAST.is_on()
}

/// Whether `t` is a channels-last `[N, C, H, W]` tensor (and not also a contiguous one: with a
/// single channel, or a single pixel, the two layouts are the same memory).
pub fn is_channels_last(t: &Tensor) -> bool {
    let Ok((_, c, h, w)) = t.dims4() else {
        return false;
    };
    t.stride() == [h * w * c, 1, w * c, c] && !t.is_contiguous()
}

/// `t` `[N, C, H, W]` laid out channels-last (a copy unless it already is).
pub fn to_channels_last(t: &Tensor) -> Result<Tensor> {
    if is_channels_last(t) {
        return Ok(t.clone());
    }
    t.permute((0, 2, 3, 1))?.contiguous()?.permute((0, 3, 1, 2))
}

/// The memory of `t` `[N, C, H, W]` laid out channels-last, as the contiguous `[N, H, W, C]`
/// tensor it is (a copy first unless `t` already is channels-last).
fn nhwc(t: &Tensor) -> Result<Tensor> {
    to_channels_last(t)?.permute((0, 2, 3, 1))
}

/// `t` `[N, H, W, C]` as the feature map `[N, C, H, W]`: a view, channels-last, where
/// [`channels_last_on`] holds for `t`; a contiguous NCHW copy elsewhere.
pub fn from_nhwc(t: &Tensor) -> Result<Tensor> {
    let map = t.permute((0, 3, 1, 2))?;
    if channels_last_on(t) && t.is_contiguous() {
        Ok(map)
    } else {
        map.contiguous()
    }
}

/// `a + b`, channels-last when either is (a residual connection between convolutions).
pub fn add(a: &Tensor, b: &Tensor) -> Result<Tensor> {
    if a.dims() == b.dims() && (is_channels_last(a) || is_channels_last(b)) {
        return (nhwc(a)? + nhwc(b)?)?.permute((0, 3, 1, 2));
    }
    a + b
}

/// Feature maps `[N, Cᵢ, H, W]` joined along their channels (a UNet's skip connection):
/// channels-last when any of them is.
pub fn cat_channels(maps: &[&Tensor]) -> Result<Tensor> {
    if maps.iter().any(|t| is_channels_last(t)) {
        let memory = maps.iter().map(|t| nhwc(t)).collect::<Result<Vec<_>>>()?;
        return Tensor::cat(&memory, 3)?.permute((0, 3, 1, 2));
    }
    Tensor::cat(maps, 1)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, IndexOp};

    fn randn(shape: &[usize]) -> Tensor {
        Tensor::randn(0f32, 1., shape, &Device::Cpu).unwrap()
    }

    fn same(a: &Tensor, b: &Tensor) -> bool {
        a.dims() == b.dims()
            && a.flatten_all().unwrap().to_vec1::<f32>().unwrap()
                == b.flatten_all().unwrap().to_vec1::<f32>().unwrap()
    }

    #[test]
    fn channels_last_is_the_same_map_in_another_memory_order() {
        let x = randn(&[2, 3, 4, 5]);
        assert!(!is_channels_last(&x));
        let cl = to_channels_last(&x).unwrap();
        assert!(is_channels_last(&cl));
        assert!(same(&cl, &x));
        // Its memory is [N, H, W, C]: element (n, c, h, w) at ((n·H + h)·W + w)·C + c.
        let memory = cl
            .permute((0, 2, 3, 1))
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        let (n, c, h, w) = (1, 2, 3, 4);
        let expected = x.i((n, c, h, w)).unwrap().to_scalar::<f32>().unwrap();
        assert_eq!(memory[((n * 4 + h) * 5 + w) * 3 + c], expected);
        // Already channels-last: no copy; one channel: both layouts at once, called contiguous.
        assert!(is_channels_last(&to_channels_last(&cl).unwrap()));
        let one = to_channels_last(&randn(&[2, 1, 4, 5])).unwrap();
        assert!(one.is_contiguous() && !is_channels_last(&one));
    }

    #[test]
    fn add_and_cat_keep_channels_last_and_give_the_values_of_nchw() {
        let (a, b) = (randn(&[2, 3, 4, 5]), randn(&[2, 3, 4, 5]));
        let (acl, bcl) = (to_channels_last(&a).unwrap(), to_channels_last(&b).unwrap());
        let sum = (&a + &b).unwrap();
        for (x, y) in [(&acl, &bcl), (&acl, &b), (&a, &bcl)] {
            let s = add(x, y).unwrap();
            assert!(is_channels_last(&s) && same(&s, &sum));
        }
        let plain = add(&a, &b).unwrap();
        assert!(plain.is_contiguous() && same(&plain, &sum));

        let c = randn(&[2, 2, 4, 5]);
        let joined = Tensor::cat(&[&a, &c], 1).unwrap();
        let mixed = cat_channels(&[&acl, &c]).unwrap();
        assert!(is_channels_last(&mixed) && same(&mixed, &joined));
        let plain = cat_channels(&[&a, &c]).unwrap();
        assert!(plain.is_contiguous() && same(&plain, &joined));
    }

    #[test]
    fn tokens_back_to_a_map_are_nchw_off_the_gpu() {
        let tokens = randn(&[2, 4, 5, 3]);
        let map = from_nhwc(&tokens).unwrap();
        assert!(map.is_contiguous());
        assert!(same(&map, &tokens.permute((0, 3, 1, 2)).unwrap()));
    }
}
