"""Command-level policy end to end: rules by device state, group and DeviceType allow only some EAS
commands (a read-only profile refuses SendMail, SmartReply and attachment downloads, ItemOperations
decided on its WBXML body), per-device rate limits answered 503 + Retry-After; the audit line and the
mitmweb view name the command and the rule. Real gateway processes, a real stand-in Exchange."""

from __future__ import annotations

import base64
import json
import subprocess
import xml.etree.ElementTree as ET
from pathlib import Path

import yaml
from mitmproxy.contrib.wbxml.ASCommandResponse import ASCommandResponse

from easgate.authz.wbxml import E, wbxml
from easgate.gateway import contentview
from easgate.tools.capture import read_flows

import conftest
from conftest import easgate_argv, request

IPHONE = "ApplF17ABCDEF01"
IPAD = "ApplDMPQ99887766"
BOBS = "androidb0b0001"
POLICY = {"mode": "permit", "inventory": [{"device_id": IPHONE, "owner": "alice", "compliant": True}]}
COMMANDS = {
    "groups": {"contractors": ["bob"]},
    "rules": [
        {"name": "contractors", "when": {"groups": ["contractors"]}, "allow": ["Provision", "FolderSync", "Sync", "Ping"]},
        {"name": "read-only", "when": {"device_states": ["unmanaged"]},
         "deny": ["SendMail", "SmartForward", "SmartReply", "attachments"]},
    ],
}
FETCH_ATTACHMENT = wbxml(E("ItemOperations:ItemOperations", E("ItemOperations:Fetch", E("ItemOperations:Store", "Mailbox"),
                                                                 E("AirSyncBase:FileReference", "5%3a1%3a0"))))
FETCH_MAIL = wbxml(E("ItemOperations:ItemOperations", E("ItemOperations:Fetch", E("ItemOperations:Store", "Mailbox"),
                                                           E("AirSync:CollectionId", "5"), E("AirSync:ServerId", "5:1"))))


def auth(user: str) -> dict:
    return {"Authorization": "Basic " + base64.b64encode(f"{user}:pw".encode()).decode(),
            "MS-ASProtocolVersion": "14.1", "Content-Type": "application/vnd.ms-sync.wbxml"}


def path(cmd: str, device: str, user: str = "alice", dtype: str = "iPad") -> str:
    return f"/Microsoft-Server-ActiveSync?Cmd={cmd}&User={user}&DeviceId={device}&DeviceType={dtype}"


def status_of(body: bytes) -> str | None:
    root = ET.fromstring(ASCommandResponse(body).xmlString)
    return next((el.text for el in root.iter() if el.tag.rpartition("}")[2] == "Status"), None)


def audit(tmp_path: Path) -> list[dict]:
    return [json.loads(line) for line in (tmp_path / "audit.jsonl").read_text().splitlines()]


def at_exchange(exchange) -> list[str]:
    return [r["path"] for r in exchange.requests() if r["method"] == "POST"]


def test_read_only_profile_and_group_rule(start_gateway, pki, exchange, mdm, tmp_path):
    cfg = conftest.authz_config(pki, exchange, mdm, tmp_path, policy=POLICY, commands=COMMANDS,
                                deny={"mode": "activesync"})
    g = start_gateway(cfg, extra=["-w", str(tmp_path / "flows.mitm")])
    body = b"\x03\x01\x6a\x00"

    def post(cmd, device, user="alice", data=body):
        return request(g.port, "POST", path(cmd, device, user), pki, headers=auth(user), body=data)

    # alice's unknown iPad: reads (the device allow is cached by the first Sync) ...
    assert post("Sync", IPAD).headers.get("X-Upstream") == "exchange"
    assert post("FolderSync", IPAD).headers.get("X-Upstream") == "exchange"
    # ... but does not send, and the cached allow does not widen into SendMail
    for cmd in ("SendMail", "SmartReply", "SmartForward"):
        r = post(cmd, IPAD)
        assert (r.status, status_of(r.body)) == (200, "130"), (cmd, r.status, r.body)
    assert post("GetAttachment", IPAD).status == 403  # no WBXML response for GetAttachment
    # ItemOperations is decided on its body: a mail body fetch passes, an attachment fetch does not
    assert post("ItemOperations", IPAD, data=FETCH_MAIL).headers.get("X-Upstream") == "exchange"
    r = post("ItemOperations", IPAD, data=FETCH_ATTACHMENT)
    assert r.status == 200 and status_of(r.body) == "130" and "X-Upstream" not in r.headers
    r = post("ItemOperations", IPAD, data=b"\x03\x01\x6a\x00\x45\x46")  # not decodable: refused
    assert r.status == 200 and status_of(r.body) == "130"
    # the managed iPhone is under no rule
    assert post("SendMail", IPHONE).headers.get("X-Upstream") == "exchange"
    # bob (contractors) may only sync
    assert post("Sync", BOBS, user="bob").headers.get("X-Upstream") == "exchange"
    assert status_of(post("Search", BOBS, user="bob").body) == "130"

    sent = at_exchange(exchange)
    assert not [p for p in sent if IPAD in p and ("SendMail" in p or "Smart" in p or "GetAttachment" in p)]
    assert len([p for p in sent if "ItemOperations" in p]) == 1
    log = audit(tmp_path)
    rows = [(a["device_id"], a["command"], a["decision"], a.get("rule"), a["source"]) for a in log]
    assert rows == [
        (IPAD, "Sync", "allow", "read-only", "mode"),
        (IPAD, "FolderSync", "allow", "read-only", "cache"),
        (IPAD, "SendMail", "deny", "read-only", "command"),
        (IPAD, "SmartReply", "deny", "read-only", "command"),
        (IPAD, "SmartForward", "deny", "read-only", "command"),
        (IPAD, "GetAttachment", "deny", "read-only", "command"),
        (IPAD, "ItemOperations", "allow", "read-only", "command"),
        (IPAD, "ItemOperations", "deny", "read-only", "command"),
        (IPAD, "ItemOperations", "deny", "read-only", "command"),
        (IPHONE, "SendMail", "allow", None, "inventory"),
        (BOBS, "Sync", "allow", "contractors", "mode"),
        (BOBS, "Search", "deny", "contractors", "command"),
    ], rows
    assert log[2]["reason"] == "command SendMail not allowed by command rule read-only"
    assert log[2]["answer"] == "SendMail Status 130 AccessDenied (EAS 14.1)"
    assert "FileReference" in log[7]["reason"]
    g.stop()
    # mitmweb's ActiveSync view shows the command and the rule of each flow (flows saved by the gateway)
    flows = [f for f in read_flows(tmp_path / "flows.mitm") if "SendMail" in f.request.path and IPAD in f.request.path]
    gw = contentview.describe(flows[0])["gateway"]
    assert gw["command"] == "SendMail" and gw["rule"] == "read-only"
    assert gw["answered with"] == "SendMail Status 130 AccessDenied (EAS 14.1)"
    assert flows[0].comment.endswith("(rule read-only)")


def test_rate_limit_answers_503_with_retry_after(start_gateway, pki, exchange, mdm, tmp_path):
    cfg = conftest.authz_config(pki, exchange, mdm, tmp_path, policy=POLICY,
                                rate_limits=[{"name": "per-device", "requests": 3, "per_s": 3600}])
    g = start_gateway(cfg)
    got = [request(g.port, "POST", path("Sync", IPHONE, dtype="iPhone"), pki, headers=auth("alice")) for _ in range(5)]
    assert [r.status for r in got] == [200, 200, 200, 503, 503]
    retry = int(got[3].headers["Retry-After"])
    assert 3500 <= retry <= 3600
    assert len(at_exchange(exchange)) == 3
    # another device has its own budget
    assert request(g.port, "POST", path("Sync", IPAD), pki, headers=auth("alice")).status == 200
    last = [a for a in audit(tmp_path) if a["decision"] == "deny"][-1]
    assert last["source"] == "rate-limit" and last["rule"] == "per-device" and last["command"] == "Sync"
    assert last["answer"].startswith("HTTP 503 Retry-After")


def test_bad_command_rules_are_one_line_errors(pki, exchange, mdm, tmp_path):
    for commands, key in (({"rules": [{"name": "x", "deny": ["SendMial"]}]}, "authorization.commands.rules[0].deny[0]"),
                          ({"rules": [{"name": "x", "allow": ["Sync"], "deny": ["SendMail"]}]},
                           "authorization.commands.rules[0]"),
                          ({"rules": [{"name": "x", "when": {"groups": ["nobody"]}, "deny": ["Sync"]}]},
                           "authorization.commands.rules[0].when.groups[0]")):
        cfg = conftest.authz_config(pki, exchange, mdm, tmp_path, policy=POLICY, commands=commands)
        p = subprocess.run(easgate_argv("check", str(conftest.write_config(tmp_path, cfg))), capture_output=True,
                           text=True, timeout=60)
        assert p.returncode == 2 and key in p.stderr and len(p.stderr.strip().splitlines()) == 1, p.stderr


def test_command_rules_in_the_policy_file_apply_and_reload_with_it(start_gateway, pki, exchange, mdm, tmp_path):
    cfg = conftest.authz_config(pki, exchange, mdm, tmp_path, policy=dict(POLICY, commands=COMMANDS))
    g = start_gateway(cfg, extra=["--set", "easgate_policy_poll_ms=100"])

    def send(device):
        return request(g.port, "POST", path("SendMail", device), pki, headers=auth("alice"), body=b"\x03\x01\x6a\x00")

    assert send(IPAD).status == 403  # unmanaged: the policy file's read-only rule
    assert send(IPHONE).headers.get("X-Upstream") == "exchange"
    denied = audit(tmp_path)[0]
    assert (denied["decision"], denied["source"], denied["rule"]) == ("deny", "command", "read-only")
    # a new policy without the rule, renamed over the old one: applied without a restart
    (tmp_path / "policy.new").write_text(yaml.safe_dump(POLICY))
    (tmp_path / "policy.new").replace(tmp_path / "policy.yaml")
    conftest.wait_for(lambda: send(IPAD).status == 200, 10, "the reloaded policy", g)
    assert audit(tmp_path)[-1]["decision"] == "allow" and "rule" not in audit(tmp_path)[-1]


def test_command_rules_in_the_config_and_the_policy_file_are_one_line(pki, exchange, mdm, tmp_path):
    cfg = conftest.authz_config(pki, exchange, mdm, tmp_path, policy=dict(POLICY, commands=COMMANDS),
                                commands=COMMANDS)
    p = subprocess.run(easgate_argv("check", str(conftest.write_config(tmp_path, cfg))), capture_output=True,
                       text=True, timeout=60)
    assert p.returncode == 2 and len(p.stderr.strip().splitlines()) == 1, p.stderr
    assert "authorization.commands" in p.stderr and "give it in one place" in p.stderr, p.stderr
    # rate limits from the config and rules from the policy file are fine together
    cfg = conftest.authz_config(pki, exchange, mdm, tmp_path, policy=dict(POLICY, commands=COMMANDS),
                                rate_limits=[{"name": "per-device", "requests": 100, "per_s": 60}])
    p = subprocess.run(easgate_argv("check", str(conftest.write_config(tmp_path, cfg))), capture_output=True,
                       text=True, timeout=60)
    assert p.returncode == 0, p.stderr


def test_a_policy_reload_that_would_give_the_configs_command_rules_twice_keeps_the_last_good(
        start_gateway, pki, exchange, mdm, tmp_path):
    cfg = conftest.authz_config(pki, exchange, mdm, tmp_path, policy=POLICY, commands=COMMANDS)
    g = start_gateway(cfg, extra=["--set", "easgate_policy_poll_ms=100"])
    (tmp_path / "policy.new").write_text(yaml.safe_dump(dict(POLICY, commands={"rules": []})))  # "no rules"
    (tmp_path / "policy.new").replace(tmp_path / "policy.yaml")
    g.wait_output("policy reload failed, keeping the last good policy", 10)
    assert "commands: also set in the gateway config (authorization.commands)" in g.output
    # the config's read-only rule is still in force
    r = request(g.port, "POST", path("SendMail", IPAD), pki, headers=auth("alice"), body=b"\x03\x01\x6a\x00")
    assert r.status == 403 and audit(tmp_path)[-1]["rule"] == "read-only"
