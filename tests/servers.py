"""Real servers on loopback for the worker's tests: an HTTP file server with
misbehaving routes, and moto's S3 server.

Import the fixtures into a test module (``from servers import http_server, moto_s3``).
"""

from __future__ import annotations

import dataclasses
import http.server
import socket
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Callable, Iterator

import boto3
import pytest
import requests

MOTO_KEY_ID = "AKIAMOTOTESTKEY00001"
MOTO_SECRET = "moto-secret-key-that-must-never-leak-0123456789"


def free_port() -> int:
    """A TCP port nobody listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


Route = Callable[[http.server.BaseHTTPRequestHandler], None]


class FileServer:
    """A threaded HTTP server on 127.0.0.1: ``add(path, bytes)`` serves a file,
    ``route(path, fn)`` any behaviour; ``hits`` counts requests per path."""

    def __init__(self) -> None:
        self.routes: dict[str, Route] = {}
        self.hits: Counter[str] = Counter()
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_GET(self) -> None:  # noqa: N802 - http.server's naming
                path = self.path.split("?")[0]
                server.hits[path] += 1
                server.routes.get(path, _not_found)(self)

            def log_message(self, *args) -> None:
                pass

        self._httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._httpd.daemon_threads = True
        self.port = self._httpd.server_address[1]
        self._thread = threading.Thread(target=self._httpd.serve_forever, daemon=True)
        self._thread.start()

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def add(self, path: str, data: bytes, content_type: str = "application/octet-stream") -> str:
        self.routes[path] = lambda h: send_bytes(h, data, content_type)
        return self.url(path)

    def route(self, path: str, fn: Route) -> str:
        self.routes[path] = fn
        return self.url(path)

    def close(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()


def wait_until_serving(base: str, server: subprocess.Popen, timeout_s: float = 300) -> None:
    """Waits for ``handler.py --rp_serve_api`` at ``base`` (its port opens once the models are loaded)."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            requests.get(f"{base}/docs", timeout=2)
            return
        except requests.ConnectionError:
            assert server.poll() is None and time.monotonic() < deadline, "the API server did not start"
            time.sleep(0.5)


def send_bytes(handler: http.server.BaseHTTPRequestHandler, data: bytes, content_type: str) -> None:
    handler.send_response(200)
    handler.send_header("Content-Type", content_type)
    handler.send_header("Content-Length", str(len(data)))
    handler.end_headers()
    handler.wfile.write(data)


def _not_found(handler: http.server.BaseHTTPRequestHandler) -> None:
    handler.send_response(404)
    handler.send_header("Content-Length", "0")
    handler.end_headers()


def drop_connection(handler: http.server.BaseHTTPRequestHandler) -> None:
    """Closes the socket without answering (a crashed or overloaded server)."""
    handler.close_connection = True
    handler.connection.shutdown(socket.SHUT_RDWR)


@pytest.fixture(scope="module")
def http_server() -> Iterator[FileServer]:
    server = FileServer()
    yield server
    server.close()


@dataclasses.dataclass
class MotoS3:
    """A running ``moto_server``: its endpoint and a client with the test credentials."""

    endpoint: str
    process: subprocess.Popen

    def client(self):
        return boto3.client("s3", endpoint_url=self.endpoint, region_name="us-east-1",
                            aws_access_key_id=MOTO_KEY_ID, aws_secret_access_key=MOTO_SECRET)

    def bucket(self, name: str) -> str:
        self.client().create_bucket(Bucket=name)
        return name


@pytest.fixture(scope="module")
def moto_s3() -> Iterator[MotoS3]:
    moto = Path(sys.executable).parent / "moto_server"
    if not moto.exists():
        pytest.skip(f"moto_server not installed next to {sys.executable} (requirements/test.txt)")
    port = free_port()
    process = subprocess.Popen([str(moto), "-H", "127.0.0.1", "-p", str(port)],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    endpoint = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 30
    while True:
        try:
            requests.get(endpoint, timeout=1)
            break
        except requests.ConnectionError:
            if process.poll() is not None or time.monotonic() > deadline:
                process.kill()
                raise RuntimeError("moto_server did not start") from None
            time.sleep(0.1)
    yield MotoS3(endpoint, process)
    process.terminate()
    process.wait(timeout=10)
