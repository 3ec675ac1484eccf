"""A block in easgate's connector reaches the gateway's held Pings on one machine without Redis:
every worker long-polls the connector's change feed (`authorization.connector.changes`), drops the
cached decisions of the devices it names and decides their held requests again. Real processes:
`easgate connector` as docs/connector.md starts it (a SQLite inventory), `easgate run --workers 2`,
the operator's block as README.md writes it, a stand-in Exchange holding the Pings, real TLS clients."""

from __future__ import annotations

import json
import subprocess
import time
import urllib.request

import pytest
from test_holds import BASIC, IPHONE, SYNC, assert_all_end_within, audit, hold_pings_on_every_worker, start, wait_for

from easgate.tools.standins import ExchangeStandIn

import conftest
from conftest import easgate_argv, request
from doccommands import covers
from docsite import make_site
from docsite import wait_for as wait_for_output

CONNECTOR_DOC = "docs/connector.md"
START_CONNECTOR = ".venv/bin/easgate connector policies/connector.yaml"
IMPORT = ".venv/bin/easgate devices -c policies/connector.yaml import policies/demo-inventory.csv"
BLOCK = ".venv/bin/easgate devices -c policies/connector.yaml block ApplF17ABCDEF01"


@pytest.fixture
def holding_exchange(pki):
    ex = ExchangeStandIn("holding-exchange", tls=(pki / "exchange.pem", pki / "exchange.key"), hold_s=60).start()
    yield ex
    ex.stop()


@pytest.fixture
def site(tmp_path):
    s = make_site(tmp_path)
    yield s
    s.stop_all()


def start_connector(site):
    c = site.start(CONNECTOR_DOC, START_CONNECTOR)
    wait_for_output(c, rf"easgate connector listening at http://127\.0\.0\.1:{site.ports[9080]}")
    return c


def following(site, pki, exchange, mdm, tmp_path, workers: int, **connector):
    cfg = conftest.authz_config(pki, exchange, mdm, tmp_path, policy=None)
    cfg["authorization"]["connector"] = {"url": f"http://127.0.0.1:{site.ports[9080]}/services/ActiveSync/Authorize",
                                         "timeout_ms": 2000, "changes": True, **connector}
    return start(cfg, tmp_path, workers)


def health(site) -> dict:
    with urllib.request.urlopen(f"http://127.0.0.1:{site.ports[9080]}/health", timeout=5) as r:
        return json.loads(r.read())


@covers(CONNECTOR_DOC, START_CONNECTOR, IMPORT)
@covers("README.md", BLOCK)
def test_an_operators_block_ends_held_pings_on_every_worker_within_5s(site, pki, holding_exchange, mdm, tmp_path):
    start_connector(site)
    assert "5 added" in site.run(CONNECTOR_DOC, IMPORT).stdout
    g = following(site, pki, holding_exchange, mdm, tmp_path, workers=2)
    try:
        pings = hold_pings_on_every_worker(g, pki, holding_exchange, 2)  # each allowed by the connector, cached
        wait_for(lambda: health(site)["changes"]["followers"] >= 2, 10, "both workers following the feed", g)
        site.run("README.md", BLOCK)
        t0 = time.monotonic()  # from the command's return: its own start-up is not the gateway's delay
        assert_all_end_within(pings, t0, g)
        closed = wait_for(lambda: c if len(c := [a for a in audit(tmp_path) if a.get("event") == "held request closed"])
                          == len(pings) else None, 5, "an audit line per closed Ping", g)
        assert {(a["trigger"], a["source"], a["reason"], a["command"]) for a in closed} == {
            ("connector change", "block", f"connector: Deny: device {IPHONE} blocked in the inventory", "Ping")}, closed
        # the next request of the device is denied on every worker: its cached allow is gone
        for _ in range(4):
            assert request(g.port, "POST", SYNC, pki, headers=BASIC).status == 403
        assert {(a["decision"], a["reason"]) for a in audit(tmp_path)[-4:]} == {
            ("deny", f"connector: Deny: device {IPHONE} blocked in the inventory")}
    finally:
        g.stop()


def test_the_connector_down_is_logged_once_and_a_restarted_connector_resets_the_cache(site, pki, exchange, mdm,
                                                                                    tmp_path):
    conn = start_connector(site)
    site.run(CONNECTOR_DOC, IMPORT)
    g = following(site, pki, exchange, mdm, tmp_path, workers=1, timeout_ms=300)
    try:
        wait_for(lambda: health(site)["changes"]["followers"] >= 1, 10, "the worker following the feed", g)
        assert request(g.port, "POST", SYNC, pki, headers=BASIC).status == 200  # cached allow
        conn.stop()
        said = "cannot follow the connector's changes"
        g.wait_output(said, 10)
        # blocked while the connector is down (the gateway cannot see it): the cached allow still serves
        site.run("README.md", BLOCK)
        assert request(g.port, "POST", SYNC, pki, headers=BASIC).status == 200
        # a device without a cached decision: the fail mode (deny) decides, nothing is allowed for the feed's sake
        other = SYNC.replace(IPHONE, "androidc1234567890").replace("User=alice", "User=bob@contoso.com")
        assert request(g.port, "POST", other, pki, headers=BASIC).status == 403
        assert audit(tmp_path)[-1]["source"] == "fail-mode"
        # back (a new instance): the follower resets, so the block made meanwhile is seen at once
        start_connector(site)
        g.wait_output("following the connector's changes at", 40)
        wait_for(lambda: request(g.port, "POST", SYNC, pki, headers=BASIC).status == 403, 5, "the block seen", g)
        assert audit(tmp_path)[-1]["reason"] == f"connector: Deny: device {IPHONE} blocked in the inventory"
        assert g.output.count(said) == 1, g.output  # once per outage, however many polls failed
    finally:
        g.stop()


def test_connector_changes_in_the_config_check(pki, exchange, mdm, tmp_path):
    cfg = conftest.authz_config(pki, exchange, mdm, tmp_path, policy=None)
    cfg["authorization"]["connector"] = {"url": "http://127.0.0.1:9/services/ActiveSync/Authorize", "changes": True}
    p = subprocess.run(easgate_argv("check", str(conftest.write_config(tmp_path, cfg))), capture_output=True,
                       text=True, timeout=60)
    assert p.returncode == 0 and "connector changes   http://127.0.0.1:9/services/easgate/changes" in p.stdout, p.stdout
    for bad in ("ftp://127.0.0.1/changes", "yes please", 7):
        cfg["authorization"]["connector"]["changes"] = bad
        p = subprocess.run(easgate_argv("check", str(conftest.write_config(tmp_path, cfg))), capture_output=True,
                           text=True, timeout=60)
        assert p.returncode == 2 and "authorization.connector.changes" in p.stderr, p.stderr
        assert len(p.stderr.strip().splitlines()) == 1, p.stderr
