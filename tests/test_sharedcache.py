"""The Redis tier of the decision cache, two "nodes" (SharedCache instances) on one real Redis.

The cross-process proof is tests/test_cluster_e2e.py; these pin the rules one at a time.
"""

from __future__ import annotations

import asyncio
import subprocess
import time
from types import SimpleNamespace

import pytest
import redis as redis_client

from easgate.authz.cache import DecisionCache
from easgate.authz.revocations import RevocationTable, lookup, make_record
from easgate.core.decision import Decision
from easgate.core.errors import ConfigError
from easgate.gateway.config import load_config
from easgate.gateway.sharedcache import SharedCache

import conftest

ALLOW = Decision(True, "device managed and compliant", "connector")
DENY = Decision(False, "device blocked in the inventory", "connector")
KEY = ("CONTOSO\\alice", "ApplF17ABCDEF01")  # as the request carried them (authz.cache.cache_key)


async def until(cond, timeout: float = 5.0, what: str = "condition") -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if cond():
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"{what} not within {timeout}s")


@pytest.fixture
async def nodes(redis_server):
    """make(digest) -> a started SharedCache with its own local cache (a "node"); closed at the end."""
    redis_client.Redis.from_url(redis_server.url).flushall()
    made: list[SharedCache] = []

    def make(digest: str = "p1") -> SharedCache:
        s = SharedCache(redis_server.url, DecisionCache(300, 30, 1000), lock_ms=2000, digest=lambda: digest)
        s.start()
        made.append(s)
        return s

    yield make
    for s in made:
        await s.close()


def ttl(d: Decision) -> float:
    return 300.0 if d.allow else 30.0


class Backend:
    def __init__(self, answer: Decision = ALLOW, delay_s: float = 0.0) -> None:
        self.answer, self.delay_s, self.calls = answer, delay_s, 0

    async def __call__(self) -> Decision:
        self.calls += 1
        await asyncio.sleep(self.delay_s)
        return self.answer


async def subscribed(*caches: SharedCache) -> None:
    await until(lambda: all(c.counters["subscribed"] for c in caches), what="subscribed")


async def test_one_backend_call_for_concurrent_misses_on_several_nodes(nodes):
    a, b, c = nodes(), nodes(), nodes()
    await subscribed(a, b, c)
    backend = Backend(delay_s=0.2)
    got = await asyncio.gather(*(n.fetch(KEY, backend, ttl) for n in (a, b, c, a, b, c)))
    assert backend.calls == 1
    assert {d for d, _ in got} == {ALLOW}
    left = [t for _, t in got if t is not None]  # the others' answers came from Redis, with the time left
    assert len(left) == 5 and all(290 < t <= 300 for t in left)


async def test_another_spelling_of_the_device_id_is_not_answered_from_the_shared_tier(nodes):
    a, b = nodes(), nodes()
    await a.fetch(KEY, Backend(ALLOW), ttl)
    other = Backend(DENY)
    assert (await b.fetch((KEY[0], KEY[1].upper()), other, ttl)) == (DENY, None) and other.calls == 1


async def test_fail_mode_decisions_are_never_shared(nodes):
    a, b = nodes(), nodes()
    failed = Backend(Decision(True, "connector down; allowed by on_connector_error=allow", "fail-mode"))
    assert (await a.fetch(KEY, failed, ttl))[0].source == "fail-mode"
    fresh = Backend(DENY)
    assert (await b.fetch(KEY, fresh, ttl)) == (DENY, None)  # b asked its own backend
    assert fresh.calls == 1


async def test_a_failed_callout_lets_waiting_nodes_ask_their_own_connector_at_once(nodes):
    a, b = nodes(), nodes()
    await subscribed(a, b)
    down = Backend(Decision(False, "connector unreachable; denied by on_connector_error=deny", "fail-mode"),
                   delay_s=0.3)
    holder = asyncio.ensure_future(a.fetch(KEY, down, ttl))
    await until(lambda: down.calls == 1, what="a's callout started")
    healthy = Backend(ALLOW)
    assert (await b.fetch(KEY, healthy, ttl)) == (ALLOW, None)  # waited for a, then asked its own
    assert (await holder)[0].source == "fail-mode"
    assert healthy.calls == 1 and b.counters["shared_waits"] >= 1 and b.counters["shared_after_failure"] == 1


async def test_a_revocation_on_one_node_reaches_the_others_and_redis(nodes):
    a, b = nodes(), nodes()
    await subscribed(a, b)
    await a.fetch(KEY, Backend(), ttl)
    b.local.put(KEY, ALLOW)  # b holds it locally too
    ended: list[str] = []
    b.on_revoke.append(ended.append)  # where held long polls of the device end
    assert await a.revoke("ApplF17ABCDEF01")
    await until(lambda: KEY not in b.local, what="b dropped the device")
    assert ended == ["ApplF17ABCDEF01"]
    backend = Backend(DENY)
    assert (await b.fetch(KEY, backend, ttl)) == (DENY, None) and backend.calls == 1  # Redis forgot it too


async def test_an_answer_in_flight_during_a_revocation_is_not_stored(nodes):
    a, b = nodes(), nodes()
    slow = Backend(ALLOW, delay_s=0.3)
    task = asyncio.ensure_future(a.fetch(KEY, slow, ttl))
    await until(lambda: slow.calls == 1, what="the callout started")
    await b.revoke("applf17abcdef01")  # the operator's block lands while the allow is on its way
    assert (await task)[0] == ALLOW  # that request was decided before the block
    assert a.counters["shared_stores_refused"] == 1
    after = Backend(DENY)
    assert (await b.fetch(KEY, after, ttl))[0] == DENY and after.calls == 1


async def test_policy_digest_and_cluster_clear_keep_old_decisions_out(nodes):
    a, b = nodes("policy-v1"), nodes("policy-v2")
    await subscribed(a, b)
    await a.fetch(KEY, Backend(ALLOW), ttl)
    other = Backend(DENY)
    assert (await b.fetch(KEY, other, ttl))[0] == DENY and other.calls == 1  # another policy: not shared
    a.local.put(KEY, ALLOW)
    b.local.put(KEY, DENY)
    assert await b.clear_all()  # a policy reload or easgate.cache.clear on one node
    await until(lambda: len(a.local) == 0, what="a's local cache cleared")
    again = Backend(DENY)
    assert (await a.fetch(KEY, again, ttl))[0] == DENY and again.calls == 1  # the old epoch's allow is gone


async def test_garbage_in_redis_never_allows(nodes, redis_server):
    a = nodes()
    r = redis_client.Redis.from_url(redis_server.url)
    r.hset("easgate:d:applf17abcdef01", f"0|p1|{KEY[0]}|{KEY[1]}", f"{int(time.time() * 1000) + 10**9}|"
           '{"allow": true, "reason": "x", "source": "fail-mode"}')
    backend = Backend(DENY)
    assert (await a.fetch(KEY, backend, ttl))[0] == DENY and backend.calls == 1
    assert a.counters["redis_bad_entries"] >= 1


async def test_redis_down_is_the_backend_alone_then_recovers(own_redis):
    s = SharedCache(own_redis.url, DecisionCache(300, 30, 1000), lock_ms=2000, retry_s=0.2)
    s.start()
    try:
        await until(lambda: s.counters["subscribed"] == 1, what="subscribed")
        own_redis.kill()
        backend = Backend(DENY)
        t = time.monotonic()
        assert (await s.fetch(KEY, backend, ttl)) == (DENY, None) and backend.calls == 1
        assert (await s.fetch(KEY, backend, ttl)) == (DENY, None) and backend.calls == 2
        assert time.monotonic() - t < 3 and not s.up and s.counters["redis_errors"] >= 1
        own_redis.start()
        await until(lambda: s.counters["subscribed"] == 2, 10, "re-subscribed")
        s.local.put(("x", "y"), ALLOW)
        await until(lambda: s.up, 5, "circuit closed")
        await s.fetch(KEY, Backend(ALLOW), ttl)
        assert s.down_since is None and s.counters["shared_misses"] >= 1
    finally:
        await s.close()


# ------------------------------------------------------------------------------------------------
# Revocation records: kept in Redis, published, re-synced


class Node:
    """What a gateway does with the cluster's revocation records (ActiveSyncGate.cluster_revocation)."""

    def __init__(self, s: SharedCache, own: list[dict] = ()) -> None:
        self.s, self.table, self.own = s, RevocationTable(), RevocationTable()
        for r in own:
            self.own.apply(r, newest_wins=False)
        s.on_revocation.append(lambda r: self.table.apply(r, newest_wins=True))
        s.known_revocations = lambda: [*self.own.all(), *self.table.all()]

    def revoked(self, user: str = "CONTOSO\\alice", device: str = KEY[1]) -> bool:
        return lookup(user, device, self.own, self.table) is not None  # as the gateway looks: the later record


def revocation(action: str = "revoke", ts_s: float | None = None, user: str | None = "alice") -> dict:
    return make_record(user, KEY[1], "phone reported lost", action, now=ts_s)


async def test_a_revocation_record_reaches_every_node_and_one_started_later(nodes, redis_server):
    a, b = Node(nodes()), Node(nodes())
    await subscribed(a.s, b.s)
    assert await a.s.put_revocation(revocation())
    await until(lambda: b.revoked(), what="b knows the revocation")
    assert not b.revoked("bob")  # it names alice, not every user of the device
    stored = redis_client.Redis.from_url(redis_server.url, decode_responses=True).hgetall("easgate:revocations")
    assert list(stored) == [f"{KEY[1].lower()}|alice"]
    late = Node(nodes())  # a node that starts after the revocation
    await late.s.ready()
    assert late.revoked() and late.s.counters["revocation_syncs"] == 1


async def test_the_later_record_wins_whatever_order_nodes_push_in(nodes):
    """A restore made while a node was cut off is not undone when that node pushes its older revoke."""
    old, new = revocation("revoke", ts_s=1000.0), revocation("restore", ts_s=2000.0)
    a = Node(nodes())
    await subscribed(a.s)
    assert await a.s.put_revocation(new)
    cut_off = Node(nodes(), own=[old])  # it knew only the revoke; on subscribing it pushes what it knows
    await cut_off.s.ready()
    assert not cut_off.revoked() and not a.revoked()
    assert cut_off.s.counters["revocations_published"] == 0  # Redis kept the restore: nothing to tell anyone
    again = revocation("revoke", ts_s=3000.0)  # and a later revoke beats that restore
    assert await cut_off.s.put_revocation(again)
    await until(lambda: a.revoked(), what="the later revoke on a")


async def test_a_revocation_while_redis_is_down_is_pushed_when_it_is_back(own_redis):
    s = SharedCache(own_redis.url, DecisionCache(300, 30, 1000), lock_ms=2000, retry_s=0.2)
    other = SharedCache(own_redis.url, DecisionCache(300, 30, 1000), lock_ms=2000, retry_s=0.2)
    a, b = Node(s), Node(other)
    s.start(), other.start()
    try:
        await subscribed(s, other)
        own_redis.kill()
        rec = revocation()
        a.own.apply(rec, newest_wins=False)  # the gateway applies it here first, whatever Redis does
        t = time.monotonic()
        assert not await s.put_revocation(rec)
        assert time.monotonic() - t < 3 and s.counters["revocations_unsent"] == 1
        own_redis.start()  # empty: TestRedis keeps nothing
        await until(lambda: b.revoked(), 10, "the other node learning it once Redis is back")
        assert redis_client.Redis.from_url(own_redis.url).hlen("easgate:revocations") == 1
        assert s.counters["revocations_published"] == 1  # it went out on the channel once it was in
    finally:
        await s.close()
        await other.close()


async def test_garbage_revocation_records_in_redis_are_skipped(nodes, redis_server):
    r = redis_client.Redis.from_url(redis_server.url)
    r.hset("easgate:revocations", mapping={"x|*": "not a record", "y|*": '1|1|{"action": "allow", "device_id": "y"}'})
    n = Node(nodes())
    await n.s.ready()
    assert n.s.counters["bad_revocations"] == 2
    r.publish("easgate:events", '{"t": "revocation", "v": "1|1|[]"}')
    await until(lambda: n.s.counters["bad_revocations"] == 3, what="the garbage event")
    assert len(n.table) == 0


def test_easgate_revoke_with_redis_and_no_file_writes_redis_and_says_when_it_cannot(own_redis, tmp_path, pki,
                                                                                   exchange, mdm):
    """A config with cache.redis but no revocations file: `easgate revoke` stores the record in Redis
    (every node reads it there); with Redis down nothing is stored, and it says so in one line."""
    cfg = conftest.authz_config(pki, exchange, mdm, tmp_path, connector=SimpleNamespace(url="http://127.0.0.1:9/x"),
                                cache={"redis": own_redis.url})
    path = str(conftest.write_config(tmp_path, cfg))
    r = subprocess.run(conftest.easgate_argv("revoke", path, "*", "Andr1", "--reason", "stolen"),
                       capture_output=True, text=True, timeout=30)
    assert r.returncode == 0 and r.stdout.startswith(f"revoked * on Andr1 in Redis {own_redis.url}: every node"), r
    stored = redis_client.Redis.from_url(own_redis.url, decode_responses=True).hgetall("easgate:revocations")
    assert list(stored) == ["andr1|*"] and '"reason":"stolen"' in stored["andr1|*"]
    own_redis.kill()
    r = subprocess.run(conftest.easgate_argv("revoke", path, "*", "Andr2"), capture_output=True, text=True, timeout=30)
    assert r.returncode == 2 and r.stderr.startswith("easgate revoke: nothing stored: Redis ") and not r.stdout
    assert len(r.stderr.strip().splitlines()) == 1, r.stderr


@pytest.mark.parametrize("value, problem", [
    ("http://10.0.0.5:6379", "authorization.cache.redis: 'http://10.0.0.5:6379' is not a Redis URL (e.g. redis://"),
    (["redis://a"], "authorization.cache.redis: "),
])
def test_gateway_config_redis_url(tmp_path, pki, exchange, mdm, value, problem):
    ok = conftest.authz_config(pki, exchange, mdm, tmp_path, connector=SimpleNamespace(url="http://127.0.0.1:9/x"),
                               cache={"redis": "redis://10.0.0.5:6379/0"})
    assert load_config(conftest.write_config(tmp_path, ok)).authorization.cache.redis == "redis://10.0.0.5:6379/0"
    bad = conftest.authz_config(pki, exchange, mdm, tmp_path, connector=SimpleNamespace(url="http://127.0.0.1:9/x"),
                                cache={"redis": value})
    with pytest.raises(ConfigError) as e:
        load_config(conftest.write_config(tmp_path, bad))
    assert problem in str(e.value) and "\n" not in str(e.value)
