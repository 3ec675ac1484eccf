"""The addons inside mitmproxy's test context: options, hooks, commands (no sockets)."""

from __future__ import annotations

import base64
import json

import pytest
import yaml
from mitmproxy import eventsequence, exceptions
from mitmproxy import flow as mflow
from mitmproxy.addons import block, proxyserver
from mitmproxy.proxy.layers.http import HttpRequestHeadersHook
from mitmproxy.test import taddons, tflow

from easgate.authz import cache as cache_mod
from easgate.authz import engine as engine_mod
from easgate.authz import identity as identity_mod
from easgate.authz import policy as policy_mod
from easgate.core.errors import ConfigError
from easgate.gateway import audittrail as audittrail_mod
from easgate.gateway import xnc
from easgate.gateway.chain import make_addons
from easgate.gateway.config import load_config

from conftest import base_config


class _Up:
    def __init__(self, url):
        self.url = url


def _cfg(tmp_path, pki, **auth):
    cfg = base_config(pki, _Up("https://127.0.0.1:9443"), _Up("http://127.0.0.1:9081"))
    cfg["routes"][0]["authorize"] = "activesync"
    (tmp_path / "policy.yaml").write_text(yaml.safe_dump({
        "mode": "block", "inventory": [{"device_id": "ApplF17ABCDEF01", "owner": "alice"}]}))
    cfg["authorization"] = {"policy": str(tmp_path / "policy.yaml"), **auth}
    p = tmp_path / "gw.yaml"
    p.write_text(yaml.safe_dump(cfg))
    return p


def _flow(path: str, method: str = "POST", user: str = "alice"):
    f = tflow.tflow()
    f.request.method = method
    f.request.path = path
    f.request.host_header = "mail.example.test"
    f.request.headers["Authorization"] = "Basic " + base64.b64encode(f"{user}:pw".encode()).decode()
    return f


@pytest.fixture
def gateway(tmp_path, pki):
    addons = make_addons()
    with taddons.context(block.Block(), proxyserver.Proxyserver(), *addons) as tctx:
        tctx.configure(addons[0], easgate_config=str(_cfg(tmp_path, pki)))
        yield tctx, addons[0]


async def test_route_decision_and_commands(gateway):
    tctx, gw = gateway
    allowed = _flow("/Microsoft-Server-ActiveSync?Cmd=Sync&DeviceId=ApplF17ABCDEF01&DeviceType=iPhone")
    denied = _flow("/Microsoft-Server-ActiveSync?Cmd=Ping&DeviceId=ApplNOPE&DeviceType=iPad")
    mdm = _flow("/enroll", method="GET")
    for f in (allowed, denied, mdm):
        await tctx.cycle(gw, f)
    assert allowed.metadata["easgate.route"] == "activesync" and allowed.response is None
    assert allowed.metadata["easgate.decision"]["allow"] is True
    assert allowed.request.host == "127.0.0.1" and allowed.request.port == 9443
    assert allowed.request.host_header == "mail.example.test"
    assert denied.response.status_code == 403
    assert denied.marked == ":no_entry:"
    assert denied.comment == "route activesync: Ping: deny: device ApplNOPE not managed [mode]"
    assert denied.metadata["easgate.identity"]["command"] == "Ping"
    assert mdm.metadata["easgate.route"] == "mdm" and "easgate.decision" not in mdm.metadata

    explain = tctx.master.commands.call("easgate.explain", [allowed, denied, mdm])
    assert "deny (mode): device ApplNOPE not managed" in explain
    assert "no authorization decision" in explain
    status = json.loads(tctx.master.commands.execute("easgate.status"))
    assert status["routes"]["activesync"] == 2 and status["routes"]["mdm"] == 1
    assert status["decisions"] == {"allow_inventory": 1, "deny_mode": 1}
    assert tctx.master.commands.execute("easgate.cache.clear") == "2 cached decisions dropped"
    assert tctx.master.commands.execute("easgate.reload").startswith("policy reloaded from ")


def test_bad_config_is_an_options_error_and_the_last_good_one_stays(gateway, tmp_path):
    tctx, gw = gateway
    good = gw.config
    bad = tmp_path / "bad.yaml"
    bad.write_text("tls: {certificate: nope.pem}\npools: {}\nroutes: []\n")
    with pytest.raises(exceptions.OptionsError, match=r"bad.yaml: tls.certificate: file not found"):
        tctx.configure(gw, easgate_config=str(bad))
    assert gw.config == good and tctx.options.easgate_config == str(good.path)
    with pytest.raises(exceptions.OptionsError, match="easgate_config is not set"):
        tctx.configure(gw, easgate_config="")


def test_forced_options(gateway):
    tctx, gw = gateway
    o = tctx.options
    assert o.mode == ["reverse:http://127.0.0.1:9@127.0.0.1:0"]
    assert o.connection_strategy == "lazy" and o.keep_host_header is True
    assert o.tcp_timeout == 3660 and o.block_global is False


# ------------------------------------------------------------------------------------------------
# Fail closed (issue 12, item 2): mitmproxy's own dispatch, a fault injected at each stage


async def through_chain(tctx, f) -> None:
    """The hooks as the proxy core runs them: every top-level addon in order, each in mitmproxy's
    safecall (an exception is logged and the rest of that addon's tree skipped), not `cycle`,
    which calls one addon and lets exceptions out."""
    for evt in eventsequence.iterate(f):
        await tctx.master.addons.handle_lifecycle(evt)


def _raise(*a, **k):
    raise RuntimeError("injected")


async def _araise(*a, **k):
    raise RuntimeError("injected")


def _break_flight(monkeypatch):
    async def failing_flight(self, key, compute):
        async def boom():
            raise RuntimeError("injected")
        return await orig(self, key, boom)

    orig = cache_mod.DecisionCache.single_flight
    monkeypatch.setattr(cache_mod.DecisionCache, "single_flight", failing_flight)


STAGES = {
    "identity": lambda mp: mp.setattr(identity_mod, "parse_request", _raise),
    "lists": lambda mp: mp.setattr(policy_mod.Rules, "match", _raise),
    "cache": lambda mp: mp.setattr(cache_mod.DecisionCache, "get", _raise),
    "single flight": _break_flight,
    "inventory": lambda mp: mp.setattr(policy_mod.Policy, "inventory_decision", _raise),
    "engine": lambda mp: mp.setattr(engine_mod.Engine, "decide", _araise),
    "connector client": lambda mp: mp.setattr(xnc.ConnectorClient, "authorize", _araise),
}


@pytest.fixture
def chain(tmp_path, pki, request):
    """make_addons() as `easgate run` adds them (the gateway, then FinalCheck, top level)."""
    addons = make_addons()
    extra = getattr(request, "param", [])
    with taddons.context(block.Block(), proxyserver.Proxyserver(), addons[0], *extra, addons[1]) as tctx:
        auth = {"connector": {"url": "http://127.0.0.1:9/services/ActiveSync/Authorize"}} \
            if "connector" in request.node.name else {}
        cfg = _cfg(tmp_path, pki, **auth)
        gw_cfg = yaml.safe_load(cfg.read_text())
        gw_cfg["audit_log"] = str(tmp_path / "audit.jsonl")
        cfg.write_text(yaml.safe_dump(gw_cfg))
        tctx.configure(addons[0], easgate_config=str(cfg))
        yield tctx, addons[0], addons[1], tmp_path / "audit.jsonl"


def _allowed_flow():
    return _flow("/Microsoft-Server-ActiveSync?Cmd=Sync&DeviceId=ApplF17ABCDEF01&DeviceType=iPhone")


def _audit(p):
    return [json.loads(line) for line in p.read_text().splitlines()] if p.exists() else []


async def test_the_chain_allows_and_forwards_without_faults(chain):
    tctx, gw, final, audit = chain
    f = _allowed_flow()
    await through_chain(tctx, f)
    assert f.response is None and f.error is None and f.metadata["easgate.decision"]["allow"] is True
    assert [(a["decision"], a["source"]) for a in _audit(audit)] == [("allow", "inventory")]
    assert len(gw.ledger) == 0  # nothing kept once the request went
    mdm = _flow("/enroll", method="GET")
    await through_chain(tctx, mdm)
    assert mdm.response is None and mdm.error is None and mdm.request.port == 9081


@pytest.mark.parametrize("stage", [s for s in STAGES if s != "connector client"])
async def test_a_fault_at_any_stage_is_an_audited_internal_error_deny(chain, monkeypatch, stage):
    tctx, gw, final, audit = chain
    STAGES[stage](monkeypatch)
    f = _allowed_flow()
    f.metadata["easgate.decision"] = {"allow": True, "reason": "left behind", "source": "cache"}  # e.g. a saved flow
    await through_chain(tctx, f)
    assert f.response is not None and f.response.status_code == 403
    assert f.metadata["easgate.decision"] == {"allow": False, "reason": "internal error", "source": "internal"}
    assert [(a["decision"], a["reason"]) for a in _audit(audit)] == [("deny", "internal error")]
    status = json.loads(tctx.master.commands.execute("easgate.status"))
    assert status["decisions"] == {"deny_internal": 1} and status["internal_errors"] == 1


@pytest.mark.parametrize("chain", [[]], indirect=True)
async def test_a_connector_client_fault_is_an_internal_error_not_the_fail_mode(chain, monkeypatch):
    tctx, gw, final, audit = chain
    STAGES["connector client"](monkeypatch)
    f = _allowed_flow()
    await through_chain(tctx, f)
    assert f.response.status_code == 403
    assert [(a["decision"], a["reason"], a["source"]) for a in _audit(audit)] == [("deny", "internal error", "internal")]


async def test_a_failing_audit_write_still_denies(chain, monkeypatch):
    tctx, gw, final, audit = chain
    writes = []

    async def record(self, rec):
        writes.append(rec["reason"])
        raise OSError("disk full")

    monkeypatch.setattr(audittrail_mod.AuditTrail, "record", record)
    f = _allowed_flow()
    await through_chain(tctx, f)
    # the allow could not be recorded, so it was never granted: FinalCheck denied, and when that
    # deny could not be recorded either the connection was dropped
    assert f.response is None and f.error is not None and f.error.msg == mflow.Error.KILLED_MESSAGE
    assert writes == ["device ApplF17ABCDEF01 managed and compliant", "internal error"]
    assert gw.gate.counters["audit_errors"] == 1


async def test_requests_on_one_connection_each_get_their_own_identity(chain):
    """The gate reuses a connection's last parse only for a request that repeats it exactly: another
    device, user or agent on the same connection is parsed (and decided) as itself."""
    tctx, gw, final, audit = chain
    flows = [_allowed_flow(), _allowed_flow(),
             _flow("/Microsoft-Server-ActiveSync?Cmd=Sync&DeviceId=ApplUNKNOWN0001&DeviceType=iPhone"),
             _allowed_flow(), _allowed_flow()]
    flows[3].request.headers["Authorization"] = "Basic " + base64.b64encode(b"mallory:pw").decode()
    flows[4].request.headers["User-Agent"] = "Other-Agent/1.0"
    flows[0].client_conn.timestamp_end = None  # open
    for f in flows[1:]:
        f.client_conn = flows[0].client_conn  # one keep-alive connection
    for f in flows:
        await through_chain(tctx, f)
    lines = _audit(audit)
    assert [(a["user"], a["device_id"], a["agent"]) for a in lines] == [
        ("alice", "ApplF17ABCDEF01", None), ("alice", "ApplF17ABCDEF01", None), ("alice", "ApplUNKNOWN0001", None),
        ("mallory", "ApplF17ABCDEF01", None), ("alice", "ApplF17ABCDEF01", "Other-Agent/1.0")]
    assert flows[1].metadata["easgate.identity"] == flows[0].metadata["easgate.identity"]
    assert flows[2].metadata["easgate.decision"]["allow"] is False
    assert flows[4].metadata["easgate.identity"]["user_agent"] == "Other-Agent/1.0"
    assert flows[0].client_conn.id in gw.gate.parsed
    gw.gate.client_disconnected(flows[0].client_conn)
    assert flows[0].client_conn.id not in gw.gate.parsed  # nothing kept for a closed connection


async def test_a_streamed_request_is_cut_at_requestheaders(chain, monkeypatch):
    # stream_large_bodies: mitmproxy sends the head upstream right after requestheaders
    tctx, gw, final, audit = chain
    STAGES["cache"](monkeypatch)
    f = _allowed_flow()
    f.request.stream = True
    await tctx.master.addons.handle_lifecycle(HttpRequestHeadersHook(f))
    assert f.error is not None and f.error.msg == mflow.Error.KILLED_MESSAGE and f.response is None
    assert [a["reason"] for a in _audit(audit)] == ["internal error"]


async def test_a_request_that_was_never_routed_goes_nowhere(chain, monkeypatch):
    tctx, gw, final, audit = chain
    monkeypatch.setattr(type(gw.switch), "point", _raise)  # routing fails half way
    f = _flow("/enroll", method="GET")
    f.metadata["easgate.route"] = "mdm"  # left behind: not what FinalCheck trusts
    await through_chain(tctx, f)
    assert f.response is not None and f.response.status_code == 403
    assert [a["reason"] for a in _audit(audit)] == ["internal error"]


class _RepointToExchange:
    """A buggy addon that sends an MDM request to the Exchange server after routing."""

    def request(self, flow):
        flow.request.data.host, flow.request.data.port = "127.0.0.1", 9443


@pytest.mark.parametrize("chain", [[_RepointToExchange()]], indirect=True)
async def test_a_request_re_pointed_after_routing_goes_nowhere(chain):
    tctx, gw, final, audit = chain
    f = _flow("/enroll", method="GET")
    await through_chain(tctx, f)
    assert (f.request.host, f.request.port) == ("127.0.0.1", 9443)
    assert f.response is not None and f.response.status_code == 403
    assert [a["reason"] for a in _audit(audit)] == ["internal error"]


class _RewriteAfterDecision:
    """Another addon that changes the request after the decision (here: to another device)."""

    def request(self, flow):
        flow.request.path = flow.request.path.replace("ApplF17ABCDEF01", "ApplOTHER000001")


@pytest.mark.parametrize("chain", [[_RewriteAfterDecision()]], indirect=True)
async def test_the_allow_is_bound_to_the_request_it_was_made_for(chain):
    tctx, gw, final, audit = chain
    f = _allowed_flow()
    await through_chain(tctx, f)
    assert "ApplOTHER000001" in f.request.path
    assert f.response is not None and f.response.status_code == 403
    assert [a["reason"] for a in _audit(audit)] == ["device ApplF17ABCDEF01 managed and compliant", "internal error"]


@pytest.mark.parametrize("method", ["options", "Options", "post", "Post"])
async def test_methods_match_exactly(chain, method):
    tctx, gw, final, audit = chain
    f = _flow("/Microsoft-Server-ActiveSync?Cmd=Sync&DeviceId=ApplF17ABCDEF01&DeviceType=iPhone")
    f.request.data.method = method.encode()  # as read from the wire (the `method` getter upper-cases)
    await through_chain(tctx, f)
    assert f.response.status_code in (400, 403)  # the strict HTTP reading refuses it first (400)
    # and the gate on its own decides on the method as sent, were the strict reading not there
    g = _flow("/Microsoft-Server-ActiveSync?Cmd=Sync&DeviceId=ApplF17ABCDEF01&DeviceType=iPhone")
    g.request.data.method = method.encode()
    ident, d = await gw.gate.decide(g)
    assert (d.allow, d.reason, d.source) == (False, f"method {method} not covered by applies_to", "filter")


async def test_options_passes(chain):
    tctx, gw, final, audit = chain
    f = _flow("/Microsoft-Server-ActiveSync", method="OPTIONS")
    await through_chain(tctx, f)
    assert f.response is None and f.metadata["easgate.decision"]["source"] == "filter"


def test_balancer_with_every_server_down_picks_the_first_back_and_a_connect_brings_one_back():
    from easgate.gateway.config import Pool, Upstream
    from easgate.gateway.routing import Balancer

    now = [1000.0]
    a, b = Upstream("http", "10.0.0.1", 80), Upstream("http", "10.0.0.2", 80)
    pool = Pool("mdm", (a, b), down_time_s=10)
    bal = Balancer({"mdm": pool}, clock=lambda: now[0])
    assert [bal.pick(pool) for _ in range(4)] == [a, b, a, b]
    bal.mark_down(a, pool, "refused")
    assert [bal.pick(pool) for _ in range(3)] == [b, b, b]
    now[0] += 1
    bal.mark_down(b, pool, "refused")
    assert bal.is_down(a) and bal.is_down(b)
    assert [bal.pick(pool) for _ in range(2)] == [a, a]  # all down: the one back first, never nothing
    bal.mark_up(b, pool)  # b accepted a connection
    assert not bal.is_down(b) and [bal.pick(pool) for _ in range(2)] == [b, b]
    now[0] += 10
    assert not bal.is_down(a) and {bal.pick(pool) for _ in range(2)} == {a, b}


def test_ticket_key_file_is_rotated_when_it_changes_and_a_broken_one_keeps_the_last(tmp_path, caplog):
    import os

    from OpenSSL import SSL

    from easgate.gateway import mitmcompat, tls

    caplog.set_level("INFO")
    now = [0.0]
    keys = tls.TicketKeys(clock=lambda: now[0])
    path = tmp_path / "ticket.key"
    first, second = os.urandom(80), os.urandom(80)
    path.write_bytes(first)
    keys.configure(path)
    ctx = SSL.Context(SSL.TLS_SERVER_METHOD)
    assert keys.install(ctx) and mitmcompat.get_ticket_key(ctx) == first
    path.write_bytes(second)
    keys.maybe_rotate(ctx)  # not looked at before TICKET_KEY_CHECK_S
    assert mitmcompat.get_ticket_key(ctx) == first
    now[0] += tls.TICKET_KEY_CHECK_S
    keys.maybe_rotate(ctx)
    assert mitmcompat.get_ticket_key(ctx) == second and "ticket key rotated" in caplog.text
    path.write_bytes(b"too short")
    now[0] += tls.TICKET_KEY_CHECK_S
    keys.maybe_rotate(ctx)
    assert mitmcompat.get_ticket_key(ctx) == second and "not 80; keeping the current key" in caplog.text
    # without a file: one key for the life of the process (a config reload keeps sessions resumable)
    keys.configure(None)
    k1 = keys.key
    keys.configure(None)
    assert keys.key == k1 and len(k1) == 80
    with pytest.raises(Exception, match="tls.session_ticket_key"):
        keys.configure(path)


def test_a_ticket_key_file_of_the_wrong_size_is_a_one_line_config_error(tmp_path):
    from easgate.core.errors import ConfigError
    from easgate.gateway.config import load_config
    from easgate.tools.pki import generate_pki

    pki = tmp_path / "pki"
    generate_pki(pki)
    (tmp_path / "ticket.key").write_bytes(b"x" * 48)
    cfg = {"tls": {"certificate": str(pki / "gateway-full.pem"), "session_ticket_key": "ticket.key"},
           "pools": {"mdm": {"servers": ["http://127.0.0.1:9"]}},
           "routes": [{"name": "mdm", "match": "any", "pool": "mdm"}]}
    (tmp_path / "g.yaml").write_text(yaml.safe_dump(cfg))
    with pytest.raises(ConfigError) as e:
        load_config(tmp_path / "g.yaml")
    assert "tls.session_ticket_key" in str(e.value) and "48 bytes, not 80" in str(e.value)
    assert "openssl rand 80 >" in str(e.value) and "\n" not in str(e.value)


def test_a_config_that_fails_to_load_leaves_every_part_on_the_old_one(tmp_path, pki):
    """Build all, then swap: a new config whose policy (built late in the chain) is broken changes
    nothing, not the routes, certificate state or pools that were built before it."""
    gw = make_addons()[0]
    old = load_config(_cfg(tmp_path, pki))
    gw.apply(old)
    router, context, by_address = gw.switch.router, gw.tls.context, gw.upstreams.by_address
    new_dir = tmp_path / "new"
    new_dir.mkdir()
    new = yaml.safe_load(_cfg(new_dir, pki).read_text())
    new["routes"] = list(reversed(new["routes"]))  # other routes ...
    new["pools"]["mdm"]["servers"] = ["http://127.0.0.1:9999"]  # ... other pools ...
    (new_dir / "policy.yaml").write_text("mode: [broken\n")  # ... and a policy that does not load
    (new_dir / "gw.yaml").write_text(yaml.safe_dump(new))
    with pytest.raises(ConfigError, match="policy"):
        gw.apply(load_config(new_dir / "gw.yaml"))
    assert gw.config is old
    assert gw.switch.router is router and gw.tls.context is context and gw.upstreams.by_address is by_address
    assert ("127.0.0.1", 9999) not in gw.upstreams.by_address
