"""The XNC callout: ask a connector whether a user on a device may sync.

`GET <url>?user=&agent=&ip=&url=<base64 of the full URL>&resultType=json&DeviceId=` — the request
NetScaler's `httpCalloutXNC` policy sends. A small HTTP/1.1 client on h11 (a mitmproxy dependency)
with kept-alive connections and a concurrency bound: tornado's simple client opens a connection
per request, and the callout sits on every uncached ActiveSync request.

What counts as an answer (anything but *Allow* blocks, as on NetScaler):

| connector says (HTTP 200)                               | outcome                 |
|---------------------------------------------------------|-------------------------|
| JSON object whose `result`/`Result`/`decision` is "Allow" (any case) | allow      |
| JSON object whose result is any other string (Deny, Disallow, Block) | deny       |
| a body that is exactly the token `Allow` (text)         | allow                   |
| a body that is exactly `Deny`/`Disallow`/`Block` (text) | deny                    |
| HTTP 4xx: the connector rejected this request              | deny                    |
| anything else (garbage, empty, truncated), 5xx, timeout, refused | connector error -> fail mode |
"""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import json
import logging
import ssl
import time
import urllib.parse
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass

import h11

from ..authz import changefeed
from ..core.decision import Decision, Source
from .config import Connector

logger = logging.getLogger("easgate.authz")

MAX_ANSWER = 64 * 1024
DENY_TOKENS = {"deny", "disallow", "block", "blocked", "denied"}


class ConnectorError(Exception):
    """The connector could not give an answer (the fail mode decides)."""


@dataclass(frozen=True, slots=True)
class Answer:
    allow: bool
    reason: str
    blocked: bool = False  # an easgate connector said the operator blocked the device


def parse_answer(status: int, body: bytes) -> Answer:
    """Strictly read a connector answer; raise ConnectorError when it is not one."""
    if 400 <= status < 500:
        # The connector refused this request (e.g. values too long for it): that is its answer about
        # this request, not an outage. Sending it to the fail mode would let a client pick fail-open
        # by making its own request unacceptable.
        return Answer(False, f"connector rejected the request (HTTP {status})")
    if status != 200:
        raise ConnectorError(f"connector answered HTTP {status}")
    text = body.strip()
    if not text:
        raise ConnectorError("connector answered an empty body")
    if text[:1] == b"{":
        try:
            doc = json.loads(text)
        except (ValueError, UnicodeDecodeError):
            raise ConnectorError("connector answered malformed JSON")
        if not isinstance(doc, dict):
            raise ConnectorError("connector answered JSON that is not an object")
        result = next((doc[k] for k in ("result", "Result", "decision", "Decision") if k in doc), None)
        if not isinstance(result, str):
            raise ConnectorError("connector answer has no result field")
        why = doc.get("reason") or doc.get("Reason")
        why = f": {why}" if isinstance(why, str) and why else ""
        if result.strip().lower() == "allow":
            return Answer(True, f"connector: Allow{why}")
        # easgate's connector names an operator's block (source "block"): it beats the gateway's
        # allow lists too (one precedence order, authz.engine).
        return Answer(False, f"connector: {result[:40]}{why}"[:200], doc.get("source") == "block")
    token = text.decode("ascii", "replace").lower()
    if token == "allow":
        return Answer(True, "connector: Allow")
    if token in DENY_TOKENS:
        return Answer(False, f"connector: {token.capitalize()}")
    raise ConnectorError(f"connector answered something that is not a decision: {text[:20]!r}")


def callout_query(user: str | None, agent: str | None, ip: str, url: str, device_id: str | None,
                  extra: dict[str, str] | None = None) -> str:
    """XNC's query; `extra` (certDeviceId, certUser, userSource) follows the parameters XNC knows."""
    return urllib.parse.urlencode({
        "user": user or "",
        "agent": agent or "",
        "ip": ip,
        "url": base64.b64encode(url.encode("utf-8", "surrogateescape")).decode(),
        "resultType": "json",
        "DeviceId": device_id or "",
        **(extra or {}),
    })


class _Conn:
    __slots__ = ("h11", "reader", "writer")

    def __init__(self, reader, writer) -> None:
        self.reader, self.writer = reader, writer
        self.h11 = h11.Connection(h11.CLIENT)


class ConnectorClient:
    """Keep-alive HTTP/1.1 callouts with a timeout and a bound on parallel requests."""

    def __init__(self, cfg: Connector) -> None:
        self.cfg = cfg
        u = urllib.parse.urlsplit(cfg.url)
        self.host = u.hostname
        self.port = u.port or (443 if u.scheme == "https" else 80)
        self.path = u.path or "/"
        self.host_header = u.netloc.rsplit("@", 1)[-1]
        self.ssl: ssl.SSLContext | None = None
        if u.scheme == "https":
            self.ssl = ssl.create_default_context(cafile=str(cfg.ca) if cfg.ca else None)
            if not cfg.verify:
                self.ssl.check_hostname = False
                self.ssl.verify_mode = ssl.CERT_NONE
        self.idle: list[_Conn] = []
        self.sem = asyncio.Semaphore(cfg.max_concurrency)
        self.timeout = cfg.timeout_ms / 1000
        self.calls = 0
        self.connections_opened = 0

    async def authorize(self, user, agent, ip, url, device_id, extra: dict[str, str] | None = None) -> Answer:
        """One callout; raises ConnectorError on timeout, refusal or a non-answer."""
        target = f"{self.path}?{callout_query(user, agent, ip, url, device_id, extra)}"
        self.calls += 1
        try:
            async with asyncio.timeout(self.timeout):  # queueing for a slot counts against it
                async with self.sem:
                    status, body = await self._get(target)
        except TimeoutError:
            raise ConnectorError(f"connector did not answer within {self.cfg.timeout_ms} ms")
        except (OSError, h11.ProtocolError, ssl.SSLError) as e:
            raise ConnectorError(f"connector unreachable: {e or type(e).__name__}")
        return parse_answer(status, body)

    async def probe(self) -> str | None:
        """Can the connector be reached at all (TCP, and TLS for https)? The reason if not. The
        connection is kept for the first callout."""
        try:
            async with asyncio.timeout(self.timeout):
                conn = await self._open()
        except TimeoutError:
            return f"no connection within {self.cfg.timeout_ms} ms"
        except (OSError, ssl.SSLError) as e:
            return str(e) or type(e).__name__
        self.idle.append(conn)
        return None

    async def _get(self, target: str) -> tuple[int, bytes]:
        conn = self.idle.pop() if self.idle else None
        reused = conn is not None
        if conn is None:
            conn = await self._open()
        try:
            return await self._exchange(conn, target)
        except (OSError, h11.ProtocolError, ConnectionError):
            self._close(conn)
            if not reused:
                raise
            # a kept-alive connection the connector closed meanwhile: one fresh try
            conn = await self._open()
            try:
                return await self._exchange(conn, target)
            except BaseException:
                self._close(conn)
                raise
        except BaseException:
            self._close(conn)
            raise

    async def _open(self) -> _Conn:
        reader, writer = await asyncio.open_connection(self.host, self.port, ssl=self.ssl)
        self.connections_opened += 1
        return _Conn(reader, writer)

    async def _exchange(self, conn: _Conn, target: str) -> tuple[int, bytes]:
        h = conn.h11
        data = h.send(h11.Request(method="GET", target=target,
                                  headers=[("Host", self.host_header), ("User-Agent", "easgate"),
                                           ("Accept", "application/json")]))
        data += h.send(h11.EndOfMessage())
        conn.writer.write(data)
        await conn.writer.drain()
        status, body = 0, bytearray()
        while True:
            event = h.next_event()
            if event is h11.NEED_DATA:
                h.receive_data(await conn.reader.read(65536))  # b"" at EOF: h11 reports truncation
                continue
            if isinstance(event, h11.Response):
                status = event.status_code
            elif isinstance(event, h11.Data):
                body += event.data
                if len(body) > MAX_ANSWER:
                    raise ConnectorError("connector answer too large")
            elif isinstance(event, h11.EndOfMessage):
                break
            elif isinstance(event, h11.ConnectionClosed):
                raise ConnectionError("connector closed the connection mid-answer")
        if h.our_state is h11.DONE and h.their_state is h11.DONE:
            h.start_next_cycle()
            self.idle.append(conn)
        else:
            self._close(conn)
        return status, bytes(body)

    @staticmethod
    def _close(conn: _Conn) -> None:
        try:
            conn.writer.close()
        except Exception:
            pass

    def close(self) -> None:
        for c in self.idle:
            self._close(c)
        self.idle.clear()


def to_decision(answer: Answer) -> Decision:
    return Decision(answer.allow, answer.reason, Source.BLOCK if answer.blocked else Source.CONNECTOR)


# ---------------------------------------------------------------------------------------------
# Following the connector's change feed (an easgate connector's /services/easgate/changes)

RETRY_FIRST_S = 0.5
RETRY_MAX_S = 30.0


class ChangeFollower:
    """Long-polls the connector's change feed (``authz/changefeed.py``) and hands what changed to
    the gate: ``on_changes(device_ids)``, or ``on_reset(why)`` when anything may have changed (the
    first answer, a connector restart, a follower too far behind).

    Why: an operator's block in the connector reaches a cached allow, and a Ping held for up to
    an hour, only at the next re-check (``allow_ttl_s``); following the feed, within a poll.

    The connector down, or not an easgate connector: logged once per burst, retried with backoff
    (``RETRY_FIRST_S`` doubling to ``RETRY_MAX_S``); meanwhile decisions go on as without the feed
    (the callout and its fail mode decide; nothing here ever allows). Once back, the follower asks
    from where it was: the connector answers what changed since, or a reset if it cannot know.
    """

    def __init__(self, cfg: Connector, on_changes: Callable[[tuple[str, ...]], None],
                 on_reset: Callable[[str], None], *, wait_s: float = changefeed.WAIT_S) -> None:
        assert cfg.changes
        self.url = cfg.changes
        # its own kept-alive connection: a long poll must not hold a callout's place
        self.client = ConnectorClient(dataclasses.replace(cfg, url=cfg.changes, max_concurrency=1))
        self.on_changes = on_changes
        self.on_reset = on_reset
        self.wait_s = wait_s
        self.instance: str | None = None
        self.seq: int | None = None
        self.counters: Counter[str] = Counter()
        self.down_since: float | None = None

    def close(self) -> None:
        self.client.close()

    async def run(self) -> None:
        delay = RETRY_FIRST_S
        while True:
            try:
                changes = await self.poll()
            except asyncio.CancelledError:
                raise
            except Exception as e:  # noqa: BLE001 - whatever it was, the follower waits and asks again
                self._failed(e)
                await asyncio.sleep(delay)
                delay = min(delay * 2, RETRY_MAX_S)
                continue
            delay = RETRY_FIRST_S
            self._ok()
            self.apply(changes)

    async def poll(self) -> changefeed.Changes:
        """One long poll; raises on anything that is not an answer."""
        target = f"{self.client.path}?{changefeed.query(self.seq, self.instance, self.wait_s)}"
        try:
            async with asyncio.timeout(self.wait_s + self.client.timeout):
                status, body = await self.client._get(target)
        except TimeoutError:
            raise ConnectorError(f"no answer within {self.wait_s + self.client.timeout:g}s")
        if status != 200:
            raise ConnectorError(f"answered HTTP {status}" + (" (not an easgate connector?)" if status == 404 else ""))
        try:
            return changefeed.decode(body)
        except ValueError as e:
            raise ConnectorError(str(e))

    def apply(self, c: changefeed.Changes) -> None:
        self.counters["answers"] += 1
        if self.seq is None:
            why = "first answer of the connector's change feed"  # decisions cached before it are unchecked
        elif c.instance != self.instance:
            why = "the connector restarted"
        elif c.reset:
            why = "the connector cannot say what changed since the last answer"
        else:
            why = None
        self.instance, self.seq = c.instance, c.seq
        if why is not None:
            self.counters["resets"] += 1
            self.on_reset(why)
        elif c.devices:
            self.counters["devices"] += len(c.devices)
            self.on_changes(c.devices)

    def _failed(self, e: BaseException) -> None:
        self.counters["errors"] += 1
        if self.down_since is None:
            self.down_since = time.monotonic()
            logger.warning(f"easgate: cannot follow the connector's changes at {self.url} "
                           f"({type(e).__name__}: {e}); blocks reach cached decisions and held requests at their "
                           f"next re-check (allow_ttl_s) until it answers; retrying")

    def _ok(self) -> None:
        if self.down_since is not None:
            logger.warning(f"easgate: following the connector's changes at {self.url} again after "
                           f"{time.monotonic() - self.down_since:.1f}s ({self.counters['errors']} failed polls so far)")
            self.down_since = None

    @property
    def stats(self) -> dict:
        return {"url": self.url, "up": self.down_since is None and self.seq is not None, **self.counters}
