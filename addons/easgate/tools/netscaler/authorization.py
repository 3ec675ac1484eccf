"""Responder policies and HTTP callouts -> `authorize: activesync`, the connector, fail mode, deny."""

from __future__ import annotations

import re

from .callouts import STANDARD_PARAMS, canonical_expr, split_parameters, string_literal
from .commands import Cmd
from .expressions import And, Atom, Const, ExprError, Not, Or, atoms_of, parse_expr, show, simplify
from .lexer import shorten
from .model import Guard
from .reasoning import assume, implies_activesync
from .writer import CalloutOut

BLOCKING = {"DROP", "RESET"}


class AuthorizationMixin:
    """Importer methods for the responder policies and callouts (state: see Importer.collect)."""

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
                         f"(block unless the connector allows) only, not: {shorten(show(rule), 80)}")
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
                shown = " || ".join(shorten(show(simplify(assume(c, known))), 70) for c in cond)
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
            compact = expr.replace(" ", "")
            bool_ok = re.fullmatch(r'HTTP\.RES\.BODY\(\d+\)\.(CONTAINS|EQ|STARTSWITH)\("Allow"\)', compact, re.IGNORECASE)
            if not re.fullmatch(r"HTTP\.RES\.BODY\(\d+\)", compact, re.IGNORECASE) and not bool_ok:
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
                    self.weakens(c.line, f"httpCallout {name}: user({shorten(expr, 60)}) comes from the client "
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
