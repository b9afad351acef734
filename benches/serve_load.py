"""Load on a running `sdkube serve`: N txt2img requests through A1111's API with C at a time.
Prints one JSON line: wall time, images/s, mean latency, how many device batches the server ran
(from /metrics, so that batching of concurrent requests shows), and the p50/p99 latency of
`/sdapi/v1/progress` polled all along (what UIs and bots poll while they wait).
Usage: python3 benches/serve_load.py URL SIZE STEPS REQUESTS CONCURRENCY"""
import json
import sys
import threading
import time
import urllib.request

url, size, steps, n, conc = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])


def post(i, out):
    body = json.dumps({"prompt": f"a lighthouse at dusk {i}", "steps": steps, "width": size,
                       "height": size, "seed": i, "sampler_name": "Euler"}).encode()
    req = urllib.request.Request(url + "/sdapi/v1/txt2img", body, {"content-type": "application/json"})
    t = time.perf_counter()
    with urllib.request.urlopen(req, timeout=3600) as r:
        assert r.status == 200, r.status
        assert len(json.loads(r.read())["images"]) == 1
    out.append(time.perf_counter() - t)


def metric(name):
    text = urllib.request.urlopen(url + "/metrics").read().decode()
    return sum(float(l.split()[-1]) for l in text.splitlines() if l.startswith(name))


post(-1, [])  # warm-up
jobs_before = metric("sdkube_step_seconds_count")
lat, todo, lock = [], list(range(n)), threading.Lock()


def worker():
    while True:
        with lock:
            if not todo:
                return
            i = todo.pop()
        post(i, lat)


polls, polling = [], threading.Event()


def poller():
    while not polling.is_set():
        t = time.perf_counter()
        urllib.request.urlopen(url + "/sdapi/v1/progress?skip_current_image=false").read()
        polls.append(time.perf_counter() - t)
        time.sleep(0.05)


poll_thread = threading.Thread(target=poller)
poll_thread.start()
start = time.perf_counter()
threads = [threading.Thread(target=worker) for _ in range(conc)]
for t in threads:
    t.start()
for t in threads:
    t.join()
wall = time.perf_counter() - start
polling.set()
poll_thread.join()
polls.sort()
pct = lambda q: round(polls[min(len(polls) - 1, int(q * len(polls)))] * 1e3, 1)  # noqa: E731
steps_run = metric("sdkube_step_seconds_count") - jobs_before
print(json.dumps({"bench": "serve txt2img", "size": size, "steps": steps, "requests": n, "concurrency": conc,
                  "wall_s": round(wall, 2), "images_per_s": round(n / wall, 3),
                  "mean_latency_s": round(sum(lat) / len(lat), 2),
                  # each device batch records steps-1 step intervals
                  "device_batches": round(steps_run / max(steps - 1, 1), 1),
                  "progress_polls": len(polls), "progress_p50_ms": pct(0.5), "progress_p99_ms": pct(0.99)}), flush=True)
