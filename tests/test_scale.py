"""Scale features end to end: workers on one port, restarts, graceful stop, PROXY protocol, long-poll
timeouts, the connection cap, and the lean master's on-demand addons. Real processes, real TLS."""

from __future__ import annotations

import http.client
import json
import os
import re
import signal
import socket
import ssl
import threading
import time
import urllib.request
from pathlib import Path

import pytest

from easgate.gateway import proxyproto
from easgate.tools.standins import ExchangeStandIn

from conftest import (
    HOSTNAME,
    LOG_CONNECTIONS,
    GatewayProcess,
    base_config,
    client_context,
    https_connection,
    request,
    wait_for,
    write_config,
)

AS_SYNC = "/Microsoft-Server-ActiveSync?Cmd=Sync&User=alice&DeviceId=ApplF17ABCDEF01&DeviceType=iPhone"
AS_PING = "/Microsoft-Server-ActiveSync?Cmd=Ping&User=alice&DeviceId=ApplF17ABCDEF01&DeviceType=iPhone"
CONNECT = re.compile(r"^\[w(\d+)\]\[[\d:.]+\]\[127\.0\.0\.1:(\d+)\] client connect")


@pytest.fixture
def procs(start_gateway):
    """procs(cfg_path, *run_args, extra=()) -> a one-worker gateway, not waited for (the test waits)."""
    return lambda cfg_path, *args, extra=(): start_gateway(cfg_path, *args, extra=extra, workers=1, wait=False)


def worker_ports(g: GatewayProcess) -> dict[int, int]:
    return g.worker_ports()


def start_workers(start_gateway, cfg_path: Path, n: int = 2, *args: str) -> GatewayProcess:
    """N workers on one port, all serving; g.port is that port (and its connections in the log: served_by)."""
    return start_gateway(cfg_path, *args, workers=n, extra=LOG_CONNECTIONS)


def served_by(g: GatewayProcess, local_ports: list[int]) -> dict[int, int]:
    """client port -> worker index, from the workers' 'client connect' log lines."""
    def seen():
        m = {int(x[2]): int(x[1]) for line in list(g.lines) if (x := CONNECT.search(line))}
        return m if all(p in m for p in local_ports) else None
    return wait_for(seen, 10, "connect lines", g)


def one_request(port: int, pki: Path, path: str = "/enroll") -> tuple[int, int]:
    """(status, local port) of one request on a new connection."""
    c = https_connection(port, pki)
    local = c.sock.getsockname()[1]
    r = request(port, "GET", path, pki, conn=c)
    c.close()
    return r.status, local


# ---------------------------------------------------------------------------------------------
# Workers


def test_two_workers_share_one_port_and_both_serve(start_gateway, pki, exchange, mdm, tmp_path):
    g = start_workers(start_gateway, write_config(tmp_path, base_config(pki, exchange, mdm)))
    ports = worker_ports(g)
    assert set(ports) == {1, 2} and len(set(ports.values())) == 1  # port 0 became one port for both
    results = [one_request(g.port, pki) for _ in range(40)]
    assert all(status == 200 for status, _ in results)
    workers = served_by(g, [p for _, p in results])
    assert set(workers.values()) == {1, 2}, workers
    assert "open files limit:" in g.output and "concurrent client connections in this process" in g.output
    pids = [int(p) for p in re.findall(r"worker \d started \(pid (\d+)\)", g.output)]
    assert len(pids) == 2
    assert g.stop() == 0
    assert "all workers stopped" in g.output
    for pid in pids:
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)


def test_a_killed_worker_is_restarted_and_the_port_stays_served(start_gateway, pki, exchange, mdm, tmp_path):
    g = start_workers(start_gateway, write_config(tmp_path, base_config(pki, exchange, mdm)))
    pid = int(re.search(r"worker 1 started \(pid (\d+)\)", g.output)[1])
    os.kill(pid, signal.SIGKILL)
    wait_for(lambda: f"worker 1 (pid {pid}) killed by SIGKILL" in g.output, 10, "the crash log line", g)
    # the other worker serves alone while worker 1 is down (connections that were waiting in the dead
    # worker's accept queue when it died are reset by the kernel: clients retry)
    assert all(one_request(g.port, pki)[0] == 200 for _ in range(5))
    new = wait_for(lambda: re.search(r"worker 1 restarted \(pid (\d+)", g.output), 10, "the restart", g)
    wait_for(lambda: "worker 1 (pid %s) is serving again" % new[1] in g.output, 20, "worker 1 serving", g)
    results = [one_request(g.port, pki) for _ in range(40)]
    assert all(s == 200 for s, _ in results)
    assert set(served_by(g, [p for _, p in results]).values()) == {1, 2}


def socket_inodes(pid: int) -> set[int]:
    out = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        if target.startswith("socket:["):
            out.add(int(target[8:-1]))
    return out


def tcp_sockets_on(port: int) -> dict[int, str]:
    """inode -> state ('0A': listening) of this machine's IPv4 TCP sockets on port."""
    rows = Path("/proc/net/tcp").read_text().splitlines()[1:]
    return {int(f[9]): f[3] for f in map(str.split, rows) if int(f[1].split(":")[1], 16) == port}


def test_workers_are_forked_from_the_supervisor_until_a_reload_starts_them_fresh(start_gateway, pki, exchange, mdm,
                                                                                 tmp_path):
    """Workers fork from the supervisor, which has easgate loaded (no second Python start each),
    which runs one thread (its metrics listener is served by a forked process, started again if it
    dies); a reload's new workers,
    and every restart after it, start fresh as `easgate run ... --worker-index i`: the code installed
    now, as docs/deployment.md's upgrade says."""
    g = start_gateway(write_config(tmp_path, base_config(pki, exchange, mdm)), workers=2,
                      extra=["--set", "easgate_metrics=127.0.0.1:0"])
    sup = int(re.search(r"supervisor pid (\d+)", g.output)[1])
    first = [int(p) for p in re.findall(r"worker \d started \(pid (\d+)\)", g.output)]

    def cmdline(pid: int) -> bytes:
        return Path(f"/proc/{pid}/cmdline").read_bytes()
    assert len(first) == 2 and all(cmdline(p) == cmdline(sup) for p in first)  # forked: the same program image
    metrics_port = int(re.search(r"metrics at http://127\.0\.0\.1:(\d+)/metrics", g.output)[1])
    # the metrics listener is served by a process of its own, so the supervisor forks with no thread
    listener = {i for i, state in tcp_sockets_on(metrics_port).items() if state == "0A"}

    def metrics_process() -> int:
        children = {int(p) for p in Path(f"/proc/{sup}/task/{sup}/children").read_text().split()}
        served = [p for p in children - set(first) if listener & socket_inodes(p)]
        assert len(served) == 1 and cmdline(served[0]) == cmdline(sup)
        return served[0]

    def scrape() -> str:
        return urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10).read().decode()
    server = metrics_process()
    assert len(listener) == 1 and listener <= socket_inodes(sup)  # kept, so that a new server can take over
    assert not any(listener & socket_inodes(p) for p in first)
    assert os.listdir(f"/proc/{sup}/task") == [str(sup)]  # one thread
    assert "easgate_workers 2" in scrape()
    os.kill(server, signal.SIGKILL)  # the OOM killer, an operator's stray kill: the supervisor starts another
    wait_for(lambda: f"metrics listener (pid {server}) killed by SIGKILL" in g.output, 10, "the log line", g)
    wait_for(lambda: "the metrics listener restarted" in g.output, 10, "the restart", g)
    assert metrics_process() != server and "easgate_workers 2" in scrape()
    assert one_request(g.port, pki)[0] == 200

    g.proc.send_signal(signal.SIGHUP)
    wait_for(lambda: "reload complete" in g.output, 30, "the reload", g)
    new = [int(p) for p in re.findall(r"reload: new worker \d started \(pid (\d+)\)", g.output)]
    assert len(new) == 2 and all(b"--worker-index" in cmdline(p) for p in new), [cmdline(p) for p in new]
    os.kill(new[0], signal.SIGKILL)
    again = wait_for(lambda: re.search(r"worker \d restarted \(pid (\d+)", g.output), 15, "the restart", g)
    assert b"--worker-index" in cmdline(int(again[1]))
    wait_for(lambda: f"(pid {again[1]}) is serving again" in g.output, 30, "the restarted worker", g)
    assert all(one_request(g.port, pki)[0] == 200 for _ in range(4))


def test_sigterm_lets_a_request_in_flight_finish(start_gateway, pki, mdm, tmp_path):
    slow = ExchangeStandIn("slow-exchange", tls=(pki / "exchange.pem", pki / "exchange.key"), hold_s=2).start()
    try:
        g = start_workers(start_gateway, write_config(tmp_path, base_config(pki, slow, mdm)), 2, "--grace", "10")
        out: dict = {}

        def ping():
            try:
                out["status"] = request(g.port, "POST", AS_PING, pki, body=b"\x03\x01\x6a\x00").status
            except Exception as e:  # noqa: BLE001
                out["error"] = repr(e)

        t = threading.Thread(target=ping)
        t.start()
        wait_for(lambda: slow.requests(), 10, "the Ping upstream", g)
        t0 = time.monotonic()
        g.proc.send_signal(signal.SIGTERM)
        t.join(15)
        assert out.get("status") == 200, out
        assert g.wait_exit(15) == 0
        assert time.monotonic() - t0 < 10
        assert "waiting up to 10s for requests in flight" in g.output
        # and no new connection is accepted once stopping
        with pytest.raises(OSError):
            socket.create_connection(("127.0.0.1", g.port), timeout=2).close()
    finally:
        slow.stop()


def resumptions(port: int, pki: Path, version: ssl.TLSVersion, cert: str | None, n: int = 20) -> list[tuple]:
    """One full handshake, then n new connections offering its session: per connection (resumed,
    status, NSClientCert seen by the MDM, local port). The first connection's port comes first."""
    ctx = client_context(pki, cert)
    ctx.minimum_version = ctx.maximum_version = version
    out: list[tuple] = []
    session = None
    for _ in range(n + 1):
        s = ctx.wrap_socket(socket.create_connection(("127.0.0.1", port), timeout=10), server_hostname=HOSTNAME,
                            session=session)
        c = http.client.HTTPSConnection(HOSTNAME, port, context=ctx, timeout=10)
        c.sock = s
        r = request(port, "GET", "/enroll", pki, conn=c)  # TLS 1.3: the tickets arrive with the answer
        out.append((s.session_reused, r.status, r.json()["NSClientCert"], s.getsockname()[1]))
        session = session or s.session
        c.close()
    return out


@pytest.mark.parametrize("version", [ssl.TLSVersion.TLSv1_2, ssl.TLSVersion.TLSv1_3], ids=["TLS1.2", "TLS1.3"])
def test_tls_sessions_resume_on_every_worker_and_certificates_are_verified_again(start_gateway, pki, exchange, mdm, tmp_path,
                                                                                 version):
    cfg = base_config(pki, exchange, mdm)
    cfg["tls"]["client_certs"]["on_invalid"] = "untrusted"  # a rogue certificate gets through, unverified
    g = start_workers(start_gateway, write_config(tmp_path, cfg))
    good = resumptions(g.port, pki, version, "device-iphone")
    assert good[0][0] is False and good[0][1] == 200 and good[0][2]  # the full handshake
    assert [(reused, status) for reused, status, _, _ in good[1:]] == [(True, 200)] * 20
    assert {header for _, _, header, _ in good} == {good[0][2]}  # the verified certificate, every time
    workers = served_by(g, [port for *_, port in good])
    assert set(workers.values()) == {1, 2}, workers  # resumed on the worker that did not issue the ticket too
    # a rogue certificate's session resumes on either worker and is never taken for a verified one
    rogue = resumptions(g.port, pki, version, "device-rogue", n=10)
    assert all(reused for reused, *_ in rogue[1:]) and all(status == 200 for _, status, _, _ in rogue)
    assert {header for _, _, header, _ in rogue} == {None}
    assert len(set(served_by(g, [port for *_, port in rogue]).values())) == 2
    assert "does not let easgate set TLS session ticket keys" not in g.output


def test_nodes_sharing_a_ticket_key_file_resume_each_others_sessions(procs, pki, exchange, mdm, tmp_path):
    """Two gateways (two "nodes") with one tls.session_ticket_key; a third with its own key does not."""
    key = tmp_path / "ticket.key"
    key.write_bytes(os.urandom(80))
    gws = []
    for name, ticket_key in (("a", key), ("b", key), ("c", None)):
        cfg = base_config(pki, exchange, mdm)
        if ticket_key:
            cfg["tls"]["session_ticket_key"] = str(ticket_key)
        (tmp_path / name).mkdir()
        gws.append(procs(write_config(tmp_path / name, cfg)))
    a, b, c = (g.wait_ready() for g in gws)
    for version in (ssl.TLSVersion.TLSv1_2, ssl.TLSVersion.TLSv1_3):
        ctx = client_context(pki, "device-iphone")
        ctx.minimum_version = ctx.maximum_version = version
        sessions = {}
        for g in (a, c):
            s = ctx.wrap_socket(socket.create_connection(("127.0.0.1", g.port), timeout=10), server_hostname=HOSTNAME)
            conn = http.client.HTTPSConnection(HOSTNAME, g.port, context=ctx, timeout=10)
            conn.sock = s
            assert request(g.port, "GET", "/enroll", pki, conn=conn).status == 200
            sessions[g] = s.session
            conn.close()
        for issued_by, to, want in ((a, b, True), (c, b, False), (a, c, False)):
            s = ctx.wrap_socket(socket.create_connection(("127.0.0.1", to.port), timeout=10), server_hostname=HOSTNAME,
                                session=sessions[issued_by])
            conn = http.client.HTTPSConnection(HOSTNAME, to.port, context=ctx, timeout=10)
            conn.sock = s
            r = request(to.port, "GET", "/enroll", pki, conn=conn)
            assert (s.session_reused, r.status) == (want, 200), (version, issued_by.port, to.port)
            assert r.json()["NSClientCert"]  # verified on the resumed connection as on a full one
            conn.close()


# ---------------------------------------------------------------------------------------------
# PROXY protocol


def proxied_request(port: int, pki: Path, header: bytes, method: str, path: str, headers: dict | None = None,
                    body: bytes | None = None):
    raw = socket.create_connection(("127.0.0.1", port), timeout=10)
    raw.sendall(header)
    ctx = client_context(pki)
    c = http.client.HTTPSConnection(HOSTNAME, port, context=ctx, timeout=10)
    c.sock = ctx.wrap_socket(raw, server_hostname=HOSTNAME)
    try:
        return request(port, method, path, pki, conn=c, headers=headers, body=body)
    finally:
        c.close()


BASIC = {"Authorization": "Basic Q09OVE9TT1xhbGljZTpzZWNyZXQ=", "User-Agent": "Apple-iPhone14C2/2008.420"}


def proxy_config(pki, exchange, mdm, tmp_path, connector, trusted, require=True) -> Path:
    cfg = base_config(pki, exchange, mdm)
    cfg["routes"][0]["authorize"] = "activesync"
    # a routing rule on the client address: only reachable from 203.0.113.0/24
    cfg["routes"][1] = {"name": "from-partner-net", "priority": 110, "pool": "mdm",
                        "match": {"path_prefix": "/partner", "filter": r"~src ^203\.0\.113\."}}
    cfg["authorization"] = {"connector": {"url": connector.url, "timeout_ms": 2000}}
    cfg["audit_log"] = str(tmp_path / "audit.jsonl")
    cfg["proxy_protocol"] = {"trusted": trusted, "require": require}
    return write_config(tmp_path, cfg)


def test_proxy_protocol_from_a_trusted_balancer_carries_the_client_ip(procs, pki, exchange, mdm, tmp_path, connector):
    connector.allowed.update({"ApplF17ABCDEF01", "ApplF17ABCDEF02"})
    g = procs(proxy_config(pki, exchange, mdm, tmp_path, connector, ["127.0.0.1/32"], require=False)).wait_ready()
    v1 = proxyproto.build_v1(("203.0.113.7", 51000), ("192.0.2.1", 443))
    v2 = proxyproto.build_v2(("2001:db8::7", 52000), ("2001:db8::1", 443))
    # routing rules see the carried address ...
    assert proxied_request(g.port, pki, v1, "GET", "/partner/x").status == 200
    assert request(g.port, "GET", "/partner/x", pki).status == 404  # 127.0.0.1 directly: no route
    # ... and so do the connector (ip=) and the audit log, for v1 and v2
    assert proxied_request(g.port, pki, v1, "POST", AS_SYNC, BASIC, b"\x03\x01\x6a\x00").status == 200
    assert proxied_request(g.port, pki, v2, "POST", AS_SYNC.replace("EF01", "EF02"), BASIC, b"\x03").status == 200
    assert [c["ip"] for c in connector.calls] == ["203.0.113.7", "2001:db8::7"]
    audit = [json.loads(line) for line in (tmp_path / "audit.jsonl").read_text().splitlines()]
    assert [a["client_ip"] for a in audit] == ["203.0.113.7", "2001:db8::7"]
    # a v2 LOCAL header (the balancer's own health check) keeps the real peer
    assert proxied_request(g.port, pki, proxyproto.build_v2(None), "GET", "/partner/x").status == 404
    # the header may arrive in pieces
    raw = socket.create_connection(("127.0.0.1", g.port), timeout=10)
    for i in range(0, len(v1), 7):
        raw.sendall(v1[i:i + 7])
        time.sleep(0.01)
    s = client_context(pki).wrap_socket(raw, server_hostname=HOSTNAME)
    s.sendall(f"GET /partner/y HTTP/1.1\r\nHost: {HOSTNAME}\r\nConnection: close\r\n\r\n".encode())
    assert s.recv(100).startswith(b"HTTP/1.1 200")
    s.close()


def test_proxy_protocol_refused_from_untrusted_peers_and_required_from_trusted_ones(
        procs, pki, exchange, mdm, tmp_path, connector):
    untrusted = procs(proxy_config(pki, exchange, mdm, tmp_path, connector, ["10.0.0.0/8"]))
    (tmp_path / "b").mkdir()
    required = procs(proxy_config(pki, exchange, mdm, tmp_path / "b", connector, ["127.0.0.1"]))
    untrusted.wait_ready()
    required.wait_ready()
    spoof = proxyproto.build_v1(("203.0.113.7", 51000), ("192.0.2.1", 443))
    for header in (spoof, proxyproto.build_v2(("203.0.113.7", 51000))):
        with pytest.raises((ssl.SSLError, ConnectionError, OSError)):
            proxied_request(untrusted.port, pki, header, "GET", "/partner/x")
    wait_for(lambda: untrusted.output.count("header from untrusted peer 127.0.0.1; connection refused") == 2, 5,
             "two refusals", untrusted)
    assert request(untrusted.port, "GET", "/enroll", pki).status == 404  # plain clients are still served
    # a trusted balancer must send the header (require: true, the default)
    with pytest.raises((ssl.SSLError, ConnectionError, OSError)):
        request(required.port, "GET", "/partner/x", pki)
    wait_for(lambda: "sent no PROXY header; connection refused" in required.output, 5, "the refusal", required)
    assert proxied_request(required.port, pki, spoof, "GET", "/partner/x").status == 200
    # garbage after a valid signature is refused too
    with pytest.raises((ssl.SSLError, ConnectionError, OSError)):
        proxied_request(required.port, pki, b"PROXY TCP4 203.0.113.7 nonsense\r\n", "GET", "/partner/x")
    wait_for(lambda: "invalid header from 127.0.0.1" in required.output, 5, "the refusal", required)
    assert connector.calls == [] and mdm.requests()[-1]["path"] == "/partner/x"


@pytest.mark.parametrize("header", [
    b"PROXY TCP4 203.0.113.7 192.0.2.1 51000 443\r\n",
    b"PROXY TCP6 2001:db8::7 2001:db8::1 51000 443\r\n",
    b"PROXY UNKNOWN\r\n",
    b"PROXY UNKNOWN ffff::1 ffff::2 1 2\r\n",
])
def test_v1_headers_parse(header):
    h = proxyproto.parse_header(header + b"\x16\x03\x01")
    assert h.version == 1 and h.length == len(header)
    assert h.source == (None if b"UNKNOWN" in header else (header.split()[2].decode(), 51000))


@pytest.mark.parametrize("bad", [
    b"PROXY TCP4 203.0.113.7 192.0.2.1 51000\r\n", b"PROXY TCP4 2001:db8::7 192.0.2.1 1 2\r\n",
    b"PROXY TCP4 203.0.113.7 192.0.2.1 65536 443\r\n", b"PROXY TCP4 203.0.113.7 192.0.2.1 0443 443\r\n",
    b"PROXY TCP5 203.0.113.7 192.0.2.1 1 2\r\n", b"PROXY " + b"x" * 120,
    proxyproto.V2_SIGNATURE + bytes([0x31, 0x11, 0, 12]) + bytes(12),  # version 3
    proxyproto.V2_SIGNATURE + bytes([0x21, 0x11, 0, 4]) + bytes(4),  # TCP4 too short
    proxyproto.V2_SIGNATURE + bytes([0x21, 0x12, 0, 12]) + bytes(12),  # UDP
])
def test_invalid_headers_are_errors(bad):
    with pytest.raises(proxyproto.ProxyHeaderError):
        proxyproto.parse_header(bad)


def test_v2_headers_parse_and_incomplete_ones_wait():
    full = proxyproto.build_v2(("203.0.113.7", 51000), ("192.0.2.1", 443), tlvs=b"\x04\x00\x01x")
    for i in range(len(full)):
        assert proxyproto.parse_header(full[:i]) is None
    h = proxyproto.parse_header(full + b"\x16")
    assert (h.version, h.length, h.source, h.destination) == (2, len(full), ("203.0.113.7", 51000), ("192.0.2.1", 443))
    assert proxyproto.parse_header(proxyproto.build_v2(None)).source is None
    assert proxyproto.classify(b"\x16\x03\x01") == "no" and proxyproto.classify(b"PRO") == "maybe"
    assert proxyproto.classify(b"POST /") == "no" and proxyproto.classify(full[:5]) == "maybe"
    t = proxyproto.Trusted(("10.0.0.0/8", "127.0.0.1"))
    assert "10.1.2.3" in t and "::ffff:127.0.0.1" in t and "127.0.0.2" not in t and "bogus" not in t


# ---------------------------------------------------------------------------------------------
# Long polls and the connection cap


def test_held_ping_lives_as_long_as_client_idle_timeout_says(procs, pki, mdm, tmp_path):
    # The stand-in Exchange holds every Ping 4 s. mitmproxy's own default (tcp_timeout 600 s) would
    # cut an hour-long Ping; the gateway applies client_idle_timeout_s: 8 s keeps it, 2 s cuts it.
    slow = ExchangeStandIn("slow-exchange", tls=(pki / "exchange.pem", pki / "exchange.key"), hold_s=4).start()
    try:
        gws = {}
        for idle in (8, 2):
            cfg = base_config(pki, slow, mdm, client_idle_timeout_s=idle)
            d = tmp_path / str(idle)
            d.mkdir()
            gws[idle] = procs(write_config(d, cfg))
        for g in gws.values():
            g.wait_ready()
        out: dict = {}

        def ping(idle):
            t0 = time.monotonic()
            try:
                out[idle] = (request(gws[idle].port, "POST", AS_PING, pki, body=b"\x03\x01\x6a\x00").status,
                             time.monotonic() - t0)
            except Exception as e:  # noqa: BLE001
                out[idle] = (type(e).__name__, time.monotonic() - t0)

        threads = [threading.Thread(target=ping, args=(i,)) for i in gws]
        for t in threads:
            t.start()
        for t in threads:
            t.join(20)
        assert out[8][0] == 200 and out[8][1] >= 3.9, out
        assert out[2][0] != 200 and out[2][1] < 3.9, out
        wait_for(lambda: "Closing connection due to inactivity" in gws[2].output, 5, "the idle close", gws[2])
    finally:
        slow.stop()


def test_connection_cap_refuses_cleanly_past_the_limit(procs, pki, exchange, mdm, tmp_path):
    g = procs(write_config(tmp_path, base_config(pki, exchange, mdm, max_connections=3))).wait_ready()
    wait_for(lambda: "at most 3 concurrent client connections in this process (max_connections)" in g.output, 5,
             "the cap log line", g)
    held = [https_connection(g.port, pki) for _ in range(3)]
    for c in held:
        assert request(g.port, "GET", "/enroll", pki, conn=c).status == 200
    for _ in range(3):
        with pytest.raises((ssl.SSLError, ConnectionError, OSError)):
            https_connection(g.port, pki, timeout=5)
    wait_for(lambda: "refused: 3 concurrent connections is this process's limit" in g.output, 5, "refusal", g)
    assert g.output.count("concurrent connections is this process's limit") == 1  # once per burst
    held.pop().close()
    time.sleep(0.3)
    assert request(g.port, "GET", "/enroll", pki).status == 200
    for c in held:
        assert request(g.port, "GET", "/enroll", pki, conn=c).status == 200  # the others never noticed


# ---------------------------------------------------------------------------------------------
# The lean master


@pytest.mark.skipif(os.environ.get("EASGATE_MASTER") == "full", reason="lean master only")
def test_lean_master_loads_mitmdump_addons_on_demand(procs, pki, exchange, mdm, tmp_path):
    flows = tmp_path / "flows.mitm"
    g = procs(write_config(tmp_path, base_config(pki, exchange, mdm)),
              extra=("-w", str(flows), "--set", "flow_detail=1", "--set", "request_client_cert=true"))
    g.wait_ready()
    assert "loaded on demand: Save, Dumper" in g.output
    assert "ignored (the gateway configures TLS itself): request_client_cert" in g.output
    assert request(g.port, "GET", "/enroll", pki).status == 200
    wait_for(lambda: re.search(r"GET https?://\S+/enroll", g.output), 5, "the dumper's flow line", g)
    assert g.stop() == 0
    assert flows.stat().st_size > 0
    # and without those options: no per-flow lines, no flow file
    plain = procs(write_config(tmp_path, base_config(pki, exchange, mdm), "plain.yaml"))
    plain.wait_ready()
    assert request(plain.port, "GET", "/enroll", pki).status == 200
    time.sleep(0.3)
    assert "loaded on demand" not in plain.output and not re.search(r"GET https?://\S+/enroll", plain.output)


def test_fast_addon_manager_dispatches_like_mitmproxys():
    """Same order, an error in one addon tree is logged and the next tree still runs, AddonHalt stops,
    async hooks are awaited, and the plan follows addons added later."""
    import asyncio
    import logging

    from mitmproxy import exceptions, options
    from mitmproxy.test import tflow

    from easgate.runtime.lean import LeanMaster

    calls: list[str] = []

    class A:
        def __init__(self, name, fail=False, halt=False):
            self.name, self.fail, self.halt = name, fail, halt
            self.addons = []

        async def requestheaders(self, flow):
            calls.append(self.name)
            if self.fail:
                raise ValueError("boom")
            if self.halt:
                raise exceptions.AddonHalt()

    async def main():
        m = LeanMaster(options.Options(), with_termlog=False)
        parent = A("parent")
        parent.addons = [A("child-fails", fail=True), A("child-skipped")]
        m.addons.add(A("first"), parent, A("after-error"))
        errors: list[str] = []
        handler = logging.Handler()
        handler.emit = lambda r: errors.append(r.getMessage())
        logging.getLogger().addHandler(handler)
        try:
            from mitmproxy.proxy.layers.http import HttpRequestHeadersHook

            await m.addons.handle_lifecycle(HttpRequestHeadersHook(tflow.tflow()))
            assert calls == ["first", "parent", "child-fails", "after-error"]
            assert any("Addon error: boom" in e for e in errors)
            calls.clear()
            m.addons.add(A("halts", halt=True), A("never"))
            await m.addons.handle_lifecycle(HttpRequestHeadersHook(tflow.tflow()))
            assert calls == ["first", "parent", "child-fails", "after-error", "halts"]
        finally:
            logging.getLogger().removeHandler(handler)

    asyncio.run(main())


def test_a_connections_hook_runs_at_once_and_only_what_awaits_is_left_to_a_task():
    """FastAddonManager.start_hook, which mitmcompat.run_hooks_inline calls for every hook a
    connection's layers start: synchronous functions run at once, in mitmproxy's order and with its
    error handling, and nothing is left to await; from the first function that returns an awaitable
    on, the rest is returned, to run in order when awaited; a flow intercepted by a hook is not done
    with it until it is resumed."""
    import asyncio
    import logging

    from mitmproxy import exceptions, options
    from mitmproxy.proxy.layers.http import HttpRequestHeadersHook
    from mitmproxy.test import tflow

    from easgate.runtime.lean import LeanMaster

    calls: list[str] = []

    class Sync:
        def __init__(self, name, fail=False, halt=False, intercept=False):
            self.name, self.fail, self.halt, self.intercept = name, fail, halt, intercept
            self.addons = []

        def requestheaders(self, flow):
            calls.append(self.name)
            if self.fail:
                raise ValueError("boom")
            if self.halt:
                raise exceptions.AddonHalt()
            if self.intercept:
                flow.intercept()

    class Async(Sync):
        async def requestheaders(self, flow):
            await asyncio.sleep(0)
            calls.append(self.name)

    async def main():
        m = LeanMaster(options.Options(), with_termlog=False)
        parent = Sync("parent")
        parent.addons = [Sync("child-fails", fail=True), Sync("child-skipped")]
        m.addons.add(Sync("first"), parent, Sync("after-error"))
        errors: list[str] = []
        handler = logging.Handler()
        handler.emit = lambda r: errors.append(r.getMessage())
        logging.getLogger().addHandler(handler)
        try:
            assert m.addons.start_hook(HttpRequestHeadersHook(tflow.tflow())) is None
            assert calls == ["first", "parent", "child-fails", "after-error"]
            assert any("Addon error: boom" in e for e in errors)

            calls.clear()
            m.addons.add(Async("awaits"), Sync("after-await"))
            rest = m.addons.start_hook(HttpRequestHeadersHook(tflow.tflow()))
            assert rest is not None and calls == ["first", "parent", "child-fails", "after-error"]
            await rest
            assert calls[-2:] == ["awaits", "after-await"]

            calls.clear()
            m.addons.add(Sync("intercepts", intercept=True))
            f = tflow.tflow()
            rest = m.addons.start_hook(HttpRequestHeadersHook(f))
            task = asyncio.ensure_future(rest)
            await asyncio.wait_for(asyncio.shield(_until(lambda: calls[-1:] == ["intercepts"])), 5)
            assert not task.done() and f.intercepted
            f.resume()
            await asyncio.wait_for(task, 5)

            calls.clear()
            halting = LeanMaster(options.Options(), with_termlog=False)
            halting.addons.add(Sync("halts", halt=True), Async("never"))
            assert halting.addons.start_hook(HttpRequestHeadersHook(tflow.tflow())) is None
            assert calls == ["halts"]
        finally:
            logging.getLogger().removeHandler(handler)

    async def _until(cond):
        while not cond():
            await asyncio.sleep(0)

    asyncio.run(main())
