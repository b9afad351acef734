//! `sdkube bench --profile`'s accounting, on the CPU with the tiny SD1 fixture.

use candle_core::{DType, Device, Tensor};
use sdkube_models::{load, LoadOptions};
use sdkube_nn::profile;

#[test]
fn profile_counts_each_kind_of_operation_of_a_unet_step() {
    let dir = sdkube_testkit::fixtures().join("sd/sd1");
    let w = load(&dir, &LoadOptions::default()).unwrap();
    let unet = w.unet.build(&Device::Cpu, DType::F32).unwrap();
    let x = Tensor::randn(0f32, 1., (2, 4, 8, 8), &Device::Cpu).unwrap();
    let ctx_dim = unet.config().cross_attention_dim;
    let ctx = Tensor::randn(0f32, 1., (2, 7, ctx_dim), &Device::Cpu).unwrap();
    let t = Tensor::new(&[500f32], &Device::Cpu).unwrap();
    let step = || unet.forward(&x, &t, &ctx, None).unwrap();

    step(); // profiling off: nothing recorded
    assert!(profile::take().unwrap().is_empty());

    profile::enable(true);
    let with = step();
    profile::enable(false);
    let rows = profile::take().unwrap();
    let kinds: Vec<_> = rows.iter().map(|r| r.0).collect();
    for kind in [
        "convolution",
        "linear",
        "attention",
        "group norm",
        "layer norm",
        "geglu gate",
    ] {
        let row = rows.iter().find(|r| r.0 == kind);
        assert!(
            row.is_some_and(|r| r.1 > 0 && r.2 >= 0.0),
            "{kind} missing from {kinds:?}"
        );
    }
    // Each of the UNet's convolutions counted once: conv_in, conv_out and two per resnet at least.
    let convs = rows.iter().find(|r| r.0 == "convolution").unwrap().1;
    assert!(convs >= 6, "{convs} convolutions");
    // Slowest first, and recording changes nothing.
    assert!(rows.windows(2).all(|w| w[0].2 >= w[1].2));
    assert_eq!(sdkube_testkit::max_abs_diff(&with, &step()), 0.0);
    assert!(profile::take().unwrap().is_empty());
}
