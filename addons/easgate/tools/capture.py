"""Captured device traffic: WBXML request bodies and `easgate capture --sanitize`.

The captures in ``tests/captures/`` are mitmproxy flow files recorded by a real gateway
(``easgate run ... -- -w FILE``, mitmproxy's own Save addon: the gateway's ``flow.metadata``
decisions are saved with the flows) while ``scripts/make_captures.py`` drives real HTTP clients
through it. Before a capture is kept, the passwords are taken out::

    easgate capture --sanitize raw.mitm tests/captures/iphone-managed.mitm

`sanitize_flow` rewrites every ``Authorization`` / ``Proxy-Authorization`` header (requests and
responses): ``Basic`` credentials keep their user and get the password ``REDACTED``; any other
scheme (Bearer, Negotiate, NTLM, ...) keeps its scheme name and gets the token ``REDACTED``.
Nothing else in the flow changes: every other header, body, timestamp, connection record and
metadata entry is written back as it was read.

`wbxml` encodes ActiveSync XML as WBXML ([MS-ASWBXML]): the capture script builds the requests
real clients send (Provision, FolderSync, Sync, Ping, SendMail...) with it. The token tables below
are transcribed from [MS-ASWBXML] 2.1.2.1 for the tags the captures use; mitmproxy's built-in
WBXML contentview (its own, independent tables) decodes them again, which the tests check.
"""

from __future__ import annotations

import argparse
import base64
import binascii
import sys
from pathlib import Path

# ---------------------------------------------------------------------------------------------
# WBXML ([MS-ASWBXML])

SWITCH_PAGE, END, STR_I, OPAQUE = 0x00, 0x01, 0x03, 0xC3
WITH_CONTENT = 0x40
HEADER = bytes([0x03, 0x01, 0x6A, 0x00])  # WBXML 1.3, unknown public id, UTF-8, no string table

#: code page -> (namespace, {tag: token}); [MS-ASWBXML] 2.1.2.1.x
CODE_PAGES: dict[int, tuple[str, dict[str, int]]] = {
    0: ("AirSync", {
        "Sync": 0x05, "Responses": 0x06, "Add": 0x07, "Change": 0x08, "Delete": 0x09, "Fetch": 0x0A,
        "SyncKey": 0x0B, "ClientId": 0x0C, "ServerId": 0x0D, "Status": 0x0E, "Collection": 0x0F,
        "Class": 0x10, "CollectionId": 0x12, "GetChanges": 0x13, "MoreAvailable": 0x14,
        "WindowSize": 0x15, "Commands": 0x16, "Options": 0x17, "FilterType": 0x18,
        "Collections": 0x1C, "ApplicationData": 0x1D, "DeletesAsMoves": 0x1E, "MIMESupport": 0x22,
    }),
    2: ("Email", {"Subject": 0x14, "Read": 0x15, "To": 0x16, "From": 0x18, "DateReceived": 0x0F}),
    7: ("FolderHierarchy", {
        "DisplayName": 0x07, "ServerId": 0x08, "ParentId": 0x09, "Type": 0x0A, "Status": 0x0C,
        "Changes": 0x0E, "Add": 0x0F, "SyncKey": 0x12, "FolderSync": 0x16, "Count": 0x17,
    }),
    13: ("Ping", {
        "Ping": 0x05, "Status": 0x07, "HeartbeatInterval": 0x08, "Folders": 0x09, "Folder": 0x0A,
        "Id": 0x0B, "Class": 0x0C, "MaxFolders": 0x0D,
    }),
    14: ("Provision", {
        "Provision": 0x05, "Policies": 0x06, "Policy": 0x07, "PolicyType": 0x08, "PolicyKey": 0x09,
        "Data": 0x0A, "Status": 0x0B, "EASProvisionDoc": 0x0D, "DevicePasswordEnabled": 0x0E,
        "MinDevicePasswordLength": 0x14, "MaxInactivityTimeDeviceLock": 0x15,
        "MaxDevicePasswordFailedAttempts": 0x16, "AllowSimpleDevicePassword": 0x18,
        "RequireDeviceEncryption": 0x1D,
    }),
    17: ("AirSyncBase", {"BodyPreference": 0x05, "Type": 0x06, "TruncationSize": 0x07}),
    18: ("Settings", {
        "Status": 0x06, "Set": 0x08, "DeviceInformation": 0x16, "Model": 0x17, "IMEI": 0x18,
        "FriendlyName": 0x19, "OS": 0x1A, "OSLanguage": 0x1B, "PhoneNumber": 0x1C,
        "UserAgent": 0x20, "EnableOutboundSMS": 0x21, "MobileOperator": 0x22,
    }),
    21: ("ComposeMail", {
        "SendMail": 0x05, "SmartForward": 0x06, "SmartReply": 0x07, "SaveInSentItems": 0x08,
        "Source": 0x0B, "FolderId": 0x0C, "ItemId": 0x0D, "LongId": 0x0E, "InstanceId": 0x0F,
        "Mime": 0x10, "ClientId": 0x11, "Status": 0x12,
    }),
}
_TOKENS: dict[str, tuple[int, int]] = {
    f"{ns}:{tag}": (page, token) for page, (ns, tags) in CODE_PAGES.items() for tag, token in tags.items()
}

#: An element: ("Namespace:Tag", child, child, ...); a child is an element, a str (inline
#: string) or bytes (opaque data, e.g. the MIME of SendMail).
Element = tuple


def E(tag: str, *children) -> Element:
    return (tag, *children)


def _mb_uint32(n: int) -> bytes:
    out = [n & 0x7F]
    n >>= 7
    while n:
        out.append(0x80 | (n & 0x7F))
        n >>= 7
    return bytes(reversed(out))


def wbxml(root: Element) -> bytes:
    """Encode one element tree as an ActiveSync WBXML document."""
    out = bytearray(HEADER)
    page = [0]

    def emit(el: Element) -> None:
        tag, *children = el
        try:
            p, token = _TOKENS[tag]
        except KeyError:
            raise ValueError(f"no WBXML token for {tag!r} (add it to CODE_PAGES)") from None
        if p != page[0]:
            out.extend((SWITCH_PAGE, p))
            page[0] = p
        if not children:
            out.append(token)
            return
        out.append(token | WITH_CONTENT)
        for c in children:
            if isinstance(c, str):
                out.append(STR_I)
                out.extend(c.encode("utf-8") + b"\x00")
            elif isinstance(c, (bytes, bytearray)):
                out.append(OPAQUE)
                out.extend(_mb_uint32(len(c)) + bytes(c))
            else:
                emit(c)  # may switch the page; END is the same on every page
        out.append(END)

    emit(root)
    return bytes(out)


# ---------------------------------------------------------------------------------------------
# Sanitizing

REDACTED = "REDACTED"
AUTH_HEADERS = ("authorization", "proxy-authorization")


def redact_auth_value(value: str) -> str:
    """The same credentials without their secret: `Basic` keeps the user, others keep the scheme."""
    scheme, _, token = value.strip().partition(" ")
    if scheme.lower() == "basic":
        try:
            raw = base64.b64decode(token.strip(), validate=True)
        except (binascii.Error, ValueError):
            return f"{scheme} {REDACTED}"
        user, colon, _password = raw.partition(b":")
        if not colon:
            return f"{scheme} {REDACTED}"
        return f"{scheme} " + base64.b64encode(user + b":" + REDACTED.encode()).decode("ascii")
    if not token:
        return REDACTED
    return f"{scheme} {REDACTED}"


def _redact_headers(headers) -> int:
    """Rewrite the auth headers of one mitmproxy Headers object in place; returns how many changed."""
    fields = list(headers.fields)
    changed = 0
    for i, (name, value) in enumerate(fields):
        if name.decode("latin-1").lower() not in AUTH_HEADERS:
            continue
        new = redact_auth_value(value.decode("latin-1")).encode("latin-1")
        if new != value:
            fields[i] = (name, new)
            changed += 1
    if changed:
        headers.fields = tuple(fields)
    return changed


def sanitize_flow(flow) -> int:
    """Redact the credentials of one flow in place; returns the number of headers changed."""
    from mitmproxy import http

    if not isinstance(flow, http.HTTPFlow):
        return 0
    n = _redact_headers(flow.request.headers)
    if flow.response is not None:
        n += _redact_headers(flow.response.headers)
    return n


def sanitize_file(src: Path, dst: Path) -> tuple[int, int]:
    """Copy a flow file with its credentials redacted; returns (flows, headers changed)."""
    from mitmproxy import io

    flows = []
    with open(src, "rb") as f:
        flows = list(io.FlowReader(f).stream())
    changed = sum(sanitize_flow(fl) for fl in flows)
    dst.parent.mkdir(parents=True, exist_ok=True)  # captures/NAME.mitm: the directory may be new
    tmp = dst.with_name(dst.name + ".tmp")
    with open(tmp, "wb") as f:
        w = io.FlowWriter(f)
        for fl in flows:
            w.add(fl)
    tmp.replace(dst)
    return len(flows), changed


def read_flows(path: str | Path) -> list:
    from mitmproxy import io

    with open(path, "rb") as f:
        return list(io.FlowReader(f).stream())


def cmd_capture(args) -> int:
    if not args.sanitize:
        print("easgate capture: nothing to do; use --sanitize IN OUT", file=sys.stderr)
        return 2
    src, dst = (Path(p) for p in args.sanitize)
    from mitmproxy import exceptions

    try:
        n, changed = sanitize_file(src, dst)
    except (OSError, exceptions.FlowReadException) as e:
        print(f"easgate capture: cannot sanitize {src}: {e}", file=sys.stderr)
        return 1
    print(f"{dst}: {n} flows, {changed} credential headers redacted")
    return 0


def add_commands(sub: argparse._SubParsersAction) -> None:
    s = sub.add_parser("capture", help="work on captured device traffic (mitmproxy flow files)",
                       description="Work on captured device traffic. --sanitize copies a flow file with the "
                       "passwords in Authorization (and Proxy-Authorization) replaced by REDACTED; Basic "
                       "credentials keep their user. Everything else is written back unchanged.")
    s.add_argument("--sanitize", nargs=2, metavar=("IN", "OUT"), help="copy IN to OUT without passwords")
    s.set_defaults(fn=cmd_capture)

