"""Scale-out benchmark: the real binary, Debian's redis-server, loopback.

  throughput  N txt2img requests from C concurrent A1111 clients, spread over the API
              replicas, with 1, 2 and 3 workers: images/s and the ratio to one worker.
  latency     one client, one request at a time, one worker: `--role all` (in-memory queue)
              against `--role api` + `--role worker` behind Redis: p50/p99 per job, i.e. what
              the shared queue costs.

Prints one JSON line per measurement. Defaults fit the tiny fixture model on CPU workers with
a fixed number of threads each (RAYON_NUM_THREADS), so that workers do not fight over the
cores and the scaling shows; with `--device cuda --model DIR` the same on a GPU.

  python3 benches/scale_out.py [--bin target/release/sdkube] [--what throughput,latency]
      [--workers 1,2,3] [--threads 1] [--requests 48] [--clients 8] [--steps 10] [--size 64]
      [--latency-requests 100] [--device cpu] [--model fixtures/sd/sd1]
Env: REDIS_SERVER (default redis-server on PATH).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "python"))
from cluster import FIXTURE_MODEL, Cluster, Sdkube, txt2img  # noqa: E402


def percentile(values: list[float], p: float) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, round(p / 100 * (len(s) - 1)))]


def load(apis: list[Sdkube], requests: list[dict], clients: int) -> tuple[float, list[float]]:
    """Sends every request from `clients` threads, round robin over `apis`; (seconds, latencies)."""
    todo = list(enumerate(requests))
    lock = threading.Lock()
    latencies: list[float] = []

    def client():
        while True:
            with lock:
                if not todo:
                    return
                i, r = todo.pop(0)
            t = time.perf_counter()
            status, body = apis[i % len(apis)].post("/sdapi/v1/txt2img", r, timeout=3600)
            assert status == 200, body
            with lock:
                latencies.append(time.perf_counter() - t)

    start = time.perf_counter()
    threads = [threading.Thread(target=client) for _ in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return time.perf_counter() - start, latencies


def throughput(args, base_rate: dict):
    for n in args.workers:
        c = Cluster(apis=2, workers=n, worker_env={"RAYON_NUM_THREADS": str(args.threads)},
                    model=args.model, device=args.device)
        try:
            reqs = [txt2img(5000 + i, steps=args.steps, size=args.size) for i in range(args.requests)]
            load(c.apis, reqs[: args.clients], args.clients)  # warm-up: every worker loaded
            seconds, lat = load(c.apis, reqs, args.clients)
            rate = len(reqs) / seconds
            base_rate.setdefault("rate", rate)
            batches = sum(w.metric("sdkube_step_seconds_count") for w in c.workers)
            print(json.dumps({
                "what": "throughput", "workers": n, "threads_per_worker": args.threads,
                "device": args.device, "requests": len(reqs), "clients": args.clients,
                "steps": args.steps, "size": args.size, "seconds": round(seconds, 2),
                "img_per_s": round(rate, 3), "vs_one_worker": round(rate / base_rate["rate"], 2),
                "p50_s": round(percentile(lat, 50), 3), "p99_s": round(percentile(lat, 99), 3),
                "device_steps": int(batches)}), flush=True)
        finally:
            c.close()


def latency(args):
    reqs = [txt2img(7000 + i, steps=args.steps, size=args.size)
            for i in range(args.latency_requests)]
    env = {"RAYON_NUM_THREADS": str(args.threads)}
    results = {}
    # In-memory queue, one process.
    c = Cluster(apis=0, workers=0)
    try:
        single = Sdkube(c.dir, "all", "all", "memory", env=env, model=args.model,
                        device=args.device).wait_ready()
        load([single], reqs[:5], 1)
        _, results["memory"] = load([single], reqs, 1)
        single.stop()
    finally:
        c.close()
    # Shared queue: one api, one worker.
    c = Cluster(apis=1, workers=1, worker_env=env, model=args.model, device=args.device)
    try:
        load(c.apis, reqs[:5], 1)
        _, results["redis"] = load(c.apis, reqs, 1)
    finally:
        c.close()
    for queue, lat in results.items():
        print(json.dumps({
            "what": "latency", "queue": queue, "device": args.device, "requests": len(lat),
            "steps": args.steps, "size": args.size,
            "p50_ms": round(percentile(lat, 50) * 1e3, 1),
            "p99_ms": round(percentile(lat, 99) * 1e3, 1),
            "mean_ms": round(statistics.mean(lat) * 1e3, 1)}), flush=True)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--bin")
    p.add_argument("--what", default="throughput,latency")
    p.add_argument("--workers", default="1,2,3")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--requests", type=int, default=48)
    p.add_argument("--clients", type=int, default=8)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--size", type=int, default=64)
    p.add_argument("--latency-requests", type=int, default=100)
    p.add_argument("--device", default="cpu")
    p.add_argument("--model", default=str(FIXTURE_MODEL))
    args = p.parse_args()
    args.workers = [int(w) for w in args.workers.split(",")]
    if args.bin:
        os.environ["SDKUBE_BIN"] = args.bin
    what = args.what.split(",")
    if "throughput" in what:
        throughput(args, {})
    if "latency" in what:
        latency(args)


if __name__ == "__main__":
    main()
