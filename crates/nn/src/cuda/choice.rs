//! Per-shape choices between two ways of computing one op (cuDNN or candle's kernel, cuDNN's
//! graph API or its legacy call, cuDNN's attention or ours): checked once on the real input
//! where the two may differ, then timed, and the winner remembered per thread, as
//! `torch.backends.cudnn.benchmark` does.

use std::cell::RefCell;
use std::collections::HashMap;
use std::time::Duration;

use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::cudarc::driver::DevicePtr;
use candle_core::{DType, Result, Tensor};
use half::f16;

use super::cudnn_backend::ALIGNMENT;
use crate::switch::Switch;

/// The value remembered in `cache` under `key`, made by `make` the first time on this thread
/// (a per-shape choice, a built plan).
pub(super) fn remembered<K: std::hash::Hash + Eq, V: Clone>(
    cache: &'static std::thread::LocalKey<RefCell<HashMap<K, V>>>,
    key: K,
    make: impl FnOnce() -> Result<V>,
) -> Result<V> {
    if let Some(value) = cache.with(|c| c.borrow().get(&key).cloned()) {
        return Ok(value);
    }
    let value = make()?;
    cache.with(|c| c.borrow_mut().insert(key, value.clone()));
    Ok(value)
}

/// What one way of computing an op returns: one tensor, or several that are compared one by
/// one (attention's output and gradients, each on its own scale).
pub(super) trait Outputs {
    fn tensors(&self) -> Vec<&Tensor>;
}

impl Outputs for Tensor {
    fn tensors(&self) -> Vec<&Tensor> {
        vec![self]
    }
}

impl Outputs for Vec<Tensor> {
    fn tensors(&self) -> Vec<&Tensor> {
        self.iter().collect()
    }
}

/// The times of three calls of `a` and of `b`, each the best of up to five rounds, the rounds
/// alternating (after one untimed call of each): a noisy moment on a shared host then decides
/// nothing, and neither side runs with the other's data still hot in L2 only. After two rounds
/// a side ahead by a quarter in both stops the timing: the choice is clear, and every shape's
/// timing adds to a server's warm-up. Each time: [`time_three`].
pub(super) fn best_times<T>(
    dev: &candle_core::Device,
    a: &dyn Fn() -> Result<T>,
    b: &dyn Fn() -> Result<T>,
) -> Result<(Duration, Duration)> {
    a()?;
    b()?;
    let clearly = |x: Duration, y: Duration| x.as_secs_f64() * 1.25 < y.as_secs_f64();
    let (mut best_a, mut best_b) = (Duration::MAX, Duration::MAX);
    let mut clear_rounds = (0, 0);
    for _ in 0..5 {
        let (ta, tb) = (time_three(dev, a)?, time_three(dev, b)?);
        best_a = best_a.min(ta);
        best_b = best_b.min(tb);
        clear_rounds.0 += clearly(ta, tb) as u32;
        clear_rounds.1 += clearly(tb, ta) as u32;
        if clear_rounds.0 == 2 || clear_rounds.1 == 2 {
            break;
        }
    }
    Ok((best_a, best_b))
}

/// How long the stream is held before three timed calls: longer than the host takes to queue
/// three calls of any op chosen here (tens of microseconds).
const HOLD_NS: u64 = 400_000;

/// `SDKUBE_CHOICE_TIMING` (`gpu` by default): [`best_times`] times each path on the GPU
/// ([`gpu_time`]), as a replayed CUDA graph runs it; `host` times the host's wall clock around
/// the calls, launches included, which suits networks run eagerly. On one H100 the GPU's time
/// took SD1.5's step from 8.46 to 6.97 ms (batch 2): timed by the host, cuDNN lost 22 of 50
/// small-map convolutions to candle's kernel on its launch cost alone. The networks run eagerly
/// (ControlNet, textual-inversion training, GFPGAN, RealESRGAN) were no faster host-timed, nor
/// with choices kept apart for graphed and eager passes (H100, 2026-12-07): one way serves both.
static GPU_TIMED: Switch = Switch::new("SDKUBE_CHOICE_TIMING", "gpu", "host", true);

/// The time of three calls of `f`: [`gpu_time`], or under `SDKUBE_CHOICE_TIMING=host` the
/// host's wall time around them.
fn time_three<T>(dev: &candle_core::Device, f: &dyn Fn() -> Result<T>) -> Result<Duration> {
    if GPU_TIMED.is_on() {
        return gpu_time(dev, f);
    }
    dev.synchronize()?;
    let start = std::time::Instant::now();
    for _ in 0..3 {
        f()?;
    }
    dev.synchronize()?;
    Ok(start.elapsed())
}

/// The GPU's time for three calls of `f`, between events on the stream, with the stream held
/// busy ([`super::hold_stream`]) while the host queues them: the calls then run back to back,
/// as in the replayed CUDA graph of a UNet step, and a path is not charged for the host's time
/// to launch its kernels (a one-kernel op against a three-kernel one was decided by launch
/// overhead at the UNet's sizes). Where the stream cannot be held, the events still time
/// the GPU, gaps included.
fn gpu_time<T>(dev: &candle_core::Device, f: &dyn Fn() -> Result<T>) -> Result<Duration> {
    use candle_core::cuda_backend::cudarc::driver::sys::CUevent_flags::CU_EVENT_DEFAULT;
    use candle_core::cuda_backend::WrapErr;
    let candle_core::Device::Cuda(cuda) = dev else {
        candle_core::bail!("per-shape choices are timed on CUDA devices only")
    };
    dev.synchronize()?;
    let stream = cuda.cuda_stream();
    super::hold_stream(cuda, HOLD_NS)?;
    let start = stream.record_event(Some(CU_EVENT_DEFAULT)).w()?;
    for _ in 0..3 {
        f()?;
    }
    let end = stream.record_event(Some(CU_EVENT_DEFAULT)).w()?;
    let ms = start.elapsed_ms(&end).w()?;
    Ok(Duration::from_secs_f64(f64::from(ms.max(0.0)) / 1e3))
}

/// Whether `candidate` may replace `current` for one shape (`what` and `shapes` name it in the
/// log): it runs (an error, such as no cuDNN engine for the shape, says no), gives `current`'s
/// values ([`matches`]) and is faster ([`best_times`]).
pub(super) fn replaces<T: Outputs>(
    what: &str,
    shapes: &[&[usize]],
    dev: &candle_core::Device,
    candidate: &dyn Fn() -> Result<T>,
    current: &dyn Fn() -> Result<T>,
) -> Result<bool> {
    let theirs = match candidate() {
        Ok(out) => out,
        Err(e) => {
            tracing::debug!(?shapes, "{what} refused: {e}");
            return Ok(false);
        }
    };
    let (close, diff) = all_match(&theirs, &current()?)?;
    drop(theirs);
    if !close {
        tracing::warn!(
            ?shapes,
            diff,
            "{what} differs from the path it would replace; kept that"
        );
        return Ok(false);
    }
    let (candidate_time, current_time) = best_times(dev, candidate, current)?;
    tracing::debug!(
        ?shapes,
        ?candidate_time,
        ?current_time,
        diff,
        "{what}: timed against the current path"
    );
    Ok(candidate_time < current_time)
}

/// [`matches`] over each output of two paths: whether all are close, and the largest
/// difference.
fn all_match(theirs: &impl Outputs, ours: &impl Outputs) -> Result<(bool, f32)> {
    let (theirs, ours) = (theirs.tensors(), ours.tensors());
    if theirs.len() != ours.len() {
        candle_core::bail!("{} outputs against {}", theirs.len(), ours.len())
    }
    let (mut close, mut diff) = (true, 0f32);
    for (a, b) in theirs.into_iter().zip(ours) {
        let (c, d) = matches(a, b)?;
        close &= c;
        diff = diff.max(d);
    }
    Ok((close, diff))
}

/// Elements compared by [`matches`]: a wrong layout, stride or scale shows in any stretch of
/// the output, and comparing all of a VAE's 1024² output in fp32 would take gigabytes.
const COMPARED: usize = 1 << 22;

/// The largest difference between `ours` and `reference` (over their first [`COMPARED`]
/// elements) and whether it is within 1 % of the reference's largest magnitude (at least 1):
/// fp16 rounding alone gives about 0.1 %, a plan built for the wrong layout lands far outside.
/// NaN anywhere fails.
fn matches(ours: &Tensor, reference: &Tensor) -> Result<(bool, f32)> {
    let head = |t: &Tensor| -> Result<Tensor> {
        let flat = t.flatten_all()?;
        let n = flat.dim(0)?.min(COMPARED);
        flat.narrow(0, 0, n)?.to_dtype(DType::F32)
    };
    let largest = |t: &Tensor| t.abs()?.max(0)?.to_scalar::<f32>();
    let (ours, reference) = (head(ours)?, head(reference)?);
    let diff = largest(&(ours - &reference)?)?;
    let scale = largest(&reference)?.max(1.0);
    Ok((diff <= 1e-2 * scale, diff))
}

/// Whether `t`'s first element (fp16 or fp32, on the GPU) sits at an address cuDNN's graph
/// plans are built for ([`ALIGNMENT`]). Checked before a shape's plan is tried, so the check
/// against the other path runs the plan itself, not a fallback standing in.
pub(super) fn graph_aligned(t: &Tensor) -> bool {
    let (storage, layout) = t.storage_and_layout();
    let candle_core::Storage::Cuda(s) = &*storage else {
        return false;
    };
    let stream = s.device().cuda_stream();
    let base = match t.dtype() {
        DType::F16 => s.as_cuda_slice::<f16>().map(|v| v.device_ptr(&stream).0),
        DType::F32 => s.as_cuda_slice::<f32>().map(|v| v.device_ptr(&stream).0),
        _ => return false,
    };
    let Ok(base) = base else {
        return false;
    };
    let first = base as usize + layout.start_offset() * t.dtype().size_in_bytes();
    first.is_multiple_of(ALIGNMENT)
}

#[cfg(test)]
mod tests {
    use candle_core::{Device, Tensor};

    use super::{all_match, matches};

    #[test]
    fn matching_allows_fp16_rounding_and_refuses_a_wrong_layout_or_nan() -> candle_core::Result<()>
    {
        let dev = Device::Cpu;
        let reference = Tensor::arange(0f32, 64., &dev)?.reshape((8, 8))?;
        // fp16 rounding of values up to 63: within 1 % of the largest.
        let rounded = reference.to_dtype(candle_core::DType::F16)?;
        assert!(matches(&rounded, &reference)?.0);
        // The same values in the other layout (a plan built for the wrong strides).
        let transposed = reference.t()?.contiguous()?;
        let (close, diff) = matches(&transposed, &reference)?;
        assert!(!close && diff > 1.0, "{diff}");
        let nan = Tensor::full(f32::NAN, (8, 8), &dev)?;
        assert!(!matches(&nan, &reference)?.0);
        Ok(())
    }

    /// Several outputs (attention's output and gradients) are compared one by one, each on its
    /// own scale: a wrong layout in a small gradient is not hidden by a large output beside it.
    #[test]
    fn each_output_is_compared_on_its_own_scale() -> candle_core::Result<()> {
        let dev = Device::Cpu;
        let large = (Tensor::arange(0f32, 64., &dev)?.reshape((8, 8))? * 100.)?;
        let small = (Tensor::arange(0f32, 64., &dev)?.reshape((8, 8))? * 0.01)?;
        let right = vec![large.clone(), small.clone()];
        assert!(all_match(&right, &vec![large.clone(), small.clone()])?.0);
        // The small one transposed: off by up to 0.5, under 1 % of the large output's 6300.
        let wrong = vec![large.clone(), small.t()?.contiguous()?];
        assert!(!all_match(&wrong, &right)?.0);
        // A missing output is an error, not a match.
        assert!(all_match(&vec![large.clone()], &right).is_err());
        Ok(())
    }
}
