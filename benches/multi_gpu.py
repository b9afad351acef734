"""Several GPUs, with the server and 8 concurrent A1111 clients on full-size
random-weight models (written by `sdkube bench --save-model`):

  one-process  `serve --device cuda:0,cuda:1` (one worker per GPU) against `--device cuda:0`:
               throughput, p50/p99 latency, peak memory per GPU (nvidia-smi, every 100 ms)
  shared       one `--role api` and two `--role worker` processes, one per GPU, behind Redis:
               the same load, against one such worker
  kill         the same two workers, one SIGKILLed mid-load: every request must still succeed

  python3 benches/multi_gpu.py --model DIR --size 512 [--devices cuda:0,cuda:1]
      [--requests 32] [--clients 8] [--steps 20] [--what one-process,shared,kill] [--bin PATH]
Prints one JSON line per measurement. `--devices cpu,cpu --model fixtures/sd/sd1 --size 64`
runs the same on two CPU "devices" (a smoke test of the script; no GPU figures).
Env: REDIS_SERVER (default redis-server on PATH).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "python"))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from cluster import Cluster, Sdkube, txt2img, wait_for  # noqa: E402
from scale_out import load, percentile  # noqa: E402


class GpuMemory:
    """Peak memory per GPU while it runs, from nvidia-smi (empty without one)."""

    def __init__(self):
        self.peak: dict[str, int] = {}
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self.sample, daemon=True)

    def sample(self):
        while not self.stop.is_set():
            try:
                out = subprocess.run(["nvidia-smi", "--query-gpu=index,memory.used",
                                      "--format=csv,noheader,nounits"], capture_output=True,
                                     text=True, timeout=5).stdout
            except (OSError, subprocess.TimeoutExpired):
                return
            for line in out.splitlines():
                i, mib = (x.strip() for x in line.split(","))
                self.peak[f"cuda:{i}"] = max(self.peak.get(f"cuda:{i}", 0), int(mib))
            time.sleep(0.1)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *_):
        self.stop.set()
        self.thread.join(2)


def requests(args) -> list[dict]:
    return [txt2img(9000 + i, steps=args.steps, size=args.size) for i in range(args.requests)]


def measure(name: str, apis: list[Sdkube], args, extra: dict) -> dict:
    reqs = requests(args)
    load(apis, reqs[: args.clients], args.clients)  # warm-up on every worker
    with GpuMemory() as mem:
        seconds, lat = load(apis, reqs, args.clients)
    row = {"what": name, **extra, "requests": len(reqs), "clients": args.clients,
           "size": args.size, "steps": args.steps, "seconds": round(seconds, 2),
           "img_per_s": round(len(reqs) / seconds, 3),
           "p50_s": round(percentile(lat, 50), 3), "p99_s": round(percentile(lat, 99), 3),
           "peak_mib": mem.peak}
    print(json.dumps(row), flush=True)
    return row


def one_process(args, devices: list[str]):
    rows = []
    for spec in (devices[0], ",".join(devices)):
        c = Cluster(apis=0, workers=0)
        try:
            server = Sdkube(c.dir, "all", "all", "memory", model=args.model,
                            device=spec).wait_ready(timeout=600)
            rows.append(measure("one-process", [server], args, {"devices": spec}))
            server.stop()
        finally:
            c.close()
    print(json.dumps({"what": "one-process speedup",
                      "ratio": round(rows[1]["img_per_s"] / rows[0]["img_per_s"], 2)}), flush=True)
    return rows


def shared(args, devices: list[str]):
    rows = []
    for n in (1, len(devices)):
        c = Cluster(apis=1, workers=0, model=args.model)
        try:
            for d in devices[:n]:
                c.add_worker(device=d)
            for p in c.apis + c.workers:
                p.wait_ready(timeout=600)
            rows.append(measure("shared", c.apis, args, {"workers": n}))
        finally:
            c.close()
    print(json.dumps({"what": "shared speedup",
                      "ratio": round(rows[1]["img_per_s"] / rows[0]["img_per_s"], 2)}), flush=True)
    return rows


def kill(args, devices: list[str]):
    c = Cluster(apis=1, workers=0, model=args.model)
    try:
        for d in devices:
            c.add_worker(device=d)
        for p in c.apis + c.workers:
            p.wait_ready(timeout=600)
        reqs = requests(args)
        victim = c.workers[0]

        def kill_mid_job():
            def running_on_victim():
                _, jobs = c.apis[0].get("/api/v1/jobs")
                return any(j["state"] == "running" and j.get("worker")
                           and int(j["worker"].split("/")[1]) == victim.pid
                           and j["step"] > 0 for j in jobs["jobs"])
            wait_for("a job running on the victim", running_on_victim, timeout=600)
            victim.signal(signal.SIGKILL)

        killer = threading.Thread(target=kill_mid_job, daemon=True)
        killer.start()
        seconds, lat = load(c.apis, reqs, args.clients)  # asserts every answer is a 200
        killer.join(1)
        print(json.dumps({"what": "kill", "requests": len(reqs), "succeeded": len(lat),
                          "seconds": round(seconds, 2), "killed": victim.proc.poll() is not None,
                          "p99_s": round(percentile(lat, 99), 3)}), flush=True)
    finally:
        c.close()


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--bin")
    p.add_argument("--model", required=True)
    p.add_argument("--devices", default="cuda:0,cuda:1")
    p.add_argument("--size", type=int, default=512)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--requests", type=int, default=32)
    p.add_argument("--clients", type=int, default=8)
    p.add_argument("--what", default="one-process,shared,kill")
    args = p.parse_args()
    if args.bin:
        os.environ["SDKUBE_BIN"] = args.bin
    devices = args.devices.split(",")
    what = args.what.split(",")
    if "one-process" in what:
        one_process(args, devices)
    if "shared" in what:
        shared(args, devices)
    if "kill" in what:
        kill(args, devices)


if __name__ == "__main__":
    main()
