"""Revocations: a shared, append-only file that every gateway worker follows.

An operator's `easgate revoke USER DEVICEID` (or the connector's `easgate devices block` given the
same file) appends one JSON line; each worker process reads the lines it has not seen yet every
`poll_s` and (1) denies that user and device from then on, before any list or cache, and (2)
closes the requests of that device it holds open (long polls: gateway/holds.py). A file needs no
new infrastructure, survives restarts (a revoked device stays revoked) and works for any number
of worker processes on one host. With a shared cache on Redis, the same records travel to every
node (gateway/sharedcache.py; docs/scaling.md).

Line format: ``{"action": "revoke"|"restore", "user": "alice"|null, "device_id": "Appl...",
"reason": "...", "time": "...", "ts": 1764612345678}``; ``user`` null means every user of that
device; a user is matched as the policy's user lists match (``alice`` matches ``CONTOSO\\alice``).
In the file the last line for a (user, device) wins. ``ts`` (milliseconds since the epoch, when
the record was made; derived from ``time`` for lines written before it existed) orders records
from different places (another node's file, Redis): the later one wins, a revoke beats a restore
of the same millisecond. A restore is remembered, not forgotten, so that an older revoke arriving
late (from a node that was cut off) cannot undo it. A line that does not parse is skipped and
reported once.
"""

from __future__ import annotations

import datetime
import json
import logging
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from .users import user_matches

logger = logging.getLogger(__name__)

__all__ = ["Revocation", "RevocationFile", "RevocationTable", "append", "entry_of", "lookup", "make_record", "normalize",
           "order", "stamp_after"]

ACTIONS = ("revoke", "restore")
TIME_FORMAT = "%Y-%m-%dT%H:%M:%S%z"
MAX_TS = 10**15  # milliseconds: far beyond any real clock, small enough for a Lua number


@dataclass(frozen=True, slots=True)
class Revocation:
    user: str | None  # None: any user of this device
    device_id: str
    reason: str
    time: str


def make_record(user: str | None, device_id: str, reason: str, action: str = "revoke",
                now: float | None = None) -> dict:
    """One revocation (or restore) record, stamped now."""
    if action not in ACTIONS:
        raise ValueError(f"action must be revoke or restore, not {action!r}")
    now = time.time() if now is None else now
    return {"action": action, "user": user, "device_id": device_id, "reason": reason,
            "time": time.strftime(TIME_FORMAT, time.localtime(now)), "ts": int(now * 1000)}


def stamp_after(now: float, *known: dict | None) -> float:
    """``now`` (seconds), or 1 ms after the latest of ``known`` (records of one device and user)
    when that is later: an operator's new record must win over every record already seen for it,
    whatever the clock of the node that stamped those (a restore from a node whose clock runs ahead)."""
    latest = max((r["ts"] for r in known if r is not None), default=-1)
    return max(now, (latest + 1.5) / 1000)


def append(path: Path, user: str | None, device_id: str, reason: str, action: str = "revoke",
           now: float | None = None) -> dict:
    """Append one revocation (or restore) line; O_APPEND keeps concurrent writers' lines whole."""
    rec = make_record(user, device_id, reason, action, now)
    line = (json.dumps(rec, ensure_ascii=False) + "\n").encode()
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o640)
    try:
        os.write(fd, line)
    finally:
        os.close(fd)
    return rec


def _ts_of(t: object) -> int:
    """A line without ``ts`` (written before it existed): its ``time``, else the beginning of time."""
    try:
        return int(datetime.datetime.strptime(str(t), TIME_FORMAT).timestamp() * 1000)
    except ValueError:
        return 0


def normalize(rec: object) -> dict:
    """The record in the one form every table keeps; ValueError for anything that is not one."""
    if not isinstance(rec, dict):
        raise ValueError(f"not a revocation: {rec!r}")
    action, device_id = rec.get("action"), rec.get("device_id")
    if action not in ACTIONS or not isinstance(device_id, str) or not device_id:
        raise ValueError(f"not a revocation: {rec!r}")
    user = rec.get("user")
    user = None if user in (None, "", "*") else str(user)
    ts = rec.get("ts")
    if ts is None:
        ts = _ts_of(rec.get("time"))
    if isinstance(ts, bool) or not isinstance(ts, (int, float)) or not 0 <= ts < MAX_TS:
        raise ValueError(f"not a revocation time stamp: {ts!r}")
    reason = str(rec.get("reason") or ("revoked" if action == "revoke" else ""))
    return {"action": action, "user": user, "device_id": device_id, "reason": reason,
            "time": str(rec.get("time") or ""), "ts": int(ts)}


def entry_of(rec: dict) -> tuple[str, str]:
    """(device, user) as a table keys it: case folded, ``*`` for any user."""
    return rec["device_id"].lower(), (rec["user"] or "*").lower()


def order(rec: dict) -> tuple[int, bool]:
    """Which of two records for one (device, user) wins: the later one; a revoke on a tie."""
    return rec["ts"], rec["action"] == "revoke"


class RevocationTable:
    """The last record per (device, user): revokes and the restores that lifted them."""

    def __init__(self) -> None:
        self.records: dict[str, dict[str, dict]] = {}  # device (lower) -> user entry (lower) | "*" -> record
        self.revoked = 0  # records in force that revoke (0: every lookup is a dict miss at most)

    def __len__(self) -> int:
        return sum(len(v) for v in self.records.values())

    def apply(self, rec: object, *, newest_wins: bool) -> dict | None:
        """Put a record in; returns it (normalized) if it changed the table. ``newest_wins``:
        only a record that :func:`order` puts after the current one replaces it (records from
        elsewhere); otherwise the last applied wins (the lines of one file, in their order)."""
        r = normalize(rec)
        device, entry = entry_of(r)
        entries = self.records.setdefault(device, {})
        cur = entries.get(entry)
        if cur is not None and (cur == r or (newest_wins and order(r) <= order(cur))):
            return None
        self.revoked += (r["action"] == "revoke") - (cur is not None and cur["action"] == "revoke")
        entries[entry] = r
        return r

    def of_device(self, device_id: str) -> dict[str, dict]:
        return self.records.get(device_id.lower(), {})

    def all(self) -> Iterator[dict]:
        for entries in self.records.values():
            yield from entries.values()

    def clear(self) -> None:
        self.records.clear()
        self.revoked = 0

    def lookup(self, user: str | None, device_id: str | None) -> Revocation | None:
        return lookup(user, device_id, self)


def lookup(user: str | None, device_id: str | None, *tables: RevocationTable) -> Revocation | None:
    """The revocation in force for this user and device, over several tables (this machine's file,
    what the cluster said): per (device, user) the record :func:`order` puts last decides."""
    if not device_id or not any(t.revoked for t in tables):
        return None
    best: dict[str, dict] = {}
    for t in tables:
        for entry, r in t.of_device(device_id).items():
            cur = best.get(entry)
            if cur is None or order(r) > order(cur):
                best[entry] = r
    for entry, r in best.items():
        if r["action"] == "revoke" and (entry == "*" or (user and user_matches(entry, user))):
            return Revocation(r["user"], r["device_id"], r["reason"], r["time"])
    return None


class RevocationFile:
    """The revocations in force, read incrementally from `path` (a missing file is no revocations;
    no path: revocations only `apply`-ed in this process)."""

    def __init__(self, path: Path | None) -> None:
        self.path = path
        self.table = RevocationTable()
        self._offset = 0
        self._inode: int | None = None
        self._partial = b""

    def lookup(self, user: str | None, device_id: str | None) -> Revocation | None:
        return lookup(user, device_id, self.table)

    def poll(self) -> list[Revocation]:
        """Read what was appended since the last call; returns the revocations that came into force."""
        return [Revocation(r["user"], r["device_id"], r["reason"], r["time"])
                for r in self.poll_records() if r["action"] == "revoke"]

    def poll_records(self) -> list[dict]:
        """Read what was appended since the last call; returns every record that changed something
        (revokes and restores, normalized): what a node passes on to the others."""
        if self.path is None:
            return []
        try:
            st = self.path.stat()
        except FileNotFoundError:
            return []
        if st.st_ino != self._inode or st.st_size < self._offset:  # replaced or truncated: read it all again
            self._inode, self._offset, self._partial = st.st_ino, 0, b""
            self.table.clear()
        if st.st_size == self._offset:
            return []
        with open(self.path, "rb") as f:
            f.seek(self._offset)
            data = f.read(st.st_size - self._offset)
        self._offset += len(data)
        data = self._partial + data
        lines = data.split(b"\n")
        self._partial = lines.pop()  # an incomplete last line waits for the rest
        new: list[dict] = []
        for raw in lines:
            if not raw.strip():
                continue
            try:
                r = self.table.apply(json.loads(raw), newest_wins=False)
            except (ValueError, RecursionError):  # also json's JSONDecodeError; nested deeper than json reads
                logger.warning(f"easgate: {self.path}: skipped a line that is not a revocation: {raw[:80]!r}")
                continue
            if r is not None:
                new.append(r)
        return new

    def apply(self, rec: dict) -> Revocation | None:
        """Apply one record in this process; returns the revocation it put in force (None for a restore)."""
        r = self.table.apply(rec, newest_wins=False)
        if r is None or r["action"] != "revoke":
            return None
        return Revocation(r["user"], r["device_id"], r["reason"], r["time"])
