//! CPU benchmark: the tiny fixture pipeline end to end, and one full-size SD 1.5 UNet step
//! (512², batch 2 = one CFG step) with random weights (timings do not depend on weight
//! values). Run with `cargo run -p sdkube-pipeline --example bench_cpu`; the
//! diffusers figure for the same shapes comes from `benches/cpu_reference.py` (see
//! `benches/cpu.sh`, which runs both in one go).

use std::path::Path;
use std::time::Instant;

use candle_core::{DType, Device, Tensor};
use candle_nn::{VarBuilder, VarMap};
use sdkube_models::config::UNetConfig;
use sdkube_models::unet::UNet2DConditionModel;
use sdkube_pipeline::sampler::Flow;
use sdkube_pipeline::{Engine, Request, VramMode};

const SD15_UNET: &str = r#"{
  "in_channels": 4, "out_channels": 4, "layers_per_block": 2, "cross_attention_dim": 768,
  "attention_head_dim": 8, "block_out_channels": [320, 640, 1280, 1280],
  "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
  "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"]
}"#;

fn main() -> anyhow::Result<()> {
    let dev = Device::Cpu;
    let fixtures = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fixtures/sd/sd1");
    let weights = sdkube_models::load(&fixtures, &Default::default())?;
    let mut engine = Engine::new(weights, "sd1-tiny", dev.clone(), DType::F32, VramMode::High)?;
    let req = Request {
        prompt: "a photo of an astronaut riding a horse".into(),
        width: 64,
        height: 64,
        steps: 20,
        ..Default::default()
    };
    engine.generate(&req, &mut |_| Flow::Continue)?; // warm-up
    let runs = 5;
    let t = Instant::now();
    for i in 0..runs {
        engine.generate(
            &Request {
                seed: i,
                ..req.clone()
            },
            &mut |_| Flow::Continue,
        )?;
    }
    let tiny = t.elapsed().as_secs_f64() / runs as f64;
    println!(
        "tiny pipeline, 64x64, 20 steps Euler a: {:.1} ms/image",
        tiny * 1e3
    );

    let cfg: UNetConfig = serde_json::from_str(SD15_UNET)?;
    let varmap = VarMap::new();
    let unet = UNet2DConditionModel::new(VarBuilder::from_varmap(&varmap, DType::F32, &dev), &cfg)?;
    let x = Tensor::randn(0f32, 1., (2, 4, 64, 64), &dev)?;
    let ctx = Tensor::randn(0f32, 1., (2, 77, 768), &dev)?;
    let t_step = Tensor::new(&[500f32], &dev)?;
    unet.forward(&x, &t_step, &ctx, None)?; // warm-up
    let steps = 3;
    let t = Instant::now();
    for _ in 0..steps {
        unet.forward(&x, &t_step, &ctx, None)?;
    }
    let step = t.elapsed().as_secs_f64() / steps as f64;
    println!("SD1.5 UNet step, 512x512 batch 2, fp32: {:.2} s/step", step);
    Ok(())
}
