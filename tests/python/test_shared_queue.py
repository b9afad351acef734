"""Scale-out: `api` and `worker` processes of the real binary behind one real
Redis (Debian's redis-server), the fixture model, requests spread over the API replicas as a
Kubernetes Service would.

- 50 jobs from 8 concurrent clients: each done exactly once, each image byte-identical to
  the one a single `--role all` process makes for the same request and seed, compatible jobs
  still batched, work spread over the workers;
- any API replica answers any job: status, server-sent events and cancel through another
  replica than the one that took it;
- a worker killed with SIGKILL mid-job: the job completes on another one, nothing is lost;
  a worker stopped with SIGTERM hands back what it cannot finish within its grace period;
- no worker at all (scaled to zero): the API stays ready, says "waiting for a GPU worker (N
  queued)", refuses the job past the queue size with 429 on every replica; Redis killed and
  restarted: queued jobs and finished results survive (append-only file, fsync every
  second), and run once a worker starts;
- webuiapi (PyPI) against the `api` role, unchanged.
"""

from __future__ import annotations

import base64
import json
import signal
import threading
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import pytest

from cluster import Cluster, Sdkube, call, txt2img, wait_for, wait_job

FINISHED_OK = 'sdkube_jobs_finished_total{kind="txt2img",outcome="succeeded"}'


@pytest.fixture(scope="module")
def cluster():
    c = Cluster(apis=2, workers=3)
    yield c
    c.close()


def requests_50() -> list[dict]:
    """Mostly one shape (batched together), some of another size and a batch of two."""
    out = []
    for i in range(50):
        extra = {}
        if i % 10 == 3:
            extra = {"width": 32, "height": 32}
        if i % 10 == 7:
            extra = {"batch_size": 2}
        out.append(txt2img(1000 + i, **extra))
    return out


def test_fifty_jobs_from_eight_clients_each_done_once_and_identical_to_one_process(cluster):
    before = sum(w.metric(FINISHED_OK) for w in cluster.workers)
    reqs = requests_50()

    def send(r):
        return cluster.api().post("/sdapi/v1/txt2img", r)

    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(send, reqs))
    for status, body in answers:
        assert status == 200, body
    infos = [json.loads(body["info"]) for _, body in answers]
    ids = [i["sdkube_job_id"] for i in infos]
    assert len(set(ids)) == 50, "every request is its own job"
    for r, info, (_, body) in zip(reqs, infos, answers):
        assert info["seed"] == r["seed"]
        assert len(body["images"]) == r.get("batch_size", 1)

    # Exactly once: the workers together finished 50 jobs, not one more.
    after = sum(w.metric(FINISHED_OK) for w in cluster.workers)
    assert after - before == 50

    # Read back through the other replica: spread over the workers, batched where they could.
    records = [cluster.apis[1].get(f"/api/v1/jobs/{i}")[1] for i in ids]
    assert all(r["state"] == "succeeded" for r in records), records
    assert len({r["worker"] for r in records}) >= 2, "more than one worker ran jobs"
    assert max(r["batch_jobs"] for r in records) > 1, "compatible jobs shared a device batch"

    # The same requests on one process with the in-memory queue: the same bytes.
    single = Sdkube(cluster.dir, "single", "all", "memory").wait_ready()
    try:
        with ThreadPoolExecutor(4) as pool:
            alone = list(pool.map(lambda r: single.post("/sdapi/v1/txt2img", r), reqs))
    finally:
        single.stop()
    for i, ((_, shared), (status, one)) in enumerate(zip(answers, alone)):
        assert status == 200, one
        assert shared["images"] == one["images"], f"request {i}: images differ"


def sse_events(url: str, stop_after: str = "done", timeout: float = 60.0) -> list[tuple[str, dict]]:
    """The (event, data) pairs of a server-sent event stream, until `stop_after`."""
    out = []
    with urllib.request.urlopen(url, timeout=timeout) as r:
        assert r.headers["content-type"] == "text/event-stream"
        event, data = "", ""
        for raw in r:
            line = raw.decode().rstrip("\n")
            if line.startswith("event: "):
                event = line[7:]
            elif line.startswith("data: "):
                data += line[6:]
            elif line == "" and event:
                out.append((event, json.loads(data)))
                if event == stop_after:
                    return out
                event, data = "", ""
    return out


def test_any_api_replica_answers_any_job(cluster):
    a, b = cluster.apis
    status, job = a.post("/api/v1/jobs", {"kind": "txt2img", "params": txt2img(7, steps=60)})
    assert status == 202, job
    events = sse_events(b.url(f"/api/v1/jobs/{job['id']}/events"))
    kinds = [e for e, _ in events]
    assert kinds[-1] == "done" and "progress" in kinds, kinds
    steps = [d["step"] for e, d in events if e == "progress"]
    assert steps == sorted(steps), "steps only go up"
    assert any(d.get("preview", "") and d["preview"].startswith("data:image/png;base64,")
               for e, d in events if e == "progress"), "previews reach the other replica"
    done = events[-1][1]
    assert done["state"] == "succeeded" and done["step"] == 60
    # Saved into the shared gallery: listed and served by either replica.
    name = done["images"][0]["name"]
    for api in (a, b):
        _, page = api.get("/api/v1/gallery?per_page=200")
        assert name in [i["name"] for i in page["items"]]
        with urllib.request.urlopen(api.url(done["images"][0]["url"])) as r:
            assert r.read()[:8] == b"\x89PNG\r\n\x1a\n"

    # Cancel through the other replica, while it runs.
    _, long = a.post("/api/v1/jobs", {"kind": "txt2img", "params": txt2img(8, steps=900)})
    wait_for("sampling", lambda: b.get(f"/api/v1/jobs/{long['id']}")[1]["step"] > 0, timeout=60)
    status, _ = b.post(f"/api/v1/jobs/{long['id']}/cancel")
    assert status == 200
    ended = wait_job(a, long["id"])
    assert ended["state"] == "cancelled" and ended["step"] < 900, ended

    # A1111's progress on either replica shows a running job with the cluster's count.
    _, long = b.post("/api/v1/jobs", {"kind": "txt2img", "params": txt2img(9, steps=900)})
    wait_for("sampling", lambda: a.get(f"/api/v1/jobs/{long['id']}")[1]["step"] > 0, timeout=60)
    _, progress = a.get("/sdapi/v1/progress")
    assert progress["current_task"] == long["id"] and progress["progress"] > 0, progress
    assert progress["state"]["job_count"] >= 1
    status, _ = b.post("/sdapi/v1/interrupt")
    assert status == 200
    assert wait_job(a, long["id"])["state"] == "cancelled"


def test_a_worker_killed_mid_job_loses_nothing(cluster):
    a, b = cluster.apis
    _, job = a.post("/api/v1/jobs", {"kind": "txt2img", "params": txt2img(21, steps=400)})
    running = wait_for("sampling", lambda: (r := b.get(f"/api/v1/jobs/{job['id']}")[1])["step"] > 5 and r,
                       timeout=60)
    victim = cluster.worker_of(running)
    others = [a.post("/api/v1/jobs", {"kind": "txt2img", "params": txt2img(30 + i)})[1]
              for i in range(4)]
    victim.signal(signal.SIGKILL)
    victim.proc.wait(10)
    cluster.workers.remove(victim)
    done = wait_job(b, job["id"], timeout=120)
    assert done["state"] == "succeeded", done
    assert done["worker"] != running["worker"], "another worker finished it"
    assert done["step"] == 400 and len(done["images"]) == 1
    for o in others:
        assert wait_job(a, o["id"])["state"] == "succeeded"
    replacement = cluster.add_worker().wait_ready()
    assert replacement.proc.poll() is None


def test_a_worker_stopped_with_sigterm_hands_back_what_it_cannot_finish(cluster):
    a, b = cluster.apis
    stopping = cluster.add_worker("--shutdown-grace", "1").wait_ready()
    # Make it the one running the long job: the others are busy with their own long jobs.
    busy = [a.post("/api/v1/jobs", {"kind": "txt2img", "params": txt2img(40 + i, steps=300)})[1]
            for i in range(len(cluster.workers))]
    records = wait_for("every worker busy", lambda: all(
        (r := b.get(f"/api/v1/jobs/{j['id']}")[1])["state"] == "running" for j in busy) and
        [b.get(f"/api/v1/jobs/{j['id']}")[1] for j in busy], timeout=60)
    mine = next(r for r in records if cluster.worker_of(r) is stopping)
    stopping.signal(signal.SIGTERM)
    # Gone within the grace period plus a little: it did not wait for its 300 steps.
    stopping.proc.wait(15)
    cluster.workers.remove(stopping)
    assert "handing the job back" in stopping.logs()
    done = wait_job(b, mine["id"], timeout=180)
    assert done["state"] == "succeeded" and done["step"] == 300, done
    assert done["worker"] != mine["worker"]
    for j in busy:
        assert wait_job(a, j["id"], timeout=180)["state"] == "succeeded"


def test_no_worker_then_redis_crash_then_a_worker(tmp_path):
    c = Cluster(apis=2, workers=0, api_args=("--queue-size", "3"))
    try:
        a, b = c.apis
        # No worker: the API replicas stay ready and accept jobs up to the queue size.
        assert a.get("/readyz")[0] == 200
        ids = []
        for i, api in enumerate([a, b, a]):
            status, job = api.post("/api/v1/jobs", {"kind": "txt2img", "params": txt2img(60 + i)})
            assert status == 202, job
            assert job["position"] == i
            ids.append(job["id"])
        for api in (a, b):
            status, body = api.post("/api/v1/jobs", {"kind": "txt2img", "params": txt2img(70)})
            assert status == 429 and "queue is full" in body["error"], body
            status, body = api.post("/sdapi/v1/txt2img", txt2img(71), timeout=10)
            assert status == 429, body
        _, progress = b.get("/sdapi/v1/progress")
        assert progress["textinfo"] == "waiting for a GPU worker (3 queued)", progress
        _, status = a.get("/api/v1/status")
        assert status["queue"]["waiting"] == "waiting for a GPU worker (3 queued)"
        assert status["queue"]["backend"] == "redis" and status["role"] == "api"
        _, ready = a.get("/readyz")
        assert "waiting for a GPU worker" in ready["message"]

        # Redis crashes a second after the last write and comes back from its append-only
        # file: the queued jobs are still there, in order.
        time.sleep(1.5)
        c.redis.kill()
        assert a.get("/readyz")[0] == 503, "not ready while the queue is down"
        c.redis.start()
        wait_for("api ready again", lambda: a.get("/readyz")[0] == 200, timeout=30)
        for i, job_id in enumerate(ids):
            status, job = b.get(f"/api/v1/jobs/{job_id}")
            assert status == 200 and job["state"] == "queued" and job["position"] == i, job

        # A worker starts (scale from zero): the jobs run, and their results survive the
        # next crash too.
        c.add_worker().wait_ready()
        done = [wait_job(a, j) for j in ids]
        assert all(d["state"] == "succeeded" for d in done), done
        time.sleep(1.5)
        c.redis.kill()
        c.redis.start()
        wait_for("api ready again", lambda: b.get("/readyz")[0] == 200, timeout=30)
        for d in done:
            _, job = b.get(f"/api/v1/jobs/{d['id']}")
            assert job["state"] == "succeeded" and job["images"] == d["images"]
            with urllib.request.urlopen(b.url(d["images"][0]["url"])) as r:
                assert r.read()[:4] == b"\x89PNG"
        # The worker reconnected by itself and takes new jobs.
        status, body = a.post("/sdapi/v1/txt2img", txt2img(80))
        assert status == 200, body
    finally:
        c.close()


def test_webuiapi_against_the_api_role(cluster):
    webuiapi = pytest.importorskip("webuiapi")
    api = cluster.apis[0]
    client = webuiapi.WebUIApi(host="127.0.0.1", port=api.port)
    result = client.txt2img(prompt="a lighthouse", negative_prompt="fog", seed=5, steps=6,
                            width=64, height=64, sampler_name="Euler a", cfg_scale=7)
    assert result.image.size == (64, 64)
    assert result.info["seed"] == 5
    models = client.get_sd_models()
    assert any(m["model_name"] == "sd1" for m in models)
    assert client.get_options()["sd_model_checkpoint"] == "sd1"
    assert "Euler a" in [s["name"] for s in client.get_samplers()]
    # The same request again through the other replica: the same image.
    other = webuiapi.WebUIApi(host="127.0.0.1", port=cluster.apis[1].port)
    again = other.txt2img(prompt="a lighthouse", negative_prompt="fog", seed=5, steps=6,
                          width=64, height=64, sampler_name="Euler a", cfg_scale=7)
    assert again.image.tobytes() == result.image.tobytes()


def tls_redis(tmp_path, password: str):
    """redis-server speaking TLS only, with a password, its certificate from a test CA."""
    import subprocess
    from cluster import free_port
    ca_key, ca, key, csr, crt = (tmp_path / n for n in ("ca.key", "ca.pem", "r.key", "r.csr", "r.crt"))
    run = lambda *a: subprocess.run(a, check=True, capture_output=True)
    run("openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", ca_key, "-out", ca,
        "-days", "2", "-subj", "/CN=sdkube test CA")
    run("openssl", "req", "-newkey", "rsa:2048", "-nodes", "-keyout", key, "-out", csr,
        "-subj", "/CN=localhost")
    ext = tmp_path / "ext.cnf"
    ext.write_text("subjectAltName=DNS:localhost\n")
    run("openssl", "x509", "-req", "-in", csr, "-CA", ca, "-CAkey", ca_key, "-CAcreateserial",
        "-out", crt, "-days", "2", "-extfile", ext)
    port = free_port()
    proc = subprocess.Popen(["redis-server", "--port", "0", "--tls-port", str(port), "--bind",
                             "127.0.0.1", "--tls-cert-file", crt, "--tls-key-file", key,
                             "--tls-ca-cert-file", ca, "--tls-auth-clients", "no",
                             "--requirepass", password, "--save", "", "--dir", tmp_path],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return proc, port, ca


def test_tls_and_a_password_and_clear_refusals(tmp_path):
    """rediss:// with a password (a managed Redis); a wrong password or an untrusted
    certificate stops the process at start with the reason, the password never printed."""
    import subprocess
    from cluster import binary
    password = "s3cret-pw: with/@ and spaces"
    redis, port, ca = tls_redis(tmp_path, password)
    try:
        # The password apart from the URL (it need not be URL-safe), the CA as an extra bundle
        # next to the system's (what the chart passes for a private CA).
        env = {"SDKUBE_QUEUE_PASSWORD": password, "SDKUBE_CA_BUNDLE": str(ca)}
        url = f"rediss://localhost:{port}"
        api = Sdkube(tmp_path, "api", "api", url, env=env)
        worker = Sdkube(tmp_path, "worker", "worker", url, env=env)
        try:
            api.wait_ready()
            worker.wait_ready()
            status, body = api.post("/sdapi/v1/txt2img", txt2img(3))
            assert status == 200 and len(body["images"]) == 1, body
        finally:
            api.stop()
            worker.stop()
        assert password not in api.logs() and password not in worker.logs()
        url = f"rediss://:wrong@localhost:{port}"
        env = {"SSL_CERT_FILE": str(ca)}
        for bad_url, bad_env, reason in [
            (url, env, "check the password"),
            (f"rediss://localhost:{port}", {"SDKUBE_QUEUE_PASSWORD": password}, "trust its CA"),
        ]:
            out = subprocess.run([str(binary()), "serve", "--role", "api", "--queue", bad_url,
                                  "--listen", "127.0.0.1:0"], capture_output=True, text=True,
                                 timeout=60, env={**__import__("os").environ, **bad_env})
            assert out.returncode != 0
            assert "cannot reach the queue at rediss://" in out.stderr, out.stderr
            assert reason.lower() in out.stderr.lower(), out.stderr
            assert password not in out.stderr and "wrong@" not in out.stderr
    finally:
        redis.kill()


def test_loras_through_the_api_role(tmp_path):
    """The `api` replica has no LoRA folders: it lists the workers' (from their reports), checks
    tag syntax itself, and leaves names and fit to the worker, whose job then fails with 400."""
    from cluster import REPO
    loras = REPO / "fixtures" / "lora"
    c = Cluster(apis=1, workers=1, worker_args=["--lora-dirs", f"{loras / 'sd1'},{loras / 'sdxl'}"])
    try:
        api = c.apis[0]

        def listed():
            status, body = api.get("/sdapi/v1/loras")
            return body if status == 200 else None

        body = wait_for("the worker's LoRA list", listed, timeout=30, every=0.2)
        by_name = {l["name"]: l for l in body}
        assert {"kohya-sd1", "kohya-sdxl", "peft-sd1"} <= set(by_name), body
        assert by_name["kohya-sd1"]["alias"] == "kohya-sd1-alias"
        status, r = api.post("/sdapi/v1/txt2img", txt2img(3, prompt="a cube <lora:kohya-sd1:0.8>"))
        assert status == 200, r
        assert 'Lora hashes: "kohya-sd1: 8d2ab056d855"' in json.loads(r["info"])["infotexts"][0]
        status, r = api.post("/sdapi/v1/txt2img", txt2img(3, prompt="a cube <lora:kohya-sd1:x>"))
        assert status == 400 and "<lora:kohya-sd1:x>" in r["detail"], r
        status, r = api.post("/sdapi/v1/txt2img", txt2img(3, prompt="a cube <lora:nope:1>"))
        assert status == 400 and "unknown LoRA `nope`" in r["detail"], r
        status, r = api.post("/sdapi/v1/txt2img", txt2img(3, prompt="a cube <lora:kohya-sdxl:1>"))
        assert status == 400 and "kohya-sdxl.safetensors" in r["detail"], r
    finally:
        c.close()


def _disc_png_b64():
    """A 64x64 PNG with a bright disc on black (edges for canny), base64."""
    import base64
    import io
    from PIL import Image, ImageDraw
    im = Image.new("RGB", (64, 64))
    ImageDraw.Draw(im).ellipse((12, 14, 50, 52), fill=(230, 220, 200))
    buf = io.BytesIO()
    im.save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


def test_controlnet_through_the_api_role(tmp_path):
    """The `api` replica lists the workers' ControlNets (from their reports), checks units'
    preprocessors and images itself, and leaves the model to the worker."""
    from cluster import REPO
    c = Cluster(apis=1, workers=1, worker_args=["--controlnet-dirs", str(REPO / "fixtures" / "controlnet")])
    try:
        api = c.apis[0]

        def listed():
            status, body = api.get("/controlnet/model_list")
            return body if status == 200 else None

        titles = wait_for("the worker's ControlNet list", listed, timeout=30, every=0.2)["model_list"]
        assert any(t.startswith("sd1 [") for t in titles), titles

        def with_unit(**unit):
            body = txt2img(3)
            body["alwayson_scripts"] = {"controlnet": {"args": [
                {"image": _disc_png_b64(), "module": "canny", "model": "sd1", **unit}]}}
            return api.post("/sdapi/v1/txt2img", body)

        status, plain = api.post("/sdapi/v1/txt2img", txt2img(3))
        assert status == 200, plain
        status, steered = with_unit()
        assert status == 200, steered
        assert steered["images"][0] != plain["images"][0]
        status, r = with_unit(module="nope")
        assert status == 400 and "nope" in r["detail"], r
        status, r = with_unit(model="missing-controlnet")
        assert status == 400 and "unknown ControlNet model" in r["detail"], r
    finally:
        c.close()
