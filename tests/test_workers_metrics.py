"""One metrics endpoint for all workers: real `easgate run --workers 2` processes, real TLS clients,
and the supervisor's /metrics scraped over HTTP."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import threading
import urllib.request

from easgate.runtime.aggregate import Document

from conftest import (
    LOG_CONNECTIONS,
    authz_config,
    base_config,
    easgate_argv,
    https_connection,
    launch,
    request,
    wait_for,
    write_config,
)

CONNECT = re.compile(r"^\[w(\d+)\]\[[\d:.]+\]\[127\.0\.0\.1:(\d+)\] client connect")
METRICS_AT = re.compile(r"easgate: metrics at http://127\.0\.0\.1:(\d+)/metrics \(all workers\)")
PING = "/Microsoft-Server-ActiveSync?Cmd=Ping&User=alice&DeviceId=ApplF17ABCDEF01&DeviceType=iPhone"
SYNC = "/Microsoft-Server-ActiveSync?Cmd=FolderSync&User=alice&DeviceId=ApplF17ABCDEF01&DeviceType=iPhone"
POLICY = {"mode": "block", "inventory": [{"device_id": "ApplF17ABCDEF01", "owner": "alice", "compliant": True}]}


def scrape(port: int) -> dict[tuple[str, str], float]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as r:
        assert r.status == 200
        return Document.parse(r.read().decode()).samples


def test_one_endpoint_reports_every_worker(pki, mdm, held_exchange, tmp_path):
    cfg = authz_config(pki, held_exchange, mdm, tmp_path, policy=POLICY)
    cfg["pools"]["exchange"] = {"servers": [held_exchange.url]}
    path = write_config(tmp_path, cfg)
    # the first example of docs/operations.md, with two workers and free ports
    g = launch(path, workers=2, extra=["--set", "easgate_metrics=127.0.0.1:0", *LOG_CONNECTIONS])
    try:
        mport = int(wait_for(lambda: METRICS_AT.search(g.output), 5, "the metrics line", g)[1])

        # requests on new connections: the kernel spreads them over both workers
        locals_, n_mdm, n_sync = [], 30, 10
        for i in range(n_mdm + n_sync):
            c = https_connection(g.port, pki)
            locals_.append(c.sock.getsockname()[1])
            if i < n_mdm:
                assert request(g.port, "GET", "/enroll", pki, conn=c).status == 200
            else:
                assert request(g.port, "POST", SYNC, pki, conn=c, body=b"\x03\x01\x6a\x00").status == 200
            c.close()
        served = wait_for(lambda: (m := {int(x[2]): int(x[1]) for l in list(g.lines) if (x := CONNECT.search(l))})
                          and all(p in m for p in locals_) and m, 10, "connect lines", g)
        assert {served[p] for p in locals_} == {1, 2}, "both workers must have served requests"

        # a Ping held upstream shows in the gauge
        t = threading.Thread(target=lambda: request(g.port, "POST", PING, pki, body=b"\x03\x01\x6a\x00", timeout=60),
                             daemon=True)
        t.start()
        assert held_exchange.pings_waiting.acquire(timeout=20)
        m = scrape(mport)
        assert m[("easgate_workers", "")] == 2
        assert m[("easgate_requests_total", '{route="mdm"}')] == n_mdm
        assert m[("easgate_requests_total", '{route="activesync"}')] == n_sync + 1
        assert m[("easgate_responses_total", '{route="mdm",code="200"}')] == n_mdm
        assert m[("easgate_long_polls_held", '{route="activesync",command="Ping"}')] == 1
        # decisions: the first from the inventory (in each worker that saw the device), the rest cached
        decided = sum(v for (k, lab), v in m.items() if k == "easgate_decisions_total")
        assert decided == n_sync + 1
        assert sum(v for (k, lab), v in m.items() if k == "easgate_decision_seconds_count") == n_sync + 1
        assert m[("easgate_upstream_response_seconds_count", '{route="activesync",long_poll="no"}')] == n_sync
        assert m[("easgate_upstream_response_seconds_bucket", '{route="mdm",long_poll="no",le="+Inf"}')] == n_mdm

        held_exchange.release.set()
        t.join(20)
        m = wait_for(lambda: (s := scrape(mport))[("easgate_long_polls_held", '{route="activesync",command="Ping"}')]
                     == 0 and s, 10, "the Ping to be answered", g)
        assert m[("easgate_upstream_response_seconds_count", '{route="activesync",long_poll="yes"}')] == 1

        # a reload replaces both workers: what the old ones counted stays in the totals
        g.proc.send_signal(signal.SIGHUP)
        wait_for(lambda: len(re.findall(r"old worker \d \(pid \d+\) exited", g.output)) == 2, 40, "the hand-over", g)
        after = scrape(mport)
        assert after[("easgate_workers", "")] == 2
        assert after[("easgate_requests_total", '{route="mdm"}')] == n_mdm
        assert after[("easgate_requests_total", '{route="activesync"}')] == n_sync + 1
        assert request(g.port, "GET", "/enroll", pki).status == 200
        assert scrape(mport)[("easgate_requests_total", '{route="mdm"}')] == n_mdm + 1

        # a worker killed outright leaves nothing behind: its last scraped numbers still count
        before = scrape(mport)
        pid = int(re.findall(r"new worker 1 started \(pid (\d+)\)", g.output)[-1])
        os.kill(pid, signal.SIGKILL)
        wait_for(lambda: re.search(r"worker 1 \(pid \d+\) is serving again", g.output), 40, "the restart", g)
        after = scrape(mport)
        assert after[("easgate_workers", "")] == 2
        for key in (("easgate_requests_total", '{route="mdm"}'), ("easgate_requests_total", '{route="activesync"}')):
            assert after[key] == before[key]

        # no worker ever fought over the metrics port
        assert "metrics listener" not in g.output and "not started" not in g.output, g.output
        with urllib.request.urlopen(f"http://127.0.0.1:{mport}/healthz", timeout=5) as r:
            assert r.read() == b"ok\n"
    finally:
        held_exchange.release.set()
        assert g.stop() == 0


def test_a_busy_or_bad_metrics_address_stops_the_start_with_one_line(pki, exchange, mdm, tmp_path):
    path = write_config(tmp_path, base_config(pki, exchange, mdm))
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        for value, rc, says in ((f"127.0.0.1:{port}", 1, f"cannot listen for metrics on 127.0.0.1:{port}: "
                                                         "Address already in use"),
                                ("notaport", 1, "easgate_metrics: 'notaport' is not HOST:PORT")):
            p = subprocess.run(easgate_argv("run", str(path), "--listen", "127.0.0.1:0", "--workers", "2", "--",
                                            "--set", f"easgate_metrics={value}"),
                               capture_output=True, text=True, timeout=60)
            assert p.returncode == rc and p.stderr == f"easgate: {says}\n", p.stdout + p.stderr
            assert "worker" not in p.stdout  # found before any worker starts
