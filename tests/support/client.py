"""Raw TLS clients for hostile requests: bytes in, everything the gateway answered out."""

from __future__ import annotations

import re
import socket
import ssl
import time

HOSTNAME = "mail.example.test"


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
