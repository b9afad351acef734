"""A real sdkube cluster on loopback for the scale-out tests: Debian's redis-server, `sdkube
serve --role api` and `--role worker` processes of the binary cargo built, with the tiny
fixture model, and a client that spreads its requests over the API replicas (what a
Kubernetes Service does)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
FIXTURE_MODEL = REPO / "fixtures" / "sd" / "sd1"


def binary() -> Path:
    """SDKUBE_BIN, else the debug build of this checkout."""
    if os.environ.get("SDKUBE_BIN"):
        return Path(os.environ["SDKUBE_BIN"])
    target = Path(os.environ.get("CARGO_TARGET_DIR", REPO / "target"))
    return target / "debug" / "sdkube"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(what: str, check, timeout: float = 60.0, every: float = 0.05):
    """Polls `check` until it returns something truthy; fails naming `what`."""
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        try:
            last = check()
            if last:
                return last
        except (OSError, urllib.error.URLError, ValueError) as e:
            last = e
        time.sleep(every)
    raise AssertionError(f"timed out waiting for {what}: last {last!r}")


def call(method: str, url: str, body=None, timeout: float = 120.0):
    """(status, parsed JSON or text) of one HTTP request."""
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, method=method,
                                 headers={"content-type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            status, text = r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        status, text = e.code, e.read().decode()
    try:
        return status, json.loads(text)
    except ValueError:
        return status, text


class Redis:
    """Debian's redis-server on a free port, with the append-only file the chart's bundled
    Redis uses (fsync every second)."""

    def __init__(self, workdir: Path):
        self.dir = workdir / "redis"
        self.dir.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.proc = None
        self.start()

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}"

    def start(self):
        self.proc = subprocess.Popen(
            [os.environ.get("REDIS_SERVER", "redis-server"), "--port", str(self.port), "--bind", "127.0.0.1", "--dir", str(self.dir),
             "--appendonly", "yes", "--appendfsync", "everysec", "--save", ""],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_for("redis", lambda: self.cli("PING") == "PONG", timeout=10)

    def cli(self, *args: str) -> str:
        """One command, answered as text (RESP spoken here: redis-cli may not be installed)."""
        with socket.create_connection(("127.0.0.1", self.port), timeout=10) as s:
            s.sendall(b"".join([f"*{len(args)}\r\n".encode()] +
                               [f"${len(a)}\r\n{a}\r\n".encode() for a in args]))
            reply = s.recv(65536).decode(errors="replace")
        return reply[1:].strip() if reply[:1] in "+-:" else reply.strip()

    def kill(self):
        """A crash: SIGKILL, no shutdown save."""
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)

    def stop(self):
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(10)


class Sdkube:
    """One `sdkube serve` process."""

    def __init__(self, workdir: Path, name: str, role: str, queue: str, *extra: str,
                 env: dict | None = None, model: Path = FIXTURE_MODEL, device: str = "cpu"):
        self.name = name
        self.role = role
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self.log_path = workdir / f"{name}.log"
        data = workdir / name
        args = [str(binary()), "serve", "--role", role, "--queue", queue,
                "--model", str(model), "--listen", f"127.0.0.1:{self.port}",
                "--store", str(data / "models"), "--outputs", str(data / "outputs"),
                "--embeddings", str(data / "embeddings"), "--training", str(data / "training"),
                "--max-size", "2048", "--max-steps", "2000", *extra]
        if role != "api":
            args += ["--device", device]
        self.log = open(self.log_path, "wb")
        self.proc = subprocess.Popen(args, stdout=self.log, stderr=subprocess.STDOUT,
                                     env={**os.environ, "RUST_LOG": "info", **(env or {})})

    @property
    def pid(self) -> int:
        return self.proc.pid

    def url(self, path: str) -> str:
        return self.base + path

    def get(self, path: str, timeout: float = 30.0):
        return call("GET", self.url(path), timeout=timeout)

    def post(self, path: str, body=None, timeout: float = 120.0):
        return call("POST", self.url(path), body if body is not None else {}, timeout=timeout)

    def wait_ready(self, timeout: float = 60.0):
        def ready():
            if self.proc.poll() is not None:
                raise AssertionError(f"{self.name} exited: {self.log_path.read_text()[-2000:]}")
            return self.get("/readyz", timeout=5)[0] == 200
        wait_for(f"{self.name} ready", ready, timeout=timeout)
        return self

    def metric(self, line_prefix: str) -> float:
        """Sum of the samples whose line starts with `line_prefix`."""
        _, text = self.get("/metrics")
        return sum(float(l.rsplit(" ", 1)[1]) for l in str(text).splitlines()
                   if l.startswith(line_prefix))

    def signal(self, sig):
        self.proc.send_signal(sig)

    def stop(self, timeout: float = 30.0):
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self.log.close()

    def logs(self) -> str:
        return self.log_path.read_text(errors="replace")


class Cluster:
    """Redis, `apis` API replicas and `workers` workers; `client(i)` is the API replica the
    i-th request goes to (round robin)."""

    def __init__(self, apis: int = 2, workers: int = 3, worker_args=(), api_args=(),
                 worker_env: dict | None = None, **process):
        self.dir = Path(tempfile.mkdtemp(prefix="sdkube-cluster-"))
        self.redis = Redis(self.dir)
        self.worker_args = list(worker_args)
        self.worker_env = worker_env
        self.process = process  # model=, device= for every process
        self.apis = [Sdkube(self.dir, f"api{i}", "api", self.redis.url, *api_args, **process)
                     for i in range(apis)]
        self.workers: list[Sdkube] = []
        for _ in range(workers):
            self.add_worker()
        for p in self.apis + self.workers:
            p.wait_ready()
        self._next = 0
        self._lock = threading.Lock()

    def add_worker(self, *extra: str, device: str | None = None) -> Sdkube:
        """A worker process; `device` overrides the cluster's (one GPU per worker)."""
        process = {**self.process, **({"device": device} if device else {})}
        w = Sdkube(self.dir, f"worker{len(self.workers)}", "worker", self.redis.url,
                   "--visibility-timeout", "3", *self.worker_args, *extra, env=self.worker_env,
                   **process)
        self.workers.append(w)
        return w

    def api(self) -> Sdkube:
        with self._lock:
            a = self.apis[self._next % len(self.apis)]
            self._next += 1
        return a

    def worker_of(self, job: dict) -> Sdkube:
        """The worker process a job record names (`host/pid/device`)."""
        pid = int(job["worker"].split("/")[1])
        return next(w for w in self.workers if w.pid == pid)

    def close(self):
        for p in self.apis + self.workers:
            p.stop(timeout=10)
        self.redis.stop()
        shutil.rmtree(self.dir, ignore_errors=True)


def txt2img(seed: int, steps: int = 6, size: int = 64, **extra) -> dict:
    return {"prompt": f"a red cube number {seed % 7}", "negative_prompt": "blurry",
            "steps": steps, "width": size, "height": size, "seed": seed,
            "sampler_name": "Euler a", "cfg_scale": 6.5, **extra}


def wait_job(api: Sdkube, job_id: str, timeout: float = 120.0) -> dict:
    def finished():
        _, job = api.get(f"/api/v1/jobs/{job_id}")
        return job if job.get("state") in ("succeeded", "failed", "cancelled") else None
    return wait_for(f"job {job_id}", finished, timeout=timeout, every=0.1)
