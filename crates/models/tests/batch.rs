//! A sample computed in a batch equals the same sample computed alone, to the bit, on the
//! CPU: the server batches different clients' requests, and each must get the image it would
//! have got alone (candle's folded matrix products round differently per row count; the
//! layers run per sample on the CPU for that).

use candle_core::{DType, Device, IndexOp, Tensor};
use sdkube_models::{load, LoadOptions};

fn max_diff(a: &Tensor, b: &Tensor) -> f32 {
    (a - b)
        .unwrap()
        .abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap()
}

#[test]
fn unet_and_vae_give_each_sample_of_a_batch_what_it_gets_alone() {
    let dir = sdkube_testkit::fixtures().join("sd/sd1");
    let w = load(&dir, &LoadOptions::default()).unwrap();
    let dev = Device::Cpu;
    let unet = w.unet.build(&dev, DType::F32).unwrap();
    let vae = w.vae.build(&dev, DType::F32).unwrap();
    let ctx_dim = unet.config().cross_attention_dim;
    let x = Tensor::randn(0f32, 1., (16, 4, 8, 8), &dev).unwrap();
    let ctx = Tensor::randn(0f32, 1., (16, 77, ctx_dim), &dev).unwrap();
    let t = Tensor::new(&[500f32], &dev).unwrap();
    let batched = unet.forward(&x, &t, &ctx, None).unwrap();
    for i in [0, 9, 15] {
        let alone = unet
            .forward(
                &x.narrow(0, i, 1).unwrap(),
                &t,
                &ctx.narrow(0, i, 1).unwrap(),
                None,
            )
            .unwrap();
        let d = max_diff(&batched.i(i).unwrap(), &alone.i(0).unwrap());
        assert_eq!(d, 0.0, "UNet sample {i} of 16 differs from alone by {d}");
    }
    let z = Tensor::randn(0f32, 1., (8, 4, 8, 8), &dev).unwrap();
    let decoded = vae.decode(&z).unwrap();
    for i in [0, 7] {
        let alone = vae.decode(&z.narrow(0, i, 1).unwrap()).unwrap();
        let d = max_diff(&decoded.i(i).unwrap(), &alone.i(0).unwrap());
        assert_eq!(d, 0.0, "VAE sample {i} of 8 differs from alone by {d}");
    }
}
