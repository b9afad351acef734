"""A loopback stand-in for kube-apiserver holding what a chart-pod run left behind, so that
`sdkube doctor` reads it through its real kube-rs client (the chart-pod tests).

The pod's status is derived from the podman run, never invented: init containers that ran
are `terminated` with their real exit code, the ones after a failure and the main
containers wait in `PodInitializing`, as the kubelet reports them before a restart. Logs are
the containers' real output. The release's PersistentVolume and claim are served bound, plus
the node the volume names.
"""

from __future__ import annotations

import copy
import http.server
import json
import threading
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

from podman_pod import PodRun

POD_NAME = "demo-sdkube-7d9f8b6c5-x2x9q"


def _node_of(run: PodRun) -> str:
    for pv in (o for o in run.rendered.objects if o["kind"] == "PersistentVolume"):
        terms = pv["spec"].get("nodeAffinity", {}).get("required", {}).get("nodeSelectorTerms", [])
        for term in terms:
            return term["matchExpressions"][0]["values"][0]
    return "node-1"


def snapshot_of(run: PodRun, namespace: str) -> tuple[list[dict], dict[tuple[str, str], str]]:
    """(objects, logs by (pod, container)) as the API server would hold them."""
    template = run.rendered.workload["spec"]["template"]
    node = _node_of(run)
    spec = copy.deepcopy(template["spec"])
    spec["nodeName"] = node
    init_statuses, logs = [], {}
    failed = False
    for container in spec.get("initContainers", []):
        ran = next((c for c in run.init if c.name == container["name"]), None)
        status = {"name": container["name"], "image": container["image"], "imageID": "", "ready": False,
                  "restartCount": 0}
        if ran is None or ran.exit_code is None or failed:
            status["state"] = {"waiting": {"reason": "PodInitializing"}}
        else:
            status["state"] = {"terminated": {"exitCode": ran.exit_code,
                                              "reason": "Completed" if ran.exit_code == 0 else "Error"}}
            logs[(POD_NAME, container["name"])] = ran.logs()
            failed = ran.exit_code != 0
        init_statuses.append(status)
    main_statuses = [{"name": c["name"], "image": c["image"], "imageID": "", "ready": False, "restartCount": 0,
                      "state": {"waiting": {"reason": "PodInitializing"}}} for c in spec["containers"]]
    pod = {
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": POD_NAME, "namespace": namespace, "labels": template["metadata"]["labels"],
                     "uid": "00000000-0000-0000-0000-000000000021"},
        "spec": spec,
        "status": {"phase": "Pending", "conditions": [{"type": "Initialized", "status": "False",
                                                       "reason": "ContainersNotInitialized"}],
                   "initContainerStatuses": init_statuses, "containerStatuses": main_statuses},
    }
    objects = [pod]
    for obj in run.rendered.objects:
        if obj["kind"] == "PersistentVolumeClaim":
            objects.append({**obj, "metadata": {**obj["metadata"], "namespace": namespace},
                            "status": {"phase": "Bound", "accessModes": obj["spec"]["accessModes"],
                                       "capacity": obj["spec"]["resources"]["requests"]}})
        elif obj["kind"] == "PersistentVolume":
            objects.append({**obj, "status": {"phase": "Bound"}})
    objects.append({"apiVersion": "v1", "kind": "Node", "metadata": {"name": node, "labels": {"kubernetes.io/hostname": node}},
                    "status": {"conditions": [{"type": "Ready", "status": "True"}],
                               "allocatable": {"cpu": "16", "memory": "64Gi", "pods": "110"},
                               "capacity": {"cpu": "16", "memory": "64Gi", "pods": "110"}}})
    return objects, logs


class FakeKube:
    """Serves `objects` and `logs` on 127.0.0.1 for list, get and log calls."""

    def __init__(self, objects: list[dict], logs: dict[tuple[str, str], str]):
        self.objects, self.logs = objects, logs
        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"

    def kubeconfig(self, path: Path, namespace: str) -> Path:
        path.write_text(json.dumps({
            "apiVersion": "v1", "kind": "Config", "current-context": "fake",
            "clusters": [{"name": "fake", "cluster": {"server": self.url}}],
            "users": [{"name": "fake", "user": {}}],
            "contexts": [{"name": "fake", "context": {"cluster": "fake", "user": "fake", "namespace": namespace}}],
        }))
        return path

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()

    def _handler(self):
        kube = self
        lists = {"pods": "Pod", "persistentvolumeclaims": "PersistentVolumeClaim",
                 "persistentvolumes": "PersistentVolume", "nodes": "Node", "events": "Event",
                 "storageclasses": "StorageClass"}

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_GET(self):
                url = urlsplit(self.path)
                parts = url.path.strip("/").split("/")
                query = parse_qs(url.query)
                if parts[-1] == "log" and "pods" in parts:
                    text = kube.logs.get((parts[-2], query.get("container", [""])[0]), "")
                    tail = int(query.get("tailLines", ["0"])[0])
                    lines = text.splitlines(keepends=True)
                    return self._send(200, "".join(lines[-tail:] if tail else lines).encode(), "text/plain")
                namespace = parts[parts.index("namespaces") + 1] if "namespaces" in parts else None
                kind = lists.get(parts[-1])
                if kind is None:
                    return self._json(404, {"kind": "Status", "apiVersion": "v1", "status": "Failure",
                                            "reason": "NotFound", "code": 404, "message": f"{url.path} not found"})
                items = [o for o in kube.objects if o["kind"] == kind
                         and (namespace is None or o["metadata"].get("namespace") == namespace)]
                api_version = "storage.k8s.io/v1" if kind == "StorageClass" else "v1"
                self._json(200, {"kind": f"{kind}List", "apiVersion": api_version,
                                 "metadata": {"resourceVersion": "21"}, "items": items})

            def _json(self, code, body):
                self._send(code, json.dumps(body).encode(), "application/json")

            def _send(self, code, data, content_type):
                self.send_response(code)
                self.send_header("Content-Type", content_type)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        return Handler
