# Sourced by the GPU scripts: the CUDA and cuDNN libraries of the GPU machine's Python wheels on
# the library path (NV, CUDNN: their folders), and `unpack_builds`, which decompresses each carried
# `.gpu/*.xz` build beside itself where that is not done yet (carried paths are size-limited).
NV=$(python3 -c "import nvidia,os;print(os.path.join(list(nvidia.__path__)[0],'cu13','lib'))" 2>/dev/null)
CUDNN=$(python3 -c "import nvidia,os;print(os.path.join(list(nvidia.__path__)[0],'cudnn','lib'))" 2>/dev/null)
export LD_LIBRARY_PATH=$NV:$CUDNN:/usr/local/nvidia/lib64:${LD_LIBRARY_PATH:-}

unpack_builds() {
  local xz bin
  for xz in .gpu/*.xz; do
    [ -f "$xz" ] || continue
    bin=${xz%.xz}
    [ -x "$bin" ] || { python3 -c "import lzma,shutil,sys; shutil.copyfileobj(lzma.open(sys.argv[1]), open(sys.argv[2],'wb'))" "$xz" "$bin"; chmod +x "$bin"; }
  done
}
