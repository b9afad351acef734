//! CPU timing of RealESRGAN upscaling with full-size random weights, through the same tiled
//! path as `sdkube upscale` (default tiles of 128, tile_pad 10, pre_pad 10):
//! RealESRGAN_x4plus on 256² and realesr-general-x4v3 on 512².
//!
//! `cargo run --release -p sdkube-restore --example bench_upscale`

use std::collections::HashMap;
use std::time::Instant;

use candle_core::{DType, Device, Tensor};
use candle_nn::{VarBuilder, VarMap};
use sdkube_restore::rrdbnet::{RrdbConfig, RrdbNet};
use sdkube_restore::srvgg::{SrvggConfig, SrvggNet};
use sdkube_restore::{Esrgan, EsrganArch, TileOptions};

/// Random weights under the architecture's own keys.
fn random_weights(arch: EsrganArch, dev: &Device) -> anyhow::Result<HashMap<String, Tensor>> {
    let varmap = VarMap::new();
    let vb = VarBuilder::from_varmap(&varmap, DType::F32, dev);
    match arch {
        EsrganArch::Rrdb(c) => drop(RrdbNet::new(c, vb)?),
        EsrganArch::Srvgg(c) => drop(SrvggNet::new(c, vb)?),
    }
    let data = varmap.data().lock().expect("not poisoned");
    Ok(data
        .iter()
        .map(|(k, v)| (k.clone(), v.as_tensor().clone()))
        .collect())
}

fn main() -> anyhow::Result<()> {
    let dev = Device::Cpu;
    println!("threads: {}", candle_core::utils::get_num_threads());
    for (arch, side) in [
        (EsrganArch::Rrdb(RrdbConfig::X4PLUS), 256),
        (EsrganArch::Srvgg(SrvggConfig::GENERAL_X4V3), 512),
    ] {
        let net = Esrgan::from_tensors(random_weights(arch, &dev)?, Some(arch), &dev)?;
        let img = Tensor::rand(0f32, 1f32, (3, side, side), &dev)?;
        let started = Instant::now();
        let out = net.upscale_tensor(&img, &TileOptions::default())?;
        let (_, oh, ow) = out.dims3()?;
        println!(
            "{arch:?} {side}x{side} -> {ow}x{oh}: {:.1} s",
            started.elapsed().as_secs_f64()
        );
    }
    Ok(())
}
