"""A recording upstream for the differential test: it keeps every byte the gateway sent on every
connection, answers each request its strict model reads, and lets all the models of `models.py` read
the recorded bytes afterwards. No HTTP library is involved."""

from __future__ import annotations

import socket
import ssl
import threading
from pathlib import Path

from .models import MODELS, Read, read_stream


class RecordingUpstream:
    def __init__(self, name: str, tls: tuple[Path, Path] | None = None) -> None:
        self.name = name
        self.ctx = None
        if tls:
            self.ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            self.ctx.load_cert_chain(str(tls[0]), str(tls[1]))
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.streams: list[bytearray] = []
        self.lock = threading.Lock()
        self._closed = False
        threading.Thread(target=self._accept, daemon=True).start()

    @property
    def url(self) -> str:
        return f"{'https' if self.ctx else 'http'}://127.0.0.1:{self.port}"

    def stop(self) -> None:
        self._closed = True
        self.sock.close()

    def clear(self) -> None:
        with self.lock:
            self.streams.clear()

    def _accept(self) -> None:
        while not self._closed:
            try:
                c, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(c,), daemon=True).start()

    def _serve(self, c: socket.socket) -> None:
        buf = bytearray()
        with self.lock:
            self.streams.append(buf)
        try:
            if self.ctx:
                c = self.ctx.wrap_socket(c, server_side=True)
            answered = 0
            refused = False
            while True:
                data = c.recv(65536)
                if not data:
                    return
                with self.lock:
                    buf += data
                    snapshot = bytes(buf)
                if refused:
                    continue  # keep recording what else arrives: the other models read it afterwards
                reads, err = read_stream(snapshot, "strict")
                for _ in reads[answered:]:
                    c.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nContent-Type: text/plain\r\n\r\nok")
                answered = len(reads)
                if err not in (None, "incomplete", "incomplete body"):
                    c.sendall(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
                    refused = True
        except (OSError, ssl.SSLError):
            return
        finally:
            try:
                c.close()
            except OSError:
                pass

    def reads(self) -> dict[str, list[tuple[list[Read], str | None]]]:
        """model -> per connection (requests read, why reading stopped)."""
        with self.lock:
            streams = [bytes(b) for b in self.streams]
        return {m: [read_stream(s, m) for s in streams] for m in MODELS}
