//! Input and output files shared by the commands that process image files (`upscale`,
//! `restore-faces`): finding a model given by path or by store name, and planning outputs.

use std::path::{Path, PathBuf};

use super::fetch::Usage;

/// A model given as a path (accepted by `is_model`) or as the name of a model present in the
/// store. A store that does not exist is not created by the lookup.
pub fn find_model(
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
pub fn output_pngs(images: &[PathBuf], out: &Path, overwrite: bool) -> Result<Vec<PathBuf>, Usage> {
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
