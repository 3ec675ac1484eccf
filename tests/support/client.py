"""Clients of the gateway: HTTPS requests with SNI and Host mail.example.test over loopback
(Python's ssl, curl), and raw TLS for hostile requests (bytes in, everything the gateway answered out)."""

from __future__ import annotations

import http.client
import json
import re
import socket
import ssl
import subprocess
import time
from pathlib import Path

HOSTNAME = "mail.example.test"


def client_context(pki: Path, cert: str | None = None) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=str(pki / "public-ca.pem"))
    if cert:
        ctx.load_cert_chain(str(pki / f"{cert}.pem"), str(pki / f"{cert}.key"))
    return ctx


class Response:
    def __init__(self, status: int, headers: http.client.HTTPMessage, body: bytes) -> None:
        self.status, self.headers, self.body = status, headers, body

    def json(self):
        return json.loads(self.body)


def request(port: int, method: str, path: str, pki: Path, *, cert: str | None = None, headers: dict | list | None = None,
            body: bytes | None = None, conn: http.client.HTTPSConnection | None = None, timeout: float = 15) -> Response:
    """One HTTPS request to the gateway with SNI and Host mail.example.test. Pass conn to reuse a
    keep-alive connection (from https_connection)."""
    c = conn or https_connection(port, pki, cert, timeout)
    c.putrequest(method, path, skip_host=True, skip_accept_encoding=True)
    c.putheader("Host", f"{HOSTNAME}:{port}")
    items = headers.items() if isinstance(headers, dict) else (headers or [])
    for k, v in items:
        c.putheader(k, v)
    if body is not None:
        c.putheader("Content-Length", str(len(body)))
    c.endheaders(body)
    r = c.getresponse()
    data = r.read()
    out = Response(r.status, r.headers, data)
    if conn is None:
        c.close()
    return out


class LoopbackHTTPSConnection(http.client.HTTPSConnection):
    """Connects to 127.0.0.1 but verifies and sends SNI for the public name: also when http.client
    opens the connection again by itself (after the gateway answered `Connection: close`), which
    would otherwise look the public name up in DNS."""

    def __init__(self, port: int, ctx: ssl.SSLContext, timeout: float) -> None:
        super().__init__(HOSTNAME, port, context=ctx, timeout=timeout)
        self.ctx = ctx

    def connect(self) -> None:
        self.sock = self.ctx.wrap_socket(socket.create_connection(("127.0.0.1", self.port), timeout=self.timeout),
                                         server_hostname=HOSTNAME)


def https_connection(port: int, pki: Path, cert: str | None = None, timeout: float = 15) -> http.client.HTTPSConnection:
    c = LoopbackHTTPSConnection(port, client_context(pki, cert), timeout)
    c.connect()
    return c


def curl(port: int, path: str, pki: Path, *args: str, cert: str | None = None, timeout: int = 15) -> subprocess.CompletedProcess:
    argv = ["curl", "-sS", "--max-time", str(timeout), "--cacert", str(pki / "public-ca.pem"),
            "--resolve", f"{HOSTNAME}:{port}:127.0.0.1", "-o", "-", "-w", "\n%{http_code}"]
    if cert:
        argv += ["--cert", str(pki / f"{cert}.pem"), "--key", str(pki / f"{cert}.key")]
    argv += [*args, f"https://{HOSTNAME}:{port}{path}"]
    return subprocess.run(argv, capture_output=True, text=True, timeout=timeout + 5)


def send_raw(port: int, ctx: ssl.SSLContext, data: bytes, timeout: float = 4.0) -> dict:
    """Send the bytes on one TLS connection and read until the gateway closes it (or `timeout`)."""
    t0 = time.monotonic()
    out = bytearray()
    closed = False
    s = ctx.wrap_socket(socket.create_connection(("127.0.0.1", port), timeout=timeout), server_hostname=HOSTNAME)
    try:
        try:
            s.sendall(data)
        except (OSError, ssl.SSLError):
            pass  # answered and closed before everything was read
        while time.monotonic() - t0 < timeout:
            s.settimeout(max(0.05, timeout - (time.monotonic() - t0)))
            try:
                chunk = s.recv(65536)
            except (TimeoutError, socket.timeout):
                break
            except (OSError, ssl.SSLError):
                closed = True
                break
            if not chunk:
                closed = True
                break
            out += chunk
    finally:
        s.close()
    return {"data": bytes(out), "statuses": statuses(bytes(out)), "closed": closed,
            "seconds": time.monotonic() - t0}


def statuses(data: bytes) -> list[int]:
    out = []
    while data.startswith(b"HTTP/"):
        end = data.find(b"\r\n\r\n")
        if end < 0:
            break
        head = data[:end].decode("latin-1")
        out.append(int(head.split(" ", 2)[1]))
        m = re.search(r"(?im)^content-length:\s*(\d+)", head)
        data = data[end + 4 + (int(m[1]) if m else 0):]
    return out
