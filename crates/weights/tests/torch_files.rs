//! Real `torch.save` outputs (written by `make_fixtures.py`, next to this file) read back
//! and compared with the same tensors saved as safetensors by the same script.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use sdkube_weights::{detect, load, load_tree, save_torch_zip, Error, Format, Value};

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(name)
}

fn expected() -> HashMap<String, Tensor> {
    candle_core::safetensors::load(fixture("expected.safetensors"), &Device::Cpu).unwrap()
}

fn assert_same(got: &Tensor, want: &Tensor, key: &str) {
    assert_eq!(got.dims(), want.dims(), "{key}: shape");
    assert_eq!(got.dtype(), want.dtype(), "{key}: dtype");
    let g: Vec<f64> = got
        .to_dtype(DType::F64)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap();
    let w: Vec<f64> = want
        .to_dtype(DType::F64)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap();
    assert_eq!(g, w, "{key}: values");
}

fn check_nested(path: &Path) {
    let tree = load_tree(path).unwrap();
    assert_eq!(tree.get("global_step").and_then(Value::as_int), Some(1234));
    let nested = tree.get("nested").unwrap();
    assert_eq!(nested.get("name").and_then(Value::as_str), Some("abc"));
    assert_eq!(nested.get("count").and_then(Value::as_int), Some(3));
    let got = tree.flatten();
    let want = expected();
    let mut keys: Vec<_> = got.keys().cloned().collect();
    keys.sort();
    let mut want_keys: Vec<_> = want.keys().cloned().collect();
    want_keys.sort();
    assert_eq!(keys, want_keys);
    for (k, w) in &want {
        assert_same(&got[k], w, k);
    }
    // The dtypes the file stores are kept.
    assert_eq!(got["state_dict.conv.bias"].dtype(), DType::F16);
    assert_eq!(got["state_dict.norm.weight"].dtype(), DType::BF16);
    assert_eq!(got["state_dict.ids"].dtype(), DType::I64);
    assert_eq!(got["transposed"].dims(), &[6, 4]);
}

#[test]
fn zip_checkpoint_with_views_and_mixed_dtypes() {
    assert_eq!(detect(&fixture("nested_zip.pt")).unwrap(), Format::TorchZip);
    check_nested(&fixture("nested_zip.pt"));
}

#[test]
fn legacy_checkpoint_with_views_and_mixed_dtypes() {
    assert_eq!(
        detect(&fixture("nested_legacy.pt")).unwrap(),
        Format::TorchLegacy
    );
    check_nested(&fixture("nested_legacy.pt"));
}

#[test]
fn load_converts_floats_and_keeps_integers() {
    let m = load(&fixture("nested_zip.pt"), &Device::Cpu, DType::F16).unwrap();
    assert_eq!(m["state_dict.conv.weight"].dtype(), DType::F16);
    assert_eq!(m["state_dict.ids"].dtype(), DType::I64);
    let want = expected()["state_dict.conv.weight"].clone();
    let diff = (m["state_dict.conv.weight"].to_dtype(DType::F32).unwrap() - want)
        .unwrap()
        .abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap();
    assert!(diff < 2e-3, "f16 rounding only, got {diff}");
}

#[test]
fn malicious_pickles_are_refused_by_name_and_never_run() {
    let marker = Path::new("/tmp/sdkube-pwned");
    let _ = std::fs::remove_file(marker);
    let err = load(&fixture("malicious_system.pt"), &Device::Cpu, DType::F32).unwrap_err();
    let msg = err.to_string();
    assert!(msg.contains("posix.system"), "{msg}");
    assert!(msg.contains("malicious_system.pt"), "{msg}");
    assert!(!marker.exists());
    let err = load_tree(&fixture("malicious_eval_legacy.pt")).unwrap_err();
    let Error::File { error, .. } = err else {
        panic!("no file context")
    };
    assert!(
        matches!(&*error, Error::ForbiddenGlobal { module, name } if module == "__builtin__" && name == "eval"),
        "{error}"
    );
}

#[test]
fn a1111_embedding_tree_is_readable() {
    let tree = load_tree(&fixture("embedding_a1111.pt")).unwrap();
    assert_eq!(tree.get("name").and_then(Value::as_str), Some("tiny-emb"));
    assert_eq!(tree.get("step").and_then(Value::as_int), Some(100));
    let param = tree
        .get("string_to_param")
        .and_then(|d| d.get("*"))
        .unwrap();
    let want =
        candle_core::safetensors::load(fixture("embedding_expected.safetensors"), &Device::Cpu)
            .unwrap();
    assert_same(
        param.as_tensor().unwrap(),
        &want["string_to_param.*"],
        "param",
    );
    let flat = tree.flatten();
    assert_same(
        &flat["string_to_param.*"],
        &want["string_to_param.*"],
        "flat",
    );
}

#[test]
fn save_torch_zip_round_trips() {
    let dir = tempfile::tempdir().unwrap();
    let dev = Device::Cpu;
    let mut m = HashMap::new();
    m.insert(
        "a.weight".to_string(),
        Tensor::arange(0f32, 24., &dev)
            .unwrap()
            .reshape((2, 3, 4))
            .unwrap(),
    );
    m.insert(
        "b".to_string(),
        Tensor::new(&[1.5f32, -2.25], &dev)
            .unwrap()
            .to_dtype(DType::F16)
            .unwrap(),
    );
    m.insert(
        "c".to_string(),
        Tensor::new(&[3.0f32], &dev)
            .unwrap()
            .to_dtype(DType::BF16)
            .unwrap(),
    );
    m.insert("steps".to_string(), Tensor::new(&[7i64, -9], &dev).unwrap());
    m.insert("scalar".to_string(), Tensor::new(4.5f32, &dev).unwrap());
    let path = dir.path().join("out.pth");
    save_torch_zip(&path, &m).unwrap();
    assert_eq!(detect(&path).unwrap(), Format::TorchZip);
    // `make_fixtures.py --check FILE` confirms torch.load(weights_only=True) accepts it.
    if let Some(copy) = std::env::var_os("SDKUBE_WEIGHTS_SAVED_COPY") {
        std::fs::copy(&path, copy).unwrap();
    }
    let back = load_tree(&path).unwrap().flatten();
    assert_eq!(back.len(), m.len());
    for (k, t) in &m {
        assert_same(&back[k], t, k);
    }
}

#[test]
fn content_not_extension_decides_the_format() {
    let dir = tempfile::tempdir().unwrap();
    let disguised = dir.path().join("model.ckpt");
    std::fs::copy(fixture("expected.safetensors"), &disguised).unwrap();
    assert_eq!(detect(&disguised).unwrap(), Format::Safetensors);
    let m = load(&disguised, &Device::Cpu, DType::F32).unwrap();
    assert_same(&m["base"], &expected()["base"], "base");
}

#[test]
fn truncated_and_foreign_files_are_errors() {
    let dir = tempfile::tempdir().unwrap();
    for name in ["nested_zip.pt", "nested_legacy.pt", "expected.safetensors"] {
        let bytes = std::fs::read(fixture(name)).unwrap();
        for cut in [bytes.len() / 3, bytes.len() - 7] {
            let p = dir.path().join(format!("cut-{cut}-{name}"));
            std::fs::write(&p, &bytes[..cut]).unwrap();
            let err = load(&p, &Device::Cpu, DType::F32);
            assert!(err.is_err(), "{name} cut at {cut} was accepted");
        }
    }
    let text = dir.path().join("notes.pth");
    std::fs::write(&text, "just some text, not weights").unwrap();
    let err = load(&text, &Device::Cpu, DType::F32).unwrap_err();
    assert!(err.to_string().contains("not a weight file"), "{err}");
    let empty = dir.path().join("empty.safetensors");
    std::fs::write(&empty, b"").unwrap();
    assert!(load(&empty, &Device::Cpu, DType::F32).is_err());
}
