//! Safetensors read from a file (each tensor straight into its own buffer) give what the same
//! bytes give from memory, for every dtype candle keeps; and crafted headers are refused with an
//! error naming the file and the problem.

use std::collections::HashMap;
use std::path::Path;

use candle_core::{DType, Device, Tensor};
use sdkube_weights::{load_tree, load_tree_from_bytes, safetensors_index, Value};

fn tensors(tree: Value) -> HashMap<String, Tensor> {
    tree.flatten().into_iter().collect()
}

fn values(t: &Tensor) -> Vec<f64> {
    t.flatten_all()
        .unwrap()
        .to_dtype(DType::F64)
        .unwrap()
        .to_vec1()
        .unwrap()
}

/// A safetensors file of raw `(name, dtype, shape, bytes)` entries, in that order.
fn raw_file(entries: &[(&str, &str, &[usize], Vec<u8>)]) -> Vec<u8> {
    let mut offset = 0;
    let fields: Vec<String> = entries
        .iter()
        .map(|(name, dtype, shape, bytes)| {
            let field = format!(
                r#""{name}":{{"dtype":"{dtype}","shape":{shape:?},"data_offsets":[{offset},{}]}}"#,
                offset + bytes.len()
            );
            offset += bytes.len();
            field
        })
        .collect();
    let header = format!(
        r#"{{"__metadata__":{{"format":"pt"}},{}}}"#,
        fields.join(",")
    );
    let mut out = (header.len() as u64).to_le_bytes().to_vec();
    out.extend_from_slice(header.as_bytes());
    for (_, _, _, bytes) in entries {
        out.extend_from_slice(bytes);
    }
    out
}

#[test]
fn a_file_reads_as_its_bytes_do_in_every_dtype() {
    let dev = Device::Cpu;
    let base = Tensor::arange(0f32, 24., &dev)
        .unwrap()
        .affine(0.37, -3.)
        .unwrap();
    let shaped = base.reshape((2, 3, 4)).unwrap();
    let mut saved: HashMap<String, Tensor> = [
        DType::F16,
        DType::BF16,
        DType::F32,
        DType::F64,
        DType::U8,
        DType::U32,
        DType::I64,
    ]
    .into_iter()
    .map(|dt| {
        let t = if dt.is_float() {
            shaped.to_dtype(dt).unwrap()
        } else {
            shaped.abs().unwrap().to_dtype(dt).unwrap()
        };
        (format!("t.{dt:?}"), t)
    })
    .collect();
    saved.insert("scalar".into(), Tensor::new(2.5f32, &dev).unwrap());
    saved.insert(
        "empty".into(),
        Tensor::zeros((0, 768), DType::F16, &dev).unwrap(),
    );
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("m.safetensors");
    candle_core::safetensors::save(&saved, &path).unwrap();
    // A dtype candle converts on reading (U16 becomes U32), beside one it keeps.
    let u16s: Vec<u8> = (0u16..6).flat_map(|v| (v * 1000).to_le_bytes()).collect();
    let f32s: Vec<u8> = [1.5f32, -2.0]
        .iter()
        .flat_map(|v| v.to_le_bytes())
        .collect();
    let converted = dir.path().join("u16.safetensors");
    std::fs::write(
        &converted,
        raw_file(&[("a", "F32", &[2], f32s), ("b", "U16", &[2, 3], u16s)]),
    )
    .unwrap();

    for path in [&path, &converted] {
        let from_file = tensors(load_tree(path).unwrap());
        let from_bytes = tensors(load_tree_from_bytes(&std::fs::read(path).unwrap()).unwrap());
        assert_eq!(from_file.len(), from_bytes.len());
        for (name, want) in &from_bytes {
            let got = &from_file[name];
            assert_eq!(got.dtype(), want.dtype(), "{name}");
            assert_eq!(got.dims(), want.dims(), "{name}");
            assert_eq!(values(got), values(want), "{name}");
        }
    }
    let read = tensors(load_tree(&path).unwrap());
    for (name, t) in &saved {
        assert_eq!(values(&read[name]), values(t), "{name} as saved");
    }
    let b = &tensors(load_tree(&converted).unwrap())["b"];
    assert_eq!(
        (b.dtype(), values(b)),
        (DType::U32, vec![0., 1000., 2000., 3000., 4000., 5000.])
    );
}

#[test]
fn the_index_places_every_tensor_at_its_bytes() {
    let dev = Device::Cpu;
    let saved: HashMap<String, Tensor> = [
        (
            "a.weight",
            Tensor::arange(0f32, 12., &dev)
                .unwrap()
                .reshape((3, 4))
                .unwrap(),
        ),
        ("b", Tensor::arange(0u32, 5, &dev).unwrap()),
        ("c", Tensor::ones((2, 2, 3), DType::F16, &dev).unwrap()),
        ("empty", Tensor::zeros((0, 8), DType::BF16, &dev).unwrap()),
    ]
    .into_iter()
    .map(|(k, t)| (k.to_string(), t))
    .collect();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("m.safetensors");
    candle_core::safetensors::save(&saved, &path).unwrap();
    let file = std::fs::read(&path).unwrap();
    let index = safetensors_index(&path)
        .unwrap()
        .expect("every dtype is kept as stored");
    let names: Vec<&str> = index.iter().map(|s| s.name.as_str()).collect();
    assert_eq!(names, ["a.weight", "b", "c", "empty"], "keys sorted");
    for stored in &index {
        let want = &saved[&stored.name];
        assert_eq!(
            (stored.dtype, stored.shape.as_slice()),
            (want.dtype(), want.dims())
        );
        let len = want.elem_count() * want.dtype().size_in_bytes();
        let at = stored.offset as usize;
        let got = Tensor::from_raw_buffer(&file[at..at + len], stored.dtype, &stored.shape, &dev)
            .unwrap();
        assert_eq!(values(&got), values(want), "{}", stored.name);
    }

    // An element type candle converts on reading: no index, the caller reads the file.
    let converted = dir.path().join("u16.safetensors");
    std::fs::write(
        &converted,
        raw_file(&[("b", "U16", &[2], vec![1, 0, 2, 0])]),
    )
    .unwrap();
    assert_eq!(safetensors_index(&converted).unwrap(), None);
    // Not safetensors: no index either.
    let pickle = dir.path().join("m.ckpt");
    std::fs::write(&pickle, b"PK\x03\x04 not really a zip").unwrap();
    assert_eq!(safetensors_index(&pickle).unwrap(), None);
    // A header the reader refuses is refused here too, naming the file.
    let short = raw_file(&[("t", "F32", &[4], vec![0; 16])]);
    let cut = dir.path().join("short.safetensors");
    std::fs::write(&cut, &short[..short.len() - 4]).unwrap();
    let err = safetensors_index(&cut).unwrap_err().to_string();
    assert!(
        err.contains("short.safetensors") && err.contains("the file has 12"),
        "{err}"
    );
}

fn refused(dir: &Path, name: &str, data: Vec<u8>) -> String {
    let path = dir.join(name);
    std::fs::write(&path, data).unwrap();
    let err = load_tree(&path).expect_err("a crafted file must be refused");
    let err = err.to_string();
    assert!(err.contains(name), "the error names the file: {err}");
    err
}

#[test]
fn crafted_headers_are_refused_when_read_from_a_file() {
    let dir = tempfile::tempdir().unwrap();
    let four = vec![0u8; 16];
    let good = raw_file(&[("t", "F32", &[4], four.clone())]);

    // Truncated: the header promises more data than the file holds.
    let err = refused(
        dir.path(),
        "short.safetensors",
        good[..good.len() - 4].to_vec(),
    );
    assert!(err.contains("take 16 bytes, the file has 12"), "{err}");
    // Trailing bytes after the last tensor.
    let mut long = good.clone();
    long.extend_from_slice(&[0; 8]);
    let err = refused(dir.path(), "long.safetensors", long);
    assert!(err.contains("take 16 bytes, the file has 24"), "{err}");
    // A tensor whose bytes do not match its shape.
    let err = refused(
        dir.path(),
        "shape.safetensors",
        raw_file(&[("t", "F32", &[5], four.clone())]),
    );
    assert!(err.contains("safetensors header"), "{err}");
    // Offsets that overlap.
    let mut data = raw_file(&[
        ("a", "F32", &[2], vec![0; 8]),
        ("b", "F32", &[2], vec![0; 8]),
    ]);
    let header_end = 8 + u64::from_le_bytes(data[..8].try_into().unwrap()) as usize;
    let header = String::from_utf8(data[8..header_end].to_vec()).unwrap();
    let shifted = header.replace("[8,16]", "[4,12]");
    data.splice(8..header_end, shifted.bytes());
    let err = refused(dir.path(), "overlap.safetensors", data);
    assert!(err.contains("safetensors header"), "{err}");
    // A header length past the end of the file, or past any sane header.
    let mut data = good.clone();
    data[..8].copy_from_slice(&(1u64 << 40).to_le_bytes());
    data[8] = b'{';
    let path = dir.path().join("huge.safetensors");
    std::fs::write(&path, &data).unwrap();
    assert!(load_tree(&path).is_err());
    // Empty tensors whose other dimensions multiply past usize.
    let err = refused(
        dir.path(),
        "overflow.safetensors",
        raw_file(&[("t", "F32", &[0, 1 << 40, 1 << 30], vec![])]),
    );
    assert!(err.contains("larger than any tensor can be"), "{err}");
}
