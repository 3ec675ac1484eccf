"""The gateway's addons and the one that owns the configuration.

`Gateway` declares the `easgate_config` option, loads the YAML file in `configure()` (an error is an
`OptionsError`, so mitmproxy refuses to start), forces the mitmproxy options a gateway depends on,
and hands the parsed config to its sub-addons, which run in this order for every request:

    StrictRequests -> TlsOffload -> StripCertHeaders -> ContentSwitch -> ClientCertHeader -> ActiveSyncGate
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import difflib
import functools
import logging
import re
import time
import weakref
from collections.abc import Callable

from mitmproxy import connection, ctx, exceptions, http
from mitmproxy.net import tls as net_tls
from mitmproxy.proxy import mode_specs
from OpenSSL import SSL

from ..core import keys
from ..core.errors import ConfigError
from ..core.net import parse_listen
from ..core.paths import normalize_path
from . import certheader, mitmcompat
from .audittrail import AuditTrail
from .config import GatewayConfig, Pool, Upstream, load_config
from .connections import Connections
from .finalcheck import Ledger
from .http1 import StrictRequests
from .proxyproto import ProxyProtocol
from .respond import answer, drop
from .routing import Balancer, Router, request_view
from .shared import Current
from .tls import TlsOffload

logger = logging.getLogger("easgate")

# What the proxy core must do for a gateway; set by Gateway.configure whatever the command line says.
PLACEHOLDER_TARGET = "http://127.0.0.1:9"  # never contacted: every request is routed or answered
# how a connect cancelled by connect_timeout_s reads in server.error ("easgate: no connection within 5s")
CONNECT_TIMEOUT = "easgate: no connection within"
# How long an upstream TLS session may be resumed after the full handshake that verified the
# server's certificate (nginx's ssl_session_timeout default): a replaced or revoked upstream
# certificate is checked again within this time. One full handshake per upstream server, worker
# and 5 minutes costs nothing.
UPSTREAM_SESSION_MAX_AGE_S = 300.0


def forced_options(cfg: GatewayConfig) -> dict:
    return {
        # TCP only (an https reverse mode would also open a QUIC listener that asks for no client cert);
        # client TLS is still detected and served by TlsOffload.
        "mode": [f"reverse:{PLACEHOLDER_TARGET}@{cfg.listen_host}:{cfg.listen_port}"],
        # with "eager", reverse mode connects to the placeholder before TLS
        "connection_strategy": "lazy",
        "keep_host_header": True,  # the Host header is a per-pool choice (ContentSwitch)
        "tcp_timeout": cfg.client_idle_timeout_s,  # ActiveSync Ping holds a request up to ~an hour
        "block_global": False,  # phones come from public addresses
        "onboarding": False,
        "http2": False,
        # the gateway's own listener; `-s` command lines pass server=false so that mitmproxy's
        # default listener never comes up before the script is loaded
        "server": True,
    }


def with_listen(cfg: GatewayConfig, listen: str) -> GatewayConfig:
    try:
        host, port = parse_listen(listen, default_host="0.0.0.0")
    except ValueError as e:
        raise ConfigError("--set easgate_listen", "", str(e), "e.g. 127.0.0.1:8443") from None
    return dataclasses.replace(cfg, listen_host=host, listen_port=port)


def unknown_options(opts, names=None) -> str | None:
    """One line naming the `--set` options nobody declared, or None.

    mitmproxy keeps an unknown `--set name=value` aside in case an addon declares it later and
    never says anything: a misspelled `easgate_confg=` would be ignored silently. `names`: only
    these count (the command line's; ~/.mitmproxy/config.yaml may hold mitmweb's options),
    default: the `easgate_*` ones.
    """
    deferred = getattr(opts, "deferred", {}) or {}
    found = sorted(n for n in deferred if (n in names if names is not None else n.startswith("easgate")))
    if not found:
        return None
    hints = []
    for n in found:
        close = difflib.get_close_matches(n, sorted(opts.keys()), n=1, cutoff=0.75)
        hints.append(f"{n} (did you mean {close[0]}?)" if close else n)
    return (f"unknown option{'s' if len(found) > 1 else ''} --set {', '.join(hints)}: "
            "`--options` lists them all")


class Gateway:
    """Owns the config file; its sub-addons do the work."""

    def __init__(self) -> None:
        # Each part gets the objects it reads, never this Gateway (docs/architecture.md).
        self.current = Current()  # the config in force; apply() sets it after every part swapped in
        self.strict = StrictRequests()  # one strict reading of the request head, before anything else
        # fields replaced in every config loaded (the offline replay turns the audit log off)
        self.overrides: dict = {}
        self._rolling_back = False
        self.ledger = Ledger()  # what FinalCheck requires: this pass's route, and an allow bound to the request
        self.gate = None  # the authorization stage (ActiveSyncGate), set by add_stage
        self.tls = TlsOffload()
        self.strip = certheader.StripCertHeaders()
        self.switch = ContentSwitch(self.tls, self.ledger)
        self.upstreams = UpstreamPools(self.current, self.switch)
        self.cert_header = certheader.ClientCertHeader(self.current, self.tls)
        self.connections = Connections()  # per-process connection cap, requests in flight
        self.proxyproto = ProxyProtocol()  # PROXY v1/v2 from trusted balancers, before TLS
        self.audit = AuditTrail()  # the authorization stage asks it before it allows
        self.addons: list = [self.connections, self.proxyproto, self.strict, self.tls, self.strip, self.switch, self.cert_header,
                             self.upstreams, self.audit]

    @property
    def config(self) -> GatewayConfig | None:
        """The config in force (None before the first one loaded)."""
        return self.current.config

    def add_stage(self, addon) -> None:
        """Later stages (authorization, audit) plug in after the routing ones."""
        self.addons.append(addon)
        if hasattr(addon, "fail_closed"):
            self.gate = addon

    def load(self, loader) -> None:
        # mitmproxy rolls a failed option update back by configuring every addon again with the old
        # values; an error raised then would replace the real one (a bad easgate_metrics reported
        # as "easgate_config is not set"). Note the failure so the rollback stays quiet.
        self._rolling_back = False
        loader.master.options.errored.connect(self._option_error)
        loader.add_option(
            "easgate_config", str, "",
            "The easgate gateway configuration (YAML), e.g. policies/gateway.yaml. Required.",
        )
        loader.add_option(
            "easgate_listen", str, "",
            "HOST:PORT to listen on, overriding the config's listen (port 0 picks a free port).",
        )

    def configure(self, updated) -> None:
        if not ({"easgate_config", "easgate_listen"} & set(updated)):
            if self.config is not None:  # someone changed a mitmproxy option: keep ours in force
                self._enforce()
            return
        rolling_back, self._rolling_back = self._rolling_back, False
        path = ctx.options.easgate_config
        if not path:
            if rolling_back:
                return  # the error that caused the rollback is the one to report
            raise exceptions.OptionsError(
                "easgate_config is not set: start with --set easgate_config=policies/gateway.yaml")
        try:
            cfg = load_config(path)
            if self.overrides:
                cfg = dataclasses.replace(cfg, **self.overrides)
            if ctx.options.easgate_listen:
                cfg = with_listen(cfg, ctx.options.easgate_listen)
            self.apply(cfg)
        except ConfigError as e:
            if e.file == "<config>":
                e = ConfigError(path, e.key, e.problem, e.fix)
            raise exceptions.OptionsError(str(e)) from None
        self._enforce()
        logger.info(f"easgate: loaded {cfg.path}: {len(cfg.routes)} routes, listening on "
                    f"{cfg.listen_host}:{cfg.listen_port}")

    def _option_error(self, exc: Exception) -> None:
        self._rolling_back = True

    def apply(self, cfg: GatewayConfig) -> None:
        """Build every sub-addon's state from cfg, then swap them all in: a part that fails to build
        (a certificate, a policy, a pool) leaves every part on the old config.

        Parts whose building can fail offer `prepare(cfg)`, which builds aside and returns the swap;
        the others' `apply(cfg)` only assigns and runs in the swap phase."""
        swaps: list[Callable[[], None]] = []
        for addon in self.addons:
            try:
                if hasattr(addon, "prepare"):
                    swaps.append(addon.prepare(cfg))
                elif hasattr(addon, "apply"):
                    swaps.append(functools.partial(addon.apply, cfg))
            except ConfigError as e:
                raise ConfigError(cfg.path, e.key, e.problem, e.fix) from None
        for swap in swaps:
            swap()
        self.current.config = cfg

    def _enforce(self) -> None:
        want = forced_options(self.config)
        changes = {k: v for k, v in want.items() if k in ctx.options and getattr(ctx.options, k) != v}
        if changes:
            ctx.options.update(**changes)

    def running(self) -> None:
        if self.config is None:
            logger.error("easgate: the gateway is not configured; refusing to run without it")
            ctx.master.shutdown()
            return
        if why := unknown_options(ctx.options):  # as a `-s` script; `easgate run` checked before
            logger.error(f"easgate: {why}; stopping")
            ctx.master.shutdown()
            return
        # Loaded as a `-s` script, the gateway is configured only after mitmproxy brought up its
        # listeners: with `--set server=false` there are none, and the gateway starts its own here.
        # A listener of any other mode (mitmproxy's default forward proxy on *:8080) means the
        # command line lacked that option: refuse rather than having run as an open proxy.
        ps = ctx.master.addons.get("proxyserver")
        if ps is None:
            return
        want = [mode_specs.ProxyMode.parse(m) for m in ctx.options.mode]
        have = {s.mode for s in ps.servers}
        if have - set(want):
            logger.error("easgate: mitmproxy started its own proxy listener before the gateway script was "
                         "loaded; start mitmdump/mitmweb with --set server=false (the gateway brings up its own)")
            ctx.master.shutdown()
            return
        if have != set(want):
            asyncio.get_running_loop().create_task(ps.servers.update(want))


class ContentSwitch:
    """Chooses the route in requestheaders and points the flow at one server of its pool."""

    def __init__(self, tls: TlsOffload, ledger: Ledger) -> None:
        self.tls = tls  # the client connection's TLS and certificate verdict
        self.ledger = ledger  # where the route of this pass is recorded for FinalCheck
        self.router: Router | None = None
        self.balancer: Balancer | None = None
        self.pools: dict[str, Pool] = {}
        self.counts: dict[str, int] = {}

    def prepare(self, cfg: GatewayConfig) -> Callable[[], None]:
        router, balancer = Router(cfg), Balancer(cfg.pools)
        counts = {r.name: 0 for r in cfg.routes} | {"(none)": 0, "(refused)": 0}

        def swap() -> None:
            self.router, self.balancer, self.pools, self.counts = router, balancer, cfg.pools, counts
        return swap

    def apply(self, cfg: GatewayConfig) -> None:
        self.prepare(cfg)()

    def requestheaders(self, flow: http.HTTPFlow) -> None:
        if flow.response or flow.error:
            return
        tls = self.tls
        if flow.live and (why := tls.refuse_reason(flow.client_conn)):
            logger.warning(f"client {flow.client_conn.peername[0]}: connection refused: {why}")
            self.counts["(refused)"] += 1
            flow.metadata[keys.REFUSED] = why
            flow.comment = f"refused: {why}"
            drop(flow)
            return
        verdict = tls.verdict(flow.client_conn)
        flow.metadata[keys.CLIENT_CERT] = verdict.as_dict()
        req = flow.request
        # The Host and Upgrade fields in one pass over the head (each mitmproxy look-up is a pass)
        hosts: list[bytes] = []
        upgrade = False
        for k, v in req.headers.fields:
            low = k.lower()
            if low == b"host":
                hosts.append(v)
            elif low == b"upgrade":
                upgrade = True
        if why := bad_host_values([h.decode("utf-8", "surrogateescape") for h in hosts]):
            flow.metadata[keys.ROUTE] = None
            answer(flow, http.Response.make(400, f"{why}\n".encode(), {"Content-Type": "text/plain"}))
            flow.comment = f"bad request: {why}"
            return
        # what Request.host_header reads (HTTP/1: the one Host field, checked above), before point()
        host_header = (req.host_header if req.is_http2 or req.is_http3
                       else hosts[0].decode("utf-8", "surrogateescape") if hosts else None)
        # No protocol switch (WebSocket, h2c, TCP upgrade): after a 101 the connection would be a
        # tunnel that no route, header rule or authorization sees again. ActiveSync needs none.
        if upgrade:
            del flow.request.headers["upgrade"]
            conn_tokens = [t.strip() for t in flow.request.headers.get("connection", "").split(",")]
            kept = [t for t in conn_tokens if t and t.lower() != "upgrade"]
            if kept:
                flow.request.headers["connection"] = ", ".join(kept)
            else:
                flow.request.headers.pop("connection", None)
        # Normalise first: route rules, filters and the upstream all see the same path.
        path, sep, query = flow.request.path.partition("?")
        norm = normalize_path(path)
        if norm != path:
            flow.request.path = norm + sep + query
        rv = request_view(flow, verdict.status, norm, host_header)
        route = self.router.select(rv, flow)
        if route is None:
            self.counts["(none)"] += 1
            flow.metadata[keys.ROUTE] = None
            answer(flow, http.Response.make(
                404, b"No route for this request on this gateway.\n", {"Content-Type": "text/plain"}))
            flow.comment = "no route: 404"
            return
        self.counts[route.name] += 1
        flow.metadata[keys.ROUTE] = route.name
        pool = self.pools[route.pool]
        self.point(flow, pool, self.balancer.pick(pool), host_header)
        self.ledger.routed(flow, route.name)

    @staticmethod
    def point(flow: http.HTTPFlow, pool: Pool, server: Upstream, client_host: str | None = None) -> None:
        """`client_host`: the request's Host header as it came, when the caller has read it already."""
        req = flow.request
        # Set the target on the request data directly: the scheme/host/port setters would each
        # rewrite the Host header, which is decided once below.
        req.data.scheme = server.scheme.encode()
        req.data.host = server.host
        req.data.port = server.port
        # An absolute-form target (POST https://other/... HTTP/1.1) would otherwise be forwarded
        # naming the internal upstream: send origin-form.
        req.data.authority = b""
        # The Host the client addressed, whatever the upstream gets: redirects point back at it.
        if keys.CLIENT_HOST not in flow.metadata:
            flow.metadata[keys.CLIENT_HOST] = (req.host_header if client_host is None else client_host) or ""
        if pool.host_header == "upstream":
            req.host_header = server.authority
        elif pool.host_header != "client":
            req.host_header = pool.host_header
        flow.metadata[keys.UPSTREAM] = server.url


_AUTHORITY = re.compile(r"(?:[A-Za-z0-9_.-]+|\[[0-9A-Fa-f:.]+\])(?::[0-9]{1,5})?")


def bad_host(req: http.Request) -> str | None:
    """Why the Host header can't be routed on, or None. A Host with '/', '@' or spaces would
    shift what URL filters and the upstream take for the path; two Hosts are ambiguous."""
    return bad_host_values(req.headers.get_all("host"))


def bad_host_values(hosts: list[str]) -> str | None:
    """bad_host on the request's Host values."""
    if len(hosts) > 1:
        return "several Host headers"
    if hosts and not _AUTHORITY.fullmatch(hosts[0]):
        return "invalid Host header"
    return None


def request_command(flow: http.HTTPFlow) -> str | None:
    """The ActiveSync command of a request: the identity's, else the query's `Cmd` (parsed only when
    the path can carry one: mitmproxy builds a whole query view for each look-up)."""
    cmd = (flow.metadata.get(keys.IDENTITY) or {}).get("command")
    if cmd:
        return cmd
    path = flow.request.data.path
    return flow.request.query.get("Cmd") if b"Cmd" in path or b"%" in path else None


class ResponseTimers:
    """The response deadlines of the requests in flight, with one asyncio timer per timeout value
    rather than one per request (a handle pushed on the loop's timer heap and cancelled off it again
    for every request). Requests with the same timeout expire in the order they started, so each
    timeout's deadlines form a queue, and its one timer is set for the oldest still waiting."""

    def __init__(self, expired: Callable[[http.HTTPFlow, Pool, float], None]) -> None:
        self.expired = expired  # called with (flow, pool, timeout) for a request past its deadline
        self.waiting: dict[str, tuple[float, http.HTTPFlow, Pool, float]] = {}  # flow id -> its deadline
        self.queues: dict[float, collections.deque[tuple[float, str]]] = {}  # timeout -> (deadline, flow id)
        # timeout -> (its loop, the timer of its oldest deadline)
        self.armed: dict[float, tuple[asyncio.AbstractEventLoop, asyncio.TimerHandle]] = {}

    def __contains__(self, flow_id: str) -> bool:
        return flow_id in self.waiting

    def __len__(self) -> int:
        return len(self.waiting)

    def start(self, flow: http.HTTPFlow, pool: Pool, timeout: float) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        self.waiting[flow.id] = (deadline, flow, pool, timeout)
        queue = self.queues.get(timeout)
        if queue is None:
            queue = self.queues[timeout] = collections.deque()
        queue.append((deadline, flow.id))
        armed = self.armed.get(timeout)
        if armed is None or armed[0] is not loop:  # (another loop's timer never fires here)
            self.armed[timeout] = (loop, loop.call_at(queue[0][0], self._due, timeout))

    def cancel(self, flow: http.HTTPFlow) -> None:
        entry = self.waiting.pop(flow.id, None)
        if entry is None:
            return
        queue = self.queues[entry[3]]
        # answered in order, as a rule: drop the answered ones from the front now, so the queue holds
        # about the requests in flight (the rest go when their deadline comes)
        while queue and self._stale(queue[0]):
            queue.popleft()

    def _stale(self, item: tuple[float, str]) -> bool:
        entry = self.waiting.get(item[1])
        return entry is None or entry[0] != item[0]  # answered, or started again (a replay)

    def _due(self, timeout: float) -> None:
        loop = asyncio.get_running_loop()
        if self.armed.get(timeout, (None,))[0] is not loop:
            return  # re-armed on another loop meanwhile
        del self.armed[timeout]
        queue = self.queues[timeout]
        now = loop.time()
        while queue:
            item = queue[0]
            if self._stale(item):
                queue.popleft()
                continue
            if item[0] > now:
                self.armed[timeout] = (loop, loop.call_at(item[0], self._due, timeout))
                return
            queue.popleft()
            _, flow, pool, _ = self.waiting.pop(item[1])
            try:
                self.expired(flow, pool, timeout)
            except Exception:  # one request's failure must not stop the others' timers
                logger.exception("easgate: closing a request past its response timeout failed")


class UpstreamPools:
    """Upstream connections: only to pool servers, with each pool's TLS trust, SNI and timeouts."""

    def __init__(self, current: Current, switch: ContentSwitch, clock: Callable[[], float] = time.monotonic) -> None:
        self.current = current  # the config in force: a route's pool and timeouts
        self.switch = switch  # its balancer learns which servers are down
        self.by_address: dict[tuple[str, int], tuple[Pool, Upstream]] = {}
        self.timers = ResponseTimers(self._response_timeout)
        self.clock = clock
        # Upstream TLS sessions to resume, see tls_start_server: (address, SNI, CA, verify) ->
        # (session, when the full handshake that verified the server was made)
        self.sessions: dict[tuple, tuple[SSL.Session, float]] = {}
        # live upstream TLS connections: server -> [config generation, session key, SSL connection,
        # when the session offered was verified (None: none offered), when this one was verified,
        # the session it last handed to `sessions` (or, TLS 1.3, the ticketless one it ended its
        # handshake with): each session is kept once]
        self.tls_conns: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
        mitmcompat.on_upstream_read(self.upstream_read)
        self.generation = 0
        self.resumed = 0  # upstream handshakes that resumed a session (for tests and metrics)

    def prepare(self, cfg: GatewayConfig) -> Callable[[], None]:
        by_address: dict[tuple[str, int], tuple[Pool, Upstream]] = {}
        for pool in cfg.pools.values():
            for s in pool.servers:
                other = by_address.get((s.host, s.port))
                if other and (other[0].ca, other[0].sni, other[0].verify, other[1].scheme) != (
                        pool.ca, pool.sni, pool.verify, s.scheme):
                    raise ConfigError(cfg.path, f"pools.{pool.name}.servers",
                                      f"{s.host}:{s.port} is also in pool {other[0].name} with other TLS settings",
                                      "use the same scheme/ca/sni/verify for one server, or one pool")
                by_address[(s.host, s.port)] = (pool, s)

        def swap() -> None:
            self.by_address = by_address
            self.sessions = {}  # a session is only resumed under the settings that verified it
            self.generation += 1  # and connections made before this reload keep theirs to themselves
        return swap

    def apply(self, cfg: GatewayConfig) -> None:
        self.prepare(cfg)()

    def server_connect(self, data) -> None:
        addr = data.server.address
        entry = self.by_address.get((addr[0], addr[1])) if addr else None
        if entry is None:
            # Not a pool server: never pass a request anywhere the config doesn't name.
            data.server.error = f"easgate: {addr} is not an upstream of any pool"
            return
        pool, server = entry
        if server.scheme == "https":
            data.server.sni = pool.sni or server.host
        asyncio.get_running_loop().call_later(
            pool.connect_timeout_s, self._connect_timeout, data.server, data.client, pool)

    def _connect_timeout(self, server: connection.Server, client: connection.Client, pool: Pool) -> None:
        if server.timestamp_tcp_setup is not None or server.error:
            return
        if mitmcompat.cancel_connect(client, server, f"{CONNECT_TIMEOUT} {pool.connect_timeout_s:g}s"):
            logger.warning(f"upstream {server.address[0]}:{server.address[1]} (pool {pool.name}): "
                           f"no connection within {pool.connect_timeout_s:g}s")

    LONG_POLL_COMMANDS = ("Ping", "Sync")

    def request(self, flow: http.HTTPFlow) -> None:
        """The request is going upstream: start its response timer."""
        if flow.response or flow.error or not flow.live:
            return
        name = flow.metadata.get(keys.ROUTE)
        if not name:
            return
        try:
            pool = self.current.config.pools[self.current.config.route(name).pool]
        except KeyError:  # a reload removed the route or its pool: FinalCheck refuses the request
            return
        cmd = request_command(flow)
        timeout = pool.long_poll_timeout_s if cmd in self.LONG_POLL_COMMANDS else pool.response_timeout_s
        self.timers.start(flow, pool, timeout)  # kept off flow.metadata, which is saved with the flow

    def responseheaders(self, flow: http.HTTPFlow) -> None:
        if flow.server_conn.tls_established:
            self.keep_session(flow.server_conn)
        # A streamed response (a big attachment) may take long by design: its headers are the answer.
        # Otherwise the timer runs until the whole response is in, so an upstream that stalls
        # after its headers is cut too.
        if flow.response is not None and flow.response.stream:
            self._cancel_timer(flow)

    def response(self, flow: http.HTTPFlow) -> None:
        self._cancel_timer(flow)

    def error(self, flow: http.HTTPFlow) -> None:
        self._cancel_timer(flow)

    def _cancel_timer(self, flow: http.HTTPFlow) -> None:
        self.timers.cancel(flow)

    def _response_timeout(self, flow: http.HTTPFlow, pool: Pool, timeout: float) -> None:
        if not flow.live:
            return  # gone meanwhile
        logger.warning(f"upstream {flow.request.host}:{flow.request.port} (pool {pool.name}): "
                       f"no response within {timeout:g}s; closing it")
        mitmcompat.abort(flow.client_conn, flow.server_conn)  # mitmproxy answers the client with a 502

    def server_connect_error(self, data) -> None:
        """A connect that failed counts against the server only when the server is to blame: refused,
        unreachable, reset, or no answer within connect_timeout_s. A connect cancelled because the
        client went away (or the gateway is stopping) says nothing about the server: if it counted,
        any client could take a pool's servers out of service by hanging up mid-connect."""
        addr = data.server.address
        entry = self.by_address.get((addr[0], addr[1])) if addr else None
        if entry is None:
            return
        err = data.server.error or "connect failed"
        if not err.startswith(CONNECT_TIMEOUT) and (
                data.client.timestamp_end is not None or mitmcompat.connect_was_cancelled(err)):
            logger.debug(f"upstream {entry[1].url} (pool {entry[0].name}): connect abandoned ({err}); "
                         "not counted against the server")
            return
        self.switch.balancer.mark_down(entry[1], entry[0], err)

    def server_connected(self, data) -> None:
        """A server that accepted a connection is up again, whatever its mark said."""
        addr = data.server.address
        entry = self.by_address.get((addr[0], addr[1])) if addr else None
        if entry is not None:
            self.switch.balancer.mark_up(entry[1], entry[0])

    def tls_established_server(self, data) -> None:
        """Record whether the upstream session was resumed (the buffers are released before the
        handshake, in tls_start_server)."""
        entry = self.tls_conns.get(data.conn)
        if entry is not None:
            # a resumed session inherits the verification (and the age) of the session it resumed
            reused = entry[3] is not None and mitmcompat.session_reused(entry[2])
            entry[4] = entry[3] if reused else self.clock()
            self.resumed += reused
            if data.ssl_conn is None:
                return
            if data.ssl_conn.get_protocol_version_name() != "TLSv1.3":
                self.keep_session(data.conn)  # complete now
            else:  # no ticket yet: the session to keep is the next one (upstream_read). Held, not
                # just its address: the first ticket frees it, and the second may get its address.
                entry[5] = data.ssl_conn.get_session()

    def tls_start_server(self, tls_start) -> None:
        server = tls_start.conn
        entry = self.by_address.get(server.address[:2]) if server.address else None
        if entry is None:
            return
        pool, up = entry
        ssl_ctx = net_tls.create_proxy_server_context(
            method=net_tls.Method.TLS_CLIENT_METHOD,
            min_version=net_tls.Version.TLS1_2, max_version=net_tls.Version.UNBOUNDED,
            cipher_list=None, ecdh_curve=None,
            verify=net_tls.Verify.VERIFY_PEER if pool.verify else net_tls.Verify.VERIFY_NONE,
            ca_path=None, ca_pemfile=str(pool.ca) if pool.ca else None,
            client_cert=None, legacy_server_connect=False,
        )
        conn = SSL.Connection(ssl_ctx)
        # Free the read/write buffers of idle upstream connections, as the client side does: a held
        # Ping's Exchange connection is idle for up to an hour. Set before the handshake: OpenSSL
        # (3.2+) gives a record layer the mode it has when the layer is made, and the one that writes
        # application data is made during the handshake (set later, it kept a 16 KB write buffer).
        mitmcompat.release_buffers(conn)
        mitmcompat.one_key_share(conn)  # no ML-KEM key kept for an upstream that does not use it
        sni = pool.sni or up.host
        server.sni = sni
        mitmcompat.verify_upstream_name(conn, sni)
        conn.set_alpn_protos([b"http/1.1"])
        # Resume the last session with this server under these very settings (nginx's
        # proxy_ssl_session_reuse): an abbreviated handshake instead of a full one per client
        # connection. The session's certificate was verified, against this CA and this name, on the
        # full handshake that made it, at most UPSTREAM_SESSION_MAX_AGE_S ago; a server that declines
        # it gets a full handshake, verified as always. Offered to every connection until a newer
        # one replaces it, as nginx does: connections opened together (a reconnect storm, a burst of
        # Pings) all resume instead of one, and share its certificate chain (5 KB less each). RFC
        # 8446 C.4 advises against reusing a ticket for privacy (a passive observer links the
        # connections): between the gateway and its own servers there is nothing to unlink.
        key = (up.host, up.port, sni, str(pool.ca) if pool.ca else None, pool.verify)
        offered = None
        cached = self.sessions.get(key)
        if cached is not None and self.clock() - cached[1] < UPSTREAM_SESSION_MAX_AGE_S:
            conn.set_session(cached[0])
            offered = cached[1]
        self.tls_conns[server] = [self.generation, key, conn, offered, None, None]
        conn.set_connect_state()
        tls_start.ssl_conn = conn

    def server_disconnected(self, data) -> None:
        self.keep_session(data.server)
        entry = self.tls_conns.pop(data.server, None)
        if entry is not None and entry[4] is not None and not data.server.error:
            # mitmproxy closes an upstream connection without close_notify when its client goes;
            # OpenSSL would then mark the session not resumable when the connection is freed (its
            # TLS 1.0 rule for truncated connections), which the session kept above shares: every
            # few reconnects got a full handshake. A connection that ended in an error or a fatal
            # alert keeps that mark (nginx does the same, SSL_set_shutdown before SSL_free).
            entry[2].set_shutdown(SSL.SENT_SHUTDOWN | SSL.RECEIVED_SHUTDOWN)

    def upstream_read(self, server: connection.Server, ssl_conn: SSL.Connection) -> None:
        """After each read of an established upstream TLS connection: a TLS 1.3 server's session
        tickets arrive after the handshake, each a new session, kept as it arrives. Waiting for the
        response instead kept nothing from a held Ping's connection for up to an hour, so every
        Ping opened meanwhile (a reconnect storm after a restart) got a full handshake."""
        entry = self.tls_conns.get(server)
        if entry is not None and entry[4] is not None and not mitmcompat.holds_session(ssl_conn, entry[5]):
            self.keep_session(server)

    def keep_session(self, server: connection.Server) -> None:
        """Keep the session of an established upstream TLS connection for the next connection to
        that server, once (a session already kept, or the ticketless one a TLS 1.3 handshake ends
        with, is not kept again): when its handshake ends (TLS 1.2), when a ticket arrives (TLS 1.3,
        upstream_read), and at its response and disconnect, in case a read was missed."""
        entry = self.tls_conns.get(server)
        if entry is None:
            return
        generation, key, conn, _, verified_at, kept = entry
        if verified_at is None or generation != self.generation:
            return  # no handshake completed, or made under a config since reloaded
        if kept is not None and mitmcompat.holds_session(conn, kept):
            return
        session = conn.get_session()
        if session is not None and self.clock() - verified_at < UPSTREAM_SESSION_MAX_AGE_S:
            self.sessions[key] = (session, verified_at)
            entry[5] = mitmcompat.session_pointer(conn)  # the address: the cache holds the session
