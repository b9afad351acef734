//! The tensor-only unpickler (`crates/weights/src/pickle.rs`) on any bytes, and the legacy
//! (pre-1.6) torch container around it when the bytes start with its magic number.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = sdkube_weights::pickle::unpickle(data);
    if data.starts_with(b"\x80\x02\x8a\x0a") {
        let _ = sdkube_weights::load_tree_from_bytes(data);
    }
});
