//! Checkpoints: the embedding file, AdamW's moments and the step beside it, written so that
//! a crash never pairs a step with older vectors; and the point a resumed run starts from.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{Device, Tensor};

use super::optimizer::Moments;
use super::{io_error, TrainError, TrainOptions};
use crate::embeddings::{read_embedding, EmbeddingVectors, TextWidths};

/// What `<out>.train.json` records next to a checkpoint.
#[derive(Debug, serde::Serialize, serde::Deserialize)]
pub(super) struct CheckpointState {
    pub(super) name: String,
    pub(super) step: usize,
    pub(super) vectors: usize,
}

fn optim_path(out: &Path) -> PathBuf {
    let mut name = out.as_os_str().to_owned();
    name.push(".optim.safetensors");
    PathBuf::from(name)
}

pub(super) fn read_moments(out: &Path) -> Option<Moments> {
    let t = candle_core::safetensors::load(optim_path(out), &Device::Cpu).ok()?;
    let (mut m, mut v) = (Vec::new(), Vec::new());
    for i in 0.. {
        match (t.get(&format!("m.{i}")), t.get(&format!("v.{i}"))) {
            (Some(a), Some(b)) => {
                m.push(a.clone());
                v.push(b.clone());
            }
            _ => break,
        }
    }
    (!m.is_empty()).then_some(Moments { m, v })
}

/// Writes `vectors` to `out` in the format its extension names, atomically, then the
/// `.train.json` state.
pub(super) fn save_checkpoint(
    out: &Path,
    vectors: &EmbeddingVectors,
    state: &CheckpointState,
    moments: Option<&Moments>,
) -> Result<(), TrainError> {
    let mut tensors: HashMap<String, Tensor> = HashMap::new();
    match &vectors.second {
        None => {
            tensors.insert("emb_params".into(), vectors.first.clone());
        }
        Some(g) => {
            tensors.insert("clip_l".into(), vectors.first.clone());
            tensors.insert("clip_g".into(), g.clone());
        }
    }
    let dir = out
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir).map_err(io_error(dir))?;
    let file_name = out
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    // The optimizer state first, the embedding next, the step last: the step file is what a
    // resume trusts, so a crash in between never pairs a step with older vectors.
    let optim = optim_path(out);
    match moments {
        Some(mo) => {
            let mut t: HashMap<String, Tensor> = HashMap::new();
            for (i, (m, v)) in mo.m.iter().zip(&mo.v).enumerate() {
                t.insert(format!("m.{i}"), m.to_device(&Device::Cpu)?);
                t.insert(format!("v.{i}"), v.to_device(&Device::Cpu)?);
            }
            let tmp = dir.join(format!(".{file_name}.optim.partial"));
            candle_core::safetensors::save(&t, &tmp)?;
            std::fs::rename(&tmp, &optim).map_err(io_error(&optim))?;
        }
        None => {
            // A new embedding replacing an old one must not inherit its moments.
            let _ = std::fs::remove_file(&optim);
        }
    }
    let tmp = dir.join(format!(".{file_name}.partial"));
    if out.extension().is_some_and(|e| e == "pt") {
        // `save_torch_zip` itself writes through a temporary file and renames.
        sdkube_weights::save_torch_zip(out, &tensors)?;
    } else {
        candle_core::safetensors::save(&tensors, &tmp)?;
        std::fs::rename(&tmp, out).map_err(io_error(out))?;
    }
    let json = state_path(out);
    let tmp = dir.join(format!(".{file_name}.train.json.partial"));
    let text = serde_json::to_string_pretty(state)
        .map_err(|e| TrainError::Invalid(format!("writing the training state: {e}")))?;
    std::fs::write(&tmp, text).map_err(io_error(&tmp))?;
    std::fs::rename(&tmp, &json).map_err(io_error(&json))?;
    Ok(())
}

fn state_path(out: &Path) -> PathBuf {
    let mut name = out.as_os_str().to_owned();
    name.push(".train.json");
    PathBuf::from(name)
}

/// `(vectors, step)` of the checkpoint to resume from, or `None` to start afresh.
pub(super) fn resume_point(
    opts: &TrainOptions,
    widths: TextWidths,
) -> Result<Option<(EmbeddingVectors, usize)>, TrainError> {
    if !opts.out.exists() {
        return Ok(None);
    }
    if !opts.resume {
        return Err(TrainError::Exists(opts.out.clone()));
    }
    let vectors = read_embedding(&opts.out)?;
    let dims_ok = vectors.first.dims() == [opts.vectors, widths.first]
        && match (&vectors.second, widths.second) {
            (None, None) => true,
            (Some(g), Some(w)) => g.dims() == [opts.vectors, w],
            _ => false,
        };
    if !dims_ok {
        return Err(TrainError::Invalid(format!(
            "{} holds {} vectors of shape {:?}, not {} for this model; it cannot be resumed",
            opts.out.display(),
            vectors.count(),
            vectors.first.dims(),
            opts.vectors
        )));
    }
    let json = state_path(&opts.out);
    let step = match std::fs::read_to_string(&json) {
        Ok(text) => {
            serde_json::from_str::<CheckpointState>(&text)
                .map_err(|e| TrainError::Invalid(format!("{}: {e}", json.display())))?
                .step
        }
        Err(_) => 0,
    };
    Ok(Some((vectors, step)))
}
