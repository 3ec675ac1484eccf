"""`easgate demo`: what the README promises, run as a user would, from the checkout."""

from __future__ import annotations

import os
import re
import shlex
import signal
import socket
import subprocess
from pathlib import Path

import pytest

from easgate.tools import realstack

from doccommands import covers
from support.procs import ServerProcess, easgate_argv

ROOT = Path(__file__).resolve().parent.parent
# the checkout's code, whichever easgate the interpreter has installed
def env() -> dict:
    """The environment now (with the session's fork server), not at import."""
    return dict(os.environ, PYTHONUNBUFFERED="1")
STARTED = re.compile(r"^\s+(gateway|exchange|mdm|connector)\s+https?://[^:]+:(\d+)", re.MULTILINE)


def demo_argv(*args: str) -> list[str]:
    return [*easgate_argv(), "demo", *args]


def ports_of(output: str) -> dict[str, int]:
    return {name: int(port) for name, port in STARTED.findall(output)}


def listening(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
        return True
    except OSError:
        return False


def test_scenario_passes_and_leaves_nothing_listening(tmp_path):
    r = subprocess.run(demo_argv("--scenario", "--dir", str(tmp_path / "state"), "--port", "0"), cwd=ROOT, env=env(),
                       capture_output=True, text=True, timeout=90)
    out = r.stdout
    assert r.returncode == 0, out + r.stderr
    table = [ln for ln in out.splitlines() if ln.count(" | ") == 3]
    assert re.match(r"device / request\s+\| expected\s+\| got\s+\| ok", table[0])
    rows = {cells[0]: cells[1:] for cells in (list(map(str.strip, ln.split(" | "))) for ln in table[1:])}
    assert rows["iPhone ApplF17ABCDEF01 (alice, managed, cert)"] == ["200 exchange", "200 exchange", "yes"]
    assert rows["iPad ApplDMPQ99887766 (alice, not managed)"] == ["403 denied", "403 denied", "yes"]
    assert rows["MDM request with the iPhone's device cert"][1:] == ["200 mdm, NSClientCert: iPhone cert", "yes"]
    assert rows["MDM request without a cert"][1:] == ["200 mdm, NSClientCert: none", "yes"]
    assert rows["OPTIONS /Microsoft-Server-ActiveSync"][2] == "yes"
    # identity (issue 16): a copied DeviceId, a Bearer user, a token for another user than the certificate
    assert rows["iPhone's DeviceId copied, with the iPad's certificate"][1] == \
        "403 denied: device binding: DeviceId is not the certificate's"
    assert rows["Bearer token (alice) from her iPhone"][1] == "200 exchange"
    assert rows["Bearer token for bob, alice's iPhone certificate"][1] == "403 denied: the user sources disagree"
    assert rows["Autodiscover (JSON) names the public host"][1] == "200 exchange, public URL"
    assert len(rows) >= 10 and all(v[2] == "yes" and v[0] == v[1] for v in rows.values())
    assert f"{len(rows)} of {len(rows)} rows as expected" in out
    assert "nothing left listening" in out
    ports = ports_of(out)
    assert set(ports) == {"gateway", "exchange", "mdm", "connector"}
    assert not [n for n, p in ports.items() if listening(p)]
    # the gateway decided through the connector, and both logged it
    state = tmp_path / "state"
    assert '"decision":"deny"' in (state / "logs" / "decisions.jsonl").read_text()
    assert "ApplDMPQ99887766" in (state / "logs" / "connector-decisions.jsonl").read_text()


@pytest.mark.parametrize("via", ["easgate", "make"])
@covers("README.md", "make demo")
def test_interactive_demo_curl_commands_then_ctrl_c(tmp_path, via):
    busy = socket.socket()
    busy.bind(("127.0.0.1", 0))
    busy.listen()
    busy_port = busy.getsockname()[1]
    args = ["--dir", str(tmp_path / "state"), "--port", str(busy_port)]
    # "make demo" is the README's first command; Ctrl-C in a terminal signals the whole process group
    argv = demo_argv(*args) if via == "easgate" else ["make", "--no-print-directory", "demo", f"DEMO_ARGS={shlex.join(args)}"]
    demo = ServerProcess(argv, env=env(), new_session=True)
    lines = demo.lines
    try:
        out = demo.wait_output("Ctrl-C stops everything", 60)
        assert f"port {busy_port} is busy" in out
        ports = ports_of(out)
        assert ports["gateway"] != busy_port and all(listening(pt) for pt in ports.values())
        curls = [ln.strip() for ln in lines if ln.startswith("curl ")]
        assert len(curls) == 2
        iphone, ipad = curls
        for cmd in curls:
            assert "--cacert" in cmd and f"--resolve mail.example.test:{ports['gateway']}:127.0.0.1" in cmd
            assert "-u alice:password -X POST" in cmd and "User-Agent: Apple-" in cmd and "DeviceType=" in cmd
        assert "device-iphone.pem" in iphone and "--cert" not in ipad
        r = subprocess.run(shlex.split(iphone), capture_output=True, text=True, timeout=30)
        assert r.returncode == 0, r.stderr
        assert r.stdout.startswith("HTTP/1.1 200") and "X-Upstream: exchange" in r.stdout
        r = subprocess.run(shlex.split(ipad), capture_output=True, text=True, timeout=30)
        assert r.stdout.startswith("HTTP/1.1 403"), r.stdout + r.stderr

        # the inventory commands it prints run as printed (.venv/bin/easgate from the checkout)
        devices = [ln.strip() for ln in lines if " devices --db " in ln]
        assert devices and all(ln.startswith(".venv/bin/easgate devices --db ") for ln in devices), devices
        r = subprocess.run(shlex.split(devices[0]), cwd=ROOT, capture_output=True, text=True, timeout=30)
        assert r.returncode == 0, r.stdout + r.stderr

        os.killpg(demo.proc.pid, signal.SIGINT)
        # the demo exits 0; make itself then dies of the SIGINT it got, as make does in a terminal
        assert demo.proc.wait(30) == (0 if via == "easgate" else -signal.SIGINT)
        demo.wait_output("nothing left listening", 5)
        assert not [n for n, pt in ports.items() if listening(pt)]
    finally:
        busy.close()
        demo.kill()


@covers("README.md", ".venv/bin/easgate demo --real")
def test_real_demo_as_the_readme_says(tmp_path):
    """`.venv/bin/easgate demo --real` as written (in a fresh directory), then the two printed
    pyactivesync commands, then Ctrl-C: the real stack and the gateway stop, nothing is left."""
    if gaps := realstack.missing():
        msg = "real ActiveSync stack unavailable, needs: " + ", ".join(gaps)
        if os.environ.get("CI") == "true":
            pytest.fail(msg)
        pytest.skip(msg)
    assert ".venv/bin/easgate demo --real\n" in (ROOT / "README.md").read_text()
    demo = ServerProcess(easgate_argv("demo", "--real"), cwd=tmp_path, env=env(),
                         new_session=True)
    lines = demo.lines
    try:
        out = demo.wait_output("Ctrl-C stops everything", 120)
        assert "SOGo ActiveSync behind nginx" in out
        base = re.search(r"state in (/\S+)", out)[1]
        cmds = [ln.strip() for ln in lines if " -m easgate.tools.realclient " in ln]
        assert len(cmds) == 2
        iphone, ipad = cmds
        assert "device-iphone.pem" in iphone and "--cert" not in ipad
        r = subprocess.run(shlex.split(iphone), capture_output=True, text=True, timeout=120)
        assert r.returncode == 0, r.stdout + r.stderr
        assert "Provision: no policy for this device" in r.stdout and "INBOX" in r.stdout
        assert realstack.SEED_SUBJECT in r.stdout
        r = subprocess.run(shlex.split(ipad), capture_output=True, text=True, timeout=120)
        assert r.returncode == 1 and "HTTP 403 to Cmd=Provision" in r.stderr, r.stdout + r.stderr

        os.killpg(demo.proc.pid, signal.SIGINT)
        assert demo.proc.wait(60) == 0
        demo.wait_output("nothing left listening", 5)
        assert not Path(base).exists()
    finally:
        demo.kill()
