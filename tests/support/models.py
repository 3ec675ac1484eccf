"""Upstream HTTP/1 readers written from scratch for the differential test (no h11, mitmproxy or easgate).

Three ways a server behind the gateway may read the same bytes:

- ``strict``: RFC 9112 as written: CRLF line ends only, no obs-fold, token names, no control bytes,
  one Content-Length or exactly ``Transfer-Encoding: chunked``, never both.
- ``unfold``: lenient like many servers: bare LF ends a line, a continuation line is unfolded into
  the previous value (RFC 9112 5.2's replacement by SP), Transfer-Encoding wins over Content-Length.
- ``split``: more lenient still: bare LF and bare CR end a line, a continuation line is read as a
  header line of its own, Transfer-Encoding wins over Content-Length.

Each reports, per request it read: method, target, the identity it reads from the query (both
MS-ASHTTP forms) and from Basic auth, the body length it framed, and any NSClientCert it saw.
"""

from __future__ import annotations

import base64
import re
from dataclasses import dataclass, field

MODELS = ("strict", "unfold", "split")
_TOKEN = re.compile(rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
_CTL = re.compile(rb"[\x00-\x08\x0a-\x1f\x7f]")


class ReadError(ValueError):
    pass


@dataclass
class Read:
    method: str
    target: str
    version: str
    headers: list[tuple[str, str]]
    body_len: int
    cmd: str | None = None
    device_id: str | None = None
    device_type: str | None = None
    query_user: str | None = None
    basic_user: str | None = None
    query_form: str = "empty"
    cert_headers: list[str] = field(default_factory=list)

    def header(self, name: str) -> str | None:
        return next((v for k, v in self.headers if k.lower() == name.lower()), None)

    @property
    def tag(self) -> str | None:
        """The case id the corpus puts in the User-Agent."""
        m = re.search(r"case=([\w.-]+)", self.header("user-agent") or "")
        return m[1] if m else None

    @property
    def user(self) -> str | None:
        return self.basic_user if self.basic_user is not None else self.query_user


def read_stream(data: bytes, model: str) -> tuple[list[Read], str | None]:
    """Every request a model reads from one connection's bytes, and why it stopped (None: clean end)."""
    out: list[Read] = []
    pos = 0
    while pos < len(data):
        try:
            r, pos = _read_one(data, pos, model)
        except ReadError as e:
            return out, str(e)
        if r is None:
            return out, "incomplete"
        out.append(r)
    return out, None


def _lines(data: bytes, pos: int, model: str) -> tuple[list[bytes], int] | None:
    """The head's lines (without line ends) and where the body starts; None when incomplete."""
    if model == "strict":
        end = data.find(b"\r\n\r\n", pos)
        if end < 0:
            return None
        return data[pos:end].split(b"\r\n"), end + 4
    sep = re.compile(rb"\r\n|\n|\r" if model == "split" else rb"\r?\n")
    lines, i = [], pos
    while True:
        m = sep.search(data, i)
        if m is None:
            return None
        line = data[i:m.start()]
        i = m.end()
        if not line:
            if not lines:  # empty lines before a request line are skipped
                continue
            return lines, i
        lines.append(line)


def _read_one(data: bytes, pos: int, model: str) -> tuple[Read | None, int]:
    got = _lines(data, pos, model)
    if got is None:
        return None, pos
    lines, body_at = got
    if model == "strict":
        parts = lines[0].split(b" ")
        if len(parts) != 3 or not _TOKEN.fullmatch(parts[0]) or parts[2] not in (b"HTTP/1.0", b"HTTP/1.1"):
            raise ReadError(f"bad request line {lines[0][:60]!r}")
        if re.search(rb"[^\x21-\x7e]", parts[1]):
            raise ReadError("bad request-target")
    else:
        parts = lines[0].split()
        if len(parts) < 2:
            raise ReadError(f"bad request line {lines[0][:60]!r}")
        if len(parts) == 2:
            parts.append(b"HTTP/1.0")
        parts = [parts[0], b" ".join(parts[1:-1]), parts[-1]]
    headers: list[list[bytes]] = []
    for line in lines[1:]:
        if line[:1] in (b" ", b"\t"):
            if model == "strict":
                raise ReadError("obs-fold")
            if not headers:
                raise ReadError("continuation before any header")
            if model == "unfold":
                headers[-1][1] = headers[-1][1] + b" " + line.strip(b" \t")
                continue
            line = line.strip(b" \t")  # split: the continuation is a header line of its own
        name, colon, value = line.partition(b":")
        if not colon:
            if model == "strict":
                raise ReadError("header line without a colon")
            continue
        if model == "strict":
            if not _TOKEN.fullmatch(name) or _CTL.search(value.strip(b" \t")):
                raise ReadError(f"bad header line {line[:60]!r}")
        else:
            name = name.strip()
        headers.append([name, value.strip(b" \t")])
    hs = [(n.decode("latin-1"), v.decode("latin-1")) for n, v in headers]
    body_len, end = _frame(data, body_at, hs, model)
    r = Read(parts[0].decode("latin-1"), parts[1].decode("latin-1"), parts[2].decode("latin-1"), hs, body_len)
    _identity(r)
    r.cert_headers = [v for k, v in hs if k.lower().replace("-", "").replace("_", "") == "nsclientcert"]
    return r, end


def _frame(data: bytes, at: int, hs: list[tuple[str, str]], model: str) -> tuple[int, int]:
    cl = [v for k, v in hs if k.lower() == "content-length"]
    te = [v for k, v in hs if k.lower() == "transfer-encoding"]
    if model == "strict":
        if te and cl:
            raise ReadError("Content-Length and Transfer-Encoding")
        if len(set(cl)) > 1 or len(te) > 1:
            raise ReadError("conflicting framing")
        if te and te[0].lower() != "chunked":
            raise ReadError(f"Transfer-Encoding {te[0]!r}")
        if cl and not cl[0].isdigit():
            raise ReadError("bad Content-Length")
    chunked = any("chunked" in v.lower() for v in te)
    if chunked:
        return _dechunk(data, at)
    if cl:
        m = re.match(r"\s*(\d+)", cl[0])
        if not m:
            raise ReadError("bad Content-Length")
        n = int(m[1])
        if at + n > len(data):
            raise ReadError("incomplete body")
        return n, at + n
    return 0, at


def _dechunk(data: bytes, at: int) -> tuple[int, int]:
    total = 0
    while True:
        eol = data.find(b"\n", at)
        if eol < 0:
            raise ReadError("incomplete chunk size")
        size_s = data[at:eol].split(b";")[0].strip()
        try:
            size = int(size_s, 16)
        except ValueError:
            raise ReadError(f"bad chunk size {size_s[:20]!r}")
        at = eol + 1
        if size == 0:
            while True:  # trailer fields up to the empty line
                eol = data.find(b"\n", at)
                if eol < 0:
                    raise ReadError("incomplete trailers")
                line, at = data[at:eol].rstrip(b"\r"), eol + 1
                if not line:
                    return total, at
        total += size
        at += size
        if data[at:at + 2] == b"\r\n":
            at += 2
        elif data[at:at + 1] == b"\n":
            at += 1
        else:
            raise ReadError("chunk not followed by a line end")


# ---------------------------------------------------------------------------------------------
# What an ActiveSync server reads from the query and the Authorization header ([MS-ASHTTP])

COMMANDS = {0: "Sync", 1: "SendMail", 2: "SmartForward", 3: "SmartReply", 4: "GetAttachment", 9: "FolderSync",
            10: "FolderCreate", 11: "FolderDelete", 12: "FolderUpdate", 13: "MoveItems", 14: "GetItemEstimate",
            15: "MeetingResponse", 16: "Search", 17: "Settings", 18: "Ping", 19: "ItemOperations", 20: "Provision",
            21: "ResolveRecipients", 22: "ValidateCert", 23: "Find"}


def _pct(s: str) -> str:
    """ASP.NET-style query decoding: '+' is a space, %XX bytes as UTF-8, %uXXXX a code point."""
    s = s.replace("+", " ")
    out = bytearray()
    i = 0
    while i < len(s):
        c = s[i]
        if c == "%" and s[i + 1:i + 2] in ("u", "U") and re.fullmatch(r"[0-9A-Fa-f]{4}", s[i + 2:i + 6]):
            out += chr(int(s[i + 2:i + 6], 16)).encode()
            i += 6
        elif c == "%" and re.fullmatch(r"[0-9A-Fa-f]{2}", s[i + 1:i + 3]):
            out.append(int(s[i + 1:i + 3], 16))
            i += 3
        else:
            out += c.encode("utf-8", "surrogateescape")
            i += 1
    return out.decode("utf-8", "replace")


def _identity(r: Read) -> None:
    query = r.target.partition("?")[2].partition("#")[0]
    if "=" in query.rstrip("=").replace("%3D", "").replace("%3d", "") or "&" in query:
        r.query_form = "plain"
        values: dict[str, list[str]] = {}
        for part in query.split("&"):
            name, eq, value = part.partition("=")
            if eq:
                values.setdefault(_pct(name).lower(), []).append(_pct(value))
        # a repeated name reads as the values joined with ',' (ASP.NET's QueryString)
        joined = {k: ",".join(v) for k, v in values.items()}
        r.cmd, r.device_id = joined.get("cmd"), joined.get("deviceid")
        r.device_type, r.query_user = joined.get("devicetype"), joined.get("user")
    elif query:
        r.query_form = "base64"
        try:
            raw = base64.b64decode(_pct(query).encode("latin-1", "replace"), validate=True)
        except ValueError:
            raw = b""
        _binary(r, raw)
    auths = [v for k, v in r.headers if k.lower() == "authorization"]
    auth = auths[-1] if auths else None  # a server that keeps the last of repeated fields
    if auth:
        scheme, _, cred = auth.strip().partition(" ")
        if scheme.lower() == "basic":
            try:
                text = base64.b64decode(cred.strip().split()[0] if cred.strip() else "", validate=True).decode("utf-8")
                r.basic_user = text.partition(":")[0]
            except (ValueError, IndexError):
                pass


def _binary(r: Read, raw: bytes) -> None:
    """[MS-ASHTTP] 2.2.1.1.1.1: version, command code, locale (2), then length-prefixed DeviceId,
    policy key, DeviceType, and tag/length/value command parameters (tag 8 is User)."""
    if len(raw) < 6:
        return
    r.cmd = COMMANDS.get(raw[1], f"#{raw[1]}")
    i = 4
    n = raw[i]
    r.device_id = raw[i + 1:i + 1 + n].decode("latin-1")
    i += 1 + n
    if i >= len(raw):
        return
    i += 1 + raw[i]  # policy key
    if i >= len(raw):
        return
    n = raw[i]
    r.device_type = raw[i + 1:i + 1 + n].decode("latin-1")
    i += 1 + n
    while i + 2 <= len(raw):
        tag, n = raw[i], raw[i + 1]
        if tag == 8:
            r.query_user = raw[i + 2:i + 2 + n].decode("utf-8", "replace")
        i += 2 + n


def encode_binary(cmd_code: int, device_id: str, device_type: str, user: str | None = None,
                  version: int = 141, locale: int = 0x0409) -> str:
    """The base64 query form a device sends (for the corpus)."""
    dev, typ = device_id.encode(), device_type.encode()
    raw = bytes([version, cmd_code]) + locale.to_bytes(2, "little") + bytes([len(dev)]) + dev + b"\x00"
    raw += bytes([len(typ)]) + typ
    if user is not None:
        u = user.encode()
        raw += bytes([8, len(u)]) + u
    return base64.b64encode(raw).decode()
