#!/usr/bin/env bash
# The CUDA image's binary and library set on a real GPU, in two steps:
#
#   scripts/gpu-image-check.sh prepare   here, after scripts/build-images.sh cuda: copies the
#       image's /usr/local/bin/sdkube (stripped) into .gpu/image/sdkube.xz, the image's own
#       loader, glibc, libstdc++, libgcc and zlib into .gpu/image/sys.tar.xz (the binary needs
#       trixie's glibc 2.41; the GPU machine's may be older), and the names of the image's
#       CUDA libraries into .gpu/image/libs.txt (.gpu is git-ignored: carry it)
#   scripts/gpu-image-check.sh           on the GPU machine (python3 with NVIDIA's CUDA 13
#       wheels, e.g. torch's; no network): a folder holding exactly the image's libraries,
#       linked from those wheels, and the image's system libraries are the library path, as in
#       the image (the driver's libcuda.so.1 comes from the machine, as the container toolkit
#       mounts it); the binary runs under the image's loader: `ldd` (ld.so --list), a short
#       real generation on fixtures/sd/sd1 with --device cuda in fp16 and fp32 (which CUDA
#       libraries get opened is logged), and `sdkube doctor --local`.
#       Results go to $OUT (or ./gpu-image-check) as well as to the terminal.
# The wheels there are torch's pins, not necessarily the image's (cuda-requirements.txt):
# same sonames and CUDA major version, possibly other minor versions; both are printed.
set -euo pipefail
cd "$(dirname "$0")/.."
dir=.gpu/image

if [ "${1:-}" = prepare ]; then
  image=${IMAGE:-ghcr.io/sdkube/sdkube:$(sed -n 's/^appVersion: *"\{0,1\}\([^"]*\)"\{0,1\}$/\1/p' deploy/helm/sdkube/Chart.yaml)}
  mkdir -p "$dir"
  id=$(podman create "$image")
  trap 'podman rm "$id" >/dev/null' EXIT
  podman cp "$id:/usr/local/bin/sdkube" "$dir/sdkube"
  podman run --rm --entrypoint ls "$image" /usr/local/lib/sdkube-cuda >"$dir/libs.txt"
  rm -rf "$dir/sys" && mkdir -p "$dir/sys"
  # tar -h: the files behind the sonames
  podman run --rm --entrypoint tar "$image" -chf - -C /lib/x86_64-linux-gnu ld-linux-x86-64.so.2 \
    libc.so.6 libm.so.6 libdl.so.2 libpthread.so.0 librt.so.1 libstdc++.so.6 libgcc_s.so.1 libz.so.1 |
    tar -xf - -C "$dir/sys"
  tar -C "$dir" -cJf "$dir/sys.tar.xz" sys && rm -rf "$dir/sys"
  rm -f "$dir/sdkube.xz" && xz -T0 -6 "$dir/sdkube"
  cp deploy/docker/cuda-requirements.txt "$dir/"
  ls -l "$dir"
  exit 0
fi

out=${OUT:-gpu-image-check}
mkdir -p "$out"
exec > >(tee "$out/report.txt") 2>&1
[ -f "$dir/sdkube.xz" ] || { echo "no $dir/sdkube.xz: run '$0 prepare' where the image was built" >&2; exit 2; }
work=$(mktemp -d)
xz -dc "$dir/sdkube.xz" >"$work/sdkube" && chmod +x "$work/sdkube"
tar -C "$work" -xJf "$dir/sys.tar.xz"
site=$(python3 -c 'import nvidia, os; print(os.path.dirname(list(nvidia.__path__)[0]))')
mkdir -p "$work/lib"
missing=0
while read -r lib; do
  # the same soname from the wheels; NVRTC's builtins carry the minor version in their name
  pattern=$lib
  case $lib in libnvrtc-builtins.so.*) pattern="libnvrtc-builtins.so.13*" ;; esac
  found=$(find "$site/nvidia" -name "$pattern" ! -name '*.alt.*' | sort | tail -n 1)
  if [ -z "$found" ]; then echo "MISSING in the wheels: $lib"; missing=1; continue; fi
  ln -s "$found" "$work/lib/$(basename "$found")"
done <"$dir/libs.txt"
echo "== image's library set, linked from the wheels"
ls -l "$work/lib" | awk 'NR > 1 {print $9, $10, $11}'
python3 -m pip list 2>/dev/null | grep -iE '^(nvidia-(cuda-runtime|cublas|curand|cuda-nvrtc|cudnn)|torch) ' || true
echo "== image's pins"; grep -v '^#' "$dir/cuda-requirements.txt" | cut -d' ' -f1
# the driver's libcuda.so.1 stays where the machine keeps it
driver=${CUDA_DRIVER_DIR:+$CUDA_DRIVER_DIR/libcuda.so.1}
[ -n "$driver" ] || driver=$(ldconfig -p | awk '/libcuda\.so\.1 /{print $NF; exit}')
[ -n "$driver" ] || driver=$(ls /usr/local/nvidia/lib64/libcuda.so.1 2>/dev/null || true)
echo "== driver: ${driver:-not found}"
path=$work/lib:$work/sys${driver:+:$(dirname "$driver")}
# the binary under the image's own loader and glibc, with the image's library path
sdkube() { "$work/sys/ld-linux-x86-64.so.2" --library-path "$path" "$work/sdkube" "$@"; }
echo "== ldd (the image's loader)"
"$work/sys/ld-linux-x86-64.so.2" --list --library-path "$path" "$work/sdkube" | tee "$out/ldd.txt"
status=0
if grep -q 'not found' "$out/ldd.txt"; then echo "FAIL: unresolved libraries"; status=1; fi
if grep -E 'lib(cudart|cublas|cublasLt|curand|nvrtc|cudnn)\.' "$out/ldd.txt" | grep -v "=> $work/lib/" | grep -q .; then
  echo "FAIL: a CUDA library resolved outside the image's set"; status=1
fi

echo "== generate on the GPU (fixtures/sd/sd1, 64x64, 8 steps, fp16 and fp32)"
for precision in fp16 fp32; do
  LD_DEBUG=libs LD_DEBUG_OUTPUT="$out/ld-$precision" sdkube generate --model fixtures/sd/sd1 \
    --device cuda --precision "$precision" --prompt "a lighthouse at dusk" --steps 8 --seed 21 \
    --width 64 --height 64 --out "$out/gen-$precision" || { echo "FAIL: generate $precision"; status=1; }
  ls -l "$out/gen-$precision" 2>/dev/null || true
done
echo "== libraries opened during the fp16 run (CUDA ones must all be in the image's set)"
cat "$out"/ld-fp16.* 2>/dev/null | sed -n 's/.*calling init: \(.*\)$/\1/p' | sort -u >"$out/opened.txt"
grep -E 'cud|cublas|curand|nvrtc' "$out/opened.txt" || true
while read -r opened; do
  case $(basename "$opened") in
    libcuda.so*|libnvidia*) ;;
    libcud*|libcublas*|libcurand*|libnvrtc*)
      case $opened in "$work/lib/"*) ;; *) echo "FAIL: opened outside the set: $opened"; status=1 ;; esac ;;
  esac
done <"$out/opened.txt"
rm -f "$out"/ld-fp*.*

echo "== doctor --local"
sdkube doctor --local --store "$work/store" || true
[ "$missing" = 0 ] || status=1
echo "== result: $([ "$status" = 0 ] && echo PASS || echo FAIL)"
exit "$status"
