//! The torch zip checkpoint reader (`crates/weights/src/torch.rs`): the archive, `data.pkl`
//! and the tensors it cuts out of the storages.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if data.starts_with(b"PK\x03\x04") {
        let _ = sdkube_weights::load_tree_from_bytes(data);
    }
});
