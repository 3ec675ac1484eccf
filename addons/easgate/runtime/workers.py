"""Scale on one machine: worker processes on one port, file descriptors, connection cap, clean stops.

- `raise_fd_limit()`: RLIMIT_NOFILE as high as the machine allows (the hard limit, or, with
  CAP_SYS_RESOURCE, /proc/sys/fs/nr_open); a held ActiveSync Ping costs two descriptors.
- `configure_listener()`: the reverse-proxy listener with a deep accept backlog and, in workers,
  SO_REUSEPORT, so N processes bind the same port and the kernel spreads connections over them.
- `Connections` (addon): the per-process cap on concurrent client connections (a clean close past
  it, logged once per burst), and the requests in flight that a graceful stop waits for.
- `drain()`: stop accepting, close idle keep-alive connections, wait for requests in flight up to
  the grace period, then exit.
- `Supervisor`: `easgate run --workers N` starts N worker processes on one port (forked from
  itself, `fork()`, until a reload; `easgate run --worker-index i` processes after it), restarts a
  worker that dies (with backoff, logged), and stops them all on SIGTERM/SIGINT.
  SIGHUP is a graceful reload, as nginx does it: the config is checked first (a bad one is refused
  in one line and the running workers keep serving), N new workers start with it on the same port
  (SO_REUSEPORT), and once they all serve, the old ones get SIGQUIT: they stop accepting and let
  their requests in flight (held Pings) finish for up to the reload grace period, then exit.

Every worker is a complete gateway with its own caches (decision cache, balancer state): see
docs/scaling.md.
"""

from __future__ import annotations

import asyncio
import atexit
import errno
import gc
import logging
import os
import select
import signal
import socket
import subprocess
import sys
import threading
import time
import traceback
from collections.abc import Callable, Sequence
from typing import NoReturn

from ..gateway import mitmcompat
from ..gateway.tls import TICKET_KEY_FD_ENV

logger = logging.getLogger("easgate")

# ------------------------------------------------------------------------------------------------
# The listener


def somaxconn() -> int:
    try:
        return int(open("/proc/sys/net/core/somaxconn").read())
    except (OSError, ValueError):
        return 1024


def configure_listener(reuse_port: bool, backlog: int | None = None) -> None:
    """The reverse-proxy listener (TCP) of this process, before it binds: a deep accept backlog
    (mitmproxy's is asyncio's 100, which a burst of reconnecting phones overflows) and, in
    workers, SO_REUSEPORT so that N processes share the port."""
    mitmcompat.patch_reverse_listener(reuse_port, backlog or min(somaxconn(), 65535))


def reserve_port(host: str, port: int) -> socket.socket:
    """Bind (without listening) host:port with SO_REUSEPORT: resolves port 0 to one port for all
    workers and keeps other programs off it while workers restart."""
    if port:
        probe = "127.0.0.1" if host in ("", "0.0.0.0") else ("::1" if host == "::" else host)
        try:
            socket.create_connection((probe, port), timeout=0.5).close()
        except OSError:
            pass
        else:
            raise OSError(errno.EADDRINUSE, f"something already listens on {host or '*'}:{port}")
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    s = socket.socket(family, socket.SOCK_STREAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    s.bind((host or ("::" if family == socket.AF_INET6 else "0.0.0.0"), port))
    return s


async def drain(master, grace_s: float, why: str = "stopping", deadline: Callable[[], float] | None = None,
                closed: Callable[[], None] | None = None) -> None:
    """Graceful stop: no new connections, idle ones closed, requests in flight get grace_s.

    `deadline` (loop time), when given, is asked again on every round: a stop signal during a
    reload's long drain shortens it to the stop grace period. `closed` is called once the
    listener is closed (the supervisor waits for it before a reload is complete)."""
    ps = master.addons.get("proxyserver")
    conns = master.addons.get("easgate-connections")
    loop = asyncio.get_running_loop()
    fixed = loop.time() + grace_s
    deadline = deadline or (lambda: fixed)
    n = len(ps.connections) if ps else 0
    logger.info(f"easgate: {why}: not accepting new connections; {n} open, waiting up to {grace_s:g}s "
                f"for requests in flight (signal again to stop now)")
    try:
        if ps is not None:
            await ps.servers.update([])
        if closed is not None:
            closed()
        while ps is not None and ps.connections:
            now = time.time()
            busy = 0
            for cid, h in list(ps.connections.items()):
                if conns is not None and conns.busy(cid):
                    busy += 1
                    continue
                if now - (h.client.timestamp_start or now) < 1.0:
                    continue  # still in its TLS handshake: give it a moment to send a request
                io = h.transports.get(h.client)
                transport = getattr(getattr(io, "writer", None), "transport", None)
                if transport is not None and not transport.is_closing():
                    transport.close()
            if loop.time() >= deadline():
                if busy:
                    logger.warning(f"easgate: {busy} requests still in flight at the end of the grace period; "
                                   "closing them")
                break
            await asyncio.sleep(0.05)
    finally:
        master.shutdown()


# ------------------------------------------------------------------------------------------------
# The supervisor


def default_workers() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover
        return os.cpu_count() or 1


def set_parent_death_signal(sig: int = signal.SIGTERM) -> None:
    """Linux: a worker gets sig when its supervisor dies, instead of living on with the port."""
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, int(sig), 0, 0, 0)  # PR_SET_PDEATHSIG
    except Exception:  # pragma: no cover
        pass


def _now() -> str:
    t = time.time()
    return time.strftime("%H:%M:%S", time.localtime(t)) + f".{int(t * 1000) % 1000:03d}"


def say(msg: str) -> None:
    sys.stdout.write(f"[{_now()}] easgate: {msg}\n")  # one write: workers share this stdout
    sys.stdout.flush()


def describe_exit(rc: int) -> str:
    if rc < 0:
        try:
            return f"killed by {signal.Signals(-rc).name}"
        except ValueError:
            return f"killed by signal {-rc}"
    return f"exited with status {rc}"


class Forked:
    """A child forked from this process, through the part of subprocess.Popen the supervisor uses:
    pid, poll(), wait(timeout), send_signal(), kill(), and a returncode of -N when signal N killed it."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.returncode: int | None = None

    def poll(self) -> int | None:
        if self.returncode is None:
            try:
                pid, status = os.waitpid(self.pid, os.WNOHANG)
            except ChildProcessError:  # reaped elsewhere: gone, status unknown (what Popen says too)
                self.returncode = 0
            else:
                if pid:
                    self.returncode = os.waitstatus_to_exitcode(status)
        return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        if self.poll() is not None:
            return self.returncode  # type: ignore[return-value]
        fd = os.pidfd_open(self.pid)  # readable once the child has exited: no polling loop
        try:
            if not select.select([fd], [], [], timeout)[0]:
                raise subprocess.TimeoutExpired(f"pid {self.pid}", timeout or 0)
        finally:
            os.close(fd)
        while self.poll() is None:  # pragma: no cover - exited, so waitpid answers at once
            pass
        return self.returncode  # type: ignore[return-value]

    def send_signal(self, sig: int) -> None:
        if self.poll() is None:  # never a signal to a pid that may have been reused
            os.kill(self.pid, sig)

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)


def fork(target: Callable[[], int | None], *, env: dict[str, str] | None = None, own_group: bool = False,
         close: Sequence[Callable[[], None]] = ()) -> Forked:
    """Run target() in a child forked from this process; the child exits with what it returns.

    Why: the supervisor has easgate and mitmproxy imported already, so a forked worker starts in
    about a tenth of the CPU time of a fresh Python (which spends ~1 s importing them) and shares
    those pages with the supervisor. The child starts from what the supervisor is: it must be in a
    clean state (nothing of a gateway set up in it: see cmd_run, whose pre-flight check runs in a
    child too). In the child: the supervisor's signal handlers go, `close` drops what only the
    supervisor may hold (its listening sockets, closed through the objects that own them), stdin is
    /dev/null, `env` is added to the environment; at the end it exits as the interpreter would
    (non-daemon threads, atexit, flush) without returning into the supervisor's frames: their
    clean-up (removing the run directory) is the supervisor's alone. The supervisor runs no thread
    (its metrics listener is a forked process): a child inherits no lock a thread was holding."""
    for stream in (sys.stdout, sys.stderr):  # nothing buffered is written twice
        try:
            stream.flush()
        except (OSError, ValueError):  # pragma: no cover
            pass
    gc.freeze()  # what exists now stays put: the children's collections do not copy these pages
    pid = os.fork()
    if pid:
        if own_group:
            try:
                os.setpgid(pid, pid)  # on both sides: no race with a signal to the group
            except OSError:  # pragma: no cover - the child did it, or is gone
                pass
        return Forked(pid)
    code: int | str | None = 1
    try:
        if own_group:
            os.setpgid(0, 0)
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            signal.signal(sig, signal.SIG_DFL)
        for c in close:
            c()
        null = os.open(os.devnull, os.O_RDONLY)
        os.dup2(null, 0)
        os.close(null)
        os.environ.update(env or {})
        code = target()
    except SystemExit as e:
        code = e.code
    except BaseException:  # noqa: BLE001 - printed as Python would, then the child exits 1
        traceback.print_exc()
        code = 1
    exit_now(exit_status(code))


def exit_status(code: object) -> int:
    """What the interpreter makes of `sys.exit(code)`: None is 0, an int itself, anything else is
    printed to stderr and is 1."""
    if code is None:
        return 0
    if isinstance(code, int):
        return code
    print(code, file=sys.stderr)
    return 1


def exit_now(code: int) -> NoReturn:
    """End a forked process as the interpreter ends, as far as a program can see (its non-daemon
    threads joined, atexit handlers run, stdio flushed), without tearing down every module: that
    would touch, and so copy, all the pages it shares with its parent. A negative code: die of
    that signal, as Python does of an unhandled KeyboardInterrupt."""
    threading._shutdown()  # type: ignore[attr-defined]
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    if code < 0:
        signal.signal(-code, signal.SIG_DFL)
        os.kill(os.getpid(), -code)
    os._exit(code & 0xFF)


class _Worker:
    def __init__(self, index: int) -> None:
        self.index = index
        self.proc: subprocess.Popen | Forked | None = None
        self.started = 0.0
        self.ready = False
        self.backoff = 0.5
        self.restart_at: float | None = None
        self.restarts = 0
        self.retire_by: float | None = None  # handed over by a reload: killed if still running then


class Supervisor:
    """N worker processes on one port: started, watched, restarted, stopped together."""

    MAX_BACKOFF_S = 30.0
    STABLE_AFTER_S = 30.0
    READY_TIMEOUT_S = 60.0

    def __init__(self, n: int, worker_argv: Callable[[int], list[str]], grace_s: float, listen: str, *,
                 reload_grace_s: float = 3600.0, check: Callable[[], str | None] | None = None,
                 env: dict[str, str] | None = None, worker_main: Callable[[int], int] | None = None,
                 close_in_worker: Sequence[Callable[[], None]] = (),
                 watch: Callable[[float], None] | None = None) -> None:
        self.n = n
        self.worker_argv = worker_argv
        # Workers are forked and run worker_main(i) until the first reload; from then on they are
        # started as worker_argv(i): a reload after an upgrade brings in the code installed now.
        self.worker_main = worker_main
        self.close_in_worker = close_in_worker
        self.watch = watch  # called with time.monotonic() on every turn of the loop (the metrics listener)
        self.grace_s = grace_s
        self.reload_grace_s = reload_grace_s
        self.check = check  # SIGHUP: None when the config may be loaded, else why not (one line)
        self.listen = listen
        self.env = env or {}
        self.workers = [_Worker(i) for i in range(1, n + 1)]
        self.starting: list[_Worker] = []  # a reload's new workers, until they all serve
        self.retiring: list[_Worker] = []  # the workers a reload replaced, finishing their requests
        self.closed: set[int] = set()  # pids of workers that said their listener is closed
        self.stop_requested = 0
        self.reload_requested = False
        self.ready_r, self.ready_w = os.pipe()
        os.set_blocking(self.ready_r, False)
        self._buf = b""
        # One TLS session ticket key for all workers (and their restarts), so that a client resumes
        # its session whichever worker the kernel hands its reconnect to; in an anonymous memory
        # file the workers inherit, never on disk or in the environment. A configured
        # tls.session_ticket_key takes precedence in the workers.
        self.ticket_key_fd = os.memfd_create("easgate-ticket-key")
        os.write(self.ticket_key_fd, os.urandom(mitmcompat.TICKET_KEY_LEN))

    # -- processes ---------------------------------------------------------------------------

    def _spawn(self, w: _Worker) -> None:
        extra = {"EASGATE_READY_FD": str(self.ready_w), "EASGATE_SUPERVISOR_PID": str(os.getpid()),
                 "PYTHONUNBUFFERED": "1", **self.env, TICKET_KEY_FD_ENV: str(self.ticket_key_fd)}
        if self.worker_main is not None:
            main, index = self.worker_main, w.index
            w.proc = fork(lambda: main(index), env=extra, own_group=True,
                          close=(lambda: os.close(self.ready_r), *self.close_in_worker))
        else:
            w.proc = subprocess.Popen(self.worker_argv(w.index), env=dict(os.environ, **extra),
                                      pass_fds=(self.ready_w, self.ticket_key_fd), stdin=subprocess.DEVNULL,
                                      process_group=0)
        w.started = time.monotonic()
        w.ready = False
        w.restart_at = None

    def _read_ready(self, timeout: float) -> None:
        try:
            r, _, _ = select.select([self.ready_r], [], [], timeout)
        except InterruptedError:  # pragma: no cover
            return
        if not r:
            return
        try:
            self._buf += os.read(self.ready_r, 4096)
        except BlockingIOError:
            return
        *lines, self._buf = self._buf.split(b"\n")
        for line in lines:
            parts = line.decode(errors="replace").split()
            if len(parts) == 3 and parts[0] == "ready":
                pid = int(parts[2])
                for w in self.workers + self.starting:
                    if w.proc is not None and w.proc.pid == pid:
                        w.ready = True
                        if w.restarts:
                            say(f"worker {w.index} (pid {pid}) is serving again")
            elif len(parts) == 3 and parts[0] == "closed":
                self.closed.add(int(parts[2]))

    def _all(self) -> list[_Worker]:
        return self.workers + self.starting + self.retiring

    def _on_signal(self, signum, _frame) -> None:
        if signum == signal.SIGHUP:
            self.reload_requested = True
            return
        self.stop_requested += 1
        if self.stop_requested > 1:
            for w in self._all():
                if w.proc and w.proc.poll() is None:
                    w.proc.kill()

    # -- the loop ------------------------------------------------------------------------------

    def run(self) -> int:
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            signal.signal(sig, self._on_signal)
        say(f"starting {self.n} workers on {self.listen} (supervisor pid {os.getpid()})")
        for w in self.workers:
            self._spawn(w)
            say(f"worker {w.index} started (pid {w.proc.pid})")
        # start-up: every worker must come up once, or the whole thing fails
        deadline = time.monotonic() + self.READY_TIMEOUT_S
        while not all(w.ready for w in self.workers):
            if self.stop_requested:
                return self._stop()
            for w in self.workers:
                rc = w.proc.poll()
                if rc is not None:
                    say(f"worker {w.index} (pid {w.proc.pid}) {describe_exit(rc)} during start-up; stopping")
                    self._stop(quiet=True)
                    return rc if rc > 0 else 1
            if time.monotonic() > deadline:
                say(f"workers not serving after {self.READY_TIMEOUT_S:g}s; stopping")
                self._stop(quiet=True)
                return 1
            self._read_ready(0.1)
        say(f"{self.n} workers serving {self.listen} (pids {', '.join(str(w.proc.pid) for w in self.workers)})")

        while not self.stop_requested:
            if self.reload_requested:
                self._reload()
                continue
            self._read_ready(0.2)
            self._reap_retiring()
            now = time.monotonic()
            if self.watch is not None:
                self.watch(now)
            for w in self.workers:
                if w.restart_at is not None:
                    if now >= w.restart_at and not self.stop_requested:
                        w.restarts += 1
                        self._spawn(w)
                        say(f"worker {w.index} restarted (pid {w.proc.pid}, restart {w.restarts})")
                    continue
                rc = w.proc.poll()
                if rc is None:
                    continue
                lived = now - w.started
                if lived >= self.STABLE_AFTER_S:
                    w.backoff = 0.5
                delay = w.backoff
                w.backoff = min(w.backoff * 2, self.MAX_BACKOFF_S)
                w.restart_at = now + delay
                say(f"worker {w.index} (pid {w.proc.pid}) {describe_exit(rc)} after {lived:.1f}s; "
                    f"restarting in {delay:g}s")
        return self._stop()

    # -- reload (SIGHUP) -----------------------------------------------------------------------

    def _reload(self) -> None:
        """Check the config, start a new set of workers, hand the port over to them."""
        self.reload_requested = False
        say("SIGHUP: reloading: checking the config")
        try:
            problem = self.check() if self.check else None
        except Exception as e:  # noqa: BLE001 - a reload must never take the supervisor down
            problem = f"{type(e).__name__}: {e}"
        if problem:
            say(f"reload refused, the running workers keep serving the old config: {problem}")
            return
        self.worker_main = None  # new workers, and every restart from now on, run the installed code
        self.starting = [_Worker(i) for i in range(1, self.n + 1)]
        for w in self.starting:
            self._spawn(w)
            say(f"reload: new worker {w.index} started (pid {w.proc.pid})")
        deadline = time.monotonic() + self.READY_TIMEOUT_S
        failed = None
        while not all(w.ready for w in self.starting):
            if self.stop_requested:
                return  # run() stops everything, the new workers included
            for w in self.starting:
                rc = w.proc.poll()
                if rc is not None:
                    failed = f"new worker {w.index} (pid {w.proc.pid}) {describe_exit(rc)} during start-up"
                    break
            if failed is None and time.monotonic() > deadline:
                failed = f"new workers not serving after {self.READY_TIMEOUT_S:g}s"
            if failed:
                for w in self.starting:
                    if w.proc.poll() is None:
                        w.proc.kill()
                        w.proc.wait()
                self.starting = []
                say(f"reload failed, the running workers keep serving the old config: {failed}")
                return
            self._read_ready(0.1)
            self._reap_retiring()
        old, self.workers, self.starting = self.workers, self.starting, []
        retire_by = time.monotonic() + self.reload_grace_s + 5
        handed = []
        for w in old:
            if w.proc is not None and w.proc.poll() is None:
                try:
                    w.proc.send_signal(signal.SIGQUIT)  # a worker's "stop accepting, finish, exit"
                except ProcessLookupError:  # pragma: no cover
                    continue
                w.retire_by = retire_by
                self.retiring.append(w)
                handed.append(str(w.proc.pid))
        # Complete once the old listeners are closed: from then on every new connection meets a new
        # worker (and the new certificate).
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and not self.stop_requested and any(
                w.proc.pid not in self.closed and w.proc.poll() is None for w in self.retiring):
            self._read_ready(0.05)
        self.closed.clear()
        say(f"reload complete: {self.n} workers serving {self.listen} with the new config "
            f"(pids {', '.join(str(w.proc.pid) for w in self.workers)}); old workers "
            f"{', '.join(handed) or '-'} finish their requests in flight (up to {self.reload_grace_s:g}s)")

    def _reap_retiring(self) -> None:
        now = time.monotonic()
        for w in list(self.retiring):
            rc = w.proc.poll()
            if rc is None and w.retire_by is not None and now > w.retire_by:
                say(f"old worker {w.index} (pid {w.proc.pid}) still running after the reload grace period; killing it")
                w.proc.kill()
                rc = w.proc.wait()
            if rc is not None:
                say(f"old worker {w.index} (pid {w.proc.pid}) {describe_exit(rc)}: handed over")
                self.retiring.remove(w)

    def _stop(self, quiet: bool = False) -> int:
        alive = [w for w in self._all() if w.proc and w.proc.poll() is None]
        if not quiet:
            say(f"stopping {len(alive)} workers (grace period {self.grace_s:g}s)")
        for w in alive:
            try:
                w.proc.send_signal(signal.SIGTERM)
            except ProcessLookupError:  # pragma: no cover
                pass
        deadline = time.monotonic() + self.grace_s + 5
        for w in alive:
            try:
                w.proc.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                say(f"worker {w.index} (pid {w.proc.pid}) did not stop; killing it")
                w.proc.kill()
                w.proc.wait()
        if not quiet:
            say("all workers stopped")
        return 0


def worker_setup() -> tuple[int | None, bool]:
    """In a worker process: die with the supervisor; the readiness pipe's fd (if any)."""
    sup = os.environ.get("EASGATE_SUPERVISOR_PID")
    if sup:
        set_parent_death_signal(signal.SIGTERM)
        # A SIGHUP forwarded (logrotate) before the audit log's handler is installed must not kill us.
        signal.signal(signal.SIGHUP, signal.SIG_IGN)
        if os.getppid() != int(sup):  # the supervisor died before we got here
            sys.exit(1)
    # Workers share the supervisor's stdout: a log line must reach it in one write, or two workers'
    # lines interleave (print() writes the text and the newline separately when unbuffered).
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.reconfigure(line_buffering=True, write_through=False)
        except (AttributeError, ValueError):  # pragma: no cover
            pass
    fd = os.environ.get("EASGATE_READY_FD")
    return (int(fd) if fd and fd.isdigit() else None), bool(sup)
