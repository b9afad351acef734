//! Reading weight files: safetensors and tensor-only pickle checkpoints.
//!
//! [`load`] picks the format by content, not by extension: safetensors, torch zip
//! checkpoints (`.ckpt`, `.pth`, `.pt`, `.bin`) and legacy pre-1.6 torch files. Pickled
//! checkpoints go through [`pickle`], which never executes anything and refuses every global
//! that is not tensor plumbing. [`load_tree`] keeps the whole object tree (A1111 embeddings,
//! `params_ema` wrappers); [`save_torch_zip`] writes what `torch.load(weights_only=True)` reads.
//! [`onnx`] reads the nodes and initializers of ONNX models.

pub mod onnx;
pub mod pickle;
mod safetensors_reader;
mod torch;

use std::collections::HashMap;
use std::io::Read;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};

pub use pickle::Value;
pub use safetensors_reader::StoredTensor;
pub use torch::save_torch_zip;

/// What can go wrong reading or writing weights.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// `error`, reading the file at `path`.
    #[error("{}: {error}", path.display())]
    File {
        /// The file.
        path: PathBuf,
        /// What went wrong.
        error: Box<Error>,
    },
    /// Reading or writing failed.
    #[error(transparent)]
    Io(#[from] std::io::Error),
    /// The pickle names a callable that is not tensor plumbing; nothing was called.
    #[error(
        "refusing to load: the pickle names `{module}.{name}`, which is not tensor data \
         (a checkpoint may only contain tensors, numbers, strings and containers; nothing was executed)"
    )]
    ForbiddenGlobal {
        /// Its module.
        module: String,
        /// Its name.
        name: String,
    },
    /// The pickle stream is not well formed.
    #[error("malformed pickle at byte {offset}: {msg}")]
    Pickle {
        /// Where, in the pickle stream.
        offset: usize,
        /// What is wrong there.
        msg: String,
    },
    /// The file is none of the formats [`load`] reads.
    #[error(
        "not a weight file: expected safetensors, a torch zip checkpoint or a legacy torch file"
    )]
    UnknownFormat,
    /// The container is recognised but its content is not what it should be.
    #[error("{0}")]
    Format(String),
    /// An ONNX model (or the Python bytes literal holding one) that cannot be read.
    #[error("ONNX model: {0}")]
    Onnx(String),
    /// A torch zip checkpoint's archive cannot be read.
    #[error("zip: {0}")]
    Zip(#[from] zip::result::ZipError),
    /// A tensor could not be built.
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
}

/// Container formats [`load`] recognises.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// Hugging Face safetensors.
    Safetensors,
    /// A torch zip checkpoint (`torch.save` since torch 1.6).
    TorchZip,
    /// A torch file from before 1.6: pickles and raw storages back to back.
    TorchLegacy,
}

/// Identifies the container by its first bytes.
pub fn detect(path: &Path) -> Result<Format, Error> {
    let in_file = |error: Error| Error::File {
        path: path.to_path_buf(),
        error: Box::new(error),
    };
    let mut head = [0u8; 16];
    let mut f = std::fs::File::open(path).map_err(|e| in_file(e.into()))?;
    let len = f.metadata().map_err(|e| in_file(e.into()))?.len();
    let mut n = 0;
    while n < head.len() {
        match f.read(&mut head[n..]).map_err(|e| in_file(e.into()))? {
            0 => break,
            k => n += k,
        }
    }
    format_of(&head[..n], len).ok_or_else(|| in_file(Error::UnknownFormat))
}

/// The container that starts with `head` in a file of `len` bytes.
fn format_of(head: &[u8], len: u64) -> Option<Format> {
    if head.starts_with(b"PK\x03\x04") {
        return Some(Format::TorchZip);
    }
    if head.starts_with(torch::LEGACY_MAGIC) {
        return Some(Format::TorchLegacy);
    }
    if head.len() >= 9 {
        let header_len = u64::from_le_bytes(head[..8].try_into().expect("8 bytes"));
        if head[8] == b'{' && header_len.saturating_add(8) <= len {
            return Some(Format::Safetensors);
        }
    }
    None
}

/// Reads any supported weight file as an object tree, tensors on the CPU in their stored
/// dtype. Safetensors files become a flat dict of their tensors.
pub fn load_tree(path: &Path) -> Result<Value, Error> {
    let in_file = |error: Error| Error::File {
        path: path.to_path_buf(),
        error: Box::new(error),
    };
    match detect(path)? {
        Format::Safetensors => safetensors_reader::from_file(path).map_err(in_file),
        Format::TorchZip => {
            let file = std::fs::File::open(path).map_err(|e| in_file(e.into()))?;
            torch::read_zip(std::io::BufReader::new(file)).map_err(in_file)
        }
        Format::TorchLegacy => {
            let data = std::fs::read(path).map_err(|e| in_file(e.into()))?;
            torch::read_legacy(&data).map_err(in_file)
        }
    }
}

/// Where each tensor of the safetensors file at `path` is stored (keys sorted), for a reader
/// that puts the bytes somewhere of its own (a GPU's memory); the header is checked as
/// [`load_tree`] checks it. `None` for a file of another format, or one holding an element
/// type that candle does not keep as stored.
pub fn safetensors_index(path: &Path) -> Result<Option<Vec<StoredTensor>>, Error> {
    let in_file = |error: Error| Error::File {
        path: path.to_path_buf(),
        error: Box::new(error),
    };
    match detect(path)? {
        Format::Safetensors => safetensors_reader::index(path).map_err(in_file),
        _ => Ok(None),
    }
}

/// [`load_tree`] of a file already in memory (an upload, a fuzzer's input). Errors do not
/// name a file: wrap them in [`Error::File`] where there is one.
pub fn load_tree_from_bytes(data: &[u8]) -> Result<Value, Error> {
    match format_of(data, data.len() as u64).ok_or(Error::UnknownFormat)? {
        Format::Safetensors => safetensors_reader::from_bytes(data),
        Format::TorchZip => torch::read_zip(std::io::Cursor::new(data)),
        Format::TorchLegacy => torch::read_legacy(data),
    }
}

/// Reads every tensor of a weight file under its dotted key ([`Value::flatten`]), moved to
/// `device`; floating-point tensors are converted to `dtype`, integer ones keep theirs.
pub fn load(path: &Path, device: &Device, dtype: DType) -> Result<HashMap<String, Tensor>, Error> {
    let tensors = load_tree(path)?.flatten();
    tensors
        .into_iter()
        .map(|(k, t)| {
            let t = if t.dtype().is_float() && t.dtype() != dtype && dtype.is_float() {
                t.to_dtype(dtype)?
            } else {
                t
            };
            Ok((k, t.to_device(device)?))
        })
        .collect::<Result<_, candle_core::Error>>()
        .map_err(|e| Error::File {
            path: path.to_path_buf(),
            error: Box::new(e.into()),
        })
}

/// Refuses a shape whose element count overflows once its zero dimensions are left out: an
/// empty tensor of shape `[0, 2^40, 2^30]` is valid to the safetensors and pickle formats, but
/// candle computes its strides (and code reading shapes multiplies them) and overflows.
pub(crate) fn check_shape(shape: &[usize]) -> Result<(), String> {
    shape
        .iter()
        .filter(|&&d| d != 0)
        .try_fold(1usize, |n, &d| n.checked_mul(d))
        .filter(|&n| n <= isize::MAX as usize / 16)
        .map(|_| ())
        .ok_or_else(|| format!("shape {shape:?} is larger than any tensor can be"))
}
