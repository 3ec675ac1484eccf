"""The audit trail: one JSON line per authorization decision, and never one silently lost.

* Every string in a record is made safe before it is encoded: a client chooses its User-Agent,
  DeviceId, user name and path, and undecodable bytes (which arrive as lone surrogates), control
  characters, line separators or a megabyte of text must not stop the line being written, split
  it, or flood the file. A changed value is rewritten as escaped text and its field is named in
  the record's ``escaped`` list (see `safe_text`).
* Lines are written by one writer thread from a bounded queue: a sink that blocks (a pipe whose
  reader stalls, a slow disk) never blocks the event loop.
* Whether a line can be written is known before a request is let through: `can_accept` is false
  while the sink is failing (the writer keeps retrying the line it could not write, so nothing
  queued is lost) or the queue is full. The gateway denies ActiveSync requests it cannot audit
  (``audit.on_error: deny``, the default).
* Outages are logged once when they start and once when they end (with how many lines were lost),
  never per request. `reopen` (SIGHUP, ``easgate.audit.reopen``) opens the path again for logrotate.

Each line is one ``write()`` on an ``O_APPEND`` descriptor, so worker processes sharing the file
never interleave their lines.
"""

from __future__ import annotations

import asyncio
import errno
import json
import logging
import os
import queue
import re
import stat
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

from ..core.errors import ConfigError

logger = logging.getLogger(__name__)

ON_ERROR = ("deny", "allow")
MAX_VALUE_CHARS = 1024  # a User-Agent is ~100 characters; anything this long is clipped
QUEUE_LINES = 10_000
RETRY_S = 0.5

# Characters a value may not carry into a log line as they are: C0/C1 controls and DEL, Unicode line
# and paragraph separators, bidi overrides and isolates (they reorder what a reader sees), and lone
# surrogates (undecodable bytes, which mitmproxy hands over as U+DC80..U+DCFF).
_UNSAFE = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029\u202a-\u202e\u2066-\u2069\ud800-\udfff]")
_ESCAPE = re.compile("[\\\\\x00-\x1f\x7f-\x9f\u2028\u2029\u202a-\u202e\u2066-\u2069\ud800-\udfff]")


def _escape_char(m: re.Match) -> str:
    c = m.group()
    if c == "\\":
        return "\\\\"
    o = ord(c)
    if 0xDC80 <= o <= 0xDCFF:  # a byte that was not UTF-8 (surrogateescape)
        return f"\\x{o - 0xDC00:02x}"
    return f"\\x{o:02x}" if o < 0x80 else f"\\u{o:04x}"  # \xHH from 0x80 on is always a raw byte


def safe_text(value: str, limit: int = MAX_VALUE_CHARS) -> tuple[str, bool]:
    """(text fit for a log line, whether it was changed).

    An unchanged value is the value. A changed one is escaped text: ``\\\\`` is a backslash,
    ``\\xHH`` a control character below 0x80 or (from ``\\x80`` on) a byte that was not UTF-8,
    ``\\uHHHH`` a C1 control, separator or bidi control; a value longer than `limit` characters is
    cut there and ends with ``\\[clipped N chars]`` (N: how many were left out). A client cannot
    forge either form: in escaped text every backslash it sent is doubled.
    """
    if len(value) <= limit and not _UNSAFE.search(value):
        return value, False
    clipped = len(value) - limit
    text = _ESCAPE.sub(_escape_char, value[:limit] if clipped > 0 else value)
    if clipped > 0:
        text += f"\\[clipped {clipped} chars]"
    return text, True


def _safe(value: Any, path: str, escaped: list[str], limit: int) -> Any:
    if value is None or isinstance(value, (bool, int, float)):
        return value
    if isinstance(value, (bytes, bytearray)):
        value = bytes(value).decode("utf-8", "surrogateescape")
    if isinstance(value, str):
        text, changed = safe_text(value, limit)
        if changed:
            escaped.append(path)
        return text
    if isinstance(value, dict):
        return {str(k): _safe(v, f"{path}.{k}" if path else str(k), escaped, limit) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_safe(v, f"{path}[{i}]", escaped, limit) for i, v in enumerate(value)]
    return _safe(str(value), path, escaped, limit)


_ENCODER = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False)  # built once, not per line
_PLAIN = (bool, int, float, type(None))


def _already_safe(record: dict, limit: int) -> bool:
    """True if `_safe` would return `record` unchanged: a flat record of str keys and plain values,
    every text short and free of what `safe_text` escapes (the gateway's every line, as a rule)."""
    texts = []
    for k, v in record.items():
        if type(k) is not str:
            return False
        t = type(v)
        if t is str:
            if len(v) > limit:
                return False
            texts.append(v)
        elif t not in _PLAIN:
            return False
    # one search over all of them; the joining space is itself safe
    return _UNSAFE.search(" ".join(texts)) is None


def encode(record: dict, limit: int = MAX_VALUE_CHARS) -> str:
    """One JSON line (without the newline) for `record`, whatever its values hold. Never raises:
    it is the one thing between a decision and its audit line."""
    escaped: list[str] = []
    try:
        if _already_safe(record, limit):
            return _ENCODER.encode(record)
        clean = _safe(record, "", escaped, limit)
        if escaped:
            clean["escaped"] = escaped
        return _ENCODER.encode(clean)
    except Exception as e:  # pragma: no cover - _safe leaves only str/int/float/bool/None/dict/list
        return json.dumps({"time": record.get("time"), "audit_error": f"record not encodable: {type(e).__name__}",
                           "decision": str(record.get("decision")), "flow": str(record.get("flow"))})


_STOP = object()
_REOPEN = object()
BATCH_LINES = 256
BATCH_BYTES = 256 * 1024


def _resolve(futs: list, ok: bool) -> None:
    for fut in futs:
        if not fut.done():
            fut.set_result(ok)


def _time_out(batch: list) -> None:
    for _, fut in batch:
        if fut is not None and not fut.done():
            fut.set_result(None)  # None: not written within write_timeout_s (the line stays queued)


class AuditLog:
    """A JSON-lines file fed through a bounded queue by one writer thread.

    `path` None: no file, lines only go to the debug log. The file is opened (and created) at
    construction, so an unwritable path is a startup error; the thread starts with the first line.
    `commit` waits until its line is written (the gateway answers or forwards a request only then);
    `submit` only queues it (the connector's decision log).
    """

    def __init__(self, path: Path | None, *, on_error: str = "deny", queue_lines: int = QUEUE_LINES,
                 retry_s: float = RETRY_S, max_value_chars: int = MAX_VALUE_CHARS,
                 write_timeout_s: float = 1.0, name: str = "audit log", on_error_key: str = "audit.on_error") -> None:
        self.path = path
        self.on_error = on_error
        self.name, self.on_error_key = name, on_error_key  # how refusals and the outage log call it
        self.retry_s = retry_s
        self.max_value_chars = max_value_chars
        self.write_timeout_s = write_timeout_s
        self.stats: Counter = Counter()  # lines_written, lines_lost, write_errors, queue_full, reopens, outages
        # A SimpleQueue (C, no Condition) and two counters instead of a queue.Queue: its per-line
        # Condition.notify and the writer's per-batch Condition.wait were ~10% of the CPU of an
        # ActiveSync request. `_queued` (lines and markers put) and `_handled` (taken off and
        # finished) only grow; their difference is what is queued.
        self.queue_lines = queue_lines
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._queued = 0
        self._handled = 0
        self._pending: dict = {}  # event loop -> lines of its current iteration, not yet handed over
        self._timed: set = set()  # event loops whose current iteration's lines have their timer
        self._fd: int | None = None
        self._thread: threading.Thread | None = None
        self._writing = False  # the writer thread runs (set before it starts, cleared when it ends)
        self._lock = threading.Lock()
        self._closing = False
        self._reopen_wanted = False
        self._failing: str | None = None  # the writer's current error (it keeps retrying)
        self._stalled = False  # a write took longer than write_timeout_s and has not finished
        self._outage: str | None = None  # what made lines unwritable, from its start until it ends
        self._outage_kind: str | None = None  # "sink" (writes fail or hang) or "queue" (full)
        self._outage_start = 0.0
        self._outage_lost = 0
        self._outage_refused = 0
        if path is not None:
            try:
                path.parent.mkdir(parents=True, exist_ok=True)
                self._fd = self._open()
            except OSError as e:
                raise ConfigError(None, "audit_log", f"cannot write {path}: {e.strerror or e}",
                                  "choose a writable path or fix its permissions")

    @staticmethod
    def check(path: Path | None) -> None:
        """What opening would find out, without creating the file or its directory: `easgate
        check` must not write anything."""
        if path is None:
            return
        if path.exists():
            ok = not path.is_dir() and os.access(path, os.W_OK)  # a file, a FIFO, /dev/full...
        else:
            parent = next((p for p in path.parents if p.exists()), None)
            ok = parent is not None and parent.is_dir() and os.access(parent, os.W_OK | os.X_OK)
        if not ok:
            raise ConfigError(None, "audit_log", f"cannot write {path}",
                              "choose a writable path or fix its permissions")

    # -- the producer side (the event loop) ------------------------------------------------------

    def can_accept(self) -> bool:
        """Would a line submitted now be written? False while the sink fails or hangs, or the
        queue is full."""
        if self.path is None:
            return True
        return self._failing is None and not self._stalled and not self._full()

    def _full(self) -> bool:
        return self._queued - self._handled >= self.queue_lines

    def must_deny(self) -> str | None:
        """Why a request that would be allowed must be denied instead (``audit.on_error: deny`` and
        the line cannot be written), or None."""
        if self.on_error != "deny" or self.can_accept():
            return None
        why = self._failing or ("a write is hanging" if self._stalled else "queue full")
        return f"{self.name} cannot be written ({why}); denied by {self.on_error_key}=deny"

    def refused(self) -> None:
        """Count a request denied because it could not be audited (for the outage's summary)."""
        with self._lock:
            self._outage_refused += 1
        self.stats["requests_denied"] += 1

    def _line(self, record: dict) -> str:
        record.setdefault("time", time.strftime("%Y-%m-%dT%H:%M:%S%z"))
        line = encode(record, self.max_value_chars)
        logger.debug(line)
        return line

    def _hand_over(self, loop) -> None:
        self._timed.discard(loop)
        batch = self._pending.pop(loop, None)
        if batch:
            self._queue.put(batch)

    def _enqueue(self, item) -> None:
        with self._lock:
            self._queued += 1
        self._queue.put(item)

    def _put(self, line: str, fut=None) -> bool:
        self._ensure_thread()
        if self._full():
            self.stats["queue_full"] += 1
            self._lost(f"{self.queue_lines} lines queued, the sink is not keeping up")
            return False
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:  # not on an event loop: straight to the writer
            self._enqueue((line, fut))
        else:
            # On an event loop, the lines of one loop iteration go to the writer together, at its
            # end: one wake-up of the writer thread for all of them instead of one per line.
            with self._lock:
                self._queued += 1
            pending = self._pending.get(loop)
            if pending is None:
                pending = self._pending[loop] = []
                loop.call_soon(self._hand_over, loop)
            if fut is not None and loop not in self._timed:
                # one write_timeout_s timer for the iteration's lines (they go out together)
                # instead of one per line
                self._timed.add(loop)
                loop.call_later(self.write_timeout_s, _time_out, pending)
            pending.append((line, fut))
        if self._outage_kind == "queue" and self._failing is None and not self._stalled:
            self._end_outage()
        return True

    def submit(self, record: dict) -> bool:
        """Queue one record; False if it cannot be written (the line is lost, counted, and the
        outage logged once). Never raises, never blocks."""
        line = self._line(record)
        return True if self.path is None else self._put(line)

    write = submit  # the connector's decision log calls it so

    async def commit(self, record: dict) -> bool:
        """Queue one record and wait until it is written: True once it is, False if it cannot be
        (the sink fails, hangs past write_timeout_s, or the queue is full; the line stays queued if
        there is room, and is written when the sink recovers). Never raises."""
        line = self._line(record)
        if self.path is None:
            return True
        if not self.can_accept():  # in an outage: do not make the client wait for it
            self._put(line)
            return False
        fut = asyncio.get_running_loop().create_future()
        if not self._put(line, fut):
            return False
        # A timer per loop iteration's lines (in _put) instead of wait_for(shield(...)): a coroutine,
        # a second future and a timeout context per request, for the same outcome (the writer's
        # later answer is ignored).
        ok = await fut
        if ok is None:
            if not self._stalled:
                self._stalled = True
                self._begin_outage(f"{self.path}: a write took longer than {self.write_timeout_s:g}s")
            return False
        return ok

    def reopen(self) -> None:
        """Open the path again (logrotate moved the file away); done by the writer between lines."""
        if self.path is None:
            return
        self._ensure_thread()
        if self._full():  # the writer is behind: it reopens before its next write
            self._reopen_wanted = True
        else:
            self._enqueue(_REOPEN)

    def flush(self, timeout: float = 5.0) -> bool:
        """Wait until every queued line is written (tests, shutdown); False on timeout."""
        self._hand_over_here()
        deadline = time.monotonic() + timeout
        while self._queued > self._handled and time.monotonic() < deadline:
            time.sleep(0.005)
        return self._queued <= self._handled

    def _hand_over_here(self) -> None:
        """Hand over what this thread's loop (or a loop that no longer runs) has pending: never
        the list of a loop running in another thread, which may still be adding to it."""
        try:
            here = asyncio.get_running_loop()
        except RuntimeError:
            here = None
        for loop in list(self._pending):
            if loop is here or not loop.is_running():
                self._hand_over(loop)

    def close(self, timeout: float = 2.0) -> None:
        self._hand_over_here()
        t = self._thread
        if t is not None and t.is_alive():
            self._enqueue(_STOP)
            self._closing = True  # after the queue is drained, or now if it cannot be
            t.join(timeout)
        self._thread = None
        self._writing = False
        self._close_fd()

    @property
    def state(self) -> dict:
        return {"path": str(self.path) if self.path else None, "on_error": self.on_error,
                "writable": self.can_accept(), "problem": self._outage, "queued": self._queued - self._handled,
                **dict(self.stats)}

    # -- the writer thread -----------------------------------------------------------------------

    def _open(self) -> int:
        assert self.path is not None
        flags = os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC
        try:
            if stat.S_ISFIFO(os.stat(self.path).st_mode):
                flags |= os.O_NONBLOCK  # no reader yet: ENXIO now rather than a startup that hangs
        except FileNotFoundError:
            pass
        fd = os.open(self.path, flags, 0o640)
        if flags & os.O_NONBLOCK:
            os.set_blocking(fd, True)  # then block like a file: the queue absorbs a slow reader
        return fd

    def _ensure_thread(self) -> None:
        if not self._writing:  # the writer is not running (not started yet, stopped, or crashed)
            self._closing = False
            self._writing = True
            t = threading.Thread(name="easgate-audit", daemon=True)
            t.run = lambda: self._run(t)  # type: ignore[method-assign]
            self._thread = t
            t.start()

    def _task_done(self, n: int = 1) -> None:
        with self._lock:
            self._handled += n

    def _run(self, me: threading.Thread) -> None:
        try:
            self._serve()
        finally:
            if self._thread is me:  # not a writer that close() gave up on and replaced
                self._writing = False

    def _serve(self) -> None:
        nxt = None
        while True:
            item = nxt if nxt is not None else self._queue.get()
            nxt = None
            if item is _STOP:
                self._task_done()
                return
            if item is _REOPEN:
                self._do_reopen()
                self._task_done()
                continue
            # what is waiting goes out in one write (one O_APPEND write: never interleaved); an
            # item is one (line, future) or a list of them (one event-loop iteration's lines)
            batch = list(item) if isinstance(item, list) else [item]
            size = sum(len(x[0]) for x in batch)
            while len(batch) < BATCH_LINES and size < BATCH_BYTES:
                try:
                    more = self._queue.get_nowait()
                except queue.Empty:
                    break
                if isinstance(more, tuple):
                    more = [more]
                elif not isinstance(more, list):
                    nxt = more
                    break
                batch.extend(more)
                size += sum(len(x[0]) for x in more)
            self._resolve_all(batch, self._write_until_done(batch))
            self._task_done(len(batch))

    @staticmethod
    def _resolve_all(batch: list, ok: bool) -> None:
        """Answer the batch's waiters: one wake-up of each event loop for the whole batch."""
        by_loop: dict = {}
        for _, fut in batch:
            if fut is not None:
                by_loop.setdefault(fut.get_loop(), []).append(fut)
        for loop, futs in by_loop.items():
            try:
                loop.call_soon_threadsafe(_resolve, futs, ok)
            except RuntimeError:  # the loop is gone (shutting down)
                pass

    def _write_until_done(self, batch: list) -> bool:
        data = "".join(line + "\n" for line, _ in batch).encode("utf-8", "surrogateescape")
        while True:
            if self._reopen_wanted:
                self._do_reopen()
            try:
                if self._fd is None:
                    self._fd = self._open()
                view = memoryview(data)
                while view:
                    n = os.write(self._fd, view)
                    view = view[n:]
            except OSError as e:
                self.stats["write_errors"] += 1
                problem = e.strerror or str(e)
                if self._failing is None:
                    self._failing = problem
                    self._begin_outage(f"{self.path}: {problem}")
                    self._resolve_all(batch, False)  # nobody waits for the retries
                if e.errno in (errno.EPIPE, errno.ENXIO):  # the reader is gone; a new open finds the next one
                    self._close_fd()
                if self._closing:
                    self.stats["lines_lost"] += len(batch)
                    return False
                time.sleep(self.retry_s)  # keep these lines and retry: nothing queued is lost
                continue
            self.stats["lines_written"] += len(batch)
            if self._failing is not None or self._stalled:
                self._failing = None
                self._stalled = False
                self._end_outage()
            return True

    def _close_fd(self) -> None:
        if self._fd is not None:
            try:
                os.close(self._fd)
            except OSError:
                pass
            self._fd = None

    def _do_reopen(self) -> None:
        self._reopen_wanted = False
        self._close_fd()
        self.stats["reopens"] += 1
        try:
            self._fd = self._open()
        except OSError as e:  # the write that follows retries and reports it
            logger.warning(f"easgate: {self.name} {self.path}: cannot reopen: {e.strerror or e}")
            return
        logger.info(f"easgate: {self.name} {self.path} reopened")

    # -- outages: logged once when they start, once when they end --------------------------------

    def _lost(self, why: str) -> None:
        self.stats["lines_lost"] += 1
        self._begin_outage(why, "queue")
        with self._lock:
            self._outage_lost += 1

    def _begin_outage(self, why: str, kind: str = "sink") -> None:
        with self._lock:
            if self._outage is not None:
                return
            self._outage, self._outage_kind, self._outage_start = why, kind, time.monotonic()
            self._outage_lost = self._outage_refused = 0
        self.stats["outages"] += 1
        then = ("requests that would be allowed are denied until it is" if self.on_error == "deny"
                else f"requests still go through ({self.on_error_key}=allow); lines queue up and are lost once the "
                "queue is full")
        logger.error(f"easgate: {self.name} {self.path} cannot be written: {why}; {then}")

    def _end_outage(self) -> None:
        with self._lock:
            if self._outage is None:
                return
            why, took = self._outage, time.monotonic() - self._outage_start
            lost, refused = self._outage_lost, self._outage_refused
            self._outage = self._outage_kind = None
        logger.warning(f"easgate: {self.name} {self.path} is written again after {took:.1f}s ({why}); "
                       f"{lost} lines lost, {refused} requests denied meanwhile")
