//! GPU memory: the scratch buffer cuDNN and cuBLASLt share, and the memory pool's high-water
//! marks for benchmarks.

use std::cell::RefCell;
use std::collections::HashMap;

use candle_core::cuda_backend::cudarc;
use candle_core::cuda_backend::{CudaDevice, DeviceId, WrapErr};
use candle_core::Result;
use cudarc::driver::CudaSlice;

thread_local! {
    // One scratch buffer per device for cuDNN and cuBLASLt, grown to the largest need up to
    // [`KEPT_WORKSPACE`] seen: every use is on the one stream, so uses never overlap.
    static WORKSPACE: RefCell<HashMap<DeviceId, CudaSlice<u8>>> = RefCell::new(HashMap::new());
}

/// The largest scratch buffer kept between calls. Bigger needs (the VAE's 1024² convolutions
/// want about a gigabyte) take a buffer from the memory pool for the one call and give it back
/// after, as torch does with every workspace: kept, it would sit unused under every later step.
const KEPT_WORKSPACE: usize = 64 << 20;

/// Runs `f` with scratch space of at least `need` bytes (`None` when no scratch is needed).
pub(super) fn with_workspace<R>(
    dev: &CudaDevice,
    need: usize,
    f: impl FnOnce(Option<&mut CudaSlice<u8>>) -> Result<R>,
) -> Result<R> {
    if need > KEPT_WORKSPACE {
        // SAFETY: scratch space, never read before it is written. Freed in stream order, so
        // the pool hands it out again only after this call's kernels.
        let mut scratch = unsafe { dev.alloc::<u8>(need)? };
        return f(Some(&mut scratch));
    }
    WORKSPACE.with(|map| {
        let mut map = map.borrow_mut();
        if need > 0 && map.get(&dev.id()).is_none_or(|ws| ws.len() < need) {
            map.remove(&dev.id()); // free the old buffer before taking the bigger one
                                   // SAFETY: scratch space, never read before it is written.
            map.insert(dev.id(), unsafe { dev.alloc::<u8>(need)? });
        }
        f(map.get_mut(&dev.id()).filter(|_| need > 0))
    })
}

/// The high-water marks of the memory pool candle allocates from (`cuMemAllocAsync`'s default
/// pool): bytes in use and bytes reserved at most since the last call with `reset` (PyTorch's
/// `max_memory_allocated` and `max_memory_reserved`). Not counted: the CUDA context, loaded
/// kernels, and what cuBLAS keeps on its own.
pub fn memory_high_water(dev: &CudaDevice, reset: bool) -> Result<(u64, u64)> {
    use cudarc::driver::sys;
    let check = |r: sys::CUresult| r.result().map_err(candle_core::Error::wrap);
    let stream = dev.cuda_stream();
    stream.context().bind_to_thread().w()?;
    let mut pool: sys::CUmemoryPool = std::ptr::null_mut();
    let attrs = [
        sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_USED_MEM_HIGH,
        sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_RESERVED_MEM_HIGH,
    ];
    let mut high = [0u64; 2];
    // SAFETY: plain queries on the device's current pool; the value type of both is cuuint64_t.
    unsafe {
        check(sys::cuDeviceGetMemPool(
            &mut pool,
            stream.context().cu_device(),
        ))?;
        for (attr, value) in attrs.iter().zip(high.iter_mut()) {
            check(sys::cuMemPoolGetAttribute(
                pool,
                *attr,
                (value as *mut u64).cast(),
            ))?;
            if reset {
                let mut zero = 0u64; // resets the mark to what is in use now
                check(sys::cuMemPoolSetAttribute(
                    pool,
                    *attr,
                    (&mut zero as *mut u64).cast(),
                ))?;
            }
        }
    }
    Ok((high[0], high[1]))
}
