"""A Hugging Face-like hub on loopback for the image and chart-pod tests, and a real proxy.

The hub speaks the protocol `sdkube fetch` uses against huggingface.co (crates/store/src/fetch.rs):
`GET /api/models/{repo}/tree/{rev}?recursive=true` (paged with `Link: <…>; rel="next"`),
`HEAD`/`GET /{repo}/resolve/{rev}/{path}` answering LFS files with a 302 to a CDN on another
port carrying `X-Linked-Etag` (the sha256) and `X-Linked-Size`, small files with 200 and a git
ETag, and byte ranges. Both servers use HTTPS with a certificate of a CA made for the run, as a
private mirror (or a TLS-inspecting proxy) would; every request is logged.

The proxy is Debian's tinyproxy, run with its own configuration: the pod reaches the hub only
through it, as in the field report (HTTPS through an HTTP CONNECT proxy).
"""

from __future__ import annotations

import hashlib
import http.server
import json
import shutil
import socket
import ssl
import subprocess
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import parse_qs, unquote, urlsplit

# Files at most this big are ordinary git files on the hub (no LFS, no redirect).
LFS_THRESHOLD = 10_000
PAGE = 3  # listing entries per page: the fixture model needs several pages


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def make_tls(dir: Path, ip: str) -> tuple[Path, Path, Path]:
    """A CA and a server certificate it signed for `ip`: (ca.pem, cert.pem, key.pem)."""
    dir.mkdir(parents=True, exist_ok=True)
    ca_key, ca, key, csr, cert = (dir / n for n in ("ca.key", "ca.pem", "hub.key", "hub.csr", "hub.pem"))
    run = lambda *a: subprocess.run(a, check=True, capture_output=True)  # noqa: E731
    run("openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", ca_key, "-out", ca,
        "-days", "2", "-subj", "/CN=sdkube test hub CA", "-addext", "basicConstraints=critical,CA:TRUE",
        "-addext", "keyUsage=critical,keyCertSign,cRLSign")
    run("openssl", "req", "-newkey", "rsa:2048", "-nodes", "-keyout", key, "-out", csr, "-subj", f"/CN={ip}")
    ext = dir / "hub.ext"
    ext.write_text(f"subjectAltName=IP:{ip}\nbasicConstraints=CA:FALSE\nextendedKeyUsage=serverAuth\n")
    run("openssl", "x509", "-req", "-in", csr, "-CA", ca, "-CAkey", ca_key, "-CAcreateserial",
        "-out", cert, "-days", "2", "-extfile", ext)
    return ca, cert, key


@dataclass
class Logged:
    server: str
    method: str
    path: str
    range: str | None


@dataclass
class HubFile:
    data: bytes
    sha256: str
    lfs: bool


@dataclass
class FakeHub:
    """Hub and CDN on `ip` (a loopback address), over HTTPS."""

    tls_dir: Path
    ip: str = "127.0.0.2"
    files: dict[tuple[str, str], HubFile] = field(default_factory=dict)
    log: list[Logged] = field(default_factory=list)

    def add_folder(self, repo: str, folder: Path) -> None:
        for path in sorted(p for p in folder.rglob("*") if p.is_file()):
            data = path.read_bytes()
            rel = path.relative_to(folder).as_posix()
            self.files[(repo, rel)] = HubFile(data, hashlib.sha256(data).hexdigest(), len(data) > LFS_THRESHOLD)

    def start(self) -> "FakeHub":
        self.ca, cert, key = make_tls(self.tls_dir, self.ip)
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(cert, key)
        self._servers = []
        for name in ("cdn", "hub"):
            server = http.server.ThreadingHTTPServer((self.ip, 0), _handler(self, name))
            server.socket = context.wrap_socket(server.socket, server_side=True)
            threading.Thread(target=server.serve_forever, daemon=True).start()
            self._servers.append(server)
        self.cdn_url = f"https://{self.ip}:{self._servers[0].server_address[1]}"
        self.endpoint = f"https://{self.ip}:{self._servers[1].server_address[1]}"
        return self

    def stop(self) -> None:
        for server in self._servers:
            server.shutdown()
            server.server_close()

    def downloads(self) -> list[Logged]:
        """Requests that moved file bytes (GETs of files, not listings or HEADs)."""
        return [entry for entry in self.log if entry.method == "GET" and "/api/" not in entry.path]


def _handler(hub: FakeHub, server_name: str):
    class Handler(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args):  # the request log is hub.log
            pass

        def do_HEAD(self):
            self._dispatch(body=False)

        def do_GET(self):
            self._dispatch(body=True)

        def _dispatch(self, body: bool):
            url = urlsplit(self.path)
            hub.log.append(Logged(server_name, self.command, url.path, self.headers.get("Range")))
            if server_name == "cdn":
                return self._cdn(url.path, body)
            parts = url.path.strip("/").split("/")
            if parts[:2] == ["api", "models"] and len(parts) >= 6 and parts[4] == "tree":
                return self._tree(f"{parts[2]}/{parts[3]}", parts[5], url.query)
            if len(parts) >= 5 and parts[2] == "resolve":
                return self._resolve(f"{parts[0]}/{parts[1]}", unquote("/".join(parts[4:])), body)
            self._send(404, b"not found", body)

        def _tree(self, repo: str, revision: str, query: str):
            cursor = int(parse_qs(query).get("cursor", ["0"])[0])
            entries = sorted((p, f) for (r, p), f in hub.files.items() if r == repo)
            if not entries:
                return self._send(404, b'{"error":"Repository not found"}', True)
            page = []
            for path, f in entries[cursor : cursor + PAGE]:
                entry = {"type": "file", "path": path, "size": len(f.data), "oid": hashlib.sha1(f.data).hexdigest()}
                if f.lfs:
                    entry["lfs"] = {"oid": f.sha256, "size": len(f.data), "pointerSize": 134}
                page.append(entry)
            headers = {"Content-Type": "application/json"}
            if cursor + PAGE < len(entries):
                host = self.headers["Host"]
                headers["Link"] = f'<https://{host}/api/models/{repo}/tree/{revision}?recursive=true&cursor={cursor + PAGE}>; rel="next"'
            self._send(200, json.dumps(page).encode(), True, headers)

        def _resolve(self, repo: str, path: str, body: bool):
            f = hub.files.get((repo, path))
            if f is None:
                return self._send(404, b"Entry not found", body, {"X-Error-Code": "EntryNotFound"})
            if f.lfs:
                headers = {
                    "Location": f"{hub.cdn_url}/blob/{f.sha256}",
                    "X-Linked-Etag": f'"{f.sha256}"',
                    "X-Linked-Size": str(len(f.data)),
                    "ETag": f'"{hashlib.sha1(f.data).hexdigest()}"',
                }
                return self._send(302, b"", body, headers)
            self._bytes(f.data, body, {"ETag": f'"{hashlib.sha1(f.data).hexdigest()}"'})

        def _cdn(self, path: str, body: bool):
            sha = path.removeprefix("/blob/")
            found = [f for f in hub.files.values() if f.sha256 == sha]
            if not found:
                return self._send(404, b"no blob", body)
            self._bytes(found[0].data, body, {"ETag": f'"{sha}"'})

        def _bytes(self, data: bytes, body: bool, headers: dict[str, str]):
            headers = {"Accept-Ranges": "bytes", **headers}
            wanted = self.headers.get("Range", "")
            if wanted.startswith("bytes="):
                start_text, _, end_text = wanted[6:].partition("-")
                start = int(start_text)
                end = min(int(end_text), len(data) - 1) if end_text else len(data) - 1
                headers["Content-Range"] = f"bytes {start}-{end}/{len(data)}"
                return self._send(206, data[start : end + 1], body, headers)
            self._send(200, data, body, headers)

        def _send(self, code: int, data: bytes, body: bool, headers: dict[str, str] | None = None):
            self.send_response(code)
            for k, v in (headers or {}).items():
                self.send_header(k, v)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            if body:
                self.wfile.write(data)

    return Handler


class TinyProxy:
    """Debian's tinyproxy on `listen`, a forward proxy with CONNECT to any port."""

    def __init__(self, workdir: Path, listen: str = "0.0.0.0"):
        self.port = free_port()
        workdir.mkdir(parents=True, exist_ok=True)
        self.log_file = workdir / "tinyproxy.log"
        conf = workdir / "tinyproxy.conf"
        # No Allow/ConnectPort lines: any client, CONNECT to any port (the hub's are random).
        conf.write_text(
            f"Port {self.port}\nListen {listen}\nTimeout 60\nMaxClients 50\n"
            f"LogFile \"{self.log_file}\"\nLogLevel Connect\n"
        )
        binary = shutil.which("tinyproxy")
        assert binary, "tinyproxy missing: scripts/setup-podman.sh installs it"
        self.process = subprocess.Popen([binary, "-d", "-c", str(conf)], stdout=subprocess.DEVNULL,
                                        stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.5).close()
                return
            except OSError:
                time.sleep(0.1)
        raise RuntimeError(f"tinyproxy did not start: {self.log_file.read_text() if self.log_file.exists() else ''}")

    def connects(self) -> list[str]:
        """The CONNECT lines of its log: which hosts the clients tunnelled to."""
        if not self.log_file.exists():
            return []
        return [line for line in self.log_file.read_text().splitlines() if "): CONNECT " in line]

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait(timeout=10)
