//! Group norm (+ SiLU) in fused passes (NCHW: two; channels-last: the statistics of each chunk,
//! their merge per group, the normalisation, or all three in one kernel where the map fits the
//! GPU at once), and its input gradient in three; layer norm's input gradient in one.

use std::cell::RefCell;
use std::collections::HashMap;

use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::cudarc;
use candle_core::cuda_backend::{CudaDevice, DeviceId, WrapErr};
use candle_core::{CudaStorage, DType, Layout, Result, Shape, Tensor};
use cudarc::driver::{CudaSlice, CudaView, DeviceRepr, LaunchConfig, PushKernelArg};
use half::f16;

use super::choice::{remembered, replaces};
use super::{applies, cuda_op, kernel, suffix, Kernel};

/// `torch.nn.GroupNorm` (then SiLU when `silu`) over `[B, C, …]`; fp16 or fp32. With `added`
/// (`[B, C]`, a term added to every pixel of a sample's channel first: a ResNet block's time
/// embedding), the norm of `x + added` without that sum in memory: the channels-last kernels
/// only, `None` elsewhere (the caller adds, then normalises).
pub fn group_norm(
    x: &Tensor,
    weight: &Tensor,
    bias: &Tensor,
    (groups, eps, silu): (usize, f64, bool),
    added: Option<&Tensor>,
) -> Result<Option<Tensor>> {
    let dtype_ok = matches!(x.dtype(), DType::F16 | DType::F32);
    let same = [weight, bias]
        .into_iter()
        .chain(added)
        .all(|t| t.dtype() == x.dtype() && !t.track_op());
    if !applies(x) || !dtype_ok || !same || x.rank() < 3 {
        return Ok(None);
    }
    if added.is_some_and(|a| a.dims() != &x.dims()[..2]) {
        return Ok(None);
    }
    let channels = x.dim(1)?;
    if groups == 0 || channels % groups != 0 || weight.elem_count() != channels {
        return Ok(None);
    }
    let op = GroupNormOp {
        groups,
        eps: eps as f32,
        silu,
    };
    let (weight, bias) = (weight.contiguous()?, bias.contiguous()?);
    let added = added.map(|a| a.contiguous()).transpose()?;
    let offsets: Vec<usize> = [x, &weight, &bias]
        .into_iter()
        .chain(added.as_ref())
        .map(|t| t.layout().start_offset())
        .collect();
    if crate::is_channels_last(x) && NhwcGeometry::new(x.dims(), groups, &offsets).is_some() {
        let nhwc = |resident: bool| -> Result<Tensor> {
            let op = GroupNormNhwcOp {
                norm: op,
                resident,
                added: added.clone(),
            };
            x.permute((0, 2, 3, 1))?
                .apply_op3_no_bwd(&weight, &bias, &op)?
                .permute((0, 3, 1, 2))
        };
        let candle_core::Device::Cuda(dev) = x.device() else {
            return Ok(None);
        };
        let key = (
            dev.id(),
            x.dtype(),
            x.dims().to_vec(),
            groups,
            silu,
            added.is_some(),
        );
        let resident = remembered(&RESIDENT_CHOICE, key, || {
            replaces(
                "one-pass group norm",
                &[x.dims()],
                x.device(),
                &|| nhwc(true),
                &|| nhwc(false),
            )
        })?;
        return nhwc(resident).map(Some);
    }
    if added.is_some() {
        return Ok(None);
    }
    x.contiguous()?
        .apply_op3_no_bwd(&weight, &bias, &op)
        .map(Some)
}

/// A group-norm choice's key: device, element type, shape, groups, SiLU, an added term.
type GroupNormKey = (DeviceId, DType, Vec<usize>, usize, bool, bool);

/// A layer-norm choice's key: device, element type, shape.
type LayerNormKey = (DeviceId, DType, Vec<usize>);

type SplitKey = (DeviceId, &'static str, usize, usize, usize, usize);

thread_local! {
    // Per shape (and groups, SiLU): whether the one-pass channels-last kernel is used.
    static RESIDENT_CHOICE: RefCell<HashMap<GroupNormKey, bool>> = RefCell::new(HashMap::new());
    // Per shape: whether our layer-norm kernel is used (else candle's).
    static LAYER_NORM_CHOICE: RefCell<HashMap<LayerNormKey, bool>> = RefCell::new(HashMap::new());
    // Per device, element type, N, H·W, bytes per pixel, threads: its cut (`resident_split`).
    static RESIDENT_SPLITS: RefCell<HashMap<SplitKey, Option<(usize, usize)>>> =
        RefCell::new(HashMap::new());
}

#[derive(Clone, Copy)]
struct GroupNormOp {
    groups: usize,
    eps: f32,
    silu: bool,
}

impl GroupNormOp {
    fn run<T: DeviceRepr + candle_core::cuda_backend::CudaDType>(
        &self,
        (x, xl): (&CudaStorage, &Layout),
        (w, wl): (&CudaStorage, &Layout),
        (b, bl): (&CudaStorage, &Layout),
    ) -> Result<(CudaStorage, Shape)> {
        let suffix = suffix(x.dtype())?;
        let geo = GroupGeometry::new(xl.dims(), self.groups);
        let dev = x.device().clone();
        let xs = x.as_cuda_slice::<T>()?.slice(xl.start_offset()..);
        let ws = w.as_cuda_slice::<T>()?.slice(wl.start_offset()..);
        let bs = b.as_cuda_slice::<T>()?.slice(bl.start_offset()..);
        let partial = geo.moments(&dev, suffix, &xs)?;
        // SAFETY: pass 2 writes every output.
        let out = unsafe { dev.alloc::<T>(xl.shape().elem_count())? };
        let cfg = geo.launch_config();
        let apply = kernel(&dev, &format!("group_norm_apply_{suffix}"))?;
        let (len64, splits32) = (geo.len as i64, geo.splits as i32);
        let (hw64, cpg32, groups32) = (geo.hw as i64, geo.cpg as i32, self.groups as i32);
        let silu = self.silu as i32;
        let mut launch = apply.builder();
        launch.arg(&xs).arg(&out).arg(&partial).arg(&ws).arg(&bs);
        launch
            .arg(&len64)
            .arg(&splits32)
            .arg(&hw64)
            .arg(&cpg32)
            .arg(&groups32);
        launch.arg(&self.eps).arg(&silu);
        // SAFETY: argument list matches the kernel's signature.
        unsafe { launch.launch(cfg) }.w()?;
        Ok((CudaStorage::wrap_cuda_slice(out, dev), xl.shape().clone()))
    }
}

/// How the group-norm kernels walk an `[N, C, ..]` input: a block row per (sample, group),
/// each group's `len` elements cut into `splits` chunks.
struct GroupGeometry {
    blocks: usize,
    hw: usize,
    cpg: usize,
    len: usize,
    splits: usize,
}

impl GroupGeometry {
    fn new(dims: &[usize], groups: usize) -> GroupGeometry {
        let hw: usize = dims[2..].iter().product();
        let cpg = dims[1] / groups;
        let len = cpg * hw;
        GroupGeometry {
            blocks: dims[0] * groups,
            hw,
            cpg,
            len,
            // Enough blocks to fill the GPU at the VAE's 512² planes, few enough that merging
            // a group's chunks stays trivial.
            splits: len.div_ceil(8192).clamp(1, 64),
        }
    }

    fn launch_config(&self) -> LaunchConfig {
        LaunchConfig {
            grid_dim: (self.blocks as u32, self.splits as u32, 1),
            block_dim: (256, 1, 1),
            shared_mem_bytes: 0,
        }
    }

    /// The first pass of the forward and of the gradient alike: each chunk's count, mean and
    /// sum of squared deviations (Welford), 3 floats per chunk.
    fn moments<T: DeviceRepr>(
        &self,
        dev: &CudaDevice,
        suffix: &str,
        xs: &CudaView<T>,
    ) -> Result<CudaSlice<f32>> {
        // SAFETY: the kernel writes every chunk's moments.
        let partial = unsafe { dev.alloc::<f32>(self.blocks * self.splits * 3)? };
        let stats = kernel(dev, &format!("group_norm_stats_{suffix}"))?;
        let (len64, splits32) = (self.len as i64, self.splits as i32);
        let mut launch = stats.builder();
        launch.arg(xs).arg(&partial).arg(&len64).arg(&splits32);
        // SAFETY: argument list matches the kernel's signature.
        unsafe { launch.launch(self.launch_config()) }.w()?;
        Ok(partial)
    }
}

/// [`GroupNormOp`] over channels-last memory `[N, H, W, C]` (`*_nhwc` kernels): three passes,
/// or where `resident`, the one-pass kernel (an error where a sample's map does not fit it);
/// of `x + added` where there is an `added` (`[N, C]`, contiguous).
struct GroupNormNhwcOp {
    norm: GroupNormOp,
    resident: bool,
    added: Option<Tensor>,
}

impl GroupNormNhwcOp {
    fn run<T: DeviceRepr + candle_core::cuda_backend::CudaDType>(
        &self,
        (x, xl): (&CudaStorage, &Layout),
        (w, wl): (&CudaStorage, &Layout),
        (b, bl): (&CudaStorage, &Layout),
    ) -> Result<(CudaStorage, Shape)> {
        let [n, h, wd, c] = *xl.dims() else {
            candle_core::bail!("group norm: {:?} is not [N, H, W, C]", xl.dims())
        };
        let added_storage = self.added.as_ref().map(|a| a.storage_and_layout());
        let added_layout = added_storage.as_ref().map(|(_, l)| *l);
        let offsets: Vec<usize> = [xl, wl, bl]
            .into_iter()
            .chain(added_layout)
            .map(|l| l.start_offset())
            .collect();
        let Some(geo) = NhwcGeometry::new(&[n, c, h, wd], self.norm.groups, &offsets) else {
            candle_core::bail!("group norm: no channels-last kernel for {:?}", xl.dims())
        };
        let suffix = suffix(x.dtype())?;
        let dev = x.device().clone();
        let xs = x.as_cuda_slice::<T>()?.slice(xl.start_offset()..);
        let ws = w.as_cuda_slice::<T>()?.slice(wl.start_offset()..);
        let bs = b.as_cuda_slice::<T>()?.slice(bl.start_offset()..);
        let added = match &added_storage {
            Some((storage, layout)) => {
                let candle_core::Storage::Cuda(a) = &**storage else {
                    candle_core::bail!("group norm: the added term is not on the GPU")
                };
                if layout.dims() != [n, c] || !layout.is_contiguous() {
                    candle_core::bail!("group norm: the added term is not [{n}, {c}]")
                }
                Some(a.as_cuda_slice::<T>()?.slice(layout.start_offset()..))
            }
            None => None,
        };
        let added = AddedArg(added.as_ref());
        if self.resident {
            let geometry = [n, h * wd, c];
            let operands = (&xs, &added, &ws, &bs);
            let out = self.run_resident((&dev, suffix), &geo, geometry, operands)?;
            return Ok((CudaStorage::wrap_cuda_slice(out, dev), xl.shape().clone()));
        }
        let groups = self.norm.groups;
        // SAFETY: pass 1 writes every (sample, group, chunk)'s moments, pass 2 every
        // (sample, group)'s statistics, pass 3 every output.
        let partial = unsafe { dev.alloc::<f32>(n * groups * geo.splits * 3)? };
        let group_stats = unsafe { dev.alloc::<f32>(n * groups * 2)? };
        let out = unsafe { dev.alloc::<T>(xl.shape().elem_count())? };
        let cfg = LaunchConfig {
            grid_dim: (n as u32, geo.splits as u32, 1),
            block_dim: (geo.threads as u32, 1, 1),
            shared_mem_bytes: 0,
        };
        let hw64 = (h * wd) as i64;
        let (c32, groups32, vec32) = (c as i32, groups as i32, geo.vec as i32);
        let splits32 = geo.splits as i32;
        let func = |name: &str| kernel(&dev, &format!("{name}_{suffix}"));
        let stats = func("group_norm_stats_nhwc")?;
        let mut launch = stats.builder();
        launch.arg(&xs);
        added.push(&mut launch);
        launch.arg(&partial).arg(&hw64);
        launch.arg(&c32).arg(&groups32).arg(&vec32).arg(&splits32);
        // SAFETY: argument lists match the kernels' signatures; geometry checked above.
        unsafe { launch.launch(cfg) }.w()?;
        let finalize = kernel(&dev, "group_norm_finalize_nhwc")?;
        let rows = n * groups;
        let (rows32, eps) = (rows as i32, self.norm.eps);
        let mut launch = finalize.builder();
        launch
            .arg(&partial)
            .arg(&group_stats)
            .arg(&rows32)
            .arg(&splits32)
            .arg(&eps);
        // A warp per (sample, group), four a block.
        let finalize_cfg = LaunchConfig {
            grid_dim: (rows.div_ceil(4) as u32, 1, 1),
            block_dim: (128, 1, 1),
            shared_mem_bytes: 0,
        };
        unsafe { launch.launch(finalize_cfg) }.w()?;
        let apply = func("group_norm_apply_nhwc")?;
        let silu = self.norm.silu as i32;
        let mut launch = apply.builder();
        launch.arg(&xs);
        added.push(&mut launch);
        launch.arg(&out).arg(&group_stats).arg(&ws).arg(&bs);
        launch.arg(&hw64).arg(&c32).arg(&groups32).arg(&vec32);
        launch.arg(&splits32).arg(&silu);
        unsafe { launch.launch(cfg) }.w()?;
        Ok((CudaStorage::wrap_cuda_slice(out, dev), xl.shape().clone()))
    }

    /// The one-pass kernel (`group_norm_nhwc_resident`) over `[n, hw, c]`: a cooperative launch
    /// of `n × splits` blocks, each keeping its chunk of a sample's pixels in shared memory.
    fn run_resident<T: DeviceRepr>(
        &self,
        (dev, suffix): (&CudaDevice, &'static str),
        geo: &NhwcGeometry,
        [n, hw, c]: [usize; 3],
        (xs, added, ws, bs): (&CudaView<T>, &AddedArg<T>, &CudaView<T>, &CudaView<T>),
    ) -> Result<CudaSlice<T>> {
        let func = kernel(dev, &format!("group_norm_nhwc_resident_{suffix}"))?;
        let pixel_bytes = c * std::mem::size_of::<T>();
        let key = (dev.id(), suffix, n, hw, pixel_bytes, geo.threads);
        let split = remembered(&RESIDENT_SPLITS, key, || {
            resident_split(dev, &func, n, hw, pixel_bytes, geo.threads)
        })?;
        let Some((splits, kept)) = split else {
            candle_core::bail!("one-pass group norm: [{n}, {hw}, {c}] is more than the GPU holds")
        };
        let groups = self.norm.groups;
        // SAFETY: every block writes its chunk's moments before the barrier lets any block
        // read them, and every output element.
        let partial = unsafe { dev.alloc::<f32>(n * groups * splits * 3)? };
        let arrived = dev.alloc_zeros::<u32>(n)?;
        let out = unsafe { dev.alloc::<T>(n * hw * c)? };
        let cfg = LaunchConfig {
            grid_dim: (n as u32, splits as u32, 1),
            block_dim: (geo.threads as u32, 1, 1),
            shared_mem_bytes: kept as u32,
        };
        let (hw64, c32, groups32) = (hw as i64, c as i32, groups as i32);
        let (vec32, splits32) = (geo.vec as i32, splits as i32);
        let (eps, silu) = (self.norm.eps, self.norm.silu as i32);
        let mut launch = func.builder();
        launch.arg(xs);
        added.push(&mut launch);
        launch.arg(&out).arg(&partial).arg(&arrived).arg(ws).arg(bs);
        launch.arg(&hw64).arg(&c32).arg(&groups32).arg(&vec32);
        launch.arg(&splits32).arg(&eps).arg(&silu);
        // SAFETY: the argument list matches the kernel's signature. A cooperative launch
        // fails rather than start more blocks than can be resident together, so the barrier
        // never waits on a block that cannot start.
        unsafe { launch.launch_cooperative(cfg) }.w()?;
        Ok(out)
    }
}

/// A kernel's `added` argument: the term's device pointer, or null where there is none.
struct AddedArg<'a, 'b, T>(Option<&'a CudaView<'b, T>>);

impl<T: DeviceRepr> AddedArg<'_, '_, T> {
    fn push<'s>(&'s self, launch: &mut cudarc::driver::LaunchArgs<'s>) {
        const NULL: u64 = 0;
        match self.0 {
            Some(view) => launch.arg(view),
            None => launch.arg(&NULL),
        };
    }
}

/// The chunks per sample that let all `n × splits` blocks of the one-pass kernel be resident
/// at once (`threads` each, keeping `pixel_bytes` of shared memory per pixel of their chunk),
/// and the bytes each block keeps; `None` where the map is larger than the GPU's shared memory
/// holds. Four blocks per SM down to one are tried: more blocks hide more of the loads' latency.
fn resident_split(
    dev: &CudaDevice,
    func: &Kernel,
    n: usize,
    hw: usize,
    pixel_bytes: usize,
    threads: usize,
) -> Result<Option<(usize, usize)>> {
    use cudarc::driver::sys::{CUdevice_attribute as Device, CUfunction_attribute as Func};
    let ctx = dev.cuda_stream().context().clone();
    let sms = ctx
        .attribute(Device::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT)
        .w()? as usize;
    let most = ctx
        .attribute(Device::CU_DEVICE_ATTRIBUTE_MAX_SHARED_MEMORY_PER_BLOCK_OPTIN)
        .w()?
        - func.shared_size_bytes().w()?;
    // Allowed as much as the device lets a block have; each launch asks for what it keeps.
    func.set_attribute(Func::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES, most)
        .w()?;
    for per_sm in (1..=4).rev() {
        let splits = (sms * per_sm / n).min(hw);
        let bytes = hw.div_ceil(splits.max(1)) * pixel_bytes;
        if splits == 0 || bytes > most as usize {
            continue;
        }
        let resident = func
            .occupancy_max_active_blocks_per_multiprocessor(threads as u32, bytes, None)
            .w()?;
        if resident as usize >= per_sm {
            return Ok(Some((splits, bytes)));
        }
    }
    Ok(None)
}

/// How the channels-last kernels cut `[N, C, H, W]`: each thread `vec` channels of one group
/// (loaded and stored as one vector of up to 16 bytes), C / vec of them side by side for each
/// of a block's pixel rows, a sample's pixels in `splits` chunks.
struct NhwcGeometry {
    vec: usize,
    threads: usize,
    splits: usize,
}

impl NhwcGeometry {
    /// `None` where the kernels do not apply (over 128 groups, a group too wide, a row of
    /// lanes that makes no whole warps). `offsets`: where `x`, the weight, the bias (and an
    /// added term) start in their buffers (elements), which `vec` must divide for the vector
    /// loads.
    fn new(dims: &[usize], groups: usize, offsets: &[usize]) -> Option<NhwcGeometry> {
        let [_, c, h, w] = *dims else { return None };
        let cpg = c / groups;
        let vec = [8, 4, 2, 1]
            .into_iter()
            .find(|v| cpg.is_multiple_of(*v) && offsets.iter().all(|o| o.is_multiple_of(*v)))?;
        let lanes = c / vec;
        if groups > 128 || lanes > 1024 {
            return None;
        }
        // About 512 threads a block, in whole warps.
        let rows = (512 / lanes).max(1);
        if (lanes * rows) % 32 != 0 {
            return None;
        }
        // About 8K elements a block: several blocks per SM at SD's 64² maps, to hide latency.
        let splits = (h * w * c).div_ceil(8_192).clamp(1, (h * w).clamp(1, 512));
        Some(NhwcGeometry {
            vec,
            threads: lanes * rows,
            splits,
        })
    }
}

/// The input gradient of [`group_norm`] (SiLU after it on request) for training: `x` the
/// layer's input, `grad` its output's gradient. Three passes (the forward's statistics, then
/// two over each group) instead of two dozen candle ops, most of them launch-bound.
#[allow(clippy::too_many_arguments)]
pub fn group_norm_input_grad(
    x: &Tensor,
    grad: &Tensor,
    weight: &Tensor,
    bias: &Tensor,
    groups: usize,
    eps: f64,
    silu: bool,
) -> Result<Option<Tensor>> {
    let dtype_ok = matches!(x.dtype(), DType::F16 | DType::F32);
    let same = [grad, weight, bias].iter().all(|t| t.dtype() == x.dtype());
    if !applies(x) || !applies(grad) || !dtype_ok || !same || x.rank() < 3 {
        return Ok(None);
    }
    let channels = x.dim(1)?;
    let fits = groups > 0 && channels % groups == 0 && weight.elem_count() == channels;
    if !fits || grad.dims() != x.dims() || bias.elem_count() != channels {
        return Ok(None);
    }
    let op = GroupNormGradOp {
        norm: GroupNormOp {
            groups,
            eps: eps as f32,
            silu,
        },
        weight: weight.contiguous()?,
        bias: bias.contiguous()?,
    };
    x.contiguous()?
        .apply_op2_no_bwd(&grad.contiguous()?, &op)
        .map(Some)
}

struct GroupNormGradOp {
    norm: GroupNormOp,
    weight: Tensor,
    bias: Tensor,
}

impl GroupNormGradOp {
    fn run<T: DeviceRepr + candle_core::cuda_backend::CudaDType>(
        &self,
        (x, xl): (&CudaStorage, &Layout),
        (g, gl): (&CudaStorage, &Layout),
    ) -> Result<(CudaStorage, Shape)> {
        let suffix = suffix(x.dtype())?;
        let (w_storage, wl) = self.weight.storage_and_layout();
        let (b_storage, bl) = self.bias.storage_and_layout();
        let (candle_core::Storage::Cuda(w), candle_core::Storage::Cuda(b)) =
            (&*w_storage, &*b_storage)
        else {
            candle_core::bail!("group-norm gradient: weights not on the GPU")
        };
        let groups = self.norm.groups;
        let geo = GroupGeometry::new(xl.dims(), groups);
        let dev = x.device().clone();
        let xs = x.as_cuda_slice::<T>()?.slice(xl.start_offset()..);
        let gs = g.as_cuda_slice::<T>()?.slice(gl.start_offset()..);
        let ws = w.as_cuda_slice::<T>()?.slice(wl.start_offset()..);
        let bs = b.as_cuda_slice::<T>()?.slice(bl.start_offset()..);
        let partial = geo.moments(&dev, suffix, &xs)?;
        // SAFETY: each pass writes every element of its output before the next reads it.
        let sums = unsafe { dev.alloc::<f32>(geo.blocks * geo.splits * 2)? };
        let dx = unsafe { dev.alloc::<T>(xl.shape().elem_count())? };
        let cfg = geo.launch_config();
        let (len64, splits32) = (geo.len as i64, geo.splits as i32);
        let (hw64, cpg32, groups32) = (geo.hw as i64, geo.cpg as i32, groups as i32);
        let (eps, silu) = (self.norm.eps, self.norm.silu as i32);
        let func = |name: &str| kernel(&dev, &format!("{name}_{suffix}"));
        let sum = func("group_norm_grad_sums")?;
        let mut launch = sum.builder();
        launch
            .arg(&xs)
            .arg(&gs)
            .arg(&partial)
            .arg(&ws)
            .arg(&bs)
            .arg(&sums);
        launch
            .arg(&len64)
            .arg(&splits32)
            .arg(&hw64)
            .arg(&cpg32)
            .arg(&groups32);
        launch.arg(&eps).arg(&silu);
        // SAFETY: argument lists match the kernels' signatures.
        unsafe { launch.launch(cfg) }.w()?;
        let apply = func("group_norm_grad_apply")?;
        let mut launch = apply.builder();
        launch
            .arg(&xs)
            .arg(&gs)
            .arg(&partial)
            .arg(&sums)
            .arg(&ws)
            .arg(&bs)
            .arg(&dx);
        launch
            .arg(&len64)
            .arg(&splits32)
            .arg(&hw64)
            .arg(&cpg32)
            .arg(&groups32);
        launch.arg(&eps).arg(&silu);
        unsafe { launch.launch(cfg) }.w()?;
        Ok((CudaStorage::wrap_cuda_slice(dx, dev), xl.shape().clone()))
    }
}

/// `torch.nn.LayerNorm` over the last axis (`weight`, `bias` `[D]`, `eps`), fp16 or fp32: a warp
/// per row holding it in registers; `None` where the rows do not fit that kernel (see
/// [`layer_norm_chunks`]), an operand does not start at a whole vector, or, per shape, the
/// kernel did not match candle's or was not faster (checked once, as the other choices are).
pub fn layer_norm(x: &Tensor, weight: &Tensor, bias: &Tensor, eps: f64) -> Result<Option<Tensor>> {
    let dtype_ok = matches!(x.dtype(), DType::F16 | DType::F32);
    let same = [weight, bias]
        .iter()
        .all(|t| t.dtype() == x.dtype() && applies(t));
    let d = x.dims().last().copied().unwrap_or(0);
    if !applies(x) || !dtype_ok || !same || weight.dims() != [d] || bias.dims() != [d] {
        return Ok(None);
    }
    let vec = 16 / x.dtype().size_in_bytes();
    let Some(chunks) = layer_norm_chunks(d, vec) else {
        return Ok(None);
    };
    let (x, weight, bias) = (x.contiguous()?, weight.contiguous()?, bias.contiguous()?);
    let offsets = [&x, &weight, &bias].map(|t| t.layout().start_offset());
    if offsets.iter().any(|o| o % vec != 0) {
        return Ok(None);
    }
    let op = LayerNormOp {
        eps: eps as f32,
        chunks,
    };
    let candle_core::Device::Cuda(dev) = x.device() else {
        return Ok(None);
    };
    let ours = || x.apply_op3_no_bwd(&weight, &bias, &op);
    let key = (dev.id(), x.dtype(), x.dims().to_vec());
    let faster = remembered(&LAYER_NORM_CHOICE, key, || {
        replaces("layer norm kernel", &[x.dims()], x.device(), &ours, &|| {
            candle_nn::ops::layer_norm(&x, &weight, &bias, eps as f32)
        })
    })?;
    faster.then(ours).transpose()
}

/// The vectors of `vec` elements each lane of a warp holds for a row of `cols` (1, 2, 4 or 8,
/// the kernel's instances), or `None` where `vec` does not divide `cols` or a row needs more.
fn layer_norm_chunks(cols: usize, vec: usize) -> Option<usize> {
    if cols == 0 || !cols.is_multiple_of(vec) {
        return None;
    }
    let chunks = (cols / vec).div_ceil(32);
    [1, 2, 4, 8].into_iter().find(|&c| c >= chunks)
}

struct LayerNormOp {
    eps: f32,
    chunks: usize,
}

impl LayerNormOp {
    fn run<T: DeviceRepr + candle_core::cuda_backend::CudaDType>(
        &self,
        (x, xl): (&CudaStorage, &Layout),
        (w, wl): (&CudaStorage, &Layout),
        (b, bl): (&CudaStorage, &Layout),
    ) -> Result<(CudaStorage, Shape)> {
        let n = xl.shape().elem_count();
        let cols = xl.dims()[xl.dims().len() - 1];
        let rows = n / cols;
        let dev = x.device().clone();
        let xs = x.as_cuda_slice::<T>()?.slice(xl.start_offset()..);
        let ws = w.as_cuda_slice::<T>()?.slice(wl.start_offset()..);
        let bs = b.as_cuda_slice::<T>()?.slice(bl.start_offset()..);
        // SAFETY: the kernel writes every row.
        let y = unsafe { dev.alloc::<T>(n)? };
        let func = kernel(&dev, &format!("layer_norm_{}", suffix(x.dtype())?))?;
        let (rows64, cols32, chunks32) = (rows as i64, cols as i32, self.chunks as i32);
        let mut launch = func.builder();
        launch.arg(&xs).arg(&y).arg(&ws).arg(&bs);
        launch
            .arg(&rows64)
            .arg(&cols32)
            .arg(&chunks32)
            .arg(&self.eps);
        // Four warps (rows) a block.
        let cfg = LaunchConfig {
            grid_dim: (rows.div_ceil(4) as u32, 1, 1),
            block_dim: (128, 1, 1),
            shared_mem_bytes: 0,
        };
        // SAFETY: argument list matches the kernel's signature; offsets checked by the caller.
        unsafe { launch.launch(cfg) }.w()?;
        Ok((CudaStorage::wrap_cuda_slice(y, dev), xl.shape().clone()))
    }
}

/// The input gradient of a layer norm over the last axis (`weight` `[D]`, `eps`) given
/// `grad`, that of its output: a warp per row, in one kernel.
pub fn layer_norm_input_grad(
    x: &Tensor,
    grad: &Tensor,
    weight: &Tensor,
    eps: f64,
) -> Result<Option<Tensor>> {
    let dtype_ok = matches!(x.dtype(), DType::F16 | DType::F32);
    let same = [grad, weight]
        .iter()
        .all(|t| t.dtype() == x.dtype() && applies(t));
    let d = x.dims().last().copied().unwrap_or(0);
    let fits = d > 0 && grad.dims() == x.dims() && weight.dims() == [d];
    if !applies(x) || !dtype_ok || !same || !fits || x.elem_count() >= (1 << 31) {
        return Ok(None);
    }
    let op = LayerNormGradOp { eps: eps as f32 };
    x.contiguous()?
        .apply_op3_no_bwd(&grad.contiguous()?, &weight.contiguous()?, &op)
        .map(Some)
}

struct LayerNormGradOp {
    eps: f32,
}

impl LayerNormGradOp {
    fn run<T: DeviceRepr + candle_core::cuda_backend::CudaDType>(
        &self,
        (x, xl): (&CudaStorage, &Layout),
        (g, gl): (&CudaStorage, &Layout),
        (w, wl): (&CudaStorage, &Layout),
    ) -> Result<(CudaStorage, Shape)> {
        let n = xl.shape().elem_count();
        let d = xl.dims()[xl.dims().len() - 1];
        let rows = n / d;
        let dev = x.device().clone();
        let xs = x.as_cuda_slice::<T>()?.slice(xl.start_offset()..);
        let gs = g.as_cuda_slice::<T>()?.slice(gl.start_offset()..);
        let ws = w.as_cuda_slice::<T>()?.slice(wl.start_offset()..);
        // SAFETY: the kernel writes every row.
        let dx = unsafe { dev.alloc::<T>(n)? };
        let func = kernel(&dev, &format!("layer_norm_grad_{}", suffix(x.dtype())?))?;
        let (rows32, d32) = (rows as u32, d as u32);
        let mut launch = func.builder();
        launch.arg(&xs).arg(&gs).arg(&ws).arg(&dx);
        launch.arg(&rows32).arg(&d32).arg(&self.eps);
        // Eight warps a block, a warp per row (the kernel strides over any rows beyond).
        let cfg = LaunchConfig {
            grid_dim: (rows.div_ceil(8).min(65_535) as u32, 1, 1),
            block_dim: (256, 1, 1),
            shared_mem_bytes: 0,
        };
        // SAFETY: argument list matches the kernel's signature.
        unsafe { launch.launch(cfg) }.w()?;
        Ok((CudaStorage::wrap_cuda_slice(dx, dev), xl.shape().clone()))
    }
}

cuda_op!(LayerNormOp, "layer-norm", run(x, y, z) [F16 => f16, F32 => f32]);
cuda_op!(LayerNormGradOp, "layer-norm-input-grad", run(x, y, z) [F16 => f16, F32 => f32]);
cuda_op!(GroupNormOp, "group-norm", run(x, y, z) [F16 => f16, F32 => f32]);
cuda_op!(GroupNormNhwcOp, "group-norm-nhwc", run(x, y, z) [F16 => f16, F32 => f32]);
cuda_op!(GroupNormGradOp, "group-norm-input-grad", run(x, y) [F16 => f16, F32 => f32]);

#[cfg(test)]
mod tests {
    use super::{layer_norm_chunks, NhwcGeometry};

    #[test]
    fn a_layer_norm_row_takes_the_fewest_chunks_that_hold_it() {
        // fp16 (8 a vector): SD1.5's widths, CLIP's 768, SDXL's 1280 and 2048.
        for (cols, chunks) in [(320, 2), (640, 4), (768, 4), (1280, 8), (2048, 8), (256, 1)] {
            assert_eq!(layer_norm_chunks(cols, 8), Some(chunks), "{cols}");
        }
        // Wider rows, or widths that are not whole vectors, are left to candle.
        assert_eq!(layer_norm_chunks(2056, 8), None);
        assert_eq!(layer_norm_chunks(1284, 8), None);
        assert_eq!(layer_norm_chunks(0, 8), None);
        // fp32 (4 a vector) holds up to 1024.
        assert_eq!(layer_norm_chunks(1024, 4), Some(8));
        assert_eq!(layer_norm_chunks(1280, 4), None);
    }

    #[test]
    fn each_thread_takes_the_widest_vector_its_group_and_offsets_allow() {
        let geometry =
            |c: usize, offsets: &[usize]| NhwcGeometry::new(&[2, c, 64, 64], 32, offsets);
        // SD's widths at 32 groups: 10, 20 and 40 channels a group.
        for (c, vec) in [(320, 2), (640, 4), (1280, 8)] {
            let g = geometry(c, &[0; 3]).expect("a channels-last geometry");
            assert_eq!(g.vec, vec, "{c} channels");
            assert_eq!(g.threads % (c / vec), 0, "whole rows of lanes");
            assert_eq!(g.threads % 32, 0, "whole warps");
        }
        // An operand starting at an odd element takes scalar loads: 1280 lanes are too many
        // for one block, so that map has no channels-last geometry at all.
        assert_eq!(geometry(320, &[0, 1, 0]).map(|g| g.vec), Some(1));
        // An added term at an offset of 2 halves the widest vector of 640 channels.
        assert_eq!(geometry(640, &[0, 0, 0, 2]).map(|g| g.vec), Some(2));
        assert!(geometry(1280, &[3, 0, 0]).is_none());
        assert_eq!(geometry(1280, &[4, 0, 0]).map(|g| g.vec), Some(4));
    }

    #[test]
    fn chunks_cover_a_sample_in_about_8k_elements_each() {
        let g = NhwcGeometry::new(&[2, 320, 64, 64], 32, &[0; 3]).expect("geometry");
        assert_eq!(g.splits, (64 * 64 * 320usize).div_ceil(8_192));
        // The VAE's 512² maps hit the cap of 512 chunks a sample.
        let g = NhwcGeometry::new(&[1, 128, 512, 512], 32, &[0; 3]).expect("geometry");
        assert_eq!(g.splits, 512);
    }
}
