//! Where a network's time goes, by kind of operation (`sdkube bench --profile`): each timed
//! operation records a start and an end event on the GPU's stream (CUDA events, so the GPU
//! is never stopped mid-network) or the wall clock on the CPU. Off unless [`enable`]d; then
//! every call costs two event records.
use std::cell::RefCell;
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use candle_core::{Device, Result};

static ON: AtomicBool = AtomicBool::new(false);

/// Turns the accounting on or off (for every thread).
pub fn enable(on: bool) {
    ON.store(on, Ordering::Relaxed);
}

/// Whether the accounting is on.
pub fn is_on() -> bool {
    ON.load(Ordering::Relaxed)
}

enum Mark {
    #[cfg(feature = "cuda")]
    Gpu(candle_core::cuda_backend::cudarc::driver::CudaEvent),
    Cpu(Instant),
}

thread_local! {
    static SPANS: RefCell<Vec<(&'static str, Mark, Mark)>> = const { RefCell::new(Vec::new()) };
}

fn mark(device: &Device) -> Result<Mark> {
    #[cfg(feature = "cuda")]
    if let Device::Cuda(dev) = device {
        use candle_core::cuda_backend::cudarc::driver::sys::CUevent_flags;
        let event = dev
            .cuda_stream()
            .record_event(Some(CUevent_flags::CU_EVENT_DEFAULT))
            .map_err(candle_core::Error::wrap)?;
        return Ok(Mark::Gpu(event));
    }
    let _ = device;
    Ok(Mark::Cpu(Instant::now()))
}

/// Runs `f`, counting its time under `kind` while profiling is on. Kinds must not nest.
pub fn timed<T>(kind: &'static str, device: &Device, f: impl FnOnce() -> Result<T>) -> Result<T> {
    if !ON.load(Ordering::Relaxed) {
        return f();
    }
    let start = mark(device)?;
    let out = f()?;
    let end = mark(device)?;
    SPANS.with(|s| s.borrow_mut().push((kind, start, end)));
    Ok(out)
}

/// The time recorded since the last call, per kind: (kind, calls, milliseconds), slowest
/// first. Waits for the GPU.
pub fn take() -> Result<Vec<(&'static str, usize, f64)>> {
    let spans = SPANS.with(|s| std::mem::take(&mut *s.borrow_mut()));
    let mut total: BTreeMap<&'static str, (usize, f64)> = BTreeMap::new();
    for (kind, start, end) in spans {
        let ms = match (start, end) {
            #[cfg(feature = "cuda")]
            (Mark::Gpu(a), Mark::Gpu(b)) => {
                a.elapsed_ms(&b).map_err(candle_core::Error::wrap)? as f64
            }
            (Mark::Cpu(a), Mark::Cpu(b)) => (b - a).as_secs_f64() * 1e3,
            #[allow(unreachable_patterns)]
            _ => continue,
        };
        let entry = total.entry(kind).or_default();
        entry.0 += 1;
        entry.1 += ms;
    }
    let mut rows: Vec<_> = total.into_iter().map(|(k, (n, ms))| (k, n, ms)).collect();
    rows.sort_by(|a, b| b.2.total_cmp(&a.2));
    Ok(rows)
}
