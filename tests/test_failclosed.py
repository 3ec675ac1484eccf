"""Fail closed, end to end: a fault at any stage of the decision is a deny, audited as
`internal error`, and the upstream never receives the request (issue 12, item 2).

Two real gateway processes for the whole module, each with tests/support/faults.py loaded next to
it (a DeviceId containing `Fault<Stage>` makes that stage raise inside the gateway):

* `easgate run` with a policy file and its inventory (identity, lists, cache, single flight,
  inventory, audit write);
* `mitmdump -s addons/gateway.py` with a connector (the connector client, and the documented
  script form, where the gateway's addons are one subtree of mitmproxy's script loader).

Every faulty DeviceId is one the gateway would allow without the fault (a control request proves
each gateway forwards normally with the fault script loaded).
"""

from __future__ import annotations

import base64
import http.client
import json
import ssl
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from conftest import (
    ROOT,
    FakeConnector,
    GatewayProcess,
    authz_config,
    launch,
    mitmdump_argv,
    request,
    write_config,
)

FAULTS = str(ROOT / "tests" / "support" / "faults.py")
HEADERS = {"Authorization": "Basic " + base64.b64encode(b"alice:secret").decode(),
           "User-Agent": "Apple-iPhone14C2/2008.420", "MS-ASProtocolVersion": "16.1"}
STAGES = ["Identity", "Lists", "Cache", "Flight", "Inventory", "Audit"]


def device(stage: str) -> str:
    return f"Appl{stage}Fault{stage}1"[:32] if stage else "ApplHEALTHY0001"


def path(dev: str) -> str:
    return f"/Microsoft-Server-ActiveSync?Cmd=Sync&User=alice&DeviceId={dev}&DeviceType=iPhone"


def post(g, dev: str):
    return request(g.port, "POST", path(dev), g.pki, headers=HEADERS, body=b"\x03\x01j\x00")


def post_body(g, dev: str, body: bytes):
    return request(g.port, "POST", path(dev), g.pki, headers=HEADERS, body=body)


def audit_lines(p: Path) -> list[dict]:
    return [json.loads(line) for line in p.read_text().splitlines()] if p.exists() else []


def wait_audit(p: Path, n_before: int, want: int = 1, timeout: float = 10) -> list[dict]:
    """The audit lines written after the first n_before, once at least `want` arrived."""
    deadline = time.monotonic() + timeout
    while True:
        lines = audit_lines(p)[n_before:]
        if len(lines) >= want or time.monotonic() > deadline:
            return lines
        time.sleep(0.02)


class Gw:
    def __init__(self, proc: GatewayProcess, pki: Path, audit: Path) -> None:
        self.proc, self.port, self.pki, self.audit = proc, proc.port, pki, audit


@pytest.fixture(scope="module")
def policy_gw(pki, exchange, mdm, tmp_path_factory):
    d = tmp_path_factory.mktemp("failclosed-policy")
    inv = [{"device_id": device(s), "owner": "alice"} for s in ["", *STAGES]]
    cfg = authz_config(pki, exchange, mdm, d, policy={"mode": "block", "inventory": inv},
                       cache={"allow_ttl_s": 300, "deny_ttl_s": 30})
    # bodies over 64 KiB are streamed: mitmproxy sends the head upstream right after requestheaders
    g = launch(write_config(d, cfg), workers=1, extra=["-s", FAULTS, "--set", "stream_large_bodies=64k"])
    yield Gw(g, pki, d / "audit.jsonl")
    g.stop()


@pytest.fixture(scope="module")
def connector_gw(pki, exchange, mdm, tmp_path_factory):
    d = tmp_path_factory.mktemp("failclosed-connector")
    conn = FakeConnector()
    conn.allowed = {device(""), device("Connector")}
    cfg = authz_config(pki, exchange, mdm, d, connector=conn)
    g = GatewayProcess(mitmdump_argv(write_config(d, cfg), FAULTS)).wait_ready()
    yield Gw(g, pki, d / "audit.jsonl")
    g.stop()
    conn.stop()


def exchange_saw(exchange, dev: str) -> bool:
    return any(dev in r["path"] for r in exchange.requests())


def assert_denied_internal(g: Gw, exchange, dev: str, n_before: int, status: int = 403) -> None:
    lines = wait_audit(g.audit, n_before)
    assert any(line["reason"] == "internal error" and line["decision"] == "deny" and line["source"] == "internal"
               for line in lines), lines
    assert not any(line["decision"] == "allow" and line.get("device_id") == dev for line in lines), lines
    assert not exchange_saw(exchange, dev), f"{dev} reached Exchange"


@pytest.mark.parametrize("stage", STAGES)
def test_a_fault_at_any_stage_is_an_audited_deny_and_exchange_never_sees_it(policy_gw, exchange, stage):
    g = policy_gw
    assert post(g, device("")).status == 200  # control: the gateway forwards with the fault script loaded
    dev = device(stage)
    n = len(audit_lines(g.audit))
    r = post(g, dev)
    assert r.status == 403, r.body
    assert_denied_internal(g, exchange, dev, n)
    assert "internal error while deciding" in g.proc.output


@pytest.mark.parametrize("stage", ["Cache", "Lists"])
def test_a_fault_on_a_streamed_request_sends_nothing_upstream(policy_gw, exchange, stage):
    g = policy_gw
    body = b"\x03\x01" * 100_000  # 200 KB: streamed
    assert post_body(g, device(""), body).status == 200  # control: streamed through to Exchange
    assert any(r["body_len"] == len(body) for r in exchange.requests())
    dev = device(stage)
    n = len(audit_lines(g.audit))
    try:
        status = post_body(g, dev, body).status
    except (ConnectionError, ssl.SSLError, http.client.HTTPException):
        status = None  # a streamed request that is denied is reset (mitmproxy cannot answer it)
    assert status in (None, 403)
    assert_denied_internal(g, exchange, dev, n)


def test_everyone_waiting_on_a_failed_single_flight_is_denied(policy_gw, exchange):
    g = policy_gw
    dev = device("Flight")
    n = len(audit_lines(g.audit))
    with ThreadPoolExecutor(4) as ex:
        statuses = [f.result().status for f in [ex.submit(post, g, dev) for _ in range(4)]]
    assert statuses == [403] * 4
    lines = wait_audit(g.audit, n, want=4)
    assert [line["reason"] for line in lines] == ["internal error"] * 4
    assert not exchange_saw(exchange, dev)


@pytest.mark.parametrize("stage", ["Connector", "Identity", "Cache"])
def test_the_script_form_with_a_connector_fails_closed_too(connector_gw, exchange, stage):
    g = connector_gw
    assert post(g, device("")).status == 200  # control
    dev = device(stage)
    n = len(audit_lines(g.audit))
    r = post(g, dev)
    assert r.status == 403, r.body
    assert_denied_internal(g, exchange, dev, n)
