"""The layout of the shared decision cache and the block events in Redis (or Valkey).

The gateway's second cache tier (``gateway/sharedcache.py``) and the connector's block events
(``connector/events.py``) must agree on it; neither may import the other, so it lives here, with
no Redis client of its own (the scripts are Lua source, run by whichever client the caller has).

Keys (``P`` is the prefix, ``easgate:`` by default):

==================  ==================================================================================
``P epoch``         a counter; ``INCR`` forgets every shared decision at once (policy reload, cache clear)
``P d:<device>``    a hash per DeviceId (lower case): field ``<epoch>|<policy digest>|<user>|<DeviceId>`` ->
                    ``<expiry ms, Redis clock>|<decision JSON>``; field ``#v`` counts revocations
``P l:<device>|…``  the single-flight lock of one field: ``SET NX PX``, the holder's random token
``P revocations``   a hash: field ``<device>|<user or *>`` (lower case) -> ``<ts ms>|<1 revoke, 0 restore>|<record
                    JSON>``, the last revocation record (``authz/revocations.py``) of every revoked device,
                    restores included; kept for good, so a node that starts later denies the device too
``P r:<lim>:<h>``    a rate limit's sliding window of one (user, DeviceId) (``h``: a digest of both): a sorted
                    set of request times (µs, Redis clock), trimmed to the window on every request
``P events``        the pub/sub channel: ``{"t": "device", "d": ID}`` (drop that device),
                    ``{"t": "all"}`` (drop everything), ``{"t": "fill", "k": LOCK}`` (a lock ended),
                    ``{"t": "revocation", "v": VALUE}`` (a revocation record as the hash holds it)
==================  ==================================================================================

Why a hash per device: a block names a device, not a user; one ``DEL``-like step forgets every
user's decision for it, and bumping ``#v`` makes an answer that was in flight during the block
fail its store (it read the old ``#v``). The expiry is the Redis server's clock (``TIME``), so
gateway clocks never need to agree.
"""

from __future__ import annotations

import hashlib
import json

from ..core.decision import SOURCES, Decision, Source
from .revocations import entry_of, normalize

__all__ = ["CLEAR_SCRIPT", "LOOKUP_SCRIPT", "RATE_SCRIPT", "REVOCATION_SCRIPT", "REVOKE_SCRIPT", "STORE_SCRIPT",
           "SharedLayout", "decode_decision", "decode_event", "decode_revocation", "encode_decision", "encode_event",
           "encode_revocation", "revocation_field"]

DEFAULT_PREFIX = "easgate:"
REVOKED_KEEP_MS = 86_400_000  # how long a revoked device's #v outlives its decisions

#: KEYS: epoch, device hash, lock. ARGV: field (digest|user|DeviceId), lock token, lock ms.
#: The lookup and the lock in one step, so no node can miss the answer another node stored
#: between its lookup and its lock: -> {epoch, version, 1 = the lock is ours now | 0 = another
#: node holds it} or, when found, {epoch, version, 0, decision JSON, ms left}.
LOOKUP_SCRIPT = """
local epoch = redis.call('GET', KEYS[1]) or '0'
local ver = redis.call('HGET', KEYS[2], '#v') or '0'
local v = redis.call('HGET', KEYS[2], epoch .. '|' .. ARGV[1])
if v then
    local t = redis.call('TIME')
    local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
    local sep = string.find(v, '|', 1, true)
    local left = tonumber(string.sub(v, 1, sep - 1)) - now
    if left > 0 then return {epoch, ver, 0, string.sub(v, sep + 1), left} end
end
if redis.call('SET', KEYS[3], ARGV[2], 'NX', 'PX', ARGV[3]) then return {epoch, ver, 1} end
return {epoch, ver, 0}
"""

#: KEYS: epoch, device hash, lock. ARGV: epoch read, version read, field, ttl ms, decision JSON, lock token.
#: Stores only if neither the epoch nor the device's #v moved since the lookup; always ends our lock.
STORE_SCRIPT = """
local ok = (redis.call('GET', KEYS[1]) or '0') == ARGV[1] and (redis.call('HGET', KEYS[2], '#v') or '0') == ARGV[2]
if ok then
    local t = redis.call('TIME')
    local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
    local ttl = tonumber(ARGV[4])
    redis.call('HSET', KEYS[2], ARGV[1] .. '|' .. ARGV[3], tostring(now + ttl) .. '|' .. ARGV[5])
    if redis.call('PTTL', KEYS[2]) < ttl then redis.call('PEXPIRE', KEYS[2], ttl) end
end
if redis.call('GET', KEYS[3]) == ARGV[6] then redis.call('DEL', KEYS[3]) end
if ok then return 1 end
return 0
"""

#: KEYS: device hash. Forgets every decision for the device; stores in flight fail (#v moved).
REVOKE_SCRIPT = f"""
local v = redis.call('HINCRBY', KEYS[1], '#v', 1)
redis.call('DEL', KEYS[1])
redis.call('HSET', KEYS[1], '#v', v)
redis.call('PEXPIRE', KEYS[1], {REVOKED_KEEP_MS})
return v
"""

#: KEYS: lock. ARGV: token. Ends our lock (a computation that is not stored: fail mode, error).
CLEAR_SCRIPT = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""

#: KEYS: one window per limit that applies. ARGV: a unique member (token), then per key its window
#: (µs) and its budget. The limits in order, as one process counts them: each one with room counts
#: the request; the first one without stops there -> {0} allowed, or {index (1-based), µs until
#: the oldest request in that window leaves it}. Times are the Redis server's: nodes' clocks never matter.
RATE_SCRIPT = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
for i, key in ipairs(KEYS) do
    local win = tonumber(ARGV[2 * i])
    local budget = tonumber(ARGV[2 * i + 1])
    redis.call('ZREMRANGEBYSCORE', key, '-inf', now - win)
    if redis.call('ZCARD', key) >= budget then
        local oldest = redis.call('ZRANGE', key, 0, 0, 'WITHSCORES')
        return {i, tonumber(oldest[2]) + win - now}
    end
    redis.call('ZADD', key, now, ARGV[1])
    redis.call('PEXPIRE', key, math.ceil(win / 1000) + 1000)
end
return {0}
"""


#: KEYS: revocations hash. ARGV: field, ts, rank (1 revoke, 0 restore), value. Stores the record
#: unless the one there is later (authz.revocations.order: ts, then a revoke beats a restore), so
#: nodes pushing what they know in any order end with the same hash. -> 1 stored, 0 not.
#: (Numbers, not string order: Redis compares Lua strings by the server's locale.)
REVOCATION_SCRIPT = """
local cur = redis.call('HGET', KEYS[1], ARGV[1])
if cur then
    local a = string.find(cur, '|', 1, true)
    local cts = a and tonumber(string.sub(cur, 1, a - 1))
    local crank = a and tonumber(string.sub(cur, a + 1, a + 1))
    local nts, nrank = tonumber(ARGV[2]), tonumber(ARGV[3])
    if cts and crank and (cts > nts or (cts == nts and crank >= nrank)) then return 0 end
end
redis.call('HSET', KEYS[1], ARGV[1], ARGV[4])
return 1
"""


class SharedLayout:
    """Key names under one prefix."""

    def __init__(self, prefix: str = DEFAULT_PREFIX) -> None:
        self.prefix = prefix
        self.epoch = f"{prefix}epoch"
        self.channel = f"{prefix}events"
        self.revocations = f"{prefix}revocations"

    def device(self, device_id: str) -> str:
        return f"{self.prefix}d:{device_id.strip().lower()}"

    def rate(self, limit: str, user: str | None, device_id: str | None) -> str:
        digest = hashlib.blake2b(f"{user or ''}\x00{device_id or ''}".encode("utf-8", "surrogatepass"),
                                 digest_size=12).hexdigest()
        return f"{self.prefix}r:{limit}:{digest}"

    def lock(self, device_id: str, field: str) -> str:
        return f"{self.prefix}l:{device_id.strip().lower()}|{field}"


def encode_decision(d: Decision) -> str:
    return json.dumps({"allow": d.allow, "reason": d.reason, "source": d.source}, separators=(",", ":"))


def decode_decision(s: str | bytes) -> Decision:
    """A decision read back from Redis; anything malformed is a ValueError (the caller treats it
    as a miss: what Redis holds never allows on its own say-so without the expected shape)."""
    v = json.loads(s)
    if not isinstance(v, dict) or not isinstance(v.get("allow"), bool) or not isinstance(v.get("reason"), str) \
            or v.get("source") not in SOURCES or v["source"] == "fail-mode":
        raise ValueError("not a shareable decision")
    return Decision(v["allow"], v["reason"], Source(v["source"]))


def revocation_field(rec: dict) -> str:
    """The hash field of a (normalized) revocation record: one per (device, user)."""
    device, entry = entry_of(rec)
    return f"{device}|{entry}"


def encode_revocation(rec: dict) -> str:
    """A (normalized) revocation record as the hash and the events carry it."""
    return f"{rec['ts']}|{int(rec['action'] == 'revoke')}|{json.dumps(rec, separators=(',', ':'), sort_keys=True)}"


def decode_revocation(value: str | bytes) -> dict:
    """A revocation record read back from Redis, normalized; ValueError for anything else."""
    if isinstance(value, bytes):
        value = value.decode("utf-8", "replace")
    parts = value.split("|", 2)
    if len(parts) != 3:
        raise ValueError("not a revocation record")
    try:
        return normalize(json.loads(parts[2]))
    except RecursionError:  # nested deeper than json reads: junk like any other
        raise ValueError("not a revocation record") from None


def encode_event(kind: str, **fields: str) -> str:
    return json.dumps({"t": kind, **fields}, separators=(",", ":"))


def decode_event(data: str | bytes) -> dict[str, str] | None:
    try:
        v = json.loads(data)
    except (ValueError, RecursionError):  # RecursionError: nested deeper than json reads
        return None
    if not isinstance(v, dict) or v.get("t") not in ("device", "all", "fill", "revocation"):
        return None
    return {k: str(x) for k, x in v.items()}
