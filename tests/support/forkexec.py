"""Run `easgate`, `mitmdump` or `mitmweb` through the tests' fork server (zygote.py), or exec it.

    python -SI tests/support/forkexec.py PROG ARGS...      (PROG: easgate | mitmdump | mitmweb)
    PROG ARGS...                                            (a copy of this file named PROG)

This is the process a test holds: it hands its argv, environment, working directory and stdio to
the server, which forks the real program from a process that has already imported it; then it
stays as the program's stand-in for the test: signals it receives are passed on (SIGKILL cannot be:
the server kills the program when this process vanishes; `SIGRTMIN+1` asks for that and waits), and
it exits with the program's exit code, or dies of the signal that killed it. Without a server
(EASGATE_TEST_ZYGOTE unset or gone), or when the server says so, it execs the program instead.
Standard library only, so it starts in milliseconds under `python -SI`.
"""

import json
import os
import signal
import socket
import struct
import sys

FORWARDED = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGUSR1, signal.SIGUSR2, signal.SIGQUIT)
KILL = signal.SIGRTMIN + 1  # a test's kill(): the program SIGKILLed, this process after it


def exec_program(prog: str, args: list[str]) -> None:
    bindir = os.path.dirname(sys.executable)
    if prog == "easgate":
        os.execv(sys.executable, [sys.executable, "-m", "easgate.cli", *args])
    os.execv(os.path.join(bindir, prog), [os.path.join(bindir, prog), *args])


def main() -> None:
    name = os.path.basename(sys.argv[0])
    if name in ("easgate", "mitmdump", "mitmweb"):  # installed under the program's name (tests/docsite.py)
        prog, args = name, sys.argv[1:]
    else:
        prog, args = sys.argv[1], sys.argv[2:]
    path = os.environ.get("EASGATE_TEST_ZYGOTE")
    if not path:
        exec_program(prog, args)
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        s.connect(path)
    except OSError:
        exec_program(prog, args)
    argv0 = os.path.join(os.path.dirname(sys.executable), prog)
    if prog == "easgate":
        argv0 = "-m"  # replaced by the server with the module's path, as python -m does
    req = json.dumps({"prog": prog, "argv0": argv0, "args": args, "env": dict(os.environ), "cwd": os.getcwd(),
                      "group": os.getpgrp() == os.getpid()}).encode()
    fds = struct.pack("3i", 0, 1, 2)
    s.sendmsg([struct.pack("!I", len(req)) + req], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, fds)])
    f = s.makefile("rb")
    first = f.readline().strip()
    if first != b"P" and not first.startswith(b"P"):
        s.close()
        exec_program(prog, args)

    def forward(sig: int, _frame) -> None:
        try:
            s.sendall(b"K\n" if sig == KILL else b"S%d\n" % sig)
        except OSError:
            pass

    for sig in (*FORWARDED, KILL):
        signal.signal(sig, forward)
    line = f.readline().strip()
    code = int(line[1:]) if line.startswith(b"X") else -int(signal.SIGKILL)
    if code < 0:
        sig = -code
        if sig != signal.SIGKILL:
            signal.signal(sig, signal.SIG_DFL)
        os.kill(os.getpid(), sig)
        code = 128 + sig
    os._exit(code)


if __name__ == "__main__":
    main()
