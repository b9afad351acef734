//! With feature `cuda`, compiles `src/cuda/kernels.cu` with nvcc (from `NVCC`, `CUDA_ROOT/bin`
//! or PATH) into a fatbin: machine code for every GPU generation from `CUDA_COMPUTE_CAP`
//! (default 80) up, and PTX of `CUDA_COMPUTE_CAP` for GPUs newer than those. Machine code loads
//! as it is; PTX is compiled by the driver when a process first loads it, which a freshly
//! scheduled pod pays on its first image.
//!
//! It also compiles candle's own kernel modules (candle-kernels' sources, found through
//! Cargo.lock in Cargo's registry or at `CANDLE_KERNELS_SRC`) into machine code for the same
//! GPUs: candle ships them as PTX only, which the driver took 18 s to compile in every new
//! process on an H100. `src/cuda/candle_machine_code.rs` loads these instead.
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
    println!("cargo:rerun-if-env-changed=CANDLE_KERNELS_SRC");
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
    cmd.args(["--fatbin", "-O3", "-std=c++17"])
        .args(machine_code_targets(cap))
        .arg(format!("-gencode=arch=compute_{cap},code=compute_{cap}"));
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
    candle_machine_code(&nvcc, cap, &out.with_file_name("candle"));
}

/// nvcc's targets for machine code of each of [`MACHINE_CODE`] from `cap` up.
fn machine_code_targets(cap: u32) -> impl Iterator<Item = String> {
    MACHINE_CODE
        .into_iter()
        .filter(move |&sm| sm >= cap)
        .map(|sm| format!("-gencode=arch=compute_{sm},code=sm_{sm}"))
}

/// The candle-kernels modules whose PTX candle-core loads (the quantized one is left out: no
/// network here uses it).
const CANDLE_MODULES: [&str; 10] = [
    "affine", "binary", "cast", "conv", "fill", "indexing", "reduce", "sort", "ternary", "unary",
];

/// `dir/NAME.fatbin` for each of [`CANDLE_MODULES`]: machine code only (where a GPU has none,
/// candle's PTX is loaded as before), with the flags candle-kernels compiles them with. Where
/// the sources are not found the files are empty and candle's PTX is what loads.
fn candle_machine_code(nvcc: &str, cap: u32, dir: &std::path::Path) {
    std::fs::create_dir_all(dir).unwrap();
    let Some(src) = candle_kernels_src() else {
        println!(
            "cargo:warning=candle-kernels' sources not found (set CANDLE_KERNELS_SRC): candle's \
             kernels stay PTX, compiled by the driver in each new process"
        );
        for name in CANDLE_MODULES {
            std::fs::write(dir.join(format!("{name}.fatbin")), b"").unwrap();
        }
        return;
    };
    println!("cargo:rerun-if-changed={}", src.display());
    let children: Vec<_> = CANDLE_MODULES
        .into_iter()
        .map(|name| {
            let child = Command::new(nvcc)
                .args(["--fatbin", "-O3", "-std=c++17", "--expt-relaxed-constexpr"])
                .args(["--default-stream", "per-thread"])
                .args(machine_code_targets(cap))
                .arg("-o")
                .arg(dir.join(format!("{name}.fatbin")))
                .arg(src.join(format!("{name}.cu")))
                .spawn()
                .unwrap_or_else(|e| panic!("feature cuda needs nvcc ({nvcc}): {e}"));
            (name, child)
        })
        .collect();
    for (name, mut child) in children {
        let status = child.wait().unwrap();
        assert!(status.success(), "nvcc failed on candle-kernels' {name}.cu");
    }
}

/// candle-kernels' `src` folder: `CANDLE_KERNELS_SRC`, else the version Cargo.lock names, in
/// Cargo's registry.
fn candle_kernels_src() -> Option<PathBuf> {
    if let Some(dir) = std::env::var_os("CANDLE_KERNELS_SRC") {
        return Some(dir.into());
    }
    let manifest_dir = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR").unwrap());
    let lock = std::fs::read_to_string(manifest_dir.join("../../Cargo.lock")).ok()?;
    let mut lines = lock.lines();
    lines.find(|line| *line == r#"name = "candle-kernels""#)?;
    let version = lines.next()?.strip_prefix("version = ")?.trim_matches('"');
    let cargo_home = std::env::var_os("CARGO_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|home| PathBuf::from(home).join(".cargo")))?;
    std::fs::read_dir(cargo_home.join("registry/src"))
        .ok()?
        .flatten()
        .map(|index| index.path().join(format!("candle-kernels-{version}/src")))
        .find(|src| src.join("binary.cu").is_file())
}
