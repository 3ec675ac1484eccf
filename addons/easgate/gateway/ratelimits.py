"""Where `authorization.rate_limits` are counted: one budget per device, however many processes serve it.

- With ``cache.redis`` (several nodes): in Redis, one sliding window per (limit, user, DeviceId)
  for the whole cluster, checked and counted in one script run (``authz/sharedlayout.py``
  ``RATE_SCRIPT``; one round trip per request that a limit applies to).
- With ``easgate run --workers N`` (one machine): in the tables every worker maps from the
  supervisor's run directory (``authz/ratetable.py``).
- Otherwise (one process: ``easgate run`` without workers, mitmweb, mitmdump): in this process
  (``authz/commands.py`` ``RateLimiter``).

Redis down (or its circuit open): the machine's tables, else this process, logged once per burst
and once when Redis counts again. A machine table that cannot be used (no room for it, a lock held
too long): this process, logged the same way. A fallback never denies more than the limit would;
it may allow up to one budget per counter that took over.
"""

from __future__ import annotations

import itertools
import logging
import math
import os
import secrets
from collections import Counter

from ..authz.commands import RateLimit, RateLimiter
from ..authz.ratetable import RUN_DIR_ENV, MachineRateLimits, TableUnavailable
from .sharedcache import SharedCache, Unavailable

__all__ = ["RateLimits"]

logger = logging.getLogger("easgate.authz")


class RateLimits:
    """The rate limits of one gateway process, counted in the widest store it can reach."""

    def __init__(self, limits: tuple[RateLimit, ...], shared: SharedCache | None = None,
                 run_dir: str | None = None) -> None:
        self._limits: tuple[RateLimit, ...] = ()
        self.shared = shared
        self.local = RateLimiter(())
        self.machine: MachineRateLimits | None = None
        self.counters: Counter[str] = Counter()
        self._degraded: str | None = None  # why the widest store is not counting, while it is not
        self._token = f"{os.getpid()}-{secrets.token_hex(4)}-"
        self._seq = itertools.count()
        self.run_dir = run_dir if run_dir is not None else os.environ.get(RUN_DIR_ENV)
        self.limits = limits

    @property
    def limits(self) -> tuple[RateLimit, ...]:
        return self._limits

    @limits.setter
    def limits(self, limits: tuple[RateLimit, ...]) -> None:
        """The limits in force (a policy reload may change them): the counts of a limit whose name
        (and, in the machine's tables, window) stays the same carry over."""
        if limits == self._limits:
            return
        self._limits = limits
        self.local.limits = limits
        if self.machine is not None:
            self.machine.close()
            self.machine = None
        if limits and self.run_dir:
            try:
                self.machine = MachineRateLimits(limits, self.run_dir)
            except TableUnavailable as e:
                logger.warning(f"easgate: {e}; rate limits are counted per worker process")

    @property
    def store(self) -> str:
        """Where a request is counted when nothing fails: redis, machine or process."""
        return "redis" if self.shared else ("machine" if self.machine else "process")

    def close(self) -> None:
        if self.machine is not None:
            self.machine.close()
            self.machine = None

    async def hit(self, key: tuple, command: str | None) -> tuple[RateLimit, int] | None:
        """Count one request of ``key`` (user, DeviceId); the limit it exceeds and the seconds until
        it may retry, or None."""
        applicable = [lim for lim in self.limits if not lim.commands or command in lim.commands]
        if not applicable:
            return None
        if self.shared is not None:
            keys = [self.shared.keys.rate(lim.name, *key) for lim in applicable]
            args: list[str | int] = [f"{self._token}{next(self._seq)}"]
            for lim in applicable:
                args += [int(lim.per_s * 1_000_000), lim.requests]
            try:
                r = await self.shared.rate_hit(keys, args)
            except Unavailable:
                self._degrade(f"Redis {self.shared.shown} unreachable",
                              "this machine's workers" if self.machine is not None else "this worker process")
            else:
                self._recover("redis")
                if r[0] == 0:
                    return None
                lim = applicable[r[0] - 1]
                return lim, lim.retry_after_s or max(1, math.ceil(r[1] / 1_000_000))
        if self.machine is not None:
            try:
                hit = self.machine.hit(key, command)
            except TableUnavailable as e:
                self._degrade(str(e), "this worker process")
            else:
                self.counters["machine"] += 1
                if self.shared is None:
                    self._recover("machine")
                return hit
        self.counters["process"] += 1
        return self.local.hit(key, command)

    def _degrade(self, why: str, where: str) -> None:
        self.counters["fallbacks"] += 1
        if self._degraded is None:
            self._degraded = why
            logger.warning(f"easgate: {why}; rate limits are counted by {where} until it is back")

    def _recover(self, store: str) -> None:
        self.counters[store] += 1
        if self._degraded is not None:
            logger.warning(f"easgate: rate limits are counted in {'Redis' if store == 'redis' else 'the machine table'} "
                           f"again ({self.counters['fallbacks']} requests counted elsewhere so far)")
            self._degraded = None

    @property
    def stats(self) -> dict:
        return {"store": self.store, **self.counters}
