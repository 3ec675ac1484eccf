"""The decision cache: TTLs, LRU bound, stale reads, single flight."""

from __future__ import annotations

import asyncio

import pytest

from easgate.authz.cache import DecisionCache, cache_key
from easgate.core.decision import Decision

ALLOW = Decision(True, "device A managed and compliant", "inventory")
DENY = Decision(False, "device B not managed", "mode")


class FakeClock:
    def __init__(self, t: float = 1000.0):
        self.t = t

    def __call__(self) -> float:
        return self.t

    def advance(self, s: float) -> None:
        self.t += s


@pytest.fixture
def clock():
    return FakeClock()


def test_cache_key():
    # exact: the decision source decides what case means (a connector may tell allowed1 from ALLOWED1)
    assert cache_key("CONTOSO\\Alice", "ApplABC") == ("CONTOSO\\Alice", "ApplABC")
    assert cache_key("alice", "allowed1") != cache_key("alice", "ALLOWED1")
    assert cache_key("alice@contoso.com", "X") != cache_key("CONTOSO\\alice", "X")


def test_separate_allow_and_deny_ttls(clock):
    c = DecisionCache(allow_ttl_s=300, deny_ttl_s=30, max_entries=100, clock=clock)
    c.put(("alice", "a"), ALLOW)
    c.put(("bob", "b"), DENY)
    assert c.get(("alice", "a")) is ALLOW
    assert c.get(("bob", "b")) is DENY
    clock.advance(29.9)
    assert c.get(("bob", "b")) is DENY
    clock.advance(0.1)  # deny TTL reached
    assert c.get(("bob", "b")) is None
    assert c.get(("alice", "a")) is ALLOW
    clock.advance(270)  # allow TTL reached
    assert c.get(("alice", "a")) is None
    assert c.get(("nobody", "x")) is None
    assert c.stats["hits"] == 4 and c.stats["misses"] == 3
    assert c.stats["entries"] == 2  # expired entries are kept for get_stale


def test_put_refreshes(clock):
    c = DecisionCache(10, 10, 10, clock=clock)
    c.put("k", DENY)
    clock.advance(9)
    c.put("k", ALLOW)
    clock.advance(9)
    assert c.get("k") is ALLOW


def test_zero_ttl_never_fresh_but_stale_ok(clock):
    c = DecisionCache(allow_ttl_s=60, deny_ttl_s=0, max_entries=10, clock=clock)
    c.put("k", DENY)
    assert c.get("k") is None
    assert c.get_stale("k", max_age_s=5) is DENY


def test_lru_eviction_order(clock):
    c = DecisionCache(60, 60, max_entries=3, clock=clock)
    for k in "abc":
        c.put(k, ALLOW)
    assert c.get("a") is ALLOW  # a is now most recently used: order b, c, a
    c.put("d", DENY)  # evicts b
    assert "b" not in c and all(k in c for k in "acd")
    c.put("c", ALLOW)  # re-put moves c to the end: order a, d, c
    c.put("e", ALLOW)  # evicts a
    assert "a" not in c and all(k in c for k in "cde")
    c.put("f", ALLOW)  # evicts d
    assert sorted(c._entries) == ["c", "e", "f"]
    assert c.stats["evictions"] == 3 and len(c) == 3


def test_expired_entries_are_not_touched_by_get(clock):
    c = DecisionCache(10, 10, max_entries=2, clock=clock)
    c.put("old", ALLOW)
    clock.advance(5)
    c.put("new", ALLOW)
    clock.advance(6)  # old expired, new fresh
    assert c.get("old") is None  # a miss does not make "old" recent
    c.put("third", ALLOW)
    assert "old" not in c and "new" in c


def test_get_stale(clock):
    c = DecisionCache(allow_ttl_s=60, deny_ttl_s=10, max_entries=10, clock=clock)
    c.put("k", ALLOW)
    assert c.get_stale("k", 3600) is ALLOW  # fresh counts too
    clock.advance(120)
    assert c.get("k") is None
    assert c.get_stale("k", 3600) is ALLOW
    assert c.get_stale("k", 120) is None  # exactly max_age old: too old
    assert c.get_stale("k", 121) is ALLOW
    assert c.get_stale("missing", 3600) is None
    assert c.age("k") == 120


def test_clear_and_generation(clock):
    c = DecisionCache(60, 60, 10, clock=clock)
    c.put("a", ALLOW)
    c.put("b", DENY)
    gen = c.generation
    assert c.clear() == 2
    assert len(c) == 0 and c.get("a") is None
    assert c.put("a", ALLOW, generation=gen) is False  # decided under the old policy
    assert "a" not in c
    assert c.put("a", ALLOW, generation=c.generation) is True


def test_disabled_and_validation():
    c = DecisionCache(60, 60, max_entries=0)
    c.put("a", ALLOW)
    assert c.get("a") is None and len(c) == 0
    with pytest.raises(ValueError):
        DecisionCache(-1, 60, 10)
    with pytest.raises(ValueError):
        DecisionCache(60, 60, -1)


# --------------------------------------------------------------------------- single flight


async def test_single_flight_50_callers_one_compute():
    c = DecisionCache(60, 60, 100)
    calls = 0
    release = asyncio.Event()

    async def compute():
        nonlocal calls
        calls += 1
        await release.wait()
        return ALLOW

    tasks = [asyncio.create_task(c.single_flight(("alice", "a"), compute)) for _ in range(50)]
    await asyncio.sleep(0)
    await asyncio.sleep(0)
    assert c.stats["inflight"] == 1
    release.set()
    results = await asyncio.gather(*tasks)
    assert calls == 1
    assert all(d is ALLOW for d, _ in results)
    assert sum(1 for _, shared in results if not shared) == 1
    assert sum(1 for _, shared in results if shared) == 49
    assert c.stats["inflight"] == 0 and c.stats["shared"] == 49
    assert len(c) == 0  # single_flight only deduplicates; the caller puts


async def test_single_flight_distinct_keys_compute_separately():
    c = DecisionCache(60, 60, 100)
    seen = []

    async def compute_for(k):
        seen.append(k)
        await asyncio.sleep(0)
        return ALLOW if k == "a" else DENY

    (da, sa), (db, sb) = await asyncio.gather(
        c.single_flight("a", lambda: compute_for("a")),
        c.single_flight("b", lambda: compute_for("b")),
    )
    assert (da, db, sa, sb) == (ALLOW, DENY, False, False) and sorted(seen) == ["a", "b"]


async def test_single_flight_exception_reaches_all_and_does_not_poison():
    c = DecisionCache(60, 60, 100)
    calls = 0
    release = asyncio.Event()

    class ConnectorDown(Exception):
        pass

    async def failing():
        nonlocal calls
        calls += 1
        await release.wait()
        raise ConnectorDown("connector timed out")

    tasks = [asyncio.create_task(c.single_flight("k", failing)) for _ in range(50)]
    await asyncio.sleep(0)
    release.set()
    results = await asyncio.gather(*tasks, return_exceptions=True)
    assert calls == 1
    assert len(results) == 50 and all(isinstance(r, ConnectorDown) for r in results)
    assert c.stats["inflight"] == 0

    async def ok():
        nonlocal calls
        calls += 1
        return DENY

    assert await c.single_flight("k", ok) == (DENY, False)
    assert calls == 2


async def test_single_flight_leader_cancel_does_not_cancel_others():
    c = DecisionCache(60, 60, 100)
    release = asyncio.Event()

    async def compute():
        await release.wait()
        return ALLOW

    leader = asyncio.create_task(c.single_flight("k", compute))
    await asyncio.sleep(0)
    follower = asyncio.create_task(c.single_flight("k", compute))
    await asyncio.sleep(0)
    leader.cancel()
    await asyncio.sleep(0)
    release.set()
    assert await follower == (ALLOW, True)
    with pytest.raises(asyncio.CancelledError):
        await leader


async def test_clear_detaches_inflight():
    c = DecisionCache(60, 60, 100)
    release = asyncio.Event()
    calls = []

    async def compute(tag):
        calls.append(tag)
        await release.wait()
        return ALLOW if tag == "old" else DENY

    old = asyncio.create_task(c.single_flight("k", lambda: compute("old")))
    await asyncio.sleep(0)
    c.clear()  # policy reloaded: new callers must not join the old computation
    new = asyncio.create_task(c.single_flight("k", lambda: compute("new")))
    await asyncio.sleep(0)
    release.set()
    assert await old == (ALLOW, False)
    assert await new == (DENY, False)
    assert calls == ["old", "new"]
