"""One metrics endpoint for all the workers of `easgate run`.

Every worker serves its own Prometheus document on a Unix socket in a private directory
(``EASGATE_METRICS_DIR``) and leaves its last document there as ``w<pid>.final`` when it exits
(a reload, a stop). The supervisor listens on ``easgate_metrics`` (from a process it forks, so
that it runs no thread when it forks its workers) and, per scrape, asks every live worker and
adds the documents up:

- counters and histograms: the sum over live workers plus everything workers that are gone had
  counted (their last document), so a total never goes down when a worker is restarted or a
  reload replaces the workers;
- gauges: the sum over live workers (held long polls, cache entries, flows in memory), except
  ``easgate_info`` (one), ``easgate_start_time_seconds`` (the supervisor's start) and
  ``easgate_cache_hit_ratio`` (recomputed from the summed hits and misses);
- ``easgate_workers``: how many worker processes answered this scrape.

Why not prometheus_client's multiprocess mode: it would mean rewriting every counter the gateway
keeps (policy, cache, connector, routing) as prometheus_client objects, and its per-pid files
pile up with every reload until the directory is wiped. Here the workers' own document is the
source, and the supervisor keeps the counts of workers that are gone in memory.
"""

from __future__ import annotations

import logging
import os
import re
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Sequence
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from . import workers

logger = logging.getLogger("easgate")

SCRAPE_TIMEOUT_S = 5.0
_SAMPLE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{.*\})?\s+(\S+)$")
_LABEL = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"')

Key = tuple[str, str]  # (sample name, label text as rendered)


class Document:
    """A parsed Prometheus text document: families (type, help) and samples in order."""

    def __init__(self) -> None:
        self.types: dict[str, str] = {}
        self.helps: dict[str, str] = {}
        self.family_of: dict[str, str] = {}  # sample name -> family
        self.samples: dict[Key, float] = {}

    @classmethod
    def parse(cls, text: str) -> Document:
        d = cls()
        for line in text.splitlines():
            if line.startswith("# HELP "):
                name, _, help = line[7:].partition(" ")
                d.helps[name] = help
            elif line.startswith("# TYPE "):
                name, _, kind = line[7:].partition(" ")
                d.types[name] = kind.strip()
            elif line and not line.startswith("#"):
                m = _SAMPLE.match(line)
                if not m:
                    continue
                name, labels, value = m[1], m[2] or "", m[3]
                try:
                    d.samples[(name, labels)] = float(value)
                except ValueError:
                    continue
                d.family_of[name] = _family(name, d.types)
        return d

    def kind(self, name: str) -> str:
        return self.types.get(self.family_of.get(name, name), "untyped")


def _family(sample: str, types: dict[str, str]) -> str:
    if sample in types:
        return sample
    for suffix in ("_bucket", "_sum", "_count"):
        if sample.endswith(suffix) and types.get(sample[: -len(suffix)]) in ("histogram", "summary"):
            return sample[: -len(suffix)]
    return sample


def _add(into: dict[Key, float], samples: dict[Key, float]) -> None:
    for k, v in samples.items():
        into[k] = into.get(k, 0.0) + v


def fetch(path: Path, timeout: float = SCRAPE_TIMEOUT_S) -> str:
    """GET /metrics from a worker's Unix socket (HTTP/1.1, Connection: close)."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(timeout)
        s.connect(str(path))
        s.sendall(b"GET /metrics HTTP/1.1\r\nHost: worker\r\nConnection: close\r\n\r\n")
        chunks = []
        while chunk := s.recv(65536):
            chunks.append(chunk)
    head, _, body = b"".join(chunks).partition(b"\r\n\r\n")
    if not head.startswith(b"HTTP/1.1 200"):
        raise OSError(f"worker answered {head.split(b'\r\n', 1)[0].decode(errors='replace')!r}")
    return body.decode()


class Aggregator:
    """Adds up the workers' documents; remembers the counters of workers that are gone."""

    #: documents of workers gone longer than this are folded into one base sum
    FOLD_AFTER_S = 60.0

    def __init__(self, directory: Path, started: float | None = None) -> None:
        self.dir = directory
        self.started = started if started is not None else time.time()
        self.lock = threading.Lock()
        self.last: dict[int, Document] = {}  # live workers' last answer, by pid
        self.gone: dict[int, tuple[float, Document]] = {}  # pid -> (when, last document)
        self.base: dict[Key, float] = {}  # counters of workers gone long ago
        self.meta = Document()  # types and help texts of every family seen

    def _retire(self, pid: int, doc: Document | None) -> None:
        self.last.pop(pid, None)
        if doc is not None:
            self.gone[pid] = (time.monotonic(), doc)  # a later .final replaces a last answer

    def _fold(self) -> None:
        now = time.monotonic()
        for pid, (when, doc) in list(self.gone.items()):
            if now - when > self.FOLD_AFTER_S:
                _add(self.base, {k: v for k, v in doc.samples.items() if _kept(doc.kind(k[0]))})
                del self.gone[pid]

    def _learn(self, doc: Document) -> None:
        for name, kind in doc.types.items():
            self.meta.types.setdefault(name, kind)
        for name, help in doc.helps.items():
            self.meta.helps.setdefault(name, help)
        for name, fam in doc.family_of.items():
            self.meta.family_of.setdefault(name, fam)

    def collect(self) -> tuple[list[Document], int]:
        """Ask every live worker; pick up the last documents of workers that exited."""
        for final in sorted(self.dir.glob("w*.final")):
            pid = _pid(final)
            try:
                doc = Document.parse(final.read_text())
            except OSError:
                continue
            self._learn(doc)
            self._retire(pid, doc)
            final.unlink(missing_ok=True)
        live: list[Document] = []
        for sock in sorted(self.dir.glob("w*.sock")):
            pid = _pid(sock)
            try:
                doc = Document.parse(fetch(sock))
            except OSError:
                if not _alive(pid):  # killed before it could leave a .final: its last answer counts
                    self._retire(pid, self.last.get(pid))
                    sock.unlink(missing_ok=True)
                continue
            self._learn(doc)
            self.last[pid] = doc
            live.append(doc)
        self._fold()
        return live, len(live)

    def render(self) -> str:
        with self.lock:
            live, n = self.collect()
            totals: dict[Key, float] = dict(self.base)
            order: list[Key] = list(self.base)
            for _, doc in self.gone.values():
                for k, v in doc.samples.items():
                    if _kept(doc.kind(k[0])):
                        if k not in totals:
                            order.append(k)
                        totals[k] = totals.get(k, 0.0) + v
            for doc in live:
                for k, v in doc.samples.items():
                    if k not in totals:
                        order.append(k)
                    totals[k] = totals.get(k, 0.0) + v
            return self._text(totals, order, n)

    def _text(self, totals: dict[Key, float], order: list[Key], workers: int) -> str:
        meta = self.meta
        hits = totals.get(("easgate_cache_hits_total", ""), 0.0)
        misses = totals.get(("easgate_cache_misses_total", ""), 0.0)
        special = {
            "easgate_start_time_seconds": self.started,
            "easgate_cache_hit_ratio": hits / (hits + misses) if hits + misses else float("nan"),
        }
        by_family: dict[str, list[Key]] = {}
        for k in order:
            by_family.setdefault(meta.family_of.get(k[0], k[0]), []).append(k)
        lines = ["# HELP easgate_workers Worker processes that answered this scrape.",
                 "# TYPE easgate_workers gauge", f"easgate_workers {workers}"]
        for fam, keys in by_family.items():
            if fam in meta.helps:
                lines.append(f"# HELP {fam} {meta.helps[fam]}")
            lines.append(f"# TYPE {fam} {meta.types.get(fam, 'untyped')}")
            for name, labels in keys:
                if name == "easgate_info":
                    v = 1.0
                elif name in special:
                    v = special[name]
                else:
                    v = totals[(name, labels)]
                lines.append(f"{name}{labels} {_num(v)}")
        return "\n".join(lines) + "\n"


def _kept(kind: str) -> bool:
    """What a worker that is gone still contributes: what it counted, not what it held."""
    return kind in ("counter", "histogram", "summary")


def _num(v: float) -> str:
    return str(int(v)) if v == v and v.is_integer() and abs(v) < 2**53 else repr(v)


def _pid(path: Path) -> int:
    try:
        return int(path.stem.lstrip("w"))
    except ValueError:
        return -1


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}").exists() and "zombie" not in Path(f"/proc/{pid}/status").read_text().lower()
    except OSError:
        return False


class MetricsServer:
    """The supervisor's `easgate_metrics` listener: /metrics (all workers) and /healthz."""

    def __init__(self, host: str, port: int, aggregator: Aggregator) -> None:
        self.aggregator = agg = aggregator

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *a) -> None:
                pass

            def do_GET(self) -> None:
                path = self.path.split("?", 1)[0]
                ctype = "text/plain; charset=utf-8"
                if path == "/metrics":
                    try:
                        status, body = 200, agg.render().encode()
                        ctype = "text/plain; version=0.0.4; charset=utf-8"
                    except Exception:  # noqa: BLE001 - a scrape must not take the supervisor down
                        logger.exception("easgate: metrics could not be aggregated")
                        status, body = 500, b""
                elif path == "/healthz":
                    ok = any(agg.dir.glob("w*.sock"))
                    status, body = (200, b"ok\n") if ok else (503, b"no worker serving\n")
                else:
                    status, body = 404, b"see /metrics\n"
                self.send_response(status)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(body)))
                self.send_header("Connection", "close")
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(body)
                self.close_connection = True

            do_HEAD = do_GET

        family = socket.AF_INET6 if ":" in host else socket.AF_INET

        class Server(ThreadingHTTPServer):
            daemon_threads = True
            address_family = family

        self.httpd = Server((host, port), Handler)
        self.address = self.httpd.server_address[:2]
        self.proc: workers.Forked | None = None
        self.close: Sequence[Callable[[], None]] = ()
        self.restart_at: float | None = None

    def start(self, close: Sequence[Callable[[], None]] = ()) -> MetricsServer:
        """Serve from a process of its own, forked now (`close`: what the child must not keep): the
        supervisor stays single-threaded, so the workers it forks later inherit no lock that a
        thread of it was holding. The supervisor keeps the listening socket (never accepting on
        it), so that watch() can fork a new server on it; its workers close it (forget())."""
        self.close = close
        self.proc = workers.fork(self._serve, close=close)
        return self

    def watch(self, now: float) -> None:
        """From the supervisor's loop: a server process that died is logged and started again a
        second later (what it remembered of workers that are gone is lost: counters start over,
        which Prometheus reads as a reset)."""
        if self.proc is None or self.proc.poll() is None:
            return
        if self.restart_at is None:
            self.restart_at = now + 1.0
            workers.say(f"the metrics listener (pid {self.proc.pid}) {workers.describe_exit(self.proc.returncode or 0)}; "
                        "restarting it in 1s")
        elif now >= self.restart_at:
            self.restart_at = None
            self.start(self.close)
            workers.say(f"the metrics listener restarted (pid {self.proc.pid})")

    def forget(self) -> None:
        """In a worker: the metrics listener is not its own to keep."""
        self.httpd.socket.close()

    def _serve(self) -> int:
        parent = os.getppid()
        workers.set_parent_death_signal(signal.SIGTERM)  # gone with the supervisor, even a killed one
        if os.getppid() != parent:  # pragma: no cover - it died before the line above
            return 1
        for sig in (signal.SIGINT, signal.SIGHUP):  # a terminal's Ctrl-C or a HUP: the supervisor's to act on
            signal.signal(sig, signal.SIG_IGN)
        self.httpd.serve_forever()
        return 0

    def stop(self) -> None:
        if self.proc is None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(5)
        except subprocess.TimeoutExpired:  # pragma: no cover - SIGTERM's default action is to die
            self.proc.kill()
            self.proc.wait()
        self.httpd.server_close()
