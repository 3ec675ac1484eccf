"""`easgate import-netscaler FILE`: turn a NetScaler CLI configuration into an easgate config.

The classic ActiveSync + MDM setup is a handful of NetScaler objects: services and lb vservers
(-> pools), a cs vserver with cs policies (-> the listener and the routes), `set ssl vserver
-clientAuth` and `-CA` bindings (-> tls.client_certs), an ssl action with `-certHeader` behind an ssl
policy (-> the routes' `client_cert_header`) and the XNC `httpCallout` (-> authorization.connector).
This module reads the CLI lines the way NetScaler accepts them, translates what easgate can express
and *reports everything else* with its line number: on stderr as `FILE:LINE: not translated: ...`
and in a comment block at the top of the YAML. Nothing that changes behaviour is dropped silently.

Pure logic apart from `mitmproxy.flowfilter` (to check generated filters) and the argparse glue at
the bottom. docs/netscaler-import.md has the mapping table.
"""

from __future__ import annotations

import bisect
import gc
import functools
import itertools
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path

from mitmproxy import flowfilter

from .core.paths import normalize_path

# =============================================================================================
# 1. Lines and words, as NetScaler's CLI reads them


class NsSyntaxError(ValueError):
    """A line that cannot be split into words (unbalanced quote or parenthesis)."""


@dataclass(frozen=True, slots=True)
class Token:
    text: str
    quoted: bool = False


@dataclass
class Line:
    no: int  # first physical line of the logical line
    text: str  # the logical line (continuations joined)
    tokens: list[Token] = field(default_factory=list)


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


# =============================================================================================
# 2. Policy expressions (NetScaler "advanced" syntax) -> easgate match / mitmproxy filter


class ExprError(ValueError):
    """An expression (or part of one) easgate cannot express."""


@dataclass(frozen=True, slots=True)
class Const:
    value: bool


@dataclass(frozen=True, slots=True)
class Atom:
    """One test. kind: url | path | host | header | method | cert | opaque."""

    kind: str
    op: str = ""  # startswith | endswith | contains | eq | exists
    value: str = ""
    name: str = ""  # header name
    icase: bool = False


@dataclass(frozen=True, slots=True)
class Not:
    x: object


@dataclass(frozen=True, slots=True)
class And:
    xs: tuple


@dataclass(frozen=True, slots=True)
class Or:
    xs: tuple


_LEX = re.compile(r'\s*(?:(?P<str>"(?:[^"\\]|\\.)*")|(?P<op>&&|\|\||[!().,+])|(?P<num>\d+)'
                  r'|(?P<id>[A-Za-z_][A-Za-z0-9_]*))', re.S)
_STR_ESC = {"n": "\n", "t": "\t", "r": "\r"}


def _lex(text: str) -> list[tuple[str, str]]:
    toks, i = [], 0
    text = text.rstrip()
    while i < len(text):
        m = _LEX.match(text, i)
        if not m or m.end() == i:
            raise ExprError(f"cannot read the expression at '{text[i:i + 20].strip()}'")
        kind = m.lastgroup
        val = m.group(kind)
        if kind == "str":
            val = re.sub(r"\\(.)", lambda e: _STR_ESC.get(e[1], e[1]), val[1:-1])
        toks.append((kind, val))
        i = m.end()
    return toks


_OPS = ("startswith", "endswith", "contains", "eq")


class _ExprParser:
    def __init__(self, text: str) -> None:
        self.text = text
        self.toks = _lex(text)
        self.i = 0

    def peek(self, k: int = 0) -> tuple[str, str] | None:
        return self.toks[self.i + k] if self.i + k < len(self.toks) else None

    def take(self, want: str | None = None) -> tuple[str, str]:
        t = self.peek()
        if t is None or (want is not None and t[1] != want):
            got = f"'{t[1]}'" if t else "the end"
            raise ExprError(f"expected {repr(want) if want else 'more'} but found {got} in: {self.text}")
        self.i += 1
        return t

    def parse(self):
        e = self.or_()
        if self.peek() is not None:
            raise ExprError(f"unexpected '{self.peek()[1]}' in: {self.text}")
        return e

    def or_(self):
        xs = [self.and_()]
        while self.peek() == ("op", "||"):
            self.take()
            xs.append(self.and_())
        return xs[0] if len(xs) == 1 else Or(tuple(xs))

    def and_(self):
        xs = [self.unary()]
        while self.peek() == ("op", "&&"):
            self.take()
            xs.append(self.unary())
        return xs[0] if len(xs) == 1 else And(tuple(xs))

    def unary(self):
        if self.peek() == ("op", "!"):
            self.take()
            return Not(self.unary())
        if self.peek() == ("op", "("):
            self.take()
            e = self.or_()
            self.take(")")
            while self.peek() == ("op", ".") and self.peek(1) and self.peek(1)[1].lower() == "not":
                self.take(), self.take()
                e = Not(e)
            if self.peek() == ("op", "."):
                raise ExprError(f"only .NOT may follow a parenthesised condition in: {self.text}")
            return e
        return self.chain()

    def chain(self):
        start = self.i
        segs: list[tuple[str, list]] = []
        while True:
            t = self.take()
            if t[0] != "id":
                raise ExprError(f"unexpected '{t[1]}' in: {self.text}")
            args: list = []
            if self.peek() == ("op", "("):
                self.take()
                while self.peek() != ("op", ")"):
                    if self.peek() is None:
                        raise ExprError(f"expected ')' but found the end in: {self.text}")
                    a = self.take()
                    if a[0] not in ("str", "id", "num"):
                        raise ExprError(f"unsupported argument '{a[1]}' in: {self.text}")
                    args.append(a)
                    if self.peek() == ("op", ","):
                        self.take()
                self.take(")")
            segs.append((t[1].lower(), args))
            if self.peek() == ("op", "."):
                self.take()
                continue
            break
        src = "".join('"' + v.replace('"', '\\"') + '"' if k == "str" else v for k, v in self.toks[start:self.i])
        return _classify(segs, src)


def _str_arg(args: list, src: str) -> str:
    if len(args) != 1 or args[0][0] != "str":
        raise ExprError(f"expected one string argument in: {src}")
    return args[0][1]


def _classify(segs: list[tuple[str, list]], src: str):
    icase, core, nots, fold = False, [], 0, None
    for name, args in segs:
        if name == "set_text_mode":
            mode = args[0][1].lower() if len(args) == 1 else ""
            if mode not in ("ignorecase", "noignorecase"):
                raise ExprError(f"unsupported SET_TEXT_MODE in: {src}")
            icase = mode == "ignorecase"
        elif name in ("to_lower", "to_upper") and not args and not nots:
            # the text folded to one case and compared exactly: a case-insensitive comparison with
            # a literal already in that case, never true with a literal that is not
            fold, icase = name, True
        elif name == "not":
            nots += 1
        elif nots:
            raise ExprError(f"unsupported use of .NOT in the middle of: {src}")
        else:
            core.append((name, args))
    names = [n for n, _ in core]
    atom = None
    if names in (["true"], ["false"]):
        atom = Const(names == ["true"])
    elif names[:3] == ["http", "req", "url"] and len(names) in (4, 5):
        kind = "url"
        rest = core[3:]
        if rest[0][0] == "path" and len(rest) == 2:
            kind, rest = "path", rest[1:]
        if len(rest) == 1 and rest[0][0] in _OPS:
            atom = Atom(kind, rest[0][0], _str_arg(rest[0][1], src), icase=icase)
    elif names[:3] == ["http", "req", "hostname"] and len(names) in (4, 5):
        rest = core[3:]
        if rest[0][0] == "server" and len(rest) == 2:
            rest = rest[1:]
        if len(rest) == 1 and rest[0][0] in _OPS:
            atom = Atom("host", rest[0][0], _str_arg(rest[0][1], src), icase=icase)
    elif names[:3] == ["http", "req", "header"] and len(names) == 4:
        hname = _str_arg(core[2][1], src)
        op, args = core[3]
        if op == "exists" and not args:
            atom = Atom("header", "exists", name=hname)
        elif op in _OPS:
            atom = Atom("header", op, _str_arg(args, src), name=hname, icase=icase)
    elif names == ["http", "req", "method", "eq"]:
        args = core[3][1]
        if len(args) == 1 and args[0][0] in ("str", "id"):
            atom = Atom("method", "eq", args[0][1].upper())
    elif names == ["client", "ssl", "client_cert", "exists"] and not any(a for _, a in core):
        atom = Atom("cert", "exists")
    elif names[:2] == ["sys", "http_callout"] and len(names) in (2, 3) and len(core[1][1]) == 1 \
            and core[1][1][0][0] in ("id", "str"):
        # a callout's answer: boolean (-returnType BOOL) or text compared with a literal
        if len(names) == 2:
            atom = Atom("callout", "bool", name=core[1][1][0][1])
        elif core[2][0] in _OPS:
            atom = Atom("callout", core[2][0], _str_arg(core[2][1], src), name=core[1][1][0][1], icase=icase)
    if atom is None:
        raise ExprError(f"unsupported expression: {src}")
    if fold and isinstance(atom, Atom) and atom.op in _OPS and atom.kind != "callout":
        folded = atom.value.lower() if fold == "to_lower" else atom.value.upper()
        if folded != atom.value:
            atom = Const(False)  # e.g. TO_LOWER.STARTSWITH("/Microsoft"): never true
    for _ in range(nots):
        atom = Not(atom)
    return atom


@functools.lru_cache(maxsize=4096)
def parse_expr(text: str):
    """A NetScaler policy rule -> Const | Atom | Not | And | Or; raises ExprError."""
    if not text.strip():
        raise ExprError("empty rule")
    return _ExprParser(text).parse()


def simplify(e):
    """Fold constants, flatten nested AND/OR, cancel double negation."""
    if isinstance(e, Not):
        x = simplify(e.x)
        if isinstance(x, Const):
            return Const(not x.value)
        if isinstance(x, Not):
            return x.x
        return Not(x)
    if isinstance(e, (And, Or)):
        is_and = isinstance(e, And)
        out = []
        for x in map(simplify, e.xs):
            if isinstance(x, Const):
                if x.value != is_and:  # False in AND, True in OR decides
                    return x
                continue
            out.extend(x.xs if type(x) is type(e) else (x,))
        if not out:
            return Const(is_and)
        return out[0] if len(out) == 1 else type(e)(tuple(out))
    return e


def atoms_of(e) -> list[Atom]:
    if isinstance(e, Atom):
        return [e]
    if isinstance(e, Not):
        return atoms_of(e.x)
    if isinstance(e, (And, Or)):
        return [a for x in e.xs for a in atoms_of(x)]
    return []


def evaluate(e, env: dict[Atom, bool]) -> bool:
    if isinstance(e, Const):
        return e.value
    if isinstance(e, Atom):
        return env[e]
    if isinstance(e, Not):
        return not evaluate(e.x, env)
    if isinstance(e, And):
        return all(evaluate(x, env) for x in e.xs)
    return any(evaluate(x, env) for x in e.xs)


def show(e) -> str:
    """Back to NetScaler syntax (for comments and messages)."""
    if isinstance(e, Const):
        return "true" if e.value else "false"
    if isinstance(e, Not):
        return f"({show(e.x)}).NOT" if isinstance(e.x, (And, Or)) else f"{show(e.x)}.NOT"
    if isinstance(e, And):
        return " && ".join(f"({show(x)})" if isinstance(x, Or) else show(x) for x in e.xs)
    if isinstance(e, Or):
        return " || ".join(show(x) for x in e.xs)
    a: Atom = e
    mode = ".SET_TEXT_MODE(IGNORECASE)" if a.icase else ""
    q = '"' + a.value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if a.kind in ("url", "path"):
        return f"HTTP.REQ.URL{'.PATH' if a.kind == 'path' else ''}{mode}.{a.op.upper()}({q})"
    if a.kind == "host":
        return f"HTTP.REQ.HOSTNAME{mode}.{a.op.upper()}({q})"
    if a.kind == "header":
        h = f'HTTP.REQ.HEADER("{a.name}")'
        return f"{h}.EXISTS" if a.op == "exists" else f"{h}{mode}.{a.op.upper()}({q})"
    if a.kind == "method":
        return f"HTTP.REQ.METHOD.EQ({a.value})"
    if a.kind == "cert":
        return "CLIENT.SSL.CLIENT_CERT.EXISTS"
    if a.kind == "callout":
        return f"SYS.HTTP_CALLOUT({a.name})" + ("" if a.op == "bool" else f"{mode}.{a.op.upper()}({q})")
    return f"<{a.value}>"


# ---- mitmproxy filter text -----------------------------------------------------------------

# `~u` matches `flow.request.pretty_url` = scheme://<Host header>[:port]<path>?<query>. The path
# begins at the first "/" after "://" (the lookahead pins the authority to exactly that part).
URL_BASE = r"^[^:/?#]+://[^/?#]*(?=/)"
# A Host header with / ? or # would move that boundary: routes whose filter reads the URL never
# match such a request (see docs/netscaler-import.md).
HOST_GUARD = r'!~hq "^(?i:host):[^\\r\\n]*[/?#]"'
_RX_SPECIAL = set(".^$*+?{}[]\\|()")


def rx_escape(s: str) -> str:
    return "".join("\\" + c if c in _RX_SPECIAL else c for c in s)


def _lit(a: Atom) -> str:
    return f"(?{'i' if a.icase else '-i'}:{rx_escape(a.value)})"


def _q(regex: str) -> str:
    """A regex as a quoted mitmproxy filter string (pyparsing drops one level of backslashes)."""
    return '"' + regex.replace("\\", "\\\\").replace('"', '\\"') + '"'


def atom_filter(a: Atom) -> str:
    if a.kind in ("url", "path"):
        end = "$" if a.kind == "url" else "(?:[?]|$)"
        within = ".*" if a.kind == "url" else "[^?]*"
        rx = {"startswith": URL_BASE + _lit(a), "eq": URL_BASE + _lit(a) + end,
              "contains": URL_BASE + within + _lit(a), "endswith": URL_BASE + within + _lit(a) + end}[a.op]
        return f"~u {_q(rx)}"
    if a.kind == "host":
        head, port_end = r"^(?i:host):[ \t]*", r"(?::[0-9]+)?[ \t]*\r?$"
        rx = {"eq": head + _lit(a) + port_end, "startswith": head + _lit(a),
              "contains": r"^(?i:host):[^\r\n]*" + _lit(a),
              "endswith": r"^(?i:host):[^\r\n]*" + _lit(a) + port_end}[a.op]
        return f"~hq {_q(rx)}"
    if a.kind == "header":
        name = f"^(?i:{rx_escape(a.name)}):"
        rx = {"exists": name, "eq": name + r"[ \t]*" + _lit(a) + r"[ \t]*\r?$",
              "startswith": name + r"[ \t]*" + _lit(a), "contains": name + r"[^\r\n]*" + _lit(a),
              "endswith": name + r"[^\r\n]*" + _lit(a) + r"[ \t]*\r?$"}[a.op]
        return f"~hq {_q(rx)}"
    if a.kind == "method":
        return f"~m {_q('^(?-i:' + rx_escape(a.value) + ')$')}"
    if a.kind == "cert":
        raise ExprError("CLIENT.SSL.CLIENT_CERT.EXISTS can only be combined with && at the top of a rule "
                        "(easgate's client_cert match); mitmproxy filters cannot test the client certificate")
    raise ExprError(f"cannot translate {show(a)}")


def to_filter(e) -> str:
    if isinstance(e, Const):
        return "~all" if e.value else "!~all"
    if isinstance(e, Atom):
        return atom_filter(e)
    if isinstance(e, Not):
        return f"!({to_filter(e.x)})"
    sep = " & " if isinstance(e, And) else " | "
    return "(" + sep.join(to_filter(x) for x in e.xs) + ")"


def _structured_path(a: Atom) -> bool:
    v = a.value
    return (a.kind in ("url", "path") and a.op == "startswith" and v.startswith("/") and "?" not in v
            and "#" not in v and normalize_path(v) == v)


_QUOTED = re.compile(r'"(?:[^"\\]|\\.)*"')
_FILTER_SHAPES: set[str] = set()


def check_filter(flt: str) -> None:
    """A generated filter must parse. mitmproxy's parser (pyparsing) takes ~5 ms a filter, so each
    shape (the filter with its quoted strings blanked) is parsed once; every filter's regexes are
    compiled. Raises ExprError (a bug in this module)."""
    shape = _QUOTED.sub('"x"', flt)
    try:
        if shape not in _FILTER_SHAPES:
            flowfilter.parse(flt)
            _FILTER_SHAPES.add(shape)
        for q in _QUOTED.findall(flt):
            re.compile(re.sub(r"\\(.)", r"\1", q[1:-1]))
    except (ValueError, re.error) as err:  # pragma: no cover - a bug in this module
        raise ExprError(f"generated filter does not parse ({err}): {flt}")


def to_match(e) -> dict | str | None:
    """easgate `match` for a rule: 'any', a mapping, or None (the rule is always false).

    The top-level AND becomes structured keys where one fits; whatever is left becomes one
    mitmproxy `filter`, AND-ed by easgate with the keys. Raises ExprError.
    """
    e = simplify(e)
    if isinstance(e, Const):
        return "any" if e.value else None
    conj = list(e.xs) if isinstance(e, And) else [e]
    m: dict = {}
    rest = []
    for c in conj:
        a = c.x if isinstance(c, Not) else c
        neg = isinstance(c, Not)
        if isinstance(a, Atom) and a.kind == "cert" and "client_cert" not in m:
            m["client_cert"] = "absent" if neg else "present"
        elif neg or not isinstance(c, (Atom, Or)):
            rest.append(c)
        elif isinstance(c, Or):
            kinds = {(x.kind, x.op) if isinstance(x, Atom) else None for x in c.xs}
            if kinds == {("host", "eq")} and "host" not in m and all(":" not in x.value for x in c.xs):
                m["host"] = [x.value.lower() for x in c.xs]
            elif kinds == {("method", "eq")} and "method" not in m:
                m["method"] = [x.value for x in c.xs]
            else:
                rest.append(c)
        elif _structured_path(a) and "path_prefix" not in m:
            m["path_prefix"] = a.value
            if a.icase:
                m["ignore_case"] = True
        elif a.kind == "host" and a.op == "eq" and ":" not in a.value and "host" not in m:
            m["host"] = [a.value.lower()]
        elif a.kind == "method" and "method" not in m:
            m["method"] = [a.value]
        elif a.kind == "header" and a.op == "exists":
            m.setdefault("header_present", []).append(a.name)
        elif (a.kind == "header" and a.op == "eq" and not a.icase
              and a.name.lower() not in {k.lower() for k in m.get("header_equals", {})}):
            m.setdefault("header_equals", {})[a.name] = a.value
        else:
            rest.append(c)
    if rest:
        flt = " & ".join(to_filter(x) for x in rest)
        if any(a.kind in ("url", "path") for x in rest for a in atoms_of(x)):
            flt += " & " + HOST_GUARD
        check_filter(flt)
        m["filter"] = flt
    return m


# ---- reasoning about which requests reach a route ------------------------------------------


def _prefix_ok(a: Atom, va: bool, b: Atom, vb: bool) -> bool:
    """Can the URL tests a (= va) and b (= vb) hold together? Prefix facts between URL STARTSWITH
    tests are the only relations between conditions that matter for routing."""
    for (x, vx), (y, vy) in (((a, va), (b, vb)), ((b, vb), (a, va))):
        if not vx:
            continue
        kx, ky = (x.value.lower(), y.value.lower()) if (x.icase or y.icase) else (x.value, y.value)
        if vy and not (kx.startswith(ky) or ky.startswith(kx)):
            return False  # the URL cannot start with both
        if not vy and kx.startswith(ky) and (y.icase or not x.icase):
            return False  # x implies y
    return True


def _is_prefix(a: Atom) -> bool:
    return a.kind in ("url", "path") and a.op == "startswith" and "?" not in a.value


def _eval3(e, env: dict[Atom, bool]) -> bool | None:
    """e under a partial assignment: True, False, or None (depends on unassigned tests)."""
    if isinstance(e, Atom):
        return env.get(e)
    if isinstance(e, Const):
        return e.value
    if isinstance(e, Not):
        v = _eval3(e.x, env)
        return None if v is None else not v
    is_and, unknown = isinstance(e, And), False
    for x in e.xs:
        v = _eval3(x, env)
        if v is None:
            unknown = True
        elif v != is_and:
            return v  # a False in AND, a True in OR decides
    return None if unknown else is_and


def satisfiable(e) -> bool:
    """Is there a request for which e holds? A backtracking search over the tests of e that stops
    at the first contradiction (three-valued evaluation, prefix facts checked as tests are set)."""
    return _search(e, list(dict.fromkeys(atoms_of(e))), {}, [], 0)


def _search(e, atoms: list[Atom], env: dict[Atom, bool], prefixes: list[Atom], i: int) -> bool:
    v = _eval3(e, env)
    if v is False:
        return False
    if i == len(atoms):
        return v is True
    a = atoms[i]
    is_prefix = _is_prefix(a)
    for val in (False, True):
        if is_prefix and not all(_prefix_ok(a, val, b, env[b]) for b in prefixes):
            continue
        env[a] = val
        if is_prefix:
            prefixes.append(a)
        ok = _search(e, atoms, env, prefixes, i + 1)
        if is_prefix:
            prefixes.pop()
        del env[a]
        if ok:
            return True
    return False


MAX_ATOMS = 24


@functools.lru_cache(maxsize=65536)
def decide(premise, question) -> bool | None:
    """True if every request satisfying premise satisfies question, False if none does,
    None if it depends (or there are too many tests to tell). An unsatisfiable premise: False."""
    if len(set(atoms_of(premise)) | set(atoms_of(question))) > MAX_ATOMS:
        return None
    if not satisfiable(simplify(And((premise, question)))):
        return False
    if not satisfiable(simplify(And((premise, Not(question))))):
        return True
    return None


def with_cert(e, present: bool = True):
    """The rule with every client-certificate test replaced by a constant."""
    if isinstance(e, Atom) and e.kind == "cert":
        return Const(present)
    if isinstance(e, Not):
        return Not(with_cert(e.x, present))
    if isinstance(e, (And, Or)):
        return type(e)(tuple(with_cert(x, present) for x in e.xs))
    return e


def assume(e, true_atoms: set):
    """The expression with the given atoms replaced by true (to show what is left of a condition)."""
    if isinstance(e, Atom):
        return Const(True) if e in true_atoms else e
    if isinstance(e, Not):
        return Not(assume(e.x, true_atoms))
    if isinstance(e, (And, Or)):
        return type(e)(tuple(assume(x, true_atoms) for x in e.xs))
    return e


def independent_dropped(premise, question):
    """The premise without the top-level conjuncts that share no test with the rest (and are no URL
    prefix tests): they can be chosen freely, so they never change what decide() answers, and
    without them the same few (premise, question) pairs repeat (decide is memoized)."""
    conj = list(premise.xs) if isinstance(premise, And) else [premise]
    if len(conj) == 1 and not atoms_of(premise):
        return premise
    seen: dict[Atom, int] = {}
    for a in atoms_of(question):
        seen[a] = 2
    per = [set(atoms_of(c)) for c in conj]
    for atoms in per:
        for a in atoms:
            seen[a] = seen.get(a, 0) + 1
    keep = [c for c, atoms in zip(conj, per)
            if not atoms or any(seen[a] > 1 or _is_prefix(a) for a in atoms)
            or not (isinstance(c, Atom) or isinstance(c, Not) and isinstance(c.x, Atom) or satisfiable(c))]
    return simplify(And(tuple(keep))) if keep else Const(True)


def implies_activesync(e) -> bool:
    """Does every request matching e start with /Microsoft-Server-ActiveSync (any case)?"""
    probe = Atom("url", "startswith", "/Microsoft-Server-ActiveSync", icase=True)
    return decide(simplify(e), probe) is True


# =============================================================================================
# 3. Commands


@dataclass(slots=True)
class Cmd:
    line: int
    text: str
    verb: str  # "add lb vserver"
    args: list[str]
    opts: dict[str, list[str]]  # lower-case option name -> values ([] for a flag)
    names: dict[str, str]  # lower-case -> as written
    written: str = ""  # the verb as written ("add policy httpCallout")

    def opt(self, name: str, default: str | None = None) -> str | None:
        v = self.opts.get(name)
        return " ".join(v) if v else default

    def short(self, width: int = 110) -> str:
        t = " ".join(self.text.split())
        return t if len(t) <= width else t[: width - 3] + "..."


VERBS = [
    ("add", "service"), ("add", "server"), ("add", "servicegroup"), ("bind", "servicegroup"),
    ("add", "lb", "vserver"), ("bind", "lb", "vserver"),
    ("add", "cs", "vserver"), ("add", "cs", "policy"), ("add", "cs", "action"), ("bind", "cs", "vserver"),
    ("set", "ssl", "vserver"), ("add", "ssl", "action"), ("add", "ssl", "policy"), ("bind", "ssl", "vserver"),
    ("add", "ssl", "certkey"), ("link", "ssl", "certkey"), ("bind", "ssl", "certkey"), ("add", "ssl", "profile"),
    ("bind", "ssl", "profile"), ("add", "ssl", "crl"), ("add", "ssl", "ocspresponder"),
    ("add", "policy", "httpcallout"), ("set", "policy", "httpcallout"),
    ("add", "responder", "policy"), ("add", "responder", "action"), ("set", "responder", "param"),
    ("bind", "responder", "global"), ("add", "lb", "monitor"), ("bind", "lb", "monitor"), ("bind", "service"),
    ("enable", "ns", "feature"), ("save", "ns", "config"),
]
_VERB_INDEX: dict[tuple[str, ...], tuple[str, ...]] = {v: v for v in VERBS}
_VERB_NAMES = {v: " ".join(v) for v in VERBS}
# commands that change nothing easgate would do
HARMLESS_VERBS = {"enable ns feature", "save ns config"}
# appliance-wide settings (addresses, routing, DNS, NTP, users, SNMP, ...): not part of a gateway
# config; counted in one line, listed with --verbose
APPLIANCE_PREFIXES = {
    ("set", "ns"), ("add", "ns"), ("enable", "ns"), ("disable", "ns"), ("bind", "ns"), ("add", "route"),
    ("add", "dns"), ("set", "dns"), ("add", "ntp"), ("set", "ntp"), ("enable", "ntp"), ("set", "system"),
    ("add", "system"), ("bind", "system"), ("add", "snmp"), ("set", "snmp"), ("add", "vlan"), ("bind", "vlan"),
    ("set", "interface"), ("add", "ha"), ("set", "ha"), ("set", "lacp"), ("add", "netprofile"), ("set", "audit"),
    ("add", "audit"), ("set", "cmp"), ("set", "appflow"), ("set", "lb"), ("set", "ssl"), ("set", "cache"),
    ("add", "authentication"), ("set", "aaa"), ("set", "ipsec"), ("set", "l3param"), ("set", "l2param"),
    ("set", "rsskeytype"), ("set", "ip6tunnelparam"), ("set", "iptunnelparam"), ("set", "videooptimization"),
}
# verbs of `set ssl ...` / `set lb ...` that are objects, not appliance parameters
_NOT_APPLIANCE = {("set", "ssl", "vserver"), ("set", "lb", "vserver")}
FLAGS = {"ca", "snicert", "skipcaname", "trustresponder", "encrypted"}
_OPTION = re.compile(r"^-[A-Za-z][A-Za-z0-9_]*$")

# Options easgate ignores on purpose: None = any value; a set = only these values (upper case).
ANY = None
_SERVICE_IGNORED: dict[str, set | None] = {
    "gslb": ANY, "maxclient": ANY, "maxreq": ANY, "cip": {"DISABLED"}, "usip": {"NO"},
    "useproxyport": ANY, "sp": ANY, "clttimeout": ANY, "svrtimeout": ANY, "cka": ANY, "tcpb": ANY,
    "cmp": {"NO"}, "healthmonitor": ANY, "comment": ANY, "appflowlog": ANY, "downstateflush": ANY,
    "maxbandwidth": {"0"}, "monthreshold": ANY, "td": {"0"}, "autoscale": {"DISABLED"},
}
_PROTOCOLS = {"ssl3": {"DISABLED"}, "tls1": {"DISABLED"}, "tls11": {"DISABLED"}, "tls12": {"ENABLED"},
              "tls13": {"ENABLED"}, "sessreuse": ANY, "sesstimeout": ANY, "denysslreneg": ANY, "ersa": ANY,
              "sslredirect": {"DISABLED"}, "snienable": ANY, "dh": {"DISABLED"}, "ersacount": ANY}
IGNORED: dict[str, dict[str, set | None]] = {
    "add service": _SERVICE_IGNORED,
    "add servicegroup": _SERVICE_IGNORED,
    "bind servicegroup": {"weight": ANY, "hashid": ANY, "customserverid": ANY},
    "add server": {"comment": ANY, "td": {"0"}},
    "add lb vserver": {
        "persistencetype": {"NONE"}, "clttimeout": ANY, "lbmethod": ANY, "comment": ANY, "appflowlog": ANY,
        "state": {"ENABLED"}, "downstateflush": ANY, "td": {"0"},
    },
    "bind lb vserver": {"weight": ANY, "gotopriorityexpression": {"END"}, "type": {"REQUEST"}},
    "add cs vserver": {
        "clttimeout": ANY, "comment": ANY, "appflowlog": ANY, "state": {"ENABLED"}, "casesensitive": ANY,
        "persistencetype": {"NONE"}, "downstateflush": ANY, "td": {"0"}, "listenpolicy": {"NONE"},
    },
    "add cs policy": {"comment": ANY},
    "add cs action": {"comment": ANY},
    "bind cs vserver": {"gotopriorityexpression": {"END"}, "type": {"REQUEST"}},
    "set ssl vserver": dict(_PROTOCOLS),
    "add ssl profile": {**_PROTOCOLS, "sslprofiletype": {"FRONTEND"}, "maxage": ANY},
    "bind ssl profile": {"ecccurvename": ANY, "ciphername": ANY, "cipherpriority": ANY},
    "add ssl action": {"comment": ANY},
    "add ssl policy": {"comment": ANY},
    "bind ssl vserver": {"skipcaname": ANY, "gotopriorityexpression": {"END"}, "type": {"REQUEST"},
                         "ecccurvename": ANY, "ciphername": ANY},
    "add ssl certkey": {"inform": {"PEM"}, "expirymonitor": ANY, "notificationperiod": ANY, "bundle": ANY},
    "add ssl crl": {"inform": ANY, "refresh": ANY, "method": ANY, "url": ANY, "server": ANY, "port": ANY,
                    "interval": ANY, "day": ANY, "time": ANY, "basedn": ANY, "binary": ANY, "scope": ANY},
    "add ssl ocspresponder": {"cache": ANY, "batchingdepth": ANY, "batchingdelay": ANY, "trustresponder": ANY,
                              "producedattimeskew": ANY, "usenonce": ANY, "insertclientcert": {"NO"},
                              "httpmethod": ANY, "respondercert": ANY, "signingcert": ANY},
    "add policy httpcallout": {"comment": ANY, "returntype": {"TEXT", "BOOL"}, "httpmethod": {"GET"}, "scheme": ANY},
    "add responder policy": {"comment": ANY, "logaction": ANY, "appflowaction": ANY},
    "add lb monitor": ANY,
    "bind lb monitor": ANY,
    "bind service": ANY,
}
IGNORED["set policy httpcallout"] = IGNORED["add policy httpcallout"]

HANDLED: dict[str, set[str]] = {
    "add service": {"state"}, "add server": {"state"}, "add servicegroup": {"state"},
    "bind servicegroup": {"state", "monitorname"}, "add lb vserver": set(),
    "bind lb vserver": {"policyname", "priority"},
    "add cs vserver": set(), "add cs policy": {"rule", "action"}, "add cs action": {"targetlbvserver"},
    "bind cs vserver": {"policyname", "targetlbvserver", "priority", "lbvserver"},
    "set ssl vserver": {"clientauth", "clientcert", "sslprofile"},
    "add ssl profile": {"clientauth", "clientcert", "hsts"},
    "add ssl action": {"clientcert", "certheader"}, "add ssl policy": {"rule", "action"},
    "bind ssl vserver": {"certkeyname", "ca", "policyname", "priority", "ocspcheck", "crlcheck", "snicert"},
    "add ssl certkey": {"cert", "key"}, "link ssl certkey": set(), "bind ssl certkey": {"ocspresponder", "priority"},
    "add ssl crl": {"cacert"}, "add ssl ocspresponder": {"url", "resptimeout", "cachetimeout"},
    "add policy httpcallout": {"vserver", "ipaddress", "port", "hostexpr", "urlstemexpr", "parameters",
                               "resultexpr", "cacheforsecs"},
    "add responder policy": {"undefaction"}, "add responder action": set(), "set responder param": {"undefaction"},
    "bind responder global": {"priority", "gotopriorityexpression", "type"},
    "enable ns feature": set(), "save ns config": set(),
}
HANDLED["set policy httpcallout"] = HANDLED["add policy httpcallout"]

PLACEHOLDER = re.compile(r"\[([A-Za-z0-9][A-Za-z0-9_.-]*)\]")


def parse_command(no: int, text: str, tokens: list[Token]) -> Cmd | str:
    """A Cmd, or the reason the line is not understood."""
    words = tuple(t.text.lower() for t in tokens[:3])
    verb = _VERB_INDEX.get(words) or _VERB_INDEX.get(words[:2])
    if verb is None:
        if words[:2] in APPLIANCE_PREFIXES and words not in _NOT_APPLIANCE:
            return Cmd(no, text, "appliance", [t.text for t in tokens], {}, {}, " ".join(words[:2]))
        return "unknown command '" + " ".join(t.text for t in tokens[:3]) + "'"
    rest = tokens[len(verb):]
    args: list[str] = []
    opts: dict[str, list[str]] = {}
    names: dict[str, str] = {}
    cur: str | None = None
    last = ""
    for t in rest:
        if not t.quoted and _OPTION.match(t.text):
            cur = t.text[1:].lower()
            if cur in opts:
                return f"option {t.text} given twice"
            opts[cur], names[cur] = [], sys.intern(t.text)
            last = cur
            if cur in FLAGS:
                cur = None
            continue
        if cur is None and not opts:
            args.append(t.text)
        else:  # NetScaler options may take several words (-parameters a(..) b(..), -cip ENABLED X-Header)
            opts[cur or last].append(t.text)
        if cur is not None:
            last = cur
    return Cmd(no, text, _VERB_NAMES[verb], args, opts, names,
               sys.intern(" ".join(t.text for t in tokens[:len(verb)])))


# =============================================================================================
# 4. The model and its translation


@dataclass(slots=True)
class Member:
    """One server of a pool: a service, or one member of a service group."""

    name: str  # service name, or "GROUP SERVER:PORT"
    host: str
    proto: str
    port: str
    cmd: Cmd  # the line that defines it
    disabled: str | None = None  # why it is out of rotation


@dataclass(slots=True)
class LbVserver:
    name: str
    proto: str
    ip: str | None
    port: str | None
    cmd: Cmd
    services: list[tuple[str, Cmd]] = field(default_factory=list)  # bound services and service groups
    responders: list[tuple[str, Cmd]] = field(default_factory=list)  # bound responder policies

    @property
    def addressable(self) -> bool:
        return bool(self.ip) and self.ip not in ("0", "0.0.0.0", "::") and self.port not in (None, "0")


@dataclass(slots=True)
class Report:
    line: int
    message: str


@dataclass
class Guard:
    """A responder policy `<condition> && SYS.HTTP_CALLOUT(c)...NOT` with a blocking action: the
    requests on which NetScaler asks callout c and blocks unless it allows."""

    policy: str
    cmd: Cmd
    bind: Cmd
    condition: object  # the expression without the callout test, or None when unreadable
    callout: str | None
    fail_closed: bool  # the undefined result (callout down, garbage) blocks
    undef_from: str  # where the undefAction comes from
    drop: bool  # DROP/RESET (True) or a response (False)
    problem: str | None = None


@dataclass
class Options:
    sets: dict[str, str] = field(default_factory=dict)  # placeholder name -> value
    certs: dict[str, tuple[str, str | None]] = field(default_factory=dict)  # certkey/crl -> (pem, key)
    certs_dir: Path | None = None
    services: dict[str, str] = field(default_factory=dict)  # service name -> host:port
    pool_ca: dict[str, str] = field(default_factory=dict)
    pool_sni: dict[str, str] = field(default_factory=dict)
    vserver: str | None = None  # the cs vserver to translate


STANDARD_PARAMS = {
    "user": 'HTTP.REQ.HEADER("authorization").AFTER_STR("Basic ").B64DECODE.BEFORE_STR(":").HTTP_URL_SAFE',
    "agent": 'HTTP.REQ.HEADER("user-agent").HTTP_URL_SAFE',
    "ip": "CLIENT.IP.SRC",
    "url": '("https://"+HTTP.REQ.HOSTNAME+HTTP.REQ.URL).B64ENCODE',
    "resultType": '"json"',
    "DeviceId": 'HTTP.REQ.URL.QUERY.VALUE("DeviceId")',
}


def canonical_expr(text: str) -> str:
    """Expression text compared loosely: no spaces, keywords upper case, header names lower case."""
    try:
        toks = _lex(text)
    except ExprError:
        return " ".join(text.split())
    out = []
    for i, (k, v) in enumerate(toks):
        if k == "id":
            out.append(v.upper())
        elif k == "str":
            hdr = i >= 2 and toks[i - 1] == ("op", "(") and toks[i - 2][0] == "id" and toks[i - 2][1].upper() == "HEADER"
            out.append('"' + (v.lower() if hdr else v) + '"')
        else:
            out.append(v)
    return "".join(out)


def split_parameters(text: str) -> list[tuple[str, str]] | None:
    """`user(expr) agent(expr) ...` -> [(name, expr)], None if malformed."""
    out, i, n = [], 0, len(text)
    while True:
        while i < n and text[i].isspace():
            i += 1
        if i >= n:
            return out
        m = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\(").match(text, i)
        if not m:
            return None
        j, depth, inner = m.end(), 1, False
        while j < n and depth:
            c = text[j]
            if inner:
                if c == "\\":
                    j += 1
                elif c == '"':
                    inner = False
            elif c == '"':
                inner = True
            elif c == "(":
                depth += 1
            elif c == ")":
                depth -= 1
            j += 1
        if depth:
            return None
        out.append((m.group()[:-1], text[m.end():j - 1]))
        i = j


def string_literal(expr: str | None) -> str | None:
    """The value of an expression that is just a string literal (`"x"`), else None."""
    if expr is None:
        return None
    try:
        toks = _lex(expr)
    except ExprError:
        return None
    return toks[0][1] if len(toks) == 1 and toks[0][0] == "str" else None


BLOCKING = {"DROP", "RESET"}
BUILTIN_PROFILE = "ns_default_ssl_profile"
# how many earlier routes may refine a decision about one route (keeps the import linear)
REFINE_ROUTES = 8


def _atom_key(a: Atom) -> tuple:
    kind = "url" if a.kind in ("url", "path") else a.kind
    return kind, a.value.lower(), a.name.lower()


class Importer:
    def __init__(self, text: str, file: str = "<netscaler>", opts: Options | None = None) -> None:
        self.file = file
        self.o = opts or Options()
        self.reports: list[Report] = []  # not translated: changes behaviour (exit status 1)
        self.weaker: list[Report] = []  # weaker than NetScaler: lets through what it blocks (exit status 3)
        self.notes: list[str] = []
        self.unused: list[str] = []  # objects the translated cs vserver does not use
        self.appliance: list[str] = []  # appliance-wide settings, ignored
        self.fill_in: set[str] = set()
        self.placeholders_in_input: set[str] = set()
        self.used: set[tuple[str, str]] = set()
        self.said: set[tuple[str, str]] = set()
        self.cmds: list[Cmd] = []
        for no, text_line in logical_lines(text):
            try:
                toks = tokenize(text_line)
            except NsSyntaxError as e:
                self.untranslated(no, f"{e}: {_short(text_line)}")
                continue
            for t in toks:
                self.placeholders_in_input.update(PLACEHOLDER.findall(t.text))
            toks = [Token(self.substitute(t.text), t.quoted) for t in toks]
            c = parse_command(no, text_line, toks)
            if isinstance(c, str):
                self.untranslated(no, f"{c}: {_short(text_line)}")
            elif c.verb == "appliance":
                self.appliance.append(f"line {no}: {c.short(60)}")
            else:
                self.cmds.append(c)

    # -- bookkeeping -------------------------------------------------------------------------

    def untranslated(self, line: int, message: str) -> None:
        self.reports.append(Report(line, message))

    def weakens(self, line: int, message: str) -> None:
        self.weaker.append(Report(line, message))

    def use(self, kind: str, name: str | None) -> None:
        if name:
            self.used.add((kind, name))

    def substitute(self, s: str) -> str:
        return PLACEHOLDER.sub(lambda m: self.o.sets.get(m[1], m[0]), s)

    def value(self, s: str) -> str:
        """An output value: a remaining [PLACEHOLDER] becomes FILL-IN-PLACEHOLDER (and is noted)."""
        def fill(m: re.Match) -> str:
            self.fill_in.add(m[1])
            return f"FILL-IN-{m[1]}"
        return PLACEHOLDER.sub(fill, s)

    def check_options(self, c: Cmd) -> None:
        if c.verb in IGNORED and IGNORED[c.verb] is None:
            return
        ignored = IGNORED.get(c.verb, {})
        handled = HANDLED.get(c.verb, set())
        for name, vals in c.opts.items():
            if name in handled:
                continue
            if name in ignored:
                allowed = ignored[name]
                if allowed is None or " ".join(vals).upper() in allowed:
                    continue
            self.untranslated(c.line, f"{c.written} {c.args[0] if c.args else ''}: option "
                                      f"{c.names[name]} {' '.join(vals)}".rstrip() + " is not supported by easgate")

    # -- reading the objects ------------------------------------------------------------------

    def collect(self) -> None:
        self.servers: dict[str, Cmd] = {}
        self.services: dict[str, Cmd] = {}
        self.groups: dict[str, Cmd] = {}
        self.group_members: dict[str, list[Cmd]] = {}
        self.lbs: dict[str, LbVserver] = {}
        self.cs: dict[str, Cmd] = {}
        self.cs_policies: dict[str, Cmd] = {}
        self.cs_actions: dict[str, Cmd] = {}
        self.cs_binds: dict[str, list[Cmd]] = {}
        self.cs_responders: dict[str, list[Cmd]] = {}
        self.global_responders: list[Cmd] = []
        self.responders: dict[str, Cmd] = {}
        self.responder_actions: dict[str, Cmd] = {}
        self.responder_param: Cmd | None = None
        self.ssl_set: dict[str, list[Cmd]] = {}
        self.ssl_profiles: dict[str, Cmd] = {}
        self.ssl_actions: dict[str, Cmd] = {}
        self.ssl_policies: dict[str, Cmd] = {}
        self.ssl_binds: list[Cmd] = []
        self.certkeys: dict[str, Cmd] = {}
        self.links: dict[str, Cmd] = {}
        self.crls: dict[str, Cmd] = {}  # by CA certkey
        self.crl_names: dict[str, Cmd] = {}
        self.ocsp_responders: dict[str, Cmd] = {}
        self.ocsp_binds: dict[str, Cmd] = {}  # CA certkey -> bind ssl certKey -ocspResponder
        self.callouts: dict[str, list[Cmd]] = {}
        self.monitors: list[Cmd] = []
        self.objects: list[tuple[str, str, Cmd]] = []  # (kind, name, line) of every object defined
        pending_lb_binds: list[Cmd] = []
        pending_cs_binds: list[Cmd] = []
        for c in self.cmds:
            if c.verb in HARMLESS_VERBS:
                continue
            self.check_options(c)
            a = c.args
            need = {"add service": 4, "add server": 2, "add servicegroup": 2, "bind servicegroup": 1,
                    "add lb vserver": 2, "bind lb vserver": 1, "add cs vserver": 2, "bind cs vserver": 1,
                    "link ssl certkey": 2, "add ssl crl": 2, "add responder policy": 3,
                    "set responder param": 0, "add lb monitor": 0, "bind lb monitor": 0, "bind service": 0,
                    "bind responder global": 1, "add responder action": 1}.get(c.verb, 1)
            if len(a) < need:
                self.untranslated(c.line, f"{c.verb}: expected {need} arguments: {c.short()}")
                continue
            kind = {"add server": "server", "add service": "service", "add servicegroup": "service group",
                    "add lb vserver": "lb vserver", "add cs vserver": "cs vserver", "add cs policy": "cs policy",
                    "add cs action": "cs action", "add ssl profile": "ssl profile", "add ssl action": "ssl action",
                    "add ssl policy": "ssl policy", "add ssl certkey": "ssl certKey", "add ssl crl": "ssl crl",
                    "add ssl ocspresponder": "ssl ocspResponder", "add policy httpcallout": "httpCallout",
                    "add responder policy": "responder policy", "add responder action": "responder action",
                    "add lb monitor": "lb monitor"}.get(c.verb)
            if kind and a:
                self.objects.append((kind, a[0], c))
            if c.verb == "add server":
                self.servers[a[0]] = c
            elif c.verb == "add service":
                self.services[a[0]] = c
            elif c.verb == "add servicegroup":
                self.groups[a[0]] = c
                self.group_members.setdefault(a[0], [])
            elif c.verb == "bind servicegroup":
                if a[0] not in self.groups:
                    self.untranslated(c.line, f"bind serviceGroup: no service group named '{a[0]}'")
                elif len(a) >= 3:
                    self.group_members[a[0]].append(c)
                elif "monitorname" in c.opts:
                    self.monitors.append(c)
                else:
                    self.untranslated(c.line, f"bind serviceGroup {a[0]}: expected SERVER PORT: {c.short()}")
            elif c.verb == "add lb vserver":
                self.lbs[a[0]] = LbVserver(a[0], a[1].upper(), a[2] if len(a) > 2 else None,
                                           a[3] if len(a) > 3 else None, c)
            elif c.verb == "bind lb vserver":
                pending_lb_binds.append(c)
            elif c.verb == "add cs vserver":
                self.cs[a[0]] = c
            elif c.verb == "add cs policy":
                self.cs_policies[a[0]] = c
            elif c.verb == "add cs action":
                self.cs_actions[a[0]] = c
            elif c.verb == "bind cs vserver":
                pending_cs_binds.append(c)
            elif c.verb == "add responder policy":
                self.responders[a[0]] = c
            elif c.verb == "add responder action":
                self.responder_actions[a[0]] = c
            elif c.verb == "set responder param":
                self.responder_param = c
            elif c.verb == "bind responder global":
                self.global_responders.append(c)
            elif c.verb == "set ssl vserver":
                self.ssl_set.setdefault(a[0], []).append(c)
            elif c.verb == "add ssl profile":
                self.ssl_profiles[a[0]] = c
            elif c.verb == "add ssl action":
                self.ssl_actions[a[0]] = c
            elif c.verb == "add ssl policy":
                self.ssl_policies[a[0]] = c
            elif c.verb == "bind ssl vserver":
                self.ssl_binds.append(c)
            elif c.verb == "add ssl certkey":
                self.certkeys[a[0]] = c
            elif c.verb == "link ssl certkey":
                self.links[a[0]] = c
            elif c.verb == "add ssl crl":
                self.crl_names[a[0]] = c
                if c.opt("cacert"):
                    self.crls[c.opt("cacert")] = c
            elif c.verb == "add ssl ocspresponder":
                self.ocsp_responders[a[0]] = c
            elif c.verb == "bind ssl certkey":
                if c.opt("ocspresponder"):
                    self.ocsp_binds[a[0]] = c
            elif c.verb in ("add policy httpcallout", "set policy httpcallout"):
                if c.verb == "set policy httpcallout" and a[0] not in self.callouts:
                    self.untranslated(c.line, f"set policy httpCallout: no callout named '{a[0]}' was added")
                    continue
                self.callouts.setdefault(a[0], []).append(c)
            elif c.verb in ("add lb monitor", "bind lb monitor", "bind service"):
                self.monitors.append(c)
        for c in pending_lb_binds:  # a saved ns.conf binds before or after the policies it names
            a = c.args
            lb = self.lbs.get(a[0])
            if lb is None:
                self.untranslated(c.line, f"bind lb vserver: no lb vserver named '{a[0]}'")
            elif c.opt("policyname"):
                if c.opt("policyname") in self.responders:
                    lb.responders.append((c.opt("policyname"), c))
                else:
                    self.untranslated(c.line, f"bind lb vserver {a[0]}: no responder policy named "
                                              f"'{c.opt('policyname')}'")
            elif len(a) < 2 or (a[1] not in self.services and a[1] not in self.groups):
                self.untranslated(c.line, f"bind lb vserver {a[0]}: no service or service group named "
                                          f"'{a[1] if len(a) > 1 else ''}'")
            else:
                lb.services.append((a[1], c))
        for c in pending_cs_binds:
            pol = c.opt("policyname")
            if pol and pol in self.responders and pol not in self.cs_policies:
                self.cs_responders.setdefault(c.args[0], []).append(c)
            else:
                self.cs_binds.setdefault(c.args[0], []).append(c)

    # -- translation ---------------------------------------------------------------------------

    def translate(self) -> str:
        self.collect()
        cs_name = self.pick_cs()
        cs = self.cs.get(cs_name) if cs_name else None
        self.use("cs vserver", cs_name)
        routes = self.build_routes(cs_name)
        self.index_routes(routes)
        used_lbs = list(dict.fromkeys(r["lb"] for r in routes if r.get("lb")))
        pools = {name: self.build_pool(self.lbs[name]) for name in used_lbs}
        for r in routes:
            if r.get("lb") and pools.get(r["lb"]) is None and not r.get("skip"):
                self.untranslated(r["bind"].line, f"route {r['name']}: lb vserver {r['lb']} has no server in "
                                                  "rotation, so the route is left out")
                r["skip"] = True
        self.cert_headers(cs_name, routes)
        guards = self.read_guards(cs_name, used_lbs)
        callout = None
        if guards:
            callout = self.authorize_by_guards(routes, guards)
        elif self.callouts:
            callout = self.build_callout(list(self.callouts))
            if callout:
                self.attach_authorization(routes, callout)
        self.listeners_not_served(cs_name, used_lbs, callout)
        tls = self.build_tls(cs_name)
        self.find_unused(cs_name)

        out = Yaml()
        self.header(out)
        if cs is not None:
            out.comment(f"line {cs.line}: {cs.short()}")
            port = cs.args[3] if len(cs.args) > 3 else "443"
            out.line("listen:")
            host = self.value(cs.args[2] if len(cs.args) > 2 else "0.0.0.0")
            out.kv(1, "host", host, "FILL IN: the address to listen on (0.0.0.0 for all)" if "FILL-IN" in host else None)
            out.kv(1, "port", int(port) if port.isdigit() else 443)
            if cs.opts.get("clttimeout"):
                out.comment(f"-cltTimeout {cs.opt('clttimeout')} is not carried over: easgate keeps idle client "
                            "connections open for client_idle_timeout_s (3660 s), as ActiveSync Ping needs", 0)
            out.blank()
        tls.emit(out)
        out.blank()
        out.line("pools:")
        for name in used_lbs:
            if pools[name] is not None:
                pools[name].emit(out)
        out.blank()
        emitted = [r for r in routes if not r.get("skip") and r.get("match") is not None]
        out.comment("cs policies in priority order (lower first, first match wins), as bound to the cs vserver")
        out.line("routes:")
        for r in routes:
            self.emit_route(out, r)
        default = next((r for r in routes if r.get("default") and not r.get("skip")), None)
        if not emitted and default is None:
            out.line("  []")
        if default is not None:
            out.line(f"default_route: {default['name']}")
        out.blank()
        if callout:
            callout.emit(out)
        return out.text()

    def header(self, out: "Yaml") -> None:
        out.comment(f"easgate configuration imported from {Path(self.file).name} by `easgate import-netscaler`.")
        if self.weaker:
            out.comment("")
            out.comment(f"WEAKER THAN NETSCALER: {len(self.weaker)} difference(s) below let through what the "
                        "appliance blocks")
            out.comment("(fail mode, authorization coverage, client certificates, revocation, header insertion).")
            out.comment("Do not switch over before each is resolved:")
            for r in sorted(self.weaker, key=lambda r: r.line):
                out.comment(f"  line {r.line}: {r.message}")
        if self.fill_in:
            out.comment("")
            out.comment("Replace every value marked FILL IN (or import again with --set/--cert), then run")
            out.comment("`easgate check` on this file.")
        else:
            out.comment("Run `easgate check` on this file before use.")
        if self.reports:
            out.comment("")
            out.comment(f"NOT TRANSLATED: {len(self.reports)} item(s) below change behaviour and have no easgate")
            out.comment("equivalent here (also printed on stderr). Decide for each before you switch over:")
            for r in sorted(self.reports, key=lambda r: r.line):
                out.comment(f"  line {r.line}: {r.message}")
        if self.unused or self.appliance:
            out.comment("")
            out.comment(self.unused_line())
        out.blank()

    def unused_line(self) -> str:
        parts = []
        if self.unused:
            parts.append(f"{len(self.unused)} object(s) not used by cs vserver {self.cs_name}: left out")
        if self.appliance:
            parts.append(f"{len(self.appliance)} appliance setting(s) (addresses, routes, DNS, NTP, users, ...) ignored")
        return "; ".join(parts) + " (--verbose lists them)"

    # -- cs vserver and routes --------------------------------------------------------------------

    def pick_cs(self) -> str | None:
        self.cs_name = None
        if not self.cs:
            self.untranslated(0, "no `add cs vserver`: easgate serves one content-switching listener; "
                                 "nothing to listen on was found")
            return None
        if self.o.vserver is not None:
            if self.o.vserver not in self.cs:
                raise UsageError(f"--vserver {self.o.vserver}: no cs vserver of that name in {self.file} "
                                 f"(there are: {', '.join(self.cs)})")
            name = self.o.vserver
        else:
            # the mail cs vserver: one whose traffic a responder policy guards, else one with a cs
            # policy that only matches ActiveSync, else the first
            name = next((vs for vs in self.cs if self.guarded_vserver(vs)), None) or next(
                (vs for vs in self.cs if any(self.carries_activesync(b) for b in self.cs_binds.get(vs, []))),
                next(iter(self.cs)))
            if len(self.cs) > 1:
                self.notes.append(f"{len(self.cs)} cs vservers: translated {name} (the one whose traffic responder "
                                  "policies guard or that carries ActiveSync, else the first); choose another with "
                                  f"--vserver NAME ({', '.join(self.cs)})")
        c = self.cs[name]
        if c.args[1].upper() != "SSL":
            self.untranslated(c.line, f"cs vserver {name} is {c.args[1]}: easgate listens with TLS only")
        self.cs_name = name
        return name

    def guarded_vserver(self, vs: str) -> bool:
        if self.cs_responders.get(vs):
            return True
        for b in self.cs_binds.get(vs, []):
            targets = {b.opt("lbvserver"), b.opt("targetlbvserver"), b.args[1] if len(b.args) > 1 else None}
            pol = self.cs_policies.get(b.opt("policyname") or "")
            if pol is not None and pol.opt("action") in self.cs_actions:
                targets.add(self.cs_actions[pol.opt("action")].opt("targetlbvserver"))
            if any(t in self.lbs and self.lbs[t].responders for t in targets):
                return True
        return False

    def carries_activesync(self, b: Cmd) -> bool:
        pol = self.cs_policies.get(b.opt("policyname") or "")
        try:
            return pol is not None and implies_activesync(parse_expr(pol.opt("rule") or ""))
        except ExprError:
            return False

    def build_routes(self, cs_name: str | None) -> list[dict]:
        routes: list[dict] = []
        for vs, binds in self.cs_binds.items():
            if vs not in self.cs:
                for b in binds:
                    self.untranslated(b.line, f"bind cs vserver: no cs vserver named '{vs}'")
        for b in self.cs_binds.get(cs_name or "", []):
            vs = b.args[0]
            target = b.opt("lbvserver") or (b.args[1] if len(b.args) > 1 else None)
            if not b.opt("policyname"):
                if target is None:
                    self.untranslated(b.line, f"bind cs vserver {vs}: neither -policyName nor a default lb vserver")
                    continue
                if target not in self.lbs:
                    self.untranslated(b.line, f"bind cs vserver {vs}: no lb vserver named '{target}'")
                    continue
                routes.append({"name": f"{vs}_default", "default": True, "lb": target, "bind": b, "expr": Const(True),
                               "match": None, "comments": [f"line {b.line}: {b.short()}"]})
                continue
            pname = b.opt("policyname")
            pol = self.cs_policies.get(pname)
            if pol is None:
                self.untranslated(b.line, f"bind cs vserver {vs}: no cs policy named '{pname}'")
                continue
            self.use("cs policy", pname)
            prio = b.opt("priority")
            if not prio or not prio.isdigit():
                self.untranslated(b.line, f"bind cs vserver {vs} -policyName {pname}: no numeric -priority")
                continue
            target = b.opt("targetlbvserver")
            comments = [f"line {pol.line}: {pol.short()}"]
            if target is None and pol.opt("action"):
                act = self.cs_actions.get(pol.opt("action"))
                if act is None:
                    self.untranslated(pol.line, f"cs policy {pname}: no cs action named '{pol.opt('action')}'")
                    continue
                self.use("cs action", act.args[0])
                comments.append(f"line {act.line}: {act.short()}")
                target = act.opt("targetlbvserver")
            if target is None:
                self.untranslated(b.line, f"bind cs vserver {vs} -policyName {pname}: no -targetLBVserver")
                continue
            if target not in self.lbs:
                self.untranslated(b.line, f"bind cs vserver {vs} -policyName {pname}: no lb vserver named '{target}'")
                continue
            comments.append(f"line {b.line}: {b.short()}")
            r = {"name": pname, "priority": int(prio), "lb": target, "bind": b, "policy": pol, "comments": comments}
            rule = pol.opt("rule")
            if rule is not None and (ph := PLACEHOLDER.findall(rule)):
                self.untranslated(pol.line, f"cs policy {pname}: the rule still contains [{ph[0]}]: "
                                            f"import again with --set {ph[0]}=VALUE")
                r["expr"], r["skip"] = Atom("opaque", value=pname), True
            elif rule is None:
                self.untranslated(pol.line, f"cs policy {pname}: no -rule (classic -url/-domain policies are not supported)")
                r["expr"], r["skip"] = Atom("opaque", value=pname), True
            else:
                try:
                    r["expr"] = simplify(parse_expr(rule))
                    r["match"] = to_match(r["expr"])
                    if r["match"] is None:
                        r["skip"] = True
                        r["comments"].append("the rule is always false: no route")
                except ExprError as e:
                    self.untranslated(pol.line, f"cs policy {pname}: {e}")
                    r["expr"], r["skip"] = Atom("opaque", value=pname), True
                    r["unreadable"] = True
            routes.append(r)
        named = sorted((r for r in routes if not r.get("default")), key=lambda r: r["priority"])
        for a, b in itertools.pairwise(named):
            if a["priority"] == b["priority"]:
                self.untranslated(b["bind"].line, f"priority {b['priority']} is bound twice")
                b["skip"] = True
        defaults = [r for r in routes if r.get("default")]
        for d in defaults[1:]:
            self.untranslated(d["bind"].line, "a second default lb vserver for the same cs vserver")
        if defaults:
            top = max((r["priority"] for r in named), default=0)
            defaults[0]["priority"] = min(top + 1000, 2**31)
            if any(r["name"] == defaults[0]["name"] for r in named):
                defaults[0]["name"] += "_lb"
        for r in named + defaults[:1]:
            self.use("lb vserver", r["lb"])
        return named + defaults[:1]

    def index_routes(self, routes: list[dict]) -> None:
        """Which earlier routes test the same things: what `holds_on` may use to refine a decision."""
        self.routes = routes
        self.by_atom: dict[tuple, list[int]] = {}
        for i, r in enumerate(routes):
            r["index"] = i
            r["keys"] = frozenset(_atom_key(a) for a in atoms_of(r["expr"]))
            for k in r["keys"]:
                self.by_atom.setdefault(k, []).append(i)

    def holds_on(self, r: dict, question) -> bool | None:
        """Does `question` hold for every request that reaches route r (True), for none (False), or
        does it depend (None)? Requests reaching r match its rule and no earlier one: the earlier
        rules that share a test with the question are added, nearest first, while the truth table
        stays small. Fewer earlier rules only ever turn an answer into None, never a wrong one."""
        premise = r["expr"]
        got = decide(independent_dropped(premise, question), question)
        if got is not None:
            return got
        atoms = set(atoms_of(premise)) | set(atoms_of(question))
        keys = {_atom_key(a) for a in atoms}
        earlier: set[int] = set()
        for k in keys:
            idx = self.by_atom.get(k, [])
            pos = bisect.bisect_left(idx, r["index"])
            earlier.update(idx[max(0, pos - REFINE_ROUTES):pos])
        parts = [premise]
        for i in sorted(earlier, reverse=True)[:REFINE_ROUTES]:
            # only rules about the same tests: one with tests of its own rarely decides anything here
            if self.routes[i]["keys"] <= keys:
                parts.append(Not(self.routes[i]["expr"]))
        if len(parts) == 1:
            return None
        return decide(simplify(And(tuple(parts))), question)

    def cert_headers(self, cs_name: str | None, routes: list[dict]) -> None:
        """ssl policies with a -certHeader action -> client_cert_header on the routes they cover."""
        binds = []
        for b in self.ssl_binds:
            if b.opt("policyname") is None or b.args[0] != cs_name:
                continue
            pol = self.ssl_policies.get(b.opt("policyname"))
            if pol is None:
                self.untranslated(b.line, f"bind ssl vserver: no ssl policy named '{b.opt('policyname')}'")
                continue
            self.use("ssl policy", pol.args[0])
            act = self.ssl_actions.get(pol.opt("action") or "")
            if act is None:
                self.untranslated(pol.line, f"ssl policy {pol.args[0]}: no ssl action named '{pol.opt('action')}'")
                continue
            self.use("ssl action", act.args[0])
            header = act.opt("certheader")
            if not header:
                continue  # an action without a header inserts nothing
            if (act.opt("clientcert") or "").upper() != "ENABLED":
                continue  # the header is only inserted with -clientCert ENABLED
            try:
                rule = simplify(parse_expr(pol.opt("rule") or ""))
            except ExprError as e:
                self.untranslated(pol.line, f"ssl policy {pol.args[0]}: {e}; no route gets its {header} header")
                continue
            prio = int(b.opt("priority")) if (b.opt("priority") or "").isdigit() else 0
            binds.append((prio, b, pol, act, header, simplify(with_cert(rule, True))))
        binds.sort(key=lambda x: x[0])
        for r in routes:
            if r.get("skip"):
                continue
            # the header exists only when a certificate was presented (and, here, verified)
            view = dict(r, expr=simplify(with_cert(r["expr"], True)))
            for prio, b, pol, act, header, rule in binds:
                applies = self.holds_on(view, rule)
                where = f"ssl policy {pol.args[0]} (line {pol.line})"
                if applies is True:
                    r["cert_header"] = header
                    r["comments"].append(f"{where}: its rule holds for every request on this route that "
                                         f"presents a certificate, so {header} carries the verified certificate")
                    break
                if applies is False:
                    r["comments"].append(f"{where} never holds here: no certificate header")
                    continue
                self.untranslated(b.line, f"ssl policy {pol.args[0]} covers only part of route {r['name']}'s "
                                          f"traffic; easgate sets client_cert_header per route: split the cs policy")
                break

    # -- responder policies and callouts ----------------------------------------------------

    def undef_default(self) -> tuple[str, str]:
        p = self.responder_param
        if p is not None and p.opt("undefaction"):
            return p.opt("undefaction").upper(), f"`set responder param -undefAction {p.opt('undefaction')}` (line {p.line})"
        return "NOOP", "NetScaler's default undefAction NOOP (no `set responder param -undefAction`)"

    def read_guards(self, cs_name: str | None, used_lbs: list[str]) -> dict[str, list[Guard]]:
        """Responder policies by where they apply: an lb vserver name, or "*" (the cs vserver, global)."""
        out: dict[str, list[Guard]] = {}
        binds = [("*", b.opt("policyname"), b) for b in self.cs_responders.get(cs_name or "", [])]
        binds += [("*", b.args[0], b) for b in self.global_responders]
        binds += [(lb, p, b) for lb in used_lbs for p, b in self.lbs[lb].responders]
        for where, pname, b in binds:
            pol = self.responders.get(pname)
            if pol is None:
                self.untranslated(b.line, f"no responder policy named '{pname}'")
                continue
            self.use("responder policy", pname)
            g = self.read_guard(pol, b)
            if g is not None:
                out.setdefault(where, []).append(g)
        return out

    def read_guard(self, pol: Cmd, bind: Cmd) -> Guard | None:
        name, rule_text, action = pol.args[0], pol.args[1], pol.args[2].upper()
        undef = (pol.opt("undefaction") or (pol.args[3] if len(pol.args) > 3 else "")).upper()
        undef_from = f"its -undefAction {undef} (line {pol.line})" if undef else ""
        if not undef:
            undef, undef_from = self.undef_default()
        if action == "NOOP":
            self.notes.append(f"responder policy {name} (line {pol.line}) has action NOOP: no effect")
            return None
        drop = action in BLOCKING
        if not drop:
            act = self.responder_actions.get(pol.args[2])
            if act is None:
                self.untranslated(pol.line, f"responder policy {name}: no responder action named '{pol.args[2]}'")
            else:
                self.use("responder action", act.args[0])
        g = Guard(name, pol, bind, None, None, undef in BLOCKING, undef_from, drop)
        try:
            rule = simplify(parse_expr(rule_text))
        except ExprError as e:
            g.problem = f"responder policy {name}: {e}"
            return g
        conj = list(rule.xs) if isinstance(rule, And) else [rule]
        calls = [x for x in conj if any(a.kind == "callout" for a in atoms_of(x))]
        if len(calls) != 1 or not isinstance(calls[0], Not) or not isinstance(calls[0].x, Atom):
            g.problem = (f"responder policy {name}: easgate translates `<condition> && SYS.HTTP_CALLOUT(c).NOT` "
                         f"(block unless the connector allows) only, not: {_short(show(rule), 80)}")
            return g
        call: Atom = calls[0].x
        if not (call.op == "bool" or (call.value.lower() == "allow" and call.op in ("contains", "eq", "startswith"))):
            g.problem = f"responder policy {name}: {show(call)} is not a test that the connector allowed"
            return g
        if call.name not in self.callouts:
            g.problem = f"responder policy {name}: no httpCallout named '{call.name}'"
            return g
        g.callout = call.name
        rest = [x for x in conj if x is not calls[0]]
        g.condition = simplify(And(tuple(rest))) if rest else Const(True)
        return g

    def authorize_by_guards(self, routes: list[dict], guards: dict[str, list[Guard]]) -> "CalloutOut | None":
        """`authorize: activesync` exactly on the routes whose traffic a callout responder policy guards."""
        applied: list[Guard] = []
        for r in routes:
            gs = guards.get(r.get("lb") or "", []) + guards.get("*", [])
            if not gs:
                continue
            if r.get("skip"):
                if r.get("unreadable") or r.get("match") is not None:
                    names = ", ".join(g.policy for g in gs)
                    self.weakens(r["bind"].line, f"route {r['name']} is left out, but its traffic to lb vserver "
                                                 f"{r['lb']} is guarded by responder {names} on NetScaler: here it "
                                                 "takes a later route, unguarded")
                continue
            for g in (g for g in gs if g.problem):
                if self.holds_on(r, Const(True)) is not False and (g.policy, r["name"]) not in self.said:
                    self.said.add((g.policy, r["name"]))
                    self.weakens(g.cmd.line, f"{g.problem}; what it blocks on NetScaler passes on route {r['name']}")
            gs = [g for g in gs if not g.problem]
            if not gs:
                continue
            cond = [g.condition for g in gs]
            holds = self.holds_on(r, simplify(Or(tuple(cond))) if len(cond) > 1 else cond[0])
            names = ", ".join(f"{g.policy} (line {g.cmd.line})" for g in gs)
            if holds is False:
                r["comments"].append(f"responder {names} never holds here: no authorization")
                continue
            applied.extend(gs)
            r["authorize"] = True
            r["comments"].append(f"authorize: responder {names} asks the connector on this route")
            if holds is None:
                known = set(atoms_of(r["expr"]))  # what the route's own rule already says
                shown = " || ".join(_short(show(simplify(assume(c, known))), 70) for c in cond)
                self.untranslated(r["bind"].line, f"route {r['name']}: NetScaler asks the connector only where "
                                                  f"{shown}; easgate decides every ActiveSync request on the route "
                                                  "(stricter: requests without identity are denied)")
        if not applied:
            return None
        order = list(dict.fromkeys(g.callout for g in applied))
        out = self.build_callout(order, guarded=True)
        if out is None or out.url is None:
            self.weakens(applied[0].cmd.line, "the responder policies call a callout that cannot be translated; "
                                              "easgate has no connector to ask")
            return None
        fail_closed = [g for g in applied if g.fail_closed]
        if fail_closed:
            out.on_error = "deny"
            out.fail_reason = f"{fail_closed[0].policy}: {fail_closed[0].undef_from}"
            if len(fail_closed) < len(applied):
                opened = next(g for g in applied if not g.fail_closed)
                self.untranslated(opened.cmd.line, f"responder policy {opened.policy} lets a request through when "
                                                   f"its callout fails ({opened.undef_from}); easgate denies "
                                                   "(stricter, one fail mode for all)")
        else:
            out.on_error = "allow"
            out.fail_reason = f"{applied[0].policy}: {applied[0].undef_from}"
        out.drop = all(g.drop for g in applied)
        return out

    def callout_url(self, name: str) -> tuple[str | None, str | None, list[str]]:
        """(url, lb vserver, comments) of a callout; reports what cannot be translated."""
        merged: dict[str, tuple[str, Cmd]] = {}
        for c in self.callouts[name]:
            for k in c.opts:
                merged[k] = (c.opt(k) or "", c)
        first = self.callouts[name][0]
        comments = [f"line {c.line}: {c.short()}" for c in self.callouts[name]]
        scheme, hostport, lbname = None, None, None
        if "vserver" in merged:
            vs, c = merged["vserver"]
            lb = self.lbs.get(vs)
            if lb is None:
                self.untranslated(c.line, f"httpCallout {name}: no lb vserver named '{vs}'")
            else:
                members = self.pool_members(lb)
                live = [m for m in members if not m.disabled]
                if not live:
                    self.untranslated(c.line, f"httpCallout {name}: lb vserver {vs} has no server in rotation")
                else:
                    m = live[0]
                    if len(live) > 1:
                        self.untranslated(live[1].cmd.line, f"lb vserver {vs} (the callout's) has several servers; "
                                                            f"the connector URL uses the first, {m.name}")
                    scheme, hostport = self.member_url(m)
                    comments.append(f"-vServer {vs} -> {m.name} (line {m.cmd.line}): {m.proto} {m.host}:{m.port}")
                    lbname = vs
                    self.use("lb vserver", vs)
        elif "ipaddress" in merged:
            ip, c = merged["ipaddress"]
            port = merged.get("port", ("80", c))[0]
            scheme, hostport = "http", f"{self.value(ip)}:{port}"
        else:
            self.untranslated(first.line, f"httpCallout {name}: no -vServer or -IPAddress: nowhere to send it")
        stem = None
        if "urlstemexpr" in merged:
            expr, c = merged["urlstemexpr"]
            stem = string_literal(expr)
            if stem is None:
                self.untranslated(c.line, f"httpCallout {name}: -urlStemExpr {expr} is not a plain string")
        stem = stem or "/services/ActiveSync/Authorize"
        if not stem.startswith("/"):
            stem = "/" + stem
        return (f"{scheme}://{hostport}{stem}" if scheme and hostport else None), lbname, comments

    def build_callout(self, names: list[str], guarded: bool = False) -> "CalloutOut | None":
        if not names:
            return None
        main = names[0]
        url, lb, comments = self.callout_url(main)
        out = CalloutOut(main, ", ".join(str(c.line) for c in self.callouts[main]), url=url, lb=lb, comments=comments,
                         guarded=guarded)
        self.check_callout(main, out)
        ttls = [self.callout_ttl(main)]
        for extra in names[1:]:
            first = self.callouts[extra][0]
            u2, lb2, c2 = self.callout_url(extra)
            out.comments += c2
            if u2 != url:
                self.weakens(first.line, f"httpCallout {extra} calls {u2}, {main} calls {url}: easgate has one "
                                         f"connector ({url}), which then decides the requests NetScaler sends to {extra}")
            self.check_callout(extra, out)
            ttls.append(self.callout_ttl(extra))
        for n in names:
            self.use("httpCallout", n)
        out.cache_ttl = None if all(t is None for t in ttls) and not out.guarded else min(t or 0 for t in ttls)
        return out

    def callout_ttl(self, name: str) -> int | None:
        ttl = None
        for c in self.callouts[name]:
            if (c.opt("cacheforsecs") or "").isdigit():
                ttl = int(c.opt("cacheforsecs"))
        return ttl

    def check_callout(self, name: str, out: "CalloutOut") -> None:
        merged: dict[str, tuple[str, Cmd]] = {}
        for c in self.callouts[name]:
            for k in c.opts:
                merged[k] = (c.opt(k) or "", c)
        first = self.callouts[name][0]
        if "hostexpr" in merged:
            expr, c = merged["hostexpr"]
            host = string_literal(expr)
            out.comments.append(f"{name} -hostExpr {expr}: NetScaler sends Host: {host or expr}")
            self.untranslated(c.line, f"httpCallout {name}: -hostExpr {expr}: easgate sends the connector "
                                      "URL's host as Host (make the URL use that name if the connector needs it)")
        if "resultexpr" in merged:
            expr, c = merged["resultexpr"]
            bool_ok = re.fullmatch(r'HTTP\.RES\.BODY\(\d+\)\.(CONTAINS|EQ|STARTSWITH)\("Allow"\)', expr.replace(" ", ""), re.I)
            if not re.fullmatch(r"HTTP\.RES\.BODY\(\d+\)", expr.replace(" ", ""), re.I) and not bool_ok:
                self.untranslated(c.line, f"httpCallout {name}: -resultExpr {expr}: easgate reads the answer body "
                                          "(JSON result or an exact Allow/Deny token), nothing else")
        if "parameters" in merged:
            text, c = merged["parameters"]
            params = split_parameters(text)
            if params is None:
                self.untranslated(c.line, f"httpCallout {name}: cannot read -parameters {text[:60]}")
            else:
                self.check_parameters(name, params, c)
        else:
            self.untranslated(first.line, f"httpCallout {name}: no -parameters; easgate always sends the XNC ones "
                                          f"({', '.join(STANDARD_PARAMS)})")

    def check_parameters(self, name: str, params: list[tuple[str, str]], c: Cmd) -> None:
        got = {}
        for pname, expr in params:
            got[pname] = expr
            std = STANDARD_PARAMS.get(pname)
            if std is None:
                self.untranslated(c.line, f"httpCallout {name}: parameter {pname}({expr}) is not an XNC parameter; "
                                          "easgate does not send it")
            elif canonical_expr(expr) != canonical_expr(std):
                if pname == "user" and "CLIENT.SSL" in canonical_expr(expr):
                    self.weakens(c.line, f"httpCallout {name}: user({_short(expr, 60)}) comes from the client "
                                         "certificate; easgate sends the user the request names (Basic header or "
                                         "User= parameter), so the connector decides on a user the client asserts")
                else:
                    self.untranslated(c.line, f"httpCallout {name}: parameter {pname}({expr}) differs from the XNC "
                                              f"standard {pname}({std}); easgate sends the standard value")
        missing = [p for p in STANDARD_PARAMS if p not in got]
        if missing:
            self.untranslated(c.line, f"httpCallout {name}: parameters {', '.join(missing)} are missing; "
                                      "easgate sends them anyway")

    def attach_authorization(self, routes: list[dict], callout: "CalloutOut") -> None:
        """No responder policy in the file (Citrix's classic sample): guess it guarded ActiveSync."""
        live = [r for r in routes if not r.get("skip")]
        exch = {r["lb"] for r in live if r.get("match") not in (None, "any") and implies_activesync(r["expr"])}
        if not exch:
            self.untranslated(callout.first_line, f"httpCallout {callout.name}: no responder policy guards cs vserver "
                                             f"{self.cs_name} and no route carries only /Microsoft-Server-ActiveSync "
                                             "traffic: nothing is authorized; add `authorize: activesync` to the "
                                             "route to Exchange")
            return
        for r in live:
            if r["lb"] in exch:
                r["authorize"] = True
                r["comments"].append(
                    f"authorize: the XNC callout {callout.name} (lines {callout.lines}) is used by a responder policy "
                    f"that is not in this file; easgate asks the connector on every route to {r['lb']}")

    # -- pools, tls, listeners --------------------------------------------------------------------

    def server_of(self, name: str) -> tuple[str, str | None]:
        """(address, why disabled) of `add server` NAME, or NAME itself (an address)."""
        s = self.servers.get(name)
        if s is None:
            return name, None
        self.use("server", name)
        off = f"server {name} is -state DISABLED (line {s.line}: {s.short(130)})" \
            if (s.opt("state") or "").upper() == "DISABLED" else None
        return s.args[1], off

    def pool_members(self, lb: LbVserver) -> list[Member]:
        out = []
        for name, bind in lb.services:
            if name in self.services:
                c = self.services[name]
                self.use("service", name)
                host, off = self.server_of(c.args[1])
                if (c.opt("state") or "").upper() == "DISABLED":
                    off = f"service {name} is -state DISABLED (line {c.line})"
                out.append(Member(name, host, c.args[2].upper(), c.args[3], c, off))
                continue
            g = self.groups[name]
            self.use("service group", name)
            gdis = f"service group {name} is -state DISABLED (line {g.line})" \
                if (g.opt("state") or "").upper() == "DISABLED" else None
            for m in self.group_members.get(name, []):
                host, off = self.server_of(m.args[1])
                if (m.opt("state") or "").upper() == "DISABLED":
                    off = f"member {m.args[1]}:{m.args[2]} is -state DISABLED (line {m.line})"
                out.append(Member(f"{name} {m.args[1]}:{m.args[2]}", host, g.args[1].upper(), m.args[2], m, gdis or off))
        return out

    def member_url(self, m: Member) -> tuple[str | None, str | None]:
        if m.name in self.o.services:
            hp = self.o.services[m.name]
        else:
            host = self.value(m.host)
            if ":" in host and not host.startswith("["):
                host = f"[{host}]"
            hp = f"{host}:{m.port}"
        if m.proto == "HTTP":
            return "http", hp
        if m.proto == "SSL":
            return "https", hp
        self.untranslated(m.cmd.line, f"{m.name} is {m.proto}: easgate pools speak HTTP or HTTPS only")
        return None, None

    def build_pool(self, lb: LbVserver) -> "PoolOut | None":
        p = PoolOut(lb.name)
        p.comments.append(f"line {lb.cmd.line}: {lb.cmd.short()}")
        live = 0
        for m in self.pool_members(lb):
            if m.disabled:
                p.comments.append(f"{m.name} left out: {m.disabled}, out of rotation as on NetScaler")
                continue
            scheme, hp = self.member_url(m)
            if scheme is None:
                continue
            p.comments.append(f"line {m.cmd.line}: {m.cmd.short()}")
            url = f"{scheme}://{hp}"
            p.servers.append((url, "FILL IN" if "FILL-IN" in url else None))
            p.https = p.https or scheme == "https"
            live += 1
        if not p.servers:
            return None
        if lb.addressable:
            p.comments.append(f"lb vserver {lb.name} also listens on {lb.ip}:{lb.port} itself: see NOT TRANSLATED")
        if live > 1:
            p.comments.append("NetScaler's -lbMethod is not carried over: easgate balances round robin")
        if p.https:
            ca = self.o.pool_ca.get(lb.name)
            p.ca = str(Path(ca).expanduser().resolve()) if ca else None
            p.sni = self.o.pool_sni.get(lb.name)
            if not p.ca:
                p.comments.append("NetScaler does not verify back-end certificates by default; easgate does, with the")
                p.comments.append("system trust store: set ca (and sni for an IP address), or verify: false")
                self.notes.append(f"pool {lb.name}: easgate verifies the https back end; give its CA "
                                  f"(--pool-ca {lb.name}=FILE, --pool-sni {lb.name}=NAME) or set verify: false")
        return p

    def listeners_not_served(self, cs_name: str | None, used: list[str], callout) -> None:
        for lb in self.lbs.values():
            if lb.addressable:
                self.untranslated(lb.cmd.line, f"lb vserver {lb.name} listens on its own address {lb.ip}:{lb.port} "
                                               f"({lb.proto}); easgate serves only the cs vserver's listener: run a "
                                               "second easgate/proxy for it")
        for b in self.ssl_binds:
            if b.opt("policyname") is not None or b.args[0] == cs_name or b.args[0] in self.cs:
                continue  # another cs vserver's binding: part of an object not translated (counted as unused)
            lb = self.lbs.get(b.args[0])
            if lb is None:
                self.untranslated(b.line, f"bind ssl vserver: no vserver named '{b.args[0]}'")
            elif lb.addressable:
                self.untranslated(b.line, f"bind ssl vserver {lb.name}: belongs to the listener of lb vserver "
                                          f"{lb.name}, which is not translated")
            # a certificate on a non-addressable lb vserver is never shown to a client: nothing to do
        for name, sets in self.ssl_set.items():
            if name != cs_name and name not in self.cs and name not in self.lbs:
                for c in sets:
                    self.untranslated(c.line, f"set ssl vserver: no vserver named '{name}'")

    def find_unused(self, cs_name: str | None) -> None:
        for kind, name, c in self.objects:
            if (kind, name) not in self.used:
                self.unused.append(f"{kind} {name} (line {c.line})")

    def resolve_file(self, name: str, path: str | None, kind: str) -> tuple[str | None, str | None]:
        """A certkey's or CRL's file: --cert NAME=FILE, else DIR/<file name>, else DIR/NAME.pem."""
        bare = name[1:-1] if PLACEHOLDER.fullmatch(name) else name
        for k in (name, bare):
            if k in self.o.certs:
                pem, key = self.o.certs[k]
                return str(Path(pem).expanduser().resolve()), str(Path(key).expanduser().resolve()) if key else None
        if self.o.certs_dir:
            cands = [Path(path).name] if path else []
            if kind == "certkey":
                cands += [f"{bare}.pem", bare]
            for cand in cands:
                p = self.o.certs_dir / cand
                if p.is_file():
                    return str(p.resolve()), None
        return None, None

    def resolve_cert(self, name: str) -> tuple[str, str | None, bool, str | None]:
        """certkey -> (pem path, key path, is a placeholder, hint)."""
        bare = name[1:-1] if PLACEHOLDER.fullmatch(name) else name
        self.use("ssl certKey", name)
        ck = self.certkeys.get(name)
        hint = None
        cert = key = None
        if ck is not None:
            cert, key = ck.opt("cert"), ck.opt("key")
            hint = f"certKey {name} (line {ck.line}): -cert {cert}" + (f" -key {key}" if key else "")
        pem, kp = self.resolve_file(name, cert, "certkey")
        if pem:
            if kp is None and key and self.o.certs_dir and name not in self.o.certs and bare not in self.o.certs:
                k = self.o.certs_dir / Path(key).name
                kp = str(k.resolve()) if k.is_file() else None
            return pem, kp, False, hint
        self.fill_in.add(f"CERTKEY-{bare}")
        return f"FILL-IN-CERTKEY-{bare}.pem", None, True, hint

    def chain_of(self, name: str) -> list[tuple[str, Cmd]]:
        out, seen = [], {name}
        while (ln := self.links.get(name)) is not None and ln.args[1] not in seen:
            name = ln.args[1]
            seen.add(name)
            self.use("ssl certKey", name)
            out.append((name, ln))
        return out

    def check_chain(self, name: str, pem: str, fill: bool, t: "TlsOut") -> None:
        """`link ssl certKey`: NetScaler sends the linked chain; easgate sends what the PEM holds."""
        chain = self.chain_of(name)
        if not chain:
            return
        names = " -> ".join(n for n, _ in chain)
        t.chain = names
        need = 1 + (len(chain) - 1 if len(chain) > 1 else 1)  # the top of a longer chain is the root
        if fill:
            return
        try:
            have = Path(pem).read_text(errors="replace").count("-----BEGIN CERTIFICATE-----")
        except OSError:
            return  # `easgate check` says the file is missing
        if have < need:
            self.untranslated(chain[0][1].line, f"certKey {name} is linked to {names} (NetScaler sends that chain); "
                                                f"{pem} holds {have} certificate(s): clients that lack the "
                                                f"intermediate cannot verify the gateway; give --cert {name}=FILE "
                                                "with leaf, chain and key")

    def client_auth(self, cs_name: str | None) -> tuple[str, str | None]:
        """tls.client_certs.mode from `set ssl vserver` or the ssl profile it names."""
        mode, src = "off", None
        for c in self.ssl_set.get(cs_name or "", []):
            sources = [c]
            if c.opt("sslprofile"):
                pname = c.opt("sslprofile")
                prof = self.ssl_profiles.get(pname)
                if prof is not None:
                    self.use("ssl profile", pname)
                    sources = [prof, c]
                    if (prof.opt("hsts") or "").upper() == "ENABLED":
                        self.untranslated(prof.line, f"ssl profile {pname}: -HSTS ENABLED: easgate does not insert "
                                                     "Strict-Transport-Security")
                elif not pname.startswith(BUILTIN_PROFILE):
                    self.weakens(c.line, f"set ssl vserver {cs_name} -sslProfile {pname}: no such profile in the "
                                         "file; its client-certificate settings are unknown (mode: off written)")
            for s in sources:
                auth = (s.opt("clientauth") or "").upper()
                cc = (s.opt("clientcert") or "").upper()
                if auth == "ENABLED":
                    mode = {"MANDATORY": "required", "OPTIONAL": "optional", "": "required"}.get(cc, "?")
                    if mode == "?":
                        self.untranslated(s.line, f"-clientCert {s.opt('clientcert')} is not Optional or Mandatory")
                        mode = "required"
                    src = f"line {s.line}: {s.short()}"
                elif auth == "DISABLED":
                    mode, src = "off", f"line {s.line}: {s.short()}"
        return mode, src

    def revocation(self, b: Cmd, name: str) -> tuple[dict, list[str]]:
        """The CA entry's revocation keys from -ocspCheck/-crlCheck, the CA's OCSP responder and CRL."""
        notes: list[str] = []
        entry: dict = {}
        modes = {}
        for opt in ("ocspcheck", "crlcheck"):
            if opt in b.opts:
                v = (b.opt(opt) or "").lower()
                if v in ("optional", "mandatory"):
                    modes[opt] = v
                else:
                    self.untranslated(b.line, f"bind ssl vserver -certkeyName {name} -CA: {b.names[opt]} "
                                              f"{b.opt(opt)} is not Optional or Mandatory")
        if not modes:
            return entry, notes
        if len(set(modes.values())) > 1:
            self.weakens(b.line, f"CA {name}: -ocspCheck {modes['ocspcheck'].title()} with -crlCheck "
                                 f"{modes['crlcheck'].title()}: easgate has one revocation mode per CA and accepts a "
                                 "certificate either source vouches for")
        entry["revocation"] = "mandatory" if "mandatory" in modes.values() else "optional"
        if "ocspcheck" in modes:
            ob = self.ocsp_binds.get(name)
            if ob is not None:
                resp = self.ocsp_responders.get(ob.opt("ocspresponder"))
                if resp is None:
                    self.untranslated(ob.line, f"bind ssl certKey {name}: no ssl ocspResponder named "
                                               f"'{ob.opt('ocspresponder')}'")
                else:
                    self.use("ssl ocspResponder", resp.args[0])
                    url = resp.opt("url") or ""
                    notes.append(f"line {ob.line}: {ob.short()}")
                    notes.append(f"line {resp.line}: {resp.short()}")
                    if url.startswith("http://"):
                        entry["ocsp_url"] = url
                    else:
                        self.weakens(resp.line, f"ssl ocspResponder {resp.args[0]}: -url {url} is not http://; "
                                                "easgate asks the responder in the certificate's AIA instead")
                    if (resp.opt("resptimeout") or "").isdigit():
                        entry["ocsp_timeout_ms"] = max(1, min(int(resp.opt("resptimeout")), 60_000))
                    cache = (resp.opt("cache") or "DISABLED").upper()
                    minutes = resp.opt("cachetimeout") or "1"
                    entry["ocsp_cache_max_s"] = int(minutes) * 60 if cache == "ENABLED" and minutes.isdigit() else 0
                    if "trustresponder" in resp.opts:
                        notes.append("-trustResponder: NetScaler does not check the answer's signature; easgate does")
            else:
                notes.append("OCSP responder from the certificate's AIA, as on NetScaler without -ocspResponder")
        else:
            entry["ocsp"] = False
        if "crlcheck" in modes:
            crl = self.crls.get(name)
            if crl is None:
                msg = (f"CA {name}: -crlCheck {modes['crlcheck'].title()} but no `add ssl crl ... -CAcert {name}`")
                if modes["crlcheck"] == "mandatory":
                    self.untranslated(b.line, msg + ": NetScaler rejects every certificate of this CA")
                else:
                    notes.append(msg + ": no effect on NetScaler either")
                if "ocspcheck" not in modes:
                    del entry["revocation"], entry["ocsp"]
            else:
                self.use("ssl crl", crl.args[0])
                path, _ = self.resolve_file(crl.args[0], crl.args[1], "crl")
                notes.append(f"line {crl.line}: {crl.short()}")
                if path is None:
                    self.fill_in.add(f"CRL-{crl.args[0]}")
                    path = f"FILL-IN-CRL-{crl.args[0]}.crl"
                    notes.append(f"FILL IN: copy {crl.args[1]} from the appliance (--cert {crl.args[0]}=FILE or --certs DIR)")
                entry["crl"] = path
        return entry, notes

    def build_tls(self, cs_name: str | None) -> "TlsOut":
        t = TlsOut()
        server_certs = [b for b in self.ssl_binds if b.args[0] == cs_name and b.opt("certkeyname")
                        and "ca" not in b.opts]
        ca_binds = [b for b in self.ssl_binds if b.args[0] == cs_name and b.opt("certkeyname") and "ca" in b.opts]
        if server_certs:
            b = server_certs[0]
            if "snicert" in b.opts:
                self.untranslated(b.line, "an -SNICert binding: easgate serves one certificate")
            name = b.opt("certkeyname")
            pem, key, fill, hint = self.resolve_cert(name)
            t.cert = (pem, key, f"line {b.line}: {b.short()}", hint, fill, name)
            self.check_chain(name, pem, fill, t)
            for extra in server_certs[1:]:
                self.untranslated(extra.line, "a second server certificate (SNI): easgate serves one certificate")
        else:
            t.cert = ("FILL-IN-CERTKEY-server-certificate.pem", None, "no `bind ssl vserver ... -certkeyName` for "
                      "the cs vserver", None, True, "server-certificate")
            self.fill_in.add("CERTKEY-server-certificate")
        t.mode, t.mode_line = self.client_auth(cs_name)
        for b in ca_binds:
            name = b.opt("certkeyname")
            pem, _key, fill, hint = self.resolve_cert(name)
            entry, notes = self.revocation(b, name)
            t.cas.append((pem, f"line {b.line}: {b.short()}", hint, fill, name, notes, entry))
        if t.mode != "off" and not t.cas:
            self.untranslated(0, f"cs vserver {cs_name} asks for client certificates but has no `-CA` binding")
        if t.mode == "off" and t.cas:
            self.notes.append(f"cs vserver {cs_name}: -CA bindings without -clientAuth ENABLED: no certificate is asked for")
        return t

    # -- output ------------------------------------------------------------------------------------

    def emit_route(self, out: "Yaml", r: dict) -> None:
        for c in r["comments"]:
            out.comment(c, 1)
        if r.get("skip"):
            out.comment(f"(route {r['name']} left out: see above)", 1)
            return
        out.line(f"  - name: {ys(r['name'])}")
        out.kv(2, "priority", r["priority"])
        m = r.get("match")
        if r.get("default"):
            out.comment("the cs vserver's default lb vserver: only used when no other route matches", 2)
        elif m == "any":
            out.kv(2, "match", "any")
        else:
            out.line("    match:")
            for k, v in m.items():
                if isinstance(v, list):
                    out.line(f"      {k}: [{', '.join(ys(x) for x in v)}]")
                elif isinstance(v, dict):
                    out.line(f"      {k}: {{{', '.join(f'{ys(a)}: {ys(b)}' for a, b in v.items())}}}")
                else:
                    out.kv(3, k, v)
        out.kv(2, "pool", r["lb"])
        if r.get("authorize"):
            out.kv(2, "authorize", "activesync")
        if r.get("cert_header"):
            out.kv(2, "client_cert_header", r["cert_header"])

    def run(self) -> str:
        text = self.translate()
        problems = []
        unused = sorted(self.o.sets.keys() - self.placeholders_in_input)
        if unused:
            problems.append(f"--set {', '.join(unused)}: no such [PLACEHOLDER] in {self.file}")
        members = set(self.services) | {f"{g} {m.args[1]}:{m.args[2]}" for g, ms in self.group_members.items() for m in ms}
        for flag, given, known in (("--service", self.o.services, members),
                                   ("--pool-ca", self.o.pool_ca, self.lbs), ("--pool-sni", self.o.pool_sni, self.lbs)):
            if bad := sorted(set(given) - set(known)):
                problems.append(f"{flag} {', '.join(bad)}: no such {'service' if flag == '--service' else 'lb vserver'} "
                                f"in {self.file}")
        certkeys = {b.opt("certkeyname") for b in self.ssl_binds if b.opt("certkeyname")} | set(self.certkeys)
        certkeys |= set(self.crl_names)
        certkeys |= {k.strip("[]") for k in certkeys}
        if bad := sorted(set(self.o.certs) - certkeys):
            problems.append(f"--cert {', '.join(bad)}: no such certkey in {self.file}")
        if problems:
            raise UsageError("; ".join(problems))
        return text


class UsageError(ValueError):
    pass


def _short(text: str, width: int = 110) -> str:
    t = " ".join(text.split())
    return t if len(t) <= width else t[: width - 3] + "..."


# ---- YAML text with comments ------------------------------------------------------------------

_PLAIN = re.compile(r"^[A-Za-z_/][A-Za-z0-9_./:@+-]*$")
_YAML_WORDS = {"y", "n", "yes", "no", "on", "off", "true", "false", "null", "~"}


def ys(v) -> str:
    """A YAML scalar: plain when unambiguous, single-quoted otherwise, double-quoted with escapes
    when it holds a control character (which YAML would refuse or read differently)."""
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int):
        return str(v)
    s = str(v)
    if _PLAIN.match(s) and s.lower() not in _YAML_WORDS and ": " not in s and not s.endswith(":"):
        return s
    if printable(s) != s:
        return '"' + printable(s.replace("\\", "\\\\").replace('"', '\\"')) + '"'
    return "'" + s.replace("'", "''") + "'"


class Yaml:
    def __init__(self) -> None:
        self.lines: list[str] = []

    def line(self, s: str) -> None:
        self.lines.append(s)

    def blank(self) -> None:
        if self.lines and self.lines[-1] != "":
            self.lines.append("")

    def comment(self, s: str, indent: int = 0) -> None:
        self.lines.append(("  " * indent + "# " + printable(s)).rstrip())

    def kv(self, indent: int, k: str, v, note: str | None = None) -> None:
        self.lines.append("  " * indent + f"{ys(k)}: {ys(v)}" + (f"  # {printable(note)}" if note else ""))

    def text(self) -> str:
        while self.lines and self.lines[-1] == "":
            self.lines.pop()
        return "\n".join(self.lines) + "\n"


@dataclass
class PoolOut:
    name: str
    servers: list[tuple[str, str | None]] = field(default_factory=list)
    comments: list[str] = field(default_factory=list)
    https: bool = False
    ca: str | None = None
    sni: str | None = None

    def emit(self, out: Yaml) -> None:
        for c in self.comments:
            out.comment(c, 1)
        out.line(f"  {ys(self.name)}:")
        out.line("    servers:")
        for url, note in self.servers:
            out.line(f"      - {ys(url)}" + (f"  # {note}" if note else ""))
        if self.ca:
            out.kv(2, "ca", self.ca)
        if self.sni:
            out.kv(2, "sni", self.sni)
        out.kv(2, "host_header", "client", "NetScaler passes the client's Host on")


@dataclass
class TlsOut:
    cert: tuple | None = None
    cas: list[tuple] = field(default_factory=list)
    mode: str = "off"
    mode_line: str | None = None
    chain: str | None = None  # the linked certkeys, when there are any

    def emit(self, out: Yaml) -> None:
        out.line("tls:")
        pem, key, src, hint, fill, name = self.cert
        out.comment(src, 1)
        if hint:
            out.comment(hint, 1)
        if self.chain:
            out.comment(f"link ssl certKey: NetScaler sends the chain {name} -> {self.chain}; the PEM must hold it", 1)
        chain = f", chain ({self.chain})" if self.chain else ", chain"
        out.kv(1, "certificate", pem, f"FILL IN: PEM with certificate{chain} and key of certkey {name} "
                                      f"(--cert {name.strip('[]')}=FILE)" if fill else None)
        if key:
            out.kv(1, "key", key)
        out.kv(1, "min_version", "TLS1_2", "NetScaler also allows TLS 1.0/1.1 unless disabled; easgate does not")
        out.line("  client_certs:")
        if self.mode_line:
            out.comment(self.mode_line, 2)
        out.kv(2, "mode", self.mode)
        if self.cas:
            out.line("    ca:")
            for pem, src, hint, fill, name, notes, entry in self.cas:
                out.comment(src, 3)
                if hint:
                    out.comment(hint, 3)
                for n in notes:
                    out.comment(n, 3)
                if entry:
                    text = "{" + ", ".join(f"{k}: {ys(v)}" for k, v in {"file": pem, **entry}.items()) + "}"
                else:
                    text = ys(pem)
                note = f"  # FILL IN: PEM of CA certkey {name} (--cert {name.strip('[]')}=FILE)" if fill else ""
                if not note and "FILL-IN" in text:
                    note = "  # FILL IN: the CRL file"
                out.line(f"      - {text}{note}")
        out.kv(2, "on_invalid", "reject", "a certificate that does not verify fails the handshake, as on NetScaler")


@dataclass
class CalloutOut:
    name: str
    lines: str
    url: str | None = None
    lb: str | None = None
    cache_ttl: int | None = None
    comments: list[str] = field(default_factory=list)
    guarded: bool = False  # the responder policies are in the file (else Citrix's sample is assumed)
    on_error: str = "allow"
    fail_reason: str = ""
    drop: bool = False

    @property
    def first_line(self) -> int:
        return int(self.lines.split(",")[0])

    def emit(self, out: Yaml) -> None:
        out.line("authorization:")
        out.comment("ActiveSync requests on `authorize: activesync` routes (POST to /Microsoft-Server-ActiveSync;", 1)
        out.comment("OPTIONS passes) are decided by the connector, as the XNC callout did", 1)
        out.line("  connector:")
        for c in self.comments:
            out.comment(c, 2)
        url = self.url or "http://FILL-IN-CONNECTOR:9080/services/ActiveSync/Authorize"
        out.kv(2, "url", url, "FILL IN" if "FILL-IN" in url else None)
        out.kv(2, "timeout_ms", 2000)
        if self.cache_ttl is not None:
            out.comment(f"-cacheForSecs {self.cache_ttl}" if self.cache_ttl else
                        "a callout without -cacheForSecs asks on every request: so does easgate", 1)
            out.line(f"  cache: {{allow_ttl_s: {self.cache_ttl}, deny_ttl_s: {self.cache_ttl}}}")
        else:
            out.comment("NetScaler calls out on every request (no -cacheForSecs); easgate caches answers per user and", 1)
            out.comment("device. Set both TTLs to 0 to ask the connector every time.", 1)
            out.line("  cache: {allow_ttl_s: 300, deny_ttl_s: 30}")
        if self.guarded:
            out.comment(f"fail mode from {self.fail_reason}", 1)
            if self.on_error == "allow":
                out.comment("NetScaler lets a request through when the callout fails: so does this config.", 1)
                out.comment("RECOMMENDED: on_connector_error: deny (or stale).", 1)
            out.line(f"  on_connector_error: {self.on_error}")
            if self.drop:
                out.comment("the responder action DROP/RESET closes the connection without an answer", 1)
                out.line("  deny: {action: drop}")
            else:
                out.comment("the responder action answers; easgate answers 403", 1)
                out.line("  deny: {status: 403}")
            return
        out.comment("!!! Citrix's setup is fail-open: when the connector does not answer, the request is ALLOWED.", 1)
        out.comment("!!! This import keeps that behaviour. RECOMMENDED: on_connector_error: deny (or stale).", 1)
        out.line("  on_connector_error: allow")
        out.comment("NetScaler's responder policy (not in the file) usually DROPs a denied request; easgate answers", 1)
        out.comment("403, which clients understand. Use deny: {action: drop} to drop instead.", 1)
        out.line("  deny: {status: 403}")


# =============================================================================================
# 5. Command line

EXIT_OK, EXIT_NOT_TRANSLATED, EXIT_UNREADABLE, EXIT_WEAKER = 0, 1, 2, 3


def import_netscaler(text: str, file: str = "<netscaler>", opts: Options | None = None) -> tuple[str, Importer]:
    """Translate; returns (YAML text, the importer with .weaker, .reports, .notes, .unused)."""
    imp = Importer(text, file, opts)
    return imp.run(), imp


def _pairs(values: list[str] | None, what: str) -> dict[str, str]:
    out = {}
    for v in values or ():
        k, sep, val = v.partition("=")
        if not sep or not k or not val:
            raise UsageError(f"{what} {v}: expected NAME=VALUE")
        out[k.strip("[]")] = val
    return out


def _err(msg: str) -> None:
    print(printable(msg), file=sys.stderr)


def cmd_import(args) -> int:
    try:
        raw = Path(args.file).read_bytes()
    except OSError as e:
        _err(f"easgate import-netscaler: cannot read {args.file}: {e.strerror}")
        return EXIT_UNREADABLE
    try:
        text, decoded = decode(raw)
    except NotText:
        _err(f"easgate import-netscaler: {args.file} is not a text file (it holds NUL bytes)")
        return EXIT_UNREADABLE
    try:
        certs = {}
        for k, v in _pairs(args.cert, "--cert").items():
            pem, _, key = v.partition(",")
            certs[k] = (pem, key or None)
        opts = Options(sets=_pairs(args.set, "--set"), certs=certs,
                       certs_dir=Path(args.certs) if args.certs else None,
                       services=_pairs(args.service, "--service"),
                       pool_ca=_pairs(args.pool_ca, "--pool-ca"), pool_sni=_pairs(args.pool_sni, "--pool-sni"),
                       vserver=args.vserver)
        # millions of small objects and no reference cycles: the cyclic collector would only rescan
        # them, again and again (twice the time of a 50,000-line import)
        gc.disable()
        yaml_text, imp = import_netscaler(text, args.file, opts)
    except UsageError as e:
        _err(f"easgate import-netscaler: {e}")
        return EXIT_UNREADABLE
    finally:
        gc.enable()
    if args.output:
        Path(args.output).write_text(yaml_text)
    else:
        sys.stdout.write(yaml_text)
    f = args.file
    if imp.weaker:
        _err(f"{f}: WEAKER THAN NETSCALER: {len(imp.weaker)} difference(s) let through what the appliance blocks "
             "(exit status 3):")
        for r in sorted(imp.weaker, key=lambda r: r.line):
            _err(f"{f}:{r.line}: weaker: {r.message}")
    for r in sorted(imp.reports, key=lambda r: r.line):
        _err(f"{f}:{r.line}: not translated: {r.message}")
    if decoded:
        _err(f"{f}: note: {decoded}")
    for n in imp.notes:
        _err(f"{f}: note: {n}")
    if imp.fill_in:
        _err(f"{f}: note: values to fill in (FILL-IN-...): " + ", ".join(sorted(imp.fill_in))
             + " (--set NAME=VALUE, --cert CERTKEY=FILE)")
    if imp.unused or imp.appliance:
        _err(f"{f}: note: {imp.unused_line()}")
        if args.verbose:
            for u in imp.unused:
                _err(f"{f}: not used: {u}")
            for a in imp.appliance:
                _err(f"{f}: appliance setting: {a}")
    if imp.weaker:
        return EXIT_WEAKER
    return EXIT_NOT_TRANSLATED if imp.reports else EXIT_OK


def add_commands(sub) -> None:
    s = sub.add_parser(
        "import-netscaler", help="translate a NetScaler CLI configuration into an easgate config (YAML)",
        description="Print an easgate config reproducing a NetScaler configuration (ns.conf CLI lines). "
                    "Differences that make the result weaker than the appliance (fail mode, authorization "
                    "coverage, client certificates, revocation, header insertion) come first, then what "
                    "cannot be translated, each with its line number, on stderr and at the top of the YAML. "
                    "Exit status: 0 all translated, 1 something not translated (the YAML is still printed), "
                    "2 unreadable input or bad option, 3 the result is weaker than NetScaler (the YAML is "
                    "still printed; do not switch over before each item is resolved).",
    )
    s.add_argument("file", help="NetScaler CLI lines, e.g. ns.conf")
    s.add_argument("--vserver", metavar="NAME",
                   help="the cs vserver to translate (default: the one carrying ActiveSync, else the first)")
    s.add_argument("--set", action="append", metavar="NAME=VALUE",
                   help="fill the placeholder [NAME] of the file (repeatable), e.g. --set EXCHANGESERVER-IP=10.0.0.5")
    s.add_argument("--cert", action="append", metavar="CERTKEY=PEM[,KEY]",
                   help="the PEM file of a certkey (server certificate: leaf + chain + key) or of an "
                        "`add ssl crl` object, repeatable")
    s.add_argument("--certs", metavar="DIR", help="look up certkey NAME as DIR/NAME.pem (or the -cert file name), "
                                                  "and a CRL by its file name")
    s.add_argument("--service", action="append", metavar="SERVICE=HOST:PORT",
                   help="send a service's traffic to HOST:PORT instead (e.g. a test stand-in)")
    s.add_argument("--pool-ca", action="append", metavar="LBVSERVER=PEM",
                   help="CA file that verifies the https servers of an lb vserver's pool")
    s.add_argument("--pool-sni", action="append", metavar="LBVSERVER=NAME",
                   help="server name (SNI, verified) for an lb vserver's https servers")
    s.add_argument("-v", "--verbose", action="store_true",
                   help="list the objects the translated cs vserver does not use and the appliance settings")
    s.add_argument("-o", "--output", help="write the YAML here instead of stdout")
    s.set_defaults(fn=cmd_import)
