//! A1111's PNG Info: the `parameters` text chunk of a PNG
//! (`crates/pipeline/src/image_io.rs`) and the infotext parser of `/sdapi/v1/png-info`
//! (`crates/server/src/a1111/png_info.rs`). Inputs that are not PNGs go to the parser as text.
#![no_main]

use libfuzzer_sys::fuzz_target;
use sdkube_server::parse_infotext;

fuzz_target!(|data: &[u8]| {
    if data.starts_with(b"\x89PNG\r\n\x1a\n") {
        if let Ok(Some(text)) = sdkube_pipeline::image_io::read_png_parameters(data) {
            let _ = parse_infotext(&text);
        }
    } else {
        let _ = parse_infotext(&String::from_utf8_lossy(data));
    }
});
