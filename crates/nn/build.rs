//! With feature `cuda`, compiles `src/cuda/kernels.cu` with nvcc (from `NVCC`, `CUDA_ROOT/bin`
//! or PATH) into a fatbin: machine code for every GPU generation from `CUDA_COMPUTE_CAP`
//! (default 80) up, and PTX of `CUDA_COMPUTE_CAP` for GPUs newer than those. Machine code loads
//! as it is; PTX is compiled by the driver when a process first loads it, which a freshly
//! scheduled pod pays on its first image.
use std::path::PathBuf;
use std::process::Command;

/// The GPU generations given machine code: Ampere through Blackwell (the flash-attention kernel
/// uses sm_80 instructions, so no machine code for Turing's sm_75).
const MACHINE_CODE: [u32; 6] = [80, 86, 89, 90, 100, 120];

fn main() {
    println!("cargo:rerun-if-changed=src/cuda/kernels.cu");
    println!("cargo:rerun-if-changed=src/cuda/norm_kernels.cuh");
    println!("cargo:rerun-if-changed=src/cuda/restore_kernels.cuh");
    println!("cargo:rerun-if-changed=src/cuda/backward_kernels.cuh");
    println!("cargo:rerun-if-env-changed=CUDA_COMPUTE_CAP");
    println!("cargo:rerun-if-env-changed=NVCC");
    if std::env::var_os("CARGO_FEATURE_CUDA").is_none() {
        return;
    }
    let out = PathBuf::from(std::env::var("OUT_DIR").unwrap()).join("kernels.fatbin");
    let nvcc = std::env::var("NVCC").unwrap_or_else(|_| match std::env::var("CUDA_ROOT") {
        Ok(root) => format!("{root}/bin/nvcc"),
        Err(_) => "nvcc".into(),
    });
    let cap: u32 = std::env::var("CUDA_COMPUTE_CAP")
        .unwrap_or_else(|_| "80".into())
        .parse()
        .expect("CUDA_COMPUTE_CAP is a number such as 80");
    let mut cmd = Command::new(&nvcc);
    cmd.args(["--fatbin", "-O3", "-std=c++17"]);
    for sm in MACHINE_CODE.into_iter().filter(|&sm| sm >= cap) {
        cmd.arg(format!("-gencode=arch=compute_{sm},code=sm_{sm}"));
    }
    cmd.arg(format!("-gencode=arch=compute_{cap},code=compute_{cap}"));
    let status = cmd
        .arg("-o")
        .arg(&out)
        .arg("src/cuda/kernels.cu")
        .status()
        .unwrap_or_else(|e| panic!("feature cuda needs nvcc ({nvcc}): {e}"));
    assert!(status.success(), "nvcc failed on src/cuda/kernels.cu");
    // The same as PTX text alone: what is loaded if a driver refuses the fatbin.
    let status = Command::new(&nvcc)
        .args(["--ptx", "-O3", "-std=c++17"])
        .arg(format!("-arch=compute_{cap}"))
        .arg("-o")
        .arg(out.with_extension("ptx"))
        .arg("src/cuda/kernels.cu")
        .status()
        .unwrap_or_else(|e| panic!("feature cuda needs nvcc ({nvcc}): {e}"));
    assert!(status.success(), "nvcc failed on src/cuda/kernels.cu");
}
