//! ncnn RealESRGAN models (`crates/restore/src/ncnn.rs`): the `.param` text and its `.bin`.
//! The input is `.param` text, a NUL byte, then the `.bin` bytes.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let (param, bin) = match data.iter().position(|&b| b == 0) {
        Some(i) => (&data[..i], &data[i + 1..]),
        None => (data, &[][..]),
    };
    let param = String::from_utf8_lossy(param);
    let _ = sdkube_restore::ncnn::import(&param, bin, None);
});
