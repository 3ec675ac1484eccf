"""The README's commands, run exactly as written, in a copy of the checkout's layout.

The copy (`site` fixture) has `policies/`, `tests/captures/`, and `.venv` and `addons` linked to the
checkout's, so `.venv/bin/easgate ...` runs as a user types it. What the test changes is data, not
commands: the fixed ports of the copied configs (8443, 9443, 9081, 9080) become free ports (the
curl lines get the gateway's port the same way), and a HOME of its own gives mitmweb a free UI
port and no browser (`~/.mitmproxy/config.yaml`).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import ssl
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from conftest import ROOT, GatewayProcess
from doccommands import commands_in, covers, doc_command

VENV = Path(sys.executable).parent.parent
README = "README.md"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Site:
    dir: Path
    env: dict
    ports: dict[int, int] = field(default_factory=dict)  # documented port -> the copy's port
    procs: list[GatewayProcess] = field(default_factory=list)

    def cmd(self, file: str, command: str) -> str:
        """The documented command, with the copy's ports for the documented ones."""
        text = doc_command(file, command)
        for old, new in self.ports.items():
            text = re.sub(rf"(?<=:){old}\b", str(new), text)
        return text

    def run(self, file: str, command: str, ok: bool = True, timeout: float = 90) -> subprocess.CompletedProcess:
        p = subprocess.run(["bash", "-c", self.cmd(file, command)], cwd=self.dir, env=self.env, capture_output=True,
                           text=True, timeout=timeout, stdin=subprocess.DEVNULL)
        assert (p.returncode == 0) == ok, f"{command}: exit {p.returncode}\n{p.stdout}\n{p.stderr}"
        return p

    def start(self, file: str, command: str) -> GatewayProcess:
        g = GatewayProcess(["bash", "-c", "exec " + self.cmd(file, command)], cwd=self.dir, env=self.env)
        self.procs.append(g)
        return g

    def stop_all(self) -> None:
        for g in reversed(self.procs):
            g.stop()


def wait_for(g: GatewayProcess, pattern: str, timeout: float = 30) -> re.Match:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        m = re.search(pattern, g.output)
        if m:
            return m
        if g.proc.poll() is not None:
            break
        time.sleep(0.05)
    raise AssertionError(f"no {pattern!r} in:\n{g.output}")


@pytest.fixture
def site(tmp_path) -> Site:
    d = tmp_path / "site"
    d.mkdir()
    shutil.copytree(ROOT / "policies", d / "policies")
    shutil.copytree(ROOT / "tests" / "captures", d / "tests" / "captures")
    (d / ".venv").symlink_to(VENV)
    (d / "addons").symlink_to(ROOT / "addons")
    home = tmp_path / "home"
    (home / ".mitmproxy").mkdir(parents=True)
    (home / ".mitmproxy" / "config.yaml").write_text("web_port: 0\nweb_open_browser: false\n")
    s = Site(d, dict(os.environ, HOME=str(home), PYTHONUNBUFFERED="1"))
    s.ports = {p: free_port() for p in (8443, 9443, 9081, 9080)}
    for name in ("gateway.yaml", "connector.yaml"):
        f = d / "policies" / name
        text = f.read_text()
        for old, new in s.ports.items():
            text = re.sub(rf"(?<=:){old}\b|(?<=port: ){old}\b", str(new), text)
        f.write_text(text)
    yield s
    s.stop_all()


def readme_pki(site: Site) -> None:
    site.run(README, ".venv/bin/easgate pki certs")
    assert (site.dir / "certs" / "gateway-full.pem").exists()


@covers(README, ".venv/bin/easgate pki certs", ".venv/bin/easgate standins policies/gateway.yaml",
        ".venv/bin/easgate connector policies/connector.yaml",
        ".venv/bin/easgate devices -c policies/connector.yaml import policies/demo-inventory.csv",
        ".venv/bin/easgate check policies/gateway.yaml", ".venv/bin/easgate run policies/gateway.yaml",
        "curl -s -o /dev/null -w '%{http_code}\\n' --cacert certs/public-ca.pem --resolve "
        "mail.example.test:8443:127.0.0.1 --cert certs/device-iphone.pem --key certs/device-iphone.key "
        "-u alice:password -X POST "
        "'https://mail.example.test:8443/Microsoft-Server-ActiveSync?Cmd=Sync&User=alice&DeviceId=ApplF17ABCDEF01&DeviceType=iPhone'",
        "curl -s -o /dev/null -w '%{http_code}\\n' --cacert certs/public-ca.pem --resolve "
        "mail.example.test:8443:127.0.0.1 -u alice:password -X POST "
        "'https://mail.example.test:8443/Microsoft-Server-ActiveSync?Cmd=Sync&User=alice&DeviceId=ApplDMPQ99887766&DeviceType=iPad'",
        ".venv/bin/easgate devices -c policies/connector.yaml block ApplF17ABCDEF01",
        ".venv/bin/easgate devices -c policies/connector.yaml list")
def test_running_your_own_gateway_end_to_end(site):
    """The section as a new user follows it: PKI, stand-ins, connector, inventory, check, run, curl."""
    readme_pki(site)
    standins = site.start(README, ".venv/bin/easgate standins policies/gateway.yaml")
    wait_for(standins, "stand-ins running")
    assert f"stand-in Exchange for pool exchange: https://127.0.0.1:{site.ports[9443]}" in standins.output
    assert f"stand-in MDM for pool mdm: http://127.0.0.1:{site.ports[9081]}" in standins.output
    connector = site.start(README, ".venv/bin/easgate connector policies/connector.yaml")
    wait_for(connector, rf"listening at http://127\.0\.0\.1:{site.ports[9080]}")
    imported = site.run(README, ".venv/bin/easgate devices -c policies/connector.yaml import policies/demo-inventory.csv")
    assert "5 devices" in imported.stdout

    check = site.run(README, ".venv/bin/easgate check policies/gateway.yaml").stdout
    assert f"connector           http://127.0.0.1:{site.ports[9080]}/services/ActiveSync/Authorize" in check
    assert not (site.dir / "logs" / "decisions.jsonl").exists()  # checking wrote nothing

    gw = site.start(README, ".venv/bin/easgate run policies/gateway.yaml")
    gw.wait_ready(60)
    assert gw.port == site.ports[8443]
    assert "unreachable" not in gw.output
    curls = [c.text for c in commands_in(ROOT / README) if c.text.startswith("curl ")]
    iphone, ipad = (site.run(README, c).stdout for c in curls)
    assert (iphone, ipad) == ("200\n", "403\n")
    wait_for(standins, r"exchange: POST /Microsoft-Server-ActiveSync\?Cmd=Sync&User=alice&DeviceId=ApplF17ABCDEF01")
    assert "ApplDMPQ99887766" not in standins.output  # the denied iPad never reached Exchange

    site.run(README, ".venv/bin/easgate devices -c policies/connector.yaml block ApplF17ABCDEF01")
    listing = site.run(README, ".venv/bin/easgate devices -c policies/connector.yaml list").stdout
    row = next(l for l in listing.splitlines() if "ApplF17ABCDEF01" in l)
    assert "blocked" in row.lower() or "yes" in row.lower(), listing
    url = (f"http://127.0.0.1:{site.ports[9080]}/services/ActiveSync/Simulate?user=alice&DeviceId=ApplF17ABCDEF01")
    with urllib.request.urlopen(url, timeout=5) as r:
        assert json.loads(r.read())["result"] == "Deny"  # seen by the running connector, no restart


def tls_get(port: int, certs: Path, path: str = "/enroll") -> bytes:
    ctx = ssl.create_default_context(cafile=str(certs / "public-ca.pem"))
    with ctx.wrap_socket(socket.create_connection(("127.0.0.1", port)), server_hostname="mail.example.test") as s:
        s.sendall(f"GET {path} HTTP/1.1\r\nHost: mail.example.test\r\nConnection: close\r\n\r\n".encode())
        return s.recv(200)


@pytest.mark.parametrize("command", [
    ".venv/bin/easgate web policies/gateway.yaml",
    ".venv/bin/mitmdump -s addons/gateway.py --set easgate_config=policies/gateway.yaml",
    ".venv/bin/mitmweb  -s addons/gateway.py --set easgate_config=policies/gateway.yaml",
], ids=["easgate-web", "mitmdump", "mitmweb"])
@covers(README, ".venv/bin/easgate web policies/gateway.yaml",
        ".venv/bin/mitmdump -s addons/gateway.py --set easgate_config=policies/gateway.yaml",
        ".venv/bin/mitmweb  -s addons/gateway.py --set easgate_config=policies/gateway.yaml")
def test_the_poc_config_serves_with_every_documented_command(site, command):
    readme_pki(site)
    g = site.start(README, command).wait_ready(60)
    assert g.port == site.ports[8443]
    # no MDM stand-in here: the gateway answers 502 itself
    assert tls_get(g.port, site.dir / "certs").startswith(b"HTTP/1.1 502")


@covers(README, ".venv/bin/easgate import-netscaler ns.conf > gateway.yaml")
def test_import_netscaler_command(site):
    shutil.copy(ROOT / "tests/fixtures/netscaler-poc.conf", site.dir / "ns.conf")
    p = site.run(README, ".venv/bin/easgate import-netscaler ns.conf > gateway.yaml", ok=False)
    assert p.returncode == 1  # untranslated lines are reported ...
    assert re.search(r"ns\.conf:\d+: ", p.stderr)  # ... with their line numbers
    out = (site.dir / "gateway.yaml").read_text()
    assert "routes:" in out and "FILL" in out


@covers(README, ".venv/bin/easgate replay tests/captures/ipad-unmanaged.mitm --config tests/captures/gateway.yaml")
def test_replay_command(site):
    """Run where `easgate pki certs` made ./certs, as the README's order has it."""
    readme_pki(site)
    p = site.run(README, ".venv/bin/easgate replay tests/captures/ipad-unmanaged.mitm --config tests/captures/gateway.yaml")
    assert "4 flows: 4 as recorded, 0 differ" in p.stdout
    assert "deny (mode)" in p.stdout and "ApplDMPQ99887766" in p.stdout


def test_make_test_is_what_ci_runs():
    assert (ROOT / ".ci" / "run").read_text().strip().endswith("make test")
