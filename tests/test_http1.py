"""One strict reading of HTTP/1 (issue 12, items 1 and 9) and the differential test that proves it.

One real gateway process; its Exchange pool (TLS) and MDM pool are recording upstreams whose bytes
three independent readers (tests/support/models.py: strict RFC 9112, unfolding, splitting) read
afterwards. The policy allows two (user, device) pairs and nothing else. Hostile requests go in over
raw TLS sockets.
"""

from __future__ import annotations

import base64
import json
import re
import socket
import ssl
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import yaml
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding

from easgate.core.errors import ConfigError
from easgate.gateway import http1
from easgate.gateway.config import Limits, parse_config

from conftest import HOSTNAME, base_config, client_context, launch, write_config
from support.client import send_raw, statuses
from support.corpus import ALLOWED, DENIED, Case, generated_cases, hostile_cases, pipelined_cases, request
from support.models import MODELS
from support.upstream import RecordingUpstream

LIMITS = {"max_header_bytes": 4096, "max_headers": 30, "max_target_length": 1024}
STATUS = {"big-head": 431, "many-headers": 431, "long-target": 414}


@pytest.fixture(scope="module")
def gw(pki, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("http1")
    ex = RecordingUpstream("exchange", tls=(pki / "exchange.pem", pki / "exchange.key"))
    md = RecordingUpstream("mdm")
    cfg = base_config(pki, ex, md)
    cfg["routes"][0]["authorize"] = "activesync"
    (tmp / "policy.yaml").write_text(yaml.safe_dump({"mode": "block", "inventory": [
        {"device_id": dev, "owner": user.split("\\")[-1].split("@")[0], "compliant": True} for user, dev, _ in ALLOWED]}))
    cfg["authorization"] = {"policy": str(tmp / "policy.yaml")}
    cfg["audit_log"] = str(tmp / "audit.jsonl")
    cfg["limits"] = LIMITS
    g = launch(write_config(tmp, cfg), extra=["--set", "easgate_metrics=127.0.0.1:0"])
    yield g, ex, md, tmp / "audit.jsonl", client_context(pki)
    g.stop()
    ex.stop()
    md.stop()


def audit(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def tag_of(agent: str | None) -> str | None:
    if not agent or "case=" not in agent:
        return None
    return agent.split("case=", 1)[1].split()[0]


def upstream_reads(up: RecordingUpstream, tags: set[str]) -> dict[str, list]:
    """model -> every request it read on `up` that carries one of `tags`."""
    return {m: [r for conn, _ in per for r in conn if r.tag in tags] for m, per in up.reads().items()}


def violations(ex: RecordingUpstream, md: RecordingUpstream, audit_path: Path, tags: set[str],
               certs: dict[str, str] | None = None) -> list[str]:
    """The differential invariants, for the requests whose case id is in `tags`; `certs` maps the
    case ids sent with a client certificate to the NSClientCert value the gateway inserts for it."""
    certs = certs or {}
    lines = [l for l in audit(audit_path) if tag_of(l.get("agent")) in tags]
    allows: dict[str, list[dict]] = {}
    for l in lines:
        if l["decision"] == "allow":
            allows.setdefault(tag_of(l["agent"]), []).append(l)
    problems = []
    for model, per_conn in ex.reads().items():
        for reads, _why in per_conn:
            for r in reads:
                if r.tag not in tags and r.tag is not None:
                    continue
                mine = allows.get(r.tag or "", [])
                ok = [l for l in mine if l["method"] == r.method and (
                    r.method == "OPTIONS" or (l["user"] == r.user and l["device_id"] == r.device_id
                                              and (l["command"] or "").lower() == (r.cmd or "").lower()))]
                if not ok:
                    problems.append(f"exchange/{model} read {r.method} {r.target[:90]!r} user={r.user!r} "
                                    f"device={r.device_id!r} cmd={r.cmd!r} (case {r.tag}) without an allow for it; "
                                    f"allows for that case: {[(l['method'], l['user'], l['device_id']) for l in mine]}")
    for up in (ex, md):
        per_model = up.reads()
        for model, per_conn in per_model.items():
            for reads, _ in per_conn:
                for r in reads:
                    if r.tag not in tags and r.tag is not None:
                        continue
                    inserted = [certs[r.tag]] if r.tag in certs and up is md else []
                    if r.cert_headers and r.cert_headers != inserted:
                        problems.append(f"{up.name}/{model} saw NSClientCert {[c[:40] for c in r.cert_headers]} "
                                        f"(case {r.tag}); the gateway inserted {[c[:40] for c in inserted]}")
        # every model frames every connection the same way: no request hides inside another
        for i, strict in enumerate(per_model["strict"]):
            for model in MODELS[1:]:
                other = per_model[model][i]
                a = [(r.method, r.target, r.body_len) for r in strict[0]]
                b = [(r.method, r.target, r.body_len) for r in other[0]]
                if a != b and any(r.tag in tags or r.tag is None for r in strict[0] + other[0]):
                    problems.append(f"{up.name}: strict reads {a[:4]} ({strict[1]}), {model} reads {b[:4]} ({other[1]})")
    return problems


def run(gw, pki, cases: list[Case], threads: int = 12) -> dict[str, dict]:
    g, *_ , ctx = gw
    ctxs = {None: ctx} | {c.cert: client_context(pki, c.cert) for c in cases if c.cert}
    with ThreadPoolExecutor(threads) as pool:
        return dict(zip((c.id for c in cases), pool.map(lambda c: send_raw(g.port, ctxs[c.cert], c.data), cases)))


def der_b64(pki: Path, name: str) -> str:
    cert = x509.load_pem_x509_certificates((pki / f"{name}.pem").read_bytes())[0]
    return base64.b64encode(cert.public_bytes(Encoding.DER)).decode()


# ------------------------------------------------------------------------------------------------
# Focused: each finding of the issue (1 and 9) on the wire


@pytest.mark.parametrize("case", hostile_cases(), ids=lambda c: c.id)
def test_strict_reading_refuses(gw, case):
    g, ex, md, audit_path, ctx = gw
    res = send_raw(g.port, ctx, case.data)
    want = STATUS.get(case.id, 400)
    assert res["statuses"] == [want], f"{case.kind}: got {res['statuses']} {res['data'][:200]!r}"
    assert res["closed"], f"{case.kind}: connection left open"
    tags = set(case.tags)
    for up in (ex, md):
        seen = upstream_reads(up, tags)
        assert not any(seen.values()), f"{case.kind}: {up.name} read {seen}"
        # nothing of it at all, not even as part of another request's bytes
        with up.lock:
            assert not any(f"case={case.id}\r\n".encode() in bytes(s) for s in up.streams), f"{case.kind}: forwarded"
    assert not [l for l in audit(audit_path) if tag_of(l.get("agent")) in tags]


def test_empty_lines_before_a_request_line_are_skipped(gw):
    """RFC 9112 2.2; mitmproxy alone would wait for more bytes with the request already buffered."""
    g, ex, md, audit_path, ctx = gw
    res = send_raw(g.port, ctx, b"\r\n\r\n" + request("crlf", "GET", "/enroll/x"))
    assert res["statuses"] == [200] and res["seconds"] < 3
    assert [r.tag for r in upstream_reads(md, {"crlf"})["strict"]] == ["crlf"]


def test_nothing_pipelined_after_a_refused_request_is_read(gw):
    g, ex, md, audit_path, ctx = gw
    case = pipelined_cases()[0]
    res = send_raw(g.port, ctx, case.data)
    assert res["statuses"] == [400] and res["closed"]
    for up in (ex, md):
        with up.lock:
            assert not any(b"case=pipe-" in bytes(s) for s in up.streams)
    assert not [l for l in audit(audit_path) if tag_of(l.get("agent")) in set(case.tags)]


def test_refusals_are_counted_in_the_metrics(gw):
    g, ex, md, audit_path, ctx = gw
    for case in hostile_cases("m-")[:3]:
        assert send_raw(g.port, ctx, case.data)["statuses"] == [400]
    deadline = time.monotonic() + 10
    while not (urls := [m[1] for line in g.lines if (m := re.search(r"metrics at (http://\S+/metrics)", line))]):
        assert time.monotonic() < deadline, g.output
        time.sleep(0.05)
    total = 0
    for url in set(urls):  # one listener per worker: the counters are per worker
        body = urllib.request.urlopen(url, timeout=5).read().decode()
        m = re.search(r'^easgate_bad_requests_total\{code="400"\} (\d+)$', body, re.M)
        total += int(m[1]) if m else 0
    assert total >= 3, body[:2000]


def test_pipelined_requests_are_each_decided(gw):
    g, ex, md, audit_path, ctx = gw
    case = pipelined_cases()[1]
    res = send_raw(g.port, ctx, case.data)
    assert res["statuses"] == [200, 403, 200]
    assert not violations(ex, md, audit_path, set(case.tags))
    seen = upstream_reads(ex, set(case.tags))["split"]
    assert sorted(r.tag for r in seen) == ["pipe-ok1", "pipe-ok2"]


def _expect_head(cid: str, ident) -> bytes:
    head = request(cid, "POST", ident=ident, close=True, cl=False, headers=[("Expect", "100-continue"),
                                                                          ("Content-Length", "100000")])
    return head


def _tls(gw) -> ssl.SSLSocket:
    g, *_, ctx = gw
    return ctx.wrap_socket(socket.create_connection(("127.0.0.1", g.port), timeout=5), server_hostname=HOSTNAME)


def _recv_until(s: ssl.SSLSocket, pred, timeout: float = 5.0) -> tuple[bytes, bool]:
    """What arrived until `pred` holds, the peer closed, or `timeout`; and whether it closed."""
    out = bytearray()
    deadline = time.monotonic() + timeout
    while not pred(bytes(out)) and time.monotonic() < deadline:
        s.settimeout(max(0.05, deadline - time.monotonic()))
        try:
            chunk = s.recv(65536)
        except (TimeoutError, socket.timeout):
            break
        except (OSError, ssl.SSLError):
            return bytes(out), True
        if not chunk:
            return bytes(out), True
        out += chunk
    return bytes(out), False


def test_expect_100_continue_denied_device_is_answered_without_continue(gw):
    g, ex, md, audit_path, ctx = gw
    s = _tls(gw)
    s.sendall(_expect_head("expect-denied", DENIED[0]))  # the head only: a real client waits for 100
    got, _ = _recv_until(s, lambda b: b"\r\n\r\n" in b)
    assert statuses(got)[:1] == [403], got[:200]
    assert b"100 Continue" not in got
    rest, closed = _recv_until(s, lambda b: False, timeout=5)  # the gateway closes instead of reading 100 kB
    s.close()
    assert closed and statuses(got + rest) == [403]
    lines = [l for l in audit(audit_path) if tag_of(l.get("agent")) == "expect-denied"]
    assert [l["decision"] for l in lines] == ["deny"]


def test_expect_100_continue_allowed_device_continues_after_the_decision(gw):
    g, ex, md, audit_path, ctx = gw
    s = _tls(gw)
    s.sendall(_expect_head("expect-allowed", ALLOWED[0]))
    got, _ = _recv_until(s, lambda b: b"\r\n\r\n" in b)
    assert got.startswith(b"HTTP/1.1 100"), got[:200]
    # the decision was written before the client was told to continue
    assert [l["decision"] for l in audit(audit_path) if tag_of(l.get("agent")) == "expect-allowed"] == ["allow"]
    s.sendall(b"x" * 100000)
    got += _recv_until(s, lambda b: b"\r\n\r\nok" in b)[0]
    s.close()
    assert b"200 OK" in got
    seen = upstream_reads(ex, {"expect-allowed"})["strict"]
    assert [r.body_len for r in seen] == [100000]


# ------------------------------------------------------------------------------------------------
# The differential test (the "How to prove it")


def test_hostile_corpus_differential(gw, pki):
    g, ex, md, audit_path, ctx = gw
    cases = hostile_cases("d-") + pipelined_cases("d-") + generated_cases(seed=20261201, n=300, p="d-")
    t0 = time.monotonic()
    results = run(gw, pki, cases)
    tags = {t for c in cases for t in c.tags}
    certs = {t: der_b64(pki, c.cert) for c in cases if c.cert for t in c.tags}
    hung = [cid for cid, r in results.items() if not r["statuses"] and not r["closed"]]
    assert not hung, f"no answer and no close: {hung[:10]}"
    # the audit line of a forwarded request is written before it is forwarded; wait for the last ones
    # of the requests that are still being read
    problems = violations(ex, md, audit_path, tags, certs)
    assert not problems, "\n".join(problems[:25])
    for c in cases:
        if c.hostile:
            st = results[c.id]["statuses"]
            assert st[:1] in ([400], [414], [431]), f"{c.id} ({c.kind}): {st}"
    # not vacuous: allowed devices got through in many forms, in both query forms, through every model
    reads = upstream_reads(ex, tags)
    allowed = {dev for _, dev, _ in ALLOWED}
    for model in MODELS:
        got = [r for r in reads[model] if r.device_id in allowed]
        assert len(got) >= 20, (model, len(got))
        assert {r.tag and r.tag.startswith("d-g") for r in got}
    forms = {r.query_form for r in reads["strict"]}
    assert {"plain", "base64"} <= forms
    inserted = [r for r in upstream_reads(md, tags)["split"] if r.cert_headers]
    assert len(inserted) >= 5  # the gateway's own NSClientCert does arrive, on every reader
    assert time.monotonic() - t0 < 60


# ------------------------------------------------------------------------------------------------
# Unit: the rules, the limits' config, mitmproxy's internals


@pytest.mark.parametrize("raw,why", [
    (b"GET / HTTP/1.1\r\nHost: a\r\n\r\n", None),
    (b"GET / HTTP/1.1\r\nHost: a\r\nX: a\r\n b\r\n\r\n", "obs-fold"),
    (b"GET / HTTP/1.1\nHost: a\r\n\r\n", "bare"),
    (b"GET / HTTP/1.1\r\nHost: a\rb\r\n\r\n", "bare"),
    (b"GET /\x00 HTTP/1.1\r\nHost: a\r\n\r\n", "request-target"),
    (b"GET / HTTP/2.0\r\nHost: a\r\n\r\n", "version"),
    (b"GET  / HTTP/1.1\r\nHost: a\r\n\r\n", "request line"),
    (b"G\tT / HTTP/1.1\r\nHost: a\r\n\r\n", "not a token"),
    (b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\nContent-Length: 3\r\n\r\n", "both"),
    (b"POST / HTTP/1.1\r\nContent-Length: 3\r\nContent-Length: 3\r\n\r\n", "more than one"),
    (b"POST / HTTP/1.1\r\nTransfer-Encoding: CHUNKED\r\n\r\n", "not exactly"),
    (b"POST / HTTP/1.1\r\nContent-Length: 03\r\n\r\n", "decimal"),
    (b"GET / HTTP/1.1\r\nHost: a\r\nX: \x01\r\n\r\n", "control"),
    (b"GET / HTTP/1.1\r\nHost: a\r\nX: caf\xc3\xa9\r\n\r\n", None),  # obs-text is allowed in values
])
def test_check_head(raw, why):
    if why is None:
        http1.check_head(raw, Limits())
    else:
        with pytest.raises(http1.Refusal, match=why):
            http1.check_head(raw, Limits())


def test_the_fast_reading_accepts_only_what_the_rules_accept():
    """`screen` lets a head by on one regex pass when it can (every request takes it): it may never
    accept a head the rule-by-rule reading refuses. Mutations of a real ActiveSync head, differential."""
    import random

    base = (b"POST /Microsoft-Server-ActiveSync?Cmd=Sync&User=alice&DeviceId=ApplBENCH0000001&DeviceType=iPhone "
            b"HTTP/1.1\r\nHost: mail.contoso.com\r\nAuthorization: Basic Q09OVE9TT1xhbGljZTpzZWNyZXQ=\r\n"
            b"User-Agent: Apple-iPhone14C2/2008.420\r\nContent-Length: 4\r\n\r\n")
    limits = Limits()
    assert http1.fast_accepts(base, limits)  # the common case does take the fast way
    pieces = [b" ", b"\t", b"\r", b"\n", b"\r\n", b":", b"\x00", b"\x7f", b"\xc3\xa9", b"a", b"_", b"-", b"0", b"03",
              b"content-length", b"Content_Length", b"transfer-encoding", b"chunked", b"HTTP/1.0", b"HTTP/2.0", b"get",
              b"Transfer_Encoding: chunked\r\n", b"Content-Length: 5\r\n", b"X: y\r\n", b" x\r\n", b"\r\n\r\n"]
    rnd = random.Random(18)
    fast = 0
    for _ in range(20_000):
        raw = bytearray(base)
        for _ in range(rnd.randint(1, 3)):
            pos = rnd.randrange(len(raw))
            if rnd.random() < 0.5:
                raw[pos:pos] = rnd.choice(pieces)
            else:
                raw[pos:pos + rnd.randint(1, 3)] = rnd.choice(pieces) if rnd.random() < 0.5 else b""
        raw = bytes(raw) if raw.endswith(b"\r\n\r\n") else bytes(raw) + b"\r\n\r\n"
        if http1.fast_accepts(raw, limits):
            fast += 1
            http1.check_head(raw, limits)  # raises Refusal if the fast way let by what the rules refuse
    assert fast > 1000


def test_screen_waits_for_a_whole_head_but_not_past_the_limit():
    limits = Limits(max_header_bytes=1024)
    http1.screen(b"GET / HTTP/1.1\r\nX: " + b"a" * 900, limits)  # not complete yet: wait
    with pytest.raises(http1.Refusal) as e:
        http1.screen(b"GET / HTTP/1.1\r\nX: " + b"a" * 1100, limits)
    assert e.value.status == 431


@pytest.mark.parametrize("limits,msg", [
    ({"max_headers": 5}, "limits.max_headers: 5 is out of range (use a value from 8 to 1000)"),
    ({"max_header_bytes": "big"}, "limits.max_header_bytes: must be a whole number"),
    ({"max_target_bytes": 100}, "limits.max_target_bytes: unknown key (did you mean 'max_target_length'?)"),
    ({"max_header_bytes": 2048, "max_target_length": 4096}, "limits.max_target_length: 4096 is not below"),
])
def test_limits_config_errors(pki, tmp_path, limits, msg):
    class Up:
        url = "http://127.0.0.1:1"
    cfg = base_config(pki, Up, Up, limits=limits)
    with pytest.raises(ConfigError) as e:
        parse_config(cfg, tmp_path / "gateway.yaml")
    assert msg in str(e.value) and "\n" not in str(e.value)
    assert parse_config(base_config(pki, Up, Up), tmp_path / "g.yaml").limits == Limits()


def test_limits_example_in_the_docs_is_the_default(pki, tmp_path):
    text = (Path(__file__).parent.parent / "docs" / "configuration.md").read_text()
    block = text.split("## `limits` and the strict reading of requests", 1)[1].split("```yaml\n", 1)[1].split("```", 1)[0]

    class Up:
        url = "http://127.0.0.1:1"
    cfg = base_config(pki, Up, Up, **yaml.safe_load(block))
    assert parse_config(cfg, tmp_path / "gateway.yaml").limits == Limits()


@pytest.mark.parametrize("mutate,why", [
    (lambda r: None, None),
    (lambda r: setattr(r.headers, "fields", r.headers.fields + ((b"X-A", b"a\r\n NSClientCert: FORGED"),)), "obs-fold"),
    (lambda r: setattr(r.headers, "fields", r.headers.fields + ((b"X-A", b"a\x00"),)), "control byte"),
    (lambda r: setattr(r.data, "method", b"options"), "upper case"),
    (lambda r: setattr(r.data, "http_version", b"HTTP/2.0"), "HTTP version"),
    (lambda r: setattr(r.data, "path", b"/a\x00b"), "request-target"),
], ids=["clean", "obs-fold", "nul", "lower-case-method", "http2", "nul-path"])
def test_the_addon_refuses_what_mitmproxy_parsed(mutate, why):
    """The second line of defence: the same rules on the parsed request, if the layer check is missing."""
    from mitmproxy.test import taddons, tflow

    addon = http1.StrictRequests()
    with taddons.context(addon):
        f = tflow.tflow()
        mutate(f.request)
        addon.requestheaders(f)
    if why is None:
        assert f.response is None
    else:
        assert f.response.status_code == 400 and f.response.headers["connection"] == "close"
        assert why in f.metadata["easgate.refused_request"]
