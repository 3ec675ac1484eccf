"""The gateway configuration: one YAML file, parsed and validated in one place.

Everything here is pure (no mitmproxy hooks), so `easgate check`, the addons and the tests share
one parser. Every error is a `ConfigError` whose message names the file, the dotted key and the fix,
because a gateway that starts half-configured is worse than one that does not start.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import re
import ssl
import urllib.parse
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..authz.binding import BindingRule, parse_binding
from ..authz.changefeed import CHANGES_PATH
from ..authz.commands import CommandRules
from ..authz.commands import parse as parse_command_rules
from ..authz.principal import IdentityConfig, parse_identity
from ..core.decision import one_line
from ..core.errors import ConfigError
from ..core.net import host_of
from ..core.paths import normalize_path
from ..core.yamlfile import Node, kind, parse_listen, read_yaml

CLIENT_CERT_MODES = ("off", "optional", "required")
REVOCATION_MODES = ("off", "optional", "mandatory")
ON_INVALID_CERT = ("reject", "untrusted")
FAIL_MODES = ("deny", "allow", "stale")
DENY_MODES = ("http", "drop", "activesync")
HOST_HEADER_SPECIAL = ("client", "upstream")
CERT_MATCH = ("present", "absent", "verified", "unverified")
DEFAULT_CERT_HEADER = "NSClientCert"


@dataclass(frozen=True)
class Upstream:
    scheme: str
    host: str
    port: int

    @property
    def url(self) -> str:
        return f"{self.scheme}://{self.host}:{self.port}"

    @property
    def authority(self) -> str:
        """host[:port] as a Host header names it (no default port)."""
        default = 443 if self.scheme == "https" else 80
        return self.host if self.port == default else f"{self.host}:{self.port}"


@dataclass(frozen=True)
class Pool:
    name: str
    servers: tuple[Upstream, ...]
    ca: Path | None = None  # CA file that verifies https upstreams; None = system trust store
    verify: bool = True
    sni: str | None = None  # server name sent and verified; None = the server's host
    host_header: str = "client"  # client | upstream | an explicit host[:port]
    connect_timeout_s: float = 5.0
    response_timeout_s: float = 120.0
    long_poll_timeout_s: float = 3660.0
    down_time_s: float = 10.0  # how long a server that refused a connection is skipped


@dataclass(frozen=True)
class Match:
    """What a route matches; every given criterion must hold (AND)."""

    any: bool = False
    path_prefix: str | None = None
    ignore_case: bool = False
    hosts: tuple[str, ...] = ()
    methods: tuple[str, ...] = ()
    header_present: tuple[str, ...] = ()
    header_equals: tuple[tuple[str, str], ...] = ()
    client_cert: str | None = None  # present | absent | verified | unverified
    filter: str | None = None  # a mitmproxy flow filter expression


@dataclass(frozen=True)
class RewriteRedirects:
    """`rewrite_redirects`: 451 X-MS-Location, Location and Autodiscover answers never name an internal host."""

    public_hosts: tuple[str, ...] = ()  # hosts a redirect may name; empty = only the one the client used


@dataclass(frozen=True)
class Route:
    name: str
    priority: int
    match: Match | None  # None: only reachable as the default route
    pool: str
    authorize: str | None = None  # "activesync" or None
    client_cert_header: str | None = None
    device_binding: BindingRule | None = None  # the route's own, else authorization.device_binding
    rewrite_redirects: RewriteRedirects | None = None
    enforce: bool = True  # False: shadow mode, decisions computed and audited but not enforced


@dataclass(frozen=True)
class Revocation:
    """Revocation checking of the client certificates one trusted CA issued (see docs/revocation.md)."""

    mode: str = "off"  # off | optional | mandatory
    ocsp: bool = True  # ask an OCSP responder (ocsp_url, else the certificate's AIA)
    ocsp_url: str | None = None  # overrides the certificate's AIA OCSP URL
    ocsp_timeout_ms: int = 1000
    ocsp_cache_max_s: int = 3600  # answers are cached until nextUpdate, at most this long
    crl: Path | None = None  # a CRL file (PEM or DER) signed by this CA, reloaded when it changes


@dataclass(frozen=True)
class TrustedCa:
    """One `tls.client_certs.ca` entry: a CA file and how certificates it issued are checked."""

    file: Path
    revocation: Revocation = field(default_factory=Revocation)
    key: str = "tls.client_certs.ca"  # where it is configured, for error messages


@dataclass(frozen=True)
class ClientCerts:
    mode: str = "off"
    ca: tuple[Path, ...] = ()
    on_invalid: str = "reject"
    trusted: tuple[TrustedCa, ...] = ()  # `ca` with per-CA settings (same files, same order)

    def trusted_cas(self) -> tuple[TrustedCa, ...]:
        return self.trusted or tuple(TrustedCa(p) for p in self.ca)


@dataclass(frozen=True)
class TlsConfig:
    certificate: Path
    key: Path | None
    min_version: str = "TLS1_2"
    client_certs: ClientCerts = field(default_factory=ClientCerts)
    # 80 bytes (`openssl rand 80`): TLS session tickets every node holding it can resume
    session_ticket_key: Path | None = None


@dataclass(frozen=True)
class AppliesTo:
    """XNC's "applies to": which requests on an `authorize: activesync` route get a decision."""

    path_prefix: str = "/Microsoft-Server-ActiveSync"
    hosts: tuple[str, ...] = ()  # empty = any host
    methods: tuple[str, ...] = ("POST",)
    commands: tuple[str, ...] = ()  # empty = all ActiveSync commands
    pass_methods: tuple[str, ...] = ("OPTIONS",)  # pass without a decision (capability probes)


@dataclass(frozen=True)
class Connector:
    url: str
    timeout_ms: int = 2000
    max_concurrency: int = 32
    ca: Path | None = None
    verify: bool = True
    changes: str | None = None  # the connector's change feed the workers follow (authz/changefeed.py)


@dataclass(frozen=True)
class CacheConfig:
    allow_ttl_s: float = 300.0
    deny_ttl_s: float = 30.0
    max_entries: int = 100_000
    redis: str | None = None  # the shared second tier (gateway/sharedcache.py, docs/scaling.md)


@dataclass(frozen=True)
class DenyConfig:
    action: str = "respond"  # respond | drop (the older spelling of mode http | drop)
    mode: str = "http"  # http | drop | activesync (authz/eas_deny.py)
    status: int = 403
    body: str = "Access denied by easgate: this device is not allowed to sync mail.\n"
    retry_after_s: int | None = None


@dataclass(frozen=True)
class Authorization:
    applies_to: AppliesTo = field(default_factory=AppliesTo)
    policy: Path | None = None
    connector: Connector | None = None
    cache: CacheConfig = field(default_factory=CacheConfig)
    on_connector_error: str = "deny"
    stale_max_age_s: float = 3600.0
    deny: DenyConfig = field(default_factory=DenyConfig)
    identity: IdentityConfig = field(default_factory=IdentityConfig)
    device_binding: BindingRule | None = None  # default for every `authorize: activesync` route
    revocations: Path | None = None  # the shared revocation file every worker follows (authz/revocations.py)
    commands: CommandRules = field(default_factory=CommandRules)  # command-level rules and rate limits


@dataclass(frozen=True)
class ProxyProtocol:
    """PROXY protocol (v1 and v2) on the listener, from a layer-4 balancer in front (docs/scaling.md)."""

    trusted: tuple[str, ...] = ()  # CIDRs / addresses allowed to send a PROXY header
    require: bool = True  # a trusted peer must send one (HAProxy's accept-proxy); false: direct clients too


@dataclass(frozen=True)
class Limits:
    """Bounds on one request head, enforced by the strict HTTP/1 reader (http1.py) before routing."""

    max_header_bytes: int = 32768  # request line + header fields + the blank line
    max_headers: int = 100  # header field lines
    max_target_length: int = 8192  # the request-target (path and query) as sent


@dataclass(frozen=True)
class AuditConfig:
    on_error: str = "deny"  # deny | allow: what happens to an ActiveSync request whose line cannot be written
    queue_lines: int = 10_000  # lines waiting for the writer thread before the log counts as unwritable
    max_value_chars: int = 1024  # longer client values are clipped (marked) in the log
    write_timeout_ms: int = 1000  # a line not written by then counts as unwritable (a hanging sink)


@dataclass(frozen=True)
class GatewayConfig:
    path: Path
    listen_host: str
    listen_port: int
    tls: TlsConfig
    pools: dict[str, Pool]
    routes: tuple[Route, ...]  # sorted by priority
    default_route: str | None
    authorization: Authorization | None
    audit_log: Path | None
    client_idle_timeout_s: int = 3660
    proxy_protocol: ProxyProtocol | None = None
    max_connections: int = 0  # concurrent client connections per process; 0 = from the open-files limit
    limits: Limits = Limits()
    audit: AuditConfig = AuditConfig()

    def route(self, name: str) -> Route:
        """The route named `name` (a dict lookup: this runs several times per request)."""
        return self._by_name[name]

    @property
    def _by_name(self) -> dict[str, Route]:
        d = self.__dict__.get("_routes_by_name")
        if d is None:
            d = {r.name: r for r in self.routes}
            object.__setattr__(self, "_routes_by_name", d)
        return d


# --------------------------------------------------------------------------------------------

TOP_KEYS = {
    "listen": "{host: 127.0.0.1, port: 8443}",
    "tls": "{certificate: certs/gateway-full.pem}",
    "pools": "a mapping of pool name -> {servers: [...]}",
    "routes": "a list of routes",
    "default_route": "the name of a route",
    "authorization": "the ActiveSync authorization settings",
    "audit_log": "a file path for the JSON-lines decision log",
    "audit": "{on_error: deny | allow, queue_lines: 10000, max_value_chars: 1024, write_timeout_ms: 1000}",
    "client_idle_timeout_s": "seconds, at least 3600 for ActiveSync Ping",
    "proxy_protocol": "{trusted: [10.0.0.0/8], require: true} (PROXY v1/v2 from a layer-4 balancer)",
    "max_connections": "concurrent client connections per process; 0 = derived from the open-files limit",
    "limits": "{max_header_bytes: 32768, max_headers: 100, max_target_length: 8192} (bounds on a request head)",
}


def load_config(path: str | Path) -> GatewayConfig:
    """Read and validate the gateway config; raises ConfigError."""
    path, data = read_yaml(path)
    return parse_config(data, path)


def parse_config(data: Any, path: Path) -> GatewayConfig:
    base = path.parent
    root = Node(path, "", data if data is not None else {})
    root.mapping(TOP_KEYS, required=("tls", "pools", "routes"))

    host, port = parse_listen(root, 8443)

    tls = _parse_tls(root.child("tls"), base)
    pools = _parse_pools(root.child("pools"), base)
    routes = _parse_routes(root.child("routes"), pools)
    default_route = root.child("default_route").str()
    if default_route is not None and default_route not in {r.name for r in routes}:
        raise root.child("default_route").err(
            f"no route named '{default_route}'", f"use one of {', '.join(r.name for r in routes)}"
        )
    for i, r in enumerate(routes):
        if r.match is None and r.name != default_route:
            raise ConfigError(path, f"routes[{r.name}].match", "missing",
                              "add a match (or 'match: any'), or name this route as default_route")
    auth = None
    if root.has("authorization"):
        auth = _parse_authorization(root.child("authorization"), base)
    if any(r.authorize for r in routes) and auth is None:
        name = next(r.name for r in routes if r.authorize)
        raise ConfigError(path, "authorization", "missing",
                          f"route '{name}' says authorize: activesync; add an authorization section with a policy or a connector")
    routes = _bind_routes(root, routes, auth, tls)
    audit = root.child("audit_log").path(base, must_exist=False)
    audit_cfg = _parse_audit(root.child("audit"))
    idle = root.child("client_idle_timeout_s").int(3660, 1, 7 * 86400)
    pp = _parse_proxy_protocol(root.child("proxy_protocol")) if root.has("proxy_protocol") else None
    max_conns = root.child("max_connections").int(0, 0, 10_000_000)
    limits = _parse_limits(root.child("limits")) if root.has("limits") else Limits()
    return GatewayConfig(
        path=path, listen_host=host, listen_port=port, tls=tls, pools=pools, routes=routes,
        default_route=default_route, authorization=auth, audit_log=audit, client_idle_timeout_s=idle,
        proxy_protocol=pp, max_connections=max_conns, limits=limits, audit=audit_cfg,
    )


def _parse_limits(n: Node) -> Limits:
    d = Limits()
    n.mapping({"max_header_bytes": f"bytes of a request head, from 1024 to 1048576 (default {d.max_header_bytes})",
               "max_headers": f"header lines per request, from 8 to 1000 (default {d.max_headers})",
               "max_target_length": f"bytes of the request-target, from 256 to 65536 (default {d.max_target_length})"})
    limits = Limits(
        max_header_bytes=n.child("max_header_bytes").int(d.max_header_bytes, 1024, 1048576),
        max_headers=n.child("max_headers").int(d.max_headers, 8, 1000),
        max_target_length=n.child("max_target_length").int(d.max_target_length, 256, 65536),
    )
    if limits.max_target_length >= limits.max_header_bytes:
        raise n.child("max_target_length").err(
            f"{limits.max_target_length} is not below max_header_bytes ({limits.max_header_bytes})",
            "the request-target is part of the head: lower it or raise max_header_bytes")
    return limits


def _bind_routes(root: Node, routes: tuple[Route, ...], auth: Authorization | None,
                 tls: TlsConfig) -> tuple[Route, ...]:
    """Every authorized route gets its device binding (its own, else authorization.device_binding;
    `device_binding: off` on a route turns the default off); binding needs client certificates."""
    raw = {r["name"]: r for r in root.value["routes"] if isinstance(r, dict)}
    out = []
    for r in routes:
        own = raw.get(r.name, {}).get("device_binding")
        if own is not None and not r.authorize:
            raise ConfigError(root.file, f"routes[{r.name}].device_binding", "is set on a route without authorize",
                              "device binding is part of the ActiveSync decision: add authorize: activesync")
        binding = r.device_binding if own is not None else (auth.device_binding if auth and r.authorize else None)
        if binding is not None and tls.client_certs.mode == "off":
            key = f"routes[{r.name}].device_binding" if own is not None else "authorization.device_binding"
            raise ConfigError(root.file, key, "needs client certificates, but tls.client_certs.mode is off",
                              "set tls.client_certs.mode: optional (or required) with the device CA")
        out.append(r if binding is r.device_binding else dataclasses.replace(r, device_binding=binding))
    if auth is not None and auth.identity.uses_certificate and tls.client_certs.mode == "off":
        raise ConfigError(root.file, "authorization.identity.user_from", "lists certificate, but tls.client_certs.mode is off",
                          "set tls.client_certs.mode: optional (or required) with the device CA")
    return tuple(out)


def _parse_audit(n: Node) -> AuditConfig:
    if n.value is None:
        return AuditConfig()
    n.mapping({"on_error": "deny (default) | allow",
               "queue_lines": "lines waiting to be written, e.g. 10000",
               "max_value_chars": "longest client value kept whole, e.g. 1024",
               "write_timeout_ms": "how long a request waits for its line, e.g. 1000"})
    d = AuditConfig()
    return AuditConfig(on_error=n.child("on_error").str(d.on_error, ("deny", "allow")),
                       queue_lines=n.child("queue_lines").int(d.queue_lines, 1, 10_000_000),
                       max_value_chars=n.child("max_value_chars").int(d.max_value_chars, 64, 1_000_000),
                       write_timeout_ms=n.child("write_timeout_ms").int(d.write_timeout_ms, 1, 600_000))


def _parse_proxy_protocol(n: Node) -> ProxyProtocol:
    import ipaddress

    n.mapping({"trusted": "a list of addresses or CIDRs of your balancers, e.g. [10.0.0.0/8]",
               "require": "true (a trusted peer must send a PROXY header) | false"}, required=("trusted",))
    t = n.child("trusted")
    trusted = t.strlist()
    if not trusted:
        raise t.err("is empty", "list the balancers' addresses, e.g. [10.0.0.0/8]")
    for i, cidr in enumerate(trusted):
        try:
            ipaddress.ip_network(cidr, strict=False)
        except ValueError:
            raise t.child(i).err(f"'{cidr}' is not an IP address or CIDR", "e.g. 10.0.0.0/8 or 192.0.2.10")
    return ProxyProtocol(trusted=tuple(trusted), require=n.child("require").bool(True))


def _parse_tls(n: Node, base: Path) -> TlsConfig:
    n.mapping(
        {
            "certificate": "a PEM file with the certificate, its chain and (unless 'key' is given) its key",
            "key": "a PEM private key file, when it is not inside 'certificate'",
            "min_version": "TLS1_2 or TLS1_3",
            "client_certs": "{mode: optional, ca: [device-ca.pem, root-ca.pem]}",
            "session_ticket_key": "a file of 80 random bytes (openssl rand 80 > ticket.key) shared by the gateway nodes",
        },
        required=("certificate",),
    )
    cert = n.child("certificate").path(base)
    key = n.child("key").path(base)
    minv = n.child("min_version").str("TLS1_2", ("TLS1_2", "TLS1_3"))
    cc = ClientCerts()
    c = n.child("client_certs")
    if c.value is not None:
        c.mapping({"mode": "off | optional | required",
                   "ca": "a list of CA PEM files, or of {file: ca.pem, revocation: optional, ...}",
                   "on_invalid": "reject | untrusted"})
        mode = _off_or(c.child("mode"), "off", CLIENT_CERT_MODES)
        cas = c.child("ca")
        if isinstance(cas.value, list):
            trusted = tuple(_parse_trusted_ca(cas.child(i), base) for i in range(len(cas.value)))
        elif cas.value:
            trusted = (_parse_trusted_ca(cas, base),)
        else:
            trusted = ()
        if mode != "off" and not trusted:
            raise cas.err("missing", "list the CA files that issue device certificates (device CA and root CA)")
        cc = ClientCerts(mode=mode, ca=tuple(t.file for t in trusted),
                         on_invalid=c.child("on_invalid").str("reject", ON_INVALID_CERT), trusted=trusted)
    tk = n.child("session_ticket_key")
    ticket_key = tk.path(base)
    if ticket_key is not None:
        try:
            size = ticket_key.stat().st_size
        except OSError as e:
            raise tk.err(f"{ticket_key}: {e.strerror}", "make it readable by the gateway") from None
        if size != 80:
            raise tk.err(f"{ticket_key} holds {size} bytes, not 80", f"write a new one: openssl rand 80 > {ticket_key}")
    return TlsConfig(certificate=cert, key=key, min_version=minv, client_certs=cc, session_ticket_key=ticket_key)


def _off_or(n: Node, default: str, choices: tuple[str, ...]) -> str:
    """A mode whose first choice is `off`: YAML 1.1 reads a bare `off` as false (and `on` as true)."""
    if n.value is False:
        return "off"
    if n.value is True:
        raise n.err("'on'/'true' is not a mode", f"use one of {', '.join(choices)}")
    return n.str(default, choices)


TRUSTED_CA_KEYS = {
    "file": "the CA's PEM file",
    "revocation": "off | optional | mandatory",
    "ocsp": "true | false: ask an OCSP responder (default true)",
    "ocsp_url": "http://host:port/ of the OCSP responder (default: the certificate's AIA)",
    "ocsp_timeout_ms": "milliseconds (default 1000)",
    "ocsp_cache_max_s": "seconds an OCSP answer is cached at most (default 3600; 0 = never)",
    "crl": "a CRL file (PEM or DER) signed by this CA; reloaded when it changes",
}


def _parse_trusted_ca(n: Node, base: Path) -> TrustedCa:
    if isinstance(n.value, str):
        return TrustedCa(file=n.path(base), key=n.key)
    if not isinstance(n.value, dict):
        raise n.err(f"must be a CA file path or a mapping, got {kind(n.value)}",
                    "e.g. device-ca.pem or {file: device-ca.pem, revocation: optional}")
    n.mapping(TRUSTED_CA_KEYS, required=("file",))
    file = n.child("file").path(base)
    mode = _off_or(n.child("revocation"), "off", REVOCATION_MODES)
    ocsp = n.child("ocsp").bool(True)
    u = n.child("ocsp_url")
    url = u.str()
    if url is not None:
        parts = urllib.parse.urlsplit(url)
        try:
            parts.port
        except ValueError:
            raise u.err(f"'{url}' has an invalid port", "e.g. http://ocsp.example.internal:8888/")
        if parts.scheme != "http" or not parts.hostname or parts.username or parts.fragment:
            raise u.err(f"'{url}' is not an http:// URL",
                        "OCSP is served over plain HTTP (the answers are signed), e.g. http://127.0.0.1:8888/")
    crl = n.child("crl").path(base)
    rev = Revocation(
        mode=mode, ocsp=ocsp, ocsp_url=url,
        ocsp_timeout_ms=n.child("ocsp_timeout_ms").int(1000, 1, 60_000),
        ocsp_cache_max_s=n.child("ocsp_cache_max_s").int(3600, 0, 7 * 86400),
        crl=crl,
    )
    if mode != "off" and not ocsp and crl is None:
        raise n.err(f"revocation is {mode} but OCSP is off and there is no crl",
                    "add 'crl: device-ca.crl', or remove 'ocsp: false'")
    return TrustedCa(file=file, revocation=rev, key=n.key)


def parse_upstream(s: str) -> Upstream:
    u = urllib.parse.urlsplit(s)
    if u.scheme not in ("http", "https") or not u.hostname:
        raise ValueError(f"'{s}' is not an http:// or https:// URL")
    if u.path not in ("", "/") or u.query or u.fragment or u.username:
        raise ValueError(f"'{s}' must be scheme://host[:port] only")
    try:
        port = u.port or (443 if u.scheme == "https" else 80)
    except ValueError:
        raise ValueError(f"'{s}' has an invalid port")
    return Upstream(u.scheme, u.hostname, port)


def _parse_pools(n: Node, base: Path) -> dict[str, Pool]:
    if not isinstance(n.value, dict) or not n.value:
        raise n.err("must be a mapping of pool names to pools", "e.g. pools: {exchange: {servers: [https://exchange.internal]}}")
    pools = {}
    for name in n.value:
        p = n.child(name)
        p.mapping(
            {
                "servers": "a list of http(s)://host:port",
                "ca": "CA file for https upstreams",
                "verify": "true | false",
                "sni": "server name for https upstreams",
                "host_header": "client | upstream | host[:port]",
                "connect_timeout_s": "seconds",
                "response_timeout_s": "seconds",
                "long_poll_timeout_s": "seconds (ActiveSync Ping/Sync)",
                "down_time_s": "seconds",
            },
            required=("servers",),
        )
        servers = []
        s = p.child("servers")
        for i, url in enumerate(s.strlist()):
            try:
                servers.append(parse_upstream(url))
            except ValueError as e:
                raise s.child(i).err(str(e), "use e.g. https://exchange.internal:443")
        if not servers:
            raise s.err("is empty", "list at least one server")
        hh = p.child("host_header").str("client")
        pools[name] = Pool(
            name=name, servers=tuple(servers), ca=p.child("ca").path(base), verify=p.child("verify").bool(True),
            sni=p.child("sni").str(), host_header=hh,
            connect_timeout_s=p.child("connect_timeout_s").num(5.0, 0.1),
            response_timeout_s=p.child("response_timeout_s").num(120.0, 0.1),
            long_poll_timeout_s=p.child("long_poll_timeout_s").num(3660.0, 1),
            down_time_s=p.child("down_time_s").num(10.0, 0),
        )
    return pools


ROUTE_KEYS = {
    "name": "a unique name",
    "priority": "a number; lower goes first",
    "match": "'any' or {path_prefix: ..., ...}",
    "pool": "a pool name",
    "authorize": "activesync",
    "client_cert_header": f"a header name, usually {DEFAULT_CERT_HEADER}",
    "device_binding": "off, or {device_id: ..., user: ...}: this route's own device binding",
    "rewrite_redirects": "true, or {public_hosts: [mail.example.com]}: keep internal hosts out of redirects",
    "enforce": "true | false (false: report-only, with authorize)",
}
MATCH_KEYS = {
    "path_prefix": "/Microsoft-Server-ActiveSync",
    "ignore_case": "true | false",
    "host": "a host name or a list of them",
    "method": "a method or a list",
    "header_present": "a header name or a list",
    "header_equals": "{Header-Name: value}",
    "client_cert": "present | absent | verified | unverified",
    "filter": "a mitmproxy filter expression, e.g. '~h X-Foo'",
}
_HEADER_NAME = re.compile(r"^[!#$%&'*+\-.^_`|~0-9A-Za-z]+$")


def _parse_routes(n: Node, pools: dict[str, Pool]) -> tuple[Route, ...]:
    if not isinstance(n.value, list) or not n.value:
        raise n.err("must be a non-empty list of routes", "see docs/configuration.md")
    routes: list[Route] = []
    names: set[str] = set()
    for i in range(len(n.value)):
        r = n.child(i)
        r.mapping(ROUTE_KEYS, required=("name", "priority", "pool"))
        name = r.child("name").str()
        if name in names:
            raise r.child("name").err(f"route '{name}' is defined twice", "give every route its own name")
        names.add(name)
        prio = r.child("priority").int(lo=0, hi=2**31)
        pool = r.child("pool").str()
        if pool not in pools:
            raise r.child("pool").err(f"no pool named '{pool}'", f"use one of {', '.join(pools)} or add it under pools")
        authorize = r.child("authorize").str(None, ("activesync",))
        cert_header = r.child("client_cert_header").str()
        if cert_header is not None and not _HEADER_NAME.match(cert_header):
            raise r.child("client_cert_header").err(f"'{cert_header}' is not a valid header name")
        enforce = r.child("enforce").bool(True)
        if not enforce and authorize is None:
            raise r.child("enforce").err("is false on a route that does not authorize",
                                         "add 'authorize: activesync' or remove 'enforce'")
        binding = parse_binding(r.child("device_binding")) if r.child("device_binding").value is not None else None
        routes.append(Route(name=name, priority=prio, match=_parse_match(r.child("match")), pool=pool,
                            authorize=authorize, client_cert_header=cert_header, device_binding=binding,
                            rewrite_redirects=_parse_rewrite(r.child("rewrite_redirects")), enforce=enforce))
    prios = [r.priority for r in routes]
    for r in routes:
        if prios.count(r.priority) > 1:
            raise ConfigError(n.file, f"routes[{r.name}].priority", f"priority {r.priority} is used twice",
                              "priorities decide the order: give every route its own")
    return tuple(sorted(routes, key=lambda r: r.priority))


def _parse_rewrite(n: Node) -> RewriteRedirects | None:
    if n.value is None or n.value is False:
        return None
    if n.value is True:
        return RewriteRedirects()
    n.mapping({"public_hosts": "the public host names a redirect may name, e.g. [mail.example.com]"})
    return RewriteRedirects(public_hosts=tuple(h.lower() for h in n.child("public_hosts").strlist()))


def _parse_match(m: Node) -> Match | None:
    if m.value is None:
        return None
    if m.value == "any" or m.value is True:
        return Match(any=True)
    m.mapping(MATCH_KEYS)
    if not m.value:
        raise m.err("is empty", "write 'match: any' to match every request")
    prefix = m.child("path_prefix").str()
    if prefix is not None and not prefix.startswith("/"):
        raise m.child("path_prefix").err(f"'{prefix}' does not start with /", "write it as /Path")
    eq = m.child("header_equals")
    equals: tuple[tuple[str, str], ...] = ()
    if eq.value is not None:
        if not isinstance(eq.value, dict) or not all(isinstance(v, str) for v in eq.value.values()):
            raise eq.err("must be a mapping of header name -> value", "e.g. {X-Mdm: yes}")
        equals = tuple((str(k), v) for k, v in eq.value.items())
    flt = m.child("filter").str()
    if flt is not None:
        from mitmproxy import (
            flowfilter,  # the only mitmproxy import here: the filter language
        )

        try:
            flowfilter.parse(flt)
        except ValueError as e:
            raise m.child("filter").err(f"invalid mitmproxy filter: {e}", "see mitmproxy's filter expressions")
    return Match(
        path_prefix=normalize_path(prefix) if prefix else None,
        ignore_case=m.child("ignore_case").bool(False),
        hosts=tuple(host_of(h) for h in m.child("host").strlist()),
        methods=tuple(x.upper() for x in m.child("method").strlist()),
        header_present=m.child("header_present").strlist(),
        header_equals=equals,
        client_cert=m.child("client_cert").str(None, CERT_MATCH),
        filter=flt,
    )


def _parse_changes(n: Node, connector: urllib.parse.SplitResult) -> str | None:
    """`connector.changes`: true is the feed of the connector the callouts go to; a URL another one."""
    v = n.value
    if v is None or v is False:
        return None
    if v is True:
        return urllib.parse.urlunsplit((connector.scheme, connector.netloc, CHANGES_PATH, "", ""))
    u = urllib.parse.urlsplit(v) if isinstance(v, str) else None
    if u is None or u.scheme not in ("http", "https") or not u.hostname or u.query:
        raise n.err(f"'{one_line(str(v), 80)}' is neither true nor an http(s) URL without a query",
                    f"use true (the connector's {CHANGES_PATH}) or e.g. http://127.0.0.1:9080{CHANGES_PATH}")
    return v


def _parse_redis(n: Node) -> str | None:
    url = n.str()
    if url is None:
        return None
    u = urllib.parse.urlsplit(url)
    if u.scheme not in ("redis", "rediss", "unix") or not (u.hostname or u.path):
        raise n.err(f"'{one_line(url, 80)}' is not a Redis URL", "e.g. redis://10.0.0.5:6379/0, or rediss:// for TLS")
    if importlib.util.find_spec("redis") is None:
        raise n.err("a shared cache on Redis needs the Redis client", "pip install 'easgate[cluster]'")
    try:  # what the client would refuse when the gate builds it (a port out of range, a bad option)
        u.port  # noqa: B018 - raises ValueError for a port that is not one
        importlib.import_module("redis.asyncio").from_url(url)  # parses only; connects to nothing
    except ValueError as e:
        raise n.err(f"'{one_line(url, 80)}' is not a Redis URL: {one_line(str(e), 120)}",
                    "e.g. redis://10.0.0.5:6379/0, or rediss:// for TLS") from None
    return url


def _parse_authorization(n: Node, base: Path) -> Authorization:
    n.mapping(
        {
            "applies_to": "{path_prefix, hosts, methods, commands, pass_methods}",
            "policy": "a policy YAML file",
            "connector": "{url: http://127.0.0.1:9080/services/ActiveSync/Authorize, timeout_ms: 2000}",
            "cache": "{allow_ttl_s, deny_ttl_s, max_entries, redis}",
            "on_connector_error": "deny | allow | stale",
            "stale_max_age_s": "seconds",
            "deny": "{mode: http | drop | activesync, status: 403}",
            "identity": "{user_from: [basic, query], certificate_user, user_match, bearer}",
            "device_binding": "{device_id: {from: san_uri, pattern: ...}, user: san_upn}: bind the DeviceId to the certificate",
            "revocations": "a file `easgate revoke` appends to and every worker follows",
            "commands": "{groups, rules: [{name, when, allow | deny}]}",
            "rate_limits": "[{name, requests, per_s, retry_after_s, commands}]",
        }
    )
    at = AppliesTo()
    a = n.child("applies_to")
    if a.value is not None:
        a.mapping({"path_prefix": "/Microsoft-Server-ActiveSync", "hosts": "list; empty = any",
                   "methods": "list, default [POST]", "commands": "list; empty = all",
                   "pass_methods": "list, default [OPTIONS]"})
        at = AppliesTo(
            path_prefix=a.child("path_prefix").str(at.path_prefix),
            hosts=tuple(host_of(h) for h in a.child("hosts").strlist()),
            methods=tuple(x.upper() for x in a.child("methods").strlist(at.methods)),
            commands=a.child("commands").strlist(),
            pass_methods=tuple(x.upper() for x in a.child("pass_methods").strlist(at.pass_methods)),
        )
    policy = n.child("policy").path(base)
    conn = None
    c = n.child("connector")
    if c.value is not None:
        c.mapping({"url": "http(s)://host:port/services/ActiveSync/Authorize", "timeout_ms": "milliseconds",
                   "max_concurrency": "parallel callouts", "ca": "CA file for an https connector",
                   "verify": "true | false",
                   "changes": "true (the connector's /services/easgate/changes) or its URL: learn of blocks at once"},
                  required=("url",))
        url = c.child("url").str()
        u = urllib.parse.urlsplit(url)
        try:
            u.port  # noqa: B018 - raises ValueError for a port that is not one
        except ValueError as e:
            raise c.child("url").err(f"'{url}' is not an http(s) URL: {e}",
                                     "e.g. http://127.0.0.1:9080/services/ActiveSync/Authorize") from None
        if u.scheme not in ("http", "https") or not u.hostname:
            raise c.child("url").err(f"'{url}' is not an http(s) URL",
                                     "e.g. http://127.0.0.1:9080/services/ActiveSync/Authorize")
        ca = c.child("ca").path(base)
        if ca is not None:
            try:  # what the gate's connector client loads when the config is swapped in
                ssl.create_default_context(cafile=str(ca))
            except ssl.SSLError as e:
                raise c.child("ca").err(f"{ca} holds no CA certificate ({e.reason or e})",
                                        "give a PEM file with the CA that issued the connector's certificate") from None
        conn = Connector(url=url, timeout_ms=c.child("timeout_ms").int(2000, 1, 600_000),
                         max_concurrency=c.child("max_concurrency").int(32, 1, 10_000),
                         ca=ca, verify=c.child("verify").bool(True),
                         changes=_parse_changes(c.child("changes"), u))
    if policy is None and conn is None:
        raise n.err("has neither a policy nor a connector", "add 'policy: policies/activesync-policy.yaml' or a connector")
    ch = n.child("cache")
    cache = CacheConfig()
    if ch.value is not None:
        ch.mapping({"allow_ttl_s": "seconds", "deny_ttl_s": "seconds", "max_entries": "entries",
                    "redis": "redis://host:6379/0: one cache for every gateway node (easgate[cluster])"})
        cache = CacheConfig(ch.child("allow_ttl_s").num(300.0), ch.child("deny_ttl_s").num(30.0),
                            ch.child("max_entries").int(100_000, 0, 100_000_000), _parse_redis(ch.child("redis")))
    d = n.child("deny")
    deny = DenyConfig()
    if d.value is not None:
        d.mapping({"mode": "http | drop | activesync", "action": "respond | drop",
                   "status": "an HTTP status, e.g. 403, 449, 503",
                   "body": "text", "retry_after_s": "seconds (with 503)"})
        action = d.child("action").str("respond", ("respond", "drop"))
        mode = d.child("mode").str("drop" if action == "drop" else "http", DENY_MODES)
        if d.has("action") and d.has("mode") and (action == "drop") != (mode == "drop"):
            raise d.child("mode").err(f"is {mode} but action is {action}", "keep only 'mode'")
        deny = DenyConfig(action="drop" if mode == "drop" else "respond", mode=mode,
                          status=d.child("status").int(403, 400, 599),
                          body=d.child("body").str(deny.body) if d.has("body") else deny.body,
                          retry_after_s=d.child("retry_after_s").int(None, 0, 86400))
    binding = parse_binding(n.child("device_binding")) if n.has("device_binding") else None
    return Authorization(
        applies_to=at, policy=policy, connector=conn, cache=cache,
        on_connector_error=n.child("on_connector_error").str("deny", FAIL_MODES),
        stale_max_age_s=n.child("stale_max_age_s").num(3600.0), deny=deny,
        identity=parse_identity(n.child("identity"), base), device_binding=binding,
        revocations=n.child("revocations").path(base, must_exist=False),
        commands=parse_command_rules(n.child("commands"), n.child("rate_limits")),
    )
