"""Upstream TLS session reuse: real gateway processes in front of a real `openssl s_server`.

The gateway opens an upstream TLS connection for every client connection; it resumes the last
session it made with that server (same address, SNI, CA and verify setting) instead of a full
handshake, as nginx's proxy_ssl_session_reuse does. `openssl s_server -www` answers every request
with its status page, which says whether the connection was `New` or `Reused`.
"""

from __future__ import annotations

import re
import shutil
import signal
import socket
import ssl
import subprocess
import threading
import time
import urllib.request
from pathlib import Path

import pytest

from easgate.runtime.aggregate import Document

from conftest import HOSTNAME, HeldPingExchange, base_config, request, wait_for, write_config

pytestmark = pytest.mark.skipif(shutil.which("openssl") is None, reason="needs the openssl command")


class SServer:
    """`openssl s_server -www` on a free loopback port with the internal CA's Exchange certificate."""

    def __init__(self, pki: Path, *version: str) -> None:
        for _ in range(5):
            with socket.socket() as s:
                s.bind(("127.0.0.1", 0))
                self.port = s.getsockname()[1]
            self.proc = subprocess.Popen(
                ["openssl", "s_server", "-accept", f"127.0.0.1:{self.port}", "-cert", str(pki / "exchange.pem"),
                 "-key", str(pki / "exchange.key"), "-www", "-quiet", *version],
                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
            if self._listening():
                return
            self.proc.kill()
            self.proc.wait()
        raise RuntimeError("openssl s_server did not start")

    def _listening(self) -> bool:
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline and self.proc.poll() is None:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
                return True
            except OSError:
                time.sleep(0.02)
        return False

    @property
    def url(self) -> str:
        return f"https://127.0.0.1:{self.port}"

    def stop(self) -> None:
        self.proc.kill()
        self.proc.wait()


@pytest.fixture
def sserver(pki):
    servers: list[SServer] = []

    def start(*version: str) -> SServer:
        servers.append(SServer(pki, *version))
        return servers[-1]

    yield start
    for s in servers:
        s.stop()


def upstream_config(pki: Path, exchange, mdm, url: str, ca: str = "internal-ca.pem") -> dict:
    cfg = base_config(pki, exchange, mdm)
    cfg["pools"]["mdm"] = {"servers": [url], "ca": str(pki / ca), "sni": "exchange.internal"}
    return cfg


def handshakes(port: int, pki: Path, n: int) -> list[str]:
    """n requests, each on a new client connection: how s_server saw each upstream connection."""
    out = []
    for _ in range(n):
        r = request(port, "GET", "/enroll", pki)
        assert r.status == 200, r.body[:300]
        m = re.search(rb"\b(New|Reused), (TLSv1\.[23])", r.body)
        assert m, r.body[:300]
        out.append(f"{m[1].decode()} {m[2].decode()}")
    return out


@pytest.mark.parametrize("version", ["-tls1_3", "-tls1_2"])
def test_upstream_tls_sessions_are_resumed_after_one_verified_full_handshake(
        start_gateway, sserver, pki, exchange, mdm, tmp_path, version):
    up = sserver(version)
    g = start_gateway(upstream_config(pki, exchange, mdm, up.url))
    v = "TLSv1.3" if version == "-tls1_3" else "TLSv1.2"
    # the first is a full, verified handshake; every reconnect resumes (mitmproxy closes upstream
    # connections without close_notify: OpenSSL's mark on such a session must not stick)
    assert handshakes(g.port, pki, 6) == [f"New {v}"] + [f"Reused {v}"] * 5
    assert "Addon error" not in g.output and "Traceback" not in g.output


def test_an_upstream_that_no_longer_verifies_after_a_reload_is_not_reached_with_an_old_session(
        start_gateway, sserver, pki, exchange, mdm, tmp_path):
    """Sessions are resumed only under the settings that verified them: after a reload that trusts
    another CA (one that did not sign the upstream's certificate), no old session lets a request
    through; the full handshake fails verification and the client gets a 502."""
    up = sserver()
    cfg = upstream_config(pki, exchange, mdm, up.url)
    path = write_config(tmp_path, cfg)
    g = start_gateway(path)
    assert handshakes(g.port, pki, 2) == ["New TLSv1.3", "Reused TLSv1.3"]
    write_config(tmp_path, upstream_config(pki, exchange, mdm, up.url, ca="rogue-ca.pem"))
    g.proc.send_signal(signal.SIGHUP)
    g.wait_output("reload complete")
    assert request(g.port, "GET", "/enroll", pki).status == 502
    wait_for(lambda: "Server TLS handshake failed. Certificate verify failed" in g.output, 5,
             "the upstream verification failure in the log", g)
    # and back on the right CA: a new full handshake, then resumption again
    write_config(tmp_path, cfg)
    g.proc.send_signal(signal.SIGHUP)
    wait_for(lambda: g.output.count("reload complete") == 2, 10, "the second reload", g)
    assert handshakes(g.port, pki, 2) == ["New TLSv1.3", "Reused TLSv1.3"]


def test_a_held_request_s_upstream_session_is_resumed_while_the_request_is_still_held(start_gateway, pki, exchange,
                                                                                       mdm):
    """A TLS 1.3 server sends its session tickets after the handshake. The gateway keeps the session
    as they arrive: a held Ping's upstream connection, answered up to an hour later, gives its
    session to the next connection at once. (Kept when the response came, it gave none while held:
    in a burst of Pings, as after a restart, every upstream handshake was a full one.)"""
    up = HeldPingExchange(tls=(pki / "exchange.pem", pki / "exchange.key"))  # Python's ssl: OpenSSL 3.0
    try:
        g = start_gateway(upstream_config(pki, exchange, mdm, up.url))
        held: list = []
        t = threading.Thread(target=lambda: held.append(request(g.port, "POST", "/enroll?Cmd=Ping", pki, body=b"p",
                                                                timeout=30)), daemon=True)
        t.start()
        assert up.pings_waiting.acquire(timeout=20), g.output  # upstream has it: handshake and tickets done
        r = request(g.port, "POST", "/enroll?Cmd=Sync", pki, body=b"s")
        assert r.status == 200 and r.headers["X-Session-Reused"] == "yes", (r.status, r.headers)
        assert t.is_alive() and not held  # still held
        up.release.set()
        t.join(20)
        assert held and held[0].status == 200 and held[0].headers["X-Session-Reused"] == "no"  # the first: full
        assert "Traceback" not in g.output
    finally:
        up.stop()


def test_tls_handshakes_are_counted_by_side_and_resumption(start_gateway, sserver, pki, exchange, mdm):
    """easgate_tls_handshakes_total: what an operator reads to see that phones and the gateway
    resume their sessions (docs/operations.md). Counted against what the peers themselves saw:
    s_server's New/Reused, Python's ssl `session_reused`."""
    up = sserver()
    g = start_gateway(upstream_config(pki, exchange, mdm, up.url), workers=1,
                      extra=["--set", "easgate_metrics=127.0.0.1:0"])
    mport = int(wait_for(lambda: re.search(r"metrics at http://127\.0\.0\.1:(\d+)/metrics", g.output), 10,
                         "the metrics line", g)[1])
    assert handshakes(g.port, pki, 3) == ["New TLSv1.3", "Reused TLSv1.3", "Reused TLSv1.3"]
    ctx = ssl.create_default_context(cafile=str(pki / "public-ca.pem"))

    def get(session=None) -> tuple[ssl.SSLSession, bool]:
        with ctx.wrap_socket(socket.create_connection(("127.0.0.1", g.port)), server_hostname=HOSTNAME,
                             session=session) as s:
            s.sendall(f"GET /enroll HTTP/1.1\r\nHost: {HOSTNAME}\r\nConnection: close\r\n\r\n".encode())
            data = b""
            while chunk := s.recv(65536):
                data += chunk
            assert data.startswith((b"HTTP/1.1 200", b"HTTP/1.0 200")), data[:200]  # s_server answers 1.0
            return s.session, s.session_reused

    session, reused = get()
    assert not reused
    assert get(session)[1]  # the phone resumed with the gateway's ticket
    with urllib.request.urlopen(f"http://127.0.0.1:{mport}/metrics", timeout=10) as r:
        samples = Document.parse(r.read().decode()).samples
    got = {(side, resumed): samples.get(("easgate_tls_handshakes_total", f'{{side="{side}",resumed="{resumed}"}}'))
           for side in ("client", "upstream") for resumed in ("no", "yes")}
    assert got == {("client", "no"): 4, ("client", "yes"): 1, ("upstream", "no"): 1, ("upstream", "yes"): 4}, got


def test_connections_opened_together_all_resume_the_newest_session(start_gateway, pki, exchange, mdm):
    """The newest session with a server is offered to every new connection until a newer one
    replaces it (nginx's proxy_ssl_session_reuse), not once: four requests whose upstream
    handshakes start together (a reconnect storm in small) all resume the warm-up's session.
    Offered once, all but one of them would get a full handshake until its ticket came."""
    up = HeldPingExchange(tls=(pki / "exchange.pem", pki / "exchange.key"))
    try:
        g = start_gateway(upstream_config(pki, exchange, mdm, up.url))
        first = request(g.port, "POST", "/enroll?Cmd=Sync", pki, body=b"s")
        assert first.status == 200 and first.headers["X-Session-Reused"] == "no"
        answers: list = []
        go = threading.Barrier(4)

        def held() -> None:
            go.wait(10)
            answers.append(request(g.port, "POST", "/enroll?Cmd=Ping", pki, body=b"p", timeout=30))

        threads = [threading.Thread(target=held, daemon=True) for _ in range(4)]
        for t in threads:
            t.start()
        for _ in threads:
            assert up.pings_waiting.acquire(timeout=20), g.output
        up.release.set()
        for t in threads:
            t.join(20)
        assert [(a.status, a.headers["X-Session-Reused"]) for a in answers] == [(200, "yes")] * 4
    finally:
        up.stop()
