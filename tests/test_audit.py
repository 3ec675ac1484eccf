"""Issue 12, items 3, 6, 7 and the inventory stall, through real gateway processes:

- the audit line is never lost: client bytes that are not UTF-8, bidi controls and huge values
  get their line (escaped, marked); a sink that fails (a full disk, a pipe whose reader left) or
  hangs (a pipe nobody reads) denies ActiveSync requests (audit.on_error=deny) and is logged once
  per outage; SIGHUP reopens the file for logrotate, through the worker supervisor;
- one strict YAML reader: a duplicate key in any file is one line naming the key and both lines;
- policy reloads apply only complete files: a slow in-place writer never gets half a policy
  applied; `easgate policy install` replaces it safely;
- reloading a 1,000,000-device inventory stalls no route (the timing is measured in
  bench/bench_reload.py; here only that the multi-second stall is gone).
"""

from __future__ import annotations

import base64
import json
import os
import re
import shutil
import signal
import subprocess
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from easgate.authz.audit import encode, safe_text

from conftest import ROOT, authz_config, easgate_argv, https_connection, launch, request, wait_for, write_config
from doccommands import covers, doc_command

AS = "/Microsoft-Server-ActiveSync"
IPHONE = "ApplF17ABCDEF01"
BASIC_ALICE = {"Authorization": "Basic " + base64.b64encode(b"CONTOSO\\alice:secret").decode(),
               "User-Agent": "Apple-iPhone14C2/2008.420", "MS-ASProtocolVersion": "16.1"}


def sync_path(device: str) -> str:
    return f"{AS}?Cmd=Sync&User=alice&DeviceId={device}&DeviceType=iPhone"


def post(g, pki, device: str, **headers):
    return request(g.port, "POST", sync_path(device), pki, headers=dict(BASIC_ALICE, **headers))


def read_lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()] if path.exists() else []


def count(g, text: str) -> int:
    return sum(text in line for line in g.lines)


# ------------------------------------------------------------------------------------------------
# The line itself


def test_client_bytes_that_are_not_utf8_get_their_audit_line(start_gateway, pki, exchange, mdm, tmp_path):
    """A User-Agent with bytes 0xFF 0xFE used to make the line fail to encode: the request was
    decided, the line lost, an ERROR logged per request. Now every such value is escaped in the
    line (valid UTF-8 JSON), its field named in `escaped`, and a huge one clipped with a marker."""
    cfg = authz_config(pki, exchange, mdm, tmp_path, policy={"mode": "block", "allow": {"devices": [IPHONE]}})
    g = start_gateway(cfg)
    # http.client sends str header values as Latin-1: these are the raw bytes FF FE, and E2 80 AE
    # (U+202E RIGHT-TO-LEFT OVERRIDE in UTF-8, which would reorder what a reader of the log sees).
    assert post(g, pki, IPHONE, **{"User-Agent": "Evil \xff\xfe gnp.exe"}).status == 403  # not UTF-8: denied
    assert post(g, pki, IPHONE, **{"User-Agent": "Evil \xe2\x80\xae gnp.exe"}).status == 200
    assert post(g, pki, IPHONE, **{"User-Agent": "back\\slash " + "A" * 3000}).status == 200
    raw = (tmp_path / "audit.jsonl").read_bytes()
    raw.decode("utf-8")  # strictly valid UTF-8
    lines = [json.loads(line) for line in raw.splitlines()]
    assert [(l["decision"], l["source"]) for l in lines] == [("deny", "identity"), ("allow", "policy"),
                                                             ("allow", "policy")]
    assert lines[0]["agent"] == "Evil \\xff\\xfe gnp.exe" and lines[0]["escaped"] == ["agent"]
    assert lines[0]["reason"] == "non-UTF-8 bytes in User-Agent"
    assert lines[1]["agent"] == "Evil \\u202e gnp.exe" and lines[1]["escaped"] == ["agent"]
    clipped = lines[2]["agent"]
    assert clipped.startswith("back\\\\slash AAAA") and clipped.endswith(f"\\[clipped {11 + 3000 - 1024} chars]")
    assert lines[2]["escaped"] == ["agent"]
    assert "Traceback" not in g.output and not [l for l in g.lines if "error" in l.lower() and "audit" in l]


# ------------------------------------------------------------------------------------------------
# Sinks that fail or hang


@pytest.mark.parametrize("on_error", ["deny", "allow"])
def test_audit_log_on_a_full_disk(start_gateway, pki, exchange, mdm, tmp_path, on_error):
    """The audit log's device is full (a symlink to /dev/full: every write fails with ENOSPC).
    on_error=deny (the default): the allowed device is denied with source `audit`; allow: it goes
    through. Either way deny still denies and the outage is logged once, not per request."""
    (tmp_path / "audit.jsonl").symlink_to("/dev/full")
    cfg = authz_config(pki, exchange, mdm, tmp_path, policy={"mode": "block", "allow": {"devices": [IPHONE]}})
    if on_error == "allow":
        cfg["audit"] = {"on_error": "allow"}
    g = start_gateway(cfg, extra=["--set", "easgate_metrics=0"])
    statuses = [post(g, pki, d).status for d in [IPHONE, "ApplUNKNOWN1"] * 10]
    assert statuses == ([403, 403] if on_error == "deny" else [200, 403]) * 10
    wait_for(lambda: count(g, "cannot be written") >= 1, 5, "the audit error", g)
    errs = [l for l in g.lines if "audit log" in l and "cannot be written" in l]
    assert len(errs) == 1 and "No space left on device" in errs[0], errs
    url = re.search(r"easgate: metrics at (http://\S+/metrics)", g.output)[1]
    metrics = urllib.request.urlopen(url, timeout=10).read().decode()
    assert "easgate_audit_writable 0" in metrics and "easgate_audit_outages_total 1" in metrics
    if on_error == "deny":
        assert "denied until it is" in errs[0]
        # the first allow found the disk full when its line was written; the 9 after it before
        assert "easgate_audit_denied_total 10" in metrics
        assert 'easgate_decisions_total{verdict="deny",source="audit"} 10' in metrics
    else:
        assert "easgate_audit_denied_total 0" in metrics
    assert not [l for l in g.lines if "Traceback" in l]


def drainer(reader: int, got: bytearray) -> Callable[[], bool]:
    """What the FIFO's reader has for us, appended to ``got`` without blocking (True: for wait_for)."""
    def drain() -> bool:
        while True:
            try:
                chunk = os.read(reader, 65536)
            except BlockingIOError:
                return True
            if not chunk:
                return True
            got.extend(chunk)
    return drain


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs a FIFO")
def test_audit_pipe_nobody_reads_denies_then_recovers(start_gateway, pki, exchange, mdm, tmp_path):
    """The audit log is a pipe to a log shipper that stopped reading: writes block (the pipe's
    64 KiB are full). The first allowed request waits write_timeout_ms and is denied, the ones after
    it are denied at once (no client waits on a hung sink), the outage is logged once; when the
    shipper reads again the queued lines arrive and the device is allowed again."""
    fifo = tmp_path / "audit.jsonl"
    os.mkfifo(fifo)
    reader = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK)  # the shipper: connected, not reading
    filler = os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)
    try:
        while True:
            os.write(filler, b"#" * 4096)
    except BlockingIOError:
        pass
    os.close(filler)
    cfg = authz_config(pki, exchange, mdm, tmp_path, policy={"mode": "block", "allow": {"devices": [IPHONE]}})
    cfg["audit"] = {"write_timeout_ms": 300, "queue_lines": 50}
    g = start_gateway(cfg)
    t0 = time.monotonic()
    first = post(g, pki, IPHONE)
    assert first.status == 403
    statuses = [post(g, pki, d).status for d in [IPHONE, "ApplUNKNOWN1"] * 5]
    assert statuses == [403, 403] * 5
    assert time.monotonic() - t0 < 5
    assert count(g, "cannot be written") == 1, [l for l in g.lines if "audit" in l]
    got = bytearray()
    drain = drainer(reader, got)

    wait_for(lambda: drain() and count(g, "is written again") == 1, 10, "the recovery", g)
    assert post(g, pki, IPHONE).status == 200
    wait_for(lambda: drain() and got.count(b'"decision":"allow"') >= 2, 5, "the lines after the recovery", g)
    os.close(reader)
    lines = [json.loads(l.lstrip(b"#")) for l in bytes(got).splitlines()]  # after the test's own filler
    flows = {}
    for l in lines:
        flows.setdefault(l["flow"], []).append(l)
    # every request has its line; the first one (the write that hung) also got a second line saying
    # it was denied after all: the last line of a flow is what happened
    assert len(flows) == 12, lines
    outcome = [ls[-1]["decision"] for ls in flows.values()]
    assert outcome.count("allow") == 1 and outcome.count("deny") == 11
    assert {ls[-1]["source"] for ls in flows.values() if ls[-1]["device_id"] == IPHONE and ls[-1]["decision"] == "deny"} == {"audit"}
    assert "0 lines lost, 6 requests denied meanwhile" in next(l for l in g.lines if "is written again" in l)


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs a FIFO")
def test_audit_pipe_reader_going_away_and_coming_back(start_gateway, pki, exchange, mdm, tmp_path):
    """The shipper goes away (EPIPE) and comes back, twice: while it is gone the allowed device is
    denied (on_error=deny) and nothing else changes; each outage is logged once; after each
    recovery the lines of the outage arrive and the device is allowed again."""
    fifo = tmp_path / "audit.jsonl"
    os.mkfifo(fifo)
    reader = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK)
    got = bytearray()
    drain = drainer(reader, got)

    cfg = authz_config(pki, exchange, mdm, tmp_path, policy={"mode": "block", "allow": {"devices": [IPHONE]}})
    g = start_gateway(cfg)

    def burst(tag: str) -> list[int]:
        out = []
        for i in range(3):
            out.append(post(g, pki, IPHONE, **{"User-Agent": f"{tag}-{i}"}).status)
            out.append(post(g, pki, f"ApplNO{tag}{i}").status)
        return out

    assert burst("up1") == [200, 403] * 3
    drain()
    assert got.count(b"\n") == 6 and b'"agent":"up1-0"' in got
    for outage in (1, 2):
        os.close(reader)  # the shipper is gone
        # the first write finds it gone (EPIPE): that request and every allow after it are denied
        assert burst(f"down{outage}") == [403, 403] * 3
        assert count(g, "cannot be written") == outage
        reader = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK)  # the shipper is back
        wait_for(lambda: drain() and count(g, "is written again") == outage, 10, f"recovery {outage}", g)
        assert burst(f"up{outage + 1}") == [200, 403] * 3
        wait_for(lambda: drain() and f'"agent":"up{outage + 1}-2"'.encode() in got, 5, "the lines", g)
        assert f'"agent":"down{outage}-2"'.encode() in got  # the outage's lines were not lost
    os.close(reader)
    assert count(g, "cannot be written") == 2
    assert all(json.loads(l) for l in bytes(got).splitlines() if l.strip())


def test_sighup_reopens_the_audit_log_in_every_worker(pki, exchange, mdm, tmp_path):
    """logrotate: `mv audit.jsonl audit.jsonl.1`, then SIGHUP to easgate (a graceful reload: new
    workers open the log afresh, the old ones hand over). New lines go to a new audit.jsonl."""
    cfg = authz_config(pki, exchange, mdm, tmp_path, policy={"mode": "block", "allow": {"devices": [IPHONE]}})
    g = launch(write_config(tmp_path, cfg), workers=2, wait=False)
    try:
        g.serving(60)
        assert post(g, pki, IPHONE, **{"User-Agent": "before"}).status == 200
        log = tmp_path / "audit.jsonl"
        os.rename(log, tmp_path / "audit.jsonl.1")
        g.proc.send_signal(signal.SIGHUP)
        wait_for(lambda: count(g, "reload complete") == 1, 60, "the reload", g)
        for i in range(4):  # whichever worker takes it
            assert post(g, pki, IPHONE, **{"User-Agent": f"after-{i}"}).status == 200
        assert [l["agent"] for l in read_lines(tmp_path / "audit.jsonl.1")] == ["before"]
        assert [l["agent"] for l in read_lines(log)] == [f"after-{i}" for i in range(4)]
        assert g.proc.poll() is None
    finally:
        g.stop()


# ------------------------------------------------------------------------------------------------
# One strict YAML reader


GATEWAY_DUP = """\
tls:
  certificate: {cert}
pools:
  exchange: {{servers: ["{ex}"], ca: {ca}}}
  mdm: {{servers: ["{mdm}"]}}
routes:
  - {{name: activesync, priority: 100, match: {{path_prefix: /Microsoft-Server-ActiveSync}}, pool: exchange,
     authorize: activesync}}
authorization:
  policy: {policy}
routes:
  - {{name: activesync, priority: 100, match: {{path_prefix: /Microsoft-Server-ActiveSync}}, pool: exchange}}
"""


@pytest.mark.parametrize("command", ["check", "run"])
def test_a_second_routes_key_is_an_error_not_a_dropped_authorize(pki, exchange, mdm, tmp_path, command):
    """Item 6: a second `routes:` silently replaced the first, and with it the ActiveSync route's
    `authorize`. Now `easgate check` and `easgate run` refuse the file in one line naming the key
    and both lines, without a traceback."""
    (tmp_path / "policy.yaml").write_text("mode: block\n")
    cfg = tmp_path / "gateway.yaml"
    cfg.write_text(GATEWAY_DUP.format(cert=pki / "gateway-full.pem", ex=exchange.url, ca=pki / "internal-ca.pem",
                                      mdm=mdm.url, policy=tmp_path / "policy.yaml"))
    argv = easgate_argv(command, str(cfg)) + (["--listen", "127.0.0.1:0", "--workers", "1"] if command == "run" else [])
    p = subprocess.run(argv, capture_output=True, text=True, timeout=60)
    assert p.returncode == 2 and p.stdout == ""
    assert p.stderr.strip().splitlines() == [
        f"easgate: config error: {cfg}: line 11: duplicate key 'routes' (first at line 6) "
        "(write each key once: merge the two sections)"]


@pytest.mark.parametrize("which", ["policy", "inventory", "connector"])
def test_duplicate_keys_in_every_other_file(pki, exchange, mdm, tmp_path, which):
    """The policy, a YAML inventory and the connector's config go through the same reader."""
    if which == "connector":
        cfg = tmp_path / "connector.yaml"
        cfg.write_text(f"inventory: {tmp_path / 'inv.sqlite'}\nlisten: {{port: 0}}\ninventory: other.sqlite\n")
        p = subprocess.run(easgate_argv("connector", str(cfg)), capture_output=True, text=True, timeout=60)
        assert p.returncode != 0 and "Traceback" not in p.stderr
        assert f"{cfg}: line 3: duplicate key 'inventory' (first at line 1)" in p.stderr, p.stderr
        return
    if which == "policy":
        (tmp_path / "policy.yaml").write_text("mode: block\ndeny:\n  devices: [ApplSTOLEN1]\ndeny: {users: [bob]}\n")
        want = f"{tmp_path / 'policy.yaml'}: line 4: duplicate key 'deny' (first at line 2)"
    else:
        (tmp_path / "inv.yaml").write_text("- {device_id: A1, owner: alice, owner: bob}\n")
        (tmp_path / "policy.yaml").write_text("mode: block\ninventory_file: inv.yaml\n")
        want = f"{tmp_path / 'inv.yaml'}: line 1: duplicate key 'owner' (first at line 1)"
    cfg = authz_config(pki, exchange, mdm, tmp_path)
    cfg["authorization"]["policy"] = str(tmp_path / "policy.yaml")
    p = subprocess.run(easgate_argv("check", str(write_config(tmp_path, cfg))), capture_output=True, text=True,
                       timeout=60)
    assert p.returncode == 2 and "Traceback" not in p.stderr and len(p.stderr.strip().splitlines()) == 1
    assert want in p.stderr, p.stderr


# ------------------------------------------------------------------------------------------------
# Policy reloads apply only complete files


POLICY = ("mode: block\nallow:\n  device_types: [iPhone]\n"
          "deny:\n  devices: [ApplSTOLEN001]   # reported stolen\n")


def test_a_slow_in_place_writer_never_gets_half_a_policy_applied(start_gateway, pki, exchange, mdm, tmp_path):
    """Item 7: truncate, write the first half (valid YAML without the deny list), pause for many
    checks, write the rest. The stolen device is denied throughout; the change is reported once;
    `easgate policy install` (check, then rename over) applies a new version."""
    cfg = authz_config(pki, exchange, mdm, tmp_path, policy=None, cache={"allow_ttl_s": 0, "deny_ttl_s": 0})
    policy = tmp_path / "policy.yaml"
    policy.write_text(POLICY)
    cfg["authorization"]["policy"] = str(policy)
    g = start_gateway(cfg, extra=["--set", "easgate_policy_poll_ms=50", "--set", "termlog_verbosity=debug"])
    conn = https_connection(g.port, pki)

    def stolen() -> int:
        return request(g.port, "POST", sync_path("ApplSTOLEN001"), pki, headers=BASIC_ALICE, conn=conn).status

    def checks() -> int:
        return count(g, "policy check")

    wait_for(lambda: checks() >= 2, 10, "the first checks", g)
    statuses = []
    with open(policy, "w") as f:  # an editor saving in place, `cat > policy.yaml`, scp
        f.write(POLICY[:POLICY.index("deny:")])
        f.flush()
        wait_for(lambda: count(g, "changed in place") == 1, 10, "the in-place change to be noticed", g)
        paused_at = checks()
        while checks() < paused_at + 5:  # the writer pauses for several checks
            statuses.append(stolen())
        f.write(POLICY[POLICY.index("deny:"):])
    done_at = checks()
    while checks() < done_at + 5:
        statuses.append(stolen())
    assert len(statuses) >= 5 and set(statuses) == {403}, f"the stolen device got {statuses.count(200)} x 200"
    assert count(g, "changed in place") == 1 and count(g, "policy reloaded") == 0
    # the safe way: a checked copy renamed over the file
    (tmp_path / "new.yaml").write_text(POLICY.replace("ApplSTOLEN001", "ApplSTOLEN002"))
    p = subprocess.run(easgate_argv("policy", "install", str(tmp_path / "new.yaml"), str(policy)),
                       capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, p.stderr
    wait_for(lambda: count(g, "policy reloaded") == 1, 10, "the installed policy", g)
    assert stolen() == 200 and request(g.port, "POST", sync_path("ApplSTOLEN002"), pki, headers=BASIC_ALICE,
                                       conn=conn).status == 403


def test_policy_install_refuses_a_broken_file_and_leaves_the_old_one(tmp_path):
    policy = tmp_path / "policy.yaml"
    policy.write_text(POLICY)
    before = policy.stat().st_ino
    (tmp_path / "new.yaml").write_text("mode: block\ndeny: {devices: [A]}\ndeny: {devices: [B]}\n")
    p = subprocess.run(easgate_argv("policy", "install", str(tmp_path / "new.yaml"), str(policy)),
                       capture_output=True, text=True, timeout=60)
    assert p.returncode == 2 and p.stdout == ""
    assert p.stderr.strip() == (f"easgate: {tmp_path / 'new.yaml'}: line 3: duplicate key 'deny' (first at line 2); "
                                f"write each key once: merge the two sections; {policy} left as it was")
    assert policy.read_text() == POLICY and policy.stat().st_ino == before
    assert sorted(x.name for x in tmp_path.iterdir()) == ["new.yaml", "policy.yaml"]  # no temporary left


# ------------------------------------------------------------------------------------------------
# The big-inventory reload


BIG = 1_000_000


@pytest.fixture(scope="session")
def big_inventory(tmp_path_factory) -> Path:
    """A 1,000,000-device MDM export, written once per session."""
    path = tmp_path_factory.mktemp("big") / "inventory.csv"
    with open(path, "w") as f:
        f.write("device_id,owner,compliant\n")
        f.writelines(f"ApplINV{i:09d},user{i % 5000},true\n" for i in range(BIG))
    return path


def test_reloading_a_large_inventory_does_not_stall_other_requests(start_gateway, pki, exchange, mdm, tmp_path,
                                                                    big_inventory):
    """The MDM's export of 1,000,000 devices replaces a small inventory while clients keep asking
    on both routes. Parsing it used to hold the event loop (through the GIL) for seconds; it now
    runs in another process that hands over an SQLite file. The numbers are in
    bench/bench_reload.py; here a generous bound that the old multi-second stall cannot meet."""
    inv = tmp_path / "inventory.csv"
    inv.write_text("device_id,owner,compliant\nApplF17ABCDEF01,alice,true\n")
    cfg = authz_config(pki, exchange, mdm, tmp_path, policy={"mode": "block", "inventory_file": str(inv)},
                       cache={"allow_ttl_s": 0, "deny_ttl_s": 0})
    g = start_gateway(cfg, extra=["--set", "easgate_policy_poll_ms=100"])
    mdm_conn, as_conn = https_connection(g.port, pki), https_connection(g.port, pki)
    big_user = {**BASIC_ALICE, "Authorization": "Basic " + base64.b64encode(b"CONTOSO\\user7:secret").decode()}
    big_device = f"{AS}?Cmd=Sync&User=user7&DeviceId=ApplINV000000007&DeviceType=iPhone"
    assert request(g.port, "POST", big_device, pki, headers=big_user, conn=as_conn).status == 403
    shutil.copy(big_inventory, tmp_path / "inventory.csv.new")
    with open(tmp_path / "inventory.csv.new", "a") as f:
        f.write("ApplF17ABCDEF01,alice,true\n")
    os.replace(tmp_path / "inventory.csv.new", inv)  # the export is renamed in, as it should be
    worst = {"mdm": 0.0, "activesync": 0.0}
    n = 0
    deadline = time.monotonic() + 120
    while "policy reloaded" not in g.output:
        assert time.monotonic() < deadline, g.output[-2000:]
        for route, conn, path, hdrs in (("mdm", mdm_conn, "/enroll", {}),
                                        ("activesync", as_conn, sync_path(IPHONE), BASIC_ALICE)):
            t0 = time.monotonic()
            assert request(g.port, "POST" if route == "activesync" else "GET", path, pki, headers=hdrs,
                           conn=conn).status == 200
            worst[route] = max(worst[route], time.monotonic() - t0)
        n += 1
    assert n >= 5, "too few requests during the reload to mean anything"
    assert max(worst.values()) < 1.0, f"a request waited {worst} while 1,000,000 devices were reloaded"
    assert request(g.port, "POST", big_device, pki, headers=big_user, conn=as_conn).status == 200


DOC_COMMANDS = (
    ".venv/bin/easgate policy check new-policy.yaml",
    ".venv/bin/easgate policy install new-policy.yaml policies/activesync-policy.yaml",
    ".venv/bin/easgate policy install --inventory export.csv policies/mdm-export.csv",
)


@covers("docs/operations.md", *DOC_COMMANDS)
def test_the_documented_policy_commands_run_as_written(tmp_path):
    """docs/operations.md, "Changing the policy": each command, as written, in a copy of the repo's
    policies/ with the new versions the text talks about."""
    shutil.copytree(ROOT / "policies", tmp_path / "policies")
    current = tmp_path / "policies" / "activesync-policy.yaml"
    (tmp_path / "new-policy.yaml").write_text(current.read_text().replace("mode: block", "mode: permit"))
    (tmp_path / "export.csv").write_text("device_id,owner,compliant\nApplNEW0000001,alice,true\n")
    ino = current.stat().st_ino
    for cmd in (doc_command("docs/operations.md", c) for c in DOC_COMMANDS):
        argv = cmd.split()
        p = subprocess.run(easgate_argv(*argv[1:]), cwd=tmp_path, capture_output=True, text=True,
                           timeout=60)
        assert p.returncode == 0, (cmd, p.stderr)
    assert current.stat().st_ino != ino and "mode: permit" in current.read_text()
    assert (tmp_path / "policies" / "mdm-export.csv").read_text() == (tmp_path / "export.csv").read_text()


# ------------------------------------------------------------------------------------------------
# The encoder, for any value (property-based)

_ANY_TEXT = st.text(st.characters(codec=None, categories=None), max_size=200) | st.binary(max_size=200).map(
    lambda b: b.decode("utf-8", "surrogateescape"))


def _unescape(text: str) -> str:
    out, i = [], 0
    while i < len(text):
        c = text[i]
        if c != "\\":
            out.append(c)
            i += 1
        elif text[i + 1] == "\\":
            out.append("\\")
            i += 2
        elif text[i + 1] == "x":
            n = int(text[i + 2:i + 4], 16)
            out.append(chr(0xDC00 + n) if n >= 0x80 else chr(n))
            i += 4
        elif text[i + 1] == "u":
            out.append(chr(int(text[i + 2:i + 6], 16)))
            i += 6
        else:
            raise AssertionError(f"unexpected escape in {text!r}")
    return "".join(out)


@settings(max_examples=300, deadline=None)
@given(_ANY_TEXT)
def test_any_value_gives_one_valid_line_that_says_what_was_sent(value):
    line = encode({"agent": value, "decision": "allow"}, limit=64)
    raw = line.encode("utf-8")  # strictly valid UTF-8: no lone surrogate survives
    assert b"\n" not in raw and b"\r" not in raw
    rec = json.loads(raw)
    text, changed = safe_text(value, 64)
    assert rec["agent"] == text and rec["decision"] == "allow"
    if not changed:
        assert rec["agent"] == value and "escaped" not in rec  # a clean value is the value
    else:
        assert rec["escaped"] == ["agent"]
        assert not any(0xD800 <= ord(c) <= 0xDFFF or ord(c) < 0x20 or 0x7F <= ord(c) <= 0x9F
                       or c in "\u2028\u2029\u202e" for c in rec["agent"])
        if len(value) <= 64:  # not clipped: the escapes give back exactly what was sent
            assert _unescape(rec["agent"]) == value
