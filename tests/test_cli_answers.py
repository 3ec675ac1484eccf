"""What a user sees when a command line or a config is wrong, and what `easgate check` tells them.

Every case runs the real `easgate` command and reads what it printed: one line naming the real
problem, a non-zero exit, no traceback.
"""

from __future__ import annotations

import base64
import json
import socket
import ssl
import subprocess
import time
from pathlib import Path

import pytest

from conftest import (
    HOSTNAME,
    ROOT,
    GatewayProcess,
    authz_config,
    base_config,
    client_context,
    easgate_argv,
    request,
    write_config,
)
from support.procs import program_argv


def run(argv: list[str], cwd=ROOT, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run(argv, cwd=cwd, capture_output=True, text=True, timeout=timeout,
                          stdin=subprocess.DEVNULL)


def error_lines(p: subprocess.CompletedProcess) -> list[str]:
    """The lines a user reads as the error: stderr without the gateway's own start-up log lines."""
    return [l for l in p.stderr.splitlines() if l.strip() and not l.startswith("[")]


BAD_SETS = [
    ("easgate_metrics=notaport", "easgate_metrics: 'notaport' is not HOST:PORT"),
    ("easgate_metrics=127.0.0.l:9090", "'127.0.0.l' in '127.0.0.l:9090' is not an IP address"),
    ("easgate_listen=foo", "easgate_listen: 'foo' is not HOST:PORT"),
    ("easgate_listen=127.0.0.l:0", "'127.0.0.l' in '127.0.0.l:0' is not an IP address"),
    ("easgate_max_flows=-1", "easgate_max_flows must be 0 (no limit) or more"),
    ("easgate_max_flows=many", "easgate_max_flows: not an integer: many"),
    ("easgate_confg=x", "unknown option --set easgate_confg (did you mean easgate_config?)"),
]


# every case with one worker; with a supervisor and two workers, one case per kind of check (the
# supervisor's pre-flight runs the same option handling once)
CASES = [("1", s, e) for s, e in BAD_SETS] + [("2", s, e) for s, e in BAD_SETS
                                               if s.split("=")[0] in ("easgate_metrics", "easgate_confg")
                                               or s == "easgate_listen=foo"]


@pytest.mark.parametrize("workers,setting,expected", CASES, ids=[f"w{w}-{s}" for w, s, _ in CASES])
def test_a_bad_set_option_names_the_real_problem_in_one_line(pki, exchange, mdm, tmp_path, workers, setting,
                                                             expected):
    cfg = write_config(tmp_path, base_config(pki, exchange, mdm))
    p = run(easgate_argv("run", str(cfg), "--workers", workers, "--", "--set", setting))
    assert p.returncode != 0, p.stdout + p.stderr
    lines = error_lines(p)
    assert len(lines) == 1, p.stderr  # one line, also with several workers (not one per worker)
    assert expected in lines[0], p.stderr
    assert "easgate_config is not set" not in p.stderr and "Traceback" not in p.stderr
    assert "Received multiple values" not in p.stderr
    assert "worker" not in p.stderr  # refused before any worker started


def test_a_misspelled_option_stops_the_mitmdump_script_too(pki, exchange, mdm, tmp_path):
    cfg = write_config(tmp_path, base_config(pki, exchange, mdm))
    p = run([*program_argv("mitmdump"), "-s", str(ROOT / "addons/gateway.py"), "--set", f"easgate_config={cfg}",
             "--set", "server=false", "--set", "easgate_listen=127.0.0.1:0", "--set", "easgate_metircs=9090"])
    assert "unknown option --set easgate_metircs (did you mean easgate_metrics?)" in p.stdout + p.stderr


def test_listen_given_twice_is_one_clear_line(pki, exchange, mdm, tmp_path):
    cfg = write_config(tmp_path, base_config(pki, exchange, mdm))
    p = run(easgate_argv("run", str(cfg), "--listen", "127.0.0.1:0", "--", "--set", "easgate_listen=127.0.0.1:0"))
    assert p.returncode == 2
    assert error_lines(p) == ["easgate: the listen address is given more than once (--listen, --set "
                              "easgate_listen): give it once"]


def test_set_easgate_listen_works_like_listen_with_several_workers(pki, exchange, mdm, tmp_path):
    """The supervisor passes --listen to its workers: a user's --set easgate_listen is folded into it."""
    cfg = write_config(tmp_path, base_config(pki, exchange, mdm))
    g = GatewayProcess(easgate_argv("run", str(cfg), "--workers", "2", "--", "--set", "easgate_listen=127.0.0.1:0"))
    try:
        g.wait_ready(30)
        assert request(g.port, "GET", "/enroll", pki).status == 200
    finally:
        g.stop()


def test_check_refuses_a_listen_host_that_is_not_an_address(pki, exchange, mdm, tmp_path):
    c = base_config(pki, exchange, mdm)
    c["listen"]["host"] = "127.0.0.l"
    p = run(easgate_argv("check", str(write_config(tmp_path, c))))
    assert p.returncode == 2
    assert error_lines(p) == [f"easgate: config error: {tmp_path / 'gateway.yaml'}: listen.host: '127.0.0.l' is not an "
                              "IP address (use an address of this machine, e.g. 127.0.0.1, 0.0.0.0 (all IPv4) or :: "
                              "(all IPv6))"]


def test_check_shows_the_authorization_section_and_writes_nothing(pki, exchange, mdm, tmp_path, connector):
    c = authz_config(pki, exchange, mdm, tmp_path, policy={"mode": "block"}, connector=connector,
                     on_connector_error="stale")
    c["audit_log"] = str(tmp_path / "logs" / "audit.jsonl")
    cfg = write_config(tmp_path, c)
    before = sorted(p.name for p in tmp_path.rglob("*"))
    p = run(easgate_argv("check", str(cfg)))
    assert p.returncode == 0, p.stderr
    out = p.stdout
    assert "authorization (routes: activesync)" in out
    assert f"policy              {tmp_path / 'policy.yaml'}" in out
    assert f"connector           {connector.url}  (timeout 500 ms" in out
    assert "on connector error  stale (the last decision if at most 3600 s old, else deny)" in out
    assert "cache               allow 300 s, deny 30 s, at most 100000 entries" in out
    assert "denied              HTTP 403" in out
    assert f"audit log           {tmp_path / 'logs' / 'audit.jsonl'}" in out
    assert sorted(p.name for p in tmp_path.rglob("*")) == before  # no audit log, no logs/ directory
    assert connector.calls == []  # checking calls nobody


def test_check_says_when_the_audit_log_cannot_be_written(pki, exchange, mdm, tmp_path):
    c = authz_config(pki, exchange, mdm, tmp_path, policy={"mode": "block"})
    (tmp_path / "afile").write_text("")
    c["audit_log"] = str(tmp_path / "afile" / "audit.jsonl")  # a file where a directory should be
    p = run(easgate_argv("check", str(write_config(tmp_path, c))))
    assert p.returncode == 2
    assert "audit_log: cannot write" in p.stderr and len(error_lines(p)) == 1


def test_check_without_authorization_says_so(pki, exchange, mdm, tmp_path):
    p = run(easgate_argv("check", str(write_config(tmp_path, base_config(pki, exchange, mdm)))))
    assert p.returncode == 0, p.stderr
    assert "authorization: none (no route says authorize: activesync)" in p.stdout


# ------------------------------------------------------------------------------------------------
# What clients see of the gateway's own errors, and what the log says instead


def test_error_pages_show_neither_mitmproxy_nor_internal_addresses(pki, exchange, mdm, tmp_path, start_gateway):
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    closed = s.getsockname()[1]  # bound, never listening: connections are refused
    c = base_config(pki, exchange, mdm)
    c["pools"]["mdm"]["servers"] = [f"http://127.0.0.1:{closed}"]
    g = start_gateway(c)
    try:
        r = request(g.port, "GET", "/enroll", pki)
    finally:
        s.close()
    assert r.status == 502
    assert "Server" not in r.headers, r.headers
    assert r.body == b"502 Bad Gateway\n"
    assert str(closed).encode() not in r.body and b"127.0.0.1" not in r.body and b"mitmproxy" not in r.body
    deadline = time.monotonic() + 10
    while f"Connect call failed ('127.0.0.1', {closed})" not in g.output and time.monotonic() < deadline:
        time.sleep(0.05)
    assert f"Connect call failed ('127.0.0.1', {closed})" in g.output  # the detail is in the log


def test_a_malformed_request_still_says_what_is_wrong_with_it(pki, exchange, mdm, start_gateway):
    g = start_gateway(base_config(pki, exchange, mdm))
    ctx = client_context(pki)
    with ctx.wrap_socket(socket.create_connection(("127.0.0.1", g.port)), server_hostname=HOSTNAME) as tls:
        tls.sendall(b"GET /enroll HTTP/1.1\r\nHost: mail.example.test\r\nContent-Length: x\r\n\r\n")
        head = tls.recv(4096)
    assert head.startswith(b"HTTP/1.1 400 "), head
    assert b"mitmproxy" not in head.lower() and b"\r\nServer:" not in head


@pytest.mark.parametrize("cert,expected", [
    ("device-expired", "client certificate CN=ApplEXPIRED00001,O=easgate demo, rejected: certificate has expired"),
    ("device-rogue", "client certificate chain: the certificate 1 above the client's, CN=Rogue Device CA,O=not "
                     "easgate, rejected: self-signed certificate in certificate chain"),
])
def test_a_rejected_client_certificate_is_logged_with_its_subject_and_reason(pki, exchange, mdm, start_gateway, cert,
                                                                             expected):
    g = start_gateway(base_config(pki, exchange, mdm))  # client_certs optional, on_invalid reject
    with pytest.raises((ssl.SSLError, ConnectionError, OSError)):
        request(g.port, "GET", "/enroll", pki, cert=cert)
    deadline = time.monotonic() + 10
    while expected not in g.output and time.monotonic() < deadline:
        time.sleep(0.05)
    assert expected in g.output
    assert "may not trust the proxy's certificate" not in g.output


# ------------------------------------------------------------------------------------------------
# Offline replay: writes nothing and calls nobody unless asked

ALICE = {"Authorization": "Basic " + base64.b64encode(b"CONTOSO\\alice:secret").decode(),
         "User-Agent": "Apple-iPhone14C2/2104.60"}


def _eas(device: str) -> str:
    return f"/Microsoft-Server-ActiveSync?Cmd=Sync&User=alice&DeviceId={device}&DeviceType=iPhone"


def test_offline_replay_touches_neither_the_audit_log_nor_the_connector(pki, exchange, mdm, tmp_path, connector,
                                                                         start_gateway):
    connector.allowed = {"ApplGOOD0001"}
    cfg_dict = authz_config(pki, exchange, mdm, tmp_path, connector=connector)
    cfg = write_config(tmp_path, cfg_dict)
    audit = Path(cfg_dict["audit_log"])
    cap = tmp_path / "own.mitm"
    g = start_gateway(cfg, extra=["-w", str(cap)])
    assert request(g.port, "POST", _eas("ApplGOOD0001"), pki, headers=ALICE, body=b"").status == 200
    assert request(g.port, "POST", _eas("ApplBAD00002"), pki, headers=ALICE, body=b"").status == 403
    with socket.create_connection(("127.0.0.1", g.port)) as plain:  # refused: plain HTTP
        plain.sendall(b"GET /enroll HTTP/1.1\r\nHost: mail.example.test\r\n\r\n")
        plain.recv(100)
    assert request(g.port, "GET", "/enroll", pki).status == 200
    g.stop()
    recorded_audit = audit.read_bytes()
    assert recorded_audit.count(b"\n") == 2
    calls = len(connector.calls)

    # the same config, its own capture: every flow as recorded (the refused plain-HTTP one too)
    p = run(easgate_argv("replay", str(cap), "--config", str(cfg)))
    assert p.returncode == 0, p.stdout + p.stderr
    assert "4 flows: 4 as recorded, 0 differ" in p.stdout
    assert "allow (connector)" in p.stdout and "deny (connector)" in p.stdout and "refused" in p.stdout
    assert audit.read_bytes() == recorded_audit  # the production audit log is untouched
    assert len(connector.calls) == calls  # and the connector was not asked

    # asked for: an audit log of the replay's own, and real connector calls
    mine = tmp_path / "replayed.jsonl"
    p = run(easgate_argv("replay", str(cap), "--config", str(cfg), "--audit-log", str(mine), "--connector"))
    assert p.returncode == 0, p.stdout + p.stderr
    assert [json.loads(l)["decision"] for l in mine.read_text().splitlines()] == ["allow", "deny"]
    assert len(connector.calls) == calls + 2
    assert audit.read_bytes() == recorded_audit


def test_offline_replay_without_a_recorded_connector_answer_says_so(pki, exchange, mdm, tmp_path, connector):
    """A capture made with a policy-file config, replayed with a connector config: nothing to reuse."""
    cfg = write_config(tmp_path, authz_config(pki, exchange, mdm, tmp_path, connector=connector))
    p = run(easgate_argv("replay", str(ROOT / "tests/captures/ipad-unmanaged.mitm"), "--config", str(cfg), "--json"))
    rows = [json.loads(l)["replayed"] for l in p.stdout.splitlines()]
    assert any("the connector is not called in an offline replay" in r["reason"] for r in rows), p.stdout
    assert connector.calls == []


def test_startup_warns_once_when_the_connector_is_unreachable(pki, exchange, mdm, tmp_path, connector, start_gateway):
    up = start_gateway(authz_config(pki, exchange, mdm, tmp_path, connector=connector))
    s = socket.socket()
    s.bind(("127.0.0.1", 0))  # bound, not listening: refused
    down_url = f"http://127.0.0.1:{s.getsockname()[1]}/services/ActiveSync/Authorize"
    try:
        c = authz_config(pki, exchange, mdm, tmp_path, connector=connector)
        c["authorization"]["connector"]["url"] = down_url
        down = start_gateway(write_config(tmp_path, c, "down.yaml"))
        deadline = time.monotonic() + 10
        while "is unreachable" not in down.output and time.monotonic() < deadline:
            time.sleep(0.05)
    finally:
        s.close()
    warnings = [l for l in down.output.splitlines() if "is unreachable" in l]
    assert len(warnings) == 1, down.output
    assert f"the connector {down_url} is unreachable (" in warnings[0]
    assert "its decisions fall to on_connector_error=deny" in warnings[0]
    assert "unreachable" not in up.output  # the reachable one starts quietly


# ------------------------------------------------------------------------------------------------
# --help says something for every command and argument


def _parsers():
    import argparse

    from easgate.cli import build_parser

    todo = [("easgate", build_parser())]
    while todo:
        name, p = todo.pop()
        yield name, p
        for a in p._actions:
            if isinstance(a, argparse._SubParsersAction):
                helps = {c.dest: c.help for c in a._choices_actions}
                for sub, sp in a.choices.items():
                    assert helps.get(sub), f"{name} {sub}: no one-line help in the command list"
                    todo.append((f"{name} {sub}", sp))


def test_every_command_and_argument_has_help():
    import argparse

    missing = []
    for name, p in _parsers():
        if not (p.description or name == "easgate"):
            missing.append(f"{name}: no description")
        for a in p._actions:
            if isinstance(a, (argparse._HelpAction, argparse._SubParsersAction)) or a.help == argparse.SUPPRESS:
                continue
            if not a.help:
                missing.append(f"{name} {'/'.join(a.option_strings) or a.dest}: no help")
    assert not missing, "\n".join(missing)


@pytest.mark.parametrize("command", ["check", "pki"])
def test_check_and_pki_help_explain_themselves(command):
    p = run(easgate_argv(command, "--help"))
    assert p.returncode == 0
    text = " ".join(p.stdout.split())
    assert {"check": "Writes nothing", "pki": "Not for production"}[command] in text
    assert "gateway YAML" in text or "directory to create it in" in text


def test_standins_refuse_a_pool_on_another_machine(pki, exchange, mdm, tmp_path):
    c = base_config(pki, exchange, mdm)
    c["pools"]["mdm"]["servers"] = ["http://10.0.0.5:80"]
    p = run(easgate_argv("standins", str(write_config(tmp_path, c))))
    assert p.returncode == 2
    assert error_lines(p) == ["easgate standins: pool mdm: http://10.0.0.5:80 is not on this machine; stand-ins "
                              "listen on loopback addresses only (point the pool at 127.0.0.1 to try the config)"]
