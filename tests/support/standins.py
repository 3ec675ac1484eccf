"""Stand-in servers the tests steer: a connector (XNC callout) that answers, stalls or misbehaves
as a test sets, and a plain-HTTP Exchange that holds Pings until the test releases them. (The demo's
Exchange and MDM stand-ins are the product's: easgate.tools.standins.) Fixtures: conftest.py."""

from __future__ import annotations

import hashlib
import json
import socket
import ssl
import threading
import time
from http.server import BaseHTTPRequestHandler
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

from easgate.tools.standins import QuietServer


class FakeConnector(QuietServer):

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), _ConnectorHandler)
        self.allowed: set[str] = set()  # DeviceIds answered with Allow
        self.behaviour = "normal"  # normal | slow | garbage | error500 | reject400 | close | hang
        self.delay_s = 0.0
        self.calls: list[dict] = []
        self.conns: list[socket.socket] = []
        self.lock = threading.Lock()
        threading.Thread(target=self.serve_forever, daemon=True).start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}/services/ActiveSync/Authorize"

    def stop(self) -> None:
        """Down for real: no listener and no kept-alive connection left."""
        self.shutdown()
        self.server_close()
        with self.lock:
            for s in self.conns:
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass


class _ConnectorHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def setup(self) -> None:
        super().setup()
        with self.server.lock:
            self.server.conns.append(self.connection)

    def log_message(self, *a) -> None:
        pass

    def do_GET(self) -> None:
        srv: FakeConnector = self.server  # type: ignore[assignment]
        q = {k: v[0] for k, v in parse_qs(urlsplit(self.path).query, keep_blank_values=True).items()}
        with srv.lock:
            srv.calls.append(q)
        b = srv.behaviour
        if srv.delay_s:
            time.sleep(srv.delay_s)
        if b == "hang":
            time.sleep(30)
        if b == "close":
            self.wfile.write(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n{\"res")
            self.close_connection = True
            return
        if b == "error500":
            body, status = b"internal error", 500
        elif b == "reject400":
            body, status = b'{"error": "bad request", "reason": "agent too long"}', 400
        elif b == "garbage":
            body, status = b"<html>Allowed?</html>", 200
        else:
            result = "Allow" if q.get("DeviceId") in srv.allowed else "Deny"
            body, status = json.dumps({"result": result}).encode(), 200
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


class HeldPingExchange(QuietServer):
    """An Exchange whose Pings wait until the test releases them (no fixed sleeps): plain HTTP, or
    TLS with tls=(certificate, key). Every answer is `body`, its SHA-256 in an X-Digest header."""

    def __init__(self, tls: tuple[Path, Path] | None = None, body: bytes = b"pong") -> None:
        super().__init__(("127.0.0.1", 0), _HeldPingHandler)
        self.scheme = "http"
        if tls:
            ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
            ctx.load_cert_chain(tls[0], tls[1])
            self.socket = ctx.wrap_socket(self.socket, server_side=True)
            self.scheme = "https"
        self.body = body
        self.release = threading.Event()
        self.pings_waiting = threading.Semaphore(0)
        threading.Thread(target=self.serve_forever, daemon=True).start()

    @property
    def url(self) -> str:
        return f"{self.scheme}://127.0.0.1:{self.server_address[1]}"

    def stop(self) -> None:
        self.release.set()
        self.shutdown()
        self.server_close()


class _HeldPingHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *a) -> None:
        pass

    def do_POST(self) -> None:
        self.rfile.read(int(self.headers.get("Content-Length") or 0))
        if "Cmd=Ping" in self.path:
            self.server.pings_waiting.release()
            self.server.release.wait(60)
        body = self.server.body
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("X-Digest", hashlib.sha256(body).hexdigest())
        # whether this (TLS) connection resumed a session: the gateway's upstream session reuse
        self.send_header("X-Session-Reused", "yes" if getattr(self.connection, "session_reused", False) else "no")
        self.end_headers()
        self.wfile.write(body)
