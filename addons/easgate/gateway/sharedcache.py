"""The decision cache's second tier, shared by every gateway node and worker over Redis (or Valkey).

A local miss (``authz/cache.py`` stays the first tier, per process) asks Redis before the
connector; the single flight holds across nodes: the first node to miss takes a lock
(``SET NX PX``, as long as one callout may take), the others wait for its answer (woken by a
pub/sub message, re-checking with a deadline), so a device costs one callout per TTL for the
whole cluster. Key layout, scripts and events: ``authz/sharedlayout.py``.

What is never shared: fail-mode decisions (a connector blip on one node must not decide for the
others), and nothing from Redis counts as an allow unless it parses as a stored decision of the
current epoch, policy digest and device revocation count.

Events on the channel reach every node: a device revoked (an operator's block seen by a
connector, ``easgate.cluster.revoke`` on any node) drops that device's local entries and calls
:attr:`SharedCache.on_revoke` hooks (held long polls end there); "all" (a policy reload, a
cache clear) drops every local entry.

Revocation records (``authz/revocations.py``: an operator's ``easgate.revoke``, ``easgate revoke``,
a line in any node's revocation file) are kept in Redis for good (one hash, the later record per
(device, user) wins) and published on the channel; :attr:`SharedCache.on_revocation` hooks apply
them (the device is denied, its cached decisions dropped, its held long polls closed). Every
(re)subscription pushes what this node knows (a revocation made while Redis was away, or all of
them after Redis lost its data) and reads the whole hash back (what was revoked meanwhile, or
before this node started).

Redis down: every call has a short deadline; the first failure opens a circuit for ``retry_s``
(local cache + connector only, as on one machine), counted and logged once per burst; the next
call after it tries again, and a re-subscribed event channel drops the local cache (events may
have been missed meanwhile). Nothing needs a restart.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import time
import urllib.parse
from collections import Counter
from collections.abc import Awaitable, Callable, Iterable
from typing import Any

from ..authz.cache import DecisionCache
from ..authz.revocations import order
from ..authz.sharedlayout import (
    CLEAR_SCRIPT,
    LOOKUP_SCRIPT,
    RATE_SCRIPT,
    REVOCATION_SCRIPT,
    REVOKE_SCRIPT,
    STORE_SCRIPT,
    SharedLayout,
    decode_decision,
    decode_event,
    decode_revocation,
    encode_decision,
    encode_event,
    encode_revocation,
    revocation_field,
)
from ..core.decision import Decision

try:
    import redis.asyncio as aioredis
    from redis.asyncio.retry import Retry
    from redis.backoff import NoBackoff
    from redis.exceptions import RedisError
except ImportError:  # the base install: Redis is optional
    aioredis = None  # type: ignore[assignment]
    RedisError = OSError  # type: ignore[assignment,misc]

__all__ = ["EXTRA_HINT", "SharedCache", "Unavailable", "publish_revocation", "redact_url", "redis_available",
           "stored_revocation"]

logger = logging.getLogger("easgate.cluster")

EXTRA_HINT = "pip install 'easgate[cluster]'"
# One Redis round trip on a LAN is well under a millisecond; a second means Redis (or the path to
# it) is in trouble, not that this process was busy for a moment (a busy event loop delays reads).
OP_TIMEOUT_S = 1.0
RETRY_S = 2.0  # how long a failed Redis is left alone before the next try
POLL_FIRST_S = 0.02
POLL_MAX_S = 0.25


def redis_available() -> bool:
    return aioredis is not None


Key = tuple[str, str]  # (user, device), as authz.cache.cache_key makes it


class SharedCache:
    """Redis behind a local :class:`DecisionCache`; used from one asyncio loop (mitmproxy's)."""

    def __init__(self, url: str, local: DecisionCache, *, lock_ms: int, digest: Callable[[], str] = lambda: "-",
                 prefix: str = "easgate:", op_timeout_s: float = OP_TIMEOUT_S, retry_s: float = RETRY_S,
                 clock: Callable[[], float] = time.monotonic) -> None:
        if aioredis is None:
            raise RuntimeError(f"a shared cache on Redis needs the Redis client; {EXTRA_HINT}")
        self.url = url
        self.shown = redact_url(url)  # for the log: no password
        self.local = local
        self.lock_ms = int(lock_ms)
        self.digest = digest
        self.keys = SharedLayout(prefix)
        self.op_timeout_s = op_timeout_s
        self.retry_s = retry_s
        self.clock = clock
        self.on_revoke: list[Callable[[str], None]] = []  # hooks: held long polls of the device end
        self.on_revocation: list[Callable[[dict], None]] = []  # hooks: a revocation record from the cluster
        self.known_revocations: Callable[[], Iterable[dict]] = tuple  # what this node pushes on (re)subscribing
        self._unsent: dict[str, dict] = {}  # field -> a record Redis could not be told yet
        self._synced = asyncio.Event()  # the first read of the revocations hash was tried
        self.counters: Counter[str] = Counter()
        self.down_since: float | None = None
        self._retry_at = 0.0
        self._fills: dict[str, asyncio.Future[bool]] = {}  # lock -> woken with "its callout failed"
        self._listener: asyncio.Task | None = None
        no_retry = Retry(NoBackoff(), 0)
        self.client = aioredis.from_url(url, socket_timeout=op_timeout_s, socket_connect_timeout=op_timeout_s,
                                        retry=no_retry, decode_responses=True)
        self._lookup = self.client.register_script(LOOKUP_SCRIPT)
        self._store = self.client.register_script(STORE_SCRIPT)
        self._revoke = self.client.register_script(REVOKE_SCRIPT)
        self._unlock = self.client.register_script(CLEAR_SCRIPT)
        self._put = self.client.register_script(REVOCATION_SCRIPT)
        self._rate = self.client.register_script(RATE_SCRIPT)

    # -- lifecycle -----------------------------------------------------------------------------

    def start(self) -> None:
        if self._listener is None:
            self._listener = asyncio.get_running_loop().create_task(self._listen())

    async def _preload(self) -> None:
        """Load the scripts once (the first EVALSHA would otherwise cost a round trip more)."""
        for script in (self._lookup, self._store, self._revoke, self._unlock, self._put, self._rate):
            await self._quiet("script load", lambda script=script: self.client.script_load(script.script))

    async def ready(self) -> None:
        """Until this node has read the cluster's revocations once (or tried, for at most two Redis
        deadlines): a node that just started must not allow a device another node revoked."""
        if self._listener is None or self._synced.is_set():
            return
        try:
            async with asyncio.timeout(self.op_timeout_s * 2):
                await self._synced.wait()
        except TimeoutError:
            pass

    async def close(self) -> None:
        if self._listener:
            self._listener.cancel()
            try:
                await self._listener
            except BaseException:
                pass
            self._listener = None
        try:
            await self.client.aclose()
        except (RedisError, OSError):
            pass

    # -- health --------------------------------------------------------------------------------

    @property
    def up(self) -> bool:
        """False while the circuit is open (Redis failed less than ``retry_s`` ago)."""
        return self.down_since is None or self.clock() >= self._retry_at

    def _failed(self, what: str, e: BaseException) -> None:
        self.counters["redis_errors"] += 1
        if self.down_since is None:
            self.down_since = self.clock()
            logger.warning(f"easgate: Redis {self.shown} unreachable ({what}: {type(e).__name__}: {e}); "
                           f"local cache and connector only, retrying every {self.retry_s:g}s")
        self._retry_at = self.clock() + self.retry_s

    def _ok(self) -> None:
        if self.down_since is not None:
            logger.warning(f"easgate: Redis {self.shown} reachable again after {self.clock() - self.down_since:.1f}s "
                           f"({self.counters['redis_errors']} errors so far)")
            self.down_since = None

    async def _call(self, what: str, op: Callable[[], Awaitable[Any]]) -> Any:
        """One Redis operation with a deadline; raises :class:`Unavailable` after recording it."""
        if not self.up:
            self.counters["redis_bypassed"] += 1
            raise Unavailable(what)
        try:
            async with asyncio.timeout(self.op_timeout_s * 2):
                r = await op()
        except (RedisError, OSError, TimeoutError) as e:
            self._failed(what, e)
            raise Unavailable(what) from e
        self._ok()
        return r

    # -- the tier ------------------------------------------------------------------------------

    async def fetch(self, key: Key, compute: Callable[[], Awaitable[Decision]],
                    ttl_s: Callable[[Decision], float]) -> tuple[Decision, float | None]:
        """The shared decision for ``key`` (and the seconds it has left), or ``compute()``'s, stored
        for the cluster unless it is a fail-mode decision. At most one node computes at a time.

        Redis trouble at any step: ``compute()`` alone, exactly as without this tier.
        """
        user, device = key
        # the hash is the device folded to lower case (a revocation drops every spelling); the field
        # keeps user and DeviceId exactly as asked (a connector may tell allowed1 from ALLOWED1)
        field = f"{self.digest()}|{user}|{device}"
        dkey, lkey = self.keys.device(device), self.keys.lock(device, field)
        # Waiting lasts while another node's lock lasts (it expires by itself if that node died);
        # the hard deadline only guards against a Redis that keeps answering "locked" forever.
        deadline = self.clock() + 2 * self.lock_ms / 1000
        wait = POLL_FIRST_S
        token = secrets.token_hex(8)
        try:
            while True:
                found = await self._call("lookup", lambda: self._lookup(keys=[self.keys.epoch, dkey, lkey],
                                                                          args=[field, token, self.lock_ms]))
                epoch, ver, ours = str(found[0]), str(found[1]), int(found[2])
                if len(found) >= 5:
                    try:
                        d = decode_decision(found[3])
                    except ValueError:
                        self.counters["redis_bad_entries"] += 1
                    else:
                        self.counters["shared_hits"] += 1
                        return d, int(found[4]) / 1000
                if ours or self.clock() >= deadline:
                    if not ours:
                        self.counters["shared_lock_timeouts"] += 1
                        logger.warning(f"easgate: shared cache lock {lkey} held past {2 * self.lock_ms} ms; "
                                       "asking the connector without it")
                    return await self._compute_and_share(compute, ttl_s, epoch, ver, field, dkey, lkey,
                                                         token if ours else None), None
                # another node is asking the connector: wait for its answer (pub/sub wakes us early)
                self.counters["shared_waits"] += 1
                if await self._wait_fill(lkey, min(wait, max(0.0, deadline - self.clock()))):
                    # its connector failed: ask ours now rather than queue behind each other's timeouts
                    self.counters["shared_after_failure"] += 1
                    return await self._compute_and_share(compute, ttl_s, epoch, ver, field, dkey, lkey, None), None
                wait = min(wait * 2, POLL_MAX_S)
        except Unavailable:
            self.counters["shared_fallbacks"] += 1
            return await compute(), None

    async def _compute_and_share(self, compute: Callable[[], Awaitable[Decision]],
                                 ttl_s: Callable[[Decision], float], epoch: str, ver: str, field: str, dkey: str,
                                 lkey: str, token: str | None) -> Decision:
        self.counters["shared_misses"] += 1
        try:
            d = await compute()
        except BaseException:
            if token:
                await self._quiet("unlock", lambda: self._unlock(keys=[lkey], args=[token]))
            raise
        ttl = ttl_s(d)
        failed = d.source == "fail-mode"
        if not failed and ttl > 0 and token:
            stored = await self._quiet("store", lambda: self._store(
                keys=[self.keys.epoch, dkey, lkey], args=[epoch, ver, field, int(ttl * 1000), encode_decision(d), token]))
            if stored == 0:
                self.counters["shared_stores_refused"] += 1  # revoked or cleared while we asked
        elif token:
            await self._quiet("unlock", lambda: self._unlock(keys=[lkey], args=[token]))
        if token:
            event = encode_event("fill", k=lkey, failed="1") if failed else encode_event("fill", k=lkey)
            await self._quiet("publish", lambda: self.client.publish(self.keys.channel, event))
        return d

    async def _quiet(self, what: str, op: Callable[[], Awaitable[Any]]) -> Any:
        try:
            return await self._call(what, op)
        except Unavailable:
            return None

    async def _wait_fill(self, lkey: str, timeout: float) -> bool:
        """Until the lock's holder says it is done (or ``timeout``); True if its callout failed."""
        fut = self._fills.get(lkey)
        if fut is None or fut.done():
            fut = self._fills[lkey] = asyncio.get_running_loop().create_future()
        try:
            return await asyncio.wait_for(asyncio.shield(fut), timeout)
        except TimeoutError:
            return False
        finally:
            if self._fills.get(lkey) is fut and fut.done():
                del self._fills[lkey]

    # -- rate limits (gateway/ratelimits.py) ---------------------------------------------------

    async def rate_hit(self, keys: list[str], args: list[str | int]) -> list[int]:
        """One request against the cluster-wide windows (``RATE_SCRIPT``); raises
        :class:`Unavailable` when Redis does not answer (the caller counts on this machine)."""
        r = await self._call("rate limit", lambda: self._rate(keys=keys, args=args))
        return [int(x) for x in r]

    # -- revocations ---------------------------------------------------------------------------

    async def revoke(self, device_id: str) -> bool:
        """Forget ``device_id`` everywhere: here at once, in Redis, and on every node via the channel.
        False if Redis could not be told (this node still forgot it)."""
        self._drop_device(device_id)
        try:
            await self._call("revoke", lambda: self._revoke(keys=[self.keys.device(device_id)]))
            await self._call("publish", lambda: self.client.publish(self.keys.channel,
                                                                     encode_event("device", d=device_id)))
        except Unavailable:
            return False
        return True

    async def clear_all(self) -> bool:
        """Forget every decision on every node (policy reload, cache clear)."""
        self.local.clear()
        try:
            await self._call("clear", lambda: self.client.incr(self.keys.epoch))
            await self._call("publish", lambda: self.client.publish(self.keys.channel, encode_event("all")))
        except Unavailable:
            return False
        return True

    async def put_revocation(self, rec: dict) -> bool:
        """Store a revocation record in Redis and tell every node; False if Redis could not be
        told (the caller has applied it here already; it is pushed when Redis answers again)."""
        try:
            await self._push(rec, publish=False)
        except Unavailable:
            self._keep_unsent(rec)
            return False
        return True

    async def _push(self, rec: dict, publish: bool) -> int:
        """The record into the hash (unless a later one is there) and, if it went in (or
        ``publish``: it went in earlier but its event may not have gone out), onto the channel."""
        value = encode_revocation(rec)
        stored = await self._call("revocation", lambda: self._put(
            keys=[self.keys.revocations], args=[revocation_field(rec), rec["ts"], int(rec["action"] == "revoke"), value]))
        if stored or publish:
            await self._call("publish", lambda: self.client.publish(self.keys.channel,
                                                                     encode_event("revocation", v=value)))
            self.counters["revocations_published"] += 1
        return int(stored or 0)

    def _keep_unsent(self, rec: dict) -> None:
        if not self._unsent:
            logger.warning(f"easgate: a revocation ({rec['action']} {rec['user'] or '*'} on {rec['device_id']}) "
                           f"applies on this node only until Redis {self.shown} answers; it is pushed then")
        field = revocation_field(rec)
        if field not in self._unsent or order(rec) > order(self._unsent[field]):
            self._unsent[field] = rec
        self.counters["revocations_unsent"] += 1

    async def _push_unsent(self) -> None:
        """What Redis could not be told, now, published even if another node stored it meanwhile."""
        pending, self._unsent = self._unsent, {}
        try:
            while pending:
                field, rec = next(iter(pending.items()))
                await self._push(rec, publish=True)
                del pending[field]
        finally:
            for field, rec in pending.items():  # Redis went away again: keep the rest for the next try
                self._unsent.setdefault(field, rec)
        logger.warning(f"easgate: revocations made while Redis {self.shown} was unreachable are in Redis now")

    async def _sync_revocations(self) -> None:
        """Apply what Redis holds, then push what this node knows (Redis keeps the later record).
        The read comes first: a node that just started answers only after it (`ready`), and
        pushing thousands of records one round trip each would outlast that wait."""
        held = await self._call("revocations", lambda: self.client.hgetall(self.keys.revocations))
        for value in (held or {}).values():
            self._revocation(value)
        self.counters["revocation_syncs"] += 1
        self._synced.set()
        if self._unsent:
            await self._push_unsent()
        for rec in list(self.known_revocations()):
            await self._push(rec, publish=False)

    def _revocation(self, value: Any) -> None:
        try:
            rec = decode_revocation(value)
        except ValueError:
            self.counters["bad_revocations"] += 1
            return
        for hook in list(self.on_revocation):
            try:
                hook(rec)
            except Exception:
                logger.exception("easgate: revocation hook failed")

    def _drop_device(self, device_id: str) -> None:
        dev = device_id.strip().lower()
        n = self.local.forget(lambda k: isinstance(k, tuple) and len(k) == 2 and str(k[1]).lower() == dev)
        self.counters["revocations"] += 1
        logger.info(f"easgate: device {device_id} revoked; {n} cached decisions dropped")
        for hook in list(self.on_revoke):
            try:
                hook(device_id)
            except Exception:
                logger.exception("easgate: revocation hook failed")

    # -- the event channel ---------------------------------------------------------------------

    async def _listen(self) -> None:
        """Subscribe and apply events; on any failure resubscribe (dropping the local cache: events
        may have been missed while we were not listening)."""
        lost = False
        while True:
            client = aioredis.from_url(self.url, socket_connect_timeout=self.op_timeout_s, decode_responses=True,
                                       health_check_interval=1, retry=Retry(NoBackoff(), 0))
            ps = client.pubsub(ignore_subscribe_messages=True)
            try:
                async with asyncio.timeout(self.op_timeout_s * 4):
                    await ps.subscribe(self.keys.channel)
                await self._preload()  # also after a Redis restart: scripts do not survive it
                await self._sync_revocations()
                self._synced.set()
                if lost:
                    n = self.local.clear()
                    logger.warning(f"easgate: Redis event channel back; {n} local decisions dropped "
                                   "(block events may have been missed)")
                    lost = False
                self.counters["subscribed"] += 1
                while True:
                    msg = await ps.get_message(timeout=1.0)
                    if msg is not None and msg.get("type") == "message":
                        self._event(msg.get("data"))
                    if self._unsent and self.up:
                        await self._push_unsent()
            except asyncio.CancelledError:
                raise
            except (RedisError, OSError, TimeoutError, Unavailable) as e:
                if not lost and not isinstance(e, Unavailable):  # Unavailable: _call has recorded it
                    self._failed("events", e)
                lost = True
                self._synced.set()  # requests go on without the cluster's revocations, as without Redis
            except Exception as e:  # noqa: BLE001 - anything else must not end the listening for good
                logger.error(f"easgate: Redis event channel: {type(e).__name__}: {e}; subscribing again")
                self.counters["listener_errors"] += 1
                lost = True
                self._synced.set()
            finally:
                try:
                    await ps.aclose()
                    await client.aclose()
                except (RedisError, OSError):
                    pass
            await asyncio.sleep(self.retry_s)

    def _event(self, data: Any) -> None:
        ev = decode_event(data) if isinstance(data, (str, bytes)) else None
        if ev is None:
            self.counters["bad_events"] += 1
            return
        self.counters[f"events_{ev['t']}"] += 1
        if ev["t"] == "fill":
            fut = self._fills.pop(ev.get("k", ""), None)
            if fut is not None and not fut.done():
                fut.set_result(ev.get("failed") == "1")
        elif ev["t"] == "device" and ev.get("d"):
            if ev["d"] == "*":
                self.local.clear()
            else:
                self._drop_device(ev["d"])
        elif ev["t"] == "revocation":
            self._revocation(ev.get("v", ""))
        elif ev["t"] == "all":
            n = self.local.clear()
            logger.info(f"easgate: cluster-wide cache clear; {n} cached decisions dropped")

    @property
    def stats(self) -> dict[str, Any]:
        return {**self.counters, "up": self.down_since is None}


async def publish_revocation(url: str, rec: dict, prefix: str = "easgate:",
                             timeout_s: float = OP_TIMEOUT_S * 2) -> bool:
    """One revocation record into Redis and onto the channel, from outside a gateway (``easgate
    revoke``); False if Redis already held it (or a later one). Raises what Redis raises."""
    if aioredis is None:
        raise RuntimeError(f"a revocation in Redis needs the Redis client; {EXTRA_HINT}")
    keys = SharedLayout(prefix)
    client = aioredis.from_url(url, socket_timeout=timeout_s, socket_connect_timeout=timeout_s,
                               retry=Retry(NoBackoff(), 0), decode_responses=True)
    try:
        async with asyncio.timeout(timeout_s * 2):
            value = encode_revocation(rec)
            stored = await client.register_script(REVOCATION_SCRIPT)(
                keys=[keys.revocations], args=[revocation_field(rec), rec["ts"], int(rec["action"] == "revoke"), value])
            if stored:
                await client.publish(keys.channel, encode_event("revocation", v=value))
            return bool(stored)
    finally:
        await client.aclose()


async def stored_revocation(url: str, rec: dict, prefix: str = "easgate:",
                            timeout_s: float = OP_TIMEOUT_S * 2) -> dict | None:
    """The record Redis holds for the device and user of ``rec`` (None: none, or one that does not
    parse), from outside a gateway (``easgate revoke`` stamps its own after it). Raises what Redis raises."""
    if aioredis is None:
        raise RuntimeError(f"a revocation in Redis needs the Redis client; {EXTRA_HINT}")
    client = aioredis.from_url(url, socket_timeout=timeout_s, socket_connect_timeout=timeout_s,
                               retry=Retry(NoBackoff(), 0), decode_responses=True)
    try:
        async with asyncio.timeout(timeout_s * 2):
            value = await client.hget(SharedLayout(prefix).revocations, revocation_field(rec))
    finally:
        await client.aclose()
    try:
        return decode_revocation(value) if value else None
    except ValueError:
        return None


def redact_url(url: str) -> str:
    p = urllib.parse.urlsplit(url)
    if p.password is None:
        return url
    return urllib.parse.urlunsplit(p._replace(netloc=f"{p.username or ''}:***@{p.hostname}"
                                                     + (f":{p.port}" if p.port else "")))


class Unavailable(Exception):
    """Redis did not answer (or the circuit is open): the caller goes on without it."""
