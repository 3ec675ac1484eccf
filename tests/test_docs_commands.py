"""The commands of docs/*.md, run exactly as written in a copy of the checkout's layout (tests/docsite.py).

README.md's are in tests/test_readme.py; docs/connector.md's in tests/test_connector_doc.py.
"""

from __future__ import annotations

import json
import re
import shutil
import socket
import ssl
import time
import urllib.request

import pytest

from conftest import ROOT
from doccommands import covers
from docsite import free_port, make_site, wait_for

MITMWEB, OPS, REVOCATION, SCALING, NETSCALER = ("docs/mitmweb.md", "docs/operations.md", "docs/revocation.md",
                                                 "docs/scaling.md", "docs/netscaler-import.md")


@pytest.fixture
def site(tmp_path):
    s = make_site(tmp_path)
    s.run("README.md", ".venv/bin/easgate pki certs")
    yield s
    s.stop_all()


def tls_get(port: int, site, path: str = "/enroll") -> bytes:
    ctx = ssl.create_default_context(cafile=str(site.dir / "certs" / "public-ca.pem"))
    with ctx.wrap_socket(socket.create_connection(("127.0.0.1", port)), server_hostname="mail.example.test") as s:
        s.sendall(f"GET {path} HTTP/1.1\r\nHost: mail.example.test\r\nConnection: close\r\n\r\n".encode())
        return s.recv(200)


SERVING = [
    (MITMWEB, ".venv/bin/easgate web policies/gateway.yaml"),
    (MITMWEB, ".venv/bin/easgate web policies/gateway.yaml -- --set easgate_max_flows=10000"),
    (MITMWEB, ".venv/bin/mitmweb -s addons/gateway.py --set server=false --set easgate_config=policies/gateway.yaml"),
    (SCALING, ".venv/bin/easgate run policies/gateway.yaml"),
    (SCALING, ".venv/bin/easgate run policies/gateway.yaml --workers 4"),
]


@pytest.mark.parametrize("file,command", SERVING, ids=[f"{f[5:-3]}:{c[10:40]}" for f, c in SERVING])
@covers(MITMWEB, *(c for f, c in SERVING if f == MITMWEB))
@covers(SCALING, *(c for f, c in SERVING if f == SCALING))
def test_the_documented_gateway_commands_serve(site, file, command):
    g = site.start(file, command).wait_ready(60)
    assert g.port == site.ports[8443]
    assert tls_get(g.port, site).startswith(b"HTTP/1.1 502")  # no MDM here: the gateway's own 502
    if "--workers 4" in command:
        wait_for(g, r"\[w4\]")
    if "easgate_max_flows=10000" in command:
        assert "easgate_max_flows" not in g.output  # accepted, no complaint


@covers(MITMWEB, ".venv/bin/mitmweb -r tests/captures/ipad-unmanaged.mitm --set web_open_browser=false")
def test_saved_flows_open_in_mitmweb(site):
    g = site.start(MITMWEB, ".venv/bin/mitmweb -r tests/captures/ipad-unmanaged.mitm --set web_open_browser=false")
    port = int(wait_for(g, r"Web server listening at http://127\.0\.0\.1:(\d+)/")[1])
    token = re.search(r"token=(\w+)", g.output)[1]
    req = urllib.request.Request(f"http://127.0.0.1:{port}/flows", headers={"Authorization": f"Bearer {token}"})
    with urllib.request.urlopen(req, timeout=10) as r:
        flows = json.loads(r.read())
    assert len(flows) == 4 and sum(bool(f["marked"]) for f in flows) == 3


API = ["T=s3cret; X=$(openssl rand -hex 16)",
       "curl -s -H \"Authorization: Bearer $T\" http://127.0.0.1:8081/flows | jq '.[] | {path: .request.path, marked, comment}'",
       "curl -s -H \"Authorization: Bearer $T\" -H \"Cookie: _mitmproxy_xsrf=$X\" -H \"X-XSRFToken: $X\" "
       "-H 'Content-Type: application/json' -d '{\"arguments\": [\"@marked\"]}' "
       "http://127.0.0.1:8081/commands/easgate.explain",
       "F=$(curl -s -H \"Authorization: Bearer $T\" http://127.0.0.1:8081/flows | jq -r '.[-1].id')",
       "curl -s -H \"Authorization: Bearer $T\" http://127.0.0.1:8081/flows/$F/request/content/ActiveSync.json"]
WEB_CAPTURE = (".venv/bin/easgate web tests/captures/gateway.yaml -- -r tests/captures/ipad-unmanaged.mitm "
               "--set web_password=s3cret")


@covers(MITMWEB, WEB_CAPTURE, *API)
def test_scripting_mitmweb_api(site):
    g = site.start(MITMWEB, WEB_CAPTURE)
    wait_for(g, rf"Web server listening at http://127\.0\.0\.1:{site.ports[8081]}/", 60)
    out = site.script(MITMWEB, *API).stdout
    assert '"path": "/Microsoft-Server-ActiveSync?Cmd=FolderSync' in out  # jq's view of the flows
    assert "deny" in out and "ApplDMPQ99887766" in out  # easgate.explain on the marked flows
    assert '"command": "FolderSync"' in out or "FolderSync" in out.splitlines()[-1]  # the ActiveSync view


@covers(OPS, ".venv/bin/easgate run policies/gateway.yaml -- --set easgate_metrics=127.0.0.1:9090",
        "curl -s http://127.0.0.1:9090/metrics")
def test_metrics_commands(site):
    site.ports[9090] = free_port()
    # one worker (the machine's CPU count is the environment's business): several workers sharing one
    # metrics port is the supervisor's job (issue 14, branch deploy)
    g = site.start(OPS, ".venv/bin/easgate run policies/gateway.yaml -- --set easgate_metrics=127.0.0.1:9090",
                   prefix="taskset -c 0").wait_ready(60)
    wait_for(g, rf"metrics at http://127\.0\.0\.1:{site.ports[9090]}/metrics")
    tls_get(g.port, site)
    out = site.run(OPS, "curl -s http://127.0.0.1:9090/metrics").stdout
    assert "easgate_requests_total" in out or "easgate_" in out


@covers(OPS, ".venv/bin/easgate replay tests/captures/*.mitm --config tests/captures/gateway.yaml",
        ".venv/bin/mitmdump -n -r tests/captures/ipad-unmanaged.mitm -s addons/replay.py --set server=false "
        "--set easgate_config=tests/captures/gateway.yaml --set easgate_replay=true --set easgate_listen=127.0.0.1:0")
def test_offline_replay_commands(site):
    p = site.run(OPS, ".venv/bin/easgate replay tests/captures/*.mitm --config tests/captures/gateway.yaml")
    assert re.search(r"\d+ flows: \d+ as recorded, 0 differ", p.stdout), p.stdout
    p = site.run(OPS, ".venv/bin/mitmdump -n -r tests/captures/ipad-unmanaged.mitm -s addons/replay.py "
                      "--set server=false --set easgate_config=tests/captures/gateway.yaml --set easgate_replay=true "
                      "--set easgate_listen=127.0.0.1:0")
    assert "easgate replay: 4 flows, 0 differ from the capture" in p.stdout + p.stderr


LIVE = (".venv/bin/easgate replay tests/captures/iphone-managed.mitm --target 127.0.0.1:8443 "
        "--cafile certs/public-ca.pem --client-certs certs/")


@covers(OPS, LIVE)
def test_live_replay_command(site):
    """Against the README's gateway with its stand-ins and connector: every status as recorded."""
    standins = site.start("README.md", ".venv/bin/easgate standins policies/gateway.yaml")
    connector = site.start("README.md", ".venv/bin/easgate connector policies/connector.yaml")
    wait_for(standins, "stand-ins running")
    wait_for(connector, "listening at")
    site.run("README.md", ".venv/bin/easgate devices -c policies/connector.yaml import policies/demo-inventory.csv")
    site.start("README.md", ".venv/bin/easgate run policies/gateway.yaml").wait_ready(60)
    p = site.run(OPS, LIVE, timeout=120)
    assert "8 flows replayed: 8 with the recorded status, 0 differ" in p.stdout, p.stdout + p.stderr


TROUBLE = [".venv/bin/easgate run policies/gateway.yaml -- -w raw.mitm",
           ".venv/bin/easgate capture --sanitize raw.mitm captures/alice-ipad.mitm",
           ".venv/bin/easgate replay captures/*.mitm --config policies/gateway.yaml"]


@covers(OPS, *TROUBLE)
def test_capture_a_problem_then_replay_it(site):
    g = site.start(OPS, TROUBLE[0]).wait_ready(60)
    tls_get(g.port, site)
    assert g.stop() == 0
    site.run(OPS, TROUBLE[1])
    assert (site.dir / "captures" / "alice-ipad.mitm").stat().st_size > 0
    p = site.run(OPS, TROUBLE[2])
    assert "1 flows: 1 as recorded, 0 differ" in p.stdout


REVOKE = [".venv/bin/easgate pki certs --ocsp-url http://127.0.0.1:8888/",
          "openssl ocsp -index certs/index.txt -port 8888 -CA certs/device-ca.pem -rsigner certs/device-ca.pem "
          "-rkey certs/device-ca.key -nmin 5 &",
          ".venv/bin/easgate pki certs --revoke device-ipad"]


@covers(REVOCATION, *REVOKE)
def test_revocation_commands(tmp_path):
    site = make_site(tmp_path)  # without certs/: the first command makes them
    site.ports[8888] = free_port()
    try:
        site.run(REVOCATION, REVOKE[0])
        ocsp = site.start(REVOCATION, REVOKE[1])
        site.run(REVOCATION, REVOKE[2])
        assert any(l.startswith("R\t") for l in (site.dir / "certs" / "index.txt").read_text().splitlines())
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                socket.create_connection(("127.0.0.1", site.ports[8888]), timeout=1).close()
                break
            except OSError:
                time.sleep(0.05)
        else:
            raise AssertionError("openssl ocsp is not listening:\n" + ocsp.output)
    finally:
        site.stop_all()


IMPORT = [".venv/bin/easgate import-netscaler ns.conf > gateway.yaml",
          ".venv/bin/easgate import-netscaler ns.conf -o gateway.yaml --set PUBLIC-IP=0.0.0.0 "
          "--set EXCHANGESERVER-IP=10.0.0.5 --set DEVICEMANAGER-FQDN=mdm.corp.example --set XNCSERVER-IP=10.0.0.7 "
          "--cert PUBLICCERTIFICATE-NAME=certs/gateway-full.pem --cert CA_XenMobile_Device_CA=certs/device-ca.pem "
          "--cert CA_XenMobile_Root_CA=certs/root-ca.pem --pool-ca 1203_lb_vs_mdm_exchange=certs/internal-ca.pem "
          "--pool-sni 1203_lb_vs_mdm_exchange=exchange.corp.example",
          ".venv/bin/easgate check gateway.yaml"]


@covers(NETSCALER, *IMPORT)
def test_netscaler_import_commands(site):
    shutil.copy(ROOT / "tests/fixtures/netscaler-poc.conf", site.dir / "ns.conf")
    first = site.run(NETSCALER, IMPORT[0], ok=False)
    assert first.returncode == 1 and "FILL" in (site.dir / "gateway.yaml").read_text()
    filled = site.run(NETSCALER, IMPORT[1], ok=False)
    assert filled.returncode in (0, 1), filled.stderr
    assert "FILL" not in (site.dir / "gateway.yaml").read_text()
    check = site.run(NETSCALER, IMPORT[2])
    assert "gateway.yaml: OK" in check.stdout
