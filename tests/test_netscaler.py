"""`easgate import-netscaler`: tokenizer, expression translation (structure and behaviour through
the real Router), every reported error, and the PoC fixture proven with a real gateway process."""

from __future__ import annotations

import base64
import subprocess
from pathlib import Path

import pytest
import yaml
from mitmproxy.test import tflow

from easgate.gateway.config import parse_config
from easgate.gateway.routing import Router, request_view
from easgate.tools.netscaler import Options, import_netscaler
from easgate.tools.netscaler.expressions import Atom, Const, ExprError, Not, parse_expr, simplify
from easgate.tools.netscaler.filters import to_match
from easgate.tools.netscaler.lexer import NsSyntaxError, logical_lines, tokenize
from easgate.tools.netscaler.reasoning import decide
from easgate.tools.pki import cert_b64_der, load_cert

from conftest import ROOT, easgate_argv, request

FIX = Path(__file__).resolve().parent / "fixtures"
POC = FIX / "netscaler-poc.conf"


def words(line: str) -> list[str]:
    return [t.text for t in tokenize(line)]


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([*easgate_argv(), *args], capture_output=True, text=True,
                          cwd=ROOT, timeout=60)


def load(text: str, tmp_path: Path, name: str = "imported.yaml"):
    """The imported YAML through easgate's own parser."""
    p = tmp_path / name
    p.write_text(text)
    return parse_config(yaml.safe_load(text), p)


def import_file(path: Path, pki: Path, **kw):
    text = path.read_text()
    certs = {"gw": (str(pki / "gateway-full.pem"), None)}
    if "devca" in text:
        certs["devca"] = (str(pki / "device-cas.pem"), None)
    return import_netscaler(text, str(path), Options(certs=certs, **kw))


# ============================================================================================
# Tokenizer


def test_unescaped_inner_quotes_run_to_the_balanced_closing_quote():
    assert words('add cs policy p -rule "HTTP.REQ.URL.STARTSWITH("/x")"') == [
        "add", "cs", "policy", "p", "-rule", 'HTTP.REQ.URL.STARTSWITH("/x")']
    # the same rule written with escaped quotes
    assert words(r'add cs policy p -rule "HTTP.REQ.URL.STARTSWITH(\"/x\")"')[-1] == 'HTTP.REQ.URL.STARTSWITH("/x")'
    # a space and a parenthesis inside an inner literal do not end anything
    rule = 'HTTP.REQ.HEADER("User-Agent").CONTAINS("a ( b") && HTTP.REQ.URL.STARTSWITH("/x").NOT'
    assert words(f'add cs policy p -rule "{rule}" -comment x') == ["add", "cs", "policy", "p", "-rule", rule,
                                                                     "-comment", "x"]


def test_double_double_quotes_and_parameters_with_spaces():
    w = words('set policy httpCallout c -hostExpr ""callout.asfilter.internal"" -parameters '
              'user(HTTP.REQ.HEADER("authorization").AFTER_STR("Basic ").B64DECODE) ip(CLIENT.IP.SRC) -scheme http')
    assert w[4:7] == ["-hostExpr", '"callout.asfilter.internal"', "-parameters"]
    assert w[7] == 'user(HTTP.REQ.HEADER("authorization").AFTER_STR("Basic ").B64DECODE)'
    assert w[8:] == ["ip(CLIENT.IP.SRC)", "-scheme", "http"]
    assert words('add x -comment ""') == ["add", "x", "-comment", ""]


def test_plain_quoted_text_with_an_unbalanced_parenthesis_falls_back_to_simple_quoting():
    assert words('add service s 1.2.3.4 HTTP 80 -comment "old (see ticket" -CKA NO')[-4:] == [
        "-comment", "old (see ticket", "-CKA", "NO"]


def test_comments_blank_lines_and_continuations_keep_line_numbers():
    text = ("# header comment\n\nadd service a 10.0.0.1 HTTP 80   # trailing comment\n"
            "add cs policy p \\\n   -rule \"HTTP.REQ.URL.STARTSWITH(\"/x\") && \\\ntrue\"\r\n  # indented comment\n"
            "bind lb vserver l a\n")
    lines = logical_lines(text)
    assert [n for n, _ in lines] == [3, 4, 8]
    assert words(lines[0][1]) == ["add", "service", "a", "10.0.0.1", "HTTP", "80"]
    assert words(lines[1][1])[-1] == 'HTTP.REQ.URL.STARTSWITH("/x") && true'


@pytest.mark.parametrize("line", [
    'add cs policy p -rule "HTTP.REQ.URL.STARTSWITH("/x")',   # closing quote missing
    'add cs policy p -rule "abc',
    'add cs policy p -rule HTTP.REQ.URL.STARTSWITH("/x"',     # unquoted, parenthesis never closed
])
def test_unbalanced_quotes_are_errors(line):
    with pytest.raises(NsSyntaxError):
        tokenize(line)


# ============================================================================================
# Expressions: structure


U = "HTTP.REQ.URL"
EXPRESSIONS = {
    # rule -> expected easgate match
    "true": "any",
    f'{U}.STARTSWITH("/Microsoft-Server-ActiveSync")': {"path_prefix": "/Microsoft-Server-ActiveSync"},
    f'{U}.SET_TEXT_MODE(IGNORECASE).STARTSWITH("/autodiscover")': {"path_prefix": "/autodiscover", "ignore_case": True},
    'http.req.url.startswith("/lower-case-keywords")': {"path_prefix": "/lower-case-keywords"},
    'HTTP.REQ.HOSTNAME.EQ("mdm.example.com")': {"host": ["mdm.example.com"]},
    'HTTP.REQ.HOSTNAME.EQ("a.example.com") || HTTP.REQ.HOSTNAME.EQ("b.example.com")':
        {"host": ["a.example.com", "b.example.com"]},
    'HTTP.REQ.HEADER("X-Mdm").EXISTS': {"header_present": ["X-Mdm"]},
    'HTTP.REQ.HEADER("X-Mdm").EQ("enroll")': {"header_equals": {"X-Mdm": "enroll"}},
    "HTTP.REQ.METHOD.EQ(POST)": {"method": ["POST"]},
    f'CLIENT.SSL.CLIENT_CERT.EXISTS && {U}.STARTSWITH("/zdm")': {"client_cert": "present", "path_prefix": "/zdm"},
    f'CLIENT.SSL.CLIENT_CERT.EXISTS.NOT && {U}.STARTSWITH("/zdm")': {"client_cert": "absent", "path_prefix": "/zdm"},
    '!CLIENT.SSL.CLIENT_CERT.EXISTS': {"client_cert": "absent"},
    f'{U}.STARTSWITH("/x") && true': {"path_prefix": "/x"},
    f'{U}.STARTSWITH("/x") && false': None,
}


@pytest.mark.parametrize("rule", EXPRESSIONS)
def test_structured_translation(rule):
    assert to_match(parse_expr(rule)) == EXPRESSIONS[rule]


@pytest.mark.parametrize("rule", [
    f'{U}.STARTSWITH("/x").NOT',
    f'{U}.STARTSWITH("/a") || {U}.STARTSWITH("/b")',
    'HTTP.REQ.HEADER("User-Agent").CONTAINS("iPhone")',
    'HTTP.REQ.HEADER("X-Mdm").SET_TEXT_MODE(IGNORECASE).EQ("Enroll")',
    f'({U}.STARTSWITH("/a") && HTTP.REQ.HEADER("X").EXISTS) || HTTP.REQ.HOSTNAME.EQ("h.example").NOT',
    f'{U}.STARTSWITH("/q?x=1")',
    f'{U}.CONTAINS("Cmd=Ping")',
])
def test_the_rest_becomes_a_mitmproxy_filter_that_parses(rule):
    from mitmproxy import flowfilter

    m = to_match(parse_expr(rule))
    assert set(m) == {"filter"}
    flowfilter.parse(m["filter"])


def test_top_level_and_keeps_structured_keys_next_to_the_filter():
    m = to_match(parse_expr(f'{U}.STARTSWITH("/public").NOT && HTTP.REQ.HEADER("X-Not").EXISTS'))
    assert m["header_present"] == ["X-Not"] and m["filter"].startswith("!(~u ")


@pytest.mark.parametrize("rule, why", [
    ('HTTP.REQ.BODY(100).CONTAINS("x")', "unsupported expression"),
    (f'CLIENT.SSL.CLIENT_CERT.EXISTS || {U}.STARTSWITH("/open")', "CLIENT.SSL.CLIENT_CERT.EXISTS can only"),
    (f'{U}.STARTSWITH("/x"', "expected ')'"),
    (f'{U}.STARTSWITH("/x") &&', "expected"),
    (f'{U}.SET_TEXT_MODE(URLENCODED).STARTSWITH("/x")', "SET_TEXT_MODE"),
])
def test_untranslatable_expressions(rule, why):
    with pytest.raises(ExprError, match=why.replace("(", r"\(").replace(")", r"\)")):
        to_match(parse_expr(rule))


def test_reasoning_about_url_prefixes():
    sync = Atom("url", "startswith", "/Microsoft-Server-ActiveSync")
    # what reaches the catch-all behind the ActiveSync route never starts with its prefix
    assert decide(Not(sync), Not(sync)) is True
    assert decide(sync, Not(sync)) is False
    assert decide(Atom("url", "startswith", "/Microsoft-Server-ActiveSync/x"), sync) is True
    assert decide(Atom("url", "startswith", "/zdm"), Atom("url", "startswith", "/zdm/enroll")) is None
    assert simplify(parse_expr("true && (false || true)")) == Const(True)


# ============================================================================================
# Expressions: behaviour, through parse_config + the real Router

MINI = """\
add service svc_hit 10.0.0.1 HTTP 80
add service svc_miss 10.0.0.2 HTTP 80
add lb vserver lb_hit HTTP 0.0.0.0 0
add lb vserver lb_miss HTTP 0.0.0.0 0
bind lb vserver lb_hit svc_hit
bind lb vserver lb_miss svc_miss
add cs vserver cs SSL 192.0.2.10 443
bind ssl vserver cs -certkeyName gw
add cs policy p_hit -rule "{rule}"
add cs policy p_miss -rule true
bind cs vserver cs -policyName p_hit -targetLBVserver lb_hit -priority 100
bind cs vserver cs -policyName p_miss -targetLBVserver lb_miss -priority 200
"""


def flow(path="/", host="mail.example.test", method="GET", headers=()):
    f = tflow.tflow()
    f.request.method = method
    f.request.path = path
    f.request.headers["Host"] = host
    for k, v in headers:
        f.request.headers.add(k, v)
    return f


def routes_to(rule: str, pki: Path, tmp_path: Path):
    text, imp = import_netscaler(MINI.format(rule=rule), "mini.conf",
                                 Options(certs={"gw": (str(pki / "gateway-full.pem"), None)}))
    assert imp.reports == []
    router = Router(load(text, tmp_path))

    def hit(f, cert="none") -> bool:
        return router.select(request_view(f, cert), f).name == "p_hit"
    return hit


BEHAVIOUR = [
    (f'{U}.STARTSWITH("/Microsoft-Server-ActiveSync")',
     [flow("/Microsoft-Server-ActiveSync?Cmd=Sync"), flow("/Microsoft-Server-ActiveSyncX")],
     [flow("/microsoft-server-activesync"), flow("/x/Microsoft-Server-ActiveSync"), flow("/")]),
    (f'{U}.SET_TEXT_MODE(IGNORECASE).STARTSWITH("/microsoft-server-activesync")',
     [flow("/Microsoft-Server-ActiveSync"), flow("/MICROSOFT-SERVER-ACTIVESYNC?x")], [flow("/enroll")]),
    # .NOT: case-sensitive like NetScaler, the literal's "." is no wildcard, a query does not count
    (f'{U}.STARTSWITH("/a.b").NOT',
     [flow("/enroll"), flow("/axb"), flow("/A.b"), flow("/x?/a.b")],
     [flow("/a.b"), flow("/a.b/c?x=1"),
      flow("/enroll", host="evil/a.b")]),  # a Host header that would move the path boundary matches nothing
    (f'{U}.STARTSWITH("/a") || {U}.STARTSWITH("/b")',
     [flow("/a1"), flow("/b?x=1")], [flow("/c"), flow("/x/a"), flow("/c", host="a"), flow("/c", host="x/a")]),
    (f'{U}.STARTSWITH("/q?x=1")', [flow("/q?x=1&y=2")], [flow("/q?x=2"), flow("/q")]),
    (f'{U}.CONTAINS("Cmd=Ping")', [flow("/Microsoft-Server-ActiveSync?Cmd=Ping&DeviceId=1")],
     [flow("/", host="Cmd=Ping.example"), flow("/?Cmd=Sync")]),
    ('HTTP.REQ.HOSTNAME.EQ("mdm.example.com")',
     [flow(host="mdm.example.com"), flow(host="MDM.example.com:443")], [flow(host="mail.example.com")]),
    ('HTTP.REQ.HOSTNAME.EQ("a.example.com") || HTTP.REQ.HOSTNAME.EQ("b.example.com")',
     [flow(host="a.example.com"), flow(host="b.example.com")], [flow(host="c.example.com")]),
    ('HTTP.REQ.HOSTNAME.EQ("a.example.com").NOT',
     [flow(host="b.example.com"), flow(host="xa.example.com")], [flow(host="a.example.com"), flow(host="a.example.com:8443")]),
    ('HTTP.REQ.HEADER("X-Mdm").EXISTS', [flow(headers=[("x-mdm", "")])], [flow(), flow(headers=[("X-Mdmx", "1")])]),
    ('HTTP.REQ.HEADER("X-Mdm").EQ("enroll")', [flow(headers=[("X-Mdm", "enroll")])],
     [flow(headers=[("X-Mdm", "Enroll")]), flow(headers=[("X-Mdm", "enroll2")])]),
    ('HTTP.REQ.HEADER("X-Mdm").SET_TEXT_MODE(IGNORECASE).EQ("enroll")',
     [flow(headers=[("X-Mdm", "ENROLL")])], [flow(headers=[("X-Mdm", "enroll2")]), flow()]),
    ('HTTP.REQ.HEADER("User-Agent").CONTAINS("iPhone")',
     [flow(headers=[("User-Agent", "Apple-iPhone14C2/2008")])],
     [flow(headers=[("User-Agent", "apple-iphone")]), flow(headers=[("X-Other", "iPhone")])]),
    ('HTTP.REQ.HEADER("User-Agent").SET_TEXT_MODE(IGNORECASE).CONTAINS("iphone")',
     [flow(headers=[("User-Agent", "Apple-iPhone14C2")])], [flow(headers=[("User-Agent", "Android")])]),
    ("HTTP.REQ.METHOD.EQ(POST)", [flow(method="POST")], [flow(method="GET")]),
    (f'({U}.STARTSWITH("/c") && HTTP.REQ.HEADER("X-C").EXISTS) || HTTP.REQ.HOSTNAME.EQ("c.example.com").NOT',
     [flow("/c", host="c.example.com", headers=[("X-C", "1")]), flow("/z", host="d.example.com")],
     [flow("/c", host="c.example.com"), flow("/z", host="c.example.com", headers=[("X-C", "1")])]),
    ("true", [flow(), flow("/anything", host="x")], []),
]


@pytest.mark.parametrize("rule, hits, misses", BEHAVIOUR, ids=[b[0][:60] for b in BEHAVIOUR])
def test_translated_rule_routes_like_netscaler(rule, hits, misses, pki, tmp_path):
    hit = routes_to(rule, pki, tmp_path)
    for f in hits:
        assert hit(f), f"{rule} should match {f.request.method} {f.request.host_header} {f.request.path}"
    for f in misses:
        assert not hit(f), f"{rule} should not match {f.request.method} {f.request.host_header} {f.request.path}"


def test_client_certificate_conditions_route_by_verdict(pki, tmp_path):
    hit = routes_to(f'CLIENT.SSL.CLIENT_CERT.EXISTS && {U}.STARTSWITH("/zdm")', pki, tmp_path)
    assert hit(flow("/zdm/enroll"), "verified") and not hit(flow("/zdm/enroll"), "none")
    assert not hit(flow("/other"), "verified")
    hit = routes_to(f'CLIENT.SSL.CLIENT_CERT.EXISTS.NOT && {U}.STARTSWITH("/zdm")', pki, tmp_path)
    assert hit(flow("/zdm"), "none") and not hit(flow("/zdm"), "verified")


def test_expressions_fixture_imports_cleanly(pki, tmp_path):
    text, imp = import_file(FIX / "netscaler" / "expressions.conf", pki, pool_ca={"lb_b": str(pki / "internal-ca.pem")})
    assert imp.reports == []
    cfg = load(text, tmp_path)
    assert [r.name for r in cfg.routes][:3] == ["p_prefix", "p_icase", "p_not"]
    assert cfg.routes[-1].name == "p_true" and cfg.routes[-1].match.any
    assert cfg.pools["lb_a"].servers[0].url == "http://10.0.0.1:80"  # via `add server`
    assert cfg.pools["lb_b"].servers[0].url == "https://10.0.0.2:443" and cfg.pools["lb_b"].ca
    assert cfg.tls.client_certs.mode == "optional"
    router = Router(cfg)
    pick = lambda f, cert="none": router.select(request_view(f, cert), f).name
    assert pick(flow("/Microsoft-Server-ActiveSync?Cmd=Sync")) == "p_prefix"
    assert pick(flow("/AutoDiscover/x.xml")) == "p_icase"
    assert pick(flow("/zdm", headers=[("X-Not", "1")])) == "p_not"
    assert pick(flow("/public", host="c.example.com", headers=[("X-Not", "1")])) == "p_true"
    assert pick(flow("/public", headers=[("X-Not", "1")])) == "p_nested"  # its host test .NOT
    assert pick(flow("/zdm/enroll"), "verified") == "p_cert"
    assert pick(flow("/zdm/enroll")) == "p_nocert"
    assert pick(flow("/q?x=1", host="c.example.com")) == "p_query"


def test_quoting_fixture(pki, tmp_path):
    text, imp = import_file(FIX / "netscaler" / "quoting.conf", pki)
    cfg = load(text, tmp_path)
    by = {r.name: r for r in cfg.routes}
    assert by["p_escaped"].match.path_prefix == "/escaped"
    assert by["p_continued"].match.path_prefix == "/continued" and "a b \\\\(c" in by["p_continued"].match.filter
    assert by["p_unquoted"].match.path_prefix == "/unquoted"
    assert cfg.default_route == "cs_default" and by["cs_default"].pool == "lb_a"
    assert cfg.authorization.connector.url == "http://10.0.0.9:9080/services/ActiveSync/Authorize"
    # the standard XNC parameters in another spelling are not reported; the Host header is
    reports = sorted(imp.reports, key=lambda r: r.line)
    assert [(r.line, r.message.split(":")[0]) for r in reports] == [(24, "httpCallout xnc"), (25, "httpCallout xnc")]
    assert "no route carries only /Microsoft-Server-ActiveSync" in reports[0].message
    assert "-hostExpr" in reports[1].message


# ============================================================================================
# Error cases: reported on stderr with the line, mentioned in the output, exit status 1


def reported(result: subprocess.CompletedProcess, path: Path) -> dict[int, list[str]]:
    out: dict[int, list[str]] = {}
    for line in result.stderr.splitlines():
        prefix = f"{path}:"
        if line.startswith(prefix) and ": not translated: " in line:
            no, _, msg = line[len(prefix):].partition(": not translated: ")
            out.setdefault(int(no), []).append(msg)
    return out


def test_unknown_commands_are_reported_with_their_line(tmp_path):
    path = FIX / "netscaler" / "unknown-command.conf"
    r = run_cli("import-netscaler", str(path), "--cert", "gw=/dev/null")
    assert r.returncode == 3  # the responder policy DROPs what easgate lets through
    rep = reported(r, path)
    assert sorted(rep) == [10]
    assert rep[10][0].startswith("unknown command 'add rewrite action'")
    assert f"{path}:8: weaker: responder policy pol_block" in r.stderr
    assert "#   line 10: unknown command 'add rewrite action'" in r.stdout
    yaml.safe_load(r.stdout)  # still a YAML document


def test_a_rule_with_an_unfilled_placeholder_is_not_guessed(pki, tmp_path):
    conf = MINI.format(rule='HTTP.REQ.HOSTNAME.EQ("[PUBLIC-FQDN]")')
    text, imp = import_netscaler(conf, "p.conf", Options(certs={"gw": (str(pki / "gateway-full.pem"), None)}))
    assert [(r.line, r.message) for r in imp.reports] == [
        (9, "cs policy p_hit: the rule still contains [PUBLIC-FQDN]: import again with --set PUBLIC-FQDN=VALUE")]
    text, imp = import_netscaler(conf, "p.conf", Options(sets={"PUBLIC-FQDN": "mail.example.com"},
                                                         certs={"gw": (str(pki / "gateway-full.pem"), None)}))
    assert imp.reports == [] and load(text, tmp_path).route("p_hit").match.hosts == ("mail.example.com",)


def test_unbalanced_quote(pki, tmp_path):
    text, imp = import_file(FIX / "netscaler" / "unbalanced-quote.conf", pki)
    assert [(r.line, r.message.split(":")[0]) for r in imp.reports] == [
        (6, "unbalanced quote starting at column 30"), (8, "bind cs vserver cs")]
    cfg = load(text, tmp_path)
    assert [r.name for r in cfg.routes] == ["p_all"]  # the broken policy is left out, visibly
    assert "(route p_broken left out" not in text  # it never got as far as a route
    assert "line 6: unbalanced quote" in text


def test_unknown_lb_vserver_target(pki, tmp_path):
    text, imp = import_file(FIX / "netscaler" / "unknown-lb-target.conf", pki)
    assert {r.line: r.message for r in imp.reports} == {
        4: "bind lb vserver: no lb vserver named 'lb_typo'",
        9: "bind cs vserver cs -policyName p_sync: no lb vserver named 'lb_exchange_typo'",
    }
    assert [r.name for r in load(text, tmp_path).routes] == ["p_all"]


def test_unsupported_options_expressions_revocation_and_callout(pki, tmp_path):
    text, imp = import_file(FIX / "netscaler" / "unsupported.conf", pki)
    rep: dict[int, list[str]] = {}
    for r in imp.reports:
        rep.setdefault(r.line, []).append(r.message)
    assert sorted(rep) == [2, 4, 11, 12, 13, 22, 23]
    assert any("-usip YES" in m for m in rep[2]) and any("-cip ENABLED X-Forwarded-For" in m for m in rep[2])
    assert "-persistenceType COOKIEINSERT" in rep[4][0]
    assert "-crlCheck Mandatory but no `add ssl crl" in rep[11][0]
    assert "unsupported expression: HTTP.REQ.BODY(100)" in rep[12][0]
    assert "CLIENT.SSL.CLIENT_CERT.EXISTS can only be combined with &&" in rep[13][0]
    assert "covers only part of route p_zdm" in rep[22][0]
    callout = " | ".join(rep[23])
    for needle in ("-httpMethod POST", 'user(HTTP.REQ.HEADER("X-User")) differs', 'tenant("contoso") is not an XNC',
                   "agent, ip, url, DeviceId are missing", "no route carries only"):
        assert needle in callout
    cfg = load(text, tmp_path)
    assert cfg.tls.client_certs.mode == "required"
    assert [r.name for r in cfg.routes] == ["p_zdm", "p_all"]
    assert cfg.route("p_zdm").client_cert_header is None
    # the ssl policy never holds on the catch-all behind /zdm: no header there either
    assert cfg.route("p_all").client_cert_header is None


def test_exit_status_and_unreadable_input(tmp_path):
    clean = tmp_path / "clean.conf"
    clean.write_text(MINI.format(rule="true"))
    r = run_cli("import-netscaler", str(clean), "--cert", "gw=/x.pem", "-o", str(tmp_path / "out.yaml"))
    assert r.returncode == 0 and r.stdout == "" and "not translated" not in r.stderr
    assert "certificate: /x.pem" in (tmp_path / "out.yaml").read_text()
    assert run_cli("import-netscaler", str(tmp_path / "missing.conf")).returncode == 2
    assert run_cli("import-netscaler", str(tmp_path)).returncode == 2
    binary = tmp_path / "ns.tgz"
    binary.write_bytes(b"\x1f\x8b\x08\x00\x00\x00\xff\xfe")
    r = run_cli("import-netscaler", str(binary))
    assert r.returncode == 2 and "not a text file" in r.stderr
    r = run_cli("import-netscaler", str(POC), "--set", "NO-SUCH-PLACEHOLDER=1", "--service", "0303_typo=x:1",
                "--pool-ca", "1203_lb_vs_mdm_exchang=ca.pem", "--cert", "CA_Typo=x.pem")
    assert r.returncode == 2 and r.stdout == ""
    for msg in ("--set NO-SUCH-PLACEHOLDER: no such [PLACEHOLDER]", "--service 0303_typo: no such service",
                "--pool-ca 1203_lb_vs_mdm_exchang: no such lb vserver", "--cert CA_Typo: no such certkey"):
        assert msg in r.stderr


# ============================================================================================
# The PoC fixture


POC_REPORTED = {
    10: "lb vserver 1201_lb_vs_mdm_80 listens on its own address",
    11: "lb vserver 1202_lb_vs_mdm_8443 listens on its own address",
    37: 'httpCallout httpCalloutXNC: -hostExpr "callout.asfilter.internal"',
}



def test_poc_without_values_marks_every_placeholder():
    text, imp = import_netscaler(POC.read_text(), str(POC))
    assert {r.line: r.message[:len(POC_REPORTED.get(r.line, ""))] for r in imp.reports} == POC_REPORTED
    for v in ("FILL-IN-PUBLIC-IP", "https://FILL-IN-EXCHANGESERVER-IP:443", "http://FILL-IN-DEVICEMANAGER-FQDN:80",
              "http://FILL-IN-XNCSERVER-IP:9080/services/ActiveSync/Authorize",
              "FILL-IN-CERTKEY-PUBLICCERTIFICATE-NAME.pem", "FILL-IN-CERTKEY-CA_XenMobile_Device_CA.pem"):
        line = next(l for l in text.splitlines() if v in l and not l.lstrip().startswith("#"))
        assert "# FILL IN" in line, line
    assert imp.fill_in >= {"PUBLIC-IP", "EXCHANGESERVER-IP", "XNCSERVER-IP", "DEVICEMANAGER-FQDN"}
    values = "".join(l.partition(" #")[0] for l in text.splitlines() if not l.lstrip().startswith("#"))
    assert "[" not in values  # no [PLACEHOLDER] survives as a value


def test_poc_routes_like_the_hand_written_gateway_yaml():
    """Same routes, guards and fail mode decisions as policies/gateway.yaml (pool names aside)."""
    text, _ = import_netscaler(POC.read_text(), str(POC))
    got = yaml.safe_load(text)
    want = yaml.safe_load((ROOT / "policies" / "gateway.yaml").read_text())

    def shape(doc):
        return [(r["priority"], r["match"], r.get("authorize"), r.get("client_cert_header"),
                 urlscheme(doc["pools"][r["pool"]]["servers"][0])) for r in doc["routes"]]

    def urlscheme(u):
        return u.split(":")[0]
    assert shape(got) == shape(want)
    assert got["tls"]["client_certs"]["mode"] == want["tls"]["client_certs"]["mode"] == "optional"
    assert len(got["tls"]["client_certs"]["ca"]) == 2
    assert got["authorization"]["connector"]["url"].endswith(":9080/services/ActiveSync/Authorize")
    assert got["authorization"]["on_connector_error"] == "allow"  # Citrix's fail-open, with a loud comment
    assert "RECOMMENDED: on_connector_error: deny" in text


def test_poc_imports_checks_and_behaves_like_netscaler(pki, exchange, mdm, connector, start_gateway, tmp_path):
    out = tmp_path / "from-netscaler.yaml"
    r = run_cli(
        "import-netscaler", str(POC), "-o", str(out),
        "--set", "PUBLIC-IP=127.0.0.1", "--set", "EXCHANGESERVER-IP=127.0.0.1",
        "--set", "DEVICEMANAGER-FQDN=127.0.0.1", "--set", "XNCSERVER-IP=127.0.0.1",
        "--set", "PUBLICCERTIFICATE-NAME=gateway-full", "--certs", str(pki),  # -> pki/gateway-full.pem
        "--cert", f"CA_XenMobile_Device_CA={pki / 'device-ca.pem'}",
        "--cert", f"CA_XenMobile_Root_CA={pki / 'root-ca.pem'}",
        "--service", f"0303_lb_sv_exchange=127.0.0.1:{exchange.port}",
        "--service", f"0301_lb_sv_mdm=127.0.0.1:{mdm.port}",
        "--service", f"0304_lb_sv_xnc=127.0.0.1:{connector.server_address[1]}",
        "--pool-ca", f"1203_lb_vs_mdm_exchange={pki / 'internal-ca.pem'}",
        "--pool-sni", "1203_lb_vs_mdm_exchange=exchange.internal",
    )
    assert r.returncode == 1, r.stderr  # the listeners and -hostExpr are reported
    rep = reported(r, POC)
    assert {n: m[0][:len(POC_REPORTED[n])] for n, m in rep.items()} == POC_REPORTED
    text = out.read_text()
    # -ocspCheck Optional on both CA bindings: revocation checked, an unreachable responder tolerated
    assert text.count("revocation: optional}") == 2
    assert "FILL-IN" not in text and "FILL IN" not in text

    chk = run_cli("check", str(out))
    assert chk.returncode == 0, chk.stderr
    assert "authorize=activesync" in chk.stdout and "cert header NSClientCert" in chk.stdout

    g = start_gateway(out)
    iphone, ipad = "ApplF17ABCDEF01", "ApplDMPQ99887766"
    connector.allowed = {iphone}
    basic = {"Authorization": "Basic " + base64.b64encode(b"CONTOSO\\alice:secret").decode(),
             "User-Agent": "Apple-iPhone14C2/2008.420", "MS-ASProtocolVersion": "16.1"}

    def sync(dev):
        return f"/Microsoft-Server-ActiveSync?Cmd=Sync&User=alice&DeviceId={dev}&DeviceType=iPhone"

    # ActiveSync from an allowed device reaches Exchange (the connector was asked) ...
    ok = request(g.port, "POST", sync(iphone), pki, headers=basic, body=b"\x03\x01\x6a\x00", cert="device-iphone")
    assert ok.status == 200 and ok.headers["X-Upstream"] == "exchange"
    # ... a denied device gets 403 and never reaches it
    no = request(g.port, "POST", sync(ipad), pki, headers=basic, body=b"\x03\x01\x6a\x00")
    assert no.status == 403
    posts = [s for s in exchange.requests() if s["method"] == "POST"]
    assert len(posts) == 1 and iphone in posts[0]["path"]
    assert [c["DeviceId"] for c in connector.calls] == [iphone, ipad]
    # the ssl policy's URL condition: no certificate header on ActiveSync, even with a device cert
    assert not any(k.lower() == "nsclientcert" for k, _ in posts[0]["headers"])

    # MDM: the verified device certificate arrives as NSClientCert; without a cert there is none
    with_cert = request(g.port, "GET", "/zdm/enroll", pki, cert="device-iphone")
    assert with_cert.status == 200 and with_cert.json()["upstream"] == "mdm"
    assert with_cert.json()["NSClientCert"] == cert_b64_der(load_cert(pki / "device-iphone.pem"))
    without = request(g.port, "GET", "/zdm/enroll", pki, headers={"NSClientCert": "forged"})
    assert without.status == 200 and without.json()["NSClientCert"] is None


def test_a_public_ip_of_every_address_keeps_the_lb_vserver_reports(tmp_path):
    """`--set PUBLIC-IP=0.0.0.0` (listen on every address) must not hide that the MDM lb vservers
    listen on their own ports (lines 10 and 11 of the PoC): 0.0.0.0 with a port is addressable."""
    r = subprocess.run([*easgate_argv(), "import-netscaler", str(POC), "--set", "PUBLIC-IP=0.0.0.0"],
                       capture_output=True, text=True, timeout=60, cwd=ROOT)
    for line in (10, 11):
        assert f":{line}:" in r.stderr and "listens on its own address 0.0.0.0" in r.stderr, r.stderr
