"""One device, one budget: per-device rate limits counted across every worker of a machine
(`easgate run --workers 2`, a table both workers map) and across gateway nodes sharing Redis
(`cache.redis`), with Redis down falling back to the machine's count, logged once. Real gateway
processes, real TLS clients opening a new connection per request (so the kernel spreads one
device's requests over both workers), a real stand-in Exchange, a real redis-server."""

from __future__ import annotations

import base64
import json
import re
from pathlib import Path

import redis as redis_client

import conftest
from conftest import GatewayProcess, easgate_argv, request, wait_for

IPHONE = "ApplF17ABCDEF01"
POLICY = {"mode": "permit", "inventory": [{"device_id": IPHONE, "owner": "alice", "compliant": True}]}
BASIC = {"Authorization": "Basic " + base64.b64encode(b"alice:pw").decode(), "MS-ASProtocolVersion": "16.1",
         "Content-Type": "application/vnd.ms-sync.wbxml"}
SYNC = f"/Microsoft-Server-ActiveSync?Cmd=Sync&User=alice&DeviceId={IPHONE}&DeviceType=iPhone"
CONNECT = re.compile(r"^\[w(\d+)\]\[[\d:.]+\]\[127\.0\.0\.1:(\d+)\] client connect")
BUDGET = 5


def limited(pki, exchange, mdm, tmp_path: Path, **auth) -> dict:
    return conftest.authz_config(pki, exchange, mdm, tmp_path, policy=POLICY,
                                 rate_limits=[{"name": "per-device", "requests": BUDGET, "per_s": 3600}], **auth)


def start(cfg: dict, tmp_path: Path, workers: int, name: str = "gateway.yaml") -> GatewayProcess:
    g = GatewayProcess(easgate_argv("run", str(conftest.write_config(tmp_path, cfg, name)), "--listen", "127.0.0.1:0",
                                    "--workers", str(workers), "--", *conftest.LOG_CONNECTIONS))
    g.wait_ready(30)
    if workers > 1:
        g.wait_output("workers serving", 30)
    return g


def audit(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def sync(port: int, pki: Path):
    """One Sync on a connection of its own; (its client port, the response)."""
    conn = conftest.https_connection(port, pki)
    local = conn.sock.getsockname()[1]
    return local, request(port, "POST", SYNC, None, headers=BASIC, body=b"\x03\x01\x6a\x00", conn=conn)


def test_one_devices_budget_is_one_budget_across_two_workers(pki, exchange, mdm, tmp_path):
    g = start(limited(pki, exchange, mdm, tmp_path), tmp_path, workers=2)
    try:
        sent: list[tuple[int, object]] = []
        served: dict[int, int] = {}

        def workers_by_port() -> dict[int, int]:
            return {int(m[2]): int(m[1]) for ln in list(g.lines) if (m := CONNECT.search(ln))}

        # at least three budgets' worth of requests, until both workers have served some past the budget
        while len(sent) < 3 * BUDGET or {served.get(p) for p, _ in sent[BUDGET:]} < {1, 2}:
            assert len(sent) < 60, f"the requests never reached both workers\n{g.output}"
            sent.append(sync(g.port, pki))
            served = wait_for(lambda: s if sent[-1][0] in (s := workers_by_port()) else None, 5, "the connect line", g)
        statuses = [r.status for _, r in sent]
        by_worker = {w: [r.status for p, r in sent if served[p] == w] for w in (1, 2)}
        # one budget for the device, not one per worker
        assert statuses.count(200) == BUDGET and statuses[:BUDGET] == [200] * BUDGET, (statuses, by_worker)
        assert set(statuses[BUDGET:]) == {503}, (statuses, by_worker)
        # both workers answered 503 once the shared budget was spent (on main the second one allowed them)
        assert all(503 in s for s in by_worker.values()), by_worker
        retry = [int(r.headers["Retry-After"]) for _, r in sent if r.status == 503]
        assert all(3500 <= s <= 3600 + 3600 / 63 + 1 for s in retry), retry
        assert len([r for r in exchange.requests() if r["method"] == "POST"]) == BUDGET
        log = [a for a in audit(tmp_path / "audit.jsonl") if a.get("device_id") == IPHONE]
        assert [a["decision"] for a in log].count("allow") == BUDGET
        assert {(a["source"], a["rule"]) for a in log if a["decision"] == "deny"} == {("rate-limit", "per-device")}
        # another device has its own budget
        other = request(g.port, "POST", SYNC.replace(IPHONE, "ApplDMPQ99887766"), pki, headers=BASIC, body=b"")
        assert other.status == 200
    finally:
        g.stop()


def test_two_nodes_sharing_redis_share_the_budget_and_fall_back_when_redis_is_down(pki, exchange, mdm, tmp_path,
                                                                                  own_redis):
    cache = {"redis": own_redis.url}
    a = start(limited(pki, exchange, mdm, tmp_path, cache=cache), tmp_path, workers=1, name="a.yaml")
    b = start(limited(pki, exchange, mdm, tmp_path, cache=cache), tmp_path, workers=1, name="b.yaml")
    try:
        # the device's requests alternate between the two nodes: one budget for both
        got = [sync(g.port, pki)[1] for _ in range(BUDGET + 1) for g in (a, b)]
        statuses = [r.status for r in got]
        assert statuses.count(200) == BUDGET and set(statuses[BUDGET:]) == {503}, statuses
        assert all(3500 <= int(r.headers["Retry-After"]) <= 3600 for r in got[BUDGET:])  # the oldest leaves the window
        # Redis down: each node counts on its own (a fresh budget there), said once per burst, not per request
        own_redis.kill()
        local = [sync(a.port, pki)[1].status for _ in range(BUDGET + 2)]
        assert local == [200] * BUDGET + [503] * 2, local
        said = "rate limits are counted by this worker process until it is back"
        a.wait_output(said, 5)
        assert a.output.count(said) == 1, a.output
        # back (empty: no persistence): once a request finds it, Redis counts for both nodes again
        own_redis.start()

        def recovered() -> bool:
            if "rate limits are counted in Redis again" in a.output:
                return True
            sync(a.port, pki)  # the next request after the retry interval tries Redis again
            return False

        wait_for(recovered, 15, "Redis counting again", a)
        redis_client.Redis.from_url(own_redis.url).flushall()
        statuses = [sync(g.port, pki)[1].status for _ in range(BUDGET + 1) for g in (b, a)]
        assert statuses.count(200) == BUDGET and set(statuses[BUDGET:]) == {503}, statuses
    finally:
        a.stop()
        b.stop()
