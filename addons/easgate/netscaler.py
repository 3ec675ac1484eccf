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

import itertools
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path

from .core.paths import normalize_path

# =============================================================================================
# 1. Lines and words, as NetScaler's CLI reads them


class NsSyntaxError(ValueError):
    """A line that cannot be split into words (unbalanced quote or parenthesis)."""


@dataclass(frozen=True)
class Token:
    text: str
    quoted: bool = False


@dataclass
class Line:
    no: int  # first physical line of the logical line
    text: str  # the logical line (continuations joined)
    tokens: list[Token] = field(default_factory=list)


def logical_lines(text: str) -> list[tuple[int, str]]:
    """Physical lines joined at backslash-newline; blank lines and `#` comment lines dropped."""
    out: list[tuple[int, str]] = []
    buf: str | None = None
    start = 0
    for no, raw in enumerate(text.splitlines(), 1):
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


def _scan_quoted_balanced(line: str, i: int) -> tuple[str, int] | None:
    """NetScaler's own idiom: `-rule "HTTP.REQ.URL.STARTSWITH("/x")"`, `""literal""`.

    Inner quotes are not escaped; the closing quote is the one followed by whitespace or the end
    of the line while parentheses (outside inner string literals) are balanced. Backslash-escaped
    quotes (`\\"`) work as well and always belong to the text.
    """
    n = len(line)
    j, depth, inner, buf = i + 1, 0, False, []
    while j < n:
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


def tokenize(line: str) -> list[Token]:
    """Split one logical line into words; `#` at the start of a word begins a comment."""
    toks: list[Token] = []
    i, n = 0, len(line)
    while True:
        while i < n and line[i].isspace():
            i += 1
        if i >= n or line[i] == "#":
            return toks
        if line[i] == '"':
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


@dataclass(frozen=True)
class Const:
    value: bool


@dataclass(frozen=True)
class Atom:
    """One test. kind: url | path | host | header | method | cert | opaque."""

    kind: str
    op: str = ""  # startswith | endswith | contains | eq | exists
    value: str = ""
    name: str = ""  # header name
    icase: bool = False


@dataclass(frozen=True)
class Not:
    x: object


@dataclass(frozen=True)
class And:
    xs: tuple


@dataclass(frozen=True)
class Or:
    xs: tuple


_LEX = re.compile(r'\s*(?:(?P<str>"(?:[^"\\]|\\.)*")|(?P<op>&&|\|\||[!().,+])|(?P<num>\d+)'
                  r'|(?P<id>[A-Za-z_][A-Za-z0-9_]*))', re.DOTALL)
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
    icase, core, nots = False, [], 0
    for name, args in segs:
        if name == "set_text_mode":
            mode = args[0][1].lower() if len(args) == 1 else ""
            if mode not in ("ignorecase", "noignorecase"):
                raise ExprError(f"unsupported SET_TEXT_MODE in: {src}")
            icase = mode == "ignorecase"
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
    if atom is None:
        raise ExprError(f"unsupported expression: {src}")
    for _ in range(nots):
        atom = Not(atom)
    return atom


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
        from mitmproxy import flowfilter

        try:
            flowfilter.parse(flt)
        except ValueError as err:  # pragma: no cover - a bug in this module
            raise ExprError(f"generated filter does not parse ({err}): {flt}")
        m["filter"] = flt
    return m


# ---- reasoning about which requests reach a route ------------------------------------------


def _consistent(env: dict[Atom, bool]) -> bool:
    """Prefix facts between URL STARTSWITH tests (the only relations that matter for routing)."""
    pre = [(a, v) for a, v in env.items() if a.kind in ("url", "path") and a.op == "startswith"
           and "?" not in a.value]
    for (a, va), (b, vb) in itertools.permutations(pre, 2):
        if not va:
            continue
        ka, kb = (a.value.lower(), b.value.lower()) if (a.icase or b.icase) else (a.value, b.value)
        if vb and not (ka.startswith(kb) or kb.startswith(ka)):
            return False  # the URL cannot start with both
        if not vb and ka.startswith(kb) and (b.icase or not a.icase):
            return False  # a implies b
    return True


MAX_ATOMS = 14


def decide(premise, question) -> bool | None:
    """True if every request satisfying premise satisfies question, False if none does,
    None if it depends (or the premise is unsatisfiable: then False)."""
    atoms = list(dict.fromkeys(atoms_of(premise) + atoms_of(question)))
    if len(atoms) > MAX_ATOMS:
        return None
    seen = set()
    for values in itertools.product((False, True), repeat=len(atoms)):
        env = dict(zip(atoms, values))
        if not _consistent(env) or not evaluate(premise, env):
            continue
        seen.add(evaluate(question, env))
        if len(seen) == 2:
            return None
    return seen == {True}


def with_cert(e, present: bool = True):
    """The rule with every client-certificate test replaced by a constant."""
    if isinstance(e, Atom) and e.kind == "cert":
        return Const(present)
    if isinstance(e, Not):
        return Not(with_cert(e.x, present))
    if isinstance(e, (And, Or)):
        return type(e)(tuple(with_cert(x, present) for x in e.xs))
    return e


def implies_activesync(e) -> bool:
    """Does every request matching e start with /Microsoft-Server-ActiveSync (any case)?"""
    probe = Atom("url", "startswith", "/Microsoft-Server-ActiveSync", icase=True)
    return decide(simplify(e), probe) is True


# =============================================================================================
# 3. Commands


@dataclass
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
    ("add", "service"), ("add", "server"), ("add", "lb", "vserver"), ("bind", "lb", "vserver"),
    ("add", "cs", "vserver"), ("add", "cs", "policy"), ("add", "cs", "action"), ("bind", "cs", "vserver"),
    ("set", "ssl", "vserver"), ("add", "ssl", "action"), ("add", "ssl", "policy"), ("bind", "ssl", "vserver"),
    ("add", "ssl", "certkey"), ("link", "ssl", "certkey"), ("add", "policy", "httpcallout"),
    ("set", "policy", "httpcallout"), ("enable", "ns", "feature"), ("save", "ns", "config"),
]
# commands that change nothing easgate would do
HARMLESS_VERBS = {"enable ns feature", "save ns config", "link ssl certkey"}
FLAGS = {"ca", "snicert", "skipcaname"}
_OPTION = re.compile(r"^-[A-Za-z][A-Za-z0-9_]*$")

# Options easgate ignores on purpose: None = any value; a set = only these values (upper case).
ANY = None
IGNORED: dict[str, dict[str, set | None]] = {
    "add service": {
        "gslb": ANY, "maxclient": ANY, "maxreq": ANY, "cip": {"DISABLED"}, "usip": {"NO"},
        "useproxyport": ANY, "sp": ANY, "clttimeout": ANY, "svrtimeout": ANY, "cka": ANY, "tcpb": ANY,
        "cmp": {"NO"}, "healthmonitor": ANY, "comment": ANY, "appflowlog": ANY, "downstateflush": ANY,
        "state": {"ENABLED"}, "maxbandwidth": {"0"}, "monthreshold": ANY, "td": {"0"},
    },
    "add server": {"comment": ANY, "state": {"ENABLED"}, "td": {"0"}},
    "add lb vserver": {
        "persistencetype": {"NONE"}, "clttimeout": ANY, "lbmethod": ANY, "comment": ANY, "appflowlog": ANY,
        "state": {"ENABLED"}, "downstateflush": ANY, "td": {"0"},
    },
    "bind lb vserver": {"weight": ANY},
    "add cs vserver": {
        "clttimeout": ANY, "comment": ANY, "appflowlog": ANY, "state": {"ENABLED"}, "casesensitive": ANY,
        "persistencetype": {"NONE"}, "downstateflush": ANY, "td": {"0"},
    },
    "add cs policy": {"comment": ANY},
    "add cs action": {"comment": ANY},
    "bind cs vserver": {"gotopriorityexpression": {"END"}, "type": {"REQUEST"}},
    "set ssl vserver": {"ssl3": {"DISABLED"}, "tls1": {"DISABLED"}, "tls11": {"DISABLED"},
                        "tls12": {"ENABLED"}, "tls13": {"ENABLED"}, "sessreuse": ANY, "sesstimeout": ANY},
    "add ssl action": {"comment": ANY},
    "add ssl policy": {"comment": ANY},
    "bind ssl vserver": {"skipcaname": ANY, "gotopriorityexpression": {"END"}, "type": {"REQUEST"}},
    "add ssl certkey": {"inform": {"PEM"}, "expirymonitor": ANY, "notificationperiod": ANY, "bundle": ANY},
    "add policy httpcallout": {"comment": ANY, "returntype": {"TEXT"}, "httpmethod": {"GET"}, "scheme": ANY},
}
IGNORED["set policy httpcallout"] = IGNORED["add policy httpcallout"]

HANDLED: dict[str, set[str]] = {
    "add service": set(), "add server": set(), "add lb vserver": set(), "bind lb vserver": set(),
    "add cs vserver": set(), "add cs policy": {"rule", "action"}, "add cs action": {"targetlbvserver"},
    "bind cs vserver": {"policyname", "targetlbvserver", "priority", "lbvserver"},
    "set ssl vserver": {"clientauth", "clientcert"},
    "add ssl action": {"clientcert", "certheader"}, "add ssl policy": {"rule", "action"},
    "bind ssl vserver": {"certkeyname", "ca", "policyname", "priority", "ocspcheck", "crlcheck", "snicert"},
    "add ssl certkey": {"cert", "key"},
    "add policy httpcallout": {"vserver", "ipaddress", "port", "hostexpr", "urlstemexpr", "parameters",
                               "resultexpr", "cacheforsecs"},
    "enable ns feature": set(), "save ns config": set(), "link ssl certkey": set(),
}
HANDLED["set policy httpcallout"] = HANDLED["add policy httpcallout"]

PLACEHOLDER = re.compile(r"\[([A-Za-z0-9][A-Za-z0-9_.-]*)\]")


def parse_command(no: int, text: str, tokens: list[Token]) -> Cmd | str:
    """A Cmd, or the reason the line is not understood."""
    words = [t.text.lower() for t in tokens]
    verb = next((v for v in sorted(VERBS, key=len, reverse=True) if tuple(words[:len(v)]) == v), None)
    if verb is None:
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
            opts[cur], names[cur] = [], t.text
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
    return Cmd(no, text, " ".join(verb), args, opts, names, " ".join(t.text for t in tokens[:len(verb)]))


# =============================================================================================
# 4. The model and its translation


@dataclass
class Service:
    name: str
    host: str
    proto: str
    port: str
    cmd: Cmd


@dataclass
class LbVserver:
    name: str
    proto: str
    ip: str | None
    port: str | None
    cmd: Cmd
    services: list[tuple[str, Cmd]] = field(default_factory=list)

    @property
    def addressable(self) -> bool:
        return bool(self.ip) and self.ip not in ("0", "0.0.0.0", "::") and self.port not in (None, "0")


@dataclass
class Report:
    line: int
    message: str


@dataclass
class Options:
    sets: dict[str, str] = field(default_factory=dict)  # placeholder name -> value
    certs: dict[str, tuple[str, str | None]] = field(default_factory=dict)  # certkey -> (pem, key)
    certs_dir: Path | None = None
    services: dict[str, str] = field(default_factory=dict)  # service name -> host:port
    pool_ca: dict[str, str] = field(default_factory=dict)
    pool_sni: dict[str, str] = field(default_factory=dict)


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


class Importer:
    def __init__(self, text: str, file: str = "<netscaler>", opts: Options | None = None) -> None:
        self.file = file
        self.o = opts or Options()
        self.reports: list[Report] = []
        self.notes: list[str] = []
        self.fill_in: set[str] = set()
        self.placeholders_in_input: set[str] = set()
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
            else:
                self.cmds.append(c)

    # -- bookkeeping -------------------------------------------------------------------------

    def untranslated(self, line: int, message: str) -> None:
        self.reports.append(Report(line, message))

    def substitute(self, s: str) -> str:
        return PLACEHOLDER.sub(lambda m: self.o.sets.get(m[1], m[0]), s)

    def value(self, s: str) -> str:
        """An output value: a remaining [PLACEHOLDER] becomes FILL-IN-PLACEHOLDER (and is noted)."""
        def fill(m: re.Match) -> str:
            self.fill_in.add(m[1])
            return f"FILL-IN-{m[1]}"
        return PLACEHOLDER.sub(fill, s)

    def check_options(self, c: Cmd) -> None:
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
        self.servers: dict[str, str] = {}
        self.services: dict[str, Service] = {}
        self.lbs: dict[str, LbVserver] = {}
        self.cs: dict[str, Cmd] = {}
        self.cs_policies: dict[str, Cmd] = {}
        self.cs_actions: dict[str, Cmd] = {}
        self.cs_binds: list[Cmd] = []
        self.ssl_set: dict[str, list[Cmd]] = {}
        self.ssl_actions: dict[str, Cmd] = {}
        self.ssl_policies: dict[str, Cmd] = {}
        self.ssl_binds: list[Cmd] = []
        self.certkeys: dict[str, Cmd] = {}
        self.callouts: dict[str, list[Cmd]] = {}
        for c in self.cmds:
            if c.verb in HARMLESS_VERBS:
                continue
            self.check_options(c)
            a = c.args
            need = {"add service": 4, "add server": 2, "add lb vserver": 2, "bind lb vserver": 2,
                    "add cs vserver": 2, "bind cs vserver": 1}.get(c.verb, 1)
            if len(a) < need:
                self.untranslated(c.line, f"{c.verb}: expected {need} arguments: {c.short()}")
                continue
            if c.verb == "add server":
                self.servers[a[0]] = a[1]
            elif c.verb == "add service":
                self.services[a[0]] = Service(a[0], self.servers.get(a[1], a[1]), a[2].upper(), a[3], c)
            elif c.verb == "add lb vserver":
                self.lbs[a[0]] = LbVserver(a[0], a[1].upper(), a[2] if len(a) > 2 else None,
                                           a[3] if len(a) > 3 else None, c)
            elif c.verb == "bind lb vserver":
                lb = self.lbs.get(a[0])
                if lb is None:
                    self.untranslated(c.line, f"bind lb vserver: no lb vserver named '{a[0]}'")
                elif len(a) < 2 or a[1] not in self.services:
                    self.untranslated(c.line, f"bind lb vserver {a[0]}: no service named "
                                              f"'{a[1] if len(a) > 1 else ''}' (service groups are not supported)")
                else:
                    lb.services.append((a[1], c))
            elif c.verb == "add cs vserver":
                self.cs[a[0]] = c
            elif c.verb == "add cs policy":
                self.cs_policies[a[0]] = c
            elif c.verb == "add cs action":
                self.cs_actions[a[0]] = c
            elif c.verb == "bind cs vserver":
                self.cs_binds.append(c)
            elif c.verb == "set ssl vserver":
                self.ssl_set.setdefault(a[0], []).append(c)
            elif c.verb == "add ssl action":
                self.ssl_actions[a[0]] = c
            elif c.verb == "add ssl policy":
                self.ssl_policies[a[0]] = c
            elif c.verb == "bind ssl vserver":
                self.ssl_binds.append(c)
            elif c.verb == "add ssl certkey":
                self.certkeys[a[0]] = c
            elif c.verb in ("add policy httpcallout", "set policy httpcallout"):
                if c.verb == "set policy httpcallout" and a[0] not in self.callouts:
                    self.untranslated(c.line, f"set policy httpCallout: no callout named '{a[0]}' was added")
                    continue
                self.callouts.setdefault(a[0], []).append(c)

    # -- translation ---------------------------------------------------------------------------

    def translate(self) -> str:
        self.collect()
        out = Yaml()
        cs_name = self.pick_cs()
        cs = self.cs.get(cs_name) if cs_name else None
        routes = self.build_routes(cs_name)
        self.cert_headers(cs_name, routes)
        callout = self.build_callout()
        if callout:
            self.attach_authorization(routes, callout)
        used_lbs = list(dict.fromkeys(r["lb"] for r in routes if r.get("lb")))
        pools = {name: self.build_pool(self.lbs[name]) for name in used_lbs}
        for r in routes:
            if r.get("lb") and pools.get(r["lb"]) is None:
                self.untranslated(r["bind"].line, f"route {r['name']}: lb vserver {r['lb']} has no usable "
                                                  "service, so the route is left out")
                r["skip"] = True
        self.listeners_not_served(cs_name, used_lbs, callout)
        tls = self.build_tls(cs_name)

        listen_host = None
        if cs is not None:
            listen_host = self.value(cs.args[2] if len(cs.args) > 2 else "0.0.0.0")

        # ---- header
        out.comment(f"easgate configuration imported from {Path(self.file).name} by `easgate import-netscaler`.")
        if self.fill_in:
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
        out.blank()

        # ---- listen
        if cs is not None:
            out.comment(f"line {cs.line}: {cs.short()}")
            port = cs.args[3] if len(cs.args) > 3 else "443"
            out.line("listen:")
            host = listen_host
            out.kv(1, "host", host, "FILL IN: the address to listen on (0.0.0.0 for all)" if "FILL-IN" in host else None)
            out.kv(1, "port", int(port) if port.isdigit() else 443)
            if cs.opts.get("clttimeout"):
                out.comment(f"-cltTimeout {cs.opt('clttimeout')} is not carried over: easgate keeps idle client "
                            "connections open for client_idle_timeout_s (3660 s), as ActiveSync Ping needs", 0)
            out.blank()
        tls.emit(out)
        out.blank()

        # ---- pools
        out.line("pools:")
        for name in used_lbs:
            pool = pools[name]
            if pool is not None:
                pool.emit(out)
        out.blank()

        # ---- routes
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

        # ---- authorization
        if callout:
            callout.emit(out)
        return out.text()

    # -- cs vserver and routes --------------------------------------------------------------------

    def pick_cs(self) -> str | None:
        if not self.cs:
            self.untranslated(0, "no `add cs vserver`: easgate serves one content-switching listener; "
                                 "nothing to listen on was found")
            return None
        name = next(iter(self.cs))
        for other, c in list(self.cs.items())[1:]:
            self.untranslated(c.line, f"cs vserver {other}: easgate translates one cs vserver per config "
                                      f"({name}); import this one separately")
        c = self.cs[name]
        if c.args[1].upper() != "SSL":
            self.untranslated(c.line, f"cs vserver {name} is {c.args[1]}: easgate listens with TLS only")
        return name

    def build_routes(self, cs_name: str | None) -> list[dict]:
        routes: list[dict] = []
        for b in self.cs_binds:
            vs = b.args[0]
            if vs != cs_name:
                if vs not in self.cs:
                    self.untranslated(b.line, f"bind cs vserver: no cs vserver named '{vs}'")
                continue
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
            prio = b.opt("priority")
            if not prio or not prio.isdigit():
                self.untranslated(b.line, f"bind cs vserver {vs} -policyName {pname}: no numeric -priority")
                continue
            target = b.opt("targetlbvserver")
            if target is None and pol.opt("action"):
                act = self.cs_actions.get(pol.opt("action"))
                if act is None:
                    self.untranslated(pol.line, f"cs policy {pname}: no cs action named '{pol.opt('action')}'")
                    continue
                target = act.opt("targetlbvserver")
            if target is None:
                self.untranslated(b.line, f"bind cs vserver {vs} -policyName {pname}: no -targetLBVserver")
                continue
            if target not in self.lbs:
                self.untranslated(b.line, f"bind cs vserver {vs} -policyName {pname}: no lb vserver named '{target}'")
                continue
            r = {"name": pname, "priority": int(prio), "lb": target, "bind": b, "policy": pol,
                 "comments": [f"line {pol.line}: {pol.short()}", f"line {b.line}: {b.short()}"]}
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
        ordered = named + defaults[:1]
        # what reaches each route: its rule and no earlier rule (untranslatable rules stay unknown)
        earlier: list = []
        for r in ordered:
            r["traffic"] = simplify(And(tuple([r["expr"]] + [Not(x) for x in earlier])))
            earlier.append(r["expr"])
        return ordered

    def cert_headers(self, cs_name: str | None, routes: list[dict]) -> None:
        """ssl policies with a -certHeader action -> client_cert_header on the routes they cover."""
        binds = []
        for b in self.ssl_binds:
            if b.opt("policyname") is None:
                continue
            if b.args[0] != cs_name:
                self.untranslated(b.line, f"bind ssl vserver {b.args[0]} -policyName: only ssl policies on the "
                                          f"cs vserver {cs_name} are translated")
                continue
            pol = self.ssl_policies.get(b.opt("policyname"))
            if pol is None:
                self.untranslated(b.line, f"bind ssl vserver: no ssl policy named '{b.opt('policyname')}'")
                continue
            act = self.ssl_actions.get(pol.opt("action") or "")
            if act is None:
                self.untranslated(pol.line, f"ssl policy {pol.args[0]}: no ssl action named '{pol.opt('action')}'")
                continue
            header = act.opt("certheader")
            if not header:
                continue  # an action without a header inserts nothing
            if (act.opt("clientcert") or "").upper() != "ENABLED":
                continue  # the header is only inserted with -clientCert ENABLED
            try:
                rule = simplify(parse_expr(pol.opt("rule") or ""))
            except ExprError as e:
                self.untranslated(pol.line, f"ssl policy {pol.args[0]}: {e}")
                continue
            prio = int(b.opt("priority")) if (b.opt("priority") or "").isdigit() else 0
            binds.append((prio, b, pol, act, header, rule))
        binds.sort(key=lambda x: x[0])
        for r in routes:
            if r.get("skip"):
                continue
            # the header exists only when a certificate was presented (and, here, verified)
            traffic = simplify(with_cert(r["traffic"], True))
            for prio, b, pol, act, header, rule in binds:
                applies = decide(traffic, simplify(with_cert(rule, True)))
                where = f"ssl policy {pol.args[0]} (line {pol.line}, bound line {b.line}, action {act.args[0]} line {act.line})"
                if applies is True:
                    r["cert_header"] = header
                    r["comments"].append(f"{where}: its rule holds for every request on this route that "
                                         f"presents a certificate, so {header} carries the verified certificate")
                    break
                if applies is False:
                    r["comments"].append(f"{where}: its rule never holds on this route: no certificate header")
                    continue
                self.untranslated(b.line, f"ssl policy {pol.args[0]} covers only part of route {r['name']}'s "
                                          f"traffic; easgate sets client_cert_header per route: split the cs policy")
                break

    # -- callout ----------------------------------------------------------------------------

    def build_callout(self) -> CalloutOut | None:
        if not self.callouts:
            return None
        names = list(self.callouts)
        for extra in names[1:]:
            self.untranslated(self.callouts[extra][0].line, f"httpCallout {extra}: easgate has one connector "
                                                            f"({names[0]}); not translated")
        name = names[0]
        merged: dict[str, tuple[str, Cmd]] = {}
        for c in self.callouts[name]:
            for k in c.opts:
                merged[k] = (c.opt(k) or "", c)
        first = self.callouts[name][0]
        lines = ", ".join(str(c.line) for c in self.callouts[name])
        out = CalloutOut(name, lines)
        out.comments.append(f"line {first.line}: {first.short()}")
        for c in self.callouts[name][1:]:
            out.comments.append(f"line {c.line}: {c.short()}")
        # where it goes
        scheme, hostport = None, None
        if "vserver" in merged:
            vs, c = merged["vserver"]
            lb = self.lbs.get(vs)
            if lb is None:
                self.untranslated(c.line, f"httpCallout {name}: no lb vserver named '{vs}'")
            elif not lb.services:
                self.untranslated(c.line, f"httpCallout {name}: lb vserver {vs} has no service")
            else:
                svc = self.services[lb.services[0][0]]
                if len(lb.services) > 1:
                    self.untranslated(lb.services[1][1].line, f"lb vserver {vs} (the callout's) has several "
                                                              f"services; the connector URL uses the first, {svc.name}")
                scheme, hostport = self.service_url(svc)
                out.comments.append(f"-vServer {vs} -> service {svc.name} (line {svc.cmd.line}): {svc.proto} "
                                    f"{svc.host}:{svc.port}")
                out.lb = vs
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
        if stem is None:
            stem = "/services/ActiveSync/Authorize"
        if not stem.startswith("/"):
            stem = "/" + stem
        if scheme and hostport:
            out.url = f"{scheme}://{hostport}{stem}"
        if "hostexpr" in merged:
            expr, c = merged["hostexpr"]
            host = string_literal(expr)
            out.comments.append(f"-hostExpr {expr}: NetScaler sends Host: {host or expr}")
            self.untranslated(c.line, f"httpCallout {name}: -hostExpr {expr}: easgate sends the connector "
                                      "URL's host as Host (make the URL use that name if the connector needs it)")
        if "resultexpr" in merged:
            expr, c = merged["resultexpr"]
            if not re.fullmatch(r"HTTP\.RES\.BODY\(\d+\)", expr.replace(" ", ""), re.IGNORECASE):
                self.untranslated(c.line, f"httpCallout {name}: -resultExpr {expr}: easgate reads the answer body "
                                          "(JSON result or an exact Allow/Deny token), nothing else")
        if "cacheforsecs" in merged:
            ttl, c = merged["cacheforsecs"]
            if ttl.isdigit():
                out.cache_ttl = int(ttl)
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
        return out

    def check_parameters(self, name: str, params: list[tuple[str, str]], c: Cmd) -> None:
        got = {}
        for pname, expr in params:
            got[pname] = expr
            std = STANDARD_PARAMS.get(pname)
            if std is None:
                self.untranslated(c.line, f"httpCallout {name}: parameter {pname}({expr}) is not an XNC parameter; "
                                          "easgate does not send it")
            elif canonical_expr(expr) != canonical_expr(std):
                self.untranslated(c.line, f"httpCallout {name}: parameter {pname}({expr}) differs from the XNC "
                                          f"standard {pname}({std}); easgate sends the standard value")
        missing = [p for p in STANDARD_PARAMS if p not in got]
        if missing:
            self.untranslated(c.line, f"httpCallout {name}: parameters {', '.join(missing)} are missing; "
                                      "easgate sends them anyway")

    def attach_authorization(self, routes: list[dict], callout: CalloutOut) -> None:
        live = [r for r in routes if not r.get("skip")]
        exch = {r["lb"] for r in live if r.get("match") not in (None, "any") and implies_activesync(r["expr"])}
        if not exch:
            self.untranslated(callout.first_line, f"httpCallout {callout.name}: no route carries only "
                                                  "/Microsoft-Server-ActiveSync traffic, so easgate cannot tell "
                                                  "which route the (absent) responder policy guarded; add "
                                                  "`authorize: activesync` by hand")
            return
        for r in live:
            if r["lb"] in exch:
                r["authorize"] = True
                r["comments"].append(
                    f"authorize: the XNC callout {callout.name} (lines {callout.lines}) is used by a responder policy "
                    f"that is not in this file; easgate asks the connector on every route to {r['lb']}")

    # -- pools, tls, listeners --------------------------------------------------------------------

    def service_url(self, svc: Service) -> tuple[str | None, str | None]:
        if svc.name in self.o.services:
            hp = self.o.services[svc.name]
        else:
            host = self.value(svc.host)
            if ":" in host and not host.startswith("["):
                host = f"[{host}]"
            hp = f"{host}:{svc.port}"
        if svc.proto == "HTTP":
            return "http", hp
        if svc.proto == "SSL":
            return "https", hp
        self.untranslated(svc.cmd.line, f"service {svc.name} is {svc.proto}: easgate pools speak HTTP or HTTPS only")
        return None, None

    def build_pool(self, lb: LbVserver) -> PoolOut | None:
        p = PoolOut(lb.name)
        p.comments.append(f"line {lb.cmd.line}: {lb.cmd.short()}")
        for sname, bind in lb.services:
            svc = self.services[sname]
            scheme, hp = self.service_url(svc)
            if scheme is None:
                continue
            p.comments.append(f"line {bind.line}: {bind.short()}")
            p.comments.append(f"line {svc.cmd.line}: {svc.cmd.short()}")
            url = f"{scheme}://{hp}"
            p.servers.append((url, "FILL IN" if "FILL-IN" in url else None))
            p.https = p.https or scheme == "https"
        if not p.servers:
            return None
        if lb.addressable:
            p.comments.append(f"lb vserver {lb.name} also listens on {lb.ip}:{lb.port} itself: see NOT TRANSLATED")
        if len(lb.services) > 1:
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
            elif lb.name not in used and (callout is None or callout.lb != lb.name):
                self.notes.append(f"lb vserver {lb.name} (line {lb.cmd.line}) is not used by the cs vserver or the "
                                  "callout: left out")
        bound = {s for lb in self.lbs.values() for s, _ in lb.services}
        for svc in self.services.values():
            if svc.name not in bound:
                self.notes.append(f"service {svc.name} (line {svc.cmd.line}) is bound to no lb vserver: left out")
        for b in self.ssl_binds:
            if b.opt("policyname") is not None or b.args[0] == cs_name:
                continue
            lb = self.lbs.get(b.args[0])
            if lb is None:
                self.untranslated(b.line, f"bind ssl vserver: no vserver named '{b.args[0]}'")
            elif lb.addressable:
                self.untranslated(b.line, f"bind ssl vserver {lb.name}: belongs to the listener of lb vserver "
                                          f"{lb.name}, which is not translated")
            # a certificate on a non-addressable lb vserver is never shown to a client: nothing to do
        for name, sets in self.ssl_set.items():
            if name != cs_name:
                for c in sets:
                    self.untranslated(c.line, f"set ssl vserver {name}: only the cs vserver {cs_name} is translated")

    def resolve_cert(self, name: str) -> tuple[str, str | None, bool, str | None]:
        """certkey -> (pem path, key path, is a placeholder, hint)."""
        bare = name[1:-1] if PLACEHOLDER.fullmatch(name) else name
        for k in (name, bare):
            if k in self.o.certs:
                pem, key = self.o.certs[k]
                return (str(Path(pem).expanduser().resolve()),
                        str(Path(key).expanduser().resolve()) if key else None, False, None)
        ck = self.certkeys.get(name)
        hint = None
        if ck is not None:
            cert, key = ck.opt("cert"), ck.opt("key")
            hint = f"certKey {name} (line {ck.line}): -cert {cert}" + (f" -key {key}" if key else "")
            if self.o.certs_dir and cert:
                p = self.o.certs_dir / Path(cert).name
                kp = self.o.certs_dir / Path(key).name if key else None
                if p.exists():
                    return str(p.resolve()), str(kp.resolve()) if kp and kp.exists() else None, False, hint
        if self.o.certs_dir:
            for cand in (f"{bare}.pem", bare):
                p = self.o.certs_dir / cand
                if p.is_file():
                    return str(p.resolve()), None, False, hint
        self.fill_in.add(f"CERTKEY-{bare}")
        return f"FILL-IN-CERTKEY-{bare}.pem", None, True, hint

    def build_tls(self, cs_name: str | None) -> TlsOut:
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
            for extra in server_certs[1:]:
                self.untranslated(extra.line, "a second server certificate (SNI): easgate serves one certificate")
        else:
            t.cert = ("FILL-IN-CERTKEY-server-certificate.pem", None, "no `bind ssl vserver ... -certkeyName` for "
                      "the cs vserver", None, True, "server-certificate")
            self.fill_in.add("CERTKEY-server-certificate")
        for b in ca_binds:
            name = b.opt("certkeyname")
            pem, _key, fill, hint = self.resolve_cert(name)
            notes = []
            revocation = None
            if "ocspcheck" in b.opts:
                ocsp = (b.opt("ocspcheck") or "").lower()
                if ocsp in ("optional", "mandatory"):
                    revocation = ocsp
                    notes.append(f"{b.names['ocspcheck']} {b.opt('ocspcheck')} -> revocation: {ocsp} (OCSP responder "
                                 "from the certificate's AIA; add ocsp_url to name one)")
                else:
                    notes.append(f"NOT TRANSLATED: {b.names['ocspcheck']} {b.opt('ocspcheck')}")
                    self.untranslated(b.line, f"bind ssl vserver {cs_name} -certkeyName {name} -CA: "
                                              f"{b.names['ocspcheck']} {b.opt('ocspcheck')} is not Optional or Mandatory")
            if "crlcheck" in b.opts:
                notes.append(f"NOT TRANSLATED: {b.names['crlcheck']} {b.opt('crlcheck')} (name the CRL file: "
                             "crl: PATH, see docs/revocation.md)")
                self.untranslated(b.line, f"bind ssl vserver {cs_name} -certkeyName {name} -CA: "
                                          f"{b.names['crlcheck']} {b.opt('crlcheck')}: NetScaler's CRL object has no "
                                          "file here; add `crl: PATH` to this CA in easgate")
            t.cas.append((pem, f"line {b.line}: {b.short()}", hint, fill, name, notes, revocation))
        mode, mode_line = "off", None
        for c in self.ssl_set.get(cs_name or "", []):
            auth = (c.opt("clientauth") or "").upper()
            cc = (c.opt("clientcert") or "").upper()
            if auth == "ENABLED":
                mode = {"MANDATORY": "required", "OPTIONAL": "optional", "": "required"}.get(cc, "?")
                if mode == "?":
                    self.untranslated(c.line, f"set ssl vserver: -clientCert {c.opt('clientcert')} is not Optional or Mandatory")
                    mode = "optional"
                mode_line = f"line {c.line}: {c.short()}"
            elif auth == "DISABLED":
                mode, mode_line = "off", f"line {c.line}: {c.short()}"
        t.mode, t.mode_line = mode, mode_line
        if mode != "off" and not t.cas:
            self.untranslated(0, f"cs vserver {cs_name} asks for client certificates but has no `-CA` binding")
        return t

    # -- output ------------------------------------------------------------------------------------

    def emit_route(self, out: Yaml, r: dict) -> None:
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
        for flag, given, known in (("--service", self.o.services, self.services),
                                   ("--pool-ca", self.o.pool_ca, self.lbs), ("--pool-sni", self.o.pool_sni, self.lbs)):
            if bad := sorted(set(given) - set(known)):
                problems.append(f"{flag} {', '.join(bad)}: no such {'service' if flag == '--service' else 'lb vserver'} "
                                f"in {self.file}")
        certkeys = {b.opt("certkeyname") for b in self.ssl_binds if b.opt("certkeyname")} | set(self.certkeys)
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
    """A YAML scalar: plain when unambiguous, otherwise single-quoted (no escapes needed)."""
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int):
        return str(v)
    s = str(v)
    if _PLAIN.match(s) and s.lower() not in _YAML_WORDS and ": " not in s and not s.endswith(":"):
        return s
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
        self.lines.append(("  " * indent + "# " + s).rstrip())

    def kv(self, indent: int, k: str, v, note: str | None = None) -> None:
        self.lines.append("  " * indent + f"{ys(k)}: {ys(v)}" + (f"  # {note}" if note else ""))

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

    def emit(self, out: Yaml) -> None:
        out.line("tls:")
        pem, key, src, hint, fill, name = self.cert
        out.comment(src, 1)
        if hint:
            out.comment(hint, 1)
        out.kv(1, "certificate", pem, f"FILL IN: PEM with certificate, chain and key of certkey {name} "
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
            for pem, src, hint, fill, name, notes, revocation in self.cas:
                out.comment(src, 3)
                if hint:
                    out.comment(hint, 3)
                for n in notes:
                    out.comment(n, 3)
                entry = ys(pem) if revocation is None else f"{{file: {ys(pem)}, revocation: {revocation}}}"
                out.line(f"      - {entry}" + (f"  # FILL IN: PEM of CA certkey {name} (--cert {name.strip('[]')}=FILE)"
                                                if fill else ""))
        out.kv(2, "on_invalid", "reject", "a certificate that does not verify fails the handshake, as on NetScaler")


@dataclass
class CalloutOut:
    name: str
    lines: str
    url: str | None = None
    lb: str | None = None
    cache_ttl: int | None = None
    comments: list[str] = field(default_factory=list)

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
            out.comment(f"-cacheForSecs {self.cache_ttl}", 1)
            out.line(f"  cache: {{allow_ttl_s: {self.cache_ttl}, deny_ttl_s: {self.cache_ttl}}}")
        else:
            out.comment("NetScaler calls out on every request (no -cacheForSecs); easgate caches answers per user and", 1)
            out.comment("device. Set both TTLs to 0 to ask the connector every time.", 1)
            out.line("  cache: {allow_ttl_s: 300, deny_ttl_s: 30}")
        out.comment("!!! Citrix's setup is fail-open: when the connector does not answer, the request is ALLOWED.", 1)
        out.comment("!!! This import keeps that behaviour. RECOMMENDED: on_connector_error: deny (or stale).", 1)
        out.line("  on_connector_error: allow")
        out.comment("NetScaler's responder policy (not in the file) usually DROPs a denied request; easgate answers", 1)
        out.comment("403, which clients understand. Use deny: {action: drop} to drop instead.", 1)
        out.line("  deny: {status: 403}")


# =============================================================================================
# 5. Command line


def import_netscaler(text: str, file: str = "<netscaler>", opts: Options | None = None) -> tuple[str, Importer]:
    """Translate; returns (YAML text, the importer with .reports and .notes)."""
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


def cmd_import(args) -> int:
    try:
        raw = Path(args.file).read_bytes()
    except OSError as e:
        print(f"easgate import-netscaler: cannot read {args.file}: {e.strerror}", file=sys.stderr)
        return 2
    try:
        text = raw.decode("utf-8-sig")
        if "\x00" in text:
            raise UnicodeDecodeError("utf-8", raw, 0, 1, "NUL byte")
    except UnicodeDecodeError:
        print(f"easgate import-netscaler: {args.file} is not a text file", file=sys.stderr)
        return 2
    try:
        certs = {}
        for k, v in _pairs(args.cert, "--cert").items():
            pem, _, key = v.partition(",")
            certs[k] = (pem, key or None)
        opts = Options(sets=_pairs(args.set, "--set"), certs=certs,
                       certs_dir=Path(args.certs) if args.certs else None,
                       services=_pairs(args.service, "--service"),
                       pool_ca=_pairs(args.pool_ca, "--pool-ca"), pool_sni=_pairs(args.pool_sni, "--pool-sni"))
        yaml_text, imp = import_netscaler(text, args.file, opts)
    except UsageError as e:
        print(f"easgate import-netscaler: {e}", file=sys.stderr)
        return 2
    if args.output:
        Path(args.output).write_text(yaml_text)
    else:
        sys.stdout.write(yaml_text)
    for r in sorted(imp.reports, key=lambda r: r.line):
        print(f"{args.file}:{r.line}: not translated: {r.message}", file=sys.stderr)
    for n in imp.notes:
        print(f"{args.file}: note: {n}", file=sys.stderr)
    if imp.fill_in:
        print(f"{args.file}: note: values to fill in (FILL-IN-...): "
              + ", ".join(sorted(imp.fill_in)) + " (--set NAME=VALUE, --cert CERTKEY=FILE)", file=sys.stderr)
    return 1 if imp.reports else 0


def add_commands(sub) -> None:
    s = sub.add_parser(
        "import-netscaler", help="translate a NetScaler CLI configuration into an easgate config (YAML)",
        description="Print an easgate config reproducing a NetScaler configuration (ns.conf CLI lines). "
                    "What cannot be translated is listed on stderr with its line number. Exit status: 0 all "
                    "translated, 1 something not translated (the YAML is still printed), 2 unreadable input.",
    )
    s.add_argument("file", help="NetScaler CLI lines, e.g. ns.conf")
    s.add_argument("--set", action="append", metavar="NAME=VALUE",
                   help="fill the placeholder [NAME] of the file (repeatable), e.g. --set EXCHANGESERVER-IP=10.0.0.5")
    s.add_argument("--cert", action="append", metavar="CERTKEY=PEM[,KEY]",
                   help="the PEM file of a certkey (server certificate: leaf + chain + key), repeatable")
    s.add_argument("--certs", metavar="DIR", help="look up certkey NAME as DIR/NAME.pem (or the -cert file name)")
    s.add_argument("--service", action="append", metavar="SERVICE=HOST:PORT",
                   help="send a service's traffic to HOST:PORT instead (e.g. a test stand-in)")
    s.add_argument("--pool-ca", action="append", metavar="LBVSERVER=PEM",
                   help="CA file that verifies the https servers of an lb vserver's pool")
    s.add_argument("--pool-sni", action="append", metavar="LBVSERVER=NAME",
                   help="server name (SNI, verified) for an lb vserver's https servers")
    s.add_argument("-o", "--output", help="write the YAML here instead of stdout")
    s.set_defaults(fn=cmd_import)
