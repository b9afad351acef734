//! RealESRGAN networks against the reference implementations: tiny random-weight models,
//! inputs and outputs written by `scripts/make_esrgan_fixtures.py` (basicsr 1.4.2,
//! realesrgan 0.3.0) into `fixtures/esrgan`.

use sdkube_testkit::max_abs_diff;
use std::collections::HashMap;
use std::path::PathBuf;

use candle_core::{DType, Device, Tensor};
use image::DynamicImage;
use sdkube_restore::rrdbnet::RrdbConfig;
use sdkube_restore::srvgg::{Activation, SrvggConfig};
use sdkube_restore::{Error, Esrgan, EsrganArch, TileOptions};

/// Our float32 result against the reference's float32 result.
const TOLERANCE: f32 = 1e-4;

fn fixture(name: &str) -> PathBuf {
    sdkube_testkit::fixtures().join("esrgan").join(name)
}

fn io() -> HashMap<String, Tensor> {
    candle_core::safetensors::load(fixture("io.safetensors"), &Device::Cpu).unwrap()
}

fn check(name: &str, file: &str, arch: EsrganArch, tile: usize) {
    let io = io();
    let net = Esrgan::load(&fixture(file), None, &Device::Cpu).unwrap();
    assert_eq!(net.arch(), arch, "architecture read off the weights");
    let input = &io["input"];
    if let Some(want) = io.get(&format!("{name}.forward")) {
        let got = net
            .forward(&input.unsqueeze(0).unwrap())
            .unwrap()
            .squeeze(0)
            .unwrap();
        let d = max_abs_diff(&got, want);
        eprintln!("{name} forward: max |diff| = {d:e}");
        assert!(d < TOLERANCE, "{name} forward differs by {d}");
    }
    for (label, tile) in [("whole", 0), ("tiled", tile)] {
        let opts = TileOptions {
            tile,
            tile_pad: 2,
            pre_pad: 3,
        };
        let got = net.upscale_tensor(input, &opts).unwrap();
        let d = max_abs_diff(&got, &io[&format!("{name}.{label}")]);
        eprintln!("{name} {label}: max |diff| = {d:e}");
        assert!(d < TOLERANCE, "{name} {label} differs by {d}");
    }
    // The whole enhance() on RGBA uint8: the same rounding, so at most one level apart
    // where a float lands on .5.
    let rgb = io["input_u8"].to_vec3::<u8>().unwrap();
    let alpha = io["alpha_u8"].to_vec2::<u8>().unwrap();
    let (h, w) = (rgb.len() as u32, rgb[0].len() as u32);
    let img = image::RgbaImage::from_fn(w, h, |x, y| {
        let p = &rgb[y as usize][x as usize];
        image::Rgba([p[0], p[1], p[2], alpha[y as usize][x as usize]])
    });
    let opts = TileOptions {
        tile: 0,
        tile_pad: 10,
        pre_pad: 10,
    };
    let out = net
        .upscale_image(&DynamicImage::ImageRgba8(img), &opts, None)
        .unwrap();
    let DynamicImage::ImageRgba8(out) = out else {
        panic!("alpha dropped")
    };
    let s = arch.scale() as u32;
    assert_eq!(out.dimensions(), (w * s, h * s));
    let got = Tensor::from_vec(
        out.into_raw(),
        ((h * s) as usize, (w * s) as usize, 4),
        &Device::Cpu,
    )
    .unwrap();
    let d = max_abs_diff(&got, &io[&format!("{name}.enhance_rgba_u8")]);
    eprintln!("{name} enhance RGBA u8: max |diff| = {d} levels");
    assert!(d <= 1.0, "{name} RGBA enhance differs by {d} levels");
}

#[test]
fn rrdbnet_x4_official_zip_params_ema() {
    let arch = EsrganArch::Rrdb(RrdbConfig {
        num_feat: 8,
        num_block: 2,
        num_grow_ch: 4,
        ..RrdbConfig::X4PLUS
    });
    check("rrdb_x4", "rrdb_x4.pth", arch, 7);
}

/// RRDBNet's dense blocks share one feature buffer across the batch and the blocks: a batch of
/// two images gives what each gives alone.
#[test]
fn rrdbnet_batch_of_two_equals_each_alone() {
    let net = Esrgan::load(&fixture("rrdb_x4.pth"), None, &Device::Cpu).unwrap();
    let first = io()["input"].unsqueeze(0).unwrap();
    let other = (first.flip(&[3]).unwrap() * 0.7).unwrap();
    let both = net
        .forward(&Tensor::cat(&[&first, &other], 0).unwrap())
        .unwrap();
    for (i, x) in [&first, &other].into_iter().enumerate() {
        let alone = net.forward(x).unwrap();
        let d = max_abs_diff(&both.narrow(0, i, 1).unwrap(), &alone);
        assert!(
            d < 1e-6,
            "image {i} of the batch differs from itself alone by {d}"
        );
    }
}

#[test]
fn rrdbnet_x2_pixel_unshuffle_legacy_params() {
    let arch = EsrganArch::Rrdb(RrdbConfig {
        num_feat: 8,
        num_block: 1,
        num_grow_ch: 4,
        ..RrdbConfig::X2PLUS
    });
    check("rrdb_x2", "rrdb_x2.pth", arch, 8);
}

#[test]
fn srvgg_compact_from_safetensors_and_pth() {
    let arch = EsrganArch::Srvgg(SrvggConfig {
        num_in_ch: 3,
        num_out_ch: 3,
        num_feat: 8,
        num_conv: 3,
        upscale: 4,
        act: Activation::Prelu,
    });
    check("srvgg_x4", "srvgg_x4.safetensors", arch, 7);
    check("srvgg_x4", "srvgg_x4.pth", arch, 7);
}

#[test]
fn wrong_weights_for_the_chosen_network_are_named() {
    let err = match Esrgan::load(
        &fixture("srvgg_x4.safetensors"),
        EsrganArch::preset("RealESRGAN_x4plus"),
        &Device::Cpu,
    ) {
        Err(e) => e,
        Ok(_) => panic!("SRVGG weights accepted as RRDBNet"),
    };
    assert!(matches!(err, Error::WrongWeights(_)), "{err}");
    assert!(err.to_string().contains("srvgg_x4.safetensors"), "{err}");
    // Right family, wrong width: a shape error, not a panic.
    let err = match Esrgan::load(
        &fixture("rrdb_x4.pth"),
        EsrganArch::preset("RealESRGAN_x4plus"),
        &Device::Cpu,
    ) {
        Err(e) => e,
        Ok(_) => panic!("8-feature weights accepted as x4plus"),
    };
    assert!(matches!(err, Error::WrongWeights(_)), "{err}");
    // Something that is not a RealESRGAN network at all.
    let dir = tempfile::tempdir().unwrap();
    let other = dir.path().join("other.safetensors");
    let t = Tensor::zeros((2, 2), DType::F32, &Device::Cpu).unwrap();
    candle_core::safetensors::save(&HashMap::from([("fc.weight".to_string(), t)]), &other).unwrap();
    let err = Esrgan::load(&other, None, &Device::Cpu)
        .err()
        .expect("accepted");
    assert!(err.to_string().contains("neither RRDBNet"), "{err}");
}

#[test]
fn outscale_resizes_the_network_output() {
    let net = Esrgan::load(&fixture("srvgg_x4.safetensors"), None, &Device::Cpu).unwrap();
    let img = DynamicImage::ImageRgb8(image::RgbImage::from_fn(13, 9, |x, y| {
        image::Rgb([(x * 19) as u8, (y * 27) as u8, 128])
    }));
    let out = net
        .upscale_image(&img, &TileOptions::default(), Some(2.0))
        .unwrap();
    assert_eq!((out.width(), out.height()), (26, 18));
    let grey = DynamicImage::ImageLuma8(image::GrayImage::from_pixel(5, 4, image::Luma([90])));
    let out = net
        .upscale_image(&grey, &TileOptions::default(), None)
        .unwrap();
    assert!(
        matches!(out, DynamicImage::ImageLuma8(_)),
        "grey stays grey"
    );
    assert_eq!((out.width(), out.height()), (20, 16));
}
