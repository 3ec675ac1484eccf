"""Denials a phone understands (deny.mode: activesync): the command's own WBXML response with the
common status 129 DeviceIsBlockedForThisUser for EAS 14.0+, HTTP 403 before 14.0, decoded again with
mitmproxy's own WBXML decoder; end to end through a real gateway process."""

from __future__ import annotations

import base64
import json
import xml.etree.ElementTree as ET

import pytest
from mitmproxy.contrib.wbxml.ASCommandResponse import ASCommandResponse

from easgate.authz import eas_deny
from easgate.authz.identity import encode_binary_query

import conftest
from conftest import request

IPAD = "ApplDMPQ99887766"
PHONE_COMMANDS = sorted(eas_deny.COMMAND_BODIES)
POLICY = {"mode": "block", "inventory": [{"device_id": "ApplF17ABCDEF01", "owner": "alice", "compliant": True}]}

# where the Status of each command response is ([MS-ASCMD] 2.2.3.177.x, [MS-ASPROV] 2.2.2.54)
STATUS_PATH = {"GetItemEstimate": "Response/Status", "MoveItems": "Response/Status", "MeetingResponse": "Result/Status"}


def decode(body: bytes) -> ET.Element:
    """mitmproxy's WBXML decoder (its own code page tables), then an XML parser."""
    xml = ASCommandResponse(body).xmlString
    root = ET.fromstring(xml)
    for el in root.iter():  # namespaces play no part in where the Status sits
        el.tag = el.tag.rpartition("}")[2]
    return root


def test_every_phone_command_is_covered():
    assert {"FolderSync", "Sync", "Ping", "SendMail", "SmartForward", "SmartReply", "ItemOperations",
            "GetItemEstimate", "MoveItems", "Provision", "Settings", "Search", "FolderCreate", "FolderDelete",
            "FolderUpdate", "MeetingResponse", "ResolveRecipients", "ValidateCert"} <= set(PHONE_COMMANDS)


@pytest.mark.parametrize("version", sorted(eas_deny.WBXML_VERSIONS))
@pytest.mark.parametrize("command", PHONE_COMMANDS)
def test_blocked_answer_is_the_commands_own_response_with_status_129(command, version):
    a = eas_deny.blocked(command, version, "denied")
    assert a.status == 200 and a.headers["Content-Type"] == "application/vnd.ms-sync.wbxml"
    root = decode(a.body)
    assert root.tag == command
    status = root.findall(STATUS_PATH.get(command, "Status"))
    assert [s.text for s in status] == ["129"]
    assert a.eas_status == 129 and "DeviceIsBlockedForThisUser" in a.why


@pytest.mark.parametrize("version", ["2.5", "12.0", "12.1", None])
def test_before_14_there_are_no_common_status_codes_so_403(version):
    a = eas_deny.blocked("Sync", version, "Access denied by easgate\n")
    assert (a.status, a.body, a.eas_status) == (403, b"Access denied by easgate\n", None)


def test_getattachment_has_no_wbxml_response_so_403():
    assert eas_deny.blocked("GetAttachment", "14.1", "x").status == 403


def test_throttled_is_503_with_retry_after():
    a = eas_deny.throttled(120, "slow down\n")
    assert a.status == 503 and a.headers["Retry-After"] == "120"


# ---------------------------------------------------------------------------------------------
# End to end


def audit(tmp_path) -> list[dict]:
    return [json.loads(line) for line in (tmp_path / "audit.jsonl").read_text().splitlines()]


def as_path(cmd: str, device: str = IPAD) -> str:
    return f"/Microsoft-Server-ActiveSync?Cmd={cmd}&User=alice&DeviceId={device}&DeviceType=iPad"


def headers(version: str) -> dict:
    return {"Authorization": "Basic " + base64.b64encode(b"alice:pw").decode(), "MS-ASProtocolVersion": version,
            "Content-Type": "application/vnd.ms-sync.wbxml"}


def test_activesync_mode_end_to_end(start_gateway, pki, exchange, mdm, tmp_path):
    cfg = conftest.authz_config(pki, exchange, mdm, tmp_path, policy=POLICY, deny={"mode": "activesync"})
    g = start_gateway(cfg)
    # 14.1 FolderSync, 16.1 Ping: HTTP 200 and the command's response with Status 129
    for cmd, version in (("FolderSync", "14.1"), ("Ping", "16.1"), ("SendMail", "14.0")):
        r = request(g.port, "POST", as_path(cmd), pki, headers=headers(version), body=b"\x03\x01\x6a\x00")
        assert r.status == 200, (cmd, r.status, r.body)
        assert r.headers["Content-Type"] == "application/vnd.ms-sync.wbxml"
        root = decode(r.body)
        assert root.tag == cmd and root.find("Status").text == "129"
    # the base64 query form carries the version in its first byte (141 = 14.1)
    q = encode_binary_query(command="Sync", device_id=IPAD, device_type="iPad", version="14.1")
    r = request(g.port, "POST", f"/Microsoft-Server-ActiveSync?{q}", pki,
                headers={"Authorization": headers("14.1")["Authorization"]}, body=b"\x03\x01\x6a\x00")
    assert r.status == 200 and decode(r.body).find("Status").text == "129"
    # a 12.1 client gets HTTP 403, as from Exchange
    r = request(g.port, "POST", as_path("Sync"), pki, headers=headers("12.1"), body=b"\x03\x01\x6a\x00")
    assert r.status == 403
    assert not [x for x in exchange.requests() if x["method"] == "POST"]  # nothing reached Exchange
    log = audit(tmp_path)
    assert [line["decision"] for line in log] == ["deny"] * 5
    assert log[0]["answer"] == "FolderSync Status 129 DeviceIsBlockedForThisUser (EAS 14.1)"
    assert log[4]["answer"] == "HTTP 403 (EAS 12.1 has no common status codes)"


def test_http_mode_stays_the_default(start_gateway, pki, exchange, mdm, tmp_path):
    g = start_gateway(conftest.authz_config(pki, exchange, mdm, tmp_path, policy=POLICY))
    r = request(g.port, "POST", as_path("Sync"), pki, headers=headers("16.1"), body=b"\x03\x01\x6a\x00")
    assert r.status == 403 and b"not allowed" in r.body
    assert audit(tmp_path)[0]["answer"] == "HTTP 403"


def test_mode_and_action_that_disagree_are_one_line_error(pki, exchange, mdm, tmp_path):
    import subprocess
    cfg = conftest.authz_config(pki, exchange, mdm, tmp_path, policy=POLICY,
                                deny={"mode": "activesync", "action": "drop"})
    path = conftest.write_config(tmp_path, cfg)
    p = subprocess.run(conftest.easgate_argv("check", str(path)), capture_output=True, text=True, timeout=60)
    assert p.returncode != 0
    assert "authorization.deny.mode" in p.stdout + p.stderr and "Traceback" not in p.stdout + p.stderr
