"""The gateway's counters as Prometheus text on an optional metrics listener.

    easgate run CONFIG -- --set easgate_metrics=127.0.0.1:9090
    curl -s http://127.0.0.1:9090/metrics

``easgate_metrics`` is ``HOST:PORT`` (``PORT`` alone, or ``:PORT``, means 127.0.0.1); empty (the
default) means no listener. Port 0 takes a free port; the log line ``easgate: metrics at
http://HOST:PORT/metrics`` says which. The listener runs in mitmproxy's event loop, answers
``GET /metrics`` (text format 0.0.4) and ``GET /healthz``, and nothing else. It has no
authentication: keep it on loopback or a management network (a non-loopback address is logged
as a warning).

The numbers are the ones ``easgate.status`` shows (requests per route, decisions by verdict and
source, the decision cache, connector calls and errors, policy reloads) plus what only this addon
sees: responses by route and status code, upstream errors, refused connections' requests, and,
in mitmweb, the flows kept in memory and those evicted by ``easgate_max_flows``. Counters start at
zero when the process starts (a config reload restarts the per-route request counters: Prometheus'
``rate()`` treats that as a counter reset). Histograms: decision latency (by source) and upstream
latency (by route, long polls apart); a gauge: long polls (Ping, Sync) held upstream, by route.

Under ``easgate run`` with workers, the supervisor owns ``easgate_metrics``: each worker serves this
document on a Unix socket in the directory named by ``EASGATE_METRICS_DIR`` instead, writes its
last document there when it exits, and the supervisor adds them all up (runtime/aggregate.py).
"""

from __future__ import annotations

import asyncio
import bisect
import ipaddress
import logging
import os
import time
import weakref
from collections import Counter
from pathlib import Path

from mitmproxy import ctx, exceptions, http

from .. import __version__
from ..core import keys, net
from ..core.decision import Decision
from . import mitmcompat
from .addon import ContentSwitch, UpstreamPools, request_command
from .audittrail import AuditTrail
from .authorize import ActiveSyncGate
from .http1 import StrictRequests
from .shared import Current

logger = logging.getLogger("easgate")

MAX_REQUEST_HEAD = 8192
READ_TIMEOUT_S = 5.0
#: set by the supervisor: serve on DIR/w<pid>.sock and leave DIR/w<pid>.final on exit
WORKER_DIR_ENV = "EASGATE_METRICS_DIR"
DECISION_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)
# long polls wait up to an hour by design: the upper buckets are for them
UPSTREAM_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0, 900.0,
                    1800.0, 3600.0)


def parse_listen(value: str) -> tuple[str, int]:
    """'HOST:PORT', ':PORT' or 'PORT' -> (host, port); raises ValueError with the reason."""
    return net.parse_listen(value)


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _esc(v: object) -> str:
    return str(v).replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


class _Doc:
    """Prometheus text exposition format 0.0.4."""

    def __init__(self) -> None:
        self.lines: list[str] = []

    def metric(self, name: str, kind: str, help: str, samples) -> None:
        self.lines.append(f"# HELP {name} {help}")
        self.lines.append(f"# TYPE {name} {kind}")
        if isinstance(samples, (int, float)) or samples is None:
            samples = [({}, samples)]
        for labels, value in samples:
            if value is None:
                continue
            lab = ",".join(f'{k}="{_esc(v)}"' for k, v in labels.items())
            self.lines.append(f"{name}{{{lab}}} {_num(value)}" if lab else f"{name} {_num(value)}")

    def histogram(self, name: str, help: str, h: Histogram) -> None:
        self.lines.append(f"# HELP {name} {help}")
        self.lines.append(f"# TYPE {name} histogram")
        for labels, (counts, total, n) in sorted(h.series.items()):
            lab = "".join(f'{k}="{_esc(v)}",' for k, v in labels)
            cum = 0
            for bound, c in zip(h.buckets, counts):
                cum += c
                self.lines.append(f'{name}_bucket{{{lab}le="{_num(float(bound))}"}} {cum}')
            self.lines.append(f'{name}_bucket{{{lab}le="+Inf"}} {n}')
            lab = lab.rstrip(",")
            self.lines.append(f"{name}_sum{{{lab}}} {_num(total)}" if lab else f"{name}_sum {_num(total)}")
            self.lines.append(f"{name}_count{{{lab}}} {n}" if lab else f"{name}_count {n}")

    def text(self) -> str:
        return "\n".join(self.lines) + "\n"


class Histogram:
    """A Prometheus histogram per label set: bucket counts (not cumulative here), sum, count."""

    def __init__(self, buckets: tuple[float, ...]) -> None:
        self.buckets = buckets
        self.series: dict[tuple[tuple[str, str], ...], list] = {}

    def observe(self, labels: tuple[tuple[str, str], ...], value: float) -> None:
        s = self.series.get(labels)
        if s is None:
            s = self.series[labels] = [[0] * len(self.buckets), 0.0, 0]
        i = bisect.bisect_left(self.buckets, value)  # the first bucket with value <= its bound
        if i < len(self.buckets):
            s[0][i] += 1
        s[1] += value
        s[2] += 1


def _num(v: float) -> str:
    if isinstance(v, bool):
        return "1" if v else "0"
    if isinstance(v, int):
        return str(v)
    return repr(float(v))


class _ArrivedLive:
    """The gateway's first stage for Metrics: remembers which flows came in live."""

    name = "easgate-metrics-first"

    def __init__(self, seen: weakref.WeakSet) -> None:
        self.seen = seen

    def requestheaders(self, flow) -> None:
        if flow.live:
            self.seen.add(flow)


class Metrics:
    """Serves the counters; counts what the other addons don't."""

    name = "easgate-metrics"

    def __init__(self, current: Current, switch: ContentSwitch, strict: StrictRequests,
                 gate: ActiveSyncGate | None, audit: AuditTrail | None) -> None:
        # what it counts from the other parts, each handed in (docs/architecture.md)
        self.current, self.switch, self.strict, self.gate, self.audit = current, switch, strict, gate, audit
        self.server: asyncio.Server | None = None
        self.address: tuple[str, int] | None = None
        self.responses: Counter = Counter()  # (route, status code)
        self.upstream_errors: Counter = Counter()  # route
        self.refused = 0
        self.handshakes: Counter = Counter()  # (side: client | upstream, resumed: yes | no)
        self.started = time.time()
        self._want: tuple[str, int] | None = None
        self._running = False
        self.decision_seconds = Histogram(DECISION_BUCKETS)  # by source
        self.upstream_seconds = Histogram(UPSTREAM_BUCKETS)  # by route, long poll or not
        self.upstream: dict[str, tuple[str, str | None]] = {}  # flow id -> (route, long-poll command)
        self.worker_dir = os.environ.get(WORKER_DIR_ENV) or None
        self._observing = False
        # Flows that arrived live: the gateway kills refused ones (flow.live turns False) before this
        # addon sees them, so a first stage notes them on the way in (chain.py puts it first).
        self._arrived_live: weakref.WeakSet = weakref.WeakSet()
        self.first_stage = _ArrivedLive(self._arrived_live)

    def load(self, loader) -> None:
        loader.add_option("easgate_metrics", str, "",
                          "HOST:PORT of a Prometheus metrics listener (GET /metrics); PORT alone means "
                          "127.0.0.1. Empty: none.")

    def configure(self, updated) -> None:
        if "easgate_metrics" not in updated:
            return
        value = ctx.options.easgate_metrics
        if not value:
            want = None
        else:
            try:
                want = parse_listen(value)
            except ValueError as e:
                raise exceptions.OptionsError(f"easgate_metrics: {e}") from None
        if want == self._want:
            return
        self._want = want
        if self._running:
            asyncio.get_running_loop().create_task(self._restart())

    async def running(self) -> None:
        self._running = True
        gate = self.gate
        if gate is not None and not self._observing:
            gate.observers.append(self.observe_decision)
            self._observing = True
        await self._restart()

    async def done(self) -> None:
        self._running = False
        await self._stop()
        if self.worker_dir and self._want is not None:
            # the supervisor keeps counting what this worker did after it is gone
            base = Path(self.worker_dir) / f"w{os.getpid()}"
            try:
                tmp = base.with_suffix(".tmp")
                tmp.write_text(self.render())
                tmp.replace(base.with_suffix(".final"))
                base.with_suffix(".sock").unlink(missing_ok=True)
            except OSError as e:
                logger.warning(f"easgate: could not leave this worker's last metrics for the supervisor: {e}")

    async def _stop(self) -> None:
        if self.server is not None:
            self.server.close()
            try:
                await asyncio.wait_for(self.server.wait_closed(), 2)
            except TimeoutError:
                pass
            self.server = None
            self.address = None

    async def _restart(self) -> None:
        await self._stop()
        if self._want is None:
            return
        host, port = self._want
        if self.worker_dir:  # a worker: the supervisor serves easgate_metrics and asks us here
            path = Path(self.worker_dir) / f"w{os.getpid()}.sock"
            try:
                self.server = await asyncio.start_unix_server(self._client, str(path))
            except OSError as e:
                logger.error(f"easgate: metrics socket {path} not started: {e.strerror or e}")
            return
        try:
            self.server = await asyncio.start_server(self._client, host, port)
        except OSError as e:
            logger.error(f"easgate: metrics listener on {host}:{port} not started: {e.strerror or e}")
            return
        sock = self.server.sockets[0].getsockname()
        self.address = (sock[0], sock[1])
        shown = f"[{sock[0]}]" if ":" in sock[0] else sock[0]
        logger.info(f"easgate: metrics at http://{shown}:{sock[1]}/metrics")
        if not is_loopback(host):
            logger.warning(f"easgate: the metrics listener on {host}:{sock[1]} is not on loopback and has no "
                           "authentication")

    # -- what this addon counts ---------------------------------------------------------------

    def requestheaders(self, flow: http.HTTPFlow) -> None:
        if keys.REFUSED in flow.metadata and flow in self._arrived_live:
            self.refused += 1

    def observe_decision(self, flow: http.HTTPFlow, decision: Decision, seconds: float) -> None:
        self.decision_seconds.observe((("source", decision.source),), seconds)

    def request(self, flow: http.HTTPFlow) -> None:
        """The request goes upstream now (routed, allowed): time it, count it if it is a long poll."""
        if flow.response or flow.error or not flow.live:
            return
        route = flow.metadata.get(keys.ROUTE)
        if not route:
            return
        cmd = request_command(flow)
        self.upstream[flow.id] = (route, cmd if cmd in UpstreamPools.LONG_POLL_COMMANDS else None)

    def response(self, flow: http.HTTPFlow) -> None:
        if flow.live or flow.is_replay:
            route = flow.metadata.get(keys.ROUTE) or "none"
            self.responses[(route, flow.response.status_code)] += 1
        up = self.upstream.pop(flow.id, None)
        if up is not None:
            sent = flow.request.timestamp_end or flow.request.timestamp_start
            got = flow.response.timestamp_start or time.time()
            self.upstream_seconds.observe((("route", up[0]), ("long_poll", "yes" if up[1] else "no")),
                                          max(0.0, got - sent))

    def tls_established_client(self, data) -> None:
        self.handshakes["client", "yes" if mitmcompat.session_reused(data.ssl_conn) else "no"] += 1

    def tls_established_server(self, data) -> None:
        self.handshakes["upstream", "yes" if mitmcompat.session_reused(data.ssl_conn) else "no"] += 1

    def error(self, flow: http.HTTPFlow) -> None:
        self.upstream.pop(flow.id, None)
        decision = flow.metadata.get(keys.DECISION)
        if keys.REFUSED in flow.metadata or (decision is not None and not decision.get("allow")):
            return  # killed on purpose (refused, or denied with deny.action: drop)
        route = flow.metadata.get(keys.ROUTE)
        if route:
            self.upstream_errors[route] += 1

    # -- the document -------------------------------------------------------------------------

    def render(self) -> str:
        d = _Doc()
        d.metric("easgate_info", "gauge", "easgate version.", [({"version": __version__}, 1)])
        d.metric("easgate_start_time_seconds", "gauge", "Unix time the gateway process started.", self.started)
        switch = self.switch
        counts = dict(getattr(switch, "counts", {}) or {})
        d.metric("easgate_requests_total", "counter", "Requests by the route they took ('none': no route, 404).",
                 [({"route": "none" if k == "(none)" else k}, v) for k, v in sorted(counts.items())])
        d.metric("easgate_refused_requests_total", "counter",
                 "Requests on connections the gateway refused (plain HTTP, missing or invalid client certificate).",
                 self.refused)
        strict = self.strict
        d.metric("easgate_bad_requests_total", "counter",
                 "Request heads refused by the strict HTTP/1 reading (connection closed), by status code.",
                 [({"code": c}, v) for c, v in sorted(getattr(strict, "refused", {}).items())])
        d.metric("easgate_responses_total", "counter", "Responses sent to clients, by route and status code.",
                 [({"route": r, "code": c}, v) for (r, c), v in sorted(self.responses.items(), key=str)])
        d.metric("easgate_tls_handshakes_total", "counter",
                 "TLS handshakes completed, by side (client: phones; upstream: to pool servers) and whether "
                 "they resumed a session.",
                 [({"side": side, "resumed": r}, self.handshakes[side, r])
                  for side in ("client", "upstream") for r in ("no", "yes")])
        held = Counter((route, cmd) for route, cmd in self.upstream.values() if cmd)
        cfg = self.current.config
        for r in getattr(cfg, "routes", ()) or ():
            if r.authorize:
                for cmd in UpstreamPools.LONG_POLL_COMMANDS:
                    held.setdefault((r.name, cmd), 0)
        d.metric("easgate_long_polls_held", "gauge",
                 "ActiveSync long polls (Ping, Sync) waiting for Exchange's answer now, by route and command.",
                 [({"route": r, "command": c}, v) for (r, c), v in sorted(held.items())])
        d.histogram("easgate_upstream_response_seconds",
                    "Time from the request sent upstream to the response's first byte, by route; long_poll=yes "
                    "for Ping and Sync, which wait for mail by design.", self.upstream_seconds)
        d.metric("easgate_upstream_errors_total", "counter",
                 "Requests that ended in an error instead of a response (upstream down, timeout, reset), by route.",
                 [({"route": r}, v) for r, v in sorted(self.upstream_errors.items())])
        gate = self.gate
        counters = dict(gate.counters) if gate is not None else {}
        decisions = []
        for k, v in sorted(counters.items()):
            verdict, _, source = k.partition("_")
            if verdict in ("allow", "deny") and source:
                decisions.append(({"verdict": verdict, "source": source}, v))
        d.metric("easgate_decisions_total", "counter", "ActiveSync authorization decisions by verdict and source.",
                 decisions)
        d.histogram("easgate_decision_seconds", "Time to decide on an ActiveSync request (policy, cache, connector), "
                    "by the source that decided.", self.decision_seconds)
        cache = gate.cache.stats if gate is not None and gate.cache is not None else {}
        hits, misses = cache.get("hits", 0), cache.get("misses", 0)
        d.metric("easgate_cache_hits_total", "counter", "Decision cache lookups answered from the cache.", hits)
        d.metric("easgate_cache_misses_total", "counter", "Decision cache lookups that went to the backend.", misses)
        d.metric("easgate_cache_hit_ratio", "gauge", "hits / (hits + misses) since start (NaN before any lookup).",
                 hits / (hits + misses) if hits + misses else float("nan"))
        d.metric("easgate_cache_entries", "gauge", "Decisions in the cache.", cache.get("entries", 0))
        d.metric("easgate_cache_evictions_total", "counter", "Decisions evicted from the cache (LRU bound).",
                 cache.get("evictions", 0))
        d.metric("easgate_cache_shared_total", "counter",
                 "Requests that shared another request's backend call (single flight).", cache.get("shared", 0))
        conn = getattr(gate, "connector", None)
        d.metric("easgate_connector_calls_total", "counter", "Calls to the connector (XNC callout).",
                 getattr(conn, "calls", 0) if conn else 0)
        d.metric("easgate_connector_errors_total", "counter",
                 "Connector calls that failed (timeout, refused, non-200, not a decision).",
                 counters.get("connector_errors", 0))
        d.metric("easgate_connector_fail_mode_total", "counter", "Decisions made by on_connector_error, by mode.",
                 [({"mode": k.removeprefix("fail_mode_")}, v) for k, v in sorted(counters.items())
                  if k.startswith("fail_mode_")])
        shared = gate.shared.stats if gate is not None and gate.shared is not None else None
        if shared is not None:  # the Redis tier (gateway/sharedcache.py)
            d.metric("easgate_shared_cache_up", "gauge", "1 while Redis answers (0: local cache and connector only).",
                     int(bool(shared.get("up"))))
            d.metric("easgate_shared_cache_total", "counter",
                     "Shared cache events: hits, misses, waits, fallbacks, redis_errors, revocations, ...",
                     [({"event": k}, v) for k, v in sorted(shared.items()) if k != "up"])
        d.metric("easgate_policy_reloads_total", "counter", "Policy file reloads.", counters.get("policy_reloads", 0))
        d.metric("easgate_policy_reload_errors_total", "counter", "Policy reloads that failed (last good kept).",
                 counters.get("policy_reload_errors", 0))
        trail = self.audit
        if trail is not None:
            st = trail.log.stats
            d.metric("easgate_audit_writable", "gauge", "1 while the audit log accepts lines, 0 while it cannot be written.",
                     1 if trail.log.can_accept() else 0)
            d.metric("easgate_audit_lines_written_total", "counter", "Audit lines written.", st.get("lines_written", 0))
            d.metric("easgate_audit_lines_lost_total", "counter", "Audit lines that could not be queued (queue full).",
                     st.get("lines_lost", 0))
            d.metric("easgate_audit_write_errors_total", "counter", "Failed writes to the audit log (each retried).",
                     st.get("write_errors", 0))
            d.metric("easgate_audit_outages_total", "counter", "Times the audit log became unwritable.",
                     st.get("outages", 0))
            d.metric("easgate_audit_denied_total", "counter",
                     "Requests denied because their audit line could not be written (audit.on_error=deny).",
                     st.get("requests_denied", 0))
        view = ctx.master.addons.get("view") if ctx.master else None
        if view is not None:
            d.metric("easgate_flows_in_memory", "gauge", "Flows mitmweb keeps in memory.", view.store_count())
        limit = ctx.master.addons.get("easgate-flowlimit") if ctx.master else None
        if limit is not None:
            d.metric("easgate_flows_evicted_total", "counter", "Flows removed from memory by easgate_max_flows.",
                     limit.evicted)
        return d.text()

    # -- the listener -------------------------------------------------------------------------

    async def _client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), READ_TIMEOUT_S)
        except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, TimeoutError, ConnectionError):
            writer.close()
            return
        method = "GET"
        try:
            if len(head) > MAX_REQUEST_HEAD:
                status, body, ctype = "431 Request Header Fields Too Large", b"", "text/plain"
            else:
                line = head.split(b"\r\n", 1)[0].decode("latin-1")
                method, _, rest = line.partition(" ")
                path = rest.split(" ", 1)[0].split("?", 1)[0]
                if method not in ("GET", "HEAD"):
                    status, body, ctype = "405 Method Not Allowed", b"only GET\n", "text/plain"
                elif path == "/metrics":
                    status, ctype = "200 OK", "text/plain; version=0.0.4; charset=utf-8"
                    try:
                        body = self.render().encode()
                    except Exception:
                        logger.exception("easgate: metrics could not be rendered")
                        status, body, ctype = "500 Internal Server Error", b"", "text/plain"

                elif path == "/healthz":
                    ok = self.current.config is not None
                    status = "200 OK" if ok else "503 Service Unavailable"
                    body, ctype = (b"ok\n" if ok else b"not configured\n"), "text/plain"
                else:
                    status, body, ctype = "404 Not Found", b"see /metrics\n", "text/plain"
            writer.write(f"HTTP/1.1 {status}\r\nContent-Type: {ctype}\r\nContent-Length: {len(body)}\r\n"
                         "Connection: close\r\n\r\n".encode() + (b"" if method == "HEAD" else body))
            await writer.drain()
        except ConnectionError:
            pass
        finally:
            writer.close()
