"""Stand-in upstreams for the demo and the tests: a small Exchange (HTTPS) and an MDM server (HTTP).

Real sockets, real TLS: they answer the way the real servers would as far as a gateway can tell,
and they remember what reached them, so a test can prove what did *not*.
"""

from __future__ import annotations

import json
import ssl
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: StandIn

    def log_message(self, fmt, *args) -> None:  # quiet
        pass

    def _read_body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            body = bytearray()
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass
                    return bytes(body)
                body += self.rfile.read(size)
                self.rfile.readline()
        n = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(n) if n else b""

    def _handle(self) -> None:
        body = self._read_body()
        seen = {
            "server": self.server.name,
            "method": self.command,
            "path": self.path,
            "headers": [[k, v] for k, v in self.headers.items()],
            "body_len": len(body),
            "time": time.time(),
        }
        with self.server.lock:
            self.server.seen.append(seen)
        hold = self.server.hold_s if "Cmd=Ping" in self.path or self.path.endswith("/hold") else 0
        if hold:
            time.sleep(hold)
        status, headers, payload = self.server.answer(self, seen)
        self.send_response(status)
        for k, v in headers.items():
            self.send_header(k, v)
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(payload)

    do_GET = do_POST = do_PUT = do_OPTIONS = do_HEAD = do_DELETE = _handle


class StandIn(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, name: str, host: str = "127.0.0.1", port: int = 0, tls: tuple[Path, Path] | None = None,
                 hold_s: float = 0.0) -> None:
        super().__init__((host, port), _Handler)
        self.name = name
        self.seen: list[dict] = []
        self.lock = threading.Lock()
        self.hold_s = hold_s
        self.scheme = "http"
        if tls:
            sslctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
            sslctx.load_cert_chain(str(tls[0]), str(tls[1]))
            self.socket = sslctx.wrap_socket(self.socket, server_side=True)
            self.scheme = "https"
        self.thread: threading.Thread | None = None

    @property
    def port(self) -> int:
        return self.server_address[1]

    @property
    def url(self) -> str:
        return f"{self.scheme}://127.0.0.1:{self.port}"

    def answer(self, h: _Handler, seen: dict) -> tuple[int, dict, bytes]:
        raise NotImplementedError

    def start(self) -> StandIn:
        self.thread = threading.Thread(target=self.serve_forever, name=self.name, daemon=True)
        self.thread.start()
        return self

    def stop(self) -> None:
        self.shutdown()
        self.server_close()

    def requests(self) -> list[dict]:
        with self.lock:
            return list(self.seen)


class ExchangeStandIn(StandIn):
    """Answers ActiveSync OPTIONS with the capability headers and POSTs with 200 like Exchange."""

    def answer(self, h, seen):
        if h.command == "OPTIONS":
            return 200, {"MS-Server-ActiveSync": "15.1", "MS-ASProtocolVersions": "2.5,12.0,12.1,14.0,14.1,16.0,16.1",
                         "MS-ASProtocolCommands": "Sync,SendMail,SmartForward,SmartReply,GetAttachment,FolderSync,"
                         "FolderCreate,FolderDelete,FolderUpdate,MoveItems,GetItemEstimate,MeetingResponse,Search,"
                         "Settings,Ping,ItemOperations,Provision,ResolveRecipients,ValidateCert",
                         "Allow": "OPTIONS,POST"}, b""
        if not h.path.lower().startswith("/microsoft-server-activesync"):
            return 404, {"Content-Type": "text/plain"}, b"not an ActiveSync path\n"
        return 200, {"Content-Type": "application/vnd.ms-sync.wbxml", "X-Upstream": "exchange",
                     "X-Seen": json.dumps({"path": seen["path"], "body_len": seen["body_len"]})}, b"\x03\x01\x6a\x00"


class MdmStandIn(StandIn):
    """Shows what the MDM received, in particular the client-certificate header."""

    def answer(self, h, seen):
        cert = h.headers.get("NSClientCert")
        payload = json.dumps({"upstream": "mdm", "path": seen["path"], "NSClientCert": cert,
                              "headers": seen["headers"]}).encode()
        return 200, {"Content-Type": "application/json", "X-Upstream": "mdm"}, payload
