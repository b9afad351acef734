//! `--vram low` with a refiner: one UNet on the device at a time (the model's leaves before the
//! refiner's is built). On the CPU device the networks live on the heap, so the heap's peak
//! during a run shows how many UNets were built at once. Its own test binary: the counter is
//! process-wide, and no other test may allocate beside it.

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicUsize, Ordering};

use candle_core::{DType, Device};
use sdkube_models::{load, LoadOptions};
use sdkube_pipeline::sampler::Flow;
use sdkube_pipeline::{Engine, Refiner, Request, VramMode};

static LIVE: AtomicUsize = AtomicUsize::new(0);
static PEAK: AtomicUsize = AtomicUsize::new(0);

/// The system allocator, counting the bytes alive and their peak.
struct Counting;

fn grew(by: usize) {
    let now = LIVE.fetch_add(by, Ordering::SeqCst) + by;
    PEAK.fetch_max(now, Ordering::SeqCst);
}

// SAFETY: every call is forwarded unchanged to the system allocator.
#[allow(unsafe_code)] // a global allocator can only be written as unsafe code
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        grew(layout.size());
        unsafe { System.alloc(layout) }
    }
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        grew(layout.size());
        unsafe { System.alloc_zeroed(layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        grew(new_size);
        LIVE.fetch_sub(layout.size(), Ordering::SeqCst);
        unsafe { System.realloc(ptr, layout, new_size) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        LIVE.fetch_sub(layout.size(), Ordering::SeqCst);
        unsafe { System.dealloc(ptr, layout) }
    }
}

#[global_allocator]
static ALLOC: Counting = Counting;

/// Bytes alive after the run's first step (its UNet built) and the peak from there to its end.
fn sampling_peak(e: &mut Engine, req: &Request) -> (usize, usize) {
    let mut after_first = 0;
    e.generate(req, &mut |p| {
        if p.step == 0 {
            after_first = LIVE.load(Ordering::SeqCst);
            PEAK.store(after_first, Ordering::SeqCst);
        }
        Flow::Continue
    })
    .unwrap();
    (after_first, PEAK.load(Ordering::SeqCst))
}

fn engine(name: &str) -> Engine {
    let w = load(
        &sdkube_testkit::fixtures().join("sd").join(name),
        &LoadOptions::default(),
    )
    .unwrap();
    Engine::new(w, name, Device::Cpu, DType::F32, VramMode::Low).unwrap()
}

#[test]
fn with_vram_low_the_refiner_unet_replaces_the_models() {
    let request = |switch_at: Option<f64>| Request {
        prompt: "a photo of an astronaut riding a horse".into(),
        sampler: "Euler".into(),
        steps: 4,
        width: 64,
        height: 64,
        refiner: switch_at.map(|switch_at| Refiner {
            checkpoint: "sdxl-refiner".into(),
            switch_at,
        }),
        ..Default::default()
    };
    let mut base = engine("sdxl");
    let refiner = engine("sdxl-refiner");
    let refiner_unet = refiner.weights().unet.size_in(DType::F32);
    let base_unet = base.weights().unet.size_in(DType::F32);
    base.set_refiner(Some(refiner)).unwrap();
    let req = request(Some(0.5));
    // Measured after a first run (one-time allocations out of the way).
    sampling_peak(&mut base, &req);
    let (after_first, peak) = sampling_peak(&mut base, &req);
    let added = peak.saturating_sub(after_first);
    eprintln!(
        "after the first step {after_first} B, peak {peak} B (+{added} B); \
         UNets in f32: model {base_unet} B, refiner {refiner_unet} B"
    );
    // The refiner's UNet took the place of the model's: the peak grew by the difference of
    // their sizes and a step's activations, less than the whole UNet it would grow by if the
    // model's were still there.
    assert!(
        added < refiner_unet,
        "the peak grew by {added} B: both UNets were on the device at once"
    );
}
