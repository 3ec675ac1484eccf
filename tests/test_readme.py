"""The README's commands, run as written (on a copy of policies/, so the checkout stays clean)."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import ROOT, GatewayProcess

BIN = Path(sys.executable).parent


@pytest.fixture
def poc(tmp_path) -> Path:
    """The README layout: policies/ next to certs/ made by `easgate pki certs`."""
    shutil.copytree(ROOT / "policies", tmp_path / "policies")
    p = subprocess.run([str(BIN / "easgate"), "pki", "certs"], cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, p.stderr
    assert (tmp_path / "certs" / "gateway-full.pem").exists()
    return tmp_path


def test_readme_mentions_the_commands_tested_here():
    readme = (ROOT / "README.md").read_text()
    for cmd in ("make demo", "make test", ".venv/bin/easgate replay tests/captures/ipad-unmanaged.mitm", ".venv/bin/easgate pki certs", ".venv/bin/easgate check policies/gateway.yaml",
                ".venv/bin/easgate run policies/gateway.yaml", ".venv/bin/easgate web policies/gateway.yaml",
                ".venv/bin/mitmdump -s addons/gateway.py --set server=false --set easgate_config=policies/gateway.yaml",
                ".venv/bin/mitmweb  -s addons/gateway.py --set server=false --set easgate_config=policies/gateway.yaml"):
        assert cmd in readme, cmd
    assert (ROOT / ".ci" / "run").read_text().strip().endswith("make test")


def test_check_prints_the_poc_routes(poc):
    p = subprocess.run([str(BIN / "easgate"), "check", "policies/gateway.yaml"], cwd=poc, capture_output=True,
                       text=True, timeout=60)
    assert p.returncode == 0, p.stderr
    lines = p.stdout.splitlines()
    assert lines[0].endswith("policies/gateway.yaml: OK")
    routes = [l.split()[:2] for l in lines if re.match(r"\s+\d+\s", l)]
    assert routes == [["100", "activesync"], ["110", "mdm"]]


@pytest.mark.parametrize("argv", [
    ["easgate", "run", "policies/gateway.yaml", "--listen", "127.0.0.1:0"],
    ["easgate", "web", "policies/gateway.yaml", "--listen", "127.0.0.1:0", "--",
     "--set", "web_open_browser=false", "--set", "web_port=0"],
    ["mitmdump", "-s", str(ROOT / "addons/gateway.py"), "--set", "server=false", "--set", "easgate_config=policies/gateway.yaml",
     "--set", "easgate_listen=127.0.0.1:0"],
    ["mitmweb", "-s", str(ROOT / "addons/gateway.py"), "--set", "server=false", "--set", "easgate_config=policies/gateway.yaml",
     "--set", "easgate_listen=127.0.0.1:0", "--set", "web_open_browser=false", "--set", "web_port=0"],
], ids=["easgate-run", "easgate-web", "mitmdump", "mitmweb"])
def test_the_poc_config_starts_with_every_documented_command(poc, argv):
    g = GatewayProcess([str(BIN / argv[0]), *argv[1:]], cwd=poc).wait_ready(30)
    try:
        import socket
        import ssl

        ctx = ssl.create_default_context(cafile=str(poc / "certs" / "public-ca.pem"))
        with ctx.wrap_socket(socket.create_connection(("127.0.0.1", g.port)), server_hostname="mail.example.test") as s:
            s.sendall(b"GET /enroll HTTP/1.1\r\nHost: mail.example.test\r\nConnection: close\r\n\r\n")
            head = s.recv(200)
        # the PoC's MDM (127.0.0.1:9081) is not running here: the gateway answers 502 itself
        assert head.startswith(b"HTTP/1.1 502"), head
    finally:
        g.stop()


def test_connector_and_devices_commands(poc):
    """The README's connector/devices lines, on the copy (the connector on a free port)."""
    import json
    import urllib.request

    def easgate(*args: str, ok: bool = True) -> subprocess.CompletedProcess:
        p = subprocess.run([str(BIN / "easgate"), *args], cwd=poc, capture_output=True, text=True, timeout=60)
        assert (p.returncode == 0) == ok, p.stdout + p.stderr
        return p

    conn = GatewayProcess([str(BIN / "easgate"), "connector", "policies/connector.yaml", "--listen", "127.0.0.1:0"],
                          cwd=poc)
    try:
        deadline = time.monotonic() + 20
        port = None
        while port is None and time.monotonic() < deadline:
            m = re.search(r"listening (?:at|on) \S*?127\.0\.0\.1:(\d+)", conn.output)
            port = int(m[1]) if m else None
            time.sleep(0.05)
        assert port, conn.output
        easgate("devices", "-c", "policies/connector.yaml", "import", "policies/demo-inventory.csv")

        def simulate() -> dict:
            url = f"http://127.0.0.1:{port}/services/ActiveSync/Simulate?user=alice&DeviceId=ApplF17ABCDEF01"
            with urllib.request.urlopen(url, timeout=5) as r:
                return json.loads(r.read())

        assert simulate()["result"] == "Allow"
        easgate("devices", "-c", "policies/connector.yaml", "block", "ApplF17ABCDEF01")
        assert simulate()["result"] == "Deny"  # seen without a restart
        listing = easgate("devices", "-c", "policies/connector.yaml", "list").stdout
        assert "ApplF17ABCDEF01" in listing
    finally:
        conn.stop()


def test_import_netscaler_command(poc, tmp_path):
    shutil.copy(ROOT / "tests/fixtures/netscaler-poc.conf", poc / "ns.conf")
    p = subprocess.run(f"{BIN / 'easgate'} import-netscaler ns.conf > gateway.yaml", shell=True, cwd=poc,
                       capture_output=True, text=True, timeout=60)
    assert p.returncode == 1  # untranslated lines are reported ...
    assert re.search(r"ns\.conf:\d+: ", p.stderr)  # ... with their line numbers
    out = (poc / "gateway.yaml").read_text()
    assert "routes:" in out and "FILL" in out


def test_replay_command(poc):
    """Run where `easgate pki certs` made ./certs, as the README's order has it."""
    shutil.copytree(ROOT / "tests" / "captures", poc / "tests" / "captures")
    p = subprocess.run([str(BIN / "easgate"), "replay", "tests/captures/ipad-unmanaged.mitm", "--config",
                        "tests/captures/gateway.yaml"], cwd=poc, capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stdout + p.stderr
    assert "4 flows: 4 as recorded, 0 differ" in p.stdout
    assert "deny (mode)" in p.stdout and "ApplDMPQ99887766" in p.stdout
