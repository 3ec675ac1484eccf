"""The tests' fork server (support/zygote.py, support/forkexec.py) must not change what a test sees:
a forked `easgate` answers, exits, takes signals and dies like an exec'd one. If these fail, every
other test's processes are suspect; EASGATE_TEST_FORK=0 runs the suite without the fork server."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys

import pytest

from conftest import base_config, write_config
from support.procs import FORK_PREFIX, GatewayProcess, forking, run_argv, wait_for

EXEC = [sys.executable, "-m", "easgate.cli"]
FORK = [*FORK_PREFIX, "easgate"]

pytestmark = pytest.mark.skipif(not forking(), reason="the fork server is off (EASGATE_TEST_FORK=0)")


def both(args: list[str], **kw) -> tuple[subprocess.CompletedProcess, subprocess.CompletedProcess]:
    run = dict(capture_output=True, text=True, timeout=60, **kw)
    return subprocess.run(FORK + args, **run), subprocess.run(EXEC + args, **run)


def test_a_forked_command_answers_and_exits_like_an_exec_d_one(tmp_path, pki, exchange, mdm):
    bad = base_config(pki, exchange, mdm)
    bad["routes"][0]["pool"] = "nowhere"
    cases = [["check", str(write_config(tmp_path, bad))], ["check", str(tmp_path / "missing.yaml")],
             ["--version"], ["run", "--workers", "x"], ["check", str(write_config(tmp_path, base_config(pki, exchange, mdm), "ok.yaml"))]]
    codes = set()
    for args in cases:
        forked, execd = both(args, cwd=tmp_path)
        assert (forked.returncode, forked.stdout, forked.stderr) == (execd.returncode, execd.stdout, execd.stderr), args
        codes.add(forked.returncode)
    assert codes >= {0, 2}  # the cases differ: some fail


def test_the_environment_and_working_directory_are_the_callers(tmp_path):
    """EASGATE_DEVICES_DB is read at run time: a forked `easgate devices` uses the caller's, in the caller's cwd."""
    env = dict(os.environ, EASGATE_DEVICES_DB="here.db")
    forked = subprocess.run(FORK + ["devices", "list"], capture_output=True, text=True, cwd=tmp_path, env=env, timeout=60)
    execd = subprocess.run(EXEC + ["devices", "list"], capture_output=True, text=True, cwd=tmp_path, env=env, timeout=60)
    assert (forked.returncode, forked.stdout, forked.stderr) == (execd.returncode, execd.stdout, execd.stderr)
    assert str(tmp_path / "here.db") in forked.stderr  # not found, named: the caller's variable, in its directory
    added = subprocess.run(FORK + ["devices", "add", "Dev1", "--user", "alice"], capture_output=True, text=True,
                           cwd=tmp_path, env=env, timeout=60)
    assert added.returncode == 0 and (tmp_path / "here.db").exists(), added.stderr


def test_other_python_settings_make_it_exec_instead(tmp_path):
    """PYTHONPATH is read at interpreter start: with another one, the program must start afresh and see it."""
    (tmp_path / "sitecustomize.py").write_text("print('fresh interpreter')\n")
    env = dict(os.environ, PYTHONPATH=str(tmp_path))
    p = subprocess.run(FORK + ["--version"], capture_output=True, text=True, env=env, timeout=60)
    assert p.returncode == 0 and p.stdout.startswith("fresh interpreter"), p.stdout + p.stderr


def listening(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


def gateway_exit(tmp_path, cfg, launcher: list[str], how: str) -> int:
    g = GatewayProcess(launcher + run_argv(cfg)[4:])
    try:
        g.serving()
        assert listening(g.port)
        rc = g.stop() if how == "sigterm" else g.kill()
        assert not listening(g.port)  # the program itself is gone, not only the process the test holds
        return rc
    finally:
        g.stop()


@pytest.mark.parametrize("how", ["sigterm", "kill"])
def test_a_forked_gateway_stops_on_sigterm_and_dies_on_kill_like_an_exec_d_one(tmp_path, pki, exchange, mdm, how):
    cfg = write_config(tmp_path, base_config(pki, exchange, mdm))
    assert run_argv(cfg)[:4] == FORK  # what the other tests start
    forked, execd = gateway_exit(tmp_path, cfg, FORK, how), gateway_exit(tmp_path, cfg, EXEC, how)
    assert forked == execd == (0 if how == "sigterm" else -signal.SIGKILL)


def test_ctrl_c_reaches_the_program_through_its_process_group(tmp_path, pki, exchange, mdm):
    g = GatewayProcess(run_argv(write_config(tmp_path, base_config(pki, exchange, mdm))), new_session=True)
    try:
        g.serving()
        os.killpg(g.proc.pid, signal.SIGINT)
        g.wait_exit(20)
        wait_for(lambda: not listening(g.port), 10, "the port closed", g)
    finally:
        g.stop()
