"""How long the CUDA driver takes to compile candle's kernel modules from PTX at first use (what
a process with an empty CUDA JIT cache pays), one module after another and all at once, against
loading the same modules as machine code.

    CUDA_CACHE_DISABLE=1 python3 benches/gpu_jit_modules.py DIR

DIR holds NAME.ptx files (candle-kernels' OUT_DIR of a CUDA build) and, optionally, NAME.*.cubin
or NAME.fatbin files made from them. Prints one JSON line per measurement."""
import ctypes
import glob
import json
import os
import sys
import threading
import time

cuda = ctypes.CDLL("libcuda.so.1")


def check(code, what):
    if code:
        raise SystemExit(f"{what}: CUDA error {code}")


check(cuda.cuInit(0), "cuInit")
device = ctypes.c_int()
check(cuda.cuDeviceGet(ctypes.byref(device), 0), "cuDeviceGet")
context = ctypes.c_void_p()
check(cuda.cuDevicePrimaryCtxRetain(ctypes.byref(context), device), "cuDevicePrimaryCtxRetain")


def load_seconds(path):
    """Loads one module image (PTX text is NUL-terminated, as cuModuleLoadData wants) and unloads it."""
    check(cuda.cuCtxSetCurrent(context), "cuCtxSetCurrent")
    data = open(path, "rb").read()
    if path.endswith(".ptx"):
        data += b"\0"
    image = ctypes.create_string_buffer(data, len(data))
    module = ctypes.c_void_p()
    start = time.perf_counter()
    check(cuda.cuModuleLoadData(ctypes.byref(module), image), path)
    seconds = time.perf_counter() - start
    cuda.cuModuleUnload(module)
    return seconds


def report(**row):
    print(json.dumps({"bench": "jit", **row}), flush=True)


directory = sys.argv[1]
report(cache_disabled=os.environ.get("CUDA_CACHE_DISABLE") == "1")
ptx = sorted(glob.glob(os.path.join(directory, "*.ptx")), key=os.path.getsize, reverse=True)
machine_code = sorted(glob.glob(os.path.join(directory, "*.cubin")) + glob.glob(os.path.join(directory, "*.fatbin")))
for kind, paths in (("ptx", ptx), ("machine code", machine_code)):
    total = 0.0
    for path in paths:
        seconds = load_seconds(path)
        total += seconds
        report(kind=kind, module=os.path.basename(path), bytes=os.path.getsize(path), seconds=round(seconds, 3))
    report(kind=kind, one_after_another_s=round(total, 3))
    times = {}
    threads = [threading.Thread(target=lambda p=p: times.__setitem__(p, load_seconds(p))) for p in paths]
    start = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    report(kind=kind, all_at_once_s=round(time.perf_counter() - start, 3), threads=len(paths),
           slowest=os.path.basename(max(times, key=times.get)) if times else None)
