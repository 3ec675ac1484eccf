"""The client-certificate header (NetScaler's `NSClientCert`): never forged, only inserted.

A client must never be able to hand the MDM a certificate it did not prove it holds. So every
client-sent header whose name *could be read as* a certificate header (any case, `-` or `_` or
nothing between the words: backends such as CGI/PHP fold `-` and `_` together) is removed first, on
every route, before routing or anything else looks at the request. Then, on routes that ask for it,
the verified certificate is inserted as one line of base64 of its DER, the form NetScaler uses.
"""

from __future__ import annotations

import logging
import re

from mitmproxy import http

from ..core import keys
from .config import DEFAULT_CERT_HEADER, GatewayConfig
from .shared import Current
from .tls import TlsOffload

logger = logging.getLogger(__name__)


def fold(name: str) -> str:
    return name.lower().replace("-", "").replace("_", "")


def folded_pattern(folded: frozenset[str]) -> re.Pattern[bytes]:
    """Matches, in header names joined by \\n, every name whose fold() is one of `folded` (ASCII
    names; no other byte folds into ASCII): the letters in order, any '-' and '_' around them."""
    alternatives = b"|".join(b"[-_]*" + b"[-_]*".join(re.escape(bytes([c])) for c in f.encode("ascii")) + b"[-_]*"
                             for f in sorted(folded))
    return re.compile(rb"(?:^|\n)(?:" + alternatives + rb")(?=\n|$)", re.IGNORECASE)


class StripCertHeaders:
    """Removes every client-sent copy of any configured certificate header."""

    def __init__(self) -> None:
        self.folded: frozenset[str] = frozenset({fold(DEFAULT_CERT_HEADER)})
        self.pattern = folded_pattern(self.folded)

    def apply(self, cfg: GatewayConfig) -> None:
        names = {DEFAULT_CERT_HEADER} | {r.client_cert_header for r in cfg.routes if r.client_cert_header}
        self.folded = frozenset(fold(n) for n in names)
        self.pattern = folded_pattern(self.folded)

    def requestheaders(self, flow: http.HTTPFlow) -> None:
        # Runs before routing, even on live flows that already carry a response: nothing forged
        # survives. A flow read from a file with its response is history, not a client request:
        # what it carries was inserted by the gateway that recorded it.
        if not flow.live and (flow.response or flow.error):
            return
        headers = flow.request.headers
        # One regex pass over all names finds any candidate (the usual answer: none); a name it
        # matches is then checked by fold() itself, as before.
        if self.pattern.search(b"\n".join([k for k, _ in headers.fields])) is None:
            return
        folded = self.folded
        spoofed = {k for k, _ in headers.fields if fold(k.decode("latin-1")) in folded}
        if spoofed:
            headers.fields = tuple((k, v) for k, v in headers.fields if k not in spoofed)
            names = sorted(k.decode("latin-1") for k in spoofed)
            flow.metadata[keys.SPOOFED_CERT_HEADER] = names
            logger.warning(f"client {flow.client_conn.peername[0]}: removed client-sent {', '.join(names)}")


class ClientCertHeader:
    """Inserts the verified client certificate on routes with `client_cert_header`."""

    def __init__(self, current: Current, tls: TlsOffload) -> None:
        self.current = current  # the config in force: the route's header name
        self.tls = tls  # the connection's certificate verdict

    def requestheaders(self, flow: http.HTTPFlow) -> None:
        if flow.response or flow.error:
            return
        name = flow.metadata.get(keys.ROUTE)
        if not name:
            return
        route = self.current.config.route(name)
        if not route.client_cert_header:
            return
        verdict = self.tls.verdict(flow.client_conn)
        if verdict.verified and verdict.der_b64:
            flow.request.headers[route.client_cert_header] = verdict.der_b64
