"""NetScaler CLI lines and words, as the appliance reads them; text made safe to show."""

from __future__ import annotations

import re
import sys
from dataclasses import dataclass


class NsSyntaxError(ValueError):
    """A line that cannot be split into words (unbalanced quote or parenthesis)."""


@dataclass(frozen=True, slots=True)
class Token:
    text: str
    quoted: bool = False


_UNPRINTABLE = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f\u2028\u2029\ufeff\ufffe\uffff\ud800-\udfff]")


def printable(s: str) -> str:
    """Control characters (ANSI escapes, NEL, ...) shown as `\\xNN`: never copied raw to a terminal or YAML."""
    return _UNPRINTABLE.sub(lambda m: f"\\x{ord(m[0]):02x}" if ord(m[0]) < 0x100 else f"\\u{ord(m[0]):04x}", s)


class NotText(ValueError):
    """Input that is not a configuration text (a NUL byte: an archive or a binary)."""


def decode(raw: bytes) -> tuple[str, str | None]:
    """ns.conf bytes -> (text, note). UTF-8 (with or without BOM); anything else is read as Latin-1,
    which NetScaler's own files are (a `-comment` typed on a Western console), and said so."""
    if b"\x00" in raw:
        raise NotText("NUL byte")
    try:
        return raw.decode("utf-8-sig"), None
    except UnicodeDecodeError as e:
        line = raw.count(b"\n", 0, e.start) + 1
        return raw.decode("latin-1"), f"not UTF-8 (first at line {line}): read as Latin-1"


def logical_lines(text: str) -> list[tuple[int, str]]:
    """Physical lines joined at backslash-newline; blank lines and `#` comment lines dropped.

    Lines end at LF (CRLF too) only, as on the appliance: NEL, LS, FF inside a `-comment` are text."""
    out: list[tuple[int, str]] = []
    buf: str | None = None
    start = 0
    for no, raw in enumerate(text.split("\n"), 1):
        raw = raw.removesuffix("\r")
        if buf is None:
            if raw.lstrip().startswith("#") or not raw.strip():
                continue
            buf, start = "", no
        if raw.endswith("\\") and not raw.endswith("\\\\"):
            buf += raw[:-1]
            continue
        buf += raw
        out.append((start, buf.strip()))
        buf = None
    if buf is not None and buf.strip():
        out.append((start, buf.strip()))
    return out


# runs of characters the scanners below only copy (a regex jump instead of a Python loop per character)
_PLAIN_RUN = re.compile(r'[^\\"()]+')
_PLAIN_RUN_INNER = re.compile(r'[^\\"]+')
_WORD_RUN = re.compile(r'[^\\"()\s]+')


def _scan_quoted_balanced(line: str, i: int) -> tuple[str, int] | None:
    """NetScaler's own idiom: `-rule "HTTP.REQ.URL.STARTSWITH("/x")"`, `""literal""`.

    Inner quotes are not escaped; the closing quote is the one followed by whitespace or the end
    of the line while parentheses (outside inner string literals) are balanced. Backslash-escaped
    quotes (`\\"`) work as well and always belong to the text.
    """
    n = len(line)
    j, depth, inner, buf = i + 1, 0, False, []
    while j < n:
        if m := (_PLAIN_RUN_INNER if inner else _PLAIN_RUN).match(line, j):
            buf.append(m[0])
            j = m.end()
            continue
        c = line[j]
        if c == "\\" and j + 1 < n and line[j + 1] in "\"\\":
            buf.append(line[j + 1])
            if line[j + 1] == '"':
                inner = not inner
            j += 2
            continue
        if c == '"':
            if inner:
                inner = False
            elif depth == 0 and (j + 1 >= n or line[j + 1].isspace()):
                return "".join(buf), j + 1
            else:
                inner = True
            buf.append(c)
            j += 1
            continue
        if not inner:
            if c == "(":
                depth += 1
            elif c == ")":
                if depth == 0:
                    return None
                depth -= 1
        buf.append(c)
        j += 1
    return None


def _scan_quoted_plain(line: str, i: int) -> tuple[str, int] | None:
    """A plain quoted string with backslash escapes, ending at the first unescaped quote that is
    followed by whitespace or the end of the line (fallback for text with unbalanced parentheses)."""
    n = len(line)
    j, buf = i + 1, []
    while j < n:
        if m := _PLAIN_RUN_INNER.match(line, j):
            buf.append(m[0])
            j = m.end()
            continue
        c = line[j]
        if c == "\\" and j + 1 < n and line[j + 1] in "\"\\":
            buf.append(line[j + 1])
            j += 2
            continue
        if c == '"' and (j + 1 >= n or line[j + 1].isspace()):
            return "".join(buf), j + 1
        buf.append(c)
        j += 1
    return None


def _scan_word(line: str, i: int) -> tuple[str, int]:
    """An unquoted word; a word with `(` runs to its balancing `)`, across quotes and spaces
    (`user(HTTP.REQ.HEADER("authorization").AFTER_STR("Basic ")...)`)."""
    n = len(line)
    j, depth, inner, buf = i, 0, False, []
    while j < n:
        if m := (_PLAIN_RUN_INNER if inner else _WORD_RUN).match(line, j):
            buf.append(m[0])
            j = m.end()
            continue
        c = line[j]
        if c == "\\" and j + 1 < n and line[j + 1] in "\"\\":
            buf.append(line[j + 1])
            j += 2
            continue
        if inner:
            if c == '"':
                inner = False
        elif c == '"':
            inner = True
        elif c == "(":
            depth += 1
        elif c == ")":
            depth -= 1
        elif c.isspace() and depth <= 0:
            break
        buf.append(c)
        j += 1
    if inner:
        raise NsSyntaxError(f"unbalanced quote in the word starting at column {i + 1}")
    if depth > 0:
        raise NsSyntaxError(f"unbalanced parenthesis in the word starting at column {i + 1}")
    return "".join(buf), j


_SIMPLE_WORD = re.compile(r'[^\s"()\\]+(?=\s|$)')


def tokenize(line: str) -> list[Token]:
    """Split one logical line into words; `#` at the start of a word begins a comment."""
    toks: list[Token] = []
    i, n = 0, len(line)
    while True:
        while i < n and line[i].isspace():
            i += 1
        if i >= n or line[i] == "#":
            return toks
        if m := _SIMPLE_WORD.match(line, i):  # most words: no quote, parenthesis or backslash
            toks.append(Token(sys.intern(m[0])))  # the same few words on every line: one copy each
            i = m.end()
        elif line[i] == '"':
            r = _scan_quoted_balanced(line, i) or _scan_quoted_plain(line, i)
            if r is None:
                raise NsSyntaxError(f"unbalanced quote starting at column {i + 1}")
            toks.append(Token(r[0], True))
            i = r[1]
        else:
            text, i = _scan_word(line, i)
            toks.append(Token(text))


def shorten(text: str, width: int = 110) -> str:
    """One line of at most width characters (whitespace folded)."""
    t = " ".join(text.split())
    return t if len(t) <= width else t[: width - 3] + "..."
