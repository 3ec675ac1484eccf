"""Per-device rate limits shared by every worker process of one machine.

`easgate run --workers N` starts N processes on one port (SO_REUSEPORT): a phone's reconnects land
on any of them, so a budget counted per process would be N budgets. Here each rate limit is one
table in a file the supervisor's private run directory holds (``EASGATE_RUN_DIR``, on /dev/shm
when there is room), mapped into every worker (``mmap``, MAP_SHARED): a hit is a few dozen
loads and stores in memory under an exclusive ``flock`` of the table, no system call but the lock
(about 5 µs per limit and request in Python; ``bench/bench_ratelimit.py``).

Why this and not the alternatives:

- asking the supervisor over its Unix socket costs a round trip and two context switches per
  request, and the supervisor's loop is a single Python thread every worker would queue behind;
- an SQLite file in the run directory is a transaction per request, and a worker waiting for its
  lock sleeps in SQLite's busy handler, on the event loop;
- ``flock`` is released by the kernel when a worker dies holding it (a crash never wedges the
  others), and the files outlive the workers, so a budget carries over a graceful reload (the old
  and the new workers share it) and a worker restart.

Each table is a fixed array of slots (``SLOTS`` per limit, open addressing over ``PROBE``
neighbours, keyed by 64 bits of BLAKE2b of (user, DeviceId)); a slot keeps the device's request
counts in ``STEPS`` steps of ``per_s / (STEPS - 1)`` seconds. The window counted is the current
step and the ``STEPS - 1`` before it, which covers at least ``per_s``: never more than
``requests`` in any ``per_s`` seconds, and Retry-After is at most one step longer than an exact
sliding window's. A slot whose newest step has left the window is free; when a neighbourhood has
no free slot, the device seen least recently there is forgotten (as the per-process limiter
forgets its oldest keys).

The file name is a digest of the limit's name and window and of this layout, so a reload that
changes ``requests`` keeps the counts, one that changes the window starts a new table, and a
table is never re-laid out under a worker that has it mapped. Any failure (no room, a lock held
past ``LOCK_WAIT_S``) raises :class:`TableUnavailable`: the caller counts in its own process.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import math
import mmap
import os
import re
import shutil
import struct
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from .commands import RateLimit

__all__ = ["MachineRateLimits", "RUN_DIR_ENV", "TableUnavailable", "make_run_dir", "run_dir_for"]

RUN_DIR_ENV = "EASGATE_RUN_DIR"
RUN_DIR_NAME = re.compile(r"easgate-run-(\d+)-\w+")
MAGIC = b"EASGRT01"
HEADER = 64  # bytes: magic, per_s (f64), steps (u32), slots (u32), padding
STEPS = 64  # counters per slot: the current step and 63 before it
SLOTS = 1 << 16  # devices per limit and machine (17 MiB per limit)
PROBE = 8
SLOT_WORDS = 2 + STEPS // 2  # key (u64), newest step (i64), STEPS u32 counters
SLOT_BYTES = SLOT_WORDS * 8
LOCK_WAIT_S = 0.02  # a holder keeps the lock for microseconds; past this, count locally


class TableUnavailable(Exception):
    """The shared table cannot be used for this request (the caller falls back to its own count)."""


def run_dir_for(size_hint: int = 64 << 20) -> str:
    """Where the supervisor puts its run directory: /dev/shm (memory) when it has room, else TMPDIR."""
    shm = "/dev/shm"
    try:
        st = os.statvfs(shm)
        if os.access(shm, os.W_OK) and st.f_bavail * st.f_frsize > 4 * size_hint:
            return shm
    except OSError:
        pass
    return tempfile.gettempdir()


def make_run_dir(base: str | None = None) -> str:
    """The supervisor's private run directory (0700), named after its pid. Directories that
    supervisors which are gone left behind (killed with SIGKILL: no clean-up ran) are removed first:
    on /dev/shm they would hold their tables in memory until the next boot."""
    base = base or run_dir_for()
    uid = os.getuid()
    try:
        entries = list(os.scandir(base))
    except OSError:
        entries = []
    for e in entries:
        m = RUN_DIR_NAME.fullmatch(e.name)
        if not m:
            continue
        try:
            if e.stat(follow_symlinks=False).st_uid != uid or not e.is_dir(follow_symlinks=False):
                continue
            os.kill(int(m[1]), 0)
        except ProcessLookupError:
            shutil.rmtree(e.path, ignore_errors=True)
        except OSError:
            continue  # alive but not ours to signal, or gone meanwhile
    return tempfile.mkdtemp(prefix=f"easgate-run-{os.getpid()}-", dir=base)


def key_hash(key: tuple) -> int:
    data = "\x00".join("" if k is None else str(k) for k in key).encode("utf-8", "surrogatepass")
    return int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), "little") or 1


class Table:
    """One rate limit's slots in a shared file."""

    def __init__(self, directory: Path, limit: RateLimit, slots: int = SLOTS) -> None:
        self.limit = limit
        self.slots = slots
        self.step = limit.per_s / (STEPS - 1)
        size = HEADER + slots * SLOT_BYTES
        ident = f"{limit.name}|{limit.per_s!r}|{STEPS}|{slots}|{MAGIC.decode()}".encode()
        self.path = Path(directory) / f"rate-{hashlib.sha256(ident).hexdigest()[:20]}.tbl"
        self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX)
            try:
                have = os.fstat(self.fd).st_size
                if have == 0:
                    os.posix_fallocate(self.fd, 0, size)  # ENOSPC now, never SIGBUS on a later write
                    os.pwrite(self.fd, MAGIC + struct.pack("<dII", limit.per_s, STEPS, slots), 0)
                elif have != size:
                    raise OSError(errno.EINVAL, f"{self.path} is {have} bytes, not {size}")
                head = os.pread(self.fd, 24, 0)
                if head != MAGIC + struct.pack("<dII", limit.per_s, STEPS, slots):
                    raise OSError(errno.EINVAL, f"{self.path} is not a rate table of this layout")
            finally:
                fcntl.flock(self.fd, fcntl.LOCK_UN)
            self.map = mmap.mmap(self.fd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        except BaseException:
            os.close(self.fd)
            raise
        self.words = memoryview(self.map).cast("Q")  # keys
        self.signed = memoryview(self.map).cast("q")  # newest steps
        self.counts = memoryview(self.map).cast("I")

    def close(self) -> None:
        for v in (self.words, self.signed, self.counts):
            v.release()
        self.map.close()
        os.close(self.fd)

    def _lock(self) -> None:
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return
        except BlockingIOError:
            pass
        deadline = time.monotonic() + LOCK_WAIT_S
        while True:
            time.sleep(0.0001)
            try:
                fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise TableUnavailable(f"rate table {self.path.name} locked for over {LOCK_WAIT_S * 1000:g} ms")

    def hit(self, h: int, now: float) -> int | None:
        """Count one request of the device hashed ``h``; None, or the seconds until it may retry."""
        cur = int(now // self.step)
        words, signed, counts = self.words, self.signed, self.counts
        base = h % self.slots
        self._lock()
        try:
            slot = free = oldest = -1
            oldest_step = 0
            for i in range(PROBE):
                s = (base + i) % self.slots
                w = HEADER // 8 + s * SLOT_WORDS
                k = words[w]
                if k == h:
                    slot = s
                    break
                if free < 0 and (k == 0 or signed[w + 1] <= cur - STEPS):
                    free = s
                elif oldest < 0 or signed[w + 1] < oldest_step:
                    oldest, oldest_step = s, signed[w + 1]
            if slot < 0:  # a new device here: a free slot, or forget the least recently seen neighbour
                slot = free if free >= 0 else oldest
                w = HEADER // 8 + slot * SLOT_WORDS
                words[w] = h
                signed[w + 1] = cur
                c0 = (w + 2) * 2
                counts[c0:c0 + STEPS] = ZEROS
            w = HEADER // 8 + slot * SLOT_WORDS
            c0 = (w + 2) * 2
            newest = signed[w + 1]
            if cur > newest:  # the steps that passed since are empty
                if cur - newest >= STEPS:
                    counts[c0:c0 + STEPS] = ZEROS
                else:
                    for j in range(newest + 1, cur + 1):
                        counts[c0 + j % STEPS] = 0
                signed[w + 1] = cur
            else:
                cur = newest  # never step backwards (one clock for all processes: CLOCK_MONOTONIC)
            total = sum(counts[c0:c0 + STEPS])
            lim = self.limit
            if total < lim.requests:
                counts[c0 + cur % STEPS] += 1
                return None
            # full: the request may retry once enough of the oldest steps have left the window
            for j in range(cur - STEPS + 1, cur + 1):
                total -= counts[c0 + j % STEPS]
                if total < lim.requests:
                    return max(1, math.ceil((j + STEPS) * self.step - now))
            return max(1, math.ceil(lim.per_s))  # pragma: no cover - requests >= 1 always frees
        finally:
            fcntl.flock(self.fd, fcntl.LOCK_UN)


ZEROS = memoryview(bytes(4 * STEPS)).cast("I")


class MachineRateLimits:
    """The limits of `authorization.rate_limits`, counted in tables every worker of this machine shares."""

    def __init__(self, limits: tuple[RateLimit, ...], directory: str | os.PathLike[str],
                 clock: Callable[[], float] = time.monotonic, slots: int = SLOTS) -> None:
        self.limits = limits
        self.clock = clock
        self.directory = Path(directory)
        self.tables: dict[str, Table] = {}
        try:
            for lim in limits:
                self.tables[lim.name] = Table(self.directory, lim, slots)
        except OSError as e:
            self.close()
            raise TableUnavailable(f"cannot set up the shared rate table in {self.directory}: {e.strerror or e}")

    def close(self) -> None:
        for t in self.tables.values():
            t.close()
        self.tables.clear()

    def hit(self, key: tuple, command: str | None) -> tuple[RateLimit, int] | None:
        """As :meth:`RateLimiter.hit`; raises :class:`TableUnavailable` when a table cannot be used."""
        now = self.clock()
        h = key_hash(key)
        for lim in self.limits:
            if lim.commands and command not in lim.commands:
                continue
            wait = self.tables[lim.name].hit(h, now)
            if wait is not None:
                return lim, lim.retry_after_s or wait
        return None
