"""Adversarial review of the round after 72aaa5e: each test is a finding, shown against a real
gateway process (docs/security.md names each one)."""

from __future__ import annotations

import asyncio
import gzip
import json
import signal
import socket
import subprocess
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import redis
from test_mitmweb import start_web

from easgate.authz.revocations import make_record
from easgate.authz.wbxml import E, wbxml
from easgate.gateway.sharedcache import publish_revocation

from conftest import authz_config as make_authz_config
from conftest import client_context, easgate_argv, launch, request, wait_for, write_config

DEV = "ApplF17ABCDEF01"
SYNC = f"/Microsoft-Server-ActiveSync?Cmd=Sync&User=alice&DeviceId={DEV}&DeviceType=iPhone"


class HeldConnector(ThreadingHTTPServer):
    """An XNC connector that answers Allow only when `release` is set: a decision kept in flight."""

    daemon_threads = True

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), _HeldConnectorHandler)
        self.asked = threading.Semaphore(0)
        self.release = threading.Event()
        threading.Thread(target=self.serve_forever, daemon=True).start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}/services/ActiveSync/Authorize"


class _HeldConnectorHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *a) -> None:
        pass

    def do_GET(self) -> None:
        srv: HeldConnector = self.server  # type: ignore[assignment]
        srv.asked.release()
        srv.release.wait(30)
        body = json.dumps({"result": "Allow"}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


def sync_status(port: int, pki: Path) -> int | None:
    """The Sync's status; None when the gateway closed the connection instead (a revocation that
    lands while the Sync is in flight ends it as a held request)."""
    try:
        return request(port, "POST", SYNC, pki, body=b"\x03\x01\x6a\x00").status
    except (ConnectionError, OSError):
        return None


def audit_lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []


def test_a_route_renamed_by_a_reload_while_its_request_is_decided_is_a_deny_audited(pki, exchange, mdm, tmp_path):
    """A reload (SIGHUP) renames the ActiveSync route while a request routed on it waits for the
    connector. Before: the gate's `enforce` and the final check raised KeyError on the vanished
    route name (two tracebacks), the request was killed with no audit line at all. Now: a deny
    (`internal error`), answered and audited, and Exchange never sees it."""
    conn = HeldConnector()
    try:
        cfg = make_authz_config(pki, exchange, mdm, tmp_path)
        cfg["authorization"]["connector"] = {"url": conn.url, "timeout_ms": 20000}
        path = write_config(tmp_path, cfg)
        g = launch(path, workers=1)
        try:
            out: dict = {}

            def sync() -> None:
                try:
                    out["status"] = request(g.port, "POST", SYNC, pki, body=b"\x03\x01\x6a\x00", timeout=30).status
                except Exception as e:  # noqa: BLE001
                    out["error"] = repr(e)

            t = threading.Thread(target=sync, daemon=True)
            t.start()
            assert conn.asked.acquire(timeout=20), "the connector was never asked\n" + g.output
            cfg["routes"][0]["name"] = "eas"  # the same route, renamed
            write_config(tmp_path, cfg)
            g.proc.send_signal(signal.SIGHUP)
            wait_for(lambda: "reload complete" in g.output, 30, "the reload", g)
            conn.release.set()
            t.join(30)
            assert out.get("status") == 403, (out, g.output)
            assert not [r for r in exchange.requests() if "Cmd=Sync" in r["path"]]
            wait_for(lambda: [a for a in audit_lines(tmp_path / "audit.jsonl")
                                      if a.get("decision") == "deny"], 10, "the deny's audit line", g)
            assert [(a["decision"], a["source"]) for a in audit_lines(tmp_path / "audit.jsonl")] == [
                ("allow", "connector"), ("deny", "internal")]  # decided, then refused on the new config
            assert "Traceback" not in g.output, g.output
        finally:
            conn.release.set()
            g.stop()
    finally:
        conn.shutdown()
        conn.server_close()


def test_a_node_restarting_with_many_revocations_denies_what_the_cluster_revoked_from_its_first_request(
        pki, exchange, mdm, tmp_path, own_redis):
    """Another node revoked DEV (in Redis only). This node's own revocation file holds 20,000
    records (every device blocked over the years: `easgate devices block --revocations`). Before:
    on starting, the node pushed each of its records to Redis, one round trip each, *before* reading
    the cluster's hash; its first requests waited at most 2 s for that read, then were decided
    without the cluster's revocations: DEV was allowed (200) for seconds. Now the hash is read
    first, and DEV is denied from the first request."""
    lines = [json.dumps(make_record(None, f"Blocked{i:06d}", "blocked in the connector inventory", now=1.7e9))
             for i in range(20_000)]
    (tmp_path / "revocations.jsonl").write_text("\n".join(lines) + "\n")
    assert asyncio.run(publish_revocation(own_redis.url, make_record("alice", DEV, "phone reported lost")))
    cfg = make_authz_config(pki, exchange, mdm, tmp_path, policy={"mode": "block", "allow": {"devices": [DEV]}},
                            revocations=str(tmp_path / "revocations.jsonl"), cache={"redis": own_redis.url})
    g = launch(write_config(tmp_path, cfg), workers=1)
    try:
        assert request(g.port, "POST", SYNC, pki, body=b"\x03\x01\x6a\x00").status == 403, g.output
        assert [(a["decision"], a["reason"]) for a in audit_lines(tmp_path / "audit.jsonl")][:1] == [
            ("deny", "revoked: phone reported lost")]
    finally:
        g.stop()


def test_an_operators_revoke_after_a_restore_stamped_by_a_clock_ahead_is_in_force(
        pki, exchange, mdm, tmp_path, own_redis):
    """Another node, its clock 60 s ahead, restored DEV; then an operator revokes DEV, with
    `easgate.revoke` on a node (mitmweb) and with `easgate revoke` (the CLI, file and Redis).
    Before: each revoke was stamped with its own clock, older than the restore, so the restore
    won everywhere: DEV kept getting 200 while both said "revoked". Now a revoke made after a
    record this node (or Redis) knows is stamped after it, and is in force."""
    ahead = make_record("alice", DEV, "easgate.unrevoke", "restore", now=time.time() + 60)
    assert asyncio.run(publish_revocation(own_redis.url, ahead))
    cfg = make_authz_config(pki, exchange, mdm, tmp_path, policy={"mode": "block", "allow": {"devices": [DEV]}},
                            cache={"redis": own_redis.url})
    proc, w = start_web(write_config(tmp_path, cfg))
    try:
        assert request(proc.port, "POST", SYNC, pki, body=b"\x03\x01\x6a\x00").status == 200
        assert w.command("easgate.revoke", "alice", DEV).startswith(f"revoked alice on {DEV}")
        assert request(proc.port, "POST", SYNC, pki, body=b"\x03\x01\x6a\x00").status == 403
        assert w.command("easgate.unrevoke", "alice", DEV).startswith(f"restored alice on {DEV}")
        assert request(proc.port, "POST", SYNC, pki, body=b"\x03\x01\x6a\x00").status == 200
    finally:
        proc.stop()

    # the CLI, on a machine whose gateways follow a revocation file, with the same restore ahead in Redis
    redis.Redis.from_url(own_redis.url).delete("easgate:revocations")
    assert asyncio.run(publish_revocation(own_redis.url, ahead))
    cfg["authorization"]["revocations"] = str(tmp_path / "revocations.jsonl")
    path = write_config(tmp_path, cfg, "node.yaml")
    g = launch(path, workers=1)
    try:
        assert request(g.port, "POST", SYNC, pki, body=b"\x03\x01\x6a\x00").status == 200
        r = subprocess.run(easgate_argv("revoke", str(path), "alice", DEV, "--reason", "phone reported lost"),
                           capture_output=True, text=True, timeout=30)
        assert r.returncode == 0 and "every node denies it" in r.stdout, r.stdout + r.stderr
        wait_for(lambda: sync_status(g.port, pki) == 403, 5,
                 "the revoke in force", g)
    finally:
        g.stop()


def test_a_revocation_made_in_mitmweb_survives_a_config_reload(pki, exchange, mdm, tmp_path):
    """mitmweb without a revocation file: `easgate.revoke` acts in its own process. The operator
    then loads a changed gateway config (mitmweb's options: easgate_config). Before: the reload
    built an empty revocation table and the revoked device was allowed again (200). Now the
    process's own revocations carry over, as the file's do."""
    cfg = make_authz_config(pki, exchange, mdm, tmp_path, policy={"mode": "block", "allow": {"devices": [DEV]}})
    proc, w = start_web(write_config(tmp_path, cfg))
    try:
        assert w.command("easgate.revoke", "alice", DEV).startswith(f"revoked alice on {DEV}: this process only")
        assert request(proc.port, "POST", SYNC, pki, body=b"\x03\x01\x6a\x00").status == 403
        cfg["authorization"]["deny"] = {"status": 451}  # any change; the same config under another name would do too
        w.call("PUT", "/options", {"easgate_config": str(write_config(tmp_path, cfg, "changed.yaml"))})
        proc.wait_output("changed.yaml: 2 routes")
        assert request(proc.port, "POST", SYNC, pki, body=b"\x03\x01\x6a\x00").status == 451
    finally:
        proc.stop()


def test_a_redis_url_redis_cannot_use_is_one_line_not_a_half_applied_config(pki, exchange, mdm, tmp_path):
    """`cache.redis` with a port out of range (a typo) or a bad option passed the config check, then
    the Redis client refused it while the gate swapped its state in: after the other parts had
    swapped theirs (routes, TLS) and before the config in force was updated (a mixed config), with
    a traceback and no line naming the key. Now `easgate check` and `easgate run` say it in one line."""
    for url in ("redis://127.0.0.1:99999/0", "redis://127.0.0.1:6379/0?socket_timeout=soon"):
        cfg = make_authz_config(pki, exchange, mdm, tmp_path, policy={"mode": "block"}, cache={"redis": url})
        path = write_config(tmp_path, cfg)
        for argv in (easgate_argv("check", str(path)),
                     easgate_argv("run", str(path), "--listen", "127.0.0.1:0", "--workers", "1")):
            r = subprocess.run(argv, capture_output=True, text=True, timeout=60)
            out = r.stdout + r.stderr
            assert r.returncode == 2 and "Traceback" not in out, (argv, out)
            assert f"{path}: authorization.cache.redis:" in out and "not a Redis URL" in out, out


def test_a_connector_the_gate_cannot_build_is_one_line(pki, exchange, mdm, tmp_path):
    """As above for the connector: a `ca` file that is not PEM, a URL whose port is out of range.
    Both passed the config check and failed in the gate's swap, with a traceback."""
    (tmp_path / "junk-ca.pem").write_text("not a certificate\n")
    for conn, key in (({"url": "https://127.0.0.1:9443/services/ActiveSync/Authorize", "ca": "junk-ca.pem"}, "ca"),
                      ({"url": "http://127.0.0.1:99999/services/ActiveSync/Authorize"}, "url")):
        cfg = make_authz_config(pki, exchange, mdm, tmp_path, policy={"mode": "block"})
        cfg["authorization"]["connector"] = conn
        path = write_config(tmp_path, cfg)
        for argv in (easgate_argv("check", str(path)),
                     easgate_argv("run", str(path), "--listen", "127.0.0.1:0", "--workers", "1")):
            r = subprocess.run(argv, capture_output=True, text=True, timeout=60)
            out = r.stdout + r.stderr
            assert r.returncode == 2 and "Traceback" not in out, (argv, out)
            assert f"{path}: authorization.connector.{key}:" in out, out


def test_after_a_reload_a_connector_only_node_still_hears_the_clusters_revocations(
        pki, exchange, mdm, tmp_path, own_redis, connector):
    """A node that decides with the connector alone (no policy file: the XNC layout) and shares its
    cache on Redis is reloaded (SIGHUP). Before: the reload replaced its Redis client with one that
    was never started (it was started only when a policy watcher ran), so the node stopped hearing
    the cluster: a device revoked on another machine kept getting 200 here. Now it is denied within
    the 5 s docs/scaling.md promises."""
    connector.allowed.add(DEV)
    cfg = make_authz_config(pki, exchange, mdm, tmp_path, connector=connector, cache={"redis": own_redis.url})
    path = write_config(tmp_path, cfg)
    g = launch(path, workers=1)
    try:
        assert request(g.port, "POST", SYNC, pki, body=b"\x03\x01\x6a\x00").status == 200
        g.proc.send_signal(signal.SIGHUP)
        wait_for(lambda: "reload complete" in g.output, 30, "the reload", g)
        assert request(g.port, "POST", SYNC, pki, body=b"\x03\x01\x6a\x00").status == 200
        # another machine's `easgate revoke`: Redis only (its config has no revocation file)
        other = write_config(tmp_path, {**cfg, "authorization": {**cfg["authorization"]}}, "other.yaml")
        r = subprocess.run(easgate_argv("revoke", str(other), "alice", DEV, "--reason", "phone reported lost"),
                           capture_output=True, text=True, timeout=30)
        assert r.returncode == 0 and "every node denies it" in r.stdout, r.stdout + r.stderr
        wait_for(lambda: sync_status(g.port, pki) == 403, 5,
                 "the revocation in force on the reloaded node", g)
    finally:
        g.stop()


def test_junk_nested_json_in_redis_does_not_deafen_a_node(pki, exchange, mdm, tmp_path, own_redis):
    """Something writes deeply nested JSON into Redis: as an event on the channel, and as a
    revocation record a node reads when it (re)subscribes. Before: json raised RecursionError,
    which is not a ValueError: it ended the node's listener for good (no more cluster revocations
    or blocks, every first request waiting 2 s). Now junk is skipped and counted, and a
    revocation made afterwards on another machine is in force within 5 s."""
    junk = "[" * 100_000 + "]" * 100_000
    r = redis.Redis.from_url(own_redis.url)
    r.hset("easgate:revocations", "junk|*", f"1|1|{junk}")
    cfg = make_authz_config(pki, exchange, mdm, tmp_path, policy={"mode": "block", "allow": {"devices": [DEV]}},
                            cache={"redis": own_redis.url})
    path = write_config(tmp_path, cfg)
    g = launch(path, workers=1)
    try:
        assert request(g.port, "POST", SYNC, pki, body=b"\x03\x01\x6a\x00").status == 200
        wait_for(lambda: r.pubsub_numsub("easgate:events")[0][1] >= 1, 10, "the node listening", g)
        r.publish("easgate:events", junk)
        cli = subprocess.run(easgate_argv("revoke", str(path), "alice", DEV, "--reason", "phone reported lost"),
                             capture_output=True, text=True, timeout=30)
        assert cli.returncode == 0, cli.stdout + cli.stderr
        wait_for(lambda: sync_status(g.port, pki) == 403, 5,
                 "the revocation in force after the junk", g)
        assert "Traceback" not in g.output, g.output
    finally:
        g.stop()


def test_a_junk_line_in_the_revocation_file_does_not_swallow_the_revocation_after_it(pki, exchange, mdm, tmp_path):
    """One write appends a line of deeply nested JSON and then a real revocation. Before: the
    RecursionError was not caught as a line that does not parse, the read had already moved past
    both lines, and the revocation after the junk was never applied (200 until a restart). Now the
    junk is skipped with one warning and the device is denied within 5 s."""
    revocations = tmp_path / "revocations.jsonl"
    cfg = make_authz_config(pki, exchange, mdm, tmp_path, policy={"mode": "block", "allow": {"devices": [DEV]}},
                            revocations=str(revocations))
    g = launch(write_config(tmp_path, cfg), workers=1)
    try:
        assert request(g.port, "POST", SYNC, pki, body=b"\x03\x01\x6a\x00").status == 200
        junk = "[" * 100_000 + "]" * 100_000
        with open(revocations, "a") as f:
            f.write(junk + "\n" + json.dumps(make_record("alice", DEV, "phone reported lost")) + "\n")
        wait_for(lambda: sync_status(g.port, pki) == 403, 5,
                 "the revocation after the junk line in force", g)
        g.wait_output("skipped a line that is not a revocation")
    finally:
        g.stop()


def test_a_command_name_with_terminal_escapes_is_shown_escaped_in_easgate_replay(pki, exchange, mdm, tmp_path):
    """A client sends `Cmd=` with an ESC sequence that erases the terminal line (an unknown
    command: denied). The gateway records the flow; an operator replays the capture. Before: the
    replay table printed the command raw, so the row could erase itself on the operator's terminal
    (and OSC sequences could retitle it or write the clipboard). Now it is escaped."""
    cfg = make_authz_config(pki, exchange, mdm, tmp_path, policy={"mode": "block", "allow": {"devices": [DEV]}})
    path = write_config(tmp_path, cfg)
    flows = tmp_path / "flows.mitm"
    g = launch(path, workers=1, extra=["-w", str(flows)])
    try:
        evil = f"/Microsoft-Server-ActiveSync?Cmd=%1B%5B2K%0D&User=alice&DeviceId={DEV}&DeviceType=iPhone"
        assert request(g.port, "POST", evil, pki, body=b"\x03\x01\x6a\x00").status == 403
    finally:
        g.stop()
    r = subprocess.run(easgate_argv("replay", str(flows), "--config", str(path)), capture_output=True, text=True,
                       timeout=60)
    assert "\x1b" not in r.stdout + r.stderr, repr(r.stdout + r.stderr)
    assert "\\x1b[2K\\r" in r.stdout, r.stdout


def test_an_itemoperations_body_the_gate_cannot_read_whole_never_reaches_exchange(pki, exchange, mdm, tmp_path):
    """Under a rule refusing attachments, an ItemOperations that fetches an attachment, sent so the
    gate cannot read it as it stands: chunked (no Content-Length), gzip-encoded, over 64 KiB, and
    with both Content-Length and chunked. Each is refused; none reaches Exchange (raw TLS socket)."""
    fetch = wbxml(E("ItemOperations:ItemOperations", E("ItemOperations:Fetch", E("ItemOperations:Store", "Mailbox"),
                                                         E("AirSyncBase:FileReference", "5%3a1%3a0"))))
    cfg = make_authz_config(pki, exchange, mdm, tmp_path, policy={"mode": "permit"},
                            commands={"rules": [{"name": "no-attachments", "deny": ["attachments"]}]})
    g = launch(write_config(tmp_path, cfg), workers=1)
    ctx = client_context(pki)
    head = (f"POST /Microsoft-Server-ActiveSync?Cmd=ItemOperations&User=alice&DeviceId={DEV}&DeviceType=iPhone "
            "HTTP/1.1\r\nHost: mail.example.test\r\nMS-ASProtocolVersion: 14.1\r\n"
            "Content-Type: application/vnd.ms-sync.wbxml\r\n")
    chunked = f"{len(fetch):x}\r\n".encode() + fetch + b"\r\n0\r\n\r\n"
    zipped = gzip.compress(fetch)
    big = fetch + b"\x00" * 70_000
    cases = {
        "chunked": (head + "Transfer-Encoding: chunked\r\n\r\n").encode() + chunked,
        "gzip": (head + f"Content-Encoding: gzip\r\nContent-Length: {len(zipped)}\r\n\r\n").encode() + zipped,
        "big": (head + f"Content-Length: {len(big)}\r\n\r\n").encode() + big,
        "both": (head + f"Content-Length: {len(chunked)}\r\nTransfer-Encoding: chunked\r\n\r\n").encode() + chunked,
    }
    try:
        for name, raw in cases.items():
            with ctx.wrap_socket(socket.create_connection(("127.0.0.1", g.port), timeout=10),
                                 server_hostname="mail.example.test") as s:
                s.sendall(raw)
                answer = b""
                try:
                    while b"\r\n\r\n" not in answer:
                        data = s.recv(65536)
                        if not data:
                            break
                        answer += data
                except OSError:
                    pass
            status = answer.split(b" ", 2)[1] if answer.startswith(b"HTTP/1.1 ") else b"(closed)"
            assert status in (b"400", b"403", b"(closed)"), (name, answer[:200])
        assert not [r for r in exchange.requests() if "ItemOperations" in r["path"]], exchange.requests()
        # the same route, rule and socket path let a mail fetch with a Content-Length through
        mail = wbxml(E("ItemOperations:ItemOperations", E("ItemOperations:Fetch", E("ItemOperations:Store", "Mailbox"),
                                                            E("AirSync:CollectionId", "5"), E("AirSync:ServerId", "5:1"))))
        ok = request(g.port, "POST", f"/Microsoft-Server-ActiveSync?Cmd=ItemOperations&User=alice&DeviceId={DEV}"
                     "&DeviceType=iPhone", pki, headers={"MS-ASProtocolVersion": "14.1"}, body=mail)
        assert ok.headers.get("X-Upstream") == "exchange", (ok.status, ok.body[:200])
    finally:
        g.stop()
