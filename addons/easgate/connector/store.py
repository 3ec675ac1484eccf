"""The connector's device inventory: one SQLite table, the MDM's view of every device.

Why SQLite (the standard library's sqlite3): the connector must see `easgate devices block X` at
once, without a restart or a reload signal, and a lookup must cost the same for 100,000 devices
as for 10. Every decision is one primary-key SELECT on a WITHOUT ROWID table (a single B-tree
search), and every SELECT in autocommit mode starts a fresh read transaction, so a change committed
by another process is visible to the very next request. Nothing is loaded into Python memory.

The database runs in WAL mode: readers (the connector) never wait for a writer (an import), and
an import of a whole MDM export is one transaction, so the connector sees either the old or the
new inventory, never half of each.

Table ``devices``:

============  =====================================================================
device_id     the ActiveSync DeviceId, primary key, case-insensitive (COLLATE NOCASE)
user          the owner as the MDM knows it: ``alice``, ``CONTOSO\\alice`` or ``alice@contoso.com``
              (matched like a policy file's ``owner``: an entry with a domain matches only
              that exact user, a bare account matches that account in any domain)
device_type   iPhone, iPad, Android, ... (informational)
model         informational
managed       1 if the MDM manages the device
compliant     1 if the MDM considers it compliant
blocked       1 if an operator blocked it (``easgate devices block``)
last_seen     when the connector last decided for it (UTC, ISO 8601), written in batches
updated       when the row last changed (UTC, ISO 8601)
============  =====================================================================

Import files (``easgate devices import FILE``), as an MDM export gives them:

* CSV (UTF-8, an Excel BOM is fine) with a header row. Columns, any order, names case- and
  space-insensitive: ``device_id`` (or DeviceId, Device ID), ``user`` (or owner, username),
  ``device_type`` (or DeviceType, platform), ``model``, ``managed``, ``compliant``, ``blocked``,
  ``last_seen``. ``device_id`` and ``user`` are required. ``#`` lines and blank lines are skipped.
* YAML: a list of mappings with the same keys, or ``{devices: [...]}``.

Booleans are true/false/yes/no/y/n/1/0/on/off; an empty cell takes the default. A new row gets the
defaults (managed and compliant true, blocked false) for columns the file does not have; an
existing row keeps its values for those columns, so a nightly export without a ``blocked``
column never unblocks what an operator blocked. ``--replace`` also removes every device the
file does not list (the file is the whole inventory).

Every problem is reported as ``FILE:LINE: problem; fix``. By default one bad row aborts the whole
import (nothing is written); ``--skip-bad`` imports the good rows and reports the bad ones.
"""

from __future__ import annotations

import csv
import datetime
import difflib
import os
import sqlite3
import threading
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from ..authz.policy import split_user, user_matches
from ..core.decision import Decision, Source, one_line
from ..core.yamlfile import StrictLoader, YamlError, check_duplicate_keys, compose_yaml_text, yaml_fix

__all__ = [
    "Device",
    "ImportFileError",
    "ImportReport",
    "Inventory",
    "InventoryError",
    "device_decision",
    "parse_file",
]

SCHEMA_VERSION = 2
SCHEMA = """
CREATE TABLE IF NOT EXISTS devices (
    device_id   TEXT    NOT NULL PRIMARY KEY COLLATE NOCASE,
    user        TEXT    NOT NULL,
    device_type TEXT    NOT NULL DEFAULT '',
    model       TEXT    NOT NULL DEFAULT '',
    managed     INTEGER NOT NULL DEFAULT 1 CHECK (managed IN (0, 1)),
    compliant   INTEGER NOT NULL DEFAULT 1 CHECK (compliant IN (0, 1)),
    blocked     INTEGER NOT NULL DEFAULT 0 CHECK (blocked IN (0, 1)),
    last_seen   TEXT,
    updated     TEXT    NOT NULL
) WITHOUT ROWID;
"""
#: Version 2: every committed change a decision depends on, whoever wrote it (``easgate devices``, an
#: import, sqlite3 by hand), leaves the DeviceId in ``changes``; the connector serves them to gateways
#: (``/services/easgate/changes``) and prunes rows older than ``CHANGES_KEEP_S``. last_seen and
#: updated alone are not changes (``flush_seen`` writes last_seen every second).
CHANGES = (
    """CREATE TABLE IF NOT EXISTS changes (
        seq       INTEGER PRIMARY KEY AUTOINCREMENT,
        device_id TEXT    NOT NULL,
        at        INTEGER NOT NULL DEFAULT (CAST(strftime('%s', 'now') AS INTEGER))
    )""",
    """CREATE TRIGGER IF NOT EXISTS devices_inserted AFTER INSERT ON devices BEGIN
        INSERT INTO changes(device_id) VALUES (NEW.device_id);
    END""",
    """CREATE TRIGGER IF NOT EXISTS devices_deleted AFTER DELETE ON devices BEGIN
        INSERT INTO changes(device_id) VALUES (OLD.device_id);
    END""",
    """CREATE TRIGGER IF NOT EXISTS devices_changed AFTER UPDATE OF device_id, user, managed, compliant, blocked
        ON devices
        WHEN OLD.user IS NOT NEW.user OR OLD.managed IS NOT NEW.managed OR OLD.compliant IS NOT NEW.compliant
             OR OLD.blocked IS NOT NEW.blocked OR OLD.device_id IS NOT NEW.device_id
    BEGIN
        INSERT INTO changes(device_id) VALUES (NEW.device_id);
    END""",
)
CHANGES_KEEP_S = 3600
COLUMNS = ("device_id", "user", "device_type", "model", "managed", "compliant", "blocked", "last_seen", "updated")
#: What an import file may say, with the header spellings MDM exports use.
FIELD_ALIASES: dict[str, str] = {
    "device_id": "device_id", "deviceid": "device_id", "device": "device_id", "easdeviceid": "device_id",
    "activesyncid": "device_id", "activesync_id": "device_id",
    "user": "user", "owner": "user", "username": "user", "user_name": "user", "userprincipalname": "user",
    "upn": "user",
    "device_type": "device_type", "devicetype": "device_type", "type": "device_type", "platform": "device_type",
    "model": "model", "device_model": "model", "devicemodel": "model",
    "managed": "managed", "compliant": "compliant", "blocked": "blocked",
    "last_seen": "last_seen", "lastseen": "last_seen", "last_sync": "last_seen", "lastsync": "last_seen",
}
FIELDS = ("device_id", "user", "device_type", "model", "managed", "compliant", "blocked", "last_seen")
BOOL_FIELDS = ("managed", "compliant", "blocked")
DEFAULTS = {"device_type": "", "model": "", "managed": 1, "compliant": 1, "blocked": 0, "last_seen": None}
TRUE = frozenset({"true", "yes", "y", "1", "on"})
FALSE = frozenset({"false", "no", "n", "0", "off"})
MAX_ID = 255  # longer than any real DeviceId; the callout limits values to 2048 anyway
MAX_TEXT = 1024
MAX_REPORTED = 50


class InventoryError(Exception):
    """The inventory database cannot be used; the message names the file and the fix."""


def utcnow() -> str:
    return datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


# --------------------------------------------------------------------------------------------
# Rows and the decision


@dataclass(frozen=True, slots=True)
class Device:
    device_id: str
    user: str
    device_type: str
    model: str
    managed: bool
    compliant: bool
    blocked: bool
    last_seen: str | None
    updated: str

    @classmethod
    def from_row(cls, row: tuple) -> Device:
        d, u, t, m, man, comp, blk, seen, upd = row
        return cls(d, u, t, m, bool(man), bool(comp), bool(blk), seen, upd)


def device_decision(row: Device | None, device_id: str, user: str | None) -> Decision | None:
    """What the inventory says about ``device_id`` used by ``user``; ``None`` = the inventory has
    no opinion (device unknown, or known but not managed) and the policy mode decides.

    The one place where an inventory row becomes a verdict (checked in this order):
    blocked -> deny; not managed -> no opinion; owner is another user -> deny;
    not compliant -> deny; else allow. Source is always ``inventory``.
    """
    if row is None:
        return None
    dev = one_line(device_id, 80)
    if row.blocked:
        return Decision(False, f"device {dev} blocked in the inventory", Source.BLOCK)
    if not row.managed:
        return None
    if not user or not user_matches(row.user, user):
        return Decision(False, f"device {dev} belongs to another user", Source.INVENTORY)
    if not row.compliant:
        return Decision(False, f"device {dev} not compliant", Source.INVENTORY)
    return Decision(True, f"device {dev} managed and compliant", Source.INVENTORY)


# --------------------------------------------------------------------------------------------
# The database


def connect(path: Path, *, timeout_s: float = 5.0, create: bool = True) -> sqlite3.Connection:
    """One connection in autocommit mode, WAL journal, schema ensured."""
    path = Path(path)
    if not create and not path.exists():
        raise InventoryError(f"{path}: inventory database not found; create it with "
                             f"`easgate devices --db {path} import FILE` or `... add ID --user U`")
    try:
        if create:
            path.parent.mkdir(parents=True, exist_ok=True)
        conn = sqlite3.connect(str(path), timeout=timeout_s, isolation_level=None, check_same_thread=False)
    except (OSError, sqlite3.Error) as e:
        raise InventoryError(f"{path}: cannot open the inventory database: {e}; check the path and permissions")
    try:
        version = conn.execute("PRAGMA user_version").fetchone()[0]
        if version > SCHEMA_VERSION:
            raise InventoryError(f"{path}: inventory schema version {version} is newer than this easgate "
                                 f"({SCHEMA_VERSION}); upgrade easgate")
        mode = conn.execute("PRAGMA journal_mode=WAL").fetchone()[0]
        if mode.lower() != "wal":
            raise InventoryError(f"{path}: cannot switch the database to WAL mode (got {mode}); "
                                 "put it on a local file system")
        conn.execute("PRAGMA synchronous=NORMAL")
        if version < SCHEMA_VERSION:
            conn.execute("BEGIN IMMEDIATE")
            try:
                for statement in (SCHEMA, *CHANGES):
                    conn.execute(statement)
                conn.execute(f"PRAGMA user_version={SCHEMA_VERSION}")
                conn.execute("COMMIT")
            except BaseException:
                conn.execute("ROLLBACK")
                raise
        cols = [r[1] for r in conn.execute("PRAGMA table_info(devices)").fetchall()]
        if tuple(cols) != COLUMNS:
            raise InventoryError(f"{path}: table devices has columns {cols}, expected {list(COLUMNS)}; "
                                 "this is not an easgate inventory (use another --db path)")
    except sqlite3.DatabaseError as e:
        conn.close()
        raise InventoryError(f"{path}: not a usable SQLite database: {e}; use another --db path "
                             "or move the file away")
    except InventoryError:
        conn.close()
        raise
    return conn


@dataclass
class ImportReport:
    inserted: int = 0
    updated: int = 0
    removed: int = 0
    skipped: int = 0
    errors: tuple[str, ...] = ()

    def summary(self) -> str:
        s = f"{self.inserted} added, {self.updated} updated"
        if self.removed:
            s += f", {self.removed} removed (--replace)"
        if self.skipped:
            s += f", {self.skipped} bad rows skipped"
        return s


class ImportFileError(InventoryError):
    """An import file has bad rows; ``errors`` holds one ``FILE:LINE: problem; fix`` per problem."""

    def __init__(self, errors: list[str]) -> None:
        self.errors = tuple(errors)
        shown = errors[:MAX_REPORTED]
        more = f"\n... and {len(errors) - MAX_REPORTED} more" if len(errors) > MAX_REPORTED else ""
        super().__init__("\n".join(shown) + more)


class Inventory:
    """The device table. Thread-safe: one lock around the connection (lookups take microseconds).

    ``get`` is a primary-key lookup on every call, so changes from other processes are seen at
    once. ``touch`` only records last-seen in memory; ``flush_seen`` writes the batch (the
    connector does it about once a second), so the hot path never takes SQLite's write lock and
    never waits for an import that holds it.
    """

    def __init__(self, path: str | os.PathLike[str], *, create: bool = True) -> None:
        self.path = Path(path).expanduser().resolve()
        self.conn = connect(self.path, create=create)
        self.lock = threading.Lock()
        self._seen: dict[str, str] = {}
        self._seen_lock = threading.Lock()
        self._count: tuple[int, int] | None = None  # (data_version, count)
        self._writer: sqlite3.Connection | None = None  # for flush_seen only
        self._writer_lock = threading.Lock()

    def close(self) -> None:
        with self._writer_lock:
            if self._writer is not None:
                self._writer.close()
                self._writer = None
        with self.lock:
            self.conn.close()

    # -- reads -------------------------------------------------------------------------------

    def get(self, device_id: str) -> Device | None:
        with self.lock:
            rows = self.conn.execute("SELECT * FROM devices WHERE device_id = ?", (device_id,)).fetchall()
        return Device.from_row(rows[0]) if rows else None

    def count(self) -> int:
        """Number of devices; recounted only after someone else committed a change."""
        with self.lock:
            dv = self.conn.execute("PRAGMA data_version").fetchone()[0]
            if self._count is None or self._count[0] != dv:
                self._count = (dv, self.conn.execute("SELECT count(*) FROM devices").fetchone()[0])
            return self._count[1]

    def changes_since(self, seq: int, limit: int) -> list[tuple[int, str]]:
        """(seq, DeviceId) of the changes committed after ``seq``, oldest first, at most ``limit``."""
        with self.lock:
            return self.conn.execute("SELECT seq, device_id FROM changes WHERE seq > ? ORDER BY seq LIMIT ?",
                                     (seq, limit)).fetchall()

    def last_change(self) -> int:
        with self.lock:
            return self.conn.execute("SELECT coalesce(max(seq), 0) FROM changes").fetchone()[0]

    def _writer_conn(self, timeout_s: float) -> sqlite3.Connection:
        """The background writes' own connection (opened once; call with ``_writer_lock`` held), so
        lookups never wait on them; ``timeout_s``: how long a write may wait for another writer."""
        if self._writer is None:
            self._writer = connect(self.path, create=False)
        self._writer.execute(f"PRAGMA busy_timeout={int(timeout_s * 1000)}")
        return self._writer

    def prune_changes(self, keep_s: int = CHANGES_KEEP_S, timeout_s: float = 0.2) -> int:
        """Forget changes older than ``keep_s`` (on the writer connection: lookups never wait)."""
        with self._writer_lock:
            w = self._writer_conn(timeout_s)
            try:
                return w.execute("DELETE FROM changes WHERE at < CAST(strftime('%s', 'now') AS INTEGER) - ?",
                                 (keep_s,)).rowcount
            except sqlite3.OperationalError:
                return 0

    def all(self, user: str | None = None) -> Iterator[Device]:
        with self.lock:
            rows = self.conn.execute("SELECT * FROM devices ORDER BY device_id").fetchall()
        for r in rows:
            d = Device.from_row(r)
            if user is None or user_matches(d.user, user) or user_matches(user, d.user):
                yield d

    # -- writes ------------------------------------------------------------------------------

    def _write(self, sql: str, params: tuple) -> int:
        with self.lock:
            self._count = None
            return self.conn.execute(sql, params).rowcount

    def add(self, device_id: str, user: str, device_type: str = "", model: str = "", *, managed: bool = True,
            compliant: bool = True, blocked: bool = False) -> bool:
        """Insert or replace one device; True if it was new. Raises ValueError for bad values."""
        device_id = check_device_id(device_id)
        user = check_user(user)
        device_type, model = check_text(device_type, "device type"), check_text(model, "model")
        with self.lock:
            self._count = None
            self.conn.execute("BEGIN IMMEDIATE")
            try:
                existed = bool(self.conn.execute("SELECT 1 FROM devices WHERE device_id = ?",
                                                 (device_id,)).fetchall())
                self.conn.execute(
                    "INSERT INTO devices(device_id, user, device_type, model, managed, compliant, blocked, updated) "
                    "VALUES(?,?,?,?,?,?,?,?) ON CONFLICT(device_id) DO UPDATE SET device_id=excluded.device_id, "
                    "user=excluded.user, device_type=excluded.device_type, model=excluded.model, "
                    "managed=excluded.managed, compliant=excluded.compliant, blocked=excluded.blocked, "
                    "updated=excluded.updated",
                    (device_id, user, device_type, model, int(managed), int(compliant), int(blocked), utcnow()))
                self.conn.execute("COMMIT")
            except BaseException:
                self.conn.execute("ROLLBACK")
                raise
        return not existed

    def set_blocked(self, device_id: str, blocked: bool) -> bool:
        """False if there is no such device."""
        return self._write("UPDATE devices SET blocked = ?, updated = ? WHERE device_id = ?",
                           (int(blocked), utcnow(), device_id)) > 0

    def remove(self, device_id: str) -> bool:
        return self._write("DELETE FROM devices WHERE device_id = ?", (device_id,)) > 0

    def touch(self, device_id: str) -> None:
        """Remember that the device was seen now; written by :meth:`flush_seen`."""
        with self._seen_lock:
            self._seen[device_id] = utcnow()

    def flush_seen(self, timeout_s: float = 0.2) -> int:
        """Write the remembered last-seen times of known devices; returns how many were written.

        Uses its own connection, so lookups never wait for it. If another process holds the write
        lock for longer than ``timeout_s`` (a big import), the batch is kept for the next flush.
        """
        with self._seen_lock:
            batch, self._seen = self._seen, {}
        if not batch:
            return 0
        with self._writer_lock:
            w = self._writer_conn(timeout_s)
            try:
                w.execute("BEGIN IMMEDIATE")
                cur = w.executemany("UPDATE devices SET last_seen = ? WHERE device_id = ?",
                                    [(t, d) for d, t in batch.items()])
                n = cur.rowcount
                w.execute("COMMIT")
                return n
            except sqlite3.OperationalError:
                if w.in_transaction:
                    w.execute("ROLLBACK")
                with self._seen_lock:
                    for d, t in batch.items():
                        self._seen.setdefault(d, t)
                return 0

    def import_rows(self, rows: Iterable[tuple[int, dict[str, Any]]], present: frozenset[str], *,
                    replace: bool = False) -> ImportReport:
        """Upsert validated rows in one transaction. ``present``: the fields the file has."""
        now = utcnow()
        update_cols = [c for c in FIELDS if c in present and c != "device_id"]
        set_clause = ", ".join([f"{c}=excluded.{c}" for c in update_cols] + ["device_id=excluded.device_id",
                                                                              "updated=excluded.updated"])
        sql = (f"INSERT INTO devices({', '.join(COLUMNS)}) VALUES({', '.join('?' * len(COLUMNS))}) "
               f"ON CONFLICT(device_id) DO UPDATE SET {set_clause}")
        report = ImportReport()
        with self.lock:
            self._count = None
            c = self.conn
            c.execute("BEGIN IMMEDIATE")
            try:
                before = c.execute("SELECT count(*) FROM devices").fetchone()[0]
                if replace:
                    c.execute("CREATE TEMP TABLE IF NOT EXISTS import_ids(device_id TEXT PRIMARY KEY COLLATE NOCASE)")
                    c.execute("DELETE FROM import_ids")
                params = []
                for _line, r in rows:
                    params.append(tuple(now if k == "updated" else r.get(k, DEFAULTS.get(k)) for k in COLUMNS))
                c.executemany(sql, params)
                total = len(params)
                if replace:
                    c.executemany("INSERT OR IGNORE INTO import_ids VALUES(?)", ((p[0],) for p in params))
                    report.removed = c.execute(
                        "DELETE FROM devices WHERE device_id NOT IN (SELECT device_id FROM import_ids)").rowcount
                    c.execute("DELETE FROM import_ids")
                after = c.execute("SELECT count(*) FROM devices").fetchone()[0]
                c.execute("COMMIT")
            except BaseException:
                c.execute("ROLLBACK")
                raise
        report.inserted = after + report.removed - before
        report.updated = total - report.inserted
        return report

    def import_file(self, path: str | os.PathLike[str], *, skip_bad: bool = False,
                    replace: bool = False) -> ImportReport:
        """Parse and import one CSV/YAML file. Bad rows raise :class:`ImportFileError` (nothing written)
        unless ``skip_bad``; then they are skipped and listed in ``report.errors``."""
        rows, present, errors = parse_file(Path(path))
        if errors and not skip_bad:
            raise ImportFileError(errors)
        if replace and errors:
            # --replace with skipped rows would delete devices whose row was merely malformed
            raise ImportFileError(errors + [f"{path}: --replace with bad rows would remove those devices; "
                                         "fix the rows or import without --replace"])
        report = self.import_rows(rows, present, replace=replace)
        report.skipped = len(errors)
        report.errors = tuple(errors)
        return report


# --------------------------------------------------------------------------------------------
# Values


def check_device_id(v: Any) -> str:
    if not isinstance(v, str):
        raise ValueError(f"device_id must be text, got {_kind(v)}; quote it")
    s = v.strip()
    if not s:
        raise ValueError("empty device_id; fill it in or delete the row")
    if len(s) > MAX_ID:
        raise ValueError(f"device_id is {len(s)} characters long (limit {MAX_ID}); check the column")
    if not s.isprintable() or any(c.isspace() for c in s):
        raise ValueError(f"device_id {one_line(s, 40)!r} contains spaces or control characters; "
                         "write the DeviceId exactly as the phone sends it")
    return s


def check_user(v: Any) -> str:
    if not isinstance(v, str):
        raise ValueError(f"user must be text, got {_kind(v)}; quote it")
    s = v.strip()
    if not s:
        raise ValueError(r"empty user; write the owner as alice, CONTOSO\alice or alice@contoso.com")
    if len(s) > MAX_TEXT or not s.isprintable():
        raise ValueError(f"user {one_line(s, 40)!r} is too long or contains control characters; fix the value")
    if not split_user(s)[1]:
        raise ValueError(rf"user {s!r} has no account name; write alice, CONTOSO\alice or alice@contoso.com")
    return s


def check_text(v: Any, what: str) -> str:
    if v is None:
        return ""
    if not isinstance(v, (str, int, float)) or isinstance(v, bool):
        raise ValueError(f"{what} must be text, got {_kind(v)}")
    s = str(v).strip()
    if len(s) > MAX_TEXT or not s.isprintable():
        raise ValueError(f"{what} {one_line(s, 40)!r} is too long or contains control characters")
    return s


def parse_bool(v: Any, what: str) -> int | None:
    """1/0, or None for empty (the default applies)."""
    if v is None:
        return None
    if isinstance(v, bool):
        return int(v)
    if isinstance(v, int) and v in (0, 1):
        return v
    s = str(v).strip().lower()
    if s == "":
        return None
    if s in TRUE:
        return 1
    if s in FALSE:
        return 0
    raise ValueError(f"{what} {one_line(str(v), 40)!r} is not true or false; write true or false "
                     "(yes/no/1/0 also work)")


def parse_time(v: Any) -> str | None:
    if v is None or (isinstance(v, str) and not v.strip()):
        return None
    if isinstance(v, datetime.datetime):
        dt = v
    elif isinstance(v, datetime.date):
        dt = datetime.datetime(v.year, v.month, v.day)
    else:
        s = str(v).strip()
        try:
            dt = datetime.datetime.fromisoformat(s.replace("Z", "+00:00") if s.endswith("Z") else s)
        except ValueError:
            raise ValueError(f"last_seen {one_line(s, 40)!r} is not a date/time; write ISO 8601, "
                             "e.g. 2025-01-31T08:00:00Z")
    if dt.tzinfo is not None:
        dt = dt.astimezone(datetime.UTC).replace(tzinfo=None)
    return dt.strftime("%Y-%m-%dT%H:%M:%SZ")


def _kind(v: Any) -> str:
    return "nothing" if v is None else type(v).__name__


def _normalize_row(raw: dict[str, Any]) -> dict[str, Any]:
    """Validated field -> value for one import row; raises ValueError naming the problem."""
    out: dict[str, Any] = {"device_id": check_device_id(raw.get("device_id")), "user": check_user(raw.get("user"))}
    for k in ("device_type", "model"):
        if k in raw:
            out[k] = check_text(raw[k], k.replace("_", " "))
    for k in BOOL_FIELDS:
        if k in raw:
            b = parse_bool(raw[k], k)
            out[k] = DEFAULTS[k] if b is None else b
    if "last_seen" in raw:
        out["last_seen"] = parse_time(raw["last_seen"])
    return out


# --------------------------------------------------------------------------------------------
# Import files


def _field_name(header: str) -> str | None:
    key = header.strip().lower().replace(" ", "_").replace("-", "_")
    return FIELD_ALIASES.get(key) or FIELD_ALIASES.get(key.replace("_", ""))


def _unknown(where: str, name: str, what: str = "column") -> str:
    close = difflib.get_close_matches(name.strip().lower(), list(FIELD_ALIASES), n=1, cutoff=0.7)
    hint = f" (did you mean '{close[0]}'?)" if close else ""
    return (f"{where}: unknown {what} '{one_line(name, 40)}'{hint}; known: {', '.join(FIELDS)} "
            f"(rename or delete the {what})")


Parsed = tuple[list[tuple[int, dict[str, Any]]], frozenset[str], list[str]]


def parse_file(path: Path) -> Parsed:
    """(good rows as (line, fields), the fields the file has, errors as 'FILE:LINE: problem; fix')."""
    suffix = path.suffix.lower()
    if suffix not in (".csv", ".yaml", ".yml"):
        return [], frozenset(), [f"{path}: unsupported file type '{path.suffix}'; use a .csv, .yaml or .yml export"]
    try:
        text = path.read_text(encoding="utf-8-sig")
    except FileNotFoundError:
        return [], frozenset(), [f"{path}: file not found; check the path"]
    except UnicodeDecodeError as e:
        return [], frozenset(), [f"{path}: not UTF-8 text ({e.reason} at byte {e.start}); save the export as UTF-8"]
    except OSError as e:
        return [], frozenset(), [f"{path}: cannot read: {e.strerror}; check the path and permissions"]
    rows, present, errors = (_parse_csv if suffix == ".csv" else _parse_yaml)(path, text)
    # duplicates inside the file: the later row would silently win
    first: dict[str, int] = {}
    good: list[tuple[int, dict[str, Any]]] = []
    for line, r in rows:
        k = r["device_id"].lower()
        if k in first:
            errors.append(f"{path}:{line}: device {r['device_id']} is already on line {first[k]}; "
                          "keep one row per device")
            continue
        first[k] = line
        good.append((line, r))
    errors.sort(key=_line_of)
    if not good and not errors:
        errors.append(f"{path}: no devices in the file; an MDM export lists one device per row")
    return good, present, errors


def _line_of(err: str) -> int:
    parts = err.split(":")
    for p in parts[1:3]:
        if p.isdigit():
            return int(p)
    return 0


def _parse_csv(path: Path, text: str) -> Parsed:
    rows: list[tuple[int, dict[str, Any]]] = []
    errors: list[str] = []
    columns: list[str | None] | None = None
    present: frozenset[str] = frozenset()
    reader = csv.reader(text.splitlines(keepends=True))
    try:
        for cells in reader:
            line = reader.line_num
            if not cells or all(not c.strip() for c in cells) or cells[0].lstrip().startswith("#"):
                continue
            if columns is None:
                columns = []
                bad = False
                for c in cells:
                    name = _field_name(c)
                    if name is None:
                        errors.append(_unknown(f"{path}:{line}", c))
                        bad = True
                    elif name in columns:
                        errors.append(f"{path}:{line}: column '{c.strip()}' repeats {name}; name each column once")
                        bad = True
                    columns.append(name)
                for need in ("device_id", "user"):
                    if need not in columns:
                        errors.append(f"{path}:{line}: header has no {need} column; the first non-comment line "
                                      f"must name the columns, e.g. device_id,user,device_type,model,managed,compliant")
                        bad = True
                if bad:
                    return [], frozenset(), errors
                present = frozenset(c for c in columns if c)
                continue
            if len(cells) > len(columns):
                errors.append(f"{path}:{line}: {len(cells)} cells but {len(columns)} columns; "
                              "remove the extra cells or quote values that contain commas")
                continue
            raw = {columns[i]: cells[i] for i in range(len(cells))}
            try:
                rows.append((line, _normalize_row(raw)))
            except ValueError as e:
                errors.append(f"{path}:{line}: {e}")
    except csv.Error as e:
        errors.append(f"{path}:{reader.line_num}: malformed CSV ({e}); fix the quoting")
    if columns is None:
        errors.append(f"{path}: no header row; start the file with e.g. device_id,user,device_type,model,managed,compliant")
    return rows, present, errors


def _parse_yaml(path: Path, text: str) -> Parsed:
    try:
        root = compose_yaml_text(text, check=False)
    except YamlError as e:
        where = f"{path}:{e.line}" if e.line else str(path)
        problem = e.problem if e.key is not None else f"not valid YAML ({e.problem})"
        return [], frozenset(), [f"{where}: {problem}; {yaml_fix(e)}"]
    dup: list[str] = []
    try:
        check_duplicate_keys(root)  # the one strict reading: a repeated key is an error
    except YamlError as e:
        dup.append(f"{path}:{e.line}: {e.problem}; {yaml_fix(e)}")
    loader = StrictLoader("")
    try:
        if root is None:
            return [], frozenset(), []
        if isinstance(root, yaml.MappingNode):
            keys = {k.value: v for k, v in root.value if isinstance(k, yaml.ScalarNode)}
            if set(keys) != {"devices"}:
                return [], frozenset(), [f"{path}:{root.start_mark.line + 1}: expected a list of devices or "
                                         "{devices: [...]}; put the rows under a 'devices:' key"]
            root = keys["devices"]
        if not isinstance(root, yaml.SequenceNode):
            return [], frozenset(), [f"{path}:{root.start_mark.line + 1}: expected a list of devices; "
                                     "write one '- {device_id: ..., user: ...}' per device"]
        rows: list[tuple[int, dict[str, Any]]] = []
        errors: list[str] = []
        present: set[str] = set()
        for item in root.value:
            line = item.start_mark.line + 1
            if not isinstance(item, yaml.MappingNode):
                errors.append(f"{path}:{line}: a device must be a mapping like "
                              "{device_id: ApplF17ABCDEF01, user: alice}; fix this entry")
                continue
            raw: dict[str, Any] = {}
            bad = None
            for knode, vnode in item.value:
                kline = knode.start_mark.line + 1
                name = _field_name(str(knode.value)) if isinstance(knode, yaml.ScalarNode) else None
                if name is None:
                    bad = _unknown(f"{path}:{kline}", str(knode.value), "key")
                    break
                if name in raw:
                    bad = f"{path}:{kline}: key '{knode.value}' repeats {name}; write each key once"
                    break
                try:
                    raw[name] = loader.construct_object(vnode, deep=True)
                except yaml.YAMLError as e:
                    bad = f"{path}:{kline}: {getattr(e, 'problem', None) or e}; fix the value"
                    break
            if bad is None:
                try:
                    rows.append((line, _normalize_row(raw)))
                    present.update(raw)
                    continue
                except ValueError as e:
                    bad = f"{path}:{line}: {e}"
            errors.append(bad)
        reported = {e.split(": ", 1)[0] for e in errors}
        errors += [d for d in dup if d.split(": ", 1)[0] not in reported]  # a row's own check said it already
        return rows, frozenset(present), errors
    finally:
        loader.dispose()
