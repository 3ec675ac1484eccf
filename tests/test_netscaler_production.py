"""`easgate import-netscaler` on a production-shaped ns.conf (XenMobile 10 + Exchange 2016 DMZ
appliance, NS 13.1 saved format, tests/fixtures/netscaler-xm10-exchange2016.conf): every finding of
issue 15 as a test, and a real gateway imported from the file that behaves like the appliance."""

from __future__ import annotations

import base64
import http.client
import subprocess
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest
import yaml
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from test_revocation import OpensslResponder

from easgate.gateway.config import parse_config
from easgate.tools.netscaler import Options, import_netscaler
from easgate.tools.pki import cert_b64_der, load_cert
from easgate.tools.ports import free_port

from conftest import ROOT, easgate_argv, request

FIX = Path(__file__).resolve().parent / "fixtures"
PROD = FIX / "netscaler-xm10-exchange2016.conf"

# the fixture's lines, by what they hold (asserted below so that an edit of the file fails loudly)
LINE = {
    "cs_vs_xms_enroll": 36, "rsp_basic": 44, "rsp_cert": 45, "co_cert": 49, "certkey_mail": 73,
    "link_mail": 79, "bind_root_ca": 93,
}


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([*easgate_argv(), *args], capture_output=True, text=True,
                          cwd=ROOT, timeout=60)


def prod_text() -> str:
    return PROD.read_bytes().decode("latin-1")


def certs(pki: Path) -> dict:
    return {"ck_mail_2024": (str(pki / "gateway-full.pem"), None),
            "ck_xm_device_ca": (str(pki / "device-ca.pem"), None),
            "ck_xm_root_ca": (str(pki / "root-ca.pem"), None)}


def imported(pki: Path | None = None, **kw):
    opts = Options(certs=certs(pki) if pki else {}, **kw)
    text, imp = import_netscaler(prod_text(), str(PROD), opts)
    return text, imp, yaml.safe_load(text)


def test_fixture_lines_are_where_the_tests_expect_them():
    lines = prod_text().split("\n")
    for what, no in LINE.items():
        key = {"rsp_basic": "rsp_pol_xnc_basic \"", "rsp_cert": "rsp_pol_xnc_cert \"",
               "co_cert": "set policy httpCallout co_xnc_cert", "certkey_mail": "add ssl certKey ck_mail_2024",
               "link_mail": "link ssl certKey ck_mail_2024", "bind_root_ca": "ck_xm_root_ca -CA"}.get(what, what)
        assert key in lines[no - 1], (what, no, lines[no - 1])


# ============================================================================================
# Findings


def test_fail_closed_responder_policies_give_a_fail_closed_config():
    """-undefAction DROP (and `set responder param -undefAction DROP`): a connector that is down or
    answers garbage drops the request; a denied device is dropped, not answered."""
    text, imp, doc = imported()
    a = doc["authorization"]
    assert a["on_connector_error"] == "deny"
    assert a["deny"] == {"action": "drop"}
    assert "This import keeps that behaviour" not in text
    assert not [w for w in imp.weaker if "fail" in w.message.lower()]


def test_fail_open_source_stays_fail_open_and_says_so():
    conf = prod_text().replace("set responder param -undefAction DROP\n", "").replace(
        " DROP -undefAction DROP -comment", " DROP -comment")
    text, imp = import_netscaler(conf, "p.conf")
    assert yaml.safe_load(text)["authorization"]["on_connector_error"] == "allow"
    assert "-undefAction" in text  # the comment names where the fail mode comes from


def test_authorization_only_where_a_responder_policy_guards_the_traffic():
    _, imp, doc = imported()
    by = {r["name"]: r for r in doc["routes"]}
    assert by["cs_pol_eas"].get("authorize") == "activesync"
    # same lb vserver, but the responder rules never hold for autodiscover or EWS: no authorization
    assert "authorize" not in by["cs_pol_autodiscover"] and "authorize" not in by["cs_pol_ews"]
    assert not any("authorize" in r for n, r in by.items() if n != "cs_pol_eas")
    # NetScaler asks the connector only with a Basic header or a certificate: easgate is stricter, said so
    assert any("cs_pol_eas" in r.message and "stricter" in r.message for r in imp.reports)


def test_disabled_services_servers_and_members_stay_out_of_the_pools():
    _, _, doc = imported()
    assert doc["pools"]["lb_vs_exchange_443"]["servers"] == ["https://10.30.1.21:443", "https://10.30.1.22:443"]
    assert doc["pools"]["lb_vs_xms_8443"]["servers"] == ["https://10.30.2.31:8443"]


def test_the_linked_chain_is_required(pki, tmp_path):
    # the full PEM (leaf + chain + key): fine
    _, imp, _ = imported(pki)
    assert not [r for r in imp.reports if "chain" in r.message]
    # leaf only: the chain NetScaler sends (link ssl certKey) would be lost
    text, imp = import_netscaler(prod_text(), str(PROD), Options(certs={**certs(pki), "ck_mail_2024": (
        str(pki / "gateway.pem"), str(pki / "gateway.key"))}))
    msgs = [r for r in imp.reports if "ck_sectigo_intermediate" in r.message]
    assert msgs and msgs[0].line == LINE["link_mail"]
    # no file given: the FILL IN names the chain
    text, _, _ = imported()
    line = next(ln for ln in text.splitlines() if ln.startswith("  certificate:"))
    assert "ck_sectigo_intermediate" in line and "FILL IN" in line


def test_client_auth_from_the_ssl_profile():
    _, imp, doc = imported()
    cc = doc["tls"]["client_certs"]
    assert cc["mode"] == "optional"
    assert not [r for r in imp.reports if "sslProfile" in r.message and "cs_vs_mail" in r.message]


def test_ocsp_responder_and_crl_objects(pki, tmp_path):
    crl_dir = tmp_path / "certs"
    crl_dir.mkdir()
    (crl_dir / "XenMobile_Root_CA.crl").write_bytes(root_crl(pki))
    text, imp, doc = imported(pki, certs_dir=crl_dir)
    dev, root = doc["tls"]["client_certs"]["ca"]
    # -resptimeout 500 (ms), -cacheTimeout 10 (minutes)
    assert dev == {"file": str(pki / "device-ca.pem"), "revocation": "mandatory",
                   "ocsp_url": "http://xms.contoso.local:8080/ocsp", "ocsp_timeout_ms": 500, "ocsp_cache_max_s": 600}
    assert root == {"file": str(pki / "root-ca.pem"), "revocation": "optional", "ocsp": False,
                    "crl": str(crl_dir / "XenMobile_Root_CA.crl")}
    assert not [r for r in imp.reports + imp.weaker if "CRL object has no file" in r.message]
    # without the file: a FILL IN naming where it lives on the appliance, no silent drop
    text, imp, doc = imported(pki)
    assert doc["tls"]["client_certs"]["ca"][1]["crl"] == "FILL-IN-CRL-crl_xm_root_ca.crl"
    assert "/nsconfig/ssl/XenMobile_Root_CA.crl" in text


def test_to_lower_activesync_rule_is_translated():
    _, _, doc = imported()
    eas = next(r for r in doc["routes"] if r["name"] == "cs_pol_eas")
    assert eas["match"] == {"path_prefix": "/microsoft-server-activesync", "ignore_case": True}
    assert eas["pool"] == "lb_vs_exchange_443"


def test_an_untranslatable_rule_on_a_guarded_route_is_a_security_difference():
    conf = prod_text().replace('HTTP.REQ.URL.PATH.TO_LOWER.STARTSWITH(\\"/microsoft-server-activesync\\")" -action',
                               'HTTP.REQ.URL.PATH.REGEX_MATCH(re#^/microsoft-server-activesync#i)" -action', 1)
    assert conf != prod_text()
    text, imp = import_netscaler(conf, "p.conf")
    assert any("cs_pol_eas" in w.message for w in imp.weaker)


def test_cs_actions_and_the_default_lb_vserver():
    _, _, doc = imported()
    assert [(r["name"], r["pool"]) for r in doc["routes"]] == [
        ("cs_pol_eas", "lb_vs_exchange_443"), ("cs_pol_autodiscover", "lb_vs_exchange_443"),
        ("cs_pol_ews", "lb_vs_exchange_443"), ("cs_vs_mail_default", "lb_vs_xms_8443")]
    assert doc["default_route"] == "cs_vs_mail_default"


def test_two_callouts_one_connector_and_the_certificate_user_is_a_security_difference():
    _, imp, doc = imported()
    assert doc["authorization"]["connector"]["url"] == "http://10.30.3.41:9080/services/ActiveSync/Authorize"
    assert not [r for r in imp.reports if "easgate has one connector" in r.message]
    cert_user = [w for w in imp.weaker if "co_xnc_cert" in w.message and "user" in w.message]
    assert cert_user and cert_user[0].line == LINE["co_cert"]


def test_the_mail_vserver_is_chosen_and_vserver_selects_another():
    _, imp, doc = imported()
    assert doc["listen"] == {"host": "203.0.113.10", "port": 443}
    assert not [r for r in imp.reports if "cs_vs_xms_enroll" in r.message]
    assert any("cs_vs_xms_enroll" in n for n in imp.unused)
    text, imp = import_netscaler(prod_text(), str(PROD), Options(vserver="cs_vs_xms_enroll"))
    doc = yaml.safe_load(text)
    assert doc["listen"] == {"host": "203.0.113.11", "port": 443}
    assert [r["name"] for r in doc["routes"]] == ["cs_pol_xms_enroll", "cs_vs_xms_enroll_default"]
    r = run_cli("import-netscaler", str(PROD), "--vserver", "cs_vs_typo")
    assert r.returncode == 2 and "cs_vs_typo" in r.stderr and "cs_vs_mail" in r.stderr


def test_no_wrong_reasons():
    _, imp, _ = imported()
    msgs = [r.message for r in imp.reports + imp.weaker]
    assert not [m for m in msgs if "no vserver named" in m or "no lb vserver named" in m]
    assert not [m for m in msgs if "has no file here" in m]


def test_latin1_and_control_characters(tmp_path):
    out = tmp_path / "gw.yaml"
    r = run_cli("import-netscaler", str(PROD), "-o", str(out))
    assert r.returncode == 3, r.stderr
    assert "not a text file" not in r.stderr
    for ch in ("\x1b", "\x07", "\x85"):
        assert ch not in r.stderr and ch not in out.read_text()
    text = out.read_text()
    yaml.safe_load(text)
    assert "\\x1b[1;31mPROD" in text  # shown, escaped
    assert "M\u00fcnchen" in text or "M\\xfcnchen" in text


def test_security_differences_come_first_with_exit_status_3(tmp_path):
    r = run_cli("import-netscaler", str(PROD))
    assert r.returncode == 3
    head = r.stdout.split("\n\n")[0]
    assert "WEAKER THAN NETSCALER" in head and "co_xnc_cert" in head
    first = r.stderr.splitlines()[0]
    assert "WEAKER THAN NETSCALER" in first
    lines = r.stderr.splitlines()
    weak = [i for i, ln in enumerate(lines) if ": weaker: " in ln]
    other = [i for i, ln in enumerate(lines) if ": not translated: " in ln]
    assert weak and other and max(weak) < min(other)
    h = run_cli("import-netscaler", "--help")
    assert "3" in h.stdout and "weaker" in h.stdout.lower()


def test_unused_objects_are_one_count_line_and_verbose_lists_them():
    r = run_cli("import-netscaler", str(PROD))
    unused = [ln for ln in r.stderr.splitlines() if "not used by cs vserver cs_vs_mail" in ln]
    assert len(unused) == 1 and "--verbose" in unused[0]
    assert "lb_vs_old_owa" not in r.stderr
    r = run_cli("import-netscaler", str(PROD), "--verbose")
    assert "lb_vs_old_owa" in r.stderr and "svc_old_owa" in r.stderr


# ============================================================================================
# A real gateway imported from the production file


def root_crl(pki: Path) -> bytes:
    """An empty CRL signed by the test root CA (the fixture's ck_xm_root_ca -crlCheck Optional)."""
    key = serialization.load_pem_private_key((pki / "root-ca.key").read_bytes(), None)
    ca = load_cert(pki / "root-ca.pem")
    now = datetime.now(timezone.utc)
    crl = (x509.CertificateRevocationListBuilder().issuer_name(ca.subject)
           .last_update(now - timedelta(minutes=5)).next_update(now + timedelta(days=1)).sign(key, hashes.SHA256()))
    return crl.public_bytes(serialization.Encoding.PEM)


@pytest.fixture
def ocsp(pki):
    r = OpensslResponder(pki, free_port()).start()
    yield r
    r.stop()


def dropped(fn) -> bool:
    """NetScaler's DROP: the connection closes without a response."""
    try:
        fn()
    except (http.client.RemoteDisconnected, ConnectionResetError, http.client.IncompleteRead):
        return True
    return False


def test_a_gateway_from_the_production_file_behaves_like_the_appliance(pki, exchange, mdm, connector, ocsp,
                                                                       start_gateway, tmp_path):
    certs_dir = tmp_path / "certs"
    certs_dir.mkdir()
    (certs_dir / "XenMobile_Root_CA.crl").write_bytes(root_crl(pki))
    out = tmp_path / "gateway.yaml"
    r = run_cli("import-netscaler", str(PROD), "-o", str(out), "--certs", str(certs_dir),
                "--cert", f"ck_mail_2024={pki / 'gateway-full.pem'}",
                "--cert", f"ck_xm_device_ca={pki / 'device-ca.pem'}", "--cert", f"ck_xm_root_ca={pki / 'root-ca.pem'}",
                "--service", f"svc_xnc_9080=127.0.0.1:{connector.server_address[1]}")
    assert r.returncode == 3, r.stderr
    doc = yaml.safe_load(out.read_text())
    # the appliance's addresses -> the stand-ins on loopback (what a lab cut-over does)
    doc["listen"] = {"host": "127.0.0.1", "port": 0}
    doc["pools"]["lb_vs_exchange_443"].update(servers=[exchange.url], ca=str(pki / "internal-ca.pem"),
                                              sni="exchange.internal")
    doc["pools"]["lb_vs_xms_8443"].update(servers=[mdm.url])
    doc["pools"]["lb_vs_xms_8443"].pop("ca", None)
    dev_ca = doc["tls"]["client_certs"]["ca"][0]
    assert dev_ca["ocsp_url"] == "http://xms.contoso.local:8080/ocsp"
    dev_ca["ocsp_url"] = f"http://127.0.0.1:{ocsp.port}/"
    cfg_path = tmp_path / "lab.yaml"
    cfg_path.write_text(yaml.safe_dump(doc, sort_keys=False))
    parse_config(doc, cfg_path)
    g = start_gateway(cfg_path)

    allowed, denied = "ApplF17ABCDEF01", "ApplDMPQ99887766"
    connector.allowed = {allowed}
    basic = {"Authorization": "Basic " + base64.b64encode(b"CONTOSO\\alice:secret").decode(),
             "User-Agent": "Apple-iPhone14C2/2008.420", "MS-ASProtocolVersion": "16.1"}
    body = b"\x03\x01\x6a\x00"

    def eas(dev, path="/Microsoft-Server-ActiveSync", **kw):
        return request(g.port, "POST", f"{path}?Cmd=Sync&User=alice&DeviceId={dev}&DeviceType=iPhone", pki,
                       body=body, **kw)

    # allowed device (Basic): reaches Exchange; the lower-case path too (TO_LOWER)
    assert eas(allowed, headers=basic).status == 200
    assert eas(allowed, path="/microsoft-server-activesync", headers=basic).status == 200
    # certificate device without Basic: the connector is asked as well
    assert eas(allowed, cert="device-iphone").status == 200
    # denied device: dropped, as the responder DROP does; Exchange never sees it
    seen_before = len(exchange.requests())
    assert dropped(lambda: eas(denied, headers=basic))
    assert len(exchange.requests()) == seen_before
    # autodiscover on the same lb vserver: no responder rule holds, no connector call, no certificate header
    calls = len(connector.calls)
    ad = request(g.port, "POST", "/autodiscover/autodiscover.xml", pki, headers=basic, body=b"<x/>")
    # the Exchange stand-in answers Autodiscover itself: its answer and its request log show it got there
    assert ad.status == 200 and exchange.requests()[-1]["path"] == "/autodiscover/autodiscover.xml"
    assert not any(k.lower() == "nsclientcert" for k, _ in exchange.requests()[-1]["headers"])
    assert len(connector.calls) == calls
    # MDM: the verified device certificate as NSClientCert; without one, none (a forged one is removed)
    mdm_cert = request(g.port, "GET", "/zdm/enroll", pki, cert="device-iphone")
    assert mdm_cert.status == 200 and mdm_cert.json()["upstream"] == "mdm"
    assert mdm_cert.json()["NSClientCert"] == cert_b64_der(load_cert(pki / "device-iphone.pem"))
    no_cert = request(g.port, "GET", "/zdm/enroll", pki, headers={"NSClientCert": "forged"})
    assert no_cert.status == 200 and no_cert.json()["NSClientCert"] is None
    # connector answers garbage, then is down: fail closed (-undefAction DROP), for devices it would allow
    connector.allowed |= {"androidc1234567890", "ApplNOTYET000001"}
    connector.behaviour = "garbage"
    assert dropped(lambda: eas("androidc1234567890", headers=basic))
    connector.stop()
    assert dropped(lambda: eas("ApplNOTYET000001", headers=basic))
    assert len(exchange.requests()) == seen_before + 1  # only the autodiscover request since the deny


def test_a_positional_undef_action_and_mixed_fail_modes():
    """`add responder policy NAME RULE ACTION UNDEFACTION`: the policy's own NOOP beats the global
    DROP; with the other policy failing closed, easgate denies (stricter) and says so."""
    conf = prod_text().replace(" DROP -undefAction DROP -comment", " DROP NOOP -comment")
    text, imp = import_netscaler(conf, "p.conf")
    assert yaml.safe_load(text)["authorization"]["on_connector_error"] == "deny"
    msgs = [r.message for r in imp.reports if "rsp_pol_xnc_basic" in r.message]
    assert msgs and "lets a request through when its callout fails" in msgs[0]
    assert imp.weaker and not [w for w in imp.weaker if "fail" in w.message]


def test_to_lower_with_an_upper_case_literal_never_matches():
    conf = prod_text().replace('TO_LOWER.STARTSWITH(\\"/autodiscover/\\")', 'TO_LOWER.STARTSWITH(\\"/Autodiscover/\\")')
    assert conf != prod_text()
    text, _ = import_netscaler(conf, "p.conf")
    assert "cs_pol_autodiscover" not in [r["name"] for r in yaml.safe_load(text)["routes"]]
    assert "the rule is always false: no route" in text
