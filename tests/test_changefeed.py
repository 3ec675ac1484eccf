"""The pieces behind one budget per device and blocks that reach every worker, in process: the
connector's change feed (what it answers when, over real HTTP from both inventory stores), the
SQLite triggers that record changes, and the machine rate table's window (never more than the
budget in any window; Retry-After always lets the next request through)."""

from __future__ import annotations

import json
import os
import random
import subprocess
import threading
import time
import urllib.request
from pathlib import Path

import pytest

from easgate import cli
from easgate.authz.changefeed import MAX_DEVICES, decode
from easgate.authz.commands import RateLimit
from easgate.authz.ratetable import STEPS, MachineRateLimits, make_run_dir
from easgate.connector.changes import ChangeFeed
from easgate.connector.inventories import open_inventory
from easgate.connector.service import ConnectorService, ConnectorThread
from easgate.connector.store import Inventory

# ------------------------------------------------------------------------------------------------
# The feed's answers


def test_the_feed_answers_positions_changes_and_resets():
    f = ChangeFeed(keep=3)
    assert f.answer(None, None) == decode(b'{"instance": "%s", "seq": 0, "devices": [], "reset": false}'
                                          % f.instance.encode())
    assert f.answer(0, f.instance) is None  # nothing new: wait
    f.changed("Dev1")
    f.changed("Dev2")
    f.changed("Dev1")
    c = f.answer(0, f.instance)
    assert (c.seq, c.devices, c.reset) == (3, ("Dev1", "Dev2"), False)
    assert f.answer(2, f.instance).devices == ("Dev1",)
    assert f.answer(1, "another-instance").reset  # the connector restarted
    assert f.answer(9, f.instance).reset  # ahead of us: not ours
    f.changed("Dev3")  # keeps 3: seq 1 is gone, a follower at 0 cannot know what it missed
    assert f.answer(0, f.instance).reset and not f.answer(1, f.instance).reset
    f.changed("*")  # the inventory's own view was lost for a while
    assert f.answer(4, f.instance).reset and f.answer(5, f.instance) is None


def test_a_flood_of_changes_is_one_reset():
    f = ChangeFeed()
    for i in range(MAX_DEVICES + 1):
        f.changed(f"Dev{i}")
    assert f.answer(0, f.instance).reset


def test_the_sqlite_triggers_record_what_a_decision_depends_on(tmp_path):
    inv = Inventory(tmp_path / "d.db")
    inv.add("Dev1", "alice")
    inv.add("Dev2", "bob")
    start = inv.last_change()
    inv.set_blocked("Dev1", False)  # no change
    inv.touch("Dev1")
    inv.flush_seen()  # last_seen is not a change
    inv.add("Dev2", "bob")  # same values again
    assert inv.changes_since(start, 10) == []
    inv.set_blocked("dev1", True)
    inv.add("Dev2", "carol")
    inv.remove("Dev2")
    assert [d for _, d in inv.changes_since(start, 10)] == ["Dev1", "Dev2", "Dev2"]
    assert inv.prune_changes(keep_s=3600) == 0


@pytest.fixture(params=["sqlite", "postgresql"])
def store(request, tmp_path):
    target = str(tmp_path / "d.db") if request.param == "sqlite" else request.getfixturevalue("pg_url")
    assert cli.main(["devices", "--db", target, "add", "ApplF17ABCDEF01", "--user", "alice"]) == 0
    return target


def test_a_block_by_easgate_devices_is_in_the_feed_from_both_stores(store):
    svc = ConnectorThread(ConnectorService(open_inventory(store))).start()
    try:
        url = f"{svc.url}/services/easgate/changes"
        with urllib.request.urlopen(f"{url}?wait=0", timeout=5) as r:
            pos = json.loads(r.read())
        got: list[dict] = []

        def follow() -> None:
            with urllib.request.urlopen(f"{url}?since={pos['seq']}&instance={pos['instance']}&wait=10",
                                        timeout=15) as r:
                got.append(json.loads(r.read()))

        t = threading.Thread(target=follow)
        t.start()
        deadline = time.monotonic() + 5
        while svc.service.feed.followers < 1 and time.monotonic() < deadline:
            time.sleep(0.02)
        t0 = time.monotonic()
        assert cli.main(["devices", "--db", store, "block", "ApplF17ABCDEF01"]) == 0
        t.join(15)
        assert got and got[0]["devices"] == ["ApplF17ABCDEF01"] and not got[0]["reset"], got
        assert time.monotonic() - t0 < 5
        with urllib.request.urlopen(f"{svc.url}/health", timeout=5) as r:
            assert json.loads(r.read())["changes"]["seq"] == got[0]["seq"]
    finally:
        svc.stop()


@pytest.mark.parametrize("query, says", [("since=x&instance=a", "sequence number"), ("since=1", "needs the instance"),
                                         ("wait=61", "from 0 to 60"), ("wait=soon", "from 0 to 60")])
def test_a_follower_request_that_no_follower_sends_is_a_400(tmp_path, query, says):
    svc = ConnectorThread(ConnectorService(Inventory(tmp_path / "d.db"))).start()
    try:
        with pytest.raises(urllib.error.HTTPError) as e:
            urllib.request.urlopen(f"{svc.url}/services/easgate/changes?{query}", timeout=5)
        assert e.value.code == 400 and says in json.loads(e.value.read())["reason"]
    finally:
        svc.stop()


# ------------------------------------------------------------------------------------------------
# The machine rate table


@pytest.mark.parametrize("seed", range(4))
def test_the_machine_table_never_allows_more_than_the_budget_in_any_window(tmp_path, seed):
    rng = random.Random(seed)
    requests, per_s = rng.choice([(1, 10.0), (3, 60.0), (5, 7.0), (20, 3600.0)])
    now = [1_000_000.0 + rng.random() * 1000]
    table = MachineRateLimits((RateLimit("x", requests, per_s, None),), tmp_path, clock=lambda: now[0])
    allowed: list[float] = []
    for _ in range(400):
        now[0] += rng.choice([0.0, rng.random() * per_s / 10, rng.random() * per_s])
        hit = table.hit(("alice", "dev"), "Sync")
        if hit is None:
            allowed.append(now[0])
            # never more than the budget in the per_s seconds up to now
            assert len([t for t in allowed if t > now[0] - per_s]) <= requests
            continue
        # an exact sliding window would let it through at most one step earlier
        wait = hit[1]
        # denied only when an exact sliding window would be full too, or within one step of it
        step = per_s / (STEPS - 1)
        assert len([t for t in allowed if t > now[0] - per_s - step]) >= requests
        assert 1 <= wait <= per_s + step + 1
        now[0] += wait
        assert table.hit(("alice", "dev"), "Sync") is None, "Retry-After must let the next request through"
        allowed.append(now[0])
    table.close()


def test_a_full_neighbourhood_forgets_the_device_seen_least_recently(tmp_path):
    now = [5000.0]
    table = MachineRateLimits((RateLimit("x", 1, 60.0, None),), tmp_path, clock=lambda: now[0], slots=8)
    for i in range(8):  # every slot taken
        now[0] += 1
        assert table.hit(("u", f"dev{i}"), None) is None
    now[0] += 1
    assert table.hit(("u", "dev8"), None) is None  # a ninth device: dev0 is forgotten for it
    assert table.hit(("u", "dev0"), None) is None  # so dev0 starts again (as the per-process limiter forgets)
    assert table.hit(("u", "dev7"), None) is not None  # recent devices keep their count


def test_run_directories_of_supervisors_that_are_gone_are_removed(tmp_path):
    dead = subprocess.Popen(["true"])
    dead.wait()
    stale = tmp_path / f"easgate-run-{dead.pid}-abc123"
    live = tmp_path / f"easgate-run-{os.getpid()}-def456"
    other = tmp_path / "easgate-run-notapid"
    for d in (stale, live, other):
        d.mkdir()
        (d / "rate-x.tbl").write_bytes(b"x")
    mine = Path(make_run_dir(str(tmp_path)))
    assert mine.name.startswith(f"easgate-run-{os.getpid()}-") and oct(mine.stat().st_mode & 0o777) == "0o700"
    assert not stale.exists() and live.exists() and other.exists()
