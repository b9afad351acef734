//! Seamless tiling (A1111's `tiling`: circular padding in every UNet and VAE convolution) on
//! the tiny SD1 fixture: the image is a torus. Shifting the starting noise around shifts the
//! image around by the same amount, so its right edge continues into its left edge as any
//! column continues into the next; without tiling the borders break that.

use candle_core::{DType, Device, Tensor};
use image::RgbImage;
use sdkube_models::{load, LoadOptions};
use sdkube_pipeline::sampler::Flow;
use sdkube_pipeline::variation::request_noise;
use sdkube_pipeline::{Engine, Infotext, Overrides, Request, VramMode};

fn engine() -> Engine {
    let dir = sdkube_testkit::fixtures().join("sd").join("sd1");
    let w = load(&dir, &LoadOptions::default()).unwrap();
    Engine::new(w, "sd1", Device::Cpu, DType::F32, VramMode::High).unwrap()
}

fn request(tiling: bool) -> Request {
    Request {
        prompt: "stone wall texture".into(),
        sampler: "Euler".into(),
        steps: 4,
        width: 128,
        height: 96,
        seed: 3,
        tiling,
        ..Default::default()
    }
}

/// `t` rolled by `dy`, `dx` along its last two axes (`torch.roll`).
fn roll(t: &Tensor, dy: usize, dx: usize) -> Tensor {
    let (_, _, h, w) = t.dims4().unwrap();
    let t = Tensor::cat(
        &[
            t.narrow(3, w - dx, dx).unwrap(),
            t.narrow(3, 0, w - dx).unwrap(),
        ],
        3,
    )
    .unwrap();
    Tensor::cat(
        &[
            t.narrow(2, h - dy, dy).unwrap(),
            t.narrow(2, 0, h - dy).unwrap(),
        ],
        2,
    )
    .unwrap()
}

fn roll_image(img: &RgbImage, dy: u32, dx: u32) -> RgbImage {
    let (w, h) = img.dimensions();
    RgbImage::from_fn(w, h, |x, y| {
        *img.get_pixel((x + w - dx) % w, (y + h - dy) % h)
    })
}

fn image_with_noise(e: &mut Engine, req: &Request, noise: Tensor) -> RgbImage {
    let overrides = Overrides {
        initial_noise: Some(noise),
        ..Overrides::default()
    };
    e.generate_with(req, overrides, &mut |_| Flow::Continue)
        .unwrap()
        .remove(0)
        .image
}

fn max_pixel_diff(a: &RgbImage, b: &RgbImage) -> u8 {
    a.pixels()
        .zip(b.pixels())
        .flat_map(|(p, q)| (0..3).map(move |c| p.0[c].abs_diff(q.0[c])))
        .max()
        .unwrap()
}

/// Mean absolute difference between column `a` and column `b` (all rows, all channels).
fn column_diff(img: &RgbImage, a: u32, b: u32) -> f64 {
    let (_, h) = img.dimensions();
    let mut sum = 0u64;
    for y in 0..h {
        for c in 0..3 {
            sum += img.get_pixel(a, y).0[c].abs_diff(img.get_pixel(b, y).0[c]) as u64;
        }
    }
    sum as f64 / (3 * h) as f64
}

/// (difference across the wrap seam, mean difference between neighbouring interior columns)
/// of the image's columns; rows are the same on the transposed image.
fn seam_and_interior(img: &RgbImage) -> (f64, f64) {
    let w = img.width();
    let interior = (0..w - 1).map(|x| column_diff(img, x, x + 1)).sum::<f64>() / (w - 1) as f64;
    (column_diff(img, w - 1, 0), interior)
}

fn transpose(img: &RgbImage) -> RgbImage {
    RgbImage::from_fn(img.height(), img.width(), |x, y| *img.get_pixel(y, x))
}

#[test]
fn a_tiled_image_is_a_torus_and_an_untiled_one_is_not() {
    let mut e = engine();
    // Latent shifts by multiples of the UNet's downsampling (2 here), 8 pixels per latent.
    let (dy, dx) = (4, 6);
    for tiling in [true, false] {
        let req = request(tiling);
        let noise = request_noise(&req, 4).unwrap();
        let image = image_with_noise(&mut e, &req, noise.clone());
        let shifted = image_with_noise(&mut e, &req, roll(&noise, dy, dx));
        let diff = max_pixel_diff(&shifted, &roll_image(&image, 8 * dy as u32, 8 * dx as u32));
        eprintln!("tiling {tiling}: image of the shifted noise vs the shifted image: max {diff}");
        if tiling {
            // The same picture, moved: the seam is nowhere in particular.
            assert!(
                diff <= 2,
                "tiled: shifting the noise shifts the image ({diff})"
            );
        } else {
            assert!(diff > 20, "untiled: the borders are edges ({diff})");
        }
    }
}

#[test]
fn tiling_is_recorded_and_changes_the_image() {
    let mut e = engine();
    let tiled = e.generate(&request(true), &mut |_| Flow::Continue).unwrap();
    let plain = e
        .generate(&request(false), &mut |_| Flow::Continue)
        .unwrap();
    assert_eq!(
        Infotext::parse(&tiled[0].infotext).get("Tiling"),
        Some("True")
    );
    assert!(!plain[0].infotext.contains("Tiling"));
    assert_ne!(tiled[0].image, plain[0].image);
    // Requests that differ in tiling never share a device batch.
    assert!(!request(true).batchable_with(&request(false)));
}

#[test]
fn across_the_seam_pixels_differ_as_little_as_between_neighbours() {
    let mut e = engine();
    // (seam, interior) of columns and of rows, averaged over 8 seeds.
    let mut measure = |tiling: bool| {
        let mut m = [0.0f64; 4];
        for seed in 0..8 {
            let req = Request {
                seed,
                ..request(tiling)
            };
            let img = e
                .generate(&req, &mut |_| Flow::Continue)
                .unwrap()
                .remove(0)
                .image;
            let (a, b) = seam_and_interior(&img);
            let (c, d) = seam_and_interior(&transpose(&img));
            for (acc, v) in m.iter_mut().zip([a, b, c, d]) {
                *acc += v / 8.0;
            }
        }
        eprintln!(
            "tiling {tiling}: seam/interior columns {:.2}/{:.2}, rows {:.2}/{:.2}",
            m[0], m[1], m[2], m[3]
        );
        (m[0] / m[1], m[2] / m[3])
    };
    let (tiled_x, tiled_y) = measure(true);
    let (plain_x, plain_y) = measure(false);
    assert!(tiled_x < 1.1 && tiled_y < 1.1, "tiled: {tiled_x} {tiled_y}");
    assert!(
        plain_x > 1.15 && plain_y > 1.15,
        "untiled: {plain_x} {plain_y}"
    );
}
