"""The addons inside mitmproxy's test context: options, hooks, commands (no sockets)."""

from __future__ import annotations

import base64
import json

import pytest
import yaml
from mitmproxy import exceptions
from mitmproxy.addons import block, proxyserver
from mitmproxy.test import taddons, tflow

from easgate.gateway.chain import make_addons

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
    assert denied.comment == "route activesync: deny: device ApplNOPE not managed [mode]"
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
