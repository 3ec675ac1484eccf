"""Revocations: a shared, append-only file that every gateway worker follows.

An operator's `easgate revoke USER DEVICEID` (or the connector's `easgate devices block` given the
same file) appends one JSON line; each worker process reads the lines it has not seen yet every
`poll_s` and (1) denies that user and device from then on, before any list or cache, and (2)
closes the requests of that device it holds open (long polls: gateway/holds.py). A file needs no
new infrastructure, survives restarts (a revoked device stays revoked) and works for any number
of worker processes on one host; docs/scaling.md says how to carry it further.

Line format: ``{"action": "revoke"|"restore", "user": "alice"|null, "device_id": "Appl...",
"reason": "...", "time": "..."}``; ``user`` null means every user of that device; a user is matched
as the policy's user lists match (``alice`` matches ``CONTOSO\\alice``). The last line for a
(user, device) wins. A line that does not parse is skipped and reported once.
"""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path

from .users import user_matches

logger = logging.getLogger(__name__)

__all__ = ["Revocation", "RevocationFile", "append"]


@dataclass(frozen=True, slots=True)
class Revocation:
    user: str | None  # None: any user of this device
    device_id: str
    reason: str
    time: str


def append(path: Path, user: str | None, device_id: str, reason: str, action: str = "revoke") -> dict:
    """Append one revocation (or restore) line; O_APPEND keeps concurrent writers' lines whole."""
    if action not in ("revoke", "restore"):
        raise ValueError(f"action must be revoke or restore, not {action!r}")
    rec = {"action": action, "user": user, "device_id": device_id, "reason": reason,
           "time": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    line = (json.dumps(rec, ensure_ascii=False) + "\n").encode()
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o640)
    try:
        os.write(fd, line)
    finally:
        os.close(fd)
    return rec


class RevocationFile:
    """The revocations in force, read incrementally from `path` (a missing file is no revocations;
    no path: revocations only `apply`-ed in this process)."""

    def __init__(self, path: Path | None) -> None:
        self.path = path
        self.active: dict[str, dict[str, Revocation]] = {}  # device_id (lower) -> user entry (lower) | "*"
        self._offset = 0
        self._inode: int | None = None
        self._partial = b""

    def lookup(self, user: str | None, device_id: str | None) -> Revocation | None:
        if not device_id or not self.active:
            return None
        for entry, r in self.active.get(device_id.lower(), {}).items():
            if entry == "*" or (user and user_matches(entry, user)):
                return r
        return None

    def poll(self) -> list[Revocation]:
        """Read what was appended since the last call; returns the revocations that came into force."""
        if self.path is None:
            return []
        try:
            st = self.path.stat()
        except FileNotFoundError:
            return []
        if st.st_ino != self._inode or st.st_size < self._offset:  # replaced or truncated: read it all again
            self._inode, self._offset, self._partial = st.st_ino, 0, b""
            self.active.clear()
        if st.st_size == self._offset:
            return []
        with open(self.path, "rb") as f:
            f.seek(self._offset)
            data = f.read(st.st_size - self._offset)
        self._offset += len(data)
        data = self._partial + data
        lines = data.split(b"\n")
        self._partial = lines.pop()  # an incomplete last line waits for the rest
        new: list[Revocation] = []
        for raw in lines:
            if not raw.strip():
                continue
            try:
                rec = json.loads(raw)
            except ValueError:
                rec = None
            try:
                r = self.apply(rec)
            except (KeyError, TypeError, ValueError):
                logger.warning(f"easgate: {self.path}: skipped a line that is not a revocation: {raw[:80]!r}")
                continue
            if r is not None:
                new.append(r)
        return new

    def apply(self, rec: dict) -> Revocation | None:
        """Apply one line's record; returns the revocation it put in force (None for a restore)."""
        action, device_id = rec["action"], str(rec["device_id"])
        if action not in ("revoke", "restore") or not device_id:
            raise ValueError(f"not a revocation: {rec!r}")
        user = rec.get("user")
        user = None if user in (None, "", "*") else str(user)
        entry = (user or "*").lower()
        if action == "restore":
            entries = self.active.get(device_id.lower(), {})
            entries.pop(entry, None)
            if not entries:
                self.active.pop(device_id.lower(), None)
            return None
        r = Revocation(user, device_id, str(rec.get("reason") or "revoked"), str(rec.get("time") or ""))
        self.active.setdefault(device_id.lower(), {})[entry] = r
        return r
