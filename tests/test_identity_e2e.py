"""Identity the gateway can trust, end to end through real gateway processes: device binding to the
client certificate, users from the certificate and from Bearer JWTs, NTLM's unknown user,
Autodiscover and redirect rewriting. Real TLS with the demo PKI's device certificates (which carry
the DeviceId in a SAN URI and the UPN in a SAN otherName), a real JWKS over HTTP on loopback."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import subprocess
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

import conftest
from conftest import request

IPHONE = "ApplF17ABCDEF01"  # device-iphone.pem: alice@example.test
IPAD = "ApplDMPQ99887766"  # device-ipad.pem: alice@example.test
ANDROID = "androidc1234567890"  # device-android.pem: bob@contoso.com
ISSUER = "https://sts.example.test/adfs"
AUDIENCE = "https://mail.example.test"
UA = {"User-Agent": "Apple-iPhone15C2/2101.100", "MS-ASProtocolVersion": "16.1"}

POLICY = {
    "mode": "block",
    "inventory": [{"device_id": IPHONE, "owner": "alice", "compliant": True},
                  {"device_id": IPAD, "owner": "alice", "compliant": True},
                  {"device_id": ANDROID, "owner": "bob", "compliant": True}],
}
BINDING = {"device_id": {"from": "san_uri", "pattern": "urn:easgate:device:(.+)"},
           "user": "san_upn", "user_match": "account"}


def basic(user: str) -> dict:
    return {"Authorization": "Basic " + base64.b64encode(f"{user}:secret".encode()).decode(), **UA}


def sync(device: str, user: str = "alice") -> str:
    return f"/Microsoft-Server-ActiveSync?Cmd=Sync&User={user}&DeviceId={device}&DeviceType=iPhone"


def audit(tmp_path) -> list[dict]:
    p = tmp_path / "audit.jsonl"
    return [json.loads(line) for line in p.read_text().splitlines()] if p.exists() else []


def posts(exchange) -> list[str]:
    return [r["path"] for r in exchange.requests() if r["method"] == "POST"]


def config(pki, exchange, mdm, tmp_path, **auth) -> dict:
    auth.setdefault("cache", {"allow_ttl_s": 300, "deny_ttl_s": 0})
    return conftest.authz_config(pki, exchange, mdm, tmp_path, policy=POLICY, **auth)


# ---------------------------------------------------------------------------------------------
# A throw-away identity provider: an EC key, its JWKS (file and URL), tokens


class Idp:
    def __init__(self, tmp_path) -> None:
        self.key = ec.generate_private_key(ec.SECP256R1())
        jwk = json.loads(jwt.algorithms.ECAlgorithm.to_jwk(self.key.public_key()))
        jwk.update(kid="k1", use="sig", alg="ES256")
        self.jwks = {"keys": [jwk]}
        self.file = tmp_path / "jwks.json"
        self.file.write_text(json.dumps(self.jwks))

    def token(self, user: str = "alice@example.test", *, aud: str = AUDIENCE, iss: str = ISSUER,
              exp_in: int = 600, kid: str = "k1", key=None, alg: str = "ES256", claim: str = "upn") -> str:
        now = int(time.time())
        return jwt.encode({claim: user, "iss": iss, "aud": aud, "iat": now, "exp": now + exp_in},
                          key or self.key, algorithm=alg, headers={"kid": kid})


class JwksServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, doc: dict) -> None:
        super().__init__(("127.0.0.1", 0), _JwksHandler)
        self.doc, self.hits = doc, 0
        threading.Thread(target=self.serve_forever, daemon=True).start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}/adfs/discovery/keys"


class _JwksHandler(BaseHTTPRequestHandler):
    def log_message(self, *a) -> None:
        pass

    def do_GET(self) -> None:
        self.server.hits += 1
        body = json.dumps(self.server.doc).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


def hs256_with_public_key(idp: Idp) -> str:
    """The classic attack: an HS256 token whose HMAC secret is the provider's public key (PyJWT itself
    refuses to make one, so it is put together by hand)."""
    def b64(data: bytes) -> str:
        return base64.urlsafe_b64encode(data).rstrip(b"=").decode()
    secret = idp.key.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    head = b64(json.dumps({"alg": "HS256", "typ": "JWT", "kid": "k1"}).encode())
    body = b64(json.dumps({"upn": "alice@example.test", "iss": ISSUER, "aud": AUDIENCE,
                           "exp": int(time.time()) + 600}).encode())
    sig = hmac.new(secret, f"{head}.{body}".encode(), hashlib.sha256).digest()
    return f"{head}.{body}.{b64(sig)}"


@pytest.fixture
def idp(tmp_path) -> Idp:
    return Idp(tmp_path)


def bearer_identity(idp: Idp, jwks: str | None = None, user_from=("bearer", "certificate", "basic")) -> dict:
    return {"user_from": list(user_from), "user_match": "account",
            "bearer": {"jwks": jwks or str(idp.file), "issuer": ISSUER, "audience": AUDIENCE,
                       "algorithms": ["ES256"], "user_claim": "upn"}}


# ---------------------------------------------------------------------------------------------
# Device binding


def test_device_binding_copied_device_id_is_denied(start_gateway, pki, exchange, mdm, tmp_path):
    g = start_gateway(config(pki, exchange, mdm, tmp_path, device_binding=BINDING))
    # the iPhone with its own certificate
    assert request(g.port, "POST", sync(IPHONE), pki, cert="device-iphone", headers=basic("CONTOSO\\alice")).status == 200
    # the iPhone's DeviceId copied onto the iPad (which has a certificate of its own)
    r = request(g.port, "POST", sync(IPHONE), pki, cert="device-ipad", headers=basic("alice"))
    assert r.status == 403
    # no certificate at all on a bound route
    assert request(g.port, "POST", sync(IPHONE), pki, headers=basic("alice")).status == 403
    # the right certificate, another user than the one it names
    assert request(g.port, "POST", sync(IPHONE, "mallory"), pki, cert="device-iphone",
                   headers=basic("mallory")).status == 403
    assert posts(exchange) == [sync(IPHONE)]
    log = audit(tmp_path)
    assert [entry["decision"] for entry in log] == ["allow", "deny", "deny", "deny"]
    assert log[1]["reason"] == ("device binding: DeviceId ApplF17ABCDEF01 does not match the certificate's "
                                "ApplDMPQ99887766 (san_uri)")
    assert log[2]["reason"].startswith("device binding: no verified client certificate")
    assert log[3]["reason"] == ("device binding: user mallory does not match the certificate's alice@example.test "
                                "(san_upn, account match)")
    assert {entry["source"] for entry in log[1:]} == {"identity"}


def test_device_binding_per_route_and_cn_place(start_gateway, pki, exchange, mdm, tmp_path):
    """A route may bind on its own terms (here the subject CN) or turn the default off."""
    cfg = config(pki, exchange, mdm, tmp_path, device_binding=BINDING)
    cfg["routes"][0]["device_binding"] = {"device_id": "subject_cn"}
    cfg["routes"].insert(0, {"name": "legacy", "priority": 90, "pool": "exchange", "authorize": "activesync",
                             "match": {"path_prefix": "/Microsoft-Server-ActiveSync", "header_present": "X-Legacy"},
                             "device_binding": False})
    g = start_gateway(cfg)
    assert request(g.port, "POST", sync(IPAD), pki, cert="device-ipad", headers=basic("bob")).status == 403  # owner
    assert request(g.port, "POST", sync(IPAD), pki, cert="device-ipad", headers=basic("alice")).status == 200
    assert request(g.port, "POST", sync(IPAD), pki, cert="device-iphone", headers=basic("alice")).status == 403
    # binding off on the legacy route: the DeviceId is taken as the phone says it
    legacy = {**basic("alice"), "X-Legacy": "1"}
    assert request(g.port, "POST", sync(IPAD), pki, cert="device-iphone", headers=legacy).status == 200
    reasons = [entry["reason"] for entry in audit(tmp_path)]
    assert "subject_cn" in reasons[2] and "does not match" in reasons[2]


def test_connector_callout_gets_the_certificate_identity(start_gateway, pki, exchange, mdm, tmp_path, connector):
    connector.allowed = {IPHONE}
    cfg = conftest.authz_config(pki, exchange, mdm, tmp_path, connector=connector, device_binding=BINDING,
                                identity={"user_from": ["certificate", "basic"], "user_match": "account"})
    g = start_gateway(cfg)
    assert request(g.port, "POST", sync(IPHONE), pki, cert="device-iphone", headers=basic("alice")).status == 200
    assert len(connector.calls) == 1
    call = connector.calls[0]
    assert (call["user"], call["DeviceId"], call["certDeviceId"], call["certUser"], call["userSource"]) == (
        "alice@example.test", IPHONE, IPHONE, "alice@example.test", "certificate")
    # a copied DeviceId never reaches the connector
    assert request(g.port, "POST", sync(IPHONE), pki, cert="device-ipad", headers=basic("alice")).status == 403
    assert len(connector.calls) == 1


# ---------------------------------------------------------------------------------------------
# Users beyond Basic


def test_certificate_user_without_any_authorization_header(start_gateway, pki, exchange, mdm, tmp_path):
    cfg = config(pki, exchange, mdm, tmp_path, identity={"user_from": ["certificate"]})
    g = start_gateway(cfg)
    r = request(g.port, "POST", sync(ANDROID, "somebody"), pki, cert="device-android", headers=UA)
    assert r.status == 200
    r = request(g.port, "POST", sync(ANDROID, "bob"), pki, headers=UA)  # no certificate: no user
    assert r.status == 403
    log = audit(tmp_path)
    assert (log[0]["user"], log[0]["decision"]) == ("bob@contoso.com", "allow")
    assert log[1]["reason"] == "request has no user (identity.user_from: [certificate])"


def test_ntlm_user_is_unknown_and_user_parameter_not_trusted(start_gateway, pki, exchange, mdm, tmp_path):
    g = start_gateway(config(pki, exchange, mdm, tmp_path))  # default user_from: [basic, query]
    ntlm = {"Authorization": "NTLM TlRMTVNTUAABAAAAB4IIogAAAAAAAAAAAAAAAAAAAAAKAF1YAAAADw==", **UA}
    r = request(g.port, "POST", sync(IPHONE), pki, headers=ntlm)
    assert r.status == 403
    # the same request with no Authorization header at all: User= counts (listed as `query`)
    assert request(g.port, "POST", sync(IPHONE), pki, headers=UA).status == 200
    reason = audit(tmp_path)[0]["reason"]
    assert reason.startswith("user unknown to the gateway: the request authenticates with NTLM, which only "
                             "Exchange checks; its User= parameter is not trusted")
    assert posts(exchange) == [sync(IPHONE)]


def test_bearer_user_allowed_and_token_for_another_user_denied(start_gateway, pki, exchange, mdm, tmp_path, idp):
    cfg = config(pki, exchange, mdm, tmp_path, device_binding=BINDING, identity=bearer_identity(idp))
    g = start_gateway(cfg)

    def with_token(token: str, cert: str = "device-iphone", device: str = IPHONE):
        return request(g.port, "POST", sync(device), pki, cert=cert, headers={"Authorization": f"Bearer {token}", **UA})

    assert with_token(idp.token("alice@example.test")).status == 200
    assert with_token(idp.token("bob@contoso.com")).status == 403  # the token is bob's, the certificate alice's
    assert with_token(idp.token("bob@contoso.com"), cert="device-android", device=ANDROID).status == 200
    assert with_token(idp.token(exp_in=-3600)).status == 403
    assert with_token(idp.token(aud="https://other.example")).status == 403
    assert with_token(idp.token(iss="https://evil.example")).status == 403
    assert with_token(idp.token(key=ec.generate_private_key(ec.SECP256R1()))).status == 403  # forged signature
    assert with_token(idp.token(kid="unknown")).status == 403
    assert with_token(hs256_with_public_key(idp)).status == 403  # algorithm confusion: not allowed
    assert with_token("not-a-jwt").status == 403
    log = audit(tmp_path)
    assert [(entry["decision"], entry["user"]) for entry in log[:3]] == [
        ("allow", "alice@example.test"), ("deny", "alice"), ("allow", "bob@contoso.com")]  # deny: the User= claim
    reasons = [entry["reason"] for entry in log]
    assert reasons[1] == ("device binding: user bob@contoso.com does not match the certificate's alice@example.test "
                          "(san_upn, account match)") or reasons[1].startswith("the user sources disagree")
    assert reasons[3:] == [
        "bearer token expired",
        "bearer token audience is not identity.bearer.audience",
        "bearer token issuer is not identity.bearer.issuer",
        "bearer token signature does not verify",
        "bearer token names key id 'unknown' not in the JWKS",
        "bearer token algorithm 'HS256' is not allowed (identity.bearer.algorithms)",
        "bearer token is not a JWT",
    ]
    assert len(posts(exchange)) == 2


def test_bearer_disagreeing_with_basic_is_denied(start_gateway, pki, exchange, mdm, tmp_path, idp):
    cfg = config(pki, exchange, mdm, tmp_path, identity=bearer_identity(idp, user_from=("bearer", "basic")))
    g = start_gateway(cfg)
    # Two Authorization headers of different schemes are already refused; a Bearer token with a
    # certificate user of another person is the realistic disagreement (above). Here: a token
    # whose user claim is missing, and one for alice with no certificate needed.
    ok = request(g.port, "POST", sync(IPHONE), pki, headers={"Authorization": f"Bearer {idp.token()}", **UA})
    assert ok.status == 200
    no_claim = idp.token(claim="email")
    r = request(g.port, "POST", sync(IPHONE), pki, headers={"Authorization": f"Bearer {no_claim}", **UA})
    assert r.status == 403
    assert audit(tmp_path)[1]["reason"] == "bearer token has none of the user claims upn"


def test_certificate_and_basic_disagree(start_gateway, pki, exchange, mdm, tmp_path):
    cfg = config(pki, exchange, mdm, tmp_path, identity={"user_from": ["certificate", "basic"], "user_match": "account"})
    g = start_gateway(cfg)
    assert request(g.port, "POST", sync(IPHONE), pki, cert="device-iphone", headers=basic("CONTOSO\\alice")).status == 200
    assert request(g.port, "POST", sync(IPHONE), pki, cert="device-iphone", headers=basic("bob")).status == 403
    assert audit(tmp_path)[1]["reason"] == "the user sources disagree: certificate says alice@example.test, basic says bob"


def test_bearer_jwks_url_fetched_once_and_refetched_for_a_new_key(start_gateway, pki, exchange, mdm, tmp_path, idp):
    server = JwksServer(idp.jwks)
    try:
        ident = bearer_identity(idp, jwks=server.url, user_from=("bearer",))
        ident["bearer"]["min_refresh_s"] = 0
        g = start_gateway(config(pki, exchange, mdm, tmp_path, identity=ident))
        for _ in range(3):
            r = request(g.port, "POST", sync(IPHONE), pki, headers={"Authorization": f"Bearer {idp.token()}", **UA})
            assert r.status == 200
        assert server.hits == 1  # cached
        # the provider rotates: a new key id is fetched on first sight
        new_key = ec.generate_private_key(ec.SECP256R1())
        jwk = json.loads(jwt.algorithms.ECAlgorithm.to_jwk(new_key.public_key()))
        jwk.update(kid="k2", use="sig", alg="ES256")
        server.doc = {"keys": [*idp.jwks["keys"], jwk]}
        r = request(g.port, "POST", sync(IPHONE), pki,
                    headers={"Authorization": f"Bearer {idp.token(kid='k2', key=new_key)}", **UA})
        assert r.status == 200
        assert server.hits == 2
    finally:
        server.shutdown()
        server.server_close()


# ---------------------------------------------------------------------------------------------
# Autodiscover and redirects


def autodiscover_config(pki, exchange, mdm, tmp_path) -> dict:
    cfg = config(pki, exchange, mdm, tmp_path)
    rewrite = {"public_hosts": [conftest.HOSTNAME]}
    cfg["routes"][0]["rewrite_redirects"] = rewrite
    cfg["routes"][:0] = [
        {"name": "autodiscover-xml", "priority": 50, "pool": "exchange", "rewrite_redirects": rewrite,
         "match": {"path_prefix": "/autodiscover/autodiscover.xml", "ignore_case": True}},
        {"name": "autodiscover-json", "priority": 51, "pool": "exchange", "rewrite_redirects": rewrite,
         "match": {"path_prefix": "/autodiscover/autodiscover.json", "ignore_case": True},
         "client_cert_header": "NSClientCert"},
    ]
    return cfg


def test_autodiscover_answers_never_name_the_internal_host(start_gateway, pki, exchange, mdm, tmp_path):
    g = start_gateway(autodiscover_config(pki, exchange, mdm, tmp_path))
    public = f"https://{conftest.HOSTNAME}:{g.port}/Microsoft-Server-ActiveSync"
    req = (b'<?xml version="1.0" encoding="utf-8"?><Autodiscover xmlns="http://schemas.microsoft.com/exchange/'
           b'autodiscover/mobilesync/requestschema/2006"><Request><EMailAddress>alice@example.test</EMailAddress>'
           b'<AcceptableResponseSchema>http://schemas.microsoft.com/exchange/autodiscover/mobilesync/responseschema/'
           b'2006</AcceptableResponseSchema></Request></Autodiscover>')
    r = request(g.port, "POST", "/autodiscover/autodiscover.xml", pki, body=req,
                headers={"Content-Type": "text/xml", **basic("alice")})
    assert r.status == 200 and r.headers["X-Upstream"] == "exchange"
    text = r.body.decode()
    assert "exchange.internal" not in text
    assert f"<Url>{public}</Url>" in text and f"<Name>{public}</Name>" in text
    # schema URLs are left alone: only hosts that are not public are rewritten
    assert "http://schemas.microsoft.com/exchange/autodiscover/responseschema/2006" in text
    # the JSON form, with a device certificate (the header is optional there) and without
    for cert in ("device-iphone", None):
        r = request(g.port, "GET", "/AutoDiscover/autodiscover.json?Email=alice@example.test&Protocol=ActiveSync",
                    pki, cert=cert)
        assert r.status == 200 and r.json() == {"Protocol": "ActiveSync", "Url": public}
    # no EAS authorization on these routes: nothing in the audit log
    assert audit(tmp_path) == []


def test_451_x_ms_location_is_rewritten(start_gateway, pki, exchange, mdm, tmp_path):
    exchange.moved = {IPHONE}
    try:
        cfg = autodiscover_config(pki, exchange, mdm, tmp_path)
        cfg["pools"]["exchange"]["host_header"] = "upstream"  # the client's Host is still where redirects point
        g = start_gateway(cfg)
        r = request(g.port, "POST", sync(IPHONE), pki, headers=basic("alice"))
        assert r.status == 451
        assert r.headers["X-MS-Location"] == f"https://{conftest.HOSTNAME}:{g.port}/Microsoft-Server-ActiveSync"
    finally:
        exchange.moved = set()


# ---------------------------------------------------------------------------------------------
# Bad identity configuration: one line naming file, key and fix


def _bad_identity(pki, exchange, mdm, tmp_path, case: str) -> tuple[dict, str, str]:
    idp = Idp(tmp_path)
    cfg = config(pki, exchange, mdm, tmp_path)
    auth = cfg["authorization"]
    if case == "place":
        auth["device_binding"] = {"device_id": "san_url"}
        return cfg, "authorization.device_binding.device_id", "'san_url' is not a place"
    if case == "pattern":
        auth["device_binding"] = {"device_id": {"from": "san_uri", "pattern": "urn:easgate:device:.+"}}
        return cfg, "authorization.device_binding.device_id.pattern", "has 0 groups"
    if case == "certs off":
        cfg["tls"]["client_certs"] = {"mode": "off"}
        auth["device_binding"] = BINDING
        return cfg, "authorization.device_binding", "needs client certificates"
    if case == "source":
        auth["identity"] = {"user_from": ["basic", "kerberos"]}
        return cfg, "authorization.identity.user_from[1]", "'kerberos' is not a user source"
    if case == "hs256":
        auth["identity"] = bearer_identity(idp)
        auth["identity"]["bearer"]["algorithms"] = ["HS256"]
        return cfg, "authorization.identity.bearer.algorithms[0]", "'HS256' is not an allowed algorithm"
    if case == "no bearer":
        auth["identity"] = {"user_from": ["bearer"]}
        return cfg, "authorization.identity.bearer", "missing"
    if case == "jwks":
        idp.file.write_text("<html>")
        auth["identity"] = bearer_identity(idp)
        return cfg, "authorization.identity.bearer.jwks", "is not JSON"
    raise AssertionError(case)


@pytest.mark.parametrize("case", ["place", "pattern", "certs off", "source", "hs256", "no bearer", "jwks"])
def test_bad_identity_config_is_one_line(pki, exchange, mdm, tmp_path, case):
    cfg, key, text = _bad_identity(pki, exchange, mdm, tmp_path, case)
    path = conftest.write_config(tmp_path, cfg)
    p = subprocess.run(conftest.easgate_argv("check", str(path)), capture_output=True, text=True, timeout=60,
                       cwd=conftest.ROOT)
    lines = [line for line in p.stderr.splitlines() if line.strip()]
    assert p.returncode != 0 and len(lines) == 1, p.stderr
    assert str(path) in lines[0] and f" {key}: " in lines[0] and text in lines[0]
