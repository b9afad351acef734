//! `sdkube bench --what step-cache-sd15,step-cache-sdxl`: a sampling run's UNet calls (one CFG
//! step each, batch 2, a new timestep each) under step caching, per step. Interval 1 is the
//! UNet without it. `benches/step_cache_reference.py` times DeepCache's helper around
//! diffusers' UNet on the same shapes.

use candle_core::{DType, Device, Tensor};
use sdkube_models::unet::{StepCache, StepCaching};
use sdkube_models::{presets, Family};

use super::{report, time, unet_inputs, Args};

/// The intervals timed: off, then DeepCache's usual ones.
const INTERVALS: [usize; 4] = [1, 2, 3, 5];

pub(super) fn runs(what: &str, args: &Args, dev: &Device, dt: DType) -> anyhow::Result<()> {
    let sdxl = what == "step-cache-sdxl";
    let family = if sdxl { Family::Sdxl } else { Family::Sd1 };
    let unet = presets::random_unet(family, dt, dev)?.into_unet(dev, dt)?;
    let size = args.size.unwrap_or(if sdxl { 1024 } else { 512 });
    if size == 0 || !size.is_multiple_of(8) {
        anyhow::bail!("--size {size}: a multiple of 8 pixels");
    }
    let (x, ctx, added) = unet_inputs(sdxl, 2, size / 8, dt, dev)?;
    let steps = args.steps.max(1);
    let timesteps = (0..steps)
        .map(|i| Tensor::new(&[999.0 * (1.0 - i as f32 / steps as f32)], dev))
        .collect::<candle_core::Result<Vec<_>>>()?;
    for interval in INTERVALS {
        let caching = StepCaching {
            interval,
            branch: args.step_cache_branch,
        };
        let run = || -> anyhow::Result<()> {
            let mut cache = StepCache::new(caching);
            for t in &timesteps {
                unet.forward_cached(&x, t, &ctx, added.as_ref(), None, &mut cache)?;
            }
            Ok(())
        };
        let seconds = time(dev, args.repeat, run)? / steps as f64;
        let shape = format!(
            "{size}x{size} batch 2, {steps} steps, interval {interval} branch {}",
            caching.branch
        );
        report(what, &shape, seconds, dt, dev);
    }
    Ok(())
}
