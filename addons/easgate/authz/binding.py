"""Device binding: the verified client certificate names the DeviceId (and the user) a request may use.

Without it the decision is about a DeviceId the phone chooses: anyone who copies an allowed
phone's DeviceId gets its access. The MDM that enrolled the phone put the DeviceId (and usually the
user's UPN) into the certificate it issued (docs/device-certificates.md says where XenMobile,
Workspace ONE and Intune put them); the gateway verified that certificate on the handshake. A
binding rule says where to look, and a request whose DeviceId or user is not the certificate's is
denied with that reason.

A *place* is where a value sits in the certificate (`san_uri`, `san_dns`, `san_email`, `san_upn`,
`san_othername:<OID>`, `subject_cn`, `subject_email`, `subject_serial`, `subject:<OID>`), with an
optional `pattern`: a regular expression with one group that must match the whole value and
captures the part that is the DeviceId or user (`urn:easgate:device:(.+)`). Several different
values in one place are ambiguous: such a certificate binds nothing and is denied.

Pure logic on `cryptography` objects: no mitmproxy, no I/O; nothing here raises on a hostile
certificate (every problem is a deny reason).
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass

from cryptography import x509
from cryptography.x509.oid import NameOID, ObjectIdentifier

from ..core.decision import one_line
from ..core.yamlfile import Node, kind

__all__ = [
    "PLACES",
    "UPN_OID",
    "BindingRule",
    "CertIdentity",
    "Place",
    "check_binding",
    "load_certificate",
    "parse_binding",
    "parse_place",
    "place_values",
    "same_user",
]

#: szOID_NT_PRINCIPAL_NAME: the UPN in a SAN otherName (what Windows smart-card logon and the
#: MDMs' "User Principal Name" SAN type write).
UPN_OID = ObjectIdentifier("1.3.6.1.4.1.311.20.2.3")

#: Places with a fixed meaning; `san_othername:<OID>` and `subject:<OID>` take a dotted OID.
PLACES: dict[str, str] = {
    "san_uri": "a SAN URI (e.g. urn:easgate:device:<DeviceId>)",
    "san_dns": "a SAN DNS name",
    "san_email": "a SAN rfc822Name (e-mail address)",
    "san_upn": "the SAN otherName User Principal Name (OID 1.3.6.1.4.1.311.20.2.3)",
    "subject_cn": "the subject's common name (CN)",
    "subject_email": "the subject's emailAddress attribute",
    "subject_serial": "the subject's serialNumber attribute",
}
PLACE_HINT = ", ".join(PLACES) + ", san_othername:<OID>, subject:<OID>"
USER_MATCH = ("exact", "account")

_SUBJECT_OIDS = {
    "subject_cn": NameOID.COMMON_NAME,
    "subject_email": NameOID.EMAIL_ADDRESS,
    "subject_serial": NameOID.SERIAL_NUMBER,
}
_OID_RE = re.compile(r"^[0-2](\.(0|[1-9][0-9]*))+$")
MAX_VALUES = 32  # values read from one place; more is not a device certificate


@dataclass(frozen=True, slots=True)
class Place:
    """Where a value sits in a certificate, and which part of it counts."""

    kind: str  # a PLACES key, "san_othername" or "subject"
    oid: str | None = None  # for san_othername / subject
    pattern: str | None = None  # full-match regex with one group; None = the whole value

    @property
    def label(self) -> str:
        return f"{self.kind}:{self.oid}" if self.oid else self.kind

    def extract(self, value: str) -> str | None:
        """The captured part of `value`, or None when the pattern does not match it."""
        if self.pattern is None:
            return value.strip() or None
        m = _compiled(self.pattern).fullmatch(value)
        if m is None:
            return None
        got = m.group(1)
        return got.strip() or None if got is not None else None


@functools.lru_cache(maxsize=64)
def _compiled(pattern: str) -> re.Pattern[str]:
    return re.compile(pattern, re.DOTALL)


@dataclass(frozen=True, slots=True)
class BindingRule:
    """`device_binding`: the request's DeviceId (and, with `user`, its user) must be the certificate's."""

    device_id: Place
    user: Place | None = None
    user_match: str = "exact"  # exact | account


@dataclass(frozen=True, slots=True)
class CertIdentity:
    """What one certificate says, read through a rule: each tuple holds the distinct values found."""

    device_ids: tuple[str, ...]
    users: tuple[str, ...]
    subject: str


# ---------------------------------------------------------------------------------------------
# Reading a certificate


def load_certificate(der: bytes) -> x509.Certificate | None:
    """The certificate in `der`, or None (a verified certificate always loads; this never raises)."""
    return _load(bytes(der))


@functools.lru_cache(maxsize=1024)
def _load(der: bytes) -> x509.Certificate | None:
    # Cached: a phone sends many requests on one connection and reconnects with the same certificate.
    try:
        return x509.load_der_x509_certificate(der)
    except Exception:
        return None


def _der_string(data: bytes) -> str | None:
    """The text of a DER-encoded UTF8String / IA5String / PrintableString / BMPString (an otherName
    value), or None for anything else. Only the TLV framing is read: no signature, nothing to trust."""
    if len(data) < 2:
        return None
    tag, n, pos = data[0], data[1], 2
    if n & 0x80:
        octets = n & 0x7F
        if not 1 <= octets <= 3 or len(data) < 2 + octets:
            return None
        n = int.from_bytes(data[2 : 2 + octets], "big")
        pos = 2 + octets
    body = data[pos:]
    if len(body) != n:
        return None
    try:
        if tag == 0x0C:  # UTF8String
            return body.decode("utf-8")
        if tag in (0x16, 0x13):  # IA5String, PrintableString
            return body.decode("ascii")
        if tag == 0x1E:  # BMPString
            return body.decode("utf-16-be")
    except UnicodeDecodeError:
        return None
    return None


def _san(cert: x509.Certificate) -> x509.SubjectAlternativeName | None:
    try:
        return cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except Exception:
        return None


def place_values(cert: x509.Certificate, place: Place) -> tuple[str, ...]:
    """The distinct values `place` extracts from `cert`, in certificate order (case kept)."""
    return _place_values(cert, place)


@functools.lru_cache(maxsize=4096)
def _place_values(cert: x509.Certificate, place: Place) -> tuple[str, ...]:
    # Cached per (certificate, place): every request of a connection asks the same question.
    raw: list[str] = []
    try:
        if place.kind.startswith("san_"):
            san = _san(cert)
            if san is not None:
                if place.kind == "san_uri":
                    raw = list(san.get_values_for_type(x509.UniformResourceIdentifier))
                elif place.kind == "san_dns":
                    raw = list(san.get_values_for_type(x509.DNSName))
                elif place.kind == "san_email":
                    raw = list(san.get_values_for_type(x509.RFC822Name))
                else:
                    oid = UPN_OID if place.kind == "san_upn" else ObjectIdentifier(place.oid or "")
                    for other in san.get_values_for_type(x509.OtherName):
                        if other.type_id == oid:
                            text = _der_string(other.value)
                            if text is not None:
                                raw.append(text)
        else:
            oid = _SUBJECT_OIDS.get(place.kind) or ObjectIdentifier(place.oid or "")
            raw = [a.value if isinstance(a.value, str) else a.value.decode("utf-8", "replace")
                   for a in cert.subject.get_attributes_for_oid(oid)]
    except Exception:
        return ()
    out: list[str] = []
    seen: set[str] = set()
    for v in raw[:MAX_VALUES]:
        got = place.extract(v)
        if got is not None and got.casefold() not in seen:
            seen.add(got.casefold())
            out.append(got)
    return tuple(out)


@functools.lru_cache(maxsize=4096)
def read_identity(cert: x509.Certificate, rule: BindingRule) -> CertIdentity:
    """What `cert` says through `rule` (cached per certificate and rule)."""
    try:
        subject = cert.subject.rfc4514_string()
    except Exception:
        subject = "?"
    return CertIdentity(
        device_ids=place_values(cert, rule.device_id),
        users=place_values(cert, rule.user) if rule.user else (),
        subject=subject,
    )


# ---------------------------------------------------------------------------------------------
# The rule


def same_user(a: str, b: str, match: str = "exact") -> bool:
    """Whether two user names are the same user: `exact` ignores case only; `account` compares the
    bare account ("alice" == "CONTOSO\\\\alice" == "alice@contoso.com")."""
    if match == "account":
        return _account(a) == _account(b)
    return a.strip().casefold() == b.strip().casefold()


def _account(user: str) -> str:
    u = user.strip()
    if "\\" in u:
        u = u.rpartition("\\")[2]
    if "@" in u:
        u = u.rpartition("@")[0]
    return u.casefold()


def check_binding(rule: BindingRule, cert: CertIdentity | None, device_id: str | None,
                  user: str | None, why_no_cert: str = "no client certificate") -> str | None:
    """None when the request's DeviceId (and user) are the certificate's; else the deny reason.

    `cert` None: the connection has no verified certificate (`why_no_cert` says why): deny.
    """
    if cert is None:
        return f"device binding: no verified client certificate ({why_no_cert})"
    where = rule.device_id.label
    if not cert.device_ids:
        return f"device binding: the certificate ({cert.subject}) names no DeviceId in {where}"
    if len(cert.device_ids) > 1:
        return f"device binding: the certificate names several DeviceIds in {where}: " + ", ".join(cert.device_ids)
    bound = cert.device_ids[0]
    if device_id is None or device_id.casefold() != bound.casefold():
        return (f"device binding: DeviceId {one_line(device_id, 80)} does not match the certificate's "
                f"{one_line(bound, 80)} ({where})")
    if rule.user is None:
        return None
    uwhere = rule.user.label
    if not cert.users:
        return f"device binding: the certificate ({cert.subject}) names no user in {uwhere}"
    if len(cert.users) > 1:
        return f"device binding: the certificate names several users in {uwhere}: " + ", ".join(cert.users)
    if user is None or not same_user(user, cert.users[0], rule.user_match):
        return (f"device binding: user {one_line(user, 80)} does not match the certificate's "
                f"{one_line(cert.users[0], 80)} ({uwhere}, {rule.user_match} match)")
    return None


# ---------------------------------------------------------------------------------------------
# Configuration


PLACE_KEYS = {"from": PLACE_HINT, "pattern": "a regular expression with one group, e.g. 'urn:easgate:device:(.+)'"}


def parse_place(n: Node) -> Place:
    """`subject_cn`, or `{from: san_uri, pattern: 'urn:easgate:device:(.+)'}`; raises ConfigError."""
    if isinstance(n.value, str):
        return _place(n, n.value, None)
    if not isinstance(n.value, dict):
        raise n.err(f"must be a place or a mapping, got {kind(n.value)}",
                    "e.g. subject_cn or {from: san_uri, pattern: 'urn:easgate:device:(.+)'}")
    n.mapping(PLACE_KEYS, required=("from",))
    return _place(n.child("from"), n.child("from").str() or "", n.child("pattern"))


def _place(n: Node, spec: str, pattern_node: Node | None) -> Place:
    name, colon, oid = spec.strip().partition(":")
    if colon:
        if name not in ("san_othername", "subject"):
            raise n.err(f"'{spec}': only san_othername and subject take an OID", f"use one of {PLACE_HINT}")
        if not _OID_RE.match(oid):
            raise n.err(f"'{oid}' is not a dotted OID", "e.g. san_othername:1.3.6.1.4.1.311.20.2.3")
    elif name not in PLACES:
        raise n.err(f"'{spec}' is not a place", f"use one of {PLACE_HINT}")
    pattern = None
    if pattern_node is not None and pattern_node.value is not None:
        pattern = pattern_node.str()
        try:
            groups = re.compile(pattern or "").groups
        except re.error as e:
            raise pattern_node.err(f"not a regular expression: {e}", "e.g. 'urn:easgate:device:(.+)'")
        if groups != 1:
            raise pattern_node.err(f"has {groups} groups", "use exactly one group: the part that is the value")
    return Place(kind=name, oid=oid or None, pattern=pattern)


BINDING_KEYS = {
    "device_id": "where the certificate names the DeviceId: a place or {from, pattern}",
    "user": "where it names the user (optional): a place or {from, pattern}, e.g. san_upn",
    "user_match": "exact | account",
}


def parse_binding(n: Node) -> BindingRule | None:
    """A `device_binding` section: None for `off`/false; raises ConfigError."""
    if n.value is False or n.value == "off":
        return None
    n.mapping(BINDING_KEYS, required=("device_id",))
    user = parse_place(n.child("user")) if n.has("user") else None
    return BindingRule(device_id=parse_place(n.child("device_id")), user=user,
                       user_match=n.child("user_match").str("exact", USER_MATCH) or "exact")
