"""PROXY protocol v1 and v2 on the gateway's listener.

Behind a layer-4 balancer (HAProxy `send-proxy`/`send-proxy-v2`, a cloud NLB with proxy protocol)
every TCP connection comes from the balancer; the balancer prepends a PROXY header that names the
phone's real address. mitmproxy 12.3 does not read it, so easgate does, in front of the TLS
handshake:

    ReverseProxy -> [ProxyHeader: strip the header, set client.peername] -> NextLayer -> TLS -> HTTP

The header is accepted only from `proxy_protocol.trusted` peers; anybody else sending one is
refused (it would let any client choose the IP the connector and the audit log see). A trusted
peer that sends no header is refused too unless `require: false` (HAProxy's `accept-proxy` does
the same). `client.peername` then carries the phone's address for routing rules (`~src`), the
connector's `ip` parameter and the audit log; the balancer's address is logged at debug level.

The parser is pure (`parse_header`), the addon is one `next_layer` hook that acts only on the first
decision of a connection, so a connection without PROXY protocol costs one prefix comparison.
"""

from __future__ import annotations

import ipaddress
import logging
import struct
from dataclasses import dataclass

from mitmproxy.proxy import commands, events, layer
from mitmproxy.proxy.layers import modes

logger = logging.getLogger("easgate.proxyproto")

V1_PREFIX = b"PROXY "
V2_SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"
V1_MAX = 107  # the spec's longest v1 line, CRLF included
V2_MAX = 16 + 1024  # header plus a generous TLV allowance; real balancers send < 300 bytes


class ProxyHeaderError(ValueError):
    pass


@dataclass(frozen=True)
class ProxyHeader:
    version: int  # 1 or 2
    length: int  # bytes to strip
    source: tuple[str, int] | None  # None: LOCAL / UNKNOWN / unsupported family -> keep the real peer
    destination: tuple[str, int] | None = None


def classify(data: bytes) -> str:
    """"proxy" if data starts with a v1 or v2 signature, "maybe" if it is a shorter prefix of one
    (wait for more bytes), "no" otherwise. A TLS ClientHello (0x16...) is "no" from its first byte."""
    if data.startswith(V1_PREFIX) or data.startswith(V2_SIGNATURE):
        return "proxy"
    if V1_PREFIX.startswith(data[:6]) or V2_SIGNATURE.startswith(data[:12]):
        return "maybe"
    return "no"


def parse_header(data: bytes) -> ProxyHeader | None:
    """Parse a PROXY header at the start of data; None if more bytes are needed.

    Raises ProxyHeaderError if data is not a valid header.
    """
    if not data:
        return None
    if data[:1] == b"P":
        return _parse_v1(data)
    if data[:1] == b"\r":
        return _parse_v2(data)
    raise ProxyHeaderError("not a PROXY protocol header")


def _parse_v1(data: bytes) -> ProxyHeader | None:
    if data[:6] != V1_PREFIX[:min(6, len(data))]:
        raise ProxyHeaderError("not a PROXY protocol header")
    end = data.find(b"\r\n", 0, V1_MAX)
    if end < 0:
        if len(data) >= V1_MAX:
            raise ProxyHeaderError("PROXY v1 line longer than 107 bytes")
        return None
    try:
        parts = data[:end].decode("ascii").split(" ")
    except UnicodeDecodeError:
        raise ProxyHeaderError("PROXY v1 line is not ASCII")
    if len(parts) >= 2 and parts[1] == "UNKNOWN":
        return ProxyHeader(1, end + 2, None)
    if len(parts) != 6 or parts[1] not in ("TCP4", "TCP6"):
        raise ProxyHeaderError(f"malformed PROXY v1 line {data[:end]!r}")
    _, fam, src, dst, sport, dport = parts
    try:
        s, d = ipaddress.ip_address(src), ipaddress.ip_address(dst)
        if s.version != (4 if fam == "TCP4" else 6) or d.version != s.version:
            raise ValueError("address family mismatch")
        sp, dp = _port(sport), _port(dport)
    except ValueError as e:
        raise ProxyHeaderError(f"malformed PROXY v1 line {data[:end]!r}: {e}")
    return ProxyHeader(1, end + 2, (str(s), sp), (str(d), dp))


def _port(s: str) -> int:
    if not s.isdigit() or (len(s) > 1 and s[0] == "0") or int(s) > 65535:
        raise ValueError(f"bad port {s!r}")
    return int(s)


def _parse_v2(data: bytes) -> ProxyHeader | None:
    if data[:12] != V2_SIGNATURE[:min(12, len(data))]:
        raise ProxyHeaderError("not a PROXY protocol header")
    if len(data) < 16:
        return None
    ver_cmd, fam, length = data[12], data[13], struct.unpack("!H", data[14:16])[0]
    if ver_cmd >> 4 != 2:
        raise ProxyHeaderError(f"PROXY v2 header with version {ver_cmd >> 4}")
    cmd = ver_cmd & 0x0F
    if cmd not in (0, 1):
        raise ProxyHeaderError(f"PROXY v2 header with command {cmd}")
    if 16 + length > V2_MAX:
        raise ProxyHeaderError(f"PROXY v2 header of {16 + length} bytes is too long")
    if len(data) < 16 + length:
        return None
    total = 16 + length
    body = data[16:total]
    if cmd == 0:  # LOCAL: the balancer's own connection (health check); keep the real peer
        return ProxyHeader(2, total, None)
    af, proto = fam >> 4, fam & 0x0F
    if proto != 1:  # only STREAM (TCP) makes sense on this listener
        if proto == 0 and af == 0:
            return ProxyHeader(2, total, None)  # UNSPEC
        raise ProxyHeaderError(f"PROXY v2 header for transport {proto} (not TCP)")
    if af == 1:
        if length < 12:
            raise ProxyHeaderError("PROXY v2 TCP4 header too short")
        src, dst = ipaddress.IPv4Address(body[0:4]), ipaddress.IPv4Address(body[4:8])
        sp, dp = struct.unpack("!HH", body[8:12])
    elif af == 2:
        if length < 36:
            raise ProxyHeaderError("PROXY v2 TCP6 header too short")
        src, dst = ipaddress.IPv6Address(body[0:16]), ipaddress.IPv6Address(body[16:32])
        sp, dp = struct.unpack("!HH", body[32:36])
    else:  # AF_UNIX or unspecified: no IP to carry
        return ProxyHeader(2, total, None)
    return ProxyHeader(2, total, (str(src), sp), (str(dst), dp))


def build_v1(src: tuple[str, int], dst: tuple[str, int]) -> bytes:
    fam = "TCP6" if ipaddress.ip_address(src[0]).version == 6 else "TCP4"
    return f"PROXY {fam} {src[0]} {dst[0]} {src[1]} {dst[1]}\r\n".encode()


def build_v2(src: tuple[str, int] | None, dst: tuple[str, int] | None = None, tlvs: bytes = b"") -> bytes:
    """A v2 header (PROXY command), or LOCAL when src is None. For tests and benchmarks."""
    if src is None:
        return V2_SIGNATURE + bytes([0x20, 0x00]) + struct.pack("!H", len(tlvs)) + tlvs
    s = ipaddress.ip_address(src[0])
    d = ipaddress.ip_address((dst or ("0.0.0.0" if s.version == 4 else "::", 0))[0])
    body = s.packed + d.packed + struct.pack("!HH", src[1], (dst or ("", 0))[1]) + tlvs
    fam = 0x11 if s.version == 4 else 0x21
    return V2_SIGNATURE + bytes([0x21, fam]) + struct.pack("!H", len(body)) + body


# ------------------------------------------------------------------------------------------------
# Trust


class Trusted:
    def __init__(self, cidrs: tuple[str, ...]) -> None:
        self.nets = [ipaddress.ip_network(c, strict=False) for c in cidrs]

    def __contains__(self, host: str) -> bool:
        try:
            ip = ipaddress.ip_address(host.split("%", 1)[0])
        except ValueError:
            return False
        if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped:
            ip = ip.ipv4_mapped
        return any(ip in n for n in self.nets)


# ------------------------------------------------------------------------------------------------
# Layers


class _StripHeader(layer.Layer):
    """Drops the first n client bytes, then hands everything to a fresh NextLayer.

    It removes itself from the layer stack (like NextLayer does), so mitmproxy's NextLayer addon
    still sees a plain reverse-proxy stack and picks TLS + HTTP exactly as without PROXY protocol.
    """

    def __init__(self, context, n: int) -> None:
        super().__init__(context)
        self.context.layers.remove(self)
        self.remaining = n
        self.child = layer.NextLayer(context)

    def _handle_event(self, event: events.Event) -> layer.CommandGenerator[None]:
        if self.remaining and isinstance(event, events.DataReceived) and event.connection == self.context.client:
            cut = min(self.remaining, len(event.data))
            self.remaining -= cut
            if cut == len(event.data):
                return
            event = events.DataReceived(event.connection, event.data[cut:])
        yield from self.child.handle_event(event)


class _Refuse(layer.Layer):
    """Closes the client connection, whatever comes next."""

    def __init__(self, context) -> None:
        super().__init__(context)
        self.context.layers.remove(self)
        self.closed = False

    def _handle_event(self, event: events.Event) -> layer.CommandGenerator[None]:
        if not self.closed:
            self.closed = True
            yield commands.CloseConnection(self.context.client)


# ------------------------------------------------------------------------------------------------
# The addon


class ProxyProtocol:
    """Reads PROXY headers from trusted balancers; refuses them from anybody else."""

    def __init__(self) -> None:
        self.trusted: Trusted | None = None
        self.require = True
        self.counts = {"accepted": 0, "refused_untrusted": 0, "refused_missing": 0, "refused_invalid": 0}

    def apply(self, cfg) -> None:
        pp = cfg.proxy_protocol
        self.trusted = Trusted(pp.trusted) if pp else None
        self.require = pp.require if pp else True

    def next_layer(self, nextlayer: layer.NextLayer) -> None:
        ctx_ = nextlayer.context
        stack = ctx_.layers
        # Only the connection's first decision, right under the reverse-proxy mode layer.
        if not stack or not isinstance(stack[0], modes.ReverseProxy) or stack[0].child_layer is not nextlayer:
            return
        client = ctx_.client
        data = nextlayer.data_client()
        if not data:
            return
        peer = client.peername[0] if client.peername else ""
        trusted = self.trusted is not None and peer in self.trusted
        kind = classify(data)
        if kind == "maybe":
            self._decide(nextlayer, None)  # too few bytes to tell
            return
        if kind == "no":
            if trusted and self.require:
                self._decide(nextlayer, _Refuse(ctx_))
                self.counts["refused_missing"] += 1
                logger.warning(f"PROXY protocol: {peer} is a trusted balancer but sent no PROXY header; "
                               f"connection refused (proxy_protocol.require)")
            return  # an ordinary client: mitmproxy's own decision stands
        if not trusted:
            self._decide(nextlayer, _Refuse(ctx_))
            self.counts["refused_untrusted"] += 1
            logger.warning(f"PROXY protocol: header from untrusted peer {peer}; connection refused "
                           f"(add the balancer to proxy_protocol.trusted)")
            return
        try:
            header = parse_header(data)
        except ProxyHeaderError as e:
            self._decide(nextlayer, _Refuse(ctx_))
            self.counts["refused_invalid"] += 1
            logger.warning(f"PROXY protocol: invalid header from {peer}: {e}; connection refused")
            return
        if header is None:  # incomplete: wait for more bytes (mitmproxy's timeout still applies)
            self._decide(nextlayer, None)
            return
        self.counts["accepted"] += 1
        if header.source is not None:
            client.peername = header.source
            logger.debug(f"PROXY v{header.version} from {peer}: client {header.source[0]}:{header.source[1]}")
        self._decide(nextlayer, _StripHeader(ctx_, header.length))

    @staticmethod
    def _decide(nextlayer: layer.NextLayer, chosen: layer.Layer | None) -> None:
        # mitmproxy's NextLayer addon may already have decided on the header bytes (it runs first) and
        # its layers put themselves on the stack: take them off again, leaving the mode layer only.
        del nextlayer.context.layers[1:]
        nextlayer.layer = chosen
