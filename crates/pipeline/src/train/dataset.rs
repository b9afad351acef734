//! The training set: images and their words, caption templates, and the seeded order in
//! which steps take them.

use std::path::{Path, PathBuf};

use candle_core::Tensor;
use rand::seq::SliceRandom;
use rand::SeedableRng;

use super::{io_error, TrainError};

/// Image files a training set may hold.
pub const IMAGE_EXTENSIONS: [&str; 4] = ["png", "jpg", "jpeg", "webp"];

/// Caption templates: `[name]` is the embedding's name, `[filewords]` the image's words.
#[derive(Debug, Clone, PartialEq)]
pub enum Template {
    /// An object or a person ("a photo of a [name]"…).
    Subject,
    /// An artistic style ("a painting in the style of [name]"…).
    Style,
    /// One caption per non-empty line.
    Lines(Vec<String>),
}

const SUBJECT: [&str; 8] = [
    "a photo of a [name]",
    "a rendering of a [name]",
    "a cropped photo of the [name]",
    "a close-up photo of a [name]",
    "a bright photo of the [name]",
    "a good photo of a [name]",
    "a photo of one [name]",
    "a photo of the small [name]",
];

const STYLE: [&str; 6] = [
    "a painting in the style of [name]",
    "a rendering in the style of [name]",
    "a picture in the style of [name]",
    "an illustration in the style of [name]",
    "a drawing in the style of [name]",
    "artwork in the style of [name]",
];

impl Template {
    /// `subject`, `style`, or the path of a file with one caption per line.
    pub fn parse(text: &str) -> Result<Self, TrainError> {
        match text {
            "subject" => Ok(Self::Subject),
            "style" => Ok(Self::Style),
            path => {
                let path = Path::new(path);
                let content = std::fs::read_to_string(path).map_err(io_error(path))?;
                let lines: Vec<String> = content
                    .lines()
                    .map(str::trim)
                    .filter(|l| !l.is_empty())
                    .map(String::from)
                    .collect();
                if lines.is_empty() {
                    return Err(TrainError::Invalid(format!(
                        "template file {} has no captions",
                        path.display()
                    )));
                }
                Ok(Self::Lines(lines))
            }
        }
    }

    /// The captions, one per line.
    pub fn lines(&self) -> Vec<&str> {
        match self {
            Self::Subject => SUBJECT.to_vec(),
            Self::Style => STYLE.to_vec(),
            Self::Lines(lines) => lines.iter().map(String::as_str).collect(),
        }
    }
}

/// One training image: its latent `[1, C, h, w]` (f32, scaled) and its words.
pub(super) struct Example {
    pub(super) latent: Tensor,
    pub(super) filewords: String,
}

/// A1111's `[filewords]`: the `.txt` next to the image, or the file stem without leading
/// numbers and with `_` as spaces.
pub(super) fn filewords(path: &Path) -> Result<String, TrainError> {
    let sidecar = path.with_extension("txt");
    if sidecar.is_file() {
        let text = std::fs::read_to_string(&sidecar).map_err(io_error(&sidecar))?;
        return Ok(text.trim().to_string());
    }
    let stem = path
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_default();
    let trimmed = stem.trim_start_matches(|c: char| c.is_ascii_digit() || c == '-');
    Ok(trimmed.replace('_', " ").trim().to_string())
}

/// The training images of `dir`, sorted by name; any file that is not a readable image
/// (by extension) stops training before it starts.
pub fn list_images(dir: &Path) -> Result<Vec<PathBuf>, TrainError> {
    let mut paths: Vec<PathBuf> = std::fs::read_dir(dir)
        .map_err(io_error(dir))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            p.is_file()
                && p.extension()
                    .and_then(|e| e.to_str())
                    .is_some_and(|e| IMAGE_EXTENSIONS.contains(&e.to_ascii_lowercase().as_str()))
        })
        .collect();
    paths.sort();
    if paths.is_empty() {
        return Err(TrainError::Invalid(format!(
            "{} has no training images ({})",
            dir.display(),
            IMAGE_EXTENSIONS.join(", ")
        )));
    }
    Ok(paths)
}

/// A template line with its placeholders filled.
pub(super) fn caption(line: &str, name: &str, filewords: &str) -> String {
    line.replace("[name]", name)
        .replace("[filewords]", filewords)
}

/// A seeded generator for step `step` alone (resumable: no state carried between steps).
pub(super) fn step_rng(seed: u64, step: u64) -> rand::rngs::StdRng {
    rand::rngs::StdRng::seed_from_u64(seed.wrapping_mul(0x2545_F491_4F6C_DD1D) ^ step)
}

/// Images of step `step`: epochs walk a seeded permutation, so every image is seen once
/// per epoch.
pub(super) fn batch_indices(seed: u64, step: usize, batch: usize, n: usize) -> Vec<usize> {
    (0..batch)
        .map(|j| {
            let k = step * batch + j;
            let epoch = (k / n) as u64;
            let mut order: Vec<usize> = (0..n).collect();
            order.shuffle(&mut step_rng(seed ^ 0x5EED, epoch));
            order[k % n]
        })
        .collect()
}
