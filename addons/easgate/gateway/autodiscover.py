"""Redirects that never name an internal host: 451 `X-MS-Location`, `Location`, Autodiscover answers.

Exchange behind a gateway knows itself by its internal name. When it moves a mailbox it answers
ActiveSync with HTTP 451 and `X-MS-Location: https://exchange.internal/Microsoft-Server-ActiveSync`
([MS-ASHTTP] 3.1.5.2.2: "all subsequent requests SHOULD use the URL specified within the
X-MS-Location header"), and its Autodiscover answer names the same URL in `Action/Settings/Server/Url`
and `Name` ([MS-ASCMD] 2.2.1.1, 4.2.4; schema 6.2 and 6.4) or, from `autodiscover.json`, in `Url`.
A phone that follows one leaves the gateway (or fails), and the internal name leaks.

On routes with `rewrite_redirects`, every absolute http(s) URL in those places whose host is not a
public one (`public_hosts`, and the host the client itself addressed; in XML, character data only,
never namespace names) is rewritten to the host (and
port) the client addressed, or to the first public host. Path and query are kept. Headers are
rewritten for every response; bodies only for answers under `/autodiscover/` (text, XML or JSON),
which are never streamed so they can be rewritten whole.
"""

from __future__ import annotations

import logging
import re

from mitmproxy import http

from ..core import keys
from .config import RewriteRedirects
from .shared import Current

logger = logging.getLogger(__name__)

REDIRECT_HEADERS = ("X-MS-Location", "Location", "Content-Location")
AUTODISCOVER_PREFIX = "/autodiscover/"
MAX_BODY = 1024 * 1024  # an Autodiscover answer is a few KB

# scheme://authority, also with JSON's escaped slashes (https:\/\/host)
_URL = re.compile(r"(?i)(https?:(?:\\?/){2})([^/\\\s<>\"'?#]*)")


def _host_of(authority: str) -> str:
    """The lower-cased host of `[userinfo@]host[:port]` (IPv6 literals keep their brackets)."""
    a = authority.rpartition("@")[2]
    if a.startswith("["):
        return a[: a.find("]") + 1].lower() if "]" in a else a.lower()
    return a.partition(":")[0].lower()


def public_authority(client_host: str, rule: RewriteRedirects) -> str:
    """Where rewritten URLs point: the client's `Host` (with its port) if it is public, else the first public host."""
    host = _host_of(client_host)
    if not rule.public_hosts or host in rule.public_hosts:
        return client_host.lower()
    return rule.public_hosts[0]


_TAG = re.compile(r"<[^>]*>")


def rewrite_xml(text: str, client_host: str, rule: RewriteRedirects) -> tuple[str, int]:
    """`rewrite_text` on the character data of an XML document only: namespace names
    (`xmlns="http://schemas.microsoft.com/..."`) and other attributes are identifiers, not places to go."""
    out: list[str] = []
    total = pos = 0
    for m in _TAG.finditer(text):
        chunk, n = rewrite_text(text[pos : m.start()], client_host, rule)
        out += [chunk, m.group(0)]
        total += n
        pos = m.end()
    chunk, n = rewrite_text(text[pos:], client_host, rule)
    out.append(chunk)
    return "".join(out), total + n


def rewrite_text(text: str, client_host: str, rule: RewriteRedirects) -> tuple[str, int]:
    """`text` with every URL naming a non-public host pointed at the public one; (text, how many)."""
    allowed = set(rule.public_hosts) | {_host_of(client_host)}
    target = public_authority(client_host, rule)
    count = 0

    def sub(m: re.Match) -> str:
        nonlocal count
        if _host_of(m.group(2)) in allowed:
            return m.group(0)
        count += 1
        return m.group(1) + target

    return _URL.sub(sub, text), count


class RedirectRewrite:
    """Rewrites redirects and Autodiscover answers on routes with `rewrite_redirects`."""

    def __init__(self, current: Current) -> None:
        self.current = current  # the config in force: the route's rewrite_redirects
        self.rewritten = 0

    def _rule(self, flow: http.HTTPFlow) -> RewriteRedirects | None:
        name = flow.metadata.get(keys.ROUTE)
        if not name or flow.response is None or self.current.config is None:
            return None
        try:
            return self.current.config.route(name).rewrite_redirects
        except KeyError:  # a reload removed the route while the request was in flight
            return None

    @staticmethod
    def _client_host(flow: http.HTTPFlow) -> str:
        """The Host the client addressed (the pool may have sent the upstream another)."""
        return flow.metadata.get(keys.CLIENT_HOST) or flow.request.host_header or ""

    @staticmethod
    def _is_autodiscover(flow: http.HTTPFlow) -> bool:
        return flow.request.path.lower().startswith(AUTODISCOVER_PREFIX)

    def responseheaders(self, flow: http.HTTPFlow) -> None:
        rule = self._rule(flow)
        if rule is None:
            return
        client_host = self._client_host(flow)
        headers = flow.response.headers
        for name in REDIRECT_HEADERS:
            values = headers.get_all(name)
            if not values:
                continue
            new = [rewrite_text(v, client_host, rule) for v in values]
            if any(n for _, n in new):
                headers.set_all(name, [v for v, _ in new])
                self._count(flow, name, sum(n for _, n in new))
        if self._is_autodiscover(flow) and flow.response.stream:
            flow.response.stream = False  # the body is rewritten whole in `response`

    def response(self, flow: http.HTTPFlow) -> None:
        rule = self._rule(flow)
        if rule is None or not self._is_autodiscover(flow):
            return
        resp = flow.response
        if resp.raw_content is None or not resp.raw_content:
            return
        if len(resp.raw_content) > MAX_BODY:
            # Too big to be an Autodiscover answer, and too big to check: do not pass it on unread.
            flow.response = http.Response.make(502, b"easgate: Autodiscover answer too large\n",
                                               {"Content-Type": "text/plain"})
            return
        try:
            text = resp.get_text(strict=True)
        except ValueError:
            text = None
        if text is None:
            # An encoding mitmproxy cannot undo: unchecked, it might name an internal host.
            flow.response = http.Response.make(502, b"easgate: Autodiscover answer could not be checked\n",
                                               {"Content-Type": "text/plain"})
            return
        rewrite = rewrite_xml if text.lstrip().startswith("<") else rewrite_text
        new, n = rewrite(text, self._client_host(flow), rule)
        if n:
            resp.set_text(new)
            self._count(flow, "body", n)

    def _count(self, flow: http.HTTPFlow, where: str, n: int) -> None:
        self.rewritten += n
        flow.metadata.setdefault(keys.REWRITTEN, []).append(where)
        logger.debug(f"easgate: rewrote {n} internal URL(s) in {where} of {flow.request.path[:80]}")
