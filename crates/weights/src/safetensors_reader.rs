//! Safetensors files as a flat dict of their tensors, from memory or straight from a file.
//!
//! From a file, each tensor is read into its own buffer by several threads at once: one pass
//! over the data, and no file-sized staging buffer. A model's files are gigabytes; touching
//! every page of a staging copy and then every page of the tensors took as long again as the
//! read itself.

use std::os::unix::fs::FileExt;
use std::path::Path;

use candle_core::safetensors::Load;
use candle_core::{DType, Device, Tensor};
use safetensors::tensor::{Dtype, Metadata, TensorInfo, TensorView};

use crate::{check_shape, Error, Value};

/// The safetensors crate's bound on a header (100 MB).
const MAX_HEADER: u64 = 100_000_000;

/// A safetensors file already in memory as a flat dict of its tensors, keys sorted.
pub(crate) fn from_bytes(data: &[u8]) -> Result<Value, Error> {
    // The safetensors crate checks the header (its length, offsets covering the data exactly,
    // element counts); shapes are checked here before candle builds anything from them.
    let file = safetensors::SafeTensors::deserialize(data)
        .map_err(|e| Error::Format(format!("safetensors header: {e}")))?;
    let views = file.tensors();
    for (name, view) in &views {
        check_shape(view.shape()).map_err(|msg| Error::Format(format!("`{name}`: {msg}")))?;
    }
    let items = in_parallel(&views, |(name, view)| {
        Ok((name.clone(), view.load(&Device::Cpu)?))
    })?;
    Ok(dict(items))
}

/// The safetensors file at `path` as a flat dict of its tensors, keys sorted; the same checks
/// as [`from_bytes`].
pub(crate) fn from_file(path: &Path) -> Result<Value, Error> {
    let file = std::fs::File::open(path)?;
    let (data_start, metadata) = header(&file)?;
    let infos: Vec<(String, &TensorInfo)> = metadata.tensors().into_iter().collect();
    let items = in_parallel(&infos, |(name, info)| {
        let offset = data_start + info.data_offsets.0 as u64;
        let bytes = info.data_offsets.1 - info.data_offsets.0;
        Ok((name.clone(), read_tensor(&file, offset, bytes, info)?))
    })?;
    Ok(dict(items))
}

/// One tensor of a safetensors file: where its bytes are, what they hold.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredTensor {
    /// Its key.
    pub name: String,
    /// Its element type.
    pub dtype: DType,
    /// Its shape.
    pub shape: Vec<usize>,
    /// Where its bytes start in the file (`elem_count × dtype size` of them).
    pub offset: u64,
}

/// Every tensor of the safetensors file at `path`, keys sorted, after the checks [`from_file`]
/// makes; `None` where one of them has an element type that candle does not keep as stored
/// (those need [`from_file`]'s conversion).
pub(crate) fn index(path: &Path) -> Result<Option<Vec<StoredTensor>>, Error> {
    let file = std::fs::File::open(path)?;
    let (data_start, metadata) = header(&file)?;
    let mut tensors = Vec::new();
    for (name, info) in metadata.tensors() {
        let Some(dtype) = kept_as_stored(info.dtype) else {
            return Ok(None);
        };
        tensors.push(StoredTensor {
            name,
            dtype,
            shape: info.shape.clone(),
            offset: data_start + info.data_offsets.0 as u64,
        });
    }
    tensors.sort_by(|a, b| a.name.cmp(&b.name));
    Ok(Some(tensors))
}

/// Where a safetensors file's data starts, and its header, checked: offsets that follow each
/// other from 0, byte counts that match element counts, data that ends with the file, shapes
/// candle can build.
fn header(file: &std::fs::File) -> Result<(u64, Metadata), Error> {
    let len = file.metadata()?.len();
    let mut head = [0u8; 8];
    file.read_exact_at(&mut head, 0)?;
    let header_len = u64::from_le_bytes(head);
    if header_len > MAX_HEADER || header_len + 8 > len {
        return Err(Error::Format(format!(
            "safetensors header: {header_len} bytes long, in a file of {len}"
        )));
    }
    let mut header = vec![0u8; header_len as usize];
    file.read_exact_at(&mut header, 8)?;
    // Deserializing checks that the offsets follow each other from 0 and that each tensor's
    // bytes are its element count times its dtype's size.
    let metadata: Metadata = serde_json::from_slice(&header)
        .map_err(|e| Error::Format(format!("safetensors header: {e}")))?;
    let data_start = 8 + header_len;
    if data_start + metadata.data_len() as u64 != len {
        return Err(Error::Format(format!(
            "safetensors header: its tensors take {} bytes, the file has {} after the header",
            metadata.data_len(),
            len - data_start
        )));
    }
    for (name, info) in metadata.tensors() {
        check_shape(&info.shape).map_err(|msg| Error::Format(format!("`{name}`: {msg}")))?;
    }
    Ok((data_start, metadata))
}

/// One tensor of `bytes` bytes at `offset`, read into a buffer of its element type where candle
/// keeps that type as stored (no conversion, so no second copy), through candle's conversion
/// of a byte buffer otherwise.
fn read_tensor(
    file: &std::fs::File,
    offset: u64,
    bytes: usize,
    info: &TensorInfo,
) -> Result<Tensor, Error> {
    // Zeroed vectors of primitive types come from the OS untouched until read into.
    fn typed<P: bytemuck::Pod, T: bytemuck::Pod + candle_core::WithDType>(
        file: &std::fs::File,
        offset: u64,
        bytes: usize,
        shape: &[usize],
        zero: P,
    ) -> Result<Tensor, Error> {
        let mut raw = vec![zero; bytes / std::mem::size_of::<P>()];
        file.read_exact_at(bytemuck::cast_slice_mut(&mut raw), offset)?;
        let values: Vec<T> = bytemuck::allocation::cast_vec(raw);
        Ok(Tensor::from_vec(values, shape, &Device::Cpu)?)
    }
    let shape = &info.shape;
    match kept_as_stored(info.dtype) {
        Some(DType::F16) => typed::<u16, half::f16>(file, offset, bytes, shape, 0),
        Some(DType::BF16) => typed::<u16, half::bf16>(file, offset, bytes, shape, 0),
        Some(DType::F32) => typed::<f32, f32>(file, offset, bytes, shape, 0.0),
        Some(DType::F64) => typed::<f64, f64>(file, offset, bytes, shape, 0.0),
        Some(DType::U8) => typed::<u8, u8>(file, offset, bytes, shape, 0),
        Some(DType::U32) => typed::<u32, u32>(file, offset, bytes, shape, 0),
        Some(DType::I64) => typed::<i64, i64>(file, offset, bytes, shape, 0),
        _ => {
            let mut raw = vec![0u8; bytes];
            file.read_exact_at(&mut raw, offset)?;
            let view = TensorView::new(info.dtype, shape.clone(), &raw)
                .map_err(|e| Error::Format(format!("safetensors tensor: {e}")))?;
            Ok(view.load(&Device::Cpu)?)
        }
    }
}

/// The candle type a safetensors element type is kept as, unconverted; `None` for the types
/// candle converts on loading.
fn kept_as_stored(dtype: Dtype) -> Option<DType> {
    Some(match dtype {
        Dtype::F16 => DType::F16,
        Dtype::BF16 => DType::BF16,
        Dtype::F32 => DType::F32,
        Dtype::F64 => DType::F64,
        Dtype::U8 => DType::U8,
        Dtype::U32 => DType::U32,
        Dtype::I64 => DType::I64,
        _ => return None,
    })
}

/// Threads that read a file, and that copy its tensors out: a model's files are gigabytes, and
/// one thread copies from the page cache at a fraction of what the memory bus gives several.
fn reader_threads() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get().min(8))
}

/// `load` of every item, by [`reader_threads`] threads each taking every n-th.
fn in_parallel<I: Sync>(
    items: &[I],
    load: impl Fn(&I) -> Result<(String, Tensor), Error> + Sync,
) -> Result<Vec<(String, Tensor)>, Error> {
    let threads = reader_threads();
    std::thread::scope(|s| {
        let parts: Vec<_> = (0..threads)
            .map(|first| {
                let load = &load;
                s.spawn(move || {
                    items
                        .iter()
                        .skip(first)
                        .step_by(threads)
                        .map(load)
                        .collect::<Result<Vec<_>, Error>>()
                })
            })
            .collect();
        parts.into_iter().try_fold(Vec::new(), |mut all, part| {
            all.extend(
                part.join()
                    .unwrap_or_else(|p| std::panic::resume_unwind(p))?,
            );
            Ok(all)
        })
    })
}

/// The tensors as a dict, keys sorted.
fn dict(mut items: Vec<(String, Tensor)>) -> Value {
    items.sort_by(|a, b| a.0.cmp(&b.0));
    Value::Dict(
        items
            .into_iter()
            .map(|(k, t)| (Value::Str(k), Value::Tensor(t)))
            .collect(),
    )
}
