"""A rule's tree -> an easgate route `match`: structured keys, the rest as a mitmproxy filter."""

from __future__ import annotations

import re

from mitmproxy import flowfilter

from ...core.paths import normalize_path
from .expressions import And, Atom, Const, ExprError, Not, Or, atoms_of, show, simplify

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
