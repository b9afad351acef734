//! Device, precision and memory-mode flags shared by the commands that run networks.

use candle_core::{DType, Device};
use sdkube_pipeline::VramMode;

#[derive(clap::Args, Debug, Clone)]
pub struct DeviceArgs {
    /// `cpu`, `cuda`, `cuda:N`, or `auto` (the first GPU if there is one).
    #[arg(long, env = "SDKUBE_DEVICE", default_value = "auto")]
    pub device: String,
    /// fp16, bf16, fp32, or auto (fp16 on GPU, fp32 on CPU).
    #[arg(long, env = "SDKUBE_PRECISION", default_value = "auto")]
    pub precision: String,
    /// `low` keeps only the network in use on the GPU; `high` keeps all resident.
    #[arg(long, env = "SDKUBE_VRAM", value_enum, default_value = "high")]
    pub vram: Vram,
}

#[derive(clap::ValueEnum, Debug, Clone, Copy)]
pub enum Vram {
    High,
    Low,
}

impl From<Vram> for VramMode {
    fn from(v: Vram) -> Self {
        match v {
            Vram::High => VramMode::High,
            Vram::Low => VramMode::Low,
        }
    }
}

pub struct Precision;

impl Precision {
    pub fn label(dtype: DType) -> &'static str {
        match dtype {
            DType::F16 => "fp16",
            DType::BF16 => "bf16",
            _ => "fp32",
        }
    }
}

impl DeviceArgs {
    pub fn resolve(&self) -> anyhow::Result<(Device, DType)> {
        let device = device_named(&self.device)?;
        let dtype = precision_named(&self.precision, device.is_cpu())?;
        Ok((device, dtype))
    }
}

/// `cpu`, `cuda`, `cuda:N`, or `auto` (the first GPU if there is one).
pub fn device_named(name: &str) -> anyhow::Result<Device> {
    Ok(match name {
        "cpu" => Device::Cpu,
        // A CUDA build on a machine (or in a pod) without a usable GPU runs on the CPU: candle's
        // `cuda_if_available` only asks whether the build has CUDA.
        "auto" => Device::new_cuda(0).unwrap_or(Device::Cpu),
        "cuda" => Device::new_cuda(0)?,
        other => match other
            .strip_prefix("cuda:")
            .and_then(|n| n.parse::<usize>().ok())
        {
            Some(n) => Device::new_cuda(n)?,
            None => anyhow::bail!("unknown device {other:?}: use cpu, cuda, cuda:N or auto"),
        },
    })
}

/// `fp16`, `bf16`, `fp32` (or `half`, `full`), or `auto`: fp16 on GPU, fp32 on CPU.
pub fn precision_named(name: &str, on_cpu: bool) -> anyhow::Result<DType> {
    let dtype = match (name, on_cpu) {
        ("auto", true) | ("fp32", _) | ("full", _) => DType::F32,
        ("auto", false) | ("fp16", _) | ("half", _) => DType::F16,
        ("bf16", _) => DType::BF16,
        (other, _) => {
            anyhow::bail!("unknown precision {other:?}: use fp16, bf16, fp32 or auto")
        }
    };
    if on_cpu && dtype == DType::BF16 {
        anyhow::bail!(
            "bf16 is not available on the CPU (no CPU bf16 matrix multiply); use fp32 or fp16"
        );
    }
    if on_cpu && dtype == DType::F16 {
        tracing::warn!(
            "fp16 on the CPU is slow and not what the reference does; fp32 is the default there"
        );
    }
    Ok(dtype)
}
