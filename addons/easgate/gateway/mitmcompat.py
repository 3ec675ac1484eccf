"""Work-arounds for mitmproxy behaviour a gateway can't live with, installed once at load.

Each one names the mitmproxy version it was found in; each is a no-op if the code it wraps is
not there. Remove one when mitmproxy fixes the behaviour.
"""

from __future__ import annotations

import logging

logger = logging.getLogger(__name__)
_installed = False


def install() -> None:
    global _installed
    if _installed:
        return
    _installed = True
    _http1_request_trailers()


def _http1_request_trailers() -> None:
    """mitmproxy 12.3.1: a chunked HTTP/1 request with trailer fields raises NotImplementedError
    inside the HTTP/1 layer; the client is never answered and waits until its connection's idle
    timeout (an hour on a gateway). Turn it into the protocol error that mitmproxy raises for any
    other malformed body: the connection is closed at once."""
    try:
        from mitmproxy.proxy import commands
        from mitmproxy.proxy.layers.http import _http1
        from mitmproxy.proxy.layers.http._base import ReceiveHttp
    except ImportError:  # pragma: no cover - another mitmproxy layout
        return
    conn_cls = getattr(_http1, "Http1Connection", None)
    original = getattr(conn_cls, "read_body", None)
    if original is None or getattr(original, "_easgate", False):
        return

    def read_body(self, event):
        try:
            return (yield from original(self, event))
        except NotImplementedError as e:
            yield commands.CloseConnection(self.conn)
            yield ReceiveHttp(self.ReceiveProtocolError(self.stream_id, f"HTTP/1 protocol error: {e}",
                                                        code=self.ReceiveProtocolError.code))

    read_body._easgate = True  # type: ignore[attr-defined]
    conn_cls.read_body = read_body
