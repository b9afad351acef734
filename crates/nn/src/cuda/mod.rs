//! The GPU path's own kernels, where candle 0.11's are slow (a per-op profile of the UNet put
//! most of its time in convolution, linear layers, attention and group norm): convolution
//! through cuDNN with its plan made once per shape and one reused workspace ([`conv2d`]),
//! linear layers through cuBLASLt with the bias in the epilogue ([`linear`]), flash attention
//! ([`flash_attention`]), group norm (+ SiLU) in two fused passes ([`group_norm`]) and its
//! input gradient, a bias add, the GEGLU gate, leaky ReLU and nearest ×2 upsampling
//! (`kernels.cu`); many host tensors to the GPU through pinned buffers ([`upload`]); and the
//! memory pool's high-water marks for benchmarks ([`memory_high_water`]).
//!
//! The GPU build links libcudnn (9.x), as candle's `cudnn` feature would: the CUDA cuDNN
//! runtime image has it, and so does PyTorch's `nvidia-cudnn-cu13` wheel.
//!
//! Each entry point returns `None` where it does not apply (not on CUDA, a dtype or shape it
//! does not cover, gradients being tracked: none of these has a backward pass) and the caller
//! runs candle's op instead. `SDKUBE_GPU_KERNELS=candle` turns them all off, for A/B runs.
//! None of this is compiled without feature `cuda`; its checks run on the device
//! (`benches/gpu_run.sh`: stages `check` and `ops`), as CI has no GPU.
//!
//! Each op is a candle custom op whose CPU entry is an error and whose CUDA entry dispatches
//! on the element type: [`cuda_op!`] writes that shell once for all of them.

mod attention;
mod attention_grad;
mod candle_machine_code;
mod choice;
mod conv;
mod cudnn_attention;
mod cudnn_backend;
mod cudnn_graph;
mod elementwise;
pub(crate) mod graph;
mod linear;
mod memory;
mod norm;
mod restore_ops;
mod upload;

use candle_core::cuda_backend::{cudarc, CudaDevice, DeviceId, WrapErr};
use candle_core::{CpuStorage, DType, Result, Shape, Tensor};
use cudarc::driver::{LaunchConfig, PushKernelArg};

use crate::switch::Switch;

pub use attention::flash_attention;
pub use attention_grad::{sdpa_backward, sdpa_forward_for_grad, SavedSdpa};
pub use conv::{conv2d, conv2d_add, conv2d_cudnn, conv2d_input_grad};
pub use elementwise::{
    add_bias, geglu, geglu_grad, leaky_relu, softmax_grad, upsample_bilinear_2x,
    upsample_nearest_2x,
};
pub use linear::linear;
pub use memory::memory_high_water;
pub use norm::{group_norm, group_norm_input_grad, layer_norm, layer_norm_input_grad};
pub use restore_ops::noise_leaky_relu;
pub use upload::{upload, upload_from_file};

/// `kernels.cu` as built by `build.rs`: machine code for each GPU generation, PTX beyond.
const FATBIN: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/kernels.fatbin"));
/// The same as PTX text, loaded where a driver refuses [`FATBIN`].
const PTX: &str = include_str!(concat!(env!("OUT_DIR"), "/kernels.ptx"));

/// One of our kernels, ready to launch on candle's stream of its device.
struct Kernel {
    func: cudarc::driver::CudaFunction,
    stream: std::sync::Arc<cudarc::driver::CudaStream>,
}

impl Kernel {
    fn builder(&self) -> cudarc::driver::LaunchArgs<'_> {
        self.stream.launch_builder(&self.func)
    }
}

impl std::ops::Deref for Kernel {
    type Target = cudarc::driver::CudaFunction;

    fn deref(&self) -> &Self::Target {
        &self.func
    }
}

/// What one device has of our kernels: whether it can run them, and once the first is
/// launched, their module and each function looked up so far (a launch then takes a map
/// lookup, not a driver call).
struct DeviceKernels {
    /// Our kernels use sm_80 instructions (tensor-core `mma.sync` m16n8k16, `cp.async`), which
    /// a Turing GPU (a T4, sm_75) cannot load; candle's ops run there.
    ampere_or_newer: bool,
    module: Option<std::sync::Arc<cudarc::driver::CudaModule>>,
    functions: std::collections::HashMap<String, cudarc::driver::CudaFunction>,
}

impl DeviceKernels {
    fn new(dev: &CudaDevice) -> Self {
        use cudarc::driver::sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR;
        let context = dev.cuda_stream().context().clone();
        let major = context
            .attribute(CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR)
            .unwrap_or(0);
        if major < 8 {
            tracing::warn!(
                major,
                "GPU older than Ampere: sdkube's own kernels are off, candle's run"
            );
        }
        Self {
            ampere_or_newer: major >= 8,
            module: None,
            functions: Default::default(),
        }
    }

    /// The function `name` of [`FATBIN`], loading the module the first time. (candle's own
    /// loader takes PTX text only, which the driver would compile in every new process.)
    fn function(&mut self, dev: &CudaDevice, name: &str) -> Result<cudarc::driver::CudaFunction> {
        if let Some(func) = self.functions.get(name) {
            return Ok(func.clone());
        }
        let module = match &self.module {
            Some(module) => module.clone(),
            None => {
                let context = dev.cuda_stream().context().clone();
                let image = cudarc::nvrtc::Ptx::from_binary(FATBIN.to_vec());
                let module = match context.load_module(image) {
                    Ok(module) => module,
                    Err(error) => {
                        tracing::warn!(%error, "kernels' machine code refused: loading their PTX");
                        context.load_module(cudarc::nvrtc::Ptx::from_src(PTX)).w()?
                    }
                };
                self.module.insert(module).clone()
            }
        };
        let func = module.load_function(name).w()?;
        self.functions.insert(name.to_string(), func.clone());
        Ok(func)
    }
}

/// `f` on `dev`'s [`DeviceKernels`], made the first time.
fn with_kernels<R>(dev: &CudaDevice, f: impl FnOnce(&mut DeviceKernels) -> R) -> Result<R> {
    use std::collections::HashMap;
    use std::sync::Mutex;
    static DEVICES: Mutex<Option<HashMap<DeviceId, DeviceKernels>>> = Mutex::new(None);
    let mut devices = DEVICES
        .lock()
        .map_err(|_| candle_core::Error::Msg("kernel modules: poisoned lock".into()))?;
    let kernels = devices
        .get_or_insert_with(HashMap::new)
        .entry(dev.id())
        .or_insert_with(|| DeviceKernels::new(dev));
    Ok(f(kernels))
}

/// The kernel `name` of [`FATBIN`], ready to launch on `dev`.
fn kernel(dev: &CudaDevice, name: &str) -> Result<Kernel> {
    Ok(Kernel {
        func: with_kernels(dev, |k| k.function(dev, name))??,
        stream: dev.cuda_stream(),
    })
}

/// Whether our kernels run at all: `SDKUBE_GPU_KERNELS=candle` turns them off (A/B runs).
static OUR_KERNELS: Switch = Switch::new("SDKUBE_GPU_KERNELS", "sdkube", "candle", true);

fn enabled() -> bool {
    OUR_KERNELS.is_on()
}

fn applies(t: &Tensor) -> bool {
    let candle_core::Device::Cuda(dev) = t.device() else {
        return false;
    };
    enabled() && !t.track_op() && with_kernels(dev, |k| k.ampere_or_newer).unwrap_or(false)
}

/// Queues [`hold_stream`](kernels.cu) on `dev`'s stream for `ns` nanoseconds; nothing where
/// our kernels do not run (switched off, or a GPU older than Ampere).
fn hold_stream(dev: &CudaDevice, ns: u64) -> Result<()> {
    if !enabled() || !with_kernels(dev, |k| k.ampere_or_newer)? {
        return Ok(());
    }
    let func = kernel(dev, "hold_stream")?;
    let mut launch = func.builder();
    launch.arg(&ns);
    let one = LaunchConfig {
        grid_dim: (1, 1, 1),
        block_dim: (1, 1, 1),
        shared_mem_bytes: 0,
    };
    // SAFETY: the kernel takes one u64 and touches no memory.
    unsafe { launch.launch(one) }.w()?;
    Ok(())
}

fn cpu_only(name: &str) -> Result<(CpuStorage, Shape)> {
    candle_core::bail!("{name} runs only on CUDA tensors")
}

/// The kernel name suffix of an element type (`geglu_f16`, `group_norm_apply_f32`, …).
fn suffix(dtype: DType) -> Result<&'static str> {
    match dtype {
        DType::F16 => Ok("f16"),
        DType::F32 => Ok("f32"),
        other => candle_core::bail!("no {other:?} kernel"),
    }
}

/// One thread per element, 256 to a block.
fn launch_1d(elements: usize) -> LaunchConfig {
    LaunchConfig {
        grid_dim: (elements.div_ceil(256).min(65_535 * 16) as u32, 1, 1),
        block_dim: (256, 1, 1),
        shared_mem_bytes: 0,
    }
}

/// Implements candle's custom-op trait for an op that runs only on CUDA: the CPU entry is an
/// error, the CUDA entry hands its operands as `(storage, layout)` pairs to `$method`, once for
/// each listed element type (`$method::<T>`, chosen by the first operand's dtype; any other
/// dtype is an error), or directly when the list is empty (the method dispatches itself).
///
/// - `cuda_op!(Op, "name", run(x) [F16 => f16, F32 => f32])`: `CustomOp1`;
/// - `run(x, y)`, `run(x, y, z)`: `CustomOp2`, `CustomOp3`;
/// - `run(x, w, bias?)`: an op with an optional bias. Candle's custom ops have a fixed number
///   of operands, so it is a `CustomOp2` without the bias and a `CustomOp3` ("name-bias") with
///   it, both calling `$method(x, w, Option<bias>)`.
macro_rules! cuda_op {
    (@call $self:ident, $name:expr, $method:ident, $first:expr, [], $args:tt) => {
        $self.$method $args
    };
    (@call $self:ident, $name:expr, $method:ident, $first:expr,
     [$($dtype:ident => $t:ty),+], $args:tt) => {
        match candle_core::backend::BackendStorage::dtype($first) {
            $(candle_core::DType::$dtype => $self.$method::<$t> $args,)+
            dtype => candle_core::bail!("{}: no {dtype:?} support", $name),
        }
    };
    ($op:ty, $name:literal, $method:ident(x) $types:tt) => {
        impl candle_core::CustomOp1 for $op {
            fn name(&self) -> &'static str {
                $name
            }

            fn cpu_fwd(
                &self,
                _: &candle_core::CpuStorage,
                _: &candle_core::Layout,
            ) -> candle_core::Result<(candle_core::CpuStorage, candle_core::Shape)> {
                $crate::cuda::cpu_only($name)
            }

            fn cuda_fwd(
                &self,
                x: &candle_core::CudaStorage,
                xl: &candle_core::Layout,
            ) -> candle_core::Result<(candle_core::CudaStorage, candle_core::Shape)> {
                $crate::cuda::cuda_op!(@call self, $name, $method, x, $types, ((x, xl)))
            }
        }
    };
    ($op:ty, $name:literal, $method:ident(x, y) $types:tt) => {
        impl candle_core::CustomOp2 for $op {
            fn name(&self) -> &'static str {
                $name
            }

            fn cpu_fwd(
                &self,
                _: &candle_core::CpuStorage,
                _: &candle_core::Layout,
                _: &candle_core::CpuStorage,
                _: &candle_core::Layout,
            ) -> candle_core::Result<(candle_core::CpuStorage, candle_core::Shape)> {
                $crate::cuda::cpu_only($name)
            }

            fn cuda_fwd(
                &self,
                x: &candle_core::CudaStorage,
                xl: &candle_core::Layout,
                y: &candle_core::CudaStorage,
                yl: &candle_core::Layout,
            ) -> candle_core::Result<(candle_core::CudaStorage, candle_core::Shape)> {
                $crate::cuda::cuda_op!(@call self, $name, $method, x, $types, ((x, xl), (y, yl)))
            }
        }
    };
    ($op:ty, $name:literal, $method:ident(x, y, z) $types:tt) => {
        impl candle_core::CustomOp3 for $op {
            fn name(&self) -> &'static str {
                $name
            }

            fn cpu_fwd(
                &self,
                _: &candle_core::CpuStorage,
                _: &candle_core::Layout,
                _: &candle_core::CpuStorage,
                _: &candle_core::Layout,
                _: &candle_core::CpuStorage,
                _: &candle_core::Layout,
            ) -> candle_core::Result<(candle_core::CpuStorage, candle_core::Shape)> {
                $crate::cuda::cpu_only($name)
            }

            #[allow(clippy::too_many_arguments)]
            fn cuda_fwd(
                &self,
                x: &candle_core::CudaStorage,
                xl: &candle_core::Layout,
                y: &candle_core::CudaStorage,
                yl: &candle_core::Layout,
                z: &candle_core::CudaStorage,
                zl: &candle_core::Layout,
            ) -> candle_core::Result<(candle_core::CudaStorage, candle_core::Shape)> {
                $crate::cuda::cuda_op!(@call self, $name, $method, x, $types, ((x, xl), (y, yl), (z, zl)))
            }
        }
    };
    ($op:ty, $name:literal, $method:ident(x, w, bias?) $types:tt) => {
        impl candle_core::CustomOp2 for $op {
            fn name(&self) -> &'static str {
                $name
            }

            fn cpu_fwd(
                &self,
                _: &candle_core::CpuStorage,
                _: &candle_core::Layout,
                _: &candle_core::CpuStorage,
                _: &candle_core::Layout,
            ) -> candle_core::Result<(candle_core::CpuStorage, candle_core::Shape)> {
                $crate::cuda::cpu_only($name)
            }

            fn cuda_fwd(
                &self,
                x: &candle_core::CudaStorage,
                xl: &candle_core::Layout,
                w: &candle_core::CudaStorage,
                wl: &candle_core::Layout,
            ) -> candle_core::Result<(candle_core::CudaStorage, candle_core::Shape)> {
                $crate::cuda::cuda_op!(@call self, $name, $method, x, $types, ((x, xl), (w, wl), None))
            }
        }

        impl candle_core::CustomOp3 for $op {
            fn name(&self) -> &'static str {
                concat!($name, "-bias")
            }

            fn cpu_fwd(
                &self,
                _: &candle_core::CpuStorage,
                _: &candle_core::Layout,
                _: &candle_core::CpuStorage,
                _: &candle_core::Layout,
                _: &candle_core::CpuStorage,
                _: &candle_core::Layout,
            ) -> candle_core::Result<(candle_core::CpuStorage, candle_core::Shape)> {
                $crate::cuda::cpu_only($name)
            }

            #[allow(clippy::too_many_arguments)]
            fn cuda_fwd(
                &self,
                x: &candle_core::CudaStorage,
                xl: &candle_core::Layout,
                w: &candle_core::CudaStorage,
                wl: &candle_core::Layout,
                b: &candle_core::CudaStorage,
                bl: &candle_core::Layout,
            ) -> candle_core::Result<(candle_core::CudaStorage, candle_core::Shape)> {
                $crate::cuda::cuda_op!(@call self, $name, $method, x, $types, ((x, xl), (w, wl), Some((b, bl))))
            }
        }
    };
}
pub(crate) use cuda_op;
