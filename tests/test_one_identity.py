"""One identity and one precedence order, end to end (issue 12, items 4, 5 and 8).

What the connector is asked about, what the cache remembers, what the audit log says and what
Exchange receives are the same values; a value outside MS-ASHTTP's alphabet is denied, never
re-encoded; methods match exactly; an operator's `easgate devices block` beats the gateway's allow
lists. Two gateway processes for the module: one with a case-sensitive connector stand-in, one with
easgate's own connector (SQLite inventory, driven by the `easgate devices` CLI).
"""

from __future__ import annotations

import base64
import json
import subprocess
import time
from pathlib import Path

import pytest

from easgate.authz.audit import AuditLog
from easgate.authz.identity import encode_binary_query
from easgate.connector.service import ConnectorService, ConnectorThread
from easgate.connector.store import Inventory

from conftest import (
    FakeConnector,
    authz_config,
    easgate_argv,
    launch,
    request,
    write_config,
)

HEADERS = {"Authorization": "Basic " + base64.b64encode(b"alice:secret").decode(),
           "User-Agent": "Apple-iPhone14C2/2008.420", "MS-ASProtocolVersion": "16.1"}


def path(dev: str, dtype: str = "iPhone") -> str:
    return f"/Microsoft-Server-ActiveSync?Cmd=Sync&User=alice&DeviceId={dev}&DeviceType={dtype}"


def audit_lines(p: Path) -> list[dict]:
    return [json.loads(line) for line in p.read_text().splitlines()] if p.exists() else []


def last_audit(p: Path, n_before: int, timeout: float = 10) -> dict:
    deadline = time.monotonic() + timeout
    while len(audit_lines(p)) <= n_before:
        assert time.monotonic() < deadline, "no audit line"
        time.sleep(0.02)
    return audit_lines(p)[-1]


class Env:
    pass


@pytest.fixture(scope="module")
def fake(pki, exchange, mdm, tmp_path_factory):
    d = tmp_path_factory.mktemp("identity-fake")
    e = Env()
    e.conn = FakeConnector()  # answers Allow only for DeviceIds in .allowed, exactly (case-sensitive)
    cfg = authz_config(pki, exchange, mdm, d, connector=e.conn, cache={"allow_ttl_s": 300, "deny_ttl_s": 300})
    e.gw = launch(write_config(d, cfg), workers=1)
    e.audit, e.pki = d / "audit.jsonl", pki
    yield e
    e.gw.stop()
    e.conn.stop()


def post(e, target: str, method: str = "POST"):
    return request(e.gw.port, method, target, e.pki, headers=HEADERS, body=b"\x03\x01j\x00")


@pytest.mark.parametrize("raw,hexed", [("A%20BCD", "4120424344"), ("A%00BCD", "4100424344"),
                                       ("Appl%C3%A9", "4170706cc3a9")])
def test_a_device_id_outside_ms_ashttp_is_denied_not_decided_as_its_hex(fake, exchange, raw, hexed):
    # today's main asked the connector about the hex (4120424344) while Exchange read `A BCD`
    fake.conn.allowed = {hexed}
    calls = len(fake.conn.calls)
    n = len(audit_lines(fake.audit))
    r = post(fake, path(raw))
    assert r.status == 403
    line = last_audit(fake.audit, n)
    assert (line["decision"], line["source"], line["device_id"]) == ("deny", "identity", None)
    assert "is not 1-32 ASCII letters and digits (MS-ASHTTP 2.2.1.1.1.2)" in line["reason"]
    assert len(fake.conn.calls) == calls, "the connector was asked about a re-encoded DeviceId"
    assert not any(raw in q["path"] or hexed in q["path"] for q in exchange.requests())


def test_the_cache_never_folds_what_the_connector_distinguishes(fake, exchange):
    fake.conn.allowed = {"ALLOWED1"}
    assert post(fake, path("allowed1")).status == 403  # cold: the connector says Deny
    assert post(fake, path("ALLOWED1")).status == 200
    assert post(fake, path("allowed1")).status == 403  # today's main: 200 from ALLOWED1's cache entry
    asked = [q["DeviceId"] for q in fake.conn.calls if q["DeviceId"].lower() == "allowed1"]
    assert asked == ["allowed1", "ALLOWED1"]  # each asked once, exactly as sent; repeats from the cache
    seen = [q["path"] for q in exchange.requests() if "llowed1" in q["path"].lower()]
    assert len(seen) == 1 and "DeviceId=ALLOWED1" in seen[0]


def test_the_connector_the_audit_log_and_exchange_see_one_device_id(fake, exchange):
    fake.conn.allowed = {"ApplBIN0000001"}
    q = encode_binary_query(command="Sync", device_id=b"ApplBIN0000001", device_type="iPhone")
    n = len(audit_lines(fake.audit))
    assert post(fake, f"/Microsoft-Server-ActiveSync?{q}").status == 200
    assert fake.conn.calls[-1]["DeviceId"] == "ApplBIN0000001"
    assert last_audit(fake.audit, n)["device_id"] == "ApplBIN0000001"
    assert any(q in r["path"] for r in exchange.requests())


@pytest.mark.parametrize("method", ["options", "Options", "post"])
def test_methods_are_case_sensitive_and_only_OPTIONS_passes(fake, exchange, method):
    fake.conn.allowed = {"ApplF17ABCDEF01"}
    calls = len(fake.conn.calls)
    r = post(fake, path("ApplF17ABCDEF01"), method=method)
    # refused by the strict HTTP reading (400) or by the gate (403): never passed, never decided as POST
    assert r.status in (400, 403)
    assert len(fake.conn.calls) == calls
    assert not any(q["method"] == method for q in exchange.requests())
    assert post(fake, "/Microsoft-Server-ActiveSync", method="OPTIONS").status == 200


# ---------------------------------------------------------------------------------------------
# one precedence order: an operator's block beats the gateway's allow lists


@pytest.fixture(scope="module")
def easgate_connector(pki, exchange, mdm, tmp_path_factory):
    d = tmp_path_factory.mktemp("identity-connector")
    e = Env()
    e.db = d / "devices.db"
    inv = Inventory(e.db)
    inv.add("ApplLOST00000001", "alice")
    inv.add("ApplKEPT00000001", "alice")
    e.conn = ConnectorThread(ConnectorService(inv, None, AuditLog(None))).start()
    url = type("U", (), {"url": f"{e.conn.url}/services/ActiveSync/Authorize"})()
    policy = {"mode": "block", "allow": {"devices": ["ApplLOST00000001", "ApplOPEN00000001"],
                                         "device_types": ["WindowsMail"]}}
    cfg = authz_config(pki, exchange, mdm, d, policy=policy, connector=url)
    e.gw = launch(write_config(d, cfg), workers=1)
    e.audit, e.pki = d / "audit.jsonl", pki
    yield e
    e.gw.stop()
    e.conn.stop()


def devices_cli(db: Path, *args: str) -> None:
    r = subprocess.run(easgate_argv("devices", "--db", str(db), *args), capture_output=True, text=True, timeout=30)
    assert r.returncode == 0, r.stderr


def test_an_operator_block_beats_every_gateway_allow_list(easgate_connector, exchange):
    e = easgate_connector
    devices_cli(e.db, "block", "ApplLOST00000001")
    for dev, dtype in [("ApplLOST00000001", "iPhone"), ("ApplKEPT00000001", "WindowsMail")]:
        if dev == "ApplKEPT00000001":
            devices_cli(e.db, "block", dev)
        n = len(audit_lines(e.audit))
        r = post(e, path(dev, dtype))
        assert r.status == 403, (dev, r.body)  # today's main: 200, the allow list answered without asking
        line = last_audit(e.audit, n)
        assert (line["decision"], line["source"]) == ("deny", "block"), line
        assert line["reason"] == f"connector: Deny: device {dev} blocked in the inventory"
        assert not any(dev in q["path"] for q in exchange.requests())
    # the allow list still allows what nobody blocked (the connector does not know this device)
    assert post(e, path("ApplOPEN00000001")).status == 200
