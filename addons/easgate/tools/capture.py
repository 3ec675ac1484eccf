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

`wbxml` (from ``authz/wbxml.py``, re-exported here) encodes ActiveSync XML as WBXML ([MS-ASWBXML]):
the capture script builds the requests real clients send (Provision, FolderSync, Sync, Ping,
SendMail...) with it; mitmproxy's built-in WBXML contentview (its own, independent tables) decodes
them again, which the tests check.
"""

from __future__ import annotations

import argparse
import base64
import binascii
import sys
from pathlib import Path

from ..authz.wbxml import CODE_PAGES, E, Element, wbxml

__all__ = ["CODE_PAGES", "E", "Element", "wbxml", "read_flows", "redact_auth_value", "sanitize_file", "sanitize_flow"]

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

