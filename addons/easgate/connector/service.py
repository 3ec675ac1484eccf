"""easgate's own connector: the XNC ActiveSync callout, answered from a SQLite device inventory.

A gateway (easgate's `authorization.connector`, or NetScaler's `httpCalloutXNC`) asks

    GET /services/ActiveSync/Authorize?user=&agent=&ip=&url=<base64 of the full URL>&resultType=json&DeviceId=

and gets ``200 {"result": "Allow"|"Deny", "reason": "...", "source": "..."}`` (``resultType=text``:
the body is exactly ``Allow`` or ``Deny``). ``result`` is the first key, so NetScaler's
``HTTP.RES.BODY(20)`` sees it. Anything that is not an answer is a 4xx with a reason and never
says Allow.

The decision is the one authorization engine's (``easgate.authz.engine``, the gateway's too), with
the SQLite inventory as its backend (see :func:`decide`):

    identity problem / no user / no DeviceId      -> Deny   (identity)
    policy deny lists                             -> Deny   (policy)
    device blocked in the inventory               -> Deny   (block)  # an operator's block beats allow lists
    policy allow lists                            -> Allow  (policy)
    device managed: another user's / noncompliant -> Deny   (inventory)
    device managed, compliant, user matches       -> Allow  (inventory)
    otherwise (unknown or unmanaged device)       -> mode: block -> Deny, permit -> Allow   (mode)

The answer's ``source`` is ``block`` for an operator's block: a gateway then denies even when its
own allow lists match.

Endpoints (paths are case-insensitive, like IIS, where XNC runs):

=====================================  ==========================================================
GET /services/ActiveSync/Authorize     the callout; records last-seen and one decision-log line
GET /services/ActiveSync/Simulate      same parameters (``url`` optional: ``DeviceId`` and
                                       ``DeviceType`` may be given directly); the same decision,
                                       no side effects, plus the inventory row
GET /services/ActiveSync/Version       ``{"product": "easgate-connector", "version": ...}``
GET /services/ActiveSync/Log?limit=N   the last N decisions (newest first), like XNC's Log tab
GET /health                            ``{"status": "ok", "devices": N, ...}``; 503 if the
                                       inventory cannot be read
GET /services/easgate/changes          an easgate extension: the devices whose decision may have
  ?since=N&instance=ID&wait=S          changed, long-polled by gateways (``connector/changes.py``,
                                       wire format ``authz/changefeed.py``)
=====================================  ==========================================================

Bad requests get ``400 {"error": "...", "reason": "..."}``: missing ``user``/``url``, a ``url``
that is not base64 (NetScaler's ``B64ENCODE`` is not URL-safe, so a ``+`` that arrives as a space
is read back as ``+``; the URL-safe alphabet and missing padding are accepted too), not UTF-8, or
not an http(s) URL; a value over 2048 characters; control characters in ``user``/``DeviceId``;
an unknown ``resultType``. Unknown paths get 404, other methods 405. If the inventory cannot be
read the answer is 503 (so the gateway's ``on_connector_error`` decides), never a Deny that a
gateway would cache, never a 500.

Config (YAML, relative paths are relative to the config file)::

    listen: {host: 127.0.0.1, port: 9080}
    inventory: ../state/devices.db        # SQLite, created if missing; `easgate devices --db ...`
                                          # or postgresql://user:pw@host/db: one inventory for several
                                          # connectors (easgate[cluster], connector/pgstore.py)
    policy: activesync-policy.yaml        # optional: mode and allow/deny lists (its inventory is not used)
    decision_log: ../logs/connector-decisions.jsonl   # optional
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import collections
import json
import logging
import signal
import sqlite3
import sys
import threading
import time
import urllib.parse
from dataclasses import dataclass
from typing import Any

import h11

from .. import __version__
from ..authz import changefeed, identity
from ..authz.audit import AuditLog
from ..authz.engine import Engine, run_sync
from ..authz.policy import Policy, PolicyError, PolicyStore
from ..core.decision import Decision, Source, one_line
from ..core.errors import ConfigError
from .changes import BadQuery, ChangeFeed
from .changes import parse_query as parse_changes_query
from .config import ConnectorConfig
from .events import BlockEvents
from .inventories import AnyInventory, open_inventory
from .store import Device, InventoryError, device_decision

logger = logging.getLogger("easgate.connector")

MAX_VALUE = 2048  # characters per parameter value
MAX_HEAD = 64 * 1024  # request line + headers
MAX_BODY = 64 * 1024  # a GET has no business sending more
MAX_FIELDS = 32
IDLE_TIMEOUT_S = 300.0  # kept-alive connections (NetScaler and easgate keep them)
REQUEST_TIMEOUT_S = 30.0  # to finish a request once it started
POLICY_CHECK_S = 2.0
FLUSH_SEEN_S = 1.0
LOG_RING = 1000

AUTHORIZE = "/services/activesync/authorize"
SIMULATE = "/services/activesync/simulate"
VERSION = "/services/activesync/version"
LOG = "/services/activesync/log"
HEALTH = "/health"
CHANGES = changefeed.CHANGES_PATH.lower()
PARAMS = {"user": "user", "agent": "agent", "ip": "ip", "url": "url", "resulttype": "resultType",
          "deviceid": "DeviceId", "devicetype": "DeviceType", "limit": "limit",
          # what the gateway verified (device binding, identity.user_from): not part of XNC's callout
          "certdeviceid": "certDeviceId", "certuser": "certUser", "usersource": "userSource",
          # a gateway following the change feed
          "since": "since", "instance": "instance", "wait": "wait"}


# --------------------------------------------------------------------------------------------
# Requests and answers


class BadRequest(ValueError):
    """A callout we cannot answer: 400 with this reason."""


class Unavailable(RuntimeError):
    """We cannot decide right now (inventory unreadable): 503, the gateway's fail mode decides."""


@dataclass(frozen=True, slots=True)
class CalloutIdentity:
    """What a callout says about one ActiveSync request (satisfies policy.IdentityLike)."""

    user: str | None
    device_id: str | None
    device_type: str | None
    user_agent: str | None
    command: str | None
    client_ip: str | None
    error: str | None


@dataclass(frozen=True, slots=True)
class Reply:
    status: int
    body: bytes
    content_type: str = "application/json"
    extra: tuple[tuple[str, str], ...] = ()


def _json(status: int, doc: Any, extra: tuple[tuple[str, str], ...] = ()) -> Reply:
    return Reply(status, (json.dumps(doc, ensure_ascii=False, separators=(",", ":")) + "\n").encode(), extra=extra)


def parse_query(query: str) -> dict[str, str]:
    """Known parameters by canonical name; raises BadRequest for what no gateway would send."""
    try:
        pairs = urllib.parse.parse_qsl(query, keep_blank_values=True, encoding="utf-8", errors="strict",
                                       max_num_fields=MAX_FIELDS)
    except UnicodeDecodeError:
        raise BadRequest("a parameter is not UTF-8 after percent-decoding; encode values as UTF-8")
    except ValueError:
        raise BadRequest(f"more than {MAX_FIELDS} parameters")
    out: dict[str, str] = {}
    for name, value in pairs:
        key = PARAMS.get(name.lower())
        if key is None:
            continue  # a gateway may send more than we read
        if len(value) > MAX_VALUE:
            raise BadRequest(f"parameter {key} is {len(value)} characters long; the limit is {MAX_VALUE}")
        if key in out and out[key] != value:
            raise BadRequest(f"parameter {key} is given twice with different values")
        out[key] = value
    for key in ("user", "DeviceId", "DeviceType", "ip"):
        v = out.get(key)
        if v is not None and not v.isprintable():
            raise BadRequest(f"parameter {key} contains control characters")
    return out


def decode_url(value: str) -> str:
    """The callout's ``url``: base64 (standard or URL-safe, padding optional) of an http(s) URL."""
    s = value.strip().replace(" ", "+")  # an unencoded '+' in a query reads as a space
    s = s.replace("-", "+").replace("_", "/")
    s += "=" * (-len(s) % 4)
    try:
        raw = base64.b64decode(s, validate=True)
    except (binascii.Error, ValueError):
        raise BadRequest("parameter url is not base64; send the full request URL base64-encoded")
    try:
        url = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise BadRequest("parameter url does not decode to UTF-8 text; send the base64 of the request URL")
    try:
        u = urllib.parse.urlsplit(url)
        scheme, host = u.scheme.lower(), u.hostname
    except ValueError:
        raise BadRequest(f"parameter url decodes to {one_line(url, 60)!r}, which is not a URL")
    if scheme not in ("http", "https") or not host:
        raise BadRequest(f"parameter url decodes to {one_line(url, 60)!r}, which is not an http(s) URL")
    return url


def callout_identity(p: dict[str, str], *, url_required: bool = True) -> CalloutIdentity:
    """The identity a callout describes; BadRequest if the callout itself is malformed.

    The user is the ``user`` parameter (the Basic user, as the gateway saw it). The DeviceId is
    the ``DeviceId`` parameter, else the one in the url (plain ``DeviceId=`` or the base64 binary
    query); if both are given they must agree. The DeviceType and command come from the url.
    """
    user = p.get("user") or ""
    if not user.strip():
        raise BadRequest("parameter user is missing or empty; send the user of the ActiveSync request")
    agent = p.get("agent") or None
    ip = p.get("ip") or None
    param_dev = p.get("DeviceId") or None  # exactly as sent: the engine checks MS-ASHTTP's alphabet
    raw_url = p.get("url")
    if not raw_url or not raw_url.strip():
        if url_required:
            raise BadRequest("parameter url is missing or empty; send the base64 of the full request URL")
        return CalloutIdentity(user, param_dev, p.get("DeviceType") or None, agent, None, ip, None)
    url = decode_url(raw_url)
    u = urllib.parse.urlsplit(url)
    target = (u.path or "/") + (f"?{u.query}" if u.query else "")
    ident = identity.parse_request("POST", u.scheme.lower(), u.netloc, target, {}, ip or "")
    error = ident.error
    device_id = ident.device_id
    if param_dev is not None:
        if device_id is not None and device_id != param_dev:  # exact: no case folded
            error = (f"DeviceId parameter {one_line(param_dev, 40)} does not match the url's DeviceId "
                     f"{one_line(device_id, 40)}")
        device_id = param_dev
    cert_dev = (p.get("certDeviceId") or "").strip()
    if cert_dev and error is None and (device_id or "").lower() != cert_dev.lower():
        # The gateway bound the request to this certificate: a DeviceId that is not its own is denied here too.
        error = (f"DeviceId {one_line(device_id, 40)} does not match the certificate's {one_line(cert_dev, 40)} "
                 "(certDeviceId)")
    return CalloutIdentity(user, device_id, ident.device_type or p.get("DeviceType") or None,
                           agent, ident.command, ip, error)


def decide(policy: Policy, inventory: AnyInventory, ident: CalloutIdentity) -> tuple[Decision, Device | None]:
    """The connector's decision: the one authorization engine (``authz.engine``) with the inventory
    (SQLite or PostgreSQL) as its backend; also returns the inventory row it read."""
    rows: list[Device | None] = []

    async def lookup(i: CalloutIdentity) -> Decision | None:
        try:
            row = inventory.get(i.device_id)
        except (sqlite3.Error, InventoryError) as e:
            raise Unavailable(f"inventory {inventory.path} unreadable: {e}")
        rows.append(row)
        return device_decision(row, i.device_id, i.user)

    decision = run_sync(Engine(lambda: policy, lookup).decide(ident))
    return decision, rows[0] if rows else None


# --------------------------------------------------------------------------------------------
# The service (no I/O of its own: the HTTP server and the tests call handle())


class ConnectorService:
    def __init__(self, inventory: AnyInventory, policy: PolicyStore | Policy | None = None,
                 log: AuditLog | None = None) -> None:
        self.inventory = inventory
        self.policy_store = policy if isinstance(policy, PolicyStore) else None
        self._policy = policy if isinstance(policy, Policy) else Policy()
        self.log = log or AuditLog(None)
        self.recent: collections.deque[dict] = collections.deque(maxlen=LOG_RING)
        self.counters: collections.Counter[str] = collections.Counter()
        self.started = time.time()
        self._policy_checked = 0.0
        self.events: BlockEvents | None = None  # inventory changes -> the gateways' shared cache
        self.feed = ChangeFeed()  # inventory changes -> gateways following /services/easgate/changes
        if self.policy_store and self.policy_store.policy.inventory:
            logger.warning(
                f"easgate connector: the policy file {self.policy_store.path} lists "
                f"{len(self.policy_store.policy.inventory)} inventory devices; the connector ignores them and "
                f"uses {inventory.path} (import them with `easgate devices --db {inventory.path} import FILE`)")

    @classmethod
    def from_config(cls, cfg: ConnectorConfig) -> ConnectorService:
        try:
            policy = PolicyStore(cfg.policy) if cfg.policy else None
        except PolicyError as e:
            raise ConfigError(cfg.path, "policy", str(e), "fix the policy file")
        try:
            inv = open_inventory(cfg.inventory)
        except InventoryError as e:
            raise ConfigError(cfg.path, "inventory", str(e))
        try:
            log = AuditLog(cfg.decision_log, on_error=cfg.decision_log_on_error, name="decision log",
                           on_error_key="decision_log_on_error")
        except ConfigError as e:
            raise ConfigError(cfg.path, "decision_log", e.problem, e.fix)
        service = cls(inv, policy, log)
        if cfg.redis:
            try:
                service.events = BlockEvents(cfg.redis)
            except RuntimeError as e:
                raise ConfigError(cfg.path, "redis", str(e))
        return service

    def start_events(self, loop: asyncio.AbstractEventLoop | None = None) -> None:
        """Publish the inventory's changes (blocking until its change feed listens): to Redis if
        configured, and to the change feed (for a SQLite inventory, ``ChangeFeed.follow`` reads them)."""
        watch = getattr(self.inventory, "watch", None)
        if watch is None:
            return
        if self.events is not None:
            watch(self.events.changed)
        if loop is not None:
            feed = self.feed
            watch(lambda device_id: loop.call_soon_threadsafe(feed.changed, device_id))

    @property
    def policy(self) -> Policy:
        return self.policy_store.policy if self.policy_store else self._policy

    def check_policy(self) -> None:
        """Reload the policy file if it changed; a broken file keeps the last good policy."""
        if self.policy_store is None:
            return
        changed, err = self.policy_store.reload_if_changed()
        if err:
            logger.error(f"easgate connector: policy reload failed, keeping the last good policy: {err}")
        elif changed:
            logger.warning(f"easgate connector: policy reloaded from {self.policy_store.path}")

    def close(self) -> None:
        self.inventory.flush_seen(timeout_s=2.0)
        self.log.close()
        self.inventory.close()
        if self.events is not None:
            self.events.close()

    # -- HTTP ----------------------------------------------------------------------------------

    def handle(self, method: str, target: str, peer: str = "") -> Reply:
        """One request -> one reply. Never raises."""
        try:
            return self._route(method.upper(), target, peer)
        except BadRequest as e:
            self.counters["bad_requests"] += 1
            logger.info(f"easgate connector: 400 for {peer}: {e}")
            return _json(400, {"error": "bad request", "reason": str(e)})
        except Unavailable as e:
            self.counters["unavailable"] += 1
            logger.error(f"easgate connector: {e}")
            return _json(503, {"error": "unavailable", "reason": str(e)}, (("Retry-After", "5"),))
        except Exception as e:  # a bug must not answer Allow, nor look like a verdict
            self.counters["internal_errors"] += 1
            logger.exception(f"easgate connector: internal error on {one_line(target, 200)}")
            return _json(503, {"error": "internal error", "reason": f"{type(e).__name__}; see the connector's log"},
                         (("Retry-After", "5"),))

    def _route(self, method: str, target: str, peer: str) -> Reply:
        path, _, query = target.partition("?")
        if len(path) > MAX_VALUE:
            raise BadRequest(f"path is {len(path)} characters long; the limit is {MAX_VALUE}")
        key = urllib.parse.unquote(path).lower().rstrip("/") or "/"
        if key not in (AUTHORIZE, SIMULATE, VERSION, LOG, HEALTH):
            return _json(404, {"error": "not found", "reason": f"no endpoint {one_line(path, 80)}; use "
                               "/services/ActiveSync/Authorize, /Simulate, /Version, /Log, /health or "
                               f"{changefeed.CHANGES_PATH}"})
        if method not in ("GET", "HEAD"):
            return _json(405, {"error": "method not allowed", "reason": f"{method} is not supported; use GET"},
                         (("Allow", "GET, HEAD"),))
        if key == VERSION:
            return _json(200, {"product": "easgate-connector", "version": __version__,
                               "protocol": "XNC ActiveSync callout",
                               "endpoints": ["/services/ActiveSync/Authorize", "/services/ActiveSync/Simulate",
                                             "/services/ActiveSync/Version", "/services/ActiveSync/Log", "/health",
                                             changefeed.CHANGES_PATH]})
        if key == HEALTH:
            return self._health()
        params = parse_query(query)
        if key == LOG:
            return self._log(params)
        return self._decide(params, simulate=key == SIMULATE, peer=peer)

    def _health(self) -> Reply:
        try:
            n = self.inventory.count()
        except (sqlite3.Error, InventoryError) as e:
            return _json(503, {"status": "error", "reason": f"inventory {self.inventory.path} unreadable: {e}"})
        if why := self.log.must_deny():  # every allow is refused: a balancer should try another connector
            return _json(503, {"status": "error", "reason": why})
        store = self.policy_store
        return _json(200, {"status": "ok", "version": __version__, "devices": n, "inventory": str(self.inventory.path),
                           "policy": str(store.path) if store else None, "mode": self.policy.mode,
                           "policy_error": store.last_error if store else None,
                           "decision_log": str(self.log.path) if self.log.path else None,
                           "decision_log_writable": self.log.can_accept(),
                           "uptime_s": round(time.time() - self.started, 1), "counters": dict(self.counters),
                           "changes": {"seq": self.feed.seq, "followers": self.feed.followers},
                           "events": None if self.events is None else {
                               "redis": self.events.url, "published": self.events.published,
                               "errors": self.events.errors}})

    async def handle_async(self, method: str, target: str, peer: str = "") -> Reply:
        """As :meth:`handle`, and the change feed, whose answer may wait for a change."""
        path, _, query = target.partition("?")
        if urllib.parse.unquote(path).lower().rstrip("/") != CHANGES:
            return self.handle(method, target, peer)
        if method.upper() not in ("GET", "HEAD"):
            return _json(405, {"error": "method not allowed", "reason": f"{one_line(method, 20)} is not supported; "
                               "use GET"}, (("Allow", "GET, HEAD"),))
        try:
            since, instance, wait_s = parse_changes_query(parse_query(query))
        except (BadRequest, BadQuery) as e:
            self.counters["bad_requests"] += 1
            return _json(400, {"error": "bad request", "reason": str(e)})
        changes = await self.feed.wait(since, instance, wait_s)
        self.counters["changes_answers"] += 1
        if changes.devices or changes.reset:
            logger.info(f"easgate connector: told {peer} of changes: "
                        f"{'reset' if changes.reset else ', '.join(changes.devices[:5])}")
        return Reply(200, changefeed.encode(changes))

    def _log(self, p: dict[str, str]) -> Reply:
        limit = p.get("limit", "100")
        if not limit.isdigit() or not 1 <= int(limit) <= LOG_RING:
            raise BadRequest(f"parameter limit must be a number from 1 to {LOG_RING}")
        items = list(self.recent)[-int(limit):]
        items.reverse()
        return _json(200, {"decisions": items})

    def _decide(self, p: dict[str, str], *, simulate: bool, peer: str) -> Reply:
        start = time.perf_counter()
        rtype = p.get("resultType") or "json"
        if rtype.lower() not in ("json", "text"):
            raise BadRequest(f"resultType {one_line(rtype, 20)!r} is not json or text")
        ident = callout_identity(p, url_required=not simulate)
        now = time.monotonic()
        if now - self._policy_checked > POLICY_CHECK_S:  # a few stat() calls, every 2 s at most
            self._policy_checked = now
            self.check_policy()
        decision, row = decide(self.policy, self.inventory, ident)
        if decision.allow and not simulate and (why := self.log.must_deny()):
            # An allow whose line cannot be written is not given (decision_log_on_error: deny): the
            # decision log is the connector's record of every device it let through.
            self.log.refused()
            decision = Decision(False, why, Source.AUDIT)
        ms = (time.perf_counter() - start) * 1000
        result = "Allow" if decision.allow else "Deny"
        self.counters[f"{'simulate' if simulate else 'authorize'}_{decision.verdict}"] += 1
        if not simulate:
            if row is not None:
                self.inventory.touch(row.device_id)
            record = {
                "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "client_ip": ident.client_ip, "user": ident.user,
                "device_id": ident.device_id, "device_type": ident.device_type, "command": ident.command,
                "agent": ident.user_agent, "decision": decision.verdict, "reason": decision.reason,
                "source": "connector", "decided_by": decision.source, "latency_ms": round(ms, 3), "peer": peer,
            }
            for key, name in (("certDeviceId", "cert_device_id"), ("certUser", "cert_user"), ("userSource", "user_source")):
                if p.get(key):
                    record[name] = p[key]
            if not self.log.submit(record) and decision.allow and self.log.on_error == "deny":
                # The queue filled between the check above and now: the line is lost, so no allow.
                self.log.refused()
                decision = Decision(False, "decision log cannot be written (queue full); denied by "
                                    "decision_log_on_error=deny", Source.AUDIT)
                result = "Deny"
                record.update(decision="deny", reason=decision.reason, decided_by=decision.source)
            self.recent.append(record)
        if rtype.lower() == "text":
            return Reply(200, result.encode(), "text/plain; charset=utf-8")
        doc: dict[str, Any] = {"result": result, "reason": decision.reason, "source": decision.source,
                               "user": ident.user, "device_id": ident.device_id}
        if simulate:
            doc["simulated"] = True
            doc["device"] = None if row is None else {
                "device_id": row.device_id, "user": row.user, "device_type": row.device_type, "model": row.model,
                "managed": row.managed, "compliant": row.compliant, "blocked": row.blocked,
                "last_seen": row.last_seen}
        return _json(200, doc)


# --------------------------------------------------------------------------------------------
# HTTP/1.1 on asyncio + h11 (keep-alive; one event loop is plenty: a decision is ~0.1 ms)


class ConnectorServer:
    def __init__(self, service: ConnectorService, host: str = "127.0.0.1", port: int = 9080) -> None:
        self.service, self.host, self.port = service, host, port
        self.server: asyncio.Server | None = None
        self._tasks: list[asyncio.Task] = []
        self._conns: set[asyncio.StreamWriter] = set()

    async def start(self) -> int:
        self.server = await asyncio.start_server(self._client, self.host, self.port, reuse_address=True)
        self.port = self.server.sockets[0].getsockname()[1]
        loop = asyncio.get_running_loop()
        self._tasks = [loop.create_task(self._every(FLUSH_SEEN_S, self._flush)),
                       loop.create_task(self.service.feed.follow(self.service.inventory))]
        await asyncio.to_thread(self.service.start_events, loop)
        return self.port

    async def stop(self) -> None:
        for t in self._tasks:
            t.cancel()
        self.service.feed.close()
        if self.server:
            self.server.close()
        for w in list(self._conns):
            w.close()
        if self.server:
            await self.server.wait_closed()
        await asyncio.to_thread(self.service.close)

    @staticmethod
    async def _every(interval: float, fn) -> None:
        while True:
            await asyncio.sleep(interval)
            try:
                await fn() if asyncio.iscoroutinefunction(fn) else fn()
            except Exception:
                logger.exception("easgate connector: background task failed")

    async def _flush(self) -> None:
        await asyncio.to_thread(self.service.inventory.flush_seen)

    async def _client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._conns.add(writer)
        peer = writer.get_extra_info("peername")
        peer_s = f"{peer[0]}:{peer[1]}" if peer else ""
        h = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_HEAD)
        try:
            while True:
                try:
                    event = await self._next(h, reader, IDLE_TIMEOUT_S)
                    if isinstance(event, h11.ConnectionClosed) or event is None:
                        return
                    assert isinstance(event, h11.Request)
                    body = 0
                    while True:
                        ev = await self._next(h, reader, REQUEST_TIMEOUT_S)
                        if isinstance(ev, h11.EndOfMessage):
                            break
                        if isinstance(ev, h11.Data):
                            body += len(ev.data)
                            if body > MAX_BODY:
                                await self._send(h, writer, "GET", _json(413, {
                                    "error": "payload too large", "reason": f"request body over {MAX_BODY} bytes; "
                                    "the callout is a GET without a body"}), close=True)
                                return
                        elif ev is None or isinstance(ev, h11.ConnectionClosed):
                            return
                except h11.RemoteProtocolError as e:
                    await self._send(h, writer, "GET", _json(400, {"error": "bad request",
                                                                   "reason": f"malformed HTTP: {e}"}), close=True)
                    return
                method = event.method.decode("ascii", "replace")
                target = event.target.decode("latin-1")
                reply = await self.service.handle_async(method, target, peer_s)
                await self._send(h, writer, method, reply)
                if h.our_state is h11.MUST_CLOSE or h.their_state is h11.MUST_CLOSE:
                    return
                h.start_next_cycle()
        except (TimeoutError, ConnectionError, OSError, h11.LocalProtocolError):
            return
        finally:
            self._conns.discard(writer)
            writer.close()

    @staticmethod
    async def _next(h: h11.Connection, reader: asyncio.StreamReader, timeout: float):
        while True:
            event = h.next_event()
            if event is h11.NEED_DATA:
                async with asyncio.timeout(timeout):
                    data = await reader.read(65536)
                h.receive_data(data)
                continue
            if event is h11.PAUSED:
                return None
            return event

    @staticmethod
    async def _send(h: h11.Connection, writer: asyncio.StreamWriter, method: str, reply: Reply,
                    close: bool = False) -> None:
        headers = [("Content-Type", reply.content_type), ("Content-Length", str(len(reply.body))),
                   ("Cache-Control", "no-store"), ("Server", f"easgate-connector/{__version__}"), *reply.extra]
        if close:
            headers.append(("Connection", "close"))
        reason = {200: b"OK", 400: b"Bad Request", 404: b"Not Found", 405: b"Method Not Allowed",
                  413: b"Payload Too Large", 503: b"Service Unavailable"}.get(reply.status, b"")
        try:
            data = h.send(h11.Response(status_code=reply.status, headers=headers, reason=reason))
            if method != "HEAD":
                data += h.send(h11.Data(data=reply.body))
            data += h.send(h11.EndOfMessage())
        except h11.LocalProtocolError:  # h11 refuses after a protocol error: say it raw
            data = (f"HTTP/1.1 {reply.status} {reason.decode()}\r\n".encode()
                    + b"".join(f"{k}: {v}\r\n".encode() for k, v in headers)
                    + (b"" if close else b"Connection: close\r\n") + b"\r\n" + reply.body)
        writer.write(data)
        await writer.drain()


class ConnectorThread:
    """The connector on its own event loop in a thread (the demo, the tests, the benchmark)."""

    def __init__(self, service: ConnectorService, host: str = "127.0.0.1", port: int = 0) -> None:
        self.server = ConnectorServer(service, host, port)
        self.loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._stop: asyncio.Event | None = None
        self._error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, name="easgate-connector", daemon=True)

    @property
    def service(self) -> ConnectorService:
        return self.server.service

    @property
    def port(self) -> int:
        return self.server.port

    @property
    def url(self) -> str:
        return f"http://{self.server.host}:{self.port}"

    def start(self) -> ConnectorThread:
        self.thread.start()
        self._ready.wait(10)
        if self._error:
            raise self._error
        return self

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        self.loop.run_until_complete(self._main())
        self.loop.close()

    async def _main(self) -> None:
        self._stop = asyncio.Event()
        try:
            await self.server.start()
        except BaseException as e:
            self._error = e
            self._ready.set()
            return
        self._ready.set()
        await self._stop.wait()
        await self.server.stop()

    def stop(self) -> None:
        if self.thread.is_alive() and self._stop is not None:
            self.loop.call_soon_threadsafe(self._stop.set)
            self.thread.join(10)


# --------------------------------------------------------------------------------------------
# easgate connector CONFIG


async def serve(cfg: ConnectorConfig) -> int:
    service = ConnectorService.from_config(cfg)
    server = ConnectorServer(service, cfg.host, cfg.port)
    try:
        await server.start()
    except OSError as e:
        service.close()
        print(f"easgate connector: cannot listen on {cfg.host}:{cfg.port}: {e.strerror}; "
              f"choose another listen.port in {cfg.path}", file=sys.stderr)
        return 1
    print(f"easgate connector listening at http://{cfg.host}:{server.port} "
          f"({service.inventory.count()} devices in {service.inventory.path}; "
          f"policy {cfg.policy or '(none: block mode, no lists)'}; decision log {cfg.decision_log or '(none)'})",
          flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await server.stop()
    print("easgate connector stopped", flush=True)
    return 0
