"""The change feed a connector serves to the gateways that follow it (``/services/easgate/changes``).

Why: a gateway caches a device's allow for ``allow_ttl_s`` and holds its Pings for up to an hour;
an operator's block (``easgate devices block``) would reach it only at the next re-check. With
Redis, block events do that (``connector/events.py``); on one machine without it, the gateway's
workers long-poll this feed and learn of a block within a poll interval
(``gateway/xnc.py`` ``ChangeFollower``). Wire format: ``authz/changefeed.py``.

The feed is in memory: a sequence number, the last ``KEEP`` changed DeviceIds, and a random
instance id, so that a follower asking a restarted connector (or for changes it no longer keeps)
gets ``reset``. Its sources:

- a SQLite inventory: the ``changes`` table its triggers fill (``connector/store.py``), read every
  ``POLL_S`` seconds on the event loop (a rowid range scan: microseconds);
- PostgreSQL: the inventory's LISTEN/NOTIFY (``connector/pgstore.py`` ``watch``), whose ``"*"``
  (it was not listening for a while) is a reset.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import secrets
import sqlite3

from ..authz.changefeed import MAX_DEVICES, MAX_WAIT_S, WAIT_S, Changes
from .inventories import AnyInventory
from .store import Inventory, InventoryError

__all__ = ["ChangeFeed", "POLL_S"]

logger = logging.getLogger("easgate.connector")

KEEP = 10_000
POLL_S = 0.25
PRUNE_EVERY_S = 600.0


class BadQuery(ValueError):
    pass


class ChangeFeed:
    """Changed DeviceIds by sequence number; followers wait on it. Used from one event loop."""

    def __init__(self, keep: int = KEEP) -> None:
        self.instance = secrets.token_hex(8)
        self.seq = 0
        self.reset_at = 0  # a follower behind this must forget everything
        self.recent: collections.deque[tuple[int, str]] = collections.deque(maxlen=keep)
        self._waiters: set[asyncio.Future[None]] = set()
        self.followers = 0
        self._db_seq: int | None = None  # the last row of the SQLite changes table read
        self._db_failing = False
        self.closed = False

    def close(self) -> None:
        """The connector stops: every waiting follower gets its answer now."""
        self.closed = True
        self._wake()

    # -- sources -------------------------------------------------------------------------------

    def changed(self, device_id: str) -> None:
        """One device changed; ``"*"``: anything may have."""
        self.seq += 1
        if device_id == "*":
            self.reset_at = self.seq
        else:
            self.recent.append((self.seq, device_id))
        self._wake()

    def _wake(self) -> None:
        for f in self._waiters:
            if not f.done():
                f.set_result(None)
        self._waiters.clear()

    def poll_sqlite(self, inventory: Inventory) -> int:
        """Read what the SQLite triggers recorded since the last call; the number of changes."""
        try:
            if self._db_seq is None:
                self._db_seq = inventory.last_change()  # what came before us is in no gateway's cache of ours
                return 0
            rows = inventory.changes_since(self._db_seq, MAX_DEVICES + 1)
        except (sqlite3.Error, InventoryError) as e:
            if not self._db_failing:
                logger.warning(f"easgate connector: cannot read the inventory's changes ({e}); following "
                               "gateways are told to forget everything once it can")
            self._db_failing = True
            return 0
        if self._db_failing:
            self._db_failing = False
            self.changed("*")  # changes may have been pruned meanwhile
        if not rows:
            return 0
        if len(rows) > MAX_DEVICES:  # a large import: forget everything rather than one by one
            self._db_seq = inventory.last_change()
            self.changed("*")
            return len(rows)
        self._db_seq = rows[-1][0]
        for _seq, device in rows:
            self.seq += 1
            self.recent.append((self.seq, device))
        self._wake()
        return len(rows)

    async def follow(self, inventory: AnyInventory) -> None:
        """The task that feeds this feed from a SQLite inventory (PostgreSQL calls :meth:`changed`)."""
        if not isinstance(inventory, Inventory):
            return
        loop = asyncio.get_running_loop()
        pruned = loop.time()
        while True:
            try:
                self.poll_sqlite(inventory)
                if loop.time() - pruned > PRUNE_EVERY_S:
                    pruned = loop.time()
                    await asyncio.to_thread(inventory.prune_changes)
            except Exception:  # noqa: BLE001 - the feed must outlive one bad round
                logger.exception("easgate connector: following the inventory's changes failed")
            await asyncio.sleep(POLL_S)

    # -- followers -----------------------------------------------------------------------------

    def answer(self, since: int | None, instance: str | None) -> Changes | None:
        """What a follower at (instance, since) gets now; None: nothing yet (wait)."""
        if since is None or instance != self.instance or since > self.seq or since < self.reset_at \
                or (since < self.seq and (not self.recent or self.recent[0][0] > since + 1)):
            return Changes(self.instance, self.seq, (), reset=since is not None)
        if since == self.seq:
            return None
        devices = list(dict.fromkeys(d for s, d in self.recent if s > since))
        if len(devices) > MAX_DEVICES:
            return Changes(self.instance, self.seq, (), reset=True)
        return Changes(self.instance, self.seq, tuple(devices))

    async def wait(self, since: int | None, instance: str | None, wait_s: float) -> Changes:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + wait_s
        self.followers += 1
        try:
            while (c := self.answer(since, instance)) is None:
                left = deadline - loop.time()
                if left <= 0 or self.closed:
                    return Changes(self.instance, self.seq)
                f = loop.create_future()
                self._waiters.add(f)
                try:
                    await asyncio.wait_for(f, left)
                except TimeoutError:
                    self._waiters.discard(f)
            return c
        finally:
            self.followers -= 1


def parse_query(params: dict[str, str]) -> tuple[int | None, str | None, float]:
    """``since``, ``instance``, ``wait`` of a follower's request; BadQuery for what no follower sends."""
    since_s, instance, wait_s = params.get("since"), params.get("instance"), params.get("wait")
    since = None
    if since_s is not None:
        if not since_s.isdigit() or len(since_s) > 18:
            raise BadQuery("parameter since must be a sequence number from an earlier answer")
        since = int(since_s)
        if not instance:
            raise BadQuery("parameter since needs the instance of the answer it came from")
    wait = WAIT_S
    if wait_s is not None:
        try:
            wait = float(wait_s)
        except ValueError:
            raise BadQuery(f"parameter wait must be seconds from 0 to {MAX_WAIT_S:g}")
        if not 0 <= wait <= MAX_WAIT_S:
            raise BadQuery(f"parameter wait must be seconds from 0 to {MAX_WAIT_S:g}")
    return since, instance, wait
