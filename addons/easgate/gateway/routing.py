"""Content switching: the first route that matches, in priority order, decides where a request goes.

The route is chosen once, in `requestheaders` (before any body byte is forwarded, which matters for
streamed bodies), and stored on the flow. Header injection and authorization read that one route;
nothing re-matches paths elsewhere, so no request can reach a guarded upstream by matching
differently in two places.
"""

from __future__ import annotations

import itertools
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

from mitmproxy import flowfilter, http

from ..core.net import host_of
from ..core.paths import normalize_path
from .config import GatewayConfig, Match, Pool, Route, Upstream

logger = logging.getLogger(__name__)



@dataclass(frozen=True, slots=True)
class RequestView:
    method: str
    host: str  # lower case, without port
    path: str  # normalised, without query
    headers: http.Headers
    cert_status: str  # none | verified | invalid


Predicate = Callable[[RequestView, http.HTTPFlow | None], bool]


def compile_match(m: Match) -> Predicate:
    """One closure per route: every criterion that is set must hold."""
    if m.any:
        return lambda rv, f: True
    checks: list[Predicate] = []
    if m.path_prefix is not None:
        prefix = m.path_prefix
        if m.ignore_case:
            low = prefix.lower()
            checks.append(lambda rv, f: rv.path.lower().startswith(low))
        else:
            checks.append(lambda rv, f: rv.path.startswith(prefix))
    if m.hosts:
        hosts = frozenset(m.hosts)
        checks.append(lambda rv, f: rv.host in hosts)
    if m.methods:
        methods = frozenset(m.methods)
        checks.append(lambda rv, f: rv.method in methods)
    for name in m.header_present:
        checks.append(lambda rv, f, name=name: name in rv.headers)
    for name, value in m.header_equals:
        checks.append(lambda rv, f, name=name, value=value: rv.headers.get_all(name) == [value])
    if m.client_cert is not None:
        want = m.client_cert
        checks.append({
            "present": lambda rv, f: rv.cert_status != "none",
            "absent": lambda rv, f: rv.cert_status == "none",
            "verified": lambda rv, f: rv.cert_status == "verified",
            "unverified": lambda rv, f: rv.cert_status != "verified",
        }[want])
    if m.filter is not None:
        flt = flowfilter.parse(m.filter)
        checks.append(lambda rv, f: f is not None and bool(flt(f)))
    if len(checks) == 1:
        return checks[0]
    return lambda rv, f: all(c(rv, f) for c in checks)


class Router:
    """Routes in priority order plus the default; pure apart from the optional flow filter."""

    def __init__(self, cfg: GatewayConfig) -> None:
        self.routes = [(r, compile_match(r.match)) for r in cfg.routes if r.match is not None]
        self.default = cfg.route(cfg.default_route) if cfg.default_route else None

    def select(self, rv: RequestView, flow: http.HTTPFlow | None = None) -> Route | None:
        for route, pred in self.routes:
            if pred(rv, flow):
                return route
        return self.default


class Balancer:
    """Round robin over a pool's servers; a server that refused a connection sits out a while."""

    def __init__(self, pools: dict[str, Pool], clock: Callable[[], float] = time.monotonic) -> None:
        self.pools = pools
        self.clock = clock
        self._rr = {name: itertools.cycle(range(len(p.servers))) for name, p in pools.items()}
        self.down_until: dict[Upstream, float] = {}

    def pick(self, pool: Pool) -> Upstream:
        now = self.clock()
        n = len(pool.servers)
        rr = self._rr[pool.name]
        for _ in range(n):
            server = pool.servers[next(rr)]
            if self.down_until.get(server, 0.0) <= now:
                return server
        # Every server is marked down: try the one that comes back first rather than fail outright.
        # A pool is never out of service by mark alone; a server that accepts is up again (mark_up).
        return min(pool.servers, key=lambda s: self.down_until.get(s, 0.0))

    def mark_down(self, server: Upstream, pool: Pool, reason: str) -> None:
        if pool.down_time_s > 0:
            self.down_until[server] = self.clock() + pool.down_time_s
            logger.warning(f"upstream {server.url} (pool {pool.name}) marked down for {pool.down_time_s:g}s: {reason}")

    def mark_up(self, server: Upstream, pool: Pool) -> None:
        if self.down_until.pop(server, 0.0) > self.clock():
            logger.info(f"upstream {server.url} (pool {pool.name}) is up again (it accepted a connection)")

    def is_down(self, server: Upstream) -> bool:
        return self.down_until.get(server, 0.0) > self.clock()


def request_view(flow: http.HTTPFlow, cert_status: str, path: str | None = None,
                 host_header: str | None = None) -> RequestView:
    """What routes match on; `path` is the already normalised path, `host_header` the request's
    Host header (Request.host_header), when the caller has them."""
    req = flow.request
    host = host_of((req.host_header if host_header is None else host_header) or "")
    if path is None:
        path = normalize_path(req.path)
    return RequestView(req.method.upper(), host, path, req.headers, cert_status)
