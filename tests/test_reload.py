"""SIGHUP is a graceful reload: real gateway processes, a real held Ping, real TLS handshakes.

With workers (the supervisor) a reload starts new workers with the new config and lets the old ones
finish what they hold; with `--workers 1` the config is applied inside the process. Either way a
config that does not load is refused in one line and the old one keeps serving.
"""

from __future__ import annotations

import hashlib
import os
import re
import signal
import socket
import ssl
import threading
from pathlib import Path

import pytest

from easgate.tools.pki import generate_pki

from conftest import GatewayProcess, HeldPingExchange, base_config, launch, request, wait_for, write_config

PING = "/Microsoft-Server-ActiveSync?Cmd=Ping&User=alice&DeviceId=ApplF17ABCDEF01&DeviceType=iPhone"


@pytest.fixture
def second_pki(tmp_path_factory) -> Path:
    """Another gateway certificate (another public CA): the "renewed" certificate."""
    d = tmp_path_factory.mktemp("pki2")
    generate_pki(d)
    return d


def served_certificate(port: int) -> str:
    """SHA-256 of the certificate a new TLS connection is served (not verified: only compared)."""
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    with ctx.wrap_socket(socket.create_connection(("127.0.0.1", port), timeout=10),
                         server_hostname="mail.example.test") as s:
        return hashlib.sha256(s.getpeercert(binary_form=True)).hexdigest()


def file_certificate(pem: Path) -> str:
    text = pem.read_text()
    first = text[text.index("-----BEGIN CERTIFICATE-----"):text.index("-----END CERTIFICATE-----") + 25]
    return hashlib.sha256(ssl.PEM_cert_to_DER_cert(first)).hexdigest()


def reload_config(pki: Path, exchange, mdm, tmp_path: Path, cert_pki: Path) -> Path:
    cfg = base_config(pki, exchange, mdm)
    cfg["tls"]["certificate"] = str(cert_pki / "gateway-full.pem")
    cfg["pools"]["exchange"] = {"servers": [exchange.url]}  # the held-Ping Exchange speaks plain HTTP
    return write_config(tmp_path, cfg)


def start(cfg: Path, workers: int) -> GatewayProcess:
    return launch(cfg, workers=workers)


def hold_a_ping(g: GatewayProcess, pki: Path, exchange: HeldPingExchange) -> tuple[threading.Thread, dict]:
    out: dict = {}

    def ping() -> None:
        try:
            r = request(g.port, "POST", PING, pki, body=b"\x03\x01\x6a\x00", timeout=60)
            out["status"], out["body"] = r.status, r.body
        except Exception as e:  # noqa: BLE001
            out["error"] = repr(e)

    t = threading.Thread(target=ping, daemon=True)
    t.start()
    assert exchange.pings_waiting.acquire(timeout=20), "the Ping never reached Exchange\n" + g.output
    return t, out


@pytest.mark.parametrize("workers", [2, 1], ids=["supervisor", "one-process"])
def test_a_ping_held_across_reloads_completes_a_broken_config_is_refused_and_new_connections_get_the_new_certificate(
        workers, pki, second_pki, mdm, held_exchange, tmp_path):
    cfg = reload_config(pki, held_exchange, mdm, tmp_path, pki)
    g = start(cfg, workers)
    try:
        old_cert = file_certificate(pki / "gateway-full.pem")
        assert served_certificate(g.port) == old_cert
        t, out = hold_a_ping(g, pki, held_exchange)

        # 1. someone saves a broken config and reloads: refused in one line, nothing changes
        good = cfg.read_text()
        started = g.output.count(" started (pid ")
        cfg.write_text(good.replace("routes:", "routez:", 1))
        g.proc.send_signal(signal.SIGHUP)
        line = wait_for(lambda: next((l for l in g.lines if "reload refused" in l), None), 30, "the refusal", g)
        assert f"{cfg}: routez: unknown key" in line, line
        assert "Traceback" not in g.output
        assert g.output.count(" started (pid ") == started  # no new worker was even started
        assert served_certificate(g.port) == old_cert
        assert request(g.port, "GET", "/enroll", pki).status == 200

        # 2. the certificate is renewed (here: another file) and the gateway told to reload
        reload_config(pki, held_exchange, mdm, tmp_path, second_pki)
        g.proc.send_signal(signal.SIGHUP)
        wait_for(lambda: "reload complete" in g.output, 40, "the reload", g)
        assert g.proc.poll() is None
        assert served_certificate(g.port) == file_certificate(second_pki / "gateway-full.pem")
        # requests on new connections are served (by the new workers) meanwhile
        assert request(g.port, "GET", "/enroll", second_pki).status == 200

        # 3. the Ping held since before both reloads is answered
        assert "status" not in out and "error" not in out  # still held
        held_exchange.release.set()
        t.join(20)
        assert out.get("status") == 200 and out.get("body") == b"pong", out
        if workers > 1:
            # the replaced workers exit on their own once their Ping is answered
            wait_for(lambda: len(re.findall(r"old worker \d \(pid \d+\) exited with status 0: handed over",
                                            g.output)) == 2, 20, "the old workers to exit", g)
            assert "still running after the reload grace period" not in g.output
    finally:
        held_exchange.release.set()
        assert g.stop() == 0


def test_new_workers_that_cannot_start_leave_the_old_ones_serving(pki, mdm, held_exchange, tmp_path):
    """The gateway config checks out, but the new workers die at start-up: here mitmproxy's own
    ~/.mitmproxy/config.yaml, which workers read when they start, was broken meanwhile."""
    cfg = reload_config(pki, held_exchange, mdm, tmp_path, pki)
    home = tmp_path / "home"
    (home / ".mitmproxy").mkdir(parents=True)
    g = launch(cfg, workers=2, env={"HOME": str(home)})
    try:
        pids = set(re.findall(r"worker \d started \(pid (\d+)\)", g.output))
        (home / ".mitmproxy" / "config.yaml").write_text("easgate_metrics: notaport\n")
        g.proc.send_signal(signal.SIGHUP)
        line = wait_for(lambda: next((l for l in g.lines if "reload failed" in l), None), 40, "the failure", g)
        assert "during start-up" in line and "the running workers keep serving the old config" in line, line
        for pid in pids:
            os.kill(int(pid), 0)  # the old workers are still there ...
        assert request(g.port, "GET", "/enroll", pki).status == 200  # ... and serving
        new = set(re.findall(r"new worker \d started \(pid (\d+)\)", g.output))
        for pid in new:  # and no new worker is left behind
            wait_for(lambda: not Path(f"/proc/{pid}").exists() or "zombie" in Path(f"/proc/{pid}/status").read_text()
                     .lower(), 10, f"new worker {pid} gone", g)
    finally:
        assert g.stop() == 0
