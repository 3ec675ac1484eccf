"""Shadow mode (`enforce: false` on a route) and what-if replay (`easgate replay --policy NEW.yaml`)."""

from __future__ import annotations

import base64
import json
import subprocess
from pathlib import Path

import yaml

import conftest
from conftest import ROOT, easgate_argv, request

IPHONE = "ApplF17ABCDEF01"
IPAD = "ApplDMPQ99887766"
POLICY = {"mode": "block", "inventory": [{"device_id": IPHONE, "owner": "alice", "compliant": True}]}
BASIC = {"Authorization": "Basic " + base64.b64encode(b"alice:pw").decode(), "MS-ASProtocolVersion": "16.1"}
CAPTURES = ROOT / "tests" / "captures"


def path(device: str, dtype: str = "iPad") -> str:
    return f"/Microsoft-Server-ActiveSync?Cmd=Sync&User=alice&DeviceId={device}&DeviceType={dtype}"


def audit(tmp_path: Path) -> list[dict]:
    return [json.loads(line) for line in (tmp_path / "audit.jsonl").read_text().splitlines()]


def test_shadow_route_decides_and_audits_but_does_not_enforce(start_gateway, pki, exchange, mdm, tmp_path):
    cfg = conftest.authz_config(pki, exchange, mdm, tmp_path, policy=POLICY)
    cfg["routes"][0]["enforce"] = False
    g = start_gateway(cfg)
    r = request(g.port, "POST", path(IPAD), pki, headers=BASIC, body=b"\x03\x01\x6a\x00")
    assert r.status == 200 and r.headers["X-Upstream"] == "exchange"  # would be denied, goes through
    r = request(g.port, "POST", path(IPHONE, "iPhone"), pki, headers=BASIC, body=b"\x03\x01\x6a\x00")
    assert r.status == 200
    log = audit(tmp_path)
    assert [(a["device_id"], a["decision"], a.get("enforced")) for a in log] == [
        (IPAD, "deny", False), (IPHONE, "allow", False)]
    assert log[0]["reason"] == f"device {IPAD} not managed"
    assert len([x for x in exchange.requests() if x["method"] == "POST"]) == 2


def test_enforce_false_without_authorize_is_a_one_line_error(pki, exchange, mdm, tmp_path):
    cfg = conftest.base_config(pki, exchange, mdm)
    cfg["routes"][1]["enforce"] = False
    p = subprocess.run(easgate_argv("check", str(conftest.write_config(tmp_path, cfg))), capture_output=True,
                       text=True, timeout=60)
    assert p.returncode == 2 and "routes[1].enforce" in p.stderr and "Traceback" not in p.stderr, p.stderr


def replay(*args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    return subprocess.run(easgate_argv("replay", *args), cwd=cwd,
                          capture_output=True, text=True, timeout=120)


def replay_config(tmp_path: Path, pki: Path) -> Path:
    """tests/captures/gateway.yaml with this run's gateway certificate (as tests/test_captures.py does)."""
    cfg = yaml.safe_load((CAPTURES / "gateway.yaml").read_text())
    cfg["tls"]["certificate"] = str(pki / "gateway-full.pem")
    cfg["tls"]["client_certs"]["ca"] = [str(CAPTURES / c) for c in cfg["tls"]["client_certs"]["ca"]]
    cfg["authorization"]["policy"] = str(CAPTURES / cfg["authorization"]["policy"])
    p = tmp_path / "replay.yaml"
    p.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return p


def test_replay_with_a_new_policy_lists_every_decision_that_would_change(tmp_path, pki):
    config = str(replay_config(tmp_path, pki))
    new = yaml.safe_load((CAPTURES / "policy.yaml").read_text())
    new["inventory"] = [e for e in new["inventory"] if e["device_id"] != IPHONE]  # alice's iPhone no longer managed
    new["inventory"].append({"device_id": IPAD, "owner": "alice", "compliant": True})  # her iPad now is
    (tmp_path / "new.yaml").write_text(yaml.safe_dump(new))
    caps = [str(CAPTURES / "iphone-managed.mitm"), str(CAPTURES / "ipad-unmanaged.mitm")]
    p = replay(*caps, "--config", config, "--policy", str(tmp_path / "new.yaml"), "--json")
    assert p.returncode == 1, p.stderr
    changes = [json.loads(line) for line in p.stdout.splitlines()]
    assert changes and {c["device"] for c in changes} == {IPHONE, IPAD}
    for c in changes:
        before, after = c["before"]["decision"], c["after"]["decision"]
        assert (before, after) == (("allow", "deny") if c["device"] == IPHONE else ("deny", "allow")), c
        assert c["command"] and c["after"]["reason"]
    assert f"{len(changes)} decisions would change" in p.stderr
    # the same policy: nothing changes, exit 0
    p = replay(*caps, "--config", config, "--policy", str(CAPTURES / "policy.yaml"))
    assert p.returncode == 0 and "0 decisions would change" in p.stdout, p.stdout + p.stderr


def test_replay_with_a_broken_policy_is_one_line(tmp_path, pki):
    config = str(replay_config(tmp_path, pki))
    (tmp_path / "bad.yaml").write_text("mode: sometimes\n")
    p = replay(str(CAPTURES / "iphone-managed.mitm"), "--config", config,
               "--policy", str(tmp_path / "bad.yaml"))
    assert p.returncode == 2 and len(p.stderr.strip().splitlines()) == 1 and "mode" in p.stderr, p.stderr


READ_ONLY = {"rules": [{"name": "read-only", "deny": ["SendMail"]}]}  # every device: no sending


def with_commands(commands: dict) -> dict:
    return dict(yaml.safe_load((CAPTURES / "policy.yaml").read_text()), commands=commands)


def test_replay_what_if_covers_command_rules_in_the_policy_file(tmp_path, pki):
    config = str(replay_config(tmp_path, pki))
    (tmp_path / "new.yaml").write_text(yaml.safe_dump(with_commands(READ_ONLY)))
    caps = sorted(str(p) for p in CAPTURES.glob("*.mitm"))
    p = replay(*caps, "--config", config, "--policy", str(tmp_path / "new.yaml"), "--json")
    assert p.returncode == 1, p.stderr
    changes = [json.loads(line) for line in p.stdout.splitlines()]
    # every SendMail the captures hold (alice's iPhone, the SOGo session), and nothing else
    assert sorted((Path(c["capture"]).stem, c["device"], c["command"]) for c in changes) == [
        ("iphone-managed", IPHONE, "SendMail"), ("sogo-managed", IPHONE, "SendMail")], changes
    for c in changes:
        assert c["rule"] == "read-only" and c["after"]["rule"] == "read-only" and c["before"]["rule"] == ""
        assert (c["before"]["decision"], c["after"]["decision"], c["after"]["source"]) == ("allow", "deny", "command")
        assert c["after"]["reason"] == "command SendMail not allowed by command rule read-only"
    assert "2 decisions would change" in p.stderr
    # the table form names the rule too
    p = replay(str(CAPTURES / "iphone-managed.mitm"), "--config", config, "--policy", str(tmp_path / "new.yaml"))
    assert p.returncode == 1 and f"device={IPHONE} command=SendMail: allow (cache) -> deny (command)  rule: read-only" \
        in p.stdout, p.stdout + p.stderr


def test_replay_what_if_with_unchanged_command_rules_reports_nothing(tmp_path, pki):
    (tmp_path / "current.yaml").write_text(yaml.safe_dump(with_commands(READ_ONLY)))
    (tmp_path / "same.yaml").write_text(yaml.safe_dump(with_commands(READ_ONLY)))
    cfg = yaml.safe_load(replay_config(tmp_path, pki).read_text())
    cfg["authorization"]["policy"] = str(tmp_path / "current.yaml")
    (tmp_path / "replay.yaml").write_text(yaml.safe_dump(cfg))
    caps = sorted(str(p) for p in CAPTURES.glob("*.mitm"))
    p = replay(*caps, "--config", str(tmp_path / "replay.yaml"), "--policy", str(tmp_path / "same.yaml"))
    assert p.returncode == 0, p.stdout + p.stderr
    assert p.stdout.strip().splitlines() == [
        f"38 requests replayed with {tmp_path / 'same.yaml'} instead of the config's policy: 0 decisions would change"]


def test_command_rules_in_both_the_config_and_the_new_policy_are_one_line(tmp_path, pki):
    cfg = yaml.safe_load(replay_config(tmp_path, pki).read_text())
    cfg["authorization"]["commands"] = READ_ONLY
    (tmp_path / "replay.yaml").write_text(yaml.safe_dump(cfg))
    (tmp_path / "new.yaml").write_text(yaml.safe_dump(with_commands(READ_ONLY)))
    p = replay(str(CAPTURES / "iphone-managed.mitm"), "--config", str(tmp_path / "replay.yaml"),
               "--policy", str(tmp_path / "new.yaml"))
    assert p.returncode == 2 and len(p.stderr.strip().splitlines()) == 1, p.stderr
    assert "commands: also set in the gateway config (authorization.commands)" in p.stderr
    assert "remove authorization.commands from the gateway config" in p.stderr and "Traceback" not in p.stderr
