//! What the commands that process image files (`upscale`, `restore-faces`) share: their
//! common options, finding a model given by path or by store name, reading the inputs and
//! planning and writing the outputs.

use std::path::{Path, PathBuf};

use anyhow::Context;
use candle_core::Device;
use image::DynamicImage;
use sdkube_restore::io::{read_image, write_image, DEFAULT_MAX_PIXELS};

use super::fetch::{StoreArgs, Usage};

/// The options of `upscale` and `restore-faces` after their own: input limit, outputs, the
/// store that model names are looked up in, the device.
#[derive(clap::Args)]
pub struct ImageFileArgs {
    /// Refuse inputs with more pixels than this.
    #[arg(long, default_value_t = DEFAULT_MAX_PIXELS)]
    pub max_pixels: u64,
    /// Output directory (created if missing); outputs are `<name>.png`.
    #[arg(long, short)]
    pub out: PathBuf,
    /// Replace existing output files.
    #[arg(long)]
    pub overwrite: bool,
    #[command(flatten)]
    pub store: StoreArgs,
    /// `cpu` (default), `cuda`, `cuda:N` or `auto`.
    #[arg(long, env = "SDKUBE_DEVICE", default_value = "cpu")]
    pub device: String,
}

impl ImageFileArgs {
    /// A model given as a path (accepted by `is_model`) or by name from the store.
    pub fn find_model(
        &self,
        model: &str,
        is_model: impl Fn(&Path) -> bool,
    ) -> Result<PathBuf, Usage> {
        find_model(model, &self.store.store, is_model)
    }

    /// The output of each input ([`output_pngs`]).
    pub fn outputs(&self, images: &[PathBuf]) -> Result<Vec<PathBuf>, Usage> {
        output_pngs(images, &self.out, self.overwrite)
    }

    /// Every input read and checked against the pixel limit, before any work.
    pub fn read_inputs(&self, images: &[PathBuf]) -> anyhow::Result<Vec<DynamicImage>> {
        images
            .iter()
            .map(|p| read_image(p, self.max_pixels).map_err(anyhow::Error::from))
            .collect()
    }

    pub fn device(&self) -> anyhow::Result<Device> {
        super::device::device_named(&self.device)
    }

    /// Creates the output directory and writes each image to its output, printing its path.
    pub fn write_outputs(
        &self,
        images: &[DynamicImage],
        outputs: &[PathBuf],
    ) -> anyhow::Result<()> {
        std::fs::create_dir_all(&self.out)
            .with_context(|| format!("creating {}", self.out.display()))?;
        for (img, path) in images.iter().zip(outputs) {
            write_image(img, path)?;
            println!("{}", path.display());
        }
        Ok(())
    }
}

/// A model given as a path (accepted by `is_model`) or as the name of a model present in the
/// store. A store that does not exist is not created by the lookup.
fn find_model(
    model: &str,
    store_root: &Path,
    is_model: impl Fn(&Path) -> bool,
) -> Result<PathBuf, Usage> {
    let as_path = PathBuf::from(model);
    if is_model(&as_path) {
        return Ok(as_path);
    }
    if store_root.is_dir() {
        if let Ok(store) = sdkube_store::Store::open(store_root) {
            if let Some(p) = store.model_path(model).filter(|p| p.is_file()) {
                return Ok(p);
            }
        }
    }
    Err(Usage(format!(
        "model `{model}` is neither a file nor a model present in the store {} \
         (fetch it with `sdkube fetch {model}`, or pass a path)",
        store_root.display()
    )))
}

/// `<out>/<input stem>.png` for each input; refuses two inputs landing on one output and,
/// unless `overwrite`, outputs that exist already.
fn output_pngs(images: &[PathBuf], out: &Path, overwrite: bool) -> Result<Vec<PathBuf>, Usage> {
    let mut outputs: Vec<PathBuf> = Vec::new();
    for input in images {
        let stem = input
            .file_stem()
            .ok_or_else(|| Usage(format!("{}: not a file name", input.display())))?;
        let path = out.join(Path::new(stem).with_extension("png"));
        if outputs.contains(&path) {
            return Err(Usage(format!(
                "two inputs would both be written to {}",
                path.display()
            )));
        }
        if path.exists() && !overwrite {
            return Err(Usage(format!(
                "{} exists; pass --overwrite to replace it",
                path.display()
            )));
        }
        outputs.push(path);
    }
    Ok(outputs)
}
