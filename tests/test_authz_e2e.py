"""ActiveSync authorization end to end: a real gateway, a real HTTP connector, real upstreams."""

from __future__ import annotations

import base64
import http.client
import json
import os
import ssl
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import yaml

from easgate.authz.identity import encode_binary_query

import conftest
from conftest import HOSTNAME, request

IPHONE = "ApplF17ABCDEF01"
IPAD = "ApplDMPQ99887766"
BASIC_ALICE = {"Authorization": "Basic " + base64.b64encode(b"CONTOSO\\alice:secret").decode(),
               "User-Agent": "Apple-iPhone14C2/2008.420", "MS-ASProtocolVersion": "16.1"}


def sync_path(device: str, cmd: str = "Sync", dtype: str = "iPhone") -> str:
    return f"/Microsoft-Server-ActiveSync?Cmd={cmd}&User=alice&DeviceId={device}&DeviceType={dtype}"


POLICY = {
    "mode": "block",
    "allow": {"users": ["svc-sync"]},
    "deny": {"user_agents": ["*BlackBerry*"]},
    "inventory": [{"device_id": IPHONE, "owner": "alice", "compliant": True},
                  {"device_id": "ApplNONCOMPLIANT1", "owner": "alice", "compliant": False}],
}


def authz_config(pki, exchange, mdm, tmp_path, *, connector=None, policy=POLICY, **auth):
    auth.setdefault("cache", {"allow_ttl_s": 300, "deny_ttl_s": 30})
    return conftest.authz_config(pki, exchange, mdm, tmp_path, policy=policy, connector=connector, **auth)


def audit(tmp_path) -> list[dict]:
    p = tmp_path / "audit.jsonl"
    return [json.loads(l) for l in p.read_text().splitlines()] if p.exists() else []


def exchange_posts(exchange) -> list[dict]:
    return [r for r in exchange.requests() if r["method"] == "POST"]


# ---------------------------------------------------------------------------------------------


def test_policy_file_managed_allowed_unmanaged_denied(start_gateway, pki, exchange, mdm, tmp_path):
    g = start_gateway(authz_config(pki, exchange, mdm, tmp_path))
    r = request(g.port, "POST", sync_path(IPHONE), pki, headers=BASIC_ALICE, body=b"\x03\x01")
    assert r.status == 200
    r = request(g.port, "POST", sync_path(IPAD, dtype="iPad"), pki, headers=BASIC_ALICE, body=b"\x03\x01")
    assert r.status == 403 and b"not allowed" in r.body
    posts = exchange_posts(exchange)
    assert len(posts) == 1 and IPHONE in posts[0]["path"]
    log = audit(tmp_path)
    assert [(l["device_id"], l["decision"], l["source"]) for l in log] == [
        (IPHONE, "allow", "inventory"), (IPAD, "deny", "mode")]
    assert log[1]["reason"] == f"device {IPAD} not managed"
    assert log[0]["user"] == "CONTOSO\\alice" and log[0]["client_ip"] == "127.0.0.1"
    assert {"time", "device_type", "command", "agent", "latency_ms"} <= set(log[0])


def test_connector_backend_and_static_lists_first(start_gateway, pki, exchange, mdm, tmp_path, connector):
    connector.allowed = {IPAD}
    g = start_gateway(authz_config(pki, exchange, mdm, tmp_path, connector=connector))
    assert request(g.port, "POST", sync_path(IPAD, dtype="iPad"), pki, headers=BASIC_ALICE).status == 200
    # the inventory does not matter with a connector: the connector says Deny for the iPhone
    assert request(g.port, "POST", sync_path(IPHONE), pki, headers=BASIC_ALICE).status == 403
    # the policy's deny list wins before any callout
    bb = dict(BASIC_ALICE, **{"User-Agent": "BlackBerry9700/5.0"})
    assert request(g.port, "POST", sync_path("BBX1"), pki, headers=bb).status == 403
    assert [c["DeviceId"] for c in connector.calls] == [IPAD, IPHONE]
    call = connector.calls[0]
    assert call["user"] == "CONTOSO\\alice" and call["agent"] == "Apple-iPhone14C2/2008.420"
    assert call["ip"] == "127.0.0.1" and call["resultType"] == "json"
    assert base64.b64decode(call["url"]).decode() == f"https://{HOSTNAME}:{g.port}{sync_path(IPAD, dtype='iPad')}"
    sources = [l["source"] for l in audit(tmp_path)]
    assert sources == ["connector", "connector", "policy"]


def test_fifty_concurrent_requests_one_callout(start_gateway, pki, exchange, mdm, tmp_path, connector):
    connector.allowed = {IPHONE}
    connector.delay_s = 0.3
    g = start_gateway(authz_config(pki, exchange, mdm, tmp_path, connector=connector))
    with ThreadPoolExecutor(50) as ex:
        statuses = list(ex.map(lambda i: request(g.port, "POST", sync_path(IPHONE), pki, headers=BASIC_ALICE).status,
                               range(50)))
    assert statuses == [200] * 50
    assert len(connector.calls) == 1
    assert len(exchange_posts(exchange)) == 50
    # and a cached decision needs no callout at all
    assert request(g.port, "POST", sync_path(IPHONE), pki, headers=BASIC_ALICE).status == 200
    assert len(connector.calls) == 1
    assert audit(tmp_path)[-1]["source"] == "cache"


@pytest.mark.parametrize("behaviour", ["down", "slow", "garbage", "error500", "close"])
@pytest.mark.parametrize("fail_mode", ["deny", "allow", "stale"])
def test_connector_failures_under_each_fail_mode(start_gateway, pki, exchange, mdm, tmp_path, connector,
                                                 behaviour, fail_mode):
    connector.allowed = {IPHONE}
    cfg = authz_config(pki, exchange, mdm, tmp_path, connector=connector, on_connector_error=fail_mode,
                       cache={"allow_ttl_s": 0, "deny_ttl_s": 0})
    g = start_gateway(cfg)
    # a first, healthy answer that the stale mode may reuse
    assert request(g.port, "POST", sync_path(IPHONE), pki, headers=BASIC_ALICE).status == 200
    if behaviour == "down":
        connector.stop()
    elif behaviour == "slow":
        connector.delay_s = 1.5  # past the 500 ms timeout
    else:
        connector.behaviour = behaviour
    t0 = time.monotonic()
    known = request(g.port, "POST", sync_path(IPHONE), pki, headers=BASIC_ALICE).status
    unknown = request(g.port, "POST", sync_path(IPAD, dtype="iPad"), pki, headers=BASIC_ALICE).status
    assert time.monotonic() - t0 < 5  # no client waits past the timeout
    expected = {"deny": (403, 403), "allow": (200, 200), "stale": (200, 403)}[fail_mode]
    assert (known, unknown) == expected
    log = audit(tmp_path)[-2:]
    assert [l["source"] for l in log] == ["fail-mode", "fail-mode"]
    assert f"on_connector_error={fail_mode}" in log[1]["reason"] or fail_mode == "stale"
    assert f"on_connector_error={fail_mode}" in g.output


def test_garbage_is_never_read_as_allow():
    from easgate.gateway.xnc import ConnectorError, parse_answer

    assert parse_answer(200, b'{"result": "Allow"}').allow
    assert parse_answer(200, b"Allow\r\n").allow
    for deny in (b'{"result": "Disallow"}', b'{"Result": "Deny", "reason": "not managed"}', b"Disallow", b"Deny"):
        assert not parse_answer(200, deny).allow
    for garbage in (b"", b"Allowed", b"<html>Allow</html>", b'{"result": true}', b"[\"Allow\"]", b"{bad json",
                    b'{"result": "Allow"', b"AllowAllow"):
        with pytest.raises(ConnectorError):
            parse_answer(200, garbage)
    with pytest.raises(ConnectorError):
        parse_answer(500, b'{"result": "Allow"}')


def replace_file(path, text: str) -> None:
    """As an operator should change a watched file: write a new one, rename it over (atomic)."""
    path.with_name(path.name + ".new").write_text(text)
    os.replace(path.with_name(path.name + ".new"), path)


def test_policy_edited_on_disk_and_broken_policy_keeps_last_good(start_gateway, pki, exchange, mdm, tmp_path):
    g = start_gateway(authz_config(pki, exchange, mdm, tmp_path), extra=["--set", "easgate_policy_poll_ms=100"])
    assert request(g.port, "POST", sync_path(IPAD, dtype="iPad"), pki, headers=BASIC_ALICE).status == 403
    pol = json.loads(json.dumps(POLICY))
    pol["inventory"].append({"device_id": IPAD, "owner": "alice", "compliant": True})
    replace_file(tmp_path / "policy.yaml", yaml.safe_dump(pol))
    deadline = time.monotonic() + 10
    while request(g.port, "POST", sync_path(IPAD, dtype="iPad"), pki, headers=BASIC_ALICE).status != 200:
        assert time.monotonic() < deadline, g.output
        time.sleep(0.3)
    assert "policy reloaded" in g.output
    replace_file(tmp_path / "policy.yaml", "mode: blokk\n")
    deadline = time.monotonic() + 10
    while "keeping the last good policy" not in g.output:
        assert time.monotonic() < deadline, g.output
        time.sleep(0.3)
    assert request(g.port, "POST", sync_path(IPAD, dtype="iPad"), pki, headers=BASIC_ALICE).status == 200
    assert "policy.yaml" in [l for l in g.lines if "keeping the last good policy" in l][0]


def test_options_passes_and_unlisted_get_is_denied(start_gateway, pki, exchange, mdm, tmp_path):
    g = start_gateway(authz_config(pki, exchange, mdm, tmp_path))
    assert request(g.port, "OPTIONS", "/Microsoft-Server-ActiveSync", pki).status == 200
    r = request(g.port, "GET", sync_path(IPHONE), pki, headers=BASIC_ALICE)
    assert r.status == 403
    assert [x["method"] for x in exchange.requests()] == ["OPTIONS"]
    log = audit(tmp_path)
    assert [(l["method"], l["decision"], l["source"]) for l in log] == [("OPTIONS", "allow", "filter"),
                                                                          ("GET", "deny", "filter")]


@pytest.mark.parametrize("bad", [
    {"Authorization": "Basic !!!notbase64"},
    {"Authorization": "Basic " + base64.b64encode(b"nocolon").decode()},
])
def test_malformed_identity_is_denied_with_a_reason(start_gateway, pki, exchange, mdm, tmp_path, bad):
    g = start_gateway(authz_config(pki, exchange, mdm, tmp_path))
    r = request(g.port, "POST", sync_path(IPHONE), pki, headers=dict(BASIC_ALICE, **bad))
    assert r.status == 403
    r2 = request(g.port, "POST", "/Microsoft-Server-ActiveSync?Cmd=Sync&User=alice&DeviceType=iPhone", pki,
                 headers=BASIC_ALICE)
    assert r2.status == 403
    r3 = request(g.port, "POST", "/Microsoft-Server-ActiveSync?Cmd=Sync&DeviceId=A&DeviceId=B&User=alice", pki,
                 headers=BASIC_ALICE)
    assert r3.status == 403
    assert exchange_posts(exchange) == []
    assert all(l["decision"] == "deny" and l["reason"] for l in audit(tmp_path))


def test_base64_query_with_binary_device_id(start_gateway, pki, exchange, mdm, tmp_path):
    raw_id = bytes.fromhex("00ff10203040506070809a0b0c0d0e0f")
    pol = json.loads(json.dumps(POLICY))
    pol["inventory"].append({"device_id": raw_id.hex(), "owner": "alice"})
    g = start_gateway(authz_config(pki, exchange, mdm, tmp_path, policy=pol))
    q = encode_binary_query(command="Sync", device_id=raw_id, device_type="Android", version="14.1")
    r = request(g.port, "POST", f"/Microsoft-Server-ActiveSync?{q}", pki,
                headers={"Authorization": BASIC_ALICE["Authorization"], "User-Agent": "Android-Mail/2023.01.01"})
    assert r.status == 200
    q2 = encode_binary_query(command="Sync", device_id=b"\x01" * 16, device_type="Android", version="14.1")
    assert request(g.port, "POST", f"/Microsoft-Server-ActiveSync?{q2}", pki, headers=BASIC_ALICE).status == 403
    log = audit(tmp_path)
    assert log[0]["device_id"] == raw_id.hex() and log[0]["decision"] == "allow"
    assert log[1]["device_id"] == "01" * 16 and log[1]["decision"] == "deny"


def test_streamed_body_of_denied_device_never_reaches_exchange(start_gateway, pki, exchange, mdm, tmp_path):
    g = start_gateway(authz_config(pki, exchange, mdm, tmp_path), extra=["--set", "stream_large_bodies=1k"])
    body = b"\x03\x01" * 500_000
    try:
        r = request(g.port, "POST", sync_path(IPAD, dtype="iPad"), pki, headers=BASIC_ALICE, body=body)
        assert r.status == 403
    except (ConnectionError, ssl.SSLError, http.client.HTTPException):
        pass  # a streamed request that is denied is reset: the client sees the connection go
    assert request(g.port, "POST", sync_path(IPHONE), pki, headers=BASIC_ALICE, body=body).status == 200
    posts = exchange_posts(exchange)
    assert len(posts) == 1 and IPHONE in posts[0]["path"] and posts[0]["body_len"] == len(body)


def test_deny_action_drop_and_custom_status(start_gateway, pki, exchange, mdm, tmp_path):
    g = start_gateway(authz_config(pki, exchange, mdm, tmp_path, deny={"action": "drop"}))
    with pytest.raises((ConnectionError, ssl.SSLError, OSError)):
        request(g.port, "POST", sync_path(IPAD, dtype="iPad"), pki, headers=BASIC_ALICE)
    assert exchange_posts(exchange) == []
    g2 = start_gateway(authz_config(pki, exchange, mdm, tmp_path, deny={"status": 503, "retry_after_s": 600}))
    r = request(g2.port, "POST", sync_path(IPAD, dtype="iPad"), pki, headers=BASIC_ALICE)
    assert r.status == 503 and r.headers["Retry-After"] == "600"


def test_cached_allow_does_not_bypass_the_user_agent_deny_list(start_gateway, pki, exchange, mdm, tmp_path):
    g = start_gateway(authz_config(pki, exchange, mdm, tmp_path))
    assert request(g.port, "POST", sync_path(IPHONE), pki, headers=BASIC_ALICE).status == 200
    bb = dict(BASIC_ALICE, **{"User-Agent": "BlackBerry9700/5.0.0.1036"})
    assert request(g.port, "POST", sync_path(IPHONE), pki, headers=bb).status == 403
    assert audit(tmp_path)[-1]["source"] == "policy"


def test_a_request_the_connector_rejects_is_denied_even_when_failing_open(start_gateway, pki, exchange, mdm,
                                                                          tmp_path, connector):
    # A client must not be able to pick fail-open by making its own request unacceptable to the connector.
    connector.behaviour = "reject400"
    g = start_gateway(authz_config(pki, exchange, mdm, tmp_path, connector=connector, on_connector_error="allow"))
    r = request(g.port, "POST", sync_path(IPAD, dtype="iPad"), pki,
                headers=dict(BASIC_ALICE, **{"User-Agent": "x" * 3000}))
    assert r.status == 403
    assert audit(tmp_path)[-1]["reason"] == "connector rejected the request (HTTP 400)"
    assert exchange_posts(exchange) == []
