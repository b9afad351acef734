//! Bad image files get a clear error before any pixel is processed, and writes are atomic.

use std::path::Path;

use image::{DynamicImage, RgbImage};
use sdkube_restore::io::{read_image, write_image, DEFAULT_MAX_PIXELS};
use sdkube_restore::Error;

fn png_bytes(w: u32, h: u32) -> Vec<u8> {
    let img = DynamicImage::ImageRgb8(RgbImage::from_fn(w, h, |x, y| {
        image::Rgb([x as u8, y as u8, (x * y) as u8])
    }));
    let mut out = std::io::Cursor::new(Vec::new());
    img.write_to(&mut out, image::ImageFormat::Png).unwrap();
    out.into_inner()
}

fn err_of(path: &Path, max: u64) -> String {
    match read_image(path, max) {
        Err(e @ Error::BadImage(_)) => e.to_string(),
        Err(e) => panic!("{}: wrong error kind: {e}", path.display()),
        Ok(_) => panic!("{} was accepted", path.display()),
    }
}

#[test]
fn bad_inputs_are_refused_with_the_reason() {
    let dir = tempfile::tempdir().unwrap();
    let good = png_bytes(40, 30);

    let ok = dir.path().join("ok.png");
    std::fs::write(&ok, &good).unwrap();
    let img = read_image(&ok, DEFAULT_MAX_PIXELS).unwrap();
    assert_eq!((img.width(), img.height()), (40, 30));

    let truncated = dir.path().join("truncated.png");
    std::fs::write(&truncated, &good[..good.len() / 2]).unwrap();
    let e = err_of(&truncated, DEFAULT_MAX_PIXELS);
    assert!(
        e.contains("truncated") && e.contains("truncated.png"),
        "{e}"
    );

    let text = dir.path().join("notes.png");
    std::fs::write(&text, "not an image at all").unwrap();
    assert!(err_of(&text, DEFAULT_MAX_PIXELS).contains("not an image"));

    let empty = dir.path().join("empty.png");
    std::fs::write(&empty, b"").unwrap();
    assert!(err_of(&empty, DEFAULT_MAX_PIXELS).contains("not an image"));

    // A PNG whose header claims 0×30 pixels.
    let mut zero = good.clone();
    zero[16..20].copy_from_slice(&0u32.to_be_bytes());
    let zero_path = dir.path().join("zero.png");
    std::fs::write(&zero_path, &zero).unwrap();
    let e = err_of(&zero_path, DEFAULT_MAX_PIXELS);
    assert!(e.contains("zero.png"), "{e}");

    // Over the pixel limit: refused from the header, before decoding.
    let e = err_of(&ok, 40 * 30 - 1);
    assert!(e.contains("over the limit of 1199"), "{e}");

    let missing = dir.path().join("missing.png");
    assert!(err_of(&missing, DEFAULT_MAX_PIXELS).contains("cannot open"));
}

#[test]
fn writes_are_atomic_and_leave_nothing_on_failure() {
    let dir = tempfile::tempdir().unwrap();
    let img = DynamicImage::ImageRgb8(RgbImage::new(8, 8));
    let out = dir.path().join("out.png");
    write_image(&img, &out).unwrap();
    assert_eq!(read_image(&out, 64).unwrap().width(), 8);
    // An encoder failure (16-bit RGBA into a format that cannot hold it is converted, so use
    // an impossible target instead: a directory path).
    let bad = dir.path().join("sub");
    std::fs::create_dir(&bad).unwrap();
    assert!(write_image(&img, &bad).is_err());
    let names: Vec<_> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    assert_eq!(names.len(), 2, "no temporary left behind: {names:?}");
}
