"""The device inventory on PostgreSQL, so two or more connectors serve one inventory.

``inventory: postgresql://user:pw@host:5432/db`` in the connector YAML (or ``--db postgresql://...``
for ``easgate devices``) selects this store instead of the SQLite file; the interface, the
table's columns and the import rules are those of :class:`easgate.connector.store.Inventory`.

Why PostgreSQL and psycopg 3: PostgreSQL gives every connector the same committed view (each
lookup is one primary-key SELECT in autocommit mode, so a block committed by ``easgate devices
block`` on any machine is seen by the very next request of every connector), and LISTEN/NOTIFY
tells every connector about a change the moment it commits, with no broker of its own. psycopg 3
is the maintained PostgreSQL driver (libpq underneath: TLS, ``tcp_user_timeout``, service files),
thread-safe connections and a plain ``notifies()`` generator for LISTEN.

Table ``devices`` (created if missing): the SQLite columns, ``blocked``/``managed``/``compliant``
as booleans, the DeviceId unique case-insensitively (a unique index on ``lower(device_id)``).
A trigger sends ``NOTIFY easgate_devices, '<DeviceId>'`` for every insert, delete and every
update that changes more than ``last_seen``; :meth:`PgInventory.watch` delivers them.

Only importable with the ``cluster`` extra (``pip install 'easgate[cluster]'``); without it the
SQLite store works as before and selecting PostgreSQL is a one-line error naming the extra.
"""

from __future__ import annotations

import logging
import threading
import urllib.parse
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

from ..authz.policy import user_matches
from .store import (
    COLUMNS,
    DEFAULTS,
    FIELDS,
    Device,
    ImportFileError,
    ImportReport,
    InventoryError,
    check_device_id,
    check_text,
    check_user,
    parse_file,
    utcnow,
)

# The driver is imported by require_psycopg(), when a postgresql:// inventory is opened: every easgate
# process imports this module (the CLI does), and psycopg's ~60 ms would be paid by each gateway,
# check and replay that never talks to PostgreSQL. It is optional: the base install has no psycopg.
psycopg: Any = None

__all__ = ["CHANNEL", "PgInventory", "redact"]

logger = logging.getLogger("easgate.connector")

CHANNEL = "easgate_devices"
EXTRA_HINT = "pip install 'easgate[cluster]'"
CONNECT_TIMEOUT_S = 5
STATEMENT_TIMEOUT_MS = 5000  # a lookup that takes this long is an unreadable inventory (503)
TCP_USER_TIMEOUT_MS = 5000  # a dead server (no RST) is noticed, not waited for
WATCH_RETRY_S = 1.0

#: Quoted where PostgreSQL needs it ("user" is a reserved word).
Q = {c: f'"{c}"' if c == "user" else c for c in COLUMNS}
SELECT = f"SELECT {', '.join(Q[c] for c in COLUMNS)} FROM devices"
SCHEMA = f"""
CREATE TABLE IF NOT EXISTS devices (
    device_id   text    NOT NULL,
    "user"      text    NOT NULL,
    device_type text    NOT NULL DEFAULT '',
    model       text    NOT NULL DEFAULT '',
    managed     boolean NOT NULL DEFAULT true,
    compliant   boolean NOT NULL DEFAULT true,
    blocked     boolean NOT NULL DEFAULT false,
    last_seen   text,
    updated     text    NOT NULL
);
CREATE UNIQUE INDEX IF NOT EXISTS devices_key ON devices (lower(device_id));
CREATE OR REPLACE FUNCTION easgate_devices_notify() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF TG_OP = 'DELETE' THEN
        PERFORM pg_notify('{CHANNEL}', OLD.device_id);
        RETURN OLD;
    END IF;
    IF TG_OP = 'UPDATE' AND (OLD.device_id, OLD."user", OLD.managed, OLD.compliant, OLD.blocked)
            IS NOT DISTINCT FROM (NEW.device_id, NEW."user", NEW.managed, NEW.compliant, NEW.blocked) THEN
        RETURN NEW;  -- last_seen, updated, type, model: nothing a decision depends on
    END IF;
    PERFORM pg_notify('{CHANNEL}', NEW.device_id);
    RETURN NEW;
END $$;
DROP TRIGGER IF EXISTS devices_notify ON devices;
CREATE TRIGGER devices_notify AFTER INSERT OR UPDATE OR DELETE ON devices
    FOR EACH ROW EXECUTE FUNCTION easgate_devices_notify();
"""
LOCK_ID = 0x6561_7367  # 'easg': one schema setup at a time when several connectors start together


def redact(url: str) -> str:
    """The URL without its password, for messages and logs."""
    p = urllib.parse.urlsplit(url)
    if p.password is None:
        return url
    netloc = f"{p.username}:***@{p.hostname}" + (f":{p.port}" if p.port else "")
    return urllib.parse.urlunsplit(p._replace(netloc=netloc))


def require_psycopg() -> None:
    global psycopg
    if psycopg is None:
        try:
            import psycopg as driver
        except ImportError:
            raise InventoryError(f"a postgresql:// inventory needs the PostgreSQL driver; {EXTRA_HINT}") from None
        psycopg = driver


class PgInventory:
    """The device table on PostgreSQL; the same methods as the SQLite ``Inventory``.

    Thread-safe (one lock around the connection). A broken connection (server restarted) is
    replaced on the next call; until then calls raise :class:`InventoryError` (the connector
    answers 503 and the gateway's fail mode decides).
    """

    def __init__(self, url: str, *, create: bool = True) -> None:
        require_psycopg()
        self.url = url
        self.path = redact(url)  # what messages show where the SQLite store shows its file
        self.create = create
        self.lock = threading.Lock()
        self._seen: dict[str, str] = {}
        self._seen_lock = threading.Lock()
        self._watchers: list[threading.Thread] = []
        self._stop = threading.Event()
        with self.lock:
            self.conn = self._connect()
            self._ensure_schema(self.conn)

    # -- connections ---------------------------------------------------------------------------

    def _connect(self) -> Any:
        try:
            return psycopg.connect(self.url, autocommit=True, connect_timeout=CONNECT_TIMEOUT_S,
                                   tcp_user_timeout=TCP_USER_TIMEOUT_MS,
                                   options=f"-c statement_timeout={STATEMENT_TIMEOUT_MS}")
        except psycopg.Error as e:
            raise InventoryError(f"{self.path}: cannot connect to the PostgreSQL inventory: "
                                 f"{_first_line(e)}; check the URL, the server and pg_hba.conf")

    def _ensure_schema(self, conn: Any) -> None:
        try:
            exists = conn.execute("SELECT to_regclass('devices') IS NOT NULL").fetchone()[0]
            if not exists and not self.create:
                raise InventoryError(f"{self.path}: no devices table in this database; create it with "
                                     f"`easgate devices --db URL import FILE` or `... add ID --user U`")
            if exists:
                cols = [r[0] for r in conn.execute(
                    "SELECT column_name FROM information_schema.columns WHERE table_name = 'devices' "
                    "AND table_schema = current_schema() ORDER BY ordinal_position").fetchall()]
                if tuple(cols) != COLUMNS:
                    raise InventoryError(f"{self.path}: table devices has columns {cols}, expected "
                                         f"{list(COLUMNS)}; this is not an easgate inventory (use another database)")
                has_trigger = conn.execute("SELECT 1 FROM pg_trigger WHERE tgname = 'devices_notify' "
                                           "AND tgrelid = 'devices'::regclass").fetchone()
                if has_trigger:
                    return
            with conn.transaction():
                conn.execute("SELECT pg_advisory_xact_lock(%s)", (LOCK_ID,))
                conn.execute(SCHEMA)
        except psycopg.Error as e:
            raise InventoryError(f"{self.path}: cannot set up the devices table: {_first_line(e)}; "
                                 "the database user needs CREATE on the schema")

    def _run(self, fn: Callable[[Any], Any]) -> Any:
        """``fn(conn)`` under the lock; one reconnect if the connection was lost."""
        with self.lock:
            for attempt in (0, 1):
                if self.conn.closed or self.conn.broken:
                    self.conn = self._connect()
                try:
                    return fn(self.conn)
                except psycopg.OperationalError as e:
                    if attempt == 0 and (self.conn.closed or self.conn.broken):
                        continue  # the server went away between calls: try a fresh connection once
                    raise InventoryError(f"{self.path}: {_first_line(e)}")
                except psycopg.Error as e:
                    raise InventoryError(f"{self.path}: {_first_line(e)}")
        raise AssertionError("unreachable")

    def close(self) -> None:
        self._stop.set()
        with self.lock:
            self.conn.close()
        for t in self._watchers:
            t.join(5)

    # -- reads -------------------------------------------------------------------------------

    def get(self, device_id: str) -> Device | None:
        row = self._run(lambda c: c.execute(f"{SELECT} WHERE lower(device_id) = lower(%s)",
                                            (device_id,)).fetchone())
        return Device.from_row(row) if row else None

    def count(self) -> int:
        return self._run(lambda c: c.execute("SELECT count(*) FROM devices").fetchone()[0])

    def all(self, user: str | None = None) -> Iterator[Device]:
        rows = self._run(lambda c: c.execute(f"{SELECT} ORDER BY lower(device_id)").fetchall())
        for r in rows:
            d = Device.from_row(r)
            if user is None or user_matches(d.user, user) or user_matches(user, d.user):
                yield d

    # -- writes ------------------------------------------------------------------------------

    def add(self, device_id: str, user: str, device_type: str = "", model: str = "", *, managed: bool = True,
            compliant: bool = True, blocked: bool = False) -> bool:
        """Insert or replace one device; True if it was new. Raises ValueError for bad values."""
        device_id = check_device_id(device_id)
        user = check_user(user)
        device_type, model = check_text(device_type, "device type"), check_text(model, "model")

        def tx(c: Any) -> bool:
            with c.transaction():
                existed = c.execute("SELECT 1 FROM devices WHERE lower(device_id) = lower(%s)",
                                    (device_id,)).fetchone() is not None
                c.execute('INSERT INTO devices(device_id, "user", device_type, model, managed, compliant, blocked, '
                          "updated) VALUES (%s,%s,%s,%s,%s,%s,%s,%s) ON CONFLICT (lower(device_id)) DO UPDATE SET "
                          'device_id=excluded.device_id, "user"=excluded."user", device_type=excluded.device_type, '
                          "model=excluded.model, managed=excluded.managed, compliant=excluded.compliant, "
                          "blocked=excluded.blocked, updated=excluded.updated",
                          (device_id, user, device_type, model, managed, compliant, blocked, utcnow()))
            return not existed
        return self._run(tx)

    def set_blocked(self, device_id: str, blocked: bool) -> bool:
        """False if there is no such device."""
        return self._run(lambda c: c.execute(
            "UPDATE devices SET blocked = %s, updated = %s WHERE lower(device_id) = lower(%s)",
            (blocked, utcnow(), device_id)).rowcount) > 0

    def remove(self, device_id: str) -> bool:
        return self._run(lambda c: c.execute("DELETE FROM devices WHERE lower(device_id) = lower(%s)",
                                             (device_id,)).rowcount) > 0

    def touch(self, device_id: str) -> None:
        """Remember that the device was seen now; written by :meth:`flush_seen`."""
        with self._seen_lock:
            self._seen[device_id] = utcnow()

    def flush_seen(self, timeout_s: float = 0.2) -> int:
        """Write the remembered last-seen times; a failed batch is kept for the next flush."""
        with self._seen_lock:
            batch, self._seen = self._seen, {}
        if not batch:
            return 0

        def tx(c: Any) -> int:
            with c.transaction():
                c.execute(f"SET LOCAL lock_timeout = {max(1, int(timeout_s * 1000))}")
                with c.cursor() as cur:
                    cur.executemany("UPDATE devices SET last_seen = %s WHERE lower(device_id) = lower(%s)",
                                    [(t, d) for d, t in batch.items()])
                    return cur.rowcount
        try:
            return self._run(tx)
        except InventoryError:
            with self._seen_lock:
                for d, t in batch.items():
                    self._seen.setdefault(d, t)
            return 0

    def import_rows(self, rows: Iterable[tuple[int, dict[str, Any]]], present: frozenset[str], *,
                    replace: bool = False) -> ImportReport:
        """Upsert validated rows in one transaction (every connector sees all of it or none)."""
        now = utcnow()
        update_cols = [c for c in FIELDS if c in present and c != "device_id"]
        set_clause = ", ".join([f"{Q[c]}=excluded.{Q[c]}" for c in update_cols]
                               + ["device_id=excluded.device_id", "updated=excluded.updated"])
        sql = (f"INSERT INTO devices({', '.join(Q[c] for c in COLUMNS)}) VALUES({', '.join(['%s'] * len(COLUMNS))}) "
               f"ON CONFLICT (lower(device_id)) DO UPDATE SET {set_clause}")
        params = [tuple(_pg_value(k, now if k == "updated" else r.get(k, DEFAULTS.get(k))) for k in COLUMNS)
                  for _line, r in rows]
        report = ImportReport()

        def tx(c: Any) -> tuple[int, int]:
            with c.transaction():
                before = c.execute("SELECT count(*) FROM devices").fetchone()[0]
                with c.cursor() as cur:
                    cur.executemany(sql, params)
                if replace:
                    report.removed = c.execute(
                        "DELETE FROM devices WHERE NOT (lower(device_id) = ANY(%s))",
                        ([p[0].lower() for p in params],)).rowcount
                after = c.execute("SELECT count(*) FROM devices").fetchone()[0]
            return before, after
        before, after = self._run(tx)
        report.inserted = after + report.removed - before
        report.updated = len(params) - report.inserted
        return report

    def import_file(self, path: str | Path, *, skip_bad: bool = False, replace: bool = False) -> ImportReport:
        """Parse and import one CSV/YAML file, with the SQLite store's rules."""
        rows, present, errors = parse_file(Path(path))
        if errors and not skip_bad:
            raise ImportFileError(errors)
        if replace and errors:
            raise ImportFileError(errors + [f"{path}: --replace with bad rows would remove those devices; "
                                            "fix the rows or import without --replace"])
        report = self.import_rows(rows, present, replace=replace)
        report.skipped = len(errors)
        report.errors = tuple(errors)
        return report

    # -- changes -------------------------------------------------------------------------------

    def watch(self, on_change: Callable[[str], None], *, retry_s: float = WATCH_RETRY_S) -> None:
        """Call ``on_change(device_id)`` (in a thread of its own) for every committed change that
        a decision depends on, from any connector or ``easgate devices`` anywhere.

        LISTEN on a connection of its own; when it breaks, it reconnects every ``retry_s`` and
        then reports ``"*"`` (anything may have changed while it was not listening). Returns once
        the first LISTEN is in place (or its first attempt failed), so no change after it is missed.
        """
        first = threading.Event()
        t = threading.Thread(target=self._listen, args=(on_change, retry_s, first), name="easgate-pg-listen",
                             daemon=True)
        self._watchers.append(t)
        t.start()
        first.wait(CONNECT_TIMEOUT_S + 1)

    def _listen(self, on_change: Callable[[str], None], retry_s: float, first: threading.Event) -> None:
        missed = False
        while not self._stop.is_set():
            try:
                with psycopg.connect(self.url, autocommit=True, connect_timeout=CONNECT_TIMEOUT_S,
                                     tcp_user_timeout=TCP_USER_TIMEOUT_MS) as conn:
                    conn.execute(f"LISTEN {CHANNEL}")
                    first.set()
                    if missed:
                        logger.warning(f"easgate connector: listening to {self.path} again")
                        _call(on_change, "*")
                        missed = False
                    while not self._stop.is_set():
                        for n in conn.notifies(timeout=0.5):
                            _call(on_change, n.payload)
            except psycopg.Error as e:
                if not missed:
                    logger.warning(f"easgate connector: lost LISTEN on {self.path} ({_first_line(e)}); "
                                   f"retrying every {retry_s:g}s")
                missed = True
                first.set()
                self._stop.wait(retry_s)


def _call(fn: Callable[[str], None], arg: str) -> None:
    try:
        fn(arg)
    except Exception:
        logger.exception("easgate connector: inventory change handler failed")


def _pg_value(column: str, value: Any) -> Any:
    return bool(value) if column in ("managed", "compliant", "blocked") else value


def _first_line(e: BaseException) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0]

