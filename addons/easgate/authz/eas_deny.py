"""Deny answers an ActiveSync client understands, the way Exchange answers a blocked device.

A bare HTTP 403 is, for an EAS client, "the user is not enabled for ActiveSync" ([MS-ASHTTP]
2.2.2.1.1) and one of the errors after which it may run Autodiscover and retry ([MS-ASHTTP]
3.1.5.2.1): battery, load, and a user who never learns why. Exchange answers a device that is
blocked for this user differently, by protocol version:

* 14.0 and later: HTTP 200 with the command's own WBXML response carrying the common status code
  129 ``DeviceIsBlockedForThisUser`` ([MS-ASCMD] 2.2.2 "Common Status Codes"; the table lists
  the protocol versions of each value: 14.0, 14.1, 16.0, 16.1). The client shows "this device is
  blocked" and stops, it does not re-discover. Where the Status element sits in each response is
  given per command below with its [MS-ASCMD] section (Provision: [MS-ASPROV] 2.2.2.54).
* 2.5, 12.0, 12.1 (and a request without a known version): there are no common status codes
  before 14.0 ([MS-ASCMD] 2.2.2, "Protocol versions" column), and the per-command status values of
  those versions have none for a blocked device, so such a client gets HTTP 403 Forbidden, "the
  user is not enabled for ActiveSync synchronization" ([MS-ASHTTP] 2.2.2.1.1). (Not 449, which
  sends the client into Provision, nor 451, which redirects it: [MS-ASHTTP] 3.1.5.2.)
* Commands that have no WBXML response at all (GetAttachment, which only exists up to 12.1,
  [MS-ASCMD] 2.2.1.8; Find has its own code page mitmproxy cannot decode, so it is not built)
  also get HTTP 403.

A rate limit is answered with HTTP 503 and ``Retry-After`` for every version ([MS-ASHTTP]
2.2.2.1.1 "503 Service Unavailable", 3.2.5.1: the server MAY include Retry-After with the
seconds after which it expects to serve the request again; the client waits, [MS-ASHTTP]
3.1.5.2.3).
"""

from __future__ import annotations

from dataclasses import dataclass

from .wbxml import E, Element, wbxml

__all__ = ["ACCESS_DENIED_STATUS", "BLOCKED_STATUS", "COMMAND_BODIES", "WBXML_VERSIONS", "DenyAnswer", "blocked", "throttled"]

#: [MS-ASCMD] 2.2.2 common status 129 DeviceIsBlockedForThisUser: "The device has been blocked
#: for this user." (protocol versions 14.0, 14.1, 16.0, 16.1)
BLOCKED_STATUS = 129

#: [MS-ASCMD] 2.2.2 common status 130 AccessDenied: "The user is not allowed to perform that
#: request." (14.0, 14.1, 16.0, 16.1): a command a command-level rule refuses to an allowed device.
ACCESS_DENIED_STATUS = 130
STATUS_NAMES = {BLOCKED_STATUS: "DeviceIsBlockedForThisUser", ACCESS_DENIED_STATUS: "AccessDenied"}

#: Versions that understand common status codes in a command response ([MS-ASCMD] 2.2.2).
WBXML_VERSIONS = frozenset({"14.0", "14.1", "16.0", "16.1"})

WBXML_TYPE = "application/vnd.ms-sync.wbxml"  # [MS-ASHTTP] 2.2.2.1.2.1 Content-Type


def _top(cmd: str, ns: str):
    """<cmd><Status>n</Status></cmd>: the command's top-level Status."""
    return lambda st: E(f"{ns}:{cmd}", E(f"{ns}:Status", st))


def _nested(cmd: str, ns: str, wrap: str):
    """<cmd><wrap><Status>n</Status></wrap></cmd>: commands whose Status only lives in a child."""
    return lambda st: E(f"{ns}:{cmd}", E(f"{ns}:{wrap}", E(f"{ns}:Status", st)))


#: command -> the response document with a Status; the section is the command's Status element.
COMMAND_BODIES = {
    "Sync": _top("Sync", "AirSync"),                            # MS-ASCMD 2.2.3.177.17
    "Ping": _top("Ping", "Ping"),                               # MS-ASCMD 2.2.3.177.11
    "FolderSync": _top("FolderSync", "FolderHierarchy"),        # MS-ASCMD 2.2.3.177.5
    "FolderCreate": _top("FolderCreate", "FolderHierarchy"),    # MS-ASCMD 2.2.3.177.3
    "FolderDelete": _top("FolderDelete", "FolderHierarchy"),    # MS-ASCMD 2.2.3.177.4
    "FolderUpdate": _top("FolderUpdate", "FolderHierarchy"),    # MS-ASCMD 2.2.3.177.6
    "SendMail": _top("SendMail", "ComposeMail"),                # MS-ASCMD 2.2.3.177.14
    "SmartForward": _top("SmartForward", "ComposeMail"),        # MS-ASCMD 2.2.3.177.16
    "SmartReply": _top("SmartReply", "ComposeMail"),            # MS-ASCMD 2.2.3.177.16
    "ItemOperations": _top("ItemOperations", "ItemOperations"),  # MS-ASCMD 2.2.3.177.8
    "Settings": _top("Settings", "Settings"),                   # MS-ASCMD 2.2.3.177.15
    "Search": _top("Search", "Search"),                         # MS-ASCMD 2.2.3.177.13
    "ResolveRecipients": _top("ResolveRecipients", "ResolveRecipients"),  # MS-ASCMD 2.2.3.177.12
    "ValidateCert": _top("ValidateCert", "ValidateCert"),       # MS-ASCMD 2.2.3.177.18
    "Provision": _top("Provision", "Provision"),                # MS-ASPROV 2.2.2.54
    "GetItemEstimate": _nested("GetItemEstimate", "ItemEstimate", "Response"),  # MS-ASCMD 2.2.3.177.7
    "MoveItems": _nested("MoveItems", "Move", "Response"),      # MS-ASCMD 2.2.3.177.10
    "MeetingResponse": _nested("MeetingResponse", "MeetingResponse", "Result"),  # MS-ASCMD 2.2.3.177.9
}


@dataclass(frozen=True, slots=True)
class DenyAnswer:
    """The HTTP answer to one denied request: status, headers and body, and what it means."""

    status: int
    headers: dict[str, str]
    body: bytes
    eas_status: int | None  # the WBXML Status, when the body carries one
    why: str  # one line for the audit: "Sync Status 129 (14.1)", "HTTP 403 (12.1 has no common status)"


def blocked(command: str | None, protocol_version: str | None, text: str,
            status: int = BLOCKED_STATUS) -> DenyAnswer:
    """Exchange's answer to a device blocked for this user (or, status 130, to a request this user
    may not make), for this command and version."""
    build = COMMAND_BODIES.get(command or "")
    if build is not None and protocol_version in WBXML_VERSIONS:
        doc: Element = build(str(status))
        return DenyAnswer(200, {"Content-Type": WBXML_TYPE, "Cache-Control": "private"}, wbxml(doc), status,
                          f"{command} Status {status} {STATUS_NAMES[status]} (EAS {protocol_version})")
    if build is None:
        why = f"HTTP 403 ({command or 'no command'} has no WBXML status response)"
    else:
        why = f"HTTP 403 (EAS {protocol_version or 'version unknown'} has no common status codes)"
    return DenyAnswer(403, {"Content-Type": "text/plain; charset=utf-8", "Cache-Control": "no-store"},
                      text.encode(), None, why)


def throttled(retry_after_s: int, text: str) -> DenyAnswer:
    """HTTP 503 with Retry-After ([MS-ASHTTP] 2.2.2.1.1, 3.2.5.1): come back in retry_after_s."""
    return DenyAnswer(503, {"Content-Type": "text/plain; charset=utf-8", "Cache-Control": "no-store",
                            "Retry-After": str(retry_after_s)}, text.encode(), None,
                      f"HTTP 503 Retry-After {retry_after_s}")
