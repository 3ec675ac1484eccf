"""Blocks that reach requests already held: a Ping held by Exchange ends within 5 s when its device's
decision turns to deny (a revocation on every worker, a policy reload, a re-authorization at
allow_ttl_s that the connector now answers with Deny). Real gateway processes, 2 workers, a real
stand-in Exchange holding the Pings, real TLS clients."""

from __future__ import annotations

import base64
import hashlib
import json
import re
import shlex
import subprocess
import threading
import time
import urllib.request
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest
import yaml
from mitmproxy.contrib.wbxml.ASCommandResponse import ASCommandResponse
from test_mitmweb import start_web

from easgate.authz.audit import AuditLog
from easgate.authz.eas_deny import BLOCKED_STATUS
from easgate.authz.policy import PolicyStore
from easgate.authz.revocations import RevocationFile, RevocationTable, append, lookup, make_record
from easgate.connector.service import ConnectorService, ConnectorThread
from easgate.connector.store import Inventory
from easgate.runtime.aggregate import Document
from easgate.tools.standins import ExchangeStandIn

import conftest
from conftest import GatewayProcess, HeldPingExchange, easgate_argv, launch, request, wait_for
from doccommands import covers, doc_command
from support.holding import HoldingUpstream
from support.procs import program_argv

IPHONE = "ApplF17ABCDEF01"
POLICY = {"mode": "block", "inventory": [{"device_id": IPHONE, "owner": "alice", "compliant": True}]}
BASIC = {"Authorization": "Basic " + base64.b64encode(b"CONTOSO\\alice:pw").decode(), "MS-ASProtocolVersion": "16.1"}
PING = f"/Microsoft-Server-ActiveSync?Cmd=Ping&User=alice&DeviceId={IPHONE}&DeviceType=iPhone"
SYNC = f"/Microsoft-Server-ActiveSync?Cmd=Sync&User=alice&DeviceId={IPHONE}&DeviceType=iPhone"
CONNECT = re.compile(r"^\[w(\d+)\]\[[\d:.]+\]\[127\.0\.0\.1:(\d+)\] client connect")
BOUND_S = 5.0
ROOT = Path(__file__).resolve().parents[1]


REVOKE_DOC = ("docs/scaling.md", 'easgate revoke gateway.yaml alice ApplF17ABCDEF01 --reason "phone reported lost"')


def documented_revoke() -> list[str]:
    """The `easgate revoke` command of docs/scaling.md, as written (run with this suite's easgate)."""
    argv = shlex.split(doc_command(*REVOKE_DOC))
    return program_argv(argv[0], *argv[1:])


def audit(tmp_path: Path) -> list[dict]:
    p = tmp_path / "audit.jsonl"
    return [json.loads(line) for line in p.read_text().splitlines()] if p.exists() else []


@pytest.fixture
def holding_exchange(pki):
    ex = ExchangeStandIn("holding-exchange", tls=(pki / "exchange.pem", pki / "exchange.key"), hold_s=60).start()
    yield ex
    ex.stop()


class HeldPing:
    """One Ping on its own connection, in a thread; records when and how it ended."""

    def __init__(self, port: int, pki: Path) -> None:
        self.port = port
        self.conn = conftest.https_connection(port, pki, timeout=90)
        self.local_port = self.conn.sock.getsockname()[1]
        self.ended: float | None = None
        self.outcome: object = None
        self.response: conftest.Response | None = None
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        try:
            self.response = request(self.port, "POST", PING, None, headers=BASIC, body=b"\x03\x01\x6a\x00",
                                    conn=self.conn)
            self.outcome = self.response.status
        except Exception as e:  # noqa: BLE001 - a reset is the expected end
            self.outcome = type(e).__name__
        self.ended = time.monotonic()


def start(cfg: dict, tmp_path: Path, workers: int) -> GatewayProcess:
    return launch(conftest.write_config(tmp_path, cfg), workers=workers, extra=conftest.LOG_CONNECTIONS)


def hold_pings_on_every_worker(g: GatewayProcess, pki: Path, exchange, workers: int) -> list[HeldPing]:
    """Open held Pings until each worker holds at least one (SO_REUSEPORT spreads connections)."""
    pings: list[HeldPing] = []
    for _ in range(24):
        pings.append(HeldPing(g.port, pki))
        wait_for(lambda: len([r for r in exchange.requests() if "Cmd=Ping" in r["path"]]) == len(pings), 10,
                 "the Ping at Exchange", g)
        served = {int(m[2]): int(m[1]) for line in list(g.lines) if (m := CONNECT.search(line))}
        if workers == 1 or {served.get(p.local_port) for p in pings} >= set(range(1, workers + 1)):
            return pings
    raise AssertionError("the connections never reached every worker\n" + g.output)


def assert_all_end_within(pings: list[HeldPing], t0: float, g: GatewayProcess) -> None:
    for p in pings:
        p.thread.join(max(0.1, t0 + BOUND_S + 2 - time.monotonic()))
    ended = [(p.outcome, round(p.ended - t0, 2) if p.ended else None) for p in pings]
    assert all(p.ended is not None and p.ended - t0 < BOUND_S for p in pings), f"{ended}\n{g.output}"
    assert all(p.outcome != 200 for p in pings), ended  # cut, not answered by Exchange


@covers(*REVOKE_DOC)
def test_revoke_closes_held_pings_on_every_worker(pki, holding_exchange, mdm, tmp_path):
    cfg = conftest.authz_config(pki, holding_exchange, mdm, tmp_path, policy=POLICY,
                                revocations=str(tmp_path / "revocations.jsonl"))
    g = start(cfg, tmp_path, workers=2)
    try:
        pings = hold_pings_on_every_worker(g, pki, holding_exchange, 2)
        p = subprocess.run(documented_revoke(), cwd=tmp_path, capture_output=True, text=True, timeout=30)
        t0 = time.monotonic()  # from the command's return: its own start-up is not the gateway's delay
        assert p.returncode == 0, p.stderr
        assert_all_end_within(pings, t0, g)
        closed = wait_for(lambda: [a for a in audit(tmp_path) if a.get("event") == "held request closed"]
                          if len([a for a in audit(tmp_path) if a.get("event") == "held request closed"]) == len(pings)
                          else None, 5, "the audit lines", g)
        assert {(a["trigger"], a["reason"], a["source"], a["command"], a["answer"]) for a in closed} == {
            ("revocation", "revoked: phone reported lost", "revoked", "Ping", "HTTP 403")}
        assert {p.outcome for p in pings} == {403}  # answered on every worker (deny.mode http), not cut
        # new requests of that device are denied on every worker, before lists and cache
        for _ in range(4):
            assert request(g.port, "POST", SYNC, pki, headers=BASIC).status == 403
        assert audit(tmp_path)[-1]["source"] == "revoked"
        # and a restore lets it back in
        subprocess.run(easgate_argv("revoke", str(tmp_path / "gateway.yaml"), "alice", IPHONE, "--restore"),
                       check=True, capture_output=True, timeout=30)
        wait_for(lambda: all(request(g.port, "POST", SYNC, pki, headers=BASIC).status == 200 for _ in range(4)),
                 5, "the restore", g)
    finally:
        g.stop()


def test_policy_reload_closes_a_held_ping(pki, holding_exchange, mdm, tmp_path):
    cfg = conftest.authz_config(pki, holding_exchange, mdm, tmp_path, policy=POLICY)
    # the file checked every 100 ms, not 2 s: the bound is for what follows the check (the new policy
    # loaded in a child process, every held request decided again), on a machine the suite loads
    g = launch(conftest.write_config(tmp_path, cfg), workers=2,
               extra=["--set", "easgate_policy_poll_ms=100", *conftest.LOG_CONNECTIONS])
    try:
        pings = hold_pings_on_every_worker(g, pki, holding_exchange, 2)
        t0 = time.monotonic()
        changed = dict(POLICY, inventory=[dict(POLICY["inventory"][0], compliant=False)])
        (tmp_path / "policy.new").write_text(yaml.safe_dump(changed))
        (tmp_path / "policy.new").replace(tmp_path / "policy.yaml")  # a policy is replaced, not edited in place
        assert_all_end_within(pings, t0, g)
        closed = wait_for(lambda: [a for a in audit(tmp_path) if a.get("event") == "held request closed"], 5, "audit", g)
        assert closed[0]["trigger"] == "policy reload" and "not compliant" in closed[0]["reason"], closed
    finally:
        g.stop()


def test_held_ping_is_reauthorized_every_allow_ttl_and_closed_when_the_connector_says_deny(
        pki, holding_exchange, mdm, tmp_path, connector):
    connector.allowed = {IPHONE}
    cfg = conftest.authz_config(pki, holding_exchange, mdm, tmp_path, connector=connector,
                                cache={"allow_ttl_s": 1, "deny_ttl_s": 1})
    g = start(cfg, tmp_path, workers=1)
    try:
        ping = HeldPing(g.port, pki)
        wait_for(lambda: any("Cmd=Ping" in r["path"] for r in holding_exchange.requests()), 10, "the Ping", g)
        # re-authorized while the connector still allows it: the Ping stays
        wait_for(lambda: len(connector.calls) >= 3, 10, "re-authorizations", g)
        assert ping.ended is None
        t0 = time.monotonic()
        connector.allowed = set()  # the operator blocks the device in the MDM
        assert_all_end_within([ping], t0, g)
        closed = wait_for(lambda: [a for a in audit(tmp_path) if a.get("event") == "held request closed"], 5, "audit", g)
        assert closed[0]["trigger"] == "re-authorization" and closed[0]["source"] == "connector"
    finally:
        g.stop()


# ---------------------------------------------------------------------------------------------
# A held Ping on the memory-lean path (mitmcompat's small layer queues, both TLS sides releasing
# their buffers while idle): still answered intact, visible, re-authorized, and ended by a deny


# an HTTPS Exchange whose Pings wait for `release`, then get a 100 KB answer (several TLS records, so
# the released buffers must be allocated again) whose digest is in a header
BIG_BODY = bytes(range(256)) * 400


def test_held_ping_on_the_lean_path_is_answered_intact_reauthorized_and_ended_by_a_deny(
        pki, mdm, tmp_path, connector):
    exchange = HeldPingExchange(tls=(pki / "exchange.pem", pki / "exchange.key"), body=BIG_BODY)
    connector.allowed = {IPHONE}
    cfg = conftest.authz_config(pki, exchange, mdm, tmp_path, connector=connector,
                                cache={"allow_ttl_s": 1, "deny_ttl_s": 1})
    path = conftest.write_config(tmp_path, cfg)
    g = launch(path, workers=1, extra=["--set", "easgate_metrics=127.0.0.1:0"], wait=False)
    try:
        g.wait_ready(30)
        mport = int(wait_for(lambda: re.search(r"metrics at http://127\.0\.0\.1:(\d+)/metrics", g.output), 10,
                             "the metrics line", g)[1])

        def held() -> float:
            with urllib.request.urlopen(f"http://127.0.0.1:{mport}/metrics", timeout=10) as r:
                samples = Document.parse(r.read().decode()).samples
            return samples.get(("easgate_long_polls_held", '{route="activesync",command="Ping"}'), 0)

        answered: list = []
        t = threading.Thread(target=lambda: answered.append(request(
            g.port, "POST", PING, pki, headers=BASIC, body=b"\x03\x01\x6a\x00", timeout=60)), daemon=True)
        t.start()
        assert exchange.pings_waiting.acquire(timeout=20), g.output
        assert held() == 1  # visible while held
        calls = len(connector.calls)
        wait_for(lambda: len(connector.calls) >= calls + 2, 10, "re-authorizations of the held Ping", g)
        assert t.is_alive()  # re-authorized (allowed again), still held
        exchange.release.set()
        t.join(20)
        r = answered[0]
        assert r.status == 200 and len(r.body) == len(BIG_BODY)
        assert hashlib.sha256(r.body).hexdigest() == r.headers["X-Digest"]
        wait_for(lambda: held() == 0, 10, "the gauge to drop", g)

        # a second Ping, held, then the connector says Deny: re-authorization ends it
        exchange.release.clear()
        ping = HeldPing(g.port, pki)
        assert exchange.pings_waiting.acquire(timeout=20), g.output
        t0 = time.monotonic()
        connector.allowed = set()
        assert_all_end_within([ping], t0, g)
        closed = wait_for(lambda: [a for a in audit(tmp_path) if a.get("event") == "held request closed"], 5, "audit", g)
        assert closed[0]["trigger"] == "re-authorization"
    finally:
        g.stop()
        exchange.stop()


# ---------------------------------------------------------------------------------------------
# The revocation file


def test_revocation_file_follows_appends_restores_and_replacement(tmp_path):
    path = tmp_path / "rev.jsonl"
    rf = RevocationFile(path)
    assert rf.poll() == [] and rf.lookup("alice", IPHONE) is None  # no file yet
    append(path, "alice", IPHONE, "lost")
    new = rf.poll()
    assert [(r.user, r.device_id, r.reason) for r in new] == [("alice", IPHONE, "lost")]
    assert rf.lookup("CONTOSO\\alice", IPHONE.lower()) is not None  # bare user matches any form
    assert rf.lookup("bob", IPHONE) is None
    with open(path, "ab") as f:  # a half-written line waits for its end; junk is skipped
        f.write(b"not json\n{\"action\": \"revoke\", \"user\": null, \"device_id\": \"Andr1\"")
    assert rf.poll() == []
    with open(path, "ab") as f:
        f.write(b", \"reason\": \"stolen\"}\n")
    assert [r.device_id for r in rf.poll()] == ["Andr1"] and rf.lookup("anyone", "ANDR1") is not None
    append(path, "alice", IPHONE, "", action="restore")
    rf.poll()
    assert rf.lookup("alice", IPHONE) is None
    path.unlink()
    append(path, "bob", "X1", "new file")  # replaced: read from the start, the old state is gone
    rf.poll()
    assert rf.lookup("anyone", "Andr1") is None and rf.lookup("bob", "X1") is not None


def test_the_later_record_decides_across_this_machines_file_and_the_clusters_table(tmp_path):
    """What a gateway looks up: its file and what other nodes said (through Redis), the later record
    per (device, user) winning; a restore is remembered so an older revoke cannot come back."""
    path = tmp_path / "rev.jsonl"
    append(path, "alice", IPHONE, "lost")
    rf = RevocationFile(path)
    rf.poll()
    cluster = RevocationTable()
    assert lookup("CONTOSO\\alice", IPHONE, rf.table, cluster).reason == "lost"
    later = make_record("alice", IPHONE.lower(), "found", "restore", now=time.time() + 60)
    assert cluster.apply(later, newest_wins=True) is not None
    assert lookup("CONTOSO\\alice", IPHONE, rf.table, cluster) is None  # restored on another node, later
    older = make_record("alice", IPHONE, "stale copy", "revoke", now=time.time() - 60)
    assert cluster.apply(older, newest_wins=True) is None  # a node that was cut off pushes its old revoke
    assert lookup("alice", IPHONE, rf.table, cluster) is None
    tie = dict(later, action="revoke", reason="same millisecond")
    assert cluster.apply(tie, newest_wins=True) is not None  # a revoke beats a restore of the same ms
    assert lookup("alice", IPHONE, rf.table, cluster).reason == "same millisecond"
    assert cluster.apply(make_record(None, "Andr1", "stolen"), newest_wins=True) is not None
    assert lookup("bob", "ANDR1", rf.table, cluster) is not None and lookup("bob", IPHONE, rf.table, cluster) is None
    # a line written before records carried ts is ordered by its time
    with open(path, "a") as f:
        f.write(json.dumps({"action": "restore", "user": "alice", "device_id": IPHONE, "reason": "",
                            "time": "2020-01-01T00:00:00+0000"}) + "\n")
    assert [r["ts"] for r in rf.poll_records()] == [1577836800000]


def test_revoke_without_a_revocations_file_is_one_line(pki, exchange, mdm, tmp_path):
    cfg = conftest.authz_config(pki, exchange, mdm, tmp_path, policy=POLICY)
    path = conftest.write_config(tmp_path, cfg)
    p = subprocess.run(easgate_argv("revoke", str(path), "alice", IPHONE), capture_output=True, text=True, timeout=30)
    assert p.returncode == 2 and "authorization.revocations is not set" in p.stderr
    assert len(p.stderr.strip().splitlines()) == 1


def test_an_operators_block_in_the_connector_closes_held_pings_on_every_worker(pki, holding_exchange, mdm, tmp_path):
    # the real connector service over HTTP, its SQLite inventory, and `easgate devices block` as an operator runs it
    db = tmp_path / "devices.db"
    inv = Inventory(db)
    inv.import_file(ROOT / "policies" / "demo-inventory.csv")
    (tmp_path / "cpolicy.yaml").write_text("mode: block\n")
    svc = ConnectorThread(ConnectorService(inv, PolicyStore(tmp_path / "cpolicy.yaml"),
                                           AuditLog(tmp_path / "decisions.jsonl"))).start()
    try:
        cfg = conftest.authz_config(pki, holding_exchange, mdm, tmp_path, policy=None, revocations="revocations.jsonl")
        cfg["authorization"]["connector"] = {"url": f"http://127.0.0.1:{svc.port}/services/ActiveSync/Authorize",
                                             "timeout_ms": 2000}
        g = start(cfg, tmp_path, workers=2)
        try:
            pings = hold_pings_on_every_worker(g, pki, holding_exchange, 2)
            p = subprocess.run(easgate_argv("devices", "--db", str(db), "block", IPHONE,
                                            "--revocations", str(tmp_path / "revocations.jsonl")),
                               capture_output=True, text=True, timeout=30)
            t0 = time.monotonic()  # from the command's return: its own start-up is not the gateway's delay
            assert p.returncode == 0 and "revoked in" in p.stdout, p.stdout + p.stderr
            assert_all_end_within(pings, t0, g)
            closed = wait_for(lambda: [a for a in audit(tmp_path) if a.get("event") == "held request closed"], 5,
                              "audit", g)
            assert {a["reason"] for a in closed} == {"revoked: blocked in the connector inventory"}
        finally:
            g.stop()
    finally:
        svc.stop()


def test_easgate_revoke_from_mitmwebs_command_bar_closes_the_held_ping(pki, holding_exchange, mdm, tmp_path):
    # without a revocation file the command acts in its own process: mitmweb is always one process
    cfg = conftest.authz_config(pki, holding_exchange, mdm, tmp_path, policy=POLICY)
    proc, w = start_web(conftest.write_config(tmp_path, cfg))
    try:
        ping = HeldPing(proc.port, pki)
        wait_for(lambda: any("Cmd=Ping" in r["path"] for r in holding_exchange.requests()), 10, "the Ping", proc)
        t0 = time.monotonic()
        out = w.command("easgate.revoke", "alice", IPHONE)
        assert out == f"revoked alice on {IPHONE}: this process only (no authorization.revocations file configured)"
        assert_all_end_within([ping], t0, proc)
        flow = wait_for(lambda: next((f for f in w.flows() if "Cmd=Ping" in f["request"]["path"]
                                      and f["comment"].startswith("closed")), None), 5, "the flow's comment", proc)
        assert "by revocation: deny: revoked: easgate.revoke [revoked]" in flow["comment"]
        assert request(proc.port, "POST", SYNC, pki, headers=BASIC).status == 403
    finally:
        proc.stop()


# ---------------------------------------------------------------------------------------------
# The held request gets the deny a phone understands


def wbxml_status(body: bytes) -> tuple[str, str | None]:
    """(root element, first Status) of a WBXML body, decoded with mitmproxy's decoder."""
    root = ET.fromstring(ASCommandResponse(body).xmlString)
    status = next((el.text for el in root.iter() if el.tag.rpartition("}")[2] == "Status"), None)
    return root.tag.rpartition("}")[2], status


@pytest.mark.parametrize("mode", ["http", "activesync", "drop"])
def test_a_revoked_held_ping_is_answered_with_the_deny_mode_and_its_upstream_closed(mode, pki, mdm, tmp_path):
    upstream = HoldingUpstream((pki / "exchange.pem", pki / "exchange.key"))
    deny = {"mode": mode, **({"status": 503, "retry_after_s": 600} if mode == "http" else {})}
    cfg = conftest.authz_config(pki, upstream, mdm, tmp_path, policy=POLICY, deny=deny,
                                revocations=str(tmp_path / "revocations.jsonl"))
    g = start(cfg, tmp_path, workers=1)
    try:
        ping = HeldPing(g.port, pki)
        wait_for(lambda: upstream.held, 10, "the Ping held upstream", g)
        p = subprocess.run(easgate_argv("revoke", str(tmp_path / "gateway.yaml"), "alice", IPHONE,
                                        "--reason", "phone reported lost"), capture_output=True, text=True, timeout=30)
        t0 = time.monotonic()  # from the command's return: its own start-up is not the gateway's delay
        assert p.returncode == 0, p.stderr
        ping.thread.join(BOUND_S + 2)
        assert ping.ended is not None and ping.ended - t0 < BOUND_S, (ping.outcome, g.output)
        r = ping.response
        if mode == "http":  # the configured status, as for any deny
            assert r is not None and r.status == 503 and r.headers["Retry-After"] == "600", ping.outcome
            answer = "HTTP 503"
        elif mode == "activesync":  # Exchange's answer to a blocked device: Ping Status 129 ([MS-ASCMD] 2.2.2)
            assert r is not None and r.status == 200, ping.outcome
            assert r.headers["Content-Type"] == "application/vnd.ms-sync.wbxml"
            assert wbxml_status(r.body) == ("Ping", str(BLOCKED_STATUS))
            answer = "Ping Status 129 DeviceIsBlockedForThisUser (EAS 16.1)"
        else:  # drop: the connection is closed, as NetScaler's DROP
            assert r is None and ping.outcome != 200, ping.outcome
            answer = "connection reset"
        if r is not None:
            assert r.headers["Connection"] == "close"
        # the upstream connection that held the Ping is closed too
        wait_for(lambda: upstream.closed, BOUND_S, "the upstream connection closed", g)
        assert upstream.closed[0] - t0 < BOUND_S
        closed = wait_for(lambda: [a for a in audit(tmp_path) if a.get("event") == "held request closed"], 5,
                          "the audit line", g)
        assert [(a["trigger"], a["reason"], a["source"], a["command"], a["answer"]) for a in closed] == [
            ("revocation", "revoked: phone reported lost", "revoked", "Ping", answer)], closed
    finally:
        g.stop()
        upstream.stop()
