"""Shared fixtures: a throw-away PKI, real stand-in upstreams, a steerable connector, real gateway
and connector processes, and the real servers (SOGo stack, PostgreSQL, Redis) once per session.

The code behind them is the support package (tests/support/): `procs` is the one launcher of real
easgate processes (`start_gateway` and `start_connector` below use it: `easgate run` or plain
`mitmdump -s addons/gateway.py` on 127.0.0.1 port 0, the port read from the "listening at" line),
`client` the HTTPS clients (Python's ssl, curl, raw TLS), `standins` the connector and Exchange
stand-ins a test steers. The names tests import from here are re-exported from there.
"""

from __future__ import annotations

import os
import re
import sys
import time
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "addons"))

from easgate.tools import clusterservers, realstack
from easgate.tools.pki import generate_pki
from easgate.tools.standins import ExchangeStandIn, MdmStandIn

from support.client import (  # noqa: F401 - re-exported for the tests that import them from here
    HOSTNAME,
    Response,
    client_context,
    curl,
    https_connection,
    request,
)
from support.procs import (  # noqa: F401 - the launcher, re-exported for the tests that import it from here
    LISTEN_RE,
    LOG_CONNECTIONS,
    WORKER_LISTEN_RE,
    ConnectorProcess,
    ForkServer,
    GatewayProcess,
    easgate_argv,
    forking,
    launch,
    mitmdump_argv,
    run_argv,
    wait_for,
)
from support.standins import FakeConnector, HeldPingExchange  # noqa: F401 - re-exported


@pytest.fixture(scope="session", autouse=True)
def _fork_server(tmp_path_factory):
    """The session's fork server (support/zygote.py): every easgate/mitmdump/mitmweb a test starts
    forks from a process that has imported them once. EASGATE_TEST_FORK=0: each one execs."""
    if not forking():
        yield None
        return
    server = ForkServer(tmp_path_factory.mktemp("fork")).start()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def pki(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("pki")
    generate_pki(d)
    return d


@pytest.fixture(scope="session")
def exchange(pki):
    s = ExchangeStandIn("exchange", tls=(pki / "exchange.pem", pki / "exchange.key"), hold_s=0).start()
    yield s
    s.stop()


@pytest.fixture(scope="session")
def mdm():
    s = MdmStandIn("mdm").start()
    yield s
    s.stop()


@pytest.fixture(autouse=True)
def _fresh_upstreams(request):  # noqa: F811 - pytest's request, not support.client.request
    """Each test starts with empty request logs on the shared stand-ins."""
    for name in ("exchange", "mdm"):
        if name in request.fixturenames:
            s = request.getfixturevalue(name)
            with s.lock:
                s.seen.clear()
    yield


@pytest.fixture
def connector():
    c = FakeConnector()
    yield c
    c.stop()


# ------------------------------------------------------------------------------------------------
# Config and gateway processes


def base_config(pki: Path, exchange, mdm, **over) -> dict:
    cfg = {
        "listen": {"host": "127.0.0.1", "port": 0},
        "tls": {
            "certificate": str(pki / "gateway-full.pem"),
            "client_certs": {"mode": "optional", "ca": [str(pki / "device-ca.pem"), str(pki / "root-ca.pem")]},
        },
        "pools": {
            "exchange": {"servers": [exchange.url], "ca": str(pki / "internal-ca.pem"), "sni": "exchange.internal"},
            "mdm": {"servers": [mdm.url]},
        },
        "routes": [
            {"name": "activesync", "priority": 100, "match": {"path_prefix": "/Microsoft-Server-ActiveSync"},
             "pool": "exchange"},
            {"name": "mdm", "priority": 110, "match": "any", "pool": "mdm", "client_cert_header": "NSClientCert"},
        ],
    }
    for k, v in over.items():
        cfg[k] = v
    return cfg


def authz_config(pki: Path, exchange, mdm, tmp_path: Path, *, policy: dict | None = None, connector=None,
                 **auth) -> dict:
    """base_config with the ActiveSync route authorized by a policy file and/or a connector."""
    cfg = base_config(pki, exchange, mdm)
    cfg["routes"][0]["authorize"] = "activesync"
    a: dict = {}
    if policy is not None:
        (tmp_path / "policy.yaml").write_text(yaml.safe_dump(policy))
        a["policy"] = str(tmp_path / "policy.yaml")
    if connector is not None:
        a["connector"] = {"url": connector.url, "timeout_ms": 500}
    a.update(auth)
    cfg["authorization"] = a
    cfg["audit_log"] = str(tmp_path / "audit.jsonl")
    return cfg


def write_config(tmp_path: Path, cfg: dict, name: str = "gateway.yaml") -> Path:
    p = tmp_path / name
    p.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return p


@pytest.fixture
def start_gateway(tmp_path):
    """start_gateway(cfg_dict_or_path, *run_args, via="easgate"|"mitmdump"|"mitmweb", extra=[...],
    workers=N, wait=True) -> a running GatewayProcess (support.procs.launch), stopped after the test.
    With workers > 1 it waits until every worker serves. EASGATE_MASTER=full|lean and
    EASGATE_WORKERS=N run the suite another way."""
    procs: list[GatewayProcess] = []

    def start(cfg, *args: str, via: str = "easgate", extra: list[str] | tuple[str, ...] = (), wait: bool = True,
              workers: int | None = None, env: dict | None = None) -> GatewayProcess:
        path = cfg if isinstance(cfg, Path) else write_config(tmp_path, cfg)
        g = launch(path, *args, via=via, extra=extra or (), wait=False, workers=workers, env=env)
        procs.append(g)
        return g.serving() if wait else g

    yield start
    for p in procs:
        p.stop()


@pytest.fixture
def start_connector():
    """start_connector(config, *args) -> a running `easgate connector` (ConnectorProcess), stopped after the test."""
    procs: list[ConnectorProcess] = []

    def start(config: Path, *args: str, env: dict | None = None, wait: bool = True) -> ConnectorProcess:
        c = ConnectorProcess(ConnectorProcess.argv(config, *args), env=env)
        procs.append(c)
        return c.wait_ready(30) if wait else c

    yield start
    for c in procs:
        c.stop()


# ------------------------------------------------------------------------------------------------
# Clients


# ------------------------------------------------------------------------------------------------
# The real ActiveSync server stack (SOGo + Dovecot + PostgreSQL + memcached + nginx), once per session


@pytest.fixture(scope="session")
def real_stack(pki):
    """A running easgate.tools.realstack.RealStack; nginx serves the PKI's exchange certificate, so the
    gateway's Exchange pool (internal CA, SNI exchange.internal) trusts it like the stand-in.
    Skips where the packages or root are missing, except in CI (CI=true), where that fails."""
    if gaps := realstack.missing():
        msg = "real ActiveSync stack unavailable, needs: " + ", ".join(gaps) + " (scripts/ensure_test_tools.sh)"
        if os.environ.get("CI") == "true":
            pytest.fail(msg)
        pytest.skip(msg)
    stack = realstack.RealStack(pki / "exchange.pem", pki / "exchange.key").start()
    yield stack
    stack.stop()
    assert not stack.leftovers(), f"real stack processes still there after stop: {stack.leftovers()}"


# ------------------------------------------------------------------------------------------------
# A held long poll, released by the test (reload and metrics tests)


@pytest.fixture
def held_exchange():
    s = HeldPingExchange()
    yield s
    s.stop()




# ------------------------------------------------------------------------------------------------
# Real PostgreSQL and Redis for the cluster tests (easgate.tools.clusterservers), once per session


def _cluster_servers_or_skip() -> None:
    gaps = clusterservers.missing()
    try:
        import psycopg  # noqa: F401
        import redis  # noqa: F401
    except ImportError:
        gaps.append("the cluster extra (pip install -e '.[cluster]')")
    if gaps:
        msg = "cluster servers unavailable, needs: " + ", ".join(gaps) + " (scripts/ensure_test_tools.sh)"
        if os.environ.get("CI") == "true":
            pytest.fail(msg)
        pytest.skip(msg)


@pytest.fixture(scope="session")
def postgres_server():
    """A throw-away PostgreSQL on a free loopback port; tests create their own databases in it."""
    _cluster_servers_or_skip()
    pg = clusterservers.TestPostgres().start()
    yield pg
    pg.stop()


@pytest.fixture
def pg_url(postgres_server, request) -> str:  # noqa: F811 - pytest's request
    """A fresh, empty database for one test."""
    name = "t_" + re.sub(r"[^a-z0-9]", "_", request.node.name.lower())[:40] + f"_{os.getpid()}_{time.monotonic_ns() % 10**6}"
    return postgres_server.create_database(name)


@pytest.fixture(scope="session")
def redis_server():
    """A throw-away redis-server (no persistence) shared by the tests that do not stop it."""
    _cluster_servers_or_skip()
    r = clusterservers.TestRedis().start()
    yield r
    r.stop()


@pytest.fixture
def own_redis():
    """A redis-server of the test's own, for tests that kill and restart it."""
    _cluster_servers_or_skip()
    r = clusterservers.TestRedis().start()
    yield r
    r.stop()


# ------------------------------------------------------------------------------------------------
# Test order for `make test` (pytest-xdist --dist loadfile --no-loadscope-reorder): xdist hands out
# whole files in collection order, two per worker ahead. The files that take longest go first, so
# that the two workers finish together instead of one running test_deploy.py or a cluster test
# alone at the end (longest-first scheduling). Refresh the list from a run with --durations=0.

SLOW_FILES_FIRST = (
    "test_deploy.py", "test_cluster_e2e.py", "test_captures.py", "test_gateway_e2e.py", "test_docs_commands.py",
    "test_authz_e2e.py", "test_hardening.py", "test_audit.py", "test_scale.py", "test_holds.py",
    "test_cli_answers.py", "test_readme.py", "test_identity_e2e.py", "test_demo.py", "test_reload.py",
)


def pytest_collection_modifyitems(config, items) -> None:
    rank = {name: i for i, name in enumerate(SLOW_FILES_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: the order within a file stays
