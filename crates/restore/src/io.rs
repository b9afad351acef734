//! Reading and writing image files with the checks a service needs: the format is sniffed
//! from content, dimensions are checked against a pixel limit before any pixel is decoded,
//! and outputs appear only once completely written.

use std::io::Read;
use std::path::Path;

use image::{DynamicImage, ImageFormat, ImageReader};

use crate::Error;

/// Inputs larger than this many pixels are refused unless the caller raises the limit.
pub const DEFAULT_MAX_PIXELS: u64 = 4096 * 4096;

/// Decodes `path`, refusing non-images, truncated files, zero-sized images and images of
/// more than `max_pixels` pixels (checked from the header, before decoding).
pub fn read_image(path: &Path, max_pixels: u64) -> Result<DynamicImage, Error> {
    let shown = path.display();
    // The content decides the format, never the file name.
    let format = {
        let mut head = Vec::with_capacity(64);
        std::fs::File::open(path)
            .and_then(|f| f.take(64).read_to_end(&mut head))
            .map_err(|e| Error::BadImage(format!("{shown}: cannot open: {e}")))?;
        image::guess_format(&head).map_err(|_| {
            Error::BadImage(format!(
                "{shown}: not an image (no PNG/JPEG/WebP signature)"
            ))
        })?
    };
    let open = || -> Result<ImageReader<std::io::BufReader<std::fs::File>>, Error> {
        let mut reader = ImageReader::open(path)
            .map_err(|e| Error::BadImage(format!("{shown}: cannot open: {e}")))?;
        reader.set_format(format);
        Ok(reader)
    };
    let (w, h) = open()?
        .into_dimensions()
        .map_err(|e| Error::BadImage(format!("{shown}: unreadable image header: {e}")))?;
    if w == 0 || h == 0 {
        return Err(Error::BadImage(format!(
            "{shown}: image is {w}×{h}: nothing to process"
        )));
    }
    let pixels = w as u64 * h as u64;
    if pixels > max_pixels {
        return Err(Error::BadImage(format!(
            "{shown}: image is {w}×{h} = {pixels} pixels, over the limit of {max_pixels}"
        )));
    }
    let mut reader = open()?;
    let mut limits = image::Limits::default();
    limits.max_image_width = Some(w);
    limits.max_image_height = Some(h);
    reader.limits(limits);
    reader.decode().map_err(|e| {
        Error::BadImage(format!(
            "{shown}: cannot decode (truncated or corrupt?): {e}"
        ))
    })
}

/// Writes `img` to `path` (format from the extension, PNG if none) through a temporary file
/// in the same directory, so a failure never leaves a partial file behind.
pub fn write_image(img: &DynamicImage, path: &Path) -> Result<(), Error> {
    let format = ImageFormat::from_path(path).unwrap_or(ImageFormat::Png);
    let dir = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let mut tmp = tempfile::Builder::new()
        .prefix(".sdkube-")
        .tempfile_in(dir)?;
    let img = match format {
        // JPEG has no alpha and no 16-bit: convert rather than fail.
        ImageFormat::Jpeg => DynamicImage::ImageRgb8(img.to_rgb8()),
        _ => img.clone(),
    };
    {
        let mut w = std::io::BufWriter::new(tmp.as_file_mut());
        img.write_to(&mut w, format)
            .map_err(|e| Error::BadImage(format!("{}: cannot encode: {e}", path.display())))?;
        std::io::Write::flush(&mut w)?;
    }
    tmp.persist(path).map_err(|e| Error::Io(e.error))?;
    Ok(())
}
