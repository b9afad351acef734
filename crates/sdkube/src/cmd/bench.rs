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

mod ops;
mod step_cache;

use ops::own;

#[derive(clap::Args, Debug)]
pub struct Args {
    /// What to time: unet-sd15, unet-sdxl, vae, txt2img-sd15, txt2img-sdxl, controlnet-sd15
    /// (a CFG step of the SD 1.5 UNet with one ControlNet, and without), grad-sd15 (the
    /// UNet's part of a textual-inversion step: forward and the gradient to the conditioning),
    /// gfpgan (v1.4, one face, fp32), x4plus (RealESRGAN, 512², whole and in tiles of 256,
    /// fp32), ops (the primitives the networks spend their time in, at their real shapes),
    /// step-cache-sd15 / step-cache-sdxl (a run of --steps CFG steps of the UNet under step
    /// caching, intervals 1 (off), 2, 3 and 5; per step); comma separated.
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "unet-sd15,unet-sdxl,vae,txt2img-sd15,txt2img-sdxl"
    )]
    pub what: Vec<String>,
    /// Timed repetitions after one warm-up.
    #[arg(long, default_value_t = 10)]
    pub repeat: usize,
    /// Steps of the whole txt2img runs and of the step-cache runs.
    #[arg(long, default_value_t = 20)]
    pub steps: usize,
    /// The step-cache runs' branch (the skip connection the shallow steps end at).
    #[arg(long, default_value_t = 0)]
    pub step_cache_branch: usize,
    /// The step-cache runs' image side in pixels (default 512 for SD 1.5, 1024 for SDXL).
    #[arg(long)]
    pub size: Option<usize>,
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

/// A UNet's random inputs for `batch` latents of `side`²: latents, text context, SDXL's added
/// conditioning.
fn unet_inputs(
    sdxl: bool,
    batch: usize,
    side: usize,
    dt: DType,
    dev: &Device,
) -> anyhow::Result<(Tensor, Tensor, Option<AddedConditioning>)> {
    let ctx_dim = if sdxl { 2048 } else { 768 };
    let x = Tensor::randn(0f32, 1., (batch, 4, side, side), dev)?.to_dtype(dt)?;
    let ctx = Tensor::randn(0f32, 1., (batch, 77, ctx_dim), dev)?.to_dtype(dt)?;
    let added = sdxl
        .then(|| -> anyhow::Result<_> {
            let ids = [1024f32, 1024., 0., 0., 1024., 1024.];
            Ok(AddedConditioning {
                text_embeds: Tensor::randn(0f32, 1., (batch, 1280), dev)?.to_dtype(dt)?,
                time_ids: Tensor::new(&ids, dev)?
                    .reshape((1, 6))?
                    .repeat((batch, 1))?
                    .to_dtype(dt)?,
            })
        })
        .transpose()?;
    Ok((x, ctx, added))
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
                // The UNet alone, as diffusers' reference holds it: nothing else in memory;
                // its projections stacked as a served engine's are.
                let unet = presets::random_unet(family, dt, &dev)?.into_unet(&dev, dt)?;
                let side = if sdxl { 128 } else { 64 };
                for batch in [1usize, 2] {
                    let (x, ctx, added) = unet_inputs(sdxl, batch, side, dt, &dev)?;
                    let t = Tensor::new(&[500f32], &dev)?;
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
            "ops" => ops::ops(&dev, dt, args.repeat)?,
            "step-cache-sd15" | "step-cache-sdxl" => step_cache::runs(what, &args, &dev, dt)?,
            other => anyhow::bail!("unknown benchmark {other:?}"),
        }
    }
    Ok(ExitCode::SUCCESS)
}
