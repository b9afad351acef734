//! With feature `cuda`, compiles `src/cuda/kernels.cu` to PTX with nvcc (from `NVCC`,
//! `CUDA_ROOT/bin` or PATH) for `CUDA_COMPUTE_CAP` (default 80; the driver JIT-compiles it for
//! newer GPUs).
use std::path::PathBuf;
use std::process::Command;

fn main() {
    println!("cargo:rerun-if-changed=src/cuda/kernels.cu");
    println!("cargo:rerun-if-env-changed=CUDA_COMPUTE_CAP");
    println!("cargo:rerun-if-env-changed=NVCC");
    if std::env::var_os("CARGO_FEATURE_CUDA").is_none() {
        return;
    }
    let out = PathBuf::from(std::env::var("OUT_DIR").unwrap()).join("kernels.ptx");
    let nvcc = std::env::var("NVCC").unwrap_or_else(|_| match std::env::var("CUDA_ROOT") {
        Ok(root) => format!("{root}/bin/nvcc"),
        Err(_) => "nvcc".into(),
    });
    let cap = std::env::var("CUDA_COMPUTE_CAP").unwrap_or_else(|_| "80".into());
    let status = Command::new(&nvcc)
        .args(["--ptx", "-O3", "-std=c++17"])
        .arg(format!("-arch=compute_{cap}"))
        .arg("-o")
        .arg(&out)
        .arg("src/cuda/kernels.cu")
        .status()
        .unwrap_or_else(|e| panic!("feature cuda needs nvcc ({nvcc}): {e}"));
    assert!(status.success(), "nvcc failed on src/cuda/kernels.cu");
}
