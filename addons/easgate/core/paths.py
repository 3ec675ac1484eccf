"""Path normalisation: routes match the path the upstream will see, not the bytes the client sent."""

from __future__ import annotations

import posixpath
import re

_UNRESERVED = frozenset(b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-._~")
_PCT = re.compile(r"%([0-9A-Fa-f]{2})")
_PCT_U = re.compile(r"%[uU]([0-9A-Fa-f]{4})")
_SLASHES = re.compile("/{2,}")


def _pct(m: re.Match) -> str:
    b = int(m[1], 16)
    if b in _UNRESERVED:
        return chr(b)
    if b in (0x2F, 0x5C):  # %2F, %5C: IIS treats them as path separators
        return "/"
    return "%" + m[1].upper()


def _pct_u(m: re.Match) -> str:
    ch = chr(int(m[1], 16))
    if ch in "/\\":
        return "/"
    if len(ch.encode("utf-8", "surrogatepass")) == 1 and ord(ch) in _UNRESERVED:
        return ch
    return "".join(f"%{b:02X}" for b in ch.encode("utf-8", "surrogatepass"))


def normalize_path(path: str) -> str:
    """The path part of a request target as an upstream (IIS, Tomcat) resolves it.

    Percent-encoded unreserved characters are decoded (RFC 3986 6.2.2.2: `%41` is `A`), IIS's
    `%uXXXX` escapes too; `\\`, `%5C` and `%2F` become `/` (IIS reads all three as separators);
    other escapes are upper-cased but kept; dot segments are removed (6.2.2.3) and repeated
    slashes folded, keeping a trailing `/`. So `/x/../Microsoft-Server-%41ctiveSync` and
    `/owa/..\\Microsoft-Server-ActiveSync` match the ActiveSync route exactly as Exchange would
    see them, and the gateway forwards that normalised path, so both always agree.
    """
    path = path.split("?", 1)[0].split("#", 1)[0]
    if "%" in path:
        if "%u" in path or "%U" in path:
            path = _PCT_U.sub(_pct_u, path)
        path = _PCT.sub(_pct, path)
    if "\\" in path:
        path = path.replace("\\", "/")
    if "//" in path:
        path = _SLASHES.sub("/", path)
    if "/." in path:
        trailing = path.endswith(("/", "/.", "/.."))
        path = posixpath.normpath(path)
        if path.startswith("//"):
            path = path[1:]
        if trailing and not path.endswith("/"):
            path += "/"
    return path or "/"
