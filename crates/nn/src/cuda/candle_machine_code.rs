//! candle's own kernels as machine code. candle-core loads each of its kernel modules from PTX
//! text (`candle_kernels::BINARY`, …), which the driver compiles for the GPU at first use: 17.8 s
//! for the ten modules on an H100 (`benches/gpu_jit_modules.py`), paid by every process whose
//! CUDA JIT cache is empty, such as a pod on a new node. Loading them at once in ten threads took
//! longer (22.6 s): the driver's compiler does not run in parallel. The same modules as machine
//! code load in 4 ms.
//!
//! `build.rs` compiles candle-kernels' sources into fatbins for sm_80 to sm_120. candle's loader
//! has no seam to hand it those (it takes PTX text, and its module table is private), so the
//! substitution sits on the one driver call it makes, `cuModuleLoadData`: cudarc links the
//! driver dynamically, and this definition in the executable comes before the driver's. It
//! forwards every image to the driver's own; an image that is one of candle's PTX texts goes as
//! the fatbin built from the same source, and where the driver refuses that fatbin (a GPU it has
//! no machine code for) candle's PTX goes after all.
//! `SDKUBE_CANDLE_KERNELS=ptx` turns the substitution off, for A/B runs.
#![allow(unsafe_code)] // a C entry point of the driver's API, and the pointers it is given

use std::ffi::{c_void, CStr};
use std::sync::OnceLock;

use candle_core::cuda_backend::cudarc::driver::sys::{CUmodule, CUresult};

use crate::switch::Switch;

static MACHINE_CODE: Switch = Switch::new("SDKUBE_CANDLE_KERNELS", "machine-code", "ptx", true);

/// A fatbin, aligned as the driver reads it (`include_bytes!` promises byte alignment only).
#[repr(C, align(8))]
struct Fatbin<B: ?Sized>(B);

macro_rules! modules {
    ($($name:literal: $module:ident),* $(,)?) => {
        [$(($name, &candle_kernels::$module, &Fatbin(*include_bytes!(
            concat!(env!("OUT_DIR"), "/candle/", $name, ".fatbin")
        )) as &Fatbin<[u8]>)),*]
    };
}

/// Each candle module `build.rs` compiled: its name, candle's module (its PTX) and the fatbin.
/// A module whose sources the build did not find has an empty fatbin and is not substituted.
static MODULES: [(&str, &candle_kernels::Module, &Fatbin<[u8]>); 10] = modules!(
    "affine": AFFINE, "binary": BINARY, "cast": CAST, "conv": CONV, "fill": FILL,
    "indexing": INDEXING, "reduce": REDUCE, "sort": SORT, "ternary": TERNARY, "unary": UNARY,
);

/// The machine code for the candle module whose PTX text is `ptx`, and the module's name.
fn machine_code_for(ptx: &[u8]) -> Option<(&'static str, &'static Fatbin<[u8]>)> {
    MODULES
        .iter()
        .find(|(_, module, fatbin)| !fatbin.0.is_empty() && module.ptx().as_bytes() == ptx)
        .map(|&(name, _, fatbin)| (name, fatbin))
}

type LoadData = unsafe extern "C" fn(*mut CUmodule, *const c_void) -> CUresult;

/// The driver's own `cuModuleLoadData`: the next definition after this executable's.
fn driver_load_data() -> Option<LoadData> {
    static DRIVER: OnceLock<Option<LoadData>> = OnceLock::new();
    *DRIVER.get_or_init(|| {
        // SAFETY: dlsym with a NUL-terminated name; a non-null result is the driver's function
        // of this exact signature (cuda.h).
        let symbol = unsafe { libc::dlsym(libc::RTLD_NEXT, c"cuModuleLoadData".as_ptr()) };
        (!symbol.is_null()).then(|| unsafe { std::mem::transmute::<*mut c_void, LoadData>(symbol) })
    })
}

/// The PTX text at `image`, if it is one. PTX starts with a comment or a directive; machine
/// code starts with a binary magic number (a fatbin's 0x50, an ELF cubin's 0x7f) and is not
/// read further.
///
/// # Safety
/// `image` points at a module image, as `cuModuleLoadData` requires.
unsafe fn ptx_text<'a>(image: *const c_void) -> Option<&'a [u8]> {
    // SAFETY: a module image has at least one byte; PTX text is NUL-terminated.
    let first = unsafe { *image.cast::<u8>() };
    (first == b'/' || first == b'.').then(|| unsafe { CStr::from_ptr(image.cast()) }.to_bytes())
}

/// `cuModuleLoadData` for everything this process loads (cudarc's calls bind here): candle's
/// PTX modules as machine code, all else unchanged.
///
/// # Safety
/// As the driver's: `module` is writable, `image` a module image.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn cuModuleLoadData(module: *mut CUmodule, image: *const c_void) -> CUresult {
    let Some(driver) = driver_load_data() else {
        return CUresult::CUDA_ERROR_NOT_FOUND;
    };
    if !image.is_null() && MACHINE_CODE.is_on() {
        // SAFETY: the caller's contract.
        if let Some((name, fatbin)) = unsafe { ptx_text(image) }.and_then(machine_code_for) {
            // SAFETY: a static fatbin, aligned; the driver copies what it keeps.
            let result = unsafe { driver(module, fatbin.0.as_ptr().cast()) };
            if result == CUresult::CUDA_SUCCESS {
                tracing::debug!(module = name, "candle's kernels loaded as machine code");
                return result;
            }
            tracing::info!(
                module = name,
                ?result,
                "no machine code of candle's kernels for this GPU: the driver compiles their PTX"
            );
        }
    }
    // SAFETY: the caller's contract, passed on.
    unsafe { driver(module, image) }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A fatbin's magic number (0xBA55ED50, little-endian).
    const FATBIN_MAGIC: [u8; 4] = [0x50, 0xed, 0x55, 0xba];

    #[test]
    fn each_candle_module_s_ptx_finds_machine_code_built_from_its_source() {
        for (name, module, fatbin) in &MODULES {
            assert!(
                fatbin.0.starts_with(&FATBIN_MAGIC),
                "{name}: no fatbin built"
            );
            let found = machine_code_for(module.ptx().as_bytes()).map(|(name, _)| name);
            assert_eq!(found, Some(*name));
        }
        let other = b"//\n.version 9.0\n.target sm_90\n.address_size 64\n";
        assert!(machine_code_for(other).is_none());
    }

    #[test]
    fn every_module_candle_loads_is_covered_but_the_quantized_one() {
        let covered: Vec<usize> = MODULES
            .iter()
            .map(|(_, module, _)| module.index())
            .collect();
        for (index, id) in candle_kernels::ALL_IDS.into_iter().enumerate() {
            let expected = id != candle_kernels::Id::Quantized;
            assert_eq!(covered.contains(&index), expected, "{id:?}");
        }
    }

    #[test]
    fn ptx_text_is_told_apart_from_machine_code() {
        let ptx = std::ffi::CString::new(candle_kernels::AFFINE.ptx()).unwrap();
        // SAFETY: both point at module images.
        let read = unsafe { ptx_text(ptx.as_ptr().cast()) };
        assert_eq!(read, Some(candle_kernels::AFFINE.ptx().as_bytes()));
        assert_eq!(unsafe { ptx_text(MODULES[0].2 .0.as_ptr().cast()) }, None);
    }

    #[test]
    fn the_process_s_module_loads_come_here_and_go_on_to_the_driver() {
        // SAFETY: dlsym with a NUL-terminated name.
        let global = unsafe { libc::dlsym(libc::RTLD_DEFAULT, c"cuModuleLoadData".as_ptr()) };
        let ours = cuModuleLoadData as *const () as usize;
        assert_eq!(global as usize, ours);
        let driver = driver_load_data().expect("the driver's (or its stub's) cuModuleLoadData");
        assert_ne!(driver as *const () as usize, ours);
    }
}
