"""The decision cache: remembered verdicts per (user, device), with single-flight.

* Allow and deny verdicts have separate TTLs (a new deny usually should take
  effect sooner, or a denied device should be re-checked sooner once fixed).
  A TTL of 0 means "never fresh" - the entry is still kept for :meth:`get_stale`.
* The cache is bounded: past ``max_entries`` the least recently used entry is
  evicted (``max_entries=0`` disables caching). Expired entries are kept until
  evicted, so the "stale" fail mode can serve the last known verdict when the
  decision backend is down.
* Every operation is O(1) (an ``OrderedDict`` with ``move_to_end``).
* :meth:`single_flight` only deduplicates concurrent computations of one key; the
  caller decides whether to :meth:`put` the result.
* :meth:`clear` (e.g. after a policy reload) also detaches computations already
  in flight, so new callers never join a computation started under the old
  policy; pass ``generation=`` to :meth:`put` to drop such late results.

Not thread-safe: use it from one asyncio event loop (mitmproxy's).
"""

from __future__ import annotations

import asyncio
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Hashable
from typing import NamedTuple

from ..core.decision import Decision

__all__ = ["DecisionCache", "cache_key"]


def cache_key(user: str | None, device_id: str | None) -> tuple[str, str]:
    """The cache key for a request: ``(user, device_id)`` exactly as the request carried them.

    Nothing is folded: the decision source decides what case means (a connector may tell
    ``allowed1`` from ``ALLOWED1``), and the cache must never answer for a value it was not asked
    about. The user keeps its domain form for the same reason.
    """
    return (user or "", device_id or "")


class _Entry(NamedTuple):
    decision: Decision
    stored: float  # clock() at put()
    expires: float  # fresh while clock() < expires


class DecisionCache:
    def __init__(
        self,
        allow_ttl_s: float,
        deny_ttl_s: float,
        max_entries: int,
        clock: Callable[[], float] = time.monotonic,
    ):
        if allow_ttl_s < 0 or deny_ttl_s < 0:
            raise ValueError("cache TTLs must be >= 0 seconds")
        if max_entries < 0:
            raise ValueError("max_entries must be >= 0")
        self.allow_ttl_s = float(allow_ttl_s)
        self.deny_ttl_s = float(deny_ttl_s)
        self.max_entries = int(max_entries)
        self._clock = clock
        self._entries: OrderedDict[Hashable, _Entry] = OrderedDict()
        self._inflight: dict[Hashable, asyncio.Future[Decision]] = {}
        self.generation = 0  # bumped by clear()
        self.hits = 0
        self.misses = 0
        self.stale_hits = 0
        self.evictions = 0
        self.shared = 0  # single_flight callers that joined another's computation

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, key: Hashable) -> bool:
        return key in self._entries

    # -- lookups ------------------------------------------------------------------

    def get(self, key: Hashable) -> Decision | None:
        """The cached decision if it is still fresh, else ``None``. Counts hits/misses."""
        entry = self._entries.get(key)
        if entry is not None and self._clock() < entry.expires:
            self._entries.move_to_end(key)
            self.hits += 1
            return entry.decision
        self.misses += 1
        return None

    def get_stale(self, key: Hashable, max_age_s: float) -> Decision | None:
        """Any decision stored less than ``max_age_s`` ago, fresh or past its TTL."""
        entry = self._entries.get(key)
        if entry is None or self._clock() - entry.stored >= max_age_s:
            return None
        self.stale_hits += 1
        return entry.decision

    def age(self, key: Hashable) -> float | None:
        """Seconds since ``key`` was stored, or ``None``."""
        entry = self._entries.get(key)
        return None if entry is None else self._clock() - entry.stored

    # -- updates ------------------------------------------------------------------

    def put(self, key: Hashable, decision: Decision, *, generation: int | None = None) -> bool:
        """Store ``decision`` (TTL by verdict), evicting LRU entries past ``max_entries``.

        With ``generation``, the put is dropped (returns ``False``) if :meth:`clear`
        ran since the caller read :attr:`generation`, i.e. the decision was made
        under a policy that has since been replaced.
        """
        if self.max_entries == 0:
            return False
        if generation is not None and generation != self.generation:
            return False
        now = self._clock()
        ttl = self.allow_ttl_s if decision.allow else self.deny_ttl_s
        entries = self._entries
        entries[key] = _Entry(decision, now, now + ttl)
        entries.move_to_end(key)
        while len(entries) > self.max_entries:
            entries.popitem(last=False)
            self.evictions += 1
        return True

    def clear(self) -> int:
        """Drop every entry (and detach in-flight computations). Returns how many entries."""
        n = len(self._entries)
        self._entries.clear()
        self._inflight = {}
        self.generation += 1
        return n

    # -- single flight ------------------------------------------------------------

    async def single_flight(
        self, key: Hashable, compute: Callable[[], Awaitable[Decision]]
    ) -> tuple[Decision, bool]:
        """Run ``compute()`` once for all concurrent callers of ``key``.

        Returns ``(decision, shared)``; ``shared`` is ``True`` for callers that
        joined a computation another caller started. An exception raised by
        ``compute`` reaches every waiter, and the key is free again afterwards
        (the next call computes anew). The computation runs in its own task, so
        one caller being cancelled (client gone) does not cancel it for the others.
        """
        task = self._inflight.get(key)
        if task is not None and not task.done():
            self.shared += 1
            return await asyncio.shield(task), True

        task = asyncio.ensure_future(compute())
        inflight = self._inflight
        inflight[key] = task

        def _done(t: asyncio.Future[Decision], inflight=inflight) -> None:
            if inflight.get(key) is t:
                del inflight[key]
            if not t.cancelled():
                t.exception()  # mark retrieved: no "exception never retrieved" if all waiters left

        task.add_done_callback(_done)
        return await asyncio.shield(task), False

    # -- introspection ------------------------------------------------------------

    @property
    def stats(self) -> dict[str, int]:
        return {
            "hits": self.hits,
            "misses": self.misses,
            "stale_hits": self.stale_hits,
            "entries": len(self._entries),
            "evictions": self.evictions,
            "inflight": len(self._inflight),
            "shared": self.shared,
        }
