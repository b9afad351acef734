//! Textual-inversion embedding files (any container) read as `sdkube embeddings` and the
//! server read them: the container, then the layouts A1111, diffusers and SDXL use.
#![no_main]

use std::path::Path;

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let path = Path::new("fuzz.safetensors");
    if let Ok(v) = sdkube_pipeline::embeddings::read_embedding_bytes(path, data) {
        let dims = v.first.dims();
        assert!(dims.len() == 2 && dims[0] > 0 && dims[1] > 0, "{dims:?}");
        if let Some(second) = &v.second {
            assert_eq!(second.dims()[0], dims[0]);
        }
    }
});
