//! `sdkube bench`: timings of the full-size architectures with random weights (speed does
//! not depend on weight values), one JSON object per line. `benches/gpu_reference.py` times
//! diffusers on the same shapes; run both in one session and compare ratios.

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
    /// What to time: unet-sd15, unet-sdxl, vae, txt2img-sd15, txt2img-sdxl, ops (the primitives
    /// the networks spend their time in, at their real shapes; comma separated).
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
    #[command(flatten)]
    pub device: DeviceArgs,
}

fn time(
    device: &Device,
    repeat: usize,
    mut f: impl FnMut() -> anyhow::Result<()>,
) -> anyhow::Result<f64> {
    f()?;
    device.synchronize()?;
    let start = Instant::now();
    for _ in 0..repeat {
        f()?;
    }
    device.synchronize()?;
    Ok(start.elapsed().as_secs_f64() / repeat as f64)
}

fn report(what: &str, shape: &str, seconds: f64, dtype: DType, device: &Device) {
    println!(
        "{}",
        serde_json::json!({"bench": what, "shape": shape, "ms": seconds * 1e3, "per_s": 1.0 / seconds,
            "dtype": Precision::label(dtype), "device": format!("{device:?}")})
    );
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
                let weights = presets::random_model(family, dt, &dev)?;
                let unet = weights.unet.build(&dev, dt)?;
                drop(weights);
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
                    let s = time(&dev, args.repeat, || {
                        unet.forward(&x, &t, &ctx, added.as_ref())?;
                        Ok(())
                    })?;
                    report(
                        what,
                        &format!("{}x{} batch {batch}", side * 8, side * 8),
                        s,
                        dt,
                        &dev,
                    );
                }
            }
            "vae" => {
                let weights = presets::random_model(Family::Sd1, dt, &dev)?;
                let vae = weights.vae.build(&dev, dt)?;
                for side in [64usize, 128] {
                    let latent = Tensor::randn(0f32, 1., (1, 4, side, side), &dev)?.to_dtype(dt)?;
                    let s = time(&dev, args.repeat.min(5), || {
                        vae.decode(&latent)?;
                        Ok(())
                    })?;
                    report(
                        "vae-decode",
                        &format!("{}x{}", side * 8, side * 8),
                        s,
                        dt,
                        &dev,
                    );
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
                report(
                    what,
                    &format!("{side}x{side} {} steps", args.steps),
                    s,
                    dt,
                    &dev,
                );
            }
            "ops" => ops(&dev, dt, args.repeat)?,
            other => anyhow::bail!("unknown benchmark {other:?}"),
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// The primitives of the SD networks at the shapes they run at, each timed alone (what
/// `benches/gpu_ops_reference.py` times in torch): where the time of a whole network goes.
fn ops(dev: &Device, dt: DType, repeat: usize) -> anyhow::Result<()> {
    use candle_nn::{Conv2d, Conv2dConfig, GroupNorm, Module};
    let rand = |shape: &[usize]| -> anyhow::Result<Tensor> {
        Ok(Tensor::randn(0f32, 1., shape, dev)?.to_dtype(dt)?)
    };
    let conv = |cin: usize, cout: usize| -> anyhow::Result<Conv2d> {
        let cfg = Conv2dConfig {
            padding: 1,
            ..Default::default()
        };
        Ok(Conv2d::new(
            (rand(&[cout, cin, 3, 3])? * 0.05)?,
            Some(rand(&[cout])?),
            cfg,
        ))
    };
    // (label, batch, channels, side) of 3x3 convolutions: SD1.5 UNet at 512² with CFG, and
    // the VAE decoder's stages at 512².
    for (label, b, c, side) in [
        ("conv3x3 unet 320", 2, 320, 64),
        ("conv3x3 unet 640", 2, 640, 32),
        ("conv3x3 unet 1280", 2, 1280, 16),
        ("conv3x3 vae 512", 1, 512, 128),
        ("conv3x3 vae 256", 1, 256, 256),
        ("conv3x3 vae 128", 1, 128, 512),
    ] {
        let x = rand(&[b, c, side, side])?;
        let m = conv(c, c)?;
        let s = time(dev, repeat, || {
            m.forward(&x)?;
            Ok(())
        })?;
        report(label, &format!("[{b},{c},{side},{side}]"), s, dt, dev);
    }
    // The same convolutions built from candle's copy and matmul kernels, no im2col kernel:
    // the input's nine shifted views gathered in channel-major order, one GEMM whose output
    // is already NCHW.
    for (label, b, c, side) in [
        ("conv3x3 gathered unet 320", 2, 320, 64),
        ("conv3x3 gathered vae 512", 1, 512, 128),
        ("conv3x3 gathered vae 128", 1, 128, 512),
    ] {
        let x = rand(&[b, c, side, side])?;
        let m = conv(c, c)?;
        let want = m.forward(&x)?;
        let w9 = m
            .weight()
            .permute((0, 2, 3, 1))?
            .reshape((c, 9 * c))?
            .contiguous()?;
        let bias = m.bias().expect("bias").reshape((1, c, 1))?;
        let gathered = |x: &Tensor| -> candle_core::Result<Tensor> {
            let (bsz, ci, h, w) = x.dims4()?;
            let xp = x.pad_with_zeros(2, 1, 1)?.pad_with_zeros(3, 1, 1)?;
            let mut views = Vec::with_capacity(9);
            for dy in 0..3 {
                for dx in 0..3 {
                    views.push(xp.narrow(2, dy, h)?.narrow(3, dx, w)?);
                }
            }
            let cols = Tensor::cat(&views, 1)?.reshape((bsz, 9 * ci, h * w))?;
            w9.broadcast_matmul(&cols)?
                .broadcast_add(&bias)?
                .reshape((bsz, w9.dim(0)?, h, w))
        };
        let got = gathered(&x)?;
        let err = (got - &want)?
            .abs()?
            .to_dtype(DType::F32)?
            .flatten_all()?
            .max(0)?
            .to_scalar::<f32>()?;
        let s = time(dev, repeat, || {
            gathered(&x)?;
            Ok(())
        })?;
        report(
            &format!("{label} (max diff {err:.3})"),
            &format!("[{b},{c},{side},{side}]"),
            s,
            dt,
            dev,
        );
    }
    for (label, b, c, side) in [
        ("group_norm unet 320", 2, 320, 64),
        ("group_norm vae 128", 1, 128, 512),
    ] {
        let x = rand(&[b, c, side, side])?;
        let gn = GroupNorm::new(rand(&[c])?, rand(&[c])?, c, 32, 1e-5)?;
        let s = time(dev, repeat, || {
            gn.forward(&x)?;
            Ok(())
        })?;
        report(label, &format!("[{b},{c},{side},{side}]"), s, dt, dev);
        let s = time(dev, repeat, || {
            candle_nn::ops::silu(&gn.forward(&x)?)?;
            Ok(())
        })?;
        report(
            &format!("{label} + silu"),
            &format!("[{b},{c},{side},{side}]"),
            s,
            dt,
            dev,
        );
    }
    // Attention as blocks.rs computes it: softmax(q kᵀ / √d) v, per head.
    for (label, bh, n, m, d) in [
        ("attention unet self 64²", 16, 4096, 4096, 40),
        ("attention unet cross 64²", 16, 4096, 77, 40),
        ("attention vae mid 64²", 1, 4096, 4096, 512),
    ] {
        let q = rand(&[bh, n, d])?;
        let k = rand(&[bh, m, d])?;
        let v = rand(&[bh, m, d])?;
        let scale = 1.0 / (d as f64).sqrt();
        let s = time(dev, repeat, || {
            let scores = (q.matmul(&k.t()?)? * scale)?;
            let probs = candle_nn::ops::softmax_last_dim(&scores)?;
            probs.matmul(&v)?;
            Ok(())
        })?;
        report(label, &format!("[{bh},{n},{d}] x {m}"), s, dt, dev);
    }
    // The transformer's GEGLU projection, as a linear layer on [B·HW, C].
    let x = rand(&[2 * 4096, 320])?;
    let w = rand(&[2560, 320])?;
    let s = time(dev, repeat, || {
        x.matmul(&w.t()?)?;
        Ok(())
    })?;
    report("linear geglu 320->2560", "[8192,320]", s, dt, dev);
    let x = rand(&[1, 256, 256, 256])?;
    let s = time(dev, repeat, || {
        x.upsample_nearest2d(512, 512)?;
        Ok(())
    })?;
    report("upsample nearest 2x vae", "[1,256,256,256]", s, dt, dev);
    Ok(())
}
