//! PyTorch checkpoint containers, read and written without Python.
//!
//! * zip (torch ≥ 1.6, `.ckpt`/`.pth`/`.pt`/`.bin`): `<name>/data.pkl` holds the object
//!   tree, `<name>/data/<key>` each raw little-endian storage.
//! * legacy (torch < 1.6, `_use_new_zipfile_serialization=False`): five concatenated
//!   sections — a pickled magic number, the protocol version, `sys_info`, the object tree,
//!   the list of storage keys — then, per key in that order, an `i64` element count and the
//!   raw storage.
//!
//! Tensors are materialised after the tree is read, one storage at a time, so a checkpoint
//! costs its tensors plus one storage of memory, never two copies of everything.

use std::collections::HashMap;
use std::io::{Read, Seek, Write};
use std::path::Path;

use candle_core::{DType, Device, Tensor};

use crate::pickle::{unpickle, Obj, StorageDType, StorageRef, TensorRef, Value, MAX_DEPTH};
use crate::Error;

/// The first bytes of every legacy torch file: `pickle.dumps(0x1950a86a20f9469cfc6c, 2)`.
pub(crate) const LEGACY_MAGIC: &[u8] = b"\x80\x02\x8a\x0a\x6c\xfc\x9c\x46\xf9\x20\x6a\xa8\x50\x19.";

/// Reads a zip checkpoint into a value tree.
pub(crate) fn read_zip(mut archive: impl Read + Seek) -> Result<Value, Error> {
    let archive_len = archive.seek(std::io::SeekFrom::End(0))?;
    let mut zip = zip::ZipArchive::new(archive)?;
    let pkl_name = zip
        .file_names()
        .filter_map(|n| n.ok())
        .find(|n| n.ends_with("data.pkl") && n.matches('/').count() == 1)
        .map(|n| n.into_owned())
        .ok_or_else(|| Error::Format("zip archive has no `<name>/data.pkl`".into()))?;
    let prefix = pkl_name.trim_end_matches("data.pkl").to_string();
    if let Ok(mut bo) = zip.by_name(&format!("{prefix}byteorder")) {
        let mut s = String::new();
        bo.read_to_string(&mut s)?;
        if s.trim() != "little" {
            return Err(Error::Format(format!(
                "byte order `{}` is not supported",
                s.trim()
            )));
        }
    }
    let mut pkl = Vec::new();
    zip.by_name(&pkl_name)?.read_to_end(&mut pkl)?;
    let (tree, _) = unpickle(&pkl)?;
    materialise(tree, |storage: &StorageRef| {
        let name = format!("{prefix}data/{}", storage.key);
        let mut entry = zip
            .by_name(&name)
            .map_err(|_| Error::Format(format!("storage `{name}` is missing from the archive")))?;
        // The archive's directory claims the size: reserve it only once the archive is seen
        // to hold that many bytes (stored entries are never larger than their compressed
        // size), else read what is there and let the tensors find it short.
        let claimed = entry.size();
        let mut buf = Vec::new();
        if claimed <= entry.compressed_size() && claimed <= archive_len {
            buf.reserve_exact(claimed as usize);
        }
        entry.read_to_end(&mut buf)?;
        Ok(buf)
    })
}

/// Reads a legacy (pre-1.6) torch file into a value tree.
pub(crate) fn read_legacy(data: &[u8]) -> Result<Value, Error> {
    if !data.starts_with(LEGACY_MAGIC) {
        return Err(Error::Format(
            "not a legacy torch file (magic number)".into(),
        ));
    }
    let mut pos = LEGACY_MAGIC.len();
    let mut next = |what: &str| -> Result<Obj, Error> {
        let (v, n) = unpickle(&data[pos..]).map_err(|e| match e {
            Error::Pickle { offset, msg } => Error::Pickle {
                offset: offset + pos,
                msg: format!("{what}: {msg}"),
            },
            e => e,
        })?;
        pos += n;
        Ok(v)
    };
    match next("protocol version")? {
        Obj::Int(1001) => {}
        other => {
            return Err(Error::Format(format!(
                "legacy protocol version {other:?} is not 1001"
            )))
        }
    }
    if let Obj::Dict(info) = next("sys_info")? {
        for (k, v) in info {
            if matches!(&k, Obj::Str(s) if s == "little_endian") && matches!(v, Obj::Bool(false)) {
                return Err(Error::Format(
                    "big-endian checkpoints are not supported".into(),
                ));
            }
        }
    }
    let tree = next("object tree")?;
    let keys = match next("storage keys")? {
        Obj::List(keys) => keys
            .into_iter()
            .map(|k| match k {
                Obj::Str(s) => Ok(s),
                Obj::Int(i) => Ok(i.to_string()),
                _ => Err(Error::Format("storage key is not a string".into())),
            })
            .collect::<Result<Vec<_>, _>>()?,
        _ => return Err(Error::Format("storage key list is not a list".into())),
    };
    // The raw section: per key, an i64 element count then the elements. Element sizes come
    // from the storage types the tree names, so locate every storage before reading any.
    let mut sizes: HashMap<String, usize> = HashMap::new();
    collect_storages(&tree, &mut |s| {
        sizes.insert(s.key.clone(), s.dtype.size_in_bytes());
    });
    let mut ranges: HashMap<String, (usize, usize)> = HashMap::new();
    for key in keys {
        let header = data
            .get(pos..pos + 8)
            .ok_or_else(|| Error::Format(format!("storage `{key}` is truncated")))?;
        let numel = u64::from_le_bytes(header.try_into().expect("8 bytes")) as usize;
        pos += 8;
        let es = *sizes
            .get(&key)
            .ok_or_else(|| Error::Format(format!("storage `{key}` is not used by any tensor")))?;
        let nbytes = numel
            .checked_mul(es)
            .filter(|&n| n <= data.len() - pos)
            .ok_or_else(|| Error::Format(format!("storage `{key}` is truncated")))?;
        ranges.insert(key, (pos, nbytes));
        pos += nbytes;
    }
    materialise(tree, |storage: &StorageRef| {
        let (start, len) = ranges.get(&storage.key).ok_or_else(|| {
            Error::Format(format!("storage `{}` is not in the file", storage.key))
        })?;
        Ok(data[*start..start + len].to_vec())
    })
}

fn collect_storages(o: &Obj, f: &mut impl FnMut(&StorageRef)) {
    match o {
        Obj::Tensor(t) => f(&t.storage),
        Obj::Storage(s) => f(s),
        Obj::List(v) | Obj::Tuple(v) | Obj::Set(v) => v.iter().for_each(|x| collect_storages(x, f)),
        Obj::Dict(d) => d.iter().for_each(|(k, v)| {
            collect_storages(k, f);
            collect_storages(v, f)
        }),
        Obj::Object { args, state, .. } => {
            args.iter().for_each(|x| collect_storages(x, f));
            if let Some(s) = state {
                collect_storages(s, f)
            }
        }
        _ => {}
    }
}

/// Turns the tree's tensor references into tensors, reading each storage once and dropping
/// it after its last tensor.
fn materialise(
    tree: Obj,
    mut read_storage: impl FnMut(&StorageRef) -> Result<Vec<u8>, Error>,
) -> Result<Value, Error> {
    let mut uses: HashMap<String, usize> = HashMap::new();
    collect_storages(&tree, &mut |s| *uses.entry(s.key.clone()).or_default() += 1);
    let mut cache: HashMap<String, Vec<u8>> = HashMap::new();
    let mut tensor = |t: &TensorRef| -> Result<Tensor, Error> {
        if !cache.contains_key(&t.storage.key) {
            let bytes = read_storage(&t.storage)?;
            cache.insert(t.storage.key.clone(), bytes);
        }
        let bytes = &cache[&t.storage.key];
        let out = build_tensor(t, bytes);
        let left = uses.get_mut(&t.storage.key).expect("counted");
        *left -= 1;
        if *left == 0 {
            cache.remove(&t.storage.key);
        }
        out
    };
    convert(tree, &mut tensor, 0)
}

fn convert(
    o: Obj,
    tensor: &mut impl FnMut(&TensorRef) -> Result<Tensor, Error>,
    depth: usize,
) -> Result<Value, Error> {
    if depth > MAX_DEPTH {
        return Err(Error::Format(format!(
            "object tree nested deeper than {MAX_DEPTH}"
        )));
    }
    let mut seq = |v: Vec<Obj>| -> Result<Vec<Value>, Error> {
        v.into_iter()
            .map(|x| convert(x, tensor, depth + 1))
            .collect()
    };
    Ok(match o {
        Obj::None => Value::None,
        Obj::Bool(b) => Value::Bool(b),
        Obj::Int(i) => Value::Int(i),
        Obj::Float(f) => Value::Float(f),
        Obj::Str(s) => Value::Str(s),
        Obj::Bytes(b) => Value::Bytes(b),
        Obj::List(v) => Value::List(seq(v)?),
        Obj::Tuple(v) => Value::Tuple(seq(v)?),
        Obj::Set(v) => Value::Set(seq(v)?),
        Obj::Dict(d) => Value::Dict(
            d.into_iter()
                .map(|(k, v)| {
                    Ok((
                        convert(k, tensor, depth + 1)?,
                        convert(v, tensor, depth + 1)?,
                    ))
                })
                .collect::<Result<_, Error>>()?,
        ),
        Obj::Tensor(t) => Value::Tensor(tensor(&t)?),
        Obj::Object { class, args, state } => Value::Object {
            class,
            args: seq(args)?,
            state: match state {
                Some(s) => Some(Box::new(convert(*s, tensor, depth + 1)?)),
                None => None,
            },
        },
        Obj::Global(g) => Value::Str(format!("{g:?}")),
        Obj::Storage(s) => {
            return Err(Error::Format(format!(
                "bare storage `{}` outside a tensor is not supported",
                s.key
            )))
        }
    })
}

/// Copies the (possibly strided, offset) window `t` out of `bytes` into a CPU tensor.
fn build_tensor(t: &TensorRef, bytes: &[u8]) -> Result<Tensor, Error> {
    let dtype = match t.storage.dtype {
        StorageDType::Supported(d) => d,
        StorageDType::Bool => DType::U8,
        StorageDType::Unsupported(name) => {
            return Err(Error::Format(format!(
                "tensors of type {name} are not supported"
            )))
        }
    };
    let es = dtype.size_in_bytes();
    let available = bytes.len() / es;
    let bad = || {
        Error::Format(format!(
            "tensor of shape {:?} (stride {:?}, offset {}) reaches outside its storage `{}` of {available} elements",
            t.shape, t.stride, t.offset, t.storage.key
        ))
    };
    // A tensor has no more elements than its storage: the file holds every one of them.
    // (Torch can save broadcast views, stride 0, larger than their storage; checkpoints do
    // not, and materialising one would allocate whatever its shape claims.)
    let numel = t
        .shape
        .iter()
        .try_fold(1usize, |n, &d| n.checked_mul(d))
        .filter(|&n| n <= available)
        .ok_or_else(|| {
            Error::Format(format!(
                "tensor of shape {:?} has more elements than its storage `{}` of {available}",
                t.shape, t.storage.key
            ))
        })?;
    if numel == 0 {
        crate::check_shape(&t.shape).map_err(Error::Format)?;
        return Ok(Tensor::zeros(t.shape.as_slice(), dtype, &Device::Cpu)?);
    }
    let last = t
        .shape
        .iter()
        .zip(&t.stride)
        .try_fold(t.offset, |acc, (&n, &s)| {
            acc.checked_add((n - 1).checked_mul(s)?)
        })
        .ok_or_else(bad)?;
    if last >= available {
        return Err(bad());
    }
    let contiguous = {
        let mut expect = 1;
        let mut ok = true;
        for (&n, &s) in t.shape.iter().zip(&t.stride).rev() {
            if n != 1 && s != expect {
                ok = false;
            }
            expect *= n;
        }
        ok
    };
    let data = if contiguous {
        bytes[t.offset * es..(t.offset + numel) * es].to_vec()
    } else {
        let mut out = Vec::with_capacity(numel * es);
        let mut index = vec![0usize; t.shape.len()];
        for _ in 0..numel {
            let elem = t.offset
                + index
                    .iter()
                    .zip(&t.stride)
                    .map(|(i, s)| i * s)
                    .sum::<usize>();
            out.extend_from_slice(&bytes[elem * es..(elem + 1) * es]);
            for d in (0..index.len()).rev() {
                index[d] += 1;
                if index[d] < t.shape[d] {
                    break;
                }
                index[d] = 0;
            }
        }
        out
    };
    Ok(Tensor::from_raw_buffer(
        &data,
        dtype,
        &t.shape,
        &Device::Cpu,
    )?)
}

/// Writes `tensors` as a torch zip checkpoint (a flat `dict`, keys sorted) that
/// `torch.load(path, weights_only=True)` accepts. The file appears only once complete.
pub fn save_torch_zip(path: &Path, tensors: &HashMap<String, Tensor>) -> Result<(), Error> {
    let mut names: Vec<&String> = tensors.keys().collect();
    names.sort();
    let mut pkl = Vec::new();
    let mut storages = Vec::with_capacity(names.len());
    pkl.extend_from_slice(b"\x80\x02}(");
    for (i, name) in names.iter().enumerate() {
        let t = &tensors[*name];
        let storage_type = match t.dtype() {
            DType::F32 => "FloatStorage",
            DType::F16 => "HalfStorage",
            DType::BF16 => "BFloat16Storage",
            DType::F64 => "DoubleStorage",
            DType::I64 => "LongStorage",
            DType::I32 => "IntStorage",
            DType::I16 => "ShortStorage",
            DType::U8 => "ByteStorage",
            other => {
                return Err(Error::Format(format!(
                    "`{name}`: torch has no storage for {other:?}"
                )))
            }
        };
        let dims = t.dims().to_vec();
        let mut strides = vec![1usize; dims.len()];
        for d in (0..dims.len().saturating_sub(1)).rev() {
            strides[d] = strides[d + 1] * dims[d + 1];
        }
        put_str(&mut pkl, name);
        pkl.extend_from_slice(b"ctorch._utils\n_rebuild_tensor_v2\n(");
        pkl.push(b'(');
        put_str(&mut pkl, "storage");
        pkl.extend_from_slice(format!("ctorch\n{storage_type}\n").as_bytes());
        put_str(&mut pkl, &i.to_string());
        put_str(&mut pkl, "cpu");
        put_int(&mut pkl, t.elem_count() as i64);
        pkl.extend_from_slice(b"tQ");
        put_int(&mut pkl, 0);
        pkl.push(b'(');
        dims.iter().for_each(|&d| put_int(&mut pkl, d as i64));
        pkl.push(b't');
        pkl.push(b'(');
        strides.iter().for_each(|&s| put_int(&mut pkl, s as i64));
        pkl.push(b't');
        pkl.push(0x89);
        pkl.extend_from_slice(b"ccollections\nOrderedDict\n)R");
        pkl.extend_from_slice(b"tR");
        storages.push(tensor_bytes(t)?);
    }
    pkl.extend_from_slice(b"u.");

    let dir = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let mut tmp = tempfile::NamedTempFile::new_in(dir)?;
    {
        let mut zip = zip::ZipWriter::new(&mut tmp);
        let opts = zip::write::SimpleFileOptions::default()
            .compression_method(zip::CompressionMethod::Stored)
            .large_file(true)
            .with_alignment(64);
        zip.start_file("archive/data.pkl", opts)?;
        zip.write_all(&pkl)?;
        zip.start_file("archive/byteorder", opts)?;
        zip.write_all(b"little")?;
        for (i, data) in storages.iter().enumerate() {
            zip.start_file(format!("archive/data/{i}"), opts)?;
            zip.write_all(data)?;
        }
        zip.start_file("archive/version", opts)?;
        zip.write_all(b"3\n")?;
        zip.finish()?;
    }
    tmp.as_file().sync_all()?;
    tmp.persist(path).map_err(|e| Error::Io(e.error))?;
    Ok(())
}

fn put_str(out: &mut Vec<u8>, s: &str) {
    out.push(b'X');
    out.extend_from_slice(&(s.len() as u32).to_le_bytes());
    out.extend_from_slice(s.as_bytes());
}

fn put_int(out: &mut Vec<u8>, v: i64) {
    if let Ok(small) = i32::try_from(v) {
        out.push(b'J');
        out.extend_from_slice(&small.to_le_bytes());
    } else {
        out.extend_from_slice(&[0x8a, 8]);
        out.extend_from_slice(&v.to_le_bytes());
    }
}

/// The tensor's elements, row-major, little-endian.
fn tensor_bytes(t: &Tensor) -> Result<Vec<u8>, Error> {
    let flat = t.to_device(&Device::Cpu)?.flatten_all()?;
    macro_rules! le {
        ($ty:ty) => {
            flat.to_vec1::<$ty>()?
                .iter()
                .flat_map(|x| x.to_le_bytes())
                .collect()
        };
    }
    Ok(match t.dtype() {
        DType::F32 => le!(f32),
        DType::F16 => le!(half::f16),
        DType::BF16 => le!(half::bf16),
        DType::F64 => le!(f64),
        DType::I64 => le!(i64),
        DType::I32 => le!(i32),
        DType::I16 => le!(i16),
        DType::U8 => flat.to_vec1::<u8>()?,
        other => return Err(Error::Format(format!("cannot serialise {other:?}"))),
    })
}
