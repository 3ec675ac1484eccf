"""One strict reading of every HTTP/1 request head, before anything routes, decides or forwards it.

mitmproxy reads request heads leniently (it is a debugging proxy): a folded header line (obs-fold)
is kept in the previous value as `\\r\\n ` and forwarded byte for byte, a bare CR or a NUL stays in a
value, any method and any `HTTP/x.y` version are accepted (`HTTP/2.0` is then sent upstream as
HTTP/1.1), a bare LF ends a line, and a head may grow without bound. A server behind the gateway
that reads such a request differently (it unfolds or splits the continuation line, takes a bare CR
for a line end, prefers Transfer-Encoding over Content-Length) sees headers, framing and even whole
requests that no route, header rule or authorization decision ever saw.

So there is one reading, RFC 9112's, and everything outside it is refused with 400 (431/414 for the
limits) and the connection is closed: no further pipelined request on it is read. Two places apply it:

- `StrictRequests.screen` sees the raw head bytes before mitmproxy's HTTP/1 server layer parses
  them (hooked in by `mitmcompat.screen_http1_heads`): bare LF line ends, obs-fold and over-long
  heads are only visible there.
- `StrictRequests`, the first addon of the gateway, checks the parsed request mitmproxy hands to
  every addon — what it would forward — with the same rules, in case the layer patch is missing.

`mitmcompat.answer_before_continue` makes `Expect: 100-continue` wait for the decision: a request
answered in `requestheaders` (a deny, a 400, a 404) gets that answer at once, never a `100
Continue`, and its connection is closed instead of the body being read.
"""

from __future__ import annotations

import logging
import re
from collections import Counter
from dataclasses import dataclass

from mitmproxy import http
from mitmproxy.net.http import http1 as wire

from ..core import keys
from . import mitmcompat
from .config import GatewayConfig, Limits
from .respond import answer

logger = logging.getLogger("easgate.http1")

TOKEN = re.compile(rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")  # RFC 9110 5.6.2
VERSIONS = (b"HTTP/1.0", b"HTTP/1.1")
# Field values: visible ASCII, SP, HTAB and obs-text (RFC 9110 5.5); every other control byte, CR,
# LF and NUL included, is refused.
_BAD_VALUE_BYTE = re.compile(rb"[\x00-\x08\x0a-\x1f\x7f]")
# The request-target: visible ASCII only (RFC 3986 plus the few bytes browsers send unescaped).
_BAD_TARGET_BYTE = re.compile(rb"[^\x21-\x7e]")
_CONTENT_LENGTH = re.compile(rb"0|[1-9][0-9]{0,17}")
FRAMING = (b"content-length", b"transfer-encoding")


class Refusal(ValueError):
    """Why a request head is refused, and with which status."""

    def __init__(self, reason: str, status: int = 400) -> None:
        super().__init__(reason)
        self.reason, self.status = reason, status


@dataclass(frozen=True)
class Head:
    method: bytes
    target: bytes
    version: bytes
    fields: tuple[tuple[bytes, bytes], ...]


# The common case in one pass of C (every request's raw head runs it): a head the rules accept whole.
# What it does not accept goes through the rule-by-rule reading (`check_head`), which accepts or
# names the refusal; so it may only ever accept what that reading accepts.
_HEAD = re.compile(
    rb"[!#$%&'*+\-.^_`|~0-9A-Z]+ [\x21-\x7e]+ HTTP/1\.[01]\r\n"
    rb"(?:[!#$%&'*+\-.^_`|~0-9A-Za-z]+:[\t\x20-\x7e\x80-\xff]*\r\n)*\r\n")
_NEAR_FRAMING = (b"\ncontent_length:", b"\ntransfer-encoding:", b"\ntransfer_encoding:")
_CL_NAME = b"\ncontent-length:"


def fast_accepts(raw: bytes, limits: Limits) -> bool:
    """True if `check_head` accepts the raw head `raw` (False: it may or may not; ask it)."""
    if len(raw) > limits.max_header_bytes or _HEAD.fullmatch(raw) is None:
        return False
    line = raw.find(b"\r\n")  # the request line: METHOD SP target SP HTTP/1.x
    if raw.count(b"\r\n") - 2 > limits.max_headers or line - raw.find(b" ") - 10 > limits.max_target_length:
        return False
    # The pattern leaves a \n only at line ends, each followed by a header name (or the end): a
    # framing header is "\n" name ":" here. Only one Content-Length, nothing like it, is let by.
    low = raw[line:].lower()
    if _NEAR_FRAMING[0] in low or _NEAR_FRAMING[1] in low or _NEAR_FRAMING[2] in low:
        return False
    at = low.find(_CL_NAME)
    if at < 0:
        return True
    at += len(_CL_NAME)
    if low.find(_CL_NAME, at) >= 0:
        return False
    at += line
    return _CONTENT_LENGTH.fullmatch(raw[at:raw.find(b"\r", at)].strip(b" \t")) is not None


def check_parts(head: Head, limits: Limits) -> None:
    """The rules on a request line and its header fields, however they were read; raises Refusal."""
    if not TOKEN.fullmatch(head.method):
        raise Refusal(f"method {head.method[:40]!r} is not a token")
    if head.method != head.method.upper():
        # Methods are case-sensitive (RFC 9110 9.1), but mitmproxy's Request.method upper-cases
        # them for every addon while the original bytes go upstream: `options` would be decided
        # as OPTIONS. No ActiveSync or MDM client sends a lower-case method.
        raise Refusal(f"method {head.method[:40]!r} is not in upper case")
    if head.version not in VERSIONS:
        raise Refusal(f"HTTP version {head.version[:20]!r} is not HTTP/1.0 or HTTP/1.1")
    if len(head.target) > limits.max_target_length:
        raise Refusal(f"request-target of {len(head.target)} bytes is over limits.max_target_length "
                      f"({limits.max_target_length})", 414)
    if not head.target or _BAD_TARGET_BYTE.search(head.target):
        raise Refusal("request-target is empty or has a control, space or non-ASCII byte")
    if len(head.fields) > limits.max_headers:
        raise Refusal(f"{len(head.fields)} header fields, over limits.max_headers ({limits.max_headers})", 431)
    cl: list[bytes] = []
    te: list[bytes] = []
    for name, value in head.fields:
        if not TOKEN.fullmatch(name):
            raise Refusal(f"header name {name[:40]!r} is not a token")
        if _BAD_VALUE_BYTE.search(value):
            what = "a folded line (obs-fold)" if b"\r\n" in value else "a control byte (CR, LF, NUL or other)"
            raise Refusal(f"header {name.decode()} has {what}")
        low = name.lower()
        if low == b"content-length":
            cl.append(value)
        elif low == b"transfer-encoding":
            te.append(value)
        elif low.replace(b"_", b"-") in FRAMING:
            # CGI-style backends fold '_' into '-': Content_Length would frame the body for them.
            raise Refusal(f"header {name.decode()} reads as a framing header")
    if te and cl:
        raise Refusal("both Transfer-Encoding and Content-Length")
    if len(cl) > 1:
        raise Refusal("more than one Content-Length (even with equal values)")
    if len(te) > 1:
        raise Refusal("more than one Transfer-Encoding")
    if cl and not _CONTENT_LENGTH.fullmatch(cl[0]):
        raise Refusal(f"Content-Length {cl[0][:30]!r} is not a decimal number")
    if te:
        if te[0] != b"chunked":
            raise Refusal(f"Transfer-Encoding {te[0][:30]!r} is not exactly 'chunked'")
        if head.version != b"HTTP/1.1":
            raise Refusal("Transfer-Encoding in an HTTP/1.0 request")


def check_head(raw: bytes, limits: Limits) -> Head:
    """Read one raw request head (request line through the blank line) the RFC 9112 way; raises Refusal."""
    if len(raw) > limits.max_header_bytes:
        raise Refusal(f"request head of {len(raw)} bytes is over limits.max_header_bytes "
                      f"({limits.max_header_bytes})", 431)
    if not raw.endswith(b"\r\n\r\n"):
        raise Refusal("request head not ended by CRLF CRLF (bare LF)")
    lines = raw[:-4].split(b"\r\n")
    for line in lines:
        if b"\n" in line or b"\r" in line:
            raise Refusal("bare CR or LF in the request head")
    parts = lines[0].split(b" ")
    if len(parts) != 3:
        raise Refusal("request line is not METHOD SP TARGET SP VERSION")
    fields = []
    for line in lines[1:]:
        if line[:1] in (b" ", b"\t"):
            raise Refusal("folded header line (obs-fold)")
        name, colon, value = line.partition(b":")
        if not colon:
            raise Refusal("header line without a colon")
        fields.append((name, value.strip(b" \t")))
    head = Head(parts[0], parts[1], parts[2], tuple(fields))
    check_parts(head, limits)
    return head


def check_request(req: http.Request, limits: Limits) -> None:
    """The same rules on a request as mitmproxy parsed it (what it would forward); raises Refusal."""
    d = req.data
    target = d.path
    if d.authority and d.method != b"CONNECT":  # absolute-form: scheme://authority/path
        target = d.scheme + b"://" + d.authority + d.path
    check_parts(Head(d.method, target, d.http_version, tuple(req.headers.fields)), limits)


def refusal_response(r: Refusal) -> http.Response:
    return http.Response.make(r.status, f"Bad request: {r.reason}\n".encode(),
                              {"Content-Type": "text/plain", "Connection": "close"})


# ---------------------------------------------------------------------------------------------
# The addon


class StrictRequests:
    """First addon: refuses what the strict reading refuses, on the request as parsed."""

    def __init__(self) -> None:
        self.limits = Limits()
        self.refused: Counter[int] = Counter()  # refused request heads by status (metrics)

    def apply(self, cfg: GatewayConfig) -> None:
        self.limits = cfg.limits
        mitmcompat.screen_http1_heads(self.screen)
        mitmcompat.answer_before_continue()

    def requestheaders(self, flow: http.HTTPFlow) -> None:
        if flow.response or flow.error or not flow.live:
            return
        try:
            check_request(flow.request, self.limits)
        except Refusal as r:
            self.refuse(r, flow.client_conn.peername)
            flow.metadata[keys.REFUSED_REQUEST] = r.reason
            flow.comment = f"bad request: {r.reason}"
            answer(flow, refusal_response(r))  # or drop it, when mitmproxy streams its body

    def screen(self, buf: bytes, peer) -> bytes | None:
        """The raw answer to send before closing, when the head arriving in `buf` is refused."""
        try:
            screen(buf, self.limits)
        except Refusal as r:
            self.refuse(r, peer)
            return wire.assemble_response(refusal_response(r))
        return None

    def refuse(self, r: Refusal, peer) -> None:
        self.refused[r.status] += 1
        logger.info(f"client {peer[0] if peer else '?'}: {r.status} {r.reason}; connection closed")


_LEADING_BLANK = re.compile(rb"(?:\r\n)*")


def screen(buf: bytes, limits: Limits) -> None:
    """Check the next head in a connection's receive buffer, as far as it has arrived; raises Refusal.

    `buf` is what mitmproxy's HTTP/1 server is about to cut a head from (mitmcompat.HEAD_END, h11's
    rule): the check sees exactly the bytes mitmproxy will parse."""
    start = _LEADING_BLANK.match(buf).end()  # RFC 9112 2.2: empty lines before a request line are ignored
    if buf[start:start + 1] == b"\n":
        raise Refusal("bare LF before the request line")
    m = mitmcompat.HEAD_END.search(buf, start)
    if m is None:
        if len(buf) - start > limits.max_header_bytes:
            raise Refusal(f"request head over limits.max_header_bytes ({limits.max_header_bytes})", 431)
        return
    if start:  # mitmproxy consumes a leading empty line on its own; the head is checked next time
        return
    head = buf[:m.end()]
    if not fast_accepts(head, limits):
        check_head(head, limits)
