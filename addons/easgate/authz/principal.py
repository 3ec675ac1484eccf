"""Who is asking, as far as the gateway can tell: the user from the sources it can verify, and the
device bound to the client certificate.

`identity.user_from` lists the sources in order of preference:

* `basic`: the user of an `Authorization: Basic` header (Exchange checks the password);
* `certificate`: the user the verified client certificate names (`identity.certificate_user`,
  the SAN UPN by default);
* `bearer`: the user claim of an `Authorization: Bearer` JWT, verified (bearer.py);
* `query`: the `User=` parameter, which the phone chooses. It counts only on a request without an
  Authorization header of a scheme the gateway cannot read: with NTLM or Negotiate only Exchange
  learns who the user is, so the gateway says so and does not take `User=` instead.

The first source that has a user gives it; every other listed source that has one must name the
same user (`user_match`), or the request is denied. A Bearer token that is present but does not
verify denies, whatever comes after it in the list. Then the route's device binding (binding.py)
checks the DeviceId, and the user, against the certificate.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path

from cryptography import x509

from ..core.decision import one_line
from ..core.yamlfile import Node
from .bearer import BearerConfig, BearerValidator, bearer_token, parse_bearer
from .binding import (
    USER_MATCH,
    BindingRule,
    Place,
    check_binding,
    load_certificate,
    parse_place,
    place_values,
    read_identity,
    same_user,
)
from .identity import Identity

__all__ = ["USER_SOURCES", "IdentityConfig", "Principal", "auth_scheme", "parse_identity"]

USER_SOURCES = ("basic", "certificate", "bearer", "query")
UNREADABLE_SCHEMES = {"ntlm": "NTLM", "negotiate": "Negotiate (Kerberos/NTLM)"}


@dataclass(frozen=True)
class IdentityConfig:
    user_from: tuple[str, ...] = ("basic", "query")  # today's behaviour without an identity section
    certificate_user: Place = field(default_factory=lambda: Place("san_upn"))
    user_match: str = "exact"
    bearer: BearerConfig | None = None

    @property
    def uses_certificate(self) -> bool:
        return "certificate" in self.user_from


def auth_scheme(values: list[str]) -> str | None:
    """The lower-cased scheme of the (first) Authorization header, or None."""
    if not values:
        return None
    parts = values[0].strip().split(None, 1)
    return parts[0].lower() if parts else None


class Principal:
    """`establish()`: the request's identity with its user set from the verifiable sources and its
    DeviceId checked against the certificate; or a deny reason."""

    def __init__(self, cfg: IdentityConfig) -> None:
        self.cfg = cfg
        self.bearer = BearerValidator(cfg.bearer) if cfg.bearer is not None else None

    async def establish(self, ident: Identity, authorization: list[str], cert_der: bytes | None,
                        why_no_cert: str, binding: BindingRule | None) -> tuple[Identity, str | None]:
        cfg = self.cfg
        scheme = auth_scheme(authorization)
        cert: x509.Certificate | None = load_certificate(cert_der) if cert_der else None
        if cert_der and cert is None:
            return ident, "client certificate unreadable"
        found: list[tuple[str, str]] = []  # (source, user), in user_from order
        cert_user: str | None = None
        if cert is not None:
            place = binding.user if binding is not None and binding.user is not None else cfg.certificate_user
            users = place_values(cert, place)
            cert_user = users[0] if len(users) == 1 else None
        for source in cfg.user_from:
            if source == "basic":
                if ident.user_source == "basic" and ident.user:
                    found.append(("basic", ident.user))
            elif source == "query":
                if ident.user_source == "query" and ident.user and scheme is None:
                    found.append(("query", ident.user))
            elif source == "certificate":
                if cert is not None:
                    users = place_values(cert, cfg.certificate_user)
                    if len(users) > 1:
                        return ident, (f"the client certificate names several users in {cfg.certificate_user.label}: "
                                       + ", ".join(users))
                    if users:
                        found.append(("certificate", users[0]))
            elif source == "bearer":
                token = bearer_token(authorization) if scheme == "bearer" else None
                if token is not None and self.bearer is not None:
                    user, err = await self.bearer.user(token)
                    if err is not None:
                        return ident, err
                    assert user is not None
                    found.append(("bearer", user))
        if not found:
            return ident, self._no_user(scheme, ident, cert is not None)
        source, user = found[0]
        for other_source, other in found[1:]:
            if not same_user(user, other, cfg.user_match):
                return ident, (f"the user sources disagree: {source} says {one_line(user, 80)}, "
                               f"{other_source} says {one_line(other, 80)}")
        cert_device_id = None
        if binding is not None:
            cid = read_identity(cert, binding) if cert is not None else None
            why = check_binding(binding, cid, ident.device_id, user, why_no_cert)
            if why is not None:
                return ident, why
            assert cid is not None
            cert_device_id = cid.device_ids[0]
        if (user, source, cert_device_id, cert_user) == (ident.user, ident.user_source, ident.cert_device_id,
                                                         ident.cert_user):
            return ident, None  # the usual case (Basic user, no certificate): no copy of the identity
        return replace(ident, user=user, user_source=source, cert_device_id=cert_device_id, cert_user=cert_user), None

    def _no_user(self, scheme: str | None, ident: Identity, has_cert: bool) -> str:
        listed = ", ".join(self.cfg.user_from)
        if scheme in UNREADABLE_SCHEMES:
            return (f"user unknown to the gateway: the request authenticates with {UNREADABLE_SCHEMES[scheme]}, "
                    f"which only Exchange checks; its User= parameter is not trusted "
                    f"(identity.user_from is [{listed}]: add certificate or bearer)")
        if scheme == "bearer" and "bearer" in self.cfg.user_from:
            return "empty Bearer token"
        if scheme == "bearer":
            return (f"user unknown to the gateway: a Bearer token, and identity.user_from [{listed}] has no bearer; "
                    "its User= parameter is not trusted")
        if scheme is not None and scheme != "basic":
            return f"user unknown to the gateway: Authorization scheme {one_line(scheme, 20)!r} is not one it reads"
        if "certificate" in self.cfg.user_from and has_cert:
            return (f"request has no user: the client certificate names none in {self.cfg.certificate_user.label} "
                    f"and no other source in identity.user_from [{listed}] has one")
        return f"request has no user (identity.user_from: [{listed}])"


IDENTITY_KEYS = {
    "user_from": f"an ordered list of {', '.join(USER_SOURCES)} (default [basic, query])",
    "certificate_user": "where the client certificate names the user: a place or {from, pattern} (default san_upn)",
    "user_match": "exact | account: how two user names are compared (default exact)",
    "bearer": "{jwks, issuer, audience, algorithms, user_claim}: Bearer JWT validation",
}


def parse_identity(n: Node, base: Path) -> IdentityConfig:
    """`authorization.identity`; raises ConfigError."""
    if n.value is None:
        return IdentityConfig()
    n.mapping(IDENTITY_KEYS)
    u = n.child("user_from")
    sources = u.strlist(("basic", "query"))
    if not sources:
        raise u.err("is empty", f"list at least one of {', '.join(USER_SOURCES)}")
    for i, s in enumerate(sources):
        if s not in USER_SOURCES:
            raise (u.child(i) if isinstance(u.value, list) else u).err(
                f"'{s}' is not a user source", f"use {', '.join(USER_SOURCES)}")
        if s in sources[:i]:
            raise u.err(f"'{s}' is listed twice", "list each source once")
    bearer = parse_bearer(n.child("bearer"), base) if n.has("bearer") else None
    if "bearer" in sources and bearer is None:
        raise n.child("bearer").err("missing", "user_from lists bearer: add {jwks, issuer, audience}")
    if bearer is not None and "bearer" not in sources:
        raise u.err("has no bearer but identity.bearer is configured", "add bearer to user_from, or remove identity.bearer")
    cu = parse_place(n.child("certificate_user")) if n.has("certificate_user") else Place("san_upn")
    return IdentityConfig(user_from=sources, certificate_user=cu, bearer=bearer,
                          user_match=n.child("user_match").str("exact", USER_MATCH) or "exact")
