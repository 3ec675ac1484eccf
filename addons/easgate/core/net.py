"""HOST:PORT and Host header parsing, once, so every part of easgate reads an address the same way.

IPv6 literals are bracketed in both (`[::1]:8443`, `Host: [2001:db8::1]:443`); a bare `::1` has
no port. Each function raises ValueError with a one-line reason (callers add file/key and fix).
"""

from __future__ import annotations

import ipaddress


def split_hostport(value: str) -> tuple[str, str | None]:
    """'host:port', '[v6]:port', '[v6]', 'host' or a bare IPv6 literal -> (host, port text or None).
    The host comes back without brackets; the port is not checked."""
    v = value.strip()
    if v.startswith("["):
        end = v.find("]")
        if end < 0:
            raise ValueError(f"'{value}' has an unclosed '['")
        rest = v[end + 1:]
        if rest and not rest.startswith(":"):
            raise ValueError(f"'{value}' has text after ']'")
        return v[1:end], (rest[1:] if rest else None)
    if v.count(":") > 1:  # a bare IPv6 literal: no port
        return v, None
    host, sep, port = v.rpartition(":")
    return (host, port) if sep else (v, None)


def parse_port(text: str, value: str) -> int:
    if not text.isdigit() or int(text) > 65535:
        raise ValueError(f"'{value}' has no valid port (0-65535)")
    return int(text)


def parse_listen(value: str, default_host: str = "127.0.0.1") -> tuple[str, int]:
    """A listen address: 'IP:PORT', '[IPv6]:PORT', ':PORT' or 'PORT' -> (ip, port). The host must be
    an IP address literal (what a socket binds to); port 0 picks a free port."""
    v = value.strip()
    if v.isdigit():
        return default_host, parse_port(v, value)
    host, port = split_hostport(v)
    if port is None:
        raise ValueError(f"'{value}' is not HOST:PORT")
    host = host or default_host
    try:
        ipaddress.ip_address(host)
    except ValueError:
        raise ValueError(f"'{host}' in '{value}' is not an IP address") from None
    return host, parse_port(port, value)


def host_of(host_header: str) -> str:
    """The host part of a Host header (or authority), lower-cased, without port or brackets."""
    try:
        host, _ = split_hostport(host_header)
    except ValueError:
        return host_header.strip().lower()
    return host.lower()
