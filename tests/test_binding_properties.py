"""Property-based tests (hypothesis) of device binding, user matching and redirect rewriting.

Each property checks the code against a small reference written here from docs/configuration.md
("Device binding", "Users beyond Basic", "Autodiscover and redirects"), not from the code:

* a binding rule allows exactly when the certificate names one DeviceId (and, with a user rule, one
  user) and the request's are the same (DeviceIds ignoring case; users per `user_match`);
* whatever DeviceId and UPN an MDM writes into a certificate (SAN URI with a prefix, UPN otherName,
  CN), reading it back gives the same value, and a certificate with two different DeviceIds binds none;
* `same_user` is an equivalence; `account` treats DOMAIN\\\\user, user@domain and user alike;
* reading never raises on hostile input (any bytes as an otherName value, any pattern subject);
* after `rewrite_text`, no URL names a host outside the public ones; URLs that do stay as they were.
"""

from __future__ import annotations

import datetime
import os
import re

from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from hypothesis import HealthCheck, assume, example, given, settings
from hypothesis import strategies as st

from easgate.authz.binding import (
    UPN_OID,
    BindingRule,
    CertIdentity,
    Place,
    check_binding,
    place_values,
    read_identity,
    same_user,
)
from easgate.gateway.autodiscover import rewrite_text, rewrite_xml
from easgate.gateway.config import RewriteRedirects

settings.register_profile("identity", max_examples=150, deadline=None,
                          suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("thorough", max_examples=3000, deadline=None,
                          suppress_health_check=[HealthCheck.too_slow])
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "identity"))

CA_KEY = ec.generate_private_key(ec.SECP256R1())
LEAF_KEY = ec.generate_private_key(ec.SECP256R1())
NOW = datetime.datetime.now(datetime.UTC)

# What MDMs put there: printable, no surrounding whitespace (values are stripped when read).
device_ids = st.text(st.characters(min_codepoint=0x21, max_codepoint=0x7E), min_size=1, max_size=40)
names = st.text(st.characters(categories=("L", "N"), include_characters="._-"), min_size=1, max_size=20)
upns = st.builds(lambda u, d: f"{u}@{d}.test", names, names)


def certificate(san: list[x509.GeneralName], cn: str = "device") -> x509.Certificate:
    b = (x509.CertificateBuilder()
         .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)]))
         .issuer_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "CA")]))
         .public_key(LEAF_KEY.public_key()).serial_number(1)
         .not_valid_before(NOW).not_valid_after(NOW + datetime.timedelta(days=1)))
    if san:
        b = b.add_extension(x509.SubjectAlternativeName(san), critical=False)
    return b.sign(CA_KEY, hashes.SHA256())


def der(tag: int, body: bytes) -> bytes:
    n = len(body)
    length = bytes((n,)) if n < 0x80 else bytes((0x81, n)) if n < 256 else bytes((0x82,)) + n.to_bytes(2, "big")
    return bytes((tag,)) + length + body


URI_RULE = BindingRule(Place("san_uri", pattern="urn:easgate:device:(.+)"), Place("san_upn"), "exact")


# ---------------------------------------------------------------------------------------------
# The rule against a reference


def reference_allows(rule: BindingRule, ids: tuple[str, ...], users: tuple[str, ...], dev: str | None,
                     user: str | None) -> bool:
    if len(ids) != 1 or dev is None or dev.lower() != ids[0].lower():
        return False
    if rule.user is None:
        return True
    if len(users) != 1 or user is None:
        return False
    return same_user(user, users[0], rule.user_match)


@given(ids=st.lists(device_ids, max_size=3, unique_by=str.casefold).map(tuple),
       users=st.lists(upns, max_size=2, unique_by=str.casefold).map(tuple),
       dev=st.one_of(st.none(), device_ids), user=st.one_of(st.none(), upns, names),
       with_user=st.booleans(), match=st.sampled_from(["exact", "account"]), pick=st.booleans())
def test_binding_allows_exactly_the_certificates_own_device_and_user(ids, users, dev, user, with_user, match, pick):
    rule = BindingRule(Place("san_uri"), Place("san_upn") if with_user else None, match)
    if pick and ids:  # half the time the request names the certificate's own DeviceId/user (other case)
        dev = ids[0].swapcase()
        user = users[0].upper() if users else user
    cert = CertIdentity(ids, users, "CN=x")
    why = check_binding(rule, cert, dev, user)
    assert (why is None) == reference_allows(rule, ids, users, dev, user)
    if why is not None:
        assert why.startswith("device binding: ") and "\n" not in why


@given(dev=st.one_of(st.none(), device_ids), user=st.one_of(st.none(), names))
def test_no_certificate_never_binds(dev, user):
    assert check_binding(URI_RULE, None, dev, user, "no client certificate").startswith(
        "device binding: no verified client certificate")


# ---------------------------------------------------------------------------------------------
# What the MDM wrote is what is read back


@given(dev=device_ids, upn=upns)
@example(dev="A" * 60, upn="x" * 300 + "@long.test")  # DER lengths over 127 and 255 (long form)
def test_what_the_mdm_writes_is_read_back(dev, upn):
    # A UPN is UTF-8 in its otherName; an rfc822Name is ASCII only (RFC 5280 4.2.1.6)
    email = [x509.RFC822Name(upn)] if upn.isascii() else []
    cert = certificate([x509.UniformResourceIdentifier(f"urn:easgate:device:{dev}"),
                        x509.OtherName(UPN_OID, der(0x0C, upn.encode())), *email], cn=dev)  # CN: <= 64
    got = read_identity(cert, URI_RULE)
    assert got.device_ids == (dev,) and got.users == (upn,)
    assert place_values(cert, Place("subject_cn")) == (dev,)
    assert place_values(cert, Place("san_email")) == ((upn,) if email else ())
    assert place_values(cert, Place("san_othername", UPN_OID.dotted_string)) == (upn,)
    assert check_binding(URI_RULE, got, dev, upn) is None


@given(a=device_ids, b=device_ids)
def test_two_different_device_ids_bind_none(a, b):
    cert = certificate([x509.UniformResourceIdentifier(f"urn:easgate:device:{a}"),
                        x509.UniformResourceIdentifier(f"urn:easgate:device:{b}")])
    got = read_identity(cert, BindingRule(Place("san_uri", pattern="urn:easgate:device:(.+)")))
    why = check_binding(BindingRule(Place("san_uri")), got, a, None)
    if a.casefold() == b.casefold():
        assert why is None
    else:
        assert why is not None and "several DeviceIds" in why


@given(tag=st.sampled_from([0x0C, 0x16, 0x13, 0x1E, 0x04, 0x02, 0x05, 0x14, 0x1A]), body=st.binary(max_size=300))
def test_hostile_other_name_values_never_raise(tag, body):
    """Any DER value (cryptography only builds certificates whose otherName is well-formed DER): bad
    UTF-8, odd-length BMPString, another string type, an integer..."""
    try:
        cert = certificate([x509.OtherName(UPN_OID, der(tag, body))])
    except ValueError:
        assume(False)
    for v in place_values(cert, Place("san_upn")):
        assert isinstance(v, str) and v


@given(uri=st.text(min_size=1, max_size=60).filter(lambda s: s.strip() and s.isascii() and s.isprintable()))
def test_pattern_only_captures_its_own_prefix(uri):
    place = Place("san_uri", pattern="urn:easgate:device:(.+)")
    got = place.extract(uri)
    if got is not None:
        assert uri.startswith("urn:easgate:device:") and got == uri[len("urn:easgate:device:"):].strip()
    else:
        assert not re.fullmatch(r"urn:easgate:device:(.+)", uri, re.DOTALL) or not uri[19:].strip()


# ---------------------------------------------------------------------------------------------
# Users


@given(a=names, b=names, c=names, domain=names, match=st.sampled_from(["exact", "account"]))
def test_same_user_is_an_equivalence(a, b, c, domain, match):
    assert same_user(a, a, match)
    assert same_user(a, b, match) == same_user(b, a, match)
    if same_user(a, b, match) and same_user(b, c, match):
        assert same_user(a, c, match)
    # Another case of the same name is the same user; a letter whose upper case does not fold back
    # (Turkish dotless i: 'ı'.upper() == 'I', 'I'.casefold() == 'i') counts as another user: a deny.
    forms = [a, f"{domain}\\{a}", f"{a}@{domain}.test"]
    if a.upper().casefold() == a.casefold():
        forms.append(a.upper())
    else:
        assert not same_user(a, a.upper(), "account")
    for x in forms:
        for y in forms:
            assert same_user(x, y, "account")
    assert same_user(a, f"{a}@{domain}.test", "exact") is False


# ---------------------------------------------------------------------------------------------
# Redirect rewriting

hosts = st.builds(lambda a, b: f"{a}.{b}".lower(), names, st.sampled_from(["internal", "corp", "test", "local"]))
PUBLIC = "mail.example.test"


@given(parts=st.lists(st.tuples(st.sampled_from(["", "see ", "<Url>", "\"Url\":\""]), hosts,
                                st.sampled_from(["/Microsoft-Server-ActiveSync", "/EWS/Exchange.asmx", "", "?x=1"]),
                                st.sampled_from(["", ":443", ":8443"]), st.sampled_from(["https", "http", "HTTPS"])),
                      min_size=1, max_size=5),
       public_hosts=st.lists(hosts, max_size=2))
def test_no_url_names_a_host_outside_the_public_ones(parts, public_hosts):
    text = " ".join(f"{pre}{scheme}://{host}{port}{path}" for pre, host, path, port, scheme in parts)
    rule = RewriteRedirects(public_hosts=(PUBLIC, *public_hosts))
    out, n = rewrite_text(text, f"{PUBLIC}:8443", rule)
    allowed = {PUBLIC, *public_hosts}
    found = re.findall(r"(?i)https?://([^/:?\s\"<]+)", out)
    assert found and all(h.lower() in allowed for h in found)
    assert n == sum(host not in allowed for _, host, _, _, _ in parts)
    if n == 0:
        assert out == text


@given(host=hosts)
def test_xml_namespaces_are_not_rewritten(host):
    doc = (f'<A xmlns="http://schemas.microsoft.com/x"><Url>https://{host}/Microsoft-Server-ActiveSync</Url>'
           f'<Name>https://{host}/Microsoft-Server-ActiveSync</Name></A>')
    out, n = rewrite_xml(doc, PUBLIC, RewriteRedirects(public_hosts=(PUBLIC,)))
    assert 'xmlns="http://schemas.microsoft.com/x"' in out
    assert n == 2 and out.count(f"https://{PUBLIC}/Microsoft-Server-ActiveSync") == 2
