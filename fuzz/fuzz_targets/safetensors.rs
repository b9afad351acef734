//! Safetensors files as the weights crate reads them (header, offsets, dtypes, shapes), and
//! the flattened tensor map every model loader starts from.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if data.get(8) == Some(&b'{') {
        if let Ok(tree) = sdkube_weights::load_tree_from_bytes(data) {
            let _ = tree.flatten();
        }
    }
});
