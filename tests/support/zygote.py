"""A fork server for the easgate, mitmdump and mitmweb processes the tests start.

Most of a test's time went to starting Python processes: each `easgate ...` spends ~0.9 s of CPU
importing mitmproxy and easgate before it does anything, and a run starts ~500 of them. This server
imports all of that once, then forks a child per request: the child is a real, separate process
(its own pid, sockets, TLS, signals and exit status) running the same entry point a console script
runs (`easgate.cli:main`, mitmproxy's `mitmdump`/`mitmweb`), with the requester's argv, environment,
working directory and stdin/stdout/stderr. What it does not share with a fresh start is the
interpreter's start-up: PYTHON* variables that differ from this server's make the requester exec
the program itself instead (forkexec.py), as does EASGATE_TEST_FORK=0 for the whole run.

Protocol (one Unix-socket connection per program run, forkexec.py is the client): the client sends
a length-prefixed JSON request with its fds 0, 1, 2 attached (SCM_RIGHTS); the server answers
``P<pid>`` (forked) or ``E`` (exec it yourself), then ``X<exit code>`` when the child ends (negative:
killed by that signal). The client sends ``S<signal>`` to forward a signal it received (``K``: kill
the child and answer its end); a client that vanishes gets its child SIGKILLed.

    python tests/support/zygote.py SOCKET      # prints "ready" once it listens
"""

from __future__ import annotations

import array
import gc
import json
import os
import selectors
import signal
import socket
import struct
import sys

START_ENV = {k: v for k, v in os.environ.items() if k.startswith("PYTHON") and k != "PYTHONUNBUFFERED"}

import mitmproxy.tools.dump  # noqa: E402, F401
import mitmproxy.tools.main  # noqa: E402
import mitmproxy.tools.web.master  # noqa: E402, F401

import easgate.cli  # noqa: E402 - after START_ENV: the point of this process is these imports
from easgate.runtime.workers import exit_now, exit_status  # noqa: E402

PROGRAMS = {
    "easgate": easgate.cli.main,
    "mitmdump": mitmproxy.tools.main.mitmdump,
    "mitmweb": mitmproxy.tools.main.mitmweb,
}


class Run(Exception):
    """Raised in a freshly forked child: leave the server's loop and become the program."""

    def __init__(self, req: dict) -> None:
        self.req = req


def recv_request(conn: socket.socket) -> tuple[dict, list[int]]:
    fds = array.array("i")
    data, anc, _flags, _addr = conn.recvmsg(65536, socket.CMSG_SPACE(3 * fds.itemsize))
    for level, kind, payload in anc:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            fds.frombytes(payload[: len(payload) - len(payload) % fds.itemsize])
    if len(data) < 4:
        raise ValueError("short request")
    n = struct.unpack("!I", data[:4])[0]
    body = data[4:]
    while len(body) < n:
        more = conn.recv(n - len(body))
        if not more:
            raise ValueError("truncated request")
        body += more
    return json.loads(body), list(fds)


class Server:
    def __init__(self, path: str) -> None:
        self.sel = selectors.DefaultSelector()
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.listener.bind(path)
        self.listener.listen(64)
        self.sel.register(self.listener, selectors.EVENT_READ, ("accept", None))
        self.sel.register(sys.stdin, selectors.EVENT_READ, ("stdin", None))  # EOF: the test run is over
        self.children: dict[int, tuple[socket.socket, int, bool]] = {}  # pid -> (conn, pidfd, group)
        self.by_conn: dict[socket.socket, int] = {}

    def serve(self) -> None:
        print("ready", flush=True)
        while True:
            for key, _ in self.sel.select():
                what, obj = key.data
                if what == "accept":
                    conn, _ = self.listener.accept()
                    self.start(conn)  # raises Run in the child
                elif what == "conn":
                    self.from_client(obj)
                elif what == "child":
                    self.ended(obj)
                elif not os.read(sys.stdin.fileno(), 512):
                    return

    def start(self, conn: socket.socket) -> None:
        try:
            req, fds = recv_request(conn)
        except (OSError, ValueError):
            conn.close()
            return
        env_py = {k: v for k, v in req["env"].items() if k.startswith("PYTHON") and k != "PYTHONUNBUFFERED"}
        if len(fds) != 3 or req["prog"] not in PROGRAMS or env_py != START_ENV:
            for fd in fds:
                os.close(fd)
            conn.sendall(b"E\n")
            conn.close()
            return
        pid = os.fork()
        if pid == 0:
            os.setpgid(0, 0)  # a process group of its own (set on both sides: no race with a signal)
            self.become_child(conn, fds)
            raise Run(req)
        try:
            os.setpgid(pid, pid)
        except OSError:
            pass
        for fd in fds:
            os.close(fd)
        pidfd = os.pidfd_open(pid)
        self.children[pid] = (conn, pidfd, bool(req.get("group")))
        self.by_conn[conn] = pid
        self.sel.register(conn, selectors.EVENT_READ, ("conn", conn))
        self.sel.register(pidfd, selectors.EVENT_READ, ("child", pid))
        conn.sendall(b"P%d\n" % pid)

    def become_child(self, conn: socket.socket, fds: list[int]) -> None:
        """Drop everything of the server's (closing through the objects that own each fd) and take
        the requester's stdio."""
        self.sel.close()
        self.listener.close()
        conn.close()
        for c in self.by_conn:
            c.close()
        for _c, pidfd, _g in self.children.values():
            os.close(pidfd)
        for target, fd in enumerate(fds):
            os.dup2(fd, target)
            os.close(fd)

    def from_client(self, conn: socket.socket) -> None:
        pid = self.by_conn.get(conn)
        try:
            data = conn.recv(256)
        except OSError:
            data = b""
        if pid is None:
            return
        _c, _fd, group = self.children[pid]
        if not data:  # the client died (SIGKILL, a timeout's kill): so does its child
            self.signal(pid, signal.SIGKILL, False)
            self.sel.unregister(conn)
            return
        for msg in data.decode().split():
            if msg == "K":
                self.signal(pid, signal.SIGKILL, False)
            elif msg.startswith("S"):
                self.signal(pid, int(msg[1:]), group)

    def signal(self, pid: int, sig: int, group: bool) -> None:
        try:
            if group:  # the client leads its own process group (a terminal's Ctrl-C): the child's group gets it
                os.killpg(pid, sig)
            else:
                os.kill(pid, sig)
        except ProcessLookupError:
            pass

    def ended(self, pid: int) -> None:
        conn, pidfd, _g = self.children.pop(pid)
        self.by_conn.pop(conn, None)
        self.sel.unregister(pidfd)
        os.close(pidfd)
        _, status = os.waitpid(pid, 0)
        try:
            conn.sendall(b"X%d\n" % os.waitstatus_to_exitcode(status))
        except OSError:
            pass
        try:
            self.sel.unregister(conn)
        except (KeyError, ValueError):
            pass
        conn.close()


def run_program(req: dict) -> None:
    """In the child: the program, as its console script (or `python -m easgate.cli`) would run it."""
    os.chdir(req["cwd"])
    os.environ.clear()
    os.environ.update(req["env"])
    sys.argv = [easgate.cli.__file__ if req["prog"] == "easgate" else req["argv0"], *req["args"]]
    if req["prog"] == "easgate":
        sys.path[0] = req["cwd"]  # python -m puts the working directory first
    code = 0
    try:
        code = PROGRAMS[req["prog"]]()
    except SystemExit as e:
        code = e.code
    except KeyboardInterrupt:
        sys.excepthook(*sys.exc_info())
        code = -signal.SIGINT  # Python dies of SIGINT after the traceback
    except BaseException:
        sys.excepthook(*sys.exc_info())
        code = 1
    exit_now(exit_status(code))  # as easgate's forked workers end: the interpreter's exit, minus the teardown


def main() -> None:
    path = sys.argv[1]
    gc.freeze()  # what is imported stays put: the children's collections do not copy its pages
    server = Server(path)
    try:
        server.serve()
    except Run as r:
        del server
        run_program(r.req)


if __name__ == "__main__":
    main()
