"""The README's commands, run exactly as written in a copy of the checkout's layout (tests/docsite.py)."""

from __future__ import annotations

import json
import re
import shutil
import socket
import ssl
import urllib.request
from pathlib import Path

import pytest

from conftest import ROOT
from doccommands import commands_in, covers
from docsite import make_site, wait_for

README = "README.md"


@pytest.fixture
def site(tmp_path):
    s = make_site(tmp_path)
    yield s
    s.stop_all()


def readme_pki(site) -> None:
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
    ".venv/bin/mitmdump -s addons/gateway.py --set server=false --set easgate_config=policies/gateway.yaml",
    ".venv/bin/mitmweb  -s addons/gateway.py --set server=false --set easgate_config=policies/gateway.yaml",
], ids=["easgate-web", "mitmdump", "mitmweb"])
@covers(README, ".venv/bin/easgate web policies/gateway.yaml",
        ".venv/bin/mitmdump -s addons/gateway.py --set server=false --set easgate_config=policies/gateway.yaml",
        ".venv/bin/mitmweb  -s addons/gateway.py --set server=false --set easgate_config=policies/gateway.yaml")
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
