"""Shared fixtures: a throw-away PKI, real stand-in upstreams, and real gateway processes.

End-to-end tests start `easgate run` (or plain `mitmdump -s addons/gateway.py`) as a subprocess on
127.0.0.1 port 0, read the port from mitmproxy's "listening at" log line, and talk to it with real
TLS clients (Python's ssl, curl).
"""

from __future__ import annotations

import http.client
import json
import os
import re
import socket
import ssl
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "addons"))

from easgate.tools import clusterservers, realstack
from easgate.tools.pki import generate_pki
from easgate.tools.standins import ExchangeStandIn, MdmStandIn

from support.procs import (  # noqa: F401 - the launcher, re-exported for the tests that import it from here
    LISTEN_RE,
    WORKER_LISTEN_RE,
    ConnectorProcess,
    GatewayProcess,
    easgate_argv,
    launch,
    mitmdump_argv,
    run_argv,
    wait_for,
)

HOSTNAME = "mail.example.test"


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
def _fresh_upstreams(request):
    """Each test starts with empty request logs on the shared stand-ins."""
    for name in ("exchange", "mdm"):
        if name in request.fixturenames:
            s = request.getfixturevalue(name)
            with s.lock:
                s.seen.clear()
    yield


# ------------------------------------------------------------------------------------------------
# A connector stand-in whose behaviour a test sets: it counts calls and can misbehave on purpose.


class FakeConnector(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), _ConnectorHandler)
        self.allowed: set[str] = set()  # DeviceIds answered with Allow
        self.behaviour = "normal"  # normal | slow | garbage | error500 | reject400 | close | hang
        self.delay_s = 0.0
        self.calls: list[dict] = []
        self.conns: list[socket.socket] = []
        self.lock = threading.Lock()
        threading.Thread(target=self.serve_forever, daemon=True).start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}/services/ActiveSync/Authorize"

    def stop(self) -> None:
        """Down for real: no listener and no kept-alive connection left."""
        self.shutdown()
        self.server_close()
        with self.lock:
            for s in self.conns:
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass


class _ConnectorHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def setup(self) -> None:
        super().setup()
        with self.server.lock:
            self.server.conns.append(self.connection)

    def log_message(self, *a) -> None:
        pass

    def do_GET(self) -> None:
        srv: FakeConnector = self.server  # type: ignore[assignment]
        q = {k: v[0] for k, v in parse_qs(urlsplit(self.path).query, keep_blank_values=True).items()}
        with srv.lock:
            srv.calls.append(q)
        b = srv.behaviour
        if srv.delay_s:
            time.sleep(srv.delay_s)
        if b == "hang":
            time.sleep(30)
        if b == "close":
            self.wfile.write(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n{\"res")
            self.close_connection = True
            return
        if b == "error500":
            body, status = b"internal error", 500
        elif b == "reject400":
            body, status = b'{"error": "bad request", "reason": "agent too long"}', 400
        elif b == "garbage":
            body, status = b"<html>Allowed?</html>", 200
        else:
            result = "Allow" if q.get("DeviceId") in srv.allowed else "Deny"
            body, status = json.dumps({"result": result}).encode(), 200
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


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


def client_context(pki: Path, cert: str | None = None) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=str(pki / "public-ca.pem"))
    if cert:
        ctx.load_cert_chain(str(pki / f"{cert}.pem"), str(pki / f"{cert}.key"))
    return ctx


class Response:
    def __init__(self, status: int, headers: http.client.HTTPMessage, body: bytes) -> None:
        self.status, self.headers, self.body = status, headers, body

    def json(self):
        return json.loads(self.body)


def request(port: int, method: str, path: str, pki: Path, *, cert: str | None = None, headers: dict | list | None = None,
            body: bytes | None = None, conn: http.client.HTTPSConnection | None = None, timeout: float = 15) -> Response:
    """One HTTPS request to the gateway with SNI and Host mail.example.test. Pass conn to reuse a
    keep-alive connection (from https_connection)."""
    c = conn or https_connection(port, pki, cert, timeout)
    c.putrequest(method, path, skip_host=True, skip_accept_encoding=True)
    c.putheader("Host", f"{HOSTNAME}:{port}")
    items = headers.items() if isinstance(headers, dict) else (headers or [])
    for k, v in items:
        c.putheader(k, v)
    if body is not None:
        c.putheader("Content-Length", str(len(body)))
    c.endheaders(body)
    r = c.getresponse()
    data = r.read()
    out = Response(r.status, r.headers, data)
    if conn is None:
        c.close()
    return out


def https_connection(port: int, pki: Path, cert: str | None = None, timeout: float = 15) -> http.client.HTTPSConnection:
    ctx = client_context(pki, cert)
    c = http.client.HTTPSConnection(HOSTNAME, port, context=ctx, timeout=timeout)
    # connect to loopback but verify and send SNI for the public name
    c.sock = ctx.wrap_socket(socket.create_connection(("127.0.0.1", port), timeout=timeout), server_hostname=HOSTNAME)
    return c


def curl(port: int, path: str, pki: Path, *args: str, cert: str | None = None, timeout: int = 15) -> subprocess.CompletedProcess:
    argv = ["curl", "-sS", "--max-time", str(timeout), "--cacert", str(pki / "public-ca.pem"),
            "--resolve", f"{HOSTNAME}:{port}:127.0.0.1", "-o", "-", "-w", "\n%{http_code}"]
    if cert:
        argv += ["--cert", str(pki / f"{cert}.pem"), "--key", str(pki / f"{cert}.key")]
    argv += [*args, f"https://{HOSTNAME}:{port}{path}"]
    return subprocess.run(argv, capture_output=True, text=True, timeout=timeout + 5)


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


class HeldPingExchange(ThreadingHTTPServer):
    """A plain-HTTP Exchange whose Pings wait until the test releases them (no fixed sleeps)."""

    daemon_threads = True

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), _HeldPingHandler)
        self.release = threading.Event()
        self.pings_waiting = threading.Semaphore(0)
        threading.Thread(target=self.serve_forever, daemon=True).start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"

    def stop(self) -> None:
        self.release.set()
        self.shutdown()
        self.server_close()


class _HeldPingHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *a) -> None:
        pass

    def do_POST(self) -> None:
        self.rfile.read(int(self.headers.get("Content-Length") or 0))
        if "Cmd=Ping" in self.path:
            self.server.pings_waiting.release()
            self.server.release.wait(60)
        body = b"pong"
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


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
def pg_url(postgres_server, request) -> str:
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
