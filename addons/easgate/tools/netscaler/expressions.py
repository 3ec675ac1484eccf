"""NetScaler advanced policy expressions -> a small tree (Const, Atom, Not, And, Or) and back."""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass


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
                  r'|(?P<id>[A-Za-z_][A-Za-z0-9_]*))', re.DOTALL)
_STR_ESC = {"n": "\n", "t": "\t", "r": "\r"}


def lex_expr(text: str) -> list[tuple[str, str]]:
    toks, i = [], 0
    text = text.rstrip()
    while i < len(text):
        m = _LEX.match(text, i)
        if not m or m.end() == i:
            raise ExprError(f"cannot read the expression at '{text[i:i + 20].strip()}'")
        kind = m.lastgroup
        val = m.group(kind)
        if kind == "str":
            val = val[1:-1]
            if "\\" in val:
                val = re.sub(r"\\(.)", lambda e: _STR_ESC.get(e[1], e[1]), val)
        toks.append((kind, val))
        i = m.end()
    return toks


_OPS = ("startswith", "endswith", "contains", "eq")


class _ExprParser:
    def __init__(self, text: str) -> None:
        self.text = text
        self.toks = lex_expr(text)
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
