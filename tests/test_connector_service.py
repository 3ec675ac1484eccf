"""easgate's connector over real HTTP on 127.0.0.1: answers, bad requests, live inventory changes."""

from __future__ import annotations

import base64
import concurrent.futures
import http.client
import json
import os
import re
import signal
import socket
import sqlite3
import subprocess
import time
import urllib.parse
from pathlib import Path

import pytest

from easgate.authz.audit import AuditLog
from easgate.authz.identity import encode_binary_query
from easgate.authz.policy import PolicyStore
from easgate.connector import service as connector_service
from easgate.connector.config import load_connector_config
from easgate.connector.service import ConnectorService, ConnectorThread
from easgate.connector.store import Inventory
from easgate.core.errors import ConfigError
from easgate.gateway.config import Connector
from easgate.gateway.xnc import (
    ConnectorClient,
    callout_query,
    parse_answer,
)

from conftest import ConnectorProcess, easgate_argv

ROOT = Path(__file__).resolve().parent.parent
HOST = "https://mail.example.test"
def env() -> dict:
    """The environment now (with the session's fork server), not at import."""
    return dict(os.environ, PYTHONUNBUFFERED="1")
POLICY = """\
mode: block
allow: {users: ["CONTOSO\\\\svc-sync"]}
deny: {user_agents: ["*BlackBerry*"], devices: [ApplDENIED000001]}
inventory:
  - {device_id: PolicyOnly0001, owner: alice}
"""


@pytest.fixture
def conn_env(tmp_path):
    db = tmp_path / "devices.db"
    inv = Inventory(db)
    inv.import_file(ROOT / "policies" / "demo-inventory.csv")
    inv.add("ApplDENIED000001", "alice")
    policy = tmp_path / "policy.yaml"
    policy.write_text(POLICY)
    log = tmp_path / "decisions.jsonl"
    t = ConnectorThread(ConnectorService(inv, PolicyStore(policy), AuditLog(log))).start()
    t.db, t.log, t.policy_file = db, log, policy
    yield t
    t.stop()


@pytest.fixture
def client(conn_env):
    c = http.client.HTTPConnection("127.0.0.1", conn_env.port, timeout=10)
    yield c
    c.close()


def get(c: http.client.HTTPConnection, target: str, method: str = "GET") -> tuple[int, http.client.HTTPMessage, bytes]:
    c.request(method, target)
    r = c.getresponse()
    return r.status, r.headers, r.read()


def sync_url(device: str | None, dtype: str = "iPhone", user: str = "alice") -> str:
    q = f"Cmd=Sync&User={user}" + (f"&DeviceId={device}" if device else "") + f"&DeviceType={dtype}"
    return f"{HOST}/Microsoft-Server-ActiveSync?{q}"


def authorize(c, user: str | None, device: str | None, agent: str = "Apple-iPhone15C2/2101.100",
              url: str | None = None, param_device: str | None = "same", result_type: str = "json",
              path: str = "/services/ActiveSync/Authorize"):
    q = callout_query(user, agent, "203.0.113.7", url or sync_url(device, user=user or "x"),
                      device if param_device == "same" else param_device)
    if result_type != "json":
        q = q.replace("resultType=json", f"resultType={result_type}")
    return get(c, f"{path}?{q}")


# ------------------------------------------------------------------------------------------------
# Answers


@pytest.mark.parametrize("user, device, agent, allow, reason, source", [
    ("alice", "ApplF17ABCDEF01", "Apple-iPhone", True, "device ApplF17ABCDEF01 managed and compliant", "inventory"),
    ("CONTOSO\\alice", "applf17abcdef01", "Apple-iPhone", True, "device applf17abcdef01 managed and compliant",
     "inventory"),
    ("bob@contoso.com", "androidc1234567890", "Android", True, "device androidc1234567890 managed and compliant",
     "inventory"),
    ("alice", "ApplDMPQ99887766", "Apple-iPad", False, "device ApplDMPQ99887766 not managed", "mode"),
    ("mallory", "ApplF17ABCDEF01", "Apple-iPhone", False, "device ApplF17ABCDEF01 belongs to another user",
     "inventory"),
    ("bob", "androidc1234567890", "Android", False, "device androidc1234567890 belongs to another user", "inventory"),
    ("CONTOSO\\carol", "ApplDEADBEEF0001", "Apple-iPhone", False, "device ApplDEADBEEF0001 not compliant",
     "inventory"),
    ("dave", "ApplLOST00000001", "Apple-iPhone", False, "device ApplLOST00000001 blocked in the inventory",
     "block"),
    ("alice", "UnknownDevice001", "Apple-iPhone", False, "device UnknownDevice001 not managed", "mode"),
    # the policy file's own inventory is not the connector's
    ("alice", "PolicyOnly0001", "Apple-iPhone", False, "device PolicyOnly0001 not managed", "mode"),
    # policy lists: deny beats everything, allow beats "not managed", an inventory block beats allow
    ("alice", "ApplF17ABCDEF01", "BlackBerry9700", False,
     "user agent BlackBerry9700 matches deny pattern '*BlackBerry*'", "policy"),
    ("alice", "ApplDENIED000001", "Apple-iPhone", False, "device ApplDENIED000001 on deny list", "policy"),
    ("CONTOSO\\svc-sync", "UnknownDevice001", "Outlook", True, "user CONTOSO\\svc-sync on allow list", "policy"),
    ("CONTOSO\\svc-sync", "ApplLOST00000001", "Outlook", False, "device ApplLOST00000001 blocked in the inventory",
     "block"),
])
def test_authorize_answers_as_the_gateway_reads_them(client, user, device, agent, allow, reason, source):
    status, headers, body = authorize(client, user, device, agent)
    assert status == 200 and headers["Content-Type"] == "application/json"
    doc = json.loads(body)
    assert (doc["result"], doc["reason"], doc["source"]) == ("Allow" if allow else "Deny", reason, source)
    answer = parse_answer(status, body)  # the gateway's own, strict parser
    assert answer.allow is allow and reason in answer.reason
    # NetScaler reads HTTP.RES.BODY(20): the verdict must be there, and "Allow" only when allowed
    assert (b'"result":"Allow"' in body[:20]) is allow and (b"Allow" in body[:20]) is allow


def test_text_result_type_is_exactly_the_token(client):
    assert authorize(client, "alice", "ApplF17ABCDEF01", result_type="text")[2] == b"Allow"
    status, headers, body = authorize(client, "alice", "ApplDMPQ99887766", result_type="TEXT")
    assert (status, body) == (200, b"Deny") and headers["Content-Type"].startswith("text/plain")
    assert parse_answer(status, body).allow is False


def test_device_id_from_the_url_when_the_parameter_is_empty(client, conn_env):
    # plain query, DeviceId parameter empty (NetScaler sends QUERY.VALUE("DeviceId"), empty for base64 URLs)
    doc = json.loads(authorize(client, "alice", "ApplF17ABCDEF01", param_device="")[2])
    assert (doc["result"], doc["device_id"]) == ("Allow", "ApplF17ABCDEF01")
    # base64 binary query (MS-ASHTTP 2.2.1.1.1.1)
    q = encode_binary_query(command="Sync", device_id="ApplF17ABCDEF01", device_type="iPhone")
    doc = json.loads(authorize(client, "alice", None, url=f"{HOST}/Microsoft-Server-ActiveSync?{q}",
                               param_device="")[2])
    assert (doc["result"], doc["device_id"]) == ("Allow", "ApplF17ABCDEF01")
    # a binary DeviceId (a GUID) reads as lowercase hex, as the gateway reports it
    guid = bytes(range(0xA0, 0xB0))
    conn_env.service.inventory.add(guid.hex(), "alice")
    q = encode_binary_query(command="Ping", device_id=guid, device_type="WP8")
    doc = json.loads(authorize(client, "alice", None, url=f"{HOST}/Microsoft-Server-ActiveSync?{q}",
                               param_device="")[2])
    assert (doc["result"], doc["device_id"]) == ("Allow", guid.hex())
    # no DeviceId anywhere, or a url that is not a well-formed ActiveSync request: a Deny, not an error
    doc = json.loads(authorize(client, "alice", None, param_device="")[2])
    assert (doc["result"], doc["source"]) == ("Deny", "identity") and "DeviceId missing" in doc["reason"]


def test_device_id_parameter_must_match_the_url(client):
    doc = json.loads(authorize(client, "alice", "ApplF17ABCDEF01", url=sync_url("SomethingElse01"))[2])
    assert doc["result"] == "Deny" and doc["source"] == "identity"
    assert doc["reason"] == ("DeviceId parameter ApplF17ABCDEF01 does not match the url's DeviceId "
                             "SomethingElse01")


def test_netscaler_style_url_with_unencoded_plus_and_urlsafe_base64(client):
    # NetScaler's B64ENCODE is not URL-safe and the value is not percent-encoded: '+' arrives as a space
    url = next(u for u in (sync_url("ApplF17ABCDEF01") + "&x=" + ">?" * i for i in range(1, 64))
               if "+" in base64.b64encode(u.encode()).decode())
    b64 = base64.b64encode(url.encode()).decode()
    q = f"user=alice&agent=Apple-iPhone&ip=10.0.0.1&url={b64}&resultType=json&DeviceId=ApplF17ABCDEF01"
    status, _, body = get(client, f"/services/ActiveSync/Authorize?{q}")
    assert json.loads(body)["result"] == "Allow"
    urlsafe = base64.urlsafe_b64encode(url.encode()).decode().rstrip("=")
    status, _, body = get(client, f"/services/ActiveSync/Authorize?user=alice&url={urlsafe}")
    assert json.loads(body)["result"] == "Allow"


# ------------------------------------------------------------------------------------------------
# Bad requests: 400 with a reason, never a 500, never an Allow


def b64(s: str) -> str:
    return urllib.parse.quote(base64.b64encode(s.encode()).decode(), safe="")


GOOD_URL = b64(sync_url("ApplF17ABCDEF01"))


@pytest.mark.parametrize("query, reason", [
    (f"url={GOOD_URL}&DeviceId=ApplF17ABCDEF01", "parameter user is missing or empty"),
    (f"user=&url={GOOD_URL}", "parameter user is missing or empty"),
    ("user=alice&DeviceId=ApplF17ABCDEF01", "parameter url is missing or empty"),
    ("user=alice&url=", "parameter url is missing or empty"),
    ("user=alice&url=%25%25not-base64%21", "parameter url is not base64"),
    ("user=alice&url=YWJjZ", "parameter url is not base64"),
    (f"user=alice&url={b64('ftp://mail.example.test/x')}", "which is not an http(s) URL"),
    (f"user=alice&url={b64('javascript:alert(1)')}", "which is not an http(s) URL"),
    (f"user=alice&url={b64('https:///nohost')}", "which is not an http(s) URL"),
    (f"user=alice&url={urllib.parse.quote(base64.b64encode(bytes([0xff, 0xfe, 0x80])))}", "does not decode to UTF-8"),
    (f"user=alice&url={GOOD_URL}&agent={'A' * 2049}", "parameter agent is 2049 characters long; the limit is 2048"),
    (f"user={'u' * 3000}&url={GOOD_URL}", "parameter user is 3000 characters long"),
    (f"user=alice&url={b64('https://x/' + 'a' * 2000)}", "parameter url is 2680 characters long"),
    (f"user=alice%ff&url={GOOD_URL}", "not UTF-8"),
    (f"user=alice%0d%0aX-Evil:1&url={GOOD_URL}", "parameter user contains control characters"),
    (f"user=alice&url={GOOD_URL}&DeviceId=a%00b", "parameter DeviceId contains control characters"),
    (f"user=alice&user=bob&url={GOOD_URL}", "parameter user is given twice with different values"),
    (f"user=alice&url={GOOD_URL}&resultType=xml", "resultType 'xml' is not json or text"),
    ("&".join(f"p{i}=x" for i in range(40)), "more than 32 parameters"),
])
def test_bad_requests_get_400_with_a_reason(client, conn_env, query, reason):
    status, headers, body = get(client, f"/services/ActiveSync/Authorize?{query}")
    assert status == 400, body
    doc = json.loads(body)
    assert doc["error"] == "bad request" and reason in doc["reason"]
    assert b"Allow" not in body
    # the gateway reads a 400 as "this request is refused": a deny, never the fail mode
    answer = parse_answer(status, body)
    assert not answer.allow and answer.reason == "connector rejected the request (HTTP 400)"
    conn_env.service.log.flush()  # a line still queued would be written now
    assert not conn_env.log.exists() or conn_env.log.read_text() == ""  # no decision was made


def test_unknown_paths_methods_and_head(client):
    status, _, body = get(client, "/services/ActiveSync/Nope?user=alice")
    assert status == 404 and "/services/ActiveSync/Authorize" in json.loads(body)["reason"]
    status, headers, body = get(client, "/services/ActiveSync/Authorize", method="POST")
    assert status == 405 and headers["Allow"] == "GET, HEAD"
    status, headers, body = get(client, "/SERVICES/activesync/version/", method="HEAD")  # IIS-like paths
    assert status == 200 and body == b"" and int(headers["Content-Length"]) > 0


def raw(port: int, data: bytes) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
        s.sendall(data)
        out = b""
        while chunk := s.recv(65536):
            out += chunk
        return out


def test_malformed_and_oversized_http_get_400_and_the_connection_closed(conn_env):
    out = raw(conn_env.port, b"THIS IS NOT HTTP\r\n\r\n")
    assert out.startswith(b"HTTP/1.1 400 ") and b"malformed HTTP" in out
    out = raw(conn_env.port, b"GET /services/ActiveSync/Authorize?user=" + b"a" * 70_000 + b" HTTP/1.1\r\n\r\n")
    assert out.startswith(b"HTTP/1.1 400 ") and b"Allow" not in out
    out = raw(conn_env.port, b"GET /health HTTP/1.1\r\nHost: x\r\nContent-Length: 100000\r\n\r\n" + b"x" * 100_000)
    assert out.startswith(b"HTTP/1.1 413 ")
    # and the server still answers
    assert raw(conn_env.port, b"GET /health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").startswith(
        b"HTTP/1.1 200 ")


def test_internal_failure_is_503_for_the_gateways_fail_mode_never_500_or_allow(client, conn_env, monkeypatch):
    def broken(device_id):
        raise sqlite3.OperationalError("disk I/O error")

    monkeypatch.setattr(conn_env.service.inventory, "get", broken)
    status, headers, body = authorize(client, "alice", "ApplF17ABCDEF01")
    assert status == 503 and headers["Retry-After"] == "5" and b"Allow" not in body
    assert "inventory" in json.loads(body)["reason"] and "disk I/O error" in json.loads(body)["reason"]
    monkeypatch.setattr(conn_env.service, "_decide", lambda *a, **k: 1 / 0)
    status, _, body = authorize(client, "alice", "ApplF17ABCDEF01")
    assert status == 503 and json.loads(body)["reason"].startswith("ZeroDivisionError")


# ------------------------------------------------------------------------------------------------
# Connections


def test_keep_alive_and_concurrency(conn_env):
    c = http.client.HTTPConnection("127.0.0.1", conn_env.port, timeout=10)
    authorize(c, "alice", "ApplF17ABCDEF01")
    sock = c.sock
    for _ in range(50):
        assert json.loads(authorize(c, "alice", "ApplF17ABCDEF01")[2])["result"] == "Allow"
    assert c.sock is sock  # one connection for all of them
    c.close()

    def worker(i: int) -> list[str]:
        w = http.client.HTTPConnection("127.0.0.1", conn_env.port, timeout=10)
        dev, user = (("ApplF17ABCDEF01", "alice") if i % 2 else ("ApplDMPQ99887766", "alice"))
        try:
            return [json.loads(authorize(w, user, dev)[2])["result"] for _ in range(20)]
        finally:
            w.close()

    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        results = list(pool.map(worker, range(16)))
    for i, r in enumerate(results):
        assert r == ["Allow" if i % 2 else "Deny"] * 20


async def test_the_gateways_connector_client_against_it(conn_env):
    """The exact client the gateway uses: parameters, keep-alive and answer format agree."""
    cc = ConnectorClient(Connector(url=f"{conn_env.url}/services/ActiveSync/Authorize", timeout_ms=2000))
    try:
        a = await cc.authorize("alice", "Apple-iPhone", "10.1.2.3", sync_url("ApplF17ABCDEF01"), "ApplF17ABCDEF01")
        assert a.allow and a.reason == "connector: Allow: device ApplF17ABCDEF01 managed and compliant"
        a = await cc.authorize("alice", "Apple-iPad", "10.1.2.3", sync_url("ApplDMPQ99887766"), "ApplDMPQ99887766")
        assert not a.allow and a.reason == "connector: Deny: device ApplDMPQ99887766 not managed"
        assert cc.connections_opened == 1
        a = await cc.authorize("", "x", "10.1.2.3", sync_url("ApplF17ABCDEF01"), "ApplF17ABCDEF01")
        assert not a.allow and a.reason == "connector rejected the request (HTTP 400)"
    finally:
        cc.close()


# ------------------------------------------------------------------------------------------------
# The inventory changes under a running connector


def devices_cli(db: Path, *args: str) -> None:
    r = subprocess.run([*easgate_argv(), "devices", "--db", str(db), *args],
                       capture_output=True, text=True, timeout=30, env=env())
    assert r.returncode == 0, r.stderr


def test_inventory_changes_are_seen_live(client, conn_env, tmp_path):
    def result(user: str, dev: str) -> str:
        return json.loads(authorize(client, user, dev)[2])["result"]

    assert result("alice", "ApplF17ABCDEF01") == "Allow"
    devices_cli(conn_env.db, "block", "ApplF17ABCDEF01")  # another process, same keep-alive connection
    assert json.loads(authorize(client, "alice", "ApplF17ABCDEF01")[2])["reason"] == \
        "device ApplF17ABCDEF01 blocked in the inventory"
    devices_cli(conn_env.db, "unblock", "ApplF17ABCDEF01")
    assert result("alice", "ApplF17ABCDEF01") == "Allow"
    assert result("erin", "ApplNEW000000001") == "Deny"
    devices_cli(conn_env.db, "add", "ApplNEW000000001", "--user", "erin", "--type", "iPhone")
    assert result("erin", "ApplNEW000000001") == "Allow"
    devices_cli(conn_env.db, "add", "ApplNEW000000001", "--user", "erin", "--noncompliant")
    assert result("erin", "ApplNEW000000001") == "Deny"
    devices_cli(conn_env.db, "remove", "ApplNEW000000001")
    assert result("erin", "ApplNEW000000001") == "Deny"
    f = tmp_path / "export.yaml"
    f.write_text("- {device_id: ApplDMPQ99887766, user: alice, managed: true}\n")
    assert result("alice", "ApplDMPQ99887766") == "Deny"
    devices_cli(conn_env.db, "import", str(f))
    assert result("alice", "ApplDMPQ99887766") == "Allow"
    status, _, body = get(client, "/health")
    assert status == 200 and json.loads(body)["devices"] == 6


def test_policy_file_changes_are_seen_live(client, conn_env, monkeypatch):
    monkeypatch.setattr(connector_service, "POLICY_CHECK_S", 0.0)

    def settled(user: str, device: str) -> dict:
        # a replaced file is applied at the next check (one changed in place never is: test_policy.py)
        return json.loads(authorize(client, user, device)[2])

    def replace(text: str) -> None:
        tmp = conn_env.policy_file.with_name("policy.yaml.new")
        tmp.write_text(text)
        os.replace(tmp, conn_env.policy_file)

    assert json.loads(authorize(client, "alice", "ApplF17ABCDEF01")[2])["result"] == "Allow"
    replace("mode: block\ndeny: {users: [alice]}\n# changed\n")
    doc = settled("alice", "ApplF17ABCDEF01")
    assert (doc["result"], doc["reason"]) == ("Deny", "user alice on deny list")
    replace("mode: [broken\n")  # the last good policy stays
    assert settled("alice", "ApplF17ABCDEF01")["result"] == "Deny"
    assert "YAML error" in json.loads(get(client, "/health")[2])["policy_error"]
    replace("mode: permit\n")
    doc = settled("alice", "UnknownDevice001")
    assert (doc["result"], doc["source"]) == ("Allow", "mode")


# ------------------------------------------------------------------------------------------------
# Decision log, last seen, simulate, log, health, version


def test_authorize_logs_and_records_last_seen_simulate_does_neither(client, conn_env):
    inv = conn_env.service.inventory
    status, _, body = get(client, "/services/ActiveSync/Simulate?user=alice&DeviceId=ApplDMPQ99887766&agent=Mail")
    doc = json.loads(body)
    assert (status, doc["result"], doc["simulated"]) == (200, "Deny", True)
    assert doc["device"]["managed"] is False and doc["device"]["model"] == "iPad Air"
    q = callout_query("alice", "Apple-iPhone", "10.0.0.9", sync_url("ApplF17ABCDEF01"), "")
    assert json.loads(get(client, f"/services/ActiveSync/Simulate?{q}")[2])["result"] == "Allow"
    assert get(client, "/services/ActiveSync/Simulate?DeviceId=x")[0] == 400
    inv.flush_seen()
    assert inv.get("ApplF17ABCDEF01").last_seen is None
    conn_env.service.log.flush()
    assert not conn_env.log.exists() or conn_env.log.read_text() == ""
    assert json.loads(get(client, "/services/ActiveSync/Log")[2]) == {"decisions": []}

    authorize(client, "alice", "ApplF17ABCDEF01", agent="Apple-iPhone15C2/2101.100")
    authorize(client, "mallory", "ApplF17ABCDEF01", agent="Evil\r\nInjected: yes")
    inv.flush_seen()
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ", inv.get("ApplF17ABCDEF01").last_seen)
    assert conn_env.service.log.flush()  # lines are written by the audit log's writer thread
    lines = [json.loads(ln) for ln in conn_env.log.read_text().splitlines()]
    assert len(lines) == 2
    first = lines[0]
    assert first | {"time": None, "latency_ms": None, "peer": None} == {
        "time": None, "client_ip": "203.0.113.7", "user": "alice", "device_id": "ApplF17ABCDEF01",
        "device_type": "iPhone", "command": "Sync", "agent": "Apple-iPhone15C2/2101.100", "decision": "allow",
        "reason": "device ApplF17ABCDEF01 managed and compliant", "source": "connector", "decided_by": "inventory",
        "latency_ms": None, "peer": None}
    assert isinstance(first["latency_ms"], float) and first["peer"].startswith("127.0.0.1:")
    # control characters from a client are escaped in the value itself, and the field is named
    assert lines[1]["agent"] == "Evil\\x0d\\x0aInjected: yes" and lines[1]["escaped"] == ["agent"]
    assert len(conn_env.log.read_text().splitlines()) == 2
    recent = json.loads(get(client, "/services/ActiveSync/Log?limit=1")[2])["decisions"]
    assert [d["user"] for d in recent] == ["mallory"]
    assert get(client, "/services/ActiveSync/Log?limit=0")[0] == 400


def test_health_and_version(client, conn_env):
    status, _, body = get(client, "/health")
    doc = json.loads(body)
    assert status == 200 and doc["status"] == "ok" and doc["devices"] == 6 and doc["mode"] == "block"
    assert doc["inventory"] == str(conn_env.db)
    conn_env.service.inventory.add("one-more", "alice")
    assert json.loads(get(client, "/health")[2])["devices"] == 7
    status, _, body = get(client, "/services/ActiveSync/Version")
    assert status == 200 and json.loads(body)["product"] == "easgate-connector"


# ------------------------------------------------------------------------------------------------
# easgate connector CONFIG


def test_easgate_connector_command(tmp_path):
    Inventory(tmp_path / "devices.db").add("ApplF17ABCDEF01", "alice")
    cfg = tmp_path / "connector.yaml"
    cfg.write_text("listen: {host: 127.0.0.1, port: 0}\ninventory: devices.db\n"
                   f"policy: {ROOT / 'policies' / 'activesync-policy.yaml'}\ndecision_log: logs/d.jsonl\n")
    p = ConnectorProcess(ConnectorProcess.argv(cfg), env=env()).wait_ready(30)
    try:
        line = p.wait_line(lambda ln: "listening at" in ln)
        assert "1 devices in" in line
        assert any("ignores them" in ln for ln in p.lines)  # the policy file's inventory is not used
        c = http.client.HTTPConnection("127.0.0.1", p.port, timeout=10)
        assert json.loads(authorize(c, "alice", "ApplF17ABCDEF01")[2])["result"] == "Allow"
        c.close()
        p.proc.send_signal(signal.SIGTERM)
        assert p.wait_exit(10) == 0
        assert "stopped" in p.output
        with pytest.raises(OSError):
            socket.create_connection(("127.0.0.1", p.port), timeout=1).close()
        assert json.loads((tmp_path / "logs" / "d.jsonl").read_text())["decision"] == "allow"
        assert Inventory(tmp_path / "devices.db").get("ApplF17ABCDEF01").last_seen is not None  # flushed on stop
    finally:
        p.kill()


@pytest.mark.parametrize("text, message", [
    ("listen: {prot: 9080}\ninventory: d.db\n", "listen.prot: unknown key (did you mean 'port'?)"),
    ("listen: {port: 99999}\ninventory: d.db\n", "listen.port: 99999 is out of range"),
    ("policy: nope.yaml\n", "inventory: missing (add it:"),
    ("inventory: d.db\npolicy: nope.yaml\n", "policy: file not found"),
    ("inventory: d.db\nlog: x\n", "log: unknown key"),
])
def test_connector_config_errors_name_file_key_and_fix(tmp_path, text, message):
    cfg = tmp_path / "connector.yaml"
    cfg.write_text(text)
    with pytest.raises(ConfigError) as e:
        load_connector_config(cfg)
    assert str(e.value).startswith(f"{cfg}: ") and message in str(e.value)
    r = subprocess.run([*easgate_argv(), "connector", str(cfg)], capture_output=True, text=True,
                       timeout=30, env=env()) if message.startswith("listen.prot") else None
    if r is not None:
        assert r.returncode == 2 and "config error" in r.stderr and message in r.stderr


def test_example_connector_config_loads():
    cfg = load_connector_config(ROOT / "policies" / "connector.yaml")
    assert (cfg.host, cfg.port) == ("127.0.0.1", 9080)
    assert cfg.policy == ROOT / "policies" / "activesync-policy.yaml"
    assert cfg.inventory == ROOT / "state" / "devices.db"


def test_certificate_identity_from_the_gateway_is_checked_and_logged(client, conn_env):
    """Device binding's certDeviceId/certUser/userSource (issue 16): logged, and a DeviceId that is not
    the certificate's is denied here too (defence in depth behind the gateway's own check)."""
    extra = {"certDeviceId": "ApplF17ABCDEF01", "certUser": "alice@example.test", "userSource": "certificate"}
    q = callout_query("alice", "Apple-iPhone", "203.0.113.7", sync_url("ApplF17ABCDEF01"), "ApplF17ABCDEF01", extra)
    doc = json.loads(get(client, f"/services/ActiveSync/Authorize?{q}")[2])
    assert doc["result"] == "Allow"
    q = callout_query("alice", "Apple-iPhone", "203.0.113.7", sync_url("ApplDMPQ99887766"), "ApplDMPQ99887766", extra)
    doc = json.loads(get(client, f"/services/ActiveSync/Authorize?{q}")[2])
    assert (doc["result"], doc["source"]) == ("Deny", "identity")
    assert doc["reason"] == "DeviceId ApplDMPQ99887766 does not match the certificate's ApplF17ABCDEF01 (certDeviceId)"
    assert conn_env.service.log.flush()  # lines are written by the audit log's writer thread
    lines = [json.loads(line) for line in conn_env.log.read_text().splitlines()]
    assert (lines[0]["cert_device_id"], lines[0]["cert_user"], lines[0]["user_source"]) == (
        "ApplF17ABCDEF01", "alice@example.test", "certificate")


# ------------------------------------------------------------------------------------------------
# One identity: the connector runs the gateway's engine on exactly what it was sent


@pytest.mark.parametrize("user,device,param,fragment", [
    ("alice", "A%20BCD", "A BCD", "is not 1-32 ASCII letters and digits"),
    ("alice", "ApplF17ABCDEF01", "applf17abcdef01", "does not match the url's DeviceId"),  # exact, no case folded
    (" alice", "ApplF17ABCDEF01", "same", "is not printable ASCII without spaces"),  # never stripped
])
def test_callout_values_outside_ms_ashttp_or_disagreeing_are_denied(client, user, device, param, fragment):
    status, _, body = authorize(client, user, device, param_device=param)
    doc = json.loads(body)
    assert (status, doc["result"], doc["source"]) == (200, "Deny", "identity"), doc
    assert fragment in doc["reason"]


@pytest.mark.parametrize("on_error", ["deny", "allow"])
def test_an_allow_whose_decision_log_line_cannot_be_written_is_a_deny(tmp_path, on_error):
    """The decision log is on a full disk (a symlink to /dev/full): with decision_log_on_error deny
    (the default) the real connector answers Deny and /health 503 once the writer has failed; with
    allow it keeps answering Allow. No allow goes out with its line silently lost."""
    Inventory(tmp_path / "devices.db").add("ApplF17ABCDEF01", "alice")
    (tmp_path / "d.jsonl").symlink_to("/dev/full")
    cfg = tmp_path / "connector.yaml"
    cfg.write_text("listen: {host: 127.0.0.1, port: 0}\ninventory: devices.db\ndecision_log: d.jsonl\n"
                   + ("" if on_error == "deny" else "decision_log_on_error: allow\n"))
    p = ConnectorProcess(ConnectorProcess.argv(cfg), env=env()).wait_ready(30)
    try:
        c = http.client.HTTPConnection("127.0.0.1", p.port, timeout=10)
        first = json.loads(authorize(c, "alice", "ApplF17ABCDEF01")[2])
        assert first["result"] == "Allow"  # queued: the writer has not failed yet, and keeps the line
        deadline = time.monotonic() + 10
        while True:  # the writer thread finds out the disk is full
            status, _, body = get(c, "/health")
            health = json.loads(body)
            if not health.get("decision_log_writable", True) or status == 503:
                break
            assert time.monotonic() < deadline, health
        doc = json.loads(authorize(c, "alice", "ApplF17ABCDEF01")[2])
        if on_error == "deny":
            assert status == 503 and "decision log cannot be written" in health["reason"]
            assert doc["result"] == "Deny" and doc["source"] == "audit"
            assert "decision_log_on_error=deny" in doc["reason"]
        else:
            assert status == 200 and doc["result"] == "Allow"
        c.close()
    finally:
        p.kill()
