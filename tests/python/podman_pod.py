"""Runs a rendered pod template with podman, as a kubelet would: the chart-pod tests' driver.

What is translated (the rendered objects are read as they are; nothing is taken from values):
- the pod: `podman pod create` (one network namespace for all containers, as in Kubernetes),
  its `containerPort`s published on 127.0.0.1 so the tests and the probes reach them;
- volumes: `persistentVolumeClaim` through the chart's bound PersistentVolume (`local` or
  `hostPath`, its path taken under a directory standing for the node's root), `emptyDir` (a
  0777 directory, or a sized tmpfs for `medium: Memory`), `configMap`/`secret` (their items as
  files, read-only) from the rendered objects or objects the test says exist in the cluster;
  `fsGroup` ownership as the kubelet applies it (not to hostPath; `OnRootMismatch` honoured);
- containers: `command` (entry point) and `args`, `env`/`envFrom` resolved as the kubelet does
  (helm_chart.Rendered.resolved_env), `workingDir`, `volumeMounts` (readOnly, subPath), memory
  and CPU limits, and the security context (pod level merged under container level):
  runAsUser/runAsGroup, fsGroup as a supplementary group, runAsNonRoot checked against the
  user the container would run as, readOnlyRootFilesystem (no tmpfs added anywhere),
  capabilities, allowPrivilegeEscalation (no-new-privileges), privileged, seccomp;
- init containers run one after the other to completion before the main containers start;
- httpGet probes (startup, then readiness and liveness) with their path, port (by name or
  number), initialDelaySeconds, periodSeconds, timeoutSeconds and failureThreshold.

Not translated (limits of this driver, asserted where a test depends on them): scheduling
(nodeSelector, tolerations, affinity, the GPU resource: a pod asking for nvidia.com/gpu is
refused), service account tokens, the Service and Ingress, restarts (a failed init container
fails the run instead of being retried with back-off), exec/tcpSocket probes, and the
environment the kubelet adds for Services (KUBERNETES_*).
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import subprocess
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fake_hub import free_port
from helm_chart import Rendered

GPU_RESOURCES = ("nvidia.com/gpu", "amd.com/gpu")


def podman(*args: str, check: bool = True, timeout: float = 600) -> subprocess.CompletedProcess:
    result = subprocess.run(["podman", *args], capture_output=True, text=True, timeout=timeout)
    if check and result.returncode != 0:
        raise RuntimeError(f"podman {' '.join(args)}: exit {result.returncode}\n{result.stderr}")
    return result


def _quantity_bytes(q: str) -> int:
    units = {"Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "k": 10**3, "M": 10**6, "G": 10**9}
    for suffix, factor in units.items():
        if q.endswith(suffix):
            return int(float(q[: -len(suffix)]) * factor)
    return int(q)


def _cpus(q: str) -> str:
    return str(int(q[:-1]) / 1000) if q.endswith("m") else q


@dataclass
class ContainerRun:
    name: str  # the Kubernetes container name
    podman_name: str
    spec: dict[str, Any]
    exit_code: int | None = None

    def logs(self) -> str:
        """stdout and stderr in the order written, as the kubelet's log file keeps them."""
        return subprocess.run(["podman", "logs", self.podman_name], stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True).stdout


@dataclass
class PodRun:
    """One run of the rendered pod template. `node_root` stands for the node's file system
    (a local PV at /srv/sdkube is node_root/srv/sdkube); `cluster` holds objects that exist
    in the cluster beside the release (a CA bundle ConfigMap, an existing Secret)."""

    rendered: Rendered
    node_root: Path
    work: Path
    name: str = "sdkube-pod"
    cluster: list[dict[str, Any]] = field(default_factory=list)
    init: list[ContainerRun] = field(default_factory=list)
    main: list[ContainerRun] = field(default_factory=list)
    ports: dict[str, int] = field(default_factory=dict)  # "container/port-name-or-number" -> host port

    @property
    def spec(self) -> dict[str, Any]:
        return self.rendered.pod_spec

    # -- objects ----------------------------------------------------------------------------

    def _object(self, kind: str, name: str) -> dict[str, Any]:
        for obj in self.rendered.objects + self.cluster:
            if obj["kind"] == kind and obj["metadata"]["name"] == name:
                return obj
        raise LookupError(f"{kind} {name} does not exist: the pod would stay in ContainerCreating")

    def _bound_volume(self, claim: str) -> tuple[Path, bool]:
        """The node directory of a claim's PersistentVolume and whether fsGroup applies to it."""
        pvc = self._object("PersistentVolumeClaim", claim)
        pv_name = pvc["spec"].get("volumeName")
        if not pv_name:
            raise NotImplementedError(f"claim {claim} needs a provisioner: only pre-bound local/hostPath volumes run here")
        pv = self._object("PersistentVolume", pv_name)["spec"]
        if "local" in pv:
            path = self.node_root / pv["local"]["path"].lstrip("/")
            if not path.is_dir():
                raise FileNotFoundError(f"local volume path {pv['local']['path']} does not exist on the node")
            return path, True
        host = pv["hostPath"]
        path = self.node_root / host["path"].lstrip("/")
        if host.get("type") == "DirectoryOrCreate" and not path.exists():
            path.mkdir(parents=True, mode=0o755)  # created by the kubelet: root, 0755
        return path, False

    # -- volumes ----------------------------------------------------------------------------

    def _apply_fs_group(self, path: Path, group: int, policy: str) -> None:
        """The kubelet's SetVolumeOwnership: group ownership, group rw (x on directories and
        executables), setgid directories; with OnRootMismatch only when the root differs."""
        if policy == "OnRootMismatch" and path.stat().st_gid == group and path.stat().st_mode & 0o2070 == 0o2070:
            return
        for p in [path, *path.rglob("*")]:
            if p.is_symlink():
                continue
            os.chown(p, -1, group)
            mode = p.stat().st_mode
            extra = 0o060 | (0o2010 if p.is_dir() else (0o010 if mode & 0o100 else 0))
            os.chmod(p, (mode | extra) & 0o7777)

    def _volumes(self) -> dict[str, tuple[str, bool]]:
        """Volume name -> (podman --mount/--volume source, whether it is a tmpfs)."""
        pod_sc = self.spec.get("securityContext", {})
        fs_group = pod_sc.get("fsGroup")
        policy = pod_sc.get("fsGroupChangePolicy", "Always")
        out: dict[str, tuple[str, bool]] = {}
        for volume in self.spec.get("volumes", []):
            name = volume["name"]
            if "persistentVolumeClaim" in volume:
                path, fs_group_applies = self._bound_volume(volume["persistentVolumeClaim"]["claimName"])
                if fs_group is not None and fs_group_applies:
                    self._apply_fs_group(path, fs_group, policy)
                out[name] = (str(path), False)
            elif "emptyDir" in volume:
                empty = volume["emptyDir"] or {}
                if empty.get("medium") == "Memory":
                    size = _quantity_bytes(empty.get("sizeLimit", "64Mi"))
                    out[name] = (f"size={size},mode=1777", True)
                    continue
                path = self.work / "emptydir" / name
                path.mkdir(parents=True)
                os.chmod(path, 0o777)
                if fs_group is not None:
                    self._apply_fs_group(path, fs_group, "Always")
                out[name] = (str(path), False)
            elif "configMap" in volume or "secret" in volume:
                kind, ref = ("ConfigMap", volume["configMap"]) if "configMap" in volume else ("Secret", volume["secret"])
                obj = self._object(kind, ref.get("name") or ref.get("secretName"))
                data = dict(obj.get("data") or {})
                if kind == "Secret":
                    data = {k: base64.b64decode(v).decode() for k, v in data.items()}
                    data.update(obj.get("stringData") or {})
                path = self.work / "objects" / name
                path.mkdir(parents=True)
                items = ref.get("items") or [{"key": k, "path": k} for k in data]
                for item in items:
                    (path / item["path"]).write_text(data[item["key"]])
                    os.chmod(path / item["path"], ref.get("defaultMode", 0o644))
                if fs_group is not None:
                    self._apply_fs_group(path, fs_group, "Always")
                out[name] = (str(path), False)
            else:
                raise NotImplementedError(f"volume {name}: {sorted(volume)}")
        return out

    # -- containers -------------------------------------------------------------------------

    def _image_user(self, image: str) -> str:
        return podman("image", "inspect", image, "--format", "{{.Config.User}}").stdout.strip()

    def _run_args(self, container: dict[str, Any], volumes: dict[str, tuple[str, bool]]) -> list[str]:
        pod_sc = self.spec.get("securityContext", {})
        sc = {**{k: v for k, v in pod_sc.items() if k in ("runAsUser", "runAsGroup", "runAsNonRoot", "seccompProfile")},
              **container.get("securityContext", {})}
        image = container["image"]
        if container.get("imagePullPolicy", "IfNotPresent") == "Always":
            raise NotImplementedError("imagePullPolicy Always: there is no registry here")
        args = ["--pull=never", "--env-host=false", "--hostname", self.name]
        user = sc.get("runAsUser")
        group = sc.get("runAsGroup")
        if user is not None:
            args += ["--user", f"{user}:{group}" if group is not None else str(user)]
        if sc.get("runAsNonRoot"):
            effective = str(user) if user is not None else self._image_user(image).split(":")[0]
            if effective in ("", "0", "root"):
                raise RuntimeError(f"{container['name']}: runAsNonRoot but the image runs as root (CreateContainerConfigError)")
        if pod_sc.get("fsGroup") is not None:
            args += ["--group-add", str(pod_sc["fsGroup"])]
        for g in pod_sc.get("supplementalGroups", []):
            args += ["--group-add", str(g)]
        if sc.get("readOnlyRootFilesystem"):
            args += ["--read-only", "--read-only-tmpfs=false"]
        if sc.get("allowPrivilegeEscalation") is False:
            args += ["--security-opt", "no-new-privileges"]
        if sc.get("privileged"):
            args += ["--privileged"]
        caps = sc.get("capabilities", {})
        args += [f"--cap-drop={c}" for c in caps.get("drop", [])]
        args += [f"--cap-add={c}" for c in caps.get("add", [])]
        seccomp = (sc.get("seccompProfile") or {}).get("type", "RuntimeDefault")
        if seccomp == "Unconfined":
            args += ["--security-opt", "seccomp=unconfined"]
        elif seccomp != "RuntimeDefault":
            raise NotImplementedError(f"seccomp profile {seccomp}")
        limits = (container.get("resources") or {}).get("limits") or {}
        for gpu in GPU_RESOURCES:
            if int(limits.get(gpu, 0)):
                raise NotImplementedError(f"{container['name']} asks for {gpu}: no GPU on this machine (render with gpu.count=0)")
        if "memory" in limits:
            args += ["--memory", str(_quantity_bytes(str(limits["memory"])))]
        if "cpu" in limits:
            args += ["--cpus", _cpus(str(limits["cpu"]))]
        for key, value in self.rendered.resolved_env(container).items():
            args += ["--env", f"{key}={value}"]
        if container.get("workingDir"):
            args += ["--workdir", container["workingDir"]]
        for mount in container.get("volumeMounts", []):
            source, tmpfs = volumes[mount["name"]]
            if tmpfs:
                args += ["--mount", f"type=tmpfs,destination={mount['mountPath']},tmpfs-{source.replace(',', ',tmpfs-')}"]
                continue
            if mount.get("subPath"):
                sub = Path(source) / mount["subPath"]
                sub.mkdir(parents=True, exist_ok=True)  # the kubelet creates it, as root
                source = str(sub)
            options = "ro" if mount.get("readOnly") else "rw"
            args += ["--volume", f"{source}:{mount['mountPath']}:{options}"]
        if container.get("command"):
            args += ["--entrypoint", json.dumps(container["command"])]
        return args + [image, *container.get("args", [])]

    def start(self, init_timeout: float = 600) -> "PodRun":
        """Creates the pod, runs the init containers to completion, starts the main ones.
        Returns early (with `failed_init` set) if an init container fails."""
        publish = []
        for container in self.spec["containers"]:
            for port in container.get("ports", []):
                host_port = free_port()
                self.ports[f"{container['name']}/{port['containerPort']}"] = host_port
                if port.get("name"):
                    self.ports[f"{container['name']}/{port['name']}"] = host_port
                publish += ["--publish", f"127.0.0.1:{host_port}:{port['containerPort']}"]
        podman("pod", "rm", "--force", "--ignore", self.name)
        podman("pod", "create", "--name", self.name, "--share", "net,ipc,uts", *publish)
        volumes = self._volumes()
        for container in self.spec.get("initContainers", []):
            run = ContainerRun(container["name"], f"{self.name}-{container['name']}", container)
            self.init.append(run)
            args = self._run_args(container, volumes)
            podman("run", "--pod", self.name, "--name", run.podman_name, *args, check=False, timeout=init_timeout)
            run.exit_code = int(podman("inspect", run.podman_name, "--format", "{{.State.ExitCode}}").stdout)
            if run.exit_code != 0:
                return self
        for container in self.spec["containers"]:
            run = ContainerRun(container["name"], f"{self.name}-{container['name']}", container)
            self.main.append(run)
            podman("run", "--detach", "--pod", self.name, "--name", run.podman_name, *self._run_args(container, volumes))
        return self

    @property
    def failed_init(self) -> ContainerRun | None:
        return next((c for c in self.init if c.exit_code not in (0, None)), None)

    def container(self, name: str) -> ContainerRun:
        return next(c for c in self.init + self.main if c.name == name)

    def url(self, container: str, port: str | int = "http") -> str:
        return f"http://127.0.0.1:{self.ports[f'{container}/{port}']}"

    # -- probes -----------------------------------------------------------------------------

    def probe_once(self, container: str, kind: str) -> tuple[int | None, float]:
        """One httpGet probe as declared: (status or None on a timeout/refusal, seconds taken)."""
        probe = self._container_spec(container)[f"{kind}Probe"]
        get = probe["httpGet"]
        url = self.url(container, get["port"]) + get.get("path", "/")
        started = time.monotonic()
        try:
            with urllib.request.urlopen(url, timeout=probe.get("timeoutSeconds", 1)) as response:
                return response.status, time.monotonic() - started
        except urllib.error.HTTPError as e:
            return e.code, time.monotonic() - started
        except (urllib.error.URLError, TimeoutError, ConnectionError):
            return None, time.monotonic() - started

    def _container_spec(self, name: str) -> dict[str, Any]:
        return next(c for c in self.spec["containers"] if c["name"] == name)

    def wait_until_ready(self, container: str) -> dict[str, Any]:
        """The kubelet's probe schedule: the startup probe every periodSeconds until it passes
        (failing the container after failureThreshold misses), then the readiness probe until
        it passes. Returns what was seen: attempts and seconds to start and to be ready."""
        spec = self._container_spec(container)
        seen: dict[str, Any] = {}
        started = time.monotonic()
        for kind in ("startup", "readiness"):
            probe = spec.get(f"{kind}Probe")
            if probe is None:
                continue
            time.sleep(probe.get("initialDelaySeconds", 0))
            for attempt in range(1, probe.get("failureThreshold", 3) + 1 if kind == "startup" else 10**6):
                code, _ = self.probe_once(container, kind)
                if self.exited(container):
                    raise RuntimeError(f"{container} exited during the {kind} probe:\n{self.container(container).logs()}")
                if code is not None and 200 <= code < 400:
                    seen[kind] = {"attempts": attempt, "seconds": time.monotonic() - started}
                    break
                if kind == "readiness" and time.monotonic() - started > 600:
                    raise TimeoutError(f"{container} not ready after 600 s:\n{self.container(container).logs()}")
                time.sleep(probe.get("periodSeconds", 10))
            else:
                raise RuntimeError(f"{container}: startup probe failed {attempt} times: the kubelet would restart it")
        return seen

    def exited(self, container: str) -> bool:
        state = podman("inspect", self.container(container).podman_name, "--format", "{{.State.Status}}").stdout.strip()
        return state in ("exited", "stopped")

    def stop(self) -> None:
        grace = str(self.spec.get("terminationGracePeriodSeconds", 30))
        podman("pod", "stop", "--time", grace, self.name, check=False)
        podman("pod", "rm", "--force", self.name, check=False)
        shutil.rmtree(self.work / "emptydir", ignore_errors=True)
        shutil.rmtree(self.work / "objects", ignore_errors=True)
