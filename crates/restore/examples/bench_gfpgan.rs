//! Times GFPGAN v1.4 (full size, random weights) on one 512×512 face on the CPU.
//!
//! `cargo run -p sdkube-restore --example bench_gfpgan [RUNS]`

use std::time::Instant;

use candle_core::{DType, Device, Shape, Tensor};
use candle_nn::var_builder::SimpleBackend;
use candle_nn::VarBuilder;
use sdkube_restore::gfpgan::{Gfpgan, GfpganConfig, Noise};

/// Hands out small random tensors of whatever shape the network asks for.
struct RandomWeights;

impl SimpleBackend for RandomWeights {
    fn get(
        &self,
        s: Shape,
        _: &str,
        _: candle_nn::Init,
        dtype: DType,
        dev: &Device,
    ) -> candle_core::Result<Tensor> {
        (Tensor::randn(0f32, 1f32, s, dev)? * 0.02)?.to_dtype(dtype)
    }
    fn get_unchecked(&self, name: &str, _: DType, _: &Device) -> candle_core::Result<Tensor> {
        candle_core::bail!("unexpected unchecked get of {name}")
    }
    fn contains_tensor(&self, _: &str) -> bool {
        true
    }
}

fn main() -> anyhow::Result<()> {
    let runs: usize = std::env::args()
        .nth(1)
        .map(|s| s.parse())
        .transpose()?
        .unwrap_or(3);
    let device = Device::Cpu;
    let vb = VarBuilder::from_backend(Box::new(RandomWeights), DType::F32, device.clone());
    let net = Gfpgan::new(vb, GfpganConfig::V1_4)?;
    let face = Tensor::rand(-1f32, 1f32, (1, 3, 512, 512), &device)?;
    net.forward(&face, Noise::Stored)?; // warm-up
    let mut times = Vec::new();
    for _ in 0..runs {
        let t = Instant::now();
        net.forward(&face, Noise::Stored)?;
        times.push(t.elapsed().as_secs_f64());
    }
    times.sort_by(f64::total_cmp);
    println!(
        "GFPGAN v1.4 512x512, CPU ({} threads): median {:.3} s, best {:.3} s over {runs} runs",
        candle_core::utils::get_num_threads(),
        times[times.len() / 2],
        times[0]
    );
    Ok(())
}
