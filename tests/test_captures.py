"""Captured device traffic (tests/captures/, made by scripts/make_captures.py) as regression tests.

Every capture is replayed offline (`easgate replay` and plain `mitmdump -n -r` with the gateway
script) and against a live gateway process (mitmproxy's client replay, real TLS, the device's
client certificate), and the routes and decisions are asserted, both against what the capture
recorded and against the table below.
"""

from __future__ import annotations

import base64
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from mitmproxy import contentviews, http
from mitmproxy.test import taddons, tflow

from easgate.authz.identity import decode_binary_query, parse_request
from easgate.tools.capture import E, read_flows, redact_auth_value, sanitize_file, wbxml

from conftest import ROOT, easgate_argv
from support.procs import program_argv

CAPTURES = ROOT / "tests" / "captures"

# capture -> one row per flow: (route, decision, client cert, command)
EXPECTED = {
    "iphone-managed": [("activesync", "allow", "verified", c) for c in
                       (None, "Provision", "Provision", "FolderSync", "Sync", "Sync", "Ping", "SendMail")],
    "ipad-unmanaged": [("activesync", "allow", "none", None)]
                      + [("activesync", "deny", "none", c) for c in ("Provision", "Provision", "FolderSync")],
    "android-base64": [("activesync", "allow", "none", c) for c in
                       (None, "Provision", "Provision", "FolderSync", "Sync", "Ping", "SmartReply")],
    "outlook-mobile": [("activesync", "allow", "none", c) for c in (None, "Provision", "FolderSync", "Sync", "Ping")],
    "mdm-enrollment": [("mdm", "pass", "none", None)] * 2 + [("mdm", "pass", "verified", None)] * 2,
    # real software on both sides: pyactivesync through the gateway to SOGo (scripts/make_captures.py)
    "sogo-managed": [("activesync", "allow", "verified", c) for c in
                     ("Provision", "FolderSync", "Sync", "Sync", "ItemOperations", "ItemOperations", "SendMail",
                      "Ping")],
    "sogo-unmanaged": [("activesync", "deny", "none", c) for c in ("Provision", "FolderSync")],
}
AGENTS = {
    "iphone-managed": "Apple-iPhone15C2/2105.219",
    "ipad-unmanaged": "Apple-iPad13C1/2105.219",
    "android-base64": "Android/14-EAS-2.0",
    "outlook-mobile": "Outlook-iOS-Android/1.0",
    "mdm-enrollment": "Mozilla/5.0 (iPhone; CPU iPhone OS 17_4 like Mac OS X)",
    "sogo-managed": "python-requests/",  # pyactivesync sends requests' default User-Agent
    "sogo-unmanaged": "python-requests/",
}
NAMES = sorted(EXPECTED)
WBXML_ROOTS = {"Provision": "Provision", "FolderSync": "FolderSync", "Sync": "Sync", "Ping": "Ping",
               "SendMail": "SendMail", "SmartReply": "SmartReply", "ItemOperations": "ItemOperations"}


def capture(name: str) -> Path:
    return CAPTURES / f"{name}.mitm"


def flows_of(name: str) -> list[http.HTTPFlow]:
    return read_flows(capture(name))


def replay_config(tmp_path: Path, pki: Path, *, live=None, policy: dict | None = None, **changes) -> Path:
    """tests/captures/gateway.yaml with this run's gateway certificate (and, for a live gateway, its
    stand-ins and this PKI's device CAs: the live replay presents this PKI's device certificates)."""
    cfg = yaml.safe_load((CAPTURES / "gateway.yaml").read_text())
    cfg["tls"]["certificate"] = str(pki / "gateway-full.pem")
    cfg["tls"]["client_certs"]["ca"] = [str(CAPTURES / c) for c in cfg["tls"]["client_certs"]["ca"]]
    cfg["authorization"]["policy"] = str(CAPTURES / cfg["authorization"]["policy"])
    if policy is not None:
        (tmp_path / "policy.yaml").write_text(yaml.safe_dump(policy))
        cfg["authorization"]["policy"] = str(tmp_path / "policy.yaml")
    if live is not None:
        exchange, mdm = live
        cfg["tls"]["client_certs"]["ca"] = [str(pki / "device-ca.pem"), str(pki / "root-ca.pem")]
        cfg["pools"]["exchange"].update(servers=[exchange.url], ca=str(pki / "internal-ca.pem"))
        cfg["pools"]["mdm"].update(servers=[mdm.url])
        cfg["listen"]["port"] = 0
    for k, v in changes.items():
        section, _, key = k.partition("__")
        if key:
            cfg[section][key] = v
        else:
            cfg[section] = v
    p = tmp_path / "replay.yaml"
    p.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return p


def rows(results: list[dict], *, key: str = "replayed") -> list[tuple]:
    return [(r[key]["route"], r[key]["decision"], r[key]["cert"], r["command"]) for r in results]


def run(argv: list[str], timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, timeout=timeout)


# ---------------------------------------------------------------------------------------------
# The captures themselves


def test_inventory_is_complete():
    assert sorted(p.stem for p in CAPTURES.glob("*.mitm")) == NAMES
    assert (CAPTURES / "ca" / "device-ca.pem").is_file() and (CAPTURES / "ca" / "root-ca.pem").is_file()


@pytest.mark.parametrize("name", NAMES)
def test_capture_is_a_realistic_sanitized_session(name):
    flows = flows_of(name)
    assert len(flows) == len(EXPECTED[name])
    for f, (route, decision, cert, command) in zip(flows, EXPECTED[name]):
        req = f.request
        # with the port when a real HTTP client (requests) sends it, as RFC 9110 7.2 has it for a non-default port
        assert re.fullmatch(r"mail\.example\.test(:\d+)?", req.host_header) and f.client_conn.sni == "mail.example.test"
        assert f.client_conn.tls_version in ("TLSv1.2", "TLSv1.3")
        assert req.headers["User-Agent"].startswith(AGENTS[name])
        # recorded by the gateway: the decision is on the flow, the response is the real one
        assert f.metadata["easgate.route"] == route
        assert f.metadata["easgate.client_cert"]["status"] == cert
        assert f.response is not None
        assert f.response.status_code == (403 if decision == "deny" else 200)
        if decision in ("allow", "deny"):
            assert f.metadata["easgate.decision"]["allow"] is (decision == "allow")
            assert f.comment.startswith(f"{decision}: ")
        else:
            assert f.comment == f"route {route}"
        assert (f.marked == ":no_entry:") is (decision == "deny")
        # the device certificate, where the device presented one
        chain = f.client_conn.certificate_list
        assert bool(chain) is (cert == "verified")
        if chain:
            assert chain[0].to_cryptography().subject.rfc4514_string() == "CN=ApplF17ABCDEF01,O=easgate demo"
        # no password survives; the user does
        auth = req.headers.get("Authorization")
        if route == "activesync":
            user, _, password = base64.b64decode(auth.split()[1]).partition(b":")
            assert password == b"REDACTED" and user
        else:
            assert auth is None
        if req.method == "POST":
            assert req.headers["Content-Type"] == "application/vnd.ms-sync.wbxml" and req.raw_content
            ident = parse_request("POST", "https", req.host_header, req.path, req.headers, "127.0.0.1")
            assert ident.error is None and ident.command == command
            if name == "android-base64":
                assert ident.query_form == "base64" and ident.device_id_binary
                assert ident.protocol_version == "14.1" and "MS-ASProtocolVersion" not in req.headers
                decode_binary_query(base64.b64decode(req.path.split("?", 1)[1]))
            else:
                assert ident.query_form == "plain" and req.headers["MS-ASProtocolVersion"] == "16.1"
        elif route == "activesync":
            assert req.method == "OPTIONS" and not req.raw_content


def test_wbxml_encoder_matches_the_spec_example():
    # [MS-ASWBXML] 4.1: FolderSync with SyncKey 0
    assert wbxml(E("FolderHierarchy:FolderSync", E("FolderHierarchy:SyncKey", "0"))) == bytes.fromhex(
        "03016a00000756520330000101")


@pytest.mark.parametrize("name", [n for n in NAMES if n != "mdm-enrollment"])
def test_wbxml_bodies_render_with_mitmproxys_view(name):
    with taddons.context():
        for f in flows_of(name):
            if f.request.method != "POST":
                continue
            command = f.metadata["easgate.identity"]["command"]
            req = contentviews.prettify_message(f.request, f)
            assert req.view_name == "WBXML", (command, req.description)
            assert f"<{WBXML_ROOTS[command]}>" in req.text
            if command == "Provision":
                assert "<PolicyType>MS-EAS-Provisioning-WBXML</PolicyType>" in req.text
            if command == "FolderSync":
                assert "<SyncKey>0</SyncKey>" in req.text
            if command == "Ping":
                assert "<HeartbeatInterval>" in req.text
            if command in ("SendMail", "SmartReply"):
                assert "<MIME><![CDATA[From: " in req.text
            if f.response.raw_content and f.response.status_code == 200:  # Exchange's answers are WBXML too
                resp = contentviews.prettify_message(f.response, f)
                assert resp.view_name == "WBXML"
                if command == "Ping" and name.startswith("sogo-"):  # woken by a new mail: Status 2, the folder
                    assert "<Status>2</Status>" in resp.text and "<Folder>" in resp.text
                else:
                    assert "<Status>1</Status>" in resp.text
                if command == "Provision" and name.startswith("sogo-"):
                    # SOGo has no device policy: Policy Status 2 and no PolicyKey (MS-ASPROV 2.2.2.54.1)
                    assert "<Status>2</Status>\n        </Policy>" in resp.text and "PolicyKey" not in resp.text


def test_sanitize_changes_only_credentials(tmp_path):
    f = tflow.tflow(resp=True)
    f.request.headers["Authorization"] = "Basic " + base64.b64encode(b"CONTOSO\\alice:s3cr:et").decode()
    f.request.headers["Proxy-Authorization"] = "Bearer eyJhbGciOi.secret.token"
    f.request.headers["X-Other"] = "Basic " + base64.b64encode(b"not:touched").decode()
    f.response.headers["WWW-Authenticate"] = 'Basic realm="mail"'
    f.metadata["easgate.route"] = "activesync"
    src, dst = tmp_path / "in.mitm", tmp_path / "out.mitm"
    from mitmproxy import io

    with open(src, "wb") as fo:
        io.FlowWriter(fo).add(f)
    r = run(easgate_argv("capture", "--sanitize", str(src), str(dst)))
    assert r.returncode == 0, r.stderr
    assert "1 flows, 2 credential headers redacted" in r.stdout
    (before,), (after,) = read_flows(src), read_flows(dst)
    assert base64.b64decode(after.request.headers["Authorization"].split()[1]) == b"CONTOSO\\alice:REDACTED"
    assert after.request.headers["Proxy-Authorization"] == "Bearer REDACTED"
    for fl in (before, after):  # everything else is as it was
        del fl.request.headers["Authorization"]
        del fl.request.headers["Proxy-Authorization"]
    assert after.get_state() == before.get_state()
    # a second pass finds nothing left to redact, and sanitizing the captures changes nothing
    assert sanitize_file(dst, tmp_path / "again.mitm") == (1, 0)
    assert sanitize_file(capture("iphone-managed"), tmp_path / "cap.mitm")[1] == 0
    assert redact_auth_value("Basic !!!") == "Basic REDACTED" and redact_auth_value("opaque") == "REDACTED"


# ---------------------------------------------------------------------------------------------
# Offline replay


@pytest.mark.parametrize("name", NAMES)
def test_offline_replay_with_easgate(name, tmp_path, pki):
    cfg = replay_config(tmp_path, pki)
    r = run(easgate_argv("replay", str(capture(name)), "--config", str(cfg), "--json"))
    assert r.returncode == 0, r.stdout + r.stderr
    results = [json.loads(line) for line in r.stdout.splitlines()]
    assert rows(results) == EXPECTED[name]
    assert rows(results, key="recorded") == EXPECTED[name]
    assert not any(x["differs"] for x in results)
    assert f"{len(results)} flows: {len(results)} as recorded, 0 differ" in r.stderr
    # the table form
    t = run(easgate_argv("replay", str(capture(name)), "--config", str(cfg)))
    assert t.returncode == 0 and "flow" in t.stdout and "decision" in t.stdout and "reason" in t.stdout


@pytest.mark.parametrize("name", NAMES)
def test_offline_replay_with_plain_mitmdump(name, tmp_path, pki):
    cfg = replay_config(tmp_path, pki)
    report = tmp_path / "report.jsonl"
    r = run([*program_argv("mitmdump"), "-n", "-r", str(capture(name)), "-s", str(ROOT / "addons" / "replay.py"), "--set", "server=false",
             "--set", f"easgate_config={cfg}", "--set", "easgate_listen=127.0.0.1:0",
             "--set", "easgate_replay=true", "--set", f"easgate_replay_report={report}"])
    assert r.returncode == 0, r.stdout + r.stderr
    results = [json.loads(line) for line in report.read_text().splitlines()]
    assert rows(results) == EXPECTED[name] and rows(results, key="recorded") == EXPECTED[name]
    assert f"easgate replay: {len(results)} flows, 0 differ from the capture" in r.stdout


def test_replay_shows_what_a_policy_change_does(tmp_path, pki):
    policy = yaml.safe_load((CAPTURES / "policy.yaml").read_text())
    policy["inventory"] = [d for d in policy["inventory"] if d["device_id"] != "ApplF17ABCDEF01"]
    cfg = replay_config(tmp_path, pki, policy=policy)
    r = run(easgate_argv("replay", str(capture("iphone-managed")), str(capture("ipad-unmanaged")),
                         "--config", str(cfg)))
    assert r.returncode == 1, r.stdout + r.stderr
    lines = r.stdout.splitlines()
    changed = [line for line in lines if line.startswith("!")]
    assert len(changed) == 7 and all("deny (" in line for line in changed)  # every iPhone POST
    assert "recorded: route=activesync cert=verified allow (inventory): device ApplF17ABCDEF01 managed" in r.stdout
    assert "12 flows: 5 as recorded, 7 differ" in r.stdout


def test_replay_reports_connections_a_stricter_gateway_refuses(tmp_path, pki):
    cfg = replay_config(tmp_path, pki)
    data = yaml.safe_load(cfg.read_text())
    data["tls"]["client_certs"]["mode"] = "required"
    cfg.write_text(yaml.safe_dump(data))
    r = run(easgate_argv("replay", str(capture("mdm-enrollment")), "--config", str(cfg), "--json"))
    assert r.returncode == 1
    decisions = [json.loads(line)["replayed"]["decision"] for line in r.stdout.splitlines()]
    assert decisions == ["refused", "refused", "pass", "pass"]


def test_certificates_are_verified_as_of_the_capture(tmp_path, pki):
    """--cert-time capture (default) verifies a device certificate at the capture's time, not now.

    The demo PKI has no certificate that was valid once and has expired since (its CAs start
    yesterday), so the capture here is dated when its not-yet-valid certificate will be valid."""
    from cryptography.hazmat.primitives import serialization
    from mitmproxy import certs, io

    from easgate.tools.pki import load_certs

    chain = [certs.Cert.from_pem(c.public_bytes(serialization.Encoding.PEM))
             for c in load_certs(pki / "device-notyet.pem")]
    then = chain[0].to_cryptography().not_valid_before_utc.timestamp() + 3600
    flows = flows_of("mdm-enrollment")[2:]
    for f in flows:
        f.client_conn.certificate_list = chain
        f.client_conn.timestamp_start = then
    path = tmp_path / "dated.mitm"
    with open(path, "wb") as fo:
        w = io.FlowWriter(fo)
        for f in flows:
            w.add(f)
    cfg = replay_config(tmp_path, pki)
    data = yaml.safe_load(cfg.read_text())
    data["tls"]["client_certs"]["ca"] = [str(pki / "device-ca.pem"), str(pki / "root-ca.pem")]
    cfg.write_text(yaml.safe_dump(data))
    at_capture = run(easgate_argv("replay", str(path), "--config", str(cfg), "--json"))
    assert at_capture.returncode == 0, at_capture.stdout + at_capture.stderr
    assert {json.loads(line)["replayed"]["cert"] for line in at_capture.stdout.splitlines()} == {"verified"}
    now = run(easgate_argv("replay", str(path), "--config", str(cfg), "--json", "--cert-time", "now"))
    assert now.returncode == 1
    got = [json.loads(line)["replayed"] for line in now.stdout.splitlines()]
    assert {g["decision"] for g in got} == {"refused"} and all("not valid before" in g["reason"] for g in got)


def test_replay_errors_exit_2(tmp_path, pki):
    assert run(easgate_argv("replay", str(tmp_path / "nope.mitm"), "--config", "x.yaml")).returncode == 2
    bad = tmp_path / "bad.yaml"
    bad.write_text("tls: {certificate: nope.pem}\npools: {}\nroutes: []\n")
    r = run(easgate_argv("replay", str(capture("ipad-unmanaged")), "--config", str(bad)))
    assert r.returncode == 2 and "config error" in r.stderr and "tls.certificate: file not found" in r.stderr


def test_offline_replay_with_deny_action_drop(tmp_path, pki):
    cfg = replay_config(tmp_path, pki)
    data = yaml.safe_load(cfg.read_text())
    data["authorization"]["deny"] = {"action": "drop"}
    cfg.write_text(yaml.safe_dump(data))
    r = run(easgate_argv("replay", str(capture("ipad-unmanaged")), "--config", str(cfg), "--json", "-v"))
    assert r.returncode == 0 and "Traceback" not in r.stderr and "Addon error" not in r.stderr, r.stderr


# ---------------------------------------------------------------------------------------------
# Client replay against a live gateway


@pytest.mark.parametrize("name", NAMES)
def test_client_replay_against_a_live_gateway(name, tmp_path, pki, exchange, mdm, start_gateway):
    cfg = replay_config(tmp_path, pki, live=(exchange, mdm))
    saved = tmp_path / "gateway-flows.mitm"
    # plain mitmdump with the gateway script, saving what it decided (mitmproxy's -w)
    g = start_gateway(cfg, via="mitmdump", extra=["-w", str(saved)])
    r = run(easgate_argv("replay", str(capture(name)), "--target", f"127.0.0.1:{g.port}",
                         "--cafile", str(pki / "public-ca.pem"), "--client-certs", str(pki), "--json"))
    assert r.returncode == 0, r.stdout + r.stderr + g.output
    results = [json.loads(line) for line in r.stdout.splitlines()]
    recorded = flows_of(name)
    assert [x["replayed"]["status"] for x in results] == [f.response.status_code for f in recorded]
    g.stop()
    live = read_flows(saved)
    assert len(live) == len(recorded)
    got = [(f.metadata.get("easgate.route"),
            ("allow" if f.metadata["easgate.decision"]["allow"] else "deny") if "easgate.decision" in f.metadata
            else "pass", f.metadata["easgate.client_cert"]["status"],
            (f.metadata.get("easgate.identity") or {}).get("command")) for f in live]
    assert got == EXPECTED[name]
    for old, new in zip(recorded, live):  # the same requests reached the gateway, decided the same way
        assert new.request.method == old.request.method and new.request.path == old.request.path
        assert new.request.raw_content == old.request.raw_content
        assert new.client_conn.sni == "mail.example.test"
        for key in ("easgate.route", "easgate.decision"):
            assert new.metadata.get(key) == old.metadata.get(key)
    # what the upstreams saw: exactly the allowed requests, the device certificate only where presented
    allowed = [f for f, e in zip(recorded, EXPECTED[name]) if e[1] != "deny"]
    seen = exchange.requests() if name != "mdm-enrollment" else mdm.requests()
    assert [(s["method"], s["path"], s["body_len"]) for s in seen] == [
        (f.request.method, f.request.path, len(f.request.raw_content or b"")) for f in allowed]
    if name == "mdm-enrollment":
        certs = [dict((k.lower(), v) for k, v in s["headers"]).get("nsclientcert") for s in seen]
        assert [bool(c) for c in certs] == [False, False, True, True]


def test_the_capture_script_regenerates_them(tmp_path, pki):
    """scripts/make_captures.py: real clients through a real gateway, mitmproxy's -w, then --sanitize."""
    import shutil

    out = tmp_path / "captures"
    out.mkdir()
    for f in ("gateway.yaml", "policy.yaml"):
        shutil.copy(CAPTURES / f, out / f)
    r = run([sys.executable, str(ROOT / "scripts" / "make_captures.py"), "--out", str(out),
             "--only", "ipad-unmanaged", "--only", "mdm-enrollment"], timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "ipad-unmanaged.mitm: 4 flows, 4 credential headers redacted" in r.stdout
    assert sorted(p.name for p in out.glob("*.mitm")) == ["ipad-unmanaged.mitm", "mdm-enrollment.mitm"]
    cfg = yaml.safe_load((out / "gateway.yaml").read_text())
    cfg["tls"]["certificate"] = str(pki / "gateway-full.pem")
    (out / "replay.yaml").write_text(yaml.safe_dump(cfg))
    for name in ("ipad-unmanaged", "mdm-enrollment"):
        rep = run(easgate_argv("replay", str(out / f"{name}.mitm"), "--config", str(out / "replay.yaml"), "--json"))
        assert rep.returncode == 0, rep.stdout + rep.stderr
        results = [json.loads(line) for line in rep.stdout.splitlines()]
        assert rows(results) == rows(results, key="recorded") == EXPECTED[name]
        for f in read_flows(out / f"{name}.mitm"):
            auth = f.request.headers.get("Authorization")
            assert auth is None or base64.b64decode(auth.split()[1]).endswith(b":REDACTED")
