//! Many host tensors to the GPU at once, through pinned staging buffers.
//!
//! candle's `to_device` copies each tensor from pageable memory, one after the other: the
//! driver stages every byte through its own small pinned buffer and the host waits for each
//! copy. A model's weights are gigabytes (SDXL about 7 GB), which took about as long as
//! reading them from the page cache. Here several threads each fill a pinned buffer of their
//! own and queue its copy to the device, so that filling the next buffers overlaps the copies
//! already queued, and the copy engine reads pinned memory at full speed.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use candle_core::cuda_backend::cudarc::driver::{
    sys, CudaEvent, CudaSlice, CudaStream, DevicePtrMut, DeviceRepr, PinnedHostSlice,
};
use candle_core::cuda_backend::{CudaDType, CudaDevice, CudaStorage, WrapErr};
use candle_core::op::BackpropOp;
use candle_core::{CpuStorage, Device, Result, Storage, Tensor};

/// The size of one staging buffer.
const CHUNK: usize = 16 << 20;

/// Threads filling staging buffers (each owns one).
fn threads() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get().min(8))
}

/// A contiguous run of bytes to copy: `len` bytes at `src` to the device address `dst`.
#[derive(Clone, Copy)]
struct Piece {
    src: *const u8,
    dst: sys::CUdeviceptr,
    len: usize,
}

// SAFETY: the source bytes belong to tensors the caller borrows for the whole upload, and
// are only read.
unsafe impl Send for Piece {}
unsafe impl Sync for Piece {}

/// `tensors` on `dev`, same shapes and dtypes, in order: contiguous, non-empty host tensors of
/// the element types [`device_buffer_for`] moves through the staging buffers, any other
/// through candle's `to_device`.
pub fn upload(tensors: &[&Tensor], dev: &CudaDevice) -> Result<Vec<Tensor>> {
    let mut uploaded = Vec::with_capacity(tensors.len());
    let mut pieces = Vec::new();
    // Each tensor's host storage, read-locked (so unchanged) until its bytes are copied.
    let mut sources = Vec::with_capacity(tensors.len());
    for t in tensors {
        let (storage, layout) = t.storage_and_layout();
        let target = match (&*storage, layout.contiguous_offsets()) {
            (Storage::Cpu(cpu), Some((start, end))) if end > start => {
                device_buffer_for(cpu, start, end, dev)?
            }
            _ => None,
        };
        let Some((bytes, buffer, dst)) = target else {
            drop(storage);
            uploaded.push(t.to_device(&Device::Cuda(dev.clone()))?);
            continue;
        };
        for (i, part) in bytes.chunks(CHUNK).enumerate() {
            pieces.push(Piece {
                src: part.as_ptr(),
                dst: dst + (i * CHUNK) as u64,
                len: part.len(),
            });
        }
        let shape = t.shape().clone();
        uploaded.push(Tensor::from_storage(
            Storage::Cuda(buffer),
            shape,
            BackpropOp::none(),
            false,
        ));
        sources.push(storage);
    }
    copy_pieces(&pieces, &dev.cuda_stream())?;
    drop(sources);
    Ok(uploaded)
}

/// The bytes of `cpu`'s elements `start..end`, and a device buffer of the same type and size
/// with its address; `None` for an element type the staging buffers do not move.
fn device_buffer_for<'a>(
    cpu: &'a CpuStorage,
    start: usize,
    end: usize,
    dev: &CudaDevice,
) -> Result<Option<(&'a [u8], CudaStorage, sys::CUdeviceptr)>> {
    fn typed<'a, T: CudaDType + DeviceRepr>(
        values: &'a [T],
        dev: &CudaDevice,
    ) -> Result<Option<(&'a [u8], CudaStorage, sys::CUdeviceptr)>> {
        // SAFETY: every byte is written by the copies queued (on the same stream) before
        // anything reads it.
        let mut slice: CudaSlice<T> = unsafe { dev.alloc::<T>(values.len())? };
        let dst = slice.device_ptr_mut(&dev.cuda_stream()).0;
        // SAFETY: plain numbers, viewed as bytes and only read.
        let bytes = unsafe {
            std::slice::from_raw_parts(values.as_ptr().cast::<u8>(), std::mem::size_of_val(values))
        };
        Ok(Some((
            bytes,
            CudaStorage::wrap_cuda_slice(slice, dev.clone()),
            dst,
        )))
    }
    match cpu {
        CpuStorage::F16(v) => typed(&v[start..end], dev),
        CpuStorage::BF16(v) => typed(&v[start..end], dev),
        CpuStorage::F32(v) => typed(&v[start..end], dev),
        CpuStorage::F64(v) => typed(&v[start..end], dev),
        CpuStorage::U8(v) => typed(&v[start..end], dev),
        CpuStorage::U32(v) => typed(&v[start..end], dev),
        CpuStorage::I64(v) => typed(&v[start..end], dev),
        _ => Ok(None),
    }
}

/// Copies every piece: [`threads`] threads take batches of consecutive pieces that fill at
/// most one staging buffer, in turn from a shared counter; each fills its own buffer, queues
/// the batch's copies on `stream` and records an event it waits on before refilling.
fn copy_pieces(pieces: &[Piece], stream: &Arc<CudaStream>) -> Result<()> {
    let batches = batches(pieces.iter().map(|p| p.len), CHUNK);
    let next = AtomicUsize::new(0);
    let ctx = stream.context().clone();
    let workers = threads().min(batches.len());
    std::thread::scope(|s| {
        let handles: Vec<_> = (0..workers)
            .map(|_| {
                let (ctx, next, batches) = (&ctx, &next, &batches);
                s.spawn(move || -> Result<()> {
                    ctx.bind_to_thread().w()?;
                    // SAFETY: staging space, written before each copy reads it.
                    let mut buffer: PinnedHostSlice<u8> =
                        unsafe { ctx.alloc_pinned_with_flags::<u8>(CHUNK, 0).w()? };
                    let staged: *mut u8 = buffer.as_mut_ptr().w()?;
                    let done: CudaEvent = ctx.new_event(None).w()?;
                    let mut queued = false;
                    let filled = (|| -> Result<()> {
                        loop {
                            let b = next.fetch_add(1, Ordering::Relaxed);
                            let Some(&(from, to)) = batches.get(b) else {
                                return Ok(());
                            };
                            if queued {
                                done.synchronize().w()?;
                            }
                            let mut at = 0;
                            for p in &pieces[from..to] {
                                // SAFETY: `p.src` holds `p.len` readable bytes (see `Piece`),
                                // the batch fits the buffer, no copy from it is in flight.
                                unsafe {
                                    std::ptr::copy_nonoverlapping(p.src, staged.add(at), p.len);
                                    sys::cuMemcpyHtoDAsync_v2(
                                        p.dst,
                                        staged.add(at).cast(),
                                        p.len,
                                        stream.cu_stream(),
                                    )
                                    .result()
                                    .w()?;
                                }
                                queued = true;
                                at += p.len;
                            }
                            done.record(stream).w()?;
                        }
                    })();
                    // The buffer is freed on return, so no copy from it may still be in
                    // flight, whether or not this thread's work went through.
                    let drained = match queued {
                        true => stream.synchronize().w(),
                        false => Ok(()),
                    };
                    filled.and(drained)
                })
            })
            .collect();
        handles
            .into_iter()
            .try_for_each(|h| h.join().unwrap_or_else(|p| std::panic::resume_unwind(p)))
    })
}

/// Consecutive runs of pieces of lengths `lens` (each at most `limit`) that fill at most `limit`
/// bytes together, as `(first, end)` indices, in order.
fn batches(lens: impl Iterator<Item = usize>, limit: usize) -> Vec<(usize, usize)> {
    let mut batches = Vec::new();
    let (mut first, mut bytes, mut count) = (0, 0, 0);
    for (i, len) in lens.enumerate() {
        if bytes + len > limit && i > first {
            batches.push((first, i));
            first = i;
            bytes = 0;
        }
        bytes += len;
        count = i + 1;
    }
    if first < count {
        batches.push((first, count));
    }
    batches
}

#[cfg(test)]
mod tests {
    use super::batches;

    #[test]
    fn batches_cover_every_piece_in_order_within_the_buffer() {
        let lens = [10, 60, 30, 100, 1, 1, 98, 50, 50, 7];
        let got = batches(lens.iter().copied(), 100);
        assert_eq!(got, [(0, 3), (3, 4), (4, 7), (7, 9), (9, 10)], "{got:?}");
        let mut next = 0;
        for &(first, end) in &got {
            assert_eq!(first, next, "batches follow each other");
            assert!(end > first, "no empty batch");
            assert!(lens[first..end].iter().sum::<usize>() <= 100);
            next = end;
        }
        assert_eq!(next, lens.len());
        assert!(batches(std::iter::empty(), 100).is_empty());
    }
}
