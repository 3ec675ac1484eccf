"""The one launcher of real easgate processes for the tests: gateways (`easgate run`, `easgate web`,
plain `mitmdump -s addons/gateway.py`) and connectors (`easgate connector`).

Python programs (`easgate`, `mitmdump`, `mitmweb`) start through the fork server (zygote.py,
started once per test session by conftest): `easgate_argv()` and `mitmdump_argv()` name
forkexec.py, which hands the run to a process that has already imported easgate and mitmproxy.
Each program is still a real process of its own; EASGATE_TEST_FORK=0 execs every one instead.

A process's output is pumped into `lines` by a thread; `wait_ready()` waits for its "listening at"
line (the port, as it binds port 0), `wait_line()`/`wait_output()` for anything else. Nothing here
sleeps on a fixed time: every wait polls a condition until a deadline. Use it through the conftest
fixtures `start_gateway` and `start_connector`, which stop what a test started.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TypeVar

from . import forkexec

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
GATEWAY_SCRIPT = ROOT / "addons" / "gateway.py"
FORKEXEC = Path(__file__).resolve().parent / "forkexec.py"
ZYGOTE = Path(__file__).resolve().parent / "zygote.py"
FORK_PREFIX = [sys.executable, "-SI", str(FORKEXEC)]  # + PROG ARGS: run through the fork server

# mitmproxy's "Reverse proxy to ... listening at HOST:PORT" (a worker's line carries a [wN] prefix)
LISTEN_RE = re.compile(r"[Rr]everse proxy to \S+ listening at \[?([0-9.:a-f*]*)\]?:(\d+)")
WORKER_LISTEN_RE = re.compile(r"^\[w(\d+)\].*listening at \S+:(\d+)")
# mitmproxy's `client connect` line per connection (a debug line by default, configuration.md): the tests that
# find which worker served a client port read them
LOG_CONNECTIONS = ("--set", "easgate_log_connections=true")
CONNECTOR_LISTEN_RE = re.compile(r"listening at http://127\.0\.0\.1:(\d+)")

T = TypeVar("T")


def wait_for(pred: Callable[[], T], timeout: float, what: str = "", proc: ServerProcess | None = None) -> T:
    """Poll pred() until it returns something true (returned), or fail after timeout seconds; pred
    is asked at least once, even with no time left."""
    deadline = time.monotonic() + timeout
    while True:
        if v := pred():
            return v
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}" + (f"\n{proc.output[-5000:]}" if proc else ""))
        time.sleep(0.05)


def forking() -> bool:
    return os.environ.get("EASGATE_TEST_FORK") != "0"


def program_argv(prog: str, *args: str) -> list[str]:
    """`easgate ARGS` (as `python -m easgate.cli`), `mitmdump ARGS` or `mitmweb ARGS`: through the
    fork server unless EASGATE_TEST_FORK=0."""
    if forking():
        return [*FORK_PREFIX, prog, *args]
    if prog == "easgate":
        return [sys.executable, "-m", "easgate.cli", *args]
    return [str(BIN / prog), *args]


def easgate_argv(*args: str) -> list[str]:
    return program_argv("easgate", *args)


class ForkServer:
    """The fork server of one test session (one per xdist worker): EASGATE_TEST_ZYGOTE names its
    socket for every forkexec.py started after `start()`."""

    def __init__(self, directory: Path) -> None:
        self.socket = directory / "zygote.sock"
        self.log = directory / "zygote.log"
        self.proc: subprocess.Popen | None = None

    def start(self) -> ForkServer:
        with open(self.log, "wb") as log:
            self.proc = subprocess.Popen([sys.executable, str(ZYGOTE), str(self.socket)], cwd=ROOT, stdin=subprocess.PIPE,
                                         stdout=subprocess.PIPE, stderr=log, env=dict(os.environ, PYTHONUNBUFFERED="1"))
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        assert line.strip() == b"ready", f"the fork server did not start: {self.log.read_text()}"
        os.environ["EASGATE_TEST_ZYGOTE"] = str(self.socket)
        return self

    def stop(self) -> None:
        os.environ.pop("EASGATE_TEST_ZYGOTE", None)
        if self.proc is not None:
            assert self.proc.stdin is not None
            self.proc.stdin.close()  # EOF: it returns
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def run_argv(config: Path | str, *args: str, workers: int | None = 1, extra: Sequence[str] = ()) -> list[str]:
    """`easgate run CONFIG --listen 127.0.0.1:0 --workers N ARGS -- EXTRA` (workers=None: the default).
    EASGATE_MASTER=full runs the suite on mitmproxy's DumpMaster instead of the lean master."""
    w = ["--workers", str(workers)] if workers is not None else []
    full = ["--full"] if os.environ.get("EASGATE_MASTER") == "full" and "--full" not in args else []
    return easgate_argv("run", str(config), "--listen", "127.0.0.1:0", *w, *args, *full, "--", *extra)


def mitmdump_argv(config: Path | str, *scripts: Path | str, extra: Sequence[str] = (), tool: str = "mitmdump") -> list[str]:
    """Plain `mitmdump -s addons/gateway.py [-s SCRIPT...] --set easgate_config=CONFIG` on a free port."""
    s = [a for script in scripts for a in ("-s", str(script))]
    return [*program_argv(tool), "-s", str(GATEWAY_SCRIPT), *s, "--set", "server=false",
            "--set", f"easgate_config={config}", "--set", "easgate_listen=127.0.0.1:0", *extra]


class ServerProcess:
    """A real process whose output is collected in `lines`; ready when `ready_re` matches a line
    (its group `port_group` is the port it listens on)."""

    ready_re = LISTEN_RE
    port_group = 2
    what = "process"

    def __init__(self, argv: list[str], cwd: Path = ROOT, env: dict | None = None, new_session: bool = False) -> None:
        """new_session: a process group of its own (as a terminal gives a command, for Ctrl-C: os.killpg)."""
        e = dict(os.environ, PYTHONUNBUFFERED="1")
        e.update(env or {})
        self.argv = argv
        self.proc = subprocess.Popen(argv, cwd=cwd, env=e, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL, text=True, errors="replace", start_new_session=new_session)
        self.lines: list[str] = []
        self.port: int | None = None
        self._ready = threading.Event()
        self._more = threading.Condition()
        self._pump_thread = threading.Thread(target=self._pump, daemon=True)
        self._pump_thread.start()

    def _pump(self) -> None:
        for line in self.proc.stdout:
            with self._more:
                self.lines.append(line.rstrip("\n"))
                self._more.notify_all()
            m = self.ready_re.search(line)
            if m and self.port is None:
                self.port = int(m[self.port_group])
                self._ready.set()
        self._ready.set()
        with self._more:
            self._more.notify_all()

    def wait_line(self, pred, timeout: float = 10) -> str:
        """Wait for an output line for which pred(line) holds; returns it."""
        found: list[str] = []

        def seen() -> bool:
            found[:] = [ln for ln in self.lines if pred(ln)][:1]
            return bool(found) or not self._pump_thread.is_alive()

        with self._more:
            self._more.wait_for(seen, timeout)
        assert found, f"no matching line in the {self.what}'s output within {timeout}s:\n{self.output}"
        return found[0]

    def wait_output(self, text: str, timeout: float = 10) -> str:
        """Wait until `text` appears in the output (a log line may follow the response it is about)."""
        with self._more:
            if not self._more.wait_for(lambda: text in self.output or not self._pump_thread.is_alive(), timeout):
                raise AssertionError(f"{text!r} not in the {self.what}'s output within {timeout}s:\n{self.output}")
        assert text in self.output, f"{text!r} not in the {self.what}'s output (it exited):\n{self.output}"
        return self.output

    def wait_ready(self, timeout: float = 20):
        self._ready.wait(timeout)
        if self.port is None:
            self.stop()
            raise AssertionError(f"{self.what} did not start:\n" + self.output)
        return self

    @property
    def output(self) -> str:
        return "\n".join(self.lines)

    def wait_exit(self, timeout: float = 20) -> int:
        rc = self.proc.wait(timeout)
        self._pump_thread.join(5)  # the output up to the end
        return rc

    def kill(self) -> int:
        """Down at once, without a graceful stop (a crash, an OOM kill)."""
        if self.proc.poll() is None:
            self._sigkill()
        rc = self.proc.wait()
        self._pump_thread.join(5)
        return rc

    def _sigkill(self) -> None:
        if self.argv[:3] == FORK_PREFIX:
            self.proc.send_signal(forkexec.KILL)  # the forked program, not only its stand-in
        else:
            self.proc.kill()

    def stop(self) -> int | None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self._sigkill()
                self.proc.wait()
        self._pump_thread.join(5)
        return self.proc.returncode


class GatewayProcess(ServerProcess):
    """A real gateway process (`easgate run`, `easgate web`, mitmdump/mitmweb with the gateway script)."""

    what = "gateway"
    workers = 1

    def serving(self, timeout: float = 40) -> GatewayProcess:
        """Wait until it serves: with N workers, until all N do (stopped if it does not)."""
        if self.workers <= 1:
            return self.wait_ready(timeout)
        try:
            return self.wait_workers(self.workers, timeout)
        except AssertionError:
            self.stop()
            raise

    def wait_workers(self, n: int, timeout: float = 40) -> GatewayProcess:
        """`easgate run --workers N` (N > 1): wait until all N serve; `port` is then the shared port."""
        wait_for(lambda: f"{n} workers serving" in self.output and len(self.worker_ports()) >= n, timeout,
                 f"{n} workers", self)
        self.port = next(iter(self.worker_ports().values()))
        return self

    def worker_ports(self) -> dict[int, int]:
        """worker index -> the port it listens on, from the workers' 'listening at' lines."""
        return {int(m[1]): int(m[2]) for line in list(self.lines) if (m := WORKER_LISTEN_RE.search(line))}


def launch(config: Path, *args: str, via: str = "easgate", extra: Sequence[str] = (), wait: bool = True,
           workers: int | None = None, env: dict | None = None) -> GatewayProcess:
    """Start a gateway on CONFIG: `easgate run CONFIG ARGS -- EXTRA` (via="easgate"; workers=None:
    EASGATE_WORKERS or 1) or the gateway script in mitmdump/mitmweb (via="mitmdump"/"mitmweb", with
    EXTRA). wait: until it serves (with N workers, until all N serve). The caller stops it (conftest's
    start_gateway does)."""
    if via == "easgate":
        n = workers if workers is not None else int(os.environ.get("EASGATE_WORKERS", "1"))
        argv = run_argv(config, *args, workers=n, extra=extra)
    else:
        n = 1
        argv = mitmdump_argv(config, extra=extra, tool=via)
    g = GatewayProcess(argv, env=env)
    g.workers = n
    return g.serving() if wait else g


class ConnectorProcess(ServerProcess):
    """A real `easgate connector CONFIG` process."""

    ready_re = CONNECTOR_LISTEN_RE
    port_group = 1
    what = "connector"

    @classmethod
    def argv(cls, config: Path | str, *args: str) -> list[str]:
        return easgate_argv("connector", str(config), *args)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/services/ActiveSync/Authorize"
