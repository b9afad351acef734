//! `sdkube bench --what ops`: the SD networks' primitives timed alone, candle's op against
//! sdkube's own GPU kernel where there is one.

use candle_core::{DType, Device, Tensor};

use super::{report, time, Precision};

/// The primitives of the SD networks at the shapes they run at, each timed alone (what
/// `benches/gpu_ops_reference.py` times in torch): where the time of a whole network goes.
/// Where sdkube has its own GPU kernel (`sdkube_nn::cuda`), candle's op and ours are both
/// timed and ours is checked against candle's on the same input (`max_diff`, `ref_max`).
pub(super) fn ops(dev: &Device, dt: DType, repeat: usize) -> anyhow::Result<()> {
    use anyhow::Context;
    use candle_nn::{Conv2d, Conv2dConfig, GroupNorm, Module};
    use sdkube_nn::to_channels_last;
    let rand = |shape: &[usize]| -> anyhow::Result<Tensor> {
        Ok(Tensor::randn(0f32, 1., shape, dev)?.to_dtype(dt)?)
    };
    let max_abs = |t: &Tensor| -> anyhow::Result<f32> {
        Ok(t.abs()?
            .to_dtype(DType::F32)?
            .flatten_all()?
            .max(0)?
            .to_scalar::<f32>()?)
    };
    type Ours<'a> = (&'a str, &'a dyn Fn() -> anyhow::Result<Option<Tensor>>);
    // Times each of `ours` too where it applies, and reports its largest difference from
    // `candle`'s result.
    let compare = |label: &str,
                   shape: &str,
                   candle: &dyn Fn() -> anyhow::Result<Tensor>,
                   ours: &[Ours]|
     -> anyhow::Result<()> {
        let s = time(dev, repeat, || candle().map(drop))?;
        report(&format!("{label} [candle]"), shape, s, dt, dev);
        for (name, ours) in ours {
            let Some(got) = ours()? else { continue };
            let want = candle()?;
            let diff = max_abs(&(got.to_dtype(DType::F32)? - want.to_dtype(DType::F32)?)?)?;
            let s = time(dev, repeat, || ours().map(drop))?;
            println!(
                "{}",
                serde_json::json!({"bench": format!("{label} [{name}]"), "shape": shape,
                    "ms": s * 1e3, "max_diff": diff, "ref_max": max_abs(&want)?,
                    "dtype": Precision::label(dt), "device": format!("{dev:?}")})
            );
        }
        Ok(())
    };
    // (label, batch, channels, side) of 3x3 convolutions: SD1.5 UNet at 512² with CFG, and
    // the VAE decoder's stages at 512².
    for (label, b, c, side) in [
        ("conv3x3 unet 320", 2, 320, 64),
        ("conv3x3 unet 640", 2, 640, 32),
        ("conv3x3 unet 1280", 2, 1280, 16),
        ("conv3x3 sdxl 320", 2, 320, 128),
        ("conv3x3 sdxl 640", 2, 640, 64),
        ("conv3x3 sdxl 1280", 2, 1280, 32),
        ("conv3x3 vae 512", 1, 512, 128),
        ("conv3x3 vae 256", 1, 256, 256),
        ("conv3x3 vae 128", 1, 128, 512),
    ] {
        let x = rand(&[b, c, side, side])?;
        let (w, bias) = ((rand(&[c, c, 3, 3])? * 0.05)?, rand(&[c])?);
        let cfg = Conv2dConfig {
            padding: 1,
            ..Default::default()
        };
        let m = Conv2d::new(w.clone(), Some(bias.clone()), cfg);
        // channels-last: input and weights laid out before timing, as a network keeps them
        let (xcl, wcl) = (to_channels_last(&x)?, to_channels_last(&w)?);
        compare(
            label,
            &format!("[{b},{c},{side},{side}]"),
            &|| Ok(m.forward(&x)?),
            &[
                ("sdkube", &|| Ok(own::conv2d_cudnn(&x, &w, &bias, false)?)),
                ("sdkube channels-last", &|| {
                    Ok(own::conv2d_cudnn(&xcl, &wcl, &bias, false)?)
                }),
                ("sdkube channels-last graph API", &|| {
                    Ok(own::conv2d_cudnn(&xcl, &wcl, &bias, true)?)
                }),
            ],
        )?;
    }
    // The input gradient of the UNet's convolutions (textual-inversion training): candle's
    // transposed convolution against cuDNN's backward-data; the downsampling one too.
    for (label, c, side, stride) in [
        ("conv3x3 input grad unet 320", 320, 64, 1),
        ("conv3x3 input grad unet 640", 640, 32, 1),
        ("conv3x3 input grad unet 320 stride 2", 320, 64, 2),
    ] {
        let out_side = (side - 1) / stride + 1;
        let grad = rand(&[1, c, out_side, out_side])?;
        let w = (rand(&[c, c, 3, 3])? * 0.05)?;
        let out_padding = side + 2 - (out_side - 1) * stride - 3;
        compare(
            label,
            &format!("[1,{c},{side},{side}]"),
            &|| Ok(grad.conv_transpose2d(&w, 1, out_padding, stride, 1)?),
            &[("sdkube", &|| {
                Ok(own::conv2d_input_grad(&grad, &w, (side, side), 1, stride)?)
            })],
        )?;
    }
    // Group norm + SiLU's input gradient (training): our kernel against candle's autograd of
    // its composed group norm, in f32.
    {
        let (b, c, side) = (1, 320, 64);
        let x = rand(&[b, c, side, side])?;
        let r = rand(&[b, c, side, side])?;
        let (w, bias) = (rand(&[c])?, rand(&[c])?);
        let f32_of = |t: &Tensor| t.to_dtype(DType::F32);
        let gn = GroupNorm::new(f32_of(&w)?, f32_of(&bias)?, c, 32, 1e-5)?;
        compare(
            "group_norm + silu input grad unet 320",
            &format!("[{b},{c},{side},{side}]"),
            &|| {
                let xv = candle_core::Var::from_tensor(&f32_of(&x)?)?;
                let y = gn.forward(xv.as_tensor())?.silu()?;
                let grads = (y * f32_of(&r)?)?.sum_all()?.backward()?;
                Ok(grads
                    .get(xv.as_tensor())
                    .context("no gradient")?
                    .to_dtype(dt)?)
            },
            &[("sdkube", &|| {
                Ok(own::group_norm_input_grad(
                    &x, &r, &w, &bias, 32, 1e-5, true,
                )?)
            })],
        )?;
    }
    for (label, b, c, side) in [
        ("group_norm + silu unet 320", 2, 320, 64),
        ("group_norm + silu unet 640", 2, 640, 64),
        ("group_norm + silu unet 1280", 2, 1280, 16),
        ("group_norm + silu sdxl 320", 2, 320, 128),
        ("group_norm + silu vae 128", 1, 128, 512),
    ] {
        let x = rand(&[b, c, side, side])?;
        let (w, bias) = (rand(&[c])?, rand(&[c])?);
        let gn = GroupNorm::new(w.clone(), bias.clone(), c, 32, 1e-5)?;
        let xcl = to_channels_last(&x)?;
        compare(
            label,
            &format!("[{b},{c},{side},{side}]"),
            &|| Ok(candle_nn::ops::silu(&gn.forward(&x)?)?),
            &[
                ("sdkube", &|| {
                    Ok(own::group_norm(&x, &w, &bias, (32, 1e-5, true), None)?)
                }),
                ("sdkube channels-last", &|| {
                    Ok(own::group_norm(&xcl, &w, &bias, (32, 1e-5, true), None)?)
                }),
            ],
        )?;
    }
    // A ResNet block's second norm, its input plus the time embedding ([N, C]): the sum
    // stored, then normalised, against the kernels adding it as they read.
    for (label, c, side) in [
        ("group_norm + silu of x + temb unet 320", 320, 64),
        ("group_norm + silu of x + temb unet 1280", 1280, 16),
    ] {
        let x = rand(&[2, c, side, side])?;
        let (w, bias, temb) = (rand(&[c])?, rand(&[c])?, rand(&[2, c])?);
        let gn = GroupNorm::new(w.clone(), bias.clone(), c, 32, 1e-5)?;
        let xcl = to_channels_last(&x)?;
        let norm = (32, 1e-5, true);
        compare(
            label,
            &format!("[2,{c},{side},{side}]"),
            &|| {
                let sum = x.broadcast_add(&temb.reshape((2, c, 1, 1))?)?;
                Ok(candle_nn::ops::silu(&gn.forward(&sum)?)?)
            },
            &[
                ("sdkube add, then norm", &|| {
                    let sum = own::add_bias(&xcl, &temb, 1)?.context("no add kernel")?;
                    Ok(own::group_norm(&sum, &w, &bias, norm, None)?)
                }),
                ("sdkube added as read", &|| {
                    Ok(own::group_norm(&xcl, &w, &bias, norm, Some(&temb))?)
                }),
            ],
        )?;
    }
    // Attention as blocks.rs computes it without its own kernel: heads split out, softmax(q kᵀ
    // / √d) v, heads merged back.
    for (label, b, heads, n, m, d) in [
        ("attention sd15 self 64²", 2, 8, 4096, 4096, 40),
        ("attention sd15 cross 64²", 2, 8, 4096, 77, 40),
        ("attention sdxl self 64²", 2, 10, 4096, 4096, 64),
        ("attention sdxl self 32²", 2, 20, 1024, 1024, 64),
        ("attention sdxl cross 32²", 2, 20, 1024, 77, 64),
        ("attention vae mid 64²", 1, 1, 4096, 4096, 512),
    ] {
        let q = rand(&[b, n, heads * d])?;
        let k = rand(&[b, m, heads * d])?;
        let v = rand(&[b, m, heads * d])?;
        let scale = 1.0 / (d as f64).sqrt();
        let split = |t: &Tensor, len: usize| -> candle_core::Result<Tensor> {
            t.reshape((b, len, heads, d))?.transpose(1, 2)?.contiguous()
        };
        let fused = (n == m)
            .then(|| Tensor::cat(&[&q, &k, &v], 2))
            .transpose()?;
        compare(
            label,
            &format!("[{b},{n},{heads}x{d}] x {m}"),
            &|| {
                let (q, k, v) = (split(&q, n)?, split(&k, m)?, split(&v, m)?);
                let scores = (q.matmul(&k.t()?)? * scale)?;
                let probs = candle_nn::ops::softmax_last_dim(&scores)?;
                Ok(probs
                    .matmul(&v)?
                    .transpose(1, 2)?
                    .reshape((b, n, heads * d))?)
            },
            &[
                ("sdkube", &|| {
                    Ok(own::flash_attention(&q, &k, &v, heads, scale)?)
                }),
                // q, k and v as a fused q/k/v projection leaves them: slices of [B, N, 3C] rows,
                // read in place (self-attention shapes; cross-attention's are packed)
                ("sdkube, q/k/v slices of one product", &|| {
                    let Some(all) = &fused else { return Ok(None) };
                    let c = heads * d;
                    let part = |i: usize| all.narrow(2, i * c, c);
                    let (q, k, v) = (part(0)?, part(1)?, part(2)?);
                    Ok(own::flash_attention(&q, &k, &v, heads, scale)?)
                }),
            ],
        )?;
    }
    // The transformer's linear layers on [B·HW, C] (with bias, as candle_nn::Linear runs
    // them), its GEGLU gate and layer norm, and the NCHW → tokens copy: SD1.5 and SDXL shapes.
    for (label, rows, cin, cout) in [
        ("linear geglu 320->2560", 2 * 4096, 320, 2560),
        ("linear sdxl geglu 1280->10240", 2 * 1024, 1280, 10240),
        ("linear sdxl ff out 5120->1280", 2 * 1024, 5120, 1280),
        ("linear sdxl attn 1280->1280", 2 * 1024, 1280, 1280),
        ("linear sdxl geglu 640->5120", 2 * 4096, 640, 5120),
    ] {
        let x = rand(&[1, rows, cin])?;
        let (w, bias) = (rand(&[cout, cin])?, rand(&[cout])?);
        let lin = candle_nn::Linear::new(w.clone(), Some(bias.clone()));
        compare(
            label,
            &format!("[{rows},{cin}]"),
            &|| Ok(lin.forward(&x)?),
            &[
                ("sdkube bias kernel", &|| {
                    let y = x.broadcast_matmul(&w.t()?)?;
                    Ok(own::add_bias(&y, &bias, 2)?)
                }),
                ("sdkube cuBLASLt", &|| {
                    Ok(own::linear(&x, &w, Some(&bias), None)?)
                }),
            ],
        )?;
    }
    // A transformer's residual connection: the output projection, then the add (candle), or
    // the add read in the product's epilogue (ours).
    for (label, rows, cin, cout) in [
        (
            "linear + residual sd15 attn out 320->320",
            2 * 4096,
            320,
            320,
        ),
        (
            "linear + residual sdxl ff out 5120->1280",
            2 * 1024,
            5120,
            1280,
        ),
    ] {
        let (x, residual) = (rand(&[1, rows, cin])?, rand(&[1, rows, cout])?);
        let (w, bias) = (rand(&[cout, cin])?, rand(&[cout])?);
        let lin = candle_nn::Linear::new(w.clone(), Some(bias.clone()));
        compare(
            label,
            &format!("[{rows},{cin}]"),
            &|| Ok((lin.forward(&x)? + &residual)?),
            &[("sdkube cuBLASLt epilogue", &|| {
                Ok(own::linear(&x, &w, Some(&bias), Some(&residual))?)
            })],
        )?;
    }
    let h = rand(&[2, 1024, 10240])?;
    compare(
        "geglu gate sdxl",
        "[2,1024,10240]",
        &|| {
            let (value, gate) = (h.narrow(2, 0, 5120)?, h.narrow(2, 5120, 5120)?);
            Ok((value * gate.gelu_erf()?)?)
        },
        &[("sdkube", &|| Ok(own::geglu(&h)?))],
    )?;
    // Layer norm at the transformers' token counts and widths (SD1.5's 64² and 8², SDXL's 32²).
    for (label, rows, cols) in [
        ("layer_norm sd15 320", 2 * 4096, 320),
        ("layer_norm sd15 1280", 2 * 64, 1280),
        ("layer_norm sdxl", 2 * 1024, 1280),
    ] {
        let x = rand(&[rows / 2, 2, cols])?;
        let (w, bias) = (rand(&[cols])?, rand(&[cols])?);
        let ln = candle_nn::LayerNorm::new(w.clone(), bias.clone(), 1e-5);
        compare(
            label,
            &format!("[{rows},{cols}]"),
            &|| Ok(ln.forward(&x)?),
            &[("sdkube", &|| Ok(own::layer_norm(&x, &w, &bias, 1e-5)?))],
        )?;
    }
    let x = rand(&[2, 1280, 32, 32])?;
    let s = time(dev, repeat, || {
        x.permute((0, 2, 3, 1))?.contiguous()?;
        Ok(())
    })?;
    report("nchw to tokens sdxl", "[2,1280,32,32]", s, dt, dev);
    let x = rand(&[1, 256, 256, 256])?;
    let xcl = to_channels_last(&x)?;
    compare(
        "upsample nearest 2x vae",
        "[1,256,256,256]",
        &|| Ok(x.upsample_nearest2d(512, 512)?),
        &[
            ("sdkube", &|| Ok(own::upsample_nearest_2x(&x)?)),
            ("sdkube channels-last", &|| {
                Ok(own::upsample_nearest_2x(&xcl)?)
            }),
        ],
    )?;
    // The time embedding added per sample and channel (every UNet resnet), channels-last
    let (x, temb) = (rand(&[2, 320, 64, 64])?, rand(&[2, 320])?);
    let xcl = to_channels_last(&x)?;
    compare(
        "time bias unet 320",
        "[2,320,64,64]",
        &|| Ok(x.broadcast_add(&temb.reshape((2, 320, 1, 1))?)?),
        &[
            ("sdkube", &|| Ok(own::add_bias(&x, &temb, 1)?)),
            ("sdkube channels-last", &|| {
                Ok(own::add_bias(&xcl, &temb, 1)?)
            }),
        ],
    )?;
    // RealESRGAN's activation (RRDBNet's dense blocks, at its input size)
    let x = rand(&[1, 32, 512, 512])?;
    compare(
        "leaky relu x4plus",
        "[1,32,512,512]",
        &|| Ok(candle_nn::ops::leaky_relu(&x, 0.2)?),
        &[("sdkube", &|| Ok(own::leaky_relu(&x, 0.2)?))],
    )?;
    // GFPGAN's decoder at its last level: bilinear ×2 of the 256² features, then the noise,
    // leaky ReLU and spatial feature transform after the modulated convolution
    let x = rand(&[1, 128, 256, 256])?;
    compare(
        "upsample bilinear 2x gfpgan",
        "[1,128,256,256]",
        &|| Ok(x.upsample_bilinear2d_with_scale(2.0, 2.0, false)?),
        &[("sdkube", &|| Ok(own::upsample_bilinear_2x(&x)?))],
    )?;
    let (x, noise, strength) = (
        rand(&[1, 64, 512, 512])?,
        rand(&[1, 1, 512, 512])?,
        rand(&[1])?,
    );
    let (scale, shift) = (rand(&[1, 32, 512, 512])?, rand(&[1, 32, 512, 512])?);
    compare(
        "noise leaky relu sft gfpgan",
        "[1,64,512,512]",
        &|| {
            let y = candle_nn::ops::leaky_relu(
                &x.broadcast_add(&noise.broadcast_mul(&strength)?)?,
                0.2,
            )?;
            let sft = ((y.narrow(1, 32, 32)? * &scale)? + &shift)?;
            Ok(Tensor::cat(&[y.narrow(1, 0, 32)?, sft], 1)?)
        },
        &[("sdkube", &|| {
            Ok(own::noise_leaky_relu(
                &x,
                &noise,
                &strength,
                0.2,
                Some((&scale, &shift)),
            )?)
        })],
    )?;
    // The softmax's input gradient of SD1.5's 64² self-attention backward, one block of
    // query rows (2 samples × 8 heads × 256 rows × 4096 keys)
    let (p, dp, row_dot) = (
        candle_nn::ops::softmax_last_dim(&rand(&[2, 8, 256, 4096])?)?,
        rand(&[2, 8, 256, 4096])?,
        rand(&[2, 8, 256, 1])?,
    );
    compare(
        "softmax grad sd15 self 64²",
        "[2,8,256,4096]",
        &|| Ok((&p * dp.broadcast_sub(&row_dot)?)?),
        &[("sdkube", &|| Ok(own::softmax_grad(&p, &dp, &row_dot)?))],
    )?;
    // The input gradients of SD1.5's 64² transformer block: its GEGLU gate and a layer norm
    let (h, grad) = (rand(&[2, 4096, 2560])?, rand(&[2, 4096, 1280])?);
    compare(
        "geglu input grad sd15 64²",
        "[2,4096,2560]",
        &|| {
            let (value, gate) = (h.narrow(2, 0, 1280)?, h.narrow(2, 1280, 1280)?);
            let (value, gate) = (value.to_dtype(DType::F32)?, gate.to_dtype(DType::F32)?);
            let g = grad.to_dtype(DType::F32)?;
            let cdf = (((&gate * std::f64::consts::FRAC_1_SQRT_2)?.erf()? + 1.)? * 0.5)?;
            let pdf = ((gate.sqr()? * -0.5)?.exp()? * 0.398_942_280_401_432_7)?;
            let d_value = (&g * (&gate * &cdf)?)?;
            let d_gate = ((&g * &value)? * (&cdf + (&gate * pdf)?)?)?;
            Ok(Tensor::cat(&[d_value, d_gate], 2)?.to_dtype(dt)?)
        },
        &[("sdkube", &|| Ok(own::geglu_grad(&h, &grad)?))],
    )?;
    let (x, grad, weight) = (
        rand(&[2, 4096, 320])?,
        rand(&[2, 4096, 320])?,
        rand(&[320])?,
    );
    compare(
        "layer norm input grad sd15 64²",
        "[2,4096,320]",
        &|| {
            let x = x.to_dtype(DType::F32)?;
            let centered = x.broadcast_sub(&x.mean_keepdim(2)?)?;
            let rstd = (centered.sqr()?.mean_keepdim(2)? + 1e-5)?.sqrt()?.recip()?;
            let xhat = centered.broadcast_mul(&rstd)?;
            let gw = grad
                .to_dtype(DType::F32)?
                .broadcast_mul(&weight.to_dtype(DType::F32)?)?;
            let along = (&gw * &xhat)?.mean_keepdim(2)?;
            let dx = (gw.broadcast_sub(&gw.mean_keepdim(2)?)? - xhat.broadcast_mul(&along)?)?;
            Ok(dx.broadcast_mul(&rstd)?.to_dtype(dt)?)
        },
        &[("sdkube", &|| {
            Ok(own::layer_norm_input_grad(&x, &grad, &weight, 1e-5)?)
        })],
    )?;
    attention_input_grad(dev, dt, repeat)?;
    Ok(())
}

/// Training's attention backward (`sdkube_nn`'s tracked layers) in `dt` against the same in f32:
/// the input gradient of SD1.5's self-attention at 64², its largest, and its time.
fn attention_input_grad(dev: &Device, dt: DType, repeat: usize) -> anyhow::Result<()> {
    use anyhow::Context;
    use std::collections::HashMap;
    let (tokens, dim, heads) = (4096, 320, 8);
    let rand = |shape: &[usize], scale: f64| -> anyhow::Result<Tensor> {
        Ok((Tensor::randn(0f32, 1., shape, dev)? * scale)?)
    };
    let mut weights = HashMap::new();
    for name in ["to_q", "to_k", "to_v", "to_out.0"] {
        weights.insert(format!("{name}.weight"), rand(&[dim, dim], 0.05)?);
    }
    weights.insert("to_out.0.bias".to_owned(), rand(&[dim], 0.05)?);
    let (x0, r) = (rand(&[2, tokens, dim], 1.0)?, rand(&[2, tokens, dim], 1.0)?);
    let input_grad = |dt: DType| -> anyhow::Result<Tensor> {
        let vb = candle_nn::VarBuilder::from_tensors(weights.clone(), dt, dev);
        let attn =
            sdkube_models::blocks::Attention::new(vb, dim, dim, heads, dim / heads, false, false)?;
        let x = candle_core::Var::from_tensor(&x0.to_dtype(dt)?)?;
        let y = attn.forward(x.as_tensor(), None)?;
        let grads = (y.to_dtype(DType::F32)? * &r)?.sum_all()?.backward()?;
        let dx = grads.get(x.as_tensor()).context("no input gradient")?;
        Ok(dx.to_dtype(DType::F32)?)
    };
    let want = input_grad(DType::F32)?;
    let got = input_grad(dt)?;
    let max =
        |t: &Tensor| -> anyhow::Result<f32> { Ok(t.abs()?.flatten_all()?.max(0)?.to_scalar()?) };
    let s = time(dev, repeat, || input_grad(dt).map(drop))?;
    println!(
        "{}",
        serde_json::json!({"bench": "attention input grad sd15 self 64² (forward + backward)",
            "shape": format!("[2,{tokens},{heads}x{}]", dim / heads), "ms": s * 1e3,
            "max_diff_vs_f32": max(&(got - &want)?)?, "ref_max": max(&want)?,
            "dtype": Precision::label(dt), "device": format!("{dev:?}")})
    );
    Ok(())
}

/// sdkube's own GPU kernels, or nothing where they are not built in.
pub(super) mod own {
    #[cfg(not(feature = "cuda"))]
    use candle_core::Tensor;

    #[cfg(feature = "cuda")]
    pub use sdkube_nn::cuda::{
        add_bias, conv2d_input_grad, flash_attention, geglu, geglu_grad, group_norm,
        group_norm_input_grad, layer_norm, layer_norm_input_grad, leaky_relu, linear,
        noise_leaky_relu, softmax_grad, upsample_bilinear_2x, upsample_nearest_2x,
    };

    /// The CUDA memory pool's high-water marks (see `sdkube_nn::cuda`), `None` off CUDA.
    pub fn memory_high_water(
        device: &candle_core::Device,
        reset: bool,
    ) -> candle_core::Result<Option<(u64, u64)>> {
        match device {
            #[cfg(feature = "cuda")]
            candle_core::Device::Cuda(dev) => {
                sdkube_nn::cuda::memory_high_water(dev, reset).map(Some)
            }
            _ => {
                let _ = reset;
                Ok(None)
            }
        }
    }

    /// A 3x3 convolution (padding 1, stride 1) through cuDNN, legacy or graph API; `None`
    /// (after saying why) where the graph API has no plan for it.
    #[cfg(feature = "cuda")]
    pub fn conv2d_cudnn(
        x: &candle_core::Tensor,
        w: &candle_core::Tensor,
        bias: &candle_core::Tensor,
        graph_api: bool,
    ) -> candle_core::Result<Option<candle_core::Tensor>> {
        match sdkube_nn::cuda::conv2d_cudnn(x, w, bias, (1, 1), graph_api) {
            Ok(y) => Ok(Some(y)),
            Err(e) if graph_api => {
                tracing::warn!(x = ?x.dims(), "no graph API row: {e}");
                Ok(None)
            }
            Err(e) => Err(e),
        }
    }

    #[cfg(not(feature = "cuda"))]
    pub fn conv2d_cudnn(
        _: &Tensor,
        _: &Tensor,
        _: &Tensor,
        _: bool,
    ) -> candle_core::Result<Option<Tensor>> {
        Ok(None)
    }

    #[cfg(not(feature = "cuda"))]
    pub fn add_bias(_: &Tensor, _: &Tensor, _: usize) -> candle_core::Result<Option<Tensor>> {
        Ok(None)
    }

    #[cfg(not(feature = "cuda"))]
    #[allow(clippy::too_many_arguments)]
    pub fn group_norm_input_grad(
        _: &Tensor,
        _: &Tensor,
        _: &Tensor,
        _: &Tensor,
        _: usize,
        _: f64,
        _: bool,
    ) -> candle_core::Result<Option<Tensor>> {
        Ok(None)
    }

    #[cfg(not(feature = "cuda"))]
    pub fn conv2d_input_grad(
        _: &Tensor,
        _: &Tensor,
        _: (usize, usize),
        _: usize,
        _: usize,
    ) -> candle_core::Result<Option<Tensor>> {
        Ok(None)
    }

    #[cfg(not(feature = "cuda"))]
    pub fn linear(
        _: &Tensor,
        _: &Tensor,
        _: Option<&Tensor>,
        _: Option<&Tensor>,
    ) -> candle_core::Result<Option<Tensor>> {
        Ok(None)
    }

    #[cfg(not(feature = "cuda"))]
    pub fn upsample_nearest_2x(_: &Tensor) -> candle_core::Result<Option<Tensor>> {
        Ok(None)
    }

    #[cfg(not(feature = "cuda"))]
    pub fn leaky_relu(_: &Tensor, _: f64) -> candle_core::Result<Option<Tensor>> {
        Ok(None)
    }

    #[cfg(not(feature = "cuda"))]
    pub fn upsample_bilinear_2x(_: &Tensor) -> candle_core::Result<Option<Tensor>> {
        Ok(None)
    }

    #[cfg(not(feature = "cuda"))]
    pub fn geglu_grad(_: &Tensor, _: &Tensor) -> candle_core::Result<Option<Tensor>> {
        Ok(None)
    }

    #[cfg(not(feature = "cuda"))]
    pub fn layer_norm_input_grad(
        _: &Tensor,
        _: &Tensor,
        _: &Tensor,
        _: f64,
    ) -> candle_core::Result<Option<Tensor>> {
        Ok(None)
    }

    #[cfg(not(feature = "cuda"))]
    pub fn softmax_grad(_: &Tensor, _: &Tensor, _: &Tensor) -> candle_core::Result<Option<Tensor>> {
        Ok(None)
    }

    #[cfg(not(feature = "cuda"))]
    pub fn noise_leaky_relu(
        _: &Tensor,
        _: &Tensor,
        _: &Tensor,
        _: f64,
        _: Option<(&Tensor, &Tensor)>,
    ) -> candle_core::Result<Option<Tensor>> {
        Ok(None)
    }

    #[cfg(not(feature = "cuda"))]
    pub fn geglu(_: &Tensor) -> candle_core::Result<Option<Tensor>> {
        Ok(None)
    }

    #[cfg(not(feature = "cuda"))]
    pub fn layer_norm(
        _: &Tensor,
        _: &Tensor,
        _: &Tensor,
        _: f64,
    ) -> candle_core::Result<Option<Tensor>> {
        Ok(None)
    }

    #[cfg(not(feature = "cuda"))]
    pub fn group_norm(
        _: &Tensor,
        _: &Tensor,
        _: &Tensor,
        _: (usize, f64, bool),
        _: Option<&Tensor>,
    ) -> candle_core::Result<Option<Tensor>> {
        Ok(None)
    }

    #[cfg(not(feature = "cuda"))]
    pub fn flash_attention(
        _: &Tensor,
        _: &Tensor,
        _: &Tensor,
        _: usize,
        _: f64,
    ) -> candle_core::Result<Option<Tensor>> {
        Ok(None)
    }
}
