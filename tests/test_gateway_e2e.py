"""The gateway core end to end: real gateway processes, real TLS clients, real upstreams."""

from __future__ import annotations

import base64
import json
import re
import socket
import ssl
import subprocess
import time

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding

from easgate.tools.standins import MdmStandIn

from conftest import (
    HOSTNAME,
    LOG_CONNECTIONS,
    ROOT,
    GatewayProcess,
    authz_config,
    base_config,
    client_context,
    curl,
    easgate_argv,
    https_connection,
    launch,
    mitmdump_argv,
    request,
    wait_for,
    write_config,
)
from support.procs import program_argv

AS = "/Microsoft-Server-ActiveSync?Cmd=Sync&User=alice&DeviceId=ApplF17ABCDEF01&DeviceType=iPhone"


def der_b64(pki, name: str) -> str:
    cert = x509.load_pem_x509_certificates((pki / f"{name}.pem").read_bytes())[0]
    return base64.b64encode(cert.public_bytes(Encoding.DER)).decode()


def mdm_cert_headers(mdm) -> list[list[str]]:
    return [h for r in mdm.requests() for h in r["headers"]
            if h[0].lower().replace("-", "").replace("_", "") == "nsclientcert"]


@pytest.fixture(scope="module")
def gw(pki, exchange, mdm, tmp_path_factory):
    """One gateway with the base config for the tests that only send it requests (the stand-ins'
    logs are emptied before each test): a process start each saved."""
    g = launch(write_config(tmp_path_factory.mktemp("gw"), base_config(pki, exchange, mdm)))
    yield g
    g.stop()


# ---------------------------------------------------------------------------------------------
# TLS offload


def test_operator_certificate_not_mitmproxys_even_with_other_cert_options(start_gateway, pki, exchange, mdm, tmp_path):
    # mitmproxy's --certs would normally serve another certificate; the gateway's must win.
    g = start_gateway(base_config(pki, exchange, mdm),
                      extra=["--certs", f"*={pki / 'device-rogue-bundle.pem'}", "--set", "request_client_cert=true"])
    ctx = client_context(pki)
    with ctx.wrap_socket(socket.create_connection(("127.0.0.1", g.port)), server_hostname=HOSTNAME) as s:
        leaf = x509.load_der_x509_certificate(s.getpeercert(binary_form=True))
        assert s.version() in ("TLSv1.2", "TLSv1.3")
    gateway_leaf = x509.load_pem_x509_certificates((pki / "gateway.pem").read_bytes())[0]
    assert leaf == gateway_leaf
    assert "mitmproxy" not in leaf.issuer.rfc4514_string()


def test_tls_below_1_2_refused(gw, pki):
    ctx = client_context(pki)
    ctx.minimum_version = ssl.TLSVersion.MINIMUM_SUPPORTED
    ctx.maximum_version = ssl.TLSVersion.TLSv1_1
    ctx.set_ciphers("ALL:@SECLEVEL=0")
    with pytest.raises(ssl.SSLError):
        with ctx.wrap_socket(socket.create_connection(("127.0.0.1", gw.port)), server_hostname=HOSTNAME):
            pass


def test_no_cert_valid_cert_and_header_reaches_mdm_only_for_valid(gw, pki, mdm):
    r = request(gw.port, "GET", "/enroll", pki)
    assert r.status == 200 and r.json()["NSClientCert"] is None
    r = request(gw.port, "GET", "/enroll", pki, cert="device-iphone")
    assert r.status == 200
    assert r.json()["NSClientCert"] == der_b64(pki, "device-iphone")
    # curl, the other real client
    out = curl(gw.port, "/enroll", pki, cert="device-android")
    body, code = out.stdout.rsplit("\n", 1)
    assert code == "200" and json.loads(body)["NSClientCert"] == der_b64(pki, "device-android")


@pytest.mark.parametrize("bad", ["device-rogue", "device-expired", "device-notyet"])
def test_bad_certificates_fail_the_handshake(gw, pki, mdm, bad):
    with pytest.raises((ssl.SSLError, ConnectionResetError, BrokenPipeError)):
        request(gw.port, "GET", "/enroll", pki, cert=bad)
    out = curl(gw.port, "/enroll", pki, cert=bad)
    assert out.returncode != 0
    assert mdm.requests() == []


def test_untrusted_mode_proceeds_without_header_and_resumption_never_verifies(start_gateway, pki, exchange, mdm):
    cfg = base_config(pki, exchange, mdm)
    cfg["tls"]["client_certs"]["on_invalid"] = "untrusted"
    g = start_gateway(cfg)
    ctx = client_context(pki, "device-rogue")
    # first handshake with the rogue certificate: accepted as "untrusted", no header
    c = https_connection(g.port, pki, "device-rogue")
    c.sock = ctx.wrap_socket(socket.create_connection(("127.0.0.1", g.port)), server_hostname=HOSTNAME)
    r = request(g.port, "GET", "/first", pki, conn=c)
    assert r.json()["NSClientCert"] is None
    session = c.sock.session
    c.close()
    assert session is not None
    # resumed session: OpenSSL skips its verify callback here; the gateway must still say no
    for _ in range(3):
        s = ctx.wrap_socket(socket.create_connection(("127.0.0.1", g.port)), server_hostname=HOSTNAME, session=session)
        c2 = https_connection(g.port, pki)
        c2.sock = s
        r = request(g.port, "GET", "/resumed", pki, conn=c2)
        reused = s.session_reused
        session = s.session or session
        c2.close()
        assert r.json()["NSClientCert"] is None
        if reused:
            break
    assert reused, "the test must exercise a resumed session"
    assert not mdm_cert_headers(mdm)


def test_resumed_session_of_a_verified_cert_still_gets_the_header(gw, pki, mdm):
    ctx = client_context(pki, "device-iphone")
    s = ctx.wrap_socket(socket.create_connection(("127.0.0.1", gw.port)), server_hostname=HOSTNAME)
    c = https_connection(gw.port, pki)
    c.sock = s
    request(gw.port, "GET", "/a", pki, conn=c)
    session = s.session
    c.close()
    s2 = ctx.wrap_socket(socket.create_connection(("127.0.0.1", gw.port)), server_hostname=HOSTNAME, session=session)
    c2 = https_connection(gw.port, pki)
    c2.sock = s2
    r = request(gw.port, "GET", "/b", pki, conn=c2)
    assert s2.session_reused
    assert r.json()["NSClientCert"] == der_b64(pki, "device-iphone")


def test_required_mode_refuses_without_cert(start_gateway, pki, exchange, mdm):
    cfg = base_config(pki, exchange, mdm)
    cfg["tls"]["client_certs"]["mode"] = "required"
    g = start_gateway(cfg)
    with pytest.raises((ssl.SSLError, ConnectionResetError, BrokenPipeError, ConnectionAbortedError)):
        request(g.port, "GET", "/enroll", pki)
    assert request(g.port, "GET", "/enroll", pki, cert="device-ipad").status == 200
    assert len(mdm.requests()) == 1


def test_off_mode_inserts_nothing(start_gateway, pki, exchange, mdm):
    cfg = base_config(pki, exchange, mdm)
    cfg["tls"]["client_certs"] = {"mode": "off"}
    g = start_gateway(cfg)
    r = request(g.port, "GET", "/enroll", pki, cert="device-iphone")
    assert r.status == 200 and r.json()["NSClientCert"] is None


def test_plain_http_is_refused_and_no_quic_listener(gw, mdm):
    with socket.create_connection(("127.0.0.1", gw.port), timeout=5) as s:
        s.sendall(b"GET /enroll HTTP/1.1\r\nHost: x\r\n\r\n")
        data = s.recv(4096)
    assert not data.startswith(b"HTTP/1.1 200")
    assert mdm.requests() == []
    # nothing bound on UDP: we can bind the same port ourselves
    u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    u.bind(("127.0.0.1", gw.port))
    u.close()


# ---------------------------------------------------------------------------------------------
# Content switching


def test_activesync_to_exchange_everything_else_to_mdm(start_gateway, pki, exchange, mdm):
    g = start_gateway(base_config(pki, exchange, mdm))
    r = request(g.port, "OPTIONS", "/Microsoft-Server-ActiveSync", pki)
    assert r.status == 200 and r.headers["MS-ASProtocolVersions"]
    assert request(g.port, "GET", "/zdm/cxf/checkin", pki).json()["upstream"] == "mdm"
    assert [r["server"] for r in exchange.requests()] == ["exchange"]
    # Exchange got the client's Host and the upstream TLS was verified with the internal CA + SNI
    host = dict((k.lower(), v) for k, v in exchange.requests()[0]["headers"])["host"]
    assert host == f"{HOSTNAME}:{g.port}"


def test_priorities_first_match_wins(start_gateway, pki, exchange, mdm):
    cfg = base_config(pki, exchange, mdm)
    cfg["routes"].insert(0, {"name": "special", "priority": 50, "pool": "mdm",
                             "match": {"path_prefix": "/Microsoft-Server-ActiveSync/special"}})
    g = start_gateway(cfg)
    assert request(g.port, "GET", "/Microsoft-Server-ActiveSync/special/x", pki).json()["upstream"] == "mdm"
    assert request(g.port, "OPTIONS", "/Microsoft-Server-ActiveSync", pki).status == 200
    assert len(exchange.requests()) == 1


def test_no_route_is_a_404_from_the_gateway(start_gateway, pki, exchange, mdm):
    cfg = base_config(pki, exchange, mdm)
    cfg["routes"] = [cfg["routes"][0]]
    g = start_gateway(cfg)
    r = request(g.port, "GET", "/enroll", pki)
    assert r.status == 404 and b"No route" in r.body
    assert exchange.requests() == [] and mdm.requests() == []


def test_default_route(start_gateway, pki, exchange, mdm):
    cfg = base_config(pki, exchange, mdm)
    cfg["routes"][1] = {"name": "fallback", "priority": 999, "pool": "mdm"}
    cfg["default_route"] = "fallback"
    g = start_gateway(cfg)
    assert request(g.port, "GET", "/anything", pki).json()["upstream"] == "mdm"


def test_case_variants_and_normalisation(start_gateway, pki, exchange, mdm):
    g = start_gateway(base_config(pki, exchange, mdm))
    # case-sensitive by default, like NetScaler: the lower-case path is not ActiveSync, goes to MDM
    assert request(g.port, "OPTIONS", "/microsoft-server-activesync", pki).json()["upstream"] == "mdm"
    # percent-encoded unreserved characters and dot segments are normalised before matching ...
    r = request(g.port, "OPTIONS", "/Microsoft-Server-%41ctiveSync", pki)
    assert "MS-ASProtocolVersions" in r.headers
    r = request(g.port, "OPTIONS", "/enroll/../Microsoft-Server-ActiveSync", pki)
    assert "MS-ASProtocolVersions" in r.headers
    # ... and the upstream receives exactly the path that was routed
    assert [x["path"] for x in exchange.requests()] == ["/Microsoft-Server-ActiveSync"] * 2

    cfg = base_config(pki, exchange, mdm)
    cfg["routes"][0]["match"]["ignore_case"] = True
    g2 = start_gateway(cfg)
    r = request(g2.port, "OPTIONS", "/microsoft-server-activesync", pki)
    assert "MS-ASProtocolVersions" in r.headers


def test_keep_alive_alternation(gw, pki, exchange, mdm):
    c = https_connection(gw.port, pki)
    ups = [request(gw.port, "OPTIONS", "/Microsoft-Server-ActiveSync", pki, conn=c).headers.get("MS-Server-ActiveSync")
           and "exchange" or "?"]
    for path in ["/enroll", "/Microsoft-Server-ActiveSync", "/enroll", "/Microsoft-Server-ActiveSync"]:
        r = request(gw.port, "OPTIONS", path, pki, conn=c)
        ups.append("exchange" if "MS-Server-ActiveSync" in r.headers else r.json()["upstream"])
    c.close()
    assert ups == ["exchange", "mdm", "exchange", "mdm", "exchange"]
    assert len(exchange.requests()) == 3 and len(mdm.requests()) == 2


def test_streamed_large_bodies_reach_the_right_upstream(start_gateway, pki, exchange, mdm):
    g = start_gateway(base_config(pki, exchange, mdm), extra=["--set", "stream_large_bodies=1k"])
    big = b"x" * 2_000_000
    r = request(g.port, "POST", "/enroll/upload", pki, body=big)
    assert r.status == 200 and r.json()["upstream"] == "mdm"
    r = request(g.port, "PUT", "/Microsoft-Server-ActiveSync/upload", pki, body=big)
    assert r.status == 200
    assert exchange.requests()[0]["body_len"] == len(big)
    assert mdm.requests()[0]["body_len"] == len(big)


def test_round_robin_and_a_refusing_server_is_skipped(start_gateway, pki, exchange, mdm):
    other = MdmStandIn("mdm2").start()
    dead = socket.socket()
    dead.bind(("127.0.0.1", 0))
    dead_port = dead.getsockname()[1]
    dead.close()  # nothing listens: connections are refused
    try:
        cfg = base_config(pki, exchange, mdm)
        cfg["pools"]["mdm"] = {"servers": [f"http://127.0.0.1:{dead_port}", mdm.url, other.url], "down_time_s": 60}
        g = start_gateway(cfg)
        statuses = [request(g.port, "GET", f"/r{i}", pki).status for i in range(7)]
        assert statuses.count(502) <= 1  # at most the first try hits the dead server, then it sits out
        assert statuses[-6:] == [200] * 6
        assert len(mdm.requests()) >= 2 and len(other.requests()) >= 2  # both live servers take turns
        assert "marked down" in g.output
    finally:
        other.stop()


def test_upstream_down_or_not_answering_connect_gives_502_quickly(start_gateway, pki, exchange, mdm):
    # A listener whose backlog is full: the kernel drops further SYNs, so connect() hangs.
    hang = socket.socket()
    hang.bind(("127.0.0.1", 0))
    hang.listen(0)
    fillers = []
    for _ in range(4):
        f = socket.socket()
        f.setblocking(False)
        f.connect_ex(hang.getsockname())
        fillers.append(f)
    try:
        cfg = base_config(pki, exchange, mdm)
        cfg["pools"]["mdm"] = {"servers": ["http://127.0.0.1:%d" % hang.getsockname()[1]], "connect_timeout_s": 1,
                               "down_time_s": 0}
        g = start_gateway(cfg)
        t0 = time.monotonic()
        r = request(g.port, "GET", "/enroll", pki, timeout=20)
        assert r.status == 502
        assert time.monotonic() - t0 < 5
        deadline = time.monotonic() + 5  # the log line is read by another thread: poll for it
        while "no connection within 1s" not in g.output and time.monotonic() < deadline:
            time.sleep(0.05)
        assert "no connection within 1s" in g.output
    finally:
        for f in fillers:
            f.close()
        hang.close()


def _backlog_full_listener() -> tuple[socket.socket, list[socket.socket]]:
    """A listener whose accept queue is full: the kernel drops further SYNs, so a connect() hangs."""
    hang = socket.socket()
    hang.bind(("127.0.0.1", 0))
    hang.listen(0)
    fillers = []
    for _ in range(4):
        f = socket.socket()
        f.setblocking(False)
        f.connect_ex(hang.getsockname())
        fillers.append(f)
    return hang, fillers


def _connecting_to(port: int, besides: list[socket.socket]) -> bool:
    """Whether a socket other than `besides` is in SYN_SENT towards 127.0.0.1:port (/proc/net/tcp)."""
    ours = {f.getsockname()[1] for f in besides}
    for line in open("/proc/net/tcp").read().splitlines()[1:]:
        fields = line.split()
        if (fields[3] == "02" and int(fields[2].split(":")[1], 16) == port
                and int(fields[1].split(":")[1], 16) not in ours):
            return True
    return False


def _wait(pred, timeout: float, what: str, g=None):
    deadline = time.monotonic() + timeout
    while not (v := pred()):
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}\n" + (g.output if g else ""))
        time.sleep(0.02)
    return v


def test_a_client_hanging_up_mid_connect_never_marks_the_server_down(start_gateway, pki, exchange, mdm):
    """mitmproxy cancels the upstream connect of a client that went away ("client disconnected"):
    the server did nothing wrong and stays in its pool. A connect that really times out still counts."""
    hang, fillers = _backlog_full_listener()
    port = hang.getsockname()[1]
    try:
        cfg = base_config(pki, exchange, mdm)
        cfg["pools"]["mdm"] = {"servers": [f"http://127.0.0.1:{port}"], "connect_timeout_s": 3, "down_time_s": 60}
        g = start_gateway(cfg)
        for i in range(3):  # three phones giving up while the gateway connects for them
            s = client_context(pki).wrap_socket(socket.create_connection(("127.0.0.1", g.port), timeout=10),
                                                server_hostname=HOSTNAME)
            s.sendall(f"GET /enroll HTTP/1.1\r\nHost: {HOSTNAME}\r\n\r\n".encode())
            _wait(lambda: _connecting_to(port, fillers), 10, "the gateway's connect to the hanging server", g)
            s.close()
            _wait(lambda: g.output.count("error establishing server connection: client disconnected") == i + 1,
                  10, "the connect to be cancelled", g)
        assert "marked down" not in g.output
        # the same server not answering the connect (a client that waits) is marked down
        t0 = time.monotonic()
        assert request(g.port, "GET", "/enroll", pki, timeout=20).status == 502
        assert time.monotonic() - t0 < 10
        out = g.wait_output("marked down for 60s")
        assert f"upstream http://127.0.0.1:{port} (pool mdm) marked down for 60s: easgate: no connection within 3s" in out
    finally:
        for f in fillers:
            f.close()
        hang.close()
    assert g.output.count("marked down") == 1


def test_a_pool_with_every_server_marked_down_stays_in_service(start_gateway, pki, exchange, mdm):
    """Marks only steer: with every server of a pool down, each request tries the server that comes
    back first, and a server that accepts a connection is up again at once."""
    ports = []
    for _ in range(2):
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        ports.append(s.getsockname()[1])
        s.close()  # nothing listens: connections are refused
    cfg = base_config(pki, exchange, mdm)
    cfg["pools"]["mdm"] = {"servers": [f"http://127.0.0.1:{p}" for p in ports], "down_time_s": 300}
    g = start_gateway(cfg)
    assert [request(g.port, "GET", f"/r{i}", pki).status for i in range(2)] == [502, 502]
    g.wait_output(f"127.0.0.1:{ports[1]} (pool mdm) marked down for 300s")
    assert f"127.0.0.1:{ports[0]} (pool mdm) marked down for 300s" in g.output  # both are down now
    assert request(g.port, "GET", "/r2", pki).status == 502  # tried anyway (the first one back), refused again
    # the server that went down longest ago comes back: the next request finds it, though marked down
    first_back = ports[1]
    revived = MdmStandIn("mdm-revived", port=first_back).start()
    try:
        assert request(g.port, "GET", "/r3", pki).status == 200
        assert revived.requests()[-1]["path"] == "/r3"
        g.wait_output(f"upstream http://127.0.0.1:{first_back} (pool mdm) is up again")
        # and it is in the rotation again: the other one is still marked down, so every request goes here
        assert [request(g.port, "GET", f"/s{i}", pki).status for i in range(3)] == [200, 200, 200]
        assert len(revived.requests()) == 4
    finally:
        revived.stop()


# ---------------------------------------------------------------------------------------------
# The client-certificate header can't be forged


SPOOFS = [("NSClientCert", "forged-1"), ("NSClientCert", "forged-2"), ("nsclientcert", "forged-3"),
          ("NS_ClientCert", "forged-4"), ("NS-ClientCert", "forged-5")]


@pytest.mark.parametrize("cert", [None, "device-iphone", "device-rogue"])
def test_spoofed_cert_headers_never_reach_any_upstream(start_gateway, pki, exchange, mdm, cert):
    cfg = base_config(pki, exchange, mdm)
    cfg["tls"]["client_certs"]["on_invalid"] = "untrusted"
    g = start_gateway(cfg)
    request(g.port, "GET", "/enroll", pki, cert=cert, headers=SPOOFS)
    request(g.port, "OPTIONS", "/Microsoft-Server-ActiveSync", pki, cert=cert, headers=SPOOFS)
    seen = mdm_cert_headers(mdm) + [h for r in exchange.requests() for h in r["headers"]
                                    if "clientcert" in h[0].lower().replace("-", "").replace("_", "")]
    assert all("forged" not in v for _, v in seen)
    if cert == "device-iphone":
        assert seen == [["NSClientCert", der_b64(pki, "device-iphone")]]
    else:
        assert seen == []


# ---------------------------------------------------------------------------------------------
# Startup errors: one message naming file, key and fix; non-zero exit; no proxy left running


def _bad_configs(pki, exchange, mdm, tmp_path):
    good = base_config(pki, exchange, mdm)
    cases = {}
    c = json.loads(json.dumps(good)); c["tsl"] = c.pop("tls")
    cases["unknown key"] = (c, "tsl", "did you mean 'tls'")
    c = json.loads(json.dumps(good)); c["listen"]["port"] = "eighty"
    cases["wrong type"] = (c, "listen.port", "whole number")
    c = json.loads(json.dumps(good)); c["routes"][0]["pool"] = "exchnage"
    cases["unknown pool"] = (c, "routes[0].pool", "no pool named 'exchnage'")
    c = json.loads(json.dumps(good)); c["tls"]["certificate"] = str(tmp_path / "missing.pem")
    cases["missing cert"] = (c, "tls.certificate", "file not found")
    unreadable = tmp_path / "garbage.pem"
    unreadable.write_text("not a certificate")
    c = json.loads(json.dumps(good)); c["tls"]["certificate"] = str(unreadable)
    cases["unreadable cert"] = (c, "tls.certificate", "no PEM certificate")
    mismatch = tmp_path / "mismatch.pem"
    mismatch.write_bytes((pki / "gateway.pem").read_bytes() + (pki / "exchange.key").read_bytes())
    c = json.loads(json.dumps(good)); c["tls"]["certificate"] = str(mismatch)
    cases["key mismatch"] = (c, "tls.certificate", "does not match")
    return cases


@pytest.mark.parametrize("case", ["unknown key", "wrong type", "unknown pool", "missing cert", "unreadable cert",
                                  "key mismatch", "missing file"])
def test_bad_config_stops_startup(pki, exchange, mdm, tmp_path, case):
    if case == "missing file":
        path, key, text = tmp_path / "nope.yaml", "", "file not found"
    else:
        cfg, key, text = _bad_configs(pki, exchange, mdm, tmp_path)[case]
        path = write_config(tmp_path, cfg)
    for argv in (easgate_argv("run", str(path)), easgate_argv("check", str(path))):
        p = subprocess.run(argv, capture_output=True, text=True, timeout=60, cwd=ROOT)
        assert p.returncode != 0
        lines = [l for l in p.stderr.splitlines() if l.strip()]
        assert len(lines) == 1, p.stderr
        assert str(path) in lines[0] and key in lines[0] and text in lines[0]
    # the plain mitmproxy way fails too, and does not stay up as a plain proxy
    g = GatewayProcess(mitmdump_argv(path))
    try:
        assert g.wait_exit(30) != 0
    finally:
        g.stop()
    assert key in g.output and "Reverse proxy to" not in g.output


@pytest.mark.parametrize("bad_set", [["--set", "easgate_listen"],  # no value
                                     ["--set", "easgate_listen=a", "--set", "easgate_listen=b"],
                                     ["--set", "easgate_listen=nonsense"]])
def test_bad_set_value_does_not_leave_a_plain_proxy_running(pki, exchange, mdm, tmp_path, bad_set):
    path = write_config(tmp_path, base_config(pki, exchange, mdm))
    g = GatewayProcess([*program_argv("mitmdump"), "-s", str(ROOT / "addons/gateway.py"), "--set", "server=false", "--set", f"easgate_config={path}", *bad_set])
    try:
        rc = g.wait_exit(30)
    finally:
        g.stop()
    assert rc != 0, g.output
    assert "Reverse proxy to" not in g.output  # the gateway's listener never came up without it


def test_plain_mitmdump_script_way_works(start_gateway, pki, exchange, mdm):
    g = start_gateway(base_config(pki, exchange, mdm), via="mitmdump")
    r = request(g.port, "GET", "/enroll", pki, cert="device-iphone", headers={"NSClientCert": "forged"})
    assert r.json()["NSClientCert"] == der_b64(pki, "device-iphone")


def test_the_script_way_never_listens_as_a_forward_proxy(pki, exchange, mdm, tmp_path):
    """The documented `-s` command line never brings up mitmproxy's default listener (*:8080, a
    forward proxy): with 8080 taken, the gateway still starts, and only its own port answers."""
    path = write_config(tmp_path, base_config(pki, exchange, mdm))
    squatter = socket.socket()
    squatter.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        squatter.bind(("0.0.0.0", 8080))
        squatter.listen(1)
    except OSError:
        pass  # something else holds 8080 already: the same condition for the gateway
    try:
        g = GatewayProcess(mitmdump_argv(path))
        try:
            g.wait_ready()
            r = request(g.port, "GET", "/enroll", pki, cert="device-iphone")
            assert r.status == 200
            assert "HTTP(S) proxy listening" not in g.output and "8080" not in g.output
        finally:
            g.stop()
    finally:
        squatter.close()


def test_the_script_way_without_server_false_refuses_to_run(pki, exchange, mdm, tmp_path):
    """Without `--set server=false`, mitmproxy's own listener is up before the script loads: the
    gateway stops the process instead of having served as a forward proxy (a free port stands in
    for 8080 so the test does not depend on it)."""
    path = write_config(tmp_path, base_config(pki, exchange, mdm))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    g = GatewayProcess([*program_argv("mitmdump"), "--listen-host", "127.0.0.1", "--listen-port", str(port),
                        "-s", str(ROOT / "addons/gateway.py"), "--set", f"easgate_config={path}",
                        "--set", "easgate_listen=127.0.0.1:0"])
    try:
        assert g.wait_exit(30) != 0
    finally:
        g.stop()
    assert "start mitmdump/mitmweb with --set server=false" in g.output


def test_upstream_that_does_not_answer_gets_a_502_after_the_response_timeout(start_gateway, pki, exchange, mdm):
    silent = MdmStandIn("silent", hold_s=30).start()  # holds ".../hold" requests for 30 s
    try:
        cfg = base_config(pki, exchange, mdm)
        cfg["pools"]["mdm"] = {"servers": [silent.url], "response_timeout_s": 1}
        g = start_gateway(cfg)
        t0 = time.monotonic()
        r = request(g.port, "GET", "/hold", pki, timeout=20)
        assert r.status == 502
        assert 0.9 < time.monotonic() - t0 < 5
        wait_for(lambda: "no response within 1s" in g.output, 5, "the timeout's log line", g)  # may follow the 502
        assert request(g.port, "GET", "/quick", pki).status == 200
    finally:
        silent.stop()


@pytest.mark.parametrize("host", ["evil/Microsoft-Server-ActiveSync", "a b", "x@y", "mail.example.test/x?"])
def test_hosts_that_are_not_an_authority_get_a_400(gw, pki, exchange, mdm, host):
    c = https_connection(gw.port, pki)
    c.putrequest("GET", "/enroll", skip_host=True, skip_accept_encoding=True)
    c.putheader("Host", host)
    c.endheaders()
    r = c.getresponse()
    assert r.status == 400 and b"Host" in r.read()
    c.close()
    assert mdm.requests() == [] and exchange.requests() == []


def test_filter_routes_see_the_normalised_path(start_gateway, pki, exchange, mdm):
    cfg = base_config(pki, exchange, mdm)
    cfg["routes"][0] = {"name": "activesync", "priority": 100, "pool": "exchange",
                        "match": {"filter": "~u ^https?://[^/]+/Microsoft-Server-ActiveSync"}}
    g = start_gateway(cfg)
    r = request(g.port, "OPTIONS", "/enroll/../Microsoft-Server-%41ctiveSync", pki)
    assert "MS-ASProtocolVersions" in r.headers
    assert exchange.requests()[0]["path"] == "/Microsoft-Server-ActiveSync"


def test_protocol_upgrades_are_not_passed_on(gw, pki, mdm):
    # a 101 would turn the connection into a tunnel no route or header rule sees again
    r = request(gw.port, "GET", "/enroll", pki, headers={"Connection": "keep-alive, Upgrade", "Upgrade": "websocket"})
    assert r.status == 200
    names = {k.lower(): v for k, v in mdm.requests()[0]["headers"]}
    assert "upgrade" not in names and "upgrade" not in names.get("connection", "").lower()


def test_connection_lines_are_debug_lines_unless_asked_for(start_gateway, pki, exchange, mdm, tmp_path):
    """mitmproxy's four lines per connection (client/server connect/disconnect) stay out of the log
    by default: four per phone reconnect are millions a day on a busy gateway (configuration.md,
    easgate_log_connections). What matters still is logged (here a deny); the option brings them back."""
    cfg = authz_config(pki, exchange, mdm, tmp_path, policy={"mode": "block"})
    deny = "/Microsoft-Server-ActiveSync?Cmd=Sync&User=alice&DeviceId=ApplNOTINVENTORY&DeviceType=iPhone"
    routine = re.compile(r"\] (client connect|client disconnect|server connect|server disconnect)( \S+)?$")

    def kinds(g: GatewayProcess) -> set[str]:
        return {m[1] for line in list(g.lines) if (m := routine.search(line))}

    for extra, shown in (((), False), (LOG_CONNECTIONS, True)):
        g = start_gateway(cfg, extra=extra)
        assert request(g.port, "GET", "/enroll", pki).status == 200  # a connection that ends
        # then a request on a new connection whose deny is logged: the first one's lines come before it
        assert request(g.port, "POST", deny, pki, body=b"\x03\x01\x6a\x00").status == 403
        wait_for(lambda: "easgate: deny alice ApplNOTINVENTORY" in g.output, 10, "the deny line", g)
        if shown:
            wait_for(lambda: kinds(g) == {"client connect", "client disconnect", "server connect", "server disconnect"},
                     10, "the connection lines", g)
        else:
            assert kinds(g) == set(), g.output
