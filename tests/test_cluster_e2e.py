"""Past one machine, end to end: 3 gateway nodes (separate `easgate run` processes) + 2 `easgate
connector` processes + a real Redis + a real PostgreSQL, all started by the test on loopback.

What a user would notice: one callout per device for the whole cluster; an operator's block
reaches every node at once (not at the end of a TTL); Redis, then a connector, going away never
lets a request through that the fail mode forbids, never hangs a client, and service comes back
without a restart.
"""

from __future__ import annotations

import base64
import http.client
import json
import os
import re
import subprocess
import threading
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import SimpleNamespace

import pytest
import redis as redis_client
import yaml
from test_mitmweb import start_web

from easgate.tools.standins import ExchangeStandIn

import conftest
from conftest import ConnectorProcess, easgate_argv, https_connection, request, wait_for

ROOT = Path(__file__).resolve().parent.parent
def env() -> dict:
    """The environment now (with the session's fork server), not at import."""
    return dict(os.environ, PYTHONUNBUFFERED="1")
BASIC = {"Authorization": "Basic " + base64.b64encode(b"CONTOSO\\alice:secret").decode(),
         "User-Agent": "Apple-iPhone14C2/2008.420", "MS-ASProtocolVersion": "16.1"}
N_DEVICES = 100
BLOCKED = {f"Dev{i:03d}" for i in range(0, N_DEVICES, 5)}  # every fifth device: blocked by an operator


def sync_path(device: str) -> str:
    return f"/Microsoft-Server-ActiveSync?Cmd=Sync&User=alice&DeviceId={device}&DeviceType=iPhone"


class Connector(ConnectorProcess):
    """A real `easgate connector` process (the shared launcher); restartable on the same port."""

    def __init__(self, cfg: Path, port: int = 0) -> None:
        self.cfg = cfg
        super().__init__(ConnectorProcess.argv(cfg, "--listen", f"127.0.0.1:{port}"), env=env())
        self.wait_ready(30)

    def callouts(self) -> int:
        c = http.client.HTTPConnection("127.0.0.1", self.port, timeout=5)
        try:
            c.request("GET", "/health")
            counters = json.loads(c.getresponse().read())["counters"]
        finally:
            c.close()
        return counters.get("authorize_allow", 0) + counters.get("authorize_deny", 0)

    def restart(self) -> Connector:
        self.kill()
        return Connector(self.cfg, self.port)


@pytest.fixture
def inventory(pg_url, tmp_path):
    rows = "\n".join(f"Dev{i:03d},alice,{'yes' if f'Dev{i:03d}' in BLOCKED else 'no'}" for i in range(N_DEVICES))
    (tmp_path / "mdm.csv").write_text("device_id,user,blocked\n" + rows + "\n")
    r = subprocess.run([*easgate_argv(), "devices", "--db", pg_url, "import",
                        str(tmp_path / "mdm.csv")], capture_output=True, text=True, env=env(), timeout=60)
    assert r.returncode == 0, r.stderr
    return pg_url


@pytest.fixture
def cluster(inventory, start_gateway, pki, exchange, mdm, tmp_path, request):
    """build(redis) -> 2 connectors and 3 gateway nodes (node i asks connector i % 2)."""
    made: list[Connector] = []

    def build(redis, fail_mode: str = "deny", policy: dict | None = None, upstream=None, timeout_ms: int = 500, **auth):
        """`auth`: more authorization settings for every node (e.g. revocations); `timeout_ms` the connector's."""
        redis_client.Redis.from_url(redis.url).flushall()  # the session's Redis: nothing from earlier tests
        ccfg = tmp_path / "connector.yaml"
        ccfg.write_text(f"inventory: {inventory}\nredis: {redis.url}\n")
        conns = [Connector(ccfg), Connector(ccfg)]
        made.extend(conns)

        def config(i: int) -> Path:
            """Node i's gateway.yaml in its own directory (with its audit log); it asks connector i % 2."""
            d = tmp_path / f"node{i}"
            d.mkdir(exist_ok=True)
            cfg = conftest.authz_config(pki, upstream or exchange, mdm, d, connector=SimpleNamespace(url=conns[i % 2].url),
                                        policy=policy,
                                        cache={"allow_ttl_s": 300, "deny_ttl_s": 300, "redis": redis.url},
                                        on_connector_error=fail_mode, **auth)
            cfg["authorization"]["connector"]["timeout_ms"] = timeout_ms
            return conftest.write_config(d, cfg)

        nodes = [start_gateway(config(i), extra=["--set", "easgate_metrics=127.0.0.1:0"]) for i in range(3)]
        ns = SimpleNamespace(connectors=conns, nodes=nodes, dirs=[tmp_path / f"node{i}" for i in range(3)],
                             config=config)
        built.append(ns)
        return ns

    built: list[SimpleNamespace] = []
    yield build
    for c in made + [c for ns in built for c in ns.connectors]:  # also the ones a test restarted
        c.stop()


METRICS_RE = re.compile(r"easgate: metrics at (http://\S+/metrics)")


def shared_stats(node) -> dict[str, float]:
    """The node's easgate_shared_cache_* metrics, scraped as Prometheus text."""
    m = METRICS_RE.search(node.wait_output("metrics at"))
    text = urllib.request.urlopen(m[1], timeout=10).read().decode()
    out = {k: float(v) for k, v in re.findall(r'easgate_shared_cache_total\{event="(\w+)"\} (\S+)', text)}
    out["up"] = float(re.search(r"easgate_shared_cache_up (\S+)", text)[1])
    return out


def audit(d: Path) -> list[dict]:
    p = d / "audit.jsonl"
    return [json.loads(x) for x in p.read_text().splitlines()] if p.exists() else []


class Clients:
    """Kept-alive HTTPS connections, one per (thread, node)."""

    def __init__(self, pki, nodes) -> None:
        self.pki, self.nodes = pki, nodes
        self.local = threading.local()

    def status(self, node: int, device: str, timeout: float = 15) -> int:
        conns = self.local.__dict__.setdefault("conns", {})
        for attempt in (0, 1):
            c = conns.get(node)
            if c is None:
                c = conns[node] = https_connection(self.nodes[node].port, self.pki, timeout=timeout)
            try:
                return request(self.nodes[node].port, "POST", sync_path(device), self.pki, headers=BASIC, conn=c,
                               body=b"\x03\x01").status
            except (http.client.HTTPException, ConnectionError):
                conns.pop(node).close()  # the gateway closed a kept-alive connection: once more, fresh
                if attempt:
                    raise
        raise AssertionError("unreachable")


# ------------------------------------------------------------------------------------------------


def test_three_nodes_one_callout_per_device_for_the_whole_cluster(cluster, redis_server, pki):
    """100 devices x 102 requests (34 per node), each round of a device on all three nodes at the
    same moment: at most (and here exactly) one callout per device in the whole cluster."""
    c = cluster(redis_server, timeout_ms=5000)  # 24 clients at once on a loaded machine: no fail-mode deny
    clients = Clients(pki, c.nodes)
    devices = [f"Dev{i:03d}" for i in range(N_DEVICES)]
    jobs = [(node, d) for rnd in range(34) for d in devices for node in (rnd % 3, (rnd + 1) % 3, (rnd + 2) % 3)]
    with ThreadPoolExecutor(24) as ex:
        results = list(ex.map(lambda j: (j[1], clients.status(*j)), jobs))
    wrong = [(d, s) for d, s in results if s != (403 if d in BLOCKED else 200)]
    assert not wrong, wrong[:10]
    callouts = sum(x.callouts() for x in c.connectors)
    assert callouts == N_DEVICES, (callouts, [shared_stats(n) for n in c.nodes], [l for n in c.nodes for l in n.lines if "Redis" in l])
    # and both connectors answered: the nodes share what either one learned
    assert all(x.callouts() > 0 for x in c.connectors)


def test_a_block_reaches_every_node_within_five_seconds_without_a_ttl(cluster, redis_server, pki, inventory):
    c = cluster(redis_server)
    clients = Clients(pki, c.nodes)
    dev = "Dev001"
    assert clients.status(0, dev) == 200 and clients.status(1, dev) == 200  # cached on two nodes (TTL 300 s)
    assert sum(x.callouts() for x in c.connectors) == 1
    r = subprocess.run([*easgate_argv(), "devices", "--db", inventory, "block", dev],
                       capture_output=True, text=True, env=env(), timeout=30)  # an operator, on any machine
    assert r.returncode == 0, r.stderr
    committed = time.monotonic()  # the block is in PostgreSQL: from here, 5 s for every node

    def within_5s() -> float:
        return max(0.0, committed + 5 - time.monotonic())
    # the third node never saw the device: its first request must not be Redis's old allow
    wait_for(lambda: clients.status(2, dev) == 403, within_5s(), "a deny on the third node")
    for node in (0, 1):
        wait_for(lambda: clients.status(node, dev) == 403, within_5s(), f"a deny on node {node}")
    published = [json.loads(urllib.request.urlopen(f"http://127.0.0.1:{x.port}/health", timeout=10).read())["events"]
                 for x in c.connectors]
    assert all(p["published"] >= 1 and p["errors"] == 0 for p in published), published  # both connectors told Redis
    sources = [(e["decision"], e["source"]) for e in audit(c.dirs[0]) if e["device_id"] == dev]
    assert sources[0] == ("allow", "connector") and sources[-1][0] == "deny"


class HeldPing:
    """One Ping on its own connection to a node, in a thread, held by the upstream; when it ended."""

    def __init__(self, node, pki, device: str) -> None:
        self.conn = https_connection(node.port, pki, timeout=90)
        self.path = f"/Microsoft-Server-ActiveSync?Cmd=Ping&User=alice&DeviceId={device}&DeviceType=iPhone"
        self.port, self.ended, self.outcome = node.port, None, None
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        try:
            self.outcome = request(self.port, "POST", self.path, None, headers=BASIC, body=b"\x03\x01\x6a\x00",
                                   conn=self.conn).status
        except Exception as e:  # noqa: BLE001 - a reset is the expected end
            self.outcome = type(e).__name__
        self.ended = time.monotonic()


def test_a_block_ends_held_pings_on_two_nodes_within_five_seconds(cluster, redis_server, pki, inventory):
    """A device holds a Ping on node 0 and one on node 1 (the upstream holds Pings for 60 s); an
    operator blocks it on one connector: both Pings end within 5 s (cut, never answered by
    Exchange), each node's audit log says why, and its next request on node 2 is denied."""
    holding = ExchangeStandIn("holding-exchange", tls=(pki / "exchange.pem", pki / "exchange.key"), hold_s=60).start()
    try:
        c = cluster(redis_server, upstream=holding)
        dev = "Dev007"
        pings = [HeldPing(c.nodes[n], pki, dev) for n in (0, 1)]
        wait_for(lambda: len([r for r in holding.requests() if "Cmd=Ping" in r["path"]]) == 2, 20,
                 "both Pings held at Exchange")
        r = subprocess.run([*easgate_argv(), "devices", "--db", inventory, "block", dev],
                           capture_output=True, text=True, env=env(), timeout=30)
        assert r.returncode == 0, r.stderr
        committed = time.monotonic()
        for p in pings:
            p.thread.join(max(0.1, committed + 7 - time.monotonic()))
        ended = [(p.outcome, round(p.ended - committed, 2) if p.ended else None) for p in pings]
        assert all(p.ended is not None and p.ended - committed < 5 for p in pings), ended
        assert all(p.outcome != 200 for p in pings), ended
        for n in (0, 1):  # the line is queued as the Ping is cut: the client may see the cut first
            closed = wait_for(lambda: [e for e in audit(c.dirs[n]) if e.get("event") == "held request closed"], 5,
                              f"node {n}'s audit line for the cut Ping {ended}", c.nodes[n])
            assert closed[-1]["device_id"] == dev and closed[-1]["trigger"] == "cluster revocation", closed
        assert Clients(pki, c.nodes).status(2, dev) == 403
    finally:
        holding.stop()


def test_a_policy_reload_on_one_node_drops_cached_decisions_on_every_node(cluster, redis_server, pki):
    policy = {"mode": "block", "deny": {"user_agents": ["*BlackBerry*"]}}
    c = cluster(redis_server, policy=policy)
    clients = Clients(pki, c.nodes)
    assert [clients.status(n, "Dev002") for n in (1, 2, 1, 2)] == [200] * 4
    before = sum(x.callouts() for x in c.connectors)
    assert before == 1
    policy["deny"]["user_agents"].append("*Nokia*")  # an edit on node 0 only (a deploy in progress)
    (c.dirs[0] / "policy.yaml.new").write_text(yaml.safe_dump(policy))
    os.replace(c.dirs[0] / "policy.yaml.new", c.dirs[0] / "policy.yaml")  # replaced, as easgate policy install does
    c.nodes[0].wait_output("policy reloaded", 10)  # node 0 checks its file every 2 s
    reloaded = time.monotonic()

    def asks_again() -> bool:  # node 1's local allow (TTL 300 s) is gone: it asks a connector again
        return clients.status(1, "Dev002") == 200 and sum(x.callouts() for x in c.connectors) > before
    wait_for(asks_again, max(0.0, reloaded + 5 - time.monotonic()), "node 1 dropping its cached decision")


def test_redis_then_a_connector_down_no_forbidden_allow_no_hang_and_recovery(cluster, own_redis, pki):
    """Load on all three nodes; each phase asks for devices no node has cached yet, so every phase
    really decides: 0 all up, 1 Redis killed, 2 Redis and connector 0 (behind nodes 0 and 2)
    killed, 3 both back (Redis restarted on its port, the connector on its port)."""
    c = cluster(own_redis, fail_mode="deny")
    clients = Clients(pki, c.nodes)
    phases = [[f"Dev{i:03d}" for i in range(p * 20, p * 20 + 20)] for p in range(4)]
    phase = [0]
    results: list[tuple[int, str, int, int, float]] = []  # (phase, device, node, status, seconds)
    errors: list[str] = []
    stop = threading.Event()

    def load(worker: int) -> None:
        i = worker
        while not stop.is_set():
            p = phase[0]
            dev, node = phases[max(p, 0)][i % 20], (i // 20 + worker) % 3
            t = time.monotonic()
            try:
                s = clients.status(node, dev, timeout=10)
            except Exception as e:  # noqa: BLE001 - a hung or broken client is what we look for
                errors.append(f"{dev}@{node}: {type(e).__name__}: {e}")
            else:  # a request that straddles a phase change counts for no phase (but for the checks on all)
                results.append((p if phase[0] == p else -1, dev, node, s, time.monotonic() - t))
            i += 7

    def in_phase(p: int) -> int:
        return sum(1 for r in results if r[0] == p)

    threads = [threading.Thread(target=load, args=(w,)) for w in range(6)]
    for t in threads:
        t.start()
    try:
        wait_for(lambda: in_phase(0) > 60, 60, "load before the outage")
        phase[0] = -1  # in between: what is sent now counts for no phase
        own_redis.kill()
        phase[0] = 1
        wait_for(lambda: in_phase(1) > 60, 60, "load with Redis down")
        phase[0] = -1
        c.connectors[0].kill()  # nodes 0 and 2 lose their connector
        phase[0] = 2
        wait_for(lambda: in_phase(2) > 60, 60, "load with Redis and a connector down")
        phase[0] = -1
        own_redis.start()
        c.connectors[0] = c.connectors[0].restart()
        phase[0] = 3
        wait_for(lambda: in_phase(3) > 60, 60, "load after recovery")
    finally:
        stop.set()
        for t in threads:
            t.join(30)
    assert not errors, errors[:5]
    assert max(r[4] for r in results) < 10  # no hung client: every answer well within its timeout
    forbidden = [r for r in results if r[1] in BLOCKED and r[3] != 403]
    assert not forbidden, forbidden[:5]
    # phase 1 (Redis down): every node still decides from its connector
    assert {r[3] for r in results if r[0] == 1 and r[1] not in BLOCKED} == {200}
    # phase 2: node 1 (its connector up) still serves; nodes 0 and 2 deny what they have not cached
    assert {r[3] for r in results if r[0] == 2 and r[2] == 1 and r[1] not in BLOCKED} == {200}
    assert 403 in {r[3] for r in results if r[0] == 2 and r[2] != 1 and r[1] not in BLOCKED}
    # on_connector_error=deny: no allow was ever decided by the fail mode, on any node
    for d in c.dirs:
        entries = audit(d)
        assert not [e for e in entries if e["decision"] == "allow" and e["source"] == "fail-mode"]
    assert any(e["source"] == "fail-mode" for d in (c.dirs[0], c.dirs[2]) for e in audit(d))  # it was down
    # recovery without a restart: a device nobody asked for yet is allowed on every node, and costs one
    # callout for the whole cluster once the nodes use Redis again
    fresh = iter(f"Dev{i:03d}" for i in range(81, N_DEVICES) if f"Dev{i:03d}" not in BLOCKED)

    def shared_again() -> bool:
        dev = next(fresh)
        b = sum(x.callouts() for x in c.connectors)
        ok = [clients.status(n, dev) for n in (0, 1, 2)] == [200, 200, 200]
        return ok and sum(x.callouts() for x in c.connectors) - b == 1
    wait_for(shared_again, 10, "every node allowing a new device with one callout in all")
    for node in c.nodes:  # each node noticed the outage (counted) and is back on Redis, no restart
        stats = shared_stats(node)
        assert stats["redis_errors"] >= 1 and stats["up"] == 1, stats
        # logged once per burst, not per request (the event channel and the requests may each notice)
        assert len(re.findall(r"Redis \S+ unreachable", node.output)) <= 3, node.output


# ------------------------------------------------------------------------------------------------
# Revocations made on one node reach every node (through Redis)


def closed_by_revocation(d: Path, dev: str) -> list[dict]:
    return [e for e in audit(d) if e.get("event") == "held request closed" and e["device_id"] == dev]


def denies(d: Path, dev: str) -> list[tuple[str, str]]:
    """(reason, source) of the node's audited denies of the device, once there is one (the line may
    follow the answer by a moment). A request allowed just before the revocation arrived and still
    in flight is ended by it: its deny is the `held request closed` line."""
    return wait_for(lambda: [(e["reason"], e["source"]) for e in audit(d)
                             if e.get("device_id") == dev and e.get("decision") == "deny"
                             and e.get("event") in (None, "held request closed")],
                    5, f"a deny of {dev} in {d / 'audit.jsonl'}")


def test_easgate_revoke_on_one_node_ends_held_pings_on_two_others_and_binds_nodes_started_later(
        cluster, redis_server, pki, start_gateway):
    """Node A is `easgate web` (the mitmproxy command bar); the device holds a Ping on nodes B and C
    (`easgate run`); `easgate.revoke` on A: both Pings end within 5 s, B's and C's audit logs say
    revoked, the device's next request on a third node is denied, and so on a node started after
    the revocation; `easgate.unrevoke` on A lets it back in everywhere."""
    holding = ExchangeStandIn("holding-exchange", tls=(pki / "exchange.pem", pki / "exchange.key"), hold_s=60).start()
    try:
        c = cluster(redis_server, upstream=holding)
        web, w = start_web(c.config(3))
        try:
            dev = "Dev011"
            pings = [HeldPing(c.nodes[n], pki, dev) for n in (0, 1)]
            wait_for(lambda: len([r for r in holding.requests() if "Cmd=Ping" in r["path"]]) == 2, 20,
                     "both Pings held at Exchange")
            t0 = time.monotonic()
            out = w.command("easgate.revoke", "alice", dev)
            assert out == (f"revoked alice on {dev}: this process only (no authorization.revocations file configured), "
                           f"and every node through Redis {redis_server.url}")
            for p in pings:
                p.thread.join(max(0.1, t0 + 7 - time.monotonic()))
            ended = [(p.outcome, round(p.ended - t0, 2) if p.ended else None) for p in pings]
            assert all(p.ended is not None and p.ended - t0 < 5 for p in pings), ended
            assert all(p.outcome != 200 for p in pings), ended  # cut, never answered by Exchange
            for n in (0, 1):
                closed = wait_for(lambda: closed_by_revocation(c.dirs[n], dev), 5, f"node {n}'s audit line")
                assert [(e["trigger"], e["reason"], e["source"], e["command"]) for e in closed] == [
                    ("revocation", "revoked: easgate.revoke", "revoked", "Ping")], closed
            clients = Clients(pki, c.nodes)
            assert clients.status(2, dev) == 403  # its next request on the third node
            assert denies(c.dirs[2], dev) == [("revoked: easgate.revoke", "revoked")]
            assert clients.status(2, "Dev012") == 200  # only that device
            # easgate.cluster.revoke only drops decisions: the next request asks a connector again, no deny
            before = sum(x.callouts() for x in c.connectors)
            assert w.command("easgate.cluster.revoke", "Dev012") == (
                "cached decisions of Dev012 dropped on every node; its next request asks the connector")
            wait_for(lambda: clients.status(2, "Dev012") == 200 and sum(x.callouts() for x in c.connectors) > before,
                     5, "node 2 asking a connector again")
            late_cfg = c.config(4)
            late = start_gateway(late_cfg)  # a node that starts after the revocation
            assert Clients(pki, [late]).status(0, dev) == 403
            assert denies(late_cfg.parent, dev) == [("revoked: easgate.revoke", "revoked")]
            assert w.command("easgate.unrevoke", "alice", dev).startswith(f"restored alice on {dev}: ")
            wait_for(lambda: clients.status(2, dev) == 200 and Clients(pki, [late]).status(0, dev) == 200, 5,
                     "the device allowed again on every node")
        finally:
            web.stop()
    finally:
        holding.stop()


def test_a_revocation_while_redis_is_down_applies_here_and_reaches_the_others_when_it_is_back(cluster, own_redis, pki):
    """`easgate revoke` on node 0's machine while Redis is down: node 0 denies at once (its file);
    the others cannot know yet; when Redis is back node 0 pushes it, and every node denies it. A
    restore with Redis up lifts it everywhere."""
    c = cluster(own_redis, revocations="revocations.jsonl")
    clients = Clients(pki, c.nodes)
    dev = "Dev013"
    assert [clients.status(n, dev) for n in range(3)] == [200, 200, 200]  # cached on every node (TTL 300 s)
    own_redis.kill()
    revoke = easgate_argv("revoke", str(c.dirs[0] / "gateway.yaml"), "alice", dev, "--reason", "phone reported lost")
    r = subprocess.run(revoke, capture_output=True, text=True, env=env(), timeout=30)
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith(f"revoked alice on {dev} in {c.dirs[0] / 'revocations.jsonl'}: every worker denies it")
    assert "revoked on this machine only for now: Redis" in r.stderr and "unreachable" in r.stderr, r.stderr
    wait_for(lambda: clients.status(0, dev) == 403, 5, "node 0 denying it")
    assert denies(c.dirs[0], dev)[-1] == ("revoked: phone reported lost", "revoked")
    assert clients.status(1, dev) == 200  # honest: with Redis down, another node has no way to learn it
    c.nodes[0].wait_output("applies on this node only until Redis", 10)
    own_redis.start()  # empty (no persistence): what it knows now comes from the nodes
    wait_for(lambda: clients.status(1, dev) == 403 and clients.status(2, dev) == 403, 15,
             "nodes 1 and 2 denying it once Redis is back")
    assert denies(c.dirs[1], dev)[-1] == ("revoked: phone reported lost", "revoked")
    stored = redis_client.Redis.from_url(own_redis.url, decode_responses=True).hgetall("easgate:revocations")
    assert list(stored) == [f"{dev.lower()}|alice"] and '"action":"revoke"' in stored[f"{dev.lower()}|alice"]
    restore = easgate_argv("revoke", str(c.dirs[0] / "gateway.yaml"), "alice", dev, "--restore")
    r = subprocess.run(restore, capture_output=True, text=True, env=env(), timeout=30)
    assert r.returncode == 0 and f"and Redis {own_redis.url}" in r.stdout and not r.stderr, r.stdout + r.stderr
    wait_for(lambda: [clients.status(n, dev) for n in range(3)] == [200, 200, 200], 5, "every node allowing it again")
