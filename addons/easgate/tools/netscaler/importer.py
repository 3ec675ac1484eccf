"""The translation: NetScaler objects -> listener, routes, pools, TLS and authorization, with every
difference reported (weaker first)."""

from __future__ import annotations

import bisect
import itertools
import re
from pathlib import Path

from .authorization import AuthorizationMixin
from .commands import HANDLED, HARMLESS_VERBS, IGNORED, PLACEHOLDER, Cmd, parse_command
from .expressions import And, Atom, Const, ExprError, Not, atoms_of, parse_expr, simplify
from .filters import to_match
from .lexer import NsSyntaxError, Token, logical_lines, shorten, tokenize
from .model import LbVserver, Options, Report, UsageError
from .pools import PoolsMixin
from .reasoning import decide, implies_activesync, independent_dropped, with_cert
from .tls import TlsMixin
from .writer import Yaml, ys

# how many earlier routes may refine a decision about one route (keeps the import linear)
REFINE_ROUTES = 8


def _atom_key(a: Atom) -> tuple:
    """Tests that are about the same thing (URL and path prefixes alike, case folded)."""
    kind = "url" if a.kind in ("url", "path") else a.kind
    return kind, a.value.lower(), a.name.lower()


class Importer(AuthorizationMixin, PoolsMixin, TlsMixin):
    """One import: reads the commands, collects the objects, translates the chosen cs vserver and
    records what differs (weaker, not translated, notes, unused objects)."""

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
                self.untranslated(no, f"{e}: {shorten(text_line)}")
                continue
            for t in toks:
                self.placeholders_in_input.update(PLACEHOLDER.findall(t.text))
            toks = [Token(self.substitute(t.text), t.quoted) for t in toks]
            c = parse_command(no, text_line, toks)
            if isinstance(c, str):
                self.untranslated(no, f"{c}: {shorten(text_line)}")
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
                                      f"{c.spelled(name)} {' '.join(vals)}".rstrip() + " is not supported by easgate")

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

    def find_unused(self, cs_name: str | None) -> None:
        for kind, name, c in self.objects:
            if (kind, name) not in self.used:
                self.unused.append(f"{kind} {name} (line {c.line})")

    def emit_route(self, into: "Yaml", r: dict) -> None:
        out = Yaml()  # one string per route: a tenth of the list entries of a 25,000-route config
        self.route_lines(out, r)
        into.line("\n".join(out.lines))

    def route_lines(self, out: "Yaml", r: dict) -> None:
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


def import_netscaler(text: str, file: str = "<netscaler>", opts: Options | None = None) -> tuple[str, Importer]:
    """Translate; returns (YAML text, the importer with .weaker, .reports, .notes, .unused)."""
    imp = Importer(text, file, opts)
    return imp.run(), imp
