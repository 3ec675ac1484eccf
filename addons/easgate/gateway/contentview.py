"""The gateway in mitmweb: an "ActiveSync" contentview and flow annotations.

`ActiveSyncContentview` shows, for an ActiveSync request, who is asking as the gateway decodes it
(``easgate.identity.parse_request``: user, DeviceId, DeviceType, command, protocol version,
policy key...) for both MS-ASHTTP query forms: the plain ``?Cmd=&User=&DeviceId=&DeviceType=``
parameters, or the base64-encoded binary query byte by byte (version, command code, locale, the
DeviceId, possibly binary, shown as hex, policy key, tagged parameters). Under it: the route, the
decision and the client certificate the gateway recorded on the flow.

Its priority (0.5) is below mitmproxy's built-in WBXML view (1.0): a request with a WBXML body
still opens in the WBXML view, and "ActiveSync" is one click away in the view selector; requests
without a body (OPTIONS, most base64-form requests' interesting part is the query) open in it.

`WebAnnotations` (an addon after the gateway's) registers the view, comments flows that the
gateway routed without an authorization decision (``route mdm``; decided flows already carry
``route NAME: COMMAND: allow|deny: reason [source] (rule RULE)``), and adds mitmweb's "comment" column to the flow list unless
``web_columns`` was set explicitly.
"""

from __future__ import annotations

import logging
from urllib.parse import parse_qsl

from mitmproxy import contentviews, ctx, http
from mitmproxy.contentviews import Contentview, Metadata

from ..authz import identity
from ..core import keys

logger = logging.getLogger("easgate")

AS_PREFIX = "/microsoft-server-activesync"
OPTIONS_FLAGS = {0x01: "SaveInSent", 0x02: "AcceptMultiPart"}


def is_activesync(req: http.Request) -> bool:
    return req.path.split("?", 1)[0].lower().startswith(AS_PREFIX)


def _hex(b: bytes) -> str:
    return b.hex(" ")


def _binary_query(query: str) -> dict:
    """The base64 query value, field by field ([MS-ASHTTP] 2.2.1.1.1.1)."""
    import base64
    import binascii
    from urllib.parse import unquote

    out: dict = {}
    try:
        raw = base64.b64decode(unquote(query), validate=True)
    except (binascii.Error, ValueError):
        return {"error": "not base64"}
    out["bytes"] = _hex(raw)
    try:
        q = identity.decode_binary_query(raw)
    except ValueError as e:
        out["error"] = str(e)
        return out
    out["protocol version"] = f"{raw[0]} ({q.version})"
    out["command code"] = f"{raw[1]} ({q.command})"
    out["locale"] = f"0x{q.locale:04x}"
    dev_text, binary = identity.device_id_text(q.device_id)
    out["device id"] = (f"{len(q.device_id)} bytes, binary: {_hex(q.device_id)}" if binary
                        else f"{len(q.device_id)} bytes: {dev_text}")
    out["policy key"] = "none" if q.policy_key is None else q.policy_key
    out["device type"] = q.device_type
    params = {}
    for name, value in q.params.items():
        if isinstance(value, bytes):
            flags = [n for bit, n in OPTIONS_FLAGS.items() if value and value[0] & bit]
            params[name] = f"0x{value.hex()}" + (f" ({', '.join(flags)})" if flags else "")
        else:
            params[name] = value
    if params:
        out["parameters"] = params
    return out


def describe(flow: http.HTTPFlow) -> dict:
    """Everything the view shows, as a mapping (YAML-dumped by the view)."""
    req = flow.request
    peer = flow.client_conn.peername[0] if flow.client_conn and flow.client_conn.peername else ""
    ident = identity.parse_request(req.method, "https", req.host_header or "", req.path, req.headers, peer)
    who = {
        "query form": {"plain": "plain (MS-ASHTTP 2.2.1.1.1.2)", "base64": "base64 (MS-ASHTTP 2.2.1.1.1.1)",
                       "empty": "none"}[ident.query_form],
        "command": ident.command,
        "user": f"{ident.user} (from {'Authorization: Basic' if ident.user_source == 'basic' else 'the query'})"
        if ident.user else None,
        "device id": (f"{ident.device_id} (binary, shown as hex)" if ident.device_id_binary else ident.device_id),
        "device type": ident.device_type,
        "protocol version": ident.protocol_version,
        "policy key": ident.policy_key,
        "user agent": ident.user_agent,
        "client ip": ident.client_ip or None,
    }
    if ident.locale is not None:
        who["locale"] = f"0x{ident.locale:04x}"
    if ident.error:
        who["malformed"] = ident.error
    out: dict = {"ActiveSync request": {k: v for k, v in who.items() if v is not None}}
    query = req.path.partition("?")[2]
    if ident.query_form == "base64":
        out["base64 query"] = _binary_query(query)
    elif ident.query_form == "plain":
        out["plain query"] = {k: v for k, v in parse_qsl(query, keep_blank_values=True)}
    m = flow.metadata
    gw: dict = {}
    if keys.ROUTE in m:
        gw["route"] = m[keys.ROUTE] or "(none: 404)"
    d = m.get(keys.DECISION)
    if d:
        gw["decision"] = f"{'allow' if d.get('allow') else 'deny'} ({d.get('source')}): {d.get('reason')}"
        if d.get("enforced") is False:
            gw["enforced"] = "no (shadow mode: enforce: false)"
        if d.get("closed_by"):
            gw["closed while held"] = d["closed_by"]
        # every decided flow says which command it was and which command rule (or rate limit) applied
        gw["command"] = ident.command or "none (the request names no ActiveSync command)"
        gw["rule"] = m.get(keys.RULE) or "none (no command rule or rate limit applied)"
        if m.get(keys.ANSWER):
            gw["answered with"] = m[keys.ANSWER]
    elif m.get(keys.REFUSED):
        gw["decision"] = f"refused: {m['easgate.refused']}"
    elif m.get(keys.ROUTE):
        gw["decision"] = "none (the route does not authorize)"
    cc = m.get(keys.CLIENT_CERT)
    if cc:
        gw["client certificate"] = cc.get("status") + (f", {cc['subject']}" if cc.get("subject") else "") + (
            f" ({cc['reason']})" if cc.get("reason") and cc.get("status") == "invalid" else "")
    if m.get(keys.UPSTREAM):
        gw["upstream"] = m[keys.UPSTREAM]
    rec = m.get(keys.RECORDED)
    if rec:
        gw["recorded in the capture"] = f"route={rec.get('route') or '-'} {rec.get('decision')}: {rec.get('reason')}"
    if gw:
        out["gateway"] = gw
    return out


def render(d: dict, indent: int = 0) -> str:
    """`key: value` lines, nested mappings indented: YAML-like, without YAML's quoting."""
    out = []
    for k, v in d.items():
        if isinstance(v, dict):
            out.append(f"{' ' * indent}{k}:")
            out.append(render(v, indent + 2))
        else:
            out.append(f"{' ' * indent}{k}: {v}")
    return "\n".join(out)


class ActiveSyncContentview(Contentview):
    """Decoded ActiveSync identity (both query forms), route and decision of a request."""

    syntax_highlight = "yaml"

    def prettify(self, data: bytes, metadata: Metadata) -> str:
        flow = metadata.flow
        if not isinstance(flow, http.HTTPFlow):
            raise ValueError("not an HTTP flow")
        if not is_activesync(flow.request):
            raise ValueError("not an ActiveSync request (/Microsoft-Server-ActiveSync)")
        return render(describe(flow))

    def render_priority(self, data: bytes, metadata: Metadata) -> float:
        msg = metadata.http_message
        if isinstance(msg, http.Request) and isinstance(metadata.flow, http.HTTPFlow) and is_activesync(msg):
            return 0.5  # below WBXML (1.0), above query (0.3) and raw (0.1)
        return -1


activesync_view = ActiveSyncContentview()


def register_view() -> None:
    if activesync_view.name.lower() not in contentviews.registry:
        contentviews.add(activesync_view)


class WebAnnotations:
    """The view, a comment on routed flows without a decision, mitmweb's comment column."""

    name = "easgate-web"

    def load(self, loader) -> None:
        register_view()

    def requestheaders(self, flow: http.HTTPFlow) -> None:
        m = flow.metadata
        route = m.get(keys.ROUTE)
        if route and keys.DECISION not in m and not flow.comment:
            flow.comment = f"route {route}"

    def running(self) -> None:
        opts = ctx.options
        if "web_columns" in opts and not opts.has_changed("web_columns") and "comment" not in opts.web_columns:
            opts.update(web_columns=[*opts.web_columns, "comment"])
