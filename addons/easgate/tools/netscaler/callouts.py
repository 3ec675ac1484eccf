"""The XNC callout's parameters: what easgate's connector client sends, compared loosely."""

from __future__ import annotations

import re

from .expressions import ExprError, lex_expr

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
        toks = lex_expr(text)
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
        toks = lex_expr(expr)
    except ExprError:
        return None
    return toks[0][1] if len(toks) == 1 and toks[0][0] == "str" else None
