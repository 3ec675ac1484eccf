"""What establishing the identity costs per request, in process: `Principal.establish` with the
default sources, with device binding (SAN URI + UPN), and with a Bearer JWT (ES256 and RS256)
checked on top. Not a test: prints a markdown section; `--write` appends it to RESULTS.md.

    .venv/bin/python bench/bench_identity.py [--n 20000] [--write]
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

import benchlib  # noqa: E402  (bench/ is the script's directory: first on sys.path)
import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "addons"))

from easgate.authz.bearer import BearerConfig  # noqa: E402
from easgate.authz.binding import BindingRule, Place  # noqa: E402
from easgate.authz.identity import parse_request  # noqa: E402
from easgate.authz.principal import IdentityConfig, Principal  # noqa: E402
from easgate.tools.pki import IDP_AUDIENCE, IDP_ISSUER, generate_pki, issue_token, load_cert  # noqa: E402

PATH = "/Microsoft-Server-ActiveSync?Cmd=Sync&User=alice&DeviceId=ApplF17ABCDEF01&DeviceType=iPhone"
BASIC = ["Basic " + base64.b64encode(b"alice:pw").decode()]


async def per_request_us(principal: Principal, auth: list[str], der: bytes | None, binding, n: int) -> float:
    ident = parse_request("POST", "https", "mail.example.test", PATH, {"Authorization": auth[0]}, "127.0.0.1")
    for _ in range(200):  # warm the caches (certificate, JWKS)
        _, why = await principal.establish(ident, auth, der, "none", binding)
        assert why is None, why
    start = time.perf_counter()
    for _ in range(n):
        await principal.establish(ident, auth, der, "none", binding)
    return (time.perf_counter() - start) / n * 1e6


async def main(n: int) -> str:
    d = Path(tempfile.mkdtemp())
    generate_pki(d)
    der = load_cert(d / "device-iphone.pem").public_bytes(serialization.Encoding.DER)
    binding = BindingRule(Place("san_uri", pattern="urn:easgate:device:(.+)"), Place("san_upn"), "account")
    es = BearerConfig(issuer=IDP_ISSUER, audience=(IDP_AUDIENCE,), jwks_file=d / "idp-jwks.json", algorithms=("ES256",))
    rsa_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    jwk = {**json.loads(jwt.algorithms.RSAAlgorithm.to_jwk(rsa_key.public_key())), "kid": "r1", "use": "sig"}
    (d / "rsa-jwks.json").write_text(json.dumps({"keys": [jwk]}))
    rs = BearerConfig(issuer=IDP_ISSUER, audience=(IDP_AUDIENCE,), jwks_file=d / "rsa-jwks.json", algorithms=("RS256",))
    now = int(time.time())
    rs_token = jwt.encode({"upn": "alice@example.test", "iss": IDP_ISSUER, "aud": IDP_AUDIENCE, "exp": now + 3600},
                          rsa_key, algorithm="RS256", headers={"kid": "r1"})
    rows = [
        ("Basic, [basic, query] (today's behaviour)", Principal(IdentityConfig()), BASIC, None, None),
        ("Basic + device binding (SAN URI, UPN)", Principal(IdentityConfig(user_match="account")), BASIC, der, binding),
        ("Bearer ES256 + certificate + binding", Principal(IdentityConfig(("bearer", "certificate"), bearer=es,
                                                                          user_match="account")),
         ["Bearer " + issue_token(d, "alice@example.test")], der, binding),
        ("Bearer RS256 + certificate + binding", Principal(IdentityConfig(("bearer", "certificate"), bearer=rs,
                                                                          user_match="account")),
         ["Bearer " + rs_token], der, binding),
    ]
    out = [f"## Identity cost per request (bench_identity.py, {time.strftime('%Y-%m-%d')})", "",
           f"{platform.processor() or platform.machine()}, Python {platform.python_version()}, easgate at "
           f"{benchlib.commit()}, n={n} per row, "
           "one core, in process (no network)", "", "| sources | µs per request |", "|---|---|"]
    for name, p, auth, cert, rule in rows:
        out.append(f"| {name} | {await per_request_us(p, auth, cert, rule, n):.1f} |")
    return "\n".join(out) + "\n"


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=20000)
    ap.add_argument("--write", action="store_true", help="append the section to bench/RESULTS.md")
    a = ap.parse_args()
    benchlib.refuse_dirty_write(a.write, "bench_identity")
    text = asyncio.run(main(a.n))
    print(text)
    if a.write:
        benchlib.append(text, "bench_identity")
