"""An upstream that holds every request it reads until its peer closes the connection, and records
when that happens: the proof that the gateway closed its upstream connection, with no HTTP library
in between (a raw TLS socket per connection)."""

from __future__ import annotations

import socket
import ssl
import threading
import time
from pathlib import Path


class HoldingUpstream:
    def __init__(self, tls: tuple[Path, Path]) -> None:
        self.ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self.ctx.load_cert_chain(str(tls[0]), str(tls[1]))
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.lock = threading.Lock()
        self.held: list[str] = []  # request lines read and held
        self.closed: list[float] = []  # time.monotonic() when a held connection was closed by its peer
        threading.Thread(target=self._accept, daemon=True).start()

    @property
    def url(self) -> str:
        return f"https://127.0.0.1:{self.port}"

    def stop(self) -> None:
        self.sock.close()

    def _accept(self) -> None:
        while True:
            try:
                c, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(c,), daemon=True).start()

    def _serve(self, raw: socket.socket) -> None:
        try:
            c = self.ctx.wrap_socket(raw, server_side=True)
            buf = b""
            while b"\r\n\r\n" not in buf:
                data = c.recv(65536)
                if not data:
                    return
                buf += data
            head, _, body = buf.partition(b"\r\n\r\n")
            lines = head.decode("latin-1").split("\r\n")
            length = next((int(v) for k, _, v in (h.partition(":") for h in lines[1:])
                           if k.strip().lower() == "content-length"), 0)
            while len(body) < length:
                data = c.recv(65536)
                if not data:
                    return
                body += data
            with self.lock:
                self.held.append(lines[0])
            try:
                while c.recv(65536):  # held: nothing is ever answered
                    pass
            except OSError:
                pass
            with self.lock:
                self.closed.append(time.monotonic())
        except OSError:
            return
        finally:
            raw.close()
