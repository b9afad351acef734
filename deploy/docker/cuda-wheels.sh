#!/bin/sh
# The CUDA 13.0 toolchain and runtime libraries of deploy/docker/Dockerfile, from NVIDIA's
# redistributable PyPI wheels (pinned with hashes in cuda-requirements.txt) instead of the
# nvidia/cuda base images: the build needs nvcc and the libraries to link against; the
# runtime image needs only the libraries sdkube loads.
#
#   cuda-wheels.sh install        wheels into a venv at $CUDA_VENV; $CUDA_ROOT is its nvidia/cu13
#   cuda-wheels.sh link           $CUDA_LINK: unversioned names to link against (the wheels ship
#                                 sonames only) and a libcuda stub; the same stub as the
#                                 runtime's stand-in for a missing driver in $CUDA_NODRIVER
#                                 (needs cudarc's source: run after `cargo fetch`)
#   cuda-wheels.sh runtime DIR    copies the libraries sdkube loads into DIR
set -eu
CUDA_VENV=${CUDA_VENV:-/opt/cuda-venv}
CUDA_ROOT=${CUDA_ROOT:-/opt/cuda}
CUDA_LINK=${CUDA_LINK:-/opt/cuda-link}
CUDA_NODRIVER=${CUDA_NODRIVER:-/opt/sdkube-cuda/nodriver}
here=$(dirname "$0")
nvidia() { echo "$CUDA_VENV"/lib/python3*/site-packages/nvidia; }

# What sdkube (candle's cudarc with dynamic linking, and sdkube-models' cuDNN/cuBLASLt code)
# loads: linked (cudart, cuBLAS + cuBLASLt, cuRAND, NVRTC, cuDNN), plus what those load by
# name at run time: NVRTC's builtins, and the cuDNN 9 sub-libraries that the legacy
# convolution API (cudnnConvolutionForward/BackwardData) dispatches to. Not libcudnn_adv
# (RNN, multi-head attention, CTC), nor the wheels' .alt variants, nvBLAS or static archives.
CU13_LIBS="libcudart.so.13 libcublas.so.13 libcublasLt.so.13 libcurand.so.10 libnvrtc.so.13
libnvrtc-builtins.so.13.0"
CUDNN_LIBS="libcudnn.so.9 libcudnn_graph.so.9 libcudnn_ops.so.9 libcudnn_cnn.so.9
libcudnn_heuristic.so.9 libcudnn_engines_precompiled.so.9 libcudnn_engines_runtime_compiled.so.9"

# C source of a libcuda.so.1 without a driver behind it: every entry point cudarc declares
# answers CUDA_ERROR_STUB_LIBRARY (34), as NVIDIA's own stub does, and the error strings say why.
# `sdkube_no_driver` lets `sdkube doctor --local` recognise it.
stub_source() {
  cat <<'C'
const char sdkube_no_driver[] = "no NVIDIA driver in this container: libcuda.so.1 is sdkube's stand-in";
int cuGetErrorString(int e, const char **s) { (void)e; *s = sdkube_no_driver; return 0; }
int cuGetErrorName(int e, const char **s) { (void)e; *s = "CUDA_ERROR_STUB_LIBRARY"; return 0; }
C
  grep -oE '\bfn cu[A-Za-z0-9_]+' "$1" | sort -u | grep -vE '^fn cuGetError(String|Name)$' |
    sed 's/^fn \(.*\)$/int \1(void) { return 34; }/'
}

case ${1:-} in
install)
  python3 -m venv "$CUDA_VENV"
  "$CUDA_VENV/bin/pip" install --no-cache-dir --disable-pip-version-check -q --no-deps \
    --require-hashes -r "$here/cuda-requirements.txt"
  ln -sfn "$(nvidia)/cu13" "$CUDA_ROOT"
  "$CUDA_ROOT/bin/nvcc" --version | tail -n 2
  ;;
link)
  mkdir -p "$CUDA_LINK"
  for lib in $CU13_LIBS; do ln -sf "$CUDA_ROOT/lib/$lib" "$CUDA_LINK/${lib%%.so*}.so"; done
  for lib in $CUDNN_LIBS; do ln -sf "$(nvidia)/cudnn/lib/$lib" "$CUDA_LINK/${lib%%.so*}.so"; done
  # libcuda.so.1 belongs to the driver, present only on GPU nodes (the NVIDIA container toolkit
  # mounts it into the container). Link against a stub defining every driver entry point that
  # cudarc declares, with the driver's soname.
  sys=$(ls -d "${CARGO_HOME:-$HOME/.cargo}"/registry/src/*/cudarc-*/src/driver/sys/mod.rs | tail -n 1)
  stub_source "$sys" >"$CUDA_LINK/cuda_stub.c"
  gcc -shared -fPIC -Wl,-soname,libcuda.so.1 -o "$CUDA_LINK/libcuda.so" "$CUDA_LINK/cuda_stub.c"
  # The same stub is the runtime image's stand-in for a missing driver (init containers, CPU
  # nodes, `doctor --local`): without any libcuda.so.1 the binary would not start at all. Its
  # soname differs, so ldconfig never lists it as libcuda.so.1: the loader reaches it only by
  # file name in /usr/lib, the last directory it searches, after the driver's copy.
  mkdir -p "$CUDA_NODRIVER"
  gcc -shared -fPIC -Wl,-soname,libsdkube-nodriver.so -o "$CUDA_NODRIVER/libcuda.so.1" "$CUDA_LINK/cuda_stub.c"
  ;;
runtime)
  dir=${2:?runtime DIR}
  mkdir -p "$dir"
  for lib in $CU13_LIBS; do cp "$CUDA_ROOT/lib/$lib" "$dir/"; done
  for lib in $CUDNN_LIBS; do cp "$(nvidia)/cudnn/lib/$lib" "$dir/"; done
  ;;
*)
  echo "usage: $0 install | link | runtime DIR" >&2
  exit 2
  ;;
esac
