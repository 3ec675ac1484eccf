"""The gateway in mitmweb, for real: a headless `easgate web` (and plain `mitmweb -s addons/gateway.py`),
real device traffic through it, and everything read back through mitmweb's own HTTP API (flows,
marks, comments, contentviews, the gateway's commands) and in a real headless browser (chromium).
Also the Prometheus metrics listener and the flow-memory bound.
"""

from __future__ import annotations

import base64
import html
import json
import os
import re
import secrets
import shutil
import socket
import subprocess
import tempfile
import time
import urllib.request
from pathlib import Path

import pytest
import yaml

from easgate.authz.identity import encode_binary_query
from easgate.tools.capture import E, wbxml
from easgate.tools.ports import free_port

from conftest import (
    GatewayProcess,
    base_config,
    easgate_argv,
    mitmdump_argv,
    request,
    write_config,
)

IPHONE, IPAD = "ApplF17ABCDEF01", "ApplDMPQ99887766"
ANDROID_ID = bytes.fromhex("00ff10203040506070809a0b0c0d0e0f")
WEB_RE = re.compile(r"Web server listening at (http://[^/\s]+)/\?token=([0-9a-f]+)")
METRICS_RE = re.compile(r"easgate: metrics at (http://\S+/metrics)")
DENY_IPAD = f"route activesync: Sync: deny: device {IPAD} not managed [mode]"  # route, command, decision
SYNC_BODY = wbxml(E("AirSync:Sync", E("AirSync:Collections", E("AirSync:Collection", E("AirSync:SyncKey", "0"),
                                                                E("AirSync:CollectionId", "5")))))


def _auth(user: str) -> str:
    return "Basic " + base64.b64encode(f"{user}:secret".encode()).decode()


class Web:
    """mitmweb's HTTP API, as its own UI uses it (auth token, XSRF cookie + header)."""

    def __init__(self, proc: GatewayProcess, timeout: float = 20) -> None:
        self.proc = proc
        deadline = time.monotonic() + timeout
        m = None
        while m is None:
            m = next((WEB_RE.search(line) for line in proc.lines if WEB_RE.search(line)), None)
            if m is None:
                assert time.monotonic() < deadline and proc.proc.poll() is None, proc.output
                time.sleep(0.1)
        self.base, self.token = m[1], m[2]
        self.xsrf = secrets.token_hex(16)

    @property
    def page(self) -> str:
        return f"{self.base}/?token={self.token}"

    def call(self, method: str, path: str, body=None):
        data = json.dumps(body).encode() if body is not None else None
        req = urllib.request.Request(self.base + path, data=data, method=method, headers={
            "Authorization": f"Bearer {self.token}", "Cookie": f"_mitmproxy_xsrf={self.xsrf}",
            "X-XSRFToken": self.xsrf, "Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=15) as r:
            raw = r.read()
        return json.loads(raw) if raw[:1] in (b"{", b"[") else raw.decode()

    def flows(self) -> list[dict]:
        return self.call("GET", "/flows")

    def command(self, cmd: str, *args: str):
        out = self.call("POST", f"/commands/{cmd}", {"arguments": list(args)})
        assert "error" not in out, out
        return out["value"]

    def content(self, flow_id: str, view: str, message: str = "request") -> dict:
        return self.call("GET", f"/flows/{flow_id}/{message}/content/{view}.json")

    def wait_flows(self, n: int, timeout: float = 10) -> list[dict]:
        deadline = time.monotonic() + timeout
        while True:
            flows = self.flows()
            done = [f for f in flows if f.get("response") or f.get("error")]
            if len(done) >= n:
                return flows
            assert time.monotonic() < deadline, (n, flows)
            time.sleep(0.1)


def web_config(tmp_path: Path, pki: Path, exchange, mdm) -> Path:
    cfg = base_config(pki, exchange, mdm)
    cfg["routes"][0]["authorize"] = "activesync"
    (tmp_path / "policy.yaml").write_text(yaml.safe_dump({
        "mode": "block", "inventory": [{"device_id": IPHONE, "owner": "alice", "compliant": True}],
        # names the rule on the iPhone's flows without changing a decision (they send no mail)
        "commands": {"rules": [{"name": "no-send-on-iphone", "when": {"device_types": ["iPhone"]},
                                "deny": ["SendMail"]}]}}))
    cfg["authorization"] = {"policy": str(tmp_path / "policy.yaml")}
    return write_config(tmp_path, cfg)


def start_web(cfg: Path, *sets: str, via: str = "easgate") -> tuple[GatewayProcess, Web]:
    opts = ["--set", "web_open_browser=false", "--set", f"web_port={free_port()}"]
    for s in sets:
        opts += ["--set", s]
    if via == "easgate":
        argv = easgate_argv("web", str(cfg), "--listen", "127.0.0.1:0", "--", *opts)
    else:
        argv = mitmdump_argv(cfg, extra=opts, tool="mitmweb")
    proc = GatewayProcess(argv).wait_ready()
    try:
        return proc, Web(proc)
    except BaseException:
        proc.stop()
        raise


def send_traffic(port: int, pki: Path) -> None:
    """An allowed iPhone Sync (WBXML), a denied iPad, an Android (base64 query, binary id), an MDM page."""
    plain = "/Microsoft-Server-ActiveSync?Cmd=Sync&User=alice&DeviceId={}&DeviceType={}"
    as_headers = {"Authorization": _auth("alice"), "User-Agent": "Apple-iPhone15C2/2105.219",
                  "MS-ASProtocolVersion": "16.1", "Content-Type": "application/vnd.ms-sync.wbxml"}
    assert request(port, "OPTIONS", "/Microsoft-Server-ActiveSync", pki, headers=as_headers).status == 200
    assert request(port, "POST", plain.format(IPHONE, "iPhone"), pki, headers=as_headers, body=SYNC_BODY,
                   cert="device-iphone").status == 200
    assert request(port, "POST", plain.format(IPAD, "iPad"), pki, headers=as_headers, body=SYNC_BODY).status == 403
    q = encode_binary_query(command="Ping", device_id=ANDROID_ID, device_type="Android", version="14.1",
                            params={"CollectionId": "5"})
    assert request(port, "POST", f"/Microsoft-Server-ActiveSync?{q}", pki, body=SYNC_BODY, headers={
        "Authorization": _auth("bob@contoso.com"), "User-Agent": "Android/14-EAS-2.0"}).status == 403
    assert request(port, "GET", "/zdm/enroll", pki, cert="device-iphone").status == 200


@pytest.fixture(scope="module")
def web(pki, exchange, mdm, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("web")
    proc, w = start_web(web_config(tmp, pki, exchange, mdm), "easgate_metrics=127.0.0.1:0")
    try:
        send_traffic(proc.port, pki)
        w.wait_flows(5)
        yield proc, w
    finally:
        proc.stop()


def by_path(flows: list[dict], needle: str) -> dict:
    found = [f for f in flows if needle in f["request"]["path"]]
    assert len(found) == 1, (needle, [f["request"]["path"] for f in flows])
    return found[0]


# ---------------------------------------------------------------------------------------------


def test_flows_carry_route_decision_mark_and_comment(web):
    proc, w = web
    flows = w.flows()
    denied = by_path(flows, IPAD)
    assert denied["marked"] == "\u26d4"  # mitmweb shows :no_entry: as ⛔
    assert denied["comment"] == DENY_IPAD
    assert denied["response"]["status_code"] == 403
    allowed = by_path(flows, IPHONE)
    assert allowed["marked"] == "" and allowed["comment"].startswith(f"route activesync: Sync: allow: device {IPHONE} managed")
    assert allowed["response"]["status_code"] == 200
    android = by_path(flows, "?j")  # the base64 query form
    assert android["marked"] and android["comment"] == f"route activesync: Ping: deny: device {ANDROID_ID.hex()} not managed [mode]"
    mdm_flow = by_path(flows, "/zdm/enroll")
    assert mdm_flow["comment"] == "route mdm" and not mdm_flow["marked"]
    options = [f for f in flows if f["request"]["method"] == "OPTIONS"][0]
    assert options["comment"].startswith("route activesync: allow: OPTIONS passes")
    # the gateway's log goes through mitmproxy's logging: it is in mitmweb's event log
    events = w.call("GET", "/events")
    assert any("easgate: loaded" in e["message"] for e in events)
    # mitmweb's flow list shows the comment column
    assert "comment" in w.call("GET", "/options")["web_columns"]["value"]


def test_gateway_commands_from_mitmwebs_command_bar(web):
    proc, w = web
    listed = w.call("GET", "/commands")
    for c in ("easgate.explain", "easgate.status", "easgate.reload", "easgate.cache.clear", "easgate.audit.reopen",
              "easgate.audit.status"):
        assert c in listed and listed[c]["help"]
    assert w.command("easgate.audit.reopen") == "no audit_log configured"
    explain = w.command("easgate.explain", "@all")
    assert f"deny (mode): device {IPAD} not managed" in explain
    assert f"user=bob@contoso.com device={ANDROID_ID.hex()} cmd=Ping: deny (mode)" in explain
    assert "no authorization decision" in explain  # the MDM request
    marked = w.command("easgate.explain", "@marked")
    assert marked.count("deny") == 2 and IPHONE not in marked
    status = json.loads(w.command("easgate.status"))
    assert status["routes"]["activesync"] == 4 and status["routes"]["mdm"] == 1
    assert status["decisions"] == {"allow_filter": 1, "allow_inventory": 1, "deny_mode": 2}
    assert status["cache"]["misses"] == 3 and status["cache"]["hit_rate"] == 0
    assert status["connector"]["errors"] == 0
    assert status["audit"]["path"] is None and status["audit"]["writable"] is True
    assert w.command("easgate.cache.clear") == "3 cached decisions dropped"
    assert w.command("easgate.reload").startswith("policy reloaded from ")
    assert json.loads(w.command("easgate.status"))["policy"]["reloads"] == 1


def test_contentviews(web):
    proc, w = web
    flows = w.flows()
    iphone = by_path(flows, IPHONE)
    # the WBXML body opens in mitmproxy's own WBXML view
    auto = w.content(iphone["id"], "auto")
    assert auto["view_name"] == "WBXML"
    assert "<Sync>" in auto["text"] and "<CollectionId>5</CollectionId>" in auto["text"]
    # ... and "ActiveSync" shows who is asking, as the gateway decoded it
    a = w.content(iphone["id"], "ActiveSync")
    assert a["view_name"] == "ActiveSync"
    for text in ("query form: plain", "command: Sync", "user: alice (from Authorization: Basic)",
                 f"device id: {IPHONE}", "device type: iPhone", "protocol version: 16.1",
                 "route: activesync", f"decision: allow (inventory): device {IPHONE} managed",
                 "client certificate: verified, CN=ApplF17ABCDEF01"):
        assert text in a["text"], a["text"]
    # the gateway part names the command and the command rule of every decided flow
    gateway = a["text"].partition("\ngateway:\n")[2]
    assert "  command: Sync\n" in gateway and "  rule: no-send-on-iphone" in gateway, a["text"]
    android = w.content(by_path(flows, "?j")["id"], "ActiveSync")["text"]
    for text in ("query form: base64", "command: Ping", f"device id: {ANDROID_ID.hex()} (binary, shown as hex)",
                 "protocol version: 14.1", "locale: 0x0409", "base64 query:", "command code: 18 (Ping)",
                 f"device id: 16 bytes, binary: {ANDROID_ID.hex(' ')}", "CollectionId: 5",
                 "decision: deny (mode)"):
        assert text in android, android
    gateway = android.partition("\ngateway:\n")[2]
    assert "  command: Ping\n" in gateway and "  rule: none (no command rule or rate limit applied)" in gateway
    # a request without a body opens in the ActiveSync view by itself
    options = [f for f in flows if f["request"]["method"] == "OPTIONS"][0]
    assert w.content(options["id"], "auto")["view_name"] == "ActiveSync"


def test_metrics_listener(web):
    proc, w = web
    url = next(METRICS_RE.search(line)[1] for line in proc.lines if METRICS_RE.search(line))
    assert url.startswith("http://127.0.0.1:")
    with urllib.request.urlopen(url, timeout=10) as r:
        assert r.headers["Content-Type"].startswith("text/plain; version=0.0.4")
        text = r.read().decode()
    metrics = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            metrics[name] = float(value)
    assert metrics['easgate_requests_total{route="activesync"}'] == 4
    assert metrics['easgate_requests_total{route="mdm"}'] == 1
    assert metrics['easgate_decisions_total{verdict="deny",source="mode"}'] == 2
    assert metrics['easgate_decisions_total{verdict="allow",source="inventory"}'] == 1
    assert metrics['easgate_responses_total{route="activesync",code="403"}'] == 2
    assert metrics["easgate_cache_misses_total"] == 3 and "easgate_cache_hit_ratio" in metrics
    assert metrics["easgate_connector_errors_total"] == 0 and "easgate_policy_reloads_total" in metrics
    assert metrics["easgate_flows_in_memory"] == 5
    assert "# TYPE easgate_requests_total counter" in text
    with pytest.raises(urllib.error.HTTPError) as e:
        urllib.request.urlopen(url.replace("/metrics", "/nope"), timeout=10)
    assert e.value.code == 404
    assert urllib.request.urlopen(url.replace("/metrics", "/healthz"), timeout=10).read() == b"ok\n"


def test_metrics_under_easgate_run(pki, exchange, mdm, tmp_path, start_gateway):
    """The operator's way: `easgate run` (mitmproxy's lean master), metrics on a loopback port."""
    g = start_gateway(web_config(tmp_path, pki, exchange, mdm), extra=["--set", "easgate_metrics=0"])
    h = {"Authorization": _auth("alice"), "User-Agent": "Apple-iPhone15C2/2105.219"}
    path = f"/Microsoft-Server-ActiveSync?Cmd=Sync&DeviceId={IPHONE}&DeviceType=iPhone"
    for _ in range(3):
        assert request(g.port, "POST", path, pki, headers=h).status == 200
    with socket.create_connection(("127.0.0.1", g.port), timeout=10) as s:  # plain HTTP: refused
        s.sendall(b"GET /zdm/enroll HTTP/1.1\r\nHost: mail.example.test\r\n\r\n")
        try:
            s.recv(100)
        except OSError:
            pass
    deadline = time.monotonic() + 10
    while not (m := METRICS_RE.search(g.output)):
        assert time.monotonic() < deadline, g.output
        time.sleep(0.05)
    assert m[1].startswith("http://127.0.0.1:")
    text = urllib.request.urlopen(m[1], timeout=10).read().decode()
    assert 'easgate_decisions_total{verdict="allow",source="cache"} 2' in text
    assert "easgate_cache_hits_total 2" in text and "easgate_cache_hit_ratio 0.666" in text
    assert 'easgate_responses_total{route="activesync",code="200"} 3' in text
    assert "easgate_refused_requests_total 1" in text
    assert "easgate_flows_in_memory" not in text  # no mitmweb, no flow list


def test_flow_memory_bound(pki, exchange, mdm, tmp_path):
    proc, w = start_web(web_config(tmp_path, pki, exchange, mdm), "easgate_max_flows=4",
                        "easgate_metrics=127.0.0.1:0")
    try:
        h = {"Authorization": _auth("alice"), "User-Agent": "Apple-iPad13C1/2105.219"}
        assert request(proc.port, "POST", f"/Microsoft-Server-ActiveSync?Cmd=Sync&DeviceId={IPAD}&DeviceType=iPad",
                       pki, headers=h).status == 403
        for i in range(9):
            assert request(proc.port, "GET", f"/zdm/page{i}", pki).status == 200
        deadline = time.monotonic() + 10
        while len(flows := w.flows()) != 4 or not all(f.get("response") for f in flows):
            assert time.monotonic() < deadline, flows
            time.sleep(0.1)
        paths = [f["request"]["path"] for f in flows]
        # the denied (marked) flow stays; the oldest unmarked ones went
        assert any(IPAD in p for p in paths) and paths[-3:] == ["/zdm/page6", "/zdm/page7", "/zdm/page8"]
        url = next(METRICS_RE.search(line)[1] for line in proc.lines if METRICS_RE.search(line))
        text = urllib.request.urlopen(url, timeout=10).read().decode()
        assert "easgate_flows_evicted_total 6" in text and "easgate_flows_in_memory 4" in text
    finally:
        proc.stop()


def test_plain_mitmweb_with_the_gateway_script(pki, exchange, mdm, tmp_path):
    proc, w = start_web(web_config(tmp_path, pki, exchange, mdm), via="mitmweb")
    try:
        h = {"Authorization": _auth("alice"), "User-Agent": "Apple-iPad13C1/2105.219"}
        assert request(proc.port, "POST", f"/Microsoft-Server-ActiveSync?Cmd=Sync&DeviceId={IPAD}&DeviceType=iPad",
                       pki, headers=h).status == 403
        (f,) = w.wait_flows(1)
        assert f["marked"] == "\u26d4" and f["comment"] == DENY_IPAD
        assert "deny (mode)" in w.command("easgate.explain", "@all")
        assert json.loads(w.command("easgate.status"))["decisions"] == {"deny_mode": 1}
    finally:
        proc.stop()


# ---------------------------------------------------------------------------------------------
# A real browser


def chromium() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        if path := shutil.which(name):
            return path
    return None


def test_browser_shows_the_denied_flow_marked_with_its_reason(web):
    browser = chromium()
    if browser is None:
        if os.environ.get("CI"):
            pytest.fail("chromium is required in CI: apt-get install -y chromium")
        pytest.skip("no chromium on this machine (apt-get install -y chromium); runs in CI")
    proc, w = web
    with tempfile.TemporaryDirectory(prefix="easgate-chromium-") as profile:
        dom = None
        for budget in (5000, 15000):  # mitmweb fetches its flows after the page loaded
            r = subprocess.run([browser, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
                                "--no-first-run", "--disable-background-networking", "--disable-component-update",
                                "--disable-sync", "--disable-dev-shm-usage", f"--user-data-dir={profile}",
                                f"--virtual-time-budget={budget}", "--window-size=1600,1000", "--dump-dom", w.page],
                               capture_output=True, text=True, timeout=60)
            dom = r.stdout
            if DENY_IPAD in html.unescape(dom):
                break
    text = html.unescape(dom or "")
    rows = re.findall(r"<tr\b[^>]*>.*?</tr>", text, re.DOTALL)
    assert rows, f"no flow rows rendered:\n{text[:2000]}\n{r.stderr[-2000:]}"
    denied = [row for row in rows if IPAD in row]
    assert len(denied) == 1, rows
    row = denied[0]
    assert re.search(r'<span class="marker[^"]*">\u26d4</span>', row), row  # marked
    assert re.search(r'<td class="col-comment">' + re.escape(DENY_IPAD) + "</td>", row), row  # the reason
    allowed = [row for row in rows if IPHONE in row and "Cmd=Sync" in row]
    assert allowed and "\u26d4" not in allowed[0] and "Sync: allow: device" in allowed[0]
    assert "(rule no-send-on-iphone)</td>" in allowed[0]  # the command and the rule, in the list
