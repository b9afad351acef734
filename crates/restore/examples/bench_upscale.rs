//! CPU timing of RealESRGAN inference with full-size random weights:
//! RealESRGAN_x4plus on 256² and realesr-general-x4v3 on 512² (one tile each, no padding).
//!
//! `cargo run --release -p sdkube-restore --example bench_upscale [-- REPEATS]`

use std::time::Instant;

use candle_core::{DType, Device, Tensor};
use candle_nn::{VarBuilder, VarMap};
use sdkube_restore::rrdbnet::{RrdbConfig, RrdbNet};
use sdkube_restore::srvgg::{SrvggConfig, SrvggNet};

fn main() -> anyhow::Result<()> {
    let repeats: usize = std::env::args()
        .nth(1)
        .map(|s| s.parse())
        .transpose()?
        .unwrap_or(1);
    let dev = Device::Cpu;
    let varmap = VarMap::new();
    let vb = VarBuilder::from_varmap(&varmap, DType::F32, &dev);
    let x4plus = RrdbNet::new(RrdbConfig::X4PLUS, vb.pp("x4plus"))?;
    let general = SrvggNet::new(SrvggConfig::GENERAL_X4V3, vb.pp("general"))?;
    let threads = candle_core::utils::get_num_threads();
    println!("threads: {threads}");
    let time = |name: &str, side: usize, f: &dyn Fn(&Tensor) -> candle_core::Result<Tensor>| {
        let x = Tensor::rand(0f32, 1f32, (1, 3, side, side), &dev)?;
        f(&x)?; // warm-up
        let started = Instant::now();
        for _ in 0..repeats {
            f(&x)?;
        }
        let s = started.elapsed().as_secs_f64() / repeats as f64;
        println!(
            "{name} {side}x{side} -> {}x{}: {s:.2} s",
            side * 4,
            side * 4
        );
        anyhow::Ok(())
    };
    time("RealESRGAN_x4plus", 256, &|x| x4plus.forward(x))?;
    time("realesr-general-x4v3", 512, &|x| general.forward(x))?;
    Ok(())
}
