"""Parse one Exchange ActiveSync HTTP request into one :class:`Identity`.

Pure logic: no mitmproxy import, no I/O.  ``parse_request`` runs once per request, so the hot
path avoids regexes, avoids exceptions and builds as few objects as it can.

Wire formats, as in [MS-ASHTTP] "Exchange ActiveSync: HTTP Protocol" (revision 23.0, 2025-05-20):

* 2.2.1.1.1.2  plain text query value: ``Cmd=Sync&User=alice&DeviceId=...&DeviceType=...``
* 2.2.1.1.1.1  base64-encoded query value (protocol 12.1 and later), a byte sequence::

      Protocol version   1 byte    141 means "14.1"; SHOULD be 141/160/161, MAY be 140/121
      Command code       1 byte    table in 2.2.1.1.1.1.2
      Locale             2 bytes   an LCID, little-endian (the spec's own example
                                   ``jAAJBAp2MTQwRGV2aWNlAApTbWFydFBob25l`` carries 09 04 = 0x0409)
      Device ID length   1 byte    MUST be > 0
      Device ID          n bytes   a string or a GUID
      Policy key length  1 byte    only 0 or 4 are valid; 0 means no policy key
      Policy key         4 bytes   unsigned 32-bit, little-endian (the spec does not name the
                                   byte order; Exchange, Z-Push and Horde all read it as LE)
      Device type length 1 byte
      Device type        n bytes
      Command parameters           Encoded Parameter structures (2.2.1.1.1.1.1): tag byte,
                                   length byte (0..255), value; tags in 2.2.1.1.1.1.3
* 2.2.1.1.2.2  Authorization: Basic base64(user:password)
* 2.2.1.1.2.6 / 2.2.1.1.2.8  MS-ASProtocolVersion / X-MS-PolicyKey headers (plain form; the
  base64 form carries both in its byte sequence instead)

One identity: what the policy, the cache, the connector, the audit log and mitmweb see is exactly
what the upstream reads. So values outside the spec's alphabet are denied (``Identity.error``),
never re-encoded into something else ([MS-ASHTTP] 2.2.1.1.1.2 ABNF):

* DeviceId (plain form): ``device-id = 1*32(ALPHA / DIGIT)`` (2.2.1.1.1.2.3: "MUST NOT contain
  commas or special characters").
* User (``User=`` and the Basic user): ``user-name = 1*VCHAR``, printable ASCII without spaces,
  at most 1024 characters; nothing is stripped.
* DeviceType: ``device-type = 1*VCHAR``, at most 1024 characters.
* The binary DeviceId of the base64 form (2.2.1.1.1.1: "a string or a GUID", 1-16 bytes here) has
  one text form, used everywhere: the bytes themselves when they are all ASCII letters and digits
  (the plain form of the same device), otherwise their lowercase hex (``Identity.device_id_binary``
  is then True). A DeviceType or User parameter in the base64 form follows the rules above.
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from urllib.parse import parse_qsl, unquote

from ..core.decision import one_line

__all__ = [
    "COMMAND_CODES",
    "LEGACY_PLAIN_COMMANDS",
    "PARAMETER_TAGS",
    "BinaryQuery",
    "Identity",
    "decode_binary_query",
    "device_id_error",
    "device_id_text",
    "device_type_error",
    "identity_error",
    "user_error",
    "encode_binary_query",
    "parse_basic_auth",
    "parse_request",
]

# ---------------------------------------------------------------------------------------------
# Tables from the spec
# ---------------------------------------------------------------------------------------------

#: [MS-ASHTTP] 2.2.1.1.1.1.2 Command Codes.  Codes 5-8 are not assigned (they belonged to the
#: protocol 2.5 commands listed in LEGACY_PLAIN_COMMANDS, which cannot use the base64 form).
COMMAND_CODES: dict[int, str] = {
    0: "Sync",
    1: "SendMail",
    2: "SmartForward",
    3: "SmartReply",
    4: "GetAttachment",
    9: "FolderSync",
    10: "FolderCreate",
    11: "FolderDelete",
    12: "FolderUpdate",
    13: "MoveItems",
    14: "GetItemEstimate",
    15: "MeetingResponse",
    16: "Search",
    17: "Settings",
    18: "Ping",
    19: "ItemOperations",
    20: "Provision",
    21: "ResolveRecipients",
    22: "ValidateCert",
    23: "Find",
}

#: Protocol 2.5 commands that only exist in the plain text form; Exchange still lists them in
#: MS-ASProtocolCommands ([MS-ASHTTP] 2.2.2.1.2, example in 4.3).
LEGACY_PLAIN_COMMANDS: frozenset[str] = frozenset(
    {"GetHierarchy", "CreateCollection", "DeleteCollection", "MoveCollection"}
)

#: [MS-ASHTTP] 2.2.1.1.1.1.3 Command Parameters (tag -> name).  Tags 2 and 5 are unassigned
#: (older revisions had CollectionName / ParentId there); they are rejected as unknown.
PARAMETER_TAGS: dict[int, str] = {
    0: "AttachmentName",
    1: "CollectionId",
    3: "ItemId",
    4: "LongId",
    6: "Occurrence",
    7: "Options",
    8: "User",
}

#: Protocol version byte values allowed by [MS-ASHTTP] 2.2.1.1.1.1 (12.1 and later only).
BINARY_PROTOCOL_VERSIONS: dict[int, str] = {121: "12.1", 140: "14.0", 141: "14.1", 160: "16.0", 161: "16.1"}

#: MS-ASProtocolVersion header values allowed by [MS-ASHTTP] 2.2.1.1.2.6.
HEADER_PROTOCOL_VERSIONS: frozenset[str] = frozenset({"2.5", "12.0", "12.1", "14.0", "14.1", "16.0", "16.1"})

MAX_BINARY_DEVICE_ID = 16  # a GUID; the brief's limit (the spec itself only says "> 0")
MAX_DEVICE_ID = 32  # [MS-ASHTTP] 2.2.1.1.1.2: device-id = 1*32(ALPHA / DIGIT)
MAX_VALUE_CHARS = 1024  # User / DeviceType (the spec sets no maximum; ours)
MAX_QUERY_CHARS = 8192
MAX_QUERY_FIELDS = 64

_COMMAND_BY_LOWER: dict[str, str] = {n.lower(): n for n in COMMAND_CODES.values()}
_COMMAND_BY_LOWER.update({n.lower(): n for n in LEGACY_PLAIN_COMMANDS})
_CODE_BY_COMMAND: dict[str, int] = {n.lower(): c for c, n in COMMAND_CODES.items()}
_TAG_BY_PARAMETER: dict[str, int] = {n.lower(): t for t, n in PARAMETER_TAGS.items()}
_STRING_TAGS = frozenset(t for t, n in PARAMETER_TAGS.items() if n != "Options")
_OPTIONS_TAG = 7
_USER_TAG = 8


# ---------------------------------------------------------------------------------------------
# Data types
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Identity:
    """Who and what one ActiveSync request claims to be.  ``error`` is None only when the
    request was well-formed; otherwise it is a one-line reason and unreadable fields are None."""

    user: str | None
    user_source: str  # "basic" | "query" | "none"; after principal.py also "certificate" | "bearer"
    device_id: str | None
    device_id_binary: bool
    device_type: str | None
    command: str | None
    protocol_version: str | None
    policy_key: str | None
    user_agent: str | None
    client_ip: str
    url: str
    query_form: str  # "plain" | "base64" | "empty"
    locale: int | None
    error: str | None
    # Filled by principal.py from the verified client certificate (device binding, certificate user).
    cert_device_id: str | None = None
    cert_user: str | None = None


@dataclass(frozen=True, slots=True)
class BinaryQuery:
    """One decoded base64 query value ([MS-ASHTTP] 2.2.1.1.1.1)."""

    version: str  # "14.1"
    command: str  # "Sync"
    locale: int  # LCID, e.g. 1033
    device_id: bytes
    policy_key: int | None
    device_type: str
    params: dict[str, str | bytes] = field(default_factory=dict)  # Options stays bytes


# ---------------------------------------------------------------------------------------------
# Small helpers
# ---------------------------------------------------------------------------------------------


def _clip(s: str, n: int = 40) -> str:
    """repr() of at most n characters: safe to put in a one-line error message."""
    return repr(s if len(s) <= n else s[:n] + "...")


def _is_vchar_str(s: str) -> bool:
    return s.isascii() and s.isprintable() and " " not in s


def _utf8_ok(s: str) -> bool:
    """False if s holds lone surrogates, i.e. bytes that were not UTF-8 (surrogateescape)."""
    if s.isascii():
        return True
    try:
        s.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def device_id_text(raw: bytes) -> tuple[str, bool]:
    """(device id as reported, binary?) for the DeviceId bytes of the base64 query form: ASCII
    letters and digits as they are (the plain form of the same id), anything else lowercase hex."""
    if raw.isalnum() and raw.isascii():
        return raw.decode("ascii"), False
    return raw.hex(), True


def device_id_error(value: str) -> str | None:
    """Why ``value`` is not a DeviceId ([MS-ASHTTP] 2.2.1.1.1.2 ``device-id = 1*32(ALPHA / DIGIT)``)."""
    if value and len(value) <= MAX_DEVICE_ID and value.isascii() and value.isalnum():
        return None
    return f"DeviceId {_clip(value)} is not 1-{MAX_DEVICE_ID} ASCII letters and digits (MS-ASHTTP 2.2.1.1.1.2)"


def user_error(value: str, where: str = "user") -> str | None:
    """Why ``value`` is not a user name ([MS-ASHTTP] 2.2.1.1.1.2 ``user-name = 1*VCHAR``)."""
    if not value:
        return f"empty {where}"
    if len(value) > MAX_VALUE_CHARS:
        return f"{where} too long ({len(value)} chars)"
    if not _is_vchar_str(value):
        return f"{where} {_clip(value)} is not printable ASCII without spaces (MS-ASHTTP 2.2.1.1.1.2)"
    return None


def device_type_error(value: str) -> str | None:
    """Why ``value`` is not a DeviceType ([MS-ASHTTP] 2.2.1.1.1.2 ``device-type = 1*VCHAR``)."""
    if len(value) > MAX_VALUE_CHARS:
        return f"DeviceType too long ({len(value)} chars)"
    if not _is_vchar_str(value):
        return f"DeviceType {_clip(value)} is not printable ASCII without spaces (MS-ASHTTP 2.2.1.1.1.2)"
    return None


def identity_error(user: str | None, device_id: str | None, device_type: str | None) -> str | None:
    """The first value outside MS-ASHTTP's alphabet and lengths, for identities that did not come
    from :func:`parse_request` (e.g. the parameters of a connector callout)."""
    if user is not None and (e := user_error(user)):
        return e
    if device_id is not None and (e := device_id_error(device_id)):
        return e
    if device_type is not None and (e := device_type_error(device_type)):
        return e
    return None


def _header_values(headers, name: str) -> list[str]:
    if headers is None:
        return []
    get_all = getattr(headers, "get_all", None)
    if get_all is not None:
        return [v for v in get_all(name)]
    v = headers.get(name)  # plain mapping fallback
    return [] if v is None else [v]


def _single_header(headers, name: str, errors: list[str]) -> str | None:
    """The value of a header that must not disagree with itself when repeated."""
    values = _header_values(headers, name)
    if not values:
        return None
    first = values[0].strip()
    for other in values[1:]:
        if other.strip() != first:
            errors.append(f"conflicting {name} headers")
            return None
    return first or None


def _check_user(user: str, where: str) -> tuple[str | None, str | None]:
    """The user exactly as sent, or an error: never stripped or re-encoded (the upstream reads it
    as sent)."""
    err = user_error(user, f"user in {where}")
    return (None, err) if err else (user, None)


# ---------------------------------------------------------------------------------------------
# Authorization: Basic
# ---------------------------------------------------------------------------------------------


def parse_basic_auth(values: list[str]) -> tuple[str | None, str | None]:
    """(user, error) from the Authorization header values ([MS-ASHTTP] 2.2.1.1.2.2, RFC 7617).

    No header, or a non-Basic scheme (Bearer for OAuth, Negotiate, ...) gives (None, None).
    The user is everything before the first ':' (the password may contain ':'), UTF-8,
    stripped of surrounding whitespace and otherwise kept as sent.  Never raises.
    """
    try:
        if not values:
            return None, None
        value = values[0].strip()
        for other in values[1:]:
            if other.strip() != value:
                return None, "conflicting Authorization headers"
        parts = value.split(None, 1)
        if not parts or parts[0].lower() != "basic":
            return None, None
        token = parts[1].strip() if len(parts) > 1 else ""
        if not token:
            return None, "empty Basic credentials"
        try:
            raw = base64.b64decode(token, validate=True)
        except (binascii.Error, ValueError):
            return None, "Basic credentials are not base64"
        user_b, colon, _password = raw.partition(b":")
        if not colon:
            return None, "no ':' in Basic credentials"
        try:
            user = user_b.decode("utf-8")
        except UnicodeDecodeError:
            return None, "non-UTF-8 user in Basic credentials"
        return _check_user(user, "Basic credentials")
    except Exception as exc:  # contract: never raises
        return None, f"unreadable Authorization header ({type(exc).__name__})"


# ---------------------------------------------------------------------------------------------
# Base64-encoded query value ([MS-ASHTTP] 2.2.1.1.1.1)
# ---------------------------------------------------------------------------------------------


def _decode_binary(raw: bytes) -> tuple[dict, str | None]:
    """Decode what can be read.  Returns (fields, first error).  Structural damage (a length
    running past the end) stops decoding; bad values (unknown command code, non-UTF-8 device
    type, ...) are reported and decoding goes on so the readable fields stay available."""
    out: dict = {}
    error: str | None = None
    n = len(raw)
    if n < 5:
        return out, "truncated binary query"
    ver = raw[0]
    version = BINARY_PROTOCOL_VERSIONS.get(ver)
    if version is None:
        error = f"unsupported protocol version {ver} in binary query"
        out["version"] = f"{ver // 10}.{ver % 10}"
    else:
        out["version"] = version
    code = raw[1]
    command = COMMAND_CODES.get(code)
    if command is None:
        error = error or f"unknown command code {code}"
    out["command"] = command
    out["locale"] = raw[2] | (raw[3] << 8)
    # Device ID
    dlen = raw[4]
    pos = 5
    if dlen == 0:
        return out, error or "DeviceId length 0 in binary query"
    if dlen > MAX_BINARY_DEVICE_ID:
        return out, error or f"DeviceId length {dlen} over {MAX_BINARY_DEVICE_ID} in binary query"
    if pos + dlen > n:
        return out, error or "DeviceId length byte past end of binary query"
    out["device_id"] = raw[pos : pos + dlen]
    pos += dlen
    # Policy key
    if pos >= n:
        return out, error or "truncated binary query (no policy key length)"
    plen = raw[pos]
    pos += 1
    if plen == 4:
        if pos + 4 > n:
            return out, error or "policy key length byte past end of binary query"
        out["policy_key"] = int.from_bytes(raw[pos : pos + 4], "little")
        pos += 4
    elif plen == 0:
        out["policy_key"] = None
    else:
        return out, error or f"policy key length {plen} in binary query (must be 0 or 4)"
    # Device type
    if pos >= n:
        return out, error or "truncated binary query (no device type length)"
    tlen = raw[pos]
    pos += 1
    if pos + tlen > n:
        return out, error or "DeviceType length byte past end of binary query"
    try:
        out["device_type"] = raw[pos : pos + tlen].decode("utf-8")
    except UnicodeDecodeError:
        error = error or "non-UTF-8 bytes in DeviceType"
    else:
        if tlen and (terr := device_type_error(out["device_type"])):
            error = error or terr
    pos += tlen
    # Command parameters
    params: dict[str, str | bytes] = {}
    out["params"] = params
    while pos < n:
        if pos + 2 > n:
            return out, error or "truncated binary query (parameter header)"
        tag = raw[pos]
        vlen = raw[pos + 1]
        pos += 2
        name = PARAMETER_TAGS.get(tag)
        if name is None:
            return out, error or f"unknown parameter tag {tag} in binary query"
        if pos + vlen > n:
            return out, error or f"{name} length byte past end of binary query"
        vraw = raw[pos : pos + vlen]
        pos += vlen
        value: str | bytes
        if tag in _STRING_TAGS:
            try:
                value = vraw.decode("utf-8")
            except UnicodeDecodeError:
                error = error or f"non-UTF-8 bytes in {name}"
                continue
        else:
            if vlen != 1:
                error = error or f"Options parameter of {vlen} bytes (must be 1)"
                continue
            value = vraw
        prev = params.get(name)
        if prev is not None and prev != value:
            error = error or f"conflicting {name} parameters in binary query"
            continue
        params[name] = value
    return out, error


def decode_binary_query(raw: bytes) -> BinaryQuery:
    """Decode the byte sequence of a base64-encoded query value (already base64-decoded).

    Layout per [MS-ASHTTP] section 2.2.1.1.1.1 (see the module docstring); command codes per
    2.2.1.1.1.1.2, parameter tags per 2.2.1.1.1.1.3.  Raises ValueError with a one-line reason
    for anything malformed or outside the spec's tables.
    """
    fields, error = _decode_binary(bytes(raw))
    if error is not None:
        raise ValueError(error)
    return BinaryQuery(**fields)


def _version_byte(version: str | int) -> int:
    if isinstance(version, int):
        code = version
    else:
        major, dot, minor = str(version).partition(".")
        if not (dot and major.isdigit() and minor.isdigit() and len(minor) == 1):
            raise ValueError(f"bad protocol version {version!r}")
        code = int(major) * 10 + int(minor)
    if code not in BINARY_PROTOCOL_VERSIONS:
        raise ValueError(f"protocol version {version!r} cannot use the base64 query form")
    return code


def _command_byte(command: str | int) -> int:
    if isinstance(command, int):
        if command not in COMMAND_CODES:
            raise ValueError(f"unknown command code {command}")
        return command
    code = _CODE_BY_COMMAND.get(str(command).lower())
    if code is None:
        raise ValueError(f"command {command!r} has no base64 command code")
    return code


def encode_binary_query(
    *,
    command: str | int,
    device_id: bytes | str,
    device_type: str = "",
    version: str | int = "14.1",
    locale: int = 0x0409,
    policy_key: int | None = None,
    params: Mapping[str, str | bytes | int] | Iterable[tuple[str, str | bytes | int]] | None = None,
) -> str:
    """Build a base64-encoded query value ([MS-ASHTTP] 2.2.1.1.1.1): the inverse of
    ``decode_binary_query``.  Returns the base64 text to put after '?'.  Raises ValueError
    for values the layout cannot carry."""
    out = bytearray()
    out.append(_version_byte(version))
    out.append(_command_byte(command))
    if not 0 <= locale <= 0xFFFF:
        raise ValueError("locale must fit in 2 bytes")
    out += locale.to_bytes(2, "little")
    dev = device_id.encode("utf-8") if isinstance(device_id, str) else bytes(device_id)
    if not 1 <= len(dev) <= MAX_BINARY_DEVICE_ID:
        raise ValueError(f"device id must be 1..{MAX_BINARY_DEVICE_ID} bytes")
    out.append(len(dev))
    out += dev
    if policy_key is None:
        out.append(0)
    else:
        if not 0 <= policy_key <= 0xFFFFFFFF:
            raise ValueError("policy key must be an unsigned 32-bit integer")
        out.append(4)
        out += policy_key.to_bytes(4, "little")
    dtype = device_type.encode("utf-8")
    if len(dtype) > 255:
        raise ValueError("device type longer than 255 bytes")
    out.append(len(dtype))
    out += dtype
    items = params.items() if isinstance(params, Mapping) else (params or ())
    for name, value in items:
        tag = _TAG_BY_PARAMETER.get(str(name).lower())
        if tag is None:
            raise ValueError(f"unknown command parameter {name!r}")
        if isinstance(value, int):
            if tag != _OPTIONS_TAG or not 0 <= value <= 0xFF:
                raise ValueError(f"integer value only for Options (0..255), got {name}={value}")
            vb = bytes((value,))
        elif isinstance(value, str):
            vb = value.encode("utf-8")
        else:
            vb = bytes(value)
        if len(vb) > 255:
            raise ValueError(f"parameter {name} longer than 255 bytes")
        out.append(tag)
        out.append(len(vb))
        out += vb
    return base64.b64encode(bytes(out)).decode("ascii")


# ---------------------------------------------------------------------------------------------
# The request
# ---------------------------------------------------------------------------------------------


def _is_base64_form(query: str) -> bool:
    """A query with key=value pairs is the plain form; one with no '&' and no '=' except base64
    padding at the end (raw or %3D) is a candidate for the base64 form."""
    if "&" in query:
        return False
    if "%" in query:
        query = query.replace("%3D", "=").replace("%3d", "=")
    return "=" not in query.rstrip("=")


def _build_url(scheme: str, host: str, path: str) -> str:
    if path.startswith(("http://", "https://")):  # absolute-form request target
        return path
    if ":" in host and not host.startswith("[") and host.count(":") > 1:
        host = f"[{host}]"  # bare IPv6 literal
    return f"{scheme}://{host}{path}"


_PLAIN_LABELS = {"cmd": "Cmd", "user": "User", "deviceid": "DeviceId", "devicetype": "DeviceType"}


def _parse_plain(query: str, errors: list[str]) -> dict[str, str | None] | None:
    """Plain text query value ([MS-ASHTTP] 2.2.1.1.1.2).  Names are matched case-insensitively,
    values percent-decoded as UTF-8 ('+' is a space, as for IIS/ASP.NET).  Returns lowercased
    name -> value; a value that is not UTF-8, or a name repeated with a different value, is
    reported in ``errors`` and reads as None.  Returns None if the query could not be split."""
    if "%u" in query or "%U" in query:
        # IIS/ASP.NET decode the non-standard %uXXXX escape; Python does not. Two parsers that
        # read different values is how a gateway gets bypassed: refuse it.
        errors.append("%u escape in query")
        return None
    if "%" not in query and "+" not in query:
        # Nothing to decode (the usual query): parse_qsl's own result, without its per-field unquote
        # calls. It splits on '&', skips empty fields and reads a field without '=' as blank.
        if query.count("&") >= MAX_QUERY_FIELDS:
            errors.append(f"more than {MAX_QUERY_FIELDS} query parameters")
            return None
        pairs = [(f.partition("=")[0], f.partition("=")[2]) for f in query.split("&") if f]
    else:
        try:
            pairs = parse_qsl(
                query,
                keep_blank_values=True,
                errors="surrogateescape",  # bad %XX bytes become lone surrogates: checked below
                max_num_fields=MAX_QUERY_FIELDS,
            )
        except ValueError:
            errors.append(f"more than {MAX_QUERY_FIELDS} query parameters")
            return None
    seen: dict[str, str | None] = {}
    for name, value in pairs:
        key = name.lower()
        label = _PLAIN_LABELS.get(key)
        v: str | None = value
        if not _utf8_ok(value):
            errors.append(f"non-UTF-8 bytes in {label} parameter" if label else "non-UTF-8 bytes in query")
            v = None
        if key in seen:
            # ASP.NET joins repeated values with ',' ("A,A"): even an identical repeat of an
            # identity parameter would make Exchange read another value than the gateway decided on.
            if seen[key] != v or label is not None:
                if label is None:
                    label = _clip(name) if _utf8_ok(name) else "query"
                errors.append(f"repeated {label} parameter" if seen[key] == v else f"conflicting {label} parameters")
                seen[key] = None
            continue
        seen[key] = v
    return seen


def parse_request(method: str, scheme: str, host: str, path: str, headers, client_ip: str) -> Identity:
    """Parse one ActiveSync request.

    ``path`` is the raw request target including the query ("/Microsoft-Server-ActiveSync?...").
    ``headers`` is any object with ``.get_all(name) -> list[str]`` (case-insensitive), such as
    ``mitmproxy.http.Headers``.  Never raises; problems end up in ``Identity.error`` (several
    problems are joined with "; ").

    * query_form "empty" / "plain" / "base64" ([MS-ASHTTP] 2.2.1.1.1.2 / 2.2.1.1.1.1)
    * user: the Basic user if there is one, else the User query parameter, else None.  A
      Basic header that is present but broken leaves the user None (user_source "none").
    * protocol_version / policy_key: the MS-ASProtocolVersion / X-MS-PolicyKey headers, else
      the values carried in the base64 query.
    * "Cmd missing" for a non-OPTIONS request without a command; "DeviceId missing" for a
      non-OPTIONS request, or any request with a command, without a DeviceId.  OPTIONS with no
      query is well-formed and anonymous of device.
    """
    try:
        return _parse_request(method, scheme, host, path, headers, client_ip)
    except Exception as exc:  # safety net: the contract is "never raises"
        return Identity(
            user=None, user_source="none", device_id=None, device_id_binary=False,
            device_type=None, command=None, protocol_version=None, policy_key=None,
            user_agent=None, client_ip=str(client_ip), url=str(path), query_form="empty",
            locale=None, error=f"unparseable request ({type(exc).__name__})",
        )


def _parse_request(method: str, scheme: str, host: str, path: str, headers, client_ip: str) -> Identity:
    errors: list[str] = []
    url = _build_url(scheme, host, path)
    _, _, query = path.partition("?")

    command: str | None = None
    device_id: str | None = None
    device_id_binary = False
    device_type: str | None = None
    query_user: str | None = None
    bin_version: str | None = None
    bin_policy_key: str | None = None
    locale: int | None = None
    # Whether "Cmd missing" / "DeviceId missing" can be said: not when the value was there but
    # unreadable (that is reported already), nor for a base64 query (every absence there is a
    # decoding error, reported already).
    check_cmd = check_dev = True

    if not query:
        query_form = "empty"
    elif _is_base64_form(query):
        query_form = "base64"
        check_cmd = check_dev = False
        raw: bytes | None = None
        if len(query) > MAX_QUERY_CHARS:
            errors.append(f"query too long ({len(query)} chars)")
        else:
            try:
                text = unquote(query, errors="strict") if "%" in query else query
                raw = base64.b64decode(text, validate=True)
            except (binascii.Error, ValueError):
                errors.append("malformed base64 query")
        if raw is not None:
            fields, berr = _decode_binary(raw)
            if berr is not None:
                errors.append(berr)
            bin_version = fields.get("version")
            command = fields.get("command")
            locale = fields.get("locale")
            dev = fields.get("device_id")
            if dev is not None:
                device_id, device_id_binary = device_id_text(dev)
            pk = fields.get("policy_key")
            if pk is not None:
                bin_policy_key = str(pk)
            device_type = fields.get("device_type") or None
            params = fields.get("params")
            if params:
                u = params.get("User")
                if isinstance(u, str) and u:
                    query_user, uerr = _check_user(u, "User parameter")
                    if uerr is not None:
                        errors.append(uerr)
    else:
        query_form = "plain"
        p: dict[str, str | None] | None = None
        if len(query) > MAX_QUERY_CHARS:
            errors.append(f"query too long ({len(query)} chars)")
        else:
            p = _parse_plain(query, errors)
        if p is None:
            check_cmd = check_dev = False
        else:
            cmd = p.get("cmd")
            if cmd:
                command = _COMMAND_BY_LOWER.get(cmd.lower())
                if command is None:  # denied; named as sent, escaped (it reaches terminals and mitmweb)
                    command = one_line(cmd, MAX_VALUE_CHARS) if len(cmd) <= MAX_VALUE_CHARS else None
                    errors.append(f"unknown command {_clip(cmd)}")
            elif "cmd" in p and cmd is None:
                check_cmd = False
            dev_s = p.get("deviceid")
            if dev_s:
                if derr := device_id_error(dev_s):  # denied, never re-encoded
                    errors.append(derr)
                    check_dev = False
                else:
                    device_id = dev_s
            elif "deviceid" in p and dev_s is None:
                check_dev = False
            dt = p.get("devicetype")
            if dt:
                if terr := device_type_error(dt):
                    errors.append(terr)
                else:
                    device_type = dt
            u = p.get("user")
            if u is not None and u:
                query_user, uerr = _check_user(u, "User parameter")
                if uerr is not None:
                    errors.append(uerr)

    # Headers
    basic_user, auth_error = parse_basic_auth(_header_values(headers, "Authorization"))
    if auth_error is not None:
        errors.append(auth_error)
    protocol_version = _single_header(headers, "MS-ASProtocolVersion", errors)
    if protocol_version is not None and protocol_version not in HEADER_PROTOCOL_VERSIONS:
        errors.append(f"unsupported MS-ASProtocolVersion {_clip(protocol_version, 16)}")
        protocol_version = protocol_version if _utf8_ok(protocol_version) else None
    if protocol_version is None:
        protocol_version = bin_version
    policy_key = _single_header(headers, "X-MS-PolicyKey", errors)
    if policy_key is not None and (len(policy_key) > 64 or not _utf8_ok(policy_key)):
        errors.append("malformed X-MS-PolicyKey header")
        policy_key = None
    if policy_key is None:
        policy_key = bin_policy_key
    ua_values = _header_values(headers, "User-Agent")
    user_agent = (ua_values[0].strip() or None) if ua_values else None
    if user_agent is not None and not _utf8_ok(user_agent):
        errors.append("non-UTF-8 bytes in User-Agent")
        user_agent = None

    # The user: Basic wins over the query; a present but broken Basic header leaves it unknown.
    if basic_user is not None:
        user, user_source = basic_user, "basic"
    elif auth_error is None and query_user is not None:
        user, user_source = query_user, "query"
    else:
        user, user_source = None, "none"

    is_options = method == "OPTIONS"  # methods are case-sensitive (RFC 9110 9.1)
    if check_cmd and command is None and not is_options:
        errors.append("Cmd missing")
    if check_dev and device_id is None and (command is not None or not is_options):
        errors.append("DeviceId missing")

    return Identity(
        user=user,
        user_source=user_source,
        device_id=device_id,
        device_id_binary=device_id_binary,
        device_type=device_type,
        command=command,
        protocol_version=protocol_version,
        policy_key=policy_key,
        user_agent=user_agent,
        client_ip=client_ip,
        url=url,
        query_form=query_form,
        locale=locale,
        error="; ".join(errors) if errors else None,
    )
