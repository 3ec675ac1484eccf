"""Throw-away PostgreSQL and Redis servers on loopback, for the cluster tests and bench/cluster.py.

Each server runs from the system's packages (``scripts/ensure_test_tools.sh`` installs
``postgresql`` and ``redis-server``) in a fresh directory, on a free loopback port, and is
stopped (and its directory removed) by :meth:`stop`. As root, PostgreSQL runs as the
``postgres`` user (it refuses to run as root), like ``realstack`` does.
"""

from __future__ import annotations

import os
import pwd
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path

from .ports import free_port

__all__ = ["PG_BIN", "REDIS_SERVER", "ServerError", "TestPostgres", "TestRedis", "free_port", "missing"]

PG_BIN = Path(os.environ.get("EASGATE_PG_BIN", "/usr/lib/postgresql/15/bin"))
REDIS_SERVER = shutil.which("redis-server") or shutil.which("valkey-server") or "/usr/bin/redis-server"
SETPRIV = shutil.which("setpriv") or "/usr/bin/setpriv"


class ServerError(RuntimeError):
    pass


def missing() -> list[str]:
    """What is not installed (package names); empty when both servers can run here."""
    gaps = []
    if not (PG_BIN / "postgres").exists():
        gaps.append("postgresql")
    if not Path(REDIS_SERVER).exists():
        gaps.append("redis-server")
    if os.geteuid() == 0:
        try:
            pwd.getpwnam("postgres")
        except KeyError:
            gaps.append("a postgres user (the postgresql package creates it)")
    return gaps


def _wait(what: str, cond, timeout: float, proc: subprocess.Popen, log: Path) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if proc.poll() is not None:
            raise ServerError(f"{what} exited ({proc.returncode}): {_tail(log)}")
        if cond():
            return
        time.sleep(0.05)
    raise ServerError(f"{what} not ready within {timeout:g}s: {_tail(log)}")


def _tail(log: Path) -> str:
    try:
        return log.read_text(errors="replace")[-800:]
    except OSError:
        return "(no log)"


def _stop(proc: subprocess.Popen | None, sig: int, timeout: float = 10) -> None:
    if proc is None or proc.poll() is not None:
        return
    proc.send_signal(sig)
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


class TestPostgres:
    """``initdb`` + ``postgres`` in a temporary directory; :attr:`url` for the ``postgres`` superuser."""

    __test__ = False  # not a pytest class

    def __init__(self) -> None:
        self.base = Path(tempfile.mkdtemp(prefix="easgate-pg-"))
        self.base.chmod(0o755)
        self.port = 0
        self.proc: subprocess.Popen | None = None
        self.user = "postgres" if os.geteuid() == 0 else None

    def _argv(self, argv: list[str]) -> list[str]:
        if self.user:
            return [SETPRIV, f"--reuid={self.user}", f"--regid={self.user}", "--init-groups", *argv]
        return argv

    def start(self, timeout: float = 60) -> TestPostgres:
        data = self.base / "data"
        if self.user:
            pw = pwd.getpwnam(self.user)
            os.chown(self.base, pw.pw_uid, pw.pw_gid)
        r = subprocess.run(self._argv([str(PG_BIN / "initdb"), "-D", str(data), "-A", "trust", "-U", "postgres",
                                       "--no-sync", "-E", "UTF8", "--locale=C"]),
                           capture_output=True, text=True, cwd=self.base)
        if r.returncode:
            raise ServerError(f"initdb failed: {(r.stdout + r.stderr)[-800:]}")
        self.port = free_port()
        self._spawn()
        _wait("postgres", self.ready, timeout, self.proc, self.base / "postgres.log")
        return self

    def _spawn(self) -> None:
        log = open(self.base / "postgres.log", "ab")
        self.proc = subprocess.Popen(
            self._argv([str(PG_BIN / "postgres"), "-D", str(self.base / "data"), "-c", "listen_addresses=127.0.0.1",
                        "-c", f"port={self.port}", "-c", f"unix_socket_directories={self.base}", "-c", "fsync=off",
                        "-c", "synchronous_commit=off", "-c", "full_page_writes=off", "-c", "max_connections=200"]),
            stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, cwd=self.base)
        log.close()

    def ready(self) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=0.5):
                pass
        except OSError:
            return False
        r = subprocess.run([str(PG_BIN / "psql"), "-X", "-q", "-h", "127.0.0.1", "-p", str(self.port), "-U", "postgres",
                            "-d", "postgres", "-c", "SELECT 1"], capture_output=True, text=True)
        return r.returncode == 0

    def psql(self, sql: str, db: str = "postgres") -> str:
        r = subprocess.run([str(PG_BIN / "psql"), "-X", "-q", "-At", "-h", "127.0.0.1", "-p", str(self.port),
                            "-U", "postgres", "-d", db, "-v", "ON_ERROR_STOP=1", "-c", sql],
                           capture_output=True, text=True)
        if r.returncode:
            raise ServerError(f"psql failed: {r.stderr.strip()}")
        return r.stdout.strip()

    def create_database(self, name: str) -> str:
        """A fresh database; returns its URL."""
        self.psql(f"CREATE DATABASE {name}")
        return self.url(name)

    def url(self, db: str = "postgres") -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/{db}"

    def stop(self) -> None:
        _stop(self.proc, signal.SIGINT)  # fast shutdown
        shutil.rmtree(self.base, ignore_errors=True)


class TestRedis:
    """``redis-server`` without persistence in a temporary directory; :meth:`kill` and
    :meth:`restart` (same port) for the failure tests."""

    __test__ = False

    def __init__(self) -> None:
        self.base = Path(tempfile.mkdtemp(prefix="easgate-redis-"))
        self.port = free_port()
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self, timeout: float = 20) -> TestRedis:
        log = open(self.base / "redis.log", "ab")
        self.proc = subprocess.Popen([REDIS_SERVER, "--bind", "127.0.0.1", "--port", str(self.port), "--save", "",
                                      "--appendonly", "no", "--dir", str(self.base), "--daemonize", "no",
                                      "--protected-mode", "no"],
                                     stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, cwd=self.base)
        log.close()
        _wait("redis-server", self.ready, timeout, self.proc, self.base / "redis.log")
        return self

    def ready(self) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=0.5) as s:
                s.sendall(b"PING\r\n")
                return s.recv(16).startswith(b"+PONG")
        except OSError:
            return False

    def kill(self) -> None:
        """Down hard (SIGKILL): no goodbye to the clients, like a crashed node."""
        _stop(self.proc, signal.SIGKILL)

    def restart(self) -> None:
        self.kill()
        self.start()

    def stop(self) -> None:
        _stop(self.proc, signal.SIGTERM)
        shutil.rmtree(self.base, ignore_errors=True)
