"""Robustness of the whole HTTP API: schemathesis (PyPI) generates requests for every
operation of the server's own /openapi.json — valid ones, edge cases and malformed ones — and
no answer may be a server error. Bounded (about 3000 cases in ~20 s), deterministic."""

from __future__ import annotations

import re
import shutil
import subprocess

import pytest

from cluster import Sdkube


def test_no_generated_request_gets_a_server_error(tmp_path):
    st = shutil.which("st")
    if st is None:
        pytest.fail("schemathesis is missing: run scripts/install-test-deps.sh")
    # Small limits keep every generated generation quick on the fixture model.
    server = Sdkube(tmp_path, "fuzzed", "all", "memory", "--max-steps", "3", "--max-size", "64",
                    "--max-batch", "2", "--queue-size", "64").wait_ready()
    try:
        run = subprocess.run(
            [st, "run", server.url("/openapi.json"), "--checks", "not_a_server_error",
             "--max-examples", "60", "--request-timeout", "60", "--generation-deterministic"],
            capture_output=True, text=True, timeout=900)
    finally:
        server.stop()
    summary = run.stdout[-6000:]
    assert run.returncode == 0, summary
    # Every operation of the document was tested (their number grows with the API).
    ops = re.search(r"Operations:\s+(\d+) selected / (\d+) total", summary) or re.search(
        r"(\d+)/(\d+)", summary
    )
    assert ops and ops.group(1) == ops.group(2) and int(ops.group(1)) >= 44, summary
    assert " passed" in summary and "failed" not in summary.split("Test cases:")[-1], summary
