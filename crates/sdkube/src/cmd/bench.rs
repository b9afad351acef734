//! `sdkube bench`: timings of the full-size architectures with random weights (speed does
//! not depend on weight values), one JSON object per line. `benches/gpu_reference.py` times
//! diffusers on the same shapes, `benches/gpu_restore_reference.py` basicsr/realesrgan/gfpgan;
//! run both in one session and compare ratios.

use std::collections::HashMap;
use std::process::ExitCode;
use std::time::Instant;

use candle_core::{DType, Device, Tensor};
use sdkube_models::unet::AddedConditioning;
use sdkube_models::{presets, Family};
use sdkube_pipeline::sampler::Flow;
use sdkube_pipeline::{Engine, Request};

use super::device::{DeviceArgs, Precision};

#[derive(clap::Args, Debug)]
pub struct Args {
    /// What to time: unet-sd15, unet-sdxl, vae, txt2img-sd15, txt2img-sdxl, controlnet-sd15
    /// (a CFG step of the SD 1.5 UNet with one ControlNet, and without), grad-sd15 (the
    /// UNet's part of a textual-inversion step: forward and the gradient to the conditioning),
    /// gfpgan (v1.4, one face, fp32), x4plus (RealESRGAN, 512², whole and in tiles of 256,
    /// fp32), ops (the primitives the networks spend their time in, at their real shapes; comma
    /// separated).
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "unet-sd15,unet-sdxl,vae,txt2img-sd15,txt2img-sdxl"
    )]
    pub what: Vec<String>,
    /// Timed repetitions after one warm-up.
    #[arg(long, default_value_t = 10)]
    pub repeat: usize,
    /// Steps of the whole txt2img runs.
    #[arg(long, default_value_t = 20)]
    pub steps: usize,
    /// Instead of timing: write the full-size random-weight model of the first `txt2img-*`
    /// item as a diffusers folder here (for end-to-end server measurements), and exit.
    #[arg(long)]
    pub save_model: Option<std::path::PathBuf>,
    /// After timing each UNet, VAE and txt2img item: where one run's time went, by kind of
    /// operation (GPU time from CUDA events; `other` is everything not wrapped: elementwise ops,
    /// copies, launch gaps).
    #[arg(long)]
    pub profile: bool,
    #[command(flatten)]
    pub device: DeviceArgs,
}

fn time(
    device: &Device,
    repeat: usize,
    mut f: impl FnMut() -> anyhow::Result<()>,
) -> anyhow::Result<f64> {
    own::memory_high_water(device, true)?;
    // Three untimed calls: the first makes plans and kernels, the second captures the UNet's
    // CUDA graph, the third checks its replay against the eager pass (later calls replay it).
    for _ in 0..3 {
        f()?;
    }
    device.synchronize()?;
    let start = Instant::now();
    for _ in 0..repeat {
        f()?;
    }
    device.synchronize()?;
    Ok(start.elapsed().as_secs_f64() / repeat as f64)
}

/// Runs `f` once with [`sdkube_nn::profile`] on and prints its time by kind of operation.
fn profile(
    what: &str,
    shape: &str,
    device: &Device,
    f: impl FnOnce() -> anyhow::Result<()>,
) -> anyhow::Result<()> {
    use sdkube_nn::profile as p;
    p::take()?; // anything recorded before
    p::enable(true);
    let out = p::timed("total", device, || f().map_err(candle_core::Error::wrap));
    p::enable(false);
    out?;
    let rows = p::take()?;
    let total = rows.iter().find(|r| r.0 == "total").map_or(0.0, |r| r.2);
    let parts: f64 = rows.iter().filter(|r| r.0 != "total").map(|r| r.2).sum();
    let other = ("other", 0, total - parts);
    for (kind, calls, ms) in rows.into_iter().chain([other]) {
        println!(
            "{}",
            serde_json::json!({"profile": what, "shape": shape, "kind": kind, "calls": calls,
                "ms": ms, "share": if total > 0.0 { ms / total } else { 0.0 }})
        );
    }
    Ok(())
}

/// One timing as a JSON line; on CUDA with the memory pool's high-water marks since [`time`]
/// began (in use and reserved, MiB: PyTorch's `max_memory_allocated` / `_reserved`).
fn report(what: &str, shape: &str, seconds: f64, dtype: DType, device: &Device) {
    let mut line = serde_json::json!({"bench": what, "shape": shape, "ms": seconds * 1e3,
        "per_s": 1.0 / seconds, "dtype": Precision::label(dtype), "device": format!("{device:?}")});
    if let Ok(Some((used, reserved))) = own::memory_high_water(device, false) {
        line["pool_peak_mib"] = (used >> 20).into();
        line["pool_peak_reserved_mib"] = (reserved >> 20).into();
    }
    println!("{line}");
}

pub fn run(args: Args) -> anyhow::Result<ExitCode> {
    if let Some(dir) = &args.save_model {
        let family = match args
            .what
            .iter()
            .find(|w| w.starts_with("txt2img-"))
            .map(String::as_str)
        {
            Some("txt2img-sdxl") => Family::Sdxl,
            Some("txt2img-sd15") => Family::Sd1,
            _ => anyhow::bail!("--save-model needs --what txt2img-sd15 or txt2img-sdxl"),
        };
        let (_, dt) = args.device.resolve()?;
        let weights = presets::random_model(family, dt, &Device::Cpu)?;
        sdkube_models::save_diffusers(&weights, dir)?;
        eprintln!(
            "wrote a random-weight {} model to {}",
            family.name(),
            dir.display()
        );
        return Ok(ExitCode::SUCCESS);
    }
    let (dev, dt) = args.device.resolve()?;
    for what in &args.what {
        match what.as_str() {
            "unet-sd15" | "unet-sdxl" => {
                let sdxl = what == "unet-sdxl";
                let family = if sdxl { Family::Sdxl } else { Family::Sd1 };
                // The UNet alone, as diffusers' reference holds it: nothing else in memory.
                let unet = presets::random_unet(family, dt, &dev)?.build(&dev, dt)?;
                let (side, ctx_dim) = if sdxl { (128, 2048) } else { (64, 768) };
                for batch in [1usize, 2] {
                    let x = Tensor::randn(0f32, 1., (batch, 4, side, side), &dev)?.to_dtype(dt)?;
                    let ctx = Tensor::randn(0f32, 1., (batch, 77, ctx_dim), &dev)?.to_dtype(dt)?;
                    let t = Tensor::new(&[500f32], &dev)?;
                    let added = sdxl
                        .then(|| -> anyhow::Result<_> {
                            Ok(AddedConditioning {
                                text_embeds: Tensor::randn(0f32, 1., (batch, 1280), &dev)?
                                    .to_dtype(dt)?,
                                time_ids: Tensor::new(
                                    &[1024f32, 1024., 0., 0., 1024., 1024.],
                                    &dev,
                                )?
                                .reshape((1, 6))?
                                .repeat((batch, 1))?
                                .to_dtype(dt)?,
                            })
                        })
                        .transpose()?;
                    let run = || -> anyhow::Result<()> {
                        unet.forward(&x, &t, &ctx, added.as_ref())?;
                        Ok(())
                    };
                    let s = time(&dev, args.repeat, run)?;
                    let shape = format!("{}x{} batch {batch}", side * 8, side * 8);
                    report(what, &shape, s, dt, &dev);
                    if args.profile {
                        profile(what, &shape, &dev, run)?;
                    }
                }
            }
            "controlnet-sd15" => {
                // One CFG step at 512² (batch 2) of the SD 1.5 UNet steered by one ControlNet,
                // beside the UNet's step alone: what a ControlNet unit adds to each step.
                let unet = presets::random_unet(Family::Sd1, dt, &dev)?.build(&dev, dt)?;
                let cn = presets::random_controlnet(Family::Sd1, dt, &dev)?.build(&dev, dt)?;
                let x = Tensor::randn(0f32, 1., (2, 4, 64, 64), &dev)?.to_dtype(dt)?;
                let ctx = Tensor::randn(0f32, 1., (2, 77, 768), &dev)?.to_dtype(dt)?;
                let cond = Tensor::rand(0f32, 1., (2, 3, 512, 512), &dev)?.to_dtype(dt)?;
                let t = Tensor::new(&[500f32], &dev)?;
                let plain = || -> anyhow::Result<()> {
                    unet.forward(&x, &t, &ctx, None)?;
                    Ok(())
                };
                let steered = || -> anyhow::Result<()> {
                    let r = cn.forward(&x, &t, &ctx, None, &cond)?;
                    unet.forward_with_control(&x, &t, &ctx, None, Some(&r))?;
                    Ok(())
                };
                let shape = "512x512 batch 2";
                report(
                    "unet-sd15",
                    shape,
                    time(&dev, args.repeat, plain)?,
                    dt,
                    &dev,
                );
                report(what, shape, time(&dev, args.repeat, steered)?, dt, &dev);
                if args.profile {
                    profile(what, shape, &dev, steered)?;
                }
            }
            "grad-sd15" => {
                // The UNet's share of a textual-inversion step at 512²: forward, then the
                // gradient of the denoising loss with respect to the conditioning (the text
                // encoder's output), every weight frozen.
                let unet = presets::random_unet(Family::Sd1, dt, &dev)?.build(&dev, dt)?;
                for batch in [1usize, 2] {
                    let x = Tensor::randn(0f32, 1., (batch, 4, 64, 64), &dev)?.to_dtype(dt)?;
                    let noise = Tensor::randn(0f32, 1., (batch, 4, 64, 64), &dev)?;
                    let ctx = candle_core::Var::randn(0f32, 1., (batch, 77, 768), &dev)?;
                    let t = Tensor::new(&[500f32], &dev)?;
                    let grad = || -> anyhow::Result<Tensor> {
                        let pred = unet.forward(&x, &t, &ctx.to_dtype(dt)?, None)?;
                        let loss = (pred.to_dtype(DType::F32)? - &noise)?.sqr()?.mean_all()?;
                        let grads = loss.backward()?;
                        let grad = grads.get(ctx.as_tensor()).cloned();
                        grad.ok_or_else(|| anyhow::anyhow!("no gradient reached the conditioning"))
                    };
                    let run = || grad().map(drop);
                    let s = time(&dev, args.repeat, run)?;
                    let shape = format!("512x512 batch {batch}");
                    report(what, &shape, s, dt, &dev);
                    // The gradient itself, to compare paths (seeded weights and inputs).
                    let g = grad()?.to_dtype(DType::F32)?;
                    let norm = g.sqr()?.sum_all()?.sqrt()?.to_scalar::<f32>()?;
                    let first = g.flatten_all()?.narrow(0, 0, 4)?.to_vec1::<f32>()?;
                    println!(
                        "{}",
                        serde_json::json!({"bench": what, "shape": shape,
                        "grad_norm": norm, "grad_first": first})
                    );
                    if args.profile {
                        profile(what, &shape, &dev, run)?;
                    }
                }
            }
            "vae" => {
                let vae = presets::random_vae(Family::Sd1, dt, &dev)?.build(&dev, dt)?;
                for side in [64usize, 128] {
                    let latent = Tensor::randn(0f32, 1., (1, 4, side, side), &dev)?.to_dtype(dt)?;
                    let decode = || -> anyhow::Result<()> {
                        vae.decode(&latent)?;
                        Ok(())
                    };
                    let s = time(&dev, args.repeat.min(5), decode)?;
                    let shape = format!("{}x{}", side * 8, side * 8);
                    report("vae-decode", &shape, s, dt, &dev);
                    if args.profile {
                        profile("vae-decode", &shape, &dev, decode)?;
                    }
                    let image =
                        Tensor::randn(0f32, 1., (1, 3, side * 8, side * 8), &dev)?.to_dtype(dt)?;
                    let s = time(&dev, args.repeat.min(5), || {
                        vae.encode(&image)?;
                        Ok(())
                    })?;
                    report(
                        "vae-encode",
                        &format!("{}x{}", side * 8, side * 8),
                        s,
                        dt,
                        &dev,
                    );
                }
            }
            "txt2img-sd15" | "txt2img-sdxl" => {
                let sdxl = what == "txt2img-sdxl";
                let family = if sdxl { Family::Sdxl } else { Family::Sd1 };
                // With --vram low the weights wait on the CPU, as loaded checkpoints do.
                let low = matches!(args.device.vram, super::device::Vram::Low);
                let weights_device = if low { Device::Cpu } else { dev.clone() };
                let weights = presets::random_model(family, dt, &weights_device)?;
                let mut engine =
                    Engine::new(weights, what, dev.clone(), dt, args.device.vram.into())?;
                let side = if sdxl { 1024 } else { 512 };
                let req = Request {
                    prompt: "a photo of an astronaut riding a horse".into(),
                    sampler: "Euler".into(),
                    steps: args.steps,
                    width: side,
                    height: side,
                    ..Default::default()
                };
                let s = time(&dev, 2, || {
                    engine.generate(&req, &mut |_| Flow::Continue)?;
                    Ok(())
                })?;
                let shape = format!("{side}x{side} {} steps", args.steps);
                report(what, &shape, s, dt, &dev);
                if args.profile {
                    profile(what, &shape, &dev, || {
                        engine.generate(&req, &mut |_| Flow::Continue)?;
                        Ok(())
                    })?;
                }
            }
            "gfpgan" => {
                // fp32, as face restoration runs it; random weights, one aligned 512² face.
                use sdkube_restore::gfpgan::{Gfpgan, GfpganConfig, Noise};
                // Random values throughout (a `VarMap` leaves the modulated convolutions'
                // weights at zero, so the face would come out flat): a weight with n inputs
                // per output has a standard deviation of 1/√n.
                let tensors = presets::random_tensors(DType::F32, &dev, |vb| {
                    Gfpgan::new(vb, GfpganConfig::V1_4).map(drop)
                })?
                .into_iter()
                .map(|(k, t)| {
                    let fan_in = t.elem_count() / t.dims().first().copied().unwrap_or(1).max(1);
                    let std = if t.rank() >= 2 {
                        (fan_in as f64).sqrt().recip()
                    } else {
                        0.1
                    };
                    Ok((k, Tensor::randn(0f32, std as f32, t.shape(), &dev)?))
                })
                .collect::<candle_core::Result<HashMap<_, _>>>()?;
                let on_cpu = dev.is_cuda().then(|| {
                    let to_cpu =
                        |(k, t): (&String, &Tensor)| Ok((k.clone(), t.to_device(&Device::Cpu)?));
                    tensors
                        .iter()
                        .map(to_cpu)
                        .collect::<candle_core::Result<HashMap<_, _>>>()
                });
                let vb = candle_nn::VarBuilder::from_tensors(tensors, DType::F32, &dev);
                let net = Gfpgan::new(vb, GfpganConfig::V1_4)?;
                let face = Tensor::randn(0f32, 1., (1, 3, 512, 512), &dev)?;
                if let Some(tensors) = on_cpu {
                    // The GPU's face against the CPU's, same weights and input (cuDNN's fp32
                    // convolutions may use TF32, as PyTorch's do).
                    let vb =
                        candle_nn::VarBuilder::from_tensors(tensors?, DType::F32, &Device::Cpu);
                    let cpu = Gfpgan::new(vb, GfpganConfig::V1_4)?
                        .forward(&face.to_device(&Device::Cpu)?, Noise::Stored)?;
                    let gpu = net.forward(&face, Noise::Stored)?.to_device(&Device::Cpu)?;
                    let diff = (gpu - &cpu)?
                        .abs()?
                        .flatten_all()?
                        .max(0)?
                        .to_scalar::<f32>()?;
                    let scale = cpu.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>()?;
                    println!(
                        "{}",
                        serde_json::json!({"check": "gfpgan gpu vs cpu", "max_diff": diff, "max_value": scale})
                    );
                }
                let run = || {
                    net.forward(&face, Noise::Stored)?;
                    Ok(())
                };
                let s = time(&dev, args.repeat, run)?;
                report("gfpgan", "1 face 512x512", s, DType::F32, &dev);
                if args.profile {
                    profile("gfpgan", "1 face 512x512", &dev, run)?;
                }
            }
            "x4plus" => {
                // RealESRGAN x4plus, fp32, random weights, one 512² image from host memory: the
                // reference's pre-process, (tiled) process and post-process, as `upscale` runs.
                use sdkube_restore::rrdbnet::{RrdbConfig, RrdbNet};
                use sdkube_restore::{Esrgan, EsrganArch, TileOptions};
                let cfg = RrdbConfig::X4PLUS;
                let tensors = presets::random_tensors(DType::F32, &dev, |vb| {
                    RrdbNet::new(cfg, vb).map(drop)
                })?;
                let net = Esrgan::from_tensors(tensors, Some(EsrganArch::Rrdb(cfg)), &dev)?;
                let image = Tensor::rand(0f32, 1., (3, 512, 512), &Device::Cpu)?;
                for tile in [0, 256] {
                    let opts = TileOptions {
                        tile,
                        ..TileOptions::default()
                    };
                    let run = || {
                        net.upscale_tensor(&image, &opts)?;
                        Ok(())
                    };
                    let s = time(&dev, args.repeat.min(3), run)?;
                    let shape = format!("512x512 tile {tile}");
                    report("x4plus", &shape, s, DType::F32, &dev);
                    if args.profile {
                        profile("x4plus", &shape, &dev, run)?;
                    }
                }
            }
            "ops" => ops(&dev, dt, args.repeat)?,
            other => anyhow::bail!("unknown benchmark {other:?}"),
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// The primitives of the SD networks at the shapes they run at, each timed alone (what
/// `benches/gpu_ops_reference.py` times in torch): where the time of a whole network goes.
/// Where sdkube has its own GPU kernel (`sdkube_nn::cuda`), candle's op and ours are both
/// timed and ours is checked against candle's on the same input (`max_diff`, `ref_max`).
fn ops(dev: &Device, dt: DType, repeat: usize) -> anyhow::Result<()> {
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
                    Ok(own::group_norm(&x, &w, &bias, 32, 1e-5, true)?)
                }),
                ("sdkube channels-last", &|| {
                    Ok(own::group_norm(&xcl, &w, &bias, 32, 1e-5, true)?)
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
            &[("sdkube", &|| {
                Ok(own::flash_attention(&q, &k, &v, heads, scale)?)
            })],
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
    let x = rand(&[2, 1024, 1280])?;
    let ln = candle_nn::LayerNorm::new(rand(&[1280])?, rand(&[1280])?, 1e-5);
    let s = time(dev, repeat, || {
        ln.forward(&x)?;
        Ok(())
    })?;
    report("layer_norm sdxl", "[2,1024,1280]", s, dt, dev);
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
mod own {
    #[cfg(not(feature = "cuda"))]
    use candle_core::Tensor;

    #[cfg(feature = "cuda")]
    pub use sdkube_nn::cuda::{
        add_bias, conv2d_input_grad, flash_attention, geglu, geglu_grad, group_norm,
        group_norm_input_grad, layer_norm_input_grad, leaky_relu, linear, noise_leaky_relu,
        softmax_grad, upsample_bilinear_2x, upsample_nearest_2x,
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
    pub fn group_norm(
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
