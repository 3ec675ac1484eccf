"""The YAML text with comments: scalars quoted safely, and the pools, tls and authorization blocks."""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from .lexer import printable

_PLAIN = re.compile(r"^[A-Za-z_/][A-Za-z0-9_./:@+-]*$")
_YAML_WORDS = {"y", "n", "yes", "no", "on", "off", "true", "false", "null", "~"}


def ys(v) -> str:
    """A YAML scalar: plain when unambiguous, single-quoted otherwise, double-quoted with escapes
    when it holds a control character (which YAML would refuse or read differently)."""
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int):
        return str(v)
    s = str(v)
    if _PLAIN.match(s) and s.lower() not in _YAML_WORDS and ": " not in s and not s.endswith(":"):
        return s
    if printable(s) != s:
        return '"' + printable(s.replace("\\", "\\\\").replace('"', '\\"')) + '"'
    return "'" + s.replace("'", "''") + "'"


class Yaml:
    def __init__(self) -> None:
        self.lines: list[str] = []

    def line(self, s: str) -> None:
        self.lines.append(s)

    def blank(self) -> None:
        if self.lines and self.lines[-1] != "":
            self.lines.append("")

    def comment(self, s: str, indent: int = 0) -> None:
        self.lines.append(("  " * indent + "# " + printable(s)).rstrip())

    def kv(self, indent: int, k: str, v, note: str | None = None) -> None:
        self.lines.append("  " * indent + f"{ys(k)}: {ys(v)}" + (f"  # {printable(note)}" if note else ""))

    def text(self) -> str:
        while self.lines and self.lines[-1] == "":
            self.lines.pop()
        return "\n".join(self.lines) + "\n"


@dataclass
class PoolOut:
    name: str
    servers: list[tuple[str, str | None]] = field(default_factory=list)
    comments: list[str] = field(default_factory=list)
    https: bool = False
    ca: str | None = None
    sni: str | None = None

    def emit(self, out: Yaml) -> None:
        for c in self.comments:
            out.comment(c, 1)
        out.line(f"  {ys(self.name)}:")
        out.line("    servers:")
        for url, note in self.servers:
            out.line(f"      - {ys(url)}" + (f"  # {note}" if note else ""))
        if self.ca:
            out.kv(2, "ca", self.ca)
        if self.sni:
            out.kv(2, "sni", self.sni)
        out.kv(2, "host_header", "client", "NetScaler passes the client's Host on")


@dataclass
class TlsOut:
    cert: tuple | None = None
    cas: list[tuple] = field(default_factory=list)
    mode: str = "off"
    mode_line: str | None = None
    chain: str | None = None  # the linked certkeys, when there are any

    def emit(self, out: Yaml) -> None:
        out.line("tls:")
        pem, key, src, hint, fill, name = self.cert
        out.comment(src, 1)
        if hint:
            out.comment(hint, 1)
        if self.chain:
            out.comment(f"link ssl certKey: NetScaler sends the chain {name} -> {self.chain}; the PEM must hold it", 1)
        chain = f", chain ({self.chain})" if self.chain else ", chain"
        out.kv(1, "certificate", pem, f"FILL IN: PEM with certificate{chain} and key of certkey {name} "
                                      f"(--cert {name.strip('[]')}=FILE)" if fill else None)
        if key:
            out.kv(1, "key", key)
        out.kv(1, "min_version", "TLS1_2", "NetScaler also allows TLS 1.0/1.1 unless disabled; easgate does not")
        out.line("  client_certs:")
        if self.mode_line:
            out.comment(self.mode_line, 2)
        out.kv(2, "mode", self.mode)
        if self.cas:
            out.line("    ca:")
            for pem, src, hint, fill, name, notes, entry in self.cas:
                out.comment(src, 3)
                if hint:
                    out.comment(hint, 3)
                for n in notes:
                    out.comment(n, 3)
                if entry:
                    text = "{" + ", ".join(f"{k}: {ys(v)}" for k, v in {"file": pem, **entry}.items()) + "}"
                else:
                    text = ys(pem)
                note = f"  # FILL IN: PEM of CA certkey {name} (--cert {name.strip('[]')}=FILE)" if fill else ""
                if not note and "FILL-IN" in text:
                    note = "  # FILL IN: the CRL file"
                out.line(f"      - {text}{note}")
        out.kv(2, "on_invalid", "reject", "a certificate that does not verify fails the handshake, as on NetScaler")


@dataclass
class CalloutOut:
    name: str
    lines: str
    url: str | None = None
    lb: str | None = None
    cache_ttl: int | None = None
    comments: list[str] = field(default_factory=list)
    guarded: bool = False  # the responder policies are in the file (else Citrix's sample is assumed)
    on_error: str = "allow"
    fail_reason: str = ""
    drop: bool = False

    @property
    def first_line(self) -> int:
        return int(self.lines.split(",")[0])

    def emit(self, out: Yaml) -> None:
        out.line("authorization:")
        out.comment("ActiveSync requests on `authorize: activesync` routes (POST to /Microsoft-Server-ActiveSync;", 1)
        out.comment("OPTIONS passes) are decided by the connector, as the XNC callout did", 1)
        out.line("  connector:")
        for c in self.comments:
            out.comment(c, 2)
        url = self.url or "http://FILL-IN-CONNECTOR:9080/services/ActiveSync/Authorize"
        out.kv(2, "url", url, "FILL IN" if "FILL-IN" in url else None)
        out.kv(2, "timeout_ms", 2000)
        if self.cache_ttl is not None:
            out.comment(f"-cacheForSecs {self.cache_ttl}" if self.cache_ttl else
                        "a callout without -cacheForSecs asks on every request: so does easgate", 1)
            out.line(f"  cache: {{allow_ttl_s: {self.cache_ttl}, deny_ttl_s: {self.cache_ttl}}}")
        else:
            out.comment("NetScaler calls out on every request (no -cacheForSecs); easgate caches answers per user and", 1)
            out.comment("device. Set both TTLs to 0 to ask the connector every time.", 1)
            out.line("  cache: {allow_ttl_s: 300, deny_ttl_s: 30}")
        if self.guarded:
            out.comment(f"fail mode from {self.fail_reason}", 1)
            if self.on_error == "allow":
                out.comment("NetScaler lets a request through when the callout fails: so does this config.", 1)
                out.comment("RECOMMENDED: on_connector_error: deny (or stale).", 1)
            out.line(f"  on_connector_error: {self.on_error}")
            if self.drop:
                out.comment("the responder action DROP/RESET closes the connection without an answer", 1)
                out.line("  deny: {action: drop}")
            else:
                out.comment("the responder action answers; easgate answers 403", 1)
                out.line("  deny: {status: 403}")
            return
        out.comment("!!! Citrix's setup is fail-open: when the connector does not answer, the request is ALLOWED.", 1)
        out.comment("!!! This import keeps that behaviour. RECOMMENDED: on_connector_error: deny (or stale).", 1)
        out.line("  on_connector_error: allow")
        out.comment("NetScaler's responder policy (not in the file) usually DROPs a denied request; easgate answers", 1)
        out.comment("403, which clients understand. Use deny: {action: drop} to drop instead.", 1)
        out.line("  deny: {status: 403}")
