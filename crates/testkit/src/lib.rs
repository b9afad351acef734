//! Helpers the workspace's tests share, so each comparison is written once: where the
//! committed fixtures are ([`fixtures`]), tensor comparison ([`max_abs_diff`]), the largest
//! allocation of a reader ([`largest_allocation`]).

use std::path::{Path, PathBuf};

use candle_core::{DType, Tensor};

/// The repository's root: the workspace folder, two levels above this crate.
pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// The repository's `fixtures/`, where the generator scripts of `scripts/` write the reference
/// models and outputs the tests compare against (`fixtures().join("sd/sd1")`).
pub fn fixtures() -> PathBuf {
    repo_root().join("fixtures")
}

/// The largest absolute element-wise difference of two tensors of the same shape, in f32
/// (either may be in any float dtype).
pub fn max_abs_diff(a: &Tensor, b: &Tensor) -> f32 {
    assert_eq!(a.dims(), b.dims(), "shape mismatch");
    let (a, b) = (
        a.to_dtype(DType::F32).unwrap(),
        b.to_dtype(DType::F32).unwrap(),
    );
    (a - b)
        .unwrap()
        .abs()
        .unwrap()
        .flatten_all()
        .unwrap()
        .max(0)
        .unwrap()
        .to_scalar::<f32>()
        .unwrap()
}

/// A global allocator for tests of readers of untrusted files: it records, per thread, the
/// largest single allocation, so a test can check that a size a crafted header claims was
/// never allocated ([`largest_allocation`]). Declare it once in the test binary:
/// `#[global_allocator] static ALLOC: LargestAllocation = LargestAllocation;`
pub struct LargestAllocation;

thread_local! {
    // Const-initialised and without a destructor: safe to touch from inside the allocator.
    static LARGEST: std::cell::Cell<usize> = const { std::cell::Cell::new(0) };
}

fn note_allocation(size: usize) {
    let _ = LARGEST.try_with(|l| l.set(l.get().max(size)));
}

// SAFETY: every call is forwarded unchanged to the system allocator.
#[allow(unsafe_code)] // a global allocator can only be written as unsafe code
unsafe impl std::alloc::GlobalAlloc for LargestAllocation {
    unsafe fn alloc(&self, layout: std::alloc::Layout) -> *mut u8 {
        note_allocation(layout.size());
        unsafe { std::alloc::System.alloc(layout) }
    }
    unsafe fn alloc_zeroed(&self, layout: std::alloc::Layout) -> *mut u8 {
        note_allocation(layout.size());
        unsafe { std::alloc::System.alloc_zeroed(layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: std::alloc::Layout, new_size: usize) -> *mut u8 {
        note_allocation(new_size);
        unsafe { std::alloc::System.realloc(ptr, layout, new_size) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: std::alloc::Layout) {
        unsafe { std::alloc::System.dealloc(ptr, layout) }
    }
}

/// Runs `f` and returns its result with the largest single allocation it made on this
/// thread, in bytes. Panics unless [`LargestAllocation`] is the global allocator.
pub fn largest_allocation<T>(f: impl FnOnce() -> T) -> (T, usize) {
    LARGEST.with(|l| l.set(0));
    drop(std::hint::black_box(Vec::<u8>::with_capacity(4096)));
    assert!(
        LARGEST.with(|l| l.get()) >= 4096,
        "declare `#[global_allocator] static ALLOC: LargestAllocation = LargestAllocation;`"
    );
    LARGEST.with(|l| l.set(0));
    let out = f();
    (out, LARGEST.with(|l| l.get()))
}
