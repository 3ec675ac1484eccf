"""Loading a policy without stalling the gateway: parse in another process, hand over an SQLite file.

Parsing a 1,000,000-device inventory takes seconds of pure Python, and a thread does not help: it
holds the GIL, so the event loop (every route, not just ActiveSync) waits with it. So a reload
runs `load_policy` in a child process (``python -m easgate.authz.policyload``), which writes a
large inventory into a read-only SQLite file and sends back the rest of the policy (lists, mode:
small) pickled. The gateway unpickles that and opens the file: constant work on the event loop,
whatever the inventory's size. A lookup is then one primary-key SELECT (a few microseconds).

Small inventories (up to `COMPACT_ABOVE` devices) stay a dict in memory: they cost nothing to
send back and a dict lookup is faster still.
"""

from __future__ import annotations

import asyncio
import os
import pickle
import sqlite3
import sys
import tempfile
import threading
from collections.abc import Iterator, Mapping
from pathlib import Path

from .policy import InventoryEntry, Policy, PolicyError, load_policy

COMPACT_ABOVE = 20_000  # devices; above this an inventory goes to SQLite
ADDONS_DIR = str(Path(__file__).resolve().parents[2])  # the directory that holds the easgate package


class SqliteInventory(Mapping[str, InventoryEntry]):
    """A read-only inventory (lower-cased DeviceId -> InventoryEntry) in an SQLite file.

    Pickles as its path; the connection is opened on first use, so handing one over costs
    nothing. The file is never written again once built (``immutable=1``: no locking)."""

    def __init__(self, path: Path, count: int) -> None:
        self.path, self.count = Path(path), count
        self._conn: sqlite3.Connection | None = None
        self._lock = threading.Lock()

    def __getstate__(self) -> dict:
        return {"path": str(self.path), "count": self.count}

    def __setstate__(self, state: dict) -> None:
        self.path, self.count = Path(state["path"]), state["count"]
        self._conn = None
        self._lock = threading.Lock()

    def _db(self) -> sqlite3.Connection:
        if self._conn is None:
            with self._lock:
                if self._conn is None:
                    self._conn = sqlite3.connect(f"file:{self.path}?mode=ro&immutable=1", uri=True,
                                                 check_same_thread=False, isolation_level=None)
        return self._conn

    def get(self, key: str, default=None):  # type: ignore[override]
        row = self._db().execute("SELECT owner, has_domain, compliant FROM inventory WHERE device_id = ?",
                                 (key,)).fetchone()
        return default if row is None else InventoryEntry(row[0], bool(row[1]), bool(row[2]))

    def __getitem__(self, key: str) -> InventoryEntry:
        e = self.get(key)
        if e is None:
            raise KeyError(key)
        return e

    def __contains__(self, key: object) -> bool:
        return isinstance(key, str) and self.get(key) is not None

    def __len__(self) -> int:
        return self.count

    def __iter__(self) -> Iterator[str]:
        for (k,) in self._db().execute("SELECT device_id FROM inventory"):
            yield k

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None


def write_inventory_db(inventory: Mapping[str, InventoryEntry], path: Path) -> SqliteInventory:
    """Write `inventory` to a new SQLite file at `path` (built under a temporary name, then renamed)."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.unlink(missing_ok=True)
    db = sqlite3.connect(tmp, isolation_level=None)
    try:
        db.execute("PRAGMA journal_mode = OFF")
        db.execute("PRAGMA synchronous = OFF")
        db.execute("CREATE TABLE inventory (device_id TEXT PRIMARY KEY, owner TEXT, has_domain INTEGER, "
                   "compliant INTEGER) WITHOUT ROWID")
        db.execute("BEGIN")
        db.executemany("INSERT INTO inventory VALUES (?, ?, ?, ?)",
                       ((k, e.owner, int(e.owner_has_domain), int(e.compliant)) for k, e in inventory.items()))
        db.execute("COMMIT")
    finally:
        db.close()
    os.replace(tmp, path)
    return SqliteInventory(path, len(inventory))


def compact(policy: Policy, workdir: Path, threshold: int = COMPACT_ABOVE) -> Policy:
    """`policy` with an inventory of more than `threshold` devices moved to an SQLite file in workdir."""
    if len(policy.inventory) <= threshold or isinstance(policy.inventory, SqliteInventory):
        return policy
    fd, name = tempfile.mkstemp(prefix="inventory-", suffix=".sqlite", dir=workdir)
    os.close(fd)
    policy.inventory = write_inventory_db(policy.inventory, Path(name))  # type: ignore[assignment]
    return policy


def release(policy: Policy | None) -> None:
    """Drop the SQLite file of a policy that is no longer in force (open readers keep their view)."""
    inv = getattr(policy, "inventory", None)
    if isinstance(inv, SqliteInventory):
        inv.path.unlink(missing_ok=True)


async def load_policy_elsewhere(path: Path, workdir: Path, threshold: int = COMPACT_ABOVE) -> Policy:
    """`load_policy(path)` done by a child process; raises PolicyError as load_policy does."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, (ADDONS_DIR, os.environ.get("PYTHONPATH")))))
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "easgate.authz.policyload", str(path), str(workdir), str(threshold),
        stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, env=env)
    out, err = await proc.communicate()
    if proc.returncode != 0 or not out:
        tail = err.decode(errors="replace").strip().splitlines()[-1:] or [f"exit status {proc.returncode}"]
        raise PolicyError(f"{path}: the policy loader failed: {tail[0]}", file=path)
    result = pickle.loads(out)
    if result[0] == "error":
        raise PolicyError(result[1], file=result[2], key=result[3])
    return result[1]


def main(argv: list[str]) -> int:
    path, workdir, threshold = Path(argv[0]), Path(argv[1]), int(argv[2])
    try:
        os.nice(19)  # seconds of parsing: the gateway, its workers and its upstreams come first
    except OSError:  # pragma: no cover
        pass
    result: tuple
    try:
        result = ("ok", compact(load_policy(path), workdir, threshold))
    except PolicyError as e:
        result = ("error", str(e), e.file, e.key)
    sys.stdout.buffer.write(pickle.dumps(result, protocol=pickle.HIGHEST_PROTOCOL))
    sys.stdout.buffer.flush()
    return 0


if __name__ == "__main__":
    # Run through the package's module, so the pickle names easgate.authz.policyload.SqliteInventory
    # (what the gateway can load), not __main__.SqliteInventory.
    from easgate.authz import policyload

    sys.exit(policyload.main(sys.argv[1:]))
